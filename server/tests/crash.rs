//! A server process killed with SIGKILL during uploads restarts with a consistent store.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{agent, blob, list_files, request, request_with, sha256_hex};

/// Start the server binary on port 0 and read its address from the first stdout line.
fn spawn_server(dir: &Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_graphbuild-cache-server"))
        .args(["--listen", "127.0.0.1:0", "--dir"])
        .arg(dir)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn graphbuild-cache-server");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the listening line");
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    (child, url.to_string())
}

#[test]
fn sigkill_during_uploads_then_restart_is_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url) = spawn_server(dir.path());

    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let uploaders: Vec<_> = (0..4u64)
        .map(|thread| {
            let (url, stop, acknowledged) = (url.clone(), stop.clone(), acknowledged.clone());
            std::thread::spawn(move || {
                let agent = agent();
                let mut seed = thread * 1_000_000;
                while !stop.load(Ordering::Relaxed) {
                    seed += 1;
                    let bytes = blob(seed, 100_000 + (seed as usize % 7) * 300_000);
                    let hash = sha256_hex(&bytes);
                    let put = agent.put(format!("{url}/cas/{hash}")).send(&bytes[..]);
                    match put {
                        Ok(response) if response.status() == 200 => {
                            acknowledged.lock().unwrap().push(hash)
                        }
                        // The server died mid-request.
                        _ => return,
                    }
                }
            })
        })
        .collect();
    // One upload that is certainly in flight when the kill comes.
    let mut partial = TcpStream::connect(url.trim_start_matches("http://")).unwrap();
    write!(
        partial,
        "PUT /cas/{} HTTP/1.1\r\nHost: test\r\nContent-Length: 5000000\r\n\r\n",
        "ab".repeat(32)
    )
    .unwrap();
    partial.write_all(&[7u8; 200_000]).unwrap();

    std::thread::sleep(Duration::from_millis(1500));
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    for uploader in uploaders {
        uploader.join().unwrap();
    }
    drop(partial);
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() >= 4,
        "too few uploads before the kill: {}",
        acknowledged.len()
    );
    assert!(
        !list_files(&dir.path().join("tmp")).is_empty(),
        "the kill should have interrupted an upload"
    );

    let (mut child, url) = spawn_server(dir.path());
    assert!(
        list_files(&dir.path().join("tmp")).is_empty(),
        "leftover uploads are deleted at startup"
    );
    let files = list_files(&dir.path().join("cas"));
    for path in &files {
        let name = path.file_name().unwrap().to_str().unwrap();
        assert_eq!(
            sha256_hex(&std::fs::read(path).unwrap()),
            name,
            "a stored blob does not match its name"
        );
    }
    let agent = agent();
    for hash in &acknowledged {
        assert_eq!(
            request_with(&agent, "HEAD", &format!("{url}/cas/{hash}"), None, None).status,
            200,
            "acknowledged blob {hash} lost"
        );
    }
    let metrics =
        String::from_utf8(request("GET", &format!("{url}/metrics"), None, None).body).unwrap();
    let on_disk: u64 = files
        .iter()
        .map(|path| std::fs::metadata(path).unwrap().len())
        .sum();
    assert!(
        metrics.contains(&format!(
            "graphbuild_cache_entries{{kind=\"cas\"}} {}\n",
            files.len()
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("graphbuild_cache_disk_used_bytes {on_disk}\n")),
        "{metrics}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
