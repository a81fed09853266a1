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

// ---------------------------------------------------------------------------------------------
// Integrity and bounded resources (issue 11)

use graphbuild_engine::digest::Digest;
use graphbuild_engine::unpack::{LayerCheck, unpack_layer_checked, verify_layer};

fn check(digest: Option<Digest>, diff_id: Option<Digest>, max_bytes: u64) -> LayerCheck {
    LayerCheck {
        digest,
        diff_id,
        max_bytes,
    }
}

#[test]
fn a_layer_whose_content_is_not_its_diff_id_is_refused() {
    let sandbox = sandbox();
    let tar = craft(&[Crafted::File("POISONED", b"owned")]);
    let blob = gzip(&tar);
    let claimed = Digest::of(b"busybox's real layer");
    let error = unpack_layer_checked(
        blob.as_slice(),
        &sandbox.dest,
        &check(Some(Digest::of(&blob)), Some(claimed), 1 << 30),
    )
    .unwrap_err();
    match &error {
        UnpackError::DiffIdMismatch { expected, actual } => {
            assert_eq!(*expected, claimed);
            assert_eq!(*actual, Digest::of(&tar));
        }
        other => panic!("{other:?}"),
    }
    assert!(error.to_string().contains("diff_id"), "{error}");
    let error = verify_layer(
        blob.as_slice(),
        &check(Some(Digest::of(&blob)), Some(claimed), 1 << 30),
    )
    .unwrap_err();
    assert!(
        matches!(error, UnpackError::DiffIdMismatch { .. }),
        "{error:?}"
    );

    // The right claims pass, and the digests are reported.
    let stats = verify_layer(
        blob.as_slice(),
        &check(Some(Digest::of(&blob)), Some(Digest::of(&tar)), 1 << 30),
    )
    .unwrap();
    assert_eq!(stats.diff_id, Some(Digest::of(&tar)));
    assert_eq!(stats.digest, Some(Digest::of(&blob)));
}

#[test]
fn data_after_the_end_of_archive_is_part_of_the_diff_id() {
    let sandbox = sandbox();
    let mut tar = craft(&[Crafted::File("file", b"content")]);
    let clean = Digest::of(&tar);
    tar.extend_from_slice(b"trailing bytes a reader that stops at the end marker never sees");
    let blob = gzip(&tar);
    let error = unpack_layer_checked(
        blob.as_slice(),
        &sandbox.dest,
        &check(None, Some(clean), 1 << 30),
    )
    .unwrap_err();
    assert!(
        matches!(error, UnpackError::DiffIdMismatch { .. }),
        "{error:?}"
    );
    let stats = unpack_layer_checked(
        blob.as_slice(),
        &sandbox.root.join("again"),
        &check(None, Some(Digest::of(&tar)), 1 << 30),
    )
    .unwrap();
    assert_eq!(stats.diff_id, Some(Digest::of(&tar)));
}

#[test]
fn a_corrupt_blob_is_reported_as_such_whatever_the_tar_reader_says() {
    let sandbox = sandbox();
    let tar = craft(&[Crafted::File("file", &[7u8; 10_000])]);
    let blob = gzip(&tar);
    let mut corrupt = blob.clone();
    let middle = corrupt.len() / 2;
    corrupt[middle] ^= 0xff;
    let error = unpack_layer_checked(
        corrupt.as_slice(),
        &sandbox.dest,
        &check(Some(Digest::of(&blob)), Some(Digest::of(&tar)), 1 << 30),
    )
    .unwrap_err();
    assert!(
        matches!(error, UnpackError::DigestMismatch { expected, .. } if expected == Digest::of(&blob)),
        "{error:?}"
    );
}

/// Bytes allocated on disk under `dir`.
fn allocated(dir: &Path) -> u64 {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .map(|entry| entry.unwrap().metadata().unwrap().blocks() * 512)
        .sum()
}

#[test]
fn a_gzip_bomb_stops_at_the_layer_cap() {
    let sandbox = sandbox();
    let size = 64u64 << 20;
    let mut header = tar::Header::new_ustar();
    header.set_path("bomb").unwrap();
    header.set_size(size);
    header.set_mode(0o644);
    header.set_cksum();
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(header.as_bytes()).unwrap();
    let chunk = vec![b'A'; 1 << 20];
    for _ in 0..(size >> 20) {
        encoder.write_all(&chunk).unwrap();
    }
    encoder.write_all(&[0u8; 1024]).unwrap();
    let bomb = encoder.finish().unwrap();
    assert!(bomb.len() < 1 << 20, "{}", bomb.len());
    let limit = 8u64 << 20;
    let error = unpack_layer_checked(bomb.as_slice(), &sandbox.dest, &check(None, None, limit))
        .unwrap_err();
    assert!(
        matches!(error, UnpackError::TooLarge { limit: l } if l == limit),
        "{error:?}"
    );
    assert!(error.to_string().contains("limit per layer"), "{error}");
    assert!(allocated(&sandbox.dest) <= limit + (1 << 20));
}

fn octal(field: &mut [u8; 12], value: u64) {
    let text = format!("{value:011o}");
    field[..11].copy_from_slice(text.as_bytes());
    field[11] = 0;
}

/// A GNU sparse entry `name` of `real_size` bytes: a hole, then 512 bytes of `x` at the end.
fn sparse_layer(name: &str, real_size: u64) -> Vec<u8> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::GNUSparse);
    header.set_path(name).unwrap();
    header.set_size(512);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    {
        let gnu = header.as_gnu_mut().unwrap();
        octal(&mut gnu.sparse[0].offset, real_size - 512);
        octal(&mut gnu.sparse[0].numbytes, 512);
        octal(&mut gnu.realsize, real_size);
    }
    header.set_cksum();
    let mut tar = header.as_bytes().to_vec();
    tar.extend_from_slice(&[b'x'; 512]);
    tar.extend_from_slice(&[0u8; 1024]);
    tar
}

#[test]
fn a_sparse_bomb_stops_at_the_layer_cap_before_writing() {
    let sandbox = sandbox();
    let layer = gzip(&sparse_layer("huge", (1 << 33) - 512));
    assert!(layer.len() < 1024);
    let started = std::time::Instant::now();
    let error = unpack_layer_checked(layer.as_slice(), &sandbox.dest, &check(None, None, 1 << 30))
        .unwrap_err();
    assert!(matches!(error, UnpackError::TooLarge { .. }), "{error:?}");
    assert!(started.elapsed().as_secs() < 5, "{:?}", started.elapsed());
    assert!(!sandbox.dest.join("huge").exists());
}

#[test]
fn a_sparse_file_unpacks_as_holes() {
    let sandbox = sandbox();
    let real_size = 256u64 << 20;
    let tar = sparse_layer("sparse", real_size);
    let stats = unpack_layer_checked(
        gzip(&tar).as_slice(),
        &sandbox.dest,
        &check(None, Some(Digest::of(&tar)), 1 << 30),
    )
    .unwrap();
    assert_eq!(stats.files, 1);
    let path = sandbox.dest.join("sparse");
    let metadata = fs::metadata(&path).unwrap();
    assert_eq!(metadata.len(), real_size);
    assert!(
        metadata.blocks() * 512 < 1 << 20,
        "{} bytes allocated for a file of 512 data bytes",
        metadata.blocks() * 512
    );
    let mut file = fs::File::open(&path).unwrap();
    use std::io::{Read, Seek, SeekFrom};
    let mut tail = Vec::new();
    file.seek(SeekFrom::Start(real_size - 1024)).unwrap();
    file.read_to_end(&mut tail).unwrap();
    assert_eq!(&tail[..512], &[0u8; 512][..]);
    assert_eq!(&tail[512..], &[b'x'; 512][..]);
}
