//! The SBOM: the packages found in one platform's final filesystem, as an SPDX 2.3 document.
//!
//! # Scanning
//!
//! The layers are read in order, straight from their blobs (no snapshot is needed, so a build
//! assembled from the team cache can scan too). Each file that can name packages is read —
//! a dpkg status database, an apk database, a Python `*.dist-info/METADATA`, npm's
//! `package-lock.json` and `node_modules/*/package.json`, and executables (ELF files with Go
//! build information or `cargo auditable` data) — and what it names is kept under its path.
//! A later layer's entry at the same path replaces it (whatever the entry is), and whiteouts
//! (`.wh.NAME`, `.wh..wh..opq`) remove what lower layers had, so the result is what the
//! image's filesystem holds.
//!
//! # Bounds
//!
//! Image contents are untrusted. Each kind of file has a size cap ([`limit_for`]); a larger
//! file is not read and is counted in the document's comment. Hard links are not followed
//! (a binary present only as a hard link to another path is found at that path). The
//! package count is capped at [`MAX_PACKAGES`].
//!
//! # Determinism
//!
//! Packages are sorted and deduplicated by package URL and location; identifiers are
//! numbered in that order; `created` is the build's `SOURCE_DATE_EPOCH`; the document's
//! namespace is derived from the SBOM's cache key. The same layers give the same bytes.

pub(crate) mod formats;

use std::collections::BTreeMap;
use std::io::Read;

use serde_json::{Value, json};

use crate::state::LayerDesc;
use crate::store::Store;

/// At most this many packages are listed.
pub(crate) const MAX_PACKAGES: usize = 100_000;

/// Which package ecosystem a package comes from: its purl type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Ecosystem {
    Deb,
    Apk,
    PyPi,
    Npm,
    Golang,
    Cargo,
}

impl Ecosystem {
    fn purl_type(self) -> &'static str {
        match self {
            Ecosystem::Deb => "deb",
            Ecosystem::Apk => "apk",
            Ecosystem::PyPi => "pypi",
            Ecosystem::Npm => "npm",
            Ecosystem::Golang => "golang",
            Ecosystem::Cargo => "cargo",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Package {
    pub(crate) ecosystem: Ecosystem,
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) arch: Option<String>,
    /// The file it was found in, absolute (`/var/lib/dpkg/status`).
    pub(crate) location: String,
}

/// The files of an image worth reading for packages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    OsRelease,
    Dpkg,
    Apk,
    Python,
    NpmPackage,
    NpmLock,
    Executable,
}

/// The size cap of each kind of file.
fn limit_for(kind: Kind) -> u64 {
    const MIB: u64 = 1024 * 1024;
    match kind {
        Kind::OsRelease => 64 * 1024,
        Kind::Python | Kind::NpmPackage => MIB,
        Kind::Dpkg | Kind::Apk | Kind::NpmLock => 64 * MIB,
        Kind::Executable => 256 * MIB,
    }
}

fn kind_of(path: &str, mode: u32) -> Option<Kind> {
    let components: Vec<&str> = path.split('/').collect();
    let file = *components.last()?;
    let parent = components
        .len()
        .checked_sub(2)
        .map(|index| components[index]);
    match path {
        "etc/os-release" | "usr/lib/os-release" => return Some(Kind::OsRelease),
        "var/lib/dpkg/status" => return Some(Kind::Dpkg),
        "lib/apk/db/installed" => return Some(Kind::Apk),
        _ => {}
    }
    if path.starts_with("var/lib/dpkg/status.d/") && components.len() == 5 && !file.contains('.') {
        return Some(Kind::Dpkg);
    }
    if file == "METADATA" && parent.is_some_and(|parent| parent.ends_with(".dist-info")) {
        return Some(Kind::Python);
    }
    if file == "package.json" {
        let n = components.len();
        let in_node_modules = (n >= 3 && components[n - 3] == "node_modules")
            || (n >= 4
                && components[n - 4] == "node_modules"
                && components[n - 3].starts_with('@'));
        return in_node_modules.then_some(Kind::NpmPackage);
    }
    if file == "package-lock.json" && !components.contains(&"node_modules") {
        return Some(Kind::NpmLock);
    }
    (mode & 0o111 != 0).then_some(Kind::Executable)
}

/// What one path of the filesystem contributes.
#[derive(Debug, Clone)]
enum Found {
    Packages(Vec<Package>),
    Distro(formats::Distro),
}

/// What the scan found: the packages and the distribution.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    pub(crate) packages: Vec<Package>,
    pub(crate) distro: formats::Distro,
    /// Files not read because they exceed their kind's size cap.
    pub(crate) skipped: usize,
}

/// Why a platform's layers could not be scanned.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ScanError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("layer {digest}: {source}")]
    Layer {
        digest: crate::digest::Digest,
        #[source]
        source: std::io::Error,
    },
}

/// Scan a platform's layers (bottom first) for packages.
pub(crate) fn scan_layers(store: &Store, layers: &[LayerDesc]) -> Result<Scan, ScanError> {
    let mut found: BTreeMap<String, Found> = BTreeMap::new();
    let mut skipped = 0;
    for layer in layers {
        let blob = store.open_blob(&layer.digest)?;
        let layer_error = |source: std::io::Error| ScanError::Layer {
            digest: layer.digest,
            source,
        };
        let reader = crate::decompress::decompressed(blob).map_err(layer_error)?;
        let mut archive = tar::Archive::new(reader);
        // This layer's entries apply after its whiteouts remove lower layers' paths.
        let mut touched: Vec<String> = Vec::new();
        let mut removed: Vec<String> = Vec::new();
        let mut opaque: Vec<String> = Vec::new();
        let mut here: Vec<(String, Found)> = Vec::new();
        for entry in archive.entries().map_err(layer_error)? {
            let mut entry = entry.map_err(layer_error)?;
            let raw = entry.path().map_err(layer_error)?;
            let path = normalize(&raw.to_string_lossy());
            if path.is_empty() {
                continue;
            }
            let (dir, file) = match path.rsplit_once('/') {
                Some((dir, file)) => (dir.to_string(), file.to_string()),
                None => (String::new(), path.clone()),
            };
            if file == ".wh..wh..opq" {
                opaque.push(dir);
                continue;
            }
            if let Some(name) = file.strip_prefix(".wh.") {
                removed.push(if dir.is_empty() {
                    name.to_string()
                } else {
                    format!("{dir}/{name}")
                });
                continue;
            }
            let entry_type = entry.header().entry_type();
            if entry_type.is_dir() {
                // A directory merges with a lower one: it replaces nothing.
                continue;
            }
            touched.push(path.clone());
            if !entry_type.is_file() {
                continue;
            }
            let mode = entry.header().mode().unwrap_or(0);
            let Some(kind) = kind_of(&path, mode) else {
                continue;
            };
            let size = entry.size();
            if size > limit_for(kind) {
                skipped += 1;
                continue;
            }
            if kind == Kind::Executable {
                // Only ELF files are read whole.
                let mut magic = [0u8; 4];
                if size < 64 || entry.read_exact(&mut magic).is_err() || &magic != b"\x7fELF" {
                    continue;
                }
                let mut bytes = magic.to_vec();
                bytes.reserve(usize::try_from(size).unwrap_or(0));
                (&mut entry)
                    .take(size)
                    .read_to_end(&mut bytes)
                    .map_err(layer_error)?;
                let mut packages = formats::go_binary(&bytes);
                packages.extend(formats::rust_binary(&bytes));
                if !packages.is_empty() {
                    here.push((path, Found::Packages(packages)));
                }
                continue;
            }
            let mut bytes = Vec::new();
            (&mut entry)
                .take(limit_for(kind))
                .read_to_end(&mut bytes)
                .map_err(layer_error)?;
            let result = match kind {
                Kind::OsRelease => Found::Distro(formats::os_release(&bytes)),
                Kind::Dpkg => Found::Packages(formats::dpkg_status(&bytes)),
                Kind::Apk => Found::Packages(formats::apk_installed(&bytes)),
                Kind::Python => Found::Packages(formats::python_metadata(&bytes)),
                Kind::NpmPackage => Found::Packages(formats::npm_package_json(&bytes)),
                Kind::NpmLock => Found::Packages(formats::npm_lock(&bytes)),
                Kind::Executable => continue,
            };
            here.push((path, result));
        }
        for dir in &opaque {
            if dir.is_empty() {
                found.clear();
            } else {
                remove_under(&mut found, dir);
            }
        }
        for path in removed.iter().chain(&touched) {
            found.remove(path);
            remove_under(&mut found, path);
        }
        found.extend(here);
    }
    let mut scan = Scan {
        skipped,
        ..Scan::default()
    };
    for name in ["etc/os-release", "usr/lib/os-release"] {
        if let Some(Found::Distro(distro)) = found.get(name) {
            scan.distro = distro.clone();
            break;
        }
    }
    for (path, item) in found {
        if let Found::Packages(packages) = item {
            for mut package in packages {
                package.location = format!("/{path}");
                scan.packages.push(package);
                if scan.packages.len() >= MAX_PACKAGES {
                    return Ok(scan);
                }
            }
        }
    }
    Ok(scan)
}

/// Remove every path below the directory `dir` (a range of the sorted map, not a scan).
fn remove_under(found: &mut BTreeMap<String, Found>, dir: &str) {
    let prefix = format!("{dir}/");
    let below: Vec<String> = found
        .range(prefix.clone()..)
        .take_while(|(path, _)| path.starts_with(&prefix))
        .map(|(path, _)| path.clone())
        .collect();
    for path in below {
        found.remove(&path);
    }
}

/// A tar path as a relative path without `./`, leading or trailing slashes.
fn normalize(path: &str) -> String {
    let path = path.trim_start_matches("./").trim_matches('/');
    path.to_string()
}

/// The package URL of a package, or `None` when its name cannot be one.
pub(crate) fn purl(package: &Package, distro: &formats::Distro) -> Option<String> {
    let ecosystem = package.ecosystem;
    let (namespace, name) = match ecosystem {
        Ecosystem::Deb => (
            Some(distro.id.clone().unwrap_or_else(|| "debian".into())),
            package.name.clone(),
        ),
        Ecosystem::Apk => (
            Some(distro.id.clone().unwrap_or_else(|| "alpine".into())),
            package.name.clone(),
        ),
        Ecosystem::Npm | Ecosystem::Golang => match package.name.rsplit_once('/') {
            Some((namespace, name)) => (Some(namespace.to_string()), name.to_string()),
            None => (None, package.name.clone()),
        },
        Ecosystem::PyPi | Ecosystem::Cargo => (None, package.name.clone()),
    };
    let mut purl = packageurl::PackageUrl::new(ecosystem.purl_type(), name).ok()?;
    if let Some(namespace) = namespace {
        purl.with_namespace(namespace).ok()?;
    }
    if !package.version.is_empty() {
        purl.with_version(package.version.clone()).ok()?;
    }
    if matches!(ecosystem, Ecosystem::Deb | Ecosystem::Apk) {
        if let Some(arch) = &package.arch {
            purl.add_qualifier("arch", arch.clone()).ok()?;
        }
        if let (Some(id), Some(version)) = (&distro.id, &distro.version_id) {
            purl.add_qualifier("distro", format!("{id}-{version}"))
                .ok()?;
        }
    }
    Some(purl.to_string())
}

/// The SPDX 2.3 document of a scan. `namespace_id` makes the document namespace unique (the
/// SBOM's cache key); `created` is an RFC 3339 time (the build's `SOURCE_DATE_EPOCH`).
pub(crate) fn spdx_document(
    scan: &Scan,
    platform: &str,
    namespace_id: &str,
    created: &str,
) -> Value {
    let mut entries: Vec<(String, &Package)> = scan
        .packages
        .iter()
        .filter_map(|package| purl(package, &scan.distro).map(|purl| (purl, package)))
        .collect();
    entries.sort_by(|(a, pa), (b, pb)| (a, &pa.location).cmp(&(b, &pb.location)));
    entries.dedup_by(|(a, pa), (b, pb)| a == b && pa.location == pb.location);
    let root = "SPDXRef-Filesystem";
    let mut packages = vec![json!({
        "SPDXID": root,
        "name": platform,
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": false,
        "primaryPackagePurpose": "CONTAINER",
        "comment": format!("the final filesystem of the image for {platform}"),
    })];
    let mut relationships = vec![json!({
        "spdxElementId": "SPDXRef-DOCUMENT",
        "relationshipType": "DESCRIBES",
        "relatedSpdxElement": root,
    })];
    for (number, (purl, package)) in entries.iter().enumerate() {
        let id = format!("SPDXRef-Package-{}", number + 1);
        packages.push(json!({
            "SPDXID": id,
            "name": package.name,
            "versionInfo": package.version,
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": false,
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": "NOASSERTION",
            "copyrightText": "NOASSERTION",
            "sourceInfo": format!("found in {}", package.location),
            "externalRefs": [{
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": purl,
            }],
        }));
        relationships.push(json!({
            "spdxElementId": root,
            "relationshipType": "CONTAINS",
            "relatedSpdxElement": id,
        }));
    }
    let mut creation = json!({
        "created": created,
        "creators": [format!("Tool: graphbuild-{}", env!("CARGO_PKG_VERSION"))],
    });
    if scan.skipped > 0 {
        creation["comment"] = json!(format!(
            "{} files were not read: larger than the scanner's size limits",
            scan.skipped
        ));
    }
    json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": format!("graphbuild-sbom-{}", platform.replace('/', "-")),
        "documentNamespace": format!("{}/spdx/{namespace_id}", env!("CARGO_PKG_REPOSITORY")),
        "creationInfo": creation,
        "packages": packages,
        "relationships": relationships,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn package(ecosystem: Ecosystem, name: &str, version: &str) -> Package {
        Package {
            ecosystem,
            name: name.into(),
            version: version.into(),
            arch: Some("amd64".into()),
            location: "/x".into(),
        }
    }

    #[test]
    fn package_urls_follow_the_purl_spec() {
        let distro = formats::Distro {
            id: Some("debian".into()),
            version_id: Some("12".into()),
        };
        assert_eq!(
            purl(&package(Ecosystem::Deb, "libc6", "2.36-9+deb12u4"), &distro).as_deref(),
            Some("pkg:deb/debian/libc6@2.36-9%2Bdeb12u4?arch=amd64&distro=debian-12")
        );
        assert_eq!(
            purl(&package(Ecosystem::Npm, "@scope/x", "1.0.0"), &distro).as_deref(),
            Some("pkg:npm/%40scope/x@1.0.0")
        );
        assert_eq!(
            purl(
                &package(Ecosystem::Golang, "golang.org/x/text", "v0.14.0"),
                &distro
            )
            .as_deref(),
            Some("pkg:golang/golang.org/x/text@v0.14.0")
        );
    }

    fn layer(store: &Store, files: &[(&str, &[u8])]) -> LayerDesc {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, bytes) in files {
            let mut header = tar::Header::new_ustar();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            builder.append_data(&mut header, path, *bytes).unwrap();
        }
        let bytes = builder.into_inner().unwrap();
        let digest = store.put_blob_bytes(&bytes).unwrap();
        LayerDesc {
            digest,
            diff_id: digest,
            size: bytes.len() as u64,
            media_type: crate::oci::media::OCI_LAYER_TAR.into(),
        }
    }

    #[test]
    fn later_layers_replace_and_whiteouts_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let status = |name: &str| {
            format!("Package: {name}\nStatus: install ok installed\nVersion: 1\n").into_bytes()
        };
        let metadata = b"Name: six\nVersion: 1.16.0\n".as_slice();
        let first = layer(
            &store,
            &[
                ("var/lib/dpkg/status", &status("old")),
                ("usr/lib/py/six-1.16.0.dist-info/METADATA", metadata),
                ("srv/x.dist-info/METADATA", metadata),
            ],
        );
        let second = layer(
            &store,
            &[
                ("var/lib/dpkg/status", &status("new")),
                ("usr/lib/py/.wh.six-1.16.0.dist-info", b""),
                ("srv/.wh..wh..opq", b""),
            ],
        );
        let scan = scan_layers(&store, std::slice::from_ref(&first)).unwrap();
        assert_eq!(scan.packages.len(), 3);
        let scan = scan_layers(&store, &[first, second]).unwrap();
        let found: Vec<(&str, &str)> = scan
            .packages
            .iter()
            .map(|p| (p.name.as_str(), p.location.as_str()))
            .collect();
        assert_eq!(found, [("new", "/var/lib/dpkg/status")]);
    }

    #[test]
    fn a_missing_or_unreadable_layer_is_a_typed_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut missing = layer(&store, &[("etc/os-release", b"ID=x\n")]);
        missing.digest = crate::digest::Digest([7; 32]);
        assert!(matches!(
            scan_layers(&store, &[missing]),
            Err(ScanError::Store(_))
        ));
        // A "gzip" layer cut short after its magic: not a tar stream.
        let digest = store.put_blob_bytes(&[0x1f, 0x8b, 8, 0, 0]).unwrap();
        let broken = LayerDesc {
            digest,
            diff_id: digest,
            size: 5,
            media_type: crate::oci::media::OCI_LAYER_TAR.into(),
        };
        match scan_layers(&store, &[broken]) {
            Err(error @ ScanError::Layer { .. }) => {
                assert!(error.to_string().starts_with(&format!("layer {digest}: ")))
            }
            other => panic!("expected a layer error, got {other:?}"),
        }
    }

    #[test]
    fn files_worth_reading_are_recognized() {
        assert_eq!(kind_of("var/lib/dpkg/status", 0o644), Some(Kind::Dpkg));
        assert_eq!(
            kind_of("var/lib/dpkg/status.d/base", 0o644),
            Some(Kind::Dpkg)
        );
        assert_eq!(kind_of("var/lib/dpkg/status.d/base.md5sums", 0o644), None);
        assert_eq!(
            kind_of(
                "usr/lib/python3/site-packages/six-1.16.0.dist-info/METADATA",
                0o644
            ),
            Some(Kind::Python)
        );
        assert_eq!(
            kind_of("app/node_modules/@scope/x/package.json", 0o644),
            Some(Kind::NpmPackage)
        );
        assert_eq!(kind_of("app/node_modules/x/lib/package.json", 0o644), None);
        assert_eq!(kind_of("app/package-lock.json", 0o644), Some(Kind::NpmLock));
        assert_eq!(kind_of("usr/bin/app", 0o755), Some(Kind::Executable));
        assert_eq!(kind_of("etc/passwd", 0o644), None);
    }
}
