//! Exporters: what a finished image becomes besides its OCI layout (BuildKit's split: the
//! build produces images, exporters write them). Each reads the layout the build wrote.
//!
//! - [`export_local`]: each platform's final filesystem in a directory, its layers applied in
//!   order with OCI whiteouts honoured;
//! - [`export_rootfs_tar`]: that filesystem as a tar archive;
//! - [`export_oci_archive`]: the layout itself as a tar (`oci-archive:`), with a Docker
//!   `manifest.json` beside it when asked (what `docker load` reads);
//! - [`check_architecture`]: every ELF file the build added, checked against its platform.
//!
//! # Never outside the destination
//!
//! Each layer is unpacked by [`crate::unpack::unpack_layer`] (which refuses anything that
//! escapes its directory) into a fresh directory beside the destination, then merged into it
//! by renames, walking both trees with `lstat`: a symlink in the destination is replaced, never
//! followed.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::digest::Digest;
use crate::oci::{self, Descriptor, ImageManifest, OciError, OciLayout, OciPlatform};
use crate::plan::{Base, Plan};
use crate::unpack::UnpackError;

/// Why an exporter failed. Each message carries its cause, so it reads whole on its own.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum ExporterError {
    #[error("the layout {} is empty", dir.display())]
    #[diagnostic(code(graphbuild::exporter::empty))]
    Empty { dir: PathBuf },

    #[error(transparent)]
    #[diagnostic(transparent)]
    Layout(#[from] OciError),

    #[error("cannot {action} {}: {source}", path.display())]
    #[diagnostic(code(graphbuild::exporter::io))]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("layer {digest}: {source}")]
    #[diagnostic(code(graphbuild::exporter::unpack))]
    Unpack {
        digest: Digest,
        #[source]
        source: UnpackError,
    },

    #[error("layer {digest}: {source}")]
    #[diagnostic(code(graphbuild::exporter::read))]
    Read {
        digest: Digest,
        #[source]
        source: io::Error,
    },

    #[error("cannot apply layer {digest}: {source}")]
    #[diagnostic(code(graphbuild::exporter::apply))]
    Apply {
        digest: Digest,
        #[source]
        source: io::Error,
    },

    #[error("cannot encode the Docker manifest: {source}")]
    #[diagnostic(code(graphbuild::exporter::encode))]
    Encode {
        #[source]
        source: serde_json::Error,
    },
}

/// `map_err(io_error("read", path))`.
fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ExporterError + use<> {
    let path = path.to_path_buf();
    move |source| ExporterError::Io {
        action,
        path,
        source,
    }
}

/// One platform's manifest in a layout.
#[derive(Debug, Clone)]
pub struct PlatformImage {
    pub platform: OciPlatform,
    pub descriptor: Descriptor,
    pub manifest: ImageManifest,
}

impl PlatformImage {
    /// A directory name for the platform: `linux_arm64`, `linux_arm_v7`.
    pub fn dir_name(&self) -> String {
        platform_dir_name(&self.platform)
    }
}

/// `linux/arm/v7` → `linux_arm_v7`.
pub fn platform_dir_name(platform: &OciPlatform) -> String {
    platform.to_string().replace('/', "_")
}

/// The index a layout's `index.json` points at (its first entry) and that index's descriptor.
pub fn layout_index(layout: &OciLayout) -> Result<(Descriptor, oci::ImageIndex), ExporterError> {
    let top = layout
        .index()
        .manifests
        .first()
        .cloned()
        .ok_or_else(|| ExporterError::Empty {
            dir: layout.root().to_path_buf(),
        })?;
    let index: oci::ImageIndex = layout.read_json(&top, "image index")?;
    Ok((top, index))
}

/// Every platform's manifest of the image in `layout`, in the index's order (attestation
/// manifests are not images: they are left out).
pub fn platform_images(layout: &OciLayout) -> Result<Vec<PlatformImage>, ExporterError> {
    let (_, index) = layout_index(layout)?;
    let mut images = Vec::new();
    for descriptor in index.manifests {
        if descriptor.is_attestation() {
            continue;
        }
        let manifest: ImageManifest = layout.read_json(&descriptor, "image manifest")?;
        let platform = match &descriptor.platform {
            Some(platform) => platform.clone(),
            None => layout.read_config(&manifest)?.platform(),
        };
        images.push(PlatformImage {
            platform,
            descriptor,
            manifest,
        });
    }
    Ok(images)
}

/// `type=local`: each platform's filesystem under `dest` (in `dest/<os_arch[_variant]>` when
/// the image has several platforms, else `dest` itself). What was in `dest` is replaced.
pub fn export_local(layout: &OciLayout, dest: &Path) -> Result<(), ExporterError> {
    let images = platform_images(layout)?;
    fresh_dir(dest)?;
    for image in &images {
        let root = if images.len() > 1 {
            dest.join(image.dir_name())
        } else {
            dest.to_path_buf()
        };
        fresh_dir(&root)?;
        apply_layers(layout, &image.manifest, &root)?;
    }
    Ok(())
}

/// `type=tar`: the filesystem [`export_local`] would write, as a tar archive at `file`.
pub fn export_rootfs_tar(layout: &OciLayout, file: &Path) -> Result<(), ExporterError> {
    let parent = parent_dir(file);
    fs::create_dir_all(&parent).map_err(io_error("create", &parent))?;
    let scratch = tempfile::Builder::new()
        .prefix(".graphbuild-rootfs-")
        .tempdir_in(&parent)
        .map_err(io_error("create a directory in", &parent))?;
    let root = scratch.path().join("rootfs");
    export_local(layout, &root)?;
    write_tar_atomically(file, |builder| append_tree(builder, &root, Path::new("")))
}

/// `type=oci,dest=FILE.tar`: the layout as a tar archive (`oci-layout`, `index.json`, the
/// blobs), with one `index.json` entry (the first tag), so that `oci-archive:FILE.tar` names
/// the image without a tag.
pub fn export_oci_archive(layout: &OciLayout, file: &Path) -> Result<(), ExporterError> {
    let (top, index) = layout_index(layout)?;
    let mut blobs = vec![top.digest];
    // Every manifest of the index, attestation manifests included, with what it names.
    for descriptor in &index.manifests {
        blobs.push(descriptor.digest);
        let manifest: ImageManifest = layout.read_json(descriptor, "image manifest")?;
        blobs.push(manifest.config.digest);
        blobs.extend(manifest.layers.iter().map(|layer| layer.digest));
    }
    write_archive(layout, file, top, blobs, None)
}

/// An oci-archive holding only `image` (one platform), as `index.json`'s only entry, with a
/// Docker `manifest.json` tagging it `tags`: what both `podman load` and `docker load` read.
pub fn export_platform_archive(
    layout: &OciLayout,
    image: &PlatformImage,
    tags: &[String],
    file: &Path,
) -> Result<(), ExporterError> {
    let blob = |digest: &Digest| format!("blobs/sha256/{}", digest.hex());
    let docker_manifest = serde_json::json!([{
        "Config": blob(&image.manifest.config.digest),
        "RepoTags": tags,
        "Layers": image.manifest.layers.iter().map(|layer| blob(&layer.digest)).collect::<Vec<_>>(),
    }]);
    let mut blobs = vec![image.descriptor.digest, image.manifest.config.digest];
    blobs.extend(image.manifest.layers.iter().map(|layer| layer.digest));
    let descriptor = Descriptor {
        platform: Some(image.platform.clone()),
        annotations: BTreeMap::new(),
        ..image.descriptor.clone()
    };
    let docker_bytes =
        serde_json::to_vec(&docker_manifest).map_err(|source| ExporterError::Encode { source })?;
    write_archive(layout, file, descriptor, blobs, Some(docker_bytes))
}

fn write_archive(
    layout: &OciLayout,
    file: &Path,
    entry: Descriptor,
    mut blobs: Vec<Digest>,
    docker_manifest: Option<Vec<u8>>,
) -> Result<(), ExporterError> {
    blobs.sort();
    blobs.dedup();
    let top = oci::ImageIndex {
        schema_version: 2,
        media_type: Some(oci::media::OCI_INDEX.to_string()),
        manifests: vec![entry],
        annotations: BTreeMap::new(),
    };
    let index_json = oci::canonical_json(&top);
    write_tar_atomically(file, |builder| {
        let mut append_bytes = |name: &str, bytes: &[u8]| {
            let mut header = file_header(bytes.len() as u64);
            builder.append_data(&mut header, name, bytes)
        };
        append_bytes("oci-layout", oci::OCI_LAYOUT_FILE_CONTENT)?;
        append_bytes("index.json", &index_json)?;
        if let Some(bytes) = &docker_manifest {
            append_bytes("manifest.json", bytes)?;
        }
        for name in ["blobs", "blobs/sha256"] {
            let mut header = tar::Header::new_ustar();
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
            header.set_mtime(0);
            builder.append_data(&mut header, format!("{name}/"), io::empty())?;
        }
        for digest in &blobs {
            let path = layout.blob_path(digest);
            let mut blob = fs::File::open(&path)?;
            let mut header = file_header(blob.metadata()?.len());
            builder.append_data(
                &mut header,
                format!("blobs/sha256/{}", digest.hex()),
                &mut blob,
            )?;
        }
        Ok(())
    })
}

fn file_header(size: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(size);
    header.set_mode(0o644);
    header.set_mtime(0);
    header
}

/// Applies `manifest`'s layers in order onto `root`.
fn apply_layers(
    layout: &OciLayout,
    manifest: &ImageManifest,
    root: &Path,
) -> Result<(), ExporterError> {
    let parent = parent_dir(root);
    for layer in &manifest.layers {
        let scratch = tempfile::Builder::new()
            .prefix(".graphbuild-layer-")
            .tempdir_in(&parent)
            .map_err(io_error("create a directory in", &parent))?;
        let path = layout.blob_path(&layer.digest);
        let blob = fs::File::open(&path).map_err(io_error("read", &path))?;
        crate::unpack::unpack_layer(io::BufReader::new(blob), scratch.path()).map_err(
            |source| ExporterError::Unpack {
                digest: layer.digest,
                source,
            },
        )?;
        merge(scratch.path(), root).map_err(|source| ExporterError::Apply {
            digest: layer.digest,
            source,
        })?;
    }
    Ok(())
}

/// Whether an unpacked entry is an overlay whiteout (a 0/0 character device).
fn is_whiteout(metadata: &fs::Metadata) -> bool {
    metadata.file_type().is_char_device() && metadata.rdev() == 0
}

fn is_opaque(dir: &Path) -> bool {
    ["trusted.overlay.opaque", "user.overlay.opaque"]
        .iter()
        .any(|name| matches!(xattr_value(dir, name), Some(value) if value == b"y"))
}

fn xattr_value(path: &Path, name: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let name = std::ffi::CString::new(name).ok()?;
    let mut buffer = [0u8; 16];
    // SAFETY: both strings are NUL-terminated and the buffer's length is passed.
    let length = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            buffer.as_mut_ptr().cast(),
            buffer.len(),
        )
    };
    (length >= 0).then(|| buffer[..length as usize].to_vec())
}

fn remove_xattr(path: &Path, name: &str) {
    use std::os::unix::ffi::OsStrExt;
    let (Ok(path), Ok(name)) = (
        std::ffi::CString::new(path.as_os_str().as_bytes()),
        std::ffi::CString::new(name),
    ) else {
        return;
    };
    // SAFETY: both strings are NUL-terminated.
    unsafe {
        libc::lremovexattr(path.as_ptr(), name.as_ptr());
    }
}

/// Moves the unpacked layer `from` onto `to` as overlayfs would show it: whiteouts delete,
/// opaque directories hide what was below, directories merge, anything else replaces.
fn merge(from: &Path, to: &Path) -> io::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(from)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|entry| entry.file_name());
    for entry in entries {
        let source = entry.path();
        let target = to.join(entry.file_name());
        let metadata = fs::symlink_metadata(&source)?;
        let existing = fs::symlink_metadata(&target).ok();
        if is_whiteout(&metadata) {
            if let Some(existing) = existing {
                remove_any(&target, &existing)?;
            }
            continue;
        }
        if metadata.is_dir() {
            let opaque = is_opaque(&source);
            for name in ["trusted.overlay.opaque", "user.overlay.opaque"] {
                remove_xattr(&source, name);
            }
            match existing {
                Some(existing) if existing.is_dir() && !opaque => {
                    merge(&source, &target)?;
                    // The layer's directory metadata wins.
                    fs::set_permissions(&target, metadata.permissions())?;
                    std::os::unix::fs::lchown(&target, Some(metadata.uid()), Some(metadata.gid()))
                        .ok();
                    continue;
                }
                Some(existing) => remove_any(&target, &existing)?,
                None => {}
            }
            // Whiteouts inside a directory that replaces (or adds) one only hide what is not
            // there: drop them.
            drop_whiteouts(&source)?;
            fs::rename(&source, &target)?;
            continue;
        }
        if let Some(existing) = existing {
            remove_any(&target, &existing)?;
        }
        fs::rename(&source, &target)?;
    }
    Ok(())
}

fn drop_whiteouts(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let metadata = fs::symlink_metadata(entry.path())?;
        if is_whiteout(&metadata) {
            fs::remove_file(entry.path())?;
        } else if metadata.is_dir() {
            for name in ["trusted.overlay.opaque", "user.overlay.opaque"] {
                remove_xattr(&entry.path(), name);
            }
            drop_whiteouts(&entry.path())?;
        }
    }
    Ok(())
}

fn remove_any(path: &Path, metadata: &fs::Metadata) -> io::Result<()> {
    if metadata.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}

/// Makes `dir` an empty directory; a file or symlink there is removed, not followed.
fn fresh_dir(dir: &Path) -> Result<(), ExporterError> {
    if let Ok(metadata) = fs::symlink_metadata(dir) {
        remove_any(dir, &metadata).map_err(io_error("replace", dir))?;
    }
    fs::create_dir_all(dir).map_err(io_error("create", dir))
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Writes a tar at `file` through a temporary file renamed into place.
fn write_tar_atomically(
    file: &Path,
    fill: impl FnOnce(&mut tar::Builder<io::BufWriter<fs::File>>) -> io::Result<()>,
) -> Result<(), ExporterError> {
    let parent = parent_dir(file);
    fs::create_dir_all(&parent).map_err(io_error("create", &parent))?;
    let temporary = tempfile::Builder::new()
        .prefix(".graphbuild-tar-")
        .tempfile_in(&parent)
        .map_err(io_error("create a file in", &parent))?;
    let handle = temporary.reopen().map_err(io_error("write", file))?;
    let mut builder = tar::Builder::new(io::BufWriter::new(handle));
    builder.follow_symlinks(false);
    let written = fill(&mut builder)
        .and_then(|()| builder.into_inner())
        .and_then(|mut writer| io::Write::flush(&mut writer));
    written.map_err(io_error("write", file))?;
    temporary
        .persist(file)
        .map_err(|error| io_error("write", file)(error.error))?;
    Ok(())
}

/// Appends everything under `dir` (sorted, not following symlinks) as `prefix/…`.
fn append_tree(
    builder: &mut tar::Builder<impl io::Write>,
    dir: &Path,
    prefix: &Path,
) -> io::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|entry| entry.file_name());
    for entry in entries {
        let path = entry.path();
        let name = prefix.join(entry.file_name());
        let metadata = fs::symlink_metadata(&path)?;
        builder.append_path_with_name(&path, &name)?;
        if metadata.is_dir() {
            append_tree(builder, &path, &name)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The architecture check
// ---------------------------------------------------------------------------------------------

/// An ELF file whose header says another CPU than its image's platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchMismatch {
    pub platform: String,
    pub path: String,
    pub expected: String,
    pub found: String,
}

/// How many of the layers of `node`'s image come from its base image (and so are not
/// checked): a stage's layers are its base stage's, down to the first image.
pub fn base_layer_count(plan: &Plan, node: usize) -> usize {
    let mut id = node;
    let mut hops = 0;
    loop {
        match &plan.nodes[id].base {
            Base::Stage(next) if hops < plan.nodes.len() => {
                id = *next;
                hops += 1;
            }
            Base::Image(base) => return base.layers.len(),
            _ => return 0,
        }
    }
}

/// `(EI_CLASS, EI_DATA, e_machine)` of ELF files for `architecture` (GOARCH spelling), from
/// [`crate::binfmt::elf_header`].
fn expected_elf(architecture: &str) -> Option<(u8, u8, u16)> {
    let header = crate::binfmt::elf_header(architecture)?;
    Some(elf_identity(&header[..20]).expect("elf_header builds an ELF header"))
}

fn elf_identity(head: &[u8]) -> Option<(u8, u8, u16)> {
    if head.len() < 20 || &head[..4] != b"\x7fELF" {
        return None;
    }
    let machine = match head[5] {
        1 => u16::from_le_bytes([head[18], head[19]]),
        2 => u16::from_be_bytes([head[18], head[19]]),
        _ => return None,
    };
    Some((head[4], head[5], machine))
}

/// A name for an ELF identity: the GOARCH whose header it is, or its raw numbers.
fn describe(identity: (u8, u8, u16)) -> String {
    for architecture in [
        "amd64", "386", "arm64", "arm", "riscv64", "ppc64le", "s390x",
    ] {
        if expected_elf(architecture) == Some(identity) {
            return architecture.to_string();
        }
    }
    let (class, data, machine) = identity;
    format!(
        "ELF machine {machine}, {}-bit, {} endian",
        if class == 2 { 64 } else { 32 },
        if data == 2 { "big" } else { "little" }
    )
}

/// Every regular ELF file in `image`'s layers after the first `skip` whose class, byte order
/// or machine is not its platform's. Only the first 20 bytes of each file are read.
/// Platforms whose architecture has no ELF table entry are not checked.
/// The ELF files of a layer blob: each one's path in the image and `(EI_CLASS, EI_DATA,
/// e_machine)`.
type ElfFiles = Vec<(String, (u8, u8, u16))>;

/// The ELF files of the layers checked so far, by blob digest, and the store that keeps them
/// between builds (a layer's digest names its content, so what it holds never changes): a
/// rebuild and the platforms that share a layer read each layer once, not once per check.
pub struct ElfIndex<'a> {
    store: Option<&'a crate::store::Store>,
    known: std::collections::HashMap<Digest, ElfFiles>,
}

impl<'a> ElfIndex<'a> {
    pub fn new(store: Option<&'a crate::store::Store>) -> Self {
        Self {
            store,
            known: std::collections::HashMap::new(),
        }
    }

    fn key(digest: &Digest) -> crate::digest::Key {
        let mut builder = crate::key::KeyBuilder::new("layer-elf-files");
        builder.bytes(&digest.0);
        builder.finish()
    }

    fn files(&mut self, layout: &OciLayout, digest: &Digest) -> Result<&ElfFiles, ExporterError> {
        if !self.known.contains_key(digest) {
            let recorded = self
                .store
                .and_then(|store| store.get_action(&Self::key(digest)))
                .and_then(|bytes| serde_json::from_slice::<ElfFiles>(&bytes).ok());
            let files = match recorded {
                Some(files) => files,
                None => {
                    let files = scan_elf_files(layout, digest)?;
                    if let (Some(store), Ok(bytes)) = (self.store, serde_json::to_vec(&files)) {
                        // Losing it only costs reading the layer again.
                        let _ = store.put_action(&Self::key(digest), &bytes);
                    }
                    files
                }
            };
            self.known.insert(*digest, files);
        }
        Ok(&self.known[digest])
    }
}

/// Read a layer blob of `layout` for its ELF files.
fn scan_elf_files(layout: &OciLayout, digest: &Digest) -> Result<ElfFiles, ExporterError> {
    let path = layout.blob_path(digest);
    let blob = fs::File::open(&path).map_err(io_error("read", &path))?;
    let read = |source| ExporterError::Read {
        digest: *digest,
        source,
    };
    let stream = crate::decompress::decompressed(io::BufReader::new(blob)).map_err(read)?;
    let mut archive = tar::Archive::new(stream);
    let entries = archive.entries().map_err(read)?;
    let mut found = Vec::new();
    for entry in entries {
        let mut entry = entry.map_err(read)?;
        if entry.header().entry_type() != tar::EntryType::Regular || entry.size() < 20 {
            continue;
        }
        let mut head = [0u8; 20];
        if entry.read_exact(&mut head).is_err() {
            continue;
        }
        let Some(identity) = elf_identity(&head) else {
            continue;
        };
        let name = entry
            .path()
            .map(|path| path.display().to_string())
            .unwrap_or_default();
        found.push((
            format!("/{}", name.trim_start_matches("./").trim_start_matches('/')),
            identity,
        ));
    }
    Ok(found)
}

/// The ELF files of `image`'s layers after the first `skip` that are for another CPU.
pub fn check_architecture(
    layout: &OciLayout,
    image: &PlatformImage,
    skip: usize,
    index: &mut ElfIndex,
) -> Result<Vec<ArchMismatch>, ExporterError> {
    let Some(expected) = expected_elf(&image.platform.architecture) else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    for layer in image.manifest.layers.iter().skip(skip) {
        for (path, identity) in index.files(layout, &layer.digest)? {
            if *identity != expected {
                found.push(ArchMismatch {
                    platform: image.platform.to_string(),
                    path: path.clone(),
                    expected: describe(expected),
                    found: describe(*identity),
                });
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_identities_name_architectures() {
        for architecture in [
            "amd64", "386", "arm64", "arm", "riscv64", "ppc64le", "s390x",
        ] {
            let expected = expected_elf(architecture).unwrap();
            assert_eq!(describe(expected), architecture);
        }
        assert_ne!(expected_elf("arm"), expected_elf("arm64"));
        assert_eq!(elf_identity(b"#!/bin/sh\necho hello world"), None);
        assert_eq!(
            describe((1, 2, 8)),
            "ELF machine 8, 32-bit, big endian".to_string()
        );
    }

    #[test]
    fn platform_directories_are_named_with_underscores() {
        assert_eq!(
            platform_dir_name(&OciPlatform::new("linux", "arm", Some("v7"))),
            "linux_arm_v7"
        );
        assert_eq!(
            platform_dir_name(&OciPlatform::new("linux", "arm64", None)),
            "linux_arm64"
        );
    }
}
