//! A `run` step's binds from other nodes: their layers' snapshots, for the sandbox to mount.

use super::{DepOutputs, Executor, StepError};
use crate::plan::op::RunOp;
use crate::sandbox::StageBind;

impl Executor<'_> {
    /// One [`StageBind`] per bind from a node, with that node's snapshots (unpacked and
    /// verified as for any step's layers).
    pub(super) fn stage_binds(
        &self,
        run: &RunOp,
        inputs: &DepOutputs<'_>,
    ) -> Result<Vec<StageBind>, StepError> {
        let mut binds = Vec::new();
        for bind in &run.stage_binds {
            let output = inputs.output_of(bind.node)?;
            let lowerdirs = self.snapshots(&output.layers)?;
            binds.push(StageBind {
                lowerdirs,
                source: bind.source.clone(),
                target: bind.target.clone(),
                readwrite: bind.readwrite,
                resolved: None,
            });
        }
        Ok(binds)
    }
}
