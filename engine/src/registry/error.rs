//! What can go wrong talking to a registry, and whether it is the environment's fault.

use super::*;

/// Loopback registries may always use plain HTTP; others need `--insecure-registry`.
pub(super) fn insecure_hint(registry: &str) -> String {
    let host = registry.rsplit_once(':').map_or(registry, |(host, _)| host);
    let loopback =
        host == "localhost" || host.starts_with("127.") || host == "[::1]" || host == "::1";
    if loopback {
        String::new()
    } else {
        format!("; a registry without TLS must be named with `--insecure-registry {registry}`")
    }
}

impl RegistryError {
    /// Whether the problem is the environment (network, credentials) rather than the input.
    pub fn is_environment(&self) -> bool {
        matches!(
            self,
            RegistryError::Unreachable { .. }
                | RegistryError::Stalled { .. }
                | RegistryError::InsecureRealm { .. }
                | RegistryError::Io { .. }
                | RegistryError::Unauthorized { .. }
                | RegistryError::Unavailable { .. }
                | RegistryError::DockerConfig { .. }
                | RegistryError::CredentialHelper { .. }
        )
    }
}

/// Everything that can go wrong talking to a registry. No variant ever holds a credential or
/// a token.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum RegistryError {
    #[error("cannot reach the registry {registry}: {reason}")]
    #[diagnostic(
        code(graphbuild::registry::unreachable),
        help(
            "check the registry name and the network, and that the registry is running{}",
            insecure_hint(registry)
        )
    )]
    Unreachable {
        registry: String,
        reason: String,
        /// Nothing could be connected to at all: the name does not resolve, the connection was
        /// refused, or there is no route (no network). Not retried; a base that fails so is
        /// unresolved rather than an error.
        no_route: bool,
    },

    #[error("the registry {registry} refused access ({status}){detail}")]
    #[diagnostic(
        code(graphbuild::registry::unauthorized),
        help(
            "log in with `docker login {registry}`, or check the credentials stored for {registry} in Docker's config.json ($DOCKER_CONFIG, default ~/.docker) and that they may {action} this repository"
        )
    )]
    Unauthorized {
        registry: String,
        status: u16,
        action: &'static str,
        detail: String,
    },

    #[error("manifest unknown: `{reference}` does not exist in its registry{detail}")]
    #[diagnostic(
        code(graphbuild::registry::manifest_unknown),
        help(
            "check the repository name and the tag or digest (`skopeo list-tags docker://{repository}` lists the tags)"
        )
    )]
    ManifestUnknown {
        reference: String,
        repository: String,
        detail: String,
    },

    #[error("blob {digest} is unknown to {repository}")]
    #[diagnostic(
        code(graphbuild::registry::blob_unknown),
        help(
            "the manifest names a layer the registry does not have; the image in the registry is incomplete"
        )
    )]
    BlobUnknown { repository: String, digest: Digest },

    #[error(
        "{image} has no manifest for {platform}; it has {}",
        list_or_none(available)
    )]
    #[diagnostic(
        code(graphbuild::registry::platform_missing),
        help(
            "build this image only for the platforms its base provides (`platforms …` on the image), or pick a base image that has {platform}"
        )
    )]
    PlatformMissing {
        image: String,
        platform: String,
        available: Vec<String>,
    },

    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    #[diagnostic(
        code(graphbuild::registry::digest_mismatch),
        help(
            "the registry (or something between it and graphbuild) served different content than the digest names; nothing was kept"
        )
    )]
    DigestMismatch {
        what: String,
        expected: Digest,
        actual: Digest,
    },

    #[error("size mismatch for {what}: expected {expected} bytes, got {actual}")]
    #[diagnostic(
        code(graphbuild::registry::size_mismatch),
        help(
            "the registry served a blob of another size than its descriptor says; nothing was kept"
        )
    )]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },

    #[error("the registry {registry} answered {status} {attempts} times in a row")]
    #[diagnostic(
        code(graphbuild::registry::unavailable),
        help("the registry is overloaded (429) or failing (5xx); try again later")
    )]
    Unavailable {
        registry: String,
        status: u16,
        attempts: u32,
    },

    #[error("the registry {registry} stopped sending {what}: {reason}")]
    #[diagnostic(
        code(graphbuild::registry::stalled),
        help(
            "the registry (or a proxy in front of it) accepted the request but stopped answering; check that it is healthy, then try again"
        )
    )]
    Stalled {
        registry: String,
        what: String,
        reason: String,
    },

    #[error(
        "graphbuild did not send the credentials for {registry} to its token service {realm}: it is plain HTTP on another host"
    )]
    #[diagnostic(
        code(graphbuild::registry::insecure_realm),
        help(
            "credentials go to a token service on another host only over HTTPS; configure the registry's token realm with an https:// URL (or on the registry's own host)"
        )
    )]
    InsecureRealm {
        registry: String,
        realm: String,
        status: u16,
    },

    #[error("the registry {registry} answered {status} to {method} {path}{detail}")]
    #[diagnostic(
        code(graphbuild::registry::unexpected_status),
        help(
            "graphbuild does not expect this answer here; check the registry's logs, or the proxy in front of it"
        )
    )]
    UnexpectedStatus {
        registry: String,
        method: String,
        path: String,
        status: u16,
        detail: String,
    },

    #[error("the registry {registry} sent an invalid answer: {message}")]
    #[diagnostic(
        code(graphbuild::registry::protocol),
        help(
            "the registry does not follow the OCI distribution API here; check the registry name, or the proxy in front of it"
        )
    )]
    Protocol { registry: String, message: String },

    #[error("`{reference}` is a {media_type}, which graphbuild cannot use")]
    #[diagnostic(
        code(graphbuild::registry::media_type),
        help(
            "graphbuild reads OCI image indexes and manifests and Docker schema 2 manifests and manifest lists; re-push the image with a current tool"
        )
    )]
    UnsupportedMediaType {
        reference: String,
        media_type: String,
    },

    #[error("cannot read Docker's config file {}: {message}", path.display())]
    #[diagnostic(
        code(graphbuild::registry::docker_config),
        help("fix the file, or log in again with `docker login`")
    )]
    DockerConfig { path: PathBuf, message: String },

    #[error("the credential helper `{helper}` gave no credentials for {registry}: {message}")]
    #[diagnostic(
        code(graphbuild::registry::credential_helper),
        help(
            "check that the helper is installed and on PATH, or log in again with `docker login {registry}`"
        )
    )]
    CredentialHelper {
        helper: String,
        registry: String,
        message: String,
    },

    #[error("cannot {action} {}: {source}", path.display())]
    #[diagnostic(
        code(graphbuild::registry::io),
        help("check the free space and the permissions of that directory")
    )]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub(super) fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "no image for any platform".to_string()
    } else {
        items.join(", ")
    }
}
