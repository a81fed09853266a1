//! The expander: walks images, platforms and matrix values into nodes. See the parent
//! module's docs for the rules; this file holds the walk.
//!
//! Long because the walk is one piece of state (the nodes found so far, the memo of visits and
//! the diagnostics) that every step kind reads and extends; the ops it produces and their keys
//! live in [`super::op`].

mod add;
mod bind;
mod image_tests;
mod ssh;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use graphbuild_lang::ir::{
    self, Command, FromSource, Loc, PlatformSpec, Project, Stage, StepKind, Text,
};
use graphbuild_lang::platform::Platform;
use graphbuild_lang::subst::{self, Mode};
use graphbuild_lang::{Code, Diagnostic, Diagnostics};

use super::op::{
    BindMountOp, CacheMountOp, ConfigOp, CopyOp, CopySource, Op, RunOp, SecretOp, TmpfsMountOp,
};
use super::{
    Base, ImagePlan, Node, Plan, PlanOptions, StepInputs, StepPlan, TestPlan, parse_duration,
};
use crate::context::{self, Context, ContextError};
use crate::copy::CopyError;
use crate::digest::Key;
use crate::key::KeyBuilder;
use crate::resolve::{ResolveError, Unresolved};
use crate::state::{DEFAULT_PATH, HealthcheckSettings, ImageSettings};

pub(super) fn expand(project: &Project, options: &PlanOptions<'_>) -> Result<Plan, Diagnostics> {
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
        reported: HashSet::new(),
        tests: Vec::new(),
        selections: HashMap::new(),
    };
    let images = expander.images();
    if !expander.errors.is_empty() {
        return Err(Diagnostics(expander.errors));
    }
    Ok(Plan {
        nodes: expander.nodes,
        images,
        tests: expander.tests,
        context_dir,
    })
}

/// Why a `copy` from the build context selects nothing to copy.
#[derive(Debug, thiserror::Error)]
enum SelectError {
    /// The context could not be scanned.
    #[error(transparent)]
    Scan(Arc<ContextError>),
    #[error(transparent)]
    Copy(CopyError),
}

struct Expander<'a> {
    project: &'a Project,
    options: &'a PlanOptions<'a>,
    context_dir: PathBuf,
    /// Scanned on first use; a scan that failed is reported at every context `copy`.
    context: Option<Result<Context, Arc<ContextError>>>,
    stages: HashMap<&'a str, &'a Stage>,
    nodes: Vec<Node>,
    by_key: HashMap<Key, usize>,
    /// Each visit's node (`None` after an error), so shared stages are expanded once.
    memo: HashMap<Visit, Option<usize>>,
    errors: Vec<Diagnostic>,
    /// (location, message) pairs already reported, so a problem in a stage shared by several
    /// platforms is reported once.
    reported: HashSet<(u32, usize, String)>,
    /// Image tests, in image and declaration order.
    tests: Vec<TestPlan>,
    /// Context selections made, by (sources, exclude patterns, `parents`) after substitution.
    selections: HashMap<(Vec<String>, Vec<String>, bool), Selection>,
}

/// A context selection: its items and their digest (hex).
type Selection = (Arc<Vec<context::CopyItem>>, String);

/// A stage expanded for a target platform and matrix values.
type Visit = (String, Platform, Vec<(String, String)>);

/// Where a stage's steps start: its base, the state and the variables in scope.
struct StageStart {
    platform: Platform,
    /// The stage has an explicit `platform`; see the module docs on the run environment.
    pinned: bool,
    vars: Vars,
    deps: Vec<usize>,
    key: Key,
    settings: ImageSettings,
    base_description: String,
    base: Base,
    /// The base is, or builds on, an unresolved image: every key from here on is pending.
    pending: bool,
}

/// A visit that needs another visit's node first: the walk expands that one and comes back.
struct Pending(Visit);

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
    /// Dockerfile scoping inside a stage: only args the stage declares are visible
    /// ([`ir::Project::docker_rules`]).
    stage_only: bool,
    /// The stage follows Dockerfile rules ([`ir::Stage::docker_rules`]).
    docker_rules: bool,
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
            stage_only: false,
            docker_rules: false,
        }
    }

    fn lookup(&self, name: &str) -> Option<String> {
        let all = [
            &self.stage_args,
            &self.params,
            &self.matrix,
            &self.globals,
            &self.automatic,
        ];
        // Dockerfile rules: only what the stage declares; its `arg`s take their values from
        // the params (an imported Dockerfile's global args) and the globals.
        let visible = if self.stage_only { &all[..1] } else { &all[..] };
        let value = visible.iter().find_map(|list| {
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
    fn error(&mut self, at: Loc, code: Code, message: String, label: &str, help: Option<String>) {
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
        let docker_rules = vars.docker_rules;
        let mut lookup = |name: &str| {
            let from_env = || env.and_then(|settings| settings.env_value(name).map(str::to_string));
            if docker_rules {
                // A Dockerfile's `ENV` wins over an `ARG` of the same name.
                from_env().or_else(|| vars.lookup(name))
            } else {
                vars.lookup(name).or_else(from_env)
            }
        };
        match subst::substitute(&text.raw, mode, &mut lookup) {
            Ok(substituted) => substituted.value,
            Err(error) => {
                self.error(text.at, Code::Substitution, error.to_string(), "here", None);
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
                            Code::Platform,
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

    /// The names `run` was asked for, groups replaced by their targets (which may be groups),
    /// in order and without repeats; the `default` group's when none were named and it exists.
    fn selected_names(&mut self) -> Vec<String> {
        let project = self.project;
        let asked: Vec<String> = if self.options.images.is_empty() {
            match project.groups.iter().find(|group| group.name == "default") {
                Some(group) => vec![group.name.clone()],
                None => return Vec::new(),
            }
        } else {
            self.options.images.clone()
        };
        let mut names = Vec::new();
        // (name, the groups it was reached through): a group inside itself is an error.
        let mut pending: Vec<(String, Vec<String>)> = asked
            .into_iter()
            .rev()
            .map(|name| (name, Vec::new()))
            .collect();
        while let Some((name, path)) = pending.pop() {
            let Some(group) = project.groups.iter().find(|group| group.name == name) else {
                if !names.contains(&name) {
                    names.push(name);
                }
                continue;
            };
            if path.contains(&name) {
                self.error(
                    group.at,
                    Code::Group,
                    format!(
                        "group `{name}` contains itself ({} → {name})",
                        path.join(" → ")
                    ),
                    "this group",
                    Some("remove the group from its own targets".into()),
                );
                continue;
            }
            let mut inner = path.clone();
            inner.push(name.clone());
            for target in group.targets.iter().rev() {
                pending.push((target.raw.clone(), inner.clone()));
            }
        }
        names
    }

    /// A stage named on the command line as a target (`--target` in Docker's terms): an
    /// image of that stage, named after it, on the default platforms, with no tags.
    fn stage_target(stage: &Stage) -> ir::Image {
        ir::Image {
            name: ir::Text {
                raw: stage.name.clone(),
                at: stage.at,
            },
            at: stage.at,
            stage: stage.name.clone(),
            stage_at: stage.at,
            tags: Vec::new(),
            platforms: None,
            matrix: Vec::new(),
            annotations: Vec::new(),
            labels: Vec::new(),
            output: None,
            push: false,
            strict_arch: false,
            provenance: None,
            sbom: false,
            tests: Vec::new(),
        }
    }

    fn images(&mut self) -> Vec<ImagePlan> {
        let host = self.options.host.clone();
        let mut plans = Vec::new();
        let wanted = self.selected_names();
        let mut matched = vec![false; wanted.len()];
        let project = self.project;
        // Names that are no image but a stage build that stage, as `docker build --target`.
        let image_names: Vec<&str> = project
            .images
            .iter()
            .map(|image| image.name.raw.as_str())
            .collect();
        let stage_targets: Vec<ir::Image> = wanted
            .iter()
            .filter(|name| !image_names.contains(&name.as_str()))
            .filter_map(|name| project.stages.iter().find(|stage| stage.name == *name))
            .map(Self::stage_target)
            .collect();
        for image in project.images.iter().chain(&stage_targets) {
            for matrix in matrix_combinations(&image.matrix, self) {
                let globals = self.globals(&host, &matrix);
                let vars = Vars::new(
                    matrix.clone(),
                    globals,
                    host.automatic_args("BUILD").into_iter().collect(),
                );
                let name = self.substitute(&image.name, Mode::Strict, &vars, None);
                if !wanted.is_empty() {
                    let mut selected = false;
                    for (index, wanted) in wanted.iter().enumerate() {
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
                let output = image
                    .output
                    .as_ref()
                    .map(|output| self.substitute(output, Mode::Strict, &vars, None));
                let mut plan = ImagePlan {
                    name,
                    tags: image
                        .tags
                        .iter()
                        .map(|tag| self.substitute(tag, Mode::Strict, &vars, None))
                        .collect(),
                    platforms: Vec::new(),
                    annotations: {
                        for (key, value) in &image.annotations {
                            if let Err(problem) = super::annotation::parse_key(key) {
                                self.error(
                                    value.at,
                                    Code::Annotation,
                                    format!("annotation `{key}`: {problem}"),
                                    "this annotation",
                                    Some("write KEY=VALUE, or TYPE:KEY=VALUE with TYPE one or more of index, manifest, manifest[OS/ARCH], index-descriptor, manifest-descriptor".into()),
                                );
                            }
                        }
                        self.substitute_pairs(&image.annotations, &vars)
                    },
                    labels: self.substitute_pairs(&image.labels, &vars),
                    output: output
                        .as_ref()
                        .filter(|output| !output.starts_with("type="))
                        .map(|output| project.root_dir.join(output)),
                    export: output.filter(|output| output.starts_with("type=")),
                    push: image.push,
                    strict_arch: image.strict_arch,
                    provenance: image.provenance,
                    sbom: image.sbom,
                    at: image.at,
                };
                let Some(stage) = self.stages.get(image.stage.as_str()).copied() else {
                    self.error(
                        image.stage_at,
                        Code::UnknownStage,
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
                    if let Some(node) = self.node_for(stage, &platform, &matrix) {
                        plan.platforms.push((platform, node));
                    }
                }
                self.image_tests(image, &plan, &matrix);
                plans.push(plan);
            }
        }
        for (index, wanted) in wanted.iter().enumerate() {
            if !matched[index] {
                let names: Vec<&str> = project
                    .images
                    .iter()
                    .map(|image| image.name.raw.as_str())
                    .collect();
                let groups: Vec<&str> = project
                    .groups
                    .iter()
                    .map(|group| group.name.as_str())
                    .collect();
                let list = |names: &[&str]| {
                    if names.is_empty() {
                        "(none)".to_string()
                    } else {
                        names.join(", ")
                    }
                };
                let mut help = format!("the images are: {}", list(&names));
                if !groups.is_empty() {
                    help.push_str(&format!("; the groups: {}", list(&groups)));
                }
                help.push_str("; a stage's name builds that stage");
                self.errors.push(
                    Diagnostic::error(
                        Code::UnknownImage,
                        format!("no image, group or stage named `{wanted}` in the build file"),
                    )
                    .with_help(help),
                );
            }
        }
        plans
    }

    fn context(&mut self) -> Result<&Context, Arc<ContextError>> {
        let (context_dir, store) = (&self.context_dir, self.options.store);
        self.context
            .get_or_insert_with(|| Context::scan(context_dir, store).map_err(Arc::new))
            .as_ref()
            .map_err(Arc::clone)
    }

    /// The node that builds `stage` for `target`; `None` after reporting an error.
    ///
    /// Iterative: a visit that needs a node not expanded yet returns [`Pending`]; the walk
    /// expands that one first and then visits again. A visit is retried at most once per
    /// dependency, so the work is linear in the size of the graph, and no chain of stages,
    /// however long, deepens the call stack.
    fn node_for(
        &mut self,
        stage: &'a Stage,
        target: &Platform,
        matrix: &[(String, String)],
    ) -> Option<usize> {
        let root: Visit = (stage.name.clone(), target.clone(), matrix.to_vec());
        let mut work = vec![root.clone()];
        // The visits in `work`, to find a cycle in constant time.
        let mut open: HashSet<Visit> = HashSet::from([root.clone()]);
        while let Some(visit) = work.last().cloned() {
            if self.memo.contains_key(&visit) {
                open.remove(&visit);
                work.pop();
                continue;
            }
            let stage = self.stages[visit.0.as_str()];
            match self.expand_stage(stage, &visit.1, &visit.2) {
                Ok(node) => {
                    self.memo.insert(visit.clone(), node);
                    open.remove(&visit);
                    work.pop();
                }
                Err(Pending(needed)) if open.contains(&needed) => {
                    let position = work.iter().position(|open| *open == needed).unwrap_or(0);
                    let mut cycle: Vec<String> = work[position..]
                        .iter()
                        .map(|visit| visit.0.clone())
                        .collect();
                    cycle.push(needed.0.clone());
                    let at = self.stages[needed.0.as_str()].at;
                    self.error(
                        at,
                        Code::Cycle,
                        format!(
                            "stages depend on each other in a cycle: {}",
                            cycle.join(" → ")
                        ),
                        "this stage is part of the cycle",
                        Some(
                            "a stage cannot build on or copy from itself, directly or through \
                             other stages"
                                .into(),
                        ),
                    );
                    self.memo.insert(visit.clone(), None);
                    open.remove(&visit);
                    work.pop();
                }
                Err(Pending(needed)) => {
                    open.insert(needed.clone());
                    work.push(needed);
                }
            }
        }
        self.memo.get(&root).copied().flatten()
    }

    /// The node of a visit this one depends on: known, or [`Pending`] until the walk has it.
    fn dependency(
        &self,
        stage: &str,
        platform: &Platform,
        matrix: &[(String, String)],
    ) -> Result<Option<usize>, Pending> {
        let visit: Visit = (stage.to_string(), platform.clone(), matrix.to_vec());
        match self.memo.get(&visit) {
            Some(node) => Ok(*node),
            None => Err(Pending(visit)),
        }
    }

    fn expand_stage(
        &mut self,
        stage: &'a Stage,
        target: &Platform,
        matrix: &[(String, String)],
    ) -> Result<Option<usize>, Pending> {
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
            Some(spec) => match self.parse_platform(spec, &vars) {
                Some(platform) => platform,
                None => return Ok(None),
            },
            None => target.clone(),
        };
        let pinned = stage.platform.is_some();

        // The base: another node, an image, or nothing.
        let mut deps = Vec::new();
        let base_stage = match &stage.from.source {
            FromSource::Scratch => None,
            FromSource::Stage(name) => Some(name.clone()),
            FromSource::Image(text) => {
                let reference = self.substitute(text, Mode::Strict, &vars, None);
                if reference == "scratch" || self.stages.contains_key(reference.as_str()) {
                    (reference != "scratch").then_some(reference)
                } else {
                    let resolved = match self.options.resolver.resolve(&reference, &platform) {
                        Ok(resolved) => resolved,
                        Err(ResolveError::Unresolved(unresolved)) => {
                            return self.expand_steps(
                                stage,
                                target,
                                matrix,
                                StageStart {
                                    key: unresolved_key(&unresolved),
                                    platform,
                                    pinned,
                                    vars,
                                    deps,
                                    settings: ImageSettings::default(),
                                    base_description: format!("{reference} (unresolved)"),
                                    base: Base::Unresolved(std::sync::Arc::from(unresolved)),
                                    pending: true,
                                },
                            );
                        }
                        Err(error) => {
                            let help = error.help();
                            self.error(
                                text.at,
                                error.code(),
                                error.to_string(),
                                "this base image",
                                Some(help),
                            );
                            return Ok(None);
                        }
                    };
                    let key = root_key("image", &platform, Some(&resolved.manifest_digest.0));
                    return self.expand_steps(
                        stage,
                        target,
                        matrix,
                        StageStart {
                            key,
                            platform,
                            pinned,
                            vars,
                            deps,
                            settings: resolved.settings.clone(),
                            base_description: format!(
                                "{} ({})",
                                resolved.reference, resolved.manifest_digest
                            ),
                            base: Base::Image(resolved),
                            pending: false,
                        },
                    );
                }
            }
        };
        let start = match base_stage {
            None => StageStart {
                key: root_key("scratch", &platform, None),
                platform: platform.clone(),
                pinned,
                vars,
                deps,
                settings: ImageSettings::default(),
                base_description: "scratch".to_string(),
                base: Base::Scratch,
                pending: false,
            },
            Some(name) => {
                let Some(id) = self.dependency(&name, &platform, matrix)? else {
                    return Ok(None);
                };
                deps.push(id);
                let base = &self.nodes[id];
                StageStart {
                    key: root_key("stage", &platform, Some(&base.key.0)),
                    settings: base.settings.clone(),
                    base_description: format!("stage {} ({})", base.stage, base.key.short()),
                    platform: platform.clone(),
                    pinned,
                    vars,
                    deps,
                    base: Base::Stage(id),
                    pending: base.pending,
                }
            }
        };
        self.expand_steps(stage, target, matrix, start)
    }

    /// The steps of a stage from its base on, then the node (an existing one when the final
    /// key is already known).
    fn expand_steps(
        &mut self,
        stage: &'a Stage,
        target: &Platform,
        matrix: &[(String, String)],
        start: StageStart,
    ) -> Result<Option<usize>, Pending> {
        let StageStart {
            platform,
            pinned,
            mut vars,
            mut deps,
            mut key,
            mut settings,
            base_description,
            base,
            mut pending,
        } = start;
        let mut steps = Vec::new();
        vars.docker_rules = stage.docker_rules;
        vars.stage_only = stage.docker_rules;
        vars.take_reads();
        for step in &stage.steps {
            if step.when.as_ref().is_some_and(|when| when != target) {
                continue;
            }
            let (op, description) = match &step.kind {
                StepKind::Run(run) => {
                    let (mut op, display) = self.run_op(run, &vars, &settings, pinned);
                    for (bind, dep) in self.stage_binds(run, &vars, &settings, target, matrix)? {
                        // Binding a pending node makes this step, and what follows, pending.
                        pending |= self.nodes[dep].pending;
                        if !deps.contains(&dep) {
                            deps.push(dep);
                        }
                        op.stage_binds.push(bind);
                    }
                    (Op::Run(op), format!("RUN {}", display.join(" ")))
                }
                StepKind::Copy(copy) => {
                    let Some((op, dep)) =
                        self.copy_op(copy, step.at, &vars, &settings, target, matrix)?
                    else {
                        continue;
                    };
                    if let Some(dep) = dep {
                        // Copying from a pending node makes this step, and what follows, pending.
                        pending |= self.nodes[dep].pending;
                        if !deps.contains(&dep) {
                            deps.push(dep);
                        }
                    }
                    let op = Op::Copy(op);
                    let description = op.describe();
                    (op, description)
                }
                StepKind::Add(add) => {
                    let Some((op, unresolved)) =
                        self.add_op(add, step.at, &vars, &settings, target, matrix)?
                    else {
                        continue;
                    };
                    // A source unknown without the network makes this step, and what follows,
                    // pending.
                    pending |= unresolved;
                    let op = Op::Copy(op);
                    let description = op.describe();
                    (op, description)
                }
                kind => {
                    let Some(config) = self.config_op(kind, step.at, &mut vars, &settings) else {
                        continue;
                    };
                    config.apply(&mut settings);
                    let op = Op::Config(config);
                    let description = op.describe();
                    (op, description)
                }
            };
            key = op.key(&key);
            // A copy's context files are read from its items when they are listed
            // (`file_inputs::step_files`), not kept here as a string pair per file.
            let files = match &op {
                Op::Copy(CopyOp {
                    from: CopySource::Node { node, key },
                    ..
                }) => BTreeMap::from([(
                    format!("stage {}", self.nodes[*node].stage),
                    key.to_string(),
                )]),
                _ => BTreeMap::new(),
            };
            let inputs = StepInputs {
                op: serde_json::from_slice(&op.canonical()).unwrap_or_default(),
                vars: vars.take_reads(),
                files,
                base: base_description.clone(),
            };
            steps.push(StepPlan {
                key,
                pending,
                op,
                description,
                at: step.statement_at(),
                inputs,
            });
        }

        if let Some(&existing) = self.by_key.get(&key) {
            let node = &mut self.nodes[existing];
            if !node.targets.contains(target) {
                node.targets.push(target.clone());
            }
            return Ok(Some(existing));
        }
        let id = self.nodes.len();
        self.by_key.insert(key, id);
        self.nodes.push(Node {
            id,
            stage: stage.name.clone(),
            platform,
            targets: vec![target.clone()],
            key,
            pending,
            deps,
            base,
            steps,
            settings,
            at: stage.at,
        });
        Ok(Some(id))
    }

    /// A command's argv with build variables substituted (shell mode: anything else is left
    /// for the shell).
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

    /// A runtime command (`cmd`, `entrypoint`): build variables substituted, and none of their
    /// values may bring shell syntax into the parts the container's shell will read. A
    /// Dockerfile's is kept as written, as Docker does.
    fn runtime_command(
        &mut self,
        command: &Command,
        vars: &Vars,
        settings: &ImageSettings,
    ) -> Vec<String> {
        if vars.docker_rules {
            return match command {
                Command::Shell(text) => {
                    let mut argv = settings.shell();
                    argv.push(text.raw.clone());
                    argv
                }
                Command::Exec(args) => args.iter().map(|arg| arg.raw.clone()).collect(),
            };
        }
        match command {
            Command::Shell(text) => {
                let mut argv = settings.shell();
                argv.push(self.shell_source(text, vars));
                argv
            }
            Command::Exec(args) => {
                let source = shell_source_index(args.iter().map(|arg| arg.raw.as_str()));
                args.iter()
                    .enumerate()
                    .map(|(index, arg)| {
                        if Some(index) == source {
                            self.shell_source(arg, vars)
                        } else {
                            self.substitute(arg, Mode::Shell, vars, None)
                        }
                    })
                    .collect()
            }
        }
    }

    /// Shell source of a runtime command, substituted. A build variable's value is spliced
    /// into the command the image will run, so a value with shell syntax (a `;`, a quote, a
    /// `$(…)`) would change what it runs: an `--arg` from CI could plant a command in the
    /// image. Such a value is refused; plain words (spaces included) are fine.
    fn shell_source(&mut self, text: &Text, vars: &Vars) -> String {
        if vars.docker_rules {
            // A Dockerfile's runtime commands are never substituted.
            return text.raw.clone();
        }
        let mut reads: Vec<(String, String)> = Vec::new();
        let mut lookup = |name: &str| {
            let value = vars.lookup(name);
            if let Some(value) = &value {
                reads.push((name.to_string(), value.clone()));
            }
            value
        };
        let value = match subst::substitute(&text.raw, Mode::Shell, &mut lookup) {
            Ok(substituted) => substituted.value,
            Err(error) => {
                self.error(text.at, Code::Substitution, error.to_string(), "here", None);
                return text.raw.clone();
            }
        };
        for (name, read) in reads {
            if let Some(syntax) = read.chars().find(|c| SHELL_SYNTAX.contains(*c)) {
                let shown: String = read.chars().take(60).collect();
                self.error(
                    text.at,
                    Code::SubstitutionUnsafeValue,
                    format!(
                        "`{name}` would change this runtime command: its value {shown:?} \
                         contains {syntax:?}, which the container's shell reads as syntax"
                    ),
                    "the image's command",
                    Some(format!(
                        "build variables are written into runtime commands when the graph is \
                         planned; pass the value as data instead: `env APP_{name}=\"${{{name}}}\"` \
                         on the stage, and `$APP_{name}` in the command (the container's shell \
                         expands it)"
                    )),
                );
            }
        }
        value
    }

    /// A `run` step, and its command with values shown (for people and the history).
    fn run_op(
        &mut self,
        run: &ir::Run,
        vars: &Vars,
        settings: &ImageSettings,
        pinned: bool,
    ) -> (RunOp, Vec<String>) {
        // Substituting only shows the values and learns which build variables the command
        // references; what runs is the command as written, with those variables in its
        // environment.
        let display = self.command(&run.command, Mode::Shell, vars, settings);
        let referenced = vars.reads.borrow().clone();
        let mut script = None;
        let argv = match &run.command {
            Command::Shell(text) if text.raw.starts_with("#!") => {
                match super::op::script_argv(&text.raw) {
                    Some(argv) => {
                        script = Some(text.raw.clone());
                        argv
                    }
                    None => {
                        self.error(
                            text.at,
                            Code::NodeMissingValue,
                            "the script's `#!` line names no interpreter".into(),
                            "this script",
                            Some(
                                "start the script with `#!/bin/sh` or `#!/usr/bin/env python3`"
                                    .into(),
                            ),
                        );
                        Vec::new()
                    }
                }
            }
            Command::Shell(text) => {
                let mut argv = settings.shell();
                argv.push(text.raw.clone());
                argv
            }
            Command::Exec(args) => args.iter().map(|arg| arg.raw.clone()).collect(),
        };
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in &vars.automatic {
            if !vars.stage_only && (!pinned || name.starts_with("BUILD")) {
                env.insert(name.clone(), value.clone());
            }
        }
        env.extend(referenced);
        for (name, value) in &vars.stage_args {
            env.insert(name.clone(), value.clone());
        }
        // The image env wins over a build variable of the same name, as `ENV` over `ARG`.
        for (name, value) in &settings.env {
            env.insert(name.clone(), value.clone());
        }
        env.entry("PATH".into())
            .or_insert_with(|| DEFAULT_PATH.into());
        let ssh_mounts = self.ssh_mounts(run, vars, settings, &mut env);
        let cache_mounts = run
            .cache_mounts
            .iter()
            .map(|mount| {
                let target = self.substitute(&mount.target, Mode::Strict, vars, Some(settings));
                let id = match &mount.id {
                    Some(id) => self.substitute(id, Mode::Strict, vars, Some(settings)),
                    None => target.clone(),
                };
                let mut number = |text: &Option<Text>, what: &str, radix: u32| {
                    let text = text.as_ref()?;
                    let value = self.substitute(text, Mode::Strict, vars, Some(settings));
                    match u32::from_str_radix(value.trim_start_matches("0o"), radix) {
                        Ok(number) if radix != 8 || number <= 0o7777 => Some(number),
                        _ => {
                            self.error(
                                text.at,
                                Code::RunCacheMount,
                                format!("`{value}` is not a cache mount {what}"),
                                "this value",
                                Some(if radix == 8 {
                                    "write the mode in octal, for example mode=\"0755\"".into()
                                } else {
                                    format!("write a numeric {what}, for example {what}=1000")
                                }),
                            );
                            None
                        }
                    }
                };
                let uid = number(&mount.uid, "uid", 10);
                let gid = number(&mount.gid, "gid", 10);
                let mode = number(&mount.mode, "mode", 8);
                CacheMountOp {
                    id,
                    target,
                    uid,
                    gid,
                    mode,
                    sharing: mount.sharing,
                }
            })
            .collect();
        let tmpfs_mounts = run
            .tmpfs_mounts
            .iter()
            .map(|mount| TmpfsMountOp {
                target: self.substitute(&mount.target, Mode::Strict, vars, Some(settings)),
                size: mount.size.as_ref().and_then(|text| {
                    let value = self.substitute(text, Mode::Strict, vars, Some(settings));
                    match crate::unpack::parse_size(&value) {
                        Some(size) if size > 0 => Some(size),
                        _ => {
                            self.error(
                                text.at,
                                Code::RunTmpfs,
                                format!("`{value}` is not a tmpfs size"),
                                "this size",
                                Some(
                                    "write sizes like \"64m\", \"1g\" or \"524288\" (bytes)".into(),
                                ),
                            );
                            None
                        }
                    }
                }),
            })
            .collect();
        let mut bind_mounts = Vec::new();
        // Binds from other nodes: see `stage_binds`.
        for mount in run.bind_mounts.iter().filter(|mount| mount.from.is_none()) {
            let target = self.substitute(&mount.target, Mode::Strict, vars, Some(settings));
            let source = self.substitute(&mount.source, Mode::Strict, vars, Some(settings));
            let selected = match self.context() {
                Ok(context) => context
                    .select(std::slice::from_ref(&source))
                    .map_err(|error| error.to_string()),
                Err(error) => Err(error.to_string()),
            };
            match selected {
                Ok(items) => {
                    let digest = hex::encode(context::items_digest(&items));
                    bind_mounts.push(BindMountOp {
                        target,
                        source,
                        items,
                        digest,
                    });
                }
                Err(error) => self.error(
                    mount.at,
                    Code::RunBind,
                    error,
                    "this bind mount",
                    Some(format!(
                        "a bind mount's source is a path in the build context `{}`",
                        self.context_dir.display()
                    )),
                ),
            }
        }
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
        let op = RunOp {
            argv,
            script,
            env: env.into_iter().collect(),
            workdir: settings.workdir().to_string(),
            user: settings.user.clone(),
            cache_mounts,
            tmpfs_mounts,
            bind_mounts,
            stage_binds: Vec::new(),
            ssh_mounts,
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
                            Code::Duration,
                            format!("`{value}` is not a step timeout"),
                            "this duration",
                            Some("write durations like \"10m\", \"1h30m\" or \"30s\"".into()),
                        );
                        None
                    }
                }
            }),
        };
        (op, display)
    }

    /// A `copy` step and the node it copies from, if any.
    fn copy_op(
        &mut self,
        copy: &ir::Copy,
        at: Loc,
        vars: &Vars,
        settings: &ImageSettings,
        target: &Platform,
        matrix: &[(String, String)],
    ) -> Result<Option<(CopyOp, Option<usize>)>, Pending> {
        let sources: Vec<String> = copy
            .sources
            .iter()
            .map(|source| self.substitute(source, Mode::Strict, vars, Some(settings)))
            .collect();
        let dest = self.substitute(&copy.dest, Mode::Strict, vars, Some(settings));
        // With --parents the destination is a directory, whatever it looks like.
        let dest = if copy.parents && !dest.ends_with('/') {
            format!("{dest}/")
        } else {
            dest
        };
        let chown = copy
            .chown
            .as_ref()
            .map(|chown| self.substitute(chown, Mode::Strict, vars, Some(settings)));
        let chmod = match &copy.chmod {
            None => None,
            Some(text) => {
                let value = self.substitute(text, Mode::Strict, vars, Some(settings));
                match graphbuild_lang::chmod::Chmod::parse(value.trim_start_matches("0o")) {
                    Ok(mode) => Some(crate::chmod::Chmod(mode)),
                    Err(reason) => {
                        self.error(
                            text.at,
                            Code::Chmod,
                            format!("`{value}` is not a file mode: {reason}"),
                            "this mode",
                            Some(
                                "write the mode in octal, for example chmod=\"0755\", or symbolically, for example chmod=\"u+x,g-w\""
                                    .into(),
                            ),
                        );
                        return Ok(None);
                    }
                }
            }
        };
        let exclude: Vec<String> = copy
            .exclude
            .iter()
            .map(|pattern| self.substitute(pattern, Mode::Strict, vars, Some(settings)))
            .collect();
        let excluder = if exclude.is_empty() {
            None
        } else {
            match crate::dockerignore::DockerIgnore::parse(&exclude.join("\n")) {
                Ok(excluder) => Some(excluder),
                Err(error) => {
                    self.error(
                        copy.exclude.first().map_or(at, |text| text.at),
                        Code::Copy,
                        format!("`exclude` pattern `{}`: {}", error.pattern, error.reason),
                        "this pattern",
                        Some(
                            "write .dockerignore patterns, such as \"*.md\" or \"**/test\"".into(),
                        ),
                    );
                    return Ok(None);
                }
            }
        };
        let (from, dep) = match &copy.from {
            None if !copy.inline.is_empty() => {
                let mut inline = Vec::new();
                let mut items = Vec::new();
                for file in &copy.inline {
                    let content = if file.substitute {
                        self.substitute(&file.content, Mode::Strict, vars, Some(settings))
                    } else {
                        file.content.raw.clone()
                    };
                    let content = content.into_bytes();
                    items.push(context::CopyItem {
                        rel_src: file.name.clone().into(),
                        rel_dest: file.name.clone().into(),
                        kind: context::ItemKind::File {
                            digest: *blake3::hash(&content).as_bytes(),
                            size: content.len() as u64,
                            mode: 0o644,
                        },
                    });
                    inline.push((file.name.clone(), content));
                }
                let digest = hex::encode(context::items_digest(&items));
                (
                    CopySource::Context {
                        items: Arc::new(items),
                        digest,
                        inline,
                    },
                    None,
                )
            }
            None => {
                // The platforms of a build usually select the same sources: once each.
                let selection_key = (sources.clone(), exclude.clone(), copy.parents);
                let selected = match self.selections.get(&selection_key) {
                    Some(known) => Ok(known.clone()),
                    None => {
                        let selected = match self.context() {
                            Ok(context) if copy.parents => {
                                crate::copy_parents::select(context, &sources)
                                    .map_err(SelectError::Copy)
                            }
                            Ok(context) => context.select(&sources).map_err(SelectError::Copy),
                            Err(error) => Err(SelectError::Scan(error)),
                        };
                        let selected = selected.map(|items| match &excluder {
                            Some(excluder) => context::exclude(items, excluder),
                            None => items,
                        });
                        selected.map(|items| {
                            let digest = hex::encode(context::items_digest(&items));
                            let known = (Arc::new(items), digest);
                            self.selections.insert(selection_key, known.clone());
                            known
                        })
                    }
                };
                match selected {
                    Ok((items, digest)) => (
                        CopySource::Context {
                            items,
                            digest,
                            inline: Vec::new(),
                        },
                        None,
                    ),
                    Err(error) => {
                        self.error(
                            at,
                            Code::Copy,
                            error.to_string(),
                            "this copy",
                            Some(format!(
                                "sources are relative to the build context `{}`",
                                self.context_dir.display()
                            )),
                        );
                        return Ok(None);
                    }
                }
            }
            Some(ir::CopyFrom::Stage(name, _)) => {
                let Some(id) = self.dependency(name, target, matrix)? else {
                    return Ok(None);
                };
                let key = self.nodes[id].key;
                (CopySource::Node { node: id, key }, Some(id))
            }
            Some(ir::CopyFrom::Image(text)) => {
                let reference = self.substitute(text, Mode::Strict, vars, Some(settings));
                let Some(id) = self.image_node(&reference, text.at, target)? else {
                    return Ok(None);
                };
                let key = self.nodes[id].key;
                (CopySource::Node { node: id, key }, Some(id))
            }
        };
        Ok(Some((
            CopyOp {
                sources,
                dest,
                workdir: settings.workdir().to_string(),
                chown,
                chmod,
                parents: copy.parents,
                exclude,
                from,
            },
            dep,
        )))
    }

    /// A node that is just an image, for `copy from="oci:…"`.
    fn image_node(
        &mut self,
        reference: &str,
        at: Loc,
        platform: &Platform,
    ) -> Result<Option<usize>, Pending> {
        if self.stages.contains_key(reference) {
            return self.dependency(reference, platform, &[]);
        }
        let resolved = match self.options.resolver.resolve(reference, platform) {
            Ok(resolved) => resolved,
            Err(ResolveError::Unresolved(unresolved)) => {
                let key = unresolved_key(&unresolved);
                if let Some(&existing) = self.by_key.get(&key) {
                    return Ok(Some(existing));
                }
                let id = self.nodes.len();
                self.by_key.insert(key, id);
                self.nodes.push(Node {
                    id,
                    stage: reference.to_string(),
                    platform: platform.clone(),
                    targets: vec![platform.clone()],
                    key,
                    pending: true,
                    deps: Vec::new(),
                    settings: ImageSettings::default(),
                    base: Base::Unresolved(std::sync::Arc::from(unresolved)),
                    steps: Vec::new(),
                    at,
                });
                return Ok(Some(id));
            }
            Err(error) => {
                let help = error.help();
                self.error(
                    at,
                    error.code(),
                    error.to_string(),
                    "this image",
                    Some(help),
                );
                return Ok(None);
            }
        };
        let key = root_key("image", platform, Some(&resolved.manifest_digest.0));
        if let Some(&existing) = self.by_key.get(&key) {
            return Ok(Some(existing));
        }
        let id = self.nodes.len();
        self.by_key.insert(key, id);
        self.nodes.push(Node {
            id,
            stage: reference.to_string(),
            platform: platform.clone(),
            targets: vec![platform.clone()],
            key,
            pending: false,
            deps: Vec::new(),
            settings: resolved.settings.clone(),
            base: Base::Image(resolved),
            steps: Vec::new(),
            at,
        });
        Ok(Some(id))
    }

    /// A metadata step as a typed op, its values substituted; an `arg` also enters `vars`.
    fn config_op(
        &mut self,
        kind: &StepKind,
        at: Loc,
        vars: &mut Vars,
        settings: &ImageSettings,
    ) -> Option<ConfigOp> {
        let strict = |expander: &mut Self, text: &Text, vars: &Vars, settings: &ImageSettings| {
            expander.substitute(text, Mode::Strict, vars, Some(settings))
        };
        let config = match kind {
            StepKind::Env(pairs) => {
                // In KDL each value sees the ones before it in the same `env`; in a Dockerfile
                // every value sees the environment from before the instruction.
                let mut scratch = settings.clone();
                let mut values = Vec::new();
                for (name, value) in pairs {
                    let value = strict(self, value, vars, &scratch);
                    if !vars.docker_rules {
                        scratch.set_env(name, value.clone());
                    }
                    values.push((name.clone(), value));
                }
                ConfigOp::Env(values)
            }
            StepKind::Arg(arg) => {
                let param = vars.params.iter().rev().find(|(name, _)| *name == arg.name);
                let value = if let Some(value) = self.options.args.get(&arg.name) {
                    Some(value.clone())
                } else if let Some((_, value)) = param.filter(|_| vars.docker_rules) {
                    Some(value.clone())
                } else if let Some((_, value)) =
                    vars.globals.iter().find(|(name, _)| *name == arg.name)
                {
                    Some(value.clone())
                } else if let Some(default) = &arg.default {
                    Some(strict(self, default, vars, settings))
                } else {
                    vars.automatic
                        .iter()
                        .find(|(name, _)| *name == arg.name)
                        .map(|(_, value)| value.clone())
                };
                if let Some(value) = &value {
                    vars.stage_args.push((arg.name.clone(), value.clone()));
                }
                ConfigOp::Arg {
                    name: arg.name.clone(),
                    value,
                }
            }
            StepKind::Workdir(text) => {
                let value = strict(self, text, vars, settings);
                ConfigOp::Workdir(if value.starts_with('/') {
                    value
                } else {
                    format!("{}/{}", settings.workdir().trim_end_matches('/'), value)
                })
            }
            StepKind::User(text) => ConfigOp::User(strict(self, text, vars, settings)),
            StepKind::Label(pairs) => ConfigOp::Label(
                pairs
                    .iter()
                    .map(|(name, value)| (name.clone(), strict(self, value, vars, settings)))
                    .collect(),
            ),
            StepKind::Expose(ports) => ConfigOp::Expose(
                ports
                    .iter()
                    .map(|port| {
                        let value = strict(self, port, vars, settings);
                        if value.contains('/') {
                            value
                        } else {
                            format!("{value}/tcp")
                        }
                    })
                    .collect(),
            ),
            // Runtime commands: build variables are substituted, anything else (`$HOME`, env
            // values) is left for the container's shell, as Docker does.
            StepKind::Entrypoint(command) => {
                ConfigOp::Entrypoint(self.runtime_command(command, vars, settings))
            }
            StepKind::Cmd(command) => ConfigOp::Cmd(self.runtime_command(command, vars, settings)),
            StepKind::Volume(paths) => ConfigOp::Volume(
                paths
                    .iter()
                    .map(|path| strict(self, path, vars, settings))
                    .collect(),
            ),
            StepKind::Shell(args) => ConfigOp::Shell(
                args.iter()
                    .map(|arg| strict(self, arg, vars, settings))
                    .collect(),
            ),
            StepKind::StopSignal(text) => ConfigOp::StopSignal(strict(self, text, vars, settings)),
            StepKind::Healthcheck(check) => {
                ConfigOp::Healthcheck(self.healthcheck(check, vars, settings))
            }
            StepKind::Run(_) | StepKind::Copy(_) | StepKind::Add(_) => {
                self.error(
                    at,
                    Code::Internal,
                    "a filesystem step reached the metadata path".into(),
                    "here",
                    None,
                );
                return None;
            }
        };
        Some(config)
    }

    fn healthcheck(
        &mut self,
        check: &ir::Healthcheck,
        vars: &Vars,
        settings: &ImageSettings,
    ) -> HealthcheckSettings {
        let test = match &check.test {
            None => vec!["NONE".to_string()],
            Some(Command::Shell(text)) => {
                vec!["CMD-SHELL".to_string(), self.shell_source(text, vars)]
            }
            Some(command @ Command::Exec(_)) => std::iter::once("CMD".to_string())
                .chain(self.runtime_command(command, vars, settings))
                .collect(),
        };
        let mut duration = |text: &Option<Text>| -> Option<u64> {
            let text = text.as_ref()?;
            let value = self.substitute(text, Mode::Strict, vars, Some(settings));
            match parse_duration(&value) {
                Some(ns) => Some(ns),
                None => {
                    self.error(
                        text.at,
                        Code::Duration,
                        format!("`{value}` is not a duration"),
                        "this duration",
                        Some("write durations like \"30s\", \"1m30s\" or \"500ms\"".into()),
                    );
                    None
                }
            }
        };
        HealthcheckSettings {
            interval_ns: duration(&check.interval),
            timeout_ns: duration(&check.timeout),
            start_period_ns: duration(&check.start_period),
            retries: check.retries,
            test,
        }
    }
}

/// The placeholder root of a node built on an unresolved base: distinct per reference and
/// platform (so pending nodes are told apart and shared like real ones), and in a key domain of
/// its own, so it can never equal a real key or be found in a store.
fn unresolved_key(unresolved: &Unresolved) -> Key {
    KeyBuilder::new("unresolved-base")
        .str(&unresolved.reference)
        .str(&unresolved.platform.to_string())
        .finish()
}

/// Characters a shell reads as syntax: a build variable's value in a runtime command's shell
/// source may hold none of them.
const SHELL_SYNTAX: &str = "`$\\\"';&|<>(){}[]*?!~#\n\r\t";

/// Which argument of an exec-form command is shell source: the one after `-c` (or `-ec`…)
/// when the program is a shell.
fn shell_source_index<'t>(mut args: impl Iterator<Item = &'t str>) -> Option<usize> {
    let program = args.next()?;
    let shell = matches!(
        program.rsplit('/').next().unwrap_or(program),
        "sh" | "bash" | "ash" | "dash" | "zsh" | "ksh" | "mksh"
    );
    let flag = args.next()?;
    (shell && flag.starts_with('-') && flag.contains('c')).then_some(2)
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
