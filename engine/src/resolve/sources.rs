//! What the planner needs to know about an `add` source before it can key the step: the
//! digest of a URL's file, the commit of a git ref. Resolved by [`DefaultResolver`] with the
//! same rules as bases: once per run, nothing from the network with `--offline`, and a source
//! that cannot be reached is *unresolved* (its step and what follows are pending), not an
//! error, so `plan` works without the network.

use std::collections::HashMap;
use std::sync::Mutex;

use graphbuild_lang::platform::Platform;

use super::{DefaultResolver, ResolveError, Unresolved};
use crate::digest::Digest;
use crate::fetch::{self, FetchError};

/// Sources resolved this run: a redacted-free key (the URL itself, kept in memory only) to
/// the digest or commit found.
#[derive(Default)]
pub(super) struct SourceCache(Mutex<HashMap<String, String>>);

/// Whether an [`Unresolved`] is an `add` source rather than a base image.
pub(super) fn is_source(reference: &str) -> bool {
    reference.contains("://") || reference.starts_with("git@")
}

pub(super) fn help() -> String {
    concat!(
        "give the `add` a checksum=\"sha256:…\" (a git source a full commit hash after `#`): ",
        "its key is then known without the network, and its content is downloaded once into ",
        "the local store"
    )
    .into()
}

/// The source at `url` is not known without the network, for this reason.
pub(super) fn unresolved(url: &str, platform: &Platform, reason: &str) -> ResolveError {
    ResolveError::Unresolved(Box::new(Unresolved {
        reference: fetch::redact(url),
        platform: platform.clone(),
        locked: None,
        reason: reason.to_string(),
    }))
}

impl SourceCache {
    fn get(&self, key: &str) -> Option<String> {
        self.0.lock().ok()?.get(key).cloned()
    }

    fn put(&self, key: &str, value: &str) {
        if let Ok(mut cache) = self.0.lock() {
            cache.insert(key.to_string(), value.to_string());
        }
    }
}

impl DefaultResolver {
    /// See [`super::Resolver::fetch_url`]: with a checksum, the checksum (offline only when
    /// the store has the file); without, the digest of a download into the store.
    pub(super) fn source_digest(
        &self,
        url: &str,
        checksum: Option<Digest>,
        platform: &Platform,
    ) -> Result<Digest, ResolveError> {
        if let Some(checksum) = checksum {
            let stored = self
                .store
                .as_ref()
                .is_some_and(|store| store.has_blob(&checksum));
            if self.offline && !stored {
                return Err(unresolved(
                    url,
                    platform,
                    "its file is not in the local store, and --offline forbids downloading it",
                ));
            }
            return Ok(checksum);
        }
        let cache_key = format!("url\0{url}");
        if let Some(digest) = self.sources.get(&cache_key) {
            return digest.parse().map_err(|_| unresolved(url, platform, "?"));
        }
        if self.offline {
            return Err(unresolved(
                url,
                platform,
                "without a checksum its key is the digest of its content, and --offline forbids downloading it",
            ));
        }
        let scratch;
        let store = match &self.store {
            Some(store) => store,
            None => {
                scratch = crate::store::Store::open(&self.scratch.path().join("store")).map_err(
                    |error| ResolveError::Source {
                        message: format!("cannot create a scratch store: {error}"),
                        help: String::new(),
                    },
                )?;
                &scratch
            }
        };
        let digest = fetch::download(url, None, store).map_err(|error| match error {
            FetchError::Unreachable { .. } => unresolved(url, platform, &error.to_string()),
            other => ResolveError::Source {
                message: other.to_string(),
                help: "check the URL; give the `add` a checksum=\"sha256:…\" to pin its content"
                    .into(),
            },
        })?;
        self.sources.put(&cache_key, &digest.to_string());
        Ok(digest)
    }

    /// See [`super::Resolver::resolve_git`].
    pub(super) fn source_commit(
        &self,
        url: &str,
        reference: &str,
        platform: &Platform,
    ) -> Result<String, ResolveError> {
        if crate::git_source::is_commit(reference) {
            return Ok(reference.to_ascii_lowercase());
        }
        let cache_key = format!("git\0{url}\0{reference}");
        if let Some(commit) = self.sources.get(&cache_key) {
            return Ok(commit);
        }
        if self.offline {
            return Err(unresolved(
                url,
                platform,
                "its ref is resolved by asking the repository, and --offline forbids it",
            ));
        }
        let commit = crate::git_source::resolve_ref(url, reference).map_err(|message| {
            // git does not tell a missing ref from a missing network in its status: a ref it
            // listed but could not find is the build file's problem, anything else unresolved.
            if message.contains("has no branch or tag") {
                ResolveError::Source {
                    message,
                    help: "name a branch, a tag or a full commit hash after `#`".into(),
                }
            } else {
                unresolved(url, platform, &message)
            }
        })?;
        self.sources.put(&cache_key, &commit);
        Ok(commit)
    }
}
