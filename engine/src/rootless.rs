//! Rootless builds: an ordinary user's graphbuild re-executes itself in a new user namespace
//! where that user is root, with the user's subordinate ids mapped.
//!
//! ```text
//! graphbuild run …            (uid 1000 on the host)
//!   └─ graphbuild run …       user namespace: 0 → 1000, 1…65536 → the /etc/subuid range
//!        └─ the engine, unchanged: unpacks (lchown works into the mapped range), runs each
//!           step's sandbox (its own mount/pid/uts/ipc namespaces inside this one)
//! ```
//!
//! Everything the engine does then happens as root of the namespace, so ownership on disk is
//! the image's (uid 0 in the image is uid 0 here, the invoking user on the host) and layers
//! are bit-identical to a build as root. What differs inside the namespace, all of it read
//! through [`in_user_namespace`]:
//!
//! - overlayfs is mounted with `userxattr`: opaque directories carry `user.overlay.opaque`
//!   (`trusted.*` needs root in the initial namespace); layers read both;
//! - device nodes in base layers cannot be created (no `CAP_MKNOD` outside the initial
//!   namespace) and are skipped, as when unpacking without root; overlay whiteouts (0/0
//!   character devices) can be;
//! - the pids cgroup is usually not writable: the supervisor counts processes instead.
//!
//! The mapping is written by `newuidmap`/`newgidmap` (package `uidmap`) from the user's
//! lines in `/etc/subuid` and `/etc/subgid`. Without such lines only the user's own id is
//! mapped (to 0): enough for images whose files are all root's; a layer owned by anyone else
//! fails with [`chown_error_help`].

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::sched::CloneFlags;
use nix::unistd::{ForkResult, Pid, Uid};

/// Set in the re-executed process: `UID:GID:MAPPING` of the invoking user on the host, where
/// MAPPING is `subid` (subordinate ranges mapped) or `single` (only the user's own id).
pub const ENV: &str = "GRAPHBUILD_ROOTLESS";

/// How many subordinate ids are mapped at most (ids 1…65536 in the namespace, like Docker's
/// and Podman's default): enough for `nobody` (65534).
pub const MAX_SUBORDINATE: u32 = 65536;

/// One line of `/etc/subuid` or `/etc/subgid` that applies to a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubRange {
    pub start: u32,
    pub count: u32,
}

/// The user's ranges in `file` (`/etc/subuid` or `/etc/subgid`): lines `NAME:START:COUNT` or
/// `ID:START:COUNT`. A missing file has none.
pub fn read_ranges(file: &Path, name: &str, id: u32) -> Vec<SubRange> {
    let Ok(text) = std::fs::read_to_string(file) else {
        return Vec::new();
    };
    parse_ranges(&text, name, id)
}

pub fn parse_ranges(text: &str, name: &str, id: u32) -> Vec<SubRange> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.starts_with('#') {
                return None;
            }
            let mut fields = line.split(':');
            let owner = fields.next()?;
            let start = fields.next()?.trim().parse().ok()?;
            let count = fields.next()?.trim().parse().ok()?;
            (owner == name || owner == id.to_string()).then_some(SubRange { start, count })
        })
        .filter(|range: &SubRange| range.count > 0)
        .collect()
}

/// Whether this process runs in a user namespace other than the initial one (a rootless
/// build, or a container): its uid map is not the identity over every id.
pub fn in_user_namespace() -> bool {
    static CACHED: OnceLock<bool> = OnceLock::new();
    *CACHED.get_or_init(|| match std::fs::read_to_string("/proc/self/uid_map") {
        Ok(map) => {
            let fields: Vec<&str> = map.split_whitespace().collect();
            fields != ["0", "0", "4294967295"]
        }
        Err(_) => false,
    })
}

/// The invoking user of a rootless build, from [`ENV`]: (uid, gid, subordinate ids mapped).
pub fn host_user() -> Option<(u32, u32, bool)> {
    let value = std::env::var(ENV).ok()?;
    let mut fields = value.split(':');
    let uid = fields.next()?.parse().ok()?;
    let gid = fields.next()?.parse().ok()?;
    let subid = fields.next()? == "subid";
    Some((uid, gid, subid))
}

/// The help for a layer entry whose owner the namespace does not map (`lchown` → EINVAL).
/// Computed once (from the host's /etc/passwd and /etc/subuid: the sandbox calls it before
/// `pivot_root`).
pub fn chown_error_help() -> String {
    static HELP: OnceLock<String> = OnceLock::new();
    HELP.get_or_init(|| {
        let (user, host_uid) = match host_user() {
            Some((host_uid, _, _)) => (user_name(host_uid), host_uid),
            None => ("USER".to_string(), 0),
        };
        format!(
            "give user `{user}` (uid {host_uid}) subordinate ids, as root: {}; or build as root",
            add_range_command(&user)
        )
    })
    .clone()
}

/// `echo USER:START:65536 >> /etc/subuid; echo … >> /etc/subgid`, with a START past every
/// range the two files already give out.
pub fn add_range_command(user: &str) -> String {
    let start = suggest_start(&[Path::new("/etc/subuid"), Path::new("/etc/subgid")]);
    format!(
        "`echo {user}:{start}:{MAX_SUBORDINATE} >> /etc/subuid; echo {user}:{start}:{MAX_SUBORDINATE} >> /etc/subgid`"
    )
}

/// The first multiple of 65536 from 100000 on, past the end of every range in `files`.
pub fn suggest_start(files: &[&Path]) -> u64 {
    let end = files
        .iter()
        .filter_map(|file| std::fs::read_to_string(file).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|line| {
                    let mut fields = line.trim().split(':').skip(1);
                    let start: u64 = fields.next()?.trim().parse().ok()?;
                    let count: u64 = fields.next()?.trim().parse().ok()?;
                    Some(start + count)
                })
                .collect::<Vec<_>>()
        })
        .max()
        .unwrap_or(0);
    if end <= 100_000 {
        100_000
    } else {
        end.div_ceil(65536) * 65536
    }
}

fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|user| user.name)
        .unwrap_or_else(|| uid.to_string())
}

/// What the re-execution will map for the current (non-root) user.
#[derive(Debug, Clone)]
pub struct Plan {
    pub uid: u32,
    pub gid: u32,
    pub user: String,
    pub subuid: Option<SubRange>,
    pub subgid: Option<SubRange>,
}

impl Plan {
    pub fn for_current_user() -> Plan {
        let uid = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        let user = user_name(uid);
        let pick = |file: &str, id: u32| {
            read_ranges(Path::new(file), &user, id)
                .into_iter()
                .next()
                .map(|range| SubRange {
                    start: range.start,
                    count: range.count.min(MAX_SUBORDINATE),
                })
        };
        Plan {
            uid,
            gid,
            subuid: pick("/etc/subuid", uid),
            subgid: pick("/etc/subgid", uid),
            user,
        }
    }

    /// Subordinate ids are mapped when both files have a range and the helpers exist.
    pub fn maps_subordinate_ids(&self) -> bool {
        self.subuid.is_some()
            && self.subgid.is_some()
            && find_helper("newuidmap").is_some()
            && find_helper("newgidmap").is_some()
    }
}

/// `newuidmap`/`newgidmap` on the usual paths.
pub fn find_helper(name: &str) -> Option<std::path::PathBuf> {
    ["/usr/bin", "/bin", "/usr/sbin", "/sbin", "/usr/local/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.exists())
}

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(signal: libc::c_int) {
    let child = CHILD.load(Ordering::Relaxed);
    if child > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe {
            libc::kill(child, signal);
        }
    }
}

/// Why a rootless build could not start its user namespace.
#[derive(Debug, thiserror::Error)]
pub enum RootlessError {
    /// A system call of the re-execution itself failed (`pipe`, `fork`, `waitpid`).
    #[error("{call}: {source}")]
    System {
        call: &'static str,
        source: nix::Error,
    },
    #[error("an argument contains a NUL byte")]
    NulArgument,
    #[error(
        "cannot create a user namespace (unshare CLONE_NEWUSER failed); check \
         /proc/sys/user/max_user_namespaces and, on Debian/Ubuntu, \
         kernel.unprivileged_userns_clone and AppArmor's restrict_unprivileged_userns"
    )]
    NoUserNamespace,
    #[error("{helper} is missing")]
    HelperMissing { helper: &'static str },
    #[error("cannot run {}: {source}", path.display())]
    RunHelper {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `newuidmap` or `newgidmap` refused the mapping.
    #[error(
        "{helper} failed ({status}): {stderr}\nhint: check the lines for `{user}` in /etc/subuid \
         and /etc/subgid, and that {} is setuid root (package uidmap)",
        path.display()
    )]
    HelperFailed {
        helper: &'static str,
        path: PathBuf,
        status: std::process::ExitStatus,
        /// What the helper printed, trimmed.
        stderr: String,
        user: String,
    },
    #[error("cannot write {path}: {source}")]
    WriteMap {
        path: String,
        source: std::io::Error,
    },
}

/// Re-execute this binary (same arguments) in a new user namespace where the current user is
/// root; returns the exit code to exit with. Must be called while the process has one thread.
pub fn reexec(plan: &Plan) -> Result<u8, RootlessError> {
    let subid = plan.maps_subordinate_ids();
    let system = |call| move |source| RootlessError::System { call, source };
    let (ready_read, ready_write) = nix::unistd::pipe().map_err(system("pipe"))?;
    let (go_read, go_write) = nix::unistd::pipe().map_err(system("pipe"))?;
    // SAFETY: single-threaded (the caller's contract); the child only calls async-signal-safe
    // functions and allocation-free syscalls before exec.
    let exe = CString::new("/proc/self/exe").expect("no NUL");
    let args: Vec<CString> = std::env::args_os()
        .map(|arg| CString::new(std::os::unix::ffi::OsStrExt::as_bytes(arg.as_os_str())))
        .collect::<Result<_, _>>()
        .map_err(|_| RootlessError::NulArgument)?;
    let env_value = format!(
        "{}:{}:{}",
        plan.uid,
        plan.gid,
        if subid { "subid" } else { "single" }
    );
    match unsafe { nix::unistd::fork() }.map_err(system("fork"))? {
        ForkResult::Child => {
            drop(ready_read);
            drop(go_write);
            child(ready_write, go_read, &exe, &args, &env_value)
        }
        ForkResult::Parent { child } => {
            drop(ready_write);
            drop(go_read);
            CHILD.store(child.as_raw(), Ordering::Relaxed);
            parent(plan, subid, child, ready_read, go_write)
        }
    }
}

fn child(ready: OwnedFd, go: OwnedFd, exe: &CString, args: &[CString], env: &str) -> ! {
    let fail = |code: u8| -> ! { unsafe { libc::_exit(i32::from(code)) } };
    if nix::sched::unshare(CloneFlags::CLONE_NEWUSER).is_err() {
        let _ = std::fs::File::from(ready).write_all(b"E");
        fail(3);
    }
    let _ = std::fs::File::from(ready).write_all(b"R");
    let mut byte = [0u8; 1];
    let mut go = std::fs::File::from(go);
    if go.read_exact(&mut byte).is_err() || byte[0] != b'G' {
        fail(3);
    }
    // The maps are written: this process is uid 0 of the namespace with every capability in
    // it, kept across exec. Die with the parent (set after the credential change).
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    // SAFETY: still single-threaded.
    unsafe { std::env::set_var(ENV, env) };
    let error = nix::unistd::execv(exe, args).unwrap_err();
    eprintln!("error: cannot re-execute graphbuild in its user namespace: {error}");
    fail(3)
}

fn parent(
    plan: &Plan,
    subid: bool,
    child: Pid,
    ready: OwnedFd,
    go: OwnedFd,
) -> Result<u8, RootlessError> {
    let kill_child = || {
        let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(child, None);
    };
    let mut byte = [0u8; 1];
    if std::fs::File::from(ready).read_exact(&mut byte).is_err() || byte[0] != b'R' {
        let _ = nix::sys::wait::waitpid(child, None);
        return Err(RootlessError::NoUserNamespace);
    }
    let mapped = if subid {
        write_maps_with_helpers(plan, child)
    } else {
        write_single_maps(plan, child)
    };
    if let Err(error) = mapped {
        kill_child();
        return Err(error);
    }
    let _ = std::fs::File::from(go).write_all(b"G");
    // Signals sent to this process are forwarded (one the terminal sends to the whole
    // process group reaches the child twice: graphbuild's cancel is a flag, set once).
    unsafe {
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::signal(signal, forward_signal as *const () as libc::sighandler_t);
        }
    }
    loop {
        match nix::sys::wait::waitpid(child, None) {
            Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => return Ok(code as u8),
            Ok(nix::sys::wait::WaitStatus::Signaled(_, signal, _)) => {
                return Ok(128u8.wrapping_add(signal as u8));
            }
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(source) => {
                return Err(RootlessError::System {
                    call: "wait for the namespaced graphbuild",
                    source,
                });
            }
        }
    }
}

fn write_maps_with_helpers(plan: &Plan, child: Pid) -> Result<(), RootlessError> {
    let (Some(subuid), Some(subgid)) = (plan.subuid, plan.subgid) else {
        unreachable!("checked by maps_subordinate_ids")
    };
    for (helper, id, range) in [
        ("newuidmap", plan.uid, subuid),
        ("newgidmap", plan.gid, subgid),
    ] {
        let path = find_helper(helper).ok_or(RootlessError::HelperMissing { helper })?;
        let output = std::process::Command::new(&path)
            .arg(child.as_raw().to_string())
            .args(["0", &id.to_string(), "1"])
            .args(["1", &range.start.to_string(), &range.count.to_string()])
            .output()
            .map_err(|source| RootlessError::RunHelper {
                path: path.clone(),
                source,
            })?;
        if !output.status.success() {
            return Err(RootlessError::HelperFailed {
                helper,
                path,
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
                user: plan.user.clone(),
            });
        }
    }
    Ok(())
}

fn write_single_maps(plan: &Plan, child: Pid) -> Result<(), RootlessError> {
    let proc = format!("/proc/{}", child.as_raw());
    let write = |file: &str, text: String| {
        let path = format!("{proc}/{file}");
        std::fs::write(&path, text).map_err(|source| RootlessError::WriteMap { path, source })
    };
    write("uid_map", format!("0 {} 1\n", plan.uid))?;
    write("setgroups", "deny\n".to_string())?;
    write("gid_map", format!("0 {} 1\n", plan.gid))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_by_name_or_id() {
        let text = "# comment\nalice:100000:65536\n1001:200000:65536\nbob:300000:0\n";
        assert_eq!(
            parse_ranges(text, "alice", 1000),
            vec![SubRange {
                start: 100000,
                count: 65536
            }]
        );
        assert_eq!(
            parse_ranges(text, "carol", 1001),
            vec![SubRange {
                start: 200000,
                count: 65536
            }]
        );
        assert!(parse_ranges(text, "bob", 1002).is_empty());
    }

    #[test]
    fn suggested_start_is_past_every_range() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("subuid");
        assert_eq!(suggest_start(&[&file]), 100_000);
        std::fs::write(&file, "a:100000:65536\nb:165536:65536\n").unwrap();
        assert_eq!(suggest_start(&[&file]), 262_144);
    }
}
