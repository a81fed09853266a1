//! The sandbox: runs one `run` step (or a copy) in a root filesystem made of overlay layers.
//!
//! # Processes
//!
//! ```text
//! engine (threads: rayon, tokio)
//!   └─ graphbuild __graphbuild-sandbox        the supervisor: single-threaded, PDEATHSIG=KILL
//!        │  unshare(mount, uts, ipc[, net]); overlay mounted on a private tmpfs; unshare(pid)
//!        └─ PID 1 of the new pid namespace   (moved into the step's pids cgroup first) own
//!             └─ the command …               session and mount namespace: /proc (masked),
//!                                            /dev, cache mounts, secrets; pivot_root;
//!                                            bounding set, seccomp; setuid; capabilities; exec
//! ```
//!
//! Namespaces are created in a separate process, a re-exec of the graphbuild binary
//! ([`SANDBOX_ARG`]), because `unshare` of a mount namespace fails (EINVAL) in a
//! multi-threaded process and `fork` in one is only safe for async-signal-safe code. The
//! engine calls [`run_sandbox`]; the binary's `main` hands control to [`child_main`] first
//! thing when its first argument is [`SANDBOX_ARG`].
//!
//! The spec travels as JSON on the child's stdin. The command's stdout and stderr are merged
//! into the child's stdout, which [`run_sandbox`] splits into lines for the caller. The
//! child's stderr carries its reports: one JSON [`ChildReport`] per line, the last of which
//! says how the command ended or which setup step failed.
//!
//! # Nothing but the command's changes reaches the upper directory
//!
//! The sandbox needs mount points the image may lack: `/proc`, `/dev`, cache-mount and
//! secret targets. Creating them in the merged root would write them (and copied-up parent
//! directories) into the upper directory, i.e. into the step's layer. Instead the supervisor
//! first mounts the lower layers read-only to resolve each target inside the image
//! (following its symlinks, confined to its root), then builds a small *synthetic* layer on a
//! tmpfs holding only the missing entries and copies of their existing parents (same mode,
//! owner and times), and mounts it as the top-most lower layer. Mounts then cover entries
//! that already exist in a lower layer, so the upper directory receives only what the
//! command itself writes. Cache-mount and secret contents live in bind mounts and never
//! touch it either.
//!
//! # Containment
//!
//! What a `run` step may do is documented for users in docs/security.md. In short: the root
//! overlay and `/dev` are `nodev` (image device nodes are data), `/proc` has runc's read-only
//! and masked paths, `/sys` is absent, cache mounts are `nosuid,nodev`; [`confine`] keeps
//! Docker's default capabilities and installs the seccomp filters (PID 1 installs them while
//! it still holds `CAP_SYS_ADMIN`, because setuid programs rule out `no_new_privs`); [`limits`]
//! gives each step a pids cgroup, and the supervisor kills PID 1 (and so the namespace) when
//! the step reaches its process limit or its timeout ([`ExitStatusKind::ProcessLimit`],
//! [`ExitStatusKind::TimedOut`]). [`RunTask::insecure`] skips the capabilities and filters.
//!
//! # Rootless
//!
//! Run by an ordinary user, the whole engine already runs in a user namespace where that user
//! is root ([`crate::rootless`]); the sandbox is the same inside it, its namespaces owned by
//! that user namespace. Two differences: overlayfs is mounted with `userxattr` (and
//! `redirect_dir=nofollow`, which `userxattr` requires), and a single-id mapping denies
//! `setgroups`, which PID 1 then skips (no group but 0 is mapped there).
//!
//! Where the kernel refuses overlayfs, the root is mounted with fuse-overlayfs instead
//! ([`overlay`] chooses, once per build; `fuse.rs` runs the daemon and converts its upper
//! directory to the kernel's form). The pid namespace is then unshared only after the mounts,
//! just before PID 1 is forked, so the daemon stays outside it.
//!
//! # Lifetime
//!
//! The supervisor dies with the engine (`PR_SET_PDEATHSIG(SIGKILL)`, set before exec), PID 1
//! dies with the supervisor (the same, set after `setuid`, which clears it), and the kernel
//! kills every process of a pid namespace when its PID 1 exits. So the command's background
//! processes end with the command, and an engine killed by Ctrl-C leaves nothing behind.
//! SIGTERM, SIGINT and SIGHUP sent to the supervisor are forwarded to PID 1, followed by
//! SIGKILL five seconds later (or on a second signal): PID 1 ignores signals it has no
//! handler for. Scratch directories are named after the engine's pid, so the next engine
//! removes those of an engine killed with SIGKILL.

mod child;
pub mod confine;
mod copy_task;
mod fuse;
pub mod limits;
pub mod overlay;
mod user;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

pub use child::child_main;
pub use copy_task::{CopyTask, CopyTaskSource};

/// The first argument that turns the graphbuild binary into a sandbox child.
pub const SANDBOX_ARG: &str = "__graphbuild-sandbox";

/// How many of the command's last output lines [`SandboxOutcome::tail`] keeps.
pub const TAIL_LINES: usize = 20;

/// The `PATH` used to find the command when the spec's environment has none (Docker's).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One sandboxed task on one root filesystem.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct SandboxSpec {
    /// Read-only layers, top-most first. Empty for `scratch`.
    pub lowerdirs: Vec<PathBuf>,
    /// Receives the task's changes (overlayfs upper directory, whiteouts included).
    pub upperdir: PathBuf,
    /// overlayfs work directory: empty, on the same filesystem as `upperdir`.
    pub overlay_workdir: PathBuf,
    /// The kernel's overlayfs or fuse-overlayfs ([`overlay`]); the upper directory is in the
    /// kernel's form either way.
    #[serde(default)]
    pub overlay: overlay::Overlay,
    pub task: Task,
}

// One task per step, serialized to the child: the size of the enum does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub enum Task {
    /// Run a command.
    Run(RunTask),
    /// Perform a `copy` on the merged root.
    Copy(CopyTask),
    /// Mount the root and unmount it: can this overlay be mounted here ([`overlay::probe_native`])?
    ProbeOverlay,
}

/// The setup step whose failure means the kernel refused the root's overlay mount.
const MOUNT_ROOT_STEP: &str = "mount the root filesystem (overlayfs)";

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct RunTask {
    /// The command; `argv[0]` is searched on the environment's `PATH` inside the root.
    pub argv: Vec<String>,
    /// The whole environment (nothing is inherited). `PATH` defaults to [`DEFAULT_PATH`] and
    /// `HOME` to the user's home directory when absent.
    pub env: Vec<(String, String)>,
    /// Absolute working directory, created when missing (as Docker's `WORKDIR`).
    pub cwd: String,
    /// `uid`, `uid:gid`, `name` or `name:group`, resolved against the root's `/etc/passwd`
    /// and `/etc/group`; empty means root.
    pub user: String,
    /// (host directory, absolute target): persistent read-write directories.
    pub cache_mounts: Vec<(PathBuf, String)>,
    /// A script `argv` runs (its interpreter reads it from [`crate::plan::op::SCRIPT_PATH`],
    /// in the step's `/dev`).
    #[serde(default)]
    pub script: Option<String>,
    /// (host path, absolute target, is a directory): read-only views of the build context.
    #[serde(default)]
    pub bind_mounts: Vec<(PathBuf, String, bool)>,
    /// (absolute target, size in bytes): empty tmpfs directories, in no layer.
    #[serde(default)]
    pub tmpfs_mounts: Vec<(String, Option<u64>)>,
    /// (host file, absolute target): bind-mounted read-only, leaving no trace in the layer.
    pub secret_files: Vec<(PathBuf, String)>,
    /// Views of other stages' or images' filesystems.
    #[serde(default)]
    pub stage_binds: Vec<StageBind>,
    /// (host socket, absolute target): ssh agent sockets ([`crate::ssh`]), mounted as
    /// secrets are.
    #[serde(default)]
    pub ssh_sockets: Vec<(PathBuf, String)>,
    pub network: NetworkMode,
    /// The sandbox's hostname; empty means `graphbuild`.
    pub hostname: String,
    /// Kill the whole step (its pid namespace) after this many milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// The most processes the step may have at once (a pids cgroup; see [`limits`]).
    #[serde(default)]
    pub max_processes: Option<u32>,
    /// `insecure=#true`: every capability and no seccomp filter (see [`confine`]).
    #[serde(default)]
    pub insecure: bool,
    /// The command's stderr is a stream of its own ([`STDERR_FD`] of the sandbox process)
    /// instead of joining its stdout: [`run_sandbox_streams`] tells the two apart.
    #[serde(default)]
    pub separate_stderr: bool,
}

/// A stage's or an image's filesystem, or a path in it, on `target` while a step runs (see
/// `child/stage_bind.rs`).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct StageBind {
    /// The node's layer snapshots, top-most first.
    pub lowerdirs: Vec<PathBuf>,
    /// An absolute path in that filesystem, resolved inside it.
    pub source: String,
    pub target: String,
    /// Writable, the writes discarded with the sandbox; read-only otherwise.
    pub readwrite: bool,
    /// Set by the sandbox itself: the path to mount and whether it is a directory.
    #[serde(skip)]
    pub(crate) resolved: Option<(PathBuf, bool)>,
}

/// Where the command's stderr reaches the sandbox process when [`RunTask::separate_stderr`].
pub(crate) const STDERR_FD: i32 = 3;

/// Which of the command's outputs a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// The process limit of a build's `run` steps.
pub const DEFAULT_MAX_PROCESSES: u32 = 4096;

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetworkMode {
    /// The host's network (and its `/etc/resolv.conf`, bind-mounted read-only).
    #[default]
    Host,
    /// A new network namespace with only the loopback interface, up.
    None,
}

/// How a command ended.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatusKind {
    Exited(i32),
    Signaled(i32),
    /// Killed when it ran past its timeout.
    TimedOut {
        millis: u64,
    },
    /// Killed when it reached its process limit.
    ProcessLimit {
        max: u32,
    },
}

impl ExitStatusKind {
    pub fn success(&self) -> bool {
        *self == ExitStatusKind::Exited(0)
    }
}

impl std::fmt::Display for ExitStatusKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatusKind::Exited(code) => write!(f, "exit code {code}"),
            ExitStatusKind::Signaled(signal) => match nix::sys::signal::Signal::try_from(*signal) {
                Ok(name) => write!(f, "killed by signal {signal} ({name})"),
                Err(_) => write!(f, "killed by signal {signal}"),
            },
            ExitStatusKind::TimedOut { millis } => write!(
                f,
                "killed after its timeout of {}",
                format_duration(*millis)
            ),
            ExitStatusKind::ProcessLimit { max } => {
                write!(f, "killed when it reached its limit of {max} processes")
            }
        }
    }
}

/// `90000` → `1m30s`, `2000` → `2s`, `1500` → `1500ms`.
pub fn format_duration(millis: u64) -> String {
    if millis == 0 || !millis.is_multiple_of(1000) {
        return format!("{millis}ms");
    }
    let seconds = millis / 1000;
    let (hours, minutes, seconds) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
    let mut text = String::new();
    if hours > 0 {
        text.push_str(&format!("{hours}h"));
    }
    if minutes > 0 {
        text.push_str(&format!("{minutes}m"));
    }
    if seconds > 0 {
        text.push_str(&format!("{seconds}s"));
    }
    text
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxOutcome {
    pub status: ExitStatusKind,
    /// The last [`TAIL_LINES`] lines of merged stdout and stderr.
    pub tail: Vec<String>,
}

/// Why a sandboxed task could not run (a command that ran and failed is not an error: see
/// [`SandboxOutcome::status`]).
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum SandboxError {
    #[error("invalid sandbox spec: {message}")]
    #[diagnostic(code(graphbuild::sandbox::invalid_spec))]
    InvalidSpec { message: String },

    #[error("could not start the sandbox process {}", exe.display())]
    #[diagnostic(
        code(graphbuild::sandbox::spawn),
        help("the sandbox re-executes the graphbuild binary; check that it still exists")
    )]
    Spawn {
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("could not {action}")]
    #[diagnostic(code(graphbuild::sandbox::io))]
    Io {
        action: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("sandbox setup failed: {step}: {message}")]
    #[diagnostic(
        code(graphbuild::sandbox::setup),
        help(
            "the sandbox needs root (CAP_SYS_ADMIN), mount and pid namespaces and overlayfs; \
             `graphbuild doctor` checks them"
        )
    )]
    Setup { step: String, message: String },

    #[error("exec: \"{program}\": not found in PATH {path}")]
    #[diagnostic(
        code(graphbuild::sandbox::exec_not_found),
        help(
            "install the program in an earlier step, use its absolute path, or set PATH with `env`"
        )
    )]
    ExecNotFound { program: String, path: String },

    #[error("copy failed: {message}")]
    #[diagnostic(code(graphbuild::sandbox::copy))]
    CopyFailed {
        message: String,
        /// What to do about it, from the copy's own error.
        #[help]
        help: Option<String>,
    },

    #[error(
        "the sandbox process ended without a result ({status}){}",
        detail_suffix(detail)
    )]
    #[diagnostic(code(graphbuild::sandbox::child_died))]
    ChildDied { status: String, detail: String },
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

/// What the engine sends the child on its stdin.
#[derive(Serialize, Deserialize, Debug)]
struct ChildRequest {
    spec: SandboxSpec,
    /// An empty directory the child mounts its private tmpfs on (removed by the engine).
    scratch_dir: PathBuf,
}

/// What the child reports on its stderr, one JSON value per line.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
enum ChildReport {
    Finished(ExitStatusKind),
    CopyDone,
    /// [`Task::ProbeOverlay`] mounted the root.
    Probed,
    CopyFailed {
        message: String,
        #[serde(default)]
        help: Option<String>,
    },
    SetupFailed {
        step: String,
        message: String,
    },
    ExecNotFound {
        program: String,
        path: String,
    },
    /// Something the user should know that does not stop the task (a limit not enforced).
    Notice(String),
}

/// Runs `spec` in a sandbox child started as `exe __graphbuild-sandbox`, streaming the
/// command's merged output to `on_line` one line at a time (a line rewritten with `\r` is
/// given as it would finally show on a terminal). Blocks until the task and every process
/// it started have ended.
pub fn run_sandbox(
    exe: &Path,
    spec: &SandboxSpec,
    on_line: &mut dyn FnMut(&str),
) -> Result<SandboxOutcome, SandboxError> {
    run_sandbox_in(exe, spec, &mut |_, line| on_line(line), false)
}

/// [`run_sandbox`], saying which stream each line came from: with
/// [`RunTask::separate_stderr`], stdout and stderr are read apart (and given in the order they
/// arrive, which between the two streams is only approximately the order they were written);
/// otherwise every line is [`Stream::Stdout`].
pub fn run_sandbox_streams(
    exe: &Path,
    spec: &SandboxSpec,
    on_line: &mut dyn FnMut(Stream, &str),
) -> Result<SandboxOutcome, SandboxError> {
    run_sandbox_in(exe, spec, on_line, false)
}

/// [`run_sandbox_streams`]; with `fresh_user_namespace`, the child starts in a user namespace
/// of its own mapping only this process's uid and gid (to 0), as a rootless build's would.
fn run_sandbox_in(
    exe: &Path,
    spec: &SandboxSpec,
    on_line: &mut dyn FnMut(Stream, &str),
    fresh_user_namespace: bool,
) -> Result<SandboxOutcome, SandboxError> {
    validate(spec)?;
    let separate_stderr = matches!(&spec.task, Task::Run(run) if run.separate_stderr);
    let stderr_pipe = if separate_stderr {
        Some(std::io::pipe().map_err(|source| SandboxError::Io {
            action: "create a pipe for the command's stderr",
            source,
        })?)
    } else {
        None
    };
    let stderr_writer_fd = stderr_pipe
        .as_ref()
        .map(|(_, writer)| std::os::fd::AsRawFd::as_raw_fd(writer));
    sweep_stale_scratch_dirs();
    let scratch = tempfile::Builder::new()
        .prefix(&format!("{SCRATCH_PREFIX}{}-", std::process::id()))
        .tempdir()
        .map_err(|source| SandboxError::Io {
            action: "create the sandbox's scratch directory",
            source,
        })?;
    let request = ChildRequest {
        spec: spec.clone(),
        scratch_dir: scratch.path().to_path_buf(),
    };
    let request = serde_json::to_vec(&request).map_err(|error| SandboxError::InvalidSpec {
        message: error.to_string(),
    })?;

    let engine_pid = std::process::id();
    // Prepared before fork: the closure below must not allocate.
    let maps = fresh_user_namespace.then(|| {
        (
            format!("0 {} 1\n", nix::unistd::geteuid().as_raw()),
            format!("0 {} 1\n", nix::unistd::getegid().as_raw()),
        )
    });
    let mut command = Command::new(exe);
    command
        .arg(SANDBOX_ARG)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure only makes async-signal-safe system calls.
    unsafe {
        command.pre_exec(move || {
            // Die with the engine; if it is already gone, don't start at all.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() as u32 != engine_pid {
                return Err(std::io::Error::other("the engine process exited"));
            }
            // The command's stderr pipe becomes STDERR_FD, kept open across exec (dup2 onto
            // itself would keep close-on-exec, so the flag is cleared either way).
            if let Some(fd) = stderr_writer_fd {
                if fd != STDERR_FD && libc::dup2(fd, STDERR_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::fcntl(STDERR_FD, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some((uid_map, gid_map)) = &maps {
                if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for (file, text) in [
                    (c"/proc/self/setgroups", "deny".as_bytes()),
                    (c"/proc/self/uid_map", uid_map.as_bytes()),
                    (c"/proc/self/gid_map", gid_map.as_bytes()),
                ] {
                    let fd = libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let written = libc::write(fd, text.as_ptr().cast(), text.len());
                    libc::close(fd);
                    if written != text.len() as isize {
                        return Err(std::io::Error::last_os_error());
                    }
                }
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|source| SandboxError::Spawn {
        exe: exe.to_path_buf(),
        source,
    })?;
    let _running = RunningGuard::register(child.id());

    let (Some(mut stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(SandboxError::Io {
            action: "open pipes to the sandbox process",
            source: std::io::Error::other("missing pipe"),
        });
    };
    // The child reads the whole request before writing anything, so this cannot deadlock.
    // A failed write means the child died early; its reports say why.
    let _ = stdin.write_all(&request);
    drop(stdin);

    let mut tail = VecDeque::with_capacity(TAIL_LINES);
    let mut keep = |stream: Stream, line: &str| {
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line.to_string());
        on_line(stream, line);
    };
    let read_result = match stderr_pipe {
        None => split_lines(stdout, &mut |line| keep(Stream::Stdout, line)),
        Some((reader, writer)) => {
            // Only the sandbox process (and the command) may hold the write end: EOF then
            // means they are gone.
            drop(writer);
            read_both(stdout, reader, &mut keep)
        }
    };

    let mut reports = Vec::new();
    let stderr_result = stderr.take(1 << 20).read_to_end(&mut reports);
    let status = child.wait().map_err(|source| SandboxError::Io {
        action: "wait for the sandbox process",
        source,
    })?;
    drop(scratch);
    read_result.map_err(|source| SandboxError::Io {
        action: "read the sandboxed command's output",
        source,
    })?;
    stderr_result.map_err(|source| SandboxError::Io {
        action: "read the sandbox process's reports",
        source,
    })?;

    let reports = String::from_utf8_lossy(&reports);
    let mut last_report = None;
    let mut other_text = Vec::new();
    for line in reports.lines() {
        match serde_json::from_str::<ChildReport>(line) {
            Ok(ChildReport::Notice(notice)) => {
                notice_once(&notice, &mut |line| on_line(Stream::Stdout, line))
            }
            Ok(report) => last_report = Some(report),
            Err(_) if !line.trim().is_empty() => other_text.push(line.trim().to_string()),
            Err(_) => {}
        }
    }
    let tail: Vec<String> = tail.into();
    match last_report {
        Some(ChildReport::Finished(status)) => Ok(SandboxOutcome { status, tail }),
        Some(ChildReport::CopyDone | ChildReport::Probed) => Ok(SandboxOutcome {
            status: ExitStatusKind::Exited(0),
            tail,
        }),
        Some(ChildReport::CopyFailed { message, help }) => {
            Err(SandboxError::CopyFailed { message, help })
        }
        Some(ChildReport::SetupFailed { step, message }) => {
            Err(SandboxError::Setup { step, message })
        }
        Some(ChildReport::ExecNotFound { program, path }) => {
            Err(SandboxError::ExecNotFound { program, path })
        }
        Some(ChildReport::Notice(_)) | None => Err(SandboxError::ChildDied {
            status: match (status.code(), status.signal()) {
                (Some(code), _) => format!("exit code {code}"),
                (None, Some(signal)) => ExitStatusKind::Signaled(signal).to_string(),
                (None, None) => "unknown status".to_string(),
            },
            detail: other_text.join("; "),
        }),
    }
}

/// Shows a notice once per process, as a line of the task's output.
fn notice_once(notice: &str, on_line: &mut dyn FnMut(&str)) {
    static SHOWN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let first = SHOWN
        .lock()
        .map(|mut shown| {
            let first = !shown.iter().any(|seen| seen == notice);
            if first {
                shown.push(notice.to_string());
            }
            first
        })
        .unwrap_or(true);
    if first {
        on_line(&format!("[graphbuild] notice: {notice}"));
    }
}

/// Scratch directories are named `graphbuild-sandbox-ENGINEPID-…`; those of engines that are
/// gone (killed with SIGKILL, which runs no destructor) are removed by the next engine.
const SCRATCH_PREFIX: &str = "graphbuild-sandbox-";

fn sweep_stale_scratch_dirs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|name| name.strip_prefix(SCRATCH_PREFIX))
                .and_then(|rest| rest.split_once('-').map(|(pid, _)| pid))
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists() {
                // Only ever empty directories: the tmpfs lived in the child's mount namespace.
                let _ = std::fs::remove_dir(entry.path());
            }
        }
    });
}

/// Supervisors of sandboxes running now, so a cancelled build can stop them.
static RUNNING: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// Registers a supervisor while it runs.
struct RunningGuard(u32);

impl RunningGuard {
    fn register(pid: u32) -> RunningGuard {
        if let Ok(mut running) = RUNNING.lock() {
            running.push(pid);
        }
        RunningGuard(pid)
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        if let Ok(mut running) = RUNNING.lock() {
            running.retain(|pid| *pid != self.0);
        }
    }
}

/// Ask every running sandbox to stop: their supervisors forward SIGTERM to the command and
/// kill it 5 seconds later. Used when a build is cancelled (Ctrl-C).
pub fn terminate_all() {
    signal_running(libc::SIGTERM);
    // A command may ignore SIGTERM (a shell as PID 1 of its namespace does): a second signal
    // makes the supervisors kill it at once, so a cancel never waits out the grace period.
    std::thread::spawn(|| {
        std::thread::sleep(std::time::Duration::from_secs(1));
        signal_running(libc::SIGTERM);
    });
}

fn signal_running(signal: libc::c_int) {
    let Ok(running) = RUNNING.lock() else { return };
    for pid in running.iter() {
        if let Ok(pid) = i32::try_from(*pid) {
            // SAFETY: kill(2) with a pid we spawned and have not reaped yet (the guard is
            // dropped only after wait() returns, and it holds this lock to unregister).
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }
}

/// Checks what the child cannot report well once it is running.
fn validate(spec: &SandboxSpec) -> Result<(), SandboxError> {
    let invalid = |message: String| Err(SandboxError::InvalidSpec { message });
    for (name, path) in [
        ("upperdir", &spec.upperdir),
        ("overlay_workdir", &spec.overlay_workdir),
    ] {
        if !path.is_absolute() {
            return invalid(format!("{name} {} is not absolute", path.display()));
        }
    }
    for lowerdir in &spec.lowerdirs {
        if !lowerdir.is_absolute() {
            return invalid(format!(
                "lower directory {} is not absolute",
                lowerdir.display()
            ));
        }
    }
    if let Task::Run(run) = &spec.task {
        let host_paths = run
            .cache_mounts
            .iter()
            .chain(&run.secret_files)
            .chain(&run.ssh_sockets);
        if let Some((host_path, _)) = host_paths.into_iter().find(|(path, _)| !path.is_absolute()) {
            return invalid(format!("host path {} is not absolute", host_path.display()));
        }
        if let Some((host_path, _, _)) = run
            .bind_mounts
            .iter()
            .find(|(path, _, _)| !path.is_absolute())
        {
            return invalid(format!("host path {} is not absolute", host_path.display()));
        }
        if let Some(lowerdir) = run
            .stage_binds
            .iter()
            .flat_map(|bind| &bind.lowerdirs)
            .find(|path| !path.is_absolute())
        {
            return invalid(format!(
                "lower directory {} is not absolute",
                lowerdir.display()
            ));
        }
        if run.argv.is_empty() {
            return invalid("the command is empty".to_string());
        }
        let targets = run
            .cache_mounts
            .iter()
            .map(|(_, target)| ("cache mount", target))
            .chain(run.tmpfs_mounts.iter().map(|(target, _)| ("tmpfs", target)))
            .chain(
                run.bind_mounts
                    .iter()
                    .map(|(_, target, _)| ("bind mount", target)),
            )
            .chain(
                run.secret_files
                    .iter()
                    .map(|(_, target)| ("secret", target)),
            )
            .chain(
                run.ssh_sockets
                    .iter()
                    .map(|(_, target)| ("ssh socket", target)),
            )
            .chain(
                run.stage_binds
                    .iter()
                    .map(|bind| ("bind mount", &bind.target)),
            );
        for (kind, target) in targets {
            if !target.starts_with('/') {
                return invalid(format!("{kind} target `{target}` is not an absolute path"));
            }
        }
        let strings = run
            .argv
            .iter()
            .chain(run.env.iter().flat_map(|(key, value)| [key, value]))
            .chain([&run.cwd, &run.user, &run.hostname]);
        for text in strings {
            if text.contains('\0') {
                return invalid(format!("`{}` contains a NUL byte", text.escape_debug()));
            }
        }
        if let Some((key, _)) = run
            .env
            .iter()
            .find(|(key, _)| key.is_empty() || key.contains('='))
        {
            return invalid(format!(
                "environment variable name `{key}` is empty or contains `=`"
            ));
        }
    }
    Ok(())
}

/// Reads `reader` to the end, calling `on_line` per `\n`-terminated line (and for the last,
/// unterminated one). Over-long lines are cut into pieces so memory stays bounded.
/// Reads two streams to their ends at once, one thread each, handing every line to `on_line`
/// on the calling thread as it arrives.
fn read_both(
    stdout: impl Read + Send,
    stderr: impl Read + Send,
    on_line: &mut dyn FnMut(Stream, &str),
) -> std::io::Result<()> {
    let (sender, receiver) = std::sync::mpsc::channel::<(Stream, String)>();
    std::thread::scope(|scope| {
        let readers: Vec<_> = [(Stream::Stdout, Box::new(stdout) as Box<dyn Read + Send>)]
            .into_iter()
            .chain([(Stream::Stderr, Box::new(stderr) as Box<dyn Read + Send>)])
            .map(|(stream, reader)| {
                let sender = sender.clone();
                scope.spawn(move || {
                    split_lines(reader, &mut |line| {
                        let _ = sender.send((stream, line.to_string()));
                    })
                })
            })
            .collect();
        drop(sender);
        for (stream, line) in receiver {
            on_line(stream, &line);
        }
        readers.into_iter().try_for_each(|reader| {
            reader
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("a reader thread panicked")))
        })
    })
}

fn split_lines(mut reader: impl Read, on_line: &mut dyn FnMut(&str)) -> std::io::Result<()> {
    const MAX_LINE: usize = 64 * 1024;
    let mut pending: Vec<u8> = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    let emit = |bytes: &[u8], on_line: &mut dyn FnMut(&str)| {
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        // What a terminal finally shows for `progress\rprogress\rdone`.
        let shown = match bytes.iter().rposition(|&byte| byte == b'\r') {
            Some(position) => &bytes[position + 1..],
            None => bytes,
        };
        on_line(&String::from_utf8_lossy(shown));
    };
    loop {
        let count = match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(count) => count,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        pending.extend_from_slice(&buffer[..count]);
        let mut start = 0;
        while let Some(offset) = pending[start..].iter().position(|&byte| byte == b'\n') {
            emit(&pending[start..start + offset], on_line);
            start += offset + 1;
        }
        pending.drain(..start);
        if pending.len() > MAX_LINE {
            emit(&pending, on_line);
            pending.clear();
        }
    }
    if !pending.is_empty() {
        emit(&pending, on_line);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(input: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        split_lines(input, &mut |line| lines.push(line.to_string())).expect("read");
        lines
    }

    #[test]
    fn output_is_split_into_lines_as_a_terminal_shows_them() {
        assert_eq!(
            lines_of(b"one\r\ntwo\n10%\r50%\rdone\nlast"),
            ["one", "two", "done", "last"]
        );
        assert_eq!(lines_of(b"\n\n"), ["", ""]);
        assert_eq!(lines_of(b""), Vec::<String>::new());
    }

    #[test]
    fn invalid_specs_are_rejected_before_spawning() {
        let spec = SandboxSpec {
            lowerdirs: vec![],
            upperdir: PathBuf::from("/tmp/upper"),
            overlay_workdir: PathBuf::from("/tmp/work"),
            overlay: overlay::Overlay::Native,
            task: Task::Run(RunTask {
                argv: vec![],
                env: vec![],
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
            }),
        };
        let error = run_sandbox(Path::new("/nonexistent"), &spec, &mut |_| {});
        assert!(
            matches!(error, Err(SandboxError::InvalidSpec { .. })),
            "{error:?}"
        );
    }

    #[test]
    fn durations_are_shown_as_written() {
        assert_eq!(format_duration(2_000), "2s");
        assert_eq!(format_duration(600_000), "10m");
        assert_eq!(format_duration(5_400_000), "1h30m");
        assert_eq!(format_duration(90_000), "1m30s");
        assert_eq!(format_duration(1_500), "1500ms");
        assert_eq!(
            ExitStatusKind::TimedOut { millis: 2_000 }.to_string(),
            "killed after its timeout of 2s"
        );
        assert!(!ExitStatusKind::ProcessLimit { max: 8 }.success());
    }

    #[test]
    fn reports_round_trip_as_single_json_lines() {
        let report = ChildReport::ExecNotFound {
            program: "foo".to_string(),
            path: "/usr/bin:/bin".to_string(),
        };
        let line = serde_json::to_string(&report).expect("serialize");
        assert!(!line.contains('\n'));
        assert_eq!(
            serde_json::from_str::<ChildReport>(&line).expect("parse"),
            report
        );
    }
}
