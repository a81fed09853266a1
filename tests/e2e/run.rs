//! `graphbuild run` end to end: real builds of the busybox fixture for three platforms (foreign
//! CPUs through qemu-user), checked with skopeo and umoci.

mod common;

use common::*;

const PLATFORMS: [(&str, &str, &str); 3] = [
    ("linux/amd64", "x86_64", "amd64"),
    ("linux/arm64", "aarch64", "arm64"),
    ("linux/arm/v7", "armv7l", "arm/v7"),
];

fn executed_steps(output: &std::process::Output) -> Vec<(String, String, String)> {
    steps(output)
        .into_iter()
        .filter(|(_, _, _, status)| status == "executed")
        .map(|(stage, platform, step, _)| (stage, platform, step))
        .collect()
}

#[test]
fn basic_example_builds_three_platforms_caches_and_reruns_only_what_changed() {
    let sandbox = Sandbox::new();
    sandbox.example("basic");
    sandbox.write("examples/basic/src/draft.tmp", "excluded by .dockerignore");
    let run = |sandbox: &Sandbox| {
        sandbox.graphbuild(&[
            "run",
            "examples/basic/images.kdl",
            "--output",
            "out",
            "--progress",
            "json",
        ])
    };

    // Cold: everything executes.
    let cold = run(&sandbox);
    assert_success(&cold);
    let cold_summary = summary(&cold);
    assert_eq!(cold_summary["cached"], 0, "{cold_summary}");
    assert!(
        cold_summary["executed"].as_u64().unwrap_or(0) >= 12,
        "{cold_summary}"
    );

    // The index lists the three platforms, as Docker spells them.
    let index = skopeo_raw(&format!(
        "oci:{}:1.0",
        sandbox.path().join("out/basic").display()
    ));
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let platforms: Vec<String> = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|manifest| {
            let platform = &manifest["platform"];
            match platform["variant"].as_str() {
                Some(variant) => format!(
                    "{}/{}/{variant}",
                    platform["os"].as_str().unwrap(),
                    platform["architecture"].as_str().unwrap()
                ),
                None => format!(
                    "{}/{}",
                    platform["os"].as_str().unwrap(),
                    platform["architecture"].as_str().unwrap()
                ),
            }
        })
        .collect();
    // The platforms, then their attestation manifests (provenance is on by default).
    assert_eq!(
        platforms,
        [
            "linux/amd64",
            "linux/arm64",
            "linux/arm/v7",
            "unknown/unknown",
            "unknown/unknown",
            "unknown/unknown"
        ]
    );
    // Both tags point at the same index.
    let latest = skopeo_raw(&format!(
        "oci:{}:latest",
        sandbox.path().join("out/basic").display()
    ));
    assert_eq!(latest, index);

    // Each platform's filesystem holds what its steps wrote, on its own CPU.
    for (platform, uname, target) in PLATFORMS {
        let unpacked = sandbox
            .path()
            .join(format!("unpacked-{}", platform.replace('/', "-")));
        let rootfs = unpack_platform(
            &sandbox.path().join("out/basic"),
            "1.0",
            platform,
            &unpacked,
        );
        let read = |path: &str| {
            std::fs::read_to_string(rootfs.join(path))
                .unwrap_or_else(|e| panic!("{platform} {path}: {e}"))
        };
        assert_eq!(read("app/arch.txt").trim(), uname, "{platform}");
        assert_eq!(read("app/targetarch.txt").trim(), target, "{platform}");
        assert_eq!(
            read("app/combined.txt"),
            "graphbuild example\nhello from graphbuild\n",
            "{platform}"
        );
        assert_eq!(read("app/etc/greeting"), "hello from graphbuild\n");
        assert!(rootfs.join("app/src/message.txt").exists());
        assert!(
            !rootfs.join("app/src/draft.tmp").exists(),
            ".dockerignore'd files must not be copied"
        );
        // The base image is still there underneath.
        assert!(rootfs.join("bin/busybox").exists());
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(unpacked.join("bundle/config.json")).expect("runtime config"),
        )
        .expect("json");
        assert_eq!(config["process"]["cwd"], "/app");
    }

    // Warm: nothing executes and the index is the same.
    let warm = run(&sandbox);
    assert_success(&warm);
    let warm_summary = summary(&warm);
    assert_eq!(warm_summary["executed"], 0, "{warm_summary}");
    assert_eq!(
        warm_summary["images"][0]["index_digest"],
        cold_summary["images"][0]["index_digest"]
    );

    // An ignored file changes nothing.
    sandbox.write("examples/basic/src/notes.tmp", "ignored");
    let ignored = run(&sandbox);
    assert_success(&ignored);
    assert_eq!(summary(&ignored)["executed"], 0);

    // One context file changes: only the steps that depend on it run again.
    sandbox.write("examples/basic/src/message.txt", "changed\n");
    let changed = run(&sandbox);
    assert_success(&changed);
    let executed = executed_steps(&changed);
    assert!(!executed.is_empty());
    assert!(
        executed
            .iter()
            .all(|(stage, _, _)| stage == "build" || stage == "runtime"),
        "only build and runtime depend on src/: {executed:?}"
    );
    assert!(
        executed
            .iter()
            .all(|(_, _, step)| !step.contains("mkdir -p /app/etc")),
        "{executed:?}"
    );
    // build: copy + 2 runs, runtime: the copy from build; per platform.
    assert_eq!(executed.len(), 4 * 3, "{executed:?}");
    let rootfs = unpack_platform(
        &sandbox.path().join("out/basic"),
        "1.0",
        "linux/arm64",
        &sandbox.path().join("after-change"),
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("app/combined.txt")).unwrap(),
        "changed\nhello from graphbuild\n"
    );
}

#[test]
fn two_clean_builds_in_different_places_are_byte_identical() {
    let first = Sandbox::new();
    first.example("basic");
    let second = Sandbox::new();
    second.example("basic");
    // Different mtimes on the second context.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    std::process::Command::new("touch")
        .arg(second.path().join("examples/basic/src/message.txt"))
        .status()
        .unwrap();
    let args = [
        "run",
        "examples/basic/images.kdl",
        "--output",
        "out",
        "--progress",
        "plain",
    ];
    assert_success(&first.graphbuild(&args));
    assert_success(&second.graphbuild(&args));
    let a = tree_bytes(&first.path().join("out/basic"));
    let b = tree_bytes(&second.path().join("out/basic"));
    assert!(!a.is_empty());
    let names = |tree: &[(String, Vec<u8>)]| {
        tree.iter()
            .map(|(name, _)| name.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&a), names(&b));
    assert!(a == b, "layouts differ");
}

#[test]
fn a_failing_run_reports_exit_code_output_stage_platform_and_location() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "fail/images.kdl",
        r#"platforms "linux/amd64"
stage broken {
    from "oci:../tests/fixtures/busybox:1.35.0"
    run "echo preparing; echo about to fail >&2; exit 7"
}
image broken { stage broken; }
"#,
    );
    let output = sandbox.graphbuild(&[
        "run",
        "fail/images.kdl",
        "--output",
        "out",
        "--progress",
        "plain",
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(
        err.contains("exit code 7") || err.contains("exited with 7") || err.contains("status 7"),
        "{err}"
    );
    assert!(err.contains("`broken`"), "{err}");
    assert!(err.contains("linux/amd64"), "{err}");
    assert!(err.contains("images.kdl:4:"), "{err}");
    assert!(err.contains("about to fail"), "{err}");
    assert!(
        !sandbox.path().join("out/broken").exists(),
        "no half-written output"
    );
}

/// A build file where one `run` exits 7 after printing two lines, and one `copy` names a file
/// its source stage does not have.
const FAILING: &str = r#"platforms "linux/amd64"
stage broken {
    from "oci:../tests/fixtures/busybox:1.35.0"
    run "echo preparing; echo about to fail >&2; exit 7"
}
stage empty {
    from "oci:../tests/fixtures/busybox:1.35.0"
}
stage copying {
    from "oci:../tests/fixtures/busybox:1.35.0"
    copy "/missing.txt" "/x" from=empty
}
image broken { stage broken; }
image copying { stage copying; }
"#;

/// Stderr from the first diagnostic on: the rendered failures and the closing count.
fn report(err: &str) -> &str {
    let start = err
        .find("graphbuild::")
        .unwrap_or_else(|| panic!("no diagnostic:\n{err}"));
    err[start..].trim_end()
}

/// A failed `run` is a build-file diagnostic: its code, the message, the build file's path,
/// line and column, the `run` statement underlined and labelled with the exit code, stage and
/// platform, then the step's last output lines. Plain rendering (stderr is not a terminal).
#[test]
fn a_failing_run_renders_as_a_diagnostic_at_its_step() {
    let sandbox = Sandbox::new();
    sandbox.write("fail/images.kdl", FAILING);
    let output = sandbox.graphbuild(&[
        "run",
        "fail/images.kdl",
        "broken",
        "--output",
        "out",
        "--progress",
        "plain",
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let err = stderr(&output);
    let expected = r#"graphbuild::step::failed

  × step failed: the command failed with exit code 7
   ╭─[fail/images.kdl:4:5]
 3 │     from "oci:../tests/fixtures/busybox:1.35.0"
 4 │     run "echo preparing; echo about to fail >&2; exit 7"
   ·     ──────────────────────────┬─────────────────────────
   ·                               ╰── exit code 7, stage `broken` for linux/amd64
 5 │ }
   ╰────
  last output of `broken` for linux/amd64:
  │ preparing
  │ about to fail

error: 1 node of the build failed"#;
    assert_eq!(report(&err), expected, "whole stderr:\n{err}");
}

/// `--progress json` reports the same failure as an event: code, stage, platform, step,
/// message, exit code, the build file with the step's line and column, and the output tail.
#[test]
fn a_failing_run_is_a_json_failure_event_with_its_location() {
    let sandbox = Sandbox::new();
    sandbox.write("fail/images.kdl", FAILING);
    let output = sandbox.graphbuild(&[
        "run",
        "fail/images.kdl",
        "broken",
        "--output",
        "out",
        "--progress",
        "json",
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let events = events(&output);
    let failures: Vec<_> = events
        .iter()
        .filter(|event| event["event"] == "failure")
        .collect();
    assert_eq!(failures.len(), 1, "{}", stdout(&output));
    let failure = failures[0];
    assert_eq!(failure["code"], "graphbuild::step::failed");
    assert_eq!(failure["stage"], "broken");
    assert_eq!(failure["platform"], "linux/amd64");
    assert_eq!(
        failure["step"],
        "RUN /bin/sh -c echo preparing; echo about to fail >&2; exit 7"
    );
    assert_eq!(failure["message"], "the command failed with exit code 7");
    assert_eq!(failure["exit_code"], 7);
    assert_eq!(failure["file"], "fail/images.kdl");
    assert_eq!(failure["line"], 4);
    assert_eq!(failure["column"], 5);
    assert_eq!(
        failure["tail"],
        serde_json::json!(["preparing", "about to fail"])
    );
    let position = |name: &str| events.iter().position(|event| event["event"] == name);
    assert!(
        position("failure") < position("summary"),
        "the failure comes before the summary:\n{}",
        stdout(&output)
    );
    assert_eq!(summary(&output)["failed"], 1);
}

/// A `copy` whose source is missing from its `from=` stage fails at its statement, in plain
/// and in JSON progress, with no exit code (no command ran) and exit status 1.
#[test]
fn a_failing_copy_renders_as_a_diagnostic_at_its_step() {
    let sandbox = Sandbox::new();
    sandbox.write("fail/images.kdl", FAILING);
    let args = ["run", "fail/images.kdl", "copying", "--output", "out"];
    let plain = sandbox.graphbuild(&[&args[..], &["--progress", "plain"]].concat());
    assert_eq!(plain.status.code(), Some(1), "{}", stderr(&plain));
    let err = stderr(&plain);
    let expected = r#"graphbuild::step::failed

  × step failed: copy failed: copy source `/missing.txt` matches nothing
    ╭─[fail/images.kdl:11:5]
 10 │     from "oci:../tests/fixtures/busybox:1.35.0"
 11 │     copy "/missing.txt" "/x" from=empty
    ·     ─────────────────┬─────────────────
    ·                      ╰── stage `copying` for linux/amd64
 12 │ }
    ╰────
  help: the path does not exist in the source stage's filesystem
error: 1 node of the build failed"#;
    assert_eq!(report(&err), expected, "whole stderr:\n{err}");

    let json = sandbox.graphbuild(&[&args[..], &["--progress", "json"]].concat());
    assert_eq!(json.status.code(), Some(1), "{}", stderr(&json));
    let failure = events(&json)
        .into_iter()
        .find(|event| event["event"] == "failure")
        .unwrap_or_else(|| panic!("no failure event:\n{}", stdout(&json)));
    assert_eq!(failure["stage"], "copying");
    assert_eq!(failure["step"], "COPY /missing.txt /x");
    assert_eq!(
        failure["message"],
        "copy failed: copy source `/missing.txt` matches nothing"
    );
    assert_eq!(
        failure["help"],
        "the path does not exist in the source stage's filesystem"
    );
    assert_eq!(failure["file"], "fail/images.kdl");
    assert_eq!(failure["line"], 11);
    assert_eq!(failure["column"], 5);
    assert!(failure.get("exit_code").is_none(), "{failure}");
}

/// An image whose layout cannot be written fails outside any step: the diagnostic points at
/// the image (`graphbuild::build::failed`), in plain and JSON progress, exit status 1.
#[test]
fn an_image_that_cannot_be_written_is_a_diagnostic_at_the_image() {
    let sandbox = Sandbox::new();
    sandbox.write("img/blocker", "a file where a directory should be\n");
    sandbox.write(
        "img/images.kdl",
        r#"platforms "linux/amd64"
stage s {
    from "oci:../tests/fixtures/busybox:1.35.0"
    env A="1"
}
image blocked {
    stage s
    output "blocker/out"
}
"#,
    );
    let plain = sandbox.graphbuild(&["run", "img/images.kdl", "--progress", "plain"]);
    assert_eq!(plain.status.code(), Some(1), "{}", stderr(&plain));
    let err = stderr(&plain);
    let expected = r#"graphbuild::build::failed

  × image `blocked` failed: cannot write the image layout img/blocker/out: cannot create directory `img/blocker`: File exists (os error 17)
   ╭─[img/images.kdl:6:1]
 5 │ }
 6 │ image blocked {
   · ──┬──
   ·   ╰── this image
 7 │     stage s
   ╰────
error: 1 node of the build failed"#;
    assert_eq!(report(&err), expected, "whole stderr:\n{err}");

    let json = sandbox.graphbuild(&["run", "img/images.kdl", "--progress", "json"]);
    assert_eq!(json.status.code(), Some(1), "{}", stderr(&json));
    let failure = events(&json)
        .into_iter()
        .find(|event| event["event"] == "failure")
        .unwrap_or_else(|| panic!("no failure event:\n{}", stdout(&json)));
    assert_eq!(failure["code"], "graphbuild::build::failed");
    assert_eq!(failure["stage"], "blocked");
    assert_eq!(failure["platform"], "all");
    assert!(failure.get("step").is_none(), "{failure}");
    assert_eq!(
        (&failure["file"], &failure["line"], &failure["column"]),
        (&"img/images.kdl".into(), &6.into(), &1.into())
    );
}

/// A step cannot drive the terminal: escape sequences in its output are shown escaped, in
/// progress lines and in the failure report.
#[test]
fn escape_sequences_in_step_output_reach_the_log_escaped() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "escapes/images.kdl",
        r#"platforms "linux/amd64"
stage loud {
    from "oci:../tests/fixtures/busybox:1.35.0"
    run "printf 'clear\\033[2J\\033]0;title\\007 ünï\\tcode\\n'; printf 'gone\\033[31m\\n' >&2; exit 3"
}
image loud { stage loud; }
"#,
    );
    let output = sandbox.graphbuild(&[
        "run",
        "escapes/images.kdl",
        "--output",
        "out",
        "--progress",
        "plain",
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(!err.contains('\x1b') && !err.contains('\x07'), "{err:?}");
    assert!(
        err.contains("clear\\x1b[2J\\x1b]0;title\\x07 ünï\tcode"),
        "{err}"
    );
    assert!(err.contains("gone\\x1b[31m"), "{err}");
}

#[test]
fn two_concurrent_runs_share_one_store() {
    let sandbox = Sandbox::new();
    sandbox.example("basic");
    let spawn = |out: &str| {
        std::process::Command::new(bin())
            .args([
                "run",
                "examples/basic/images.kdl",
                "--output",
                out,
                "--progress",
                "json",
                "--platform",
                "linux/amd64",
                "--platform",
                "linux/arm64",
            ])
            .current_dir(sandbox.path())
            .env("GRAPHBUILD_CACHE_DIR", sandbox.store())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn")
    };
    let a = spawn("out-a");
    let b = spawn("out-b");
    let a = a.wait_with_output().expect("wait");
    let b = b.wait_with_output().expect("wait");
    assert_success(&a);
    assert_success(&b);
    assert_eq!(
        summary(&a)["images"][0]["index_digest"],
        summary(&b)["images"][0]["index_digest"]
    );
    // The store is sound afterwards: a third run executes nothing.
    let third = sandbox.graphbuild(&[
        "run",
        "examples/basic/images.kdl",
        "--output",
        "out-c",
        "--progress",
        "json",
        "--platform",
        "linux/amd64",
        "--platform",
        "linux/arm64",
    ]);
    assert_success(&third);
    assert_eq!(summary(&third)["executed"], 0);
}

#[test]
fn a_run_killed_with_sigkill_leaves_a_store_the_next_run_uses_correctly() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "slow/images.kdl",
        r#"platforms "linux/amd64" "linux/arm64"
stage app {
    from "oci:../tests/fixtures/busybox:1.35.0"
    run "echo one > /one"
    run "sleep 2; echo two > /two"
}
image app { stage app; }
"#,
    );
    let mut child = std::process::Command::new(bin())
        .args([
            "run",
            "slow/images.kdl",
            "--output",
            "out",
            "--progress",
            "json",
        ])
        .current_dir(sandbox.path())
        .env("GRAPHBUILD_CACHE_DIR", sandbox.store())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    // Kill it in the middle of the slow step.
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    for line in lines.by_ref() {
        let line = line.expect("line");
        if line.contains("\"step_started\"") && line.contains("sleep 2") {
            break;
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    assert!(
        !sandbox.path().join("out/app").exists(),
        "no half-written layout"
    );

    let output = sandbox.graphbuild(&[
        "run",
        "slow/images.kdl",
        "--output",
        "out",
        "--progress",
        "json",
    ]);
    assert_success(&output);
    let rootfs = unpack_platform(
        &sandbox.path().join("out/app"),
        "latest",
        "linux/arm64",
        &sandbox.path().join("unpacked"),
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("one")).unwrap(),
        "one\n"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("two")).unwrap(),
        "two\n"
    );
    // Nothing of the killed run is left in the store's work area: the next run removed it.
    let leftovers: Vec<_> = std::fs::read_dir(sandbox.store().join("tmp"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.file_name())
                .collect()
        })
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // And a third run executes nothing.
    let warm = sandbox.graphbuild(&[
        "run",
        "slow/images.kdl",
        "--output",
        "out",
        "--progress",
        "json",
    ]);
    assert_success(&warm);
    assert_eq!(summary(&warm)["executed"], 0);
}

#[test]
fn podman_reads_every_platform_of_the_layout() {
    require_tool("podman");
    let sandbox = Sandbox::new();
    sandbox.example("basic");
    let output = sandbox.graphbuild(&[
        "run",
        "examples/basic/images.kdl",
        "--output",
        "out",
        "--progress",
        "plain",
    ]);
    assert_success(&output);
    // podman names the image after the layout's path, which must be lowercase.
    let lowercase = std::env::temp_dir().join(format!("graphbuild-podman-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&lowercase);
    copy_tree(&sandbox.path().join("out/basic"), &lowercase.join("basic"));
    let storage = sandbox.path().join("podman");
    for (platform, _, arch) in PLATFORMS {
        let arch = arch.split('/').next().unwrap();
        let podman = |args: &[&str]| {
            std::process::Command::new("podman")
                .arg("--root")
                .arg(storage.join("root"))
                .arg("--runroot")
                .arg(storage.join("run"))
                .args(args)
                .output()
                .expect("podman runs")
        };
        let layout = format!("oci:{}:1.0", lowercase.join("basic").display());
        let mut pull = vec!["pull", "--quiet", "--arch", arch];
        if platform.ends_with("/v7") {
            pull.extend(["--variant", "v7"]);
        }
        pull.push(&layout);
        let pulled = podman(&pull);
        assert!(
            pulled.status.success(),
            "podman pull {platform}: {}",
            stderr(&pulled)
        );
        let id = stdout(&pulled).trim().to_string();
        let inspected = podman(&[
            "image",
            "inspect",
            "--format",
            "{{.Architecture}} {{.Os}} {{.Config.WorkingDir}}",
            &id,
        ]);
        assert!(inspected.status.success(), "{}", stderr(&inspected));
        assert_eq!(
            stdout(&inspected).trim(),
            format!("{arch} linux /app"),
            "{platform}"
        );
    }
}

/// `run FILE NAME` takes images, groups (bake's, `default` when no name is given) and stages
/// (Docker's `--target`): a stage builds as an untagged image named after it.
#[test]
fn groups_and_stage_targets_select_what_runs() {
    let sandbox = Sandbox::new();
    sandbox.busybox("busybox");
    sandbox.write(
        "b.kdl",
        r#"platforms "linux/amd64" "linux/arm64"
stage tool {
    from "oci:busybox:1.35.0"
    run "echo tool-$TARGETARCH > /tool.txt"
}
stage app {
    from "oci:busybox:1.35.0"
    run "echo app > /app.txt"
}
image app { stage app; }
image other { stage tool; tags "localhost/other:1"; }
group default {
    targets "app"
}
group everything {
    targets "default" "other" "tool"
}
"#,
    );
    let built = |output: &std::process::Output| -> Vec<String> {
        let mut names: Vec<String> = summary(output)["images"]
            .as_array()
            .expect("images")
            .iter()
            .map(|image| image["name"].as_str().expect("name").to_string())
            .collect();
        names.sort();
        names
    };
    let run = |args: &[&str]| {
        let mut all = vec!["run", "b.kdl", "--output", "out", "--progress", "json"];
        all.extend_from_slice(args);
        let output = sandbox.graphbuild(&all);
        assert_success(&output);
        output
    };

    // No name: the default group, not every image.
    assert_eq!(built(&run(&[])), ["app"]);
    // A group of a group, an image and a stage.
    assert_eq!(built(&run(&["everything"])), ["app", "other", "tool"]);
    // The stage target is an image of its own: both platforms, the stage's files.
    for (platform, arch) in [("linux/amd64", "amd64"), ("linux/arm64", "arm64")] {
        let rootfs = unpack_platform(
            &sandbox.path().join("out/tool"),
            "latest",
            platform,
            &sandbox.path().join(format!("unpacked-{arch}")),
        );
        assert_eq!(
            std::fs::read_to_string(rootfs.join("tool.txt")).expect("tool.txt"),
            format!("tool-{arch}\n")
        );
    }

    let unknown = sandbox.graphbuild(&["run", "b.kdl", "nothing", "--output", "out"]);
    assert_eq!(unknown.status.code(), Some(2), "{}", stderr(&unknown));
    let text = stderr(&unknown);
    assert!(
        text.contains("no image, group or stage named `nothing`")
            && text.contains("the groups: default, everything"),
        "{text}"
    );

    sandbox.write(
        "loop.kdl",
        "stage s {\n    from \"scratch\"\n}\ngroup a {\n    targets \"b\"\n}\ngroup b {\n    targets \"a\"\n}\n",
    );
    let looped = sandbox.graphbuild(&["plan", "loop.kdl", "a"]);
    assert_eq!(looped.status.code(), Some(2), "{}", stderr(&looped));
    assert!(
        stderr(&looped).contains("group `a` contains itself (a → b → a)"),
        "{}",
        stderr(&looped)
    );
}

/// Typed annotation keys put each annotation where buildx would: the index, every manifest
/// or one platform's, the manifests' descriptors, or the index's descriptor in the layout.
#[test]
fn typed_annotations_go_where_their_type_says() {
    let sandbox = Sandbox::new();
    sandbox.busybox("busybox");
    sandbox.write(
        "b.kdl",
        r#"platforms "linux/amd64" "linux/arm64"
stage s {
    from "oci:busybox:1.35.0"
}
image s {
    stage s
    annotation "org.example.both"="b" "index:org.example.index"="i" "manifest:org.example.manifest"="m"
    annotation "manifest[linux/arm64]:org.example.arm"="a" "manifest-descriptor:org.example.desc"="d"
    annotation "index-descriptor:org.example.top"="t" "com.example:untyped"="u"
}
"#,
    );
    let output = sandbox.graphbuild(&["run", "b.kdl", "--output", "out"]);
    assert_success(&output);
    let layout = sandbox.path().join("out/s");
    let read = |path: std::path::PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(path).expect("read")).expect("json")
    };
    let blob = |digest: &serde_json::Value| {
        read(
            layout.join("blobs/sha256").join(
                digest
                    .as_str()
                    .expect("digest")
                    .trim_start_matches("sha256:"),
            ),
        )
    };
    let keys = |value: &serde_json::Value| -> Vec<String> {
        value["annotations"]
            .as_object()
            .map(|map| map.keys().cloned().collect())
            .unwrap_or_default()
    };
    let top = read(layout.join("index.json"));
    assert_eq!(
        keys(&top["manifests"][0]),
        ["org.example.top", "org.opencontainers.image.ref.name"]
    );
    let index = blob(&top["manifests"][0]["digest"]);
    assert_eq!(
        keys(&index),
        [
            "com.example:untyped",
            "org.example.both",
            "org.example.index"
        ]
    );
    // The platform manifests (the provenance's attestation manifests are `unknown/unknown`).
    let platforms = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .filter(|descriptor| descriptor["platform"]["architecture"] != "unknown");
    for descriptor in platforms {
        assert_eq!(keys(descriptor), ["org.example.desc"]);
        let manifest = blob(&descriptor["digest"]);
        let mut expected = vec![
            "com.example:untyped",
            "org.example.both",
            "org.example.manifest",
        ];
        if descriptor["platform"]["architecture"] == "arm64" {
            expected.insert(1, "org.example.arm");
        }
        assert_eq!(keys(&manifest), expected, "{}", descriptor["platform"]);
    }

    sandbox.write(
        "bad.kdl",
        "stage s {\n    from \"scratch\"\n}\nimage s {\n    stage s\n    annotation \"index[linux/amd64]:k\"=\"v\"\n}\n",
    );
    let bad = sandbox.graphbuild(&["plan", "bad.kdl"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(
        stderr(&bad).contains("an index annotation has no platform"),
        "{}",
        stderr(&bad)
    );
}
