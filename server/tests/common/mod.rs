//! Shared helpers: an in-process server on 127.0.0.1:0 and a small blocking HTTP client.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use graphbuild_cache_server::{ServerConfig, bind};
use sha2::{Digest as _, Sha256};

/// A server running on its own thread and runtime; stops when dropped.
pub(crate) struct TestServer {
    pub url: String,
    pub dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    /// Start on a fresh temp directory; `adjust` edits the config (listen is forced to port 0).
    pub(crate) fn start(adjust: impl FnOnce(&mut ServerConfig)) -> TestServer {
        let temp = tempfile::tempdir().expect("temp dir");
        let mut server = TestServer::start_in(temp.path(), adjust);
        server._temp = Some(temp);
        server
    }

    /// Start on an existing directory.
    pub(crate) fn start_in(dir: &Path, adjust: impl FnOnce(&mut ServerConfig)) -> TestServer {
        let mut config = ServerConfig::new(dir);
        adjust(&mut config);
        config.listen = "127.0.0.1:0".parse().expect("address");
        let (address_sender, address_receiver) = mpsc::channel();
        let (shutdown, shutdown_receiver) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(4)
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let server = match bind(config).await {
                    Ok(server) => server,
                    Err(error) => {
                        let _ = address_sender.send(Err(error.to_string()));
                        return;
                    }
                };
                let _ = address_sender.send(Ok(server.local_addr()));
                server
                    .run(async {
                        let _ = shutdown_receiver.await;
                    })
                    .await
                    .expect("server run");
            });
        });
        let address = address_receiver
            .recv()
            .expect("server thread")
            .expect("server bind");
        TestServer {
            url: format!("http://{address}"),
            dir: dir.to_path_buf(),
            _temp: None,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    pub(crate) fn address(&self) -> String {
        self.url.trim_start_matches("http://").to_string()
    }

    /// A counter or gauge sample from /metrics, e.g. `graphbuild_cache_hits_total{kind="cas"}`.
    pub(crate) fn metric(&self, sample: &str) -> u64 {
        let reply = request("GET", &format!("{}/metrics", self.url), None, None);
        assert_eq!(reply.status, 200);
        let text = String::from_utf8(reply.body).expect("utf-8 metrics");
        text.lines()
            .find_map(|line| {
                line.strip_prefix(sample)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .unwrap_or_else(|| panic!("no sample {sample} in\n{text}"))
            .parse()
            .expect("numeric sample")
    }

    /// Files currently in the store's upload directory.
    pub(crate) fn temp_files(&self) -> Vec<PathBuf> {
        list_files(&self.dir.join("tmp"))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

pub(crate) fn list_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return files;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(list_files(&path));
        } else {
            files.push(path);
        }
    }
    files
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Deterministic pseudo-random bytes.
pub(crate) fn blob(seed: u64, size: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

pub(crate) struct Reply {
    pub status: u16,
    pub headers: ureq::http::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }
}

pub(crate) fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// One request; `token` becomes `Authorization: Bearer`.
pub(crate) fn request(method: &str, url: &str, token: Option<&str>, body: Option<&[u8]>) -> Reply {
    request_with(&agent(), method, url, token, body)
}

pub(crate) fn request_with(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<&[u8]>,
) -> Reply {
    let authorization = token.map(|token| format!("Bearer {token}"));
    let result = match method {
        "GET" | "HEAD" | "DELETE" => {
            let mut builder = match method {
                "GET" => agent.get(url),
                "HEAD" => agent.head(url),
                _ => agent.delete(url),
            };
            if let Some(value) = &authorization {
                builder = builder.header("Authorization", value);
            }
            builder.call()
        }
        "PUT" => {
            let mut builder = agent.put(url);
            if let Some(value) = &authorization {
                builder = builder.header("Authorization", value);
            }
            builder.send(body.unwrap_or_default())
        }
        other => panic!("unsupported method {other}"),
    };
    let mut response = result.unwrap_or_else(|error| panic!("{method} {url}: {error}"));
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = if method == "HEAD" {
        Vec::new()
    } else {
        response
            .body_mut()
            .with_config()
            .limit(u64::MAX)
            .read_to_vec()
            .unwrap_or_else(|error| panic!("{method} {url} body: {error}"))
    };
    Reply {
        status,
        headers,
        body,
    }
}
