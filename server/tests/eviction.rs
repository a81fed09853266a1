//! LRU eviction under --max-size, with clients reading throughout.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{TestServer, agent, blob, list_files, request, request_with, sha256_hex};

fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn least_recently_used_goes_first() {
    let server = TestServer::start(|config| config.max_size = Some(1_000_000));
    let blobs: Vec<Vec<u8>> = (0..3).map(|seed| blob(100 + seed, 400_000)).collect();
    let urls: Vec<String> = blobs
        .iter()
        .map(|bytes| format!("{}/cas/{}", server.url, sha256_hex(bytes)))
        .collect();
    assert_eq!(request("PUT", &urls[0], None, Some(&blobs[0])).status, 200);
    assert_eq!(request("PUT", &urls[1], None, Some(&blobs[1])).status, 200);
    // Reading the oldest makes the second the least recently used.
    assert_eq!(request("GET", &urls[0], None, None).status, 200);
    assert_eq!(request("PUT", &urls[2], None, Some(&blobs[2])).status, 200);

    wait_until("one eviction", || {
        server.metric("graphbuild_cache_evictions_total") == 1
    });
    assert_eq!(request("HEAD", &urls[1], None, None).status, 404);
    assert_eq!(request("GET", &urls[0], None, None).body, blobs[0]);
    assert_eq!(request("GET", &urls[2], None, None).body, blobs[2]);
    assert_eq!(server.metric("graphbuild_cache_disk_used_bytes"), 800_000);
}

#[test]
fn eviction_under_load_never_serves_partial_data() {
    const MAX_SIZE: u64 = 2_000_000;
    let server = Arc::new(TestServer::start(|config| config.max_size = Some(MAX_SIZE)));
    let blobs: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..60)
            .map(|seed| blob(200 + seed, 50_000 + 3_000 * seed as usize))
            .collect(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let verified_reads = Arc::new(AtomicU64::new(0));

    let writers: Vec<_> = (0..2)
        .map(|writer| {
            let (server, blobs, stop) = (server.clone(), blobs.clone(), stop.clone());
            std::thread::spawn(move || {
                let agent = agent();
                let mut round = 0;
                while !stop.load(Ordering::Relaxed) {
                    for (index, bytes) in blobs.iter().enumerate().skip(writer).step_by(2) {
                        let url = format!("{}/cas/{}", server.url, sha256_hex(bytes));
                        assert_eq!(
                            request_with(&agent, "PUT", &url, None, Some(bytes)).status,
                            200,
                            "blob {index}"
                        );
                    }
                    round += 1;
                }
                round
            })
        })
        .collect();
    let readers: Vec<_> = (0..4)
        .map(|reader| {
            let (server, blobs, stop, verified_reads) = (
                server.clone(),
                blobs.clone(),
                stop.clone(),
                verified_reads.clone(),
            );
            std::thread::spawn(move || {
                let agent = agent();
                let mut index = reader;
                while !stop.load(Ordering::Relaxed) {
                    let bytes = &blobs[index % blobs.len()];
                    let url = format!("{}/cas/{}", server.url, sha256_hex(bytes));
                    let reply = request_with(&agent, "GET", &url, None, None);
                    match reply.status {
                        200 => {
                            assert_eq!(
                                sha256_hex(&reply.body),
                                sha256_hex(bytes),
                                "a read saw partial or wrong data"
                            );
                            verified_reads.fetch_add(1, Ordering::Relaxed);
                        }
                        404 => {}
                        other => panic!("unexpected status {other}"),
                    }
                    index += 7;
                }
            })
        })
        .collect();

    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        assert!(writer.join().unwrap() >= 1);
    }
    for reader in readers {
        reader.join().unwrap();
    }
    assert!(
        verified_reads.load(Ordering::Relaxed) > 0,
        "no read ever hit"
    );

    // The total written (≈ 7.3 MB per round) is far over the limit: evictions happened and the
    // store settles under the limit, with the index matching the files on disk.
    assert!(server.metric("graphbuild_cache_evictions_total") > 0);
    wait_until("the store is under --max-size", || {
        server.metric("graphbuild_cache_disk_used_bytes") <= MAX_SIZE
    });
    let files = list_files(&server.dir.join("cas"));
    let on_disk: u64 = files
        .iter()
        .map(|path| std::fs::metadata(path).unwrap().len())
        .sum();
    assert_eq!(on_disk, server.metric("graphbuild_cache_disk_used_bytes"));
    assert_eq!(
        files.len() as u64,
        server.metric(r#"graphbuild_cache_entries{kind="cas"}"#)
    );
    for path in files {
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        assert_eq!(sha256_hex(&std::fs::read(&path).unwrap()), name);
    }
}
