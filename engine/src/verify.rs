//! `graphbuild verify`: compare two builds of the same inputs, down to the files in a layer.
//!
//! Two layouts written from the same build file should be byte-identical. When they are not,
//! this module finds where: which image and platform, whether the config or a layer differs,
//! and for a layer, which entries differ and how (content, mode, mtime, owner, link target,
//! present in one build only).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use crate::digest::Digest;
use crate::oci::{self, ImageIndex, ImageManifest, OciLayout};

/// One entry of a layer tar, reduced to what reproducibility cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    kind: u8,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    link: Option<String>,
    content: [u8; 32],
}

/// Where two builds differ.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Difference {
    pub platform: String,
    /// `config`, `layer N (sha256:… vs sha256:…)`, or `manifest`.
    pub part: String,
    /// For layers: `path: content, mtime` lines.
    pub entries: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Oci(#[from] oci::OciError),
    #[error("cannot read layer {digest}: {message}")]
    Layer { digest: Digest, message: String },
}

fn manifests(
    layout: &OciLayout,
) -> Result<BTreeMap<String, (Digest, ImageManifest)>, oci::OciError> {
    let top = layout.resolve(None).or_else(|_| {
        layout
            .index()
            .manifests
            .first()
            .cloned()
            .ok_or(oci::OciError::EmptyLayout {
                dir: layout.root().to_path_buf(),
            })
    })?;
    let mut found = BTreeMap::new();
    let index: ImageIndex = if oci::media::is_index(&top.media_type) {
        layout.read_json(&top, "image index")?
    } else {
        ImageIndex::new(vec![top])
    };
    // Attestations are compared through the index's digest, not as filesystems.
    for descriptor in index.manifests.iter().filter(|d| !d.is_attestation()) {
        let manifest: ImageManifest = layout.read_json(descriptor, "image manifest")?;
        let platform = descriptor
            .platform
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_else(|| "unknown".into());
        found.insert(platform, (descriptor.digest, manifest));
    }
    Ok(found)
}

fn read_layer(layout: &OciLayout, digest: &Digest) -> Result<BTreeMap<String, Entry>, VerifyError> {
    let layer_error = |message: String| VerifyError::Layer {
        digest: *digest,
        message,
    };
    let bytes = layout.read_blob(digest)?;
    let mut raw = Vec::new();
    crate::decompress::decompressed(&bytes[..])
        .and_then(|mut reader| reader.read_to_end(&mut raw))
        .map_err(|e| layer_error(e.to_string()))?;
    let mut archive = tar::Archive::new(&raw[..]);
    let mut entries = BTreeMap::new();
    for entry in archive.entries().map_err(|e| layer_error(e.to_string()))? {
        let mut entry = entry.map_err(|e| layer_error(e.to_string()))?;
        let path = entry
            .path()
            .map_err(|e| layer_error(e.to_string()))?
            .display()
            .to_string();
        let header = entry.header().clone();
        let link = entry
            .link_name()
            .ok()
            .flatten()
            .map(|link| link.display().to_string());
        let mut hasher = blake3::Hasher::new();
        let mut buffer = Vec::new();
        entry
            .read_to_end(&mut buffer)
            .map_err(|e| layer_error(e.to_string()))?;
        hasher.update(&buffer);
        entries.insert(
            path,
            Entry {
                kind: header.entry_type().as_byte(),
                mode: header.mode().unwrap_or(0),
                uid: header.uid().unwrap_or(0),
                gid: header.gid().unwrap_or(0),
                mtime: header.mtime().unwrap_or(0),
                link,
                content: *hasher.finalize().as_bytes(),
            },
        );
    }
    Ok(entries)
}

fn describe_entry_difference(a: &Entry, b: &Entry) -> Vec<&'static str> {
    let mut how = Vec::new();
    if a.kind != b.kind {
        how.push("type");
    }
    if a.content != b.content {
        how.push("content");
    }
    if a.mode != b.mode {
        how.push("mode");
    }
    if a.mtime != b.mtime {
        how.push("mtime");
    }
    if a.uid != b.uid || a.gid != b.gid {
        how.push("owner");
    }
    if a.link != b.link {
        how.push("link target");
    }
    how
}

/// Compare two layouts of the same image. Empty when they are identical.
pub fn compare_layouts(first: &Path, second: &Path) -> Result<Vec<Difference>, VerifyError> {
    let first = OciLayout::open(first)?;
    let second = OciLayout::open(second)?;
    let a = manifests(&first)?;
    let b = manifests(&second)?;
    let mut differences = Vec::new();
    for (platform, (digest_a, manifest_a)) in &a {
        let Some((digest_b, manifest_b)) = b.get(platform) else {
            differences.push(Difference {
                platform: platform.clone(),
                part: "missing from the second build".into(),
                entries: Vec::new(),
            });
            continue;
        };
        if digest_a == digest_b {
            continue;
        }
        if manifest_a.config.digest != manifest_b.config.digest {
            let config_a: serde_json::Value =
                serde_json::from_slice(&first.read_blob(&manifest_a.config.digest)?)
                    .unwrap_or_default();
            let config_b: serde_json::Value =
                serde_json::from_slice(&second.read_blob(&manifest_b.config.digest)?)
                    .unwrap_or_default();
            let mut entries = Vec::new();
            if let (Some(map_a), Some(map_b)) = (config_a.as_object(), config_b.as_object()) {
                for (key, value) in map_a {
                    if key != "rootfs" && map_b.get(key) != Some(value) {
                        entries.push(format!(
                            "{key}: {value} vs {}",
                            map_b.get(key).cloned().unwrap_or_default()
                        ));
                    }
                }
            }
            // Only the diff ids differing is explained by the layers below.
            if !entries.is_empty() {
                differences.push(Difference {
                    platform: platform.clone(),
                    part: "config".into(),
                    entries,
                });
            }
        }
        for (index, layer_a) in manifest_a.layers.iter().enumerate() {
            let Some(layer_b) = manifest_b.layers.get(index) else {
                break;
            };
            if layer_a.digest == layer_b.digest {
                continue;
            }
            let entries_a = read_layer(&first, &layer_a.digest)?;
            let entries_b = read_layer(&second, &layer_b.digest)?;
            let mut entries = Vec::new();
            for (path, entry_a) in &entries_a {
                match entries_b.get(path) {
                    None => entries.push(format!("{path}: only in the first build")),
                    Some(entry_b) => {
                        let how = describe_entry_difference(entry_a, entry_b);
                        if !how.is_empty() {
                            entries.push(format!("{path}: {}", how.join(", ")));
                        }
                    }
                }
            }
            for path in entries_b.keys() {
                if !entries_a.contains_key(path) {
                    entries.push(format!("{path}: only in the second build"));
                }
            }
            if entries.is_empty() {
                entries.push("same entries; the compressed bytes differ".into());
            }
            differences.push(Difference {
                platform: platform.clone(),
                part: format!(
                    "layer {} ({} vs {})",
                    index + 1,
                    layer_a.digest,
                    layer_b.digest
                ),
                entries,
            });
        }
        if manifest_a.layers.len() != manifest_b.layers.len() {
            differences.push(Difference {
                platform: platform.clone(),
                part: format!(
                    "layer count ({} vs {})",
                    manifest_a.layers.len(),
                    manifest_b.layers.len()
                ),
                entries: Vec::new(),
            });
        }
    }
    for platform in b.keys() {
        if !a.contains_key(platform) {
            differences.push(Difference {
                platform: platform.clone(),
                part: "missing from the first build".into(),
                entries: Vec::new(),
            });
        }
    }
    Ok(differences)
}
