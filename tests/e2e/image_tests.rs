//! Image tests end to end (issue 15, point 4): `test NAME { … }` on an image runs inside the
//! finished image of every platform (arm64 and arm/v7 under qemu-user), with the image's
//! entrypoint, env, user and workdir; passed tests are cached; a failing test fails the run
//! before anything is written or pushed, naming the image, platform and test; a test cannot
//! change the image and runs contained.

mod common;

use std::path::Path;
use std::process::Output;

use common::*;

const BASE: &str = "oci:tests/fixtures/busybox:1.35.0";

/// A stage making `/usr/bin/app` (a script printing its version, CPU, uid, directory and
/// arguments) with the image settings a test must see, then `image app` with `tests`.
fn build_file(tests: &str) -> String {
    format!(
        r#"platforms "linux/amd64" "linux/arm64" "linux/arm/v7"
arg VERSION="1.2.3"
stage s {{
    from "{BASE}"
    run "printf '#!/bin/sh\necho \"app $APP_VERSION on $(uname -m) as $(id -u) in $(pwd) args:$*\"\n' > /usr/bin/app && chmod 755 /usr/bin/app && mkdir -p /srv"
    env APP_VERSION="${{VERSION}}"
    workdir "/srv"
    user "1000"
    entrypoint "/usr/bin/app"
    cmd "--serve"
}}
image app {{
    stage s
    tags "127.0.0.1:1/never/app:1"
{tests}
}}
"#
    )
}

/// `test` events of a `--progress json` run, as (platform, name, status).
fn test_events(output: &Output) -> Vec<(String, String, String)> {
    let mut found: Vec<_> = events(output)
        .into_iter()
        .filter(|event| event["event"] == "test")
        .map(|event| {
            (
                event["platform"].as_str().unwrap_or_default().to_string(),
                event["name"].as_str().unwrap_or_default().to_string(),
                event["status"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    found.sort();
    found
}

fn run(sandbox: &Sandbox, extra: &[&str]) -> Output {
    let mut args = vec!["run", "b.kdl", "--output", "out", "--progress", "json"];
    args.extend_from_slice(extra);
    sandbox.graphbuild(&args)
}

fn index_digest(output: &Output) -> String {
    summary(output)["images"][0]["index_digest"]
        .as_str()
        .expect("an index digest")
        .to_string()
}

#[test]
fn tests_pass_on_three_platforms_with_the_image_settings_and_are_cached_when_warm() {
    if !root_and_qemu() {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.write(
        "b.kdl",
        &build_file(
            r##"
    // `docker run app`: the image's entrypoint and cmd, env, user and workdir.
    test default { output matches=#"^app 1\.2\.3 on (x86_64|aarch64|armv7l) as 1000 in /srv args:--serve$"#; }
    // `docker run app --version`: the arguments replace the cmd.
    test version { cmd "--version"; output contains="app ${VERSION} "; output matches="args:--version$"; }
    // `docker run --entrypoint /bin/sh app -c …`, as root, elsewhere, with more env.
    test override {
        entrypoint "/bin/sh" "-c"
        cmd "echo $GREETING from $(id -u) in $(pwd)"
        user "0"
        workdir "/tmp"
        env GREETING="hello"
        output contains="hello from 0 in /tmp"
    }
    // `run` is the command alone, through the image's shell, with the image's environment.
    test shell { run "echo $APP_VERSION; uname -m"; output matches=#"(?m)^1\.2\.3$"#; }
    test exit { run "exit 3"; exit 3; }
    // stdout and stderr apart, and together as `output`.
    test streams { run "echo out; echo err >&2"; stdout matches=#"\Aout\z"#; stderr matches=#"\Aerr\z"#; output contains="err"; }"##,
        ),
    );
    let cold = run(&sandbox, &[]);
    assert_success(&cold);
    let mut expected = Vec::new();
    for platform in ["linux/amd64", "linux/arm64", "linux/arm/v7"] {
        for name in ["default", "exit", "override", "shell", "streams", "version"] {
            expected.push((
                platform.to_string(),
                name.to_string(),
                "executed".to_string(),
            ));
        }
    }
    expected.sort();
    assert_eq!(test_events(&cold), expected, "{}", stderr(&cold));
    assert!(sandbox.path().join("out/app/index.json").exists());
    assert_eq!(summary(&cold)["tests_executed"], 18);

    // Warm: the image and every test are cached; no test runs again.
    let warm = run(&sandbox, &[]);
    assert_success(&warm);
    let events = test_events(&warm);
    assert_eq!(events.len(), 18);
    assert!(
        events.iter().all(|(_, _, status)| status == "cached"),
        "{events:?}"
    );
    assert_eq!(summary(&warm)["tests_executed"], 0);
    assert_eq!(summary(&warm)["tests_cached"], 18);
    assert_eq!(index_digest(&warm), index_digest(&cold));

    // `plan` shows the test nodes after their image's node, cached.
    let plan = sandbox.graphbuild(&["plan", "b.kdl", "--format", "json"]);
    assert_success(&plan);
    let plan: serde_json::Value = serde_json::from_str(&stdout(&plan)).expect("plan JSON");
    let tests = plan["tests"].as_array().expect("tests");
    assert_eq!(tests.len(), 18);
    assert!(tests.iter().all(|test| test["cached"] == true), "{tests:?}");
    let version_arm64 = tests
        .iter()
        .find(|test| test["name"] == "version" && test["platform"] == "linux/arm64")
        .expect("the arm64 version test");
    assert_eq!(
        version_arm64["argv"],
        serde_json::json!(["/usr/bin/app", "--version"])
    );

    // A changed expectation is a new key: only that test runs, and --explain says why first.
    let changed = std::fs::read_to_string(sandbox.path().join("b.kdl"))
        .expect("read")
        .replace(
            "test exit { run \"exit 3\"; exit 3; }",
            "test exit { run \"exit 4\"; exit 4; }",
        );
    sandbox.write("b.kdl", &changed);
    let explain = sandbox.graphbuild(&["plan", "b.kdl", "--explain"]);
    assert_success(&explain);
    assert!(
        stdout(&explain).contains(
            "app · linux/arm64 · test exit: will run: changed since it last passed\n    \
             the test changed: was `TEST exit [\"/bin/sh\", \"-c\", \"exit 3\"]`\n    \
             exit_code changed: 3 → 4\n"
        ),
        "{}",
        stdout(&explain)
    );
    assert!(
        stdout(&explain).contains("app · linux/arm64 · test version: cached"),
        "{}",
        stdout(&explain)
    );
    let again = run(&sandbox, &[]);
    assert_success(&again);
    let executed: Vec<_> = test_events(&again)
        .into_iter()
        .filter(|(_, _, status)| status == "executed")
        .map(|(platform, name, _)| format!("{name} {platform}"))
        .collect();
    assert_eq!(
        executed,
        ["exit linux/amd64", "exit linux/arm/v7", "exit linux/arm64"]
    );
}

#[test]
fn a_test_failing_on_one_platform_fails_the_run_names_it_and_nothing_is_written_or_pushed() {
    if !root_and_qemu() {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.write(
        "b.kdl",
        &build_file(
            r#"    test not-arm64 { run "echo checking $(uname -m); [ \"$(uname -m)\" != aarch64 ]" }"#,
        ),
    );
    let failed = run(
        &sandbox,
        &[
            "--output",
            "type=local,dest=local-out",
            "--metadata-file",
            "meta.json",
            "--push",
        ],
    );
    let err = stderr(&failed);
    assert_eq!(failed.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "image `app` for linux/arm64, test `not-arm64` failed: expected exit code 0, got 1"
        ) && err.contains("b.kdl:15:5"),
        "{err}"
    );
    assert!(err.contains("│ checking aarch64"), "the output tail: {err}");
    assert!(!err.contains("for linux/amd64, test"), "{err}");
    assert!(!err.contains("for linux/arm/v7, test"), "{err}");
    let statuses = test_events(&failed);
    assert!(
        statuses.contains(&("linux/arm64".into(), "not-arm64".into(), "failed".into())),
        "{statuses:?}"
    );
    // Nothing written, exported or pushed (a push to 127.0.0.1:1 would have failed with exit 3).
    assert!(!sandbox.path().join("out/app").exists());
    assert!(!sandbox.path().join("local-out").exists());
    assert!(!sandbox.path().join("meta.json").exists());
    assert!(!err.contains("push"), "{err}");

    // A failed test is not cached: the next run fails the same way.
    let again = run(&sandbox, &[]);
    assert_eq!(again.status.code(), Some(1));
    assert!(test_events(&again).contains(&(
        "linux/arm64".into(),
        "not-arm64".into(),
        "failed".into()
    )));

    // --skip-tests builds the image without running any test.
    let skipped = run(&sandbox, &["--skip-tests"]);
    assert_success(&skipped);
    assert!(test_events(&skipped).is_empty());
    assert!(sandbox.path().join("out/app/index.json").exists());
}

#[test]
fn an_output_mismatch_fails_with_expected_and_actual() {
    if !root_and_qemu() {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.write(
        "b.kdl",
        &build_file(
            r#"    test version { platforms "linux/amd64"; cmd "--version"; output contains="app 2.0"; }
    test pattern { platforms "linux/amd64"; run "echo v1"; output matches="^v2$"; }
    test stream { platforms "linux/amd64"; run "echo oops >&2"; stdout contains="oops"; }"#,
        ),
    );
    let failed = run(&sandbox, &[]);
    let err = stderr(&failed);
    assert_eq!(failed.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "image `app` for linux/amd64, test `version` failed: the output does not contain \"app 2.0\""
        ) && err.contains("b.kdl:15:5"),
        "{err}"
    );
    assert!(
        err.contains("│ app 1.2.3 on x86_64 as 1000 in /srv args:--version"),
        "{err}"
    );
    assert!(
        err.contains(
            "test `pattern` failed: the output does not match the regular expression \"^v2$\""
        ) && err.contains("b.kdl:16:5"),
        "{err}"
    );
    assert!(
        err.contains("test `stream` failed: stdout does not contain \"oops\"")
            && err.contains("b.kdl:17:5"),
        "{err}"
    );
    assert!(!sandbox.path().join("out/app").exists());
}

#[test]
fn a_test_cannot_change_the_image() {
    if !root_and_qemu() {
        return;
    }
    let sandbox = Sandbox::new();
    let tests = r#"    test vandal { run "rm -rf /usr/bin/app /etc && echo planted > /srv/marker"; user "0" }
    test after { run "[ -x /usr/bin/app ] && [ -d /etc ] && [ ! -e /srv/marker ]" }"#;
    sandbox.write("b.kdl", &build_file(tests));
    let skipped = run(&sandbox, &["--skip-tests"]);
    assert_success(&skipped);
    let digest = index_digest(&skipped);
    let tested = sandbox.graphbuild(&[
        "run",
        "b.kdl",
        "--output",
        "out-tested",
        "--progress",
        "json",
    ]);
    assert_success(&tested);
    assert_eq!(
        test_events(&tested)
            .iter()
            .filter(|(_, _, status)| status == "executed")
            .count(),
        6
    );
    // The layout written after the tests is the very same image.
    assert_eq!(index_digest(&tested), digest);
    let rootfs = unpack_platform(
        &sandbox.path().join("out-tested/app"),
        "1",
        "linux/amd64",
        &sandbox.path().join("unpacked"),
    );
    assert!(rootfs.join("usr/bin/app").exists());
    assert!(!rootfs.join("srv/marker").exists());
}

#[test]
fn a_hostile_test_is_contained() {
    if !root_and_qemu() {
        return;
    }
    let sandbox = Sandbox::new();
    let tests = r#"    platforms "linux/amd64" "linux/arm64"
    test mount { run "mount -t tmpfs none /mnt && echo MOUNT''ED"; user "0" }
    test network { run "[ $(grep -c : /proc/net/dev) -eq 1 ]"; }
    test slow { run "sleep 60"; timeout "2s" }"#;
    sandbox.write(
        "b.kdl",
        &build_file("")
            .replace(
                "platforms \"linux/amd64\" \"linux/arm64\" \"linux/arm/v7\"\n",
                "",
            )
            .replace("\n\n}", &format!("\n{tests}\n}}")),
    );
    let started = std::time::Instant::now();
    let failed = run(&sandbox, &[]);
    let err = stderr(&failed);
    assert_eq!(failed.status.code(), Some(1), "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(50),
        "the timeout stopped the slow test"
    );
    for platform in ["linux/amd64", "linux/arm64"] {
        // Root inside the image still cannot mount: no CAP_SYS_ADMIN, and the seccomp filter.
        let mount = format!("image `app` for {platform}, test `mount`");
        let line = err
            .lines()
            .find(|line| line.contains(&mount))
            .unwrap_or_else(|| panic!("{mount}: {err}"));
        assert!(line.contains("expected exit code 0, got"), "{line}");
        let slow = format!("image `app` for {platform}, test `slow`");
        let line = err
            .lines()
            .find(|line| line.contains(&slow))
            .unwrap_or_else(|| panic!("{slow}: {err}"));
        assert!(line.contains("timeout of 2s"), "{line}");
    }
    assert!(!err.contains("MOUNTED"), "{err}");
    assert!(
        !err.contains("test `network`"),
        "no network but loopback: {err}"
    );
    assert!(!Path::new("/mnt/MOUNTED").exists());
}

#[test]
fn passed_tests_travel_through_the_team_cache_and_a_merge_needs_no_emulator() {
    if !root_and_qemu() {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.write(
        "b.kdl",
        &build_file(r#"    test version { cmd "--version"; output contains="app 1.2.3"; }"#),
    );
    let server = CacheServer::start(&sandbox.path().join("server"), &[]);
    let args = |output: &'static str| {
        vec![
            "run".to_string(),
            "b.kdl".into(),
            "--output".into(),
            output.into(),
            "--progress".into(),
            "json".into(),
            "--cache".into(),
            server.url.clone(),
        ]
    };
    let first = std::process::Command::new(bin())
        .args(args("out-a"))
        .current_dir(sandbox.path())
        .env("GRAPHBUILD_CACHE_DIR", sandbox.path().join("store-a"))
        .output()
        .expect("graphbuild runs");
    assert_success(&first);
    assert_eq!(summary(&first)["tests_executed"], 3);

    // Another machine without emulators: the image and its tests come from the team cache, so
    // nothing needs qemu (an executed arm64 test would fail the preflight).
    let no_binfmt = sandbox.path().join("empty-binfmt");
    std::fs::create_dir_all(&no_binfmt).expect("mkdir");
    let merge = std::process::Command::new(bin())
        .args(args("out-b"))
        .current_dir(sandbox.path())
        .env("GRAPHBUILD_CACHE_DIR", sandbox.path().join("store-b"))
        .env("GRAPHBUILD_BINFMT_DIR", &no_binfmt)
        .output()
        .expect("graphbuild runs");
    assert_success(&merge);
    assert_eq!(summary(&merge)["tests_executed"], 0);
    assert_eq!(summary(&merge)["tests_cached"], 3);
    assert_eq!(index_digest(&merge), index_digest(&first));

    // A new test on that machine, its image cached: the test itself needs the emulators,
    // and the preflight says so before anything runs (exit 3).
    sandbox.write(
        "b.kdl",
        &build_file(r#"    test version { cmd "--version"; output contains="app 1.2"; }"#),
    );
    let new_test = std::process::Command::new(bin())
        .args(["run", "b.kdl", "--output", "out-c", "--progress", "json"])
        .current_dir(sandbox.path())
        .env("GRAPHBUILD_CACHE_DIR", sandbox.path().join("store-b"))
        .env("GRAPHBUILD_BINFMT_DIR", &no_binfmt)
        .output()
        .expect("graphbuild runs");
    assert_eq!(new_test.status.code(), Some(3), "{}", stderr(&new_test));
    assert!(
        stderr(&new_test).contains("cannot run steps for linux/arm64"),
        "{}",
        stderr(&new_test)
    );
    assert!(steps(&new_test).is_empty(), "no step executed or looked at");
    assert!(!sandbox.path().join("out-c/app").exists());
}

#[test]
fn bad_tests_are_diagnostics() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "b.kdl",
        &build_file(
            r#"    test both { run "true"; cmd "x" }
    test pattern { output matches="(unclosed" }
    test code { run "true"; exit 300 }
    test empty { output }
    test twice { exit 0; exit 1 }"#,
        ),
    );
    let output = sandbox.graphbuild(&["plan", "b.kdl"]);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    for code in [
        "graphbuild::test::command",
        "graphbuild::test::exit",
        "graphbuild::test::output",
        "graphbuild::test::setting",
    ] {
        assert!(err.contains(code), "{code}: {err}");
    }
    // The regular expression is checked when the plan is made (the other problems first).
    sandbox.write(
        "b.kdl",
        &build_file(r#"    test pattern { output matches="(unclosed" }"#),
    );
    let output = sandbox.graphbuild(&["plan", "b.kdl"]);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(err.contains("graphbuild::test::output"), "{err}");
    assert!(err.contains("is not a regular expression"), "{err}");
}
