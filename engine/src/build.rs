//! Executing a plan: nodes in parallel, steps cached by key, images assembled into layouts.
//!
//! # A node, start to finish
//!
//! 1. Its base: nothing (`scratch`), a finished dependency's layers, or a base image whose
//!    layer blobs are copied into the store.
//! 2. The cache: walking back from the node's last filesystem step, the first step whose key
//!    has a record in the action cache (with every blob it names still present) ends the
//!    search. Everything up to it is a hit; execution resumes after it. A warm build therefore
//!    reads one small record per node and executes nothing.
//! 3. Each remaining `run` or `copy` executes in the sandbox on an overlay of the current
//!    layers' snapshots; the overlay's upper directory becomes the step's layer (or no layer
//!    when nothing changed), and the new state is recorded under the step's key.
//!
//! # Images
//!
//! Once every node an image needs is done, each platform's config (settings from the plan,
//! layers and history from the node), manifest, the image index and the layout's `index.json`
//! are serialized canonically and written, so equal inputs give byte-identical layouts.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use graphbuild_lang::ir::Sources;
use graphbuild_lang::platform::Platform;

use crate::copy::{self, CopyItem};
use crate::digest::{Digest, Key};
use crate::events::{Event, EventSink, ImageSummary, PlatformSummary, StepStatus, Summary};
use crate::key::KeyBuilder;
use crate::layer::{self, LayerOptions};
use crate::oci;
use crate::plan::{Base, CopySource, ImagePlan, Node, Op, Plan, RunOp};
use crate::remote::{ActionResult, OutputFile, RemoteCache};
use crate::resolve::Resolver;
use crate::sandbox::{self, NetworkMode, RunTask, SandboxSpec, Task};
use crate::scheduler::{self, CancelToken};
use crate::state::{HistoryEntry, ImageSettings, LayerDesc, StepRecord};
use crate::store::Store;
use crate::unpack;

pub struct BuildOptions {
    pub jobs: usize,
    /// Where image layouts go: `<output_dir>/<image name>` unless the image says otherwise.
    pub output_dir: PathBuf,
    pub no_cache: bool,
    pub layer: LayerOptions,
    /// The graphbuild binary, re-executed for each sandbox.
    pub sandbox_exe: PathBuf,
    /// `--secret id=…` values, by id. They reach a sandbox as a file or env var, never a key.
    pub secrets: HashMap<String, SecretValue>,
    pub cancel: CancelToken,
    /// A shared cache to read missing results from and to write new results to.
    pub remote: RemoteOptions,
    /// Media types of the manifests written.
    pub format: ManifestFormat,
    /// Checks the machine can execute the nodes that will run (emulators, privileges), after
    /// the cache has been consulted and before anything executes: a fully cached build needs
    /// neither QEMU nor root.
    pub preflight: Option<Preflight>,
}

/// See [`BuildOptions::preflight`]. An `Err` stops the build with that message.
pub type Preflight = Box<dyn Fn(&[&Node]) -> Result<(), String> + Send + Sync>;

/// `--format oci|docker`: which media types image manifests use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ManifestFormat {
    #[default]
    Oci,
    /// Docker's manifest list and schema 2 manifest, for old registries and tools.
    Docker,
}

impl ManifestFormat {
    fn index(self) -> &'static str {
        match self {
            ManifestFormat::Oci => oci::media::OCI_INDEX,
            ManifestFormat::Docker => oci::media::DOCKER_MANIFEST_LIST,
        }
    }
    fn manifest(self) -> &'static str {
        match self {
            ManifestFormat::Oci => oci::media::OCI_MANIFEST,
            ManifestFormat::Docker => oci::media::DOCKER_MANIFEST,
        }
    }
    fn config(self) -> &'static str {
        match self {
            ManifestFormat::Oci => oci::media::OCI_CONFIG,
            ManifestFormat::Docker => oci::media::DOCKER_CONFIG,
        }
    }
    fn layer(self, media_type: &str) -> Result<String, String> {
        match (self, media_type) {
            (ManifestFormat::Oci, _) => Ok(media_type.to_string()),
            (
                ManifestFormat::Docker,
                oci::media::OCI_LAYER_GZIP | oci::media::DOCKER_LAYER_GZIP,
            ) => Ok(oci::media::DOCKER_LAYER_GZIP.to_string()),
            (ManifestFormat::Docker, other) => Err(format!(
                "a layer of media type {other} cannot be described in Docker's manifest format; use --format oci or --compression gzip"
            )),
        }
    }
}

/// `--cache-from`, `--cache-to`, `--cache-required`.
#[derive(Debug, Clone, Default)]
pub struct RemoteOptions {
    pub from: Option<RemoteCache>,
    pub to: Option<RemoteCache>,
    /// Fail the build when the cache cannot be used, instead of warning once and going on.
    pub required: bool,
}

/// A secret's content, from a file or an environment variable of graphbuild's own.
#[derive(Clone)]
pub enum SecretValue {
    File(PathBuf),
    Bytes(Vec<u8>),
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretValue(…)")
    }
}

/// What a node produced.
#[derive(Clone, Debug)]
pub struct NodeOutput {
    pub layers: Vec<LayerDesc>,
    pub history: Vec<HistoryEntry>,
    pub executed: usize,
    pub cached: usize,
}

/// Why a node failed, with everything a person needs to find the problem.
#[derive(Debug, Clone)]
pub struct NodeFailure {
    pub stage: String,
    pub platform: String,
    /// `file:line:col` of the failing step, when a step failed.
    pub location: Option<String>,
    pub step: Option<String>,
    pub message: String,
    /// The last lines of the step's output.
    pub tail: Vec<String>,
}

impl std::fmt::Display for NodeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stage `{}` for {}", self.stage, self.platform)?;
        if let Some(step) = &self.step {
            write!(f, ", step `{step}`")?;
        }
        if let Some(location) = &self.location {
            write!(f, " ({location})")?;
        }
        write!(f, ": {}", self.message)?;
        if !self.tail.is_empty() {
            write!(f, "\n  last output:")?;
            for line in &self.tail {
                write!(f, "\n  │ {line}")?;
            }
        }
        Ok(())
    }
}

pub struct BuildReport {
    /// The preflight check refused to run the nodes that needed executing.
    pub environment_error: Option<String>,
    pub images: Vec<ImageSummary>,
    pub executed: usize,
    pub cached: usize,
    pub failures: Vec<NodeFailure>,
    pub cancelled: bool,
}

struct Executor<'a> {
    plan: &'a Plan,
    sources: &'a Sources,
    store: &'a Store,
    resolver: &'a dyn Resolver,
    options: &'a BuildOptions,
    events: &'a dyn EventSink,
    outputs: Mutex<HashMap<usize, Arc<NodeOutput>>>,
    /// Set once the remote cache failed: it is warned about once and not asked again.
    remote_failed: std::sync::atomic::AtomicBool,
    /// Set once a bad remote entry (a miss, not a failure) was warned about.
    remote_bad_entry_warned: std::sync::atomic::AtomicBool,
    /// Cache mounts used by this build, (id, platform) → directory, saved to the remote at the end.
    cache_mounts_used: Mutex<BTreeMap<(String, String), PathBuf>>,
    /// Cache mounts already restored from the remote in this build.
    cache_mounts_restored: Mutex<std::collections::HashSet<(String, String)>>,
    /// One lock per step key being executed: nodes that share a step (a `$BUILDPLATFORM`
    /// prefix common to every target) wait for the one executing it, then reuse its result.
    in_flight: Mutex<HashMap<Key, Arc<Mutex<()>>>>,
    /// Steps executed by this build: reused by other nodes even with `--no-cache`.
    executed_here: Mutex<std::collections::HashSet<Key>>,
    /// One lock per layer being unpacked into a snapshot.
    in_flight_snapshots: Mutex<HashMap<Digest, Arc<Mutex<()>>>>,
}

/// Run every node of the plan and write every image.
pub fn build(
    plan: &Plan,
    sources: &Sources,
    store: &Store,
    resolver: &dyn Resolver,
    options: &BuildOptions,
    events: &dyn EventSink,
) -> BuildReport {
    let started = Instant::now();
    let executor = Executor {
        plan,
        sources,
        store,
        resolver,
        options,
        events,
        outputs: Mutex::new(HashMap::new()),
        remote_failed: std::sync::atomic::AtomicBool::new(false),
        remote_bad_entry_warned: std::sync::atomic::AtomicBool::new(false),
        cache_mounts_used: Mutex::new(BTreeMap::new()),
        cache_mounts_restored: Mutex::new(std::collections::HashSet::new()),
        in_flight: Mutex::new(HashMap::new()),
        executed_here: Mutex::new(std::collections::HashSet::new()),
        in_flight_snapshots: Mutex::new(HashMap::new()),
    };
    events.emit(Event::Plan {
        nodes: plan.nodes.len(),
        steps: plan
            .nodes
            .iter()
            .map(|node| {
                node.steps
                    .iter()
                    .filter(|step| step.op.touches_filesystem())
                    .count()
            })
            .sum(),
    });

    // Only nodes whose results are needed run: an image's nodes, and the dependencies of nodes
    // that are not already cached (locally, or in the remote cache, whose blobs are fetched
    // now). A warm build, or a merge from the team cache, never touches intermediate stages.
    let mut needed = vec![false; plan.nodes.len()];
    let mut cached_nodes = vec![false; plan.nodes.len()];
    let mut pending: Vec<usize> = plan
        .images
        .iter()
        .flat_map(|image| image.platforms.iter().map(|(_, node)| *node))
        .collect();
    let mut failures = Vec::new();
    while let Some(id) = pending.pop() {
        if std::mem::replace(&mut needed[id], true) {
            continue;
        }
        let node = &plan.nodes[id];
        let last = node
            .steps
            .iter()
            .rev()
            .find(|step| step.op.touches_filesystem());
        let cached = match last {
            Some(step) => match executor.cached_record(&step.key) {
                Ok(record) => record.is_some(),
                Err(message) => {
                    failures.push(*executor.failure(node, Some(step), message, Vec::new()));
                    true
                }
            },
            None => false,
        };
        cached_nodes[id] = cached;
        if !cached {
            pending.extend(node.deps.iter().copied());
        }
    }
    if !failures.is_empty() {
        return BuildReport {
            environment_error: None,
            images: Vec::new(),
            executed: 0,
            cached: 0,
            failures,
            cancelled: false,
        };
    }
    if let Some(preflight) = &options.preflight {
        let executing: Vec<&Node> = plan
            .nodes
            .iter()
            .filter(|node| needed[node.id] && !cached_nodes[node.id])
            .collect();
        if let Err(message) = preflight(&executing) {
            return BuildReport {
                environment_error: Some(message),
                images: Vec::new(),
                executed: 0,
                cached: 0,
                failures: Vec::new(),
                cancelled: false,
            };
        }
    }
    let mut graph = scheduler::Graph::new();
    let mut ids = vec![None; plan.nodes.len()];
    for node in plan.nodes.iter().filter(|node| needed[node.id]) {
        let deps: Vec<_> = node.deps.iter().filter_map(|dep| ids[*dep]).collect();
        let cost = 1 + node
            .steps
            .iter()
            .filter(|step| matches!(step.op, Op::Run(_)))
            .count() as u64
            * 10;
        ids[node.id] = Some(graph.add(node.id, cost, &deps));
    }
    let report = scheduler::run(
        graph,
        options.jobs.max(1),
        &options.cancel,
        |node_id: &usize, _deps: &[&()]| executor.run_node(&plan.nodes[*node_id]).map(|_| ()),
    );

    // A step stopped by the cancel fails, but the build was cancelled, not broken.
    let mut cancelled = options.cancel.is_cancelled();
    for outcome in report.outcomes() {
        match outcome {
            scheduler::Outcome::Failed(failure) => failures.push((**failure).clone()),
            scheduler::Outcome::Cancelled => cancelled = true,
            _ => {}
        }
    }
    if failures.is_empty()
        && !cancelled
        && let Err(message) = executor.save_cache_mounts()
    {
        {
            failures.push(NodeFailure {
                stage: "cache mounts".into(),
                platform: "all".into(),
                location: None,
                step: None,
                message,
                tail: Vec::new(),
            });
        }
    }
    let outputs = executor
        .outputs
        .lock()
        .map(|outputs| outputs.clone())
        .unwrap_or_default();
    let executed = outputs.values().map(|output| output.executed).sum();
    let cached = outputs.values().map(|output| output.cached).sum();

    let mut images = Vec::new();
    if failures.is_empty() && !cancelled {
        for image in &plan.images {
            match executor.write_image(image, &outputs) {
                Ok(summary) => {
                    events.emit(Event::Image(summary.clone()));
                    images.push(summary);
                }
                Err(message) => failures.push(NodeFailure {
                    stage: image.name.clone(),
                    platform: "all".into(),
                    location: Some(sources.describe(image.at)),
                    step: None,
                    message,
                    tail: Vec::new(),
                }),
            }
        }
    }
    events.emit(Event::Summary(Summary {
        executed,
        cached,
        failed: failures.len(),
        duration_ms: started.elapsed().as_millis() as u64,
        images: images.clone(),
    }));
    BuildReport {
        environment_error: None,
        images,
        executed,
        cached,
        failures,
        cancelled,
    }
}

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
    fn output_of(&self, node: usize) -> Result<Arc<NodeOutput>, String> {
        self.outputs
            .lock()
            .ok()
            .and_then(|outputs| outputs.get(&node).cloned())
            .ok_or_else(|| format!("internal error: node {node} has no output"))
    }

    fn failure(
        &self,
        node: &Node,
        step: Option<&crate::plan::StepPlan>,
        message: String,
        tail: Vec<String>,
    ) -> Box<NodeFailure> {
        Box::new(NodeFailure {
            stage: node.stage.clone(),
            platform: node.platform.to_string(),
            location: step.map(|step| self.sources.describe(step.at)),
            step: step.map(|step| step.description.clone()),
            message,
            tail,
        })
    }

    /// A step's recorded result: from the local store, else from the remote cache (whose
    /// blobs are then fetched into the local store). `Err` only when the remote cache is
    /// required and failed.
    fn cached_record(&self, key: &Key) -> Result<Option<StepRecord>, String> {
        if self.options.no_cache {
            return Ok(None);
        }
        if let Some(record) = self.local_record(key) {
            return Ok(Some(record));
        }
        let Some(remote) = self.usable_remote(self.options.remote.from.as_ref()) else {
            return Ok(None);
        };
        match self.fetch_remote_record(remote, key) {
            Ok(record) => Ok(record),
            Err(message) => self.remote_trouble(remote, message).map(|()| None),
        }
    }

    /// Where a step's result is recorded: its key, combined with the layer compression when it
    /// is not the default, since the record names compressed blobs.
    fn action_key(&self, key: &Key) -> Key {
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

    fn local_record(&self, key: &Key) -> Option<StepRecord> {
        let bytes = self.store.get_action(&self.action_key(key))?;
        let record: StepRecord = serde_json::from_slice(&bytes).ok()?;
        record
            .layers
            .iter()
            .all(|layer| self.store.has_blob(&layer.digest))
            .then_some(record)
    }

    fn usable_remote<'r>(&self, remote: Option<&'r RemoteCache>) -> Option<&'r RemoteCache> {
        remote.filter(|_| {
            !self
                .remote_failed
                .load(std::sync::atomic::Ordering::Relaxed)
        })
    }

    /// A remote cache failed: warn once and go on locally, or fail when it is required.
    fn remote_trouble(&self, remote: &RemoteCache, message: String) -> Result<(), String> {
        if self.options.cancel.is_cancelled() {
            // The transfer was abandoned for the cancel; the build stops anyway.
            return Ok(());
        }
        if self.options.remote.required {
            return Err(format!("the cache {} failed: {message}", remote.url()));
        }
        if !self
            .remote_failed
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            self.events.emit(Event::Warning {
                message: format!(
                    "the cache {} is not usable, building without it: {message}",
                    remote.url()
                ),
            });
        }
        Ok(())
    }

    /// A remote call's result, with a bad entry (garbage, wrong size or content) turned into
    /// `miss` and warned about once per build: one bad entry never disables the cache.
    fn remote_entry<T>(
        &self,
        remote: &RemoteCache,
        result: Result<T, crate::remote::RemoteError>,
        miss: T,
    ) -> Result<T, String> {
        match result {
            Ok(value) => Ok(value),
            Err(error) if error.is_bad_entry() => {
                self.warn_bad_remote_entry(remote, &error.to_string());
                Ok(miss)
            }
            Err(error) => Err(error.to_string()),
        }
    }

    fn warn_bad_remote_entry(&self, remote: &RemoteCache, message: &str) {
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

    fn fetch_remote_record(
        &self,
        remote: &RemoteCache,
        key: &Key,
    ) -> Result<Option<StepRecord>, String> {
        let temp = self.store.temp_dir().map_err(|error| error.to_string())?;
        // The entry and the record it names, size-capped and verified; None: a miss.
        let fetched = remote.get_step_record(&self.action_key(key).hex(), temp.path());
        let Some(bytes) = self.remote_entry(remote, fetched, None)? else {
            return Ok(None);
        };
        let record = match serde_json::from_slice::<StepRecord>(&bytes) {
            Ok(record) => record,
            Err(error) => {
                self.warn_bad_remote_entry(remote, &format!("a step record is not valid: {error}"));
                return Ok(None);
            }
        };
        // Fetch the layers the store lacks, a few at a time.
        let missing: Vec<&LayerDesc> = record
            .layers
            .iter()
            .filter(|layer| !self.store.has_blob(&layer.digest))
            .collect();
        let results: Vec<Result<bool, String>> = std::thread::scope(|scope| {
            let chunks: Vec<_> = missing.chunks(missing.len().div_ceil(4).max(1)).collect();
            let handles: Vec<_> = chunks
                .into_iter()
                .map(|chunk| {
                    let temp = temp.path();
                    scope.spawn(move || -> Result<bool, String> {
                        for layer in chunk {
                            let path = temp.join(layer.digest.hex());
                            let fetched = remote.get_blob_to(&layer.digest, layer.size, &path);
                            if !self.remote_entry(remote, fetched, false)? {
                                return Ok(false);
                            }
                            self.store
                                .put_blob_file(&path, Some(layer.digest))
                                .map_err(|error| error.to_string())?;
                        }
                        Ok(true)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| {
                    handle
                        .join()
                        .unwrap_or_else(|_| Err("a download thread panicked".into()))
                })
                .collect()
        });
        for result in results {
            if !result? {
                return Ok(None);
            }
        }
        self.store
            .put_action(&self.action_key(key), &bytes)
            .map_err(|error| error.to_string())?;
        Ok(Some(record))
    }

    /// Make the remote cache hold a step's result: blobs first, then the action entry.
    fn publish(&self, key: &Key, record: &StepRecord) -> Result<(), String> {
        let Some(remote) = self.usable_remote(self.options.remote.to.as_ref()) else {
            return Ok(());
        };
        let result = (|| -> Result<(), String> {
            let action_key = self.action_key(key).hex();
            // A bad entry under our key is replaced.
            if self
                .remote_entry(remote, remote.get_action(&action_key), None)?
                .is_some()
            {
                return Ok(());
            }
            for layer in &record.layers {
                remote
                    .put_blob_from(&layer.digest, &self.store.blob_path(&layer.digest))
                    .map_err(|error| error.to_string())?;
            }
            let bytes = serde_json::to_vec(record).map_err(|error| error.to_string())?;
            let digest = remote
                .put_blob_bytes(&bytes)
                .map_err(|error| error.to_string())?;
            remote
                .put_action(
                    &action_key,
                    &ActionResult::for_step_record(digest, bytes.len() as u64),
                )
                .map_err(|error| error.to_string())
        })();
        match result {
            Ok(()) => Ok(()),
            Err(message) => self.remote_trouble(remote, message),
        }
    }

    fn cache_mount_key(id: &str, platform: &str) -> Key {
        KeyBuilder::new("cache-mount")
            .str(id)
            .str(platform)
            .finish()
    }

    /// Fill an empty cache-mount directory from the remote cache, once per build.
    fn restore_cache_mount(&self, id: &str, platform: &str, dir: &Path) -> Result<(), String> {
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
        let result = (|| -> Result<(), String> {
            let key = Self::cache_mount_key(id, platform);
            let Some(action) = self.remote_entry(remote, remote.get_action(&key.hex()), None)?
            else {
                return Ok(());
            };
            let Some(file) = action.output_files.first() else {
                return Ok(());
            };
            let temp = self.store.temp_dir().map_err(|error| error.to_string())?;
            let path = temp.path().join("mount.tar");
            let fetched = remote.get_blob_to(&file.digest, file.size_bytes, &path);
            if !self.remote_entry(remote, fetched, false)? {
                return Ok(());
            }
            let archive = std::fs::File::open(&path).map_err(|error| error.to_string())?;
            unpack::unpack_layer(std::io::BufReader::new(archive), dir)
                .map(|_| ())
                .map_err(|error| error.to_string())
        })();
        match result {
            Ok(()) => Ok(()),
            Err(message) => self.remote_trouble(remote, message),
        }
    }

    /// Save every cache mount this build used to the remote cache, content-addressed, under a
    /// key of (mount id, platform), so another machine's build starts with it.
    fn save_cache_mounts(&self) -> Result<(), String> {
        let Some(remote) = self.usable_remote(self.options.remote.to.as_ref()) else {
            return Ok(());
        };
        let used = self
            .cache_mounts_used
            .lock()
            .map(|used| used.clone())
            .unwrap_or_default();
        for ((id, platform), dir) in used {
            let guard = self
                .store
                .cache_mount(&id, &platform)
                .map_err(|error| error.to_string())?;
            let result = (|| -> Result<(), String> {
                let temp = self.store.temp_dir().map_err(|error| error.to_string())?;
                let options = LayerOptions {
                    source_date_epoch: 0,
                    compression: layer::Compression::Gzip,
                };
                let Some(blob) = layer::write_layer_from_upper(&dir, temp.path(), &options)
                    .map_err(|error| error.to_string())?
                else {
                    return Ok(());
                };
                remote
                    .put_blob_from(&blob.digest, &blob.path)
                    .map_err(|error| error.to_string())?;
                let action = ActionResult {
                    output_files: vec![OutputFile {
                        path: "graphbuild/cache-mount.tar.gz".into(),
                        digest: blob.digest,
                        size_bytes: blob.size,
                        is_executable: false,
                    }],
                    exit_code: 0,
                };
                remote
                    .put_action(&Self::cache_mount_key(&id, &platform).hex(), &action)
                    .map_err(|error| error.to_string())
            })();
            drop(guard);
            if let Err(message) = result {
                return self.remote_trouble(remote, message);
            }
        }
        Ok(())
    }

    fn run_node(&self, node: &Node) -> Result<(), Box<NodeFailure>> {
        let platform = node.platform.to_string();
        self.events.emit(Event::NodeStarted {
            node: node.id,
            stage: node.stage.clone(),
            platform: platform.clone(),
        });
        let result = self.run_node_steps(node);
        self.events.emit(Event::NodeFinished {
            node: node.id,
            stage: node.stage.clone(),
            platform,
            ok: result.is_ok(),
        });
        let output = result?;
        if let Ok(mut outputs) = self.outputs.lock() {
            outputs.insert(node.id, Arc::new(output));
        }
        Ok(())
    }

    fn run_node_steps(&self, node: &Node) -> Result<NodeOutput, Box<NodeFailure>> {
        let platform = node.platform.to_string();
        let mut executed = 0;
        let mut cached = 0;

        // Find the last cached filesystem step; everything before it is covered by its record,
        // base layers included, so the base is needed only when nothing is cached.
        let mut resume_at = 0;
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

    /// Snapshot directories for a layer list, top-most first.
    fn snapshots(&self, layers: &[LayerDesc]) -> Result<Vec<PathBuf>, String> {
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
            let dir = self
                .store
                .ensure_snapshot(&layer.diff_id, |dir: &Path| {
                    let file = std::fs::File::open(&blob)
                        .map_err(|error| format!("cannot open {}: {error}", layer.digest))?;
                    unpack::unpack_layer(std::io::BufReader::new(file), dir)
                        .map(|_| ())
                        .map_err(|error| format!("cannot unpack layer {}: {error}", layer.digest))
                })
                .map_err(|error| error.to_string())?;
            dirs.push(dir);
        }
        Ok(dirs)
    }

    fn execute_step(
        &self,
        node: &Node,
        step: &crate::plan::StepPlan,
        layers: &[LayerDesc],
    ) -> Result<Option<LayerDesc>, Box<NodeFailure>> {
        let fail = |message: String| self.failure(node, Some(step), message, Vec::new());
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
        let outcome = sandbox::run_sandbox(&self.options.sandbox_exe, &spec, &mut |line: &str| {
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
                return Err(self.failure(
                    node,
                    Some(step),
                    format!("the command was killed by signal {signal}"),
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
        Ok(Some(layer))
    }

    /// Keep a step's upper directory as the snapshot of its layer, instead of deleting it and
    /// unpacking the layer again for the next step: an overlay upper directory already is a
    /// valid lower directory (whiteouts are 0/0 devices, opaque directories carry the xattr).
    /// Times are clamped first, so it is the same tree unpacking the layer would give.
    fn adopt_snapshot(&self, diff_id: &Digest, upperdir: &Path) {
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
    fn layer_key(&self, diff_id: &Digest) -> Key {
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
    fn known_layer(&self, diff_id: &Digest) -> Option<LayerDesc> {
        let bytes = self.store.get_action(&self.layer_key(diff_id))?;
        let layer: LayerDesc = serde_json::from_slice(&bytes).ok()?;
        (layer.diff_id == *diff_id && self.store.has_blob(&layer.digest)).then_some(layer)
    }

    /// The sandbox task for a `run`; `guards` keeps cache-mount locks and secret files alive
    /// until the step ends (secret files are deleted when their guard drops).
    fn run_task(
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
                let guard = self
                    .store
                    .cache_mount(&mount.id, &node.platform.to_string())
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
                        std::fs::write(&path, &bytes).map_err(|error| error.to_string())?;
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
        })
    }

    /// Serialize canonically and store; returns the bytes and their digest.
    fn store_json<T: serde::Serialize>(&self, value: &T) -> Result<(Vec<u8>, Digest), String> {
        let bytes = oci::canonical_json(value);
        let digest = self
            .store
            .put_blob_bytes(&bytes)
            .map_err(|error| error.to_string())?;
        Ok((bytes, digest))
    }

    fn write_image(
        &self,
        image: &ImagePlan,
        outputs: &HashMap<usize, Arc<NodeOutput>>,
    ) -> Result<ImageSummary, String> {
        // Docker's manifest formats have no annotations.
        let annotations = match self.options.format {
            ManifestFormat::Oci => image.annotations.clone(),
            ManifestFormat::Docker => BTreeMap::new(),
        };
        let created = epoch_rfc3339(self.options.layer.source_date_epoch);
        let mut manifests = Vec::new();
        let mut platforms = Vec::new();
        let mut blobs: Vec<Digest> = Vec::new();
        let mut executed = 0;
        let mut cached = 0;
        // Steps of every node the image needs, each node counted once.
        let mut needed: Vec<usize> = image.platforms.iter().map(|(_, node)| *node).collect();
        let mut seen = std::collections::HashSet::new();
        while let Some(id) = needed.pop() {
            if seen.insert(id) {
                if let Some(output) = outputs.get(&id) {
                    executed += output.executed;
                    cached += output.cached;
                }
                needed.extend(self.plan.nodes[id].deps.iter().copied());
            }
        }
        for (platform, node_id) in &image.platforms {
            let node = &self.plan.nodes[*node_id];
            let output = outputs
                .get(node_id)
                .ok_or_else(|| format!("node {} has no output", node.stage))?;
            let mut settings = node.settings.clone();
            settings.labels.extend(image.labels.clone());
            let config = config_file(
                &settings,
                platform,
                &output.layers,
                &output.history,
                &created,
            );
            let (config_bytes, config_digest) = self.store_json(&config)?;
            let format = self.options.format;
            let mut layer_descriptors = Vec::with_capacity(output.layers.len());
            for layer in &output.layers {
                layer_descriptors.push(oci::Descriptor {
                    media_type: format.layer(&layer.media_type)?,
                    digest: layer.digest,
                    size: layer.size,
                    platform: None,
                    annotations: BTreeMap::new(),
                });
            }
            let manifest = oci::ImageManifest {
                schema_version: 2,
                media_type: Some(format.manifest().to_string()),
                config: oci::Descriptor {
                    media_type: format.config().to_string(),
                    digest: config_digest,
                    size: config_bytes.len() as u64,
                    platform: None,
                    annotations: BTreeMap::new(),
                },
                layers: layer_descriptors,
                annotations: annotations.clone(),
            };
            let (manifest_bytes, manifest_digest) = self.store_json(&manifest)?;
            blobs.push(config_digest);
            blobs.push(manifest_digest);
            blobs.extend(output.layers.iter().map(|layer| layer.digest));
            manifests.push(oci::Descriptor {
                media_type: self.options.format.manifest().to_string(),
                digest: manifest_digest,
                size: manifest_bytes.len() as u64,
                platform: Some(oci::OciPlatform {
                    architecture: platform.architecture.clone(),
                    os: platform.os.clone(),
                    variant: platform.variant.clone(),
                }),
                annotations: BTreeMap::new(),
            });
            platforms.push(PlatformSummary {
                platform: platform.to_string(),
                manifest_digest: manifest_digest.to_string(),
                size: output.layers.iter().map(|layer| layer.size).sum(),
            });
        }
        let index = oci::ImageIndex {
            schema_version: 2,
            media_type: Some(self.options.format.index().to_string()),
            manifests,
            annotations,
        };
        let (index_bytes, index_digest) = self.store_json(&index)?;
        blobs.push(index_digest);
        let index_descriptor = |reference: Option<&str>| oci::Descriptor {
            media_type: self.options.format.index().to_string(),
            digest: index_digest,
            size: index_bytes.len() as u64,
            platform: None,
            annotations: reference
                .map(|reference| {
                    BTreeMap::from([(
                        "org.opencontainers.image.ref.name".to_string(),
                        reference.to_string(),
                    )])
                })
                .unwrap_or_default(),
        };
        let mut references: Vec<String> = image.tags.iter().map(|tag| tag_of(tag)).collect();
        let mut seen = std::collections::HashSet::new();
        references.retain(|reference| seen.insert(reference.clone()));
        if references.is_empty() {
            references.push("latest".into());
        }
        let top = oci::ImageIndex {
            schema_version: 2,
            media_type: Some(oci::media::OCI_INDEX.to_string()),
            manifests: references
                .iter()
                .map(|reference| index_descriptor(Some(reference)))
                .collect(),
            annotations: BTreeMap::new(),
        };
        let output_dir = image
            .output
            .clone()
            .unwrap_or_else(|| self.options.output_dir.join(sanitize(&image.name)));
        blobs.sort();
        blobs.dedup();
        let up_to_date =
            layout_is_current(&output_dir, &oci::canonical_json(&top), &blobs, self.store);
        let blob_paths: Vec<(Digest, oci::BlobSource)> = blobs
            .iter()
            .map(|digest| (*digest, oci::BlobSource::Path(self.store.blob_path(digest))))
            .collect();
        let written = if up_to_date {
            Ok(())
        } else {
            oci::write_layout(&output_dir, &top, blob_paths)
        };
        written.map_err(|error| {
            format!(
                "cannot write the image layout {}: {error}",
                output_dir.display()
            )
        })?;
        Ok(ImageSummary {
            name: image.name.clone(),
            index_digest: index_digest.to_string(),
            output: output_dir.display().to_string(),
            tags: image.tags.clone(),
            platforms,
            executed,
            cached,
        })
    }
}

/// Set every entry's access and modification times under `root` to `min(mtime, epoch)`,
/// without following symlinks, as the layer writer records them.
fn clamp_times(root: &Path, epoch: i64) -> Result<(), String> {
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

/// Whether `dir` already holds exactly this layout: the same `index.json` bytes and every blob
/// present with its size (blobs are named by digest and were verified when written). A warm
/// build then rewrites nothing.
fn layout_is_current(dir: &Path, index_json: &[u8], blobs: &[Digest], store: &Store) -> bool {
    let same_index =
        std::fs::read(dir.join("index.json")).is_ok_and(|existing| existing == index_json);
    same_index
        && dir.join("oci-layout").is_file()
        && blobs.iter().all(|digest| {
            let in_layout = std::fs::metadata(dir.join("blobs/sha256").join(digest.hex()));
            let in_store = std::fs::metadata(store.blob_path(digest));
            matches!((in_layout, in_store), (Ok(a), Ok(b)) if a.len() == b.len())
        })
}

/// The tag part of a reference (`registry/app:1.0` → `1.0`), or the whole string.
fn tag_of(reference: &str) -> String {
    let name_end = reference.rfind('/').map_or(0, |slash| slash + 1);
    match reference[name_end..].rsplit_once(':') {
        Some((_, tag)) => tag.to_string(),
        None => "latest".to_string(),
    }
}

/// A directory name for an image name.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn epoch_rfc3339(epoch: i64) -> String {
    let days = epoch.div_euclid(86_400);
    let seconds = epoch.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let day_of_year = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        seconds / 3600,
        (seconds % 3600) / 60,
        seconds % 60
    )
}

fn config_file(
    settings: &ImageSettings,
    platform: &Platform,
    layers: &[LayerDesc],
    history: &[HistoryEntry],
    created: &str,
) -> oci::ImageConfigFile {
    oci::ImageConfigFile {
        created: Some(created.to_string()),
        architecture: platform.architecture.clone(),
        os: platform.os.clone(),
        variant: platform.variant.clone(),
        config: oci::ContainerConfig {
            user: (!settings.user.is_empty()).then(|| settings.user.clone()),
            exposed_ports: settings.exposed_ports.clone(),
            env: settings
                .env
                .iter()
                .map(|(key, value)| format!("{key}={value}"))
                .collect(),
            entrypoint: settings.entrypoint.clone().unwrap_or_default(),
            cmd: settings.cmd.clone().unwrap_or_default(),
            volumes: settings.volumes.clone(),
            working_dir: (!settings.workdir.is_empty()).then(|| settings.workdir.clone()),
            labels: settings.labels.clone(),
            stop_signal: settings.stop_signal.clone(),
            healthcheck: settings.healthcheck.as_ref().map(|check| oci::Healthcheck {
                test: check.test.clone(),
                interval: check.interval_ns.unwrap_or(0),
                timeout: check.timeout_ns.unwrap_or(0),
                start_period: check.start_period_ns.unwrap_or(0),
                retries: u64::from(check.retries.unwrap_or(0)),
            }),
        },
        rootfs: oci::RootFs {
            kind: "layers".into(),
            diff_ids: layers.iter().map(|layer| layer.diff_id).collect(),
        },
        history: history
            .iter()
            .map(|entry| oci::History {
                created: Some(created.to_string()),
                created_by: Some(entry.created_by.clone()),
                empty_layer: entry.empty_layer,
                comment: None,
                author: None,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_format_as_rfc3339() {
        assert_eq!(epoch_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(epoch_rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn tags_are_taken_from_references() {
        assert_eq!(tag_of("registry.example.com:5000/app:1.0"), "1.0");
        assert_eq!(tag_of("registry.example.com:5000/app"), "latest");
        assert_eq!(tag_of("app"), "latest");
    }
}
