//! `ssh` in a `run`: an ssh agent socket for the step (Docker's `RUN --mount=type=ssh`).

use kdl::KdlNode;

use crate::ir::{FileId, SshMount, Text};

use super::*;

impl Loader {
    /// `ssh`, `ssh "ID"`, with `target=`, `required=`, `uid=`, `gid=`, `mode=`. The id is
    /// `default` when not named; a step needs its id supplied (`--ssh ID`) unless
    /// `required=#false`, as `secret`.
    pub(super) fn lower_ssh(&mut self, child: &KdlNode, file: FileId) -> Option<SshMount> {
        let props = self.node_properties(child, file, spec::get(spec::RUN, "ssh"));
        let at = Self::loc(file, child.name().span());
        let target = props.text("target");
        let required = props.bool("required").unwrap_or(true);
        let uid = props.text("uid");
        let gid = props.text("gid");
        let mode = props.text("mode");
        let id = match positional(child).len() {
            0 => Text {
                raw: "default".into(),
                at,
            },
            _ => self.single_string_argument(
                child,
                file,
                at,
                (
                    Code::RunSsh,
                    "an ssh id",
                    "`ssh` takes at most one id",
                    "one id expected",
                ),
                "write `ssh` (the id `default`) or `ssh \"github\"` and pass `--ssh default` or `--ssh github=KEY_FILE`",
            )?,
        };
        Some(SshMount {
            id,
            target,
            required,
            uid,
            gid,
            mode,
            at,
        })
    }
}
