//! A copy's snapshot laid out again by changing the previous one, not by writing every file.
//!
//! When one context file changes, `copy . /src/` writes a new layer whose snapshot differs from
//! the previous build's in that one file; creating thousands of files again was most of the
//! step. The snapshot of the copy's previous layer (same op, same base) is instead *taken out
//! of the store* and changed in place into the new layer's snapshot: entries that are gone are
//! removed, new or changed ones written as [`super::direct_copy`]'s `materialize` writes them,
//! and the metadata of every directory whose content or metadata changed set again.
//!
//! The result is one plain directory holding exactly the entries, content, modes, owners, times
//! and attributes that laying it out afresh gives — no hard links (a `run` step would see a
//! link count of 2), no second overlay layer (merged directories report a link count of 1):
//! nothing a later step can observe depends on which snapshot it was made from. (What is not
//! fixed either way, as for every snapshot: inode numbers, the order `readdir` returns names
//! in, a directory's size after names were removed from it.)
//!
//! What the previous snapshot holds is known from a small index recorded with it (a name, a
//! kind and a fingerprint of everything else per entry), under a *lineage key*: the copy's op
//! without its content, and the base's layers. The old snapshot leaves the store (taken only
//! while no other run has the store open and no step of this build uses it, so nothing can
//! have it mounted); if it is needed again it is unpacked from its blob, as after a prune.
//! Anything unexpected while changing it (a missing entry, an I/O error) throws it away and
//! the snapshot is written afresh.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::digest::{Digest, Key};
use crate::key::KeyBuilder;
use crate::layer::{PlannedEntry, PlannedKind};
use crate::plan::{CopyOp, CopySource};
use crate::state::LayerDesc;

use super::faults::CopyFault;

const MAGIC: &[u8] = b"graphbuild-snapshot-index-1\n";

/// The key under which the index of a copy's last snapshot is kept: the op without the content
/// it copies, and the layers it copies onto.
pub(super) fn lineage_key(copy: &CopyOp, layers: &[LayerDesc]) -> Key {
    let mut builder = KeyBuilder::new("copy-snapshot-lineage");
    builder
        .json(&copy.sources)
        .str(&copy.dest)
        .str(&copy.workdir)
        .json(&copy.chown)
        .json(&copy.chmod)
        .str(match copy.from {
            CopySource::Context { .. } => "context",
            CopySource::Node { .. } => "stage",
            CopySource::Url { .. } => "url",
            CopySource::Git { .. } => "git",
            CopySource::Extract { .. } => "extract",
        });
    for layer in layers {
        builder.bytes(&layer.diff_id.0);
    }
    builder.finish()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Dir,
    File,
    Symlink,
}

fn kind_of(entry: &PlannedEntry) -> Kind {
    match entry.kind {
        PlannedKind::Directory => Kind::Dir,
        PlannedKind::File { .. } => Kind::File,
        PlannedKind::Symlink { .. } => Kind::Symlink,
    }
}

/// Everything about an entry but its name and kind; `None` for a file whose content digest is
/// not known (a file copied from a stage): such a file is always written again.
fn fingerprint(entry: &PlannedEntry) -> Option<[u8; 16]> {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&entry.mode.to_le_bytes());
    hasher.update(&entry.uid.to_le_bytes());
    hasher.update(&entry.gid.to_le_bytes());
    hasher.update(&entry.mtime.to_le_bytes());
    hasher.update(&(entry.xattrs.len() as u64).to_le_bytes());
    for (name, value) in &entry.xattrs {
        for part in [name, value] {
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
    }
    match &entry.kind {
        PlannedKind::Directory => {}
        PlannedKind::File { size, expect, .. } => {
            hasher.update(&size.to_le_bytes());
            hasher.update(&(*expect)?);
        }
        PlannedKind::Symlink { target } => {
            hasher.update(&(target.len() as u64).to_le_bytes());
            hasher.update(target);
        }
    }
    let mut short = [0u8; 16];
    short.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
    Some(short)
}

/// What a snapshot holds: its layer's diff id, and each entry's name, kind and fingerprint.
pub(super) struct SnapshotIndex {
    pub(super) diff_id: Digest,
    entries: Vec<(Vec<u8>, Kind, Option<[u8; 16]>)>,
}

/// The index of the snapshot of the layer `entries` make, as bytes.
pub(super) fn encode(diff_id: &Digest, entries: &[PlannedEntry]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(MAGIC.len() + 32 + entries.len() * 64);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&diff_id.0);
    bytes.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for entry in entries {
        bytes.extend_from_slice(&(entry.name.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&entry.name);
        bytes.push(match kind_of(entry) {
            Kind::Dir => 0,
            Kind::File => 1,
            Kind::Symlink => 2,
        });
        match fingerprint(entry) {
            Some(print) => {
                bytes.push(1);
                bytes.extend_from_slice(&print);
            }
            None => bytes.push(0),
        }
    }
    bytes
}

/// The index in `bytes`; `None` when it is not one (another version, truncated).
pub(super) fn decode(bytes: &[u8]) -> Option<SnapshotIndex> {
    let mut rest = bytes.strip_prefix(MAGIC)?;
    let mut take = |count: usize| -> Option<&[u8]> {
        let (head, tail) = (rest.get(..count)?, rest.get(count..)?);
        rest = tail;
        Some(head)
    };
    let diff_id = Digest(take(32)?.try_into().ok()?);
    let count = u64::from_le_bytes(take(8)?.try_into().ok()?);
    let mut entries = Vec::new();
    for _ in 0..count {
        let length = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        let name = take(length)?.to_vec();
        let kind = match take(1)?[0] {
            0 => Kind::Dir,
            1 => Kind::File,
            2 => Kind::Symlink,
            _ => return None,
        };
        let print = match take(1)?[0] {
            0 => None,
            1 => Some(take(16)?.try_into().ok()?),
            _ => return None,
        };
        entries.push((name, kind, print));
    }
    take(1)
        .is_none()
        .then_some(SnapshotIndex { diff_id, entries })
}

fn parent_of(name: &[u8]) -> &[u8] {
    match name.iter().rposition(|byte| *byte == b'/') {
        Some(slash) => &name[..slash],
        None => &[],
    }
}

/// How many entries changing the snapshot `old` describes into that of `entries` writes or
/// removes (a directory removed with its content counts once).
pub(super) fn changes(old: &SnapshotIndex, entries: &[PlannedEntry]) -> usize {
    let previous: HashMap<&[u8], (Kind, Option<[u8; 16]>)> = old
        .entries
        .iter()
        .map(|(name, kind, print)| (&name[..], (*kind, *print)))
        .collect();
    let names: BTreeSet<&[u8]> = entries.iter().map(|entry| &entry.name[..]).collect();
    let removed = previous
        .keys()
        .filter(|name| !names.contains(*name))
        .count();
    let written = entries
        .iter()
        .filter(|entry| match previous.get(&entry.name[..]) {
            Some((kind, print)) => {
                *kind != kind_of(entry) || print.is_none() || *print != fingerprint(entry)
            }
            None => true,
        })
        .count();
    removed + written
}

/// Change `dir`, the snapshot `old` describes, into the snapshot of `entries` (sorted by
/// name, as a copy plans them). Returns how many entries were written or removed.
pub(super) fn apply(
    old: &SnapshotIndex,
    entries: &[PlannedEntry],
    dir: &Path,
) -> Result<usize, CopyFault> {
    let path_of = |name: &[u8]| dir.join(OsStr::from_bytes(name));
    let new: HashMap<&[u8], &PlannedEntry> = entries
        .iter()
        .map(|entry| (&entry.name[..], entry))
        .collect();
    let previous: HashMap<&[u8], (Kind, Option<[u8; 16]>)> = old
        .entries
        .iter()
        .map(|(name, kind, print)| (&name[..], (*kind, *print)))
        .collect();
    // Directories whose listing or metadata changed: their metadata is set again at the end.
    let mut touched: BTreeSet<&[u8]> = BTreeSet::new();
    let mut changed = 0usize;
    // Gone, or of another kind now: children before parents.
    for (name, kind, _) in old.entries.iter().rev() {
        let keep = new
            .get(&name[..])
            .is_some_and(|entry| kind_of(entry) == *kind);
        if keep {
            continue;
        }
        let path = path_of(name);
        let removed = if *kind == Kind::Dir {
            crate::fsutil::remove_dir_all_force(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(CopyFault::io("remove", &path))?;
        touched.insert(parent_of(name));
        changed += 1;
    }
    let mut buffer = vec![0u8; 128 * 1024];
    // New or changed: parents before children (a parent's name sorts before its children's).
    for entry in entries {
        let path = path_of(&entry.name);
        let was = previous
            .get(&entry.name[..])
            .filter(|(kind, _)| *kind == kind_of(entry));
        let print = fingerprint(entry);
        match was {
            Some((_, old_print)) if old_print.is_some() && *old_print == print => continue,
            Some(_) if matches!(entry.kind, PlannedKind::Directory) => {
                // The same directory with other metadata: drop its attributes; the new ones
                // are set with its times at the end.
                for (name, _) in crate::layer::list_xattrs(&path)
                    .map_err(CopyFault::io("list attributes of", &path))?
                {
                    crate::layer::remove_xattr(&path, &name)
                        .map_err(CopyFault::io("remove an attribute of", &path))?;
                }
                touched.insert(&entry.name);
            }
            Some(_) => {
                std::fs::remove_file(&path).map_err(CopyFault::io("replace", &path))?;
                super::direct_copy::write_entry(entry, &path, &mut buffer)?;
                touched.insert(parent_of(&entry.name));
            }
            None if matches!(entry.kind, PlannedKind::Directory) => {
                std::fs::create_dir(&path).map_err(CopyFault::io("create", &path))?;
                touched.insert(&entry.name);
                touched.insert(parent_of(&entry.name));
            }
            None => {
                super::direct_copy::write_entry(entry, &path, &mut buffer)?;
                touched.insert(parent_of(&entry.name));
            }
        }
        changed += 1;
    }
    // Directory metadata last, deepest first: changing their children changed their times.
    for name in touched.iter().rev() {
        if let Some(entry) = new.get(name) {
            super::direct_copy::finish_entry(entry, &path_of(name))?;
        }
    }
    Ok(changed)
}
