//! Rootless builds end to end (issue 16): the real `graphbuild` binary run as an ordinary
//! user (`runuser`), compared digest for digest with the same build run as root.
//!
//! The test runs as root: it creates two users, idempotently —
//! [`SUBID_USER`] with a range in /etc/subuid and /etc/subgid, [`SINGLE_USER`] without — and
//! a scratch directory they own, holding a copy of the binary, the busybox fixture and the
//! build files (the target directory may not be readable by them).

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Once;

use common::*;

/// A user with subordinate ids: every owner can be mapped.
const SUBID_USER: &str = "graphbuild-rl";
/// A user without: only its own uid is mapped (to 0).
const SINGLE_USER: &str = "graphbuild-rl1";

fn helpers_present() -> bool {
    ["newuidmap", "newgidmap"].iter().all(|helper| {
        ["/usr/bin", "/bin"]
            .iter()
            .any(|dir| Path::new(dir).join(helper).exists())
    })
}

/// Root (to create users and build as root) and newuidmap/newgidmap (package uidmap, which
/// scripts/setup-host installs).
fn ready() -> bool {
    if !prerequisite(
        nix::unistd::geteuid().is_root(),
        "the rootless tests run as root: they create users and compare with a root build",
    ) {
        return false;
    }
    if !prerequisite(
        helpers_present(),
        "newuidmap/newgidmap are missing: `apt-get install uidmap` (scripts/setup-host)",
    ) {
        return false;
    }
    setup_users();
    true
}

/// qemu-user handlers for arm64 and arm registered (scripts/setup-host does it).
fn emulators() -> bool {
    prerequisite(
        ["qemu-aarch64", "qemu-arm"]
            .iter()
            .all(|handler| Path::new("/proc/sys/fs/binfmt_misc").join(handler).exists()),
        "qemu-aarch64 and qemu-arm binfmt handlers are not registered (scripts/setup-host)",
    )
}

fn run_checked(command: &mut Command) {
    let output = command.output().expect("command runs");
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn user_exists(user: &str) -> bool {
    Command::new("id")
        .arg("-u")
        .arg(user)
        .output()
        .is_ok_and(|output| output.status.success())
}

/// Lines of /etc/subuid or /etc/subgid for `user`, removed or ensured.
fn set_ranges(user: &str, wanted: bool) {
    for file in ["/etc/subuid", "/etc/subgid"] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let prefix = format!("{user}:");
        let has = text.lines().any(|line| line.starts_with(&prefix));
        if wanted && !has {
            // Past every range already given out, so no two users share ids.
            let end = text
                .lines()
                .filter_map(|line| {
                    let mut fields = line.split(':').skip(1);
                    let start: u64 = fields.next()?.parse().ok()?;
                    let count: u64 = fields.next()?.parse().ok()?;
                    Some(start + count)
                })
                .max()
                .unwrap_or(0)
                .max(100_000);
            let start = end.div_ceil(65536) * 65536;
            let mut text = text.clone();
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&format!("{user}:{start}:65536\n"));
            std::fs::write(file, text).expect("write subordinate ids");
        } else if !wanted && has {
            let kept: String = text
                .lines()
                .filter(|line| !line.starts_with(&prefix))
                .map(|line| format!("{line}\n"))
                .collect();
            std::fs::write(file, kept).expect("write subordinate ids");
        }
    }
}

/// Create both users (useradd may give them subordinate ids itself: the single-id user's are
/// removed), idempotently and once per test process.
fn setup_users() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for user in [SUBID_USER, SINGLE_USER] {
            if !user_exists(user) {
                run_checked(Command::new("useradd").args(["-m", "-s", "/bin/sh", user]));
            }
        }
        set_ranges(SUBID_USER, true);
        set_ranges(SINGLE_USER, false);
    });
}

fn home(user: &str) -> PathBuf {
    let output = Command::new("getent")
        .args(["passwd", user])
        .output()
        .expect("getent runs");
    let line = String::from_utf8_lossy(&output.stdout).into_owned();
    PathBuf::from(line.trim().split(':').nth(5).expect("home field"))
}

/// A scratch directory owned by `user`: the binary, the busybox fixture and what the test
/// writes, laid out like the repository so `oci:tests/fixtures/busybox:1.35.0` resolves.
struct Scratch {
    dir: tempfile::TempDir,
    user: &'static str,
}

impl Scratch {
    fn new(user: &'static str) -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix("graphbuild-rootless-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        copy_tree(
            &repo_root().join("tests/fixtures/busybox"),
            &dir.path().join("tests/fixtures/busybox"),
        );
        std::fs::copy(bin(), dir.path().join("graphbuild")).expect("copy the binary");
        let scratch = Scratch { dir, user };
        scratch.give();
        scratch
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn example(&self, name: &str) -> PathBuf {
        let target = self.path().join("examples").join(name);
        copy_tree(&repo_root().join("examples").join(name), &target);
        self.give();
        target
    }

    fn write(&self, relative: &str, contents: &str) {
        let path = self.path().join(relative);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, contents).expect("write");
        self.give();
    }

    /// Everything written so far (not the stores: root's stays root's) belongs to the user.
    fn give(&self) {
        for entry in std::fs::read_dir(self.path()).expect("read scratch") {
            let path = entry.expect("entry").path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name.starts_with("store") || name.starts_with("out-") {
                continue;
            }
            run_checked(
                Command::new("chown")
                    .arg("-R")
                    .arg(format!("{0}:{0}", self.user))
                    .arg(&path),
            );
        }
        run_checked(
            Command::new("chown")
                .arg(format!("{0}:{0}", self.user))
                .arg(self.path()),
        );
    }

    /// The binary as root, with its own store.
    fn as_root(&self, args: &[&str]) -> Output {
        Command::new(self.path().join("graphbuild"))
            .args(args)
            .current_dir(self.path())
            .env("GRAPHBUILD_CACHE_DIR", self.path().join("store-root"))
            .env("NO_COLOR", "1")
            .env_remove("SOURCE_DATE_EPOCH")
            .output()
            .expect("graphbuild runs")
    }

    /// The binary as the user, through runuser; `store` None leaves the default store.
    fn as_user(&self, args: &[&str], store: Option<&str>) -> Output {
        self.as_user_with(args, store, &[])
    }

    /// [`Scratch::as_user`] with more environment variables (`NAME=value`).
    fn as_user_with(&self, args: &[&str], store: Option<&str>, env: &[&str]) -> Output {
        self.user_command(args, store, env)
            .output()
            .expect("runuser runs")
    }

    fn user_command(&self, args: &[&str], store: Option<&str>, env: &[&str]) -> Command {
        let mut command = Command::new("runuser");
        command
            .args(["-u", self.user, "--", "env", "-i"])
            .arg(format!("HOME={}", home(self.user).display()))
            .arg("PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .arg("NO_COLOR=1");
        if let Some(store) = store {
            command.arg(format!(
                "GRAPHBUILD_CACHE_DIR={}",
                self.path().join(store).display()
            ));
        }
        command
            .args(env)
            .arg(self.path().join("graphbuild"))
            .args(args)
            .current_dir(self.path());
        command
    }
}

/// Every file of an OCI layout, by relative path → contents.
fn layout_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        for entry in std::fs::read_dir(&current).expect("read layout") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let relative = path
                    .strip_prefix(dir)
                    .expect("inside")
                    .to_string_lossy()
                    .into_owned();
                files.insert(relative, std::fs::read(&path).expect("read"));
            }
        }
    }
    files
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).expect("read json")).expect("json")
}

/// (platform, manifest digest, layer digests) of every image of the layout's index.
fn manifests(layout: &Path) -> (String, Vec<(String, String, Vec<String>)>) {
    let blob = |digest: &str| {
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let index = json(&layout.join("index.json"));
    let image_index = index["manifests"][0]["digest"]
        .as_str()
        .expect("index digest")
        .to_string();
    let mut rows = Vec::new();
    for manifest in json(&blob(&image_index))["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        // Attestation manifests (unknown/unknown) are compared through the index digest.
        .filter(|manifest| manifest["platform"]["os"] != "unknown")
    {
        let platform = &manifest["platform"];
        let name = format!(
            "{}/{}{}",
            platform["os"].as_str().unwrap_or_default(),
            platform["architecture"].as_str().unwrap_or_default(),
            platform["variant"]
                .as_str()
                .map(|variant| format!("/{variant}"))
                .unwrap_or_default()
        );
        let digest = manifest["digest"].as_str().expect("digest").to_string();
        let layers = json(&blob(&digest))["layers"]
            .as_array()
            .expect("layers")
            .iter()
            .map(|layer| layer["digest"].as_str().expect("digest").to_string())
            .collect();
        rows.push((name, digest, layers));
    }
    (image_index, rows)
}

/// The two layouts are the same, digest for digest and byte for byte; prints the digests.
#[track_caller]
fn assert_identical(what: &str, root: &Path, rootless: &Path) {
    let (root_index, root_rows) = manifests(root);
    let (rootless_index, rootless_rows) = manifests(rootless);
    assert_eq!(
        root_rows, rootless_rows,
        "{what}: manifests and layers differ between root and rootless"
    );
    assert_eq!(root_index, rootless_index, "{what}: index digests differ");
    let root_files = layout_files(root);
    let rootless_files = layout_files(rootless);
    assert_eq!(
        root_files.keys().collect::<Vec<_>>(),
        rootless_files.keys().collect::<Vec<_>>(),
        "{what}: the layouts hold different files"
    );
    for (name, bytes) in &root_files {
        assert!(
            rootless_files[name] == *bytes,
            "{what}: {name} differs between root and rootless"
        );
    }
    eprintln!("{what}: rootless == root, index {root_index}");
    for (platform, digest, layers) in &root_rows {
        eprintln!(
            "  {platform:<13} manifest {digest}, {} layers identical",
            layers.len()
        );
    }
}

fn all_output(output: &Output) -> String {
    format!("{}\n{}", stdout(output), stderr(output))
}

#[track_caller]
fn assert_ok(output: &Output) {
    assert!(
        output.status.success(),
        "graphbuild failed with {:?}\n{}",
        output.status,
        all_output(output)
    );
}

/// Steps that chown to several owners (nobody included), a setuid and a setgid entry, a
/// hard link, a fifo, whiteouts and an opaque directory, a `copy` with `chown=`, and a step
/// run as uid 1000.
const OWNERS: &str = r#"platforms "linux/amd64"

arg BASE="oci:../tests/fixtures/busybox:1.35.0"

stage owners {
    from "$BASE"
    run "mkdir -p /srv/a /srv/b /srv/gone /home/u && touch /srv/a/f /srv/b/g /srv/gone/x /srv/nobody && chown 1000:1000 /srv/a /srv/a/f /home/u && chown 65534:65534 /srv/nobody && chown 33:33 /srv/b/g && chown 2000:3000 /srv/b && chmod 2775 /srv/b && cp /bin/busybox /srv/suid && chmod 4755 /srv/suid && ln /srv/suid /srv/suid-link && mkfifo /srv/fifo && chown 1000:1000 /srv/fifo"
    run "rm -rf /srv/a /srv/gone && mkdir /srv/a && echo new > /srv/a/new && chown 1000:100 /srv/a/new && rm -f /bin/vi && echo hi > /etc/motd"
    copy "files/" "/data/" chown="1000:1000" chmod="0640"
    user "1000:1000"
    run "id > /home/u/id.txt && touch /home/u/owned-by-1000"
    user "0"
    run "ls -lnR /srv /home /data > /listing.txt"
}

image owners {
    stage owners
    tags "localhost/owners:1.0"
}
"#;

/// A build on the root-built `owners` image: unpacking its multi-owner layers.
const DERIVED: &str = r#"platforms "linux/amd64"

stage derived {
    from "oci:../out-root/owners:1.0"
    run "ls -lnR /srv /home > /srv/listing.txt && chown 1000:1000 /srv/listing.txt && echo more >> /srv/b/g && mkfifo /srv/fifo2 && rm /srv/nobody"
}

image derived {
    stage derived
    tags "localhost/derived:1.0"
}
"#;

#[test]
fn basic_for_three_platforms_is_bit_identical_to_root() {
    if !ready() || !emulators() {
        return;
    }
    let scratch = Scratch::new(SUBID_USER);
    scratch.example("basic");
    let file = "examples/basic/images.kdl";
    let root = scratch.as_root(&["run", file, "--progress", "plain", "--output", "out-root"]);
    assert_ok(&root);
    let rootless = scratch.as_user(
        &["run", file, "--progress", "plain", "--output", "out-rl"],
        Some("store-rl"),
    );
    assert_ok(&rootless);
    let text = all_output(&rootless);
    assert!(
        text.contains("15 steps executed"),
        "the rootless build ran every step:\n{text}"
    );
    assert_identical(
        "examples/basic (linux/amd64, linux/arm64, linux/arm/v7)",
        &scratch.path().join("out-root/basic"),
        &scratch.path().join("out-rl/basic"),
    );
    let (_, rows) = manifests(&scratch.path().join("out-rl/basic"));
    assert_eq!(rows.len(), 3, "three platforms");

    // The rootless store holds what the build made: plan says all cached, a rerun executes
    // nothing and gives the same index.
    let plan = scratch.as_user(&["plan", file], Some("store-rl"));
    assert_ok(&plan);
    let again = scratch.as_user(
        &["run", file, "--progress", "plain", "--output", "out-rl"],
        Some("store-rl"),
    );
    assert_ok(&again);
    assert!(
        all_output(&again).contains("0 executed") || all_output(&again).contains("15 cached"),
        "the rerun was cached:\n{}",
        all_output(&again)
    );
    assert_identical(
        "examples/basic, cached rerun",
        &scratch.path().join("out-root/basic"),
        &scratch.path().join("out-rl/basic"),
    );
}

#[test]
fn many_owners_setuid_and_whiteouts_are_bit_identical_to_root() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new(SUBID_USER);
    scratch.write("owners/files/data.txt", "data\n");
    scratch.write("owners/images.kdl", OWNERS);
    scratch.write("derived/images.kdl", DERIVED);
    let root = scratch.as_root(&[
        "run",
        "owners/images.kdl",
        "--progress",
        "plain",
        "--output",
        "out-root",
    ]);
    assert_ok(&root);
    let rootless = scratch.as_user(
        &[
            "run",
            "owners/images.kdl",
            "--progress",
            "plain",
            "--output",
            "out-rl",
        ],
        Some("store-rl"),
    );
    assert_ok(&rootless);
    assert_identical(
        "owners (chown to 1000, 33, 2000:3000, 65534; setuid, setgid, hard link, fifo, whiteouts, opaque dir, copy chown=, user 1000)",
        &scratch.path().join("out-root/owners"),
        &scratch.path().join("out-rl/owners"),
    );
    // The layer records the image's owners, not the invoking user's.
    let tar = Command::new("sh")
        .arg("-c")
        .arg("for blob in out-rl/owners/blobs/sha256/*; do tar --numeric-owner -tvzf \"$blob\" 2>/dev/null; done")
        .current_dir(scratch.path())
        .output()
        .expect("tar runs");
    let listing = String::from_utf8_lossy(&tar.stdout);
    for needle in [
        "-rwsr-xr-x 0/0",
        "65534/65534",
        "2000/3000",
        "33/33",
        "1000/100 ",
        "srv/a/.wh..wh..opq",
        "srv/.wh.gone",
        "prw-r--r-- 1000/1000",
    ] {
        assert!(
            listing.contains(needle),
            "`{needle}` missing from the layers:\n{listing}"
        );
    }

    // Unpacking those multi-owner layers as a base image, rootless, in a fresh store.
    let root = scratch.as_root(&[
        "run",
        "derived/images.kdl",
        "--progress",
        "plain",
        "--output",
        "out-root",
    ]);
    assert_ok(&root);
    let rootless = scratch.as_user(
        &[
            "run",
            "derived/images.kdl",
            "--progress",
            "plain",
            "--output",
            "out-rl",
        ],
        Some("store-rl-derived"),
    );
    assert_ok(&rootless);
    assert_identical(
        "derived (a base image with many owners, unpacked rootless)",
        &scratch.path().join("out-root/derived"),
        &scratch.path().join("out-rl/derived"),
    );

    // verify builds twice in fresh stores, rootless.
    let verify = scratch.as_user(&["verify", "owners/images.kdl"], Some("store-rl-verify"));
    assert_ok(&verify);
}

#[test]
fn a_single_id_mapping_builds_root_owned_images_and_names_the_owner_it_cannot_map() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new(SINGLE_USER);
    scratch.example("basic");
    let file = "examples/basic/images.kdl";
    let root = scratch.as_root(&[
        "run",
        file,
        "--platform",
        "linux/amd64",
        "--progress",
        "plain",
        "--output",
        "out-root",
    ]);
    assert_ok(&root);
    let rootless = scratch.as_user(
        &[
            "run",
            file,
            "--platform",
            "linux/amd64",
            "--progress",
            "plain",
            "--output",
            "out-rl",
        ],
        Some("store-rl"),
    );
    assert_ok(&rootless);
    let text = all_output(&rootless);
    assert!(
        text.contains("only your uid mapped"),
        "a notice says only one id is mapped:\n{text}"
    );
    assert_identical(
        "examples/basic linux/amd64, single-id mapping",
        &scratch.path().join("out-root/basic"),
        &scratch.path().join("out-rl/basic"),
    );

    // A base image with files owned by uid 1000: a clear error naming the file, the owner
    // and the lines to add.
    scratch.write("owners/files/data.txt", "data\n");
    scratch.write("owners/images.kdl", OWNERS);
    scratch.write("derived/images.kdl", DERIVED);
    assert_ok(&scratch.as_root(&[
        "run",
        "owners/images.kdl",
        "--progress",
        "plain",
        "--output",
        "out-root",
    ]));
    let failed = scratch.as_user(
        &[
            "run",
            "derived/images.kdl",
            "--progress",
            "plain",
            "--output",
            "out-rl",
        ],
        Some("store-rl"),
    );
    let text = all_output(&failed);
    assert_eq!(failed.status.code(), Some(1), "a build failure:\n{text}");
    for needle in [
        "is owned by uid 1000 gid 1000",
        "does not map",
        &format!("echo {SINGLE_USER}:"),
        ">> /etc/subuid",
        ">> /etc/subgid",
    ] {
        assert!(text.contains(needle), "`{needle}` missing from:\n{text}");
    }
    assert!(
        text.contains("layer entry `home/u") || text.contains("layer entry `srv/"),
        "the error names the file:\n{text}"
    );
    eprintln!(
        "single-id mapping error: {}",
        text.lines()
            .find(|line| line.contains("does not map"))
            .unwrap_or_default()
    );

    // A step run as uid 1000 cannot start: the error names the id and the fix.
    scratch.write(
        "u1000/images.kdl",
        "platforms \"linux/amd64\"\nstage s {\n    from \"oci:../tests/fixtures/busybox:1.35.0\"\n    user \"1000\"\n    run \"id\"\n}\nimage s {\n    stage s\n    tags \"t:1\"\n}\n",
    );
    let failed = scratch.as_user(
        &[
            "run",
            "u1000/images.kdl",
            "--progress",
            "plain",
            "--output",
            "out-rl",
        ],
        Some("store-rl"),
    );
    let text = all_output(&failed);
    assert_eq!(failed.status.code(), Some(1), "a build failure:\n{text}");
    for needle in [
        "user id 1000 is not mapped",
        &format!("give user `{SINGLE_USER}`"),
        ">> /etc/subuid",
    ] {
        assert!(text.contains(needle), "`{needle}` missing from:\n{text}");
    }
}

#[test]
fn doctor_explains_rootless_and_the_default_store_is_in_the_users_cache() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new(SUBID_USER);
    let doctor = scratch.as_user(&["doctor"], None);
    let text = all_output(&doctor);
    for needle in [
        &format!("rootless: user `{SUBID_USER}`"),
        "65537 ids",
        "overlayfs mounts natively in the user namespace",
        &format!(
            "the store {} is writable",
            home(SUBID_USER).join(".cache/graphbuild").display()
        ),
    ] {
        assert!(text.contains(needle), "`{needle}` missing from:\n{text}");
    }

    let single = Scratch::new(SINGLE_USER);
    let doctor = single.as_user(&["doctor"], None);
    let text = all_output(&doctor);
    for needle in ["mapping only itself", ">> /etc/subuid"] {
        assert!(text.contains(needle), "`{needle}` missing from:\n{text}");
    }
}

/// What the root sandbox guarantees holds inside the user namespace: Docker's capabilities,
/// the seccomp filter, masked and read-only /proc, no mounts or device nodes; the timeout
/// kills the step; the process limit degrades to counting, with a notice.
#[test]
fn containment_holds_inside_the_user_namespace() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new(SUBID_USER);
    let checks = [
        "grep -q 'CapEff:.*00000000a80425fb' /proc/self/status",
        "grep -q 'CapBnd:.*00000000a80425fb' /proc/self/status",
        "grep -q 'Seccomp:.*2' /proc/self/status",
        "test ! -s /proc/keys",
        "! sh -c 'echo x > /proc/sys/kernel/hostname' 2>/dev/null",
        "! mount -t tmpfs t /mnt 2>/dev/null",
        "! mknod /tmp/sda b 8 0 2>/dev/null",
        "! unshare -U true 2>/dev/null",
        "test ! -e /sys/kernel",
        "test \"$(hostname)\" = graphbuild",
        "test \"$(id -u)\" = 0",
    ];
    let script = checks
        .iter()
        .map(|check| format!("{{ {check} || {{ echo FAILED: {check:?}; exit 1; }}; }}"))
        .collect::<Vec<_>>()
        .join(" && ");
    let file = format!(
        "platforms \"linux/amd64\"\nstage s {{\n    from \"oci:../tests/fixtures/busybox:1.35.0\"\n    run {}\n}}\nstage slow {{\n    from \"oci:../tests/fixtures/busybox:1.35.0\"\n    run \"sleep 30\" timeout=\"2s\"\n}}\nimage s {{\n    stage s\n    tags \"t:1\"\n}}\nimage slow {{\n    stage slow\n    tags \"t:1\"\n}}\n",
        serde_json::to_string(&script).expect("string")
    );
    scratch.write("contained/images.kdl", &file);
    let output = scratch.as_user(
        &[
            "run",
            "contained/images.kdl",
            "s",
            "--progress",
            "plain",
            "--output",
            "out-rl",
        ],
        Some("store-rl"),
    );
    assert_ok(&output);
    let text = all_output(&output);
    assert!(
        text.contains("process limit of steps is only approximate"),
        "without a writable pids cgroup the limit degrades with a notice:\n{text}"
    );

    let started = std::time::Instant::now();
    let output = scratch.as_user(
        &[
            "run",
            "contained/images.kdl",
            "slow",
            "--progress",
            "plain",
            "--output",
            "out-rl",
        ],
        Some("store-rl"),
    );
    let text = all_output(&output);
    assert_eq!(output.status.code(), Some(1), "the step timed out:\n{text}");
    assert!(text.contains("timeout of 2s"), "{text}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "killed at its timeout"
    );
}

/// A missing binfmt handler stays exit 3 with the fix, rootless too.
#[test]
fn a_missing_emulator_is_an_environment_error_rootless() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new(SUBID_USER);
    scratch.example("basic");
    std::fs::create_dir_all(scratch.path().join("no-binfmt")).expect("mkdir");
    scratch.write("no-binfmt/register", "");
    let output = Command::new("runuser")
        .args(["-u", SUBID_USER, "--", "env", "-i"])
        .arg(format!("HOME={}", home(SUBID_USER).display()))
        .arg("NO_COLOR=1")
        .arg(format!(
            "GRAPHBUILD_CACHE_DIR={}",
            scratch.path().join("store-rl").display()
        ))
        .arg(format!(
            "GRAPHBUILD_BINFMT_DIR={}",
            scratch.path().join("no-binfmt").display()
        ))
        .arg(scratch.path().join("graphbuild"))
        .args([
            "run",
            "examples/basic/images.kdl",
            "--platform",
            "linux/arm64",
            "--progress",
            "plain",
        ])
        .current_dir(scratch.path())
        .output()
        .expect("runuser runs");
    let text = all_output(&output);
    assert_eq!(output.status.code(), Some(3), "exit 3:\n{text}");
    assert!(
        text.contains("cannot run steps for linux/arm64") && text.contains("update-binfmts"),
        "{text}"
    );
}

/// The team cache across root and rootless machines: platforms split between a rootless
/// user and root, uploaded; a fresh rootless store and a fresh root store each assemble the
/// whole index from cache hits alone, identical to a local root build.
#[test]
fn team_cache_split_between_root_and_rootless_merges_either_way() {
    if !ready() || !emulators() {
        return;
    }
    let scratch = Scratch::new(SUBID_USER);
    scratch.example("basic");
    let server = CacheServer::start(&scratch.path().join("server"), &[]);
    let file = "examples/basic/images.kdl";
    let args = |output: &'static str, extra: &[&'static str]| {
        let mut args = vec!["run", file, "--output", output, "--progress", "json"];
        args.extend_from_slice(extra);
        args
    };
    let local = scratch.as_root(&args("out-root", &[]));
    assert_ok(&local);
    let local_digest = summary(&local)["images"][0]["index_digest"].clone();

    let url: &'static str = Box::leak(server.url.clone().into_boxed_str());
    for (rootless, platform, store) in [
        (true, "linux/amd64", "store-rl-amd64"),
        (false, "linux/arm64", ""),
        (true, "linux/arm/v7", "store-rl-armv7"),
    ] {
        let extra = ["--platform", platform, "--cache-to", url];
        let output = if rootless {
            scratch.as_user(&args("out-rl-split", &extra), Some(store))
        } else {
            Command::new(scratch.path().join("graphbuild"))
                .args(args("out-root-split", &extra))
                .current_dir(scratch.path())
                .env(
                    "GRAPHBUILD_CACHE_DIR",
                    scratch.path().join("store-root-arm64"),
                )
                .env("NO_COLOR", "1")
                .output()
                .expect("graphbuild runs")
        };
        assert_ok(&output);
        assert!(
            summary(&output)["executed"].as_u64().unwrap_or(0) > 0,
            "{platform} executed its steps"
        );
    }

    let merge_rl = scratch.as_user(
        &args("out-rl-merge", &["--cache-from", url]),
        Some("store-rl-merge"),
    );
    assert_ok(&merge_rl);
    assert_eq!(
        summary(&merge_rl)["executed"],
        0,
        "{}",
        all_output(&merge_rl)
    );
    assert_eq!(
        summary(&merge_rl)["images"][0]["index_digest"],
        local_digest
    );
    assert_identical(
        "team cache: rootless merge of root- and rootless-built platforms",
        &scratch.path().join("out-root/basic"),
        &scratch.path().join("out-rl-merge/basic"),
    );

    let merge_root = Command::new(scratch.path().join("graphbuild"))
        .args(args("out-root-merge", &["--cache-from", url]))
        .current_dir(scratch.path())
        .env(
            "GRAPHBUILD_CACHE_DIR",
            scratch.path().join("store-root-merge"),
        )
        .env("NO_COLOR", "1")
        .output()
        .expect("graphbuild runs");
    assert_ok(&merge_root);
    assert_eq!(summary(&merge_root)["executed"], 0);
    assert_identical(
        "team cache: root merge of root- and rootless-built platforms",
        &scratch.path().join("out-root/basic"),
        &scratch.path().join("out-root-merge/basic"),
    );
}

/// SIGTERM to the outer (host-side) process cancels the build in the namespace: it ends
/// promptly with "cancelled", leaving no process behind.
#[test]
fn sigterm_to_the_outer_process_cancels_the_namespaced_build() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new(SUBID_USER);
    scratch.write(
        "slow/images.kdl",
        "platforms \"linux/amd64\"\nstage s {\n    from \"oci:../tests/fixtures/busybox:1.35.0\"\n    run \"echo started; sleep 300 & sleep 301\"\n}\nimage s {\n    stage s\n    tags \"t:1\"\n}\n",
    );
    let log = scratch.path().join("slow.log");
    let mut child = Command::new("runuser")
        .args(["-u", SUBID_USER, "--", "env", "-i"])
        .arg(format!("HOME={}", home(SUBID_USER).display()))
        .arg("NO_COLOR=1")
        .arg(format!(
            "GRAPHBUILD_CACHE_DIR={}",
            scratch.path().join("store-rl").display()
        ))
        .arg(scratch.path().join("graphbuild"))
        .args(["run", "slow/images.kdl", "--progress", "plain"])
        .current_dir(scratch.path())
        .stdout(std::fs::File::create(&log).expect("log"))
        .stderr(
            std::fs::OpenOptions::new()
                .append(true)
                .open(&log)
                .expect("log"),
        )
        .spawn()
        .expect("runuser starts");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("started")
    {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "the step never started:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // runuser's child is graphbuild on the host side, parent of the namespaced one.
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id()))
        .expect("children of runuser");
    let outer: i32 = children
        .split_whitespace()
        .next()
        .expect("graphbuild runs under runuser")
        .parse()
        .expect("pid");
    let inner = std::fs::read_to_string(format!("/proc/{outer}/task/{outer}/children"))
        .expect("children of graphbuild");
    assert!(!inner.trim().is_empty(), "the namespaced graphbuild runs");
    let sent = std::time::Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(outer),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill");
    let status = child.wait().expect("wait");
    assert!(
        sent.elapsed() < std::time::Duration::from_secs(10),
        "cancelled promptly"
    );
    assert!(!status.success());
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("FAILED") || text.contains("cancel"), "{text}");
    let leftover = Command::new("pgrep")
        .args(["-u", SUBID_USER, "-f", "sleep 30[01]"])
        .output()
        .expect("pgrep");
    assert!(
        String::from_utf8_lossy(&leftover.stdout).trim().is_empty(),
        "no step process is left"
    );
}

// ---------------------------------------------------------------------------------------------
// fuse-overlayfs (GRAPHBUILD_OVERLAY=fuse): what a kernel refusing overlayfs in a user
// namespace falls back to, forced here on a kernel that does not refuse it.
// ---------------------------------------------------------------------------------------------

/// fuse-overlayfs installed and /dev/fuse open to every user (scripts/setup-host does both).
fn fuse_ready() -> bool {
    prerequisite(
        ["/usr/bin/fuse-overlayfs", "/usr/local/bin/fuse-overlayfs"]
            .iter()
            .any(|path| Path::new(path).exists()),
        "fuse-overlayfs is not installed: `apt-get install fuse-overlayfs` (scripts/setup-host)",
    ) && prerequisite(
        std::fs::metadata("/dev/fuse")
            .is_ok_and(|metadata| metadata.permissions().mode() & 0o006 == 0o006),
        "/dev/fuse is missing or not open to every user: `chmod 0666 /dev/fuse` (scripts/setup-host)",
    )
}

const FUSE: &[&str] = &["GRAPHBUILD_OVERLAY=fuse"];
/// fuse-overlayfs records deletions as `.wh.NAME` files instead of 0/0 devices.
const FUSE_WH_FILES: &[&str] = &[
    "GRAPHBUILD_OVERLAY=fuse",
    "FUSE_OVERLAYFS_DISABLE_OVL_WHITEOUT=1",
];

#[test]
fn fuse_overlayfs_builds_basic_for_three_platforms_bit_identical_to_root() {
    if !ready() || !emulators() || !fuse_ready() {
        return;
    }
    let scratch = Scratch::new(SUBID_USER);
    scratch.example("basic");
    let file = "examples/basic/images.kdl";
    let root = scratch.as_root(&["run", file, "--progress", "plain", "--output", "out-root"]);
    assert_ok(&root);
    let fuse = scratch.as_user_with(
        &["run", file, "--progress", "plain", "--output", "out-fuse"],
        Some("store-fuse"),
        FUSE,
    );
    assert_ok(&fuse);
    let text = all_output(&fuse);
    assert!(
        text.contains("15 steps executed"),
        "the fuse-overlayfs build ran every step:\n{text}"
    );
    assert_identical(
        "examples/basic rootless on fuse-overlayfs (linux/amd64, linux/arm64, linux/arm/v7)",
        &scratch.path().join("out-root/basic"),
        &scratch.path().join("out-fuse/basic"),
    );
}

/// [`OWNERS`] and [`DERIVED`] with their `ls -lnR` listings minus the link-count column: the
/// kernel's overlayfs reports 1 link for a directory merged from several layers, fuse-overlayfs
/// counts its subdirectories (docs/security.md, Rootless). The listing is made in /tmp first, so
/// it never lists itself (with the time it was made). Everything else is as written.
fn without_link_counts(build: &str) -> String {
    let replaced = build
        .replace(
            "ls -lnR /srv /home /data > /listing.txt",
            "ls -lnR /srv /home /data > /tmp/l && awk '{ $2 = 0; print }' /tmp/l > /listing.txt && rm /tmp/l",
        )
        .replace(
            "ls -lnR /srv /home > /srv/listing.txt",
            "ls -lnR /srv /home > /tmp/l && awk '{ $2 = 0; print }' /tmp/l > /srv/listing.txt && rm /tmp/l",
        );
    assert_eq!(
        replaced.matches("awk").count(),
        1,
        "one listing step replaced"
    );
    replaced
}

/// Copy-ups fuse-overlayfs 1.10 gets wrong on its own: setuid and setgid files not owned by
/// root, and a setgid directory, modified in a later step (their bits must survive).
const COPY_UPS: &str = r#"platforms "linux/amd64"

stage copyups {
    from "oci:../tests/fixtures/busybox:1.35.0"
    run "cp /bin/busybox /x && chown 1000:1000 /x && chmod 4755 /x && cp /bin/busybox /y && chown 0:50 /y && chmod 2755 /y && mkdir /sg && chown 0:50 /sg && chmod 2775 /sg && touch /sg/a"
    run "touch -d 2001-01-01 /x /y && chmod u+w /x && echo b > /sg/a"
}

image copyups {
    stage copyups
    tags "localhost/copyups:1.0"
}
"#;

#[test]
fn fuse_overlayfs_many_owners_setuid_and_whiteouts_are_bit_identical_to_root() {
    if !ready() || !fuse_ready() {
        return;
    }
    let scratch = Scratch::new(SUBID_USER);
    scratch.write("owners/files/data.txt", "data\n");
    scratch.write("owners/images.kdl", &without_link_counts(OWNERS));
    scratch.write("derived/images.kdl", &without_link_counts(DERIVED));
    scratch.write("copyups/images.kdl", COPY_UPS);
    let files = [
        "owners/images.kdl",
        "derived/images.kdl",
        "copyups/images.kdl",
    ];
    for file in files {
        let root = scratch.as_root(&["run", file, "--progress", "plain", "--output", "out-root"]);
        assert_ok(&root);
    }
    for (env, store, what) in [
        (FUSE, "store-fuse", "0/0 whiteout devices"),
        (FUSE_WH_FILES, "store-fuse-wh", "`.wh.` whiteout files"),
    ] {
        let output = format!("out-{store}");
        for file in files {
            let built = scratch.as_user_with(
                &["run", file, "--progress", "plain", "--output", &output],
                Some(store),
                env,
            );
            assert_ok(&built);
        }
        assert_identical(
            &format!(
                "owners on fuse-overlayfs with {what} (chown to 1000, 33, 2000:3000, 65534; \
                 setuid, setgid, hard link, fifo, whiteouts, opaque dir, copy chown=, user 1000)"
            ),
            &scratch.path().join("out-root/owners"),
            &scratch.path().join(&output).join("owners"),
        );
        assert_identical(
            &format!("derived on fuse-overlayfs with {what} (a base image with many owners)"),
            &scratch.path().join("out-root/derived"),
            &scratch.path().join(&output).join("derived"),
        );
        assert_identical(
            &format!("copy-ups of setuid/setgid entries on fuse-overlayfs with {what}"),
            &scratch.path().join("out-root/copyups"),
            &scratch.path().join(&output).join("copyups"),
        );
    }

    // What fuse-overlayfs cannot do like the kernel (a new entry in a copied-up setgid
    // directory gets the creator's group) is named in a notice.
    scratch.write(
        "setgid/images.kdl",
        &COPY_UPS.replace("echo b > /sg/a\"", "echo b > /sg/a && ln -s /x /sg/link\""),
    );
    let built = scratch.as_user_with(
        &[
            "run",
            "setgid/images.kdl",
            "--progress",
            "plain",
            "--output",
            "out-setgid",
        ],
        Some("store-fuse"),
        FUSE,
    );
    assert_ok(&built);
    let text = all_output(&built);
    assert!(
        text.contains(
            "notice: fuse-overlayfs does not give entries created in a setgid directory its group \
             (or setgid bit): /sg/link may differ"
        ),
        "{text}"
    );
}

#[test]
fn doctor_names_the_overlay_and_a_missing_fuse_overlayfs_is_an_environment_error() {
    if !ready() || !fuse_ready() {
        return;
    }
    let scratch = Scratch::new(SUBID_USER);
    let forced = all_output(&scratch.as_user_with(&["doctor"], Some("store-rl"), FUSE));
    assert!(
        forced.contains("✓ overlay: steps use fuse-overlayfs (")
            && forced.contains("(GRAPHBUILD_OVERLAY=fuse)"),
        "{forced}"
    );
    let native = all_output(&scratch.as_user_with(
        &["doctor"],
        Some("store-rl"),
        &["GRAPHBUILD_OVERLAY=native"],
    ));
    assert!(
        native.contains("✓ overlay: steps use the kernel's overlayfs (GRAPHBUILD_OVERLAY=native)"),
        "{native}"
    );
    // Unforced, the user's doctor probes; root's doctor probes in a user namespace of its own
    // and must come to the same answer for rootless builds.
    let auto = all_output(&scratch.as_user(&["doctor"], Some("store-rl")));
    let as_root = all_output(&scratch.as_root(&["doctor"]));
    let kernel = auto.contains("overlayfs mounts natively in the user namespace");
    let fallback = auto.contains("✓ overlay: steps use fuse-overlayfs (");
    assert!(
        kernel != fallback,
        "the user's doctor names one overlay:\n{auto}"
    );
    assert!(
        as_root.contains(if kernel {
            "✓ overlay: rootless builds use the kernel's overlayfs"
        } else {
            "✓ overlay: rootless builds use fuse-overlayfs"
        }),
        "root's doctor agrees with the user's:\n{as_root}\n---\n{auto}"
    );

    // Asked for and missing: exit 3, naming the package.
    scratch.write(
        "one/images.kdl",
        "platforms \"linux/amd64\"\nstage s {\n    from \"oci:../tests/fixtures/busybox:1.35.0\"\n    run \"true\"\n}\nimage s {\n    stage s\n    tags \"t:1\"\n}\n",
    );
    let missing = scratch.as_user_with(
        &["run", "one/images.kdl", "--progress", "plain"],
        Some("store-rl"),
        &["GRAPHBUILD_OVERLAY=fuse", "PATH=/nonexistent"],
    );
    let text = all_output(&missing);
    assert_eq!(missing.status.code(), Some(3), "{text}");
    assert!(
        text.contains("GRAPHBUILD_OVERLAY=fuse, but fuse-overlayfs is not installed")
            && text.contains("apt-get install fuse-overlayfs"),
        "{text}"
    );
    let bogus = scratch.as_user_with(
        &["run", "one/images.kdl", "--progress", "plain"],
        Some("store-rl"),
        &["GRAPHBUILD_OVERLAY=fuse-overlayfs"],
    );
    let text = all_output(&bogus);
    assert_eq!(bogus.status.code(), Some(2), "{text}");
    assert!(
        text.contains("`auto` (the default), `native` or `fuse`"),
        "{text}"
    );
}

/// fuse-overlayfs daemons and mounts whose paths are under `tmp` (the builds' TMPDIR, where
/// sandboxes make their scratch directories), in any process or mount namespace.
fn fuse_leftovers(tmp: &Path) -> Vec<String> {
    let needle = tmp.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|byte| byte.is_ascii_digit()) {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline"))
            .map(|bytes| String::from_utf8_lossy(&bytes).replace('\0', " "))
            .unwrap_or_default();
        if cmdline.contains("fuse-overlayfs") && cmdline.contains(&needle) {
            found.push(format!("process {pid}: {cmdline}"));
        }
        let mounts = std::fs::read_to_string(entry.path().join("mountinfo")).unwrap_or_default();
        for line in mounts.lines() {
            if line.contains("fuse") && line.contains(&needle) {
                found.push(format!("mount seen by {pid}: {line}"));
            }
        }
    }
    found
}

#[test]
fn fuse_overlayfs_leaves_no_mount_or_process_after_a_build_a_failed_step_or_sigterm() {
    if !ready() || !fuse_ready() {
        return;
    }
    let scratch = Scratch::new(SUBID_USER);
    std::fs::create_dir_all(scratch.path().join("tmp")).expect("mkdir");
    scratch.write(
        "fuse/images.kdl",
        r#"platforms "linux/amd64"

stage ok {
    from "oci:../tests/fixtures/busybox:1.35.0"
    run "grep -q ' / / .* - fuse.fuse-overlayfs ' /proc/self/mountinfo && echo on-fuse > /on-fuse"
}

stage fails {
    from ok
    run "echo failing; exit 7"
}

stage slow {
    from ok
    run "echo started; sleep 302 & sleep 303"
}

image ok {
    stage ok
    tags "t:1"
}

image fails {
    stage fails
    tags "t:1"
}

image slow {
    stage slow
    tags "t:1"
}
"#,
    );
    let tmp = scratch.path().join("tmp");
    let tmpdir = format!("TMPDIR={}", tmp.display());
    let env = ["GRAPHBUILD_OVERLAY=fuse", tmpdir.as_str()];
    let run = |image: &str, store: &str, env: &[&str]| {
        scratch.as_user_with(
            &["run", "fuse/images.kdl", image, "--progress", "plain"],
            Some(store),
            env,
        )
    };

    // The step sees its root on fuse-overlayfs; on the kernel's overlayfs the same step fails.
    let built = run("ok", "store-fuse", &env);
    assert_ok(&built);
    assert_eq!(fuse_leftovers(&tmp), Vec::<String>::new(), "after a build");
    let native = run("ok", "store-native", &[tmpdir.as_str()]);
    assert_eq!(native.status.code(), Some(1), "{}", all_output(&native));

    let failed = run("fails", "store-fuse", &env);
    let text = all_output(&failed);
    assert_eq!(failed.status.code(), Some(1), "{text}");
    assert!(text.contains("exit code 7"), "{text}");
    assert_eq!(
        fuse_leftovers(&tmp),
        Vec::<String>::new(),
        "after a failed step"
    );

    // SIGTERM to the outer process while a step runs on fuse-overlayfs.
    let log = scratch.path().join("slow.log");
    let mut child = scratch
        .user_command(
            &["run", "fuse/images.kdl", "slow", "--progress", "plain"],
            Some("store-fuse"),
            &env,
        )
        .stdout(std::fs::File::create(&log).expect("log"))
        .stderr(
            std::fs::OpenOptions::new()
                .append(true)
                .open(&log)
                .expect("log"),
        )
        .spawn()
        .expect("runuser starts");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("started")
    {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "the step never started:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let running = fuse_leftovers(&tmp);
    if running.is_empty() {
        let _ = child.kill();
    }
    assert!(
        !running.is_empty(),
        "while the step runs, its fuse-overlayfs daemon or mount is found"
    );
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id()))
        .expect("children of runuser");
    let outer: i32 = children
        .split_whitespace()
        .next()
        .expect("graphbuild runs under runuser")
        .parse()
        .expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(outer),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill");
    let sent = std::time::Instant::now();
    let status = child.wait().expect("wait");
    assert!(!status.success());
    assert!(
        sent.elapsed() < std::time::Duration::from_secs(20),
        "cancelled promptly, daemon included"
    );
    assert_eq!(fuse_leftovers(&tmp), Vec::<String>::new(), "after SIGTERM");
    let sleeping = Command::new("pgrep")
        .args(["-u", SUBID_USER, "-f", "sleep 30[23]"])
        .output()
        .expect("pgrep");
    assert!(
        String::from_utf8_lossy(&sleeping.stdout).trim().is_empty(),
        "no step process is left"
    );
}
