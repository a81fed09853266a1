//! Boolean instruction flags (`--parents`, `--parents=false`).

use crate::Code;

use super::{Instruction, Lowerer, Word};

impl Lowerer {
    /// `--NAME` (true) or `--NAME=true|false`; `None` after reporting another value.
    pub(super) fn boolean_flag(
        &mut self,
        instruction: &Instruction,
        name: &str,
        value: Option<&str>,
        word: &Word,
    ) -> Option<bool> {
        match value {
            None | Some("true") => Some(true),
            Some("false") => Some(false),
            Some(other) => {
                self.error(
                    Code::DockerfileFlag,
                    format!("`--{name}={other}` is not true or false"),
                    instruction.line.span(word.start, word.end),
                    "this flag",
                    format!("write --{name} or --{name}=false"),
                );
                None
            }
        }
    }
}
