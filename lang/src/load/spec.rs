//! The node-spec table: every node the loader accepts, where it may appear, what arguments it
//! takes, which properties it allows with their types, and which children it may hold, in the
//! spirit of kdl-rs's typed kinds. The loader's checks read these tables instead of repeating
//! lists and arity checks by hand:
//!
//! - an unknown node is reported against the names of the table it was looked up in
//!   ([`names`]), in table order (the order the help text lists them);
//! - a property not in a node's [`Properties::Only`] list is unknown, and one that is listed is
//!   read with its [`Value`] type checked once ([`super::Loader::node_properties`]);
//! - a node whose [`NodeSpec::args`] is [`Args::One`] takes exactly one value, and says what
//!   it needs when it is missing ([`super::Loader::single_value`]);
//! - a node without children tables takes no `{ … }` block.
//!
//! Adding a node is one entry here (plus its lowering): a stage step goes in [`STEPS`] (which
//! stages and their `when` blocks share), a `run` child in [`RUN`], a top-level node in
//! [`TOP_LEVEL`].

/// The type a property's value must have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Value {
    String,
    Bool,
    /// A string, or an integer taken as its decimal text (user ids, modes written as numbers).
    StringOrInteger,
    /// A non-negative integer that fits in 32 bits (`retries=3`).
    Count,
    /// Any value: the node's lowering checks it (an enumeration, an octal mode…).
    Raw,
}

/// The properties a node allows.
#[derive(Clone, Copy, Debug)]
pub(super) enum Properties {
    /// These, and no others.
    Only(&'static [(&'static str, Value)]),
    /// `KEY=VALUE` pairs of the user's own names (`env`, `label`, `arg`), read by the node's
    /// lowering.
    Pairs,
}

/// The positional arguments a node takes.
#[derive(Clone, Copy, Debug)]
pub(super) enum Args {
    None,
    /// Exactly one value; `what` completes "`NAME` needs …" when it is missing, and the
    /// help shows `example`. With `integers`, an integer is taken as its decimal text
    /// (`user 1000`).
    One {
        what: &'static str,
        integers: bool,
        example: &'static str,
    },
    /// Read by the node's lowering (names, paths, commands, lists).
    Custom,
}

/// One node kind.
#[derive(Debug)]
pub(super) struct NodeSpec {
    pub(super) name: &'static str,
    pub(super) args: Args,
    pub(super) properties: Properties,
    /// The table its children are looked up in; `None`: no children block.
    pub(super) children: Option<&'static [NodeSpec]>,
}

impl NodeSpec {
    /// The names of its allowed properties, in table order (none for [`Properties::Pairs`]).
    pub(super) fn property_names(&self) -> Vec<&'static str> {
        match self.properties {
            Properties::Only(list) => list.iter().map(|(name, _)| *name).collect(),
            Properties::Pairs => Vec::new(),
        }
    }
}

/// The node named `name` in `table`, if it is allowed there.
pub(super) fn find(table: &'static [NodeSpec], name: &str) -> Option<&'static NodeSpec> {
    table.iter().find(|spec| spec.name == name)
}

/// The node named `name` in `table`; for nodes the loader dispatches on by name itself.
pub(super) fn get(table: &'static [NodeSpec], name: &str) -> &'static NodeSpec {
    find(table, name).unwrap_or_else(|| panic!("no node `{name}` in the spec table"))
}

/// The names of a table's nodes, in order.
pub(super) fn names(table: &[NodeSpec]) -> Vec<&'static str> {
    table.iter().map(|spec| spec.name).collect()
}

const fn node(
    name: &'static str,
    args: Args,
    properties: &'static [(&'static str, Value)],
) -> NodeSpec {
    NodeSpec {
        name,
        args,
        properties: Properties::Only(properties),
        children: None,
    }
}

const fn one(what: &'static str, example: &'static str) -> Args {
    Args::One {
        what,
        integers: false,
        example,
    }
}

const fn one_or_integer(what: &'static str, example: &'static str) -> Args {
    Args::One {
        what,
        integers: true,
        example,
    }
}

const fn pairs(name: &'static str) -> NodeSpec {
    NodeSpec {
        name,
        args: Args::Custom,
        properties: Properties::Pairs,
        children: None,
    }
}

const fn block(
    name: &'static str,
    args: Args,
    properties: &'static [(&'static str, Value)],
    children: &'static [NodeSpec],
) -> NodeSpec {
    NodeSpec {
        name,
        args,
        properties: Properties::Only(properties),
        children: Some(children),
    }
}

use kdl::{KdlEntry, KdlNode, KdlValue};

use crate::Code;
use crate::ir::{FileId, Text};

use super::{Loader, properties, value_kind};
use Args::Custom;
use Value::{Bool, Count, Raw, StringOrInteger};

const STRING: Value = Value::String;

/// The top level of a build file.
pub(super) static TOP_LEVEL: &[NodeSpec] = &[
    node("platforms", Custom, &[]),
    pairs("arg"),
    node("import", Custom, &[("as", STRING)]),
    block("stage", Custom, &[("rules", STRING)], STAGE),
    block(
        "image",
        Custom,
        &[
            ("push", Bool),
            ("strict-arch", Bool),
            ("provenance", Raw),
            ("sbom", Bool),
        ],
        IMAGE,
    ),
    block("template", Custom, &[], TEMPLATE),
    node("group", Custom, &[]),
    block(
        "dockerfile",
        Custom,
        &[("path", STRING), ("context", STRING)],
        DOCKERFILE,
    ),
];

/// A `dockerfile` node's body: the args it passes to the Dockerfile.
pub(super) static DOCKERFILE: &[NodeSpec] = &[pairs("arg")];

/// A template's body.
pub(super) static TEMPLATE: &[NodeSpec] = &[
    node(
        "param",
        Custom,
        &[("default", StringOrInteger), ("description", STRING)],
    ),
    block("stage", Custom, &[("rules", STRING)], STAGE),
];

/// What a stage holds besides its steps ([`STEPS`]): its base, its platform and `when` blocks
/// of steps. Listed as [`stage_names`] orders them.
pub(super) static STAGE: &[NodeSpec] = &[
    node(
        "from",
        one(
            "an image, a stage or \"scratch\"",
            "from \"docker.io/library/alpine:3.20\"",
        ),
        &[],
    ),
    node(
        "platform",
        one("a platform", "platform \"linux/arm64\""),
        &[],
    ),
    block("when", Args::None, &[("platform", STRING)], STEPS),
];

/// The steps of a stage, which its `when` blocks take too.
pub(super) static STEPS: &[NodeSpec] = &[
    block("run", Custom, RUN_PROPERTIES, RUN),
    COPY,
    FILE,
    ADD,
    pairs("env"),
    pairs("arg"),
    WORKDIR,
    USER,
    pairs("label"),
    node("expose", Custom, &[]),
    ENTRYPOINT,
    CMD,
    node("volume", Custom, &[]),
    node("shell", Custom, &[]),
    STOPSIGNAL,
    HEALTHCHECK,
];

/// Everything a stage may hold, in the order diagnostics list it: `from`, `platform`, the
/// steps, `when`.
pub(super) fn stage_names() -> Vec<&'static str> {
    let mut names = vec!["from", "platform"];
    names.extend(STEPS.iter().map(|spec| spec.name));
    names.push("when");
    names
}

const RUN_PROPERTIES: &[(&str, Value)] = &[("timeout", STRING), ("insecure", Bool)];
const COPY: NodeSpec = node(
    "copy",
    Custom,
    &[
        ("from", STRING),
        ("chown", StringOrInteger),
        ("chmod", Raw),
        ("exclude", STRING),
        ("parents", Bool),
    ],
);
const FILE: NodeSpec = node(
    "file",
    Custom,
    &[
        ("content", STRING),
        ("chown", StringOrInteger),
        ("chmod", STRING),
        ("heredoc", STRING),
        ("expand", Bool),
    ],
);
const ADD: NodeSpec = node(
    "add",
    Custom,
    &[
        ("checksum", STRING),
        ("keep-git-dir", Bool),
        ("chown", StringOrInteger),
        ("chmod", STRING),
    ],
);
const WORKDIR: NodeSpec = node("workdir", one("a directory", "workdir \"/app\""), &[]);
const USER: NodeSpec = node("user", one_or_integer("a user", "user \"app\""), &[]);
const STOPSIGNAL: NodeSpec = node(
    "stopsignal",
    one_or_integer("a signal", "stopsignal \"SIGTERM\""),
    &[],
);
const ENTRYPOINT: NodeSpec = node("entrypoint", Custom, &[("shell", Bool)]);
const CMD: NodeSpec = node("cmd", Custom, &[("shell", Bool)]);
const HEALTHCHECK: NodeSpec = node(
    "healthcheck",
    Custom,
    &[
        ("interval", STRING),
        ("timeout", STRING),
        ("start-period", STRING),
        ("retries", Count),
        ("none", Bool),
    ],
);

/// The children of `run`.
pub(super) static RUN: &[NodeSpec] = &[
    node(
        "cache-mount",
        Custom,
        &[
            ("id", STRING),
            ("sharing", STRING),
            ("uid", StringOrInteger),
            ("gid", StringOrInteger),
            ("mode", STRING),
        ],
    ),
    node("tmpfs", Custom, &[("size", STRING)]),
    node(
        "bind",
        Custom,
        &[("source", STRING), ("from", STRING), ("rw", Bool)],
    ),
    node(
        "ssh",
        Custom,
        &[
            ("target", STRING),
            ("required", Bool),
            ("uid", StringOrInteger),
            ("gid", StringOrInteger),
            ("mode", STRING),
        ],
    ),
    node(
        "secret",
        Custom,
        &[("target", STRING), ("env", STRING), ("required", Bool)],
    ),
    node(
        "network",
        one("\"none\" or \"host\"", "network \"none\""),
        &[],
    ),
];

/// An image.
pub(super) static IMAGE: &[NodeSpec] = &[
    node("stage", one("a stage name", "stage app"), &[]),
    node("tags", Custom, &[]),
    node("platforms", Custom, &[]),
    node("matrix", Custom, &[]),
    node("use", Custom, &[]),
    node("annotation", Custom, &[]),
    pairs("label"),
    node("output", one("a path", "output \"out/app\""), &[]),
    node("push", Custom, &[]),
    block("test", Custom, &[], TEST),
];

/// An image's `test` block.
pub(super) static TEST: &[NodeSpec] = &[
    node("run", Custom, &[]),
    CMD,
    ENTRYPOINT,
    USER,
    WORKDIR,
    pairs("env"),
    node("exit", Custom, &[]),
    node("output", Args::None, OUTPUT_CHECK),
    node("stdout", Args::None, OUTPUT_CHECK),
    node("stderr", Args::None, OUTPUT_CHECK),
    node("timeout", one("a duration", "timeout \"30s\""), &[]),
    node("platforms", Custom, &[]),
];

const OUTPUT_CHECK: &[(&str, Value)] = &[("contains", STRING), ("matches", STRING)];

// ---------------------------------------------------------------------------------------------
// Reading a node by its spec
// ---------------------------------------------------------------------------------------------

/// A node's properties, each checked against its spec: the values of the right type, by
/// property name (a property given twice keeps both; the readers take the last).
pub(super) struct Props {
    values: Vec<(&'static str, Read)>,
    /// A property had the wrong type (and was reported).
    pub(super) failed: bool,
}

enum Read {
    Text(Text),
    Bool(bool),
    Count(u32),
    Raw(Box<KdlEntry>),
}

impl Props {
    fn all(&self, name: &str) -> impl Iterator<Item = &Read> {
        self.values
            .iter()
            .filter(move |(key, _)| *key == name)
            .map(|(_, read)| read)
    }

    /// A string (or [`Value::StringOrInteger`]) property.
    pub(super) fn text(&self, name: &str) -> Option<Text> {
        self.texts(name).pop()
    }

    /// Every value of a string property given several times (`exclude=`).
    pub(super) fn texts(&self, name: &str) -> Vec<Text> {
        self.all(name)
            .filter_map(|read| match read {
                Read::Text(text) => Some(text.clone()),
                _ => None,
            })
            .collect()
    }

    pub(super) fn bool(&self, name: &str) -> Option<bool> {
        self.all(name).fold(None, |last, read| match read {
            Read::Bool(value) => Some(*value),
            _ => last,
        })
    }

    pub(super) fn count(&self, name: &str) -> Option<u32> {
        self.all(name).fold(None, |last, read| match read {
            Read::Count(value) => Some(*value),
            _ => last,
        })
    }

    /// Every value of a [`Value::Raw`] property, for the node's lowering to check.
    pub(super) fn raw(&self, name: &str) -> Vec<&KdlEntry> {
        self.all(name)
            .filter_map(|read| match read {
                Read::Raw(entry) => Some(&**entry),
                _ => None,
            })
            .collect()
    }
}

impl Loader {
    /// `node`'s properties read by `spec`: an unknown one is reported with the node's
    /// allowed properties, one of the wrong type with the type it needs. A node whose spec has
    /// no children table must have no children block.
    pub(super) fn node_properties(
        &mut self,
        node: &KdlNode,
        file: FileId,
        spec: &NodeSpec,
    ) -> Props {
        if spec.children.is_none() {
            self.check_no_children(node, file, spec.name);
        }
        let mut props = Props {
            values: Vec::new(),
            failed: false,
        };
        for (key, entry) in properties(node) {
            let Properties::Only(list) = spec.properties else {
                continue;
            };
            let Some((name, value)) = list.iter().find(|(name, _)| *name == key) else {
                self.unknown_property(key, entry, file, spec.name, &spec.property_names());
                continue;
            };
            let what = format!("`{name}`");
            let read = match value {
                Value::String => self.string(entry, file, &what).map(Read::Text),
                Value::StringOrInteger => {
                    self.string_or_integer(entry, file, &what).map(Read::Text)
                }
                Value::Bool => self.boolean(entry, file, &what).map(Read::Bool),
                Value::Count => self.count(entry, file, name).map(Read::Count),
                Value::Raw => Some(Read::Raw(Box::new(entry.clone()))),
            };
            match read {
                Some(read) => props.values.push((name, read)),
                None => props.failed = true,
            }
        }
        props
    }

    /// A non-negative integer that fits in 32 bits.
    fn count(&mut self, entry: &KdlEntry, file: FileId, name: &str) -> Option<u32> {
        match entry.value() {
            KdlValue::Integer(number) if (0..=i128::from(u32::MAX)).contains(number) => {
                Some(*number as u32)
            }
            other => {
                let kind = value_kind(other);
                self.error(
                    Code::TypeExpectedInteger,
                    format!("expected a non-negative integer for `{name}`, found {kind}"),
                    Self::loc(file, entry.span()),
                    kind,
                    Some(format!("write {name}=3")),
                );
                None
            }
        }
    }

    /// The value of a node whose spec takes exactly one ([`Args::One`]), after checking it
    /// has no children block and no properties.
    pub(super) fn single(&mut self, node: &KdlNode, file: FileId, spec: &NodeSpec) -> Option<Text> {
        let Args::One {
            what,
            integers,
            example,
        } = spec.args
        else {
            unreachable!("`{}` does not take exactly one value", spec.name)
        };
        self.single_value(node, file, spec.name, (what, example), integers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every table names each node once, and every node's properties once.
    #[test]
    fn names_are_unique() {
        for table in [
            TOP_LEVEL, TEMPLATE, STAGE, STEPS, RUN, IMAGE, TEST, DOCKERFILE,
        ] {
            let mut seen = std::collections::HashSet::new();
            for spec in table {
                assert!(seen.insert(spec.name), "`{}` twice in a table", spec.name);
                let properties = spec.property_names();
                let unique: std::collections::HashSet<_> = properties.iter().collect();
                assert_eq!(unique.len(), properties.len(), "{}", spec.name);
            }
        }
    }

    /// The help text lists a stage's nodes in this order (snapshots and docs show it).
    #[test]
    fn a_stage_lists_its_base_its_steps_then_when() {
        assert_eq!(
            stage_names(),
            [
                "from",
                "platform",
                "run",
                "copy",
                "file",
                "add",
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
                "when"
            ]
        );
        for name in names(STAGE) {
            assert!(find(STEPS, name).is_none(), "`{name}` is not a step");
        }
    }
}
