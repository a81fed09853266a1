//! OCI layouts: reading the busybox fixture (nested index, platform selection, configs),
//! lossless types, and writing layouts that skopeo and umoci read.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use graphbuild_engine::digest::Digest;
use graphbuild_engine::layer::{Compression, LayerOptions, write_layer_from_upper};
use graphbuild_engine::oci::{
    BlobSource, ContainerConfig, Descriptor, Healthcheck, History, ImageConfigFile, ImageIndex,
    ImageManifest, OciError, OciLayout, OciPlatform, REF_NAME_ANNOTATION, RootFs, canonical_json,
    media, write_layout,
};
use graphbuild_lang::platform::Platform;

mod common;
use common::{prerequisite, require_root};

const NESTED_INDEX: &str =
    "sha256:d4c00c7b6456a7ba455a2a26521cc97eba8c841bc9e0c0553d8159928c55ec88";
const AMD64_MANIFEST: &str =
    "sha256:b76cc888e353f5a257a3cd535a353801a587e3ce6a68cbc670449bc7fe1e19c5";
const ARM64_MANIFEST: &str =
    "sha256:dc221cc4fb516291132fb7adf48550d47f74f8cb6b28bb29953949b36140f452";
const ARM_V7_MANIFEST: &str =
    "sha256:47995745427359ee523b8fd8abf698ad11e880be3a7fcdcedc17e92ab7b971e8";

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/busybox")
}

fn copy_tree(from: &Path, to: &Path) {
    for entry in walkdir::WalkDir::new(from) {
        let entry = entry.unwrap();
        let target = to.join(entry.path().strip_prefix(from).unwrap());
        if entry.file_type().is_dir() {
            fs::create_dir_all(&target).unwrap();
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A writable copy of the read-only fixture.
fn busybox_copy() -> (tempfile::TempDir, PathBuf) {
    let temporary = tempfile::tempdir().unwrap();
    let copy = temporary.path().join("busybox");
    copy_tree(&fixture(), &copy);
    (temporary, copy)
}

fn platform(text: &str) -> Platform {
    Platform::parse(text).unwrap()
}

fn tool(name: &str) -> bool {
    let found = Command::new(name)
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    prerequisite(found, format_args!("`{name}` is not installed"))
}

#[test]
fn the_fixture_resolves_and_selects_each_platform() {
    let (_temporary, dir) = busybox_copy();
    let layout = OciLayout::open(&dir).unwrap();
    assert_eq!(layout.tags(), vec!["1.35.0".to_string()]);
    let top = layout.resolve(Some("1.35.0")).unwrap();
    assert_eq!(top.digest.to_string(), NESTED_INDEX);
    assert_eq!(top.media_type, media::OCI_INDEX);
    assert_eq!(layout.resolve(None).unwrap(), top);

    for (requested, manifest_digest, architecture, variant) in [
        ("linux/amd64", AMD64_MANIFEST, "amd64", None),
        ("linux/arm64", ARM64_MANIFEST, "arm64", None),
        ("linux/arm64/v8", ARM64_MANIFEST, "arm64", None),
        ("linux/arm/v7", ARM_V7_MANIFEST, "arm", Some("v7")),
        ("linux/arm", ARM_V7_MANIFEST, "arm", Some("v7")),
        // An armv8 32-bit CPU runs v7 code: the exact variant is missing, v7 is next best.
        ("linux/arm/v8", ARM_V7_MANIFEST, "arm", Some("v7")),
    ] {
        let (manifest, descriptor) = layout.select_platform(&top, &platform(requested)).unwrap();
        assert_eq!(
            descriptor.digest.to_string(),
            manifest_digest,
            "{requested}"
        );
        assert_eq!(manifest.layers.len(), 1);
        assert_eq!(manifest.layers[0].media_type, media::OCI_LAYER_GZIP);
        let config = layout.read_config(&manifest).unwrap();
        assert_eq!(config.architecture, architecture, "{requested}");
        assert_eq!(config.variant.as_deref(), variant, "{requested}");
        assert_eq!(config.os, "linux");
        assert_eq!(config.config.cmd, vec!["sh".to_string()]);
        assert_eq!(
            config.config.env,
            vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()]
        );
        assert_eq!(config.created.as_deref(), Some("1970-01-01T00:00:00Z"));
        assert_eq!(config.rootfs.kind, "layers");
        assert_eq!(config.rootfs.diff_ids.len(), 1);
        assert_eq!(config.history.len(), 6);
        assert!(config.history[0].empty_layer);
        // The layer blob is there and is what the manifest says.
        let layer = layout.read_blob(&manifest.layers[0].digest).unwrap();
        assert_eq!(layer.len() as u64, manifest.layers[0].size);
    }
}

#[test]
fn a_missing_platform_lists_the_available_ones() {
    let (_temporary, dir) = busybox_copy();
    let layout = OciLayout::open(&dir).unwrap();
    let top = layout.resolve(Some("1.35.0")).unwrap();
    for requested in [
        "linux/arm/v6",
        "linux/arm/v5",
        "linux/s390x",
        "windows/amd64",
        "linux/386",
    ] {
        let error = layout
            .select_platform(&top, &platform(requested))
            .unwrap_err();
        let OciError::NoMatchingPlatform { available, .. } = &error else {
            panic!("{requested}: {error:?}");
        };
        let names: Vec<String> = available.iter().map(ToString::to_string).collect();
        assert_eq!(
            names,
            vec!["linux/amd64", "linux/arm/v7", "linux/arm64"],
            "{requested}"
        );
        let help = miette::Diagnostic::help(&error).unwrap().to_string();
        assert!(
            help.contains("linux/amd64, linux/arm/v7, linux/arm64"),
            "{help}"
        );
        assert!(error.to_string().contains(requested), "{error}");
    }
    // Not an error: amd64/v3 machines run amd64 (v1) images.
    let (_, descriptor) = layout
        .select_platform(&top, &platform("linux/amd64/v3"))
        .unwrap();
    assert_eq!(descriptor.digest.to_string(), AMD64_MANIFEST);
}

#[test]
fn unknown_tags_and_non_layouts_are_explained() {
    let (temporary, dir) = busybox_copy();
    let layout = OciLayout::open(&dir).unwrap();
    let error = layout.resolve(Some("latest")).unwrap_err();
    assert!(matches!(error, OciError::TagNotFound { .. }), "{error:?}");
    let help = miette::Diagnostic::help(&error).unwrap().to_string();
    assert!(help.contains("1.35.0"), "{help}");

    let error = OciLayout::open(temporary.path()).unwrap_err();
    assert!(matches!(error, OciError::NotALayout { .. }), "{error:?}");
}

#[test]
fn a_corrupted_blob_is_detected() {
    let (_temporary, dir) = busybox_copy();
    let layout = OciLayout::open(&dir).unwrap();
    let digest: Digest = ARM64_MANIFEST.parse().unwrap();
    let mut bytes = fs::read(layout.blob_path(&digest)).unwrap();
    bytes[10] ^= 1;
    fs::write(layout.blob_path(&digest), bytes).unwrap();
    let error = layout.read_blob(&digest).unwrap_err();
    assert!(
        matches!(error, OciError::DigestMismatch { .. }),
        "{error:?}"
    );
    let top = layout.resolve(Some("1.35.0")).unwrap();
    assert!(
        layout
            .select_platform(&top, &platform("linux/arm64"))
            .is_err()
    );
    // The other platforms are unaffected.
    assert!(
        layout
            .select_platform(&top, &platform("linux/amd64"))
            .is_ok()
    );
}

/// Every JSON document of the fixture parses into our types and prints back the same content:
/// canonical JSON of the typed value equals canonical JSON of the raw document, so nothing is
/// lost or invented.
#[test]
fn the_fixture_documents_round_trip_through_the_types() {
    let dir = fixture();
    fn same<T: serde::Serialize + serde::de::DeserializeOwned>(bytes: &[u8], what: &str) {
        let typed: T = serde_json::from_slice(bytes).unwrap();
        let raw: serde_json::Value = serde_json::from_slice(bytes).unwrap();
        assert_eq!(
            String::from_utf8(canonical_json(&typed)).unwrap(),
            String::from_utf8(canonical_json(&raw)).unwrap(),
            "{what}"
        );
        // Where the document already was canonical, the bytes are identical.
        if canonical_json(&raw) == bytes {
            assert_eq!(canonical_json(&typed), bytes, "{what}");
        }
    }
    same::<ImageIndex>(&fs::read(dir.join("index.json")).unwrap(), "index.json");
    let mut seen = BTreeMap::new();
    for entry in fs::read_dir(dir.join("blobs/sha256")).unwrap() {
        let path = entry.unwrap().path();
        let bytes = fs::read(&path).unwrap();
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            continue; // a layer
        };
        let what = path.file_name().unwrap().to_string_lossy().into_owned();
        match value
            .get("mediaType")
            .and_then(|media_type| media_type.as_str())
        {
            Some(media::OCI_INDEX) => same::<ImageIndex>(&bytes, &what),
            Some(media::OCI_MANIFEST) => same::<ImageManifest>(&bytes, &what),
            _ => same::<ImageConfigFile>(&bytes, &what),
        }
        *seen
            .entry(
                value
                    .get("mediaType")
                    .and_then(|m| m.as_str())
                    .unwrap_or("config")
                    .to_string(),
            )
            .or_insert(0) += 1;
    }
    assert_eq!(seen.get(media::OCI_INDEX), Some(&1));
    assert_eq!(seen.get(media::OCI_MANIFEST), Some(&3));
    assert_eq!(seen.get("config"), Some(&3));
}

#[test]
fn canonical_json_sorts_keys_at_every_level_and_skips_empty_fields() {
    let config = ImageConfigFile {
        created: Some("1970-01-01T00:00:00Z".to_string()),
        architecture: "arm".to_string(),
        os: "linux".to_string(),
        variant: Some("v7".to_string()),
        config: ContainerConfig {
            user: Some("65532".to_string()),
            exposed_ports: ["8080/tcp".to_string(), "53/udp".to_string()].into(),
            env: vec!["B=2".to_string(), "A=1".to_string()],
            cmd: vec!["serve".to_string()],
            labels: [
                ("z".to_string(), "last".to_string()),
                ("a".to_string(), "first".to_string()),
            ]
            .into(),
            healthcheck: Some(Healthcheck {
                test: vec!["CMD".to_string(), "true".to_string()],
                interval: 30_000_000_000,
                retries: 3,
                ..Healthcheck::default()
            }),
            ..ContainerConfig::default()
        },
        rootfs: RootFs::default(),
        history: vec![History {
            created_by: Some("run".to_string()),
            empty_layer: true,
            ..History::default()
        }],
    };
    let text = String::from_utf8(canonical_json(&config)).unwrap();
    assert_eq!(
        text,
        concat!(
            r#"{"architecture":"arm","config":{"Cmd":["serve"],"Env":["B=2","A=1"],"ExposedPorts":{"53/udp":{},"8080/tcp":{}},"#,
            r#""Healthcheck":{"Interval":30000000000,"Retries":3,"Test":["CMD","true"]},"Labels":{"a":"first","z":"last"},"User":"65532"},"#,
            r#""created":"1970-01-01T00:00:00Z","history":[{"created_by":"run","empty_layer":true}],"os":"linux","#,
            r#""rootfs":{"diff_ids":[],"type":"layers"},"variant":"v7"}"#
        )
    );
    let back: ImageConfigFile = serde_json::from_str(&text).unwrap();
    assert_eq!(back, config);
    // Docker writes `null` for empty sets; that reads as empty.
    let docker: ContainerConfig =
        serde_json::from_str(r#"{"ExposedPorts":null,"Volumes":{"/data":{}}}"#).unwrap();
    assert!(docker.exposed_ports.is_empty());
    assert_eq!(docker.volumes.iter().collect::<Vec<_>>(), vec!["/data"]);
}

/// The layout's index.json, retagged: `tag` → the fixture's nested index.
fn fixture_blobs(dir: &Path) -> Vec<(Digest, BlobSource)> {
    fs::read_dir(dir.join("blobs/sha256"))
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            let digest = Digest::from_hex(&path.file_name().unwrap().to_string_lossy()).unwrap();
            (digest, BlobSource::Path(path))
        })
        .collect()
}

fn tagged(descriptor: &Descriptor, tag: &str) -> Descriptor {
    let mut descriptor = descriptor.clone();
    descriptor.annotations = [(REF_NAME_ANNOTATION.to_string(), tag.to_string())].into();
    descriptor
}

#[test]
fn written_layouts_are_read_by_us_skopeo_and_umoci() {
    let (temporary, source) = busybox_copy();
    let top = OciLayout::open(&source)
        .unwrap()
        .resolve(Some("1.35.0"))
        .unwrap();
    let out = temporary.path().join("out/busybox");
    let index = ImageIndex::new(vec![tagged(&top, "copied")]);
    write_layout(&out, &index, fixture_blobs(&source)).unwrap();

    assert_eq!(
        fs::read(out.join("oci-layout")).unwrap(),
        br#"{"imageLayoutVersion":"1.0.0"}"#
    );
    assert_eq!(
        fs::read(out.join("index.json")).unwrap(),
        canonical_json(&index)
    );
    let layout = OciLayout::open(&out).unwrap();
    let (_, descriptor) = layout
        .select_platform(
            &layout.resolve(Some("copied")).unwrap(),
            &platform("linux/arm64"),
        )
        .unwrap();
    assert_eq!(descriptor.digest.to_string(), ARM64_MANIFEST);
    // No temporary directory is left next to the output.
    let siblings: Vec<_> = fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(siblings, vec![std::ffi::OsString::from("busybox")]);

    if tool("skopeo") {
        let output = Command::new("skopeo")
            .args(["inspect", "--raw"])
            .arg(format!("oci:{}:copied", out.display()))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(Digest::of(&output.stdout).to_string(), NESTED_INDEX);
        let output = Command::new("skopeo")
            .args([
                "--override-arch",
                "arm",
                "--override-variant",
                "v7",
                "inspect",
            ])
            .arg(format!("oci:{}:copied", out.display()))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let inspected: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(inspected["Architecture"], "arm");
    }
    if tool("umoci") {
        let output = Command::new("umoci")
            .args(["ls", "--layout"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "copied");
    }
}

#[test]
fn writing_replaces_a_layout_atomically_and_refuses_other_directories() {
    let (temporary, source) = busybox_copy();
    let top = OciLayout::open(&source)
        .unwrap()
        .resolve(Some("1.35.0"))
        .unwrap();
    let out = temporary.path().join("out");
    write_layout(
        &out,
        &ImageIndex::new(vec![tagged(&top, "one")]),
        fixture_blobs(&source),
    )
    .unwrap();
    write_layout(
        &out,
        &ImageIndex::new(vec![tagged(&top, "two")]),
        fixture_blobs(&source),
    )
    .unwrap();
    assert_eq!(
        OciLayout::open(&out).unwrap().tags(),
        vec!["two".to_string()]
    );

    // A layout missing a blob is never put in place; the previous one stays whole.
    let mut incomplete = fixture_blobs(&source);
    incomplete.retain(|(digest, _)| digest.to_string() != ARM64_MANIFEST);
    let error = write_layout(
        &out,
        &ImageIndex::new(vec![tagged(&top, "three")]),
        incomplete,
    )
    .unwrap_err();
    assert!(matches!(error, OciError::MissingBlob { .. }), "{error:?}");
    assert_eq!(
        OciLayout::open(&out).unwrap().tags(),
        vec!["two".to_string()]
    );

    // A blob whose bytes do not match its digest is refused.
    let wrong = vec![(
        Digest::of(b"something"),
        BlobSource::Bytes(b"something else".to_vec()),
    )];
    let error = write_layout(&out, &ImageIndex::new(Vec::new()), wrong).unwrap_err();
    assert!(
        matches!(error, OciError::DigestMismatch { .. }),
        "{error:?}"
    );
    assert_eq!(
        OciLayout::open(&out).unwrap().tags(),
        vec!["two".to_string()]
    );

    let siblings: Vec<_> = fs::read_dir(temporary.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        siblings.iter().all(|name| !name.contains("graphbuild-tmp")),
        "{siblings:?}"
    );

    // Someone's directory that is not a layout is left alone.
    let documents = temporary.path().join("documents");
    fs::create_dir_all(&documents).unwrap();
    fs::write(documents.join("thesis.txt"), b"precious").unwrap();
    let error = write_layout(&documents, &ImageIndex::new(Vec::new()), Vec::new()).unwrap_err();
    assert!(
        matches!(error, OciError::OutputNotALayout { .. }),
        "{error:?}"
    );
    assert_eq!(fs::read(documents.join("thesis.txt")).unwrap(), b"precious");
}

/// A two-layer image built entirely by graphbuild's code (layers from upper directories, config,
/// manifest, index), unpacked by umoci: the second layer's whiteout and opaque directory must
/// delete what they should.
#[test]
fn umoci_unpacks_images_made_of_our_layers() {
    if !require_root("whiteouts") {
        return;
    }
    if !tool("umoci") {
        return;
    }
    for compression in [Compression::Gzip, Compression::Zstd] {
        let temporary = tempfile::tempdir().unwrap();
        let work = temporary.path();
        let first = work.join("upper1");
        fs::create_dir_all(first.join("etc/conf.d")).unwrap();
        fs::write(first.join("etc/conf.d/old"), b"old").unwrap();
        fs::write(first.join("etc/motd"), b"hello\n").unwrap();
        fs::write(first.join("remove-me"), b"bye").unwrap();
        let second = work.join("upper2");
        fs::create_dir_all(second.join("etc/conf.d")).unwrap();
        fs::write(second.join("etc/conf.d/new"), b"new").unwrap();
        nix::sys::stat::mknod(
            &second.join("remove-me"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            nix::sys::stat::makedev(0, 0),
        )
        .unwrap();
        let path_c =
            std::ffi::CString::new(second.join("etc/conf.d").as_os_str().as_encoded_bytes())
                .unwrap();
        // SAFETY: valid NUL-terminated strings and buffer.
        let set = unsafe {
            libc::lsetxattr(
                path_c.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                b"y".as_ptr().cast(),
                1,
                0,
            )
        };
        assert_eq!(set, 0);

        let options = LayerOptions {
            source_date_epoch: 0,
            compression,
        };
        let blobs_dir = work.join("blobs");
        let layers: Vec<_> = [&first, &second]
            .iter()
            .map(|upper| {
                write_layer_from_upper(upper, &blobs_dir, &options)
                    .unwrap()
                    .unwrap()
            })
            .collect();
        let config = ImageConfigFile {
            created: Some("1970-01-01T00:00:00Z".to_string()),
            architecture: "amd64".to_string(),
            os: "linux".to_string(),
            config: ContainerConfig {
                cmd: vec!["/bin/true".to_string()],
                ..ContainerConfig::default()
            },
            rootfs: RootFs {
                diff_ids: layers.iter().map(|layer| layer.diff_id).collect(),
                ..RootFs::default()
            },
            ..ImageConfigFile::default()
        };
        let config_bytes = canonical_json(&config);
        let manifest = ImageManifest::new(
            Descriptor::of_bytes(media::OCI_CONFIG, &config_bytes),
            layers
                .iter()
                .map(|layer| Descriptor::new(layer.media_type, layer.digest, layer.size))
                .collect(),
        );
        let manifest_bytes = canonical_json(&manifest);
        let mut manifest_descriptor = Descriptor::of_bytes(media::OCI_MANIFEST, &manifest_bytes);
        manifest_descriptor.platform = Some(OciPlatform::new("linux", "amd64", None));
        let image_index = ImageIndex::new(vec![manifest_descriptor]);
        let image_index_bytes = canonical_json(&image_index);
        let top = tagged(
            &Descriptor::of_bytes(media::OCI_INDEX, &image_index_bytes),
            "test",
        );
        let mut blobs: Vec<(Digest, BlobSource)> = layers
            .iter()
            .map(|layer| (layer.digest, BlobSource::Path(layer.path.clone())))
            .collect();
        for bytes in [config_bytes, manifest_bytes, image_index_bytes] {
            blobs.push((Digest::of(&bytes), BlobSource::Bytes(bytes)));
        }
        let out = work.join("image");
        write_layout(&out, &ImageIndex::new(vec![top]), blobs).unwrap();

        // umoci 0.4.7 does not read zstd layers: have skopeo (containers/image, another zstd
        // implementation) recompress them first, which also proves it can decode ours.
        let image = if compression == Compression::Zstd {
            if !tool("skopeo") {
                continue;
            }
            let converted = work.join("converted");
            let output = Command::new("skopeo")
                .args(["copy", "--dest-compress-format", "gzip"])
                .arg(format!("oci:{}:test", out.display()))
                .arg(format!("oci:{}:test", converted.display()))
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            converted
        } else {
            out
        };
        let bundle = work.join("bundle");
        let output = Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:test", image.display()))
            .arg(&bundle)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{compression:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let rootfs = bundle.join("rootfs");
        assert_eq!(fs::read(rootfs.join("etc/motd")).unwrap(), b"hello\n");
        assert_eq!(fs::read(rootfs.join("etc/conf.d/new")).unwrap(), b"new");
        assert!(
            !rootfs.join("etc/conf.d/old").exists(),
            "opaque directory hides the lower layer"
        );
        assert!(!rootfs.join("remove-me").exists(), "whiteout deletes");
    }
}

#[test]
fn concurrent_writers_leave_one_complete_layout() {
    let (temporary, source) = busybox_copy();
    let top = OciLayout::open(&source)
        .unwrap()
        .resolve(Some("1.35.0"))
        .unwrap();
    let out = temporary.path().join("out");
    std::thread::scope(|scope| {
        for writer in 0..4 {
            let (out, top, source) = (&out, &top, &source);
            scope.spawn(move || {
                for round in 0..3 {
                    let tag = format!("w{writer}r{round}");
                    write_layout(
                        out,
                        &ImageIndex::new(vec![tagged(top, &tag)]),
                        fixture_blobs(source),
                    )
                    .unwrap();
                }
            });
        }
    });
    let layout = OciLayout::open(&out).unwrap();
    assert_eq!(layout.tags().len(), 1);
    let top = layout.resolve(None).unwrap();
    for requested in ["linux/amd64", "linux/arm64", "linux/arm/v7"] {
        let (manifest, _) = layout.select_platform(&top, &platform(requested)).unwrap();
        layout.read_blob(&manifest.layers[0].digest).unwrap();
    }
    let siblings: Vec<_> = fs::read_dir(temporary.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        siblings.iter().all(|name| !name.contains("graphbuild-tmp")),
        "{siblings:?}"
    );
}
