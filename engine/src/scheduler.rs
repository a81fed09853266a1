//! The scheduler: runs a graph of jobs on a few threads, longest chain first.
//!
//! About half of this file is its property tests against a serial oracle; the scheduler itself
//! is under 700 lines.
//!
//! # Overview
//!
//! A [`Graph`] holds jobs of any type `J`. Each job has a cost estimate (any unit, as long as
//! one graph uses one unit) and the jobs it depends on. [`run`] executes every job with a
//! caller-given function, at most `jobs` at a time, each only after all its dependencies have
//! succeeded, and hands the function the outputs of those dependencies in the order they were
//! declared. The answer is a [`RunReport`]: one [`Outcome`] per job, indexed by [`JobId`].
//!
//! The workers are plain threads (`std::thread::scope`): the calling thread plus `jobs - 1`
//! spawned ones. The work they do (sandboxed processes, compression, hashing) blocks or burns
//! CPU, so there is nothing for an async runtime to overlap, and scoped threads let jobs borrow
//! from the caller's stack without `Arc` or `'static`. All bookkeeping sits behind one mutex
//! and one condition variable; a job never runs while that lock is held.
//!
//! # Ordering
//!
//! Among the jobs whose dependencies are all done, the one with the highest *priority* starts
//! first. A job's priority is its own cost plus the largest priority among the jobs that depend
//! on it: the cost of the longest (most expensive) chain that starts with the job and runs
//! through its dependents to the end of the graph. Starting that chain first is the classic
//! critical-path heuristic for list scheduling: the build cannot end before its longest chain
//! does, so the chain must not wait behind short independent work. Ties go to the job added
//! first. With one worker the start order is therefore a function of the graph alone; with more,
//! which jobs are ready at a given moment depends on timing, but the choice among them does not.
//!
//! # Failure propagation
//!
//! A job fails when its function returns `Err`. Every job that depends on it, directly or
//! through others, becomes [`Outcome::Skipped`] (naming the failed job) and never runs. Jobs
//! that do not depend on the failure keep being started, and jobs already running finish, so a
//! single run reports every independent failure at once, as `make -k` and cargo do, rather than
//! making the user fix them one build at a time. A skipped job names the first failure that
//! reached it.
//!
//! # Cancellation
//!
//! A [`CancelToken`] is a shared flag. The CLI sets it from its Ctrl-C handler (or registers
//! [`CancelToken::flag`] with `signal-hook` directly). Once the scheduler sees it, it starts
//! no new job and marks every job that has not started [`Outcome::Cancelled`]. Jobs already
//! running are not interrupted from outside: they are expected to poll
//! [`CancelToken::is_cancelled`] at convenient points (between steps, while waiting for a
//! child process), clean up (kill and reap their sandbox) and return, and [`run`] returns once
//! the last of them has. What such a job returns is recorded as is, so an executor should return
//! an error that says it was interrupted; its dependents become `Cancelled`, not `Skipped`,
//! because the token is checked before a finished job's result is recorded.
//!
//! A panic inside a job is a bug, not a failure: the scheduler stops starting jobs, as for a
//! cancellation, waits for the running ones, and then resumes the panic on the calling thread.
//!
//! # Cycles
//!
//! [`Graph::add`] only accepts dependencies that already exist, so a graph built with it alone
//! is acyclic by construction. [`Graph::add_dependency`] adds an edge between two existing jobs
//! in any order, and refuses (with [`GraphError::Cycle`], naming the jobs around the loop) an
//! edge that would close a cycle. A [`Graph`] is therefore always acyclic and [`run`] cannot
//! fail as a whole.
//!
//! # Why generic
//!
//! The scheduler knows nothing about KDL, stages, platforms or OCI: a job is a `J`, its result
//! a `T`, its error an `E`. The same separation is cargo's `DependencyQueue`. It keeps this
//! module small enough to reason about and lets the tests below check ordering, failure,
//! cancellation and concurrency bounds on toy jobs, including random graphs compared against
//! a serial oracle, without sandboxes or images.

use std::any::Any;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread;

/// A job's handle in one [`Graph`]: the order in which it was added, from 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobId(usize);

impl JobId {
    /// The position of this job in [`Graph`] and [`RunReport::outcomes`].
    pub fn index(self) -> usize {
        self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "job {}", self.0)
    }
}

/// Why a graph refused a change.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum GraphError {
    /// A [`JobId`] that this graph never handed out.
    #[error("{id} does not exist in this graph of {len} jobs")]
    #[diagnostic(
        code(graphbuild::scheduler::unknown_job),
        help("use only ids returned by this graph's `add`")
    )]
    UnknownJob {
        /// The id that was passed.
        id: JobId,
        /// How many jobs the graph holds.
        len: usize,
    },
    /// The dependency would close a cycle.
    #[error("dependency cycle: {path}")]
    #[diagnostic(
        code(graphbuild::scheduler::cycle),
        help(
            "a job cannot depend on itself, directly or through others; remove one of these dependencies"
        )
    )]
    Cycle {
        /// The jobs around the cycle, each depending on the next, the last on the first.
        jobs: Vec<JobId>,
        /// The same cycle as text, `a -> b -> a`, using the jobs' `Display`.
        path: String,
    },
}

struct Node<J> {
    job: J,
    cost: u64,
    dependencies: Vec<JobId>,
}

/// A directed acyclic graph of jobs, each with a cost estimate and its dependencies.
pub struct Graph<J> {
    nodes: Vec<Node<J>>,
}

impl<J> Default for Graph<J> {
    fn default() -> Self {
        Self { nodes: Vec::new() }
    }
}

impl<J: fmt::Debug> fmt::Debug for Graph<J> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = formatter.debug_list();
        for node in &self.nodes {
            list.entry(&(&node.job, node.cost, &node.dependencies));
        }
        list.finish()
    }
}

impl<J> Graph<J> {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a job that costs about `cost` and needs the outputs of `dependencies`, which it
    /// receives in this order. A dependency may be listed twice; it is then passed twice.
    ///
    /// # Panics
    ///
    /// If a dependency is not an id this graph returned: a programming error, like indexing a
    /// slice out of bounds. Ids never come from user input.
    pub fn add(&mut self, job: J, cost: u64, dependencies: &[JobId]) -> JobId {
        let id = JobId(self.nodes.len());
        for dependency in dependencies {
            assert!(
                dependency.0 < self.nodes.len(),
                "{dependency} is not a job of this graph of {} jobs",
                self.nodes.len()
            );
        }
        self.nodes.push(Node {
            job,
            cost,
            dependencies: dependencies.to_vec(),
        });
        id
    }

    /// Makes `dependent` depend on `dependency` as well, after its declared dependencies, for
    /// graphs whose edges are not known in dependency order. Refuses an edge that would close
    /// a cycle, naming the jobs around it.
    pub fn add_dependency(&mut self, dependent: JobId, dependency: JobId) -> Result<(), GraphError>
    where
        J: fmt::Display,
    {
        for id in [dependent, dependency] {
            if id.0 >= self.nodes.len() {
                return Err(GraphError::UnknownJob {
                    id,
                    len: self.nodes.len(),
                });
            }
        }
        if let Some(chain) = self.dependency_chain(dependency, dependent) {
            // `chain` runs dependency -> … -> dependent; the new edge closes it.
            let mut jobs = Vec::with_capacity(chain.len() + 1);
            jobs.push(dependent);
            jobs.extend(chain.iter().copied().take_while(|id| *id != dependent));
            let path = jobs
                .iter()
                .chain(std::iter::once(&dependent))
                .map(|id| self.nodes[id.0].job.to_string())
                .collect::<Vec<_>>()
                .join(" -> ");
            return Err(GraphError::Cycle { jobs, path });
        }
        self.nodes[dependent.0].dependencies.push(dependency);
        Ok(())
    }

    /// A path `from -> … -> to` following dependency edges, if `from` depends on `to`
    /// (or is `to`).
    fn dependency_chain(&self, from: JobId, to: JobId) -> Option<Vec<JobId>> {
        let mut came_from: Vec<Option<JobId>> = vec![None; self.nodes.len()];
        let mut seen = vec![false; self.nodes.len()];
        let mut stack = vec![from];
        seen[from.0] = true;
        while let Some(id) = stack.pop() {
            if id == to {
                let mut chain = vec![id];
                let mut cursor = id;
                while let Some(previous) = came_from[cursor.0] {
                    chain.push(previous);
                    cursor = previous;
                }
                chain.reverse();
                return Some(chain);
            }
            for dependency in &self.nodes[id.0].dependencies {
                if !seen[dependency.0] {
                    seen[dependency.0] = true;
                    came_from[dependency.0] = Some(id);
                    stack.push(*dependency);
                }
            }
        }
        None
    }

    /// How many jobs the graph holds.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the graph holds no job.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The job behind `id`. Panics if `id` is not from this graph.
    pub fn job(&self, id: JobId) -> &J {
        &self.nodes[id.0].job
    }

    /// The cost estimate given for `id`. Panics if `id` is not from this graph.
    pub fn cost(&self, id: JobId) -> u64 {
        self.nodes[id.0].cost
    }

    /// The dependencies of `id`, in the order its outputs are passed. Panics if `id` is not
    /// from this graph.
    pub fn dependencies(&self, id: JobId) -> &[JobId] {
        &self.nodes[id.0].dependencies
    }

    /// Every job with its id, in the order they were added.
    pub fn jobs(&self) -> impl Iterator<Item = (JobId, &J)> {
        self.nodes
            .iter()
            .enumerate()
            .map(|(index, node)| (JobId(index), &node.job))
    }

    /// For every job (indexed by [`JobId::index`]), the jobs that depend on it, once per
    /// declared edge.
    fn dependents(&self) -> Vec<Vec<JobId>> {
        let mut dependents = vec![Vec::new(); self.nodes.len()];
        for (index, node) in self.nodes.iter().enumerate() {
            for dependency in &node.dependencies {
                dependents[dependency.0].push(JobId(index));
            }
        }
        dependents
    }

    /// Each job's scheduling priority (indexed by [`JobId::index`]): its cost plus the largest
    /// priority among its dependents, that is the cost of the most expensive chain from the job
    /// to the end of the graph. Saturates at `u64::MAX`.
    pub fn priorities(&self) -> Vec<u64> {
        let dependents = self.dependents();
        // Visit jobs after all their dependents (Kahn's algorithm from the sinks).
        let mut remaining: Vec<usize> = dependents.iter().map(Vec::len).collect();
        let mut stack: Vec<JobId> = (0..self.nodes.len())
            .filter(|index| remaining[*index] == 0)
            .map(JobId)
            .collect();
        let mut priorities = vec![0_u64; self.nodes.len()];
        while let Some(id) = stack.pop() {
            let longest_after = dependents[id.0]
                .iter()
                .map(|dependent| priorities[dependent.0])
                .max()
                .unwrap_or(0);
            priorities[id.0] = self.nodes[id.0].cost.saturating_add(longest_after);
            for dependency in &self.nodes[id.0].dependencies {
                remaining[dependency.0] -= 1;
                if remaining[dependency.0] == 0 {
                    stack.push(*dependency);
                }
            }
        }
        priorities
    }
}

/// A shared "stop now" flag: cheap to clone, all clones see the same state.
#[derive(Clone, Debug, Default)]
pub struct CancelToken {
    flag: Arc<AtomicBool>,
}

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks every holder to stop. Idempotent; safe from any thread.
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::SeqCst);
    }

    /// Whether [`cancel`](Self::cancel) was called (or the flag was set) on any clone.
    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// The underlying flag, for `signal_hook::flag::register(SIGINT, token.flag().clone())`,
    /// which sets it from the signal handler without any extra thread.
    pub fn flag(&self) -> &Arc<AtomicBool> {
        &self.flag
    }
}

/// What became of one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T, E> {
    /// The job ran and returned this output.
    Done(T),
    /// The job ran and returned this error.
    Failed(E),
    /// The job did not run because this job, one of its direct or indirect dependencies,
    /// failed.
    Skipped {
        /// The failed job.
        failed: JobId,
    },
    /// The job did not run because the run was cancelled before it could start.
    Cancelled,
}

impl<T, E> Outcome<T, E> {
    /// The output, if the job succeeded.
    pub fn output(&self) -> Option<&T> {
        match self {
            Outcome::Done(output) => Some(output),
            _ => None,
        }
    }

    /// The error, if the job failed.
    pub fn error(&self) -> Option<&E> {
        match self {
            Outcome::Failed(error) => Some(error),
            _ => None,
        }
    }
}

/// How many jobs ended each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutcomeCounts {
    /// Jobs that ran and succeeded.
    pub done: usize,
    /// Jobs that ran and failed.
    pub failed: usize,
    /// Jobs not run because a dependency failed.
    pub skipped: usize,
    /// Jobs not run because the run was cancelled.
    pub cancelled: usize,
}

/// The result of [`run`]: one [`Outcome`] per job.
#[derive(Debug)]
pub struct RunReport<T, E> {
    outcomes: Vec<Outcome<T, E>>,
    cancelled: bool,
}

impl<T, E> RunReport<T, E> {
    /// Every outcome, indexed by [`JobId::index`].
    pub fn outcomes(&self) -> &[Outcome<T, E>] {
        &self.outcomes
    }

    /// The outcome of `id`. Panics if `id` is not from the graph that was run.
    pub fn outcome(&self, id: JobId) -> &Outcome<T, E> {
        &self.outcomes[id.0]
    }

    /// Every failed job with its error, in id order.
    pub fn failures(&self) -> impl Iterator<Item = (JobId, &E)> {
        self.outcomes
            .iter()
            .enumerate()
            .filter_map(|(index, outcome)| outcome.error().map(|error| (JobId(index), error)))
    }

    /// Whether every job ran and succeeded.
    pub fn is_success(&self) -> bool {
        self.outcomes
            .iter()
            .all(|outcome| matches!(outcome, Outcome::Done(_)))
    }

    /// Whether the scheduler saw the [`CancelToken`] set and stopped starting jobs.
    pub fn was_cancelled(&self) -> bool {
        self.cancelled
    }

    /// How many jobs ended each way.
    pub fn counts(&self) -> OutcomeCounts {
        let mut counts = OutcomeCounts::default();
        for outcome in &self.outcomes {
            match outcome {
                Outcome::Done(_) => counts.done += 1,
                Outcome::Failed(_) => counts.failed += 1,
                Outcome::Skipped { .. } => counts.skipped += 1,
                Outcome::Cancelled => counts.cancelled += 1,
            }
        }
        counts
    }
}

/// The default for `--jobs`: the number of CPUs this process may use, or 1 if unknown.
pub fn default_jobs() -> usize {
    thread::available_parallelism().map_or(1, |count| count.get())
}

/// Where a job stands while the run is in progress.
enum State<E> {
    Waiting,
    Running,
    /// Its output is in the run's output table.
    Done,
    Failed(E),
    Skipped(JobId),
    Cancelled,
    Panicked,
}

/// Everything the workers share, behind one mutex.
struct Queue<E> {
    /// Jobs whose dependencies are all done, highest priority first, then lowest id.
    ready: BinaryHeap<(u64, Reverse<usize>)>,
    /// For each job, how many dependency edges are not done yet.
    unfinished_dependencies: Vec<usize>,
    states: Vec<State<E>>,
    running: usize,
    /// Set once the scheduler stops starting jobs (cancelled or a job panicked).
    stopped: bool,
    cancelled: bool,
    panic: Option<Box<dyn Any + Send>>,
}

impl<E> Queue<E> {
    /// Stops starting jobs: every job that has not started becomes `Cancelled`.
    fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        self.ready.clear();
        for state in &mut self.states {
            if matches!(state, State::Waiting) {
                *state = State::Cancelled;
            }
        }
    }

    /// Marks everything downstream of the failed job `failed` as skipped.
    fn skip_dependents(&mut self, failed: JobId, dependents: &[Vec<JobId>]) {
        let mut stack = dependents[failed.0].clone();
        while let Some(id) = stack.pop() {
            if matches!(self.states[id.0], State::Waiting) {
                self.states[id.0] = State::Skipped(failed);
                stack.extend_from_slice(&dependents[id.0]);
            }
        }
    }

    /// Records that `id` succeeded and readies the dependents that were waiting only for it.
    fn release_dependents(&mut self, id: JobId, dependents: &[Vec<JobId>], priorities: &[u64]) {
        for dependent in &dependents[id.0] {
            self.unfinished_dependencies[dependent.0] -= 1;
            if self.unfinished_dependencies[dependent.0] == 0
                && matches!(self.states[dependent.0], State::Waiting)
            {
                self.ready
                    .push((priorities[dependent.0], Reverse(dependent.0)));
            }
        }
    }
}

/// A finished job, carried by its worker until it takes the lock again.
enum Finished<E> {
    Succeeded,
    Failed(E),
    Panicked(Box<dyn Any + Send>),
}

fn lock<E>(queue: &Mutex<Queue<E>>) -> MutexGuard<'_, Queue<E>> {
    // No code panics while holding the lock, but a poisoned queue is still consistent.
    queue.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs every job of `graph` with `exec`, at most `jobs` at a time (0 counts as 1), critical
/// path first, and reports what became of each. `exec` receives the job and its dependencies'
/// outputs in declaration order. See the module documentation for failure and cancellation.
///
/// If `exec` panics, the panic resumes here once the jobs still running have returned.
pub fn run<J, T, E, F>(
    graph: Graph<J>,
    jobs: usize,
    cancel: &CancelToken,
    exec: F,
) -> RunReport<T, E>
where
    J: Sync,
    T: Send + Sync,
    E: Send,
    F: Fn(&J, &[&T]) -> Result<T, E> + Sync,
{
    let count = graph.len();
    let priorities = graph.priorities();
    let dependents = graph.dependents();
    let outputs: Vec<OnceLock<T>> = (0..count).map(|_| OnceLock::new()).collect();

    let unfinished_dependencies: Vec<usize> = graph
        .nodes
        .iter()
        .map(|node| node.dependencies.len())
        .collect();
    let ready = unfinished_dependencies
        .iter()
        .enumerate()
        .filter(|(_, unfinished)| **unfinished == 0)
        .map(|(index, _)| (priorities[index], Reverse(index)))
        .collect();
    let queue = Mutex::new(Queue {
        ready,
        unfinished_dependencies,
        states: (0..count).map(|_| State::Waiting).collect(),
        running: 0,
        stopped: false,
        cancelled: false,
        panic: None,
    });
    let wakeup = Condvar::new();

    let worker = || {
        let mut finished: Option<(JobId, Finished<E>)> = None;
        loop {
            let mut state = lock(&queue);
            // Look at the token before recording the result: a job that returns because it saw
            // the cancellation must not get its dependents marked skipped, as if it had failed.
            if !state.stopped && cancel.is_cancelled() {
                state.cancelled = true;
                state.stop();
            }
            if let Some((id, result)) = finished.take() {
                state.running -= 1;
                match result {
                    Finished::Succeeded => {
                        state.states[id.0] = State::Done;
                        state.release_dependents(id, &dependents, &priorities);
                    }
                    Finished::Failed(error) => {
                        state.states[id.0] = State::Failed(error);
                        state.skip_dependents(id, &dependents);
                    }
                    Finished::Panicked(payload) => {
                        state.states[id.0] = State::Panicked;
                        state.panic.get_or_insert(payload);
                        state.stop();
                    }
                }
                wakeup.notify_all();
            }
            let next = loop {
                if !state.stopped && cancel.is_cancelled() {
                    state.cancelled = true;
                    state.stop();
                }
                if let Some((_, Reverse(index))) = state.ready.pop() {
                    state.states[index] = State::Running;
                    state.running += 1;
                    break Some(JobId(index));
                }
                if state.running == 0 {
                    break None;
                }
                state = wakeup.wait(state).unwrap_or_else(PoisonError::into_inner);
            };
            drop(state);
            let Some(id) = next else {
                // Nothing ready and nothing running: the run is over for everyone.
                wakeup.notify_all();
                return;
            };
            let node = &graph.nodes[id.0];
            let inputs: Vec<&T> = node
                .dependencies
                .iter()
                .map(|dependency| {
                    outputs[dependency.0]
                        .get()
                        .expect("a job starts only after all its dependencies are done")
                })
                .collect();
            let result = panic::catch_unwind(AssertUnwindSafe(|| exec(&node.job, &inputs)));
            finished = Some(match result {
                Ok(Ok(output)) => {
                    if outputs[id.0].set(output).is_err() {
                        unreachable!("{id} ran twice");
                    }
                    (id, Finished::Succeeded)
                }
                Ok(Err(error)) => (id, Finished::Failed(error)),
                Err(payload) => (id, Finished::Panicked(payload)),
            });
        }
    };

    let workers = jobs.clamp(1, count.max(1));
    thread::scope(|scope| {
        for index in 1..workers {
            // A worker that cannot be spawned only lowers the parallelism: the calling thread
            // always works too.
            let _ = thread::Builder::new()
                .name(format!("graphbuild-job-{index}"))
                .spawn_scoped(scope, worker);
        }
        worker();
    });

    let queue = queue.into_inner().unwrap_or_else(PoisonError::into_inner);
    if let Some(payload) = queue.panic {
        panic::resume_unwind(payload);
    }
    let outcomes = queue
        .states
        .into_iter()
        .zip(outputs)
        .map(|(state, output)| match state {
            State::Done => match output.into_inner() {
                Some(output) => Outcome::Done(output),
                None => unreachable!("a done job has an output"),
            },
            State::Failed(error) => Outcome::Failed(error),
            State::Skipped(failed) => Outcome::Skipped { failed },
            State::Cancelled => Outcome::Cancelled,
            State::Waiting | State::Running | State::Panicked => {
                unreachable!("every job is settled when the workers stop")
            }
        })
        .collect();
    RunReport {
        outcomes,
        cancelled: queue.cancelled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::hash_map::DefaultHasher;
    use std::hash::{Hash, Hasher};
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};

    /// Runs `graph` with one worker and returns the jobs in the order they started.
    fn start_order(graph: Graph<&'static str>) -> Vec<&'static str> {
        let started = Mutex::new(Vec::new());
        let report = run(graph, 1, &CancelToken::new(), |job: &&str, _: &[&()]| {
            started.lock().unwrap().push(*job);
            Ok::<(), ()>(())
        });
        assert!(report.is_success());
        started.into_inner().unwrap()
    }

    #[test]
    fn one_worker_starts_the_longest_chain_first() {
        let mut graph = Graph::new();
        // Short independent jobs come first in id order, so an id-ordered queue would start them.
        graph.add("short-0", 2, &[]);
        graph.add("short-1", 2, &[]);
        graph.add("short-2", 2, &[]);
        // The chain's head is the cheapest job of all; what it leads to is not.
        let head = graph.add("chain-head", 1, &[]);
        let middle = graph.add("chain-middle", 10, &[head]);
        graph.add("chain-tail", 10, &[middle]);
        assert_eq!(
            start_order(graph),
            [
                "chain-head",
                "chain-middle",
                "chain-tail",
                "short-0",
                "short-1",
                "short-2"
            ]
        );
    }

    #[test]
    fn equal_priorities_start_in_the_order_they_were_added() {
        let mut graph = Graph::new();
        for name in ["a", "b", "c", "d"] {
            graph.add(name, 3, &[]);
        }
        assert_eq!(start_order(graph), ["a", "b", "c", "d"]);
    }

    #[test]
    fn priority_is_cost_plus_the_longest_chain_of_dependents() {
        let mut graph = Graph::new();
        let top = graph.add("top", 1, &[]);
        let left = graph.add("left", 2, &[top]);
        let right = graph.add("right", 5, &[top]);
        let join = graph.add("join", 3, &[left, right]);
        let huge = graph.add("huge", u64::MAX, &[join]);
        let priorities = graph.priorities();
        assert_eq!(priorities[huge.index()], u64::MAX);
        assert_eq!(
            priorities[join.index()],
            u64::MAX,
            "saturates instead of overflowing"
        );

        let mut graph = Graph::new();
        let top = graph.add("top", 1, &[]);
        let left = graph.add("left", 2, &[top]);
        let right = graph.add("right", 5, &[top]);
        graph.add("join", 3, &[left, right]);
        assert_eq!(graph.priorities(), [9, 5, 8, 3]);
    }

    #[test]
    fn dependencies_outputs_arrive_in_declaration_order() {
        let mut graph = Graph::new();
        let one = graph.add(1_u64, 1, &[]);
        let two = graph.add(2, 1, &[]);
        let three = graph.add(3, 1, &[]);
        let sum = graph.add(0, 1, &[three, one, two, one]);
        let report = run(
            graph,
            4,
            &CancelToken::new(),
            |job: &u64, inputs: &[&Vec<u64>]| {
                if inputs.is_empty() {
                    Ok::<_, ()>(vec![*job])
                } else {
                    Ok(inputs
                        .iter()
                        .flat_map(|input| input.iter().copied())
                        .collect())
                }
            },
        );
        assert_eq!(report.outcome(sum), &Outcome::Done(vec![3, 1, 2, 1]));
    }

    #[test]
    fn a_failure_skips_its_dependents_and_nothing_else() {
        let mut graph = Graph::new();
        let top = graph.add("top", 1, &[]);
        let broken = graph.add("broken", 1, &[top]);
        let sound = graph.add("sound", 1, &[top]);
        let join = graph.add("join", 1, &[broken, sound]);
        let after_join = graph.add("after-join", 1, &[join]);
        let independent = graph.add("independent", 1, &[]);
        let also_broken = graph.add("also-broken", 1, &[]);
        let after_also_broken = graph.add("after-also-broken", 1, &[also_broken]);
        let ran = Mutex::new(Vec::new());
        let report = run(graph, 2, &CancelToken::new(), |job: &&str, _: &[&()]| {
            ran.lock().unwrap().push(*job);
            if job.contains("broken") && !job.starts_with("after") {
                Err(format!("{job} failed"))
            } else {
                Ok(())
            }
        });

        assert_eq!(report.outcome(top), &Outcome::Done(()));
        assert_eq!(
            report.outcome(broken),
            &Outcome::Failed("broken failed".to_string())
        );
        assert_eq!(report.outcome(sound), &Outcome::Done(()));
        assert_eq!(report.outcome(join), &Outcome::Skipped { failed: broken });
        assert_eq!(
            report.outcome(after_join),
            &Outcome::Skipped { failed: broken }
        );
        assert_eq!(report.outcome(independent), &Outcome::Done(()));
        assert_eq!(
            report.outcome(also_broken),
            &Outcome::Failed("also-broken failed".to_string())
        );
        assert_eq!(
            report.outcome(after_also_broken),
            &Outcome::Skipped {
                failed: also_broken
            }
        );
        let failures: Vec<_> = report
            .failures()
            .map(|(id, error)| (id, error.as_str()))
            .collect();
        assert_eq!(
            failures,
            [
                (broken, "broken failed"),
                (also_broken, "also-broken failed")
            ]
        );
        assert_eq!(
            report.counts(),
            OutcomeCounts {
                done: 3,
                failed: 2,
                skipped: 3,
                cancelled: 0
            }
        );
        assert!(!report.is_success());
        assert!(!report.was_cancelled());
        let mut ran = ran.into_inner().unwrap();
        ran.sort_unstable();
        assert_eq!(
            ran,
            ["also-broken", "broken", "independent", "sound", "top"]
        );
    }

    #[test]
    fn a_running_job_finishes_after_another_fails() {
        let mut graph = Graph::new();
        let slow = graph.add("slow", 10, &[]);
        let failing = graph.add("failing", 1, &[]);
        let slow_started = AtomicBool::new(false);
        let failure_returned = AtomicBool::new(false);
        let report = run(graph, 2, &CancelToken::new(), |job: &&str, _: &[&()]| {
            let deadline = Instant::now() + Duration::from_secs(5);
            if *job == "slow" {
                slow_started.store(true, Ordering::SeqCst);
                while !failure_returned.load(Ordering::SeqCst) && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(1));
                }
                // Still running after the failure was handed to the scheduler.
                thread::sleep(Duration::from_millis(20));
                Ok(())
            } else {
                while !slow_started.load(Ordering::SeqCst) && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(1));
                }
                failure_returned.store(true, Ordering::SeqCst);
                Err("failed")
            }
        });
        assert_eq!(report.outcome(slow), &Outcome::Done(()));
        assert_eq!(report.outcome(failing), &Outcome::Failed("failed"));
    }

    #[test]
    fn cancelling_stops_new_jobs_and_lets_running_ones_return() {
        let cancel = CancelToken::new();
        let mut graph = Graph::new();
        let long_a = graph.add("long-a", 100, &[]);
        let long_b = graph.add("long-b", 100, &[]);
        let after_a = graph.add("after-a", 1, &[long_a]);
        let quick: Vec<_> = (0..3).map(|_| graph.add("quick", 1, &[])).collect();
        let started = AtomicUsize::new(0);
        let report = thread::scope(|scope| {
            // The Ctrl-C handler's part: cancel once both long jobs run.
            let canceller = cancel.clone();
            let started = &started;
            scope.spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(5);
                while started.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(1));
                }
                canceller.cancel();
            });
            run(graph, 2, &cancel, |job: &&str, _: &[&()]| {
                started.fetch_add(1, Ordering::SeqCst);
                let deadline = Instant::now() + Duration::from_secs(5);
                while !cancel.is_cancelled() {
                    if Instant::now() > deadline {
                        return Err(format!("{job} was never cancelled"));
                    }
                    thread::sleep(Duration::from_millis(1));
                }
                Err(format!("{job} interrupted"))
            })
        });
        assert_eq!(
            started.load(Ordering::SeqCst),
            2,
            "no job starts after the cancellation"
        );
        assert_eq!(
            report.outcome(long_a),
            &Outcome::Failed("long-a interrupted".to_string())
        );
        assert_eq!(
            report.outcome(long_b),
            &Outcome::Failed("long-b interrupted".to_string())
        );
        assert_eq!(report.outcome(after_a), &Outcome::Cancelled);
        for id in quick {
            assert_eq!(report.outcome(id), &Outcome::Cancelled);
        }
        assert!(report.was_cancelled());
        assert_eq!(
            report.counts(),
            OutcomeCounts {
                done: 0,
                failed: 2,
                skipped: 0,
                cancelled: 4
            }
        );
    }

    #[test]
    fn a_cancelled_token_runs_nothing() {
        let cancel = CancelToken::new();
        let clone = cancel.clone();
        clone.cancel();
        assert!(cancel.is_cancelled());
        let mut graph = Graph::new();
        let first = graph.add((), 1, &[]);
        graph.add((), 1, &[first]);
        let calls = AtomicUsize::new(0);
        let report = run(graph, 4, &cancel, |_: &(), _: &[&()]| {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<(), ()>(())
        });
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        assert_eq!(report.outcomes(), [Outcome::Cancelled, Outcome::Cancelled]);
        assert!(report.was_cancelled());
    }

    #[test]
    fn the_flag_can_be_set_directly() {
        let cancel = CancelToken::new();
        assert!(!cancel.is_cancelled());
        cancel.flag().store(true, Ordering::SeqCst);
        assert!(cancel.clone().is_cancelled());
    }

    #[test]
    fn never_more_jobs_at_once_than_allowed() {
        for jobs in [1, 3] {
            let mut graph = Graph::new();
            let roots: Vec<_> = (0..12).map(|index| graph.add(index, 1, &[])).collect();
            for (index, pair) in roots.chunks(2).enumerate() {
                graph.add(100 + index, 1, pair);
            }
            let running = AtomicUsize::new(0);
            let most = AtomicUsize::new(0);
            let report = run(graph, jobs, &CancelToken::new(), |_: &usize, _: &[&()]| {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                thread::sleep(Duration::from_millis(3));
                running.fetch_sub(1, Ordering::SeqCst);
                Ok::<(), ()>(())
            });
            assert!(report.is_success());
            let most = most.load(Ordering::SeqCst);
            assert!(most <= jobs, "{most} jobs ran at once with --jobs {jobs}");
            if jobs > 1 {
                assert!(
                    most > 1,
                    "independent jobs never overlapped with --jobs {jobs}"
                );
            }
        }
    }

    #[test]
    fn zero_jobs_means_one_and_an_empty_graph_is_a_success() {
        let report = run(
            Graph::<()>::new(),
            0,
            &CancelToken::new(),
            |_: &(), _: &[&()]| Ok::<(), ()>(()),
        );
        assert!(report.is_success());
        assert!(report.outcomes().is_empty());

        let mut graph = Graph::new();
        graph.add((), 1, &[]);
        let report = run(graph, 0, &CancelToken::new(), |_: &(), _: &[&u8]| {
            Ok::<u8, ()>(7)
        });
        assert_eq!(report.outcomes(), [Outcome::Done(7)]);
    }

    #[test]
    fn a_panic_resumes_after_running_jobs_return() {
        let mut graph = Graph::new();
        graph.add("panics", 10, &[]);
        graph.add("slow", 10, &[]);
        let slow_finished = AtomicBool::new(false);
        let slow_started = AtomicBool::new(false);
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            run(graph, 2, &CancelToken::new(), |job: &&str, _: &[&()]| {
                if *job == "panics" {
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while !slow_started.load(Ordering::SeqCst) && Instant::now() < deadline {
                        thread::sleep(Duration::from_millis(1));
                    }
                    panic!("a bug in an executor");
                }
                slow_started.store(true, Ordering::SeqCst);
                thread::sleep(Duration::from_millis(20));
                slow_finished.store(true, Ordering::SeqCst);
                Ok::<(), ()>(())
            })
        }));
        let payload = result.expect_err("the panic reaches the caller");
        assert_eq!(
            payload.downcast_ref::<&str>(),
            Some(&"a bug in an executor")
        );
        assert!(slow_finished.load(Ordering::SeqCst));
    }

    #[test]
    fn add_dependency_accepts_forward_edges_and_refuses_cycles() {
        let mut graph = Graph::new();
        let fetch = graph.add("fetch", 1, &[]);
        let compile = graph.add("compile", 1, &[fetch]);
        let link = graph.add("link", 1, &[compile]);
        let configure = graph.add("configure", 1, &[]);

        // An edge towards a job added later is fine.
        graph.add_dependency(fetch, configure).unwrap();
        assert_eq!(graph.dependencies(fetch), [configure]);

        let error = graph.add_dependency(configure, link).unwrap_err();
        match &error {
            GraphError::Cycle { jobs, path } => {
                assert_eq!(jobs, &[configure, link, compile, fetch]);
                assert_eq!(path, "configure -> link -> compile -> fetch -> configure");
            }
            other => panic!("expected a cycle, got {other:?}"),
        }
        assert_eq!(
            error.to_string(),
            "dependency cycle: configure -> link -> compile -> fetch -> configure"
        );
        assert!(
            graph.dependencies(configure).is_empty(),
            "a refused edge is not added"
        );

        let error = graph.add_dependency(link, link).unwrap_err();
        assert_eq!(error.to_string(), "dependency cycle: link -> link");

        let error = graph.add_dependency(link, JobId(9)).unwrap_err();
        assert_eq!(
            error.to_string(),
            "job 9 does not exist in this graph of 4 jobs"
        );

        let order = start_order(graph);
        assert_eq!(order, ["configure", "fetch", "compile", "link"]);
    }

    #[test]
    #[should_panic(expected = "job 5 is not a job of this graph of 1 jobs")]
    fn add_rejects_a_foreign_id() {
        let mut graph = Graph::new();
        graph.add((), 1, &[]);
        graph.add((), 1, &[JobId(5)]);
    }

    mod random_graphs {
        use super::*;
        use proptest::prelude::*;
        use proptest::sample::Index;

        #[derive(Debug, Clone)]
        struct Spec {
            cost: u64,
            dependencies: Vec<Index>,
            fails: bool,
        }

        fn specs() -> impl Strategy<Value = Vec<Spec>> {
            let spec = (
                0_u64..50,
                prop::collection::vec(any::<Index>(), 0..4),
                prop::bool::weighted(0.1),
            )
                .prop_map(|(cost, dependencies, fails)| Spec {
                    cost,
                    dependencies,
                    fails,
                });
            prop::collection::vec(spec, 1..40)
        }

        fn output(id: usize, inputs: &[&u64]) -> u64 {
            let mut hasher = DefaultHasher::new();
            id.hash(&mut hasher);
            inputs.hash(&mut hasher);
            hasher.finish()
        }

        /// The dependencies of job `index`: indexes into the jobs before it.
        fn dependencies(specs: &[Spec], index: usize) -> Vec<usize> {
            if index == 0 {
                return Vec::new();
            }
            specs[index]
                .dependencies
                .iter()
                .map(|choice| choice.index(index))
                .collect()
        }

        /// The serial oracle: job by job in id order, which is a topological order here.
        fn serial(specs: &[Spec]) -> Vec<Outcome<u64, usize>> {
            let mut outcomes: Vec<Outcome<u64, usize>> = Vec::new();
            for index in 0..specs.len() {
                let dependencies = dependencies(specs, index);
                let blocked =
                    dependencies
                        .iter()
                        .find_map(|dependency| match &outcomes[*dependency] {
                            Outcome::Failed(_) => Some(JobId(*dependency)),
                            Outcome::Skipped { failed } => Some(*failed),
                            _ => None,
                        });
                let outcome = if let Some(failed) = blocked {
                    Outcome::Skipped { failed }
                } else if specs[index].fails {
                    Outcome::Failed(index)
                } else {
                    let inputs: Vec<&u64> = dependencies
                        .iter()
                        .filter_map(|dependency| outcomes[*dependency].output())
                        .collect();
                    Outcome::Done(output(index, &inputs))
                };
                outcomes.push(outcome);
            }
            outcomes
        }

        fn ancestors(specs: &[Spec], index: usize) -> Vec<bool> {
            let mut seen = vec![false; specs.len()];
            let mut stack = dependencies(specs, index);
            while let Some(next) = stack.pop() {
                if !seen[next] {
                    seen[next] = true;
                    stack.extend(dependencies(specs, next));
                }
            }
            seen
        }

        proptest! {
            #![proptest_config(ProptestConfig {
                cases: 96,
                failure_persistence: None,
                ..ProptestConfig::default()
            })]

            #[test]
            fn a_parallel_run_matches_the_serial_oracle(specs in specs(), jobs in 1_usize..5) {
                let mut graph = Graph::new();
                let mut ids = Vec::new();
                for index in 0..specs.len() {
                    let dependencies: Vec<JobId> =
                        dependencies(&specs, index).into_iter().map(|dependency| ids[dependency]).collect();
                    ids.push(graph.add(index, specs[index].cost, &dependencies));
                }
                let calls: Vec<AtomicUsize> = specs.iter().map(|_| AtomicUsize::new(0)).collect();
                let finished: Vec<AtomicBool> = specs.iter().map(|_| AtomicBool::new(false)).collect();
                let early_starts = AtomicUsize::new(0);
                let report = run(graph, jobs, &CancelToken::new(), |job: &usize, inputs: &[&u64]| {
                    calls[*job].fetch_add(1, Ordering::SeqCst);
                    if dependencies(&specs, *job).iter().any(|dependency| !finished[*dependency].load(Ordering::SeqCst)) {
                        early_starts.fetch_add(1, Ordering::SeqCst);
                    }
                    thread::yield_now();
                    let result = if specs[*job].fails { Err(*job) } else { Ok(output(*job, inputs)) };
                    finished[*job].store(true, Ordering::SeqCst);
                    result
                });

                prop_assert_eq!(early_starts.load(Ordering::SeqCst), 0, "a job started before its dependencies were done");
                let expected = serial(&specs);
                for (index, (outcome, expected)) in report.outcomes().iter().zip(&expected).enumerate() {
                    let ran = calls[index].load(Ordering::SeqCst);
                    match (outcome, expected) {
                        (Outcome::Skipped { failed }, Outcome::Skipped { .. }) => {
                            // Which failure reaches a job first depends on timing; it must be
                            // a failed ancestor.
                            prop_assert!(ancestors(&specs, index)[failed.index()]);
                            prop_assert!(specs[failed.index()].fails);
                            prop_assert_eq!(ran, 0, "skipped job {} ran", index);
                        }
                        _ => {
                            prop_assert_eq!(outcome, expected, "job {}", index);
                            prop_assert_eq!(ran, 1, "job {} ran {} times", index, ran);
                        }
                    }
                }
                prop_assert_eq!(report.outcomes().len(), specs.len());
            }
        }
    }
}
