//! Bind mounts from a stage or an image (`RUN --mount=type=bind,from=…`, KDL
//! `bind "P" from="stage"`): the stage's filesystem read-only (or writable with the writes
//! discarded), a path in it or all of it, symlinks resolved inside it, nothing in the layer;
//! the step keyed by the stage's key. Built for linux/amd64 and linux/arm64 on the busybox
//! fixture.

mod common;

use std::process::Output;

use common::*;

fn executed(output: &Output) -> Vec<String> {
    steps(output)
        .into_iter()
        .filter(|(_, _, _, status)| status == "executed")
        .map(|(stage, platform, step, _)| format!("{stage} {platform} {step}"))
        .collect()
}

const DOCKERFILE: &str = r#"FROM oci:../fixtures/busybox:1.35.0 AS build
ARG VERSION=1
RUN mkdir -p /out/sub && echo "built $VERSION" > /out/artifact.txt && echo deep > /out/sub/d.txt && echo stage > /etc/marker && ln -s ../../../../../../etc /out/escape

FROM oci:../fixtures/busybox:1.35.0 AS unrelated
RUN echo unrelated > /u.txt

FROM oci:../fixtures/busybox:1.35.0
RUN --mount=type=bind,from=build,source=/out,target=/mnt { cat /mnt/artifact.txt; ls /mnt; if touch /mnt/x 2>/dev/null; then echo writable; else echo read-only; fi; } > /got.txt
RUN --mount=type=bind,from=build,source=out/artifact.txt,target=/one cat /one > /one.txt
RUN --mount=type=bind,from=build,target=/b,rw echo scribble > /b/out/artifact.txt && cat /b/out/artifact.txt > /rw.txt
RUN --mount=type=bind,from=build,target=/b cat /b/out/artifact.txt > /after.txt
RUN --mount=type=bind,from=build,source=/out/escape,target=/e { cat /e/marker; ls /e; } > /escape.txt
RUN --mount=type=bind,from=unrelated,source=/u.txt,target=/u.txt cat /u.txt > /unrelated.txt
"#;

#[test]
fn binds_from_a_stage_show_its_files_key_the_step_and_leave_no_trace() {
    if !root_and_qemu() {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.busybox("fixtures/busybox");
    sandbox.write("ctx/Dockerfile", DOCKERFILE);
    let build = |dest: &str, version: &str| {
        let output = sandbox.graphbuild(&[
            "build",
            "--platform",
            "linux/amd64,linux/arm64",
            "--build-arg",
            &format!("VERSION={version}"),
            "-o",
            &format!("type=local,dest={dest}"),
            "--progress",
            "json",
            "ctx",
        ]);
        assert_success(&output);
        output
    };
    let first = build("rootfs-1", "1");
    // build, unrelated, and the final stage's six steps, on both platforms.
    assert_eq!(executed(&first).len(), 16, "{:?}", executed(&first));
    for platform in ["linux_amd64", "linux_arm64"] {
        let root = sandbox.path().join("rootfs-1").join(platform);
        let read = |file: &str| {
            std::fs::read_to_string(root.join(file))
                .unwrap_or_else(|error| panic!("{platform} {file}: {error}"))
        };
        assert_eq!(
            read("got.txt"),
            "built 1\nartifact.txt\nescape\nsub\nread-only\n"
        );
        assert_eq!(read("one.txt"), "built 1\n");
        // Writable, and what the step wrote is gone for the next one.
        assert_eq!(read("rw.txt"), "scribble\n");
        assert_eq!(read("after.txt"), "built 1\n");
        // A symlink climbing out of the stage resolves inside it: the stage's /etc (the
        // base's three files and the marker), not the host's.
        assert_eq!(
            read("escape.txt"),
            "stage\nhostname\nhosts\nmarker\nresolv.conf\n"
        );
        assert_eq!(read("unrelated.txt"), "unrelated\n");
        for mount_point in ["mnt", "one", "b", "e", "u.txt", "out"] {
            assert!(
                !root.join(mount_point).exists(),
                "{platform}: /{mount_point} is in the image"
            );
        }
    }

    // Warm: nothing runs.
    let warm = build("rootfs-2", "1");
    assert_eq!(executed(&warm), Vec::<String>::new());

    // The stage changes: it runs again, and so does the final stage from its first step bound
    // to it on (every later step builds on that one); `unrelated` does not.
    let changed = build("rootfs-3", "2");
    let ran = executed(&changed);
    assert_eq!(ran.len(), 2 + 2 * 6, "{ran:?}");
    assert!(
        !ran.iter().any(|step| step.starts_with("unrelated ")),
        "{ran:?}"
    );
    assert_eq!(
        std::fs::read_to_string(sandbox.path().join("rootfs-3/linux_arm64/got.txt"))
            .expect("got.txt"),
        "built 2\nartifact.txt\nescape\nsub\nread-only\n"
    );
}

/// KDL `bind "P" from="stage"` and `from` an image; a missing source is a clear failure.
#[test]
fn kdl_binds_from_stages_and_images() {
    if !root_and_qemu() {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.busybox("fixtures/busybox");
    sandbox.write(
        "b.kdl",
        r#"platforms "linux/amd64" "linux/arm64"
stage build {
    from "oci:fixtures/busybox:1.35.0"
    run "mkdir /out && echo from-kdl > /out/a.txt"
}
stage s {
    from "oci:fixtures/busybox:1.35.0"
    run "cat /src/a.txt > /kdl.txt; ls /img/bin/busybox >> /kdl.txt; echo changed > /rw/a.txt; cat /rw/a.txt >> /kdl.txt" {
        bind "/src" from="build" source="/out"
        bind "/img" from="oci:fixtures/busybox:1.35.0"
        bind "/rw" from="build" source="out" rw=#true
    }
}
image s {
    stage s
}
"#,
    );
    // The bound stage is a dependency of the node, as a stage copied from is.
    let plan = sandbox.graphbuild(&["plan", "b.kdl", "--format", "json"]);
    assert_success(&plan);
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).expect("plan JSON");
    let nodes = plan["nodes"].as_array().expect("nodes");
    let node = |stage: &str| {
        nodes
            .iter()
            .find(|node| node["stage"] == stage && node["platform"] == "linux/arm64")
            .unwrap_or_else(|| panic!("no node for {stage}"))
    };
    assert!(
        node("s")["deps"]
            .as_array()
            .expect("deps")
            .contains(&node("build")["id"]),
        "{}",
        node("s")
    );
    let output = sandbox.graphbuild(&["run", "b.kdl", "--output", "type=local,dest=rootfs"]);
    assert_success(&output);
    for platform in ["linux_amd64", "linux_arm64"] {
        let root = sandbox.path().join("rootfs").join(platform);
        assert_eq!(
            std::fs::read_to_string(root.join("kdl.txt")).expect("kdl.txt"),
            "from-kdl\n/img/bin/busybox\nchanged\n",
            "{platform}"
        );
        for mount_point in ["src", "img", "rw", "out"] {
            assert!(
                !root.join(mount_point).exists(),
                "{platform}: /{mount_point}"
            );
        }
    }

    // The same with fuse-overlayfs (the rootless fallback) mounting the stages' views.
    if prerequisite(
        std::path::Path::new("/usr/bin/fuse-overlayfs").exists(),
        "fuse-overlayfs (package fuse-overlayfs)",
    ) {
        let output = sandbox.graphbuild_with_env(
            &[("GRAPHBUILD_OVERLAY", "fuse")],
            &[
                "run",
                "b.kdl",
                "--no-cache",
                "--output",
                "type=local,dest=rootfs-fuse",
            ],
        );
        assert_success(&output);
        for platform in ["linux_amd64", "linux_arm64"] {
            assert_eq!(
                std::fs::read_to_string(
                    sandbox
                        .path()
                        .join("rootfs-fuse")
                        .join(platform)
                        .join("kdl.txt")
                )
                .expect("kdl.txt"),
                "from-kdl\n/img/bin/busybox\nchanged\n",
                "fuse-overlayfs, {platform}"
            );
        }
    }

    sandbox.write(
        "missing.kdl",
        r#"platforms "linux/amd64"
stage build {
    from "oci:fixtures/busybox:1.35.0"
}
stage s {
    from "oci:fixtures/busybox:1.35.0"
    run "true" {
        bind "/src" from="build" source="/nowhere"
    }
}
image s { stage s; }
"#,
    );
    let output = sandbox.graphbuild(&["run", "missing.kdl", "--output", "out-missing"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("/nowhere does not exist in the filesystem it binds from"),
        "{}",
        stderr(&output)
    );

    // An unknown stage is a diagnostic at plan time.
    sandbox.write(
        "unknown.kdl",
        "stage s {\n    from \"scratch\"\n    run \"true\" {\n        bind \"/src\" from=\"biuld\"\n    }\n}\nimage s { stage s; }\n",
    );
    let output = sandbox.graphbuild(&["plan", "unknown.kdl"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("unknown.kdl:4"),
        "{}",
        stderr(&output)
    );
}
