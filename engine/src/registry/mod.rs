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

/// Loopback registries may always use plain HTTP; others need `--insecure-registry`.
fn insecure_hint(registry: &str) -> String {
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

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "no image for any platform".to_string()
    } else {
        items.join(", ")
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

/// What a request needs permission for, as token scopes.
#[derive(Clone, Debug)]
struct Access {
    repository: String,
    push: bool,
    mount_from: Option<String>,
}

impl Access {
    fn pull(repository: &str) -> Access {
        Access {
            repository: repository.to_string(),
            push: false,
            mount_from: None,
        }
    }

    fn push(repository: &str, mount_from: Option<&str>) -> Access {
        Access {
            repository: repository.to_string(),
            push: true,
            mount_from: mount_from.map(str::to_string),
        }
    }

    fn scopes(&self) -> Vec<String> {
        let actions = if self.push { "pull,push" } else { "pull" };
        let mut scopes = vec![format!("repository:{}:{actions}", self.repository)];
        if let Some(other) = &self.mount_from {
            scopes.push(format!("repository:{other}:pull"));
        }
        scopes
    }

    fn action(&self) -> &'static str {
        if self.push { "push to" } else { "pull from" }
    }
}

/// A request other than a blob transfer must finish within this many
/// [`ClientOptions::timeout`]s.
const SMALL_CALL_TIMEOUTS: u32 = 3;

/// What `/v2/` told about a registry.
#[derive(Debug)]
struct Endpoint {
    /// `https://host:port` or `http://host:port`.
    base_url: String,
    /// Whether HTTPS certificates go unverified (an insecure registry).
    insecure_tls: bool,
    /// Whether credentials may go over plain HTTP to this registry's realm.
    plain_http_allowed: bool,
    challenge: Challenge,
    /// Looked up the first time the registry asks for credentials.
    credential: Mutex<Option<Option<Credential>>>,
}

struct CachedToken {
    authorization: Secret,
    expires: Instant,
}

/// A request body that can be sent again (retries, re-authentication).
#[derive(Clone, Copy)]
enum RequestBody<'a> {
    Empty,
    Bytes(&'a [u8]),
    FileRange {
        path: &'a Path,
        offset: u64,
        length: u64,
    },
}

struct Call<'a> {
    method: http::Method,
    url: String,
    headers: Vec<(&'static str, String)>,
    body: RequestBody<'a>,
}

type Response = http::Response<ureq::Body>;

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

    /// Fetch the manifest or index `reference` names (by digest when it has one, else by
    /// tag), accepting OCI and Docker schema 2 types, and check its digest: against the
    /// reference's digest when it has one, else against `Docker-Content-Digest` when the
    /// registry sends it.
    pub fn resolve(&self, reference: &Reference) -> Result<Manifest, RegistryError> {
        let registry = reference.registry.as_str();
        let endpoint = self.endpoint(reference)?;
        let path = format!(
            "/v2/{}/manifests/{}",
            reference.repository,
            reference.manifest_reference()
        );
        let call = Call {
            method: http::Method::GET,
            url: format!("{}{path}", endpoint.base_url),
            headers: vec![("Accept", ACCEPTED_MANIFEST_TYPES.join(", "))],
            body: RequestBody::Empty,
        };
        let mut response = self.execute(
            registry,
            &endpoint,
            &Access::pull(&reference.repository),
            &call,
        )?;
        match response.status().as_u16() {
            200 => {}
            404 => {
                return Err(RegistryError::ManifestUnknown {
                    reference: reference.to_string(),
                    repository: reference.name(),
                    detail: error_detail(&mut response),
                });
            }
            status => {
                return Err(unexpected_status(
                    registry,
                    "GET",
                    &path,
                    status,
                    &mut response,
                ));
            }
        }
        let header_digest = header(&response, "docker-content-digest");
        let content_type = header(&response, "content-type");
        let bytes = response
            .body_mut()
            .with_config()
            .limit(MAX_MANIFEST_SIZE)
            .read_to_vec()
            .map_err(|error| {
                body_read_error(registry, &format!("the manifest of `{reference}`"), error)
            })?;
        let digest = Digest::of(&bytes);
        if let Some(expected) = reference.digest {
            if expected != digest {
                return Err(RegistryError::DigestMismatch {
                    what: format!("the manifest of `{reference}`"),
                    expected,
                    actual: digest,
                });
            }
        } else if let Some(expected) = header_digest.and_then(|text| text.parse::<Digest>().ok())
            && expected != digest
        {
            return Err(RegistryError::DigestMismatch {
                what: format!("the manifest of `{reference}` (Docker-Content-Digest)"),
                expected,
                actual: digest,
            });
        }
        let media_type = manifest_media_type(content_type.as_deref(), &bytes).ok_or_else(|| {
            RegistryError::UnsupportedMediaType {
                reference: reference.to_string(),
                media_type: content_type
                    .clone()
                    .unwrap_or_else(|| "manifest of unknown type".into()),
            }
        })?;
        Ok(Manifest {
            digest,
            media_type,
            bytes,
        })
    }

    /// Resolve `reference` for `platform`: when it names an index, choose the platform's
    /// manifest with [`select_platform`] and fetch it by digest.
    pub fn resolve_platform(
        &self,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<PlatformManifest, RegistryError> {
        let top = self.resolve(reference)?;
        if !top.is_index() {
            let descriptor = top.descriptor();
            return Ok(PlatformManifest {
                index: None,
                manifest: top,
                descriptor,
            });
        }
        let descriptor = select_platform(&top.bytes, platform).map_err(|error| match error {
            RegistryError::PlatformMissing {
                platform,
                available,
                ..
            } => RegistryError::PlatformMissing {
                image: format!("`{reference}`"),
                platform,
                available,
            },
            other => other,
        })?;
        let manifest = self.resolve(&reference.with_digest(descriptor.digest))?;
        if manifest.bytes.len() as u64 != descriptor.size {
            return Err(RegistryError::SizeMismatch {
                what: format!("the {platform} manifest of `{reference}`"),
                expected: descriptor.size,
                actual: manifest.bytes.len() as u64,
            });
        }
        if !media::is_manifest(&manifest.media_type) {
            return Err(RegistryError::UnsupportedMediaType {
                reference: format!("{reference} ({platform})"),
                media_type: manifest.media_type,
            });
        }
        Ok(PlatformManifest {
            index: Some(top),
            manifest,
            descriptor,
        })
    }

    /// Download blob `digest` of `reference`'s repository to `dest`, streaming through a
    /// temporary file beside it that is checked for `size` and `digest` before it is renamed
    /// into place. On any mismatch nothing is kept.
    pub fn fetch_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
        size: u64,
        dest: &Path,
    ) -> Result<(), RegistryError> {
        let registry = reference.registry.as_str();
        let endpoint = self.endpoint(reference)?;
        let path = format!("/v2/{}/blobs/{digest}", reference.repository);
        let call = Call {
            method: http::Method::GET,
            url: format!("{}{path}", endpoint.base_url),
            headers: Vec::new(),
            body: RequestBody::Empty,
        };
        let what = format!("blob {digest} of `{}`", reference.name());
        let dir = dest
            .parent()
            .filter(|dir| !dir.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut attempt = 1;
        loop {
            let mut response = self.execute(
                registry,
                &endpoint,
                &Access::pull(&reference.repository),
                &call,
            )?;
            match response.status().as_u16() {
                200 => {}
                404 => {
                    return Err(RegistryError::BlobUnknown {
                        repository: reference.name(),
                        digest: *digest,
                    });
                }
                status => {
                    return Err(unexpected_status(
                        registry,
                        "GET",
                        &path,
                        status,
                        &mut response,
                    ));
                }
            }
            let mut temp = tempfile::Builder::new()
                .prefix(".download-")
                .tempfile_in(dir)
                .map_err(|source| RegistryError::Io {
                    action: "create a temporary file in",
                    path: dir.to_path_buf(),
                    source,
                })?;
            let mut hasher = DigestWriter::new();
            let mut received: u64 = 0;
            let mut buffer = vec![0u8; 256 * 1024];
            let mut reader = response.body_mut().as_reader();
            let outcome: Result<(), io::Error> = loop {
                let count = match reader.read(&mut buffer) {
                    Ok(0) => break Ok(()),
                    Ok(count) => count,
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                    Err(error) => break Err(error),
                };
                received += count as u64;
                if received > size {
                    break Ok(());
                }
                hasher.update(&buffer[..count]);
                if let Err(source) = temp.write_all(&buffer[..count]) {
                    return Err(RegistryError::Io {
                        action: "write",
                        path: temp.path().to_path_buf(),
                        source,
                    });
                }
            };
            if let Err(error) = outcome {
                // The connection broke mid-body: start over while attempts remain.
                if attempt < self.options.retry.max_attempts {
                    std::thread::sleep(self.backoff(attempt, None));
                    attempt += 1;
                    continue;
                }
                return Err(RegistryError::Unreachable {
                    registry: registry.to_string(),
                    reason: format!("the download of {what} broke off: {error}"),
                    no_route: false,
                });
            }
            if received != size {
                return Err(RegistryError::SizeMismatch {
                    what,
                    expected: size,
                    actual: received,
                });
            }
            let actual = hasher.finish();
            if actual != *digest {
                return Err(RegistryError::DigestMismatch {
                    what,
                    expected: *digest,
                    actual,
                });
            }
            temp.as_file()
                .sync_all()
                .map_err(|source| RegistryError::Io {
                    action: "write",
                    path: temp.path().to_path_buf(),
                    source,
                })?;
            temp.persist(dest).map_err(|error| RegistryError::Io {
                action: "move the downloaded blob to",
                path: dest.to_path_buf(),
                source: error.error,
            })?;
            return Ok(());
        }
    }

    /// [`RegistryClient::fetch_blob`] for many blobs, [`ClientOptions::max_concurrent_fetches`]
    /// at a time. Stops starting new downloads after the first error, which it returns.
    pub fn fetch_blobs(
        &self,
        reference: &Reference,
        blobs: &[BlobFetch],
    ) -> Result<(), RegistryError> {
        // Connect and authenticate once before the workers start.
        self.endpoint(reference)?;
        let next = AtomicUsize::new(0);
        let first_error: Mutex<Option<RegistryError>> = Mutex::new(None);
        let workers = self
            .options
            .max_concurrent_fetches
            .clamp(1, blobs.len().max(1));
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| {
                    loop {
                        if first_error
                            .lock()
                            .map(|error| error.is_some())
                            .unwrap_or(true)
                        {
                            return;
                        }
                        let index = next.fetch_add(1, Ordering::SeqCst);
                        let Some(blob) = blobs.get(index) else { return };
                        if let Err(error) =
                            self.fetch_blob(reference, &blob.digest, blob.size, &blob.dest)
                            && let Ok(mut slot) = first_error.lock()
                        {
                            slot.get_or_insert(error);
                        }
                    }
                });
            }
        });
        let first_error = first_error
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match first_error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Push
    // -----------------------------------------------------------------------------------------

    /// Whether `repository`'s repository has blob `digest` (`HEAD`).
    pub fn blob_exists(
        &self,
        repository: &Reference,
        digest: &Digest,
    ) -> Result<bool, RegistryError> {
        self.blob_exists_with(repository, digest, &Access::pull(&repository.repository))
    }

    fn blob_exists_with(
        &self,
        repository: &Reference,
        digest: &Digest,
        access: &Access,
    ) -> Result<bool, RegistryError> {
        let registry = repository.registry.as_str();
        let endpoint = self.endpoint(repository)?;
        let path = format!("/v2/{}/blobs/{digest}", repository.repository);
        let call = Call {
            method: http::Method::HEAD,
            url: format!("{}{path}", endpoint.base_url),
            headers: Vec::new(),
            body: RequestBody::Empty,
        };
        let mut response = self.execute(registry, &endpoint, access, &call)?;
        match response.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            status => Err(unexpected_status(
                registry,
                "HEAD",
                &path,
                status,
                &mut response,
            )),
        }
    }

    /// Make blob `digest` (the file at `path`, `size` bytes) present in `repository`'s
    /// repository: skipped when `HEAD` finds it, mounted from `mount_from` (another repository
    /// of the same registry known to have it) when the registry agrees, else uploaded in one
    /// `PUT` up to [`ClientOptions::chunk_threshold`] and in `PATCH` chunks above. The
    /// registry checks the digest of what it receives.
    pub fn push_blob(
        &self,
        repository: &Reference,
        digest: &Digest,
        size: u64,
        path: &Path,
        mount_from: Option<&str>,
    ) -> Result<BlobPush, RegistryError> {
        let registry = repository.registry.as_str();
        let mount_from = mount_from.filter(|other| *other != repository.repository);
        let access = Access::push(&repository.repository, mount_from);
        if self.blob_exists_with(repository, digest, &access)? {
            return Ok(BlobPush::AlreadyPresent);
        }
        let actual_size = std::fs::metadata(path)
            .map_err(|source| RegistryError::Io {
                action: "read",
                path: path.to_path_buf(),
                source,
            })?
            .len();
        if actual_size != size {
            return Err(RegistryError::SizeMismatch {
                what: format!("the local file of blob {digest} ({})", path.display()),
                expected: size,
                actual: actual_size,
            });
        }
        let endpoint = self.endpoint(repository)?;
        let uploads = format!("/v2/{}/blobs/uploads/", repository.repository);
        let start_path = match mount_from {
            Some(other) => format!(
                "{uploads}?mount={}&from={}",
                percent_encode(&digest.to_string()),
                percent_encode(other)
            ),
            None => uploads.clone(),
        };
        let call = Call {
            method: http::Method::POST,
            url: format!("{}{start_path}", endpoint.base_url),
            headers: vec![("Content-Length", "0".into())],
            body: RequestBody::Empty,
        };
        let mut response = self.execute(registry, &endpoint, &access, &call)?;
        match response.status().as_u16() {
            201 if mount_from.is_some() => return Ok(BlobPush::Mounted),
            202 => {}
            status => {
                return Err(unexpected_status(
                    registry,
                    "POST",
                    &uploads,
                    status,
                    &mut response,
                ));
            }
        }
        let mut location = upload_location(registry, &endpoint, &response)?;

        let mut chunks = 0;
        if size > self.options.chunk_threshold {
            let chunk_size = self.options.chunk_size.max(1);
            let mut offset = 0;
            while offset < size {
                let length = chunk_size.min(size - offset);
                let call = Call {
                    method: http::Method::PATCH,
                    url: location.clone(),
                    headers: vec![
                        ("Content-Type", "application/octet-stream".into()),
                        ("Content-Range", format!("{offset}-{}", offset + length - 1)),
                        ("Content-Length", length.to_string()),
                    ],
                    body: RequestBody::FileRange {
                        path,
                        offset,
                        length,
                    },
                };
                let mut response = self.execute(registry, &endpoint, &access, &call)?;
                match response.status().as_u16() {
                    202 | 204 => {}
                    status => {
                        return Err(unexpected_status(
                            registry,
                            "PATCH",
                            &uploads,
                            status,
                            &mut response,
                        ));
                    }
                }
                location = upload_location(registry, &endpoint, &response)?;
                offset += length;
                chunks += 1;
            }
        }
        let separator = if location.contains('?') { '&' } else { '?' };
        let (body, length) = if chunks == 0 {
            (
                RequestBody::FileRange {
                    path,
                    offset: 0,
                    length: size,
                },
                size,
            )
        } else {
            (RequestBody::Empty, 0)
        };
        let call = Call {
            method: http::Method::PUT,
            url: format!(
                "{location}{separator}digest={}",
                percent_encode(&digest.to_string())
            ),
            headers: vec![
                ("Content-Type", "application/octet-stream".into()),
                ("Content-Length", length.to_string()),
            ],
            body,
        };
        let mut response = self.execute(registry, &endpoint, &access, &call)?;
        match response.status().as_u16() {
            201 | 204 => {}
            status => {
                return Err(unexpected_status(
                    registry,
                    "PUT",
                    &uploads,
                    status,
                    &mut response,
                ));
            }
        }
        if let Some(stored) =
            header(&response, "docker-content-digest").and_then(|text| text.parse::<Digest>().ok())
            && stored != *digest
        {
            return Err(RegistryError::DigestMismatch {
                what: format!("blob uploaded to {}", repository.name()),
                expected: *digest,
                actual: stored,
            });
        }
        Ok(if chunks == 0 {
            BlobPush::Uploaded
        } else {
            BlobPush::UploadedInChunks(chunks)
        })
    }

    /// Push `bytes`, exactly as given, as a manifest of `media_type` under `reference`'s digest
    /// when it has one (which must be the bytes' digest), else under its tag. Returns the
    /// digest of the bytes.
    pub fn push_manifest(
        &self,
        reference: &Reference,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<Digest, RegistryError> {
        let registry = reference.registry.as_str();
        let digest = Digest::of(bytes);
        if let Some(expected) = reference.digest
            && expected != digest
        {
            return Err(RegistryError::DigestMismatch {
                what: format!("the manifest to push as `{reference}`"),
                expected,
                actual: digest,
            });
        }
        let endpoint = self.endpoint(reference)?;
        let path = format!(
            "/v2/{}/manifests/{}",
            reference.repository,
            reference.manifest_reference()
        );
        let call = Call {
            method: http::Method::PUT,
            url: format!("{}{path}", endpoint.base_url),
            headers: vec![
                ("Content-Type", media_type.to_string()),
                ("Content-Length", bytes.len().to_string()),
            ],
            body: RequestBody::Bytes(bytes),
        };
        let access = Access::push(&reference.repository, None);
        let mut response = self.execute(registry, &endpoint, &access, &call)?;
        match response.status().as_u16() {
            201 | 200 | 204 => {}
            404 => {
                // The registry names what is missing (MANIFEST_BLOB_UNKNOWN, NAME_UNKNOWN…).
                return Err(unexpected_status(
                    registry,
                    "PUT",
                    &path,
                    404,
                    &mut response,
                ));
            }
            status => {
                return Err(unexpected_status(
                    registry,
                    "PUT",
                    &path,
                    status,
                    &mut response,
                ));
            }
        }
        if let Some(stored) =
            header(&response, "docker-content-digest").and_then(|text| text.parse::<Digest>().ok())
            && stored != digest
        {
            return Err(RegistryError::DigestMismatch {
                what: format!("the manifest pushed as `{reference}`"),
                expected: digest,
                actual: stored,
            });
        }
        Ok(digest)
    }

    // -----------------------------------------------------------------------------------------
    // Connection, authentication, retries
    // -----------------------------------------------------------------------------------------

    fn plain_http_allowed(&self, reference: &Reference) -> bool {
        let registry = reference.registry.as_str();
        let host = host_of(registry);
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .is_ok_and(|address| address.is_loopback());
        loopback
            || self
                .options
                .insecure_registries
                .iter()
                .any(|insecure| insecure == registry || insecure == host)
    }

    /// The registry's endpoint: found by `GET /v2/` on first use, then cached.
    fn endpoint(&self, reference: &Reference) -> Result<Arc<Endpoint>, RegistryError> {
        let registry = reference.registry.as_str();
        if let Some(endpoint) = self
            .endpoints
            .lock()
            .ok()
            .and_then(|endpoints| endpoints.get(registry).cloned())
        {
            return Ok(endpoint);
        }
        let host = reference.registry_host();
        let plain_http_allowed = self.plain_http_allowed(reference);
        let mut candidates = vec![(format!("https://{host}"), plain_http_allowed)];
        if plain_http_allowed {
            candidates.push((format!("http://{host}"), false));
        }
        let mut last_error = None;
        for (position, (base_url, insecure_tls)) in candidates.iter().enumerate() {
            let has_fallback = position + 1 < candidates.len();
            let call = Call {
                method: http::Method::GET,
                url: format!("{base_url}/v2/"),
                headers: Vec::new(),
                body: RequestBody::Empty,
            };
            let agent = if *insecure_tls {
                &self.insecure_agent
            } else {
                &self.agent
            };
            // When plain HTTP remains to be tried, one HTTPS attempt tells enough.
            let attempts = if has_fallback {
                1
            } else {
                self.options.retry.max_attempts
            };
            let mut response = match self.send_with_retries(registry, agent, &call, None, attempts)
            {
                Ok(response) => response,
                Err(error @ RegistryError::Unreachable { .. }) if has_fallback => {
                    last_error = Some(error);
                    continue;
                }
                Err(error) => return Err(error),
            };
            let challenge = match response.status().as_u16() {
                200 => Challenge::None,
                401 => header(&response, "www-authenticate")
                    .as_deref()
                    .and_then(auth::parse_challenge)
                    .unwrap_or(Challenge::Basic),
                status => {
                    return Err(unexpected_status(
                        registry,
                        "GET",
                        "/v2/",
                        status,
                        &mut response,
                    ));
                }
            };
            let endpoint = Arc::new(Endpoint {
                base_url: base_url.clone(),
                insecure_tls: *insecure_tls,
                plain_http_allowed,
                challenge,
                credential: Mutex::new(None),
            });
            if let Ok(mut endpoints) = self.endpoints.lock() {
                endpoints.insert(registry.to_string(), endpoint.clone());
            }
            return Ok(endpoint);
        }
        Err(last_error.unwrap_or_else(|| RegistryError::Unreachable {
            registry: registry.to_string(),
            reason: "no way to connect".into(),
            no_route: false,
        }))
    }

    fn credential(
        &self,
        registry: &str,
        endpoint: &Endpoint,
    ) -> Result<Option<Credential>, RegistryError> {
        let mut slot = endpoint
            .credential
            .lock()
            .map_err(|_| RegistryError::Protocol {
                registry: registry.to_string(),
                message: "internal lock poisoned".into(),
            })?;
        if let Some(credential) = slot.as_ref() {
            return Ok(credential.clone());
        }
        let credential = match &self.config_dir {
            Some(dir) => auth::lookup_credentials(dir, registry)?,
            None => None,
        };
        *slot = Some(credential.clone());
        Ok(credential)
    }

    /// The `Authorization` header for `access` on this registry, fetching a token when the
    /// registry wants one (from the cache unless `refresh`).
    fn authorization(
        &self,
        registry: &str,
        endpoint: &Endpoint,
        challenge: &Challenge,
        access: &Access,
        refresh: bool,
    ) -> Result<Option<Secret>, RegistryError> {
        match challenge {
            Challenge::None => Ok(None),
            Challenge::Basic => Ok(self
                .credential(registry, endpoint)?
                .and_then(|credential| credential.basic_authorization())),
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => {
                let mut scopes = access.scopes();
                if let Some(extra) = scope {
                    for extra in extra.split(' ').filter(|extra| !extra.is_empty()) {
                        if !scopes.iter().any(|scope| scope == extra) {
                            scopes.push(extra.to_string());
                        }
                    }
                }
                let cache_key = format!("{registry} {}", scopes.join(" "));
                if !refresh
                    && let Some(token) = self.tokens.lock().ok().and_then(|tokens| {
                        tokens
                            .get(&cache_key)
                            .filter(|token| token.expires > Instant::now())
                            .map(|token| token.authorization.clone())
                    })
                {
                    return Ok(Some(token));
                }
                let (authorization, lifetime) = self.fetch_token(
                    registry,
                    endpoint,
                    access,
                    realm,
                    service.as_deref(),
                    &scopes,
                )?;
                if let Ok(mut tokens) = self.tokens.lock() {
                    tokens.insert(
                        cache_key,
                        CachedToken {
                            authorization: authorization.clone(),
                            expires: Instant::now() + lifetime,
                        },
                    );
                }
                Ok(Some(authorization))
            }
        }
    }

    /// The token flow: `GET realm?service=…&scope=…` (Basic auth with the user's credentials
    /// when there are some), or `POST realm` with a refresh token.
    fn fetch_token(
        &self,
        registry: &str,
        endpoint: &Endpoint,
        access: &Access,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
    ) -> Result<(Secret, Duration), RegistryError> {
        // Credentials go to a realm over HTTPS, or over plain HTTP only to the registry's own
        // host when the registry itself may be reached over plain HTTP (loopback or
        // --insecure-registry): never in clear text to a third host.
        let realm_is_safe = realm.starts_with("https://")
            || (endpoint.plain_http_allowed
                && realm.starts_with("http://")
                && same_host(realm, &endpoint.base_url));
        let (credential, withheld) = if realm_is_safe {
            (self.credential(registry, endpoint)?, false)
        } else {
            (None, self.credential(registry, endpoint)?.is_some())
        };
        let mut query = Vec::new();
        if let Some(service) = service {
            query.push(format!("service={}", percent_encode(service)));
        }
        for scope in scopes {
            query.push(format!("scope={}", percent_encode(scope)));
        }
        let agent = if endpoint.insecure_tls {
            &self.insecure_agent
        } else {
            &self.agent
        };
        let form;
        let (call, authorization) = match &credential {
            Some(Credential::IdentityToken { token }) => {
                let mut fields = vec![
                    "grant_type=refresh_token".to_string(),
                    format!("client_id={}", percent_encode("graphbuild")),
                    format!("refresh_token={}", percent_encode(&token.0)),
                ];
                fields.extend(query.iter().cloned());
                form = fields.join("&");
                (
                    Call {
                        method: http::Method::POST,
                        url: realm.to_string(),
                        headers: vec![
                            ("Content-Type", "application/x-www-form-urlencoded".into()),
                            ("Content-Length", form.len().to_string()),
                        ],
                        body: RequestBody::Bytes(form.as_bytes()),
                    },
                    None,
                )
            }
            other => {
                let separator = if realm.contains('?') { '&' } else { '?' };
                let url = if query.is_empty() {
                    realm.to_string()
                } else {
                    format!("{realm}{separator}{}", query.join("&"))
                };
                (
                    Call {
                        method: http::Method::GET,
                        url,
                        headers: Vec::new(),
                        body: RequestBody::Empty,
                    },
                    other.as_ref().and_then(Credential::basic_authorization),
                )
            }
        };
        let mut response = self.send_with_retries(
            registry,
            agent,
            &call,
            authorization.as_ref(),
            self.options.retry.max_attempts,
        )?;
        match response.status().as_u16() {
            200 => {}
            status @ (401 | 403) if withheld => {
                return Err(RegistryError::InsecureRealm {
                    registry: registry.to_string(),
                    realm: realm.split('?').next().unwrap_or(realm).to_string(),
                    status,
                });
            }
            status @ (401 | 403) => {
                return Err(RegistryError::Unauthorized {
                    registry: registry.to_string(),
                    status,
                    action: access.action(),
                    detail: error_detail(&mut response),
                });
            }
            status => {
                return Err(RegistryError::UnexpectedStatus {
                    registry: registry.to_string(),
                    method: call.method.to_string(),
                    path: "the token realm".into(),
                    status,
                    detail: error_detail(&mut response),
                });
            }
        }
        #[derive(Deserialize)]
        struct TokenResponse {
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            access_token: Option<String>,
            #[serde(default)]
            expires_in: Option<u64>,
        }
        let bytes = response
            .body_mut()
            .with_config()
            .limit(MAX_MANIFEST_SIZE)
            .read_to_vec()
            .map_err(|error| body_read_error(registry, "the token realm's answer", error))?;
        let parsed: TokenResponse =
            serde_json::from_slice(&bytes).map_err(|_| RegistryError::Protocol {
                registry: registry.to_string(),
                message: "the token realm's answer is not the expected JSON".into(),
            })?;
        let token = parsed
            .token
            .or(parsed.access_token)
            .filter(|token| !token.is_empty())
            .ok_or_else(|| RegistryError::Protocol {
                registry: registry.to_string(),
                message: "the token realm's answer has no token".into(),
            })?;
        // The spec's default lifetime is 60 s; renew a little early.
        let lifetime = Duration::from_secs(parsed.expires_in.unwrap_or(60).max(60) - 10);
        Ok((Secret(format!("Bearer {token}")), lifetime))
    }

    /// Send `call` with the registry's authentication, re-authenticating once on a 401 (an
    /// expired token, or a scope the registry asks for in its new challenge). A final 401 or
    /// 403 is [`RegistryError::Unauthorized`].
    fn execute(
        &self,
        registry: &str,
        endpoint: &Endpoint,
        access: &Access,
        call: &Call<'_>,
    ) -> Result<Response, RegistryError> {
        let agent = if endpoint.insecure_tls {
            &self.insecure_agent
        } else {
            &self.agent
        };
        let attempts = self.options.retry.max_attempts;
        let same_host = call.url.starts_with(&endpoint.base_url);
        let authorization = if same_host {
            self.authorization(registry, endpoint, &endpoint.challenge, access, false)?
        } else {
            None
        };
        let mut response =
            self.send_with_retries(registry, agent, call, authorization.as_ref(), attempts)?;
        if response.status().as_u16() == 401 && same_host {
            let challenge = header(&response, "www-authenticate")
                .as_deref()
                .and_then(auth::parse_challenge)
                .unwrap_or_else(|| endpoint.challenge.clone());
            let renewed = self.authorization(registry, endpoint, &challenge, access, true)?;
            if renewed.is_some() {
                response =
                    self.send_with_retries(registry, agent, call, renewed.as_ref(), attempts)?;
            }
        }
        match response.status().as_u16() {
            status @ (401 | 403) => Err(RegistryError::Unauthorized {
                registry: registry.to_string(),
                status,
                action: access.action(),
                detail: error_detail(&mut response),
            }),
            _ => Ok(response),
        }
    }

    /// Send `call`, retrying connection failures, 429 and 5xx with backoff.
    fn send_with_retries(
        &self,
        registry: &str,
        agent: &ureq::Agent,
        call: &Call<'_>,
        authorization: Option<&Secret>,
        attempts: u32,
    ) -> Result<Response, RegistryError> {
        let attempts = attempts.max(1);
        let mut attempt = 1;
        loop {
            match self.send_once(agent, call, authorization) {
                Ok(response) => {
                    let status = response.status().as_u16();
                    if status == 429 || (500..600).contains(&status) {
                        if attempt >= attempts {
                            return Err(RegistryError::Unavailable {
                                registry: registry.to_string(),
                                status,
                                attempts,
                            });
                        }
                        let retry_after = header(&response, "retry-after")
                            .and_then(|text| text.trim().parse::<u64>().ok())
                            .map(|seconds| Duration::from_secs(seconds).min(MAX_RETRY_AFTER));
                        drop(response);
                        std::thread::sleep(self.backoff(attempt, retry_after));
                        attempt += 1;
                        continue;
                    }
                    return Ok(response);
                }
                Err(SendError::Local(error)) => return Err(error),
                Err(SendError::Transport { error, retryable }) => {
                    if !retryable || attempt >= attempts {
                        return Err(RegistryError::Unreachable {
                            registry: registry.to_string(),
                            reason: describe_transport_error(&error),
                            no_route: no_route_to(&error),
                        });
                    }
                    std::thread::sleep(self.backoff(attempt, None));
                    attempt += 1;
                }
            }
        }
    }

    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let policy = &self.options.retry;
        let exponential = policy
            .initial_delay
            .saturating_mul(1 << (attempt - 1).min(16))
            .min(policy.max_delay);
        retry_after.unwrap_or(exponential)
    }

    /// Small requests (the `/v2/` probe, tokens, manifests) get a whole-call deadline of
    /// [`SMALL_CALL_TIMEOUTS`] times [`ClientOptions::timeout`] on top of the per-read timeout,
    /// so a registry trickling a byte at a time cannot hold a build. Blob transfers, whose size
    /// makes a fixed deadline wrong, are bounded by the per-read timeout only.
    fn with_deadline<S: ureq::AsSendBody>(
        &self,
        agent: &ureq::Agent,
        request: http::Request<S>,
        url: &str,
    ) -> http::Request<S> {
        if url.contains("/blobs/") {
            return request;
        }
        agent
            .configure_request(request)
            .timeout_per_call(Some(
                self.options.timeout.saturating_mul(SMALL_CALL_TIMEOUTS),
            ))
            .build()
    }

    fn send_once(
        &self,
        agent: &ureq::Agent,
        call: &Call<'_>,
        authorization: Option<&Secret>,
    ) -> Result<Response, SendError> {
        let mut builder = http::Request::builder()
            .method(call.method.clone())
            .uri(call.url.as_str());
        for (name, value) in &call.headers {
            builder = builder.header(*name, value.as_str());
        }
        if let Some(authorization) = authorization {
            builder = builder.header("Authorization", authorization.0.as_str());
        }
        let invalid = |message: String| {
            SendError::Local(RegistryError::Protocol {
                registry: call.url.split('/').nth(2).unwrap_or("").to_string(),
                message,
            })
        };
        let result = match call.body {
            RequestBody::Empty => builder
                .body(())
                .map_err(|error| invalid(format!("cannot build a request: {error}")))
                .map(|request| agent.run(self.with_deadline(agent, request, &call.url)))?,
            RequestBody::Bytes(bytes) => builder
                .body(bytes)
                .map_err(|error| invalid(format!("cannot build a request: {error}")))
                .map(|request| agent.run(self.with_deadline(agent, request, &call.url)))?,
            RequestBody::FileRange {
                path,
                offset,
                length,
            } => {
                let io_error = |source| {
                    SendError::Local(RegistryError::Io {
                        action: "read",
                        path: path.to_path_buf(),
                        source,
                    })
                };
                let mut file = File::open(path).map_err(io_error)?;
                file.seek(SeekFrom::Start(offset)).map_err(io_error)?;
                let mut reader = file.take(length);
                let request = builder
                    .body(ureq::SendBody::from_reader(&mut reader))
                    .map_err(|error| invalid(format!("cannot build a request: {error}")))?;
                agent.run(request)
            }
        };
        result.map_err(|error| {
            let retryable = !no_route_to(&error)
                && matches!(
                    error,
                    ureq::Error::Io(_) | ureq::Error::Timeout(_) | ureq::Error::ConnectionFailed
                );
            SendError::Transport { error, retryable }
        })
    }
}

enum SendError {
    /// Not the network's fault: a local file, a malformed request.
    Local(RegistryError),
    Transport {
        error: ureq::Error,
        retryable: bool,
    },
}

/// Whether the registry cannot be reached at all from here: its name does not resolve, the
/// connection is refused, or there is no route to it. Retrying would only delay the answer by
/// the backoff (~8 s per request), so these fail at once; a timeout, a reset or a broken
/// transfer may pass and keeps its retries.
fn no_route_to(error: &ureq::Error) -> bool {
    match error {
        ureq::Error::HostNotFound => true,
        ureq::Error::Io(io_error) => {
            matches!(
                io_error.kind(),
                io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::HostUnreachable
                    | io::ErrorKind::NetworkUnreachable
                    | io::ErrorKind::NetworkDown
                    | io::ErrorKind::AddrNotAvailable
            ) || is_name_resolution_failure(io_error)
        }
        _ => false,
    }
}

/// `getaddrinfo` failures: the standard library reports them as an uncategorized error whose
/// message starts with this text.
fn is_name_resolution_failure(error: &io::Error) -> bool {
    error
        .to_string()
        .starts_with("failed to lookup address information")
}

fn describe_transport_error(error: &ureq::Error) -> String {
    match error {
        ureq::Error::ConnectionFailed => "the connection failed".into(),
        ureq::Error::HostNotFound => "the host name does not resolve".into(),
        ureq::Error::Io(io_error) if is_name_resolution_failure(io_error) => {
            format!("the host name does not resolve ({io_error})")
        }
        ureq::Error::Io(io_error) => io_error.to_string(),
        other => other.to_string(),
    }
}

/// A response body that could not be read: too large is the registry's protocol error; a
/// stall or a reset is the environment (exit code 3), with its own help.
fn body_read_error(registry: &str, what: &str, error: ureq::Error) -> RegistryError {
    match error {
        ureq::Error::BodyExceedsLimit(limit) => RegistryError::Protocol {
            registry: registry.to_string(),
            message: format!("{what} is larger than {limit} bytes"),
        },
        other => RegistryError::Stalled {
            registry: registry.to_string(),
            what: what.to_string(),
            reason: describe_transport_error(&other),
        },
    }
}

/// The host of an `http(s)://[user@]host[:port]/…` URL, lowercase, without the port.
fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    Some(host_of(authority).to_ascii_lowercase())
}

/// Whether two URLs name the same host (any port).
fn same_host(a: &str, b: &str) -> bool {
    matches!((url_host(a), url_host(b)), (Some(a), Some(b)) if !a.is_empty() && a == b)
}

/// `host:port` → `host`; `[::1]:5000` → `[::1]`.
fn host_of(registry: &str) -> &str {
    if registry.starts_with('[') {
        return registry
            .split_once(']')
            .map_or(registry, |(host, _)| &registry[..host.len() + 1]);
    }
    registry.split(':').next().unwrap_or(registry)
}

fn header(response: &Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::to_string)
}

/// The `Location` of an upload session, made absolute.
fn upload_location(
    registry: &str,
    endpoint: &Endpoint,
    response: &Response,
) -> Result<String, RegistryError> {
    let location = header(response, "location").ok_or_else(|| RegistryError::Protocol {
        registry: registry.to_string(),
        message: "an upload answer has no Location header".into(),
    })?;
    Ok(
        if location.starts_with("http://") || location.starts_with("https://") {
            location
        } else if location.starts_with('/') {
            format!("{}{location}", endpoint.base_url)
        } else {
            format!("{}/{location}", endpoint.base_url)
        },
    )
}

/// `: CODE: message` from a registry's JSON error body, or nothing.
fn error_detail(response: &mut Response) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        #[serde(default)]
        errors: Vec<ErrorEntry>,
    }
    #[derive(Deserialize)]
    struct ErrorEntry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    let Ok(bytes) = response
        .body_mut()
        .with_config()
        .limit(MAX_ERROR_BODY)
        .read_to_vec()
    else {
        return String::new();
    };
    let Ok(body) = serde_json::from_slice::<ErrorBody>(&bytes) else {
        return String::new();
    };
    let parts: Vec<String> = body
        .errors
        .iter()
        .map(
            |entry| match (entry.code.is_empty(), entry.message.is_empty()) {
                (false, false) => format!("{}: {}", entry.code, entry.message),
                (false, true) => entry.code.clone(),
                _ => entry.message.clone(),
            },
        )
        .filter(|part| !part.is_empty())
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!(": {}", parts.join("; "))
    }
}

fn unexpected_status(
    registry: &str,
    method: &str,
    path: &str,
    status: u16,
    response: &mut Response,
) -> RegistryError {
    RegistryError::UnexpectedStatus {
        registry: registry.to_string(),
        method: method.to_string(),
        // Upload session paths carry opaque state; the stable part is enough.
        path: path.split('?').next().unwrap_or(path).to_string(),
        status,
        detail: error_detail(response),
    }
}

/// The media type of a served manifest: the `Content-Type` when it is one of the accepted
/// types, else the document's own `mediaType`, else what its shape says.
fn manifest_media_type(content_type: Option<&str>, bytes: &[u8]) -> Option<String> {
    let known = |media_type: &str| ACCEPTED_MANIFEST_TYPES.contains(&media_type);
    if let Some(content_type) = content_type {
        let bare = content_type.split(';').next().unwrap_or("").trim();
        if known(bare) {
            return Some(bare.to_string());
        }
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Shape {
        #[serde(default)]
        schema_version: Option<u32>,
        #[serde(default)]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
        #[serde(default)]
        config: Option<serde_json::Value>,
    }
    let shape: Shape = serde_json::from_slice(bytes).ok()?;
    if let Some(media_type) = shape.media_type {
        return known(&media_type).then_some(media_type);
    }
    if shape.schema_version != Some(2) {
        return None;
    }
    if shape.manifests.is_some() {
        Some(media::OCI_INDEX.to_string())
    } else if shape.config.is_some() {
        Some(media::OCI_MANIFEST.to_string())
    } else {
        None
    }
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
