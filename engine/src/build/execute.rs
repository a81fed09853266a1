//! Executing a node's steps: resume after the last cached step, run each remaining `run` (and
//! each `copy` that [`super::direct_copy`] leaves to the sandbox) in the sandbox on an overlay
//! of the current layers' snapshots, and turn the upper directory into the step's layer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::digest::{Digest, Key};
use crate::events::{Event, StepStatus};
use crate::key::KeyBuilder;
use crate::layer::{self};
use crate::plan::{Base, CopySource, Node, Op, RunOp};
use crate::sandbox::overlay::{self, Selection, Unavailable};
use crate::sandbox::{self, CopyTask, CopyTaskSource, NetworkMode, RunTask, SandboxSpec, Task};
use crate::state::{HistoryEntry, LayerDesc, StepRecord};
use crate::unpack;

use super::faults::{CopyFault, LayerFault};
use super::step_cache::{Entry, StepCache};
use super::{
    DepOutputs, Executor, INSECURE_WARNING, NodeFailure, NodeOutput, SecretValue, StepError,
};

impl Executor<'_> {
    pub(super) fn run_node_steps(
        &self,
        node: &Node,
        inputs: &DepOutputs<'_>,
    ) -> Result<NodeOutput, Box<NodeFailure>> {
        let platform = node.platform.to_string();
        let mut executed = 0;
        let mut cached = 0;

        // Find the last cached filesystem step; everything before it is covered by its record,
        // base layers included, so the base is needed only when nothing is cached.
        let mut resume_at = 0;
        let mut resumed_from: Option<Key> = None;
        let mut state: Option<(Vec<LayerDesc>, Vec<HistoryEntry>)> = None;
        let cache = self.step_cache();
        for (index, step) in node.steps.iter().enumerate().rev() {
            if !step.op.touches_filesystem() {
                continue;
            }
            let action_key = self.action_key(&step.key);
            let found = cache
                .lookup(&action_key)
                .map_err(|error| self.failure(node, Some(step), error, Vec::new()))?;
            if let Some(entry) = found {
                // A hit the team cache lacks is published to it, so a merge elsewhere finds it.
                cache
                    .share(&action_key, &entry)
                    .map_err(|error| self.failure(node, Some(step), error, Vec::new()))?;
                let record = entry.record;
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
                    let base = inputs
                        .output_of(*id)
                        .map_err(|error| self.failure(node, None, error, Vec::new()))?;
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
                        .map_err(|error| self.failure(node, None, error, Vec::new()))?;
                    (base.layers.clone(), base.history.clone())
                }
                Base::Unresolved(base) => {
                    let error = StepError::Unresolved {
                        reference: base.reference.to_string(),
                    };
                    return Err(self.failure(node, None, error, Vec::new()));
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
                    ran_on: None,
                });
            }
        }

        for step in &node.steps[resume_at..] {
            if self.options.cancel.is_cancelled() {
                return Err(self.failure(node, Some(step), StepError::Cancelled, Vec::new()));
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
            let local = match reusable {
                true => cache.local.lookup(&self.action_key(&step.key)),
                false => Ok(None),
            };
            if let Ok(Some(Entry { record, .. })) = local {
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
                    ran_on: None,
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
            let (result, ran_on) = match self.execute_remotely(node, step, &layers) {
                Some((result, worker)) => (result, Some(worker)),
                None => (
                    self.can_run_here(node, step)
                        .and_then(|()| self.execute_step(node, step, &layers, inputs)),
                    self.options
                        .remote
                        .executor
                        .as_ref()
                        .map(|_| "local".to_string()),
                ),
            };
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
                ran_on,
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
            Entry::new(record)
                .and_then(|entry| cache.publish(&self.action_key(&step.key), &entry))
                .map_err(|error| self.failure(node, Some(step), error, Vec::new()))?;
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
    pub(super) fn snapshots(&self, layers: &[LayerDesc]) -> Result<Vec<PathBuf>, LayerFault> {
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
                let mut fail = |fault: LayerFault| {
                    let message = fault.to_string();
                    failure = Some(fault);
                    Err(message)
                };
                let file = match std::fs::File::open(&blob) {
                    Ok(file) => file,
                    Err(source) => {
                        return fail(LayerFault::Open {
                            digest: layer.digest,
                            source,
                        });
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
                        fail(LayerFault::BuildLimit {
                            digest: layer.digest,
                            origin: self.origin(&layer.digest),
                            budget,
                            env: unpack::MAX_BUILD_UNPACK_ENV,
                        })
                    }
                    Err(error) => fail(self.layer_error(layer, error)),
                }
            });
            let dir = match made {
                Ok(dir) => dir,
                Err(source) => {
                    return Err(failure.unwrap_or(LayerFault::Snapshot {
                        digest: layer.digest,
                        source,
                    }));
                }
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
        inputs: &DepOutputs<'_>,
    ) -> Result<Option<LayerDesc>, Box<NodeFailure>> {
        let fail = |error: StepError| self.failure(node, Some(step), error, Vec::new());
        // A copy whose layer can be computed from its sources is written straight, once for
        // every platform that copies the same files onto alike parents.
        if let Op::Copy(copy) = &step.op
            && let Some(layer) = self.copy_direct(node, step, copy, layers, inputs)?
        {
            return Ok(layer);
        }
        let lowerdirs = self.snapshots(layers).map_err(|error| fail(error.into()))?;
        let temp = self
            .store
            .temp_dir()
            .map_err(|source| fail(StepError::TempDir { source }))?;
        let upperdir = temp.path().join("upper");
        let overlay_workdir = temp.path().join("work");
        for dir in [&upperdir, &overlay_workdir] {
            std::fs::create_dir_all(dir).map_err(|source| {
                fail(StepError::Io {
                    action: "create",
                    path: dir.clone(),
                    source,
                })
            })?;
        }
        let mut guards: Vec<Box<dyn std::any::Any>> = Vec::new();
        let task = match &step.op {
            Op::Run(run) => {
                let mut task = self.run_task(node, run, &mut guards).map_err(fail)?;
                task.stage_binds = self.stage_binds(run, inputs).map_err(fail)?;
                Task::Run(task)
            }
            Op::Copy(copy) => {
                let (source, items) = match &copy.from {
                    CopySource::Context { items, inline, .. } => {
                        let (root, guard) =
                            self.copy_root(inline).map_err(|error| fail(error.into()))?;
                        guards.extend(guard.map(|guard| Box::new(guard) as Box<dyn std::any::Any>));
                        (CopyTaskSource::Context(root), items.to_vec())
                    }
                    CopySource::Node { node: source, .. } => {
                        let output = inputs.output_of(*source).map_err(fail)?;
                        let snapshots = self
                            .snapshots(&output.layers)
                            .map_err(|error| fail(error.into()))?;
                        (CopyTaskSource::Layers(snapshots), Vec::new())
                    }
                    CopySource::Url { .. }
                    | CopySource::Git { .. }
                    | CopySource::Extract { .. } => {
                        let added = self
                            .add_tree(copy)
                            .map_err(|reason| fail(CopyFault::Add { reason }.into()))?
                            .ok_or_else(|| fail(CopyFault::AddWithoutFiles.into()))?;
                        let root = added.root.clone();
                        let items = added.items.clone();
                        guards.push(Box::new(added));
                        (CopyTaskSource::Context(root), items)
                    }
                };
                let task = CopyTask {
                    source,
                    sources: copy.sources.clone(),
                    items,
                    dest: copy.dest.clone(),
                    workdir: copy.workdir.clone(),
                    chown: copy.chown.clone(),
                    chmod: copy.chmod.clone(),
                    exclude: copy.exclude.clone(),
                    parents: copy.parents,
                };
                Task::Copy(task)
            }
            Op::Config(_) => return Ok(None),
        };
        let overlay = self
            .overlay()
            .map_err(|unavailable| fail(unavailable.into()))?
            .overlay;
        let spec = SandboxSpec {
            lowerdirs,
            upperdir: upperdir.clone(),
            overlay_workdir,
            overlay,
            task,
        };
        let node_id = node.id;
        if matches!(&step.op, Op::Run(run) if run.insecure) {
            self.events.emit(Event::Output {
                node: node_id,
                line: format!("[graphbuild] warning: {INSECURE_WARNING}"),
            });
        }
        let sandbox_exe = self.sandbox_exe();
        let outcome = sandbox::run_sandbox(&sandbox_exe, &spec, &mut |line: &str| {
            self.events.emit(Event::Output {
                node: node_id,
                line: line.to_string(),
            });
        })
        .map_err(|error| fail(error.into()))?;
        drop(guards);
        let error = match outcome.status {
            sandbox::ExitStatusKind::Exited(0) => None,
            sandbox::ExitStatusKind::Exited(code) => Some(StepError::ExitCode { code }),
            sandbox::ExitStatusKind::Signaled(signal) => Some(StepError::Signal { signal }),
            sandbox::ExitStatusKind::TimedOut { millis } => Some(StepError::TimedOut { millis }),
            sandbox::ExitStatusKind::ProcessLimit { max } => Some(StepError::ProcessLimit { max }),
        };
        if let Some(error) = error {
            return Err(self.failure(node, Some(step), error, outcome.tail));
        }
        // A change already stored as a layer (the same files copied on another platform) is
        // that layer: hash the tar first, compress only what is new.
        let Some(diff_id) = layer::diff_id_of_upper(&upperdir, &self.options.layer)
            .map_err(|source| fail(StepError::WriteLayer { source }))?
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
            .map_err(|source| fail(StepError::WriteLayer { source }))?;
        let Some(blob) = blob else { return Ok(None) };
        self.store
            .put_blob_file(&blob.path, Some(blob.digest))
            .map_err(|source| fail(StepError::StoreLayer { source }))?;
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

    /// The overlay of this build's sandboxes: the first call chooses it (probing the kernel's
    /// overlayfs in the store's scratch area when the mode is `auto`) and warns when it falls
    /// back to fuse-overlayfs.
    pub(super) fn overlay(&self) -> Result<Selection, Unavailable> {
        self.overlay
            .get_or_init(|| {
                // The store's scratch area: on the file system of the upper directories.
                let scratch = self.store.temp_dir();
                let dir = match &scratch {
                    Ok(scratch) => scratch.path().to_path_buf(),
                    Err(_) => std::env::temp_dir(),
                };
                let selection =
                    overlay::select(self.options.overlay, &self.sandbox_exe(), &dir, false)?;
                if selection.fallback {
                    self.events.emit(Event::Warning {
                        message: selection.fallback_warning(),
                    });
                }
                Ok(selection)
            })
            .clone()
    }

    /// The binary re-executed for sandboxes. GRAPHBUILD_SANDBOX_EXE runs them with another
    /// one (tests use it to prove a build needs none).
    pub(super) fn sandbox_exe(&self) -> PathBuf {
        std::env::var_os("GRAPHBUILD_SANDBOX_EXE")
            .map(PathBuf::from)
            .unwrap_or_else(|| self.options.sandbox_exe.clone())
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
            .ensure_snapshot(diff_id, |dir: &Path| -> Result<(), StepError> {
                clamp_times(upperdir, epoch)?;
                let io = |action, path: &Path| {
                    let path = path.to_path_buf();
                    move |source| StepError::Io {
                        action,
                        path,
                        source,
                    }
                };
                std::fs::remove_dir(dir).map_err(io("remove", dir))?;
                std::fs::rename(upperdir, dir).map_err(io("rename", upperdir))
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
    ) -> Result<RunTask, StepError> {
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
                    .map_err(|source| StepError::CacheMount {
                        id: mount.id.clone(),
                        source,
                    })?;
                self.restore_cache_mount(&mount.id, &node.platform.to_string(), guard.path())?;
                // Owner and mode apply to a new (empty) directory, as Docker's do.
                let empty = std::fs::read_dir(guard.path())
                    .map(|mut entries| entries.next().is_none())
                    .unwrap_or(false);
                if empty && (mount.uid.is_some() || mount.gid.is_some() || mount.mode.is_some()) {
                    let set = || -> std::io::Result<()> {
                        if mount.uid.is_some() || mount.gid.is_some() {
                            std::os::unix::fs::chown(guard.path(), mount.uid, mount.gid)?;
                        }
                        if let Some(mode) = mount.mode {
                            std::fs::set_permissions(
                                guard.path(),
                                std::os::unix::fs::PermissionsExt::from_mode(mode),
                            )?;
                        }
                        Ok(())
                    };
                    set().map_err(|source| StepError::CacheMountOwner {
                        id: mount.id.clone(),
                        source,
                    })?;
                }
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
                    return Err(StepError::SecretMissing {
                        id: secret.id.clone(),
                    });
                }
                None => {}
                Some(value) => {
                    let bytes = match value {
                        SecretValue::File(path) => {
                            std::fs::read(path).map_err(|source| StepError::SecretRead {
                                id: secret.id.clone(),
                                source,
                            })?
                        }
                        SecretValue::Bytes(bytes) => bytes.clone(),
                    };
                    if let Some(name) = &secret.env {
                        env.push((name.clone(), String::from_utf8_lossy(&bytes).into_owned()));
                    } else {
                        let dir = self
                            .store
                            .temp_dir()
                            .map_err(|source| StepError::TempDir { source })?;
                        let path = dir.path().join("secret");
                        write_private(&path, &bytes).map_err(|source| StepError::Io {
                            action: "write",
                            path: path.clone(),
                            source,
                        })?;
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
        let ssh_sockets = self.ssh_sockets(run, guards)?;
        let mut bind_mounts = Vec::new();
        for mount in &run.bind_mounts {
            let (dir, host, is_dir) = self.lay_out_bind(mount)?;
            bind_mounts.push((host, mount.target.clone(), is_dir));
            guards.push(Box::new(dir));
        }
        Ok(RunTask {
            argv: run.argv.clone(),
            script: run.script.clone(),
            bind_mounts,
            env,
            cwd: run.workdir.clone(),
            user: run.user.clone(),
            cache_mounts,
            tmpfs_mounts: run
                .tmpfs_mounts
                .iter()
                .map(|mount| (mount.target.clone(), mount.size))
                .collect(),
            secret_files,
            ssh_sockets,
            // Filled by `execute_step`, which has the nodes' outputs.
            stage_binds: Vec::new(),
            network: if run.network_none {
                NetworkMode::None
            } else {
                NetworkMode::Host
            },
            hostname: "graphbuild".into(),
            timeout_ms: run.timeout_ms.or(self.options.step_timeout_ms),
            max_processes: self.options.step_max_processes,
            insecure: run.insecure,
            separate_stderr: false,
        })
    }
}

impl Executor<'_> {
    /// A bind mount's view of the build context, laid out in a scratch directory (alive as
    /// long as the returned guard) from the items the plan selected: each file's content is
    /// checked against the digest in the step's key while it is copied, so the step reads
    /// exactly what its key says, whatever happens to the context meanwhile. Times are 1970,
    /// owners root. Returns the guard, the path to mount, and whether it is a directory.
    fn lay_out_bind(
        &self,
        mount: &crate::plan::op::BindMountOp,
    ) -> Result<(tempfile::TempDir, PathBuf, bool), CopyFault> {
        use std::os::unix::fs::PermissionsExt;
        let fail = |action: &'static str, path: &Path, source: std::io::Error| CopyFault::Bind {
            target: mount.target.clone(),
            action,
            path: path.to_path_buf(),
            source,
        };
        let dir = self
            .store
            .temp_dir()
            .map_err(|source| CopyFault::TempDir { source })?;
        let root = dir.path().join("bind");
        let single_file = matches!(
            mount.items.as_slice(),
            [item] if matches!(item.kind, crate::context::ItemKind::File { .. })
        );
        let mut directories = Vec::new();
        for item in &mount.items {
            let dest = if single_file {
                root.clone()
            } else {
                root.join(&item.rel_dest)
            };
            match &item.kind {
                crate::context::ItemKind::Dir { mode } => {
                    std::fs::create_dir_all(&dest).map_err(|error| fail("create", &dest, error))?;
                    directories.push((dest, *mode));
                }
                crate::context::ItemKind::Symlink { target } => {
                    std::os::unix::fs::symlink(target, &dest)
                        .map_err(|error| fail("create", &dest, error))?;
                }
                crate::context::ItemKind::File { digest, mode, .. } => {
                    let source = self.plan.context_dir.join(&item.rel_src);
                    let mut input = std::fs::File::open(&source)
                        .map_err(|error| fail("read", &source, error))?;
                    let mut output = std::fs::File::create(&dest)
                        .map_err(|error| fail("write", &dest, error))?;
                    let mut hasher = blake3::Hasher::new();
                    let mut buffer = vec![0u8; 1 << 16];
                    loop {
                        let read = std::io::Read::read(&mut input, &mut buffer)
                            .map_err(|error| fail("read", &source, error))?;
                        if read == 0 {
                            break;
                        }
                        hasher.update(&buffer[..read]);
                        std::io::Write::write_all(&mut output, &buffer[..read])
                            .map_err(|error| fail("write", &dest, error))?;
                    }
                    if hasher.finalize().as_bytes() != digest {
                        return Err(CopyFault::BindChanged {
                            target: mount.target.clone(),
                            path: item.rel_src.clone(),
                        });
                    }
                    output
                        .set_permissions(std::fs::Permissions::from_mode(*mode))
                        .and_then(|()| output.set_modified(std::time::UNIX_EPOCH))
                        .map_err(|error| fail("write", &dest, error))?;
                }
            }
        }
        // Directories last, deepest first: their modes may forbid writing, and their times
        // change with every entry made in them.
        for (path, mode) in directories.iter().rev() {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode))
                .and_then(|()| std::fs::File::open(path)?.set_modified(std::time::UNIX_EPOCH))
                .map_err(|error| fail("write", path, error))?;
        }
        if mount.items.is_empty() {
            std::fs::create_dir_all(&root).map_err(|error| fail("create", &root, error))?;
        }
        Ok((dir, root, !single_file))
    }

    /// The directory a context copy reads its items from: the build context, or a scratch
    /// directory holding the build file's inline files (alive as long as the returned guard),
    /// each `0644` and dated 1970 (the copy clamps times to `SOURCE_DATE_EPOCH` anyway).
    pub(super) fn copy_root(
        &self,
        inline: &[(String, Vec<u8>)],
    ) -> Result<(PathBuf, Option<tempfile::TempDir>), CopyFault> {
        if inline.is_empty() {
            return Ok((self.plan.context_dir.clone(), None));
        }
        let dir = self
            .store
            .temp_dir()
            .map_err(|source| CopyFault::TempDir { source })?;
        for (name, content) in inline {
            let path = dir.path().join(name);
            let written = std::fs::write(&path, content)
                .and_then(|()| {
                    std::fs::set_permissions(
                        &path,
                        std::os::unix::fs::PermissionsExt::from_mode(0o644),
                    )
                })
                .and_then(|()| {
                    std::fs::File::options()
                        .write(true)
                        .open(&path)?
                        .set_modified(std::time::UNIX_EPOCH)
                });
            written.map_err(|source| CopyFault::Inline {
                name: name.clone(),
                source,
            })?;
        }
        let root = dir.path().to_path_buf();
        Ok((root, Some(dir)))
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
pub(super) fn clamp_times(root: &Path, epoch: i64) -> Result<(), StepError> {
    use std::os::unix::ffi::OsStrExt;
    let read_error = |error: walkdir::Error| StepError::Io {
        action: "read",
        path: error.path().unwrap_or(root).to_path_buf(),
        source: error.into(),
    };
    for entry in walkdir::WalkDir::new(root)
        .follow_links(false)
        .contents_first(true)
    {
        let entry = entry.map_err(read_error)?;
        let metadata = entry.metadata().map_err(read_error)?;
        let mtime = std::os::unix::fs::MetadataExt::mtime(&metadata).min(epoch);
        let time = libc::timespec {
            tv_sec: mtime as libc::time_t,
            tv_nsec: 0,
        };
        let times = [time, time];
        let set_times_error = |source: std::io::Error| StepError::Io {
            action: "set the times of",
            path: entry.path().to_path_buf(),
            source,
        };
        let path = std::ffi::CString::new(entry.path().as_os_str().as_bytes())
            .map_err(|error| set_times_error(error.into()))?;
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
            return Err(set_times_error(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}
