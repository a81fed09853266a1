//! Dockerfiles and KDL together, for linux/amd64 and linux/arm64 on the busybox fixture:
//!
//! - `graphbuild convert`: every Dockerfile of the test corpus (`tests/dockerfiles/` and the
//!   Dockerfiles `tests/e2e/dockerfile.rs` writes, repeated here) converted to KDL and built
//!   with `graphbuild run` gives the index digest `graphbuild build` gives for the Dockerfile.
//!   What KDL cannot express is reported at its line and fails the command unless
//!   `--allow-loss`.
//! - The `dockerfile` node: the same Dockerfiles imported into a KDL file give that digest
//!   too; an imported Dockerfile takes args per image across a matrix, as bake's targets do;
//!   a failing step inside it is reported at the Dockerfile's line.

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
    both_ways_for(sandbox, dir, PLATFORMS, build_extra, run_extra)
}

/// [`both_ways`] for other platforms than linux/amd64 and linux/arm64.
fn both_ways_for(
    sandbox: &Sandbox,
    dir: &str,
    platforms: &str,
    build_extra: &[&str],
    run_extra: &[&str],
) -> (String, String, String) {
    let kdl_path = format!("{dir}/converted.kdl");
    let converted = sandbox.graphbuild(&[
        "convert",
        &format!("{dir}/Dockerfile"),
        "--platform",
        platforms,
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
        platforms,
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
    // The same graph: every step of the converted file is a cache hit of the build's (its
    // keys are the same), so nothing runs again.
    assert_eq!(
        summary(&ran)["executed"],
        0,
        "{dir}: steps ran again\n{kdl}"
    );
    (index_digest(&built), index_digest(&ran), kdl)
}

/// `graphbuild build` of the Dockerfile in `dir`: its index digest.
fn build_digest(sandbox: &Sandbox, dir: &str, extra: &[&str]) -> String {
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
    build.extend_from_slice(extra);
    build.push(dir);
    let built = sandbox.graphbuild(&build);
    assert_success(&built);
    index_digest(&built)
}

/// `graphbuild run` of a KDL file importing `dir/Dockerfile` as `df`, its image the stage
/// `df.STAGE` tagged as `both_ways` tags it: the index digest, and how many steps ran.
fn imported_digest(
    sandbox: &Sandbox,
    dir: &str,
    stage: &str,
    args: &str,
    extra: &[&str],
) -> (String, u64) {
    let file = format!("{dir}/imported.kdl");
    sandbox.write(
        &file,
        &format!(
            "platforms \"linux/amd64\" \"linux/arm64\"\n\ndockerfile df path=\"Dockerfile\" {{\n{args}}}\n\nimage converted {{\n    stage \"df.{stage}\"\n    tags \"localhost/converted:1.0\"\n}}\n"
        ),
    );
    let mut run = vec![
        "run",
        &file,
        "--output",
        "out-imported",
        "--provenance=false",
        "--progress",
        "json",
    ];
    run.extend_from_slice(extra);
    let ran = sandbox.graphbuild(&run);
    assert_success(&ran);
    let executed = summary(&ran)["executed"].as_u64().expect("executed");
    (index_digest(&ran), executed)
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

/// The features the language gained for Dockerfiles (`tests/dockerfiles/features`): ADD of a
/// local archive, of a URL with a checksum (a loopback HTTP server) and of a git repository
/// (`git daemon` on loopback); bind mounts from a stage (read-only, and `rw`), tmpfs, an
/// optional ssh mount, cache mounts with sharing/uid/gid/mode, an optional secret, COPY
/// --parents, symbolic --chmod, --exclude with --from, `--from=0` naming a named stage, COPY
/// and RUN heredocs (a `#!` line), SHELL, HEALTHCHECK. Converted, the KDL builds the image
/// `graphbuild build` makes (the same index digest, nothing run again, no new download); the
/// files and the config are the ones Docker writes.
#[test]
fn the_feature_corpus_converts_and_builds_the_files_and_config_docker_would() {
    let Some(sandbox) = busybox_sandbox() else {
        return;
    };
    copy_tree(
        &repo_root().join("tests/dockerfiles/features"),
        &sandbox.path().join("tests/dockerfiles/features"),
    );
    let Some(git) = git_server(&sandbox.path().join("git")) else {
        return;
    };
    let server = http();
    server.serve("/features/notes.txt", b"release notes\n");
    let url = format!("URL={}", server.url("/features/notes.txt"));
    let repo = format!("GIT=git://127.0.0.1:{}/repo.git", git.port);
    // The busybox fixture has linux/arm/v7 too.
    let (built, ran, kdl) = both_ways_for(
        &sandbox,
        "tests/dockerfiles/features",
        "linux/amd64,linux/arm64,linux/arm/v7",
        &["--build-arg", &url, "--build-arg", &repo],
        &["--arg", &url, "--arg", &repo],
    );
    assert_eq!(built, ran, "features:\n{kdl}");
    // Keyed by its checksum, the download is not asked for again by the converted file.
    assert_eq!(server.requests("/features/notes.txt"), 1);
    // Imported with a `dockerfile` node (two platforms, as `imported_digest` writes): the
    // image `build` makes, nothing run again.
    let built_two = build_digest(
        &sandbox,
        "tests/dockerfiles/features",
        &["--build-arg", &url, "--build-arg", &repo],
    );
    let args = format!(
        "    arg URL=\"{}\"\n    arg GIT=\"git://127.0.0.1:{}/repo.git\"\n",
        server.url("/features/notes.txt"),
        git.port
    );
    assert_eq!(
        imported_digest(&sandbox, "tests/dockerfiles/features", "1", &args, &[]),
        (built_two, 0),
        "features imported"
    );
    assert_eq!(server.requests("/features/notes.txt"), 1);
    for expected in [
        "    add \"${URL}\" \"/opt/notes.txt\" checksum=\"sha256:48b1a29e44eeff814abc6250e43395bf8ac81827f5791261378cb13b6699e37f\"\n",
        "    add \"${GIT}#v1\" \"/git/\"\n",
        "    copy \"/assets/keep/a.txt\" \"/by-index.txt\" from=assets\n",
        "    copy \"/assets/\" \"/from-assets/\" from=assets exclude=\"keep/*.md\" exclude=\"skip\"\n",
        "    copy \"src/./a/\" \"/parents/\" parents=#true\n",
        "    copy \"run.sh\" \"/usr/local/bin/run.sh\" chmod=\"u+x,go-w\"\n",
        "        bind \"/mnt\" source=\"/assets/keep\" from=assets\n",
        "        bind \"/b\" from=assets rw=#true\n",
        "        tmpfs \"/scratch\"\n",
        "        ssh \"deploy\" required=#false\n",
        "        cache-mount \"/var/cache/app\" id=\"app\" sharing=\"locked\" uid=\"1000\" gid=\"1000\" mode=\"0750\"\n",
        "        secret \"token\" env=\"TOKEN\" required=#false\n",
        "    shell \"/bin/sh\" \"-e\" \"-c\"\n",
        "    healthcheck \"/usr/local/bin/run.sh\" \"--health\" interval=\"10s\" timeout=\"2s\" start-period=\"1s\" retries=4\n",
    ] {
        assert!(kdl.contains(expected), "{expected:?} in\n{kdl}");
    }

    let layout = sandbox.path().join("out-kdl/converted");
    for platform in ["linux/amd64", "linux/arm64", "linux/arm/v7"] {
        let rootfs = unpack_platform(
            &layout,
            "1.0",
            platform,
            &sandbox
                .path()
                .join(format!("rootfs-{}", platform.replace('/', "-"))),
        );
        let read = |path: &str| {
            std::fs::read_to_string(rootfs.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
        };
        for (path, expected) in [
            ("opt/archive/lib/one.txt", "lib one\n"),
            ("opt/notes.txt", "release notes\n"),
            ("git/README", "version 1\n"),
            ("by-index.txt", "kept\n"),
            ("from-assets/keep/a.txt", "kept\n"),
            ("parents/a/b.txt", "b\n"),
            ("parents/a/deep/c.txt", "deep\n"),
            ("etc/motd", "hello from a heredoc\n"),
            // The `#!/bin/sh -e` line ran the script, not `sh -c`.
            ("shebang.txt", "errexit\n"),
            ("bound.txt", "kept\nread-only\n"),
            // A writable bind: the RUN saw its write; the stage and the layer did not keep it.
            ("rw.txt", "keep\nscribble\nskip\n"),
            ("tmpfs.txt", "gone\n"),
            ("ssh.txt", "/run/buildkit/ssh_agent.0\n"),
            ("cache.txt", "1000 1000 750\n"),
            ("secret-size.txt", "0\n"),
        ] {
            assert_eq!(read(path), expected, "{path} for {platform}");
        }
        for absent in [
            "from-assets/keep/readme.md",
            "from-assets/skip",
            "parents/top.txt",
            "parents/src",
            "git/.git",
            "mnt/a.txt",
            "b",
            "scratch/t",
            "run/secrets/token",
        ] {
            assert!(
                std::fs::symlink_metadata(rootfs.join(absent)).is_err(),
                "{absent} in the {platform} image"
            );
        }
        let mode = std::fs::metadata(rootfs.join("usr/local/bin/run.sh"))
            .expect("run.sh")
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o7777,
            0o744,
            "u+x,go-w on 0644"
        );

        // The config Docker writes for this Dockerfile, field by field: PATH replaced where
        // the base set it, the base's label kept, durations in nanoseconds.
        let config = config(&layout, platform);
        let expected = serde_json::json!({
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "APP=/app"],
            "Cmd": ["serve"],
            "Entrypoint": ["/usr/local/bin/run.sh"],
            "WorkingDir": "/app",
            "User": "1000:1000",
            "Labels": {"io.buildah.version": "1.28.2", "org.example.corpus": "features"},
            "ExposedPorts": {"53/udp": {}, "8080/tcp": {}},
            "Volumes": {"/cache": {}, "/data": {}},
            "Healthcheck": {
                "Test": ["CMD", "/usr/local/bin/run.sh", "--health"],
                "Interval": 10_000_000_000u64,
                "Timeout": 2_000_000_000u64,
                "StartPeriod": 1_000_000_000u64,
                "Retries": 4
            },
            "StopSignal": "SIGTERM",
            "Shell": ["/bin/sh", "-e", "-c"]
        });
        for (field, value) in expected.as_object().expect("object") {
            assert_eq!(&config["config"][field], value, "{field} for {platform}");
        }
        let parts: Vec<&str> = platform.split('/').collect();
        assert_eq!(config["os"], parts[0]);
        assert_eq!(config["architecture"], parts[1]);
        assert_eq!(config["variant"].as_str(), parts.get(2).copied());
    }
}

/// A directory's name, its Dockerfile, and the context files beside it.
type Case = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

/// The Dockerfiles `tests/e2e/dockerfile.rs` writes (with the context files they copy or
/// mount), each converted and built both ways, and imported with a `dockerfile` node.
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
        // And imported with a `dockerfile` node.
        // It ran right after `build`: the same graph, nothing runs again.
        assert_eq!(
            imported_digest(&sandbox, name, "0", "", &[]),
            (built, 0),
            "{name}"
        );
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

    // Written elsewhere than beside the Dockerfile: a warning, its paths would not match.
    let elsewhere = sandbox.graphbuild(&[
        "convert",
        "lossy/Dockerfile",
        "--allow-loss",
        "-o",
        "elsewhere.kdl",
    ]);
    assert_success(&elsewhere);
    assert!(
        stderr(&elsewhere).contains("elsewhere.kdl is not in the directory of lossy/Dockerfile"),
        "{}",
        stderr(&elsewhere)
    );
    assert!(!stderr(&accepted).contains("is not in the directory"));

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

/// `ONBUILD` is refused by name at its line, the same way by `build`, `convert` and the
/// `dockerfile` node: exit 2, nothing written.
#[test]
fn onbuild_is_refused_at_its_line_by_build_convert_and_import() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "ob/Dockerfile",
        "FROM scratch\nCOPY a /a\nONBUILD RUN echo hi\n",
    );
    sandbox.write("ob/a", "a\n");
    sandbox.write(
        "ob/images.kdl",
        "dockerfile ob\nimage ob { stage \"ob.0\"; }\n",
    );
    for args in [
        &["build", "--platform", "linux/amd64", "ob"][..],
        &["convert", "ob/Dockerfile", "-o", "ob/converted.kdl"],
        &["plan", "ob/images.kdl"],
    ] {
        let output = sandbox.graphbuild(args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        let err = stderr(&output);
        for expected in [
            "graphbuild::dockerfile::unsupported",
            "`ONBUILD` is not supported",
            "ob/Dockerfile:3:1]",
        ] {
            assert!(err.contains(expected), "{args:?}: {expected:?} in\n{err}");
        }
    }
    assert!(!sandbox.path().join("ob/converted.kdl").exists());
    assert!(!sandbox.path().join("graphbuild-out").exists());
}

/// The corpus again, each Dockerfile imported with a `dockerfile` node instead of converted.
#[test]
fn a_dockerfile_imported_into_kdl_gives_the_index_digest_of_build() {
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
    let built = build_digest(
        &sandbox,
        "tests/dockerfiles/full",
        &["--build-arg", "VERSION=2.0", "--secret", &secret],
    );
    let imported = imported_digest(
        &sandbox,
        "tests/dockerfiles/full",
        "2",
        "    arg VERSION=\"2.0\"\n",
        &["--secret", &secret],
    );
    // Right after `build`: the same graph, every step a cache hit.
    assert_eq!(imported, (built.clone(), 0), "full");
    // Without the arg, the Dockerfile's default: another image.
    let default = imported_digest(
        &sandbox,
        "tests/dockerfiles/full",
        "2",
        "",
        &["--secret", &secret],
    );
    assert_ne!(default.0, built);
    let built = build_digest(&sandbox, "tests/dockerfiles/same", &[]);
    let imported = imported_digest(&sandbox, "tests/dockerfiles/same", "runtime", "", &[]);
    assert_eq!(imported, (built, 0), "same");
    sandbox.write(
        "scope/Dockerfile",
        "ARG BASE=oci:../fixtures/busybox:1.35.0\nARG GLOBAL=global\nFROM $BASE\nARG TARGETARCH\nRUN env | sort > /env.txt; echo \"${GLOBAL:-unset} ${TARGETOS:-unset}\" > /scope.txt\nENV A=new B=$A\nCMD echo $GLOBAL\n",
    );
    let built = build_digest(&sandbox, "scope", &[]);
    let imported = imported_digest(&sandbox, "scope", "0", "", &[]);
    assert_eq!(imported, (built, 0), "scope");
}

/// bake's use: one Dockerfile, an arg per image across a matrix, two platforms; each image is
/// the one `graphbuild build --build-arg` makes.
#[test]
fn an_imported_dockerfile_takes_its_args_per_image_across_a_matrix() {
    let Some(sandbox) = busybox_sandbox() else {
        return;
    };
    sandbox.write(
        "w/worker.Dockerfile",
        "ARG BASE\nFROM ${BASE}\nARG QUEUE\nARG TARGETARCH\nRUN echo \"$QUEUE $TARGETARCH\" > /queue.txt\nENV QUEUE=${QUEUE}\n",
    );
    sandbox.write(
        "w/images.kdl",
        r#"platforms "linux/amd64" "linux/arm64"
arg BASE="oci:../fixtures/busybox:1.35.0"

dockerfile worker path="worker.Dockerfile" {
    arg BASE="$BASE"
    arg QUEUE="$QUEUE"
}

image "worker-${QUEUE}" {
    stage "worker.0"
    matrix { QUEUE "email" "reports"; }
    tags "localhost/worker:${QUEUE}"
}
"#,
    );
    let ran = sandbox.graphbuild(&[
        "run",
        "w/images.kdl",
        "--output",
        "out-matrix",
        "--provenance=false",
        "--progress",
        "json",
    ]);
    assert_success(&ran);
    let images = summary(&ran)["images"].as_array().expect("images").clone();
    assert_eq!(images.len(), 2);
    for queue in ["email", "reports"] {
        let image = images
            .iter()
            .find(|image| image["name"] == format!("worker-{queue}"))
            .unwrap_or_else(|| panic!("worker-{queue} in {images:?}"));
        let rootfs = unpack_platform(
            &sandbox
                .path()
                .join("out-matrix")
                .join(format!("worker-{queue}")),
            queue,
            "linux/arm64",
            &sandbox.path().join(format!("rootfs-{queue}")),
        );
        assert_eq!(
            std::fs::read_to_string(rootfs.join("queue.txt")).expect("queue.txt"),
            format!("{queue} arm64\n")
        );
        let built = sandbox.graphbuild(&[
            "build",
            "--platform",
            PLATFORMS,
            "-t",
            &format!("localhost/worker:{queue}"),
            "-f",
            "w/worker.Dockerfile",
            "--build-arg",
            "BASE=oci:../fixtures/busybox:1.35.0",
            "--build-arg",
            &format!("QUEUE={queue}"),
            "--provenance=false",
            "--progress",
            "json",
            "w",
        ]);
        assert_success(&built);
        assert_eq!(
            image["index_digest"],
            summary(&built)["images"][0]["index_digest"],
            "{queue}"
        );
    }
}

/// A failing RUN inside an imported Dockerfile is a diagnostic on the Dockerfile's line.
#[test]
fn a_failing_step_of_an_imported_dockerfile_points_at_its_line() {
    if !prerequisite(
        nix::unistd::geteuid().is_root(),
        "root (builds run in namespaces)",
    ) {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.busybox("fixtures/busybox");
    sandbox.write(
        "df/Dockerfile",
        "FROM oci:../fixtures/busybox:1.35.0\nRUN echo hi && \\\n    exit 3\n",
    );
    sandbox.write(
        "df/images.kdl",
        "platforms \"linux/amd64\"\ndockerfile df\nimage df { stage \"df.0\"; }\n",
    );
    let output = sandbox.graphbuild(&["run", "df/images.kdl", "--progress", "plain"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(err.contains("graphbuild::step::failed"), "{err}");
    assert!(err.contains("df/Dockerfile:2:1]"), "{err}");
    assert!(err.contains("2 │ ╭─▶ RUN echo hi && \\"), "{err}");
    assert!(
        err.contains("exit code 3, stage `df.0` for linux/amd64"),
        "{err}"
    );

    // A Dockerfile with an error: exit 2, the diagnostic at its line.
    sandbox.write("bad/Dockerfile", "FROM scratch\nRUNN x\n");
    sandbox.write(
        "bad/images.kdl",
        "dockerfile bad\nimage bad { stage \"bad.0\"; }\n",
    );
    let output = sandbox.graphbuild(&["plan", "bad/images.kdl"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("bad/Dockerfile:2:1]"),
        "{}",
        stderr(&output)
    );
}

/// `convert --bake`: examples/bake-comparison's docker-bake.hcl as KDL driving its
/// Dockerfiles; every image (api for three platforms, a matrix of two workers) is the one
/// `graphbuild build` makes with the target's args, digest for digest.
#[test]
fn a_bake_file_converts_to_kdl_that_builds_its_targets() {
    let Some(sandbox) = busybox_sandbox() else {
        return;
    };
    let dir = sandbox.example("bake-comparison");
    let converted = sandbox.graphbuild(&[
        "convert",
        "--bake",
        "examples/bake-comparison/docker-bake.hcl",
        "-o",
        "examples/bake-comparison/bake.kdl",
    ]);
    assert_success(&converted);
    let kdl = std::fs::read_to_string(dir.join("bake.kdl")).expect("written");
    for expected in [
        "arg VERSION=(env)\"1.0.0\"\n",
        "dockerfile worker path=\"worker.Dockerfile\" {\n    arg BASE=\"${BASE}\"\n    arg QUEUE=\"${queue}\"\n}\n",
        "image \"worker-${queue}\" {\n",
        "    matrix { queue \"email\" \"reports\"; }\n",
        "    platforms \"linux/amd64\" \"linux/arm64\" \"linux/arm/v7\"\n",
        "group default {\n    targets \"api\" \"worker-email\" \"worker-reports\"\n}\n",
    ] {
        assert!(kdl.contains(expected), "{expected:?} in\n{kdl}");
    }
    assert!(!kdl.contains("_common"), "{kdl}");
    let base = "BASE=oci:../../tests/fixtures/busybox:1.35.0";
    let ran = sandbox.graphbuild(&[
        "run",
        "examples/bake-comparison/bake.kdl",
        "--arg",
        base,
        "--output",
        "out-bake",
        "--provenance=false",
        "--progress",
        "json",
    ]);
    assert_success(&ran);
    let images = summary(&ran)["images"].as_array().expect("images").clone();
    let names: Vec<&str> = images.iter().filter_map(|i| i["name"].as_str()).collect();
    assert_eq!(names, ["api", "worker-email", "worker-reports"]);
    let cases = [
        (
            "api",
            "api.Dockerfile",
            "linux/amd64,linux/arm64,linux/arm/v7",
            "localhost:5000/api:1.0.0",
            vec!["VERSION=1.0.0"],
        ),
        (
            "worker-email",
            "worker.Dockerfile",
            PLATFORMS,
            "localhost:5000/worker:1.0.0-email",
            vec!["QUEUE=email"],
        ),
        (
            "worker-reports",
            "worker.Dockerfile",
            PLATFORMS,
            "localhost:5000/worker:1.0.0-reports",
            vec!["QUEUE=reports"],
        ),
    ];
    for (name, dockerfile, platforms, tag, args) in cases {
        let file = format!("examples/bake-comparison/{dockerfile}");
        let mut build = vec![
            "build",
            "-f",
            &file,
            "--platform",
            platforms,
            "-t",
            tag,
            "--provenance=false",
            "--progress",
            "json",
            "--build-arg",
            base,
        ];
        for arg in &args {
            build.push("--build-arg");
            build.push(arg);
        }
        build.push("examples/bake-comparison");
        let built = sandbox.graphbuild(&build);
        assert_success(&built);
        let image = images
            .iter()
            .find(|i| i["name"] == name)
            .expect("the image");
        assert_eq!(
            image["index_digest"],
            summary(&built)["images"][0]["index_digest"],
            "{name}"
        );
    }

    // The two Dockerfiles converted together: one file, their stages prefixed, each image the
    // one `graphbuild build` makes of its Dockerfile.
    let converted = sandbox.graphbuild(&[
        "convert",
        "examples/bake-comparison/api.Dockerfile",
        "examples/bake-comparison/worker.Dockerfile",
        "--platform",
        PLATFORMS,
        "-o",
        "examples/bake-comparison/two.kdl",
    ]);
    assert_success(&converted);
    let kdl = std::fs::read_to_string(dir.join("two.kdl")).expect("written");
    assert!(
        kdl.contains("stage \"api.build\" rules=\"dockerfile\" {"),
        "{kdl}"
    );
    assert!(
        kdl.contains("copy \"/out/server\" \"/usr/local/bin/server\" from=\"api.build\""),
        "{kdl}"
    );
    let ran = sandbox.graphbuild(&[
        "run",
        "examples/bake-comparison/two.kdl",
        "--arg",
        base,
        "--output",
        "out-two",
        "--provenance=false",
        "--progress",
        "json",
    ]);
    assert_success(&ran);
    let images = summary(&ran)["images"].as_array().expect("images").clone();
    for (name, dockerfile) in [("api", "api.Dockerfile"), ("worker", "worker.Dockerfile")] {
        let file = format!("examples/bake-comparison/{dockerfile}");
        let built = sandbox.graphbuild(&[
            "build",
            "-f",
            &file,
            "--platform",
            PLATFORMS,
            "--provenance=false",
            "--progress",
            "json",
            "--build-arg",
            base,
            "examples/bake-comparison",
        ]);
        assert_success(&built);
        let image = images
            .iter()
            .find(|i| i["name"] == name)
            .expect("the image");
        assert_eq!(
            image["index_digest"],
            summary(&built)["images"][0]["index_digest"],
            "{name} of two.kdl"
        );
    }
}

/// What a bake file holds that KDL cannot write is a loss at the bake file's line.
#[test]
fn bake_constructs_kdl_cannot_express_are_reported_at_their_lines() {
    let sandbox = Sandbox::new();
    sandbox.write("b/Dockerfile", "ARG V\nFROM scratch\nARG V\n");
    sandbox.write(
        "b/docker-bake.hcl",
        "variable \"V\" { default = \"1\" }\ntarget \"app\" {\n  tags = [join(\"-\", [\"a\", V])]\n  cache-to = [\"type=gha\"]\n  args = { V = V }\n}\ntarget \"sub\" {\n  context = \"sub\"\n}\n",
    );
    let refused = sandbox.graphbuild(&["convert", "--bake", "b/docker-bake.hcl"]);
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(stdout(&refused).is_empty());
    let err = stderr(&refused);
    for expected in [
        "an HCL expression KDL cannot write",
        "b/docker-bake.hcl:3:11",
        "the target attribute `cache-to` is not converted",
        "b/docker-bake.hcl:4:3",
        "the context `sub` is not the bake file's directory",
        "b/docker-bake.hcl:8:3",
        "3 construct(s) cannot be written exactly in KDL",
    ] {
        assert!(err.contains(expected), "{expected:?} in\n{err}");
    }
    let accepted = sandbox.graphbuild(&["convert", "--bake", "b/docker-bake.hcl", "--allow-loss"]);
    assert_success(&accepted);
    let kdl = stdout(&accepted);
    assert!(
        kdl.contains("dockerfile app path=\"Dockerfile\" {\n    arg V=\"${V}\"\n}"),
        "{kdl}"
    );
    // A file that is not HCL: its line, exit 2.
    sandbox.write("c/docker-bake.hcl", "target \"x\" {\n  tags = [\n");
    let bad = sandbox.graphbuild(&["convert", "--bake", "c/docker-bake.hcl"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        stderr(&bad).contains("c/docker-bake.hcl:"),
        "{}",
        stderr(&bad)
    );
}
