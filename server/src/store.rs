//! The on-disk store and its in-memory LRU index.
//!
//! # Layout
//!
//! ```text
//! DIR/cas/<first 2 hex>/<64 hex>                 content-addressed blobs (shared by all instances)
//! DIR/ac/<instance>/<first 2 hex>/<64 hex>       action-cache values, one tree per instance
//! DIR/ac/_default/<first 2 hex>/<64 hex>         the action cache of requests without an instance
//! DIR/tmp/upload-*                               uploads in flight
//! DIR/.graphbuild-cache-server                   the marker: this directory is a store
//! ```
//!
//! Instance names start with an ASCII letter or digit, so `_default` cannot collide with one.
//!
//! # Whose directory
//!
//! The server deletes only what it created. [`Store::open`] writes the marker [`MARKER`] into
//! a directory it creates or finds empty, and refuses a non-empty directory without the marker
//! ([`OpenError::NotAStore`]): `--dir $HOME` is an error, not a wiped `~/tmp`. A directory laid
//! out by an earlier version (only `cas/`, `ac/` and `tmp/`, `cas/` present) is adopted. Even
//! in its own directory, startup removes only `tmp/upload-*` files, the names it gives uploads.
//!
//! # Durability
//!
//! Every value reaches its final name by `rename(2)` from `tmp/` after its bytes were written
//! and `fsync`ed, so a file under `cas/` or `ac/` is always complete: a crash (even SIGKILL)
//! leaves at most a stray file in `tmp/`, which [`Store::open`] deletes. After the rename the
//! directory holding the new name is `fsync`ed too (and its parent, when the shard directory
//! was just created), before the upload is answered 200: an acknowledged upload survives a
//! power loss, not only a process crash. A CAS blob is renamed
//! into place only once its sha256 matched its name (checked by the HTTP layer while
//! streaming), so every file under `cas/` hashes to its name. The temp file is owned by a
//! [`tempfile::TempPath`], whose `Drop` removes it: an upload that fails, is rejected, or whose
//! handler is dropped because the client went away leaves nothing behind.
//!
//! # Index and eviction
//!
//! The index maps each entry to its size and a *tick*, a counter value taken at its last
//! access; a `BTreeMap` from tick to entry gives the least recently used entry in O(log n).
//! At startup the index is rebuilt by scanning the directories, ordering entries by the later
//! of their access and modification times. When the total size passes `max_size`, a
//! background task ([`Store::evict_to_target`], run on a blocking thread) removes the least
//! recently used entries until the total is below 95 % of `max_size`, one entry per lock hold,
//! so requests keep being served while it runs.
//!
//! Readers never see partial data: a reader opens the file and takes its size from the open
//! descriptor; eviction only unlinks names, and an unlinked file stays readable through
//! descriptors already open. Commits (rename + index update) and evictions (index update +
//! unlink) happen under the index lock, so the index and the directory agree.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use tempfile::TempPath;

use crate::metrics::Metrics;

/// Directory name of the action cache of requests that name no instance.
const DEFAULT_INSTANCE_DIR: &str = "_default";
/// The file that marks a directory as a store, written when the store is created.
pub(crate) const MARKER: &str = ".graphbuild-cache-server";
/// Prefix of upload temp files: the only names swept from `tmp/` at startup.
const UPLOAD_PREFIX: &str = "upload-";

/// Why a store directory cannot be opened.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// The directory holds other things and no marker: not ours to manage.
    NotAStore,
    Io(io::Error),
}

impl From<io::Error> for OpenError {
    fn from(error: io::Error) -> OpenError {
        OpenError::Io(error)
    }
}

/// `fsync` a directory, so the names created or renamed in it are durable.
pub(crate) fn sync_dir(path: &Path) -> io::Result<()> {
    fs::File::open(path)?.sync_all()
}

/// Make sure `root` is a store (see the module documentation): create it with its marker, take
/// an empty directory, adopt an earlier version's layout, or refuse.
fn claim(root: &Path) -> Result<(), OpenError> {
    let marker = root.join(MARKER);
    match fs::metadata(root) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(root)?;
        }
        Err(error) => return Err(error.into()),
        Ok(metadata) if !metadata.is_dir() => {
            return Err(io::Error::new(io::ErrorKind::NotADirectory, "not a directory").into());
        }
        Ok(_) => {
            if fs::symlink_metadata(&marker).is_ok_and(|metadata| metadata.is_file()) {
                return Ok(());
            }
            let mut names = Vec::new();
            for entry in fs::read_dir(root)? {
                names.push(entry?.file_name());
            }
            let earlier_layout = names.iter().any(|name| name == "cas")
                && names.iter().all(|name| {
                    ["cas", "ac", "tmp"].iter().any(|ours| name == ours)
                        && fs::metadata(root.join(name)).is_ok_and(|metadata| metadata.is_dir())
                });
            if !names.is_empty() && !earlier_layout {
                return Err(OpenError::NotAStore);
            }
        }
    }
    fs::write(
        &marker,
        "This directory is a graphbuild cache server store; the server may delete files here.\n",
    )?;
    fs::File::open(&marker)?.sync_all()?;
    sync_dir(root)?;
    Ok(())
}

/// Delete the upload temp files a crash left in `tmp/`, and nothing else.
fn sweep_uploads(tmp: &Path) -> io::Result<()> {
    for entry in fs::read_dir(tmp)? {
        let entry = entry?;
        let ours = entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.starts_with(UPLOAD_PREFIX));
        if ours && entry.file_type()?.is_file() {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// The two kinds of entries the protocol knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    /// Content-addressed storage: the name is the sha256 of the bytes.
    Cas,
    /// Action cache: the name is a key chosen by the client, the value is small.
    Ac,
}

impl Kind {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Kind::Cas => "cas",
            Kind::Ac => "ac",
        }
    }
}

/// One stored value. CAS entries carry no instance: content addressing makes them shareable.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct EntryId {
    pub(crate) kind: Kind,
    pub(crate) instance: Option<Arc<str>>,
    pub(crate) hash: [u8; 32],
}

impl EntryId {
    pub(crate) fn new(kind: Kind, instance: Option<&str>, hash: [u8; 32]) -> EntryId {
        let instance = match kind {
            Kind::Cas => None,
            Kind::Ac => instance.map(Arc::from),
        };
        EntryId {
            kind,
            instance,
            hash,
        }
    }
}

#[derive(Clone, Copy)]
struct Slot {
    size: u64,
    tick: u64,
}

#[derive(Default)]
struct Index {
    entries: HashMap<EntryId, Slot>,
    by_tick: BTreeMap<u64, EntryId>,
    total_size: u64,
    cas_entries: u64,
    ac_entries: u64,
    next_tick: u64,
}

impl Index {
    fn take_tick(&mut self) -> u64 {
        self.next_tick += 1;
        self.next_tick
    }

    fn insert(&mut self, id: EntryId, size: u64) {
        self.remove(&id);
        let tick = self.take_tick();
        self.by_tick.insert(tick, id.clone());
        match id.kind {
            Kind::Cas => self.cas_entries += 1,
            Kind::Ac => self.ac_entries += 1,
        }
        self.total_size += size;
        self.entries.insert(id, Slot { size, tick });
    }

    fn remove(&mut self, id: &EntryId) -> Option<Slot> {
        let slot = self.entries.remove(id)?;
        self.by_tick.remove(&slot.tick);
        match id.kind {
            Kind::Cas => self.cas_entries -= 1,
            Kind::Ac => self.ac_entries -= 1,
        }
        self.total_size -= slot.size;
        Some(slot)
    }

    fn touch(&mut self, id: &EntryId) {
        let tick = self.take_tick();
        if let Some(slot) = self.entries.get_mut(id) {
            self.by_tick.remove(&slot.tick);
            slot.tick = tick;
            self.by_tick.insert(tick, id.clone());
        }
    }
}

/// A point-in-time view of the index, for `/metrics`.
pub(crate) struct StoreStats {
    pub(crate) total_size: u64,
    pub(crate) cas_entries: u64,
    pub(crate) ac_entries: u64,
}

pub(crate) struct Store {
    root: PathBuf,
    tmp: PathBuf,
    max_size: Option<u64>,
    index: Mutex<Index>,
    metrics: Arc<Metrics>,
    /// Woken when the total size passes `max_size`.
    pub(crate) eviction_needed: tokio::sync::Notify,
    /// Directory `fsync`s done by commits (for tests).
    dir_syncs: AtomicU64,
}

impl Store {
    /// Open (creating if needed) the store at `root`: delete leftover uploads, rebuild the
    /// index by scanning. Blocking; call it before serving.
    pub(crate) fn open(
        root: &Path,
        max_size: Option<u64>,
        metrics: Arc<Metrics>,
    ) -> Result<Store, OpenError> {
        claim(root)?;
        let tmp = root.join("tmp");
        for dir in [&tmp, &root.join("cas"), &root.join("ac")] {
            match fs::metadata(dir) {
                Ok(metadata) if metadata.is_dir() => {}
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotADirectory,
                        format!("{} is not a directory", dir.display()),
                    )
                    .into());
                }
                Err(error) if error.kind() == io::ErrorKind::NotFound => fs::create_dir(dir)?,
                Err(error) => return Err(error.into()),
            }
        }
        sweep_uploads(&tmp)?;

        let mut found: Vec<(SystemTime, EntryId, u64)> = Vec::new();
        scan_sharded(&root.join("cas"), &mut |hash, size, time| {
            found.push((time, EntryId::new(Kind::Cas, None, hash), size));
        })?;
        for instance_dir in fs::read_dir(root.join("ac"))? {
            let instance_dir = instance_dir?;
            if !instance_dir.file_type()?.is_dir() {
                continue;
            }
            let name = instance_dir.file_name();
            let Some(name) = name.to_str() else { continue };
            let instance = if name == DEFAULT_INSTANCE_DIR {
                None
            } else if is_valid_instance(name) {
                Some(name)
            } else {
                continue;
            };
            scan_sharded(&instance_dir.path(), &mut |hash, size, time| {
                found.push((time, EntryId::new(Kind::Ac, instance, hash), size));
            })?;
        }
        found.sort_by_key(|(time, _, _)| *time);

        let mut index = Index::default();
        for (_, id, size) in found {
            index.insert(id, size);
        }
        let store = Store {
            root: root.to_path_buf(),
            tmp,
            max_size,
            index: Mutex::new(index),
            metrics,
            eviction_needed: tokio::sync::Notify::new(),
            dir_syncs: AtomicU64::new(0),
        };
        if store.over_limit() {
            store.eviction_needed.notify_one();
        }
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        // A panic while holding the lock cannot leave the index half-updated in a way that
        // matters more than refusing service would, so recover the guard.
        self.index
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn path_of(&self, id: &EntryId) -> PathBuf {
        let hex = hex::encode(id.hash);
        let base = match id.kind {
            Kind::Cas => self.root.join("cas"),
            Kind::Ac => self
                .root
                .join("ac")
                .join(id.instance.as_deref().unwrap_or(DEFAULT_INSTANCE_DIR)),
        };
        base.join(&hex[..2]).join(hex)
    }

    /// Record an access (for LRU order).
    pub(crate) fn touch(&self, id: &EntryId) {
        self.lock().touch(id);
    }

    /// The file of `id` vanished under us (deleted by hand): drop it from the index if it is
    /// still missing once we hold the lock.
    pub(crate) fn forget_if_missing(&self, id: &EntryId) {
        let mut index = self.lock();
        if !self.path_of(id).exists() {
            index.remove(id);
        }
    }

    /// A fresh temp file in `tmp/`; dropping the `TempPath` deletes it.
    pub(crate) fn begin_upload(&self) -> io::Result<(fs::File, TempPath)> {
        let file = tempfile::Builder::new()
            .prefix(UPLOAD_PREFIX)
            .tempfile_in(&self.tmp)?;
        Ok(file.into_parts())
    }

    /// Move a complete, synced upload into place, make the new name durable (`fsync` of the
    /// directory) and index it. Blocking; returns once the entry survives a power loss.
    pub(crate) fn commit(&self, id: EntryId, temp: TempPath, size: u64) -> io::Result<()> {
        let final_path = self.path_of(&id);
        let parent = final_path.parent().unwrap_or(&self.root).to_path_buf();
        if !parent.is_dir() {
            fs::create_dir_all(&parent)?;
            // The new shard directory's own name lives in its parent.
            if let Some(grandparent) = parent.parent() {
                self.sync_dir_counted(grandparent)?;
            }
        }
        {
            let mut index = self.lock();
            temp.persist(&final_path).map_err(|error| error.error)?;
            index.insert(id, size);
        }
        // Outside the lock: other commits need not wait for this disk flush. The caller answers
        // 200 only after it.
        self.sync_dir_counted(&parent)?;
        if self.over_limit() {
            self.eviction_needed.notify_one();
        }
        Ok(())
    }

    fn sync_dir_counted(&self, path: &Path) -> io::Result<()> {
        sync_dir(path)?;
        self.dir_syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    pub(crate) fn max_size(&self) -> Option<u64> {
        self.max_size
    }

    fn over_limit(&self) -> bool {
        self.max_size
            .is_some_and(|max| self.lock().total_size > max)
    }

    /// Remove least recently used entries until the total is under 95 % of `max_size`.
    /// Blocking; takes the lock once per entry so requests interleave.
    pub(crate) fn evict_to_target(&self) {
        let Some(max) = self.max_size else { return };
        let target = max - max / 20;
        loop {
            let mut index = self.lock();
            if index.total_size <= target {
                return;
            }
            let Some((_, id)) = index.by_tick.pop_first() else {
                return;
            };
            // by_tick no longer holds the tick; remove() tolerates that.
            let Some(slot) = index.remove(&id) else {
                continue;
            };
            match fs::remove_file(self.path_of(&id)) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => {
                    // Keep serving; the entry is out of the index, the file stays as litter
                    // that the next startup scan picks up again.
                    eprintln!(
                        "graphbuild-cache-server: could not evict {}: {error}",
                        self.path_of(&id).display()
                    );
                }
            }
            drop(index);
            self.metrics.evictions.fetch_add(1, Ordering::Relaxed);
            self.metrics
                .evicted_bytes
                .fetch_add(slot.size, Ordering::Relaxed);
        }
    }

    pub(crate) fn stats(&self) -> StoreStats {
        let index = self.lock();
        StoreStats {
            total_size: index.total_size,
            cas_entries: index.cas_entries,
            ac_entries: index.ac_entries,
        }
    }
}

/// Visit `dir/<2 hex>/<64 hex>` files: (hash, size, last access or modification).
fn scan_sharded(dir: &Path, visit: &mut dyn FnMut([u8; 32], u64, SystemTime)) -> io::Result<()> {
    for shard in fs::read_dir(dir)? {
        let shard = shard?;
        if !shard.file_type()?.is_dir() {
            continue;
        }
        for file in fs::read_dir(shard.path())? {
            let file = file?;
            let metadata = file.metadata()?;
            if !metadata.is_file() {
                continue;
            }
            let name = file.file_name();
            let Some(hash) = name.to_str().and_then(parse_hash) else {
                continue;
            };
            let modified = metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            let accessed = metadata.accessed().unwrap_or(modified);
            visit(hash, metadata.len(), modified.max(accessed));
        }
    }
    Ok(())
}

/// 64 lowercase hex digits, as bazel-remote requires.
pub(crate) fn parse_hash(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64
        || !text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut hash = [0u8; 32];
    hex::decode_to_slice(text, &mut hash).ok()?;
    Some(hash)
}

/// Instance names: 1–128 of `[A-Za-z0-9._-]`, starting with a letter or digit.
pub(crate) fn is_valid_instance(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn put(store: &Store, id: EntryId, bytes: &[u8]) {
        let (mut file, temp) = store.begin_upload().unwrap();
        file.write_all(bytes).unwrap();
        store.commit(id, temp, bytes.len() as u64).unwrap();
    }

    #[test]
    fn evicts_least_recently_used_first_and_rescans_consistently() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::default());
        let store = Store::open(dir.path(), Some(1000), metrics.clone()).unwrap();
        let a = EntryId::new(Kind::Cas, None, [1; 32]);
        let b = EntryId::new(Kind::Cas, None, [2; 32]);
        let c = EntryId::new(Kind::Ac, Some("team"), [3; 32]);
        put(&store, a.clone(), &[0; 400]);
        put(&store, b.clone(), &[0; 400]);
        store.touch(&a);
        put(&store, c.clone(), &[0; 400]);
        store.evict_to_target();
        assert!(store.path_of(&a).exists());
        assert!(!store.path_of(&b).exists());
        assert!(store.path_of(&c).exists());
        assert_eq!(store.stats().total_size, 800);
        assert_eq!(metrics.evictions.load(Ordering::Relaxed), 1);

        std::fs::write(dir.path().join("tmp/upload-stale"), b"partial").unwrap();
        drop(store);
        let reopened = Store::open(dir.path(), Some(1000), metrics).unwrap();
        let stats = reopened.stats();
        assert_eq!(
            (stats.total_size, stats.cas_entries, stats.ac_entries),
            (800, 1, 1)
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        assert!(
            reopened
                .path_of(&c)
                .ends_with(format!("ac/team/03/{}", hex::encode([3u8; 32])))
        );
    }

    #[test]
    fn a_foreign_directory_is_refused_and_nothing_in_it_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tmp")).unwrap();
        std::fs::write(dir.path().join("tmp/notes.txt"), b"mine").unwrap();
        std::fs::write(dir.path().join("tmp/upload-looks-like-ours"), b"mine too").unwrap();
        let metrics = Arc::new(Metrics::default());
        assert!(matches!(
            Store::open(dir.path(), None, metrics.clone()),
            Err(OpenError::NotAStore)
        ));
        assert_eq!(
            std::fs::read(dir.path().join("tmp/notes.txt")).unwrap(),
            b"mine"
        );
        assert!(dir.path().join("tmp/upload-looks-like-ours").exists());
        assert!(!dir.path().join(MARKER).exists());
        assert!(!dir.path().join("cas").exists());

        // A missing directory and an empty one are claimed with the marker.
        let fresh = dir.path().join("fresh");
        Store::open(&fresh, None, metrics.clone()).unwrap();
        assert!(fresh.join(MARKER).is_file());
        let empty = tempfile::tempdir().unwrap();
        Store::open(empty.path(), None, metrics.clone()).unwrap();
        assert!(empty.path().join(MARKER).is_file());

        // In its own directory, startup sweeps only its upload files from tmp/.
        std::fs::write(fresh.join("tmp/upload-stale"), b"partial").unwrap();
        std::fs::write(fresh.join("tmp/keep.txt"), b"not ours").unwrap();
        Store::open(&fresh, None, metrics.clone()).unwrap();
        assert!(!fresh.join("tmp/upload-stale").exists());
        assert!(fresh.join("tmp/keep.txt").exists());

        // A symlink to a store is the store.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&fresh, &link).unwrap();
        Store::open(&link, None, metrics.clone()).unwrap();

        // An earlier version's store (cas/, ac/, tmp/, no marker) is adopted.
        let earlier = tempfile::tempdir().unwrap();
        for sub in ["cas/ab", "ac/_default", "tmp"] {
            std::fs::create_dir_all(earlier.path().join(sub)).unwrap();
        }
        Store::open(earlier.path(), None, metrics).unwrap();
        assert!(earlier.path().join(MARKER).is_file());
    }

    #[test]
    fn commits_sync_the_directory_of_the_new_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), None, Arc::new(Metrics::default())).unwrap();
        // A new shard: its parent (for the shard's name) and the shard (for the entry's name).
        put(&store, EntryId::new(Kind::Cas, None, [7; 32]), b"one");
        assert_eq!(store.dir_syncs.load(Ordering::Relaxed), 2);
        // The same shard again: only the shard.
        let mut hash = [7; 32];
        hash[31] = 8;
        put(&store, EntryId::new(Kind::Cas, None, hash), b"two");
        assert_eq!(store.dir_syncs.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn instance_names_and_hashes_are_checked() {
        assert!(is_valid_instance("team-a.v2"));
        assert!(!is_valid_instance("_default"));
        assert!(!is_valid_instance(".."));
        assert!(!is_valid_instance(""));
        assert!(parse_hash(&"ab".repeat(32)).is_some());
        assert!(parse_hash(&"AB".repeat(32)).is_none());
        assert!(parse_hash("abc").is_none());
    }
}
