use std::path::Path;

use crate::ir::{FromSource, Project, StepKind};
use crate::{Code, Diagnostics};

fn load(dir: &Path, kdl: &str) -> Result<Project, Diagnostics> {
    std::fs::write(dir.join("images.kdl"), kdl).expect("write");
    crate::load(&dir.join("images.kdl"))
}

fn line_of(diagnostics: &Diagnostics, code: Code) -> (String, usize) {
    let diagnostic = diagnostics
        .0
        .iter()
        .find(|d| d.code == code)
        .unwrap_or_else(|| panic!("no {code:?} in {:?}", diagnostics.0));
    let source = diagnostic.source.as_ref().expect("a source");
    let text = source.inner();
    let offset = diagnostic.location.expect("a location").span.offset();
    (
        source.name().to_string(),
        text[..offset].matches('\n').count() + 1,
    )
}

const DOCKERFILE: &str = "ARG BASE=oci:base:1\nARG VERSION=1.0\nFROM $BASE AS build\nARG VERSION\nRUN echo $VERSION > /v\nFROM build\nCOPY --from=build /v /w\n";

#[test]
fn a_dockerfile_node_imports_its_stages_under_its_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("Dockerfile"), DOCKERFILE).expect("write");
    let project = load(
        dir.path(),
        "dockerfile app path=\"Dockerfile\" {\n    arg VERSION=\"2.0\"\n}\nstage extra {\n    from \"app.build\"\n    copy \"/v\" \"/x\" from=\"app.1\"\n}\nimage app { stage \"app.1\"; }\nimage extra { stage extra; }\n",
    )
    .unwrap_or_else(|error| panic!("{:?}", error.0));
    let names: Vec<&str> = project.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["extra", "app.build", "app.1"]);
    let build = &project.stages[1];
    assert!(build.docker_rules);
    assert!(!project.stages[0].docker_rules);
    assert!(
        matches!(&project.stages[2].from.source, FromSource::Stage(name) if name == "app.build")
    );
    assert!(matches!(
        &project.stages[2].steps[0].kind,
        StepKind::Copy(copy) if matches!(&copy.from, Some(crate::ir::CopyFrom::Stage(name, _)) if name == "app.build")
    ));
    let scope = &project.scopes[build.scope.expect("a scope").0 as usize];
    let bindings: Vec<(&str, &str)> = scope
        .bindings
        .iter()
        .map(|(name, value)| (name.as_str(), value.raw.as_str()))
        .collect();
    assert_eq!(bindings, [("BASE", "oci:base:1"), ("VERSION", "2.0")]);
    // Locations inside the Dockerfile name the Dockerfile.
    let at = project.sources.describe(build.steps[1].at);
    assert!(at.ends_with("Dockerfile:5:1"), "{at}");
    assert_eq!(project.images[0].stage, "app.1");
}

#[test]
fn problems_inside_an_imported_dockerfile_point_at_its_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\nRUNN x\n").expect("write");
    let error = load(
        dir.path(),
        "dockerfile app\nimage app { stage \"app.0\"; }\n",
    )
    .expect_err("a bad Dockerfile");
    let (file, line) = line_of(&error, Code::DockerfileUnknownInstruction);
    assert!(file.ends_with("Dockerfile"), "{file}");
    assert_eq!(line, 2);
}

#[test]
fn a_missing_dockerfile_another_context_and_unknown_args_are_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let error = load(dir.path(), "dockerfile app path=\"nope/Dockerfile\"\n").expect_err("missing");
    let (file, line) = line_of(&error, Code::ImportMissingFile);
    assert!(file.ends_with("images.kdl") && line == 1, "{file}:{line}");
    std::fs::write(dir.path().join("Dockerfile"), DOCKERFILE).expect("write");
    std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
    let error = load(dir.path(), "dockerfile app context=\"sub\"\n").expect_err("context");
    assert!(
        error.0[0]
            .message
            .contains("is not this build file's directory"),
        "{:?}",
        error.0
    );
    let project = load(
        dir.path(),
        "dockerfile app {\n    arg NOPE=\"x\"\n}\nimage app { stage \"app.1\"; }\n",
    )
    .expect("loads");
    assert!(
        project
            .warnings
            .iter()
            .any(|w| w.message.contains("declares `NOPE`")),
        "{:?}",
        project.warnings
    );
    let error = load(
        dir.path(),
        "stage \"app.build\" { from \"scratch\"; }\ndockerfile app\nimage app { stage \"app.1\"; }\n",
    )
    .expect_err("a name taken twice");
    assert!(
        error.0.iter().any(|d| d.code == Code::DuplicateStage),
        "{:?}",
        error.0
    );
}

/// A bind mount from a stage (by name or by index) names the imported stage, as a copy does.
#[test]
fn bind_mounts_from_stages_of_an_imported_dockerfile_name_the_imported_stages() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("Dockerfile"),
        "FROM oci:base:1 AS assets\nFROM oci:base:1\nRUN --mount=type=bind,from=assets,target=/a --mount=type=bind,from=0,target=/b,rw true\n",
    )
    .expect("write");
    let project = load(dir.path(), "dockerfile df\nimage df { stage \"df.1\"; }\n")
        .unwrap_or_else(|error| panic!("{:?}", error.0));
    let StepKind::Run(run) = &project.stages[1].steps[0].kind else {
        panic!("run")
    };
    let froms: Vec<&str> = run
        .bind_mounts
        .iter()
        .map(|mount| match &mount.from {
            Some(crate::ir::CopyFrom::Stage(name, _)) => name.as_str(),
            other => panic!("a stage: {other:?}"),
        })
        .collect();
    assert_eq!(froms, ["df.assets", "df.assets"]);
}
