//! The build context: one walk, one hash per file, and Docker's COPY source selection.
//!
//! About 1,000 lines of code (the walk itself is in `context/walk.rs`); the rest are tests of
//! Docker's source-selection rules.
//!
//! # Scanning
//!
//! [`Context::scan`] walks the context directory once (symlinks are not followed), applying the
//! `.dockerignore` at its root: excluded paths and the `.dockerignore` file itself are invisible
//! to every copy, exactly as if they did not exist. An excluded directory is not even entered,
//! unless an exception (`!pattern`) could re-include something inside it. Regular files are
//! hashed with blake3 in parallel (rayon); sockets, FIFOs and devices are skipped.
//!
//! # The stat cache
//!
//! With a [`Store`], the scan keeps a stat cache per context directory (the store's
//! `contexts/<blake3 of the absolute path>`): for every file, (size, mtime ns, ctime ns, inode,
//! mode) → blake3. A file whose stat matches is not read again, so an unchanged tree costs one
//! walk and one `lstat` per file. ctime changes on every write, rename and chmod and cannot be
//! set by tools, which makes the tuple a safe witness. Files modified in the two seconds before
//! a scan are not recorded (the "racy git" problem: a write within the timestamp granularity
//! after hashing would go unnoticed); they are simply hashed again next time.
//!
//! # Selecting sources (Docker COPY semantics)
//!
//! [`Context::select`] turns COPY sources into [`CopyItem`]s. A source is relative to the
//! context root (a leading `/` or `./` is allowed, a `..` that leaves the context is an error);
//! a directory source copies its *contents* (its own entry comes first with an empty
//! `rel_dest`, so the copy knows the destination is a directory); a file source copies the
//! file under its name; a symlink source is followed inside the context, as Docker does, and
//! copied as a symlink when it points nowhere inside it. Globs (`*`, `?`, `[…]`, `**`) may
//! match several paths, each copied under its base name. Inside a copied directory, symlinks
//! are copied as symlinks and never followed. No match is an error that names the source and
//! suggests near names (or says the path is excluded by `.dockerignore`).
//!
//! [`select_in_tree`] does the same in another stage's filesystem, resolving every path with
//! [`fsutil::resolve_in_root`] so the stage's symlinks cannot point the copy outside it.
//!
//! [`items_digest`] hashes a selection canonically for cache keys.
//!
//! # File names that are not UTF-8
//!
//! Paths are matched as text (their lossy UTF-8 form), but every entry whose name is not
//! UTF-8 keeps its real bytes: it is hashed, selected and copied under its byte name, and
//! [`CopyItem`]s carry such paths as a byte array in JSON. (Two names that differ only in
//! their invalid bytes look the same to patterns; the later one in the walk wins.)

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub(crate) use crate::copy::CopyError;
use crate::dockerignore::{DockerIgnore, DockerIgnoreError, Glob, go_clean};
use crate::fsutil;
use crate::store::Store;

mod walk;

/// One entry a COPY writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyItem {
    /// Relative to the source root (the context, or the stage's root filesystem).
    #[serde(with = "byte_path")]
    pub rel_src: PathBuf,
    /// Relative to the destination; empty for the directory a directory source stands for.
    #[serde(with = "byte_path")]
    pub rel_dest: PathBuf,
    pub kind: ItemKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ItemKind {
    /// `digest` is the blake3 of the content (zero when selected by [`select_in_tree`]).
    File {
        digest: [u8; 32],
        size: u64,
        mode: u32,
    },
    Dir {
        mode: u32,
    },
    Symlink {
        #[serde(with = "byte_path")]
        target: PathBuf,
    },
}

/// A path in JSON: a string when it is UTF-8, else an array of its bytes.
mod byte_path {
    use std::ffi::OsString;
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    use std::path::{Path, PathBuf};

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(path: &Path, serializer: S) -> Result<S::Ok, S::Error> {
        match path.to_str() {
            Some(text) => serializer.serialize_str(text),
            None => serializer.collect_seq(path.as_os_str().as_bytes()),
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Text(String),
        Bytes(Vec<u8>),
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<PathBuf, D::Error> {
        Ok(match Repr::deserialize(deserializer)? {
            Repr::Text(text) => PathBuf::from(text),
            Repr::Bytes(bytes) => PathBuf::from(OsString::from_vec(bytes)),
        })
    }
}

/// Errors scanning a context.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub(crate) enum ContextError {
    #[error("the build context {} is not a directory", path.display())]
    #[diagnostic(
        code(graphbuild::context::not_a_directory),
        help("pass an existing directory as the context")
    )]
    NotADirectory { path: PathBuf },
    #[error("cannot {action} {} in the build context: {source}", path.display())]
    #[diagnostic(code(graphbuild::context::io))]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    #[diagnostic(transparent)]
    DockerIgnore(#[from] DockerIgnoreError),
}

/// What a scan did, for progress output and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ScanStats {
    pub files: usize,
    /// Files read and hashed.
    pub hashed: usize,
    /// Files whose hash came from the stat cache.
    pub cached: usize,
}

/// A scanned build context.
#[derive(Debug, Clone)]
pub(crate) struct Context {
    root: PathBuf,
    root_mode: u32,
    /// Visible entries by `/`-separated relative path (the root itself is not in it).
    entries: BTreeMap<String, ItemKind>,
    /// The real relative path of the entries whose path is not UTF-8, by their key.
    raw_paths: HashMap<String, PathBuf>,
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "what the scan did, read by the stat-cache tests")
    )]
    stats: ScanStats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Stat {
    size: u64,
    mtime: i64,
    ctime: i64,
    ino: u64,
    mode: u32,
}

impl Stat {
    /// The same fields from an `lstat` result.
    fn of_stat(stat: &libc::stat) -> Stat {
        Stat {
            size: stat.st_size as u64,
            mtime: stat
                .st_mtime
                .saturating_mul(1_000_000_000)
                .saturating_add(stat.st_mtime_nsec),
            ctime: stat
                .st_ctime
                .saturating_mul(1_000_000_000)
                .saturating_add(stat.st_ctime_nsec),
            ino: stat.st_ino,
            mode: stat.st_mode,
        }
    }
}

/// What the last scan knew of each file: its stat and content digest. Stored as a compact
/// binary list (a 100,000-file context's cache is read on every build: JSON with a hex string
/// per file cost more to parse and free than the scan's own work).
/// A file the stat cache knows: its path, stat and content digest.
type CachedFile<'a> = (Cow<'a, str>, Stat, [u8; 32]);

#[derive(Debug, Default)]
struct StatCache<'a> {
    /// Sorted by path, each path once. Paths are borrowed from the cache file's bytes when
    /// read (no allocation per file), and a scan looks its files up in order, as a merge of
    /// two sorted lists (no hashing per file).
    files: Vec<CachedFile<'a>>,
}

const STAT_CACHE_MAGIC: &[u8] = b"graphbuild-stat-cache-2\n";

impl<'a> StatCache<'a> {
    fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(STAT_CACHE_MAGIC.len() + 8 + self.files.len() * 120);
        bytes.extend_from_slice(STAT_CACHE_MAGIC);
        bytes.extend_from_slice(&(self.files.len() as u64).to_le_bytes());
        for (rel, stat, digest) in &self.files {
            bytes.extend_from_slice(&(rel.len() as u32).to_le_bytes());
            bytes.extend_from_slice(rel.as_bytes());
            bytes.extend_from_slice(&stat.size.to_le_bytes());
            bytes.extend_from_slice(&stat.mtime.to_le_bytes());
            bytes.extend_from_slice(&stat.ctime.to_le_bytes());
            bytes.extend_from_slice(&stat.ino.to_le_bytes());
            bytes.extend_from_slice(&stat.mode.to_le_bytes());
            bytes.extend_from_slice(digest);
        }
        bytes
    }

    /// The cache in `bytes`; `None` for anything else (an older format, a truncated file).
    /// Sorted by path (a cache is written sorted; one that is not is sorted here).
    fn decode(bytes: &'a [u8]) -> Option<StatCache<'a>> {
        let mut rest = bytes.strip_prefix(STAT_CACHE_MAGIC)?;
        let mut take = |count: usize| -> Option<&'a [u8]> {
            let (head, tail) = (rest.get(..count)?, rest.get(count..)?);
            rest = tail;
            Some(head)
        };
        let count = u64::from_le_bytes(take(8)?.try_into().ok()?);
        let mut files = Vec::with_capacity(count.min(1 << 24) as usize);
        for _ in 0..count {
            let length = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
            let rel = Cow::Borrowed(std::str::from_utf8(take(length)?).ok()?);
            let stat = Stat {
                size: u64::from_le_bytes(take(8)?.try_into().ok()?),
                mtime: i64::from_le_bytes(take(8)?.try_into().ok()?),
                ctime: i64::from_le_bytes(take(8)?.try_into().ok()?),
                ino: u64::from_le_bytes(take(8)?.try_into().ok()?),
                mode: u32::from_le_bytes(take(4)?.try_into().ok()?),
            };
            let digest: [u8; 32] = take(32)?.try_into().ok()?;
            files.push((rel, stat, digest));
        }
        if !files.is_sorted_by(|a, b| a.0.as_bytes() < b.0.as_bytes()) {
            files.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            files.dedup_by(|a, b| a.0 == b.0);
        }
        take(1).is_none().then_some(StatCache { files })
    }
}

impl Context {
    /// Walk and hash the context at `dir`; see the module documentation.
    pub(crate) fn scan(dir: &Path, stat_cache: Option<&Store>) -> Result<Context, ContextError> {
        let io_error = |action: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source: io::Error| ContextError::Io {
                action,
                path,
                source,
            }
        };
        let scan_start = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(i64::MAX);
        let root = dir
            .canonicalize()
            .map_err(|_| ContextError::NotADirectory {
                path: dir.to_path_buf(),
            })?;
        let root_metadata = std::fs::metadata(&root).map_err(io_error("read", &root))?;
        if !root_metadata.is_dir() {
            return Err(ContextError::NotADirectory {
                path: dir.to_path_buf(),
            });
        }
        let ignore_path = root.join(".dockerignore");
        let ignore = match std::fs::symlink_metadata(&ignore_path) {
            Ok(metadata) if metadata.is_file() => {
                let text = std::fs::read_to_string(&ignore_path)
                    .map_err(io_error("read", &ignore_path))?;
                DockerIgnore::parse(&text)?
            }
            _ => DockerIgnore::default(),
        };

        let mut entries: Vec<(String, ItemKind)> = Vec::new();
        // Excluded directories walked only because an exception may re-include inside them.
        let mut excluded_dirs: BTreeMap<String, u32> = BTreeMap::new();
        let mut files: Vec<(String, Stat)> = Vec::new();
        let mut raw_paths: HashMap<String, PathBuf> = HashMap::new();
        for found in walk::walk(&root, &ignore)? {
            let walk::Found { rel, raw, kind } = found;
            if let Some(raw) = raw {
                raw_paths.insert(rel.clone(), raw);
            }
            match kind {
                walk::FoundKind::Dir {
                    mode,
                    excluded: true,
                } => {
                    excluded_dirs.insert(rel, mode);
                }
                walk::FoundKind::Dir { mode, .. } => entries.push((rel, ItemKind::Dir { mode })),
                walk::FoundKind::Symlink => {
                    let path = root.join(raw_paths.get(&rel).map_or(Path::new(&rel), |raw| raw));
                    let target =
                        std::fs::read_link(&path).map_err(io_error("read the symlink", &path))?;
                    entries.push((rel, ItemKind::Symlink { target }));
                }
                walk::FoundKind::File(stat) => files.push((rel, stat)),
            }
        }
        // An excluded directory that holds re-included entries is still their parent.
        let visible_parents: Vec<String> = if excluded_dirs.is_empty() {
            Vec::new()
        } else {
            entries
                .iter()
                .map(|(rel, _)| rel)
                .chain(files.iter().map(|(rel, _)| rel))
                .flat_map(|rel| parents(rel))
                .filter(|parent| excluded_dirs.contains_key(parent))
                .collect()
        };
        for parent in visible_parents {
            if let Some(mode) = excluded_dirs.get(&parent) {
                entries.push((parent, ItemKind::Dir { mode: *mode }));
            }
        }

        let cache_id = {
            let mut hasher = blake3::Hasher::new();
            hasher.update(b"graphbuild context stat cache\0");
            hasher.update(fsutil::path_bytes(&root));
            *hasher.finalize().as_bytes()
        };
        let cache_bytes = stat_cache.and_then(|store| store.read_context_cache(&cache_id));
        let previous: StatCache<'_> = cache_bytes
            .as_deref()
            .and_then(StatCache::decode)
            .unwrap_or_default();
        // Each file with what the cache knew of it: both lists sorted by path, merged.
        files.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        let mut known = previous.files.iter().peekable();
        let files: Vec<(String, Stat, Option<&CachedFile<'_>>)> = files
            .into_iter()
            .map(|(rel, stat)| {
                while known
                    .next_if(|cached| cached.0.as_bytes() < rel.as_bytes())
                    .is_some()
                {}
                let cached = known.next_if(|cached| cached.0 == rel.as_str());
                (rel, stat, cached)
            })
            .collect();
        let hashed: Vec<(String, Stat, [u8; 32], bool)> = files
            .into_par_iter()
            .map(|(rel, stat, cached)| {
                if let Some((_, cached_stat, digest)) = cached
                    && *cached_stat == stat
                {
                    return Ok((rel, stat, *digest, false));
                }
                let path = match raw_paths.get(&rel) {
                    Some(real) => root.join(real),
                    None => root.join(&rel),
                };
                let file = std::fs::File::open(&path).map_err(io_error("open", &path))?;
                let mut hasher = blake3::Hasher::new();
                hasher
                    .update_reader(file)
                    .map_err(io_error("read", &path))?;
                Ok((rel, stat, *hasher.finalize().as_bytes(), true))
            })
            .collect::<Result<_, ContextError>>()?;

        let racy = |stat: &Stat| {
            stat.mtime >= scan_start.saturating_sub(2_000_000_000)
                || stat.ctime >= scan_start.saturating_sub(2_000_000_000)
        };
        let stats = ScanStats {
            files: hashed.len(),
            hashed: hashed.iter().filter(|file| file.3).count(),
            cached: hashed.iter().filter(|file| !file.3).count(),
        };
        if let Some(store) = stat_cache {
            // The next cache holds the files that are not racy. It is the previous one when
            // there are as many and none of them was hashed again (a file found in the cache
            // has the same stat and digest there): then nothing is written, nor built.
            let kept = hashed.iter().filter(|file| !racy(&file.1));
            let changed =
                kept.clone().count() != previous.files.len() || kept.clone().any(|file| file.3);
            if changed {
                // In path order, as `files` was sorted.
                let next_cache = StatCache {
                    files: kept
                        .map(|(rel, stat, digest, _)| (Cow::Borrowed(rel.as_str()), *stat, *digest))
                        .collect(),
                };
                // Losing the stat cache only costs a re-hash next time.
                let _ = store.write_context_cache(&cache_id, &next_cache.encode());
            }
        }
        drop(previous);
        entries.extend(hashed.into_iter().map(|(rel, stat, digest, _)| {
            (
                rel,
                ItemKind::File {
                    digest,
                    size: stat.size,
                    mode: stat.mode & 0o7777,
                },
            )
        }));
        // Sorted once, in bulk (a path found twice keeps its last entry, as inserting would).
        let entries: BTreeMap<String, ItemKind> = entries.into_iter().collect();
        Ok(Context {
            root,
            root_mode: root_metadata.permissions().mode() & 0o7777,
            entries,
            raw_paths,
            stats,
        })
    }

    /// The context directory (canonical).
    #[cfg(test)]
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    #[cfg(test)]
    pub(crate) fn stats(&self) -> ScanStats {
        self.stats
    }

    /// Every visible entry, by relative path.
    #[cfg(test)]
    pub(crate) fn entries(&self) -> impl Iterator<Item = (&str, &ItemKind)> {
        self.entries
            .iter()
            .map(|(path, kind)| (path.as_str(), kind))
    }

    /// Select COPY sources; see the module documentation.
    pub(crate) fn select(&self, sources: &[String]) -> Result<Vec<CopyItem>, CopyError> {
        let mut items = Vec::new();
        for source in sources {
            let cleaned = clean_source(source, true)?;
            let matches: Vec<String> = if has_glob(&cleaned) {
                let pattern = compile_path_glob(source, &cleaned)?;
                self.entries
                    .keys()
                    .filter(|path| pattern.matches(path))
                    .cloned()
                    .collect()
            } else {
                match self.resolve(&cleaned, true) {
                    Some(resolved) => vec![resolved],
                    None if self.entries.contains_key(&cleaned) => vec![cleaned.clone()],
                    None => Vec::new(),
                }
            };
            if matches.is_empty() {
                return Err(self.not_found(source, &cleaned));
            }
            for matched in matches {
                let name_path = if has_glob(&cleaned) {
                    matched.clone()
                } else {
                    cleaned.clone()
                };
                let name = name_path.rsplit('/').next().unwrap_or("").to_string();
                // Follow a symlink source inside the context; keep it if it leads nowhere.
                let resolved = self
                    .resolve(&matched, true)
                    .filter(|path| path.is_empty() || self.entries.contains_key(path));
                let resolved = resolved.unwrap_or(matched);
                self.push_items(&resolved, &name, &mut items);
            }
        }
        Ok(items)
    }

    /// The mode of a directory of the context by its path (`""`: the context itself).
    pub(crate) fn dir_mode(&self, path: &str) -> Option<u32> {
        if path.is_empty() {
            return Some(self.root_mode);
        }
        match self.entries.get(path) {
            Some(ItemKind::Dir { mode }) => Some(*mode),
            _ => None,
        }
    }

    fn push_items(&self, path: &str, name: &str, items: &mut Vec<CopyItem>) {
        let kind = if path.is_empty() {
            Some(ItemKind::Dir {
                mode: self.root_mode,
            })
        } else {
            self.entries.get(path).cloned()
        };
        match kind {
            Some(ItemKind::Dir { mode }) => {
                items.push(CopyItem {
                    rel_src: PathBuf::from(path),
                    rel_dest: PathBuf::new(),
                    kind: ItemKind::Dir { mode },
                });
                let prefix = if path.is_empty() {
                    String::new()
                } else {
                    format!("{path}/")
                };
                let real_parent = self.real(path);
                for (child, kind) in self.entries.range(prefix.clone()..) {
                    let Some(rest) = child.strip_prefix(&prefix) else {
                        break;
                    };
                    let rel_src = self.real(child);
                    let rel_dest = match self.raw_paths.get(child) {
                        Some(real) => real
                            .strip_prefix(&real_parent)
                            .map(Path::to_path_buf)
                            .unwrap_or_else(|_| PathBuf::from(rest)),
                        None => PathBuf::from(rest),
                    };
                    items.push(CopyItem {
                        rel_src,
                        rel_dest,
                        kind: kind.clone(),
                    });
                }
            }
            Some(kind) => {
                let rel_src = self.real(path);
                // A name taken from the entry itself (a glob match) keeps its real bytes.
                let rel_dest = match self.raw_paths.get(path).and_then(|real| real.file_name()) {
                    Some(real_name) if real_name.to_string_lossy() == name => {
                        PathBuf::from(real_name)
                    }
                    _ => PathBuf::from(name),
                };
                items.push(CopyItem {
                    rel_src,
                    rel_dest,
                    kind,
                })
            }
            None => {}
        }
    }

    /// The real relative path of an entry (its key, unless its name is not UTF-8).
    fn real(&self, key: &str) -> PathBuf {
        self.raw_paths
            .get(key)
            .cloned()
            .unwrap_or_else(|| PathBuf::from(key))
    }

    /// Resolve a relative path through the context's symlinks, as if the context were `/`.
    /// `None` when a component is missing or the links loop.
    fn resolve(&self, path: &str, follow_last: bool) -> Option<String> {
        let mut pending: Vec<String> = path
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .rev()
            .map(String::from)
            .collect();
        let mut resolved: Vec<String> = Vec::new();
        let mut links = 0;
        while let Some(component) = pending.pop() {
            if component == ".." {
                resolved.pop();
                continue;
            }
            resolved.push(component);
            let current = resolved.join("/");
            match self.entries.get(&current)? {
                ItemKind::Symlink { target } if !pending.is_empty() || follow_last => {
                    links += 1;
                    if links > fsutil::MAX_SYMLINKS {
                        return None;
                    }
                    resolved.pop();
                    let target = target.to_string_lossy();
                    if target.starts_with('/') {
                        resolved.clear();
                    }
                    pending.extend(
                        target
                            .split('/')
                            .filter(|c| !c.is_empty() && *c != ".")
                            .rev()
                            .map(String::from),
                    );
                }
                _ => {}
            }
        }
        Some(resolved.join("/"))
    }

    fn not_found(&self, source: &str, cleaned: &str) -> CopyError {
        if self.root.join(cleaned).symlink_metadata().is_ok() {
            return CopyError::SourceNotFound {
                name: source.to_string(),
                help: format!(
                    "`{cleaned}` exists but is excluded by .dockerignore; add `!{cleaned}` to it to copy it"
                ),
            };
        }
        let mut candidates: Vec<(usize, &str)> = self
            .entries
            .keys()
            .map(|path| (edit_distance(cleaned, path), path.as_str()))
            .filter(|(distance, path)| *distance <= (cleaned.len().max(path.len()) / 3).max(2))
            .collect();
        candidates.sort();
        let names: Vec<String> = candidates
            .iter()
            .take(3)
            .map(|(_, path)| format!("`{path}`"))
            .collect();
        let help = if names.is_empty() {
            format!(
                "paths are relative to the build context {}",
                self.root.display()
            )
        } else {
            format!("did you mean {}?", names.join(" or "))
        };
        CopyError::SourceNotFound {
            name: source.to_string(),
            help,
        }
    }
}

/// Select COPY sources in another stage's root filesystem (`from=`): the same semantics as
/// [`Context::select`], without `.dockerignore` and with zeroed digests. Every path is
/// resolved with [`fsutil::resolve_in_root`], so `rel_src` never goes through a symlink.
pub(crate) fn select_in_tree(root: &Path, sources: &[String]) -> Result<Vec<CopyItem>, CopyError> {
    let io_error = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source: io::Error| CopyError::Io {
            action,
            path,
            source,
        }
    };
    let mut items = Vec::new();
    for source in sources {
        let cleaned = clean_source(source, false)?;
        let matches: Vec<String> = if has_glob(&cleaned) {
            let mut found = Vec::new();
            expand_glob(root, source, &cleaned, &mut found)?;
            found
        } else {
            vec![cleaned.clone()]
        };
        let mut matched_any = false;
        for matched in matches {
            let name = matched.rsplit('/').next().unwrap_or("").to_string();
            let followed = fsutil::resolve_in_root(root, &matched, true)
                .map_err(io_error("resolve", &root.join(&matched)))?;
            let host = match std::fs::symlink_metadata(&followed) {
                Ok(_) => followed,
                // A dangling symlink: copy the link itself.
                Err(_) => fsutil::resolve_in_root(root, &matched, false)
                    .map_err(io_error("resolve", &root.join(&matched)))?,
            };
            let Ok(metadata) = std::fs::symlink_metadata(&host) else {
                continue;
            };
            matched_any = true;
            let rel_src = host
                .strip_prefix(root)
                .unwrap_or(Path::new(""))
                .to_path_buf();
            if metadata.is_dir() {
                items.push(CopyItem {
                    rel_src: rel_src.clone(),
                    rel_dest: PathBuf::new(),
                    kind: ItemKind::Dir {
                        mode: metadata.permissions().mode() & 0o7777,
                    },
                });
                for entry in walkdir::WalkDir::new(&host)
                    .follow_links(false)
                    .min_depth(1)
                    .sort_by_file_name()
                {
                    let entry = entry.map_err(|error| CopyError::Io {
                        action: "walk",
                        path: error.path().unwrap_or(&host).to_path_buf(),
                        source: error.into(),
                    })?;
                    let rest = entry
                        .path()
                        .strip_prefix(&host)
                        .unwrap_or(entry.path())
                        .to_path_buf();
                    if let Some(kind) = tree_kind(entry.path())? {
                        items.push(CopyItem {
                            rel_src: rel_src.join(&rest),
                            rel_dest: rest,
                            kind,
                        });
                    }
                }
            } else if let Some(kind) = tree_kind(&host)? {
                items.push(CopyItem {
                    rel_src,
                    rel_dest: PathBuf::from(name),
                    kind,
                });
            }
        }
        if !matched_any {
            return Err(CopyError::SourceNotFound {
                name: source.to_string(),
                help: "the path does not exist in the source stage's filesystem".into(),
            });
        }
    }
    Ok(items)
}

fn tree_kind(path: &Path) -> Result<Option<ItemKind>, CopyError> {
    let metadata = std::fs::symlink_metadata(path).map_err(|source| CopyError::Io {
        action: "stat",
        path: path.to_path_buf(),
        source,
    })?;
    let mode = metadata.permissions().mode() & 0o7777;
    let file_type = metadata.file_type();
    Ok(if file_type.is_dir() {
        Some(ItemKind::Dir { mode })
    } else if file_type.is_symlink() {
        let target = std::fs::read_link(path).map_err(|source| CopyError::Io {
            action: "read the symlink",
            path: path.to_path_buf(),
            source,
        })?;
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

/// Expand a glob in a real tree, component by component, resolving inside `root`.
fn expand_glob(
    root: &Path,
    source: &str,
    cleaned: &str,
    found: &mut Vec<String>,
) -> Result<(), CopyError> {
    let pattern = compile_path_glob(source, cleaned)?;
    // Walk from the longest literal prefix; the stage tree may be large.
    let literal: Vec<&str> = cleaned
        .split('/')
        .take_while(|component| !has_glob(component))
        .collect();
    let base = literal.join("/");
    let host = fsutil::resolve_in_root(root, &base, true).map_err(|source| CopyError::Io {
        action: "resolve",
        path: root.join(&base),
        source,
    })?;
    let depth = cleaned.split('/').count() - literal.len();
    let max_depth = if cleaned.contains("**") {
        usize::MAX
    } else {
        depth
    };
    for entry in walkdir::WalkDir::new(&host)
        .follow_links(false)
        .min_depth(1)
        .max_depth(max_depth)
        .sort_by_file_name()
    {
        let Ok(entry) = entry else { continue };
        let rest = entry
            .path()
            .strip_prefix(&host)
            .unwrap_or(entry.path())
            .to_string_lossy()
            .into_owned();
        let candidate = if base.is_empty() {
            rest
        } else {
            format!("{base}/{rest}")
        };
        if pattern.matches(&candidate) {
            found.push(candidate);
        }
    }
    Ok(())
}

/// A COPY source pattern matched against whole `/`-separated paths: `*`, `?` and classes stay
/// inside one component, `**` spans any number of them.
struct PathGlob {
    components: Vec<Option<Glob>>,
}

impl PathGlob {
    fn matches(&self, path: &str) -> bool {
        let parts: Vec<&str> = path.split('/').collect();
        fn go(pattern: &[Option<Glob>], parts: &[&str]) -> bool {
            match pattern.split_first() {
                None => parts.is_empty(),
                Some((None, rest)) => (0..=parts.len()).any(|skip| go(rest, &parts[skip..])),
                Some((Some(glob), rest)) => parts
                    .split_first()
                    .is_some_and(|(first, others)| glob.matches(first) && go(rest, others)),
            }
        }
        go(&self.components, &parts)
    }
}

fn compile_path_glob(source: &str, cleaned: &str) -> Result<PathGlob, CopyError> {
    let components = cleaned
        .split('/')
        .map(|component| {
            if component == "**" {
                Ok(None)
            } else {
                Glob::new_component(component).map(Some).map_err(|error| {
                    CopyError::InvalidPattern {
                        name: source.to_string(),
                        reason: error.0,
                    }
                })
            }
        })
        .collect::<Result<_, _>>()?;
    Ok(PathGlob { components })
}

pub(crate) fn has_glob(path: &str) -> bool {
    path.contains(['*', '?', '['])
}

/// Normalize a COPY source to a relative `/`-separated path (`""` is the root).
pub(crate) fn clean_source(source: &str, strict: bool) -> Result<String, CopyError> {
    let relative = go_clean(source.trim_start_matches('/'));
    if strict && (relative == ".." || relative.starts_with("../")) {
        return Err(CopyError::OutsideContext {
            name: source.to_string(),
        });
    }
    Ok(clean_source_in_root(source))
}

/// [`clean_source`] where `..` stops at the root, as in a stage's filesystem: never an error.
pub(crate) fn clean_source_in_root(source: &str) -> String {
    let relative = go_clean(source.trim_start_matches('/'));
    if relative == ".." || relative.starts_with("../") {
        return go_clean(&format!("/{source}"))
            .trim_start_matches('/')
            .to_string();
    }
    if relative == "." {
        String::new()
    } else {
        relative
    }
}

/// A copy's `exclude` pattern that does not compile. Patterns are checked when the build is
/// planned, so this is met only by a plan changed under the build.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, miette::Diagnostic)]
#[error("`exclude` pattern `{pattern}`: {reason}")]
#[diagnostic(code(graphbuild::copy::select))]
pub(crate) struct ExcludeError {
    pub(crate) pattern: String,
    /// What the pattern compiler says is wrong with it.
    pub(crate) reason: String,
}

/// Every proper ancestor of a relative path: `a/b/c` → `a`, `a/b`.
fn parents(rel: &str) -> Vec<String> {
    rel.match_indices('/')
        .map(|(index, _)| rel[..index].to_string())
        .collect()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

/// A canonical blake3 over a selection, for cache keys: paths, kinds, content digests, modes
/// and symlink targets, in order.
pub(crate) fn items_digest(items: &[CopyItem]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"graphbuild copy items v1\0");
    hasher.update(&(items.len() as u64).to_le_bytes());
    // The fields are gathered in a buffer and hashed 64 KiB at a time: the same bytes in the
    // same order (the same digest) without a hasher call for every few bytes of 100,000 items.
    let mut buffer: Vec<u8> = Vec::with_capacity(1 << 16);
    let mut field = |bytes: &[u8]| {
        buffer.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        buffer.extend_from_slice(bytes);
        if buffer.len() >= 1 << 16 {
            hasher.update(&buffer);
            buffer.clear();
        }
    };
    for item in items {
        field(fsutil::path_bytes(&item.rel_src));
        field(fsutil::path_bytes(&item.rel_dest));
        match &item.kind {
            ItemKind::File { digest, size, mode } => {
                field(b"file");
                field(digest);
                field(&size.to_le_bytes());
                field(&mode.to_le_bytes());
            }
            ItemKind::Dir { mode } => {
                field(b"dir");
                field(&mode.to_le_bytes());
            }
            ItemKind::Symlink { target } => {
                field(b"symlink");
                field(fsutil::path_bytes(target));
            }
        }
    }
    hasher.update(&buffer);
    *hasher.finalize().as_bytes()
}

/// [`exclude`] with a copy's patterns as written (already checked when the build was planned);
/// `items` unchanged when there are none.
pub(crate) fn exclude_patterns(
    items: Vec<CopyItem>,
    patterns: &[String],
) -> Result<Vec<CopyItem>, ExcludeError> {
    if patterns.is_empty() {
        return Ok(items);
    }
    let excluder =
        crate::dockerignore::DockerIgnore::parse(&patterns.join("\n")).map_err(|error| {
            ExcludeError {
                pattern: error.pattern,
                reason: error.reason,
            }
        })?;
    Ok(exclude(items, &excluder))
}

/// `items` without those an `exclude` pattern matches: patterns are relative to each source
/// (a directory source's contents, or a file source's name), and an excluded directory takes
/// everything under it along.
pub(crate) fn exclude(
    items: Vec<CopyItem>,
    excluder: &crate::dockerignore::DockerIgnore,
) -> Vec<CopyItem> {
    items
        .into_iter()
        .filter(|item| {
            let relative = if item.rel_dest.as_os_str().is_empty() {
                match item.rel_src.file_name() {
                    Some(name) => PathBuf::from(name),
                    None => return true,
                }
            } else {
                item.rel_dest.clone()
            };
            let relative = relative.to_string_lossy().into_owned();
            let mut path = relative.as_str();
            // The path itself, then each directory above it.
            loop {
                if excluder.is_excluded(path, true) {
                    return false;
                }
                match path.rfind('/') {
                    Some(slash) => path = &path[..slash],
                    None => return true,
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn context_tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("src/sub")).unwrap();
        std::fs::create_dir_all(root.join("docs")).unwrap();
        std::fs::create_dir_all(root.join("node_modules/pkg")).unwrap();
        std::fs::write(root.join("src/main.go"), b"package main").unwrap();
        std::fs::write(root.join("src/sub/util.go"), b"package sub").unwrap();
        std::fs::write(root.join("go.mod"), b"module x").unwrap();
        std::fs::write(root.join("README.md"), b"readme").unwrap();
        std::fs::write(root.join("docs/a.md"), b"a").unwrap();
        std::fs::write(root.join("docs/keep.md"), b"keep").unwrap();
        std::fs::write(root.join("node_modules/pkg/index.js"), b"js").unwrap();
        std::fs::write(root.join("secret.env"), b"TOKEN=1").unwrap();
        std::fs::set_permissions(root.join("go.mod"), std::fs::Permissions::from_mode(0o640))
            .unwrap();
        symlink("/etc/passwd", root.join("src/passwd-link")).unwrap();
        symlink("src", root.join("src-link")).unwrap();
        std::fs::write(
            root.join(".dockerignore"),
            "node_modules\n*.env\ndocs\n!docs/keep.md\n",
        )
        .unwrap();
        dir
    }

    fn names(items: &[CopyItem]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|item| {
                (
                    item.rel_src.display().to_string(),
                    item.rel_dest.display().to_string(),
                )
            })
            .collect()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn scan_applies_dockerignore_and_hashes_files() {
        let dir = context_tree();
        let context = Context::scan(dir.path(), None).unwrap();
        let paths: Vec<&str> = context.entries().map(|(path, _)| path).collect();
        assert_eq!(
            paths,
            [
                "README.md",
                "docs",
                "docs/keep.md",
                "go.mod",
                "src",
                "src-link",
                "src/main.go",
                "src/passwd-link",
                "src/sub",
                "src/sub/util.go"
            ]
        );
        let go_mod = context
            .entries()
            .find(|(path, _)| *path == "go.mod")
            .unwrap()
            .1
            .clone();
        assert_eq!(
            go_mod,
            ItemKind::File {
                digest: *blake3::hash(b"module x").as_bytes(),
                size: 8,
                mode: 0o640
            }
        );
        assert_eq!(context.stats().files, 5);
    }

    #[test]
    fn the_walk_keeps_byte_names_skips_fifos_and_enters_excluded_dirs_only_for_exceptions() {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let odd_dir = root.join(OsStr::from_bytes(b"d\xff"));
        std::fs::create_dir_all(odd_dir.join("sub")).unwrap();
        std::fs::write(odd_dir.join(OsStr::from_bytes(b"f\xfe")), b"odd").unwrap();
        std::fs::write(odd_dir.join("sub/plain"), b"plain").unwrap();
        std::fs::write(root.join(OsStr::from_bytes(b"g\xfd")), b"top").unwrap();
        nix::unistd::mkfifo(
            &root.join("pipe"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        std::fs::create_dir_all(root.join("gone/deep")).unwrap();
        std::fs::write(root.join("gone/deep/x"), b"x").unwrap();
        std::fs::create_dir_all(root.join("kept/deep")).unwrap();
        std::fs::write(root.join("kept/deep/x"), b"x").unwrap();
        std::fs::write(root.join("kept/deep/y"), b"y").unwrap();
        std::fs::set_permissions(root.join("kept"), std::fs::Permissions::from_mode(0o750))
            .unwrap();
        std::fs::write(root.join(".dockerignore"), "gone\nkept\n!kept/deep/y\n").unwrap();
        let context = Context::scan(root, None).unwrap();
        let paths: Vec<&str> = context.entries().map(|(path, _)| path).collect();
        assert_eq!(
            paths,
            [
                "d\u{fffd}",
                "d\u{fffd}/f\u{fffd}",
                "d\u{fffd}/sub",
                "d\u{fffd}/sub/plain",
                "g\u{fffd}",
                "kept",
                "kept/deep",
                "kept/deep/y"
            ]
        );
        assert_eq!(
            context
                .entries()
                .find(|(path, _)| *path == "kept")
                .unwrap()
                .1,
            &ItemKind::Dir { mode: 0o750 }
        );
        assert_eq!(
            context.real("d\u{fffd}/sub/plain"),
            PathBuf::from(OsStr::from_bytes(b"d\xff/sub/plain"))
        );
        assert_eq!(
            context.real("g\u{fffd}"),
            PathBuf::from(OsStr::from_bytes(b"g\xfd"))
        );
        assert_eq!(context.real("kept/deep/y"), PathBuf::from("kept/deep/y"));
        assert!(matches!(
            context.entries().find(|(path, _)| *path == "d\u{fffd}/f\u{fffd}").unwrap().1,
            ItemKind::File { digest, size: 3, .. } if *digest == *blake3::hash(b"odd").as_bytes()
        ));
    }

    #[test]
    fn the_stat_cache_round_trips_and_refuses_anything_else() {
        let stat = Stat {
            size: 7,
            mtime: -1,
            ctime: 1_700_000_000_000_000_000,
            ino: u64::MAX,
            mode: 0o100644,
        };
        let cache = StatCache {
            files: vec![
                ("a/b.txt".into(), stat, [1u8; 32]),
                ("é".into(), stat, [2u8; 32]),
            ],
        };
        let bytes = cache.encode();
        let back = StatCache::decode(&bytes).unwrap();
        assert_eq!(back.files, cache.files);
        // A cache written in another order (as the previous version wrote it) is sorted.
        let unsorted = StatCache {
            files: vec![
                ("é".into(), stat, [2u8; 32]),
                ("a/b.txt".into(), stat, [1u8; 32]),
            ],
        };
        let back_sorted = unsorted.encode();
        assert_eq!(StatCache::decode(&back_sorted).unwrap().files, cache.files);
        assert!(StatCache::decode(&bytes[..bytes.len() - 1]).is_none());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(StatCache::decode(&longer).is_none());
        // The JSON of the previous version is not a cache: files are hashed again.
        assert!(StatCache::decode(br#"{"version":1,"files":{}}"#).is_none());
    }

    #[test]
    fn the_stat_cache_skips_unchanged_files_and_sees_changes() {
        let dir = context_tree();
        let store_dir = tempfile::tempdir().unwrap();
        let store = Store::open(store_dir.path()).unwrap();
        // Files changed in the last two seconds are "racy" and not cached: wait past that.
        std::thread::sleep(std::time::Duration::from_millis(2100));
        let first = Context::scan(dir.path(), Some(&store)).unwrap();
        assert_eq!(first.stats().hashed, 5);
        let second = Context::scan(dir.path(), Some(&store)).unwrap();
        assert_eq!(
            second.stats(),
            ScanStats {
                files: 5,
                hashed: 0,
                cached: 5
            }
        );
        assert_eq!(
            first.entries().collect::<Vec<_>>(),
            second.entries().collect::<Vec<_>>()
        );
        // Same size, same mtime, different content: ctime still changes.
        std::fs::write(dir.path().join("go.mod"), b"module y").unwrap();
        let third = Context::scan(dir.path(), Some(&store)).unwrap();
        assert_eq!(third.stats().hashed, 1);
        let go_mod = third
            .entries()
            .find(|(path, _)| *path == "go.mod")
            .unwrap()
            .1
            .clone();
        assert!(
            matches!(go_mod, ItemKind::File { digest, .. } if digest == *blake3::hash(b"module y").as_bytes())
        );
    }

    #[test]
    fn select_follows_docker_copy_rules() {
        let dir = context_tree();
        let context = Context::scan(dir.path(), None).unwrap();
        let select = |sources: &[&str]| {
            context.select(&sources.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        // A file: copied under its name.
        assert_eq!(
            names(&select(&["go.mod"]).unwrap()),
            pairs(&[("go.mod", "go.mod")])
        );
        assert_eq!(
            names(&select(&["/go.mod"]).unwrap()),
            pairs(&[("go.mod", "go.mod")])
        );
        assert_eq!(
            names(&select(&["./src/../go.mod"]).unwrap()),
            pairs(&[("go.mod", "go.mod")])
        );
        // A directory: its contents; symlinks inside stay symlinks.
        let items = select(&["src/"]).unwrap();
        assert_eq!(
            names(&items),
            pairs(&[
                ("src", ""),
                ("src/main.go", "main.go"),
                ("src/passwd-link", "passwd-link"),
                ("src/sub", "sub"),
                ("src/sub/util.go", "sub/util.go")
            ])
        );
        assert_eq!(
            items[2].kind,
            ItemKind::Symlink {
                target: PathBuf::from("/etc/passwd")
            }
        );
        // A symlink source to a directory in the context is followed.
        assert_eq!(
            names(&select(&["src-link"]).unwrap())[1],
            ("src/main.go".to_string(), "main.go".to_string())
        );
        // Globs.
        assert_eq!(
            names(&select(&["*.md"]).unwrap()),
            pairs(&[("README.md", "README.md")])
        );
        assert_eq!(
            names(&select(&["**/*.go"]).unwrap()),
            pairs(&[("src/main.go", "main.go"), ("src/sub/util.go", "util.go")])
        );
        assert_eq!(
            names(&select(&["go.mo?", "src/m[a-z]in.go"]).unwrap()),
            pairs(&[("go.mod", "go.mod"), ("src/main.go", "main.go")])
        );
        // The whole context, without what .dockerignore hides.
        let all = names(&select(&["."]).unwrap());
        assert!(all.contains(&("docs/keep.md".into(), "docs/keep.md".into())));
        assert!(!all.iter().any(|(src, _)| src.contains("node_modules")
            || src.ends_with(".env")
            || src == ".dockerignore"));
    }

    #[test]
    fn select_errors_name_the_source_and_help() {
        let dir = context_tree();
        let context = Context::scan(dir.path(), None).unwrap();
        let error = context.select(&["go.mdo".to_string()]).unwrap_err();
        let CopyError::SourceNotFound { name, help } = &error else {
            panic!("{error}")
        };
        assert_eq!(name, "go.mdo");
        assert!(help.contains("`go.mod`"), "{help}");
        let error = context.select(&["secret.env".to_string()]).unwrap_err();
        assert!(
            error_help(&error).contains("excluded by .dockerignore"),
            "{error}"
        );
        let error = context.select(&["../outside".to_string()]).unwrap_err();
        assert!(matches!(error, CopyError::OutsideContext { .. }), "{error}");
        assert!(matches!(
            context.select(&["*.nothing".to_string()]),
            Err(CopyError::SourceNotFound { .. })
        ));
        assert!(matches!(
            context.select(&["[".to_string()]),
            Err(CopyError::InvalidPattern { .. })
        ));
    }

    fn error_help(error: &CopyError) -> String {
        match error {
            CopyError::SourceNotFound { help, .. } => help.clone(),
            other => other.to_string(),
        }
    }

    #[test]
    fn items_digest_changes_with_content_mode_and_path() {
        let item = |digest: u8, mode: u32, path: &str| CopyItem {
            rel_src: PathBuf::from(path),
            rel_dest: PathBuf::from(path),
            kind: ItemKind::File {
                digest: [digest; 32],
                size: 1,
                mode,
            },
        };
        let base = items_digest(&[item(1, 0o644, "a")]);
        assert_eq!(base, items_digest(&[item(1, 0o644, "a")]));
        assert_ne!(base, items_digest(&[item(2, 0o644, "a")]));
        assert_ne!(base, items_digest(&[item(1, 0o755, "a")]));
        assert_ne!(base, items_digest(&[item(1, 0o644, "b")]));
        assert_ne!(base, items_digest(&[]));
    }

    #[test]
    fn items_digest_is_the_digest_of_its_fields_however_they_are_buffered() {
        // The digest as it was computed before buffering: a hasher call per field.
        fn unbuffered(items: &[CopyItem]) -> [u8; 32] {
            let mut hasher = blake3::Hasher::new();
            hasher.update(b"graphbuild copy items v1\0");
            hasher.update(&(items.len() as u64).to_le_bytes());
            let mut field = |bytes: &[u8]| {
                hasher.update(&(bytes.len() as u64).to_le_bytes());
                hasher.update(bytes);
            };
            for item in items {
                field(fsutil::path_bytes(&item.rel_src));
                field(fsutil::path_bytes(&item.rel_dest));
                match &item.kind {
                    ItemKind::File { digest, size, mode } => {
                        field(b"file");
                        field(digest);
                        field(&size.to_le_bytes());
                        field(&mode.to_le_bytes());
                    }
                    ItemKind::Dir { mode } => {
                        field(b"dir");
                        field(&mode.to_le_bytes());
                    }
                    ItemKind::Symlink { target } => {
                        field(b"symlink");
                        field(fsutil::path_bytes(target));
                    }
                }
            }
            *hasher.finalize().as_bytes()
        }
        // Past several 64 KiB buffers, with every kind.
        let items: Vec<CopyItem> = (0..5000u32)
            .map(|index| CopyItem {
                rel_src: PathBuf::from(format!("src/d{}/f{index}.txt", index % 7)),
                rel_dest: PathBuf::from(format!("d{}/f{index}.txt", index % 7)),
                kind: match index % 3 {
                    0 => ItemKind::File {
                        digest: [index as u8; 32],
                        size: u64::from(index),
                        mode: 0o644,
                    },
                    1 => ItemKind::Dir { mode: 0o755 },
                    _ => ItemKind::Symlink {
                        target: PathBuf::from(format!("../t{index}")),
                    },
                },
            })
            .collect();
        for count in [0, 1, 700, 5000] {
            assert_eq!(items_digest(&items[..count]), unbuffered(&items[..count]));
        }
    }

    #[test]
    fn select_in_tree_resolves_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::fs::create_dir_all(root.join("src/out")).unwrap();
        std::fs::write(root.join("usr/bin/app"), b"app").unwrap();
        std::fs::write(root.join("src/out/a.txt"), b"a").unwrap();
        std::fs::write(root.join("src/out/b.txt"), b"b").unwrap();
        symlink("usr/bin", root.join("bin")).unwrap();
        symlink("/etc", root.join("evil")).unwrap();
        symlink("../../../../../etc/passwd", root.join("src/out/rel-evil")).unwrap();
        let select = |sources: &[&str]| {
            select_in_tree(
                root,
                &sources.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
        };
        assert_eq!(
            names(&select(&["/bin/app"]).unwrap()),
            pairs(&[("usr/bin/app", "app")])
        );
        assert_eq!(
            names(&select(&["/src/out/*.txt"]).unwrap()),
            pairs(&[("src/out/a.txt", "a.txt"), ("src/out/b.txt", "b.txt")])
        );
        // A symlink that points out of the tree resolves inside it, where nothing exists.
        assert!(matches!(
            select(&["/evil/passwd"]),
            Err(CopyError::SourceNotFound { .. })
        ));
        // Dangling after resolution in root: the link itself is copied.
        let items = select(&["/src/out/rel-evil"]).unwrap();
        assert_eq!(
            items[0].kind,
            ItemKind::Symlink {
                target: PathBuf::from("../../../../../etc/passwd")
            }
        );
        let items = select(&["/src/out"]).unwrap();
        assert_eq!(items.len(), 4);
        assert!(matches!(items[1].kind, ItemKind::File { size: 1, .. }));
    }
}
