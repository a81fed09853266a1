//! Attaching attestations to an image being exported: each platform's statements (SLSA
//! provenance, SPDX SBOM) wrapped in an attestation manifest (see [`crate::attest`]).
//!
//! The SBOM, the one that costs something (it reads the layers), is cached like a step: under
//! a key made of the scanner's version, the platform, `SOURCE_DATE_EPOCH` and the layers'
//! diff_ids, in the local action cache and in the team cache. A warm build, or one assembled
//! from the team cache, reads the document instead of scanning again. The provenance is a
//! function of the plan's keys and is serialized afresh (microseconds); both give the same
//! bytes every time.

use std::collections::BTreeMap;

use graphbuild_lang::ir::ProvenanceSetting;
use graphbuild_lang::platform::Platform;
use serde_json::json;

use crate::attest::{self, provenance, sbom};
use crate::digest::{Digest, Key};
use crate::key::KeyBuilder;
use crate::oci;
use crate::plan::ImagePlan;
use crate::remote::ActionResult;
use crate::state::LayerDesc;

use super::Executor;
use super::export::{ManifestFormat, epoch_rfc3339};
use super::faults::AttestError;
use super::step_cache::CacheError;

/// Bump when the scanner or the document changes: cached SBOMs are then made again.
const SBOM_VERSION: &str = "graphbuild-sbom-v1";

/// An SPDX document larger than this is refused (it would not fit the team cache's records).
const MAX_SBOM_SIZE: usize = crate::remote::MAX_STEP_RECORD_SIZE as usize;

/// The blobs an attestation manifest adds to the layout, and its index entry.
pub(super) struct Attestation {
    pub(super) descriptor: oci::Descriptor,
    pub(super) blobs: Vec<Digest>,
    /// Where the SBOM came from (`scanned`, `local cache`, `team cache`), when there is one.
    pub(super) sbom_origin: Option<&'static str>,
}

impl Executor<'_> {
    /// The attestation manifest for one platform manifest of `image`, or `None` when no
    /// attestation is asked for.
    pub(super) fn attest_platform(
        &self,
        image: &ImagePlan,
        platform: &Platform,
        node: usize,
        layers: &[LayerDesc],
        manifest: &oci::Descriptor,
    ) -> Result<Option<Attestation>, AttestError> {
        let options = &self.options.attest;
        // The image's own properties take precedence over the command line.
        let provenance = match image.provenance {
            Some(ProvenanceSetting::Off) => None,
            Some(ProvenanceSetting::Min) => Some(attest::ProvenanceMode::Min),
            Some(ProvenanceSetting::Max) => Some(attest::ProvenanceMode::Max),
            None => options.provenance,
        };
        let sbom = options.sbom || image.sbom;
        if provenance.is_none() && !sbom {
            return Ok(None);
        }
        let subjects = attest::subjects(&image.tags, &image.name, platform, &manifest.digest);
        let mut statements: Vec<(Vec<u8>, &str)> = Vec::new();
        if let Some(mode) = provenance {
            let predicate = provenance::predicate(&provenance::Input {
                mode,
                request: &options.request,
                plan: self.plan,
                sources: self.sources,
                image,
                platform,
                node,
                source_date_epoch: self.options.layer.source_date_epoch,
                format: match self.options.format {
                    ManifestFormat::Oci => "oci",
                    ManifestFormat::Docker => "docker",
                },
                compression: match self.options.layer.compression {
                    crate::layer::Compression::Gzip => "gzip",
                    crate::layer::Compression::Zstd => "zstd",
                    crate::layer::Compression::None => "none",
                },
            });
            let statement = attest::statement(&subjects, attest::PROVENANCE_PREDICATE, predicate);
            statements.push((
                oci::canonical_json(&statement),
                attest::PROVENANCE_PREDICATE,
            ));
        }
        let mut sbom_origin = None;
        if sbom {
            let (document, origin) = self.sbom_document(platform, layers)?;
            sbom_origin = Some(origin);
            let document: serde_json::Value =
                serde_json::from_slice(&document).map_err(|source| AttestError::NotJson {
                    platform: platform.to_string(),
                    source,
                })?;
            let statement = attest::statement(&subjects, attest::SPDX_PREDICATE, document);
            statements.push((oci::canonical_json(&statement), attest::SPDX_PREDICATE));
        }
        let mut attestation = self.attestation_manifest(manifest, &statements)?;
        attestation.sbom_origin = sbom_origin;
        Ok(Some(attestation))
    }

    /// Store the statements and the manifest holding them, BuildKit's way.
    fn attestation_manifest(
        &self,
        subject: &oci::Descriptor,
        statements: &[(Vec<u8>, &str)],
    ) -> Result<Attestation, AttestError> {
        let oci_format = self.options.format == ManifestFormat::Oci;
        let mut blobs = Vec::new();
        let mut layers = Vec::new();
        for (bytes, predicate_type) in statements {
            let digest = self.store.put_blob_bytes(bytes)?;
            blobs.push(digest);
            let mut layer = json!({
                "mediaType": attest::IN_TOTO_MEDIA_TYPE,
                "digest": digest.to_string(),
                "size": bytes.len(),
            });
            // Docker's manifest format has no annotations.
            if oci_format {
                layer["annotations"] = json!({ attest::PREDICATE_TYPE_ANNOTATION: predicate_type });
            }
            layers.push(layer);
        }
        let manifest = if oci_format {
            // An OCI artifact: the empty config, the platform manifest as subject.
            let empty = b"{}";
            let empty_digest = self.store.put_blob_bytes(empty)?;
            blobs.push(empty_digest);
            json!({
                "schemaVersion": 2,
                "mediaType": oci::media::OCI_MANIFEST,
                "artifactType": attest::ATTESTATION_ARTIFACT_TYPE,
                "config": {
                    "mediaType": attest::OCI_EMPTY_MEDIA_TYPE,
                    "digest": empty_digest.to_string(),
                    "size": empty.len(),
                    "data": "e30=",
                },
                "layers": layers,
                "subject": {
                    "mediaType": subject.media_type,
                    "digest": subject.digest.to_string(),
                    "size": subject.size,
                },
            })
        } else {
            // Docker's format: an image config for `unknown/unknown` whose diff_ids are the
            // statements' digests (they are stored uncompressed).
            let config = json!({
                "architecture": "unknown",
                "os": "unknown",
                "config": {},
                "rootfs": {
                    "type": "layers",
                    "diff_ids": blobs.iter().map(ToString::to_string).collect::<Vec<_>>(),
                },
            });
            let (config_bytes, config_digest) = self.store_json(&config)?;
            blobs.push(config_digest);
            json!({
                "schemaVersion": 2,
                "mediaType": oci::media::DOCKER_MANIFEST,
                "config": {
                    "mediaType": oci::media::DOCKER_CONFIG,
                    "digest": config_digest.to_string(),
                    "size": config_bytes.len(),
                },
                "layers": layers,
            })
        };
        let (manifest_bytes, manifest_digest) = self.store_json(&manifest)?;
        blobs.push(manifest_digest);
        let descriptor = oci::Descriptor {
            media_type: if oci_format {
                oci::media::OCI_MANIFEST.to_string()
            } else {
                oci::media::DOCKER_MANIFEST.to_string()
            },
            digest: manifest_digest,
            size: manifest_bytes.len() as u64,
            platform: Some(oci::OciPlatform::new("unknown", "unknown", None)),
            annotations: BTreeMap::from([
                (
                    attest::REFERENCE_DIGEST_ANNOTATION.to_string(),
                    subject.digest.to_string(),
                ),
                (
                    attest::REFERENCE_TYPE_ANNOTATION.to_string(),
                    attest::ATTESTATION_MANIFEST.to_string(),
                ),
            ]),
        };
        Ok(Attestation {
            descriptor,
            blobs,
            sbom_origin: None,
        })
    }

    fn sbom_key(&self, platform: &Platform, layers: &[LayerDesc]) -> Key {
        let mut builder = KeyBuilder::new("sbom");
        builder
            .str(SBOM_VERSION)
            .str(&platform.to_string())
            .json(&self.options.layer.source_date_epoch);
        for layer in layers {
            builder.str(&layer.diff_id.to_string());
        }
        builder.finish()
    }

    /// The SPDX document of a platform's filesystem: from the local store, else the team
    /// cache, else scanned now (and then recorded in both).
    fn sbom_document(
        &self,
        platform: &Platform,
        layers: &[LayerDesc],
    ) -> Result<(Vec<u8>, &'static str), AttestError> {
        let key = self.sbom_key(platform, layers);
        if !self.options.no_cache {
            if let Some(document) = self.local_sbom(&key) {
                return Ok((document, "local cache"));
            }
            if let Some(document) = self.remote_sbom(&key)? {
                self.record_sbom(&key, &document)?;
                return Ok((document, "team cache"));
            }
        }
        let scan = sbom::scan_layers(self.store, layers).map_err(|error| match error {
            sbom::ScanError::Store(source) => AttestError::ScanStore {
                platform: platform.to_string(),
                source,
            },
            sbom::ScanError::Layer { digest, source } => AttestError::ScanLayer {
                platform: platform.to_string(),
                digest,
                source,
            },
        })?;
        let created = epoch_rfc3339(self.options.layer.source_date_epoch);
        let document = sbom::spdx_document(&scan, &platform.to_string(), &key.hex(), &created);
        let bytes = oci::canonical_json(&document);
        if bytes.len() > MAX_SBOM_SIZE {
            return Err(AttestError::TooLarge {
                platform: platform.to_string(),
                size: bytes.len(),
                max: MAX_SBOM_SIZE,
            });
        }
        self.record_sbom(&key, &bytes)?;
        self.publish_sbom(&key, &bytes)?;
        Ok((bytes, "scanned"))
    }

    fn local_sbom(&self, key: &Key) -> Option<Vec<u8>> {
        let record: serde_json::Value =
            serde_json::from_slice(&self.store.get_action(key)?).ok()?;
        let layer = record.get("layers")?.get(0)?;
        let digest: Digest = layer.get("digest")?.as_str()?.parse().ok()?;
        let size = layer.get("size")?.as_u64()?;
        if !self.blob_present(&digest, size) {
            return None;
        }
        let bytes = self.store.read_blob(&digest).ok()?;
        is_spdx(&bytes).then_some(bytes)
    }

    /// Record the document locally: the blob, and an action naming it (in the form the store's
    /// `verify` and `prune` read: a `layers` list of digest and size).
    fn record_sbom(&self, key: &Key, document: &[u8]) -> Result<(), CacheError> {
        let failed = |source| CacheError::Record {
            what: "SBOM",
            source,
        };
        let digest = self.store.put_blob_bytes(document).map_err(failed)?;
        let record = json!({
            "kind": "sbom",
            "layers": [{ "digest": digest.to_string(), "size": document.len() }],
        });
        self.store
            .put_action(key, &oci::canonical_json(&record))
            .map_err(failed)
    }

    fn remote_sbom(&self, key: &Key) -> Result<Option<Vec<u8>>, CacheError> {
        let Some(remote) = self.usable_remote(self.options.remote.from.as_ref()) else {
            return Ok(None);
        };
        let result = (|| -> Result<Option<Vec<u8>>, CacheError> {
            let temp = self
                .store
                .temp_dir()
                .map_err(|source| CacheError::TempDir { source })?;
            let fetched = remote.get_step_record(&key.hex(), temp.path());
            let Some(bytes) = self.remote_entry(remote, fetched, None)? else {
                return Ok(None);
            };
            if !is_spdx(&bytes) {
                self.warn_bad_remote_entry(remote, "an SBOM entry is not an SPDX document");
                return Ok(None);
            }
            Ok(Some(bytes))
        })();
        match result {
            Ok(found) => Ok(found),
            Err(error) => self.remote_trouble(remote, error).map(|()| None),
        }
    }

    fn publish_sbom(&self, key: &Key, document: &[u8]) -> Result<(), CacheError> {
        let Some(remote) = self.usable_remote(self.options.remote.to.as_ref()) else {
            return Ok(());
        };
        let result = (|| -> Result<(), CacheError> {
            let digest = remote.put_blob_bytes(document)?;
            remote.put_action(
                &key.hex(),
                &ActionResult::for_step_record(digest, document.len() as u64),
            )?;
            Ok(())
        })();
        match result {
            Ok(()) => Ok(()),
            Err(error) => self.remote_trouble(remote, error),
        }
    }
}

/// Whether bytes are an SPDX 2.3 JSON document (what a cache entry must be to be used).
fn is_spdx(bytes: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .is_ok_and(|value| value.get("spdxVersion").and_then(|v| v.as_str()) == Some("SPDX-2.3"))
}
