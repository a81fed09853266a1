//! `graphbuild convert`: every Dockerfile of the test corpus (`tests/dockerfiles/` and the
//! Dockerfiles `tests/e2e/dockerfile.rs` writes, repeated here) converted to KDL, built with
//! `graphbuild run`, gives the index digest `graphbuild build` gives for the Dockerfile, for
//! linux/amd64 and linux/arm64 on the busybox fixture. What KDL cannot express is reported
//! at its line and fails the command unless `--allow-loss`.

mod common;

use std::path::Path;

use common::*;

const PLATFORMS: &str = "linux/amd64,linux/arm64";

fn index_digest(output: &std::process::Output) -> String {
    summary(output)["images"][0]["index_digest"]
        .as_str()
        .unwrap_or_else(|| panic!("no index digest\n{}", stderr(output)))
        .to_string()
}

/// `graphbuild build` of the Dockerfile in `dir` (relative to the sandbox) and `graphbuild run`
/// of its conversion (written to `dir/converted.kdl`): their index digests, and the KDL.
/// `build_extra` goes to `build`, `run_extra` to `run`.
fn both_ways(
    sandbox: &Sandbox,
    dir: &str,
    build_extra: &[&str],
    run_extra: &[&str],
) -> (String, String, String) {
    let kdl_path = format!("{dir}/converted.kdl");
    let converted = sandbox.graphbuild(&[
        "convert",
        &format!("{dir}/Dockerfile"),
        "--platform",
        PLATFORMS,
        "-t",
        "localhost/converted:1.0",
        "-o",
        &kdl_path,
    ]);
    assert_success(&converted);
    let kdl = std::fs::read_to_string(sandbox.path().join(&kdl_path)).expect("the KDL written");
    let mut build = vec![
        "build",
        "--platform",
        PLATFORMS,
        "-t",
        "localhost/converted:1.0",
        "--provenance=false",
        "--progress",
        "json",
    ];
    build.extend_from_slice(build_extra);
    build.push(dir);
    let built = sandbox.graphbuild(&build);
    assert_success(&built);
    let mut run = vec![
        "run",
        &kdl_path,
        "--output",
        "out-kdl",
        "--provenance=false",
        "--progress",
        "json",
    ];
    run.extend_from_slice(run_extra);
    let ran = sandbox.graphbuild(&run);
    assert_success(&ran);
    (index_digest(&built), index_digest(&ran), kdl)
}

fn busybox_sandbox() -> Option<Sandbox> {
    if !root_and_qemu() {
        return None;
    }
    let sandbox = Sandbox::new();
    sandbox.busybox("fixtures/busybox");
    Some(sandbox)
}

#[test]
fn the_dockerfile_corpus_converts_to_kdl_with_the_same_index_digest() {
    let Some(sandbox) = busybox_sandbox() else {
        return;
    };
    for name in ["full", "same"] {
        copy_tree(
            &repo_root().join("tests/dockerfiles").join(name),
            &sandbox.path().join("tests/dockerfiles").join(name),
        );
    }
    let token = sandbox.path().join("tests/dockerfiles/full/token.txt");
    let secret = format!("id=token,src={}", token.display());
    let (built, ran, kdl) = both_ways(
        &sandbox,
        "tests/dockerfiles/full",
        &["--build-arg", "VERSION=2.0", "--secret", &secret],
        &["--arg", "VERSION=2.0", "--secret", &secret],
    );
    assert_eq!(built, ran, "full:\n{kdl}");
    // What a person would write: a heredoc as a multi-line string, grouped env, Dockerfile
    // rules where the scoping shows (a RUN reads ${TARGETOS:-unset}).
    assert!(
        kdl.contains("    run \"\"\"\n        echo heredoc-line-1 > /src/heredoc.txt\n"),
        "{kdl}"
    );
    assert!(
        kdl.contains("    env APP_HOME=\"/srv\" SEEN=\"$APP_HOME\"\n"),
        "{kdl}"
    );
    assert!(kdl.contains("stage build rules=\"dockerfile\" {"), "{kdl}");
    let (built, ran, kdl) = both_ways(&sandbox, "tests/dockerfiles/same", &[], &[]);
    assert_eq!(built, ran, "same:\n{kdl}");
}

/// A directory's name, its Dockerfile, and the context files beside it.
type Case = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

/// The Dockerfiles `tests/e2e/dockerfile.rs` writes (with the context files they copy or
/// mount), each converted and built both ways.
#[test]
fn the_dockerfiles_of_the_e2e_tests_convert_with_the_same_index_digest() {
    let Some(sandbox) = busybox_sandbox() else {
        return;
    };
    let cases: &[Case] = &[
        (
            "shebang",
            "FROM oci:../fixtures/busybox:1.35.0\nRUN <<EOF\n#!/bin/awk -f\nBEGIN { print \"awk ran\" > \"/awk.txt\" }\nEOF\nRUN <<EOF\n#!/bin/sh -e\necho \"$0 $(id -u)\" > /zero.txt\nEOF\n",
            &[],
        ),
        (
            "exclude",
            "FROM oci:../fixtures/busybox:1.35.0\nCOPY --exclude=*.md --exclude=sub/skip --exclude=Dockerfile --exclude=*.kdl . /app/\n",
            &[
                ("a.txt", "a"),
                ("b.md", "b"),
                ("sub/c.md", "c"),
                ("sub/keep.txt", "keep"),
                ("sub/skip/d.txt", "d"),
            ],
        ),
        (
            "heredoc",
            "FROM oci:../fixtures/busybox:1.35.0\nARG NAME=world\nCOPY <<EOF /etc/motd\nhello $NAME\nEOF\nCOPY <<'EOF' /raw.txt\nkept $NAME\nEOF\nCOPY --chmod=0755 <<greet /usr/local/bin/\n#!/bin/sh\necho hi\ngreet\n",
            &[],
        ),
        (
            "bind",
            "FROM oci:../fixtures/busybox:1.35.0\nRUN --mount=type=bind,source=src,target=/src cat /src/a.txt > /out.txt; sh /src/sub/b.sh >> /out.txt; ls /src >> /out.txt; if touch /src/new 2>/dev/null; then echo writable; else echo read-only; fi >> /out.txt\nRUN --mount=type=bind,source=src/a.txt,target=/one.txt cat /one.txt > /single.txt\n",
            &[
                ("src/a.txt", "first\n"),
                ("src/sub/b.sh", "#!/bin/sh\necho from-script\n"),
                (".dockerignore", "src/ignored.txt\n"),
                ("src/ignored.txt", "never seen\n"),
            ],
        ),
        (
            "cache-owner",
            "FROM oci:../fixtures/busybox:1.35.0\nRUN --mount=type=cache,target=/c,id=owned,uid=1000,gid=1001,mode=0710 stat -c '%u %g %a' /c > /df.txt\n",
            &[],
        ),
        (
            "failing-run-fixed",
            // The failing RUN of a_failing_dockerfile_run_points_at_its_instruction, made to
            // succeed: a continuation line.
            "FROM oci:../fixtures/busybox:1.35.0\nRUN echo hi && \\\n    exit 0\n",
            &[],
        ),
    ];
    for (name, dockerfile, files) in cases {
        sandbox.write(&format!("{name}/Dockerfile"), dockerfile);
        for (path, text) in *files {
            sandbox.write(&format!("{name}/{path}"), text);
        }
        let (built, ran, kdl) = both_ways(&sandbox, name, &[], &[]);
        assert_eq!(built, ran, "{name}:\n{kdl}");
    }
}

/// A RUN's environment is where Dockerfile and KDL scoping differ: the converted stage keeps
/// the Dockerfile's rules (`rules="dockerfile"`), and without them the image is another.
#[test]
fn converted_stages_keep_the_dockerfile_scoping_of_run_and_env() {
    let Some(sandbox) = busybox_sandbox() else {
        return;
    };
    sandbox.write(
        "scope/Dockerfile",
        "ARG BASE=oci:../fixtures/busybox:1.35.0\nARG GLOBAL=global\nFROM $BASE\nARG TARGETARCH\nRUN env | sort > /env.txt; echo \"${GLOBAL:-unset} ${TARGETOS:-unset}\" > /scope.txt\nENV A=new B=$A\nCMD echo $GLOBAL\n",
    );
    let (built, ran, kdl) = both_ways(&sandbox, "scope", &[], &[]);
    assert_eq!(built, ran, "{kdl}");
    let rootfs = unpack_platform(
        &sandbox.path().join("out-kdl/converted"),
        "1.0",
        "linux/arm64",
        &sandbox.path().join("rootfs"),
    );
    let scope = std::fs::read_to_string(rootfs.join("scope.txt")).expect("scope.txt");
    assert_eq!(scope, "unset unset\n", "Docker's scoping, from the KDL");
    let env = std::fs::read_to_string(rootfs.join("env.txt")).expect("env.txt");
    assert!(env.contains("TARGETARCH=arm64\n"), "{env}");
    assert!(!env.contains("TARGETOS"), "{env}");

    // The same KDL with KDL's rules: the RUN sees every automatic arg, another image.
    let kdl_rules = kdl.replace(" rules=\"dockerfile\"", "");
    assert_ne!(kdl_rules, kdl);
    sandbox.write("scope/kdl-rules.kdl", &kdl_rules);
    let other = sandbox.graphbuild(&[
        "run",
        "scope/kdl-rules.kdl",
        "--output",
        "out-kdl-rules",
        "--provenance=false",
        "--progress",
        "json",
    ]);
    assert_success(&other);
    assert_ne!(index_digest(&other), built);
}

#[test]
fn what_kdl_cannot_express_fails_the_conversion_unless_accepted() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "lossy/Dockerfile",
        "FROM scratch AS s\nCOPY <<a <<b /dir/\nA\na\nB\nb\nRUN [\"true\"]\n",
    );
    let refused = sandbox.graphbuild(&["convert", "lossy/Dockerfile", "-o", "lossy/images.kdl"]);
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    let err = stderr(&refused);
    for expected in [
        "graphbuild::convert",
        "several heredocs in one `COPY`",
        "lossy/Dockerfile:2:1",
        "a one-word exec-form `RUN [\"…\"]`",
        "lossy/Dockerfile:7:1",
        "2 construct(s) cannot be written exactly in KDL; nothing was written",
    ] {
        assert!(err.contains(expected), "{expected:?} in\n{err}");
    }
    assert!(
        !Path::new(&sandbox.path().join("lossy/images.kdl")).exists(),
        "nothing written"
    );
    let accepted = sandbox.graphbuild(&[
        "convert",
        "lossy/Dockerfile",
        "--allow-loss",
        "-o",
        "lossy/images.kdl",
    ]);
    assert_success(&accepted);
    assert!(stderr(&accepted).contains("several heredocs in one `COPY`"));
    let kdl = std::fs::read_to_string(sandbox.path().join("lossy/images.kdl")).expect("written");
    assert!(kdl.contains("file \"/dir/\" heredoc=\"a\""), "{kdl}");

    // A malformed Dockerfile: its diagnostics, exit 2, nothing on stdout.
    sandbox.write("bad/Dockerfile", "FROM scratch\nRUNN x\n");
    let bad = sandbox.graphbuild(&["convert", "bad/Dockerfile"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stdout(&bad).is_empty());
    assert!(
        stderr(&bad).contains("bad/Dockerfile:2:1"),
        "{}",
        stderr(&bad)
    );
}
