//! Every example under `examples/` built for real, offline, and every ```` ```kdl ```` snippet of
//! `docs/*.md` planned.
//!
//! Examples are discovered: any folder of `examples/` with an `images.kdl` is built for all of
//! its platforms in one sandbox laid out like the repository (so `oci:../../tests/fixtures/…`
//! resolves), with one store shared by the whole run. Each build is checked generically (every
//! image's index lists the platforms the plan promised, every platform has a manifest and a
//! config) and, for the examples we know, by what the example is about: file contents per
//! platform unpacked with skopeo + umoci, config values read from the layout's config blobs.
//! A new example is covered by the generic checks the moment it exists.
//!
//! The stdlib examples for Go, Python and Rust need toolchain images from a registry, which an
//! offline test cannot pull: they are planned instead (with the fixture standing in for the
//! toolchain image), and their READMEs say so.
//!
//! Doc snippets: a block whose first line is `// examples/NAME/images.kdl` must be exactly that
//! file (it is built above); any other block is written to `<tmp>/examples/snippet/images.kdl`
//! and must pass `graphbuild plan`. The test is offline, so registry references in snippets are
//! swapped for the fixture: a `from "REF"` is rewritten to the fixture's path, and an `arg BASE`
//! or `arg …_IMAGE` whose default is a registry reference is overridden with
//! `--arg NAME=oci:…`. Everything else in the snippet is planned as written.

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const FIXTURE_ARG: &str = "oci:../../tests/fixtures/busybox:1.35.0";

/// Examples that need a toolchain image from a registry: (example, the arg naming that image).
const PLAN_ONLY: [(&str, &str); 3] = [
    ("stdlib-go", "GO_IMAGE"),
    ("stdlib-python", "PYTHON_IMAGE"),
    ("stdlib-rust", "RUST_IMAGE"),
];

/// (platform, `uname -m` there, TARGETARCH+TARGETVARIANT)
const PLATFORMS: [(&str, &str, &str); 3] = [
    ("linux/amd64", "x86_64", "amd64"),
    ("linux/arm64", "aarch64", "arm64"),
    ("linux/arm/v7", "armv7l", "armv7"),
];

fn example_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(repo_root().join("examples"))
        .expect("examples/ exists")
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            path.join("images.kdl")
                .is_file()
                .then(|| path.file_name()?.to_str().map(str::to_string))?
        })
        .collect();
    names.sort();
    names
}

fn is_plan_only(name: &str) -> bool {
    PLAN_ONLY.iter().any(|(example, _)| *example == name)
}

/// One built image, from the `image` entry of the run's summary.
struct Built {
    name: String,
    layout: PathBuf,
    tag: String,
    platforms: Vec<String>,
}

fn tag_of(reference: &str) -> String {
    let last = reference.rsplit('/').next().unwrap_or(reference);
    match last.rsplit_once(':') {
        Some((_, tag)) => tag.to_string(),
        None => "latest".to_string(),
    }
}

fn built_images(summary: &serde_json::Value, sandbox: &Sandbox) -> Vec<Built> {
    summary["images"]
        .as_array()
        .expect("summary has images")
        .iter()
        .map(|image| {
            let output = image["output"].as_str().expect("image output");
            let layout = if Path::new(output).is_absolute() {
                PathBuf::from(output)
            } else {
                sandbox.path().join(output)
            };
            let first_tag = image["tags"]
                .as_array()
                .and_then(|tags| tags.first())
                .and_then(|tag| tag.as_str());
            Built {
                name: image["name"].as_str().expect("image name").to_string(),
                layout,
                tag: first_tag
                    .map(tag_of)
                    .unwrap_or_else(|| "latest".to_string()),
                platforms: image["platforms"]
                    .as_array()
                    .expect("image platforms")
                    .iter()
                    .map(|platform| platform["platform"].as_str().expect("platform").to_string())
                    .collect(),
            }
        })
        .collect()
}

fn platform_string(platform: &serde_json::Value) -> String {
    let os = platform["os"].as_str().unwrap_or_default();
    let arch = platform["architecture"].as_str().unwrap_or_default();
    match platform["variant"].as_str() {
        Some(variant) => format!("{os}/{arch}/{variant}"),
        None => format!("{os}/{arch}"),
    }
}

/// The platforms of the index a layout's tag points at, as skopeo reads them.
fn index_platforms(built: &Built) -> Vec<String> {
    let index = skopeo_raw(&format!("oci:{}:{}", built.layout.display(), built.tag));
    assert_eq!(
        index["mediaType"], "application/vnd.oci.image.index.v1+json",
        "{}",
        built.name
    );
    let manifests = index["manifests"].as_array().expect("manifests");
    // Provenance is on by default: one attestation manifest per platform manifest, after them.
    let images: Vec<&serde_json::Value> = manifests
        .iter()
        .filter(|manifest| manifest["platform"]["os"] != "unknown")
        .collect();
    let attested: Vec<&serde_json::Value> = manifests
        .iter()
        .filter(|manifest| manifest["platform"]["os"] == "unknown")
        .map(|manifest| &manifest["annotations"]["vnd.docker.reference.digest"])
        .collect();
    assert_eq!(
        attested,
        images
            .iter()
            .map(|image| &image["digest"])
            .collect::<Vec<_>>(),
        "{}: every platform manifest has its attestation manifest",
        built.name
    );
    images
        .iter()
        .map(|manifest| platform_string(&manifest["platform"]))
        .collect()
}

fn read_blob(layout: &Path, digest: &str) -> serde_json::Value {
    let hex = digest
        .strip_prefix("sha256:")
        .unwrap_or_else(|| panic!("not a sha256 digest: {digest}"));
    let bytes = std::fs::read(layout.join("blobs/sha256").join(hex))
        .unwrap_or_else(|e| panic!("blob {digest}: {e}"));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("blob {digest} is not JSON: {e}"))
}

/// The image config of one platform, read from the layout's blobs (index.json → index →
/// manifest → config).
fn config(built: &Built, platform: &str) -> serde_json::Value {
    let top = read_blob_file(&built.layout.join("index.json"));
    let mut index = top.clone();
    // index.json may point at a nested index (ours does): follow it.
    if let Some(nested) = top["manifests"].as_array().and_then(|manifests| {
        manifests
            .iter()
            .find(|m| m["mediaType"] == "application/vnd.oci.image.index.v1+json")
    }) {
        index = read_blob(&built.layout, nested["digest"].as_str().expect("digest"));
    }
    let manifest = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|manifest| platform_string(&manifest["platform"]) == platform)
        .unwrap_or_else(|| panic!("{}: no manifest for {platform} in {index}", built.name));
    let manifest = read_blob(&built.layout, manifest["digest"].as_str().expect("digest"));
    read_blob(
        &built.layout,
        manifest["config"]["digest"]
            .as_str()
            .expect("config digest"),
    )
}

fn read_blob_file(path: &Path) -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .expect("JSON")
}

fn env_of(config: &serde_json::Value) -> BTreeMap<String, String> {
    config["config"]["Env"]
        .as_array()
        .map(|env| {
            env.iter()
                .filter_map(|pair| {
                    pair.as_str()?
                        .split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                })
                .collect()
        })
        .unwrap_or_default()
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

/// Unpacks layouts on demand, once per (layout, platform).
struct Unpacker<'a> {
    sandbox: &'a Sandbox,
    done: BTreeMap<(PathBuf, String), PathBuf>,
}

impl Unpacker<'_> {
    fn rootfs(&mut self, built: &Built, platform: &str) -> PathBuf {
        self.rootfs_of(&built.layout, &built.tag, platform)
    }

    fn rootfs_of(&mut self, layout: &Path, tag: &str, platform: &str) -> PathBuf {
        let key = (layout.to_path_buf(), platform.to_string());
        if let Some(rootfs) = self.done.get(&key) {
            return rootfs.clone();
        }
        let into = self
            .sandbox
            .path()
            .join("unpacked")
            .join(format!("{}", self.done.len()));
        let rootfs = unpack_platform(layout, tag, platform, &into);
        self.done.insert(key, rootfs.clone());
        rootfs
    }

    /// The fixture's own filesystem for a platform, to compare binaries with.
    fn fixture(&mut self, platform: &str) -> PathBuf {
        let layout = self.sandbox.path().join("tests/fixtures/busybox");
        self.rootfs_of(&layout, "1.35.0", platform)
    }
}

#[track_caller]
fn read(rootfs: &Path, path: &str) -> String {
    std::fs::read_to_string(rootfs.join(path))
        .unwrap_or_else(|e| panic!("{} {path}: {e}", rootfs.display()))
}

fn mode_and_owner(rootfs: &Path, path: &str) -> (u32, u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let metadata =
        std::fs::symlink_metadata(rootfs.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    (metadata.mode() & 0o7777, metadata.uid(), metadata.gid())
}

fn find<'a>(images: &'a [Built], name: &str) -> &'a Built {
    images
        .iter()
        .find(|image| image.name == name)
        .unwrap_or_else(|| {
            panic!(
                "no image {name}; built: {:?}",
                images.iter().map(|image| &image.name).collect::<Vec<_>>()
            )
        })
}

fn host_uname() -> String {
    let output = std::process::Command::new("uname")
        .arg("-m")
        .output()
        .expect("uname runs");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// `graphbuild plan FILE --format json` in the sandbox.
fn plan_json(sandbox: &Sandbox, file: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["plan", file, "--format", "json"];
    args.extend_from_slice(extra);
    let output = sandbox.graphbuild(&args);
    assert_success(&output);
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("plan of {file} is not JSON: {e}\n{}", stdout(&output)))
}

/// The per-example checks: what each example is about.
fn check_example(name: &str, images: &[Built], unpacker: &mut Unpacker) {
    match name {
        "attestations" => {
            let image = find(images, "attested");
            let index = skopeo_raw(&format!("oci:{}:{}", image.layout.display(), image.tag));
            let manifests = index["manifests"].as_array().expect("manifests");
            assert_eq!(manifests.len(), 4);
            for (position, platform) in ["linux/amd64", "linux/arm64"].iter().enumerate() {
                let attestation = &manifests[position + 2];
                assert_eq!(
                    attestation["annotations"]["vnd.docker.reference.digest"],
                    manifests[position]["digest"]
                );
                let manifest = read_blob(&image.layout, attestation["digest"].as_str().unwrap());
                let statements: Vec<serde_json::Value> = manifest["layers"]
                    .as_array()
                    .expect("layers")
                    .iter()
                    .map(|layer| read_blob(&image.layout, layer["digest"].as_str().unwrap()))
                    .collect();
                assert_eq!(statements.len(), 2, "{platform}: provenance and SBOM");
                let provenance = &statements[0]["predicate"]["buildDefinition"];
                assert_eq!(
                    provenance["internalParameters"]["provenanceMode"], "max",
                    "{platform}: the image's provenance=\"max\""
                );
                let purls: Vec<&str> = statements[1]["predicate"]["packages"]
                    .as_array()
                    .expect("packages")
                    .iter()
                    .filter_map(|package| package["externalRefs"][0]["referenceLocator"].as_str())
                    .collect();
                assert_eq!(
                    purls,
                    [
                        "pkg:deb/debian/base-files@12.4%2Bdeb12u5?arch=all&distro=debian-12",
                        "pkg:deb/debian/ca-certificates@20230311?arch=all&distro=debian-12",
                        "pkg:pypi/six@1.16.0",
                    ],
                    "{platform}"
                );
            }
        }
        "basic" => {
            let image = find(images, "basic");
            for (platform, uname, _) in PLATFORMS {
                let rootfs = unpacker.rootfs(image, platform);
                assert_eq!(read(&rootfs, "app/arch.txt").trim(), uname, "{platform}");
                assert_eq!(
                    read(&rootfs, "app/combined.txt"),
                    "graphbuild example\nhello from graphbuild\n"
                );
            }
        }
        "multi-stage" => {
            let image = find(images, "multi-stage");
            for (platform, _, _) in PLATFORMS {
                let rootfs = unpacker.rootfs(image, platform);
                let greet = read(&rootfs, "usr/local/bin/greet");
                assert!(
                    greet.contains("# greet 1.4.2: says hello"),
                    "the version was rendered in: {greet}"
                );
                assert_eq!(mode_and_owner(&rootfs, "usr/local/bin/greet").0, 0o755);
                assert_eq!(
                    read(&rootfs, "usr/share/doc/greet/test-report.txt"),
                    "ok 1 - greets by name\nok 2 - checksum matches\n",
                    "{platform}"
                );
                assert!(
                    !rootfs.join("opt/toolchain").exists(),
                    "the toolchain stays in the build stages"
                );
                assert!(
                    !rootfs.join("src").exists(),
                    "the sources stay in the build stages"
                );
                let config = config(image, platform);
                assert_eq!(
                    strings(&config["config"]["Entrypoint"]),
                    ["/usr/local/bin/greet"]
                );
                assert_eq!(strings(&config["config"]["Cmd"]), ["world"]);
                assert_eq!(
                    config["config"]["Labels"]["org.opencontainers.image.version"],
                    "1.4.2"
                );
            }
        }
        "targetarch" => {
            let image = find(images, "targetarch");
            let host = host_uname();
            for (platform, uname, download) in PLATFORMS {
                let rootfs = unpacker.rootfs(image, platform);
                let expected = std::fs::read(
                    repo_root().join(format!("examples/targetarch/downloads/tool-{download}")),
                )
                .expect("download");
                assert_eq!(
                    std::fs::read(rootfs.join("usr/local/bin/tool")).expect("tool"),
                    expected,
                    "{platform}"
                );
                assert_eq!(
                    read(&rootfs, "usr/share/tool/version"),
                    format!("tool 2.1.0 ({download} build) running on {uname}\n"),
                    "the runtime step ran the tool on the target CPU"
                );
                assert_eq!(
                    read(&rootfs, "usr/share/tool/fetched-on").trim(),
                    host,
                    "fetch runs natively for {platform}"
                );
            }
        }
        "when-platform" => {
            let image = find(images, "when-platform");
            for (platform, expected, arm64, armv7) in [
                (
                    "linux/amd64",
                    "workers=4 profile=default arch=amd64",
                    false,
                    false,
                ),
                (
                    "linux/arm64",
                    "workers=4 profile=default arch=arm64",
                    true,
                    false,
                ),
                (
                    "linux/arm/v7",
                    "workers=1 profile=small arch=arm",
                    false,
                    true,
                ),
            ] {
                let rootfs = unpacker.rootfs(image, platform);
                assert_eq!(
                    read(&rootfs, "etc/app/app.conf").trim(),
                    expected,
                    "{platform}"
                );
                assert_eq!(
                    rootfs.join("etc/app/cpu-features").exists(),
                    arm64,
                    "{platform}"
                );
                assert_eq!(
                    rootfs.join("etc/app/sysctl.conf").exists(),
                    armv7,
                    "{platform}"
                );
                let config = config(image, platform);
                let label = &config["config"]["Labels"]["com.example.tuned-for"];
                assert_eq!(
                    label.as_str() == Some("graviton"),
                    arm64,
                    "{platform}: {label}"
                );
                let env = env_of(&config);
                assert_eq!(
                    env.get("WORKERS").map(String::as_str),
                    Some(if armv7 { "1" } else { "4" }),
                    "{platform}"
                );
            }
        }
        "distroless" => {
            let image = find(images, "distroless");
            for (platform, _, _) in PLATFORMS {
                let rootfs = unpacker.rootfs(image, platform);
                let fixture = unpacker.fixture(platform);
                check_nonroot_runtime(&rootfs, &fixture.join("bin/busybox"), platform);
                let config = config(image, platform);
                assert_eq!(config["config"]["User"], "65532:65532");
                assert_eq!(strings(&config["config"]["Entrypoint"]), ["/app"]);
                assert_eq!(strings(&config["config"]["Cmd"])[0], "httpd");
                assert_eq!(config["config"]["WorkingDir"], "/home/nonroot");
                assert!(
                    config["config"]["ExposedPorts"].get("8080/tcp").is_some(),
                    "{}",
                    config["config"]
                );
                assert!(read(&rootfs, "home/nonroot/index.html").contains("distroless"));
            }
        }
        "matrix" => {
            let names: BTreeSet<&str> = images.iter().map(|image| image.name.as_str()).collect();
            assert_eq!(
                names,
                BTreeSet::from([
                    "greeter-en-debug",
                    "greeter-en-slim",
                    "greeter-fr-debug",
                    "greeter-fr-slim"
                ])
            );
            for image in images {
                let (language, edition) = image.name["greeter-".len()..]
                    .split_once('-')
                    .expect("LANGUAGE-EDITION");
                assert_eq!(image.tag, format!("3.0-{language}-{edition}"));
                assert_eq!(
                    index_platforms(image),
                    ["linux/amd64", "linux/arm64"],
                    "{}",
                    image.name
                );
                let rootfs = unpacker.rootfs(image, "linux/arm64");
                let greeting = if language == "en" {
                    "Hello\n"
                } else {
                    "Bonjour\n"
                };
                assert_eq!(
                    read(&rootfs, "etc/greeter/greeting"),
                    greeting,
                    "{}",
                    image.name
                );
                assert_eq!(read(&rootfs, "etc/greeter/version"), "3.0\n");
                assert_eq!(
                    rootfs.join("etc/greeter/debug.sh").exists(),
                    edition == "debug",
                    "{}",
                    image.name
                );
                assert!(
                    rootfs.join("bin/sh").symlink_metadata().is_ok(),
                    "busybox's applets are still there"
                );
                assert_eq!(
                    rootfs.join("bin/vi").symlink_metadata().is_ok(),
                    edition == "debug",
                    "{}: /bin/vi",
                    image.name
                );
                let env = env_of(&config(image, "linux/amd64"));
                assert_eq!(
                    env.get("GREETER_LANGUAGE").map(String::as_str),
                    Some(language)
                );
                assert_eq!(
                    env.get("GREETER_EDITION").map(String::as_str),
                    Some(edition)
                );
            }
        }
        "stdlib-busybox" => {
            let image = find(images, "toolbox");
            for (platform, _, _) in PLATFORMS {
                let rootfs = unpacker.rootfs(image, platform);
                assert!(read(&rootfs, "app/report.sh").contains("uname -m"));
                assert!(rootfs.join("bin/busybox").exists());
                let config = config(image, platform);
                assert_eq!(
                    strings(&config["config"]["Cmd"]),
                    ["/bin/sh", "-c", "exec sh /app/report.sh"]
                );
                assert_eq!(config["config"]["WorkingDir"], "/app");
            }
        }
        "stdlib-static" => {
            let image = find(images, "server");
            for (platform, _, _) in PLATFORMS {
                let rootfs = unpacker.rootfs(image, platform);
                let fixture = unpacker.fixture(platform);
                check_nonroot_runtime(&rootfs, &fixture.join("bin/busybox"), platform);
                let config = config(image, platform);
                assert_eq!(config["config"]["User"], "65532:65532");
                assert_eq!(strings(&config["config"]["Entrypoint"]), ["/app"]);
                assert_eq!(config["config"]["WorkingDir"], "/home/nonroot");
            }
        }
        "ci-github-actions" => {
            let image = find(images, "ci-demo");
            assert_eq!(image.tag, "dev");
            for (platform, uname, target) in PLATFORMS {
                let rootfs = unpacker.rootfs(image, platform);
                assert_eq!(
                    read(&rootfs, "var/www/build.txt").trim(),
                    format!("dev {target} {uname}")
                );
                assert!(read(&rootfs, "var/www/index.html").contains("merged through the cache"));
                let config = config(image, platform);
                assert_eq!(config["config"]["User"], "65532:65532");
                assert_eq!(
                    config["config"]["Labels"]["org.opencontainers.image.version"],
                    "dev"
                );
            }
        }
        "bake-comparison" => {
            let api = find(images, "api");
            assert_eq!(
                index_platforms(api),
                ["linux/amd64", "linux/arm64", "linux/arm/v7"]
            );
            for (platform, _, _) in PLATFORMS {
                let rootfs = unpacker.rootfs(api, platform);
                assert!(
                    read(&rootfs, "usr/local/bin/server").contains("api 1.0.0 listening"),
                    "{platform}"
                );
                assert!(rootfs.join("var/www").is_dir());
                let config = config(api, platform);
                assert_eq!(config["config"]["User"], "65532:65532");
                assert_eq!(
                    strings(&config["config"]["Entrypoint"]),
                    ["/usr/local/bin/server"]
                );
            }
            for queue in ["email", "reports"] {
                let worker = find(images, &format!("worker-{queue}"));
                assert_eq!(worker.tag, format!("1.0.0-{queue}"));
                assert_eq!(index_platforms(worker), ["linux/amd64", "linux/arm64"]);
                let config = config(worker, "linux/arm64");
                assert_eq!(
                    env_of(&config).get("QUEUE").map(String::as_str),
                    Some(queue)
                );
                assert_eq!(strings(&config["config"]["Cmd"]), ["sh", "/app/worker.sh"]);
                assert!(
                    unpacker
                        .rootfs(worker, "linux/arm64")
                        .join("app/worker.sh")
                        .exists()
                );
            }
        }
        // A new example: the generic checks in the caller cover it.
        _ => {}
    }
}

/// A scratch-based non-root runtime: passwd/group with nonroot 65532, /tmp 1777, the home
/// owned by 65532, the static binary as /app, and no shell.
fn check_nonroot_runtime(rootfs: &Path, binary: &Path, platform: &str) {
    let passwd = read(rootfs, "etc/passwd");
    assert!(
        passwd
            .lines()
            .any(|line| line.starts_with("nonroot:x:65532:65532:")),
        "{platform}: {passwd}"
    );
    assert!(
        read(rootfs, "etc/group")
            .lines()
            .any(|line| line == "nonroot:x:65532:"),
        "{platform}"
    );
    assert_eq!(mode_and_owner(rootfs, "tmp").0, 0o1777, "{platform}: /tmp");
    let (_, uid, gid) = mode_and_owner(rootfs, "home/nonroot");
    assert_eq!(
        (uid, gid),
        (65532, 65532),
        "{platform}: /home/nonroot owner"
    );
    assert_eq!(
        std::fs::read(rootfs.join("app")).expect("/app"),
        std::fs::read(binary).expect("the fixture's busybox"),
        "{platform}: /app is the platform's static binary"
    );
    assert!(
        rootfs.join("bin/sh").symlink_metadata().is_err(),
        "{platform}: no shell in a distroless image"
    );
    assert!(
        rootfs.join("bin").symlink_metadata().is_err(),
        "{platform}: nothing of the builder but its files"
    );
}

#[test]
fn every_example_builds_offline_for_all_its_platforms() {
    let sandbox = Sandbox::new();
    let names = example_names();
    assert!(names.len() >= 10, "examples found: {names:?}");
    for (example, _) in PLAN_ONLY {
        assert!(
            names.iter().any(|name| name == example),
            "plan-only example {example} is missing"
        );
    }
    let mut unpacker = Unpacker {
        sandbox: &sandbox,
        done: BTreeMap::new(),
    };
    for name in names.iter().filter(|name| !is_plan_only(name)) {
        sandbox.example(name);
        let readme =
            std::fs::read_to_string(repo_root().join("examples").join(name).join("README.md"))
                .unwrap_or_else(|e| panic!("examples/{name}/README.md: {e}"));
        assert!(
            readme.contains(&format!("examples/{name}/images.kdl")),
            "examples/{name}/README.md says how to run it"
        );

        let file = format!("examples/{name}/images.kdl");
        // What the plan promises, to compare with what the run wrote.
        let plan = plan_json(&sandbox, &file, &[]);
        let planned: BTreeMap<String, Vec<String>> = plan["images"]
            .as_array()
            .expect("plan images")
            .iter()
            .map(|image| {
                (
                    image["name"].as_str().expect("name").to_string(),
                    strings(&image["platforms"]),
                )
            })
            .collect();
        assert!(!planned.is_empty(), "{name} has images");

        let output = sandbox.graphbuild(&[
            "run",
            &file,
            "--output",
            &format!("out/{name}"),
            "--progress",
            "json",
        ]);
        assert_success(&output);
        let summary = summary(&output);
        assert_eq!(summary["failed"], 0, "{name}: {summary}");
        // Every image test the plan lists ran in this fresh store, and passed.
        let planned_tests = plan["tests"].as_array().map_or(0, Vec::len);
        assert_eq!(
            summary["tests_executed"], planned_tests,
            "{name}: {summary}"
        );
        if name == "image-tests" {
            // 3 tests on three platforms, one on amd64 only.
            assert_eq!(planned_tests, 10, "{name}");
        }
        let images = built_images(&summary, &sandbox);
        let built: BTreeSet<&str> = images.iter().map(|image| image.name.as_str()).collect();
        assert_eq!(
            built,
            planned.keys().map(String::as_str).collect(),
            "{name}: every planned image was written"
        );
        for image in &images {
            let platforms = index_platforms(image);
            assert_eq!(
                platforms, planned[&image.name],
                "{name}/{}: the index lists the planned platforms",
                image.name
            );
            assert_eq!(platforms, image.platforms, "{name}/{}", image.name);
            for platform in &platforms {
                let config = config(image, platform);
                assert_eq!(
                    platform_string(&config),
                    *platform,
                    "{name}/{}: config platform",
                    image.name
                );
            }
        }
        check_example(name, &images, &mut unpacker);
    }
}

#[test]
fn toolchain_examples_plan_for_three_platforms() {
    let sandbox = Sandbox::new();
    for (name, image_arg) in PLAN_ONLY {
        sandbox.example(name);
        let readme =
            std::fs::read_to_string(repo_root().join("examples").join(name).join("README.md"))
                .expect("README");
        assert!(
            readme.contains("does") && readme.contains("plan"),
            "{name}/README.md says it is only planned"
        );
        let plan = plan_json(
            &sandbox,
            &format!("examples/{name}/images.kdl"),
            &["--arg", &format!("{image_arg}={FIXTURE_ARG}")],
        );
        let images = plan["images"].as_array().expect("images");
        assert_eq!(images.len(), 1, "{name}");
        assert_eq!(
            strings(&images[0]["platforms"]),
            ["linux/amd64", "linux/arm64", "linux/arm/v7"],
            "{name}"
        );
        let nodes = plan["nodes"].as_array().expect("nodes");
        let runs_for = |stage_suffix: &str, target: &str| -> String {
            nodes
                .iter()
                .filter(|node| {
                    node["stage"]
                        .as_str()
                        .is_some_and(|stage| stage.ends_with(stage_suffix))
                        && strings(&node["targets"]).iter().any(|t| t == target)
                })
                .flat_map(|node| node["steps"].as_array().cloned().unwrap_or_default())
                .filter_map(|step| step["description"].as_str().map(str::to_string))
                .collect::<Vec<_>>()
                .join("\n")
        };
        match name {
            "stdlib-go" => {
                for (target, goarch, goarm) in [
                    ("linux/amd64", "amd64", ""),
                    ("linux/arm64", "arm64", ""),
                    ("linux/arm/v7", "arm", "7"),
                ] {
                    let steps = runs_for("/build", target);
                    assert!(
                        steps
                            .contains(&format!("GOOS=linux GOARCH={goarch} GOARM=$GOARM go build")),
                        "{target}: {steps}"
                    );
                    assert!(
                        steps.contains("-o /out/hello ./cmd/hello"),
                        "{target}: {steps}"
                    );
                    // The last GOARM the build sees is the platform's.
                    let last_goarm = steps.lines().rfind(|step| step.starts_with("ENV GOARM="));
                    assert_eq!(
                        last_goarm,
                        Some(format!("ENV GOARM={goarm}").as_str()),
                        "{target}: {steps}"
                    );
                }
            }
            "stdlib-rust" => {
                for (target, triple) in [
                    ("linux/amd64", "x86_64-unknown-linux-musl"),
                    ("linux/arm64", "aarch64-unknown-linux-musl"),
                    ("linux/arm/v7", "armv7-unknown-linux-musleabihf"),
                ] {
                    let steps = runs_for("/build", target);
                    let last_target = steps
                        .lines()
                        .rfind(|step| step.starts_with("ENV RUST_TARGET="));
                    assert_eq!(
                        last_target,
                        Some(format!("ENV RUST_TARGET={triple}").as_str()),
                        "{target}: {steps}"
                    );
                    assert!(steps.contains("--bin app"), "{target}: {steps}");
                }
            }
            "stdlib-python" => {
                for (target, _, _) in PLATFORMS {
                    let wheels = runs_for("/wheels", target);
                    assert!(
                        wheels.contains("pip wheel --wheel-dir /wheels -r requirements.txt"),
                        "{target}: {wheels}"
                    );
                    let runtime = runs_for("/runtime", target);
                    assert!(
                        runtime.contains("pip install --no-cache-dir --no-index"),
                        "{target}: {runtime}"
                    );
                }
                // Wheels are per CPU: the wheels stage is not shared between targets.
                let wheel_nodes = nodes.iter().filter(|node| {
                    node["stage"]
                        .as_str()
                        .is_some_and(|s| s.ends_with("/wheels"))
                });
                assert_eq!(wheel_nodes.count(), 3);
            }
            other => panic!("no plan check for {other}"),
        }
    }
}

#[test]
fn the_ci_example_splits_by_platform_and_merges_through_one_store() {
    let sandbox = Sandbox::new();
    sandbox.example("ci-github-actions");
    let file = "examples/ci-github-actions/images.kdl";

    // The workflow's build matrix covers exactly the image's platforms.
    let workflow =
        std::fs::read_to_string(repo_root().join("examples/ci-github-actions/images.yml"))
            .expect("workflow");
    let matrix: Vec<String> = workflow
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- platform: "))
        .map(|platform| platform.trim().to_string())
        .collect();
    let plan = plan_json(&sandbox, file, &[]);
    assert_eq!(
        matrix,
        strings(&plan["images"][0]["platforms"]),
        "the workflow matrix matches images.kdl"
    );
    assert!(workflow.contains(&format!("BUILD_FILE: {file}")));

    // One job per platform into the same store (the cache server's role), then the merge.
    let store = sandbox.store();
    for (platform, _, _) in PLATFORMS {
        let job = sandbox.graphbuild_with_store(
            &store,
            &[
                "run",
                file,
                "--platform",
                platform,
                "--output",
                &format!("job-{}", platform.replace('/', "-")),
                "--progress",
                "json",
            ],
        );
        assert_success(&job);
        assert!(summary(&job)["executed"].as_u64().unwrap_or(0) > 0);
    }
    let merge = sandbox.graphbuild_with_store(
        &store,
        &["run", file, "--output", "merged", "--progress", "json"],
    );
    assert_success(&merge);
    let merged = summary(&merge);
    assert_eq!(merged["executed"], 0, "the merge builds nothing: {merged}");
    let image = &built_images(&merged, &sandbox)[0];
    assert_eq!(
        index_platforms(image),
        ["linux/amd64", "linux/arm64", "linux/arm/v7"]
    );

    // Byte-identical to one build on one machine from an empty store.
    let single = sandbox.graphbuild_with_store(
        &sandbox.path().join("store-single"),
        &["run", file, "--output", "single", "--progress", "json"],
    );
    assert_success(&single);
    assert_eq!(
        summary(&single)["images"][0]["index_digest"],
        merged["images"][0]["index_digest"]
    );
}

/// The merge machine of the CI recipe has no emulators: every step is cached, so none is needed.
#[test]

fn a_cached_merge_needs_no_emulators() {
    let sandbox = Sandbox::new();
    sandbox.example("ci-github-actions");
    let file = "examples/ci-github-actions/images.kdl";
    assert_success(&sandbox.graphbuild(&["run", file, "--output", "warm", "--progress", "plain"]));
    let no_binfmt = sandbox.path().join("empty-binfmt");
    std::fs::create_dir_all(&no_binfmt).expect("mkdir");
    let merge = std::process::Command::new(bin())
        .args(["run", file, "--output", "merged", "--progress", "json"])
        .current_dir(sandbox.path())
        .env("GRAPHBUILD_CACHE_DIR", sandbox.store())
        .env("GRAPHBUILD_BINFMT_DIR", &no_binfmt)
        .output()
        .expect("graphbuild runs");
    assert_success(&merge);
    assert_eq!(summary(&merge)["executed"], 0);
}

/// Every ```kdl block of a markdown file, with the line it starts on.
fn kdl_blocks(markdown: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (number, line) in markdown.lines().enumerate() {
        match current.as_mut() {
            None if line.trim_start().starts_with("```kdl") => {
                current = Some((number + 1, String::new()))
            }
            None => {}
            Some(_) if line.trim_start().starts_with("```") => blocks.extend(current.take()),
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    assert!(current.is_none(), "an unterminated ```kdl block");
    blocks
}

fn looks_like_registry_reference(value: &str) -> bool {
    !value.starts_with("oci:")
        && !value.starts_with('$')
        && !value.contains("://")
        && value != "scratch"
        && (value.contains('/')
            || value.contains(':')
            || value.contains('.')
            || value.contains('@'))
}

/// The snippet with every `from "REGISTRY-REF"` replaced by the fixture.
fn offline(snippet: &str) -> String {
    snippet
        .lines()
        .map(|line| {
            let trimmed = line.trim_start();
            let reference = trimmed
                .strip_prefix("from \"")
                .and_then(|rest| rest.split_once('"'))
                .map(|(value, _)| value);
            match reference {
                Some(reference) if looks_like_registry_reference(reference) => line.replacen(
                    &format!("\"{reference}\""),
                    &format!("\"{FIXTURE_ARG}\""),
                    1,
                ),
                _ => line.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// `arg NAME="REF"` declarations whose default is a registry reference (not a fixture path).
fn registry_args(snippet: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in snippet
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with("arg "))
    {
        for part in line["arg ".len()..].split_whitespace() {
            if let Some((name, value)) = part.split_once('=') {
                let value = value.trim_matches('"');
                if looks_like_registry_reference(value)
                    && (name == "BASE" || name.ends_with("_IMAGE"))
                {
                    names.push(name.to_string());
                }
            }
        }
    }
    names
}

#[test]
fn every_kdl_snippet_in_docs_plans() {
    let sandbox = Sandbox::new();
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo_root().join("docs"))
        .expect("docs/")
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.extension().is_some_and(|ext| ext == "md") && !path.ends_with("language.md")
        })
        .collect();
    docs.sort();
    docs.push(repo_root().join("README.md"));
    let mut checked = 0;
    for doc in &docs {
        let markdown = std::fs::read_to_string(doc).expect("read doc");
        let doc_name = doc
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        for (line, snippet) in kdl_blocks(&markdown) {
            let first = snippet.lines().next().unwrap_or_default();
            let file = match first
                .strip_prefix("// examples/")
                .and_then(|rest| rest.split_once("/images.kdl"))
            {
                Some((example, _)) => {
                    // A copy of an example, which the example test builds: it must be exact.
                    let source = std::fs::read_to_string(
                        repo_root()
                            .join("examples")
                            .join(example)
                            .join("images.kdl"),
                    )
                    .unwrap_or_else(|e| panic!("{doc_name}:{line} names examples/{example}: {e}"));
                    assert_eq!(
                        snippet, source,
                        "{doc_name}:{line} must be exactly examples/{example}/images.kdl"
                    );
                    sandbox.example(example);
                    format!("examples/{example}/images.kdl")
                }
                None => {
                    sandbox.write("examples/snippet/images.kdl", &offline(&snippet));
                    "examples/snippet/images.kdl".to_string()
                }
            };
            let overrides: Vec<String> = registry_args(&snippet)
                .into_iter()
                .map(|name| format!("{name}={FIXTURE_ARG}"))
                .collect();
            let mut args = vec!["plan", file.as_str(), "--format", "json"];
            for value in &overrides {
                args.push("--arg");
                args.push(value);
            }
            let output = sandbox.graphbuild(&args);
            assert!(
                output.status.success(),
                "{doc_name}:{line}: graphbuild plan failed\n--- snippet\n{snippet}\n--- stderr\n{}",
                stderr(&output)
            );
            assert!(
                stderr(&output).to_lowercase().find("warning").is_none(),
                "{doc_name}:{line}: {}",
                stderr(&output)
            );
            checked += 1;
        }
    }
    assert!(checked >= 4, "only {checked} kdl snippets found in docs/");
}
