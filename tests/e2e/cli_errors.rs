//! How the CLI stops on a problem: every command returns one `CliError`, which `main` renders
//! once (`error: …` and its `hint:` lines, or the build file's diagnostics) before exiting
//! with its status (docs/cli.md, Exit codes). Each case pins the whole of stderr, so a message
//! printed twice, a lost hint or a changed exit code fails here. None needs root or a network.

mod common;

use common::*;

const BUILD: &str = r#"
stage app {
    from "oci:tests/fixtures/busybox:1.35.0"
}
image app {
    stage app
}
"#;

struct Case {
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
    exit: i32,
    stderr: &'static str,
}

const CASES: &[Case] = &[
    Case {
        args: &["run", "build.kdl", "--arg", "=x"],
        env: &[],
        exit: 2,
        stderr: "error: `--arg =x` is not NAME=VALUE or NAME\n\
                 hint: write --arg NAME=value, or --arg NAME to take NAME from the environment\n",
    },
    Case {
        args: &["plan", "build.kdl", "--platform", "linux"],
        env: &[],
        exit: 2,
        stderr: "error: `--platform linux` is not a valid platform: platform `linux` is missing the architecture\n\
                 hint: write a platform as OS/ARCH[/VARIANT], for example linux/arm64 or linux/arm/v7\n",
    },
    Case {
        args: &["lock", "build.kdl", "--offline"],
        env: &[],
        exit: 2,
        stderr: "error: `graphbuild lock` asks the registries for digests: it cannot run --offline\n\
                 hint: run it where the registries are reachable, and commit graphbuild.lock\n",
    },
    Case {
        args: &["cache", "prune", "--keep-bytes", "lots"],
        env: &[],
        exit: 2,
        stderr: "error: `--keep-bytes lots` is not a size\n\
                 hint: write a number of bytes, or with K, M, G: 10G\n",
    },
    Case {
        args: &["inspect", "::bad::"],
        env: &[],
        exit: 2,
        stderr: "error: `::bad::` is neither an OCI layout on disk nor an image reference: invalid image reference `::bad::`: invalid tag ``\n\
                 hint: give a layout directory (PATH or PATH:TAG) or a reference like registry.example.com/app:1.0\n",
    },
    Case {
        args: &["run", "build.kdl", "--provenance=mode=huge"],
        env: &[],
        exit: 2,
        stderr: "error: --provenance: cannot read `mode=huge`; write true, false, mode=min or mode=max\n",
    },
    Case {
        args: &["run", "build.kdl", "--sbom=maybe"],
        env: &[],
        exit: 2,
        stderr: "error: --sbom: cannot read `maybe`; write true or false\n",
    },
    Case {
        args: &["run", "build.kdl", "--secret", "id=x"],
        env: &[],
        exit: 2,
        stderr: "error: --secret needs id=ID and src=PATH or env=VAR\n",
    },
    Case {
        args: &["run", "build.kdl", "--output", "type=bogus"],
        env: &[],
        exit: 2,
        stderr: "error: --output `type=bogus`: unknown type `bogus`; graphbuild writes local, tar or oci\n\
                 hint: TYPE is one of local, tar or oci\n",
    },
    Case {
        args: &[
            "run",
            "build.kdl",
            "--load",
            "--platform",
            "linux/amd64",
            "--platform",
            "linux/arm64",
        ],
        env: &[],
        exit: 2,
        stderr: "error: --load loads one platform, and 2 are selected (linux/amd64, linux/arm64)\n\
                 hint: choose one with a single --platform, or use --output type=oci,dest=FILE.tar\n",
    },
    Case {
        args: &["run", "build.kdl"],
        env: &[("GRAPHBUILD_OVERLAY", "bogus")],
        exit: 2,
        stderr: "error: GRAPHBUILD_OVERLAY=`bogus` is not an overlay: use `auto` (the default), `native` or `fuse`\n",
    },
    Case {
        args: &[
            "run",
            "build.kdl",
            "--cache-dir",
            "/proc/graphbuild-none/store",
        ],
        env: &[],
        exit: 3,
        stderr: "error: cannot open the store at /proc/graphbuild-none/store: cannot create /proc/graphbuild-none: No such file or directory (os error 2)\n\
                 hint: choose another directory with --cache-dir DIR\n",
    },
];

#[test]
fn each_problem_is_rendered_once_with_its_hints_and_exit_status() {
    let sandbox = Sandbox::new();
    sandbox.write("build.kdl", BUILD);
    for case in CASES {
        let output = sandbox.graphbuild_with_env(case.env, case.args);
        let shown = format!("graphbuild {}", case.args.join(" "));
        assert_eq!(stderr(&output), case.stderr, "stderr of {shown}");
        assert_eq!(output.status.code(), Some(case.exit), "exit of {shown}");
        assert_eq!(stdout(&output), "", "stdout of {shown}");
    }
    // Nothing was built or exported on the way.
    assert!(!sandbox.path().join("graphbuild-out").exists());
}

#[test]
fn the_build_files_diagnostics_are_rendered_once_and_exit_2() {
    let sandbox = Sandbox::new();
    sandbox.write("build.kdl", BUILD);
    let output = sandbox.graphbuild(&["run", "build.kdl", "nothing-here"]);
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert_eq!(
        text.matches("graphbuild::unknown::image").count(),
        1,
        "{text}"
    );
    assert!(
        text.contains("no image, group or stage named `nothing-here` in the build file"),
        "{text}"
    );
    assert_eq!(text.matches("× 1 error").count(), 1, "{text}");
}
