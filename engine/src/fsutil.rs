//! Filesystem helpers that must be right once and then trusted everywhere.
//!
//! [`resolve_in_root`] walks a path inside a directory tree as if that directory were `/`,
//! the way the kernel's `openat2(RESOLVE_IN_ROOT)` does: symlinks are followed component by
//! component, an absolute symlink restarts at the root, `..` never climbs above it, and more
//! than [`MAX_SYMLINKS`] links is `ELOOP`. The result is a host path that is lexically under
//! the root and whose parent components are real directories (no symlink left), so a later
//! `open`/`create` of it cannot leave the tree, whatever symlinks an image ships
//! (`/bin -> usr/bin` is followed inside the tree, a hostile `/x -> /etc` lands on `<root>/etc`).
//! The last component is followed only when asked: a copy that replaces a symlink wants the link
//! itself, a copy into a directory wants its target.
//!
//! Components that do not exist yet are appended lexically: they cannot be symlinks, so the
//! path stays under the root and a caller may create them.
//!
//! [`remove_dir_all_force`] removes trees that `std::fs::remove_dir_all` trips on: directories
//! without write or search permission (layers ship `dr-x------` directories) and overlay
//! whiteouts (character devices 0/0), which are plain unlinks.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// The symlink budget of one resolution, as Linux's `MAXSYMLINKS`.
pub(crate) const MAX_SYMLINKS: usize = 40;

/// Resolve `path` inside `root` as if `root` were `/`; see the module documentation.
///
/// `follow_last` decides whether a symlink in the last component is followed.
pub(crate) fn resolve_in_root(root: &Path, path: &str, follow_last: bool) -> io::Result<PathBuf> {
    resolve_path_in_root(root, Path::new(path), follow_last)
}

/// [`resolve_in_root`] for a path that need not be UTF-8.
pub(crate) fn resolve_path_in_root(
    root: &Path,
    path: &Path,
    follow_last: bool,
) -> io::Result<PathBuf> {
    // Components still to walk, in reverse order so the next one is at the end.
    let mut pending: Vec<OsString> = Vec::new();
    push_components(&mut pending, path);
    let mut resolved: Vec<OsString> = Vec::new();
    let mut links = 0usize;
    // Once a component is missing, the rest cannot be symlinks: resolve lexically.
    let mut missing = false;
    while let Some(component) = pending.pop() {
        if component == ".." {
            resolved.pop();
            continue;
        }
        if missing {
            resolved.push(component);
            continue;
        }
        let mut candidate = root.to_path_buf();
        candidate.extend(resolved.iter());
        candidate.push(&component);
        let is_last = pending.is_empty();
        match std::fs::symlink_metadata(&candidate) {
            Ok(metadata) if metadata.file_type().is_symlink() && (!is_last || follow_last) => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(io::Error::other(format!(
                        "too many levels of symbolic links resolving `{}` in {}",
                        path.display(),
                        root.display()
                    )));
                }
                let target = std::fs::read_link(&candidate)?;
                if target.is_absolute() {
                    resolved.clear();
                }
                push_components(&mut pending, &target);
            }
            Ok(_) => resolved.push(component),
            Err(error)
                if error.kind() == io::ErrorKind::NotFound
                    || error.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                missing = true;
                resolved.push(component);
            }
            Err(error) => return Err(error),
        }
    }
    let mut result = root.to_path_buf();
    result.extend(resolved.iter());
    Ok(result)
}

/// Push the normal and `..` components of `path` onto `pending`, reversed.
fn push_components(pending: &mut Vec<OsString>, path: &Path) {
    let mut components: Vec<OsString> = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(name) => components.push(name.to_os_string()),
            Component::ParentDir => components.push(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    pending.extend(components.into_iter().rev());
}

/// Is `path` lexically under `root` (or equal to it)? Both are taken as given, not resolved.
pub(crate) fn is_lexically_under(root: &Path, path: &Path) -> bool {
    path.strip_prefix(root)
        .map(|rest| {
            rest.components()
                .all(|component| matches!(component, Component::Normal(_)))
        })
        .unwrap_or(false)
}

/// Remove `path` and everything below it, whatever the permissions and file types. A missing
/// path is not an error (another process may have removed it first).
pub(crate) fn remove_dir_all_force(path: &Path) -> io::Result<()> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    if !metadata.is_dir() {
        return ignore_not_found(std::fs::remove_file(path));
    }
    // Search and write permission are needed to list and unlink; root has them anyway, but an
    // unprivileged user owning a `dr-x------` directory from a layer does not.
    let mode = metadata.permissions().mode();
    if mode & 0o700 != 0o700 {
        ignore_not_found(std::fs::set_permissions(
            path,
            std::fs::Permissions::from_mode(mode | 0o700),
        ))?;
    }
    let entries = match std::fs::read_dir(path) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    for entry in entries {
        let entry = entry?;
        let child = entry.path();
        if entry.file_type()?.is_dir() {
            remove_dir_all_force(&child)?;
        } else {
            ignore_not_found(std::fs::remove_file(&child))?;
        }
    }
    ignore_not_found(std::fs::remove_dir(path))
}

fn ignore_not_found(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// `fsync` a directory, so a rename into it survives a power cut.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// The bytes of a path, for hashing and canonical encodings.
pub(crate) fn path_bytes(path: &Path) -> &[u8] {
    path.as_os_str().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::fs::write(root.join("usr/bin/sh"), b"sh").unwrap();
        symlink("usr/bin", root.join("bin")).unwrap();
        dir
    }

    #[test]
    fn relative_symlinked_directories_are_followed_inside_the_root() {
        let dir = tree();
        let root = dir.path();
        assert_eq!(
            resolve_in_root(root, "/bin/sh", false).unwrap(),
            root.join("usr/bin/sh")
        );
        assert_eq!(
            resolve_in_root(root, "bin", false).unwrap(),
            root.join("bin")
        );
        assert_eq!(
            resolve_in_root(root, "bin", true).unwrap(),
            root.join("usr/bin")
        );
        assert_eq!(
            resolve_in_root(root, "/bin/new/file", false).unwrap(),
            root.join("usr/bin/new/file")
        );
    }

    #[test]
    fn absolute_symlinks_restart_at_the_root() {
        let dir = tree();
        let root = dir.path();
        symlink("/etc", root.join("x")).unwrap();
        assert_eq!(
            resolve_in_root(root, "/x/passwd", false).unwrap(),
            root.join("etc/passwd")
        );
        symlink("/", root.join("slash")).unwrap();
        assert_eq!(
            resolve_in_root(root, "slash/slash/usr", true).unwrap(),
            root.join("usr")
        );
    }

    #[test]
    fn dot_dot_never_climbs_above_the_root() {
        let dir = tree();
        let root = dir.path();
        assert_eq!(
            resolve_in_root(root, "../../../etc/passwd", false).unwrap(),
            root.join("etc/passwd")
        );
        symlink("../../../../../../etc", root.join("up")).unwrap();
        assert_eq!(
            resolve_in_root(root, "up/shadow", false).unwrap(),
            root.join("etc/shadow")
        );
        symlink("../..", root.join("usr/bin/upup")).unwrap();
        assert_eq!(
            resolve_in_root(root, "/usr/bin/upup/../x", true).unwrap(),
            root.join("x")
        );
    }

    #[test]
    fn symlink_loops_fail_with_a_clear_error() {
        let dir = tree();
        let root = dir.path();
        symlink("b", root.join("a")).unwrap();
        symlink("a", root.join("b")).unwrap();
        let error = resolve_in_root(root, "a/file", false).unwrap_err();
        assert!(error.to_string().contains("too many levels"), "{error}");
        // Not followed when last and not asked to.
        assert_eq!(resolve_in_root(root, "a", false).unwrap(), root.join("a"));
    }

    #[test]
    fn results_stay_under_the_root_for_hostile_chains() {
        let dir = tree();
        let root = dir.path();
        symlink("/usr/../../../..", root.join("chain1")).unwrap();
        symlink("chain1/../../etc", root.join("chain2")).unwrap();
        for path in [
            "chain2/passwd",
            "chain1",
            "/chain2/../../../..",
            "usr/bin/../../../chain2",
        ] {
            for follow_last in [false, true] {
                let resolved = resolve_in_root(root, path, follow_last).unwrap();
                assert!(
                    is_lexically_under(root, &resolved),
                    "{path} -> {}",
                    resolved.display()
                );
            }
        }
        assert_eq!(
            resolve_in_root(root, "chain2/passwd", false).unwrap(),
            root.join("etc/passwd")
        );
    }

    #[test]
    fn remove_dir_all_force_copes_with_read_only_dirs_and_devices() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("snapshot");
        std::fs::create_dir_all(victim.join("ro/deeper")).unwrap();
        std::fs::write(victim.join("ro/deeper/file"), b"x").unwrap();
        std::fs::write(victim.join("ro/file"), b"x").unwrap();
        symlink("/etc/passwd", victim.join("link")).unwrap();
        std::fs::set_permissions(
            victim.join("ro/deeper"),
            std::fs::Permissions::from_mode(0o500),
        )
        .unwrap();
        std::fs::set_permissions(victim.join("ro"), std::fs::Permissions::from_mode(0o000))
            .unwrap();
        // An overlay whiteout; needs CAP_MKNOD, which the build machine has (we run as root).
        let whiteout = victim.join("wh");
        let c_path = std::ffi::CString::new(whiteout.as_os_str().as_bytes()).unwrap();
        // SAFETY: c_path is a valid NUL-terminated path.
        let made = unsafe { libc::mknod(c_path.as_ptr(), libc::S_IFCHR | 0o600, 0) } == 0;
        remove_dir_all_force(&victim).unwrap();
        assert!(!victim.exists());
        assert!(
            std::path::Path::new("/etc/passwd").exists(),
            "a symlink's target must survive"
        );
        if !made {
            eprintln!("mknod not permitted here: whiteout case not exercised");
        }
        remove_dir_all_force(&victim).unwrap();
    }
}
