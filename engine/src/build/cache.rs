//! What the caches share: action keys, blobs checked in the store and every layer verified
//! before it is used, the policy for a failing team cache, and cache mounts kept in the team
//! cache. Step records are looked up and published through `step_cache`.

use std::path::Path;

use crate::digest::{Digest, Key};
use crate::events::Event;
use crate::key::KeyBuilder;
use crate::layer::{self, LayerOptions};
use crate::remote::{ActionResult, OutputFile, RemoteCache};
use crate::state::LayerDesc;
use crate::store::BlobState;
use crate::unpack;

use super::Executor;
use super::faults::LayerFault;
use super::step_cache::CacheError;

impl Executor<'_> {
    /// Where a step's result is recorded: its key, combined with the layer compression when it
    /// is not the default, since the record names compressed blobs.
    pub(super) fn action_key(&self, key: &Key) -> Key {
        match self.options.layer.compression {
            layer::Compression::Gzip => *key,
            layer::Compression::Zstd => {
                KeyBuilder::new("compression").key(key).str("zstd").finish()
            }
            layer::Compression::None => {
                KeyBuilder::new("compression").key(key).str("none").finish()
            }
        }
    }

    /// Whether a blob is in the store with its size; one of another size is removed, with a
    /// warning.
    pub(super) fn blob_present(&self, digest: &Digest, size: u64) -> bool {
        match self.store.check_blob(digest, size) {
            BlobState::Present => true,
            BlobState::Missing => false,
            BlobState::Corrupt => {
                self.corrupt_blob(digest, "it has the wrong size");
                false
            }
        }
    }

    /// A blob was found corrupt: remove it and say so. The actions naming it are misses from
    /// now on (their blob is missing), so their steps execute again.
    pub(super) fn corrupt_blob(&self, digest: &Digest, why: &str) {
        let _ = self.store.remove_blob(digest);
        self.healed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.events.emit(Event::Warning {
            message: format!(
                "blob {digest} in the store is corrupt ({why}); it was removed and will be fetched or rebuilt"
            ),
        });
    }

    /// Where a layer comes from, for error messages: ` of base image `REF` for PLATFORM`.
    pub(super) fn origin(&self, digest: &Digest) -> String {
        self.layer_origins
            .lock()
            .ok()
            .and_then(|origins| origins.get(digest).cloned())
            .unwrap_or_default()
    }

    /// A layer whose content does not match its diff_id: remember it (an action naming it is
    /// removed by the node that resumed from it) and describe it.
    pub(super) fn forged_layer(&self, layer: &LayerDesc, actual: &Digest) -> LayerFault {
        if let Ok(mut forged) = self.forged_layers.lock() {
            forged.insert(layer.digest);
        }
        LayerFault::Forged {
            digest: layer.digest,
            origin: self.origin(&layer.digest),
            actual: *actual,
            diff_id: layer.diff_id,
        }
    }

    /// Make sure the blob of `layer` has the diff_id it claims, reading it through unless the
    /// store already recorded that pair.
    pub(super) fn verify_layer_blob(&self, layer: &LayerDesc) -> Result<(), LayerFault> {
        let pair = (layer.digest, layer.diff_id);
        let seen =
            |verified: &std::collections::HashSet<(Digest, Digest)>| verified.contains(&pair);
        if self
            .verified_layers
            .lock()
            .is_ok_and(|verified| seen(&verified))
        {
            return Ok(());
        }
        if self.store.verified_diff_id(&layer.digest) == Some(layer.diff_id) {
            if let Ok(mut verified) = self.verified_layers.lock() {
                verified.insert(pair);
            }
            return Ok(());
        }
        let file = std::fs::File::open(self.store.blob_path(&layer.digest)).map_err(|source| {
            LayerFault::Open {
                digest: layer.digest,
                source,
            }
        })?;
        let check = unpack::LayerCheck::layer(layer.digest, layer.diff_id, layer.size);
        match unpack::verify_layer(std::io::BufReader::new(file), &check) {
            Ok(_) => {
                let _ = self.store.record_verified_layer(layer);
                if let Ok(mut verified) = self.verified_layers.lock() {
                    verified.insert(pair);
                }
                Ok(())
            }
            Err(error) => Err(self.layer_error(layer, error)),
        }
    }

    /// The message for a layer that failed to unpack or verify; a corrupt blob is removed.
    pub(super) fn layer_error(&self, layer: &LayerDesc, error: unpack::UnpackError) -> LayerFault {
        match error {
            unpack::UnpackError::DiffIdMismatch { actual, .. } => self.forged_layer(layer, &actual),
            unpack::UnpackError::DigestMismatch { actual, .. } => {
                self.corrupt_blob(&layer.digest, &format!("its content hashes to {actual}"));
                LayerFault::Corrupt {
                    digest: layer.digest,
                    origin: self.origin(&layer.digest),
                    actual,
                }
            }
            source => LayerFault::Unpack {
                digest: layer.digest,
                origin: self.origin(&layer.digest),
                source: Box::new(source),
            },
        }
    }

    pub(super) fn usable_remote<'r>(
        &self,
        remote: Option<&'r std::sync::Arc<dyn RemoteCache>>,
    ) -> Option<&'r dyn RemoteCache> {
        remote.map(|remote| &**remote).filter(|_| {
            !self
                .remote_failed
                .load(std::sync::atomic::Ordering::Relaxed)
        })
    }

    /// A remote cache failed: warn once and go on locally, or fail when it is required.
    pub(super) fn remote_trouble(
        &self,
        remote: &dyn RemoteCache,
        error: CacheError,
    ) -> Result<(), CacheError> {
        if self.options.cancel.is_cancelled() {
            // The transfer was abandoned for the cancel; the build stops anyway.
            return Ok(());
        }
        if self.options.remote.required {
            return Err(CacheError::Required {
                url: remote.url().to_string(),
                source: Box::new(error),
            });
        }
        if !self
            .remote_failed
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            self.events.emit(Event::Warning {
                message: format!(
                    "the cache {} is not usable, building without it: {}",
                    remote.url(),
                    super::error::message(&error)
                ),
            });
        }
        Ok(())
    }

    /// A remote call's result, with a bad entry (garbage, wrong size or content) turned into
    /// `miss` and warned about once per build: one bad entry never disables the cache.
    pub(super) fn remote_entry<T>(
        &self,
        remote: &dyn RemoteCache,
        result: Result<T, crate::remote::RemoteError>,
        miss: T,
    ) -> Result<T, CacheError> {
        match result {
            Ok(value) => Ok(value),
            Err(error) if error.is_bad_entry() => {
                self.warn_bad_remote_entry(remote, &error.to_string());
                Ok(miss)
            }
            Err(error) => Err(error.into()),
        }
    }

    pub(super) fn warn_bad_remote_entry(&self, remote: &dyn RemoteCache, message: &str) {
        if !self
            .remote_bad_entry_warned
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            self.events.emit(Event::Warning {
                message: format!(
                    "the cache {} holds an unusable entry, counted as a miss (further ones are not reported): {message}",
                    remote.url()
                ),
            });
        }
    }

    pub(super) fn cache_mount_key(id: &str, platform: &str) -> Key {
        KeyBuilder::new("cache-mount")
            .str(id)
            .str(platform)
            .finish()
    }

    /// Fill an empty cache-mount directory from the remote cache, once per build.
    pub(super) fn restore_cache_mount(
        &self,
        id: &str,
        platform: &str,
        dir: &Path,
    ) -> Result<(), CacheError> {
        if let Ok(mut used) = self.cache_mounts_used.lock() {
            used.insert((id.to_string(), platform.to_string()), dir.to_path_buf());
        }
        let Some(remote) = self.usable_remote(self.options.remote.from.as_ref()) else {
            return Ok(());
        };
        let first = self
            .cache_mounts_restored
            .lock()
            .map(|mut restored| restored.insert((id.to_string(), platform.to_string())))
            .unwrap_or(false);
        let empty = std::fs::read_dir(dir)
            .map(|mut entries| entries.next().is_none())
            .unwrap_or(false);
        if !first || !empty {
            return Ok(());
        }
        let result = (|| -> Result<(), CacheError> {
            let key = Self::cache_mount_key(id, platform);
            let Some(action) = self.remote_entry(remote, remote.get_action(&key.hex()), None)?
            else {
                return Ok(());
            };
            let Some(file) = action.output_files.first() else {
                return Ok(());
            };
            let temp = self
                .store
                .temp_dir()
                .map_err(|source| CacheError::TempDir { source })?;
            let path = temp.path().join("mount.tar");
            let fetched = remote.get_blob_to(&file.digest, file.size_bytes, &path);
            if !self.remote_entry(remote, fetched, false)? {
                return Ok(());
            }
            let archive = std::fs::File::open(&path).map_err(|source| CacheError::Io {
                action: "open",
                path: path.clone(),
                source,
            })?;
            // Unpacked aside and moved in whole: a bad or oversized archive leaves the mount
            // empty, not half-filled.
            let staging = temp.path().join("mount");
            unpack::unpack_layer(std::io::BufReader::new(archive), &staging).map_err(|source| {
                CacheError::MountUnpack {
                    id: id.to_string(),
                    source,
                }
            })?;
            std::fs::remove_dir(dir).map_err(|source| CacheError::Io {
                action: "remove",
                path: dir.to_path_buf(),
                source,
            })?;
            std::fs::rename(&staging, dir).map_err(|source| CacheError::Io {
                action: "fill",
                path: dir.to_path_buf(),
                source,
            })
        })();
        match result {
            Ok(()) => Ok(()),
            Err(error) => self.remote_trouble(remote, error),
        }
    }

    /// Save every cache mount this build used to the remote cache, content-addressed, under a
    /// key of (mount id, platform), so another machine's build starts with it.
    pub(super) fn save_cache_mounts(&self) -> Result<(), CacheError> {
        let Some(remote) = self.usable_remote(self.options.remote.to.as_ref()) else {
            return Ok(());
        };
        let used = self
            .cache_mounts_used
            .lock()
            .map(|used| used.clone())
            .unwrap_or_default();
        for ((id, platform), dir) in used {
            let guard =
                self.store
                    .cache_mount(&id, &platform)
                    .map_err(|source| CacheError::MountOpen {
                        id: id.clone(),
                        source,
                    })?;
            let result = (|| -> Result<(), CacheError> {
                let temp = self
                    .store
                    .temp_dir()
                    .map_err(|source| CacheError::TempDir { source })?;
                let options = LayerOptions {
                    source_date_epoch: 0,
                    compression: layer::Compression::Gzip,
                };
                let Some(blob) = layer::write_layer_from_upper(&dir, temp.path(), &options)
                    .map_err(|source| CacheError::MountPack {
                        id: id.clone(),
                        source,
                    })?
                else {
                    return Ok(());
                };
                remote.put_blob_from(&blob.digest, &blob.path)?;
                let action = ActionResult {
                    output_files: vec![OutputFile {
                        path: "graphbuild/cache-mount.tar.gz".into(),
                        digest: blob.digest,
                        size_bytes: blob.size,
                        is_executable: false,
                    }],
                    exit_code: 0,
                };
                remote.put_action(&Self::cache_mount_key(&id, &platform).hex(), &action)?;
                Ok(())
            })();
            drop(guard);
            if let Err(error) = result {
                return self.remote_trouble(remote, error);
            }
        }
        Ok(())
    }
}
