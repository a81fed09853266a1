//! `copy` written straight into its layer: no sandbox, one layer for every platform, the same
//! bytes as the sandbox path, and the sandbox path where the base could change the result.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

const BASE: &str = "oci:../tests/fixtures/busybox:1.35.0";

/// A context under `proj/` with a few files, a nested directory, a symlink and a mode.
fn context(sandbox: &Sandbox) {
    sandbox.write("proj/src/a.txt", "alpha\n");
    sandbox.write("proj/src/sub/b.txt", "beta\n");
    sandbox.write("proj/src/sub/deeper/c.sh", "#!/bin/sh\necho c\n");
    sandbox.write("proj/deps.txt", "zlib\nopenssl\n");
    let script = sandbox.path().join("proj/src/sub/deeper/c.sh");
    let status = Command::new("chmod").arg("755").arg(&script).status();
    assert!(status.is_ok_and(|status| status.success()));
    std::os::unix::fs::symlink("a.txt", sandbox.path().join("proj/src/link")).expect("symlink");
}

fn run(sandbox: &Sandbox, store: &str, env: &[(&str, &str)], output: &str) -> Output {
    let mut command = Command::new(bin());
    command
        .args([
            "run",
            "proj/images.kdl",
            "--output",
            output,
            "--progress",
            "json",
        ])
        .current_dir(sandbox.path())
        .env("GRAPHBUILD_CACHE_DIR", sandbox.path().join(store))
        .env("NO_COLOR", "1")
        .env_remove("SOURCE_DATE_EPOCH");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("graphbuild runs")
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).expect("read")).expect("JSON")
}

/// The layer digests of each platform's manifest of a layout, by platform.
fn layers_by_platform(layout: &Path) -> Vec<(String, Vec<String>)> {
    let blob = |digest: &str| {
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let index = read_json(&layout.join("index.json"));
    let image_index = read_json(&blob(
        index["manifests"][0]["digest"].as_str().expect("digest"),
    ));
    image_index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        // Attestation manifests (unknown/unknown) are not platforms.
        .filter(|entry| entry["platform"]["os"] != "unknown")
        .map(|entry| {
            let platform = &entry["platform"];
            let name = format!(
                "{}/{}",
                platform["os"].as_str().unwrap_or_default(),
                platform["architecture"].as_str().unwrap_or_default()
            );
            let manifest = read_json(&blob(entry["digest"].as_str().expect("digest")));
            let layers = manifest["layers"]
                .as_array()
                .expect("layers")
                .iter()
                .map(|layer| layer["digest"].as_str().unwrap_or_default().to_string())
                .collect();
            (name, layers)
        })
        .collect()
}

fn sums(dir: &Path) -> Vec<(String, Vec<u8>)> {
    tree_bytes(dir)
}

#[test]
fn a_copy_only_build_needs_no_sandbox_and_shares_one_layer_across_platforms() {
    let sandbox = Sandbox::new();
    context(&sandbox);
    sandbox.write(
        "proj/images.kdl",
        &format!(
            r#"
platforms "linux/amd64" "linux/arm64" "linux/arm/v7"
stage files {{
    from "{BASE}"
    copy "src/" "/usr/share/app/"
    copy "deps.txt" "/etc/deps.txt" chown="1000:1000" chmod="0640"
}}
stage runtime {{
    from "{BASE}"
    copy "/usr/share/app/" "/app/" from=files
    copy "src/" "/srv/ctx/"
}}
image app {{
    stage runtime
    tags "localhost/app:1"
}}
"#
        ),
    );
    // A sandbox that cannot run anything: the build must not need one.
    let no_sandbox = [("GRAPHBUILD_SANDBOX_EXE", "/bin/false")];
    let built = run(&sandbox, "store", &no_sandbox, "out");
    assert_success(&built);
    let summary = summary(&built);
    assert_eq!(summary["executed"], 12, "{summary}");

    // The context copy of the runtime stage is one blob, named by all three manifests.
    let platforms = layers_by_platform(&sandbox.path().join("out/app"));
    assert_eq!(platforms.len(), 3);
    let last: Vec<&String> = platforms
        .iter()
        .map(|(_, layers)| layers.last().expect("a layer"))
        .collect();
    assert!(
        last.iter().all(|digest| *digest == last[0]),
        "one layer for all platforms: {platforms:?}"
    );
    // The base layers differ per platform, so the sharing is the copy's own.
    assert_ne!(platforms[0].1[0], platforms[1].1[0]);

    // The content is what the copies say, from the other stage as from the context.
    let rootfs = unpack_platform(
        &sandbox.path().join("out/app"),
        "1",
        "linux/arm64",
        &sandbox.path().join("unpacked"),
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("app/sub/deeper/c.sh")).expect("c.sh"),
        "#!/bin/sh\necho c\n"
    );
    assert_eq!(
        std::fs::read_link(rootfs.join("srv/ctx/link")).expect("link"),
        Path::new("a.txt")
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(rootfs.join("app/sub/deeper/c.sh"))
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);

    // The same GRAPHBUILD_SANDBOX_EXE does stop a build that runs a command: the check above
    // is real.
    sandbox.write(
        "proj/images.kdl",
        &format!(
            r#"
platforms "linux/amd64"
stage s {{
    from "{BASE}"
    run "true"
}}
image s {{
    stage s
    tags "localhost/s:1"
}}
"#
        ),
    );
    let refused = run(&sandbox, "store", &no_sandbox, "out2");
    assert!(!refused.status.success(), "{}", stdout(&refused));
}

#[test]
fn copy_layers_are_byte_identical_to_the_sandbox_path() {
    let sandbox = Sandbox::new();
    context(&sandbox);
    // Parents the base has (with their own owner, mode and time), a file replacing a file, an
    // existing destination directory, numeric chown, chmod, copies from a stage whose layers
    // delete and replace files (whiteouts, an opaque directory), and a SOURCE_DATE_EPOCH
    // after the base's times so copied-up parents keep theirs.
    sandbox.write(
        "proj/images.kdl",
        &format!(
            r#"
platforms "linux/amd64" "linux/arm64"
stage base {{
    from "{BASE}"
    run "mkdir -p /a/b/c /a/e && echo old > /a/f && mkdir /a/b/sub && touch -d @1000 /a /a/b /a/b/c /a/e /a/b/sub && chmod 700 /a/b && chown 5:6 /a/b /a/b/sub"
}}
stage src {{
    from base
    run "mkdir -p /out/d/e && echo 1 > /out/d/f && echo 2 > /out/g && ln -s g /out/h && chmod 4755 /out/g"
    run "rm /out/d/f && rm -r /out/d/e && mkdir /out/d/n && echo 3 > /out/d/n/x && ln -s /out /outlink"
    run "rm -rf /out/d && mkdir /out/d && echo new > /out/d/only"
}}
stage app {{
    from base
    copy "src/" "/a/b/c/d/"
    copy "src/a.txt" "/a/f"
    copy "src/" "/a/b/" chmod="0711" chown="7"
    copy "src/sub" "/a/e"
    copy "/out/" "/a/b/c/o/" from=src
    copy "/outlink/d" "/usr/share/d" from=src
    copy "deps.txt" "/deps/"
}}
image app {{
    stage app
    tags "localhost/app:1"
}}
"#
        ),
    );
    let epoch = [("SOURCE_DATE_EPOCH", "1700000000")];
    let direct = run(&sandbox, "store-direct", &epoch, "direct");
    assert_success(&direct);
    let sandboxed = run(
        &sandbox,
        "store-sandboxed",
        &[epoch[0], ("GRAPHBUILD_DIRECT_COPY", "0")],
        "sandboxed",
    );
    assert_success(&sandboxed);
    let direct_files = sums(&sandbox.path().join("direct"));
    let sandboxed_files = sums(&sandbox.path().join("sandboxed"));
    assert_eq!(
        direct_files
            .iter()
            .map(|(name, _)| name)
            .collect::<Vec<_>>(),
        sandboxed_files
            .iter()
            .map(|(name, _)| name)
            .collect::<Vec<_>>()
    );
    assert!(direct_files == sandboxed_files, "the layouts differ");
}

#[test]
fn a_symlink_on_the_destination_takes_the_sandbox_path() {
    let sandbox = Sandbox::new();
    context(&sandbox);
    let file = |dest: &str| {
        format!(
            r#"
platforms "linux/amd64" "linux/arm64"
stage base {{
    from "{BASE}"
    run "mkdir -p /opt/real && ln -s /opt/real /dst"
}}
stage app {{
    from base
    copy "src/" "{dest}"
}}
image app {{
    stage app
    tags "localhost/app:1"
}}
"#
        )
    };
    sandbox.write("proj/images.kdl", &file("/dst/"));
    let built = run(&sandbox, "store", &[], "out");
    assert_success(&built);
    // Through the base's symlink, as Docker does; the link itself stays.
    let rootfs = unpack_platform(
        &sandbox.path().join("out/app"),
        "1",
        "linux/amd64",
        &sandbox.path().join("unpacked"),
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("opt/real/sub/b.txt")).expect("b.txt"),
        "beta\n"
    );
    assert!(
        std::fs::symlink_metadata(rootfs.join("dst"))
            .expect("dst")
            .file_type()
            .is_symlink()
    );

    // With the base cached, a changed context reruns only the copy: through the symlink it
    // needs the sandbox (and fails without one), elsewhere it does not.
    sandbox.write("proj/src/a.txt", "alpha 2\n");
    let no_sandbox = [("GRAPHBUILD_SANDBOX_EXE", "/bin/false")];
    let refused = run(&sandbox, "store", &no_sandbox, "out");
    assert!(
        !refused.status.success(),
        "the symlinked destination took the direct path\n{}",
        stdout(&refused)
    );
    sandbox.write("proj/images.kdl", &file("/opt/other/"));
    let direct = run(&sandbox, "store", &no_sandbox, "out");
    assert_success(&direct);
}

#[test]
fn a_chown_by_name_takes_the_sandbox_path() {
    let sandbox = Sandbox::new();
    context(&sandbox);
    sandbox.write(
        "proj/images.kdl",
        &format!(
            r#"
platforms "linux/amd64"
stage app {{
    from "{BASE}"
    run "echo 'app:x:1234:2345::/:/bin/sh' >> /etc/passwd"
    copy "deps.txt" "/etc/deps.txt" chown="app"
}}
image app {{
    stage app
    tags "localhost/app:1"
}}
"#
        ),
    );
    let built = run(&sandbox, "store", &[], "out");
    assert_success(&built);
    let rootfs = unpack_platform(
        &sandbox.path().join("out/app"),
        "1",
        "linux/amd64",
        &sandbox.path().join("unpacked"),
    );
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(rootfs.join("etc/deps.txt")).expect("deps.txt");
    assert_eq!((metadata.uid(), metadata.gid()), (1234, 2345));
    // The name is looked up in the base: the copy runs in the sandbox.
    sandbox.write("proj/deps.txt", "zlib\n");
    let no_sandbox = [("GRAPHBUILD_SANDBOX_EXE", "/bin/false")];
    let refused = run(&sandbox, "store", &no_sandbox, "out");
    assert!(!refused.status.success(), "{}", stdout(&refused));
}

/// The snapshot directories of a store, by name.
fn snapshot_names(store: &Path) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(store.join("snapshots"))
        .expect("snapshots")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// Version 0 of a context for the incremental snapshot: 100 files that never change, and a few
/// that will (changed, removed, renamed with their directory, a mode, a kind, a link target).
fn context_v0(sandbox: &Sandbox) {
    for index in 0..100 {
        sandbox.write(
            &format!("proj/src/fill/f{index:02}.txt"),
            &format!("fill {index}\n"),
        );
    }
    sandbox.write("proj/src/keep.txt", "keep\n");
    sandbox.write("proj/src/change.txt", "before\n");
    sandbox.write("proj/src/gone.txt", "gone\n");
    sandbox.write("proj/src/olddir/x.txt", "moved\n");
    sandbox.write("proj/src/olddir/deep/y.txt", "moved too\n");
    sandbox.write("proj/src/mode.sh", "#!/bin/sh\n");
    sandbox.write("proj/src/kind", "a file first\n");
    std::os::unix::fs::symlink("keep.txt", sandbox.path().join("proj/src/link")).expect("link");
}

/// Version 1: one file changed, one removed, one added, `olddir` renamed to `newdir`, a mode
/// and a directory's mode changed, a file turned into a directory, a link retargeted.
fn context_v1(sandbox: &Sandbox) {
    use std::os::unix::fs::PermissionsExt;
    let src = sandbox.path().join("proj/src");
    sandbox.write("proj/src/change.txt", "after, and longer\n");
    std::fs::remove_file(src.join("gone.txt")).expect("rm");
    sandbox.write("proj/src/added.txt", "added\n");
    std::fs::rename(src.join("olddir"), src.join("newdir")).expect("rename");
    std::fs::set_permissions(src.join("mode.sh"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    std::fs::set_permissions(src.join("fill"), std::fs::Permissions::from_mode(0o700))
        .expect("chmod");
    std::fs::remove_file(src.join("kind")).expect("rm");
    sandbox.write("proj/src/kind/inside.txt", "now a directory\n");
    std::fs::remove_file(src.join("link")).expect("rm");
    std::os::unix::fs::symlink("added.txt", src.join("link")).expect("link");
}

#[test]
fn a_changed_context_changes_the_previous_snapshot_into_the_same_result() {
    let sandbox = Sandbox::new();
    context_v0(&sandbox);
    // The run step reads every copied file's metadata (link counts included: a hard link or a
    // merged overlay directory would show) and content, and changes and removes copied files.
    sandbox.write(
        "proj/images.kdl",
        &format!(
            r#"
platforms "linux/amd64"
stage app {{
    from "{BASE}"
    copy "src/" "/src/" chown="1000:1001"
    run "mkdir /out && cd /src && find . | sort | xargs stat -c '%n %a %u:%g %h %s %Y %F' > /out/stat && find . -type f | sort | xargs md5sum > /out/sums && readlink link > /out/link && echo more >> keep.txt && rm fill/f01.txt && chmod 600 fill/f02.txt"
}}
image app {{
    stage app
    tags "localhost/app:1"
}}
"#
        ),
    );
    let store = sandbox.path().join("store");
    assert_success(&run(&sandbox, "store", &[], "first"));
    let before = snapshot_names(&store);

    context_v1(&sandbox);
    let incremental = run(&sandbox, "store", &[], "incremental");
    assert_success(&incremental);
    let after = snapshot_names(&store);
    // The previous copy's snapshot was taken out of the store and changed into the new one.
    assert_eq!(
        before.difference(&after).count(),
        1,
        "one snapshot taken: {before:?} → {after:?}"
    );

    // The same context built on an empty store: every output byte the same.
    let clean = run(&sandbox, "store-clean", &[], "clean");
    assert_success(&clean);
    let incremental_files = tree_bytes(&sandbox.path().join("incremental"));
    let clean_files = tree_bytes(&sandbox.path().join("clean"));
    assert!(
        incremental_files == clean_files,
        "the layouts differ: {:?} vs {:?}",
        incremental_files
            .iter()
            .map(|(name, _)| name)
            .collect::<Vec<_>>(),
        clean_files.iter().map(|(name, _)| name).collect::<Vec<_>>()
    );

    // And the image holds version 1, as the run step saw it.
    let rootfs = unpack_platform(
        &sandbox.path().join("incremental/app"),
        "1",
        "linux/amd64",
        &sandbox.path().join("unpacked"),
    );
    let read = |path: &str| std::fs::read_to_string(rootfs.join(path)).expect(path);
    assert_eq!(read("src/change.txt"), "after, and longer\n");
    assert_eq!(read("src/keep.txt"), "keep\nmore\n");
    assert_eq!(read("src/newdir/deep/y.txt"), "moved too\n");
    assert_eq!(read("src/kind/inside.txt"), "now a directory\n");
    assert_eq!(read("out/link"), "added.txt\n");
    assert!(!rootfs.join("src/gone.txt").exists());
    assert!(!rootfs.join("src/olddir").exists());
    assert!(!rootfs.join("src/fill/f01.txt").exists());
    let stat = read("out/stat");
    assert!(stat.contains("./mode.sh 755 1000:1001 1 "), "{stat}");
    assert!(stat.contains("./fill 700 1000:1001 2 "), "{stat}");
    assert!(stat.contains("./newdir 755 1000:1001 3 "), "{stat}");
    assert!(stat.contains("./added.txt 644 1000:1001 1 6 0 "), "{stat}");
    assert!(
        !stat.contains("gone.txt") && !stat.contains("olddir"),
        "{stat}"
    );
}
