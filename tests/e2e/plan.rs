//! `graphbuild plan` end to end: DESIGN.md's sketch (its registry bases served by a real
//! registry on 127.0.0.1), the documented JSON shape, dot output, and node sharing.

mod common;

use common::*;
use serde_json::Value;

fn plan_json(sandbox: &Sandbox, file: &str, extra: &[&str]) -> Value {
    let mut args = vec!["plan", file, "--format", "json"];
    args.extend_from_slice(extra);
    let output = sandbox.graphbuild(&args);
    assert_success(&output);
    serde_json::from_slice(&output.stdout).expect("plan prints JSON")
}

fn nodes_of<'a>(plan: &'a Value, stage: &str) -> Vec<&'a Value> {
    plan["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|node| node["stage"] == stage)
        .collect()
}

/// Every node and image has the documented fields with the documented types.
fn assert_documented_shape(plan: &Value) {
    assert_eq!(plan["version"], 1);
    let nodes = plan["nodes"].as_array().expect("nodes");
    let ids: Vec<&str> = nodes
        .iter()
        .map(|node| node["id"].as_str().expect("id"))
        .collect();
    for node in nodes {
        assert!(node["stage"].is_string());
        assert!(node["platform"].as_str().unwrap().starts_with("linux/"));
        assert!(
            node["targets"]
                .as_array()
                .is_some_and(|targets| !targets.is_empty())
        );
        assert_eq!(node["key"].as_str().unwrap().len(), 64);
        for dep in node["deps"].as_array().expect("deps") {
            assert!(ids.contains(&dep.as_str().unwrap()), "dep {dep} is a node");
        }
        assert!(["scratch", "node", "image"].contains(&node["base"]["kind"].as_str().unwrap()));
        for step in node["steps"].as_array().expect("steps") {
            assert!(["run", "copy", "config"].contains(&step["kind"].as_str().unwrap()));
            // file:line:col, the file being the build file, an import or a `std:` module.
            let location = step["location"].as_str().unwrap();
            let mut parts = location.rsplitn(3, ':');
            assert!(parts.next().unwrap().parse::<u32>().is_ok(), "{location}");
            assert!(parts.next().unwrap().parse::<u32>().is_ok(), "{location}");
        }
    }
    for image in plan["images"].as_array().expect("images") {
        assert!(image["name"].is_string());
        let platforms = image["platforms"].as_array().expect("platforms");
        for platform in platforms {
            let node = &image["nodes"][platform.as_str().unwrap()];
            assert!(ids.contains(&node.as_str().unwrap()), "image node {node}");
        }
        assert!(image["tags"].is_array());
    }
}

#[test]
fn design_sketch_expands_to_the_expected_graph() {
    let registry = Registry::start();
    let sandbox = Sandbox::new();
    let fixture = format!(
        "oci:{}:1.35.0",
        sandbox.path().join("tests/fixtures/busybox").display()
    );
    // The sketch's bases, served by a local registry (busybox stands in for python).
    for name in [
        "library/busybox:1.36",
        "library/python:3.11-slim",
        "library/python:3.12-slim",
    ] {
        registry.push_layout(&fixture, name);
    }
    let sketch =
        std::fs::read_to_string(repo_root().join("lang/tests/cases/input/design_sketch.kdl"))
            .expect("the sketch")
            .replace(
                "docker.io/library/",
                &format!("{}/library/", registry.address),
            );
    sandbox.write("sketch/images.kdl", &sketch);
    sandbox.write("sketch/src/main.c", "int main(void) { return 0; }\n");
    sandbox.write("sketch/requirements.txt", "flask==3.0\n");

    let plan = plan_json(&sandbox, "sketch/images.kdl", &[]);
    assert_documented_shape(&plan);
    let host = if cfg!(target_arch = "aarch64") {
        "linux/arm64"
    } else {
        "linux/amd64"
    };

    // app: base once (built for the build platform that `build` runs on), build once per target
    // on the build platform, runtime per target.
    let builds = nodes_of(&plan, "build");
    assert_eq!(builds.len(), 2);
    for build in &builds {
        assert_eq!(build["platform"], host, "build is pinned to $BUILDPLATFORM");
    }
    let mut targets: Vec<&str> = builds
        .iter()
        .map(|node| node["targets"][0].as_str().unwrap())
        .collect();
    targets.sort();
    assert_eq!(targets, ["linux/amd64", "linux/arm64"]);
    assert_eq!(nodes_of(&plan, "base").len(), 1);
    assert_eq!(nodes_of(&plan, "runtime").len(), 2);
    // ${TARGETARCH} was substituted per target.
    let commands: Vec<String> = builds
        .iter()
        .map(|node| {
            node["steps"]
                .as_array()
                .unwrap()
                .iter()
                .find(|step| step["kind"] == "run")
                .unwrap()["description"]
                .to_string()
        })
        .collect();
    assert!(
        commands
            .iter()
            .any(|command| command.contains("make ARCH=amd64")),
        "{commands:?}"
    );
    assert!(
        commands
            .iter()
            .any(|command| command.contains("make ARCH=arm64")),
        "{commands:?}"
    );

    // The matrix: two python images, three platforms each, two template stages per platform.
    let images = plan["images"].as_array().unwrap();
    let names: Vec<&str> = images
        .iter()
        .map(|image| image["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["app", "py-3.11", "py-3.12"]);
    assert_eq!(
        images[0]["platforms"],
        serde_json::json!(["linux/amd64", "linux/arm64"])
    );
    assert_eq!(
        images[0]["tags"],
        serde_json::json!([
            "registry.example.com/app:1.0.0",
            "registry.example.com/app:latest"
        ])
    );
    assert_eq!(
        images[1]["platforms"],
        serde_json::json!(["linux/amd64", "linux/arm64", "linux/arm/v7"])
    );
    // Both python tags hold the same stand-in image here, so the two matrix images have equal
    // inputs: content addressing makes them share their nodes (two stages × three platforms).
    let template_nodes = plan["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|node| node["stage"].as_str().unwrap().starts_with("py-"))
        .count();
    assert_eq!(template_nodes, 2 * 3);
    assert_eq!(images[1]["nodes"], images[2]["nodes"]);
    assert_eq!(plan["nodes"].as_array().unwrap().len(), 1 + 2 + 2 + 6);

    // An arg override reaches the tags and the label, and only changes what reads it.
    let changed = plan_json(&sandbox, "sketch/images.kdl", &["--arg", "APP_VERSION=2.0"]);
    assert_eq!(
        changed["images"][0]["tags"][0],
        "registry.example.com/app:2.0"
    );
    let key_of = |plan: &Value, stage: &str| {
        nodes_of(plan, stage)
            .iter()
            .map(|node| node["key"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        key_of(&plan, "build"),
        key_of(&changed, "build"),
        "build does not read APP_VERSION"
    );
    assert_ne!(
        key_of(&plan, "runtime"),
        key_of(&changed, "runtime"),
        "runtime's label reads it"
    );

    // Selecting one image and one platform.
    let narrowed = plan_json(
        &sandbox,
        "sketch/images.kdl",
        &["py-3.12", "--platform", "linux/arm64"],
    );
    assert_eq!(narrowed["images"].as_array().unwrap().len(), 1);
    assert_eq!(narrowed["nodes"].as_array().unwrap().len(), 2);

    // Text and dot render; graphviz accepts the dot.
    let text = sandbox.graphbuild(&["plan", "sketch/images.kdl"]);
    assert_success(&text);
    assert!(stdout(&text).starts_with("11 nodes"), "{}", stdout(&text));
    let dot = sandbox.graphbuild(&["plan", "sketch/images.kdl", "--format", "dot"]);
    assert_success(&dot);
    require_tool("dot");
    let mut graphviz = std::process::Command::new("dot")
        .arg("-Tsvg")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    graphviz
        .stdin
        .take()
        .unwrap()
        .write_all(&dot.stdout)
        .unwrap();
    let svg = graphviz.wait_with_output().unwrap();
    assert!(svg.status.success());
    assert!(String::from_utf8_lossy(&svg.stdout).contains("<svg"));
}

#[test]
fn a_build_platform_stage_that_reads_no_target_variable_is_one_node_for_every_target() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "shared/images.kdl",
        r#"platforms "linux/amd64" "linux/arm64" "linux/arm/v7"
arg BASE="oci:../tests/fixtures/busybox:1.35.0"
stage tools {
    platform "$BUILDPLATFORM"
    from "$BASE"
    run "echo generated > /generated"
}
stage build {
    platform "$BUILDPLATFORM"
    from "$BASE"
    copy "go.mod" "/src/go.mod"
    run "cp /src/go.mod /src/downloaded"
    run "echo ${TARGETARCH} > /src/out"
}
stage runtime {
    from "$BASE"
    copy "/generated" "/generated" from=tools
    copy "/src/out" "/out" from=build
}
image app { stage runtime; }
"#,
    );
    sandbox.write("shared/go.mod", "module example.com/app\n");
    let plan = plan_json(&sandbox, "shared/images.kdl", &[]);
    assert_documented_shape(&plan);
    let tools = nodes_of(&plan, "tools");
    assert_eq!(tools.len(), 1, "one node for all targets");
    assert_eq!(tools[0]["targets"].as_array().unwrap().len(), 3);

    // build reads TARGETARCH in its last step only: its earlier steps share keys across targets.
    let builds = nodes_of(&plan, "build");
    assert_eq!(builds.len(), 3);
    let step_keys = |node: &Value| {
        node["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|step| step["key"].clone())
            .collect::<Vec<_>>()
    };
    let keys: Vec<_> = builds.iter().map(|node| step_keys(node)).collect();
    assert_eq!(keys[0][..2], keys[1][..2]);
    assert_eq!(keys[1][..2], keys[2][..2]);
    assert_ne!(keys[0][2], keys[1][2]);

    // Building it: the shared node and the shared steps run once.
    let output = sandbox.graphbuild(&[
        "run",
        "shared/images.kdl",
        "--output",
        "out",
        "--progress",
        "json",
    ]);
    assert_success(&output);
    let executed: Vec<_> = steps(&output)
        .into_iter()
        .filter(|(_, _, _, status)| status == "executed")
        .collect();
    let count = |stage: &str, needle: &str| {
        executed
            .iter()
            .filter(|(s, _, step, _)| s == stage && step.contains(needle))
            .count()
    };
    assert_eq!(count("tools", "generated"), 1, "{executed:?}");
    assert_eq!(count("build", "downloaded"), 1, "{executed:?}");
    assert_eq!(
        count("build", "TARGETARCH") + count("build", "/src/out"),
        3,
        "{executed:?}"
    );
    let rootfs = unpack_platform(
        &sandbox.path().join("out/app"),
        "latest",
        "linux/arm/v7",
        &sandbox.path().join("unpacked"),
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("out")).unwrap(),
        "arm\n"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("generated")).unwrap(),
        "generated\n"
    );
}

#[test]
fn invalid_input_is_reported_with_location_and_exit_code_2_and_writes_nothing() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "bad/images.kdl",
        r#"platforms "linux/amd64" "plan9/foo"
stage a {
    from "scratch"
    copy "x" "/x" from=missing
    wrkdir "/app"
}
image a { stage a; }
"#,
    );
    let output = sandbox.graphbuild(&["run", "bad/images.kdl", "--output", "out"]);
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(err.contains("images.kdl:1:"), "{err}");
    assert!(err.contains("plan9/foo"), "{err}");
    assert!(err.contains("missing"), "{err}");
    assert!(err.contains("wrkdir"), "{err}");
    assert!(err.contains("workdir"), "did-you-mean: {err}");
    assert!(!sandbox.path().join("out").exists());
    assert!(
        !sandbox.store().join("actions").exists()
            || std::fs::read_dir(sandbox.store().join("actions"))
                .unwrap()
                .next()
                .is_none()
    );
}

/// `arg NAME=(env)"default"` takes NAME from the environment when set; `--arg NAME=…` still
/// wins, and `--arg NAME` alone reads the environment as `docker build --build-arg NAME`.
#[test]
fn args_can_default_from_the_environment() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "e.kdl",
        r#"arg GB_VERSION=(env)"1.0"
arg (env)GB_CHANNEL
arg GB_PLAIN="plain"
stage s {
    from "scratch"
    arg (env)GB_STAGE
    label version="$GB_VERSION" channel="${GB_CHANNEL}" stage="${GB_STAGE}" plain="$GB_PLAIN"
}
image s { stage s; }
"#,
    );
    let label = |env: &[(&str, &str)], extra: &[&str]| -> String {
        let mut args = vec!["plan", "e.kdl", "--format", "json"];
        args.extend_from_slice(extra);
        let output = sandbox.graphbuild_with_env(env, &args);
        assert_success(&output);
        let plan: Value = serde_json::from_slice(&output.stdout).expect("json");
        plan["nodes"][0]["steps"][1]["description"]
            .as_str()
            .expect("description")
            .to_string()
    };
    assert_eq!(
        label(&[], &[]),
        "LABEL version=1.0 channel= stage= plain=plain"
    );
    // Only args declared (env) read the environment.
    let env = [
        ("GB_VERSION", "2.0"),
        ("GB_CHANNEL", "beta"),
        ("GB_STAGE", "x"),
        ("GB_PLAIN", "from-env"),
    ];
    assert_eq!(
        label(&env, &[]),
        "LABEL version=2.0 channel=beta stage=x plain=plain"
    );
    assert_eq!(
        label(&env, &["--arg", "GB_VERSION=3.0", "--arg", "GB_PLAIN"]),
        "LABEL version=3.0 channel=beta stage=x plain=from-env"
    );

    sandbox.write(
        "bad.kdl",
        "arg V=(secret)\"1\"\nstage s { from \"scratch\"; }\nimage s { stage s; }\n",
    );
    let output = sandbox.graphbuild(&["plan", "bad.kdl"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("unknown arg annotation `(secret)`"),
        "{}",
        stderr(&output)
    );
}
