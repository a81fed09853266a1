//! `bind` mounts `from=` a stage or an image: the node's filesystem on a path while the step
//! runs, keyed by the node's key (a change to the stage runs the step again) and a dependency
//! of the step's node, as a `copy from=` is.

use graphbuild_lang::Code;
use graphbuild_lang::ir;
use graphbuild_lang::platform::Platform;
use graphbuild_lang::subst::Mode;

use super::{Expander, Pending, Vars};
use crate::plan::op::StageBindOp;
use crate::state::ImageSettings;

impl Expander<'_> {
    /// The step's binds from other nodes, each with the node it needs.
    pub(super) fn stage_binds(
        &mut self,
        run: &ir::Run,
        vars: &Vars,
        settings: &ImageSettings,
        target: &Platform,
        matrix: &[(String, String)],
    ) -> Result<Vec<(StageBindOp, usize)>, Pending> {
        let mut binds = Vec::new();
        for mount in &run.bind_mounts {
            let Some(from) = &mount.from else {
                continue;
            };
            let path = self.substitute(&mount.target, Mode::Strict, vars, Some(settings));
            let source = self.substitute(&mount.source, Mode::Strict, vars, Some(settings));
            if !path.starts_with('/') {
                self.error(
                    mount.at,
                    Code::RunBind,
                    format!("the bind mount's target `{path}` is not an absolute path"),
                    "this mount",
                    Some("write an absolute path, for example \"/out\"".into()),
                );
                continue;
            }
            let node = match from {
                ir::CopyFrom::Stage(name, _) => self.dependency(name, target, matrix)?,
                ir::CopyFrom::Image(text) => {
                    let reference = self.substitute(text, Mode::Strict, vars, Some(settings));
                    self.image_node(&reference, text.at, target)?
                }
            };
            let Some(node) = node else {
                continue;
            };
            // Relative sources are relative to the stage's root, as BuildKit's.
            let source = if source.starts_with('/') {
                source
            } else {
                format!("/{source}")
            };
            binds.push((
                StageBindOp {
                    target: path,
                    source,
                    node,
                    key: self.nodes[node].key,
                    readwrite: mount.readwrite,
                },
                node,
            ));
        }
        Ok(binds)
    }
}
