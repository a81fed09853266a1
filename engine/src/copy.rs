//! Performing a COPY into a root filesystem, with Docker's destination rules.
//!
//! # Destination
//!
//! A relative destination is under the working directory. The destination is a *directory*
//! when it ends with `/`, when it already is a directory in the image (following the image's
//! symlinks: `/bin -> usr/bin` is a directory), or when the selection has more than one entry
//! or a directory source; otherwise the single file or symlink is written *as* the
//! destination. Missing parent directories are created `0755 root:root`; `chown`/`chmod` apply
//! to the copied entries only (and to a destination directory that a directory source
//! creates), not to the parents created on the way, as Docker does.
//!
//! # Safety
//!
//! Every destination path is resolved with [`fsutil::resolve_in_root`]: the image's symlinks are
//! followed *inside* `dest_root`, never out of it, whether benign (`/bin -> usr/bin`) or hostile
//! (`/x -> /etc`, `/y -> ../../..`). An existing symlink at a file's destination is replaced,
//! not written through. Sources are read through the same resolution under `src_root` and
//! copied as what they are: a symlink stays a symlink with its target untouched, so a link in
//! the context pointing outside it never exposes its target. A context file whose content no
//! longer matches the digest selected at plan time (it changed during the build) is an error,
//! since the cache key would lie.
//!
//! Ownership is `root:root` unless `chown` is given; file modes are kept unless `chmod` is
//! given. This module writes real owners, so it runs as (namespaced) root.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub(crate) use crate::context::{CopyItem, ItemKind};
use crate::fsutil;

/// Errors selecting or copying files.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub(crate) enum CopyError {
    #[error("copy source `{name}` matches nothing")]
    #[diagnostic(code(graphbuild::copy::not_found), help("{help}"))]
    SourceNotFound { name: String, help: String },
    #[error("copy source `{name}` is outside the build context")]
    #[diagnostic(
        code(graphbuild::copy::outside_context),
        help("sources are relative to the build context and cannot leave it with `..`")
    )]
    OutsideContext { name: String },
    #[error("copy source `{name}` is not a valid pattern: {reason}")]
    #[diagnostic(
        code(graphbuild::copy::pattern),
        help("patterns use `*`, `?`, `[a-z]` and `**`; escape a literal character with `\\`")
    )]
    InvalidPattern { name: String, reason: String },
    #[error("cannot {action} {}: {source}", path.display())]
    #[diagnostic(code(graphbuild::copy::io))]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`chown={spec}`: {reason}")]
    #[diagnostic(
        code(graphbuild::copy::chown),
        help(
            "write `user`, `user:group` or numeric `uid:gid`; names are looked up in the image's /etc/passwd and /etc/group"
        )
    )]
    InvalidChown { spec: String, reason: String },
    #[error("`chown={spec}`: cannot {action} {path} in the image: {source}")]
    #[diagnostic(
        code(graphbuild::copy::chown),
        help(
            "write `user`, `user:group` or numeric `uid:gid`; names are looked up in the image's /etc/passwd and /etc/group"
        )
    )]
    ChownDatabase {
        spec: String,
        action: &'static str,
        path: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{} changed in the build context while building", path.display())]
    #[diagnostic(
        code(graphbuild::copy::changed),
        help("do not edit the context during a build; run the build again")
    )]
    SourceChanged { path: PathBuf },
    #[error("cannot replace the directory {} with a file", path.display())]
    #[diagnostic(code(graphbuild::copy::directory_conflict))]
    DirectoryConflict { path: PathBuf },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CopyError {
    let path = path.to_path_buf();
    move |source| CopyError::Io {
        action,
        path,
        source,
    }
}

/// `chown=` and `chmod=` of a copy, already parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CopyOptions {
    pub chown: Option<(u32, u32)>,
    pub chmod: Option<crate::chmod::Chmod>,
}

/// Copy `items` (read under `src_root`) to `dest` in the root filesystem `dest_root`; see the
/// module documentation.
pub(crate) fn perform_copy(
    items: &[CopyItem],
    src_root: &Path,
    dest_root: &Path,
    dest: &str,
    workdir: &str,
    opts: &CopyOptions,
) -> Result<(), CopyError> {
    let dest_abs = if dest.starts_with('/') {
        dest.to_string()
    } else {
        format!("{}/{dest}", workdir.trim_end_matches('/'))
    };
    let resolve = |path: &str, follow_last: bool| {
        fsutil::resolve_in_root(dest_root, path, follow_last).map_err(io_error(
            "resolve",
            &dest_root.join(path.trim_start_matches('/')),
        ))
    };
    // The same for a path that need not be UTF-8 (a context file's byte name).
    let resolve_path = |path: &Path, follow_last: bool| {
        fsutil::resolve_path_in_root(dest_root, path, follow_last)
            .map_err(io_error("resolve", &dest_root.join(path)))
    };
    let explicit_dir = dest.ends_with('/') || dest.ends_with("/.") || dest == ".";
    let existing_dir = resolve(&dest_abs, true)?.is_dir();
    let has_dir = items
        .iter()
        .any(|item| matches!(item.kind, ItemKind::Dir { .. }));
    let single = match items {
        [only] if !explicit_dir && !existing_dir && !has_dir => Some(only),
        _ => None,
    };
    if let Some(item) = single {
        let target = resolve(&dest_abs, false)?;
        create_parents(dest_root, &target)?;
        return write_item(item, src_root, &target, opts);
    }
    let dest_dir = resolve(&dest_abs, true)?;
    create_parents(dest_root, &dest_dir)?;
    if !dest_dir.exists()
        && !items
            .iter()
            .any(|item| item.rel_dest.as_os_str().is_empty())
    {
        make_dir(&dest_dir, 0o755, (0, 0))?;
    }
    let base = dest_abs.trim_end_matches('/');
    for item in items {
        let target = if item.rel_dest.as_os_str().is_empty() {
            if dest_dir.is_dir() {
                // An existing destination directory keeps its metadata.
                continue;
            }
            dest_dir.clone()
        } else {
            let path = Path::new(base).join(&item.rel_dest);
            let target = resolve_path(&path, matches!(item.kind, ItemKind::Dir { .. }))?;
            create_parents(dest_root, &target)?;
            target
        };
        write_item(item, src_root, &target, opts)?;
    }
    Ok(())
}

/// Create the missing ancestors of `path` (under `root`) as `0755 root:root`.
fn create_parents(root: &Path, path: &Path) -> Result<(), CopyError> {
    let Some(parent) = path.parent() else {
        return Ok(());
    };
    if !fsutil::is_lexically_under(root, parent) || parent.is_dir() {
        return Ok(());
    }
    create_parents(root, parent)?;
    make_dir(parent, 0o755, (0, 0))
}

fn make_dir(path: &Path, mode: u32, owner: (u32, u32)) -> Result<(), CopyError> {
    match std::fs::create_dir(path) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => {}
        Err(error) => return Err(io_error("create the directory", path)(error)),
    }
    set_owner(path, owner)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_error("set the mode of", path))
}

fn write_item(
    item: &CopyItem,
    src_root: &Path,
    target: &Path,
    opts: &CopyOptions,
) -> Result<(), CopyError> {
    let owner = opts.chown.unwrap_or((0, 0));
    let existing = std::fs::symlink_metadata(target).ok();
    match &item.kind {
        ItemKind::Dir { mode } => {
            let mode = crate::chmod::apply(opts.chmod.as_ref(), *mode, true);
            if existing.as_ref().is_some_and(|metadata| !metadata.is_dir()) {
                std::fs::remove_file(target).map_err(io_error("replace", target))?;
            }
            make_dir(target, mode, owner)
        }
        ItemKind::File { digest, mode, .. } => {
            if existing.as_ref().is_some_and(|metadata| metadata.is_dir()) {
                return Err(CopyError::DirectoryConflict {
                    path: target.to_path_buf(),
                });
            }
            if existing.is_some() {
                std::fs::remove_file(target).map_err(io_error("replace", target))?;
            }
            let source = fsutil::resolve_path_in_root(src_root, &item.rel_src, false)
                .map_err(io_error("resolve", &src_root.join(&item.rel_src)))?;
            let mut input = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&source)
                .map_err(io_error("open", &source))?;
            let mut output = OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .mode(0o600)
                .open(target)
                .map_err(io_error("create", target))?;
            let actual =
                copy_hashing(&mut input, &mut output).map_err(io_error("copy", &source))?;
            if *digest != [0; 32] && actual != *digest {
                drop(output);
                let _ = std::fs::remove_file(target);
                return Err(CopyError::SourceChanged {
                    path: item.rel_src.clone(),
                });
            }
            set_owner_fd(&output, target, owner)?;
            output
                .set_permissions(std::fs::Permissions::from_mode(crate::chmod::apply(
                    opts.chmod.as_ref(),
                    *mode,
                    false,
                )))
                .map_err(io_error("set the mode of", target))
        }
        ItemKind::Symlink { target: link } => {
            if existing.as_ref().is_some_and(|metadata| metadata.is_dir()) {
                return Err(CopyError::DirectoryConflict {
                    path: target.to_path_buf(),
                });
            }
            if existing.is_some() {
                std::fs::remove_file(target).map_err(io_error("replace", target))?;
            }
            std::os::unix::fs::symlink(link, target)
                .map_err(io_error("create the symlink", target))?;
            set_owner(target, owner)
        }
    }
}

/// Copy all of `input` to `output`, returning the blake3 of what was copied. One buffer per
/// thread, reused: a copy step may copy thousands of files.
fn copy_hashing(input: &mut File, output: &mut File) -> io::Result<[u8; 32]> {
    thread_local! {
        static BUFFER: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 256 * 1024]);
    }
    BUFFER.with_borrow_mut(|buffer| copy_hashing_with(input, output, buffer))
}

fn copy_hashing_with(
    input: &mut File,
    output: &mut File,
    buffer: &mut [u8],
) -> io::Result<[u8; 32]> {
    let mut hasher = blake3::Hasher::new();
    loop {
        let read = match input.read(buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        hasher.update(&buffer[..read]);
        output.write_all(&buffer[..read])?;
    }
    Ok(*hasher.finalize().as_bytes())
}

/// `lchown`: never follows a symlink.
fn set_owner(path: &Path, (uid, gid): (u32, u32)) -> Result<(), CopyError> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        io_error("change the owner of", path)(io::Error::from(io::ErrorKind::InvalidInput))
    })?;
    // SAFETY: c_path is a valid NUL-terminated string.
    if unsafe { libc::lchown(c_path.as_ptr(), uid, gid) } != 0 {
        return Err(io_error("change the owner of", path)(
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn set_owner_fd(file: &File, path: &Path, (uid, gid): (u32, u32)) -> Result<(), CopyError> {
    std::os::unix::fs::fchown(file, Some(uid), Some(gid))
        .map_err(io_error("change the owner of", path))
}

/// Parse `chown=`: `user`, `user:group`, `uid`, `uid:gid` (names from the image's
/// `/etc/passwd` and `/etc/group` under `root`). A user alone takes its primary group; a
/// numeric uid alone takes the same number as gid, as BuildKit does.
pub(crate) fn parse_chown(spec: &str, root: &Path) -> Result<(u32, u32), CopyError> {
    let invalid = |reason: String| CopyError::InvalidChown {
        spec: spec.to_string(),
        reason,
    };
    let (user, group) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    if user.is_empty() || group.is_some_and(str::is_empty) {
        return Err(invalid("the user or group is empty".into()));
    }
    let (uid, primary_gid) = match user.parse::<u32>() {
        Ok(uid) => (uid, uid),
        Err(_) => {
            let passwd = read_database(root, "/etc/passwd", spec)?;
            let fields = lookup(&passwd, user)
                .ok_or_else(|| invalid(format!("no user `{user}` in the image's /etc/passwd")))?;
            let uid = fields.get(2).and_then(|field| field.parse().ok());
            let gid = fields.get(3).and_then(|field| field.parse().ok());
            match (uid, gid) {
                (Some(uid), Some(gid)) => (uid, gid),
                _ => {
                    return Err(invalid(format!(
                        "the /etc/passwd entry of `{user}` is malformed"
                    )));
                }
            }
        }
    };
    let gid = match group {
        None => primary_gid,
        Some(group) => match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                let groups = read_database(root, "/etc/group", spec)?;
                let fields = lookup(&groups, group).ok_or_else(|| {
                    invalid(format!("no group `{group}` in the image's /etc/group"))
                })?;
                fields
                    .get(2)
                    .and_then(|field| field.parse().ok())
                    .ok_or_else(|| {
                        invalid(format!("the /etc/group entry of `{group}` is malformed"))
                    })?
            }
        },
    };
    Ok((uid, gid))
}

/// The image's `/etc/passwd` or `/etc/group`, for `chown=spec`.
fn read_database(root: &Path, path: &'static str, spec: &str) -> Result<String, CopyError> {
    let fail = |action| {
        move |source| CopyError::ChownDatabase {
            spec: spec.to_string(),
            action,
            path,
            source,
        }
    };
    let host = fsutil::resolve_in_root(root, path, true).map_err(fail("resolve"))?;
    std::fs::read_to_string(&host).map_err(fail("read"))
}

fn lookup<'a>(database: &'a str, name: &str) -> Option<Vec<&'a str>> {
    database
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.first() == Some(&name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::{Context, select_in_tree};
    use std::os::unix::fs::{MetadataExt, symlink};

    struct Fixture {
        context: tempfile::TempDir,
        rootfs: tempfile::TempDir,
    }

    fn fixture() -> Fixture {
        let context = tempfile::tempdir().unwrap();
        let c = context.path();
        std::fs::create_dir_all(c.join("app/lib")).unwrap();
        std::fs::write(c.join("app/run.sh"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(c.join("app/run.sh"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::fs::write(c.join("app/lib/data"), b"data").unwrap();
        std::fs::set_permissions(c.join("app/lib"), std::fs::Permissions::from_mode(0o700))
            .unwrap();
        std::fs::write(c.join("config.toml"), b"x = 1").unwrap();
        std::fs::write(c.join("other.toml"), b"y = 2").unwrap();
        symlink("/etc/shadow", c.join("app/shadow-link")).unwrap();
        let rootfs = tempfile::tempdir().unwrap();
        let r = rootfs.path();
        std::fs::create_dir_all(r.join("usr/bin")).unwrap();
        std::fs::create_dir_all(r.join("etc")).unwrap();
        symlink("usr/bin", r.join("bin")).unwrap();
        std::fs::write(
            r.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            r.join("etc/group"),
            "root:x:0:\napp:x:1001:\nstaff:x:50:app\n",
        )
        .unwrap();
        Fixture { context, rootfs }
    }

    fn copy(
        fixture: &Fixture,
        sources: &[&str],
        dest: &str,
        workdir: &str,
        opts: CopyOptions,
    ) -> Result<(), CopyError> {
        let context = Context::scan(fixture.context.path(), None).unwrap();
        let items = context.select(&sources.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        perform_copy(
            &items,
            context.root(),
            fixture.rootfs.path(),
            dest,
            workdir,
            &opts,
        )
    }

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_single_file_becomes_the_destination_or_goes_into_a_directory() {
        let f = fixture();
        let r = f.rootfs.path();
        copy(
            &f,
            &["config.toml"],
            "/etc/app.toml",
            "/",
            CopyOptions::default(),
        )
        .unwrap();
        assert_eq!(std::fs::read(r.join("etc/app.toml")).unwrap(), b"x = 1");
        copy(
            &f,
            &["config.toml"],
            "/srv/conf/",
            "/",
            CopyOptions::default(),
        )
        .unwrap();
        assert_eq!(
            std::fs::read(r.join("srv/conf/config.toml")).unwrap(),
            b"x = 1"
        );
        assert_eq!(mode(&r.join("srv")), 0o755);
        // An existing directory is a directory even without a trailing slash.
        copy(&f, &["config.toml"], "/etc", "/", CopyOptions::default()).unwrap();
        assert!(r.join("etc/config.toml").is_file());
        // Relative to the workdir; several sources make a directory.
        copy(
            &f,
            &["config.toml", "other.toml"],
            "conf",
            "/work",
            CopyOptions::default(),
        )
        .unwrap();
        assert!(
            r.join("work/conf/config.toml").is_file() && r.join("work/conf/other.toml").is_file()
        );
    }

    #[test]
    fn directories_copy_contents_with_modes_and_symlinks_as_symlinks() {
        let f = fixture();
        let r = f.rootfs.path();
        copy(&f, &["app"], "/opt/app", "/", CopyOptions::default()).unwrap();
        assert_eq!(std::fs::read(r.join("opt/app/lib/data")).unwrap(), b"data");
        assert_eq!(mode(&r.join("opt/app/run.sh")), 0o755);
        assert_eq!(mode(&r.join("opt/app/lib")), 0o700);
        assert_eq!(
            std::fs::read_link(r.join("opt/app/shadow-link")).unwrap(),
            PathBuf::from("/etc/shadow")
        );
        let metadata = std::fs::metadata(r.join("opt/app/run.sh")).unwrap();
        assert_eq!((metadata.uid(), metadata.gid()), (0, 0));
    }

    #[test]
    fn chown_and_chmod_apply_to_copied_entries_not_created_parents() {
        let f = fixture();
        let r = f.rootfs.path();
        let chown = parse_chown("app", r).unwrap();
        assert_eq!(chown, (1000, 1001));
        let opts = CopyOptions {
            chown: Some(chown),
            chmod: Some(crate::chmod::Chmod(
                graphbuild_lang::chmod::Chmod::parse("0640").unwrap(),
            )),
        };
        copy(&f, &["app/"], "/deep/parent/app/", "/", opts).unwrap();
        let file = std::fs::symlink_metadata(r.join("deep/parent/app/lib/data")).unwrap();
        assert_eq!(
            (file.uid(), file.gid(), file.mode() & 0o7777),
            (1000, 1001, 0o640)
        );
        let link = std::fs::symlink_metadata(r.join("deep/parent/app/shadow-link")).unwrap();
        assert_eq!((link.uid(), link.gid()), (1000, 1001));
        let parent = std::fs::metadata(r.join("deep/parent")).unwrap();
        assert_eq!(
            (parent.uid(), parent.gid(), parent.mode() & 0o7777),
            (0, 0, 0o755)
        );
    }

    #[test]
    fn image_symlinks_never_lead_the_copy_outside_the_root() {
        let f = fixture();
        let r = f.rootfs.path();
        // Benign: /bin -> usr/bin is followed inside the image.
        copy(&f, &["app/run.sh"], "/bin/", "/", CopyOptions::default()).unwrap();
        assert!(r.join("usr/bin/run.sh").is_file());
        assert!(
            std::fs::symlink_metadata(r.join("bin"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        // Hostile: absolute and relative links out of the root land inside it.
        let outside = tempfile::tempdir().unwrap();
        symlink(outside.path(), r.join("escape")).unwrap();
        symlink("../../../../../../../..", r.join("up")).unwrap();
        copy(
            &f,
            &["config.toml"],
            "/escape/",
            "/",
            CopyOptions::default(),
        )
        .unwrap();
        copy(
            &f,
            &["config.toml"],
            "/up/tmp/x.toml",
            "/",
            CopyOptions::default(),
        )
        .unwrap();
        assert_eq!(
            std::fs::read_dir(outside.path()).unwrap().count(),
            0,
            "nothing written outside"
        );
        let landed = r
            .join(outside.path().strip_prefix("/").unwrap())
            .join("config.toml");
        assert!(landed.is_file(), "{}", landed.display());
        assert!(r.join("tmp/x.toml").is_file());
        // A symlink at a file destination is replaced, not written through.
        symlink("/etc/passwd", r.join("etc/target")).unwrap();
        copy(
            &f,
            &["config.toml"],
            "/etc/target",
            "/",
            CopyOptions::default(),
        )
        .unwrap();
        assert!(
            std::fs::symlink_metadata(r.join("etc/target"))
                .unwrap()
                .is_file()
        );
        assert!(
            std::fs::read_to_string(r.join("etc/passwd"))
                .unwrap()
                .starts_with("root:")
        );
    }

    #[test]
    fn a_context_file_changed_after_planning_is_an_error() {
        let f = fixture();
        let context = Context::scan(f.context.path(), None).unwrap();
        let items = context.select(&["config.toml".to_string()]).unwrap();
        std::fs::write(f.context.path().join("config.toml"), b"x = 2").unwrap();
        let error = perform_copy(
            &items,
            context.root(),
            f.rootfs.path(),
            "/c",
            "/",
            &CopyOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(error, CopyError::SourceChanged { .. }), "{error}");
        assert!(!f.rootfs.path().join("c").exists());
    }

    #[test]
    fn copy_from_another_stage_tree() {
        let f = fixture();
        let stage = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(stage.path().join("out/bin")).unwrap();
        std::fs::write(stage.path().join("out/bin/app"), b"elf").unwrap();
        std::fs::set_permissions(
            stage.path().join("out/bin/app"),
            std::fs::Permissions::from_mode(0o751),
        )
        .unwrap();
        let items = select_in_tree(stage.path(), &["/out/bin/app".to_string()]).unwrap();
        perform_copy(
            &items,
            stage.path(),
            f.rootfs.path(),
            "/app",
            "/",
            &CopyOptions::default(),
        )
        .unwrap();
        assert_eq!(std::fs::read(f.rootfs.path().join("app")).unwrap(), b"elf");
        assert_eq!(mode(&f.rootfs.path().join("app")), 0o751);
    }

    #[test]
    fn parse_chown_names_and_ids() {
        let f = fixture();
        let r = f.rootfs.path();
        assert_eq!(parse_chown("1000", r).unwrap(), (1000, 1000));
        assert_eq!(parse_chown("10:20", r).unwrap(), (10, 20));
        assert_eq!(parse_chown("app:staff", r).unwrap(), (1000, 50));
        assert_eq!(parse_chown("root", r).unwrap(), (0, 0));
        let error = parse_chown("nobody", r).unwrap_err();
        assert!(error.to_string().contains("no user `nobody`"), "{error}");
        let error = parse_chown("app:wheel", r).unwrap_err();
        assert!(error.to_string().contains("no group `wheel`"), "{error}");
        assert!(parse_chown(":1", r).is_err());
        let empty = tempfile::tempdir().unwrap();
        assert!(
            parse_chown("app", empty.path())
                .unwrap_err()
                .to_string()
                .contains("/etc/passwd")
        );
    }
}
