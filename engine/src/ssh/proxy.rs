//! The socket a step sees: a proxy to the agent that forwards only listing identities and
//! signing (the ssh agent protocol, draft-miller-ssh-agent: messages are a big-endian u32
//! length, a type byte and the body).
//!
//! Hand-written rather than a crate's agent client: the proxy never parses keys or
//! signatures, it only reads a message's type and relays its bytes, which takes a few lines.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

const SSH_AGENT_FAILURE: u8 = 5;
const SSH_AGENTC_REQUEST_IDENTITIES: u8 = 11;
const SSH_AGENTC_SIGN_REQUEST: u8 = 13;
/// OpenSSH's limit on one message.
const MAX_MESSAGE: usize = 256 * 1024;
/// How long a request may wait for the agent (a key may need the user's confirmation).
const AGENT_TIMEOUT: Duration = Duration::from_secs(300);
/// Connections served at once (a thread each): more are closed unanswered, so a step cannot
/// make graphbuild start threads without bound.
const MAX_CONNECTIONS: usize = 32;

/// A listening socket in a private directory, forwarding to `upstream` until dropped.
pub(crate) struct AgentProxy {
    dir: Option<tempfile::TempDir>,
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AgentProxy {
    /// A proxy to the agent at `upstream`; its socket has this owner and mode.
    pub(crate) fn start(upstream: &Path, uid: u32, gid: u32, mode: u32) -> std::io::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("graphbuild-ssh-")
            .tempdir()?;
        let socket = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket)?;
        std::os::unix::fs::chown(&socket, Some(uid), Some(gid))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(mode))?;
        let stop = Arc::new(AtomicBool::new(false));
        let upstream = upstream.to_path_buf();
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("ssh-agent-proxy".into())
                .spawn(move || accept(&listener, &upstream, &stop))?
        };
        Ok(AgentProxy {
            dir: Some(dir),
            socket,
            stop,
            thread: Some(thread),
        })
    }

    /// The socket to mount in the step.
    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for AgentProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accepting thread, which then sees `stop`.
        let _ = UnixStream::connect(&self.socket);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        drop(self.dir.take());
    }
}

fn accept(listener: &UnixListener, upstream: &Path, stop: &AtomicBool) {
    let active = Arc::new(AtomicUsize::new(0));
    for client in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else {
            continue;
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let upstream = upstream.to_path_buf();
        let active = active.clone();
        // Ends when the client closes its connection; a step's processes are all gone when
        // the step ends.
        let spawned = std::thread::Builder::new()
            .name("ssh-agent-client".into())
            .spawn({
                let active = active.clone();
                move || {
                    serve(client, &upstream);
                    active.fetch_sub(1, Ordering::SeqCst);
                }
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// One client connection: each request read whole, forwarded if allowed, answered.
fn serve(mut client: UnixStream, upstream: &Path) {
    let mut agent: Option<UnixStream> = None;
    while let Some(request) = read_message(&mut client) {
        let allowed = matches!(
            request.get(4),
            Some(&SSH_AGENTC_REQUEST_IDENTITIES | &SSH_AGENTC_SIGN_REQUEST)
        );
        let reply = if allowed {
            forward(&mut agent, upstream, &request)
        } else {
            None
        };
        let reply = reply.unwrap_or_else(|| {
            // A refused request or an agent that failed: the client sees a failure.
            agent = None;
            vec![0, 0, 0, 1, SSH_AGENT_FAILURE]
        });
        if client.write_all(&reply).is_err() {
            return;
        }
    }
}

fn forward(agent: &mut Option<UnixStream>, upstream: &Path, request: &[u8]) -> Option<Vec<u8>> {
    if agent.is_none() {
        let stream = UnixStream::connect(upstream).ok()?;
        stream.set_read_timeout(Some(AGENT_TIMEOUT)).ok()?;
        stream.set_write_timeout(Some(AGENT_TIMEOUT)).ok()?;
        *agent = Some(stream);
    }
    let stream = agent.as_mut()?;
    stream.write_all(request).ok()?;
    read_message(stream)
}

/// A whole message, length prefix included; `None` at the end of the stream or for a message
/// that is empty or too long.
fn read_message(stream: &mut UnixStream) -> Option<Vec<u8>> {
    let mut length = [0u8; 4];
    stream.read_exact(&mut length).ok()?;
    let size = u32::from_be_bytes(length) as usize;
    if size == 0 || size > MAX_MESSAGE {
        return None;
    }
    let mut message = vec![0u8; 4 + size];
    message[..4].copy_from_slice(&length);
    stream.read_exact(&mut message[4..]).ok()?;
    Some(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake agent answering every request with `[type + 100]`, recording the types it saw.
    fn fake_agent(path: &Path) -> Arc<std::sync::Mutex<Vec<u8>>> {
        let listener = UnixListener::bind(path).unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                let record = record.clone();
                std::thread::spawn(move || {
                    while let Some(message) = read_message(&mut stream) {
                        record.lock().unwrap().push(message[4]);
                        stream.write_all(&[0, 0, 0, 1, message[4] + 100]).unwrap();
                    }
                });
            }
        });
        seen
    }

    #[test]
    fn only_listing_and_signing_reach_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        let upstream = dir.path().join("agent");
        let seen = fake_agent(&upstream);
        let uid = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        let proxy = AgentProxy::start(&upstream, uid, gid, 0o640).unwrap();
        let mode = std::fs::metadata(proxy.socket())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o640);
        let mut client = UnixStream::connect(proxy.socket()).unwrap();
        let mut ask = |kind: u8| {
            client.write_all(&[0, 0, 0, 2, kind, 0]).unwrap();
            read_message(&mut client).unwrap()
        };
        assert_eq!(ask(SSH_AGENTC_REQUEST_IDENTITIES), [0, 0, 0, 1, 111]);
        // Add identity (17), remove all (19), lock (22), extension (27): refused here.
        for kind in [17, 19, 22, 27] {
            assert_eq!(ask(kind), [0, 0, 0, 1, SSH_AGENT_FAILURE]);
        }
        assert_eq!(ask(SSH_AGENTC_SIGN_REQUEST), [0, 0, 0, 1, 113]);
        assert_eq!(*seen.lock().unwrap(), [11, 13]);
        let socket = proxy.socket().to_path_buf();
        drop(proxy);
        assert!(!socket.exists(), "the socket is removed with the proxy");
    }

    #[test]
    fn connections_beyond_the_limit_are_closed() {
        let dir = tempfile::tempdir().unwrap();
        let upstream = dir.path().join("agent");
        let _seen = fake_agent(&upstream);
        let uid = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        let proxy = AgentProxy::start(&upstream, uid, gid, 0o600).unwrap();
        let mut open: Vec<UnixStream> = (0..MAX_CONNECTIONS)
            .map(|_| UnixStream::connect(proxy.socket()).unwrap())
            .collect();
        // Each is served: it answers.
        for client in &mut open {
            client.write_all(&[0, 0, 0, 1, 11]).unwrap();
            assert_eq!(read_message(client).unwrap(), [0, 0, 0, 1, 111]);
        }
        let mut extra = UnixStream::connect(proxy.socket()).unwrap();
        let _ = extra.write_all(&[0, 0, 0, 1, 11]);
        assert!(read_message(&mut extra).is_none(), "one too many is closed");
        // Once one ends, a new one is served again.
        drop(open.pop());
        std::thread::sleep(Duration::from_millis(100));
        let mut again = UnixStream::connect(proxy.socket()).unwrap();
        again.write_all(&[0, 0, 0, 1, 11]).unwrap();
        assert_eq!(read_message(&mut again).unwrap(), [0, 0, 0, 1, 111]);
    }
}
