//! Reading node entries: names, strings, booleans, key=value pairs, platforms and arg
//! declarations, with the diagnostics for unknown nodes and properties and wrong types.

use crate::Code;

use kdl::{KdlEntry, KdlNode, KdlValue};

use crate::ir::{ArgDecl, FileId, Loc, PlatformSpec, Text};
use crate::platform::{AUTOMATIC_ARGS, Platform};

use super::*;

impl Loader {
    pub(super) fn unknown_node(
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
            Code::UnknownNode,
            format!("unknown node `{name}` {place}"),
            Self::loc(file, node.name().span()),
            "unknown node",
            Some(help),
        );
    }

    pub(super) fn unknown_property(
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
            Code::UnknownProperty,
            format!("unknown property `{key}` on `{node}`"),
            Self::loc(file, entry.span()),
            "unknown property",
            Some(help),
        );
    }

    pub(super) fn check_no_children(&mut self, node: &KdlNode, file: FileId, name: &str) {
        if let Some(children) = node.children() {
            self.error(
                Code::NodeUnexpectedChildren,
                format!("`{name}` takes no children block"),
                Self::loc(file, children.span()),
                "unexpected block",
                Some("remove the `{ … }` block".into()),
            );
        }
    }

    pub(super) fn check_no_properties(&mut self, node: &KdlNode, file: FileId, name: &str) {
        for (key, entry) in properties(node) {
            self.unknown_property(key, entry, file, name, &[]);
        }
    }

    pub(super) fn check_no_arguments(&mut self, node: &KdlNode, file: FileId, name: &str) {
        for entry in positional(node) {
            self.error(
                Code::NodeExtraArgument,
                format!("`{name}` takes no arguments"),
                Self::loc(file, entry.span()),
                "unexpected argument",
                None,
            );
        }
    }

    /// A string value. Anything else is a type error.
    pub(super) fn string(&mut self, entry: &KdlEntry, file: FileId, what: &str) -> Option<Text> {
        let at = Self::loc(file, entry.span());
        match entry.value() {
            KdlValue::String(value) => Some(Text {
                raw: value.clone(),
                at,
            }),
            other => {
                let kind = value_kind(other);
                self.error(
                    Code::TypeExpectedString,
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
    pub(super) fn string_or_integer(
        &mut self,
        entry: &KdlEntry,
        file: FileId,
        what: &str,
    ) -> Option<Text> {
        if let KdlValue::Integer(number) = entry.value() {
            return Some(Text {
                raw: number.to_string(),
                at: Self::loc(file, entry.span()),
            });
        }
        self.string(entry, file, what)
    }

    pub(super) fn boolean(&mut self, entry: &KdlEntry, file: FileId, what: &str) -> Option<bool> {
        match entry.value() {
            KdlValue::Bool(value) => Some(*value),
            other => {
                let kind = value_kind(other);
                self.error(
                    Code::TypeExpectedBoolean,
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
    pub(super) fn node_name(&mut self, node: &KdlNode, file: FileId, kind: &str) -> Option<Text> {
        let arguments = positional(node);
        let Some(first) = arguments.first() else {
            self.error(
                Code::NodeMissingName,
                format!("`{kind}` needs a name"),
                Self::loc(file, node.name().span()),
                "name missing",
                Some(format!("write `{kind} NAME …`")),
            );
            return None;
        };
        for extra in arguments.iter().skip(1) {
            self.error(
                Code::NodeExtraArgument,
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
                Code::NodeInvalidName,
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
    pub(super) fn single_string_argument(
        &mut self,
        node: &KdlNode,
        file: FileId,
        at: Loc,
        (code, what, message, label): (Code, &str, &str, &str),
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

    pub(super) fn string_arguments(
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
    pub(super) fn key_values(
        &mut self,
        node: &KdlNode,
        file: FileId,
        kind: &str,
    ) -> Vec<(String, Text)> {
        for entry in positional(node) {
            self.error(
                Code::NodeExpectedProperty,
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
                Code::NodeMissingValue,
                format!("`{kind}` needs at least one KEY=\"value\""),
                Self::loc(file, node.name().span()),
                "nothing set",
                None,
            );
        }
        pairs
    }

    pub(super) fn platform_spec(&mut self, text: Text) -> Option<PlatformSpec> {
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
                    Code::PlatformInvalid,
                    format!("malformed platform: {error}"),
                    text.at,
                    "malformed platform",
                    Some(help),
                );
                None
            }
        }
    }

    pub(super) fn platform_list(&mut self, node: &KdlNode, file: FileId) -> Vec<PlatformSpec> {
        let texts = self.string_arguments(node, file, "a platform", false);
        if texts.is_empty() && positional(node).is_empty() {
            self.error(
                Code::PlatformMissing,
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
    pub(super) fn arg_declarations(&mut self, node: &KdlNode, file: FileId) -> Vec<ArgDecl> {
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
                            Code::TypeExpectedString,
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
                    Code::ArgInvalidName,
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
                    Code::ArgAutomatic,
                    format!("`{name}` is an automatic arg and cannot have a default"),
                    at,
                    "set per platform by graphbuild",
                    Some(format!("declare it as `arg {name}` without a value, or choose platforms with `platforms`")),
                );
                continue;
            }
            let from_env = match entry.ty().map(|ty| ty.value()) {
                None => false,
                Some("env") => true,
                Some(other) => {
                    self.error(
                        Code::ArgInvalidName,
                        format!("unknown arg annotation `({other})`"),
                        at,
                        "unknown annotation",
                        Some("`(env)` is the only one: `arg NAME=(env)\"default\"` takes the default from the environment variable NAME".into()),
                    );
                    continue;
                }
            };
            if from_env && AUTOMATIC_ARGS.contains(&name.as_str()) {
                self.error(
                    Code::ArgAutomatic,
                    format!("`{name}` is an automatic arg and cannot come from the environment"),
                    at,
                    "set per platform by graphbuild",
                    None,
                );
                continue;
            }
            declarations.push(ArgDecl {
                name,
                default,
                from_env,
                at,
            });
        }
        if node.entries().is_empty() {
            self.error(
                Code::ArgMissing,
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
}
