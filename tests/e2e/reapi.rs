//! The REAPI v2 team cache end to end, against a real BuildGrid on 127.0.0.1: started once for
//! this test binary by `scripts/buildgrid` (installed from PyPI on first use), stopped when
//! the binary exits. Under `CI=true` a BuildGrid that cannot be installed or started fails
//! every test here; elsewhere they are skipped with a message.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use graphbuild_engine::reapi::ReapiCache;
use graphbuild_engine::remote::{ActionResult, RemoteCache};

/// The BuildGrid of this test binary.
struct BuildGrid {
    port: u16,
    /// A TLS listener of the same server, for `grpcs://localhost:PORT`.
    tls_port: u16,
    /// The private CA that signed the TLS listener's certificate (PEM).
    ca: PathBuf,
    /// The script serving it, which stops it when this process exits.
    _script: std::process::Child,
    /// Its data directory: `cas/` holds the CAS blobs on disk, `server.log` its output.
    data: PathBuf,
}

impl BuildGrid {
    fn url(&self, instance: &str) -> String {
        if instance.is_empty() {
            format!("grpc://127.0.0.1:{}", self.port)
        } else {
            format!("grpc://127.0.0.1:{}/{instance}", self.port)
        }
    }

    /// The bytes BuildGrid's disk storage holds for a blob, if any.
    fn stored_blob(&self, hex: &str) -> Option<Vec<u8>> {
        std::fs::read(
            self.data
                .join("cas/cas/objects")
                .join(&hex[..2])
                .join(&hex[2..]),
        )
        .ok()
    }
}

fn unavailable(message: String) -> Option<BuildGrid> {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{message}");
    }
    eprintln!("skipped: {message}");
    None
}

/// Start BuildGrid; with `jwt`, every call needs a token signed with `secret.txt` in its data
/// directory.
fn start_buildgrid(jwt: bool) -> Option<BuildGrid> {
    let script = repo_root().join("scripts/buildgrid");
    let install = Command::new(&script)
        .arg("install")
        .output()
        .expect("scripts/buildgrid runs");
    if !install.status.success() {
        return unavailable(format!(
            "BuildGrid is not installed and `scripts/buildgrid install` failed (it needs Python >= 3.13 and PyPI): {}",
            stderr(&install)
        ));
    }
    // Kept for the whole binary (BuildGrid's CAS and log live here); the script deletes it
    // when this process exits.
    let data = tempfile::Builder::new()
        .prefix("graphbuild-buildgrid-")
        .tempdir()
        .expect("temp dir")
        .keep();
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port()
    };
    let (port, tls_port) = (free_port(), free_port());
    let (ca, cert, key) = private_ca(&data.join("tls"));
    let log = std::fs::File::create(data.join("server.log")).expect("log file");
    // The script stops BuildGrid when this process exits.
    let mut command = Command::new(&script);
    if jwt {
        std::fs::write(
            data.join("secret.txt"),
            "graphbuild-test-secret-0123456789abcdef",
        )
        .expect("secret");
        command.env("GRAPHBUILD_BUILDGRID_JWT_SECRET", data.join("secret.txt"));
    }
    let mut child = command
        .arg("serve")
        .arg(&data)
        .arg(port.to_string())
        .arg(std::process::id().to_string())
        .env("GRAPHBUILD_BUILDGRID_TLS_PORT", tls_port.to_string())
        .env("GRAPHBUILD_BUILDGRID_TLS_CERT", &cert)
        .env("GRAPHBUILD_BUILDGRID_TLS_KEY", &key)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("scripts/buildgrid serve starts");
    match common::wait_until_listening(&mut child, &[port, tls_port], &data.join("server.log")) {
        Ok(()) => Some(BuildGrid {
            port,
            tls_port,
            ca,
            _script: child,
            data,
        }),
        Err(message) => unavailable(message),
    }
}

/// A CA and a server certificate for `localhost` signed by it, with openssl: (ca, cert, key).
fn private_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    require_tool("openssl");
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext file");
    for args in [
        "req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=graphbuild-test-ca",
        "req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost",
        "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile server.ext",
    ] {
        let output = Command::new("openssl")
            .args(args.split(' '))
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            output.status.success(),
            "openssl {args}: {}",
            stderr(&output)
        );
    }
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

/// BuildGrid, started on first use by any test of this binary.
fn buildgrid() -> Option<&'static BuildGrid> {
    static GRID: OnceLock<Option<BuildGrid>> = OnceLock::new();
    GRID.get_or_init(|| start_buildgrid(false)).as_ref()
}

/// A second BuildGrid that requires a JWT on every call, started on first use.
fn buildgrid_with_tokens() -> Option<&'static BuildGrid> {
    static GRID: OnceLock<Option<BuildGrid>> = OnceLock::new();
    GRID.get_or_init(|| start_buildgrid(true)).as_ref()
}

fn run(sandbox: &Sandbox, file: &str, store: &str, output: &str, extra: &[&str]) -> Output {
    let mut args = vec!["run", file, "--output", output, "--progress", "json"];
    args.extend_from_slice(extra);
    sandbox.graphbuild_with_store(&sandbox.path().join(store), &args)
}

fn warnings(output: &Output) -> Vec<String> {
    events(output)
        .into_iter()
        .filter(|event| event["event"] == "warning")
        .map(|event| event["message"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The layer digests (hex) of every manifest of a layout.
fn layer_digests(layout: &Path) -> Vec<String> {
    let read = |digest: &str| -> serde_json::Value {
        let hex = digest.trim_start_matches("sha256:");
        serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap())
            .unwrap()
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let mut layers = Vec::new();
    for top in index["manifests"].as_array().unwrap() {
        let image_index = read(top["digest"].as_str().unwrap());
        // The platforms' manifests: attestation manifests (`unknown/unknown`) hold in-toto
        // statements, not layers.
        let platforms = image_index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|manifest| manifest["platform"]["architecture"] != "unknown");
        for manifest in platforms {
            let manifest = read(manifest["digest"].as_str().unwrap());
            for layer in manifest["layers"].as_array().unwrap() {
                layers.push(
                    layer["digest"]
                        .as_str()
                        .unwrap()
                        .trim_start_matches("sha256:")
                        .to_string(),
                );
            }
        }
    }
    layers.sort();
    layers.dedup();
    layers
}

#[test]
fn three_platforms_through_buildgrid_then_a_clean_client_executes_nothing() {
    let Some(grid) = buildgrid() else { return };
    let sandbox = Sandbox::new();
    sandbox.example("basic");
    let file = "examples/basic/images.kdl";
    let url = grid.url("team");

    let first = run(&sandbox, file, "store-a", "out-a", &["--cache-to", &url]);
    assert_success(&first);
    assert!(warnings(&first).is_empty(), "{:?}", warnings(&first));
    let built = summary(&first);
    assert!(built["executed"].as_u64().unwrap() > 0, "{built}");
    assert_eq!(
        built["images"][0]["platforms"].as_array().unwrap().len(),
        3,
        "{built}"
    );

    // Every layer of the three platforms is a CAS blob, byte for byte, under its OCI digest.
    let layout = sandbox.path().join("out-a/basic");
    let layers = layer_digests(&layout);
    assert!(layers.len() >= 3, "{layers:?}");
    for hex in &layers {
        let stored = grid
            .stored_blob(hex)
            .unwrap_or_else(|| panic!("layer {hex} is not in BuildGrid's CAS"));
        assert_eq!(
            stored,
            std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap(),
            "layer {hex}"
        );
    }

    // A clean machine: everything from the cache, nothing executed, the same index.
    let second = run(&sandbox, file, "store-b", "out-b", &["--cache-from", &url]);
    assert_success(&second);
    assert!(warnings(&second).is_empty(), "{:?}", warnings(&second));
    let fetched = summary(&second);
    assert_eq!(fetched["executed"], 0, "{fetched}");
    let executed_steps: Vec<_> = steps(&second)
        .into_iter()
        .filter(|(_, _, _, status)| status == "executed")
        .collect();
    assert!(executed_steps.is_empty(), "{executed_steps:?}");
    assert_eq!(
        fetched["images"][0]["index_digest"],
        built["images"][0]["index_digest"]
    );
    assert!(
        tree_bytes(&layout) == tree_bytes(&sandbox.path().join("out-b/basic")),
        "the layouts differ"
    );

    // The instance name is sent: one the server does not serve is an error from the server,
    // warned about once, and the build goes on without the cache.
    let elsewhere = run(
        &sandbox,
        file,
        "store-c",
        "out-c",
        &[
            "--platform",
            "linux/amd64",
            "--cache-from",
            &grid.url("nosuch"),
        ],
    );
    assert_success(&elsewhere);
    assert!(summary(&elsewhere)["executed"].as_u64().unwrap() > 0);
    let found = warnings(&elsewhere);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("/nosuch"), "{}", found[0]);
}

#[test]
fn a_layer_over_the_batch_limit_travels_through_bytestream() {
    let Some(grid) = buildgrid() else { return };
    let sandbox = Sandbox::new();
    // 6 MiB that gzip cannot shrink below BuildGrid's 4 MiB batch limit (xorshift bytes).
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let noise: Vec<u8> = (0..6 * 1024 * 1024)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::create_dir_all(sandbox.path().join("big")).unwrap();
    std::fs::write(sandbox.path().join("big/noise.bin"), &noise).unwrap();
    sandbox.write(
        "big/images.kdl",
        "platforms \"linux/amd64\"\nstage big {\n    from \"scratch\"\n    copy \"noise.bin\" \"/noise.bin\"\n}\nimage big { stage big; }\n",
    );
    let url = grid.url("");
    let first = run(
        &sandbox,
        "big/images.kdl",
        "store-a",
        "out-a",
        &["--cache-to", &url],
    );
    assert_success(&first);
    assert!(warnings(&first).is_empty(), "{:?}", warnings(&first));
    let layout = sandbox.path().join("out-a/big");
    let layers = layer_digests(&layout);
    assert_eq!(layers.len(), 1, "{layers:?}");
    let blob = std::fs::read(layout.join("blobs/sha256").join(&layers[0])).unwrap();
    assert!(blob.len() > 4 * 1024 * 1024, "{} bytes", blob.len());
    assert_eq!(grid.stored_blob(&layers[0]).as_ref(), Some(&blob));

    let second = run(
        &sandbox,
        "big/images.kdl",
        "store-b",
        "out-b",
        &["--cache-from", &url],
    );
    assert_success(&second);
    assert_eq!(summary(&second)["executed"], 0, "{}", stdout(&second));
    assert!(warnings(&second).is_empty(), "{:?}", warnings(&second));
    assert_eq!(
        std::fs::read(
            sandbox
                .path()
                .join("out-b/big/blobs/sha256")
                .join(&layers[0])
        )
        .unwrap(),
        blob
    );
}

/// The key of the last `run` step of a one-node plan.
fn run_step_key(sandbox: &Sandbox, file: &str) -> String {
    let plan = sandbox.graphbuild(&["plan", file, "--format", "json"]);
    assert_success(&plan);
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).expect("plan json");
    plan["nodes"][0]["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .rev()
        .find(|step| step["kind"] == "run")
        .expect("a run step")["key"]
        .as_str()
        .expect("key")
        .to_string()
}

#[test]
fn poisoned_entries_are_misses_and_the_build_stays_correct() {
    let Some(grid) = buildgrid() else { return };
    let sandbox = Sandbox::new();
    let file = sandbox.write(
        "poison/images.kdl",
        "platforms \"linux/amd64\"\nstage app {\n    from \"oci:../tests/fixtures/busybox:1.35.0\"\n    run \"echo the real result > /result\"\n}\nimage app { stage app; }\n",
    );
    let file = file.to_str().unwrap().to_string();
    let url = grid.url("");
    let first = run(&sandbox, &file, "store-a", "out-a", &["--cache-to", &url]);
    assert_success(&first);
    let expected = summary(&first)["images"][0]["index_digest"].clone();

    let key = run_step_key(&sandbox, &file);
    let cache = ReapiCache::new(&url, None).expect("client");
    let temp = tempfile::tempdir().unwrap();
    let record = cache
        .get_step_record(&key, temp.path())
        .expect("the cache answers")
        .expect("the step was published");
    let mut forged: serde_json::Value = serde_json::from_slice(&record).unwrap();

    let poisons: Vec<(&str, ActionResult)> = vec![
        (
            // A record naming its layer with the wrong size.
            "a layer of the wrong size",
            {
                let size = forged["layers"][0]["size"].as_u64().unwrap();
                forged["layers"][0]["size"] = (size + 1).into();
                let bytes = serde_json::to_vec(&forged).unwrap();
                let digest = cache.put_blob_bytes(&bytes).unwrap();
                ActionResult::for_step_record(digest, bytes.len() as u64)
            },
        ),
        (
            // An entry naming a step record the CAS does not have.
            "a missing record",
            ActionResult::for_step_record(
                graphbuild_engine::digest::Digest::of(b"never uploaded"),
                14,
            ),
        ),
        (
            // An entry naming a record blob with a size that does not match its content.
            "a record of the wrong size",
            {
                let digest = cache.put_blob_bytes(b"{}").unwrap();
                ActionResult::for_step_record(digest, 3)
            },
        ),
    ];
    for (index, (what, poison)) in poisons.into_iter().enumerate() {
        cache.put_action(&key, &poison).expect("poisoned");
        let store = format!("store-poison-{index}");
        let output_dir = format!("out-poison-{index}");
        let rebuilt = run(
            &sandbox,
            &file,
            &store,
            &output_dir,
            &["--cache-from", &url],
        );
        assert_success(&rebuilt);
        let report = summary(&rebuilt);
        assert_eq!(
            report["images"][0]["index_digest"], expected,
            "{what}: the image is the real one"
        );
        assert!(
            report["executed"].as_u64().unwrap() >= 1,
            "{what}: the poisoned step executes again: {report}"
        );
        let rootfs = unpack_platform(
            &sandbox.path().join(&output_dir).join("app"),
            "latest",
            "linux/amd64",
            &sandbox.path().join(format!("unpacked-{index}")),
        );
        assert_eq!(
            std::fs::read_to_string(rootfs.join("result")).unwrap(),
            "the real result\n",
            "{what}"
        );
    }

    // The real entry again: a clean client hits, so the poisoned runs changed nothing else.
    cache
        .put_action(
            &key,
            &ActionResult::for_step_record(
                graphbuild_engine::digest::Digest::of(&record),
                record.len() as u64,
            ),
        )
        .expect("restored");
    let healed = run(
        &sandbox,
        &file,
        "store-healed",
        "out-healed",
        &["--cache-from", &url],
    );
    assert_success(&healed);
    assert_eq!(summary(&healed)["executed"], 0, "{}", stdout(&healed));
    assert_eq!(summary(&healed)["images"][0]["index_digest"], expected);
}

#[test]
fn a_down_or_silent_reapi_cache_warns_once_fast_and_fails_when_required() {
    // No BuildGrid needed: nothing listens, or a listener never answers.
    let sandbox = Sandbox::new();
    let file = sandbox.write(
        "down/images.kdl",
        "platforms \"linux/amd64\"\nstage app {\n    from \"oci:../tests/fixtures/busybox:1.35.0\"\n    run \"echo down > /down\"\n}\nimage app { stage app; }\n",
    );
    let file = file.to_str().unwrap().to_string();
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = format!("grpc://127.0.0.1:{dead_port}");
    let started = Instant::now();
    let output = run(
        &sandbox,
        &file,
        "store-dead",
        "out-dead",
        &["--cache-from", &dead, "--cache-to", &dead],
    );
    assert_success(&output);
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(30), "{elapsed:?}");
    let found = warnings(&output);
    assert_eq!(found.len(), 1, "one warning: {found:?}");
    assert!(found[0].contains(&dead), "{}", found[0]);

    let started = Instant::now();
    let required = run(
        &sandbox,
        &file,
        "store-required",
        "out-required",
        &["--cache-from", &dead, "--cache-required"],
    );
    assert_eq!(required.status.code(), Some(1), "{}", stderr(&required));
    assert!(stderr(&required).contains(&dead), "{}", stderr(&required));
    assert!(started.elapsed() < Duration::from_secs(30));

    // A server that accepts connections and never says a word: the timeout ends each call.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("grpc://{}", silent.local_addr().unwrap());
    let holder = std::thread::spawn(move || {
        let mut held = Vec::new();
        silent.set_nonblocking(true).unwrap();
        let until = Instant::now() + Duration::from_secs(40);
        while Instant::now() < until {
            if let Ok((stream, _)) = silent.accept() {
                held.push(stream);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let started = Instant::now();
    let output = Command::new(bin())
        .args([
            "run",
            &file,
            "--output",
            "out-silent",
            "--progress",
            "json",
            "--cache-from",
            &silent_url,
        ])
        .current_dir(sandbox.path())
        .env("GRAPHBUILD_CACHE_DIR", sandbox.path().join("store-silent"))
        .env("GRAPHBUILD_CACHE_TIMEOUT", "1")
        .env("NO_COLOR", "1")
        .output()
        .expect("graphbuild runs");
    assert_success(&output);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let found = warnings(&output);
    assert_eq!(found.len(), 1, "one warning: {found:?}");
    assert!(found[0].contains(&silent_url), "{}", found[0]);
    drop(holder);
}

/// `graphbuild run` with extra environment variables.
fn run_with_env(
    sandbox: &Sandbox,
    file: &str,
    store: &str,
    output: &str,
    extra: &[&str],
    env: &[(&str, &Path)],
) -> Output {
    let mut command = Command::new(bin());
    command
        .args(["run", file, "--output", output, "--progress", "json"])
        .args(extra)
        .current_dir(sandbox.path())
        .env("GRAPHBUILD_CACHE_DIR", sandbox.path().join(store))
        .env("NO_COLOR", "1")
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("graphbuild runs")
}

#[test]
fn grpcs_trusts_a_private_ca_named_by_ssl_cert_file_and_refuses_an_unknown_one() {
    let Some(grid) = buildgrid() else { return };
    let sandbox = Sandbox::new();
    let file = sandbox.write(
        "tls/images.kdl",
        "platforms \"linux/amd64\"\nstage app {\n    from \"oci:../tests/fixtures/busybox:1.35.0\"\n    run \"echo over tls > /tls\"\n}\nimage app { stage app; }\n",
    );
    let file = file.to_str().unwrap().to_string();
    let url = format!("grpcs://localhost:{}", grid.tls_port);

    // The CA is unknown to the system and to webpki's roots: the handshake fails, one warning.
    let untrusted = run_with_env(
        &sandbox,
        &file,
        "store-u",
        "out-u",
        &["--cache-to", &url],
        &[],
    );
    assert_success(&untrusted);
    let found = warnings(&untrusted);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains(&url), "{}", found[0]);

    let trust = [("SSL_CERT_FILE", grid.ca.as_path())];
    let first = run_with_env(
        &sandbox,
        &file,
        "store-a",
        "out-a",
        &["--cache-to", &url],
        &trust,
    );
    assert_success(&first);
    assert!(warnings(&first).is_empty(), "{:?}", warnings(&first));
    let second = run_with_env(
        &sandbox,
        &file,
        "store-b",
        "out-b",
        &["--cache-from", &url],
        &trust,
    );
    assert_success(&second);
    assert!(warnings(&second).is_empty(), "{:?}", warnings(&second));
    assert_eq!(summary(&second)["executed"], 0, "{}", stdout(&second));
    assert_eq!(
        summary(&second)["images"][0]["index_digest"],
        summary(&first)["images"][0]["index_digest"]
    );
}

#[test]
fn bad_reapi_urls_are_refused_before_anything_runs() {
    let sandbox = Sandbox::new();
    let file = sandbox.write(
        "urls/images.kdl",
        "platforms \"linux/amd64\"\nstage app {\n    from \"scratch\"\n    env A=\"1\"\n}\nimage app { stage app; }\n",
    );
    let file = file.to_str().unwrap().to_string();
    for (url, expected) in [
        ("grpc://127.0.0.1", "needs a port"),
        ("grpc://127.0.0.1:1/blobs", "instance name"),
        ("grpc://user:hunter2@127.0.0.1:1", "credentials"),
    ] {
        let output = sandbox.graphbuild(&["run", &file, "--cache-from", url]);
        assert_eq!(output.status.code(), Some(2), "{url}: {}", stderr(&output));
        assert!(
            stderr(&output).contains(expected),
            "{url}: {}",
            stderr(&output)
        );
        assert!(!stderr(&output).contains("hunter2"), "{}", stderr(&output));
    }
}

#[test]
fn cache_mounts_travel_through_an_reapi_cache() {
    let Some(grid) = buildgrid() else { return };
    let sandbox = Sandbox::new();
    sandbox.write(
        "mounts/images.kdl",
        r#"platforms "linux/amd64"
arg N="1"
stage app {
    from "oci:../tests/fixtures/busybox:1.35.0"
    run "echo reapi-$N >> /cache/seen && cp /cache/seen /seen" {
        cache-mount "/cache" id="reapi-mount"
    }
}
image app { stage app; }
"#,
    );
    let url = grid.url("team");
    let build = |store: &str, n: &str, flags: &[&str]| {
        let arg = format!("N={n}");
        let mut args = vec!["mounts/images.kdl", "--arg", &arg];
        args.extend_from_slice(flags);
        let output = run(&sandbox, args[0], store, "out", &args[1..]);
        assert_success(&output);
        assert!(warnings(&output).is_empty(), "{:?}", warnings(&output));
        output
    };
    build("machine-a", "1", &["--cache-to", &url]);
    // Another machine, a changed arg so the step runs: it starts from machine A's mount.
    build("machine-b", "2", &["--cache-from", &url]);
    let rootfs = unpack_platform(
        &sandbox.path().join("out/app"),
        "latest",
        "linux/amd64",
        &sandbox.path().join("unpacked"),
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("seen")).unwrap(),
        "reapi-1\nreapi-2\n"
    );
}

#[test]
fn tokens_are_sent_as_bearer_metadata_refusals_are_clear_and_no_token_is_ever_shown() {
    let Some(grid) = buildgrid_with_tokens() else {
        return;
    };
    let token = Command::new(repo_root().join("scripts/buildgrid"))
        .arg("token")
        .arg(grid.data.join("secret.txt"))
        .output()
        .expect("scripts/buildgrid token runs");
    assert!(token.status.success(), "{}", stderr(&token));
    let token = stdout(&token).trim().to_string();
    assert!(token.len() > 20, "{token}");

    let sandbox = Sandbox::new();
    let file = sandbox.write(
        "auth/images.kdl",
        "platforms \"linux/amd64\"\nstage app {\n    from \"oci:../tests/fixtures/busybox:1.35.0\"\n    run \"echo authenticated > /auth\"\n}\nimage app { stage app; }\n",
    );
    let file = file.to_str().unwrap().to_string();
    let url = grid.url("");
    let with_token = |store: &str, output: &str, flags: &[&str], token: Option<&str>| {
        let mut command = Command::new(bin());
        command
            .args(["run", &file, "--output", output, "--progress", "json"])
            .args(flags)
            .current_dir(sandbox.path())
            .env("GRAPHBUILD_CACHE_DIR", sandbox.path().join(store))
            .env("NO_COLOR", "1")
            .env_remove("GRAPHBUILD_CACHE_TOKEN");
        if let Some(token) = token {
            command.env("GRAPHBUILD_CACHE_TOKEN", token);
        }
        command.output().expect("graphbuild runs")
    };
    let never_shown = |output: &Output, secret: &str| {
        assert!(
            !stdout(output).contains(secret) && !stderr(output).contains(secret),
            "the token leaked:\n{}\n{}",
            stdout(output),
            stderr(output)
        );
    };

    // No token, or a wrong one: refused, one warning, the build goes on.
    for (store, bad) in [
        ("store-none", None),
        ("store-bad", Some("not-a-jwt-s3cret")),
    ] {
        let refused = with_token(store, "out-refused", &["--cache-to", &url], bad);
        assert_success(&refused);
        let found = warnings(&refused);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("refused"), "{}", found[0]);
        if let Some(bad) = bad {
            never_shown(&refused, bad);
        }
    }
    // Required: the failure says what to do.
    let required = with_token(
        "store-required",
        "out-required",
        &["--cache-from", &url, "--cache-required"],
        None,
    );
    assert_eq!(required.status.code(), Some(1), "{}", stderr(&required));
    assert!(
        stderr(&required).contains("refused"),
        "{}",
        stderr(&required)
    );

    // The right token: uploads, and a clean client with it executes nothing.
    let first = with_token("store-a", "out-a", &["--cache-to", &url], Some(&token));
    assert_success(&first);
    assert!(warnings(&first).is_empty(), "{:?}", warnings(&first));
    never_shown(&first, &token);
    let second = with_token("store-b", "out-b", &["--cache-from", &url], Some(&token));
    assert_success(&second);
    never_shown(&second, &token);
    assert_eq!(summary(&second)["executed"], 0, "{}", stdout(&second));
    assert_eq!(
        summary(&second)["images"][0]["index_digest"],
        summary(&first)["images"][0]["index_digest"]
    );
}

#[test]
fn a_blob_corrupted_in_the_server_is_refused_and_the_step_runs_again() {
    let Some(grid) = buildgrid() else { return };
    let sandbox = Sandbox::new();
    let file = sandbox.write(
        "corrupt/images.kdl",
        "platforms \"linux/amd64\"\nstage app {\n    from \"oci:../tests/fixtures/busybox:1.35.0\"\n    run \"echo stored then corrupted > /corrupt\"\n}\nimage app { stage app; }\n",
    );
    let file = file.to_str().unwrap().to_string();
    let url = grid.url("");
    let first = run(&sandbox, &file, "store-a", "out-a", &["--cache-to", &url]);
    assert_success(&first);
    let expected = summary(&first)["images"][0]["index_digest"].clone();

    // The run step's layer: the one layer not in the busybox base. Flip its bytes on the
    // server's disk, keeping the size.
    let base = layer_digests(&sandbox.path().join("tests/fixtures/busybox"));
    let made: Vec<String> = layer_digests(&sandbox.path().join("out-a/app"))
        .into_iter()
        .filter(|hex| !base.contains(hex))
        .collect();
    assert_eq!(made.len(), 1, "{made:?}");
    let stored = grid
        .data
        .join("cas/cas/objects")
        .join(&made[0][..2])
        .join(&made[0][2..]);
    let bytes = std::fs::read(&stored).expect("the layer is in BuildGrid's CAS");
    let flipped: Vec<u8> = bytes.iter().map(|byte| !byte).collect();
    std::fs::write(&stored, &flipped).unwrap();

    let second = run(&sandbox, &file, "store-b", "out-b", &["--cache-from", &url]);
    assert_success(&second);
    let found = warnings(&second);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("wrong content"), "{}", found[0]);
    assert!(summary(&second)["executed"].as_u64().unwrap() >= 1);
    assert_eq!(summary(&second)["images"][0]["index_digest"], expected);
    // Nothing of the corrupt download was kept: the local store has the real layer.
    let local = std::fs::read(sandbox.path().join("store-b/blobs/sha256").join(&made[0]))
        .expect("the rebuilt layer");
    assert_eq!(local, bytes);
    std::fs::write(&stored, &bytes).unwrap();
}
