//! Expansion: images × platforms × matrix values → a graph of (stage × platform) nodes.
//!
//! # Overview
//!
//! For every selected image, every combination of its matrix values and every platform it is
//! built for, the expander walks the image's stage and, recursively, the stages it builds on
//! (`from`) and copies from (`copy from=`). Each visit substitutes the stage's strings with the
//! variables in scope *for that platform*, tracks the image settings (env, workdir, user…)
//! statically, and chains a [cache key](crate::key) through the stage's steps.
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
//! automatic platform args. Strings in `run` commands are substituted in shell mode: a name
//! graphbuild does not know is left for the shell (`$HOME`, `$i`, `$(…)`). Other strings also
//! see the `env` values set so far, like Dockerfile instructions do.
//!
//! # The run environment
//!
//! A `run` sees the image env, the stage's declared args and the automatic args. A stage with an
//! explicit `platform` (usually `$BUILDPLATFORM`) sees only the `BUILD*` args in its environment
//! unless it declares a `TARGET*` arg with `arg TARGETARCH`: otherwise every target would see a
//! different environment and the stage could never be shared between targets. Substituting
//! `${TARGETARCH}` into a command works everywhere, and makes that step per-target.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use graphbuild_lang::ir::{
    self, Command, FromSource, Loc, PlatformSpec, Project, Stage, StepKind, Text,
};
use graphbuild_lang::platform::Platform;
use graphbuild_lang::subst::{self, Mode};
use graphbuild_lang::{Diagnostic, Diagnostics};
use petgraph::graph::DiGraph;
use serde::Serialize;

use crate::context::{self, Context, CopyItem};
use crate::digest::Key;
use crate::key::KeyBuilder;
use crate::resolve::{ResolvedBase, Resolver};
use crate::state::{DEFAULT_PATH, HealthcheckSettings, ImageSettings};
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

/// The expanded graph.
#[derive(Debug)]
pub struct Plan {
    pub nodes: Vec<Node>,
    pub images: Vec<ImagePlan>,
    pub graph: DiGraph<usize, ()>,
    pub context_dir: PathBuf,
    pub warnings: Vec<Diagnostic>,
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
    pub key: Key,
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
}

#[derive(Debug)]
pub struct StepPlan {
    pub key: Key,
    pub op: Op,
    /// Human description, also the image history's `created_by`.
    pub description: String,
    pub at: Loc,
    /// What went into the key, in readable form, for `plan --explain`.
    pub inputs: StepInputs,
}

/// The inputs of a step's key that a person can recognize.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StepInputs {
    /// Variables the step's strings read, with their values.
    pub vars: BTreeMap<String, String>,
    /// Context files a copy selects (path → content digest and mode), or the stage it copies from.
    pub files: BTreeMap<String, String>,
    /// The node's base: an image reference and digest, a stage, or scratch.
    pub base: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Op {
    Run(RunOp),
    Copy(CopyOp),
    /// A metadata step: it changes settings, never the filesystem.
    Config,
}

impl Op {
    pub fn touches_filesystem(&self) -> bool {
        !matches!(self, Op::Config)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RunOp {
    pub argv: Vec<String>,
    /// Sorted by name.
    pub env: Vec<(String, String)>,
    pub workdir: String,
    pub user: String,
    pub cache_mounts: Vec<CacheMountOp>,
    pub secrets: Vec<SecretOp>,
    pub network_none: bool,
    /// `insecure=#true`: every capability, no seccomp filter. In the key only when set, so
    /// the keys of ordinary steps do not change.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
    /// `timeout="…"` in milliseconds. Not in the key: it does not change what a step makes.
    #[serde(skip)]
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CacheMountOp {
    pub id: String,
    pub target: String,
}

/// A secret's id and where it goes; never its value.
#[derive(Debug, Clone, Serialize)]
pub struct SecretOp {
    pub id: String,
    pub target: Option<String>,
    pub env: Option<String>,
    pub required: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct CopyOp {
    pub sources: Vec<String>,
    pub dest: String,
    pub workdir: String,
    pub chown: Option<String>,
    pub chmod: Option<u32>,
    pub from: CopySource,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CopySource {
    /// Files selected from the build context at plan time.
    Context {
        #[serde(skip)]
        items: Vec<CopyItem>,
    },
    /// Another node's filesystem. The node's *key* enters the step key; its index in this
    /// plan must not, since indexes differ between plans of the same inputs.
    Node {
        #[serde(skip)]
        node: usize,
    },
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
    pub push: bool,
    pub at: Loc,
}

/// Expand a project. Every problem found is returned at once.
pub fn expand(project: &Project, options: &PlanOptions<'_>) -> Result<Plan, Diagnostics> {
    let context_dir = options
        .context_dir
        .clone()
        .unwrap_or_else(|| project.root_dir.clone());
    // Absolute, so sandboxes (which change directory) and records see one stable path.
    let context_dir = std::fs::canonicalize(&context_dir).unwrap_or(context_dir);
    let mut expander = Expander {
        project,
        options,
        context_dir: context_dir.clone(),
        context: None,
        stages: project
            .stages
            .iter()
            .map(|stage| (stage.name.as_str(), stage))
            .collect(),
        nodes: Vec::new(),
        by_key: HashMap::new(),
        memo: HashMap::new(),
        errors: Vec::new(),
        reported: std::collections::HashSet::new(),
    };
    let images = expander.images();
    if !expander.errors.is_empty() {
        return Err(Diagnostics(expander.errors));
    }
    let mut graph = DiGraph::new();
    let indices: Vec<_> = expander
        .nodes
        .iter()
        .map(|node| graph.add_node(node.id))
        .collect();
    for node in &expander.nodes {
        for dep in &node.deps {
            graph.add_edge(indices[*dep], indices[node.id], ());
        }
    }
    Ok(Plan {
        nodes: expander.nodes,
        images,
        graph,
        context_dir,
        warnings: Vec::new(),
    })
}

struct Expander<'a> {
    project: &'a Project,
    options: &'a PlanOptions<'a>,
    context_dir: PathBuf,
    context: Option<Result<Context, String>>,
    stages: HashMap<&'a str, &'a Stage>,
    nodes: Vec<Node>,
    by_key: HashMap<Key, usize>,
    /// (stage, target, matrix) → node, so shared stages are expanded once.
    memo: HashMap<MemoKey, Option<usize>>,
    errors: Vec<Diagnostic>,
    /// (location, message) pairs already reported, so a problem in a stage shared by several
    /// platforms is reported once.
    reported: std::collections::HashSet<(u32, usize, String)>,
}

/// A stage expanded for a target platform and matrix values.
type MemoKey = (String, Platform, Vec<(String, String)>);

/// Variables visible while expanding one stage for one target.
struct Vars {
    /// Names read (and their values) since the last [`Vars::take_reads`], for `plan --explain`.
    reads: std::cell::RefCell<BTreeMap<String, String>>,
    /// Declared in the stage so far, with values.
    stage_args: Vec<(String, String)>,
    params: Vec<(String, String)>,
    matrix: Vec<(String, String)>,
    globals: Vec<(String, String)>,
    automatic: Vec<(String, String)>,
}

impl Vars {
    fn new(
        matrix: Vec<(String, String)>,
        globals: Vec<(String, String)>,
        automatic: Vec<(String, String)>,
    ) -> Vars {
        Vars {
            reads: Default::default(),
            stage_args: Vec::new(),
            params: Vec::new(),
            matrix,
            globals,
            automatic,
        }
    }

    fn lookup(&self, name: &str) -> Option<String> {
        let value = [
            &self.stage_args,
            &self.params,
            &self.matrix,
            &self.globals,
            &self.automatic,
        ]
        .into_iter()
        .find_map(|list| {
            list.iter()
                .rev()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.clone())
        });
        if let Some(value) = &value {
            self.reads
                .borrow_mut()
                .insert(name.to_string(), value.clone());
        }
        value
    }

    fn take_reads(&self) -> BTreeMap<String, String> {
        std::mem::take(&mut *self.reads.borrow_mut())
    }
}

fn automatic_args(target: &Platform, host: &Platform) -> Vec<(String, String)> {
    target
        .automatic_args("TARGET")
        .into_iter()
        .chain(host.automatic_args("BUILD"))
        .collect()
}

impl<'a> Expander<'a> {
    fn error(&mut self, at: Loc, code: &str, message: String, label: &str, help: Option<String>) {
        let id = (at.file.0, at.span.offset(), message.clone());
        if !self.reported.insert(id) {
            return;
        }
        let mut diagnostic =
            Diagnostic::error(code, message).with_label(&self.project.sources, at, label);
        if let Some(help) = help {
            diagnostic = diagnostic.with_help(help);
        }
        self.errors.push(diagnostic);
    }

    fn substitute(
        &mut self,
        text: &Text,
        mode: Mode,
        vars: &Vars,
        env: Option<&ImageSettings>,
    ) -> String {
        let mut lookup = |name: &str| {
            vars.lookup(name)
                .or_else(|| env.and_then(|settings| settings.env_value(name).map(str::to_string)))
        };
        match subst::substitute(&text.raw, mode, &mut lookup) {
            Ok(substituted) => substituted.value,
            Err(error) => {
                self.error(
                    text.at,
                    "graphbuild::substitution",
                    error.to_string(),
                    "here",
                    None,
                );
                text.raw.clone()
            }
        }
    }

    /// `KEY=value` pairs of an image (labels, annotations), substituted.
    fn substitute_pairs(
        &mut self,
        pairs: &[(String, Text)],
        vars: &Vars,
    ) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| {
                (
                    key.clone(),
                    self.substitute(value, Mode::Strict, vars, None),
                )
            })
            .collect()
    }

    /// Global args for one target and matrix combination, in declaration order.
    fn globals(&mut self, target: &Platform, matrix: &[(String, String)]) -> Vec<(String, String)> {
        let mut vars = Vars::new(
            matrix.to_vec(),
            Vec::new(),
            automatic_args(target, &self.options.host),
        );
        for arg in &self.project.args {
            let value = match (self.options.args.get(&arg.name), &arg.default) {
                (Some(value), _) => value.clone(),
                (None, Some(default)) => self.substitute(default, Mode::Strict, &vars, None),
                (None, None) => String::new(),
            };
            vars.globals.push((arg.name.clone(), value));
        }
        vars.globals
    }

    fn parse_platform(&mut self, spec: &PlatformSpec, vars: &Vars) -> Option<Platform> {
        match spec {
            PlatformSpec::Literal(platform, _) => Some(platform.clone()),
            PlatformSpec::Dynamic(text) => {
                let value = self.substitute(text, Mode::Strict, vars, None);
                match Platform::parse(&value) {
                    Ok(platform) => Some(platform),
                    Err(error) => {
                        self.error(
                            text.at,
                            "graphbuild::platform",
                            format!("`{}` is not a valid platform: {error}", value),
                            "this platform",
                            Some("write a platform as OS/ARCH[/VARIANT], for example \"linux/arm64\" or \"linux/arm/v7\"".into()),
                        );
                        None
                    }
                }
            }
        }
    }

    fn images(&mut self) -> Vec<ImagePlan> {
        let host = self.options.host.clone();
        let mut plans = Vec::new();
        let mut matched = vec![false; self.options.images.len()];
        let project = self.project;
        for image in &project.images {
            for matrix in matrix_combinations(&image.matrix, self) {
                let globals = self.globals(&host, &matrix);
                let vars = Vars::new(
                    matrix.clone(),
                    globals,
                    host.automatic_args("BUILD").into_iter().collect(),
                );
                let name = self.substitute(&image.name, Mode::Strict, &vars, None);
                if !self.options.images.is_empty() {
                    let mut selected = false;
                    for (index, wanted) in self.options.images.iter().enumerate() {
                        if *wanted == name || *wanted == image.name.raw {
                            matched[index] = true;
                            selected = true;
                        }
                    }
                    if !selected {
                        continue;
                    }
                }
                let platforms: Vec<Platform> = if !self.options.platforms.is_empty() {
                    self.options.platforms.clone()
                } else {
                    let specs = image.platforms.as_ref().unwrap_or(&project.platforms);
                    if specs.is_empty() {
                        vec![host.clone()]
                    } else {
                        specs
                            .iter()
                            .filter_map(|spec| self.parse_platform(spec, &vars))
                            .collect()
                    }
                };
                let mut plan = ImagePlan {
                    name,
                    tags: image
                        .tags
                        .iter()
                        .map(|tag| self.substitute(tag, Mode::Strict, &vars, None))
                        .collect(),
                    platforms: Vec::new(),
                    annotations: self.substitute_pairs(&image.annotations, &vars),
                    labels: self.substitute_pairs(&image.labels, &vars),
                    output: image.output.as_ref().map(|output| {
                        project
                            .root_dir
                            .join(self.substitute(output, Mode::Strict, &vars, None))
                    }),
                    push: image.push,
                    at: image.at,
                };
                let Some(stage) = self.stages.get(image.stage.as_str()).copied() else {
                    self.error(
                        image.stage_at,
                        "graphbuild::unknown-stage",
                        format!("unknown stage `{}`", image.stage),
                        "not a stage",
                        None,
                    );
                    continue;
                };
                for platform in platforms {
                    if plan
                        .platforms
                        .iter()
                        .any(|(existing, _)| *existing == platform)
                    {
                        continue;
                    }
                    let mut stack = Vec::new();
                    if let Some(node) = self.node_for(stage, &platform, &matrix, &mut stack) {
                        plan.platforms.push((platform, node));
                    }
                }
                plans.push(plan);
            }
        }
        for (index, wanted) in self.options.images.iter().enumerate() {
            if !matched[index] {
                let names: Vec<&str> = project
                    .images
                    .iter()
                    .map(|image| image.name.raw.as_str())
                    .collect();
                self.errors.push(
                    Diagnostic::error(
                        "graphbuild::unknown-image",
                        format!("no image named `{wanted}` in the build file"),
                    )
                    .with_help(format!(
                        "the images are: {}",
                        if names.is_empty() {
                            "(none)".to_string()
                        } else {
                            names.join(", ")
                        }
                    )),
                );
            }
        }
        plans
    }

    fn context(&mut self) -> Result<&Context, String> {
        if self.context.is_none() {
            let scanned = Context::scan(&self.context_dir, self.options.store)
                .map_err(|error| error.to_string());
            self.context = Some(scanned);
        }
        match self.context.as_ref() {
            Some(Ok(context)) => Ok(context),
            Some(Err(error)) => Err(error.clone()),
            None => Err("the build context was not scanned".into()),
        }
    }

    /// The node that builds `stage` for `target`; `None` after reporting an error.
    fn node_for(
        &mut self,
        stage: &'a Stage,
        target: &Platform,
        matrix: &[(String, String)],
        stack: &mut Vec<String>,
    ) -> Option<usize> {
        let memo_key = (stage.name.clone(), target.clone(), matrix.to_vec());
        if let Some(known) = self.memo.get(&memo_key) {
            return *known;
        }
        if let Some(position) = stack.iter().position(|name| *name == stage.name) {
            let mut cycle = stack[position..].to_vec();
            cycle.push(stage.name.clone());
            self.error(
                stage.at,
                "graphbuild::cycle",
                format!(
                    "stages depend on each other in a cycle: {}",
                    cycle.join(" → ")
                ),
                "this stage is part of the cycle",
                Some(
                    "a stage cannot build on or copy from itself, directly or through other stages"
                        .into(),
                ),
            );
            return None;
        }
        stack.push(stage.name.clone());
        let node = self.expand_stage(stage, target, matrix, stack);
        stack.pop();
        self.memo.insert(memo_key, node);
        node
    }

    fn expand_stage(
        &mut self,
        stage: &'a Stage,
        target: &Platform,
        matrix: &[(String, String)],
        stack: &mut Vec<String>,
    ) -> Option<usize> {
        let host = self.options.host.clone();
        let globals = self.globals(target, matrix);
        let mut vars = Vars::new(matrix.to_vec(), globals, automatic_args(target, &host));
        if let Some(scope) = stage.scope {
            let bindings = self.project.scopes[scope.0 as usize].bindings.clone();
            for (name, value) in &bindings {
                let value = self.substitute(value, Mode::Strict, &vars, None);
                vars.params.push((name.clone(), value));
            }
        }
        let platform = match &stage.platform {
            Some(spec) => self.parse_platform(spec, &vars)?,
            None => target.clone(),
        };
        let pinned = stage.platform.is_some();

        // The base: another node, an image, or nothing.
        let mut deps = Vec::new();
        let (base, mut settings, mut key) = match &stage.from.source {
            FromSource::Scratch => (
                Base::Scratch,
                ImageSettings::default(),
                root_key("scratch", &platform, None),
            ),
            FromSource::Stage(name) => {
                let base_stage = self.stages.get(name.as_str()).copied()?;
                let id = self.node_for(base_stage, &platform, matrix, stack)?;
                deps.push(id);
                let key = root_key("stage", &platform, Some(&self.nodes[id].key.0));
                (Base::Stage(id), self.nodes[id].settings.clone(), key)
            }
            FromSource::Image(text) => {
                let reference = self.substitute(text, Mode::Strict, &vars, None);
                if reference == "scratch" {
                    (
                        Base::Scratch,
                        ImageSettings::default(),
                        root_key("scratch", &platform, None),
                    )
                } else if let Some(base_stage) = self.stages.get(reference.as_str()).copied() {
                    let id = self.node_for(base_stage, &platform, matrix, stack)?;
                    deps.push(id);
                    let key = root_key("stage", &platform, Some(&self.nodes[id].key.0));
                    (Base::Stage(id), self.nodes[id].settings.clone(), key)
                } else {
                    let resolved = match self.options.resolver.resolve(&reference, &platform) {
                        Ok(resolved) => resolved,
                        Err(error) => {
                            let help = error.help();
                            self.error(
                                text.at,
                                error.code(),
                                error.to_string(),
                                "this base image",
                                Some(help),
                            );
                            return None;
                        }
                    };
                    let key = root_key("image", &platform, Some(&resolved.manifest_digest.0));
                    (
                        Base::Image(resolved.clone()),
                        resolved.settings.clone(),
                        key,
                    )
                }
            }
        };

        let base_description = match &base {
            Base::Scratch => "scratch".to_string(),
            Base::Stage(id) => format!(
                "stage {} ({})",
                self.nodes[*id].stage,
                self.nodes[*id].key.short()
            ),
            Base::Image(image) => format!("{} ({})", image.reference, image.manifest_digest),
        };
        let mut steps = Vec::new();
        vars.take_reads();
        for step in &stage.steps {
            if step.when.as_ref().is_some_and(|when| when != target) {
                continue;
            }
            let (op, description) = match &step.kind {
                StepKind::Run(run) => {
                    let Some(op) = self.run_op(run, &vars, &settings, pinned) else {
                        continue;
                    };
                    let description = format!("RUN {}", op.argv.join(" "));
                    (Op::Run(op), description)
                }
                StepKind::Copy(copy) => {
                    let Some((op, dep)) =
                        self.copy_op(copy, step.at, &vars, &settings, target, matrix, stack)
                    else {
                        continue;
                    };
                    if let Some(dep) = dep
                        && !deps.contains(&dep)
                    {
                        deps.push(dep);
                    }
                    let description = format!("COPY {} {}", op.sources.join(" "), op.dest);
                    (Op::Copy(op), description)
                }
                kind => {
                    let Some(description) =
                        self.apply_config(kind, step.at, &mut vars, &mut settings)
                    else {
                        continue;
                    };
                    (Op::Config, description)
                }
            };
            let mut builder = KeyBuilder::new("step");
            builder.key(&key).json(&op).str(&description);
            if let Op::Copy(CopyOp { from, .. }) = &op {
                match from {
                    CopySource::Context { items } => {
                        builder.bytes(&context::items_digest(items));
                    }
                    CopySource::Node { node } => {
                        builder.key(&self.nodes[*node].key);
                    }
                }
            }
            key = builder.finish();
            let files = match &op {
                Op::Copy(CopyOp {
                    from: CopySource::Context { items },
                    ..
                }) => items
                    .iter()
                    .filter_map(|item| match &item.kind {
                        context::ItemKind::File { digest, mode, .. } => Some((
                            item.rel_src.display().to_string(),
                            format!("{}:{mode:o}", hex::encode(digest)),
                        )),
                        context::ItemKind::Symlink { target } => Some((
                            item.rel_src.display().to_string(),
                            format!("-> {}", target.display()),
                        )),
                        context::ItemKind::Dir { .. } => None,
                    })
                    .collect(),
                Op::Copy(CopyOp {
                    from: CopySource::Node { node },
                    ..
                }) => BTreeMap::from([(
                    format!("stage {}", self.nodes[*node].stage),
                    self.nodes[*node].key.to_string(),
                )]),
                _ => BTreeMap::new(),
            };
            let inputs = StepInputs {
                vars: vars.take_reads(),
                files,
                base: base_description.clone(),
            };
            steps.push(StepPlan {
                key,
                op,
                description,
                at: step.at,
                inputs,
            });
        }

        if let Some(&existing) = self.by_key.get(&key) {
            let node = &mut self.nodes[existing];
            if !node.targets.contains(target) {
                node.targets.push(target.clone());
            }
            return Some(existing);
        }
        let id = self.nodes.len();
        self.by_key.insert(key, id);
        self.nodes.push(Node {
            id,
            stage: stage.name.clone(),
            platform,
            targets: vec![target.clone()],
            key,
            deps,
            base,
            steps,
            settings,
            at: stage.at,
        });
        Some(id)
    }

    fn command(
        &mut self,
        command: &Command,
        mode: Mode,
        vars: &Vars,
        settings: &ImageSettings,
    ) -> Vec<String> {
        match command {
            Command::Shell(text) => {
                let mut argv = settings.shell();
                argv.push(self.substitute(text, mode, vars, None));
                argv
            }
            Command::Exec(args) => args
                .iter()
                .map(|arg| self.substitute(arg, mode, vars, None))
                .collect(),
        }
    }

    fn run_op(
        &mut self,
        run: &ir::Run,
        vars: &Vars,
        settings: &ImageSettings,
        pinned: bool,
    ) -> Option<RunOp> {
        let argv = self.command(&run.command, Mode::Shell, vars, settings);
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in &vars.automatic {
            if !pinned || name.starts_with("BUILD") {
                env.insert(name.clone(), value.clone());
            }
        }
        for (name, value) in &vars.stage_args {
            env.insert(name.clone(), value.clone());
        }
        for (name, value) in &settings.env {
            env.insert(name.clone(), value.clone());
        }
        env.entry("PATH".into())
            .or_insert_with(|| DEFAULT_PATH.into());
        let cache_mounts = run
            .cache_mounts
            .iter()
            .map(|mount| {
                let target = self.substitute(&mount.target, Mode::Strict, vars, Some(settings));
                let id = match &mount.id {
                    Some(id) => self.substitute(id, Mode::Strict, vars, Some(settings)),
                    None => target.clone(),
                };
                CacheMountOp { id, target }
            })
            .collect();
        let secrets = run
            .secrets
            .iter()
            .map(|secret| SecretOp {
                id: secret.id.clone(),
                target: secret
                    .target
                    .as_ref()
                    .map(|target| self.substitute(target, Mode::Strict, vars, Some(settings))),
                env: secret.env.clone(),
                required: secret.required,
            })
            .collect();
        Some(RunOp {
            argv,
            env: env.into_iter().collect(),
            workdir: settings.workdir().to_string(),
            user: settings.user.clone(),
            cache_mounts,
            secrets,
            network_none: run.network == ir::Network::None,
            insecure: run.insecure,
            timeout_ms: run.timeout.as_ref().and_then(|text| {
                let value = self.substitute(text, Mode::Strict, vars, Some(settings));
                match parse_duration(&value) {
                    Some(ns) if ns >= 1_000_000 => Some(ns / 1_000_000),
                    _ => {
                        self.error(
                            text.at,
                            "graphbuild::duration",
                            format!("`{value}` is not a step timeout"),
                            "this duration",
                            Some("write durations like \"10m\", \"1h30m\" or \"30s\"".into()),
                        );
                        None
                    }
                }
            }),
        })
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "the expansion context of one step"
    )]
    fn copy_op(
        &mut self,
        copy: &ir::Copy,
        at: Loc,
        vars: &Vars,
        settings: &ImageSettings,
        target: &Platform,
        matrix: &[(String, String)],
        stack: &mut Vec<String>,
    ) -> Option<(CopyOp, Option<usize>)> {
        let sources: Vec<String> = copy
            .sources
            .iter()
            .map(|source| self.substitute(source, Mode::Strict, vars, Some(settings)))
            .collect();
        let dest = self.substitute(&copy.dest, Mode::Strict, vars, Some(settings));
        let chown = copy
            .chown
            .as_ref()
            .map(|chown| self.substitute(chown, Mode::Strict, vars, Some(settings)));
        let chmod = match &copy.chmod {
            None => None,
            Some(text) => {
                let value = self.substitute(text, Mode::Strict, vars, Some(settings));
                match u32::from_str_radix(value.trim_start_matches("0o"), 8) {
                    Ok(mode) if mode <= 0o7777 => Some(mode),
                    _ => {
                        self.error(
                            text.at,
                            "graphbuild::chmod",
                            format!("`{value}` is not an octal file mode"),
                            "this mode",
                            Some("write the mode in octal, for example chmod=\"0755\"".into()),
                        );
                        return None;
                    }
                }
            }
        };
        let (from, dep) = match &copy.from {
            None => {
                let selected = match self.context() {
                    Ok(context) => context.select(&sources).map_err(|error| error.to_string()),
                    Err(error) => Err(error),
                };
                match selected {
                    Ok(items) => (CopySource::Context { items }, None),
                    Err(error) => {
                        self.error(
                            at,
                            "graphbuild::copy",
                            error,
                            "this copy",
                            Some(format!(
                                "sources are relative to the build context `{}`",
                                self.context_dir.display()
                            )),
                        );
                        return None;
                    }
                }
            }
            Some(ir::CopyFrom::Stage(name, _)) => {
                let source_stage = self.stages.get(name.as_str()).copied()?;
                let id = self.node_for(source_stage, target, matrix, stack)?;
                (CopySource::Node { node: id }, Some(id))
            }
            Some(ir::CopyFrom::Image(text)) => {
                let reference = self.substitute(text, Mode::Strict, vars, Some(settings));
                let id = self.image_node(&reference, text.at, target)?;
                (CopySource::Node { node: id }, Some(id))
            }
        };
        Some((
            CopyOp {
                sources,
                dest,
                workdir: settings.workdir().to_string(),
                chown,
                chmod,
                from,
            },
            dep,
        ))
    }

    /// A node that is just an image, for `copy from="oci:…"`.
    fn image_node(&mut self, reference: &str, at: Loc, platform: &Platform) -> Option<usize> {
        if let Some(stage) = self.stages.get(reference).copied() {
            return self.node_for(stage, platform, &[], &mut Vec::new());
        }
        let resolved = match self.options.resolver.resolve(reference, platform) {
            Ok(resolved) => resolved,
            Err(error) => {
                let help = error.help();
                self.error(
                    at,
                    error.code(),
                    error.to_string(),
                    "this image",
                    Some(help),
                );
                return None;
            }
        };
        let key = root_key("image", platform, Some(&resolved.manifest_digest.0));
        if let Some(&existing) = self.by_key.get(&key) {
            return Some(existing);
        }
        let id = self.nodes.len();
        self.by_key.insert(key, id);
        self.nodes.push(Node {
            id,
            stage: reference.to_string(),
            platform: platform.clone(),
            targets: vec![platform.clone()],
            key,
            deps: Vec::new(),
            settings: resolved.settings.clone(),
            base: Base::Image(resolved),
            steps: Vec::new(),
            at,
        });
        Some(id)
    }

    /// Apply a metadata step to the settings; returns its history description.
    fn apply_config(
        &mut self,
        kind: &StepKind,
        at: Loc,
        vars: &mut Vars,
        settings: &mut ImageSettings,
    ) -> Option<String> {
        let description = match kind {
            StepKind::Env(pairs) => {
                let mut parts = Vec::new();
                for (name, value) in pairs {
                    let value = self.substitute(value, Mode::Strict, vars, Some(settings));
                    parts.push(format!("{name}={value}"));
                    settings.set_env(name, value);
                }
                format!("ENV {}", parts.join(" "))
            }
            StepKind::Arg(arg) => {
                let value = if let Some(value) = self.options.args.get(&arg.name) {
                    Some(value.clone())
                } else if let Some((_, value)) =
                    vars.globals.iter().find(|(name, _)| *name == arg.name)
                {
                    Some(value.clone())
                } else if let Some(default) = &arg.default {
                    Some(self.substitute(default, Mode::Strict, vars, Some(settings)))
                } else {
                    vars.automatic
                        .iter()
                        .find(|(name, _)| *name == arg.name)
                        .map(|(_, value)| value.clone())
                };
                match value {
                    Some(value) => {
                        let description = format!("ARG {}={}", arg.name, value);
                        vars.stage_args.push((arg.name.clone(), value));
                        description
                    }
                    None => format!("ARG {}", arg.name),
                }
            }
            StepKind::Workdir(text) => {
                let value = self.substitute(text, Mode::Strict, vars, Some(settings));
                settings.workdir = if value.starts_with('/') {
                    value
                } else {
                    format!("{}/{}", settings.workdir().trim_end_matches('/'), value)
                };
                format!("WORKDIR {}", settings.workdir)
            }
            StepKind::User(text) => {
                settings.user = self.substitute(text, Mode::Strict, vars, Some(settings));
                format!("USER {}", settings.user)
            }
            StepKind::Label(pairs) => {
                let mut parts = Vec::new();
                for (name, value) in pairs {
                    let value = self.substitute(value, Mode::Strict, vars, Some(settings));
                    parts.push(format!("{name}={value}"));
                    settings.labels.insert(name.clone(), value);
                }
                format!("LABEL {}", parts.join(" "))
            }
            StepKind::Expose(ports) => {
                let mut parts = Vec::new();
                for port in ports {
                    let value = self.substitute(port, Mode::Strict, vars, Some(settings));
                    let value = if value.contains('/') {
                        value
                    } else {
                        format!("{value}/tcp")
                    };
                    parts.push(value.clone());
                    settings.exposed_ports.insert(value);
                }
                format!("EXPOSE {}", parts.join(" "))
            }
            StepKind::Entrypoint(command) => {
                // Runtime commands: build args are substituted, anything else (`$HOME`, env
                // values) is left for the container's shell, as Docker does.
                let argv = self.command(command, Mode::Shell, vars, settings);
                let description = format!("ENTRYPOINT {argv:?}");
                settings.entrypoint = Some(argv);
                // Docker: setting an entrypoint resets a cmd inherited from the base image.
                settings.cmd = None;
                description
            }
            StepKind::Cmd(command) => {
                // Runtime commands: build args are substituted, anything else (`$HOME`, env
                // values) is left for the container's shell, as Docker does.
                let argv = self.command(command, Mode::Shell, vars, settings);
                let description = format!("CMD {argv:?}");
                settings.cmd = Some(argv);
                description
            }
            StepKind::Volume(paths) => {
                let mut parts = Vec::new();
                for path in paths {
                    let value = self.substitute(path, Mode::Strict, vars, Some(settings));
                    parts.push(value.clone());
                    settings.volumes.insert(value);
                }
                format!("VOLUME {}", parts.join(" "))
            }
            StepKind::Shell(args) => {
                settings.shell = args
                    .iter()
                    .map(|arg| self.substitute(arg, Mode::Strict, vars, Some(settings)))
                    .collect();
                format!("SHELL {:?}", settings.shell)
            }
            StepKind::StopSignal(text) => {
                let value = self.substitute(text, Mode::Strict, vars, Some(settings));
                let description = format!("STOPSIGNAL {value}");
                settings.stop_signal = Some(value);
                description
            }
            StepKind::Healthcheck(check) => {
                let test = match &check.test {
                    None => vec!["NONE".to_string()],
                    Some(Command::Shell(text)) => {
                        vec![
                            "CMD-SHELL".to_string(),
                            self.substitute(text, Mode::Shell, vars, None),
                        ]
                    }
                    Some(Command::Exec(args)) => std::iter::once("CMD".to_string())
                        .chain(
                            args.iter()
                                .map(|arg| self.substitute(arg, Mode::Shell, vars, None)),
                        )
                        .collect(),
                };
                let duration = |text: &Option<Text>, expander: &mut Self| -> Option<u64> {
                    let text = text.as_ref()?;
                    let value = expander.substitute(text, Mode::Strict, vars, Some(settings));
                    match parse_duration(&value) {
                        Some(ns) => Some(ns),
                        None => {
                            expander.error(
                                text.at,
                                "graphbuild::duration",
                                format!("`{value}` is not a duration"),
                                "this duration",
                                Some("write durations like \"30s\", \"1m30s\" or \"500ms\"".into()),
                            );
                            None
                        }
                    }
                };
                let healthcheck = HealthcheckSettings {
                    interval_ns: duration(&check.interval, self),
                    timeout_ns: duration(&check.timeout, self),
                    start_period_ns: duration(&check.start_period, self),
                    retries: check.retries,
                    test,
                };
                let description = format!("HEALTHCHECK {:?}", healthcheck.test);
                settings.healthcheck = Some(healthcheck);
                description
            }
            StepKind::Run(_) | StepKind::Copy(_) => {
                self.error(
                    at,
                    "graphbuild::internal",
                    "a filesystem step reached the metadata path".into(),
                    "here",
                    None,
                );
                return None;
            }
        };
        Some(description)
    }
}

fn root_key(kind: &str, platform: &Platform, parent: Option<&[u8; 32]>) -> Key {
    let mut builder = KeyBuilder::new("root");
    builder.str(kind).str(&platform.to_string());
    if let Some(parent) = parent {
        builder.bytes(parent);
    }
    builder.finish()
}

/// Every combination of matrix values (cartesian, first axis outermost).
fn matrix_combinations(
    axes: &[ir::MatrixAxis],
    expander: &mut Expander<'_>,
) -> Vec<Vec<(String, String)>> {
    let host = expander.options.host.clone();
    let mut combinations = vec![Vec::new()];
    for axis in axes {
        let globals = expander.globals(&host, &[]);
        let vars = Vars::new(Vec::new(), globals, Vec::new());
        let values: Vec<String> = axis
            .values
            .iter()
            .map(|value| expander.substitute(value, Mode::Strict, &vars, None))
            .collect();
        combinations = combinations
            .into_iter()
            .flat_map(|prefix: Vec<(String, String)>| {
                values.iter().map(move |value| {
                    let mut combination = prefix.clone();
                    combination.push((axis.key.clone(), value.clone()));
                    combination
                })
            })
            .collect();
    }
    combinations
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

    /// Nodes reachable from the selected images.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The directory copies read from.
    pub fn context_dir(&self) -> &Path {
        &self.context_dir
    }
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
