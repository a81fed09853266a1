//! Pushing an image layout to a registry: every tag, one index, every platform.
//!
//! The bytes pushed are the bytes the layout holds, the ones that were hashed: blobs are
//! checked with `HEAD` first and skipped when present (or mounted from another repository on
//! the same registry), per-platform manifests go up by digest, then the index under each tag.

use std::path::{Path, PathBuf};

use crate::digest::Digest;
use crate::oci::{self, ImageIndex, ImageManifest, OciError, OciLayout};
use crate::reference::{Reference, ReferenceError};
use crate::registry::{BlobPush, RegistryClient, RegistryError};

/// What a push did, for the summary.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PushReport {
    pub tags: Vec<String>,
    pub uploaded: usize,
    pub skipped: usize,
    pub mounted: usize,
}

/// Why a push stopped. A registry's refusal keeps its code and help (credentials, TLS).
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum PushError {
    #[error(transparent)]
    #[diagnostic(transparent)]
    Layout(#[from] OciError),

    #[error("the layout {} holds no image", path.display())]
    #[diagnostic(code(graphbuild::push::empty_layout))]
    EmptyLayout { path: PathBuf },

    #[error("{what} {digest} of the layout is not valid JSON: {source}")]
    #[diagnostic(code(graphbuild::push::layout))]
    Json {
        what: &'static str,
        digest: Digest,
        #[source]
        source: serde_json::Error,
    },

    #[error("cannot push to `{tag}`: {source}")]
    #[diagnostic(code(graphbuild::push::tag))]
    Tag {
        tag: String,
        #[source]
        source: ReferenceError,
    },

    #[error("cannot push to `{tag}`: it has no tag")]
    #[diagnostic(code(graphbuild::push::tag))]
    NoTag { tag: String },

    #[error(transparent)]
    #[diagnostic(transparent)]
    Registry(#[from] RegistryError),
}

/// Push the image of `layout` (its first index) under every tag in `tags`.
pub fn push_layout(
    client: &RegistryClient,
    layout_dir: &Path,
    tags: &[String],
) -> Result<PushReport, PushError> {
    let layout = OciLayout::open(layout_dir)?;
    let top = layout
        .index()
        .manifests
        .first()
        .cloned()
        .ok_or_else(|| PushError::EmptyLayout {
            path: layout_dir.to_path_buf(),
        })?;
    let index_bytes = layout.read_blob(&top.digest)?;
    let index: ImageIndex =
        serde_json::from_slice(&index_bytes).map_err(|source| PushError::Json {
            what: "the image index",
            digest: top.digest,
            source,
        })?;
    let mut report = PushReport::default();
    let mut pushed_repositories: Vec<Reference> = Vec::new();
    for tag in tags {
        let reference = Reference::parse(tag).map_err(|source| PushError::Tag {
            tag: tag.clone(),
            source,
        })?;
        if reference.tag.is_none() && reference.digest.is_none() {
            return Err(PushError::NoTag { tag: tag.clone() });
        }
        // Blobs already pushed to another repository on this registry can be mounted.
        let mount_from = pushed_repositories
            .iter()
            .find(|other| {
                other.registry == reference.registry && other.repository != reference.repository
            })
            .map(|other| other.repository.clone());
        for descriptor in &index.manifests {
            let manifest_bytes = layout.read_blob(&descriptor.digest)?;
            let manifest: ImageManifest =
                serde_json::from_slice(&manifest_bytes).map_err(|source| PushError::Json {
                    what: "the manifest",
                    digest: descriptor.digest,
                    source,
                })?;
            for blob in std::iter::once(&manifest.config).chain(&manifest.layers) {
                let outcome = push_blob(
                    client,
                    &layout,
                    &reference,
                    &blob.digest,
                    blob.size,
                    mount_from.as_deref(),
                )?;
                match outcome {
                    BlobPush::AlreadyPresent => report.skipped += 1,
                    BlobPush::Mounted => report.mounted += 1,
                    BlobPush::Uploaded | BlobPush::UploadedInChunks(_) => report.uploaded += 1,
                }
            }
            client.push_manifest(
                &reference.with_digest(descriptor.digest),
                &descriptor.media_type,
                &manifest_bytes,
            )?;
        }
        let media_type = index
            .media_type
            .clone()
            .unwrap_or_else(|| oci::media::OCI_INDEX.to_string());
        let without_digest = Reference {
            digest: None,
            ..reference.clone()
        };
        client.push_manifest(&without_digest, &media_type, &index_bytes)?;
        report.tags.push(reference.to_string());
        pushed_repositories.push(reference);
    }
    Ok(report)
}

fn push_blob(
    client: &RegistryClient,
    layout: &OciLayout,
    reference: &Reference,
    digest: &Digest,
    size: u64,
    mount_from: Option<&str>,
) -> Result<BlobPush, RegistryError> {
    client.push_blob(
        reference,
        digest,
        size,
        &layout.blob_path(digest),
        mount_from,
    )
}
