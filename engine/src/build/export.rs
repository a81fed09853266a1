//! Exporting: each platform's config and manifest, the image index and the layout's
//! `index.json`, written canonically so equal inputs give byte-identical layouts.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use graphbuild_lang::platform::Platform;

use crate::digest::Digest;
use crate::events::{ImageSummary, PlatformSummary};
use crate::oci;
use crate::plan::ImagePlan;
use crate::plan::annotation::{self, Level};
use crate::state::{HistoryEntry, ImageSettings, LayerDesc};
use crate::store::Store;

use super::faults::ExportError;
use super::{Executor, NodeOutput};

/// `--format oci|docker`: which media types image manifests use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ManifestFormat {
    #[default]
    Oci,
    /// Docker's manifest list and schema 2 manifest, for old registries and tools.
    Docker,
}

impl ManifestFormat {
    fn index(self) -> &'static str {
        match self {
            ManifestFormat::Oci => oci::media::OCI_INDEX,
            ManifestFormat::Docker => oci::media::DOCKER_MANIFEST_LIST,
        }
    }
    fn manifest(self) -> &'static str {
        match self {
            ManifestFormat::Oci => oci::media::OCI_MANIFEST,
            ManifestFormat::Docker => oci::media::DOCKER_MANIFEST,
        }
    }
    fn config(self) -> &'static str {
        match self {
            ManifestFormat::Oci => oci::media::OCI_CONFIG,
            ManifestFormat::Docker => oci::media::DOCKER_CONFIG,
        }
    }
    fn layer(self, media_type: &str) -> Result<String, ExportError> {
        match (self, media_type) {
            (ManifestFormat::Oci, _) => Ok(media_type.to_string()),
            (
                ManifestFormat::Docker,
                oci::media::OCI_LAYER_GZIP | oci::media::DOCKER_LAYER_GZIP,
            ) => Ok(oci::media::DOCKER_LAYER_GZIP.to_string()),
            (ManifestFormat::Docker, other) => Err(ExportError::DockerMediaType {
                media_type: other.to_string(),
            }),
        }
    }
}

impl Executor<'_> {
    /// Serialize canonically and store; returns the bytes and their digest.
    pub(super) fn store_json<T: serde::Serialize>(
        &self,
        value: &T,
    ) -> Result<(Vec<u8>, Digest), crate::store::StoreError> {
        let bytes = oci::canonical_json(value);
        let digest = self.store.put_blob_bytes(&bytes)?;
        Ok((bytes, digest))
    }

    pub(super) fn write_image(
        &self,
        image: &ImagePlan,
        outputs: &HashMap<usize, Arc<NodeOutput>>,
    ) -> Result<ImageSummary, ExportError> {
        // Docker's manifest formats have no annotations. Each goes where its key's type says
        // (validated when the plan was made).
        let annotations: Vec<(Vec<Level>, String, String)> = match self.options.format {
            ManifestFormat::Oci => image
                .annotations
                .iter()
                .filter_map(|(key, value)| {
                    let (levels, key) = annotation::parse_key(key).ok()?;
                    Some((levels, key.to_string(), value.clone()))
                })
                .collect(),
            ManifestFormat::Docker => Vec::new(),
        };
        let at = |wanted: &dyn Fn(&Level) -> bool| -> BTreeMap<String, String> {
            annotations
                .iter()
                .filter(|(levels, _, _)| levels.iter().any(wanted))
                .map(|(_, key, value)| (key.clone(), value.clone()))
                .collect()
        };
        let created = epoch_rfc3339(self.options.layer.source_date_epoch);
        let mut manifests = Vec::new();
        let mut platforms = Vec::new();
        let mut blobs: Vec<Digest> = Vec::new();
        let mut attestations = Vec::new();
        let mut executed = 0;
        let mut cached = 0;
        // Steps of every node the image needs, each node counted once.
        let mut needed: Vec<usize> = image.platforms.iter().map(|(_, node)| *node).collect();
        let mut seen = std::collections::HashSet::new();
        while let Some(id) = needed.pop() {
            if seen.insert(id) {
                if let Some(output) = outputs.get(&id) {
                    executed += output.executed;
                    cached += output.cached;
                }
                needed.extend(self.plan.nodes[id].deps.iter().copied());
            }
        }
        for (platform, node_id) in &image.platforms {
            let node = &self.plan.nodes[*node_id];
            let output = outputs.get(node_id).ok_or_else(|| ExportError::NoOutput {
                stage: node.stage.clone(),
            })?;
            // Every layer an image ships was verified against its diff_id (usually when its
            // snapshot was made; a base image no step ran on is read through here, once).
            for layer in &output.layers {
                if let Err(fault) = self.verify_layer_blob(layer) {
                    // The node's record names a forged layer (from an older store, say): forget
                    // it, so the next build does not find it again.
                    let mut last = node
                        .steps
                        .iter()
                        .rev()
                        .find(|step| step.op.touches_filesystem())
                        .map(|step| step.key);
                    self.forget_forged(&output.layers, &mut last);
                    return Err(fault.into());
                }
            }
            let mut settings = node.settings.clone();
            settings.labels.extend(image.labels.clone());
            let config = config_file(
                &settings,
                platform,
                &output.layers,
                &output.history,
                &created,
            );
            let (config_bytes, config_digest) = self.store_json(&config)?;
            let format = self.options.format;
            let mut layer_descriptors = Vec::with_capacity(output.layers.len());
            for layer in &output.layers {
                layer_descriptors.push(oci::Descriptor {
                    media_type: format.layer(&layer.media_type)?,
                    digest: layer.digest,
                    size: layer.size,
                    platform: None,
                    annotations: BTreeMap::new(),
                });
            }
            let manifest = oci::ImageManifest {
                schema_version: 2,
                media_type: Some(format.manifest().to_string()),
                config: oci::Descriptor {
                    media_type: format.config().to_string(),
                    digest: config_digest,
                    size: config_bytes.len() as u64,
                    platform: None,
                    annotations: BTreeMap::new(),
                },
                layers: layer_descriptors,
                annotations: at(&|level| level.covers_manifest(platform, false)),
            };
            let (manifest_bytes, manifest_digest) = self.store_json(&manifest)?;
            blobs.push(config_digest);
            blobs.push(manifest_digest);
            blobs.extend(output.layers.iter().map(|layer| layer.digest));
            let descriptor = oci::Descriptor {
                media_type: self.options.format.manifest().to_string(),
                digest: manifest_digest,
                size: manifest_bytes.len() as u64,
                platform: Some(oci::OciPlatform {
                    architecture: platform.architecture.clone(),
                    os: platform.os.clone(),
                    variant: platform.variant.clone(),
                }),
                annotations: at(&|level| level.covers_manifest(platform, true)),
            };
            let mut attestation_digest = None;
            let mut sbom = None;
            if let Some(attestation) =
                self.attest_platform(image, platform, *node_id, &output.layers, &descriptor)?
            {
                blobs.extend(attestation.blobs);
                attestation_digest = Some(attestation.descriptor.digest.to_string());
                sbom = attestation.sbom_origin.map(str::to_string);
                attestations.push(attestation.descriptor);
            }
            manifests.push(descriptor);
            platforms.push(PlatformSummary {
                platform: platform.to_string(),
                manifest_digest: manifest_digest.to_string(),
                size: output.layers.iter().map(|layer| layer.size).sum(),
                attestation_digest,
                sbom,
            });
        }
        // As BuildKit does: attestation manifests after every platform manifest.
        manifests.extend(attestations);
        let index = oci::ImageIndex {
            schema_version: 2,
            media_type: Some(self.options.format.index().to_string()),
            manifests,
            annotations: at(&|level| *level == Level::Index),
        };
        let (index_bytes, index_digest) = self.store_json(&index)?;
        blobs.push(index_digest);
        let index_descriptor = |reference: Option<&str>| oci::Descriptor {
            media_type: self.options.format.index().to_string(),
            digest: index_digest,
            size: index_bytes.len() as u64,
            platform: None,
            annotations: {
                let mut annotations = at(&|level| *level == Level::IndexDescriptor);
                if let Some(reference) = reference {
                    annotations.insert(
                        "org.opencontainers.image.ref.name".to_string(),
                        reference.to_string(),
                    );
                }
                annotations
            },
        };
        let mut references: Vec<String> = image.tags.iter().map(|tag| tag_of(tag)).collect();
        let mut seen = std::collections::HashSet::new();
        references.retain(|reference| seen.insert(reference.clone()));
        if references.is_empty() {
            references.push("latest".into());
        }
        let top = oci::ImageIndex {
            schema_version: 2,
            media_type: Some(oci::media::OCI_INDEX.to_string()),
            manifests: references
                .iter()
                .map(|reference| index_descriptor(Some(reference)))
                .collect(),
            annotations: BTreeMap::new(),
        };
        let output_dir = image
            .output
            .clone()
            .unwrap_or_else(|| self.options.output_dir.join(sanitize(&image.name)));
        blobs.sort();
        blobs.dedup();
        let up_to_date =
            layout_is_current(&output_dir, &oci::canonical_json(&top), &blobs, self.store);
        let blob_paths: Vec<(Digest, oci::BlobSource)> = blobs
            .iter()
            .map(|digest| (*digest, oci::BlobSource::Path(self.store.blob_path(digest))))
            .collect();
        let written = if up_to_date {
            Ok(())
        } else {
            oci::write_layout(&output_dir, &top, blob_paths)
        };
        if let Err(oci::OciError::DigestMismatch {
            expected, actual, ..
        }) = &written
            && blobs.contains(expected)
        {
            self.corrupt_blob(expected, &format!("its content hashes to {actual}"));
        }
        written.map_err(|source| ExportError::Layout {
            dir: output_dir.clone(),
            source: Box::new(source),
        })?;
        Ok(ImageSummary {
            name: image.name.clone(),
            index_digest: index_digest.to_string(),
            output: output_dir.display().to_string(),
            tags: image.tags.clone(),
            platforms,
            executed,
            cached,
        })
    }
}

/// Whether `dir` already holds exactly this layout: the same `index.json` bytes and every blob
/// present with its size (blobs are named by digest and were verified when written). A warm
/// build then rewrites nothing.
pub(super) fn layout_is_current(
    dir: &Path,
    index_json: &[u8],
    blobs: &[Digest],
    store: &Store,
) -> bool {
    let same_index =
        std::fs::read(dir.join("index.json")).is_ok_and(|existing| existing == index_json);
    same_index
        && dir.join("oci-layout").is_file()
        && blobs.iter().all(|digest| {
            let in_layout = std::fs::metadata(dir.join("blobs/sha256").join(digest.hex()));
            let in_store = std::fs::metadata(store.blob_path(digest));
            matches!((in_layout, in_store), (Ok(a), Ok(b)) if a.len() == b.len())
        })
}

/// The tag part of a reference (`registry/app:1.0` → `1.0`), or the whole string.
pub(super) fn tag_of(reference: &str) -> String {
    let name_end = reference.rfind('/').map_or(0, |slash| slash + 1);
    match reference[name_end..].rsplit_once(':') {
        Some((_, tag)) => tag.to_string(),
        None => "latest".to_string(),
    }
}

/// A directory name for an image name.
pub(super) fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

pub(super) fn epoch_rfc3339(epoch: i64) -> String {
    let days = epoch.div_euclid(86_400);
    let seconds = epoch.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let day_of_year = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        seconds / 3600,
        (seconds % 3600) / 60,
        seconds % 60
    )
}

pub(super) fn config_file(
    settings: &ImageSettings,
    platform: &Platform,
    layers: &[LayerDesc],
    history: &[HistoryEntry],
    created: &str,
) -> oci::ImageConfigFile {
    oci::ImageConfigFile {
        created: Some(created.to_string()),
        architecture: platform.architecture.clone(),
        os: platform.os.clone(),
        variant: platform.variant.clone(),
        config: oci::ContainerConfig {
            user: (!settings.user.is_empty()).then(|| settings.user.clone()),
            exposed_ports: settings.exposed_ports.clone(),
            env: settings
                .env
                .iter()
                .map(|(key, value)| format!("{key}={value}"))
                .collect(),
            entrypoint: settings.entrypoint.clone().unwrap_or_default(),
            cmd: settings.cmd.clone().unwrap_or_default(),
            volumes: settings.volumes.clone(),
            working_dir: (!settings.workdir.is_empty()).then(|| settings.workdir.clone()),
            labels: settings.labels.clone(),
            stop_signal: settings.stop_signal.clone(),
            healthcheck: settings.healthcheck.as_ref().map(|check| oci::Healthcheck {
                test: check.test.clone(),
                interval: check.interval_ns.unwrap_or(0),
                timeout: check.timeout_ns.unwrap_or(0),
                start_period: check.start_period_ns.unwrap_or(0),
                retries: u64::from(check.retries.unwrap_or(0)),
            }),
            shell: settings.shell.clone(),
        },
        rootfs: oci::RootFs {
            kind: "layers".into(),
            diff_ids: layers.iter().map(|layer| layer.diff_id).collect(),
        },
        history: history
            .iter()
            .map(|entry| oci::History {
                created: Some(created.to_string()),
                created_by: Some(entry.created_by.clone()),
                empty_layer: entry.empty_layer,
                comment: None,
                author: None,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn epochs_format_as_rfc3339() {
        assert_eq!(epoch_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(epoch_rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    pub(super) fn tags_are_taken_from_references() {
        assert_eq!(tag_of("registry.example.com:5000/app:1.0"), "1.0");
        assert_eq!(tag_of("registry.example.com:5000/app"), "latest");
        assert_eq!(tag_of("app"), "latest");
    }
}
