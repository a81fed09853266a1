//! The graphbuild build language (KDL v2): parsing, imports, templates, validation and
//! diagnostics. Produces plain data ([`ir::Project`]); knows nothing of execution.
//!
//! Every problem a user can cause is a [`Diagnostic`]: a severity, a stable code
//! (`graphbuild::…`), a message, labeled spans in a source file and a help line. Loading
//! collects *all* problems of a file before giving up and returns them together as
//! [`Diagnostics`], which renders every one at once. The engine builds its own diagnostics
//! with the same builder, pointing at the [`ir::Loc`]s the IR carries:
//!
//! ```
//! # use graphbuild_lang::{Code, Diagnostic, ir::{Sources, Source, Loc, FileId}};
//! # use std::sync::Arc;
//! # let sources = Sources { files: vec![Source::new("build.kdl", None, Arc::new("stage a {}".into()))] };
//! # let loc = Loc { file: FileId(0), span: (6, 1).into() };
//! let diagnostic = Diagnostic::error(Code::BaseImageUnavailable, "cannot pull the base image")
//!     .with_label(&sources, loc, "this stage")
//!     .with_help("check the reference and your registry credentials");
//! assert_eq!(diagnostic.to_string(), "cannot pull the base image");
//! ```

pub mod chmod;
pub mod code;
pub mod dockerfile;
pub mod ir;
pub mod limits;
pub mod load;
pub mod platform;
pub mod stdlib;
pub mod subst;

pub use code::Code;
pub use load::{load, load_source};

use std::fmt;
use std::sync::Arc;

use miette::{LabeledSpan, NamedSource, SourceSpan};

/// How bad a [`Diagnostic`] is: errors stop the build, warnings are reported and ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Severity {
    Warning,
    Error,
}

/// A labeled span in a diagnostic's source file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    pub span: SourceSpan,
    pub text: String,
}

/// One problem, pointing into a source file. Built with [`Diagnostic::error`] or
/// [`Diagnostic::warning`] and the `with_…` methods.
#[derive(Clone)]
pub struct Diagnostic {
    pub severity: Severity,
    /// A stable identifier, `graphbuild::area::problem`: see [`Code`].
    pub code: Code,
    pub message: String,
    pub help: Option<String>,
    /// Where it happened: the file of the first label.
    pub location: Option<ir::Loc>,
    /// Labels in [`Diagnostic::source`]'s file.
    pub labels: Vec<Label>,
    pub source: Option<NamedSource<Arc<String>>>,
    /// Further notes, for example a label in another file.
    pub related: Vec<Diagnostic>,
}

impl Diagnostic {
    pub fn new(severity: Severity, code: Code, message: impl Into<String>) -> Self {
        Diagnostic {
            severity,
            code,
            message: printable(message.into()),
            help: None,
            location: None,
            labels: Vec::new(),
            source: None,
            related: Vec::new(),
        }
    }

    pub fn error(code: Code, message: impl Into<String>) -> Self {
        Diagnostic::new(Severity::Error, code, message)
    }

    pub fn warning(code: Code, message: impl Into<String>) -> Self {
        Diagnostic::new(Severity::Warning, code, message)
    }

    /// Labels `at` with `text`. The first label decides the file shown; a label in another
    /// file becomes a related note in that file.
    pub fn with_label(
        mut self,
        sources: &ir::Sources,
        at: ir::Loc,
        text: impl Into<String>,
    ) -> Self {
        let text = printable(text.into());
        let Some(file) = sources.files.get(at.file.0 as usize) else {
            return self;
        };
        let span = clamp_span(at.span, file.text.len());
        match self.location {
            None => {
                self.location = Some(at);
                self.source = Some(sources.named_source(at.file));
                self.labels.push(Label { span, text });
            }
            Some(location) if location.file == at.file => self.labels.push(Label { span, text }),
            Some(_) => {
                let note = Diagnostic::new(self.severity, self.code, text.clone())
                    .with_label(sources, at, text);
                self.related.push(note);
            }
        }
        self
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(printable(help.into()));
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

/// `text` with control characters other than newline and tab escaped (`\u{1b}`): messages
/// quote values from build files, which may hold any character through KDL escapes.
fn printable(text: String) -> String {
    if !text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return text;
    }
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Keeps a span inside its text so rendering never fails on a stale location.
fn clamp_span(span: SourceSpan, length: usize) -> SourceSpan {
    let offset = span.offset().min(length);
    let end = (offset + span.len()).min(length);
    SourceSpan::new(offset.into(), end - offset)
}

impl fmt::Debug for Diagnostic {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Diagnostic")
            .field("severity", &self.severity)
            .field("code", &self.code)
            .field("message", &self.message)
            .field("help", &self.help)
            .field(
                "source",
                &self.source.as_ref().map(|source| source.name().to_string()),
            )
            .field("labels", &self.labels)
            .field("related", &self.related)
            .finish()
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.message)
    }
}

impl std::error::Error for Diagnostic {}

impl miette::Diagnostic for Diagnostic {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new(&self.code))
    }

    fn severity(&self) -> Option<miette::Severity> {
        Some(match self.severity {
            Severity::Error => miette::Severity::Error,
            Severity::Warning => miette::Severity::Warning,
        })
    }

    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.help
            .as_ref()
            .map(|help| Box::new(help) as Box<dyn fmt::Display>)
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        self.source
            .as_ref()
            .map(|source| source as &dyn miette::SourceCode)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        if self.labels.is_empty() {
            return None;
        }
        Some(Box::new(self.labels.iter().enumerate().map(
            |(index, label)| {
                let text = (!label.text.is_empty()).then(|| label.text.clone());
                if index == 0 {
                    LabeledSpan::new_primary_with_span(text, label.span)
                } else {
                    LabeledSpan::new_with_span(text, label.span)
                }
            },
        )))
    }

    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn miette::Diagnostic> + 'a>> {
        if self.related.is_empty() {
            return None;
        }
        Some(Box::new(
            self.related
                .iter()
                .map(|related| related as &dyn miette::Diagnostic),
        ))
    }
}

/// Several problems reported together (for example every error in a build file).
#[derive(Clone, Debug, Default)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn has_errors(&self) -> bool {
        self.0.iter().any(Diagnostic::is_error)
    }

    pub fn error_count(&self) -> usize {
        self.0
            .iter()
            .filter(|diagnostic| diagnostic.is_error())
            .count()
    }

    pub fn warning_count(&self) -> usize {
        self.0.len() - self.error_count()
    }
}

impl From<Diagnostic> for Diagnostics {
    fn from(diagnostic: Diagnostic) -> Self {
        Diagnostics(vec![diagnostic])
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let errors = self.error_count();
        let warnings = self.warning_count();
        let plural = |count: usize, word: &str| {
            if count == 1 {
                format!("1 {word}")
            } else {
                format!("{count} {word}s")
            }
        };
        match (errors, warnings) {
            (0, 0) => formatter.write_str("no problems"),
            (errors, 0) => write!(formatter, "{}", plural(errors, "error")),
            (0, warnings) => write!(formatter, "{}", plural(warnings, "warning")),
            (errors, warnings) => write!(
                formatter,
                "{} and {}",
                plural(errors, "error"),
                plural(warnings, "warning")
            ),
        }
    }
}

impl std::error::Error for Diagnostics {}

impl miette::Diagnostic for Diagnostics {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new(if self.has_errors() {
            "graphbuild::invalid_build_file"
        } else {
            "graphbuild::warnings"
        }))
    }

    fn severity(&self) -> Option<miette::Severity> {
        Some(if self.has_errors() {
            miette::Severity::Error
        } else {
            miette::Severity::Warning
        })
    }

    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn miette::Diagnostic> + 'a>> {
        Some(Box::new(
            self.0
                .iter()
                .map(|diagnostic| diagnostic as &dyn miette::Diagnostic),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ir::{FileId, Loc, Source, Sources};

    fn sources() -> Sources {
        Sources {
            files: vec![
                Source::new(
                    "build.kdl",
                    None,
                    Arc::new("stage a {\n  from b\n}\n".into()),
                ),
                Source::new("other.kdl", None, Arc::new("stage b {}".into())),
            ],
        }
    }

    fn render(diagnostic: &dyn miette::Diagnostic) -> String {
        let mut out = String::new();
        miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor())
            .render_report(&mut out, diagnostic)
            .expect("render");
        out
    }

    #[test]
    fn renders_file_line_column_label_and_help() {
        let sources = sources();
        let diagnostic = Diagnostic::error(Code::UnknownStage, "unknown stage `b`")
            .with_label(
                &sources,
                Loc {
                    file: FileId(0),
                    span: (17, 1).into(),
                },
                "not a stage",
            )
            .with_help("did you mean `a`?");
        let text = render(&diagnostic);
        assert!(text.contains("build.kdl:2:8"), "{text}");
        assert!(text.contains("not a stage"), "{text}");
        assert!(text.contains("help: did you mean `a`?"), "{text}");
        assert!(text.contains(Code::UnknownStage.as_str()), "{text}");
    }

    #[test]
    fn a_label_in_another_file_becomes_a_related_note() {
        let sources = sources();
        let diagnostic = Diagnostic::error(Code::Cycle, "cycle")
            .with_label(
                &sources,
                Loc {
                    file: FileId(0),
                    span: (0, 5).into(),
                },
                "here",
            )
            .with_label(
                &sources,
                Loc {
                    file: FileId(1),
                    span: (6, 1).into(),
                },
                "and there",
            );
        assert_eq!(diagnostic.labels.len(), 1);
        assert_eq!(diagnostic.related.len(), 1);
        let text = render(&Diagnostics(vec![diagnostic]));
        assert!(text.contains("other.kdl:1:7"), "{text}");
    }

    #[test]
    fn out_of_range_spans_are_clamped() {
        let sources = sources();
        let diagnostic = Diagnostic::warning(Code::Internal, "x")
            .with_label(
                &sources,
                Loc {
                    file: FileId(0),
                    span: (1000, 5).into(),
                },
                "end",
            )
            .with_label(
                &sources,
                Loc {
                    file: FileId(7),
                    span: (0, 1).into(),
                },
                "missing file ignored",
            );
        assert_eq!(diagnostic.labels[0].span, SourceSpan::new(21.into(), 0));
        let text = render(&diagnostic);
        assert!(text.contains("build.kdl:4:1"), "{text}");
    }

    #[test]
    fn control_characters_in_a_source_are_not_rendered() {
        let sources = Sources {
            files: vec![Source::new(
                "evil.kdl",
                None,
                Arc::new("a \"\x1b[2J\u{9b}31m\" b\n".into()),
            )],
        };
        let diagnostic = Diagnostic::error(Code::Internal, "x").with_label(
            &sources,
            Loc {
                file: FileId(0),
                span: (12, 1).into(),
            },
            "here",
        );
        let text = render(&diagnostic);
        assert!(
            !text.contains('\x1b') && !text.contains('\u{9b}'),
            "{text:?}"
        );
        assert!(text.contains("a \"?[2J??31m\" b"), "{text}");
        assert!(text.contains("evil.kdl:1:13"), "{text}");
        let message = Diagnostic::error(Code::Internal, "bad value `\x1b]0;x\x07`")
            .with_help("not \u{9b}this");
        assert_eq!(message.message, "bad value `\\u{1b}]0;x\\u{7}`");
        assert_eq!(message.help.as_deref(), Some("not \\u{9b}this"));
    }

    #[test]
    fn diagnostics_summarize_counts() {
        let many = Diagnostics(vec![
            Diagnostic::error(Code::Internal, "a"),
            Diagnostic::error(Code::Internal, "b"),
            Diagnostic::warning(Code::Internal, "c"),
        ]);
        assert_eq!(many.to_string(), "2 errors and 1 warning");
        assert!(many.has_errors());
    }
}
