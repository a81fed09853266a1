//! ssh agent forwarding for `run` steps (Docker's `RUN --mount=type=ssh`, buildx's `--ssh`).
//!
//! # Overview
//!
//! `--ssh ID[=PATH[,PATH…]]` binds an id to an agent: `SSH_AUTH_SOCK`'s when no path is given
//! (`--ssh default`), the socket when the one path is a socket, or else an `ssh-agent` started
//! for the build with the key files loaded ([`Agents`]; killed and its directory removed when
//! the build ends). graphbuild holds no key itself: OpenSSH's own agent does the cryptography,
//! so no signing code (and no crypto crate) is added for this.
//!
//! A step with an `ssh` mount gets, for its lifetime, a socket of its own served by a proxy
//! ([`proxy::AgentProxy`]) that forwards only the two requests a client needs to authenticate,
//! listing identities and signing, and refuses the rest (adding, removing, locking keys,
//! extensions), as BuildKit's forwarding does: a step can use the keys, never change the
//! user's agent or read a key out of it. The proxy's socket is bind-mounted on the step's
//! target (a file mount point outside every layer), so the sandbox gains that one socket and
//! no other path to the host.
//!
//! # What is recorded
//!
//! The step's key has the id and how the step sees the socket (target, owner, mode); never a
//! socket path, a key path or a key. Those appear in no log, event or error either: messages
//! name the id and, for key files, their position in the `--ssh` value.

mod agent;
pub(crate) mod proxy;

use std::collections::BTreeMap;

use graphbuild_lang::ir::Sources;
use graphbuild_lang::{Code, Diagnostic};

pub use agent::{Agents, SshSource, parse_spec};

use crate::plan::{Op, Plan};

/// One diagnostic per step whose required ssh id `supplied` does not know: reported before
/// the build starts, as a missing `--ssh`.
pub fn missing_required(
    plan: &Plan,
    sources: &Sources,
    supplied: &dyn Fn(&str) -> bool,
) -> Vec<Diagnostic> {
    let mut missing = BTreeMap::new();
    for node in &plan.nodes {
        for step in &node.steps {
            let Op::Run(run) = &step.op else {
                continue;
            };
            for mount in &run.ssh_mounts {
                if mount.required && !supplied(&mount.id) {
                    missing
                        .entry((step.at.file.0, step.at.span.offset(), mount.id.clone()))
                        .or_insert(step.at);
                }
            }
        }
    }
    missing
        .into_iter()
        .map(|((_, _, id), at)| {
            Diagnostic::error(
                Code::RunSsh,
                format!("the step needs the ssh agent `{id}`, which was not supplied"),
            )
            .with_label(sources, at, "this step")
            .with_help(if id == "default" {
                "pass --ssh default (the agent of SSH_AUTH_SOCK) or --ssh default=KEY_FILE".to_string()
            } else {
                format!("pass --ssh {id}=KEY_FILE[,KEY_FILE], --ssh {id}=AGENT_SOCKET or --ssh {id} (SSH_AUTH_SOCK's agent)")
            })
        })
        .collect()
}
