//! `graphbuild convert`: Dockerfiles, already lowered to the IR by the front end, written back
//! out as an `images.kdl` a person would write (one node per instruction, `env`/`label` pairs
//! grouped as the instruction grouped them, heredoc scripts as multi-line strings).
//!
//! # Equivalence, checked rather than hoped for
//!
//! The KDL written is loaded again with the KDL loader and every stage is compared, step by
//! step, with the Dockerfile's IR (locations left out). A step whose KDL lowers to something
//! else is a *loss*: a warning pointing at the Dockerfile's line, never a silent difference.
//! Constructs known to have no KDL form (a one-word exec-form `RUN ["x"]`, several heredocs in
//! one `COPY`) are reported the same way, with a reason. So adding an IR feature needs only
//! its KDL spelling in [`Writer::step`]: until then the comparison reports it.
//!
//! # Variable rules
//!
//! Dockerfile and KDL scope build args differently (docs/dockerfile.md, "Variable scope"). A
//! stage whose meaning could differ (it has a `RUN`, whose environment depends on the rules,
//! or any `$` in its steps) is written `stage NAME rules="dockerfile"`, which gives it the
//! Dockerfile's rules inside a KDL file; the others are plain KDL stages.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use crate::Code;
use crate::ir::{
    ArgDecl, Command, CopyFrom, FromSource, PlatformSpec, Project, Stage, Step, StepKind, Text,
};
use crate::{Diagnostic, Diagnostics};

/// One Dockerfile to convert, already loaded by [`super::load`] (its `images[0]` is the image
/// to write, with the name, tags and target the command line gave).
pub struct Input<'a> {
    pub project: &'a Project,
}

/// The KDL text and what it could not express.
pub struct Converted {
    pub kdl: String,
    /// One warning per construct the KDL does not express exactly (code `graphbuild::convert`),
    /// each pointing at the Dockerfile's line.
    pub losses: Vec<Diagnostic>,
}

/// Writes one KDL file for `inputs`. `platforms` is the top-level matrix (`--platform`);
/// several Dockerfiles get their stages prefixed by their image's name (`api.build`).
pub fn to_kdl(inputs: &[Input], platforms: &[String], header: &str) -> Converted {
    let mut writer = Writer::default();
    for line in header.lines() {
        writeln!(writer.out, "// {line}").ok();
    }
    if !header.is_empty() {
        writer.out.push('\n');
    }
    let mut projects: Vec<Project> = inputs.iter().map(|input| input.project.clone()).collect();
    if projects.len() > 1 {
        for project in &mut projects {
            prefix_stages(project);
        }
    }
    if !platforms.is_empty() {
        let list: Vec<String> = platforms.iter().map(|p| kdl_string(p)).collect();
        writeln!(writer.out, "platforms {}", list.join(" ")).ok();
    }
    writer.args(&projects);
    for project in &projects {
        for stage in &project.stages {
            writer.stage(project, stage);
        }
    }
    for project in &projects {
        for image in &project.images {
            writer.out.push('\n');
            writeln!(writer.out, "image {} {{", kdl_name(&image.name.raw)).ok();
            writeln!(writer.out, "    stage {}", kdl_name(&image.stage)).ok();
            if !image.tags.is_empty() {
                let tags: Vec<String> = image.tags.iter().map(|t| kdl_string(&t.raw)).collect();
                writeln!(writer.out, "    tags {}", tags.join(" ")).ok();
            }
            for (key, value) in &image.labels {
                writeln!(
                    writer.out,
                    "    label {}={}",
                    kdl_key(key),
                    kdl_string(&value.raw)
                )
                .ok();
            }
            for (key, value) in &image.annotations {
                writeln!(
                    writer.out,
                    "    annotation {}={}",
                    kdl_key(key),
                    kdl_string(&value.raw)
                )
                .ok();
            }
            writer.out.push_str("}\n");
        }
    }
    let kdl = writer.out;
    let mut losses = writer.losses;
    verify(&projects, &kdl, &mut losses);
    Converted { kdl, losses }
}

/// Renames every stage of a project `IMAGE.STAGE` (several Dockerfiles in one KDL file).
fn prefix_stages(project: &mut Project) {
    let Some(prefix) = project.images.first().map(|image| image.name.raw.clone()) else {
        return;
    };
    let rename = |name: &mut String| *name = format!("{prefix}.{name}");
    for stage in &mut project.stages {
        rename(&mut stage.name);
        if let FromSource::Stage(name) = &mut stage.from.source {
            rename(name);
        }
        for step in &mut stage.steps {
            if let StepKind::Copy(copy) = &mut step.kind
                && let Some(CopyFrom::Stage(name, _)) = &mut copy.from
            {
                rename(name);
            }
            if let StepKind::Run(run) = &mut step.kind {
                for mount in &mut run.bind_mounts {
                    if let Some(CopyFrom::Stage(name, _)) = &mut mount.from {
                        rename(name);
                    }
                }
            }
        }
    }
    for image in &mut project.images {
        rename(&mut image.stage);
    }
}

#[derive(Default)]
struct Writer {
    out: String,
    losses: Vec<Diagnostic>,
}

impl Writer {
    fn loss(&mut self, project: &Project, at: crate::ir::Loc, message: String, help: &str) {
        self.losses.push(
            Diagnostic::warning(Code::Convert, message)
                .with_label(&project.sources, at, "not expressed exactly in KDL")
                .with_help(help),
        );
    }

    /// Global args of every Dockerfile; one name with two defaults is a loss.
    fn args(&mut self, projects: &[Project]) {
        let mut written: Vec<&ArgDecl> = Vec::new();
        let mut lines = String::new();
        for project in projects {
            for arg in &project.args {
                if let Some(previous) = written.iter().find(|seen| seen.name == arg.name) {
                    let same = previous.default.as_ref().map(|t| &t.raw)
                        == arg.default.as_ref().map(|t| &t.raw);
                    if !same {
                        self.loss(
                            project,
                            arg.at,
                            format!("the global arg `{}` has another default in another Dockerfile", arg.name),
                            "a KDL file has one set of global args: give both Dockerfiles one default, or convert them separately",
                        );
                    }
                    continue;
                }
                written.push(arg);
                lines.push_str(&arg_line(arg));
                lines.push('\n');
            }
        }
        if !lines.is_empty() {
            self.out.push('\n');
            self.out.push_str(&lines);
        }
    }

    fn stage(&mut self, project: &Project, stage: &Stage) {
        self.out.push('\n');
        let rules = if needs_docker_rules(stage) {
            " rules=\"dockerfile\""
        } else {
            ""
        };
        writeln!(self.out, "stage {}{rules} {{", kdl_name(&stage.name)).ok();
        let from = match &stage.from.source {
            FromSource::Scratch => kdl_string("scratch"),
            FromSource::Stage(name) => kdl_name(name),
            FromSource::Image(text) => kdl_string(&image_reference(&text.raw)),
        };
        writeln!(self.out, "    from {from}").ok();
        match &stage.platform {
            Some(PlatformSpec::Literal(platform, _)) => {
                writeln!(
                    self.out,
                    "    platform {}",
                    kdl_string(&platform.to_string())
                )
                .ok();
            }
            Some(PlatformSpec::Dynamic(text)) => {
                writeln!(self.out, "    platform {}", kdl_string(&text.raw)).ok();
            }
            None => {}
        }
        for step in &stage.steps {
            self.step(project, step);
        }
        self.out.push_str("}\n");
    }

    fn step(&mut self, project: &Project, step: &Step) {
        const IN: &str = "    ";
        if step.when.is_some() {
            self.loss(
                project,
                step.at,
                "a per-platform step".into(),
                "write it inside `when platform=\"…\" { … }` by hand",
            );
        }
        let line = match &step.kind {
            StepKind::Run(run) => {
                let mut line = String::from("run");
                match &run.command {
                    Command::Shell(text) => {
                        line.push(' ');
                        line.push_str(&kdl_string_at(&text.raw, IN));
                    }
                    Command::Exec(args) => {
                        if args.len() < 2 {
                            self.loss(
                                project,
                                step.at,
                                "a one-word exec-form `RUN [\"…\"]`".into(),
                                "KDL's one-string `run` is shell form: write RUN [\"sh\", \"-c\", \"…\"] or the shell form",
                            );
                        }
                        for arg in args {
                            line.push(' ');
                            line.push_str(&kdl_string_at(&arg.raw, IN));
                        }
                    }
                }
                if run.insecure {
                    line.push_str(" insecure=#true");
                }
                if let Some(timeout) = &run.timeout {
                    write!(line, " timeout={}", kdl_string(&timeout.raw)).ok();
                }
                let mut children = Vec::new();
                for mount in &run.cache_mounts {
                    let mut child = format!("cache-mount {}", kdl_string(&mount.target.raw));
                    if let Some(id) = &mount.id {
                        write!(child, " id={}", kdl_string(&id.raw)).ok();
                    }
                    match mount.sharing {
                        crate::ir::CacheSharing::Shared => {}
                        crate::ir::CacheSharing::Private => child.push_str(" sharing=\"private\""),
                        crate::ir::CacheSharing::Locked => child.push_str(" sharing=\"locked\""),
                    }
                    for (name, value) in [
                        ("uid", &mount.uid),
                        ("gid", &mount.gid),
                        ("mode", &mount.mode),
                    ] {
                        if let Some(value) = value {
                            write!(child, " {name}={}", kdl_string(&value.raw)).ok();
                        }
                    }
                    children.push(child);
                }
                for mount in &run.tmpfs_mounts {
                    let mut child = format!("tmpfs {}", kdl_string(&mount.target.raw));
                    if let Some(size) = &mount.size {
                        write!(child, " size={}", kdl_string(&size.raw)).ok();
                    }
                    children.push(child);
                }
                for mount in &run.bind_mounts {
                    let mut child = format!("bind {}", kdl_string(&mount.target.raw));
                    let default_source = if mount.from.is_some() { "/" } else { "." };
                    if mount.source.raw != default_source {
                        write!(child, " source={}", kdl_string(&mount.source.raw)).ok();
                    }
                    child.push_str(&from_property(&mount.from));
                    if mount.readwrite {
                        child.push_str(" rw=#true");
                    }
                    children.push(child);
                }
                for mount in &run.ssh_mounts {
                    let mut child = String::from("ssh");
                    if mount.id.raw != "default" {
                        write!(child, " {}", kdl_string(&mount.id.raw)).ok();
                    }
                    for (name, value) in [
                        ("target", &mount.target),
                        ("uid", &mount.uid),
                        ("gid", &mount.gid),
                        ("mode", &mount.mode),
                    ] {
                        if let Some(value) = value {
                            write!(child, " {name}={}", kdl_string(&value.raw)).ok();
                        }
                    }
                    if !mount.required {
                        child.push_str(" required=#false");
                    }
                    children.push(child);
                }
                for secret in &run.secrets {
                    let mut child = format!("secret {}", kdl_string(&secret.id));
                    if let Some(target) = &secret.target {
                        write!(child, " target={}", kdl_string(&target.raw)).ok();
                    }
                    if let Some(env) = &secret.env {
                        write!(child, " env={}", kdl_string(env)).ok();
                    }
                    if !secret.required {
                        child.push_str(" required=#false");
                    }
                    children.push(child);
                }
                if run.network == crate::ir::Network::None {
                    children.push("network \"none\"".into());
                }
                if !children.is_empty() {
                    line.push_str(" {\n");
                    for child in children {
                        writeln!(line, "{IN}{IN}{child}").ok();
                    }
                    line.push_str(IN);
                    line.push('}');
                }
                line
            }
            StepKind::Copy(copy) if !copy.inline.is_empty() => {
                if copy.inline.len() > 1 {
                    self.loss(
                        project,
                        step.at,
                        "several heredocs in one `COPY`".into(),
                        "KDL writes one `file` per node, each its own layer: write one COPY per heredoc",
                    );
                }
                let mut lines = Vec::new();
                for inline in &copy.inline {
                    let mut line = format!(
                        "file {} heredoc={}",
                        kdl_string(&copy.dest.raw),
                        kdl_string(&inline.name)
                    );
                    if inline.substitute {
                        line.push_str(" expand=#true");
                    }
                    if let Some(chown) = &copy.chown {
                        write!(line, " chown={}", kdl_string(&chown.raw)).ok();
                    }
                    if let Some(chmod) = &copy.chmod {
                        write!(line, " chmod={}", kdl_string(&chmod.raw)).ok();
                    }
                    write!(line, " content={}", kdl_string_at(&inline.content.raw, IN)).ok();
                    lines.push(line);
                }
                lines.join(&format!("\n{IN}"))
            }
            StepKind::Copy(copy) => {
                let mut line = String::from("copy");
                for path in copy.sources.iter().chain([&copy.dest]) {
                    line.push(' ');
                    line.push_str(&kdl_string(&path.raw));
                }
                line.push_str(&from_property(&copy.from));
                line.push_str(&copy_properties(copy));
                if copy.parents {
                    line.push_str(" parents=#true");
                }
                line
            }
            StepKind::Add(add) => {
                let copy = &add.copy;
                let mut line = String::from("add");
                for path in copy.sources.iter().chain([&copy.dest]) {
                    line.push(' ');
                    line.push_str(&kdl_string(&path.raw));
                }
                if let Some(checksum) = &add.checksum {
                    write!(line, " checksum={}", kdl_string(&checksum.raw)).ok();
                }
                if add.keep_git_dir {
                    line.push_str(" keep-git-dir=#true");
                }
                line.push_str(&copy_properties(copy));
                line
            }
            StepKind::Env(pairs) => format!("env {}", pairs_text(pairs)),
            StepKind::Label(pairs) => format!("label {}", pairs_text(pairs)),
            StepKind::Arg(arg) => arg_line(arg),
            StepKind::Workdir(text) => format!("workdir {}", kdl_string(&text.raw)),
            StepKind::User(text) => format!("user {}", kdl_string(&text.raw)),
            StepKind::StopSignal(text) => format!("stopsignal {}", kdl_string(&text.raw)),
            StepKind::Expose(list) => format!("expose {}", strings(list)),
            StepKind::Volume(list) => format!("volume {}", strings(list)),
            StepKind::Shell(list) => format!("shell {}", strings(list)),
            StepKind::Entrypoint(command) | StepKind::Cmd(command) => {
                let name = if matches!(step.kind, StepKind::Cmd(_)) {
                    "cmd"
                } else {
                    "entrypoint"
                };
                match command {
                    Command::Shell(text) => {
                        format!("{name} {} shell=#true", kdl_string_at(&text.raw, IN))
                    }
                    Command::Exec(args) if args.is_empty() => {
                        self.loss(
                            project,
                            step.at,
                            format!("an empty `{}`, which clears it", name.to_uppercase()),
                            "KDL's `cmd`/`entrypoint` need a command: the step is left out",
                        );
                        return;
                    }
                    Command::Exec(args) => format!("{name} {}", strings(args)),
                }
            }
            StepKind::Healthcheck(check) => {
                let mut line = String::from("healthcheck");
                match &check.test {
                    None => line.push_str(" none=#true"),
                    Some(Command::Shell(text)) => {
                        write!(line, " {}", kdl_string_at(&text.raw, IN)).ok();
                    }
                    Some(Command::Exec(args)) => {
                        if args.len() < 2 {
                            self.loss(
                                project,
                                step.at,
                                "a one-word exec-form `HEALTHCHECK CMD [\"…\"]`".into(),
                                "KDL's one-string healthcheck is shell form",
                            );
                        }
                        write!(line, " {}", strings(args)).ok();
                    }
                }
                for (name, value) in [
                    ("interval", &check.interval),
                    ("timeout", &check.timeout),
                    ("start-period", &check.start_period),
                ] {
                    if let Some(value) = value {
                        write!(line, " {name}={}", kdl_string(&value.raw)).ok();
                    }
                }
                if let Some(retries) = check.retries {
                    write!(line, " retries={retries}").ok();
                }
                line
            }
        };
        writeln!(self.out, "{IN}{line}").ok();
    }
}

/// How many KDL steps [`Writer::step`] writes for a step: one, none for what it leaves out
/// (an empty `CMD []`), one `file` per heredoc of a `COPY`.
fn kdl_steps(step: &Step) -> usize {
    match &step.kind {
        StepKind::Cmd(Command::Exec(args)) | StepKind::Entrypoint(Command::Exec(args))
            if args.is_empty() =>
        {
            0
        }
        StepKind::Copy(copy) => copy.inline.len().max(1),
        _ => 1,
    }
}

/// A stage keeps KDL's rules only when they cannot change it: no `run` (whose environment
/// the rules decide) and no `$` in any of its steps.
fn needs_docker_rules(stage: &Stage) -> bool {
    stage.steps.iter().any(|step| {
        matches!(step.kind, StepKind::Run(_)) || format!("{:?}", step.kind).contains('$')
    })
}

/// A Docker Hub short name (`busybox`, `busybox:1.36`) is written in full when KDL would read
/// it as a stage name (no `/`, `:`, `.` or `@`).
fn image_reference(raw: &str) -> String {
    if raw.contains('$') || raw.contains(['/', ':', '.', '@']) {
        raw.to_string()
    } else {
        format!("docker.io/library/{raw}")
    }
}

fn arg_line(arg: &ArgDecl) -> String {
    match &arg.default {
        Some(default) => format!("arg {}={}", arg.name, kdl_string(&default.raw)),
        None => format!("arg {}", arg.name),
    }
}

fn pairs_text(pairs: &[(String, Text)]) -> String {
    pairs
        .iter()
        .map(|(key, value)| format!("{}={}", kdl_key(key), kdl_string(&value.raw)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn strings(list: &[Text]) -> String {
    list.iter()
        .map(|text| kdl_string(&text.raw))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether KDL v2 reads `text` as this bare identifier.
fn bare_identifier(text: &str) -> bool {
    let mut chars = text.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    (first.is_ascii_alphabetic() || first == '_')
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
        && !matches!(text, "true" | "false" | "null" | "inf" | "nan")
}

/// A node name argument (stage, image): bare when it can be, quoted otherwise.
fn kdl_name(name: &str) -> String {
    if bare_identifier(name) {
        name.to_string()
    } else {
        kdl_string(name)
    }
}

/// A property key: bare when it can be (`APP_HOME`), quoted otherwise
/// (`"org.opencontainers.image.title"`).
fn kdl_key(key: &str) -> String {
    kdl_name(key)
}

/// A KDL string holding exactly `value`, on one line.
fn kdl_string(value: &str) -> String {
    kdl_string_at(value, "")
}

/// A KDL string holding exactly `value`: plain when it can be, raw (`#"…"#`) when it holds
/// quotes or backslashes, multi-line (indented by `indent`) when it holds newlines, escaped
/// otherwise. Every form but the escaped one is checked by parsing it back.
fn kdl_string_at(value: &str, indent: &str) -> String {
    let plain_chars = |c: char| !c.is_control() || c == '\t';
    let candidates = if value.contains('\n') {
        // Plain unless it holds backslashes (which a plain string reads as escapes).
        let mut hashes = String::new();
        if value.contains(['\\']) || value.contains("\"\"\"") {
            hashes.push('#');
            while value.contains(&format!("\"\"\"{hashes}")) {
                hashes.push('#');
            }
        }
        // Each line indented one level deeper than the node; the closing quotes' indentation
        // is taken off every line, and the line breaks after the opening and before the
        // closing quotes are not part of the string.
        let mut text = format!("{hashes}\"\"\"\n");
        for line in value.split('\n') {
            if !line.is_empty() {
                text.push_str(indent);
                text.push_str(indent);
            }
            text.push_str(line);
            text.push('\n');
        }
        write!(text, "{indent}{indent}\"\"\"{hashes}").ok();
        vec![text]
    } else if !value.chars().all(plain_chars) {
        Vec::new()
    } else if !value.contains(['"', '\\']) {
        vec![format!("\"{value}\"")]
    } else {
        let mut hashes = String::from("#");
        while value.contains(&format!("\"{hashes}")) {
            hashes.push('#');
        }
        vec![format!("{hashes}\"{value}\"{hashes}")]
    };
    for candidate in candidates {
        if parses_to(&candidate, value) {
            return candidate;
        }
    }
    escaped(value)
}

fn parses_to(candidate: &str, value: &str) -> bool {
    let Ok(document) = format!("n {candidate}\n").parse::<kdl::KdlDocument>() else {
        return false;
    };
    document
        .nodes()
        .first()
        .and_then(|node| node.entries().first())
        .is_some_and(|entry| entry.value().as_string() == Some(value))
}

/// The escaped form, always exact.
fn escaped(value: &str) -> String {
    let mut out = String::from("\"");
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() || is_kdl_disallowed(c) => {
                write!(out, "\\u{{{:x}}}", c as u32).ok();
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Code points KDL v2 does not allow literally in a document.
fn is_kdl_disallowed(c: char) -> bool {
    matches!(c as u32, 0x200E | 0x200F | 0x202A..=0x202E | 0x2066..=0x2069 | 0xFEFF)
}

/// Loads the KDL written and compares every stage and image with the Dockerfiles' IR; each
/// difference not already reported is a loss.
fn verify(projects: &[Project], kdl: &str, losses: &mut Vec<Diagnostic>) {
    let loaded = match crate::load_source("converted.kdl", kdl, std::path::Path::new(".")) {
        Ok(loaded) => loaded,
        Err(Diagnostics(diagnostics)) => {
            let first = diagnostics
                .iter()
                .find(|d| d.is_error())
                .map(|d| d.message.clone())
                .unwrap_or_default();
            losses.push(
                Diagnostic::warning(
                    Code::Convert,
                    format!("the KDL written does not load: {first}"),
                )
                .with_help(
                    "`graphbuild build` rejects such a Dockerfile too (a stage copying from itself is a cycle); if it builds, this is a bug in graphbuild convert: please report it with the Dockerfile",
                ),
            );
            return;
        }
    };
    let reported: BTreeSet<(u32, usize)> = losses
        .iter()
        .filter_map(|d| d.location.map(|loc| (loc.file.0, loc.span.offset())))
        .collect();
    for project in projects {
        for stage in &project.stages {
            let Some(converted) = loaded.stages.iter().find(|s| s.name == stage.name) else {
                continue;
            };
            let rules_kept = converted.docker_rules || !needs_docker_rules(stage);
            let same_base = shape(&format!("{:?}", stage.from.source))
                == shape(&format!("{:?}", converted.from.source))
                || matches!(&stage.from.source, FromSource::Image(text) if image_reference(&text.raw) != text.raw);
            let same_platform = shape(&format!("{:?}", stage.platform))
                == shape(&format!("{:?}", converted.platform));
            if !(rules_kept && same_base && same_platform) {
                losses.push(
                    Diagnostic::warning(
                        Code::Convert,
                        format!("stage `{}` is written differently", stage.name),
                    )
                    .with_label(&project.sources, stage.at, "this stage")
                    .with_help(
                        "this is a bug in graphbuild convert; please report it with the Dockerfile",
                    ),
                );
            }
            let mut written = converted.steps.iter();
            for step in &stage.steps {
                // A Docker Hub short name is written in full (`image_reference`).
                let mut kind = step.kind.clone();
                if let StepKind::Copy(copy) = &mut kind
                    && let Some(CopyFrom::Image(text)) = &mut copy.from
                {
                    text.raw = image_reference(&text.raw);
                }
                let expected = shape(&format!("{kind:?}"));
                let got: Vec<String> = written
                    .by_ref()
                    .take(kdl_steps(step))
                    .map(|s| shape(&format!("{:?}", s.kind)))
                    .collect();
                let at = (step.at.file.0, step.at.span.offset());
                if (got.len() != 1 || got[0] != expected) && !reported.contains(&at) {
                    losses.push(
                        Diagnostic::warning(
                            Code::Convert,
                            "this instruction is written differently in KDL".to_string(),
                        )
                        .with_label(&project.sources, step.at, "not expressed exactly in KDL")
                        .with_help(
                            "the KDL lowers to another step; check this line of the output by hand",
                        ),
                    );
                }
            }
        }
    }
}

/// The `Debug` form of an IR value with every location (`Loc { … }`, `SourceSpan { … }`)
/// left out: what two lowerings must agree on.
fn shape(debug: &str) -> String {
    let mut out = String::with_capacity(debug.len());
    let mut rest = debug;
    while let Some(at) = rest.find("Loc {") {
        out.push_str(&rest[..at]);
        let mut depth = 0usize;
        let mut end = rest.len();
        for (index, c) in rest[at..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = at + index + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        out.push_str("Loc");
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// ` from=…` for a copy's or a bind's source filesystem, or nothing.
fn from_property(from: &Option<CopyFrom>) -> String {
    match from {
        Some(CopyFrom::Stage(name, _)) => format!(" from={}", kdl_name(name)),
        Some(CopyFrom::Image(text)) => format!(" from={}", kdl_string(&image_reference(&text.raw))),
        None => String::new(),
    }
}

/// A copy's ` chown=… chmod=… exclude=…` properties.
fn copy_properties(copy: &crate::ir::Copy) -> String {
    let mut line = String::new();
    if let Some(chown) = &copy.chown {
        write!(line, " chown={}", kdl_string(&chown.raw)).ok();
    }
    if let Some(chmod) = &copy.chmod {
        write!(line, " chmod={}", kdl_string(&chmod.raw)).ok();
    }
    for pattern in &copy.exclude {
        write!(line, " exclude={}", kdl_string(&pattern.raw)).ok();
    }
    line
}

#[cfg(test)]
#[path = "convert_tests.rs"]
mod tests;
