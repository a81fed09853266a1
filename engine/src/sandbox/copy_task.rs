//! [`Task::Copy`](super::Task::Copy): a `copy` the engine cannot write straight into its layer
//! (the base could change the result: `chown` by name, a destination under a symlink…) runs in
//! the sandbox child on the merged root, so the overlay's upper directory records exactly its
//! changes, as for a `run`. The task crosses to the child as JSON inside the
//! [`SandboxSpec`](super::SandboxSpec).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::context::CopyItem;
use crate::copy::{self, CopyError};

/// A `copy` to perform in the sandbox.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct CopyTask {
    /// Where sources are read from: the context directory, or an overlay of a stage's layers.
    pub source: CopyTaskSource,
    /// Patterns, resolved in the child for stage sources.
    pub sources: Vec<String>,
    /// Pre-selected context items.
    pub items: Vec<CopyItem>,
    pub dest: String,
    pub workdir: String,
    pub chown: Option<String>,
    pub chmod: Option<crate::chmod::Chmod>,
    /// `exclude` patterns, applied to what a stage source selects (context items come
    /// already without what they match).
    #[serde(default)]
    pub exclude: Vec<String>,
    /// `--parents`, for stage sources (context items come already relocated).
    #[serde(default)]
    pub parents: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub enum CopyTaskSource {
    Context(PathBuf),
    /// Snapshot directories, top-most first.
    Layers(Vec<PathBuf>),
}

/// Why a copy task failed in the child (reported to the engine as its message).
#[derive(Debug, thiserror::Error)]
pub(crate) enum CopyTaskError {
    #[error(transparent)]
    Copy(#[from] CopyError),

    #[error(transparent)]
    Exclude(#[from] crate::context::ExcludeError),

    #[error("the sandbox root has no parent")]
    NoParent,

    #[error("cannot create {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("cannot {action} the copy source: {source}")]
    Mount {
        action: &'static str,
        source: nix::Error,
    },
}

impl CopyTaskError {
    /// What to do about it, when the copy's own error says.
    pub(crate) fn help(&self) -> Option<String> {
        match self {
            CopyTaskError::Copy(error) => {
                miette::Diagnostic::help(error).map(|help| help.to_string())
            }
            _ => None,
        }
    }
}

/// Runs inside the sandbox child, in its private mount namespace, with the step's root mounted
/// at `root`.
pub(crate) fn copy_in_sandbox(root: &Path, task: &CopyTask) -> Result<(), CopyTaskError> {
    let chown = match &task.chown {
        Some(spec) => Some(copy::parse_chown(spec, root)?),
        None => None,
    };
    let copy_options = copy::CopyOptions {
        chown,
        chmod: task.chmod.clone(),
    };
    let perform = |items: &[CopyItem], source_root: &Path| {
        copy::perform_copy(
            items,
            source_root,
            root,
            &task.dest,
            &task.workdir,
            &copy_options,
        )
    };
    match &task.source {
        CopyTaskSource::Context(dir) => perform(&task.items, dir)?,
        CopyTaskSource::Layers(lowerdirs) => {
            let source_root = mount_readonly_layers(root, lowerdirs)?;
            let items = if task.parents {
                crate::copy_parents::select_in_tree_with_parents(&source_root, &task.sources)?
            } else {
                crate::context::select_in_tree(&source_root, &task.sources)?
            };
            let items = crate::context::exclude_patterns(items, &task.exclude)?;
            perform(&items, &source_root)?
        }
    }
    Ok(())
}

/// Mount a read-only view of some layers next to the step's root (inside the child's private
/// mount namespace, so it disappears with the child).
fn mount_readonly_layers(root: &Path, lowerdirs: &[PathBuf]) -> Result<PathBuf, CopyTaskError> {
    use nix::mount::{MsFlags, mount};
    let parent = root.parent().ok_or(CopyTaskError::NoParent)?;
    let target = parent.join("copy-source");
    std::fs::create_dir_all(&target).map_err(|source| CopyTaskError::CreateDir {
        path: target.clone(),
        source,
    })?;
    if lowerdirs.is_empty() {
        return Ok(target);
    }
    if lowerdirs.len() == 1 {
        mount(
            Some(&lowerdirs[0]),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|source| CopyTaskError::Mount {
            action: "bind-mount",
            source,
        })?;
        return Ok(target);
    }
    let lower = lowerdirs
        .iter()
        .map(|dir| dir.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    mount(
        Some("overlay"),
        &target,
        Some("overlay"),
        MsFlags::MS_RDONLY,
        Some(format!("lowerdir={lower}").as_str()),
    )
    .map_err(|source| CopyTaskError::Mount {
        action: "mount",
        source,
    })?;
    Ok(target)
}
