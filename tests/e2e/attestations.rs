//! Attestations end to end: SLSA provenance and SPDX SBOMs in the image index as BuildKit
//! stores them, read back with skopeo, the index and manifests validated against the OCI
//! image-spec's JSON schemas, the provenance against the SLSA v1 schema
//! (`tests/fixtures/schemas/`, validated with Python's `jsonschema`), the SBOM by the SPDX
//! project's own validator (`pyspdxtools` from `spdx-tools`).
//!
//! The Python tools live in a virtual environment made once (per test binary, reused across
//! runs) under `$XDG_CACHE_HOME/graphbuild-tests/` (or `~/.cache/…`), with pinned versions from
//! PyPI. A missing Python, pip or PyPI fails the tests, naming what is missing.
//!
//! The image scanned is the busybox fixture plus package databases and binaries the test
//! writes: a dpkg status entry, an os-release, a Python `METADATA`, an npm lockfile, and two
//! real ELF files (copies of the host's `true`) given a `.go.buildinfo` section (Go's build
//! information format) and a `.dep-v0` section (cargo-auditable's) with `objcopy`.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::*;

const SPDX_TOOLS: &str = "spdx-tools==0.8.5";
const JSONSCHEMA: &str = "jsonschema==4.26.0";
const PLATFORMS: [&str; 2] = ["linux/amd64", "linux/arm64"];

/// The Python interpreter of the test venv, made on first use.
fn venv_python() -> &'static Path {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
            .expect("HOME or XDG_CACHE_HOME is set");
        let dir = cache
            .join("graphbuild-tests")
            .join(format!("venv-{SPDX_TOOLS}-{JSONSCHEMA}").replace("==", "-"));
        let python = dir.join("bin/python");
        let done = dir.join(".installed");
        if done.exists() && python.exists() {
            return python;
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.parent().expect("parent")).expect("mkdir cache");
        let base = base_python();
        let status = Command::new(&base)
            .args(["-m", "venv"])
            .arg(&dir)
            .status()
            .expect("python runs");
        assert!(
            status.success(),
            "{} -m venv {} failed",
            base.display(),
            dir.display()
        );
        let output = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args([SPDX_TOOLS, JSONSCHEMA])
            .output()
            .expect("pip runs");
        assert!(
            output.status.success(),
            "pip install {SPDX_TOOLS} {JSONSCHEMA} failed (PyPI is needed once):\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::fs::write(&done, b"").expect("marker");
        python
    })
}

/// A Python 3.9 or later: pyenv's 3.13 when present, else `python3` on PATH.
fn base_python() -> PathBuf {
    let pyenv = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".pyenv")));
    if let Some(root) = pyenv
        && let Ok(entries) = std::fs::read_dir(root.join("versions"))
    {
        let mut versions: Vec<PathBuf> = entries
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| {
                path.file_name()
                    .and_then(|name| name.to_str())
                    .is_some_and(|name| name.starts_with("3.13"))
            })
            .collect();
        versions.sort();
        if let Some(version) = versions.pop() {
            return version.join("bin/python3");
        }
    }
    require_tool("python3");
    PathBuf::from("python3")
}

/// Validate `document` against a schema of `tests/fixtures/schemas/`; the errors when invalid.
fn schema_errors(schema: &str, document: &serde_json::Value, scratch: &Path) -> Option<String> {
    let schemas = repo_root().join("tests/fixtures/schemas");
    let file = scratch.join(format!(
        "doc-{}.json",
        sha256_hex(document.to_string().as_bytes())
    ));
    std::fs::write(&file, document.to_string()).expect("write");
    let output = Command::new(venv_python())
        .arg(schemas.join("validate.py"))
        .arg(schemas.join(schema))
        .arg(&file)
        .output()
        .expect("python runs");
    match output.status.code() {
        Some(0) => None,
        Some(1) => Some(String::from_utf8_lossy(&output.stderr).into_owned()),
        _ => panic!(
            "the validator failed to run: {}",
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

#[track_caller]
fn assert_valid(schema: &str, document: &serde_json::Value, scratch: &Path) {
    if let Some(errors) = schema_errors(schema, document, scratch) {
        panic!("not valid against {schema}:\n{errors}\n{document:#}");
    }
}

/// `pyspdxtools -i FILE`: `Ok` when the SPDX project's validator accepts the document.
fn spdx_validate(document: &serde_json::Value, scratch: &Path) -> Result<(), String> {
    let file = scratch.join(format!(
        "sbom-{}.spdx.json",
        sha256_hex(document.to_string().as_bytes())
    ));
    std::fs::write(&file, serde_json::to_vec_pretty(document).expect("json")).expect("write");
    let pyspdxtools = venv_python().with_file_name("pyspdxtools");
    let output = Command::new(pyspdxtools)
        .arg("-i")
        .arg(&file)
        .output()
        .expect("pyspdxtools runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() && !text.contains("validation error") && !text.contains("Traceback")
    {
        Ok(())
    } else {
        Err(text)
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// An ELF file (the host's `true`) with an extra section.
fn elf_with_section(sandbox: &Sandbox, name: &str, section: &str, content: &[u8]) -> PathBuf {
    require_tool("objcopy");
    let data = sandbox.path().join(format!("{name}.section"));
    std::fs::write(&data, content).expect("write");
    let out = sandbox.path().join("project").join(name);
    std::fs::create_dir_all(out.parent().expect("parent")).expect("mkdir");
    let status = Command::new("objcopy")
        .arg("--add-section")
        .arg(format!("{section}={}", data.display()))
        .arg("/bin/true")
        .arg(&out)
        .status()
        .expect("objcopy runs");
    assert!(status.success(), "objcopy --add-section {section}");
    out
}

/// Go's build information (Go 1.18+ layout: inline strings), for a module with one dependency.
fn go_buildinfo() -> Vec<u8> {
    fn varint(mut n: usize, out: &mut Vec<u8>) {
        while n >= 0x80 {
            out.push((n as u8) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    }
    let mut info = b"\xff Go buildinf:".to_vec();
    info.push(8); // pointer size
    info.push(2); // flags: inline strings, little endian
    info.resize(32, 0);
    let version = b"go1.22.1";
    varint(version.len(), &mut info);
    info.extend_from_slice(version);
    let mut modinfo = hex::decode("3077af0c9274080241e1c107e6d618e6").expect("hex");
    modinfo.extend_from_slice(
        b"path\texample.com/app\nmod\texample.com/app\t(devel)\t\ndep\tgolang.org/x/text\tv0.14.0\th1:ScX5w1eTa3QqT8oi6+ziP7dTV1S2+ALU0bI+0zXKWiQ=\n",
    );
    modinfo.extend_from_slice(&hex::decode("f932433186182072008242104116d8f2").expect("hex"));
    varint(modinfo.len(), &mut info);
    info.extend_from_slice(&modinfo);
    info
}

/// cargo-auditable's dependency list, zlib-compressed.
fn cargo_auditable() -> Vec<u8> {
    let json = br#"{"packages":[{"name":"app","version":"0.1.0","source":"local","dependencies":[1],"root":true},{"name":"serde","version":"1.0.190","source":"crates.io"},{"name":"cc","version":"1.0.83","source":"crates.io","kind":"build"}]}"#;
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(json).expect("compress");
    encoder.finish().expect("compress")
}

/// A two-platform image of copies only (no qemu needed) with something for every scanner.
fn sbom_project(sandbox: &Sandbox) {
    sandbox.write(
        "project/status",
        "Package: fakepkg\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1.2.3-1\nDescription: a package the test made\n multi-line\n\nPackage: removed\nStatus: deinstall ok config-files\nVersion: 9\n",
    );
    sandbox.write("project/os-release", "ID=debian\nVERSION_ID=\"12\"\n");
    sandbox.write(
        "project/METADATA",
        "Metadata-Version: 2.1\nName: Requests\nVersion: 2.31.0\n\nbody\n",
    );
    sandbox.write(
        "project/package-lock.json",
        r#"{"name":"app","lockfileVersion":3,"packages":{"":{"name":"app","version":"1.0.0"},"node_modules/left-pad":{"version":"1.3.0"}}}"#,
    );
    elf_with_section(sandbox, "gobin", ".go.buildinfo", &go_buildinfo());
    elf_with_section(sandbox, "rustbin", ".dep-v0", &cargo_auditable());
    sandbox.write(
        "project/images.kdl",
        r#"platforms "linux/amd64" "linux/arm64"
arg BASE="oci:../tests/fixtures/busybox:1.35.0"
arg GREETING="hello"

stage runtime {
    from "$BASE"
    copy "status" "/var/lib/dpkg/status"
    copy "os-release" "/etc/os-release"
    copy "METADATA" "/usr/lib/python3/dist-packages/requests-2.31.0.dist-info/METADATA"
    copy "package-lock.json" "/app/package-lock.json"
    copy "gobin" "rustbin" "/usr/local/bin/" chmod="0755"
    env GREETING="$GREETING"
}

image sbom {
    stage runtime
    tags "localhost/sbom:1"
}
"#,
    );
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .expect("JSON")
}

fn blob(layout: &Path, digest: &str) -> serde_json::Value {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    let bytes = std::fs::read(layout.join("blobs/sha256").join(hex)).expect("blob");
    assert_eq!(sha256_hex(&bytes), hex, "blob {digest} has its digest");
    serde_json::from_slice(&bytes).expect("JSON blob")
}

/// The image index of a layout (what `index.json`'s first entry points at).
fn image_index(layout: &Path) -> (String, serde_json::Value) {
    let top = read_json(&layout.join("index.json"));
    let digest = top["manifests"][0]["digest"]
        .as_str()
        .expect("digest")
        .to_string();
    let index = blob(layout, &digest);
    (digest, index)
}

fn entries(index: &serde_json::Value) -> &Vec<serde_json::Value> {
    index["manifests"].as_array().expect("manifests")
}

/// The busybox fixture's manifest digest for each platform.
fn fixture_digests() -> Vec<(String, String)> {
    let layout = repo_root().join("tests/fixtures/busybox");
    let (_, outer) = image_index(&layout);
    let mut found = Vec::new();
    let mut pending = vec![outer];
    while let Some(index) = pending.pop() {
        for entry in entries(&index) {
            let digest = entry["digest"].as_str().expect("digest").to_string();
            if entry["mediaType"]
                .as_str()
                .is_some_and(|m| m.contains("index"))
            {
                pending.push(blob(&layout, &digest));
            } else {
                let platform = &entry["platform"];
                found.push((
                    format!(
                        "{}/{}",
                        platform["os"].as_str().unwrap_or_default(),
                        platform["architecture"].as_str().unwrap_or_default()
                    ),
                    digest,
                ));
            }
        }
    }
    found
}

fn build(sandbox: &Sandbox, store: &str, output: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "run",
        "project/images.kdl",
        "--output",
        output,
        "--progress",
        "json",
    ];
    args.extend_from_slice(extra);
    sandbox.graphbuild_with_store(&sandbox.path().join(store), &args)
}

#[test]
fn attestations_are_stored_as_buildkit_does_and_pass_the_oci_slsa_and_spdx_validators() {
    let sandbox = Sandbox::new();
    sbom_project(&sandbox);
    let scratch = sandbox.path().join("scratch");
    std::fs::create_dir_all(&scratch).expect("mkdir");
    let output = build(
        &sandbox,
        "store",
        "out",
        &[
            "--sbom",
            "--arg",
            "GREETING=bonjour",
            "--secret",
            "id=token,env=HOME",
        ],
    );
    assert_success(&output);
    let layout = sandbox.path().join("out/sbom");
    let (index_digest, index) = image_index(&layout);

    // Read back by an independent tool: the same index.
    let raw = skopeo_raw(&format!("oci:{}:1", layout.display()));
    assert_eq!(raw, index, "skopeo reads the index the layout holds");
    assert_valid("oci/image-index-schema.json", &index, &scratch);

    // Two platform manifests, then one attestation manifest each, in the same order.
    let entries = entries(&index);
    assert_eq!(entries.len(), 4, "{index:#}");
    let fixture = fixture_digests();
    for (position, platform) in PLATFORMS.iter().enumerate() {
        let image = &entries[position];
        let attestation = &entries[position + 2];
        let image_digest = image["digest"].as_str().expect("digest");
        assert_eq!(
            format!(
                "{}/{}",
                image["platform"]["os"].as_str().unwrap(),
                image["platform"]["architecture"].as_str().unwrap()
            ),
            *platform
        );
        assert_eq!(attestation["platform"]["os"], "unknown", "{attestation}");
        assert_eq!(attestation["platform"]["architecture"], "unknown");
        assert_eq!(
            attestation["annotations"]["vnd.docker.reference.type"],
            "attestation-manifest"
        );
        assert_eq!(
            attestation["annotations"]["vnd.docker.reference.digest"],
            image_digest
        );
        assert_eq!(
            attestation["mediaType"],
            "application/vnd.oci.image.manifest.v1+json"
        );

        let manifest = blob(&layout, attestation["digest"].as_str().unwrap());
        assert_valid("oci/image-manifest-schema.json", &manifest, &scratch);
        assert_valid(
            "oci/image-manifest-schema.json",
            &blob(&layout, image_digest),
            &scratch,
        );
        assert_eq!(
            manifest["artifactType"],
            "application/vnd.docker.attestation.manifest.v1+json"
        );
        assert_eq!(
            manifest["config"]["mediaType"],
            "application/vnd.oci.empty.v1+json"
        );
        assert_eq!(manifest["subject"]["digest"], image_digest);
        assert_eq!(manifest["subject"]["size"], image["size"]);
        let layers = manifest["layers"].as_array().expect("layers");
        let predicate_types: Vec<&str> = layers
            .iter()
            .map(|layer| {
                layer["annotations"]["in-toto.io/predicate-type"]
                    .as_str()
                    .unwrap()
            })
            .collect();
        assert_eq!(
            predicate_types,
            [
                "https://slsa.dev/provenance/v1",
                "https://spdx.dev/Document"
            ]
        );
        for layer in layers {
            assert_eq!(layer["mediaType"], "application/vnd.in-toto+json");
            let statement = blob(&layout, layer["digest"].as_str().unwrap());
            assert_eq!(statement["_type"], "https://in-toto.io/Statement/v1");
            assert_eq!(
                statement["predicateType"],
                layer["annotations"]["in-toto.io/predicate-type"]
            );
            let subjects = statement["subject"].as_array().expect("subjects");
            assert_eq!(subjects.len(), 1);
            assert_eq!(
                format!(
                    "sha256:{}",
                    subjects[0]["digest"]["sha256"].as_str().unwrap()
                ),
                image_digest,
                "the statement is about the platform manifest"
            );
            assert_eq!(
                subjects[0]["name"],
                format!(
                    "pkg:docker/localhost/sbom@1?platform={}",
                    platform.replace('/', "%2F")
                )
            );
        }

        // Provenance: valid SLSA v1, with what was asked and what was resolved.
        let provenance = blob(&layout, layers[0]["digest"].as_str().unwrap());
        assert_valid("slsa-provenance-v1.schema.json", &provenance, &scratch);
        let predicate = &provenance["predicate"];
        let definition = &predicate["buildDefinition"];
        let request = &definition["externalParameters"]["request"];
        assert_eq!(request["args"]["GREETING"], "bonjour");
        assert_eq!(request["platform"], *platform);
        assert_eq!(request["secrets"][0]["id"], "token");
        let home = std::env::var("HOME").unwrap_or_default();
        assert!(
            home.len() < 2 || !provenance.to_string().contains(&home),
            "the secret's value is recorded"
        );
        let config_source = &definition["externalParameters"]["configSource"];
        assert_eq!(config_source["uri"], "images.kdl");
        assert_eq!(
            config_source["digest"]["sha256"],
            sha256_hex(&std::fs::read(sandbox.path().join("project/images.kdl")).unwrap())
        );
        let base = fixture
            .iter()
            .find(|(p, _)| p == platform)
            .map(|(_, digest)| digest.strip_prefix("sha256:").unwrap().to_string())
            .expect("fixture platform");
        let dependencies = definition["resolvedDependencies"].as_array().expect("deps");
        assert!(
            dependencies
                .iter()
                .any(|d| d["digest"]["sha256"] == base.as_str()
                    && d["uri"] == "oci:../tests/fixtures/busybox:1.35.0"),
            "{platform}: the base's digest is recorded: {dependencies:#?}"
        );
        assert!(dependencies.iter().any(|d| d["uri"] == "context"));
        let graph = definition["internalParameters"]["graph"]
            .as_array()
            .expect("graph");
        assert!(!graph.is_empty());
        for node in graph {
            assert_eq!(node["platform"], *platform);
            let steps = node["steps"].as_array().expect("steps");
            assert!(!steps.is_empty());
            for key in steps {
                assert!(key.as_str().is_some_and(|k| k.len() == 64), "{key}");
            }
        }
        assert!(
            !provenance
                .to_string()
                .contains(sandbox.path().to_str().unwrap()),
            "no path of this machine"
        );

        // SBOM: SPDX 2.3 accepted by the SPDX project's validator, listing every package.
        let sbom = blob(&layout, layers[1]["digest"].as_str().unwrap());
        let document = &sbom["predicate"];
        spdx_validate(document, &scratch).unwrap_or_else(|e| panic!("{platform}: {e}"));
        let purls: Vec<&str> = document["packages"]
            .as_array()
            .expect("packages")
            .iter()
            .filter_map(|package| package["externalRefs"][0]["referenceLocator"].as_str())
            .collect();
        assert_eq!(
            purls,
            [
                "pkg:cargo/app@0.1.0",
                "pkg:cargo/serde@1.0.190",
                "pkg:deb/debian/fakepkg@1.2.3-1?arch=amd64&distro=debian-12",
                "pkg:golang/example.com/app@(devel)",
                "pkg:golang/golang.org/x/text@v0.14.0",
                "pkg:golang/stdlib@1.22.1",
                "pkg:npm/left-pad@1.3.0",
                "pkg:pypi/requests@2.31.0",
            ],
            "{platform}"
        );
        assert_eq!(document["creationInfo"]["created"], "1970-01-01T00:00:00Z");
    }

    // The validators are real: a broken document is refused by each.
    let mut broken = blob(
        &layout,
        blob(&layout, entries[2]["digest"].as_str().unwrap())["layers"][1]["digest"]
            .as_str()
            .unwrap(),
    )["predicate"]
        .clone();
    broken["packages"][1]["SPDXID"] = serde_json::json!("not an id");
    assert!(
        spdx_validate(&broken, &scratch).is_err(),
        "pyspdxtools accepts anything"
    );
    let mut bad_index = index.clone();
    // (`size` is checked through the schema's reference to defs-descriptor.json.)
    bad_index["manifests"][0]["size"] = serde_json::json!("big");
    assert!(schema_errors("oci/image-index-schema.json", &bad_index, &scratch).is_some());
    assert!(
        schema_errors(
            "slsa-provenance-v1.schema.json",
            &serde_json::json!({"_type": "https://in-toto.io/Statement/v1", "subject": [], "predicateType": "https://slsa.dev/provenance/v1", "predicate": {}}),
            &scratch
        )
        .is_some()
    );

    // The summary names the attestation manifests; the SBOMs were scanned.
    let summary = summary(&output);
    assert_eq!(summary["images"][0]["index_digest"], index_digest);
    for (position, platform) in summary["images"][0]["platforms"]
        .as_array()
        .expect("platforms")
        .iter()
        .enumerate()
    {
        assert_eq!(
            platform["attestation_digest"],
            entries[position + 2]["digest"]
        );
        assert_eq!(platform["sbom"], "scanned");
    }
}

#[test]
fn provenance_is_reproducible_follows_args_and_leaves_image_manifests_alone() {
    let sandbox = Sandbox::new();
    sbom_project(&sandbox);
    let index_of = |output: &str| image_index(&sandbox.path().join(output).join("sbom"));

    // Two clean stores: the same index, bit for bit; a warm run too, recomputing no SBOM.
    let first = build(&sandbox, "store-a", "out-a", &["--sbom"]);
    assert_success(&first);
    let second = build(&sandbox, "store-b", "out-b", &["--sbom"]);
    assert_success(&second);
    let (digest_a, index_a) = index_of("out-a");
    let (digest_b, _) = index_of("out-b");
    assert_eq!(digest_a, digest_b, "two clean builds give the same index");
    let warm = build(&sandbox, "store-b", "out-warm", &["--sbom"]);
    assert_success(&warm);
    assert_eq!(index_of("out-warm").0, digest_a);
    assert_eq!(summary(&warm)["executed"], 0);
    for platform in summary(&warm)["images"][0]["platforms"].as_array().unwrap() {
        assert_eq!(
            platform["sbom"], "local cache",
            "a warm run reads the SBOM it recorded"
        );
    }

    // Without attestations: the same platform manifests, only the index differs.
    let plain = build(&sandbox, "store-b", "out-plain", &["--provenance=false"]);
    assert_success(&plain);
    let (plain_digest, plain_index) = index_of("out-plain");
    assert_ne!(plain_digest, digest_a);
    assert_eq!(entries(&plain_index).len(), 2);
    assert_eq!(entries(&plain_index)[..], entries(&index_a)[..2]);

    // Provenance alone (the default): one statement per attestation manifest.
    let default = build(&sandbox, "store-b", "out-default", &[]);
    assert_success(&default);
    let (_, default_index) = index_of("out-default");
    assert_eq!(entries(&default_index)[..2], entries(&index_a)[..2]);
    let layout = sandbox.path().join("out-default/sbom");
    let manifest = blob(
        &layout,
        entries(&default_index)[2]["digest"].as_str().unwrap(),
    );
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 1);

    // An arg given on the command line is recorded as the request's, even at its default
    // value: a new provenance, the same image manifests.
    let other = build(
        &sandbox,
        "store-b",
        "out-other",
        &["--arg", "BASE=oci:../tests/fixtures/busybox:1.35.0"],
    );
    assert_success(&other);
    let (_, other_index) = index_of("out-other");
    assert_eq!(entries(&other_index)[..2], entries(&default_index)[..2]);
    assert_ne!(
        entries(&other_index)[2]["digest"],
        entries(&default_index)[2]["digest"],
        "the args are in the provenance"
    );

    // mode=max adds each step's description and location, and stays reproducible.
    let max = build(&sandbox, "store-b", "out-max", &["--provenance=mode=max"]);
    assert_success(&max);
    let max_again = build(
        &sandbox,
        "store-a",
        "out-max-again",
        &["--provenance=mode=max"],
    );
    assert_success(&max_again);
    assert_eq!(index_of("out-max").0, index_of("out-max-again").0);
    let layout = sandbox.path().join("out-max/sbom");
    let (_, max_index) = index_of("out-max");
    let manifest = blob(&layout, entries(&max_index)[2]["digest"].as_str().unwrap());
    let statement = blob(&layout, manifest["layers"][0]["digest"].as_str().unwrap());
    let internal = &statement["predicate"]["buildDefinition"]["internalParameters"];
    assert_eq!(internal["provenanceMode"], "max");
    let step = &internal["graph"][0]["steps"][0];
    assert!(
        step["location"]
            .as_str()
            .is_some_and(|l| l.starts_with("project/images.kdl:")),
        "{step}"
    );
    assert!(step["description"].is_string());
    assert!(
        internal["sources"][0]["text"]
            .as_str()
            .is_some_and(|t| t.contains("stage runtime"))
    );

    // Docker's format: the older attestation manifest, an unknown/unknown image config.
    let docker = build(&sandbox, "store-b", "out-docker", &["--format", "docker"]);
    assert_success(&docker);
    let layout = sandbox.path().join("out-docker/sbom");
    let (_, docker_index) = index_of("out-docker");
    let entry = &entries(&docker_index)[2];
    assert_eq!(
        entry["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(
        entry["annotations"]["vnd.docker.reference.type"],
        "attestation-manifest"
    );
    let manifest = blob(&layout, entry["digest"].as_str().unwrap());
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.docker.container.image.v1+json"
    );
    let config = blob(&layout, manifest["config"]["digest"].as_str().unwrap());
    assert_eq!(config["architecture"], "unknown");
    assert_eq!(config["os"], "unknown");
    assert_eq!(
        config["rootfs"]["diff_ids"][0],
        manifest["layers"][0]["digest"]
    );

    // buildx's spellings; anything else is refused by name.
    for (value, ok) in [
        ("--provenance=true", true),
        ("--provenance=1", true),
        ("--provenance=mode=min", true),
        ("--provenance=mode=huge", false),
        ("--sbom=maybe", false),
    ] {
        let output = build(&sandbox, "store-b", "out-flags", &[value]);
        if ok {
            assert_success(&output);
        } else {
            assert_eq!(
                output.status.code(),
                Some(2),
                "{value}: {}",
                stderr(&output)
            );
            let flag = value.split('=').next().unwrap();
            assert!(stderr(&output).contains(flag), "{}", stderr(&output));
        }
    }
}

#[test]
fn local_and_tar_outputs_leave_attestations_out_and_the_oci_archive_keeps_them() {
    let sandbox = Sandbox::new();
    sbom_project(&sandbox);
    let output = build(
        &sandbox,
        "store",
        "out",
        &[
            "--sbom",
            "--platform",
            "linux/amd64",
            "--output",
            "type=local,dest=rootfs",
            "--output",
            "type=oci,dest=image.tar",
        ],
    );
    assert_success(&output);
    // The filesystem only: no directory for unknown/unknown, the files the build copied.
    assert!(sandbox.path().join("rootfs/usr/local/bin/gobin").is_file());
    assert!(!sandbox.path().join("rootfs/unknown_unknown").exists());
    // The archive holds the attestation manifest and its statements: skopeo reads them.
    let raw = skopeo_raw(&format!(
        "oci-archive:{}",
        sandbox.path().join("image.tar").display()
    ));
    let entries = entries(&raw);
    assert_eq!(entries.len(), 2, "{raw:#}");
    assert_eq!(
        entries[1]["annotations"]["vnd.docker.reference.type"],
        "attestation-manifest"
    );
    let extracted = sandbox.path().join("extracted");
    std::fs::create_dir_all(&extracted).unwrap();
    let status = Command::new("tar")
        .arg("-xf")
        .arg(sandbox.path().join("image.tar"))
        .arg("-C")
        .arg(&extracted)
        .status()
        .expect("tar runs");
    assert!(status.success());
    let manifest = blob(&extracted, entries[1]["digest"].as_str().unwrap());
    for layer in manifest["layers"].as_array().unwrap() {
        blob(&extracted, layer["digest"].as_str().unwrap());
    }
}
