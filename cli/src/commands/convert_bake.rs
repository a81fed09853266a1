//! `graphbuild convert --bake docker-bake.hcl`: a bake file written as KDL that drives the
//! same Dockerfiles. Each target becomes a `dockerfile` node (its args) and an `image` (its
//! platforms, tags, labels, annotations and matrix); variables become top-level `arg`s that,
//! as bake's, take the environment variable of their name (`(env)`); groups stay groups.
//! Targets only inherited from and in no group (`_common`) are folded into the ones that
//! inherit them.
//!
//! HCL is parsed by `hcl-edit` (the parser of `hcl-rs`, with spans). Only what KDL writes as
//! is gets converted: literals, variables and `"${VAR}"` templates; a function call, an
//! operator, a conditional or an attribute graphbuild has no equivalent for is a loss at the
//! bake file's `file:line`, never dropped silently.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use graphbuild_lang::ir::{FileId, Loc, Source, Sources, StepKind};
use graphbuild_lang::{Code, Diagnostic};
use hcl_edit::Span as _;
use hcl_edit::expr::{Expression, ObjectKey};
use hcl_edit::structure::{Block, BlockLabel, Body};
use hcl_edit::template::Element;

/// The KDL, and what it does not express.
pub(super) struct Converted {
    pub(super) kdl: String,
    pub(super) losses: Vec<Diagnostic>,
}

/// An HCL value KDL can hold: a string with `${VAR}` references, or a list of them.
#[derive(Clone, Debug)]
enum Value {
    Text(String),
    List(Vec<String>),
    Map(Vec<(String, String)>),
}

#[derive(Clone, Default)]
struct Target {
    name: String,
    at: Option<std::ops::Range<usize>>,
    attributes: BTreeMap<String, (Value, std::ops::Range<usize>)>,
    inherits: Vec<String>,
    /// `matrix = { KEY = ["a", "b"] }`: the axes, in order.
    matrix: Vec<(String, Vec<String>)>,
}

struct Bake {
    sources: Sources,
    losses: Vec<Diagnostic>,
}

impl Bake {
    fn loc(range: &std::ops::Range<usize>) -> Loc {
        Loc {
            file: FileId(0),
            span: (range.start, range.end.saturating_sub(range.start)).into(),
        }
    }

    fn loss(&mut self, range: Option<std::ops::Range<usize>>, message: String, help: &str) {
        let mut diagnostic = Diagnostic::warning(Code::Convert, message).with_help(help);
        if let Some(range) = range {
            diagnostic = diagnostic.with_label(&self.sources, Self::loc(&range), "not converted");
        }
        self.losses.push(diagnostic);
    }

    /// A template, variable or literal as KDL text; `None` (a loss) for anything else.
    fn text(&mut self, expr: &Expression) -> Option<String> {
        let unsupported = |bake: &mut Self| {
            bake.loss(
                expr.span(),
                "an HCL expression KDL cannot write".into(),
                "write a literal, a variable or a \"${VAR}\" template; functions, operators and conditionals have no KDL form",
            );
            None
        };
        match expr {
            Expression::String(text) => Some(literal(text.value())),
            Expression::Number(number) => Some(number.value().to_string()),
            Expression::Bool(value) => Some(value.value().to_string()),
            Expression::Variable(name) => Some(format!("${{{}}}", name.value().as_str())),
            Expression::StringTemplate(template) => {
                let mut out = String::new();
                for element in template.iter() {
                    match element {
                        Element::Literal(text) => out.push_str(&literal(text.value())),
                        Element::Interpolation(interpolation) => match &interpolation.expr {
                            Expression::Variable(name) => {
                                write!(out, "${{{}}}", name.value().as_str()).ok();
                            }
                            _ => return unsupported(self),
                        },
                        Element::Directive(_) => return unsupported(self),
                    }
                }
                Some(out)
            }
            _ => unsupported(self),
        }
    }

    fn value(&mut self, expr: &Expression) -> Option<Value> {
        match expr {
            Expression::Array(array) => {
                let mut list = Vec::new();
                for item in array.iter() {
                    list.push(self.text(item)?);
                }
                Some(Value::List(list))
            }
            Expression::Object(object) => {
                let mut map = Vec::new();
                for (key, value) in object.iter() {
                    let key = match key {
                        ObjectKey::Ident(ident) => ident.value().as_str().to_string(),
                        ObjectKey::Expression(Expression::String(text)) => text.value().clone(),
                        ObjectKey::Expression(other) => {
                            self.loss(
                                other.span(),
                                "a computed object key".into(),
                                "write the key as a name or a string",
                            );
                            return None;
                        }
                    };
                    map.push((key, self.text(value.expr())?));
                }
                Some(Value::Map(map))
            }
            other => self.text(other).map(Value::Text),
        }
    }

    /// `{ KEY = ["a", "b"], … }`: each key's list of literal values (a matrix value is
    /// data, not a template).
    fn matrix(&mut self, expr: &Expression) -> Vec<(String, Vec<String>)> {
        let Expression::Object(object) = expr else {
            self.loss(
                expr.span(),
                "a matrix that is not an object of lists".into(),
                "write matrix = { KEY = [\"a\", \"b\"] }",
            );
            return Vec::new();
        };
        let mut axes = Vec::new();
        for (key, value) in object.iter() {
            let key = match key {
                ObjectKey::Ident(ident) => ident.value().as_str().to_string(),
                ObjectKey::Expression(Expression::String(text)) => text.value().clone(),
                ObjectKey::Expression(other) => {
                    self.loss(
                        other.span(),
                        "a computed matrix key".into(),
                        "write the key as a name",
                    );
                    return Vec::new();
                }
            };
            let Expression::Array(array) = value.expr() else {
                self.loss(
                    value.expr().span(),
                    format!("the matrix values of `{key}` are not a list of strings"),
                    "write [\"a\", \"b\"]; a list of objects has no KDL form",
                );
                return Vec::new();
            };
            let mut values = Vec::new();
            for item in array.iter() {
                match item {
                    Expression::String(text) => values.push(text.value().clone()),
                    other => {
                        self.loss(
                            other.span(),
                            format!("a matrix value of `{key}` that is not a string"),
                            "write the values as strings; a list of objects has no KDL form",
                        );
                        return Vec::new();
                    }
                }
            }
            axes.push((key, values));
        }
        axes
    }

    fn target(&mut self, block: &Block) -> Option<Target> {
        let name = label(block)?;
        let mut target = Target {
            name,
            at: block.span(),
            ..Target::default()
        };
        for attribute in block.body.attributes() {
            let key = attribute.key.value().as_str().to_string();
            let range = attribute.span().unwrap_or(0..0);
            if key == "matrix" {
                target.matrix = self.matrix(&attribute.value);
                continue;
            }
            if key == "inherits" {
                if let Some(Value::List(list)) = self.value(&attribute.value) {
                    target.inherits = list;
                }
                continue;
            }
            const KNOWN: &[&str] = &[
                "dockerfile",
                "context",
                "target",
                "args",
                "platforms",
                "tags",
                "labels",
                "annotations",
                "name",
            ];
            if !KNOWN.contains(&key.as_str()) {
                self.loss(
                    Some(range),
                    format!("the target attribute `{key}` is not converted"),
                    "graphbuild takes it from the command line (`--push`, `--cache-from`, `--secret`, `--output`…) or has no equivalent",
                );
                continue;
            }
            if let Some(value) = self.value(&attribute.value) {
                target.attributes.insert(key, (value, range));
            }
        }
        Some(target)
    }
}

/// A literal HCL string as KDL text: a `$` is written `\$`, a literal dollar sign.
fn literal(text: &str) -> String {
    text.replace('$', "\\$")
}

fn label(block: &Block) -> Option<String> {
    block.labels.first().map(|label| match label {
        BlockLabel::Ident(ident) => ident.value().as_str().to_string(),
        BlockLabel::String(text) => text.value().clone(),
    })
}

/// A KDL string: plain, or raw when it holds quotes or backslashes.
fn kdl_string(text: &str) -> String {
    if !text.contains(['"', '\\']) {
        format!("\"{text}\"")
    } else {
        let mut hashes = String::from("#");
        while text.contains(&format!("\"{hashes}")) {
            hashes.push('#');
        }
        format!("{hashes}\"{text}\"{hashes}")
    }
}

fn kdl_name(name: &str) -> String {
    let bare = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
        && !matches!(name, "true" | "false" | "null" | "inf" | "nan");
    if bare {
        name.to_string()
    } else {
        kdl_string(name)
    }
}

/// Converts the bake file at `path`; `Err` with a message for an unreadable or unparsable
/// file.
pub(super) fn convert(path: &Path, header: &str) -> Result<Converted, String> {
    // Bounded as build files are: a path such as /dev/zero is not read forever.
    let limit = graphbuild_lang::limits::MAX_FILE_BYTES as u64;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|file| {
            std::io::Read::read_to_string(&mut std::io::Read::take(file, limit + 1), &mut text)
        })
        .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    if text.len() as u64 > limit {
        return Err(format!("{} is larger than {limit} bytes", path.display()));
    }
    let body: Body = hcl_edit::parser::parse_body(&text).map_err(|error| {
        format!(
            "{}:{}:{}: {}",
            path.display(),
            error.location().line(),
            error.location().column(),
            error.message()
        )
    })?;
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let mut bake = Bake {
        sources: Sources {
            files: vec![Source::new(
                path.display().to_string(),
                Some(path.to_path_buf()),
                Arc::new(text.clone()),
            )],
        },
        losses: Vec::new(),
    };
    let mut out = String::new();
    for line in header.lines() {
        writeln!(out, "// {line}").ok();
    }
    out.push('\n');
    let mut variables = String::new();
    let mut targets: Vec<Target> = Vec::new();
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for structure in body.iter() {
        if let Some(attribute) = structure.as_attribute() {
            bake.loss(
                attribute.span(),
                "a top-level attribute".into(),
                "bake files hold variable, target and group blocks",
            );
            continue;
        }
        let Some(block) = structure.as_block() else {
            continue;
        };
        match block.ident.value().as_str() {
            "variable" => {
                let Some(name) = label(block) else { continue };
                let default = block
                    .body
                    .attributes()
                    .find(|attribute| attribute.key.value().as_str() == "default")
                    .and_then(|attribute| bake.text(&attribute.value));
                match default {
                    Some(default) => {
                        writeln!(variables, "arg {name}=(env){}", kdl_string(&default)).ok();
                    }
                    None => {
                        writeln!(variables, "arg (env){name}").ok();
                    }
                }
            }
            "group" => {
                let Some(name) = label(block) else { continue };
                let members = block
                    .body
                    .attributes()
                    .find(|attribute| attribute.key.value().as_str() == "targets")
                    .and_then(|attribute| bake.value(&attribute.value));
                if let Some(Value::List(list)) = members {
                    groups.push((name, list));
                }
            }
            "target" => {
                if let Some(target) = bake.target(block) {
                    targets.push(target);
                }
            }
            other => bake.loss(
                block.span(),
                format!("a `{other}` block is not converted"),
                "bake files hold variable, target and group blocks",
            ),
        }
    }
    if !variables.is_empty() {
        out.push_str(&variables);
        out.push('\n');
    }
    // Targets only inherited from, and in no group: folded into the ones inheriting them.
    let inherited: Vec<String> = targets.iter().flat_map(|t| t.inherits.clone()).collect();
    let grouped: Vec<&String> = groups.iter().flat_map(|(_, members)| members).collect();
    let concrete: Vec<Target> = targets
        .iter()
        .filter(|target| !inherited.contains(&target.name) || grouped.contains(&&target.name))
        .map(|target| resolve(target, &targets, 0))
        .collect();
    let mut image_names: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for target in &concrete {
        if let Some(names) = bake.target_kdl(target, &dir, &mut out) {
            image_names.insert(target.name.clone(), names);
        }
    }
    for (name, members) in &groups {
        let mut names = Vec::new();
        for member in members {
            match image_names.get(member) {
                Some(images) => names.extend(images.iter().cloned()),
                None if groups.iter().any(|(group, _)| group == member) => {
                    names.push(member.clone());
                }
                None => {}
            }
        }
        let list: Vec<String> = names.iter().map(|name| kdl_string(name)).collect();
        writeln!(
            out,
            "group {} {{\n    targets {}\n}}\n",
            kdl_name(name),
            list.join(" ")
        )
        .ok();
    }
    let kdl = out.trim_end().to_string() + "\n";
    // The KDL must load as written, beside the bake file.
    if let Err(diagnostics) = graphbuild_lang::load_source("converted.kdl", &kdl, &dir) {
        for diagnostic in diagnostics.0.into_iter().filter(Diagnostic::is_error) {
            bake.losses.push(
                Diagnostic::warning(
                    Code::Convert,
                    format!("the KDL written does not load: {}", diagnostic.message),
                )
                .with_help(
                    "this is a bug in graphbuild convert; please report it with the bake file",
                ),
            );
        }
    }
    Ok(Converted {
        kdl,
        losses: bake.losses,
    })
}

/// A target with what it inherits merged in (the target's own attributes win; `args`,
/// `labels` and `matrix` are merged key by key, as bake does).
fn resolve(target: &Target, all: &[Target], depth: usize) -> Target {
    let mut merged = Target {
        name: target.name.clone(),
        at: target.at.clone(),
        ..Target::default()
    };
    if depth < 16 {
        for parent in &target.inherits {
            if let Some(parent) = all.iter().find(|t| &t.name == parent) {
                let parent = resolve(parent, all, depth + 1);
                if !parent.matrix.is_empty() {
                    merged.matrix = parent.matrix;
                }
                for (key, value) in parent.attributes {
                    merge(&mut merged.attributes, key, value);
                }
            }
        }
    }
    for (key, value) in &target.attributes {
        merge(&mut merged.attributes, key.clone(), value.clone());
    }
    if !target.matrix.is_empty() {
        merged.matrix = target.matrix.clone();
    }
    merged
}

fn merge(
    into: &mut BTreeMap<String, (Value, std::ops::Range<usize>)>,
    key: String,
    value: (Value, std::ops::Range<usize>),
) {
    if let (Some((Value::Map(existing), _)), Value::Map(new)) = (into.get_mut(&key), &value.0) {
        for (name, text) in new {
            existing.retain(|(other, _)| other != name);
            existing.push((name.clone(), text.clone()));
        }
        return;
    }
    into.insert(key, value);
}

impl Bake {
    fn string_attribute(&mut self, target: &Target, key: &str) -> Option<String> {
        match target.attributes.get(key) {
            Some((Value::Text(text), _)) => Some(text.clone()),
            Some((_, range)) => {
                self.loss(
                    Some(range.clone()),
                    format!("`{key}` is not a string"),
                    "write it as a string",
                );
                None
            }
            None => None,
        }
    }

    fn list_attribute(&self, target: &Target, key: &str) -> Vec<String> {
        match target.attributes.get(key) {
            Some((Value::List(list), _)) => list.clone(),
            Some((Value::Text(text), _)) => vec![text.clone()],
            _ => Vec::new(),
        }
    }

    fn map_attribute(&self, target: &Target, key: &str) -> Vec<(String, String)> {
        match target.attributes.get(key) {
            Some((Value::Map(map), _)) => map.clone(),
            _ => Vec::new(),
        }
    }

    /// The `dockerfile` node and the image of one target; the image names it expands to.
    fn target_kdl(&mut self, target: &Target, dir: &Path, out: &mut String) -> Option<Vec<String>> {
        let context = self.string_attribute(target, "context");
        if let Some(context) = context.filter(|context| context != "." && context != "./") {
            let range = target
                .attributes
                .get("context")
                .map(|(_, range)| range.clone());
            self.loss(
                range,
                format!("target `{}`: the context `{context}` is not the bake file's directory", target.name),
                "a KDL file builds in its own directory: put the KDL beside the context, or move the bake file there",
            );
            return None;
        }
        let dockerfile = self
            .string_attribute(target, "dockerfile")
            .unwrap_or_else(|| "Dockerfile".into());
        let project = match graphbuild_lang::dockerfile::load(
            &dir.join(&dockerfile),
            dir,
            &graphbuild_lang::dockerfile::Options {
                image: target.name.clone(),
                target: self.string_attribute(target, "target"),
                ..Default::default()
            },
        ) {
            Ok(project) => project,
            Err(diagnostics) => {
                self.losses.extend(diagnostics.0);
                self.loss(
                    target.at.clone(),
                    format!("target `{}`: its Dockerfile does not load", target.name),
                    "fix the Dockerfile (its problems are above)",
                );
                return None;
            }
        };
        let declared = |arg: &str| {
            project.args.iter().any(|decl| decl.name == arg)
                || project.stages.iter().any(|stage| {
                    stage
                        .steps
                        .iter()
                        .any(|step| matches!(&step.kind, StepKind::Arg(decl) if decl.name == arg))
                })
        };
        let node = kdl_name(&target.name);
        writeln!(out, "dockerfile {node} path={} {{", kdl_string(&dockerfile)).ok();
        for (name, value) in self.map_attribute(target, "args") {
            // bake passes every arg; one no ARG declares does nothing, in bake as here.
            if declared(&name) {
                writeln!(out, "    arg {name}={}", kdl_string(&value)).ok();
            }
        }
        out.push_str("}\n\n");
        let stage = project.images.first().map(|image| image.stage.clone())?;
        let image_name = self
            .string_attribute(target, "name")
            .unwrap_or_else(|| target.name.clone());
        writeln!(out, "image {} {{", kdl_name(&image_name)).ok();
        writeln!(
            out,
            "    stage {}",
            kdl_string(&format!("{}.{stage}", target.name))
        )
        .ok();
        let platforms = self.list_attribute(target, "platforms");
        if !platforms.is_empty() {
            let list: Vec<String> = platforms.iter().map(|p| kdl_string(p)).collect();
            writeln!(out, "    platforms {}", list.join(" ")).ok();
        }
        let mut names = vec![image_name.clone()];
        if !target.matrix.is_empty() {
            let axes = &target.matrix;
            let mut line = String::from("    matrix {");
            for (key, values) in axes {
                let list: Vec<String> = values.iter().map(|v| kdl_string(v)).collect();
                write!(line, " {key} {};", list.join(" ")).ok();
            }
            line.push_str(" }");
            writeln!(out, "{line}").ok();
            names = expand_names(&image_name, axes);
        }
        let tags = self.list_attribute(target, "tags");
        if !tags.is_empty() {
            let list: Vec<String> = tags.iter().map(|t| kdl_string(t)).collect();
            writeln!(out, "    tags {}", list.join(" ")).ok();
        }
        for (key, value) in self.map_attribute(target, "labels") {
            writeln!(out, "    label {}={}", kdl_string(&key), kdl_string(&value)).ok();
        }
        for annotation in self.list_attribute(target, "annotations") {
            match annotation.split_once('=') {
                Some((key, value)) => {
                    writeln!(
                        out,
                        "    annotation {}={}",
                        kdl_string(key),
                        kdl_string(value)
                    )
                    .ok();
                }
                None => {
                    let range = target.attributes.get("annotations").map(|(_, r)| r.clone());
                    self.loss(
                        range,
                        format!("the annotation `{annotation}` is not KEY=VALUE"),
                        "write KEY=VALUE",
                    );
                }
            }
        }
        out.push_str("}\n\n");
        Some(names)
    }
}

/// The names a matrix image expands to: `worker-${queue}` for each combination (cartesian, in
/// key order), for groups, which list image names.
fn expand_names(template: &str, axes: &[(String, Vec<String>)]) -> Vec<String> {
    let mut names = vec![template.to_string()];
    for (key, values) in axes {
        names = names
            .iter()
            .flat_map(|name| {
                values.iter().map(move |value| {
                    name.replace(&format!("${{{key}}}"), value)
                        .replace(&format!("${key}"), value)
                })
            })
            .collect();
    }
    names
}
