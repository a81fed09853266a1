//! Uploads that must leave nothing behind, and uploads that race.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{TestServer, blob, list_files, request, sha256_hex};

fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn corrupt_upload_is_rejected_and_leaves_nothing() {
    let server = TestServer::start(|_| {});
    let claimed = blob(10, 200_000);
    let mut sent = claimed.clone();
    sent[123_456] ^= 1;
    let url = format!("{}/cas/{}", server.url, sha256_hex(&claimed));
    let reply = request("PUT", &url, None, Some(&sent));
    assert_eq!(reply.status, 400);
    let message = String::from_utf8_lossy(&reply.body);
    assert!(message.contains(&sha256_hex(&sent)), "{message}");
    assert_eq!(request("HEAD", &url, None, None).status, 404);
    assert!(list_files(&server.dir.join("cas")).is_empty());
    assert!(server.temp_files().is_empty());
    assert_eq!(server.metric("graphbuild_cache_disk_used_bytes"), 0);
}

#[test]
fn upload_cut_off_mid_body_leaves_no_entry_and_no_temp_file() {
    let server = TestServer::start(|_| {});
    let bytes = blob(11, 1024 * 1024);
    let hash = sha256_hex(&bytes);
    let mut stream = TcpStream::connect(server.address()).unwrap();
    write!(
        stream,
        "PUT /cas/{hash} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n",
        bytes.len()
    )
    .unwrap();
    stream.write_all(&bytes[..100 * 1024]).unwrap();
    stream.flush().unwrap();
    // The upload really is in flight: its temp file exists.
    wait_until("the upload's temp file appears", || {
        !server.temp_files().is_empty()
    });
    drop(stream);

    wait_until("the temp file is removed", || {
        server.temp_files().is_empty()
    });
    assert_eq!(
        request("HEAD", &format!("{}/cas/{hash}", server.url), None, None).status,
        404
    );
    assert!(list_files(&server.dir.join("cas")).is_empty());
    wait_until("the abandoned upload is counted", || {
        server.metric(r#"graphbuild_cache_uploads_rejected_total{reason="incomplete"}"#) == 1
    });

    // The server still works afterwards.
    assert_eq!(
        request(
            "PUT",
            &format!("{}/cas/{hash}", server.url),
            None,
            Some(&bytes)
        )
        .status,
        200
    );
}

#[test]
fn concurrent_identical_uploads_all_succeed() {
    let server = Arc::new(TestServer::start(|_| {}));
    let bytes = Arc::new(blob(12, 3 * 1024 * 1024 + 17));
    let url = format!("{}/cas/{}", server.url, sha256_hex(&bytes));
    let barrier = Arc::new(Barrier::new(8));
    let uploads: Vec<_> = (0..8)
        .map(|_| {
            let (bytes, url, barrier) = (bytes.clone(), url.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                request("PUT", &url, None, Some(&bytes)).status
            })
        })
        .collect();
    for upload in uploads {
        assert_eq!(upload.join().unwrap(), 200);
    }
    assert_eq!(request("GET", &url, None, None).body, *bytes);
    assert_eq!(server.metric(r#"graphbuild_cache_entries{kind="cas"}"#), 1);
    assert_eq!(
        server.metric("graphbuild_cache_disk_used_bytes"),
        bytes.len() as u64
    );
    assert_eq!(list_files(&server.dir.join("cas")).len(), 1);
    assert!(server.temp_files().is_empty());
}

#[test]
fn chunked_upload_of_a_large_blob_streams_through() {
    let server = TestServer::start(|_| {});
    let bytes = blob(13, 9 * 1024 * 1024);
    let hash = sha256_hex(&bytes);
    // Chunked transfer encoding, so the server cannot rely on Content-Length.
    let mut stream = TcpStream::connect(server.address()).unwrap();
    write!(
        stream,
        "PUT /cas/{hash} HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    for chunk in bytes.chunks(1_000_003) {
        write!(stream, "{:x}\r\n", chunk.len()).unwrap();
        stream.write_all(chunk).unwrap();
        stream.write_all(b"\r\n").unwrap();
    }
    stream.write_all(b"0\r\n\r\n").unwrap();
    let mut response = String::new();
    std::io::Read::read_to_string(&mut stream, &mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(
        request("GET", &format!("{}/cas/{hash}", server.url), None, None).body,
        bytes
    );
}

#[test]
fn uploads_larger_than_max_size_are_refused() {
    let server = TestServer::start(|config| config.max_size = Some(100_000));
    let bytes = blob(14, 100_001);
    let url = format!("{}/cas/{}", server.url, sha256_hex(&bytes));
    assert_eq!(request("PUT", &url, None, Some(&bytes)).status, 413);
    assert_eq!(request("HEAD", &url, None, None).status, 404);
    assert!(server.temp_files().is_empty());
}
