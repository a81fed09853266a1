//! `graphbuild build`: Dockerfiles from `tests/dockerfiles/` built for linux/amd64 and
//! linux/arm64 on the busybox fixture, checked with skopeo and umoci against what Docker
//! would produce; a Dockerfile and its KDL twin give one index digest; malformed Dockerfiles
//! report every problem (a golden file, `BLESS=1` rewrites it); `--push` to a local registry.

mod common;

use std::path::PathBuf;

use common::*;

/// Root is needed to run steps. Under CI a missing root is a failure, elsewhere a skip.
fn root_or_skip() -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root && std::env::var("CI").as_deref() == Ok("true") {
        panic!("this end-to-end test runs build steps and needs root; run the test suite as root");
    }
    if !root {
        eprintln!("skipped: needs root");
    }
    root
}

/// A sandbox with the busybox base at `fixtures/busybox`, or `None` (a skip) without root.
fn busybox_sandbox() -> Option<Sandbox> {
    if !root_or_skip() {
        return None;
    }
    let sandbox = Sandbox::new();
    sandbox.busybox("fixtures/busybox");
    Some(sandbox)
}

/// `graphbuild build` of the Dockerfile in `dir` for linux/amd64, its filesystem to `rootfs`.
fn build_to_rootfs(sandbox: &Sandbox, dir: &str, rootfs: &str) {
    let output = sandbox.graphbuild(&[
        "build",
        "--platform",
        "linux/amd64",
        "-o",
        &format!("type=local,dest={rootfs}"),
        dir,
    ]);
    assert_success(&output);
}

/// `graphbuild run` of a KDL file, its image's filesystem to `rootfs`.
fn run_to_rootfs(sandbox: &Sandbox, file: &str, rootfs: &str) {
    let output = sandbox.graphbuild(&[
        "run",
        file,
        "--output",
        "out",
        "--output",
        &format!("type=local,dest={rootfs}"),
    ]);
    assert_success(&output);
}

/// The corpus copied into the sandbox at `tests/dockerfiles/NAME`.
fn corpus(sandbox: &Sandbox, name: &str) -> PathBuf {
    let target = sandbox.path().join("tests/dockerfiles").join(name);
    copy_tree(&repo_root().join("tests/dockerfiles").join(name), &target);
    target
}

fn index_digest(output: &std::process::Output) -> String {
    summary(output)["images"][0]["index_digest"]
        .as_str()
        .unwrap_or_else(|| panic!("no index digest\n{}", stderr(output)))
        .to_string()
}

#[test]
fn the_full_dockerfile_builds_two_platforms_as_docker_would() {
    if !root_or_skip() {
        return;
    }
    require_tool("skopeo");
    require_tool("umoci");
    let sandbox = Sandbox::new();
    let context = corpus(&sandbox, "full");
    let token = context.join("token.txt");
    let output = sandbox.graphbuild(&[
        "build",
        "--platform",
        "linux/amd64,linux/arm64",
        "-t",
        "localhost/full:1.0",
        "--build-arg",
        "VERSION=2.0",
        "--secret",
        &format!("id=token,src={}", token.display()),
        "--progress",
        "json",
        "--metadata-file",
        "metadata.json",
        "--iidfile",
        "iid.txt",
        "--label",
        "org.example.built-by=graphbuild",
        "--annotation",
        "org.opencontainers.image.source=https://example.com/full",
        "tests/dockerfiles/full",
    ]);
    assert_success(&output);
    let layout = sandbox.path().join("graphbuild-out/full");
    let index = skopeo_raw(&format!("oci:{}:1.0", layout.display()));
    let platforms: Vec<String> = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|m| {
            format!(
                "{}/{}",
                m["platform"]["os"].as_str().unwrap_or_default(),
                m["platform"]["architecture"].as_str().unwrap_or_default()
            )
        })
        .collect();
    // The platform manifests, then their attestation manifests (provenance, on by default).
    assert_eq!(
        platforms,
        [
            "linux/amd64",
            "linux/arm64",
            "unknown/unknown",
            "unknown/unknown"
        ]
    );
    assert_eq!(
        index["annotations"]["org.opencontainers.image.source"],
        "https://example.com/full"
    );
    let metadata: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(sandbox.path().join("metadata.json")).expect("metadata file"),
    )
    .expect("JSON");
    assert_eq!(metadata["containerimage.digest"], index_digest(&output));
    assert_eq!(metadata["image.name"], "localhost/full:1.0");
    assert_eq!(
        std::fs::read_to_string(sandbox.path().join("iid.txt")).expect("iidfile"),
        index_digest(&output)
    );

    for (platform, uname, arch) in [
        ("linux/amd64", "x86_64", "amd64"),
        ("linux/arm64", "aarch64", "arm64"),
    ] {
        let rootfs = unpack_platform(
            &layout,
            "1.0",
            platform,
            &sandbox.path().join(format!("unpack-{arch}")),
        );
        let read = |path: &str| {
            std::fs::read_to_string(rootfs.join(path))
                .unwrap_or_else(|error| panic!("{platform}: {path}: {error}"))
        };
        assert_eq!(read("app/uname.txt"), format!("{uname}\n"), "{platform}");
        assert_eq!(read("app/version.txt"), "2.0\n", "{platform}");
        assert_eq!(read("app/exec.txt"), "exec-form\n");
        assert_eq!(read("app/heredoc.txt"), "heredoc-line-1\nheredoc-line-2\n");
        assert_eq!(read("app/secret-size.txt"), "7\n", "the secret was mounted");
        assert_eq!(read("app/target.txt"), format!("built for {arch}\n"));
        assert_eq!(read("app/message.txt"), "hello from the context\n");
        assert_eq!(
            read("app/scope.txt"),
            "unset unset 2.0\n",
            "a RUN sees only the args its stage declares, as in Docker"
        );
        assert_eq!(read("home/app/message.txt"), "hello from the context\n");
        assert!(
            !rootfs.join("run/secrets/token").exists(),
            "a secret never reaches a layer"
        );
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let script = std::fs::metadata(rootfs.join("usr/local/bin/run.sh")).expect("run.sh");
        assert_eq!(script.permissions().mode() & 0o7777, 0o755);
        let owned = std::fs::metadata(rootfs.join("home/app/message.txt")).expect("message");
        assert_eq!((owned.uid(), owned.gid()), (1000, 1000));

        // The config as `docker buildx build` writes it for this Dockerfile.
        let config = config(&layout, platform);
        let c = &config["config"];
        let env: Vec<&str> = c["Env"]
            .as_array()
            .expect("Env")
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert_eq!(
            env,
            [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "APP_HOME=/srv",
                "APP_VERSION=2.0",
                "QUOTED=two words",
                "LITERAL=$HOME",
                "LEGACY=legacy value",
                "SEEN=/app",
            ],
            "{platform}"
        );
        assert_eq!(
            c["Entrypoint"],
            serde_json::json!(["/usr/local/bin/run.sh"])
        );
        // Runtime commands are never substituted, as Docker: `$VERSION` is the container's.
        assert_eq!(
            c["Cmd"],
            serde_json::json!(["--port", "8080", "--version", "$VERSION"])
        );
        assert_eq!(c["User"], "1000:1000");
        assert_eq!(c["WorkingDir"], "/app");
        assert_eq!(c["StopSignal"], "SIGINT");
        assert_eq!(
            c["Labels"],
            serde_json::json!({
                // Inherited from the busybox fixture's config, as Docker keeps base labels.
                "io.buildah.version": "1.28.2",
                "org.opencontainers.image.version": "2.0",
                "com.example.quoted": "a b",
                "maintainer": "Jane Doe <jane@example.com>",
                "home": "/srv",
                "org.example.built-by": "graphbuild",
            })
        );
        assert_eq!(
            c["ExposedPorts"],
            serde_json::json!({"8080/tcp": {}, "53/udp": {}})
        );
        assert_eq!(c["Volumes"], serde_json::json!({"/data": {}}));
        assert_eq!(
            c["Healthcheck"],
            serde_json::json!({
                "Test": ["CMD-SHELL", "wget -q -O- http://localhost:8080/ || exit 1"],
                "Interval": 30_000_000_000u64,
                "Timeout": 3_000_000_000u64,
                "Retries": 2,
            })
        );
        assert_eq!(config["architecture"], arch);
    }

    // A second build is entirely cached.
    let again = sandbox.graphbuild(&[
        "build",
        "--platform",
        "linux/amd64",
        "--platform",
        "linux/arm64",
        "-t",
        "localhost/full:1.0",
        "--build-arg",
        "VERSION=2.0",
        "--secret",
        &format!("id=token,src={}", token.display()),
        "--progress",
        "json",
        "--label",
        "org.example.built-by=graphbuild",
        "--annotation",
        "org.opencontainers.image.source=https://example.com/full",
        "tests/dockerfiles/full",
    ]);
    assert_success(&again);
    assert_eq!(summary(&again)["executed"], 0, "{}", stdout(&again));
    assert_eq!(index_digest(&again), index_digest(&output));
}

/// A failed `RUN` of a Dockerfile is a diagnostic on the Dockerfile itself: its path, line and
/// column, the instruction underlined across its continuation line, the exit code, stage and
/// platform, the output; exit status 1.
#[test]
fn a_failing_dockerfile_run_points_at_its_instruction() {
    if !root_or_skip() {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.write(
        "df/Dockerfile",
        "FROM oci:../tests/fixtures/busybox:1.35.0\nRUN echo hi && \\\n    exit 3\n",
    );
    let output = sandbox.graphbuild(&[
        "build",
        "--platform",
        "linux/amd64",
        "--progress",
        "plain",
        "-f",
        "df/Dockerfile",
        "df",
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let err = stderr(&output);
    let expected = r#"graphbuild::step::failed

  × step failed: the command failed with exit code 3
   ╭─[df/Dockerfile:2:1]
 1 │     FROM oci:../tests/fixtures/busybox:1.35.0
 2 │ ╭─▶ RUN echo hi && \
 3 │ ├─▶     exit 3
   · ╰──── exit code 3, stage `0` for linux/amd64
   ╰────
  last output of `0` for linux/amd64:
  │ hi

error: 1 node of the build failed"#;
    let start = err
        .find("graphbuild::step::failed")
        .unwrap_or_else(|| panic!("no diagnostic:\n{err}"));
    assert_eq!(err[start..].trim_end(), expected, "whole stderr:\n{err}");
}

#[test]
fn a_dockerfile_and_its_kdl_twin_give_one_index_digest() {
    if !root_or_skip() {
        return;
    }
    let sandbox = Sandbox::new();
    corpus(&sandbox, "same");
    let kdl = sandbox.graphbuild(&[
        "run",
        "tests/dockerfiles/same/images.kdl",
        "--output",
        "out-kdl",
        "--progress",
        "json",
    ]);
    assert_success(&kdl);
    let dockerfile = sandbox.graphbuild(&[
        "build",
        "--platform",
        "linux/amd64,linux/arm64",
        "-t",
        "localhost/app:1.0",
        "-o",
        "type=oci,dest=out-dockerfile",
        "--progress",
        "json",
        "tests/dockerfiles/same",
    ]);
    assert_success(&dockerfile);
    // The images are the same; their provenance records different build files, so the
    // indexes differ by their attestation manifests only.
    let kdl_index = skopeo_raw(&format!(
        "oci:{}:1.0",
        sandbox.path().join("out-kdl/app").display()
    ));
    let dockerfile_index = skopeo_raw(&format!(
        "oci:{}:1.0",
        sandbox.path().join("out-dockerfile").display()
    ));
    assert_eq!(
        kdl_index["manifests"].as_array().expect("manifests")[..2],
        dockerfile_index["manifests"].as_array().expect("manifests")[..2]
    );
    let kdl_plain = sandbox.graphbuild(&[
        "run",
        "tests/dockerfiles/same/images.kdl",
        "--output",
        "out-kdl-plain",
        "--progress",
        "json",
        "--provenance=false",
    ]);
    assert_success(&kdl_plain);
    let dockerfile_plain = sandbox.graphbuild(&[
        "build",
        "--platform",
        "linux/amd64,linux/arm64",
        "-t",
        "localhost/app:1.0",
        "-o",
        "type=oci,dest=out-dockerfile-plain",
        "--progress",
        "json",
        "--provenance=false",
        "tests/dockerfiles/same",
    ]);
    assert_success(&dockerfile_plain);
    assert_eq!(index_digest(&dockerfile_plain), index_digest(&kdl_plain));
    // The run step's cache key differs: its environment follows each language's scoping (a
    // Dockerfile RUN sees only the args its stage declares, a KDL run every automatic arg).
    assert!(
        sandbox.path().join("out-dockerfile/index.json").exists(),
        "-o type=oci,dest=DIR writes the layout there"
    );

    // `-o type=local,dest=DIR`: the filesystem, through `run`'s exporter.
    let local = sandbox.graphbuild(&[
        "build",
        "--platform",
        "linux/arm64",
        "-o",
        "type=local,dest=rootfs",
        "--progress",
        "plain",
        "tests/dockerfiles/same",
    ]);
    assert_success(&local);
    assert_eq!(
        std::fs::read_to_string(sandbox.path().join("rootfs/app/arch.txt")).expect("arch.txt"),
        "arm64\n"
    );
}

#[test]
fn the_canonical_buildx_command_pushes_both_platforms() {
    if !root_or_skip() {
        return;
    }
    require_tool("skopeo");
    let registry = Registry::start();
    let sandbox = Sandbox::new();
    corpus(&sandbox, "same");
    registry.push_layout(
        &format!(
            "oci:{}:1.35.0",
            sandbox.path().join("tests/fixtures/busybox").display()
        ),
        "busybox:1.35.0",
    );
    let base = format!("BASE={}/busybox:1.35.0", registry.address);
    let tag = format!("{}/user/app:1.0", registry.address);
    let output = sandbox.graphbuild(&[
        "build",
        "--platform",
        "linux/amd64,linux/arm64",
        "-t",
        &tag,
        "--push",
        "--build-arg",
        &base,
        "--progress",
        "plain",
        "tests/dockerfiles/same",
    ]);
    assert_success(&output);
    assert!(
        stderr(&output).contains(&format!("pushed {tag}")),
        "{}",
        stderr(&output)
    );
    let raw = std::process::Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{tag}"))
        .output()
        .expect("skopeo runs");
    assert!(raw.status.success(), "{}", stderr(&raw));
    let index: serde_json::Value = serde_json::from_slice(&raw.stdout).expect("JSON");
    let architectures: Vec<&str> = index["manifests"]
        .as_array()
        .expect("an index")
        .iter()
        .filter_map(|m| m["platform"]["architecture"].as_str())
        .collect();
    assert_eq!(architectures, ["amd64", "arm64", "unknown", "unknown"]);
    assert!(
        sandbox
            .path()
            .join("graphbuild-out/app/index.json")
            .exists()
    );

    // `-o type=registry` is `--push`; the rebuild is cached.
    let second = format!("{}/user/app:1.1", registry.address);
    let output = sandbox.graphbuild(&[
        "build",
        "--platform",
        "linux/amd64,linux/arm64",
        "-t",
        &second,
        "-o",
        "type=registry",
        "--build-arg",
        &base,
        "--progress",
        "plain",
        "tests/dockerfiles/same",
    ]);
    assert_success(&output);
    assert!(
        stderr(&output).contains(&format!("pushed {second}")),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_malformed_dockerfile_reports_every_problem_as_the_golden_file_says() {
    let sandbox = Sandbox::new();
    corpus(&sandbox, "broken");
    let output = std::process::Command::new(bin())
        .args(["build", "tests/dockerfiles/broken"])
        .current_dir(sandbox.path())
        .env("NO_COLOR", "1")
        .env("COLUMNS", "100")
        .env("GRAPHBUILD_CACHE_DIR", sandbox.store())
        .output()
        .expect("graphbuild runs");
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let text = stderr(&output);
    let golden = repo_root().join("tests/e2e/golden/dockerfile-broken.txt");
    if std::env::var("BLESS").is_ok() {
        std::fs::write(&golden, &text).expect("write golden");
    }
    let expected = std::fs::read_to_string(&golden).expect("golden file (BLESS=1 writes it)");
    assert_eq!(text, expected, "BLESS=1 rewrites {}", golden.display());
    assert!(text.contains("tests/dockerfiles/broken/Dockerfile:4:1"));
    assert!(text.contains("help: did you mean `RUN`?"));

    corpus(&sandbox, "unsupported");
    let output = sandbox.graphbuild(&["build", "tests/dockerfiles/unsupported"]);
    assert_eq!(output.status.code(), Some(2));
    let text = stderr(&output);
    assert!(text.contains("--parents"), "{text}");
    assert!(
        text.contains("`--mount=type=npipe` is not supported yet"),
        "{text}"
    );
}

#[test]
fn unsupported_buildx_flags_and_outputs_are_refused_by_name() {
    let sandbox = Sandbox::new();
    corpus(&sandbox, "same");
    for (args, expected) in [
        (&["--builder", "x"][..], "does not support `--builder`"),
        (
            &["--add-host", "db:10.0.0.2"][..],
            "does not support `--add-host`",
        ),
        (
            &["--attest", "type=sbom"][..],
            "does not support `--attest`",
        ),
        (
            &["-o", "type=docker,dest=x"][..],
            "type=docker loads the image as --load does",
        ),
        (
            &["-o", "type=registry,push=true"][..],
            "`push` is not supported",
        ),
        (
            &["--cache-from", "type=registry,ref=x/y"][..],
            "team cache URL",
        ),
        (&["--target", "nope"][..], "no such stage"),
        (&["--bogus"][..], "--bogus"),
        (&["-f", "-"][..], "standard input"),
    ] {
        let mut full = vec!["build"];
        full.extend_from_slice(args);
        full.push("tests/dockerfiles/same");
        let output = sandbox.graphbuild(&full);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains(expected),
            "{args:?}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn tmpfs_mounts_are_bounded_and_leave_nothing_in_the_image() {
    if !root_or_skip() {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.write(
        "b.kdl",
        r#"platforms "linux/amd64" "linux/arm64"
stage s {
    from "oci:fixtures/busybox:1.35.0"
    run "grep ' /scratch ' /proc/mounts > /mounts.txt; echo made > /scratch/made; if dd if=/dev/zero of=/scratch/big bs=1024 count=2048 2>/dev/null; then echo unbounded; else echo bounded; fi > /size.txt" {
        tmpfs "/scratch" size="1m"
    }
}
image s {
    stage s
}
"#,
    );
    sandbox.busybox("fixtures/busybox");
    let output = sandbox.graphbuild(&["run", "b.kdl", "--output", "out", "--progress", "plain"]);
    assert_success(&output);
    for platform in ["linux/amd64", "linux/arm64"] {
        let rootfs = unpack_platform(
            &sandbox.path().join("out/s"),
            "latest",
            platform,
            &sandbox
                .path()
                .join(format!("unpacked-{}", platform.replace('/', "-"))),
        );
        let mounts = std::fs::read_to_string(rootfs.join("mounts.txt")).expect("mounts.txt");
        assert!(
            mounts.starts_with("tmpfs /scratch tmpfs rw,nosuid,nodev")
                && mounts.contains("size=1024k"),
            "{platform}: {mounts}"
        );
        assert_eq!(
            std::fs::read_to_string(rootfs.join("size.txt")).expect("size.txt"),
            "bounded\n",
            "{platform}"
        );
        // Neither what the step wrote there nor the mount point is in the layer.
        assert!(
            !rootfs.join("scratch").exists(),
            "{platform}: /scratch is in the image"
        );
    }

    // A bad size is a diagnostic at plan time, pointing at the value.
    sandbox.write(
        "bad.kdl",
        "stage s {\n    from \"scratch\"\n    run \"true\" {\n        tmpfs \"/t\" size=\"lots\"\n    }\n}\nimage s { stage s; }\n",
    );
    let output = sandbox.graphbuild(&["plan", "bad.kdl"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let text = stderr(&output);
    assert!(
        text.contains("`lots` is not a tmpfs size") && text.contains("bad.kdl:4"),
        "{text}"
    );
}

/// A `RUN` heredoc (or a KDL `run` string) starting with `#!` runs as a script of that
/// interpreter, as BuildKit does, and leaves no script file in the image.
#[test]
fn shebang_scripts_run_with_their_interpreter() {
    let Some(sandbox) = busybox_sandbox() else {
        return;
    };
    sandbox.write(
        "df/Dockerfile",
        "FROM oci:../fixtures/busybox:1.35.0\nRUN <<EOF\n#!/bin/awk -f\nBEGIN { print \"awk ran\" > \"/awk.txt\" }\nEOF\nRUN <<EOF\n#!/bin/sh -e\necho \"$0 $(id -u)\" > /zero.txt\nEOF\n",
    );
    sandbox.write(
        "b.kdl",
        "platforms \"linux/arm64\"\nstage s {\n    from \"oci:fixtures/busybox:1.35.0\"\n    run \"#!/bin/awk -f\\nBEGIN { print \\\"kdl awk\\\" > \\\"/awk.txt\\\" }\\n\"\n}\nimage s { stage s; }\n",
    );
    let built = sandbox.graphbuild(&[
        "build",
        "--platform",
        "linux/amd64,linux/arm64",
        "-o",
        "type=oci,dest=out-df",
        "df",
    ]);
    assert_success(&built);
    let kdl = sandbox.graphbuild(&["run", "b.kdl", "--output", "out-kdl"]);
    assert_success(&kdl);
    for platform in ["linux/amd64", "linux/arm64"] {
        let rootfs = unpack_platform(
            &sandbox.path().join("out-df"),
            "latest",
            platform,
            &sandbox
                .path()
                .join(format!("df-{}", platform.replace('/', "-"))),
        );
        let read = |name: &str| std::fs::read_to_string(rootfs.join(name)).expect(name);
        assert_eq!(read("awk.txt"), "awk ran\n", "{platform}");
        assert_eq!(
            read("zero.txt"),
            "/dev/.graphbuild-script 0\n",
            "{platform}"
        );
        assert!(!rootfs.join("dev/.graphbuild-script").exists());
    }
    let rootfs = unpack_platform(
        &sandbox.path().join("out-kdl/s"),
        "latest",
        "linux/arm64",
        &sandbox.path().join("kdl"),
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("awk.txt")).expect("awk.txt"),
        "kdl awk\n"
    );
}

/// `COPY --exclude` (KDL `exclude=`): `.dockerignore` patterns relative to the source leave
/// files and whole directories out; the Dockerfile and its KDL twin copy the same files.
#[test]
fn copy_exclude_leaves_out_what_its_patterns_match() {
    let Some(sandbox) = busybox_sandbox() else {
        return;
    };
    for (path, text) in [
        ("ctx/a.txt", "a"),
        ("ctx/b.md", "b"),
        ("ctx/sub/c.md", "c"),
        ("ctx/sub/keep.txt", "keep"),
        ("ctx/sub/skip/d.txt", "d"),
    ] {
        sandbox.write(path, text);
    }
    sandbox.write(
        "ctx/Dockerfile",
        "FROM oci:../fixtures/busybox:1.35.0\nCOPY --exclude=*.md --exclude=sub/skip --exclude=Dockerfile --exclude=*.kdl . /app/\n",
    );
    sandbox.write(
        "ctx/b.kdl",
        "platforms \"linux/amd64\"\nstage s {\n    from \"oci:../fixtures/busybox:1.35.0\"\n    copy \".\" \"/app/\" exclude=\"*.md\" exclude=\"sub/skip\" exclude=\"Dockerfile\" exclude=\"*.kdl\"\n}\nimage s { stage s; }\n",
    );
    build_to_rootfs(&sandbox, "ctx", "rootfs-df");
    run_to_rootfs(&sandbox, "ctx/b.kdl", "rootfs-kdl");
    for rootfs in ["rootfs-df", "rootfs-kdl"] {
        let app = sandbox.path().join(rootfs).join("app");
        let files: Vec<String> = tree_bytes(&app).into_iter().map(|(path, _)| path).collect();
        assert_eq!(files, ["a.txt", "sub/c.md", "sub/keep.txt"], "{rootfs}");
    }

    // (`exclude` with `from=` is tested in tests/e2e/copy_flags.rs.) A pattern that is not
    // one is a diagnostic at plan time.
    sandbox.write(
        "bad.kdl",
        "stage s {\n    from \"scratch\"\n    copy \"/x\" \"/y\" exclude=\"[z\"\n}\nimage s { stage s; }\n",
    );
    let bad = sandbox.graphbuild(&["plan", "bad.kdl"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(
        stderr(&bad).contains("`exclude` pattern `[z`") && stderr(&bad).contains("bad.kdl:3"),
        "{}",
        stderr(&bad)
    );
}

/// `COPY <<EOF PATH` (KDL `file "PATH" content=…`): files the build file writes itself, with
/// Docker's substitution rule (unquoted delimiter: `$VAR`s expanded), mode 0644 unless
/// `--chmod` says otherwise, reproducible, and the same bytes from either language.
#[test]
fn heredoc_files_and_kdl_files_are_written_into_the_image() {
    let Some(sandbox) = busybox_sandbox() else {
        return;
    };
    sandbox.write(
        "df/Dockerfile",
        "FROM oci:../fixtures/busybox:1.35.0\nARG NAME=world\nCOPY <<EOF /etc/motd\nhello $NAME\nEOF\nCOPY <<'EOF' /raw.txt\nkept $NAME\nEOF\nCOPY --chmod=0755 <<greet /usr/local/bin/\n#!/bin/sh\necho hi\ngreet\n",
    );
    sandbox.write(
        "b.kdl",
        "platforms \"linux/amd64\"\nstage s {\n    from \"oci:fixtures/busybox:1.35.0\"\n    file \"/etc/motd\" content=\"hello world\\n\"\n    file \"/raw.txt\" content=\"kept $NAME\\n\"\n    file \"/usr/local/bin/greet\" content=\"#!/bin/sh\\necho hi\\n\" chmod=\"0755\"\n}\nimage s { stage s; }\n",
    );
    let build = |dest: &str, store: &str| {
        let output = sandbox.graphbuild_with_store(
            &sandbox.path().join(store),
            &[
                "build",
                "--platform",
                "linux/amd64",
                "-o",
                &format!("type=local,dest={dest}"),
                "--progress",
                "json",
                "df",
            ],
        );
        assert_success(&output);
        index_digest(&output)
    };
    // Reproducible: a second build from an empty store gives the same index.
    assert_eq!(
        build("rootfs-df", "store-a"),
        build("rootfs-df2", "store-b")
    );
    run_to_rootfs(&sandbox, "b.kdl", "rootfs-kdl");
    use std::os::unix::fs::PermissionsExt;
    for rootfs in ["rootfs-df", "rootfs-kdl"] {
        let root = sandbox.path().join(rootfs);
        let read = |path: &str| std::fs::read_to_string(root.join(path)).expect(path);
        let mode = |path: &str| {
            std::fs::metadata(root.join(path))
                .expect(path)
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(read("etc/motd"), "hello world\n", "{rootfs}");
        assert_eq!(read("raw.txt"), "kept $NAME\n", "{rootfs}");
        assert_eq!(
            read("usr/local/bin/greet"),
            "#!/bin/sh\necho hi\n",
            "{rootfs}"
        );
        assert_eq!(mode("etc/motd"), 0o644, "{rootfs}");
        assert_eq!(mode("usr/local/bin/greet"), 0o755, "{rootfs}");
    }
}

/// `RUN --mount=type=bind` (KDL `bind`): part of the build context, read-only, in no layer;
/// what it holds is in the step's key, so changing a bound file runs the step again.
#[test]
fn bind_mounts_show_the_context_read_only_and_key_the_step() {
    let Some(sandbox) = busybox_sandbox() else {
        return;
    };
    sandbox.write("ctx/src/a.txt", "first\n");
    sandbox.write("ctx/src/sub/b.sh", "#!/bin/sh\necho from-script\n");
    sandbox.write("ctx/.dockerignore", "src/ignored.txt\n");
    sandbox.write("ctx/src/ignored.txt", "never seen\n");
    sandbox.write(
        "ctx/Dockerfile",
        "FROM oci:../fixtures/busybox:1.35.0\nRUN --mount=type=bind,source=src,target=/src cat /src/a.txt > /out.txt; sh /src/sub/b.sh >> /out.txt; ls /src >> /out.txt; if touch /src/new 2>/dev/null; then echo writable; else echo read-only; fi >> /out.txt\nRUN --mount=type=bind,source=src/a.txt,target=/one.txt cat /one.txt > /single.txt\n",
    );
    sandbox.write(
        "ctx/b.kdl",
        "platforms \"linux/amd64\"\nstage s {\n    from \"oci:../fixtures/busybox:1.35.0\"\n    run \"cat /src/a.txt > /out.txt; sh /src/sub/b.sh >> /out.txt; ls /src >> /out.txt; if touch /src/new 2>/dev/null; then echo writable; else echo read-only; fi >> /out.txt\" {\n        bind \"/src\" source=\"src\"\n    }\n    run \"cat /one.txt > /single.txt\" {\n        bind \"/one.txt\" source=\"src/a.txt\"\n    }\n}\nimage s { stage s; }\n",
    );
    let build = |dest: &str| {
        let output = sandbox.graphbuild(&[
            "build",
            "--platform",
            "linux/amd64",
            "-o",
            &format!("type=local,dest={dest}"),
            "--progress",
            "json",
            "ctx",
        ]);
        assert_success(&output);
        output
    };
    let first = build("rootfs-1");
    run_to_rootfs(&sandbox, "ctx/b.kdl", "rootfs-kdl");
    for rootfs in ["rootfs-1", "rootfs-kdl"] {
        let root = sandbox.path().join(rootfs);
        assert_eq!(
            std::fs::read_to_string(root.join("out.txt")).expect("out.txt"),
            "first\nfrom-script\na.txt\nsub\nread-only\n",
            "{rootfs}"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("single.txt")).expect("single.txt"),
            "first\n",
            "{rootfs}"
        );
        assert!(
            !root.join("src").exists(),
            "{rootfs}: the mount point is in the image"
        );
        assert!(!root.join("one.txt").exists(), "{rootfs}");
    }
    // Warm: nothing runs. A bound file changes: the steps that see it run again.
    let executed = |output: &std::process::Output| {
        steps(output)
            .into_iter()
            .filter(|(_, _, _, status)| status == "executed")
            .count()
    };
    assert_eq!(executed(&build("rootfs-2")), 0);
    sandbox.write("ctx/src/a.txt", "second\n");
    let changed = build("rootfs-3");
    assert_eq!(executed(&changed), 2);
    assert!(
        std::fs::read_to_string(sandbox.path().join("rootfs-3/out.txt"))
            .expect("out.txt")
            .starts_with("second\n")
    );
    let _ = first;
}

/// Cache mounts' `uid`, `gid` and `mode` (Docker's options, KDL properties of `cache-mount`):
/// a new cache directory gets them; an invalid mode is a diagnostic.
#[test]
fn cache_mount_owner_and_mode_apply_to_a_new_directory() {
    let Some(sandbox) = busybox_sandbox() else {
        return;
    };
    sandbox.write(
        "df/Dockerfile",
        "FROM oci:../fixtures/busybox:1.35.0\nRUN --mount=type=cache,target=/c,id=owned,uid=1000,gid=1001,mode=0710 stat -c '%u %g %a' /c > /df.txt\n",
    );
    sandbox.write(
        "b.kdl",
        "platforms \"linux/amd64\"\nstage s {\n    from \"oci:fixtures/busybox:1.35.0\"\n    run \"stat -c '%u %g %a' /c > /kdl.txt\" {\n        cache-mount \"/c\" id=\"kdl-owned\" uid=1000 gid=1001 mode=\"0710\"\n    }\n}\nimage s { stage s; }\n",
    );
    build_to_rootfs(&sandbox, "df", "rootfs-df");
    run_to_rootfs(&sandbox, "b.kdl", "rootfs-kdl");
    for (rootfs, file) in [("rootfs-df", "df.txt"), ("rootfs-kdl", "kdl.txt")] {
        assert_eq!(
            std::fs::read_to_string(sandbox.path().join(rootfs).join(file)).expect(file),
            "1000 1001 710\n",
            "{rootfs}"
        );
    }
    sandbox.write(
        "bad.kdl",
        "stage s {\n    from \"scratch\"\n    run \"true\" {\n        cache-mount \"/c\" mode=\"0999\"\n    }\n}\nimage s { stage s; }\n",
    );
    let bad = sandbox.graphbuild(&["plan", "bad.kdl"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(
        stderr(&bad).contains("`0999` is not a cache mount mode"),
        "{}",
        stderr(&bad)
    );
}

/// A Dockerfile where a build file is expected (`plan Dockerfile`, `run Dockerfile`): read by
/// the Dockerfile front end with its directory as the context, the same graph `build` runs —
/// a `run` after `build` executes nothing — and a KDL file named otherwise is still KDL.
#[test]
fn plan_and_run_read_a_dockerfile_given_as_the_build_file() {
    if !root_or_skip() {
        return;
    }
    let sandbox = Sandbox::new();
    corpus(&sandbox, "same");
    let plan = sandbox.graphbuild(&[
        "plan",
        "tests/dockerfiles/same/Dockerfile",
        "--platform",
        "linux/amd64",
        "--platform",
        "linux/arm64",
    ]);
    assert_success(&plan);
    let shown = String::from_utf8_lossy(&plan.stdout).to_string();
    assert!(
        shown.contains("runtime · linux/arm64") && shown.contains("COPY message.txt /app/"),
        "{shown}"
    );
    let built = sandbox.graphbuild(&[
        "build",
        "--platform",
        "linux/amd64,linux/arm64",
        "-o",
        "type=oci,dest=out-build",
        "tests/dockerfiles/same",
    ]);
    assert_success(&built);
    let run = sandbox.graphbuild(&[
        "run",
        "tests/dockerfiles/same/Dockerfile",
        "--platform",
        "linux/amd64",
        "--platform",
        "linux/arm64",
        "--output",
        "out-run",
        "--progress",
        "json",
    ]);
    assert_success(&run);
    assert_eq!(summary(&run)["executed"], 0, "{}", stdout(&run));
    corpus(&sandbox, "broken");
    let bad = sandbox.graphbuild(&["plan", "tests/dockerfiles/broken/Dockerfile"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(
        stderr(&bad).contains("graphbuild::dockerfile::"),
        "{}",
        stderr(&bad)
    );
}
