use std::path::Path;

use super::*;
use crate::dockerfile::{Options, load_source};

fn dockerfile(name: &str, text: &str) -> Project {
    load_source(
        name,
        text,
        Path::new("."),
        &Options {
            image: "app".into(),
            tags: vec!["localhost/app:1.0".into()],
            ..Options::default()
        },
    )
    .unwrap_or_else(|error| panic!("{name} loads: {:?}", error.0))
}

fn convert(text: &str) -> Converted {
    let project = dockerfile("Dockerfile", text);
    to_kdl(
        &[Input { project: &project }],
        &["linux/amd64".into(), "linux/arm64".into()],
        "converted",
    )
}

fn lines_of(losses: &[Diagnostic], text: &str) -> Vec<usize> {
    losses
        .iter()
        .map(|loss| {
            let offset = loss.location.expect("a location").span.offset();
            text[..offset].matches('\n').count() + 1
        })
        .collect()
}

#[test]
fn the_corpus_dockerfiles_convert_without_loss() {
    for (name, text) in [
        (
            "full",
            include_str!("../../../tests/dockerfiles/full/Dockerfile"),
        ),
        (
            "same",
            include_str!("../../../tests/dockerfiles/same/Dockerfile"),
        ),
        (
            "features",
            include_str!("../../../tests/dockerfiles/features/Dockerfile"),
        ),
    ] {
        let converted = convert(text);
        let messages: Vec<&str> = converted
            .losses
            .iter()
            .map(|l| l.message.as_str())
            .collect();
        assert!(
            messages.is_empty(),
            "{name}: {messages:?}\n{}",
            converted.kdl
        );
    }
}

#[test]
fn the_kdl_reads_as_a_person_would_write_it() {
    let converted = convert(include_str!("../../../tests/dockerfiles/same/Dockerfile"));
    let expected = r##"// converted

platforms "linux/amd64" "linux/arm64"

arg BASE="oci:../../fixtures/busybox:1.35.0"

stage build rules="dockerfile" {
    from "$BASE"
    arg TARGETARCH
    run #"echo "$TARGETARCH" > /scratch/a && cp /scratch/a /arch.txt"# {
        tmpfs "/scratch" size="1m"
    }
}

stage runtime {
    from "$BASE"
    copy "/arch.txt" "/app/arch.txt" from=build
    copy "message.txt" "/app/"
    env APP_HOME="/app"
    workdir "/app"
    label "org.opencontainers.image.title"="same"
    expose "8080"
    user "1000"
    cmd "cat" "/app/arch.txt"
}

image app {
    stage runtime
    tags "localhost/app:1.0"
}
"##;
    assert_eq!(converted.kdl, expected);
}

#[test]
fn heredoc_scripts_and_files_are_multi_line_strings() {
    let text = "FROM scratch AS s\nRUN <<EOF\necho \"one\"\necho two\nEOF\nCOPY <<'EOF' /etc/motd\nkept $NAME\nEOF\nCOPY <<greet /bin/\nhi $NAME\ngreet\n";
    let converted = convert(text);
    assert!(converted.losses.is_empty(), "{:?}", converted.losses);
    assert!(
        converted
            .kdl
            .contains("    run \"\"\"\n        echo \"one\"\n        echo two\n\n        \"\"\"\n"),
        "{}",
        converted.kdl
    );
    assert!(
        converted.kdl.contains(
            "    file \"/etc/motd\" heredoc=\"EOF\" content=\"\"\"\n        kept $NAME\n\n        \"\"\"\n"
        ),
        "{}",
        converted.kdl
    );
    assert!(
        converted
            .kdl
            .contains("    file \"/bin/\" heredoc=\"greet\" expand=#true content="),
        "{}",
        converted.kdl
    );
}

#[test]
fn what_kdl_cannot_express_is_reported_at_its_line() {
    let text = "FROM scratch AS s\nRUN [\"true\"]\nCOPY <<a <<b /dir/\nA\na\nB\nb\nCMD []\n";
    let converted = convert(text);
    assert_eq!(lines_of(&converted.losses, text), vec![2, 3, 8]);
    assert!(
        converted
            .losses
            .iter()
            .all(|loss| loss.code == Code::Convert)
    );
}

#[test]
fn stages_without_variables_or_runs_keep_kdl_rules() {
    let converted = convert("FROM scratch AS a\nCOPY x /x\nFROM a AS b\nRUN true\n");
    assert!(converted.kdl.contains("stage a {"), "{}", converted.kdl);
    assert!(
        converted.kdl.contains("stage b rules=\"dockerfile\" {"),
        "{}",
        converted.kdl
    );
    assert!(converted.kdl.contains("    from a\n"), "{}", converted.kdl);
}

/// A bind mount from a stage of one of several Dockerfiles names its prefixed stage.
#[test]
fn several_dockerfiles_prefix_the_stages_their_bind_mounts_name() {
    let api = dockerfile(
        "api.Dockerfile",
        "FROM busybox AS assets\nFROM busybox\nRUN --mount=type=bind,from=assets,target=/a --mount=type=bind,from=0,target=/b,rw true\n",
    );
    let mut worker = dockerfile("worker.Dockerfile", "FROM alpine AS assets\n");
    worker.images[0].name.raw = "worker".into();
    let converted = to_kdl(
        &[Input { project: &api }, Input { project: &worker }],
        &[],
        "two",
    );
    assert!(
        converted
            .kdl
            .contains("        bind \"/a\" from=\"app.assets\"\n        bind \"/b\" from=\"app.assets\" rw=#true\n"),
        "{}",
        converted.kdl
    );
    assert!(converted.losses.is_empty(), "{:?}", converted.losses);
}

#[test]
fn several_dockerfiles_share_one_file_with_prefixed_stages() {
    let api = dockerfile(
        "api.Dockerfile",
        "ARG BASE=busybox\nFROM $BASE AS build\nRUN true\nFROM build\n",
    );
    let mut worker = dockerfile(
        "worker.Dockerfile",
        "ARG BASE=alpine\nFROM $BASE\nFROM $BASE\nCOPY --from=0 / /\n",
    );
    worker.images[0].name.raw = "worker".into();
    let converted = to_kdl(
        &[Input { project: &api }, Input { project: &worker }],
        &[],
        "two",
    );
    assert!(
        converted.kdl.contains("stage \"app.build\""),
        "{}",
        converted.kdl
    );
    assert!(
        converted.kdl.contains("copy \"/\" \"/\" from=\"worker.0\""),
        "{}",
        converted.kdl
    );
    assert!(
        converted.kdl.contains("    stage \"app.1\"\n"),
        "{}",
        converted.kdl
    );
    assert!(
        converted.kdl.contains("    stage \"worker.1\"\n"),
        "{}",
        converted.kdl
    );
    // BASE has two defaults: one loss, at the second Dockerfile's ARG.
    assert_eq!(converted.losses.len(), 1, "{:?}", converted.losses);
    assert_eq!(converted.losses[0].location.expect("at").file.0, 0);
}

#[test]
fn strings_take_the_plainest_exact_form() {
    for value in [
        "plain",
        "has \"quotes\"",
        "back\\slash",
        "ends with \"#",
        "two\nlines",
        "trailing\n",
        "\n",
        "  indented\n\tand tabbed\n",
        "   \n",
        "bell\u{7}",
        "\r\n",
        "\"\"\"# inside",
        "",
    ] {
        let written = kdl_string_at(value, "    ");
        assert!(parses_to(&written, value), "{value:?} → {written}");
    }
    assert_eq!(kdl_string("a b"), "\"a b\"");
    assert_eq!(kdl_string("say \"hi\""), "#\"say \"hi\"\"#");
}

#[test]
fn a_kdl_step_that_lowers_differently_is_a_loss() {
    let text = "FROM scratch AS s\nENV A=1\nWORKDIR /app\n";
    let project = dockerfile("Dockerfile", text);
    let good = "stage s {\n    from \"scratch\"\n    env A=\"1\"\n    workdir \"/app\"\n}\nimage app { stage s; }\n";
    let mut losses = Vec::new();
    verify(std::slice::from_ref(&project), good, &mut losses);
    assert!(losses.is_empty(), "{losses:?}");
    let bad = good.replace("workdir \"/app\"", "workdir \"/srv\"");
    verify(std::slice::from_ref(&project), &bad, &mut losses);
    assert_eq!(lines_of(&losses, text), vec![3]);
}

/// Every Dockerfile the front end accepts, down to one with any line of the corpus deleted,
/// converts to KDL that loads: a loss is reported, never an unloadable file or a panic.
#[test]
fn every_line_deletion_of_the_corpus_converts_to_loading_kdl() {
    let corpus = [
        include_str!("../../../tests/dockerfiles/full/Dockerfile"),
        include_str!("../../../tests/dockerfiles/same/Dockerfile"),
        "FROM scratch AS s\nRUN <<EOF\necho \"one\"\nEOF\nCOPY <<'EOF' /etc/motd\nkept $NAME\nEOF\nCOPY <<a <<b /d/\nA\na\nB\nb\nCMD []\nHEALTHCHECK NONE\nENTRYPOINT echo $X\nSHELL [\"/bin/bash\", \"-c\"]\nRUN --security=insecure --mount=type=bind,target=/b,source=x true\n",
    ];
    let mut converted_count = 0;
    for text in corpus {
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        for skip in 0..=lines.len() {
            let mutated: String = lines
                .iter()
                .enumerate()
                .filter(|(index, _)| *index != skip)
                .map(|(_, line)| *line)
                .collect();
            let Ok(project) = load_source(
                "Dockerfile",
                &mutated,
                Path::new("."),
                &Options {
                    image: "app".into(),
                    ..Options::default()
                },
            ) else {
                continue;
            };
            let converted = to_kdl(&[Input { project: &project }], &[], "");
            // A stage left copying from itself is a cycle, which `graphbuild build` rejects
            // too (when it expands the graph); nothing else may keep the KDL from loading.
            assert!(
                !converted.losses.iter().any(|loss| {
                    loss.message.contains("does not load") && !loss.message.contains("cycle")
                }),
                "{mutated}\n→\n{}\n{:?}",
                converted.kdl,
                converted.losses
            );
            // And every step lowers back to itself: only the known losses are reported.
            assert!(
                !converted
                    .losses
                    .iter()
                    .any(|loss| loss.message.contains("written differently")),
                "{mutated}\n→\n{}\n{:?}",
                converted.kdl,
                converted.losses
            );
            converted_count += 1;
        }
    }
    assert!(converted_count > 40, "{converted_count}");
}
