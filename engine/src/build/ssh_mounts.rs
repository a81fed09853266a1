//! A `run` step's ssh agent sockets: one proxy per mount, alive while the step runs.

use std::path::PathBuf;

use super::{Executor, StepError};
use crate::plan::op::RunOp;
use crate::ssh::proxy::AgentProxy;

impl Executor<'_> {
    /// (proxy socket, target) for each of the step's ssh mounts whose id was supplied; the
    /// proxies stay in `guards` until the step ends. A required id was checked before the
    /// build started; one missing here (an embedder that did not check) fails the step.
    pub(super) fn ssh_sockets(
        &self,
        run: &RunOp,
        guards: &mut Vec<Box<dyn std::any::Any>>,
    ) -> Result<Vec<(PathBuf, String)>, StepError> {
        let mut sockets = Vec::new();
        for mount in &run.ssh_mounts {
            let Some(upstream) = self.options.ssh.get(&mount.id) else {
                if mount.required {
                    return Err(StepError::SshMissing {
                        id: mount.id.clone(),
                    });
                }
                continue;
            };
            let proxy = AgentProxy::start(upstream, mount.uid, mount.gid, mount.mode).map_err(
                |source| StepError::SshForward {
                    id: mount.id.clone(),
                    source,
                },
            )?;
            sockets.push((proxy.socket().to_path_buf(), mount.target.clone()));
            guards.push(Box::new(proxy));
        }
        Ok(sockets)
    }
}
