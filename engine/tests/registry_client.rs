//! The registry client against a real registry (Debian's `docker-registry`, the CNCF
//! distribution registry, started here on 127.0.0.1) and against small fake registries for the
//! token flow and the failure cases. `skopeo` checks what was pushed independently.
//!
//! Tests that need `docker-registry` or `skopeo` fail with a clear message when they are
//! missing (`scripts/setup-host` installs them): they never pass silently.
//!
//! Long because the fake registries (token realms, redirects, refusals, slow and oversized
//! answers) and the cases that use them read best side by side: each fake is a few lines next
//! to the test it serves.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use graphbuild_engine::digest::Digest;
use graphbuild_engine::oci::{Descriptor, ImageIndex, ImageManifest, media};
use graphbuild_engine::reference::Reference;
use graphbuild_engine::registry::{
    BlobFetch, BlobPush, ClientOptions, RegistryClient, RegistryError, RetryPolicy,
};
use graphbuild_lang::platform::Platform;

const USERNAME: &str = "graphbuild-tester";
const PASSWORD: &str = "s3cret-pass";
/// bcrypt (cost 5) of PASSWORD: `docker-registry` accepts only bcrypt in htpasswd files.
const PASSWORD_BCRYPT: &str = "$2b$05$abcdefghijklmnopqrstuuV7fpPozvyqJfnY19y0802WTlXUm6Rjy";
/// The busybox fixture's image index (three platforms).
const FIXTURE_INDEX_DIGEST: &str =
    "sha256:d4c00c7b6456a7ba455a2a26521cc97eba8c841bc9e0c0553d8159928c55ec88";

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/busybox")
}

fn fixture_blob_path(digest: &Digest) -> PathBuf {
    fixture_dir().join("blobs/sha256").join(digest.hex())
}

fn fixture_blob(digest: &Digest) -> Vec<u8> {
    std::fs::read(fixture_blob_path(digest)).expect("fixture blob")
}

fn fast_retries() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        initial_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(100),
    }
}

fn client_with(config_dir: &Path, configure: impl FnOnce(&mut ClientOptions)) -> RegistryClient {
    let mut options = ClientOptions {
        docker_config_dir: Some(config_dir.to_path_buf()),
        retry: fast_retries(),
        timeout: Duration::from_secs(20),
        ..ClientOptions::default()
    };
    configure(&mut options);
    RegistryClient::new(options)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

fn require_tool(path: &str) {
    assert!(
        Path::new(path).exists() || which(path),
        "`{path}` is not installed; the registry tests need it (run scripts/setup-host, or apt-get install docker-registry skopeo)"
    );
}

fn which(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// A `docker-registry` process on 127.0.0.1, killed on drop.
struct LocalRegistry {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl LocalRegistry {
    fn start(with_auth: bool) -> LocalRegistry {
        require_tool("/usr/bin/docker-registry");
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let storage = dir.path().join("storage");
        std::fs::create_dir(&storage).expect("storage dir");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        );
        if with_auth {
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, format!("{USERNAME}:{PASSWORD_BCRYPT}\n")).expect("htpasswd");
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: basic-realm\n    path: {}\n",
                htpasswd.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).expect("registry config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("log file");
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("docker-registry starts");
        let mut registry = LocalRegistry {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            if let Ok(Some(status)) = registry.child.try_wait() {
                let log = std::fs::read_to_string(registry._dir.path().join("registry.log"))
                    .unwrap_or_default();
                panic!("docker-registry exited with {status}: {log}");
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen on port {port} within 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn reference(&self, rest: &str) -> Reference {
        Reference::parse(&format!("{}/{rest}", self.host())).expect("reference")
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Push the busybox fixture (every blob, the three manifests by digest, the index under
/// `reference`'s tag) and return what each blob push did.
fn push_fixture(client: &RegistryClient, reference: &Reference) -> Vec<BlobPush> {
    let index_digest: Digest = FIXTURE_INDEX_DIGEST.parse().expect("digest");
    let index_bytes = fixture_blob(&index_digest);
    let index: ImageIndex = serde_json::from_slice(&index_bytes).expect("fixture index");
    let mut outcomes = Vec::new();
    for entry in &index.manifests {
        let manifest_bytes = fixture_blob(&entry.digest);
        let manifest: ImageManifest =
            serde_json::from_slice(&manifest_bytes).expect("fixture manifest");
        for blob in std::iter::once(&manifest.config).chain(&manifest.layers) {
            let outcome = client
                .push_blob(
                    reference,
                    &blob.digest,
                    blob.size,
                    &fixture_blob_path(&blob.digest),
                    None,
                )
                .unwrap_or_else(|error| panic!("push blob {}: {error}", blob.digest));
            outcomes.push(outcome);
        }
        let pushed = client
            .push_manifest(
                &reference.with_digest(entry.digest),
                &entry.media_type,
                &manifest_bytes,
            )
            .expect("push manifest");
        assert_eq!(pushed, entry.digest);
    }
    let pushed = client
        .push_manifest(reference, media::OCI_INDEX, &index_bytes)
        .expect("push index");
    assert_eq!(pushed, index_digest);
    outcomes
}

fn skopeo_inspect_raw(reference: &Reference, credentials: Option<&str>) -> Vec<u8> {
    require_tool("skopeo");
    let mut command = Command::new("skopeo");
    command.args(["inspect", "--raw", "--tls-verify=false"]);
    if let Some(credentials) = credentials {
        command.args(["--creds", credentials]);
    } else {
        command.arg("--no-creds");
    }
    let output = command
        .arg(format!("docker://{reference}"))
        .output()
        .expect("skopeo runs");
    assert!(
        output.status.success(),
        "skopeo inspect failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// Pull `reference` back for every fixture platform and check every digest and blob.
fn pull_and_compare(client: &RegistryClient, reference: &Reference) {
    let index = client.resolve(reference).expect("resolve");
    assert_eq!(index.digest.to_string(), FIXTURE_INDEX_DIGEST);
    assert_eq!(index.media_type, media::OCI_INDEX);
    assert!(index.is_index());
    let fixture_index: ImageIndex =
        serde_json::from_slice(&fixture_blob(&index.digest)).expect("fixture index");
    let downloads = tempfile::tempdir().expect("temp dir");
    for platform in ["linux/amd64", "linux/arm64", "linux/arm/v7"] {
        let platform = Platform::parse(platform).expect("platform");
        let resolved = client
            .resolve_platform(reference, &platform)
            .expect("resolve platform");
        let expected: &Descriptor = fixture_index
            .manifests
            .iter()
            .find(|entry| {
                entry
                    .platform
                    .as_ref()
                    .is_some_and(|p| p.architecture == platform.architecture)
            })
            .expect("fixture has the platform");
        assert_eq!(resolved.manifest.digest, expected.digest, "{platform}");
        assert_eq!(resolved.descriptor.digest, expected.digest, "{platform}");
        assert_eq!(
            resolved.manifest.bytes,
            fixture_blob(&expected.digest),
            "{platform}"
        );
        let manifest: ImageManifest =
            serde_json::from_slice(&resolved.manifest.bytes).expect("manifest");
        let blobs: Vec<BlobFetch> = std::iter::once(&manifest.config)
            .chain(&manifest.layers)
            .map(|blob| BlobFetch {
                digest: blob.digest,
                size: blob.size,
                dest: downloads.path().join(blob.digest.hex()),
            })
            .collect();
        client.fetch_blobs(reference, &blobs).expect("fetch blobs");
        for blob in &blobs {
            let bytes = std::fs::read(&blob.dest).expect("downloaded blob");
            assert_eq!(Digest::of(&bytes), blob.digest);
            assert_eq!(bytes, fixture_blob(&blob.digest));
        }
    }
}

#[test]
fn pushes_and_pulls_the_three_platform_busybox_index() {
    let registry = LocalRegistry::start(false);
    let config_dir = tempfile::tempdir().expect("temp dir");
    // Small chunks so that the layers (about 1 MB) go up in PATCH chunks.
    let client = client_with(config_dir.path(), |options| {
        options.chunk_threshold = 256 * 1024;
        options.chunk_size = 300 * 1024;
    });
    let reference = registry.reference("busybox:1.35.0");

    let first = push_fixture(&client, &reference);
    assert!(first.contains(&BlobPush::Uploaded), "{first:?}");
    assert!(
        first
            .iter()
            .any(|outcome| matches!(outcome, BlobPush::UploadedInChunks(chunks) if *chunks >= 2)),
        "{first:?}"
    );
    // A second push sends no blob.
    let second = push_fixture(&client, &reference);
    assert!(
        second
            .iter()
            .all(|outcome| *outcome == BlobPush::AlreadyPresent),
        "{second:?}"
    );

    // skopeo sees exactly the fixture's index bytes under the tag.
    let raw = skopeo_inspect_raw(&reference, None);
    assert_eq!(Digest::of(&raw).to_string(), FIXTURE_INDEX_DIGEST);
    let index: ImageIndex = serde_json::from_slice(&raw).expect("index");
    let platforms: Vec<String> = index
        .manifests
        .iter()
        .filter_map(|entry| entry.platform.as_ref().map(ToString::to_string))
        .collect();
    assert_eq!(platforms.len(), 3, "{platforms:?}");
    for platform in ["linux/amd64", "linux/arm64", "linux/arm/v7"] {
        assert!(
            platforms.iter().any(|shown| shown.starts_with(platform)),
            "{platforms:?}"
        );
    }

    // Pulled back by tag and by digest, with a fresh client (no cached state).
    let fresh = client_with(config_dir.path(), |_| {});
    pull_and_compare(&fresh, &reference);
    let by_digest = reference.with_digest(FIXTURE_INDEX_DIGEST.parse().expect("digest"));
    assert_eq!(
        fresh
            .resolve(&by_digest)
            .expect("by digest")
            .digest
            .to_string(),
        FIXTURE_INDEX_DIGEST
    );

    // Cross-repository mount on the same registry.
    let layer = {
        let manifest: ImageManifest = serde_json::from_slice(
            &fresh
                .resolve_platform(
                    &reference,
                    &Platform::parse("linux/amd64").expect("platform"),
                )
                .expect("amd64")
                .manifest
                .bytes,
        )
        .expect("manifest");
        manifest.layers[0].clone()
    };
    let other = registry.reference("team/other:latest");
    assert!(!fresh.blob_exists(&other, &layer.digest).expect("head"));
    let outcome = fresh
        .push_blob(
            &other,
            &layer.digest,
            layer.size,
            &fixture_blob_path(&layer.digest),
            Some("busybox"),
        )
        .expect("mount");
    assert_eq!(outcome, BlobPush::Mounted);
    assert!(fresh.blob_exists(&other, &layer.digest).expect("head"));
}

#[test]
fn errors_name_the_reference_and_list_platforms() {
    let registry = LocalRegistry::start(false);
    let config_dir = tempfile::tempdir().expect("temp dir");
    let client = client_with(config_dir.path(), |_| {});
    let reference = registry.reference("busybox:1.35.0");
    push_fixture(&client, &reference);

    let missing = registry.reference("busybox:no-such-tag");
    let error = client.resolve(&missing).expect_err("unknown tag");
    assert!(
        matches!(error, RegistryError::ManifestUnknown { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains(&format!("`{}/busybox:no-such-tag`", registry.host())),
        "{message}"
    );

    let error = client
        .resolve_platform(
            &reference,
            &Platform::parse("linux/s390x").expect("platform"),
        )
        .expect_err("no s390x");
    assert_eq!(
        error.to_string(),
        format!(
            "`{}/busybox:1.35.0` has no manifest for linux/s390x; it has linux/amd64, linux/arm/v7, linux/arm64",
            registry.host()
        )
    );

    let bogus_layer = Digest::of(b"not a layer of this image");
    let downloads = tempfile::tempdir().expect("temp dir");
    let error = client
        .fetch_blob(&reference, &bogus_layer, 25, &downloads.path().join("blob"))
        .expect_err("unknown blob");
    assert!(
        matches!(error, RegistryError::BlobUnknown { .. }),
        "{error:?}"
    );
    assert_eq!(std::fs::read_dir(downloads.path()).expect("dir").count(), 0);
}

#[test]
fn basic_auth_with_docker_config_and_wrong_password() {
    let registry = LocalRegistry::start(true);
    let host = registry.host();
    let reference = registry.reference("busybox:1.35.0");

    // Anonymous: refused, and the message says how to log in.
    let anonymous_dir = tempfile::tempdir().expect("temp dir");
    let anonymous = client_with(anonymous_dir.path(), |_| {});
    let error = anonymous.resolve(&reference).expect_err("anonymous");
    assert!(
        matches!(error, RegistryError::Unauthorized { status: 401, .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains(&host), "{error}");
    let help = miette::Diagnostic::help(&error)
        .map(|help| help.to_string())
        .unwrap_or_default();
    assert!(help.contains(&format!("docker login {host}")), "{help}");

    // Credentials from config.json (base64 `auth`), pushed and pulled back.
    let config_dir = tempfile::tempdir().expect("temp dir");
    let auth = base64(format!("{USERNAME}:{PASSWORD}").as_bytes());
    std::fs::write(
        config_dir.path().join("config.json"),
        format!(r#"{{"auths": {{"http://{host}": {{"auth": "{auth}"}}}}}}"#),
    )
    .expect("config.json");
    let client = client_with(config_dir.path(), |_| {});
    push_fixture(&client, &reference);
    let raw = skopeo_inspect_raw(&reference, Some(&format!("{USERNAME}:{PASSWORD}")));
    assert_eq!(Digest::of(&raw).to_string(), FIXTURE_INDEX_DIGEST);
    pull_and_compare(&client_with(config_dir.path(), |_| {}), &reference);

    // A wrong password: refused, naming the registry, never showing the password.
    let wrong_dir = tempfile::tempdir().expect("temp dir");
    let wrong_password = "wr0ng-passw0rd-value";
    std::fs::write(
        wrong_dir.path().join("config.json"),
        format!(r#"{{"auths": {{"{host}": {{"username": "{USERNAME}", "password": "{wrong_password}"}}}}}}"#),
    )
    .expect("config.json");
    let wrong = client_with(wrong_dir.path(), |_| {});
    let error = wrong.resolve(&reference).expect_err("wrong password");
    let shown = format!(
        "{error} {error:?} {wrong:?} {:?}",
        miette::Diagnostic::help(&error).map(|help| help.to_string())
    );
    assert!(
        matches!(error, RegistryError::Unauthorized { .. }),
        "{shown}"
    );
    assert!(shown.contains(&host), "{shown}");
    assert!(!shown.contains(wrong_password), "{shown}");
    assert!(
        !shown.contains(&base64(format!("{USERNAME}:{wrong_password}").as_bytes())),
        "{shown}"
    );
    assert!(!format!("{client:?}").contains(PASSWORD), "{client:?}");
}

#[test]
fn unreachable_registry_is_named() {
    let port = free_port();
    let config_dir = tempfile::tempdir().expect("temp dir");
    let client = client_with(config_dir.path(), |_| {});
    let reference = Reference::parse(&format!("127.0.0.1:{port}/busybox:1")).expect("reference");
    let started = Instant::now();
    let error = client.resolve(&reference).expect_err("closed port");
    assert!(
        matches!(error, RegistryError::Unreachable { .. }),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .starts_with(&format!("cannot reach the registry 127.0.0.1:{port}")),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

// ---------------------------------------------------------------------------------------------
// A fake registry: a tiny HTTP/1.1 server whose answers a test scripts.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct FakeRequest {
    method: String,
    target: String,
    headers: BTreeMap<String, String>,
    body: String,
}

struct FakeResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl FakeResponse {
    fn new(status: u16, body: impl Into<Vec<u8>>) -> FakeResponse {
        FakeResponse {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }
    fn header(mut self, name: &str, value: &str) -> FakeResponse {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
}

type Handler = dyn Fn(&FakeRequest) -> FakeResponse + Send + Sync;

struct FakeRegistry {
    ip: &'static str,
    port: u16,
    stop: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<FakeRequest>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeRegistry {
    fn start(
        handler: impl Fn(&FakeRequest) -> FakeResponse + Send + Sync + 'static,
    ) -> FakeRegistry {
        FakeRegistry::start_on("127.0.0.1", handler)
    }

    /// On another loopback address, e.g. `127.0.0.2`: another host as far as URLs go.
    fn start_on(
        ip: &'static str,
        handler: impl Fn(&FakeRequest) -> FakeResponse + Send + Sync + 'static,
    ) -> FakeRegistry {
        let listener = TcpListener::bind((ip, 0)).expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("address").port();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let thread = {
            let stop = stop.clone();
            let requests = requests.clone();
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(120);
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let _ = serve_connection(stream, &*handler, &requests);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        FakeRegistry {
            ip,
            port,
            stop,
            requests,
            thread: Some(thread),
        }
    }

    fn host(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    fn requests(&self) -> Vec<FakeRequest> {
        self.requests.lock().expect("requests").clone()
    }
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One request per connection (`Connection: close`); anything that is not HTTP (a TLS
/// handshake from the client's HTTPS probe) is dropped.
fn serve_connection(
    stream: TcpStream,
    handler: &Handler,
    requests: &Mutex<Vec<FakeRequest>>,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    if reader.fill_buf()?.first() == Some(&0x16) {
        // A TLS handshake: this server speaks plain HTTP only.
        return Ok(());
    }
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut parts = request_line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Ok(());
    };
    if !version.starts_with("HTTP/1") {
        return Ok(());
    }
    let mut headers = BTreeMap::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    let length: usize = headers
        .get("content-length")
        .and_then(|text| text.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let request = FakeRequest {
        method: method.to_string(),
        target: target.to_string(),
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    requests.lock().expect("requests").push(request.clone());
    let response = handler(&request);
    let mut stream = stream;
    let mut head = format!(
        "HTTP/1.1 {} Fake\r\nConnection: close\r\nContent-Length: {}\r\n",
        response.status,
        response.body.len()
    );
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if method != "HEAD" {
        stream.write_all(&response.body)?;
    }
    stream.flush()
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let value = (u32::from(chunk[0]) << 16)
            | (u32::from(chunk.get(1).copied().unwrap_or(0)) << 8)
            | u32::from(chunk.get(2).copied().unwrap_or(0));
        for position in 0..4 {
            if position <= chunk.len() {
                out.push(char::from(
                    ALPHABET[((value >> (18 - 6 * position)) & 0x3f) as usize],
                ));
            } else {
                out.push('=');
            }
        }
    }
    out
}

const MANIFEST: &[u8] = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;

/// A registry that wants bearer tokens from its own realm. With `required_basic`, the realm
/// hands tokens only to that `Authorization: Basic …`.
fn token_registry(required_basic: Option<String>) -> FakeRegistry {
    let issued = Arc::new(AtomicUsize::new(0));
    let realm_port = Arc::new(Mutex::new(0u16));
    let registry = {
        let realm_port = realm_port.clone();
        FakeRegistry::start(move |request| {
            let port = *realm_port.lock().expect("port");
            let challenge =
                format!(r#"Bearer realm="http://127.0.0.1:{port}/token",service="fake-registry""#);
            let path = request.target.split('?').next().unwrap_or("");
            if path == "/token" && request.method == "POST" {
                // OAuth2 refresh-token grant (an `identitytoken` in config.json).
                let fields: Vec<&str> = request.body.split('&').collect();
                if !fields.contains(&"grant_type=refresh_token")
                    || !fields.contains(&"refresh_token=good-refresh-token")
                    || !fields.contains(&"scope=repository%3Ateam%2Fapp%3Apull")
                {
                    return FakeResponse::new(
                        401,
                        r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad refresh token"}]}"#,
                    );
                }
                let number = issued.fetch_add(1, Ordering::SeqCst);
                return FakeResponse::new(
                    200,
                    format!(r#"{{"access_token":"token-{number}","expires_in":300}}"#),
                );
            }
            if path == "/token" {
                if let Some(required) = &required_basic
                    && request.headers.get("authorization") != Some(required)
                {
                    return FakeResponse::new(
                        401,
                        r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#,
                    );
                }
                if !request
                    .target
                    .contains("scope=repository%3Ateam%2Fapp%3Apull")
                {
                    return FakeResponse::new(400, "missing scope");
                }
                let number = issued.fetch_add(1, Ordering::SeqCst);
                return FakeResponse::new(
                    200,
                    format!(r#"{{"token":"token-{number}","expires_in":300}}"#),
                );
            }
            let authorized = request
                .headers
                .get("authorization")
                .is_some_and(|value| value.starts_with("Bearer token-"));
            if !authorized {
                return FakeResponse::new(
                    401,
                    r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
                )
                .header("WWW-Authenticate", &challenge);
            }
            match path {
                "/v2/" => FakeResponse::new(200, "{}"),
                "/v2/team/app/manifests/v1" => FakeResponse::new(200, MANIFEST)
                    .header("Content-Type", media::OCI_MANIFEST)
                    .header("Docker-Content-Digest", &Digest::of(MANIFEST).to_string()),
                _ => FakeResponse::new(
                    404,
                    r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#,
                ),
            }
        })
    };
    *realm_port.lock().expect("port") = registry.port;
    registry
}

#[test]
fn bearer_token_flow_anonymous_and_cached() {
    let registry = token_registry(None);
    let config_dir = tempfile::tempdir().expect("temp dir");
    let client = client_with(config_dir.path(), |_| {});
    let reference =
        Reference::parse(&format!("{}/team/app:v1", registry.host())).expect("reference");
    for _ in 0..3 {
        let manifest = client.resolve(&reference).expect("resolve with a token");
        assert_eq!(manifest.digest, Digest::of(MANIFEST));
        assert_eq!(manifest.media_type, media::OCI_MANIFEST);
    }
    let requests = registry.requests();
    let token_requests: Vec<&FakeRequest> = requests
        .iter()
        .filter(|request| request.target.starts_with("/token"))
        .collect();
    assert_eq!(token_requests.len(), 1, "the token is cached: {requests:?}");
    assert_eq!(token_requests[0].method, "GET");
    assert!(
        token_requests[0].target.contains("service=fake-registry"),
        "{:?}",
        token_requests[0]
    );
    assert!(
        !token_requests[0].headers.contains_key("authorization"),
        "anonymous token request"
    );
    let manifest_requests = requests
        .iter()
        .filter(|request| request.target.contains("/manifests/"))
        .count();
    assert_eq!(
        manifest_requests, 3,
        "no request went without its token: {requests:?}"
    );
    assert!(!format!("{client:?}").contains("token-0"), "{client:?}");
}

#[test]
fn bearer_token_flow_with_credentials_and_a_wrong_password() {
    let required = format!(
        "Basic {}",
        base64(format!("{USERNAME}:{PASSWORD}").as_bytes())
    );
    let registry = token_registry(Some(required));
    let host = registry.host();
    let reference = Reference::parse(&format!("{host}/team/app:v1")).expect("reference");

    let config_dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        config_dir.path().join("config.json"),
        format!(
            r#"{{"auths": {{"{host}": {{"username": "{USERNAME}", "password": "{PASSWORD}"}}}}}}"#
        ),
    )
    .expect("config.json");
    let client = client_with(config_dir.path(), |_| {});
    assert_eq!(
        client.resolve(&reference).expect("resolve").digest,
        Digest::of(MANIFEST)
    );

    let wrong_dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        wrong_dir.path().join("config.json"),
        format!(r#"{{"auths": {{"{host}": {{"username": "{USERNAME}", "password": "not-{PASSWORD}"}}}}}}"#),
    )
    .expect("config.json");
    let wrong = client_with(wrong_dir.path(), |_| {});
    let error = wrong.resolve(&reference).expect_err("wrong password");
    let shown = format!("{error} {error:?}");
    assert!(
        matches!(error, RegistryError::Unauthorized { status: 401, .. }),
        "{shown}"
    );
    assert!(
        shown.contains(&host) && shown.contains("bad credentials"),
        "{shown}"
    );
    assert!(!shown.contains(PASSWORD), "{shown}");

    let unknown = Reference::parse(&format!("{host}/team/app:v2")).expect("reference");
    let error = client.resolve(&unknown).expect_err("unknown");
    assert!(
        error.to_string().contains(&format!("`{host}/team/app:v2`")),
        "{error}"
    );
}

#[test]
fn digest_mismatches_keep_nothing() {
    let good_blob = b"the real layer bytes".to_vec();
    let good_digest = Digest::of(&good_blob);
    let registry = FakeRegistry::start(move |request| {
        let path = request.target.split('?').next().unwrap_or("");
        if path == "/v2/" {
            FakeResponse::new(200, "{}")
        } else if path.contains("/blobs/") {
            // Same size, other bytes.
            FakeResponse::new(200, b"the fake layer bytes".to_vec())
        } else if path.ends_with("/manifests/v1") {
            // A Docker-Content-Digest that does not match the body.
            FakeResponse::new(200, MANIFEST)
                .header("Content-Type", media::OCI_MANIFEST)
                .header("Docker-Content-Digest", &good_digest.to_string())
        } else {
            FakeResponse::new(
                200,
                b"{\"schemaVersion\":2,\"config\":{},\"layers\":[]}".to_vec(),
            )
            .header("Content-Type", media::OCI_MANIFEST)
        }
    });
    let config_dir = tempfile::tempdir().expect("temp dir");
    let client = client_with(config_dir.path(), |_| {});
    let reference =
        Reference::parse(&format!("{}/team/app:v1", registry.host())).expect("reference");

    let downloads = tempfile::tempdir().expect("temp dir");
    let dest = downloads.path().join("layer");
    let error = client
        .fetch_blob(&reference, &good_digest, good_blob.len() as u64, &dest)
        .expect_err("wrong bytes");
    assert!(
        matches!(error, RegistryError::DigestMismatch { .. }),
        "{error:?}"
    );
    assert!(
        error.to_string().contains(&good_digest.to_string()),
        "{error}"
    );
    assert!(!dest.exists());
    assert_eq!(
        std::fs::read_dir(downloads.path()).expect("dir").count(),
        0,
        "no temp file left"
    );

    let error = client
        .fetch_blob(&reference, &good_digest, 5, &dest)
        .expect_err("too long");
    assert!(
        matches!(error, RegistryError::SizeMismatch { expected: 5, .. }),
        "{error:?}"
    );
    assert_eq!(
        std::fs::read_dir(downloads.path()).expect("dir").count(),
        0,
        "no temp file left"
    );

    let error = client
        .resolve(&reference)
        .expect_err("header digest mismatch");
    assert!(
        matches!(error, RegistryError::DigestMismatch { .. }),
        "{error:?}"
    );

    let pinned = reference.with_digest(good_digest);
    let error = client.resolve(&pinned).expect_err("pinned digest mismatch");
    let RegistryError::DigestMismatch { expected, .. } = error else {
        panic!("{error:?}")
    };
    assert_eq!(expected, good_digest);
}

#[test]
fn retries_429_and_5xx_then_fails_clearly() {
    let manifest_calls = Arc::new(AtomicUsize::new(0));
    let registry = {
        let manifest_calls = manifest_calls.clone();
        FakeRegistry::start(move |request| {
            let path = request.target.split('?').next().unwrap_or("");
            match path {
                "/v2/" => FakeResponse::new(200, "{}"),
                "/v2/team/app/manifests/v1" => {
                    if manifest_calls.fetch_add(1, Ordering::SeqCst) < 2 {
                        FakeResponse::new(429, "slow down").header("Retry-After", "1")
                    } else {
                        FakeResponse::new(200, MANIFEST).header("Content-Type", media::OCI_MANIFEST)
                    }
                }
                _ => FakeResponse::new(503, "down"),
            }
        })
    };
    let config_dir = tempfile::tempdir().expect("temp dir");
    let client = client_with(config_dir.path(), |_| {});
    let reference =
        Reference::parse(&format!("{}/team/app:v1", registry.host())).expect("reference");
    let started = Instant::now();
    let manifest = client
        .resolve(&reference)
        .expect("succeeds on the third attempt");
    assert_eq!(manifest.digest, Digest::of(MANIFEST));
    assert_eq!(manifest_calls.load(Ordering::SeqCst), 3);
    // Retry-After: 1 was honoured twice (the policy's own delays are 20 ms).
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    let down = Reference::parse(&format!("{}/team/down:v1", registry.host())).expect("reference");
    let error = client.resolve(&down).expect_err("always 503");
    assert!(
        matches!(
            error,
            RegistryError::Unavailable {
                status: 503,
                attempts: 3,
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        format!(
            "the registry {} answered 503 3 times in a row",
            registry.host()
        )
    );
}

#[test]
fn bearer_token_flow_with_an_identity_token() {
    let registry = token_registry(Some("Basic never-used".into()));
    let host = registry.host();
    let reference = Reference::parse(&format!("{host}/team/app:v1")).expect("reference");
    let config_dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        config_dir.path().join("config.json"),
        format!(r#"{{"auths": {{"{host}": {{"identitytoken": "good-refresh-token"}}}}}}"#),
    )
    .expect("config.json");
    let client = client_with(config_dir.path(), |_| {});
    assert_eq!(
        client.resolve(&reference).expect("resolve").digest,
        Digest::of(MANIFEST)
    );
    let posts = registry
        .requests()
        .into_iter()
        .filter(|request| request.method == "POST")
        .count();
    assert_eq!(posts, 1);

    let wrong_dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        wrong_dir.path().join("config.json"),
        format!(r#"{{"auths": {{"{host}": {{"identitytoken": "stale-refresh-token"}}}}}}"#),
    )
    .expect("config.json");
    let error = client_with(wrong_dir.path(), |_| {})
        .resolve(&reference)
        .expect_err("stale token");
    let shown = format!("{error} {error:?}");
    assert!(
        matches!(error, RegistryError::Unauthorized { .. }),
        "{shown}"
    );
    assert!(!shown.contains("stale-refresh-token"), "{shown}");
}

/// A registry on 127.0.0.1 whose token realm is plain HTTP on 127.0.0.2, another host. The
/// realm hands out tokens only to `Authorization: Basic …` when `realm_wants_credentials`.
fn registry_with_a_foreign_realm(realm_wants_credentials: bool) -> (FakeRegistry, FakeRegistry) {
    let realm = FakeRegistry::start_on("127.0.0.2", move |request| {
        if realm_wants_credentials && !request.headers.contains_key("authorization") {
            return FakeResponse::new(
                401,
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"credentials required"}]}"#,
            );
        }
        FakeResponse::new(200, r#"{"token":"token-anonymous","expires_in":300}"#)
    });
    let challenge = format!(
        r#"Bearer realm="http://{}/token",service="fake-registry""#,
        realm.host()
    );
    let registry = FakeRegistry::start(move |request| {
        let authorized = request
            .headers
            .get("authorization")
            .is_some_and(|value| value.starts_with("Bearer token-"));
        if !authorized {
            return FakeResponse::new(401, "{}").header("WWW-Authenticate", &challenge);
        }
        match request.target.as_str() {
            "/v2/" => FakeResponse::new(200, "{}"),
            "/v2/team/app/manifests/v1" => FakeResponse::new(200, MANIFEST)
                .header("Content-Type", media::OCI_MANIFEST)
                .header("Docker-Content-Digest", &Digest::of(MANIFEST).to_string()),
            _ => FakeResponse::new(404, "{}"),
        }
    });
    (registry, realm)
}

#[test]
fn a_plain_http_realm_on_another_host_never_receives_credentials() {
    for realm_wants_credentials in [false, true] {
        let (registry, realm) = registry_with_a_foreign_realm(realm_wants_credentials);
        let host = registry.host();
        let config_dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(
            config_dir.path().join("config.json"),
            format!(
                r#"{{"auths": {{"{host}": {{"username": "{USERNAME}", "password": "{PASSWORD}"}}}}}}"#
            ),
        )
        .expect("config.json");
        let client = client_with(config_dir.path(), |_| {});
        let reference = Reference::parse(&format!("{host}/team/app:v1")).expect("reference");
        let result = client.resolve(&reference);

        let realm_requests = realm.requests();
        assert!(!realm_requests.is_empty(), "the realm was asked");
        for request in &realm_requests {
            assert!(
                !request.headers.contains_key("authorization"),
                "credentials leaked to the realm: {request:?}"
            );
            assert!(!request.body.contains(PASSWORD));
        }
        if realm_wants_credentials {
            let error = result.expect_err("the realm refuses anonymous requests");
            assert!(
                matches!(error, RegistryError::InsecureRealm { .. }),
                "{error}"
            );
            assert!(error.is_environment());
            let help = miette::Diagnostic::help(&error)
                .map(|help| help.to_string())
                .unwrap_or_default();
            assert!(
                error.to_string().contains("plain HTTP on another host") && help.contains("HTTPS"),
                "{error} / {help}"
            );
            assert!(!format!("{error} {error:?}").contains(PASSWORD));
        } else {
            assert_eq!(
                result.expect("an anonymous token").digest,
                Digest::of(MANIFEST)
            );
        }
    }
}

#[test]
fn a_registry_that_stalls_mid_manifest_is_an_environment_error_with_help() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let host = format!(
        "127.0.0.1:{}",
        listener.local_addr().expect("address").port()
    );
    let server = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        listener.set_nonblocking(true).expect("nonblocking");
        let mut held = Vec::new();
        while Instant::now() < deadline && held.len() < 8 {
            let Ok((stream, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            stream.set_nonblocking(false).expect("blocking");
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            if !matches!(
                reader.fill_buf().map(|bytes| bytes.first() == Some(&0x16)),
                Ok(false)
            ) {
                continue; // the HTTPS probe
            }
            let mut request_line = String::new();
            let _ = reader.read_line(&mut request_line);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
            }
            let mut stream = stream;
            if request_line.contains("/manifests/") {
                // Headers, a few bytes, then silence.
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n{{\"sch",
                    media::OCI_MANIFEST,
                    MANIFEST.len()
                );
                if request_line.contains("/trickle/") {
                    // One byte every 300 ms: never silent for the 1 s timeout.
                    std::thread::spawn(move || {
                        for byte in MANIFEST.iter().skip(4) {
                            if stream.write_all(&[*byte]).is_err() {
                                return;
                            }
                            std::thread::sleep(Duration::from_millis(300));
                        }
                    });
                    continue;
                }
                held.push(stream);
            } else {
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}");
            }
        }
    });
    let config_dir = tempfile::tempdir().expect("temp dir");
    let client = client_with(config_dir.path(), |options| {
        options.timeout = Duration::from_secs(1);
    });
    let reference = Reference::parse(&format!("{host}/team/app:v1")).expect("reference");
    let started = Instant::now();
    let error = client.resolve(&reference).expect_err("a stalled manifest");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(error, RegistryError::Stalled { .. }), "{error:?}");
    assert!(error.is_environment(), "exit code 3, not 2");
    let help = miette::Diagnostic::help(&error)
        .map(|help| help.to_string())
        .unwrap_or_default();
    assert!(!help.trim().is_empty(), "a real help line");

    // A registry that trickles the manifest a byte at a time hits the whole-call deadline.
    let trickle = Reference::parse(&format!("{host}/trickle/app:v1")).expect("reference");
    let started = Instant::now();
    let error = client.resolve(&trickle).expect_err("a trickled manifest");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(error, RegistryError::Stalled { .. }), "{error:?}");
    drop(server);
}
