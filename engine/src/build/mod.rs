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
//! 3. Each remaining `run` executes in the sandbox on an overlay of the current layers'
//!    snapshots; the overlay's upper directory becomes the step's layer (or no layer when
//!    nothing changed). A `copy` is written straight into its layer from its sources, once
//!    for every platform that copies the same files onto alike parents (see
//!    `direct_copy.rs`), or, where the base could change the result, runs in the sandbox like
//!    a `run`. The new state is recorded under the step's key.
//!
//! # Integrity
//!
//! Every layer is verified before a snapshot of it is used: unpacked with its blob digest and
//! diff_id checked (see [`unpack::unpack_layer_checked`]), or, when a snapshot of its diff_id
//! already exists, read through once unless the store recorded this blob as verified to have
//! that diff_id. A layer whose content does not match the diff_id its config claims fails the
//! step, naming the image, platform and layer; its partial snapshot is deleted and an action
//! record that named it is removed. A blob found corrupt (wrong size on lookup, wrong digest on
//! read) is removed from the store with a warning; when that made the build fail, the build
//! runs again once, and the removed blob is then refetched or its step executed again.
//!
//! # Images
//!
//! Once every node an image needs is done, each platform's config (settings from the plan,
//! layers and history from the node), manifest, the image index and the layout's `index.json`
//! are serialized canonically and written, so equal inputs give byte-identical layouts.

mod cache;
mod direct_copy;
mod execute;
mod export;
mod snapshot_delta;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use graphbuild_lang::ir::Sources;

use crate::digest::{Digest, Key};
use crate::events::{Event, EventSink, ImageSummary, Summary};
use crate::layer::LayerOptions;
use crate::plan::{Node, Op, Plan};
use crate::remote::RemoteCache;
use crate::resolve::Resolver;
use crate::scheduler::{self, CancelToken};
use crate::state::{HistoryEntry, LayerDesc};
use crate::store::Store;

pub use execute::{CopyTask, CopyTaskSource, copy_in_sandbox};
pub use export::ManifestFormat;

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
    /// `--step-timeout`: the timeout of `run` steps without a `timeout` of their own.
    pub step_timeout_ms: Option<u64>,
    /// `--step-max-processes`: the process limit of each `run` step; `None`: no limit.
    pub step_max_processes: Option<u32>,
}

/// Shown for each `insecure=#true` step, by `graphbuild plan` and in the step's output.
pub const INSECURE_WARNING: &str = "insecure=#true: this step runs with every capability and \
     no seccomp filter; it can take over the host (docs/security.md)";

/// See [`BuildOptions::preflight`]. An `Err` stops the build with that message.
pub type Preflight = Box<dyn Fn(&[&Node]) -> Result<(), String> + Send + Sync>;

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
    /// Snapshots handed to a step of this build (as a lower directory or a copy's source):
    /// never taken out of the store to be changed into another ([`snapshot_delta`]).
    snapshots_in_use: Mutex<std::collections::HashSet<Digest>>,
    /// Where a base image's layer comes from, by blob digest, for error messages.
    layer_origins: Mutex<HashMap<Digest, String>>,
    /// Layers verified (or recorded as verified) during this build.
    verified_layers: Mutex<std::collections::HashSet<(Digest, Digest)>>,
    /// Layers whose content does not match the diff_id their descriptor claims.
    forged_layers: Mutex<std::collections::HashSet<Digest>>,
    /// Set when a corrupt blob was found and removed from the store: a failed build is worth
    /// running again.
    healed: std::sync::atomic::AtomicBool,
    /// Bytes of file content unpacked into new snapshots by this build, against
    /// [`unpack::max_build_unpack`].
    unpacked: std::sync::atomic::AtomicU64,
}

/// How many times a build runs again after it removed corrupt blobs from the store.
const HEAL_ATTEMPTS: usize = 2;

/// Run every node of the plan and write every image. A build that failed after removing
/// corrupt blobs from the store runs again (at most [`HEAL_ATTEMPTS`] times): what it removed
/// is fetched or rebuilt.
pub fn build(
    plan: &Plan,
    sources: &Sources,
    store: &Store,
    resolver: &dyn Resolver,
    options: &BuildOptions,
    events: &dyn EventSink,
) -> BuildReport {
    let started = Instant::now();
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
    let mut attempt = 0;
    let (report, summarize) = loop {
        let (report, healed, summarize) =
            build_once(plan, sources, store, resolver, options, events);
        if report.failures.is_empty() || report.cancelled || !healed || attempt >= HEAL_ATTEMPTS {
            break (report, summarize);
        }
        attempt += 1;
        events.emit(Event::Warning {
            message:
                "corrupt blobs were removed from the store; building again to fetch or rebuild them"
                    .into(),
        });
    };
    if summarize {
        events.emit(Event::Summary(Summary {
            executed: report.executed,
            cached: report.cached,
            failed: report.failures.len(),
            duration_ms: started.elapsed().as_millis() as u64,
            images: report.images.clone(),
        }));
    }
    report
}

fn build_once(
    plan: &Plan,
    sources: &Sources,
    store: &Store,
    resolver: &dyn Resolver,
    options: &BuildOptions,
    events: &dyn EventSink,
) -> (BuildReport, bool, bool) {
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
        snapshots_in_use: Mutex::new(std::collections::HashSet::new()),
        layer_origins: Mutex::new(HashMap::new()),
        verified_layers: Mutex::new(std::collections::HashSet::new()),
        forged_layers: Mutex::new(std::collections::HashSet::new()),
        healed: std::sync::atomic::AtomicBool::new(false),
        unpacked: std::sync::atomic::AtomicU64::new(0),
    };
    let healed = || executor.healed.load(std::sync::atomic::Ordering::Relaxed);

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
        let report = BuildReport {
            environment_error: None,
            images: Vec::new(),
            executed: 0,
            cached: 0,
            failures,
            cancelled: false,
        };
        return (report, healed(), false);
    }
    if let Some(preflight) = &options.preflight {
        let executing: Vec<&Node> = plan
            .nodes
            .iter()
            .filter(|node| needed[node.id] && !cached_nodes[node.id])
            .collect();
        if let Err(message) = preflight(&executing) {
            let report = BuildReport {
                environment_error: Some(message),
                images: Vec::new(),
                executed: 0,
                cached: 0,
                failures: Vec::new(),
                cancelled: false,
            };
            return (report, healed(), false);
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
    let report = BuildReport {
        environment_error: None,
        images,
        executed,
        cached,
        failures,
        cancelled,
    };
    (report, healed(), true)
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
}
