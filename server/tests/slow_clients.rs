//! Slow and silent clients (slowloris) are disconnected: a connection that never finishes its
//! headers, one that sends nothing, an upload that stalls, an upload at one byte per second.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{TestServer, list_files};
use graphbuild_cache_server::Timeouts;

fn short_timeouts() -> Timeouts {
    Timeouts {
        header_read: Duration::from_secs(1),
        body_idle: Duration::from_secs(2),
        min_body_rate: 1000,
        body_grace: Duration::from_secs(1),
    }
}

fn server() -> TestServer {
    TestServer::start(|config| config.timeouts = short_timeouts())
}

/// Read until the server closes the connection; returns what it sent and when it closed.
fn read_until_closed(stream: &mut TcpStream, started: Instant) -> (String, Duration) {
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(count) => received.extend_from_slice(&buffer[..count]),
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(error) => panic!("the server kept the connection open: {error}"),
        }
    }
    (
        String::from_utf8_lossy(&received).to_string(),
        started.elapsed(),
    )
}

#[test]
fn half_a_header_and_a_silent_connection_are_closed() {
    let server = server();
    let started = Instant::now();
    let mut half = TcpStream::connect(server.address()).unwrap();
    half.write_all(b"GET /cas/").unwrap();
    let mut silent = TcpStream::connect(server.address()).unwrap();
    let (_, half_closed) = read_until_closed(&mut half, started);
    let (_, silent_closed) = read_until_closed(&mut silent, started);
    assert!(half_closed < Duration::from_secs(4), "{half_closed:?}");
    assert!(silent_closed < Duration::from_secs(4), "{silent_closed:?}");

    // A normal client is still served.
    let reply = common::request("GET", &format!("{}/healthz", server.url), None, None);
    assert_eq!(reply.status, 200);
}

#[test]
fn an_upload_at_one_byte_per_second_is_cut_off() {
    let server = server();
    let hash = "ab".repeat(32);
    let mut stream = TcpStream::connect(server.address()).unwrap();
    write!(
        stream,
        "PUT /cas/{hash} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    )
    .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        for _ in 0..30 {
            if writer.write_all(b"x").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    let started = Instant::now();
    let (reply, closed) = read_until_closed(&mut stream, started);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("too slow"), "{reply}");
    assert!(closed < Duration::from_secs(5), "{closed:?}");
    drop(stream);
    trickle.join().unwrap();
    assert!(list_files(&server.dir.join("cas")).is_empty());
    assert!(list_files(&server.dir.join("tmp")).is_empty());
}

#[test]
fn a_stalled_upload_is_cut_off() {
    let server = server();
    let hash = "cd".repeat(32);
    let mut stream = TcpStream::connect(server.address()).unwrap();
    write!(
        stream,
        "PUT /cas/{hash} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nsome"
    )
    .unwrap();
    let started = Instant::now();
    let (reply, closed) = read_until_closed(&mut stream, started);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(closed < Duration::from_secs(5), "{closed:?}");
    assert!(list_files(&server.dir.join("tmp")).is_empty());
}

#[test]
fn a_client_that_stops_reading_a_download_is_disconnected() {
    let server = server();
    let bytes = common::blob(7, 48 * 1024 * 1024);
    let hash = common::sha256_hex(&bytes);
    let reply = common::request(
        "PUT",
        &format!("{}/cas/{hash}", server.url),
        None,
        Some(&bytes),
    );
    assert_eq!(reply.status, 200);

    let mut stream = TcpStream::connect(server.address()).unwrap();
    write!(stream, "GET /cas/{hash} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    // Read nothing for longer than the 2 s limit: the socket buffers fill, the server's
    // writes stall, and it gives up on the connection.
    std::thread::sleep(Duration::from_secs(5));
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut total = 0usize;
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(count) => total += count,
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(error) => panic!("the server kept the connection open: {error}"),
        }
    }
    assert!(
        total < bytes.len(),
        "the whole download arrived ({total} bytes): the server waited"
    );
}
