//! Layers from overlay upper directories: determinism, the tar that comes out (read back with
//! the `tar` crate), and the round trip through `unpack_layer` (whiteouts and opaque
//! directories both ways).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use graphbuild_engine::digest::Digest;
use graphbuild_engine::layer::{Compression, LayerOptions, write_layer_from_upper};
use graphbuild_engine::unpack::unpack_layer;

mod common;
use common::require_root;

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let path_c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let name_c = CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated strings and a valid buffer.
    let result = unsafe {
        libc::lsetxattr(
            path_c.as_ptr(),
            name_c.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        result,
        0,
        "setxattr {name} on {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let path_c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let name_c = CString::new(name).unwrap();
    let mut buffer = vec![0u8; 4096];
    // SAFETY: valid NUL-terminated strings and a valid buffer.
    let got = unsafe {
        libc::lgetxattr(
            path_c.as_ptr(),
            name_c.as_ptr(),
            buffer.as_mut_ptr().cast(),
            buffer.len(),
        )
    };
    if got < 0 {
        return None;
    }
    buffer.truncate(got as usize);
    Some(buffer)
}

fn set_mtime(path: &Path, seconds: i64) {
    let time = nix::sys::time::TimeSpec::new(seconds, 0);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &time,
        &time,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
}

const LONG_DIRECTORY: &str =
    "a-directory-with-a-rather-long-name-to-push-the-path-past-one-hundred-bytes";

/// An upper directory as overlayfs leaves it after a `run` step. `reverse` creates the entries
/// in the opposite order (so directory order on disk differs), `mtime` is stamped everywhere.
fn make_upper(root: &Path, reverse: bool, mtime: i64) {
    type Step = Box<dyn Fn(&Path)>;
    let mut steps: Vec<Step> = vec![
        Box::new(|root| {
            fs::create_dir_all(root.join("etc")).unwrap();
            fs::write(root.join("etc/config"), b"key = value\n").unwrap();
        }),
        Box::new(|root| {
            fs::create_dir_all(root.join("usr/bin")).unwrap();
            fs::write(root.join("usr/bin/tool"), vec![7u8; 200_000]).unwrap();
            fs::set_permissions(
                root.join("usr/bin/tool"),
                fs::Permissions::from_mode(0o4755),
            )
            .unwrap();
            fs::hard_link(root.join("usr/bin/tool"), root.join("usr/bin/tool-alias")).unwrap();
            set_xattr(&root.join("usr/bin/tool"), "user.graphbuild.test", b"kept");
        }),
        Box::new(|root| {
            fs::create_dir_all(root.join("bin")).unwrap();
            std::os::unix::fs::symlink("/usr/bin/tool", root.join("bin/tool")).unwrap();
        }),
        Box::new(|root| {
            let long = root
                .join(LONG_DIRECTORY)
                .join("and-a-file-inside-it-with-a-long-name-too.txt");
            fs::create_dir_all(long.parent().unwrap()).unwrap();
            fs::write(&long, b"long\n").unwrap();
        }),
        Box::new(|root| {
            // A deletion of /deleted and an opaque /opaque holding one new file.
            nix::sys::stat::mknod(
                &root.join("deleted"),
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::empty(),
                nix::sys::stat::makedev(0, 0),
            )
            .unwrap();
            fs::create_dir_all(root.join("opaque")).unwrap();
            fs::write(root.join("opaque/new"), b"new\n").unwrap();
            set_xattr(&root.join("opaque"), "trusted.overlay.opaque", b"y");
            // Other overlay bookkeeping must not leak into the layer.
            fs::create_dir_all(root.join("etc")).unwrap();
            set_xattr(&root.join("etc"), "trusted.overlay.impure", b"y");
        }),
    ];
    if reverse {
        steps.reverse();
    }
    fs::create_dir_all(root).unwrap();
    for step in &steps {
        step(root);
    }
    for entry in walkdir::WalkDir::new(root)
        .min_depth(1)
        .contents_first(true)
    {
        set_mtime(entry.unwrap().path(), mtime);
    }
}

fn tar_bytes(blob: &Path, compression: Compression) -> Vec<u8> {
    let raw = fs::read(blob).unwrap();
    let mut out = Vec::new();
    match compression {
        Compression::Gzip => {
            flate2::read::GzDecoder::new(raw.as_slice())
                .read_to_end(&mut out)
                .unwrap();
        }
        Compression::Zstd => {
            ruzstd::decoding::StreamingDecoder::new(raw.as_slice())
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
        }
        Compression::None => out = raw,
    }
    out
}

#[derive(Debug)]
struct TarEntry {
    kind: tar::EntryType,
    mode: u32,
    uid: u64,
    mtime: u64,
    link: Option<String>,
    size: u64,
    username_empty: bool,
    xattrs: BTreeMap<String, Vec<u8>>,
}

fn read_tar(bytes: &[u8]) -> Vec<(String, TarEntry)> {
    let mut archive = tar::Archive::new(bytes);
    let mut entries = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let mut xattrs = BTreeMap::new();
        if let Some(extensions) = entry.pax_extensions().unwrap() {
            for extension in extensions {
                let extension = extension.unwrap();
                if let Some(name) = extension.key().unwrap().strip_prefix("SCHILY.xattr.") {
                    xattrs.insert(name.to_string(), extension.value_bytes().to_vec());
                }
            }
        }
        let header = entry.header();
        let path = String::from_utf8(entry.path_bytes().into_owned()).unwrap();
        entries.push((
            path,
            TarEntry {
                kind: header.entry_type(),
                mode: header.mode().unwrap(),
                uid: header.uid().unwrap(),
                mtime: header.mtime().unwrap(),
                link: entry
                    .link_name()
                    .unwrap()
                    .map(|link| link.to_string_lossy().into_owned()),
                size: header.size().unwrap(),
                username_empty: header.username_bytes().is_none_or(<[u8]>::is_empty),
                xattrs,
            },
        ));
    }
    entries
}

#[test]
fn same_tree_gives_the_same_digests_whatever_the_mtimes_and_creation_order() {
    if !require_root("whiteouts and trusted xattrs") {
        return;
    }
    for compression in [Compression::Gzip, Compression::Zstd, Compression::None] {
        let first = tempfile::tempdir().unwrap();
        let second = tempfile::tempdir().unwrap();
        make_upper(&first.path().join("upper"), false, 1_700_000_000);
        make_upper(&second.path().join("upper"), true, 1_800_000_000);
        let options = LayerOptions {
            source_date_epoch: 0,
            compression,
        };
        let a = write_layer_from_upper(
            &first.path().join("upper"),
            &first.path().join("out"),
            &options,
        )
        .unwrap()
        .unwrap();
        let b = write_layer_from_upper(
            &second.path().join("upper"),
            &second.path().join("out"),
            &options,
        )
        .unwrap()
        .unwrap();
        assert_eq!(a.digest, b.digest, "{compression:?}");
        assert_eq!(a.diff_id, b.diff_id, "{compression:?}");
        assert_eq!(a.size, b.size);
        // The recorded values are the real ones.
        let blob = fs::read(&a.path).unwrap();
        assert_eq!(Digest::of(&blob), a.digest);
        assert_eq!(blob.len() as u64, a.size);
        assert_eq!(a.path, first.path().join("out").join(a.digest.hex()));
        assert_eq!(Digest::of(&tar_bytes(&a.path, compression)), a.diff_id);
        assert_eq!(a.media_type, compression.media_type());
        if compression == Compression::None {
            assert_eq!(a.digest, a.diff_id);
        } else {
            assert_ne!(a.digest, a.diff_id);
        }
        // Nothing but the blob is left in the output directory.
        let left: Vec<_> = fs::read_dir(first.path().join("out"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from(a.digest.hex())]);
    }
}

#[test]
fn a_different_epoch_or_content_changes_the_digest() {
    let dir = tempfile::tempdir().unwrap();
    let upper = dir.path().join("upper");
    fs::create_dir_all(&upper).unwrap();
    fs::write(upper.join("file"), b"one").unwrap();
    set_mtime(&upper.join("file"), 5_000);
    let layer = |epoch: i64| {
        let options = LayerOptions {
            source_date_epoch: epoch,
            compression: Compression::Gzip,
        };
        write_layer_from_upper(&upper, &dir.path().join("out"), &options)
            .unwrap()
            .unwrap()
    };
    let at_zero = layer(0);
    let at_later = layer(10_000);
    assert_ne!(at_zero.digest, at_later.digest);
    // mtime 5000 is kept under epoch 10000 and clamped to 0 under epoch 0.
    let entries = read_tar(&tar_bytes(&at_later.path, Compression::Gzip));
    assert_eq!(entries[0].1.mtime, 5_000);
    let entries = read_tar(&tar_bytes(&at_zero.path, Compression::Gzip));
    assert_eq!(entries[0].1.mtime, 0);
    fs::write(upper.join("file"), b"two").unwrap();
    set_mtime(&upper.join("file"), 5_000);
    assert_ne!(layer(0).digest, at_zero.digest);
}

#[test]
fn an_empty_upper_directory_gives_no_layer() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("upper")).unwrap();
    let result = write_layer_from_upper(
        &dir.path().join("upper"),
        &dir.path().join("out"),
        &LayerOptions::default(),
    )
    .unwrap();
    assert!(result.is_none());
}

#[test]
fn the_tar_is_sorted_pax_numeric_and_speaks_oci_whiteouts() {
    if !require_root("whiteouts and trusted xattrs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    make_upper(&dir.path().join("upper"), false, 1_700_000_000);
    fs::write(dir.path().join("upper/etc/owned"), b"x").unwrap();
    std::os::unix::fs::lchown(
        dir.path().join("upper/etc/owned"),
        Some(3_000_000),
        Some(1234),
    )
    .unwrap();
    let options = LayerOptions {
        source_date_epoch: 1_000,
        compression: Compression::Gzip,
    };
    let layer =
        write_layer_from_upper(&dir.path().join("upper"), &dir.path().join("out"), &options)
            .unwrap()
            .unwrap();
    let entries = read_tar(&tar_bytes(&layer.path, Compression::Gzip));
    let names: Vec<&str> = entries.iter().map(|(name, _)| name.as_str()).collect();
    let long_file = format!("{LONG_DIRECTORY}/and-a-file-inside-it-with-a-long-name-too.txt");
    let long_directory = format!("{LONG_DIRECTORY}/");
    assert_eq!(
        names,
        vec![
            ".wh.deleted",
            long_directory.as_str(),
            long_file.as_str(),
            "bin/",
            "bin/tool",
            "etc/",
            "etc/config",
            "etc/owned",
            "opaque/",
            "opaque/.wh..wh..opq",
            "opaque/new",
            "usr/",
            "usr/bin/",
            "usr/bin/tool",
            "usr/bin/tool-alias",
        ]
    );
    assert!(long_file.len() > 100);
    let by_name: BTreeMap<&str, &TarEntry> = entries
        .iter()
        .map(|(name, entry)| (name.as_str(), entry))
        .collect();
    for entry in by_name.values() {
        assert!(entry.username_empty, "no user names: {entry:?}");
        assert!(entry.mtime <= 1_000, "mtimes clamped: {entry:?}");
        assert!(
            !entry.xattrs.keys().any(|name| name.contains("overlay")),
            "no overlay xattrs: {entry:?}"
        );
    }
    assert_eq!(by_name[".wh.deleted"].kind, tar::EntryType::Regular);
    assert_eq!(by_name[".wh.deleted"].size, 0);
    assert_eq!(by_name["opaque/.wh..wh..opq"].kind, tar::EntryType::Regular);
    assert_eq!(by_name["bin/tool"].kind, tar::EntryType::Symlink);
    assert_eq!(by_name["bin/tool"].link.as_deref(), Some("/usr/bin/tool"));
    let tool = by_name["usr/bin/tool"];
    assert_eq!(tool.kind, tar::EntryType::Regular);
    assert_eq!(tool.size, 200_000);
    assert_eq!(tool.mode, 0o4755);
    assert_eq!(tool.mtime, 1_000);
    assert_eq!(
        tool.xattrs.get("user.graphbuild.test").map(Vec::as_slice),
        Some(&b"kept"[..])
    );
    let alias = by_name["usr/bin/tool-alias"];
    assert_eq!(alias.kind, tar::EntryType::Link);
    assert_eq!(alias.link.as_deref(), Some("usr/bin/tool"));
    assert_eq!(by_name["etc/owned"].uid, 3_000_000, "large uid through PAX");
    assert_eq!(by_name["usr/"].kind, tar::EntryType::Directory);
}

#[test]
fn whiteouts_and_opaque_directories_survive_the_round_trip() {
    if !require_root("whiteouts and trusted xattrs") {
        return;
    }
    for compression in [Compression::Gzip, Compression::Zstd, Compression::None] {
        let dir = tempfile::tempdir().unwrap();
        make_upper(&dir.path().join("upper"), false, 1_700_000_000);
        let options = LayerOptions {
            source_date_epoch: 1_600_000_000,
            compression,
        };
        let layer =
            write_layer_from_upper(&dir.path().join("upper"), &dir.path().join("out"), &options)
                .unwrap()
                .unwrap();
        let snapshot = dir.path().join("snapshot");
        fs::create_dir(&snapshot).unwrap();
        let stats = unpack_layer(fs::File::open(&layer.path).unwrap(), &snapshot).unwrap();
        assert_eq!(stats.whiteouts, 1);
        assert_eq!(stats.opaque_directories, 1);
        assert_eq!(stats.hardlinks, 1);
        assert_eq!(stats.symlinks, 1);

        let deleted = fs::symlink_metadata(snapshot.join("deleted")).unwrap();
        assert!(deleted.file_type().is_char_device());
        assert_eq!(deleted.rdev(), 0);
        assert!(!snapshot.join(".wh.deleted").exists());
        assert_eq!(
            get_xattr(&snapshot.join("opaque"), "trusted.overlay.opaque").as_deref(),
            Some(&b"y"[..])
        );
        assert!(!snapshot.join("opaque/.wh..wh..opq").exists());
        assert_eq!(
            get_xattr(&snapshot.join("etc"), "trusted.overlay.impure"),
            None
        );
        assert_eq!(fs::read(snapshot.join("opaque/new")).unwrap(), b"new\n");
        assert_eq!(
            fs::read(snapshot.join("etc/config")).unwrap(),
            b"key = value\n"
        );
        assert_eq!(
            fs::read_link(snapshot.join("bin/tool")).unwrap(),
            Path::new("/usr/bin/tool")
        );
        let tool = fs::metadata(snapshot.join("usr/bin/tool")).unwrap();
        let alias = fs::metadata(snapshot.join("usr/bin/tool-alias")).unwrap();
        assert_eq!(tool.ino(), alias.ino());
        assert_eq!(tool.mode() & 0o7777, 0o4755);
        assert_eq!(tool.len(), 200_000);
        assert_eq!(tool.mtime(), 1_600_000_000);
        assert_eq!(
            fs::metadata(snapshot.join("usr")).unwrap().mtime(),
            1_600_000_000,
            "directory times set last"
        );
        assert_eq!(
            get_xattr(&snapshot.join("usr/bin/tool"), "user.graphbuild.test").as_deref(),
            Some(&b"kept"[..])
        );
        let long_file = snapshot
            .join(LONG_DIRECTORY)
            .join("and-a-file-inside-it-with-a-long-name-too.txt");
        assert_eq!(fs::read(long_file).unwrap(), b"long\n");

        // And back again: the snapshot is an upper directory of the same change.
        let again = write_layer_from_upper(&snapshot, &dir.path().join("out2"), &options)
            .unwrap()
            .unwrap();
        assert_eq!(
            again.diff_id, layer.diff_id,
            "{compression:?}: unpack then repack is the identity"
        );
        assert_eq!(again.digest, layer.digest);
    }
}

#[test]
fn overlay_metacopy_is_refused() {
    if !require_root("trusted xattrs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let upper = dir.path().join("upper");
    fs::create_dir_all(&upper).unwrap();
    fs::write(upper.join("file"), b"").unwrap();
    set_xattr(&upper.join("file"), "trusted.overlay.metacopy", b"");
    let error = write_layer_from_upper(&upper, &dir.path().join("out"), &LayerOptions::default())
        .unwrap_err();
    assert!(
        error.to_string().contains("trusted.overlay.metacopy"),
        "{error}"
    );
}
