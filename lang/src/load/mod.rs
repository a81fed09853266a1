//! Loading a build file: KDL parsing, imports, declarations, lowering to [`ir::Project`],
//! template instantiation and validation.
//!
//! # Phases
//!
//! 1. **Read.** The root file is parsed with `kdl` (v2). Its `import` nodes are followed
//!    depth-first: `"std:NAME"` from the embedded [`crate::stdlib`], `"./x.kdl"` relative to the
//!    importing file. A file that imports itself through a chain is an error showing the chain.
//!    Each file gets a *prefix*: `import … as="py"` puts the module's stages and templates under
//!    `py.`; without `as` they join the importer's namespace.
//! 2. **Declare.** Every stage, template, image and top-level arg is registered by its full name;
//!    duplicates are reported.
//! 3. **Lower.** Stages, templates and images become IR. A stage reference is resolved in the
//!    referring file's namespace first, then globally. A template body is lowered once on its
//!    own to report its problems, and again for each `use` with the instance's names, quietly.
//! 4. **Check.** Dependency cycles among stages, and undefined variables (warnings).
//!
//! Every phase keeps going after a problem so one run reports everything; errors never reach a
//! [`Project`], they come back as [`Diagnostics`] sorted by file and position.

mod check;
mod declare;
mod dockerfile_node;
mod lower_add;
mod lower_bind;
mod lower_image;
mod lower_ssh;
mod lower_stage;
mod lower_test;
mod read;
mod spec;
mod values;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use kdl::{KdlDocument, KdlEntry, KdlNode, KdlValue};
use miette::SourceSpan;

use crate::Code;
use crate::ir::{FileId, Loc, MatrixAxis, Project, Sources, Stage, Text};
use crate::{Diagnostic, Diagnostics, limits};

/// Loads the build file at `path` with everything it imports.
pub fn load(path: &Path) -> Result<Project, Diagnostics> {
    let root_dir = path
        .parent()
        .map(Path::to_path_buf)
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."));
    let name = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) => {
            return Err(Diagnostic::error(
                Code::LoadRead,
                format!("cannot read build file `{name}`: {error}"),
            )
            .with_help(
                "pass the path of a .kdl build file, for example `graphbuild plan images.kdl`",
            )
            .into());
        }
    };
    let identity = std::fs::canonicalize(path)
        .map(|canonical| canonical.display().to_string())
        .unwrap_or_else(|_| name.clone());
    Loader::new(root_dir).run(identity, name, Some(path.to_path_buf()), text)
}

/// Loads a build file from memory; local imports resolve against `root_dir`.
pub fn load_source(name: &str, text: &str, root_dir: &Path) -> Result<Project, Diagnostics> {
    let identity = root_dir.join(name).display().to_string();
    Loader::new(root_dir.to_path_buf()).run(identity, name.to_string(), None, text.to_string())
}

/// One parsed file.
struct LoadedFile {
    file: FileId,
    /// Canonical path or `std:NAME`: one file imported under two prefixes has one identity.
    identity: String,
    document: KdlDocument,
    /// Namespace prefix of its stages and templates: `""` or `"alias."`.
    prefix: String,
    is_root: bool,
}

struct StageDeclaration {
    full_name: String,
    file_index: usize,
    node: KdlNode,
}

struct TemplateDefinition {
    full_name: String,
    file_index: usize,
    at: Loc,
    params: Vec<(String, Option<Text>, Loc)>,
    stages: Vec<KdlNode>,
}

/// How stage names are resolved from where a reference is written.
struct Resolver<'a> {
    prefix: &'a str,
    /// Inside a template: the template's own stages, and the instance name they get.
    siblings: Option<(&'a [String], &'a str)>,
}

struct Loader {
    root_dir: PathBuf,
    sources: Sources,
    diagnostics: Vec<Diagnostic>,
    files: Vec<LoadedFile>,
    /// The files being loaded, outermost first: (identity, name shown to the user).
    import_stack: Vec<(String, String)>,
    imported: HashSet<(String, String)>,
    stage_names: HashMap<String, Loc>,
    templates: Vec<TemplateDefinition>,
    /// Stages lowered from template bodies on their own, only to validate them.
    template_stages: Vec<(Stage, usize)>,
    /// Stages of Dockerfiles imported by `dockerfile` nodes, already lowered.
    dockerfile_stages: Vec<Stage>,
}

pub(crate) fn did_you_mean<'a>(
    written: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|candidate| (strsim::jaro_winkler(written, candidate), candidate))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, candidate)| candidate)
}

fn value_kind(value: &KdlValue) -> &'static str {
    match value {
        KdlValue::String(_) => "a string",
        KdlValue::Integer(_) => "an integer",
        KdlValue::Float(_) => "a number",
        KdlValue::Bool(_) => "a boolean",
        KdlValue::Null => "#null",
    }
}

fn positional(node: &KdlNode) -> Vec<&KdlEntry> {
    node.entries()
        .iter()
        .filter(|entry| entry.name().is_none())
        .collect()
}

fn properties(node: &KdlNode) -> Vec<(&str, &KdlEntry)> {
    node.entries()
        .iter()
        .filter_map(|entry| entry.name().map(|name| (name.value(), entry)))
        .collect()
}

/// How many images a matrix expands to: the product of its axes' lengths (saturating).
fn matrix_combinations(matrix: &[MatrixAxis]) -> u128 {
    matrix.iter().fold(1u128, |product, axis| {
        product.saturating_mul(axis.values.len() as u128)
    })
}

fn is_image_reference(value: &str) -> bool {
    value.contains(['/', ':', '.', '@'])
}

impl Loader {
    pub(super) fn new(root_dir: PathBuf) -> Self {
        Loader {
            root_dir,
            sources: Sources::default(),
            diagnostics: Vec::new(),
            files: Vec::new(),
            import_stack: Vec::new(),
            imported: HashSet::new(),
            stage_names: HashMap::new(),
            templates: Vec::new(),
            template_stages: Vec::new(),
            dockerfile_stages: Vec::new(),
        }
    }

    pub(super) fn run(
        mut self,
        identity: String,
        name: String,
        path: Option<PathBuf>,
        text: String,
    ) -> Result<Project, Diagnostics> {
        self.read_file(identity, name, path, text, String::new(), None);
        let mut project = Project {
            sources: Sources::default(),
            root_dir: self.root_dir.clone(),
            platforms: Vec::new(),
            args: Vec::new(),
            stages: Vec::new(),
            scopes: Vec::new(),
            images: Vec::new(),
            groups: Vec::new(),
            docker_rules: false,
            warnings: Vec::new(),
        };
        let stages = self.declare(&mut project);
        if let Some(declaration) = stages.get(limits::MAX_STAGES) {
            let file = self.files[declaration.file_index].file;
            self.error(
                Code::LimitsStages,
                format!("the build file has more than {} stages", limits::MAX_STAGES),
                Self::loc(file, declaration.node.name().span()),
                "one stage too many",
                Some("split the build file into several".into()),
            );
            return Err(Diagnostics(std::mem::take(&mut self.diagnostics)));
        }
        for declaration in &stages {
            let prefix = self.files[declaration.file_index].prefix.clone();
            let file = self.files[declaration.file_index].file;
            let resolver = Resolver {
                prefix: &prefix,
                siblings: None,
            };
            if let Some(stage) = self.lower_stage(
                &declaration.node,
                file,
                declaration.full_name.clone(),
                &resolver,
                None,
            ) {
                project.stages.push(stage);
            }
        }
        project.stages.append(&mut self.dockerfile_stages);
        self.validate_templates();
        self.lower_images(&mut project);
        self.check_cycles(&project);
        self.check_variables(&project);
        project.sources = self.sources.clone();
        let mut diagnostics = std::mem::take(&mut self.diagnostics);
        diagnostics.sort_by_key(|diagnostic| {
            let location = diagnostic.location.map(|loc| (loc.file, loc.span.offset()));
            (location, diagnostic.severity == crate::Severity::Warning)
        });
        if diagnostics.iter().any(Diagnostic::is_error) {
            return Err(Diagnostics(diagnostics));
        }
        project.warnings = diagnostics;
        Ok(project)
    }

    pub(super) fn loc(file: FileId, span: SourceSpan) -> Loc {
        Loc { file, span }
    }

    pub(super) fn error(
        &mut self,
        code: Code,
        message: impl Into<String>,
        at: Loc,
        label: impl Into<String>,
        help: Option<String>,
    ) {
        let mut diagnostic = Diagnostic::error(code, message).with_label(&self.sources, at, label);
        if let Some(help) = help {
            diagnostic = diagnostic.with_help(help);
        }
        self.diagnostics.push(diagnostic);
    }

    // ----------------------------------------------------------------------------------------
    // Phase 1: reading files and imports
}
