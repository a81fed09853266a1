//! `run`'s outputs: `--output type=local|tar|oci`, `--load`, `--metadata-file`, and the
//! architecture check (`--strict`, `strict-arch=#true`), checked with umoci, skopeo, tar and
//! podman.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

const BUILD: &str = r#"
platforms "linux/amd64" "linux/arm64"

stage app {
    from "oci:tests/fixtures/busybox:1.35.0"
    workdir "/app"
    copy "hello.sh" "/app/hello.sh"
    run "echo ${TARGETARCH} > /app/arch.txt && ln -s arch.txt /app/link && rm -rf /home && mkdir -p /etc/extra /data/sub && echo x > /etc/extra/file && echo old > /data/sub/old.txt"
}

stage final {
    from app
    run "rm -rf /etc/extra /data && mkdir /data && echo new > /data/new.txt && echo again > /app/again.txt"
}

image app {
    stage final
    tags "example.com/outputs-test:1.0"
}
"#;

fn sandbox() -> Sandbox {
    let sandbox = Sandbox::new();
    sandbox.write("images.kdl", BUILD);
    sandbox.write("hello.sh", "#!/bin/sh\necho hello\n");
    sandbox
}

/// Every entry under `root`: kind, mode, owner, and content or link target.
fn entries(root: &Path) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            let metadata = std::fs::symlink_metadata(&path).expect("lstat");
            let relative = path
                .strip_prefix(root)
                .expect("under root")
                .display()
                .to_string();
            let what = if metadata.file_type().is_symlink() {
                format!(
                    "link {}",
                    std::fs::read_link(&path).expect("readlink").display()
                )
            } else if metadata.is_dir() {
                stack.push(path.clone());
                "dir".to_string()
            } else if metadata.is_file() {
                let bytes = std::fs::read(&path).expect("read");
                format!("file {}", hex_sha(&bytes))
            } else {
                format!("special {}", metadata.rdev())
            };
            found.insert(
                relative,
                format!(
                    "{what} {:o} {}:{}",
                    metadata.mode() & 0o7777,
                    metadata.uid(),
                    metadata.gid()
                ),
            );
        }
    }
    found
}

fn hex_sha(bytes: &[u8]) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    format!("{:016x}-{}", hasher.finish(), bytes.len())
}

fn require_root() {
    assert!(
        nix_is_root(),
        "the output tests build images, which needs root: run them as root (README.md)"
    );
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| stdout(&output).trim() == "0")
}

#[test]
fn local_output_is_the_filesystem_umoci_unpacks() {
    require_root();
    let sandbox = sandbox();
    let output = sandbox.graphbuild(&[
        "run",
        "images.kdl",
        "--output",
        "type=local,dest=local",
        "--output",
        "out",
    ]);
    assert_success(&output);
    for platform in ["linux/amd64", "linux/arm64"] {
        let ours = sandbox
            .path()
            .join("local")
            .join(platform.replace('/', "_"));
        let theirs = unpack_platform(
            &sandbox.path().join("out/app"),
            "1.0",
            platform,
            &sandbox
                .path()
                .join("umoci")
                .join(platform.replace('/', "_")),
        );
        let ours = entries(&ours);
        let theirs = entries(&theirs);
        assert!(ours.contains_key("app/arch.txt"), "{platform}: {ours:?}");
        assert!(!ours.contains_key("home"), "/home was removed");
        assert!(!ours.contains_key("etc/extra"), "/etc/extra was removed");
        // /data was replaced (an opaque directory in the last layer).
        assert!(ours.contains_key("data/new.txt"), "{ours:?}");
        assert!(!ours.contains_key("data/sub"), "{ours:?}");
        let differences: Vec<_> = ours
            .iter()
            .filter(|(path, what)| theirs.get(*path) != Some(what))
            .map(|(path, what)| format!("{path}: {what} vs {:?}", theirs.get(path)))
            .chain(
                theirs
                    .keys()
                    .filter(|path| !ours.contains_key(*path))
                    .map(|path| format!("{path}: missing")),
            )
            // umoci sets the root's mode and times of its own.
            .filter(|line| !line.starts_with(": "))
            .collect();
        assert!(differences.is_empty(), "{platform}: {differences:#?}");
        let arch = std::fs::read_to_string(
            sandbox
                .path()
                .join("local")
                .join(platform.replace('/', "_"))
                .join("app/arch.txt"),
        )
        .expect("arch.txt");
        assert_eq!(arch.trim(), platform.rsplit('/').next().unwrap());
    }
    // `type=local,dest=…` is no longer taken as a directory named so.
    assert!(!sandbox.path().join("type=local,dest=local").exists());
}

fn tar_entries(file: &Path) -> Vec<String> {
    let output = Command::new("tar")
        .arg("-tf")
        .arg(file)
        .output()
        .expect("tar runs");
    assert!(output.status.success(), "tar -tf: {}", stderr(&output));
    stdout(&output).lines().map(str::to_string).collect()
}

#[test]
fn tar_output_holds_the_filesystem_per_platform() {
    require_root();
    let sandbox = sandbox();
    let one = sandbox.graphbuild(&[
        "run",
        "images.kdl",
        "--platform",
        "linux/arm64",
        "--output",
        "type=tar,dest=fs.tar",
    ]);
    assert_success(&one);
    let names = tar_entries(&sandbox.path().join("fs.tar"));
    assert!(names.iter().any(|name| name == "app/arch.txt"), "{names:?}");
    assert!(names.iter().any(|name| name == "bin/busybox"), "{names:?}");
    assert!(
        !names.iter().any(|name| name.starts_with("home")),
        "{names:?}"
    );
    let content = Command::new("tar")
        .args(["-xOf"])
        .arg(sandbox.path().join("fs.tar"))
        .arg("app/arch.txt")
        .output()
        .expect("tar");
    assert_eq!(stdout(&content), "arm64\n");
    // Without --output DIR, no layout directory is left behind.
    assert!(!sandbox.path().join("graphbuild-out").exists());

    let both = sandbox.graphbuild(&["run", "images.kdl", "--output", "type=tar,dest=both.tar"]);
    assert_success(&both);
    let names = tar_entries(&sandbox.path().join("both.tar"));
    for platform in ["linux_amd64", "linux_arm64"] {
        assert!(
            names
                .iter()
                .any(|name| name == &format!("{platform}/app/arch.txt")),
            "{platform}: {names:?}"
        );
    }
}

#[test]
fn oci_archive_is_read_by_skopeo_and_metadata_names_the_index() {
    require_root();
    let sandbox = sandbox();
    let output = sandbox.graphbuild(&[
        "run",
        "images.kdl",
        "--output",
        "type=oci,dest=image.tar",
        "--output",
        "out",
        "--metadata-file",
        "metadata.json",
    ]);
    assert_success(&output);
    let layout_index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(sandbox.path().join("out/app/index.json")).expect("index.json"),
    )
    .expect("JSON");
    let index_digest = layout_index["manifests"][0]["digest"]
        .as_str()
        .expect("digest")
        .to_string();
    let raw = skopeo_raw(&format!(
        "oci-archive:{}",
        sandbox.path().join("image.tar").display()
    ));
    let from_layout: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            sandbox
                .path()
                .join("out/app/blobs/sha256")
                .join(index_digest.trim_start_matches("sha256:")),
        )
        .expect("index blob"),
    )
    .expect("JSON");
    assert_eq!(raw, from_layout, "the archive holds the layout's index");
    // Two platform manifests and their attestation manifests (provenance is on by default).
    assert_eq!(raw["manifests"].as_array().map(Vec::len), Some(4));

    let metadata: serde_json::Value = serde_json::from_slice(
        &std::fs::read(sandbox.path().join("metadata.json")).expect("metadata.json"),
    )
    .expect("JSON");
    assert_eq!(metadata["containerimage.digest"], index_digest.as_str());
    assert_eq!(
        metadata["containerimage.descriptor"]["digest"],
        index_digest.as_str()
    );
    assert_eq!(
        metadata["containerimage.descriptor"]["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    assert_eq!(metadata["image.name"], "example.com/outputs-test:1.0");

    // `type=oci,dest=DIR` is the layouts directory.
    let dir = sandbox.graphbuild(&["run", "images.kdl", "--output", "type=oci,dest=layouts"]);
    assert_success(&dir);
    assert!(sandbox.path().join("layouts/app/index.json").is_file());
}

#[test]
fn bad_outputs_are_refused_with_exit_2() {
    let sandbox = sandbox();
    for (value, message) in [
        (
            "type=docker,dest=x",
            "type `docker` is not an output here; use --load",
        ),
        ("type=zip,dest=x", "unknown type `zip`"),
        ("type=local", "dest is missing"),
        ("type=tar,file=x.tar", "cannot read `file=x.tar`"),
    ] {
        let output = sandbox.graphbuild(&["run", "images.kdl", "--output", value]);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{value}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains(message),
            "{value}: {}",
            stderr(&output)
        );
    }
    // type=local replaces its destination: never the directory holding the build file.
    let replacing = sandbox.graphbuild(&["run", "images.kdl", "--output", "type=local,dest=."]);
    assert_eq!(replacing.status.code(), Some(2), "{}", stderr(&replacing));
    assert!(
        stderr(&replacing).contains("the destination is replaced"),
        "{}",
        stderr(&replacing)
    );
    assert!(sandbox.path().join("images.kdl").is_file());
    let several = sandbox.graphbuild(&[
        "run",
        "images.kdl",
        "--load",
        "--platform",
        "linux/amd64",
        "--platform",
        "linux/arm64",
    ]);
    assert_eq!(several.status.code(), Some(2), "{}", stderr(&several));
    assert!(
        stderr(&several).contains("--load loads one platform"),
        "{}",
        stderr(&several)
    );
}

#[test]
fn load_puts_the_image_into_podman() {
    require_root();
    require_tool("podman");
    let sandbox = sandbox();
    // A podman store of the test's own.
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
        .args(["run", "images.kdl", "--load", "--platform", "linux/arm64"])
        .current_dir(sandbox.path())
        .env("GRAPHBUILD_CACHE_DIR", sandbox.store())
        .env("CONTAINERS_STORAGE_CONF", &conf)
        .output()
        .expect("graphbuild runs");
    assert_success(&output);
    assert!(
        stderr(&output).contains("into podman as example.com/outputs-test:1.0"),
        "{}",
        stderr(&output)
    );
    let podman = |args: &[&str]| {
        Command::new("podman")
            .args(args)
            .env("CONTAINERS_STORAGE_CONF", &conf)
            .output()
            .expect("podman runs")
    };
    let inspected = podman(&[
        "image",
        "inspect",
        "--format",
        "{{.Architecture}}",
        "example.com/outputs-test:1.0",
    ]);
    assert!(inspected.status.success(), "{}", stderr(&inspected));
    assert_eq!(stdout(&inspected).trim(), "arm64");
    let run = podman(&[
        "run",
        "--rm",
        "--platform",
        "linux/arm64",
        "example.com/outputs-test:1.0",
        "cat",
        "/app/arch.txt",
    ]);
    let content = if run.status.success() {
        stdout(&run)
    } else {
        // crun refuses to start here (no CAP_SYS_RESOURCE to raise rlimits; a hybrid cgroup
        // v1/v2 hierarchy): run the image with runc, keeping the rlimits as they are.
        assert!(
            stderr(&run).contains("setrlimit") || stderr(&run).contains("hybrid"),
            "podman run: {}",
            stderr(&run)
        );
        require_tool("runc");
        let run = podman(&[
            "--runtime",
            "runc",
            "run",
            "--rm",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "--platform",
            "linux/arm64",
            "example.com/outputs-test:1.0",
            "cat",
            "/app/arch.txt",
        ]);
        assert!(run.status.success(), "podman run (runc): {}", stderr(&run));
        stdout(&run)
    };
    assert_eq!(content, "arm64\n");

    // Without --platform, the host's platform: an image without it cannot be loaded.
    let (host, foreign) = foreign_platform();
    sandbox.write(
        "foreign.kdl",
        &BUILD.replace(
            r#"platforms "linux/amd64" "linux/arm64""#,
            &format!(r#"platforms "{foreign}""#),
        ),
    );
    let refused = Command::new(bin())
        .args(["run", "foreign.kdl", "--load"])
        .current_dir(sandbox.path())
        .env("GRAPHBUILD_CACHE_DIR", sandbox.store())
        .env("CONTAINERS_STORAGE_CONF", &conf)
        .output()
        .expect("graphbuild runs");
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains(&format!("has no linux/{host} image (built: {foreign})")),
        "{}",
        stderr(&refused)
    );
}

/// The host's platform and a foreign one with an ELF table entry.
fn foreign_platform() -> (&'static str, &'static str) {
    match std::env::consts::ARCH {
        "aarch64" => ("arm64", "linux/amd64"),
        _ => ("amd64", "linux/arm64"),
    }
}

#[test]
fn architecture_check_names_foreign_binaries() {
    require_root();
    let (host, foreign) = foreign_platform();
    let sandbox = Sandbox::new();
    std::fs::copy("/bin/true", sandbox.path().join("tool")).expect("copy /bin/true");
    sandbox.write("script.sh", "#!/bin/sh\necho not an ELF file\n");
    let build = |strict_arch: &str| {
        format!(
            r#"
platforms "{foreign}"
stage base {{
    from "oci:tests/fixtures/busybox:1.35.0"
    copy "tool" "/usr/local/bin/tool"
}}
stage app {{
    from base
    copy "script.sh" "/usr/local/bin/script.sh"
}}
image app{strict_arch} {{
    stage app
}}
"#
        )
    };
    sandbox.write("images.kdl", &build(""));
    let expected = foreign.rsplit('/').next().unwrap();
    let warned = sandbox.graphbuild(&["run", "images.kdl"]);
    assert_success(&warned);
    let text = stderr(&warned);
    let line = format!(
        "warning: image `app` for {foreign}: /usr/local/bin/tool is an ELF file for {host}, expected {expected}"
    );
    assert!(text.contains(&line), "{text}");
    // One line: the base's own binaries (/bin/busybox) and the script are not flagged.
    assert_eq!(text.matches("is an ELF file").count(), 1, "{text}");

    let strict = sandbox.graphbuild(&["run", "images.kdl", "--strict"]);
    assert_eq!(strict.status.code(), Some(1), "{}", stderr(&strict));
    assert!(
        stderr(&strict).contains(&line.replace("warning:", "error:")),
        "{}",
        stderr(&strict)
    );

    sandbox.write("images.kdl", &build(" strict-arch=#true"));
    let strict_arch = sandbox.graphbuild(&["run", "images.kdl"]);
    assert_eq!(
        strict_arch.status.code(),
        Some(1),
        "{}",
        stderr(&strict_arch)
    );

    // The host's own platform: nothing to say.
    sandbox.write(
        "images.kdl",
        &build("").replace(foreign, &format!("linux/{host}")),
    );
    let native = sandbox.graphbuild(&["run", "images.kdl", "--strict"]);
    assert_success(&native);
    assert!(!stderr(&native).contains("ELF file"), "{}", stderr(&native));
}

#[test]
fn the_load_archive_is_both_an_oci_and_a_docker_archive() {
    require_root();
    require_tool("skopeo");
    let sandbox = sandbox();
    let output = sandbox.graphbuild(&["run", "images.kdl", "--output", "out"]);
    assert_success(&output);
    let layout =
        graphbuild_engine::oci::OciLayout::open(&sandbox.path().join("out/app")).expect("layout");
    let images = graphbuild_engine::exporter::platform_images(&layout).expect("platforms");
    let arm64 = images
        .iter()
        .find(|image| image.platform.architecture == "arm64")
        .expect("arm64");
    let archive = sandbox.path().join("load.tar");
    graphbuild_engine::exporter::export_platform_archive(
        &layout,
        arm64,
        &["example.com/outputs-test:1.0".to_string()],
        &archive,
    )
    .expect("archive");
    for transport in ["oci-archive", "docker-archive"] {
        let inspected = Command::new("skopeo")
            .args(["inspect", "--format", "{{.Architecture}}"])
            .arg(format!("{transport}:{}", archive.display()))
            .output()
            .expect("skopeo runs");
        assert!(
            inspected.status.success(),
            "{transport}: {}",
            stderr(&inspected)
        );
        assert_eq!(stdout(&inspected).trim(), "arm64", "{transport}");
    }
}
