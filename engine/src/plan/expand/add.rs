//! `add`: what each source is, decided once substituted, and the copy op it becomes.
//!
//! - Local sources are a `copy`'s, with the same op and key, unless a source file is a tar
//!   archive by its content (as Docker decides: plain, gzip, bzip2, xz, and zstd as BuildKit),
//!   in which case the op is [`CopySource::Extract`] naming the archives.
//!   Files inside a copied directory are never extracted, only sources themselves.
//! - A URL is [`CopySource::Url`], keyed by its checksum or, without one, by the digest of
//!   what the resolver downloads now. Offline without a checksum its key is pending.
//! - A git repository is [`CopySource::Git`], keyed by the commit its ref resolves to.

use std::io::Read;
use std::sync::Arc;

use graphbuild_lang::Code;
use graphbuild_lang::ir::{self, Loc};
use graphbuild_lang::platform::Platform;
use graphbuild_lang::subst::Mode;

use super::{Expander, Pending, Vars};
use crate::context::{CopyItem, ItemKind};
use crate::digest::Digest;
use crate::git_source;
use crate::plan::{CopyOp, CopySource};
use crate::resolve::ResolveError;
use crate::state::ImageSettings;

/// Whether the file at `path` is a tar archive: its (decompressed) first block has the
/// `ustar` magic, as Docker's archive detection checks after decompressing (bzip2, xz, gzip,
/// zstd or none). A stream that is not what its magic says reads as "not an archive", as in
/// Docker: the file is copied as it is.
fn is_archive(path: &std::path::Path) -> std::io::Result<bool> {
    let file = std::fs::File::open(path)?;
    let stream = crate::decompress::archive(file).and_then(crate::decompress::decompressed);
    let Ok(stream) = stream else {
        return Ok(false);
    };
    let mut block = Vec::with_capacity(512);
    if stream.take(512).read_to_end(&mut block).is_err() || block.len() < 262 {
        return Ok(false);
    }
    Ok(&block[257..262] == b"ustar")
}

impl Expander<'_> {
    /// The op of an `add`, and whether its key is pending (a source unknown without the
    /// network); `None` after reporting an error.
    pub(super) fn add_op(
        &mut self,
        add: &ir::Add,
        at: Loc,
        vars: &Vars,
        settings: &ImageSettings,
        target: &Platform,
        matrix: &[(String, String)],
    ) -> Result<Option<(CopyOp, bool)>, Pending> {
        if !add.copy.inline.is_empty() {
            return Ok(self
                .copy_op(&add.copy, at, vars, settings, target, matrix)?
                .map(|(op, _)| (op, false)));
        }
        let sources: Vec<String> = add
            .copy
            .sources
            .iter()
            .map(|source| self.substitute(source, Mode::Strict, vars, Some(settings)))
            .collect();
        let remote = |source: &String| {
            let lower = source.to_ascii_lowercase();
            git_source::is_git_url(source)
                || lower.starts_with("http://")
                || lower.starts_with("https://")
        };
        if !sources.iter().any(remote) {
            return self.local_add(add, at, vars, settings, target, matrix, &sources);
        }
        if sources.len() != 1 {
            self.error(
                at,
                Code::Copy,
                "an `add` of a URL or a git repository takes that one source".into(),
                "this add",
                Some("write one `add` per URL or repository".into()),
            );
            return Ok(None);
        }
        let source = sources[0].clone();
        // Destination, owner and mode as a copy has them (a copy of nothing from the context).
        let bare = ir::Copy {
            sources: Vec::new(),
            ..add.copy.clone()
        };
        let Some((mut op, _)) = self.copy_op(&bare, at, vars, settings, target, matrix)? else {
            return Ok(None);
        };
        let (from, pending) = if git_source::is_git_url(&source) {
            match self.git_source(add, &source, target) {
                Some(found) => found,
                None => return Ok(None),
            }
        } else {
            match self.url_source(add, &source, &op.dest, vars, settings, target) {
                Some(found) => found,
                None => return Ok(None),
            }
        };
        op.from = from;
        Ok(Some((op, pending)))
    }

    /// Local sources: a copy, extracting the sources that are archives.
    #[expect(clippy::too_many_arguments, reason = "the expansion state of one step")]
    fn local_add(
        &mut self,
        add: &ir::Add,
        at: Loc,
        vars: &Vars,
        settings: &ImageSettings,
        target: &Platform,
        matrix: &[(String, String)],
        sources: &[String],
    ) -> Result<Option<(CopyOp, bool)>, Pending> {
        for (present, what) in [
            (add.checksum.is_some(), "`checksum` applies to a URL"),
            (
                add.keep_git_dir,
                "`keep-git-dir` applies to a git repository",
            ),
        ] {
            if present {
                self.error(
                    at,
                    Code::Copy,
                    format!("{what}, and this `add` copies from the build context"),
                    "this add",
                    Some("remove it, or add from a URL or repository".into()),
                );
                return Ok(None);
            }
        }
        let Some((mut op, _)) = self.copy_op(&add.copy, at, vars, settings, target, matrix)? else {
            return Ok(None);
        };
        let CopySource::Context { items, digest, .. } = &op.from else {
            return Ok(Some((op, false)));
        };
        let mut archives = Vec::new();
        for source in sources {
            let selected = match self.context() {
                Ok(context) => context.select(std::slice::from_ref(source)),
                Err(_) => return Ok(Some((op, false))),
            };
            let Ok(selected) = selected else {
                continue;
            };
            for file in direct_files(&selected) {
                let path =
                    crate::fsutil::resolve_path_in_root(&self.context_dir, &file.rel_src, false);
                let found = path.and_then(|path| is_archive(&path));
                match found {
                    Ok(true) => archives.push(file.rel_src.to_string_lossy().into_owned()),
                    Ok(false) => {}
                    Err(error) => {
                        self.error(
                            at,
                            Code::Copy,
                            format!("cannot read `{}`: {error}", file.rel_src.display()),
                            "this add",
                            None,
                        );
                        return Ok(None);
                    }
                }
            }
        }
        if !archives.is_empty() {
            archives.sort();
            archives.dedup();
            op.from = CopySource::Extract {
                items: items.to_vec(),
                digest: digest.clone(),
                archives,
            };
        }
        Ok(Some((op, false)))
    }

    /// `add "https://…"`: the file's digest (the checksum, or a download's), its name.
    fn url_source(
        &mut self,
        add: &ir::Add,
        url: &str,
        dest: &str,
        vars: &Vars,
        settings: &ImageSettings,
        target: &Platform,
    ) -> Option<(CopySource, bool)> {
        let at = add.copy.dest.at;
        if add.keep_git_dir {
            self.error(
                at,
                Code::Copy,
                "`keep-git-dir` applies to a git repository, not to a download".into(),
                "this add",
                Some("remove it, or name a repository (a URL ending in `.git`)".into()),
            );
            return None;
        }
        let checksum = match &add.checksum {
            None => None,
            Some(text) => {
                let value = self.substitute(text, Mode::Strict, vars, Some(settings));
                match value.parse::<Digest>() {
                    Ok(digest) => Some(digest),
                    Err(_) => {
                        self.error(
                            text.at,
                            Code::Copy,
                            format!("`{value}` is not a sha256 checksum"),
                            "this checksum",
                            Some("write checksum=\"sha256:\" and the 64 lowercase hex digits of the file's sha256".into()),
                        );
                        return None;
                    }
                }
            }
        };
        // `.` and `..` name directories (`ADD https://… .` adds into the working directory).
        let last = dest.rsplit('/').next().unwrap_or("");
        let name = if dest.ends_with('/') || last == "." || last == ".." {
            crate::fetch::file_name(url)
        } else {
            Some(last.to_string())
        };
        let Some(name) = name.filter(|name| !name.is_empty()) else {
            self.error(
                at,
                Code::Copy,
                format!(
                    "cannot tell the file's name from `{}`",
                    crate::fetch::redact(url)
                ),
                "this destination",
                Some("name the file: write a destination that does not end in `/`".into()),
            );
            return None;
        };
        let (digest, unresolved) = match self.options.resolver.fetch_url(url, checksum, target) {
            Ok(digest) => (digest.to_string(), None),
            Err(ResolveError::Unresolved(unresolved)) => (
                format!("pending {}", crate::fetch::redact(url)),
                Some(Arc::from(unresolved)),
            ),
            Err(error) => {
                let help = error.help();
                self.error(
                    add.copy.sources[0].at,
                    error.code(),
                    error.to_string(),
                    "this URL",
                    Some(help),
                );
                return None;
            }
        };
        let pending = unresolved.is_some();
        Some((
            CopySource::Url {
                url: url.to_string(),
                digest,
                name,
                unresolved,
            },
            pending,
        ))
    }

    /// `add "…repo.git#REF:SUBDIR"`: the commit REF resolves to.
    fn git_source(
        &mut self,
        add: &ir::Add,
        source: &str,
        target: &Platform,
    ) -> Option<(CopySource, bool)> {
        let at = add.copy.sources[0].at;
        if add.checksum.is_some() {
            self.error(
                at,
                Code::Copy,
                "`checksum` applies to a download, not to a git repository".into(),
                "this repository",
                Some("pin the repository by a full commit hash after `#` instead".into()),
            );
            return None;
        }
        let (url, reference, subdir) = git_source::split_fragment(source);
        let subdir = subdir.trim_matches('/').to_string();
        let (commit, unresolved) = match self.options.resolver.resolve_git(url, reference, target) {
            Ok(commit) => (commit, None),
            Err(ResolveError::Unresolved(unresolved)) => (
                format!("pending {}", crate::fetch::redact(source)),
                Some(Arc::from(unresolved)),
            ),
            Err(error) => {
                let help = error.help();
                self.error(
                    at,
                    error.code(),
                    error.to_string(),
                    "this repository",
                    Some(help),
                );
                return None;
            }
        };
        let pending = unresolved.is_some();
        Some((
            CopySource::Git {
                url: source.to_string(),
                commit,
                subdir,
                keep_git_dir: add.keep_git_dir,
                unresolved,
            },
            pending,
        ))
    }
}

/// The files of a selection that are sources themselves (a file named, or matched by a glob),
/// not files inside a directory the selection copies.
fn direct_files(selected: &[CopyItem]) -> Vec<&CopyItem> {
    let directories: Vec<&std::path::Path> = selected
        .iter()
        .filter(|item| matches!(item.kind, ItemKind::Dir { .. }))
        .map(|item| item.rel_src.as_path())
        .collect();
    selected
        .iter()
        .filter(|item| matches!(item.kind, ItemKind::File { .. }))
        .filter(|item| {
            !directories
                .iter()
                .any(|dir| dir.as_os_str().is_empty() || item.rel_src.starts_with(dir))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::path::PathBuf;

    use super::*;

    fn item(rel_src: &str, kind: ItemKind) -> CopyItem {
        CopyItem {
            rel_src: PathBuf::from(rel_src),
            rel_dest: PathBuf::new(),
            kind,
        }
    }

    #[test]
    fn only_sources_themselves_are_extracted() {
        let file = || ItemKind::File {
            digest: [0; 32],
            size: 1,
            mode: 0o644,
        };
        let selected = vec![
            item("a.tar", file()),
            item("dir", ItemKind::Dir { mode: 0o755 }),
            item("dir/inner.tar", file()),
            item("b.tgz", file()),
        ];
        let direct: Vec<_> = direct_files(&selected)
            .iter()
            .map(|item| item.rel_src.display().to_string())
            .collect();
        assert_eq!(direct, ["a.tar", "b.tgz"]);
        // A copy of the whole context extracts nothing inside it.
        let whole = vec![
            item("", ItemKind::Dir { mode: 0o755 }),
            item("c.tar", file()),
        ];
        assert!(direct_files(&whole).is_empty());
    }

    #[test]
    fn archives_are_recognized_by_content_not_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_ustar();
        header.set_size(3);
        header.set_mode(0o644);
        builder
            .append_data(&mut header, "x.txt", &b"abc"[..])
            .unwrap();
        let tar = builder.into_inner().unwrap();
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gzip.write_all(&tar).unwrap();
        let mut not_tar = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        not_tar.write_all(&[b'x'; 600]).unwrap();
        for (name, bytes, expected) in [
            ("plain.bin", tar.clone(), true),
            ("named.txt", gzip.finish().unwrap(), true),
            ("fake.tar.gz", not_tar.finish().unwrap(), false),
            ("short.tar", b"tiny".to_vec(), false),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            assert_eq!(is_archive(&path).unwrap(), expected, "{name}");
        }
    }
}
