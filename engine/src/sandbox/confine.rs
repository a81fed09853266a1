//! What a `run` step may do once it runs: its capabilities and its seccomp filter.
//!
//! The step keeps Docker's default capability set ([`KEPT_CAPABILITIES`]) in its bounding,
//! effective and permitted sets when it runs as root, and none in its effective and permitted
//! sets as another user (as Docker and runc do); its inheritable and ambient sets are empty.
//! Setuid programs (`su`, `sudo`) still work: they gain at most the bounding set.
//!
//! Seccomp filters, compiled with `seccompiler`, for both ABIs a process can enter an x86_64
//! kernel through: x86_64 (native programs, and qemu-user running foreign ones, whose system
//! calls are the host's) and 32-bit x86 (`linux/386` programs, or a 32-bit tool in an amd64
//! image), each with its own system call numbers:
//!
//! - [`DENIED_SYSCALLS`] return `EPERM`, as do `clone` and `unshare` asking for a new
//!   namespace (Docker's default profile refuses the same calls, or lets them through only
//!   with capabilities a step does not have).
//! - `clone3` returns `ENOSYS` (its flags are behind a pointer a filter cannot read; libc falls
//!   back to `clone`, as under Docker), and every x32-ABI system call returns `ENOSYS`.
//! - A system call of any other ABI kills the process.
//!
//! The filters are installed without `no_new_privs` (which would break setuid programs),
//! which the kernel allows only while the process holds `CAP_SYS_ADMIN`: PID 1 installs them
//! before it changes user and drops its capabilities.

use std::collections::BTreeMap;

use caps::{CapSet, Capability, CapsHashSet};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch, sock_filter,
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
const X32_SYSCALL_BIT: i64 = 0x4000_0000;
/// x32 system call numbers run from 0 to 547 (512 and up are x32's own entry points).
const X32_LAST_SYSCALL: i64 = 547;

/// System calls that return `EPERM` in a step, by name: each ABI's filter refuses those of
/// them it has (`umount`, `stime`, `vm86` and the `*64` clock calls exist on 32-bit x86 only,
/// `kexec_file_load` on x86_64 only).
pub const DENIED_SYSCALLS: &[&str] = &[
    // Mounts and the filesystem tree.
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    // File handles bypass the mount namespace (the "shocker" escape).
    "open_by_handle_at",
    "name_to_handle_at",
    // Namespaces.
    "setns",
    // The kernel itself.
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "bpf",
    "perf_event_open",
    "lookup_dcookie",
    "syslog",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "quotactl_fd",
    "iopl",
    "ioperm",
    "vm86",
    "vm86old",
    "_sysctl",
    "uselib",
    "nfsservctl",
    "vhangup",
    "fanotify_init",
    "userfaultfd",
    // The kernel keyring is not namespaced.
    "keyctl",
    "add_key",
    "request_key",
    // Clocks are not namespaced.
    "settimeofday",
    "stime",
    "clock_settime",
    "clock_settime64",
    "clock_adjtime",
    "clock_adjtime64",
    "adjtimex",
    // Other processes' memory.
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    // io_uring bypasses seccomp for the operations it performs (Docker refuses it too).
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
];

/// An ABI through which a process can enter an x86_64 kernel, and so one the filter must
/// cover: native x86_64 programs (and qemu-user running foreign ones), and native 32-bit x86
/// programs (`linux/386`, or a 32-bit tool inside an amd64 image). x32 is refused outright.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abi {
    X86_64,
    I386,
}

impl Abi {
    pub const ALL: [Abi; 2] = [Abi::X86_64, Abi::I386];

    /// The `AUDIT_ARCH_*` value the kernel reports in `seccomp_data.arch` (linux/audit.h:
    /// the ELF machine, `__AUDIT_ARCH_64BIT`, `__AUDIT_ARCH_LE`).
    pub const fn audit_arch(self) -> u32 {
        const LE: u32 = 0x4000_0000;
        const BIT64: u32 = 0x8000_0000;
        match self {
            Abi::X86_64 => 62 | BIT64 | LE,
            Abi::I386 => 3 | LE,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Abi::X86_64 => "x86_64",
            Abi::I386 => "i386",
        }
    }

    /// The system call's number in this ABI's table, if the ABI has it.
    pub fn number(self, name: &str) -> Option<i64> {
        match self {
            Abi::X86_64 => name
                .parse::<syscalls::x86_64::Sysno>()
                .ok()
                .map(|call| i64::from(call.id())),
            Abi::I386 => name
                .parse::<syscalls::x86::Sysno>()
                .ok()
                .map(|call| i64::from(call.id())),
        }
    }

    fn required(self, name: &'static str) -> Result<i64, ConfineError> {
        self.number(name).ok_or(ConfineError::MissingSyscall {
            abi: self.name(),
            name,
        })
    }
}

/// Why the step's confinement could not be prepared or applied. The sandbox child reports it
/// as the message of the setup step that failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("the {abi} system call table has no `{name}`")]
    MissingSyscall {
        abi: &'static str,
        name: &'static str,
    },
    #[error("compile the seccomp filter: {0}")]
    Compile(#[from] seccompiler::BackendError),
    #[error(
        "compile the seccomp filter: seccompiler's program does not begin with the \
         architecture check this sandbox replaces"
    )]
    UnexpectedProgram,
    #[error("the sandbox's seccomp filter is only written for x86_64 hosts")]
    UnsupportedHost,
    #[error("drop {capability} from the bounding set: {source}")]
    BoundingSet {
        capability: Capability,
        #[source]
        source: caps::errors::CapsError,
    },
    #[error("set the {set}: {source}")]
    Capabilities {
        set: &'static str,
        #[source]
        source: caps::errors::CapsError,
    },
}

/// The step's filters, ready to install: for each ABI, one refusing calls with `EPERM` and
/// one with `ENOSYS`.
pub struct Filters {
    programs: Vec<BpfProgram>,
}

/// Compiles the step's filters.
///
/// The rules of each ABI are compiled by `seccompiler`, which only knows 64-bit targets and
/// begins every program by killing the process when `seccomp_data.arch` is not its target's.
/// So the rules are compiled against its x86_64 target with the ABI's own system call
/// numbers, and that three-instruction check is replaced by [`arch_dispatch`]: the filters of
/// one ABI let the other ABI's calls through to that ABI's filters (the kernel runs every
/// installed filter and keeps the strictest answer), and an unknown ABI is killed as before.
#[cfg(target_arch = "x86_64")]
pub fn compile() -> Result<Filters, ConfineError> {
    let mut programs = Vec::new();
    for abi in Abi::ALL {
        let (eperm, enosys) = compile_rules(abi)?;
        for filter in [enosys, eperm] {
            let program = BpfProgram::try_from(filter)?;
            programs.push(retarget(program, abi)?);
        }
    }
    Ok(Filters { programs })
}

#[cfg(not(target_arch = "x86_64"))]
pub fn compile() -> Result<Filters, ConfineError> {
    Err(ConfineError::UnsupportedHost)
}

/// The `EPERM` and `ENOSYS` rules of one ABI, as seccompiler filters.
fn compile_rules(abi: Abi) -> Result<(SeccompFilter, SeccompFilter), ConfineError> {
    let error = ConfineError::Compile;
    let namespace_rules = |extra: &[u64]| -> Result<Vec<SeccompRule>, ConfineError> {
        NAMESPACE_FLAGS
            .iter()
            .chain(extra)
            .map(|flag| {
                // Flags are the first argument of `clone` and `unshare` in both ABIs; the
                // upper half of a 32-bit program's argument is zero.
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
        .filter_map(|name| abi.number(name))
        .map(|number| (number, Vec::new()))
        .collect();
    denied.insert(abi.required("clone")?, namespace_rules(&[])?);
    denied.insert(abi.required("unshare")?, namespace_rules(&[CLONE_NEWTIME])?);
    let eperm = SeccompFilter::new(
        denied,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )
    .map_err(error)?;

    let mut missing: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    if abi == Abi::X86_64 {
        missing.extend((0..=X32_LAST_SYSCALL).map(|number| (number | X32_SYSCALL_BIT, Vec::new())));
    }
    missing.insert(abi.required("clone3")?, Vec::new());
    let enosys = SeccompFilter::new(
        missing,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(error)?;
    Ok((eperm, enosys))
}

const fn statement(code: u32, k: u32) -> sock_filter {
    jump(code, k, 0, 0)
}

const fn jump(code: u32, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// `A = seccomp_data.arch`.
const LOAD_ARCH: sock_filter = statement(
    libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
    std::mem::offset_of!(libc::seccomp_data, arch) as u32,
);

/// The first instructions of a program for `abi`: fall through to its rules for that ABI's
/// calls; let the other known ABI through (its own filters judge it); kill anything else.
fn arch_dispatch(abi: Abi) -> Vec<sock_filter> {
    let other = match abi {
        Abi::X86_64 => Abi::I386,
        Abi::I386 => Abi::X86_64,
    };
    let ret = libc::BPF_RET | libc::BPF_K;
    let equal = libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K;
    vec![
        LOAD_ARCH,
        // A jump skips that many instructions: 3 lands on the rules after the dispatch.
        jump(equal, abi.audit_arch(), 3, 0),
        jump(equal, other.audit_arch(), 0, 1),
        statement(ret, libc::SECCOMP_RET_ALLOW),
        statement(ret, libc::SECCOMP_RET_KILL_PROCESS),
    ]
}

/// Replaces seccompiler's architecture check at the start of `program` (checked to be exactly
/// what seccompiler 0.5 writes, so a change of its output fails here, not in a step) by
/// [`arch_dispatch`]. The rules that follow only jump forward within themselves.
fn retarget(program: BpfProgram, abi: Abi) -> Result<BpfProgram, ConfineError> {
    let seccompiler_check = [
        LOAD_ARCH,
        jump(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            Abi::X86_64.audit_arch(),
            1,
            0,
        ),
        statement(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_KILL_PROCESS),
    ];
    let same =
        |a: &sock_filter, b: &sock_filter| (a.code, a.jt, a.jf, a.k) == (b.code, b.jt, b.jf, b.k);
    let starts_with_check = program.len() > seccompiler_check.len()
        && program
            .iter()
            .zip(&seccompiler_check)
            .all(|(a, b)| same(a, b));
    if !starts_with_check {
        return Err(ConfineError::UnexpectedProgram);
    }
    let mut retargeted = arch_dispatch(abi);
    retargeted.extend_from_slice(&program[seccompiler_check.len()..]);
    Ok(retargeted)
}

/// Installs `filters` on the calling thread (and what it executes), without `no_new_privs`:
/// the caller must hold `CAP_SYS_ADMIN`.
pub fn install(filters: &Filters) -> std::io::Result<()> {
    for program in &filters.programs {
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
pub fn limit_bounding_set() -> Result<(), ConfineError> {
    let kept = kept();
    for capability in caps::all() {
        if kept.contains(&capability) {
            continue;
        }
        // Capabilities newer than the running kernel are not in its bounding set.
        if caps::has_cap(None, CapSet::Bounding, capability).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, capability)
                .map_err(|source| ConfineError::BoundingSet { capability, source })?;
        }
    }
    Ok(())
}

/// After the change of user: root keeps [`KEPT_CAPABILITIES`] effective and permitted,
/// another user nothing; the inheritable and ambient sets are emptied.
pub fn set_process_capabilities(root: bool) -> Result<(), ConfineError> {
    let sets = if root { kept() } else { CapsHashSet::new() };
    let fail = |set: &'static str, source: caps::errors::CapsError| ConfineError::Capabilities {
        set,
        source,
    };
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
    fn filters_compile_within_the_kernels_limit_for_both_abis() {
        let filters = compile().expect("compile");
        assert_eq!(filters.programs.len(), 4);
        for program in &filters.programs {
            assert!(program.len() < 4096, "{}", program.len());
            // Every program starts with the dispatch on `seccomp_data.arch`.
            let dispatch = |abi| {
                arch_dispatch(abi)
                    .iter()
                    .map(|i| (i.code, i.jt, i.jf, i.k))
                    .collect::<Vec<_>>()
            };
            let start: Vec<_> = program[..3]
                .iter()
                .map(|i| (i.code, i.jt, i.jf, i.k))
                .collect();
            assert!(start == dispatch(Abi::X86_64)[..3] || start == dispatch(Abi::I386)[..3]);
        }
    }

    #[test]
    fn every_denied_call_exists_in_at_least_one_abi() {
        for name in DENIED_SYSCALLS {
            assert!(
                Abi::ALL.iter().any(|abi| abi.number(name).is_some()),
                "`{name}` is in no system call table"
            );
        }
        for name in ["clone", "unshare", "clone3"] {
            for abi in Abi::ALL {
                abi.required(name)
                    .expect("namespace calls exist in both ABIs");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_x86_64_table_agrees_with_libc() {
        for (name, number) in [
            ("mount", libc::SYS_mount),
            ("clone", libc::SYS_clone),
            ("clone3", libc::SYS_clone3),
            ("unshare", libc::SYS_unshare),
            ("open_by_handle_at", libc::SYS_open_by_handle_at),
            ("io_uring_setup", libc::SYS_io_uring_setup),
        ] {
            assert_eq!(Abi::X86_64.number(name), Some(number), "{name}");
        }
        // The kernel's arch/x86/entry/syscalls/syscall_32.tbl.
        for (name, number) in [
            ("mount", 21),
            ("umount", 22),
            ("clone", 120),
            ("unshare", 310),
            ("clone3", 435),
        ] {
            assert_eq!(Abi::I386.number(name), Some(number), "{name}");
        }
    }

    #[test]
    fn the_dispatch_sends_each_abi_to_its_rules_and_kills_others() {
        // Interprets the dispatch the way the kernel's BPF machine would.
        let run = |program: &[sock_filter], arch: u32| -> Option<u32> {
            let mut pc = 0;
            let mut a = 0u32;
            while pc < program.len() {
                let i = &program[pc];
                match u32::from(i.code) {
                    code if code == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => a = arch,
                    code if code == libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K => {
                        pc += usize::from(if a == i.k { i.jt } else { i.jf });
                    }
                    code if code == libc::BPF_RET | libc::BPF_K => return Some(i.k),
                    _ => unreachable!(),
                }
                pc += 1;
            }
            None // fell through to the rules
        };
        for abi in Abi::ALL {
            let dispatch = arch_dispatch(abi);
            assert_eq!(run(&dispatch, abi.audit_arch()), None);
            let other = Abi::ALL
                .into_iter()
                .find(|other| *other != abi)
                .expect("two");
            assert_eq!(
                run(&dispatch, other.audit_arch()),
                Some(libc::SECCOMP_RET_ALLOW)
            );
            assert_eq!(
                run(&dispatch, 0xc000_00b7),
                Some(libc::SECCOMP_RET_KILL_PROCESS)
            );
        }
    }
}
