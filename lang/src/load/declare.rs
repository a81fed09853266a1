//! Declaring: every stage, template, image and top-level arg registered by its full name;
//! duplicates reported.

use std::collections::HashMap;

use kdl::KdlNode;

use crate::Code;
use crate::Diagnostic;
use crate::ir::{FileId, Group, Loc, Project, Text};

use super::*;

impl Loader {
    pub(super) fn declare(&mut self, project: &mut Project) -> Vec<StageDeclaration> {
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
                                Code::ModulePlatforms,
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
                                Code::DuplicatePlatforms,
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
                                    Code::DuplicateArg,
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
                                Code::DuplicateStage,
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
                                Code::DuplicateTemplate,
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
                                Code::ModuleImage,
                                "an imported module cannot define images",
                                node_at,
                                "in an imported module",
                                Some("define images in the root build file; modules provide stages, templates and args".into()),
                            );
                        }
                        // Lowered in phase 3.
                    }
                    "dockerfile" => self.declare_dockerfile(node, file, loaded.is_root, project),
                    "group" => {
                        if !loaded.is_root {
                            self.error(
                                Code::Group,
                                "an imported module cannot define groups",
                                node_at,
                                "in an imported module",
                                Some("define groups in the root build file".into()),
                            );
                            continue;
                        }
                        self.declare_group(node, file, project);
                    }
                    other => self.unknown_node(
                        node,
                        file,
                        other,
                        &spec::names(spec::TOP_LEVEL),
                        "at the top level",
                    ),
                }
            }
        }
        self.files = files;
        stages
    }

    /// `group NAME { targets "a" "b" … }`.
    fn declare_group(&mut self, node: &KdlNode, file: FileId, project: &mut Project) {
        self.check_no_properties(node, file, "group");
        let Some(name) = self.node_name(node, file, "group") else {
            return;
        };
        if let Some(first) = project.groups.iter().find(|group| group.name == name.raw) {
            let diagnostic = Diagnostic::error(
                Code::Group,
                format!("group `{}` is defined twice", name.raw),
            )
            .with_label(&self.sources, name.at, "defined again here")
            .with_label(&self.sources, first.at, "first defined here")
            .with_help("list every target of the group in one `group` node");
            self.diagnostics.push(diagnostic);
            return;
        }
        let mut targets = Vec::new();
        for child in node
            .children()
            .map(|children| children.nodes())
            .unwrap_or_default()
        {
            let child_at = Self::loc(file, child.name().span());
            if child.name().value() != "targets" {
                self.unknown_node(
                    child,
                    file,
                    child.name().value(),
                    &["targets"],
                    "in `group`",
                );
                continue;
            }
            self.check_no_children(child, file, "targets");
            self.check_no_properties(child, file, "targets");
            let before = targets.len();
            for entry in child
                .entries()
                .iter()
                .filter(|entry| entry.name().is_none())
            {
                if let Some(target) = self.string(entry, file, "a target name") {
                    targets.push(target);
                }
            }
            if targets.len() == before {
                self.error(
                    Code::Group,
                    "`targets` names no target",
                    child_at,
                    "empty",
                    Some("write `targets \"app\" \"worker\"`: image, stage or group names".into()),
                );
            }
        }
        if targets.is_empty() {
            self.error(
                Code::Group,
                format!("group `{}` has no targets", name.raw),
                name.at,
                "empty group",
                Some(format!(
                    "write `group {} {{ targets \"app\" \"worker\" }}`",
                    name.raw
                )),
            );
            return;
        }
        project.groups.push(Group {
            name: name.raw,
            at: name.at,
            targets,
        });
    }

    pub(super) fn declare_template(
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
                                Code::DuplicateParam,
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
                                Code::DuplicateStage,
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
                    other => self.unknown_node(
                        child,
                        file,
                        other,
                        &spec::names(spec::TEMPLATE),
                        "in a template",
                    ),
                }
            }
        }
        if stages.is_empty() {
            self.error(
                Code::TemplateNoStage,
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
}
