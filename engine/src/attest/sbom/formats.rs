//! The package databases and manifests the SBOM scanner reads, one function per format. Each
//! takes the bytes of one file (already size-capped by the caller) and returns the packages it
//! names; a file that does not parse names none. Image contents are untrusted: nothing here
//! panics or allocates beyond a small multiple of its input.

use super::{Ecosystem, Package};

/// The distribution a dpkg or apk database belongs to, from `/etc/os-release` (`ID=`,
/// `VERSION_ID=`), for the package URLs' namespace and `distro` qualifier.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Distro {
    pub(crate) id: Option<String>,
    pub(crate) version_id: Option<String>,
}

pub(crate) fn os_release(bytes: &[u8]) -> Distro {
    let text = String::from_utf8_lossy(bytes);
    let mut distro = Distro::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value
            .trim()
            .trim_matches(|c| c == '"' || c == '\'')
            .to_string();
        if value.is_empty() || value.len() > 64 {
            continue;
        }
        match key.trim() {
            "ID" => distro.id = Some(value.to_ascii_lowercase()),
            "VERSION_ID" => distro.version_id = Some(value),
            _ => {}
        }
    }
    distro
}

/// RFC 822-style paragraphs (dpkg's status database): blank-line separated, `Field: value`
/// lines, continuation lines starting with a space or tab (ignored: no field read here spans
/// lines).
fn paragraphs(text: &str) -> impl Iterator<Item = Vec<(&str, &str)>> {
    text.split("\n\n").map(|paragraph| {
        paragraph
            .lines()
            .filter(|line| !line.starts_with([' ', '\t']))
            .filter_map(|line| line.split_once(':'))
            .map(|(key, value)| (key.trim(), value.trim()))
            .collect()
    })
}

/// `var/lib/dpkg/status` (or a file of `var/lib/dpkg/status.d/`): installed packages only.
pub(crate) fn dpkg_status(bytes: &[u8]) -> Vec<Package> {
    let text = String::from_utf8_lossy(bytes).replace("\r\n", "\n");
    let mut packages = Vec::new();
    for fields in paragraphs(&text) {
        let get = |name: &str| {
            fields
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.to_string())
        };
        let (Some(name), Some(version)) = (get("Package"), get("Version")) else {
            continue;
        };
        // Absent in distroless's status.d files, which list installed packages only.
        if let Some(status) = get("Status")
            && status.split_whitespace().last() != Some("installed")
        {
            continue;
        }
        packages.push(Package {
            ecosystem: Ecosystem::Deb,
            name,
            version,
            arch: get("Architecture"),
            location: String::new(),
        });
    }
    packages
}

/// `lib/apk/db/installed`: `P:` name, `V:` version, `A:` arch, one record per blank-line
/// separated block.
pub(crate) fn apk_installed(bytes: &[u8]) -> Vec<Package> {
    let text = String::from_utf8_lossy(bytes).replace("\r\n", "\n");
    let mut packages = Vec::new();
    for block in text.split("\n\n") {
        let (mut name, mut version, mut arch) = (None, None, None);
        for line in block.lines() {
            match line.split_once(':') {
                Some(("P", value)) => name = Some(value.trim().to_string()),
                Some(("V", value)) => version = Some(value.trim().to_string()),
                Some(("A", value)) => arch = Some(value.trim().to_string()),
                _ => {}
            }
        }
        if let (Some(name), Some(version)) = (name, version)
            && !name.is_empty()
        {
            packages.push(Package {
                ecosystem: Ecosystem::Apk,
                name,
                version,
                arch,
                location: String::new(),
            });
        }
    }
    packages
}

/// A Python distribution's `*.dist-info/METADATA`: the `Name:` and `Version:` headers (the
/// headers end at the first blank line; the long description after it is not read).
pub(crate) fn python_metadata(bytes: &[u8]) -> Vec<Package> {
    let text = String::from_utf8_lossy(bytes);
    let (mut name, mut version) = (None, None);
    for line in text.lines() {
        if line.trim().is_empty() {
            break;
        }
        match line.split_once(':') {
            Some((key, value)) if key.eq_ignore_ascii_case("Name") => {
                name = Some(value.trim().to_string());
            }
            Some((key, value)) if key.eq_ignore_ascii_case("Version") => {
                version = Some(value.trim().to_string());
            }
            _ => {}
        }
    }
    match (name, version) {
        (Some(name), Some(version)) if !name.is_empty() => vec![Package {
            ecosystem: Ecosystem::PyPi,
            // PEP 503 normalization, as the purl spec asks for pypi names.
            name: normalize_python_name(&name),
            version,
            arch: None,
            location: String::new(),
        }],
        _ => Vec::new(),
    }
}

fn normalize_python_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut last_dash = false;
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !last_dash {
                out.push('-');
            }
            last_dash = true;
        } else {
            out.push(c.to_ascii_lowercase());
            last_dash = false;
        }
    }
    out
}

/// `node_modules/NAME/package.json` (or `node_modules/@SCOPE/NAME/package.json`): its `name`
/// and `version`.
pub(crate) fn npm_package_json(bytes: &[u8]) -> Vec<Package> {
    #[derive(serde::Deserialize)]
    struct Manifest {
        name: Option<String>,
        version: Option<String>,
    }
    match serde_json::from_slice::<Manifest>(bytes) {
        Ok(Manifest {
            name: Some(name),
            version: Some(version),
        }) if !name.is_empty() => vec![npm_package(name, version)],
        _ => Vec::new(),
    }
}

/// `package-lock.json` (lockfile versions 2 and 3: the `packages` map, keyed by install path;
/// version 1: the nested `dependencies` map). The root project (key `""`) is not a dependency.
pub(crate) fn npm_lock(bytes: &[u8]) -> Vec<Package> {
    #[derive(serde::Deserialize)]
    struct Lock {
        #[serde(default)]
        packages: std::collections::BTreeMap<String, Entry>,
        #[serde(default)]
        dependencies: std::collections::BTreeMap<String, Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        name: Option<String>,
        version: Option<String>,
        #[serde(default)]
        link: bool,
    }
    let Ok(lock) = serde_json::from_slice::<Lock>(bytes) else {
        return Vec::new();
    };
    let mut packages = Vec::new();
    if !lock.packages.is_empty() {
        for (path, entry) in lock.packages {
            let Some(installed) = path.rsplit_once("node_modules/").map(|(_, name)| name) else {
                continue;
            };
            if entry.link {
                continue;
            }
            let name = entry.name.unwrap_or_else(|| installed.to_string());
            if let Some(version) = entry.version
                && !name.is_empty()
            {
                packages.push(npm_package(name, version));
            }
        }
    } else {
        for (name, entry) in lock.dependencies {
            if let Some(version) = entry.version
                && !name.is_empty()
            {
                packages.push(npm_package(name, version));
            }
        }
    }
    packages
}

fn npm_package(name: String, version: String) -> Package {
    Package {
        ecosystem: Ecosystem::Npm,
        name,
        version,
        arch: None,
        location: String::new(),
    }
}

/// The modules a Go binary was built from, from its build information (`.go.buildinfo`, Go
/// 1.18 and later: the header's flags say the version and module strings are inline). The
/// main module (`mod`) and each dependency (`dep`, or its `=>` replacement) are packages;
/// the toolchain is one too (`stdlib`, as other scanners name it).
pub(crate) fn go_binary(elf: &[u8]) -> Vec<Package> {
    let Some(section) = elf_section(elf, ".go.buildinfo") else {
        return Vec::new();
    };
    const MAGIC: &[u8] = b"\xff Go buildinf:";
    if section.len() < 32 || !section.starts_with(MAGIC) {
        return Vec::new();
    }
    let flags = section[15];
    if flags & 0x2 == 0 {
        // Before Go 1.18 the strings are behind pointers into the data segment: not read.
        return Vec::new();
    }
    let mut rest = &section[32..];
    let Some(go_version) = read_varint_bytes(&mut rest) else {
        return Vec::new();
    };
    let go_version = String::from_utf8_lossy(go_version);
    let Some(modinfo) = read_varint_bytes(&mut rest) else {
        return Vec::new();
    };
    // The module information is framed by 16-byte sentinels (not UTF-8).
    let modinfo = if modinfo.len() >= 33 {
        String::from_utf8_lossy(&modinfo[16..modinfo.len() - 16])
    } else {
        "".into()
    };
    let mut packages = Vec::new();
    let go_version = go_version.trim_start_matches("go").to_string();
    if !go_version.is_empty() {
        packages.push(go_package("stdlib", &go_version));
    }
    let mut last_dep: Option<usize> = None;
    for line in modinfo.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        match fields.as_slice() {
            ["mod", path, version, ..] => {
                packages.push(go_package(path, version));
                last_dep = None;
            }
            ["dep", path, version, ..] => {
                packages.push(go_package(path, version));
                last_dep = Some(packages.len() - 1);
            }
            ["=>", path, version, ..] => {
                // The replacement is what was built.
                if let Some(index) = last_dep.take() {
                    packages[index] = go_package(path, version);
                }
            }
            _ => {}
        }
    }
    packages
}

fn go_package(path: &str, version: &str) -> Package {
    Package {
        ecosystem: Ecosystem::Golang,
        name: path.to_string(),
        version: version.to_string(),
        arch: None,
        location: String::new(),
    }
}

/// Bytes prefixed by their length as an unsigned LEB128 varint, as Go writes strings.
fn read_varint_bytes<'a>(input: &mut &'a [u8]) -> Option<&'a [u8]> {
    let mut length: u64 = 0;
    let mut shift = 0;
    loop {
        let (&byte, rest) = input.split_first()?;
        *input = rest;
        length |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 35 {
            return None;
        }
    }
    let length = usize::try_from(length).ok()?;
    if length > input.len() {
        return None;
    }
    let (bytes, rest) = input.split_at(length);
    *input = rest;
    Some(bytes)
}

/// The crates a Rust binary built with `cargo auditable` was built from (its `.dep-v0`
/// section, read by the `auditable-info` crate, decompressed JSON capped at 8 MiB).
pub(crate) fn rust_binary(elf: &[u8]) -> Vec<Package> {
    let Ok(info) = auditable_info::audit_info_from_slice(elf, 8 * 1024 * 1024) else {
        return Vec::new();
    };
    info.packages
        .into_iter()
        .filter(|package| package.kind == auditable_serde::DependencyKind::Runtime)
        .map(|package| Package {
            ecosystem: Ecosystem::Cargo,
            name: package.name,
            version: package.version.to_string(),
            arch: None,
            location: String::new(),
        })
        .collect()
}

/// The bytes of the ELF section `name`, 32- or 64-bit, either byte order.
fn elf_section<'a>(elf: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let range = match binfarce::detect_format(elf) {
        binfarce::Format::Elf64 { byte_order } => binfarce::elf64::parse(elf, byte_order)
            .ok()?
            .section_with_name(name)
            .ok()??
            .range()
            .ok()?,
        binfarce::Format::Elf32 { byte_order } => binfarce::elf32::parse(elf, byte_order)
            .ok()?
            .section_with_name(name)
            .ok()??
            .range()
            .ok()?,
        _ => return None,
    };
    elf.get(range)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_lists_installed_packages_only() {
        let status = b"Package: libc6\nStatus: install ok installed\nArchitecture: arm64\nVersion: 2.36-9\nDescription: GNU C\n multi-line\n\nPackage: gone\nStatus: deinstall ok config-files\nVersion: 1.0\n";
        let packages = dpkg_status(status);
        assert_eq!(packages.len(), 1);
        assert_eq!(packages[0].name, "libc6");
        assert_eq!(packages[0].version, "2.36-9");
        assert_eq!(packages[0].arch.as_deref(), Some("arm64"));
    }

    #[test]
    fn apk_records_are_read() {
        let db = b"C:Q1abc=\nP:musl\nV:1.2.4-r2\nA:x86_64\n\nP:busybox\nV:1.36.1-r5\nA:x86_64\n";
        let packages = apk_installed(db);
        let names: Vec<_> = packages.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["musl", "busybox"]);
    }

    #[test]
    fn python_names_are_normalized_and_the_body_is_not_read() {
        let metadata =
            b"Metadata-Version: 2.1\nName: Flask_Login\nVersion: 0.6.3\n\nName: not-this\n";
        let packages = python_metadata(metadata);
        assert_eq!(packages.len(), 1);
        assert_eq!(packages[0].name, "flask-login");
        assert_eq!(packages[0].version, "0.6.3");
    }

    #[test]
    fn npm_lockfiles_skip_the_root_and_links() {
        let lock = br#"{"lockfileVersion":3,"packages":{"":{"name":"app","version":"1.0.0"},
            "node_modules/left-pad":{"version":"1.3.0"},
            "node_modules/@scope/x":{"version":"2.0.0"},
            "node_modules/local":{"link":true}}}"#;
        let names: Vec<_> = npm_lock(lock)
            .into_iter()
            .map(|p| format!("{}@{}", p.name, p.version))
            .collect();
        assert_eq!(names, ["@scope/x@2.0.0", "left-pad@1.3.0"]);
    }

    #[test]
    fn varint_strings_are_bounded() {
        let mut input: &[u8] = &[0x05, b'a', b'b'];
        assert_eq!(read_varint_bytes(&mut input), None);
        let mut input: &[u8] = &[0x02, b'g', b'o', 0xff];
        assert_eq!(read_varint_bytes(&mut input), Some(&b"go"[..]));
        assert_eq!(input, [0xff]);
    }

    #[test]
    fn garbage_is_no_package() {
        for format in [
            dpkg_status,
            apk_installed,
            python_metadata,
            npm_lock,
            npm_package_json,
        ] {
            assert!(format(b"\xff\xfe\x00garbage").is_empty());
        }
        assert!(go_binary(b"\x7fELF\x02\x01\x01").is_empty());
        assert!(rust_binary(b"\x7fELF\x02\x01\x01").is_empty());
    }
}
