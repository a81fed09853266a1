//! Crafted layers that try to write outside the snapshot directory (issue 3, item 9). Each one
//! must fail with an error naming the entry, and nothing may appear outside `dest`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use graphbuild_engine::unpack::{UnpackError, unpack_layer};

/// One crafted tar entry. Names are written raw into the header, so `..` and `/` survive.
enum Crafted<'a> {
    File(&'a str, &'a [u8]),
    Directory(&'a str),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
}

fn craft(entries: &[Crafted<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_ustar();
        let (name, kind, link, data): (&str, tar::EntryType, Option<&str>, &[u8]) = match entry {
            Crafted::File(name, data) => (name, tar::EntryType::Regular, None, *data),
            Crafted::Directory(name) => (name, tar::EntryType::Directory, None, b""),
            Crafted::Symlink(name, target) => (name, tar::EntryType::Symlink, Some(target), b""),
            Crafted::HardLink(name, target) => (name, tar::EntryType::Link, Some(target), b""),
        };
        header.set_entry_type(kind);
        let ustar = header.as_ustar_mut().unwrap();
        ustar.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(link) = link {
            ustar.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        header.set_size(data.len() as u64);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_cksum();
        builder.append(&header, data).unwrap();
    }
    builder.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

struct Sandbox {
    _temporary: tempfile::TempDir,
    root: PathBuf,
    dest: PathBuf,
    outside: PathBuf,
}

fn sandbox() -> Sandbox {
    let temporary = tempfile::tempdir().unwrap();
    // Deep enough that `../../..` from dest stays inside the temporary directory.
    let root = temporary.path().join("a/b/c");
    let dest = root.join("dest");
    let outside = root.join("outside");
    fs::create_dir_all(&dest).unwrap();
    fs::create_dir_all(&outside).unwrap();
    Sandbox {
        _temporary: temporary,
        root,
        dest,
        outside,
    }
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = walkdir::WalkDir::new(dir)
        .min_depth(1)
        .into_iter()
        .map(|entry| {
            entry
                .unwrap()
                .path()
                .strip_prefix(dir)
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    names.sort();
    names
}

/// Unpacks `layer`; expects an `Unsafe` error naming `entry`, nothing written outside `dest`,
/// and no `evil` file anywhere under the sandbox's root.
fn assert_refused(entries: &[Crafted<'_>], entry: &str) {
    let sandbox = sandbox();
    let layer = gzip(&craft(entries));
    let error =
        unpack_layer(layer.as_slice(), &sandbox.dest).expect_err("the layer must be refused");
    match &error {
        UnpackError::Unsafe { entry: named, .. } => assert_eq!(named, entry, "{error}"),
        other => panic!("expected an unsafe-entry error for `{entry}`, got {other:?}"),
    }
    let message = error.to_string();
    assert!(message.contains(entry), "{message}");
    assert!(message.contains("malicious or corrupt"), "{message}");
    assert!(
        listing(&sandbox.outside).is_empty(),
        "written outside: {:?}",
        listing(&sandbox.outside)
    );
    let top: Vec<String> = listing(&sandbox.root)
        .into_iter()
        .filter(|name| !name.starts_with("dest"))
        .collect();
    assert_eq!(top, vec!["outside".to_string()]);
    let ancestors_clean = sandbox
        .root
        .ancestors()
        .take(4)
        .all(|dir| !dir.join("evil").exists());
    assert!(ancestors_clean, "an `evil` file escaped");
}

#[test]
fn parent_dir_components_are_refused() {
    assert_refused(&[Crafted::File("../evil", b"x")], "../evil");
    assert_refused(&[Crafted::File("ok/../../evil", b"x")], "ok/../../evil");
    assert_refused(&[Crafted::Symlink("../evil", "/etc/passwd")], "../evil");
    assert_refused(&[Crafted::Directory("../evil/")], "../evil/");
}

#[test]
fn absolute_paths_land_inside_dest() {
    let sandbox = sandbox();
    let unique = format!("graphbuild-test-{}", std::process::id());
    let name = format!("/{unique}/evil");
    let layer = craft(&[Crafted::File(&name, b"inside")]);
    unpack_layer(layer.as_slice(), &sandbox.dest).unwrap();
    assert!(!Path::new(&name).exists());
    assert_eq!(
        fs::read(sandbox.dest.join(&unique).join("evil")).unwrap(),
        b"inside"
    );
}

#[test]
fn an_absolute_symlink_is_never_followed() {
    let sandbox = sandbox();
    let target = sandbox.outside.display().to_string();
    let layer = gzip(&craft(&[
        Crafted::Symlink("link", &target),
        Crafted::File("link/evil", b"x"),
    ]));
    let error = unpack_layer(layer.as_slice(), &sandbox.dest).unwrap_err();
    assert!(error.to_string().contains("`link/evil`"), "{error}");
    assert!(error.to_string().contains("symlink"), "{error}");
    assert!(listing(&sandbox.outside).is_empty());
    // The symlink itself was created, as data, pointing where it said.
    assert_eq!(
        fs::read_link(sandbox.dest.join("link")).unwrap(),
        sandbox.outside
    );

    assert_refused(
        &[
            Crafted::Symlink("link", "/tmp"),
            Crafted::File("link/evil", b"x"),
        ],
        "link/evil",
    );
    assert_refused(
        &[
            Crafted::Symlink("link", "/"),
            Crafted::Directory("link/etc/"),
            Crafted::File("link/etc/evil", b"x"),
        ],
        "link/etc/",
    );
}

#[test]
fn a_relative_symlink_out_is_never_followed() {
    assert_refused(
        &[
            Crafted::Symlink("link", "../../.."),
            Crafted::File("link/evil", b"x"),
        ],
        "link/evil",
    );
    assert_refused(
        &[
            Crafted::Symlink("link", ".."),
            Crafted::File("link/outside/evil", b"x"),
        ],
        "link/outside/evil",
    );
    // Through a deeper directory, and with the symlink created by a directory being replaced.
    assert_refused(
        &[
            Crafted::Directory("usr/"),
            Crafted::Directory("usr/lib/"),
            Crafted::Symlink("usr/lib", "../../outside"),
            Crafted::File("usr/lib/evil", b"x"),
        ],
        "usr/lib/evil",
    );
}

#[test]
fn hard_links_out_of_the_layer_are_refused() {
    let passwd_links = fs::metadata("/etc/passwd")
        .map(|metadata| metadata.nlink())
        .ok();
    assert_refused(&[Crafted::HardLink("passwd", "/etc/passwd")], "passwd");
    assert_refused(
        &[Crafted::HardLink(
            "passwd",
            "../../../../../../../../etc/passwd",
        )],
        "passwd",
    );
    assert_refused(&[Crafted::HardLink("evil", "../outside/secret")], "evil");
    assert_eq!(
        fs::metadata("/etc/passwd")
            .map(|metadata| metadata.nlink())
            .ok(),
        passwd_links
    );

    // A file that was in the layer, whose directory is later replaced by a symlink out.
    assert_refused(
        &[
            Crafted::Directory("dir/"),
            Crafted::File("dir/secret", b"s"),
            Crafted::Symlink("dir", "../outside"),
            Crafted::HardLink("evil", "dir/secret"),
        ],
        "evil",
    );
}

#[test]
fn hard_links_inside_the_layer_work() {
    let sandbox = sandbox();
    let layer = craft(&[
        Crafted::File("data", b"shared"),
        Crafted::HardLink("alias", "data"),
        Crafted::HardLink("again", "/data"),
    ]);
    let stats = unpack_layer(layer.as_slice(), &sandbox.dest).unwrap();
    assert_eq!(stats.hardlinks, 2);
    let inode = fs::metadata(sandbox.dest.join("data")).unwrap().ino();
    assert_eq!(
        fs::metadata(sandbox.dest.join("alias")).unwrap().ino(),
        inode
    );
    assert_eq!(
        fs::metadata(sandbox.dest.join("again")).unwrap().ino(),
        inode
    );
}

#[test]
fn symlinked_parents_are_refused() {
    let sandbox = sandbox();
    // A snapshot directory that already has a symlink (from a previous entry in this layer).
    let target = sandbox.outside.display().to_string();
    let layer = craft(&[
        Crafted::Symlink("etc", &target),
        Crafted::Directory("etc/cron.d/"),
        Crafted::File("etc/cron.d/evil", b"x"),
    ]);
    let error = unpack_layer(layer.as_slice(), &sandbox.dest).unwrap_err();
    assert!(error.to_string().contains("`etc/cron.d/`"), "{error}");
    assert!(
        error
            .to_string()
            .contains("goes through `etc`, which is a symlink"),
        "{error}"
    );
    assert!(listing(&sandbox.outside).is_empty());
}

#[test]
fn whiteouts_cannot_escape() {
    // `.wh...` would whiteout `..`, i.e. remove the parent.
    assert_refused(&[Crafted::File("dir/.wh...", b"")], "dir/.wh...");
    assert_refused(&[Crafted::File("../.wh.outside", b"")], "../.wh.outside");
    let sandbox = sandbox();
    let target = sandbox.outside.display().to_string();
    fs::write(sandbox.outside.join("keep"), b"k").unwrap();
    let layer = craft(&[
        Crafted::Symlink("link", &target),
        Crafted::File("link/.wh.keep", b""),
    ]);
    unpack_layer(layer.as_slice(), &sandbox.dest).unwrap_err();
    assert_eq!(fs::read(sandbox.outside.join("keep")).unwrap(), b"k");
}

#[test]
fn a_later_entry_replaces_a_symlink_instead_of_writing_through_it() {
    let sandbox = sandbox();
    fs::write(sandbox.outside.join("target"), b"original").unwrap();
    let target = sandbox.outside.join("target").display().to_string();
    let layer = craft(&[
        Crafted::Symlink("file", &target),
        Crafted::File("file", b"replaced"),
    ]);
    unpack_layer(layer.as_slice(), &sandbox.dest).unwrap();
    assert_eq!(
        fs::read(sandbox.outside.join("target")).unwrap(),
        b"original"
    );
    assert_eq!(fs::read(sandbox.dest.join("file")).unwrap(), b"replaced");
    assert!(
        !fs::symlink_metadata(sandbox.dest.join("file"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[test]
fn garbage_is_reported_as_corrupt() {
    let sandbox = sandbox();
    let mut garbage = vec![0x1f, 0x8b];
    garbage.extend_from_slice(&[0x55; 600]);
    let error = unpack_layer(garbage.as_slice(), &sandbox.dest).unwrap_err();
    assert!(matches!(error, UnpackError::Corrupt { .. }), "{error:?}");
    assert!(
        error.to_string().contains("malicious or corrupt"),
        "{error}"
    );

    let mut truncated = gzip(&craft(&[Crafted::File("big", &[9u8; 100_000])]));
    truncated.truncate(truncated.len() / 2);
    let error = unpack_layer(truncated.as_slice(), &sandbox.dest).unwrap_err();
    assert!(matches!(error, UnpackError::Corrupt { .. }), "{error:?}");
}
