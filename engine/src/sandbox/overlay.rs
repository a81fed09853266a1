//! Which overlay a step's root is mounted with: the kernel's overlayfs, or fuse-overlayfs where
//! the kernel refuses it (in a user namespace before Linux 5.11, or on kernels built or
//! configured without unprivileged overlayfs).
//!
//! # Chosen once per build
//!
//! `GRAPHBUILD_OVERLAY` ([`OVERLAY_ENV`]) is `auto` (the default), `native` or `fuse`. In
//! `auto`, the first time a build needs a sandbox it mounts a probe overlay in the store's
//! scratch area, in a sandbox child exactly as a step does (same namespaces, same options);
//! when the kernel refuses that mount (`EPERM`, `EINVAL`, `ENODEV`…), steps use fuse-overlayfs
//! with the same lower, upper and work directories, if it is installed and `/dev/fuse` can be
//! opened. `fuse` asks for it outright (tests, odd kernels) and fails clearly without it;
//! `native` never probes. [`decide`] is that rule, apart from the probing so it can be tested.
//!
//! # Whichever overlay, the same layers
//!
//! The sandbox converts fuse-overlayfs's upper directory to the kernel's form once the daemon
//! has exited (`engine/src/sandbox/fuse.rs`), so the layer written from it and the snapshot
//! kept of it are the same bytes as with the kernel's overlayfs.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{SandboxError, SandboxSpec, Task};

/// The environment variable that chooses the overlay: `auto`, `native` or `fuse`.
pub const OVERLAY_ENV: &str = "GRAPHBUILD_OVERLAY";

/// The Debian (and Fedora, Arch, Alpine) package that provides `fuse-overlayfs`.
pub const FUSE_PACKAGE: &str = "fuse-overlayfs";

/// What the user asked for through [`OVERLAY_ENV`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OverlayMode {
    /// The kernel's overlayfs when it mounts, else fuse-overlayfs.
    #[default]
    Auto,
    Native,
    Fuse,
}

/// A value of [`OVERLAY_ENV`] that names no [`OverlayMode`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, miette::Diagnostic)]
pub enum OverlayModeError {
    #[error(
        "{OVERLAY_ENV}=`{value}` is not an overlay: use `auto` (the default), `native` or `fuse`"
    )]
    #[diagnostic(code(graphbuild::sandbox::overlay_mode))]
    Unknown { value: String },

    #[error("{OVERLAY_ENV} is not UTF-8: use `auto` (the default), `native` or `fuse`")]
    #[diagnostic(code(graphbuild::sandbox::overlay_mode))]
    NotUnicode,
}

impl OverlayMode {
    pub fn parse(value: &str) -> Result<OverlayMode, OverlayModeError> {
        match value.trim() {
            "" | "auto" => Ok(OverlayMode::Auto),
            "native" => Ok(OverlayMode::Native),
            "fuse" => Ok(OverlayMode::Fuse),
            other => Err(OverlayModeError::Unknown {
                value: other.to_string(),
            }),
        }
    }

    /// From [`OVERLAY_ENV`]; unset is [`OverlayMode::Auto`].
    pub fn from_env() -> Result<OverlayMode, OverlayModeError> {
        match std::env::var(OVERLAY_ENV) {
            Ok(value) => OverlayMode::parse(&value),
            Err(std::env::VarError::NotPresent) => Ok(OverlayMode::Auto),
            Err(std::env::VarError::NotUnicode(_)) => Err(OverlayModeError::NotUnicode),
        }
    }
}

/// How a sandbox mounts its root; travels in the [`SandboxSpec`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub enum Overlay {
    /// The kernel's overlayfs.
    #[default]
    Native,
    /// fuse-overlayfs, this program.
    Fuse { program: PathBuf },
}

/// The overlay steps will use, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub overlay: Overlay,
    /// One line for people: `graphbuild doctor` shows it, a fallback warns with it.
    pub reason: String,
    /// Whether fuse-overlayfs was chosen because the kernel refused overlayfs.
    pub fallback: bool,
}

/// Neither overlay can be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    pub problem: String,
    pub fix: String,
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "error: {}\nhint: {}", self.problem, self.fix)
    }
}

/// What the probe mount gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Mounted,
    /// The kernel refused the overlay mount, saying this.
    Refused(String),
    /// The probe could not get as far as the mount (namespaces…): steps will say why.
    Failed(String),
}

impl Overlay {
    /// `the kernel's overlayfs`, `fuse-overlayfs (/usr/bin/fuse-overlayfs)`.
    pub fn describe(&self) -> String {
        match self {
            Overlay::Native => "the kernel's overlayfs".to_string(),
            Overlay::Fuse { program } => format!("fuse-overlayfs ({})", program.display()),
        }
    }
}

impl Selection {
    /// The warning a build shows when it falls back to fuse-overlayfs.
    pub fn fallback_warning(&self) -> String {
        format!(
            "{}: steps use {}, which is slower (docs/security.md, Rootless)",
            self.reason,
            self.overlay.describe()
        )
    }
}

/// The overlay for `mode`, given what probing the kernel's overlayfs gives (not asked for
/// `native` and `fuse`) and whether fuse-overlayfs is usable.
pub fn decide(
    mode: OverlayMode,
    probe: impl FnOnce() -> Probe,
    fuse: impl FnOnce() -> Result<PathBuf, Unavailable>,
) -> Result<Selection, Unavailable> {
    let native = |reason: String| Selection {
        overlay: Overlay::Native,
        reason,
        fallback: false,
    };
    match mode {
        OverlayMode::Native => Ok(native(format!("{OVERLAY_ENV}=native"))),
        OverlayMode::Fuse => {
            let program = fuse().map_err(|unavailable| Unavailable {
                problem: format!("{OVERLAY_ENV}=fuse, but {}", unavailable.problem),
                fix: unavailable.fix,
            })?;
            Ok(Selection {
                overlay: Overlay::Fuse { program },
                reason: format!("{OVERLAY_ENV}=fuse"),
                fallback: false,
            })
        }
        OverlayMode::Auto => match probe() {
            Probe::Mounted => Ok(native("the kernel mounts overlayfs here".to_string())),
            Probe::Failed(message) => {
                Ok(native(format!("overlayfs could not be probed: {message}")))
            }
            Probe::Refused(said) => match fuse() {
                Ok(program) => Ok(Selection {
                    overlay: Overlay::Fuse { program },
                    reason: format!("the kernel refuses overlayfs here ({said})"),
                    fallback: true,
                }),
                Err(unavailable) => Err(Unavailable {
                    problem: format!(
                        "the kernel refuses overlayfs here ({said}), and the fuse-overlayfs \
                         fallback cannot be used: {}",
                        unavailable.problem
                    ),
                    fix: unavailable.fix,
                }),
            },
        },
    }
}

/// `fuse-overlayfs` on `PATH`, and `/dev/fuse` readable and
/// writable by this process.
pub fn fuse_prerequisites() -> Result<PathBuf, Unavailable> {
    let program = find_program(FUSE_PACKAGE).ok_or_else(|| Unavailable {
        problem: "fuse-overlayfs is not installed".to_string(),
        fix: format!(
            "install the `{FUSE_PACKAGE}` package (`apt-get install {FUSE_PACKAGE}` on \
             Debian/Ubuntu), or build with the kernel's overlayfs (as root, or on Linux ≥ 5.11)"
        ),
    })?;
    dev_fuse_usable()?;
    Ok(program)
}

/// Whether `/dev/fuse` opens read-write.
pub fn dev_fuse_usable() -> Result<(), Unavailable> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Err(Unavailable {
            problem: "/dev/fuse does not exist".to_string(),
            fix: format!(
                "load the FUSE module (`modprobe fuse`, package `{FUSE_PACKAGE}` pulls in \
                 fuse3); in a container, pass the device (`--device /dev/fuse`)"
            ),
        }),
        Err(error) => Err(Unavailable {
            problem: format!("/dev/fuse cannot be opened ({error})"),
            fix: "as root: `chmod 0666 /dev/fuse` (udev's default mode for it)".to_string(),
        }),
    }
}

/// Whether every user may open `/dev/fuse` (what `graphbuild doctor` as root tells about
/// rootless builds).
pub fn dev_fuse_open_to_all() -> Result<(), Unavailable> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata("/dev/fuse") {
        Ok(metadata) if metadata.permissions().mode() & 0o006 == 0o006 => Ok(()),
        Ok(metadata) => Err(Unavailable {
            problem: format!(
                "/dev/fuse has mode {:o}: ordinary users cannot open it",
                metadata.permissions().mode() & 0o777
            ),
            fix: "as root: `chmod 0666 /dev/fuse` (udev's default mode for it)".to_string(),
        }),
        Err(_) => dev_fuse_usable(),
    }
}

/// An executable named `name` on `PATH` (the usual system directories when `PATH` is unset).
pub fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into());
    std::env::split_paths(&path)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(name))
        .find(|candidate| {
            std::fs::metadata(candidate).is_ok_and(|metadata| {
                metadata.is_file() && metadata.permissions().mode() & 0o111 != 0
            })
        })
}

/// Mounts the kernel's overlayfs as a step would, in a sandbox child started from `exe`, on
/// directories made in `dir` (the store's scratch area: its file system is the upper
/// directories'). With `fresh_user_namespace`, the child first enters a user namespace of its
/// own, mapping only this process's ids: what a rootless build would meet (for `graphbuild
/// doctor` run as root).
pub fn probe_native(exe: &Path, dir: &Path, fresh_user_namespace: bool) -> Probe {
    let probe = match tempfile::Builder::new()
        .prefix(".graphbuild-overlay-probe-")
        .tempdir_in(dir)
    {
        Ok(probe) => probe,
        Err(error) => {
            return Probe::Failed(format!("create a directory in {}: {error}", dir.display()));
        }
    };
    let [lower, upper, work] = ["l", "u", "w"].map(|name| probe.path().join(name));
    for path in [&lower, &upper, &work] {
        if let Err(error) = std::fs::create_dir(path) {
            return Probe::Failed(format!("create {}: {error}", path.display()));
        }
    }
    if let Err(error) = std::fs::create_dir(lower.join("d")) {
        return Probe::Failed(format!("create {}: {error}", lower.display()));
    }
    let spec = SandboxSpec {
        lowerdirs: vec![lower],
        upperdir: upper,
        overlay_workdir: work,
        overlay: Overlay::Native,
        task: Task::ProbeOverlay,
    };
    let result = super::run_sandbox_in(exe, &spec, &mut |_, _| {}, fresh_user_namespace);
    // Whatever the kernel left in the work directory belongs to this process: remove it all.
    drop(probe);
    match result {
        Ok(_) => Probe::Mounted,
        Err(SandboxError::Setup { step, message }) if step == super::MOUNT_ROOT_STEP => {
            Probe::Refused(message)
        }
        Err(error) => Probe::Failed(error.to_string()),
    }
}

/// What rootless builds on this machine would use, asked by root (`graphbuild doctor`): the
/// probe runs in a fresh user namespace, and `/dev/fuse` must be open to every user.
pub fn select_for_rootless_users(exe: &Path, dir: &Path) -> Result<Selection, Unavailable> {
    decide(
        OverlayMode::Auto,
        || probe_native(exe, dir, true),
        || {
            let program = find_program(FUSE_PACKAGE).ok_or_else(|| Unavailable {
                problem: "fuse-overlayfs is not installed".to_string(),
                fix: format!(
                    "install the `{FUSE_PACKAGE}` package (`apt-get install {FUSE_PACKAGE}`)"
                ),
            })?;
            dev_fuse_open_to_all()?;
            Ok(program)
        },
    )
}

/// [`decide`] for this machine: probes in `dir` when `mode` is `auto`.
pub fn select(
    mode: OverlayMode,
    exe: &Path,
    dir: &Path,
    fresh_user_namespace: bool,
) -> Result<Selection, Unavailable> {
    decide(
        mode,
        || probe_native(exe, dir, fresh_user_namespace),
        fuse_prerequisites,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn installed() -> Result<PathBuf, Unavailable> {
        Ok(PathBuf::from("/usr/bin/fuse-overlayfs"))
    }

    fn missing() -> Result<PathBuf, Unavailable> {
        Err(Unavailable {
            problem: "fuse-overlayfs is not installed".to_string(),
            fix: "install the `fuse-overlayfs` package".to_string(),
        })
    }

    fn no_probe() -> Probe {
        panic!("native and fuse never probe")
    }

    #[test]
    fn modes_are_parsed_and_bad_ones_named() {
        assert_eq!(OverlayMode::parse("").unwrap(), OverlayMode::Auto);
        assert_eq!(OverlayMode::parse("auto").unwrap(), OverlayMode::Auto);
        assert_eq!(OverlayMode::parse("native").unwrap(), OverlayMode::Native);
        assert_eq!(OverlayMode::parse("fuse").unwrap(), OverlayMode::Fuse);
        let error = OverlayMode::parse("fuse-overlayfs")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("`fuse-overlayfs`") && error.contains("`native`"),
            "{error}"
        );
    }

    #[test]
    fn auto_uses_the_kernel_when_it_mounts_and_falls_back_when_it_refuses() {
        let native = decide(
            OverlayMode::Auto,
            || Probe::Mounted,
            || panic!("not needed"),
        )
        .unwrap();
        assert_eq!(native.overlay, Overlay::Native);
        assert!(!native.fallback);

        let fallback = decide(
            OverlayMode::Auto,
            || Probe::Refused("EPERM: Operation not permitted".to_string()),
            installed,
        )
        .unwrap();
        assert_eq!(
            fallback.overlay,
            Overlay::Fuse {
                program: PathBuf::from("/usr/bin/fuse-overlayfs")
            }
        );
        assert!(fallback.fallback);
        assert!(
            fallback.fallback_warning().contains("EPERM")
                && fallback
                    .fallback_warning()
                    .contains("fuse-overlayfs (/usr/bin/fuse-overlayfs)"),
            "{}",
            fallback.fallback_warning()
        );

        let neither = decide(
            OverlayMode::Auto,
            || Probe::Refused("EPERM: Operation not permitted".to_string()),
            missing,
        )
        .unwrap_err();
        assert!(neither.problem.contains("refuses overlayfs"), "{neither}");
        assert!(neither.fix.contains("fuse-overlayfs"), "{neither}");

        // A probe that never reached the mount leaves the decision to the kernel's overlayfs,
        // whose steps then report what failed.
        let failed = decide(OverlayMode::Auto, || Probe::Failed("x".into()), missing).unwrap();
        assert_eq!(failed.overlay, Overlay::Native);
    }

    #[test]
    fn forced_modes_never_probe_and_fuse_names_the_package_when_missing() {
        assert_eq!(
            decide(OverlayMode::Native, no_probe, missing)
                .unwrap()
                .overlay,
            Overlay::Native
        );
        assert!(matches!(
            decide(OverlayMode::Fuse, no_probe, installed)
                .unwrap()
                .overlay,
            Overlay::Fuse { .. }
        ));
        let error = decide(OverlayMode::Fuse, no_probe, missing).unwrap_err();
        assert!(
            error.problem.starts_with("GRAPHBUILD_OVERLAY=fuse, but"),
            "{error}"
        );
        assert!(
            error
                .to_string()
                .contains("hint: install the `fuse-overlayfs` package")
        );
    }
}
