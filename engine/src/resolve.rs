//! Base images: turning a `from` reference into a manifest digest, layers and settings.
//!
//! Resolution is pluggable ([`Resolver`]) so registry references (`docker.io/library/…`) can
//! join OCI layouts (`oci:PATH[:TAG]`) without the planner knowing the difference. A base
//! resolves once per (reference, platform) per run, and its manifest digest is what enters
//! the cache key, never the tag.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use graphbuild_lang::platform::Platform;

use crate::digest::Digest;
use crate::oci::{self, OciLayout};
use crate::state::{HealthcheckSettings, HistoryEntry, ImageSettings, LayerDesc};
use crate::store::Store;

/// A base image, resolved for one platform.
#[derive(Clone, Debug)]
pub struct ResolvedBase {
    /// The reference as written, after substitution.
    pub reference: String,
    pub manifest_digest: Digest,
    pub platform: Platform,
    pub layers: Vec<LayerDesc>,
    pub history: Vec<HistoryEntry>,
    pub settings: ImageSettings,
    pub source: BaseSource,
}

#[derive(Clone, Debug)]
pub enum BaseSource {
    OciLayout { dir: PathBuf },
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("cannot read the OCI layout `{dir}`: {message}")]
    Layout { dir: String, message: String },
    #[error("`{reference}` is a registry reference; pulling from registries is not supported yet")]
    RegistryUnsupported { reference: String },
    #[error("the base image `{reference}` has no manifest for {platform}{available}")]
    NoPlatform { reference: String, platform: String, available: String },
    #[error("cannot copy layer {digest} of `{reference}` into the store: {message}")]
    Fetch { reference: String, digest: Digest, message: String },
}

impl ResolveError {
    pub fn help(&self) -> String {
        match self {
            ResolveError::Layout { .. } => {
                "an OCI layout is a directory with `oci-layout`, `index.json` and `blobs/`; write `oci:PATH:TAG` with PATH relative to the build file".into()
            }
            ResolveError::RegistryUnsupported { .. } => {
                "copy the image into an OCI layout (`skopeo copy --all docker://REF oci:DIR:TAG`) and use `from \"oci:DIR:TAG\"`".into()
            }
            ResolveError::NoPlatform { .. } => {
                "build this image only for the platforms its base provides (`platforms …` on the image, or `--platform`)".into()
            }
            ResolveError::Fetch { .. } => "check that the layout is complete and readable".into(),
        }
    }
}

/// Resolves base references. Implementations cache: one resolution per run.
pub trait Resolver: Send + Sync {
    fn resolve(&self, reference: &str, platform: &Platform) -> Result<Arc<ResolvedBase>, ResolveError>;
    /// Make every layer blob of `base` present in `store`.
    fn fetch_layers(&self, base: &ResolvedBase, store: &Store) -> Result<(), ResolveError>;
}

/// Resolves `oci:PATH[:TAG]` relative to a directory (the build file's).
pub struct LayoutResolver {
    root_dir: PathBuf,
    cache: Mutex<HashMap<(String, Platform), Arc<ResolvedBase>>>,
}

impl LayoutResolver {
    pub fn new(root_dir: &Path) -> Self {
        LayoutResolver { root_dir: root_dir.to_path_buf(), cache: Mutex::new(HashMap::new()) }
    }
}

/// Split `oci:PATH[:TAG]` into the path and the tag.
pub fn parse_oci_reference(reference: &str) -> Option<(&str, Option<&str>)> {
    let rest = reference.strip_prefix("oci:")?;
    match rest.rsplit_once(':') {
        Some((path, tag)) if !tag.is_empty() && !tag.contains('/') => Some((path, Some(tag))),
        _ => Some((rest, None)),
    }
}

impl Resolver for LayoutResolver {
    fn resolve(&self, reference: &str, platform: &Platform) -> Result<Arc<ResolvedBase>, ResolveError> {
        let cache_key = (reference.to_string(), platform.clone());
        if let Some(hit) = self.cache.lock().ok().and_then(|cache| cache.get(&cache_key).cloned()) {
            return Ok(hit);
        }
        let Some((path, tag)) = parse_oci_reference(reference) else {
            return Err(ResolveError::RegistryUnsupported { reference: reference.to_string() });
        };
        let dir = self.root_dir.join(path);
        let layout_error = |message: String| ResolveError::Layout { dir: path.to_string(), message };
        let layout = OciLayout::open(&dir).map_err(|error| layout_error(error.to_string()))?;
        let top = layout.resolve(tag).map_err(|error| layout_error(error.to_string()))?;
        let (manifest, manifest_descriptor) = layout.select_platform(&top, platform).map_err(|error| match error {
            oci::OciError::NoMatchingPlatform { available, .. } => ResolveError::NoPlatform {
                reference: reference.to_string(),
                platform: platform.to_string(),
                available: if available.is_empty() {
                    String::new()
                } else {
                    let names: Vec<String> = available.iter().map(ToString::to_string).collect();
                    format!(" (it has {})", names.join(", "))
                },
            },
            other => layout_error(other.to_string()),
        })?;
        let config_bytes = layout.read_blob(&manifest.config.digest).map_err(|error| layout_error(error.to_string()))?;
        let config: oci::ImageConfigFile =
            serde_json::from_slice(&config_bytes).map_err(|error| layout_error(format!("invalid image config: {error}")))?;
        if config.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(layout_error(format!(
                "the manifest lists {} layers but the config {} diff ids",
                manifest.layers.len(),
                config.rootfs.diff_ids.len()
            )));
        }
        let layers = manifest
            .layers
            .iter()
            .zip(&config.rootfs.diff_ids)
            .map(|(layer, diff_id)| LayerDesc {
                digest: layer.digest,
                diff_id: *diff_id,
                size: layer.size,
                media_type: layer.media_type.clone(),
            })
            .collect();
        let history = config
            .history
            .iter()
            .map(|entry| HistoryEntry {
                created_by: entry.created_by.clone().unwrap_or_default(),
                empty_layer: entry.empty_layer,
            })
            .collect();
        let resolved = Arc::new(ResolvedBase {
            reference: reference.to_string(),
            manifest_digest: manifest_descriptor.digest,
            platform: platform.clone(),
            layers,
            history,
            settings: settings_from_config(&config.config),
            source: BaseSource::OciLayout { dir },
        });
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(cache_key, resolved.clone());
        }
        Ok(resolved)
    }

    fn fetch_layers(&self, base: &ResolvedBase, store: &Store) -> Result<(), ResolveError> {
        let BaseSource::OciLayout { dir } = &base.source;
        for layer in &base.layers {
            if store.has_blob(&layer.digest) {
                continue;
            }
            let fetch_error = |message: String| ResolveError::Fetch {
                reference: base.reference.clone(),
                digest: layer.digest,
                message,
            };
            let source = dir.join("blobs/sha256").join(layer.digest.hex());
            let temp = store.temp_dir().map_err(|error| fetch_error(error.to_string()))?;
            let copy = temp.path().join("blob");
            std::fs::copy(&source, &copy).map_err(|error| fetch_error(error.to_string()))?;
            store.put_blob_file(&copy, Some(layer.digest)).map_err(|error| fetch_error(error.to_string()))?;
        }
        Ok(())
    }
}

/// Image settings from an image config's `config` section.
pub fn settings_from_config(config: &oci::ContainerConfig) -> ImageSettings {
    let non_zero = |value: u64| (value != 0).then_some(value);
    ImageSettings {
        env: config
            .env
            .iter()
            .map(|entry| match entry.split_once('=') {
                Some((key, value)) => (key.to_string(), value.to_string()),
                None => (entry.clone(), String::new()),
            })
            .collect(),
        workdir: config.working_dir.clone().unwrap_or_default(),
        user: config.user.clone().unwrap_or_default(),
        labels: config.labels.clone(),
        exposed_ports: config.exposed_ports.clone(),
        entrypoint: (!config.entrypoint.is_empty()).then(|| config.entrypoint.clone()),
        cmd: (!config.cmd.is_empty()).then(|| config.cmd.clone()),
        volumes: config.volumes.clone(),
        shell: Vec::new(),
        stop_signal: config.stop_signal.clone(),
        healthcheck: config.healthcheck.as_ref().map(|check| HealthcheckSettings {
            test: check.test.clone(),
            interval_ns: non_zero(check.interval),
            timeout_ns: non_zero(check.timeout),
            start_period_ns: non_zero(check.start_period),
            retries: u32::try_from(check.retries).ok().filter(|retries| *retries != 0),
        }),
    }
}
