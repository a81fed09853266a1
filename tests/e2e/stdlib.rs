//! The standard modules (`std:busybox`, `std:python`, `std:go`, `std:rust`, `std:static`):
//! golden plans for three platforms, and real builds of the two whose base the busybox fixture
//! can stand in for.
//!
//! Golden plans: each module is used by a small build file in a sandbox (its toolchain or base
//! image swapped for the fixture through the module's params, so planning is offline), planned
//! with `graphbuild plan --format json`, and rendered as text: every node with its stage, the
//! platform it runs on, the targets it serves and its base, then every step's description;
//! each image with its platforms and tags. Keys are left out (they are covered by the caching
//! tests and change with any engine detail); the fixture's manifest digests stay in, since they
//! show which platform's base each node got. The renderings live in `tests/e2e/golden/`;
//! `BLESS=1` rewrites them. The goldens are for an x86-64 build machine: nodes pinned to
//! `$BUILDPLATFORM` run on linux/amd64 there.

mod common;

use common::*;
use std::path::Path;

const PLATFORMS: [&str; 3] = ["linux/amd64", "linux/arm64", "linux/arm/v7"];

/// A module, a build file that uses it, and the context files the build file needs.
type Case = (
    &'static str,
    &'static str,
    Vec<(&'static str, &'static str)>,
);

fn cases() -> Vec<Case> {
    vec![
        (
            "busybox",
            r#"import "std:busybox" as="busybox"
platforms "linux/amd64" "linux/arm64" "linux/arm/v7"
arg BASE="oci:../../tests/fixtures/busybox:1.35.0"
image shell { use "busybox.app" base="$BASE" src="scripts/" command="sh /app/hello.sh"; tags "localhost/shell:1"; }
"#,
            vec![("scripts/hello.sh", "echo hello from $(uname -m)\n")],
        ),
        (
            "python",
            r#"import "std:python" as="py"
platforms "linux/amd64" "linux/arm64" "linux/arm/v7"
arg BASE="oci:../../tests/fixtures/busybox:1.35.0"
image api { use "py.app" base="$BASE" src="app/" command="python -m app"; tags "localhost/api:1"; }
"#,
            vec![
                ("requirements.txt", "idna==3.10\n"),
                ("app/__main__.py", "print('hi')\n"),
            ],
        ),
        (
            "go",
            r#"import "std:go" as="go"
platforms "linux/amd64" "linux/arm64" "linux/arm/v7"
arg BASE="oci:../../tests/fixtures/busybox:1.35.0"
image hello { use "go.app" builder="$BASE" package="./cmd/hello" binary="hello"; tags "localhost/hello:1"; }
"#,
            vec![
                ("go.mod", "module example.com/hello\n\ngo 1.23\n"),
                ("cmd/hello/main.go", "package main\n\nfunc main() {}\n"),
            ],
        ),
        (
            "rust",
            r#"import "std:rust" as="rust"
platforms "linux/amd64" "linux/arm64" "linux/arm/v7"
arg BASE="oci:../../tests/fixtures/busybox:1.35.0"
image tool { use "rust.app" builder="$BASE" binary="tool"; tags "localhost/tool:1"; }
"#,
            vec![
                (
                    "Cargo.toml",
                    "[package]\nname = \"tool\"\nversion = \"0.1.0\"\n",
                ),
                ("src/main.rs", "fn main() {}\n"),
            ],
        ),
        (
            "static",
            r#"import "std:static" as="static"
platforms "linux/amd64" "linux/arm64" "linux/arm/v7"
arg BASE="oci:../../tests/fixtures/busybox:1.35.0"
stage app {
    from "$BASE"
    run "mkdir -p /out && cp /bin/busybox /out/app"
}
image server { use "static.app" app="app" binary="/out/app" builder="$BASE" install="true"; tags "localhost/server:1"; }
"#,
            vec![],
        ),
    ]
}

fn write_case(sandbox: &Sandbox, module: &str, file: &str, context: &[(&str, &str)]) -> String {
    let relative = format!("stdlib/{module}/images.kdl");
    sandbox.write(&relative, file);
    for (path, contents) in context {
        sandbox.write(&format!("stdlib/{module}/{path}"), contents);
    }
    relative
}

fn strings(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|item| item.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The plan as stable text (see the module docs).
fn render(plan: &serde_json::Value) -> String {
    let nodes = plan["nodes"].as_array().expect("nodes");
    let stage_of = |id: &str| -> String {
        nodes
            .iter()
            .find(|node| node["id"] == id)
            .map(|node| {
                format!(
                    "{} ({})",
                    node["stage"].as_str().unwrap_or("?"),
                    strings(&node["targets"]).join(" ")
                )
            })
            .unwrap_or_else(|| format!("unknown node {id}"))
    };
    let mut text = String::new();
    for node in nodes {
        text.push_str(&format!(
            "node {} for {} runs on {}\n",
            node["stage"].as_str().unwrap_or("?"),
            strings(&node["targets"]).join(" "),
            node["platform"].as_str().unwrap_or("?"),
        ));
        let base = &node["base"];
        let base = match base["kind"].as_str() {
            Some("scratch") => "scratch".to_string(),
            Some("node") => format!(
                "stage {}",
                stage_of(base["node"].as_str().unwrap_or_default())
            ),
            Some("image") => format!(
                "{} {}",
                base["reference"].as_str().unwrap_or("?"),
                base["digest"].as_str().unwrap_or("?")
            ),
            other => format!("unexpected base kind {other:?}"),
        };
        text.push_str(&format!("  from {base}\n"));
        let mut deps: Vec<String> = strings(&node["deps"])
            .iter()
            .map(|id| stage_of(id))
            .collect();
        deps.sort();
        if !deps.is_empty() {
            text.push_str(&format!("  needs {}\n", deps.join(", ")));
        }
        for step in node["steps"].as_array().expect("steps") {
            text.push_str(&format!(
                "  {:<6} {}\n",
                step["kind"].as_str().unwrap_or("?"),
                step["description"]
                    .as_str()
                    .unwrap_or("?")
                    .replace('\n', "\n         ")
            ));
        }
    }
    for image in plan["images"].as_array().expect("images") {
        text.push_str(&format!(
            "image {} platforms {} tags {}\n",
            image["name"].as_str().unwrap_or("?"),
            strings(&image["platforms"]).join(" "),
            strings(&image["tags"]).join(" ")
        ));
        for platform in PLATFORMS {
            let id = image["nodes"][platform].as_str().unwrap_or_default();
            text.push_str(&format!("  {platform} is {}\n", stage_of(id)));
        }
    }
    text
}

#[test]
fn every_module_plans_for_three_platforms_as_the_golden_files_say() {
    let sandbox = Sandbox::new();
    let golden_dir = repo_root().join("tests/e2e/golden");
    let bless = std::env::var_os("BLESS").is_some();
    let mut failures = Vec::new();
    for (module, file, context) in cases() {
        let path = write_case(&sandbox, module, file, &context);
        let output = sandbox.graphbuild(&["plan", &path, "--format", "json"]);
        assert_success(&output);
        assert!(
            !stderr(&output).contains("warning"),
            "std:{module}: {}",
            stderr(&output)
        );
        let plan: serde_json::Value = serde_json::from_slice(&output.stdout).expect("plan JSON");
        let actual = render(&plan);
        let golden = golden_dir.join(format!("stdlib-{module}.txt"));
        if bless {
            std::fs::create_dir_all(&golden_dir).expect("mkdir golden");
            std::fs::write(&golden, &actual).expect("write golden");
            continue;
        }
        let expected = std::fs::read_to_string(&golden).unwrap_or_default();
        if expected != actual {
            failures.push(format!(
                "std:{module} differs from {}:\n{actual}",
                golden.display()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n(BLESS=1 rewrites the golden files)",
        failures.join("\n")
    );
}

/// What the goldens show, asserted directly so a careless re-bless cannot hide it.
#[test]
fn cross_compiling_modules_run_on_the_build_platform_and_derive_the_target() {
    let sandbox = Sandbox::new();
    let host = host_platform();
    for (module, file, context) in cases()
        .into_iter()
        .filter(|(module, _, _)| *module == "go" || *module == "rust")
    {
        let path = write_case(&sandbox, module, file, &context);
        let output = sandbox.graphbuild(&["plan", &path, "--format", "json"]);
        assert_success(&output);
        let plan: serde_json::Value = serde_json::from_slice(&output.stdout).expect("plan JSON");
        let nodes = plan["nodes"].as_array().expect("nodes");
        for (target, goarch, goarm, triple) in [
            ("linux/amd64", "amd64", "", "x86_64-unknown-linux-musl"),
            ("linux/arm64", "arm64", "", "aarch64-unknown-linux-musl"),
            ("linux/arm/v7", "arm", "7", "armv7-unknown-linux-musleabihf"),
        ] {
            let build = nodes
                .iter()
                .find(|node| {
                    node["stage"]
                        .as_str()
                        .is_some_and(|stage| stage.ends_with("/build"))
                        && strings(&node["targets"]) == [target]
                })
                .unwrap_or_else(|| panic!("std:{module}: no build node for {target}"));
            assert_eq!(
                build["platform"],
                host.as_str(),
                "std:{module} builds natively for {target}"
            );
            let steps: Vec<String> = build["steps"]
                .as_array()
                .expect("steps")
                .iter()
                .map(|step| step["description"].as_str().unwrap_or_default().to_string())
                .collect();
            let last_env = |name: &str| {
                steps
                    .iter()
                    .rev()
                    .find(|step| step.starts_with(&format!("ENV {name}=")))
                    .cloned()
            };
            if module == "go" {
                assert!(
                    steps
                        .iter()
                        .any(|step| step.contains(&format!("GOOS=linux GOARCH={goarch} "))),
                    "{target}: {steps:?}"
                );
                assert_eq!(
                    last_env("GOARM"),
                    Some(format!("ENV GOARM={goarm}")),
                    "{target}"
                );
            } else {
                assert_eq!(
                    last_env("RUST_TARGET"),
                    Some(format!("ENV RUST_TARGET={triple}")),
                    "{target}"
                );
            }
            // The runtime is the target's own.
            let runtime = nodes
                .iter()
                .find(|node| {
                    node["stage"]
                        .as_str()
                        .is_some_and(|stage| stage.ends_with("/runtime"))
                        && strings(&node["targets"]) == [target]
                })
                .expect("runtime node");
            assert_eq!(runtime["platform"], target);
            assert_eq!(runtime["base"]["kind"], "scratch");
        }
    }
}

fn host_platform() -> String {
    let output = std::process::Command::new("uname")
        .arg("-m")
        .output()
        .expect("uname");
    match String::from_utf8_lossy(&output.stdout).trim() {
        "x86_64" => "linux/amd64".to_string(),
        "aarch64" => "linux/arm64".to_string(),
        "armv7l" => "linux/arm/v7".to_string(),
        other => format!("linux/{other}"),
    }
}

fn read_blob(layout: &Path, digest: &str) -> serde_json::Value {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(hex)).expect("blob"))
        .expect("JSON blob")
}

/// The config of one platform's image in a layout (index.json → index → manifest → config).
fn config(layout: &Path, platform: &str) -> serde_json::Value {
    let top: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index.json"))
            .expect("JSON");
    let index = read_blob(
        layout,
        top["manifests"][0]["digest"].as_str().expect("digest"),
    );
    let manifest = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|manifest| {
            let p = &manifest["platform"];
            let name = match p["variant"].as_str() {
                Some(variant) => format!(
                    "{}/{}/{variant}",
                    p["os"].as_str().unwrap_or_default(),
                    p["architecture"].as_str().unwrap_or_default()
                ),
                None => format!(
                    "{}/{}",
                    p["os"].as_str().unwrap_or_default(),
                    p["architecture"].as_str().unwrap_or_default()
                ),
            };
            name == platform
        })
        .unwrap_or_else(|| panic!("no {platform} in {index}"));
    let manifest = read_blob(layout, manifest["digest"].as_str().expect("digest"));
    read_blob(
        layout,
        manifest["config"]["digest"]
            .as_str()
            .expect("config digest"),
    )
}

#[test]
fn busybox_and_static_modules_build_from_the_fixture_for_three_platforms() {
    use std::os::unix::fs::MetadataExt;
    let sandbox = Sandbox::new();
    let all = cases();
    let (_, busybox_file, busybox_context) = all
        .iter()
        .find(|(module, _, _)| *module == "busybox")
        .expect("busybox case");
    let (_, static_file, _) = all
        .iter()
        .find(|(module, _, _)| *module == "static")
        .expect("static case");
    let busybox = write_case(&sandbox, "busybox", busybox_file, busybox_context);
    let server = write_case(&sandbox, "static", static_file, &[]);

    for file in [&busybox, &server] {
        let output = sandbox.graphbuild(&["run", file, "--output", "out", "--progress", "json"]);
        assert_success(&output);
        assert_eq!(summary(&output)["failed"], 0);
    }

    for platform in PLATFORMS {
        let slug = platform.replace('/', "-");
        let fixture = unpack_platform(
            &sandbox.path().join("tests/fixtures/busybox"),
            "1.35.0",
            platform,
            &sandbox.path().join(format!("fixture-{slug}")),
        );

        // std:busybox: the scripts in /app, the command through sh -c, busybox underneath.
        let layout = sandbox.path().join("out/shell");
        let rootfs = unpack_platform(
            &layout,
            "1",
            platform,
            &sandbox.path().join(format!("shell-{slug}")),
        );
        assert_eq!(
            std::fs::read_to_string(rootfs.join("app/hello.sh")).expect("/app/hello.sh"),
            "echo hello from $(uname -m)\n"
        );
        assert_eq!(
            std::fs::read(rootfs.join("bin/busybox")).expect("busybox"),
            std::fs::read(fixture.join("bin/busybox")).expect("fixture busybox")
        );
        let shell = config(&layout, platform);
        assert_eq!(
            strings(&shell["config"]["Cmd"]),
            ["/bin/sh", "-c", "exec sh /app/hello.sh"]
        );
        assert_eq!(shell["config"]["WorkingDir"], "/app");

        // std:static: scratch + users + the binary, non-root.
        let layout = sandbox.path().join("out/server");
        let rootfs = unpack_platform(
            &layout,
            "1",
            platform,
            &sandbox.path().join(format!("server-{slug}")),
        );
        let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).expect("passwd");
        assert!(
            passwd
                .lines()
                .any(|line| line.starts_with("nonroot:x:65532:65532:")),
            "{passwd}"
        );
        let group = std::fs::read_to_string(rootfs.join("etc/group")).expect("group");
        assert!(
            group.lines().any(|line| line == "nonroot:x:65532:"),
            "{group}"
        );
        let tmp = std::fs::metadata(rootfs.join("tmp")).expect("/tmp");
        assert_eq!(tmp.mode() & 0o7777, 0o1777);
        let home = std::fs::metadata(rootfs.join("home/nonroot")).expect("home");
        assert_eq!((home.uid(), home.gid()), (65532, 65532));
        assert_eq!(
            std::fs::read(rootfs.join("app")).expect("/app"),
            std::fs::read(fixture.join("bin/busybox")).expect("fixture busybox")
        );
        assert!(
            !rootfs.join("bin").exists(),
            "nothing of the builder but the files it made"
        );
        let server = config(&layout, platform);
        assert_eq!(server["config"]["User"], "65532:65532");
        assert_eq!(strings(&server["config"]["Entrypoint"]), ["/app"]);
        assert_eq!(server["config"]["WorkingDir"], "/home/nonroot");
        assert!(
            strings(&server["config"]["Env"])
                .contains(&"SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt".to_string())
        );
    }
}
