//! `--ssh` values and the agents they name: the user's (a socket) or one started for the
//! build with key files loaded.

use std::collections::HashMap;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What an ssh id is bound to.
#[derive(Clone, PartialEq, Eq)]
pub enum SshSource {
    /// A running agent's socket: `SSH_AUTH_SOCK`'s, or a socket path given to `--ssh`.
    Socket(PathBuf),
    /// Private key files, loaded into an agent started for the build.
    Keys(Vec<PathBuf>),
}

impl std::fmt::Debug for SshSource {
    // Paths stay out of debug output too.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SshSource::Socket(_) => f.write_str("SshSource::Socket(…)"),
            SshSource::Keys(keys) => write!(f, "SshSource::Keys({} files)", keys.len()),
        }
    }
}

/// One `--ssh` value as buildx reads it: `ID` (the agent of `auth_sock`, `SSH_AUTH_SOCK`),
/// `ID=SOCKET`, or `ID=KEY[,KEY…]`. Messages never show a path.
pub fn parse_spec(spec: &str, auth_sock: Option<&Path>) -> Result<(String, SshSource), String> {
    let (id, paths) = match spec.split_once('=') {
        Some((id, paths)) => (id, Some(paths)),
        None => (spec, None),
    };
    if id.is_empty() || id.contains(',') {
        return Err(
            "--ssh: write --ssh default, --ssh ID=KEY_FILE[,KEY_FILE] or --ssh ID=AGENT_SOCKET"
                .into(),
        );
    }
    let paths: Vec<PathBuf> = match paths {
        None => {
            let Some(socket) = auth_sock.filter(|path| !path.as_os_str().is_empty()) else {
                return Err(format!(
                    "--ssh {id}: SSH_AUTH_SOCK is not set; start an agent (`eval $(ssh-agent)`, \
                     `ssh-add`) or pass --ssh {id}=KEY_FILE"
                ));
            };
            vec![socket.to_path_buf()]
        }
        Some(paths) => paths
            .split(',')
            .filter(|path| !path.is_empty())
            .map(PathBuf::from)
            .collect(),
    };
    if paths.is_empty() {
        return Err(format!("--ssh {id}=: name a key file or an agent socket"));
    }
    let what = |n: usize| {
        if paths.len() == 1 {
            "its path".to_string()
        } else {
            format!("path {} of {}", n + 1, paths.len())
        }
    };
    let mut sockets = 0;
    for (n, path) in paths.iter().enumerate() {
        let metadata = std::fs::metadata(path)
            .map_err(|error| format!("--ssh {id}: cannot use {}: {}", what(n), error.kind()))?;
        if metadata.file_type().is_socket() {
            sockets += 1;
        } else if !metadata.is_file() {
            return Err(format!(
                "--ssh {id}: {} is neither a key file nor an agent socket",
                what(n)
            ));
        }
    }
    match sockets {
        0 => Ok((id.to_string(), SshSource::Keys(paths))),
        1 if paths.len() == 1 => Ok((id.to_string(), SshSource::Socket(paths[0].clone()))),
        _ => Err(format!(
            "--ssh {id}: give either one agent socket or key files, not both"
        )),
    }
}

/// The agents of a build's `--ssh` ids. Agents started for key files end, and their
/// directories (socket included) are removed, when this is dropped.
#[derive(Default)]
pub struct Agents {
    sockets: HashMap<String, PathBuf>,
    started: Vec<StartedAgent>,
}

impl std::fmt::Debug for Agents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ids: Vec<&String> = self.sockets.keys().collect();
        ids.sort();
        f.debug_struct("Agents").field("ids", &ids).finish()
    }
}

struct StartedAgent {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for StartedAgent {
    fn drop(&mut self) {
        // The agent graphbuild started, by its own pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agents {
    /// The agents for these ids: sockets as they are, an `ssh-agent` per id given key files
    /// (OpenSSH's `ssh-agent` and `ssh-add`, package openssh-client). A key that cannot be
    /// loaded (unreadable, not a private key, protected by a passphrase) fails here, before
    /// the build starts.
    pub fn start(sources: Vec<(String, SshSource)>) -> Result<Agents, String> {
        let mut agents = Agents::default();
        for (id, source) in sources {
            let socket = match source {
                SshSource::Socket(path) => path,
                SshSource::Keys(keys) => {
                    let started = start_agent(&id, &keys)?;
                    let socket = started._dir.path().join("agent.sock");
                    agents.started.push(started);
                    socket
                }
            };
            agents.sockets.insert(id, socket);
        }
        Ok(agents)
    }

    /// The agent socket of an id.
    pub fn socket(&self, id: &str) -> Option<&Path> {
        self.sockets.get(id).map(PathBuf::as_path)
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// Each id's agent socket, for [`crate::build::BuildOptions::ssh`].
    pub fn sockets(&self) -> HashMap<String, PathBuf> {
        self.sockets.clone()
    }

    /// The ids supplied, sorted.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.sockets.keys().cloned().collect();
        ids.sort();
        ids
    }
}

/// Runs `ssh-agent` in the foreground on a socket in a new private directory and loads `keys`
/// into it with `ssh-add`, both detached from the terminal (no passphrase prompt).
fn start_agent(id: &str, keys: &[PathBuf]) -> Result<StartedAgent, String> {
    let dir = tempfile::Builder::new()
        .prefix("graphbuild-ssh-")
        .tempdir()
        .map_err(|error| format!("--ssh {id}: cannot create a directory for its agent: {error}"))?;
    let socket = dir.path().join("agent.sock");
    let mut command = Command::new("ssh-agent");
    command
        .arg("-D")
        .arg("-a")
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(|| {
            // Its own session (the terminal's Ctrl-C is graphbuild's to handle), and gone
            // with graphbuild even if graphbuild is killed.
            libc::setsid();
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(|error| {
        format!(
            "--ssh {id}: cannot start ssh-agent for its key files: {error}; install OpenSSH's \
             client (package openssh-client), or load the keys into your agent and pass --ssh {id}"
        )
    })?;
    let agent = StartedAgent { child, _dir: dir };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline {
            return Err(format!("--ssh {id}: ssh-agent did not start"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for (n, key) in keys.iter().enumerate() {
        let mut command = Command::new("ssh-add");
        command
            .arg("-q")
            .arg("--")
            .arg(key)
            .env("SSH_AUTH_SOCK", &socket)
            .env("SSH_ASKPASS_REQUIRE", "never")
            .env_remove("DISPLAY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // Its messages name the file: not shown.
            .stderr(Stdio::null());
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(|| {
                // No controlling terminal: a passphrase cannot be asked for.
                libc::setsid();
                Ok(())
            });
        }
        let status = command
            .status()
            .map_err(|error| format!("--ssh {id}: cannot run ssh-add: {error}"))?;
        if !status.success() {
            let which = if keys.len() == 1 {
                "its key file".to_string()
            } else {
                format!("key file {} of {}", n + 1, keys.len())
            };
            return Err(format!(
                "--ssh {id}: {which} cannot be loaded (not a private key, or protected by a \
                 passphrase); for a key with a passphrase, add it to your agent with ssh-add \
                 and pass --ssh {id}"
            ));
        }
    }
    Ok(agent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_as_buildx_reads_them_without_showing_paths() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("secret-key-name");
        std::fs::write(&key, "x").unwrap();
        let socket = dir.path().join("agent.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();

        let (id, source) = parse_spec("default", Some(&socket)).unwrap();
        assert_eq!(
            (id.as_str(), source),
            ("default", SshSource::Socket(socket.clone()))
        );
        let spec = format!("gh={}", key.display());
        assert_eq!(
            parse_spec(&spec, None).unwrap().1,
            SshSource::Keys(vec![key.clone()])
        );
        let spec = format!("gh={}", socket.display());
        assert_eq!(
            parse_spec(&spec, None).unwrap().1,
            SshSource::Socket(socket.clone())
        );

        let error = parse_spec("default", None).unwrap_err();
        assert!(error.contains("SSH_AUTH_SOCK is not set"), "{error}");
        let spec = format!(
            "gh={},{}",
            key.display(),
            dir.path().join("missing-name").display()
        );
        let error = parse_spec(&spec, None).unwrap_err();
        assert!(error.contains("path 2 of 2"), "{error}");
        assert!(
            !error.contains("missing-name") && !error.contains("secret-key-name"),
            "{error}"
        );
        let spec = format!("gh={},{}", key.display(), socket.display());
        assert!(parse_spec(&spec, None).unwrap_err().contains("not both"));
    }
}
