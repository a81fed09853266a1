//! Real sandbox runs on the busybox fixture (needs root, and qemu-user for foreign CPUs:
//! skipped with a message otherwise, failed under `CI=true`; see `common`).
//!
//! The sandbox child is the `sandbox-child` example, which `cargo test` builds next to the
//! test binaries.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use graphbuild_engine::binfmt::{BINFMT_MISC_DIR, check_emulation};
use graphbuild_engine::sandbox::{
    CopyTask, CopyTaskSource, ExitStatusKind, NetworkMode, RunTask, SandboxError, SandboxOutcome,
    SandboxSpec, Stream, Task, run_sandbox, run_sandbox_streams,
};
use graphbuild_lang::platform::Platform;

const PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

mod common;
use common::{prerequisite, require_root};

fn is_root() -> bool {
    require_root("the sandbox")
}

fn sandbox_exe() -> PathBuf {
    let test_exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/sandbox_run-… → target/debug/examples/sandbox-child
    let exe = test_exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("examples/sandbox-child");
    assert!(
        exe.exists(),
        "{} is missing: run `cargo build -p graphbuild-engine --example sandbox-child`",
        exe.display()
    );
    exe
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/busybox")
}

fn read_json(path: &Path) -> serde_json::Value {
    let bytes = fs::read(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    serde_json::from_slice(&bytes).expect("json")
}

fn blob(digest: &serde_json::Value) -> PathBuf {
    let digest = digest.as_str().expect("digest string");
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    fixture().join("blobs/sha256").join(hex)
}

/// Extracts the busybox image for `architecture` (and `variant`) into a new directory.
fn busybox_rootfs(architecture: &str, variant: Option<&str>) -> tempfile::TempDir {
    let index = read_json(&fixture().join("index.json"));
    let nested = read_json(&blob(&index["manifests"][0]["digest"]));
    let manifests = nested["manifests"].as_array().expect("manifests");
    let descriptor = manifests
        .iter()
        .find(|descriptor| {
            descriptor["platform"]["architecture"] == architecture
                && descriptor["platform"]["variant"].as_str() == variant
        })
        .unwrap_or_else(|| panic!("no busybox manifest for {architecture} {variant:?}"));
    let manifest = read_json(&blob(&descriptor["digest"]));
    let rootfs = tempfile::Builder::new()
        .prefix("busybox-rootfs-")
        .tempdir()
        .expect("tempdir");
    for layer in manifest["layers"].as_array().expect("layers") {
        let status = std::process::Command::new("tar")
            .arg("xzf")
            .arg(blob(&layer["digest"]))
            .arg("-C")
            .arg(rootfs.path())
            .status()
            .expect("run tar");
        assert!(status.success(), "tar failed");
    }
    rootfs
}

/// An upper and a work directory on one filesystem.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix("sandbox-test-")
            .tempdir()
            .expect("tempdir");
        fs::create_dir(dir.path().join("upper")).expect("mkdir upper");
        fs::create_dir(dir.path().join("work")).expect("mkdir work");
        Scratch { dir }
    }
    fn upper(&self) -> PathBuf {
        self.dir.path().join("upper")
    }
    fn spec(&self, lowerdirs: Vec<PathBuf>, run: RunTask) -> SandboxSpec {
        SandboxSpec {
            lowerdirs,
            upperdir: self.upper(),
            overlay_workdir: self.dir.path().join("work"),
            overlay: graphbuild_engine::sandbox::overlay::Overlay::Native,
            task: Task::Run(run),
        }
    }
}

fn shell(script: &str) -> RunTask {
    RunTask {
        argv: vec!["sh".to_string(), "-c".to_string(), script.to_string()],
        env: vec![("PATH".to_string(), PATH.to_string())],
        cwd: "/".to_string(),
        user: String::new(),
        cache_mounts: vec![],
        tmpfs_mounts: vec![],
        bind_mounts: vec![],
        ssh_sockets: vec![],
        stage_binds: vec![],
        script: None,
        secret_files: vec![],
        network: NetworkMode::Host,
        hostname: String::new(),
        timeout_ms: None,
        max_processes: None,
        insecure: false,
        separate_stderr: false,
    }
}

fn run(spec: &SandboxSpec) -> (Result<SandboxOutcome, SandboxError>, Vec<String>) {
    let mut lines = Vec::new();
    let result = run_sandbox(&sandbox_exe(), spec, &mut |line| {
        lines.push(line.to_string())
    });
    (result, lines)
}

fn run_ok(spec: &SandboxSpec) -> Vec<String> {
    let (result, lines) = run(spec);
    let outcome =
        result.unwrap_or_else(|error| panic!("sandbox failed: {error}; output {lines:?}"));
    assert_eq!(
        outcome.status,
        ExitStatusKind::Exited(0),
        "output: {lines:?}"
    );
    lines
}

/// Every path in `upper`, relative, sorted.
fn upper_entries(upper: &Path) -> Vec<String> {
    let mut entries = Vec::new();
    let mut pending = vec![upper.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).expect("read upper") {
            let entry = entry.expect("entry");
            let path = entry.path();
            let relative = path.strip_prefix(upper).expect("inside upper");
            entries.push(relative.display().to_string());
            if entry.file_type().expect("type").is_dir() {
                pending.push(path);
            }
        }
    }
    entries.sort();
    entries
}

#[test]
fn runs_a_command_with_env_user_and_workdir() {
    if !is_root() {
        return;
    }
    let rootfs = busybox_rootfs("amd64", None);
    let scratch = Scratch::new();
    let mut task = shell("uname -m; echo $FOO; id -u; pwd; hostname");
    task.env.push(("FOO".to_string(), "bar baz".to_string()));
    task.user = "65532".to_string();
    task.cwd = "/work/dir".to_string();
    task.hostname = "builder".to_string();
    let lines = run_ok(&scratch.spec(vec![rootfs.path().to_path_buf()], task));
    assert_eq!(
        lines,
        ["x86_64", "bar baz", "65532", "/work/dir", "builder"]
    );
    // The working directory is created like Docker's WORKDIR, and is the only change.
    assert_eq!(upper_entries(&scratch.upper()), ["work", "work/dir"]);
}

fn run_foreign(architecture: &str, variant: Option<&str>, expected_machine: &str) {
    if !is_root() {
        return;
    }
    let target = Platform {
        os: "linux".to_string(),
        architecture: architecture.to_string(),
        variant: variant.map(str::to_string),
    };
    if let Err(error) = check_emulation(Path::new(BINFMT_MISC_DIR), &target, &Platform::host()) {
        prerequisite(false, format_args!("{target} needs an emulator: {error}"));
        return;
    }
    let rootfs = busybox_rootfs(architecture, variant);
    let scratch = Scratch::new();
    let lines = run_ok(&scratch.spec(vec![rootfs.path().to_path_buf()], shell("uname -m")));
    assert_eq!(lines, [expected_machine]);
}

#[test]
fn runs_arm64_binaries_through_qemu() {
    run_foreign("arm64", None, "aarch64");
}

#[test]
fn runs_arm_v7_binaries_through_qemu() {
    run_foreign("arm", Some("v7"), "armv7l");
}

#[test]
fn upper_holds_only_the_commands_changes() {
    if !is_root() {
        return;
    }
    let rootfs = busybox_rootfs("amd64", None);
    let scratch = Scratch::new();
    let host = tempfile::tempdir().expect("tempdir");
    let cache = host.path().join("cache");
    let secret = host.path().join("token");
    fs::write(&secret, "s3cret\n").expect("write secret");

    let mut task = shell(
        "echo hi > /hello && rm /bin/true && echo cached > /var/cache/thing/file \
         && cat /run/secrets/token && ls /proc/self > /dev/null && echo x > /dev/null \
         && if echo leak > /run/secrets/token; then echo writable; fi",
    );
    task.cache_mounts = vec![(cache.clone(), "/var/cache/thing".to_string())];
    task.secret_files = vec![(secret.clone(), "/run/secrets/token".to_string())];
    let lines = run_ok(&scratch.spec(vec![rootfs.path().to_path_buf()], task));
    assert!(lines.contains(&"s3cret".to_string()), "{lines:?}");
    assert!(
        !lines.contains(&"writable".to_string()),
        "secret was writable: {lines:?}"
    );
    assert_eq!(fs::read_to_string(&secret).expect("secret"), "s3cret\n");

    let upper = scratch.upper();
    assert_eq!(upper_entries(&upper), ["bin", "bin/true", "hello"]);
    assert_eq!(
        fs::read_to_string(upper.join("hello")).expect("hello"),
        "hi\n"
    );
    let whiteout = fs::symlink_metadata(upper.join("bin/true")).expect("whiteout");
    assert!(
        whiteout.file_type().is_char_device(),
        "bin/true is not a whiteout"
    );
    assert_eq!(whiteout.rdev(), 0, "a whiteout is the device 0/0");
    assert_eq!(
        fs::read_to_string(cache.join("file")).expect("cache file"),
        "cached\n"
    );
}

#[test]
fn cache_mounts_persist_across_runs_and_stay_out_of_the_upper_dir() {
    if !is_root() {
        return;
    }
    let rootfs = busybox_rootfs("amd64", None);
    let host = tempfile::tempdir().expect("tempdir");
    let cache = host.path().join("cache");
    let mut counts = Vec::new();
    for _ in 0..2 {
        let scratch = Scratch::new();
        let mut task = shell("echo run >> /root/.cache/runs; wc -l < /root/.cache/runs");
        task.cache_mounts = vec![(cache.clone(), "/root/.cache".to_string())];
        let lines = run_ok(&scratch.spec(vec![rootfs.path().to_path_buf()], task));
        counts.push(lines.join(" ").trim().to_string());
        assert_eq!(upper_entries(&scratch.upper()), Vec::<String>::new());
    }
    assert_eq!(counts, ["1", "2"]);
}

#[test]
fn network_none_has_only_loopback() {
    if !is_root() {
        return;
    }
    let rootfs = busybox_rootfs("amd64", None);
    let scratch = Scratch::new();
    let mut task = shell("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '");
    task.network = NetworkMode::None;
    let lines = run_ok(&scratch.spec(vec![rootfs.path().to_path_buf()], task));
    assert_eq!(lines, ["lo"]);
}

#[test]
fn exit_codes_and_output_tail_are_reported() {
    if !is_root() {
        return;
    }
    let rootfs = busybox_rootfs("amd64", None);
    let scratch = Scratch::new();
    let task = shell("for i in $(seq 1 30); do echo line $i; done; echo oops >&2; exit 3");
    let (result, lines) = run(&scratch.spec(vec![rootfs.path().to_path_buf()], task));
    let outcome = result.expect("sandbox ran");
    assert_eq!(outcome.status, ExitStatusKind::Exited(3));
    assert_eq!(lines.len(), 31);
    assert_eq!(outcome.tail.len(), 20);
    assert_eq!(outcome.tail.first().map(String::as_str), Some("line 12"));
    assert_eq!(outcome.tail.last().map(String::as_str), Some("oops"));
}

#[test]
fn stderr_can_be_a_stream_of_its_own() {
    if !is_root() {
        return;
    }
    let rootfs = busybox_rootfs("amd64", None);
    let scratch = Scratch::new();
    // Descriptor 3 carries stderr to the engine, but the command never sees it; a background
    // process holding stderr still dies with the command.
    let mut task = shell(
        "echo out; echo err >&2; [ -e /proc/self/fd/3 ] && echo fd3-leaked; sleep 60 >&2 & exit 4",
    );
    task.separate_stderr = true;
    let mut lines = Vec::new();
    let started = Instant::now();
    let outcome = run_sandbox_streams(
        &sandbox_exe(),
        &scratch.spec(vec![rootfs.path().to_path_buf()], task),
        &mut |stream, line| lines.push((stream, line.to_string())),
    )
    .expect("sandbox ran");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(outcome.status, ExitStatusKind::Exited(4));
    lines.sort_by_key(|(stream, _)| *stream == Stream::Stderr);
    assert_eq!(
        lines,
        [
            (Stream::Stdout, "out".to_string()),
            (Stream::Stderr, "err".to_string())
        ]
    );
    // Without it, both are one stream, as for every `run` step.
    let (result, lines) = run(&scratch.spec(
        vec![rootfs.path().to_path_buf()],
        shell("echo out; echo err >&2"),
    ));
    assert!(result.expect("sandbox ran").status.success());
    assert_eq!(lines, ["out", "err"]);
}

#[test]
fn a_missing_command_is_a_clear_error() {
    if !is_root() {
        return;
    }
    let rootfs = busybox_rootfs("amd64", None);
    let scratch = Scratch::new();
    let mut task = shell("");
    task.argv = vec!["no-such-tool".to_string(), "--version".to_string()];
    let (result, _) = run(&scratch.spec(vec![rootfs.path().to_path_buf()], task));
    let error = result.expect_err("not found");
    assert!(
        matches!(error, SandboxError::ExecNotFound { .. }),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        format!("exec: \"no-such-tool\": not found in PATH {PATH}")
    );
}

#[test]
fn setup_failures_are_distinct_errors() {
    if !is_root() {
        return;
    }
    let rootfs = busybox_rootfs("amd64", None);
    let scratch = Scratch::new();
    let mut task = shell("true");
    task.user = "nobody".to_string();
    let (result, _) = run(&scratch.spec(vec![rootfs.path().to_path_buf()], task));
    let error = result.expect_err("unknown user");
    assert!(
        matches!(&error, SandboxError::Setup { step, message }
            if step == "resolve the user" && message.contains("unable to find user nobody")),
        "{error:?}"
    );

    let (result, _) = run(&scratch.spec(vec![PathBuf::from("/nonexistent/layer")], shell("true")));
    assert!(
        matches!(result, Err(SandboxError::Setup { .. })),
        "{result:?}"
    );

    let missing_exe = run_sandbox(
        Path::new("/nonexistent/graphbuild"),
        &scratch.spec(vec![], shell("true")),
        &mut |_| {},
    );
    assert!(
        matches!(missing_exe, Err(SandboxError::Spawn { .. })),
        "{missing_exe:?}"
    );
}

#[test]
fn background_processes_die_with_the_command() {
    if !is_root() {
        return;
    }
    let rootfs = busybox_rootfs("amd64", None);
    let scratch = Scratch::new();
    // The background sleep holds the output pipe: run_sandbox returns only once it is dead.
    let started = Instant::now();
    let lines = run_ok(&scratch.spec(
        vec![rootfs.path().to_path_buf()],
        shell("sleep 60 & echo started"),
    ));
    assert_eq!(lines, ["started"]);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the background process outlived the command"
    );
}

#[test]
fn scratch_root_and_multiple_layers() {
    if !is_root() {
        return;
    }
    let rootfs = busybox_rootfs("amd64", None);
    // A layer on top of busybox adding a file and deleting another (a whiteout).
    let top = tempfile::tempdir().expect("tempdir");
    fs::write(top.path().join("added"), "from the top layer\n").expect("write");
    fs::create_dir(top.path().join("bin")).expect("mkdir");
    let status = std::process::Command::new("mknod")
        .arg(top.path().join("bin/cat"))
        .args(["c", "0", "0"])
        .status()
        .expect("mknod");
    assert!(status.success());
    let scratch = Scratch::new();
    let lines = run_ok(&scratch.spec(
        vec![top.path().to_path_buf(), rootfs.path().to_path_buf()],
        shell("read line < /added; echo $line; test -e /bin/cat || echo no cat"),
    ));
    assert_eq!(lines, ["from the top layer", "no cat"]);

    // scratch: no layers at all; the static busybox comes through a cache mount.
    let scratch = Scratch::new();
    let mut task = shell("");
    task.argv = vec![
        "/tools/bin/busybox".to_string(),
        "echo".to_string(),
        "empty root".to_string(),
    ];
    task.cache_mounts = vec![(rootfs.path().to_path_buf(), "/tools".to_string())];
    let lines = run_ok(&scratch.spec(vec![], task));
    assert_eq!(lines, ["empty root"]);
    assert_eq!(upper_entries(&scratch.upper()), Vec::<String>::new());
}

/// A copy task crosses to the child as typed JSON: sources selected in a read-only view of
/// its layers, written onto the merged root with the requested owner, so only the copied file
/// (and its copied-up parent) reaches the upper directory; a source that matches nothing
/// fails the task with the copy's own message.
#[test]
fn copy_tasks_copy_from_layers_onto_the_merged_root() {
    if !is_root() {
        return;
    }
    let rootfs = busybox_rootfs("amd64", None);
    let source_layer = tempfile::tempdir().expect("tempdir");
    fs::write(source_layer.path().join("copied"), "copied\n").expect("write");
    let scratch = Scratch::new();
    let mut spec = scratch.spec(vec![rootfs.path().to_path_buf()], shell(""));
    let task = |sources: &[&str]| CopyTask {
        source: CopyTaskSource::Layers(vec![source_layer.path().to_path_buf()]),
        sources: sources.iter().map(|source| source.to_string()).collect(),
        items: Vec::new(),
        dest: "/etc/copied".into(),
        workdir: "/".into(),
        chown: Some("1234:5678".into()),
        chmod: None,
        exclude: Vec::new(),
        parents: false,
    };
    spec.task = Task::Copy(task(&["/copied"]));
    let lines = run_ok(&spec);
    assert!(lines.is_empty());
    assert_eq!(upper_entries(&scratch.upper()), ["etc", "etc/copied"]);
    let copied = scratch.upper().join("etc/copied");
    assert_eq!(fs::read_to_string(&copied).expect("read"), "copied\n");
    let metadata = fs::metadata(&copied).expect("stat");
    assert_eq!((metadata.uid(), metadata.gid()), (1234, 5678));

    spec.task = Task::Copy(task(&["/missing"]));
    let (result, _) = run(&spec);
    match result {
        Err(SandboxError::CopyFailed { message, help }) => {
            assert_eq!(message, "copy source `/missing` matches nothing");
            assert_eq!(
                help.as_deref(),
                Some("the path does not exist in the source stage's filesystem")
            );
        }
        other => panic!("expected a failed copy, got {other:?}"),
    }
}

/// Pids of processes running exactly `argv`.
fn processes_running(argv: &[&str]) -> Vec<u32> {
    let expected: Vec<u8> = argv
        .iter()
        .flat_map(|arg| [arg.as_bytes(), b"\0"].concat())
        .collect();
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse().ok())
        else {
            continue;
        };
        if fs::read(entry.path().join("cmdline")).is_ok_and(|cmdline| cmdline == expected) {
            pids.push(pid);
        }
    }
    pids
}

/// Children of `parent`, from /proc/*/stat.
fn children_of(parent: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid …; comm may contain spaces, so split after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|ppid| ppid.parse::<u32>().ok());
        if ppid == Some(parent) {
            pids.push(pid);
        }
    }
    pids
}

/// Starts `sandbox-child --run-spec` (a stand-in engine) running `script`, and waits until
/// the script printed `started`.
fn start_engine(
    script: &str,
    rootfs: &Path,
    scratch: &Scratch,
) -> (
    Engine,
    std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
) {
    use std::io::BufRead;
    let spec = scratch.spec(vec![rootfs.to_path_buf()], shell(script));
    let spec_path = scratch.dir.path().join("spec.json");
    fs::write(&spec_path, serde_json::to_vec(&spec).expect("spec json")).expect("write spec");
    let mut engine = std::process::Command::new(sandbox_exe())
        .arg("--run-spec")
        .arg(&spec_path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the engine stand-in");
    let stdout = engine.stdout.take().expect("stdout");
    let engine = Engine(engine);
    let mut lines = std::io::BufReader::new(stdout).lines();
    let first = lines.next().expect("a first line").expect("read");
    assert_eq!(first, "started");
    (engine, lines)
}

/// The engine stand-in, killed when a test ends early so no process is left behind.
struct Engine(std::process::Child);

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn killing_the_engine_leaves_no_sandbox_process() {
    if !is_root() {
        return;
    }
    let rootfs = busybox_rootfs("amd64", None);
    let scratch = Scratch::new();
    let (mut engine, _lines) =
        start_engine("sleep 987651 & echo started; wait", rootfs.path(), &scratch);
    let supervisors = children_of(engine.0.id());
    assert_eq!(supervisors.len(), 1, "one supervisor process");
    // `echo started` may run before the background shell has exec'd `sleep`.
    wait_until("the sandboxed sleep runs", || {
        processes_running(&["sleep", "987651"]).len() == 1
    });

    engine.0.kill().expect("SIGKILL the engine");
    engine.0.wait().expect("reap the engine");
    wait_until("the sandboxed processes are gone", || {
        processes_running(&["sleep", "987651"]).is_empty()
            && !Path::new(&format!("/proc/{}", supervisors[0])).exists()
    });
}

#[test]
fn sigterm_to_the_supervisor_reaches_the_command() {
    if !is_root() {
        return;
    }
    let rootfs = busybox_rootfs("amd64", None);
    let scratch = Scratch::new();
    let (mut engine, lines) = start_engine(
        "trap 'echo got TERM; exit 143' TERM; echo started; sleep 987652 & wait",
        rootfs.path(),
        &scratch,
    );
    let supervisors = children_of(engine.0.id());
    assert_eq!(supervisors.len(), 1, "one supervisor process");
    // SAFETY: kill(2) on the supervisor we just found.
    unsafe { libc::kill(supervisors[0] as i32, libc::SIGTERM) };
    let rest: Vec<String> = lines.map(|line| line.expect("read")).collect();
    engine.0.wait().expect("reap the engine");
    assert_eq!(
        rest.first().map(String::as_str),
        Some("got TERM"),
        "{rest:?}"
    );
    let outcome = rest.last().expect("an outcome line");
    assert!(outcome.contains("status: Exited(143)"), "{outcome}");
    assert!(
        processes_running(&["sleep", "987652"]).is_empty(),
        "the background sleep died with PID 1"
    );
}

#[test]
fn mount_point_parents_keep_the_image_attributes() {
    if !is_root() {
        return;
    }
    let rootfs = busybox_rootfs("amd64", None);
    let top = tempfile::tempdir().expect("tempdir");
    let data = top.path().join("data");
    fs::create_dir(&data).expect("mkdir");
    fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o1777))
        .expect("chmod");
    std::os::unix::fs::chown(&data, Some(7), Some(8)).expect("chown");
    let times = fs::FileTimes::new()
        .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(12345))
        .set_accessed(std::time::UNIX_EPOCH + Duration::from_secs(12345));
    fs::File::open(&data)
        .expect("open")
        .set_times(times)
        .expect("set times");

    let host = tempfile::tempdir().expect("tempdir");
    fs::write(host.path().join("secret"), "x").expect("write");
    let scratch = Scratch::new();
    let mut task = shell("stat -c '%a %u %g %Y' /data; ls -a /data | tr '\\n' ' '");
    task.cache_mounts = vec![(host.path().join("cache"), "/data/cache".to_string())];
    task.secret_files = vec![(host.path().join("secret"), "/data/deep/secret".to_string())];
    let lines = run_ok(&scratch.spec(
        vec![top.path().to_path_buf(), rootfs.path().to_path_buf()],
        task,
    ));
    assert_eq!(lines[0], "1777 7 8 12345", "{lines:?}");
    assert_eq!(lines[1].trim(), ". .. cache deep", "{lines:?}");
    assert_eq!(upper_entries(&scratch.upper()), Vec::<String>::new());
}
