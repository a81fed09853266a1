//! Store and cache integrity end to end (issue 11): a layer whose content does not match the
//! diff_id its config claims never poisons the store, a corrupt blob heals on the next build,
//! `cache verify [--repair]`, bombs hit the per-layer cap, the store is private to its owner,
//! and odd context file names do not break builds.

mod common;

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use common::*;
use sha2::Digest as _;

/// Root is needed to run steps (namespaces, overlayfs). Under CI a missing root is a failure,
/// elsewhere the test is skipped.
fn root_or_skip() -> bool {
    prerequisite(
        nix::unistd::geteuid().is_root(),
        "this end-to-end test runs build steps and needs root; run the test suite as root",
    )
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

fn hex_of(digest: &str) -> &str {
    digest.trim_start_matches("sha256:")
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("gzip")
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .read_to_end(&mut out)
        .expect("gunzip");
    out
}

fn put_blob(layout: &Path, bytes: &[u8]) -> (String, usize) {
    let digest = sha256(bytes);
    std::fs::write(layout.join("blobs/sha256").join(hex_of(&digest)), bytes).expect("blob");
    (digest, bytes.len())
}

/// The busybox fixture's amd64 manifest and config.
fn busybox_amd64(sandbox: &Sandbox) -> (serde_json::Value, serde_json::Value) {
    let fixture = sandbox.path().join("tests/fixtures/busybox");
    let blob = |digest: &str| fixture.join("blobs/sha256").join(hex_of(digest));
    let top = read_json(&fixture.join("index.json"));
    let nested = read_json(&blob(
        top["manifests"][0]["digest"].as_str().expect("digest"),
    ));
    let amd64 = nested["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|descriptor| descriptor["platform"]["architecture"] == "amd64")
        .expect("amd64 manifest")
        .clone();
    let manifest = read_json(&blob(amd64["digest"].as_str().expect("digest")));
    let config = read_json(&blob(
        manifest["config"]["digest"].as_str().expect("config"),
    ));
    (manifest, config)
}

/// A tar entry header for a regular file (ustar).
fn file_header(path: &str, size: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_path(path).expect("path");
    header.set_size(size);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header.set_cksum();
    header
}

/// `tar` with one more file appended after its last entry (its end-of-archive blocks moved
/// after the new entry).
fn append_file(tar_bytes: &[u8], path: &str, contents: &[u8]) -> Vec<u8> {
    let mut archive = tar::Archive::new(tar_bytes);
    let mut end = 0u64;
    for entry in archive.entries().expect("entries") {
        let entry = entry.expect("entry");
        let data_end = entry.raw_file_position() + entry.header().entry_size().expect("size");
        end = data_end.div_ceil(512) * 512;
    }
    let mut out = tar_bytes[..end as usize].to_vec();
    let header = file_header(path, contents.len() as u64);
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(contents);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.resize(out.len() + 1024, 0);
    out
}

/// An OCI layout tagged `evil`, linux/amd64 only, whose single layer is busybox's layer plus
/// `/POISONED`, while its config is busybox's own: it claims busybox's diff_id. Returns the
/// forged layer's digest.
fn forged_busybox(sandbox: &Sandbox, layout: &Path) -> String {
    let (mut manifest, config) = busybox_amd64(sandbox);
    let fixture = sandbox.path().join("tests/fixtures/busybox/blobs/sha256");
    std::fs::create_dir_all(layout.join("blobs/sha256")).expect("mkdir");
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("marker");
    let layers = manifest["layers"].as_array().expect("layers").clone();
    assert_eq!(layers.len(), 1, "the busybox fixture has one layer");
    let real = std::fs::read(fixture.join(hex_of(layers[0]["digest"].as_str().expect("digest"))))
        .expect("busybox layer");
    let tar_bytes = append_file(&gunzip(&real), "POISONED", b"owned\n");
    let (layer_digest, layer_size) = put_blob(layout, &gzip(&tar_bytes));
    // The config is untouched: rootfs.diff_ids still names busybox's real layer.
    let (config_digest, config_size) =
        put_blob(layout, &serde_json::to_vec(&config).expect("json"));
    manifest["config"]["digest"] = config_digest.into();
    manifest["config"]["size"] = config_size.into();
    manifest["layers"][0]["digest"] = layer_digest.clone().into();
    manifest["layers"][0]["size"] = layer_size.into();
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
    layer_digest
}

fn build_file(sandbox: &Sandbox, name: &str, from: &str, run: &str) -> String {
    sandbox.write(
        &format!("{name}/images.kdl"),
        &format!(
            "platforms \"linux/amd64\"\nstage main {{\n    from \"{from}\"\n    run \"{run}\"\n}}\nimage main {{ stage main; }}\n"
        ),
    );
    format!("{name}/images.kdl")
}

fn run(sandbox: &Sandbox, file: &str, out: &str) -> Output {
    sandbox.graphbuild(&["run", file, "--output", out, "--progress", "json"])
}

const BUSYBOX: &str = "oci:../tests/fixtures/busybox:1.35.0";

/// Every tar entry name in every layer of an output layout.
fn layer_entries(layout: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(layout.join("blobs/sha256")).expect("blobs") {
        let bytes = std::fs::read(entry.expect("entry").path()).expect("blob");
        if bytes.starts_with(&[0x1f, 0x8b]) {
            let tar_bytes = gunzip(&bytes);
            let mut archive = tar::Archive::new(tar_bytes.as_slice());
            for item in archive.entries().expect("entries") {
                names.push(
                    item.expect("entry")
                        .path()
                        .expect("path")
                        .display()
                        .to_string(),
                );
            }
        }
    }
    names
}

fn busybox_diff_id(sandbox: &Sandbox) -> String {
    let (_, config) = busybox_amd64(sandbox);
    config["rootfs"]["diff_ids"][0]
        .as_str()
        .expect("diff_id")
        .to_string()
}

#[test]
fn a_layer_claiming_busybox_diff_id_is_refused_and_never_poisons_busybox() {
    if !root_or_skip() {
        return;
    }
    let sandbox = Sandbox::new();
    let forged = forged_busybox(&sandbox, &sandbox.path().join("forged/evil"));
    let diff_id = busybox_diff_id(&sandbox);
    let snapshot = sandbox
        .store()
        .join("snapshots")
        .join(format!("sha256-{}", hex_of(&diff_id)));

    // The forged base first, on an empty store.
    let evil = build_file(&sandbox, "forged", "oci:evil:evil", "true");
    let output = run(&sandbox, &evil, "forged/out");
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    let all = format!("{}{}", stdout(&output), stderr(&output));
    for needle in [
        forged.as_str(),
        "oci:evil:evil",
        "linux/amd64",
        "diff_id",
        &diff_id,
    ] {
        assert!(all.contains(needle), "the error names `{needle}`:\n{all}");
    }
    assert!(!all.contains("panicked"), "{all}");
    assert!(
        !snapshot.exists(),
        "nothing is stored under busybox's diff_id"
    );

    // The real busybox on the same store: clean.
    let real = build_file(
        &sandbox,
        "real",
        BUSYBOX,
        "test ! -e /POISONED && echo clean > /clean",
    );
    let output = run(&sandbox, &real, "real/out");
    assert_success(&output);
    assert!(snapshot.is_dir(), "the real layer's verified snapshot");
    let entries = layer_entries(&sandbox.path().join("real/out/main"));
    assert!(
        entries.iter().any(|name| name.ends_with("clean")),
        "{entries:?}"
    );
    assert!(
        !entries.iter().any(|name| name.contains("POISONED")),
        "{entries:?}"
    );

    // The forged base again, now that a snapshot of busybox's diff_id exists: still refused.
    let output = run(&sandbox, &evil, "forged/out");
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    assert!(stderr(&output).contains(&forged) || stdout(&output).contains(&forged));
    // And busybox is still clean (fully cached).
    let output = run(&sandbox, &real, "real/out2");
    assert_success(&output);
    assert_eq!(summary(&output)["executed"], 0);

    // `copy from=` a stage on the forged base, and the forged base re-tagged with no step:
    // refused as well.
    sandbox.write(
        "forged/copy.kdl",
        &format!(
            "platforms \"linux/amd64\"\nstage evil {{\n    from \"oci:evil:evil\"\n}}\nstage main {{\n    from \"{BUSYBOX}\"\n    copy \"/POISONED\" \"/copied\" from=evil\n}}\nimage main {{ stage main; }}\nimage evil {{ stage evil; }}\n"
        ),
    );
    let output = run(&sandbox, "forged/copy.kdl", "forged/out-copy");
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    let all = format!("{}{}", stdout(&output), stderr(&output));
    assert!(all.contains(&forged) && all.contains("diff_id"), "{all}");
    assert!(!sandbox.path().join("forged/out-copy/main").exists());
    assert!(!sandbox.path().join("forged/out-copy/evil").exists());
    sandbox.write(
        "forged/retag.kdl",
        "platforms \"linux/amd64\"\nstage evil {\n    from \"oci:evil:evil\"\n}\nimage evil { stage evil; }\n",
    );
    let output = run(&sandbox, "forged/retag.kdl", "forged/out-retag");
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    let all = format!("{}{}", stdout(&output), stderr(&output));
    assert!(
        all.contains(&forged) && all.contains("oci:evil:evil"),
        "{all}"
    );
    // Busybox is still clean.
    let output = run(&sandbox, &real, "real/out3");
    assert_success(&output);
    assert!(snapshot.is_dir());
}

/// The digest of an output layout's image index (its first manifest).
fn index_digest(layout: &Path) -> String {
    read_json(&layout.join("index.json"))["manifests"][0]["digest"]
        .as_str()
        .expect("digest")
        .to_string()
}

/// The layer digests of the amd64 image in an output layout.
fn output_layers(layout: &Path) -> Vec<String> {
    let blob = |digest: &str| layout.join("blobs/sha256").join(hex_of(digest));
    let index = read_json(&blob(&index_digest(layout)));
    let manifest = read_json(&blob(
        index["manifests"][0]["digest"].as_str().expect("manifest"),
    ));
    manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|layer| layer["digest"].as_str().expect("digest").to_string())
        .collect()
}

/// Flip every byte of a blob in place (same size, wrong content).
fn corrupt(path: &Path) {
    let mut bytes = std::fs::read(path).expect("blob");
    for byte in &mut bytes {
        *byte = !*byte;
    }
    std::fs::write(path, bytes).expect("corrupt");
}

fn warnings(output: &Output) -> Vec<String> {
    events(output)
        .into_iter()
        .filter(|event| event["event"] == "warning")
        .map(|event| event["message"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn a_corrupt_blob_heals_on_the_next_build_and_cache_verify_finds_and_repairs() {
    if !root_or_skip() {
        return;
    }
    let sandbox = Sandbox::new();
    let file = build_file(&sandbox, "heal", BUSYBOX, "echo hello > /hello");
    let first = run(&sandbox, &file, "heal/out1");
    assert_success(&first);
    let layout = sandbox.path().join("heal/out1/main");
    let digest = index_digest(&layout);
    let layers = output_layers(&layout);
    let own = layers.last().expect("the run step's layer").clone();
    let base = layers.first().expect("busybox's layer").clone();
    let blob = |digest: &str| sandbox.store().join("blobs/sha256").join(hex_of(digest));

    let verified = sandbox.graphbuild(&["cache", "verify"]);
    assert_success(&verified);
    assert!(
        stdout(&verified).contains(": 0 problems"),
        "{}",
        stdout(&verified)
    );

    // Same size, wrong content: found when the layout is written, removed, rebuilt.
    corrupt(&blob(&own));
    let second = run(&sandbox, &file, "heal/out2");
    assert_success(&second);
    assert_eq!(index_digest(&sandbox.path().join("heal/out2/main")), digest);
    let warned = warnings(&second);
    assert!(
        warned
            .iter()
            .any(|message| message.contains(&own) && message.contains("corrupt")),
        "{warned:?}"
    );
    assert_eq!(sha256(&std::fs::read(blob(&own)).expect("healed")), own);

    // Truncated: found by size on lookup.
    std::fs::write(blob(&own), b"short").expect("truncate");
    let third = run(&sandbox, &file, "heal/out3");
    assert_success(&third);
    assert_eq!(index_digest(&sandbox.path().join("heal/out3/main")), digest);
    assert!(!warnings(&third).is_empty());

    // The base image's layer truncated: copied again from the layout.
    std::fs::write(blob(&base), b"short").expect("truncate");
    let output = run(&sandbox, &file, "heal/out3b");
    assert_success(&output);
    assert_eq!(
        index_digest(&sandbox.path().join("heal/out3b/main")),
        digest
    );
    assert_eq!(sha256(&std::fs::read(blob(&base)).expect("healed")), base);

    // --no-cache too.
    corrupt(&blob(&own));
    let output = sandbox.graphbuild(&[
        "run",
        &file,
        "--output",
        "heal/out4",
        "--progress",
        "json",
        "--no-cache",
    ]);
    assert_success(&output);
    assert_eq!(index_digest(&sandbox.path().join("heal/out4/main")), digest);

    // cache verify reports a corrupt blob and exits 1; --repair removes it; the build is whole.
    corrupt(&blob(&base));
    let verified = sandbox.graphbuild(&["cache", "verify"]);
    assert_eq!(verified.status.code(), Some(1), "{}", stdout(&verified));
    let text = stdout(&verified);
    assert!(
        text.contains(hex_of(&base)) && text.contains("corrupt"),
        "{text}"
    );
    assert!(blob(&base).exists(), "verify alone changes nothing");
    let repaired = sandbox.graphbuild(&["cache", "verify", "--repair"]);
    assert_success(&repaired);
    assert!(
        stdout(&repaired).contains("(removed)"),
        "{}",
        stdout(&repaired)
    );
    assert!(!blob(&base).exists());
    let again = sandbox.graphbuild(&["cache", "verify"]);
    assert_success(&again);
    let output = run(&sandbox, &file, "heal/out5");
    assert_success(&output);
    assert_eq!(index_digest(&sandbox.path().join("heal/out5/main")), digest);
    assert_success(&sandbox.graphbuild(&["cache", "verify"]));
}

/// A gzip layer of `size` bytes of 'A' in one file: a compression bomb (about 1000:1).
fn gzip_bomb(size: u64) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder
        .write_all(file_header("bomb", size).as_bytes())
        .expect("gzip");
    let chunk = vec![b'A'; 1 << 20];
    let mut left = size;
    while left > 0 {
        let take = left.min(chunk.len() as u64) as usize;
        encoder.write_all(&chunk[..take]).expect("gzip");
        left -= take as u64;
    }
    encoder.write_all(&[0u8; 1024 + 512]).expect("gzip");
    encoder.finish().expect("gzip")
}

/// A layout tagged `evil`: busybox's layer, then `layer` with the diff_id `diff_id`.
fn layout_with_layer(sandbox: &Sandbox, layout: &Path, layer: &[u8], diff_id: &str) {
    let (mut manifest, mut config) = busybox_amd64(sandbox);
    let fixture = sandbox.path().join("tests/fixtures/busybox/blobs/sha256");
    std::fs::create_dir_all(layout.join("blobs/sha256")).expect("mkdir");
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("marker");
    for existing in manifest["layers"].as_array().expect("layers") {
        let digest = existing["digest"].as_str().expect("digest");
        std::fs::copy(
            fixture.join(hex_of(digest)),
            layout.join("blobs/sha256").join(hex_of(digest)),
        )
        .expect("copy");
    }
    let (layer_digest, layer_size) = put_blob(layout, layer);
    config["rootfs"]["diff_ids"]
        .as_array_mut()
        .expect("diff_ids")
        .push(diff_id.into());
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

fn graphbuild_env(sandbox: &Sandbox, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(bin());
    command
        .args(args)
        .current_dir(sandbox.path())
        .env("GRAPHBUILD_CACHE_DIR", sandbox.store())
        .env("NO_COLOR", "1");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("graphbuild runs")
}

/// Allocated bytes under a directory.
fn allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if let Ok(metadata) = entry.path().symlink_metadata() {
                total += metadata.blocks() * 512;
                if metadata.is_dir() {
                    stack.push(entry.path());
                }
            }
        }
    }
    total
}

#[test]
fn the_layers_of_one_build_are_bounded_together() {
    if !root_or_skip() {
        return;
    }
    let sandbox = Sandbox::new();
    // busybox's amd64 layer holds about 2 MB of files: a 1 MiB budget for the whole build
    // refuses it, although it is far below the per-layer limit.
    let file = build_file(&sandbox, "budget", BUSYBOX, "true");
    let output = graphbuild_env(
        &sandbox,
        &[
            "run",
            &file,
            "--output",
            "budget/out",
            "--progress",
            "plain",
        ],
        &[("GRAPHBUILD_MAX_BUILD_UNPACK", "1M")],
    );
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    let all = format!("{}{}", stdout(&output), stderr(&output));
    assert!(all.contains("the limit per build"), "{all}");
    assert!(all.contains("GRAPHBUILD_MAX_BUILD_UNPACK"), "{all}");
    let snapshots = sandbox.store().join("snapshots");
    assert!(
        !snapshots.exists()
            || std::fs::read_dir(&snapshots)
                .expect("snapshots")
                .all(|entry| !entry
                    .expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .starts_with("sha256-")),
        "no snapshot of the refused layer"
    );
    // The default budget (100 GiB) builds it.
    assert_success(&run(&sandbox, &file, "budget/out"));
}

#[test]
fn a_gzip_bomb_base_layer_hits_the_layer_cap_quickly() {
    if !root_or_skip() {
        return;
    }
    let sandbox = Sandbox::new();
    let size: u64 = 256 << 20;
    let bomb = gzip_bomb(size);
    assert!(bomb.len() < 4 << 20, "a bomb: {} bytes", bomb.len());
    let mut tar_bytes = Vec::new();
    flate2::read::GzDecoder::new(bomb.as_slice())
        .read_to_end(&mut tar_bytes)
        .expect("gunzip");
    let diff_id = sha256(&tar_bytes);
    drop(tar_bytes);
    layout_with_layer(&sandbox, &sandbox.path().join("bomb/evil"), &bomb, &diff_id);
    let file = build_file(&sandbox, "bomb", "oci:evil:evil", "true");
    let started = std::time::Instant::now();
    let output = graphbuild_env(
        &sandbox,
        &["run", &file, "--output", "bomb/out", "--progress", "plain"],
        &[("GRAPHBUILD_MAX_LAYER_SIZE", "32M")],
    );
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    let all = format!("{}{}", stdout(&output), stderr(&output));
    assert!(all.contains("limit per layer"), "{all}");
    assert!(started.elapsed().as_secs() < 30, "{:?}", started.elapsed());
    assert!(
        allocated(&sandbox.store()) < 40 << 20,
        "bounded disk: {} bytes",
        allocated(&sandbox.store())
    );
    assert!(
        std::fs::read_dir(sandbox.store().join("tmp"))
            .expect("tmp")
            .all(|entry| !entry.expect("entry").path().is_dir()),
        "nothing half-written left"
    );
    // Under the default cap (10 GiB or 100 times the compressed size) the same layer is fine.
    let output = run(&sandbox, &file, "bomb/out");
    assert_success(&output);
}

#[test]
fn the_store_and_its_temporary_files_and_secrets_are_private() {
    if !root_or_skip() {
        return;
    }
    let sandbox = Sandbox::new();
    // An existing store from an older graphbuild, world-readable.
    std::fs::create_dir_all(sandbox.store().join("tmp")).expect("mkdir");
    for dir in [sandbox.store(), sandbox.store().join("tmp")] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    sandbox.write("private/token.txt", "s3cret\n");
    sandbox.write(
        "private/images.kdl",
        &format!(
            "platforms \"linux/amd64\"\nstage main {{\n    from \"{BUSYBOX}\"\n    run \"stat -c %a /run/secrets/token > /secret-mode\" {{\n        secret \"token\"\n    }}\n}}\nimage main {{ stage main; }}\n"
        ),
    );
    let output = sandbox.graphbuild(&[
        "run",
        "private/images.kdl",
        "--output",
        "private/out",
        "--progress",
        "plain",
        "--secret",
        "id=token,src=private/token.txt",
    ]);
    assert_success(&output);
    let mode = |path: &Path| std::fs::metadata(path).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&sandbox.store()), 0o700);
    assert_eq!(mode(&sandbox.store().join("tmp")), 0o700);
    // The secret as the step saw it.
    let layout = sandbox.path().join("private/out/main");
    let layers = output_layers(&layout);
    let bytes = std::fs::read(
        layout
            .join("blobs/sha256")
            .join(hex_of(layers.last().expect("layer"))),
    )
    .expect("layer");
    let tar_bytes = gunzip(&bytes);
    let mut archive = tar::Archive::new(tar_bytes.as_slice());
    let mut seen = None;
    for item in archive.entries().expect("entries") {
        let mut item = item.expect("entry");
        if item.path().expect("path").ends_with("secret-mode") {
            let mut text = String::new();
            item.read_to_string(&mut text).expect("read");
            seen = Some(text.trim().to_string());
        }
    }
    assert_eq!(seen.as_deref(), Some("600"), "the secret file is 0600");
}

#[test]
fn cache_du_does_not_create_a_missing_store() {
    let sandbox = Sandbox::new();
    let missing = sandbox.path().join("no-store-here");
    let output = sandbox.graphbuild_with_store(&missing, &["cache", "du"]);
    assert_success(&output);
    assert!(stdout(&output).contains("no store"), "{}", stdout(&output));
    assert!(!missing.exists(), "cache du created the store");
    let output = sandbox.graphbuild_with_store(&missing, &["cache", "verify"]);
    assert_success(&output);
    assert!(!missing.exists(), "cache verify created the store");
}

#[test]
fn a_context_file_with_a_non_utf8_name_does_not_break_builds() {
    if !root_or_skip() {
        return;
    }
    let sandbox = Sandbox::new();
    let context = sandbox.path().join("latin1");
    std::fs::create_dir_all(context.join("data")).expect("mkdir");
    let name = OsStr::from_bytes(b"caf\xe9.txt");
    std::fs::write(context.join("data").join(name), b"latin-1\n").expect("write");
    std::fs::write(context.join("ok.txt"), b"fine\n").expect("write");
    sandbox.write(
        "latin1/images.kdl",
        &format!(
            "platforms \"linux/amd64\"\nstage one {{\n    from \"{BUSYBOX}\"\n    copy \"ok.txt\" \"/ok.txt\"\n}}\nstage all {{\n    from \"{BUSYBOX}\"\n    copy \"data/\" \"/data/\"\n    run \"ls /data > /listing\"\n}}\nimage one {{ stage one; }}\nimage all {{ stage all; }}\n"
        ),
    );
    let output = sandbox.graphbuild(&[
        "run",
        "latin1/images.kdl",
        "--output",
        "latin1/out",
        "--progress",
        "plain",
    ]);
    assert_success(&output);
    // The file is copied under its byte name.
    let layout = sandbox.path().join("latin1/out/all");
    let layers = output_layers(&layout);
    let mut found = false;
    for layer in layers {
        let bytes = std::fs::read(layout.join("blobs/sha256").join(hex_of(&layer))).expect("layer");
        let tar_bytes = gunzip(&bytes);
        let mut archive = tar::Archive::new(tar_bytes.as_slice());
        for item in archive.entries().expect("entries") {
            let item = item.expect("entry");
            if item.path_bytes().ends_with(b"data/caf\xe9.txt") {
                found = true;
            }
        }
    }
    assert!(found, "data/caf\\xe9.txt is in the image");
}

#[test]
fn a_team_cache_record_naming_a_forged_layer_is_not_used() {
    use graphbuild_engine::remote::{ActionResult, HttpCache, RemoteCache};
    if !root_or_skip() {
        return;
    }
    let sandbox = Sandbox::new();
    let server = CacheServer::start(&sandbox.path().join("server"), &[]);
    let file = build_file(&sandbox, "team", BUSYBOX, "echo hi > /hi");
    let store_a = sandbox.path().join("store-a");
    let a = sandbox.graphbuild_with_store(
        &store_a,
        &[
            "run",
            &file,
            "--output",
            "team/out-a",
            "--progress",
            "json",
            "--cache-to",
            &server.url,
        ],
    );
    assert_success(&a);
    let digest = index_digest(&sandbox.path().join("team/out-a/main"));

    // Replace the step's record in the team cache: same diff_id, forged content.
    let plan = sandbox.graphbuild_with_store(&store_a, &["plan", &file, "--format", "json"]);
    assert_success(&plan);
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).expect("plan json");
    let key = plan["nodes"][0]["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .rev()
        .find(|step| step["kind"] == "run")
        .expect("the run step")["key"]
        .as_str()
        .expect("key")
        .to_string();
    let cache = HttpCache::new(&server.url, None).expect("cache");
    let action = cache.get_action(&key).expect("get").expect("uploaded");
    let (record_digest, record_size) = action.step_record().expect("a step record");
    let temp = tempfile::tempdir().expect("temp");
    assert!(
        cache
            .get_blob_to(&record_digest, record_size, &temp.path().join("record"))
            .expect("get")
    );
    let mut record = read_json(&temp.path().join("record"));
    let forged_tar = {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, contents) in [("POISONED", &b"owned\n"[..]), ("hi", &b"hi\n"[..])] {
            builder
                .append(&file_header(name, contents.len() as u64), contents)
                .expect("append");
        }
        builder.into_inner().expect("tar")
    };
    let forged = gzip(&forged_tar);
    let forged_digest = cache.put_blob_bytes(&forged).expect("put");
    let last = record["layers"].as_array().expect("layers").len() - 1;
    record["layers"][last]["digest"] = forged_digest.to_string().into();
    record["layers"][last]["size"] = forged.len().into();
    let bytes = serde_json::to_vec(&record).expect("json");
    let lying = cache.put_blob_bytes(&bytes).expect("put");
    cache
        .put_action(
            &key,
            &ActionResult::for_step_record(lying, bytes.len() as u64),
        )
        .expect("put action");

    // Another machine reads the cache: the record is refused, the step runs, nothing forged.
    let b = sandbox.graphbuild_with_store(
        &sandbox.path().join("store-b"),
        &[
            "run",
            &file,
            "--output",
            "team/out-b",
            "--progress",
            "json",
            "--cache-from",
            &server.url,
        ],
    );
    assert_success(&b);
    let warned = warnings(&b);
    assert!(
        warned
            .iter()
            .any(|message| message.contains(&forged_digest.to_string())
                && message.contains("diff_id")),
        "{warned:?}"
    );
    assert_eq!(summary(&b)["executed"], 1);
    assert_eq!(
        index_digest(&sandbox.path().join("team/out-b/main")),
        digest
    );
    let entries = layer_entries(&sandbox.path().join("team/out-b/main"));
    assert!(
        !entries.iter().any(|name| name.contains("POISONED")),
        "{entries:?}"
    );
}

fn octal(field: &mut [u8; 12], value: u64) {
    let text = format!("{value:011o}");
    field[..11].copy_from_slice(text.as_bytes());
    field[11] = 0;
}

/// A tar with one GNU sparse entry `name` of `real_size` bytes: a hole, then 512 bytes of `x`.
fn sparse_tar(name: &str, real_size: u64) -> Vec<u8> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::GNUSparse);
    header.set_path(name).expect("path");
    header.set_size(512);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    {
        let gnu = header.as_gnu_mut().expect("gnu header");
        octal(&mut gnu.sparse[0].offset, real_size - 512);
        octal(&mut gnu.sparse[0].numbytes, 512);
        octal(&mut gnu.realsize, real_size);
    }
    header.set_cksum();
    let mut tar_bytes = header.as_bytes().to_vec();
    tar_bytes.extend_from_slice(&[b'x'; 512]);
    tar_bytes.extend_from_slice(&[0u8; 1024]);
    tar_bytes
}

#[test]
fn a_sparse_bomb_hits_the_cap_and_a_sparse_file_is_stored_as_holes() {
    use std::os::unix::fs::MetadataExt;
    if !root_or_skip() {
        return;
    }
    let sandbox = Sandbox::new();
    let real_size = 1u64 << 30;
    let tar_bytes = sparse_tar("sparse", real_size);
    let layer = gzip(&tar_bytes);
    assert!(layer.len() < 32 * 1024);
    let diff_id = sha256(&tar_bytes);
    layout_with_layer(
        &sandbox,
        &sandbox.path().join("sparse/evil"),
        &layer,
        &diff_id,
    );
    let file = build_file(&sandbox, "sparse", "oci:evil:evil", "test -s /sparse");

    let started = std::time::Instant::now();
    let output = graphbuild_env(
        &sandbox,
        &[
            "run",
            &file,
            "--output",
            "sparse/out",
            "--progress",
            "plain",
        ],
        &[("GRAPHBUILD_MAX_LAYER_SIZE", "512M")],
    );
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    let all = format!("{}{}", stdout(&output), stderr(&output));
    assert!(all.contains("limit per layer"), "{all}");
    assert!(started.elapsed().as_secs() < 10, "{:?}", started.elapsed());
    let snapshot = sandbox
        .store()
        .join("snapshots")
        .join(format!("sha256-{}", hex_of(&diff_id)));
    assert!(!snapshot.exists());

    // Under the default cap it is a legitimate sparse file: stored as holes.
    let output = run(&sandbox, &file, "sparse/out");
    assert_success(&output);
    let metadata = std::fs::metadata(snapshot.join("sparse")).expect("the unpacked file");
    assert_eq!(metadata.len(), real_size);
    assert!(
        metadata.blocks() * 512 < 1 << 20,
        "{} bytes allocated",
        metadata.blocks() * 512
    );
}
