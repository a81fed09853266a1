//! The local content-addressed store: blobs, the action cache, unpacked layer snapshots and
//! persistent cache-mount directories, shared safely by concurrent runs.
//!
//! This file is long on purpose (about 1,450 lines of code, the rest tests): every operation on
//! the store's directories — atomic writes, locking, healing, verify, prune — lives beside the
//! layout it maintains, so the invariants below are checked in one place.
//!
//! # Layout
//!
//! ```text
//! <root>/                      default $XDG_CACHE_HOME/graphbuild, else ~/.cache/graphbuild
//!   lock                       flock: shared by every open Store, exclusive for prune
//!   blobs/sha256/<hex>         CAS: the file's sha256 is its name (layers, configs, manifests)
//!   actions/<2 hex>/<key hex>  action cache: a step key (blake3) → a small record
//!   snapshots/sha256-<hex>/    a verified unpacked layer (named by diff_id), an overlay lowerdir
//!   cache-mounts/<hash>/       a persistent `cache-mount` directory per (mount id, platform)
//!   cache-mounts/<hash>.lock   its flock, held while a step uses it (shared or exclusive)
//!   cache-mounts/<hash>.json   which (id, platform) the hash stands for
//!   contexts/<hex>             the stat cache of one build context (see `context`)
//!   tmp/run-<pid>-<rand>/      the scratch space of one open Store
//!   tmp/run-<pid>-<rand>.lock  its flock, held for the life of that Store
//! ```
//!
//! `tmp/` is inside the root so every temporary file is on the store's filesystem and can be
//! published with one `rename(2)`.
//!
//! # Atomicity
//!
//! Nothing is ever written in place. Every entry is built under the run's tmp directory and
//! renamed to its final name, so an entry under its final name is always complete:
//!
//! - blobs and action records are written to a temp file, `fsync`ed, renamed, and the parent
//!   directory is `fsync`ed; a blob is verified against its digest *before* the rename, so a
//!   corrupt download never becomes visible ([`Store::put_blob_file`], [`BlobWriter`]);
//! - a snapshot is unpacked into a temp directory and renamed into place; if another run won
//!   the race, the rename fails with `ENOTEMPTY`, the loser deletes its copy and uses the
//!   winner's ([`Store::ensure_snapshot`]); both results are equivalent by construction
//!   (same diff_id, same bytes);
//! - two writers of the same blob or action both rename complete files over the same name;
//!   either result is correct, `rename` is atomic, readers see one or the other.
//!
//! Snapshots are not `fsync`ed (unpacking thousands of files with an `fsync` each would
//! dominate a build). They are derived data: a run killed by SIGKILL leaves nothing
//! half-visible, but after a power cut a snapshot may hold zero-length files. `graphbuild
//! cache prune --keep-bytes 0` clears them; blobs and the action cache are durable.
//!
//! # Integrity
//!
//! Nothing enters the store unverified, and nothing found corrupt is kept:
//!
//! - a blob is hashed before it is published; a blob already present is only reused when its
//!   size matches (a cheap check on every `put`, [`Store::check_blob`]), and a blob whose
//!   content turns out not to match its name when it is read ([`Store::read_blob`], an unpack,
//!   a layout write) is removed ([`Store::remove_blob`]), which turns every action naming it
//!   into a miss;
//! - a snapshot is published under a diff_id only by a caller that verified it: an unpack that
//!   hashed the decompressed stream to that diff_id (and the blob to its digest), or a step's
//!   own upper directory whose tar it hashed. Which blob was verified to have which diff_id is
//!   recorded ([`Store::record_verified_layer`]), so a snapshot found by diff_id is only reused
//!   for a blob known to have that diff_id. Directories in the old `snapshots/<hex>` naming,
//!   written before diff_ids were verified, are never used (prune or `cache verify --repair`
//!   removes them);
//! - [`Store::verify`] checks every blob, snapshot name and action record, and can remove
//!   what is bad.
//!
//! # Permissions
//!
//! The root, `tmp/` and each run directory are `0700` (an existing root is tightened on
//! open): snapshots hold setuid binaries, file capabilities and device nodes of the images
//! built, and run directories hold secrets (`0600`), none of which other local users may reach.
//!
//! # Locking
//!
//! - `lock` is taken *shared* by [`Store::open`] and held until the `Store` drops, so any number
//!   of runs share the store. [`Store::prune`] upgrades it to *exclusive* with a try-lock: it
//!   only deletes when no other run has the store open, and otherwise says so
//!   ([`StoreError::Busy`]) instead of waiting or deleting under a running build.
//! - Each cache-mount directory has its own lock file, taken exclusively for as long as a
//!   [`CacheMountGuard`] lives: two steps that share a mount id take turns, as tools like
//!   `cargo` or `apt` expect of their cache directories.
//! - Reads need no lock: entries are immutable once published.
//!
//! # Crash safety
//!
//! Each open `Store` owns `tmp/run-<pid>-<rand>/` and holds an exclusive flock on the sibling
//! `.lock` file; the kernel releases it when the process dies, even by SIGKILL. `open` scans
//! `tmp/`: a run directory whose lock can be taken belongs to a dead run and is deleted, with
//! its lock file. The lock file is created with `O_EXCL`, locked, and checked to still be the
//! file at its path (the cleaner unlinks lock files it won) before the directory is created,
//! so a cleaner can never delete a live run's directory. Partial snapshots, half-written blobs
//! and half-deleted entries (prune renames an entry into its own run directory before deleting
//! it) therefore all live in a run directory and disappear with it.
//!
//! # Pruning
//!
//! Every read of an entry ([`Store::get_action`], [`Store::has_blob`], [`Store::read_blob`],
//! [`Store::snapshot_path`], [`Store::cache_mount`], …) sets its access time explicitly
//! (`utimensat`, so `noatime`/`relatime` mounts do not matter); an entry's last use is the later
//! of its atime and mtime. [`Store::prune`] lists every entry with its size, and removes the
//! least recently used until the total is at most `keep_bytes`, then the actions that name a
//! blob it removed (such an action would be a cache miss anyway: the builder checks
//! [`Store::check_blob`]), and a pruned snapshot is
//! unpacked again from its blob, so pruning never makes a build wrong, only slower. Snapshot
//! and cache-mount directories hold root-owned files, read-only directories and overlay
//! whiteouts (character devices); they are removed with [`fsutil::remove_dir_all_force`].

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

pub use graphbuild_lang::ir::CacheSharing;

use crate::digest::{Digest, DigestWriter, Key};
use crate::fsutil;
use crate::state::LayerDesc;

/// Errors of the local store.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum StoreError {
    #[error("cannot {action} {}: {source}", path.display())]
    #[diagnostic(
        code(graphbuild::store::io),
        help("check that the cache directory is writable and its disk is not full")
    )]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("blob content does not match its digest: expected {expected}, got {actual}")]
    #[diagnostic(
        code(graphbuild::store::digest_mismatch),
        help("the source sent corrupt or truncated data; nothing was stored, try again")
    )]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error(
        "blob {digest} is corrupt in the store (its content hashes to {actual}); it was removed"
    )]
    #[diagnostic(
        code(graphbuild::store::corrupt),
        help("run the build again: the blob will be fetched or rebuilt")
    )]
    Corrupt { digest: Digest, actual: Digest },
    #[error("blob {0} is not in the store")]
    #[diagnostic(code(graphbuild::store::missing))]
    MissingBlob(Digest),
    #[error("another graphbuild run is using the store at {}", root.display())]
    #[diagnostic(
        code(graphbuild::store::busy),
        help("wait for the other run to finish, then prune again")
    )]
    Busy { root: PathBuf },
    #[error("cannot unpack snapshot {diff_id}: {message}")]
    #[diagnostic(code(graphbuild::store::snapshot))]
    Fill { diff_id: Digest, message: String },
}

/// What [`Store::check_blob`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobState {
    /// Present with the expected size.
    Present,
    Missing,
    /// Present with another size: it was removed.
    Corrupt,
}

/// One problem [`Store::verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: PathBuf,
    pub what: String,
    /// Whether `--repair` removed it.
    pub removed: bool,
}

/// What [`Store::verify`] checked and found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub blobs: u64,
    pub snapshots: u64,
    pub actions: u64,
    pub problems: Vec<Problem>,
}

/// The blobs (digest, size) an action record names: the layers of a step record, or the layer
/// of a layer record; `None` when a layer lacks a valid digest or size.
fn named_blobs(value: &serde_json::Value) -> Option<Vec<(Digest, u64)>> {
    let mut layers: Vec<&serde_json::Value> = Vec::new();
    if let Some(list) = value.get("layers").and_then(|layers| layers.as_array()) {
        layers.extend(list);
    } else if value.get("diff_id").is_some() {
        layers.push(value);
    }
    layers
        .into_iter()
        .map(|layer| {
            let digest = layer
                .get("digest")
                .and_then(|digest| digest.as_str())
                .and_then(|digest| digest.parse::<Digest>().ok())?;
            let size = layer.get("size").and_then(|size| size.as_u64())?;
            Some((digest, size))
        })
        .collect()
}

/// Whether a snapshot directory name is the current, verified naming (`sha256-<hex>`).
fn snapshot_name_digest(name: &str) -> Option<Digest> {
    Digest::from_hex(name.strip_prefix("sha256-")?)
}

/// The mode of the root, `tmp/` and run directories.
const PRIVATE_DIR: u32 = 0o700;

/// Set a directory of ours to [`PRIVATE_DIR`]. One owned by another user (a store shared on
/// purpose) is left as its owner set it.
fn make_private(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = std::fs::metadata(path)?;
    if metadata.permissions().mode() & 0o777 == PRIVATE_DIR {
        return Ok(());
    }
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(PRIVATE_DIR)) {
        Err(error) if error.kind() == io::ErrorKind::PermissionDenied => Ok(()),
        other => other,
    }
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}

/// Bytes and number of entries of one area of the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Entries {
    pub bytes: u64,
    pub count: u64,
}

/// What the store holds, per area, in bytes (apparent sizes of files and symlinks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub blobs: Entries,
    pub actions: Entries,
    pub snapshots: Entries,
    pub cache_mounts: Entries,
    /// Context stat caches.
    pub other: Entries,
    /// The sum of every area above.
    pub total: u64,
}

/// What [`Store::prune`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub removed_entries: u64,
    pub removed_bytes: u64,
    pub remaining_bytes: u64,
}

/// The local store. `Sync`: share one per process by reference.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    /// `<root>/lock`, held shared (exclusive during prune). One open file (one flock) for all
    /// the Stores of this process on the same root: "another run has the store open" means
    /// another process, not a second handle of this one.
    lock: std::sync::Arc<File>,
    /// `<root>/tmp/run-…/`, this Store's scratch space.
    run_dir: PathBuf,
    run_lock_path: PathBuf,
    /// Held exclusively for the life of the Store.
    _run_lock: File,
    counter: AtomicU64,
}

/// An exclusively locked cache-mount directory; the lock is released on drop.
#[derive(Debug)]
pub struct CacheMountGuard {
    path: PathBuf,
    _lock: File,
}

impl CacheMountGuard {
    /// The host directory to bind-mount.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

const AREAS: [&str; 6] = [
    "blobs/sha256",
    "actions",
    "snapshots",
    "cache-mounts",
    "contexts",
    "tmp",
];

impl Store {
    /// `$XDG_CACHE_HOME/graphbuild`, else `$HOME/.cache/graphbuild`, else `/var/cache/graphbuild`.
    pub fn default_root() -> PathBuf {
        if let Some(cache) =
            std::env::var_os("XDG_CACHE_HOME").filter(|value| Path::new(value).is_absolute())
        {
            return PathBuf::from(cache).join("graphbuild");
        }
        if let Some(home) = std::env::var_os("HOME").filter(|value| !value.is_empty()) {
            return PathBuf::from(home).join(".cache").join("graphbuild");
        }
        PathBuf::from("/var/cache/graphbuild")
    }

    /// Open (creating if needed) the store at `root`: take the shared lock, delete what dead
    /// runs left in `tmp/`, and create this run's scratch directory.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        {
            // Parents with the usual mode, the root itself private.
            use std::os::unix::fs::DirBuilderExt;
            if let Some(parent) = root
                .parent()
                .filter(|parent| !parent.as_os_str().is_empty())
            {
                std::fs::create_dir_all(parent).map_err(io_error("create", parent))?;
            }
            match std::fs::DirBuilder::new().mode(PRIVATE_DIR).create(root) {
                Err(error) if error.kind() != io::ErrorKind::AlreadyExists => {
                    return Err(io_error("create", root)(error));
                }
                _ => {}
            }
        }
        make_private(root).map_err(io_error("restrict the permissions of", root))?;
        for area in AREAS {
            let dir = root.join(area);
            std::fs::create_dir_all(&dir).map_err(io_error("create", &dir))?;
        }
        let tmp_dir = root.join("tmp");
        make_private(&tmp_dir).map_err(io_error("restrict the permissions of", &tmp_dir))?;
        let lock_path = root.join("lock");
        let lock = process_lock(&lock_path)?;
        let tmp = root.join("tmp");
        clean_tmp(&tmp).map_err(io_error("clean", &tmp))?;
        let (run_dir, run_lock_path, run_lock) =
            create_run_dir(&tmp).map_err(io_error("create a run directory in", &tmp))?;
        Ok(Store {
            root: root.to_path_buf(),
            lock,
            run_dir,
            run_lock_path,
            _run_lock: run_lock,
            counter: AtomicU64::new(0),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A fresh temporary directory on the store's filesystem, deleted on drop (and by the next
    /// `open` if this process dies).
    pub fn temp_dir(&self) -> io::Result<tempfile::TempDir> {
        tempfile::Builder::new()
            .prefix("t")
            .tempdir_in(&self.run_dir)
    }

    fn temp_file(&self) -> Result<tempfile::NamedTempFile, StoreError> {
        tempfile::Builder::new()
            .prefix("f")
            .tempfile_in(&self.run_dir)
            .map_err(io_error("create a temporary file in", &self.run_dir))
    }

    fn unique_name(&self, prefix: &str) -> PathBuf {
        let count = self.counter.fetch_add(1, Ordering::Relaxed);
        self.run_dir
            .join(format!("{prefix}-{count}-{}", random_suffix()))
    }

    // ---- blobs ----------------------------------------------------------------------------

    /// Where the blob lives (or would live).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    /// Whether the blob is present; a hit counts as a use for pruning.
    pub fn has_blob(&self, digest: &Digest) -> bool {
        let path = self.blob_path(digest);
        let present = path.is_file();
        if present {
            touch(&path);
        }
        present
    }

    /// Whether the blob is present with `size` bytes (a use for pruning). A blob of another
    /// size is corrupt: it is removed, and [`BlobState::Corrupt`] says so.
    pub fn check_blob(&self, digest: &Digest, size: u64) -> BlobState {
        let path = self.blob_path(digest);
        match std::fs::symlink_metadata(&path) {
            Ok(metadata) if metadata.is_file() && metadata.len() == size => {
                touch(&path);
                BlobState::Present
            }
            Ok(_) => {
                let _ = self.remove_blob(digest);
                BlobState::Corrupt
            }
            Err(_) => BlobState::Missing,
        }
    }

    /// Remove a blob (found corrupt): every action naming it becomes a miss.
    pub fn remove_blob(&self, digest: &Digest) -> Result<(), StoreError> {
        let path = self.blob_path(digest);
        match std::fs::remove_file(&path) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => {
                Err(io_error("remove", &path)(error))
            }
            _ => Ok(()),
        }
    }

    /// Store `bytes` as a blob and return its digest.
    pub fn put_blob_bytes(&self, bytes: &[u8]) -> Result<Digest, StoreError> {
        let digest = Digest::of(bytes);
        if self.check_blob(&digest, bytes.len() as u64) == BlobState::Present {
            return Ok(digest);
        }
        let mut temp = self.temp_file()?;
        temp.write_all(bytes)
            .map_err(io_error("write", temp.path()))?;
        temp.as_file()
            .sync_all()
            .map_err(io_error("sync", temp.path()))?;
        self.publish(temp.into_temp_path().as_ref(), &self.blob_path(&digest))?;
        Ok(digest)
    }

    /// Move the file at `tmp` into the store as a blob. Its content is hashed (and checked
    /// against `expected`), synced, and renamed into place. The file is consumed either way:
    /// on a mismatch it is deleted and nothing is stored.
    pub fn put_blob_file(
        &self,
        tmp: &Path,
        expected: Option<Digest>,
    ) -> Result<Digest, StoreError> {
        let mut file = File::open(tmp).map_err(io_error("open", tmp))?;
        let mut hasher = DigestWriter::new();
        let size = io::copy(&mut file, &mut hasher).map_err(io_error("read", tmp))?;
        let actual = hasher.finish();
        if let Some(expected) = expected
            && expected != actual
        {
            let _ = std::fs::remove_file(tmp);
            return Err(StoreError::DigestMismatch { expected, actual });
        }
        if self.check_blob(&actual, size) == BlobState::Present {
            let _ = std::fs::remove_file(tmp);
            return Ok(actual);
        }
        file.sync_all().map_err(io_error("sync", tmp))?;
        drop(file);
        let final_path = self.blob_path(&actual);
        match std::fs::rename(tmp, &final_path) {
            Ok(()) => {
                fsutil::sync_dir(final_path.parent().unwrap_or(&self.root))
                    .map_err(io_error("sync", &final_path))?;
            }
            Err(error) if error.raw_os_error() == Some(libc::EXDEV) => {
                // `tmp` is on another filesystem: copy it next to the store first.
                let copy = self.unique_name("x");
                std::fs::copy(tmp, &copy).map_err(io_error("copy", tmp))?;
                File::open(&copy)
                    .and_then(|file| file.sync_all())
                    .map_err(io_error("sync", &copy))?;
                self.publish(&copy, &final_path)?;
                let _ = std::fs::remove_file(tmp);
            }
            Err(error) => return Err(io_error("move into the store", tmp)(error)),
        }
        Ok(actual)
    }

    /// A writer that streams a blob into the store, hashing as it goes; see [`BlobWriter`].
    pub fn blob_writer(&self) -> Result<BlobWriter<'_>, StoreError> {
        Ok(BlobWriter {
            store: self,
            temp: self.temp_file()?,
            hasher: DigestWriter::new(),
            size: 0,
        })
    }

    /// Open a blob for streaming (counts as a use).
    pub fn open_blob(&self, digest: &Digest) -> Result<File, StoreError> {
        let path = self.blob_path(digest);
        match File::open(&path) {
            Ok(file) => {
                touch(&path);
                Ok(file)
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                Err(StoreError::MissingBlob(*digest))
            }
            Err(error) => Err(io_error("open", &path)(error)),
        }
    }

    /// Read a whole blob, verifying its digest (a corrupt blob is deleted and reported).
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(digest);
        let mut bytes = Vec::new();
        self.open_blob(digest)?
            .read_to_end(&mut bytes)
            .map_err(io_error("read", &path))?;
        let actual = Digest::of(&bytes);
        if actual != *digest {
            let _ = std::fs::remove_file(&path);
            return Err(StoreError::Corrupt {
                digest: *digest,
                actual,
            });
        }
        Ok(bytes)
    }

    /// Rename a complete, synced file to its final name and sync the directory.
    fn publish(&self, temp: &Path, final_path: &Path) -> Result<(), StoreError> {
        std::fs::rename(temp, final_path).map_err(io_error("move into the store", final_path))?;
        fsutil::sync_dir(final_path.parent().unwrap_or(&self.root))
            .map_err(io_error("sync", final_path))
    }

    // ---- action cache ---------------------------------------------------------------------

    fn action_path(&self, key: &Key) -> PathBuf {
        let hex = key.hex();
        self.root.join("actions").join(&hex[..2]).join(hex)
    }

    /// The record stored for a step key, if any (counts as a use).
    pub fn get_action(&self, key: &Key) -> Option<Vec<u8>> {
        let path = self.action_path(key);
        let bytes = std::fs::read(&path).ok()?;
        touch(&path);
        Some(bytes)
    }

    /// Record `bytes` for a step key, atomically (last writer wins).
    pub fn put_action(&self, key: &Key, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.action_path(key);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io_error("create", parent))?;
        }
        let mut temp = self.temp_file()?;
        temp.write_all(bytes)
            .map_err(io_error("write", temp.path()))?;
        temp.as_file()
            .sync_all()
            .map_err(io_error("sync", temp.path()))?;
        self.publish(temp.into_temp_path().as_ref(), &path)
    }

    /// Forget the record of a step key (found to name a layer that fails verification).
    pub fn remove_action(&self, key: &Key) -> Result<(), StoreError> {
        let path = self.action_path(key);
        match std::fs::remove_file(&path) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => {
                Err(io_error("remove", &path)(error))
            }
            _ => Ok(()),
        }
    }

    fn verified_layer_key(digest: &Digest) -> Key {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"graphbuild verified-layer v1\0");
        hasher.update(&digest.0);
        Key(*hasher.finalize().as_bytes())
    }

    /// Record that the blob `layer.digest` was read through and its uncompressed stream hashes
    /// to `layer.diff_id` (an action record, so prune and `cache verify` treat it as one).
    pub fn record_verified_layer(&self, layer: &LayerDesc) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(layer).map_err(|error| StoreError::Io {
            action: "serialize",
            path: self.root.clone(),
            source: io::Error::other(error),
        })?;
        let key = Self::verified_layer_key(&layer.digest);
        // Usually already recorded: skip the write (and its fsync).
        if self.get_action(&key).as_deref() == Some(bytes.as_slice()) {
            return Ok(());
        }
        self.put_action(&key, &bytes)
    }

    /// The diff_id the blob `digest` was verified to have, if it was.
    pub fn verified_diff_id(&self, digest: &Digest) -> Option<Digest> {
        let bytes = self.get_action(&Self::verified_layer_key(digest))?;
        let layer: LayerDesc = serde_json::from_slice(&bytes).ok()?;
        (layer.digest == *digest).then_some(layer.diff_id)
    }

    // ---- snapshots ------------------------------------------------------------------------

    fn snapshot_dir(&self, diff_id: &Digest) -> PathBuf {
        self.root
            .join("snapshots")
            .join(format!("sha256-{}", diff_id.hex()))
    }

    /// Remove the snapshot of `diff_id`, if any.
    pub fn remove_snapshot(&self, diff_id: &Digest) -> Result<(), StoreError> {
        self.remove_dir_entry(&self.snapshot_dir(diff_id))
    }

    /// The unpacked layer for `diff_id`, if complete (counts as a use).
    pub fn snapshot_path(&self, diff_id: &Digest) -> Option<PathBuf> {
        let path = self.snapshot_dir(diff_id);
        if path.is_dir() {
            touch(&path);
            Some(path)
        } else {
            None
        }
    }

    /// The unpacked layer for `diff_id`, created with `fill` (given an empty directory) if
    /// missing. Concurrent callers for one diff_id, in this process or others, all succeed and
    /// get the same path.
    pub fn ensure_snapshot<E: std::fmt::Display>(
        &self,
        diff_id: &Digest,
        fill: impl FnOnce(&Path) -> Result<(), E>,
    ) -> Result<PathBuf, StoreError> {
        if let Some(path) = self.snapshot_path(diff_id) {
            return Ok(path);
        }
        let final_path = self.snapshot_dir(diff_id);
        let temp = self.unique_name("snapshot");
        std::fs::create_dir(&temp).map_err(io_error("create", &temp))?;
        if let Err(error) = fill(&temp) {
            let _ = fsutil::remove_dir_all_force(&temp);
            return Err(StoreError::Fill {
                diff_id: *diff_id,
                message: error.to_string(),
            });
        }
        match std::fs::rename(&temp, &final_path) {
            Ok(()) => Ok(final_path),
            Err(error)
                if matches!(
                    error.raw_os_error(),
                    Some(libc::ENOTEMPTY) | Some(libc::EEXIST)
                ) =>
            {
                // Another run published it first; theirs is as good as ours.
                let _ = fsutil::remove_dir_all_force(&temp);
                touch(&final_path);
                Ok(final_path)
            }
            Err(error) => {
                let _ = fsutil::remove_dir_all_force(&temp);
                Err(io_error("move into the store", &final_path)(error))
            }
        }
    }

    /// Move the snapshot of `diff_id` out of the store to `dest` (a new path in this run's
    /// scratch space, e.g. under [`Store::temp_dir`]), for a caller that turns it into another
    /// layer's snapshot. Only while no other run has the store open (one might have it mounted
    /// as a lower directory); `Ok(false)` then, or when there is no such snapshot. A snapshot
    /// taken is unpacked again from its blob when next needed, as after a prune.
    pub fn take_snapshot(&self, diff_id: &Digest, dest: &Path) -> Result<bool, StoreError> {
        let from = self.snapshot_dir(diff_id);
        if !from.is_dir() {
            return Ok(false);
        }
        let lock_path = self.root.join("lock");
        // Converting our shared lock drops it first when the conversion fails: take it back.
        match try_flock(&self.lock, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(true) => {}
            Ok(false) => {
                flock(&self.lock, libc::LOCK_SH).map_err(io_error("lock", &lock_path))?;
                return Ok(false);
            }
            Err(error) => {
                let _ = flock(&self.lock, libc::LOCK_SH);
                return Err(io_error("lock", &lock_path)(error));
            }
        }
        let moved = std::fs::rename(&from, dest);
        flock(&self.lock, libc::LOCK_SH).map_err(io_error("lock", &lock_path))?;
        match moved {
            Ok(()) => Ok(true),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(error) => Err(io_error("move out of the store", &from)(error)),
        }
    }

    // ---- cache mounts ---------------------------------------------------------------------

    /// The persistent directory of a `cache-mount` for (id, platform), locked exclusively until
    /// the guard drops (waits for another step or run holding it): `sharing="locked"`.
    pub fn cache_mount(&self, id: &str, platform: &str) -> Result<CacheMountGuard, StoreError> {
        self.cache_mount_shared(id, platform, CacheSharing::Locked)
    }

    /// The persistent directory of a `cache-mount` for (id, platform), as `sharing` says:
    /// `shared` holds a shared lock (steps use it at once; only an exclusive holder, a
    /// `locked` step, waits or is waited for), `locked` an exclusive one, and `private` takes
    /// the first of the directory's instances (`<hash>`, `<hash>-1`, …) that no one holds,
    /// making a new one when all are in use.
    pub fn cache_mount_shared(
        &self,
        id: &str,
        platform: &str,
        sharing: CacheSharing,
    ) -> Result<CacheMountGuard, StoreError> {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"graphbuild cache-mount v1\0");
        hasher.update(id.as_bytes());
        hasher.update(b"\0");
        hasher.update(platform.as_bytes());
        let hash = hasher.finalize().to_hex()[..32].to_string();
        let base = self.root.join("cache-mounts");
        let open_lock = |name: &str| {
            let lock_path = base.join(format!("{name}.lock"));
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&lock_path)
                .map_err(io_error("open", &lock_path))
                .map(|lock| (lock, lock_path))
        };
        let (name, lock) = match sharing {
            CacheSharing::Locked | CacheSharing::Shared => {
                let (lock, lock_path) = open_lock(&hash)?;
                let operation = if sharing == CacheSharing::Locked {
                    libc::LOCK_EX
                } else {
                    libc::LOCK_SH
                };
                flock(&lock, operation).map_err(io_error("lock", &lock_path))?;
                (hash, lock)
            }
            CacheSharing::Private => {
                let mut instance = 0usize;
                loop {
                    let name = if instance == 0 {
                        hash.clone()
                    } else {
                        format!("{hash}-{instance}")
                    };
                    let (lock, lock_path) = open_lock(&name)?;
                    match flock(&lock, libc::LOCK_EX | libc::LOCK_NB) {
                        Ok(()) => break (name, lock),
                        Err(error) if error.raw_os_error() == Some(libc::EWOULDBLOCK) => {
                            instance += 1;
                        }
                        Err(error) => return Err(io_error("lock", &lock_path)(error)),
                    }
                }
            }
        };
        let path = base.join(&name);
        std::fs::create_dir_all(&path).map_err(io_error("create", &path))?;
        let meta_path = base.join(format!("{name}.json"));
        if !meta_path.exists() {
            let meta = serde_json::json!({ "id": id, "platform": platform });
            let mut temp = self.temp_file()?;
            temp.write_all(meta.to_string().as_bytes())
                .map_err(io_error("write", temp.path()))?;
            temp.into_temp_path()
                .persist(&meta_path)
                .map_err(|error| io_error("write", &meta_path)(error.error))?;
        }
        touch(&path);
        Ok(CacheMountGuard { path, _lock: lock })
    }

    /// Every cache-mount directory with its (id, platform), e.g. to upload them to a remote
    /// cache. Take [`Store::cache_mount`] before reading one, to see a consistent state.
    pub fn list_cache_mounts(&self) -> Result<Vec<(String, String, PathBuf)>, StoreError> {
        let mut mounts = Vec::new();
        for path in list_dir(&self.root.join("cache-mounts"))? {
            if path.extension().is_none_or(|extension| extension != "json") {
                continue;
            }
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            let Ok(meta) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
                continue;
            };
            if let (Some(id), Some(platform)) = (meta["id"].as_str(), meta["platform"].as_str()) {
                mounts.push((
                    id.to_string(),
                    platform.to_string(),
                    path.with_extension(""),
                ));
            }
        }
        mounts.sort();
        Ok(mounts)
    }

    // ---- context stat caches --------------------------------------------------------------

    fn context_cache_path(&self, id: &[u8; 32]) -> PathBuf {
        self.root.join("contexts").join(hex::encode(id))
    }

    /// The stat cache record stored under `id` (see `context`).
    pub fn read_context_cache(&self, id: &[u8; 32]) -> Option<Vec<u8>> {
        let path = self.context_cache_path(id);
        let bytes = std::fs::read(&path).ok()?;
        touch(&path);
        Some(bytes)
    }

    /// Replace the stat cache record stored under `id`, atomically. Not fsynced: losing it
    /// only means hashing the context again.
    pub fn write_context_cache(&self, id: &[u8; 32], bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.context_cache_path(id);
        let mut temp = self.temp_file()?;
        temp.write_all(bytes)
            .map_err(io_error("write", temp.path()))?;
        temp.into_temp_path()
            .persist(&path)
            .map_err(|error| io_error("write", &path)(error.error))?;
        Ok(())
    }

    // ---- usage and pruning ----------------------------------------------------------------

    /// Sizes and counts per area.
    pub fn usage(&self) -> Result<Usage, StoreError> {
        let mut usage = Usage::default();
        for entry in self.entries()? {
            let area = match entry.area {
                Area::Blob => &mut usage.blobs,
                Area::Action => &mut usage.actions,
                Area::Snapshot => &mut usage.snapshots,
                Area::CacheMount => &mut usage.cache_mounts,
                Area::Context => &mut usage.other,
            };
            area.bytes += entry.bytes;
            area.count += 1;
            usage.total += entry.bytes;
        }
        Ok(usage)
    }

    /// Check every blob's content against its name, every snapshot directory's name, and that
    /// every blob an action record names is present with its size; with `repair`, remove each
    /// bad entry (a removed action or blob is a miss: the next build executes or fetches it
    /// again). Like prune, repairing needs the store to itself ([`StoreError::Busy`]).
    pub fn verify(&self, repair: bool) -> Result<VerifyReport, StoreError> {
        let lock_path = self.root.join("lock");
        if repair {
            match try_flock(&self.lock, libc::LOCK_EX | libc::LOCK_NB) {
                Ok(true) => {}
                Ok(false) => {
                    flock(&self.lock, libc::LOCK_SH).map_err(io_error("lock", &lock_path))?;
                    return Err(StoreError::Busy {
                        root: self.root.clone(),
                    });
                }
                Err(error) => {
                    let _ = flock(&self.lock, libc::LOCK_SH);
                    return Err(io_error("lock", &lock_path)(error));
                }
            }
        }
        let result = self.verify_locked(repair);
        if repair {
            flock(&self.lock, libc::LOCK_SH).map_err(io_error("lock", &lock_path))?;
        }
        result
    }

    fn verify_locked(&self, repair: bool) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        let problem = |report: &mut VerifyReport, path: PathBuf, what: String| {
            let removed = repair && {
                let is_dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
                if is_dir {
                    self.remove_dir_entry(&path).is_ok()
                } else {
                    std::fs::remove_file(&path).is_ok()
                }
            };
            report.problems.push(Problem {
                path,
                what,
                removed,
            });
        };
        let mut sizes = std::collections::HashMap::new();
        let mut blobs = list_dir(&self.root.join("blobs/sha256"))?;
        blobs.sort();
        for path in blobs {
            report.blobs += 1;
            let name = path
                .file_name()
                .map(|name| name.to_string_lossy().into_owned());
            let Some(digest) = name.as_deref().and_then(Digest::from_hex) else {
                problem(&mut report, path, "not a blob name (64 hex digits)".into());
                continue;
            };
            let metadata = std::fs::symlink_metadata(&path).map_err(io_error("inspect", &path))?;
            if !metadata.is_file() {
                problem(&mut report, path, "not a regular file".into());
                continue;
            }
            let mut hasher = DigestWriter::new();
            let hashed = File::open(&path).and_then(|mut file| io::copy(&mut file, &mut hasher));
            match hashed {
                Ok(size) => {
                    let actual = hasher.finish();
                    if actual == digest {
                        sizes.insert(digest, size);
                    } else {
                        problem(
                            &mut report,
                            path,
                            format!("corrupt blob: its content hashes to {actual}"),
                        );
                    }
                }
                Err(error) => problem(&mut report, path, format!("unreadable blob: {error}")),
            }
        }
        let mut snapshots = list_dir(&self.root.join("snapshots"))?;
        snapshots.sort();
        for path in snapshots {
            report.snapshots += 1;
            let name = path
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default();
            let is_dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
            if is_dir && snapshot_name_digest(&name).is_some() {
                continue;
            }
            let what = if is_dir && Digest::from_hex(&name).is_some() {
                "snapshot written before diff_ids were verified (its content was never checked)"
            } else {
                "not a snapshot"
            };
            problem(&mut report, path, what.into());
        }
        let mut actions = Vec::new();
        for shard in list_dir(&self.root.join("actions"))? {
            if shard.is_dir() {
                actions.extend(list_dir(&shard)?);
            }
        }
        actions.sort();
        for path in actions {
            report.actions += 1;
            let value = std::fs::read(&path)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok());
            let Some(value) = value else {
                problem(&mut report, path, "unreadable action record".into());
                continue;
            };
            let Some(named) = named_blobs(&value) else {
                problem(
                    &mut report,
                    path,
                    "names a layer without a valid digest or size".into(),
                );
                continue;
            };
            let mut missing = None;
            for (digest, size) in named {
                match sizes.get(&digest) {
                    Some(found) if *found == size => {}
                    Some(found) => {
                        missing = Some(format!(
                            "names blob {digest} of {size} bytes, which has {found}"
                        ));
                        break;
                    }
                    None => {
                        missing = Some(format!("names blob {digest}, which is missing or corrupt"));
                        break;
                    }
                }
            }
            if let Some(what) = missing {
                problem(&mut report, path, what);
            }
        }
        Ok(report)
    }

    /// Remove least recently used entries until the store holds at most `keep_bytes`. Fails
    /// with [`StoreError::Busy`], removing nothing, while another run has the store open.
    pub fn prune(&self, keep_bytes: u64) -> Result<PruneReport, StoreError> {
        let lock_path = self.root.join("lock");
        // Converting our shared lock drops it first when the conversion fails: take it back.
        match try_flock(&self.lock, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(true) => {}
            Ok(false) => {
                flock(&self.lock, libc::LOCK_SH).map_err(io_error("lock", &lock_path))?;
                return Err(StoreError::Busy {
                    root: self.root.clone(),
                });
            }
            Err(error) => {
                let _ = flock(&self.lock, libc::LOCK_SH);
                return Err(io_error("lock", &lock_path)(error));
            }
        }
        let result = self.prune_locked(keep_bytes);
        let relock = flock(&self.lock, libc::LOCK_SH).map_err(io_error("lock", &lock_path));
        let report = result?;
        relock?;
        Ok(report)
    }

    fn prune_locked(&self, keep_bytes: u64) -> Result<PruneReport, StoreError> {
        let tmp = self.root.join("tmp");
        clean_tmp(&tmp).map_err(io_error("clean", &tmp))?;
        let mut entries = self.entries()?;
        entries.sort_by(|a, b| {
            a.last_used
                .cmp(&b.last_used)
                .then_with(|| a.path.cmp(&b.path))
        });
        let mut total: u64 = entries.iter().map(|entry| entry.bytes).sum();
        let mut report = PruneReport::default();
        let mut removed_blobs = false;
        let mut kept = Vec::new();
        for entry in entries {
            if total > keep_bytes && self.remove_entry(&entry)? {
                total = total.saturating_sub(entry.bytes);
                report.removed_entries += 1;
                report.removed_bytes += entry.bytes;
                removed_blobs |= entry.area == Area::Blob;
            } else {
                kept.push(entry);
            }
        }
        // An action naming a removed blob is a miss from now on: remove it too, so the store
        // holds no stale record (`cache verify` stays clean after a prune).
        if removed_blobs {
            for entry in kept.iter().filter(|entry| entry.area == Area::Action) {
                let stale = std::fs::read(&entry.path)
                    .ok()
                    .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
                    .and_then(|value| named_blobs(&value))
                    .is_some_and(|named| {
                        named
                            .iter()
                            .any(|(digest, _)| !self.blob_path(digest).is_file())
                    });
                if stale && self.remove_entry(entry)? {
                    total = total.saturating_sub(entry.bytes);
                    report.removed_entries += 1;
                    report.removed_bytes += entry.bytes;
                }
            }
        }
        report.remaining_bytes = total;
        Ok(report)
    }

    /// Remove one entry; `false` if it is in use (a locked cache mount).
    fn remove_entry(&self, entry: &StoreEntry) -> Result<bool, StoreError> {
        match entry.area {
            Area::Blob | Area::Action | Area::Context => {
                match std::fs::remove_file(&entry.path) {
                    Err(error) if error.kind() != io::ErrorKind::NotFound => {
                        return Err(io_error("remove", &entry.path)(error));
                    }
                    _ => {}
                }
                Ok(true)
            }
            Area::Snapshot => {
                self.remove_dir_entry(&entry.path)?;
                Ok(true)
            }
            Area::CacheMount => {
                let lock_path = entry.path.with_extension("lock");
                let lock = match File::open(&lock_path) {
                    Ok(lock) => Some(lock),
                    Err(error) if error.kind() == io::ErrorKind::NotFound => None,
                    Err(error) => return Err(io_error("open", &lock_path)(error)),
                };
                if let Some(lock) = &lock
                    && !try_flock(lock, libc::LOCK_EX | libc::LOCK_NB)
                        .map_err(io_error("lock", &lock_path))?
                {
                    return Ok(false);
                }
                self.remove_dir_entry(&entry.path)?;
                let _ = std::fs::remove_file(entry.path.with_extension("json"));
                let _ = std::fs::remove_file(&lock_path);
                Ok(true)
            }
        }
    }

    /// Rename a directory entry out of sight, then delete it: a crash midway leaves it in our
    /// run directory, which the next `open` deletes, never a half-deleted entry in place.
    fn remove_dir_entry(&self, path: &Path) -> Result<(), StoreError> {
        let trash = self.unique_name("trash");
        match std::fs::rename(path, &trash) {
            Ok(()) => fsutil::remove_dir_all_force(&trash).map_err(io_error("remove", &trash)),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(io_error("remove", path)(error)),
        }
    }

    fn entries(&self) -> Result<Vec<StoreEntry>, StoreError> {
        let mut entries = Vec::new();
        let blobs = self.root.join("blobs/sha256");
        for path in list_dir(&blobs)? {
            push_file_entry(&mut entries, Area::Blob, path);
        }
        let actions = self.root.join("actions");
        for shard in list_dir(&actions)? {
            if shard.is_dir() {
                for path in list_dir(&shard)? {
                    push_file_entry(&mut entries, Area::Action, path);
                }
            }
        }
        let contexts = self.root.join("contexts");
        for path in list_dir(&contexts)? {
            push_file_entry(&mut entries, Area::Context, path);
        }
        for (area, dir) in [
            (Area::Snapshot, "snapshots"),
            (Area::CacheMount, "cache-mounts"),
        ] {
            for path in list_dir(&self.root.join(dir))? {
                let Ok(metadata) = std::fs::symlink_metadata(&path) else {
                    continue;
                };
                if !metadata.is_dir() {
                    continue;
                }
                let bytes = tree_bytes(&path);
                entries.push(StoreEntry {
                    area,
                    last_used: last_used(&metadata),
                    bytes,
                    path,
                });
            }
        }
        Ok(entries)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Delete our scratch space, then our lock file while we still hold its lock.
        let _ = fsutil::remove_dir_all_force(&self.run_dir);
        let _ = std::fs::remove_file(&self.run_lock_path);
    }
}

/// Streams a blob into the store: write to it, then [`BlobWriter::finish`]. Dropping it
/// without finishing stores nothing.
pub struct BlobWriter<'store> {
    store: &'store Store,
    temp: tempfile::NamedTempFile,
    hasher: DigestWriter,
    size: u64,
}

impl BlobWriter<'_> {
    /// Verify against `expected` (if given), sync and publish; returns the digest and size.
    pub fn finish(mut self, expected: Option<Digest>) -> Result<(Digest, u64), StoreError> {
        self.temp
            .flush()
            .map_err(io_error("write", self.temp.path()))?;
        let actual = self.hasher.finish();
        if let Some(expected) = expected
            && expected != actual
        {
            return Err(StoreError::DigestMismatch { expected, actual });
        }
        if self.store.check_blob(&actual, self.size) == BlobState::Present {
            return Ok((actual, self.size));
        }
        self.temp
            .as_file()
            .sync_all()
            .map_err(io_error("sync", self.temp.path()))?;
        self.store.publish(
            self.temp.into_temp_path().as_ref(),
            &self.store.blob_path(&actual),
        )?;
        Ok((actual, self.size))
    }
}

impl Write for BlobWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.temp.write(buf)?;
        self.hasher.update(&buf[..written]);
        self.size += written as u64;
        Ok(written)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.temp.flush()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Area {
    Blob,
    Action,
    Snapshot,
    CacheMount,
    Context,
}

#[derive(Debug)]
struct StoreEntry {
    area: Area,
    path: PathBuf,
    bytes: u64,
    /// Nanoseconds since the epoch.
    last_used: i128,
}

fn push_file_entry(entries: &mut Vec<StoreEntry>, area: Area, path: PathBuf) {
    if let Ok(metadata) = std::fs::symlink_metadata(&path)
        && metadata.is_file()
    {
        entries.push(StoreEntry {
            area,
            last_used: last_used(&metadata),
            bytes: metadata.len(),
            path,
        });
    }
}

fn last_used(metadata: &std::fs::Metadata) -> i128 {
    let atime = i128::from(metadata.atime()) * 1_000_000_000 + i128::from(metadata.atime_nsec());
    let mtime = i128::from(metadata.mtime()) * 1_000_000_000 + i128::from(metadata.mtime_nsec());
    atime.max(mtime)
}

/// Apparent size of the files and symlinks below `dir` (directories count for nothing).
fn tree_bytes(dir: &Path) -> u64 {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|entry| !entry.file_type().is_dir())
        .filter_map(|entry| entry.metadata().ok())
        .map(|metadata| metadata.len())
        .sum()
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let mut paths = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(paths),
        Err(error) => return Err(io_error("list", dir)(error)),
    };
    for entry in entries {
        paths.push(entry.map_err(io_error("list", dir))?.path());
    }
    Ok(paths)
}

/// Mark an entry as used now: set its atime, leave its mtime.
fn touch(path: &Path) {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return;
    };
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    ];
    // SAFETY: c_path is NUL-terminated and times points at two timespecs.
    unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        );
    }
}

/// The store lock at `lock_path`, held shared: the one this process already holds, or newly
/// opened and locked.
fn process_lock(lock_path: &Path) -> Result<std::sync::Arc<File>, StoreError> {
    type Held = std::sync::Mutex<std::collections::HashMap<PathBuf, std::sync::Weak<File>>>;
    static HELD: std::sync::OnceLock<Held> = std::sync::OnceLock::new();
    let mut held = HELD
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(lock) = held.get(lock_path).and_then(std::sync::Weak::upgrade) {
        return Ok(lock);
    }
    let lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(lock_path)
        .map_err(io_error("open", lock_path))?;
    flock(&lock, libc::LOCK_SH).map_err(io_error("lock", lock_path))?;
    let lock = std::sync::Arc::new(lock);
    held.retain(|_, lock| lock.strong_count() > 0);
    held.insert(lock_path.to_path_buf(), std::sync::Arc::downgrade(&lock));
    Ok(lock)
}

fn flock(file: &File, operation: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: the fd is valid for the life of `file`.
        if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// `Ok(false)` when the lock is held elsewhere.
fn try_flock(file: &File, operation: libc::c_int) -> io::Result<bool> {
    match flock(file, operation | libc::LOCK_NB) {
        Ok(()) => Ok(true),
        Err(error) if error.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        Err(error) => Err(error),
    }
}

fn random_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = blake3::Hasher::new();
    hasher.update(&std::process::id().to_le_bytes());
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    hasher.update(&now.to_le_bytes());
    hasher.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    hasher.update(format!("{:?}", std::thread::current().id()).as_bytes());
    let stack_marker = 0u8;
    hasher.update(&(std::ptr::addr_of!(stack_marker) as usize).to_le_bytes());
    hasher.finalize().to_hex()[..16].to_string()
}

/// Create `tmp/run-<pid>-<rand>/` guarded by an exclusive flock on `tmp/run-<pid>-<rand>.lock`.
fn create_run_dir(tmp: &Path) -> io::Result<(PathBuf, PathBuf, File)> {
    loop {
        let name = format!("run-{}-{}", std::process::id(), random_suffix());
        let lock_path = tmp.join(format!("{name}.lock"));
        let lock = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&lock_path)
        {
            Ok(lock) => lock,
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(error) => return Err(error),
        };
        if !try_flock(&lock, libc::LOCK_EX)? || !same_file(&lock, &lock_path) {
            // A cleaner took it between create and lock, and unlinked it: try another name.
            continue;
        }
        let run_dir = tmp.join(&name);
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(PRIVATE_DIR)
                .create(&run_dir)?;
        }
        make_private(&run_dir)?;
        return Ok((run_dir, lock_path, lock));
    }
}

fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

/// Delete what dead runs left in `tmp/`: run directories whose lock is free (or missing).
fn clean_tmp(tmp: &Path) -> io::Result<()> {
    let mut names: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(tmp)? {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    for name in &names {
        let path = tmp.join(name);
        if let Some(run) = name
            .strip_suffix(".lock")
            .filter(|run| run.starts_with("run-"))
        {
            let Ok(lock) = OpenOptions::new().read(true).write(true).open(&path) else {
                continue;
            };
            if try_flock(&lock, libc::LOCK_EX)? && same_file(&lock, &path) {
                fsutil::remove_dir_all_force(&tmp.join(run))?;
                let _ = std::fs::remove_file(&path);
            }
        } else if name.starts_with("run-") {
            // A run directory whose lock file is gone: its owner unlinked the lock only after
            // deleting the directory, or a cleaner did, so nobody owns it.
            if !names.contains(&format!("{name}.lock")) {
                fsutil::remove_dir_all_force(&path)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};
    use std::sync::Arc;

    fn key(n: u8) -> Key {
        Key(*blake3::hash(&[n]).as_bytes())
    }

    #[test]
    fn layout_is_created_and_blobs_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for area in AREAS {
            assert!(dir.path().join(area).is_dir(), "{area}");
        }
        let digest = store.put_blob_bytes(b"hello").unwrap();
        assert_eq!(
            digest.to_string(),
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert!(store.has_blob(&digest));
        assert_eq!(
            std::fs::read(dir.path().join("blobs/sha256").join(digest.hex())).unwrap(),
            b"hello"
        );
        assert_eq!(store.read_blob(&digest).unwrap(), b"hello");
        assert!(!store.has_blob(&Digest::of(b"other")));
        assert!(matches!(
            store.read_blob(&Digest::of(b"other")),
            Err(StoreError::MissingBlob(_))
        ));
    }

    #[test]
    fn put_blob_file_verifies_and_keeps_nothing_on_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let temp = store.temp_dir().unwrap();
        let file = temp.path().join("layer");
        std::fs::write(&file, b"layer bytes").unwrap();
        let wrong = Digest::of(b"something else");
        let error = store.put_blob_file(&file, Some(wrong)).unwrap_err();
        assert!(
            matches!(error, StoreError::DigestMismatch { expected, .. } if expected == wrong),
            "{error}"
        );
        assert!(!store.has_blob(&Digest::of(b"layer bytes")));
        assert!(!store.has_blob(&wrong));
        assert_eq!(
            std::fs::read_dir(dir.path().join("blobs/sha256"))
                .unwrap()
                .count(),
            0
        );

        std::fs::write(&file, b"layer bytes").unwrap();
        let digest = store
            .put_blob_file(&file, Some(Digest::of(b"layer bytes")))
            .unwrap();
        assert_eq!(store.read_blob(&digest).unwrap(), b"layer bytes");
        assert!(!file.exists(), "the file is moved into the store");
    }

    #[test]
    fn blob_writer_streams_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut writer = store.blob_writer().unwrap();
        writer.write_all(b"part one, ").unwrap();
        writer.write_all(b"part two").unwrap();
        let (digest, size) = writer.finish(None).unwrap();
        assert_eq!(digest, Digest::of(b"part one, part two"));
        assert_eq!(size, 18);
        let mut writer = store.blob_writer().unwrap();
        writer.write_all(b"truncated").unwrap();
        assert!(matches!(
            writer.finish(Some(Digest::of(b"truncated!"))),
            Err(StoreError::DigestMismatch { .. })
        ));
        assert!(!store.has_blob(&Digest::of(b"truncated")));
    }

    #[test]
    fn corrupt_blobs_are_detected_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let digest = store.put_blob_bytes(b"good").unwrap();
        std::fs::write(store.blob_path(&digest), b"evil").unwrap();
        assert!(matches!(
            store.read_blob(&digest),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(!store.has_blob(&digest));
    }

    #[test]
    fn the_store_is_private_and_an_existing_root_is_tightened() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        std::fs::create_dir_all(root.join("tmp")).unwrap();
        for path in [&root, &root.join("tmp")] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let store = Store::open(&root).unwrap();
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&root.join("tmp")), 0o700);
        assert_eq!(mode(&store.run_dir), 0o700);
        let fresh = dir.path().join("fresh/store");
        let _other = Store::open(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o700);
    }

    #[test]
    fn a_blob_of_the_wrong_size_is_replaced_on_put_and_missed_on_check() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let digest = store.put_blob_bytes(b"good content").unwrap();
        std::fs::write(store.blob_path(&digest), b"bad").unwrap();
        assert_eq!(store.check_blob(&digest, 12), BlobState::Corrupt);
        assert_eq!(store.check_blob(&digest, 12), BlobState::Missing);
        std::fs::write(store.blob_path(&digest), b"bad").unwrap();
        assert_eq!(store.put_blob_bytes(b"good content").unwrap(), digest);
        assert_eq!(store.read_blob(&digest).unwrap(), b"good content");
        std::fs::write(store.blob_path(&digest), b"bad").unwrap();
        let mut writer = store.blob_writer().unwrap();
        writer.write_all(b"good content").unwrap();
        writer.finish(Some(digest)).unwrap();
        assert_eq!(store.read_blob(&digest).unwrap(), b"good content");
    }

    #[test]
    fn verify_finds_and_repairs_bad_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let good = store.put_blob_bytes(b"good").unwrap();
        let bad = store.put_blob_bytes(b"will be corrupted").unwrap();
        let layer = |digest: Digest, size: u64| LayerDesc {
            digest,
            diff_id: Digest::of(b"diff"),
            size,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        };
        let record = |layers: Vec<LayerDesc>| {
            serde_json::to_vec(&crate::state::StepRecord {
                layers,
                history: Vec::new(),
            })
            .unwrap()
        };
        store
            .put_action(&key(1), &record(vec![layer(good, 4)]))
            .unwrap();
        store
            .put_action(&key(2), &record(vec![layer(good, 4), layer(bad, 17)]))
            .unwrap();
        store
            .put_action(&key(3), &record(vec![layer(Digest::of(b"gone"), 4)]))
            .unwrap();
        store.record_verified_layer(&layer(good, 4)).unwrap();
        assert_eq!(store.verified_diff_id(&good), Some(Digest::of(b"diff")));
        store
            .ensure_snapshot(&Digest::of(b"diff"), |dir: &Path| {
                std::fs::write(dir.join("f"), b"x")
            })
            .unwrap();
        let clean = store.verify(false).unwrap();
        assert_eq!(
            clean.problems.len(),
            1,
            "only the missing blob: {:?}",
            clean.problems
        );
        store.put_action(&key(3), b"{}").unwrap();

        std::fs::write(store.blob_path(&bad), b"corrupted content").unwrap();
        let legacy = dir.path().join("snapshots").join(Digest::of(b"old").hex());
        std::fs::create_dir(&legacy).unwrap();
        store.put_action(&key(4), b"not json").unwrap();

        let report = store.verify(false).unwrap();
        assert_eq!(report.blobs, 2);
        assert_eq!(report.snapshots, 2);
        assert_eq!(report.actions, 5);
        let what: Vec<&str> = report
            .problems
            .iter()
            .map(|problem| problem.what.as_str())
            .collect();
        assert_eq!(report.problems.len(), 4, "{what:?}");
        assert!(
            what.iter().any(|what| what.contains("corrupt blob")),
            "{what:?}"
        );
        assert!(
            what.iter().any(|what| what.contains("never checked")),
            "{what:?}"
        );
        assert!(
            what.iter().any(|what| what.contains("unreadable")),
            "{what:?}"
        );
        assert!(
            what.iter().any(|what| what.contains(&bad.to_string())),
            "{what:?}"
        );
        assert!(report.problems.iter().all(|problem| !problem.removed));
        assert!(store.blob_path(&bad).exists());

        let repaired = store.verify(true).unwrap();
        assert_eq!(repaired.problems.len(), 4);
        assert!(repaired.problems.iter().all(|problem| problem.removed));
        assert!(!store.blob_path(&bad).exists());
        assert!(!legacy.exists());
        assert!(store.get_action(&key(1)).is_some());
        assert!(store.get_action(&key(2)).is_none());
        assert!(store.verify(false).unwrap().problems.is_empty());
    }

    #[test]
    fn prune_removes_the_actions_naming_the_blobs_it_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let old = store.put_blob_bytes(&[1u8; 1000]).unwrap();
        let new = store.put_blob_bytes(&[2u8; 1000]).unwrap();
        let record = |digest: Digest| {
            serde_json::to_vec(&crate::state::StepRecord {
                layers: vec![LayerDesc {
                    digest,
                    diff_id: digest,
                    size: 1000,
                    media_type: String::new(),
                }],
                history: Vec::new(),
            })
            .unwrap()
        };
        store.put_action(&key(1), &record(old)).unwrap();
        store.put_action(&key(2), &record(new)).unwrap();
        let c_path = std::ffi::CString::new(store.blob_path(&old).as_os_str().as_bytes()).unwrap();
        let long_ago = [libc::timespec {
            tv_sec: 1_000_000,
            tv_nsec: 0,
        }; 2];
        // SAFETY: a valid path and two timespecs.
        unsafe { libc::utimensat(libc::AT_FDCWD, c_path.as_ptr(), long_ago.as_ptr(), 0) };
        let total = store.usage().unwrap().total;
        let report = store.prune(total - 1000).unwrap();
        assert_eq!(report.removed_entries, 2, "{report:?}");
        assert!(!store.has_blob(&old));
        assert!(store.get_action(&key(1)).is_none());
        assert!(store.get_action(&key(2)).is_some());
        assert!(store.verify(false).unwrap().problems.is_empty());
    }

    #[test]
    fn actions_round_trip_and_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.get_action(&key(1)), None);
        store.put_action(&key(1), b"first").unwrap();
        store.put_action(&key(1), b"second").unwrap();
        assert_eq!(store.get_action(&key(1)).as_deref(), Some(&b"second"[..]));
        let hex = key(1).hex();
        assert!(
            dir.path()
                .join("actions")
                .join(&hex[..2])
                .join(&hex)
                .is_file()
        );
    }

    #[test]
    fn snapshots_are_complete_or_absent() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let diff_id = Digest::of(b"layer");
        assert_eq!(store.snapshot_path(&diff_id), None);
        let error = store
            .ensure_snapshot(&diff_id, |dir: &Path| {
                std::fs::write(dir.join("half"), b"x").unwrap();
                Err("disk on fire")
            })
            .unwrap_err();
        assert!(error.to_string().contains("disk on fire"), "{error}");
        assert_eq!(store.snapshot_path(&diff_id), None);
        let path = store
            .ensure_snapshot(&diff_id, |dir: &Path| {
                std::fs::write(dir.join("file"), b"content")
            })
            .unwrap();
        assert_eq!(
            path,
            dir.path()
                .join("snapshots")
                .join(format!("sha256-{}", diff_id.hex()))
        );
        assert_eq!(std::fs::read(path.join("file")).unwrap(), b"content");
        // Present now: fill is not called again.
        let again = store
            .ensure_snapshot(&diff_id, |_: &Path| Err("must not be called"))
            .unwrap();
        assert_eq!(again, path);
    }

    #[test]
    fn cache_mounts_are_exclusive_and_persistent() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let guard = store.cache_mount("go-build", "linux/arm64").unwrap();
        std::fs::write(guard.path().join("state"), b"1").unwrap();
        let other = store.cache_mount("go-build", "linux/amd64").unwrap();
        assert_ne!(other.path(), guard.path());
        let listed = store.list_cache_mounts().unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(
            (listed[1].0.as_str(), listed[1].1.as_str()),
            ("go-build", "linux/arm64")
        );
        assert_eq!(listed[1].2, guard.path());
        let (sender, receiver) = std::sync::mpsc::channel();
        let thread_store = store.clone();
        let waiter = std::thread::spawn(move || {
            let guard = thread_store.cache_mount("go-build", "linux/arm64").unwrap();
            sender
                .send(std::fs::read(guard.path().join("state")).unwrap())
                .unwrap();
        });
        assert!(
            receiver
                .recv_timeout(std::time::Duration::from_millis(300))
                .is_err(),
            "second user must wait"
        );
        std::fs::write(guard.path().join("state"), b"2").unwrap();
        drop(guard);
        assert_eq!(
            receiver
                .recv_timeout(std::time::Duration::from_secs(10))
                .unwrap(),
            b"2"
        );
        waiter.join().unwrap();
    }

    #[test]
    fn shared_cache_mounts_are_used_at_once_private_ones_get_their_own_directory() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let first = store
            .cache_mount_shared("npm", "linux/amd64", CacheSharing::Shared)
            .unwrap();
        // A second shared user does not wait.
        let second = store
            .cache_mount_shared("npm", "linux/amd64", CacheSharing::Shared)
            .unwrap();
        assert_eq!(first.path(), second.path());
        // A private user finds it in use and gets another instance, then a third.
        let private = store
            .cache_mount_shared("npm", "linux/amd64", CacheSharing::Private)
            .unwrap();
        assert_ne!(private.path(), first.path());
        let private_two = store
            .cache_mount_shared("npm", "linux/amd64", CacheSharing::Private)
            .unwrap();
        assert!(private_two.path() != private.path() && private_two.path() != first.path());
        // A locked user waits for the shared ones.
        let (sender, receiver) = std::sync::mpsc::channel();
        let thread_store = store.clone();
        let waiter = std::thread::spawn(move || {
            let guard = thread_store
                .cache_mount_shared("npm", "linux/amd64", CacheSharing::Locked)
                .unwrap();
            sender.send(guard.path().to_path_buf()).unwrap();
        });
        assert!(
            receiver
                .recv_timeout(std::time::Duration::from_millis(300))
                .is_err(),
            "a locked user waits for the shared ones"
        );
        drop(first);
        drop(second);
        let locked = receiver
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap();
        waiter.join().unwrap();
        assert_eq!(
            locked,
            dir.path()
                .join("cache-mounts")
                .join(locked.file_name().unwrap())
        );
        // Released, the first instance is the private user's again.
        drop(private);
        let again = store
            .cache_mount_shared("npm", "linux/amd64", CacheSharing::Private)
            .unwrap();
        assert!(!again.path().to_string_lossy().ends_with("-2"));
    }

    #[test]
    fn usage_and_prune_remove_least_recently_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let old = store.put_blob_bytes(&[1u8; 1000]).unwrap();
        let used = store.put_blob_bytes(&[2u8; 1000]).unwrap();
        store.put_action(&key(1), &[0u8; 100]).unwrap();
        let snapshot = store
            .ensure_snapshot(&Digest::of(b"l"), |dir: &Path| {
                std::fs::write(dir.join("f"), [0u8; 500])
            })
            .unwrap();
        {
            let mount = store.cache_mount("m", "linux/amd64").unwrap();
            std::fs::write(mount.path().join("f"), [0u8; 300]).unwrap();
        }
        let usage = store.usage().unwrap();
        assert_eq!(
            usage.blobs,
            Entries {
                bytes: 2000,
                count: 2
            }
        );
        assert_eq!(
            usage.actions,
            Entries {
                bytes: 100,
                count: 1
            }
        );
        assert_eq!(
            usage.snapshots,
            Entries {
                bytes: 500,
                count: 1
            }
        );
        assert_eq!(
            usage.cache_mounts,
            Entries {
                bytes: 300,
                count: 1
            }
        );
        assert_eq!(usage.total, 2900);

        // Age everything, then use one blob and the action: they must survive.
        let long_ago = [
            libc::timespec {
                tv_sec: 1_000_000,
                tv_nsec: 0,
            },
            libc::timespec {
                tv_sec: 1_000_000,
                tv_nsec: 0,
            },
        ];
        for path in walkdir::WalkDir::new(dir.path())
            .into_iter()
            .map(|entry| entry.unwrap().into_path())
        {
            let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
            // SAFETY: valid path and two timespecs.
            unsafe {
                libc::utimensat(
                    libc::AT_FDCWD,
                    c_path.as_ptr(),
                    long_ago.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            };
        }
        assert!(store.has_blob(&used));
        assert!(store.get_action(&key(1)).is_some());

        let report = store.prune(1100).unwrap();
        assert_eq!(report.remaining_bytes, 1100);
        assert_eq!(report.removed_entries, 3);
        assert_eq!(report.removed_bytes, 1800);
        assert!(!store.has_blob(&old));
        assert!(!snapshot.exists());
        assert!(store.has_blob(&used));
        assert!(store.get_action(&key(1)).is_some());
        assert_eq!(store.usage().unwrap().total, 1100);
        let report = store.prune(0).unwrap();
        assert_eq!(report.remaining_bytes, 0);
        assert_eq!(store.usage().unwrap().total, 0);
    }

    /// The store lock as another process holding the store open holds it (its own open file).
    fn other_run(root: &Path) -> File {
        let lock = File::open(root.join("lock")).unwrap();
        flock(&lock, libc::LOCK_SH).unwrap();
        lock
    }

    #[test]
    fn a_snapshot_is_taken_out_only_while_no_other_run_has_the_store_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // A second handle of this process is not another run.
        let same_process = Store::open(dir.path()).unwrap();
        let diff_id = Digest::of(b"snap");
        let snapshot = store
            .ensure_snapshot(&diff_id, |dir: &Path| std::fs::write(dir.join("f"), b"f"))
            .unwrap();
        let scratch = store.temp_dir().unwrap();
        let dest = scratch.path().join("taken");
        let other = other_run(dir.path());
        assert!(!store.take_snapshot(&diff_id, &dest).unwrap());
        assert!(snapshot.join("f").exists() && !dest.exists());
        drop(other);
        assert!(store.take_snapshot(&diff_id, &dest).unwrap());
        assert_eq!(std::fs::read(dest.join("f")).unwrap(), b"f");
        assert_eq!(store.snapshot_path(&diff_id), None);
        assert!(
            !store
                .take_snapshot(&diff_id, &dest.with_extension("again"))
                .unwrap()
        );
        // Our shared lock is back: another run can open the store, and prune sees it.
        let other = other_run(dir.path());
        assert!(matches!(
            same_process.prune(0),
            Err(StoreError::Busy { .. })
        ));
        drop(other);
    }

    #[test]
    fn prune_refuses_while_another_store_is_open_and_recovers_its_lock() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.put_blob_bytes(b"x").unwrap();
        let other = other_run(dir.path());
        assert!(matches!(store.prune(0), Err(StoreError::Busy { .. })));
        assert!(store.has_blob(&Digest::of(b"x")));
        // Our shared lock is back: a third opener is not blocked, and after the others close,
        // prune works.
        let third = other_run(dir.path());
        drop(third);
        drop(other);
        assert_eq!(store.prune(0).unwrap().remaining_bytes, 0);
    }

    #[test]
    fn snapshot_removal_handles_whiteouts_and_read_only_dirs() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let path = store
            .ensure_snapshot(&Digest::of(b"w"), |dir: &Path| -> io::Result<()> {
                std::fs::create_dir(dir.join("ro"))?;
                std::fs::write(dir.join("ro/file"), b"x")?;
                let c_path =
                    std::ffi::CString::new(dir.join("gone").as_os_str().as_bytes()).unwrap();
                // SAFETY: valid path.
                unsafe { libc::mknod(c_path.as_ptr(), libc::S_IFCHR | 0o600, 0) };
                std::fs::set_permissions(dir.join("ro"), std::fs::Permissions::from_mode(0o555))
            })
            .unwrap();
        store.prune(0).unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn concurrent_threads_writing_the_same_entries_agree() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                std::thread::spawn(move || hammer(&store))
            })
            .collect();
        for handle in handles {
            handle.join().unwrap();
        }
        check_hammered(&store);
    }

    /// Write the same blobs, actions and snapshots many times.
    fn hammer(store: &Store) {
        for round in 0..20u8 {
            let bytes = vec![round; 64 * 1024];
            assert_eq!(store.put_blob_bytes(&bytes).unwrap(), Digest::of(&bytes));
            store.put_action(&key(round), &bytes[..100]).unwrap();
            let path = store
                .ensure_snapshot(&Digest::of(&[round]), |dir: &Path| {
                    std::fs::create_dir(dir.join("sub"))?;
                    std::fs::write(dir.join("sub/file"), &bytes)
                })
                .unwrap();
            assert_eq!(std::fs::read(path.join("sub/file")).unwrap(), bytes);
            assert_eq!(store.get_action(&key(round)).unwrap(), &bytes[..100]);
        }
    }

    fn check_hammered(store: &Store) {
        for round in 0..20u8 {
            let bytes = vec![round; 64 * 1024];
            assert_eq!(store.read_blob(&Digest::of(&bytes)).unwrap(), bytes);
            assert_eq!(store.get_action(&key(round)).unwrap(), &bytes[..100]);
            let snapshot = store.snapshot_path(&Digest::of(&[round])).unwrap();
            assert_eq!(std::fs::read(snapshot.join("sub/file")).unwrap(), bytes);
        }
        let usage = store.usage().unwrap();
        assert_eq!(usage.blobs.count, 20);
        assert_eq!(usage.actions.count, 20);
        assert_eq!(usage.snapshots.count, 20);
    }

    const CHILD_ROOT: &str = "GRAPHBUILD_STORE_TEST_ROOT";
    const CHILD_MODE: &str = "GRAPHBUILD_STORE_TEST_MODE";

    /// The body of the child processes spawned below. Run as a test (without the variables),
    /// it checks that a child really runs it: the filter matches, and the child's work lands.
    #[test]
    fn child_process_body() {
        let Some(root) = std::env::var_os(CHILD_ROOT) else {
            let dir = tempfile::tempdir().unwrap();
            let output = child(dir.path(), "hammer").output().unwrap();
            let stdout = String::from_utf8_lossy(&output.stdout);
            assert!(output.status.success(), "the child failed:\n{stdout}");
            assert!(
                stdout.contains("1 passed"),
                "the child ran no test:\n{stdout}"
            );
            check_hammered(&Store::open(dir.path()).unwrap());
            return;
        };
        let store = Store::open(Path::new(&root)).unwrap();
        match std::env::var(CHILD_MODE).as_deref() {
            Ok("hammer") => hammer(&store),
            Ok("die") => {
                // Leave temp files and a half-filled snapshot, then wait to be SIGKILLed.
                let temp = store.temp_dir().unwrap();
                std::fs::write(temp.path().join("partial"), b"half").unwrap();
                let _ =
                    store.ensure_snapshot(&Digest::of(b"never"), |dir: &Path| -> io::Result<()> {
                        std::fs::write(dir.join("half"), b"x")?;
                        println!("ready");
                        io::stdout().flush()?;
                        std::thread::sleep(std::time::Duration::from_secs(60));
                        Ok(())
                    });
            }
            other => panic!("unknown {CHILD_MODE}: {other:?}"),
        }
    }

    fn child(root: &Path, mode: &str) -> Command {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args([
                "--exact",
                "store::tests::child_process_body",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ROOT, root)
            .env(CHILD_MODE, mode);
        command
    }

    #[test]
    fn two_processes_writing_the_same_entries_agree() {
        let dir = tempfile::tempdir().unwrap();
        let children: Vec<_> = (0..3)
            .map(|_| child(dir.path(), "hammer").spawn().unwrap())
            .collect();
        for mut child in children {
            assert!(child.wait().unwrap().success());
        }
        let store = Store::open(dir.path()).unwrap();
        check_hammered(&store);
        // Every child cleaned up its scratch space.
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("tmp"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| {
                !store
                    .run_dir
                    .to_string_lossy()
                    .contains(name.trim_end_matches(".lock"))
            })
            .collect();
        assert_eq!(leftovers, Vec::<String>::new());
    }

    #[test]
    fn a_run_killed_with_sigkill_leaves_nothing_behind() {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let mut process = child(dir.path(), "die")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = io::BufReader::new(process.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("ready") {
            line.clear();
            assert!(
                stdout.read_line(&mut line).unwrap() > 0,
                "child exited early"
            );
        }
        // While it lives, another open must not touch its scratch space.
        let live = Store::open(dir.path()).unwrap();
        let run_dirs = |root: &Path| {
            std::fs::read_dir(root.join("tmp"))
                .unwrap()
                .map(|entry| entry.unwrap().path())
                .filter(|path| path.is_dir())
                .count()
        };
        assert_eq!(run_dirs(dir.path()), 2);
        drop(live);
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(process.id() as libc::pid_t, libc::SIGKILL) };
        process.wait().unwrap();
        assert_eq!(
            run_dirs(dir.path()),
            1,
            "the dead run's directory is still there before the next open"
        );
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            run_dirs(dir.path()),
            1,
            "only our own run directory remains"
        );
        assert_eq!(store.snapshot_path(&Digest::of(b"never")), None);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            2,
            "our dir and its lock"
        );
    }
}
