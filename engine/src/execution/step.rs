//! Executing a [`RemoteStep`] on a worker: the layers it starts from unpacked (each checked
//! against both of its digests) into the worker's store, the task run in the same sandbox as a
//! local step on an overlay of them, and the upper directory written as the layer, with the
//! same layer writer and options as the client's: the same bytes a local build makes.

use std::path::Path;

use super::{LAYER_PATH, LAYERS_DIR, OUTCOME_PATH, RemoteStep, STEP_FILE, StepOutcome};
use crate::layer;
use crate::sandbox::overlay::Overlay;
use crate::sandbox::{self, SandboxSpec, Task};
use crate::state::LayerDesc;
use crate::store::Store;
use crate::unpack;

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
) -> Result<Executed, String> {
    step.check().map_err(|error| error.to_string())?;
    let options = step.layer_options().map_err(|error| error.to_string())?;
    let mut lowerdirs = Vec::with_capacity(step.layers.len());
    for layer in step.layers.iter().rev() {
        lowerdirs.push(snapshot(store, layer)?);
    }
    let temp = store
        .temp_dir()
        .map_err(|error| format!("cannot create a temporary directory: {error}"))?;
    let upperdir = temp.path().join("upper");
    let overlay_workdir = temp.path().join("work");
    for dir in [&upperdir, &overlay_workdir] {
        std::fs::create_dir_all(dir)
            .map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
    }
    let spec = SandboxSpec {
        lowerdirs,
        upperdir: upperdir.clone(),
        overlay_workdir,
        overlay: overlay.clone(),
        task: Task::Run(step.task.clone()),
    };
    let result = sandbox::run_sandbox(exe, &spec, on_line).map_err(|error| {
        let mut message = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            message.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        message
    })?;
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
        .map_err(|error| format!("cannot write the step's layer: {error}"))?;
    let layer = match blob {
        None => None,
        Some(blob) => {
            store
                .put_blob_file(&blob.path, Some(blob.digest))
                .map_err(|error| format!("cannot store the step's layer: {error}"))?;
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
fn snapshot(store: &Store, layer: &LayerDesc) -> Result<std::path::PathBuf, String> {
    if let Some(dir) = store.snapshot_path(&layer.diff_id)
        && store.verified_diff_id(&layer.digest) == Some(layer.diff_id)
    {
        return Ok(dir);
    }
    let blob = store.blob_path(&layer.digest);
    let check = unpack::LayerCheck::layer(layer.digest, layer.diff_id, layer.size);
    if store.snapshot_path(&layer.diff_id).is_some() {
        // A snapshot of this diff_id exists: is this blob that layer?
        let file = std::fs::File::open(&blob)
            .map_err(|error| format!("cannot open layer {}: {error}", layer.digest))?;
        unpack::verify_layer(std::io::BufReader::new(file), &check)
            .map_err(|error| format!("layer {}: {error}", layer.digest))?;
    }
    let dir = store
        .ensure_snapshot(&layer.diff_id, |dir: &Path| {
            let file = std::fs::File::open(&blob)
                .map_err(|error| format!("cannot open layer {}: {error}", layer.digest))?;
            unpack::unpack_layer_checked(std::io::BufReader::new(file), dir, &check)
                .map(|_| ())
                .map_err(|error| format!("layer {}: {error}", layer.digest))
        })
        .map_err(|error| error.to_string())?;
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
) -> Result<i32, String> {
    let path = root.join(STEP_FILE);
    let bytes =
        std::fs::read(&path).map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    let step: RemoteStep = serde_json::from_slice(&bytes)
        .map_err(|error| format!("{} is not a graphbuild step: {error}", path.display()))?;
    step.check().map_err(|error| error.to_string())?;
    for (index, layer) in step.layers.iter().enumerate() {
        if store.has_blob(&layer.digest) {
            continue;
        }
        let source = root
            .join(LAYERS_DIR)
            .join(super::action::layer_file_name(index));
        let temp = store
            .temp_dir()
            .map_err(|error| format!("cannot create a temporary directory: {error}"))?;
        let copy = temp.path().join("blob");
        std::fs::copy(&source, &copy)
            .map_err(|error| format!("cannot read {}: {error}", source.display()))?;
        store
            .put_blob_file(&copy, Some(layer.digest))
            .map_err(|error| format!("{}: {error}", source.display()))?;
    }
    let executed = execute(&step, store, exe, overlay, on_line)?;
    let outputs = root.join("graphbuild");
    std::fs::create_dir_all(outputs.join("layers"))
        .map_err(|error| format!("cannot create {}: {error}", outputs.display()))?;
    if let Some(layer) = &executed.outcome.layer {
        let dest = root.join(LAYER_PATH);
        std::fs::copy(store.blob_path(&layer.digest), &dest)
            .map_err(|error| format!("cannot write {}: {error}", dest.display()))?;
    }
    let outcome = serde_json::to_vec(&executed.outcome).unwrap_or_default();
    std::fs::write(root.join(OUTCOME_PATH), outcome)
        .map_err(|error| format!("cannot write {OUTCOME_PATH}: {error}"))?;
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
