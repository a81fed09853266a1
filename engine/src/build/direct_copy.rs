//! A `copy` written straight into its layer: no sandbox, no overlay, no upper directory.
//!
//! Long because it must reproduce, byte for byte, the layer the sandbox path writes (parents
//! copied up from the base, whiteouts, opaque directories, ownership) without running it; the
//! planning and the writing of those entries are one contract.
//!
//! # What it computes
//!
//! The entries the sandbox path's overlay upper directory would hold after the copy, from the
//! copy's sources and a read-only look at the base's snapshots (an overlay lookup done by
//! hand: whiteouts, opaque directories, top-most layer first), then the layer tar of exactly
//! those entries ([`layer::write_layer_from_entries`]). The bytes are those of the sandbox
//! path, entry for entry:
//!
//! - what the copy creates: as [`crate::copy::perform_copy`] creates it (modes, owners,
//!   `0755 root:root` for missing parents), its time the build's clamped "now";
//! - each ancestor the base already has: *copied up*, as overlayfs does, with the base's mode,
//!   owner and extended attributes (overlay's own excluded) and its time clamped; a directory
//!   in which the copy created or replaced an entry was modified, so its time is "now" clamped.
//!
//! # When it is not used
//!
//! Whenever the result could depend on the base in a way this does not reproduce, the step
//! takes the sandbox path instead: a symlink or a non-directory anywhere on a destination
//! path (except a file or symlink that a file or symlink replaces), a directory where a file
//! goes or the other way round, `..` in the destination, and `chown` with a user or group name
//! (looked up in the base's `/etc/passwd`).
//!
//! A copy from another stage reads that stage's filesystem the same way, merging its
//! snapshots by hand (no read-only overlay mount): the selection is
//! [`crate::context::select_in_tree`]'s, and globs or copying a stage's root take the sandbox
//! path.
//!
//! # Once for every platform
//!
//! The layer's content is a function of the copy's op (its sources' digest) and of the base
//! metadata it consulted, not of the step's key: the entries are hashed into a *copy-layer
//! key* (the op's canonical encoding, every entry's path, kind, mode, owner, time, attributes
//! and content digest), and a layer recorded under it is reused. The three platforms of
//! `copy . /src/` onto bases whose parents agree write and compress one tar; the others find
//! it. The step's own key and action record are unchanged.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::fs::Metadata;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use crate::context::{CopyItem, ItemKind};
use crate::digest::Key;
use crate::key::KeyBuilder;
use crate::layer::{self, PlannedEntry, PlannedKind};
use crate::plan::{CopyOp, CopySource, Node, StepPlan};
use crate::state::LayerDesc;

use super::faults::CopyFault;
use super::{DepOutputs, Executor, NodeFailure, snapshot_delta};

/// A read-only overlay lookup over snapshot directories, top-most first.
pub(crate) struct MergedView {
    layers: Vec<PathBuf>,
}

impl MergedView {
    pub(crate) fn new(layers: Vec<PathBuf>) -> Self {
        Self { layers }
    }

    /// The visible entry at `components` (relative to the root, not following symlinks): its
    /// path in the top-most layer that has it, and that entry's metadata.
    pub(crate) fn lookup(
        &self,
        components: &[OsString],
    ) -> io::Result<Option<(PathBuf, Metadata)>> {
        if components.is_empty() {
            return Ok(None);
        }
        for layer in &self.layers {
            let mut path = layer.clone();
            let mut opaque = false;
            for (index, component) in components.iter().enumerate() {
                path.push(component);
                let metadata = match std::fs::symlink_metadata(&path) {
                    Ok(metadata) => metadata,
                    Err(error)
                        if error.kind() == io::ErrorKind::NotFound
                            || error.raw_os_error() == Some(libc::ENOTDIR) =>
                    {
                        break;
                    }
                    Err(error) => return Err(error),
                };
                if metadata.file_type().is_char_device() && metadata.rdev() == 0 {
                    return Ok(None);
                }
                if index + 1 == components.len() {
                    return Ok(Some((path, metadata)));
                }
                if !metadata.is_dir() {
                    return Ok(None);
                }
                opaque |= is_opaque(&path)?;
            }
            if opaque {
                return Ok(None);
            }
        }
        Ok(None)
    }
}

impl MergedView {
    /// [`crate::fsutil::resolve_path_in_root`] in the merged tree: the components `path` leads
    /// to, through the tree's symlinks, never above its root.
    pub(crate) fn resolve(&self, path: &Path, follow_last: bool) -> io::Result<Vec<OsString>> {
        let mut pending: Vec<OsString> = Vec::new();
        push_components(&mut pending, path);
        let mut resolved: Vec<OsString> = Vec::new();
        let mut links = 0usize;
        let mut missing = false;
        while let Some(component) = pending.pop() {
            if component == ".." {
                resolved.pop();
                continue;
            }
            if missing {
                resolved.push(component);
                continue;
            }
            resolved.push(component);
            let is_last = pending.is_empty();
            match self.lookup(&resolved)? {
                Some((host, metadata))
                    if metadata.file_type().is_symlink() && (!is_last || follow_last) =>
                {
                    links += 1;
                    if links > crate::fsutil::MAX_SYMLINKS {
                        return Err(io::Error::other("too many levels of symbolic links"));
                    }
                    resolved.pop();
                    let target = std::fs::read_link(&host)?;
                    if target.is_absolute() {
                        resolved.clear();
                    }
                    push_components(&mut pending, &target);
                }
                Some(_) => {}
                None => missing = true,
            }
        }
        Ok(resolved)
    }

    /// The layers' copies of the directory at `components` that make up its merged listing,
    /// top-most first.
    fn dir_layers(&self, components: &[OsString]) -> io::Result<Vec<PathBuf>> {
        let mut dirs = Vec::new();
        'layers: for layer in &self.layers {
            let mut path = layer.clone();
            let mut opaque = false;
            for component in components {
                path.push(component);
                let metadata = match std::fs::symlink_metadata(&path) {
                    Ok(metadata) => metadata,
                    Err(error)
                        if error.kind() == io::ErrorKind::NotFound
                            || error.raw_os_error() == Some(libc::ENOTDIR) =>
                    {
                        if opaque {
                            break 'layers;
                        }
                        continue 'layers;
                    }
                    Err(error) => return Err(error),
                };
                if !metadata.is_dir() {
                    break 'layers;
                }
                opaque |= is_opaque(&path)?;
            }
            dirs.push(path);
            if opaque {
                break;
            }
        }
        Ok(dirs)
    }

    /// Visit every entry under a merged directory (given as its layers' copies, top-most
    /// first), not following symlinks, parents before children: `rest` is the path relative
    /// to that directory, `host` the top-most layer's copy.
    fn walk(
        &self,
        dirs: &[PathBuf],
        rest: &Path,
        visit: &mut dyn FnMut(&Path, &Path, &Metadata) -> Result<(), CopyFault>,
    ) -> Result<(), CopyFault> {
        type Found = Option<(PathBuf, Metadata)>;
        let mut children: BTreeMap<OsString, Found> = BTreeMap::new();
        let mut lower: BTreeMap<OsString, Vec<PathBuf>> = BTreeMap::new();
        let mut closed: BTreeSet<OsString> = BTreeSet::new();
        for dir in dirs {
            let read = std::fs::read_dir(dir).map_err(CopyFault::io("read", dir))?;
            for entry in read {
                let entry = entry.map_err(CopyFault::io("read", dir))?;
                let name = entry.file_name();
                if closed.contains(&name) {
                    continue;
                }
                let host = entry.path();
                let metadata =
                    std::fs::symlink_metadata(&host).map_err(CopyFault::io("inspect", &host))?;
                let whiteout = metadata.file_type().is_char_device() && metadata.rdev() == 0;
                let seen = children.contains_key(&name);
                if whiteout || !metadata.is_dir() {
                    // A whiteout or a non-directory hides everything below it.
                    closed.insert(name.clone());
                    if !seen {
                        children.insert(name, (!whiteout).then_some((host, metadata)));
                    }
                    continue;
                }
                let opaque = is_opaque(&host).map_err(CopyFault::io("inspect", &host))?;
                lower.entry(name.clone()).or_default().push(host.clone());
                if opaque {
                    closed.insert(name.clone());
                }
                if !seen {
                    children.insert(name, Some((host, metadata)));
                }
            }
        }
        for (name, found) in children {
            let Some((host, metadata)) = found else {
                continue;
            };
            let path = rest.join(&name);
            visit(&path, &host, &metadata)?;
            if metadata.is_dir() {
                let dirs = lower.remove(&name).unwrap_or_default();
                self.walk(&dirs, &path, visit)?;
            }
        }
        Ok(())
    }
}

fn push_components(pending: &mut Vec<OsString>, path: &Path) {
    let mut components: Vec<OsString> = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(name) => components.push(name.to_os_string()),
            Component::ParentDir => components.push(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    pending.extend(components.into_iter().rev());
}

/// What `select_in_tree` makes of an entry of a stage's filesystem.
fn tree_kind(host: &Path, metadata: &Metadata) -> Result<Option<ItemKind>, CopyFault> {
    let mode = metadata.mode() & 0o7777;
    let file_type = metadata.file_type();
    Ok(if file_type.is_dir() {
        Some(ItemKind::Dir { mode })
    } else if file_type.is_symlink() {
        let target = std::fs::read_link(host).map_err(CopyFault::io("read the symlink", host))?;
        Some(ItemKind::Symlink { target })
    } else if file_type.is_file() {
        Some(ItemKind::File {
            digest: [0; 32],
            size: metadata.len(),
            mode,
        })
    } else {
        None
    })
}

/// The items and the layer file holding each file's content.
pub(crate) type ViewSelection = (Vec<CopyItem>, HashMap<PathBuf, PathBuf>);

/// [`crate::context::select_in_tree`] over a merged stage filesystem: the items and, for
/// each file, the layer file holding its content. `None` when the sandbox path must select
/// (globs, the root itself, anything that is an error there).
pub(crate) fn select_in_view(
    view: &MergedView,
    sources: &[String],
) -> Result<Option<ViewSelection>, CopyFault> {
    let mut items = Vec::new();
    let mut hosts = HashMap::new();
    for source in sources {
        let Ok(cleaned) = crate::context::clean_source(source, false) else {
            return Ok(None);
        };
        if crate::context::has_glob(&cleaned) {
            return Ok(None);
        }
        let name = cleaned.rsplit('/').next().unwrap_or("").to_string();
        let io = |source: io::Error| CopyFault::Source { source };
        let mut components = view.resolve(Path::new(&cleaned), true).map_err(io)?;
        let mut found = view.lookup(&components).map_err(io)?;
        if found.is_none() {
            components = view.resolve(Path::new(&cleaned), false).map_err(io)?;
            found = view.lookup(&components).map_err(io)?;
        }
        let Some((host, metadata)) = found else {
            return Ok(None);
        };
        let rel_src: PathBuf = components.iter().collect();
        if metadata.is_dir() {
            items.push(CopyItem {
                rel_src: rel_src.clone(),
                rel_dest: PathBuf::new(),
                kind: ItemKind::Dir {
                    mode: metadata.mode() & 0o7777,
                },
            });
            let dirs = view.dir_layers(&components).map_err(io)?;
            view.walk(&dirs, Path::new(""), &mut |rest, host, metadata| {
                if let Some(kind) = tree_kind(host, metadata)? {
                    if matches!(kind, ItemKind::File { .. }) {
                        hosts.insert(rel_src.join(rest), host.to_path_buf());
                    }
                    items.push(CopyItem {
                        rel_src: rel_src.join(rest),
                        rel_dest: rest.to_path_buf(),
                        kind,
                    });
                }
                Ok(())
            })?;
        } else if let Some(kind) = tree_kind(&host, &metadata)? {
            if matches!(kind, ItemKind::File { .. }) {
                hosts.insert(rel_src.clone(), host.clone());
            }
            items.push(CopyItem {
                rel_src,
                rel_dest: PathBuf::from(name),
                kind,
            });
        }
    }
    Ok(Some((items, hosts)))
}

fn is_opaque(dir: &Path) -> io::Result<bool> {
    Ok(layer::list_xattrs(dir)?.iter().any(|(name, value)| {
        (name == b"trusted.overlay.opaque" || name == b"user.overlay.opaque") && value == b"y"
    }))
}

/// What is at a path once the entries planned so far are laid over the base.
enum State {
    Missing,
    Root,
    PlannedDir,
    PlannedOther,
    BaseDir(PathBuf, Metadata),
    BaseFile,
    BaseSymlink,
    BaseOther,
}

impl State {
    fn is_dir(&self) -> bool {
        matches!(self, State::Root | State::PlannedDir | State::BaseDir(..))
    }
}

/// Where a copy's files are read: a directory (the build context), or, for a stage's
/// filesystem, the layer file of each source path.
pub(crate) enum Sources<'a> {
    Dir(&'a Path),
    Hosts(&'a HashMap<PathBuf, PathBuf>),
}

/// The sandbox path must be taken.
struct Fallback;

type Planned<T> = Result<T, PlanError>;

enum PlanError {
    Fallback,
    Io(Box<CopyFault>),
}

impl From<CopyFault> for PlanError {
    fn from(fault: CopyFault) -> Self {
        PlanError::Io(Box::new(fault))
    }
}

impl From<Fallback> for PlanError {
    fn from(_: Fallback) -> Self {
        PlanError::Fallback
    }
}

struct CopyPlanner<'a> {
    view: &'a MergedView,
    entries: BTreeMap<Vec<u8>, PlannedEntry>,
    /// Directories in which an entry was created or replaced: their time is "now".
    modified: BTreeSet<Vec<u8>>,
    now: u64,
    epoch: i64,
    /// Directories the copy creates where the base has nothing: nothing below them is in the
    /// base either, so their children need no lookup.
    created: BTreeSet<Vec<u8>>,
    /// Context directories resolved so far (relative → host path): the files of one directory
    /// share its resolution.
    resolved_dirs: HashMap<PathBuf, PathBuf>,
}

fn join(components: &[OsString]) -> Vec<u8> {
    let mut name = Vec::new();
    for (index, component) in components.iter().enumerate() {
        if index > 0 {
            name.push(b'/');
        }
        name.extend_from_slice(component.as_bytes());
    }
    name
}

/// The normal components of an absolute or relative path; `..` makes the sandbox path decide.
fn components_of(path: &Path) -> Result<Vec<OsString>, Fallback> {
    let mut components = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(name) => components.push(name.to_os_string()),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return Err(Fallback),
        }
    }
    Ok(components)
}

impl CopyPlanner<'_> {
    fn state(&self, components: &[OsString]) -> Planned<State> {
        if components.is_empty() {
            return Ok(State::Root);
        }
        if let Some(entry) = self.entries.get(&join(components)) {
            return Ok(match entry.kind {
                PlannedKind::Directory => State::PlannedDir,
                _ => State::PlannedOther,
            });
        }
        if components.len() > 1
            && self
                .created
                .contains(&join(&components[..components.len() - 1]))
        {
            return Ok(State::Missing);
        }
        let found = self
            .view
            .lookup(components)
            .map_err(|source| PlanError::from(CopyFault::Base { source }))?;
        Ok(match found {
            None => State::Missing,
            Some((path, metadata)) if metadata.is_dir() => State::BaseDir(path, metadata),
            Some((_, metadata)) if metadata.is_file() => State::BaseFile,
            Some((_, metadata)) if metadata.file_type().is_symlink() => State::BaseSymlink,
            Some(_) => State::BaseOther,
        })
    }

    /// Every proper ancestor of `components` is a directory (or missing, from some point on);
    /// a symlink or anything else on the way is for the sandbox path.
    fn check_ancestors(&self, components: &[OsString]) -> Planned<()> {
        for depth in 1..components.len() {
            match self.state(&components[..depth])? {
                State::Missing => return Ok(()),
                state if state.is_dir() => {}
                _ => return Err(PlanError::Fallback),
            }
        }
        Ok(())
    }

    /// A directory of the base, copied up with its metadata.
    fn copy_up(
        &mut self,
        components: &[OsString],
        host: &Path,
        metadata: &Metadata,
    ) -> Planned<()> {
        let xattrs = layer::list_xattrs(host)
            .map_err(|source| {
                PlanError::from(CopyFault::io("read the extended attributes of", host)(
                    source,
                ))
            })?
            .into_iter()
            .filter(|(name, _)| !layer::is_overlay_xattr(name))
            .collect();
        self.entries.insert(
            join(components),
            PlannedEntry {
                name: join(components),
                kind: PlannedKind::Directory,
                mode: metadata.mode() & 0o7777,
                uid: metadata.uid(),
                gid: metadata.gid(),
                mtime: metadata.mtime().min(self.epoch).max(0) as u64,
                xattrs,
            },
        );
        Ok(())
    }

    /// Every ancestor of `components` present in the result: copied up from the base, or
    /// created `0755 root:root` (as `create_parents` does).
    fn ensure_parents(&mut self, components: &[OsString]) -> Planned<()> {
        for depth in 1..components.len() {
            let prefix = &components[..depth];
            match self.state(prefix)? {
                State::PlannedDir | State::Root => {}
                State::BaseDir(host, metadata) => self.copy_up(prefix, &host, &metadata)?,
                State::Missing => {
                    self.modified.insert(join(&prefix[..depth - 1]));
                    self.insert(prefix, PlannedKind::Directory, 0o755, (0, 0));
                    self.created.insert(join(prefix));
                }
                _ => return Err(PlanError::Fallback),
            }
        }
        Ok(())
    }

    fn insert(&mut self, components: &[OsString], kind: PlannedKind, mode: u32, owner: (u32, u32)) {
        let name = join(components);
        self.entries.insert(
            name.clone(),
            PlannedEntry {
                name,
                kind,
                mode: mode & 0o7777,
                uid: owner.0,
                gid: owner.1,
                mtime: self.now,
                xattrs: Vec::new(),
            },
        );
    }

    /// `make_dir` on a path: a new directory, or an existing one whose mode and owner change.
    fn make_dir(&mut self, components: &[OsString], mode: u32, owner: (u32, u32)) -> Planned<()> {
        match self.state(components)? {
            State::Root => Err(PlanError::Fallback),
            State::Missing => {
                self.modified
                    .insert(join(&components[..components.len() - 1]));
                self.insert(components, PlannedKind::Directory, mode, owner);
                self.created.insert(join(components));
                Ok(())
            }
            State::BaseDir(host, metadata) => {
                self.copy_up(components, &host, &metadata)?;
                self.set_mode_owner(components, mode, owner);
                Ok(())
            }
            State::PlannedDir => {
                self.set_mode_owner(components, mode, owner);
                Ok(())
            }
            _ => Err(PlanError::Fallback),
        }
    }

    fn set_mode_owner(&mut self, components: &[OsString], mode: u32, owner: (u32, u32)) {
        if let Some(entry) = self.entries.get_mut(&join(components)) {
            entry.mode = mode & 0o7777;
            entry.uid = owner.0;
            entry.gid = owner.1;
        }
    }

    /// `write_item`: the entry a copied item becomes at `components`.
    fn write_item(
        &mut self,
        item: &CopyItem,
        src_root: &Sources,
        components: &[OsString],
        owner: (u32, u32),
        chmod: Option<&crate::chmod::Chmod>,
    ) -> Planned<()> {
        let state = self.state(components)?;
        match &item.kind {
            ItemKind::Dir { mode } => {
                if !matches!(state, State::Missing) && !state.is_dir() {
                    return Err(PlanError::Fallback);
                }
                self.make_dir(components, crate::chmod::apply(chmod, *mode, true), owner)
            }
            ItemKind::File { digest, size, mode } => {
                if !matches!(state, State::Missing | State::BaseFile | State::BaseSymlink) {
                    return Err(PlanError::Fallback);
                }
                let source = match src_root {
                    Sources::Dir(root) => self.context_source(root, &item.rel_src)?,
                    Sources::Hosts(hosts) => match hosts.get(&item.rel_src) {
                        Some(host) => host.clone(),
                        None => return Err(PlanError::Fallback),
                    },
                };
                self.modified
                    .insert(join(&components[..components.len() - 1]));
                let expect = (*digest != [0; 32]).then_some(*digest);
                self.insert(
                    components,
                    PlannedKind::File {
                        source,
                        size: *size,
                        expect,
                    },
                    crate::chmod::apply(chmod, *mode, false),
                    owner,
                );
                Ok(())
            }
            ItemKind::Symlink { target } => {
                if !matches!(state, State::Missing | State::BaseFile | State::BaseSymlink) {
                    return Err(PlanError::Fallback);
                }
                self.modified
                    .insert(join(&components[..components.len() - 1]));
                self.insert(
                    components,
                    PlannedKind::Symlink {
                        target: target.as_os_str().as_bytes().to_vec(),
                    },
                    0o777,
                    owner,
                );
                Ok(())
            }
        }
    }

    /// Where a context file is read: `resolve_path_in_root(root, rel, false)`, its directory
    /// resolved once for all the files in it.
    fn context_source(&mut self, root: &Path, rel: &Path) -> Planned<PathBuf> {
        let failed =
            |source: io::Error| PlanError::from(CopyFault::io("resolve", &root.join(rel))(source));
        let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
            return crate::fsutil::resolve_path_in_root(root, rel, false).map_err(failed);
        };
        let dir = match self.resolved_dirs.get(parent) {
            Some(dir) => dir.clone(),
            None => {
                let dir =
                    crate::fsutil::resolve_path_in_root(root, parent, true).map_err(failed)?;
                self.resolved_dirs.insert(parent.to_path_buf(), dir.clone());
                dir
            }
        };
        Ok(dir.join(name))
    }

    /// [`crate::copy::perform_copy`], step for step, on the planned entries over the base.
    fn plan(
        &mut self,
        items: &[CopyItem],
        src_root: &Sources,
        dest: &str,
        workdir: &str,
        owner: (u32, u32),
        chmod: Option<&crate::chmod::Chmod>,
    ) -> Planned<()> {
        let dest_abs = if dest.starts_with('/') {
            dest.to_string()
        } else {
            format!("{}/{dest}", workdir.trim_end_matches('/'))
        };
        let dest_components = components_of(Path::new(&dest_abs))?;
        let explicit_dir = dest.ends_with('/') || dest.ends_with("/.") || dest == ".";
        self.check_ancestors(&dest_components)?;
        let dest_state = self.state(&dest_components)?;
        // `perform_copy` follows a final symlink to decide whether the destination is a
        // directory: not here.
        if matches!(dest_state, State::BaseSymlink) {
            return Err(PlanError::Fallback);
        }
        let existing_dir = dest_state.is_dir();
        let has_dir = items
            .iter()
            .any(|item| matches!(item.kind, ItemKind::Dir { .. }));
        if let [item] = items
            && !explicit_dir
            && !existing_dir
            && !has_dir
        {
            if dest_components.is_empty() {
                return Err(PlanError::Fallback);
            }
            self.ensure_parents(&dest_components)?;
            return self.write_item(item, src_root, &dest_components, owner, chmod);
        }
        // The destination directory is followed through a final symlink: not here.
        if !matches!(dest_state, State::Missing) && !existing_dir {
            return Err(PlanError::Fallback);
        }
        self.ensure_parents(&dest_components)?;
        if matches!(dest_state, State::Missing)
            && !items
                .iter()
                .any(|item| item.rel_dest.as_os_str().is_empty())
        {
            self.make_dir(&dest_components, 0o755, (0, 0))?;
        }
        for item in items {
            let target = if item.rel_dest.as_os_str().is_empty() {
                if self.state(&dest_components)?.is_dir() {
                    continue;
                }
                dest_components.clone()
            } else {
                let mut target = dest_components.clone();
                target.extend(components_of(&item.rel_dest)?);
                self.check_ancestors(&target)?;
                if matches!(item.kind, ItemKind::Dir { .. })
                    && matches!(self.state(&target)?, State::BaseFile | State::BaseSymlink)
                {
                    return Err(PlanError::Fallback);
                }
                self.ensure_parents(&target)?;
                target
            };
            self.write_item(item, src_root, &target, owner, chmod)?;
        }
        Ok(())
    }

    fn finish(mut self) -> Vec<PlannedEntry> {
        for name in &self.modified {
            if let Some(entry) = self.entries.get_mut(name) {
                entry.mtime = self.now;
            }
        }
        self.entries.into_values().collect()
    }
}

/// `chown=` with numbers only; `None` when it names a user or group (looked up in the base).
fn numeric_chown(spec: &str) -> Option<(u32, u32)> {
    let (user, group) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    let uid = user.parse::<u32>().ok()?;
    let gid = match group {
        Some(group) => group.parse::<u32>().ok()?,
        None => uid,
    };
    Some((uid, gid))
}

/// The entries a copy writes over the base `view`; `None` when the sandbox path must decide.
/// `now` is the current time in seconds.
pub(crate) fn plan_copy(
    view: &MergedView,
    items: &[CopyItem],
    src_root: &Sources,
    copy: &CopyOp,
    epoch: i64,
    now: i64,
) -> Result<Option<Vec<PlannedEntry>>, CopyFault> {
    let owner = match &copy.chown {
        None => (0, 0),
        Some(spec) => match numeric_chown(spec) {
            Some(owner) => owner,
            None => return Ok(None),
        },
    };
    let mut planner = CopyPlanner {
        view,
        entries: BTreeMap::new(),
        modified: BTreeSet::new(),
        now: now.min(epoch).max(0) as u64,
        epoch,
        created: BTreeSet::new(),
        resolved_dirs: HashMap::new(),
    };
    match planner.plan(
        items,
        src_root,
        &copy.dest,
        &copy.workdir,
        owner,
        copy.chmod.as_ref(),
    ) {
        Ok(()) => Ok(Some(planner.finish())),
        Err(PlanError::Fallback) => Ok(None),
        Err(PlanError::Io(fault)) => Err(*fault),
    }
}

/// The key a copy's layer is recorded under: the op and every entry it writes, not the step's
/// parent.
fn copy_layer_key(
    copy: &CopyOp,
    source_layers: &[crate::digest::Digest],
    entries: &[PlannedEntry],
    compression: &str,
) -> Key {
    let mut builder = KeyBuilder::new("copy-layer");
    builder.json(copy).str(compression);
    // A stage's files are named by path only: its layers say what they hold.
    for diff_id in source_layers {
        builder.bytes(&diff_id.0);
    }
    for entry in entries {
        builder
            .bytes(&entry.name)
            .str(&format!(
                "{:o} {} {} {}",
                entry.mode, entry.uid, entry.gid, entry.mtime
            ))
            .json(&entry.xattrs);
        match &entry.kind {
            PlannedKind::Directory => {
                builder.str("dir");
            }
            PlannedKind::File { size, expect, .. } => {
                builder
                    .str("file")
                    .str(&size.to_string())
                    .bytes(&expect.unwrap_or([0; 32]));
            }
            PlannedKind::Symlink { target } => {
                builder.str("symlink").bytes(target);
            }
        }
    }
    builder.finish()
}

impl Executor<'_> {
    /// Execute a `copy` without the sandbox when its result can be computed directly; `None`
    /// when the sandbox path must run it (see the module documentation).
    pub(super) fn copy_direct(
        &self,
        node: &Node,
        step: &StepPlan,
        copy: &CopyOp,
        layers: &[LayerDesc],
        inputs: &DepOutputs<'_>,
    ) -> Result<Option<Option<LayerDesc>>, Box<NodeFailure>> {
        let fail = |error: CopyFault| self.failure(node, Some(step), error, Vec::new());
        // GRAPHBUILD_DIRECT_COPY=0 runs every copy in the sandbox, as before (to compare).
        if std::env::var_os("GRAPHBUILD_DIRECT_COPY").is_some_and(|value| value == "0") {
            return Ok(None);
        }
        if copy
            .chown
            .as_deref()
            .is_some_and(|spec| numeric_chown(spec).is_none())
        {
            return Ok(None);
        }
        let view = MergedView::new(self.snapshots(layers).map_err(|error| fail(error.into()))?);
        let epoch = self.options.layer.source_date_epoch;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_secs() as i64)
            .unwrap_or(0);
        // The guard keeps the build file's inline files (if any) on disk until the copy is done;
        // an `add`'s tree (a download, a checkout, extracted archives) lives as long.
        let added = self
            .add_tree(copy)
            .map_err(|reason| fail(CopyFault::Add { reason }))?;
        let (context_root, _inline_guard) = match &copy.from {
            CopySource::Context { inline, .. } => self.copy_root(inline).map_err(fail)?,
            _ => (self.plan.context_dir.clone(), None),
        };
        let (planned, source_layers) = match &copy.from {
            _ if added.is_some() => {
                let added = added.as_ref().expect("checked");
                let sources = Sources::Dir(&added.root);
                let planned =
                    plan_copy(&view, &added.items, &sources, copy, epoch, now).map_err(fail)?;
                (planned, Vec::new())
            }
            CopySource::Url { .. } | CopySource::Git { .. } | CopySource::Extract { .. } => {
                return Err(fail(CopyFault::AddWithoutFiles));
            }
            CopySource::Context { items, .. } => {
                let sources = Sources::Dir(&context_root);
                let planned = plan_copy(&view, items, &sources, copy, epoch, now).map_err(fail)?;
                (planned, Vec::new())
            }
            CopySource::Node { node: source, .. } => {
                let output = inputs
                    .output_of(*source)
                    .map_err(|error| self.failure(node, Some(step), error, Vec::new()))?;
                let source_view = MergedView::new(
                    self.snapshots(&output.layers)
                        .map_err(|error| fail(error.into()))?,
                );
                let selected = if copy.parents {
                    crate::copy_parents::select_in_view_with_parents(&source_view, &copy.sources)
                } else {
                    select_in_view(&source_view, &copy.sources)
                };
                let Some((items, hosts)) = selected.map_err(fail)? else {
                    return Ok(None);
                };
                let items = crate::context::exclude_patterns(items, &copy.exclude)
                    .map_err(|error| fail(CopyFault::from(error)))?;
                let sources = Sources::Hosts(&hosts);
                let planned = plan_copy(&view, &items, &sources, copy, epoch, now).map_err(fail)?;
                let diff_ids = output.layers.iter().map(|layer| layer.diff_id).collect();
                (planned, diff_ids)
            }
        };
        let Some(entries) = planned else {
            return Ok(None);
        };
        if entries.is_empty() {
            return Ok(Some(None));
        }
        let compression = match self.options.layer.compression {
            layer::Compression::Gzip => "gzip",
            layer::Compression::Zstd => "zstd",
            layer::Compression::None => "none",
        };
        let key = copy_layer_key(copy, &source_layers, &entries, compression);
        // The same layer for another platform, being written now: wait for it, then reuse it.
        let writing = self
            .in_flight
            .lock()
            .map(|mut in_flight| in_flight.entry(key).or_default().clone())
            .unwrap_or_default();
        let _writing = writing.lock();
        let reusable = !self.options.no_cache
            || self
                .executed_here
                .lock()
                .is_ok_and(|executed| executed.contains(&key));
        if reusable && let Some(known) = self.recorded_layer(&key) {
            let _ = self.store.record_verified_layer(&known);
            return Ok(Some(Some(known)));
        }
        let temp = self
            .store
            .temp_dir()
            .map_err(|source| fail(CopyFault::TempDir { source }))?;
        // A later step (or another node) will mount this layer: lay out its snapshot from the
        // sources on a second thread while the tar is compressed on this one.
        let later_steps = node
            .steps
            .iter()
            .skip_while(|other| other.key != step.key)
            .skip(1)
            .any(|other| other.op.touches_filesystem());
        let used_by_others = self
            .plan
            .nodes
            .iter()
            .any(|other| other.deps.contains(&node.id));
        let snapshot_dir = temp.path().join("snapshot");
        let want_snapshot = later_steps || used_by_others;
        let lineage = snapshot_delta::lineage_key(copy, layers);
        let previous = want_snapshot
            .then(|| self.store.get_action(&lineage))
            .flatten()
            .and_then(|bytes| snapshot_delta::decode(&bytes));
        let (blob, materialized) = std::thread::scope(|scope| {
            let materializing = want_snapshot.then(|| {
                scope.spawn(|| self.lay_out_snapshot(&entries, &snapshot_dir, previous.as_ref()))
            });
            let blob = layer::write_layer_from_entries(&entries, temp.path(), &self.options.layer);
            let materialized = materializing
                .map(|thread| thread.join().unwrap_or(Err(CopyFault::Panicked)))
                .is_some_and(|made| made.is_ok());
            (blob, materialized)
        });
        let blob = blob.map_err(|source| fail(CopyFault::WriteLayer { source }))?;
        let Some(blob) = blob else {
            return Ok(Some(None));
        };
        self.store
            .put_blob_file(&blob.path, Some(blob.digest))
            .map_err(|source| fail(CopyFault::StoreLayer { source }))?;
        let layer = LayerDesc {
            digest: blob.digest,
            diff_id: blob.diff_id,
            size: blob.size,
            media_type: blob.media_type.to_string(),
        };
        if let Ok(bytes) = serde_json::to_vec(&layer) {
            let _ = self
                .store
                .put_action(&self.layer_key(&layer.diff_id), &bytes);
            let _ = self.store.put_action(&key, &bytes);
        }
        if let Ok(mut executed) = self.executed_here.lock() {
            executed.insert(key);
        }
        // Both digests were computed here, from the tar written: a verified pair.
        let _ = self.store.record_verified_layer(&layer);
        if materialized {
            self.adopt_materialized(&layer.diff_id, &snapshot_dir);
            // The next version of this copy can start from this snapshot.
            let index = snapshot_delta::encode(&layer.diff_id, &entries);
            let _ = self.store.put_action(&lineage, &index);
        }
        Ok(Some(Some(layer)))
    }

    /// The snapshot of `entries` at `dir` (not existing yet): the previous snapshot of the same
    /// copy changed into it when that one can be taken and few entries differ, else written
    /// afresh.
    fn lay_out_snapshot(
        &self,
        entries: &[PlannedEntry],
        dir: &Path,
        previous: Option<&snapshot_delta::SnapshotIndex>,
    ) -> Result<(), CopyFault> {
        if let Some(old) = previous
            && self.take_previous(old, entries, dir)
        {
            match snapshot_delta::apply(old, entries, dir) {
                Ok(_) => return Ok(()),
                Err(_) => {
                    // Not the snapshot its index says: write one afresh.
                    crate::fsutil::remove_dir_all_force(dir)
                        .map_err(CopyFault::io("remove", dir))?;
                }
            }
        }
        std::fs::create_dir(dir).map_err(CopyFault::io("create", dir))?;
        materialize(entries, dir)
    }

    /// Move the snapshot `old` describes to `dir`, if changing it is worth it (under a quarter
    /// of the entries differ) and no step of this build uses it.
    fn take_previous(
        &self,
        old: &snapshot_delta::SnapshotIndex,
        entries: &[PlannedEntry],
        dir: &Path,
    ) -> bool {
        let changes = snapshot_delta::changes(old, entries);
        if changes == 0 || changes * 4 > entries.len() {
            return false;
        }
        let extracting = self
            .in_flight_snapshots
            .lock()
            .map(|mut in_flight| in_flight.entry(old.diff_id).or_default().clone())
            .unwrap_or_default();
        let _extracting = extracting.lock();
        let in_use = self
            .snapshots_in_use
            .lock()
            .map_or(true, |in_use| in_use.contains(&old.diff_id));
        !in_use && self.store.take_snapshot(&old.diff_id, dir).unwrap_or(false)
    }

    /// Keep a snapshot laid out by [`materialize`] as the snapshot of its layer (unless one
    /// exists already).
    fn adopt_materialized(&self, diff_id: &crate::digest::Digest, made: &Path) {
        if self.store.snapshot_path(diff_id).is_some() {
            return;
        }
        let extracting = self
            .in_flight_snapshots
            .lock()
            .map(|mut in_flight| in_flight.entry(*diff_id).or_default().clone())
            .unwrap_or_default();
        let _extracting = extracting.lock();
        let _ = self
            .store
            .ensure_snapshot(diff_id, |dir: &Path| -> io::Result<()> {
                std::fs::remove_dir(dir)?;
                std::fs::rename(made, dir)
            });
    }

    /// A layer recorded under `key`, if its blob is still in the store.
    fn recorded_layer(&self, key: &Key) -> Option<LayerDesc> {
        let bytes = self.store.get_action(key)?;
        let layer: LayerDesc = serde_json::from_slice(&bytes).ok()?;
        self.blob_present(&layer.digest, layer.size)
            .then_some(layer)
    }
}

/// Lay `entries` out under `dir` as unpacking their layer would (names, kinds, content, modes,
/// owners, times, attributes): the layer's snapshot, made from the sources while the layer is
/// compressed, so the next step does not wait for the blob to be decompressed and unpacked.
fn materialize(entries: &[PlannedEntry], dir: &Path) -> Result<(), CopyFault> {
    let mut sorted: Vec<&PlannedEntry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let path_of = |entry: &PlannedEntry| dir.join(std::ffi::OsStr::from_bytes(&entry.name));
    let is_dir = |entry: &PlannedEntry| matches!(entry.kind, PlannedKind::Directory);
    // Directories first, parents before children.
    for entry in sorted.iter().filter(|entry| is_dir(entry)) {
        let path = path_of(entry);
        std::fs::create_dir(&path).map_err(CopyFault::io("create", &path))?;
    }
    // Files and symlinks on two threads, each a run of neighbours (mostly other directories
    // than the other thread's): creating inodes is most of the cost on a busy filesystem.
    let others: Vec<&PlannedEntry> = sorted
        .iter()
        .copied()
        .filter(|entry| !is_dir(entry))
        .collect();
    let chunk = others.len().div_ceil(2).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = others
            .chunks(chunk)
            .map(|run| {
                scope.spawn(move || {
                    let mut buffer = vec![0u8; 128 * 1024];
                    for entry in run {
                        write_entry(entry, &path_of(entry), &mut buffer)?;
                    }
                    Ok::<(), CopyFault>(())
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|worker| worker.join().unwrap_or(Err(CopyFault::Panicked)))
    })?;
    // Directory metadata last, deepest first: creating their children changed their times.
    for entry in sorted.iter().rev().filter(|entry| is_dir(entry)) {
        finish_entry(entry, &path_of(entry))?;
    }
    Ok(())
}

/// One file (content checked against its plan-time digest, metadata set through its
/// descriptor) or symlink of a snapshot.
pub(super) fn write_entry(
    entry: &PlannedEntry,
    path: &Path,
    buffer: &mut [u8],
) -> Result<(), CopyFault> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let failed = |source: io::Error| CopyFault::io("create", path)(source);
    let PlannedKind::File { source, expect, .. } = &entry.kind else {
        if let PlannedKind::Symlink { target } = &entry.kind {
            std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), path)
                .map_err(failed)?;
        }
        return finish_entry(entry, path);
    };
    let mut input = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(source)
        .map_err(failed)?;
    let mut output = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(failed)?;
    match expect {
        None => {
            io::copy(&mut input, &mut output).map_err(failed)?;
        }
        Some(expected) => {
            // The snapshot must hold what the layer holds: a context file that changed since
            // it was hashed fails the snapshot (and the tar writer fails the step).
            let mut hasher = blake3::Hasher::new();
            loop {
                let read = match io::Read::read(&mut input, buffer) {
                    Ok(0) => break,
                    Ok(read) => read,
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                    Err(error) => return Err(failed(error)),
                };
                hasher.update(&buffer[..read]);
                io::Write::write_all(&mut output, &buffer[..read]).map_err(failed)?;
            }
            if hasher.finalize().as_bytes() != expected {
                return Err(failed(io::Error::other(
                    "the source changed while it was copied",
                )));
            }
        }
    }
    if !entry.xattrs.is_empty() {
        drop(output);
        return finish_entry(entry, path);
    }
    // Owner first (a chown clears set-id bits), then mode and times, all on the descriptor.
    std::os::unix::fs::fchown(&output, Some(entry.uid), Some(entry.gid)).map_err(failed)?;
    output
        .set_permissions(std::fs::Permissions::from_mode(entry.mode))
        .map_err(failed)?;
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(entry.mtime);
    output
        .set_times(
            std::fs::FileTimes::new()
                .set_accessed(time)
                .set_modified(time),
        )
        .map_err(failed)
}

/// Owner, then mode (a `chown` clears set-id bits), attributes and times of one entry.
pub(super) fn finish_entry(entry: &PlannedEntry, path: &Path) -> Result<(), CopyFault> {
    use std::os::unix::fs::PermissionsExt;
    let failed = |action: &'static str, source: io::Error| CopyFault::io(action, path)(source);
    std::os::unix::fs::lchown(path, Some(entry.uid), Some(entry.gid))
        .map_err(|error| failed("change the owner of", error))?;
    if !matches!(entry.kind, PlannedKind::Symlink { .. }) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(entry.mode))
            .map_err(|error| failed("set the mode of", error))?;
    }
    for (name, value) in &entry.xattrs {
        layer::set_xattr(path, name, value)
            .map_err(|error| failed("set an extended attribute of", error))?;
    }
    let time = libc::timespec {
        tv_sec: entry.mtime as libc::time_t,
        tv_nsec: 0,
    };
    let times = [time, time];
    let c_path =
        std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| CopyFault::NulByte {
            path: path.to_path_buf(),
        })?;
    // SAFETY: a valid NUL-terminated path and two timespecs, as utimensat(2) expects.
    let result = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if result != 0 {
        return Err(failed("set the times of", io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two layers: the lower has `/out/{keep,gone,d/old}` and `/l -> out`; the upper deletes
    /// `gone` (a whiteout), makes `d` opaque with `d/new`, and adds `extra`.
    fn layers() -> (tempfile::TempDir, MergedView) {
        let root = tempfile::tempdir().unwrap();
        let lower = root.path().join("lower");
        let upper = root.path().join("upper");
        std::fs::create_dir_all(lower.join("out/d")).unwrap();
        std::fs::write(lower.join("out/keep"), b"keep").unwrap();
        std::fs::write(lower.join("out/gone"), b"gone").unwrap();
        std::fs::write(lower.join("out/d/old"), b"old").unwrap();
        std::os::unix::fs::symlink("out", lower.join("l")).unwrap();
        std::fs::create_dir_all(upper.join("out/d")).unwrap();
        std::fs::write(upper.join("out/d/new"), b"new").unwrap();
        std::fs::write(upper.join("out/extra"), b"extra").unwrap();
        layer::set_xattr(&upper.join("out/d"), b"trusted.overlay.opaque", b"y").unwrap();
        nix::sys::stat::mknod(
            &upper.join("out/gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            0,
        )
        .unwrap();
        let view = MergedView::new(vec![upper, lower]);
        (root, view)
    }

    fn components(path: &str) -> Vec<OsString> {
        components_of(Path::new(path)).ok().unwrap()
    }

    #[test]
    fn lookups_follow_overlay_rules() {
        let (_root, view) = layers();
        let found = |path: &str| view.lookup(&components(path)).unwrap().is_some();
        assert!(found("out/keep"));
        assert!(found("out/extra"));
        assert!(!found("out/gone"), "a whiteout hides the lower file");
        assert!(found("out/d/new"));
        assert!(
            !found("out/d/old"),
            "an opaque directory hides the lower one"
        );
        assert!(!found("missing"));
        assert_eq!(
            view.resolve(Path::new("l/keep"), true).unwrap(),
            components("out/keep")
        );
    }

    #[test]
    fn a_stage_directory_is_selected_merged() {
        let (_root, view) = layers();
        let (items, hosts) = select_in_view(&view, &["/l/".to_string()])
            .unwrap()
            .unwrap();
        let names: Vec<String> = items
            .iter()
            .map(|item| item.rel_dest.display().to_string())
            .collect();
        assert_eq!(names, ["", "d", "d/new", "extra", "keep"]);
        let keep = hosts.get(Path::new("out/keep")).unwrap();
        assert_eq!(std::fs::read(keep).unwrap(), b"keep");
        // Globs are left to the sandbox.
        assert!(
            select_in_view(&view, &["/out/*".to_string()])
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_symlink_on_the_destination_is_left_to_the_sandbox() {
        let (_root, view) = layers();
        let context = tempfile::tempdir().unwrap();
        std::fs::write(context.path().join("f"), b"f").unwrap();
        let item = CopyItem {
            rel_src: PathBuf::from("f"),
            rel_dest: PathBuf::from("f"),
            kind: ItemKind::File {
                digest: *blake3::hash(b"f").as_bytes(),
                size: 1,
                mode: 0o644,
            },
        };
        let copy = |dest: &str| CopyOp {
            sources: vec!["f".into()],
            dest: dest.into(),
            workdir: "/".into(),
            chown: None,
            chmod: None,
            parents: false,
            exclude: Vec::new(),
            from: CopySource::Context {
                items: Default::default(),
                digest: String::new(),
                inline: Vec::new(),
            },
        };
        let plan = |dest: &str| {
            plan_copy(
                &view,
                std::slice::from_ref(&item),
                &Sources::Dir(context.path()),
                &copy(dest),
                0,
                100,
            )
            .unwrap()
        };
        assert!(plan("/l/").is_none(), "through a symlink");
        assert!(plan("/out/keep/x").is_none(), "under a file");
        let entries = plan("/out/new/").expect("a plain destination");
        let names: Vec<&[u8]> = entries.iter().map(|entry| &entry.name[..]).collect();
        assert_eq!(names, [&b"out"[..], b"out/new", b"out/new/f"]);
        // `out` is copied up from the base and was modified; `out/new` is new.
        assert_eq!(entries[0].mtime, 0);
        assert_eq!(entries[1].mode, 0o755);
    }
}
