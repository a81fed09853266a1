//! The Dockerfile front end: a Dockerfile becomes the same [`ir::Project`] a KDL build file
//! does, with one image (the target stage), so everything downstream (graph, keys, cache,
//! lock, explain, verify) is shared.
//!
//! Long because it is a parser's lowering half (the lexer is `lex.rs`, the tests `tests.rs`):
//! every instruction's flags and Docker's quoting and scoping rules meet the IR here, in one
//! pass that reports every problem of a file at once.
//!
//! Dockerfile rules and how they map (see docs/dockerfile.md):
//!
//! - `ARG` before the first `FROM` is a global arg; inside a stage an `arg` step.
//! - Values of `ENV`, `LABEL`, `WORKDIR`, `USER`, `EXPOSE`, `VOLUME`, `STOPSIGNAL`, `COPY`,
//!   `ADD` and `FROM` have their Dockerfile quoting resolved and keep their `$VAR`
//!   references, which the engine substitutes per platform; a quoted or escaped `$` is a
//!   literal `$` (`\$` in the IR).
//! - `RUN` commands are never substituted: they run as written, build args in their
//!   environment.
//! - `MAINTAINER x` is `LABEL maintainer=x`, as Docker does.
//!
//! Every problem in the file is reported at once, each with its line and a help line.

mod bind;
pub mod convert;
mod flags;
mod lex;
mod ssh;

use std::path::Path;
use std::sync::Arc;

use crate::Code;
use crate::ir::{
    self, ArgDecl, BindMount, CacheMount, CacheSharing, Command, CopyFrom, FileId, FromSource,
    Healthcheck, Image, InlineFile, Loc, Network, PlatformSpec, Project, Secret, Source, Sources,
    Stage, Step, StepKind, Text, TmpfsMount,
};
use crate::platform::{AUTOMATIC_ARGS, Platform};
use crate::{Diagnostic, Diagnostics};

use lex::{Line, Mapped, Word};

/// What the command line adds to a Dockerfile: the image it builds.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The image's name (its output directory under `--output`).
    pub image: String,
    pub tags: Vec<String>,
    /// `--target`: the stage to build; the last stage when `None`.
    pub target: Option<String>,
    pub push: bool,
    /// Where the OCI layout goes (`-o type=oci,dest=DIR`); relative to the context.
    pub output: Option<String>,
    /// `--network=none`: the network of `RUN` steps without their own `--network`.
    pub network_none: bool,
    /// `--label KEY=VALUE`: labels added to the image config.
    pub labels: Vec<(String, String)>,
    /// `--annotation KEY=VALUE`: annotations on the index and manifests.
    pub annotations: Vec<(String, String)>,
}

/// Loads the Dockerfile at `path`; `context` is the build context.
pub fn load(path: &Path, context: &Path, options: &Options) -> Result<Project, Diagnostics> {
    let name = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => load_source(&name, &text, context, options),
        Err(error) => Err(Diagnostic::error(
            Code::LoadRead,
            format!("cannot read the Dockerfile `{name}`: {error}"),
        )
        .with_help("pass it with -f PATH, or put a Dockerfile in the build context")
        .into()),
    }
}

/// Loads a Dockerfile from memory.
pub fn load_source(
    name: &str,
    text: &str,
    context: &Path,
    options: &Options,
) -> Result<Project, Diagnostics> {
    let source = Source::new(name.to_string(), None, Arc::new(text.to_string()));
    load_into(source, context, options, Sources::default())
}

/// Lowers the Dockerfile `source` with `sources` (another project's files) before it: its
/// locations name its own file among them, so a KDL file that imports it reports problems
/// inside it at the Dockerfile's `file:line`. The project's sources are `sources` and the
/// Dockerfile.
pub fn load_into(
    source: Source,
    context: &Path,
    options: &Options,
    mut sources: Sources,
) -> Result<Project, Diagnostics> {
    let text = source.text.clone();
    let text = text.as_str();
    let file = FileId(sources.files.len() as u32);
    sources.files.push(source);
    let mut lowerer = Lowerer {
        file,
        sources,
        diagnostics: Vec::new(),
        escape: '\\',
        network_none: options.network_none,
        args: Vec::new(),
        stages: Vec::new(),
    };
    if text.len() > crate::limits::MAX_FILE_BYTES {
        return Err(Diagnostic::error(
            Code::LimitsFileSize,
            format!(
                "the Dockerfile is larger than {} bytes",
                crate::limits::MAX_FILE_BYTES
            ),
        )
        .into());
    }
    let directives = lex::directives(text);
    lowerer.escape = directives.escape;
    for (offset, length, message) in directives.errors {
        lowerer.error(
            Code::DockerfileSyntax,
            message,
            (offset, length),
            "this directive",
            "parser directives are `# escape=\\` or `# escape=``, each once, at the top",
        );
    }
    let mut lex_errors = Vec::new();
    let lines = lex::lines(text, directives.end, lowerer.escape, &mut lex_errors);
    for (offset, length, message) in lex_errors {
        lowerer.error(
            Code::DockerfileSyntax,
            message,
            (offset, length),
            "this heredoc",
            "end a heredoc with a line holding only its name",
        );
    }
    for line in &lines {
        lowerer.instruction(line);
    }
    let image = lowerer.image(options, text.len());
    let mut diagnostics = std::mem::take(&mut lowerer.diagnostics);
    diagnostics.sort_by_key(|diagnostic| diagnostic.location.map(|loc| loc.span.offset()));
    if diagnostics.iter().any(Diagnostic::is_error) {
        return Err(Diagnostics(diagnostics));
    }
    Ok(Project {
        sources: lowerer.sources,
        root_dir: context.to_path_buf(),
        platforms: Vec::new(),
        args: lowerer.args,
        stages: lowerer.stages.into_iter().map(|(stage, _)| stage).collect(),
        scopes: Vec::new(),
        images: image.into_iter().collect(),
        groups: Vec::new(),
        docker_rules: true,
        warnings: diagnostics,
    })
}

const INSTRUCTIONS: &[&str] = &[
    "FROM",
    "ARG",
    "RUN",
    "COPY",
    "ADD",
    "ENV",
    "WORKDIR",
    "USER",
    "LABEL",
    "EXPOSE",
    "ENTRYPOINT",
    "CMD",
    "VOLUME",
    "SHELL",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "ONBUILD",
    "MAINTAINER",
];

struct Lowerer {
    /// The Dockerfile's own file in `sources`.
    file: FileId,
    sources: Sources,
    diagnostics: Vec<Diagnostic>,
    escape: char,
    /// `--network=none` on the command line.
    network_none: bool,
    args: Vec<ArgDecl>,
    /// Stages so far, with the name as written (for messages).
    stages: Vec<(Stage, String)>,
}

/// One instruction being lowered: its keyword, its arguments and where they are.
struct Instruction<'a> {
    keyword: String,
    line: &'a Mapped,
    /// Byte offset of the arguments in `line.text`.
    args_start: usize,
    heredocs: &'a [lex::Heredoc],
    /// The whole instruction's file span.
    span: (usize, usize),
}

impl Instruction<'_> {
    fn args(&self) -> &str {
        &self.line.text[self.args_start..]
    }
}

impl Lowerer {
    fn loc(&self, span: (usize, usize)) -> Loc {
        Loc {
            file: self.file,
            span: span.into(),
        }
    }

    fn error(
        &mut self,
        code: Code,
        message: impl Into<String>,
        span: (usize, usize),
        label: &str,
        help: impl Into<String>,
    ) {
        let at = self.loc(span);
        let diagnostic = Diagnostic::error(code, message)
            .with_label(&self.sources, at, label)
            .with_help(help);
        self.diagnostics.push(diagnostic);
    }

    fn text(&self, raw: String, span: (usize, usize)) -> Text {
        Text {
            raw,
            at: self.loc(span),
        }
    }

    /// A word with its quoting resolved, as IR text; reports an unterminated quote.
    fn word(&mut self, instruction: &Instruction, word: &Word) -> Option<Text> {
        let span = instruction.line.span(word.start, word.end);
        match lex::word_to_raw(&word.text, self.escape) {
            Ok(raw) => Some(self.text(raw, span)),
            Err(message) => {
                self.error(
                    Code::DockerfileSyntax,
                    message,
                    span,
                    "this word",
                    "close the quote, or escape it",
                );
                None
            }
        }
    }

    fn words(&self, instruction: &Instruction) -> Vec<Word> {
        lex::split_words(instruction.args(), instruction.args_start, self.escape)
    }

    fn instruction(&mut self, line: &Line) {
        let text = &line.line.text;
        let keyword_start = text.len() - text.trim_start().len();
        let keyword_end = text[keyword_start..]
            .find(char::is_whitespace)
            .map_or(text.len(), |end| keyword_start + end);
        let written = &text[keyword_start..keyword_end];
        let keyword = written.to_ascii_uppercase();
        let args_start = text[keyword_end..]
            .find(|c: char| !c.is_whitespace())
            .map_or(text.len(), |start| keyword_end + start);
        let instruction = Instruction {
            keyword: keyword.clone(),
            line: &line.line,
            args_start,
            heredocs: &line.heredocs,
            span: (line.start, line.end.saturating_sub(line.start).max(1)),
        };
        let keyword_span = line.line.span(keyword_start, keyword_end);
        if !INSTRUCTIONS.contains(&keyword.as_str()) {
            let suggestion = crate::load::did_you_mean(&keyword, INSTRUCTIONS.iter().copied())
                .map(|name| format!("did you mean `{name}`?"))
                .unwrap_or_else(|| format!("the instructions are {}", INSTRUCTIONS.join(", ")));
            self.error(
                Code::DockerfileUnknownInstruction,
                format!("unknown instruction `{written}`"),
                keyword_span,
                "not a Dockerfile instruction",
                suggestion,
            );
            return;
        }
        if instruction.args().trim().is_empty() {
            self.error(
                Code::DockerfileSyntax,
                format!("`{keyword}` needs arguments"),
                keyword_span,
                "nothing after this",
                format!("see docs/dockerfile.md for the forms of `{keyword}`"),
            );
            return;
        }
        match keyword.as_str() {
            "FROM" => return self.from(&instruction),
            "ARG" if self.stages.is_empty() => return self.global_arg(&instruction),
            "ONBUILD" => {
                self.error(
                    Code::DockerfileUnsupported,
                    "`ONBUILD` is not supported",
                    keyword_span,
                    "ONBUILD",
                    "graphbuild builds images, not triggers for images built from them: run these instructions in the stages that need them",
                );
                return;
            }
            _ => {}
        }
        if self.stages.is_empty() {
            self.error(
                Code::DockerfileNoStage,
                format!("`{keyword}` before the first `FROM`"),
                keyword_span,
                "outside any stage",
                "only `ARG` may come before the first `FROM`; start a stage with `FROM IMAGE`",
            );
            return;
        }
        let at = self.loc(instruction.span);
        let kinds = match keyword.as_str() {
            "ARG" => self.stage_args(&instruction),
            "RUN" => self
                .run(&instruction)
                .map(StepKind::Run)
                .into_iter()
                .collect(),
            "COPY" | "ADD" => self.copy(&instruction).into_iter().collect(),
            "ENV" => self
                .pairs(&instruction, true)
                .map(StepKind::Env)
                .into_iter()
                .collect(),
            "LABEL" => self
                .pairs(&instruction, true)
                .map(StepKind::Label)
                .into_iter()
                .collect(),
            "MAINTAINER" => {
                let span = instruction
                    .line
                    .span(instruction.args_start, instruction.line.text.len());
                let raw = lex::word_to_raw(instruction.args().trim(), self.escape)
                    .unwrap_or_else(|_| lex::literal_raw(instruction.args().trim()));
                vec![StepKind::Label(vec![(
                    "maintainer".into(),
                    self.text(raw, span),
                )])]
            }
            "WORKDIR" | "USER" | "STOPSIGNAL" => {
                let word = Word {
                    text: instruction.args().trim_end().to_string(),
                    start: instruction.args_start,
                    end: instruction.line.text.trim_end().len(),
                };
                let Some(value) = self.word(&instruction, &word) else {
                    return;
                };
                vec![match keyword.as_str() {
                    "WORKDIR" => StepKind::Workdir(value),
                    "USER" => StepKind::User(value),
                    _ => StepKind::StopSignal(value),
                }]
            }
            "EXPOSE" => {
                let words = self.words(&instruction);
                let ports: Vec<Text> = words
                    .iter()
                    .filter_map(|word| self.word(&instruction, word))
                    .collect();
                vec![StepKind::Expose(ports)]
            }
            "VOLUME" => {
                let paths = match self.json(&instruction) {
                    Some(items) => items,
                    None => {
                        let words = self.words(&instruction);
                        words
                            .iter()
                            .filter_map(|word| self.word(&instruction, word))
                            .collect()
                    }
                };
                vec![StepKind::Volume(paths)]
            }
            "ENTRYPOINT" => vec![StepKind::Entrypoint(self.command(&instruction))],
            "CMD" => vec![StepKind::Cmd(self.command(&instruction))],
            "SHELL" => match self.json(&instruction) {
                Some(items) if !items.is_empty() => vec![StepKind::Shell(
                    items
                        .into_iter()
                        .map(|item| Text {
                            raw: lex::literal_raw(&item.raw),
                            at: item.at,
                        })
                        .collect(),
                )],
                _ => {
                    self.error(
                        Code::DockerfileSyntax,
                        "`SHELL` takes a JSON array",
                        instruction.span,
                        "not a JSON array of strings",
                        r#"write it like SHELL ["/bin/bash", "-c"]"#,
                    );
                    return;
                }
            },
            "HEALTHCHECK" => match self.healthcheck(&instruction) {
                Some(check) => vec![StepKind::Healthcheck(check)],
                None => return,
            },
            _ => return,
        };
        let Some((stage, _)) = self.stages.last_mut() else {
            return;
        };
        for kind in kinds {
            stage.steps.push(Step {
                kind,
                at,
                when: None,
            });
        }
    }

    /// The leading `--name[=value]` flags of an instruction; returns them and the index of
    /// the first other word.
    fn flags(&self, instruction: &Instruction) -> (Vec<(String, Option<String>, Word)>, usize) {
        let words = self.words(instruction);
        let mut flags = Vec::new();
        let mut index = 0;
        for word in &words {
            let Some(flag) = word.text.strip_prefix("--") else {
                break;
            };
            let (name, value) = match flag.split_once('=') {
                Some((name, value)) => (name.to_string(), Some(value.to_string())),
                None => (flag.to_string(), None),
            };
            flags.push((name, value, word.clone()));
            index += 1;
        }
        let rest = words
            .get(index)
            .map_or(instruction.line.text.len(), |word| word.start);
        (flags, rest)
    }

    fn unknown_flag(&mut self, instruction: &Instruction, word: &Word, known: &[&str]) {
        let span = instruction.line.span(word.start, word.end);
        self.error(
            Code::DockerfileFlag,
            format!(
                "`{}` does not take the flag `{}`",
                instruction.keyword, word.text
            ),
            span,
            "unknown or unsupported flag",
            if known.is_empty() {
                format!("`{}` takes no flags", instruction.keyword)
            } else {
                format!(
                    "`{}` takes {}",
                    instruction.keyword,
                    known
                        .iter()
                        .map(|flag| format!("--{flag}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
        );
    }

    /// The value of a flag this instruction knows; `None` after reporting an unknown flag or a
    /// missing value.
    fn known_flag_value(
        &mut self,
        instruction: &Instruction,
        name: &str,
        value: Option<String>,
        word: &Word,
        known: &[&str],
    ) -> Option<String> {
        if !known.contains(&name) {
            self.unknown_flag(instruction, word, known);
            return None;
        }
        self.flag_value(instruction, name, value, word)
    }

    fn flag_value(
        &mut self,
        instruction: &Instruction,
        name: &str,
        value: Option<String>,
        word: &Word,
    ) -> Option<String> {
        if value.as_deref().is_none_or(str::is_empty) {
            self.error(
                Code::DockerfileFlag,
                format!("`--{name}` needs a value"),
                instruction.line.span(word.start, word.end),
                "no value",
                format!("write --{name}=VALUE"),
            );
            return None;
        }
        value
    }

    fn from(&mut self, instruction: &Instruction) {
        let (flags, rest) = self.flags(instruction);
        let mut platform = None;
        for (name, value, word) in flags {
            if name != "platform" {
                self.unknown_flag(instruction, &word, &["platform"]);
                continue;
            }
            let Some(value) = self.flag_value(instruction, &name, value, &word) else {
                continue;
            };
            let value_word = Word {
                text: value,
                start: word.start + "--platform=".len(),
                end: word.end,
            };
            let Some(text) = self.word(instruction, &value_word) else {
                continue;
            };
            platform = Some(if text.raw.contains('$') {
                PlatformSpec::Dynamic(text)
            } else {
                match Platform::parse(&text.raw) {
                    Ok(parsed) => PlatformSpec::Literal(parsed, text.at),
                    Err(error) => {
                        self.error(
                            Code::PlatformInvalid,
                            format!("`{}` is not a platform: {error}", text.raw),
                            (text.at.span.offset(), text.at.span.len()),
                            "this platform",
                            "write OS/ARCH[/VARIANT], for example linux/arm64, or $BUILDPLATFORM",
                        );
                        continue;
                    }
                }
            });
        }
        let words: Vec<Word> = self
            .words(instruction)
            .into_iter()
            .filter(|word| word.start >= rest)
            .collect();
        let (image_word, name_word) = match words.as_slice() {
            [image] => (image, None),
            [image, as_word, name] if as_word.text.eq_ignore_ascii_case("as") => {
                (image, Some(name))
            }
            _ => {
                self.error(
                    Code::DockerfileSyntax,
                    "`FROM` takes an image and an optional `AS name`",
                    instruction.span,
                    "this FROM",
                    "write FROM [--platform=P] IMAGE [AS NAME]",
                );
                return;
            }
        };
        let Some(image) = self.word(instruction, image_word) else {
            return;
        };
        let index = self.stages.len();
        let (name, written) = match name_word {
            Some(word) => {
                let lower = word.text.to_ascii_lowercase();
                let valid = lower.starts_with(|c: char| c.is_ascii_lowercase())
                    && lower
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c));
                let span = instruction.line.span(word.start, word.end);
                if !valid {
                    self.error(
                        Code::DockerfileSyntax,
                        format!("`{}` is not a valid stage name", word.text),
                        span,
                        "this name",
                        "a stage name starts with a letter and has letters, digits, `-`, `_` and `.`",
                    );
                } else if let Some(previous) =
                    self.stages.iter().find(|(stage, _)| stage.name == lower)
                {
                    let previous_at = previous.0.at;
                    let diagnostic = Diagnostic::error(
                        Code::DuplicateStage,
                        format!("two stages are named `{lower}`"),
                    )
                    .with_label(&self.sources, self.loc(span), "this name")
                    .with_label(&self.sources, previous_at, "first used here")
                    .with_help("give each stage its own name");
                    self.diagnostics.push(diagnostic);
                }
                (lower, word.text.clone())
            }
            None => (index.to_string(), index.to_string()),
        };
        let source = if image.raw.eq_ignore_ascii_case("scratch") {
            FromSource::Scratch
        } else if let Some((stage, _)) = self
            .stages
            .iter()
            .find(|(stage, _)| stage.name == image.raw.to_ascii_lowercase())
        {
            FromSource::Stage(stage.name.clone())
        } else {
            FromSource::Image(image.clone())
        };
        let at = self.loc(instruction.span);
        self.stages.push((
            Stage {
                name,
                at,
                from: ir::From {
                    source,
                    at: image.at,
                },
                platform,
                steps: Vec::new(),
                scope: None,
                docker_rules: true,
            },
            written,
        ));
    }

    /// `ARG NAME[=default] …`: the declarations.
    fn arg_decls(&mut self, instruction: &Instruction) -> Vec<ArgDecl> {
        let mut decls = Vec::new();
        for word in self.words(instruction) {
            let (name, default) = match word.text.split_once('=') {
                Some((name, value)) => {
                    let value_word = Word {
                        text: value.to_string(),
                        start: word.start + name.len() + 1,
                        end: word.end,
                    };
                    (name.to_string(), self.word(instruction, &value_word))
                }
                None => (word.text.clone(), None),
            };
            let span = instruction.line.span(word.start, word.start + name.len());
            let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                self.error(
                    Code::ArgInvalidName,
                    format!("`{name}` is not an arg name"),
                    span,
                    "this name",
                    "an arg name is letters, digits and `_`, not starting with a digit",
                );
                continue;
            }
            if AUTOMATIC_ARGS.contains(&name.as_str()) && default.is_some() {
                self.error(
                    Code::ArgAutomatic,
                    format!("`{name}` is set by graphbuild for each platform"),
                    span,
                    "an automatic arg",
                    format!("declare it without a value: ARG {name}"),
                );
                continue;
            }
            decls.push(ArgDecl {
                name,
                default,
                from_env: false,
                at: self.loc(span),
            });
        }
        decls
    }

    fn global_arg(&mut self, instruction: &Instruction) {
        for decl in self.arg_decls(instruction) {
            if let Some(previous) = self.args.iter_mut().find(|arg| arg.name == decl.name) {
                // Docker: a later declaration wins.
                *previous = decl;
            } else {
                self.args.push(decl);
            }
        }
    }

    fn stage_args(&mut self, instruction: &Instruction) -> Vec<StepKind> {
        self.arg_decls(instruction)
            .into_iter()
            .map(StepKind::Arg)
            .collect()
    }

    /// A JSON array of strings (exec form), or `None` when the arguments are not one.
    fn json(&mut self, instruction: &Instruction) -> Option<Vec<Text>> {
        let args = instruction.args().trim_end();
        if !args.starts_with('[') {
            return None;
        }
        let items: Vec<String> = serde_json::from_str(args).ok()?;
        let span = instruction
            .line
            .span(instruction.args_start, instruction.line.text.len());
        Some(
            items
                .into_iter()
                .map(|item| self.text(item, span))
                .collect(),
        )
    }

    /// A runtime command (`CMD`, `ENTRYPOINT`): exec form or shell form, as written.
    fn command(&mut self, instruction: &Instruction) -> Command {
        match self.json(instruction) {
            Some(items) => Command::Exec(items),
            None => {
                let span = instruction
                    .line
                    .span(instruction.args_start, instruction.line.text.len());
                Command::Shell(self.text(instruction.args().trim_end().to_string(), span))
            }
        }
    }

    fn run(&mut self, instruction: &Instruction) -> Option<ir::Run> {
        const FLAGS: &[&str] = &["mount", "network", "security"];
        let (flags, rest) = self.flags(instruction);
        let mut run = ir::Run {
            command: Command::Exec(Vec::new()),
            cache_mounts: Vec::new(),
            tmpfs_mounts: Vec::new(),
            bind_mounts: Vec::new(),
            ssh_mounts: Vec::new(),
            secrets: Vec::new(),
            network: if self.network_none {
                Network::None
            } else {
                Network::Host
            },
            timeout: None,
            insecure: false,
        };
        let mut ok = true;
        for (name, value, word) in flags {
            let Some(value) = self.known_flag_value(instruction, &name, value, &word, FLAGS) else {
                ok = false;
                continue;
            };
            let span = instruction.line.span(word.start, word.end);
            match name.as_str() {
                "network" => match value.as_str() {
                    "default" | "host" => run.network = Network::Host,
                    "none" => run.network = Network::None,
                    _ => {
                        self.error(
                            Code::RunNetwork,
                            format!("`--network={value}` is not a network"),
                            span,
                            "this network",
                            "write --network=none, --network=host or --network=default",
                        );
                        ok = false;
                    }
                },
                "security" => match value.as_str() {
                    "insecure" => run.insecure = true,
                    "sandbox" => run.insecure = false,
                    _ => {
                        self.error(
                            Code::DockerfileFlag,
                            format!("`--security={value}` is not a security mode"),
                            span,
                            "this mode",
                            "write --security=insecure or --security=sandbox",
                        );
                        ok = false;
                    }
                },
                _ => ok &= self.mount(&value, span, &mut run),
            }
        }
        let body = Instruction {
            keyword: instruction.keyword.clone(),
            line: instruction.line,
            args_start: rest,
            heredocs: instruction.heredocs,
            span: instruction.span,
        };
        let span = instruction.line.span(rest, instruction.line.text.len());
        let command_text = body.args().trim_end().to_string();
        if command_text.is_empty() {
            self.error(
                Code::DockerfileSyntax,
                "`RUN` needs a command",
                instruction.span,
                "no command",
                "write RUN COMMAND or RUN [\"EXECUTABLE\", \"ARG\"]",
            );
            return None;
        }
        run.command = if let Some(items) = self.json(&body) {
            Command::Exec(items)
        } else if instruction.heredocs.is_empty() {
            Command::Shell(self.text(command_text, span))
        } else {
            let heredocs = instruction.heredocs;
            let simple = heredocs.len() == 1
                && lex::heredoc_markers(&command_text).first().is_some_and(
                    |(name, _, position)| {
                        *position == 0
                            && command_text.trim_end().len()
                                == command_text.find(name.as_str()).unwrap_or(0)
                                    + name.len()
                                    + usize::from(command_text.trim_end().ends_with(['"', '\'']))
                    },
                );
            // As BuildKit: a lone heredoc is the script itself (run by its `#!` interpreter
            // when it has one); otherwise the shell gets the line and the heredocs.
            Command::Shell(self.text(
                if simple {
                    heredocs[0].content.clone()
                } else {
                    let mut full = command_text.clone();
                    for heredoc in heredocs {
                        full.push('\n');
                        full.push_str(&heredoc.content);
                        full.push_str(&heredoc.name);
                    }
                    full
                },
                span,
            ))
        };
        ok.then_some(run)
    }

    /// One `--mount=…`: a cache mount or a secret. Returns false after reporting a problem.
    fn mount(&mut self, value: &str, span: (usize, usize), run: &mut ir::Run) -> bool {
        let mut fields: Vec<(String, String)> = Vec::new();
        for part in value.split(',') {
            let (key, value) = part.split_once('=').unwrap_or((part, "true"));
            fields.push((key.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
        let get = |names: &[&str]| {
            fields
                .iter()
                .find(|(key, _)| names.contains(&key.as_str()))
                .map(|(_, value)| value.clone())
        };
        let kind = get(&["type"]).unwrap_or_else(|| "bind".into());
        let (allowed, help): (&[&str], &str) = match kind.as_str() {
            "cache" => (
                &[
                    "type",
                    "target",
                    "dst",
                    "destination",
                    "id",
                    "sharing",
                    "uid",
                    "gid",
                    "mode",
                ],
                "write --mount=type=cache,target=PATH[,id=ID][,uid=N,gid=N,mode=0755]",
            ),
            "secret" => (
                &[
                    "type",
                    "id",
                    "target",
                    "dst",
                    "destination",
                    "env",
                    "required",
                ],
                "write --mount=type=secret,id=ID[,target=PATH][,env=NAME][,required=true]",
            ),
            "tmpfs" => (
                &["type", "target", "dst", "destination", "size"],
                "write --mount=type=tmpfs,target=PATH[,size=64m]",
            ),
            "bind" => (
                &[
                    "type",
                    "target",
                    "dst",
                    "destination",
                    "source",
                    "src",
                    "from",
                    "ro",
                    "readonly",
                    "rw",
                    "readwrite",
                ],
                "write --mount=type=bind,target=PATH[,source=PATH][,from=STAGE|IMAGE][,rw]",
            ),
            "ssh" => (ssh::SSH_OPTIONS, ssh::SSH_HELP),
            other => {
                self.error(
                    Code::DockerfileUnsupported,
                    format!("`--mount=type={other}` is not supported yet"),
                    span,
                    "this mount",
                    "graphbuild supports --mount=type=cache, secret, tmpfs, ssh and bind (from the build context)",
                );
                return false;
            }
        };
        if let Some((key, _)) = fields
            .iter()
            .find(|(key, _)| !allowed.contains(&key.as_str()))
        {
            self.error(
                Code::DockerfileUnsupported,
                format!("`{key}` of a `type={kind}` mount is not supported"),
                span,
                "this mount",
                help,
            );
            return false;
        }
        let target = get(&["target", "dst", "destination"]);
        let at = self.loc(span);
        if kind == "ssh" {
            return self.ssh_mount(&fields, span, at, run);
        }
        if kind == "cache" {
            let Some(target) = target else {
                self.error(
                    Code::RunCacheMount,
                    "a cache mount needs `target=PATH`",
                    span,
                    "this mount",
                    help,
                );
                return false;
            };
            let sharing = match get(&["sharing"]).as_deref() {
                None | Some("shared") => CacheSharing::Shared,
                Some("private") => CacheSharing::Private,
                Some("locked") => CacheSharing::Locked,
                Some(other) => {
                    self.error(
                        Code::RunCacheMount,
                        format!("`sharing={other}` is not a sharing mode"),
                        span,
                        "this mount",
                        "write sharing=shared, sharing=private or sharing=locked",
                    );
                    return false;
                }
            };
            run.cache_mounts.push(CacheMount {
                target: self.text(lex::literal_raw(&target), span),
                id: get(&["id"]).map(|id| self.text(lex::literal_raw(&id), span)),
                sharing,
                uid: get(&["uid"]).map(|uid| self.text(lex::literal_raw(&uid), span)),
                gid: get(&["gid"]).map(|gid| self.text(lex::literal_raw(&gid), span)),
                mode: get(&["mode"]).map(|mode| self.text(lex::literal_raw(&mode), span)),
                at,
            });
            return true;
        }
        if kind == "bind" {
            let Some(target) = target else {
                self.error(
                    Code::RunBind,
                    "a bind mount needs `target=PATH`",
                    span,
                    "this mount",
                    help,
                );
                return false;
            };
            let Some((from, readwrite)) = self.bind_from(&fields, span) else {
                return false;
            };
            let default_source = if from.is_some() { "/" } else { "." };
            run.bind_mounts.push(BindMount {
                target: self.text(lex::literal_raw(&target), span),
                source: self.text(
                    lex::literal_raw(
                        &get(&["source", "src"]).unwrap_or_else(|| default_source.into()),
                    ),
                    span,
                ),
                from,
                readwrite,
                at,
            });
            return true;
        }
        if kind == "tmpfs" {
            let Some(target) = target else {
                self.error(
                    Code::RunTmpfs,
                    "a tmpfs mount needs `target=PATH`",
                    span,
                    "this mount",
                    help,
                );
                return false;
            };
            run.tmpfs_mounts.push(TmpfsMount {
                target: self.text(lex::literal_raw(&target), span),
                size: get(&["size"]).map(|size| self.text(lex::literal_raw(&size), span)),
                at,
            });
            return true;
        }
        let id = get(&["id"]).or_else(|| {
            target
                .as_deref()
                .and_then(|target| target.rsplit('/').next())
                .filter(|name| !name.is_empty())
                .map(str::to_string)
        });
        let Some(id) = id else {
            self.error(
                Code::RunSecret,
                "a secret mount needs `id=ID`",
                span,
                "this mount",
                help,
            );
            return false;
        };
        let required = match get(&["required"]).as_deref() {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                self.error(
                    Code::RunSecret,
                    format!("`required={other}` is not true or false"),
                    span,
                    "this mount",
                    help,
                );
                return false;
            }
        };
        run.secrets.push(Secret {
            id,
            target: target.map(|target| self.text(lex::literal_raw(&target), span)),
            env: get(&["env"]),
            required,
            at,
        });
        true
    }

    /// `COPY` as a [`StepKind::Copy`]; `ADD` as a [`StepKind::Add`].
    fn copy(&mut self, instruction: &Instruction) -> Option<StepKind> {
        let is_add = instruction.keyword == "ADD";
        const FLAGS: &[&str] = &[
            "from",
            "chown",
            "chmod",
            "link",
            "exclude",
            "parents",
            "checksum",
            "keep-git-dir",
        ];
        let mut checksum = None;
        let mut keep_git_dir = false;
        let (flags, rest) = self.flags(instruction);
        let mut copy = ir::Copy {
            sources: Vec::new(),
            dest: Text {
                raw: String::new(),
                at: self.loc(instruction.span),
            },
            from: None,
            chown: None,
            chmod: None,
            exclude: Vec::new(),
            inline: Vec::new(),
            parents: false,
        };
        let mut ok = true;
        for (name, value, word) in flags {
            let add_only = matches!(name.as_str(), "checksum" | "keep-git-dir");
            if !FLAGS.contains(&name.as_str())
                || (is_add && (name == "from" || name == "parents"))
                || (!is_add && add_only)
            {
                let known: &[&str] = if is_add {
                    &[
                        "chown",
                        "chmod",
                        "link",
                        "exclude",
                        "checksum",
                        "keep-git-dir",
                    ]
                } else {
                    &["from", "chown", "chmod", "link", "exclude", "parents"]
                };
                self.unknown_flag(instruction, &word, known);
                ok = false;
                continue;
            }
            if name == "link" {
                // --link only changes how BuildKit reuses layers, not the files: accepted.
                continue;
            }
            if name == "keep-git-dir" || name == "parents" {
                match self.boolean_flag(instruction, &name, value.as_deref(), &word) {
                    Some(value) if name == "parents" => copy.parents = value,
                    Some(value) => keep_git_dir = value,
                    None => ok = false,
                }
                continue;
            }
            let Some(value) = self.flag_value(instruction, &name, value, &word) else {
                ok = false;
                continue;
            };
            let value_word = Word {
                text: value.clone(),
                start: word.start + name.len() + 3,
                end: word.end,
            };
            let Some(text) = self.word(instruction, &value_word) else {
                ok = false;
                continue;
            };
            match name.as_str() {
                "from" => {
                    // A stage by name, or by its index even when it is named, as BuildKit.
                    let lower = text.raw.to_ascii_lowercase();
                    let stage = self
                        .stages
                        .iter()
                        .find(|(stage, _)| stage.name == lower)
                        .or_else(|| self.stages.get(text.raw.parse::<usize>().ok()?));
                    copy.from = Some(match stage {
                        Some((stage, _)) => CopyFrom::Stage(stage.name.clone(), text.at),
                        None => CopyFrom::Image(text),
                    });
                }
                "chown" => copy.chown = Some(text),
                "exclude" => copy.exclude.push(text),
                "checksum" => checksum = Some(text),
                _ => {
                    if !text.raw.contains('$') && crate::chmod::Chmod::parse(&text.raw).is_err() {
                        self.error(
                            Code::CopyChmod,
                            format!("`--chmod={}` is not a file mode", text.raw),
                            (text.at.span.offset(), text.at.span.len()),
                            "this mode",
                            "write an octal mode such as --chmod=0755 or a symbolic one such as --chmod=u+x,g-w",
                        );
                        ok = false;
                    }
                    copy.chmod = Some(text);
                }
            }
        }
        let heredocs = instruction.heredocs;
        let body = Instruction {
            keyword: instruction.keyword.clone(),
            line: instruction.line,
            args_start: rest,
            heredocs: instruction.heredocs,
            span: instruction.span,
        };
        let mut paths: Vec<Text> = match self.json(&body) {
            Some(items) => items
                .into_iter()
                .map(|item| Text {
                    raw: lex::literal_raw(&item.raw),
                    at: item.at,
                })
                .collect(),
            None => {
                let words = self.words(&body);
                words
                    .iter()
                    .filter_map(|word| self.word(&body, word))
                    .collect()
            }
        };
        if paths.len() < 2 {
            self.error(
                Code::CopyArguments,
                format!(
                    "`{}` needs at least one source and a destination",
                    instruction.keyword
                ),
                instruction.span,
                "this instruction",
                format!("write {} SOURCE… DEST", instruction.keyword),
            );
            return None;
        }
        copy.dest = paths.pop()?;
        if !heredocs.is_empty() {
            // `COPY <<EOF /file`: each `<<NAME` source is the heredoc of that name, a file named
            // NAME; its `$VAR`s are substituted unless the delimiter is quoted, as BuildKit.
            let words = self.words(&body);
            for (source, word) in paths.iter_mut().zip(&words) {
                let Some(marker) = word.text.strip_prefix("<<") else {
                    continue;
                };
                let marker = marker.strip_prefix('-').unwrap_or(marker);
                let quoted = marker.starts_with(['"', '\'']);
                let name = marker.trim_matches(['"', '\'']);
                let Some(heredoc) = heredocs.iter().find(|heredoc| heredoc.name == name) else {
                    continue;
                };
                copy.inline.push(InlineFile {
                    name: name.to_string(),
                    content: Text {
                        raw: heredoc.content.clone(),
                        at: source.at,
                    },
                    substitute: !quoted,
                });
                source.raw = name.to_string();
            }
            if copy.inline.len() != paths.len() {
                self.error(
                    Code::DockerfileUnsupported,
                    format!(
                        "`{}` mixes heredoc files with files from the build context",
                        instruction.keyword
                    ),
                    instruction.span,
                    "this instruction",
                    format!(
                        "write one {} for the heredocs and another for the context files",
                        instruction.keyword
                    ),
                );
                return None;
            }
        }
        copy.sources = paths;
        if !ok {
            return None;
        }
        Some(if is_add {
            StepKind::Add(ir::Add {
                copy,
                checksum,
                keep_git_dir,
            })
        } else {
            StepKind::Copy(copy)
        })
    }

    /// `ENV`/`LABEL`: `K=V …`, or the legacy `K V` (the rest of the line is the value).
    fn pairs(&mut self, instruction: &Instruction, legacy: bool) -> Option<Vec<(String, Text)>> {
        let words = self.words(instruction);
        let first_has_equals = words.first().is_some_and(|word| {
            lex::split_words(&word.text, 0, self.escape).len() == 1 && {
                let unquoted = word.text.split(['"', '\'']).next().unwrap_or_default();
                unquoted.contains('=')
            }
        });
        let mut pairs = Vec::new();
        if !first_has_equals && legacy {
            let name_word = words.first()?;
            let value_start = words.get(1).map_or(name_word.end, |word| word.start);
            let value = Word {
                text: instruction.line.text[value_start..].trim_end().to_string(),
                start: value_start,
                end: instruction.line.text.trim_end().len(),
            };
            let name = lex::word_to_raw(&name_word.text, self.escape)
                .unwrap_or_else(|_| name_word.text.clone())
                .replace("\\$", "$");
            let text = self.word(instruction, &value)?;
            pairs.push((name, text));
            return Some(pairs);
        }
        let mut ok = true;
        for word in &words {
            let Some(equals) = word.text.find('=') else {
                self.error(
                    Code::DockerfileSyntax,
                    format!(
                        "`{}` in `{}` is not KEY=VALUE",
                        word.text, instruction.keyword
                    ),
                    instruction.line.span(word.start, word.end),
                    "no `=`",
                    format!(
                        "write {} KEY=VALUE …; quote values with spaces: KEY=\"a b\"",
                        instruction.keyword
                    ),
                );
                ok = false;
                continue;
            };
            let key = match lex::word_to_raw(&word.text[..equals], self.escape) {
                Ok(key) => key.replace("\\$", "$"),
                Err(_) => word.text[..equals].to_string(),
            };
            let value = Word {
                text: word.text[equals + 1..].to_string(),
                start: word.start + equals + 1,
                end: word.end,
            };
            match self.word(instruction, &value) {
                Some(text) => pairs.push((key, text)),
                None => ok = false,
            }
        }
        ok.then_some(pairs)
    }

    fn healthcheck(&mut self, instruction: &Instruction) -> Option<Healthcheck> {
        const FLAGS: &[&str] = &["interval", "timeout", "start-period", "retries"];
        let (flags, rest) = self.flags(instruction);
        let mut check = Healthcheck {
            test: None,
            interval: None,
            timeout: None,
            start_period: None,
            retries: None,
        };
        let mut ok = true;
        for (name, value, word) in flags {
            let Some(value) = self.known_flag_value(instruction, &name, value, &word, FLAGS) else {
                ok = false;
                continue;
            };
            let span = instruction.line.span(word.start, word.end);
            match name.as_str() {
                "retries" => match value.parse::<u32>() {
                    Ok(retries) => check.retries = Some(retries),
                    Err(_) => {
                        self.error(
                            Code::DockerfileFlag,
                            format!("`--retries={value}` is not a whole number"),
                            span,
                            "this value",
                            "write --retries=3",
                        );
                        ok = false;
                    }
                },
                _ => {
                    let text = Some(self.text(lex::literal_raw(&value), span));
                    match name.as_str() {
                        "interval" => check.interval = text,
                        "timeout" => check.timeout = text,
                        _ => check.start_period = text,
                    }
                }
            }
        }
        let rest_text = instruction.line.text[rest..].trim_end();
        let (keyword, after) = rest_text
            .split_once(char::is_whitespace)
            .unwrap_or((rest_text, ""));
        match keyword.to_ascii_uppercase().as_str() {
            "NONE" if after.trim().is_empty() => return ok.then_some(check),
            "CMD" if !after.trim().is_empty() => {}
            _ => {
                self.error(
                    Code::DockerfileSyntax,
                    "`HEALTHCHECK` takes `NONE` or `[OPTIONS] CMD COMMAND`",
                    instruction.span,
                    "this healthcheck",
                    "write HEALTHCHECK --interval=30s CMD wget -q -O- http://localhost/ or HEALTHCHECK NONE",
                );
                return None;
            }
        }
        let command_start = instruction.line.text.len()
            - instruction.line.text[rest..]
                .trim_start_matches(|c: char| !c.is_whitespace())
                .trim_start()
                .len();
        let body = Instruction {
            keyword: instruction.keyword.clone(),
            line: instruction.line,
            args_start: command_start,
            heredocs: instruction.heredocs,
            span: instruction.span,
        };
        check.test = Some(self.command(&body));
        ok.then_some(check)
    }

    /// The image: the target stage (default: the last), with the command line's tags.
    fn image(&mut self, options: &Options, end: usize) -> Option<Image> {
        let Some((last, _)) = self.stages.last() else {
            if !self.diagnostics.iter().any(Diagnostic::is_error) {
                self.error(
                    Code::DockerfileNoStage,
                    "the Dockerfile has no `FROM`",
                    (end, 0),
                    "no stage",
                    "start a stage with FROM IMAGE, for example FROM alpine:3.20",
                );
            }
            return None;
        };
        let at = last.at;
        let stage = match &options.target {
            None => last.name.clone(),
            Some(target) => {
                let lower = target.to_ascii_lowercase();
                match self.stages.iter().find(|(stage, _)| stage.name == lower) {
                    Some((stage, _)) => stage.name.clone(),
                    None => {
                        let names: Vec<&str> = self
                            .stages
                            .iter()
                            .map(|(_, written)| written.as_str())
                            .collect();
                        let help = match crate::load::did_you_mean(&lower, names.iter().copied()) {
                            Some(name) => format!("did you mean `{name}`?"),
                            None => format!("the stages are {}", names.join(", ")),
                        };
                        self.diagnostics.push(
                            Diagnostic::error(
                                Code::DockerfileTarget,
                                format!("`--target {target}`: the Dockerfile has no such stage"),
                            )
                            .with_help(help),
                        );
                        return None;
                    }
                }
            }
        };
        let text = |raw: &str| Text {
            raw: lex::literal_raw(raw),
            at,
        };
        Some(Image {
            name: text(&options.image),
            at,
            stage,
            stage_at: at,
            tags: options.tags.iter().map(|tag| text(tag)).collect(),
            platforms: None,
            matrix: Vec::new(),
            annotations: options
                .annotations
                .iter()
                .map(|(key, value)| (key.clone(), text(value)))
                .collect(),
            labels: options
                .labels
                .iter()
                .map(|(key, value)| (key.clone(), text(value)))
                .collect(),
            output: options.output.as_deref().map(text),
            push: options.push,
            strict_arch: false,
            provenance: None,
            sbom: false,
            tests: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests;
