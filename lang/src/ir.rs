//! The lowered build file: plain data that the engine expands into a graph.
//!
//! This is the contract between `graphbuild-lang` and `graphbuild-engine`. Every value that a
//! user wrote carries a [`Loc`] (file + byte span) so the engine can point its own diagnostics
//! at the source, but locations never take part in equality of *meaning*: the engine derives
//! cache keys from substituted values only, so formatting and comments never change a key.
//!
//! Strings that may contain `$VAR` references are kept raw as [`Text`]; the engine substitutes
//! them per (image, matrix values, platform) with [`crate::subst`], recording which variables
//! each step reads.

use std::path::PathBuf;
use std::sync::Arc;

use miette::{NamedSource, SourceSpan};

use crate::platform::Platform;

/// Index into [`Sources`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId(pub u32);

/// A location in a loaded source file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Loc {
    pub file: FileId,
    pub span: SourceSpan,
}

/// One loaded source file: the root build file, a local import or an embedded `std:` module.
#[derive(Clone, Debug)]
pub struct Source {
    /// The name shown in diagnostics: the path as the user wrote it, or `std:NAME`.
    pub name: String,
    /// The path on disk, `None` for embedded stdlib modules.
    pub path: Option<PathBuf>,
    pub text: Arc<String>,
    /// Where each line starts, computed once on first use: locations of a file with
    /// thousands of steps are each found by a binary search, not a scan from its start.
    line_starts: Arc<std::sync::OnceLock<Vec<usize>>>,
}

impl Source {
    pub fn new(name: impl Into<String>, path: Option<PathBuf>, text: Arc<String>) -> Source {
        Source {
            name: name.into(),
            path,
            text,
            line_starts: Arc::default(),
        }
    }

    /// 1-based line and (byte) column of an offset.
    fn line_and_column(&self, offset: usize) -> (usize, usize) {
        let starts = self.line_starts.get_or_init(|| {
            std::iter::once(0)
                .chain(self.text.match_indices('\n').map(|(index, _)| index + 1))
                .collect()
        });
        let line = starts.partition_point(|start| *start <= offset).max(1);
        (line, offset - starts[line - 1] + 1)
    }
}

/// Every file the project was loaded from.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    pub files: Vec<Source>,
}

impl Sources {
    pub fn get(&self, id: FileId) -> &Source {
        &self.files[id.0 as usize]
    }

    /// A miette source for the file, to attach to a diagnostic. Control characters other
    /// than newline, carriage return and tab are shown as `?` (one per byte, so every span
    /// still points at the same text): a build file cannot drive the terminal of whoever
    /// reads its diagnostics.
    pub fn named_source(&self, id: FileId) -> NamedSource<Arc<String>> {
        let source = self.get(id);
        let shown = |c: char| !c.is_control() || matches!(c, '\n' | '\r' | '\t');
        let text = if source.text.chars().all(shown) {
            source.text.clone()
        } else {
            let mut safe = String::with_capacity(source.text.len());
            for c in source.text.chars() {
                if shown(c) {
                    safe.push(c);
                } else {
                    safe.extend(std::iter::repeat_n('?', c.len_utf8()));
                }
            }
            Arc::new(safe)
        };
        NamedSource::new(source.name.clone(), text).with_language("kdl")
    }

    /// `file:line:col` (1-based) of a location, for plain-text messages.
    pub fn describe(&self, loc: Loc) -> String {
        let Position { file, line, column } = self.position(loc);
        format!("{file}:{line}:{column}")
    }

    /// The file name, line and column (1-based, the column in bytes) where a location starts,
    /// for machine-readable output.
    pub fn position(&self, loc: Loc) -> Position {
        let source = self.get(loc.file);
        let offset = loc.span.offset().min(source.text.len());
        let (line, column) = source.line_and_column(offset);
        Position {
            file: source.name.clone(),
            line,
            column,
        }
    }
}

/// Where a location starts: see [`Sources::position`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    /// The file's name as shown in diagnostics ([`Source::name`]).
    pub file: String,
    pub line: usize,
    pub column: usize,
}

/// A string as written, before `$VAR` substitution.
#[derive(Clone, Debug)]
pub struct Text {
    pub raw: String,
    pub at: Loc,
}

/// A whole, validated build file with its imports resolved and templates instantiated.
#[derive(Clone, Debug)]
pub struct Project {
    pub sources: Sources,
    /// The root file's directory: the default build context and base for relative paths.
    pub root_dir: PathBuf,
    /// Top-level `platforms`: the default platform matrix. Empty means the host platform.
    pub platforms: Vec<PlatformSpec>,
    /// Top-level `arg NAME=default` declarations, in order (imports' args included).
    pub args: Vec<ArgDecl>,
    /// Every stage, including template instances, with unique names, in source order.
    pub stages: Vec<Stage>,
    /// Template instances; [`Stage::scope`] points here.
    pub scopes: Vec<Scope>,
    pub images: Vec<Image>,
    /// `group NAME { targets "image" "stage" "group" … }`: names `graphbuild run FILE NAME`
    /// selects at once, as bake's groups; a group named `default` is what `run` builds when
    /// no name is given.
    pub groups: Vec<Group>,
    /// Dockerfile rules rather than KDL's (`true` for a Dockerfile): inside a stage only the
    /// args it declares (`ARG NAME`, which takes a global's or an automatic arg's value) are
    /// visible to substitution and to `run`, global and automatic args serving `FROM` and
    /// `--platform`; and the values of one `env` see the environment from before it, not each
    /// other; `entrypoint`, `cmd` and `healthcheck` are kept as written. In KDL every global
    /// and automatic arg is in scope everywhere, each `env` value sees the ones before it, and
    /// build variables are substituted into runtime commands.
    pub docker_rules: bool,
    /// Warnings found while loading (for example an undefined variable). Errors never reach
    /// a `Project`: loading returns them instead.
    pub warnings: Vec<crate::Diagnostic>,
}

#[derive(Clone, Debug)]
pub struct Group {
    pub name: String,
    pub at: Loc,
    /// Image, stage or group names, as written.
    pub targets: Vec<Text>,
}

/// A platform as written: either a literal (already parsed and validated) or a string with
/// `$VAR`s (for example `"$BUILDPLATFORM"`) that the engine parses after substitution.
#[derive(Clone, Debug)]
pub enum PlatformSpec {
    Literal(Platform, Loc),
    Dynamic(Text),
}

#[derive(Clone, Debug)]
pub struct ArgDecl {
    pub name: String,
    pub default: Option<Text>,
    /// `arg NAME=(env)"default"` or `arg (env)NAME`: the environment variable `NAME` of the
    /// process that plans the build, when set, takes the place of the default (an explicit
    /// `--arg NAME=…` still wins).
    pub from_env: bool,
    pub at: Loc,
}

#[derive(Clone, Debug)]
pub struct Stage {
    /// Unique name. Template instances are named `INSTANCE/STAGE` (see [`Scope::name`]).
    pub name: String,
    pub at: Loc,
    pub from: From,
    /// `platform "…"`: where the stage's steps run. `None`: the target platform.
    pub platform: Option<PlatformSpec>,
    pub steps: Vec<Step>,
    /// The template instance this stage belongs to, for its param bindings.
    pub scope: Option<ScopeId>,
    /// Dockerfile variable rules for this stage ([`Project::docker_rules`] describes them):
    /// every stage of a Dockerfile, a Dockerfile imported into KDL, or KDL's
    /// `stage NAME rules="dockerfile"` (what `graphbuild convert` writes).
    pub docker_rules: bool,
}

#[derive(Clone, Debug)]
pub struct From {
    pub source: FromSource,
    pub at: Loc,
}

#[derive(Clone, Debug)]
pub enum FromSource {
    /// `from "scratch"`: an empty filesystem.
    Scratch,
    /// Another stage, by its unique name (already checked to exist).
    Stage(String),
    /// `"oci:PATH[:TAG]"` or a registry reference, possibly with `$VAR`s. After substitution
    /// the engine treats a value equal to a stage name as that stage, like Docker does.
    Image(Text),
}

#[derive(Clone, Debug)]
pub struct Step {
    pub kind: StepKind,
    pub at: Loc,
    /// Set for steps inside `when platform="…" { … }`: the step applies only when the target
    /// platform equals this one.
    pub when: Option<Platform>,
}

impl Step {
    /// The statement as written, from the step's name through its last argument or property
    /// (not its children): what a diagnostic about the whole step underlines. [`Step::at`]
    /// itself is the name only.
    pub fn statement_at(&self) -> Loc {
        let mut parts: Vec<Loc> = Vec::new();
        match &self.kind {
            StepKind::Run(run) => {
                match &run.command {
                    Command::Shell(text) => parts.push(text.at),
                    Command::Exec(argv) => parts.extend(argv.iter().map(|text| text.at)),
                }
                parts.extend(run.timeout.iter().map(|text| text.at));
            }
            StepKind::Add(Add { copy, .. }) | StepKind::Copy(copy) => {
                let texts = copy.sources.iter().chain([&copy.dest]);
                let texts = texts.chain(&copy.chown).chain(&copy.chmod);
                parts.extend(texts.map(|text| text.at));
                match &copy.from {
                    Some(CopyFrom::Image(text)) => parts.push(text.at),
                    Some(CopyFrom::Stage(_, at)) => parts.push(*at),
                    None => {}
                }
            }
            _ => {}
        }
        let start = self.at.span.offset();
        let mut end = start + self.at.span.len();
        for at in parts {
            // Arguments written after the name, in the same file (a template's value, written
            // elsewhere, is not part of the statement).
            if at.file == self.at.file && at.span.offset() >= start {
                end = end.max(at.span.offset() + at.span.len());
            }
        }
        Loc {
            file: self.at.file,
            span: SourceSpan::new(start.into(), end - start),
        }
    }
}

#[derive(Clone, Debug)]
pub enum StepKind {
    Run(Run),
    Copy(Copy),
    /// `add` (Dockerfile `ADD`): a copy whose source may be a URL, a git repository or a local
    /// archive to extract; see [`Add`].
    Add(Add),
    /// `env K=V …`: later steps and the image see these.
    Env(Vec<(String, Text)>),
    /// `arg NAME[=default]` inside a stage: NAME is in scope from here on and enters the
    /// environment of later `run` steps.
    Arg(ArgDecl),
    Workdir(Text),
    User(Text),
    Label(Vec<(String, Text)>),
    /// `expose "8080" "53/udp"`.
    Expose(Vec<Text>),
    Entrypoint(Command),
    Cmd(Command),
    Volume(Vec<Text>),
    /// `shell "/bin/bash" "-c"`: the shell for later shell-form commands.
    Shell(Vec<Text>),
    StopSignal(Text),
    Healthcheck(Healthcheck),
}

/// A command in shell form (one string, run through the stage's `shell`) or exec form (argv).
#[derive(Clone, Debug)]
pub enum Command {
    Shell(Text),
    Exec(Vec<Text>),
}

#[derive(Clone, Debug)]
pub struct Run {
    pub command: Command,
    pub cache_mounts: Vec<CacheMount>,
    /// `tmpfs "PATH" size="64m"`: an empty in-memory directory for this step only.
    pub tmpfs_mounts: Vec<TmpfsMount>,
    /// `bind "/src" source="."`: part of the build context, read-only, for this step only.
    pub bind_mounts: Vec<BindMount>,
    /// `ssh "default"`: an ssh agent socket (supplied with `--ssh`), for this step only.
    pub ssh_mounts: Vec<SshMount>,
    pub secrets: Vec<Secret>,
    pub network: Network,
    /// `timeout="10m"`: the step is killed and fails after this long.
    pub timeout: Option<Text>,
    /// `insecure=#true`: every capability and no seccomp filter for this step.
    pub insecure: bool,
}

#[derive(Clone, Debug)]
pub struct CacheMount {
    /// Where the directory appears inside the rootfs.
    pub target: Text,
    /// `id="…"`: defaults to the target path. Mounts with one id and platform share a directory.
    pub id: Option<Text>,
    /// `sharing="shared|private|locked"`, as Docker's `--mount type=cache,sharing=…`.
    pub sharing: CacheSharing,
    /// `uid=`, `gid=`, `mode="0755"`: the owner and mode the directory gets when it is created
    /// (empty), as Docker's cache-mount options.
    pub uid: Option<Text>,
    pub gid: Option<Text>,
    pub mode: Option<Text>,
    pub at: Loc,
}

/// An empty tmpfs mounted on `target` while the step runs, as Docker's
/// `RUN --mount=type=tmpfs`: what the step writes there is in no layer.
#[derive(Clone, Debug)]
pub struct TmpfsMount {
    pub target: Text,
    /// `size="64m"`: the most the tmpfs may hold (default: the kernel's, half of the RAM).
    pub size: Option<Text>,
    pub at: Loc,
}

/// Part of the build context, or of a stage's or an image's filesystem, mounted on `target`
/// while the step runs, as Docker's `RUN --mount=type=bind`: in no layer, its content (or the
/// stage's key) in the step's key.
#[derive(Clone, Debug)]
pub struct BindMount {
    pub target: Text,
    /// A path in the build context (`.` by default) or, with `from`, in that filesystem (`/`
    /// by default); a directory or a file.
    pub source: Text,
    /// `from="STAGE"` / `--mount=type=bind,from=…`: a stage's or an image's filesystem.
    pub from: Option<CopyFrom>,
    /// `rw=#true` / `rw`: writable, what the step writes there discarded afterwards (Docker's
    /// semantics); read-only otherwise.
    pub readwrite: bool,
    pub at: Loc,
}

/// An ssh agent socket on `target` while the step runs, as Docker's `RUN --mount=type=ssh`:
/// the agent supplied with `--ssh ID=…`, reached through a proxy that only lists keys and
/// signs. Only the id and the options below are in the step's key, never a path or a key.
#[derive(Clone, Debug)]
pub struct SshMount {
    /// `default` unless named.
    pub id: Text,
    /// Default `/run/buildkit/ssh_agent.N` (N counts the step's ssh mounts), as BuildKit.
    pub target: Option<Text>,
    /// A step whose id is not supplied fails before the build starts; otherwise it runs
    /// without the socket.
    pub required: bool,
    /// The socket's owner and mode (default root, `0600`), as Docker's options.
    pub uid: Option<Text>,
    pub gid: Option<Text>,
    pub mode: Option<Text>,
    pub at: Loc,
}

/// How steps running at the same time use one cache mount.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CacheSharing {
    /// Every step uses the directory at once (Docker's default).
    #[default]
    Shared,
    /// A step finding the directory in use gets another directory of its own.
    Private,
    /// One step at a time; the others wait.
    Locked,
}

#[derive(Clone, Debug)]
pub struct Secret {
    /// The secret's id, supplied at run time with `--secret id=…,src=…|env=…`.
    pub id: String,
    /// `target="/run/secrets/ID"` by default: a file mounted only for this step.
    pub target: Option<Text>,
    /// `env="NAME"`: expose the secret as this environment variable instead of a file.
    pub env: Option<String>,
    /// `required=#false` lets the step run without the secret.
    pub required: bool,
    pub at: Loc,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Network {
    /// The host's network (the default, like BuildKit's).
    #[default]
    Host,
    /// No network at all: a fresh network namespace with only loopback.
    None,
}

#[derive(Clone, Debug)]
pub struct Copy {
    /// Sources: paths or globs in the build context, or in the `from=` stage's filesystem.
    pub sources: Vec<Text>,
    pub dest: Text,
    /// `from=STAGE`: copy from that stage's filesystem instead of the build context.
    pub from: Option<CopyFrom>,
    /// `chown="user:group"` (numeric or names from the stage's /etc/passwd and /etc/group).
    pub chown: Option<Text>,
    /// `chmod="0755"` (octal).
    pub chmod: Option<Text>,
    /// `exclude="*.md"` (repeatable; Docker's `COPY --exclude`): `.dockerignore` patterns,
    /// relative to each source, of what not to copy.
    pub exclude: Vec<Text>,
    /// Files the build file writes itself (KDL `file`, a Dockerfile `COPY <<EOF`): when not
    /// empty, `sources` are their names and nothing comes from the context.
    pub inline: Vec<InlineFile>,
    /// `parents=#true` / `--parents`: each source keeps its path in the context under the
    /// destination (from a `/./` in the source on, when it has one), as BuildKit's.
    pub parents: bool,
}

/// `add SOURCE… DEST` (Dockerfile `ADD`). What each source is, is decided after
/// substitution, as Docker does: an `http(s)://` URL is downloaded on the host, a git URL
/// (`git@…`, `git://…`, `ssh://…`, or an `http(s)` URL whose path ends in `.git`, each with an
/// optional `#REF[:SUBDIR]`) is cloned on the host, and a local file of the build context that
/// is a tar archive (plain, gzip, bzip2, xz or zstd, recognized by its content) is extracted.
/// Anything else is copied as `copy` copies it.
#[derive(Clone, Debug)]
pub struct Add {
    /// Sources, destination, `chown` and `chmod` (never `from`, `exclude` or inline files).
    pub copy: Copy,
    /// `checksum="sha256:…"` (`ADD --checksum`): what a downloaded file must hash to. Its key
    /// is then the checksum, so a cached step needs no download.
    pub checksum: Option<Text>,
    /// `keep-git-dir=#true` (`ADD --keep-git-dir`): keep the repository's `.git`.
    pub keep_git_dir: bool,
}

#[derive(Clone, Debug)]
pub struct InlineFile {
    /// The file's name (the source `sources` lists).
    pub name: String,
    pub content: Text,
    /// Whether `$VAR`s in the content are substituted (a Dockerfile heredoc with an unquoted
    /// delimiter); KDL's `file` content is written as is.
    pub substitute: bool,
}

#[derive(Clone, Debug)]
pub enum CopyFrom {
    Stage(String, Loc),
    /// `from="oci:…"` or a registry reference: copy out of an image.
    Image(Text),
}

#[derive(Clone, Debug)]
pub struct Healthcheck {
    /// `None` disables a healthcheck inherited from the base image (`healthcheck none=#true`).
    pub test: Option<Command>,
    pub interval: Option<Text>,
    pub timeout: Option<Text>,
    pub start_period: Option<Text>,
    pub retries: Option<u32>,
}

/// One instantiation of a template by `use`.
#[derive(Clone, Debug)]
pub struct Scope {
    /// The instance name that prefixes its stages' names (unique per project).
    pub name: String,
    /// The template's name as written at the use site, e.g. `py.app`.
    pub template: String,
    /// Every param of the template, bound to the use site's value or the param's default.
    /// Values are evaluated in the using image's context (matrix values, global args).
    pub bindings: Vec<(String, Text)>,
    pub at: Loc,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ScopeId(pub u32);

#[derive(Clone, Debug)]
pub struct Image {
    /// The image's name, possibly with matrix `$VAR`s (`"py-${PY}"`).
    pub name: Text,
    pub at: Loc,
    /// The stage whose result is the image: named by `stage`, or the last stage of the
    /// template instance created by `use`.
    pub stage: String,
    pub stage_at: Loc,
    pub tags: Vec<Text>,
    /// `platforms …` on the image: overrides the top-level matrix. `None`: the default.
    pub platforms: Option<Vec<PlatformSpec>>,
    /// `matrix { KEY "v1" "v2"; … }`: one image per combination (cartesian, in key order).
    pub matrix: Vec<MatrixAxis>,
    pub annotations: Vec<(String, Text)>,
    pub labels: Vec<(String, Text)>,
    /// `output "PATH"`: where the OCI layout goes (default: `<--output>/<image name>`); or
    /// `output "type=local,dest=DIR"` (buildx's CSV form): an exporter for this image.
    pub output: Option<Text>,
    /// `push=#true`: push every tag after building (as `--push` does for all images).
    pub push: bool,
    /// `strict-arch=#true`: an ELF file of another architecture fails the build (`--strict`).
    pub strict_arch: bool,
    /// `provenance="min"|"max"` or `provenance=#false`: this image's SLSA provenance, over
    /// `--provenance`. `None`: as the command line says.
    pub provenance: Option<ProvenanceSetting>,
    /// `sbom=#true`: an SPDX SBOM of each platform, as `--sbom` does for every image.
    pub sbom: bool,
    /// `test NAME { … }`: commands run inside the finished image, for every platform.
    pub tests: Vec<ImageTest>,
}

/// An image's `provenance` property.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProvenanceSetting {
    Off,
    Min,
    Max,
}

/// `test NAME { … }` on an image: a command run inside the finished image of each platform
/// (under qemu for a foreign CPU), with the image's own settings unless the test overrides
/// them, and what it must print and return.
#[derive(Clone, Debug)]
pub struct ImageTest {
    pub name: Text,
    pub at: Loc,
    pub command: TestCommand,
    /// `entrypoint "…" …`: replaces the image's entrypoint (and, as `docker run --entrypoint`
    /// does, its cmd).
    pub entrypoint: Option<Command>,
    pub user: Option<Text>,
    pub workdir: Option<Text>,
    /// `env K=V …`: added to (or replacing) the image's environment.
    pub env: Vec<(String, Text)>,
    /// `exit N`: the exit code the command must end with (0 unless set).
    pub exit_code: i32,
    /// `output`/`stdout`/`stderr contains="…" matches="…"`: every one must hold.
    pub output: Vec<OutputCheck>,
    /// `timeout "30s"`.
    pub timeout: Option<Text>,
    /// `platforms "…" …`: the test runs only for these of the image's platforms.
    pub platforms: Option<Vec<Platform>>,
}

/// What a test runs.
#[derive(Clone, Debug)]
pub enum TestCommand {
    /// Neither `run` nor `cmd`: the image's entrypoint and cmd, as `docker run IMAGE` does.
    Image,
    /// `cmd "…" …`: arguments replacing the image's cmd, after its entrypoint, as
    /// `docker run IMAGE ARGS…` does (`shell=#true`: through the image's shell).
    Cmd(Command),
    /// `run "…"`: the command alone, without the image's entrypoint (one string through the
    /// image's shell, several as argv), like a `run` step.
    Run(Command),
}

/// One output check of a test: the stream's text must contain `contains` and match the
/// regular expression `matches` (each when given).
#[derive(Clone, Debug)]
pub struct OutputCheck {
    pub stream: OutputStream,
    pub contains: Option<Text>,
    /// A regular expression, taken as written: never substituted (`$` is an anchor).
    pub matches: Option<Text>,
    pub at: Loc,
}

/// What an output check reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputStream {
    /// `output`: stdout and stderr together, as a terminal shows them.
    Output,
    Stdout,
    Stderr,
}

#[derive(Clone, Debug)]
pub struct MatrixAxis {
    pub key: String,
    pub values: Vec<Text>,
    pub at: Loc,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn locations_are_line_and_byte_column_from_one() {
        let sources = Sources {
            files: vec![Source::new("f.kdl", None, Arc::new("ab\ncd\n\nx".into()))],
        };
        let at = |offset: usize| {
            sources.describe(Loc {
                file: FileId(0),
                span: (offset, 0).into(),
            })
        };
        assert_eq!(at(0), "f.kdl:1:1");
        assert_eq!(at(2), "f.kdl:1:3", "the newline itself ends line 1");
        assert_eq!(at(3), "f.kdl:2:1");
        assert_eq!(at(6), "f.kdl:3:1");
        assert_eq!(at(7), "f.kdl:4:1");
        assert_eq!(at(99), "f.kdl:4:2", "past the end: clamped to the end");
        let position = sources.position(Loc {
            file: FileId(0),
            span: (4, 1).into(),
        });
        assert_eq!(
            (position.file.as_str(), position.line, position.column),
            ("f.kdl", 2, 2)
        );
    }

    #[test]
    fn a_statement_runs_from_the_step_name_to_its_last_argument() {
        let text = "stage s {\n    from \"scratch\"\n    run \"make\" \"all\" timeout=\"1m\" {\n        cache-mount \"/c\"\n    }\n    copy \"a\" \"b\" from=s2 chmod=\"0644\"\n    env A=\"1\"\n}\nstage s2 { from \"scratch\"; }\nimage i { stage s; }\n";
        let project = crate::load_source("f.kdl", text, Path::new("/")).expect("loads");
        let statement = |index: usize| {
            let at = project.stages[0].steps[index].statement_at();
            &text[at.span.offset()..at.span.offset() + at.span.len()]
        };
        assert_eq!(statement(0), "run \"make\" \"all\" timeout=\"1m\"");
        assert_eq!(statement(1), "copy \"a\" \"b\" from=s2 chmod=\"0644\"");
        assert_eq!(statement(2), "env", "other steps: the name only");
    }
}
