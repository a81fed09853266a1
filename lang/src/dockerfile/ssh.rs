//! `RUN --mount=type=ssh`: an ssh agent socket for the step, as BuildKit's.

use crate::Code;
use crate::ir::{self, Loc, SshMount};

use super::{Lowerer, lex};

/// The options of a `type=ssh` mount, and the help shown with a problem in one.
pub(super) const SSH_OPTIONS: &[&str] = &[
    "type",
    "id",
    "target",
    "dst",
    "destination",
    "required",
    "uid",
    "gid",
    "mode",
];
pub(super) const SSH_HELP: &str = "write --mount=type=ssh[,id=ID][,target=PATH][,required=true][,uid=N,gid=N,mode=0600] and pass --ssh ID";

impl Lowerer {
    /// One `--mount=type=ssh,…` (its options already checked against [`SSH_OPTIONS`]): the id
    /// is `default` unless named and, as in Docker, not required unless `required=true`.
    pub(super) fn ssh_mount(
        &mut self,
        fields: &[(String, String)],
        span: (usize, usize),
        at: Loc,
        run: &mut ir::Run,
    ) -> bool {
        let get = |names: &[&str]| {
            fields
                .iter()
                .find(|(key, _)| names.contains(&key.as_str()))
                .map(|(_, value)| value.clone())
        };
        let required = match get(&["required"]).as_deref() {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                self.error(
                    Code::RunSsh,
                    format!("`required={other}` is not true or false"),
                    span,
                    "this mount",
                    SSH_HELP,
                );
                return false;
            }
        };
        let id = get(&["id"])
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| "default".into());
        let text = |this: &Self, value: String| this.text(lex::literal_raw(&value), span);
        run.ssh_mounts.push(SshMount {
            id: text(self, id),
            target: get(&["target", "dst", "destination"]).map(|value| text(self, value)),
            required,
            uid: get(&["uid"]).map(|value| text(self, value)),
            gid: get(&["gid"]).map(|value| text(self, value)),
            mode: get(&["mode"]).map(|value| text(self, value)),
            at,
        });
        true
    }
}
