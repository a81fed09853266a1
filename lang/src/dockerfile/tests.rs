use super::*;

fn load(text: &str) -> Result<Project, Diagnostics> {
    load_source(
        "Dockerfile",
        text,
        Path::new("."),
        &Options {
            image: "image".into(),
            ..Options::default()
        },
    )
}

fn codes(text: &str) -> Vec<(Code, String)> {
    let diagnostics = load(text).expect_err("errors");
    diagnostics
        .0
        .iter()
        .map(|diagnostic| {
            (
                diagnostic.code,
                diagnostic
                    .location
                    .map(|loc| diagnostic_line(text, loc.span.offset()))
                    .unwrap_or_default(),
            )
        })
        .collect()
}

fn diagnostic_line(text: &str, offset: usize) -> String {
    format!("line {}", text[..offset].matches('\n').count() + 1)
}

#[test]
fn a_multi_stage_dockerfile_lowers_to_stages_and_one_image() {
    let project = load(
        r#"# syntax=docker/dockerfile:1
ARG BASE=alpine:3.20
FROM --platform=$BUILDPLATFORM $BASE AS build
ARG TARGETARCH
ENV A=1 B="two words" C='$NOT'
ENV LEGACY value with spaces
RUN --mount=type=cache,target=/root/.cache,id=c,sharing=locked \
    --mount=type=secret,id=tok,target=/tok \
    --network=none \
    echo $TARGETARCH > /arch
RUN ["echo", "exec"]
RUN <<EOF
echo one
echo two
EOF
FROM scratch
COPY --from=build --chown=1:2 --chmod=0755 /arch /a/
ADD local.txt /b
LABEL "org.x"="y z" k=v
MAINTAINER Jane <jane@example.com>
EXPOSE 80 53/udp
WORKDIR /app
USER 65532
VOLUME ["/data"]
ENTRYPOINT ["/a"]
CMD echo $HOME
SHELL ["/bin/sh", "-c"]
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --retries=3 CMD true
"#,
    )
    .expect("loads");
    assert_eq!(project.args[0].name, "BASE");
    assert_eq!(project.stages.len(), 2);
    let build = &project.stages[0];
    assert_eq!(build.name, "build");
    assert!(matches!(build.platform, Some(PlatformSpec::Dynamic(_))));
    let StepKind::Env(env) = &build.steps[1].kind else {
        panic!("env")
    };
    let values: Vec<(&str, &str)> = env
        .iter()
        .map(|(k, v)| (k.as_str(), v.raw.as_str()))
        .collect();
    assert_eq!(values, [("A", "1"), ("B", "two words"), ("C", "\\$NOT")]);
    let StepKind::Env(legacy) = &build.steps[2].kind else {
        panic!("legacy env")
    };
    assert_eq!(legacy[0].1.raw, "value with spaces");
    let StepKind::Run(run) = &build.steps[3].kind else {
        panic!("run")
    };
    assert_eq!(run.network, Network::None);
    assert_eq!(run.cache_mounts[0].target.raw, "/root/.cache");
    assert_eq!(run.cache_mounts[0].sharing, ir::CacheSharing::Locked);
    assert_eq!(run.secrets[0].id, "tok");
    assert!(!run.secrets[0].required);
    let Command::Shell(command) = &run.command else {
        panic!("shell form")
    };
    assert_eq!(command.raw, "echo $TARGETARCH > /arch");
    let StepKind::Run(heredoc) = &build.steps[5].kind else {
        panic!("heredoc run")
    };
    let Command::Shell(script) = &heredoc.command else {
        panic!("shell")
    };
    assert_eq!(script.raw, "echo one\necho two\n");
    let runtime = &project.stages[1];
    assert!(matches!(runtime.from.source, FromSource::Scratch));
    let StepKind::Copy(copy) = &runtime.steps[0].kind else {
        panic!("copy")
    };
    assert!(matches!(&copy.from, Some(CopyFrom::Stage(name, _)) if name == "build"));
    assert_eq!(copy.chmod.as_ref().map(|t| t.raw.as_str()), Some("0755"));
    let StepKind::Label(labels) = &runtime.steps[3].kind else {
        panic!("maintainer")
    };
    assert_eq!(labels[0].0, "maintainer");
    assert_eq!(project.images[0].stage, "1");
}

#[test]
fn every_problem_is_reported_at_once_with_its_line() {
    let found = codes(
        "FROM alpine AS a
FORM x
ONBUILD RUN x
ADD --keep-git-dir=maybe https://example.com/x.git /x
ADD --from=a a.tar.gz /x
RUN --mount=type=npipe,target=/x true
COPY --chmod=999 a b
COPY onlyone
FROM alpine AS A
",
    );
    let expected = [
        (Code::DockerfileUnknownInstruction, "line 2"),
        (Code::DockerfileUnsupported, "line 3"),
        (Code::DockerfileFlag, "line 4"),
        (Code::DockerfileFlag, "line 5"),
        (Code::DockerfileUnsupported, "line 6"),
        (Code::CopyChmod, "line 7"),
        (Code::CopyArguments, "line 8"),
        (Code::DuplicateStage, "line 9"),
    ];
    let found: Vec<(Code, &str)> = found.iter().map(|(c, l)| (*c, l.as_str())).collect();
    assert_eq!(found, expected);
}

#[test]
fn escape_directive_and_unknown_target() {
    let project = load("# escape=`\nFROM alpine\nRUN echo a `\n  b\n").expect("loads");
    let StepKind::Run(run) = &project.stages[0].steps[0].kind else {
        panic!("run")
    };
    let Command::Shell(command) = &run.command else {
        panic!("shell")
    };
    assert_eq!(command.raw, "echo a   b");
    let error = load_source(
        "Dockerfile",
        "FROM alpine AS build\n",
        Path::new("."),
        &Options {
            target: Some("biuld".into()),
            ..Options::default()
        },
    )
    .expect_err("unknown target");
    assert_eq!(error.0[0].code, Code::DockerfileTarget);
    assert!(codes("RUN x\n")[0].0 == Code::DockerfileNoStage);
    assert!(
        codes("")
            .iter()
            .any(|(code, _)| *code == Code::DockerfileNoStage)
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

    /// Any text, however broken, loads or reports diagnostics: never a panic.
    #[test]
    fn never_panics(text in "(FROM|RUN|COPY|ADD|ENV|ARG|LABEL|HEALTHCHECK|CMD|SHELL|EXPOSE| |<<-?\"?E|EOF|--[a-z]+=|[a-z=\\\"'$\\{\\}\\[\\],é€\n\t#`])*") {
        let _ = load(&text);
        let _ = load(&format!("# escape=`\n{text}"));
    }
}

#[test]
fn network_none_on_the_command_line_is_the_default_of_run_steps() {
    let project = load_source(
        "Dockerfile",
        "FROM alpine\nRUN true\nRUN --network=host true\n",
        Path::new("."),
        &Options {
            network_none: true,
            ..Options::default()
        },
    )
    .expect("loads");
    let networks: Vec<Network> = project.stages[0]
        .steps
        .iter()
        .filter_map(|step| match &step.kind {
            StepKind::Run(run) => Some(run.network),
            _ => None,
        })
        .collect();
    assert_eq!(networks, [Network::None, Network::Host]);
}

#[test]
fn ssh_mounts_take_docker_options_and_default_to_an_optional_default_id() {
    let project = load(
        "FROM alpine\nRUN --mount=type=ssh --mount=type=ssh,id=github,target=/agent,required=true,uid=1000,gid=1000,mode=0660 true\n",
    )
    .expect("loads");
    let StepKind::Run(run) = &project.stages[0].steps[0].kind else {
        panic!("run")
    };
    let [default, github] = run.ssh_mounts.as_slice() else {
        panic!("two ssh mounts: {:?}", run.ssh_mounts)
    };
    assert_eq!(default.id.raw, "default");
    assert!(!default.required && default.target.is_none());
    assert_eq!(github.id.raw, "github");
    assert!(github.required);
    assert_eq!(
        github.target.as_ref().map(|t| t.raw.as_str()),
        Some("/agent")
    );
    assert_eq!(github.mode.as_ref().map(|t| t.raw.as_str()), Some("0660"));
    assert_eq!(github.uid.as_ref().map(|t| t.raw.as_str()), Some("1000"));
    let found = codes(
        "FROM alpine\nRUN --mount=type=ssh,required=maybe true\nRUN --mount=type=ssh,source=x true\n",
    );
    let found: Vec<(Code, &str)> = found.iter().map(|(c, l)| (*c, l.as_str())).collect();
    assert_eq!(
        found,
        [
            (Code::RunSsh, "line 2"),
            (Code::DockerfileUnsupported, "line 3")
        ]
    );
}

/// `COPY --from=N` names the Nth stage even when that stage has a name, as in Docker; a
/// number past the stages is an image.
#[test]
fn copy_from_an_index_names_the_stage_even_when_it_is_named() {
    let project = load(
        "FROM alpine AS build\nFROM alpine\nCOPY --from=0 /a /a\nCOPY --from=build /b /b\nFROM alpine\nCOPY --from=1 /d /d\nCOPY --from=7 /e /e\n",
    )
    .expect("loads");
    let from = |stage: usize, step: usize| match &project.stages[stage].steps[step].kind {
        StepKind::Copy(copy) => copy.from.clone(),
        other => panic!("copy: {other:?}"),
    };
    assert!(matches!(from(1, 0), Some(CopyFrom::Stage(name, _)) if name == "build"));
    assert!(matches!(from(1, 1), Some(CopyFrom::Stage(name, _)) if name == "build"));
    assert!(matches!(from(2, 0), Some(CopyFrom::Stage(name, _)) if name == "1"));
    assert!(matches!(from(2, 1), Some(CopyFrom::Image(text)) if text.raw == "7"));
}

#[test]
fn bind_mounts_from_stages_images_and_writable() {
    let project = load(
        "FROM alpine AS build\nFROM alpine\nRUN --mount=type=bind,from=build,source=/out,target=/o --mount=type=bind,from=0,target=/z,rw --mount=type=bind,from=busybox:1.36,target=/i,readonly=false --mount=type=bind,target=/c true\n",
    )
    .expect("loads");
    let StepKind::Run(run) = &project.stages[1].steps[0].kind else {
        panic!("run")
    };
    let [build, index, image, context] = run.bind_mounts.as_slice() else {
        panic!("four bind mounts: {:?}", run.bind_mounts)
    };
    assert!(matches!(&build.from, Some(CopyFrom::Stage(name, _)) if name == "build"));
    assert_eq!(build.source.raw, "/out");
    assert!(!build.readwrite);
    assert!(matches!(&index.from, Some(CopyFrom::Stage(name, _)) if name == "build"));
    assert_eq!(index.source.raw, "/");
    assert!(index.readwrite);
    assert!(matches!(&image.from, Some(CopyFrom::Image(text)) if text.raw == "busybox:1.36"));
    assert!(image.readwrite);
    assert!(context.from.is_none() && context.source.raw == "." && !context.readwrite);
    let found = codes(
        "FROM alpine\nRUN --mount=type=bind,target=/x,from=scratch true\nRUN --mount=type=bind,target=/x,rw=maybe true\n",
    );
    let found: Vec<(Code, &str)> = found.iter().map(|(c, l)| (*c, l.as_str())).collect();
    assert_eq!(
        found,
        [(Code::RunBind, "line 2"), (Code::RunBind, "line 3")]
    );
}

#[test]
fn copy_parents_is_a_boolean_flag() {
    let project =
        load("FROM alpine\nCOPY --parents a/b /d/\nCOPY --parents=false a/b /d/\n").expect("loads");
    let parents: Vec<bool> = project.stages[0]
        .steps
        .iter()
        .map(|step| match &step.kind {
            StepKind::Copy(copy) => copy.parents,
            _ => panic!("copy"),
        })
        .collect();
    assert_eq!(parents, [true, false]);
    let found = codes("FROM alpine\nCOPY --parents=yes a /d/\n");
    let found: Vec<(Code, &str)> = found.iter().map(|(c, l)| (*c, l.as_str())).collect();
    assert_eq!(found, [(Code::DockerfileFlag, "line 2")]);
}
