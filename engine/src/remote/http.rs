//! The HTTP team-cache client: bazel-remote's HTTP protocol, blocking, over `ureq`.
//!
//! A protocol client kept in one file (about 500 lines of code, the rest tests): requests,
//! size caps, verification and cancellation share one set of rules for every call.
//!
//! # Protocol
//!
//! A remote cache is a base URL, `http(s)://host:port[/instance]`. Blobs live at
//! `BASE/cas/<sha256 hex>`, action entries at `BASE/ac/<64 hex key>`; `HEAD` asks whether an
//! entry exists, `GET` fetches it, `PUT` stores it. `graphbuild cache serve` speaks this, and so
//! do bazel-remote and other Bazel HTTP caches. Action entries are [`ActionResult`]s in their
//! protobuf encoding, so a standard cache accepts them unchanged.
//!
//! # Time, cancellation and size
//!
//! The rules are the module's ([`crate::remote`]); here is how this client keeps them.
//! Waiting for response headers, and any silence while a body is sent or received, gives up
//! after the client's timeout ([`STALL_TIMEOUT`](super::STALL_TIMEOUT) by default,
//! [`TIMEOUT_ENV`](super::TIMEOUT_ENV) or
//! [`HttpCache::with_timeout`] to change it); each call also has a whole-call deadline: twice
//! the timeout for small requests, plus one second per [`MIN_TRANSFER_RATE`] bytes for blob
//! transfers, so a server trickling one byte at a time cannot hold a build either. With
//! [`HttpCache::with_cancel`], the transfer runs on a helper thread that is left to time out on
//! its own while the caller returns [`RemoteError::Cancelled`]. A `Content-Length` that
//! disagrees with the expected size is refused before reading. The bearer token is sent only
//! in the `Authorization` header.

use std::fs;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use super::{
    ActionResult, CANCEL_POLL, CONNECT_TIMEOUT, DecodeError, MAX_ACTION_RESULT_SIZE,
    MIN_TRANSFER_RATE, RemoteCache, RemoteError, redact_userinfo, timeout_from_env,
};
use crate::digest::{Digest, DigestWriter};

/// A remote cache at one base URL, with an optional bearer token. Cheap to clone; share it
/// between threads for parallel transfers (connections are pooled).
#[derive(Clone)]
pub struct HttpCache {
    agent: ureq::Agent,
    base: String,
    authorization: Option<String>,
    /// Longest wait for response headers and longest silence inside a body.
    timeout: Duration,
    /// Set by a signal handler: a call waiting on the network returns [`RemoteError::Cancelled`].
    cancel: Option<Arc<AtomicBool>>,
}

impl std::fmt::Debug for HttpCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpCache")
            .field("base", &self.base)
            .field("token", &self.authorization.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

fn build_agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(CONNECT_TIMEOUT.min(timeout)))
        .timeout_recv_response(Some(timeout))
        // A silent peer: no byte for `timeout` while reading or writing a body.
        .timeout_per_read(Some(timeout))
        .timeout_per_write(Some(timeout))
        // Small requests (HEAD, action entries) as a whole; blob transfers set their own.
        .timeout_per_call(Some(timeout * 2))
        .max_redirects(0)
        .user_agent(concat!("graphbuild/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

impl HttpCache {
    /// `url` is `http(s)://host[:port][/instance]`; `token` is sent as `Authorization: Bearer`.
    /// The timeout is [`STALL_TIMEOUT`] unless [`TIMEOUT_ENV`] says otherwise.
    pub fn new(url: &str, token: Option<String>) -> Result<HttpCache, RemoteError> {
        let invalid = |reason| RemoteError::InvalidUrl {
            url: redact_userinfo(url),
            reason,
        };
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .ok_or_else(|| invalid("the scheme must be http://, https://, grpc:// or grpcs://"))?;
        let authority = rest.split('/').next().unwrap_or("");
        if authority.is_empty() {
            return Err(invalid("the host is missing"));
        }
        if authority.contains('@') {
            return Err(invalid("credentials in the URL are not supported"));
        }
        if rest.contains(['?', '#']) {
            return Err(invalid("a query or fragment is not allowed"));
        }
        if token
            .as_deref()
            .is_some_and(|token| token.is_empty() || token.bytes().any(|b| !b.is_ascii_graphic()))
        {
            return Err(invalid("the token must be non-empty visible ASCII"));
        }
        let timeout = timeout_from_env()?;
        Ok(HttpCache {
            agent: build_agent(timeout),
            base: url.trim_end_matches('/').to_string(),
            authorization: token.map(|token| format!("Bearer {token}")),
            timeout,
            cancel: None,
        })
    }

    /// The same cache with another timeout: the longest wait for an answer and the longest
    /// silence inside a body (see the module documentation).
    pub fn with_timeout(mut self, timeout: Duration) -> HttpCache {
        self.timeout = timeout.max(Duration::from_millis(1));
        self.agent = build_agent(self.timeout);
        self
    }

    /// The same cache, giving up on any call within [`CANCEL_POLL`] of `flag` being set
    /// (a [`crate::scheduler::CancelToken`]'s flag, set by the Ctrl-C/SIGTERM handler).
    pub fn with_cancel(mut self, flag: Arc<AtomicBool>) -> HttpCache {
        self.cancel = Some(flag);
        self
    }

    fn blob_url(&self, digest: &Digest) -> String {
        format!("{}/cas/{}", self.base, digest.hex())
    }

    fn action_url(&self, key_hex: &str) -> Result<String, RemoteError> {
        if key_hex.len() != 64
            || !key_hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(RemoteError::InvalidKey(key_hex.to_string()));
        }
        Ok(format!("{}/ac/{key_hex}", self.base))
    }

    /// The whole-call deadline of a transfer of `size` bytes.
    fn transfer_deadline(&self, size: u64) -> Duration {
        self.timeout * 2 + Duration::from_secs(size / MIN_TRANSFER_RATE)
    }

    fn authorize<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.authorization {
            Some(value) => request.header("Authorization", value),
            None => request,
        }
    }

    /// Run `work` so that a cancellation is honoured within [`CANCEL_POLL`]: with a cancel
    /// flag, `work` runs on a helper thread while this one polls the flag. A cancelled call
    /// returns at once; its thread ends by itself within the call's timeouts and never stores
    /// anything unverified (downloads land only after their size and digest matched).
    fn interruptible<T: Send + 'static>(
        &self,
        work: impl FnOnce(HttpCache) -> Result<T, RemoteError> + Send + 'static,
    ) -> Result<T, RemoteError> {
        let Some(cancel) = self.cancel.clone() else {
            return work(self.clone());
        };
        if cancel.load(Ordering::Relaxed) {
            return Err(RemoteError::Cancelled);
        }
        let (sender, receiver) = std::sync::mpsc::sync_channel(1);
        let this = self.clone();
        std::thread::Builder::new()
            .name("graphbuild-remote".into())
            .spawn(move || {
                let _ = sender.send(work(this));
            })
            .map_err(|error| RemoteError::Unreachable {
                method: "CALL",
                url: self.base.clone(),
                message: format!("cannot start a transfer thread: {error}"),
            })?;
        loop {
            match receiver.recv_timeout(CANCEL_POLL) {
                Ok(result) => return result,
                Err(RecvTimeoutError::Timeout) => {
                    if cancel.load(Ordering::Relaxed) {
                        return Err(RemoteError::Cancelled);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(RemoteError::Unreachable {
                        method: "CALL",
                        url: self.base.clone(),
                        message: "the transfer thread panicked".into(),
                    });
                }
            }
        }
    }

    fn unreachable(method: &'static str, url: &str, error: ureq::Error) -> RemoteError {
        RemoteError::Unreachable {
            method,
            url: url.to_string(),
            message: error.to_string(),
        }
    }

    /// Turn a non-success status into an error, reading a short excerpt of the body.
    fn status_error(
        method: &'static str,
        url: &str,
        mut response: ureq::http::Response<ureq::Body>,
    ) -> RemoteError {
        let status = response.status().as_u16();
        match status {
            401 => RemoteError::Unauthorized {
                method,
                url: url.to_string(),
                status,
            },
            403 => RemoteError::Forbidden {
                method,
                url: url.to_string(),
                status,
            },
            _ => {
                let mut excerpt = Vec::new();
                let _ = response
                    .body_mut()
                    .as_reader()
                    .take(512)
                    .read_to_end(&mut excerpt);
                RemoteError::Status {
                    method,
                    url: url.to_string(),
                    status,
                    body: String::from_utf8_lossy(&excerpt).trim().to_string(),
                }
            }
        }
    }

    fn get_action_now(
        &self,
        url: &str,
        key_hex: &str,
    ) -> Result<Option<ActionResult>, RemoteError> {
        let mut response = self
            .authorize(self.agent.get(url))
            .call()
            .map_err(|error| Self::unreachable("GET", url, error))?;
        match response.status().as_u16() {
            200 => {}
            404 => return Ok(None),
            _ => return Err(Self::status_error("GET", url, response)),
        }
        let bytes = response
            .body_mut()
            .with_config()
            .limit(MAX_ACTION_RESULT_SIZE)
            .read_to_vec()
            .map_err(|error| match error {
                ureq::Error::BodyExceedsLimit(_) => RemoteError::Decode {
                    key: key_hex.to_string(),
                    source: DecodeError::TooLarge,
                },
                error => Self::unreachable("GET", url, error),
            })?;
        ActionResult::decode(&bytes)
            .map(Some)
            .map_err(|source| RemoteError::Decode {
                key: key_hex.to_string(),
                source,
            })
    }

    /// Whether the cache holds the blob.
    pub fn has_blob(&self, digest: &Digest) -> Result<bool, RemoteError> {
        let url = self.blob_url(digest);
        self.interruptible(move |this| this.has_blob_now(&url))
    }

    fn has_blob_now(&self, url: &str) -> Result<bool, RemoteError> {
        let response = self
            .authorize(self.agent.head(url))
            .call()
            .map_err(|error| Self::unreachable("HEAD", url, error))?;
        match response.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            _ => Err(Self::status_error("HEAD", url, response)),
        }
    }

    fn get_blob_now(&self, digest: &Digest, size: u64, dest: &Path) -> Result<bool, RemoteError> {
        let url = self.blob_url(digest);
        let mut response = self
            .authorize(self.agent.get(&url))
            .config()
            .timeout_per_call(Some(self.transfer_deadline(size)))
            .build()
            .call()
            .map_err(|error| Self::unreachable("GET", &url, error))?;
        match response.status().as_u16() {
            200 => {}
            404 => return Ok(false),
            _ => return Err(Self::status_error("GET", &url, response)),
        }
        if let Some(declared) = response
            .headers()
            .get("content-length")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok())
            && declared != size
        {
            return Err(RemoteError::SizeMismatch {
                digest: *digest,
                expected: size,
                actual: format!("{declared} bytes announced"),
            });
        }
        let directory = match dest.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let io_error = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| RemoteError::Io {
                action,
                path,
                source,
            }
        };
        let mut temp = tempfile::Builder::new()
            .prefix(".download-")
            .tempfile_in(directory)
            .map_err(io_error("cannot create a download file in", directory))?;
        let mut hasher = DigestWriter::new();
        // One byte more than declared tells an overlong body from an exact one.
        let mut reader = response.body_mut().as_reader().take(size.saturating_add(1));
        let mut buffer = vec![0u8; 256 * 1024];
        let mut received: u64 = 0;
        loop {
            let count = match reader.read(&mut buffer) {
                Ok(0) => break,
                Ok(count) => count,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    return Err(RemoteError::Unreachable {
                        method: "GET",
                        url,
                        message: format!("the download broke off: {error}"),
                    });
                }
            };
            received += count as u64;
            if received > size {
                // Dropping `temp` deletes it.
                return Err(RemoteError::SizeMismatch {
                    digest: *digest,
                    expected: size,
                    actual: "more bytes".into(),
                });
            }
            hasher.update(&buffer[..count]);
            temp.write_all(&buffer[..count])
                .map_err(io_error("cannot write", temp.path()))?;
        }
        if received != size {
            return Err(RemoteError::SizeMismatch {
                digest: *digest,
                expected: size,
                actual: format!("{received} bytes"),
            });
        }
        let actual = hasher.finish();
        if actual != *digest {
            return Err(RemoteError::DigestMismatch {
                expected: *digest,
                actual,
            });
        }
        temp.as_file()
            .sync_all()
            .map_err(io_error("cannot sync", temp.path()))?;
        temp.persist(dest).map_err(|error| RemoteError::Io {
            action: "cannot move a download to",
            path: dest.to_path_buf(),
            source: error.error,
        })?;
        Ok(true)
    }

    fn put_now(
        &self,
        url: &str,
        body: impl ureq::AsSendBody,
        size: Option<u64>,
    ) -> Result<(), RemoteError> {
        let mut request = self
            .authorize(self.agent.put(url))
            .header("Content-Type", "application/octet-stream");
        if let Some(size) = size {
            request = request
                .config()
                .timeout_per_call(Some(self.transfer_deadline(size)))
                .build();
        }
        let response = request
            .send(body)
            .map_err(|error| Self::unreachable("PUT", url, error))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(Self::status_error("PUT", url, response))
        }
    }
}

impl RemoteCache for HttpCache {
    fn url(&self) -> &str {
        &self.base
    }

    fn get_action(&self, key_hex: &str) -> Result<Option<ActionResult>, RemoteError> {
        let url = self.action_url(key_hex)?;
        let key_hex = key_hex.to_string();
        self.interruptible(move |this| this.get_action_now(&url, &key_hex))
    }

    fn put_action(&self, key_hex: &str, result: &ActionResult) -> Result<(), RemoteError> {
        let url = self.action_url(key_hex)?;
        let bytes = result.encode();
        self.interruptible(move |this| this.put_now(&url, &bytes[..], None))
    }

    fn get_blob_to(&self, digest: &Digest, size: u64, dest: &Path) -> Result<bool, RemoteError> {
        let digest = *digest;
        let dest = dest.to_path_buf();
        self.interruptible(move |this| this.get_blob_now(&digest, size, &dest))
    }

    fn put_blob_from(&self, digest: &Digest, path: &Path) -> Result<(), RemoteError> {
        let url = self.blob_url(digest);
        let path = path.to_path_buf();
        self.interruptible(move |this| {
            if this.has_blob_now(&url)? {
                return Ok(());
            }
            let file = fs::File::open(&path).map_err(|source| RemoteError::Io {
                action: "cannot open",
                path: path.clone(),
                source,
            })?;
            let size = file.metadata().map(|metadata| metadata.len()).unwrap_or(0);
            // `&File` is sent with its length as Content-Length, read as it goes.
            this.put_now(&url, &file, Some(size))
        })
    }

    fn put_blob_bytes(&self, bytes: &[u8]) -> Result<Digest, RemoteError> {
        let digest = Digest::of(bytes);
        let url = self.blob_url(&digest);
        let bytes = bytes.to_vec();
        let size = bytes.len() as u64;
        self.interruptible(move |this| this.put_now(&url, &bytes[..], Some(size)))?;
        Ok(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::MAX_STEP_RECORD_SIZE;
    use std::io::BufRead;
    use std::net::TcpListener;

    #[test]
    fn urls_are_checked_and_tokens_never_shown() {
        assert!(HttpCache::new("ftp://host", None).is_err());
        assert!(HttpCache::new("http://", None).is_err());
        let error = HttpCache::new("http://user:hunter2@host:7070/team", None).unwrap_err();
        assert!(!error.to_string().contains("hunter2"), "{error}");
        let cache =
            HttpCache::new("http://127.0.0.1:9/team/", Some("s3cret-token".into())).unwrap();
        assert_eq!(cache.url(), "http://127.0.0.1:9/team");
        assert!(!format!("{cache:?}").contains("s3cret-token"));
        assert!(matches!(
            cache.get_action("nothex"),
            Err(RemoteError::InvalidKey(_))
        ));
    }

    /// A one-shot HTTP server on 127.0.0.1 answering every request with `status` and `body`,
    /// recording request heads.
    fn fake_server(
        status: &'static str,
        body: Vec<u8>,
    ) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let mut heads = Vec::new();
            let Ok((stream, _)) = listener.accept() else {
                return heads;
            };
            let mut reader = io::BufReader::new(stream.try_clone().unwrap());
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            heads.push(head);
            let mut stream = stream;
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(&body);
            heads
        });
        (url, handle)
    }

    #[test]
    fn corrupt_download_is_discarded() {
        let (url, server) = fake_server("200 OK", b"not what you asked for".to_vec());
        let cache = HttpCache::new(&url, Some("s3cret-token".into())).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("blob");
        let error = cache
            .get_blob_to(&Digest::of(b"expected"), 22, &dest)
            .unwrap_err();
        assert!(
            matches!(error, RemoteError::DigestMismatch { .. }),
            "{error}"
        );
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            0,
            "nothing may be left behind"
        );
        let heads = server.join().unwrap();
        assert!(heads[0].starts_with(&format!(
            "GET /cas/{} HTTP/1.1",
            Digest::of(b"expected").hex()
        )));
        assert!(
            heads[0].contains("authorization: Bearer s3cret-token")
                || heads[0].contains("Authorization: Bearer s3cret-token")
        );
    }

    #[test]
    fn good_download_lands_and_missing_blob_is_false() {
        let (url, server) = fake_server("200 OK", b"payload".to_vec());
        let cache = HttpCache::new(&url, None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("blob");
        assert!(
            cache
                .get_blob_to(&Digest::of(b"payload"), 7, &dest)
                .unwrap()
        );
        assert_eq!(fs::read(&dest).unwrap(), b"payload");
        server.join().unwrap();

        let (url, server) = fake_server("404 Not Found", Vec::new());
        let cache = HttpCache::new(&url, None).unwrap();
        assert!(
            !cache
                .get_blob_to(&Digest::of(b"other"), 5, &dir.path().join("other"))
                .unwrap()
        );
        assert!(!dir.path().join("other").exists());
        server.join().unwrap();
    }

    #[test]
    fn refusals_and_dead_servers_are_errors_without_the_token() {
        let (url, server) = fake_server("401 Unauthorized", b"a valid token is required".to_vec());
        let cache = HttpCache::new(&url, Some("s3cret-token".into())).unwrap();
        let error = cache.put_blob_bytes(b"data").unwrap_err();
        assert!(
            matches!(error, RemoteError::Unauthorized { status: 401, .. }),
            "{error}"
        );
        assert!(!format!("{error} {error:?}").contains("s3cret-token"));
        server.join().unwrap();

        // Bind then drop, so nothing listens on the port.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cache = HttpCache::new(
            &format!("http://127.0.0.1:{port}"),
            Some("s3cret-token".into()),
        )
        .unwrap();
        let error = cache.has_blob(&Digest::of(b"x")).unwrap_err();
        assert!(matches!(error, RemoteError::Unreachable { .. }), "{error}");
        assert!(!format!("{error} {error:?}").contains("s3cret-token"));
    }

    /// A one-connection server on 127.0.0.1: reads the request head, then hands the stream to
    /// `respond`.
    fn raw_server(
        respond: impl FnOnce(std::net::TcpStream) + Send + 'static,
    ) -> (String, std::thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let Ok((stream, _)) = listener.accept() else {
                return;
            };
            let mut reader = io::BufReader::new(stream.try_clone().unwrap());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
            }
            respond(stream);
        });
        (url, handle)
    }

    fn empty(dir: &Path) -> bool {
        fs::read_dir(dir).unwrap().next().is_none()
    }

    #[test]
    fn a_stalled_body_times_out_and_leaves_nothing() {
        let (url, server) = raw_server(|mut stream| {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789");
            let _ = stream.flush();
            std::thread::sleep(Duration::from_secs(4));
        });
        let cache = HttpCache::new(&url, None)
            .unwrap()
            .with_timeout(Duration::from_millis(500));
        let dir = tempfile::tempdir().unwrap();
        let started = std::time::Instant::now();
        let error = cache
            .get_blob_to(&Digest::of(&[0; 100]), 100, &dir.path().join("blob"))
            .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert!(matches!(error, RemoteError::Unreachable { .. }), "{error}");
        assert!(!error.is_bad_entry());
        assert!(empty(dir.path()), "nothing may be left behind");
        server.join().unwrap();
    }

    #[test]
    fn an_endless_body_stops_at_the_declared_size() {
        let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = written.clone();
        // No Content-Length: the body runs until the connection closes, which it never does.
        let (url, server) = raw_server(move |mut stream| {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
            let chunk = [b'x'; 64 * 1024];
            while stream.write_all(&chunk).is_ok() {
                if counter.fetch_add(chunk.len() as u64, Ordering::Relaxed) > 1 << 30 {
                    break;
                }
            }
        });
        let cache = HttpCache::new(&url, None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let error = cache
            .get_blob_to(&Digest::of(b"small"), 1000, &dir.path().join("blob"))
            .unwrap_err();
        assert!(matches!(error, RemoteError::SizeMismatch { .. }), "{error}");
        assert!(error.is_bad_entry());
        assert!(empty(dir.path()), "nothing may be left behind");
        server.join().unwrap();
        // The client stopped reading and closed: the server could only fill socket buffers.
        assert!(written.load(Ordering::Relaxed) < 64 << 20);

        // A Content-Length that disagrees with the record is refused before reading.
        let (url, server) = raw_server(|mut stream| {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n");
        });
        let cache = HttpCache::new(&url, None).unwrap();
        let error = cache
            .get_blob_to(&Digest::of(b"small"), 5, &dir.path().join("blob"))
            .unwrap_err();
        assert!(matches!(error, RemoteError::SizeMismatch { .. }), "{error}");
        assert!(empty(dir.path()));
        server.join().unwrap();
    }

    #[test]
    fn a_cancelled_call_returns_at_once() {
        let (url, server) = raw_server(|mut stream| {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n");
            std::thread::sleep(Duration::from_secs(3));
        });
        let flag = Arc::new(AtomicBool::new(false));
        let cache = HttpCache::new(&url, None)
            .unwrap()
            .with_timeout(Duration::from_secs(30))
            .with_cancel(flag.clone());
        let dir = tempfile::tempdir().unwrap();
        let setter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            flag.store(true, Ordering::Relaxed);
        });
        let started = std::time::Instant::now();
        let error = cache
            .get_blob_to(&Digest::of(&[0; 100]), 100, &dir.path().join("blob"))
            .unwrap_err();
        assert!(error.is_cancelled(), "{error}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        setter.join().unwrap();
        server.join().unwrap();
        assert!(!dir.path().join("blob").exists());
    }

    #[test]
    fn garbage_action_values_are_bad_entries() {
        let key = "ab".repeat(32);
        let (url, server) = fake_server("200 OK", b"\xff\xff\xff garbage".to_vec());
        let cache = HttpCache::new(&url, None).unwrap();
        let error = cache.get_action(&key).unwrap_err();
        assert!(matches!(error, RemoteError::Decode { .. }), "{error}");
        assert!(error.is_bad_entry());
        server.join().unwrap();

        // An entry that decodes but names no step record.
        let other = ActionResult {
            output_files: vec![],
            exit_code: 0,
        };
        let (url, server) = fake_server("200 OK", other.encode());
        let cache = HttpCache::new(&url, None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let error = cache.get_step_record(&key, dir.path()).unwrap_err();
        assert!(matches!(error, RemoteError::InvalidEntry { .. }), "{error}");
        server.join().unwrap();

        // A record of an absurd size is refused without downloading it.
        let huge = ActionResult::for_step_record(Digest::of(b"x"), MAX_STEP_RECORD_SIZE + 1);
        let (url, server) = fake_server("200 OK", huge.encode());
        let cache = HttpCache::new(&url, None).unwrap();
        let error = cache.get_step_record(&key, dir.path()).unwrap_err();
        assert!(error.is_bad_entry(), "{error}");
        server.join().unwrap();
        assert!(empty(dir.path()));
    }
}
