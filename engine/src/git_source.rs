//! `add` of a git repository: recognizing its URL, resolving its ref to a commit, and checking
//! the commit's tree out on the host with the `git` command.
//!
//! # Confinement
//!
//! A build file may name any repository, and a repository may be hostile. Every `git` runs
//! with:
//!
//! - `GIT_ALLOW_PROTOCOL=https:http:ssh:git` (no `file`, no `ext::`, which runs a command);
//! - no prompt for credentials (`GIT_TERMINAL_PROMPT=0`, `GIT_ASKPASS` and `SSH_ASKPASS`
//!   empty, ssh in batch mode): a credential helper that needs no terminal still works;
//! - no system configuration (`GIT_CONFIG_NOSYSTEM`), hooks pointed at `/dev/null`, no
//!   template (so no sample hooks), no submodules, no LFS filters
//!   (`filter.lfs.*` emptied): nothing from the repository runs on the host.
//!
//! # Determinism
//!
//! The tree is checked out by commit (`git fetch --depth 1` of the ref, then the commit is
//! compared with the one planned), so the same key always means the same files. Modes are
//! normalized as git stores them (`0644`, `0755` for executables, directories `0755`) whatever
//! the umask; line endings and symlinks are the commit's whatever the user's `~/.gitconfig`
//! says (`core.autocrlf=false`, `core.eol=lf`, `core.symlinks=true`); times are clamped like every copied file's. Without `keep-git-dir` there is no
//! `.git`; with it, `.git` keeps the objects and `HEAD` (detached at the commit) but not the
//! index or the reflogs, which record times and inode numbers of this machine.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// Protocols `git` may use for an `add`.
pub const ALLOWED_PROTOCOLS: &str = "https:http:ssh:git";

/// A git URL as Docker recognizes one: `git@…`, `git://…`, `ssh://…`, or an `http(s)` URL
/// whose path ends in `.git` (before an optional `#REF[:SUBDIR]`).
pub fn is_git_url(source: &str) -> bool {
    let lower = source.to_ascii_lowercase();
    if lower.starts_with("git@") || lower.starts_with("git://") || lower.starts_with("ssh://") {
        return true;
    }
    if lower.starts_with("http://") || lower.starts_with("https://") {
        let before = lower.split('#').next().unwrap_or(&lower);
        let path = before.split('?').next().unwrap_or(before);
        return path.trim_end_matches('/').ends_with(".git");
    }
    false
}

/// `URL#REF:SUBDIR` → (URL, REF, SUBDIR), REF and SUBDIR empty when absent.
pub fn split_fragment(source: &str) -> (&str, &str, &str) {
    match source.split_once('#') {
        Some((url, fragment)) => match fragment.split_once(':') {
            Some((reference, subdir)) => (url, reference, subdir),
            None => (url, fragment, ""),
        },
        None => (source, "", ""),
    }
}

/// A full commit hash (sha1 or sha256 object format).
pub fn is_commit(reference: &str) -> bool {
    (reference.len() == 40 || reference.len() == 64)
        && reference.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A `git` command with the confinement of the module docs.
fn git() -> Command {
    let mut command = Command::new("git");
    command
        .env("GIT_ALLOW_PROTOCOL", ALLOWED_PROTOCOLS)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "")
        .env("SSH_ASKPASS", "")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .args([
            "-c",
            "core.hooksPath=/dev/null",
            "-c",
            "protocol.file.allow=never",
            "-c",
            "filter.lfs.process=",
            "-c",
            "filter.lfs.smudge=",
            "-c",
            "filter.lfs.required=false",
            "-c",
            "core.fsmonitor=false",
            "-c",
            "advice.detachedHead=false",
            // The commit's bytes whatever the user's configuration: the key is the commit.
            "-c",
            "core.autocrlf=false",
            "-c",
            "core.eol=lf",
            "-c",
            "core.symlinks=true",
            // A stalled server fails instead of hanging the build.
            "-c",
            "http.lowSpeedLimit=1",
            "-c",
            "http.lowSpeedTime=60",
        ])
        .stdin(Stdio::null());
    command
}

/// Run `git`, returning its stdout; an error carries its stderr's last lines, with `url`
/// replaced by `shown` so credentials never reach a message.
fn run(mut command: Command, url: &str, shown: &str) -> Result<String, String> {
    let output = command
        .output()
        .map_err(|error| format!("cannot run git: {error}"))?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
    let mut message = tail.into_iter().rev().collect::<Vec<_>>().join("; ");
    message = message.replace(url, shown);
    let userinfo = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|authority| authority.rsplit_once('@'))
        .map(|(userinfo, _)| userinfo);
    if let Some(userinfo) = userinfo.filter(|userinfo| !userinfo.is_empty()) {
        // git names the URL without its userinfo, but with its query (which may hold a token).
        let anonymous = url.replacen(&format!("{userinfo}@"), "", 1);
        message = message.replace(&anonymous, shown);
        message = message.replace(userinfo, "…");
    }
    Err(if message.is_empty() {
        format!("git exited with {}", output.status)
    } else {
        message
    })
}

/// The commit `reference` names in the repository at `url` (its default branch when empty),
/// by `git ls-remote`: an annotated tag's commit, not the tag object.
pub fn resolve_ref(url: &str, reference: &str) -> Result<String, String> {
    if is_commit(reference) {
        return Ok(reference.to_ascii_lowercase());
    }
    let shown = crate::fetch::redact(url);
    let mut command = git();
    command.args(["ls-remote", "--", url]);
    let listing = run(command, url, &shown)?;
    let refs: Vec<(&str, &str)> = listing
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .collect();
    let wanted = if reference.is_empty() {
        "HEAD"
    } else {
        reference
    };
    let candidates = [
        format!("refs/tags/{wanted}^{{}}"),
        format!("refs/tags/{wanted}"),
        format!("refs/heads/{wanted}"),
        format!("{wanted}^{{}}"),
        wanted.to_string(),
    ];
    for candidate in &candidates {
        if let Some((commit, _)) = refs.iter().find(|(_, name)| name == candidate) {
            if !is_commit(commit) {
                return Err(format!(
                    "{shown} listed `{wanted}` as `{commit}`, not a commit"
                ));
            }
            return Ok(commit.to_ascii_lowercase());
        }
    }
    Err(format!("{shown} has no branch or tag `{wanted}`"))
}

/// Check out `commit` of `url` into `dest` (an empty directory), fetching `reference` (or the
/// commit itself when the ref is one); keep `.git` only when asked. Modes are normalized.
pub fn checkout(
    url: &str,
    reference: &str,
    commit: &str,
    dest: &Path,
    keep_git_dir: bool,
) -> Result<(), String> {
    let shown = crate::fetch::redact(url);
    let mut init = git();
    init.args(["init", "--quiet", "--template="]).arg(dest);
    run(init, url, &shown)?;
    let fetched = if is_commit(reference) || reference.is_empty() {
        let wanted = if reference.is_empty() { "HEAD" } else { commit };
        let mut fetch = git();
        fetch.arg("-C").arg(dest).args([
            "fetch",
            "--quiet",
            "--depth",
            "1",
            "--no-tags",
            "--",
            url,
            wanted,
        ]);
        run(fetch, url, &shown)
    } else {
        let mut fetch = git();
        fetch
            .arg("-C")
            .arg(dest)
            .args(["fetch", "--quiet", "--depth", "1", "--no-tags", "--", url])
            .arg(reference);
        run(fetch, url, &shown)
    };
    if let Err(error) = fetched {
        // The ref may have moved since it was planned: ask for the planned commit itself.
        let mut fetch = git();
        fetch.arg("-C").arg(dest).args([
            "fetch",
            "--quiet",
            "--depth",
            "1",
            "--no-tags",
            "--",
            url,
            commit,
        ]);
        run(fetch, url, &shown).map_err(|_| error)?;
    }
    let mut check = git();
    check
        .arg("-C")
        .arg(dest)
        .args(["checkout", "--quiet", "--detach", commit]);
    run(check, url, &shown).map_err(|error| {
        format!("{shown} at `{reference}` does not have the planned commit {commit}: {error}")
    })?;
    let git_dir = dest.join(".git");
    if keep_git_dir {
        for name in ["index", "logs", "FETCH_HEAD", "ORIG_HEAD", "description"] {
            let path = git_dir.join(name);
            let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
        }
    } else {
        std::fs::remove_dir_all(&git_dir)
            .map_err(|error| format!("cannot remove {}: {error}", git_dir.display()))?;
    }
    normalize_modes(dest)
}

/// Directories `0755`, files `0755` when any execute bit is set else `0644`: what git records,
/// whatever the umask of the checkout was.
pub fn normalize_modes(root: &Path) -> Result<(), String> {
    for entry in walkdir::WalkDir::new(root).follow_links(false) {
        let entry = entry.map_err(|error| format!("cannot walk the checkout: {error}"))?;
        let file_type = entry.file_type();
        if file_type.is_symlink() {
            continue;
        }
        let metadata = entry
            .metadata()
            .map_err(|error| format!("cannot read the checkout: {error}"))?;
        let mode = if file_type.is_dir() || metadata.permissions().mode() & 0o111 != 0 {
            0o755
        } else {
            0o644
        };
        std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(mode)).map_err(
            |error| format!("cannot set the mode of {}: {error}", entry.path().display()),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_urls_as_docker_sees_them() {
        assert!(is_git_url("https://github.com/moby/buildkit.git#v0.10.1"));
        assert!(is_git_url("git@github.com:moby/buildkit.git"));
        assert!(is_git_url("git://127.0.0.1:9418/repo.git#main:sub"));
        assert!(!is_git_url("https://example.com/tool.tar.gz"));
        assert!(!is_git_url("https://example.com/a.git.tar.gz"));
        assert_eq!(
            split_fragment("https://h/r.git#v1:dir/sub"),
            ("https://h/r.git", "v1", "dir/sub")
        );
        assert_eq!(
            split_fragment("https://h/r.git"),
            ("https://h/r.git", "", "")
        );
        assert!(is_commit("0123456789abcdef0123456789abcdef01234567"));
        assert!(!is_commit("main"));
    }
}
