//! What KDL borrows from Dockerfiles: a stage's `rules="dockerfile"` (Dockerfile variable
//! rules for one stage, what `graphbuild convert` writes), and the `dockerfile` node, which
//! imports a Dockerfile's stages.

use kdl::KdlNode;

use crate::ir::{CopyFrom, FileId, FromSource, Scope, ScopeId, StepKind, Text};
use crate::{Code, Diagnostic};

use super::*;

impl Loader {
    /// `stage NAME rules="dockerfile"|"kdl"`: whether the stage follows Dockerfile variable
    /// rules ([`crate::ir::Project::docker_rules`]); any other property is reported.
    pub(super) fn stage_rules(&mut self, node: &KdlNode, file: FileId) -> bool {
        let props = self.node_properties(node, file, spec::get(spec::TOP_LEVEL, "stage"));
        let mut docker_rules = false;
        if let Some(text) = props.text("rules") {
            match text.raw.as_str() {
                "dockerfile" => docker_rules = true,
                "kdl" => docker_rules = false,
                other => self.error(
                    Code::StageRules,
                    format!("unknown rules `{other}`"),
                    text.at,
                    "not a set of rules",
                    Some(
                        "rules=\"dockerfile\" scopes args as a Dockerfile does; \"kdl\" is the default"
                            .into(),
                    ),
                ),
            }
        }
        docker_rules
    }
}

impl Loader {
    /// `dockerfile NAME path="Dockerfile" context="." { arg NAME="value" … }`: the
    /// Dockerfile's stages join the project as `NAME.STAGE` (unnamed ones `NAME.0`, `NAME.1`…),
    /// with Dockerfile rules, their global args bound in a scope of their own: the Dockerfile's
    /// defaults, or the node's `arg` values (substituted like template params, in the using
    /// image's context). Problems inside the Dockerfile are reported at its own lines.
    pub(super) fn declare_dockerfile(
        &mut self,
        node: &KdlNode,
        file: FileId,
        is_root: bool,
        project: &mut crate::ir::Project,
    ) {
        let node_at = Self::loc(file, node.name().span());
        let Some(name) = self.node_name(node, file, "dockerfile") else {
            return;
        };
        if !is_root {
            self.error(
                Code::ModuleImage,
                "an imported module cannot import a Dockerfile",
                node_at,
                "in an imported module",
                Some("import the Dockerfile in the root build file".into()),
            );
            return;
        }
        let props = self.node_properties(node, file, spec::get(spec::TOP_LEVEL, "dockerfile"));
        let path = props.text("path");
        let context = props.text("context");
        let mut overrides: Vec<(String, Text)> = Vec::new();
        for child in node
            .children()
            .map(|c| c.nodes().to_vec())
            .unwrap_or_default()
        {
            if child.name().value() != "arg" {
                self.unknown_node(
                    &child,
                    file,
                    child.name().value(),
                    &["arg"],
                    "in `dockerfile`",
                );
                continue;
            }
            self.check_no_children(&child, file, "arg");
            for declaration in self.arg_declarations(&child, file) {
                match declaration.default {
                    Some(value) => overrides.push((declaration.name, value)),
                    None => self.error(
                        Code::NodeMissingValue,
                        format!("`arg {}` needs a value", declaration.name),
                        declaration.at,
                        "no value",
                        Some(format!(
                            "write `arg {0}=\"VALUE\"`; the Dockerfile's default applies without it",
                            declaration.name
                        )),
                    ),
                }
            }
        }
        // The build context is the build file's directory, as for its own stages.
        if let Some(context) = &context {
            let same = std::fs::canonicalize(self.root_dir.join(&context.raw)).ok()
                == std::fs::canonicalize(&self.root_dir).ok();
            if !same {
                self.error(
                    Code::ImportMissingFile,
                    format!("the context `{}` is not this build file's directory", context.raw),
                    context.at,
                    "another directory",
                    Some("an imported Dockerfile builds in the build file's context: write context=\".\", or move the build file into the Dockerfile's context".into()),
                );
                return;
            }
        }
        let relative = path
            .as_ref()
            .map_or_else(|| "Dockerfile".to_string(), |text| text.raw.clone());
        let path_at = path.as_ref().map_or(node_at, |text| text.at);
        let full_path = self.root_dir.join(&relative);
        // At most one byte over the limit, which the front end then reports: a path such as
        // /dev/zero is not read forever.
        let limit = crate::limits::MAX_FILE_BYTES as u64 + 1;
        let read = std::fs::File::open(&full_path).and_then(|file| {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::Read::take(file, limit), &mut text)
                .map(|_| text)
        });
        let text = match read {
            Ok(text) => text,
            Err(error) => {
                self.error(
                    Code::ImportMissingFile,
                    format!("cannot read the Dockerfile `{relative}`: {error}"),
                    path_at,
                    "this Dockerfile",
                    Some("the path is relative to the build file's directory".into()),
                );
                return;
            }
        };
        let source = crate::ir::Source::new(
            full_path.display().to_string(),
            Some(full_path.clone()),
            std::sync::Arc::new(text),
        );
        let options = crate::dockerfile::Options {
            image: name.raw.clone(),
            ..crate::dockerfile::Options::default()
        };
        let imported = match crate::dockerfile::load_into(
            source,
            &self.root_dir,
            &options,
            self.sources.clone(),
        ) {
            Ok(imported) => imported,
            Err(diagnostics) => {
                self.diagnostics.extend(diagnostics.0);
                return;
            }
        };
        self.sources = imported.sources;
        self.diagnostics.extend(imported.warnings);
        let declared = |arg: &str| {
            imported.args.iter().any(|decl| decl.name == arg)
                || imported.stages.iter().any(|stage| {
                    stage
                        .steps
                        .iter()
                        .any(|step| matches!(&step.kind, StepKind::Arg(decl) if decl.name == arg))
                })
        };
        for (arg, value) in &overrides {
            if !declared(arg) {
                self.diagnostics.push(
                    Diagnostic::warning(
                        Code::VariableUndefined,
                        format!("no ARG in `{relative}` declares `{arg}`, so it is not used"),
                    )
                    .with_label(&self.sources, value.at, "this arg")
                    .with_help("declare it in the Dockerfile with ARG, or remove it here"),
                );
            }
        }
        let scope = ScopeId(project.scopes.len() as u32);
        let mut bindings: Vec<(String, Text)> = Vec::new();
        for decl in &imported.args {
            let value = overrides
                .iter()
                .find(|(arg, _)| *arg == decl.name)
                .map(|(_, value)| value.clone())
                .or_else(|| decl.default.clone())
                .unwrap_or_else(|| Text {
                    raw: String::new(),
                    at: decl.at,
                });
            bindings.push((decl.name.clone(), value));
        }
        // Args only a stage declares take the node's value through the scope too.
        for (arg, value) in &overrides {
            if !bindings.iter().any(|(name, _)| name == arg) {
                bindings.push((arg.clone(), value.clone()));
            }
        }
        project.scopes.push(Scope {
            name: name.raw.clone(),
            template: format!("dockerfile {relative}"),
            bindings,
            at: node_at,
        });
        let prefix = format!("{}.", name.raw);
        for mut stage in imported.stages {
            stage.name = format!("{prefix}{}", stage.name);
            if let FromSource::Stage(base) = &mut stage.from.source {
                *base = format!("{prefix}{base}");
            }
            for step in &mut stage.steps {
                if let StepKind::Copy(copy) = &mut step.kind
                    && let Some(CopyFrom::Stage(from, _)) = &mut copy.from
                {
                    *from = format!("{prefix}{from}");
                }
                // A bind mount from a stage names an imported stage too.
                if let StepKind::Run(run) = &mut step.kind {
                    for mount in &mut run.bind_mounts {
                        if let Some(CopyFrom::Stage(from, _)) = &mut mount.from {
                            *from = format!("{prefix}{from}");
                        }
                    }
                }
            }
            stage.scope = Some(scope);
            if let Some(first) = self.stage_names.get(&stage.name) {
                let diagnostic = Diagnostic::error(
                    Code::DuplicateStage,
                    format!("stage `{}` is defined twice", stage.name),
                )
                .with_label(&self.sources, name.at, "imported here")
                .with_label(&self.sources, *first, "first defined here")
                .with_help("rename the stage, or give the `dockerfile` node another name");
                self.diagnostics.push(diagnostic);
                continue;
            }
            self.stage_names.insert(stage.name.clone(), stage.at);
            self.dockerfile_stages.push(stage);
        }
    }
}

#[cfg(test)]
#[path = "dockerfile_node_tests.rs"]
mod tests;
