//! `--ssh` for `run`, `build` and `verify`: the ids' agents, checked against the plan before
//! anything runs.

use std::collections::HashSet;

use graphbuild_engine::ssh::{self, Agents};

use crate::ExitStatus;
use crate::render;

use super::Loaded;

/// The agents `specs` name (started for key files), once every ssh id a step requires is
/// among them; otherwise each missing one as a diagnostic at its step, exit 2.
pub(super) fn agents(specs: &[String], loaded: &Loaded) -> Result<Agents, ExitStatus> {
    let auth_sock = std::env::var_os("SSH_AUTH_SOCK").map(std::path::PathBuf::from);
    let mut sources = Vec::new();
    let mut ids = HashSet::new();
    for spec in specs {
        match ssh::parse_spec(spec, auth_sock.as_deref()) {
            Ok((id, source)) => {
                if !ids.insert(id.clone()) {
                    render::error(&format!("--ssh {id} is given twice"), &[]);
                    return Err(ExitStatus::InvalidInput);
                }
                sources.push((id, source));
            }
            Err(message) => {
                render::error(&message, &[]);
                return Err(ExitStatus::InvalidInput);
            }
        }
    }
    let missing = ssh::missing_required(&loaded.plan, &loaded.project.sources, &|id| {
        ids.contains(id)
    });
    if !missing.is_empty() {
        for diagnostic in &missing {
            render::diagnostic(diagnostic);
        }
        return Err(ExitStatus::InvalidInput);
    }
    Agents::start(sources).map_err(|message| {
        render::error(&message, &[]);
        ExitStatus::InvalidInput
    })
}
