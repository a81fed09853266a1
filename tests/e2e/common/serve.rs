//! Loopback servers for tests that download: an HTTP/1.1 server (bodies registered per path,
//! redirects, a request log) and a `git daemon` serving a two-commit repository.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

use super::{prerequisite, stderr};

/// A tiny HTTP/1.1 server on loopback, started once for the whole test binary: it serves the
/// bodies tests register, `/redirect/PATH` as a 302 to `/PATH`, and logs every request with its
/// `Authorization` header.
pub(crate) struct Http {
    pub(crate) port: u16,
    bodies: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    log: Arc<RequestLog>,
}

/// Every request: its path (with the query) and its `Authorization` header.
pub(crate) type RequestLog = Mutex<Vec<(String, Option<String>)>>;

impl Http {
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub(crate) fn serve(&self, path: &str, body: &[u8]) {
        self.bodies
            .lock()
            .expect("bodies")
            .insert(path.to_string(), body.to_vec());
    }

    /// How many requests `path` has had.
    pub(crate) fn requests(&self, path: &str) -> usize {
        self.log
            .lock()
            .expect("log")
            .iter()
            .filter(|(seen, _)| seen == path)
            .count()
    }

    pub(crate) fn authorizations(&self, path: &str) -> Vec<Option<String>> {
        self.log
            .lock()
            .expect("log")
            .iter()
            .filter(|(seen, _)| seen == path)
            .map(|(_, auth)| auth.clone())
            .collect()
    }
}

pub(crate) fn http() -> &'static Http {
    static SERVER: OnceLock<Http> = OnceLock::new();
    SERVER.get_or_init(|| {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let bodies: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
        let log: Arc<RequestLog> = Arc::default();
        let (served, logged) = (bodies.clone(), log.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (served, logged) = (served.clone(), logged.clone());
                std::thread::spawn(move || answer(stream, &served, &logged));
            }
        });
        Http { port, bodies, log }
    })
}

fn answer(stream: TcpStream, bodies: &Mutex<HashMap<String, Vec<u8>>>, log: &RequestLog) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_string();
    let mut authorization = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("authorization")
        {
            authorization = Some(value.trim().to_string());
        }
    }
    log.lock().expect("log").push((path.clone(), authorization));
    let mut stream = stream;
    let response = if let Some(target) = path.strip_prefix("/redirect") {
        format!("HTTP/1.1 302 Found\r\nLocation: {target}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .into_bytes()
    } else {
        let without_query = path.split('?').next().unwrap_or(&path);
        match bodies.lock().expect("bodies").get(without_query) {
            Some(body) => {
                let mut response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                response.extend_from_slice(body);
                response
            }
            None => {
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
            }
        }
    };
    let _ = stream.write_all(&response);
}

/// A repository with two commits (the first tagged `v1`, annotated), served by `git daemon`
/// on loopback; stopped on drop.
pub(crate) struct GitServer {
    child: std::process::Child,
    pub(crate) port: u16,
    pub(crate) first: String,
    pub(crate) second: String,
}

impl Drop for GitServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn git(dir: &Path, args: &[&str]) -> String {
    let output = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .output()
        .expect("git runs");
    assert!(output.status.success(), "git {args:?}: {}", stderr(&output));
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

pub(crate) fn git_server(root: &Path) -> Option<GitServer> {
    if !prerequisite(
        Command::new("git")
            .arg("--version")
            .output()
            .is_ok_and(|output| output.status.success()),
        "git",
    ) {
        return None;
    }
    let work = root.join("work");
    std::fs::create_dir_all(work.join("sub")).expect("mkdir");
    git(&work, &["init", "-q", "-b", "main"]);
    std::fs::write(work.join("README"), "version 1\n").expect("write");
    std::fs::write(work.join("sub/tool.sh"), "#!/bin/sh\necho 1\n").expect("write");
    std::fs::set_permissions(
        work.join("sub/tool.sh"),
        std::fs::Permissions::from_mode(0o775),
    )
    .expect("chmod");
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-q", "-m", "one"]);
    git(&work, &["tag", "-a", "v1", "-m", "v1"]);
    let first = git(&work, &["rev-parse", "HEAD"]);
    std::fs::write(work.join("README"), "version 2\n").expect("write");
    git(&work, &["commit", "-q", "-am", "two"]);
    let second = git(&work, &["rev-parse", "HEAD"]);
    let served = root.join("served");
    std::fs::create_dir_all(&served).expect("mkdir");
    let bare = served.join("repo.git");
    git(
        root,
        &[
            "clone",
            "-q",
            "--bare",
            &work.to_string_lossy(),
            &bare.to_string_lossy(),
        ],
    );
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port")
        .port();
    // git-daemon itself, not `git daemon` (which would leave it running when killed).
    let exec_path = git(root, &["--exec-path"]);
    let child = Command::new(Path::new(&exec_path).join("git-daemon"))
        .args([
            "--reuseaddr",
            "--export-all",
            "--listen=127.0.0.1",
            &format!("--port={port}"),
            &format!("--base-path={}", served.display()),
        ])
        .arg(&served)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("git daemon");
    let server = GitServer {
        child,
        port,
        first,
        second,
    };
    for _ in 0..100 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(server);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("git daemon did not start");
}
