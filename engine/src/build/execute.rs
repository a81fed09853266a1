//! Executing a node's steps: resume after the last cached step, run each remaining `run` (and
//! each `copy` that [`super::direct_copy`] leaves to the sandbox) in the sandbox on an overlay
//! of the current layers' snapshots, and turn the upper directory into the step's layer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::copy::{self, CopyItem};
use crate::digest::{Digest, Key};
use crate::events::{Event, StepStatus};
use crate::key::KeyBuilder;
use crate::layer::{self};
use crate::plan::{Base, CopySource, Node, Op, RunOp};
use crate::sandbox::{self, NetworkMode, RunTask, SandboxSpec, Task};
use crate::state::{HistoryEntry, LayerDesc, StepRecord};
use crate::unpack;

use super::{Executor, INSECURE_WARNING, NodeFailure, NodeOutput, SecretValue};

/// The JSON a sandbox copy task carries.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct CopyTask {
    /// Where sources are read from: the context directory, or an overlay of a stage's layers.
    pub source: CopyTaskSource,
    /// Patterns, resolved in the child for stage sources.
    pub sources: Vec<String>,
    /// Pre-selected context items.
    pub items: Vec<CopyItem>,
    pub dest: String,
    pub workdir: String,
    pub chown: Option<String>,
    pub chmod: Option<u32>,
}

#[derive(serde::Serialize, serde::Deserialize)]
pub enum CopyTaskSource {
    Context(PathBuf),
    /// Snapshot directories, top-most first.
    Layers(Vec<PathBuf>),
}

/// Runs inside the sandbox child, in its private mount namespace, with the step's root mounted
/// at `root`.
pub fn copy_in_sandbox(root: &Path, task: &serde_json::Value) -> Result<(), String> {
    let task: CopyTask = serde_json::from_value(task.clone())
        .map_err(|error| format!("invalid copy task: {error}"))?;
    let chown = match &task.chown {
        Some(spec) => Some(copy::parse_chown(spec, root).map_err(|error| error.to_string())?),
        None => None,
    };
    let copy_options = copy::CopyOptions {
        chown,
        chmod: task.chmod,
    };
    match &task.source {
        CopyTaskSource::Context(dir) => copy::perform_copy(
            &task.items,
            dir,
            root,
            &task.dest,
            &task.workdir,
            &copy_options,
        )
        .map_err(|error| error.to_string()),
        CopyTaskSource::Layers(lowerdirs) => {
            let source_root = mount_readonly_layers(root, lowerdirs)?;
            let items = crate::context::select_in_tree(&source_root, &task.sources)
                .map_err(|error| error.to_string())?;
            copy::perform_copy(
                &items,
                &source_root,
                root,
                &task.dest,
                &task.workdir,
                &copy_options,
            )
            .map_err(|error| error.to_string())
        }
    }
}

/// Mount a read-only view of some layers next to the step's root (inside the child's private
/// mount namespace, so it disappears with the child).
fn mount_readonly_layers(root: &Path, lowerdirs: &[PathBuf]) -> Result<PathBuf, String> {
    use nix::mount::{MsFlags, mount};
    let parent = root.parent().ok_or("the sandbox root has no parent")?;
    let target = parent.join("copy-source");
    std::fs::create_dir_all(&target)
        .map_err(|error| format!("cannot create {}: {error}", target.display()))?;
    if lowerdirs.is_empty() {
        return Ok(target);
    }
    if lowerdirs.len() == 1 {
        mount(
            Some(&lowerdirs[0]),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|error| format!("cannot bind-mount the copy source: {error}"))?;
        return Ok(target);
    }
    let lower = lowerdirs
        .iter()
        .map(|dir| dir.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    mount(
        Some("overlay"),
        &target,
        Some("overlay"),
        MsFlags::MS_RDONLY,
        Some(format!("lowerdir={lower}").as_str()),
    )
    .map_err(|error| format!("cannot mount the copy source: {error}"))?;
    Ok(target)
}

impl Executor<'_> {
    pub(super) fn run_node_steps(&self, node: &Node) -> Result<NodeOutput, Box<NodeFailure>> {
        let platform = node.platform.to_string();
        let mut executed = 0;
        let mut cached = 0;

        // Find the last cached filesystem step; everything before it is covered by its record,
        // base layers included, so the base is needed only when nothing is cached.
        let mut resume_at = 0;
        let mut resumed_from: Option<Key> = None;
        let mut state: Option<(Vec<LayerDesc>, Vec<HistoryEntry>)> = None;
        for (index, step) in node.steps.iter().enumerate().rev() {
            if !step.op.touches_filesystem() {
                continue;
            }
            let found = self
                .cached_record(&step.key)
                .map_err(|message| self.failure(node, Some(step), message, Vec::new()))?;
            if let Some(record) = found {
                // A local hit the remote lacks is published, so a merge elsewhere finds it.
                if self.options.remote.to.is_some() {
                    self.publish(&step.key, &record)
                        .map_err(|message| self.failure(node, Some(step), message, Vec::new()))?;
                }
                state = Some((record.layers, record.history));
                resumed_from = Some(step.key);
                resume_at = index + 1;
                break;
            }
        }
        let (mut layers, mut history) = match state {
            Some(state) => state,
            None => match &node.base {
                Base::Scratch => (Vec::new(), Vec::new()),
                Base::Stage(id) => {
                    let base = self
                        .output_of(*id)
                        .map_err(|message| self.failure(node, None, message, Vec::new()))?;
                    (base.layers.clone(), base.history.clone())
                }
                Base::Image(base) => {
                    if let Ok(mut origins) = self.layer_origins.lock() {
                        for layer in &base.layers {
                            origins.entry(layer.digest).or_insert_with(|| {
                                format!(" of base image `{}` for {}", base.reference, base.platform)
                            });
                        }
                    }
                    self.resolver
                        .fetch_layers(base, self.store)
                        .map_err(|error| self.failure(node, None, error.to_string(), Vec::new()))?;
                    (base.layers.clone(), base.history.clone())
                }
                Base::Unresolved(base) => {
                    let message = format!("the base image `{}` is unresolved", base.reference);
                    return Err(self.failure(node, None, message, Vec::new()));
                }
            },
        };
        for step in &node.steps[..resume_at] {
            if step.op.touches_filesystem() {
                cached += 1;
                self.events.emit(Event::Step {
                    node: node.id,
                    stage: node.stage.clone(),
                    platform: platform.clone(),
                    step: step.description.clone(),
                    status: StepStatus::Cached,
                    duration_ms: None,
                });
            }
        }

        for step in &node.steps[resume_at..] {
            if self.options.cancel.is_cancelled() {
                return Err(self.failure(node, Some(step), "cancelled".into(), Vec::new()));
            }
            if !step.op.touches_filesystem() {
                history.push(HistoryEntry {
                    created_by: step.description.clone(),
                    empty_layer: true,
                });
                continue;
            }
            // Another node of this build, or another run on this store, may be executing the
            // same step: wait for it, then take its result.
            let step_lock = self
                .in_flight
                .lock()
                .map(|mut in_flight| in_flight.entry(step.key).or_default().clone())
                .unwrap_or_default();
            let _executing = step_lock.lock();
            let reusable = !self.options.no_cache
                || self
                    .executed_here
                    .lock()
                    .is_ok_and(|executed| executed.contains(&step.key));
            if let Some(record) = self.local_record(&step.key).filter(|_| reusable) {
                layers = record.layers;
                history = record.history;
                cached += 1;
                self.events.emit(Event::Step {
                    node: node.id,
                    stage: node.stage.clone(),
                    platform: platform.clone(),
                    step: step.description.clone(),
                    status: StepStatus::Cached,
                    duration_ms: None,
                });
                continue;
            }
            self.events.emit(Event::StepStarted {
                node: node.id,
                stage: node.stage.clone(),
                platform: platform.clone(),
                step: step.description.clone(),
            });
            let started = Instant::now();
            let result = self.execute_step(node, step, &layers);
            if result.is_err() {
                self.forget_forged(&layers, &mut resumed_from);
            }
            let status = if result.is_ok() {
                StepStatus::Executed
            } else {
                StepStatus::Failed
            };
            self.events.emit(Event::Step {
                node: node.id,
                stage: node.stage.clone(),
                platform: platform.clone(),
                step: step.description.clone(),
                status,
                duration_ms: Some(started.elapsed().as_millis() as u64),
            });
            let new_layer = result?;
            executed += 1;
            if let Ok(mut executed_here) = self.executed_here.lock() {
                executed_here.insert(step.key);
            }
            match new_layer {
                Some(layer) => {
                    layers.push(layer);
                    history.push(HistoryEntry {
                        created_by: step.description.clone(),
                        empty_layer: false,
                    });
                }
                None => history.push(HistoryEntry {
                    created_by: step.description.clone(),
                    empty_layer: true,
                }),
            }
            let record = StepRecord {
                layers: layers.clone(),
                history: history.clone(),
            };
            let bytes = serde_json::to_vec(&record).unwrap_or_default();
            self.store
                .put_action(&self.action_key(&step.key), &bytes)
                .map_err(|error| {
                    self.failure(
                        node,
                        Some(step),
                        format!("cannot record the step in the store: {error}"),
                        Vec::new(),
                    )
                })?;
            self.publish(&step.key, &record)
                .map_err(|message| self.failure(node, Some(step), message, Vec::new()))?;
        }
        Ok(NodeOutput {
            layers,
            history,
            executed,
            cached,
        })
    }

    /// A step failed: if a layer it started from was found forged, the action record the node
    /// resumed from names it, and must not be found again.
    pub(super) fn forget_forged(&self, layers: &[LayerDesc], resumed_from: &mut Option<Key>) {
        let forged = self
            .forged_layers
            .lock()
            .map(|forged| layers.iter().any(|layer| forged.contains(&layer.digest)))
            .unwrap_or(false);
        if forged && let Some(key) = resumed_from.take() {
            let _ = self.store.remove_action(&self.action_key(&key));
        }
    }

    /// Snapshot directories for a layer list, top-most first.
    pub(super) fn snapshots(&self, layers: &[LayerDesc]) -> Result<Vec<PathBuf>, String> {
        let mut dirs = Vec::with_capacity(layers.len());
        for layer in layers.iter().rev() {
            let blob = self.store.blob_path(&layer.digest);
            // Nodes that need the same layer at once wait for one extraction.
            let extracting = self
                .in_flight_snapshots
                .lock()
                .map(|mut in_flight| in_flight.entry(layer.diff_id).or_default().clone())
                .unwrap_or_default();
            let _extracting = extracting.lock();
            // A snapshot of this diff_id exists: it was verified when it was made, but is this
            // blob that layer? (Another image may claim the diff_id for other content.)
            if let Ok(mut in_use) = self.snapshots_in_use.lock() {
                in_use.insert(layer.diff_id);
            }
            if let Some(dir) = self.store.snapshot_path(&layer.diff_id) {
                self.verify_layer_blob(layer)?;
                dirs.push(dir);
                continue;
            }
            let mut failure = None;
            let made = self.store.ensure_snapshot(&layer.diff_id, |dir: &Path| {
                let file = match std::fs::File::open(&blob) {
                    Ok(file) => file,
                    Err(error) => {
                        let message = format!("cannot open layer {}: {error}", layer.digest);
                        failure = Some(message.clone());
                        return Err(message);
                    }
                };
                let mut check = unpack::LayerCheck::layer(layer.digest, layer.diff_id, layer.size);
                // The build's own budget: this layer may use what is left of it.
                let budget = unpack::max_build_unpack();
                let left = budget.saturating_sub(self.unpacked.load(Ordering::Relaxed));
                let bound_by_build = left < check.max_bytes;
                check.max_bytes = check.max_bytes.min(left);
                match unpack::unpack_layer_checked(std::io::BufReader::new(file), dir, &check) {
                    Ok(stats) => {
                        self.unpacked.fetch_add(stats.bytes, Ordering::Relaxed);
                        Ok(())
                    }
                    Err(unpack::UnpackError::TooLarge { .. }) if bound_by_build => {
                        let message = format!(
                            "cannot unpack layer {}{}: this build has unpacked more than {budget} \
                             bytes of layers, the limit per build; raise it with {}=SIZE (for \
                             example 200G) if the images are legitimate",
                            layer.digest,
                            self.origin(&layer.digest),
                            unpack::MAX_BUILD_UNPACK_ENV
                        );
                        failure = Some(message.clone());
                        Err(message)
                    }
                    Err(error) => {
                        let message = self.layer_error(layer, error);
                        failure = Some(message.clone());
                        Err(message)
                    }
                }
            });
            let dir = match made {
                Ok(dir) => dir,
                Err(error) => return Err(failure.unwrap_or_else(|| error.to_string())),
            };
            let _ = self.store.record_verified_layer(layer);
            dirs.push(dir);
        }
        Ok(dirs)
    }

    pub(super) fn execute_step(
        &self,
        node: &Node,
        step: &crate::plan::StepPlan,
        layers: &[LayerDesc],
    ) -> Result<Option<LayerDesc>, Box<NodeFailure>> {
        let fail = |message: String| self.failure(node, Some(step), message, Vec::new());
        // A copy whose layer can be computed from its sources is written straight, once for
        // every platform that copies the same files onto alike parents.
        if let Op::Copy(copy) = &step.op
            && let Some(layer) = self.copy_direct(node, step, copy, layers)?
        {
            return Ok(layer);
        }
        let lowerdirs = self.snapshots(layers).map_err(fail)?;
        let temp = self
            .store
            .temp_dir()
            .map_err(|error| fail(format!("cannot create a temporary directory: {error}")))?;
        let upperdir = temp.path().join("upper");
        let overlay_workdir = temp.path().join("work");
        for dir in [&upperdir, &overlay_workdir] {
            std::fs::create_dir_all(dir)
                .map_err(|error| fail(format!("cannot create {}: {error}", dir.display())))?;
        }
        let mut guards: Vec<Box<dyn std::any::Any>> = Vec::new();
        let task = match &step.op {
            Op::Run(run) => Task::Run(self.run_task(node, run, &mut guards).map_err(fail)?),
            Op::Copy(copy) => {
                let (source, items) = match &copy.from {
                    CopySource::Context { items, .. } => (
                        CopyTaskSource::Context(self.plan.context_dir.clone()),
                        items.clone(),
                    ),
                    CopySource::Node { node: source, .. } => {
                        let output = self.output_of(*source).map_err(fail)?;
                        (
                            CopyTaskSource::Layers(self.snapshots(&output.layers).map_err(fail)?),
                            Vec::new(),
                        )
                    }
                };
                let task = CopyTask {
                    source,
                    sources: copy.sources.clone(),
                    items,
                    dest: copy.dest.clone(),
                    workdir: copy.workdir.clone(),
                    chown: copy.chown.clone(),
                    chmod: copy.chmod,
                };
                Task::Copy(serde_json::to_value(&task).map_err(|error| fail(error.to_string()))?)
            }
            Op::Config(_) => return Ok(None),
        };
        let spec = SandboxSpec {
            lowerdirs,
            upperdir: upperdir.clone(),
            overlay_workdir,
            task,
        };
        let node_id = node.id;
        if matches!(&step.op, Op::Run(run) if run.insecure) {
            self.events.emit(Event::Output {
                node: node_id,
                line: format!("[graphbuild] warning: {INSECURE_WARNING}"),
            });
        }
        if matches!(&step.op, Op::Run(run) if !run.insecure) && node.platform.architecture == "386"
        {
            self.events.emit(Event::Output {
                node: node_id,
                line: "[graphbuild] warning: linux/386 steps run without the seccomp filter (it \
                       only knows x86_64 system calls); capabilities, devices, /proc and limits \
                       are confined as usual (docs/security.md)"
                    .to_string(),
            });
        }
        // GRAPHBUILD_SANDBOX_EXE runs sandboxes with another binary (tests use it to prove a
        // build needs none).
        let sandbox_exe = std::env::var_os("GRAPHBUILD_SANDBOX_EXE")
            .map(PathBuf::from)
            .unwrap_or_else(|| self.options.sandbox_exe.clone());
        let outcome = sandbox::run_sandbox(&sandbox_exe, &spec, &mut |line: &str| {
            self.events.emit(Event::Output {
                node: node_id,
                line: line.to_string(),
            });
        })
        .map_err(|error| fail(error.to_string()))?;
        drop(guards);
        match outcome.status {
            sandbox::ExitStatusKind::Exited(0) => {}
            sandbox::ExitStatusKind::Exited(code) => {
                return Err(self.failure(
                    node,
                    Some(step),
                    format!("the command failed with exit code {code}"),
                    outcome.tail,
                ));
            }
            sandbox::ExitStatusKind::Signaled(signal) => {
                let hint = if signal == libc::SIGSYS {
                    " (SIGSYS: a system call the sandbox's seccomp filter refuses; 32-bit x86 \
                     programs cannot run under it, see docs/security.md)"
                } else {
                    ""
                };
                return Err(self.failure(
                    node,
                    Some(step),
                    format!("the command was killed by signal {signal}{hint}"),
                    outcome.tail,
                ));
            }
            sandbox::ExitStatusKind::TimedOut { millis } => {
                return Err(self.failure(
                    node,
                    Some(step),
                    format!(
                        "the step ran past its timeout of {} and was killed (set with \
                         `timeout=` on `run` or `--step-timeout`)",
                        sandbox::format_duration(millis)
                    ),
                    outcome.tail,
                ));
            }
            sandbox::ExitStatusKind::ProcessLimit { max } => {
                return Err(self.failure(
                    node,
                    Some(step),
                    format!(
                        "the step reached its process limit of {max} processes (pids cgroup) \
                         and was killed"
                    ),
                    outcome.tail,
                ));
            }
        }
        // A change already stored as a layer (the same files copied on another platform) is
        // that layer: hash the tar first, compress only what is new.
        let Some(diff_id) = layer::diff_id_of_upper(&upperdir, &self.options.layer)
            .map_err(|error| fail(format!("cannot write the layer: {error}")))?
        else {
            return Ok(None);
        };
        let compressing = self
            .in_flight
            .lock()
            .map(|mut in_flight| {
                in_flight
                    .entry(self.layer_key(&diff_id))
                    .or_default()
                    .clone()
            })
            .unwrap_or_default();
        let _compressing = compressing.lock();
        if let Some(known) = self.known_layer(&diff_id) {
            self.adopt_snapshot(&diff_id, &upperdir);
            let _ = self.store.record_verified_layer(&known);
            return Ok(Some(known));
        }
        let blob = layer::write_layer_from_upper(&upperdir, temp.path(), &self.options.layer)
            .map_err(|error| fail(format!("cannot write the layer: {error}")))?;
        let Some(blob) = blob else { return Ok(None) };
        self.store
            .put_blob_file(&blob.path, Some(blob.digest))
            .map_err(|error| fail(format!("cannot store the layer: {error}")))?;
        let layer = LayerDesc {
            digest: blob.digest,
            diff_id: blob.diff_id,
            size: blob.size,
            media_type: blob.media_type.to_string(),
        };
        if let Ok(bytes) = serde_json::to_vec(&layer) {
            let _ = self
                .store
                .put_action(&self.layer_key(&layer.diff_id), &bytes);
        }
        self.adopt_snapshot(&layer.diff_id, &upperdir);
        // Both digests were computed here, from the tar written: a verified pair.
        let _ = self.store.record_verified_layer(&layer);
        Ok(Some(layer))
    }

    /// Keep a step's upper directory as the snapshot of its layer, instead of deleting it and
    /// unpacking the layer again for the next step: an overlay upper directory already is a
    /// valid lower directory (whiteouts are 0/0 devices, opaque directories carry the xattr).
    /// Times are clamped first, so it is the same tree unpacking the layer would give.
    pub(super) fn adopt_snapshot(&self, diff_id: &Digest, upperdir: &Path) {
        if self.store.snapshot_path(diff_id).is_some() {
            return;
        }
        let extracting = self
            .in_flight_snapshots
            .lock()
            .map(|mut in_flight| in_flight.entry(*diff_id).or_default().clone())
            .unwrap_or_default();
        let _extracting = extracting.lock();
        let epoch = self.options.layer.source_date_epoch;
        let _ = self
            .store
            .ensure_snapshot(diff_id, |dir: &Path| -> Result<(), String> {
                clamp_times(upperdir, epoch)?;
                std::fs::remove_dir(dir).map_err(|error| error.to_string())?;
                std::fs::rename(upperdir, dir).map_err(|error| error.to_string())
            });
    }

    /// Where the compressed blob of a diff id is recorded, per compression.
    pub(super) fn layer_key(&self, diff_id: &Digest) -> Key {
        let compression = match self.options.layer.compression {
            layer::Compression::Gzip => "gzip",
            layer::Compression::Zstd => "zstd",
            layer::Compression::None => "none",
        };
        KeyBuilder::new("layer-blob")
            .bytes(&diff_id.0)
            .str(compression)
            .finish()
    }

    /// A stored layer with this diff id, if its blob is still in the store.
    pub(super) fn known_layer(&self, diff_id: &Digest) -> Option<LayerDesc> {
        let bytes = self.store.get_action(&self.layer_key(diff_id))?;
        let layer: LayerDesc = serde_json::from_slice(&bytes).ok()?;
        (layer.diff_id == *diff_id && self.blob_present(&layer.digest, layer.size)).then_some(layer)
    }

    /// The sandbox task for a `run`; `guards` keeps cache-mount locks and secret files alive
    /// until the step ends (secret files are deleted when their guard drops).
    pub(super) fn run_task(
        &self,
        node: &Node,
        run: &RunOp,
        guards: &mut Vec<Box<dyn std::any::Any>>,
    ) -> Result<RunTask, String> {
        let mut cache_mounts = Vec::new();
        // Locks are taken in id order so two steps sharing mounts can never deadlock; one id
        // mounted at two targets is one directory, locked once.
        let mut mounts: Vec<_> = run.cache_mounts.iter().collect();
        mounts.sort_by(|a, b| a.id.cmp(&b.id));
        let mut paths: HashMap<&str, PathBuf> = HashMap::new();
        for mount in mounts {
            if !paths.contains_key(mount.id.as_str()) {
                // Filling a mount from the remote cache needs it to itself.
                let sharing = match mount.sharing {
                    crate::store::CacheSharing::Shared if self.options.remote.from.is_some() => {
                        crate::store::CacheSharing::Locked
                    }
                    sharing => sharing,
                };
                let guard = self
                    .store
                    .cache_mount_shared(&mount.id, &node.platform.to_string(), sharing)
                    .map_err(|error| format!("cannot open cache mount `{}`: {error}", mount.id))?;
                self.restore_cache_mount(&mount.id, &node.platform.to_string(), guard.path())?;
                paths.insert(&mount.id, guard.path().to_path_buf());
                guards.push(Box::new(guard));
            }
            cache_mounts.push((paths[mount.id.as_str()].clone(), mount.target.clone()));
        }
        let mut env = run.env.clone();
        let mut secret_files = Vec::new();
        for secret in &run.secrets {
            match self.options.secrets.get(&secret.id) {
                None if secret.required => {
                    return Err(format!(
                        "the step needs the secret `{}`; pass it with --secret id={},src=PATH or --secret id={},env=VAR",
                        secret.id, secret.id, secret.id
                    ));
                }
                None => {}
                Some(value) => {
                    let bytes = match value {
                        SecretValue::File(path) => std::fs::read(path).map_err(|error| {
                            format!("cannot read secret `{}`: {error}", secret.id)
                        })?,
                        SecretValue::Bytes(bytes) => bytes.clone(),
                    };
                    if let Some(name) = &secret.env {
                        env.push((name.clone(), String::from_utf8_lossy(&bytes).into_owned()));
                    } else {
                        let dir = self.store.temp_dir().map_err(|error| error.to_string())?;
                        let path = dir.path().join("secret");
                        write_private(&path, &bytes).map_err(|error| error.to_string())?;
                        let target = secret
                            .target
                            .clone()
                            .unwrap_or_else(|| format!("/run/secrets/{}", secret.id));
                        secret_files.push((path, target));
                        guards.push(Box::new(dir));
                    }
                }
            }
        }
        Ok(RunTask {
            argv: run.argv.clone(),
            env,
            cwd: run.workdir.clone(),
            user: run.user.clone(),
            cache_mounts,
            secret_files,
            network: if run.network_none {
                NetworkMode::None
            } else {
                NetworkMode::Host
            },
            hostname: "graphbuild".into(),
            timeout_ms: run.timeout_ms.or(self.options.step_timeout_ms),
            max_processes: self.options.step_max_processes,
            insecure: run.insecure,
            without_seccomp: node.platform.architecture == "386",
        })
    }
}

/// Write a file only its owner can read (`0600`, whatever the umask).
pub(super) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

/// Set every entry's access and modification times under `root` to `min(mtime, epoch)`,
/// without following symlinks, as the layer writer records them.
pub(super) fn clamp_times(root: &Path, epoch: i64) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    for entry in walkdir::WalkDir::new(root)
        .follow_links(false)
        .contents_first(true)
    {
        let entry = entry.map_err(|error| error.to_string())?;
        let metadata = entry.metadata().map_err(|error| error.to_string())?;
        let mtime = std::os::unix::fs::MetadataExt::mtime(&metadata).min(epoch);
        let time = libc::timespec {
            tv_sec: mtime as libc::time_t,
            tv_nsec: 0,
        };
        let times = [time, time];
        let path = std::ffi::CString::new(entry.path().as_os_str().as_bytes())
            .map_err(|error| error.to_string())?;
        // SAFETY: a valid NUL-terminated path and two timespecs, as utimensat(2) expects.
        let result = unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                path.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if result != 0 {
            return Err(format!(
                "cannot set the times of {}: {}",
                entry.path().display(),
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}
