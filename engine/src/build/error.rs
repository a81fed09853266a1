//! Why a build failed: [`StepError`] says what went wrong, [`NodeFailure`] where (the stage,
//! the platform, the step and its location in the build file). The CLI renders a failure as a
//! build-file diagnostic ([`NodeFailure::diagnostic`]) pointing at the failing step, and
//! `--progress json` reports it as an event with the same location
//! ([`NodeFailure::event`]).

use std::path::PathBuf;
use std::sync::Arc;

use graphbuild_lang::ir::{Loc, Sources};
use graphbuild_lang::{Code, Diagnostic};

use crate::events::FailureEvent;
use crate::layer::LayerError;
use crate::resolve::ResolveError;
use crate::sandbox::{self, SandboxError};
use crate::store::StoreError;

use super::faults::{CopyFault, ExportError, LayerFault, TestFault};
use super::step_cache::CacheError;
use crate::sandbox::overlay::Unavailable;

/// What made a step (or a node, or an image) fail. Each message reads on its own; the causes
/// of a variant with a `#[source]` are appended by [`message`].
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum StepError {
    /// The command ran and exited with a non-zero status.
    #[error("the command failed with exit code {code}")]
    #[diagnostic(code(graphbuild::step::exit_code))]
    ExitCode { code: i32 },

    #[error("the command was killed by signal {signal}{}", signal_hint(*signal))]
    #[diagnostic(code(graphbuild::step::signal))]
    Signal { signal: i32 },

    #[error(
        "the step ran past its timeout of {} and was killed (set with `timeout=` on `run` or \
         `--step-timeout`)",
        sandbox::format_duration(*millis)
    )]
    #[diagnostic(code(graphbuild::step::timeout))]
    TimedOut { millis: u64 },

    #[error("the step reached its process limit of {max} processes (pids cgroup) and was killed")]
    #[diagnostic(
        code(graphbuild::step::process_limit),
        help("raise the limit with `--step-max-processes`")
    )]
    ProcessLimit { max: u32 },

    #[error(
        "the step needs the secret `{id}`; pass it with --secret id={id},src=PATH or --secret \
         id={id},env=VAR"
    )]
    #[diagnostic(code(graphbuild::step::secret_missing))]
    SecretMissing { id: String },

    #[error("the step needs the ssh agent `{id}`; pass --ssh {id}")]
    #[diagnostic(code(graphbuild::step::ssh_missing))]
    SshMissing { id: String },

    #[error("cannot forward the ssh agent `{id}`")]
    #[diagnostic(code(graphbuild::step::ssh_forward))]
    SshForward {
        id: String,
        #[source]
        source: std::io::Error,
    },

    /// The remote executor failed and `--remote-required` forbids running the step here.
    #[error("the remote executor failed (--remote-required)")]
    #[diagnostic(code(graphbuild::step::remote_required))]
    RemoteRequired {
        #[source]
        source: Box<crate::remote::RemoteError>,
    },

    /// A step of a platform this machine cannot emulate had to run here (no worker of the
    /// remote executor took it, or it may not leave the machine); the preflight lets such
    /// platforms through only when a remote executor may run their steps.
    #[error(
        "cannot run this {platform} step on this machine, and it did not run on a worker of the remote executor"
    )]
    #[diagnostic(
        code(graphbuild::step::no_emulator),
        help(
            "install the emulators with `apt-get install qemu-user-static binfmt-support` and \
             `update-binfmts --enable` (or `graphbuild doctor --fix`), start a worker of \
             {platform} on the cluster, or build only native platforms with --platform {host}"
        )
    )]
    NoEmulator {
        platform: String,
        host: String,
        #[source]
        source: Box<crate::binfmt::EmulationError>,
    },

    #[error("cannot read secret `{id}`")]
    #[diagnostic(code(graphbuild::step::secret_read))]
    SecretRead {
        id: String,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot open cache mount `{id}`")]
    #[diagnostic(code(graphbuild::step::cache_mount))]
    CacheMount {
        id: String,
        #[source]
        source: StoreError,
    },

    #[error("cannot {action} {}", path.display())]
    #[diagnostic(code(graphbuild::step::io))]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot create a temporary directory")]
    #[diagnostic(code(graphbuild::step::io))]
    TempDir {
        #[source]
        source: std::io::Error,
    },

    #[error("cannot write the layer")]
    #[diagnostic(code(graphbuild::step::layer))]
    WriteLayer {
        #[source]
        source: LayerError,
    },

    #[error("cannot store the layer")]
    #[diagnostic(code(graphbuild::step::store))]
    StoreLayer {
        #[source]
        source: StoreError,
    },

    #[error(transparent)]
    #[diagnostic(transparent)]
    Sandbox(#[from] SandboxError),

    /// The node's base image could not be fetched.
    #[error(transparent)]
    #[diagnostic(code(graphbuild::step::base_image))]
    Base(#[from] ResolveError),

    #[error("the base image `{reference}` is unresolved")]
    #[diagnostic(code(graphbuild::step::base_image))]
    Unresolved { reference: String },

    /// A node ran before a node it needs had finished: a bug in the build's graph.
    #[error("internal error: node {node} has no output")]
    #[diagnostic(code(graphbuild::step::internal))]
    NoOutput { node: usize },

    #[error("cancelled")]
    #[diagnostic(code(graphbuild::step::cancelled))]
    Cancelled,

    /// The local store's action cache or a team cache failed.
    #[error(transparent)]
    #[diagnostic(transparent)]
    Cache(#[from] CacheError),

    #[error("cannot set the owner or mode of cache mount `{id}`")]
    #[diagnostic(code(graphbuild::step::cache_mount))]
    CacheMountOwner {
        id: String,
        #[source]
        source: std::io::Error,
    },

    /// No overlay filesystem can be mounted for the step.
    #[error("{0}")]
    #[diagnostic(code(graphbuild::step::overlay))]
    Overlay(Unavailable),

    #[error(transparent)]
    #[diagnostic(transparent)]
    Layer(#[from] LayerFault),

    #[error(transparent)]
    #[diagnostic(transparent)]
    Copy(#[from] CopyFault),

    #[error(transparent)]
    #[diagnostic(transparent)]
    Test(#[from] TestFault),

    #[error(transparent)]
    #[diagnostic(transparent)]
    Export(Box<ExportError>),
}

impl From<ExportError> for StepError {
    fn from(error: ExportError) -> StepError {
        StepError::Export(Box::new(error))
    }
}

impl From<Unavailable> for StepError {
    fn from(unavailable: Unavailable) -> StepError {
        StepError::Overlay(unavailable)
    }
}

fn signal_hint(signal: i32) -> &'static str {
    if signal == libc::SIGSYS {
        " (SIGSYS: a system call the sandbox's seccomp filter refuses; 32-bit x86 programs \
         cannot run under it, see docs/security.md)"
    } else {
        ""
    }
}

/// An error and its causes, `: `-separated; a cause the message already quotes is not
/// repeated.
pub(super) fn message(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// What failed: a node (at one of its steps, or before, fetching its base), an image's
/// layout, or saving the cache mounts to the team cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    Node,
    Image,
    CacheMounts,
    /// An image test, by name (`stage` is then the image's name).
    Test(String),
}

/// Why a node failed, with everything a person needs to find the problem.
#[derive(Debug, Clone)]
pub struct NodeFailure {
    pub subject: Subject,
    /// The stage's name, or the image's when an image could not be written.
    pub stage: String,
    pub platform: String,
    /// Where in the build file: the failing step's statement; the stage when no step was
    /// running (its base could not be fetched); the image when its layout could not be
    /// written.
    pub at: Option<Loc>,
    /// The failing step's description, when a step failed.
    pub step: Option<String>,
    pub error: Arc<StepError>,
    /// The last lines of the step's output.
    pub tail: Vec<String>,
}

impl NodeFailure {
    /// The exit code of a command that ran and failed.
    pub fn exit_code(&self) -> Option<i32> {
        match *self.error {
            StepError::ExitCode { code } => Some(code),
            _ => None,
        }
    }

    /// The failure as a build-file diagnostic: `step failed: …` with the step underlined and
    /// the stage and platform as its label (the output tail is not part of it: see
    /// [`NodeFailure::tail`]).
    pub fn diagnostic(&self, sources: &Sources) -> Diagnostic {
        let cause = message(&*self.error);
        let (code, text, label) = if self.step.is_some() {
            let label = match self.exit_code() {
                Some(code) => format!(
                    "exit code {code}, stage `{}` for {}",
                    self.stage, self.platform
                ),
                None => format!("stage `{}` for {}", self.stage, self.platform),
            };
            (Code::StepFailed, format!("step failed: {cause}"), label)
        } else {
            let (text, label) = match &self.subject {
                Subject::Node => (
                    format!(
                        "stage `{}` failed for {}: {cause}",
                        self.stage, self.platform
                    ),
                    "this stage",
                ),
                Subject::Image => (
                    format!("image `{}` failed: {cause}", self.stage),
                    "this image",
                ),
                Subject::CacheMounts => (format!("cache mounts failed: {cause}"), "here"),
                Subject::Test(name) => (
                    format!(
                        "image `{}` for {}, test `{name}` failed: {cause}",
                        self.stage, self.platform
                    ),
                    "this test",
                ),
            };
            (Code::BuildFailed, text, label.to_string())
        };
        let mut diagnostic = Diagnostic::error(code, text);
        if let Some(at) = self.at {
            diagnostic = diagnostic.with_label(sources, at, label);
        }
        if let Some(help) = miette::Diagnostic::help(&*self.error) {
            diagnostic = diagnostic.with_help(help.to_string());
        }
        diagnostic
    }

    /// The failure as a `--progress json` event, its location as file, line and column.
    pub fn event(&self, sources: &Sources) -> FailureEvent {
        let position = self.at.map(|at| sources.position(at));
        FailureEvent {
            code: if self.step.is_some() {
                Code::StepFailed
            } else {
                Code::BuildFailed
            }
            .to_string(),
            stage: self.stage.clone(),
            platform: self.platform.clone(),
            step: self.step.clone(),
            message: message(&*self.error),
            help: miette::Diagnostic::help(&*self.error).map(|help| help.to_string()),
            exit_code: self.exit_code(),
            file: position.as_ref().map(|position| position.file.clone()),
            line: position.as_ref().map(|position| position.line),
            column: position.as_ref().map(|position| position.column),
            tail: self.tail.clone(),
        }
    }
}

impl std::fmt::Display for NodeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.subject {
            Subject::Test(name) => write!(
                f,
                "image `{}` for {}, test `{name}`",
                self.stage, self.platform
            )?,
            _ => write!(f, "stage `{}` for {}", self.stage, self.platform)?,
        }
        if let Some(step) = &self.step {
            write!(f, ", step `{step}`")?;
        }
        write!(f, ": {}", message(&*self.error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_carries_its_causes_once() {
        let error = StepError::SecretRead {
            id: "npmrc".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(
            message(&error),
            "cannot read secret `npmrc`: entity not found"
        );
        // A message that already quotes its cause does not repeat it.
        let error = StepError::Sandbox(SandboxError::Io {
            action: "read the child's report",
            source: std::io::Error::other("broken pipe"),
        });
        assert_eq!(
            message(&error),
            "could not read the child's report: broken pipe"
        );
        let error = StepError::ExitCode { code: 7 };
        assert_eq!(message(&error), "the command failed with exit code 7");
    }
}
