//! Base images: turning a `from` reference into a manifest digest, layers and settings.
//!
//! Resolution is pluggable ([`Resolver`]) so registry references (`docker.io/library/…`) can
//! join OCI layouts (`oci:PATH[:TAG]`) without the planner knowing the difference. A base
//! resolves once per (reference, platform) per run, and its manifest digest is what enters
//! the cache key, never the tag.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use graphbuild_lang::Code;
use graphbuild_lang::platform::Platform;

use crate::digest::Digest;
use crate::oci::{self, OciLayout};
use crate::reference::Reference;
use crate::registry::{BlobFetch, RegistryClient};
use crate::state::{HealthcheckSettings, HistoryEntry, ImageSettings, LayerDesc};
use crate::store::{BlobState, Store};

mod sources;

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
    OciLayout {
        dir: PathBuf,
    },
    /// A registry image, pinned to the manifest digest it resolved to.
    Registry {
        reference: Reference,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("cannot read the OCI layout `{dir}`: {message}")]
    Layout { dir: String, message: String },
    #[error("`{reference}` is not a valid image reference: {message}")]
    InvalidReference {
        reference: String,
        message: String,
        help: String,
    },
    #[error("cannot pull `{reference}`: {message}")]
    Registry {
        reference: String,
        message: String,
        help: String,
        /// The network or credentials failed, not the build file.
        environment: bool,
    },

    #[error("the base image `{reference}` has no manifest for {platform}{available}")]
    NoPlatform {
        reference: String,
        platform: String,
        available: String,
    },
    /// The base cannot be had without the network: `--offline` without a lock entry (or
    /// without its manifest in the store), or a registry nothing can be connected to (no
    /// network, a name that does not resolve, a refused connection). The planner
    /// makes its keys *pending* instead of failing; `run` refuses to build them.
    #[error("cannot resolve `{}` for {}: {}", .0.reference, .0.platform, .0.reason)]
    Unresolved(Box<Unresolved>),
    /// An `add` source (a URL, a git repository) that cannot be used: its server refused it,
    /// or it is not what the build file says. The message names the source redacted.
    #[error("{message}")]
    Source { message: String, help: String },
    #[error("cannot copy layer {digest} of `{reference}` into the store: {message}")]
    Fetch {
        reference: String,
        digest: Digest,
        message: String,
    },
}

impl ResolveError {
    /// The diagnostic code: environment problems (network, credentials) get their own, so the
    /// CLI can exit with code 3 instead of 2.
    pub fn code(&self) -> Code {
        match self {
            ResolveError::Registry {
                environment: true, ..
            }
            | ResolveError::Unresolved(_) => Code::BaseImageUnavailable,
            ResolveError::Source { .. } => Code::Copy,
            _ => Code::BaseImage,
        }
    }

    pub fn help(&self) -> String {
        match self {
            ResolveError::Layout { .. } => {
                "an OCI layout is a directory with `oci-layout`, `index.json` and `blobs/`; write `oci:PATH:TAG` with PATH relative to the build file".into()
            }
            ResolveError::InvalidReference { help, .. } | ResolveError::Registry { help, .. } => help.clone(),

            ResolveError::NoPlatform { .. } => {
                "build this image only for the platforms its base provides (`platforms …` on the image, or `--platform`)".into()
            }
            ResolveError::Fetch { .. } => "check that the layout is complete and readable".into(),
            ResolveError::Source { help, .. } => help.clone(),
            ResolveError::Unresolved(unresolved) => unresolved.help(),
        }
    }
}

/// A registry base that could not be resolved without the network. Its digest (unless the
/// lock file has it), its layers and its settings are unknown, so every key built on it is
/// pending.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unresolved {
    /// The reference as written, after substitution.
    pub reference: String,
    pub platform: Platform,
    /// The manifest digest graphbuild.lock pins it to, when it does.
    pub locked: Option<Digest>,
    /// Why: `--offline`, or the registry's error.
    pub reason: String,
}

impl Unresolved {
    pub fn help(&self) -> String {
        if sources::is_source(&self.reference) {
            return sources::help();
        }
        match self.locked {
            Some(_) => concat!(
                "a base pinned by graphbuild.lock (or by its digest) resolves offline once its ",
                "manifest is in the local store: run `graphbuild lock FILE` once with network ",
                "access on this machine"
            )
            .into(),
            None => concat!(
                "pin registry bases with `graphbuild lock FILE` while the registries are ",
                "reachable: with graphbuild.lock and the manifests `lock` saves in the local ",
                "store, `plan` and `run` need no network"
            )
            .into(),
        }
    }
}

/// Resolves base references. Implementations cache: one resolution per run.
pub trait Resolver: Send + Sync {
    fn resolve(
        &self,
        reference: &str,
        platform: &Platform,
    ) -> Result<Arc<ResolvedBase>, ResolveError>;
    /// Make every layer blob of `base` present in `store`.
    fn fetch_layers(&self, base: &ResolvedBase, store: &Store) -> Result<(), ResolveError>;

    /// The sha256 of the file at `url` for an `add`, what its key is made of: `checksum` when
    /// given (nothing downloaded), else the digest of the body downloaded now. This resolver
    /// has no network: without a checksum the source is [`ResolveError::Unresolved`].
    fn fetch_url(
        &self,
        url: &str,
        checksum: Option<Digest>,
        platform: &Platform,
    ) -> Result<Digest, ResolveError> {
        checksum.ok_or_else(|| sources::unresolved(url, platform, "no network for downloads"))
    }

    /// The commit `reference` names in the git repository at `url`. This resolver has no
    /// network: only a full commit hash resolves.
    fn resolve_git(
        &self,
        url: &str,
        reference: &str,
        platform: &Platform,
    ) -> Result<String, ResolveError> {
        if crate::git_source::is_commit(reference) {
            return Ok(reference.to_ascii_lowercase());
        }
        Err(sources::unresolved(url, platform, "no network for git"))
    }
}

/// Resolves `oci:PATH[:TAG]` relative to a directory (the build file's).
pub struct LayoutResolver {
    root_dir: PathBuf,
    cache: Mutex<HashMap<(String, Platform), Arc<ResolvedBase>>>,
}

impl LayoutResolver {
    pub fn new(root_dir: &Path) -> Self {
        LayoutResolver {
            root_dir: root_dir.to_path_buf(),
            cache: Mutex::new(HashMap::new()),
        }
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
    fn resolve(
        &self,
        reference: &str,
        platform: &Platform,
    ) -> Result<Arc<ResolvedBase>, ResolveError> {
        let cache_key = (reference.to_string(), platform.clone());
        if let Some(hit) = self
            .cache
            .lock()
            .ok()
            .and_then(|cache| cache.get(&cache_key).cloned())
        {
            return Ok(hit);
        }
        let Some((path, tag)) = parse_oci_reference(reference) else {
            return Err(ResolveError::InvalidReference {
                reference: reference.to_string(),
                message: "not an `oci:PATH[:TAG]` layout".into(),
                help: "this resolver reads OCI layouts only".into(),
            });
        };
        let dir = self.root_dir.join(path);
        let layout_error = |message: String| ResolveError::Layout {
            dir: path.to_string(),
            message,
        };
        let layout = OciLayout::open(&dir).map_err(|error| layout_error(error.to_string()))?;
        let top = layout
            .resolve(tag)
            .map_err(|error| layout_error(error.to_string()))?;
        let (manifest, manifest_descriptor) =
            layout
                .select_platform(&top, platform)
                .map_err(|error| match error {
                    oci::OciError::NoMatchingPlatform { available, .. } => {
                        ResolveError::NoPlatform {
                            reference: reference.to_string(),
                            platform: platform.to_string(),
                            available: if available.is_empty() {
                                String::new()
                            } else {
                                let names: Vec<String> =
                                    available.iter().map(ToString::to_string).collect();
                                format!(" (it has {})", names.join(", "))
                            },
                        }
                    }
                    other => layout_error(other.to_string()),
                })?;
        let config_bytes = layout
            .read_blob(&manifest.config.digest)
            .map_err(|error| layout_error(error.to_string()))?;
        let config: oci::ImageConfigFile = serde_json::from_slice(&config_bytes)
            .map_err(|error| layout_error(format!("invalid image config: {error}")))?;
        let resolved = Arc::new(
            base_from_parts(
                reference,
                manifest_descriptor.digest,
                platform,
                &manifest,
                &config,
                BaseSource::OciLayout { dir },
            )
            .map_err(layout_error)?,
        );
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(cache_key, resolved.clone());
        }
        Ok(resolved)
    }

    fn fetch_layers(&self, base: &ResolvedBase, store: &Store) -> Result<(), ResolveError> {
        let BaseSource::OciLayout { dir } = &base.source else {
            return Err(ResolveError::Fetch {
                reference: base.reference.clone(),
                digest: base.manifest_digest,
                message: "not an OCI layout base".into(),
            });
        };
        for layer in &base.layers {
            // A blob of the wrong size is corrupt: `check_blob` removes it, and it is copied again.
            if store.check_blob(&layer.digest, layer.size) == BlobState::Present {
                continue;
            }
            let fetch_error = |message: String| ResolveError::Fetch {
                reference: base.reference.clone(),
                digest: layer.digest,
                message,
            };
            let source = dir.join("blobs/sha256").join(layer.digest.hex());
            let temp = store
                .temp_dir()
                .map_err(|error| fetch_error(error.to_string()))?;
            let copy = temp.path().join("blob");
            std::fs::copy(&source, &copy).map_err(|error| fetch_error(error.to_string()))?;
            store
                .put_blob_file(&copy, Some(layer.digest))
                .map_err(|error| fetch_error(error.to_string()))?;
        }
        Ok(())
    }
}

/// What `graphbuild.lock` records: the manifest digest each registry base resolved to, per
/// platform. Sorted, so the file is stable under version control.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LockFile {
    pub version: u32,
    pub bases: Vec<LockedBase>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct LockedBase {
    /// The reference as written in the build file (after substitution).
    pub reference: String,
    pub platform: String,
    /// The platform's image manifest.
    pub digest: Digest,
}

/// A lock file that exists but cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LockFileError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a valid lock file: {source}", path.display())]
    Invalid {
        path: PathBuf,
        source: serde_json::Error,
    },
}

impl LockFile {
    /// The lock file at `path`; `None` when there is none.
    pub fn read(path: &Path) -> Result<Option<LockFile>, LockFileError> {
        let path_buf = || path.to_path_buf();
        match std::fs::read(path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| LockFileError::Invalid {
                        path: path_buf(),
                        source,
                    })
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(LockFileError::Read {
                path: path_buf(),
                source,
            }),
        }
    }

    /// Write atomically (temp file + rename).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut sorted = self.clone();
        sorted.version = 1;
        sorted.bases.sort();
        sorted.bases.dedup();
        let mut bytes = serde_json::to_vec_pretty(&sorted).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        let temp = path.with_extension("lock.tmp");
        std::fs::write(&temp, bytes)?;
        std::fs::rename(&temp, path)
    }

    fn find(&self, reference: &str, platform: &Platform) -> Option<Digest> {
        let platform = platform.to_string();
        self.bases
            .iter()
            .find(|base| base.reference == reference && base.platform == platform)
            .map(|base| base.digest)
    }
}

/// How registry bases are pinned.
#[derive(Clone, Debug)]
pub enum LockMode {
    /// Resolve tags; use the lock file's digests for references it has.
    UseLock(LockFile),
    /// Resolve every tag afresh (`--pull`, `graphbuild lock`).
    Refresh,
}

/// Resolves OCI layouts and registry references, with a lock file.
pub struct DefaultResolver {
    layouts: LayoutResolver,
    registry: RegistryClient,
    lock: LockMode,
    cache: Mutex<HashMap<(String, Platform), Arc<ResolvedBase>>>,
    /// Every registry base resolved, for writing the lock file.
    resolved: Mutex<Vec<LockedBase>>,
    scratch: tempfile::TempDir,
    /// Never ask a registry: only the lock file and the store (`--offline`).
    offline: bool,
    /// Where resolved manifests and configs are kept, so a locked base resolves without the
    /// network next time; and where an offline resolution looks for them.
    store: Option<Store>,
    /// Layer downloads that failed because of the network or `--offline`: an environment
    /// problem (exit code 3), not a build failure.
    unavailable: Mutex<Vec<String>>,
    /// `add` sources resolved this run (a URL's digest, a git ref's commit), so a source shared
    /// by several platforms is downloaded or listed once.
    sources: sources::SourceCache,
}

impl DefaultResolver {
    pub fn new(root_dir: &Path, registry: RegistryClient, lock: LockMode) -> std::io::Result<Self> {
        Ok(DefaultResolver {
            layouts: LayoutResolver::new(root_dir),
            registry,
            lock,
            cache: Mutex::new(HashMap::new()),
            resolved: Mutex::new(Vec::new()),
            scratch: tempfile::Builder::new()
                .prefix("graphbuild-resolve-")
                .tempdir()?,
            offline: false,
            store: None,
            unavailable: Mutex::new(Vec::new()),
            sources: sources::SourceCache::default(),
        })
    }

    /// Use only the lock file and the store; a base they do not cover is
    /// [`ResolveError::Unresolved`] and missing layers are an error, without touching the
    /// network.
    pub fn offline(mut self, offline: bool) -> Self {
        self.offline = offline;
        self
    }

    /// Keep resolved manifests and configs in `store`, and resolve locked bases from it.
    pub fn with_store(mut self, store: Store) -> Self {
        self.store = Some(store);
        self
    }

    pub fn is_offline(&self) -> bool {
        self.offline
    }

    /// Layer downloads that failed for lack of network (or `--offline`), as messages.
    pub fn unavailable(&self) -> Vec<String> {
        self.unavailable
            .lock()
            .map(|list| list.clone())
            .unwrap_or_default()
    }

    /// The platform manifest and config of `digest` (a manifest, or an index to choose the
    /// platform from) when the store has them.
    fn stored_manifest(
        &self,
        digest: Digest,
        platform: &Platform,
    ) -> Option<(Digest, Vec<u8>, Vec<u8>)> {
        let store = self.store.as_ref()?;
        let top = store.read_blob(&digest).ok()?;
        let is_index = serde_json::from_slice::<serde_json::Value>(&top)
            .ok()?
            .get("manifests")
            .is_some_and(serde_json::Value::is_array);
        let (manifest_digest, manifest_bytes) = if is_index {
            let descriptor = crate::registry::select_platform(&top, platform).ok()?;
            (descriptor.digest, store.read_blob(&descriptor.digest).ok()?)
        } else {
            (digest, top)
        };
        let manifest: oci::ImageManifest = serde_json::from_slice(&manifest_bytes).ok()?;
        let config = store.read_blob(&manifest.config.digest).ok()?;
        Some((manifest_digest, manifest_bytes, config))
    }

    /// Keep what a registry served, for the next resolution without the network. Best effort:
    /// a full disk costs only that.
    fn keep(&self, bytes: &[u8]) {
        if let Some(store) = &self.store {
            let _ = store.put_blob_bytes(bytes);
        }
    }

    pub fn registry(&self) -> &RegistryClient {
        &self.registry
    }

    /// The registry bases resolved so far, as a lock file.
    pub fn lock_file(&self) -> LockFile {
        let bases = self
            .resolved
            .lock()
            .map(|resolved| resolved.clone())
            .unwrap_or_default();
        LockFile { version: 1, bases }
    }

    fn resolve_registry(
        &self,
        written: &str,
        platform: &Platform,
    ) -> Result<Arc<ResolvedBase>, ResolveError> {
        let reference =
            Reference::parse(written).map_err(|error| ResolveError::InvalidReference {
                reference: written.to_string(),
                message: error.to_string(),
                help: miette::Diagnostic::help(&error)
                    .map(|help| help.to_string())
                    .unwrap_or_default(),
            })?;
        // A digest in the reference or in the lock file pins the manifest.
        let locked = match (&reference.digest, &self.lock) {
            (Some(_), _) => None,
            (None, LockMode::UseLock(lock)) => lock.find(written, platform),
            (None, LockMode::Refresh) => None,
        };
        let pinned = reference.digest.or(locked);
        let unresolved = |reason: String| {
            ResolveError::Unresolved(Box::new(Unresolved {
                reference: written.to_string(),
                platform: platform.clone(),
                locked: pinned,
                reason,
            }))
        };
        // A registry that nothing can be connected to (no network, a name that does not
        // resolve, a refused connection) makes the base unresolved, its keys pending; every
        // other registry error (TLS, timeouts, 401, 5xx…) is an error.
        let registry_error = |error: crate::registry::RegistryError| {
            if matches!(
                error,
                crate::registry::RegistryError::Unreachable { no_route: true, .. }
            ) {
                return unresolved(error.to_string());
            }
            ResolveError::Registry {
                reference: written.to_string(),
                help: miette::Diagnostic::help(&error)
                    .map(|help| help.to_string())
                    .unwrap_or_default(),
                message: error.to_string(),
                environment: error.is_environment(),
            }
        };
        let layout_error = |message: String| ResolveError::Registry {
            reference: written.to_string(),
            message,
            help: "the registry returned something that is not an image manifest".into(),
            environment: false,
        };
        // A pinned manifest is immutable: when the store has it (and its config), the network
        // is not needed.
        let local = pinned.and_then(|digest| self.stored_manifest(digest, platform));
        let (manifest_digest, manifest_bytes, config_bytes) = match local {
            Some(found) => found,
            None if self.offline => {
                return Err(unresolved(match pinned {
                    Some(digest) => format!(
                        "its manifest ({digest}) is not in the local store, and --offline forbids downloading it"
                    ),
                    None => {
                        "it is not in graphbuild.lock, and --offline forbids asking the registry"
                            .to_string()
                    }
                }));
            }
            None => {
                let (manifest_digest, manifest_bytes) = match locked {
                    Some(digest) => {
                        let manifest = self
                            .registry
                            .resolve(&reference.with_digest(digest))
                            .map_err(registry_error)?;
                        (manifest.digest, manifest.bytes)
                    }
                    None => {
                        let found = self
                            .registry
                            .resolve_platform(&reference, platform)
                            .map_err(registry_error)?;
                        if let Some(index) = &found.index {
                            self.keep(&index.bytes);
                        }
                        (found.manifest.digest, found.manifest.bytes)
                    }
                };
                let manifest: oci::ImageManifest = serde_json::from_slice(&manifest_bytes)
                    .map_err(|error| layout_error(format!("invalid manifest: {error}")))?;
                let config_path = self.scratch.path().join(manifest.config.digest.hex());
                if !config_path.exists() {
                    self.registry
                        .fetch_blob(
                            &reference,
                            &manifest.config.digest,
                            manifest.config.size,
                            &config_path,
                        )
                        .map_err(registry_error)?;
                }
                let config_bytes =
                    std::fs::read(&config_path).map_err(|error| layout_error(error.to_string()))?;
                self.keep(&manifest_bytes);
                self.keep(&config_bytes);
                (manifest_digest, manifest_bytes, config_bytes)
            }
        };
        let manifest: oci::ImageManifest = serde_json::from_slice(&manifest_bytes)
            .map_err(|error| layout_error(format!("invalid manifest: {error}")))?;
        let config: oci::ImageConfigFile = serde_json::from_slice(&config_bytes)
            .map_err(|error| layout_error(format!("invalid image config: {error}")))?;
        let image_platform = config.platform();
        if image_platform.os != platform.os || image_platform.architecture != platform.architecture
        {
            return Err(ResolveError::NoPlatform {
                reference: written.to_string(),
                platform: platform.to_string(),
                available: format!(" (it is a single image for {image_platform})"),
            });
        }
        let resolved = base_from_parts(
            written,
            manifest_digest,
            platform,
            &manifest,
            &config,
            BaseSource::Registry {
                reference: reference.with_digest(manifest_digest),
            },
        )
        .map_err(layout_error)?;
        if let Ok(mut list) = self.resolved.lock() {
            list.push(LockedBase {
                reference: written.to_string(),
                platform: platform.to_string(),
                digest: manifest_digest,
            });
        }
        Ok(Arc::new(resolved))
    }
}

impl Resolver for DefaultResolver {
    fn resolve(
        &self,
        reference: &str,
        platform: &Platform,
    ) -> Result<Arc<ResolvedBase>, ResolveError> {
        if parse_oci_reference(reference).is_some() {
            return self.layouts.resolve(reference, platform);
        }
        let cache_key = (reference.to_string(), platform.clone());
        if let Some(hit) = self
            .cache
            .lock()
            .ok()
            .and_then(|cache| cache.get(&cache_key).cloned())
        {
            return Ok(hit);
        }
        let resolved = self.resolve_registry(reference, platform)?;
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(cache_key, resolved.clone());
        }
        Ok(resolved)
    }

    fn fetch_url(
        &self,
        url: &str,
        checksum: Option<Digest>,
        platform: &Platform,
    ) -> Result<Digest, ResolveError> {
        self.source_digest(url, checksum, platform)
    }

    fn resolve_git(
        &self,
        url: &str,
        reference: &str,
        platform: &Platform,
    ) -> Result<String, ResolveError> {
        self.source_commit(url, reference, platform)
    }

    fn fetch_layers(&self, base: &ResolvedBase, store: &Store) -> Result<(), ResolveError> {
        let BaseSource::Registry { reference } = &base.source else {
            return self.layouts.fetch_layers(base, store);
        };
        let fetch_error = |digest: Digest, message: String| ResolveError::Fetch {
            reference: base.reference.clone(),
            digest,
            message,
        };
        let temp = store
            .temp_dir()
            .map_err(|error| fetch_error(base.manifest_digest, error.to_string()))?;
        let missing: Vec<BlobFetch> = base
            .layers
            .iter()
            .filter(|layer| store.check_blob(&layer.digest, layer.size) != BlobState::Present)
            .map(|layer| BlobFetch {
                digest: layer.digest,
                size: layer.size,
                dest: temp.path().join(layer.digest.hex()),
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let unavailable = |message: String| {
            if let Ok(mut list) = self.unavailable.lock() {
                list.push(format!(
                    "`{}` ({}): {message}",
                    base.reference, base.platform
                ));
            }
            fetch_error(base.manifest_digest, message)
        };
        if self.offline {
            return Err(unavailable(format!(
                "{} of its layers are not in the local store, and --offline forbids downloading them",
                missing.len()
            )));
        }
        self.registry
            .fetch_blobs(reference, &missing)
            .map_err(|error| match error {
                crate::registry::RegistryError::Unreachable { .. } => {
                    unavailable(error.to_string())
                }
                other => fetch_error(base.manifest_digest, other.to_string()),
            })?;
        for blob in &missing {
            store
                .put_blob_file(&blob.dest, Some(blob.digest))
                .map_err(|error| fetch_error(blob.digest, error.to_string()))?;
        }
        Ok(())
    }
}

/// A [`ResolvedBase`] from a manifest and its config.
fn base_from_parts(
    reference: &str,
    manifest_digest: Digest,
    platform: &Platform,
    manifest: &oci::ImageManifest,
    config: &oci::ImageConfigFile,
    source: BaseSource,
) -> Result<ResolvedBase, String> {
    if config.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(format!(
            "the manifest lists {} layers but the config {} diff ids",
            manifest.layers.len(),
            config.rootfs.diff_ids.len()
        ));
    }
    Ok(ResolvedBase {
        reference: reference.to_string(),
        manifest_digest,
        platform: platform.clone(),
        layers: manifest
            .layers
            .iter()
            .zip(&config.rootfs.diff_ids)
            .map(|(layer, diff_id)| LayerDesc {
                digest: layer.digest,
                diff_id: *diff_id,
                size: layer.size,
                media_type: layer.media_type.clone(),
            })
            .collect(),
        history: config
            .history
            .iter()
            .map(|entry| HistoryEntry {
                created_by: entry.created_by.clone().unwrap_or_default(),
                empty_layer: entry.empty_layer,
            })
            .collect(),
        settings: settings_from_config(&config.config),
        source,
    })
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
        shell: config.shell.clone(),
        stop_signal: config.stop_signal.clone(),
        healthcheck: config
            .healthcheck
            .as_ref()
            .map(|check| HealthcheckSettings {
                test: check.test.clone(),
                interval_ns: non_zero(check.interval),
                timeout_ns: non_zero(check.timeout),
                start_period_ns: non_zero(check.start_period),
                retries: u32::try_from(check.retries)
                    .ok()
                    .filter(|retries| *retries != 0),
            }),
    }
}
