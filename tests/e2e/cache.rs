//! The team cache end to end: `graphbuild cache serve` on 127.0.0.1, builds split by platform
//! across three clean stores ("machines"), merged on a fourth from cache hits alone.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::*;

struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(dir: &std::path::Path, extra: &[&str]) -> Server {
        let mut child = Command::new(bin())
            .args(["cache", "serve", "--listen", "127.0.0.1:0", "--dir"])
            .arg(dir)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cache serve starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("reads the address");
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Server { child, url }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
    let server = Server::start(&sandbox.path().join("server"), &[]);

    // One local build, for reference.
    let local = run_in(&sandbox, "store-local", "out-local", &[]);
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
            &["--platform", platform, "--cache-to", &server.url],
        );
        assert_success(&output);
        assert!(summary(&output)["executed"].as_u64().unwrap() > 0);
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
        &["--cache-from", &server.url],
    );
    assert_success(&merge);
    let merged = summary(&merge);
    assert_eq!(merged["executed"], 0, "{merged}");
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
    let server = Server::start(&sandbox.path().join("server"), &[]);
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
