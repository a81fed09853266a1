//! `add` (Dockerfile `ADD`) end to end with the real binary, for linux/amd64 and linux/arm64 on
//! the busybox fixture: downloads from a local HTTP server (checksum good, bad and missing, a
//! redirect, a size limit, credentials, a warm rebuild without a request), local tar archives
//! (gzip and plain; hostile ones refused) and git repositories served by `git daemon` on
//! loopback (a tag, a commit, a subdirectory, `keep-git-dir`). Files are checked inside the
//! built images: contents and modes.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::*;

const BASE: &str = "oci:../tests/fixtures/busybox:1.35.0";

/// A raw tar entry: its name, kind, link target and content.
type RawEntry<'a> = (&'a [u8], tar::EntryType, &'a [u8], &'a [u8]);

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// Root: a build that falls back to the sandbox needs it. Under CI its absence fails.
fn sandbox() -> Option<Sandbox> {
    if !prerequisite(
        nix::unistd::geteuid().is_root(),
        "root (copies may take the sandbox path)",
    ) {
        return None;
    }
    Some(Sandbox::new())
}

/// `run` of `proj/images.kdl` for both platforms, each platform's filesystem under `rootfs/`.
fn run(sandbox: &Sandbox, env: &[(&str, &str)]) -> std::process::Output {
    let _ = std::fs::remove_dir_all(sandbox.path().join("rootfs"));
    sandbox.graphbuild_with_env(
        env,
        &[
            "run",
            "proj/images.kdl",
            "--output",
            "out",
            "--output",
            "type=local,dest=rootfs",
            "--progress",
            "json",
        ],
    )
}

fn images_kdl(sandbox: &Sandbox, steps: &str) {
    sandbox.write(
        "proj/images.kdl",
        &format!(
            "stage s {{\n    from \"{BASE}\"\n{steps}\n}}\nimage app {{\n    stage s\n    platforms \"linux/amd64\" \"linux/arm64\"\n}}\n"
        ),
    );
}

/// A file inside each platform's image: its bytes and mode, the same on both.
fn file_in_images(sandbox: &Sandbox, path: &str) -> (Vec<u8>, u32) {
    let mut found: Option<(Vec<u8>, u32)> = None;
    for platform in ["linux_amd64", "linux_arm64"] {
        let file = sandbox
            .path()
            .join("rootfs")
            .join(platform)
            .join(path.trim_start_matches('/'));
        let metadata = std::fs::symlink_metadata(&file)
            .unwrap_or_else(|error| panic!("{platform}: {path}: {error}"));
        let bytes = std::fs::read(&file).unwrap_or_default();
        let this = (bytes, metadata.permissions().mode() & 0o7777);
        if let Some(previous) = &found {
            assert_eq!(previous, &this, "{path} differs between platforms");
        }
        found = Some(this);
    }
    found.expect("two platforms")
}

fn exists_in_images(sandbox: &Sandbox, path: &str) -> bool {
    ["linux_amd64", "linux_arm64"].iter().all(|platform| {
        std::fs::symlink_metadata(
            sandbox
                .path()
                .join("rootfs")
                .join(platform)
                .join(path.trim_start_matches('/')),
        )
        .is_ok()
    })
}

fn executed(output: &std::process::Output) -> u64 {
    summary(output)["executed"].as_u64().unwrap_or(u64::MAX)
}

#[test]
fn a_download_with_a_checksum_is_verified_and_a_warm_build_makes_no_request() {
    let Some(sandbox) = sandbox() else { return };
    let server = http();
    let tool = b"#!/bin/sh\necho tool 1.2\n";
    server.serve("/good/tool.sh", tool);
    server.serve("/good/notes.txt", b"release notes\n");
    images_kdl(
        &sandbox,
        &format!(
            "    add \"{}\" \"/opt/\" checksum=\"{}\"\n    add \"{}\" \"/opt/bin/run\" checksum=\"{}\" chmod=\"0755\"",
            server.url("/good/notes.txt"),
            sha256(b"release notes\n"),
            server.url("/good/tool.sh"),
            sha256(tool),
        ),
    );
    let output = run(&sandbox, &[]);
    assert_success(&output);
    // Docker's mode for a download is 0600; --chmod replaces it.
    assert_eq!(
        file_in_images(&sandbox, "/opt/notes.txt"),
        (b"release notes\n".to_vec(), 0o600)
    );
    assert_eq!(
        file_in_images(&sandbox, "/opt/bin/run"),
        (tool.to_vec(), 0o755)
    );
    // Two platforms, one download each.
    assert_eq!(server.requests("/good/tool.sh"), 1);
    assert_eq!(server.requests("/good/notes.txt"), 1);
    // Warm: keyed by the checksum, nothing is asked of the server.
    let warm = run(&sandbox, &[]);
    assert_success(&warm);
    assert_eq!(executed(&warm), 0, "{}", stdout(&warm));
    assert_eq!(server.requests("/good/tool.sh"), 1);
    assert_eq!(server.requests("/good/notes.txt"), 1);
    // The history says ADD with the URL.
    let plan = sandbox.graphbuild(&["plan", "proj/images.kdl"]);
    assert_success(&plan);
    assert!(stdout(&plan).contains(&format!("ADD {} /opt/", server.url("/good/notes.txt"))));
    assert_eq!(
        server.requests("/good/notes.txt"),
        1,
        "plan downloads nothing"
    );
    // The sandbox path (another store, so the file is downloaded again) makes the same image.
    let other_store = sandbox.path().join("store-sandboxed");
    let sandboxed = sandbox.graphbuild_with_env(
        &[
            ("GRAPHBUILD_DIRECT_COPY", "0"),
            ("GRAPHBUILD_CACHE_DIR", other_store.to_str().expect("utf-8")),
        ],
        &[
            "run",
            "proj/images.kdl",
            "--output",
            "out-sandboxed",
            "--progress",
            "json",
        ],
    );
    assert_success(&sandboxed);
    assert_eq!(
        summary(&sandboxed)["images"][0]["index_digest"],
        summary(&output)["images"][0]["index_digest"],
        "direct and sandboxed add give one image"
    );
}

#[test]
fn a_wrong_checksum_names_both_digests_and_stores_nothing() {
    let Some(sandbox) = sandbox() else { return };
    let server = http();
    let body = b"the real content\n";
    server.serve("/bad/file.txt", body);
    let claimed = sha256(b"something else\n");
    images_kdl(
        &sandbox,
        &format!(
            "    add \"{}\" \"/opt/\" checksum=\"{claimed}\"",
            server.url("/bad/file.txt")
        ),
    );
    let output = run(&sandbox, &[]);
    assert!(!output.status.success(), "a wrong checksum fails the build");
    let text = stderr(&output) + &stdout(&output);
    assert!(text.contains(&claimed), "names the expected digest: {text}");
    let actual = sha256(body);
    assert!(
        text.contains(&actual),
        "names the downloaded digest: {text}"
    );
    let blob = sandbox
        .store()
        .join("blobs/sha256")
        .join(actual.trim_start_matches("sha256:"));
    assert!(!blob.exists(), "the wrong content is not in the store");
    // A checksum that is not one is a diagnostic before anything runs.
    images_kdl(
        &sandbox,
        &format!(
            "    add \"{}\" \"/opt/\" checksum=\"md5:abc\"",
            server.url("/bad/file.txt")
        ),
    );
    let output = sandbox.graphbuild(&["plan", "proj/images.kdl"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("is not a sha256 checksum"));
}

/// The key of the `add` step of the plan's first node (JSON plan).
fn add_key(sandbox: &Sandbox, extra: &[&str]) -> (serde_json::Value, std::process::Output) {
    let mut args = vec!["plan", "proj/images.kdl", "--format", "json"];
    args.extend_from_slice(extra);
    let output = sandbox.graphbuild(&args);
    let plan: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
    (plan["nodes"][0]["steps"][0]["key"].clone(), output)
}

#[test]
fn without_a_checksum_the_key_follows_the_content_and_is_pending_offline() {
    let Some(sandbox) = sandbox() else { return };
    let server = http();
    server.serve("/nosum/data.txt", b"version 1\n");
    images_kdl(
        &sandbox,
        &format!(
            "    add \"{}\" \"/data.txt\"",
            server.url("/nosum/data.txt")
        ),
    );
    let (first, output) = add_key(&sandbox, &[]);
    assert_success(&output);
    assert!(first.is_string(), "a key: {}", stdout(&output));
    let (again, _) = add_key(&sandbox, &[]);
    assert_eq!(first, again, "the same content, the same key");
    server.serve("/nosum/data.txt", b"version 2\n");
    let (changed, _) = add_key(&sandbox, &[]);
    assert!(changed.is_string());
    assert_ne!(first, changed, "new content, a new key");
    let output = run(&sandbox, &[]);
    assert_success(&output);
    assert_eq!(
        file_in_images(&sandbox, "/data.txt"),
        (b"version 2\n".to_vec(), 0o600)
    );
    // Offline, the content cannot be known: the key is pending, plan still succeeds.
    let requests = server.requests("/nosum/data.txt");
    let (pending, output) = add_key(&sandbox, &["--offline"]);
    assert_success(&output);
    assert!(pending.is_null(), "pending offline: {}", stdout(&output));
    assert!(
        stderr(&output).contains(&server.url("/nosum/data.txt")),
        "the warning names the source: {}",
        stderr(&output)
    );
    assert!(
        stderr(&output).contains("1 base image or `add` source is unresolved"),
        "{}",
        stderr(&output)
    );
    assert_eq!(
        server.requests("/nosum/data.txt"),
        requests,
        "offline asks nothing"
    );
    let output = sandbox.graphbuild(&["run", "proj/images.kdl", "--offline", "--output", "out"]);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
}

#[test]
fn redirects_are_followed_and_a_download_over_the_limit_is_refused() {
    let Some(sandbox) = sandbox() else { return };
    let server = http();
    server.serve("/moved/target.txt", b"after the redirect\n");
    server.serve("/big/blob.bin", &vec![7u8; 64 * 1024]);
    images_kdl(
        &sandbox,
        &format!(
            "    add \"{}\" \"/opt/\" checksum=\"{}\"",
            server.url("/redirect/moved/target.txt"),
            sha256(b"after the redirect\n")
        ),
    );
    let output = run(&sandbox, &[]);
    assert_success(&output);
    // The name comes from the URL asked for, the content from where it led.
    assert_eq!(
        file_in_images(&sandbox, "/opt/target.txt").0,
        b"after the redirect\n"
    );
    assert_eq!(server.requests("/moved/target.txt"), 1);

    images_kdl(
        &sandbox,
        &format!(
            "    add \"{}\" \"/opt/\" checksum=\"{}\"",
            server.url("/big/blob.bin"),
            sha256(&vec![7u8; 64 * 1024])
        ),
    );
    let output = run(&sandbox, &[("GRAPHBUILD_MAX_DOWNLOAD_SIZE", "16K")]);
    assert!(!output.status.success());
    let text = stderr(&output) + &stdout(&output);
    assert!(text.contains("larger than the limit"), "{text}");
    // Within the limit it is fine.
    let output = run(&sandbox, &[("GRAPHBUILD_MAX_DOWNLOAD_SIZE", "1M")]);
    assert_success(&output);
    assert_eq!(file_in_images(&sandbox, "/opt/blob.bin").0.len(), 64 * 1024);
}

#[test]
fn credentials_in_a_url_reach_the_server_and_nothing_else() {
    let Some(sandbox) = sandbox() else { return };
    let server = http();
    server.serve("/private/file.txt", b"private\n");
    let url = server
        .url("/private/file.txt")
        .replace("http://", "http://deploy:s3cr3t-pw@");
    images_kdl(
        &sandbox,
        &format!("    add \"{url}?token=t0k3n\" \"/opt/\""),
    );
    let plan = sandbox.graphbuild(&["plan", "proj/images.kdl", "--format", "json"]);
    assert_success(&plan);
    let output = run(&sandbox, &[]);
    assert_success(&output);
    assert_eq!(file_in_images(&sandbox, "/opt/file.txt").0, b"private\n");
    let expected = format!("Basic {}", base64("deploy:s3cr3t-pw"));
    assert!(
        server
            .authorizations("/private/file.txt?token=t0k3n")
            .iter()
            .all(|auth| auth.as_deref() == Some(expected.as_str())),
        "{:?}",
        server.authorizations("/private/file.txt?token=t0k3n")
    );
    for text in [
        stdout(&plan),
        stderr(&plan),
        stdout(&output),
        stderr(&output),
    ] {
        assert!(
            !text.contains("s3cr3t") && !text.contains("t0k3n"),
            "{text}"
        );
    }
    // Nor in the image: configs, manifests and history of the layout.
    for (name, bytes) in tree_bytes(&sandbox.path().join("out")) {
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains("s3cr3t") && !text.contains("t0k3n"),
            "{name}"
        );
    }
}

fn base64(text: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = text.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let value = (u32::from(chunk[0]) << 16)
            | (u32::from(chunk.get(1).copied().unwrap_or(0)) << 8)
            | u32::from(chunk.get(2).copied().unwrap_or(0));
        for position in 0..4 {
            if position <= chunk.len() {
                out.push(char::from(
                    ALPHABET[((value >> (18 - 6 * position)) & 63) as usize],
                ));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A tar of `entries` (path, mode, content; a path ending in `/` is a directory).
fn tar_of(entries: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, mode, content) in entries {
        let mut header = tar::Header::new_ustar();
        header.set_mode(*mode);
        header.set_mtime(1_700_000_000);
        if path.ends_with('/') {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            builder
                .append_data(&mut header, path, std::io::empty())
                .expect("dir");
        } else {
            header.set_size(content.len() as u64);
            builder
                .append_data(&mut header, path, *content)
                .expect("file");
        }
    }
    builder.into_inner().expect("tar")
}

/// `bytes` compressed by the command-line `tool` (`bzip2`, `xz`, `zstd`).
fn compress(tool: &str, bytes: &[u8]) -> Vec<u8> {
    require_tool(tool);
    let mut child = Command::new(tool)
        .arg("-c")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("compressor runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(bytes)
        .expect("write");
    let output = child.wait_with_output().expect("compressor ends");
    assert!(output.status.success(), "{tool} failed");
    output.stdout
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("gzip")
}

#[test]
fn local_tar_archives_are_extracted_by_content() {
    let Some(sandbox) = sandbox() else { return };
    let archive = tar_of(&[
        ("pkg/", 0o755, b""),
        ("pkg/README", 0o640, b"read me\n"),
        ("pkg/bin/tool", 0o755, b"#!/bin/sh\necho tool\n"),
    ]);
    std::fs::create_dir_all(sandbox.path().join("proj")).expect("mkdir");
    // gzip, named as such; a plain tar named like anything; a gzip that is no tar.
    std::fs::write(sandbox.path().join("proj/pkg.tar.gz"), gzip(&archive)).expect("write");
    std::fs::write(sandbox.path().join("proj/plain.bin"), &archive).expect("write");
    std::fs::write(sandbox.path().join("proj/notes.gz"), gzip(b"not a tar\n")).expect("write");
    // bzip2 and xz as Docker, zstd as BuildKit: by content, whatever the name.
    for (tool, name) in [("bzip2", "b.any"), ("xz", "x.any"), ("zstd", "z.any")] {
        std::fs::write(
            sandbox.path().join("proj").join(name),
            compress(tool, &archive),
        )
        .expect("write");
    }
    images_kdl(
        &sandbox,
        "    add \"pkg.tar.gz\" \"/x/\"\n    add \"plain.bin\" \"/y\"\n    add \"notes.gz\" \"/z/\"\n    add \"b.any\" \"x.any\" \"z.any\" \"/w/\"",
    );
    let output = run(&sandbox, &[]);
    assert_success(&output);
    for dir in ["/w/pkg", "/y/pkg"] {
        assert_eq!(
            file_in_images(&sandbox, &format!("{dir}/bin/tool")),
            (b"#!/bin/sh\necho tool\n".to_vec(), 0o755)
        );
    }
    assert!(!exists_in_images(&sandbox, "/w/b.any"));
    // The sandbox path writes the same image as the direct path.
    let other_store = sandbox.path().join("store-sandboxed");
    let sandboxed = sandbox.graphbuild_with_env(
        &[
            ("GRAPHBUILD_DIRECT_COPY", "0"),
            ("GRAPHBUILD_CACHE_DIR", other_store.to_str().expect("utf-8")),
        ],
        &[
            "run",
            "proj/images.kdl",
            "--output",
            "out-sandboxed",
            "--progress",
            "json",
        ],
    );
    assert_success(&sandboxed);
    assert_eq!(
        summary(&sandboxed)["images"][0]["index_digest"],
        summary(&output)["images"][0]["index_digest"],
        "direct and sandboxed add give one image"
    );
    assert_eq!(
        file_in_images(&sandbox, "/x/pkg/README"),
        (b"read me\n".to_vec(), 0o640)
    );
    assert_eq!(
        file_in_images(&sandbox, "/x/pkg/bin/tool"),
        (b"#!/bin/sh\necho tool\n".to_vec(), 0o755)
    );
    assert_eq!(file_in_images(&sandbox, "/y/pkg/README").0, b"read me\n");
    // Not an archive: copied as it is, as Docker does.
    assert_eq!(
        file_in_images(&sandbox, "/z/notes.gz").0,
        gzip(b"not a tar\n")
    );
    assert!(!exists_in_images(&sandbox, "/x/pkg.tar.gz"));
    // A `copy` of the same archive keeps it whole.
    images_kdl(&sandbox, "    copy \"pkg.tar.gz\" \"/x/\"");
    let output = run(&sandbox, &[]);
    assert_success(&output);
    assert_eq!(file_in_images(&sandbox, "/x/pkg.tar.gz").0, gzip(&archive));
}

/// A tar with raw entry names (the tar crate refuses `..` when it builds paths itself).
fn raw_tar(entries: &[RawEntry<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, kind, link, content) in entries {
        let mut header = tar::Header::new_gnu();
        {
            let old = header.as_old_mut();
            old.name[..name.len()].copy_from_slice(name);
            old.linkname[..link.len()].copy_from_slice(link);
        }
        header.set_entry_type(*kind);
        header.set_mode(0o644);
        header.set_size(content.len() as u64);
        header.set_cksum();
        builder.append(&header, *content).expect("append");
    }
    builder.into_inner().expect("tar")
}

#[test]
fn hostile_archives_are_refused_and_write_nothing_outside() {
    let Some(sandbox) = sandbox() else { return };
    let outside = sandbox.path().join("outside");
    std::fs::create_dir_all(&outside).expect("mkdir");
    std::fs::create_dir_all(sandbox.path().join("proj")).expect("mkdir");
    let escape = raw_tar(&[(
        b"../../../escaped.txt",
        tar::EntryType::Regular,
        b"",
        b"x\n",
    )]);
    let target = outside.to_string_lossy().into_owned();
    let through = raw_tar(&[
        (b"link", tar::EntryType::Symlink, target.as_bytes(), b""),
        (b"link/pwned.txt", tar::EntryType::Regular, b"", b"pwned\n"),
    ]);
    std::fs::write(sandbox.path().join("proj/escape.tar"), gzip(&escape)).expect("write");
    std::fs::write(sandbox.path().join("proj/through.tar"), &through).expect("write");
    for (archive, what) in [("escape.tar", "`..`"), ("through.tar", "symlink")] {
        images_kdl(&sandbox, &format!("    add \"{archive}\" \"/x/\""));
        let output = run(&sandbox, &[]);
        assert!(!output.status.success(), "{archive} is refused");
        let text = stderr(&output) + &stdout(&output);
        assert!(
            text.contains(&format!("cannot extract {archive}")),
            "{what}: {text}"
        );
    }
    assert!(!outside.join("pwned.txt").exists());
    assert!(!sandbox.path().join("escaped.txt").exists());
    assert_eq!(std::fs::read_dir(&outside).expect("read").count(), 0);
}

#[test]
fn git_repositories_at_a_tag_a_commit_and_a_subdirectory() {
    let Some(sandbox) = sandbox() else { return };
    let Some(server) = git_server(&sandbox.path().join("git")) else {
        return;
    };
    let repo = format!("git://127.0.0.1:{}/repo.git", server.port);
    images_kdl(
        &sandbox,
        &format!(
            "    add \"{repo}#v1\" \"/tag/\"\n    add \"{repo}#{second}:sub\" \"/commit-sub\"\n    add \"{repo}\" \"/head/\" keep-git-dir=#true",
            second = server.second
        ),
    );
    let output = run(&sandbox, &[]);
    assert_success(&output);
    // Another store checks the repository out again: the same image, `.git` included.
    let other_store = sandbox.path().join("store-again");
    let again = sandbox.graphbuild_with_env(
        &[("GRAPHBUILD_CACHE_DIR", other_store.to_str().expect("utf-8"))],
        &[
            "run",
            "proj/images.kdl",
            "--output",
            "out-again",
            "--progress",
            "json",
        ],
    );
    assert_success(&again);
    assert_eq!(
        summary(&again)["images"][0]["index_digest"],
        summary(&output)["images"][0]["index_digest"],
        "a checkout is reproducible"
    );
    assert_eq!(
        file_in_images(&sandbox, "/tag/README"),
        (b"version 1\n".to_vec(), 0o644)
    );
    // git records 0755 for any executable, whatever the checkout's umask.
    assert_eq!(
        file_in_images(&sandbox, "/tag/sub/tool.sh"),
        (b"#!/bin/sh\necho 1\n".to_vec(), 0o755)
    );
    assert!(
        !exists_in_images(&sandbox, "/tag/.git"),
        "no .git by default"
    );
    assert_eq!(
        file_in_images(&sandbox, "/commit-sub/tool.sh").0,
        b"#!/bin/sh\necho 1\n"
    );
    assert!(!exists_in_images(&sandbox, "/commit-sub/README"));
    assert_eq!(file_in_images(&sandbox, "/head/README").0, b"version 2\n");
    assert_eq!(
        String::from_utf8(file_in_images(&sandbox, "/head/.git/HEAD").0)
            .expect("utf-8")
            .trim(),
        server.second
    );
    // Keyed by the commit: the plan names none of the refs, and a key moves with its ref.
    let (key, output) = add_key(&sandbox, &[]);
    assert_success(&output);
    images_kdl(
        &sandbox,
        &format!("    add \"{repo}#{}\" \"/tag/\"", server.first),
    );
    let (by_commit, _) = add_key(&sandbox, &[]);
    assert_eq!(key, by_commit, "v1 and its commit are one key");
    // Offline, a tag is pending; a full commit hash is not.
    images_kdl(&sandbox, &format!("    add \"{repo}#v1\" \"/tag/\""));
    let (pending, output) = add_key(&sandbox, &["--offline"]);
    assert_success(&output);
    assert!(pending.is_null());
    images_kdl(
        &sandbox,
        &format!("    add \"{repo}#{}\" \"/tag/\"", server.first),
    );
    let (offline, _) = add_key(&sandbox, &["--offline"]);
    assert_eq!(offline, key);
    // A ref the repository does not have is the build file's error.
    images_kdl(&sandbox, &format!("    add \"{repo}#v9\" \"/tag/\""));
    let output = sandbox.graphbuild(&["plan", "proj/images.kdl"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("no branch or tag `v9`"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_dockerfile_add_builds_like_its_kdl_twin() {
    let Some(sandbox) = sandbox() else { return };
    let server = http();
    let body = b"from the dockerfile\n";
    server.serve("/docker/asset.txt", body);
    let archive = tar_of(&[("lib/", 0o755, b""), ("lib/a.txt", 0o644, b"a\n")]);
    std::fs::create_dir_all(sandbox.path().join("ctx")).expect("mkdir");
    std::fs::write(sandbox.path().join("ctx/lib.tgz"), gzip(&archive)).expect("write");
    sandbox.busybox("ctx/busybox");
    sandbox.write(
        "ctx/Dockerfile",
        &format!(
            "FROM oci:busybox:1.35.0\nADD --checksum={} --chmod=644 {} /opt/\nADD lib.tgz /usr/local/\n",
            sha256(body),
            server.url("/docker/asset.txt")
        ),
    );
    let output = sandbox.graphbuild(&[
        "build",
        "--platform",
        "linux/amd64,linux/arm64",
        "-o",
        "type=local,dest=rootfs",
        "ctx",
    ]);
    assert_success(&output);
    assert_eq!(
        file_in_images(&sandbox, "/opt/asset.txt"),
        (body.to_vec(), 0o644)
    );
    assert_eq!(file_in_images(&sandbox, "/usr/local/lib/a.txt").0, b"a\n");
    // A flag ADD does not have is refused by name.
    sandbox.write(
        "ctx/Dockerfile",
        "FROM oci:busybox:1.35.0\nADD --from=x a /b\n",
    );
    let output = sandbox.graphbuild(&["build", "ctx"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("--from"), "{}", stderr(&output));
}

/// A source that cannot be reached is unresolved, and its reason (git's or the HTTP client's
/// error) is shown by `plan` and `run`: with neither the password nor the query's token, which
/// git prints when it names the URL without its userinfo.
#[test]
fn credentials_never_reach_the_error_of_an_unreachable_source() {
    let Some(sandbox) = sandbox() else { return };
    // Nothing listens on port 1 of loopback: the connection is refused at once.
    for source in [
        "http://deploy:s3cr3t-pw@127.0.0.1:1/private/repo.git?token=t0k3n",
        "http://deploy:s3cr3t-pw@127.0.0.1:1/private/file.txt?token=t0k3n",
    ] {
        images_kdl(&sandbox, &format!("    add \"{source}\" \"/opt/\""));
        let plan = sandbox.graphbuild(&["plan", "proj/images.kdl"]);
        assert_success(&plan);
        let output = run(&sandbox, &[]);
        assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
        for text in [stderr(&plan), stderr(&output), stdout(&output)] {
            assert!(
                !text.contains("s3cr3t") && !text.contains("t0k3n") && !text.contains("deploy"),
                "{source}: {text}"
            );
        }
        // The reason is shown, redacted.
        assert!(
            stderr(&plan).contains("http://127.0.0.1:1/private/"),
            "{source}: {}",
            stderr(&plan)
        );
    }
}

/// The files of a commit are its bytes, whatever the user's git configuration says about line
/// endings: the step is keyed by the commit alone, so a `core.autocrlf` in `~/.gitconfig` must
/// not give one key two contents (nor a shared cache a layer another machine would not make).
#[test]
fn a_git_checkout_ignores_the_users_line_ending_settings() {
    let Some(sandbox) = sandbox() else { return };
    let Some(server) = git_server(&sandbox.path().join("git")) else {
        return;
    };
    let home = sandbox.path().join("home");
    std::fs::create_dir_all(&home).expect("mkdir");
    std::fs::write(
        home.join(".gitconfig"),
        "[core]\n\tautocrlf = true\n\teol = crlf\n",
    )
    .expect("write");
    let repo = format!("git://127.0.0.1:{}/repo.git", server.port);
    images_kdl(&sandbox, &format!("    add \"{repo}#v1\" \"/tag/\""));
    let home = home.to_string_lossy().into_owned();
    let output = run(&sandbox, &[("HOME", &home), ("XDG_CONFIG_HOME", &home)]);
    assert_success(&output);
    assert_eq!(
        file_in_images(&sandbox, "/tag/README"),
        (b"version 1\n".to_vec(), 0o644)
    );
    assert_eq!(
        file_in_images(&sandbox, "/tag/sub/tool.sh").0,
        b"#!/bin/sh\necho 1\n"
    );
}

/// A destination ending in `.` or `..` is a directory, as in Docker: `ADD https://… .` adds
/// the file, named after the URL, into the working directory.
#[test]
fn a_download_into_dot_lands_in_the_directory_under_its_own_name() {
    let Some(sandbox) = sandbox() else { return };
    let server = http();
    server.serve("/dot/dl.txt", b"into the directory\n");
    let url = server.url("/dot/dl.txt");
    let checksum = sha256(b"into the directory\n");
    images_kdl(
        &sandbox,
        &format!(
            "    workdir \"/w\"\n    add \"{url}\" \".\" checksum=\"{checksum}\"\n    add \"{url}\" \"sub/.\" checksum=\"{checksum}\"\n    add \"{url}\" \"/opt/..\" checksum=\"{checksum}\""
        ),
    );
    let output = run(&sandbox, &[]);
    assert_success(&output);
    for path in ["/w/dl.txt", "/w/sub/dl.txt", "/dl.txt"] {
        assert_eq!(
            file_in_images(&sandbox, path),
            (b"into the directory\n".to_vec(), 0o600),
            "{path}"
        );
    }
}
