//! An OCI distribution (Docker registry API v2) client: pull manifests and blobs, push blobs
//! and manifests, with Docker's authentication.
//!
//! # Connecting
//!
//! Every registry is reached over HTTPS with verified certificates, except, as with Docker,
//! loopback registries (`localhost`, `127.0.0.0/8`, `::1`) and the ones named in
//! [`ClientOptions::insecure_registries`]: for those, HTTPS is tried first without verifying
//! the certificate and plain HTTP is used when the registry does not speak TLS. The first
//! request to a registry is `GET /v2/`, which tells which scheme works and how the registry
//! wants to be authenticated; both are remembered for the client's lifetime.
//!
//! # Authentication
//!
//! The `/v2/` answer carries a challenge (`WWW-Authenticate`):
//!
//! - `Bearer realm=…,service=…`: the client asks the realm for a token scoped to what it is
//!   about to do (`repository:NAME:pull`, `repository:NAME:pull,push`, plus
//!   `repository:OTHER:pull` for a cross-repository mount), anonymously or with the user's
//!   credentials (Basic auth on the token request, or an OAuth2 refresh token), and caches the
//!   token per registry and scope set until it expires;
//! - `Basic`: the user's credentials go on every request;
//! - nothing: anonymous access.
//!
//! Credentials come from Docker's `config.json` (see [`auth`]); they are looked up only when a
//! registry asks for them, and they and the tokens are never formatted into an error or a
//! `Debug` output. Credentials are sent to a token realm only over HTTPS, or over plain HTTP
//! to the registry's own host when the registry itself is allowed plain HTTP (loopback or
//! `--insecure-registry`); a plain-HTTP realm on another host gets an anonymous token request,
//! and if it refuses, the error ([`RegistryError::InsecureRealm`]) says why nothing was sent.
//!
//! A registry that stops sending a body (a manifest, a token answer) for
//! [`ClientOptions::timeout`] is [`RegistryError::Stalled`], an environment error.
//!
//! # Reliability
//!
//! A request that times out, breaks off, or is answered `429` or `5xx` is retried with
//! exponential backoff ([`RetryPolicy`]), honouring `Retry-After`; when the attempts run out the
//! error says what the registry answered and how often. A registry that cannot be reached at
//! all (its name does not resolve, the connection is refused, no route) is
//! [`RegistryError::Unreachable`] at once: retrying would only make an offline machine wait. Every manifest and blob read is checked against
//! its digest (and blobs against their size) before anything is kept.

pub mod auth;
mod error;
mod pull;
mod push;
mod transport;

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use graphbuild_lang::platform::Platform;
use serde::Deserialize;
use ureq::http;

use crate::digest::{Digest, DigestWriter};
use crate::oci::{Descriptor, ImageIndex, OciPlatform, media, platform_preference};
use crate::reference::Reference;
use auth::{Challenge, Credential, Secret, percent_encode};

pub use error::RegistryError;
use transport::*;

/// The manifest media types a pull accepts, in the `Accept` header.
pub const ACCEPTED_MANIFEST_TYPES: [&str; 4] = [
    media::OCI_INDEX,
    media::DOCKER_MANIFEST_LIST,
    media::OCI_MANIFEST,
    media::DOCKER_MANIFEST,
];

/// Manifests larger than this are refused (containerd's limit).
const MAX_MANIFEST_SIZE: u64 = 4 * 1024 * 1024;
/// Error bodies are read up to this size, for their message.
const MAX_ERROR_BODY: u64 = 64 * 1024;
/// The longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// How often and how patiently to retry a request that failed to connect or was answered 429
/// or 5xx.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1).
    pub max_attempts: u32,
    /// The wait before the second attempt; doubled before each further one.
    pub initial_delay: Duration,
    /// The longest wait between two attempts (a `Retry-After` may ask for more, up to 60 s).
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(8),
        }
    }
}

/// How a [`RegistryClient`] connects and authenticates.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Registries (`host` or `host:port`) that may be reached over plain HTTP or HTTPS with an
    /// unverified certificate, like Docker's `--insecure-registry`. Loopback registries always
    /// may.
    pub insecure_registries: Vec<String>,
    /// The directory of Docker's `config.json`; `None` means `$DOCKER_CONFIG`, else
    /// `~/.docker`.
    pub docker_config_dir: Option<PathBuf>,
    pub user_agent: String,
    pub retry: RetryPolicy,
    /// Blobs up to this size are uploaded in one `PUT`; larger ones in `PATCH` chunks.
    pub chunk_threshold: u64,
    /// The size of one upload chunk.
    pub chunk_size: u64,
    /// How many blobs [`RegistryClient::fetch_blobs`] downloads at once.
    pub max_concurrent_fetches: usize,
    /// Connect timeout, and the longest silence while sending or receiving.
    pub timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            insecure_registries: Vec::new(),
            docker_config_dir: None,
            user_agent: format!("graphbuild/{}", env!("CARGO_PKG_VERSION")),
            retry: RetryPolicy::default(),
            chunk_threshold: 64 * 1024 * 1024,
            chunk_size: 16 * 1024 * 1024,
            max_concurrent_fetches: 4,
            timeout: Duration::from_secs(60),
        }
    }
}

/// A manifest or index as the registry served it, its digest checked.
#[derive(Clone, PartialEq, Eq)]
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    /// The exact bytes served (and hashed).
    pub bytes: Vec<u8>,
}

impl Manifest {
    /// An image index or a Docker manifest list.
    pub fn is_index(&self) -> bool {
        media::is_index(&self.media_type)
    }

    /// This manifest's descriptor (no platform).
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(
            self.media_type.clone(),
            self.digest,
            self.bytes.len() as u64,
        )
    }
}

impl fmt::Debug for Manifest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Manifest")
            .field("digest", &self.digest)
            .field("media_type", &self.media_type)
            .field("size", &self.bytes.len())
            .finish()
    }
}

/// A reference resolved for one platform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlatformManifest {
    /// The index the reference names, when it names one.
    pub index: Option<Manifest>,
    /// The platform's image manifest (the reference's own manifest when it is not an index).
    pub manifest: Manifest,
    /// The manifest's descriptor, with its platform when the index gave one.
    pub descriptor: Descriptor,
}

/// One blob for [`RegistryClient::fetch_blobs`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobFetch {
    pub digest: Digest,
    pub size: u64,
    /// Where the verified blob is written (renamed into place; its directory must exist).
    pub dest: PathBuf,
}

/// What [`RegistryClient::push_blob`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobPush {
    /// The repository already had the blob (checked with `HEAD`): nothing was sent.
    AlreadyPresent,
    /// The registry mounted it from the other repository: nothing was sent.
    Mounted,
    /// Uploaded in one request.
    Uploaded,
    /// Uploaded in this many `PATCH` chunks.
    UploadedInChunks(usize),
}

/// A registry client. Cheap to share across threads (`&RegistryClient` is `Send + Sync`); it
/// caches each registry's scheme and challenge, credentials and tokens.
pub struct RegistryClient {
    agent: ureq::Agent,
    insecure_agent: ureq::Agent,
    options: ClientOptions,
    config_dir: Option<PathBuf>,
    endpoints: Mutex<HashMap<String, Arc<Endpoint>>>,
    tokens: Mutex<HashMap<String, CachedToken>>,
}

impl fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let registries: Vec<String> = self
            .endpoints
            .lock()
            .map(|endpoints| endpoints.keys().cloned().collect())
            .unwrap_or_default();
        let cached_tokens = self.tokens.lock().map(|tokens| tokens.len()).unwrap_or(0);
        f.debug_struct("RegistryClient")
            .field("options", &self.options)
            .field("config_dir", &self.config_dir)
            .field("registries", &registries)
            .field("cached_tokens", &cached_tokens)
            .finish_non_exhaustive()
    }
}

impl RegistryClient {
    pub fn new(options: ClientOptions) -> RegistryClient {
        let build_agent = |insecure: bool| {
            let mut builder = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .user_agent(options.user_agent.as_str())
                .timeout_connect(Some(options.timeout))
                .timeout_per_read(Some(options.timeout))
                .timeout_per_write(Some(options.timeout))
                .max_redirects(10);
            if insecure {
                builder = builder.tls_config(
                    ureq::tls::TlsConfig::builder()
                        .disable_verification(true)
                        .build(),
                );
            }
            builder.build().new_agent()
        };
        RegistryClient {
            agent: build_agent(false),
            insecure_agent: build_agent(true),
            config_dir: auth::docker_config_dir(options.docker_config_dir.as_deref()),
            options,
            endpoints: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
        }
    }

    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    // -----------------------------------------------------------------------------------------
    // Pull
    // -----------------------------------------------------------------------------------------
}

/// From an image index (or Docker manifest list), the descriptor of the manifest for
/// `platform`: an exact match (after normalization: `arm64/v8` is `arm64`, `arm` is `arm/v7`),
/// else, as Docker does, the closest lower arm variant (`arm/v7` accepts `v6`, then `v5`).
/// Entries for `unknown/unknown` (attestations) are ignored. The error lists the platforms the
/// index has.
pub fn select_platform(index: &[u8], platform: &Platform) -> Result<Descriptor, RegistryError> {
    let index: ImageIndex =
        serde_json::from_slice(index).map_err(|error| RegistryError::Protocol {
            registry: String::from("(image index)"),
            message: format!("invalid image index: {error}"),
        })?;
    let requested = OciPlatform::from(platform);
    let mut best: Option<(usize, &Descriptor)> = None;
    let mut available: Vec<String> = Vec::new();
    for descriptor in &index.manifests {
        let Some(candidate) = &descriptor.platform else {
            continue;
        };
        if candidate.os == "unknown" || !media::is_manifest(&descriptor.media_type) {
            continue;
        }
        let shown = candidate.to_string();
        if !available.contains(&shown) {
            available.push(shown);
        }
        if let Some(preference) = platform_preference(&requested, candidate)
            && best.is_none_or(|(current, _)| preference < current)
        {
            best = Some((preference, descriptor));
        }
    }
    match best {
        Some((_, descriptor)) => Ok(descriptor.clone()),
        None => Err(RegistryError::PlatformMissing {
            image: "the image index".into(),
            platform: platform.to_string(),
            available,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::pull::manifest_media_type;
    use super::*;

    fn platform(text: &str) -> Platform {
        Platform::parse(text).unwrap()
    }

    const INDEX: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
        {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","size":1,"platform":{"architecture":"amd64","os":"linux"}},
        {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:2222222222222222222222222222222222222222222222222222222222222222","size":2,"platform":{"architecture":"arm64","os":"linux","variant":"v8"}},
        {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:3333333333333333333333333333333333333333333333333333333333333333","size":3,"platform":{"architecture":"arm","os":"linux","variant":"v6"}},
        {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:4444444444444444444444444444444444444444444444444444444444444444","size":4,"platform":{"architecture":"unknown","os":"unknown"}}
    ]}"#;

    #[test]
    fn realm_hosts_are_compared_without_ports_or_userinfo() {
        assert!(same_host(
            "http://127.0.0.1:5001/token",
            "http://127.0.0.1:5000"
        ));
        assert!(same_host(
            "http://Registry.Local/token?x=1",
            "https://registry.local:443"
        ));
        assert!(same_host("http://[::1]:9/token", "http://[::1]:5000"));
        assert!(!same_host(
            "http://127.0.0.2:5000/token",
            "http://127.0.0.1:5000"
        ));
        assert!(!same_host(
            "http://evil.example@127.0.0.2/token",
            "http://127.0.0.1"
        ));
        assert!(!same_host(
            "http://127.0.0.1.evil.example/",
            "http://127.0.0.1:5000"
        ));
        assert!(!same_host("not a url", "http://127.0.0.1"));
        assert!(!same_host("http:///token", "http:///"));
    }

    #[test]
    fn selects_platforms_with_docker_rules() {
        let size_for = |text: &str| {
            select_platform(INDEX.as_bytes(), &platform(text)).map(|descriptor| descriptor.size)
        };
        assert_eq!(size_for("linux/amd64").unwrap(), 1);
        // arm64/v8 in the index is arm64.
        assert_eq!(size_for("linux/arm64").unwrap(), 2);
        // arm/v7 falls back to v6, as Docker does.
        assert_eq!(size_for("linux/arm/v7").unwrap(), 3);
        assert_eq!(size_for("linux/arm/v6").unwrap(), 3);
        // v5 cannot run a v6 image.
        let error = size_for("linux/arm/v5").unwrap_err();
        let message = error.to_string();
        assert_eq!(
            message,
            "the image index has no manifest for linux/arm/v5; it has linux/amd64, linux/arm64/v8, linux/arm/v6"
        );
        assert!(size_for("linux/s390x").is_err());
    }

    #[test]
    fn media_type_from_header_or_document() {
        assert_eq!(
            manifest_media_type(
                Some("application/vnd.oci.image.index.v1+json; charset=utf-8"),
                b"{}"
            )
            .as_deref(),
            Some(media::OCI_INDEX)
        );
        assert_eq!(
            manifest_media_type(Some("application/json"), br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#).as_deref(),
            Some(media::DOCKER_MANIFEST)
        );
        assert_eq!(
            manifest_media_type(None, br#"{"schemaVersion":2,"manifests":[]}"#).as_deref(),
            Some(media::OCI_INDEX)
        );
        assert_eq!(
            manifest_media_type(None, br#"{"schemaVersion":1,"fsLayers":[]}"#),
            None
        );
    }

    #[test]
    fn plain_http_only_for_loopback_and_insecure_registries() {
        let client = RegistryClient::new(ClientOptions {
            insecure_registries: vec!["registry.lan:5000".into(), "other.lan".into()],
            ..ClientOptions::default()
        });
        let allowed = |text: &str| client.plain_http_allowed(&Reference::parse(text).unwrap());
        assert!(allowed("localhost/x"));
        assert!(allowed("localhost:5000/x"));
        assert!(allowed("127.0.0.1:5000/x"));
        assert!(allowed("127.1.2.3/x"));
        assert!(allowed("[::1]:5000/x"));
        assert!(allowed("registry.lan:5000/x"));
        assert!(allowed("other.lan:8443/x"));
        assert!(!allowed("registry.lan/x"));
        assert!(!allowed("busybox"));
        assert!(!allowed("ghcr.io/x"));
        assert!(!allowed("128.0.0.1/x"));
    }

    #[test]
    fn only_a_registry_nothing_can_connect_to_fails_without_retries() {
        let io = |kind: io::ErrorKind| ureq::Error::Io(io::Error::from(kind));
        for kind in [
            io::ErrorKind::ConnectionRefused,
            io::ErrorKind::HostUnreachable,
            io::ErrorKind::NetworkUnreachable,
        ] {
            assert!(no_route_to(&io(kind)), "{kind:?}");
        }
        assert!(no_route_to(&ureq::Error::HostNotFound));
        let dns = io::Error::other(
            "failed to lookup address information: Temporary failure in name resolution",
        );
        assert!(no_route_to(&ureq::Error::Io(dns)));
        // A reset, a broken pipe or a timeout may pass: they keep their retries.
        assert!(!no_route_to(&io(io::ErrorKind::ConnectionReset)));
        assert!(!no_route_to(&io(io::ErrorKind::BrokenPipe)));
        assert!(!no_route_to(&io(io::ErrorKind::TimedOut)));
        assert!(!no_route_to(&ureq::Error::Timeout(ureq::Timeout::Connect)));
    }

    #[test]
    fn scopes_name_every_repository_involved() {
        assert_eq!(
            Access::pull("library/busybox").scopes(),
            ["repository:library/busybox:pull"]
        );
        assert_eq!(
            Access::push("team/app", Some("team/base")).scopes(),
            ["repository:team/app:pull,push", "repository:team/base:pull"]
        );
    }
}
