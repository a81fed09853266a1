//! The context files a step reads, as `plan --explain` and the provenance list them.
//!
//! A copy of 100,000 context files lists each of them, by path, content digest and mode. The
//! plan does not keep that list as formatted strings (a `String` pair per file per platform,
//! built on every build, warm ones included): it is read from the copy's own selected items
//! when it is needed, and each value is formatted only where text is written — the
//! provenance's context listing (streamed, never held as a map) and the files `plan
//! --explain` compares.
//!
//! The text of each value is what [`StepInputs::files`](super::StepInputs::files) held
//! before, so listings, records and provenance digests are unchanged: `HEX:MODE` (mode in
//! octal) for a file, `-> TARGET` for a symlink, and the stage's key for a copy from a stage.

use std::borrow::Cow;
use std::fmt;
use std::path::Path;
use std::sync::Mutex;

use crate::context::ItemKind;
use crate::digest::Digest;
use crate::plan::{CopyOp, CopySource, Op, StepPlan};

/// The value a step's input file is listed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileValue<'a> {
    /// A context file: its content digest and mode.
    File { digest: &'a [u8; 32], mode: u32 },
    /// A context symlink: its target.
    Link(&'a Path),
    /// Already text (the stage a copy reads, by key).
    Text(&'a str),
}

impl fmt::Display for FileValue<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileValue::File { digest, mode } => {
                let mut hex = [0u8; 64];
                // A 32-byte input always fits 64 hex digits.
                let _ = hex::encode_to_slice(digest, &mut hex);
                let hex = std::str::from_utf8(&hex).map_err(|_| fmt::Error)?;
                write!(f, "{hex}:{mode:o}")
            }
            FileValue::Link(target) => write!(f, "-> {}", target.display()),
            FileValue::Text(text) => f.write_str(text),
        }
    }
}

/// One listed input file: its path (lossy text for a name that is not UTF-8, as shown) and
/// value.
pub(crate) type FileEntry<'a> = (Cow<'a, str>, FileValue<'a>);

/// The files a step reads, sorted by path, each path once: the copy's selected context files
/// (directories are not listed) and the text entries of its inputs (a stage it copies from).
/// When a path is selected twice the last selection is the one listed, as a map filled in
/// selection order keeps it.
pub(crate) fn step_files(step: &StepPlan) -> Vec<FileEntry<'_>> {
    let mut entries: Vec<FileEntry<'_>> = Vec::new();
    // An `add` that extracts archives reads its context files as a copy does.
    let selected: Option<&[crate::context::CopyItem]> = match &step.op {
        Op::Copy(CopyOp {
            from: CopySource::Context { items, .. },
            ..
        }) => Some(items),
        Op::Copy(CopyOp {
            from: CopySource::Extract { items, .. },
            ..
        }) => Some(items),
        _ => None,
    };
    if let Some(items) = selected {
        entries.reserve(items.len());
        for item in items.iter() {
            let value = match &item.kind {
                ItemKind::File { digest, mode, .. } => FileValue::File {
                    digest,
                    mode: *mode,
                },
                ItemKind::Symlink { target } => FileValue::Link(target),
                ItemKind::Dir { .. } => continue,
            };
            entries.push((item.rel_src.to_string_lossy(), value));
        }
    }
    entries.extend(
        step.inputs
            .files
            .iter()
            .map(|(path, value)| (Cow::Borrowed(path.as_str()), FileValue::Text(value))),
    );
    sorted_last_wins(entries)
}

/// `entries` sorted by path (stable: usually already sorted, then linear), keeping the last
/// entry of each path.
fn sorted_last_wins(mut entries: Vec<FileEntry<'_>>) -> Vec<FileEntry<'_>> {
    entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut kept: Vec<FileEntry<'_>> = Vec::with_capacity(entries.len());
    for entry in entries {
        match kept.last_mut() {
            Some(last) if last.0 == entry.0 => *last = entry,
            _ => kept.push(entry),
        }
    }
    kept
}

/// The canonical JSON of every path the `steps` read and the set of values each was read
/// with: `{"PATH":["VALUE",…],…}`, paths and each path's values sorted by their bytes — the
/// bytes `oci::canonical_json` writes for that map — and the number of paths. Written
/// straight from the steps' items, without a map of strings.
pub(crate) fn context_listing<'a>(steps: impl Iterator<Item = &'a StepPlan>) -> (Vec<u8>, usize) {
    let mut all: Vec<FileEntry<'a>> = Vec::new();
    for step in steps {
        all.extend(step_files(step));
    }
    // Stable: the steps' own order stays within a path (it does not matter: values are sorted).
    all.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut out = Vec::with_capacity(all.len() * 96 + 2);
    out.push(b'{');
    let mut paths = 0;
    let mut rest = all.as_slice();
    while let Some((path, _)) = rest.first() {
        let same = rest.iter().take_while(|(other, _)| other == path).count();
        let (group, tail) = rest.split_at(same);
        rest = tail;
        if paths > 0 {
            out.push(b',');
        }
        paths += 1;
        write_json_str(&mut out, path);
        out.extend_from_slice(b":[");
        if let [(_, value)] = group {
            write_json_str(&mut out, &value.to_string());
        } else {
            let mut values: Vec<String> =
                group.iter().map(|(_, value)| value.to_string()).collect();
            values.sort_unstable();
            values.dedup();
            for (index, value) in values.iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write_json_str(&mut out, value);
            }
        }
        out.push(b']');
    }
    out.push(b'}');
    (out, paths)
}

/// The sha256 of the [`context_listing`] of `steps` and its number of paths, as the
/// provenance names the context. The platforms of an image usually copy the same files: a
/// listing already written for the same selections in this process is not written again.
pub(crate) fn context_listing_digest<'a>(
    steps: impl Iterator<Item = &'a StepPlan> + Clone,
) -> (Digest, usize) {
    static LISTED: Mutex<Vec<([u8; 32], Digest, usize)>> = Mutex::new(Vec::new());
    // What the listing is made of: each step's selection (its items' digest covers every
    // path, digest, mode and target) and the entries of its inputs, in order.
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"graphbuild context listing\0");
    for step in steps.clone() {
        let mut field = |bytes: &[u8]| {
            hasher.update(&(bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        };
        match &step.op {
            Op::Copy(CopyOp {
                from: CopySource::Context { digest, .. },
                ..
            }) => field(digest.as_bytes()),
            _ => field(b""),
        }
        field(&(step.inputs.files.len() as u64).to_le_bytes());
        for (path, value) in &step.inputs.files {
            field(path.as_bytes());
            field(value.as_bytes());
        }
    }
    let id = *hasher.finalize().as_bytes();
    let listed = |list: &Vec<([u8; 32], Digest, usize)>| {
        list.iter()
            .find(|(known, _, _)| *known == id)
            .map(|(_, digest, paths)| (*digest, *paths))
    };
    if let Some(found) = LISTED.lock().ok().and_then(|list| listed(&list)) {
        return found;
    }
    let (listing, paths) = context_listing(steps);
    let found = (Digest::of(&listing), paths);
    if let Ok(mut list) = LISTED.lock() {
        if list.len() >= 64 {
            list.remove(0);
        }
        list.push((id, found.0, found.1));
    }
    found
}

/// A JSON string as serde_json writes it (the form `oci::canonical_json` writes).
fn write_json_str(out: &mut Vec<u8>, text: &str) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    use std::path::PathBuf;

    use super::*;
    use crate::context::CopyItem;
    use crate::digest::Key;
    use crate::plan::StepInputs;

    fn copy_step(items: Vec<CopyItem>, files: BTreeMap<String, String>) -> StepPlan {
        StepPlan {
            key: Key([0; 32]),
            pending: false,
            op: Op::Copy(CopyOp {
                sources: vec![".".into()],
                dest: "/src/".into(),
                workdir: "/".into(),
                chown: None,
                chmod: None,
                exclude: Vec::new(),
                parents: false,
                from: CopySource::Context {
                    digest: hex::encode(crate::context::items_digest(&items)),
                    items: std::sync::Arc::new(items),
                    inline: Vec::new(),
                },
            }),
            description: "COPY . /src/".into(),
            at: graphbuild_lang::ir::Loc {
                file: graphbuild_lang::ir::FileId(0),
                span: (0, 0).into(),
            },
            inputs: StepInputs {
                files,
                ..StepInputs::default()
            },
        }
    }

    fn file(path: &[u8], digest: u8, mode: u32) -> CopyItem {
        CopyItem {
            rel_src: PathBuf::from(OsStr::from_bytes(path)),
            rel_dest: PathBuf::from(OsStr::from_bytes(path)),
            kind: ItemKind::File {
                digest: [digest; 32],
                size: 1,
                mode,
            },
        }
    }

    /// What the plan held before, formatted as it was: a map per step, filled in order.
    fn formatted(step: &StepPlan) -> BTreeMap<String, String> {
        let mut map = BTreeMap::new();
        if let Op::Copy(CopyOp {
            from: CopySource::Context { items, .. },
            ..
        }) = &step.op
        {
            for item in items.iter() {
                let value = match &item.kind {
                    ItemKind::File { digest, mode, .. } => {
                        format!("{}:{mode:o}", hex::encode(digest))
                    }
                    ItemKind::Symlink { target } => format!("-> {}", target.display()),
                    ItemKind::Dir { .. } => continue,
                };
                map.insert(item.rel_src.display().to_string(), value);
            }
        }
        map.extend(step.inputs.files.clone());
        map
    }

    fn steps() -> Vec<StepPlan> {
        let first = copy_step(
            vec![
                CopyItem {
                    rel_src: "src".into(),
                    rel_dest: "".into(),
                    kind: ItemKind::Dir { mode: 0o755 },
                },
                file(b"src/b \"quoted\"\\.txt", 1, 0o644),
                file(b"src/a.txt", 2, 0o755),
                file(b"src/\xff\xfe-not-utf8", 3, 0o600),
                file(b"src/\xc3\xa9t\xc3\xa9\n", 4, 0o644),
                // Selected twice: the last one is listed.
                file(b"src/a.txt", 5, 0o644),
                CopyItem {
                    rel_src: "src/link".into(),
                    rel_dest: "link".into(),
                    kind: ItemKind::Symlink {
                        target: "../etc/\u{1}passwd".into(),
                    },
                },
            ],
            BTreeMap::new(),
        );
        // Another step reads one of the same paths with another value, and a stage.
        let second = copy_step(
            vec![file(b"src/a.txt", 6, 0o644), file(b"Z", 7, 0o644)],
            BTreeMap::from([("stage build".to_string(), "0123abcd".to_string())]),
        );
        vec![first, second]
    }

    #[test]
    fn step_files_are_the_map_the_plan_held() {
        for step in steps() {
            let listed: BTreeMap<String, String> = step_files(&step)
                .into_iter()
                .map(|(path, value)| (path.into_owned(), value.to_string()))
                .collect();
            assert_eq!(listed, formatted(&step));
            let paths: Vec<Cow<'_, str>> = step_files(&step).into_iter().map(|e| e.0).collect();
            let mut sorted = paths.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(paths, sorted);
        }
    }

    #[test]
    fn the_listing_is_the_canonical_json_of_the_merged_map() {
        let steps = steps();
        // How the provenance built it before: a map of sets, then canonical JSON.
        let mut merged: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for step in &steps {
            for (path, value) in formatted(step) {
                merged.entry(path).or_default().insert(value);
            }
        }
        let expected = crate::oci::canonical_json(&merged);
        let (listing, paths) = context_listing(steps.iter());
        assert_eq!(
            String::from_utf8_lossy(&listing),
            String::from_utf8_lossy(&expected)
        );
        assert_eq!(listing, expected);
        assert_eq!(paths, merged.len());
        assert!(merged["src/a.txt"].len() == 2, "{merged:?}");
        // Its digest, computed once and then remembered, is the listing's.
        for _ in 0..2 {
            assert_eq!(
                context_listing_digest(steps.iter()),
                (Digest::of(&expected), merged.len())
            );
        }
        // Another selection is another listing.
        let other = copy_step(vec![file(b"src/a.txt", 9, 0o644)], BTreeMap::new());
        assert_eq!(
            context_listing_digest(std::iter::once(&other)),
            (Digest::of(&context_listing(std::iter::once(&other)).0), 1)
        );
        let (empty, none) = context_listing(std::iter::empty());
        assert_eq!(empty, b"{}");
        assert_eq!(none, 0);
    }
}
