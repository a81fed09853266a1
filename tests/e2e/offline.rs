//! `graphbuild` without the network, end to end with the real binary.
//!
//! "No network" is made real by running the binary in a fresh network namespace
//! (`unshare -n`, as root): only a loopback interface that is down, so a name does not resolve
//! and nothing can be connected to, at once. Tests that need it panic with a clear message when
//! not root under CI (`CI=true`) and are skipped otherwise.
//!
//! - the stdlib examples (docker.io bases) plan with unresolved bases and pending keys, exit 0,
//!   one warning, in a few seconds; `run` refuses them with exit code 3;
//! - a lock file made against a real local registry (`docker-registry`, the busybox fixture)
//!   makes the plan complete without the registry, and a cached run works offline;
//!   `--offline` without the manifests or the layers in the store is a clear exit 3;
//! - a refused connection is exit 3 within a second or two, not retried.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

/// Whether the test can use `unshare -n` (root). Under CI a missing root is a failure.
fn can_unshare(test: &str) -> bool {
    prerequisite(
        nix::unistd::geteuid().is_root(),
        &format!("{test} needs root (it runs graphbuild in a network namespace with `unshare -n`)"),
    )
}

/// An empty Docker config directory, so the machine's own logins never leak in.
fn no_login(sandbox: &Sandbox) -> std::path::PathBuf {
    let dir = sandbox.path().join("docker-empty");
    std::fs::create_dir_all(&dir).expect("mkdir");
    dir
}

fn command(sandbox: &Sandbox, store: &Path, offline_namespace: bool) -> Command {
    let mut command = if offline_namespace {
        let mut command = Command::new("unshare");
        command.args(["-n", "--"]).arg(bin());
        command
    } else {
        Command::new(bin())
    };
    command
        .current_dir(sandbox.path())
        .env("GRAPHBUILD_CACHE_DIR", store)
        .env("DOCKER_CONFIG", no_login(sandbox))
        .env("NO_COLOR", "1")
        .env_remove("SOURCE_DATE_EPOCH")
        .env_remove("GRAPHBUILD_CACHE");
    command
}

/// graphbuild in a network namespace without network; returns the output and how long it took.
fn without_network(sandbox: &Sandbox, store: &Path, args: &[&str]) -> (Output, Duration) {
    let started = Instant::now();
    let output = command(sandbox, store, true)
        .args(args)
        .output()
        .expect("unshare runs");
    (output, started.elapsed())
}

fn with_network(sandbox: &Sandbox, store: &Path, args: &[&str]) -> (Output, Duration) {
    let started = Instant::now();
    let output = command(sandbox, store, false)
        .args(args)
        .output()
        .expect("graphbuild runs");
    (output, started.elapsed())
}

fn show(output: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        stdout(output),
        stderr(output)
    )
}

fn host_platform() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "linux/arm64",
        _ => "linux/amd64",
    }
}

#[test]
fn stdlib_examples_plan_without_network_with_pending_keys() {
    if !can_unshare("stdlib_examples_plan_without_network_with_pending_keys") {
        return;
    }
    let sandbox = Sandbox::new();
    for (example, base) in [
        ("stdlib-python", "docker.io/library/python:3.12-slim"),
        ("stdlib-go", "docker.io/library/golang:1.23"),
        ("stdlib-rust", "docker.io/library/rust:1.83"),
    ] {
        sandbox.example(example);
        let file = format!("examples/{example}/images.kdl");

        // Text: exit 0, one warning naming the base and how to pin it, pending keys.
        let (output, took) = without_network(&sandbox, &sandbox.store(), &["plan", &file]);
        let shown = show(&output);
        assert_eq!(output.status.code(), Some(0), "{example}: {shown}");
        assert!(
            took < Duration::from_secs(5),
            "{example}: plan took {took:?} without network: {shown}"
        );
        let errors = stderr(&output);
        assert_eq!(
            errors.matches("warning:").count(),
            1,
            "{example}: one warning: {shown}"
        );
        assert!(errors.contains("unresolved"), "{example}: {shown}");
        assert!(errors.contains(base), "{example}: names the base: {shown}");
        assert!(
            errors.contains(&format!("graphbuild lock {file}")),
            "{example}: says how to pin it: {shown}"
        );
        assert!(!errors.contains("invalid build file"), "{example}: {shown}");
        let text = stdout(&output);
        assert!(text.contains("pending"), "{example}: {shown}");
        assert!(
            text.contains(&format!("from {base} (unresolved)")),
            "{example}: {shown}"
        );

        // JSON: pending nodes have no key, steps neither; the unresolved bases are listed.
        let (output, _) = without_network(
            &sandbox,
            &sandbox.store(),
            &["plan", &file, "--format", "json"],
        );
        assert_eq!(
            output.status.code(),
            Some(0),
            "{example}: {}",
            show(&output)
        );
        let plan: serde_json::Value =
            serde_json::from_slice(&output.stdout).expect("plan --format json prints JSON");
        let nodes = plan["nodes"].as_array().expect("nodes");
        let pending: Vec<_> = nodes
            .iter()
            .filter(|node| node["pending"] == true)
            .collect();
        assert!(!pending.is_empty(), "{example}: {plan:#}");
        for node in &pending {
            assert!(node["key"].is_null(), "{example}: {node:#}");
            assert!(node["cached"].is_null(), "{example}: {node:#}");
            for step in node["steps"].as_array().expect("steps") {
                assert!(step["key"].is_null(), "{example}: {step:#}");
            }
        }
        // Every image's node is pending: the base is under everything.
        for image in plan["images"].as_array().expect("images") {
            for id in image["nodes"].as_object().expect("nodes").values() {
                let node = nodes
                    .iter()
                    .find(|node| node["id"] == *id)
                    .expect("image node");
                assert_eq!(node["pending"], true, "{example}: {node:#}");
            }
        }
        assert!(
            nodes
                .iter()
                .any(|node| node["base"]["kind"] == "unresolved"
                    && node["base"]["reference"] == base),
            "{example}: {plan:#}"
        );
        let unresolved = plan["unresolved"].as_array().expect("unresolved");
        assert!(
            unresolved
                .iter()
                .any(|entry| entry["reference"] == base && entry["reason"].is_string()),
            "{example}: {plan:#}"
        );

        // Dot: pending nodes are drawn dashed.
        let (output, _) = without_network(
            &sandbox,
            &sandbox.store(),
            &["plan", &file, "--format", "dot"],
        );
        assert_eq!(
            output.status.code(),
            Some(0),
            "{example}: {}",
            show(&output)
        );
        let dot = stdout(&output);
        assert!(dot.contains("key pending"), "{example}: {dot}");
        assert!(dot.contains("style=dashed"), "{example}: {dot}");

        // --explain says what the keys wait for.
        let (output, _) =
            without_network(&sandbox, &sandbox.store(), &["plan", &file, "--explain"]);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{example}: {}",
            show(&output)
        );
        assert!(
            stdout(&output).contains(&format!(
                "pending: the key waits for the unresolved base {base}"
            )),
            "{example}: {}",
            show(&output)
        );

        // `run` refuses to build, quickly, naming the base: an environment problem.
        let (output, took) = without_network(
            &sandbox,
            &sandbox.store(),
            &["run", &file, "--output", "out", "--progress", "plain"],
        );
        let shown = show(&output);
        assert_eq!(output.status.code(), Some(3), "{example}: {shown}");
        assert!(took < Duration::from_secs(5), "{example}: {took:?} {shown}");
        assert!(stderr(&output).contains(base), "{example}: {shown}");
        assert!(stderr(&output).contains("unresolved"), "{example}: {shown}");
    }
}

#[test]
fn offline_without_a_lock_file_leaves_bases_unresolved() {
    if !can_unshare("offline_without_a_lock_file_leaves_bases_unresolved") {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.example("stdlib-python");
    let file = "examples/stdlib-python/images.kdl";
    let (output, took) = without_network(&sandbox, &sandbox.store(), &["plan", file, "--offline"]);
    let shown = show(&output);
    assert_eq!(output.status.code(), Some(0), "{shown}");
    assert!(took < Duration::from_secs(5), "{took:?} {shown}");
    assert!(
        stderr(&output).contains("not in graphbuild.lock"),
        "{shown}"
    );
    let (output, _) = without_network(
        &sandbox,
        &sandbox.store(),
        &["run", file, "--offline", "--output", "out"],
    );
    let shown = show(&output);
    assert_eq!(output.status.code(), Some(3), "{shown}");
    assert!(
        stderr(&output).contains("docker.io/library/python:3.12-slim"),
        "{shown}"
    );
    assert!(stderr(&output).contains("--offline"), "{shown}");
    assert!(stderr(&output).contains("graphbuild lock"), "{shown}");
}

#[test]
fn a_refused_connection_is_an_environment_error_at_once() {
    let sandbox = Sandbox::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let base = format!("127.0.0.1:{port}/busybox:1.35.0");
    sandbox.write(
        "images.kdl",
        &format!(
            "platforms \"linux/amd64\" \"linux/arm64\"\n\nstage app {{\n    from \"{base}\"\n    run \"true\"\n}}\n\nimage app {{\n    stage app\n}}\n"
        ),
    );
    let (output, took) = with_network(
        &sandbox,
        &sandbox.store(),
        &[
            "run",
            "images.kdl",
            "--output",
            "out",
            "--progress",
            "plain",
        ],
    );
    let shown = show(&output);
    assert_eq!(output.status.code(), Some(3), "{shown}");
    assert!(
        took < Duration::from_secs(2),
        "a refused connection is not retried: {took:?} {shown}"
    );
    assert!(stderr(&output).contains(&base), "{shown}");
    assert!(
        stderr(&output).contains(&format!("cannot reach the registry 127.0.0.1:{port}")),
        "{shown}"
    );
    assert!(stderr(&output).contains("hint:"), "{shown}");

    // `plan` shows the plan with the base unresolved.
    let (output, took) = with_network(&sandbox, &sandbox.store(), &["plan", "images.kdl"]);
    let shown = show(&output);
    assert_eq!(output.status.code(), Some(0), "{shown}");
    assert!(took < Duration::from_secs(2), "{took:?} {shown}");
    assert!(stdout(&output).contains("pending"), "{shown}");
    assert!(
        stderr(&output).contains("Connection refused") || stderr(&output).contains("refused"),
        "{shown}"
    );
}

#[test]
fn a_lock_file_makes_plan_and_cached_run_work_offline() {
    if !can_unshare("a_lock_file_makes_plan_and_cached_run_work_offline") {
        return;
    }
    let registry = Registry::start();
    let fixture = repo_root().join("tests/fixtures/busybox");
    registry.push_layout(
        &format!("oci:{}:1.35.0", fixture.display()),
        "busybox:1.35.0",
    );
    let base = format!("{}/busybox:1.35.0", registry.address);
    let platform = host_platform();
    let sandbox = Sandbox::new();
    sandbox.write(
        "images.kdl",
        &format!(
            "platforms \"{platform}\"\n\nstage app {{\n    from \"{base}\"\n    run \"echo offline > /hello.txt\"\n}}\n\nimage app {{\n    stage app\n    tags \"localhost/app:1.0\"\n}}\n"
        ),
    );
    let store = sandbox.path().join("store");
    let locked_only = sandbox.path().join("store-locked-only");
    let empty = sandbox.path().join("store-empty");

    // With the network: pin the base (the lock also keeps its manifest and config in the
    // store), and build once.
    let (output, _) = with_network(&sandbox, &store, &["lock", "images.kdl"]);
    assert_success(&output);
    let lock: serde_json::Value = serde_json::from_slice(
        &std::fs::read(sandbox.path().join("graphbuild.lock")).expect("graphbuild.lock"),
    )
    .expect("lock JSON");
    assert_eq!(lock["bases"].as_array().map(Vec::len), Some(1), "{lock:#}");
    let (output, _) = with_network(&sandbox, &locked_only, &["lock", "images.kdl"]);
    assert_success(&output);
    let (output, _) = with_network(
        &sandbox,
        &store,
        &[
            "run",
            "images.kdl",
            "--output",
            "out",
            "--progress",
            "plain",
        ],
    );
    assert_success(&output);
    let built = skopeo_raw(&format!(
        "oci:{}:1.0",
        sandbox.path().join("out/app").display()
    ));

    // The registry is gone: a plan that touched the network would show pending keys.
    drop(registry);
    let (output, _) = with_network(&sandbox, &store, &["plan", "images.kdl"]);
    let shown = show(&output);
    assert_eq!(output.status.code(), Some(0), "{shown}");
    assert!(!stdout(&output).contains("pending"), "{shown}");
    assert!(!stderr(&output).contains("warning"), "{shown}");
    assert!(stdout(&output).contains("cached"), "{shown}");

    // Without any network at all, with and without --offline: the plan is complete.
    for extra in [&[][..], &["--offline"][..]] {
        let mut args = vec!["plan", "images.kdl", "--format", "json"];
        args.extend_from_slice(extra);
        let (output, took) = without_network(&sandbox, &store, &args);
        let shown = show(&output);
        assert_eq!(output.status.code(), Some(0), "{shown}");
        assert!(took < Duration::from_secs(5), "{took:?} {shown}");
        assert!(!stderr(&output).contains("warning"), "{shown}");
        let plan: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
        assert_eq!(plan["unresolved"], serde_json::json!([]), "{plan:#}");
        for node in plan["nodes"].as_array().expect("nodes") {
            assert_eq!(node["pending"], false, "{node:#}");
            assert!(node["key"].is_string(), "{node:#}");
            assert_eq!(node["cached"], true, "{node:#}");
            assert_eq!(node["base"]["reference"], base.as_str(), "{node:#}");
            assert_eq!(
                node["base"]["digest"], lock["bases"][0]["digest"],
                "{node:#}"
            );
        }
    }

    // A cached run works offline and gives the same image.
    let (output, _) = without_network(
        &sandbox,
        &store,
        &[
            "run",
            "images.kdl",
            "--offline",
            "--output",
            "out-offline",
            "--progress",
            "plain",
        ],
    );
    assert_success(&output);
    let offline = skopeo_raw(&format!(
        "oci:{}:1.0",
        sandbox.path().join("out-offline/app").display()
    ));
    assert_eq!(built, offline, "the offline run builds the same index");

    // --offline with the manifest in the store but not the layers: exit 3, naming the base.
    let (output, took) = without_network(
        &sandbox,
        &locked_only,
        &["run", "images.kdl", "--offline", "--output", "out-2"],
    );
    let shown = show(&output);
    assert_eq!(output.status.code(), Some(3), "{shown}");
    assert!(took < Duration::from_secs(5), "{took:?} {shown}");
    assert!(stderr(&output).contains(&base), "{shown}");
    assert!(
        stderr(&output).contains("not in the local store"),
        "{shown}"
    );
    assert!(stderr(&output).contains("hint:"), "{shown}");

    // --offline with an empty store: the lock pins the base but its manifest is not here.
    let (output, took) = without_network(
        &sandbox,
        &empty,
        &["run", "images.kdl", "--offline", "--output", "out-3"],
    );
    let shown = show(&output);
    assert_eq!(output.status.code(), Some(3), "{shown}");
    assert!(took < Duration::from_secs(5), "{took:?} {shown}");
    assert!(stderr(&output).contains(&base), "{shown}");
    assert!(
        stderr(&output).contains("is not in the local store"),
        "{shown}"
    );
}
