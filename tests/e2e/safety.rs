//! Safety end to end: crafted malicious base layers never write outside the store, Ctrl-C
//! leaves no sandbox process behind, `--compression zstd` layouts are readable by skopeo and
//! umoci, and `cache du` / `cache prune` account for the store.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use sha2::Digest as _;

// ---------------------------------------------------------------------------------------
// Malicious layers

/// A tar entry written byte for byte: the `tar` crate refuses `..` and absolute names, which
/// is exactly what an attacker's layer contains.
enum Crafted<'a> {
    File { path: &'a str, contents: &'a str },
    Symlink { path: &'a str, target: &'a str },
}

fn raw_header(path: &str, kind: tar::EntryType, size: u64, link: Option<&str>) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(if kind == tar::EntryType::Symlink {
        0o777
    } else {
        0o644
    });
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    let old = header.as_old_mut();
    assert!(path.len() < old.name.len(), "{path} fits a ustar name");
    old.name = [0; 100];
    old.name[..path.len()].copy_from_slice(path.as_bytes());
    if let Some(link) = link {
        assert!(link.len() < old.linkname.len());
        old.linkname = [0; 100];
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    header.set_cksum();
    header
}

fn crafted_tar(entries: &[Crafted]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        match entry {
            Crafted::File { path, contents } => {
                let header = raw_header(path, tar::EntryType::Regular, contents.len() as u64, None);
                builder
                    .append(&header, contents.as_bytes())
                    .expect("append");
            }
            Crafted::Symlink { path, target } => {
                let header = raw_header(path, tar::EntryType::Symlink, 0, Some(target));
                builder.append(&header, std::io::empty()).expect("append");
            }
        }
    }
    builder.into_inner().expect("tar")
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

fn put_blob(layout: &Path, bytes: &[u8]) -> (String, usize) {
    let digest = sha256(bytes);
    std::fs::write(
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
        bytes,
    )
    .expect("blob");
    (digest, bytes.len())
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// An OCI layout at `layout`, tag `evil`, linux/amd64: busybox's layer (so a shell exists)
/// then one gzip layer holding `entries`; the index points straight at the manifest.
fn malicious_layout(sandbox: &Sandbox, layout: &Path, entries: &[Crafted]) {
    let fixture = sandbox.path().join("tests/fixtures/busybox");
    let fixture_blob = |digest: &str| {
        fixture
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let top = read_json(&fixture.join("index.json"));
    let nested = read_json(&fixture_blob(
        top["manifests"][0]["digest"].as_str().expect("digest"),
    ));
    let amd64 = nested["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|descriptor| descriptor["platform"]["architecture"] == "amd64")
        .expect("amd64 manifest");
    let mut manifest = read_json(&fixture_blob(amd64["digest"].as_str().expect("digest")));
    let mut config = read_json(&fixture_blob(
        manifest["config"]["digest"].as_str().expect("config"),
    ));

    std::fs::create_dir_all(layout.join("blobs/sha256")).expect("mkdir");
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("oci-layout");
    for layer in manifest["layers"].as_array().expect("layers") {
        let digest = layer["digest"].as_str().expect("digest");
        std::fs::copy(
            fixture_blob(digest),
            layout
                .join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
        )
        .expect("copy base layer");
    }
    let tar = crafted_tar(entries);
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzip.write_all(&tar).expect("gzip");
    let (layer_digest, layer_size) = put_blob(layout, &gzip.finish().expect("gzip"));
    config["rootfs"]["diff_ids"]
        .as_array_mut()
        .expect("diff_ids")
        .push(sha256(&tar).into());
    let (config_digest, config_size) =
        put_blob(layout, &serde_json::to_vec(&config).expect("json"));
    manifest["config"]["digest"] = config_digest.into();
    manifest["config"]["size"] = config_size.into();
    manifest["layers"]
        .as_array_mut()
        .expect("layers")
        .push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": layer_digest,
            "size": layer_size,
        }));
    let (manifest_digest, manifest_size) =
        put_blob(layout, &serde_json::to_vec(&manifest).expect("json"));
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"org.opencontainers.image.ref.name": "evil"},
        }],
    });
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).expect("json"),
    )
    .expect("index.json");
}

/// A build file whose only stage runs `command` on the crafted base at `evil/`.
fn build_on(sandbox: &Sandbox, name: &str, entries: &[Crafted], command: &str) -> Output {
    let dir = sandbox.path().join(name);
    malicious_layout(sandbox, &dir.join("evil"), entries);
    sandbox.write(
        &format!("{name}/images.kdl"),
        &format!(
            "platforms \"linux/amd64\"\nstage victim {{\n    from \"oci:evil:evil\"\n    run \"{command}\"\n}}\nimage victim {{ stage victim; }}\n"
        ),
    );
    sandbox.graphbuild(&[
        "run",
        &format!("{name}/images.kdl"),
        "--output",
        &format!("{name}/out"),
        "--progress",
        "plain",
    ])
}

/// A name no other test or run uses.
fn unique(label: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("graphbuild-{label}-{}-{nanos}", std::process::id())
}

/// Every path under `root` whose file name contains `needle`.
fn find_named(root: &Path, needle: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path
                .file_name()
                .is_some_and(|name| name.to_string_lossy().contains(needle))
            {
                found.push(path.clone());
            }
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                stack.push(path);
            }
        }
    }
    found
}

#[track_caller]
fn assert_refused(output: &Output, entry: &str) {
    assert_eq!(
        output.status.code(),
        Some(1),
        "the build must fail\n{}\n{}",
        stdout(output),
        stderr(output)
    );
    let err = stderr(output);
    assert!(
        err.contains(entry),
        "the error names the entry `{entry}`:\n{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_dot_dot_entry_is_refused_and_writes_nothing_outside() {
    let sandbox = Sandbox::new();
    let name = unique("dotdot");
    let shallow = format!("../{name}-shallow");
    let deep = format!("{}tmp/{name}-deep", "../".repeat(12));
    let output = build_on(
        &sandbox,
        "dotdot",
        &[
            Crafted::File {
                path: &shallow,
                contents: "escaped",
            },
            Crafted::File {
                path: &deep,
                contents: "escaped",
            },
        ],
        "echo ran > /ran.txt",
    );
    assert_refused(&output, &shallow);
    assert!(
        find_named(sandbox.path(), &name).is_empty(),
        "{:?}",
        find_named(sandbox.path(), &name)
    );
    assert!(!Path::new("/tmp").join(format!("{name}-deep")).exists());
    assert!(!Path::new("/tmp").join(format!("{name}-shallow")).exists());
    assert!(!sandbox.path().join("dotdot/out/victim").exists());
}

#[test]
fn an_absolute_entry_lands_inside_the_image_not_on_the_host() {
    let sandbox = Sandbox::new();
    let name = unique("absolute");
    let absolute = format!("/tmp/{name}");
    // Like Docker, a leading `/` is dropped: the file belongs to the image's /tmp. The run step
    // proves it is there, inside the rootfs.
    let output = build_on(
        &sandbox,
        "absolute",
        &[Crafted::File {
            path: &absolute,
            contents: "inside",
        }],
        &format!("test \\\"$(cat /tmp/{name})\\\" = inside && echo ok > /checked.txt"),
    );
    assert_success(&output);
    assert!(
        !Path::new(&absolute).exists(),
        "{absolute} written on the host"
    );
    let outside: Vec<PathBuf> = find_named(sandbox.path(), &name)
        .into_iter()
        .filter(|path| !path.starts_with(sandbox.store().join("snapshots")))
        .collect();
    assert!(
        outside.is_empty(),
        "only the snapshot holds it: {outside:?}"
    );
}

#[test]
fn an_entry_through_an_absolute_symlink_is_refused() {
    let sandbox = Sandbox::new();
    let target = PathBuf::from("/tmp").join(unique("symlink-target"));
    std::fs::create_dir_all(&target).expect("mkdir");
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _remove = Remove(target.clone());
    let link_target = target.display().to_string();
    let output = build_on(
        &sandbox,
        "abslink",
        &[
            Crafted::Symlink {
                path: "link",
                target: &link_target,
            },
            Crafted::File {
                path: "link/evil",
                contents: "escaped",
            },
        ],
        "echo ran > /ran.txt",
    );
    assert_refused(&output, "link/evil");
    assert!(!target.join("evil").exists(), "written through the symlink");
    assert_eq!(
        std::fs::read_dir(&target)
            .map(|entries| entries.count())
            .unwrap_or(1),
        0,
        "the target stays empty"
    );
}

#[test]
fn an_entry_through_a_relative_symlink_pointing_up_is_refused() {
    let sandbox = Sandbox::new();
    let name = unique("relative");
    let through_shallow = format!("up/{name}-shallow");
    let through_deep = format!("root/tmp/{name}-deep");
    let root = "../".repeat(14);
    for (case, entries, entry) in [
        (
            "uplink",
            vec![
                Crafted::Symlink {
                    path: "up",
                    target: "../../..",
                },
                Crafted::File {
                    path: &through_shallow,
                    contents: "escaped",
                },
            ],
            through_shallow.as_str(),
        ),
        (
            "rootlink",
            vec![
                Crafted::Symlink {
                    path: "root",
                    target: root.trim_end_matches('/'),
                },
                Crafted::File {
                    path: &through_deep,
                    contents: "escaped",
                },
            ],
            through_deep.as_str(),
        ),
    ] {
        let output = build_on(&sandbox, case, &entries, "echo ran > /ran.txt");
        assert_refused(&output, entry);
    }
    assert!(
        find_named(sandbox.path(), &name).is_empty(),
        "{:?}",
        find_named(sandbox.path(), &name)
    );
    assert!(!Path::new("/tmp").join(format!("{name}-deep")).exists());
    assert!(!Path::new("/tmp").join(format!("{name}-shallow")).exists());
}

// ---------------------------------------------------------------------------------------
// Ctrl-C

fn processes_matching(pattern: &str) -> Vec<String> {
    let output = Command::new("pgrep")
        .args(["-a", "-f", pattern])
        .output()
        .expect("pgrep runs");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(String::from)
        .filter(|line| !line.contains("pgrep"))
        .collect()
}

/// What happened after Ctrl-C.
struct Cancelled {
    status: std::process::ExitStatus,
    /// From SIGINT to exit.
    took: Duration,
    /// `pgrep -a` lines of the step's command still alive after graphbuild exited.
    leftovers: Vec<String>,
    stderr: String,
    sandbox: Sandbox,
}

/// Start a build whose step sleeps for days, wait for `step_started` and the sleep itself,
/// then press Ctrl-C: SIGINT to graphbuild's process group, as a terminal does.
fn build_then_ctrl_c() -> Cancelled {
    require_tool("pgrep");
    let sandbox = Sandbox::new();
    // A sleep of a unique length: its command line is our marker.
    // Unique per test, not only per process: the tests of this file run in parallel.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let nonce = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let seconds = 600_000 + (std::process::id() % 50_000) * 4 + nonce;
    let marker = format!("sleep {seconds}");
    sandbox.write(
        "slow/images.kdl",
        &format!(
            "platforms \"linux/amd64\"\nstage slow {{\n    from \"oci:../tests/fixtures/busybox:1.35.0\"\n    run \"echo started; {marker}\"\n}}\nimage slow {{ stage slow; }}\n"
        ),
    );
    let mut child = {
        use std::os::unix::process::CommandExt;
        Command::new(bin())
            .args([
                "run",
                "slow/images.kdl",
                "--output",
                "out",
                "--progress",
                "json",
            ])
            .current_dir(sandbox.path())
            .env("GRAPHBUILD_CACHE_DIR", sandbox.store())
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, as a shell's foreground job: Ctrl-C signals the group.
            .process_group(0)
            .spawn()
            .expect("spawn")
    };
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.expect("read");
        seen.push(line.clone());
        if line.contains("\"step_started\"") {
            break;
        }
    }
    assert!(
        seen.last()
            .is_some_and(|line| line.contains("step_started")),
        "{seen:?}"
    );
    // Wait until the sandboxed command is really running.
    let deadline = Instant::now() + Duration::from_secs(20);
    while processes_matching(&marker).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if processes_matching(&marker).is_empty() {
        let _ = child.kill();
        let output = child.wait_with_output().expect("wait");
        panic!(
            "the step's `{marker}` never started; events: {seen:?}; stderr: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    let sent = Instant::now();
    nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if sent.elapsed() > Duration::from_secs(15) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = sent.elapsed();
    let mut stderr = String::new();
    let _ = std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr);
    // Give a dying process a moment, then look for leftovers and clean them up before any
    // assertion, so a failure does not leak processes.
    std::thread::sleep(Duration::from_millis(300));
    let leftovers = processes_matching(&marker);
    if status.is_none() {
        let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();
    }
    for line in &leftovers {
        if let Some(Ok(leftover)) = line.split_whitespace().next().map(str::parse::<i32>) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(leftover),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    let status = status.unwrap_or_else(|| panic!("still running 15s after Ctrl-C\n{stderr}"));
    Cancelled {
        status,
        took,
        leftovers,
        stderr,
        sandbox,
    }
}

#[test]
fn ctrl_c_stops_the_build_and_leaves_no_sandbox_process() {
    let cancelled = build_then_ctrl_c();
    assert!(
        cancelled.leftovers.is_empty(),
        "processes left behind: {:?}",
        cancelled.leftovers
    );
    assert!(!cancelled.status.success(), "{}", cancelled.stderr);
    assert!(
        cancelled.took < Duration::from_secs(10),
        "took {:?} to stop",
        cancelled.took
    );
    let sandbox = &cancelled.sandbox;
    assert!(
        !sandbox.path().join("out/slow").exists(),
        "no image from a cancelled build"
    );

    // The store is usable after a cancel: a quick build on it works.
    sandbox.write(
        "quick/images.kdl",
        "platforms \"linux/amd64\"\nstage quick {\n    from \"oci:../tests/fixtures/busybox:1.35.0\"\n    run \"echo quick > /quick.txt\"\n}\nimage quick { stage quick; }\n",
    );
    assert_success(&sandbox.graphbuild(&[
        "run",
        "quick/images.kdl",
        "--output",
        "out",
        "--progress",
        "plain",
    ]));
}

/// What docs/cli.md promises: 130, said to be a cancel, promptly.
#[test]

fn ctrl_c_exits_130_within_a_few_seconds() {
    let cancelled = build_then_ctrl_c();
    assert_eq!(
        cancelled.status.code(),
        Some(130),
        "exit code after Ctrl-C\n{}",
        cancelled.stderr
    );
    assert!(
        cancelled.stderr.contains("cancelled"),
        "{}",
        cancelled.stderr
    );
    assert!(
        !cancelled.stderr.contains("failed"),
        "a cancel is not a failure: {}",
        cancelled.stderr
    );
    assert!(
        cancelled.took < Duration::from_secs(3),
        "took {:?} to stop",
        cancelled.took
    );
}

// ---------------------------------------------------------------------------------------
// zstd

#[test]
fn zstd_layers_have_the_zstd_media_type_and_skopeo_and_umoci_read_them() {
    let sandbox = Sandbox::new();
    sandbox.example("basic");
    let output = sandbox.graphbuild(&[
        "run",
        "examples/basic/images.kdl",
        "--output",
        "out",
        "--progress",
        "json",
        "--compression",
        "zstd",
        "--platform",
        "linux/amd64",
        "--platform",
        "linux/arm64",
    ]);
    assert_success(&output);
    let layout = sandbox.path().join("out/basic");
    let index = skopeo_raw(&format!("oci:{}:1.0", layout.display()));
    // Attestation manifests (unknown/unknown) hold statements, not layers.
    for descriptor in index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .filter(|descriptor| descriptor["platform"]["os"] != "unknown")
    {
        let manifest = read_json(
            &layout.join("blobs/sha256").join(
                descriptor["digest"]
                    .as_str()
                    .expect("digest")
                    .trim_start_matches("sha256:"),
            ),
        );
        let layers = manifest["layers"].as_array().expect("layers");
        assert_eq!(layers.len(), 2, "{manifest}");
        // The last layer is graphbuild's own (the base's is reused as it was published).
        let ours = &layers[1];
        assert_eq!(
            ours["mediaType"], "application/vnd.oci.image.layer.v1.tar+zstd",
            "{manifest}"
        );
        let blob = std::fs::read(
            layout.join("blobs/sha256").join(
                ours["digest"]
                    .as_str()
                    .expect("digest")
                    .trim_start_matches("sha256:"),
            ),
        )
        .expect("layer blob");
        assert_eq!(&blob[..4], &[0x28, 0xb5, 0x2f, 0xfd], "zstd magic");
        // An independent decoder gives a tar whose sha256 is the config's diff_id.
        let mut tar = Vec::new();
        std::io::Read::read_to_end(
            &mut ruzstd::decoding::StreamingDecoder::new(&blob[..]).expect("zstd frame"),
            &mut tar,
        )
        .expect("zstd decodes");
        let config = read_json(
            &layout.join("blobs/sha256").join(
                manifest["config"]["digest"]
                    .as_str()
                    .expect("config")
                    .trim_start_matches("sha256:"),
            ),
        );
        assert_eq!(
            config["rootfs"]["diff_ids"][1],
            sha256(&tar),
            "diff_id of the zstd layer"
        );
        let names: Vec<String> = tar::Archive::new(&tar[..])
            .entries()
            .expect("tar")
            .map(|entry| {
                entry
                    .expect("entry")
                    .path()
                    .expect("path")
                    .display()
                    .to_string()
            })
            .collect();
        assert!(
            names
                .iter()
                .any(|name| name.trim_start_matches("./") == "app/arch.txt"),
            "{names:?}"
        );
    }
    for (platform, arch, uname) in [
        ("linux/amd64", "amd64", "x86_64"),
        ("linux/arm64", "arm64", "aarch64"),
    ] {
        // skopeo reads the zstd layers (and verifies them) while copying one platform out,
        // recompressed as gzip since this umoci predates zstd; umoci unpacks the copy.
        let single = sandbox.path().join(format!("single-{arch}"));
        let copied = Command::new("skopeo")
            .args([
                "--override-arch",
                arch,
                "copy",
                "--quiet",
                "--dest-compress",
                "--dest-compress-format",
                "gzip",
            ])
            .arg(format!("oci:{}:1.0", layout.display()))
            .arg(format!("oci:{}:1.0", single.display()))
            .output()
            .expect("skopeo runs");
        assert!(
            copied.status.success(),
            "skopeo copy {platform}: {}",
            stderr(&copied)
        );
        let bundle = sandbox.path().join(format!("bundle-{arch}"));
        let unpacked = Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:1.0", single.display()))
            .arg(&bundle)
            .output()
            .expect("umoci runs");
        assert!(
            unpacked.status.success(),
            "umoci unpack {platform}: {}",
            stderr(&unpacked)
        );
        let rootfs = bundle.join("rootfs");
        assert_eq!(
            std::fs::read_to_string(rootfs.join("app/arch.txt"))
                .expect("arch.txt")
                .trim(),
            uname
        );
        assert!(rootfs.join("bin/busybox").exists());
    }
}

/// The compression a user asks for is the compression they get, whatever an earlier run on the
/// same store used.
#[test]

fn a_gzip_build_after_a_zstd_build_on_one_store_has_gzip_layers() {
    let sandbox = Sandbox::new();
    sandbox.example("basic");
    for (compression, output) in [("zstd", "out-zstd"), ("gzip", "out-gzip")] {
        assert_success(&sandbox.graphbuild(&[
            "run",
            "examples/basic/images.kdl",
            "--output",
            output,
            "--progress",
            "json",
            "--platform",
            "linux/amd64",
            "--compression",
            compression,
        ]));
    }
    let layout = sandbox.path().join("out-gzip/basic");
    let index = skopeo_raw(&format!("oci:{}:1.0", layout.display()));
    let manifest = read_json(
        &layout.join("blobs/sha256").join(
            index["manifests"][0]["digest"]
                .as_str()
                .expect("digest")
                .trim_start_matches("sha256:"),
        ),
    );
    assert_eq!(
        manifest["layers"][1]["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip",
        "{manifest}"
    );
}

// ---------------------------------------------------------------------------------------
// cache du and prune

/// `total` of `graphbuild cache du`, as printed.
fn du_total(sandbox: &Sandbox) -> String {
    let output = sandbox.graphbuild(&["cache", "du"]);
    assert_success(&output);
    stdout(&output)
        .lines()
        .find_map(|line| {
            line.trim()
                .strip_prefix("total")
                .map(|rest| rest.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no total: {}", stdout(&output)))
}

#[test]
fn cache_du_and_prune_account_for_the_store() {
    let sandbox = Sandbox::new();
    sandbox.example("basic");
    assert_success(&sandbox.graphbuild(&["cache", "prune"]));
    assert_eq!(du_total(&sandbox), "0 B", "an empty store");
    let build = |sandbox: &Sandbox| {
        sandbox.graphbuild(&[
            "run",
            "examples/basic/images.kdl",
            "--output",
            "out",
            "--progress",
            "json",
            "--platform",
            "linux/amd64",
        ])
    };
    assert_success(&build(&sandbox));
    let full = du_total(&sandbox);
    assert_ne!(full, "0 B");
    assert!(
        full.ends_with("MiB"),
        "busybox alone is about 1 MiB: {full}"
    );

    let pruned = sandbox.graphbuild(&["cache", "prune", "--keep-bytes", "0"]);
    assert_success(&pruned);
    let text = stdout(&pruned);
    assert!(text.starts_with("removed "), "{text}");
    assert!(!text.starts_with("removed 0 entries"), "{text}");
    assert!(
        text.trim_end().ends_with("the store now holds 0 B"),
        "{text}"
    );
    assert_eq!(du_total(&sandbox), "0 B");

    // Everything runs again, and the store fills up again.
    let again = build(&sandbox);
    assert_success(&again);
    assert_eq!(summary(&again)["cached"], 0);
    assert_eq!(
        du_total(&sandbox),
        full,
        "the same build takes the same space"
    );

    // A keep-bytes above the size removes nothing.
    let kept = sandbox.graphbuild(&["cache", "prune", "--keep-bytes", "10G"]);
    assert_success(&kept);
    assert!(
        stdout(&kept).starts_with("removed 0 entries"),
        "{}",
        stdout(&kept)
    );
    assert_eq!(du_total(&sandbox), full);

    let bad = sandbox.graphbuild(&["cache", "prune", "--keep-bytes", "lots"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
}
