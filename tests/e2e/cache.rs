//! The team cache end to end: `graphbuild cache serve` on 127.0.0.1, builds split by platform
//! across three clean stores ("machines"), merged on a fourth from cache hits alone.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;

fn run_in(sandbox: &Sandbox, store: &str, output: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "run",
        "examples/basic/images.kdl",
        "--output",
        output,
        "--progress",
        "json",
    ];
    args.extend_from_slice(extra);
    sandbox.graphbuild_with_store(&sandbox.path().join(store), &args)
}

#[test]
fn platforms_built_on_three_machines_merge_on_a_fourth_with_no_step_executed() {
    let sandbox = Sandbox::new();
    sandbox.example("basic");
    let server = CacheServer::start(&sandbox.path().join("server"), &[]);

    // One local build, for reference. Every build carries attestations (provenance by
    // default, an SBOM asked for): they travel through the cache with the steps.
    let local = run_in(&sandbox, "store-local", "out-local", &["--sbom"]);
    assert_success(&local);
    let local_digest = summary(&local)["images"][0]["index_digest"].clone();

    // Each "machine" builds its own platform and uploads.
    for (machine, platform) in [
        ("amd64", "linux/amd64"),
        ("arm64", "linux/arm64"),
        ("armv7", "linux/arm/v7"),
    ] {
        let output = run_in(
            &sandbox,
            &format!("store-{machine}"),
            &format!("out-{machine}"),
            &["--platform", platform, "--cache-to", &server.url, "--sbom"],
        );
        assert_success(&output);
        assert!(summary(&output)["executed"].as_u64().unwrap() > 0);
        assert_eq!(
            summary(&output)["images"][0]["platforms"][0]["sbom"],
            "scanned"
        );
        assert_eq!(
            summary(&output)["images"][0]["platforms"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }

    // A fresh machine assembles the whole index from the cache: no step executes.
    let merge = run_in(
        &sandbox,
        "store-merge",
        "out-merge",
        &["--cache-from", &server.url, "--sbom"],
    );
    assert_success(&merge);
    let merged = summary(&merge);
    assert_eq!(merged["executed"], 0, "{merged}");
    for platform in merged["images"][0]["platforms"].as_array().unwrap() {
        assert_eq!(
            platform["sbom"], "team cache",
            "the merge reads each platform's SBOM from the cache: {merged}"
        );
        assert!(platform["attestation_digest"].is_string());
    }
    assert!(merged["cached"].as_u64().unwrap() > 0);
    assert_eq!(
        merged["images"][0]["index_digest"], local_digest,
        "the merged index is byte-identical to a local build"
    );
    let local_tree = tree_bytes(&sandbox.path().join("out-local/basic"));
    let merged_tree = tree_bytes(&sandbox.path().join("out-merge/basic"));
    assert!(local_tree == merged_tree, "layouts differ");

    // The server counted hits.
    let metrics = Command::new("curl")
        .args(["-sf", &format!("{}/metrics", server.url)])
        .output();
    if let Ok(metrics) = metrics {
        let text = String::from_utf8_lossy(&metrics.stdout);
        assert!(text.is_empty() || text.contains("hits"), "{text}");
    }
}

#[test]
fn an_unreachable_cache_warns_once_and_the_build_goes_on_unless_required() {
    let sandbox = Sandbox::new();
    sandbox.example("basic");
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");

    let output = run_in(
        &sandbox,
        "store",
        "out",
        &[
            "--platform",
            "linux/amd64",
            "--cache-from",
            &url,
            "--cache-to",
            &url,
        ],
    );
    assert_success(&output);
    let warnings: Vec<_> = events(&output)
        .into_iter()
        .filter(|event| event["event"] == "warning")
        .collect();
    assert_eq!(warnings.len(), 1, "one warning: {warnings:?}");
    assert!(
        warnings[0]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("127.0.0.1:{port}"))
    );

    let required = run_in(
        &sandbox,
        "store-required",
        "out-required",
        &[
            "--platform",
            "linux/amd64",
            "--cache-from",
            &url,
            "--cache-required",
        ],
    );
    assert_eq!(required.status.code(), Some(1), "{}", stderr(&required));
    assert!(
        stderr(&required).contains(&format!("127.0.0.1:{port}")),
        "{}",
        stderr(&required)
    );
}

#[test]
fn cache_mounts_travel_through_the_cache() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "mounts/images.kdl",
        r#"platforms "linux/amd64"
arg N="1"
stage app {
    from "oci:../tests/fixtures/busybox:1.35.0"
    run "echo $N >> /cache/seen && cp /cache/seen /seen" {
        cache-mount "/cache" id="shared"
    }
}
image app { stage app; }
"#,
    );
    let server = CacheServer::start(&sandbox.path().join("server"), &[]);
    let build = |store: &str, n: &str, flags: &[&str]| {
        let mut args = vec![
            "run",
            "mounts/images.kdl",
            "--output",
            "out",
            "--progress",
            "json",
            "--arg",
        ];
        let arg = format!("N={n}");
        args.push(&arg);
        args.extend_from_slice(flags);
        let output = sandbox.graphbuild_with_store(&sandbox.path().join(store), &args);
        assert_success(&output);
        output
    };
    build("machine-a", "1", &["--cache-to", &server.url]);
    // Another machine, a changed arg so the step runs: it starts from machine A's mount.
    build("machine-b", "2", &["--cache-from", &server.url]);
    let rootfs = unpack_platform(
        &sandbox.path().join("out/app"),
        "latest",
        "linux/amd64",
        &sandbox.path().join("unpacked"),
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("seen")).unwrap(),
        "1\n2\n"
    );
    assert!(
        !rootfs.join("cache/seen").exists(),
        "cache-mount contents never reach a layer"
    );
}

// ---------------------------------------------------------------------------------------------
// Hostile or broken caches (issue 11): bounded time and size, nothing unverified stored, a bad
// entry is a miss.
// ---------------------------------------------------------------------------------------------

/// How a [`FakeCache`] misbehaves.
#[derive(Clone, Copy, PartialEq)]
enum Misbehaviour {
    /// Every GET sends headers announcing 1000 bytes, two bytes, then nothing for 30 s.
    StallBody,
    /// Action entries name a 100-byte step record; blobs are an endless body.
    EndlessBlob,
    /// Action entries are garbage; blobs are missing; uploads are accepted and recorded.
    GarbageActions,
}

/// A bazel-remote-like cache on 127.0.0.1 that misbehaves, one thread per connection, one
/// request per connection. It records each request line.
struct FakeCache {
    url: String,
    requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl FakeCache {
    fn start(misbehaviour: Misbehaviour) -> FakeCache {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let log = log.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut request_line = String::new();
                    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut length = 0usize;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':')
                            && name.eq_ignore_ascii_case("content-length")
                        {
                            length = value.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; length];
                    let _ = reader.read_exact(&mut body);
                    let request_line = request_line.trim().to_string();
                    log.lock().unwrap().push(request_line.clone());
                    let mut parts = request_line.split(' ');
                    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                    let respond = |stream: &mut std::net::TcpStream, status: &str, body: &[u8]| {
                        let _ = write!(
                            stream,
                            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        );
                        if method != "HEAD" {
                            let _ = stream.write_all(body);
                        }
                    };
                    match (misbehaviour, method) {
                        (_, "PUT") => respond(&mut stream, "200 OK", b"stored"),
                        (Misbehaviour::StallBody, "GET") => {
                            let _ = stream
                                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nab");
                            std::thread::sleep(std::time::Duration::from_secs(30));
                        }
                        (Misbehaviour::EndlessBlob, "GET") if path.contains("/ac/") => {
                            let record = graphbuild_engine::remote::ActionResult::for_step_record(
                                graphbuild_engine::digest::Digest::of(b"a record"),
                                100,
                            );
                            respond(&mut stream, "200 OK", &record.encode());
                        }
                        (Misbehaviour::EndlessBlob, "GET") => {
                            let _ =
                                stream.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
                            let chunk = [b'x'; 64 * 1024];
                            let mut sent = 0u64;
                            while sent < 1 << 30 && stream.write_all(&chunk).is_ok() {
                                sent += chunk.len() as u64;
                            }
                        }
                        (Misbehaviour::GarbageActions, "GET") if path.contains("/ac/") => {
                            respond(&mut stream, "200 OK", b"\xff\xfe not a protobuf \x07")
                        }
                        _ => respond(&mut stream, "404 Not Found", b"not in the cache"),
                    }
                });
            }
        });
        FakeCache { url, requests }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// Two stages of one build, run at the same time, each waiting (up to 20 s) to see the
/// other's file in one cache mount: with `sharing="shared"` both are in the mount at once,
/// with `sharing="locked"` the first finishes alone before the second gets it.
#[test]
fn shared_cache_mounts_are_used_at_once_and_locked_ones_alone() {
    let build = |sharing: &str| {
        let sandbox = Sandbox::new();
        let step = |me: &str, other: &str| {
            format!(
                r#"run "touch /c/{me} && i=0 && while [ ! -e /c/{other} ] && [ $i -lt 20 ]; do sleep 1; i=$((i+1)); done; if [ -e /c/{other} ]; then echo together > /r; else echo alone > /r; fi" {{
        cache-mount "/c" id="c" sharing="{sharing}"
    }}"#
            )
        };
        sandbox.write(
            "proj/images.kdl",
            &format!(
                r#"platforms "linux/amd64"
stage a {{
    from "oci:../tests/fixtures/busybox:1.35.0"
    {}
}}
stage b {{
    from "oci:../tests/fixtures/busybox:1.35.0"
    {}
}}
image a {{ stage a; }}
image b {{ stage b; }}
"#,
                step("a", "b"),
                step("b", "a")
            ),
        );
        let output = sandbox.graphbuild(&[
            "run",
            "proj/images.kdl",
            "--output",
            "out",
            "--jobs",
            "2",
            "--progress",
            "json",
        ]);
        assert_success(&output);
        ["a", "b"]
            .iter()
            .map(|image| {
                let rootfs = unpack_platform(
                    &sandbox.path().join("out").join(image),
                    "latest",
                    "linux/amd64",
                    &sandbox.path().join(format!("unpacked-{image}")),
                );
                std::fs::read_to_string(rootfs.join("r")).unwrap()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(build("shared"), ["together\n", "together\n"]);
    let mut locked = build("locked");
    locked.sort();
    assert_eq!(locked, ["alone\n", "together\n"]);
}

fn warnings(output: &std::process::Output) -> Vec<String> {
    events(output)
        .into_iter()
        .filter(|event| event["event"] == "warning")
        .map(|event| event["message"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Every blob in the store hashes to its name, and none is `unwanted`.
fn assert_store_verified(store: &std::path::Path, unwanted: &str) {
    use sha2::Digest as _;
    let blobs = store.join("blobs/sha256");
    for entry in std::fs::read_dir(&blobs).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        assert_ne!(name, unwanted, "the unverified blob reached the store");
        let actual = hex::encode(sha2::Sha256::digest(std::fs::read(&path).unwrap()));
        assert_eq!(actual, name, "{} does not hash to its name", path.display());
    }
}

fn run_with_env(
    sandbox: &Sandbox,
    store: &str,
    output: &str,
    extra: &[&str],
    timeout: &str,
) -> std::process::Output {
    let mut args = vec![
        "run",
        "examples/basic/images.kdl",
        "--output",
        output,
        "--progress",
        "json",
        "--platform",
        "linux/amd64",
    ];
    args.extend_from_slice(extra);
    Command::new(bin())
        .args(&args)
        .current_dir(sandbox.path())
        .env("GRAPHBUILD_CACHE_DIR", sandbox.path().join(store))
        .env("GRAPHBUILD_CACHE_TIMEOUT", timeout)
        .env("NO_COLOR", "1")
        .env_remove("SOURCE_DATE_EPOCH")
        .output()
        .expect("graphbuild runs")
}

#[test]
fn a_stalling_cache_times_out_warns_once_and_the_build_goes_on_unless_required() {
    let sandbox = Sandbox::new();
    sandbox.example("basic");
    let cache = FakeCache::start(Misbehaviour::StallBody);

    let started = std::time::Instant::now();
    let output = run_with_env(&sandbox, "store", "out", &["--cache-from", &cache.url], "1");
    assert_success(&output);
    let warnings = warnings(&output);
    assert_eq!(warnings.len(), 1, "one warning: {warnings:?}");
    assert!(warnings[0].contains(&cache.url), "{warnings:?}");
    assert!(summary(&output)["executed"].as_u64().unwrap() > 0);
    // A stalled request (1 s) or two started together, then the cache is not asked again.
    assert!(
        (1..=2).contains(&cache.requests().len()),
        "{:?}",
        cache.requests()
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    assert_store_verified(&sandbox.path().join("store"), "");

    let required = run_with_env(
        &sandbox,
        "store-required",
        "out-required",
        &["--cache-from", &cache.url, "--cache-required"],
        "1",
    );
    assert_eq!(required.status.code(), Some(1), "{}", stderr(&required));
    assert!(
        stderr(&required).contains("timeout") || stderr(&required).contains("timed out"),
        "{}",
        stderr(&required)
    );
}

#[test]
fn an_endless_blob_is_cut_at_its_declared_size_and_never_stored() {
    let sandbox = Sandbox::new();
    sandbox.example("basic");
    let cache = FakeCache::start(Misbehaviour::EndlessBlob);
    let record = graphbuild_engine::digest::Digest::of(b"a record");

    let output = run_with_env(
        &sandbox,
        "store",
        "out",
        &["--cache-from", &cache.url, "--cache-required"],
        "5",
    );
    assert_success(&output);
    let warnings = warnings(&output);
    assert_eq!(warnings.len(), 1, "one warning: {warnings:?}");
    assert!(warnings[0].contains("wrong size"), "{warnings:?}");
    // Every step was a miss, and the cache was asked for each (a bad entry does not disable it).
    let record_gets = cache
        .requests()
        .iter()
        .filter(|line| line.contains(&format!("/cas/{}", record.hex())))
        .count();
    assert!(record_gets >= 2, "{:?}", cache.requests());
    assert_store_verified(&sandbox.path().join("store"), &record.hex());
}

#[test]
fn a_garbage_action_entry_is_a_miss_warned_once_and_replaced() {
    let sandbox = Sandbox::new();
    sandbox.example("basic");
    let cache = FakeCache::start(Misbehaviour::GarbageActions);

    let output = run_with_env(
        &sandbox,
        "store",
        "out",
        &[
            "--cache-from",
            &cache.url,
            "--cache-to",
            &cache.url,
            "--cache-required",
        ],
        "5",
    );
    assert_success(&output);
    let warnings = warnings(&output);
    assert_eq!(warnings.len(), 1, "one warning: {warnings:?}");
    assert!(
        warnings[0].contains("not a valid ActionResult"),
        "{warnings:?}"
    );
    let requests = cache.requests();
    assert!(
        requests.iter().any(|line| line.starts_with("PUT /ac/")),
        "the bad entries are replaced: {requests:?}"
    );
    assert_store_verified(&sandbox.path().join("store"), "");
}

#[test]
fn sigterm_while_waiting_on_a_stalled_cache_exits_within_two_seconds() {
    let sandbox = Sandbox::new();
    sandbox.example("basic");
    let cache = FakeCache::start(Misbehaviour::StallBody);
    let mut child = Command::new(bin())
        .args([
            "run",
            "examples/basic/images.kdl",
            "--output",
            "out",
            "--progress",
            "json",
            "--platform",
            "linux/amd64",
            "--cache-from",
            &cache.url,
        ])
        .current_dir(sandbox.path())
        .env("GRAPHBUILD_CACHE_DIR", sandbox.path().join("store"))
        .env_remove("GRAPHBUILD_CACHE_TIMEOUT")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("graphbuild starts");
    // Wait until it is stuck on the cache (the default timeout is 60 s).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while cache.requests().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no request came");
        if let Ok(Some(status)) = child.try_wait() {
            panic!("graphbuild exited early: {status}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let signalled = std::time::Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if signalled.elapsed() > std::time::Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("graphbuild ignored SIGTERM for 10 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let took = signalled.elapsed();
    assert!(
        took < std::time::Duration::from_secs(2),
        "exited {took:?} after SIGTERM"
    );
    assert_eq!(exit.code(), Some(130), "{exit}");
}

#[test]
fn cache_serve_refuses_a_directory_it_did_not_create_and_deletes_nothing() {
    let sandbox = Sandbox::new();
    let dir = sandbox.path().join("home");
    sandbox.write("home/tmp/notes.txt", "keep me");
    sandbox.write("home/.profile", "export A=1");
    let mut child = Command::new(bin())
        .args(["cache", "serve", "--listen", "127.0.0.1:0", "--dir"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cache serve starts");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cache serve started on a foreign directory");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut error = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut error).unwrap();
    assert_eq!(status.code(), Some(3), "{error}");
    assert!(error.contains("not a cache server directory"), "{error}");
    assert!(error.contains("hint:"), "{error}");
    assert_eq!(
        std::fs::read_to_string(dir.join("tmp/notes.txt")).unwrap(),
        "keep me"
    );
    assert!(!dir.join("cas").exists());

    // A new directory is created and marked, and serves.
    let fresh = sandbox.path().join("fresh");
    let server = CacheServer::start(&fresh, &[]);
    assert!(fresh.join(".graphbuild-cache-server").is_file());
    drop(server);
}

#[test]
fn an_invalid_cache_timeout_is_refused_with_a_hint() {
    let sandbox = Sandbox::new();
    sandbox.example("basic");
    let output = run_with_env(
        &sandbox,
        "store",
        "out",
        &["--cache-from", "http://127.0.0.1:9"],
        "soon",
    );
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("GRAPHBUILD_CACHE_TIMEOUT=soon")
            && stderr(&output).contains("hint: write a positive number of seconds"),
        "{}",
        stderr(&output)
    );
}
