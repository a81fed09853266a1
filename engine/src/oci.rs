//! OCI image types, canonical JSON, and reading and writing OCI image layouts.
//!
//! Long because it is a format (about 1,140 lines of code): every type of the image spec and
//! the layout reader and writer that must agree on their bytes stay together.
//!
//! # Types
//!
//! The serde types here follow the OCI image spec (and Docker's image config, which the OCI
//! config extends): field names are the wire names (`mediaType`, `schemaVersion`, the
//! capitalized Docker config keys `Env`, `Cmd`, `Healthcheck`…), and empty or absent values are
//! left out when serializing, as Docker does, so that an image graphbuild writes looks like one
//! Docker writes.
//!
//! # Canonical JSON
//!
//! Every manifest, index and config graphbuild writes goes through [`canonical_json`]: compact
//! JSON with the keys of every object sorted by bytes. All maps in these types are `BTreeMap`s,
//! and the writer sorts object keys itself (it does not rely on serde_json's `preserve_order`
//! feature being off), so the same value always prints the same bytes and therefore has the
//! same digest on every machine. (`oci-spec` keeps maps in `HashMap`s, which is why it is not
//! used here.)
//!
//! # Reading a layout
//!
//! [`OciLayout::open`] checks the `oci-layout` marker and reads `index.json`;
//! [`OciLayout::resolve`] finds a tag through the `org.opencontainers.image.ref.name`
//! annotation; [`OciLayout::select_platform`] follows nested image indexes (many real layouts,
//! including the busybox test fixture, have `index.json` → image index → manifests) and picks
//! the manifest for a platform with containerd's rules: the operating system and architecture
//! must be equal; `arm64` without a variant is `arm64/v8`; for `arm`, the exact variant is
//! preferred, then the lower variants a CPU of that variant also runs (v7 → v6 → v5); for
//! `amd64`, the microarchitecture levels below the requested one (v3 → v2 → v1). Every blob read
//! is checked against its sha256 digest.
//!
//! # Writing a layout
//!
//! [`write_layout`] builds the complete layout in a sibling temporary directory and only then
//! puts it in place (an atomic `renameat2(RENAME_EXCHANGE)` when a layout already exists, a
//! plain rename otherwise), so a failed or killed run leaves either the old layout or the new
//! one, never half of one. It refuses to replace a non-empty directory that is not an OCI
//! layout, and it checks that every blob the index reaches is present before putting the
//! layout in place.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::digest::{Digest, DigestWriter};

/// Media types graphbuild reads and writes.
pub mod media {
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    pub const DOCKER_MANIFEST_LIST: &str =
        "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

    /// An image index or a Docker manifest list.
    pub fn is_index(media_type: &str) -> bool {
        media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
    }

    /// An OCI image manifest or a Docker schema 2 manifest.
    pub fn is_manifest(media_type: &str) -> bool {
        media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST
    }
}

/// The annotation that names a tag in an OCI layout's `index.json`.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// The content of the `oci-layout` file.
pub const OCI_LAYOUT_FILE_CONTENT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// How deep nested image indexes may go before a layout is considered broken (or cyclic).
const MAX_INDEX_DEPTH: usize = 8;

// ---------------------------------------------------------------------------------------------
// Canonical JSON
// ---------------------------------------------------------------------------------------------

/// Compact JSON with the keys of every object sorted by bytes: the same value always gives the
/// same bytes, hence the same digest.
///
/// # Panics
///
/// Only if `value`'s `Serialize` implementation itself fails (for example a map with non-string
/// keys). The types of this module never do.
pub fn canonical_json<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    #[expect(
        clippy::expect_used,
        reason = "serializing to a JSON value fails only for maps with non-string keys, which this module's types do not have"
    )]
    let value = serde_json::to_value(value).expect("value serializes to JSON");
    let mut out = Vec::with_capacity(512);
    write_canonical(&value, &mut out);
    out
}

fn write_canonical(value: &serde_json::Value, out: &mut Vec<u8>) {
    match value {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
            entries.sort_by(|(a, _), (b, _)| a.as_bytes().cmp(b.as_bytes()));
            out.push(b'{');
            for (position, (key, item)) in entries.into_iter().enumerate() {
                if position > 0 {
                    out.push(b',');
                }
                write_canonical(&serde_json::Value::String(key.clone()), out);
                out.push(b':');
                write_canonical(item, out);
            }
            out.push(b'}');
        }
        serde_json::Value::Array(items) => {
            out.push(b'[');
            for (position, item) in items.iter().enumerate() {
                if position > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => {
            // Strings, numbers, booleans and null have exactly one compact form in serde_json;
            // writing into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, scalar);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Types
// ---------------------------------------------------------------------------------------------

fn is_false(value: &bool) -> bool {
    !*value
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

/// A reference to a blob: what it is, its digest and size, and for manifests in an index the
/// platform it is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<OciPlatform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    /// A descriptor without platform or annotations.
    pub fn new(media_type: impl Into<String>, digest: Digest, size: u64) -> Descriptor {
        Descriptor {
            media_type: media_type.into(),
            digest,
            size,
            platform: None,
            annotations: BTreeMap::new(),
        }
    }

    /// The descriptor of `bytes` (its sha256 and length).
    pub fn of_bytes(media_type: impl Into<String>, bytes: &[u8]) -> Descriptor {
        Descriptor::new(media_type, Digest::of(bytes), bytes.len() as u64)
    }

    /// Whether this index entry is not a runnable image: an attestation manifest (annotated
    /// `vnd.docker.reference.type`) or anything else listed for `unknown/unknown`.
    pub fn is_attestation(&self) -> bool {
        self.annotations
            .contains_key(crate::attest::REFERENCE_TYPE_ANNOTATION)
            || self
                .platform
                .as_ref()
                .is_some_and(|platform| platform.os == "unknown")
    }

    /// The tag this descriptor carries in an OCI layout's `index.json`, if any.
    pub fn ref_name(&self) -> Option<&str> {
        self.annotations
            .get(REF_NAME_ANNOTATION)
            .map(String::as_str)
    }
}

/// A platform as it appears in an image index (`os`, `architecture`, `variant`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OciPlatform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl OciPlatform {
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> OciPlatform {
        OciPlatform {
            architecture: architecture.to_string(),
            os: os.to_string(),
            variant: variant.map(str::to_string),
        }
    }
}

impl fmt::Display for OciPlatform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

impl From<&graphbuild_lang::platform::Platform> for OciPlatform {
    fn from(platform: &graphbuild_lang::platform::Platform) -> OciPlatform {
        OciPlatform {
            architecture: platform.architecture.clone(),
            os: platform.os.clone(),
            variant: platform.variant.clone(),
        }
    }
}

/// An image index (a manifest list): one manifest per platform, or the top-level `index.json`
/// of a layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl ImageIndex {
    /// An OCI image index (`schemaVersion` 2, `mediaType` set) over `manifests`.
    pub fn new(manifests: Vec<Descriptor>) -> ImageIndex {
        ImageIndex {
            schema_version: 2,
            media_type: Some(media::OCI_INDEX.to_string()),
            manifests,
            annotations: BTreeMap::new(),
        }
    }
}

/// An image manifest: a config and an ordered list of layers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl ImageManifest {
    /// An OCI image manifest (`schemaVersion` 2, `mediaType` set).
    pub fn new(config: Descriptor, layers: Vec<Descriptor>) -> ImageManifest {
        ImageManifest {
            schema_version: 2,
            media_type: Some(media::OCI_MANIFEST.to_string()),
            config,
            layers,
            annotations: BTreeMap::new(),
        }
    }
}

/// The image config file (`application/vnd.oci.image.config.v1+json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfigFile {
    /// RFC 3339, e.g. `1970-01-01T00:00:00Z`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(default, skip_serializing_if = "ContainerConfig::is_empty")]
    pub config: ContainerConfig,
    pub rootfs: RootFs,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<History>,
}

impl ImageConfigFile {
    pub fn platform(&self) -> OciPlatform {
        OciPlatform {
            architecture: self.architecture.clone(),
            os: self.os.clone(),
            variant: self.variant.clone(),
        }
    }
}

/// The runtime configuration of an image, with Docker's key names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerConfig {
    #[serde(rename = "User", default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `80/tcp`, `53/udp`…; serialized as Docker does, an object of empty objects.
    #[serde(
        rename = "ExposedPorts",
        default,
        skip_serializing_if = "BTreeSet::is_empty",
        with = "set_as_object"
    )]
    pub exposed_ports: BTreeSet<String>,
    #[serde(rename = "Env", default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(rename = "Entrypoint", default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    #[serde(rename = "Cmd", default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    /// Serialized as an object of empty objects, like `ExposedPorts`.
    #[serde(
        rename = "Volumes",
        default,
        skip_serializing_if = "BTreeSet::is_empty",
        with = "set_as_object"
    )]
    pub volumes: BTreeSet<String>,
    #[serde(
        rename = "WorkingDir",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub working_dir: Option<String>,
    #[serde(rename = "Labels", default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(
        rename = "StopSignal",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub stop_signal: Option<String>,
    #[serde(
        rename = "Healthcheck",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub healthcheck: Option<Healthcheck>,
    /// Docker's `Shell` (set by `SHELL`, inherited by images built on this one): the shell of
    /// shell-form RUN, CMD and ENTRYPOINT; absent means `["/bin/sh", "-c"]`.
    #[serde(rename = "Shell", default, skip_serializing_if = "Vec::is_empty")]
    pub shell: Vec<String>,
}

impl ContainerConfig {
    pub fn is_empty(&self) -> bool {
        self == &ContainerConfig::default()
    }
}

/// Docker's healthcheck (not part of the OCI spec; Docker, Podman and BuildKit read it).
/// Durations are nanoseconds; zero means "inherit the default" and is left out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Healthcheck {
    /// `["NONE"]`, `["CMD", args…]` or `["CMD-SHELL", command]`.
    #[serde(rename = "Test", default, skip_serializing_if = "Vec::is_empty")]
    pub test: Vec<String>,
    #[serde(rename = "Interval", default, skip_serializing_if = "is_zero")]
    pub interval: u64,
    #[serde(rename = "Timeout", default, skip_serializing_if = "is_zero")]
    pub timeout: u64,
    #[serde(rename = "StartPeriod", default, skip_serializing_if = "is_zero")]
    pub start_period: u64,
    #[serde(rename = "Retries", default, skip_serializing_if = "is_zero")]
    pub retries: u64,
}

/// The layers of an image's root filesystem, by uncompressed digest (diff_id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    /// Always `layers`.
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<Digest>,
}

impl Default for RootFs {
    fn default() -> RootFs {
        RootFs {
            kind: "layers".to_string(),
            diff_ids: Vec::new(),
        }
    }
}

/// One step of an image's history.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// The step produced no layer (metadata only).
    #[serde(default, skip_serializing_if = "is_false")]
    pub empty_layer: bool,
}

/// `{"80/tcp":{}, …}` ⇄ a set of keys.
mod set_as_object {
    use std::collections::{BTreeMap, BTreeSet};

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct Empty {}

    pub(super) fn serialize<S: Serializer>(
        set: &BTreeSet<String>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let map: BTreeMap<&String, Empty> = set.iter().map(|key| (key, Empty {})).collect();
        map.serialize(serializer)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<BTreeSet<String>, D::Error> {
        // Docker writes `null` for an empty set.
        let map: Option<BTreeMap<String, serde::de::IgnoredAny>> =
            Option::deserialize(deserializer)?;
        Ok(map.map(|map| map.into_keys().collect()).unwrap_or_default())
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Errors reading or writing an OCI image layout.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum OciError {
    #[error("`{}` is not an OCI image layout: {reason}", dir.display())]
    #[diagnostic(
        code(graphbuild::oci::not_a_layout),
        help(
            "an OCI image layout is a directory with an `oci-layout` file, `index.json` and `blobs/`; make one with `skopeo copy docker://IMAGE oci:DIR:TAG`"
        )
    )]
    NotALayout { dir: PathBuf, reason: String },

    #[error("OCI layout `{}` has version `{version}`, graphbuild reads version 1.0.0", dir.display())]
    #[diagnostic(code(graphbuild::oci::layout_version))]
    UnsupportedLayoutVersion { dir: PathBuf, version: String },

    #[error("cannot {action} `{}`", path.display())]
    #[diagnostic(code(graphbuild::oci::io))]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("`{}` is not a valid {what}: {source}", path.display())]
    #[diagnostic(
        code(graphbuild::oci::invalid_json),
        help(
            "the layout is corrupt or was written by a tool that does not follow the OCI image spec"
        )
    )]
    InvalidJson {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("no tag `{tag}` in OCI layout `{}`", dir.display())]
    #[diagnostic(code(graphbuild::oci::tag_not_found), help("{}", tags_help(available)))]
    TagNotFound {
        tag: String,
        dir: PathBuf,
        available: Vec<String>,
    },

    #[error("OCI layout `{}` holds {count} images, say which one with `oci:PATH:TAG`", dir.display())]
    #[diagnostic(code(graphbuild::oci::ambiguous), help("{}", tags_help(available)))]
    AmbiguousTag {
        dir: PathBuf,
        count: usize,
        available: Vec<String>,
    },

    #[error("OCI layout `{}` holds no image", dir.display())]
    #[diagnostic(code(graphbuild::oci::empty))]
    EmptyLayout { dir: PathBuf },

    #[error("blob {digest} is missing from OCI layout `{}`", dir.display())]
    #[diagnostic(
        code(graphbuild::oci::missing_blob),
        help("the layout is incomplete; copy the image again, e.g. with `skopeo copy --all`")
    )]
    MissingBlob { digest: Digest, dir: PathBuf },

    #[error("blob `{}` has digest {actual}, expected {expected}", path.display())]
    #[diagnostic(
        code(graphbuild::oci::digest_mismatch),
        help("the blob is corrupt or was modified after it was written; copy the image again")
    )]
    DigestMismatch {
        path: PathBuf,
        expected: Digest,
        actual: Digest,
    },

    #[error("blob {digest} is {actual} bytes, its descriptor says {expected}")]
    #[diagnostic(
        code(graphbuild::oci::size_mismatch),
        help("the layout is corrupt; copy the image again")
    )]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        actual: u64,
    },

    #[error("blob {digest} has media type `{media_type}`, expected {expected}")]
    #[diagnostic(code(graphbuild::oci::media_type))]
    UnexpectedMediaType {
        digest: Digest,
        media_type: String,
        expected: &'static str,
    },

    #[error("image indexes nested more than {MAX_INDEX_DEPTH} deep at {digest}")]
    #[diagnostic(
        code(graphbuild::oci::nesting),
        help("the layout is corrupt or has an index that refers to itself")
    )]
    NestingTooDeep { digest: Digest },

    #[error("no image for platform {requested} in `{source_name}`")]
    #[diagnostic(
        code(graphbuild::oci::no_platform),
        help("{}", platforms_help(available))
    )]
    NoMatchingPlatform {
        requested: OciPlatform,
        source_name: String,
        available: Vec<OciPlatform>,
    },

    #[error("refusing to replace `{}`: it exists and is not an OCI image layout", dir.display())]
    #[diagnostic(
        code(graphbuild::oci::output_exists),
        help("choose another output directory, or remove this one if it is not needed")
    )]
    OutputNotALayout { dir: PathBuf },
}

fn tags_help(available: &[String]) -> String {
    if available.is_empty() {
        "the layout has no tagged image (no `org.opencontainers.image.ref.name` annotation)"
            .to_string()
    } else {
        format!("tags in this layout: {}", available.join(", "))
    }
}

fn platforms_help(available: &[OciPlatform]) -> String {
    if available.is_empty() {
        "the image lists no platform at all".to_string()
    } else {
        let names: Vec<String> = available.iter().map(ToString::to_string).collect();
        format!("platforms available: {}", names.join(", "))
    }
}

fn io_error<'path>(
    action: &'static str,
    path: &'path Path,
) -> impl FnOnce(io::Error) -> OciError + 'path {
    move |source| OciError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

// ---------------------------------------------------------------------------------------------
// Platform matching
// ---------------------------------------------------------------------------------------------

/// Normalizes a platform the way containerd's `platforms.Normalize` does (and
/// `graphbuild_lang::platform::Platform::parse`): `aarch64` → `arm64`, `arm64/v8` → `arm64`,
/// `arm` → `arm/v7`, `x86_64` → `amd64`, `amd64/v1` → `amd64`…
pub fn normalize_platform(platform: &OciPlatform) -> OciPlatform {
    let os = match platform.os.to_ascii_lowercase().as_str() {
        "macos" => "darwin".to_string(),
        other => other.to_string(),
    };
    let variant = platform
        .variant
        .as_ref()
        .map(|variant| variant.to_ascii_lowercase());
    let (architecture, variant) = graphbuild_lang::platform::normalize_architecture(
        &platform.architecture.to_ascii_lowercase(),
        variant.as_deref(),
    );
    OciPlatform {
        architecture,
        os,
        variant,
    }
}

/// How well an image for `candidate` serves a request for `requested`: `Some(0)` for an exact
/// match, `Some(n)` for the n-th fallback (a lower arm or amd64 variant), `None` when the image
/// cannot run there. Both sides are normalized first.
pub fn platform_preference(requested: &OciPlatform, candidate: &OciPlatform) -> Option<usize> {
    let requested = normalize_platform(requested);
    let candidate = normalize_platform(candidate);
    if requested.os != candidate.os || requested.architecture != candidate.architecture {
        return None;
    }
    if requested.variant == candidate.variant {
        return Some(0);
    }
    let level = |variant: &Option<String>, implicit: u32| -> Option<u32> {
        match variant {
            None => Some(implicit),
            Some(text) => text.strip_prefix('v')?.parse().ok(),
        }
    };
    let (implicit, lowest) = match requested.architecture.as_str() {
        "arm" => (7, 5),
        "amd64" => (1, 1),
        _ => return None,
    };
    let wanted = level(&requested.variant, implicit)?;
    let offered = level(&candidate.variant, implicit)?;
    if offered < wanted && offered >= lowest {
        Some((wanted - offered) as usize)
    } else {
        None
    }
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

/// An OCI image layout directory opened for reading.
#[derive(Debug, Clone)]
pub struct OciLayout {
    root: PathBuf,
    index: ImageIndex,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayoutMarker {
    image_layout_version: String,
}

impl OciLayout {
    /// Opens `dir`: checks the `oci-layout` marker (version 1.0.0) and reads `index.json`.
    pub fn open(dir: &Path) -> Result<OciLayout, OciError> {
        let marker_path = dir.join("oci-layout");
        let marker_bytes = match fs::read(&marker_path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                let reason = if dir.is_dir() {
                    "it has no `oci-layout` file".to_string()
                } else {
                    "no such directory".to_string()
                };
                return Err(OciError::NotALayout {
                    dir: dir.to_path_buf(),
                    reason,
                });
            }
            Err(source) => return Err(io_error("read", &marker_path)(source)),
        };
        let marker: LayoutMarker =
            serde_json::from_slice(&marker_bytes).map_err(|source| OciError::InvalidJson {
                what: "`oci-layout` file",
                path: marker_path.clone(),
                source,
            })?;
        if marker.image_layout_version != "1.0.0" {
            return Err(OciError::UnsupportedLayoutVersion {
                dir: dir.to_path_buf(),
                version: marker.image_layout_version,
            });
        }
        let index_path = dir.join("index.json");
        let index_bytes = fs::read(&index_path).map_err(io_error("read", &index_path))?;
        let index: ImageIndex =
            serde_json::from_slice(&index_bytes).map_err(|source| OciError::InvalidJson {
                what: "image index",
                path: index_path.clone(),
                source,
            })?;
        Ok(OciLayout {
            root: dir.to_path_buf(),
            index,
        })
    }

    /// The layout's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The content of `index.json`.
    pub fn index(&self) -> &ImageIndex {
        &self.index
    }

    /// The tags (`org.opencontainers.image.ref.name`) in `index.json`, in its order.
    pub fn tags(&self) -> Vec<String> {
        self.index
            .manifests
            .iter()
            .filter_map(|descriptor| descriptor.ref_name().map(str::to_string))
            .collect()
    }

    /// The `index.json` entry for `tag`; with no tag, the layout's only entry.
    pub fn resolve(&self, tag: Option<&str>) -> Result<Descriptor, OciError> {
        match tag {
            Some(tag) => self
                .index
                .manifests
                .iter()
                .find(|descriptor| descriptor.ref_name() == Some(tag))
                .cloned()
                .ok_or_else(|| OciError::TagNotFound {
                    tag: tag.to_string(),
                    dir: self.root.clone(),
                    available: self.tags(),
                }),
            None => match self.index.manifests.as_slice() {
                [] => Err(OciError::EmptyLayout {
                    dir: self.root.clone(),
                }),
                [only] => Ok(only.clone()),
                many => Err(OciError::AmbiguousTag {
                    dir: self.root.clone(),
                    count: many.len(),
                    available: self.tags(),
                }),
            },
        }
    }

    /// Where the blob with `digest` lives (whether or not it exists).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs").join("sha256").join(digest.hex())
    }

    /// Reads a whole blob and checks its sha256.
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>, OciError> {
        let path = self.blob_path(digest);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                return Err(OciError::MissingBlob {
                    digest: *digest,
                    dir: self.root.clone(),
                });
            }
            Err(source) => return Err(io_error("read", &path)(source)),
        };
        let actual = Digest::of(&bytes);
        if actual != *digest {
            return Err(OciError::DigestMismatch {
                path,
                expected: *digest,
                actual,
            });
        }
        Ok(bytes)
    }

    /// Reads the blob a descriptor points at, checking its digest and size, and parses it.
    pub fn read_json<T: DeserializeOwned>(
        &self,
        descriptor: &Descriptor,
        what: &'static str,
    ) -> Result<T, OciError> {
        let bytes = self.read_blob(&descriptor.digest)?;
        if bytes.len() as u64 != descriptor.size {
            return Err(OciError::SizeMismatch {
                digest: descriptor.digest,
                expected: descriptor.size,
                actual: bytes.len() as u64,
            });
        }
        serde_json::from_slice(&bytes).map_err(|source| OciError::InvalidJson {
            what,
            path: self.blob_path(&descriptor.digest),
            source,
        })
    }

    /// Reads and parses the image config a manifest names.
    pub fn read_config(&self, manifest: &ImageManifest) -> Result<ImageConfigFile, OciError> {
        self.read_json(&manifest.config, "image config")
    }

    /// From `descriptor` (a manifest or an image index, possibly nested), the manifest for
    /// `platform`, with its descriptor (whose `platform` is filled in from the image config
    /// when the index did not carry one).
    pub fn select_platform(
        &self,
        descriptor: &Descriptor,
        platform: &graphbuild_lang::platform::Platform,
    ) -> Result<(ImageManifest, Descriptor), OciError> {
        self.select_oci_platform(descriptor, &OciPlatform::from(platform))
    }

    /// [`OciLayout::select_platform`] for an [`OciPlatform`].
    pub fn select_oci_platform(
        &self,
        descriptor: &Descriptor,
        requested: &OciPlatform,
    ) -> Result<(ImageManifest, Descriptor), OciError> {
        let mut candidates = Vec::new();
        self.collect_manifests(descriptor, 0, &mut candidates)?;
        let mut best: Option<(usize, Descriptor, OciPlatform)> = None;
        let mut available = Vec::new();
        for candidate in candidates {
            let candidate_platform = match &candidate.platform {
                Some(platform) => platform.clone(),
                // A manifest listed without a platform: its config says what it is for.
                None => {
                    let manifest: ImageManifest = self.read_json(&candidate, "image manifest")?;
                    self.read_config(&manifest)?.platform()
                }
            };
            // Attestations and other non-images are listed as unknown/unknown.
            if candidate_platform.os == "unknown" {
                continue;
            }
            if let Some(preference) = platform_preference(requested, &candidate_platform)
                && best
                    .as_ref()
                    .is_none_or(|(current, _, _)| preference < *current)
            {
                best = Some((preference, candidate, candidate_platform.clone()));
            }
            available.push(candidate_platform);
        }
        let Some((_, mut chosen, chosen_platform)) = best else {
            available.sort();
            available.dedup();
            return Err(OciError::NoMatchingPlatform {
                requested: requested.clone(),
                source_name: match descriptor.ref_name() {
                    Some(tag) => format!("{}:{tag}", self.root.display()),
                    None => format!("{}@{}", self.root.display(), descriptor.digest),
                },
                available,
            });
        };
        let manifest: ImageManifest = self.read_json(&chosen, "image manifest")?;
        if chosen.platform.is_none() {
            chosen.platform = Some(chosen_platform);
        }
        Ok((manifest, chosen))
    }

    /// Every manifest reachable from `descriptor`, following nested indexes.
    fn collect_manifests(
        &self,
        descriptor: &Descriptor,
        depth: usize,
        out: &mut Vec<Descriptor>,
    ) -> Result<(), OciError> {
        if depth > MAX_INDEX_DEPTH {
            return Err(OciError::NestingTooDeep {
                digest: descriptor.digest,
            });
        }
        if media::is_index(&descriptor.media_type) {
            let index: ImageIndex = self.read_json(descriptor, "image index")?;
            for child in &index.manifests {
                self.collect_manifests(child, depth + 1, out)?;
            }
            Ok(())
        } else if media::is_manifest(&descriptor.media_type) {
            out.push(descriptor.clone());
            Ok(())
        } else {
            Err(OciError::UnexpectedMediaType {
                digest: descriptor.digest,
                media_type: descriptor.media_type.clone(),
                expected: "an image index or an image manifest",
            })
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

/// Where [`write_layout`] takes a blob's bytes from.
#[derive(Debug, Clone)]
pub enum BlobSource {
    /// A file, e.g. a layer in the store; copied (its digest is checked while copying).
    Path(PathBuf),
    /// Bytes in memory, e.g. a manifest.
    Bytes(Vec<u8>),
}

/// Writes a complete OCI image layout at `dir`: `oci-layout`, `index.json` (`index`,
/// canonical JSON) and every blob, atomically (see the module docs). Blobs are checked against
/// their digests; every blob reachable from `index` through indexes and manifests must be
/// among `blobs`. An existing layout at `dir` is replaced; any other non-empty directory is
/// left alone and reported.
pub fn write_layout(
    dir: &Path,
    index: &ImageIndex,
    blobs: impl IntoIterator<Item = (Digest, BlobSource)>,
) -> Result<(), OciError> {
    let name = dir.file_name().ok_or_else(|| OciError::NotALayout {
        dir: dir.to_path_buf(),
        reason: "the output path has no final component".to_string(),
    })?;
    let parent = match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(io_error("create directory", &parent))?;

    let existing = match fs::symlink_metadata(dir) {
        Ok(metadata) if metadata.is_dir() => {
            let is_layout = dir.join("oci-layout").is_file();
            let is_empty = fs::read_dir(dir)
                .map_err(io_error("read directory", dir))?
                .next()
                .is_none();
            if !is_layout && !is_empty {
                return Err(OciError::OutputNotALayout {
                    dir: dir.to_path_buf(),
                });
            }
            true
        }
        Ok(_) => {
            return Err(OciError::OutputNotALayout {
                dir: dir.to_path_buf(),
            });
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => false,
        Err(source) => return Err(io_error("inspect", dir)(source)),
    };

    let prefix = format!(".{}.graphbuild-tmp-", name.to_string_lossy());
    remove_stale_temporaries(&parent, &prefix);
    let temporary = tempfile::Builder::new()
        .prefix(&format!("{prefix}{}-", std::process::id()))
        .tempdir_in(&parent)
        .map_err(io_error("create a temporary directory in", &parent))?;
    let staging = temporary.path();

    let blob_dir = staging.join("blobs").join("sha256");
    fs::create_dir_all(&blob_dir).map_err(io_error("create directory", &blob_dir))?;
    for (digest, source) in blobs {
        let target = blob_dir.join(digest.hex());
        if target.exists() {
            continue;
        }
        write_blob(&target, &digest, &source)?;
    }
    let index_bytes = canonical_json(index);
    let index_path = staging.join("index.json");
    fs::write(&index_path, &index_bytes).map_err(io_error("write", &index_path))?;
    let marker_path = staging.join("oci-layout");
    fs::write(&marker_path, OCI_LAYOUT_FILE_CONTENT).map_err(io_error("write", &marker_path))?;

    // Every blob the index reaches must be there before the layout is put in place.
    let staged = OciLayout::open(staging)?;
    for descriptor in &index.manifests {
        check_complete(&staged, descriptor, 0)?;
    }

    // The permissions of a fresh output directory are the usual ones, not the temp dir's 0700.
    fs::set_permissions(staging, fs::Permissions::from_mode(0o755))
        .map_err(io_error("set permissions on", staging))?;

    // Put it in place: swap with an existing layout, or rename into a free name. Another run
    // may create or replace the directory meanwhile; then the other operation applies.
    let rename = |flags: nix::fcntl::RenameFlags| {
        nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            staging,
            nix::fcntl::AT_FDCWD,
            dir,
            flags,
        )
    };
    let exchange = nix::fcntl::RenameFlags::RENAME_EXCHANGE;
    let no_replace = nix::fcntl::RenameFlags::RENAME_NOREPLACE;
    let placed = match rename(if existing { exchange } else { no_replace }) {
        Err(nix::errno::Errno::EEXIST | nix::errno::Errno::ENOTEMPTY) if !existing => {
            rename(exchange)
        }
        Err(nix::errno::Errno::ENOENT) if existing => rename(no_replace),
        other => other,
    };
    placed.map_err(|errno| io_error("put in place", dir)(io::Error::from(errno)))?;
    // `temporary` now holds the old layout, if there was one, and is removed when dropped.
    drop(temporary);
    Ok(())
}

fn write_blob(target: &Path, digest: &Digest, source: &BlobSource) -> Result<(), OciError> {
    match source {
        BlobSource::Bytes(bytes) => {
            let actual = Digest::of(bytes);
            if actual != *digest {
                return Err(OciError::DigestMismatch {
                    path: target.to_path_buf(),
                    expected: *digest,
                    actual,
                });
            }
            fs::write(target, bytes).map_err(io_error("write", target))
        }
        BlobSource::Path(path) => {
            let mut input = fs::File::open(path).map_err(io_error("open", path))?;
            let mut output = fs::File::create(target).map_err(io_error("create", target))?;
            let mut hasher = DigestWriter::new();
            let mut buffer = vec![0u8; 256 * 1024];
            loop {
                let read = input.read(&mut buffer).map_err(io_error("read", path))?;
                if read == 0 {
                    break;
                }
                hasher.update(&buffer[..read]);
                output
                    .write_all(&buffer[..read])
                    .map_err(io_error("write", target))?;
            }
            let actual = hasher.finish();
            if actual != *digest {
                return Err(OciError::DigestMismatch {
                    path: path.clone(),
                    expected: *digest,
                    actual,
                });
            }
            Ok(())
        }
    }
}

fn check_complete(
    layout: &OciLayout,
    descriptor: &Descriptor,
    depth: usize,
) -> Result<(), OciError> {
    if depth > MAX_INDEX_DEPTH {
        return Err(OciError::NestingTooDeep {
            digest: descriptor.digest,
        });
    }
    if media::is_index(&descriptor.media_type) {
        let index: ImageIndex = layout.read_json(descriptor, "image index")?;
        for child in &index.manifests {
            check_complete(layout, child, depth + 1)?;
        }
    } else if media::is_manifest(&descriptor.media_type) {
        let manifest: ImageManifest = layout.read_json(descriptor, "image manifest")?;
        for blob in std::iter::once(&manifest.config).chain(&manifest.layers) {
            let path = layout.blob_path(&blob.digest);
            let metadata = fs::metadata(&path).map_err(|_| OciError::MissingBlob {
                digest: blob.digest,
                dir: layout.root.clone(),
            })?;
            if metadata.len() != blob.size {
                return Err(OciError::SizeMismatch {
                    digest: blob.digest,
                    expected: blob.size,
                    actual: metadata.len(),
                });
            }
        }
    } else if !layout.blob_path(&descriptor.digest).is_file() {
        return Err(OciError::MissingBlob {
            digest: descriptor.digest,
            dir: layout.root.clone(),
        });
    }
    Ok(())
}

/// Removes temporary directories left by earlier runs that were killed (their process is gone).
fn remove_stale_temporaries(parent: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name
            .to_str()
            .and_then(|name| name.strip_prefix(prefix))
        else {
            continue;
        };
        let Some(pid) = rest
            .split('-')
            .next()
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        if !alive {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> OciPlatform {
        let mut parts = text.split('/');
        let os = parts.next().unwrap_or_default();
        let architecture = parts.next().unwrap_or_default();
        OciPlatform::new(os, architecture, parts.next())
    }

    #[test]
    fn platform_preference_follows_containerd() {
        let cases: &[(&str, &str, Option<usize>)] = &[
            ("linux/amd64", "linux/amd64", Some(0)),
            ("linux/amd64", "linux/x86_64", Some(0)),
            ("linux/amd64", "linux/amd64/v1", Some(0)),
            ("linux/amd64", "linux/amd64/v2", None),
            ("linux/amd64/v3", "linux/amd64/v2", Some(1)),
            ("linux/amd64/v3", "linux/amd64", Some(2)),
            ("linux/amd64", "linux/386", None),
            ("linux/arm64", "linux/arm64/v8", Some(0)),
            ("linux/arm64/v8", "linux/arm64", Some(0)),
            ("linux/arm64", "linux/aarch64", Some(0)),
            ("linux/arm64", "linux/arm/v7", None),
            ("linux/arm/v7", "linux/arm/v7", Some(0)),
            ("linux/arm/v7", "linux/arm", Some(0)),
            ("linux/arm/v7", "linux/arm/v6", Some(1)),
            ("linux/arm/v7", "linux/arm/v5", Some(2)),
            ("linux/arm/v6", "linux/arm/v7", None),
            ("linux/arm/v5", "linux/arm/v6", None),
            ("linux/arm/v8", "linux/arm/v7", Some(1)),
            ("linux/amd64", "windows/amd64", None),
            ("linux/ppc64le", "linux/ppc64le", Some(0)),
        ];
        for (requested, candidate, expected) in cases {
            assert_eq!(
                platform_preference(&parse(requested), &parse(candidate)),
                *expected,
                "{requested} served by {candidate}"
            );
        }
    }

    #[test]
    fn canonical_json_sorts_nested_keys_and_is_compact() {
        let value = serde_json::json!({"b": {"z": 1, "a": [true, null, "x\"y"]}, "a": 2.5});
        assert_eq!(
            canonical_json(&value),
            br#"{"a":2.5,"b":{"a":[true,null,"x\"y"],"z":1}}"#
        );
    }

    #[test]
    fn descriptors_skip_empty_fields() {
        let descriptor = Descriptor::of_bytes(media::OCI_CONFIG, b"{}");
        assert_eq!(
            String::from_utf8(canonical_json(&descriptor)).unwrap_or_default(),
            r#"{"digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","mediaType":"application/vnd.oci.image.config.v1+json","size":2}"#
        );
    }
}
