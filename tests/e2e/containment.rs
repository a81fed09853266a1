//! Containment end to end (issue 10): real attacks from a `run` step, as root, each failing
//! if the host is touched; the limits (process count, timeout); `insecure=#true`; and
//! ordinary builds (chown, setuid files, `su`, foreign CPUs) that must keep working.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BASE: &str = "oci:tests/fixtures/busybox:1.35.0";

/// Docker's default capability set, as `/proc/self/status` shows it.
const DOCKER_CAPS: &str = "00000000a80425fb";

fn root() -> bool {
    prerequisite(
        nix::unistd::geteuid().is_root(),
        "the containment tests need root (builds run in namespaces on overlayfs)",
    )
}

/// One stage on the busybox base running `steps` (KDL lines), for linux/amd64.
fn build_file(steps: &str) -> String {
    format!(
        "platforms \"linux/amd64\"\nstage s {{\n    from \"{BASE}\"\n{steps}\n}}\nimage s {{\n    stage s\n    tags \"t:1\"\n}}\n"
    )
}

/// A KDL string literal.
fn kdl(text: &str) -> String {
    serde_json::to_string(text).expect("string")
}

fn run_step(sandbox: &Sandbox, script: &str, extra: &str) -> Output {
    sandbox.write(
        "b.kdl",
        &build_file(&format!("    run {} {extra}", kdl(script))),
    );
    sandbox.graphbuild(&["run", "b.kdl", "--progress", "plain", "--output", "out"])
}

fn all_output(output: &Output) -> String {
    format!("{}\n{}", stdout(output), stderr(output))
}

#[track_caller]
fn assert_step_failed(output: &Output, needles: &[&str]) {
    let text = all_output(output);
    assert!(
        !output.status.success(),
        "the attack step succeeded:\n{text}"
    );
    for needle in needles {
        assert!(text.contains(needle), "`{needle}` missing from:\n{text}");
    }
}

// ---------------------------------------------------------------------------------------
// Attacks

#[test]
fn mknod_and_mount_of_the_host_disk_is_refused() {
    if !root() {
        return;
    }
    let dev = std::fs::metadata("/").expect("stat /").dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let marker = Path::new("/escaped-marker");
    assert!(
        !marker.exists(),
        "{} exists before the test",
        marker.display()
    );
    let sandbox = Sandbox::new();
    let output = run_step(
        &sandbox,
        &format!(
            "set -e; mknod /dev/hostdisk b {major} {minor}; mkdir -p /dev/m; \
             mount -t ext4 /dev/hostdisk /dev/m; echo escaped > /dev/m/escaped-marker"
        ),
        "",
    );
    assert!(
        !marker.exists(),
        "the step wrote {} on the host",
        marker.display()
    );
    assert_step_failed(&output, &["mount", "exit code"]);

    // The node itself is data: opening it fails even where mknod works.
    let output = run_step(
        &sandbox,
        &format!("mknod /hostdisk b {major} {minor}; head -c 512 /hostdisk > /dev/null"),
        "",
    );
    assert_step_failed(&output, &["Permission denied", "exit code"]);
}

#[test]
fn writing_proc_sys_is_refused() {
    if !root() {
        return;
    }
    // A host-wide setting that exists on every kernel config we know.
    let path = ["/proc/sys/vm/swappiness", "/proc/sys/vm/overcommit_ratio"]
        .into_iter()
        .find(|path| Path::new(path).exists())
        .expect("a /proc/sys/vm setting");
    let before = std::fs::read_to_string(path).expect("read swappiness");
    let other = (before.trim().parse::<u32>().expect("number") + 1) % 100;
    let sandbox = Sandbox::new();
    let output = run_step(&sandbox, &format!("echo {other} > {path}"), "");
    assert_eq!(std::fs::read_to_string(path).expect("read"), before);
    assert_step_failed(&output, &["Read-only file system", "exit code"]);
}

#[test]
fn kernel_memory_keys_and_timers_are_masked() {
    if !root() {
        return;
    }
    let sandbox = Sandbox::new();
    // Each exists on the host or not; inside, none may yield a byte.
    let output = run_step(
        &sandbox,
        "for f in kcore keys timer_list sched_debug; do \
           n=$(cat /proc/$f 2>/dev/null | head -c 64 | wc -c); \
           if [ \"$n\" != 0 ]; then echo \"/proc/$f is readable\"; exit 1; fi; \
         done; \
         grep -q ' /proc/sys proc ro,' /proc/mounts || { echo '/proc/sys is writable'; exit 1; }; \
         echo masked",
        "",
    );
    assert_success(&output);
    assert!(all_output(&output).contains("masked"));
}

#[test]
fn file_handles_are_refused_and_clone3_and_x32_are_missing() {
    if !root() {
        return;
    }
    if !prerequisite(
        Command::new("gcc")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "gcc builds the static open_by_handle_at probe",
    ) {
        return;
    }
    let sandbox = Sandbox::new();
    // The "shocker" escape: open the host's root inode (2 on ext4) through a file handle.
    let source = sandbox.write(
        "probe.c",
        r#"#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
    /* clone3 and every x32 system call (getpid is 39 | 0x40000000) answer ENOSYS. */
    long result = syscall(435, NULL, 0);
    printf("clone3: %s\n", result < 0 ? strerror(errno) : "allowed");
    result = syscall(39 | 0x40000000);
    printf("x32 getpid: %s\n", result < 0 ? strerror(errno) : "allowed");
    /* Refused whatever the arguments (these are harmless ones, should a call get through). */
    struct { const char *name; long number; } refused[] = {
        {"ptrace", SYS_ptrace}, {"keyctl", SYS_keyctl}, {"bpf", SYS_bpf},
        {"perf_event_open", SYS_perf_event_open}, {"setns", SYS_setns},
        {"kexec_load", SYS_kexec_load}, {"userfaultfd", SYS_userfaultfd},
        {"io_uring_setup", SYS_io_uring_setup}, {"pivot_root", SYS_pivot_root},
    };
    for (unsigned i = 0; i < sizeof refused / sizeof refused[0]; i++) {
        errno = 0;
        result = syscall(refused[i].number, -1L, 0L, 0L, 0L, 0L, 0L);
        printf("%s: %s\n", refused[i].name, result < 0 ? strerror(errno) : "allowed");
    }
    struct { struct file_handle h; unsigned char bytes[8]; } handle;
    handle.h.handle_bytes = 8;
    int mount_id;
    if (name_to_handle_at(AT_FDCWD, "/", &handle.h, &mount_id, 0) == 0)
        printf("name_to_handle_at succeeded\n");
    else
        printf("name_to_handle_at: %s\n", strerror(errno));
    handle.h.handle_bytes = 8;
    handle.h.handle_type = 1;
    memset(handle.bytes, 0, 8);
    handle.bytes[0] = 2;
    int fd = open_by_handle_at(AT_FDCWD, &handle.h, O_RDONLY);
    if (fd >= 0) { printf("ESCAPED: opened the root inode\n"); return 0; }
    printf("open_by_handle_at: %s\n", strerror(errno));
    return 1;
}
"#,
    );
    let binary = sandbox.path().join("ctx/probe");
    std::fs::create_dir_all(binary.parent().expect("parent")).expect("mkdir");
    let compiled = Command::new("gcc")
        .args(["-static", "-O1", "-o"])
        .arg(&binary)
        .arg(&source)
        .output()
        .expect("gcc runs");
    if !prerequisite(
        compiled.status.success(),
        &format!(
            "static glibc for gcc -static: {}",
            String::from_utf8_lossy(&compiled.stderr)
        ),
    ) {
        return;
    }
    sandbox.write(
        "b.kdl",
        &build_file("    copy \"ctx/probe\" \"/probe\"\n    run \"/probe\""),
    );
    let output = sandbox.graphbuild(&["run", "b.kdl", "--progress", "plain", "--output", "out"]);
    let text = all_output(&output);
    assert!(!text.contains("ESCAPED"), "{text}");
    assert_step_failed(
        &output,
        &[
            "name_to_handle_at: Operation not permitted",
            "open_by_handle_at: Operation not permitted",
            "clone3: Function not implemented",
            "x32 getpid: Function not implemented",
        ],
    );
    for name in [
        "ptrace",
        "keyctl",
        "bpf",
        "perf_event_open",
        "setns",
        "kexec_load",
        "userfaultfd",
        "io_uring_setup",
        "pivot_root",
    ] {
        let line = format!("{name}: Operation not permitted");
        assert!(text.contains(&line), "`{line}` missing from:\n{text}");
    }
}

#[test]
fn loading_a_kernel_module_is_refused() {
    if !root() {
        return;
    }
    let sandbox = Sandbox::new();
    // Without the filter, root would get "invalid module format" from the kernel.
    let output = run_step(&sandbox, "echo junk > /m.ko; insmod /m.ko", "");
    assert_step_failed(&output, &["Operation not permitted", "exit code"]);
}

#[test]
fn new_namespaces_and_mounts_are_refused() {
    if !root() {
        return;
    }
    let sandbox = Sandbox::new();
    for (script, needle) in [
        ("unshare -U true", "Operation not permitted"),
        ("unshare -m true", "Operation not permitted"),
        ("unshare -n true", "Operation not permitted"),
        ("mount -t tmpfs none /mnt", "permission denied"),
        ("mount -o remount,rw /proc/sys", "permission denied"),
        (
            "umount /proc/kcore || umount /proc/sys",
            "Operation not permitted",
        ),
    ] {
        let output = run_step(&sandbox, script, "");
        assert_step_failed(&output, &[needle, "exit code"]);
    }
}

#[test]
fn the_users_terminal_is_out_of_reach() {
    if !root() {
        return;
    }
    if !prerequisite(
        Command::new("script")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "util-linux `script` gives graphbuild a terminal",
    ) {
        return;
    }
    // graphbuild runs on a terminal; a step that could open it (/dev/tty, its controlling
    // terminal) could type commands into the user's shell with TIOCSTI.
    let sandbox = Sandbox::new();
    sandbox.write(
        "b.kdl",
        &build_file(
            "    run \"if echo hi > /dev/tty; then echo OPENED-$((40+2)); exit 1; fi; echo no-terminal\"",
        ),
    );
    let output = Command::new("script")
        .arg("-qec")
        .arg(format!(
            "{} run b.kdl --progress plain --output out",
            bin().display()
        ))
        .arg("/dev/null")
        .current_dir(sandbox.path())
        .env("GRAPHBUILD_CACHE_DIR", sandbox.store())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("script runs");
    let text = all_output(&output);
    assert!(!text.contains("OPENED-42"), "{text}");
    assert!(text.contains("no-terminal"), "{text}");
    assert_success(&output);
}

#[test]
fn capabilities_are_dockers_default_set() {
    if !root() {
        return;
    }
    let sandbox = Sandbox::new();
    let output = run_step(
        &sandbox,
        "grep -E '^(Cap|Seccomp|NoNewPrivs)' /proc/self/status",
        "",
    );
    assert_success(&output);
    let text = all_output(&output);
    for line in [
        format!("CapEff:\t{DOCKER_CAPS}"),
        format!("CapPrm:\t{DOCKER_CAPS}"),
        format!("CapBnd:\t{DOCKER_CAPS}"),
        "CapInh:\t0000000000000000".to_string(),
        "CapAmb:\t0000000000000000".to_string(),
        "Seccomp:\t2".to_string(),
        // Setuid programs keep working: no no_new_privs, as in Docker.
        "NoNewPrivs:\t0".to_string(),
    ] {
        assert!(text.contains(&line), "`{line}` missing from:\n{text}");
    }
}

#[test]
fn a_fork_bomb_is_stopped_at_the_process_limit() {
    if !root() {
        return;
    }
    let pids_cgroup = Path::new("/sys/fs/cgroup/pids/cgroup.procs").exists()
        || std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
            .is_ok_and(|controllers| controllers.contains("pids"));
    if !prerequisite(pids_cgroup, "a pids cgroup controller (v1 or v2)") {
        return;
    }
    let sandbox = Sandbox::new();
    // A small limit: the bomb is the same, but the test does not crowd the machine (and the
    // tests running beside it) with thousands of processes before it is stopped.
    sandbox.write(
        "b.kdl",
        &build_file(&format!(
            "    run {}",
            kdl("bomb() { bomb | bomb & }; bomb; sleep 60")
        )),
    );
    let started = Instant::now();
    let output = sandbox.graphbuild(&[
        "run",
        "b.kdl",
        "--progress",
        "plain",
        "--output",
        "out",
        "--step-max-processes",
        "256",
    ]);
    let elapsed = started.elapsed();
    assert_step_failed(&output, &["process limit of 256 processes"]);
    assert!(elapsed < Duration::from_secs(40), "took {elapsed:?}");
    // The default limit is a documented 4096.
    let doctor = sandbox.graphbuild(&["doctor"]);
    assert!(
        stdout(&doctor).contains("4096"),
        "doctor names the default process limit:\n{}",
        stdout(&doctor)
    );

    // --step-max-processes sets the limit; a step under it is not disturbed.
    sandbox.write(
        "b.kdl",
        &build_file(
            "    run \"for i in 1 2 3 4 5 6 7 8 9 10 11 12; do sleep 5 & done; wait\"\n    run \"sleep 1 & sleep 1 & wait\"",
        ),
    );
    let limited = |max: &str| {
        sandbox.graphbuild(&[
            "run",
            "b.kdl",
            "--progress",
            "plain",
            "--output",
            "out",
            "--step-max-processes",
            max,
        ])
    };
    assert_step_failed(&limited("8"), &["process limit of 8 processes"]);
    assert_success(&limited("20"));
}

#[test]
fn without_a_pids_cgroup_steps_run_with_a_notice_and_doctor_says_so() {
    if !root() {
        return;
    }
    if !prerequisite(
        Command::new("unshare")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "util-linux `unshare` hides the cgroup mounts",
    ) {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.write("b.kdl", &build_file("    run \"true\""));
    // graphbuild in a mount namespace of its own where no cgroup hierarchy is mounted.
    let hidden = |args: &str| {
        Command::new("unshare")
            .args(["-m", "sh", "-c"])
            .arg(format!(
                "mount --make-rprivate / && {{ umount -l /sys/fs/cgroup 2>/dev/null; exec {} {args}; }}",
                bin().display()
            ))
            .current_dir(sandbox.path())
            .env("GRAPHBUILD_CACHE_DIR", sandbox.store())
            .env("NO_COLOR", "1")
            .output()
            .expect("unshare runs")
    };
    let output = hidden("run b.kdl --progress plain --output out");
    assert_success(&output);
    let text = all_output(&output);
    assert!(
        text.contains("notice: the process limit of steps is only approximate"),
        "{text}"
    );
    // The limit still holds, counted by the supervisor.
    sandbox.write(
        "many.kdl",
        &build_file("    run \"for i in 1 2 3 4 5 6 7 8 9 10 11 12; do sleep 5 & done; wait\""),
    );
    let started = Instant::now();
    let output = hidden("run many.kdl --progress plain --output out --step-max-processes 8");
    assert_step_failed(&output, &["process limit of 8 processes"]);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let doctor = hidden("doctor");
    assert!(
        stdout(&doctor).contains("✗ run steps have only an approximate process limit"),
        "{}",
        stdout(&doctor)
    );
}

#[test]
fn a_step_past_its_timeout_is_killed() {
    if !root() {
        return;
    }
    let sandbox = Sandbox::new();
    let started = Instant::now();
    let output = run_step(&sandbox, "sleep 30 & sleep 30", "timeout=\"2s\"");
    assert_step_failed(&output, &["timeout of 2s"]);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );

    // --step-timeout applies to steps without a timeout of their own.
    let started = Instant::now();
    sandbox.write("b.kdl", &build_file("    run \"sleep 30\""));
    let output = sandbox.graphbuild(&[
        "run",
        "b.kdl",
        "--progress",
        "plain",
        "--output",
        "out",
        "--step-timeout",
        "1s",
    ]);
    assert_step_failed(&output, &["timeout of 1s"]);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn insecure_steps_keep_every_capability_with_a_warning_and_their_own_key() {
    if !root() {
        return;
    }
    let sandbox = Sandbox::new();
    let output = run_step(
        &sandbox,
        "grep -E '^(CapEff|Seccomp):' /proc/self/status",
        "insecure=#true",
    );
    assert_success(&output);
    let text = all_output(&output);
    assert!(text.contains("Seccomp:\t0"), "{text}");
    assert!(!text.contains(&format!("CapEff:\t{DOCKER_CAPS}")), "{text}");
    assert!(text.contains("warning: insecure=#true"), "{text}");

    let plan = sandbox.graphbuild(&["plan", "b.kdl"]);
    assert_success(&plan);
    assert!(
        stdout(&plan).contains("warning: insecure=#true"),
        "{}",
        stdout(&plan)
    );
    let key = |sandbox: &Sandbox| {
        let plan = sandbox.graphbuild(&["plan", "b.kdl", "--format", "json"]);
        assert_success(&plan);
        let value: serde_json::Value = serde_json::from_slice(&plan.stdout).expect("json");
        value["nodes"][0]["steps"][0]["key"].clone()
    };
    let insecure_key = key(&sandbox);
    sandbox.write(
        "b.kdl",
        &build_file("    run \"grep -E '^(CapEff|Seccomp):' /proc/self/status\""),
    );
    assert_ne!(insecure_key, key(&sandbox));
}

/// A native 32-bit x86 program reporting its confinement: its capabilities, whether it runs
/// under a seccomp filter, and what three calls the filter refuses return (`ptrace` and `kcmp`
/// succeed without the filter, `clone3` fails with `EINVAL` rather than `ENOSYS`).
const PROBE32: &str = r#"#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <unistd.h>
static void report(const char *name, long result) {
    printf("%s=%s\n", name, result == 0 ? "ok" : strerror(errno));
}
int main(void) {
    FILE *status = fopen("/proc/self/status", "r");
    char line[256];
    while (status && fgets(line, sizeof line, status))
        if (!strncmp(line, "CapEff", 6) || !strncmp(line, "CapBnd", 6) || !strncmp(line, "Seccomp:", 8))
            fputs(line, stdout);
    errno = 0;
    report("ptrace", ptrace(PTRACE_TRACEME, 0, 0, 0));
    errno = 0;
    report("kcmp", syscall(SYS_kcmp, getpid(), getpid(), 0, 1, 1));
    errno = 0;
    report("clone3", syscall(435, 0, 0));
    return 0;
}
"#;

/// Builds [`PROBE32`] with `gcc -m32 -static` into `ctx/probe32`; false when the toolchain is
/// missing (which fails under `CI=true`).
fn build_probe32(sandbox: &Sandbox) -> bool {
    let source = sandbox.write("probe32.c", PROBE32);
    let binary = sandbox.path().join("ctx/probe32");
    std::fs::create_dir_all(binary.parent().expect("parent")).expect("mkdir");
    let compiled = Command::new("gcc")
        .args(["-m32", "-static", "-O1", "-o"])
        .arg(&binary)
        .arg(&source)
        .output()
        .expect("gcc runs");
    prerequisite(
        compiled.status.success(),
        &format!(
            "32-bit static glibc for gcc -m32 -static (gcc-multilib, scripts/setup-host): {}",
            String::from_utf8_lossy(&compiled.stderr)
        ),
    )
}

fn probe32_build_file(platform: &str, insecure: bool) -> String {
    let insecure = if insecure { " insecure=#true" } else { "" };
    format!(
        "platforms \"{platform}\"\nstage s {{\n    from \"scratch\"\n    copy \"ctx/probe32\" \"/probe32\"\n    run \"/probe32\" \"status\"{insecure}\n}}\nimage s {{\n    stage s\n    tags \"t:1\"\n}}\n"
    )
}

#[test]
fn native_32_bit_x86_programs_run_under_their_own_seccomp_filter() {
    if !root() {
        return;
    }
    let sandbox = Sandbox::new();
    if !build_probe32(&sandbox) {
        return;
    }
    // As a linux/386 step, and as a 32-bit tool run by a linux/amd64 step: both enter the
    // kernel through the i386 ABI, and both get the i386 half of the filter.
    for platform in ["linux/386", "linux/amd64"] {
        sandbox.write("b.kdl", &probe32_build_file(platform, false));
        let output =
            sandbox.graphbuild(&["run", "b.kdl", "--progress", "plain", "--output", "out"]);
        assert_success(&output);
        let text = all_output(&output);
        for line in [
            "CapEff:\t00000000a80425fb",
            "CapBnd:\t00000000a80425fb",
            "Seccomp:\t2",
            "ptrace=Operation not permitted",
            "kcmp=Operation not permitted",
            "clone3=Function not implemented",
        ] {
            assert!(
                text.contains(line),
                "{platform}: `{line}` missing from:\n{text}"
            );
        }
        assert!(!text.contains("without the seccomp filter"), "{text}");
    }
    // The same probe with `insecure=#true` (no filter) sees the calls succeed or fail the
    // kernel's way: the assertions above are the filter's doing.
    sandbox.write("b.kdl", &probe32_build_file("linux/386", true));
    let output = sandbox.graphbuild(&["run", "b.kdl", "--progress", "plain", "--output", "out"]);
    assert_success(&output);
    let text = all_output(&output);
    for line in ["Seccomp:\t0", "ptrace=ok", "kcmp=ok"] {
        assert!(
            text.contains(line),
            "insecure: `{line}` missing from:\n{text}"
        );
    }
    assert!(!text.contains("clone3=Function not implemented"), "{text}");
}

// ---------------------------------------------------------------------------------------
// Ordinary builds keep working

#[test]
fn chown_setuid_files_and_su_work_on_three_platforms() {
    if !root() {
        return;
    }
    let binfmt = Path::new("/proc/sys/fs/binfmt_misc");
    if !prerequisite(
        binfmt.join("qemu-aarch64").exists() && binfmt.join("qemu-arm").exists(),
        "qemu-user registered in binfmt_misc (scripts/setup-host)",
    ) {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.write(
        "b.kdl",
        &format!(
            r#"platforms "linux/amd64" "linux/arm64" "linux/arm/v7"
stage s {{
    from "{BASE}"
    run "echo 'bob:x:1000:1000::/home/bob:/bin/sh' >> /etc/passwd && echo 'bob:x:1000:' >> /etc/group && mkdir -p /home/bob /out && chown bob:bob /home/bob"
    run "touch /out/owned && chown 1000:1000 /out/owned && chmod 640 /out/owned && cp /bin/busybox /out/suid && chmod 4755 /out/suid"
    run "su bob -c 'id -u > /home/bob/uid && grep CapEff /proc/self/status > /home/bob/caps' && uname -m > /out/arch"
}}
image s {{
    stage s
    tags "t:1"
}}
"#
        ),
    );
    let output = sandbox.graphbuild(&["run", "b.kdl", "--progress", "plain", "--output", "out"]);
    assert_success(&output);
    for (platform, arch) in [
        ("linux/amd64", "x86_64"),
        ("linux/arm64", "aarch64"),
        ("linux/arm/v7", "armv7l"),
    ] {
        let rootfs = unpack_platform(
            &sandbox.path().join("out/s"),
            "1",
            platform,
            &sandbox
                .path()
                .join(format!("unpack-{}", platform.replace('/', "-"))),
        );
        let read = |path: &str| std::fs::read_to_string(rootfs.join(path)).expect(path);
        assert_eq!(read("out/arch").trim(), arch, "{platform}");
        assert_eq!(read("home/bob/uid").trim(), "1000", "{platform}");
        assert_eq!(
            read("home/bob/caps").trim(),
            "CapEff:\t0000000000000000",
            "{platform}"
        );
        let owned = std::fs::metadata(rootfs.join("out/owned")).expect("owned");
        assert_eq!((owned.uid(), owned.gid()), (1000, 1000), "{platform}");
        assert_eq!(owned.permissions().mode() & 0o7777, 0o640, "{platform}");
        let suid = std::fs::metadata(rootfs.join("out/suid")).expect("suid");
        assert_eq!(suid.permissions().mode() & 0o7777, 0o4755, "{platform}");
    }
}

// ---------------------------------------------------------------------------------------
// Issue 11: scratch directories of a killed engine

#[test]
fn scratch_directories_of_a_killed_engine_are_removed_by_the_next_run() {
    if !root() {
        return;
    }
    let sandbox = Sandbox::new();
    let tmp = sandbox.path().join("tmp");
    std::fs::create_dir(&tmp).expect("mkdir tmp");
    sandbox.write("slow.kdl", &build_file("    run \"sleep 30\""));
    sandbox.write("quick.kdl", &build_file("    run \"true\""));
    let scratch_dirs = || -> Vec<String> {
        std::fs::read_dir(&tmp)
            .expect("read tmp")
            .flatten()
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("graphbuild-sandbox-"))
            .collect()
    };
    let mut engine = Command::new(bin())
        .args(["run", "slow.kdl", "--progress", "plain", "--output", "out"])
        .current_dir(sandbox.path())
        .env("GRAPHBUILD_CACHE_DIR", sandbox.store())
        .env("TMPDIR", &tmp)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("graphbuild starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    while scratch_dirs().is_empty() {
        assert!(Instant::now() < deadline, "no scratch directory appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
    engine.kill().expect("SIGKILL");
    engine.wait().expect("wait");
    assert!(!scratch_dirs().is_empty(), "SIGKILL ran no cleanup");

    let output = Command::new(bin())
        .args(["run", "quick.kdl", "--progress", "plain", "--output", "out"])
        .current_dir(sandbox.path())
        .env("GRAPHBUILD_CACHE_DIR", sandbox.store())
        .env("TMPDIR", &tmp)
        .output()
        .expect("graphbuild runs");
    assert_success(&output);
    assert_eq!(scratch_dirs(), Vec::<String>::new());
}
