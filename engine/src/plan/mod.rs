//! Expansion: images × platforms × matrix values → a graph of (stage × platform) nodes.
//!
//! # Overview
//!
//! For every selected image, every combination of its matrix values and every platform it is
//! built for, the expander ([`expand`](self::expand())) walks the image's stage and the stages
//! it builds on (`from`) and copies from (`copy from=`). Each visit substitutes the stage's
//! strings with the variables in scope *for that platform*, tracks the image settings (env,
//! workdir, user…) statically, and turns every step into a typed [`Op`] that computes its own
//! cache key from its own data ([`op`]). The walk is iterative (an explicit work list, not the
//! call stack), so a chain of thousands of stages plans in linear time and constant stack.
//!
//! A node is identified by its final key. Two visits that produce the same key are the same
//! node: this is how a stage pinned to `$BUILDPLATFORM` that never reads a `TARGET*` variable
//! becomes one node shared by every target platform, and how two images that share a stage
//! share its node. Nothing else decides sharing: it follows from what the steps read.
//!
//! # Variables
//!
//! Lookup order for `$NAME`: the stage's own `arg`s declared so far, the template instance's
//! params, the image's matrix values, the global `arg`s (with `--arg` overrides), then the eight
//! automatic platform args. Strings other than commands also see the `env` values set so far,
//! like Dockerfile instructions do.
//!
//! # Commands and the run environment
//!
//! A `run` command is never substituted: build variables reach it as environment variables and
//! its shell expands them, as Docker passes `ARG`s to `RUN`. So a value is always data, never
//! shell source (`--arg 'X=";reboot;"'` prints literally). The environment holds the image env,
//! the stage's declared args, the automatic args the stage may see, and every build variable
//! the command references; all of it is in the step's key.
//!
//! A stage with an explicit `platform` (usually `$BUILDPLATFORM`) sees only the `BUILD*` args
//! unless it declares a `TARGET*` arg with `arg TARGETARCH` or its command references one:
//! otherwise every target would see a different environment and the stage could never be shared
//! between targets.
//!
//! Runtime commands (`cmd`, `entrypoint`, `healthcheck`) never run during a build; build
//! variables are substituted into them at plan time and anything else is left for the
//! container's shell.

pub mod annotation;
mod expand;
pub(crate) mod file_inputs;
pub mod op;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use graphbuild_lang::Diagnostics;
use graphbuild_lang::ir::{Loc, Project};
use graphbuild_lang::platform::Platform;
use serde::Serialize;

pub use op::{
    CacheMountOp, ConfigOp, CopyOp, CopySource, Op, OutputCheckOp, RunOp, SecretOp, TestOp,
};

use crate::digest::Key;
use crate::resolve::{ResolvedBase, Resolver, Unresolved};
use crate::state::ImageSettings;
use crate::store::Store;

/// What to expand.
pub struct PlanOptions<'a> {
    /// Image names to build (substituted names, or the name as written to select every matrix
    /// instance). Empty: all.
    pub images: Vec<String>,
    /// Replaces every image's platform list when not empty.
    pub platforms: Vec<Platform>,
    /// `--arg K=V` overrides.
    pub args: BTreeMap<String, String>,
    /// The platform graphbuild runs on (`BUILDPLATFORM`).
    pub host: Platform,
    /// The build context; defaults to the build file's directory.
    pub context_dir: Option<PathBuf>,
    pub resolver: &'a dyn Resolver,
    /// For the context stat cache.
    pub store: Option<&'a Store>,
}

/// The expanded graph: nodes in an order where each comes after the nodes it needs.
#[derive(Debug)]
pub struct Plan {
    pub nodes: Vec<Node>,
    pub images: Vec<ImagePlan>,
    /// One per (image × platform × test), each after its image's node.
    pub tests: Vec<TestPlan>,
    pub context_dir: PathBuf,
}

#[derive(Debug)]
pub struct Node {
    pub id: usize,
    /// The stage's name.
    pub stage: String,
    /// The platform the node's steps run on.
    pub platform: Platform,
    /// Target platforms this node is built for (several when shared).
    pub targets: Vec<Platform>,
    /// When [`Node::pending`], a placeholder that only tells pending nodes apart: never a
    /// cache key.
    pub key: Key,
    /// The key depends on an unresolved base image ([`Base::Unresolved`], here or in a node
    /// this one builds on or copies from): it is unknown until the base is resolved, and the
    /// node cannot be built.
    pub pending: bool,
    /// Nodes this one needs: its base stage and the stages it copies from.
    pub deps: Vec<usize>,
    pub base: Base,
    pub steps: Vec<StepPlan>,
    /// The image settings after the last step.
    pub settings: ImageSettings,
    pub at: Loc,
}

#[derive(Debug, Clone)]
pub enum Base {
    Scratch,
    Stage(usize),
    Image(Arc<ResolvedBase>),
    /// A registry image that could not be resolved without the network: the node is pending.
    Unresolved(Arc<Unresolved>),
}

#[derive(Debug)]
pub struct StepPlan {
    /// `op.key(parent)`: see [`op`]. A placeholder when [`StepPlan::pending`].
    pub key: Key,
    /// The key depends on an unresolved base image: the step's base, an earlier step or a
    /// stage it copies from is pending.
    pub pending: bool,
    pub op: Op,
    /// For people and the image history's `created_by`: derived from the op (for a `run`,
    /// its command with the values of its variables shown). Never part of a key.
    pub description: String,
    /// The statement in the build file, from the step's name through its last argument
    /// (`ir::Step::statement_at`): what a failure's diagnostic underlines.
    pub at: Loc,
    /// What went into the key, in readable form, for `plan --explain`.
    pub inputs: StepInputs,
}

/// The inputs of a step's key, as `plan --explain` records and compares them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StepInputs {
    /// The op's canonical encoding, as a JSON value: exactly what its key is computed from.
    #[serde(default)]
    pub op: serde_json::Value,
    /// Variables the step's strings read, with their values.
    pub vars: BTreeMap<String, String>,
    /// The stage a copy copies from (`stage NAME` → its key). The context files a copy
    /// selects are not repeated here: [`file_inputs::step_files`] lists them from the op's
    /// items, with these entries (records of older versions hold them here too).
    pub files: BTreeMap<String, String>,
    /// The node's base: an image reference and digest, a stage, or scratch.
    pub base: String,
}

#[derive(Debug)]
pub struct ImagePlan {
    pub name: String,
    pub tags: Vec<String>,
    /// Each platform and the node that builds it, in declared order.
    pub platforms: Vec<(Platform, usize)>,
    pub annotations: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub output: Option<PathBuf>,
    /// `output "type=…"`: an exporter for this image, buildx's CSV form as written (after
    /// substitution); its `dest` is relative to the build file's directory.
    pub export: Option<String>,
    pub push: bool,
    /// `strict-arch=#true`: a foreign ELF file fails the build.
    pub strict_arch: bool,
    /// `provenance=…` on the image: over `--provenance`.
    pub provenance: Option<graphbuild_lang::ir::ProvenanceSetting>,
    /// `sbom=#true` on the image.
    pub sbom: bool,
    pub at: Loc,
}

/// An image test for one platform: a node of the graph that runs after the image's node.
#[derive(Debug)]
pub struct TestPlan {
    /// Its index in [`Plan::tests`].
    pub id: usize,
    /// The image's name (substituted).
    pub image: String,
    pub name: String,
    /// The image's platform the test runs for.
    pub platform: Platform,
    /// The node whose filesystem and settings are the image for that platform.
    pub node: usize,
    /// `op.key(node key)`. A placeholder when [`TestPlan::pending`].
    pub key: Key,
    pub pending: bool,
    pub op: TestOp,
    /// The command, for people. Never part of a key.
    pub description: String,
    pub at: Loc,
    /// What went into the key, for `plan --explain`.
    pub inputs: StepInputs,
}

/// The timeout of an image test without `timeout` (or `--step-timeout`): ten minutes.
pub const DEFAULT_TEST_TIMEOUT_MS: u64 = 10 * 60 * 1000;

/// Expand a project. Every problem found is returned at once.
pub fn expand(project: &Project, options: &PlanOptions<'_>) -> Result<Plan, Diagnostics> {
    expand::expand(project, options)
}

/// Go-style durations: `1h2m3s`, `500ms`, `1.5s`.
pub fn parse_duration(text: &str) -> Option<u64> {
    let mut total: f64 = 0.0;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    if rest == "0" {
        return Some(0);
    }
    while !rest.is_empty() {
        let number_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let number: f64 = rest[..number_end].parse().ok()?;
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_end] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total += number * factor;
        rest = &rest[unit_end..];
    }
    Some(total as u64)
}

impl Plan {
    /// Nodes in an order where every node comes after its dependencies.
    /// Ties are broken by node id, so the order is stable and reads top-down.
    pub fn topological_order(&self) -> Vec<usize> {
        let mut remaining: Vec<usize> = self.nodes.iter().map(|node| node.deps.len()).collect();
        let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); self.nodes.len()];
        for node in &self.nodes {
            for dep in &node.deps {
                dependents[*dep].push(node.id);
            }
        }
        let mut ready: std::collections::BTreeSet<usize> = (0..self.nodes.len())
            .filter(|id| remaining[*id] == 0)
            .collect();
        let mut order = Vec::with_capacity(self.nodes.len());
        while let Some(id) = ready.pop_first() {
            order.push(id);
            for dependent in &dependents[id] {
                remaining[*dependent] -= 1;
                if remaining[*dependent] == 0 {
                    ready.insert(*dependent);
                }
            }
        }
        order
    }

    /// The directory copies read from.
    pub fn context_dir(&self) -> &Path {
        &self.context_dir
    }

    /// Every unresolved base image of the plan, and every `add` source that could not be had
    /// without the network, once per (reference, platform), in node order.
    pub fn unresolved(&self) -> Vec<&Unresolved> {
        let mut found: Vec<&Unresolved> = Vec::new();
        for node in &self.nodes {
            for base in node_unresolved(node) {
                if !found
                    .iter()
                    .any(|seen| seen.reference == base.reference && seen.platform == base.platform)
                {
                    found.push(base);
                }
            }
        }
        found
    }

    /// The unresolved bases a node's key waits for: its own, and those of the nodes it builds
    /// on or copies from, transitively.
    pub fn unresolved_under(&self, id: usize) -> Vec<&Unresolved> {
        let mut found: Vec<&Unresolved> = Vec::new();
        let mut seen = vec![false; self.nodes.len()];
        let mut stack = vec![id];
        while let Some(id) = stack.pop() {
            if std::mem::replace(&mut seen[id], true) || !self.nodes[id].pending {
                continue;
            }
            let node = &self.nodes[id];
            for base in node_unresolved(node) {
                if !found.iter().any(|known| {
                    known.reference == base.reference && known.platform == base.platform
                }) {
                    found.push(base);
                }
            }
            stack.extend(node.deps.iter().copied());
        }
        found
    }
}

/// A node's own unresolved base, then its `add` sources that are.
fn node_unresolved(node: &Node) -> impl Iterator<Item = &Unresolved> {
    let base = match &node.base {
        Base::Unresolved(base) => Some(&**base),
        _ => None,
    };
    base.into_iter()
        .chain(node.steps.iter().filter_map(|step| match &step.op {
            Op::Copy(copy) => copy.from.unresolved(),
            _ => None,
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("30s"), Some(30_000_000_000));
        assert_eq!(parse_duration("1m30s"), Some(90_000_000_000));
        assert_eq!(parse_duration("500ms"), Some(500_000_000));
        assert_eq!(parse_duration("1.5s"), Some(1_500_000_000));
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_duration("10"), None);
    }
}
