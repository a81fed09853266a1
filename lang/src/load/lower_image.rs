//! Lowering images and templates: `image` nodes with their tags, platforms and matrix, and
//! `use` of a template, instantiated with its params.

use std::collections::HashMap;

use kdl::{KdlNode, KdlValue};

use crate::Code;
use crate::ir::{
    FileId, Image, Loc, MatrixAxis, PlatformSpec, Project, Scope, ScopeId, Stage, Text,
};
use crate::{Diagnostic, limits};

use super::*;

impl Loader {
    pub(super) fn validate_templates(&mut self) {
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
    pub(super) fn instantiate(
        &mut self,
        index: usize,
        instance: &str,
        scope: Option<ScopeId>,
    ) -> Vec<Stage> {
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

    pub(super) fn find_template(&self, name: &str, file_index: usize) -> Option<usize> {
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

    pub(super) fn lower_images(&mut self, project: &mut Project) {
        let mut image_names: HashMap<String, Loc> = HashMap::new();
        let mut expanded: u128 = 0;
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
                    expanded = expanded.saturating_add(matrix_combinations(&image.matrix));
                    if expanded > limits::MAX_IMAGES as u128 {
                        self.error(
                            Code::LimitsImages,
                            format!(
                                "the build file expands to more than {} images",
                                limits::MAX_IMAGES
                            ),
                            image.at,
                            "one image too many (counting matrix combinations)",
                            Some("split the build file, or shrink the matrices".into()),
                        );
                        return;
                    }
                    project.images.push(image);
                }
                if project.stages.len() > limits::MAX_STAGES {
                    self.error(
                        Code::LimitsStages,
                        format!(
                            "the build file has more than {} stages (counting template instances)",
                            limits::MAX_STAGES
                        ),
                        Self::loc(file, node.name().span()),
                        "one template instance too many",
                        Some("split the build file into several".into()),
                    );
                    return;
                }
            }
        }
    }

    pub(super) fn lower_image(
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
                Code::NodeMissingName,
                "`image` needs a name",
                node_at,
                "name missing",
                Some("write `image NAME { stage … }`".into()),
            );
            return None;
        };
        for extra in arguments.iter().skip(1) {
            self.error(
                Code::NodeExtraArgument,
                "`image` takes one name",
                Self::loc(file, extra.span()),
                "extra argument",
                None,
            );
        }
        let name = self.string(first, file, "the image name")?;
        if let Some(previous) = image_names.get(&name.raw) {
            let diagnostic = Diagnostic::error(
                Code::DuplicateImage,
                format!("image `{}` is defined twice", name.raw),
            )
            .with_label(&self.sources, name.at, "defined again here")
            .with_label(&self.sources, *previous, "first defined here")
            .with_help("rename one of the images");
            self.diagnostics.push(diagnostic);
            return None;
        }
        image_names.insert(name.raw.clone(), name.at);
        let mut provenance = None;
        let props = self.node_properties(node, file, spec::get(spec::TOP_LEVEL, "image"));
        let mut push = props.bool("push").unwrap_or(false);
        let strict_arch = props.bool("strict-arch").unwrap_or(false);
        let sbom = props.bool("sbom").unwrap_or(false);
        for entry in props.raw("provenance") {
            provenance = self.provenance_setting(entry, file);
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
        let mut tests: Vec<crate::ir::ImageTest> = Vec::new();
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
                        Code::ImageTwoStages,
                        "an image has one `stage` or one `use`",
                    )
                    .with_label(&self.sources, child_at, "second one")
                    .with_label(&self.sources, first, "first one")
                    .with_help("make another image for the other stage");
                    self.diagnostics.push(diagnostic);
                }
                "stage" => {
                    stage_seen = Some(child_at);
                    if let Some(text) = self.single(child, file, spec::get(spec::IMAGE, "stage")) {
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
                            Code::DuplicatePlatforms,
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
                            Code::MatrixEmpty,
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
                                Code::MatrixKey,
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
                                Code::DuplicateMatrixKey,
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
                                    Code::MatrixNoValues,
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
                    let combinations = matrix_combinations(&matrix);
                    if combinations > limits::MAX_MATRIX_COMBINATIONS {
                        let sizes: Vec<String> = matrix
                            .iter()
                            .map(|axis| axis.values.len().to_string())
                            .collect();
                        self.error(
                            Code::LimitsMatrix,
                            format!(
                                "this matrix has {combinations} combinations, more than the {} an image may have",
                                limits::MAX_MATRIX_COMBINATIONS
                            ),
                            child_at,
                            format!("{} combinations", sizes.join(" × ")),
                            Some("split the image into several images with smaller matrices, or drop values".into()),
                        );
                        matrix.clear();
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
                            Code::DuplicateOutput,
                            "`output` is set twice",
                            child_at,
                            "set again",
                            None,
                        );
                        continue;
                    }
                    output = self.single(child, file, spec::get(spec::IMAGE, "output"));
                }
                "push" => {
                    self.check_no_children(child, file, kind);
                    self.check_no_properties(child, file, kind);
                    match positional(child).as_slice() {
                        [entry] => push = self.boolean(entry, file, "`push`").unwrap_or(false),
                        _ => self.error(
                            Code::NodeMissingValue,
                            "`push` takes #true or #false",
                            child_at,
                            "one boolean expected",
                            Some("write `push #true`".into()),
                        ),
                    }
                }
                "test" => {
                    let Some(test) = self.lower_test(child, file) else {
                        continue;
                    };
                    if let Some(first) = tests.iter().find(|known| known.name.raw == test.name.raw)
                    {
                        let diagnostic = Diagnostic::error(
                            Code::DuplicateTest,
                            format!(
                                "image `{}` has two tests named `{}`",
                                name.raw, test.name.raw
                            ),
                        )
                        .with_label(&self.sources, test.name.at, "named again here")
                        .with_label(&self.sources, first.name.at, "first named here")
                        .with_help("rename one of the tests");
                        self.diagnostics.push(diagnostic);
                        continue;
                    }
                    tests.push(test);
                }
                other => {
                    self.unknown_node(child, file, other, &spec::names(spec::IMAGE), "in an image")
                }
            }
        }
        if let Some(use_node) = uses.first() {
            stage = self.lower_use(use_node, file, file_index, &name, project);
            stage_seen = stage_seen.or(Some(node_at));
        }
        let Some((stage, stage_at)) = stage else {
            if stage_seen.is_none() {
                self.error(
                    Code::ImageNoStage,
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
            strict_arch,
            provenance,
            sbom,
            tests,
        })
    }

    /// `provenance="min"`, `"max"` or `#false` on an image.
    fn provenance_setting(
        &mut self,
        entry: &kdl::KdlEntry,
        file: crate::ir::FileId,
    ) -> Option<crate::ir::ProvenanceSetting> {
        use crate::ir::ProvenanceSetting;
        let at = Self::loc(file, entry.span());
        match entry.value() {
            KdlValue::Bool(false) => return Some(ProvenanceSetting::Off),
            KdlValue::Bool(true) => return Some(ProvenanceSetting::Min),
            KdlValue::String(value) => match value.as_str() {
                "min" => return Some(ProvenanceSetting::Min),
                "max" => return Some(ProvenanceSetting::Max),
                _ => {}
            },
            _ => {}
        }
        let found = match entry.value() {
            KdlValue::String(value) => format!("{value:?}"),
            other => other.to_string(),
        };
        self.error(
            Code::ImageProvenance,
            format!("`provenance` is \"min\", \"max\" or #false, not {found}"),
            at,
            "not a provenance mode",
            Some("write provenance=\"max\" for every step's description, or provenance=#false for none".into()),
        );
        None
    }

    /// `use "TEMPLATE" key=value …`: instantiates the template; returns the last stage.
    pub(super) fn lower_use(
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
                Code::NodeMissingValue,
                "`use` needs a template name",
                node_at,
                "template missing",
                Some("write `use \"py.app\" base=\"…\"`".into()),
            );
            return None;
        };
        for extra in arguments.iter().skip(1) {
            self.error(
                Code::NodeExtraArgument,
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
                Code::UnknownTemplate,
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
                    Code::TemplateUnknownParam,
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
                    Code::TemplateMissingParam,
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
}
