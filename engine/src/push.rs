//! Pushing an image layout to a registry: every tag, one index, every platform.
//!
//! The bytes pushed are the bytes the layout holds, the ones that were hashed: blobs are
//! checked with `HEAD` first and skipped when present (or mounted from another repository on
//! the same registry), per-platform manifests go up by digest, then the index under each tag.

use std::path::Path;

use crate::digest::Digest;
use crate::oci::{self, ImageIndex, ImageManifest, OciLayout};
use crate::reference::Reference;
use crate::registry::{BlobPush, RegistryClient};

/// What a push did, for the summary.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PushReport {
    pub tags: Vec<String>,
    pub uploaded: usize,
    pub skipped: usize,
    pub mounted: usize,
}

fn error_text(error: &crate::registry::RegistryError) -> String {
    match miette::Diagnostic::help(error) {
        Some(help) => format!("{error}\n  hint: {help}"),
        None => error.to_string(),
    }
}

/// Push the image of `layout` (its first index) under every tag in `tags`.
pub fn push_layout(
    client: &RegistryClient,
    layout_dir: &Path,
    tags: &[String],
) -> Result<PushReport, String> {
    let layout = OciLayout::open(layout_dir).map_err(|error| error.to_string())?;
    let top = layout
        .index()
        .manifests
        .first()
        .cloned()
        .ok_or_else(|| format!("the layout {} holds no image", layout_dir.display()))?;
    let index_bytes = layout
        .read_blob(&top.digest)
        .map_err(|error| error.to_string())?;
    let index: ImageIndex =
        serde_json::from_slice(&index_bytes).map_err(|error| error.to_string())?;
    let mut report = PushReport::default();
    let mut pushed_repositories: Vec<Reference> = Vec::new();
    for tag in tags {
        let reference =
            Reference::parse(tag).map_err(|error| format!("cannot push to `{tag}`: {error}"))?;
        if reference.tag.is_none() && reference.digest.is_none() {
            return Err(format!("cannot push to `{tag}`: it has no tag"));
        }
        // Blobs already pushed to another repository on this registry can be mounted.
        let mount_from = pushed_repositories
            .iter()
            .find(|other| {
                other.registry == reference.registry && other.repository != reference.repository
            })
            .map(|other| other.repository.clone());
        for descriptor in &index.manifests {
            let manifest_bytes = layout
                .read_blob(&descriptor.digest)
                .map_err(|error| error.to_string())?;
            let manifest: ImageManifest =
                serde_json::from_slice(&manifest_bytes).map_err(|error| error.to_string())?;
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
            client
                .push_manifest(
                    &reference.with_digest(descriptor.digest),
                    &descriptor.media_type,
                    &manifest_bytes,
                )
                .map_err(|error| error_text(&error))?;
        }
        let media_type = index
            .media_type
            .clone()
            .unwrap_or_else(|| oci::media::OCI_INDEX.to_string());
        let without_digest = Reference {
            digest: None,
            ..reference.clone()
        };
        client
            .push_manifest(&without_digest, &media_type, &index_bytes)
            .map_err(|error| error_text(&error))?;
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
) -> Result<BlobPush, String> {
    client
        .push_blob(
            reference,
            digest,
            size,
            &layout.blob_path(digest),
            mount_from,
        )
        .map_err(|error| error_text(&error))
}
