//! The state a build carries from step to step: layers on disk and image settings.
//!
//! Settings (env, workdir, user, entrypoint…) are known at plan time: they follow from the
//! build file and the base image's config alone. Layers are known only once steps have run,
//! and are what the action cache records: a [`StepRecord`] is the complete layer list and
//! history *after* a filesystem step, so a hit on the last step of a node gives the node's
//! whole result without touching any earlier step.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// One layer of an image: the compressed blob and its uncompressed diff id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerDesc {
    pub digest: Digest,
    pub diff_id: Digest,
    pub size: u64,
    pub media_type: String,
}

/// One history entry of an image config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub created_by: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub empty_layer: bool,
}

/// What the action cache stores for a filesystem step: the full state after it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    pub layers: Vec<LayerDesc>,
    pub history: Vec<HistoryEntry>,
}

/// A healthcheck as Docker stores it (durations in nanoseconds).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthcheckSettings {
    /// `["NONE"]`, `["CMD", …]` or `["CMD-SHELL", "…"]`.
    pub test: Vec<String>,
    pub interval_ns: Option<u64>,
    pub timeout_ns: Option<u64>,
    pub start_period_ns: Option<u64>,
    pub retries: Option<u32>,
}

/// The runtime settings of an image, tracked statically through a stage's steps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSettings {
    /// `KEY=value` order as set; keys unique.
    pub env: Vec<(String, String)>,
    pub workdir: String,
    pub user: String,
    pub labels: BTreeMap<String, String>,
    pub exposed_ports: BTreeSet<String>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub volumes: BTreeSet<String>,
    /// The shell for shell-form commands; empty means `/bin/sh -c`.
    pub shell: Vec<String>,
    pub stop_signal: Option<String>,
    pub healthcheck: Option<HealthcheckSettings>,
}

impl ImageSettings {
    pub fn set_env(&mut self, key: &str, value: String) {
        match self.env.iter_mut().find(|(existing, _)| existing == key) {
            Some(entry) => entry.1 = value,
            None => self.env.push((key.to_string(), value)),
        }
    }

    pub fn env_value(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(existing, _)| existing == key)
            .map(|(_, value)| value.as_str())
    }

    pub fn shell(&self) -> Vec<String> {
        if self.shell.is_empty() {
            vec!["/bin/sh".to_string(), "-c".to_string()]
        } else {
            self.shell.clone()
        }
    }

    /// The working directory, `/` when unset.
    pub fn workdir(&self) -> &str {
        if self.workdir.is_empty() {
            "/"
        } else {
            &self.workdir
        }
    }
}

/// Docker's PATH when an image sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
