//! fuse-overlayfs, where the kernel refuses overlayfs: one daemon per mount, run and ended by
//! the sandbox child, and the conversion of its upper directory to the kernel's form.
//!
//! # The daemon's lifetime
//!
//! The supervisor starts `fuse-overlayfs -f` (foreground: it stays the supervisor's child) in
//! its own mount namespace, before the step's pid namespace exists, so the daemon is never
//! PID 1 of the step and the step cannot see or signal it. It has its own process group and
//! ignores SIGINT, SIGTERM and SIGHUP (a terminal's Ctrl-C reaches the engine, which cancels
//! through the supervisor). It dies with the supervisor (`PR_SET_PDEATHSIG(SIGKILL)`); a killed
//! daemon aborts its FUSE connection, and once the supervisor is gone no process is left in the
//! mount namespace, so nothing of the mount survives either. Normally [`FuseMount::unmount`]
//! unmounts (`umount2` in the namespace, where the supervisor holds `CAP_SYS_ADMIN`), waits for
//! the daemon to exit (killing it after [`EXIT_GRACE`]: a lazily detached mount can outlive a
//! cancelled step's files), and fails the step if the daemon had died before (its mount then
//! gave the step `ENOTCONN`, and the upper directory may be incomplete) or had to be killed.
//! [`Drop`] does the same on error paths.
//!
//! # Its upper directory
//!
//! fuse-overlayfs (1.10, Debian 12's) writes the same layout as the kernel except for:
//!
//! | fuse-overlayfs | kernel overlayfs |
//! |---|---|
//! | empty file `dir/.wh.NAME` (when it cannot `mknod` a 0/0 device) | character device 0/0 `dir/NAME` |
//! | file `dir/.wh..wh..opq`, always beside the xattr below | — |
//! | xattr `user.fuseoverlayfs.opaque=y` (in a user namespace) or `trusted.overlay.opaque=y` | `user.overlay.opaque=y` in a user namespace, `trusted.overlay.opaque=y` as root |
//! | xattr `user.fuseoverlayfs.origin` on copied-up files | — |
//! | a 0/0 device `dir/.wh.…` when a name it reserves is looked up | — |
//!
//! [`convert_upper`] rewrites the first form into the second after the daemon exited (nothing
//! writes to the directory then), keeping every directory's times. The layer writer and the
//! store's snapshots then see one format whichever overlay made it, which is what keeps layers
//! bit-identical. fuse-overlayfs refuses names starting with `.wh.` from the step itself
//! (`EINVAL`) and the `user.fuseoverlayfs.*`, `trusted.overlay.*` and `user.containers.*`
//! attributes (`EPERM`), so every such entry is its own.

use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::mount::{MntFlags, umount2};

use crate::build::direct_copy::MergedView;
use crate::layer::{OPAQUE_MARKER, WHITEOUT_PREFIX, list_xattrs, set_xattr};

/// The prefix of fuse-overlayfs's own extended attributes.
const FUSE_XATTR_PREFIX: &[u8] = b"user.fuseoverlayfs.";
/// How long a daemon may take to mount (a loaded machine).
const DAEMON_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a daemon may take to exit once unmounted before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(3);

/// Why fuse-overlayfs could not serve a step, or its upper directory could not be converted.
/// The sandbox child reports it as the message of the setup step that failed; `log` is the
/// daemon's own stderr.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FuseError {
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("fuse-overlayfs exited ({status}) before mounting: {log}")]
    ExitedBeforeMount {
        status: std::process::ExitStatus,
        log: String,
    },
    #[error("fuse-overlayfs did not mount within {}s: {log}", DAEMON_TIMEOUT.as_secs())]
    MountTimeout { log: String },
    #[error("fuse-overlayfs ended while the step ran ({status}): {log}")]
    DiedDuringStep {
        status: std::process::ExitStatus,
        log: String,
    },
    #[error("fuse-overlayfs failed ({status}): {log}")]
    Failed {
        status: std::process::ExitStatus,
        log: String,
    },
    #[error(
        "fuse-overlayfs did not exit after its {} (killed): {log}",
        if *.detached { "lazy unmount" } else { "unmount" }
    )]
    DidNotExit { detached: bool, log: String },
    #[error("look up /{path} in the lower layers: {source}")]
    Lookup {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "create the whiteout {} (a 0/0 character device; a user namespace needs Linux ≥ 5.8 \
         for it): {source}",
        path.display()
    )]
    Whiteout {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// A running fuse-overlayfs and its mount point.
pub(super) struct FuseMount {
    child: Option<Child>,
    mountpoint: PathBuf,
    /// The daemon's stderr, on the scratch tmpfs.
    log: PathBuf,
}

impl FuseMount {
    /// Mounts `options` (fuse-overlayfs's `-o`, without `,` in paths) on `mountpoint` and
    /// returns once the mount is in place. `cwd` is where relative paths in `options` start.
    pub(super) fn mount(
        program: &Path,
        options: &str,
        mountpoint: &Path,
        cwd: &Path,
        log: PathBuf,
    ) -> Result<FuseMount, FuseError> {
        let parent_device = fs::metadata(mountpoint.parent().unwrap_or(Path::new("/")))
            .map_err(at("inspect", mountpoint))?
            .dev();
        let log_file = fs::File::create(&log).map_err(at("create", &log))?;
        let mut command = Command::new(program);
        command
            .arg("-f")
            .arg("-o")
            .arg(options)
            .arg(mountpoint)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(|| {
                // The supervisor blocks the signals it waits for; the daemon handles its own.
                let empty: libc::sigset_t = std::mem::zeroed();
                libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                // Its own process group, deaf to the terminal's Ctrl-C and to SIGTERM/SIGHUP
                // (libfuse only installs its handlers over the default disposition): it ends
                // when the supervisor unmounts it, after the step, never under it.
                libc::setpgid(0, 0);
                for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                    libc::signal(signal, libc::SIG_IGN);
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(at("start", program))?;
        let mut mount = FuseMount {
            child: Some(child),
            mountpoint: mountpoint.to_path_buf(),
            log,
        };
        let started = Instant::now();
        loop {
            if let Some(child) = mount.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                mount.child = None;
                return Err(FuseError::ExitedBeforeMount {
                    status,
                    log: mount.log_text(),
                });
            }
            // The mount point's device changes once the FUSE file system is mounted on it.
            if fs::metadata(mountpoint).is_ok_and(|metadata| metadata.dev() != parent_device) {
                return Ok(mount);
            }
            if started.elapsed() > DAEMON_TIMEOUT {
                return Err(FuseError::MountTimeout {
                    log: mount.log_text(),
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn log_text(&self) -> String {
        let mut text = String::new();
        if let Ok(file) = fs::File::open(&self.log) {
            let _ = file.take(4096).read_to_string(&mut text);
        }
        // fuse-overlayfs warns about an option of its own it does not pass on.
        let text: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with("unknown argument ignored"))
            .collect();
        if text.is_empty() {
            "no message".to_string()
        } else {
            text.join("; ")
        }
    }

    /// Unmounts and waits for the daemon; an error when the daemon had died under the step or
    /// does not end cleanly.
    pub(super) fn unmount(mut self) -> Result<(), FuseError> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), FuseError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let died_early = match child.try_wait() {
            Ok(Some(status)) => Some(status),
            _ => None,
        };
        let detached = umount2(&self.mountpoint, MntFlags::empty()).is_err();
        if detached {
            let _ = umount2(&self.mountpoint, MntFlags::MNT_DETACH);
        }
        if let Some(status) = died_early {
            return Err(FuseError::DiedDuringStep {
                status,
                log: self.log_text(),
            });
        }
        // Unmounted, the daemon exits at once. A mount only detached can stay alive while the
        // kernel still holds files of the step's (a cancelled step): the daemon is then killed,
        // which ends the mount for good.
        let started = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    return Err(FuseError::Failed {
                        status,
                        log: self.log_text(),
                    });
                }
                Ok(None) if started.elapsed() < EXIT_GRACE => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(FuseError::DidNotExit {
                        detached,
                        log: self.log_text(),
                    });
                }
            }
        }
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// Rewrites fuse-overlayfs's upper directory `upper` into what the kernel's overlayfs would have
/// written for the same step over `lowers` (top-most first: the sandbox's synthetic layer, then
/// the image's): see the module docs. `opaque_xattr` is the attribute the kernel reads here:
/// `user.overlay.opaque` in a user namespace, `trusted.overlay.opaque` otherwise.
///
/// Returns the entries a step created in a setgid directory without the directory's group (or,
/// for a directory, its setgid bit): fuse-overlayfs 1.10 does not implement that inheritance,
/// so those differ from the kernel's overlayfs and cannot be told from a deliberate `chgrp`.
///
/// Where the two differ in more than spelling, the kernel's rule decides:
/// - fuse-overlayfs marks every directory `mkdir` creates opaque; the kernel only one that
///   replaces an entry the lower layers show (it was created over a whiteout);
/// - fuse-overlayfs writes a whiteout for a name any lower layer has on disk; the kernel only
///   for a name the lower layers show (not under an opaque directory or a whiteout).
pub(crate) fn convert_upper(
    upper: &Path,
    lowers: &[PathBuf],
    opaque_xattr: &[u8],
) -> Result<Vec<String>, FuseError> {
    let view = MergedView::new(lowers.to_vec());
    // (directory, its path from the root, whether an opaque directory above hides the lowers)
    let mut directories = vec![(upper.to_path_buf(), Vec::new(), false)];
    let mut unlike_kernel = Vec::new();
    while let Some((directory, relative, hidden)) = directories.pop() {
        convert_directory(
            &directory,
            &relative,
            hidden,
            &view,
            opaque_xattr,
            &mut directories,
            &mut unlike_kernel,
        )?;
    }
    unlike_kernel.sort();
    Ok(unlike_kernel)
}

fn at(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FuseError {
    let path = path.to_path_buf();
    move |source| FuseError::Io {
        action,
        path,
        source,
    }
}

fn lookup_error(relative: &[OsString]) -> impl FnOnce(std::io::Error) -> FuseError {
    let path = display(relative);
    move |source| FuseError::Lookup { path, source }
}

/// Whether the lower layers show an entry at `relative` (not under `hidden`).
fn lower_positive(
    view: &MergedView,
    relative: &[OsString],
    hidden: bool,
) -> Result<bool, FuseError> {
    if hidden {
        return Ok(false);
    }
    view.lookup(relative)
        .map(|found| found.is_some())
        .map_err(lookup_error(relative))
}

fn display(relative: &[OsString]) -> String {
    relative.iter().collect::<PathBuf>().display().to_string()
}

fn convert_directory(
    directory: &Path,
    relative: &[OsString],
    hidden: bool,
    view: &MergedView,
    opaque_xattr: &[u8],
    subdirectories: &mut Vec<(PathBuf, Vec<OsString>, bool)>,
    unlike_kernel: &mut Vec<String>,
) -> Result<(), FuseError> {
    let metadata = fs::symlink_metadata(directory).map_err(at("inspect", directory))?;
    let mut marked_opaque = strip_fuse_xattrs(directory)?.opaque;
    let attributes = list_xattrs(directory).map_err(at("read the attributes of", directory))?;
    let overlay_opaque: Vec<Vec<u8>> = attributes
        .into_iter()
        .filter(|(name, _)| OPAQUE_XATTRS.contains(&name.as_slice()))
        .map(|(name, _)| name)
        .collect();
    marked_opaque |= !overlay_opaque.is_empty();
    let mut names: Vec<OsString> = fs::read_dir(directory)
        .map_err(at("read", directory))?
        .map(|entry| entry.map(|entry| entry.file_name()))
        .collect::<Result<_, _>>()
        .map_err(at("read", directory))?;
    names.sort();
    marked_opaque |= names
        .iter()
        .any(|name| name.as_bytes() == OPAQUE_MARKER.as_bytes());
    let opaque = marked_opaque && !relative.is_empty() && lower_positive(view, relative, hidden)?;
    if !opaque && !hidden && !relative.is_empty() {
        restore_dropped_mode_bits(directory, relative, &metadata, view)?;
    }
    let setgid = fs::symlink_metadata(directory)
        .map_err(at("inspect", directory))?
        .mode()
        & 0o2000
        != 0;
    let mut changed = false;
    for name in names {
        let path = directory.join(&name);
        let entry = fs::symlink_metadata(&path).map_err(at("inspect", &path))?;
        let mut child = relative.to_vec();
        child.push(name.clone());
        let bytes = name.as_bytes();
        if entry.file_type().is_char_device() && entry.rdev() == 0 {
            // The kernel's form already; kept where the kernel would have written it.
            if !lower_positive(view, &child, hidden || opaque)? {
                fs::remove_file(&path).map_err(at("remove", &path))?;
                changed = true;
            }
            continue;
        }
        let Some(target) = bytes.strip_prefix(WHITEOUT_PREFIX.as_bytes()) else {
            if setgid
                && (entry.gid() != metadata.gid() || entry.is_dir() && entry.mode() & 0o2000 == 0)
                && !lower_positive(view, &child, hidden || opaque)?
            {
                unlike_kernel.push(format!("/{}", display(&child)));
            }
            if entry.is_dir() {
                subdirectories.push((path, child, hidden || opaque));
            } else if !entry.file_type().is_symlink()
                && strip_fuse_xattrs(&path)?.copied_up
                && entry.is_file()
                && !hidden
                && !opaque
            {
                restore_dropped_mode_bits(&path, &child, &entry, view)?;
            }
            continue;
        };
        changed = true;
        if entry.is_dir() {
            fs::remove_dir_all(&path).map_err(at("remove", &path))?;
        } else {
            fs::remove_file(&path).map_err(at("remove", &path))?;
        }
        if !entry.is_file() || target.starts_with(WHITEOUT_PREFIX.as_bytes()) {
            // The opaque marker, handled above.
            continue;
        }
        // A deletion recorded as `.wh.NAME`: the kernel's 0/0 device `NAME`, unless the name
        // was created again or the lower layers do not show it.
        let name = OsString::from(std::ffi::OsStr::from_bytes(target));
        let whiteout = directory.join(&name);
        let mut deleted = relative.to_vec();
        deleted.push(name);
        if fs::symlink_metadata(&whiteout).is_err()
            && lower_positive(view, &deleted, hidden || opaque)?
        {
            make_whiteout(&whiteout)?;
            set_times(&whiteout, &entry).map_err(at("set the times of", &whiteout))?;
        }
    }
    for name in &overlay_opaque {
        if !opaque || name.as_slice() != opaque_xattr {
            remove_xattr(directory, name).map_err(at("remove an attribute of", directory))?;
        }
    }
    if opaque
        && !overlay_opaque
            .iter()
            .any(|name| name.as_slice() == opaque_xattr)
    {
        set_xattr(directory, opaque_xattr, b"y")
            .map_err(at("mark as opaque (extended attribute)", directory))?;
    }
    if changed {
        set_times(directory, &metadata).map_err(at("set the times of", directory))?;
    }
    Ok(())
}

/// fuse-overlayfs copies a directory up with `mkdir`, which drops its setuid and setgid bits,
/// and a file not owned by root with `fchown` after writing it, which clears them; the kernel
/// keeps the lower entry's mode. A copied-up entry whose mode is the lower one's without those
/// bits gets them back (a step that cleared them itself with `chmod` is indistinguishable, and
/// gets them back too: docs/security.md, Rootless).
fn restore_dropped_mode_bits(
    directory: &Path,
    relative: &[OsString],
    metadata: &fs::Metadata,
    view: &MergedView,
) -> Result<(), FuseError> {
    const DROPPED: u32 = 0o6000;
    let Some((_, lower)) = view.lookup(relative).map_err(lookup_error(relative))? else {
        return Ok(());
    };
    let (upper_mode, lower_mode) = (metadata.mode() & 0o7777, lower.mode() & 0o7777);
    let same_kind = lower.is_dir() == metadata.is_dir() && lower.is_file() == metadata.is_file();
    if same_kind && lower_mode & DROPPED != 0 && upper_mode == lower_mode & !DROPPED {
        fs::set_permissions(directory, fs::Permissions::from_mode(lower_mode))
            .map_err(at("restore the mode of", directory))?;
    }
    Ok(())
}

/// The attributes that make a directory opaque to the kernel's overlayfs.
const OPAQUE_XATTRS: [&[u8]; 2] = [b"trusted.overlay.opaque", b"user.overlay.opaque"];

/// What fuse-overlayfs's attributes said about an entry.
#[derive(Default)]
struct FuseMarks {
    /// `user.fuseoverlayfs.opaque=y`.
    opaque: bool,
    /// `user.fuseoverlayfs.origin`: a file it copied up.
    copied_up: bool,
}

/// Removes fuse-overlayfs's attributes from `path`; what they said.
fn strip_fuse_xattrs(path: &Path) -> Result<FuseMarks, FuseError> {
    let mut marks = FuseMarks::default();
    let attributes = list_xattrs(path).map_err(at("read the attributes of", path))?;
    for (name, value) in attributes {
        if !name.starts_with(FUSE_XATTR_PREFIX) {
            continue;
        }
        marks.opaque |= name.as_slice() == b"user.fuseoverlayfs.opaque" && value == b"y";
        marks.copied_up |= name.as_slice() == b"user.fuseoverlayfs.origin";
        remove_xattr(path, &name).map_err(at("remove an attribute of", path))?;
    }
    Ok(marks)
}

fn remove_xattr(path: &Path, name: &[u8]) -> std::io::Result<()> {
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let name = std::ffi::CString::new(name)?;
    // SAFETY: NUL-terminated strings that outlive the call.
    if unsafe { libc::lremovexattr(path.as_ptr(), name.as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn make_whiteout(path: &Path) -> Result<(), FuseError> {
    nix::sys::stat::mknod(
        path,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        0,
    )
    .map_err(|source| FuseError::Whiteout {
        path: path.to_path_buf(),
        source,
    })
}

/// Gives `path` (never followed) the access and modification times of `from`.
fn set_times(path: &Path, from: &fs::Metadata) -> std::io::Result<()> {
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let times = [
        libc::timespec {
            tv_sec: from.atime(),
            tv_nsec: from.atime_nsec(),
        },
        libc::timespec {
            tv_sec: from.mtime(),
            tv_nsec: from.mtime_nsec(),
        },
    ];
    // SAFETY: a NUL-terminated path and two timespecs that outlive the call.
    let result = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            path.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether `path` is a whiteout as the kernel writes it.
#[cfg(test)]
fn is_whiteout(path: &Path) -> bool {
    fs::symlink_metadata(path)
        .is_ok_and(|metadata| metadata.file_type().is_char_device() && metadata.rdev() == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{LayerOptions, diff_id_of_upper};

    fn can_make_whiteouts(dir: &Path) -> bool {
        let probe = dir.join("probe");
        let ok = make_whiteout(&probe).is_ok();
        let _ = fs::remove_file(probe);
        if !ok {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "creating 0/0 character devices needs root (CI runs the tests as root)"
            );
            eprintln!("skipped: creating 0/0 character devices needs root");
        }
        ok
    }

    /// A base layer, and the same change over it as the kernel and as fuse-overlayfs (without
    /// `mknod`) write it: `rm -rf /srv/gone /etc/old /srv/a && mkdir /srv/a /new &&
    /// echo new > /srv/a/new && touch /srv/a/f && rm /srv/a/f && echo hi > /etc/motd`.
    fn uppers(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        let lower = dir.join("lower");
        fs::create_dir_all(lower.join("srv/gone")).unwrap();
        fs::create_dir_all(lower.join("srv/a")).unwrap();
        fs::create_dir_all(lower.join("etc")).unwrap();
        fs::write(lower.join("srv/gone/x"), "x").unwrap();
        fs::write(lower.join("srv/a/f"), "f").unwrap();
        fs::write(lower.join("etc/old"), "old").unwrap();
        fs::write(lower.join("etc/motd"), "").unwrap();
        let kernel = dir.join("kernel");
        let fuse = dir.join("fuse");
        for upper in [&kernel, &fuse] {
            fs::create_dir_all(upper.join("etc")).unwrap();
            fs::create_dir_all(upper.join("srv/a")).unwrap();
            fs::create_dir_all(upper.join("new")).unwrap();
            fs::write(upper.join("srv/a/new"), "new\n").unwrap();
            fs::write(upper.join("etc/motd"), "hi\n").unwrap();
        }
        make_whiteout(&kernel.join("srv/gone")).unwrap();
        make_whiteout(&kernel.join("etc/old")).unwrap();
        set_xattr(&kernel.join("srv/a"), b"trusted.overlay.opaque", b"y").unwrap();

        fs::write(fuse.join("srv/.wh.gone"), "").unwrap();
        fs::write(fuse.join("etc/.wh.old"), "").unwrap();
        fs::write(fuse.join("srv/a/.wh..wh..opq"), "").unwrap();
        make_whiteout(&fuse.join("srv/a/.wh..opq")).unwrap();
        // A whiteout the kernel would not write: srv/a is opaque, the lower f is hidden.
        make_whiteout(&fuse.join("srv/a/f")).unwrap();
        set_xattr(&fuse.join("srv/a"), b"user.fuseoverlayfs.opaque", b"y").unwrap();
        // Opaque for fuse-overlayfs, not for the kernel: no lower layer has /new.
        fs::write(fuse.join("new/.wh..wh..opq"), "").unwrap();
        set_xattr(&fuse.join("new"), b"trusted.overlay.opaque", b"y").unwrap();
        set_xattr(
            &fuse.join("etc/motd"),
            b"user.fuseoverlayfs.origin",
            b"etc/motd",
        )
        .unwrap();
        (lower, kernel, fuse)
    }

    #[test]
    fn fuse_overlayfs_upper_directories_become_the_kernels_and_the_same_layer() {
        let dir = tempfile::tempdir().unwrap();
        if !can_make_whiteouts(dir.path()) {
            return;
        }
        let (lower, kernel, fuse) = uppers(dir.path());
        let options = LayerOptions {
            source_date_epoch: 0,
            ..LayerOptions::default()
        };
        assert!(
            diff_id_of_upper(&fuse, &options).is_err(),
            "unconverted, fuse-overlayfs's `.wh.` files are refused as reserved names"
        );
        assert!(
            convert_upper(&fuse, &[lower], b"trusted.overlay.opaque")
                .unwrap()
                .is_empty()
        );
        assert!(is_whiteout(&fuse.join("srv/gone")));
        assert!(is_whiteout(&fuse.join("etc/old")));
        assert!(!fuse.join("srv/.wh.gone").exists());
        assert!(fs::symlink_metadata(fuse.join("srv/a/.wh..opq")).is_err());
        assert!(fs::symlink_metadata(fuse.join("srv/a/f")).is_err());
        assert!(!fuse.join("srv/a/.wh..wh..opq").exists());
        let attributes = list_xattrs(&fuse.join("srv/a")).unwrap();
        assert_eq!(
            attributes,
            vec![(b"trusted.overlay.opaque".to_vec(), b"y".to_vec())]
        );
        assert!(list_xattrs(&fuse.join("new")).unwrap().is_empty());
        assert!(list_xattrs(&fuse.join("etc/motd")).unwrap().is_empty());
        assert_eq!(
            diff_id_of_upper(&fuse, &options).unwrap(),
            diff_id_of_upper(&kernel, &options).unwrap(),
            "the converted upper directory makes the kernel's layer"
        );
    }

    #[test]
    fn conversion_keeps_directory_times_and_a_recreated_name() {
        let dir = tempfile::tempdir().unwrap();
        if !can_make_whiteouts(dir.path()) {
            return;
        }
        let upper = dir.path().join("upper");
        let lower = dir.path().join("lower");
        fs::create_dir_all(lower.join("d")).unwrap();
        fs::write(lower.join("d/again"), "").unwrap();
        fs::write(lower.join("d/gone"), "").unwrap();
        fs::create_dir_all(upper.join("d")).unwrap();
        fs::write(upper.join("d/.wh.again"), "").unwrap();
        fs::write(upper.join("d/again"), "back\n").unwrap();
        fs::write(upper.join("d/.wh.gone"), "").unwrap();
        let old = fs::FileTimes::new()
            .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000))
            .set_accessed(std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000));
        fs::File::open(upper.join("d"))
            .unwrap()
            .set_times(old)
            .unwrap();
        convert_upper(&upper, &[lower], b"user.overlay.opaque").unwrap();
        assert_eq!(fs::read_to_string(upper.join("d/again")).unwrap(), "back\n");
        assert!(is_whiteout(&upper.join("d/gone")));
        assert_eq!(
            fs::metadata(upper.join("d")).unwrap().mtime(),
            1_000_000_000,
            "the directory keeps its time"
        );
        let mut names: Vec<_> = fs::read_dir(upper.join("d"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["again", "gone"]);
    }

    #[test]
    fn a_copied_up_setgid_directory_keeps_its_mode_and_unlike_entries_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let lower = dir.path().join("lower");
        let upper = dir.path().join("upper");
        fs::create_dir_all(lower.join("sg")).unwrap();
        fs::create_dir_all(upper.join("sg/new")).unwrap();
        fs::write(upper.join("sg/g"), "").unwrap();
        fs::set_permissions(lower.join("sg"), fs::Permissions::from_mode(0o2775)).unwrap();
        // A setuid file copied up (it carries the origin attribute), and one the step made.
        for (name, mode) in [("suid", 0o4755), ("made", 0o4755)] {
            fs::write(lower.join(name), "").unwrap();
            fs::set_permissions(lower.join(name), fs::Permissions::from_mode(mode)).unwrap();
            fs::write(upper.join(name), "").unwrap();
            fs::set_permissions(upper.join(name), fs::Permissions::from_mode(0o755)).unwrap();
        }
        set_xattr(&upper.join("suid"), b"user.fuseoverlayfs.origin", b"suid").unwrap();
        // What fuse-overlayfs's copy-up leaves: the mode without the setgid bit.
        fs::set_permissions(upper.join("sg"), fs::Permissions::from_mode(0o775)).unwrap();
        let unlike = convert_upper(&upper, &[lower], b"user.overlay.opaque").unwrap();
        assert_eq!(
            fs::metadata(upper.join("sg")).unwrap().mode() & 0o7777,
            0o2775
        );
        assert_eq!(
            fs::metadata(upper.join("suid")).unwrap().mode() & 0o7777,
            0o4755
        );
        assert_eq!(
            fs::metadata(upper.join("made")).unwrap().mode() & 0o7777,
            0o755
        );
        // Same group as the directory (whoever runs the test), but no setgid bit on `new`.
        assert_eq!(unlike, vec!["/sg/new".to_string()]);
    }
}
