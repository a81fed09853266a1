//! One interface for step results, wherever they are kept.
//!
//! [`StepCache`] asks two things of a cache, by action key (a step's key combined with the
//! layer compression, [`Executor::action_key`]): *is there a record?* ([`StepCache::lookup`])
//! and *keep this record* ([`StepCache::publish`]). The local store's action cache
//! ([`LocalCache`]) and each team cache ([`RemoteStepCache`], over any [`RemoteCache`]
//! client: HTTP or REAPI) implement it, and [`Layered`] composes them into one more
//! [`StepCache`], as buck2 wraps an executor with a cache lookup
//! (`PreparedCommandOptionalExecutor`) instead of threading cache checks through it:
//!
//! - **lookup**: the local store first, then each `--cache-from` cache in turn. A remote hit
//!   is written back to the local store only once every layer it names is in the store with
//!   the sha256 it is named by (checked as it is stored) and the diff_id it claims (read
//!   through, [`Executor::verify_layer_blob`]); a record naming a bad layer is a miss.
//! - **publish**: to the local store always, then to each `--cache-to` cache
//!   ([`Layered::share`] alone publishes a hit the team cache may lack).
//!
//! A hit from any of them means the same thing: a [`StepRecord`] whose layer blobs are all
//! present in the local store.
//!
//! # When a team cache fails
//!
//! The implementations report every failure; the policy is [`Layered`]'s: a team cache that
//! fails is warned about once and not asked again for the rest of the build (or fails the
//! build with `--cache-required`), and a bad entry (garbage, a blob of the wrong size or
//! content) is a miss, warned about once, that does not disable the cache.

use crate::digest::{Digest, Key};
use crate::events::Event;
use crate::layer::LayerError;
use crate::remote::{RemoteCache, RemoteError};
use crate::state::{LayerDesc, StepRecord};
use crate::store::StoreError;
use crate::unpack::UnpackError;

use super::Executor;

/// Why a cache (the local store's action cache or a team cache) could not answer or keep a
/// record. The rendering of a variant with a `#[source]` appends its causes.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum CacheError {
    #[error(transparent)]
    #[diagnostic(transparent)]
    Remote(#[from] RemoteError),

    /// A team cache failed and `--cache-required` makes that fatal.
    #[error("the cache {url} failed")]
    #[diagnostic(
        code(graphbuild::cache::required),
        help(
            "--cache-required makes a failing team cache fail the build; without it, the build warns and goes on without the cache"
        )
    )]
    Required {
        url: String,
        #[source]
        source: Box<CacheError>,
    },

    #[error("cannot create a temporary directory")]
    #[diagnostic(code(graphbuild::cache::io))]
    TempDir {
        #[source]
        source: std::io::Error,
    },

    #[error("cannot store the blob {digest}")]
    #[diagnostic(code(graphbuild::cache::store))]
    StoreBlob {
        digest: Digest,
        #[source]
        source: StoreError,
    },

    #[error("cannot record the {what} in the store")]
    #[diagnostic(code(graphbuild::step::store))]
    Record {
        /// `step`, `test`, `SBOM`.
        what: &'static str,
        #[source]
        source: StoreError,
    },

    #[error("cannot encode the {what} record")]
    #[diagnostic(code(graphbuild::cache::encode))]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },

    #[error("a download thread panicked")]
    #[diagnostic(code(graphbuild::cache::internal))]
    Panicked,

    #[error("cannot open cache mount `{id}`")]
    #[diagnostic(code(graphbuild::cache::mount))]
    MountOpen {
        id: String,
        #[source]
        source: StoreError,
    },

    #[error("cannot pack cache mount `{id}`")]
    #[diagnostic(code(graphbuild::cache::mount))]
    MountPack {
        id: String,
        #[source]
        source: LayerError,
    },

    #[error("cannot unpack cache mount `{id}` from the team cache")]
    #[diagnostic(code(graphbuild::cache::mount))]
    MountUnpack {
        id: String,
        #[source]
        source: UnpackError,
    },

    #[error("cannot {action} {}", path.display())]
    #[diagnostic(code(graphbuild::cache::io))]
    Io {
        action: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A step record and its canonical bytes (kept as they were read, so a remote hit is written
/// back locally byte for byte).
#[derive(Clone, Debug)]
pub(super) struct Entry {
    pub(super) record: StepRecord,
    bytes: Vec<u8>,
}

impl Entry {
    pub(super) fn new(record: StepRecord) -> Result<Entry, CacheError> {
        let bytes = serde_json::to_vec(&record).map_err(|source| CacheError::Encode {
            what: "step",
            source,
        })?;
        Ok(Entry { record, bytes })
    }
}

/// Look up and publish step records by action key. See the module documentation.
pub(super) trait StepCache {
    /// The record under `key`, with every blob it names present in the local store (fetched
    /// into it, each checked against its sha256, when it was not). `Ok(None)`: a miss.
    fn lookup(&self, key: &Key) -> Result<Option<Entry>, CacheError>;

    /// Keep `entry` under `key`. Every blob it names is in the local store.
    fn publish(&self, key: &Key, entry: &Entry) -> Result<(), CacheError>;
}

/// The local store's action cache.
pub(super) struct LocalCache<'e> {
    executor: &'e Executor<'e>,
}

impl StepCache for LocalCache<'_> {
    /// A record whose blobs are not all present (with their size) is a miss.
    fn lookup(&self, key: &Key) -> Result<Option<Entry>, CacheError> {
        let executor = self.executor;
        let Some(bytes) = executor.store.get_action(key) else {
            return Ok(None);
        };
        let Ok(record) = serde_json::from_slice::<StepRecord>(&bytes) else {
            return Ok(None);
        };
        let present = record
            .layers
            .iter()
            .all(|layer| executor.blob_present(&layer.digest, layer.size));
        Ok(present.then_some(Entry { record, bytes }))
    }

    fn publish(&self, key: &Key, entry: &Entry) -> Result<(), CacheError> {
        self.executor
            .store
            .put_action(key, &entry.bytes)
            .map_err(|source| CacheError::Record {
                what: "step",
                source,
            })
    }
}

/// A team cache, through its [`RemoteCache`] client.
pub(super) struct RemoteStepCache<'e> {
    executor: &'e Executor<'e>,
    remote: &'e dyn RemoteCache,
}

impl RemoteStepCache<'_> {
    /// Not once it failed in this build (it is asked again by the next one).
    fn usable(&self) -> bool {
        !self
            .executor
            .remote_failed
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl StepCache for RemoteStepCache<'_> {
    /// The record (size-capped, digest-verified) and the layer blobs the local store lacks,
    /// fetched a few at a time and stored only when their sha256 matches. A bad entry is a
    /// miss. The diff_ids are [`Layered`]'s to check, before the record is written back.
    fn lookup(&self, key: &Key) -> Result<Option<Entry>, CacheError> {
        let (executor, remote) = (self.executor, self.remote);
        let temp = executor
            .store
            .temp_dir()
            .map_err(|source| CacheError::TempDir { source })?;
        let fetched = remote.get_step_record(&key.hex(), temp.path());
        let Some(bytes) = executor.remote_entry(remote, fetched, None)? else {
            return Ok(None);
        };
        let record = match serde_json::from_slice::<StepRecord>(&bytes) {
            Ok(record) => record,
            Err(error) => {
                executor
                    .warn_bad_remote_entry(remote, &format!("a step record is not valid: {error}"));
                return Ok(None);
            }
        };
        let missing: Vec<&LayerDesc> = record
            .layers
            .iter()
            .filter(|layer| !executor.store.has_blob(&layer.digest))
            .collect();
        let results: Vec<Result<bool, CacheError>> = std::thread::scope(|scope| {
            let chunks: Vec<_> = missing.chunks(missing.len().div_ceil(4).max(1)).collect();
            let handles: Vec<_> = chunks
                .into_iter()
                .map(|chunk| {
                    let temp = temp.path();
                    scope.spawn(move || -> Result<bool, CacheError> {
                        for layer in chunk {
                            let path = temp.join(layer.digest.hex());
                            let fetched = remote.get_blob_to(&layer.digest, layer.size, &path);
                            if !executor.remote_entry(remote, fetched, false)? {
                                return Ok(false);
                            }
                            executor
                                .store
                                .put_blob_file(&path, Some(layer.digest))
                                .map_err(|source| CacheError::StoreBlob {
                                    digest: layer.digest,
                                    source,
                                })?;
                        }
                        Ok(true)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().unwrap_or(Err(CacheError::Panicked)))
                .collect()
        });
        for result in results {
            if !result? {
                return Ok(None);
            }
        }
        Ok(Some(Entry { record, bytes }))
    }

    /// Blobs first, then the action entry; an entry the cache already holds is kept (a bad
    /// one is replaced).
    fn publish(&self, key: &Key, entry: &Entry) -> Result<(), CacheError> {
        let (executor, remote) = (self.executor, self.remote);
        let key_hex = key.hex();
        if executor
            .remote_entry(remote, remote.get_action(&key_hex), None)?
            .is_some()
        {
            return Ok(());
        }
        for layer in &entry.record.layers {
            remote.put_blob_from(&layer.digest, &executor.store.blob_path(&layer.digest))?;
        }
        let layers: Vec<(Digest, u64)> = entry
            .record
            .layers
            .iter()
            .map(|layer| (layer.digest, layer.size))
            .collect();
        remote.put_step_record(&key_hex, &entry.bytes, &layers)?;
        Ok(())
    }
}

/// The local store, then the team caches: see the module documentation.
pub(super) struct Layered<'e> {
    executor: &'e Executor<'e>,
    pub(super) local: LocalCache<'e>,
    from: Vec<RemoteStepCache<'e>>,
    to: Vec<RemoteStepCache<'e>>,
}

impl Layered<'_> {
    /// Publish `entry` to the `--cache-to` caches only: a hit the team cache may lack, so a
    /// merge elsewhere finds it.
    pub(super) fn share(&self, key: &Key, entry: &Entry) -> Result<(), CacheError> {
        for remote in self.to.iter().filter(|remote| remote.usable()) {
            if let Err(error) = remote.publish(key, entry) {
                self.executor.remote_trouble(remote.remote, error)?;
            }
        }
        Ok(())
    }
}

impl StepCache for Layered<'_> {
    /// A miss with `--no-cache`.
    fn lookup(&self, key: &Key) -> Result<Option<Entry>, CacheError> {
        let executor = self.executor;
        if executor.options.no_cache {
            return Ok(None);
        }
        if let Some(entry) = self.local.lookup(key)? {
            return Ok(Some(entry));
        }
        'remotes: for remote in self.from.iter().filter(|remote| remote.usable()) {
            let entry = match remote.lookup(key) {
                Ok(Some(entry)) => entry,
                Ok(None) => continue,
                Err(error) => {
                    executor.remote_trouble(remote.remote, error)?;
                    continue;
                }
            };
            // A record is only as good as its layers: each must have the diff_id it claims.
            for layer in &entry.record.layers {
                if let Err(error) = executor.verify_layer_blob(layer) {
                    executor.events.emit(Event::Warning {
                        message: format!(
                            "the cache {} has a record naming a bad layer, building without it: {}",
                            remote.remote.url(),
                            super::error::message(&error)
                        ),
                    });
                    continue 'remotes;
                }
            }
            // Keeping it locally failing is, as before, this cache's trouble: warned about
            // once, or fatal with --cache-required.
            if let Err(error) = self.local.publish(key, &entry) {
                executor.remote_trouble(remote.remote, error)?;
                continue;
            }
            return Ok(Some(entry));
        }
        Ok(None)
    }

    fn publish(&self, key: &Key, entry: &Entry) -> Result<(), CacheError> {
        self.local.publish(key, entry)?;
        self.share(key, entry)
    }
}

impl<'e> Executor<'e> {
    /// The build's step cache: the local store, then the team caches (each skipped once it
    /// failed).
    pub(super) fn step_cache(&'e self) -> Layered<'e> {
        let remotes = |remote: Option<&'e std::sync::Arc<dyn RemoteCache>>| {
            remote
                .map(|remote| RemoteStepCache {
                    executor: self,
                    remote: &**remote,
                })
                .into_iter()
                .collect()
        };
        Layered {
            executor: self,
            local: LocalCache { executor: self },
            from: remotes(self.options.remote.from.as_ref()),
            to: remotes(self.options.remote.to.as_ref()),
        }
    }
}
