//! A step sent to the remote executor (`--remote-executor`) instead of the local sandbox:
//! which steps may go, and how their outcome becomes the same layer, record and events a local
//! execution gives (docs/remote.md).

use crate::events::Event;
use crate::execution::{RemoteRun, RemoteStep};
use crate::plan::{Node, Op, StepPlan};
use crate::sandbox::ExitStatusKind;
use crate::state::LayerDesc;

use super::{Executor, NodeFailure, StepError};

/// A remote step's result (the layer it made, if any) and where it ran.
type Ran = (Result<Option<LayerDesc>, Box<NodeFailure>>, String);

impl Executor<'_> {
    /// With a remote executor, the preflight lets through foreign platforms this machine
    /// cannot emulate; a `run` step of one that must execute here (no worker took it, or it
    /// may not leave the machine) fails here, before anything runs, naming the missing
    /// emulator as the preflight would.
    pub(super) fn can_run_here(
        &self,
        node: &Node,
        step: &StepPlan,
    ) -> Result<(), Box<NodeFailure>> {
        if self.options.remote.executor.is_none() || !matches!(step.op, Op::Run(_)) {
            return Ok(());
        }
        let dir = self
            .options
            .remote
            .binfmt_dir
            .clone()
            .unwrap_or_else(|| crate::binfmt::BINFMT_MISC_DIR.into());
        let host = graphbuild_lang::platform::Platform::host();
        match crate::binfmt::check_emulation(&dir, &node.platform, &host) {
            Ok(_) => Ok(()),
            Err(source) => Err(self.failure(
                node,
                Some(step),
                StepError::NoEmulator {
                    platform: node.platform.to_string(),
                    host: host.to_string(),
                    source: Box::new(source),
                },
                Vec::new(),
            )),
        }
    }

    /// Execute `step` on the remote executor when there is one and the step may leave the
    /// machine: a `run` without secrets, cache mounts, bind mounts, ssh agents or `insecure`
    /// (those read this machine's files or need its trust). `None`: execute it here (no executor, a step
    /// that stays, a platform without workers, or an executor that failed and is not
    /// required; the last two are warned about once).
    pub(super) fn execute_remotely(
        &self,
        node: &Node,
        step: &StepPlan,
        layers: &[LayerDesc],
    ) -> Option<Ran> {
        let executor = self.options.remote.executor.as_ref()?;
        let Op::Run(run) = &step.op else { return None };
        if !run.secrets.is_empty()
            || !run.cache_mounts.is_empty()
            || !run.bind_mounts.is_empty()
            || !run.stage_binds.is_empty()
            || !run.ssh_mounts.is_empty()
            || run.insecure
        {
            return None;
        }
        let platform = node.platform.to_string();
        if !executor.accepts(&platform) {
            return None;
        }
        let fail = |error: StepError, tail| {
            Some((
                Err(self.failure(node, Some(step), error, tail)),
                "remote".to_string(),
            ))
        };
        let mut guards = Vec::new();
        let task = match self.run_task(node, run, &mut guards) {
            Ok(task) => task,
            Err(error) => return fail(error, Vec::new()),
        };
        let remote = RemoteStep::new(&node.platform, task, layers, &self.options.layer);
        match executor.execute(&remote, self.store, self.options.no_cache) {
            Ok(RemoteRun::Ran {
                worker,
                status,
                tail,
                layer,
            }) => {
                let node_id = node.id;
                for line in &tail {
                    self.events.emit(Event::Output {
                        node: node_id,
                        line: line.clone(),
                    });
                }
                let error = match status {
                    ExitStatusKind::Exited(0) => None,
                    ExitStatusKind::Exited(code) => Some(StepError::ExitCode { code }),
                    ExitStatusKind::Signaled(signal) => Some(StepError::Signal { signal }),
                    ExitStatusKind::TimedOut { millis } => Some(StepError::TimedOut { millis }),
                    ExitStatusKind::ProcessLimit { max } => Some(StepError::ProcessLimit { max }),
                };
                if let Some(error) = error {
                    return Some((Err(self.failure(node, Some(step), error, tail)), worker));
                }
                if let Some(layer) = &layer
                    && let Ok(bytes) = serde_json::to_vec(layer)
                {
                    let _ = self
                        .store
                        .put_action(&self.layer_key(&layer.diff_id), &bytes);
                }
                Some((Ok(layer), worker))
            }
            Ok(RemoteRun::NoWorker) => {
                if executor.mark_without_workers(&platform) {
                    self.events.emit(Event::Warning {
                        message: format!(
                            "no worker of the remote executor {} took a {platform} step within \
                             {:.0}s ({}); {platform} steps run on this machine",
                            executor.url(),
                            executor.queue_timeout().as_secs_f64(),
                            crate::execution::QUEUE_TIMEOUT_ENV,
                        ),
                    });
                }
                None
            }
            Err(crate::remote::RemoteError::Cancelled) => fail(StepError::Cancelled, Vec::new()),
            Err(error) if executor.required() => fail(
                StepError::RemoteRequired {
                    source: Box::new(error),
                },
                Vec::new(),
            ),
            Err(error) => {
                if executor.mark_failed() {
                    self.events.emit(Event::Warning {
                        message: format!(
                            "the remote executor failed, steps run on this machine: {error}"
                        ),
                    });
                }
                None
            }
        }
    }
}
