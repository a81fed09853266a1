//! `--ssh` for `run`, `build` and `verify`: the ids' agents, checked against the plan before
//! anything runs.

use std::collections::HashSet;

use graphbuild_engine::ssh::{self, Agents};

use crate::{CliError, ExitStatus};

use super::Loaded;

/// The agents `specs` name (started for key files), once every ssh id a step requires is
/// among them; otherwise each missing one as a diagnostic at its step, exit 2.
pub(super) fn agents(specs: &[String], loaded: &Loaded) -> Result<Agents, CliError> {
    let auth_sock = std::env::var_os("SSH_AUTH_SOCK").map(std::path::PathBuf::from);
    let mut sources = Vec::new();
    let mut ids = HashSet::new();
    for spec in specs {
        match ssh::parse_spec(spec, auth_sock.as_deref()) {
            Ok((id, source)) => {
                if !ids.insert(id.clone()) {
                    return Err(CliError::invalid_input(format!(
                        "--ssh {id} is given twice"
                    )));
                }
                sources.push((id, source));
            }
            Err(message) => return Err(CliError::invalid_input(message)),
        }
    }
    let missing = ssh::missing_required(&loaded.plan, &loaded.project.sources, &|id| {
        ids.contains(id)
    });
    if !missing.is_empty() {
        return Err(CliError::reports(ExitStatus::InvalidInput, missing));
    }
    Agents::start(sources).map_err(CliError::invalid_input)
}
