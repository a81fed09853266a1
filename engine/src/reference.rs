//! Image references (`docker.io/library/busybox:1.36`, `host:5000/team/app@sha256:…`) with
//! Docker's normalization.
//!
//! # Grammar
//!
//! A reference is `[REGISTRY/]REPOSITORY[:TAG][@DIGEST]`, exactly as Docker's
//! `distribution/reference` package reads it:
//!
//! - The first `/`-separated component is a **registry** when it contains a `.` or a `:`, is
//!   `localhost`, or has an uppercase letter; otherwise the registry is `docker.io`. A
//!   one-component repository on `docker.io` lives under `library/`: `busybox` is
//!   `docker.io/library/busybox`. `index.docker.io` is a spelling of `docker.io`.
//! - The **repository** is one or more components of lowercase letters and digits, separated
//!   inside a component by `.`, `_`, `__` or any number of `-`. The full name (registry and
//!   repository) is at most 255 characters.
//! - A **tag** is at most 128 characters of letters, digits, `_`, `.` and `-`, and does not
//!   start with `.` or `-`. A reference without tag nor digest gets the tag `latest`.
//! - A **digest** is `sha256:` and 64 lowercase hex digits (the only algorithm OCI registries
//!   use for content). A reference may carry a tag and a digest together: the digest is what
//!   is pulled, the tag is documentation.
//!
//! [`Reference`]'s `Display` is the normalized full form, which is what the lock file and the
//! cache key record. [`Reference::registry_host`] is the host to connect to, which differs
//! from the name only for Docker Hub (`registry-1.docker.io`).

use std::fmt;
use std::str::FromStr;

use crate::digest::Digest;

/// The registry that names without a registry component refer to.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that serves Docker Hub's registry API.
pub const DOCKER_HUB_HOST: &str = "registry-1.docker.io";
/// The tag a reference gets when it names neither a tag nor a digest.
pub const DEFAULT_TAG: &str = "latest";

const MAX_NAME_LENGTH: usize = 255;
const MAX_TAG_LENGTH: usize = 128;

/// A parsed, normalized image reference.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference {
    /// `docker.io`, `ghcr.io`, `localhost:5000`, `[::1]:5000`.
    pub registry: String,
    /// `library/busybox`, `team/app`.
    pub repository: String,
    /// `latest` when the reference names neither a tag nor a digest.
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

/// Why a reference was rejected. Every message quotes the reference as written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, miette::Diagnostic)]
pub enum ReferenceError {
    #[error("empty image reference")]
    #[diagnostic(
        code(graphbuild::reference::empty),
        help("write an image reference such as `docker.io/library/busybox:1.36`")
    )]
    Empty,

    #[error(
        "invalid image reference `{reference}`: repository name `{repository}` must be lowercase"
    )]
    #[diagnostic(
        code(graphbuild::reference::uppercase),
        help("write the repository in lowercase: `{suggestion}`")
    )]
    UppercaseRepository {
        reference: String,
        repository: String,
        suggestion: String,
    },

    #[error(
        "invalid image reference `{reference}`: invalid repository name `{repository}`: {reason}"
    )]
    #[diagnostic(
        code(graphbuild::reference::repository),
        help(
            "a repository is `/`-separated components of lowercase letters and digits, joined inside a component by `.`, `_`, `__` or `-`"
        )
    )]
    InvalidRepository {
        reference: String,
        repository: String,
        reason: String,
    },

    #[error("invalid image reference `{reference}`: invalid registry `{registry}`")]
    #[diagnostic(
        code(graphbuild::reference::registry),
        help(
            "a registry is a host name or IP address with an optional port: `registry.example.com:5000`, `[::1]:5000`"
        )
    )]
    InvalidRegistry { reference: String, registry: String },

    #[error("invalid image reference `{reference}`: invalid tag `{tag}`")]
    #[diagnostic(
        code(graphbuild::reference::tag),
        help("a tag is letters, digits, `_`, `.` and `-`, and cannot start with `.` or `-`")
    )]
    InvalidTag { reference: String, tag: String },

    #[error(
        "invalid image reference `{reference}`: the tag is {length} characters long, the limit is 128"
    )]
    #[diagnostic(code(graphbuild::reference::tag_length), help("use a shorter tag"))]
    TagTooLong { reference: String, length: usize },

    #[error(
        "invalid image reference `{reference}`: the name is {length} characters long, the limit is 255"
    )]
    #[diagnostic(
        code(graphbuild::reference::name_length),
        help("use a shorter registry and repository name")
    )]
    NameTooLong { reference: String, length: usize },

    #[error("invalid image reference `{reference}`: invalid digest `{digest}`")]
    #[diagnostic(
        code(graphbuild::reference::digest),
        help("a digest is `sha256:` followed by 64 lowercase hexadecimal digits")
    )]
    InvalidDigest { reference: String, digest: String },
}

impl Reference {
    /// Parse and normalize a reference (see the module docs for the grammar).
    pub fn parse(input: &str) -> Result<Reference, ReferenceError> {
        if input.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let reference = input.to_string();

        let (name_and_tag, digest) = match input.split_once('@') {
            Some((rest, digest_text)) => {
                let digest =
                    parse_digest(digest_text).ok_or_else(|| ReferenceError::InvalidDigest {
                        reference: reference.clone(),
                        digest: digest_text.to_string(),
                    })?;
                (rest, Some(digest))
            }
            None => (input, None),
        };

        // The tag follows the last `:` that comes after the last `/` (a `:` before it is a port).
        let last_slash = name_and_tag.rfind('/').map_or(0, |index| index + 1);
        let (name, tag) = match name_and_tag[last_slash..].rfind(':') {
            Some(colon) => {
                let colon = last_slash + colon;
                (&name_and_tag[..colon], Some(&name_and_tag[colon + 1..]))
            }
            None => (name_and_tag, None),
        };
        if let Some(tag) = tag {
            validate_tag(&reference, tag)?;
        }
        if name.is_empty() {
            return Err(ReferenceError::InvalidRepository {
                reference,
                repository: String::new(),
                reason: "the repository name is empty".into(),
            });
        }

        let (registry, repository) = split_registry(name);
        let registry = match registry {
            Some(registry) => {
                if !valid_registry(registry) {
                    return Err(ReferenceError::InvalidRegistry {
                        reference,
                        registry: registry.to_string(),
                    });
                }
                if registry == "index.docker.io" {
                    DOCKER_HUB.to_string()
                } else {
                    registry.to_string()
                }
            }
            None => DOCKER_HUB.to_string(),
        };
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository.to_string()
        };
        validate_repository(&reference, &registry, &repository)?;

        let name_length = registry.len() + 1 + repository.len();
        if name_length > MAX_NAME_LENGTH {
            return Err(ReferenceError::NameTooLong {
                reference,
                length: name_length,
            });
        }

        let tag = match (tag, digest) {
            (Some(tag), _) => Some(tag.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_TAG.to_string()),
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The host (and port) to connect to: the registry, except `registry-1.docker.io` for
    /// Docker Hub.
    pub fn registry_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_HOST
        } else {
            &self.registry
        }
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// What goes after `/manifests/` in the registry API: the digest when there is one (it is
    /// what identifies the content), else the tag.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => digest.to_string(),
            (None, Some(tag)) => tag.clone(),
            (None, None) => DEFAULT_TAG.to_string(),
        }
    }

    /// The same repository, pinned to `digest` (the tag is kept for documentation).
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference {
            digest: Some(digest),
            ..self.clone()
        }
    }

    /// The same repository under `tag`, without a digest.
    pub fn with_tag(&self, tag: &str) -> Result<Reference, ReferenceError> {
        validate_tag(&format!("{}:{tag}", self.name()), tag)?;
        Ok(Reference {
            tag: Some(tag.to_string()),
            digest: None,
            ..self.clone()
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        Reference::parse(input)
    }
}

/// Docker's `splitDockerDomain`: the first component is a registry when it looks like a host.
fn split_registry(name: &str) -> (Option<&str>, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains('.')
                || first.contains(':')
                || first == "localhost"
                || first.bytes().any(|byte| byte.is_ascii_uppercase()) =>
        {
            (Some(first), rest)
        }
        _ => (None, name),
    }
}

fn parse_digest(text: &str) -> Option<Digest> {
    let hex_part = text.strip_prefix("sha256:")?;
    if !hex_part
        .bytes()
        .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
    {
        return None;
    }
    Digest::from_hex(hex_part)
}

fn validate_tag(reference: &str, tag: &str) -> Result<(), ReferenceError> {
    let word = |byte: u8| byte.is_ascii_alphanumeric() || byte == b'_';
    let valid = match tag.as_bytes() {
        [first, rest @ ..] => {
            word(*first)
                && rest
                    .iter()
                    .all(|&byte| word(byte) || byte == b'.' || byte == b'-')
        }
        [] => false,
    };
    if !valid {
        return Err(ReferenceError::InvalidTag {
            reference: reference.to_string(),
            tag: tag.to_string(),
        });
    }
    if tag.len() > MAX_TAG_LENGTH {
        return Err(ReferenceError::TagTooLong {
            reference: reference.to_string(),
            length: tag.len(),
        });
    }
    Ok(())
}

/// A host name, an IPv4 address or a bracketed IPv6 address, then an optional port.
fn valid_registry(registry: &str) -> bool {
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        let Some((address, after)) = rest.split_once(']') else {
            return false;
        };
        if address.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match after {
            "" => return true,
            _ => match after.strip_prefix(':') {
                Some(port) => ("", Some(port)),
                None => return false,
            },
        }
    } else {
        match registry.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (registry, None),
        }
    };
    if let Some(port) = port
        && (port.is_empty() || port.len() > 5 || !port.bytes().all(|byte| byte.is_ascii_digit()))
    {
        return false;
    }
    if registry.starts_with('[') {
        return true;
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn validate_repository(
    reference: &str,
    registry: &str,
    repository: &str,
) -> Result<(), ReferenceError> {
    let invalid = |reason: String| ReferenceError::InvalidRepository {
        reference: reference.to_string(),
        repository: repository.to_string(),
        reason,
    };
    if repository.bytes().any(|byte| byte.is_ascii_uppercase()) {
        let lowercase = repository.to_ascii_lowercase();
        let shown_registry = if registry == DOCKER_HUB {
            String::new()
        } else {
            format!("{registry}/")
        };
        return Err(ReferenceError::UppercaseRepository {
            reference: reference.to_string(),
            repository: repository.to_string(),
            suggestion: format!(
                "{shown_registry}{}",
                lowercase.strip_prefix("library/").unwrap_or(&lowercase)
            ),
        });
    }
    for component in repository.split('/') {
        if component.is_empty() {
            return Err(invalid("it has an empty path component".into()));
        }
        if let Some(byte) = component
            .bytes()
            .find(|byte| !matches!(byte, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
        {
            return Err(invalid(format!(
                "`{}` is not allowed",
                char::from(byte).escape_default()
            )));
        }
        if !valid_path_component(component) {
            return Err(invalid(format!(
                "the component `{component}` must start and end with a letter or digit, with single `.`, single or double `_`, or `-` between"
            )));
        }
    }
    Ok(())
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*`
fn valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alphanumeric = |byte: u8| byte.is_ascii_lowercase() || byte.is_ascii_digit();
    if !bytes.first().is_some_and(|&byte| alphanumeric(byte))
        || !bytes.last().is_some_and(|&byte| alphanumeric(byte))
    {
        return false;
    }
    let mut index = 0;
    while index < bytes.len() {
        if alphanumeric(bytes[index]) {
            index += 1;
            continue;
        }
        let start = index;
        while index < bytes.len() && !alphanumeric(bytes[index]) {
            index += 1;
        }
        let separator = &component[start..index];
        let allowed = separator == "."
            || separator == "_"
            || separator == "__"
            || separator.bytes().all(|byte| byte == b'-');
        if !allowed {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "d4c00c7b6456a7ba455a2a26521cc97eba8c841bc9e0c0553d8159928c55ec88";

    /// Input, registry, repository, tag, whether it has a digest, normalized display.
    type NormalizationCase = (
        String,
        &'static str,
        &'static str,
        Option<&'static str>,
        bool,
        String,
    );

    #[test]
    fn normalizes_like_docker() {
        let digest = format!("sha256:{HEX}");
        let cases: Vec<NormalizationCase> = vec![
            // input, registry, repository, tag, has digest, display
            (
                "busybox".into(),
                "docker.io",
                "library/busybox",
                Some("latest"),
                false,
                "docker.io/library/busybox:latest".into(),
            ),
            (
                "busybox:1.36".into(),
                "docker.io",
                "library/busybox",
                Some("1.36"),
                false,
                "docker.io/library/busybox:1.36".into(),
            ),
            (
                "user/app".into(),
                "docker.io",
                "user/app",
                Some("latest"),
                false,
                "docker.io/user/app:latest".into(),
            ),
            (
                "docker.io/busybox".into(),
                "docker.io",
                "library/busybox",
                Some("latest"),
                false,
                "docker.io/library/busybox:latest".into(),
            ),
            (
                "index.docker.io/library/busybox:1".into(),
                "docker.io",
                "library/busybox",
                Some("1"),
                false,
                "docker.io/library/busybox:1".into(),
            ),
            (
                "localhost/x".into(),
                "localhost",
                "x",
                Some("latest"),
                false,
                "localhost/x:latest".into(),
            ),
            (
                "localhost:5000/x/y:dev".into(),
                "localhost:5000",
                "x/y",
                Some("dev"),
                false,
                "localhost:5000/x/y:dev".into(),
            ),
            (
                "registry.example.com:5000/team/app:v1.2-rc_3".into(),
                "registry.example.com:5000",
                "team/app",
                Some("v1.2-rc_3"),
                false,
                "registry.example.com:5000/team/app:v1.2-rc_3".into(),
            ),
            (
                "ghcr.io/a/b/c".into(),
                "ghcr.io",
                "a/b/c",
                Some("latest"),
                false,
                "ghcr.io/a/b/c:latest".into(),
            ),
            (
                "127.0.0.1:5000/busybox:1.35.0".into(),
                "127.0.0.1:5000",
                "busybox",
                Some("1.35.0"),
                false,
                "127.0.0.1:5000/busybox:1.35.0".into(),
            ),
            (
                "[::1]:5000/busybox".into(),
                "[::1]:5000",
                "busybox",
                Some("latest"),
                false,
                "[::1]:5000/busybox:latest".into(),
            ),
            (
                format!("busybox@{digest}"),
                "docker.io",
                "library/busybox",
                None,
                true,
                format!("docker.io/library/busybox@{digest}"),
            ),
            (
                format!("busybox:1.36@{digest}"),
                "docker.io",
                "library/busybox",
                Some("1.36"),
                true,
                format!("docker.io/library/busybox:1.36@{digest}"),
            ),
            (
                format!("host:5000/app@{digest}"),
                "host:5000",
                "app",
                None,
                true,
                format!("host:5000/app@{digest}"),
            ),
            (
                "a.b-c/e---f".into(),
                "a.b-c",
                "e---f",
                Some("latest"),
                false,
                "a.b-c/e---f:latest".into(),
            ),
            (
                "foo__bar/x".into(),
                "docker.io",
                "foo__bar/x",
                Some("latest"),
                false,
                "docker.io/foo__bar/x:latest".into(),
            ),
            (
                "foo_bar/baz.qux".into(),
                "docker.io",
                "foo_bar/baz.qux",
                Some("latest"),
                false,
                "docker.io/foo_bar/baz.qux:latest".into(),
            ),
        ];
        for (input, registry, repository, tag, has_digest, display) in cases {
            let reference =
                Reference::parse(&input).unwrap_or_else(|error| panic!("{input}: {error}"));
            assert_eq!(reference.registry, registry, "{input}");
            assert_eq!(reference.repository, repository, "{input}");
            assert_eq!(reference.tag.as_deref(), tag, "{input}");
            assert_eq!(reference.digest.is_some(), has_digest, "{input}");
            assert_eq!(reference.to_string(), display, "{input}");
            // The normalized form parses back to itself.
            assert_eq!(
                Reference::parse(&display).as_ref(),
                Ok(&reference),
                "{input}"
            );
        }
    }

    #[test]
    fn registry_host_and_manifest_reference() {
        let hub = Reference::parse("busybox").unwrap();
        assert_eq!(hub.registry_host(), "registry-1.docker.io");
        assert_eq!(hub.manifest_reference(), "latest");
        let local = Reference::parse(&format!("localhost:5000/x:tag@sha256:{HEX}")).unwrap();
        assert_eq!(local.registry_host(), "localhost:5000");
        assert_eq!(local.manifest_reference(), format!("sha256:{HEX}"));
        assert_eq!(local.name(), "localhost:5000/x");
        let retagged = local.with_tag("other").unwrap();
        assert_eq!(retagged.to_string(), "localhost:5000/x:other");
        assert!(local.with_tag("-bad").is_err());
    }

    #[test]
    fn rejects_with_precise_messages() {
        let long_tag = "t".repeat(129);
        let long_name = format!("example.com/{}", "a".repeat(250));
        let cases: Vec<(String, &str)> = vec![
            ("".into(), "empty image reference"),
            (
                "Busybox".into(),
                "repository name `library/Busybox` must be lowercase",
            ),
            (
                "example.com/Team/app".into(),
                "repository name `Team/app` must be lowercase",
            ),
            ("busybox:bad/tag!".into(), "invalid registry `busybox:bad`"),
            ("busybox:bad!tag".into(), "invalid tag `bad!tag`"),
            ("busybox:.hidden".into(), "invalid tag `.hidden`"),
            ("busybox:".into(), "invalid tag ``"),
            (
                format!("busybox:{long_tag}"),
                "the tag is 129 characters long, the limit is 128",
            ),
            (
                long_name.clone(),
                "the name is 262 characters long, the limit is 255",
            ),
            ("busybox@sha256:abc".into(), "invalid digest `sha256:abc`"),
            (format!("busybox@sha512:{HEX}"), "invalid digest `sha512:"),
            (
                format!("busybox@sha256:{}", HEX.to_uppercase()),
                "invalid digest",
            ),
            ("busybox@".into(), "invalid digest ``"),
            ("team//app".into(), "it has an empty path component"),
            (
                "team/app-".into(),
                "the component `app-` must start and end",
            ),
            ("team/a..b".into(), "the component `a..b`"),
            ("team/a___b".into(), "the component `a___b`"),
            ("team/a b".into(), "` ` is not allowed"),
            (
                "exa_mple.com:5000/app".into(),
                "invalid registry `exa_mple.com:5000`",
            ),
            (
                "example.com:port/app".into(),
                "invalid registry `example.com:port`",
            ),
            ("[::zz]:5000/app".into(), "invalid registry `[::zz]:5000`"),
            ("/app".into(), "it has an empty path component"),
        ];
        for (input, expected) in cases {
            let error = Reference::parse(&input).expect_err(&input);
            let message = error.to_string();
            assert!(
                message.contains(expected),
                "{input}: `{message}` does not contain `{expected}`"
            );
            if !input.is_empty() {
                assert!(
                    message.contains(&format!("`{input}`")),
                    "{input}: `{message}` does not quote the reference"
                );
            }
        }
    }

    #[test]
    fn uppercase_help_suggests_the_lowercase_name() {
        let error = Reference::parse("Busybox:1.36").unwrap_err();
        let ReferenceError::UppercaseRepository { suggestion, .. } = &error else {
            panic!("{error:?}")
        };
        assert_eq!(suggestion, "busybox");
        let error = Reference::parse("ghcr.io/Org/App").unwrap_err();
        let ReferenceError::UppercaseRepository { suggestion, .. } = &error else {
            panic!("{error:?}")
        };
        assert_eq!(suggestion, "ghcr.io/org/app");
    }
}
