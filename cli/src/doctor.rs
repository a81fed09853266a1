//! `graphbuild doctor`: is this machine ready to build, and if not, what to do.

use std::path::{Path, PathBuf};

use graphbuild_engine::binfmt::{self, Emulation};
use graphbuild_engine::store::Store;
use graphbuild_lang::ir::PlatformSpec;
use graphbuild_lang::platform::Platform;

use crate::{CliError, ExitStatus};

/// The hidden argument that makes the binary probe namespaces and exit.
pub(crate) const PROBE_ARG: &str = "__graphbuild-probe-namespaces";

/// Runs in a fresh single-threaded child: can we create the namespaces a sandbox needs?
pub(crate) fn probe_namespaces() -> ! {
    use nix::sched::{CloneFlags, unshare};
    let flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC;
    if let Err(error) = unshare(flags) {
        eprintln!("{error}");
        std::process::exit(1)
    }
    // Then an overlay mount like a step's (with `userxattr` in a user namespace): exit 2 when
    // the kernel refuses it.
    match probe_overlay() {
        Ok(()) => std::process::exit(0),
        Err(error) => {
            eprintln!("overlayfs: {error}");
            std::process::exit(2)
        }
    }
}

/// An overlay mount like a step's, with an opaque directory in its lower layer: on the
/// store's filesystem when the store exists (its xattr support matters), else on a tmpfs.
fn probe_overlay() -> Result<(), String> {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|error| format!("make mounts private: {error}"))?;
    let name = format!(".graphbuild-probe-{}", std::process::id());
    let store = std::env::args_os()
        .nth(2)
        .map(std::path::PathBuf::from)
        .filter(|store| store.is_dir());
    let on_store = store.is_some();
    let dir = match store {
        Some(store) => store.join(name),
        None => std::env::temp_dir().join(name),
    };
    std::fs::create_dir_all(&dir).map_err(|error| error.to_string())?;
    let userns = graphbuild_engine::rootless::in_user_namespace();
    let result = (|| {
        if !on_store {
            mount(
                Some("tmpfs"),
                &dir,
                Some("tmpfs"),
                MsFlags::empty(),
                Some("size=1m"),
            )
            .map_err(|error| format!("mount tmpfs: {error}"))?;
        }
        for sub in ["l", "l/d", "u", "w", "m"] {
            std::fs::create_dir(dir.join(sub)).map_err(|error| error.to_string())?;
        }
        let attribute = if userns {
            "user.overlay.opaque"
        } else {
            "trusted.overlay.opaque"
        };
        xattr_set(&dir.join("l/d"), attribute).map_err(|error| {
            format!(
                "cannot set {attribute} on {}: {error}",
                if on_store {
                    "the store's filesystem"
                } else {
                    "a tmpfs"
                }
            )
        })?;
        let options = format!(
            "lowerdir={0}/l,upperdir={0}/u,workdir={0}/w,index=off,metacopy=off,{1}",
            dir.display(),
            if userns {
                "redirect_dir=nofollow,userxattr"
            } else {
                "redirect_dir=off"
            }
        );
        mount(
            Some("overlay"),
            &dir.join("m"),
            Some("overlay"),
            MsFlags::MS_NODEV,
            Some(options.as_str()),
        )
        .map_err(|error| error.to_string())?;
        let _ = umount2(&dir.join("m"), MntFlags::MNT_DETACH);
        Ok(())
    })();
    if on_store {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        let _ = umount2(&dir, MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&dir);
    }
    result
}

fn xattr_set(path: &Path, name: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let name = std::ffi::CString::new(name)?;
    // SAFETY: NUL-terminated strings and a one-byte value that outlive the call.
    let result =
        unsafe { libc::lsetxattr(path.as_ptr(), name.as_ptr(), b"y".as_ptr().cast(), 1, 0) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Rootless: who we are on the host and which ids the user namespace maps.
fn rootless_checks(checks: &mut Vec<Check>) {
    use graphbuild_engine::rootless;
    let Some((uid, _gid, subid)) = rootless::host_user() else {
        if rootless::in_user_namespace() {
            checks.push(check(
                true,
                false,
                "running in a user namespace made by someone else (a container?): ownership \
                 is limited to the ids it maps",
                None,
            ));
        }
        // As root in the initial namespace: builds use the host's ids, nothing to say.
        return;
    };
    let plan_user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|user| user.name)
        .unwrap_or_else(|| uid.to_string());
    let map = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    let mapped: u64 = map
        .lines()
        .filter_map(|line| line.split_whitespace().nth(2)?.parse::<u64>().ok())
        .sum();
    checks.push(check(
        subid,
        false,
        if subid {
            format!(
                "rootless: user `{plan_user}` (uid {uid}) is root of a user namespace mapping \
                 {mapped} ids (newuidmap/newgidmap, /etc/subuid and /etc/subgid): layers with \
                 any owner build"
            )
        } else {
            format!(
                "rootless: user `{plan_user}` (uid {uid}) is root of a user namespace mapping \
                 only itself: images whose files all belong to root build, others fail"
            )
        },
        (!subid).then(|| {
            format!(
                "as root: `apt-get install uidmap`, and give `{plan_user}` a range no one else \
                 has: {}",
                rootless::add_range_command(&plan_user)
            )
        }),
    ));
}

/// Which overlay steps mount their root with, and why: for this build (in a user namespace, a
/// rootless build's), and, run as root, also for rootless builds on this machine.
fn overlay_checks(
    checks: &mut Vec<Check>,
    store: &Path,
    namespaces: bool,
    code: Option<i32>,
    probe: Option<&std::process::Output>,
) {
    use graphbuild_engine::sandbox::overlay::{self, Overlay, OverlayMode};
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    // Probed where upper directories live: the store's file system, when it exists.
    let dir = if store.is_dir() {
        store.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let mode = match OverlayMode::from_env() {
        Ok(mode) => mode,
        Err(error) => {
            checks.push(check(
                false,
                true,
                error.to_string(),
                Some(format!("unset {} or fix its value", overlay::OVERLAY_ENV)),
            ));
            OverlayMode::Auto
        }
    };
    let userns = graphbuild_engine::rootless::in_user_namespace();
    let describe = |selection: &overlay::Selection, who: &str| match (&selection.overlay, userns) {
        (Overlay::Native, true) if !selection.fallback && mode == OverlayMode::Auto => format!(
            "overlay: overlayfs mounts natively in the user namespace (kernel ≥ 5.11, \
             userxattr): {who} use the kernel's overlayfs"
        ),
        _ => format!(
            "overlay: {who} use {} ({})",
            selection.overlay.describe(),
            selection.reason
        ),
    };
    let unavailable = |who: &str, unavailable: overlay::Unavailable, required: bool| {
        check(
            false,
            required,
            format!("overlay: {who} have none: {}", unavailable.problem),
            Some(unavailable.fix),
        )
    };
    if userns {
        if namespaces {
            checks.push(match overlay::select(mode, &exe, &dir, false) {
                Ok(selection) => check(true, true, describe(&selection, "steps"), None),
                Err(error) => unavailable("steps", error, true),
            });
        }
        return;
    }
    // As root: root's own builds…
    let available = std::fs::read_to_string("/proc/filesystems")
        .is_ok_and(|filesystems| filesystems.contains("overlay"));
    let mounts = code == Some(0);
    if mode == OverlayMode::Auto || !namespaces {
        checks.push(check(
            available && (mounts || !namespaces),
            true,
            "overlayfs is available",
            (!available || (namespaces && !mounts)).then(|| {
                let said = probe
                    .map(|output| String::from_utf8_lossy(&output.stderr).trim().to_string())
                    .unwrap_or_default();
                if available {
                    format!(
                        "the kernel refused an overlay mount: {said}; install `{}` to fall back \
                         to it",
                        overlay::FUSE_PACKAGE
                    )
                } else {
                    format!(
                        "load it with `modprobe overlay`, or install `{}` to fall back to it",
                        overlay::FUSE_PACKAGE
                    )
                }
            }),
        ));
    } else {
        checks.push(match overlay::select(mode, &exe, &dir, false) {
            Ok(selection) => check(true, true, describe(&selection, "builds as root"), None),
            Err(error) => unavailable("builds as root", error, true),
        });
    }
    // …and what an ordinary user's would get, probed in a user namespace of its own.
    if namespaces {
        checks.push(match overlay::select_for_rootless_users(&exe, &dir) {
            Ok(selection) => {
                let text = match &selection.overlay {
                    Overlay::Native => format!(
                        "overlay: rootless builds use the kernel's overlayfs (it mounts natively \
                         in a user namespace here: kernel ≥ 5.11, userxattr){}",
                        if mode == OverlayMode::Fuse {
                            "; GRAPHBUILD_OVERLAY=fuse makes them use fuse-overlayfs"
                        } else {
                            ""
                        }
                    ),
                    Overlay::Fuse { .. } => format!(
                        "overlay: rootless builds use {} ({}), which is slower",
                        selection.overlay.describe(),
                        selection.reason.replace("here", "in a user namespace here")
                    ),
                };
                check(true, false, text, None)
            }
            Err(error) => unavailable("rootless builds", error, false),
        });
    }
}

pub(crate) fn binfmt_dir() -> PathBuf {
    std::env::var_os("GRAPHBUILD_BINFMT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(binfmt::BINFMT_MISC_DIR))
}

struct Check {
    ok: bool,
    /// Required checks make the exit code non-zero when they fail.
    required: bool,
    what: String,
    fix: Option<String>,
}

fn check(ok: bool, required: bool, what: impl Into<String>, fix: Option<String>) -> Check {
    Check {
        ok,
        required,
        what: what.into(),
        fix,
    }
}

/// qemu's name for `architecture` and its binfmt_misc magic and mask as `\xNN` escapes, all
/// from the engine's ELF tables (the ones `run`'s emulator check matches handlers against).
fn registration(architecture: &str) -> Option<(&'static str, String, String)> {
    let name = binfmt::qemu_name(architecture)?;
    let (magic, mask) = binfmt::registration_magic(architecture)?;
    let escape =
        |bytes: &[u8]| -> String { bytes.iter().map(|byte| format!("\\x{byte:02x}")).collect() };
    Some((name, escape(&magic), escape(&mask)))
}

/// Mount binfmt_misc and register qemu-user-static handlers with the F flag, as
/// `tonistiigi/binfmt --install` does for Docker users.
fn fix_emulation(dir: &Path, platforms: &[Platform]) -> Vec<String> {
    let mut done = Vec::new();
    if !binfmt::binfmt_mounted(dir) {
        match nix::mount::mount(
            Some("binfmt_misc"),
            dir,
            Some("binfmt_misc"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        ) {
            Ok(()) => done.push(format!("mounted binfmt_misc at {}", dir.display())),
            Err(error) => done.push(format!(
                "could not mount binfmt_misc at {}: {error}",
                dir.display()
            )),
        }
    }
    // Debian's way first: it registers every installed qemu-user-static handler with F.
    if std::process::Command::new("update-binfmts")
        .arg("--enable")
        .output()
        .is_ok_and(|output| output.status.success())
    {
        done.push("enabled the registered handlers (update-binfmts --enable)".into());
    }
    let host = Platform::host();
    for platform in platforms {
        if binfmt::check_emulation(dir, platform, &host).is_ok() {
            continue;
        }
        let Some((name, magic, mask)) = registration(&platform.architecture) else {
            continue;
        };
        let interpreter = ["/usr/bin", "/usr/local/bin", "/usr/libexec/qemu-binfmt"]
            .iter()
            .map(|prefix| PathBuf::from(format!("{prefix}/qemu-{name}-static")))
            .find(|path| path.exists());
        let Some(interpreter) = interpreter else {
            done.push(format!(
                "no qemu-{name}-static found: install qemu-user-static"
            ));
            continue;
        };
        let handler = format!("qemu-{name}");
        let _ = std::fs::write(dir.join(&handler), "-1");
        let line = format!(":{handler}:M::{magic}:{mask}:{}:F", interpreter.display());
        match std::fs::write(dir.join("register"), line) {
            Ok(()) => done.push(format!(
                "registered {handler} → {} with the F flag",
                interpreter.display()
            )),
            Err(error) => done.push(format!("could not register {handler}: {error}")),
        }
    }
    done
}

fn platforms_of(file: &Path) -> Result<Vec<Platform>, CliError> {
    let project = graphbuild_lang::load(file)
        .map_err(|diagnostics| CliError::report(ExitStatus::InvalidInput, diagnostics))?;
    let mut platforms: Vec<Platform> = Vec::new();
    let specs = project.platforms.iter().chain(
        project
            .images
            .iter()
            .flat_map(|image| image.platforms.iter().flatten()),
    );
    for spec in specs {
        if let PlatformSpec::Literal(platform, _) = spec
            && !platforms.contains(platform)
        {
            platforms.push(platform.clone());
        }
    }
    Ok(platforms)
}

/// What confines a `run` step here, and what does not (docs/security.md).
fn containment_checks(checks: &mut Vec<Check>) {
    use graphbuild_engine::sandbox::{DEFAULT_MAX_PROCESSES, confine, limits};
    let seccomp_kernel = std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|status| status.lines().any(|line| line.starts_with("Seccomp:")));
    let filter = confine::compile();
    let seccomp = seccomp_kernel && filter.is_ok();
    checks.push(check(
        seccomp,
        true,
        format!(
            "run steps get a seccomp filter for x86_64 and 32-bit x86 programs ({} system calls \
             refused, clone3 and x32 ENOSYS) and Docker's default capabilities (CapEff {:016x} \
             as root)",
            confine::DENIED_SYSCALLS.len() + 2,
            confine::KEPT_CAPABILITY_MASK
        ),
        (!seccomp).then(|| match filter {
            Err(error) => error.to_string(),
            Ok(_) => "the kernel lacks seccomp filters (CONFIG_SECCOMP_FILTER)".to_string(),
        }),
    ));
    match limits::locate() {
        Ok(location) => checks.push(check(
            true,
            false,
            format!(
                "run steps are limited to {DEFAULT_MAX_PROCESSES} processes each by default \
                 ({} pids controller)",
                location.version
            ),
            None,
        )),
        Err(reason) => checks.push(check(
            false,
            false,
            format!(
                "run steps have only an approximate process limit (counted every 100ms; no \
                 pids cgroup: {reason})"
            ),
            Some(
                "enable the pids controller (cgroup v2) or mount the cgroup v1 pids hierarchy"
                    .to_string(),
            ),
        )),
    }
    checks.push(check(
        true,
        false,
        "step timeouts (`timeout=` on run, --step-timeout) kill the step's whole pid namespace",
        None,
    ));
    checks.push(check(
        true,
        false,
        "run steps share the host's network unless they say `network \"none\"`",
        None,
    ));
}

pub(crate) fn doctor(
    file: Option<PathBuf>,
    fix: bool,
    cache_dir: Option<PathBuf>,
) -> Result<ExitStatus, CliError> {
    let dir = binfmt_dir();
    let platforms = doctor_platforms(file.as_deref())?;
    if fix {
        fix_emulators(&dir, &platforms);
    }

    let mut checks = Vec::new();
    let root = cache_dir.unwrap_or_else(Store::default_root);
    let probe = std::env::current_exe().ok().and_then(|exe| {
        std::process::Command::new(exe)
            .arg(PROBE_ARG)
            .arg(&root)
            .output()
            .ok()
    });
    rootless_checks(&mut checks);
    let code = probe.as_ref().and_then(|output| output.status.code());
    let namespaces = matches!(code, Some(0 | 2));
    namespace_check(&mut checks, namespaces, probe.as_ref());
    overlay_checks(&mut checks, &root, namespaces, code, probe.as_ref());
    containment_checks(&mut checks);
    emulation_checks(&mut checks, &dir, &platforms);
    let store = Store::open(&root);
    checks.push(check(
        store.is_ok(),
        true,
        format!("the store {} is writable", root.display()),
        store.as_ref().err().map(|error| {
            format!("{error}; choose another with --cache-dir or GRAPHBUILD_CACHE_DIR")
        }),
    ));
    credentials_check(&mut checks);
    cache_server_check(&mut checks);

    // A failed check is the command's answer, printed with its fix.
    Ok(if print_checks(&checks) {
        ExitStatus::Environment
    } else {
        ExitStatus::Success
    })
}

/// The platforms whose emulators are checked: the build file's, or three common ones.
fn doctor_platforms(file: Option<&Path>) -> Result<Vec<Platform>, CliError> {
    let mut platforms = match file {
        Some(file) => platforms_of(file)?,
        None => Vec::new(),
    };
    if platforms.is_empty() {
        platforms = ["linux/amd64", "linux/arm64", "linux/arm/v7"]
            .iter()
            .filter_map(|p| Platform::parse(p).ok())
            .collect();
    }
    Ok(platforms)
}

/// `--fix`: register the emulators, as root outside any user namespace.
fn fix_emulators(dir: &Path, platforms: &[Platform]) {
    if nix::unistd::geteuid().is_root() && !graphbuild_engine::rootless::in_user_namespace() {
        for line in fix_emulation(dir, platforms) {
            println!("fix: {line}");
        }
    } else {
        println!(
            "fix: skipped, `graphbuild doctor --fix` must run as root (binfmt handlers are \
             registered once per boot for every user)"
        );
    }
}

/// Whether the namespace probe (a child of this binary) could create a sandbox's namespaces.
fn namespace_check(
    checks: &mut Vec<Check>,
    namespaces: bool,
    probe: Option<&std::process::Output>,
) {
    checks.push(check(
        namespaces,
        true,
        "kernel namespaces (mount, pid, uts, ipc) can be created",
        (!namespaces).then(|| {
            let reason = probe
                .map(|output| String::from_utf8_lossy(&output.stderr).trim().to_string())
                .unwrap_or_default();
            format!(
                "run graphbuild as root (builds need CAP_SYS_ADMIN){}",
                if reason.is_empty() {
                    String::new()
                } else {
                    format!("; the kernel said: {reason}")
                }
            )
        }),
    ));
}

/// binfmt_misc mounted, and each platform native or emulated.
fn emulation_checks(checks: &mut Vec<Check>, dir: &Path, platforms: &[Platform]) {
    let host = Platform::host();
    let mounted = binfmt::binfmt_mounted(dir);
    checks.push(check(
        mounted,
        true,
        format!("binfmt_misc is mounted at {}", dir.display()),
        (!mounted).then(|| {
            format!(
                "`mount -t binfmt_misc binfmt_misc {}`, or `graphbuild doctor --fix`",
                dir.display()
            )
        }),
    ));
    for platform in platforms {
        match binfmt::check_emulation(dir, platform, &host) {
            Ok(Emulation::Native) => {
                checks.push(check(true, true, format!("{platform} runs natively"), None))
            }
            Ok(Emulation::Emulated {
                handler,
                interpreter,
            }) => checks.push(check(
                true,
                true,
                format!(
                    "{platform} runs through {handler} ({}, F flag)",
                    interpreter.display()
                ),
                None,
            )),
            Err(error) => {
                let help = miette::Diagnostic::help(&error).map(|help| help.to_string());
                checks.push(check(false, true, format!("{platform}: {error}"), help));
            }
        }
    }
}

/// The registry credentials file, when there is one (not required: anonymous pulls work).
fn credentials_check(checks: &mut Vec<Check>) {
    let docker_config = std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".docker")))
        .map(|dir| dir.join("config.json"));
    match docker_config {
        Some(path) if path.exists() => {
            let readable = std::fs::read(&path)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
                .is_some();
            checks.push(check(
                readable,
                false,
                format!("registry credentials file {} is readable", path.display()),
                (!readable)
                    .then(|| "fix its permissions or JSON; `docker login` rewrites it".to_string()),
            ));
        }
        Some(path) => checks.push(check(
            true,
            false,
            format!(
                "no registry credentials file ({}): anonymous pulls only",
                path.display()
            ),
            None,
        )),
        None => {}
    }
}

/// The team cache of `GRAPHBUILD_CACHE`, when it is set.
fn cache_server_check(checks: &mut Vec<Check>) {
    if let Ok(url) = std::env::var("GRAPHBUILD_CACHE") {
        let health = format!("{}/healthz", url.trim_end_matches('/'));
        let reachable = ureq::get(&health)
            .call()
            .is_ok_and(|response| response.status().is_success());
        checks.push(check(
            reachable,
            true,
            format!("the cache server {url} is reachable"),
            (!reachable).then(|| {
                "start it with `graphbuild cache serve`, or unset GRAPHBUILD_CACHE".to_string()
            }),
        ));
    }
}

/// Prints each check and its fix; whether a required one failed.
fn print_checks(checks: &[Check]) -> bool {
    let color = crate::render::color_enabled();
    let mut failed = false;
    for check in checks {
        let mark = match (check.ok, color) {
            (true, true) => "\x1b[32m✓\x1b[0m",
            (true, false) => "✓",
            (false, true) => "\x1b[31m✗\x1b[0m",
            (false, false) => "✗",
        };
        println!("{mark} {}", check.what);
        if let (false, Some(fix)) = (check.ok, &check.fix) {
            println!("    fix: {fix}");
        }
        failed |= !check.ok && check.required;
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_come_from_the_engine_and_match_qemus() {
        let (name, magic, mask) = registration("arm64").unwrap();
        assert_eq!(name, "aarch64");
        // qemu-binfmt-conf.sh's aarch64 line, byte for byte.
        assert_eq!(
            magic,
            r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
        );
        assert_eq!(
            mask,
            r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
        );
        assert_eq!(registration("arm").unwrap().0, "arm");
        assert_eq!(registration("amd64").unwrap().0, "x86_64");
        assert!(registration("mips").is_none());
    }
}
