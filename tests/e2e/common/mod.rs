//! Shared helpers for end-to-end tests: they run the real `graphbuild` binary on real build
//! files and check its results with independent tools (skopeo, umoci).

#![allow(dead_code, reason = "each test file uses a different subset")]

mod serve;

#[allow(unused_imports, reason = "each test file uses a different subset")]
pub(crate) use serve::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub(crate) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli/ has a parent")
        .to_path_buf()
}

pub(crate) fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_graphbuild"))
}

/// A scratch directory laid out like the repository: `examples/…` and `tests/fixtures/busybox`
/// are copied in so relative paths in build files work, and a private store.
pub(crate) struct Sandbox {
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    pub(crate) fn new() -> Sandbox {
        let dir = tempfile::Builder::new()
            .prefix("graphbuild-e2e-")
            .tempdir()
            .expect("temp dir");
        copy_tree(
            &repo_root().join("tests/fixtures/busybox"),
            &dir.path().join("tests/fixtures/busybox"),
        );
        Sandbox { dir }
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Copy `examples/NAME` into the sandbox; returns its path.
    pub(crate) fn example(&self, name: &str) -> PathBuf {
        let target = self.path().join("examples").join(name);
        copy_tree(&repo_root().join("examples").join(name), &target);
        target
    }

    /// The vendored busybox base image (an OCI layout) copied to `relative`.
    #[allow(dead_code)]
    pub(crate) fn busybox(&self, relative: &str) {
        copy_tree(
            &repo_root().join("tests/fixtures/busybox"),
            &self.path().join(relative),
        );
    }

    pub(crate) fn write(&self, relative: &str, contents: &str) -> PathBuf {
        let path = self.path().join(relative);
        std::fs::create_dir_all(path.parent().expect("has parent")).expect("mkdir");
        std::fs::write(&path, contents).expect("write");
        path
    }

    pub(crate) fn store(&self) -> PathBuf {
        self.path().join("store")
    }

    /// Run graphbuild in the sandbox with its private store.
    pub(crate) fn graphbuild(&self, args: &[&str]) -> Output {
        self.graphbuild_with_store(&self.store(), args)
    }

    pub(crate) fn graphbuild_with_store(&self, store: &Path, args: &[&str]) -> Output {
        self.command(store, args).output().expect("graphbuild runs")
    }

    /// Run graphbuild in the sandbox with these environment variables set.
    #[allow(dead_code)]
    pub(crate) fn graphbuild_with_env(&self, env: &[(&str, &str)], args: &[&str]) -> Output {
        let mut command = self.command(&self.store(), args);
        command.envs(env.iter().copied());
        command.output().expect("graphbuild runs")
    }

    fn command(&self, store: &Path, args: &[&str]) -> Command {
        let mut command = Command::new(bin());
        command
            .args(args)
            .current_dir(self.path())
            .env("GRAPHBUILD_CACHE_DIR", store)
            .env("NO_COLOR", "1")
            .env_remove("SOURCE_DATE_EPOCH");
        command
    }
}

pub(crate) fn copy_tree(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(
            to.parent()
                .inspect(|p| {
                    std::fs::create_dir_all(p).expect("mkdir");
                })
                .expect("parent"),
        )
        .status()
        .expect("cp runs");
    assert!(status.success(), "cp -a {} failed", from.display());
    let copied = to
        .parent()
        .expect("parent")
        .join(from.file_name().expect("name"));
    if copied != to {
        std::fs::rename(&copied, to).expect("rename");
    }
    // Fixtures are read-only under CI: make the copy writable.
    let _ = Command::new("chmod").args(["-R", "u+w"]).arg(to).status();
}

pub(crate) fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub(crate) fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[track_caller]
pub(crate) fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "graphbuild failed with {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        stdout(output),
        stderr(output)
    );
}

/// The JSON events of a `--progress json` run.
pub(crate) fn events(output: &Output) -> Vec<serde_json::Value> {
    stdout(output)
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

pub(crate) fn summary(output: &Output) -> serde_json::Value {
    events(output)
        .into_iter()
        .rev()
        .find(|event| event["event"] == "summary")
        .unwrap_or_else(|| panic!("no summary event\n{}\n{}", stdout(output), stderr(output)))
}

/// Steps with a status, as (stage, platform, status).
pub(crate) fn steps(output: &Output) -> Vec<(String, String, String, String)> {
    events(output)
        .into_iter()
        .filter(|event| event["event"] == "step")
        .map(|event| {
            (
                event["stage"].as_str().unwrap_or_default().to_string(),
                event["platform"].as_str().unwrap_or_default().to_string(),
                event["step"].as_str().unwrap_or_default().to_string(),
                event["status"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// `graphbuild cache serve` on 127.0.0.1, a free port, serving `dir`; stopped on drop.
pub(crate) struct CacheServer {
    child: std::process::Child,
    pub url: String,
}

impl CacheServer {
    pub(crate) fn start(dir: &Path, extra: &[&str]) -> CacheServer {
        use std::io::BufRead;
        let mut child = Command::new(bin())
            .args(["cache", "serve", "--listen", "127.0.0.1:0", "--dir"])
            .arg(dir)
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("cache serve starts");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("reads the address");
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        CacheServer { child, url }
    }
}

impl Drop for CacheServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether the tests run under CI (`CI=true`), where a missing prerequisite is a failure.
pub(crate) fn ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value == "true")
}

/// Whether a prerequisite holds; without it a test panics under CI and is skipped elsewhere
/// (saying so on stderr).
pub(crate) fn prerequisite(ok: bool, what: &str) -> bool {
    if !ok {
        assert!(!ci(), "prerequisite missing under CI: {what}");
        eprintln!("skipped: {what}");
    }
    ok
}

/// Root and qemu-user for arm64 and arm/v7 registered in binfmt_misc: what a build that runs
/// commands for three platforms needs.
pub(crate) fn root_and_qemu() -> bool {
    let binfmt = Path::new("/proc/sys/fs/binfmt_misc");
    prerequisite(
        nix::unistd::geteuid().is_root(),
        "root (builds run in namespaces on overlayfs)",
    ) && prerequisite(
        binfmt.join("qemu-aarch64").exists() && binfmt.join("qemu-arm").exists(),
        "qemu-user for aarch64 and arm registered in binfmt_misc (scripts/setup-host)",
    )
}

pub(crate) fn require_tool(name: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .map(|o| o.status.success());
    assert!(
        found.unwrap_or(false),
        "the end-to-end tests need `{name}`: run the test command from README.md, which installs it"
    );
}

/// `skopeo inspect --raw` of a layout reference.
pub(crate) fn skopeo_raw(reference: &str) -> serde_json::Value {
    require_tool("skopeo");
    let output = Command::new("skopeo")
        .args(["inspect", "--raw", reference])
        .output()
        .expect("skopeo runs");
    assert!(
        output.status.success(),
        "skopeo inspect {reference}: {}",
        stderr(&output)
    );
    serde_json::from_slice(&output.stdout).expect("skopeo prints JSON")
}

/// Unpack one platform of a layout with skopeo (select the platform) and umoci (unpack the
/// filesystem); returns the rootfs directory.
pub(crate) fn unpack_platform(layout: &Path, tag: &str, platform: &str, into: &Path) -> PathBuf {
    require_tool("skopeo");
    require_tool("umoci");
    let mut parts = platform.split('/');
    let os = parts.next().unwrap_or("linux");
    let arch = parts.next().unwrap_or("amd64");
    let variant = parts.next();
    std::fs::create_dir_all(into).expect("mkdir");
    let single = into.join("single");
    let mut skopeo = Command::new("skopeo");
    skopeo.args(["--override-os", os, "--override-arch", arch]);
    if let Some(variant) = variant {
        skopeo.args(["--override-variant", variant]);
    }
    let output = skopeo
        .args(["copy", "--quiet"])
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("oci:{}:{tag}", single.display()))
        .output()
        .expect("skopeo runs");
    assert!(
        output.status.success(),
        "skopeo copy {platform}: {}",
        stderr(&output)
    );
    let bundle = into.join("bundle");
    let output = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:{tag}", single.display()))
        .arg(&bundle)
        .output()
        .expect("umoci runs");
    assert!(
        output.status.success(),
        "umoci unpack {platform}: {}",
        stderr(&output)
    );
    bundle.join("rootfs")
}

/// Every file of a directory tree with its bytes, for byte-for-byte comparisons.
pub(crate) fn tree_bytes(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let relative = path
                    .strip_prefix(root)
                    .expect("under root")
                    .display()
                    .to_string();
                files.push((relative, std::fs::read(&path).expect("read")));
            }
        }
    }
    files.sort();
    files
}

/// Debian's `docker-registry` (the CNCF distribution registry) on 127.0.0.1, a free port and a
/// temp directory; stopped on drop.
pub(crate) struct Registry {
    child: std::process::Child,
    pub address: String,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub(crate) fn start() -> Registry {
        require_tool("docker-registry");
        let dir = tempfile::tempdir().expect("temp dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let address = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {address}\n",
                dir.path().join("data").display()
            ),
        )
        .expect("config");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("docker-registry starts");
        for _ in 0..100 {
            if std::net::TcpStream::connect(&address).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Registry {
            child,
            address,
            _dir: dir,
        }
    }

    /// Copy an OCI layout reference (`oci:DIR:TAG`) into the registry as `REPO:TAG`.
    pub(crate) fn push_layout(&self, layout: &str, name: &str) {
        require_tool("skopeo");
        let output = Command::new("skopeo")
            .args([
                "copy",
                "--all",
                "--quiet",
                "--dest-tls-verify=false",
                layout,
            ])
            .arg(format!("docker://{}/{name}", self.address))
            .output()
            .expect("skopeo runs");
        assert!(output.status.success(), "skopeo copy: {}", stderr(&output));
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The image config of one platform of an OCI layout, read from its blobs as written (skopeo
/// drops Docker's Healthcheck, which the OCI spec lacks).
pub(crate) fn config(layout: &Path, platform: &str) -> serde_json::Value {
    let blob = |digest: &str| -> serde_json::Value {
        let path = layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"));
        serde_json::from_slice(&std::fs::read(&path).expect("blob")).expect("JSON blob")
    };
    let top: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index.json"))
            .expect("JSON");
    let index = blob(top["manifests"][0]["digest"].as_str().expect("digest"));
    let mut parts = platform.split('/');
    let (os, arch) = (parts.next().expect("os"), parts.next().expect("arch"));
    let variant = parts.next();
    let manifest = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|m| {
            m["platform"]["os"] == os
                && m["platform"]["architecture"] == arch
                && m["platform"]["variant"].as_str() == variant
        })
        .expect("the platform's manifest");
    let manifest = blob(manifest["digest"].as_str().expect("digest"));
    blob(
        manifest["config"]["digest"]
            .as_str()
            .expect("config digest"),
    )
}

/// Waits up to 180 s until a server started in the background (`child`) listens on every one
/// of `ports` on loopback. When it exits first, or never listens, it is stopped and the error
/// carries `log`, its output.
pub(crate) fn wait_until_listening(
    child: &mut std::process::Child,
    ports: &[u16],
    log: &Path,
) -> Result<(), String> {
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(180) {
        if ports
            .iter()
            .all(|port| std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok())
        {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            return Err(format!("BuildGrid exited with {status}:\n{log}"));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(log).unwrap_or_default();
    Err(format!(
        "BuildGrid did not listen on 127.0.0.1:{} within 180 s:\n{log}",
        ports[0]
    ))
}
