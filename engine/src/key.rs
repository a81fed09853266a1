//! Cache keys.
//!
//! # What a key is
//!
//! Every filesystem step (`run`, `copy`) has a key: blake3 over
//!
//! 1. [`FORMAT_VERSION`], so a change to what steps mean invalidates old entries;
//! 2. the key of the state the step starts from (the previous step's key, or for the first
//!    step the node's *root*: the base image's manifest digest, a base stage's key, or
//!    `scratch`, together with the platform the stage runs on);
//! 3. the step's operation after substitution, serialized canonically: the argv, the full
//!    environment, workdir, user, mounts, copy sources and destination…;
//! 4. the digests of the step's inputs: the context files a `copy` selects (path, mode,
//!    content), or the key of the `from=` stage it copies out of.
//!
//! Metadata steps (`env`, `workdir`, `label`…) chain into the key too, because they change what
//! later steps see, but they never execute.
//!
//! # What a key is not
//!
//! Spans, comments, formatting, stage and image *names*, and variables a step does not read are
//! not part of a key. That is what makes a stage pinned to `$BUILDPLATFORM` that never reads a
//! `TARGET*` variable one node for every target: its steps see identical inputs, so they get
//! identical keys, so they are one node in the graph and run once.
//!
//! Keys are computed at plan time, before anything runs: `graphbuild plan` can therefore tell
//! what is cached, and a node carries everything needed to run it elsewhere.

use crate::digest::Key;

/// Bump when the meaning of a step or the layer format changes.
pub(crate) const FORMAT_VERSION: &str = "graphbuild-step-v2";

/// Incremental key builder. Each part is length-prefixed so concatenations can't collide.
pub(crate) struct KeyBuilder(blake3::Hasher);

impl KeyBuilder {
    pub(crate) fn new(kind: &str) -> Self {
        let mut builder = KeyBuilder(blake3::Hasher::new());
        builder.str(FORMAT_VERSION).str(kind);
        builder
    }

    pub(crate) fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.update(&(bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
        self
    }

    pub(crate) fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    pub(crate) fn key(&mut self, key: &Key) -> &mut Self {
        self.bytes(&key.0)
    }

    /// The canonical JSON of a value (ordered maps only: BTreeMap, or a Vec of pairs). Key
    /// inputs always serialize; a failure is a programming error, never an empty input.
    pub(crate) fn json<T: serde::Serialize>(&mut self, value: &T) -> &mut Self {
        let bytes = serde_json::to_vec(value).expect("key inputs serialize");
        self.bytes(&bytes)
    }

    pub(crate) fn finish(&self) -> Key {
        Key(*self.0.finalize().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_delimited() {
        let a = KeyBuilder::new("x").str("ab").str("c").finish();
        let b = KeyBuilder::new("x").str("a").str("bc").finish();
        assert_ne!(a, b);
        assert_eq!(a, KeyBuilder::new("x").str("ab").str("c").finish());
    }
}
