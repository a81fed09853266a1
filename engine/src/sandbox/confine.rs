//! What a `run` step may do once it runs: its capabilities and its seccomp filter.
//!
//! The step keeps Docker's default capability set ([`KEPT_CAPABILITIES`]) in its bounding,
//! effective and permitted sets when it runs as root, and none in its effective and permitted
//! sets as another user (as Docker and runc do); its inheritable and ambient sets are empty.
//! Setuid programs (`su`, `sudo`) still work: they gain at most the bounding set.
//!
//! Two seccomp filters, compiled with `seccompiler`:
//!
//! - [`DENIED_SYSCALLS`] return `EPERM`, as do `clone` and `unshare` asking for a new
//!   namespace (Docker's default profile refuses the same calls, or lets them through only
//!   with capabilities a step does not have).
//! - `clone3` returns `ENOSYS` (its flags are behind a pointer a filter cannot read; libc falls
//!   back to `clone`, as under Docker), and every x32-ABI system call returns `ENOSYS`.
//!
//! `seccompiler` kills a process that makes a system call of another architecture than the
//! filter's, so native 32-bit x86 programs (`linux/386`) cannot run under the filter: their
//! steps run without it ([`super::RunTask::without_seccomp`]), with the capability drop and
//! every other confinement, and the build says so.
//! Programs for foreign CPUs run through qemu-user, which makes host (x86_64) system calls
//! and so runs under the filter like any other program.
//!
//! The filters are installed without `no_new_privs` (which would break setuid programs),
//! which the kernel allows only while the process holds `CAP_SYS_ADMIN`: PID 1 installs them
//! before it changes user and drops its capabilities.

use std::collections::BTreeMap;

use caps::{CapSet, Capability, CapsHashSet};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Docker's default capabilities, the only ones a step keeps.
pub const KEPT_CAPABILITIES: [Capability; 14] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FSETID,
    Capability::CAP_FOWNER,
    Capability::CAP_MKNOD,
    Capability::CAP_NET_RAW,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETFCAP,
    Capability::CAP_SETPCAP,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_KILL,
    Capability::CAP_AUDIT_WRITE,
];

/// [`KEPT_CAPABILITIES`] as the bit mask `/proc/PID/status` shows (`CapEff` of a root step).
pub const KEPT_CAPABILITY_MASK: u64 = 0x0000_0000_a804_25fb;

/// The `clone`/`unshare` flags that create namespaces (`CLONE_NEWTIME` shares its bit with the
/// exit signal in `clone`'s flags, so it is checked for `unshare` only).
const NAMESPACE_FLAGS: [u64; 7] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
];
const CLONE_NEWTIME: u64 = 0x80;

/// The bit x32-ABI system call numbers carry on x86_64.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: i64 = 0x4000_0000;
/// x32 system call numbers run from 0 to 547 (512 and up are x32's own entry points).
#[cfg(target_arch = "x86_64")]
const X32_LAST_SYSCALL: i64 = 547;

/// System calls that return `EPERM` in a step, with their names (for docs and tests).
#[cfg(target_arch = "x86_64")]
pub const DENIED_SYSCALLS: &[(&str, i64)] = &[
    // Mounts and the filesystem tree.
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("open_tree", libc::SYS_open_tree),
    ("move_mount", libc::SYS_move_mount),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("mount_setattr", libc::SYS_mount_setattr),
    // File handles bypass the mount namespace (the "shocker" escape).
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    // Namespaces.
    ("setns", libc::SYS_setns),
    // The kernel itself.
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
    ("syslog", libc::SYS_syslog),
    ("reboot", libc::SYS_reboot),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("acct", libc::SYS_acct),
    ("quotactl", libc::SYS_quotactl),
    ("quotactl_fd", libc::SYS_quotactl_fd),
    ("iopl", libc::SYS_iopl),
    ("ioperm", libc::SYS_ioperm),
    ("_sysctl", libc::SYS__sysctl),
    ("uselib", libc::SYS_uselib),
    ("nfsservctl", libc::SYS_nfsservctl),
    ("vhangup", libc::SYS_vhangup),
    ("fanotify_init", libc::SYS_fanotify_init),
    ("userfaultfd", libc::SYS_userfaultfd),
    // The kernel keyring is not namespaced.
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    // Clocks are not namespaced.
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    // Other processes' memory.
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("kcmp", libc::SYS_kcmp),
    // io_uring bypasses seccomp for the operations it performs (Docker refuses it too).
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
];

/// The two filters of a step, ready to install.
pub struct Filters {
    eperm: BpfProgram,
    enosys: BpfProgram,
}

/// Compiles the step's filters.
#[cfg(target_arch = "x86_64")]
pub fn compile() -> Result<Filters, String> {
    let error = |error: seccompiler::BackendError| format!("compile the seccomp filter: {error}");
    let namespace_rules = |extra: &[u64]| -> Result<Vec<SeccompRule>, String> {
        NAMESPACE_FLAGS
            .iter()
            .chain(extra)
            .map(|flag| {
                let condition = SeccompCondition::new(
                    0,
                    SeccompCmpArgLen::Qword,
                    SeccompCmpOp::MaskedEq(*flag),
                    *flag,
                )
                .map_err(error)?;
                SeccompRule::new(vec![condition]).map_err(error)
            })
            .collect()
    };
    let mut denied: BTreeMap<i64, Vec<SeccompRule>> = DENIED_SYSCALLS
        .iter()
        .map(|(_, number)| (*number, Vec::new()))
        .collect();
    denied.insert(libc::SYS_clone, namespace_rules(&[])?);
    denied.insert(libc::SYS_unshare, namespace_rules(&[CLONE_NEWTIME])?);
    let eperm = SeccompFilter::new(
        denied,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )
    .map_err(error)?;

    let mut missing: BTreeMap<i64, Vec<SeccompRule>> = (0..=X32_LAST_SYSCALL)
        .map(|number| (number | X32_SYSCALL_BIT, Vec::new()))
        .collect();
    missing.insert(libc::SYS_clone3, Vec::new());
    let enosys = SeccompFilter::new(
        missing,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(error)?;

    let program = |filter: SeccompFilter| {
        BpfProgram::try_from(filter).map_err(|error| format!("compile the seccomp filter: {error}"))
    };
    Ok(Filters {
        eperm: program(eperm)?,
        enosys: program(enosys)?,
    })
}

#[cfg(not(target_arch = "x86_64"))]
pub const DENIED_SYSCALLS: &[(&str, i64)] = &[];

#[cfg(not(target_arch = "x86_64"))]
pub fn compile() -> Result<Filters, String> {
    Err("the sandbox's seccomp filter is only written for x86_64 hosts".to_string())
}

/// Installs `filters` on the calling thread (and what it executes), without `no_new_privs`:
/// the caller must hold `CAP_SYS_ADMIN`.
pub fn install(filters: &Filters) -> std::io::Result<()> {
    for program in [&filters.enosys, &filters.eperm] {
        let length = u16::try_from(program.len())
            .map_err(|_| std::io::Error::other("the seccomp filter is too long"))?;
        let fprog = libc::sock_fprog {
            len: length,
            // seccompiler's sock_filter has the kernel's layout.
            filter: program.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: seccomp(2) with a valid program that outlives the call (the kernel copies it).
        let result = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &fprog as *const libc::sock_fprog,
            )
        };
        if result != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn kept() -> CapsHashSet {
    KEPT_CAPABILITIES.into_iter().collect()
}

/// Drops every capability but [`KEPT_CAPABILITIES`] from the bounding set: neither the step
/// nor a setuid program it runs can ever regain them. Needs `CAP_SETPCAP`.
pub fn limit_bounding_set() -> Result<(), String> {
    let kept = kept();
    for capability in caps::all() {
        if kept.contains(&capability) {
            continue;
        }
        // Capabilities newer than the running kernel are not in its bounding set.
        if caps::has_cap(None, CapSet::Bounding, capability).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, capability)
                .map_err(|error| format!("drop {capability} from the bounding set: {error}"))?;
        }
    }
    Ok(())
}

/// After the change of user: root keeps [`KEPT_CAPABILITIES`] effective and permitted,
/// another user nothing; the inheritable and ambient sets are emptied.
pub fn set_process_capabilities(root: bool) -> Result<(), String> {
    let sets = if root { kept() } else { CapsHashSet::new() };
    let fail = |what: &str, error: caps::errors::CapsError| format!("set the {what}: {error}");
    // Effective first: it must stay a subset of permitted.
    caps::set(None, CapSet::Effective, &sets)
        .map_err(|error| fail("effective capabilities", error))?;
    caps::set(None, CapSet::Permitted, &sets)
        .map_err(|error| fail("permitted capabilities", error))?;
    caps::clear(None, CapSet::Inheritable)
        .map_err(|error| fail("inheritable capabilities", error))?;
    // Kernels without ambient capabilities have nothing to clear.
    let _ = caps::clear(None, CapSet::Ambient);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kept_mask_is_dockers_default() {
        let mask = KEPT_CAPABILITIES
            .iter()
            .fold(0u64, |mask, capability| mask | capability.bitmask());
        assert_eq!(mask, KEPT_CAPABILITY_MASK);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn filters_compile_within_the_kernels_limit() {
        let filters = compile().expect("compile");
        assert!(filters.eperm.len() < 4096, "{}", filters.eperm.len());
        assert!(filters.enosys.len() < 4096, "{}", filters.enosys.len());
    }
}
