//! Extracting one layer into a fresh snapshot directory that will be an overlayfs lower
//! directory.
//!
//! One file on purpose: every path an entry can take (confinement to the root, whiteouts,
//! hard links, sparse data, the size limits and both digests) is checked by one reader, so no
//! entry kind can skip a check that another file holds.
//!
//! # What a layer becomes
//!
//! [`unpack_layer`] recognizes the compression by its magic bytes (gzip `1f 8b`, zstd
//! `28 b5 2f fd`, anything else is read as a plain tar) and turns OCI's deletion markers into
//! overlayfs's, so that stacking the snapshots as lower directories gives the image's
//! filesystem without ever merging layers by hand:
//!
//! | layer | snapshot |
//! |---|---|
//! | `dir/.wh.NAME` | character device 0/0 `dir/NAME` (an overlay whiteout) |
//! | `dir/.wh..wh..opq` | xattr `trusted.overlay.opaque=y` on `dir` (`user.overlay.opaque` when not root, for `userxattr` mounts) |
//!
//! Modes, numeric owners (when root), modification times, symlinks, hard links, extended
//! attributes (except overlay's own, which a layer has no business setting) are kept; device
//! nodes and fifos are created only when running as root, and counted as skipped otherwise.
//! Directory modes and times are applied last, since creating their children changes them.
//!
//! # Safety
//!
//! A layer comes from someone else and may be crafted to write outside the snapshot. Nothing
//! it contains can make this module write outside `dest`:
//!
//! - a path with a `..` component is refused, a leading `/` is dropped;
//! - every parent directory of an entry is checked with `lstat` as it is walked from `dest`
//!   down: a parent that is a symlink is refused (an earlier entry may have planted
//!   `dir -> /etc` or `dir -> ../../..`), a missing one is created as a real directory;
//! - the entry itself is created with calls that never follow a final symlink (`O_CREAT|O_EXCL
//!   |O_NOFOLLOW`, `mkdir`, `symlink`, `mknod`, `lchown`, `lsetxattr`, `utimensat` with
//!   `AT_SYMLINK_NOFOLLOW`); whatever was at that path before is removed first, and removing a
//!   symlink removes the link, not its target;
//! - symlinks are created with whatever target they carry (they are resolved later, inside the
//!   container, where `/` is the image's root) and are never followed here;
//! - a hard link must point at an entry extracted earlier from this same layer, reached through
//!   real directories only;
//! - deferred directory metadata is re-checked the same way before it is applied.
//!
//! Every refusal is an [`UnpackError::Unsafe`] naming the entry.
//!
//! # Integrity
//!
//! [`unpack_layer_checked`] hashes the blob as it is read (its *digest*) and the decompressed
//! tar stream as it is read (its *diff_id*), and drains both to the end once the archive's
//! end marker is reached, so trailing data is hashed too. A mismatch with what the manifest
//! (digest) or the image config (diff_id) claims is an error after the fact: the caller must
//! throw the directory away, which [`crate::store::Store::ensure_snapshot`] does for any
//! error. When anything goes wrong and the blob's own digest does not match either, the error
//! is [`UnpackError::DigestMismatch`]: the blob is corrupt, whatever else the tar reader said.
//!
//! # Bounded resources
//!
//! A layer may unpack to at most [`LayerCheck::max_bytes`]: the decompressed tar stream and
//! the sum of its files' sizes (holes included) are both counted, and crossing the limit stops
//! the extraction at once with [`UnpackError::TooLarge`] ([`max_layer_size`]: 10 GiB or 100
//! times the compressed size, whichever is larger, unless `GRAPHBUILD_MAX_LAYER_SIZE` says
//! otherwise). File contents are written sparsely: every run of 4 KiB of zeros, which is what
//! a GNU sparse entry's holes read as, becomes a hole (`lseek`), not allocated blocks.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;

use crate::decompress::decompressed;
use crate::digest::{Digest, DigestWriter};
use crate::layer::{OPAQUE_MARKER, WHITEOUT_PREFIX, is_overlay_xattr, set_xattr};

/// The environment variable that sets [`max_layer_size`] (bytes, or with a `K`, `M`, `G` or
/// `T` suffix, powers of 1024).
pub const MAX_LAYER_SIZE_ENV: &str = "GRAPHBUILD_MAX_LAYER_SIZE";

/// The floor of the default per-layer limit.
pub const DEFAULT_MAX_LAYER_SIZE: u64 = 10 << 30;

/// How many times its compressed size a layer may grow to by default, above the floor.
pub const DEFAULT_MAX_LAYER_RATIO: u64 = 100;

/// The most bytes a layer of `compressed_size` bytes may unpack to: `GRAPHBUILD_MAX_LAYER_SIZE`
/// when set (and valid), else the larger of 10 GiB and 100 times the compressed size.
pub fn max_layer_size(compressed_size: u64) -> u64 {
    if let Some(limit) = std::env::var(MAX_LAYER_SIZE_ENV)
        .ok()
        .and_then(|text| parse_size(&text))
    {
        return limit;
    }
    DEFAULT_MAX_LAYER_SIZE.max(compressed_size.saturating_mul(DEFAULT_MAX_LAYER_RATIO))
}

/// The environment variable that sets [`max_build_unpack`] (bytes, or with a suffix as above).
pub const MAX_BUILD_UNPACK_ENV: &str = "GRAPHBUILD_MAX_BUILD_UNPACK";

/// The default of [`max_build_unpack`]: 100 GiB.
pub const DEFAULT_MAX_BUILD_UNPACK: u64 = 100 << 30;

/// The most bytes of file content one build may unpack into new snapshots, all layers together:
/// `GRAPHBUILD_MAX_BUILD_UNPACK` when set (and valid), else 100 GiB. Each layer is limited to
/// what is left; layers unpacked at the same moment may together pass it by at most one layer
/// limit each.
pub fn max_build_unpack() -> u64 {
    std::env::var(MAX_BUILD_UNPACK_ENV)
        .ok()
        .and_then(|text| parse_size(&text))
        .unwrap_or(DEFAULT_MAX_BUILD_UNPACK)
}

/// `123`, `10K`, `512M`, `10G`, `1T` (powers of 1024, an optional trailing `B` or `iB`).
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let text = text
        .strip_suffix("iB")
        .or_else(|| text.strip_suffix('B'))
        .unwrap_or(text);
    let (number, shift) = match text.chars().last()? {
        'k' | 'K' => (&text[..text.len() - 1], 10),
        'm' | 'M' => (&text[..text.len() - 1], 20),
        'g' | 'G' => (&text[..text.len() - 1], 30),
        't' | 'T' => (&text[..text.len() - 1], 40),
        _ => (text, 0),
    };
    number
        .trim()
        .parse::<u64>()
        .ok()?
        .checked_mul(1u64 << shift)
}

/// What [`unpack_layer_checked`] verifies while it reads a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerCheck {
    /// The sha256 the blob (as stored, compressed) must have.
    pub digest: Option<Digest>,
    /// The sha256 the uncompressed tar stream must have.
    pub diff_id: Option<Digest>,
    /// The most bytes the tar stream, and the sum of its files' sizes, may reach.
    pub max_bytes: u64,
}

impl LayerCheck {
    /// Verify both digests of a layer of `size` compressed bytes, with the default limit.
    pub fn layer(digest: Digest, diff_id: Digest, size: u64) -> LayerCheck {
        LayerCheck {
            digest: Some(digest),
            diff_id: Some(diff_id),
            max_bytes: max_layer_size(size),
        }
    }
}

impl Default for LayerCheck {
    fn default() -> LayerCheck {
        LayerCheck {
            digest: None,
            diff_id: None,
            max_bytes: max_layer_size(0),
        }
    }
}

/// Hashes and counts what is read through it; past `limit`, reads fail and `exceeded` is set.
struct Hashing<R> {
    inner: R,
    hasher: DigestWriter,
    count: u64,
    limit: u64,
    exceeded: bool,
}

impl<R: Read> Hashing<R> {
    fn new(inner: R, limit: u64) -> Self {
        Hashing {
            inner,
            hasher: DigestWriter::new(),
            count: 0,
            limit,
            exceeded: false,
        }
    }

    /// Read to the end, hashing everything.
    fn drain(&mut self) -> io::Result<()> {
        io::copy(self, &mut io::sink()).map(|_| ())
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        if self.exceeded {
            return Err(io::Error::other("the layer is larger than the limit"));
        }
        let read = self.inner.read(buffer)?;
        self.hasher.update(&buffer[..read]);
        self.count += read as u64;
        if self.count > self.limit {
            self.exceeded = true;
            return Err(io::Error::other("the layer is larger than the limit"));
        }
        Ok(read)
    }
}

/// What an extraction did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Tar entries read (including the ones skipped).
    pub entries: u64,
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    /// `.wh.NAME` entries turned into overlay whiteouts.
    pub whiteouts: u64,
    /// `.wh..wh..opq` entries turned into opaque directories.
    pub opaque_directories: u64,
    /// Device nodes and fifos created.
    pub devices: u64,
    /// Device nodes and fifos skipped because this process is not root.
    pub skipped_devices: u64,
    /// Extended attributes this filesystem or user could not set.
    pub skipped_xattrs: u64,
    /// Bytes of file content written (holes included).
    pub bytes: u64,
    /// The sha256 of the blob as read (set by [`unpack_layer_checked`]).
    pub digest: Option<Digest>,
    /// The sha256 of the uncompressed tar stream, trailing data included.
    pub diff_id: Option<Digest>,
}

/// Why a layer could not be extracted.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum UnpackError {
    #[error("layer entry `{entry}` {reason}: the layer is malicious or corrupt")]
    #[diagnostic(
        code(graphbuild::unpack::unsafe_entry),
        help(
            "graphbuild never writes outside the snapshot it extracts into; rebuild or re-pull the base image from a source you trust"
        )
    )]
    Unsafe { entry: String, reason: String },

    #[error("cannot read the layer{}: the layer is malicious or corrupt", entry.as_ref().map(|entry| format!(" at entry `{entry}`")).unwrap_or_default())]
    #[diagnostic(
        code(graphbuild::unpack::corrupt),
        help("the blob is not a valid (gzip- or zstd-compressed) tar; pull the image again")
    )]
    Corrupt {
        entry: Option<String>,
        #[source]
        source: io::Error,
    },

    #[error("cannot {action} `{}` for layer entry `{entry}`", path.display())]
    #[diagnostic(code(graphbuild::unpack::io))]
    Io {
        entry: String,
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "layer entry `{entry}` is owned by uid {uid} gid {gid}, which this rootless build's user namespace does not map; {help}"
    )]
    #[diagnostic(code(graphbuild::unpack::unmapped_owner))]
    UnmappedOwner {
        entry: String,
        uid: u64,
        gid: u64,
        help: String,
    },

    #[error("layer entry `{entry}` is a whiteout, and creating overlay whiteouts needs root")]
    #[diagnostic(
        code(graphbuild::unpack::needs_root),
        help(
            "run graphbuild as root (or in a user namespace where it is root) to use base images"
        )
    )]
    NeedsRoot { entry: String },

    #[error("the layer blob hashes to {actual}, not to its digest {expected}: the blob is corrupt")]
    #[diagnostic(
        code(graphbuild::unpack::digest_mismatch),
        help("the blob is removed from the store; the next build fetches or rebuilds it")
    )]
    DigestMismatch { expected: Digest, actual: Digest },

    #[error(
        "the layer's uncompressed content hashes to {actual}, not to the diff_id {expected} its image config claims: the layer is refused"
    )]
    #[diagnostic(
        code(graphbuild::unpack::diff_id_mismatch),
        help(
            "the image is malformed or forged (a layer claiming another layer's identity); nothing of it was stored. Use a base image from a source you trust"
        )
    )]
    DiffIdMismatch { expected: Digest, actual: Digest },

    #[error("the layer unpacks to more than {limit} bytes, the limit per layer")]
    #[diagnostic(
        code(graphbuild::unpack::too_large),
        help(
            "a compression or sparse-file bomb, or a very large layer: if the image is legitimate, raise the limit with GRAPHBUILD_MAX_LAYER_SIZE (for example 64G)"
        )
    )]
    TooLarge { limit: u64 },
}

fn corrupt(source: io::Error) -> UnpackError {
    UnpackError::Corrupt {
        entry: None,
        source,
    }
}

/// Where an unsafe path ends up: a readable name for errors.
fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn unsafe_entry(entry: &[u8], reason: impl Into<String>) -> UnpackError {
    UnpackError::Unsafe {
        entry: lossy(entry),
        reason: reason.into(),
    }
}

fn io_error<'a>(
    entry: &'a [u8],
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> UnpackError + 'a {
    move |source| UnpackError::Io {
        entry: lossy(entry),
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Splits an archive path into its normal components: drops a leading `/`, empty and `.`
/// components; refuses `..`.
fn components<'a>(entry: &[u8], path: &'a [u8], what: &str) -> Result<Vec<&'a [u8]>, UnpackError> {
    let mut parts = Vec::new();
    for part in path.split(|byte| *byte == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                return Err(unsafe_entry(
                    entry,
                    format!("has a `..` component in its {what}"),
                ));
            }
            normal => parts.push(normal),
        }
    }
    Ok(parts)
}

fn join(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(&b'/')
}

fn path_under(dest: &Path, parts: &[&[u8]]) -> PathBuf {
    let mut path = dest.to_path_buf();
    for part in parts {
        path.push(OsStr::from_bytes(part));
    }
    path
}

/// Walks `parts` from `dest` with `lstat`: every component must be a real directory (or be
/// missing, when `create` is set, and is then created). Returns the full path.
fn walk_directories(
    dest: &Path,
    entry: &[u8],
    parts: &[&[u8]],
    create: bool,
) -> Result<PathBuf, UnpackError> {
    let mut path = dest.to_path_buf();
    for (depth, part) in parts.iter().enumerate() {
        path.push(OsStr::from_bytes(part));
        match fs::symlink_metadata(&path) {
            Ok(metadata) if metadata.is_dir() => {}
            Ok(metadata) if metadata.file_type().is_symlink() => {
                return Err(unsafe_entry(
                    entry,
                    format!(
                        "goes through `{}`, which is a symlink",
                        lossy(&join(&parts[..=depth]))
                    ),
                ));
            }
            Ok(_) => {
                return Err(unsafe_entry(
                    entry,
                    format!(
                        "goes through `{}`, which is not a directory",
                        lossy(&join(&parts[..=depth]))
                    ),
                ));
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound && create => {
                fs::create_dir(&path).map_err(io_error(entry, "create directory", &path))?;
            }
            Err(error) => return Err(io_error(entry, "inspect", &path)(error)),
        }
    }
    Ok(path)
}

/// Removes whatever is at `path` (never following a symlink), unless it is a directory and
/// `keep_directory` is set. Returns whether a directory was kept.
fn clear(path: &Path, entry: &[u8], keep_directory: bool) -> Result<bool, UnpackError> {
    match fs::symlink_metadata(path) {
        Ok(metadata) if metadata.is_dir() => {
            if keep_directory {
                return Ok(true);
            }
            fs::remove_dir_all(path).map_err(io_error(entry, "remove", path))?;
            Ok(false)
        }
        Ok(_) => {
            fs::remove_file(path).map_err(io_error(entry, "remove", path))?;
            Ok(false)
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(io_error(entry, "inspect", path)(error)),
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn set_times(path: &Path, mtime: &TimeSpec) -> io::Result<()> {
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        mtime,
        mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(io::Error::from)
}

/// Metadata from an entry's header and PAX records.
struct EntryMetadata {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: TimeSpec,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn read_metadata<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<EntryMetadata> {
    let header = entry.header();
    let mode = header.mode()? & 0o7777;
    // Some writers leave these fields blank; blank means 0, as GNU tar reads it.
    let mut uid = header.uid().unwrap_or(0);
    let mut gid = header.gid().unwrap_or(0);
    let mut mtime_seconds = header
        .mtime()
        .ok()
        .and_then(|mtime| i64::try_from(mtime).ok())
        .unwrap_or(0);
    let mut mtime_nanos = 0i64;
    let mut xattrs = Vec::new();
    if let Some(extensions) = entry.pax_extensions()? {
        for extension in extensions {
            let extension = extension?;
            let key = extension.key_bytes();
            let value = extension.value_bytes();
            let number = || {
                std::str::from_utf8(value)
                    .ok()
                    .and_then(|text| text.parse::<u64>().ok())
            };
            match key {
                b"uid" => uid = number().unwrap_or(uid),
                b"gid" => gid = number().unwrap_or(gid),
                b"mtime" => {
                    if let Ok(text) = std::str::from_utf8(value) {
                        let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
                        if let Ok(seconds) = whole.parse::<i64>() {
                            mtime_seconds = seconds;
                            let digits: String = fraction.chars().take(9).collect();
                            mtime_nanos = format!("{digits:0<9}").parse::<i64>().unwrap_or(0);
                        }
                    }
                }
                _ => {
                    if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                        xattrs.push((name.to_vec(), value.to_vec()));
                    }
                }
            }
        }
    }
    Ok(EntryMetadata {
        mode,
        uid,
        gid,
        mtime: TimeSpec::new(mtime_seconds, mtime_nanos),
        xattrs,
    })
}

/// Extracts one layer (gzip, zstd or plain tar, detected) into `dest`, a fresh snapshot
/// directory, turning `.wh.` entries into overlay whiteouts, with the default size limit and
/// no digest checks. See the module docs for what is refused.
pub fn unpack_layer(blob: impl Read, dest: &Path) -> Result<UnpackStats, UnpackError> {
    unpack_layer_checked(blob, dest, &LayerCheck::default())
}

/// [`unpack_layer`], verifying the blob's digest and diff_id and bounding its size as `check`
/// says. On an error `dest` holds a partial extraction that the caller must delete.
pub fn unpack_layer_checked(
    blob: impl Read,
    dest: &Path,
    check: &LayerCheck,
) -> Result<UnpackStats, UnpackError> {
    let mut compressed = Hashing::new(blob, u64::MAX);
    let result = (|| {
        let stream = decompressed(&mut compressed).map_err(corrupt)?;
        let mut tar_stream = Hashing::new(stream, check.max_bytes);
        let extracted = extract(&mut tar_stream, dest, check.max_bytes).and_then(|stats| {
            // Whatever follows the end-of-archive marker is part of the layer's content too.
            tar_stream.drain().map_err(corrupt)?;
            Ok(stats)
        });
        if tar_stream.exceeded {
            return Err(UnpackError::TooLarge {
                limit: check.max_bytes,
            });
        }
        let mut stats = extracted?;
        stats.diff_id = Some(tar_stream.hasher.clone().finish());
        Ok(stats)
    })();
    finish_check(compressed, check, result)
}

/// The blob's digest and diff_id, by reading it through (nothing is written), within the
/// limit of `check`, which also says what both must be.
pub fn verify_layer(blob: impl Read, check: &LayerCheck) -> Result<UnpackStats, UnpackError> {
    let mut compressed = Hashing::new(blob, u64::MAX);
    let result = (|| {
        let stream = decompressed(&mut compressed).map_err(corrupt)?;
        let mut tar_stream = Hashing::new(stream, check.max_bytes);
        let drained = tar_stream.drain();
        if tar_stream.exceeded {
            return Err(UnpackError::TooLarge {
                limit: check.max_bytes,
            });
        }
        drained.map_err(corrupt)?;
        Ok(UnpackStats {
            diff_id: Some(tar_stream.hasher.clone().finish()),
            ..UnpackStats::default()
        })
    })();
    finish_check(compressed, check, result)
}

/// Drain and hash the rest of the blob; a wrong blob digest wins over any other outcome.
fn finish_check<R: Read>(
    mut compressed: Hashing<R>,
    check: &LayerCheck,
    result: Result<UnpackStats, UnpackError>,
) -> Result<UnpackStats, UnpackError> {
    let drained = compressed.drain();
    let digest = compressed.hasher.finish();
    if let Some(expected) = check.digest
        && drained.is_ok()
        && expected != digest
    {
        return Err(UnpackError::DigestMismatch {
            expected,
            actual: digest,
        });
    }
    let mut stats = result?;
    drained.map_err(corrupt)?;
    if let (Some(expected), Some(actual)) = (check.diff_id, stats.diff_id)
        && expected != actual
    {
        return Err(UnpackError::DiffIdMismatch { expected, actual });
    }
    stats.digest = Some(digest);
    Ok(stats)
}

/// A whiteout entry: the opaque marker on `parent_path`, or a 0/0 character device hiding
/// `hidden` there. `trusted`: opaque markers are `trusted.overlay.*` (root outside a user
/// namespace), else `user.overlay.*`.
fn apply_whiteout(
    name: &[u8],
    hidden: &[u8],
    parent_path: &Path,
    entry_name: &[u8],
    trusted: bool,
    stats: &mut UnpackStats,
) -> Result<(), UnpackError> {
    if name == OPAQUE_MARKER.as_bytes() {
        let attribute: &[u8] = if trusted {
            b"trusted.overlay.opaque"
        } else {
            b"user.overlay.opaque"
        };
        set_xattr(parent_path, attribute, b"y").map_err(io_error(
            entry_name,
            "mark opaque",
            parent_path,
        ))?;
        stats.opaque_directories += 1;
        return Ok(());
    }
    if hidden.is_empty() || hidden == b"." || hidden == b".." {
        return Err(unsafe_entry(
            entry_name,
            "is a whiteout without a valid name",
        ));
    }
    let hidden_path = parent_path.join(OsStr::from_bytes(hidden));
    clear(&hidden_path, entry_name, false)?;
    match nix::sys::stat::mknod(
        &hidden_path,
        SFlag::S_IFCHR,
        Mode::empty(),
        nix::sys::stat::makedev(0, 0),
    ) {
        Ok(()) => {}
        Err(nix::errno::Errno::EPERM) => {
            return Err(UnpackError::NeedsRoot {
                entry: lossy(entry_name),
            });
        }
        Err(errno) => {
            return Err(io_error(entry_name, "create whiteout", &hidden_path)(
                errno.into(),
            ));
        }
    }
    stats.whiteouts += 1;
    Ok(())
}

fn extract(stream: impl Read, dest: &Path, max_bytes: u64) -> Result<UnpackStats, UnpackError> {
    let root = is_root();
    // Root of a user namespace (a rootless build): owners can be set within the mapped ids,
    // but opaque markers are `user.overlay.*` (mounts use `userxattr`) and device nodes
    // cannot be created.
    let userns = root && crate::rootless::in_user_namespace();
    fs::create_dir_all(dest).map_err(io_error(b"", "create directory", dest))?;
    let mut archive = tar::Archive::new(stream);
    let mut stats = UnpackStats::default();
    let mut extracted: HashSet<Vec<u8>> = HashSet::new();
    // Directory metadata, applied at the end: (parts, mode, uid, gid, mtime).
    let mut directories: Vec<(Vec<u8>, EntryMetadata)> = Vec::new();

    for item in archive.entries().map_err(corrupt)? {
        let mut item = item.map_err(corrupt)?;
        stats.entries += 1;
        let raw_path = item.path_bytes().into_owned();
        let entry_name = raw_path.as_slice();
        let entry_type = item.header().entry_type();
        if matches!(
            entry_type,
            tar::EntryType::XGlobalHeader
                | tar::EntryType::XHeader
                | tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink
        ) {
            continue;
        }
        let parts = components(entry_name, entry_name, "path")?;
        let Some((name, parents)) = parts.split_last() else {
            // The layer's root (`./`): the snapshot directory already exists.
            continue;
        };
        let parent_path = walk_directories(dest, entry_name, parents, true)?;
        let full_path = parent_path.join(OsStr::from_bytes(name));

        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            apply_whiteout(
                name,
                hidden,
                &parent_path,
                entry_name,
                root && !userns,
                &mut stats,
            )?;
            continue;
        }

        let metadata = read_metadata(&mut item).map_err(|source| UnpackError::Corrupt {
            entry: Some(lossy(entry_name)),
            source,
        })?;
        let mut apply_metadata = true;
        match entry_type {
            tar::EntryType::Directory => {
                if !clear(&full_path, entry_name, true)? {
                    fs::create_dir(&full_path).map_err(io_error(
                        entry_name,
                        "create directory",
                        &full_path,
                    ))?;
                }
                stats.directories += 1;
                extracted.insert(join(&parts));
                set_xattrs(&full_path, entry_name, &metadata.xattrs, &mut stats)?;
                directories.push((join(&parts), metadata));
                continue;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                // The size with holes (a sparse entry's real size), known before reading.
                if stats.bytes.saturating_add(item.size()) > max_bytes {
                    return Err(UnpackError::TooLarge { limit: max_bytes });
                }
                clear(&full_path, entry_name, false)?;
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&full_path)
                    .map_err(io_error(entry_name, "create", &full_path))?;
                let copied = copy_data(&mut item, &mut file).map_err(|error| match error {
                    CopyError::Read(source) => UnpackError::Corrupt {
                        entry: Some(lossy(entry_name)),
                        source,
                    },
                    CopyError::Write(source) => io_error(entry_name, "write", &full_path)(source),
                })?;
                stats.bytes += copied;
                stats.files += 1;
            }
            tar::EntryType::Symlink => {
                let target = item
                    .link_name_bytes()
                    .ok_or_else(|| unsafe_entry(entry_name, "is a symlink without a target"))?
                    .into_owned();
                clear(&full_path, entry_name, false)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &full_path)
                    .map_err(io_error(entry_name, "create symlink", &full_path))?;
                stats.symlinks += 1;
            }
            tar::EntryType::Link => {
                let target = item
                    .link_name_bytes()
                    .ok_or_else(|| unsafe_entry(entry_name, "is a hard link without a target"))?
                    .into_owned();
                let target_parts = components(entry_name, &target, "hard link target")?;
                let Some((_, target_parents)) = target_parts.split_last() else {
                    return Err(unsafe_entry(
                        entry_name,
                        "is a hard link to the layer's root",
                    ));
                };
                if !extracted.contains(&join(&target_parts)) {
                    return Err(unsafe_entry(
                        entry_name,
                        format!(
                            "is a hard link to `{}`, which is not an earlier entry of this layer",
                            lossy(&target)
                        ),
                    ));
                }
                walk_directories(dest, entry_name, target_parents, false)?;
                let target_path = path_under(dest, &target_parts);
                match fs::symlink_metadata(&target_path) {
                    Ok(found) if found.is_dir() => {
                        return Err(unsafe_entry(
                            entry_name,
                            format!("is a hard link to the directory `{}`", lossy(&target)),
                        ));
                    }
                    Ok(_) => {}
                    Err(error) => return Err(io_error(entry_name, "inspect", &target_path)(error)),
                }
                if target_path == full_path {
                    continue;
                }
                clear(&full_path, entry_name, false)?;
                fs::hard_link(&target_path, &full_path).map_err(io_error(
                    entry_name,
                    "create hard link",
                    &full_path,
                ))?;
                stats.hardlinks += 1;
                // The inode's metadata is the target's.
                apply_metadata = false;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                if !root || (userns && entry_type != tar::EntryType::Fifo) {
                    stats.skipped_devices += 1;
                    continue;
                }
                let kind = match entry_type {
                    tar::EntryType::Char => SFlag::S_IFCHR,
                    tar::EntryType::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                let header = item.header();
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                clear(&full_path, entry_name, false)?;
                nix::sys::stat::mknod(
                    &full_path,
                    kind,
                    Mode::from_bits_truncate(0o600),
                    nix::sys::stat::makedev(u64::from(major), u64::from(minor)),
                )
                .map_err(|errno| {
                    io_error(entry_name, "create device node", &full_path)(errno.into())
                })?;
                stats.devices += 1;
            }
            // Anything else (GNU volume labels, Solaris ACLs…) has no place in a root filesystem.
            _ => continue,
        }
        extracted.insert(join(&parts));
        if apply_metadata {
            let is_symlink = entry_type == tar::EntryType::Symlink;
            if root {
                lchown(&full_path, metadata.uid, metadata.gid)
                    .map_err(chown_error(entry_name, &full_path, &metadata))?;
            }
            if !is_symlink {
                fs::set_permissions(&full_path, fs::Permissions::from_mode(metadata.mode))
                    .map_err(io_error(entry_name, "set the mode of", &full_path))?;
            }
            set_xattrs(&full_path, entry_name, &metadata.xattrs, &mut stats)?;
            set_times(&full_path, &metadata.mtime).map_err(io_error(
                entry_name,
                "set the times of",
                &full_path,
            ))?;
        }
    }

    apply_directory_metadata(dest, directories, root)?;
    Ok(stats)
}

/// The directories' owners, modes and times, applied last: creating their children changed
/// their times. Deepest first, and re-checked: a later entry may have replaced a directory or
/// one of its parents.
fn apply_directory_metadata(
    dest: &Path,
    directories: Vec<(Vec<u8>, EntryMetadata)>,
    root: bool,
) -> Result<(), UnpackError> {
    let mut directories = directories;
    directories.sort_by_key(|(path, _)| {
        std::cmp::Reverse(path.iter().filter(|byte| **byte == b'/').count())
    });
    for (joined, metadata) in directories {
        let parts: Vec<&[u8]> = joined.split(|byte| *byte == b'/').collect();
        let Ok(path) = walk_directories(dest, &joined, &parts, false) else {
            // Replaced by a later entry (a file, a symlink) or removed: nothing to apply.
            continue;
        };
        if root {
            lchown(&path, metadata.uid, metadata.gid)
                .map_err(chown_error(&joined, &path, &metadata))?;
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(metadata.mode)).map_err(io_error(
            &joined,
            "set the mode of",
            &path,
        ))?;
        set_times(&path, &metadata.mtime).map_err(io_error(&joined, "set the times of", &path))?;
    }
    Ok(())
}

/// A failed `lchown`: in a user namespace, EINVAL means the owner is not mapped.
fn chown_error<'a>(
    entry: &'a [u8],
    path: &'a Path,
    metadata: &'a EntryMetadata,
) -> impl FnOnce(io::Error) -> UnpackError + 'a {
    move |source| {
        if source.raw_os_error() == Some(libc::EINVAL) && crate::rootless::in_user_namespace() {
            UnpackError::UnmappedOwner {
                entry: lossy(entry),
                uid: metadata.uid,
                gid: metadata.gid,
                help: crate::rootless::chown_error_help(),
            }
        } else {
            io_error(entry, "change the owner of", path)(source)
        }
    }
}

fn lchown(path: &Path, uid: u64, gid: u64) -> io::Result<()> {
    let uid = u32::try_from(uid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "uid out of range"))?;
    let gid = u32::try_from(gid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "gid out of range"))?;
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
}

fn set_xattrs(
    path: &Path,
    entry: &[u8],
    xattrs: &[(Vec<u8>, Vec<u8>)],
    stats: &mut UnpackStats,
) -> Result<(), UnpackError> {
    for (name, value) in xattrs {
        if is_overlay_xattr(name) {
            // A layer must not steer overlayfs (opaque, redirect, metacopy…).
            stats.skipped_xattrs += 1;
            continue;
        }
        match set_xattr(path, name, value) {
            Ok(()) => {}
            Err(error) if matches!(error.raw_os_error(), Some(libc::ENOTSUP | libc::EPERM)) => {
                stats.skipped_xattrs += 1
            }
            Err(error) => return Err(io_error(entry, "set an extended attribute on", path)(error)),
        }
    }
    Ok(())
}

enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

/// The granularity of holes: a run of this many zero bytes is skipped, not written.
const HOLE: usize = 4096;

/// Copy a file's content, leaving holes where it holds runs of zeros (a sparse entry's holes
/// read as zeros): `lseek` over them, and set the length at the end.
fn copy_data(reader: &mut impl Read, file: &mut fs::File) -> Result<u64, CopyError> {
    use std::io::{Seek, SeekFrom};
    let mut buffer = vec![0u8; 128 * 1024];
    let mut total = 0u64;
    let mut hole = 0u64;
    loop {
        let read = match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(CopyError::Read(error)),
        };
        for chunk in buffer[..read].chunks(HOLE) {
            if chunk.len() == HOLE && is_zero(chunk) {
                hole += chunk.len() as u64;
                continue;
            }
            if hole > 0 {
                let offset = i64::try_from(hole)
                    .map_err(|_| CopyError::Write(io::Error::other("hole too large")))?;
                file.seek(SeekFrom::Current(offset))
                    .map_err(CopyError::Write)?;
                hole = 0;
            }
            file.write_all(chunk).map_err(CopyError::Write)?;
        }
        total += read as u64;
    }
    if hole > 0 {
        file.set_len(total).map_err(CopyError::Write)?;
    }
    Ok(total)
}

fn is_zero(bytes: &[u8]) -> bool {
    static ZEROS: [u8; HOLE] = [0; HOLE];
    // A slice comparison is a `memcmp`: fast even in unoptimized builds.
    bytes.len() <= HOLE && bytes == &ZEROS[..bytes.len()]
}
