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
//!
//! # Inputs and failures
//!
//! A node reads what the nodes it builds on and copies from produced through the scheduler:
//! they are its dependencies, and their outputs are handed to it ([`DepOutputs`]). A node that
//! fails returns a [`NodeFailure`]: what went wrong ([`StepError`]), the stage, the platform
//! and the failing step's statement in the build file, which the CLI renders as a diagnostic
//! pointing at that statement and `--progress json` reports as a `failure` event.

mod add_source;
mod attest;
mod cache;
pub(crate) mod direct_copy;
mod error;
mod execute;
mod export;
mod faults;
mod image_test;
mod remote_step;
mod snapshot_delta;
mod ssh_mounts;
mod stage_binds;
mod step_cache;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use graphbuild_lang::ir::Sources;
use graphbuild_lang::platform::Platform;

use crate::digest::{Digest, Key};
use crate::events::{Event, EventSink, ImageSummary, Summary};
use crate::layer::LayerOptions;
use crate::plan::{Node, Op, Plan};
use crate::remote::RemoteCache;
use crate::resolve::Resolver;
use crate::sandbox::overlay::{OverlayMode, Selection, Unavailable};
use crate::scheduler::{self, CancelToken};
use crate::state::{HistoryEntry, LayerDesc};
use crate::store::Store;

pub use error::{NodeFailure, StepError, Subject};
pub use export::ManifestFormat;
pub use faults::{AttestError, CopyFault, ExportError, LayerFault, TestFault};
pub use step_cache::CacheError;
use step_cache::StepCache;

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
    /// `--ssh` ids and their agents' sockets (see [`crate::ssh`]). A step reaches one through
    /// a proxy; the path is in no key, log or error.
    pub ssh: HashMap<String, PathBuf>,
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
    /// `--provenance`, `--sbom`: the attestations each image's index carries.
    pub attest: crate::attest::AttestOptions,
    /// `--skip-tests`: image tests neither run nor block the build.
    pub skip_tests: bool,
    /// `GRAPHBUILD_OVERLAY`: the kernel's overlayfs, fuse-overlayfs, or whichever mounts
    /// (chosen once per build, see [`crate::sandbox::overlay`]).
    pub overlay: OverlayMode,
}

/// Shown for each `insecure=#true` step, by `graphbuild plan` and in the step's output.
pub const INSECURE_WARNING: &str = "insecure=#true: this step runs with every capability and \
     no seccomp filter; it can take over the host (docs/security.md)";

/// See [`BuildOptions::preflight`]: the nodes that will execute, and the platforms of the image
/// tests that will run. An `Err` stops the build with that message.
pub type Preflight = Box<dyn Fn(&[&Node], &[Platform]) -> Result<(), String> + Send + Sync>;

/// `--cache-from`, `--cache-to`, `--cache-required`.
#[derive(Debug, Clone, Default)]
pub struct RemoteOptions {
    pub from: Option<Arc<dyn RemoteCache>>,
    pub to: Option<Arc<dyn RemoteCache>>,
    /// Fail the build when the cache cannot be used, instead of warning once and going on.
    pub required: bool,
    /// `--remote-executor`: a cluster that executes `run` steps (docs/remote.md).
    pub executor: Option<Arc<crate::execution::RemoteExecutor>>,
    /// Where to read the binfmt_misc handlers (`None`: [`crate::binfmt::BINFMT_MISC_DIR`]).
    /// With an executor, a foreign platform this machine cannot emulate is no error up front:
    /// its `run` steps go to workers, and one that must run here fails naming the missing
    /// emulator ([`StepError::NoEmulator`]).
    pub binfmt_dir: Option<std::path::PathBuf>,
}

/// Open the team cache at `url` (its scheme picks the client), with an optional token, giving
/// up on any call once `cancel` is set (Ctrl-C/SIGTERM).
pub fn open_cache(
    url: &str,
    token: Option<String>,
    cancel: Option<Arc<std::sync::atomic::AtomicBool>>,
) -> Result<Arc<dyn RemoteCache>, crate::remote::RemoteError> {
    if url.starts_with("grpc://") || url.starts_with("grpcs://") {
        let mut cache = crate::reapi::ReapiCache::new(url, token)?;
        if let Some(flag) = cancel {
            cache = cache.with_cancel(flag);
        }
        return Ok(Arc::new(cache));
    }
    let mut cache = crate::remote::HttpCache::new(url, token)?;
    if let Some(flag) = cancel {
        cache = cache.with_cancel(flag);
    }
    Ok(Arc::new(cache))
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

pub struct BuildReport {
    /// The preflight check refused to run the nodes that needed executing.
    pub environment_error: Option<String>,
    pub images: Vec<ImageSummary>,
    pub executed: usize,
    pub cached: usize,
    /// Image tests run (and passed) by this build, and found passed in the store.
    pub tests_executed: usize,
    pub tests_cached: usize,
    pub failures: Vec<NodeFailure>,
    pub cancelled: bool,
}

struct Executor<'a> {
    plan: &'a Plan,
    /// The build files' text, for the provenance's `max` mode.
    sources: &'a Sources,
    store: &'a Store,
    resolver: &'a dyn Resolver,
    options: &'a BuildOptions,
    events: &'a dyn EventSink,
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
    /// The overlay sandboxes mount, chosen the first time one is needed.
    overlay: std::sync::OnceLock<Result<Selection, Unavailable>>,
}

/// A job of the build's graph: a node, or an image test that runs after its image's node.
#[derive(Clone, Copy, Debug)]
enum Job {
    Node(usize),
    Test(usize),
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
    if !report.cancelled {
        for failure in &report.failures {
            events.emit(Event::Failure(failure.event(sources)));
        }
    }
    if summarize {
        events.emit(Event::Summary(Summary {
            executed: report.executed,
            cached: report.cached,
            failed: report.failures.len(),
            tests_executed: report.tests_executed,
            tests_cached: report.tests_cached,
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
        overlay: std::sync::OnceLock::new(),
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
            Some(step) => match executor
                .step_cache()
                .lookup(&executor.action_key(&step.key))
            {
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
    // Image tests: those that passed before (in the store or the team cache, under their key)
    // are not run again; the others run once their image's node is done.
    let mut tests_cached = 0;
    let mut testing = Vec::new();
    for test in plan.tests.iter().filter(|_| !options.skip_tests) {
        let passed = match executor.test_passed_before(test) {
            Ok(passed) => passed,
            Err(failure) => {
                failures.push(*failure);
                continue;
            }
        };
        if passed {
            tests_cached += 1;
            events.emit(Event::Test {
                test: test.id,
                image: test.image.clone(),
                platform: test.platform.to_string(),
                name: test.name.clone(),
                status: crate::events::StepStatus::Cached,
                duration_ms: None,
            });
        } else {
            testing.push(test);
        }
    }
    if !failures.is_empty() {
        let report = BuildReport {
            environment_error: None,
            images: Vec::new(),
            executed: 0,
            cached: 0,
            tests_executed: 0,
            tests_cached: 0,
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
        let mut test_platforms: Vec<Platform> = Vec::new();
        for test in &testing {
            if !test_platforms.contains(&test.platform) {
                test_platforms.push(test.platform.clone());
            }
        }
        // A build whose steps or tests run needs an overlay: choosing it can fail as an
        // environment problem (no overlay at all), before anything executes.
        let runs = !testing.is_empty()
            || executing
                .iter()
                .any(|node| node.steps.iter().any(|step| matches!(step.op, Op::Run(_))));
        let overlay = if runs {
            executor
                .overlay()
                .err()
                .map(|unavailable| unavailable.to_string())
        } else {
            None
        };
        if let Some(message) = preflight(&executing, &test_platforms).err().or(overlay) {
            let report = BuildReport {
                environment_error: Some(message),
                images: Vec::new(),
                executed: 0,
                cached: 0,
                tests_executed: 0,
                tests_cached: 0,
                failures: Vec::new(),
                cancelled: false,
            };
            return (report, healed(), false);
        }
    }
    let mut graph = scheduler::Graph::new();
    let mut ids = vec![None; plan.nodes.len()];
    // Each node's dependencies in the graph, in the order the scheduler gives their outputs.
    let mut dep_nodes: Vec<Vec<usize>> = vec![Vec::new(); plan.nodes.len()];
    for node in plan.nodes.iter().filter(|node| needed[node.id]) {
        dep_nodes[node.id] = node
            .deps
            .iter()
            .copied()
            .filter(|dep| ids[*dep].is_some())
            .collect();
        let deps: Vec<_> = dep_nodes[node.id]
            .iter()
            .filter_map(|dep| ids[*dep])
            .collect();
        let cost = 1 + node
            .steps
            .iter()
            .filter(|step| matches!(step.op, Op::Run(_)))
            .count() as u64
            * 10;
        ids[node.id] = Some(graph.add(Job::Node(node.id), cost, &deps));
    }
    for test in &testing {
        let deps: Vec<_> = ids[test.node].into_iter().collect();
        graph.add(Job::Test(test.id), 10, &deps);
    }
    let job_of: Vec<Job> = graph.jobs().map(|(_, job)| *job).collect();
    let report = scheduler::run(
        graph,
        options.jobs.max(1),
        &options.cancel,
        |job: &Job, deps: &[&Option<Arc<NodeOutput>>]| {
            // What the job's dependencies produced, by node id (a test's one dependency is its
            // image's node).
            let dep_ids: &[usize] = match job {
                Job::Node(id) => &dep_nodes[*id],
                Job::Test(id) => std::slice::from_ref(&plan.tests[*id].node),
            };
            let inputs = DepOutputs(
                dep_ids
                    .iter()
                    .copied()
                    .zip(deps.iter().filter_map(|output| output.as_deref()))
                    .collect(),
            );
            match job {
                Job::Node(id) => executor.run_node(&plan.nodes[*id], &inputs).map(Some),
                Job::Test(id) => executor.run_test(&plan.tests[*id], &inputs).map(|()| None),
            }
        },
    );

    // A step stopped by the cancel fails, but the build was cancelled, not broken.
    let mut cancelled = options.cancel.is_cancelled();
    let mut tests_executed = 0;
    for (index, outcome) in report.outcomes().iter().enumerate() {
        if matches!(outcome, scheduler::Outcome::Done(_)) && matches!(job_of[index], Job::Test(_)) {
            tests_executed += 1;
        }
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
                subject: Subject::CacheMounts,
                stage: "cache mounts".into(),
                platform: "all".into(),
                at: None,
                step: None,
                error: Arc::new(message.into()),
                tail: Vec::new(),
            });
        }
    }
    let outputs: HashMap<usize, Arc<NodeOutput>> = plan
        .nodes
        .iter()
        .filter_map(|node| {
            let output = report.outcome(ids[node.id]?).output()?.as_ref()?;
            Some((node.id, output.clone()))
        })
        .collect();
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
                Err(error) => failures.push(NodeFailure {
                    subject: Subject::Image,
                    stage: image.name.clone(),
                    platform: "all".into(),
                    at: Some(image.at),
                    step: None,
                    error: Arc::new(error.into()),
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
        tests_executed,
        tests_cached,
        failures,
        cancelled,
    };
    (report, healed(), true)
}

/// What the nodes a node builds on and copies from produced, by node id: the outputs the
/// scheduler hands a job from its dependencies.
struct DepOutputs<'a>(HashMap<usize, &'a NodeOutput>);

impl DepOutputs<'_> {
    fn output_of(&self, node: usize) -> Result<&NodeOutput, StepError> {
        self.0
            .get(&node)
            .copied()
            .ok_or(StepError::NoOutput { node })
    }
}

impl Executor<'_> {
    /// A node failed, at `step` or (when `None`) outside any step: its base.
    fn failure(
        &self,
        node: &Node,
        step: Option<&crate::plan::StepPlan>,
        error: impl Into<StepError>,
        tail: Vec<String>,
    ) -> Box<NodeFailure> {
        Box::new(NodeFailure {
            subject: Subject::Node,
            stage: node.stage.clone(),
            platform: node.platform.to_string(),
            at: Some(step.map_or(node.at, |step| step.at)),
            step: step.map(|step| step.description.clone()),
            error: Arc::new(error.into()),
            tail,
        })
    }

    fn run_node(
        &self,
        node: &Node,
        inputs: &DepOutputs<'_>,
    ) -> Result<Arc<NodeOutput>, Box<NodeFailure>> {
        let platform = node.platform.to_string();
        self.events.emit(Event::NodeStarted {
            node: node.id,
            stage: node.stage.clone(),
            platform: platform.clone(),
        });
        let result = self.run_node_steps(node, inputs);
        self.events.emit(Event::NodeFinished {
            node: node.id,
            stage: node.stage.clone(),
            platform,
            ok: result.is_ok(),
        });
        Ok(Arc::new(result?))
    }
}
