//! `ssh` in a `run`: an ssh agent socket for the step (Docker's `RUN --mount=type=ssh`).

use kdl::KdlNode;

use crate::ir::{FileId, SshMount, Text};

use super::*;

const SSH_PROPERTIES: &[&str] = &["target", "required", "uid", "gid", "mode"];

impl Loader {
    /// `ssh`, `ssh "ID"`, with `target=`, `required=`, `uid=`, `gid=`, `mode=`. The id is
    /// `default` when not named; a step needs its id supplied (`--ssh ID`) unless
    /// `required=#false`, as `secret`.
    pub(super) fn lower_ssh(&mut self, child: &KdlNode, file: FileId) -> Option<SshMount> {
        self.check_no_children(child, file, "ssh");
        let at = Self::loc(file, child.name().span());
        let (mut target, mut uid, mut gid, mut mode) = (None, None, None, None);
        let mut required = true;
        for (key, entry) in properties(child) {
            match key {
                "target" => target = self.string(entry, file, "`target`"),
                "required" => required = self.boolean(entry, file, "`required`").unwrap_or(true),
                "uid" => uid = self.string_or_integer(entry, file, "`uid`"),
                "gid" => gid = self.string_or_integer(entry, file, "`gid`"),
                "mode" => mode = self.string(entry, file, "`mode`"),
                other => self.unknown_property(other, entry, file, "ssh", SSH_PROPERTIES),
            }
        }
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
