//! Operations: the typed definition of one step, and the key it computes from that data alone.
//!
//! # One op, one key
//!
//! A step's key is blake3 over [`FORMAT_VERSION`](crate::key::FORMAT_VERSION), the key of the
//! state the step starts from, and the *canonical encoding* of its [`Op`]: serde JSON of typed
//! values (strings escaped, lists delimited, maps ordered), so two ops encode equally only when
//! every field is equal. Nothing meant for people (a step's description, a location, a
//! variable's name as written) takes part. What a step reads from outside its own definition
//! is inside the op too: a `copy` carries the digest of the context files it selects or the
//! key of the stage it copies from; a `run` carries its whole environment, which is how build
//! args reach it (as variables, never spliced into its command).
//!
//! This is BuildKit's rule (`solver/types.go`: every op computes its cache digest from its own
//! marshalled definition) and what makes a collision between two different configs impossible
//! by construction: the encoding is injective, so only the hash could collide.
//!
//! `plan --explain` records the same canonical encoding and compares it field by field, so an
//! explanation can never disagree with the key.

use std::sync::Arc;

use serde::Serialize;

use crate::context::CopyItem;
use crate::digest::Key;
use crate::key::KeyBuilder;
use crate::state::{HealthcheckSettings, ImageSettings};

/// One step's operation, with every input that decides its result.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Op {
    Run(RunOp),
    Copy(CopyOp),
    /// A metadata step: it changes settings, never the filesystem.
    Config(ConfigOp),
}

impl Op {
    pub fn touches_filesystem(&self) -> bool {
        !matches!(self, Op::Config(_))
    }

    /// The canonical encoding: the bytes a key is computed from.
    pub fn canonical(&self) -> Vec<u8> {
        // Serializing these types cannot fail: every map has string keys and there are no
        // non-finite floats. A failure would be a programming error, never silently "empty".
        serde_json::to_vec(self).expect("an op always serializes")
    }

    /// The key of this op applied to the state `parent`.
    pub fn key(&self, parent: &Key) -> Key {
        KeyBuilder::new("step")
            .key(parent)
            .bytes(&self.canonical())
            .finish()
    }

    /// The image history's `created_by` for a non-`run` step (a `run` shows its command with
    /// values substituted, which the expander computes). A function of the op alone.
    pub fn describe(&self) -> String {
        match self {
            Op::Run(run) => match &run.script {
                Some(script) => format!("RUN <<EOF {}", script.lines().next().unwrap_or("")),
                None => format!("RUN {}", run.argv.join(" ")),
            },
            Op::Copy(copy) => match &copy.from {
                CopySource::Url { url, .. } | CopySource::Git { url, .. } => {
                    format!("ADD {} {}", crate::fetch::redact(url), copy.dest)
                }
                CopySource::Extract { .. } => {
                    format!("ADD {} {}", copy.sources.join(" "), copy.dest)
                }
                _ => format!("COPY {} {}", copy.sources.join(" "), copy.dest),
            },
            Op::Config(config) => config.describe(),
        }
    }
}

/// Where a `run` script with a `#!` line is, inside the step: in the step's own `/dev` tmpfs,
/// so it is in no layer (and, that mount being `noexec`, it is run by its interpreter, as the
/// kernel would: `INTERPRETER [ARG] SCRIPT_PATH`).
pub const SCRIPT_PATH: &str = "/dev/.graphbuild-script";

/// The argv the kernel would build for a script starting `#!INTERPRETER [ARG]`: everything
/// after the interpreter, trimmed, is one argument. `None` without an interpreter.
pub fn script_argv(script: &str) -> Option<Vec<String>> {
    let line = script.strip_prefix("#!")?.lines().next().unwrap_or("");
    let line = line.trim();
    let (interpreter, argument) = match line.split_once([' ', '\t']) {
        Some((interpreter, argument)) => (interpreter, Some(argument.trim())),
        None => (line, None),
    };
    if interpreter.is_empty() {
        return None;
    }
    let mut argv = vec![interpreter.to_string()];
    argv.extend(
        argument
            .filter(|argument| !argument.is_empty())
            .map(str::to_string),
    );
    argv.push(SCRIPT_PATH.to_string());
    Some(argv)
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RunOp {
    /// The command as written: build variables are *not* substituted into it. They reach it
    /// through [`RunOp::env`] and the shell expands them, as Docker passes `ARG`s to `RUN`.
    pub argv: Vec<String>,
    /// A command written as a script with a `#!` line (a Dockerfile `RUN <<EOF` heredoc, or
    /// a KDL `run` string starting with `#!`): the whole script, which the sandbox writes to
    /// [`SCRIPT_PATH`] for the interpreter `argv` names, as the kernel would run it. In the key
    /// only when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    /// The whole environment, sorted by name: the image env, the stage's args, the automatic
    /// platform args the stage may see, and every build variable the command references.
    pub env: Vec<(String, String)>,
    pub workdir: String,
    pub user: String,
    pub cache_mounts: Vec<CacheMountOp>,
    /// In the key only when there are some, so the keys of other steps do not change.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tmpfs_mounts: Vec<TmpfsMountOp>,
    /// In the key only when there are some.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bind_mounts: Vec<BindMountOp>,
    /// In the key only when there are some.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stage_binds: Vec<StageBindOp>,
    /// In the key only when there are some.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ssh_mounts: Vec<SshMountOp>,
    pub secrets: Vec<SecretOp>,
    pub network_none: bool,
    /// `insecure=#true`: every capability, no seccomp filter. In the key only when set, so
    /// the keys of ordinary steps do not change.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
    /// `timeout="…"` in milliseconds. Not in the key: it does not change what a step makes,
    /// only how long it may take to make it.
    #[serde(skip)]
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CacheMountOp {
    pub id: String,
    pub target: String,
    /// The owner and mode a new (empty) cache directory gets; in the key only when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// How steps running at once share the directory. Not in the key (as in Docker): it
    /// decides how the step waits for the mount, not what the step computes.
    #[serde(skip)]
    pub sharing: graphbuild_lang::ir::CacheSharing,
}

/// An empty tmpfs for the step's lifetime. Its target and size are in the key: a step's result
/// can depend on where it may write scratch files and how much.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TmpfsMountOp {
    pub target: String,
    pub size: Option<u64>,
}

/// Part of the build context, read-only on `target` while the step runs. `digest` covers every
/// selected path, mode, link target and content, as a copy's does: a change to what the step
/// can read changes its key.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BindMountOp {
    pub target: String,
    pub source: String,
    #[serde(skip)]
    pub items: Vec<CopyItem>,
    pub digest: String,
}

/// A stage's or an image's filesystem (`source` in it, `/` by default) on `target` while the
/// step runs, as Docker's `RUN --mount=type=bind,from=…`: keyed by that node's key, so a
/// change to the stage runs the step again. Read-only unless `readwrite`; what the step writes
/// to a writable one is discarded after it (Docker's semantics).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StageBindOp {
    pub target: String,
    pub source: String,
    /// The node's index in this plan, for the executor only (as [`CopySource::Node`]'s).
    #[serde(skip)]
    pub node: usize,
    pub key: Key,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub readwrite: bool,
}

/// An ssh agent socket on `target`, as Docker's `RUN --mount=type=ssh`. The key has the id
/// and how the step sees the socket (as BuildKit's), never what `--ssh` binds the id to: a
/// socket path, key files or keys.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SshMountOp {
    pub id: String,
    pub target: String,
    /// Checked before the build starts (see [`crate::ssh::missing_required`]). Not in the key:
    /// it decides whether the build may start, not what the step sees.
    #[serde(skip)]
    pub required: bool,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

/// A secret's id and where it goes; never its value.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SecretOp {
    pub id: String,
    pub target: Option<String>,
    pub env: Option<String>,
    pub required: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CopyOp {
    pub sources: Vec<String>,
    pub dest: String,
    pub workdir: String,
    pub chown: Option<String>,
    /// Keyed as the octal number it is, or as its symbolic text ([`crate::chmod`]).
    pub chmod: Option<crate::chmod::Chmod>,
    /// `parents=#true`: the items' destinations keep their source paths (see
    /// [`crate::copy_parents`]). In the key only when set.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub parents: bool,
    /// `exclude` patterns, as written (the selected items already leave out what they
    /// match). In the key only when there are some.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    pub from: CopySource,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CopySource {
    /// Files selected from the build context at plan time; `digest` covers every selected
    /// path, mode, link target and content.
    Context {
        /// Shared by the platforms that select the same sources (a copy of 100,000 files is
        /// selected and held once, not once per platform).
        #[serde(skip)]
        items: Arc<Vec<CopyItem>>,
        digest: String,
        /// Files the build file writes itself (`file`, `COPY <<EOF`), by name, with their
        /// contents: the copy reads `items` from a scratch directory holding them instead of
        /// the context. `digest` covers their names, sizes, modes and contents.
        #[serde(skip)]
        inline: Vec<(String, Vec<u8>)>,
    },
    /// Another node's filesystem, by the node's *key*. Its index in this plan is for the
    /// executor only: indexes differ between plans of the same inputs.
    Node {
        #[serde(skip)]
        node: usize,
        key: Key,
    },
    /// `add "https://…"`: one file downloaded on the host, named `name`, by its sha256 (the
    /// `checksum`, or the digest of what the planner downloaded). The URL is not in the key (it
    /// may hold credentials, and Docker keys a checksummed download by its checksum): the same
    /// bytes under the same name are the same step, wherever they came from.
    Url {
        #[serde(skip)]
        url: String,
        /// `sha256:…`; empty when [`CopySource::Url::unresolved`].
        digest: String,
        name: String,
        /// Set when the digest could not be had without the network: the step is pending.
        #[serde(skip)]
        unresolved: Option<std::sync::Arc<crate::resolve::Unresolved>>,
    },
    /// `add "https://host/repo.git#REF:SUBDIR"`: a git tree, by the commit `REF` resolved to.
    /// The commit names every byte of the tree, so neither the URL nor the ref is in the key.
    Git {
        #[serde(skip)]
        url: String,
        /// Empty when [`CopySource::Git::unresolved`].
        commit: String,
        subdir: String,
        keep_git_dir: bool,
        #[serde(skip)]
        unresolved: Option<std::sync::Arc<crate::resolve::Unresolved>>,
    },
    /// `add` of context files among which tar archives (named by `archives`, their `rel_src`)
    /// are extracted into the destination rather than copied; `digest` as for
    /// [`CopySource::Context`].
    Extract {
        #[serde(skip)]
        items: Vec<CopyItem>,
        digest: String,
        archives: Vec<String>,
    },
}

impl CopySource {
    /// Why the source is not known without the network, for an `add` of a URL or a repository.
    pub fn unresolved(&self) -> Option<&crate::resolve::Unresolved> {
        match self {
            CopySource::Url { unresolved, .. } | CopySource::Git { unresolved, .. } => {
                unresolved.as_deref()
            }
            _ => None,
        }
    }
}

/// A metadata step, with its values substituted.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "config", content = "value", rename_all = "snake_case")]
pub enum ConfigOp {
    /// `env K=V …`, in the order written.
    Env(Vec<(String, String)>),
    /// `arg NAME[=default]` in a stage: `value` is `None` when nothing gives it one.
    Arg {
        name: String,
        value: Option<String>,
    },
    /// The resolved absolute working directory.
    Workdir(String),
    User(String),
    Label(Vec<(String, String)>),
    /// Ports with their protocol (`8080/tcp`).
    Expose(Vec<String>),
    Entrypoint(Vec<String>),
    Cmd(Vec<String>),
    Volume(Vec<String>),
    Shell(Vec<String>),
    StopSignal(String),
    Healthcheck(HealthcheckSettings),
}

impl ConfigOp {
    /// Apply to the image settings (an `arg` changes none: it changes variables).
    pub fn apply(&self, settings: &mut ImageSettings) {
        match self {
            ConfigOp::Env(pairs) => {
                for (name, value) in pairs {
                    settings.set_env(name, value.clone());
                }
            }
            ConfigOp::Arg { .. } => {}
            ConfigOp::Workdir(path) => settings.workdir = path.clone(),
            ConfigOp::User(user) => settings.user = user.clone(),
            ConfigOp::Label(pairs) => {
                for (name, value) in pairs {
                    settings.labels.insert(name.clone(), value.clone());
                }
            }
            ConfigOp::Expose(ports) => settings.exposed_ports.extend(ports.iter().cloned()),
            ConfigOp::Entrypoint(argv) => {
                settings.entrypoint = Some(argv.clone());
                // Docker: setting an entrypoint resets a cmd inherited from the base image.
                settings.cmd = None;
            }
            ConfigOp::Cmd(argv) => settings.cmd = Some(argv.clone()),
            ConfigOp::Volume(paths) => settings.volumes.extend(paths.iter().cloned()),
            ConfigOp::Shell(argv) => settings.shell = argv.clone(),
            ConfigOp::StopSignal(signal) => settings.stop_signal = Some(signal.clone()),
            ConfigOp::Healthcheck(check) => settings.healthcheck = Some(check.clone()),
        }
    }

    /// The history entry, in Docker's words.
    pub fn describe(&self) -> String {
        let pairs = |pairs: &[(String, String)]| {
            pairs
                .iter()
                .map(|(name, value)| format!("{name}={value}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        match self {
            ConfigOp::Env(list) => format!("ENV {}", pairs(list)),
            ConfigOp::Arg {
                name,
                value: Some(value),
            } => format!("ARG {name}={value}"),
            ConfigOp::Arg { name, value: None } => format!("ARG {name}"),
            ConfigOp::Workdir(path) => format!("WORKDIR {path}"),
            ConfigOp::User(user) => format!("USER {user}"),
            ConfigOp::Label(list) => format!("LABEL {}", pairs(list)),
            ConfigOp::Expose(ports) => format!("EXPOSE {}", ports.join(" ")),
            ConfigOp::Entrypoint(argv) => format!("ENTRYPOINT {argv:?}"),
            ConfigOp::Cmd(argv) => format!("CMD {argv:?}"),
            ConfigOp::Volume(paths) => format!("VOLUME {}", paths.join(" ")),
            ConfigOp::Shell(argv) => format!("SHELL {argv:?}"),
            ConfigOp::StopSignal(signal) => format!("STOPSIGNAL {signal}"),
            ConfigOp::Healthcheck(check) => format!("HEALTHCHECK {:?}", check.test),
        }
    }
}

/// An image test: a command run in a finished image, and what it must return and print. Its
/// key is [`TestOp::key`] over the key of the node whose filesystem and settings the image is.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TestOp {
    /// The platform the command runs for (under qemu when foreign).
    pub platform: String,
    /// The whole command: the image's (or the test's) entrypoint, then its arguments.
    pub argv: Vec<String>,
    /// The whole environment: the image's, then the test's `env`.
    pub env: Vec<(String, String)>,
    pub workdir: String,
    pub user: String,
    pub exit_code: i32,
    pub output: Vec<OutputCheckOp>,
    /// `timeout` in milliseconds. Not in the key, as for a `run`: it bounds how long the
    /// test may take, not what it checks.
    #[serde(skip)]
    pub timeout_ms: Option<u64>,
}

/// One output check: the stream (`output`: stdout and stderr together, `stdout`, `stderr`)
/// must contain `contains` and match `matches`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct OutputCheckOp {
    pub stream: String,
    pub contains: Option<String>,
    pub matches: Option<String>,
}

impl TestOp {
    /// The canonical encoding: the bytes the key is computed from.
    pub fn canonical(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a test op always serializes")
    }

    /// The key of this test run in the image whose last node has key `image`.
    pub fn key(&self, image: &Key) -> Key {
        KeyBuilder::new("image-test")
            .key(image)
            .bytes(&self.canonical())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Op {
        Op::Config(ConfigOp::Env(
            pairs
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect(),
        ))
    }

    #[test]
    fn env_pairs_never_collide_with_one_joined_value() {
        // The collision of the issue: `env A="1 B=2"` and `env A="1" B="2"` describe the same.
        let joined = env(&[("A", "1 B=2")]);
        let split = env(&[("A", "1"), ("B", "2")]);
        assert_eq!(joined.describe(), split.describe());
        let parent = Key([7; 32]);
        assert_ne!(joined.key(&parent), split.key(&parent));
    }

    #[test]
    fn a_test_key_follows_the_image_and_every_field() {
        let test = TestOp {
            platform: "linux/arm64".into(),
            argv: vec!["/app".into(), "--version".into()],
            env: vec![("PATH".into(), "/bin".into())],
            workdir: "/".into(),
            user: String::new(),
            exit_code: 0,
            output: vec![OutputCheckOp {
                stream: "output".into(),
                contains: Some("1.2".into()),
                matches: None,
            }],
            timeout_ms: Some(1000),
        };
        let image = Key([3; 32]);
        assert_ne!(test.key(&image), test.key(&Key([4; 32])));
        let mut other = test.clone();
        other.exit_code = 1;
        assert_ne!(test.key(&image), other.key(&image));
        let mut other = test.clone();
        other.platform = "linux/amd64".into();
        assert_ne!(test.key(&image), other.key(&image));
        let mut slower = test.clone();
        slower.timeout_ms = Some(5000);
        assert_eq!(
            test.key(&image),
            slower.key(&image),
            "a timeout is not in the key"
        );
        // Never the key of a step with the same bytes.
        assert_ne!(
            test.key(&image),
            KeyBuilder::new("step")
                .key(&image)
                .bytes(&test.canonical())
                .finish()
        );
    }

    #[test]
    fn the_same_op_on_another_parent_is_another_key() {
        let op = env(&[("A", "1")]);
        assert_ne!(op.key(&Key([1; 32])), op.key(&Key([2; 32])));
        assert_eq!(op.key(&Key([1; 32])), op.key(&Key([1; 32])));
    }
}
