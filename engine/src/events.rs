//! Progress events: the engine reports, the CLI renders (tty, plain, json).
//!
//! Events are plain data with a stable JSON form (`--progress json` prints one per line), so
//! the renderer is never part of the engine and tests can assert on what happened.

use serde::Serialize;

/// What happened to a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Executed,
    Cached,
    Failed,
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The plan is ready: how much work there is.
    Plan {
        nodes: usize,
        steps: usize,
    },
    /// A node starts (its cached prefix already checked).
    NodeStarted {
        node: usize,
        stage: String,
        platform: String,
    },
    /// A filesystem step starts executing.
    StepStarted {
        node: usize,
        stage: String,
        platform: String,
        step: String,
    },
    /// A line of a running step's output.
    Output {
        node: usize,
        line: String,
    },
    Step {
        node: usize,
        stage: String,
        platform: String,
        step: String,
        status: StepStatus,
        #[serde(skip_serializing_if = "Option::is_none")]
        duration_ms: Option<u64>,
        /// Where an executed step ran, in a build with a remote executor: `local`, or the
        /// remote worker's name.
        #[serde(skip_serializing_if = "Option::is_none")]
        ran_on: Option<String>,
    },
    NodeFinished {
        node: usize,
        stage: String,
        platform: String,
        ok: bool,
    },
    /// An image test starts running (in the finished image of `platform`).
    TestStarted {
        test: usize,
        image: String,
        platform: String,
        name: String,
    },
    /// An image test ended: `executed` (it ran and passed), `cached` (it passed before, with
    /// the same image and test) or `failed`.
    Test {
        test: usize,
        image: String,
        platform: String,
        name: String,
        status: StepStatus,
        #[serde(skip_serializing_if = "Option::is_none")]
        duration_ms: Option<u64>,
    },
    /// An image layout was written.
    Image(ImageSummary),
    /// A warning worth showing (for example the remote cache being unreachable).
    Warning {
        message: String,
    },
    /// Something failed: a step, a node's base, an image's layout. One per failure of the
    /// finished build, before its summary.
    Failure(FailureEvent),
    Summary(Summary),
}

/// A failure and where it is in the build file (see `build::NodeFailure`).
#[derive(Clone, Debug, Serialize)]
pub struct FailureEvent {
    /// `graphbuild::step::failed` when a step failed, `graphbuild::build::failed` otherwise.
    pub code: String,
    /// The stage, or the image whose layout could not be written.
    pub stage: String,
    /// The platform, or `all`.
    pub platform: String,
    /// The failing step's description.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    pub message: String,
    /// What to do about it, when graphbuild knows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub help: Option<String>,
    /// The command's exit code, when it ran and failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The build file (its name as diagnostics show it), and the 1-based line and byte column
    /// of the failing step (or stage, or image).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
    /// The last lines of the step's output.
    pub tail: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ImageSummary {
    pub name: String,
    pub index_digest: String,
    pub output: String,
    pub tags: Vec<String>,
    pub platforms: Vec<PlatformSummary>,
    pub executed: usize,
    pub cached: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct PlatformSummary {
    pub platform: String,
    pub manifest_digest: String,
    /// Compressed size of the layers.
    pub size: u64,
    /// The digest of the platform's attestation manifest, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attestation_digest: Option<String>,
    /// Where the platform's SBOM came from: `scanned`, `local cache` or `team cache`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sbom: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub executed: usize,
    pub cached: usize,
    pub failed: usize,
    /// Image tests run (and passed) by this build, and found passed before.
    pub tests_executed: usize,
    pub tests_cached: usize,
    pub duration_ms: u64,
    pub images: Vec<ImageSummary>,
}

/// Where events go. Called from many threads.
pub trait EventSink: Send + Sync {
    fn emit(&self, event: Event);
}

/// Discards everything.
pub struct NoEvents;

impl EventSink for NoEvents {
    fn emit(&self, _: Event) {}
}

/// Collects events, for tests.
#[derive(Default)]
pub struct Recorder(pub std::sync::Mutex<Vec<Event>>);

impl EventSink for Recorder {
    fn emit(&self, event: Event) {
        if let Ok(mut events) = self.0.lock() {
            events.push(event);
        }
    }
}
