//! Checking the whole project: dependency cycles among stages, and undefined variables
//! (warnings), with inherited env keys computed in linear time.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::Code;
use crate::Diagnostic;
use crate::ir::{
    Command, Copy, CopyFrom, FromSource, Loc, PlatformSpec, Project, Stage, StepKind, Text,
};
use crate::platform::AUTOMATIC_ARGS;
use crate::subst::{self, Mode};

use super::*;

impl Loader {
    pub(super) fn check_cycles(&mut self, project: &Project) {
        let index: HashMap<&str, usize> = project
            .stages
            .iter()
            .enumerate()
            .map(|(position, stage)| (stage.name.as_str(), position))
            .collect();
        let edges: Vec<Vec<(usize, Loc)>> = project
            .stages
            .iter()
            .map(|stage| {
                let mut edges = Vec::new();
                if let FromSource::Stage(name) = &stage.from.source
                    && let Some(target) = index.get(name.as_str())
                {
                    edges.push((*target, stage.from.at));
                }
                for step in &stage.steps {
                    if let StepKind::Copy(Copy {
                        from: Some(CopyFrom::Stage(name, at)),
                        ..
                    }) = &step.kind
                        && let Some(target) = index.get(name.as_str())
                    {
                        edges.push((*target, *at));
                    }
                    if let StepKind::Run(run) = &step.kind {
                        for mount in &run.bind_mounts {
                            if let Some(CopyFrom::Stage(name, at)) = &mount.from
                                && let Some(target) = index.get(name.as_str())
                            {
                                edges.push((*target, *at));
                            }
                        }
                    }
                }
                edges
            })
            .collect();
        // Iterative DFS with colors; every back edge closes a cycle on the current path.
        let mut color = vec![0u8; project.stages.len()];
        let mut reported: HashSet<BTreeSet<usize>> = HashSet::new();
        for start in 0..project.stages.len() {
            if color[start] != 0 {
                continue;
            }
            let mut path: Vec<(usize, usize)> = vec![(start, 0)];
            let mut path_edges: Vec<Loc> = Vec::new();
            color[start] = 1;
            while let Some(&mut (node, ref mut next)) = path.last_mut() {
                if *next < edges[node].len() {
                    let (target, at) = edges[node][*next];
                    *next += 1;
                    match color[target] {
                        0 => {
                            color[target] = 1;
                            path.push((target, 0));
                            path_edges.push(at);
                        }
                        1 => {
                            let position = path
                                .iter()
                                .position(|(open, _)| *open == target)
                                .unwrap_or(0);
                            let members: Vec<usize> =
                                path[position..].iter().map(|(member, _)| *member).collect();
                            let key: BTreeSet<usize> = members.iter().copied().collect();
                            if reported.insert(key) {
                                let mut cycle_edges: Vec<Loc> = path_edges[position..].to_vec();
                                cycle_edges.push(at);
                                self.report_cycle(project, &members, &cycle_edges);
                            }
                        }
                        _ => {}
                    }
                } else {
                    color[node] = 2;
                    path.pop();
                    path_edges.pop();
                }
            }
        }
    }

    pub(super) fn report_cycle(&mut self, project: &Project, members: &[usize], edges: &[Loc]) {
        let mut names: Vec<&str> = members
            .iter()
            .map(|member| project.stages[*member].name.as_str())
            .collect();
        if let Some(first) = names.first().copied() {
            names.push(first);
        }
        let mut diagnostic = Diagnostic::error(
            Code::StageCycle,
            format!("dependency cycle: {}", names.join(" → ")),
        );
        for (position, at) in edges.iter().enumerate() {
            let from = names.get(position).copied().unwrap_or_default();
            let to = names.get(position + 1).copied().unwrap_or_default();
            diagnostic =
                diagnostic.with_label(&self.sources, *at, format!("`{from}` needs `{to}`"));
        }
        self.diagnostics.push(diagnostic.with_help("a stage cannot depend on itself; break the cycle by moving the shared steps into a new stage"));
    }

    pub(super) fn check_variables(&mut self, project: &Project) {
        let mut global: HashSet<String> =
            AUTOMATIC_ARGS.iter().map(|name| name.to_string()).collect();
        global.extend(project.args.iter().map(|arg| arg.name.clone()));
        let all_matrix_keys: HashSet<String> = project
            .images
            .iter()
            .flat_map(|image| image.matrix.iter().map(|axis| axis.key.clone()))
            .collect();
        for arg in &project.args {
            if let Some(default) = &arg.default {
                self.check_text(default, &global, Mode::Strict);
            }
        }
        for spec in &project.platforms {
            if let PlatformSpec::Dynamic(text) = spec {
                self.check_text(text, &global, Mode::Strict);
            }
        }
        let mut all: Vec<&Stage> = project.stages.iter().collect();
        let template_stages = std::mem::take(&mut self.template_stages);
        all.extend(template_stages.iter().map(|(stage, _)| stage));
        let inherited = inherited_env_keys(&all);
        let stage_known = |index: usize, params: Vec<String>| -> HashSet<String> {
            let mut known = global.clone();
            known.extend(all_matrix_keys.iter().cloned());
            known.extend(params);
            known.extend(inherited[index].iter().cloned());
            known
        };
        for (index, stage) in project.stages.iter().enumerate() {
            if stage.scope.is_none() {
                let known = stage_known(index, Vec::new());
                self.check_stage(stage, known);
            }
        }
        for (offset, (stage, template)) in template_stages.iter().enumerate() {
            let params: Vec<String> = self.templates[*template]
                .params
                .iter()
                .map(|(name, _, _)| name.clone())
                .collect();
            let known = stage_known(project.stages.len() + offset, params.clone());
            self.check_stage(stage, known);
        }
        for template in 0..self.templates.len() {
            let mut known = global.clone();
            known.extend(all_matrix_keys.iter().cloned());
            known.extend(
                self.templates[template]
                    .params
                    .iter()
                    .map(|(name, _, _)| name.clone()),
            );
            let defaults: Vec<Text> = self.templates[template]
                .params
                .iter()
                .filter_map(|(_, default, _)| default.clone())
                .collect();
            for default in &defaults {
                self.check_text(default, &known, Mode::Strict);
            }
        }
        for image in &project.images {
            let mut known = global.clone();
            known.extend(image.matrix.iter().map(|axis| axis.key.clone()));
            let mut texts: Vec<&Text> = vec![&image.name];
            texts.extend(image.tags.iter());
            texts.extend(image.annotations.iter().map(|(_, value)| value));
            texts.extend(image.labels.iter().map(|(_, value)| value));
            texts.extend(image.output.iter());
            texts.extend(
                image
                    .platforms
                    .iter()
                    .flatten()
                    .filter_map(|spec| match spec {
                        PlatformSpec::Dynamic(text) => Some(text),
                        PlatformSpec::Literal(..) => None,
                    }),
            );
            for axis in &image.matrix {
                texts.extend(axis.values.iter());
            }
            for text in texts {
                self.check_text(text, &known, Mode::Strict);
            }
        }
        for scope in &project.scopes {
            let Some(image) = project
                .images
                .iter()
                .find(|image| image.stage.starts_with(&format!("{}/", scope.name)))
            else {
                continue;
            };
            let mut known = global.clone();
            known.extend(image.matrix.iter().map(|axis| axis.key.clone()));
            for (_, value) in &scope.bindings {
                // Defaults were checked with the template.
                if value.at.file == image.name.at.file {
                    self.check_text(value, &known, Mode::Strict);
                }
            }
        }
        self.template_stages = template_stages;
    }

    pub(super) fn check_stage(&mut self, stage: &Stage, mut known: HashSet<String>) {
        if let FromSource::Image(text) = &stage.from.source {
            self.check_text(text, &known, Mode::Strict);
        }
        if let Some(PlatformSpec::Dynamic(text)) = &stage.platform {
            self.check_text(text, &known, Mode::Strict);
        }
        for step in &stage.steps {
            let mut texts: Vec<(&Text, Mode)> = Vec::new();
            match &step.kind {
                StepKind::Run(run) => {
                    match &run.command {
                        Command::Shell(text) => texts.push((text, Mode::Shell)),
                        Command::Exec(argv) => {
                            texts.extend(argv.iter().map(|text| (text, Mode::Shell)))
                        }
                    }
                    for mount in &run.cache_mounts {
                        texts.push((&mount.target, Mode::Strict));
                        texts.extend(mount.id.iter().map(|text| (text, Mode::Strict)));
                    }
                    for secret in &run.secrets {
                        texts.extend(secret.target.iter().map(|text| (text, Mode::Strict)));
                    }
                }
                StepKind::Copy(copy) | StepKind::Add(crate::ir::Add { copy, .. }) => {
                    texts.extend(copy.sources.iter().map(|text| (text, Mode::Strict)));
                    texts.push((&copy.dest, Mode::Strict));
                    texts.extend(copy.chown.iter().map(|text| (text, Mode::Strict)));
                    texts.extend(copy.chmod.iter().map(|text| (text, Mode::Strict)));
                    if let Some(CopyFrom::Image(text)) = &copy.from {
                        texts.push((text, Mode::Strict));
                    }
                }
                StepKind::Env(pairs) | StepKind::Label(pairs) => {
                    texts.extend(pairs.iter().map(|(_, text)| (text, Mode::Strict)))
                }
                StepKind::Arg(declaration) => {
                    texts.extend(declaration.default.iter().map(|text| (text, Mode::Strict)));
                }
                StepKind::Workdir(text) | StepKind::User(text) | StepKind::StopSignal(text) => {
                    texts.push((text, Mode::Strict))
                }
                StepKind::Expose(values) | StepKind::Volume(values) => {
                    texts.extend(values.iter().map(|text| (text, Mode::Strict)))
                }
                // Runtime commands: not substituted at build time, like Docker.
                StepKind::Entrypoint(_)
                | StepKind::Cmd(_)
                | StepKind::Shell(_)
                | StepKind::Healthcheck(_) => {}
            }
            for (text, mode) in texts {
                self.check_text(text, &known, mode);
            }
            if let StepKind::Arg(declaration) = &step.kind {
                known.insert(declaration.name.clone());
            }
        }
    }

    /// Reports a malformed `${` (error) and, in Strict mode, undefined variables (warnings).
    pub(super) fn check_text(&mut self, text: &Text, known: &HashSet<String>, mode: Mode) {
        let mut lookup = |name: &str| known.contains(name).then(String::new);
        match subst::substitute(&text.raw, mode, &mut lookup) {
            Err(error) => {
                self.error(
                    Code::SubstitutionMalformed,
                    format!("malformed substitution: {error}"),
                    text.at,
                    "malformed `${…}`",
                    Some("supported forms: $VAR, ${VAR}, ${VAR:-default}, ${VAR:+alternative}; for a literal $ write \"\\\\$\" or #\"\\$\"#".into()),
                );
            }
            Ok(result) => {
                for name in result.undefined {
                    let close =
                        did_you_mean(&name, known.iter().map(String::as_str)).map(str::to_string);
                    let help = match close {
                        Some(close) => format!(
                            "did you mean `{close}`? otherwise declare it with `arg {name}=\"…\"`; for a literal dollar sign write \"\\\\${name}\" or #\"\\${name}\"#"
                        ),
                        None => format!(
                            "declare it with `arg {name}=\"…\"` (top level or in the stage); for a literal dollar sign write \"\\\\${name}\" or #\"\\${name}\"#"
                        ),
                    };
                    let diagnostic = Diagnostic::warning(
                        Code::VariableUndefined,
                        format!("undefined variable `{name}`"),
                    )
                    .with_label(
                        &self.sources,
                        text.at,
                        format!("`{name}` is not defined here and becomes empty"),
                    )
                    .with_help(help);
                    self.diagnostics.push(diagnostic);
                }
            }
        }
    }
}

/// For each stage, the env keys it and its ancestors through `from` set. A stage that sets no
/// new key shares its parent's set, so a long chain costs linear time; ancestors are found by
/// name in a map and walked iteratively (a cycle stops the walk; it is reported elsewhere).
pub(super) fn inherited_env_keys(stages: &[&Stage]) -> Vec<std::rc::Rc<HashSet<String>>> {
    use std::rc::Rc;
    // The first stage of a name, as a search in order would find it.
    let mut by_name: HashMap<&str, usize> = HashMap::new();
    for (index, stage) in stages.iter().enumerate() {
        by_name.entry(stage.name.as_str()).or_insert(index);
    }
    let parent = |index: usize| match &stages[index].from.source {
        FromSource::Stage(name) => by_name.get(name.as_str()).copied(),
        _ => None,
    };
    let mut memo: Vec<Option<Rc<HashSet<String>>>> = vec![None; stages.len()];
    for start in 0..stages.len() {
        // The chain of ancestors not computed yet, nearest first.
        let mut chain = Vec::new();
        let mut seen = HashSet::new();
        let mut current = Some(start);
        while let Some(index) = current {
            if memo[index].is_some() || !seen.insert(index) {
                break;
            }
            chain.push(index);
            current = parent(index);
        }
        for &index in chain.iter().rev() {
            let from_parent = parent(index)
                .and_then(|parent| memo[parent].clone())
                .unwrap_or_default();
            let own: Vec<&String> = stages[index]
                .steps
                .iter()
                .filter_map(|step| match &step.kind {
                    StepKind::Env(pairs) => Some(pairs.iter().map(|(key, _)| key)),
                    _ => None,
                })
                .flatten()
                .filter(|key| !from_parent.contains(*key))
                .collect();
            memo[index] = Some(if own.is_empty() {
                from_parent
            } else {
                let mut keys = (*from_parent).clone();
                keys.extend(own.into_iter().cloned());
                Rc::new(keys)
            });
        }
    }
    memo.into_iter().map(Option::unwrap_or_default).collect()
}
