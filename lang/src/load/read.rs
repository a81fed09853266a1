//! Reading: the root file and its imports, parsed with kdl (on a thread sized for the file),
//! followed depth-first with cycle detection and a prefix per import.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kdl::{KdlDocument, KdlNode};
use miette::SourceSpan;

use crate::Code;
use crate::ir::{FileId, Loc, Source};
use crate::{Diagnostic, limits};

use super::*;

/// Parses KDL on a thread with a stack sized for the text (see
/// [`limits::parser_stack_size`]): kdl-rs recurses once per place it gives up, so a crafted
/// file could otherwise overflow the caller's stack. `Err` when the thread cannot start or
/// the parser panics.
pub(super) fn parse_kdl(text: &str) -> Result<Result<KdlDocument, kdl::KdlError>, String> {
    std::thread::scope(|scope| {
        let parser = std::thread::Builder::new()
            .name("kdl-parser".into())
            .stack_size(limits::parser_stack_size(text.len()))
            .spawn_scoped(scope, || KdlDocument::parse(text))
            .map_err(|error| format!("cannot start the parser: {error}"))?;
        parser
            .join()
            .map_err(|_| "the KDL parser failed on this file".to_string())
    })
}

/// Syntax errors reported per file: a file that is not KDL at all has one per line.
pub(super) const MAX_SYNTAX_ERRORS: usize = 10;

/// Where a KDL syntax error is shown, if anywhere. kdl-rs gives errors it has no position for
/// the span 0..0, which would show the file's first line as if the error were there: those
/// get no label (the message still names the file). It spans some others from the start of
/// the construct it was parsing (often the start of the file) to where it gave up; a label
/// over many lines would show the file's first lines too, so such a span becomes the point
/// where parsing stopped.
pub(super) fn syntax_error_span(text: &str, span: SourceSpan) -> Option<SourceSpan> {
    if span.offset() == 0 && span.is_empty() && !text.is_empty() {
        return None;
    }
    let start = span.offset().min(text.len());
    let end = (start + span.len()).min(text.len());
    let Some(covered) = text.get(start..end) else {
        return Some(span);
    };
    if !covered.trim_end().contains('\n') {
        return Some(span);
    }
    let stop = start + covered.trim_end().len();
    Some(match text[..stop].char_indices().next_back() {
        Some((at, character)) => SourceSpan::new(at.into(), character.len_utf8()),
        None => span,
    })
}

impl Loader {
    pub(super) fn read_file(
        &mut self,
        identity: String,
        name: String,
        path: Option<PathBuf>,
        text: String,
        prefix: String,
        imported_at: Option<Loc>,
    ) {
        let is_root = imported_at.is_none();
        let file = FileId(self.sources.files.len() as u32);
        let text = Arc::new(text);
        self.sources
            .files
            .push(Source::new(name.clone(), path.clone(), text.clone()));
        if text.len() > limits::MAX_FILE_BYTES {
            let mut diagnostic = Diagnostic::error(
                Code::LimitsFileSize,
                format!(
                    "`{name}` is {} bytes; a build file may have at most {} bytes",
                    text.len(),
                    limits::MAX_FILE_BYTES
                ),
            )
            .with_help("is this the right file? split a very large build file with `import`");
            match imported_at {
                Some(at) => diagnostic = diagnostic.with_label(&self.sources, at, "imported here"),
                None => diagnostic.location = Some(Self::loc(file, SourceSpan::new(0.into(), 0))),
            }
            self.diagnostics.push(diagnostic);
            return;
        }
        if let Err(too_deep) = limits::check_nesting(&text) {
            let (offset, message, label, help) = match too_deep {
                limits::TooDeep::Braces(offset) => (
                    offset,
                    format!(
                        "nodes are nested more than {} levels deep",
                        limits::MAX_NESTING
                    ),
                    "one level too deep",
                    "a build file needs a few levels of `{ … }`; flatten the nesting",
                ),
                limits::TooDeep::Comments(offset) => (
                    offset,
                    format!(
                        "`/* … */` comments are nested more than {} deep",
                        limits::MAX_NESTING
                    ),
                    "one comment too deep",
                    "close the nested comments, or use `//` line comments",
                ),
                limits::TooDeep::Slashdashes(offset) => (
                    offset,
                    format!("more than {} `/-` in a row", limits::MAX_NESTING),
                    "one `/-` too many",
                    "one `/-` comments out the node, argument or block after it",
                ),
                limits::TooDeep::LongComment(offset) => (
                    offset,
                    "this `/* … */` comment is too long".to_string(),
                    "this comment",
                    "split it, or use `//` line comments",
                ),
            };
            self.error(
                Code::LimitsNesting,
                message,
                Self::loc(file, SourceSpan::new(offset.into(), 1)),
                label,
                Some(help.to_string()),
            );
            return;
        }
        let parsed = match parse_kdl(&text) {
            Ok(parsed) => parsed,
            Err(message) => {
                let mut diagnostic =
                    Diagnostic::error(Code::KdlParser, format!("cannot parse `{name}`: {message}"));
                diagnostic.location = Some(Self::loc(file, SourceSpan::new(0.into(), 0)));
                self.diagnostics.push(diagnostic);
                return;
            }
        };
        let document = match parsed {
            Ok(document) => document,
            Err(error) => {
                for (index, problem) in error.diagnostics.iter().enumerate() {
                    if index == MAX_SYNTAX_ERRORS {
                        let more = error.diagnostics.len() - index;
                        let mut diagnostic = Diagnostic::error(
                            Code::KdlSyntax,
                            format!("{more} more KDL syntax errors in `{name}`"),
                        )
                        .with_help("is this a KDL build file? fix the errors above first");
                        diagnostic.location =
                            Some(Self::loc(file, SourceSpan::new(text.len().into(), 0)));
                        self.diagnostics.push(diagnostic);
                        break;
                    }
                    let message = problem
                        .message
                        .clone()
                        .unwrap_or_else(|| "invalid KDL".to_string());
                    let help = problem.help.clone().unwrap_or_else(|| {
                        "see the KDL v2 syntax: quoted strings, `#true`/`#false`, `{ … }` for children".to_string()
                    });
                    let mut diagnostic =
                        Diagnostic::error(Code::KdlSyntax, format!("KDL syntax error: {message}"))
                            .with_help(help);
                    match syntax_error_span(&text, problem.span) {
                        Some(span) => {
                            diagnostic = diagnostic.with_label(
                                &self.sources,
                                Self::loc(file, span),
                                problem.label.clone().unwrap_or_else(|| "here".to_string()),
                            );
                        }
                        None => {
                            diagnostic.message = format!("KDL syntax error in `{name}`: {message}");
                            diagnostic.location = Some(Self::loc(file, problem.span));
                        }
                    }
                    if let Some(imported_at) = imported_at
                        && index == 0
                    {
                        diagnostic = diagnostic.with_label(
                            &self.sources,
                            imported_at,
                            format!("`{name}` is imported here"),
                        );
                    }
                    self.diagnostics.push(diagnostic);
                }
                return;
            }
        };
        self.import_stack.push((identity.clone(), name.clone()));
        let directory = path
            .as_ref()
            .and_then(|path| path.parent().map(Path::to_path_buf))
            .filter(|dir| !dir.as_os_str().is_empty())
            .unwrap_or_else(|| {
                if is_root {
                    self.root_dir.clone()
                } else {
                    PathBuf::from(".")
                }
            });
        let is_std = name.starts_with("std:");
        for node in document.nodes() {
            if node.name().value() == "import" {
                self.read_import(node, file, &directory, &prefix, is_std);
            }
        }
        self.import_stack.pop();
        self.files.push(LoadedFile {
            file,
            identity,
            document,
            prefix,
            is_root,
        });
    }

    pub(super) fn read_import(
        &mut self,
        node: &KdlNode,
        file: FileId,
        directory: &Path,
        prefix: &str,
        from_std: bool,
    ) {
        let node_at = Self::loc(file, node.name().span());
        self.check_no_children(node, file, "import");
        let arguments = positional(node);
        let Some(first) = arguments.first() else {
            self.error(
                Code::ImportMissing,
                "`import` needs a module",
                node_at,
                "import what?",
                Some("write `import \"std:python\" as=\"py\"` or `import \"./common.kdl\"`".into()),
            );
            return;
        };
        for extra in arguments.iter().skip(1) {
            self.error(
                Code::NodeExtraArgument,
                "`import` takes one module",
                Self::loc(file, extra.span()),
                "extra argument",
                Some("write one `import` per module".into()),
            );
        }
        let mut alias = None;
        for (key, entry) in properties(node) {
            match key {
                "as" => {
                    if let Some(text) = self.string(entry, file, "`as`") {
                        let valid = !text.raw.is_empty()
                            && text
                                .raw
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                        if valid {
                            alias = Some(text.raw);
                        } else {
                            self.error(
                                Code::ImportAlias,
                                format!("invalid module alias `{}`", text.raw),
                                text.at,
                                "not a plain name",
                                Some("an alias is letters, digits, `_` and `-`, for example as=\"py\"".into()),
                            );
                        }
                    }
                }
                other => self.unknown_property(other, entry, file, "import", &["as"]),
            }
        }
        let Some(module) = self.string(first, file, "the module to import") else {
            return;
        };
        let child_prefix = match &alias {
            Some(alias) => format!("{prefix}{alias}."),
            None => prefix.to_string(),
        };
        let module_at = module.at;
        if self.import_stack.len() >= limits::MAX_IMPORT_DEPTH {
            let chain: Vec<&str> = self
                .import_stack
                .iter()
                .map(|(_, name)| name.as_str())
                .collect();
            self.error(
                Code::LimitsImportDepth,
                format!(
                    "imports are chained more than {} files deep",
                    limits::MAX_IMPORT_DEPTH
                ),
                module_at,
                "one import too deep",
                Some(format!(
                    "import the modules from one file instead of through a chain: {} → …",
                    chain[..3.min(chain.len())].join(" → ")
                )),
            );
            return;
        }
        let (identity, name, path, text) = if let Some(std_name) = module.raw.strip_prefix("std:") {
            let Some(text) = crate::stdlib::module(std_name) else {
                let names = crate::stdlib::module_names();
                let help = match did_you_mean(std_name, names.iter().copied()) {
                    Some(close) => format!(
                        "did you mean `std:{close}`? available modules: {}",
                        names.join(", ")
                    ),
                    None => format!("available modules: {}", names.join(", ")),
                };
                self.error(
                    Code::ImportUnknownStdModule,
                    format!("unknown standard module `{}`", module.raw),
                    module_at,
                    "no such module",
                    Some(help),
                );
                return;
            };
            (
                module.raw.clone(),
                module.raw.clone(),
                None,
                text.to_string(),
            )
        } else {
            if from_std {
                self.error(
                    Code::ImportLocalFromStd,
                    "a standard module can import only other `std:` modules",
                    module_at,
                    "local import",
                    None,
                );
                return;
            }
            // Lexically drop `.` components so names read well (`../modules/x.kdl`).
            let path: PathBuf = directory.join(&module.raw).components().collect();
            let read = if path.is_file() {
                std::fs::read_to_string(&path).map_err(|error| error.to_string())
            } else if path.exists() {
                Err("not a regular file".to_string())
            } else {
                Err("no such file".to_string())
            };
            let text = match read {
                Ok(text) => text,
                Err(error) => {
                    let available = crate::stdlib::module_names().join(", ");
                    self.error(
                        Code::ImportMissingFile,
                        format!("cannot read imported file `{}`: {error}", module.raw),
                        module_at,
                        "imported here",
                        Some(format!(
                            "local paths are relative to the importing file's folder; standard modules are written \"std:NAME\" ({available})"
                        )),
                    );
                    return;
                }
            };
            let identity = std::fs::canonicalize(&path)
                .map(|canonical| canonical.display().to_string())
                .unwrap_or_else(|_| path.display().to_string());
            let name = path
                .strip_prefix(&self.root_dir)
                .unwrap_or(&path)
                .display()
                .to_string();
            (identity, name, Some(path), text)
        };
        if let Some(position) = self
            .import_stack
            .iter()
            .position(|(open, _)| *open == identity)
        {
            let mut chain: Vec<String> = self.import_stack[position..]
                .iter()
                .map(|(_, name)| name.clone())
                .collect();
            chain.push(name.clone());
            self.error(
                Code::ImportCycle,
                format!("import cycle: {}", chain.join(" → ")),
                module_at,
                "imports a file that is already being imported",
                Some("move what both files need into a third file that neither imports".into()),
            );
            return;
        }
        if !self
            .imported
            .insert((identity.clone(), child_prefix.clone()))
        {
            return;
        }
        self.read_file(identity, name, path, text, child_prefix, Some(module_at));
    }

    // ----------------------------------------------------------------------------------------
    // Phase 2: declarations
}
