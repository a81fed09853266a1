//! The context walk: every visible entry of the context directory, its type and `lstat`.
//!
//! A directory is read once (`getdents`) and each of its entries is `stat`ed relative to it
//! (`statx` on the directory's descriptor and the entry's name, through
//! [`std::fs::DirEntry::metadata`]), not through its full path from the context root: a
//! 100,000-file context is stat'ed on every build, and resolving every path component again
//! for each file was a fifth of a warm build. Subdirectories are read on the rayon pool, so
//! both cores stat at once. The result is the same whatever the order: the caller sorts it.
//!
//! Symlinks are never followed; a directory the `.dockerignore` excludes is not entered unless
//! an exception may re-include something inside it (it is then listed as excluded).

use std::ffi::OsStr;
use std::fs::DirEntry;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

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
    let dir = match raw {
        Some(raw) => root.join(raw),
        None if rel.is_empty() => root.to_path_buf(),
        None => root.join(rel),
    };
    let walk_error = |source: io::Error| ContextError::Io {
        action: "walk",
        path: dir.clone(),
        source,
    };
    let start = found.len();
    for entry in std::fs::read_dir(&dir).map_err(walk_error)? {
        let entry = entry.map_err(walk_error)?;
        if let Some(one) = visit(&dir, rel, raw, &entry, ignore)? {
            found.push(one);
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
    dir: &Path,
    parent_rel: &str,
    parent_raw: Option<&Path>,
    entry: &DirEntry,
    ignore: &DockerIgnore,
) -> Result<Option<Found>, ContextError> {
    let name = entry.file_name();
    let stat_error = |source: io::Error| ContextError::Io {
        action: "stat",
        path: dir.join(&name),
        source,
    };
    let file_type = entry.file_type().map_err(stat_error)?;
    let text = name.to_string_lossy();
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
        Some(parent) => Some(parent.join(&name)),
        None if std::str::from_utf8(name.as_bytes()).is_err() => {
            Some(Path::new(parent_rel).join(OsStr::from_bytes(name.as_bytes())))
        }
        None => None,
    };
    if file_type.is_dir() {
        let excluded = ignore.is_excluded(&rel, true);
        if excluded && !ignore.may_reinclude_under(&rel) {
            return Ok(None);
        }
        let metadata = entry.metadata().map_err(stat_error)?;
        let mode = std::os::unix::fs::PermissionsExt::mode(&metadata.permissions()) & 0o7777;
        return Ok(Some(Found {
            rel,
            raw,
            kind: FoundKind::Dir { mode, excluded },
        }));
    }
    if ignore.is_excluded(&rel, false) {
        return Ok(None);
    }
    let kind = if file_type.is_symlink() {
        FoundKind::Symlink
    } else if file_type.is_file() {
        FoundKind::File(Stat::of(&entry.metadata().map_err(stat_error)?))
    } else {
        // Sockets, FIFOs and devices are not part of a context.
        return Ok(None);
    };
    Ok(Some(Found { rel, raw, kind }))
}
