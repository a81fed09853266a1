//! Executing a [`RemoteStep`] on a worker: the layers it starts from unpacked (each checked
//! against both of its digests) into the worker's store, the task run in the same sandbox as a
//! local step on an overlay of them, and the upper directory written as the layer, with the
//! same layer writer and options as the client's: the same bytes a local build makes.

use std::io;
use std::path::{Path, PathBuf};

use super::{
    LAYER_PATH, LAYERS_DIR, OUTCOME_PATH, RemoteStep, STEP_FILE, StepCheckError, StepOutcome,
};
use crate::digest::Digest;
use crate::layer::{self, LayerError};
use crate::sandbox::overlay::Overlay;
use crate::sandbox::{self, SandboxError, SandboxSpec, Task};
use crate::state::LayerDesc;
use crate::store::{Store, StoreError};
use crate::unpack::{self, UnpackError};

/// Why a remote step could not run on this worker: a worker problem, not the step's command
/// failing (that is an [`Executed`] with its status). Workers report it as the action's status
/// message, `worker-step` as its error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerStepError {
    #[error(transparent)]
    Check(#[from] StepCheckError),
    #[error("cannot create a temporary directory: {0}")]
    TempDir(#[source] io::Error),
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a graphbuild step: {source}", path.display())]
    NotAStep {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: {source}", path.display())]
    StoreBlob {
        path: PathBuf,
        #[source]
        source: StoreError,
    },
    #[error("cannot open layer {digest}: {source}")]
    OpenLayer {
        digest: Digest,
        #[source]
        source: io::Error,
    },
    #[error("layer {digest}: {source}")]
    Layer {
        digest: Digest,
        #[source]
        source: UnpackError,
    },
    #[error(transparent)]
    Snapshot(StoreError),
    /// The sandbox's error with its causes, as one line.
    #[error("{}", with_causes(.0))]
    Sandbox(#[source] SandboxError),
    #[error("cannot write the step's layer: {0}")]
    WriteLayer(#[source] LayerError),
    #[error("cannot store the step's layer: {0}")]
    StoreLayer(#[source] StoreError),
    #[error("cannot write {OUTCOME_PATH}: {0}")]
    Outcome(#[source] io::Error),
}

fn with_causes(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    message
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> WorkerStepError {
    let path = path.to_path_buf();
    move |source| WorkerStepError::Io {
        action,
        path,
        source,
    }
}

/// What a remote step did: how it ended, the last lines of its output, and the layer blob
/// (in `store`) it made.
pub struct Executed {
    pub outcome: StepOutcome,
    pub tail: Vec<String>,
}

/// Execute `step`, whose layer blobs are in `store`, with the sandbox binary `exe` on
/// `overlay`; `on_line` receives the command's output. An `Err` is a worker problem (the step
/// did not run); a command that fails is an [`Executed`] with its status.
pub fn execute(
    step: &RemoteStep,
    store: &Store,
    exe: &Path,
    overlay: &Overlay,
    on_line: &mut dyn FnMut(&str),
) -> Result<Executed, WorkerStepError> {
    step.check()?;
    let options = step.layer_options()?;
    let mut lowerdirs = Vec::with_capacity(step.layers.len());
    for layer in step.layers.iter().rev() {
        lowerdirs.push(snapshot(store, layer)?);
    }
    let temp = store.temp_dir().map_err(WorkerStepError::TempDir)?;
    let upperdir = temp.path().join("upper");
    let overlay_workdir = temp.path().join("work");
    for dir in [&upperdir, &overlay_workdir] {
        std::fs::create_dir_all(dir).map_err(io_error("create", dir))?;
    }
    let spec = SandboxSpec {
        lowerdirs,
        upperdir: upperdir.clone(),
        overlay_workdir,
        overlay: overlay.clone(),
        task: Task::Run(step.task.clone()),
    };
    let result = sandbox::run_sandbox(exe, &spec, on_line).map_err(WorkerStepError::Sandbox)?;
    if result.status != sandbox::ExitStatusKind::Exited(0) {
        return Ok(Executed {
            outcome: StepOutcome {
                status: result.status,
                layer: None,
            },
            tail: result.tail,
        });
    }
    let blob = layer::write_layer_from_upper(&upperdir, temp.path(), &options)
        .map_err(WorkerStepError::WriteLayer)?;
    let layer = match blob {
        None => None,
        Some(blob) => {
            store
                .put_blob_file(&blob.path, Some(blob.digest))
                .map_err(WorkerStepError::StoreLayer)?;
            Some(LayerDesc {
                digest: blob.digest,
                diff_id: blob.diff_id,
                size: blob.size,
                media_type: blob.media_type.to_string(),
            })
        }
    };
    Ok(Executed {
        outcome: StepOutcome {
            status: result.status,
            layer,
        },
        tail: result.tail,
    })
}

/// The snapshot of a layer whose blob is in the store, unpacked (and verified) when missing.
fn snapshot(store: &Store, layer: &LayerDesc) -> Result<PathBuf, WorkerStepError> {
    if let Some(dir) = store.snapshot_path(&layer.diff_id)
        && store.verified_diff_id(&layer.digest) == Some(layer.diff_id)
    {
        return Ok(dir);
    }
    let blob = store.blob_path(&layer.digest);
    let check = unpack::LayerCheck::layer(layer.digest, layer.diff_id, layer.size);
    let digest = layer.digest;
    let open = |source| WorkerStepError::OpenLayer { digest, source };
    let invalid = |source| WorkerStepError::Layer { digest, source };
    if store.snapshot_path(&layer.diff_id).is_some() {
        // A snapshot of this diff_id exists: is this blob that layer?
        let file = std::fs::File::open(&blob).map_err(open)?;
        unpack::verify_layer(std::io::BufReader::new(file), &check).map_err(invalid)?;
    }
    let dir = store
        .ensure_snapshot(&layer.diff_id, |dir: &Path| {
            let file = std::fs::File::open(&blob).map_err(open)?;
            unpack::unpack_layer_checked(std::io::BufReader::new(file), dir, &check)
                .map(|_| ())
                .map_err(invalid)
        })
        .map_err(WorkerStepError::Snapshot)?;
    let _ = store.record_verified_layer(layer);
    Ok(dir)
}

/// `graphbuild worker-step step.json`, in an action's input root `root` (the working
/// directory of a generic REAPI worker): the layer blobs under `layers/` go into `store`, the
/// step runs, and the outputs are written under `root` ([`OUTCOME_PATH`], [`LAYER_PATH`]).
/// Returns the command's exit code (the worker reports it as the action's).
pub fn run_in_input_root(
    root: &Path,
    store: &Store,
    exe: &Path,
    overlay: &Overlay,
    on_line: &mut dyn FnMut(&str),
) -> Result<i32, WorkerStepError> {
    let path = root.join(STEP_FILE);
    let bytes = std::fs::read(&path).map_err(io_error("read", &path))?;
    let step: RemoteStep =
        serde_json::from_slice(&bytes).map_err(|source| WorkerStepError::NotAStep {
            path: path.clone(),
            source,
        })?;
    step.check()?;
    for (index, layer) in step.layers.iter().enumerate() {
        if store.has_blob(&layer.digest) {
            continue;
        }
        let source = root
            .join(LAYERS_DIR)
            .join(super::action::layer_file_name(index));
        let temp = store.temp_dir().map_err(WorkerStepError::TempDir)?;
        let copy = temp.path().join("blob");
        std::fs::copy(&source, &copy).map_err(io_error("read", &source))?;
        store
            .put_blob_file(&copy, Some(layer.digest))
            .map_err(|error| WorkerStepError::StoreBlob {
                path: source.clone(),
                source: error,
            })?;
    }
    let executed = execute(&step, store, exe, overlay, on_line)?;
    let outputs = root.join("graphbuild");
    std::fs::create_dir_all(outputs.join("layers")).map_err(io_error("create", &outputs))?;
    if let Some(layer) = &executed.outcome.layer {
        let dest = root.join(LAYER_PATH);
        std::fs::copy(store.blob_path(&layer.digest), &dest).map_err(io_error("write", &dest))?;
    }
    let outcome = serde_json::to_vec(&executed.outcome).unwrap_or_default();
    std::fs::write(root.join(OUTCOME_PATH), outcome).map_err(WorkerStepError::Outcome)?;
    Ok(executed.outcome.status.exit_code())
}

impl sandbox::ExitStatusKind {
    /// The exit code a shell would report: the code, or 128 + the signal; 124 for a timeout
    /// (timeout(1)'s), 137 for a process limit (the step is killed).
    pub fn exit_code(&self) -> i32 {
        match *self {
            sandbox::ExitStatusKind::Exited(code) => code,
            sandbox::ExitStatusKind::Signaled(signal) => 128 + signal,
            sandbox::ExitStatusKind::TimedOut { .. } => 124,
            sandbox::ExitStatusKind::ProcessLimit { .. } => 137,
        }
    }
}
