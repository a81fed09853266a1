//! Golden tests: every `cases/input/NAME.kdl` is loaded and its outcome — a rendering of the
//! lowered project, or the rendered diagnostics — compared with `cases/expected/NAME.txt`.
//! Run with `BLESS=1` to rewrite the expectations after an intended change, then review the
//! diff. Files under `cases/modules/` are imported by the inputs.
//!
//! Also: every ```kdl block of docs/language.md loads without errors, and every stdlib
//! module loads without errors or warnings.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use graphbuild_lang::ir::{
    CacheSharing, Command, CopyFrom, FromSource, Network, PlatformSpec, Project, Sources, StepKind,
    Text,
};
use graphbuild_lang::{Diagnostics, load_source};

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases")
}

pub fn render_diagnostics(diagnostics: &dyn miette::Diagnostic) -> String {
    let mut out = String::new();
    let handler = miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::none())
        .with_width(100)
        .with_links(false);
    if let Err(error) = handler.render_report(&mut out, diagnostics) {
        return format!("<render failed: {error}>");
    }
    // Trailing spaces vary with label layout; they carry no meaning.
    out.lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn text(text: &Text) -> String {
    format!("{:?}", text.raw)
}

fn texts(values: &[Text]) -> String {
    values.iter().map(text).collect::<Vec<_>>().join(" ")
}

fn platform(spec: &PlatformSpec) -> String {
    match spec {
        PlatformSpec::Literal(platform, _) => platform.to_string(),
        PlatformSpec::Dynamic(value) => format!("dynamic {}", text(value)),
    }
}

fn command(command: &Command) -> String {
    match command {
        Command::Shell(value) => format!("shell {}", text(value)),
        Command::Exec(argv) => format!("exec [{}]", texts(argv)),
    }
}

fn pairs(pairs: &[(String, Text)]) -> String {
    pairs
        .iter()
        .map(|(key, value)| format!("{key}={}", text(value)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn at(sources: &Sources, loc: graphbuild_lang::ir::Loc) -> String {
    sources.describe(loc)
}

/// A stable, readable rendering of everything in a project except source text.
pub fn render_project(project: &Project) -> String {
    let sources = &project.sources;
    let mut out = String::new();
    let names: Vec<&str> = sources
        .files
        .iter()
        .map(|source| source.name.as_str())
        .collect();
    let _ = writeln!(out, "sources: {}", names.join(", "));
    if !project.platforms.is_empty() {
        let list: Vec<String> = project.platforms.iter().map(platform).collect();
        let _ = writeln!(out, "platforms: {}", list.join(", "));
    }
    for arg in &project.args {
        match &arg.default {
            Some(default) => {
                let _ = writeln!(
                    out,
                    "arg {} = {}  @{}",
                    arg.name,
                    text(default),
                    at(sources, arg.at)
                );
            }
            None => {
                let _ = writeln!(out, "arg {}  @{}", arg.name, at(sources, arg.at));
            }
        }
    }
    for stage in &project.stages {
        let scope = stage
            .scope
            .map(|scope| format!(" (scope {})", project.scopes[scope.0 as usize].name))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "stage {}{scope}  @{}",
            stage.name,
            at(sources, stage.at)
        );
        let from = match &stage.from.source {
            FromSource::Scratch => "scratch".to_string(),
            FromSource::Stage(name) => format!("stage {name}"),
            FromSource::Image(value) => format!("image {}", text(value)),
        };
        let _ = writeln!(out, "  from {from}  @{}", at(sources, stage.from.at));
        if let Some(spec) = &stage.platform {
            let _ = writeln!(out, "  platform {}", platform(spec));
        }
        for step in &stage.steps {
            let when = step
                .when
                .as_ref()
                .map(|platform| format!("[when {platform}] "))
                .unwrap_or_default();
            let line = match &step.kind {
                StepKind::Run(run) => {
                    let mut line = format!("run {}", command(&run.command));
                    if run.network == Network::None {
                        line.push_str(" network=none");
                    }
                    if let Some(timeout) = &run.timeout {
                        let _ = write!(line, " timeout={}", text(timeout));
                    }
                    if run.insecure {
                        line.push_str(" insecure");
                    }
                    for mount in &run.cache_mounts {
                        let id = mount
                            .id
                            .as_ref()
                            .map(|id| format!(" id={}", text(id)))
                            .unwrap_or_default();
                        let _ = write!(line, "\n    cache-mount {}{id}", text(&mount.target));
                        if mount.sharing != CacheSharing::Shared {
                            let _ = write!(line, " sharing={:?}", mount.sharing);
                        }
                    }
                    for secret in &run.secrets {
                        let _ = write!(line, "\n    secret {:?}", secret.id);
                        if let Some(target) = &secret.target {
                            let _ = write!(line, " target={}", text(target));
                        }
                        if let Some(env) = &secret.env {
                            let _ = write!(line, " env={env:?}");
                        }
                        if !secret.required {
                            line.push_str(" required=false");
                        }
                    }
                    line
                }
                StepKind::Copy(copy) => {
                    let mut line =
                        format!("copy [{}] -> {}", texts(&copy.sources), text(&copy.dest));
                    match &copy.from {
                        Some(CopyFrom::Stage(name, _)) => {
                            let _ = write!(line, " from stage {name}");
                        }
                        Some(CopyFrom::Image(value)) => {
                            let _ = write!(line, " from image {}", text(value));
                        }
                        None => {}
                    }
                    if let Some(chown) = &copy.chown {
                        let _ = write!(line, " chown={}", text(chown));
                    }
                    if let Some(chmod) = &copy.chmod {
                        let _ = write!(line, " chmod={}", text(chmod));
                    }
                    line
                }
                StepKind::Add(add) => {
                    let copy = &add.copy;
                    let mut line =
                        format!("add [{}] -> {}", texts(&copy.sources), text(&copy.dest));
                    if let Some(checksum) = &add.checksum {
                        let _ = write!(line, " checksum={}", text(checksum));
                    }
                    if add.keep_git_dir {
                        line.push_str(" keep-git-dir");
                    }
                    if let Some(chown) = &copy.chown {
                        let _ = write!(line, " chown={}", text(chown));
                    }
                    if let Some(chmod) = &copy.chmod {
                        let _ = write!(line, " chmod={}", text(chmod));
                    }
                    line
                }
                StepKind::Env(values) => format!("env {}", pairs(values)),
                StepKind::Arg(arg) => match &arg.default {
                    Some(default) => format!("arg {}={}", arg.name, text(default)),
                    None => format!("arg {}", arg.name),
                },
                StepKind::Workdir(value) => format!("workdir {}", text(value)),
                StepKind::User(value) => format!("user {}", text(value)),
                StepKind::Label(values) => format!("label {}", pairs(values)),
                StepKind::Expose(values) => format!("expose {}", texts(values)),
                StepKind::Entrypoint(value) => format!("entrypoint {}", command(value)),
                StepKind::Cmd(value) => format!("cmd {}", command(value)),
                StepKind::Volume(values) => format!("volume {}", texts(values)),
                StepKind::Shell(values) => format!("shell {}", texts(values)),
                StepKind::StopSignal(value) => format!("stopsignal {}", text(value)),
                StepKind::Healthcheck(check) => {
                    let mut line = match &check.test {
                        Some(test) => format!("healthcheck {}", command(test)),
                        None => "healthcheck none".to_string(),
                    };
                    for (key, value) in [
                        ("interval", &check.interval),
                        ("timeout", &check.timeout),
                        ("start-period", &check.start_period),
                    ] {
                        if let Some(value) = value {
                            let _ = write!(line, " {key}={}", text(value));
                        }
                    }
                    if let Some(retries) = check.retries {
                        let _ = write!(line, " retries={retries}");
                    }
                    line
                }
            };
            let _ = writeln!(out, "  {when}{line}");
        }
    }
    for scope in &project.scopes {
        let _ = writeln!(
            out,
            "scope {} = template {}  @{}",
            scope.name,
            scope.template,
            at(sources, scope.at)
        );
        for (name, value) in &scope.bindings {
            let _ = writeln!(
                out,
                "  {name} = {}  @{}",
                text(value),
                at(sources, value.at)
            );
        }
    }
    for image in &project.images {
        let _ = writeln!(
            out,
            "image {} -> stage {}  @{}",
            text(&image.name),
            image.stage,
            at(sources, image.at)
        );
        if !image.tags.is_empty() {
            let _ = writeln!(out, "  tags {}", texts(&image.tags));
        }
        if let Some(platforms) = &image.platforms {
            let list: Vec<String> = platforms.iter().map(platform).collect();
            let _ = writeln!(out, "  platforms {}", list.join(", "));
        }
        for axis in &image.matrix {
            let _ = writeln!(out, "  matrix {} {}", axis.key, texts(&axis.values));
        }
        if !image.annotations.is_empty() {
            let _ = writeln!(out, "  annotation {}", pairs(&image.annotations));
        }
        if !image.labels.is_empty() {
            let _ = writeln!(out, "  label {}", pairs(&image.labels));
        }
        if let Some(output) = &image.output {
            let _ = writeln!(out, "  output {}", text(output));
        }
        if image.push {
            let _ = writeln!(out, "  push");
        }
        for test in &image.tests {
            let what = match &test.command {
                graphbuild_lang::ir::TestCommand::Image => "the image's command".to_string(),
                graphbuild_lang::ir::TestCommand::Cmd(cmd) => format!("cmd {}", command(cmd)),
                graphbuild_lang::ir::TestCommand::Run(run) => format!("run {}", command(run)),
            };
            let _ = writeln!(
                out,
                "  test {}: {what}, exit {}  @{}",
                text(&test.name),
                test.exit_code,
                at(sources, test.at)
            );
            if let Some(entrypoint) = &test.entrypoint {
                let _ = writeln!(out, "    entrypoint {}", command(entrypoint));
            }
            for (label, value) in [
                ("user", &test.user),
                ("workdir", &test.workdir),
                ("timeout", &test.timeout),
            ] {
                if let Some(value) = value {
                    let _ = writeln!(out, "    {label} {}", text(value));
                }
            }
            if !test.env.is_empty() {
                let _ = writeln!(out, "    env {}", pairs(&test.env));
            }
            for check in &test.output {
                let _ = writeln!(
                    out,
                    "    {:?} contains={} matches={}",
                    check.stream,
                    check.contains.as_ref().map_or("-".to_string(), text),
                    check.matches.as_ref().map_or("-".to_string(), text)
                );
            }
            if let Some(platforms) = &test.platforms {
                let list: Vec<String> = platforms.iter().map(ToString::to_string).collect();
                let _ = writeln!(out, "    platforms {}", list.join(", "));
            }
        }
    }
    if !project.warnings.is_empty() {
        let _ = writeln!(out, "\nwarnings:");
        out.push_str(&render_diagnostics(&Diagnostics(project.warnings.clone())));
    }
    out
}

fn outcome(name: &str, source: &str, root: &Path) -> String {
    match load_source(name, source, root) {
        Ok(project) => render_project(&project),
        Err(diagnostics) => format!("error\n\n{}", render_diagnostics(&diagnostics)),
    }
}

#[test]
fn golden_cases() {
    let input_dir = cases_dir().join("input");
    let expected_dir = cases_dir().join("expected");
    let bless = std::env::var_os("BLESS").is_some();
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&input_dir)
        .expect("cases/input exists")
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|extension| extension == "kdl"))
        .collect();
    inputs.sort();
    assert!(
        inputs.len() >= 20,
        "expected the golden cases, found {}",
        inputs.len()
    );
    let mut failures = Vec::new();
    for input in &inputs {
        let stem = input
            .file_stem()
            .and_then(|stem| stem.to_str())
            .expect("utf-8 name");
        let source = std::fs::read_to_string(input).expect("read input");
        let actual = outcome(&format!("{stem}.kdl"), &source, &input_dir);
        let expected_path = expected_dir.join(format!("{stem}.txt"));
        let expected = std::fs::read_to_string(&expected_path).ok();
        if expected.as_deref() == Some(actual.as_str()) {
            continue;
        }
        if bless {
            std::fs::write(&expected_path, &actual).expect("write expectation");
        } else {
            failures.push(format!(
                "--- {stem}: expected ({})\n{}\n--- actual\n{actual}",
                expected_path.display(),
                expected.unwrap_or_else(|| "<missing>".to_string())
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} golden case(s) differ (BLESS=1 to update):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The error cases really are errors and the others really load: the file name says which.
#[test]
fn error_cases_fail_and_others_load() {
    let input_dir = cases_dir().join("input");
    for entry in std::fs::read_dir(&input_dir).expect("cases/input exists") {
        let path = entry.expect("entry").path();
        let Some(stem) = path.file_stem().and_then(|stem| stem.to_str()) else {
            continue;
        };
        if !path.is_file() {
            // `docker/`: Dockerfiles the `dockerfile` examples of docs/language.md import.
            continue;
        }
        let source = std::fs::read_to_string(&path).expect("read input");
        let result = load_source(&format!("{stem}.kdl"), &source, &input_dir);
        if stem.starts_with("error_") {
            let diagnostics = result.err().unwrap_or_else(|| panic!("{stem} should fail"));
            assert!(diagnostics.has_errors(), "{stem}");
            for diagnostic in &diagnostics.0 {
                assert!(
                    diagnostic.help.is_some(),
                    "{stem}: `{}` has no help line",
                    diagnostic.message
                );
                assert!(
                    diagnostic.location.is_some(),
                    "{stem}: `{}` has no location",
                    diagnostic.message
                );
            }
        } else if let Err(diagnostics) = result {
            panic!("{stem} should load:\n{}", render_diagnostics(&diagnostics));
        }
    }
}

#[test]
fn every_stdlib_module_loads_cleanly() {
    for (name, _) in graphbuild_lang::stdlib::MODULES {
        let source = format!("import \"std:{name}\" as=\"m\"\n");
        let project =
            load_source("check.kdl", &source, &cases_dir()).unwrap_or_else(|diagnostics| {
                panic!("std:{name}:\n{}", render_diagnostics(&diagnostics))
            });
        assert!(
            project.warnings.is_empty(),
            "std:{name}:\n{}",
            render_diagnostics(&Diagnostics(project.warnings))
        );
    }
}

/// Every ```kdl block in docs/language.md is a build file that loads without errors or warnings.
#[test]
fn language_doc_examples_load() {
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/language.md");
    let doc = std::fs::read_to_string(&doc_path).expect("docs/language.md exists");
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (number, line) in doc.lines().enumerate() {
        match &mut current {
            None if line.trim() == "```kdl" => current = Some((number + 1, String::new())),
            Some((start, block)) if line.trim() == "```" => {
                blocks.push((*start, std::mem::take(block)));
                current = None;
            }
            Some((_, block)) => {
                block.push_str(line);
                block.push('\n');
            }
            None => {}
        }
    }
    assert!(
        blocks.len() >= 10,
        "expected examples in docs/language.md, found {}",
        blocks.len()
    );
    for (line, block) in blocks {
        let name = format!("language.md:{line}");
        match load_source(&name, &block, &cases_dir().join("input")) {
            Ok(project) => assert!(
                project.warnings.is_empty(),
                "{name}: warnings:\n{}",
                render_diagnostics(&Diagnostics(project.warnings))
            ),
            Err(diagnostics) => panic!("{name}:\n{}", render_diagnostics(&diagnostics)),
        }
    }
}

#[test]
fn load_reads_a_file_and_names_it_as_given() {
    let path = cases_dir().join("input/template_use.kdl");
    let project = graphbuild_lang::load(&path).expect("loads");
    assert_eq!(project.sources.files[0].name, path.display().to_string());
    assert_eq!(project.root_dir, cases_dir().join("input"));
    assert_eq!(project.images[1].stage, "two/runtime");
    let scope = &project.scopes[1];
    assert_eq!(scope.name, "two");
    let port = scope
        .bindings
        .iter()
        .find(|(name, _)| name == "port")
        .expect("port bound");
    assert_eq!(port.1.raw, "80");

    let missing =
        graphbuild_lang::load(&cases_dir().join("input/no-such-file.kdl")).expect_err("missing");
    assert!(missing.has_errors());
    assert!(
        missing.0[0].message.contains("cannot read build file"),
        "{}",
        missing.0[0].message
    );
}
