//! `graphbuild` against a real registry, end to end: Debian's `docker-registry` (the CNCF
//! distribution registry) is started by each test on 127.0.0.1 on a free port, plain or with
//! an htpasswd file, and the busybox fixture is copied into it with skopeo. The real binary
//! then builds from the registry base for three platforms (foreign CPUs through qemu-user),
//! pushes, locks and fails; skopeo and umoci check the results independently, and the
//! registry's access log shows what was (not) uploaded.
//!
//! The tests need `docker-registry`, `skopeo` and `umoci`: they fail with a clear message when
//! one is missing, they never pass silently.

mod common;

use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const USERNAME: &str = "graphbuild-tester";
const PASSWORD: &str = "s3cret-pass";
/// bcrypt (cost 5) of PASSWORD: `docker-registry` accepts only bcrypt in htpasswd files.
const PASSWORD_BCRYPT: &str = "$2b$05$abcdefghijklmnopqrstuuV7fpPozvyqJfnY19y0802WTlXUm6Rjy";
const WRONG_PASSWORD: &str = "wrong-pass-7f3a9";

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

const THREE_PLATFORMS: [&str; 3] = ["linux/amd64", "linux/arm64", "linux/arm/v7"];

/// What `uname -m` prints on each platform.
fn machine(platform: &str) -> &'static str {
    match platform {
        "linux/amd64" => "x86_64",
        "linux/arm64" => "aarch64",
        "linux/arm/v7" => "armv7l",
        other => panic!("no uname for {other}"),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// A `docker-registry` process on 127.0.0.1, killed on drop. Its access log (stdout) is kept
/// in a file so tests can see which requests graphbuild made.
struct LocalRegistry {
    child: Child,
    address: String,
    port: u16,
    dir: tempfile::TempDir,
    with_auth: bool,
}

impl LocalRegistry {
    fn start(with_auth: bool) -> LocalRegistry {
        LocalRegistry::start_on("127.0.0.1", with_auth)
    }

    /// Start listening on `address` (an IPv4 address of this machine).
    fn start_on(address: &str, with_auth: bool) -> LocalRegistry {
        require_tool("docker-registry");
        let dir = tempfile::Builder::new()
            .prefix("graphbuild-registry-")
            .tempdir()
            .expect("temp dir");
        let port = free_port();
        let storage = dir.path().join("storage");
        std::fs::create_dir(&storage).expect("storage dir");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {address}:{port}\n",
            storage.display()
        );
        if with_auth {
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, format!("{USERNAME}:{PASSWORD_BCRYPT}\n")).expect("htpasswd");
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: basic-realm\n    path: {}\n",
                htpasswd.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).expect("registry config");
        let access = std::fs::File::create(dir.path().join("access.log")).expect("access log");
        let errors = std::fs::File::create(dir.path().join("registry.log")).expect("log file");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(access)
            .stderr(errors)
            .spawn()
            .expect("docker-registry starts");
        let mut registry = LocalRegistry {
            child,
            address: address.to_string(),
            port,
            dir,
            with_auth,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect((address, port)).is_err() {
            if let Ok(Some(status)) = registry.child.try_wait() {
                let log = std::fs::read_to_string(registry.dir.path().join("registry.log"))
                    .unwrap_or_default();
                panic!("docker-registry exited with {status}: {log}");
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen on port {port} within 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    fn host(&self) -> String {
        format!("{}:{}", self.address, self.port)
    }

    fn creds(&self) -> Option<String> {
        self.with_auth.then(|| format!("{USERNAME}:{PASSWORD}"))
    }

    /// Copy the three-platform busybox fixture to `busybox:1.35.0` with skopeo.
    fn seed_busybox(&self) {
        let fixture = repo_root().join("tests/fixtures/busybox");
        self.skopeo_copy_to(
            &format!("oci:{}:1.35.0", fixture.display()),
            "busybox:1.35.0",
        );
    }

    /// `skopeo copy --all SOURCE docker://HOST/DESTINATION`.
    fn skopeo_copy_to(&self, source: &str, destination: &str) {
        require_tool("skopeo");
        let mut command = Command::new("skopeo");
        command.args([
            "copy",
            "--all",
            "--quiet",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ]);
        match self.creds() {
            Some(creds) => command.args(["--dest-creds", &creds]),
            None => command.arg("--dest-no-creds"),
        };
        let output = command
            .arg(source)
            .arg(format!("docker://{}/{destination}", self.host()))
            .output()
            .expect("skopeo runs");
        assert!(
            output.status.success(),
            "skopeo copy {source} → {destination}: {}",
            stderr(&output)
        );
    }

    /// The access log's lines for requests graphbuild made (its User-Agent).
    fn graphbuild_requests(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains("\"graphbuild/"))
            .map(str::to_string)
            .collect()
    }

    /// How many blob uploads (and mounts) graphbuild started.
    fn graphbuild_uploads(&self) -> usize {
        self.graphbuild_requests()
            .iter()
            .filter(|line| line.contains("POST /v2/") && line.contains("/blobs/uploads/"))
            .count()
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run the binary in the sandbox like `Sandbox::graphbuild`, with `DOCKER_CONFIG` set (an
/// empty directory unless credentials are wanted, so the machine's own login never leaks in).
fn graphbuild(sandbox: &Sandbox, store: &Path, docker_config: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .current_dir(sandbox.path())
        .env("GRAPHBUILD_CACHE_DIR", store)
        .env("DOCKER_CONFIG", docker_config)
        .env("NO_COLOR", "1")
        // Wide diagnostics, so that messages wrap as little as possible.
        .env("COLUMNS", "160")
        .env_remove("SOURCE_DATE_EPOCH")
        .output()
        .expect("graphbuild runs")
}

/// A diagnostic's text on one line: miette's wrapping and gutter (`│`, `·`) removed.
fn flat(text: &str) -> String {
    text.split_whitespace()
        .filter(|word| !matches!(*word, "│" | "·"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A directory holding a Docker `config.json` with `user:password` for `host`.
fn docker_config_with(dir: &Path, host: &str, user: &str, password: &str) -> PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    let auth = base64(format!("{user}:{password}").as_bytes());
    let config = serde_json::json!({ "auths": { host: { "auth": auth } } });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&config).expect("json"),
    )
    .expect("config.json");
    dir.to_path_buf()
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = String::new();
    for chunk in bytes.chunks(3) {
        let value = (u32::from(chunk[0]) << 16)
            | (u32::from(chunk.get(1).copied().unwrap_or(0)) << 8)
            | u32::from(chunk.get(2).copied().unwrap_or(0));
        for position in 0..4 {
            if position <= chunk.len() {
                text.push(char::from(
                    ALPHABET[(value >> (18 - 6 * position)) as usize & 63],
                ));
            } else {
                text.push('=');
            }
        }
    }
    text
}

/// The sha256 of bytes, with an independent tool.
fn sha256(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(bytes)
        .expect("write");
    let output = child.wait_with_output().expect("sha256sum runs");
    let hex = String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .expect("a hash")
        .to_string();
    format!("sha256:{hex}")
}

/// `skopeo inspect --raw` of a registry reference: the exact bytes the registry serves.
fn remote_raw(reference: &str, creds: Option<&str>) -> Vec<u8> {
    require_tool("skopeo");
    let mut command = Command::new("skopeo");
    command.args(["inspect", "--raw", "--tls-verify=false"]);
    match creds {
        Some(creds) => command.args(["--creds", creds]),
        None => command.arg("--no-creds"),
    };
    let output = command
        .arg(format!("docker://{reference}"))
        .output()
        .expect("skopeo runs");
    assert!(
        output.status.success(),
        "skopeo inspect {reference}: {}",
        stderr(&output)
    );
    output.stdout
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).expect("JSON")
}

/// The platforms of an index, as Docker spells them, in index order (attestation manifests,
/// listed as `unknown/unknown`, are not platforms).
fn platforms_of(index: &serde_json::Value) -> Vec<String> {
    index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .filter(|manifest| manifest["platform"]["os"] != "unknown")
        .map(|manifest| {
            let platform = &manifest["platform"];
            let os = platform["os"].as_str().expect("os");
            let architecture = platform["architecture"].as_str().expect("architecture");
            match platform["variant"].as_str() {
                Some(variant) => format!("{os}/{architecture}/{variant}"),
                None => format!("{os}/{architecture}"),
            }
        })
        .collect()
}

/// For each attestation manifest of an index, the manifest digest it is about.
fn attested_digests(index: &serde_json::Value) -> Vec<String> {
    index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .filter(|manifest| {
            manifest["annotations"]["vnd.docker.reference.type"] == "attestation-manifest"
        })
        .map(|manifest| {
            assert_eq!(manifest["platform"]["os"], "unknown", "{manifest}");
            manifest["annotations"]["vnd.docker.reference.digest"]
                .as_str()
                .expect("reference digest")
                .to_string()
        })
        .collect()
}

fn manifest_digests(index: &serde_json::Value) -> Vec<String> {
    index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|manifest| manifest["digest"].as_str().expect("digest").to_string())
        .collect()
}

fn sorted(mut items: Vec<String>) -> Vec<String> {
    items.sort();
    items
}

/// The digest of the image index a layout's `index.json` points at for `tag`.
fn layout_index_digest(layout: &Path, tag: &str) -> String {
    let index = json(&std::fs::read(layout.join("index.json")).expect("index.json"));
    let entry = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|entry| entry["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("{} has no tag {tag}: {index}", layout.display()));
    entry["digest"].as_str().expect("digest").to_string()
}

fn layout_blob(layout: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    std::fs::read(layout.join("blobs/sha256").join(hex))
        .unwrap_or_else(|e| panic!("blob {digest}: {e}"))
}

/// A build file: one stage on `base` recording the CPU its step ran on, one image with `tags`.
fn build_file(base: &str, platforms: &[&str], tags: &[String]) -> String {
    let quoted = |items: Vec<&str>| {
        items
            .iter()
            .map(|item| format!("\"{item}\""))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let tags = if tags.is_empty() {
        String::new()
    } else {
        format!(
            "    tags {}\n",
            quoted(tags.iter().map(String::as_str).collect())
        )
    };
    format!(
        "platforms {}\n\nstage app {{\n    from \"{base}\"\n    run \"uname -m > /arch.txt\"\n}}\n\nimage app {{\n    stage app\n{tags}}}\n",
        quoted(platforms.to_vec()),
    )
}

fn index_digest_of(output: &Output) -> String {
    summary(output)["images"][0]["index_digest"]
        .as_str()
        .expect("index digest")
        .to_string()
}

/// Whether `needle` occurs in any regular file under `root` (symlinks are not followed: the
/// store's snapshots hold root filesystems with absolute links).
fn tree_contains(root: &Path, needle: &str) -> bool {
    let mut stack = vec![root.to_path_buf()];
    let mut files = 0;
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("entry").path();
            let metadata = std::fs::symlink_metadata(&path).expect("metadata");
            if metadata.is_dir() {
                stack.push(path);
            } else if metadata.is_file() {
                files += 1;
                let bytes =
                    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                if bytes
                    .windows(needle.len())
                    .any(|window| window == needle.as_bytes())
                {
                    return true;
                }
            }
        }
    }
    assert!(files > 0, "{} holds no file", root.display());
    false
}

#[test]
fn pushes_a_three_platform_index_that_pulls_back_with_the_same_digests() {
    let registry = LocalRegistry::start(false);
    registry.seed_busybox();
    let host = registry.host();
    let sandbox = Sandbox::new();
    let no_login = sandbox.path().join("docker-empty");
    std::fs::create_dir_all(&no_login).expect("mkdir");
    let tags = [
        format!("{host}/team/app:1.0"),
        format!("{host}/team/app:latest"),
        format!("{host}/mirror/app:1.0"),
    ];
    sandbox.write(
        "app/images.kdl",
        &build_file(&format!("{host}/busybox:1.35.0"), &THREE_PLATFORMS, &tags),
    );
    let args = [
        "run",
        "app/images.kdl",
        "--output",
        "out",
        "--progress",
        "json",
        "--push",
        "--sbom",
    ];

    let first = graphbuild(&sandbox, &sandbox.store(), &no_login, &args);
    assert_success(&first);
    let index_digest = index_digest_of(&first);
    for tag in &tags {
        assert!(
            stderr(&first).contains(&format!("pushed {tag}")),
            "{tag}: {}",
            stderr(&first)
        );
    }
    let layout = sandbox.path().join("out/app");
    assert_eq!(layout_index_digest(&layout, "1.0"), index_digest);
    let local_index = json(&layout_blob(&layout, &index_digest));

    // Every tag serves the very same index bytes: an OCI index with exactly the three platforms.
    for tag in &tags {
        let raw = remote_raw(tag, None);
        assert_eq!(sha256(&raw), index_digest, "{tag}");
        let index = json(&raw);
        assert_eq!(index["mediaType"], OCI_INDEX, "{tag}");
        assert_eq!(
            sorted(platforms_of(&index)),
            sorted(THREE_PLATFORMS.map(String::from).to_vec()),
            "{tag}"
        );
        assert!(
            index["manifests"]
                .as_array()
                .expect("manifests")
                .iter()
                .all(|m| m["mediaType"] == OCI_MANIFEST)
        );
        assert_eq!(
            manifest_digests(&index),
            manifest_digests(&local_index),
            "{tag}"
        );
        // Each platform manifest has its attestation manifest (provenance and SBOM), pushed
        // with its statements: the registry serves them by digest.
        let images: Vec<String> = manifest_digests(&index)[..3].to_vec();
        assert_eq!(attested_digests(&index), images, "{tag}");
        for entry in &index["manifests"].as_array().expect("manifests")[3..] {
            let digest = entry["digest"].as_str().expect("digest");
            let name = tag.rsplit_once(':').expect("tag").0;
            let raw = remote_raw(&format!("{name}@{digest}"), None);
            assert_eq!(sha256(&raw), digest);
            let manifest = json(&raw);
            assert_eq!(manifest["layers"].as_array().expect("layers").len(), 2);
            assert_eq!(
                manifest["subject"]["digest"],
                entry["annotations"]["vnd.docker.reference.digest"]
            );
        }
    }
    // The second repository got its blobs by cross-repository mounts, not uploads.
    assert!(
        registry
            .graphbuild_requests()
            .iter()
            .any(|line| line.contains("POST /v2/mirror/app/blobs/uploads/?")
                && line.contains("mount=")),
        "no mount into mirror/app: {:#?}",
        registry.graphbuild_requests()
    );

    // Pulled back by an independent tool: the same index and manifests, and each platform's
    // filesystem shows its step ran on its own CPU.
    let pulled = sandbox.path().join("pulled");
    let output = Command::new("skopeo")
        .args([
            "copy",
            "--all",
            "--quiet",
            "--preserve-digests",
            "--src-tls-verify=false",
            "--src-no-creds",
        ])
        .arg(format!("docker://{}", tags[0]))
        .arg(format!("oci:{}:1.0", pulled.display()))
        .output()
        .expect("skopeo runs");
    assert!(
        output.status.success(),
        "skopeo copy back: {}",
        stderr(&output)
    );
    assert_eq!(layout_index_digest(&pulled, "1.0"), index_digest);
    let pulled_index = json(&layout_blob(&pulled, &index_digest));
    assert_eq!(
        manifest_digests(&pulled_index),
        manifest_digests(&local_index)
    );
    for digest in manifest_digests(&pulled_index) {
        assert_eq!(sha256(&layout_blob(&pulled, &digest)), digest);
        assert_eq!(layout_blob(&pulled, &digest), layout_blob(&layout, &digest));
    }
    // The attestations came back whole: every statement, byte for byte.
    for digest in &manifest_digests(&pulled_index)[3..] {
        let manifest = json(&layout_blob(&pulled, digest));
        for layer in manifest["layers"].as_array().expect("layers") {
            let statement = layer["digest"].as_str().expect("digest");
            assert_eq!(
                layout_blob(&pulled, statement),
                layout_blob(&layout, statement)
            );
        }
    }
    for platform in THREE_PLATFORMS {
        let rootfs = unpack_platform(
            &pulled,
            "1.0",
            platform,
            &sandbox
                .path()
                .join(format!("unpacked-{}", platform.replace('/', "-"))),
        );
        let arch = std::fs::read_to_string(rootfs.join("arch.txt"))
            .unwrap_or_else(|e| panic!("{platform}: {e}"));
        assert_eq!(arch.trim(), machine(platform), "{platform}");
        assert!(
            rootfs.join("bin/busybox").exists(),
            "{platform}: the base is underneath"
        );
    }

    // A second push uploads nothing: every blob is found with HEAD; the tags are unchanged.
    let uploads_before = registry.graphbuild_uploads();
    assert!(uploads_before > 0);
    let heads_before = registry
        .graphbuild_requests()
        .iter()
        .filter(|line| line.contains("\"HEAD /v2/"))
        .count();
    let second = graphbuild(&sandbox, &sandbox.store(), &no_login, &args);
    assert_success(&second);
    assert_eq!(
        summary(&second)["executed"],
        0,
        "the build itself is cached"
    );
    assert_eq!(index_digest_of(&second), index_digest);
    assert_eq!(
        registry.graphbuild_uploads(),
        uploads_before,
        "the second push started uploads"
    );
    let heads_after = registry
        .graphbuild_requests()
        .iter()
        .filter(|line| line.contains("\"HEAD /v2/"))
        .count();
    assert!(
        heads_after > heads_before,
        "blobs are checked with HEAD before they are skipped"
    );
    for tag in &tags {
        assert_eq!(sha256(&remote_raw(tag, None)), index_digest, "{tag}");
    }
}

#[test]
fn basic_auth_registry_needs_docker_login_and_never_shows_the_password() {
    let registry = LocalRegistry::start(true);
    registry.seed_busybox();
    let host = registry.host();
    let sandbox = Sandbox::new();
    let tag = format!("{host}/secure/app:1.0");
    sandbox.write(
        "app/images.kdl",
        &build_file(
            &format!("{host}/busybox:1.35.0"),
            &THREE_PLATFORMS,
            std::slice::from_ref(&tag),
        ),
    );
    let args = [
        "run",
        "app/images.kdl",
        "--output",
        "out",
        "--progress",
        "plain",
        "--push",
    ];
    let secrets = [
        PASSWORD.to_string(),
        base64(format!("{USERNAME}:{PASSWORD}").as_bytes()),
        WRONG_PASSWORD.to_string(),
        base64(format!("{USERNAME}:{WRONG_PASSWORD}").as_bytes()),
    ];
    let assert_no_secret = |output: &Output, what: &str| {
        let text = format!("{}{}", stdout(output), stderr(output));
        for secret in &secrets {
            assert!(
                !text.contains(secret.as_str()),
                "{what}: a credential appears in the output:\n{text}"
            );
        }
    };

    // No credentials at all.
    let empty = sandbox.path().join("docker-empty");
    std::fs::create_dir_all(&empty).expect("mkdir");
    let anonymous = graphbuild(&sandbox, &sandbox.store(), &empty, &args);
    let message = flat(&stderr(&anonymous));
    assert_eq!(anonymous.status.code(), Some(3), "{message}");
    assert!(message.contains(&host), "names the registry: {message}");
    assert!(
        message.contains(&format!("docker login {host}")),
        "says how to log in: {message}"
    );
    assert_no_secret(&anonymous, "anonymous");

    // Wrong credentials: refused the same way, and the wrong password is not echoed either.
    let wrong = docker_config_with(
        &sandbox.path().join("docker-wrong"),
        &host,
        USERNAME,
        WRONG_PASSWORD,
    );
    let refused = graphbuild(&sandbox, &sandbox.store(), &wrong, &args);
    let message = flat(&stderr(&refused));
    assert_eq!(refused.status.code(), Some(3), "{message}");
    assert!(
        message.contains(&host) && message.contains("docker login"),
        "{message}"
    );
    assert_no_secret(&refused, "wrong password");

    // Logged in: builds from the authenticated base and pushes.
    let login = docker_config_with(
        &sandbox.path().join("docker-login"),
        &host,
        USERNAME,
        PASSWORD,
    );
    let pushed = graphbuild(&sandbox, &sandbox.store(), &login, &args);
    assert_success(&pushed);
    assert_no_secret(&pushed, "logged in");
    let layout = sandbox.path().join("out/app");
    let index_digest = layout_index_digest(&layout, "1.0");
    let raw = remote_raw(&tag, Some(&format!("{USERNAME}:{PASSWORD}")));
    assert_eq!(sha256(&raw), index_digest);
    let index = json(&raw);
    assert_eq!(index["mediaType"], OCI_INDEX);
    assert_eq!(
        sorted(platforms_of(&index)),
        sorted(THREE_PLATFORMS.map(String::from).to_vec())
    );
    // Anonymous readers are still refused: the push really went through authentication.
    let anonymous_read = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false", "--no-creds"])
        .arg(format!("docker://{tag}"))
        .output()
        .expect("skopeo runs");
    assert!(!anonymous_read.status.success());
    // No credential in the store or the output layout.
    for secret in &secrets[..2] {
        assert!(
            !tree_contains(&sandbox.store(), secret),
            "the store holds a credential"
        );
        assert!(
            !tree_contains(&layout, secret),
            "the layout holds a credential"
        );
    }
}

#[test]
fn lock_file_pins_base_digests_until_pull() {
    let registry = LocalRegistry::start(false);
    registry.seed_busybox();
    let host = registry.host();
    let sandbox = Sandbox::new();
    let no_login = sandbox.path().join("docker-empty");
    std::fs::create_dir_all(&no_login).expect("mkdir");
    let base = format!("{host}/busybox:1.35.0");
    let platforms = ["linux/amd64", "linux/arm64"];
    sandbox.write(
        "app/images.kdl",
        &build_file(&base, &platforms, &[format!("{host}/locked/app:1.0")]),
    );
    let lock_path = sandbox.path().join("app/graphbuild.lock");
    let read_lock = || json(&std::fs::read(&lock_path).expect("graphbuild.lock"));
    let locked_digests = |lock: &serde_json::Value| -> Vec<(String, String)> {
        lock["bases"]
            .as_array()
            .expect("bases")
            .iter()
            .map(|entry| {
                assert_eq!(entry["reference"], base.as_str(), "{lock}");
                (
                    entry["platform"].as_str().expect("platform").to_string(),
                    entry["digest"].as_str().expect("digest").to_string(),
                )
            })
            .collect()
    };

    // `graphbuild lock` records the fixture's manifest per platform.
    let lock = graphbuild(
        &sandbox,
        &sandbox.store(),
        &no_login,
        &["lock", "app/images.kdl"],
    );
    assert_success(&lock);
    let fixture_index = remote_raw(&base, None);
    let fixture_index = json(&fixture_index);
    let fixture_manifest = |platform: &str| {
        let position = platforms_of(&fixture_index)
            .iter()
            .position(|p| p == platform)
            .expect("fixture platform");
        manifest_digests(&fixture_index)[position].clone()
    };
    let first_lock = read_lock();
    assert_eq!(first_lock["version"], 1);
    let expected: Vec<(String, String)> = platforms
        .iter()
        .map(|platform| (platform.to_string(), fixture_manifest(platform)))
        .collect();
    assert_eq!(
        sorted_pairs(locked_digests(&first_lock)),
        sorted_pairs(expected)
    );
    let lock_bytes = std::fs::read(&lock_path).expect("lock");

    let args = [
        "run",
        "app/images.kdl",
        "--output",
        "out",
        "--progress",
        "json",
    ];
    let built = graphbuild(&sandbox, &sandbox.store(), &no_login, &args);
    assert_success(&built);
    let pinned_digest = index_digest_of(&built);

    // Move the tag: our built image (another image, with an extra layer) becomes busybox:1.35.0.
    registry.skopeo_copy_to(
        &format!("oci:{}:1.0", sandbox.path().join("out/app").display()),
        "busybox:1.35.0",
    );
    let moved = json(&remote_raw(&base, None));
    let moved_manifests: Vec<(String, String)> = platforms_of(&moved)
        .into_iter()
        .zip(manifest_digests(&moved))
        .collect();
    assert_ne!(
        sorted_pairs(moved_manifests.clone()),
        sorted_pairs(locked_digests(&first_lock))
    );

    // With the lock, a fresh store still builds from the locked digests: same image.
    let fresh_store = sandbox.path().join("store-fresh");
    let locked = graphbuild(&sandbox, &fresh_store, &no_login, &args);
    assert_success(&locked);
    assert!(
        summary(&locked)["executed"].as_u64().unwrap_or(0) > 0,
        "a fresh store builds"
    );
    assert_eq!(
        index_digest_of(&locked),
        pinned_digest,
        "the lock pins the base"
    );
    assert_eq!(
        std::fs::read(&lock_path).expect("lock"),
        lock_bytes,
        "run without --pull leaves the lock alone"
    );

    // --pull resolves the tag afresh, builds on the new base and rewrites the lock.
    let pulled = graphbuild(
        &sandbox,
        &fresh_store,
        &no_login,
        &[
            "run",
            "app/images.kdl",
            "--output",
            "out",
            "--progress",
            "json",
            "--pull",
        ],
    );
    assert_success(&pulled);
    assert_ne!(
        index_digest_of(&pulled),
        pinned_digest,
        "--pull uses the moved tag"
    );
    let new_lock = read_lock();
    assert_eq!(new_lock["version"], 1);
    assert_eq!(
        sorted_pairs(locked_digests(&new_lock)),
        sorted_pairs(moved_manifests)
    );
    // The new base is really underneath: its /arch.txt layer came from the moved tag.
    let rootfs = unpack_platform(
        &sandbox.path().join("out/app"),
        "1.0",
        "linux/arm64",
        &sandbox.path().join("unpacked"),
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("arch.txt"))
            .expect("arch.txt")
            .trim(),
        "aarch64"
    );
}

fn sorted_pairs(mut pairs: Vec<(String, String)>) -> Vec<(String, String)> {
    pairs.sort();
    pairs
}

#[test]
fn docker_format_pushes_a_manifest_list() {
    let registry = LocalRegistry::start(false);
    registry.seed_busybox();
    let host = registry.host();
    let sandbox = Sandbox::new();
    let no_login = sandbox.path().join("docker-empty");
    std::fs::create_dir_all(&no_login).expect("mkdir");
    let tag = format!("{host}/docker/app:1.0");
    let platforms = ["linux/amd64", "linux/arm64"];
    sandbox.write(
        "app/images.kdl",
        &build_file(
            &format!("{host}/busybox:1.35.0"),
            &platforms,
            std::slice::from_ref(&tag),
        ),
    );
    let output = graphbuild(
        &sandbox,
        &sandbox.store(),
        &no_login,
        &[
            "run",
            "app/images.kdl",
            "--output",
            "out",
            "--progress",
            "json",
            "--format",
            "docker",
            "--push",
        ],
    );
    assert_success(&output);
    let index_digest = index_digest_of(&output);
    let raw = remote_raw(&tag, None);
    assert_eq!(sha256(&raw), index_digest);
    let list = json(&raw);
    assert_eq!(list["mediaType"], DOCKER_LIST);
    assert_eq!(
        sorted(platforms_of(&list)),
        sorted(platforms.map(String::from).to_vec())
    );
    // The provenance, in BuildKit's Docker-format attestation manifests.
    assert_eq!(
        attested_digests(&list),
        manifest_digests(&list)[..platforms.len()].to_vec()
    );
    for entry in &list["manifests"].as_array().expect("manifests")[..platforms.len()] {
        assert_eq!(entry["mediaType"], DOCKER_MANIFEST);
        let digest = entry["digest"].as_str().expect("digest");
        let manifest_raw = remote_raw(&format!("{host}/docker/app@{digest}"), None);
        assert_eq!(sha256(&manifest_raw), digest);
        let manifest = json(&manifest_raw);
        assert_eq!(manifest["mediaType"], DOCKER_MANIFEST);
        assert_eq!(
            manifest["config"]["mediaType"],
            "application/vnd.docker.container.image.v1+json"
        );
        for layer in manifest["layers"].as_array().expect("layers") {
            assert_eq!(
                layer["mediaType"], "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "{manifest}"
            );
        }
    }
}

/// A run that fails before building: its exit code and stderr.
fn failing_run(
    sandbox: &Sandbox,
    file: &str,
    contents: &str,
    extra: &[&str],
) -> (Option<i32>, String) {
    sandbox.write(file, contents);
    let no_login = sandbox.path().join("docker-empty");
    std::fs::create_dir_all(&no_login).expect("mkdir");
    let mut args = vec!["run", file, "--output", "out", "--progress", "plain"];
    args.extend_from_slice(extra);
    let output = graphbuild(sandbox, &sandbox.store(), &no_login, &args);
    assert!(
        !sandbox.path().join("out/app").exists(),
        "{file}: nothing is written"
    );
    (output.status.code(), flat(&stderr(&output)))
}

#[test]
fn registry_errors_name_the_problem() {
    let registry = LocalRegistry::start(false);
    registry.seed_busybox();
    let host = registry.host();
    let sandbox = Sandbox::new();

    // Nothing listens on this port.
    let closed = format!("127.0.0.1:{}", free_port());
    let (code, message) = failing_run(
        &sandbox,
        "closed/images.kdl",
        &build_file(&format!("{closed}/busybox:1.35.0"), &["linux/amd64"], &[]),
        &[],
    );
    assert_eq!(code, Some(3), "{message}");
    assert!(
        message.contains(&format!("cannot reach the registry {closed}")),
        "{message}"
    );

    // An unknown tag names the reference, at its place in the build file.
    let unknown = format!("{host}/busybox:no-such-tag");
    let (code, message) = failing_run(
        &sandbox,
        "unknown/images.kdl",
        &build_file(&unknown, &["linux/amd64"], &[]),
        &[],
    );
    assert_eq!(code, Some(2), "{message}");
    assert!(message.contains(&format!("`{unknown}`")), "{message}");
    assert!(message.contains("unknown/images.kdl:4:10"), "{message}");

    // A platform the base lacks lists the ones it has.
    let (code, message) = failing_run(
        &sandbox,
        "platform/images.kdl",
        &build_file(&format!("{host}/busybox:1.35.0"), &["linux/amd64"], &[]),
        &["--platform", "linux/s390x"],
    );
    assert_eq!(code, Some(2), "{message}");
    assert!(message.contains("linux/s390x"), "{message}");
    let unwrapped: String = message.chars().filter(|c| !c.is_whitespace()).collect();
    assert!(
        unwrapped.contains("ithaslinux/amd64,linux/arm/v7,linux/arm64"),
        "lists the platforms it has: {message}"
    );

    // A malformed reference is a diagnostic on its span.
    let (code, message) = failing_run(
        &sandbox,
        "malformed/images.kdl",
        &build_file("127.0.0.1:5055/UPPER/x:1", &["linux/amd64"], &[]),
        &[],
    );
    assert_eq!(code, Some(2), "{message}");
    assert!(message.contains("malformed/images.kdl:4:10"), "{message}");
    assert!(message.contains("lowercase"), "{message}");
}

/// This machine's first IPv4 address outside 127.0.0.0/8.
fn non_loopback_address() -> String {
    let output = Command::new("hostname")
        .arg("-I")
        .output()
        .expect("hostname runs");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .find(|address| address.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| !ip.is_loopback()))
        .map(str::to_string)
        .expect("the --insecure-registry test needs a non-loopback IPv4 address on this machine (`hostname -I` shows none)")
}

#[test]
fn plain_http_beyond_loopback_needs_insecure_registry() {
    let address = non_loopback_address();
    let registry = LocalRegistry::start_on(&address, false);
    registry.seed_busybox();
    let host = registry.host();
    let sandbox = Sandbox::new();
    let no_login = sandbox.path().join("docker-empty");
    std::fs::create_dir_all(&no_login).expect("mkdir");
    let tag = format!("{host}/insecure/app:1.0");
    sandbox.write(
        "app/images.kdl",
        &build_file(
            &format!("{host}/busybox:1.35.0"),
            &["linux/amd64"],
            std::slice::from_ref(&tag),
        ),
    );
    let args = [
        "run",
        "app/images.kdl",
        "--output",
        "out",
        "--progress",
        "json",
        "--push",
    ];

    // Without the flag, graphbuild insists on verified HTTPS and says how to allow plain HTTP.
    let refused = graphbuild(&sandbox, &sandbox.store(), &no_login, &args);
    let message = flat(&stderr(&refused));
    assert_ne!(refused.status.code(), Some(0), "{message}");
    assert!(message.contains(&host), "{message}");
    assert!(
        message.contains(&format!("--insecure-registry {host}")),
        "{message}"
    );
    assert!(
        registry.graphbuild_requests().is_empty(),
        "no plain HTTP request was made: {:#?}",
        registry.graphbuild_requests()
    );

    // With it, the same build pulls and pushes over plain HTTP.
    let mut allowed_args = args.to_vec();
    allowed_args.extend(["--insecure-registry", &host]);
    let allowed = graphbuild(&sandbox, &sandbox.store(), &no_login, &allowed_args);
    assert_success(&allowed);
    assert_eq!(sha256(&remote_raw(&tag, None)), index_digest_of(&allowed));
}

#[test]
fn pull_for_some_platforms_keeps_the_other_platforms_pins() {
    let registry = LocalRegistry::start(false);
    registry.seed_busybox();
    let host = registry.host();
    let sandbox = Sandbox::new();
    let no_login = sandbox.path().join("docker-empty");
    std::fs::create_dir_all(&no_login).expect("mkdir");
    let base = format!("{host}/busybox:1.35.0");
    sandbox.write(
        "app/images.kdl",
        &build_file(&base, &["linux/amd64", "linux/arm64"], &[]),
    );
    assert_success(&graphbuild(
        &sandbox,
        &sandbox.store(),
        &no_login,
        &["lock", "app/images.kdl"],
    ));
    let lock_path = sandbox.path().join("app/graphbuild.lock");
    let platforms_locked = || -> Vec<String> {
        let lock = json(&std::fs::read(&lock_path).expect("graphbuild.lock"));
        sorted(
            lock["bases"]
                .as_array()
                .expect("bases")
                .iter()
                .map(|b| b["platform"].as_str().expect("platform").to_string())
                .collect(),
        )
    };
    assert_eq!(platforms_locked(), ["linux/amd64", "linux/arm64"]);

    // Refreshing one platform must not forget the other platform's pin.
    let pulled = graphbuild(
        &sandbox,
        &sandbox.store(),
        &no_login,
        &[
            "run",
            "app/images.kdl",
            "--output",
            "out",
            "--progress",
            "json",
            "--pull",
            "--platform",
            "linux/amd64",
        ],
    );
    assert_success(&pulled);
    assert_eq!(
        platforms_locked(),
        ["linux/amd64", "linux/arm64"],
        "run --pull --platform dropped a pin"
    );
}
