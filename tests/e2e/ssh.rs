//! ssh agent forwarding (`RUN --mount=type=ssh`, KDL `ssh`, `--ssh`) with a real OpenSSH
//! agent and a key made by ssh-keygen: inside the step, a small static probe
//! (`tests/fixtures/ssh-agent-probe`, busybox has no ssh client) speaks the agent protocol,
//! lists the identities and tries to remove them; the test checks the key's public blob was
//! listed, the removal refused, and that nothing of the agent (socket, paths, key) reaches an
//! image, the store or the output. Built for linux/amd64 and linux/arm64 on the busybox
//! fixture.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::*;

fn tool(name: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .is_ok_and(|output| output.status.success())
}

/// The tools: OpenSSH's client (package openssh-client).
fn ssh_tools() -> bool {
    ["ssh-agent", "ssh-add", "ssh-keygen"]
        .iter()
        .all(|name| prerequisite(tool(name), &format!("`{name}` (package openssh-client)")))
}

/// An ed25519 key without a passphrase at `path`; returns the hex of its public key blob, as
/// an agent lists it.
fn keygen(path: &Path, passphrase: &str) -> String {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    let output = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-C",
            "graphbuild-test",
            "-N",
            passphrase,
            "-f",
        ])
        .arg(path)
        .output()
        .expect("ssh-keygen runs");
    assert!(output.status.success(), "ssh-keygen: {}", stderr(&output));
    let public = std::fs::read_to_string(path.with_extension("pub")).expect("public key");
    let blob = public.split_whitespace().nth(1).expect("base64 blob");
    let output = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo {blob} | base64 -d | od -An -tx1 -v | tr -d ' \\n'"
        ))
        .output()
        .expect("base64 runs");
    String::from_utf8(output.stdout).expect("hex")
}

/// `ssh-agent` in the foreground on `socket` with `key` loaded; killed on drop.
struct Agent {
    child: Child,
    socket: PathBuf,
}

impl Agent {
    fn start(socket: &Path, key: &Path) -> Agent {
        let child = Command::new("ssh-agent")
            .args(["-D", "-a"])
            .arg(socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ssh-agent starts");
        let agent = Agent {
            child,
            socket: socket.to_path_buf(),
        };
        for _ in 0..500 {
            if socket.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let output = agent.ssh_add(&["-q".as_ref(), key.as_os_str()]);
        assert!(output.status.success(), "ssh-add: {}", stderr(&output));
        agent
    }

    fn ssh_add(&self, args: &[&std::ffi::OsStr]) -> Output {
        Command::new("ssh-add")
            .args(args)
            .env("SSH_AUTH_SOCK", &self.socket)
            .output()
            .expect("ssh-add runs")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The step: the socket's path, type, mode and owner, and what the agent answered to "list",
/// "remove all", "list" (hex), judged against the public key blob in `PUBLIC_KEY`.
const PROBE: &str = r#"reply=$(printf '\0\0\0\1\13\0\0\0\1\23\0\0\0\1\13' | probe "$SSH_AUTH_SOCK" | xxd -p | tr -d '\n'); { echo "$SSH_AUTH_SOCK"; stat -c '%F %a %u:%g' "$SSH_AUTH_SOCK"; case "$reply" in *"$PUBLIC_KEY"*0000000105*"$PUBLIC_KEY"*) echo 'listed, removal refused, still listed';; *) echo "unexpected reply: $reply";; esac; } > /agent.txt"#;

const LISTED: &str = "listed, removal refused, still listed\n";

/// A file under `root` whose content (or a symlink whose target) contains `needle`.
fn tree_contains(root: &Path, needle: &[u8]) -> Option<String> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(metadata) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let bytes = if metadata.is_dir() {
            for entry in std::fs::read_dir(&path).expect("read_dir") {
                stack.push(entry.expect("entry").path());
            }
            continue;
        } else if metadata.file_type().is_symlink() {
            std::fs::read_link(&path)
                .expect("link")
                .into_os_string()
                .into_encoded_bytes()
        } else if metadata.is_file() {
            std::fs::read(&path).expect("read")
        } else {
            return Some(format!("{} (not a file)", path.display()));
        };
        if bytes.windows(needle.len()).any(|window| window == needle) {
            return Some(path.display().to_string());
        }
    }
    None
}

fn executed(output: &Output) -> usize {
    steps(output)
        .into_iter()
        .filter(|(_, _, _, status)| status == "executed")
        .count()
}

/// Processes whose command line mentions `text` (an agent graphbuild left running).
fn processes_mentioning(text: &str) -> usize {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|entry| std::fs::read(entry.ok()?.path().join("cmdline")).ok())
        .filter(|cmdline| {
            cmdline
                .windows(text.len())
                .any(|window| window == text.as_bytes())
        })
        .count()
}

#[test]
fn a_step_uses_the_forwarded_agent_and_nothing_of_it_reaches_the_image() {
    if !root_and_qemu() || !ssh_tools() {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.busybox("fixtures/busybox");
    let probe_dir = repo_root().join("tests/fixtures/ssh-agent-probe");
    for (arch, file) in [("amd64", "probe-x86_64"), ("arm64", "probe-aarch64")] {
        std::fs::copy(
            probe_dir.join(file),
            sandbox.path().join(format!("ctx/probe-{arch}")),
        )
        .or_else(|_| {
            std::fs::create_dir_all(sandbox.path().join("ctx"))?;
            std::fs::copy(
                probe_dir.join(file),
                sandbox.path().join(format!("ctx/probe-{arch}")),
            )
        })
        .expect("probe");
    }
    sandbox.write(
        "ctx/Dockerfile",
        &format!(
            "FROM oci:../fixtures/busybox:1.35.0\nARG TARGETARCH\nCOPY probe-${{TARGETARCH}} /usr/local/bin/probe\nARG PUBLIC_KEY\nRUN --mount=type=ssh,required=true {PROBE}\n"
        ),
    );
    let key = sandbox.path().join("keys/id_ed25519");
    let public_key = keygen(&key, "");
    let private = std::fs::read_to_string(&key).expect("private key");
    let private_line = private
        .lines()
        .nth(1)
        .expect("key body")
        .as_bytes()
        .to_vec();
    let agent = Agent::start(&sandbox.path().join("user-agent.sock"), &key);
    let tmp = sandbox.path().join("tmp");
    std::fs::create_dir_all(&tmp).expect("tmp");
    let secrets: Vec<(String, Vec<u8>)> = vec![
        ("the private key".into(), private_line),
        (
            "the agent's socket path".into(),
            agent.socket.display().to_string().into_bytes(),
        ),
        (
            "the key's path".into(),
            key.display().to_string().into_bytes(),
        ),
        (
            "graphbuild's own sockets".into(),
            b"graphbuild-ssh-".to_vec(),
        ),
    ];
    let public_arg = format!("PUBLIC_KEY={public_key}");
    let key_arg = format!("default={}", key.display());
    let build = |dest: &str, ssh: &str, agent_env: bool, extra: &[&str]| {
        let mut command = Command::new(bin());
        command
            .args([
                "build",
                "--platform",
                "linux/amd64,linux/arm64",
                "--ssh",
                ssh,
                "--build-arg",
                &public_arg,
                "-o",
                &format!("type=local,dest={dest}"),
                "--progress",
                "json",
            ])
            .args(extra)
            .arg("ctx")
            .current_dir(sandbox.path())
            .env("GRAPHBUILD_CACHE_DIR", sandbox.store())
            .env("NO_COLOR", "1")
            .env("TMPDIR", &tmp)
            .env_remove("SOURCE_DATE_EPOCH");
        if agent_env {
            command.env("SSH_AUTH_SOCK", &agent.socket);
        } else {
            command.env_remove("SSH_AUTH_SOCK");
        }
        let output = command.output().expect("graphbuild runs");
        assert_success(&output);
        let text = format!("{}{}", stdout(&output), stderr(&output));
        for (what, needle) in &secrets {
            assert!(
                !text.as_bytes().windows(needle.len()).any(|w| w == needle),
                "{what} is in the output:\n{text}"
            );
        }
        output
    };
    let check_images = |dest: &str| {
        for platform in ["linux_amd64", "linux_arm64"] {
            let root = sandbox.path().join(dest).join(platform);
            assert_eq!(
                std::fs::read_to_string(root.join("agent.txt")).expect("agent.txt"),
                format!("/run/buildkit/ssh_agent.0\nsocket 600 0:0\n{LISTED}"),
                "{dest} {platform}"
            );
            assert!(
                !root.join("run/buildkit").exists(),
                "{dest} {platform}: the socket's mount point is in the image"
            );
            for (what, needle) in &secrets {
                assert_eq!(
                    tree_contains(&root, needle),
                    None,
                    "{what} is in the {platform} image"
                );
            }
        }
        // Configs, manifests, action records and explain records are plain JSON in the store.
        for (what, needle) in &secrets {
            assert_eq!(
                tree_contains(&sandbox.store(), needle),
                None,
                "{what} is in the store"
            );
        }
        let left: Vec<_> = std::fs::read_dir(&tmp)
            .expect("tmp")
            .filter_map(|entry| entry.ok())
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("graphbuild-ssh-"))
            .collect();
        assert!(left.is_empty(), "left behind in TMPDIR: {left:?}");
        assert_eq!(
            processes_mentioning(&tmp.display().to_string()),
            0,
            "an agent graphbuild started is still running"
        );
    };

    // `--ssh default`: the agent of SSH_AUTH_SOCK.
    let first = build("rootfs-agent", "default", true, &[]);
    assert_eq!(executed(&first), 4, "{}", stderr(&first));
    check_images("rootfs-agent");
    // The user's agent still holds the key: the step's "remove all" was refused.
    let listed = agent.ssh_add(&["-L".as_ref()]);
    assert!(
        listed.status.success() && stdout(&listed).contains("graphbuild-test"),
        "{}",
        stderr(&listed)
    );

    // The same id bound to a key file instead: the key is the same, so nothing runs.
    let warm = build("rootfs-warm", &key_arg, false, &[]);
    assert_eq!(executed(&warm), 0, "{}", stderr(&warm));

    // Run again with the key file: an agent started for the build serves it, then is gone.
    let keyed = build("rootfs-key", &key_arg, false, &["--no-cache"]);
    assert_eq!(executed(&keyed), 4, "{}", stderr(&keyed));
    check_images("rootfs-key");
}

/// KDL `ssh`: a named id with its own target, owner and mode; an optional id not supplied
/// leaves the step without a socket; changing the mount's target changes the step's key.
#[test]
fn kdl_ssh_mounts_name_their_agent_target_and_mode() {
    if !root_and_qemu() || !ssh_tools() {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.busybox("fixtures/busybox");
    std::fs::create_dir_all(sandbox.path().join("ctx")).expect("ctx");
    std::fs::copy(
        repo_root().join("tests/fixtures/ssh-agent-probe/probe-aarch64"),
        sandbox.path().join("ctx/probe"),
    )
    .expect("probe");
    let key = sandbox.path().join("keys/deploy");
    let public_key = keygen(&key, "");
    let kdl = |target: &str| {
        format!(
            r#"platforms "linux/arm64"
arg PUBLIC_KEY=""
stage s {{
    from "oci:../fixtures/busybox:1.35.0"
    copy "probe" "/usr/local/bin/probe"
    run {probe:?} {{
        ssh "deploy" target="{target}" uid=1000 gid=1001 mode="0660"
    }}
    run "if [ -e /run/buildkit/ssh_agent.0 ]; then echo present; else echo absent; fi > /optional.txt" {{
        ssh required=#false
    }}
}}
image s {{ stage s; }}
"#,
            probe = PROBE.replace("\"$PUBLIC_KEY\"", "\"${PUBLIC_KEY}\""),
        )
    };
    sandbox.write("ctx/b.kdl", &kdl("/tmp/deploy.sock"));
    let run = |dest: &str| {
        let output = sandbox.graphbuild_with_env(
            &[("TMPDIR", "/tmp")],
            &[
                "run",
                "ctx/b.kdl",
                "--ssh",
                &format!("deploy={}", key.display()),
                "--arg",
                &format!("PUBLIC_KEY={public_key}"),
                "--output",
                &format!("type=local,dest={dest}"),
                "--progress",
                "json",
            ],
        );
        assert_success(&output);
        output
    };
    let first = run("rootfs-1");
    assert_eq!(executed(&first), 3, "{}", stderr(&first));
    let root = sandbox.path().join("rootfs-1");
    assert_eq!(
        std::fs::read_to_string(root.join("agent.txt")).expect("agent.txt"),
        format!("/tmp/deploy.sock\nsocket 660 1000:1001\n{LISTED}")
    );
    assert_eq!(
        std::fs::read_to_string(root.join("optional.txt")).expect("optional.txt"),
        "absent\n"
    );
    assert!(!root.join("tmp/deploy.sock").exists());
    assert_eq!(executed(&run("rootfs-2")), 0);
    // `verify` takes --ssh too: two clean builds with the agent, the same image.
    let verify = sandbox.graphbuild(&[
        "verify",
        "ctx/b.kdl",
        "--ssh",
        &format!("deploy={}", key.display()),
        "--arg",
        &format!("PUBLIC_KEY={public_key}"),
    ]);
    assert_success(&verify);
    assert!(
        stdout(&verify).contains("✓ s: reproducible"),
        "{}",
        stdout(&verify)
    );
    // Another target: the step sees something else, so it runs again (and what follows it).
    sandbox.write("ctx/b.kdl", &kdl("/tmp/other.sock"));
    let moved = run("rootfs-3");
    assert_eq!(executed(&moved), 2, "{}", stderr(&moved));
    assert!(
        std::fs::read_to_string(sandbox.path().join("rootfs-3/agent.txt"))
            .expect("agent.txt")
            .starts_with("/tmp/other.sock\n")
    );
}

/// A required ssh id that is not supplied, an unusable key and a bad `--ssh` value stop the
/// build before anything runs, with a diagnostic that names the id and never a path.
#[test]
fn missing_or_unusable_agents_stop_the_build_before_it_starts() {
    if !ssh_tools() {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.busybox("fixtures/busybox");
    sandbox.write(
        "ctx/Dockerfile",
        "FROM oci:../fixtures/busybox:1.35.0\nRUN touch /first\nRUN --mount=type=ssh,id=gh,required=true true\n",
    );
    let build = |extra: &[&str]| {
        let mut args = vec![
            "build",
            "--platform",
            "linux/amd64",
            "-o",
            "type=local,dest=out",
        ];
        args.extend_from_slice(extra);
        args.push("ctx");
        let output = sandbox.graphbuild(&args);
        assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
        assert!(!sandbox.path().join("out").exists());
        stderr(&output)
    };
    let text = build(&[]);
    assert!(
        text.contains("the step needs the ssh agent `gh`, which was not supplied")
            && text.contains("ctx/Dockerfile:3")
            && text.contains("--ssh gh=KEY_FILE"),
        "{text}"
    );
    assert!(
        !text.contains("DONE") && !text.contains("executed"),
        "a step ran: {text}"
    );

    let missing = sandbox.path().join("keys/secret-name");
    let text = build(&["--ssh", &format!("gh={}", missing.display())]);
    assert!(text.contains("--ssh gh: cannot use its path"), "{text}");
    assert!(!text.contains("secret-name"), "{text}");

    let locked = sandbox.path().join("keys/locked-name");
    keygen(&locked, "a passphrase");
    let text = build(&["--ssh", &format!("gh={}", locked.display())]);
    assert!(
        text.contains("its key file cannot be loaded") && !text.contains("locked-name"),
        "{text}"
    );

    let text = build(&["--ssh", "gh=", "--ssh", "x"]);
    assert!(
        text.contains("name a key file or an agent socket"),
        "{text}"
    );
}
