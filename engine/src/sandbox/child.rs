//! The sandbox child: the supervisor process and PID 1 of the sandbox. See the parent
//! module's docs for the process layout and the synthetic-layer design.
//!
//! Long because it is one sequence that must run in order in one single-threaded process
//! (unshare, mounts, pivot_root, confinement, exec, supervision); splitting it would scatter
//! the order that makes it safe.
//!
//! Everything here runs in a process that must stay single-threaded: it forks without exec
//! and unshares a mount namespace. Failures are reported as [`ChildReport`]s on stderr.

use std::ffi::{CString, OsString};
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Pid, Uid, fork};

use super::confine;
use super::copy_task::copy_in_sandbox;
use super::fuse::FuseMount;
use super::limits::{self, StepCgroup};
use super::overlay::Overlay;
use super::user::resolve_user;
use super::{
    ChildReport, ChildRequest, DEFAULT_PATH, ExitStatusKind, NetworkMode, RunTask, SandboxSpec,
    Task,
};

mod stage_bind;

/// How long PID 1 has to exit after a forwarded SIGTERM/SIGINT/SIGHUP before SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// Host device nodes bind-mounted into the sandbox's `/dev`.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// `/proc` entries made read-only in a step (as runc does).
const PROC_READ_ONLY: [&str; 5] = ["sys", "sysrq-trigger", "irq", "bus", "fs"];

/// `/proc` entries hidden in a step: files under `/dev/null`, directories under an empty
/// read-only tmpfs (as runc does).
const PROC_MASKED: [&str; 9] = [
    "kcore",
    "keys",
    "timer_list",
    "timer_stats",
    "sched_debug",
    "latency_stats",
    "acpi",
    "scsi",
    "asound",
];

/// The sandbox child's entry point: call it first thing in `main` when
/// `argv[1] == SANDBOX_ARG`. Never returns.
pub fn child_main() -> ! {
    // Read the host's /etc/passwd and /etc/subuid for rootless error messages while they are
    // still the host's (before pivot_root).
    if crate::rootless::in_user_namespace() {
        let _ = crate::rootless::chown_error_help();
    }
    let report = match supervise() {
        Ok(report) => report,
        Err(failure) => failure.into_report(),
    };
    if let Ok(mut line) = serde_json::to_string(&report) {
        line.push('\n');
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
    std::process::exit(0)
}

/// A setup step that failed.
struct Failure {
    step: String,
    message: String,
    not_found: Option<(String, String)>,
}

impl Failure {
    fn new(step: impl Into<String>, message: impl ToString) -> Failure {
        Failure {
            step: step.into(),
            message: message.to_string(),
            not_found: None,
        }
    }

    fn into_report(self) -> ChildReport {
        match self.not_found {
            Some((program, path)) => ChildReport::ExecNotFound { program, path },
            None => ChildReport::SetupFailed {
                step: self.step,
                message: self.message,
            },
        }
    }
}

/// `result.map_err(step("mount /proc"))`.
fn step<E: std::fmt::Display>(name: impl Into<String>) -> impl FnOnce(E) -> Failure {
    let name = name.into();
    move |error| Failure::new(name, error)
}

fn supervise() -> Result<ChildReport, Failure> {
    // Signals wait for the supervision loop; PID 1 unblocks them before exec.
    let mut signals = SigSet::empty();
    for signal in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        signals.add(signal);
    }
    signals.thread_block().map_err(step("block signals"))?;

    let threads = fs::read_dir("/proc/self/task")
        .map(|tasks| tasks.count())
        .unwrap_or(1);
    if threads > 1 {
        return Err(Failure::new(
            "start",
            format!(
                "the sandbox process has {threads} threads; the binary must call \
                 graphbuild_engine::sandbox::child_main before starting any thread"
            ),
        ));
    }

    let mut request = Vec::new();
    std::io::stdin()
        .read_to_end(&mut request)
        .map_err(step("read the sandbox request"))?;
    let request: ChildRequest =
        serde_json::from_slice(&request).map_err(step("parse the sandbox request"))?;
    redirect_to_dev_null(0).map_err(step("redirect stdin"))?;

    // The pid namespace comes later, just before PID 1 is forked: a fuse-overlayfs daemon
    // started before must stay out of it (it would become its PID 1).
    let mut flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC;
    if let Task::Run(run) = &request.spec.task
        && run.network == NetworkMode::None
    {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    unshare(flags).map_err(step("unshare namespaces"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(step("make mounts private"))?;

    let scratch = &request.scratch_dir;
    mount(
        Some("tmpfs"),
        scratch,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0700"),
    )
    .map_err(step(format!("mount a tmpfs on {}", scratch.display())))?;
    let layout = ScratchLayout::create(scratch, &request.spec)?;

    match &request.spec.task {
        Task::ProbeOverlay => {
            let root = layout.mount_overlay(&request.spec)?;
            root.unmount(&request.spec)?;
            Ok(ChildReport::Probed)
        }
        Task::Copy(task) => {
            let root = layout.mount_overlay(&request.spec)?;
            let result = copy_in_sandbox(&layout.root, task);
            root.unmount(&request.spec)?;
            Ok(match result {
                Ok(()) => ChildReport::CopyDone,
                Err(error) => ChildReport::CopyFailed {
                    message: error.to_string(),
                    help: error.help(),
                },
            })
        }
        Task::Run(run) => {
            let mut run = run.clone();
            let _stage_views =
                stage_bind::mount_views(scratch, &request.spec.overlay, &mut run.stage_binds)?;
            let run = &run;
            let targets = mount_targets(run);
            let resolved = layout.resolve_targets(&request.spec, &targets)?;
            let root = layout.mount_overlay(&request.spec)?;
            let hostname = if run.hostname.is_empty() {
                "graphbuild"
            } else {
                &run.hostname
            };
            nix::unistd::sethostname(hostname).map_err(step("set the hostname"))?;
            let cgroup = run.max_processes.and_then(|max| {
                match limits::locate().and_then(|location| StepCgroup::create(&location, max)) {
                    Ok(cgroup) => Some(cgroup),
                    Err(reason) => {
                        notice(format!(
                            "the process limit of steps is only approximate, checked every 100ms (no \
                             usable pids cgroup: {reason})"
                        ));
                        None
                    }
                }
            });
            unshare(CloneFlags::CLONE_NEWPID).map_err(step("unshare the pid namespace"))?;
            let report = run_pid1(&layout.root, run, &resolved, cgroup.as_ref())?;
            root.unmount(&request.spec)?;
            drop(cgroup);
            Ok(report)
        }
    }
}

/// Reports a notice to the engine now (the final report comes last).
fn notice(text: String) {
    if let Ok(mut line) = serde_json::to_string(&ChildReport::Notice(text)) {
        line.push('\n');
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
}

fn redirect_to_dev_null(fd: i32) -> std::io::Result<()> {
    let null = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    // SAFETY: dup2 on valid descriptors.
    if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The step's merged root, mounted; unmounted on drop when [`RootMount::unmount`] was not
/// reached (a failed setup step).
struct RootMount {
    path: PathBuf,
    fuse: Option<FuseMount>,
    /// fuse-overlayfs's lower layers, top-most first (the synthetic layer, then the image's).
    lowers: Vec<PathBuf>,
    mounted: bool,
}

impl RootMount {
    /// Unmounts, and for fuse-overlayfs waits for its daemon and converts the upper directory
    /// to the kernel's form ([`super::fuse`]).
    fn unmount(mut self, spec: &SandboxSpec) -> Result<(), Failure> {
        self.mounted = false;
        match self.fuse.take() {
            Some(fuse) => {
                fuse.unmount()
                    .map_err(step("unmount the root filesystem (fuse-overlayfs)"))?;
                let unlike =
                    super::fuse::convert_upper(&spec.upperdir, &self.lowers, opaque_xattr())
                        .map_err(step("convert fuse-overlayfs's upper directory"))?;
                if let Some(first) = unlike.first() {
                    notice(format!(
                        "fuse-overlayfs does not give entries created in a setgid directory its \
                         group (or setgid bit): {first}{} may differ from a build on the kernel's \
                         overlayfs (docs/security.md, Rootless)",
                        if unlike.len() > 1 {
                            format!(" and {} more", unlike.len() - 1)
                        } else {
                            String::new()
                        }
                    ));
                }
                Ok(())
            }
            None => {
                unmount_root(&self.path);
                Ok(())
            }
        }
    }
}

impl Drop for RootMount {
    fn drop(&mut self) {
        // A fuse-overlayfs mount ends with its daemon (FuseMount's own drop).
        if self.mounted && self.fuse.take().is_none() {
            unmount_root(&self.path);
        }
    }
}

fn unmount_root(root: &Path) {
    // Synchronous when nothing uses it any more (PID 1 and its namespace are gone), so the
    // upper directory is complete and free when the engine reads it.
    if umount2(root, MntFlags::empty()).is_err() {
        let _ = umount2(root, MntFlags::MNT_DETACH);
    }
}

/// The attribute that marks an opaque directory for the kernel's overlayfs here.
fn opaque_xattr() -> &'static [u8] {
    if crate::rootless::in_user_namespace() {
        b"user.overlay.opaque"
    } else {
        b"trusted.overlay.opaque"
    }
}

/// Directories on the private tmpfs, which is also the working directory while mounting,
/// so overlay options can use short relative paths.
struct ScratchLayout {
    /// The private tmpfs itself (fuse-overlayfs runs there and logs there).
    scratch: PathBuf,
    /// `scratch/synthetic`: the top-most lower layer with the sandbox's mount points.
    synthetic: PathBuf,
    /// `scratch/empty`: an empty layer.
    empty: PathBuf,
    /// `scratch/probe`: the lower layers mounted read-only, to resolve targets.
    probe: PathBuf,
    /// `scratch/root`: the merged root.
    root: PathBuf,
}

impl ScratchLayout {
    fn create(scratch: &Path, spec: &SandboxSpec) -> Result<ScratchLayout, Failure> {
        let layout = ScratchLayout {
            scratch: scratch.to_path_buf(),
            synthetic: scratch.join("synthetic"),
            empty: scratch.join("empty"),
            probe: scratch.join("probe"),
            root: scratch.join("root"),
        };
        for dir in [
            &layout.synthetic,
            &layout.empty,
            &layout.probe,
            &layout.root,
        ] {
            fs::create_dir(dir).map_err(step(format!("create {}", dir.display())))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
                .map_err(step(format!("chmod {}", dir.display())))?;
        }
        // overlayfs options are limited to a page: refer to layers through short symlinks
        // (as Docker's overlay2 does), which also spares escaping `:` and `,` in paths.
        fs::create_dir(scratch.join("l")).map_err(step("create the layer links"))?;
        for (index, lowerdir) in spec.lowerdirs.iter().enumerate() {
            if !lowerdir.is_dir() {
                return Err(Failure::new(
                    "check the layers",
                    format!("lower directory {} does not exist", lowerdir.display()),
                ));
            }
            std::os::unix::fs::symlink(lowerdir, scratch.join("l").join(index.to_string()))
                .map_err(step("create the layer links"))?;
        }
        for (name, target) in [("u", &spec.upperdir), ("w", &spec.overlay_workdir)] {
            std::os::unix::fs::symlink(target, scratch.join(name))
                .map_err(step("create the layer links"))?;
        }
        std::env::set_current_dir(scratch).map_err(step("enter the scratch directory"))?;
        Ok(layout)
    }

    fn lower_links(spec: &SandboxSpec) -> Vec<String> {
        (0..spec.lowerdirs.len())
            .map(|index| format!("l/{index}"))
            .collect()
    }

    /// Resolves `targets` inside the image and fills the synthetic layer with what is
    /// missing. Returns the targets' resolved paths, relative to the root.
    fn resolve_targets(
        &self,
        spec: &SandboxSpec,
        targets: &[MountTarget],
    ) -> Result<Vec<PathBuf>, Failure> {
        // The view to resolve in: the lower layers (plus the upper directory when a previous
        // task left something in it). A read-only overlay needs two layers at least.
        let upper_has_content = fs::read_dir(&spec.upperdir)
            .map(|mut entries| entries.next().is_some())
            .unwrap_or(false);
        let mut layers = Vec::new();
        if upper_has_content {
            layers.push("u".to_string());
        }
        layers.extend(Self::lower_links(spec));
        let mut fuse_view = None;
        let view: &Path = if layers.is_empty() {
            &self.empty
        } else if let Overlay::Fuse { program } = &spec.overlay {
            let options = format!("lowerdir={}", layers.join(":"));
            fuse_view = Some(
                FuseMount::mount(
                    program,
                    &options,
                    &self.probe,
                    &self.scratch,
                    self.scratch.join("fuse-probe.log"),
                )
                .map_err(step("mount the layers read-only (fuse-overlayfs)"))?,
            );
            &self.probe
        } else {
            layers.push("empty".to_string());
            let options = format!("lowerdir={}{}", layers.join(":"), userxattr());
            mount(
                Some("overlay"),
                "probe",
                Some("overlay"),
                MsFlags::MS_RDONLY,
                Some(options.as_str()),
            )
            .map_err(step("mount the layers read-only (overlayfs)"))?;
            &self.probe
        };

        let result = self.fill_synthetic(view, targets);
        match fuse_view {
            Some(fuse) => fuse
                .unmount()
                .map_err(step("unmount the layers (fuse-overlayfs)"))?,
            None if view == self.probe => {
                let _ = umount2(&self.probe, MntFlags::MNT_DETACH);
            }
            None => {}
        }
        result
    }

    fn fill_synthetic(
        &self,
        view: &Path,
        targets: &[MountTarget],
    ) -> Result<Vec<PathBuf>, Failure> {
        let mut resolved_targets = Vec::new();
        // (synthetic copy of an existing directory, where its attributes come from)
        let mut copied_dirs: Vec<(PathBuf, PathBuf)> = Vec::new();
        for target in targets {
            let what = format!("{} {}", target.kind.describe(), target.path);
            let (existing, missing) =
                resolve_in_root(view, &target.path).map_err(step(format!("resolve {what}")))?;
            let existing_path = view.join(&existing);
            if missing.is_empty() {
                let metadata =
                    fs::metadata(&existing_path).map_err(step(format!("inspect {what}")))?;
                let fits = match target.kind {
                    TargetKind::Directory => metadata.is_dir(),
                    TargetKind::File => !metadata.is_dir(),
                };
                if !fits {
                    return Err(Failure::new(
                        format!("prepare {what}"),
                        format!(
                            "/{} exists in the image and is {}a directory",
                            existing.display(),
                            if metadata.is_dir() { "" } else { "not " }
                        ),
                    ));
                }
                resolved_targets.push(existing);
                continue;
            }
            // Copies of the existing parents, then the missing entries.
            let mut relative = PathBuf::new();
            for component in std::iter::once(None).chain(existing.components().map(Some)) {
                if let Some(component) = component {
                    relative.push(component);
                }
                let synthetic_dir = self.synthetic.join(&relative);
                if !synthetic_dir.exists() {
                    fs::create_dir(&synthetic_dir).map_err(step(format!("prepare {what}")))?;
                }
                if !copied_dirs.iter().any(|(dir, _)| *dir == synthetic_dir) {
                    copied_dirs.push((synthetic_dir, view.join(&relative)));
                }
            }
            for (index, name) in missing.iter().enumerate() {
                relative.push(name);
                let path = self.synthetic.join(&relative);
                let last = index + 1 == missing.len();
                let created = if last && target.kind == TargetKind::File {
                    fs::File::create(&path).map(drop)
                } else if path.is_dir() {
                    Ok(())
                } else {
                    fs::create_dir(&path).and_then(|()| {
                        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
                    })
                };
                created.map_err(step(format!("prepare {what}")))?;
            }
            resolved_targets.push(relative);
        }
        // Deepest first, after every child exists, so the times stick.
        for (synthetic_dir, source) in copied_dirs.iter().rev() {
            copy_attributes(source, synthetic_dir)
                .map_err(step(format!("copy the attributes of {}", source.display())))?;
        }
        Ok(resolved_targets)
    }

    fn mount_overlay(&self, spec: &SandboxSpec) -> Result<RootMount, Failure> {
        let mut lowers = vec!["synthetic".to_string()];
        lowers.extend(Self::lower_links(spec));
        if let Overlay::Fuse { program } = &spec.overlay {
            // The same layers; fuse-overlayfs has no index, redirects or metadata-only
            // copy-ups to turn off. `nodev` as below.
            let options = format!("lowerdir={},upperdir=u,workdir=w,nodev", lowers.join(":"));
            let fuse = FuseMount::mount(
                program,
                &options,
                &self.root,
                &self.scratch,
                self.scratch.join("fuse-root.log"),
            )
            .map_err(|message| {
                Failure::new(
                    "mount the root filesystem (fuse-overlayfs)",
                    format!(
                        "{message} (upper {}, work {}, {} lower layers)",
                        spec.upperdir.display(),
                        spec.overlay_workdir.display(),
                        spec.lowerdirs.len()
                    ),
                )
            })?;
            return Ok(RootMount {
                path: self.root.clone(),
                fuse: Some(fuse),
                lowers: std::iter::once(self.synthetic.clone())
                    .chain(spec.lowerdirs.iter().cloned())
                    .collect(),
                mounted: true,
            });
        }
        // Layers must stay portable: no index, no redirects, no metadata-only copy-ups.
        // In a user namespace `redirect_dir=off` (create none, follow) conflicts with
        // `userxattr`; `nofollow` creates none either.
        let options = format!(
            "lowerdir={},upperdir=u,workdir=w,index=off,redirect_dir={},metacopy=off{}",
            lowers.join(":"),
            if userxattr().is_empty() {
                "off"
            } else {
                "nofollow"
            },
            userxattr()
        );
        // nodev: device nodes in the image are data, never a way to the host's devices.
        mount(
            Some("overlay"),
            "root",
            Some("overlay"),
            MsFlags::MS_NODEV,
            Some(options.as_str()),
        )
        .map_err(|error| {
            Failure::new(
                super::MOUNT_ROOT_STEP,
                format!(
                    "{error} (upper {}, work {}, {} lower layers)",
                    spec.upperdir.display(),
                    spec.overlay_workdir.display(),
                    spec.lowerdirs.len()
                ),
            )
        })?;
        Ok(RootMount {
            path: self.root.clone(),
            fuse: None,
            lowers: Vec::new(),
            mounted: true,
        })
    }
}

fn copy_attributes(source: &Path, destination: &Path) -> std::io::Result<()> {
    let metadata = fs::metadata(source)?;
    std::os::unix::fs::chown(destination, Some(metadata.uid()), Some(metadata.gid()))?;
    fs::set_permissions(
        destination,
        fs::Permissions::from_mode(metadata.mode() & 0o7777),
    )?;
    let times = fs::FileTimes::new()
        .set_accessed(metadata.accessed()?)
        .set_modified(metadata.modified()?);
    fs::File::open(destination)?.set_times(times)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum TargetKind {
    Directory,
    File,
}

impl TargetKind {
    fn describe(self) -> &'static str {
        match self {
            TargetKind::Directory => "mount point",
            TargetKind::File => "file mount point",
        }
    }
}

#[derive(Debug)]
struct MountTarget {
    path: String,
    kind: TargetKind,
}

/// In order: /proc, /dev, cache mounts, tmpfs mounts, bind mounts, secrets, ssh sockets,
/// binds from stages, /etc/resolv.conf (host network).
fn mount_targets(run: &RunTask) -> Vec<MountTarget> {
    let directory = |path: &str| MountTarget {
        path: path.to_string(),
        kind: TargetKind::Directory,
    };
    let file = |path: &str| MountTarget {
        path: path.to_string(),
        kind: TargetKind::File,
    };
    let mut targets = vec![directory("/proc"), directory("/dev")];
    targets.extend(run.cache_mounts.iter().map(|(_, target)| directory(target)));
    targets.extend(run.tmpfs_mounts.iter().map(|(target, _)| directory(target)));
    targets.extend(run.bind_mounts.iter().map(|(_, target, is_dir)| {
        if *is_dir {
            directory(target)
        } else {
            file(target)
        }
    }));
    targets.extend(run.secret_files.iter().map(|(_, target)| file(target)));
    targets.extend(run.ssh_sockets.iter().map(|(_, target)| file(target)));
    targets.extend(
        stage_bind::targets(&run.stage_binds).map(|(target, is_dir)| {
            if is_dir {
                directory(target)
            } else {
                file(target)
            }
        }),
    );
    if run.network == NetworkMode::Host && Path::new("/etc/resolv.conf").exists() {
        targets.push(file("/etc/resolv.conf"));
    }
    targets
}

/// Why a mount target cannot be resolved inside the image.
#[derive(Debug, thiserror::Error)]
enum ResolveInRootError {
    #[error("too many levels of symbolic links in {0}")]
    SymlinkLoop(String),
    /// A component that is followed by more is not a directory (`/` + the path inside root).
    #[error("/{} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Resolves absolute `path` inside `root` as the kernel would after a chroot: symlinks are
/// followed (absolute ones restart at `root`), `..` stops at `root`. Returns the existing
/// resolved part (relative to root, free of symlinks) and the missing components after it.
fn resolve_in_root(
    root: &Path,
    path: &str,
) -> Result<(PathBuf, Vec<OsString>), ResolveInRootError> {
    const MAX_SYMLINKS: usize = 40;
    let mut pending: std::collections::VecDeque<OsString> = components(Path::new(path));
    let mut resolved: Vec<OsString> = Vec::new();
    let mut missing: Vec<OsString> = Vec::new();
    let mut symlinks = 0;
    while let Some(component) = pending.pop_front() {
        if component == ".." {
            if missing.pop().is_none() {
                resolved.pop();
            }
            continue;
        }
        if !missing.is_empty() {
            missing.push(component);
            continue;
        }
        let candidate: PathBuf = root
            .join(resolved.iter().collect::<PathBuf>())
            .join(&component);
        match fs::symlink_metadata(&candidate) {
            Ok(metadata) if metadata.file_type().is_symlink() => {
                symlinks += 1;
                if symlinks > MAX_SYMLINKS {
                    return Err(ResolveInRootError::SymlinkLoop(path.to_string()));
                }
                let link = fs::read_link(&candidate).map_err(|source| ResolveInRootError::Io {
                    path: candidate.clone(),
                    source,
                })?;
                if link.is_absolute() {
                    resolved.clear();
                }
                for part in components(&link).into_iter().rev() {
                    pending.push_front(part);
                }
            }
            Ok(metadata) => {
                if !metadata.is_dir() && !pending.is_empty() {
                    return Err(ResolveInRootError::NotADirectory(
                        resolved.iter().collect::<PathBuf>().join(&component),
                    ));
                }
                resolved.push(component);
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => missing.push(component),
            Err(source) => {
                return Err(ResolveInRootError::Io {
                    path: candidate,
                    source,
                });
            }
        }
    }
    Ok((resolved.iter().collect(), missing))
}

fn components(path: &Path) -> std::collections::VecDeque<OsString> {
    path.components()
        .filter_map(|component| match component {
            Component::Normal(name) => Some(name.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

/// Forks PID 1, waits for it to exec (or to report why it could not), then supervises it.
fn run_pid1(
    root: &Path,
    run: &RunTask,
    targets: &[PathBuf],
    cgroup: Option<&StepCgroup>,
) -> Result<ChildReport, Failure> {
    let (error_read, error_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(step("create a pipe"))?;
    // PID 1 waits for a byte on this pipe: the supervisor first moves it into the step's
    // cgroup, before it can start any other process.
    let (go_read, go_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(step("create a pipe"))?;
    // SAFETY: this process is single-threaded (checked in `supervise`).
    match unsafe { fork() }.map_err(step("fork the sandbox's first process"))? {
        ForkResult::Child => {
            drop(error_read);
            drop(go_write);
            let mut go = [0u8; 1];
            if !matches!(fs::File::from(go_read).read(&mut go), Ok(1)) {
                // The supervisor is gone.
                // SAFETY: leave without running the supervisor's exit handlers.
                unsafe { libc::_exit(127) }
            }
            let failure = match pid1(root, run, targets) {
                Err(failure) => failure,
                Ok(never) => match never {},
            };
            let mut error_write = fs::File::from(error_write);
            if let Ok(report) = serde_json::to_vec(&failure.into_report()) {
                let _ = error_write.write_all(&report);
            }
            // SAFETY: leave without running the supervisor's exit handlers.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => {
            drop(error_write);
            drop(go_read);
            let cgroup = cgroup.and_then(|cgroup| match cgroup.add(child.as_raw()) {
                Ok(()) => Some(cgroup),
                Err(error) => {
                    notice(format!(
                        "the process limit of steps is only approximate, checked every 100ms \
                         (cannot join the pids cgroup: {error})"
                    ));
                    None
                }
            });
            // If this fails, PID 1 reads EOF and exits: the reports below say so.
            let _ = fs::File::from(go_write).write_all(b"g");
            // The supervisor must not keep the output pipes open: the engine reads them to EOF.
            redirect_to_dev_null(1).map_err(step("redirect stdout"))?;
            if run.separate_stderr {
                redirect_to_dev_null(super::STDERR_FD).map_err(step("redirect stderr"))?;
            }
            let mut setup_error = Vec::new();
            let _ = fs::File::from(error_read).read_to_end(&mut setup_error);
            if !setup_error.is_empty() {
                let _ = waitpid(child, None);
                return match serde_json::from_slice::<ChildReport>(&setup_error) {
                    Ok(report) => Ok(report),
                    Err(_) => Err(Failure::new(
                        "start the command",
                        String::from_utf8_lossy(&setup_error),
                    )),
                };
            }
            let limits = Limits {
                deadline: run
                    .timeout_ms
                    .map(|millis| (Instant::now() + Duration::from_millis(millis), millis)),
                counted_max: run.max_processes.filter(|_| cgroup.is_none()),
                cgroup,
            };
            supervise_pid1(child, &limits).map(ChildReport::Finished)
        }
    }
}

/// The limits the supervisor enforces on a running step.
struct Limits<'a> {
    /// When the step times out, and its timeout in milliseconds.
    deadline: Option<(Instant, u64)>,
    cgroup: Option<&'a StepCgroup>,
    /// Without a cgroup: the process limit, checked by counting the step's processes.
    counted_max: Option<u32>,
}

/// How many processes the pid namespace of `pid1` holds, from the `/proc` mounted in its root
/// (the supervisor is outside that namespace).
fn count_processes(pid1: Pid) -> usize {
    fs::read_dir(format!("/proc/{}/root/proc", pid1.as_raw()))
        .map(|entries| {
            entries
                .flatten()
                .filter(|entry| {
                    entry
                        .file_name()
                        .to_str()
                        .is_some_and(|name| name.bytes().all(|byte| byte.is_ascii_digit()))
                })
                .count()
        })
        .unwrap_or(0)
}

/// How often the process limit is checked.
const LIMIT_POLL: Duration = Duration::from_millis(100);

/// Waits for PID 1, forwarding termination signals, escalating to SIGKILL, and kills it (and
/// with it the whole pid namespace) when it runs past its timeout or its process limit.
fn supervise_pid1(pid1: Pid, limits: &Limits) -> Result<ExitStatusKind, Failure> {
    let mut kill_deadline: Option<Instant> = None;
    let mut killed_for: Option<ExitStatusKind> = None;
    let kill = || {
        // SAFETY: kill(2) on our child.
        unsafe { libc::kill(pid1.as_raw(), libc::SIGKILL) };
        if let Some(cgroup) = limits.cgroup {
            cgroup.kill_all();
        }
    };
    loop {
        let ended = match waitpid(pid1, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => Some(ExitStatusKind::Exited(code)),
            Ok(WaitStatus::Signaled(_, signal, _)) => Some(ExitStatusKind::Signaled(signal as i32)),
            Ok(_) => None,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(error) => return Err(Failure::new("wait for the command", error)),
        };
        if let Some(status) = ended {
            // PID 1 is reaped only after every process of its namespace is gone; a step that
            // hit its process limit fails even when its first process exited by itself.
            if let Some(cgroup) = limits.cgroup
                && killed_for.is_none()
                && cgroup.limit_reached()
            {
                return Ok(ExitStatusKind::ProcessLimit { max: cgroup.max });
            }
            return Ok(killed_for.unwrap_or(status));
        }
        if killed_for.is_none() {
            if let Some((deadline, millis)) = limits.deadline
                && Instant::now() >= deadline
            {
                killed_for = Some(ExitStatusKind::TimedOut { millis });
                kill();
            } else if let Some(cgroup) = limits.cgroup
                && cgroup.limit_reached()
            {
                killed_for = Some(ExitStatusKind::ProcessLimit { max: cgroup.max });
                kill();
            } else if let Some(max) = limits.counted_max
                && count_processes(pid1) > max as usize
            {
                killed_for = Some(ExitStatusKind::ProcessLimit { max });
                kill();
            }
        }
        let mut timeout = match kill_deadline {
            Some(deadline) => deadline.saturating_duration_since(Instant::now()),
            None => Duration::from_secs(1),
        };
        if let Some((deadline, _)) = limits.deadline {
            timeout = timeout.min(deadline.saturating_duration_since(Instant::now()));
        }
        if limits.cgroup.is_some() || limits.counted_max.is_some() || killed_for.is_some() {
            timeout = timeout.min(LIMIT_POLL);
        }
        match wait_for_signal(timeout) {
            Some(signal @ (libc::SIGTERM | libc::SIGINT | libc::SIGHUP)) => {
                if kill_deadline.is_some() {
                    // SAFETY: kill(2) on our child.
                    unsafe { libc::kill(pid1.as_raw(), libc::SIGKILL) };
                } else {
                    // SAFETY: kill(2) on our child.
                    unsafe { libc::kill(pid1.as_raw(), signal) };
                    kill_deadline = Some(Instant::now() + KILL_GRACE);
                }
            }
            _ => {
                if kill_deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                    // SAFETY: kill(2) on our child.
                    unsafe { libc::kill(pid1.as_raw(), libc::SIGKILL) };
                }
            }
        }
    }
}

/// The next blocked SIGCHLD/SIGTERM/SIGINT/SIGHUP, or `None` after `timeout`.
fn wait_for_signal(timeout: Duration) -> Option<i32> {
    // SAFETY: plain libc calls on initialized values.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, signal);
        }
        let timeout = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        let signal = libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout);
        (signal > 0).then_some(signal)
    }
}

/// PID 1: builds the sandbox's view and execs the command. Returns only on failure.
fn pid1(
    root: &Path,
    run: &RunTask,
    targets: &[PathBuf],
) -> Result<std::convert::Infallible, Failure> {
    // A session of its own: no controlling terminal, so the step cannot open the user's
    // terminal through /dev/tty and push keystrokes into it (TIOCSTI).
    nix::unistd::setsid().map_err(step("start a new session"))?;
    // Compiled while the host's files are still reachable, installed just before exec.
    let filters = if run.insecure {
        None
    } else {
        Some(confine::compile().map_err(step("prepare the seccomp filter"))?)
    };
    // Own mount namespace: the mounts below and pivot_root must not affect the supervisor.
    unshare(CloneFlags::CLONE_NEWNS).map_err(step("unshare the mount namespace"))?;

    // targets: /proc, /dev, caches…, secrets…, [resolv.conf] — as in `mount_targets`.
    let mut targets = targets.iter().map(|relative| root.join(relative));
    let mut next_target = || {
        targets
            .next()
            .ok_or_else(|| Failure::new("prepare mounts", "mount target list is short"))
    };
    let proc_dir = next_target()?;
    mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(step("mount /proc"))?;
    restrict_proc(&proc_dir)?;
    let dev_dir = next_target()?;
    mount_dev(&dev_dir)?;
    if let Some(script) = &run.script {
        let name = crate::plan::op::SCRIPT_PATH
            .strip_prefix("/dev/")
            .unwrap_or(crate::plan::op::SCRIPT_PATH);
        let path = dev_dir.join(name);
        fs::write(&path, script)
            .and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(0o644)))
            .map_err(step("write the step's script"))?;
    }

    for (host_dir, target) in &run.cache_mounts {
        let target_dir = next_target()?;
        fs::create_dir_all(host_dir).map_err(step(format!(
            "create the cache directory {}",
            host_dir.display()
        )))?;
        mount(
            Some(host_dir.as_path()),
            &target_dir,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .and_then(|()| {
            mount(
                None::<&str>,
                &target_dir,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                None::<&str>,
            )
        })
        .map_err(step(format!("mount the cache on {target}")))?;
    }
    for (target, size) in &run.tmpfs_mounts {
        let target_dir = next_target()?;
        let options = match size {
            Some(size) => format!("mode=1777,size={size}"),
            None => "mode=1777".to_string(),
        };
        mount(
            Some("tmpfs"),
            &target_dir,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(options.as_str()),
        )
        .map_err(step(format!("mount a tmpfs on {target}")))?;
    }
    for (host_path, target, _) in &run.bind_mounts {
        let target_path = next_target()?;
        // Read-only, executable (scripts from the context run as in Docker), no devices or
        // setuid.
        mount(
            Some(host_path.as_path()),
            &target_path,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .and_then(|()| {
            mount(
                None::<&str>,
                &target_path,
                None::<&str>,
                MsFlags::MS_BIND
                    | MsFlags::MS_REMOUNT
                    | MsFlags::MS_RDONLY
                    | MsFlags::MS_NOSUID
                    | MsFlags::MS_NODEV,
                None::<&str>,
            )
        })
        .map_err(step(format!("mount the build context on {target}")))?;
    }
    for (host_file, target) in &run.secret_files {
        let target_file = next_target()?;
        bind_read_only(host_file, &target_file)
            .map_err(step(format!("mount the secret on {target}")))?;
    }
    for (host_socket, target) in &run.ssh_sockets {
        let target_file = next_target()?;
        // Read-only still lets the step connect, which is all a socket is for.
        bind_read_only(host_socket, &target_file)
            .map_err(step(format!("mount the ssh agent socket on {target}")))?;
    }
    for bind in &run.stage_binds {
        stage_bind::bind_view(bind, &next_target()?)?;
    }
    if run.network == NetworkMode::Host && Path::new("/etc/resolv.conf").exists() {
        let target_file = next_target()?;
        bind_read_only(Path::new("/etc/resolv.conf"), &target_file)
            .map_err(step("mount /etc/resolv.conf"))?;
    }
    if run.network == NetworkMode::None {
        loopback_up().map_err(step("bring up the loopback interface"))?;
    }

    enter_root(root)?;

    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = fs::read_to_string("/etc/group").unwrap_or_default();
    let user = resolve_user(&run.user, &passwd, &group).map_err(step("resolve the user"))?;

    let cwd = if run.cwd.is_empty() { "/" } else { &run.cwd };
    fs::create_dir_all(cwd).map_err(step(format!("create the working directory {cwd}")))?;
    std::env::set_current_dir(cwd).map_err(step(format!("enter the working directory {cwd}")))?;

    let mut env = run.env.clone();
    let path = match env.iter().rev().find(|(key, _)| key == "PATH") {
        Some((_, path)) => path.clone(),
        None => {
            env.push(("PATH".to_string(), DEFAULT_PATH.to_string()));
            DEFAULT_PATH.to_string()
        }
    };
    if !env.iter().any(|(key, _)| key == "HOME") {
        env.push(("HOME".to_string(), user.home.clone()));
    }
    let program = find_program(&run.argv[0], &path).ok_or_else(|| Failure {
        step: "find the command".to_string(),
        message: String::new(),
        not_found: Some((run.argv[0].clone(), path.clone())),
    })?;
    let cstring = |text: &str| CString::new(text).map_err(step("prepare the command"));
    let program_c =
        CString::new(program.as_os_str().as_bytes()).map_err(step("prepare the command"))?;
    let argv = run
        .argv
        .iter()
        .map(|arg| cstring(arg))
        .collect::<Result<Vec<_>, _>>()?;
    let envp = env
        .iter()
        .map(|(key, value)| cstring(&format!("{key}={value}")))
        .collect::<Result<Vec<_>, _>>()?;

    let gids: Vec<Gid> = user
        .supplementary_gids
        .iter()
        .map(|gid| Gid::from_raw(*gid))
        .collect();
    if !run.insecure {
        confine::limit_bounding_set().map_err(step("drop capabilities"))?;
    }
    if let Some(filters) = &filters {
        // Without no_new_privs (setuid programs must work), installing a filter needs
        // CAP_SYS_ADMIN: before the capabilities go.
        confine::install(filters).map_err(step("install the seccomp filter"))?;
    }
    if let Err(error) = nix::unistd::setgroups(&gids) {
        // A rootless build without subordinate ids denies setgroups in its user namespace
        // (the kernel's rule for a single-id mapping), where no group but 0 exists anyway:
        // the step keeps the invoking user's own groups (unmapped, so shown as nobody).
        let denied = error == nix::errno::Errno::EPERM
            && fs::read_to_string("/proc/self/setgroups").is_ok_and(|text| text.trim() == "deny");
        if !denied {
            return Err(step("set supplementary groups")(error));
        }
    }
    nix::unistd::setgid(Gid::from_raw(user.gid)).map_err(unmapped("group", user.gid))?;
    nix::unistd::setuid(Uid::from_raw(user.uid)).map_err(unmapped("user", user.uid))?;
    if !run.insecure {
        confine::set_process_capabilities(user.uid == 0).map_err(step("drop capabilities"))?;
    }
    // After setuid, which clears it: die with the supervisor.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };

    // The command starts with default signal handling (Rust ignores SIGPIPE) and no mask.
    for signal in 1..32 {
        if signal != libc::SIGKILL && signal != libc::SIGSTOP {
            // SAFETY: resetting dispositions to the default.
            unsafe { libc::signal(signal, libc::SIG_DFL) };
        }
    }
    SigSet::empty()
        .thread_set_mask()
        .map_err(step("unblock signals"))?;
    // Stderr joins stdout, or is the engine's pipe of its own; every other descriptor closes
    // on exec.
    let stderr_source = if run.separate_stderr {
        super::STDERR_FD
    } else {
        1
    };
    // SAFETY: dup2/close_range on descriptor numbers.
    unsafe {
        if libc::dup2(stderr_source, 2) < 0 {
            return Err(Failure::new(
                "redirect stderr",
                std::io::Error::last_os_error(),
            ));
        }
        libc::close_range(
            3,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_int,
        );
    }

    let error = nix::unistd::execve(&program_c, &argv, &envp).unwrap_err();
    let hint = if error == nix::errno::Errno::ENOEXEC {
        " (a binary for another CPU without a binfmt_misc emulator? see `graphbuild doctor`)"
    } else {
        ""
    };
    Err(Failure::new(
        "exec the command",
        format!("exec {}: {}{hint}", program.display(), error.desc()),
    ))
}

/// setuid/setgid failed: EINVAL in a user namespace means the id is not mapped.
fn unmapped(what: &'static str, id: u32) -> impl FnOnce(nix::errno::Errno) -> Failure {
    move |error| {
        let name = format!("set the {what} id");
        if error == nix::errno::Errno::EINVAL && crate::rootless::in_user_namespace() {
            Failure::new(
                name,
                format!(
                    "{what} id {id} is not mapped in this rootless build's user namespace; {}",
                    crate::rootless::chown_error_help()
                ),
            )
        } else {
            Failure::new(name, error)
        }
    }
}

/// In a user namespace (a rootless build) overlayfs keeps its attributes in `user.overlay.*`:
/// `trusted.*` needs root in the initial namespace (see [`crate::rootless`]).
fn userxattr() -> &'static str {
    if crate::rootless::in_user_namespace() {
        ",userxattr"
    } else {
        ""
    }
}

/// A minimal /dev: a tmpfs with the host's harmless device nodes bind-mounted, the usual
/// symlinks, /dev/shm and a private /dev/pts.
fn mount_dev(dev: &Path) -> Result<(), Failure> {
    // nodev: a node made with mknod in /dev cannot be opened; the devices below are bind
    // mounts of the host's nodes, each its own mount.
    mount(
        Some("tmpfs"),
        dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
    )
    .map_err(step("mount /dev"))?;
    for device in DEVICES {
        let host = Path::new("/dev").join(device);
        if !host.exists() {
            continue;
        }
        let node = dev.join(device);
        fs::File::create(&node).map_err(step(format!("create /dev/{device}")))?;
        mount(
            Some(host.as_path()),
            &node,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(step(format!("mount /dev/{device}")))?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(link))
            .map_err(step(format!("create /dev/{link}")))?;
    }
    let shm = dev.join("shm");
    fs::create_dir(&shm).map_err(step("create /dev/shm"))?;
    mount(
        Some("shm"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=1777,size=65536k"),
    )
    .map_err(step("mount /dev/shm"))?;
    let pts = dev.join("pts");
    fs::create_dir(&pts).map_err(step("create /dev/pts"))?;
    // Optional: without it, programs needing a pseudo-terminal fail, everything else works.
    let _ = mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    );
    Ok(())
}

/// Makes [`PROC_READ_ONLY`] read-only and hides [`PROC_MASKED`] in a fresh `/proc`.
fn restrict_proc(proc_dir: &Path) -> Result<(), Failure> {
    for name in PROC_READ_ONLY {
        let path = proc_dir.join(name);
        if path.exists() {
            bind_read_only(&path, &path).map_err(step(format!("make /proc/{name} read-only")))?;
        }
    }
    for name in PROC_MASKED {
        let path = proc_dir.join(name);
        let Ok(metadata) = fs::metadata(&path) else {
            continue;
        };
        let result = if metadata.is_dir() {
            mount(
                Some("tmpfs"),
                &path,
                Some("tmpfs"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("size=0,mode=555"),
            )
        } else {
            bind_read_only(Path::new("/dev/null"), &path)
        };
        result.map_err(step(format!("mask /proc/{name}")))?;
    }
    Ok(())
}

fn bind_read_only(source: &Path, target: &Path) -> nix::Result<()> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )?;
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
}

fn loopback_up() -> std::io::Result<()> {
    // SAFETY: a socket and two ioctls on a zeroed ifreq naming "lo".
    unsafe {
        let socket = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if socket < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let socket = OwnedFd::from_raw_fd(socket);
        let mut request: libc::ifreq = std::mem::zeroed();
        for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
            *slot = *byte as libc::c_char;
        }
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// pivot_root into `root` (falling back to chroot where pivot_root is refused, e.g. on a
/// ramfs root), leaving no way back to the host's tree.
fn enter_root(root: &Path) -> Result<(), Failure> {
    std::env::set_current_dir(root).map_err(step("enter the root filesystem"))?;
    match nix::unistd::pivot_root(".", ".") {
        Ok(()) => {
            // The old root is stacked under the new one; detach it.
            umount2(".", MntFlags::MNT_DETACH).map_err(step("detach the host's root"))?;
        }
        Err(_) => {
            nix::unistd::chroot(".").map_err(step("chroot into the root filesystem"))?;
        }
    }
    std::env::set_current_dir("/").map_err(step("enter the root filesystem"))?;
    Ok(())
}

/// execvp's search: a name with a `/` is used as is, otherwise the first executable regular
/// file in `path`'s directories (an empty entry means the current directory).
fn find_program(name: &str, path: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Some(PathBuf::from(name));
    }
    if name.is_empty() {
        return None;
    }
    path.split(':').find_map(|dir| {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = Path::new(dir).join(name);
        let metadata = fs::metadata(&candidate).ok()?;
        (metadata.is_file() && metadata.permissions().mode() & 0o111 != 0).then_some(candidate)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_inside_the_root_through_symlinks() {
        let root = tempfile::tempdir().expect("tempdir");
        let root = root.path();
        fs::create_dir_all(root.join("run/lock")).expect("mkdir");
        fs::create_dir_all(root.join("var")).expect("mkdir");
        std::os::unix::fs::symlink("/run", root.join("var/run")).expect("symlink");
        std::os::unix::fs::symlink("../../../../..", root.join("var/up")).expect("symlink");
        fs::write(root.join("file"), "").expect("write");

        let (existing, missing) = resolve_in_root(root, "/var/run/lock/cache").expect("resolve");
        assert_eq!(existing, Path::new("run/lock"));
        assert_eq!(missing, [OsString::from("cache")]);

        // `..` never leaves the root.
        let (existing, missing) = resolve_in_root(root, "/var/up/etc/x").expect("resolve");
        assert_eq!(existing, Path::new(""));
        assert_eq!(missing, [OsString::from("etc"), OsString::from("x")]);

        let (existing, missing) = resolve_in_root(root, "/a/b/../c").expect("resolve");
        assert_eq!(existing, Path::new(""));
        assert_eq!(missing, [OsString::from("a"), OsString::from("c")]);

        assert!(matches!(
            resolve_in_root(root, "/file/below"),
            Err(ResolveInRootError::NotADirectory(path)) if path == Path::new("file")
        ));

        std::os::unix::fs::symlink("loop", root.join("loop")).expect("symlink");
        assert!(matches!(
            resolve_in_root(root, "/loop/x"),
            Err(ResolveInRootError::SymlinkLoop(path)) if path == "/loop/x"
        ));
    }

    #[test]
    fn programs_are_found_on_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tool = dir.path().join("tool");
        fs::write(&tool, "#!/bin/sh\n").expect("write");
        fs::write(dir.path().join("data"), "").expect("write");
        fs::set_permissions(&tool, fs::Permissions::from_mode(0o755)).expect("chmod");
        let path = format!("/nonexistent:{}", dir.path().display());
        assert_eq!(find_program("tool", &path), Some(tool));
        assert_eq!(find_program("data", &path), None);
        assert_eq!(find_program("missing", &path), None);
        assert_eq!(find_program("/bin/x", &path), Some(PathBuf::from("/bin/x")));
    }
}
