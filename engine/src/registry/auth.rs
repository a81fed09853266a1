//! Credentials (Docker's `config.json` and credential helpers) and the registry auth
//! challenge (`WWW-Authenticate`).
//!
//! Where credentials come from, in Docker's order for one registry:
//!
//! 1. `credHelpers[REGISTRY]` in `config.json`: run `docker-credential-NAME get` with the
//!    server address on standard input and read `{"Username": …, "Secret": …}` back;
//! 2. `credsStore`: the same with the default helper;
//! 3. `auths[REGISTRY]`: a base64 `user:password` in `auth`, or `username`/`password`, or an
//!    `identitytoken` (an OAuth2 refresh token).
//!
//! Docker Hub's entries are keyed `https://index.docker.io/v1/`; other keys are matched on their
//! host (and port) with any scheme and path removed, as the Docker CLI does.
//!
//! Secrets live in [`Credential`] and [`Secret`], whose `Debug` output is redacted; they are
//! never formatted into an error.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;

use super::RegistryError;
use crate::reference::DOCKER_HUB;

/// The key Docker uses for Docker Hub in `config.json` and with credential helpers.
pub(crate) const DOCKER_HUB_SERVER_ADDRESS: &str = "https://index.docker.io/v1/";

/// A value that must never be printed: an `Authorization` header, a token, a password.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(pub(crate) String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Credentials for one registry.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Credential {
    /// A user name and a password (or a personal access token used as a password).
    Basic { username: String, password: Secret },
    /// An OAuth2 refresh token (`identitytoken` in `config.json`, or a helper's `<token>` user).
    IdentityToken { token: Secret },
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Basic { username, password } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", password)
                .finish(),
            Credential::IdentityToken { token } => f
                .debug_struct("IdentityToken")
                .field("token", token)
                .finish(),
        }
    }
}

impl Credential {
    /// The `Authorization` header value for Basic auth, if these are basic credentials.
    pub(crate) fn basic_authorization(&self) -> Option<Secret> {
        match self {
            Credential::Basic { username, password } => Some(Secret(format!(
                "Basic {}",
                base64_encode(format!("{username}:{}", password.0).as_bytes())
            ))),
            Credential::IdentityToken { .. } => None,
        }
    }
}

/// The directory holding Docker's `config.json`: the option, else `$DOCKER_CONFIG`, else
/// `~/.docker`.
pub(crate) fn docker_config_dir(configured: Option<&Path>) -> Option<PathBuf> {
    if let Some(dir) = configured {
        return Some(dir.to_path_buf());
    }
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|dir| !dir.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    std::env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .map(|home| PathBuf::from(home).join(".docker"))
}

#[derive(Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// The address Docker uses for `registry` in `config.json` and with credential helpers.
pub(crate) fn server_address(registry: &str) -> &str {
    if registry == DOCKER_HUB {
        DOCKER_HUB_SERVER_ADDRESS
    } else {
        registry
    }
}

/// `https://host:port/v1/` → `host:port`, as the Docker CLI normalizes `auths` keys.
fn normalize_auth_key(key: &str) -> &str {
    let without_scheme = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    without_scheme.split('/').next().unwrap_or(without_scheme)
}

fn is_docker_hub_key(host: &str) -> bool {
    matches!(
        host,
        "docker.io" | "index.docker.io" | "registry-1.docker.io"
    )
}

/// The credentials `config_dir/config.json` gives for `registry` (a reference's registry name,
/// `docker.io` for Docker Hub), or `None` for anonymous access.
pub(crate) fn lookup_credentials(
    config_dir: &Path,
    registry: &str,
) -> Result<Option<Credential>, RegistryError> {
    let path = config_dir.join("config.json");
    let config: ConfigFile = match std::fs::read(&path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map_err(|error| RegistryError::DockerConfig {
                path: path.clone(),
                message: format!("invalid JSON: {error}"),
            })?
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(RegistryError::DockerConfig {
                path,
                message: error.to_string(),
            });
        }
    };
    let address = server_address(registry);

    let helper = config
        .cred_helpers
        .get(registry)
        .or_else(|| config.cred_helpers.get(address))
        .or(config.creds_store.as_ref())
        .filter(|name| !name.is_empty());
    if let Some(helper) = helper {
        let program = format!("docker-credential-{helper}");
        if let Some(credential) = run_credential_helper(Path::new(&program), registry, address)? {
            return Ok(Some(credential));
        }
    }

    let wanted_docker_hub = registry == DOCKER_HUB;
    let entry = config.auths.iter().find_map(|(key, entry)| {
        let host = normalize_auth_key(key);
        let matches = if wanted_docker_hub {
            is_docker_hub_key(host)
        } else {
            host == registry
        };
        matches.then_some(entry)
    });
    let Some(entry) = entry else { return Ok(None) };
    credential_from_entry(entry, registry, &path)
}

fn credential_from_entry(
    entry: &AuthEntry,
    registry: &str,
    path: &Path,
) -> Result<Option<Credential>, RegistryError> {
    if let Some(token) = entry
        .identitytoken
        .as_ref()
        .filter(|token| !token.is_empty())
    {
        return Ok(Some(Credential::IdentityToken {
            token: Secret(token.clone()),
        }));
    }
    if let Some(auth) = entry.auth.as_ref().filter(|auth| !auth.is_empty()) {
        let invalid = || RegistryError::DockerConfig {
            path: path.to_path_buf(),
            message: format!("the `auth` entry for {registry} is not base64 of `user:password`"),
        };
        let decoded = base64_decode(auth.trim()).ok_or_else(invalid)?;
        let decoded = String::from_utf8(decoded).map_err(|_| invalid())?;
        let (username, password) = decoded.split_once(':').ok_or_else(invalid)?;
        return Ok(Some(Credential::Basic {
            username: username.to_string(),
            password: Secret(password.to_string()),
        }));
    }
    match (&entry.username, &entry.password) {
        (Some(username), Some(password)) if !username.is_empty() => Ok(Some(Credential::Basic {
            username: username.clone(),
            password: Secret(password.clone()),
        })),
        _ => Ok(None),
    }
}

#[derive(Deserialize)]
struct HelperOutput {
    #[serde(rename = "Username", default)]
    username: String,
    #[serde(rename = "Secret", default)]
    secret: String,
}

/// Run `program get` with `address` on standard input (Docker's credential helper protocol).
/// A helper that knows no credentials for the address answers with an error containing
/// "credentials not found": that is anonymous access, not a failure.
pub(crate) fn run_credential_helper(
    program: &Path,
    registry: &str,
    address: &str,
) -> Result<Option<Credential>, RegistryError> {
    let helper_error = |message: String| RegistryError::CredentialHelper {
        helper: program.display().to_string(),
        registry: registry.to_string(),
        message,
    };
    let mut child = Command::new(program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| helper_error(format!("cannot run it: {error}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading its input is judged by its exit status below.
        let _ = stdin.write_all(address.as_bytes());
    }
    let output = child
        .wait_with_output()
        .map_err(|error| helper_error(format!("cannot run it: {error}")))?;
    if !output.status.success() {
        // Helpers report errors on stdout (docker-credential-helpers) or stderr.
        let text = format!(
            "{} {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if text.to_ascii_lowercase().contains("credentials not found") {
            return Ok(None);
        }
        let first_line = text.trim().lines().next().unwrap_or("").chars().take(200);
        return Err(helper_error(format!(
            "it failed ({}): {}",
            output.status,
            first_line.collect::<String>()
        )));
    }
    let parsed: HelperOutput = serde_json::from_slice(&output.stdout)
        .map_err(|error| helper_error(format!("its output is not the expected JSON: {error}")))?;
    if parsed.secret.is_empty() {
        return Ok(None);
    }
    if parsed.username == "<token>" {
        return Ok(Some(Credential::IdentityToken {
            token: Secret(parsed.secret),
        }));
    }
    Ok(Some(Credential::Basic {
        username: parsed.username,
        password: Secret(parsed.secret),
    }))
}

/// What a registry asks for in `WWW-Authenticate`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Challenge {
    /// `/v2/` answered without asking for credentials.
    None,
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parse a `WWW-Authenticate` header: `Bearer realm="…",service="…",scope="…"` or
/// `Basic realm="…"`. Unknown schemes give `None`.
pub(crate) fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header
        .split_once(char::is_whitespace)
        .unwrap_or((header, ""));
    let parameters = parse_auth_parameters(rest);
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => Some(Challenge::Bearer {
            realm: parameters.get("realm")?.clone(),
            service: parameters.get("service").cloned(),
            scope: parameters.get("scope").cloned(),
        }),
        _ => None,
    }
}

/// `key="quoted, value",other=token` → a map with lowercase keys.
fn parse_auth_parameters(text: &str) -> BTreeMap<String, String> {
    let mut parameters = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'=') {
            chars.next();
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some(escaped) = chars.next() {
                                value.push(escaped);
                            }
                        }
                        '"' => break,
                        other => value.push(other),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ',' {
                        break;
                    }
                    value.push(c);
                    chars.next();
                }
            }
        }
        parameters.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    parameters
}

const BASE64_ALPHABET: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub(crate) fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let value = (u32::from(chunk[0]) << 16)
            | (u32::from(chunk.get(1).copied().unwrap_or(0)) << 8)
            | u32::from(chunk.get(2).copied().unwrap_or(0));
        for position in 0..4 {
            if position <= chunk.len() {
                let index = (value >> (18 - 6 * position)) & 0x3f;
                out.push(char::from(BASE64_ALPHABET[index as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard base64, padding optional; `None` on any other character.
pub(crate) fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut buffer: u32 = 0;
    let mut bits = 0;
    for byte in text.bytes() {
        let value = BASE64_ALPHABET.iter().position(|&c| c == byte)? as u32;
        buffer = (buffer << 6) | value;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
            buffer &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Percent-encode a query component (RFC 3986 unreserved characters pass through).
pub(crate) fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("user:pa:ss", "dXNlcjpwYTpzcw=="),
        ] {
            assert_eq!(base64_encode(plain.as_bytes()), encoded);
            assert_eq!(base64_decode(encoded).unwrap(), plain.as_bytes());
        }
        assert_eq!(base64_decode("not base64!"), None);
    }

    #[test]
    fn parses_challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/busybox:pull,push".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"bearer realm=http://127.0.0.1:1/token"#),
            Some(Challenge::Bearer {
                realm: "http://127.0.0.1:1/token".into(),
                service: None,
                scope: None
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="basic-realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(parse_challenge("Bearer service=x"), None);
    }

    fn write_config(dir: &Path, json: &str) {
        std::fs::write(dir.join("config.json"), json).unwrap();
    }

    #[test]
    fn reads_auths_in_every_spelling() {
        let dir = tempfile::tempdir().unwrap();
        write_config(
            dir.path(),
            r#"{"auths": {
                "https://index.docker.io/v1/": {"auth": "aHViOmh1Yi1wYXNz"},
                "registry.example.com:5000": {"username": "alice", "password": "wonder"},
                "https://ghcr.io/v2/": {"identitytoken": "refresh-me"},
                "empty.example.com": {}
            }}"#,
        );
        let basic = |username: &str, password: &str| {
            Some(Credential::Basic {
                username: username.into(),
                password: Secret(password.into()),
            })
        };
        assert_eq!(
            lookup_credentials(dir.path(), "docker.io").unwrap(),
            basic("hub", "hub-pass")
        );
        assert_eq!(
            lookup_credentials(dir.path(), "registry.example.com:5000").unwrap(),
            basic("alice", "wonder")
        );
        assert_eq!(
            lookup_credentials(dir.path(), "ghcr.io").unwrap(),
            Some(Credential::IdentityToken {
                token: Secret("refresh-me".into())
            })
        );
        assert_eq!(
            lookup_credentials(dir.path(), "empty.example.com").unwrap(),
            None
        );
        assert_eq!(
            lookup_credentials(dir.path(), "registry.example.com").unwrap(),
            None
        );
        let missing = tempfile::tempdir().unwrap();
        assert_eq!(
            lookup_credentials(missing.path(), "docker.io").unwrap(),
            None
        );
    }

    #[test]
    fn malformed_config_is_an_error_without_secrets() {
        let dir = tempfile::tempdir().unwrap();
        write_config(
            dir.path(),
            r#"{"auths": {"r.example.com": {"auth": "c2VjcmV0LXdpdGhvdXQtY29sb24="}}}"#,
        );
        let error = lookup_credentials(dir.path(), "r.example.com").unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("not base64 of `user:password`"),
            "{message}"
        );
        assert!(!message.contains("c2VjcmV0"), "{message}");
        assert!(!message.contains("secret-without-colon"), "{message}");
        write_config(dir.path(), "{not json");
        let error = lookup_credentials(dir.path(), "r.example.com").unwrap_err();
        assert!(error.to_string().contains("invalid JSON"), "{error}");
    }

    #[test]
    fn config_names_the_helper_to_run() {
        let dir = tempfile::tempdir().unwrap();
        write_config(
            dir.path(),
            r#"{"credsStore": "graphbuild-test-absent-store",
                "credHelpers": {"r.example.com": "graphbuild-test-absent-helper"},
                "auths": {"other.example.com": {}}}"#,
        );
        let error = lookup_credentials(dir.path(), "r.example.com").unwrap_err();
        assert!(
            error
                .to_string()
                .contains("`docker-credential-graphbuild-test-absent-helper`"),
            "{error}"
        );
        let error = lookup_credentials(dir.path(), "other.example.com").unwrap_err();
        assert!(
            error
                .to_string()
                .contains("`docker-credential-graphbuild-test-absent-store`"),
            "{error}"
        );
    }

    fn write_helper(dir: &Path, name: &str, script: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn runs_credential_helpers() {
        let dir = tempfile::tempdir().unwrap();
        // The helper echoes the server address it was given as the user name.
        let helper = write_helper(
            dir.path(),
            "docker-credential-test",
            "#!/bin/sh\n[ \"$1\" = get ] || exit 9\nread address\nprintf '{\"ServerURL\":\"%s\",\"Username\":\"%s\",\"Secret\":\"helper-secret\"}' \"$address\" \"$address\"\n",
        );
        assert_eq!(
            run_credential_helper(&helper, "docker.io", server_address("docker.io")).unwrap(),
            Some(Credential::Basic {
                username: DOCKER_HUB_SERVER_ADDRESS.into(),
                password: Secret("helper-secret".into())
            })
        );
        let token_helper = write_helper(
            dir.path(),
            "docker-credential-token",
            "#!/bin/sh\nprintf '{\"Username\":\"<token>\",\"Secret\":\"refresh\"}'\n",
        );
        assert_eq!(
            run_credential_helper(&token_helper, "r.example.com", "r.example.com").unwrap(),
            Some(Credential::IdentityToken {
                token: Secret("refresh".into())
            })
        );
        let not_found = write_helper(
            dir.path(),
            "docker-credential-none",
            "#!/bin/sh\necho 'credentials not found in native keychain'\nexit 1\n",
        );
        assert_eq!(
            run_credential_helper(&not_found, "r.example.com", "r.example.com").unwrap(),
            None
        );
        let broken = write_helper(
            dir.path(),
            "docker-credential-broken",
            "#!/bin/sh\necho 'keychain locked' >&2\nexit 3\n",
        );
        let error = run_credential_helper(&broken, "r.example.com", "r.example.com").unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("keychain locked") && message.contains("r.example.com"),
            "{message}"
        );
        let missing = dir.path().join("docker-credential-missing");
        assert!(run_credential_helper(&missing, "r.example.com", "r.example.com").is_err());
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let credential = Credential::Basic {
            username: "alice".into(),
            password: Secret("hunter2".into()),
        };
        let shown = format!("{credential:?} {:?}", credential.basic_authorization());
        assert!(shown.contains("alice"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains(&base64_encode(b"alice:hunter2")), "{shown}");
        let token = Credential::IdentityToken {
            token: Secret("refresh-token-value".into()),
        };
        assert!(!format!("{token:?}").contains("refresh-token-value"));
    }
}
