//! The context walk: every visible entry of the context directory, its type and `lstat`.
//!
//! A directory is read once (`getdents`) and each of its entries is `stat`ed relative to it
//! (`fstatat` on the directory's descriptor and the entry's name), not through its full path
//! from the context root: a
//! 100,000-file context is stat'ed on every build, and resolving every path component again
//! for each file was a fifth of a warm build. Subdirectories are read on the rayon pool, so
//! both cores stat at once. The result is the same whatever the order: the caller sorts it.
//!
//! Symlinks are never followed; a directory the `.dockerignore` excludes is not entered unless
//! an exception may re-include something inside it (it is then listed as excluded).

use std::ffi::{CStr, OsStr};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, SFlag, fstatat};
use rayon::prelude::*;

use super::{ContextError, Stat};
use crate::dockerignore::DockerIgnore;

/// One entry found under the context root.
pub(super) struct Found {
    /// `/`-separated, relative to the root; lossy text for a name that is not UTF-8.
    pub(super) rel: String,
    /// The real relative path, when `rel` is not it (a name on the way is not UTF-8).
    pub(super) raw: Option<PathBuf>,
    pub(super) kind: FoundKind,
}

pub(super) enum FoundKind {
    Dir { mode: u32, excluded: bool },
    Symlink,
    File(Stat),
}

/// Every entry under `root` that the `.dockerignore` lets the walk reach, in no set order.
/// Excluded files and symlinks are left out; excluded directories are listed (marked) only
/// when the walk had to enter them.
pub(super) fn walk(root: &Path, ignore: &DockerIgnore) -> Result<Vec<Found>, ContextError> {
    let mut found = Vec::new();
    walk_dir(root, "", None, ignore, &mut found)?;
    Ok(found)
}

/// The entries of the directory `rel` (`""` for the root; `raw` its real path when that is
/// not `rel`) and, recursively, of its subdirectories, appended to `found`.
fn walk_dir(
    root: &Path,
    rel: &str,
    raw: Option<&Path>,
    ignore: &DockerIgnore,
    found: &mut Vec<Found>,
) -> Result<(), ContextError> {
    let dir_path = match raw {
        Some(raw) => root.join(raw),
        None if rel.is_empty() => root.to_path_buf(),
        None => root.join(rel),
    };
    let walk_error = |errno: Errno| ContextError::Io {
        action: "walk",
        path: dir_path.clone(),
        source: io::Error::from(errno),
    };
    let start = found.len();
    {
        // Read with nix rather than `std::fs::read_dir`: an entry's name is borrowed from the
        // buffer and stat'ed relative to the directory, where std allocates it twice.
        let mut dir = Dir::open(
            &dir_path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(walk_error)?;
        let fd = dir
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| ContextError::Io {
                action: "walk",
                path: dir_path.clone(),
                source,
            })?;
        for entry in dir.iter() {
            let entry = entry.map_err(walk_error)?;
            let name = entry.file_name();
            if matches!(name.to_bytes(), b"." | b"..") {
                continue;
            }
            if let Some(one) = visit(&dir_path, &fd, rel, raw, name, entry.file_type(), ignore)? {
                found.push(one);
            }
        }
    }
    // Subdirectories: entered on the pool, each into its own list, appended in order.
    let subdirs: Vec<(String, Option<PathBuf>)> = found[start..]
        .iter()
        .filter(|one| matches!(one.kind, FoundKind::Dir { .. }))
        .map(|one| (one.rel.clone(), one.raw.clone()))
        .collect();
    let below: Vec<Vec<Found>> = subdirs
        .par_iter()
        .map(|(sub, sub_raw)| {
            let mut list = Vec::new();
            walk_dir(root, sub, sub_raw.as_deref(), ignore, &mut list).map(|()| list)
        })
        .collect::<Result<_, _>>()?;
    for list in below {
        found.extend(list);
    }
    Ok(())
}

/// One directory entry: what the walk keeps of it, if anything.
fn visit(
    dir_path: &Path,
    dir: &OwnedFd,
    parent_rel: &str,
    parent_raw: Option<&Path>,
    name: &CStr,
    file_type: Option<Type>,
    ignore: &DockerIgnore,
) -> Result<Option<Found>, ContextError> {
    let name_bytes = name.to_bytes();
    let os_name = OsStr::from_bytes(name_bytes);
    let stat_error = |errno: Errno| ContextError::Io {
        action: "stat",
        path: dir_path.join(os_name),
        source: io::Error::from(errno),
    };
    let lstat = || fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(stat_error);
    // The type from the directory entry; a file system that does not say needs a stat.
    let mut stat = None;
    let file_type = match file_type {
        Some(file_type) => file_type,
        None => {
            let found = lstat()?;
            let file_type = match SFlag::from_bits_truncate(found.st_mode) & SFlag::S_IFMT {
                SFlag::S_IFDIR => Type::Directory,
                SFlag::S_IFREG => Type::File,
                SFlag::S_IFLNK => Type::Symlink,
                _ => Type::Socket,
            };
            stat = Some(found);
            file_type
        }
    };
    let text = String::from_utf8_lossy(name_bytes);
    let rel = if parent_rel.is_empty() {
        text.into_owned()
    } else {
        let mut rel = String::with_capacity(parent_rel.len() + 1 + text.len());
        rel.push_str(parent_rel);
        rel.push('/');
        rel.push_str(&text);
        rel
    };
    if rel == ".dockerignore" {
        return Ok(None);
    }
    let raw = match parent_raw {
        Some(parent) => Some(parent.join(os_name)),
        None if std::str::from_utf8(name_bytes).is_err() => {
            Some(Path::new(parent_rel).join(os_name))
        }
        None => None,
    };
    match file_type {
        Type::Directory => {
            let excluded = ignore.is_excluded(&rel, true);
            if excluded && !ignore.may_reinclude_under(&rel) {
                return Ok(None);
            }
            let found = match stat {
                Some(found) => found,
                None => lstat()?,
            };
            Ok(Some(Found {
                rel,
                raw,
                kind: FoundKind::Dir {
                    mode: found.st_mode & 0o7777,
                    excluded,
                },
            }))
        }
        _ if ignore.is_excluded(&rel, false) => Ok(None),
        Type::Symlink => Ok(Some(Found {
            rel,
            raw,
            kind: FoundKind::Symlink,
        })),
        Type::File => {
            let found = match stat {
                Some(found) => found,
                None => lstat()?,
            };
            Ok(Some(Found {
                rel,
                raw,
                kind: FoundKind::File(Stat::of_stat(&found)),
            }))
        }
        // Sockets, FIFOs and devices are not part of a context.
        _ => Ok(None),
    }
}
