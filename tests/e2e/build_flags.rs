//! `graphbuild build` flags that other tests exercise only through `run`, checked on the
//! Dockerfile command line as buildx users type them: `--target` (a stage that is not the
//! last), `-o type=tar`, `--cache-to`/`--cache-from` with a team cache between two stores,
//! `--no-cache`, `--load` into podman, and `--pull` with graphbuild.lock against a real local
//! registry. The rest are proved elsewhere: `--push` and `-o type=registry` (the canonical
//! buildx command), `--secret`, `--build-arg`, `--metadata-file`, `--iidfile`, `-o type=oci`
//! and the refused flags in dockerfile.rs; `--ssh` in ssh.rs. And `SHELL` in the image config
//! (Docker's `Shell`), inherited by images built on it.

mod common;

use std::process::Command;

use common::*;

const DOCKERFILE: &str = "FROM oci:../fixtures/busybox:1.35.0 AS tool\nARG TARGETARCH\nRUN echo \"tool $TARGETARCH\" > /tool.txt\n\nFROM oci:../fixtures/busybox:1.35.0\nCOPY --from=tool /tool.txt /\nRUN echo final > /final.txt\n";

fn busybox_sandbox() -> Option<Sandbox> {
    if !root_and_qemu() {
        return None;
    }
    let sandbox = Sandbox::new();
    sandbox.busybox("fixtures/busybox");
    sandbox.write("app/Dockerfile", DOCKERFILE);
    Some(sandbox)
}

/// `graphbuild build … app` in `store` for two platforms, `--progress json`: the output.
fn build_in(sandbox: &Sandbox, store: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "build",
        "--platform",
        "linux/amd64,linux/arm64",
        "-t",
        "localhost/app:1.0",
        "--provenance=false",
        "--progress",
        "json",
    ];
    args.extend_from_slice(extra);
    args.push("app");
    let output = sandbox.graphbuild_with_store(&sandbox.path().join(store), &args);
    assert_success(&output);
    output
}

fn counts(output: &std::process::Output) -> (u64, u64, String) {
    let summary = summary(output);
    (
        summary["executed"].as_u64().expect("executed"),
        summary["cached"].as_u64().expect("cached"),
        summary["images"][0]["index_digest"]
            .as_str()
            .expect("index digest")
            .to_string(),
    )
}

#[test]
fn target_builds_a_stage_that_is_not_the_last() {
    let Some(sandbox) = busybox_sandbox() else {
        return;
    };
    let output = sandbox.graphbuild(&[
        "build",
        "--platform",
        "linux/arm64",
        "--target",
        "tool",
        "-o",
        "type=local,dest=rootfs-tool",
        "app",
    ]);
    assert_success(&output);
    let rootfs = sandbox.path().join("rootfs-tool");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("tool.txt")).expect("tool.txt"),
        "tool arm64\n"
    );
    assert!(rootfs.join("bin/busybox").exists());
    assert!(!rootfs.join("final.txt").exists(), "the last stage's file");
}

#[test]
fn output_type_tar_writes_the_filesystem_as_a_tar() {
    let Some(sandbox) = busybox_sandbox() else {
        return;
    };
    let output = sandbox.graphbuild(&[
        "build",
        "--platform",
        "linux/arm64",
        "-o",
        "type=tar,dest=fs.tar",
        "app",
    ]);
    assert_success(&output);
    for (path, expected) in [("tool.txt", "tool arm64\n"), ("final.txt", "final\n")] {
        let content = Command::new("tar")
            .arg("-xOf")
            .arg(sandbox.path().join("fs.tar"))
            .arg(path)
            .output()
            .expect("tar");
        assert!(content.status.success(), "{path}: {}", stderr(&content));
        assert_eq!(stdout(&content), expected, "{path}");
    }
    // Only the tar: no layout directory left behind.
    assert!(!sandbox.path().join("graphbuild-out").exists());
}

/// `--cache-to` from one store fills a team cache; `--cache-from` in an empty store builds the
/// same image from it without running a step; `--no-cache` runs every step again and, the
/// build being reproducible, gives the same image.
#[test]
fn cache_to_cache_from_and_no_cache_work_on_the_dockerfile_command_line() {
    let Some(sandbox) = busybox_sandbox() else {
        return;
    };
    let server = CacheServer::start(&sandbox.path().join("team-cache"), &[]);
    let (executed, cached, digest) =
        counts(&build_in(&sandbox, "store-a", &["--cache-to", &server.url]));
    // Two RUNs and a COPY per platform, the tool stage once per platform.
    assert!(executed >= 6, "executed {executed}");
    assert_eq!(cached, 0);
    let (executed_b, cached_b, digest_b) = counts(&build_in(
        &sandbox,
        "store-b",
        &["--cache-from", &server.url],
    ));
    assert_eq!(executed_b, 0, "every step from the team cache");
    // Steps whose results are not needed (the tool stage's, its file already in the final
    // stage's layer) are not fetched: fewer cache hits than steps run.
    assert!(cached_b > 0 && cached_b <= executed, "cached {cached_b}");
    assert_eq!(digest_b, digest);
    let (executed_c, cached_c, digest_c) = counts(&build_in(&sandbox, "store-b", &["--no-cache"]));
    assert_eq!(
        (executed_c, cached_c),
        (executed, 0),
        "--no-cache runs every step"
    );
    assert_eq!(digest_c, digest);
    let (executed_d, _, digest_d) = counts(&build_in(&sandbox, "store-b", &[]));
    assert_eq!(executed_d, 0);
    assert_eq!(digest_d, digest);
}

/// `--load` puts the one platform built into podman (a store of the test's own).
#[test]
fn load_puts_the_built_dockerfile_into_podman() {
    let Some(sandbox) = busybox_sandbox() else {
        return;
    };
    require_tool("podman");
    let storage = sandbox.path().join("podman");
    let conf = sandbox.write(
        "storage.conf",
        &format!(
            "[storage]\ndriver = \"overlay\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
            storage.join("root").display(),
            storage.join("run").display()
        ),
    );
    let output = Command::new(bin())
        .args([
            "build",
            "--platform",
            "linux/arm64",
            "-t",
            "example.com/build-load:1.0",
            "--load",
            "app",
        ])
        .current_dir(sandbox.path())
        .env("GRAPHBUILD_CACHE_DIR", sandbox.store())
        .env("CONTAINERS_STORAGE_CONF", &conf)
        .output()
        .expect("graphbuild runs");
    assert_success(&output);
    let inspected = Command::new("podman")
        .args([
            "image",
            "inspect",
            "--format",
            "{{.Architecture}}",
            "example.com/build-load:1.0",
        ])
        .env("CONTAINERS_STORAGE_CONF", &conf)
        .output()
        .expect("podman runs");
    assert!(inspected.status.success(), "{}", stderr(&inspected));
    assert_eq!(stdout(&inspected).trim(), "arm64");
    // Several platforms cannot be loaded as one image: refused before building.
    let several = sandbox.graphbuild(&[
        "build",
        "--platform",
        "linux/amd64,linux/arm64",
        "--load",
        "app",
    ]);
    assert_eq!(several.status.code(), Some(2), "{}", stderr(&several));
}

/// Base tags against a real local registry: `build` resolves them afresh while no
/// graphbuild.lock is beside the Dockerfile; `--pull` resolves them and writes the lock; a
/// later `build` keeps to the lock when the tag moves, and `--pull` follows the move.
#[test]
fn pull_resolves_base_tags_afresh_and_writes_the_lock() {
    if !root_and_qemu() {
        return;
    }
    let registry = Registry::start();
    let sandbox = Sandbox::new();
    let original = format!(
        "oci:{}:1.35.0",
        sandbox.path().join("tests/fixtures/busybox").display()
    );
    registry.push_layout(&original, "busybox:1.35.0");
    let base = format!("{}/busybox:1.35.0", registry.address);
    sandbox.write(
        "app/Dockerfile",
        &format!(
            "FROM {base}\nRUN if [ -e /moved.txt ]; then echo moved; else echo original; fi > /seen.txt\n"
        ),
    );
    sandbox.write(
        "moved/Dockerfile",
        "FROM oci:../tests/fixtures/busybox:1.35.0\nRUN echo moved > /moved.txt\n",
    );
    let seen = |extra: &[&str], dest: &str| -> String {
        let output_spec = format!("type=local,dest={dest}");
        let mut args = vec!["build", "--platform", "linux/arm64", "-o", &output_spec];
        args.extend_from_slice(extra);
        args.push("app");
        let output = sandbox.graphbuild(&args);
        assert_success(&output);
        std::fs::read_to_string(sandbox.path().join(dest).join("seen.txt")).expect("seen.txt")
    };
    let move_tag = || {
        let output = sandbox.graphbuild(&[
            "build",
            "--platform",
            "linux/arm64",
            "-t",
            &base,
            "--push",
            "--provenance=false",
            "moved",
        ]);
        assert_success(&output);
    };
    let lock = sandbox.path().join("app/graphbuild.lock");

    assert_eq!(seen(&[], "r1"), "original\n");
    assert!(!lock.exists(), "a build without --pull writes no lock");
    // No lock: the moved tag is followed.
    move_tag();
    assert_eq!(seen(&[], "r2"), "moved\n");
    // --pull writes the lock; the tag moves back; the lock keeps the build where it was.
    assert_eq!(seen(&["--pull"], "r3"), "moved\n");
    let locked = std::fs::read_to_string(&lock).expect("--pull writes graphbuild.lock");
    assert!(locked.contains(&base), "{locked}");
    registry.push_layout(&original, "busybox:1.35.0");
    assert_eq!(seen(&[], "r4"), "moved\n", "the lock pins the base");
    assert_eq!(std::fs::read_to_string(&lock).expect("lock"), locked);
    assert_eq!(
        seen(&["--pull"], "r5"),
        "original\n",
        "--pull follows the tag"
    );
    assert_ne!(std::fs::read_to_string(&lock).expect("lock"), locked);
}

/// The canonical command exactly as typed, `.` the directory it runs in (its Dockerfile the
/// default), against a real local registry: both platforms pushed under the tag.
#[test]
fn the_canonical_command_builds_dot_and_pushes_both_platforms() {
    if !root_and_qemu() {
        return;
    }
    let registry = Registry::start();
    let sandbox = Sandbox::new();
    registry.push_layout(
        &format!(
            "oci:{}:1.35.0",
            sandbox.path().join("tests/fixtures/busybox").display()
        ),
        "busybox:1.35.0",
    );
    sandbox.write(
        "app/Dockerfile",
        &format!(
            "FROM {}/busybox:1.35.0\nARG TARGETARCH\nRUN echo $TARGETARCH > /arch.txt\n",
            registry.address
        ),
    );
    let tag = format!("{}/user/app:1.0", registry.address);
    let output = Command::new(bin())
        .args([
            "build",
            "--platform",
            "linux/amd64,linux/arm64",
            "-t",
            &tag,
            "--push",
            ".",
        ])
        .current_dir(sandbox.path().join("app"))
        .env("GRAPHBUILD_CACHE_DIR", sandbox.store())
        .env("NO_COLOR", "1")
        .output()
        .expect("graphbuild runs");
    assert_success(&output);
    assert!(
        stderr(&output).contains(&format!("pushed {tag}")),
        "{}",
        stderr(&output)
    );
    let raw = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{tag}"))
        .output()
        .expect("skopeo runs");
    assert!(raw.status.success(), "{}", stderr(&raw));
    let index: serde_json::Value = serde_json::from_slice(&raw.stdout).expect("JSON");
    let mut architectures: Vec<&str> = index["manifests"]
        .as_array()
        .expect("an index")
        .iter()
        .filter_map(|m| m["platform"]["architecture"].as_str())
        .filter(|arch| *arch != "unknown")
        .collect();
    architectures.sort_unstable();
    assert_eq!(architectures, ["amd64", "arm64"]);
}

/// `SHELL` is written to the image config as Docker writes it (`Shell`), and an image built
/// on that one runs its shell-form RUNs with it and keeps it, as Docker does.
#[test]
fn shell_is_in_the_config_and_inherited_by_images_built_on_it() {
    let Some(sandbox) = busybox_sandbox() else {
        return;
    };
    sandbox.write(
        "base/Dockerfile",
        "FROM oci:../fixtures/busybox:1.35.0\nSHELL [\"/bin/sh\", \"-e\", \"-c\"]\n",
    );
    sandbox.write(
        "child/Dockerfile",
        "FROM oci:../layout:1.0\nRUN case $- in *e*) echo errexit ;; *) echo none ;; esac > /shell.txt\n",
    );
    for (dir, tag, dest) in [
        ("base", "localhost/base:1.0", "layout"),
        ("child", "localhost/child:1.0", "child-layout"),
    ] {
        let output = sandbox.graphbuild(&[
            "build",
            "--platform",
            "linux/arm64",
            "-t",
            tag,
            "--provenance=false",
            "-o",
            &format!("type=oci,dest={dest}"),
            dir,
        ]);
        assert_success(&output);
        let config = config(&sandbox.path().join(dest), "linux/arm64");
        assert_eq!(
            config["config"]["Shell"],
            serde_json::json!(["/bin/sh", "-e", "-c"]),
            "{dir}: {config}"
        );
    }
    let output = sandbox.graphbuild(&[
        "build",
        "--platform",
        "linux/arm64",
        "-o",
        "type=local,dest=child-rootfs",
        "child",
    ]);
    assert_success(&output);
    assert_eq!(
        std::fs::read_to_string(sandbox.path().join("child-rootfs/shell.txt")).expect("shell.txt"),
        "errexit\n",
        "the RUN ran with the base's shell"
    );
    // Without SHELL, no `Shell`: the default is not written.
    let output = sandbox.graphbuild(&[
        "build",
        "--platform",
        "linux/arm64",
        "-t",
        "localhost/app:1.0",
        "--provenance=false",
        "-o",
        "type=oci,dest=app-layout",
        "app",
    ]);
    assert_success(&output);
    let config = config(&sandbox.path().join("app-layout"), "linux/arm64");
    assert!(config["config"].get("Shell").is_none(), "{config}");
}
