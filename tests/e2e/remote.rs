//! Remote execution end to end, against a real BuildGrid with its Execution and Bots services
//! on 127.0.0.1 (PostgreSQL behind its scheduler), started once for this test binary by
//! `scripts/buildgrid serve-execution`, with two `graphbuild worker`s on the instance "":
//! `amd64-worker` (linux/amd64) and `arm64-worker` (linux/arm64, through qemu-user here,
//! standing in for a native machine). The instance "team" has workers of its own, started by
//! the test that kills one. Everything stops when the test binary exits. Under `CI=true` a
//! missing prerequisite (root, qemu, Python 3.13, PostgreSQL) fails every test here.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;

/// Seconds a bot may be silent before BuildGrid drops it and queues its job again.
const BOT_TIMEOUT: &str = "5";
/// Seconds an action waits for a worker before its step runs locally, in these tests: long
/// enough that steps of tests running at once, queued behind each other on the two workers,
/// never fall back (the arm/v7 steps, which no worker takes, wait this long once).
const QUEUE_TIMEOUT: &str = "30";

/// The BuildGrid of this test binary.
struct Cluster {
    port: u16,
    /// The script serving it, which stops it when this process exits.
    _script: Child,
    /// Its data directory: `server.log`, the workers' stores and logs.
    data: PathBuf,
}

impl Cluster {
    fn url(&self, instance: &str) -> String {
        if instance.is_empty() {
            format!("grpc://127.0.0.1:{}", self.port)
        } else {
            format!("grpc://127.0.0.1:{}/{instance}", self.port)
        }
    }
}

/// A `graphbuild worker`, watched by a shell that stops it when this test binary exits.
struct Worker {
    name: String,
    log: PathBuf,
    pid_file: PathBuf,
    _watchdog: Child,
}

impl Worker {
    fn pid(&self) -> i32 {
        std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .expect("the worker's pid")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until the worker's log has `needle` (at most `seconds`).
    fn wait_for(&self, needle: &str, seconds: u64) {
        let started = Instant::now();
        while !self.log().contains(needle) {
            assert!(
                started.elapsed() < Duration::from_secs(seconds),
                "worker {} did not log `{needle}` within {seconds} s:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn unavailable(message: String) -> Option<Cluster> {
    assert!(!ci(), "prerequisite missing under CI: {message}");
    eprintln!("skipped: {message}");
    None
}

fn start_cluster() -> Option<Cluster> {
    if !root_and_qemu() {
        return None;
    }
    let script = repo_root().join("scripts/buildgrid");
    let install = Command::new(&script)
        .arg("install")
        .output()
        .expect("scripts/buildgrid runs");
    if !install.status.success() {
        return unavailable(format!(
            "BuildGrid is not installed and `scripts/buildgrid install` failed (it needs Python >= 3.13 and PyPI): {}",
            stderr(&install)
        ));
    }
    let has_postgres = Path::new("/usr/lib/postgresql")
        .read_dir()
        .is_ok_and(|dirs| {
            dirs.flatten()
                .any(|dir| dir.path().join("bin/initdb").exists())
        });
    if !has_postgres {
        return unavailable(
            "PostgreSQL is not installed (apt-get install postgresql; scripts/setup-host)".into(),
        );
    }
    // Kept for the whole binary; the script deletes it when this process exits.
    let data = tempfile::Builder::new()
        .prefix("graphbuild-execution-")
        .tempdir()
        .expect("temp dir")
        .keep();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let log = std::fs::File::create(data.join("server.log")).expect("log file");
    let mut child = Command::new(&script)
        .arg("serve-execution")
        .arg(&data)
        .arg(port.to_string())
        .arg(std::process::id().to_string())
        .env("GRAPHBUILD_BUILDGRID_BOT_TIMEOUT", BOT_TIMEOUT)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("scripts/buildgrid serve-execution starts");
    match common::wait_until_listening(&mut child, &[port], &data.join("server.log")) {
        Ok(()) => Some(Cluster {
            port,
            _script: child,
            data,
        }),
        Err(message) => unavailable(message),
    }
}

/// Start a worker of `platform` named `name` on `instance`, and wait until it has a session.
fn start_worker(cluster: &Cluster, instance: &str, platform: &str, name: &str) -> Worker {
    start_worker_with(cluster, instance, platform, name, &[])
}

/// [`start_worker`] with more `graphbuild worker` flags.
fn start_worker_with(
    cluster: &Cluster,
    instance: &str,
    platform: &str,
    name: &str,
    flags: &[&str],
) -> Worker {
    let dir = cluster.data.join(format!("worker-{name}"));
    std::fs::create_dir_all(&dir).expect("worker dir");
    let log = dir.join("worker.log");
    let pid_file = dir.join("pid");
    // The shell starts the worker, writes its pid, and stops it when this process exits.
    let watchdog = Command::new("sh")
        .arg("-c")
        .arg(
            r#"parent=$1; pid_file=$2; log=$3; shift 3
"$@" >"$log" 2>&1 &
worker=$!
echo $worker >"$pid_file"
trap 'kill $worker 2>/dev/null; exit 0' TERM INT
while kill -0 "$parent" 2>/dev/null && kill -0 $worker 2>/dev/null; do sleep 0.5; done
kill $worker 2>/dev/null
wait $worker 2>/dev/null
exit 0"#,
        )
        .arg("watchdog")
        .arg(std::process::id().to_string())
        .arg(&pid_file)
        .arg(&log)
        .arg(bin())
        .args(["worker", "--executor", &cluster.url(instance)])
        .args(["--platform", platform, "--name", name])
        .args(flags)
        .arg("--cache-dir")
        .arg(dir.join("store"))
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .spawn()
        .expect("the worker starts");
    let worker = Worker {
        name: name.to_string(),
        log,
        pid_file,
        _watchdog: watchdog,
    };
    worker.wait_for("registered as", 60);
    worker
}

/// BuildGrid and the two workers of the instance "", started on first use.
fn cluster() -> Option<&'static (Cluster, Vec<Worker>)> {
    static CLUSTER: OnceLock<Option<(Cluster, Vec<Worker>)>> = OnceLock::new();
    CLUSTER
        .get_or_init(|| {
            let cluster = start_cluster()?;
            let workers = vec![
                start_worker(&cluster, "", "linux/amd64", "amd64-worker"),
                start_worker(&cluster, "", "linux/arm64", "arm64-worker"),
            ];
            Some((cluster, workers))
        })
        .as_ref()
}

fn run(sandbox: &Sandbox, file: &str, store: &str, output: &str, extra: &[&str]) -> Output {
    run_with_env(sandbox, file, store, output, extra, &[])
}

/// [`run`] with more environment variables (set after the defaults, so they override them).
fn run_with_env(
    sandbox: &Sandbox,
    file: &str,
    store: &str,
    output: &str,
    extra: &[&str],
    env: &[(&str, &std::ffi::OsStr)],
) -> Output {
    let mut args = vec!["run", file, "--output", output, "--progress", "json"];
    args.extend_from_slice(extra);
    let mut command = Command::new(bin());
    command
        .args(&args)
        .current_dir(sandbox.path())
        .env("GRAPHBUILD_CACHE_DIR", sandbox.path().join(store))
        .env("GRAPHBUILD_REMOTE_QUEUE_TIMEOUT", QUEUE_TIMEOUT)
        .env("NO_COLOR", "1")
        .env_remove("SOURCE_DATE_EPOCH")
        .env_remove("GRAPHBUILD_CACHE")
        .env_remove("GRAPHBUILD_REMOTE_EXECUTOR")
        .env_remove("GRAPHBUILD_BINFMT_DIR");
    command.envs(env.iter().copied());
    command.output().expect("graphbuild runs")
}

/// A binfmt_misc directory as the kernel shows it with no emulator registered: `status`
/// enabled, no handlers. `GRAPHBUILD_BINFMT_DIR` pointing here makes graphbuild believe this
/// machine cannot run foreign binaries (the kernel's real handlers are untouched).
fn no_emulators(sandbox: &Sandbox) -> PathBuf {
    let dir = sandbox.path().join("binfmt-without-emulators");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("status"), "enabled\n").expect("status");
    dir
}

fn warnings(output: &Output) -> Vec<String> {
    events(output)
        .into_iter()
        .filter(|event| event["event"] == "warning")
        .map(|event| event["message"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// (stage, platform, step, ran_on) of every executed step.
fn executed_steps(output: &Output) -> Vec<(String, String, String, String)> {
    events(output)
        .into_iter()
        .filter(|event| event["event"] == "step" && event["status"] == "executed")
        .map(|event| {
            let text = |key: &str| event[key].as_str().unwrap_or_default().to_string();
            (
                text("stage"),
                text("platform"),
                text("step"),
                text("ran_on"),
            )
        })
        .collect()
}

fn index_digest(output: &Output) -> String {
    let digest = summary(output)["images"][0]["index_digest"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        digest.starts_with("sha256:"),
        "no index digest: {}",
        summary(output)
    );
    digest
}

#[test]
fn three_platforms_run_on_the_workers_of_their_cpus_and_match_a_local_build() {
    let Some((cluster, _workers)) = cluster() else {
        return;
    };
    let sandbox = Sandbox::new();
    sandbox.example("basic");
    let file = "examples/basic/images.kdl";
    let url = cluster.url("");

    let local = run(&sandbox, file, "store-local", "out-local", &[]);
    assert_success(&local);

    // Remote: amd64 and arm64 steps on their workers; no worker takes arm/v7, which runs here
    // after the queue timeout, with one warning. Results go to the cluster's cache too.
    let remote = run(
        &sandbox,
        file,
        "store-remote",
        "out-remote",
        &["--remote-executor", &url, "--cache", &url],
    );
    assert_success(&remote);
    let found = warnings(&remote);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].contains("linux/arm/v7") && found[0].contains("no worker"),
        "{}",
        found[0]
    );
    let steps = executed_steps(&remote);
    let runs: Vec<_> = steps
        .iter()
        .filter(|(_, _, step, _)| step.starts_with("RUN"))
        .collect();
    // Three runs per platform (base, and two in build).
    assert_eq!(runs.len(), 9, "{steps:?}");
    for (stage, platform, step, ran_on) in &runs {
        let expected = match platform.as_str() {
            "linux/amd64" => "amd64-worker",
            "linux/arm64" => "arm64-worker",
            _ => "local",
        };
        assert_eq!(ran_on, expected, "{stage} {platform} {step}");
    }
    // Steps that never leave (copies) ran here, and say so.
    assert!(
        steps
            .iter()
            .filter(|(_, _, step, _)| step.starts_with("COPY"))
            .all(|(_, _, _, ran_on)| ran_on == "local"),
        "{steps:?}"
    );
    assert_eq!(index_digest(&remote), index_digest(&local));
    assert!(
        tree_bytes(&sandbox.path().join("out-remote/basic"))
            == tree_bytes(&sandbox.path().join("out-local/basic")),
        "the layouts differ"
    );
    // The arm64 image's `uname -m` ran on an aarch64 CPU (the arm64 worker's, emulated here).
    let root = unpack_platform(
        &sandbox.path().join("out-remote/basic"),
        "1.0",
        "linux/arm64",
        &sandbox.path().join("unpacked-arm64"),
    );
    assert_eq!(
        std::fs::read_to_string(root.join("app/arch.txt")).unwrap(),
        "aarch64\n"
    );

    // A second, clean client: everything from the cluster's cache, nothing executed anywhere.
    let again = run(
        &sandbox,
        file,
        "store-clean",
        "out-clean",
        &["--remote-executor", &url, "--cache", &url],
    );
    assert_success(&again);
    assert_eq!(summary(&again)["executed"], 0, "{}", summary(&again));
    assert!(executed_steps(&again).is_empty());
    assert_eq!(index_digest(&again), index_digest(&local));
}

#[test]
fn a_client_without_emulators_builds_foreign_platforms_on_the_workers() {
    let Some((cluster, _workers)) = cluster() else {
        return;
    };
    let sandbox = Sandbox::new();
    sandbox.example("basic");
    let file = "examples/basic/images.kdl";
    let platforms = ["--platform", "linux/amd64", "--platform", "linux/arm64"];
    let no_binfmt = no_emulators(&sandbox);
    let env = [("GRAPHBUILD_BINFMT_DIR", no_binfmt.as_os_str())];

    // Without an executor, the preflight stops the build up front, naming the emulator.
    let refused = run_with_env(
        &sandbox,
        file,
        "store-refused",
        "out-refused",
        &platforms,
        &env,
    );
    assert_eq!(refused.status.code(), Some(3), "{}", stderr(&refused));
    let message = stderr(&refused);
    assert!(
        message.contains("cannot run steps for linux/arm64")
            && message.contains("no emulator is registered for platform linux/arm64"),
        "{message}"
    );
    assert!(executed_steps(&refused).is_empty());

    // With one, the arm64 steps run on the arm64 worker and the build succeeds.
    let local = run(&sandbox, file, "store-local", "out-local", &platforms);
    assert_success(&local);
    let mut extra = platforms.to_vec();
    let url = cluster.url("");
    extra.extend(["--remote-executor", &url]);
    let remote = run_with_env(&sandbox, file, "store-remote", "out-remote", &extra, &env);
    assert_success(&remote);
    assert!(warnings(&remote).is_empty(), "{:?}", warnings(&remote));
    let steps = executed_steps(&remote);
    let runs: Vec<_> = steps
        .iter()
        .filter(|(_, _, step, _)| step.starts_with("RUN"))
        .collect();
    assert_eq!(runs.len(), 6, "{steps:?}");
    for (stage, platform, step, ran_on) in &runs {
        let expected = match platform.as_str() {
            "linux/amd64" => "amd64-worker",
            _ => "arm64-worker",
        };
        assert_eq!(ran_on, expected, "{stage} {platform} {step}");
    }
    assert_eq!(index_digest(&remote), index_digest(&local));
    let root = unpack_platform(
        &sandbox.path().join("out-remote/basic"),
        "1.0",
        "linux/arm64",
        &sandbox.path().join("unpacked-arm64"),
    );
    assert_eq!(
        std::fs::read_to_string(root.join("app/arch.txt")).unwrap(),
        "aarch64\n"
    );
}

/// The failure event and the rendered diagnostic of a build whose `step` had to run here
/// for `platform`, which this machine cannot emulate.
fn assert_fails_naming_the_emulator(output: &Output, platform: &str, step: &str) {
    assert_eq!(output.status.code(), Some(1), "{}", stderr(output));
    let failure = events(output)
        .into_iter()
        .find(|event| event["event"] == "failure")
        .expect("a failure event");
    let text = failure.to_string();
    for needle in [
        format!("cannot run this {platform} step on this machine"),
        format!("no emulator is registered for platform {platform}"),
        step.to_string(),
    ] {
        assert!(text.contains(&needle), "no `{needle}` in {text}");
    }
    let failed = events(output)
        .into_iter()
        .find(|event| event["event"] == "step" && event["status"] == "failed")
        .expect("a failed step");
    assert_eq!(failed["platform"], platform, "{failed}");
    assert!(
        failed["step"].as_str().unwrap_or_default().contains(step),
        "{failed}"
    );
    assert_eq!(failed["ran_on"], "local", "{failed}");
    let rendered = stderr(output);
    assert!(
        rendered.contains(&format!("cannot run this {platform} step on this machine"))
            && rendered
                .contains("help: install the emulators with `apt-get install qemu-user-static")
            && rendered.contains(step),
        "{rendered}"
    );
}

#[test]
fn a_step_that_must_run_here_without_an_emulator_fails_naming_it() {
    let Some((cluster, _workers)) = cluster() else {
        return;
    };
    let sandbox = Sandbox::new();
    sandbox.busybox("base");
    let no_binfmt = no_emulators(&sandbox);
    let url = cluster.url("");

    // No worker serves linux/arm/v7: after the queue timeout the step must run here.
    sandbox.write(
        "nobody.kdl",
        "platforms \"linux/arm/v7\"\nstage s {\n    from \"oci:base:1.35.0\"\n    run \"echo nobody-serves-me > /out\"\n}\nimage s { stage s; }\n",
    );
    let output = run_with_env(
        &sandbox,
        "nobody.kdl",
        "store",
        "out",
        &["--remote-executor", &url],
        &[
            ("GRAPHBUILD_BINFMT_DIR", no_binfmt.as_os_str()),
            ("GRAPHBUILD_REMOTE_QUEUE_TIMEOUT", "5".as_ref()),
        ],
    );
    assert_fails_naming_the_emulator(&output, "linux/arm/v7", "nobody-serves-me");
    assert!(
        warnings(&output)
            .iter()
            .any(|warning| warning.contains("no worker") && warning.contains("linux/arm/v7")),
        "{:?}",
        warnings(&output)
    );
    assert!(
        !sandbox.path().join("out/s").exists(),
        "an image was written"
    );

    // A step with a secret never leaves the machine, even with an arm64 worker.
    sandbox.write("token", "t0ken");
    sandbox.write(
        "secret.kdl",
        "platforms \"linux/arm64\"\nstage s {\n    from \"oci:base:1.35.0\"\n    run \"wc -c /run/secrets/token > /secret-size\" {\n        secret \"token\"\n    }\n}\nimage s { stage s; }\n",
    );
    let output = run_with_env(
        &sandbox,
        "secret.kdl",
        "store",
        "out",
        &["--remote-executor", &url, "--secret", "id=token,src=token"],
        &[("GRAPHBUILD_BINFMT_DIR", no_binfmt.as_os_str())],
    );
    assert_fails_naming_the_emulator(&output, "linux/arm64", "/secret-size");
    assert!(
        !stderr(&output).contains("t0ken")
            && !String::from_utf8_lossy(&output.stdout).contains("t0ken")
    );
}

/// Processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(marker) {
                found.push(format!(
                    "{}: {cmdline}",
                    entry.file_name().to_string_lossy()
                ));
            }
        }
    }
    found
}

#[test]
fn a_worker_kills_a_step_that_runs_past_its_time_limit() {
    let Some((cluster, _workers)) = cluster() else {
        return;
    };
    // A worker of its own instance, so no other test's step meets its short limit.
    let worker = start_worker_with(
        cluster,
        "limits",
        "linux/amd64",
        "limited-worker",
        &["--step-timeout", "3s"],
    );
    let sandbox = Sandbox::new();
    sandbox.busybox("base");
    let url = cluster.url("limits");
    // Without a timeout of its own, and with a longer one: both killed after the worker's 3s.
    for (marker, timeout) in [
        ("limit-marker-none", ""),
        ("limit-marker-own", " timeout=\"10m\""),
    ] {
        sandbox.write(
            "images.kdl",
            &format!(
                "platforms \"linux/amd64\"\nstage s {{\n    from \"oci:base:1.35.0\"\n    run \"sleep 40; echo {marker}\"{timeout}\n}}\nimage s {{ stage s; }}\n"
            ),
        );
        let started = Instant::now();
        let output = run(
            &sandbox,
            "images.kdl",
            "store",
            "out",
            &["--remote-executor", &url, "--remote-required"],
        );
        let took = started.elapsed();
        eprintln!("{marker}: the build failed after {took:?}");
        assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
        assert!(took < Duration::from_secs(30), "the step ran {took:?}");
        let failure = events(&output)
            .into_iter()
            .find(|event| event["event"] == "failure")
            .expect("a failure event");
        assert!(
            failure["message"]
                .as_str()
                .unwrap_or_default()
                .contains("ran past its timeout of 3s"),
            "{failure}"
        );
        let failed = events(&output)
            .into_iter()
            .find(|event| event["event"] == "step" && event["status"] == "failed")
            .expect("a failed step");
        assert_eq!(failed["ran_on"], "limited-worker", "{failed}");
        assert!(
            processes_with(marker).is_empty(),
            "{:?}",
            processes_with(marker)
        );
    }
    assert!(worker.log().contains("step ended"), "{}", worker.log());
}

#[test]
fn sigterm_to_the_client_cancels_its_remote_step_on_the_worker() {
    let Some((cluster, workers)) = cluster() else {
        return;
    };
    let sandbox = Sandbox::new();
    sandbox.busybox("base");
    let marker = "cancel-marker-on-the-worker";
    sandbox.write(
        "images.kdl",
        &format!(
            "platforms \"linux/amd64\"\nstage s {{\n    from \"oci:base:1.35.0\"\n    run \"sleep 120; echo {marker}\"\n}}\nimage s {{ stage s; }}\n"
        ),
    );
    let mut client = Command::new(bin())
        .args(["run", "images.kdl", "--output", "out", "--progress", "json"])
        .args(["--remote-executor", &cluster.url(""), "--remote-required"])
        .current_dir(sandbox.path())
        .env("GRAPHBUILD_CACHE_DIR", sandbox.path().join("store"))
        .env("GRAPHBUILD_REMOTE_QUEUE_TIMEOUT", QUEUE_TIMEOUT)
        .env("NO_COLOR", "1")
        .env_remove("SOURCE_DATE_EPOCH")
        .env_remove("GRAPHBUILD_CACHE")
        .env_remove("GRAPHBUILD_REMOTE_EXECUTOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("graphbuild starts");
    // The step's command runs in the worker's sandbox (on this machine, in these tests).
    let started = Instant::now();
    while processes_with(marker).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the step never started on the worker"
        );
        assert!(
            client.try_wait().expect("wait").is_none(),
            "the client exited before its step ran"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(client.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("signal the client");
    let signalled = Instant::now();
    let exit = loop {
        if let Some(status) = client.try_wait().expect("wait") {
            break status;
        }
        if signalled.elapsed() > Duration::from_secs(10) {
            let _ = client.kill();
            let _ = client.wait();
            panic!("the client ignored SIGTERM for 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // As a cancelled local build exits.
    assert_eq!(exit.code(), Some(130), "{exit}");
    // The cluster tells the worker at its next keepalive (every 2 s), which stops the step.
    while !processes_with(marker).is_empty() {
        assert!(
            signalled.elapsed() < Duration::from_secs(15),
            "the step still runs on the worker: {:?}\n{}",
            processes_with(marker),
            workers[0].log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "the worker's step stopped {:?} after SIGTERM to the client",
        signalled.elapsed()
    );
    workers[0].wait_for("cancelled by the server", 10);
    assert!(
        !sandbox.path().join("out/s").exists(),
        "an image was written"
    );
}

#[test]
fn a_failing_remote_step_fails_the_build_with_its_output() {
    let Some((cluster, _workers)) = cluster() else {
        return;
    };
    let sandbox = Sandbox::new();
    sandbox.busybox("base");
    sandbox.write(
        "images.kdl",
        "platforms \"linux/arm64\"\nstage s {\n    from \"oci:base:1.35.0\"\n    run \"echo remote-failure-marker; exit 7\"\n}\nimage s { stage s; }\n",
    );
    let output = run(
        &sandbox,
        "images.kdl",
        "store",
        "out",
        &["--remote-executor", &cluster.url("")],
    );
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let failure = events(&output)
        .into_iter()
        .find(|event| event["event"] == "failure")
        .expect("a failure event");
    let text = failure.to_string();
    assert!(text.contains("7"), "{text}");
    assert!(text.contains("remote-failure-marker"), "{text}");
    let step = events(&output)
        .into_iter()
        .find(|event| event["event"] == "step" && event["status"] == "failed")
        .expect("a failed step");
    assert_eq!(step["ran_on"], "arm64-worker", "{step}");
}

#[test]
fn a_worker_killed_mid_action_is_retried_by_the_cluster_on_another_worker() {
    let Some((cluster, _workers)) = cluster() else {
        return;
    };
    // The instance "team" has workers of its own: killing one disturbs no other test.
    let doomed = start_worker(cluster, "team", "linux/amd64", "doomed-worker");
    let sandbox = Sandbox::new();
    sandbox.busybox("base");
    sandbox.write(
        "images.kdl",
        "platforms \"linux/amd64\"\nstage s {\n    from \"oci:base:1.35.0\"\n    run \"sleep 4; echo survived > /result.txt\"\n}\nimage s { stage s; tags \"s:1\"; }\n",
    );
    let url = cluster.url("team");
    let client = {
        let sandbox_path = sandbox.path().to_path_buf();
        let url = url.clone();
        std::thread::spawn(move || {
            let mut command = Command::new(bin());
            command
                .args(["run", "images.kdl", "--output", "out", "--progress", "json"])
                .args(["--remote-executor", &url])
                .current_dir(&sandbox_path)
                .env("GRAPHBUILD_CACHE_DIR", sandbox_path.join("store"))
                .env("GRAPHBUILD_REMOTE_QUEUE_TIMEOUT", "120")
                .env("NO_COLOR", "1")
                .env_remove("SOURCE_DATE_EPOCH");
            command.output().expect("graphbuild runs")
        })
    };
    doomed.wait_for("executing", 60);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(doomed.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the worker");
    // BuildGrid notices the silence after its keepalive timeout and queues the job again.
    let _rescuer = start_worker(cluster, "team", "linux/amd64", "rescuer-worker");
    let output = client.join().expect("the client thread");
    assert_success(&output);
    let steps = executed_steps(&output);
    let run_step = steps
        .iter()
        .find(|(_, _, step, _)| step.starts_with("RUN"))
        .expect("the run step executed");
    assert_eq!(run_step.3, "rescuer-worker", "{steps:?}");
    let root = unpack_platform(
        &sandbox.path().join("out/s"),
        "1",
        "linux/amd64",
        &sandbox.path().join("unpacked"),
    );
    assert_eq!(
        std::fs::read_to_string(root.join("result.txt")).unwrap(),
        "survived\n"
    );
    // The same image as a local build.
    let local = run(&sandbox, "images.kdl", "store-local", "out-local", &[]);
    assert_success(&local);
    assert_eq!(index_digest(&output), index_digest(&local));
}

#[test]
fn an_unreachable_executor_warns_once_and_builds_here_or_fails_when_required() {
    if !root_and_qemu() {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.example("basic");
    let file = "examples/basic/images.kdl";
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let url = format!("grpc://127.0.0.1:{port}");
    let platform = ["--platform", "linux/amd64"];

    let degraded = run(
        &sandbox,
        file,
        "store-a",
        "out-a",
        &[&platform[..], &["--remote-executor", &url]].concat(),
    );
    assert_success(&degraded);
    let found = warnings(&degraded);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].contains("remote executor") && found[0].contains(&url),
        "{}",
        found[0]
    );
    let steps = executed_steps(&degraded);
    assert!(!steps.is_empty());
    assert!(steps.iter().all(|step| step.3 == "local"), "{steps:?}");
    let local = run(&sandbox, file, "store-b", "out-b", &platform);
    assert_eq!(index_digest(&degraded), index_digest(&local));

    let required = run(
        &sandbox,
        file,
        "store-c",
        "out-c",
        &[
            &platform[..],
            &["--remote-executor", &url, "--remote-required"],
        ]
        .concat(),
    );
    assert_eq!(required.status.code(), Some(1), "{}", stderr(&required));
    let failure = events(&required)
        .into_iter()
        .find(|event| event["event"] == "failure")
        .expect("a failure event")
        .to_string();
    assert!(failure.contains("--remote-required"), "{failure}");
    assert!(!sandbox.path().join("out-c/basic/index.json").exists());
}

/// A blob of an OCI layout, as JSON.
fn layout_json(layout: &Path, digest: &str) -> serde_json::Value {
    let hex = digest.trim_start_matches("sha256:");
    serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap()).unwrap()
}

/// The manifest of `architecture` in a layout's first index.
fn manifest_of(layout: &Path, architecture: &str) -> serde_json::Value {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let image_index = layout_json(layout, index["manifests"][0]["digest"].as_str().unwrap());
    let entry = image_index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|manifest| manifest["platform"]["architecture"] == architecture)
        .expect("the platform's manifest")
        .clone();
    layout_json(layout, entry["digest"].as_str().unwrap())
}

/// An input root as a generic REAPI worker would lay it out for a step on the busybox fixture
/// at `base/`: the base's layer blob under `layers/0000`; and the `step.json` (to be written)
/// of a step writing `/generic.txt`.
fn input_root(sandbox: &Sandbox) -> (PathBuf, serde_json::Value) {
    let base = sandbox.path().join("base");
    let manifest = manifest_of(&base, "amd64");
    let config = layout_json(&base, manifest["config"]["digest"].as_str().unwrap());
    let layer = &manifest["layers"][0];
    let root = sandbox.path().join("input-root");
    std::fs::create_dir_all(root.join("layers")).unwrap();
    std::fs::copy(
        base.join("blobs/sha256").join(
            layer["digest"]
                .as_str()
                .unwrap()
                .trim_start_matches("sha256:"),
        ),
        root.join("layers/0000"),
    )
    .unwrap();
    let step = serde_json::json!({
        "format": "graphbuild remote step v1",
        "platform": "linux/amd64",
        "task": {
            "argv": ["/bin/sh", "-c", "echo generic > /generic.txt"],
            "env": [["PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]],
            "cwd": "/",
            "user": "",
            "cache_mounts": [],
            "secret_files": [],
            "network": "None",
            "hostname": "graphbuild"
        },
        "layers": [{
            "digest": layer["digest"],
            "diff_id": config["rootfs"]["diff_ids"][0],
            "size": layer["size"],
            "media_type": layer["mediaType"]
        }],
        "source_date_epoch": 0,
        "compression": "gzip"
    });
    (root, step)
}

#[test]
fn any_reapi_worker_runs_a_step_with_graphbuild_worker_step_over_the_input_root() {
    if !root_and_qemu() {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.busybox("base");
    sandbox.write(
        "images.kdl",
        "platforms \"linux/amd64\"\nstage s {\n    from \"oci:base:1.35.0\"\n    run \"echo generic > /generic.txt\"\n}\nimage s { stage s; }\n",
    );
    let local = run(&sandbox, "images.kdl", "store-local", "out-local", &[]);
    assert_success(&local);
    let built = sandbox.path().join("out-local/s");
    let local_layer = manifest_of(&built, "amd64")["layers"][1]["digest"]
        .as_str()
        .unwrap()
        .to_string();

    let (root, step) = input_root(&sandbox);
    std::fs::write(root.join("step.json"), step.to_string()).unwrap();
    let output = Command::new(bin())
        .args(["worker-step", "step.json"])
        .current_dir(&root)
        .env("GRAPHBUILD_CACHE_DIR", sandbox.path().join("worker-store"))
        .env("NO_COLOR", "1")
        .output()
        .expect("graphbuild worker-step runs");
    assert_success(&output);
    let outcome: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("graphbuild/outcome.json")).unwrap())
            .unwrap();
    assert_eq!(outcome["status"]["Exited"], 0, "{outcome}");
    // The same layer, byte for byte, as the local build's step.
    assert_eq!(
        outcome["layer"]["digest"],
        local_layer.as_str(),
        "{outcome}"
    );
    assert_eq!(
        std::fs::read(root.join("graphbuild/layers/0")).unwrap(),
        std::fs::read(
            built
                .join("blobs/sha256")
                .join(local_layer.trim_start_matches("sha256:"))
        )
        .unwrap()
    );

    // A step that asks for a host path is refused before anything runs.
    let mut hostile = step.clone();
    hostile["task"]["bind_mounts"] = serde_json::json!([["/etc", "/host-etc", true]]);
    std::fs::write(root.join("step.json"), hostile.to_string()).unwrap();
    let refused = Command::new(bin())
        .args(["worker-step", "step.json"])
        .current_dir(&root)
        .env("GRAPHBUILD_CACHE_DIR", sandbox.path().join("worker-store"))
        .env("NO_COLOR", "1")
        .output()
        .expect("graphbuild worker-step runs");
    assert_eq!(refused.status.code(), Some(3), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("may not mount host paths"),
        "{}",
        stderr(&refused)
    );
}

/// A hostile client or cluster names host paths through the two mounts the sandbox gained
/// beside cache, bind and secret mounts: a stage bind's lower directories and an ssh agent
/// socket. The worker refuses both before anything runs, and nothing of the host's file
/// reaches an output.
#[test]
fn a_worker_step_refuses_host_paths_in_stage_binds_and_ssh_sockets() {
    if !root_and_qemu() {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.busybox("base");
    let host_dir = sandbox.path().join("worker-host");
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::write(host_dir.join("secret.txt"), "worker-host-secret\n").unwrap();
    let (root, step) = input_root(&sandbox);
    let mut through_bind = step.clone();
    through_bind["task"]["argv"] =
        serde_json::json!(["/bin/sh", "-c", "cat /mnt/secret.txt > /leak.txt"]);
    through_bind["task"]["stage_binds"] = serde_json::json!([{
        "lowerdirs": [host_dir],
        "source": "/",
        "target": "/mnt",
        "readwrite": false
    }]);
    let mut through_ssh = step.clone();
    through_ssh["task"]["argv"] =
        serde_json::json!(["/bin/sh", "-c", "cat /run/agent.sock > /leak.txt"]);
    through_ssh["task"]["ssh_sockets"] =
        serde_json::json!([[host_dir.join("secret.txt"), "/run/agent.sock"]]);
    for (what, hostile) in [("stage bind", through_bind), ("ssh socket", through_ssh)] {
        let _ = std::fs::remove_dir_all(root.join("graphbuild"));
        std::fs::write(root.join("step.json"), hostile.to_string()).unwrap();
        let refused = Command::new(bin())
            .args(["worker-step", "step.json"])
            .current_dir(&root)
            .env("GRAPHBUILD_CACHE_DIR", sandbox.path().join("worker-store"))
            .env("NO_COLOR", "1")
            .output()
            .expect("graphbuild worker-step runs");
        assert_eq!(
            refused.status.code(),
            Some(3),
            "{what}: {}{}",
            stdout(&refused),
            stderr(&refused)
        );
        assert!(
            stderr(&refused).contains("may not mount host paths"),
            "{what}: {}",
            stderr(&refused)
        );
        assert!(
            !root.join("graphbuild/outcome.json").exists(),
            "{what}: nothing ran"
        );
    }
}

/// A step binding another stage's filesystem names this machine's snapshots of its layers,
/// and a step with an ssh agent this machine's agent socket: neither may go to a worker. They
/// run here, even with `--remote-required`, while the stage bound runs on the worker.
#[test]
fn steps_with_a_stage_bind_or_an_ssh_agent_run_here() {
    let Some((cluster, _workers)) = cluster() else {
        return;
    };
    if !prerequisite(
        Command::new("ssh-keygen").arg("-?").output().is_ok(),
        "ssh-keygen and ssh-agent (package openssh-client)",
    ) {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.busybox("base");
    let key = sandbox.path().join("deploy-key");
    let keygen = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .output()
        .expect("ssh-keygen runs");
    assert!(keygen.status.success(), "{}", stderr(&keygen));
    sandbox.write(
        "images.kdl",
        "platforms \"linux/amd64\"\nstage tools {\n    from \"oci:base:1.35.0\"\n    run \"echo from-tools > /tool.txt\"\n}\nstage s {\n    from \"oci:base:1.35.0\"\n    run \"cp /t/tool.txt /copied.txt\" {\n        bind \"/t\" from=\"tools\" source=\"/\"\n    }\n    run \"test -S /run/buildkit/ssh_agent.0 && echo agent > /agent.txt\" {\n        ssh\n    }\n}\nimage s { stage s; tags \"s:1\"; }\n",
    );
    let url = cluster.url("");
    let ssh = format!("default={}", key.display());
    let output = run(
        &sandbox,
        "images.kdl",
        "store",
        "out",
        &[
            "--remote-executor",
            &url,
            "--remote-required",
            "--ssh",
            &ssh,
        ],
    );
    assert_success(&output);
    let runs: Vec<(String, String)> = executed_steps(&output)
        .into_iter()
        .filter(|(_, _, step, _)| step.starts_with("RUN"))
        .map(|(stage, _, _, ran_on)| (stage, ran_on))
        .collect();
    assert_eq!(
        runs,
        [
            ("tools".to_string(), "amd64-worker".to_string()),
            ("s".to_string(), "local".to_string()),
            ("s".to_string(), "local".to_string())
        ],
        "{}",
        stderr(&output)
    );
    let root = unpack_platform(
        &sandbox.path().join("out/s"),
        "1",
        "linux/amd64",
        &sandbox.path().join("unpacked"),
    );
    assert_eq!(
        std::fs::read_to_string(root.join("copied.txt")).unwrap(),
        "from-tools\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("agent.txt")).unwrap(),
        "agent\n"
    );
}

#[test]
fn a_corrupt_remote_result_is_refused_and_the_step_runs_here() {
    let Some((cluster, _workers)) = cluster() else {
        return;
    };
    let sandbox = Sandbox::new();
    sandbox.busybox("base");
    sandbox.write(
        "images.kdl",
        "platforms \"linux/amd64\"\nstage s {\n    from \"oci:base:1.35.0\"\n    run \"echo corrupt-me > /corrupt.txt\"\n}\nimage s { stage s; }\n",
    );
    let url = cluster.url("");
    let first = run(
        &sandbox,
        "images.kdl",
        "store-a",
        "out-a",
        &["--remote-executor", &url],
    );
    assert_success(&first);
    let steps = executed_steps(&first);
    assert!(
        steps.iter().any(|step| step.3 == "amd64-worker"),
        "{steps:?}"
    );
    // The layer the worker made, as BuildGrid's disk storage holds it, is changed.
    let layer = manifest_of(&sandbox.path().join("out-a/s"), "amd64")["layers"][1]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let stored = cluster
        .data
        .join("cas/cas/objects")
        .join(&layer[..2])
        .join(&layer[2..]);
    let mut bytes = std::fs::read(&stored).expect("the layer is in BuildGrid's CAS");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&stored, &bytes).unwrap();

    // A clean client: the cluster answers from its action cache with that layer, which does
    // not match its digest: one warning, the step runs here, and the image is still right.
    let second = run(
        &sandbox,
        "images.kdl",
        "store-b",
        "out-b",
        &["--remote-executor", &url],
    );
    assert_success(&second);
    let found = warnings(&second);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains(&layer[..12]), "{}", found[0]);
    let steps = executed_steps(&second);
    assert!(steps.iter().all(|step| step.3 == "local"), "{steps:?}");
    assert_eq!(index_digest(&second), index_digest(&first));

    // Required: the step fails, naming the digest, and no image is written.
    let third = run(
        &sandbox,
        "images.kdl",
        "store-c",
        "out-c",
        &["--remote-executor", &url, "--remote-required"],
    );
    assert_eq!(third.status.code(), Some(1), "{}", stderr(&third));
    assert!(stderr(&third).contains(&layer[..12]), "{}", stderr(&third));
    assert!(!sandbox.path().join("out-c/s/index.json").exists());
    // Nothing unverified landed in the client's store.
    assert!(
        !sandbox
            .path()
            .join("store-c/blobs/sha256")
            .join(&layer)
            .exists()
    );
}

#[test]
fn a_dockerfile_build_executes_remotely_too() {
    let Some((cluster, _workers)) = cluster() else {
        return;
    };
    let sandbox = Sandbox::new();
    sandbox.busybox("base");
    sandbox.write(
        "app/Dockerfile",
        "FROM oci:../base:1.35.0\nRUN uname -m > /arch.txt && echo dockerfile-remote > /marker.txt\n",
    );
    let build = |store: &str, extra: &[&str]| {
        let mut command = Command::new(bin());
        command
            .args(["build", "--platform", "linux/amd64,linux/arm64"])
            .args(["--progress", "json", "-o", "type=oci,dest=image.tar"])
            .args(extra)
            .arg("app")
            .current_dir(sandbox.path())
            .env("GRAPHBUILD_CACHE_DIR", sandbox.path().join(store))
            .env("GRAPHBUILD_REMOTE_QUEUE_TIMEOUT", QUEUE_TIMEOUT)
            .env("NO_COLOR", "1")
            .env_remove("SOURCE_DATE_EPOCH");
        command.output().expect("graphbuild runs")
    };
    let remote = build("store-remote", &["--remote-executor", &cluster.url("")]);
    assert_success(&remote);
    assert!(warnings(&remote).is_empty(), "{:?}", warnings(&remote));
    let mut ran: Vec<(String, String)> = executed_steps(&remote)
        .into_iter()
        .map(|(_, platform, _, ran_on)| (platform, ran_on))
        .collect();
    ran.sort();
    assert_eq!(
        ran,
        vec![
            ("linux/amd64".to_string(), "amd64-worker".to_string()),
            ("linux/arm64".to_string(), "arm64-worker".to_string())
        ]
    );
    let local = build("store-local", &[]);
    assert_success(&local);
    assert_eq!(index_digest(&remote), index_digest(&local));
}

#[test]
fn the_clusters_action_cache_answers_a_step_again_unless_no_cache() {
    let Some((cluster, _workers)) = cluster() else {
        return;
    };
    // A worker of its own, on the instance "team": what it executes is this test's alone.
    let worker = start_worker(cluster, "team", "linux/arm64", "team-arm64-worker");
    let executions = || worker.log().matches(": executing").count();
    let sandbox = Sandbox::new();
    sandbox.busybox("base");
    sandbox.write(
        "images.kdl",
        "platforms \"linux/arm64\"\nstage s {\n    from \"oci:base:1.35.0\"\n    run \"echo once > /once.txt\"\n}\nimage s { stage s; }\n",
    );
    let url = cluster.url("team");
    let ran_on_worker = |output: &Output| {
        let steps = executed_steps(output);
        assert_eq!(steps.len(), 1, "{steps:?}");
        assert_eq!(steps[0].3, "team-arm64-worker", "{steps:?}");
    };
    let first = run(
        &sandbox,
        "images.kdl",
        "store-a",
        "out-a",
        &["--remote-executor", &url],
    );
    assert_success(&first);
    ran_on_worker(&first);
    assert_eq!(executions(), 1, "{}", worker.log());
    // A clean client without a cache of its own: the cluster answers from its action cache,
    // naming the worker that executed the step; the worker executes nothing.
    let second = run(
        &sandbox,
        "images.kdl",
        "store-b",
        "out-b",
        &["--remote-executor", &url],
    );
    assert_success(&second);
    ran_on_worker(&second);
    assert_eq!(executions(), 1, "{}", worker.log());
    assert_eq!(index_digest(&second), index_digest(&first));
    // --no-cache: executed again.
    let third = run(
        &sandbox,
        "images.kdl",
        "store-c",
        "out-c",
        &["--remote-executor", &url, "--no-cache"],
    );
    assert_success(&third);
    ran_on_worker(&third);
    assert_eq!(executions(), 2, "{}", worker.log());
    assert_eq!(index_digest(&third), index_digest(&first));
}
