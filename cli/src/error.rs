//! How a command ends: one [`ExitStatus`] (the only place exit codes are defined, documented
//! in docs/cli.md), and one [`CliError`] carrying the diagnostic `main` prints once.
//!
//! Commands return `Result<ExitStatus, CliError>`: `Ok` when what they had to say is said
//! (a success, or an outcome such as `verify` finding a difference, which is output and not an
//! error), `Err` when they stop on a problem. As cargo's `CliError { error, exit_code }` and
//! uv's `ExitStatus`: the status is chosen where the problem is known, by its kind, never by
//! reading the text of a message.

use std::process::ExitCode;

use crate::render;

/// How graphbuild exits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ExitStatus {
    /// Everything asked for was done.
    Success,
    /// A step or an image failed, or `verify` found a difference.
    BuildFailed,
    /// The build file, a flag or an argument is wrong: nothing was attempted.
    InvalidInput,
    /// The machine or the network is not ready: root, qemu, a registry, the store.
    Environment,
    /// Stopped by Ctrl-C or SIGTERM (128 + SIGINT, as shells report it).
    Interrupted,
    /// Another process's status, passed on as it is (uv's `ExitStatus::External`): the
    /// namespaced graphbuild of a rootless run, or a remote step's command in `worker-step`.
    External(u8),
}

impl ExitStatus {
    pub(crate) fn code(self) -> u8 {
        match self {
            ExitStatus::Success => 0,
            ExitStatus::BuildFailed => 1,
            ExitStatus::InvalidInput => 2,
            ExitStatus::Environment => 3,
            ExitStatus::Interrupted => 130,
            ExitStatus::External(code) => code,
        }
    }

    /// A child's exit status as the kernel reports it to a parent: its low 8 bits.
    pub(crate) fn external(code: i32) -> ExitStatus {
        ExitStatus::External(code.to_le_bytes()[0])
    }
}

impl From<ExitStatus> for ExitCode {
    fn from(status: ExitStatus) -> ExitCode {
        ExitCode::from(status.code())
    }
}

/// What a command reports when it stops on a problem, and the status graphbuild exits with.
#[derive(Debug)]
pub(crate) struct CliError {
    pub(crate) diagnostic: Diagnostic,
    pub(crate) exit: ExitStatus,
}

/// The problem, as `main` renders it.
#[derive(Debug)]
pub(crate) enum Diagnostic {
    /// `error: message`, then `hint: …` lines: a problem with no place in a source file.
    Message { message: String, hints: Vec<String> },
    /// Diagnostics with their source spans (the build file's errors), rendered by miette in
    /// order.
    Reports(Vec<Box<dyn miette::Diagnostic + Send + Sync>>),
    /// Lines the engine already wrote as `error: …` / `hint: …` (its environment checks),
    /// printed as they are.
    Lines(String),
}

impl CliError {
    /// `error: message` exiting with `exit`; add hints with [`CliError::hint`].
    pub(crate) fn new(exit: ExitStatus, message: impl Into<String>) -> CliError {
        CliError {
            diagnostic: Diagnostic::Message {
                message: message.into(),
                hints: Vec::new(),
            },
            exit,
        }
    }

    /// The build file, a flag or an argument is wrong (exit 2).
    pub(crate) fn invalid_input(message: impl Into<String>) -> CliError {
        CliError::new(ExitStatus::InvalidInput, message)
    }

    /// The machine, the store or the network is not ready (exit 3).
    pub(crate) fn environment(message: impl Into<String>) -> CliError {
        CliError::new(ExitStatus::Environment, message)
    }

    /// A miette diagnostic (with its spans, help and code) exiting with `exit`.
    pub(crate) fn report(
        exit: ExitStatus,
        diagnostic: impl miette::Diagnostic + Send + Sync + 'static,
    ) -> CliError {
        CliError {
            diagnostic: Diagnostic::Reports(vec![Box::new(diagnostic)]),
            exit,
        }
    }

    /// Several miette diagnostics, each rendered on its own, exiting with `exit`.
    pub(crate) fn reports<D>(exit: ExitStatus, diagnostics: impl IntoIterator<Item = D>) -> CliError
    where
        D: miette::Diagnostic + Send + Sync + 'static,
    {
        CliError {
            diagnostic: Diagnostic::Reports(
                diagnostics
                    .into_iter()
                    .map(|diagnostic| {
                        Box::new(diagnostic) as Box<dyn miette::Diagnostic + Send + Sync>
                    })
                    .collect(),
            ),
            exit,
        }
    }

    /// Lines already formatted as `error: …` / `hint: …`, exiting with `exit`.
    pub(crate) fn lines(exit: ExitStatus, lines: impl Into<String>) -> CliError {
        CliError {
            diagnostic: Diagnostic::Lines(lines.into()),
            exit,
        }
    }

    /// Adds a `hint:` line (a message's only; a report carries its own help).
    pub(crate) fn hint(mut self, hint: impl Into<String>) -> CliError {
        if let Diagnostic::Message { hints, .. } = &mut self.diagnostic {
            hints.push(hint.into());
        }
        self
    }

    /// Print the diagnostic to stderr; the caller exits with `self.exit`.
    pub(crate) fn render(&self) {
        match &self.diagnostic {
            Diagnostic::Message { message, hints } => {
                let hints: Vec<&str> = hints.iter().map(String::as_str).collect();
                render::error(message, &hints);
            }
            Diagnostic::Reports(diagnostics) => {
                for diagnostic in diagnostics {
                    render::diagnostic(diagnostic.as_ref());
                }
            }
            Diagnostic::Lines(lines) => eprintln!("{}", lines.trim_end_matches('\n')),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_the_documented_ones() {
        let codes: Vec<u8> = [
            ExitStatus::Success,
            ExitStatus::BuildFailed,
            ExitStatus::InvalidInput,
            ExitStatus::Environment,
            ExitStatus::Interrupted,
        ]
        .into_iter()
        .map(ExitStatus::code)
        .collect();
        assert_eq!(codes, [0, 1, 2, 3, 130]);
    }

    #[test]
    fn external_statuses_keep_the_low_byte_as_exit_does() {
        assert_eq!(ExitStatus::external(7).code(), 7);
        assert_eq!(ExitStatus::external(256 + 5).code(), 5);
        assert_eq!(ExitStatus::external(-1).code(), 255);
    }

    #[test]
    fn hints_attach_to_messages_in_order() {
        let error = CliError::invalid_input("bad").hint("one").hint("two");
        assert_eq!(error.exit, ExitStatus::InvalidInput);
        match error.diagnostic {
            Diagnostic::Message { message, hints } => {
                assert_eq!(message, "bad");
                assert_eq!(hints, ["one", "two"]);
            }
            other => panic!("expected a message, got {other:?}"),
        }
    }
}
