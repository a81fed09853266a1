//! "Know why" end to end: `plan`, `plan --explain`, `inspect`, `doctor`, `verify`, `cache du`,
//! the progress displays, completions and help, run from the real binary on real builds.
//!
//! Text output is pinned with insta snapshots (`tests/e2e/snapshots/`); what varies by design
//! is redacted: temporary paths, durations, keys and the digests of built images (they follow
//! every change to the engine's layer format). Review changes with `cargo insta review`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use sha2::Digest as _;

/// Run graphbuild in the sandbox with its private store, no color, no credentials file, no
/// team cache, and the extra environment given.
fn graphbuild_env(sandbox: &Sandbox, args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut command = Command::new(bin());
    command
        .args(args)
        .current_dir(sandbox.path())
        .env("GRAPHBUILD_CACHE_DIR", sandbox.store())
        .env("NO_COLOR", "1")
        .env("DOCKER_CONFIG", sandbox.path().join("docker-config"))
        .env_remove("SOURCE_DATE_EPOCH")
        .env_remove("GRAPHBUILD_CACHE")
        .env_remove("GRAPHBUILD_BINFMT_DIR")
        .env_remove("COLUMNS");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("graphbuild runs")
}

fn graphbuild(sandbox: &Sandbox, args: &[&str]) -> Output {
    graphbuild_env(sandbox, args, &[])
}

/// Snapshot `text` with the volatile parts redacted.
macro_rules! snapshot {
    ($name:expr, $text:expr) => {
        insta::with_settings!({
            prepend_module_to_snapshot => false,
            filters => vec![
                (r"/tmp/graphbuild-e2e-[A-Za-z0-9]+", "[sandbox]"),
                (r"/tmp/graphbuild-verify-[A-Za-z0-9]+", "[verify-dir]"),
                (r"sha256:[0-9a-f]{64}", "sha256:[digest]"),
                (r"\b[0-9a-f]{12}\b", "[key]"),
                (r"\b\d+(\.\d+)?(ms|s)\b", "[duration]"),
                (r"\b\d+m\d\ds\b", "[duration]"),
            ],
        }, {
            insta::assert_snapshot!($name, $text);
        });
    };
}

/// Sizes of a store depend on the filesystem: redact them too.
fn redact_sizes(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split(' ').collect();
        let mut kept = Vec::new();
        let mut index = 0;
        while index < words.len() {
            let is_number = words[index].parse::<f64>().is_ok();
            let unit = words.get(index + 1).copied();
            if is_number && matches!(unit, Some("B" | "KiB" | "MiB" | "GiB" | "TiB")) {
                kept.push("[size]");
                index += 2;
            } else {
                kept.push(words[index]);
                index += 1;
            }
        }
        out.push_str(&kept.join(" "));
        out.push('\n');
    }
    out
}

const HOST_RUNNABLE: &str = "linux/amd64";

// ---------------------------------------------------------------------------------------
// Snapshots of plan, explain, inspect, cache du

#[test]
fn plan_explain_inspect_and_cache_du_read_well() {
    let sandbox = Sandbox::new();
    sandbox.example("basic");
    let file = "examples/basic/images.kdl";

    let cold_plan = graphbuild(&sandbox, &["plan", file]);
    assert_success(&cold_plan);
    snapshot!("plan_before_any_build", stdout(&cold_plan));
    let never = graphbuild(&sandbox, &["plan", file, "--explain"]);
    assert_success(&never);
    assert_eq!(
        stdout(&never).matches("will run: never built").count(),
        9,
        "{}",
        stdout(&never)
    );
    snapshot!("explain_before_any_build", stdout(&never));

    assert_success(&graphbuild(
        &sandbox,
        &["run", file, "--output", "out", "--progress", "json"],
    ));

    let warm_plan = graphbuild(&sandbox, &["plan", file]);
    assert_success(&warm_plan);
    assert_eq!(
        stdout(&warm_plan).matches("  cached").count(),
        9,
        "{}",
        stdout(&warm_plan)
    );
    snapshot!("plan_after_a_build", stdout(&warm_plan));
    let cached = graphbuild(&sandbox, &["plan", file, "--explain"]);
    assert_success(&cached);
    assert_eq!(
        stdout(&cached).matches(": cached").count(),
        9,
        "{}",
        stdout(&cached)
    );
    snapshot!("explain_after_a_build", stdout(&cached));

    let inspect = graphbuild(&sandbox, &["inspect", "out/basic"]);
    assert_success(&inspect);
    let text = stdout(&inspect);
    assert!(
        text.contains("1.0, latest"),
        "both tags name one index: {text}"
    );
    for platform in ["linux/amd64", "linux/arm64", "linux/arm/v7"] {
        assert!(
            text.contains(&format!("\n    {platform}\n")),
            "{platform}: {text}"
        );
    }
    assert!(text.contains("2 layers (gzip)"), "{text}");
    assert!(
        text.contains("cmd        [\"cat\",\"/app/arch.txt\""),
        "{text}"
    );
    assert!(text.contains("env        APP_HOME=/app"), "{text}");
    assert!(
        text.contains("label      org.opencontainers.image.title=basic"),
        "{text}"
    );
    snapshot!("inspect_built_image", text);

    // The JSON form agrees with skopeo about the index digest.
    let json = graphbuild(&sandbox, &["inspect", "out/basic:1.0", "--format", "json"]);
    assert_success(&json);
    let value: serde_json::Value =
        serde_json::from_slice(&json.stdout).expect("inspect --format json is JSON");
    let index_json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(sandbox.path().join("out/basic/index.json")).expect("index.json"),
    )
    .expect("json");
    assert_eq!(
        value["images"][0]["digest"],
        index_json["manifests"][0]["digest"]
    );
    assert_eq!(
        value["images"][0]["platforms"].as_array().map(Vec::len),
        Some(3)
    );
    assert_eq!(value["images"][0]["platforms"][0]["layers"], 2);
    assert!(
        value["images"][0]["platforms"][0]["uncompressed_size"].as_u64()
            > value["images"][0]["platforms"][0]["compressed_size"].as_u64()
    );

    // The vendored fixture never changes: its inspect output is pinned unredacted.
    let fixture = graphbuild(&sandbox, &["inspect", "tests/fixtures/busybox"]);
    assert_success(&fixture);
    insta::with_settings!({ prepend_module_to_snapshot => false }, {
        insta::assert_snapshot!("inspect_busybox_fixture", stdout(&fixture));
    });

    let du = graphbuild(&sandbox, &["cache", "du"]);
    assert_success(&du);
    let du_text = stdout(&du);
    let total = du_text
        .lines()
        .find(|line| line.trim_start().starts_with("total"))
        .unwrap_or_default();
    assert!(
        !total.ends_with(" 0 B"),
        "a build fills the store: {du_text}"
    );
    assert!(
        du_text.contains("blobs") && du_text.contains("actions") && du_text.contains("snapshots"),
        "{du_text}"
    );
    snapshot!("cache_du_after_a_build", redact_sizes(&stdout(&du)));
}

// ---------------------------------------------------------------------------------------
// plan --explain: a changed file, a changed arg, a changed base

const EXPLAIN_PROJECT: &str = r#"platforms "linux/amd64"
arg BASE="oci:../tests/fixtures/busybox:1.35.0"
arg MESSAGE="hello"

stage app {
    from "$BASE"
    copy "src/" "/src/"
    run "echo $MESSAGE > /message.txt"
}

image app { stage app; }
"#;

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

fn write_blob(layout: &Path, bytes: &[u8]) -> (String, usize) {
    let hex = sha256_hex(bytes);
    std::fs::write(layout.join("blobs/sha256").join(&hex), bytes).expect("write blob");
    (format!("sha256:{hex}"), bytes.len())
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A copy of the busybox fixture whose every manifest carries one more annotation: the same
/// layers and configs under different manifest digests. Returns the new linux/amd64 digest.
fn relabelled_fixture(sandbox: &Sandbox, name: &str) -> String {
    let layout = sandbox.path().join(name);
    copy_tree(&sandbox.path().join("tests/fixtures/busybox"), &layout);
    let blob = |digest: &str| {
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let mut top = read_json(&layout.join("index.json"));
    let nested_digest = top["manifests"][0]["digest"]
        .as_str()
        .expect("digest")
        .to_string();
    let mut nested = read_json(&blob(&nested_digest));
    let mut amd64 = String::new();
    for descriptor in nested["manifests"].as_array_mut().expect("manifests") {
        let mut manifest = read_json(&blob(descriptor["digest"].as_str().expect("digest")));
        manifest["annotations"] = serde_json::json!({"org.example.rebuilt": name});
        let (digest, size) = write_blob(&layout, &serde_json::to_vec(&manifest).expect("json"));
        if descriptor["platform"]["architecture"] == "amd64" {
            amd64 = digest.clone();
        }
        descriptor["digest"] = digest.into();
        descriptor["size"] = size.into();
    }
    let (digest, size) = write_blob(&layout, &serde_json::to_vec(&nested).expect("json"));
    top["manifests"][0]["digest"] = digest.into();
    top["manifests"][0]["size"] = size.into();
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&top).expect("json"),
    )
    .expect("index.json");
    assert!(!amd64.is_empty());
    amd64
}

/// The `--explain` line block of the `app` node.
fn explanation(output: &Output) -> String {
    assert_success(output);
    stdout(output)
}

#[test]
fn explain_names_a_changed_file_a_changed_arg_and_a_changed_base() {
    let sandbox = Sandbox::new();
    sandbox.write("proj/images.kdl", EXPLAIN_PROJECT);
    sandbox.write("proj/src/a.txt", "a\n");
    sandbox.write("proj/src/b.txt", "b\n");
    let new_base_digest = relabelled_fixture(&sandbox, "proj/other-base");
    assert_success(&graphbuild(
        &sandbox,
        &[
            "run",
            "proj/images.kdl",
            "--output",
            "out",
            "--progress",
            "json",
        ],
    ));

    let plan = |extra: &[&str]| {
        let mut args = vec!["plan", "proj/images.kdl", "--explain"];
        args.extend_from_slice(extra);
        explanation(&graphbuild(&sandbox, &args))
    };
    assert_eq!(plan(&[]), "app · linux/amd64: cached\n");

    // Touching a file (new mtime, same bytes) loses nothing.
    std::thread::sleep(std::time::Duration::from_millis(20));
    Command::new("touch")
        .arg(sandbox.path().join("proj/src/a.txt"))
        .status()
        .expect("touch");
    assert_eq!(
        plan(&[]),
        "app · linux/amd64: cached\n",
        "mtimes are not inputs"
    );

    // A changed file is named by its path; the other file is not.
    sandbox.write("proj/src/b.txt", "b, changed\n");
    let changed_file = plan(&[]);
    assert!(
        changed_file.contains("will run from `COPY src/ /src/` (proj/images.kdl:7:5)"),
        "{changed_file}"
    );
    assert!(changed_file.contains("src/b.txt"), "{changed_file}");
    assert!(!changed_file.contains("src/a.txt"), "{changed_file}");
    snapshot!("explain_changed_file", changed_file);
    sandbox.write("proj/src/b.txt", "b\n");
    assert_eq!(
        plan(&[]),
        "app · linux/amd64: cached\n",
        "restoring the bytes restores the cache hit"
    );

    // A changed arg: its name, the old and the new value.
    let changed_arg = plan(&["--arg", "MESSAGE=goodbye"]);
    assert!(
        changed_arg.contains(
            "will run from `RUN /bin/sh -c echo goodbye > /message.txt` (proj/images.kdl:8:5)"
        ),
        "{changed_arg}"
    );
    assert!(
        changed_arg.contains(r#"arg MESSAGE changed: "hello" → "goodbye""#),
        "{changed_arg}"
    );
    snapshot!("explain_changed_arg", changed_arg);

    // A different base image: same tag, same layers, a different manifest digest.
    let changed_base = plan(&["--arg", "BASE=oci:other-base:1.35.0"]);
    let fixture_amd64 = "sha256:b76cc888e353f5a257a3cd535a353801a587e3ce6a68cbc670449bc7fe1e19c5";
    assert!(
        changed_base.contains("will run from `COPY src/ /src/`"),
        "{changed_base}"
    );
    assert!(changed_base.contains("the base changed"), "{changed_base}");
    assert!(
        changed_base.contains(fixture_amd64),
        "the old digest: {changed_base}"
    );
    assert!(
        changed_base.contains(&new_base_digest),
        "the new digest {new_base_digest}: {changed_base}"
    );

    // The same layout under another path is the same base: the key follows the digest.
    copy_tree(
        &sandbox.path().join("tests/fixtures/busybox"),
        &sandbox.path().join("proj/same-base"),
    );
    assert_eq!(
        plan(&["--arg", "BASE=oci:same-base:1.35.0"]),
        "app · linux/amd64: cached\n"
    );

    // JSON carries the same explanation.
    let json = graphbuild(
        &sandbox,
        &[
            "plan",
            "proj/images.kdl",
            "--explain",
            "--format",
            "json",
            "--arg",
            "MESSAGE=x",
        ],
    );
    assert_success(&json);
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json");
    assert_eq!(value["nodes"][0]["explain"]["status"], "changed", "{value}");
    let reasons = value["nodes"][0]["explain"]["reasons"].to_string();
    assert!(reasons.contains("MESSAGE"), "{reasons}");
}

/// A layer written as two gzip members (as `pigz` or concatenated streams produce): inspect
/// reads all of it, like a build unpacking it does.
#[test]
fn inspect_counts_every_gzip_member_of_a_layer() {
    use std::io::Write;
    let sandbox = Sandbox::new();
    let mut builder = tar::Builder::new(Vec::new());
    for (name, fill) in [("a.txt", b'a'), ("b.txt", b'b')] {
        let data = vec![fill; 8192];
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, name, &data[..])
            .expect("tar entry");
    }
    let tar_bytes = builder.into_inner().expect("tar");
    let gzip = |bytes: &[u8]| {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(bytes).expect("gzip");
        encoder.finish().expect("gzip")
    };
    let half = tar_bytes.len() / 2;
    let mut layer = gzip(&tar_bytes[..half]);
    layer.extend(gzip(&tar_bytes[half..]));
    let layout = sandbox.path().join("two-members");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("mkdir");
    let put = |bytes: &[u8]| {
        let hex = hex::encode(sha2::Sha256::digest(bytes));
        std::fs::write(blobs.join(&hex), bytes).expect("blob");
        (format!("sha256:{hex}"), bytes.len())
    };
    let diff_id = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&tar_bytes)));
    let (layer_digest, layer_size) = put(&layer);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    });
    let (config_digest, config_size) = put(config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer_size}],
    });
    let (manifest_digest, manifest_size) = put(manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"org.opencontainers.image.ref.name": "1.0"},
        }],
    });
    std::fs::write(layout.join("index.json"), index.to_string()).expect("index");
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("oci-layout");
    let output = graphbuild(&sandbox, &["inspect", "two-members", "--format", "json"]);
    assert_success(&output);
    let json: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    let platform = &json["images"][0]["platforms"][0];
    assert_eq!(platform["compressed_size"], layer_size, "{json}");
    assert_eq!(platform["uncompressed_size"], tar_bytes.len(), "{json}");
}

// ---------------------------------------------------------------------------------------
// verify

#[test]
fn verify_names_the_file_a_non_reproducible_step_writes() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "stamp/images.kdl",
        r#"platforms "linux/amd64"
stage stamp {
    from "oci:../tests/fixtures/busybox:1.35.0"
    run "mkdir -p /out && date +%s%N > /out/stamp.txt && echo same > /out/same.txt"
}
image stamp { stage stamp; }
"#,
    );
    let output = graphbuild(&sandbox, &["verify", "stamp/images.kdl"]);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    let text = stdout(&output);
    assert!(text.contains("✗ stamp: the two builds differ"), "{text}");
    assert!(
        text.contains("out/stamp.txt: content"),
        "the file and how it differs: {text}"
    );
    assert!(
        !text.contains("same.txt"),
        "identical files are not listed: {text}"
    );
    assert!(text.contains("linux/amd64 · layer 2"), "the layer: {text}");
    snapshot!("verify_not_reproducible", text);
}

#[test]
fn verify_passes_a_reproducible_build() {
    let sandbox = Sandbox::new();
    sandbox.example("basic");
    let output = graphbuild(&sandbox, &["verify", "examples/basic/images.kdl"]);
    assert_success(&output);
    let text = stdout(&output);
    assert!(text.contains("✓ basic: reproducible (sha256:"), "{text}");
    snapshot!("verify_reproducible", text);
}

#[test]
fn verify_takes_the_secrets_run_takes() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "secret/images.kdl",
        r#"platforms "linux/amd64"
stage app {
    from "oci:../tests/fixtures/busybox:1.35.0"
    run "test \"$(cat /run/secrets/token)\" = s3cret && echo ok > /ok.txt" {
        secret "token"
    }
}
image app { stage app; }
"#,
    );
    sandbox.write("secret/token.txt", "s3cret");
    let without = graphbuild(&sandbox, &["verify", "secret/images.kdl"]);
    assert_ne!(without.status.code(), Some(0), "{}", stderr(&without));
    assert!(
        stderr(&without).contains("--secret"),
        "{}",
        stderr(&without)
    );
    let token = sandbox.path().join("secret/token.txt");
    let with = graphbuild(
        &sandbox,
        &[
            "verify",
            "secret/images.kdl",
            "--secret",
            &format!("id=token,src={}", token.display()),
        ],
    );
    assert_success(&with);
    assert!(
        stdout(&with).contains("✓ app: reproducible (sha256:"),
        "{}",
        stdout(&with)
    );
}

// ---------------------------------------------------------------------------------------
// doctor and the emulator pre-check

/// A fake binfmt_misc directory in the kernel's format with handlers for the given qemu
/// names (`aarch64`, `arm`), each with the F flag.
fn fake_binfmt(sandbox: &Sandbox, name: &str, handlers: &[&str]) -> PathBuf {
    let dir = sandbox.path().join(name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("status"), "enabled\n").expect("status");
    std::fs::write(dir.join("register"), "").expect("register");
    for handler in handlers {
        let magic = match *handler {
            "aarch64" => "7f454c460201010000000000000000000200b700",
            "arm" => "7f454c4601010100000000000000000002002800",
            other => panic!("no magic for {other}"),
        };
        std::fs::write(
            dir.join(format!("qemu-{handler}")),
            format!(
                "enabled\ninterpreter /usr/bin/qemu-{handler}-static\nflags: F\noffset 0\nmagic {magic}\nmask ffffffffffffff00fffffffffffffffffeffffff\n"
            ),
        )
        .expect("handler");
    }
    dir
}

#[test]
fn doctor_names_a_missing_emulator_with_a_fix_and_exits_3() {
    let sandbox = Sandbox::new();
    sandbox.example("basic");
    let binfmt = fake_binfmt(&sandbox, "binfmt-without-aarch64", &["arm"]);
    let output = graphbuild_env(
        &sandbox,
        &["doctor", "examples/basic/images.kdl"],
        &[("GRAPHBUILD_BINFMT_DIR", &binfmt)],
    );
    assert_eq!(
        output.status.code(),
        Some(3),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    let text = stdout(&output);
    let lines: Vec<&str> = text.lines().collect();
    let failed = lines
        .iter()
        .position(|line| line.starts_with("✗"))
        .unwrap_or_else(|| panic!("no ✗ line: {text}"));
    assert!(lines[failed].contains("linux/arm64"), "{text}");
    assert!(
        lines[failed + 1].trim_start().starts_with("fix:"),
        "a fix follows: {text}"
    );
    assert!(lines[failed + 1].contains("qemu-user-static"), "{text}");
    assert_eq!(
        lines.iter().filter(|line| line.starts_with("✗")).count(),
        1,
        "only arm64 is missing: {text}"
    );
    assert!(
        text.contains("✓ linux/arm/v7 runs through qemu-arm (/usr/bin/qemu-arm-static, F flag)"),
        "{text}"
    );
    assert!(text.contains("✓ linux/amd64 runs natively"), "{text}");
    snapshot!("doctor_missing_aarch64", text);
}

#[test]
fn doctor_passes_when_every_handler_is_there() {
    let sandbox = Sandbox::new();
    sandbox.example("basic");
    let binfmt = fake_binfmt(&sandbox, "binfmt-complete", &["aarch64", "arm"]);
    let output = graphbuild_env(
        &sandbox,
        &["doctor", "examples/basic/images.kdl"],
        &[("GRAPHBUILD_BINFMT_DIR", &binfmt)],
    );
    assert_success(&output);
    let text = stdout(&output);
    assert!(!text.contains('✗'), "{text}");
    assert!(
        text.contains(
            "✓ linux/arm64 runs through qemu-aarch64 (/usr/bin/qemu-aarch64-static, F flag)"
        ),
        "{text}"
    );
    snapshot!("doctor_all_present", text);

    // A handler without the F flag does not count, and says why.
    let no_fix = fake_binfmt(&sandbox, "binfmt-no-f", &["aarch64", "arm"]);
    let handler = no_fix.join("qemu-aarch64");
    let text = std::fs::read_to_string(&handler)
        .expect("read")
        .replace("flags: F", "flags: ");
    std::fs::write(&handler, text).expect("write");
    let output = graphbuild_env(
        &sandbox,
        &["doctor", "examples/basic/images.kdl"],
        &[("GRAPHBUILD_BINFMT_DIR", &no_fix)],
    );
    assert_eq!(output.status.code(), Some(3), "{}", stdout(&output));
    assert!(
        stdout(&output).contains("F (fix-binary) flag"),
        "{}",
        stdout(&output)
    );
}

#[test]
fn run_stops_before_building_anything_when_an_emulator_is_missing() {
    let sandbox = Sandbox::new();
    sandbox.example("basic");
    let binfmt = fake_binfmt(&sandbox, "binfmt-without-aarch64", &["arm"]);
    let output = graphbuild_env(
        &sandbox,
        &[
            "run",
            "examples/basic/images.kdl",
            "--output",
            "out",
            "--progress",
            "json",
        ],
        &[("GRAPHBUILD_BINFMT_DIR", &binfmt)],
    );
    assert_eq!(
        output.status.code(),
        Some(3),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    let err = stderr(&output);
    assert!(err.contains("linux/arm64"), "{err}");
    assert!(
        !err.contains("linux/arm/v7"),
        "arm/v7 has its emulator: {err}"
    );
    assert!(
        err.contains("doctor --fix") || err.contains("update-binfmts"),
        "says how to fix it: {err}"
    );
    assert!(
        events(&output)
            .iter()
            .all(|event| event["event"] != "step_started" && event["event"] != "step"),
        "{}",
        stdout(&output)
    );
    assert!(!sandbox.path().join("out").exists(), "nothing written");
    let actions = sandbox.store().join("actions");
    let recorded = std::fs::read_dir(&actions)
        .map(|entries| entries.count())
        .unwrap_or(0);
    assert_eq!(
        recorded, 0,
        "no step ran, so no step result is in the store"
    );

    // Only the native platform: no emulator needed.
    let native = graphbuild_env(
        &sandbox,
        &[
            "run",
            "examples/basic/images.kdl",
            "--output",
            "out",
            "--progress",
            "json",
            "--platform",
            HOST_RUNNABLE,
        ],
        &[("GRAPHBUILD_BINFMT_DIR", &binfmt)],
    );
    assert_success(&native);
}

// ---------------------------------------------------------------------------------------
// completions and help

#[test]
fn completions_mention_every_subcommand() {
    let sandbox = Sandbox::new();
    for shell in ["bash", "zsh", "fish"] {
        let output = graphbuild(&sandbox, &["completions", shell]);
        assert_success(&output);
        let script = stdout(&output);
        assert!(script.len() > 500, "{shell}: {script}");
        for command in [
            "run",
            "plan",
            "verify",
            "doctor",
            "inspect",
            "cache",
            "completions",
        ] {
            assert!(
                script.contains(command),
                "{shell} completions lack `{command}`"
            );
        }
        assert!(
            script.contains("--explain") || script.contains("explain"),
            "{shell}: flags too"
        );
    }
    let bash = graphbuild(&sandbox, &["completions", "bash"]);
    let check = Command::new("bash")
        .arg("-n")
        .arg("-c")
        .arg(stdout(&bash))
        .output()
        .expect("bash runs");
    assert!(
        check.status.success(),
        "the bash script parses: {}",
        stderr(&check)
    );
}

#[test]
fn every_command_has_help_with_an_example() {
    let sandbox = Sandbox::new();
    let commands: [&[&str]; 11] = [
        &[],
        &["run"],
        &["plan"],
        &["verify"],
        &["doctor"],
        &["inspect"],
        &["cache"],
        &["cache", "du"],
        &["cache", "prune"],
        &["cache", "serve"],
        &["completions"],
    ];
    for command in commands {
        let mut args = command.to_vec();
        args.push("--help");
        let output = graphbuild(&sandbox, &args);
        assert_success(&output);
        let help = stdout(&output);
        assert!(
            help.contains("Example"),
            "`graphbuild {}` has no example:\n{help}",
            args.join(" ")
        );
        assert!(help.contains("graphbuild "), "{help}");
    }
}

// ---------------------------------------------------------------------------------------
// progress

#[test]
fn json_progress_is_one_event_per_line_ending_with_the_summary() {
    let sandbox = Sandbox::new();
    sandbox.example("basic");
    let output = graphbuild(
        &sandbox,
        &[
            "run",
            "examples/basic/images.kdl",
            "--output",
            "out",
            "--progress",
            "json",
            "--platform",
            HOST_RUNNABLE,
        ],
    );
    assert_success(&output);
    let text = stdout(&output);
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    assert!(events.len() > 5, "{text}");
    assert_eq!(events[0]["event"], "plan", "{text}");
    for event in &events {
        assert!(event["event"].is_string(), "{event}");
        if event["event"] == "step" {
            assert!(
                event["stage"].is_string() && event["platform"] == HOST_RUNNABLE,
                "{event}"
            );
            assert!(
                ["executed", "cached", "failed"]
                    .contains(&event["status"].as_str().unwrap_or_default()),
                "{event}"
            );
            assert!(event["step"].is_string(), "{event}");
            if event["status"] == "executed" {
                assert!(event["duration_ms"].is_u64(), "{event}");
            }
        }
    }
    let steps = events
        .iter()
        .filter(|event| event["event"] == "step")
        .count();
    assert_eq!(
        steps as u64,
        events[0]["steps"].as_u64().unwrap_or(0),
        "one step event per planned step"
    );
    let last = events.last().expect("events");
    assert_eq!(last["event"], "summary", "{text}");
    assert_eq!(last["executed"].as_u64(), Some(steps as u64));
    assert_eq!(last["cached"], 0);
    assert_eq!(last["images"][0]["name"], "basic");
    assert!(
        last["images"][0]["index_digest"]
            .as_str()
            .is_some_and(|digest| digest.starts_with("sha256:"))
    );
    assert!(events.iter().any(|event| event["event"] == "image"));

    // A warm run: every step cached, in the same shape.
    let warm = graphbuild(
        &sandbox,
        &[
            "run",
            "examples/basic/images.kdl",
            "--output",
            "out",
            "--progress",
            "json",
            "--platform",
            HOST_RUNNABLE,
        ],
    );
    let warm_events = events_of(&warm);
    assert!(
        warm_events
            .iter()
            .filter(|event| event["event"] == "step")
            .all(|event| event["status"] == "cached"),
        "{}",
        stdout(&warm)
    );
    assert_eq!(
        warm_events.last().map(|event| event["event"].clone()),
        Some("summary".into())
    );
}

fn events_of(output: &Output) -> Vec<serde_json::Value> {
    assert_success(output);
    stdout(output)
        .lines()
        .map(|line| serde_json::from_str(line).expect("JSON line"))
        .collect()
}

/// Run a shell command line under a pseudo-terminal (`script`), so graphbuild sees a tty.
fn in_pty(sandbox: &Sandbox, command_line: &str) -> (Option<i32>, String) {
    require_tool("script");
    let output = Command::new("script")
        .args(["-qefc", command_line, "/dev/null"])
        .current_dir(sandbox.path())
        .env("GRAPHBUILD_CACHE_DIR", sandbox.store())
        .env_remove("NO_COLOR")
        .env("TERM", "xterm-256color")
        .env_remove("COLUMNS")
        .output()
        .expect("script runs");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[test]
fn plain_progress_never_colors_even_on_a_terminal_and_quiet_prints_only_digests() {
    let sandbox = Sandbox::new();
    sandbox.example("basic");
    let bin = bin();
    let run = format!(
        "{} run examples/basic/images.kdl --output out --platform {HOST_RUNNABLE} --progress plain",
        bin.display()
    );
    let (code, text) = in_pty(&sandbox, &run);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        !text.contains('\x1b'),
        "ANSI escapes in plain output: {text:?}"
    );
    assert!(
        text.contains(&format!("[base {HOST_RUNNABLE}] DONE")),
        "{text}"
    );
    assert!(
        text.contains("PLATFORM") && text.contains("steps: 5 executed, 0 cached"),
        "{text}"
    );

    // Warm, plain: cached steps are marked (a cached final node needs none of the others).
    let (code, text) = in_pty(&sandbox, &run);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(&format!(
            "[runtime {HOST_RUNNABLE}] CACHED COPY /app/ /app/"
        )),
        "{text}"
    );
    assert!(text.contains("0 steps executed, 1 cached"), "{text}");
    assert!(!text.contains('\x1b'), "{text:?}");

    // Quiet: only `NAME DIGEST`.
    let quiet = graphbuild(
        &sandbox,
        &[
            "run",
            "examples/basic/images.kdl",
            "--output",
            "out",
            "--platform",
            HOST_RUNNABLE,
            "--quiet",
        ],
    );
    assert_success(&quiet);
    let lines: Vec<String> = stdout(&quiet).lines().map(String::from).collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("basic sha256:") && lines[0].len() == "basic sha256:".len() + 64,
        "{lines:?}"
    );
    assert_eq!(stderr(&quiet), "", "nothing on stderr when all is well");
}

/// The live display in a real terminal (tmux, 80×30): a line per running node with its
/// platform, elapsed time and last output line; finished steps marked; the final table.
#[test]
fn the_tty_display_shows_running_nodes_and_a_final_table() {
    require_tool("tmux");
    let sandbox = Sandbox::new();
    let marker = format!("tick-{}", std::process::id());
    sandbox.write(
        "slow/images.kdl",
        &format!(
            r#"platforms "linux/amd64" "linux/arm64"
stage slow {{
    from "oci:../tests/fixtures/busybox:1.35.0"
    run "echo fast > /fast.txt"
    run "for i in 1 2 3 4 5 6; do echo {marker} $i; sleep 1; done"
}}
image slow {{ stage slow; }}
"#
        ),
    );
    let session = format!("graphbuild-e2e-{}", std::process::id());
    let script = sandbox.write(
        "tty.sh",
        &format!(
            "cd {} && GRAPHBUILD_CACHE_DIR={} {} run slow/images.kdl --output out; echo EXIT=$?; sleep 60\n",
            sandbox.path().display(),
            sandbox.store().display(),
            bin().display()
        ),
    );
    let tmux = |args: &[&str]| Command::new("tmux").args(args).output().expect("tmux runs");
    let started = tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "80",
        "-y",
        "30",
        &format!("env -u NO_COLOR sh {}", script.display()),
    ]);
    assert!(started.status.success(), "{}", stderr(&started));
    struct Kill(String);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = Command::new("tmux")
                .args(["kill-session", "-t", &self.0])
                .output();
        }
    }
    let _kill = Kill(session.clone());
    let capture = || stdout(&tmux(&["capture-pane", "-p", "-J", "-t", &session]));

    // While the slow step runs: both nodes, their platform, elapsed time and last line.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut live = String::new();
    while std::time::Instant::now() < deadline {
        live = capture();
        if live.contains(&format!("{marker} 3")) && live.matches("│").count() >= 2 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(live.contains("[+] Building"), "{live}");
    for platform in ["linux/amd64", "linux/arm64"] {
        let line = live
            .lines()
            .find(|line| {
                line.contains(&format!("[slow {platform}]"))
                    && line.contains("RUN /bin/sh -c for i")
            })
            .unwrap_or_else(|| panic!("no running line for {platform}:\n{live}"));
        let elapsed = line
            .split_whitespace()
            .find(|word| word.ends_with('s') && word[..word.len() - 1].parse::<f64>().is_ok());
        assert!(
            elapsed.is_some(),
            "elapsed time on the running line: {line}"
        );
    }
    assert!(
        live.lines()
            .any(|line| line.contains("│") && line.contains(&marker)),
        "the last output line: {live}"
    );
    assert!(
        live.lines()
            .any(|line| line.starts_with('✓') && line.contains("RUN /bin/sh -c echo fast")),
        "the finished step: {live}"
    );
    assert!(
        live.lines().all(|line| line.chars().count() <= 80),
        "{live}"
    );

    // At the end: the table, and nothing left of the live region.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut done = String::new();
    while std::time::Instant::now() < deadline {
        done = capture();
        if done.contains("EXIT=") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(done.contains("EXIT=0"), "{done}");
    assert!(
        !done.contains("[+] Building"),
        "the live region is erased: {done}"
    );
    assert!(!done.contains("│"), "{done}");
    let table_row = |platform: &str| {
        done.lines().any(|line| {
            line.starts_with(&format!("  {platform}"))
                && line.contains("sha256:")
                && line.contains("iB")
        })
    };
    assert!(
        table_row("linux/amd64") && table_row("linux/arm64"),
        "{done}"
    );
    assert!(done.contains("steps: 4 executed, 0 cached"), "{done}");
    assert!(done.contains("1 image in "), "{done}");
    // Nothing wrapped: with wrapped lines joined (-J), every line still fits 80 columns.
    let joined = stdout(&tmux(&["capture-pane", "-p", "-J", "-t", &session]));
    assert!(
        joined
            .lines()
            .all(|line| line.trim_end().chars().count() <= 80),
        "{joined}"
    );
}

#[test]
fn inspect_reads_a_registry_image_like_a_layout() {
    let registry = Registry::start();
    let sandbox = Sandbox::new();
    let fixture = sandbox.path().join("tests/fixtures/busybox");
    registry.push_layout(
        &format!("oci:{}:1.35.0", fixture.display()),
        "library/busybox:1.35.0",
    );
    let remote = sandbox.graphbuild(&[
        "inspect",
        &format!("{}/library/busybox:1.35.0", registry.address),
        "--format",
        "json",
    ]);
    assert_success(&remote);
    let local = sandbox.graphbuild(&[
        "inspect",
        &format!("{}:1.35.0", fixture.display()),
        "--format",
        "json",
    ]);
    assert_success(&local);
    let remote: serde_json::Value = serde_json::from_slice(&remote.stdout).unwrap();
    let local: serde_json::Value = serde_json::from_slice(&local.stdout).unwrap();
    let remote_image = &remote["images"][0];
    let local_image = &local["images"][0];
    assert_eq!(remote_image["digest"], local_image["digest"]);
    assert_eq!(remote_image["platforms"].as_array().unwrap().len(), 3);
    // Same manifests, sizes (compressed and uncompressed) and config summaries.
    assert_eq!(remote_image["platforms"], local_image["platforms"]);

    let missing = sandbox.graphbuild(&[
        "inspect",
        &format!("{}/library/nothing:1", registry.address),
    ]);
    assert_eq!(missing.status.code(), Some(3), "{}", stderr(&missing));
    assert!(stderr(&missing).contains("nothing"), "{}", stderr(&missing));
}
