//! `COPY` flags: symbolic `--chmod` (KDL `chmod="u+x"`), `--exclude` with `--from`, and
//! `--parents`, built for linux/amd64 and linux/arm64 on the busybox fixture; modes and files
//! checked in the exported filesystems, keys by what runs again.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

use common::*;

fn executed(output: &Output) -> usize {
    steps(output)
        .into_iter()
        .filter(|(_, _, _, status)| status == "executed")
        .count()
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Every path under `root`, relative, sorted.
fn listing(root: &Path) -> Vec<String> {
    let mut paths = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            paths.push(
                path.strip_prefix(root)
                    .expect("under root")
                    .display()
                    .to_string(),
            );
            if path.is_dir() && !path.is_symlink() {
                stack.push(path);
            }
        }
    }
    paths.sort();
    paths
}

fn context(sandbox: &Sandbox) {
    sandbox.write("ctx/src/a.sh", "a\n");
    sandbox.write("ctx/src/sub/b.txt", "b\n");
    sandbox.write("ctx/src/README.md", "md\n");
    for (path, mode) in [
        ("ctx/src/a.sh", 0o664),
        ("ctx/src/sub/b.txt", 0o640),
        ("ctx/src/sub", 0o750),
        ("ctx/src/README.md", 0o644),
    ] {
        std::fs::set_permissions(
            sandbox.path().join(path),
            std::fs::Permissions::from_mode(mode),
        )
        .expect("chmod");
    }
}

const STAGE: &str = "mkdir -p /out/keep /out/skip && echo k > /out/keep/k.txt && echo s > /out/skip/s.txt && echo n > /out/notes.md && chmod 600 /out/notes.md && chmod 700 /out/keep";

#[test]
fn symbolic_chmod_applies_to_each_entry_as_chmod_would() {
    if !root_and_qemu() {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.busybox("fixtures/busybox");
    context(&sandbox);
    let dockerfile = |context_mode: &str| {
        format!(
            "FROM oci:../fixtures/busybox:1.35.0 AS build\nRUN {STAGE}\nFROM oci:../fixtures/busybox:1.35.0\nCOPY --chmod={context_mode} src/ /ctx/\nCOPY --chmod=a=rX --from=build /out/ /stage/\nCOPY --chmod=0640 src/a.sh /octal.sh\n"
        )
    };
    sandbox.write("ctx/Dockerfile", &dockerfile("u+x,g-w"));
    sandbox.write(
        "ctx/b.kdl",
        &format!(
            r#"platforms "linux/amd64" "linux/arm64"
stage build {{
    from "oci:../fixtures/busybox:1.35.0"
    run "{STAGE}"
}}
stage s {{
    from "oci:../fixtures/busybox:1.35.0"
    copy "src/" "/ctx/" chmod="u+x,g-w"
    copy "/out/" "/stage/" from="build" chmod="a=rX"
    copy "src/a.sh" "/octal.sh" chmod="0640"
}}
image s {{ stage s; }}
"#
        ),
    );
    let build = |dest: &str| {
        let output = sandbox.graphbuild(&[
            "build",
            "--platform",
            "linux/amd64,linux/arm64",
            "-o",
            &format!("type=local,dest={dest}"),
            "--progress",
            "json",
            "ctx",
        ]);
        assert_success(&output);
        output
    };
    let first = build("df");
    let kdl = sandbox.graphbuild(&["run", "ctx/b.kdl", "--output", "type=local,dest=kdl"]);
    assert_success(&kdl);
    for root in [
        "df/linux_amd64",
        "df/linux_arm64",
        "kdl/linux_amd64",
        "kdl/linux_arm64",
    ] {
        let root = sandbox.path().join(root);
        let modes: Vec<(&str, u32)> = [
            "ctx/a.sh",
            "ctx/sub",
            "ctx/sub/b.txt",
            "ctx/README.md",
            "stage/notes.md",
            "stage/keep",
            "stage/keep/k.txt",
            "octal.sh",
        ]
        .into_iter()
        .map(|path| (path, mode(&root.join(path))))
        .collect();
        assert_eq!(
            modes,
            [
                ("ctx/a.sh", 0o744),
                ("ctx/sub", 0o750),
                ("ctx/sub/b.txt", 0o740),
                ("ctx/README.md", 0o744),
                ("stage/notes.md", 0o444),
                ("stage/keep", 0o555),
                ("stage/keep/k.txt", 0o444),
                ("octal.sh", 0o640),
            ],
            "{}",
            root.display()
        );
    }
    assert!(executed(&first) > 0);
    // Warm: nothing runs. Another symbolic mode: that copy runs again on each platform, and
    // so do the two copies after it (they build on it).
    assert_eq!(executed(&build("df-warm")), 0);
    sandbox.write("ctx/Dockerfile", &dockerfile("u+x,g+w"));
    let changed = build("df-changed");
    assert_eq!(executed(&changed), 6, "{}", stderr(&changed));
    assert_eq!(
        mode(&sandbox.path().join("df-changed/linux_arm64/ctx/a.sh")),
        0o764
    );

    // A mode that is neither octal nor symbolic is a diagnostic naming the line.
    sandbox.write(
        "bad/Dockerfile",
        "FROM oci:../fixtures/busybox:1.35.0\nCOPY --chmod=u+q Dockerfile /x\n",
    );
    let bad = sandbox.graphbuild(&["build", "bad"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(
        stderr(&bad).contains("`--chmod=u+q` is not a file mode")
            && stderr(&bad).contains("bad/Dockerfile:2"),
        "{}",
        stderr(&bad)
    );
}

#[test]
fn exclude_applies_to_copies_from_a_stage() {
    if !root_and_qemu() {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.busybox("fixtures/busybox");
    let dockerfile = |pattern: &str| {
        format!(
            "FROM oci:../fixtures/busybox:1.35.0 AS build\nRUN {STAGE}\nFROM oci:../fixtures/busybox:1.35.0\nCOPY --from=build --exclude=skip --exclude={pattern} /out/ /excluded/\nRUN echo root:x:0:0:root:/root:/bin/sh > /etc/passwd && echo root:x:0: > /etc/group\nCOPY --from=build --exclude=*.md --chown=root /out/ /sandboxed/\n"
        )
    };
    sandbox.write("ctx/Dockerfile", &dockerfile("*.md"));
    sandbox.write(
        "ctx/b.kdl",
        &format!(
            r#"platforms "linux/amd64" "linux/arm64"
stage build {{
    from "oci:../fixtures/busybox:1.35.0"
    run "{STAGE}"
}}
stage s {{
    from "oci:../fixtures/busybox:1.35.0"
    copy "/out/" "/excluded/" from="build" exclude="skip" exclude="*.md"
}}
image s {{ stage s; }}
"#
        ),
    );
    let build = |dest: &str| {
        let output = sandbox.graphbuild(&[
            "build",
            "--platform",
            "linux/amd64,linux/arm64",
            "-o",
            &format!("type=local,dest={dest}"),
            "--progress",
            "json",
            "ctx",
        ]);
        assert_success(&output);
        output
    };
    build("df");
    let kdl = sandbox.graphbuild(&["run", "ctx/b.kdl", "--output", "type=local,dest=kdl"]);
    assert_success(&kdl);
    for platform in ["linux_amd64", "linux_arm64"] {
        for root in ["df", "kdl"] {
            let root = sandbox.path().join(root).join(platform);
            assert_eq!(
                listing(&root.join("excluded")),
                ["keep", "keep/k.txt"],
                "{}",
                root.display()
            );
        }
        // `--chown` by name copies in the sandbox: the same patterns apply there.
        assert_eq!(
            listing(&sandbox.path().join("df").join(platform).join("sandboxed")),
            ["keep", "keep/k.txt", "skip", "skip/s.txt"],
        );
    }
    assert_eq!(executed(&build("df-warm")), 0);
    // Another pattern: the copy runs again (and the two steps after it, on each platform)
    // and keeps what it no longer excludes.
    sandbox.write("ctx/Dockerfile", &dockerfile("*.txt"));
    let changed = build("df-changed");
    assert_eq!(executed(&changed), 6, "{}", stderr(&changed));
    assert_eq!(
        listing(&sandbox.path().join("df-changed/linux_amd64/excluded")),
        ["keep", "keep/k.txt", "notes.md"]
    );
}

#[test]
fn parents_keep_each_source_path_under_the_destination() {
    if !root_and_qemu() {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.busybox("fixtures/busybox");
    sandbox.write("ctx/x/y/a.txt", "a\n");
    sandbox.write("ctx/x/y/b.go", "b\n");
    sandbox.write("ctx/z/c.txt", "c\n");
    for (path, mode) in [("ctx/x", 0o700), ("ctx/x/y", 0o750)] {
        std::fs::set_permissions(
            sandbox.path().join(path),
            std::fs::Permissions::from_mode(mode),
        )
        .expect("chmod");
    }
    let stage = "mkdir -p /out/p/q && echo q > /out/p/q/q.txt && chmod 711 /out/p && echo root:x:0:0:root:/root:/bin/sh > /etc/passwd && echo root:x:0: > /etc/group";
    let dockerfile = |parents: &str| {
        format!(
            "FROM oci:../fixtures/busybox:1.35.0 AS build\nRUN {stage}\nFROM build\nCOPY {parents} x/y/a.txt z/c.txt /parents\nCOPY --parents x/./y/*.go /pivot/\nCOPY --parents --from=build /out/p/q/q.txt /stage/\nCOPY --parents --from=build /out/./p/q /stagepivot/\nCOPY --parents --from=build --chown=root /out/./p /sandboxed/\n"
        )
    };
    sandbox.write("ctx/Dockerfile", &dockerfile("--parents"));
    sandbox.write(
        "ctx/b.kdl",
        &format!(
            r#"platforms "linux/amd64" "linux/arm64"
stage build {{
    from "oci:../fixtures/busybox:1.35.0"
    run "{stage}"
}}
stage s {{
    from "build"
    copy "x/y/a.txt" "z/c.txt" "/parents" parents=#true
    copy "x/./y/*.go" "/pivot/" parents=#true
    copy "/out/p/q/q.txt" "/stage/" from="build" parents=#true
    copy "/out/./p/q" "/stagepivot/" from="build" parents=#true
    copy "/out/./p" "/sandboxed/" from="build" chown="root" parents=#true
}}
image s {{ stage s; }}
"#
        ),
    );
    let build = |dest: &str| {
        let output = sandbox.graphbuild(&[
            "build",
            "--platform",
            "linux/amd64,linux/arm64",
            "-o",
            &format!("type=local,dest={dest}"),
            "--progress",
            "json",
            "ctx",
        ]);
        assert_success(&output);
        output
    };
    build("df");
    let kdl = sandbox.graphbuild(&["run", "ctx/b.kdl", "--output", "type=local,dest=kdl"]);
    assert_success(&kdl);
    for root in [
        "df/linux_amd64",
        "df/linux_arm64",
        "kdl/linux_amd64",
        "kdl/linux_arm64",
    ] {
        let root = sandbox.path().join(root);
        let copied: Vec<String> = ["parents", "pivot", "stage", "stagepivot", "sandboxed"]
            .iter()
            .flat_map(|dir| {
                listing(&root.join(dir))
                    .into_iter()
                    .map(move |path| format!("{dir}/{path}"))
            })
            .collect();
        assert_eq!(
            copied,
            [
                "parents/x",
                "parents/x/y",
                "parents/x/y/a.txt",
                "parents/z",
                "parents/z/c.txt",
                "pivot/y",
                "pivot/y/b.go",
                "stage/out",
                "stage/out/p",
                "stage/out/p/q",
                "stage/out/p/q/q.txt",
                "stagepivot/p",
                "stagepivot/p/q",
                "stagepivot/p/q/q.txt",
                "sandboxed/p",
                "sandboxed/p/q",
                "sandboxed/p/q/q.txt",
            ],
            "{}",
            root.display()
        );
        // Parents keep their own modes.
        for (path, expected) in [
            ("parents/x", 0o700),
            ("parents/x/y", 0o750),
            ("pivot/y", 0o750),
            ("stage/out/p", 0o711),
            ("stagepivot/p", 0o711),
            ("sandboxed/p", 0o711),
        ] {
            assert_eq!(mode(&root.join(path)), expected, "{path}");
        }
    }
    assert_eq!(executed(&build("df-warm")), 0);
    // Without --parents the first copy flattens, and its key differs: it runs again.
    sandbox.write("ctx/Dockerfile", &dockerfile(""));
    let flat = build("df-flat");
    assert!(executed(&flat) >= 2, "{}", stderr(&flat));
    assert_eq!(
        listing(&sandbox.path().join("df-flat/linux_arm64/parents")),
        ["a.txt", "c.txt"]
    );
}
