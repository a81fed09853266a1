//! `COPY --parents` (KDL `parents=#true`), as BuildKit's: each selected entry keeps its path
//! in the source filesystem under the destination, like `cp --parents` and `rsync
//! --relative`; a `/./` in a source keeps only the part after it (`x/./y/a.txt` → `y/a.txt`).
//! The directories above each entry are copied too, with their own modes. When two sources
//! give one path, the later wins, as BuildKit overwrites silently.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::build::CopyFault;
use crate::build::direct_copy::{MergedView, ViewSelection, select_in_view};
use crate::context::{Context, CopyItem, ItemKind, clean_source, select_in_tree};
use crate::copy::CopyError;

/// `sources` selected from the build context with their parents.
pub(crate) fn select(context: &Context, sources: &[String]) -> Result<Vec<CopyItem>, CopyError> {
    let mut items = BTreeMap::new();
    for source in sources {
        let selected = context.select(std::slice::from_ref(source))?;
        let pivot = pivot(source, true)?;
        let dir_mode = |path: &Path| context.dir_mode(&path.to_string_lossy());
        relocate(selected, pivot.as_deref(), &dir_mode, &mut items);
    }
    Ok(items.into_values().collect())
}

/// `sources` selected from a stage's merged layers with their parents; `None` when one of them
/// needs the sandbox (see [`select_in_view`]).
pub(crate) fn select_in_view_with_parents(
    view: &MergedView,
    sources: &[String],
) -> Result<Option<ViewSelection>, CopyFault> {
    let mut items = BTreeMap::new();
    let mut hosts = HashMap::new();
    let dir_mode = |path: &Path| {
        let components = view.resolve(path, false).ok()?;
        let (_, metadata) = view.lookup(&components).ok()??;
        metadata.is_dir().then(|| metadata.mode() & 0o7777)
    };
    for source in sources {
        let Some((selected, found)) = select_in_view(view, std::slice::from_ref(source))? else {
            return Ok(None);
        };
        let pivot = pivot_in_root(source);
        relocate(selected, pivot.as_deref(), &dir_mode, &mut items);
        hosts.extend(found);
    }
    Ok(Some((items.into_values().collect(), hosts)))
}

/// `sources` selected in a stage's filesystem mounted at `root` (in the sandbox) with their
/// parents.
pub(crate) fn select_in_tree_with_parents(
    root: &Path,
    sources: &[String],
) -> Result<Vec<CopyItem>, CopyError> {
    let mut items = BTreeMap::new();
    let dir_mode = |path: &Path| {
        let metadata = std::fs::symlink_metadata(root.join(path)).ok()?;
        metadata.is_dir().then(|| metadata.mode() & 0o7777)
    };
    for source in sources {
        let selected = select_in_tree(root, std::slice::from_ref(source))?;
        let pivot = pivot_in_root(source);
        relocate(selected, pivot.as_deref(), &dir_mode, &mut items);
    }
    Ok(items.into_values().collect())
}

/// [`pivot`] in a stage's filesystem, where `..` stops at the root: never an error.
fn pivot_in_root(source: &str) -> Option<String> {
    source
        .find("/./")
        .map(|index| crate::context::clean_source_in_root(&source[..index]))
}

/// The part of a source before its `/./` pivot (cleaned, relative), if it has one.
pub(crate) fn pivot(source: &str, strict: bool) -> Result<Option<String>, CopyError> {
    match source.find("/./") {
        Some(index) => Ok(Some(clean_source(&source[..index], strict)?)),
        None => Ok(None),
    }
}

/// The items of one source (as selected without `--parents`) relocated: each destination is
/// its source path after `pivot`; the directories above are added with `dir_mode`'s modes
/// (directories of the source filesystem, by path relative to its root).
pub(crate) fn relocate(
    items: Vec<CopyItem>,
    pivot: Option<&str>,
    dir_mode: &dyn Fn(&Path) -> Option<u32>,
    into: &mut BTreeMap<PathBuf, CopyItem>,
) {
    let pivot = PathBuf::from(pivot.unwrap_or(""));
    for item in items {
        // An entry reached through a symlink source is outside the pivot: it keeps its path.
        let rel_dest = item
            .rel_src
            .strip_prefix(&pivot)
            .map(Path::to_path_buf)
            .unwrap_or_else(|_| item.rel_src.clone());
        let mut ancestor = PathBuf::new();
        let components: Vec<_> = rel_dest.components().collect();
        for component in components.iter().take(components.len().saturating_sub(1)) {
            ancestor.push(component);
            if into.contains_key(&ancestor) {
                continue;
            }
            let rel_src = pivot.join(&ancestor);
            let mode = dir_mode(&rel_src).unwrap_or(0o755);
            into.insert(
                ancestor.clone(),
                CopyItem {
                    rel_src,
                    rel_dest: ancestor.clone(),
                    kind: ItemKind::Dir { mode },
                },
            );
        }
        into.insert(
            rel_dest.clone(),
            CopyItem {
                rel_src: item.rel_src,
                rel_dest,
                kind: item.kind,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, rel_dest: &str) -> CopyItem {
        CopyItem {
            rel_src: path.into(),
            rel_dest: rel_dest.into(),
            kind: ItemKind::File {
                digest: [0; 32],
                size: 0,
                mode: 0o644,
            },
        }
    }

    #[test]
    fn entries_keep_their_paths_after_the_pivot_with_their_parents() {
        let modes = |path: &Path| match path.to_str() {
            Some("x") => Some(0o700),
            Some("x/y") => Some(0o750),
            _ => None,
        };
        let mut items = BTreeMap::new();
        relocate(vec![file("x/y/a.txt", "a.txt")], None, &modes, &mut items);
        relocate(
            vec![file("x/y/b.txt", "b.txt")],
            pivot("x/./y/b.txt", true).unwrap().as_deref(),
            &modes,
            &mut items,
        );
        let found: Vec<(String, String, u32)> = items
            .values()
            .map(|item| {
                let mode = match item.kind {
                    ItemKind::Dir { mode } | ItemKind::File { mode, .. } => mode,
                    ItemKind::Symlink { .. } => 0,
                };
                (
                    item.rel_src.display().to_string(),
                    item.rel_dest.display().to_string(),
                    mode,
                )
            })
            .collect();
        assert_eq!(
            found,
            [
                ("x".into(), "x".into(), 0o700),
                ("x/y".into(), "x/y".into(), 0o750),
                ("x/y/a.txt".into(), "x/y/a.txt".into(), 0o644),
                ("x/y".into(), "y".into(), 0o750),
                ("x/y/b.txt".into(), "y/b.txt".into(), 0o644),
            ]
        );
    }

    #[test]
    fn a_pivot_in_a_stage_stops_at_its_root_where_the_context_refuses() {
        assert_eq!(pivot_in_root("../x/./y"), Some("x".to_string()));
        assert_eq!(pivot_in_root("/x/../../y/./z"), Some("y".to_string()));
        assert_eq!(pivot_in_root("x/y"), None);
        assert!(pivot("../x/./y", true).is_err());
        assert_eq!(pivot("x/z/../y/./b", true).unwrap().as_deref(), Some("x/y"));
    }
}
