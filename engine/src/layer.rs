//! Turning a step's filesystem change (an overlayfs upper directory) into a deterministic,
//! compressed OCI layer.
//!
//! Long because it is a format writer: the entry order, metadata clamping, whiteout encoding
//! and compression that decide a layer's bytes must stay together to stay reproducible.
//!
//! # One pass
//!
//! [`write_layer_from_upper`] walks the upper directory once, sorts what it found, and streams
//! the tar through two hashers and the compressor straight into a temporary file next to its
//! destination:
//!
//! ```text
//! tar writer → sha256 (diff_id) → gzip | zstd | nothing → sha256 (digest) + byte count → file
//! ```
//!
//! The file is renamed to `OUT_DIR/<hex digest>` once everything succeeded. Nothing is read
//! twice and nothing is buffered whole. `ruzstd`'s encoder pulls from a reader instead of being
//! pushed into, so for zstd the tar is handed over through a bounded channel to a compressor
//! thread.
//!
//! # Determinism
//!
//! The same tree gives the same bytes, wherever and whenever it is archived:
//!
//! - entries are sorted by their path's bytes (a parent always precedes its children);
//! - headers are USTAR, with a PAX extended header only where a value does not fit (paths or
//!   link targets over 100 bytes, uid/gid over 2097151, files of 8 GiB or more) and for
//!   extended attributes (`SCHILY.xattr.*`, sorted);
//! - owners are numeric (no user or group names), modification times are whole seconds clamped
//!   to `source_date_epoch` (a later time becomes the epoch), access and change times are not
//!   recorded;
//! - gzip has a zero header mtime, no file name and a fixed level ([`GZIP_LEVEL`]); zstd uses
//!   `ruzstd`'s only level (roughly zstd's level 1).
//!
//! # Overlay to OCI
//!
//! An overlayfs upper directory records deletions its own way; the OCI layer format has its own:
//!
//! | upper directory | layer |
//! |---|---|
//! | character device 0/0 `dir/NAME` (a whiteout) | empty file `dir/.wh.NAME` |
//! | directory with xattr `trusted.overlay.opaque=y` (or `user.overlay.opaque=y`) | `dir/` and an empty file `dir/.wh..wh..opq` |
//!
//! Overlay's own extended attributes (`trusted.overlay.*`, `user.overlay.*`) never reach the
//! layer; all others (`security.capability`, …) do. Files with several links inside the upper
//! directory become one file and tar hard links to its first path. Overlay features that leave
//! data outside the upper directory (`metacopy`, `redirect_dir`) must be off: a file carrying
//! their xattrs is an error rather than a silently incomplete layer. Sockets are skipped, as
//! Docker does.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use crate::digest::{Digest, DigestWriter};
use crate::oci::media;

/// The gzip level used for every gzip layer (zlib's default). Changing it changes every digest.
pub const GZIP_LEVEL: u32 = 6;

/// The prefix of a whiteout file in a layer.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// The name of the opaque-directory marker in a layer.
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// How a layer is compressed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Compression {
    #[default]
    Gzip,
    Zstd,
    None,
}

impl Compression {
    /// The OCI media type of a layer compressed this way.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::Gzip => media::OCI_LAYER_GZIP,
            Compression::Zstd => media::OCI_LAYER_ZSTD,
            Compression::None => media::OCI_LAYER_TAR,
        }
    }
}

/// What decides a layer's bytes besides the files themselves.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct LayerOptions {
    /// Modification times later than this (seconds since 1970) are recorded as this.
    pub source_date_epoch: i64,
    pub compression: Compression,
}

/// A layer written to disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerBlob {
    /// sha256 of the compressed blob.
    pub digest: Digest,
    /// sha256 of the uncompressed tar.
    pub diff_id: Digest,
    /// Size of the compressed blob in bytes.
    pub size: u64,
    pub media_type: &'static str,
    /// `OUT_DIR/<hex digest>`.
    pub path: PathBuf,
}

/// Why a layer could not be written.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum LayerError {
    #[error("cannot {action} `{}` while writing a layer", path.display())]
    #[diagnostic(code(graphbuild::layer::io))]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("`{}` has a name a layer reserves for deletions (`.wh.`)", path.display())]
    #[diagnostic(
        code(graphbuild::layer::reserved_name),
        help("files whose names start with `.wh.` cannot be stored in an OCI layer; rename it")
    )]
    ReservedName { path: PathBuf },

    #[error("`{}` carries the overlay attribute `{attribute}`, whose data lives outside the upper directory", path.display())]
    #[diagnostic(
        code(graphbuild::layer::overlay_feature),
        help(
            "mount the overlay with `metacopy=off,redirect_dir=off` so the upper directory is a complete change set"
        )
    )]
    OverlayFeature { path: PathBuf, attribute: String },

    #[error("`{}` has an extended attribute whose name is not UTF-8", path.display())]
    #[diagnostic(
        code(graphbuild::layer::xattr_name),
        help("PAX headers can only carry UTF-8 attribute names")
    )]
    NonUtf8Xattr { path: PathBuf },

    #[error("`{}` changed size while it was being archived", path.display())]
    #[diagnostic(
        code(graphbuild::layer::changed),
        help("nothing may write to a step's filesystem while its layer is written")
    )]
    FileChanged { path: PathBuf },

    #[error("{} changed in the build context while building", path.display())]
    #[diagnostic(
        code(graphbuild::layer::source_changed),
        help("do not edit the context during a build; run the build again")
    )]
    SourceChanged { path: PathBuf },

    #[error("the zstd compressor stopped unexpectedly")]
    #[diagnostic(code(graphbuild::layer::zstd))]
    Compressor,
}

fn io_error<'path>(
    action: &'static str,
    path: &'path Path,
) -> impl FnOnce(io::Error) -> LayerError + 'path {
    move |source| LayerError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

// ---------------------------------------------------------------------------------------------
// Extended attributes (shared with `unpack`)
// ---------------------------------------------------------------------------------------------

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// All extended attributes of `path` (not following a final symlink), sorted by name.
pub(crate) fn list_xattrs(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let path_c = c_path(path)?;
    let names = loop {
        // SAFETY: a null buffer with size 0 asks for the needed size.
        let needed = unsafe { libc::llistxattr(path_c.as_ptr(), std::ptr::null_mut(), 0) };
        if needed < 0 {
            let error = io::Error::last_os_error();
            return match error.raw_os_error() {
                Some(libc::ENOTSUP) => Ok(Vec::new()),
                _ => Err(error),
            };
        }
        if needed == 0 {
            return Ok(Vec::new());
        }
        let mut buffer = vec![0u8; needed as usize];
        // SAFETY: the buffer is valid for `buffer.len()` bytes.
        let got =
            unsafe { libc::llistxattr(path_c.as_ptr(), buffer.as_mut_ptr().cast(), buffer.len()) };
        if got < 0 {
            let error = io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::ERANGE) {
                continue;
            }
            return Err(error);
        }
        buffer.truncate(got as usize);
        break buffer;
    };
    let mut attributes = Vec::new();
    for name in names
        .split(|byte| *byte == 0)
        .filter(|name| !name.is_empty())
    {
        let name_c = CString::new(name)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "xattr name"))?;
        let value = loop {
            // SAFETY: as above.
            let needed = unsafe {
                libc::lgetxattr(path_c.as_ptr(), name_c.as_ptr(), std::ptr::null_mut(), 0)
            };
            if needed < 0 {
                let error = io::Error::last_os_error();
                if error.raw_os_error() == Some(libc::ENODATA) {
                    break None;
                }
                return Err(error);
            }
            let mut buffer = vec![0u8; needed as usize];
            // SAFETY: the buffer is valid for `buffer.len()` bytes.
            let got = unsafe {
                libc::lgetxattr(
                    path_c.as_ptr(),
                    name_c.as_ptr(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                )
            };
            if got < 0 {
                let error = io::Error::last_os_error();
                match error.raw_os_error() {
                    Some(libc::ERANGE) => continue,
                    Some(libc::ENODATA) => break None,
                    _ => return Err(error),
                }
            }
            buffer.truncate(got as usize);
            break Some(buffer);
        };
        if let Some(value) = value {
            attributes.push((name.to_vec(), value));
        }
    }
    attributes.sort();
    Ok(attributes)
}

/// Sets one extended attribute on `path`, not following a final symlink.
pub(crate) fn set_xattr(path: &Path, name: &[u8], value: &[u8]) -> io::Result<()> {
    let path_c = c_path(path)?;
    let name_c = CString::new(name).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "xattr name contains a NUL byte",
        )
    })?;
    // SAFETY: all pointers are valid for the given lengths.
    let result = unsafe {
        libc::lsetxattr(
            path_c.as_ptr(),
            name_c.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Removes one extended attribute of `path`, not following a final symlink.
pub(crate) fn remove_xattr(path: &Path, name: &[u8]) -> io::Result<()> {
    let path_c = c_path(path)?;
    let name_c = CString::new(name).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "xattr name contains a NUL byte",
        )
    })?;
    // SAFETY: both pointers are valid NUL-terminated strings.
    if unsafe { libc::lremovexattr(path_c.as_ptr(), name_c.as_ptr()) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Overlay's own attributes, which never belong in a layer.
pub(crate) fn is_overlay_xattr(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.")
}

// ---------------------------------------------------------------------------------------------
// Scanning the upper directory
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
enum EntryKind {
    Directory,
    File {
        size: u64,
        device: u64,
        inode: u64,
        links: u64,
        /// The blake3 the content must have (a build context file hashed at plan time).
        expect: Option<[u8; 32]>,
    },
    HardLink {
        target: Vec<u8>,
    },
    Symlink {
        target: Vec<u8>,
    },
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
    /// `.wh.NAME` or `.wh..wh..opq`: an empty regular file.
    Whiteout,
}

#[derive(Debug)]
struct Entry {
    /// The path in the layer, without a trailing slash.
    name: Vec<u8>,
    /// Where the content is on disk (files only matter).
    source: PathBuf,
    kind: EntryKind,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn scan(upper: &Path, epoch: i64) -> Result<Vec<Entry>, LayerError> {
    let clamp = |mtime: i64| -> u64 { mtime.min(epoch).max(0) as u64 };
    let mut entries = Vec::new();
    for item in walkdir::WalkDir::new(upper)
        .min_depth(1)
        .follow_links(false)
    {
        let item = item.map_err(|error| {
            let path = error.path().unwrap_or(upper).to_path_buf();
            io_error("read", &path)(io::Error::other(error))
        })?;
        let source = item.path().to_path_buf();
        let relative = source
            .strip_prefix(upper)
            .unwrap_or(&source)
            .as_os_str()
            .as_bytes()
            .to_vec();
        let metadata = fs::symlink_metadata(&source).map_err(io_error("inspect", &source))?;
        let file_type = metadata.file_type();
        let base_name = item.file_name().as_bytes();
        if base_name.starts_with(WHITEOUT_PREFIX.as_bytes()) {
            return Err(LayerError::ReservedName { path: source });
        }
        let rdev = metadata.rdev();
        if file_type.is_char_device() && rdev == 0 {
            let mut name = parent_prefix(&relative);
            name.extend_from_slice(WHITEOUT_PREFIX.as_bytes());
            name.extend_from_slice(base_name);
            entries.push(Entry {
                name,
                source,
                kind: EntryKind::Whiteout,
                mode: 0,
                uid: 0,
                gid: 0,
                mtime: clamp(metadata.mtime()),
                xattrs: Vec::new(),
            });
            continue;
        }
        if file_type.is_socket() {
            continue;
        }
        let all_xattrs =
            list_xattrs(&source).map_err(io_error("read the extended attributes of", &source))?;
        let mut opaque = false;
        let mut xattrs = Vec::new();
        for (name, value) in all_xattrs {
            if is_overlay_xattr(&name) {
                let suffix = name
                    .splitn(2, |byte| *byte == b'.')
                    .nth(1)
                    .unwrap_or_default();
                match suffix {
                    b"overlay.opaque" => opaque |= value == b"y",
                    b"overlay.metacopy" | b"overlay.redirect" => {
                        return Err(LayerError::OverlayFeature {
                            path: source,
                            attribute: String::from_utf8_lossy(&name).into_owned(),
                        });
                    }
                    _ => {}
                }
                continue;
            }
            if std::str::from_utf8(&name).is_err() {
                return Err(LayerError::NonUtf8Xattr { path: source });
            }
            xattrs.push((name, value));
        }
        let kind = if file_type.is_dir() {
            EntryKind::Directory
        } else if file_type.is_file() {
            EntryKind::File {
                size: metadata.len(),
                device: metadata.dev(),
                inode: metadata.ino(),
                links: metadata.nlink(),
                expect: None,
            }
        } else if file_type.is_symlink() {
            let target = fs::read_link(&source).map_err(io_error("read the symlink", &source))?;
            EntryKind::Symlink {
                target: target.as_os_str().as_bytes().to_vec(),
            }
        } else if file_type.is_char_device() {
            EntryKind::CharDevice {
                major: libc::major(rdev),
                minor: libc::minor(rdev),
            }
        } else if file_type.is_block_device() {
            EntryKind::BlockDevice {
                major: libc::major(rdev),
                minor: libc::minor(rdev),
            }
        } else {
            EntryKind::Fifo
        };
        let mtime = clamp(metadata.mtime());
        if opaque && matches!(kind, EntryKind::Directory) {
            let mut name = relative.clone();
            name.push(b'/');
            name.extend_from_slice(OPAQUE_MARKER.as_bytes());
            entries.push(Entry {
                name,
                source: source.clone(),
                kind: EntryKind::Whiteout,
                mode: 0,
                uid: 0,
                gid: 0,
                mtime,
                xattrs: Vec::new(),
            });
        }
        entries.push(Entry {
            name: relative,
            source,
            kind,
            mode: metadata.mode() & 0o7777,
            uid: u64::from(metadata.uid()),
            gid: u64::from(metadata.gid()),
            mtime,
            xattrs,
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));

    // Files with several links: the first path (in sorted order) holds the data.
    let mut first_paths: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    for entry in &mut entries {
        if let EntryKind::File {
            device,
            inode,
            links,
            ..
        } = entry.kind
            && links > 1
        {
            match first_paths.get(&(device, inode)) {
                Some(first) => {
                    entry.kind = EntryKind::HardLink {
                        target: first.clone(),
                    }
                }
                None => {
                    first_paths.insert((device, inode), entry.name.clone());
                }
            }
        }
    }
    Ok(entries)
}

/// `a/b/c` → `a/b/`; `c` → ``.
fn parent_prefix(relative: &[u8]) -> Vec<u8> {
    match relative.iter().rposition(|byte| *byte == b'/') {
        Some(slash) => relative[..=slash].to_vec(),
        None => Vec::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// Writing the tar
// ---------------------------------------------------------------------------------------------

const USTAR_NAME_LEN: usize = 100;
const USTAR_MAX_ID: u64 = 0o7_777_777;
const USTAR_MAX_SIZE: u64 = 0o77_777_777_777;

fn write_entries<W: Write>(
    entries: &[Entry],
    builder: &mut tar::Builder<W>,
) -> Result<(), LayerError> {
    for entry in entries {
        let mut name = entry.name.clone();
        if matches!(entry.kind, EntryKind::Directory) {
            name.push(b'/');
        }
        let (entry_type, size, link): (tar::EntryType, u64, Option<&[u8]>) = match &entry.kind {
            EntryKind::Directory => (tar::EntryType::Directory, 0, None),
            EntryKind::File { size, .. } => (tar::EntryType::Regular, *size, None),
            EntryKind::HardLink { target } => (tar::EntryType::Link, 0, Some(target)),
            EntryKind::Symlink { target } => (tar::EntryType::Symlink, 0, Some(target)),
            EntryKind::CharDevice { .. } => (tar::EntryType::Char, 0, None),
            EntryKind::BlockDevice { .. } => (tar::EntryType::Block, 0, None),
            EntryKind::Fifo => (tar::EntryType::Fifo, 0, None),
            EntryKind::Whiteout => (tar::EntryType::Regular, 0, None),
        };

        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        if name.len() > USTAR_NAME_LEN {
            pax.push(("path".to_string(), name.clone()));
        }
        if let Some(link) = link
            && link.len() > USTAR_NAME_LEN
        {
            pax.push(("linkpath".to_string(), link.to_vec()));
        }
        if entry.uid > USTAR_MAX_ID {
            pax.push(("uid".to_string(), entry.uid.to_string().into_bytes()));
        }
        if entry.gid > USTAR_MAX_ID {
            pax.push(("gid".to_string(), entry.gid.to_string().into_bytes()));
        }
        if size > USTAR_MAX_SIZE {
            pax.push(("size".to_string(), size.to_string().into_bytes()));
        }
        for (attribute, value) in &entry.xattrs {
            pax.push((
                format!("SCHILY.xattr.{}", String::from_utf8_lossy(attribute)),
                value.clone(),
            ));
        }
        pax.sort();
        let source_path = &entry.source;
        if !pax.is_empty() {
            append_pax(builder, &name, &pax)
                .map_err(io_error("write the layer entry for", source_path))?;
        }

        let mut header = tar::Header::new_ustar();
        header.set_entry_type(entry_type);
        if let Some(ustar) = header.as_ustar_mut() {
            fill(&mut ustar.name, &name);
            if let Some(link) = link {
                fill(&mut ustar.linkname, link);
            }
        }
        header.set_mode(entry.mode);
        header.set_uid(if entry.uid > USTAR_MAX_ID {
            0
        } else {
            entry.uid
        });
        header.set_gid(if entry.gid > USTAR_MAX_ID {
            0
        } else {
            entry.gid
        });
        header.set_size(if size > USTAR_MAX_SIZE { 0 } else { size });
        header.set_mtime(entry.mtime);
        if let EntryKind::CharDevice { major, minor } | EntryKind::BlockDevice { major, minor } =
            entry.kind
        {
            header
                .set_device_major(major)
                .and_then(|()| header.set_device_minor(minor))
                .map_err(io_error("write the device numbers of", source_path))?;
        }
        header.set_cksum();

        match &entry.kind {
            EntryKind::File { size, expect, .. } => {
                let file = open_nofollow(source_path).map_err(io_error("open", source_path))?;
                let mut reader = ExactReader {
                    inner: file,
                    remaining: *size,
                    changed: false,
                    hasher: expect.map(|_| blake3::Hasher::new()),
                };
                let result = builder.append(&header, &mut reader);
                if reader.changed && expect.is_some() {
                    return Err(LayerError::SourceChanged {
                        path: source_path.clone(),
                    });
                }
                if reader.changed {
                    return Err(LayerError::FileChanged {
                        path: source_path.clone(),
                    });
                }
                result.map_err(io_error("archive", source_path))?;
                if let (Some(expected), Some(hasher)) = (expect, reader.hasher)
                    && hasher.finalize().as_bytes() != expected
                {
                    return Err(LayerError::SourceChanged {
                        path: source_path.clone(),
                    });
                }
            }
            _ => builder
                .append(&header, io::empty())
                .map_err(io_error("write the layer entry for", source_path))?,
        }
    }
    Ok(())
}

/// Copies `value` into a NUL-padded header field, truncating (the PAX header has the rest).
fn fill(field: &mut [u8], value: &[u8]) {
    field.fill(0);
    let length = value.len().min(field.len());
    field[..length].copy_from_slice(&value[..length]);
}

fn append_pax<W: Write>(
    builder: &mut tar::Builder<W>,
    name: &[u8],
    records: &[(String, Vec<u8>)],
) -> io::Result<()> {
    let mut data = Vec::new();
    for (key, value) in records {
        // A record is "LEN KEY=VALUE\n" where LEN counts itself.
        let rest = key.len() + value.len() + 3;
        let mut length = rest + 1;
        while length != rest + length.to_string().len() {
            length = rest + length.to_string().len();
        }
        data.extend_from_slice(length.to_string().as_bytes());
        data.push(b' ');
        data.extend_from_slice(key.as_bytes());
        data.push(b'=');
        data.extend_from_slice(value);
        data.push(b'\n');
    }
    let trimmed = name.strip_suffix(b"/").unwrap_or(name);
    let base = &trimmed[trimmed
        .iter()
        .rposition(|byte| *byte == b'/')
        .map_or(0, |slash| slash + 1)..];
    let mut pax_name = b"PaxHeaders.0/".to_vec();
    pax_name.extend_from_slice(base);
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::XHeader);
    if let Some(ustar) = header.as_ustar_mut() {
        fill(&mut ustar.name, &pax_name);
    }
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(data.len() as u64);
    header.set_cksum();
    builder.append(&header, data.as_slice())
}

/// Opens a file to archive without following a symlink in its last component.
fn open_nofollow(path: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Yields exactly `remaining` bytes of `inner`; notes when the file is shorter or longer, and
/// hashes what it yields when asked to.
struct ExactReader<R> {
    inner: R,
    remaining: u64,
    changed: bool,
    hasher: Option<blake3::Hasher>,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            let mut probe = [0u8; 1];
            if self.inner.read(&mut probe)? != 0 {
                self.changed = true;
                return Err(io::Error::other("file grew while being archived"));
            }
            return Ok(0);
        }
        let limit = buffer
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let read = self.inner.read(&mut buffer[..limit])?;
        if read == 0 {
            self.changed = true;
            return Err(io::Error::other("file shrank while being archived"));
        }
        if let Some(hasher) = &mut self.hasher {
            hasher.update(&buffer[..read]);
        }
        self.remaining -= read as u64;
        Ok(read)
    }
}

// ---------------------------------------------------------------------------------------------
// The pipeline
// ---------------------------------------------------------------------------------------------

/// Passes bytes through, hashing and counting them.
struct HashingWriter<W> {
    inner: W,
    hasher: DigestWriter,
    count: u64,
}

impl<W> HashingWriter<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: DigestWriter::new(),
            count: 0,
        }
    }
    fn finish(self) -> (W, Digest, u64) {
        (self.inner, self.hasher.finish(), self.count)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buffer)?;
        self.hasher.update(&buffer[..written]);
        self.count += written as u64;
        Ok(written)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

const CHUNK: usize = 128 * 1024;

/// The producer's end of the channel to the zstd thread.
struct ChannelWriter {
    sender: mpsc::SyncSender<Vec<u8>>,
    buffer: Vec<u8>,
}

impl ChannelWriter {
    fn send_buffer(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buffer, Vec::with_capacity(CHUNK));
        self.sender
            .send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the zstd compressor stopped"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        let room = CHUNK - self.buffer.len();
        let taken = room.min(buffer.len());
        self.buffer.extend_from_slice(&buffer[..taken]);
        if self.buffer.len() == CHUNK {
            self.send_buffer()?;
        }
        Ok(taken)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The compressor's end: reads until the producer hangs up.
struct ChannelReader {
    receiver: mpsc::Receiver<Vec<u8>>,
    current: Vec<u8>,
    position: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        while self.position == self.current.len() {
            match self.receiver.recv() {
                Ok(chunk) => {
                    self.current = chunk;
                    self.position = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let available = &self.current[self.position..];
        let taken = available.len().min(buffer.len());
        buffer[..taken].copy_from_slice(&available[..taken]);
        self.position += taken;
        Ok(taken)
    }
}

/// `ruzstd` unwraps write errors; this writer never fails and keeps the first error instead.
struct ErrorKeepingWriter<W> {
    inner: W,
    error: Option<io::Error>,
}

impl<W: Write> Write for ErrorKeepingWriter<W> {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        if self.error.is_none()
            && let Err(error) = self.inner.write_all(buffer)
        {
            self.error = Some(error);
        }
        Ok(buffer.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        if self.error.is_none()
            && let Err(error) = self.inner.flush()
        {
            self.error = Some(error);
        }
        Ok(())
    }
}

/// Writes the tar of `entries`, compressed, into `file`; returns (diff_id, digest, size).
fn write_compressed(
    entries: &[Entry],
    compression: Compression,
    file: &fs::File,
    file_path: &Path,
) -> Result<(Digest, Digest, u64), LayerError> {
    let output = HashingWriter::new(BufWriter::with_capacity(CHUNK, file));
    let write_failed = io_error("write", file_path);
    match compression {
        Compression::None => {
            let mut builder = tar::Builder::new(output);
            write_entries(entries, &mut builder)?;
            let output = builder.into_inner().map_err(io_error("write", file_path))?;
            let (mut buffered, digest, size) = output.finish();
            buffered.flush().map_err(write_failed)?;
            Ok((digest, digest, size))
        }
        Compression::Gzip => {
            let encoder =
                flate2::GzBuilder::new().write(output, flate2::Compression::new(GZIP_LEVEL));
            let mut builder = tar::Builder::new(HashingWriter::new(encoder));
            write_entries(entries, &mut builder)?;
            let tar_output = builder.into_inner().map_err(io_error("write", file_path))?;
            let (encoder, diff_id, _) = tar_output.finish();
            let output = encoder.finish().map_err(io_error("write", file_path))?;
            let (mut buffered, digest, size) = output.finish();
            buffered.flush().map_err(write_failed)?;
            Ok((diff_id, digest, size))
        }
        Compression::Zstd => {
            let (sender, receiver) = mpsc::sync_channel::<Vec<u8>>(4);
            std::thread::scope(|scope| {
                let compressor = scope.spawn(move || {
                    let reader = ChannelReader {
                        receiver,
                        current: Vec::new(),
                        position: 0,
                    };
                    let mut sink = ErrorKeepingWriter {
                        inner: output,
                        error: None,
                    };
                    ruzstd::encoding::compress(
                        reader,
                        &mut sink,
                        ruzstd::encoding::CompressionLevel::Fastest,
                    );
                    sink
                });
                let channel = ChannelWriter {
                    sender,
                    buffer: Vec::with_capacity(CHUNK),
                };
                let mut builder = tar::Builder::new(HashingWriter::new(channel));
                let written = write_entries(entries, &mut builder).and_then(|()| {
                    let tar_output = builder.into_inner().map_err(io_error("write", file_path))?;
                    let (mut channel, diff_id, _) = tar_output.finish();
                    channel
                        .send_buffer()
                        .map_err(io_error("write", file_path))?;
                    Ok(diff_id)
                });
                // Dropping the builder or the channel ends the compressor's input either way.
                let sink = compressor.join().map_err(|_| LayerError::Compressor)?;
                let diff_id = written?;
                if let Some(error) = sink.error {
                    return Err(io_error("write", file_path)(error));
                }
                let (mut buffered, digest, size) = sink.inner.finish();
                buffered.flush().map_err(io_error("write", file_path))?;
                Ok((diff_id, digest, size))
            })
        }
    }
}

/// Turns the upper directory of a step's overlay (or any directory holding a change set) into
/// a deterministic layer at `OUT_DIR/<hex digest>`. `None` when `upper` is empty: the step
/// changed nothing and gets no layer.
pub fn write_layer_from_upper(
    upper: &Path,
    out_dir: &Path,
    opts: &LayerOptions,
) -> Result<Option<LayerBlob>, LayerError> {
    let entries = scan(upper, opts.source_date_epoch)?;
    if entries.is_empty() {
        return Ok(None);
    }
    write_blob(&entries, out_dir, opts).map(Some)
}

/// Writes `entries` as a compressed layer blob at `OUT_DIR/<hex digest>`, atomically.
fn write_blob(
    entries: &[Entry],
    out_dir: &Path,
    opts: &LayerOptions,
) -> Result<LayerBlob, LayerError> {
    fs::create_dir_all(out_dir).map_err(io_error("create directory", out_dir))?;
    let temporary = tempfile::Builder::new()
        .prefix(".layer-")
        .tempfile_in(out_dir)
        .map_err(io_error("create a temporary file in", out_dir))?;
    let (diff_id, digest, size) = write_compressed(
        entries,
        opts.compression,
        temporary.as_file(),
        temporary.path(),
    )?;
    let path = out_dir.join(digest.hex());
    fs::set_permissions(temporary.path(), fs::Permissions::from_mode(0o644))
        .map_err(io_error("set permissions on", temporary.path()))?;
    temporary
        .persist(&path)
        .map_err(|error| io_error("rename into place", &path)(error.error))?;
    Ok(LayerBlob {
        digest,
        diff_id,
        size,
        media_type: opts.compression.media_type(),
        path,
    })
}

/// The diff id (sha256 of the uncompressed tar) the layer of `upper` would have, without
/// compressing or writing anything; `None` when `upper` is empty. Lets a caller that already
/// holds a compressed blob for that diff id skip compressing it again (the same change on
/// several platforms, like a copied build context, is one layer).
pub fn diff_id_of_upper(upper: &Path, opts: &LayerOptions) -> Result<Option<Digest>, LayerError> {
    let entries = scan(upper, opts.source_date_epoch)?;
    if entries.is_empty() {
        return Ok(None);
    }
    let mut builder = tar::Builder::new(HashingWriter::new(io::sink()));
    write_entries(&entries, &mut builder)?;
    let output = builder.into_inner().map_err(io_error("hash", upper))?;
    let (_, diff_id, _) = output.finish();
    Ok(Some(diff_id))
}

// ---------------------------------------------------------------------------------------------
// Layers from a list of entries (a copy written straight from its sources)
// ---------------------------------------------------------------------------------------------

/// One entry of a layer described directly rather than found in an upper directory: what a
/// `copy` writes, computed from its sources. Times are given already clamped.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PlannedEntry {
    /// The path in the layer, relative, without a trailing slash.
    pub name: Vec<u8>,
    pub kind: PlannedKind,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    /// Sorted by name; overlay's own attributes excluded.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PlannedKind {
    Directory,
    /// `source` is read (never through a final symlink) for exactly `size` bytes; when
    /// `expect` is given, the content must have that blake3.
    File {
        source: PathBuf,
        size: u64,
        expect: Option<[u8; 32]>,
    },
    Symlink {
        target: Vec<u8>,
    },
}

fn planned_to_entries(planned: &[PlannedEntry]) -> Result<Vec<Entry>, LayerError> {
    let mut entries = Vec::with_capacity(planned.len());
    for item in planned {
        let base_name = item
            .name
            .rsplit(|byte| *byte == b'/')
            .next()
            .unwrap_or_default();
        let (kind, source) = match &item.kind {
            PlannedKind::Directory => (EntryKind::Directory, PathBuf::new()),
            PlannedKind::File {
                source,
                size,
                expect,
            } => (
                EntryKind::File {
                    size: *size,
                    device: 0,
                    inode: 0,
                    links: 1,
                    expect: *expect,
                },
                source.clone(),
            ),
            PlannedKind::Symlink { target } => (
                EntryKind::Symlink {
                    target: target.clone(),
                },
                PathBuf::new(),
            ),
        };
        let source = if source.as_os_str().is_empty() {
            PathBuf::from(std::ffi::OsStr::from_bytes(&item.name))
        } else {
            source
        };
        if base_name.starts_with(WHITEOUT_PREFIX.as_bytes()) {
            return Err(LayerError::ReservedName { path: source });
        }
        entries.push(Entry {
            name: item.name.clone(),
            source,
            kind,
            mode: item.mode & 0o7777,
            uid: u64::from(item.uid),
            gid: u64::from(item.gid),
            mtime: item.mtime,
            xattrs: item.xattrs.clone(),
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}

/// Writes the layer of `planned` (any order; sorted here) at `OUT_DIR/<hex digest>`, exactly as
/// [`write_layer_from_upper`] would for an upper directory holding those entries. `None` when
/// there are none.
pub fn write_layer_from_entries(
    planned: &[PlannedEntry],
    out_dir: &Path,
    opts: &LayerOptions,
) -> Result<Option<LayerBlob>, LayerError> {
    let entries = planned_to_entries(planned)?;
    if entries.is_empty() {
        return Ok(None);
    }
    write_blob(&entries, out_dir, opts).map(Some)
}
