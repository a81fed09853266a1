//! Bind mounts from a stage or an image ([`StageBind`]): the supervisor mounts a view of the
//! node's layers on the scratch tmpfs (an overlay, read-only, or with an upper directory on
//! the tmpfs that goes away with the sandbox when writable), resolves the source inside it
//! (symlinks stay inside the view, as for mount targets), and PID 1 binds it on the target.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::mount::{MsFlags, mount};

use super::super::StageBind;
use super::super::fuse::FuseMount;
use super::super::overlay::Overlay;
use super::{Failure, resolve_in_root, step, userxattr};

/// Mounts a view of each bind's layers under `scratch` and records in each bind the path to
/// mount and whether it is a directory. The returned fuse-overlayfs mounts (when the root uses
/// it) must live until the step ends.
pub(super) fn mount_views(
    scratch: &Path,
    overlay: &Overlay,
    binds: &mut [StageBind],
) -> Result<Vec<FuseMount>, Failure> {
    let mut fuse_mounts = Vec::new();
    for (index, bind) in binds.iter_mut().enumerate() {
        let what = format!("the bind mount on {}", bind.target);
        let name = format!("b{index}");
        let view = scratch.join(&name);
        let links = scratch.join(format!("{name}l"));
        for dir in [&view, &links] {
            fs::create_dir(dir)
                .and_then(|()| fs::set_permissions(dir, fs::Permissions::from_mode(0o755)))
                .map_err(step(format!("prepare {what}")))?;
        }
        let mut lowers = Vec::new();
        for (layer, lowerdir) in bind.lowerdirs.iter().enumerate() {
            if !lowerdir.is_dir() {
                return Err(Failure::new(
                    format!("prepare {what}"),
                    format!("lower directory {} does not exist", lowerdir.display()),
                ));
            }
            std::os::unix::fs::symlink(lowerdir, links.join(layer.to_string()))
                .map_err(step(format!("prepare {what}")))?;
            lowers.push(format!("{name}l/{layer}"));
        }
        // A read-only overlay needs two layers at least; an empty stage is one empty layer.
        lowers.push("empty".into());
        let mut options = format!("lowerdir={}", lowers.join(":"));
        if bind.readwrite {
            for dir in ["u", "w"] {
                fs::create_dir(scratch.join(format!("{name}{dir}")))
                    .map_err(step(format!("prepare {what}")))?;
            }
            options.push_str(&format!(",upperdir={name}u,workdir={name}w"));
        }
        match overlay {
            Overlay::Fuse { program } => {
                fuse_mounts.push(
                    FuseMount::mount(
                        program,
                        &format!("{options},nodev"),
                        &view,
                        scratch,
                        scratch.join(format!("fuse-{name}.log")),
                    )
                    .map_err(step(format!("mount {what} (fuse-overlayfs)")))?,
                );
            }
            _ => {
                if bind.readwrite {
                    options.push_str(",index=off,metacopy=off");
                }
                options.push_str(userxattr());
                let flags = if bind.readwrite {
                    MsFlags::MS_NODEV | MsFlags::MS_NOSUID
                } else {
                    MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID
                };
                mount(
                    Some("overlay"),
                    &view,
                    Some("overlay"),
                    flags,
                    Some(options.as_str()),
                )
                .map_err(step(format!("mount {what} (overlayfs)")))?;
            }
        }
        let (existing, missing) =
            resolve_in_root(&view, &bind.source).map_err(step(format!("resolve {what}")))?;
        if !missing.is_empty() {
            return Err(Failure::new(
                format!("prepare {what}"),
                format!(
                    "{} does not exist in the filesystem it binds from",
                    bind.source
                ),
            ));
        }
        let path = view.join(existing);
        let metadata = fs::metadata(&path).map_err(step(format!("inspect {what}")))?;
        bind.resolved = Some((path, metadata.is_dir()));
    }
    Ok(fuse_mounts)
}

/// PID 1's part: the resolved source on `target` (a path under the step's root), read-only
/// unless the bind is writable; never devices or setuid.
pub(super) fn bind_view(bind: &StageBind, target: &Path) -> Result<(), Failure> {
    let what = format!("mount the bind mount on {}", bind.target);
    let Some((source, _)) = &bind.resolved else {
        return Err(Failure::new(what, "its source was not prepared"));
    };
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if !bind.readwrite {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(
        Some(source.as_path()),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .and_then(|()| mount(None::<&str>, target, None::<&str>, flags, None::<&str>))
    .map_err(step(what))
}

/// The mount points the binds need, after their views were prepared.
pub(super) fn targets(binds: &[StageBind]) -> impl Iterator<Item = (&str, bool)> {
    binds.iter().map(|bind| {
        (
            bind.target.as_str(),
            bind.resolved.as_ref().is_none_or(|(_, is_dir)| *is_dir),
        )
    })
}
