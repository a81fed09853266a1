//! Remote execution: `run` steps as Remote Execution API (REAPI v2) actions on a cluster's
//! workers, and `graphbuild worker`, a bot of the Remote Workers API that executes them.
//!
//! # The action
//!
//! A step that can leave the machine (a `run` without secrets, cache mounts, bind mounts or
//! `insecure`) becomes a [`RemoteStep`]: its sandbox task, exactly as the local sandbox would
//! receive it, the layers of the state it starts from (by digest: an OCI layer blob is a CAS
//! blob), the platform and the layer options. Its `Action` ([`action`]) has
//!
//! - an input root holding `step.json` (the [`RemoteStep`]) and `layers/0000`, `layers/0001`…,
//!   the layer blobs, bottom first, by digest only (nothing is uploaded that the cluster has);
//! - a `Command` whose arguments are `graphbuild worker-step step.json`, and whose outputs are
//!   [`OUTCOME_PATH`] (how the command ended and the layer it made) and [`LAYER_PATH`] (the
//!   layer blob, when the step changed files);
//! - the platform properties `OSFamily=linux` and `ISA=<arch>[/<variant>]` (the OCI names,
//!   `amd64`, `arm64`, `arm/v7`; both keys configurable, [`PlatformKeys`]), so the cluster
//!   routes the action to a worker of the step's CPU.
//!
//! Any REAPI worker that has graphbuild on its `PATH` and may create namespaces can run it:
//! `graphbuild worker-step` ([`step::run_in_input_root`]) executes the step in the same
//! sandbox as a local build and writes the outputs. `graphbuild worker` ([`worker`]) is a bot
//! for clusters that schedule through the Remote Workers API (BuildGrid) and have no worker
//! of their own: it accepts only these actions.
//!
//! # The client
//!
//! [`RemoteExecutor::execute`] uploads what the cluster lacks, calls `Execute`, follows the
//! operation to its end, and puts the layer into the local store, verified against both of
//! its digests, exactly as a local execution would: the image is bit-identical. An executor
//! that cannot be reached is reported once and the build goes on locally (unless remote
//! execution is required); a platform that no worker takes within the queue timeout
//! ([`QUEUE_TIMEOUT_ENV`]) runs here (emulated) for the rest of the build. A cancelled build
//! (Ctrl-C, SIGTERM) cancels its operation on the cluster (`CancelOperation`).

pub mod action;
pub mod bots;
pub mod client;
pub mod step;
pub mod worker;

use graphbuild_lang::platform::{Platform, PlatformError};
use serde::{Deserialize, Serialize};

use crate::layer::{Compression, LayerOptions};
use crate::sandbox::{ExitStatusKind, RunTask};
use crate::state::LayerDesc;

pub use client::{RemoteExecutor, RemoteRun};

/// A remote step a worker refuses to run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, miette::Diagnostic)]
pub enum StepCheckError {
    #[error("the step's format is `{found}`, not `{STEP_FORMAT}`")]
    #[diagnostic(code(graphbuild::remote::step))]
    Format { found: String },
    #[error("a remote step may not mount host paths")]
    #[diagnostic(code(graphbuild::remote::step))]
    HostPaths,
    #[error("a remote step may not run insecure")]
    #[diagnostic(code(graphbuild::remote::step))]
    Insecure,
    #[error("unknown layer compression `{compression}`")]
    #[diagnostic(code(graphbuild::remote::step))]
    Compression { compression: String },
    #[error(transparent)]
    #[diagnostic(transparent)]
    Platform(#[from] PlatformError),
}

/// A `--platform-keys` / `--remote-platform-keys` value that is not `OS_KEY,ARCH_KEY`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, miette::Diagnostic)]
#[error("`{text}` is not OS_KEY,ARCH_KEY: two different property names, such as OSFamily,ISA")]
#[diagnostic(code(graphbuild::remote::platform_keys))]
pub struct PlatformKeysError {
    pub text: String,
}

/// A [`QUEUE_TIMEOUT_ENV`] that is not a number of seconds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, miette::Diagnostic)]
#[error("{QUEUE_TIMEOUT_ENV}=`{text}` is not a number of seconds")]
#[diagnostic(code(graphbuild::remote::queue_timeout))]
pub struct QueueTimeoutError {
    pub text: String,
}

/// The `format` of a [`RemoteStep`]; a worker refuses any other.
pub const STEP_FORMAT: &str = "graphbuild remote step v1";
/// The step definition's name in the input root.
pub const STEP_FILE: &str = "step.json";
/// The directory of the layer blobs in the input root.
pub const LAYERS_DIR: &str = "layers";
/// The subcommand a worker runs: `graphbuild worker-step step.json`.
pub const WORKER_STEP_ARG: &str = "worker-step";
/// The output naming how the command ended and the layer it made ([`StepOutcome`], JSON).
pub const OUTCOME_PATH: &str = "graphbuild/outcome.json";
/// The output holding the step's layer blob, when it made one.
pub const LAYER_PATH: &str = "graphbuild/layers/0";
/// Seconds an action may wait for a worker before its step runs locally instead (default 60).
pub const QUEUE_TIMEOUT_ENV: &str = "GRAPHBUILD_REMOTE_QUEUE_TIMEOUT";

/// Everything a worker needs to execute a step: `step.json` in the input root.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RemoteStep {
    /// [`STEP_FORMAT`].
    pub format: String,
    /// The step's platform (`linux/arm64`): what the worker must execute natively or emulate.
    pub platform: String,
    /// The sandbox task, as the local sandbox would receive it; no host paths (secrets, cache
    /// mounts and bind mounts never leave the machine).
    pub task: RunTask,
    /// The layers of the state the step starts from, bottom first; blob `i` is
    /// `layers/{i:04}` in the input root.
    pub layers: Vec<LayerDesc>,
    /// What decides the new layer's bytes besides its files.
    pub source_date_epoch: i64,
    pub compression: String,
}

impl RemoteStep {
    pub fn new(
        platform: &Platform,
        task: RunTask,
        layers: &[LayerDesc],
        options: &LayerOptions,
    ) -> RemoteStep {
        RemoteStep {
            format: STEP_FORMAT.to_string(),
            platform: platform.to_string(),
            task,
            layers: layers.to_vec(),
            source_date_epoch: options.source_date_epoch,
            compression: match options.compression {
                Compression::Gzip => "gzip",
                Compression::Zstd => "zstd",
                Compression::None => "none",
            }
            .to_string(),
        }
    }

    /// The layer options the step was defined with.
    pub fn layer_options(&self) -> Result<LayerOptions, StepCheckError> {
        let compression = match self.compression.as_str() {
            "gzip" => Compression::Gzip,
            "zstd" => Compression::Zstd,
            "none" => Compression::None,
            other => {
                return Err(StepCheckError::Compression {
                    compression: other.to_string(),
                });
            }
        };
        Ok(LayerOptions {
            source_date_epoch: self.source_date_epoch,
            compression,
        })
    }

    /// Refuse what a worker must never do for a client: read its host's files (cache mounts,
    /// bind mounts, secret files, ssh sockets and the layers of stage binds name host paths),
    /// or run without the sandbox's confinement.
    pub fn check(&self) -> Result<Platform, StepCheckError> {
        if self.format != STEP_FORMAT {
            return Err(StepCheckError::Format {
                found: self.format.clone(),
            });
        }
        let task = &self.task;
        if !task.cache_mounts.is_empty()
            || !task.bind_mounts.is_empty()
            || !task.secret_files.is_empty()
            || !task.ssh_sockets.is_empty()
            || !task.stage_binds.is_empty()
        {
            return Err(StepCheckError::HostPaths);
        }
        if task.insecure {
            return Err(StepCheckError::Insecure);
        }
        self.layer_options()?;
        Ok(Platform::parse(&self.platform)?)
    }
}

/// How a remote step ended: `graphbuild/outcome.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StepOutcome {
    pub status: ExitStatusKind,
    /// The layer the step made ([`LAYER_PATH`]); `None` when it changed nothing or failed.
    pub layer: Option<LayerDesc>,
}

/// The platform property names a cluster matches workers on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlatformKeys {
    /// `OSFamily` by default; its value is the platform's OS (`linux`).
    pub os: String,
    /// `ISA` by default; its value is the OCI architecture, with its variant (`arm/v7`).
    pub arch: String,
}

impl Default for PlatformKeys {
    fn default() -> PlatformKeys {
        PlatformKeys {
            os: "OSFamily".into(),
            arch: "ISA".into(),
        }
    }
}

impl PlatformKeys {
    /// `OS_KEY,ARCH_KEY`, e.g. `OSFamily,ISA` or `os,cpu`.
    pub fn parse(text: &str) -> Result<PlatformKeys, PlatformKeysError> {
        let valid = |key: &str| {
            !key.is_empty()
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        };
        match text.split_once(',') {
            Some((os, arch)) if valid(os.trim()) && valid(arch.trim()) && os != arch => {
                Ok(PlatformKeys {
                    os: os.trim().into(),
                    arch: arch.trim().into(),
                })
            }
            _ => Err(PlatformKeysError {
                text: text.to_string(),
            }),
        }
    }

    /// The platform properties of `platform`, sorted by name as the REAPI requires.
    pub fn properties(&self, platform: &Platform) -> Vec<(String, String)> {
        let arch = match &platform.variant {
            Some(variant) => format!("{}/{variant}", platform.architecture),
            None => platform.architecture.clone(),
        };
        let mut properties = vec![
            (self.os.clone(), platform.os.clone()),
            (self.arch.clone(), arch),
        ];
        properties.sort();
        properties
    }
}

/// Seconds an action may wait in the queue for a worker ([`QUEUE_TIMEOUT_ENV`]).
pub fn queue_timeout_from_env() -> Result<std::time::Duration, QueueTimeoutError> {
    match std::env::var(QUEUE_TIMEOUT_ENV) {
        Err(_) => Ok(std::time::Duration::from_secs(60)),
        Ok(text) => text
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|seconds| seconds.is_finite() && *seconds > 0.0 && *seconds < 1e9)
            .map(std::time::Duration::from_secs_f64)
            .ok_or_else(|| QueueTimeoutError { text: text.clone() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_name_the_oci_architecture_and_are_sorted() {
        let keys = PlatformKeys::default();
        let platform = Platform::parse("linux/arm/v7").unwrap();
        assert_eq!(
            keys.properties(&platform),
            vec![
                ("ISA".to_string(), "arm/v7".to_string()),
                ("OSFamily".to_string(), "linux".to_string())
            ]
        );
        let custom = PlatformKeys::parse("os,cpu").unwrap();
        assert_eq!(
            custom.properties(&Platform::parse("linux/amd64").unwrap()),
            vec![
                ("cpu".to_string(), "amd64".to_string()),
                ("os".to_string(), "linux".to_string())
            ]
        );
        assert!(PlatformKeys::parse("os").is_err());
        assert!(PlatformKeys::parse("os,os").is_err());
        assert!(PlatformKeys::parse("o s,cpu").is_err());
    }
}
