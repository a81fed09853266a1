//! The files an `add` copies, laid out on the host before the copy: a downloaded file, a git
//! checkout, or context files with their archives extracted. The copy itself is then an
//! ordinary copy from that scratch directory (straight into the layer, or in the sandbox), so
//! `chown`, `chmod`, destinations and layers behave exactly as for `copy`.
//!
//! - **URL**: the file is taken from the store by its digest, downloaded (and verified) only
//!   when the store lacks it, so a warm step with a checksum makes no request. It is `0600`
//!   unless `chmod` says otherwise, as Docker makes it; its time is the build's, like every
//!   copied file's (Docker uses `Last-Modified`, which is not in the key: two downloads of the
//!   same bytes would give two layers for one key).
//! - **git**: [`crate::git_source::checkout`] of the planned commit.
//! - **archives**: each archive is extracted by [`crate::unpack::unpack_layer_checked`], the
//!   reader base layers go through: no entry can write outside the scratch directory (`..`,
//!   absolute paths, writing through a symlink an earlier entry planted, hard links out are
//!   refused), the size is bounded, and the compression (gzip, zstd, bzip2, xz) is recognized
//!   by content.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::context::{CopyItem, ItemKind, select_in_tree};
use crate::digest::Digest;
use crate::plan::{CopyOp, CopySource};

use super::Executor;

/// A scratch directory holding what an `add` copies, and the items to copy from it.
pub(super) struct AddTree {
    pub(super) root: PathBuf,
    pub(super) items: Vec<CopyItem>,
    _dir: tempfile::TempDir,
}

impl Executor<'_> {
    /// The tree of an `add` of a URL, a git repository or archives; `None` for other copies.
    pub(super) fn add_tree(&self, copy: &CopyOp) -> Result<Option<AddTree>, String> {
        let make_dir = || -> Result<(tempfile::TempDir, PathBuf), String> {
            let dir = self
                .store
                .temp_dir()
                .map_err(|error| format!("cannot create a temporary directory: {error}"))?;
            let root = dir.path().join("add");
            std::fs::create_dir(&root)
                .and_then(|()| {
                    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))
                })
                .map_err(|error| format!("cannot create {}: {error}", root.display()))?;
            Ok((dir, root))
        };
        let select = |root: &Path, source: &str| {
            select_in_tree(root, &[source.to_string()]).map_err(|error| error.to_string())
        };
        match &copy.from {
            CopySource::Url {
                url, digest, name, ..
            } => {
                let digest: Digest = digest
                    .parse()
                    .map_err(|_| "the download's digest is unknown (a pending step)".to_string())?;
                // Platforms adding the same file wait for one download.
                let downloading = self
                    .in_flight
                    .lock()
                    .map(|mut in_flight| {
                        let key = crate::key::KeyBuilder::new("add-download")
                            .bytes(&digest.0)
                            .finish();
                        in_flight.entry(key).or_default().clone()
                    })
                    .unwrap_or_default();
                let _downloading = downloading.lock();
                if !self.store.has_blob(&digest) {
                    crate::fetch::download(url, Some(digest), self.store)
                        .map_err(|error| error.to_string())?;
                }
                let (dir, root) = make_dir()?;
                let path = root.join(name);
                std::fs::copy(self.store.blob_path(&digest), &path)
                    .and_then(|_| {
                        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    })
                    .map_err(|error| format!("cannot lay out the download: {error}"))?;
                // The store's copy is checked against its digest before it is used.
                let mut hasher = crate::digest::DigestWriter::new();
                std::io::copy(
                    &mut std::fs::File::open(&path)
                        .map_err(|error| format!("cannot read the download: {error}"))?,
                    &mut hasher,
                )
                .map_err(|error| format!("cannot read the download: {error}"))?;
                let actual = hasher.finish();
                if actual != digest {
                    let _ = self.store.remove_blob(&digest);
                    return Err(format!(
                        "the stored download {digest} is corrupt (it hashes to {actual}) and was removed; run the build again"
                    ));
                }
                let items = select(&root, name)?;
                Ok(Some(AddTree {
                    root,
                    items,
                    _dir: dir,
                }))
            }
            CopySource::Git {
                url,
                commit,
                subdir,
                keep_git_dir,
                ..
            } => {
                let (dir, root) = make_dir()?;
                let (repository, reference, _) = crate::git_source::split_fragment(url);
                crate::git_source::checkout(repository, reference, commit, &root, *keep_git_dir)?;
                let source = if subdir.is_empty() { "." } else { subdir };
                let items = select(&root, source)?;
                Ok(Some(AddTree {
                    root,
                    items,
                    _dir: dir,
                }))
            }
            CopySource::Extract {
                items, archives, ..
            } => {
                let (dir, root) = make_dir()?;
                for item in items {
                    self.lay_out_added(item, archives, &root)?;
                }
                let items = select(&root, ".")?;
                Ok(Some(AddTree {
                    root,
                    items,
                    _dir: dir,
                }))
            }
            CopySource::Context { .. } | CopySource::Node { .. } => Ok(None),
        }
    }

    /// One context item of an `add` with archives: an archive extracted into `root`, anything
    /// else placed at its destination under `root`.
    fn lay_out_added(
        &self,
        item: &CopyItem,
        archives: &[String],
        root: &Path,
    ) -> Result<(), String> {
        let context = &self.plan.context_dir;
        let source = || {
            crate::fsutil::resolve_path_in_root(context, &item.rel_src, false)
                .map_err(|error| format!("cannot resolve {}: {error}", item.rel_src.display()))
        };
        let rel_src = item.rel_src.to_string_lossy();
        if archives.iter().any(|archive| *archive == rel_src) {
            let path = source()?;
            let file = std::fs::File::open(&path)
                .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
            let size = file.metadata().map(|metadata| metadata.len()).unwrap_or(0);
            let check = crate::unpack::LayerCheck {
                digest: None,
                diff_id: None,
                max_bytes: crate::unpack::max_layer_size(size),
            };
            let stream = crate::decompress::archive(file)
                .map_err(|error| format!("cannot read {rel_src}: {error}"))?;
            crate::unpack::unpack_layer_checked(stream, root, &check)
                .map_err(|error| format!("cannot extract {rel_src}: {error}"))?;
            return Ok(());
        }
        let target = root.join(&item.rel_dest);
        let io = |what: &str, error: std::io::Error| format!("cannot {what} {rel_src}: {error}");
        match &item.kind {
            ItemKind::Dir { mode } => {
                std::fs::create_dir_all(&target).map_err(|error| io("create", error))?;
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(*mode))
                    .map_err(|error| io("set the mode of", error))?;
            }
            ItemKind::File { mode, .. } => {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(|error| io("create", error))?;
                }
                let mut from = std::fs::File::open(source()?).map_err(|e| io("read", e))?;
                let mut to = std::fs::File::create(&target).map_err(|e| io("write", e))?;
                std::io::copy(&mut from, &mut to).map_err(|error| io("copy", error))?;
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(*mode))
                    .map_err(|error| io("set the mode of", error))?;
            }
            ItemKind::Symlink { target: link } => {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(|error| io("create", error))?;
                }
                std::os::unix::fs::symlink(link, &target).map_err(|error| io("link", error))?;
            }
        }
        Ok(())
    }
}
