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

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kdl::{KdlDocument, KdlEntry, KdlNode, KdlValue};
use miette::SourceSpan;

use crate::ir::{
    ArgDecl, CacheMount, CacheSharing, Command, Copy, CopyFrom, FileId, From, FromSource,
    Healthcheck, Image, Loc, MatrixAxis, Network, PlatformSpec, Project, Run, Scope, ScopeId,
    Secret, Source, Sources, Stage, Step, StepKind, Text,
};
use crate::platform::{AUTOMATIC_ARGS, Platform};
use crate::subst::{self, Mode};
use crate::{Diagnostic, Diagnostics};

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
                "graphbuild::load::read",
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

const TOP_LEVEL_NODES: &[&str] = &["platforms", "arg", "import", "stage", "image", "template"];
const STAGE_NODES: &[&str] = &[
    "from",
    "platform",
    "run",
    "copy",
    "env",
    "arg",
    "workdir",
    "user",
    "label",
    "expose",
    "entrypoint",
    "cmd",
    "volume",
    "shell",
    "stopsignal",
    "healthcheck",
    "when",
];
const WHEN_NODES: &[&str] = &[
    "run",
    "copy",
    "env",
    "arg",
    "workdir",
    "user",
    "label",
    "expose",
    "entrypoint",
    "cmd",
    "volume",
    "shell",
    "stopsignal",
    "healthcheck",
];
const RUN_NODES: &[&str] = &["cache-mount", "secret", "network"];
const IMAGE_NODES: &[&str] = &[
    "stage",
    "tags",
    "platforms",
    "matrix",
    "use",
    "annotation",
    "label",
    "output",
    "push",
];
const TEMPLATE_NODES: &[&str] = &["param", "stage"];

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
}

fn did_you_mean<'a>(
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

fn is_image_reference(value: &str) -> bool {
    value.contains(['/', ':', '.', '@'])
}

impl Loader {
    fn new(root_dir: PathBuf) -> Self {
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
        }
    }

    fn run(
        mut self,
        identity: String,
        name: String,
        path: Option<PathBuf>,
        text: String,
    ) -> Result<Project, Diagnostics> {
        self.read_file(identity, name, path, text, String::new(), true);
        let mut project = Project {
            sources: Sources::default(),
            root_dir: self.root_dir.clone(),
            platforms: Vec::new(),
            args: Vec::new(),
            stages: Vec::new(),
            scopes: Vec::new(),
            images: Vec::new(),
            warnings: Vec::new(),
        };
        let stages = self.declare(&mut project);
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

    fn loc(file: FileId, span: SourceSpan) -> Loc {
        Loc { file, span }
    }

    fn error(
        &mut self,
        code: &str,
        message: impl Into<String>,
        at: Loc,
        label: impl Into<String>,
        help: Option<String>,
    ) {
        let mut diagnostic = Diagnostic::error(format!("graphbuild::{code}"), message).with_label(
            &self.sources,
            at,
            label,
        );
        if let Some(help) = help {
            diagnostic = diagnostic.with_help(help);
        }
        self.diagnostics.push(diagnostic);
    }

    // ----------------------------------------------------------------------------------------
    // Phase 1: reading files and imports

    fn read_file(
        &mut self,
        identity: String,
        name: String,
        path: Option<PathBuf>,
        text: String,
        prefix: String,
        is_root: bool,
    ) {
        let file = FileId(self.sources.files.len() as u32);
        let text = Arc::new(text);
        self.sources.files.push(Source {
            name: name.clone(),
            path: path.clone(),
            text: text.clone(),
        });
        let document = match KdlDocument::parse(&text) {
            Ok(document) => document,
            Err(error) => {
                for problem in &error.diagnostics {
                    let message = problem
                        .message
                        .clone()
                        .unwrap_or_else(|| "invalid KDL".to_string());
                    let help = problem.help.clone().unwrap_or_else(|| {
                        "see the KDL v2 syntax: quoted strings, `#true`/`#false`, `{ … }` for children".to_string()
                    });
                    self.error(
                        "kdl::syntax",
                        format!("KDL syntax error: {message}"),
                        Self::loc(file, problem.span),
                        problem.label.clone().unwrap_or_else(|| "here".to_string()),
                        Some(help),
                    );
                }
                return;
            }
        };
        self.import_stack.push((identity.clone(), name.clone()));
        let directory = path
            .as_ref()
            .and_then(|path| path.parent().map(Path::to_path_buf))
            .filter(|dir| !dir.as_os_str().is_empty())
            .unwrap_or_else(|| {
                if is_root {
                    self.root_dir.clone()
                } else {
                    PathBuf::from(".")
                }
            });
        let is_std = name.starts_with("std:");
        for node in document.nodes() {
            if node.name().value() == "import" {
                self.read_import(node, file, &directory, &prefix, is_std);
            }
        }
        self.import_stack.pop();
        self.files.push(LoadedFile {
            file,
            identity,
            document,
            prefix,
            is_root,
        });
    }

    fn read_import(
        &mut self,
        node: &KdlNode,
        file: FileId,
        directory: &Path,
        prefix: &str,
        from_std: bool,
    ) {
        let node_at = Self::loc(file, node.name().span());
        self.check_no_children(node, file, "import");
        let arguments = positional(node);
        let Some(first) = arguments.first() else {
            self.error(
                "import::missing",
                "`import` needs a module",
                node_at,
                "import what?",
                Some("write `import \"std:python\" as=\"py\"` or `import \"./common.kdl\"`".into()),
            );
            return;
        };
        for extra in arguments.iter().skip(1) {
            self.error(
                "node::extra_argument",
                "`import` takes one module",
                Self::loc(file, extra.span()),
                "extra argument",
                Some("write one `import` per module".into()),
            );
        }
        let mut alias = None;
        for (key, entry) in properties(node) {
            match key {
                "as" => {
                    if let Some(text) = self.string(entry, file, "`as`") {
                        let valid = !text.raw.is_empty()
                            && text
                                .raw
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                        if valid {
                            alias = Some(text.raw);
                        } else {
                            self.error(
                                "import::alias",
                                format!("invalid module alias `{}`", text.raw),
                                text.at,
                                "not a plain name",
                                Some("an alias is letters, digits, `_` and `-`, for example as=\"py\"".into()),
                            );
                        }
                    }
                }
                other => self.unknown_property(other, entry, file, "import", &["as"]),
            }
        }
        let Some(module) = self.string(first, file, "the module to import") else {
            return;
        };
        let child_prefix = match &alias {
            Some(alias) => format!("{prefix}{alias}."),
            None => prefix.to_string(),
        };
        let module_at = module.at;
        let (identity, name, path, text) = if let Some(std_name) = module.raw.strip_prefix("std:") {
            let Some(text) = crate::stdlib::module(std_name) else {
                let names = crate::stdlib::module_names();
                let help = match did_you_mean(std_name, names.iter().copied()) {
                    Some(close) => format!(
                        "did you mean `std:{close}`? available modules: {}",
                        names.join(", ")
                    ),
                    None => format!("available modules: {}", names.join(", ")),
                };
                self.error(
                    "import::unknown_std_module",
                    format!("unknown standard module `{}`", module.raw),
                    module_at,
                    "no such module",
                    Some(help),
                );
                return;
            };
            (
                module.raw.clone(),
                module.raw.clone(),
                None,
                text.to_string(),
            )
        } else {
            if from_std {
                self.error(
                    "import::local_from_std",
                    "a standard module can import only other `std:` modules",
                    module_at,
                    "local import",
                    None,
                );
                return;
            }
            // Lexically drop `.` components so names read well (`../modules/x.kdl`).
            let path: PathBuf = directory.join(&module.raw).components().collect();
            let read = if path.is_file() {
                std::fs::read_to_string(&path).map_err(|error| error.to_string())
            } else if path.exists() {
                Err("not a regular file".to_string())
            } else {
                Err("no such file".to_string())
            };
            let text = match read {
                Ok(text) => text,
                Err(error) => {
                    let available = crate::stdlib::module_names().join(", ");
                    self.error(
                        "import::missing_file",
                        format!("cannot read imported file `{}`: {error}", module.raw),
                        module_at,
                        "imported here",
                        Some(format!(
                            "local paths are relative to the importing file's folder; standard modules are written \"std:NAME\" ({available})"
                        )),
                    );
                    return;
                }
            };
            let identity = std::fs::canonicalize(&path)
                .map(|canonical| canonical.display().to_string())
                .unwrap_or_else(|_| path.display().to_string());
            let name = path
                .strip_prefix(&self.root_dir)
                .unwrap_or(&path)
                .display()
                .to_string();
            (identity, name, Some(path), text)
        };
        if let Some(position) = self
            .import_stack
            .iter()
            .position(|(open, _)| *open == identity)
        {
            let mut chain: Vec<String> = self.import_stack[position..]
                .iter()
                .map(|(_, name)| name.clone())
                .collect();
            chain.push(name.clone());
            self.error(
                "import::cycle",
                format!("import cycle: {}", chain.join(" → ")),
                module_at,
                "imports a file that is already being imported",
                Some("move what both files need into a third file that neither imports".into()),
            );
            return;
        }
        if !self
            .imported
            .insert((identity.clone(), child_prefix.clone()))
        {
            return;
        }
        self.read_file(identity, name, path, text, child_prefix, false);
    }

    // ----------------------------------------------------------------------------------------
    // Phase 2: declarations

    fn declare(&mut self, project: &mut Project) -> Vec<StageDeclaration> {
        let mut stages = Vec::new();
        let mut template_names: HashMap<String, Loc> = HashMap::new();
        let mut arg_names: HashMap<String, (Loc, String)> = HashMap::new();
        let mut platforms_at: Option<Loc> = None;
        let files = std::mem::take(&mut self.files);
        for (file_index, loaded) in files.iter().enumerate() {
            let file = loaded.file;
            for node in loaded.document.nodes() {
                let node_at = Self::loc(file, node.name().span());
                match node.name().value() {
                    "import" => {}
                    "platforms" => {
                        if !loaded.is_root {
                            self.error(
                                "module::platforms",
                                "an imported module cannot set the default platforms",
                                node_at,
                                "in an imported module",
                                Some(
                                    "set `platforms` in the root build file or on an image".into(),
                                ),
                            );
                            continue;
                        }
                        if let Some(first) = platforms_at {
                            let diagnostic = Diagnostic::error(
                                "graphbuild::duplicate::platforms",
                                "`platforms` is set twice",
                            )
                            .with_label(&self.sources, node_at, "set again here")
                            .with_label(&self.sources, first, "first set here")
                            .with_help("list every platform in one `platforms` node");
                            self.diagnostics.push(diagnostic);
                            continue;
                        }
                        platforms_at = Some(node_at);
                        self.check_no_children(node, file, "platforms");
                        self.check_no_properties(node, file, "platforms");
                        project.platforms = self.platform_list(node, file);
                    }
                    "arg" => {
                        self.check_no_children(node, file, "arg");
                        for declaration in self.arg_declarations(node, file) {
                            if let Some((first, identity)) = arg_names.get(&declaration.name) {
                                if *identity == loaded.identity {
                                    // The same file imported under another alias.
                                    continue;
                                }
                                let diagnostic = Diagnostic::error(
                                    "graphbuild::duplicate::arg",
                                    format!("arg `{}` is declared twice", declaration.name),
                                )
                                .with_label(&self.sources, declaration.at, "declared again here")
                                .with_label(&self.sources, *first, "first declared here")
                                .with_help("keep one declaration; override a value with `--arg NAME=VALUE`");
                                self.diagnostics.push(diagnostic);
                                continue;
                            }
                            arg_names.insert(
                                declaration.name.clone(),
                                (declaration.at, loaded.identity.clone()),
                            );
                            project.args.push(declaration);
                        }
                    }
                    "stage" => {
                        let Some(name) = self.node_name(node, file, "stage") else {
                            continue;
                        };
                        let full_name = format!("{}{}", loaded.prefix, name.raw);
                        if let Some(first) = self.stage_names.get(&full_name) {
                            let diagnostic = Diagnostic::error(
                                "graphbuild::duplicate::stage",
                                format!("stage `{full_name}` is defined twice"),
                            )
                            .with_label(&self.sources, name.at, "defined again here")
                            .with_label(&self.sources, *first, "first defined here")
                            .with_help("rename one of the stages");
                            self.diagnostics.push(diagnostic);
                            continue;
                        }
                        self.stage_names.insert(full_name.clone(), name.at);
                        stages.push(StageDeclaration {
                            full_name,
                            file_index,
                            node: node.clone(),
                        });
                    }
                    "template" => {
                        let Some(name) = self.node_name(node, file, "template") else {
                            continue;
                        };
                        let full_name = format!("{}{}", loaded.prefix, name.raw);
                        if let Some(first) = template_names.get(&full_name) {
                            let diagnostic = Diagnostic::error(
                                "graphbuild::duplicate::template",
                                format!("template `{full_name}` is defined twice"),
                            )
                            .with_label(&self.sources, name.at, "defined again here")
                            .with_label(&self.sources, *first, "first defined here")
                            .with_help(
                                "rename one of the templates, or import a module with as=\"ALIAS\"",
                            );
                            self.diagnostics.push(diagnostic);
                            continue;
                        }
                        template_names.insert(full_name.clone(), name.at);
                        self.declare_template(node, file, file_index, full_name, name.at);
                    }
                    "image" => {
                        if !loaded.is_root {
                            self.error(
                                "module::image",
                                "an imported module cannot define images",
                                node_at,
                                "in an imported module",
                                Some("define images in the root build file; modules provide stages, templates and args".into()),
                            );
                        }
                        // Lowered in phase 3.
                    }
                    other => {
                        self.unknown_node(node, file, other, TOP_LEVEL_NODES, "at the top level")
                    }
                }
            }
        }
        self.files = files;
        stages
    }

    fn declare_template(
        &mut self,
        node: &KdlNode,
        file: FileId,
        file_index: usize,
        full_name: String,
        at: Loc,
    ) {
        self.check_no_properties(node, file, "template");
        let mut params: Vec<(String, Option<Text>, Loc)> = Vec::new();
        let mut stages = Vec::new();
        let mut stage_names: HashMap<String, Loc> = HashMap::new();
        if let Some(children) = node.children() {
            for child in children.nodes() {
                match child.name().value() {
                    "param" => {
                        self.check_no_children(child, file, "param");
                        let Some(name) = self.node_name(child, file, "param") else {
                            continue;
                        };
                        let mut default = None;
                        for (key, entry) in properties(child) {
                            match key {
                                "default" => {
                                    default = self.string_or_integer(entry, file, "a param default")
                                }
                                "description" => {
                                    self.string(entry, file, "a param description");
                                }
                                other => self.unknown_property(
                                    other,
                                    entry,
                                    file,
                                    "param",
                                    &["default", "description"],
                                ),
                            }
                        }
                        if let Some((_, _, first)) =
                            params.iter().find(|(existing, _, _)| *existing == name.raw)
                        {
                            let diagnostic = Diagnostic::error(
                                "graphbuild::duplicate::param",
                                format!("param `{}` is declared twice", name.raw),
                            )
                            .with_label(&self.sources, name.at, "declared again here")
                            .with_label(&self.sources, *first, "first declared here")
                            .with_help("keep one declaration");
                            self.diagnostics.push(diagnostic);
                            continue;
                        }
                        params.push((name.raw, default, name.at));
                    }
                    "stage" => {
                        let Some(name) = self.node_name(child, file, "stage") else {
                            continue;
                        };
                        if let Some(first) = stage_names.get(&name.raw) {
                            let diagnostic = Diagnostic::error(
                                "graphbuild::duplicate::stage",
                                format!(
                                    "stage `{}` is defined twice in template `{full_name}`",
                                    name.raw
                                ),
                            )
                            .with_label(&self.sources, name.at, "defined again here")
                            .with_label(&self.sources, *first, "first defined here")
                            .with_help("rename one of the stages");
                            self.diagnostics.push(diagnostic);
                            continue;
                        }
                        stage_names.insert(name.raw, name.at);
                        stages.push(child.clone());
                    }
                    other => self.unknown_node(child, file, other, TEMPLATE_NODES, "in a template"),
                }
            }
        }
        if stages.is_empty() {
            self.error(
                "template::no_stage",
                format!("template `{full_name}` has no stage"),
                at,
                "empty template",
                Some("add `stage NAME { from … }`; the last stage is the result of a `use`".into()),
            );
        }
        self.templates.push(TemplateDefinition {
            full_name,
            file_index,
            at,
            params,
            stages,
        });
    }

    // ----------------------------------------------------------------------------------------
    // Small readers with diagnostics

    fn unknown_node(
        &mut self,
        node: &KdlNode,
        file: FileId,
        name: &str,
        allowed: &[&str],
        place: &str,
    ) {
        let help = match did_you_mean(name, allowed.iter().copied()) {
            Some(close) => format!(
                "did you mean `{close}`? allowed {place}: {}",
                allowed.join(", ")
            ),
            None => format!("allowed {place}: {}", allowed.join(", ")),
        };
        self.error(
            "unknown::node",
            format!("unknown node `{name}` {place}"),
            Self::loc(file, node.name().span()),
            "unknown node",
            Some(help),
        );
    }

    fn unknown_property(
        &mut self,
        key: &str,
        entry: &KdlEntry,
        file: FileId,
        node: &str,
        allowed: &[&str],
    ) {
        let help = if allowed.is_empty() {
            format!("`{node}` takes no properties")
        } else {
            match did_you_mean(key, allowed.iter().copied()) {
                Some(close) => format!(
                    "did you mean `{close}`? `{node}` accepts: {}",
                    allowed.join(", ")
                ),
                None => format!("`{node}` accepts: {}", allowed.join(", ")),
            }
        };
        self.error(
            "unknown::property",
            format!("unknown property `{key}` on `{node}`"),
            Self::loc(file, entry.span()),
            "unknown property",
            Some(help),
        );
    }

    fn check_no_children(&mut self, node: &KdlNode, file: FileId, name: &str) {
        if let Some(children) = node.children() {
            self.error(
                "node::unexpected_children",
                format!("`{name}` takes no children block"),
                Self::loc(file, children.span()),
                "unexpected block",
                Some("remove the `{ … }` block".into()),
            );
        }
    }

    fn check_no_properties(&mut self, node: &KdlNode, file: FileId, name: &str) {
        for (key, entry) in properties(node) {
            self.unknown_property(key, entry, file, name, &[]);
        }
    }

    fn check_no_arguments(&mut self, node: &KdlNode, file: FileId, name: &str) {
        for entry in positional(node) {
            self.error(
                "node::extra_argument",
                format!("`{name}` takes no arguments"),
                Self::loc(file, entry.span()),
                "unexpected argument",
                None,
            );
        }
    }

    /// A string value. Anything else is a type error.
    fn string(&mut self, entry: &KdlEntry, file: FileId, what: &str) -> Option<Text> {
        let at = Self::loc(file, entry.span());
        match entry.value() {
            KdlValue::String(value) => Some(Text {
                raw: value.clone(),
                at,
            }),
            other => {
                let kind = value_kind(other);
                self.error(
                    "type::expected_string",
                    format!("expected a string for {what}, found {kind}"),
                    at,
                    kind,
                    Some("quote the value: paths, platforms, references and versions are strings in KDL v2".into()),
                );
                None
            }
        }
    }

    /// A string, or an integer taken as its decimal text (ports, user ids, matrix values).
    fn string_or_integer(&mut self, entry: &KdlEntry, file: FileId, what: &str) -> Option<Text> {
        if let KdlValue::Integer(number) = entry.value() {
            return Some(Text {
                raw: number.to_string(),
                at: Self::loc(file, entry.span()),
            });
        }
        self.string(entry, file, what)
    }

    fn boolean(&mut self, entry: &KdlEntry, file: FileId, what: &str) -> Option<bool> {
        match entry.value() {
            KdlValue::Bool(value) => Some(*value),
            other => {
                let kind = value_kind(other);
                self.error(
                    "type::expected_boolean",
                    format!("expected a boolean for {what}, found {kind}"),
                    Self::loc(file, entry.span()),
                    kind,
                    Some("KDL v2 booleans are written #true and #false".into()),
                );
                None
            }
        }
    }

    /// The single name argument of `stage NAME`, `template NAME`, `param NAME`.
    fn node_name(&mut self, node: &KdlNode, file: FileId, kind: &str) -> Option<Text> {
        let arguments = positional(node);
        let Some(first) = arguments.first() else {
            self.error(
                "node::missing_name",
                format!("`{kind}` needs a name"),
                Self::loc(file, node.name().span()),
                "name missing",
                Some(format!("write `{kind} NAME …`")),
            );
            return None;
        };
        for extra in arguments.iter().skip(1) {
            self.error(
                "node::extra_argument",
                format!("`{kind}` takes one name"),
                Self::loc(file, extra.span()),
                "extra argument",
                None,
            );
        }
        let name = self.string(first, file, &format!("the {kind} name"))?;
        let valid = !name.raw.is_empty()
            && name
                .raw
                .chars()
                .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.'))
            && !name.raw.starts_with('.');
        if !valid {
            self.error(
                "node::invalid_name",
                format!("invalid {kind} name `{}`", name.raw),
                name.at,
                "not a plain name",
                Some("names are letters, digits, `_`, `-` and `.`".into()),
            );
            return None;
        }
        Some(name)
    }

    /// Every positional argument as a string (strings or integers when `integers`).
    /// Exactly one string argument (`cache-mount "/path"`, `secret "id"`); anything else is
    /// reported once (`string_arguments` already reports arguments of the wrong type).
    fn single_string_argument(
        &mut self,
        node: &KdlNode,
        file: FileId,
        at: Loc,
        (code, what, message, label): (&str, &str, &str, &str),
        help: &str,
    ) -> Option<Text> {
        let mut values = self.string_arguments(node, file, what, false);
        if values.len() != 1 {
            if positional(node).len() != 1 {
                self.error(code, message, at, label, Some(help.to_string()));
            }
            return None;
        }
        values.pop()
    }

    fn string_arguments(
        &mut self,
        node: &KdlNode,
        file: FileId,
        what: &str,
        integers: bool,
    ) -> Vec<Text> {
        positional(node)
            .into_iter()
            .filter_map(|entry| {
                if integers {
                    self.string_or_integer(entry, file, what)
                } else {
                    self.string(entry, file, what)
                }
            })
            .collect()
    }

    /// `NAME="value"` properties (env, label, annotation), with no positional arguments.
    fn key_values(&mut self, node: &KdlNode, file: FileId, kind: &str) -> Vec<(String, Text)> {
        for entry in positional(node) {
            self.error(
                "node::expected_property",
                format!("`{kind}` takes KEY=\"value\" pairs"),
                Self::loc(file, entry.span()),
                "not a KEY=\"value\" pair",
                Some(format!("write `{kind} KEY=\"value\"`; quote keys with dots: `{kind} \"org.example\"=\"x\"`")),
            );
        }
        let pairs: Vec<(String, Text)> = properties(node)
            .into_iter()
            .filter_map(|(key, entry)| {
                self.string_or_integer(entry, file, &format!("`{key}`"))
                    .map(|value| (key.to_string(), value))
            })
            .collect();
        if pairs.is_empty() && node.entries().is_empty() {
            self.error(
                "node::missing_value",
                format!("`{kind}` needs at least one KEY=\"value\""),
                Self::loc(file, node.name().span()),
                "nothing set",
                None,
            );
        }
        pairs
    }

    fn platform_spec(&mut self, text: Text) -> Option<PlatformSpec> {
        if text.raw.contains('$') {
            return Some(PlatformSpec::Dynamic(text));
        }
        match Platform::parse(&text.raw) {
            Ok(platform) => Some(PlatformSpec::Literal(platform, text.at)),
            Err(error) => {
                let help = miette::Diagnostic::help(&error)
                    .map(|help| help.to_string())
                    .unwrap_or_default();
                self.error(
                    "platform::invalid",
                    format!("malformed platform: {error}"),
                    text.at,
                    "malformed platform",
                    Some(help),
                );
                None
            }
        }
    }

    fn platform_list(&mut self, node: &KdlNode, file: FileId) -> Vec<PlatformSpec> {
        let texts = self.string_arguments(node, file, "a platform", false);
        if texts.is_empty() && positional(node).is_empty() {
            self.error(
                "platform::missing",
                "`platforms` needs at least one platform",
                Self::loc(file, node.name().span()),
                "no platform",
                Some("for example `platforms \"linux/amd64\" \"linux/arm64\"`".into()),
            );
        }
        texts
            .into_iter()
            .filter_map(|text| self.platform_spec(text))
            .collect()
    }

    /// `arg NAME`, `arg NAME="default"`, several per node.
    fn arg_declarations(&mut self, node: &KdlNode, file: FileId) -> Vec<ArgDecl> {
        let mut declarations = Vec::new();
        for entry in node.entries() {
            let at = Self::loc(file, entry.span());
            let (name, default) = match entry.name() {
                Some(name) => (
                    name.value().to_string(),
                    self.string_or_integer(entry, file, "an arg default"),
                ),
                None => match entry.value() {
                    KdlValue::String(name) => (name.clone(), None),
                    other => {
                        let kind = value_kind(other);
                        self.error(
                            "type::expected_string",
                            format!("expected an arg name, found {kind}"),
                            at,
                            kind,
                            Some("write `arg NAME` or `arg NAME=\"default\"`".into()),
                        );
                        continue;
                    }
                },
            };
            let valid = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                self.error(
                    "arg::invalid_name",
                    format!("invalid arg name `{name}`"),
                    at,
                    "not a variable name",
                    Some(
                        "an arg name starts with a letter or `_` and has letters, digits and `_`"
                            .into(),
                    ),
                );
                continue;
            }
            if AUTOMATIC_ARGS.contains(&name.as_str()) && default.is_some() {
                self.error(
                    "arg::automatic",
                    format!("`{name}` is an automatic arg and cannot have a default"),
                    at,
                    "set per platform by graphbuild",
                    Some(format!("declare it as `arg {name}` without a value, or choose platforms with `platforms`")),
                );
                continue;
            }
            declarations.push(ArgDecl { name, default, at });
        }
        if node.entries().is_empty() {
            self.error(
                "arg::missing",
                "`arg` needs a name",
                Self::loc(file, node.name().span()),
                "name missing",
                Some("write `arg NAME` or `arg NAME=\"default\"`".into()),
            );
        }
        declarations
    }

    // ----------------------------------------------------------------------------------------
    // Phase 3: lowering stages

    fn resolve_stage(&self, name: &str, resolver: &Resolver<'_>) -> Option<String> {
        if let Some((siblings, instance)) = resolver.siblings
            && siblings.iter().any(|sibling| sibling == name)
        {
            return Some(format!("{instance}/{name}"));
        }
        let prefixed = format!("{}{name}", resolver.prefix);
        if self.stage_names.contains_key(&prefixed) {
            return Some(prefixed);
        }
        if self.stage_names.contains_key(name) {
            return Some(name.to_string());
        }
        None
    }

    fn stage_candidates<'a>(&'a self, resolver: &'a Resolver<'_>) -> Vec<String> {
        let mut candidates: Vec<String> = self.stage_names.keys().cloned().collect();
        if let Some((siblings, _)) = resolver.siblings {
            candidates.extend(siblings.iter().cloned());
        }
        candidates.sort();
        candidates
    }

    fn unknown_stage(
        &mut self,
        name: &str,
        at: Loc,
        resolver: &Resolver<'_>,
        image_ref_allowed: bool,
    ) {
        let candidates = self.stage_candidates(resolver);
        let mut help = match did_you_mean(name, candidates.iter().map(String::as_str)) {
            Some(close) => format!("did you mean `{close}`?"),
            None if candidates.is_empty() => "no stage is defined".to_string(),
            None => format!("defined stages: {}", candidates.join(", ")),
        };
        if image_ref_allowed {
            help.push_str(&format!(
                "; an image from Docker Hub must be written `docker.io/library/{name}` or `{name}:TAG`"
            ));
        }
        self.error(
            "unknown::stage",
            format!("unknown stage `{name}`"),
            at,
            "not a stage",
            Some(help),
        );
    }

    fn lower_from(&mut self, text: Text, resolver: &Resolver<'_>) -> Option<From> {
        let at = text.at;
        let raw = text.raw.as_str();
        let source = if raw == "scratch" {
            FromSource::Scratch
        } else if raw.contains('$') || raw.starts_with("oci:") {
            FromSource::Image(text)
        } else if let Some(stage) = self.resolve_stage(raw, resolver) {
            FromSource::Stage(stage)
        } else if is_image_reference(raw) {
            FromSource::Image(text)
        } else {
            self.unknown_stage(raw, at, resolver, true);
            return None;
        };
        Some(From { source, at })
    }

    fn lower_stage(
        &mut self,
        node: &KdlNode,
        file: FileId,
        name: String,
        resolver: &Resolver<'_>,
        scope: Option<ScopeId>,
    ) -> Option<Stage> {
        let name_at = positional(node)
            .first()
            .map(|entry| Self::loc(file, entry.span()))
            .unwrap_or_else(|| Self::loc(file, node.name().span()));
        self.check_no_properties(node, file, "stage");
        let mut from: Option<From> = None;
        let mut from_seen: Option<Loc> = None;
        let mut platform: Option<PlatformSpec> = None;
        let mut platform_seen: Option<Loc> = None;
        let mut steps = Vec::new();
        let children: Vec<KdlNode> = node
            .children()
            .map(|children| children.nodes().to_vec())
            .unwrap_or_default();
        for child in &children {
            let child_at = Self::loc(file, child.name().span());
            match child.name().value() {
                "from" => {
                    if let Some(first) = from_seen {
                        let diagnostic = Diagnostic::error(
                            "graphbuild::duplicate::from",
                            "a stage has one `from`",
                        )
                        .with_label(&self.sources, child_at, "second `from`")
                        .with_label(&self.sources, first, "first `from`")
                        .with_help("use another stage to combine images: `copy … from=OTHER`");
                        self.diagnostics.push(diagnostic);
                        continue;
                    }
                    from_seen = Some(child_at);
                    if let Some(text) =
                        self.single_string(child, file, "from", "an image, a stage or \"scratch\"")
                    {
                        from = self.lower_from(text, resolver);
                    }
                }
                "platform" => {
                    if let Some(first) = platform_seen {
                        let diagnostic = Diagnostic::error(
                            "graphbuild::duplicate::platform",
                            "a stage has one `platform`",
                        )
                        .with_label(&self.sources, child_at, "second `platform`")
                        .with_label(&self.sources, first, "first `platform`")
                        .with_help("use `when platform=\"…\" { … }` for per-platform steps");
                        self.diagnostics.push(diagnostic);
                        continue;
                    }
                    platform_seen = Some(child_at);
                    if let Some(text) = self.single_string(child, file, "platform", "a platform") {
                        platform = self.platform_spec(text);
                    }
                }
                "when" => self.lower_when(child, file, resolver, &mut steps),
                other => {
                    if let Some(kind) =
                        self.lower_step(child, file, resolver, other, STAGE_NODES, "in a stage")
                    {
                        steps.push(Step {
                            kind,
                            at: child_at,
                            when: None,
                        });
                    }
                }
            }
        }
        let Some(from) = from else {
            if from_seen.is_none() {
                self.error(
                    "stage::missing_from",
                    format!("stage `{name}` has no `from`"),
                    name_at,
                    "no base",
                    Some("start the stage with `from \"scratch\"`, `from OTHER_STAGE` or `from \"docker.io/library/alpine:3.20\"`".into()),
                );
            }
            return None;
        };
        Some(Stage {
            name,
            at: name_at,
            from,
            platform,
            steps,
            scope,
        })
    }

    /// A node with exactly one string argument and nothing else.
    fn single_string(
        &mut self,
        node: &KdlNode,
        file: FileId,
        kind: &str,
        what: &str,
    ) -> Option<Text> {
        self.single_value(node, file, kind, what, false)
    }

    /// Like [`Self::single_string`], also accepting an integer (`user 1000`, `stopsignal 15`).
    fn single_value(
        &mut self,
        node: &KdlNode,
        file: FileId,
        kind: &str,
        what: &str,
        integers: bool,
    ) -> Option<Text> {
        self.check_no_children(node, file, kind);
        self.check_no_properties(node, file, kind);
        let arguments = positional(node);
        for extra in arguments.iter().skip(1) {
            self.error(
                "node::extra_argument",
                format!("`{kind}` takes one value"),
                Self::loc(file, extra.span()),
                "extra argument",
                None,
            );
        }
        let Some(first) = arguments.first() else {
            self.error(
                "node::missing_value",
                format!("`{kind}` needs {what}"),
                Self::loc(file, node.name().span()),
                "value missing",
                None,
            );
            return None;
        };
        if integers {
            self.string_or_integer(first, file, &format!("`{kind}`"))
        } else {
            self.string(first, file, &format!("`{kind}`"))
        }
    }

    fn lower_when(
        &mut self,
        node: &KdlNode,
        file: FileId,
        resolver: &Resolver<'_>,
        steps: &mut Vec<Step>,
    ) {
        let node_at = Self::loc(file, node.name().span());
        self.check_no_arguments(node, file, "when");
        let mut platform = None;
        let mut platform_seen = false;
        for (key, entry) in properties(node) {
            match key {
                "platform" => {
                    platform_seen = true;
                    if let Some(text) = self.string(entry, file, "`platform`") {
                        if text.raw.contains('$') {
                            self.error(
                                "when::dynamic_platform",
                                "`when platform=` must be a literal platform",
                                text.at,
                                "contains a variable",
                                Some("write the platform it applies to, for example when platform=\"linux/arm/v7\"".into()),
                            );
                        } else if let Some(PlatformSpec::Literal(parsed, _)) =
                            self.platform_spec(text)
                        {
                            platform = Some(parsed);
                        }
                    }
                }
                other => self.unknown_property(other, entry, file, "when", &["platform"]),
            }
        }
        if !platform_seen {
            self.error(
                "when::missing_platform",
                "`when` needs platform=\"…\"",
                node_at,
                "no condition",
                Some("write `when platform=\"linux/arm64\" { … }`".into()),
            );
        }
        let children: Vec<KdlNode> = node
            .children()
            .map(|children| children.nodes().to_vec())
            .unwrap_or_default();
        for child in &children {
            let child_at = Self::loc(file, child.name().span());
            let name = child.name().value();
            if let Some(kind) =
                self.lower_step(child, file, resolver, name, WHEN_NODES, "in `when`")
                && let Some(platform) = &platform
            {
                steps.push(Step {
                    kind,
                    at: child_at,
                    when: Some(platform.clone()),
                });
            }
        }
    }

    fn lower_step(
        &mut self,
        node: &KdlNode,
        file: FileId,
        resolver: &Resolver<'_>,
        name: &str,
        allowed: &[&str],
        place: &str,
    ) -> Option<StepKind> {
        if !allowed.contains(&name) {
            self.unknown_node(node, file, name, allowed, place);
            return None;
        }
        let node_at = Self::loc(file, node.name().span());
        match name {
            "run" => self.lower_run(node, file).map(StepKind::Run),
            "copy" => self.lower_copy(node, file, resolver).map(StepKind::Copy),
            "env" => {
                self.check_no_children(node, file, name);
                let pairs = self.key_values(node, file, name);
                (!pairs.is_empty()).then_some(StepKind::Env(pairs))
            }
            "label" => {
                self.check_no_children(node, file, name);
                let pairs = self.key_values(node, file, name);
                (!pairs.is_empty()).then_some(StepKind::Label(pairs))
            }
            "arg" => {
                self.check_no_children(node, file, name);
                let mut declarations = self.arg_declarations(node, file);
                if declarations.len() > 1 {
                    self.error(
                        "arg::several_in_stage",
                        "`arg` in a stage declares one arg",
                        node_at,
                        "several args",
                        Some("write one `arg` node per name".into()),
                    );
                }
                declarations.drain(..).next().map(StepKind::Arg)
            }
            "workdir" => self
                .single_string(node, file, name, "a directory")
                .map(StepKind::Workdir),
            "user" => self
                .single_value(node, file, name, "a user", true)
                .map(StepKind::User),
            "stopsignal" => self
                .single_value(node, file, name, "a signal", true)
                .map(StepKind::StopSignal),
            "expose" | "volume" | "shell" => {
                self.check_no_children(node, file, name);
                self.check_no_properties(node, file, name);
                let values =
                    self.string_arguments(node, file, &format!("`{name}`"), name == "expose");
                if values.is_empty() {
                    if positional(node).is_empty() {
                        self.error(
                            "node::missing_value",
                            format!("`{name}` needs at least one value"),
                            node_at,
                            "value missing",
                            None,
                        );
                    }
                    return None;
                }
                Some(match name {
                    "expose" => StepKind::Expose(values),
                    "volume" => StepKind::Volume(values),
                    _ => StepKind::Shell(values),
                })
            }
            "entrypoint" | "cmd" => {
                self.check_no_children(node, file, name);
                let command = self.argv_command(node, file, name)?;
                Some(if name == "entrypoint" {
                    StepKind::Entrypoint(command)
                } else {
                    StepKind::Cmd(command)
                })
            }
            "healthcheck" => self
                .lower_healthcheck(node, file)
                .map(StepKind::Healthcheck),
            _ => None,
        }
    }

    /// `entrypoint`/`cmd`: argv unless `shell=#true`.
    fn argv_command(&mut self, node: &KdlNode, file: FileId, name: &str) -> Option<Command> {
        let mut shell = false;
        for (key, entry) in properties(node) {
            match key {
                "shell" => shell = self.boolean(entry, file, "`shell`").unwrap_or(false),
                other => self.unknown_property(other, entry, file, name, &["shell"]),
            }
        }
        let arguments = self.string_arguments(node, file, &format!("`{name}`"), false);
        if arguments.is_empty() {
            if positional(node).is_empty() {
                self.error(
                    "node::missing_value",
                    format!("`{name}` needs a command"),
                    Self::loc(file, node.name().span()),
                    "command missing",
                    Some(format!(
                        "write `{name} \"/app\" \"--flag\"` (argv), or `{name} \"…\" shell=#true`"
                    )),
                );
            }
            return None;
        }
        if shell {
            if arguments.len() > 1 {
                self.error(
                    "command::shell_form",
                    format!("`{name} … shell=#true` takes one command string"),
                    Self::loc(file, node.name().span()),
                    "several strings",
                    Some("join the command into one string, or drop shell=#true for argv".into()),
                );
                return None;
            }
            return arguments.into_iter().next().map(Command::Shell);
        }
        Some(Command::Exec(arguments))
    }

    /// `run`-style: one string is shell form, several are argv.
    fn run_command(&mut self, node: &KdlNode, file: FileId, name: &str) -> Option<Command> {
        let mut arguments = self.string_arguments(node, file, &format!("`{name}`"), false);
        if arguments.is_empty() {
            if positional(node).is_empty() {
                self.error(
                    "node::missing_value",
                    format!("`{name}` needs a command"),
                    Self::loc(file, node.name().span()),
                    "command missing",
                    Some(format!(
                        "write `{name} \"make all\"` (shell) or `{name} \"make\" \"all\"` (argv)"
                    )),
                );
            }
            return None;
        }
        if arguments.len() == 1 {
            return arguments.pop().map(Command::Shell);
        }
        Some(Command::Exec(arguments))
    }

    fn lower_run(&mut self, node: &KdlNode, file: FileId) -> Option<Run> {
        self.check_no_properties(node, file, "run");
        let command = self.run_command(node, file, "run");
        let mut cache_mounts = Vec::new();
        let mut secrets = Vec::new();
        let mut network = Network::default();
        let mut network_seen = false;
        let children: Vec<KdlNode> = node
            .children()
            .map(|children| children.nodes().to_vec())
            .unwrap_or_default();
        for child in &children {
            let child_at = Self::loc(file, child.name().span());
            match child.name().value() {
                "cache-mount" => {
                    self.check_no_children(child, file, "cache-mount");
                    let mut id = None;
                    let mut sharing = CacheSharing::Shared;
                    for (key, entry) in properties(child) {
                        match key {
                            "id" => id = self.string(entry, file, "`id`"),
                            "sharing" => {
                                let Some(text) = self.string(entry, file, "`sharing`") else {
                                    continue;
                                };
                                sharing = match text.raw.as_str() {
                                    "shared" => CacheSharing::Shared,
                                    "private" => CacheSharing::Private,
                                    "locked" => CacheSharing::Locked,
                                    other => {
                                        let modes = ["shared", "private", "locked"];
                                        let help = match did_you_mean(other, modes) {
                                            Some(close) => format!(
                                                "did you mean \"{close}\"? sharing is \"shared\", \"private\" or \"locked\""
                                            ),
                                            None => "sharing is \"shared\" (the default), \"private\" or \"locked\"".to_string(),
                                        };
                                        self.error(
                                            "run::cache_mount_sharing",
                                            format!("unknown cache mount sharing `{other}`"),
                                            text.at,
                                            "unknown sharing",
                                            Some(help),
                                        );
                                        continue;
                                    }
                                };
                            }
                            other => self.unknown_property(
                                other,
                                entry,
                                file,
                                "cache-mount",
                                &["id", "sharing"],
                            ),
                        }
                    }
                    let Some(target) = self.single_string_argument(
                        child,
                        file,
                        child_at,
                        (
                            "run::cache_mount",
                            "a cache mount path",
                            "`cache-mount` takes one path",
                            "one path expected",
                        ),
                        "write `cache-mount \"/root/.cache\" id=\"pip\"`",
                    ) else {
                        continue;
                    };
                    cache_mounts.push(CacheMount {
                        target,
                        id,
                        sharing,
                        at: child_at,
                    });
                }
                "secret" => {
                    self.check_no_children(child, file, "secret");
                    let mut target = None;
                    let mut env = None;
                    let mut required = true;
                    for (key, entry) in properties(child) {
                        match key {
                            "target" => target = self.string(entry, file, "`target`"),
                            "env" => env = self.string(entry, file, "`env`").map(|text| text.raw),
                            "required" => {
                                required = self.boolean(entry, file, "`required`").unwrap_or(true)
                            }
                            other => self.unknown_property(
                                other,
                                entry,
                                file,
                                "secret",
                                &["target", "env", "required"],
                            ),
                        }
                    }
                    let Some(id) = self.single_string_argument(
                        child,
                        file,
                        child_at,
                        ("run::secret", "a secret id", "`secret` takes one id", "one id expected"),
                        "write `secret \"npmrc\" target=\"/root/.npmrc\"` and pass `--secret id=npmrc,src=FILE`",
                    ) else {
                        continue;
                    };
                    secrets.push(Secret {
                        id: id.raw,
                        target,
                        env,
                        required,
                        at: child_at,
                    });
                }
                "network" => {
                    if network_seen {
                        self.error(
                            "duplicate::network",
                            "`network` is set twice",
                            child_at,
                            "set again",
                            None,
                        );
                        continue;
                    }
                    network_seen = true;
                    if let Some(text) =
                        self.single_string(child, file, "network", "\"none\" or \"host\"")
                    {
                        match text.raw.as_str() {
                            "none" => network = Network::None,
                            "host" => network = Network::Host,
                            other => {
                                let help = match did_you_mean(other, ["none", "host"]) {
                                    Some(close) => format!(
                                        "did you mean \"{close}\"? the network is \"none\" or \"host\""
                                    ),
                                    None => "the network is \"none\" or \"host\"".to_string(),
                                };
                                self.error(
                                    "run::network",
                                    format!("unknown network mode `{other}`"),
                                    text.at,
                                    "unknown mode",
                                    Some(help),
                                );
                            }
                        }
                    }
                }
                other => self.unknown_node(child, file, other, RUN_NODES, "in `run`"),
            }
        }
        Some(Run {
            command: command?,
            cache_mounts,
            secrets,
            network,
        })
    }

    fn lower_copy(
        &mut self,
        node: &KdlNode,
        file: FileId,
        resolver: &Resolver<'_>,
    ) -> Option<Copy> {
        self.check_no_children(node, file, "copy");
        let mut from = None;
        let mut chown = None;
        let mut chmod = None;
        let mut failed = false;
        for (key, entry) in properties(node) {
            match key {
                "from" => match self.string(entry, file, "`from`") {
                    Some(text) => from = Some(text),
                    None => failed = true,
                },
                "chown" => chown = self.string_or_integer(entry, file, "`chown`"),
                "chmod" => {
                    if let KdlValue::Integer(number) = entry.value() {
                        self.error(
                            "type::expected_string",
                            "expected a string for `chmod`, found an integer",
                            Self::loc(file, entry.span()),
                            "an integer",
                            Some(format!("quote the octal mode: chmod=\"0{number}\"")),
                        );
                        failed = true;
                        continue;
                    }
                    chmod = self.string(entry, file, "`chmod`");
                    if let Some(text) = &chmod
                        && !text.raw.contains('$')
                        && (text.raw.is_empty()
                            || text.raw.len() > 4
                            || !text.raw.chars().all(|c| ('0'..='7').contains(&c)))
                    {
                        self.error(
                            "copy::chmod",
                            format!("invalid mode `{}`", text.raw),
                            text.at,
                            "not an octal mode",
                            Some("write an octal mode such as chmod=\"0755\"".into()),
                        );
                        failed = true;
                    }
                }
                other => {
                    self.unknown_property(other, entry, file, "copy", &["from", "chown", "chmod"])
                }
            }
        }
        let mut paths = self.string_arguments(node, file, "a copy path", false);
        if positional(node).len() < 2 {
            self.error(
                "copy::arguments",
                "`copy` needs at least a source and a destination",
                Self::loc(file, node.name().span()),
                "sources and destination expected",
                Some(
                    "write `copy \"src/\" \"/app/\"`; several sources may precede the destination"
                        .into(),
                ),
            );
            return None;
        }
        let dest = paths.pop()?;
        let from = match from {
            None => None,
            Some(text) => {
                let raw = text.raw.as_str();
                if raw == "scratch" {
                    self.error(
                        "copy::from_scratch",
                        "cannot copy from `scratch`: it is empty",
                        text.at,
                        "empty filesystem",
                        Some("name a stage or an image to copy from".into()),
                    );
                    return None;
                } else if raw.contains('$') || raw.starts_with("oci:") {
                    Some(CopyFrom::Image(text))
                } else if let Some(stage) = self.resolve_stage(raw, resolver) {
                    Some(CopyFrom::Stage(stage, text.at))
                } else if is_image_reference(raw) {
                    Some(CopyFrom::Image(text))
                } else {
                    self.unknown_stage(raw, text.at, resolver, true);
                    return None;
                }
            }
        };
        if failed || paths.is_empty() {
            return None;
        }
        Some(Copy {
            sources: paths,
            dest,
            from,
            chown,
            chmod,
        })
    }

    fn lower_healthcheck(&mut self, node: &KdlNode, file: FileId) -> Option<Healthcheck> {
        self.check_no_children(node, file, "healthcheck");
        let mut healthcheck = Healthcheck {
            test: None,
            interval: None,
            timeout: None,
            start_period: None,
            retries: None,
        };
        let mut none = false;
        let allowed = ["interval", "timeout", "start-period", "retries", "none"];
        for (key, entry) in properties(node) {
            match key {
                "interval" => healthcheck.interval = self.string(entry, file, "`interval`"),
                "timeout" => healthcheck.timeout = self.string(entry, file, "`timeout`"),
                "start-period" => {
                    healthcheck.start_period = self.string(entry, file, "`start-period`")
                }
                "retries" => match entry.value() {
                    KdlValue::Integer(number) if (0..=i128::from(u32::MAX)).contains(number) => {
                        healthcheck.retries = Some(*number as u32);
                    }
                    other => {
                        let kind = value_kind(other);
                        self.error(
                            "type::expected_integer",
                            format!("expected a non-negative integer for `retries`, found {kind}"),
                            Self::loc(file, entry.span()),
                            kind,
                            Some("write retries=3".into()),
                        );
                    }
                },
                "none" => none = self.boolean(entry, file, "`none`").unwrap_or(false),
                other => self.unknown_property(other, entry, file, "healthcheck", &allowed),
            }
        }
        if none {
            self.check_no_arguments(node, file, "healthcheck none=#true");
            return Some(healthcheck);
        }
        healthcheck.test = Some(self.run_command(node, file, "healthcheck")?);
        Some(healthcheck)
    }

    // ----------------------------------------------------------------------------------------
    // Templates

    fn validate_templates(&mut self) {
        for index in 0..self.templates.len() {
            // A template on its own is lowered only for its diagnostics (reported once here,
            // not per use); its stages are kept for the variable check.
            let instance = self.templates[index].full_name.clone();
            let stages = self.instantiate(index, &instance, None);
            for stage in stages {
                self.template_stages.push((stage, index));
            }
        }
    }

    /// Lowers template `index`'s stages for `instance`.
    fn instantiate(&mut self, index: usize, instance: &str, scope: Option<ScopeId>) -> Vec<Stage> {
        let template_file = self.templates[index].file_index;
        let prefix = self.files[template_file].prefix.clone();
        let file = self.files[template_file].file;
        let nodes = self.templates[index].stages.clone();
        let sibling_names: Vec<String> = nodes
            .iter()
            .filter_map(
                |node| match positional(node).first().map(|entry| entry.value()) {
                    Some(KdlValue::String(name)) => Some(name.clone()),
                    _ => None,
                },
            )
            .collect();
        let resolver = Resolver {
            prefix: &prefix,
            siblings: Some((&sibling_names, instance)),
        };
        let mut stages = Vec::new();
        for (node, name) in nodes.iter().zip(&sibling_names) {
            if let Some(stage) =
                self.lower_stage(node, file, format!("{instance}/{name}"), &resolver, scope)
            {
                stages.push(stage);
            }
        }
        stages
    }

    fn find_template(&self, name: &str, file_index: usize) -> Option<usize> {
        let prefix = &self.files[file_index].prefix;
        let prefixed = format!("{prefix}{name}");
        self.templates
            .iter()
            .position(|template| template.full_name == prefixed)
            .or_else(|| {
                self.templates
                    .iter()
                    .position(|template| template.full_name == name)
            })
    }

    // ----------------------------------------------------------------------------------------
    // Images

    fn lower_images(&mut self, project: &mut Project) {
        let mut image_names: HashMap<String, Loc> = HashMap::new();
        for file_index in 0..self.files.len() {
            if !self.files[file_index].is_root {
                continue;
            }
            let file = self.files[file_index].file;
            let nodes: Vec<KdlNode> = self.files[file_index]
                .document
                .nodes()
                .iter()
                .filter(|node| node.name().value() == "image")
                .cloned()
                .collect();
            for node in &nodes {
                if let Some(image) =
                    self.lower_image(node, file, file_index, project, &mut image_names)
                {
                    project.images.push(image);
                }
            }
        }
    }

    fn lower_image(
        &mut self,
        node: &KdlNode,
        file: FileId,
        file_index: usize,
        project: &mut Project,
        image_names: &mut HashMap<String, Loc>,
    ) -> Option<Image> {
        let node_at = Self::loc(file, node.name().span());
        let arguments = positional(node);
        let Some(first) = arguments.first() else {
            self.error(
                "node::missing_name",
                "`image` needs a name",
                node_at,
                "name missing",
                Some("write `image NAME { stage … }`".into()),
            );
            return None;
        };
        for extra in arguments.iter().skip(1) {
            self.error(
                "node::extra_argument",
                "`image` takes one name",
                Self::loc(file, extra.span()),
                "extra argument",
                None,
            );
        }
        let name = self.string(first, file, "the image name")?;
        if let Some(previous) = image_names.get(&name.raw) {
            let diagnostic = Diagnostic::error(
                "graphbuild::duplicate::image",
                format!("image `{}` is defined twice", name.raw),
            )
            .with_label(&self.sources, name.at, "defined again here")
            .with_label(&self.sources, *previous, "first defined here")
            .with_help("rename one of the images");
            self.diagnostics.push(diagnostic);
            return None;
        }
        image_names.insert(name.raw.clone(), name.at);
        let mut push = false;
        for (key, entry) in properties(node) {
            match key {
                "push" => push = self.boolean(entry, file, "`push`").unwrap_or(false),
                other => self.unknown_property(other, entry, file, "image", &["push"]),
            }
        }
        let mut stage: Option<(String, Loc)> = None;
        let mut stage_seen: Option<Loc> = None;
        let mut tags = Vec::new();
        let mut platforms: Option<Vec<PlatformSpec>> = None;
        let mut matrix: Vec<MatrixAxis> = Vec::new();
        let mut annotations = Vec::new();
        let mut labels = Vec::new();
        let mut output = None;
        let mut uses: Vec<KdlNode> = Vec::new();
        let children: Vec<KdlNode> = node
            .children()
            .map(|children| children.nodes().to_vec())
            .unwrap_or_default();
        let root_resolver = Resolver {
            prefix: "",
            siblings: None,
        };
        for child in &children {
            let child_at = Self::loc(file, child.name().span());
            let kind = child.name().value();
            match kind {
                "stage" | "use" if stage_seen.is_some() => {
                    let first = stage_seen.unwrap_or(child_at);
                    let diagnostic = Diagnostic::error(
                        "graphbuild::image::two_stages",
                        "an image has one `stage` or one `use`",
                    )
                    .with_label(&self.sources, child_at, "second one")
                    .with_label(&self.sources, first, "first one")
                    .with_help("make another image for the other stage");
                    self.diagnostics.push(diagnostic);
                }
                "stage" => {
                    stage_seen = Some(child_at);
                    if let Some(text) = self.single_string(child, file, "stage", "a stage name") {
                        match self.resolve_stage(&text.raw, &root_resolver) {
                            Some(resolved) => stage = Some((resolved, text.at)),
                            None => self.unknown_stage(&text.raw, text.at, &root_resolver, false),
                        }
                    }
                }
                "use" => {
                    stage_seen = Some(child_at);
                    uses.push(child.clone());
                }
                "tags" => {
                    self.check_no_children(child, file, kind);
                    self.check_no_properties(child, file, kind);
                    tags.extend(self.string_arguments(child, file, "a tag", false));
                }
                "platforms" => {
                    self.check_no_children(child, file, kind);
                    self.check_no_properties(child, file, kind);
                    if platforms.is_some() {
                        self.error(
                            "duplicate::platforms",
                            "`platforms` is set twice on this image",
                            child_at,
                            "set again",
                            Some("list every platform in one `platforms` node".into()),
                        );
                        continue;
                    }
                    platforms = Some(self.platform_list(child, file));
                }
                "matrix" => {
                    self.check_no_arguments(child, file, kind);
                    self.check_no_properties(child, file, kind);
                    let axes: Vec<KdlNode> = child
                        .children()
                        .map(|children| children.nodes().to_vec())
                        .unwrap_or_default();
                    if axes.is_empty() {
                        self.error(
                            "matrix::empty",
                            "`matrix` needs at least one KEY \"value\" …",
                            child_at,
                            "empty matrix",
                            Some("write `matrix { PY \"3.11\" \"3.12\"; }`".into()),
                        );
                    }
                    for axis in &axes {
                        let key = axis.name().value().to_string();
                        let axis_at = Self::loc(file, axis.name().span());
                        self.check_no_children(axis, file, &key);
                        self.check_no_properties(axis, file, &key);
                        let valid = key
                            .chars()
                            .next()
                            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                        if !valid {
                            self.error(
                                "matrix::key",
                                format!("invalid matrix key `{key}`"),
                                axis_at,
                                "not a variable name",
                                Some(
                                    "a matrix key is a variable name: letters, digits and `_`"
                                        .into(),
                                ),
                            );
                            continue;
                        }
                        if matrix.iter().any(|existing| existing.key == key) {
                            self.error(
                                "duplicate::matrix_key",
                                format!("matrix key `{key}` is listed twice"),
                                axis_at,
                                "listed again",
                                Some("put every value of a key on one line".into()),
                            );
                            continue;
                        }
                        let values = self.string_arguments(axis, file, "a matrix value", true);
                        if values.is_empty() {
                            if positional(axis).is_empty() {
                                self.error(
                                    "matrix::no_values",
                                    format!("matrix key `{key}` has no values"),
                                    axis_at,
                                    "no values",
                                    Some(format!("write `{key} \"a\" \"b\"`")),
                                );
                            }
                            continue;
                        }
                        matrix.push(MatrixAxis {
                            key,
                            values,
                            at: axis_at,
                        });
                    }
                }
                "annotation" => {
                    self.check_no_children(child, file, kind);
                    annotations.extend(self.key_values(child, file, kind));
                }
                "label" => {
                    self.check_no_children(child, file, kind);
                    labels.extend(self.key_values(child, file, kind));
                }
                "output" => {
                    if output.is_some() {
                        self.error(
                            "duplicate::output",
                            "`output` is set twice",
                            child_at,
                            "set again",
                            None,
                        );
                        continue;
                    }
                    output = self.single_string(child, file, kind, "a path");
                }
                "push" => {
                    self.check_no_children(child, file, kind);
                    self.check_no_properties(child, file, kind);
                    match positional(child).as_slice() {
                        [entry] => push = self.boolean(entry, file, "`push`").unwrap_or(false),
                        _ => self.error(
                            "node::missing_value",
                            "`push` takes #true or #false",
                            child_at,
                            "one boolean expected",
                            Some("write `push #true`".into()),
                        ),
                    }
                }
                other => self.unknown_node(child, file, other, IMAGE_NODES, "in an image"),
            }
        }
        if let Some(use_node) = uses.first() {
            stage = self.lower_use(use_node, file, file_index, &name, project);
            stage_seen = stage_seen.or(Some(node_at));
        }
        let Some((stage, stage_at)) = stage else {
            if stage_seen.is_none() {
                self.error(
                    "image::no_stage",
                    format!("image `{}` has no stage", name.raw),
                    name.at,
                    "which stage is the image?",
                    Some("add `stage NAME` naming the stage whose filesystem is the image, or `use \"TEMPLATE\"`".into()),
                );
            }
            return None;
        };
        Some(Image {
            name,
            at: node_at,
            stage,
            stage_at,
            tags,
            platforms,
            matrix,
            annotations,
            labels,
            output,
            push,
        })
    }

    /// `use "TEMPLATE" key=value …`: instantiates the template; returns the last stage.
    fn lower_use(
        &mut self,
        node: &KdlNode,
        file: FileId,
        file_index: usize,
        image_name: &Text,
        project: &mut Project,
    ) -> Option<(String, Loc)> {
        self.check_no_children(node, file, "use");
        let arguments = positional(node);
        let node_at = Self::loc(file, node.name().span());
        let Some(first) = arguments.first() else {
            self.error(
                "node::missing_value",
                "`use` needs a template name",
                node_at,
                "template missing",
                Some("write `use \"py.app\" base=\"…\"`".into()),
            );
            return None;
        };
        for extra in arguments.iter().skip(1) {
            self.error(
                "node::extra_argument",
                "`use` takes one template",
                Self::loc(file, extra.span()),
                "extra argument",
                Some("pass params as key=\"value\"".into()),
            );
        }
        let template_name = self.string(first, file, "the template name")?;
        let Some(index) = self.find_template(&template_name.raw, file_index) else {
            let names: Vec<String> = self
                .templates
                .iter()
                .map(|template| template.full_name.clone())
                .collect();
            let help = match did_you_mean(&template_name.raw, names.iter().map(String::as_str)) {
                Some(close) => format!("did you mean `{close}`?"),
                None if names.is_empty() => {
                    "no template is defined; import one with `import \"std:python\" as=\"py\"`"
                        .to_string()
                }
                None => format!("defined templates: {}", names.join(", ")),
            };
            self.error(
                "unknown::template",
                format!("unknown template `{}`", template_name.raw),
                template_name.at,
                "no such template",
                Some(help),
            );
            return None;
        };
        let params: Vec<(String, Option<Text>, Loc)> = self.templates[index].params.clone();
        let template_full_name = self.templates[index].full_name.clone();
        let mut given: Vec<(String, Text)> = Vec::new();
        let mut failed = false;
        for (key, entry) in properties(node) {
            if !params.iter().any(|(param, _, _)| param == key) {
                let names: Vec<&str> = params.iter().map(|(param, _, _)| param.as_str()).collect();
                let help = match did_you_mean(key, names.iter().copied()) {
                    Some(close) => format!(
                        "did you mean `{close}`? params of `{template_full_name}`: {}",
                        names.join(", ")
                    ),
                    None if names.is_empty() => format!("`{template_full_name}` has no params"),
                    None => format!("params of `{template_full_name}`: {}", names.join(", ")),
                };
                self.error(
                    "template::unknown_param",
                    format!("unknown param `{key}` for template `{template_full_name}`"),
                    Self::loc(file, entry.span()),
                    "unknown param",
                    Some(help),
                );
                failed = true;
                continue;
            }
            match self.string_or_integer(entry, file, &format!("param `{key}`")) {
                Some(value) => given.push((key.to_string(), value)),
                None => failed = true,
            }
        }
        let mut bindings = Vec::new();
        for (param, default, _) in &params {
            if let Some((_, value)) = given.iter().find(|(key, _)| key == param) {
                bindings.push((param.clone(), value.clone()));
            } else if let Some(default) = default {
                bindings.push((param.clone(), default.clone()));
            } else {
                let template_at = self.templates[index].at;
                let diagnostic = Diagnostic::error(
                    "graphbuild::template::missing_param",
                    format!("missing param `{param}` for template `{template_full_name}`"),
                )
                .with_label(
                    &self.sources,
                    template_name.at,
                    format!("needs {param}=\"…\""),
                )
                .with_label(&self.sources, template_at, "template defined here")
                .with_help(format!(
                    "pass it: `use \"{}\" {param}=\"…\"`",
                    template_name.raw
                ));
                self.diagnostics.push(diagnostic);
                failed = true;
            }
        }
        if failed {
            return None;
        }
        let mut instance = image_name.raw.clone();
        let mut counter = 1;
        while project.scopes.iter().any(|scope| scope.name == instance)
            || self
                .stage_names
                .keys()
                .any(|stage| stage.starts_with(&format!("{instance}/")))
        {
            counter += 1;
            instance = format!("{}-{counter}", image_name.raw);
        }
        let scope_id = ScopeId(project.scopes.len() as u32);
        project.scopes.push(Scope {
            name: instance.clone(),
            template: template_name.raw.clone(),
            bindings,
            at: node_at,
        });
        // The template's own problems were reported when it was validated.
        let reported = self.diagnostics.len();
        let stages = self.instantiate(index, &instance, Some(scope_id));
        self.diagnostics.truncate(reported);
        let expected = self.templates[index].stages.len();
        if stages.len() != expected || stages.is_empty() {
            return None;
        }
        let last = stages.last().map(|stage| stage.name.clone())?;
        for stage in &stages {
            self.stage_names.insert(stage.name.clone(), stage.at);
        }
        project.stages.extend(stages);
        Some((last, template_name.at))
    }

    // ----------------------------------------------------------------------------------------
    // Phase 4: checks

    fn check_cycles(&mut self, project: &Project) {
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

    fn report_cycle(&mut self, project: &Project, members: &[usize], edges: &[Loc]) {
        let mut names: Vec<&str> = members
            .iter()
            .map(|member| project.stages[*member].name.as_str())
            .collect();
        if let Some(first) = names.first().copied() {
            names.push(first);
        }
        let mut diagnostic = Diagnostic::error(
            "graphbuild::stage::cycle",
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

    fn check_variables(&mut self, project: &Project) {
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

    fn check_stage(&mut self, stage: &Stage, mut known: HashSet<String>) {
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
                StepKind::Copy(copy) => {
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
    fn check_text(&mut self, text: &Text, known: &HashSet<String>, mode: Mode) {
        let mut lookup = |name: &str| known.contains(name).then(String::new);
        match subst::substitute(&text.raw, mode, &mut lookup) {
            Err(error) => {
                self.error(
                    "substitution::malformed",
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
                        "graphbuild::variable::undefined",
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
fn inherited_env_keys(stages: &[&Stage]) -> Vec<std::rc::Rc<HashSet<String>>> {
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
