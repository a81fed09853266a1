//! `ssh` mounts of a `run`: the agent socket's id and how the step sees it, in the step's key.
//! What the id is bound to (`--ssh default`, a key file, a socket) is supplied at build time
//! and is never part of the plan.

use std::collections::BTreeMap;

use graphbuild_lang::Code;
use graphbuild_lang::ir::{self, Text};
use graphbuild_lang::subst::Mode;

use super::{Expander, Vars};
use crate::plan::op::SshMountOp;
use crate::state::ImageSettings;

/// BuildKit's default target of a step's `n`-th ssh mount.
fn default_target(n: usize) -> String {
    format!("/run/buildkit/ssh_agent.{n}")
}

impl Expander<'_> {
    /// The step's ssh mounts; the first one's socket is `SSH_AUTH_SOCK` unless the step's
    /// environment sets it, as BuildKit does.
    pub(super) fn ssh_mounts(
        &mut self,
        run: &ir::Run,
        vars: &Vars,
        settings: &ImageSettings,
        env: &mut BTreeMap<String, String>,
    ) -> Vec<SshMountOp> {
        let mut mounts = Vec::new();
        for (n, mount) in run.ssh_mounts.iter().enumerate() {
            let id = self.substitute(&mount.id, Mode::Strict, vars, Some(settings));
            if id.is_empty() || id.contains(['=', ',']) {
                self.error(
                    mount.id.at,
                    Code::RunSsh,
                    format!("`{id}` is not an ssh id"),
                    "this id",
                    Some("an ssh id is a name such as \"default\" or \"github\"".into()),
                );
            }
            let target = match &mount.target {
                Some(target) => self.substitute(target, Mode::Strict, vars, Some(settings)),
                None => default_target(n),
            };
            if !target.starts_with('/') {
                self.error(
                    mount.at,
                    Code::RunSsh,
                    format!("the ssh socket's target `{target}` is not an absolute path"),
                    "this mount",
                    Some("write an absolute path, for example target=\"/run/ssh.sock\"".into()),
                );
            }
            let uid = self.ssh_number(&mount.uid, "uid", 10).unwrap_or(0);
            let gid = self.ssh_number(&mount.gid, "gid", 10).unwrap_or(0);
            let mode = self.ssh_number(&mount.mode, "mode", 8).unwrap_or(0o600);
            mounts.push(SshMountOp {
                id,
                target,
                required: mount.required,
                uid,
                gid,
                mode,
            });
        }
        if let Some(first) = mounts.first() {
            env.entry("SSH_AUTH_SOCK".into())
                .or_insert_with(|| first.target.clone());
        }
        mounts
    }

    fn ssh_number(&mut self, text: &Option<Text>, what: &str, radix: u32) -> Option<u32> {
        let text = text.as_ref()?;
        let value = text.raw.as_str();
        match u32::from_str_radix(value.trim_start_matches("0o"), radix) {
            Ok(number) if radix != 8 || number <= 0o7777 => Some(number),
            _ => {
                self.error(
                    text.at,
                    Code::RunSsh,
                    format!("`{value}` is not an ssh socket {what}"),
                    "this value",
                    Some(if radix == 8 {
                        "write the mode in octal, for example mode=\"0600\"".into()
                    } else {
                        format!("write a numeric {what}, for example {what}=1000")
                    }),
                );
                None
            }
        }
    }
}
