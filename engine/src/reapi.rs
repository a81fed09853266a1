//! The REAPI v2 team-cache client: any Remote Execution API cache (BuildGrid, Buildbarn,
//! BuildBuddy, NativeLink, EngFlow, bazel-remote's gRPC side) as a [`RemoteCache`].
//!
//! A protocol client kept in one file (about 1,050 lines of code and its unit tests; its end-to-end
//! tests against BuildGrid are in tests/e2e/reapi.rs): the address, the deadlines, the
//! verification and the mapping of keys to actions share one set of rules for every call.
//!
//! # Addresses
//!
//! `grpc://HOST:PORT[/INSTANCE]` (plain HTTP/2) or `grpcs://HOST[:PORT][/INSTANCE]` (TLS through
//! rustls, trusting the system's roots, `SSL_CERT_FILE` included, and webpki's; port 443 by
//! default). The instance name may have several segments (`team/ci`). A token is sent as
//! `authorization: Bearer TOKEN` metadata, marked sensitive, and appears nowhere else.
//!
//! # What maps to what
//!
//! - **Blobs** are CAS blobs under their sha256 digest and size: an OCI layer blob is a CAS
//!   blob byte for byte, digest for digest. Small ones go through `FindMissingBlobs`,
//!   `BatchUpdateBlobs` and `BatchReadBlobs`; those over the server's batch limit through
//!   `ByteStream.Write` (`{instance}/uploads/{uuid}/blobs/{hash}/{size}`) and `ByteStream.Read`
//!   (`{instance}/blobs/{hash}/{size}`).
//! - **A step key** maps to an `Action` whose digest is a pure function of the key
//!   ([`action_for_key`]): a `Command` whose arguments are `graphbuild cache-entry <key>`, the
//!   empty input root, a fixed salt. The action-cache entry under that digest is an
//!   `ActionResult` whose output files name the step record
//!   ([`STEP_RECORD_PATH`](crate::remote::STEP_RECORD_PATH)) and, for a
//!   step, each layer (`graphbuild/layers/N`), so servers that check an entry's blobs (and keep
//!   them alive while the entry lives) see all of them. The `Action` and `Command` are uploaded
//!   too, so the entry can be inspected with the server's own tools.
//!
//! # The rules of [`crate::remote`]
//!
//! `GetCapabilities` is asked once, on first use: a server that does not offer SHA-256, or an
//! action cache, is refused with [`RemoteError::Unsupported`]. Every call has a deadline
//! (sent to the server as `grpc-timeout` too), every message of a stream a stall timeout, and
//! a call returns [`RemoteError::Cancelled`] within [`CANCEL_POLL`] of the cancel flag being
//! set. Responses are size-capped (action entries at [`MAX_ACTION_RESULT_SIZE`]), downloads
//! stop at one byte over the expected size and land only once their sha256 matches, and an
//! action entry whose digests are malformed is a bad entry, a miss.
//!
//! The engine has no async runtime of its own: each client owns a small tokio runtime and its
//! blocking methods wait on it, from any number of build threads at once.

use std::future::Future;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::bytestream as bs;
use prost::Message;
use re::action_cache_client::ActionCacheClient;
use re::capabilities_client::CapabilitiesClient;
use re::content_addressable_storage_client::ContentAddressableStorageClient;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::digest::{Digest, DigestWriter};
use crate::remote::{
    ActionResult, CANCEL_POLL, CONNECT_TIMEOUT, DecodeError, MAX_ACTION_RESULT_SIZE,
    MIN_TRANSFER_RATE, OutputFile, RemoteCache, RemoteError, redact_userinfo, timeout_from_env,
};

/// The digest function of every request: SHA-256, OCI's.
pub(crate) const SHA256: i32 = re::digest_function::Value::Sha256 as i32;
/// The largest batch used when the server names no limit (gRPC's default message size).
const DEFAULT_BATCH_LIMIT: u64 = 4 * 1024 * 1024;
/// Room left in a batch for the messages' own framing.
const BATCH_OVERHEAD: u64 = 64 * 1024;
/// The size of each `ByteStream.Write` message.
const WRITE_CHUNK: usize = 1024 * 1024;
/// The largest message accepted from a CAS or ByteStream response, besides batches.
pub(crate) const MAX_STREAM_MESSAGE: usize = 4 * 1024 * 1024 + BATCH_OVERHEAD as usize;
/// The salt of every graphbuild `Action`; a change here starts a new keyspace.
const ACTION_SALT: &[u8] = b"graphbuild cache entry v1";
/// Instance-name segments the REAPI reserves for resource names.
const RESERVED_SEGMENTS: [&str; 6] = [
    "blobs",
    "uploads",
    "actions",
    "actionResults",
    "operations",
    "capabilities",
];

/// The `Action` and `Command` a cache key stands for, encoded; the action's digest is the
/// action-cache key. Deterministic: prost writes fields in field order, and nothing here
/// depends on anything but `key_hex`.
pub fn action_for_key(key_hex: &str) -> (Vec<u8>, Vec<u8>) {
    let command = re::Command {
        arguments: vec![
            "graphbuild".to_string(),
            "cache-entry".to_string(),
            key_hex.to_string(),
        ],
        output_paths: vec!["graphbuild".to_string()],
        ..Default::default()
    }
    .encode_to_vec();
    let action = re::Action {
        command_digest: Some(proto_digest(&Digest::of(&command), command.len() as u64)),
        // The empty `Directory`: an input root with nothing in it.
        input_root_digest: Some(proto_digest(&Digest::of(b""), 0)),
        salt: ACTION_SALT.to_vec(),
        ..Default::default()
    }
    .encode_to_vec();
    (action, command)
}

pub(crate) fn proto_digest(digest: &Digest, size: u64) -> re::Digest {
    re::Digest {
        hash: digest.hex(),
        size_bytes: size as i64,
    }
}

/// A digest from a server: 64 lowercase hex digits and a size that is not negative.
pub(crate) fn parse_proto_digest(
    digest: Option<&re::Digest>,
) -> Result<(Digest, u64), DecodeError> {
    let digest = digest.ok_or(DecodeError::MissingDigest)?;
    let hex_ok = digest.hash.len() == 64
        && digest
            .hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let parsed = hex_ok
        .then(|| Digest::from_hex(&digest.hash))
        .flatten()
        .ok_or(DecodeError::InvalidHash)?;
    let size = u64::try_from(digest.size_bytes).map_err(|_| DecodeError::NegativeSize)?;
    Ok((parsed, size))
}

/// The server's answers to `GetCapabilities` that matter here.
#[derive(Clone, Copy, Debug)]
struct Limits {
    /// Blobs up to this size go through the batch calls.
    batch_blob: u64,
    /// Whether clients may write the action cache.
    update_enabled: bool,
}

/// A REAPI v2 cache at `grpc(s)://HOST:PORT[/INSTANCE]`. Cheap to clone; share it between
/// threads (one HTTP/2 connection carries every call).
#[derive(Clone)]
pub struct ReapiCache {
    url: String,
    instance: String,
    runtime: Arc<tokio::runtime::Runtime>,
    channel: Channel,
    authorization: Option<AsciiMetadataValue>,
    timeout: Duration,
    cancel: Option<Arc<AtomicBool>>,
    limits: Arc<Mutex<Option<Limits>>>,
}

impl std::fmt::Debug for ReapiCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReapiCache")
            .field("url", &self.url)
            .field("token", &self.authorization.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl ReapiCache {
    /// `url` is `grpc://HOST:PORT[/INSTANCE]` or `grpcs://HOST[:PORT][/INSTANCE]`; `token` is
    /// sent as `authorization: Bearer TOKEN`. Nothing is sent before the first call.
    pub fn new(url: &str, token: Option<String>) -> Result<ReapiCache, RemoteError> {
        let invalid = |reason| RemoteError::InvalidUrl {
            url: redact_userinfo(url),
            reason,
        };
        let (tls, rest) = if let Some(rest) = url.strip_prefix("grpc://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("grpcs://") {
            (true, rest)
        } else {
            return Err(invalid("the scheme must be grpc:// or grpcs://"));
        };
        let (authority, instance) = rest.split_once('/').unwrap_or((rest, ""));
        if authority.is_empty() {
            return Err(invalid("the host is missing"));
        }
        if authority.contains('@') {
            return Err(invalid("credentials in the URL are not supported"));
        }
        if rest.contains(['?', '#']) {
            return Err(invalid("a query or fragment is not allowed"));
        }
        let instance = instance.trim_end_matches('/');
        if !instance.is_empty()
            && instance.split('/').any(|segment| {
                segment.is_empty()
                    || RESERVED_SEGMENTS.contains(&segment)
                    || segment.bytes().any(|b| !b.is_ascii_graphic())
            })
        {
            return Err(invalid(
                "the instance name must be visible ASCII segments, none empty and none of blobs, uploads, actions, actionResults, operations, capabilities",
            ));
        }
        // After an IPv6 literal's brackets, or in a host name, a colon starts the port.
        let after_host = match authority.strip_prefix('[') {
            Some(rest) => rest.split_once(']').map_or("", |(_, after)| after),
            None => authority,
        };
        let host_has_port = after_host.contains(':');
        let authority = match (host_has_port, tls) {
            (true, _) => authority.to_string(),
            (false, true) => format!("{authority}:443"),
            (false, false) => return Err(invalid("grpc:// needs a port: grpc://HOST:PORT")),
        };
        let authorization = match token {
            None => None,
            Some(token) => {
                if token.is_empty() || token.bytes().any(|b| !b.is_ascii_graphic()) {
                    return Err(invalid("the token must be non-empty visible ASCII"));
                }
                let mut value: AsciiMetadataValue =
                    MetadataValue::try_from(format!("Bearer {token}"))
                        .map_err(|_| invalid("the token must be non-empty visible ASCII"))?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        let timeout = timeout_from_env()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("graphbuild-reapi")
            .enable_all()
            .build()
            .map_err(|error| RemoteError::Unreachable {
                method: "connect",
                url: url.to_string(),
                message: format!("cannot start the gRPC runtime: {error}"),
            })?;
        let scheme = if tls { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{authority}"))
            .map_err(|_| invalid("the host or port is not valid"))?
            .connect_timeout(CONNECT_TIMEOUT.min(timeout))
            .tcp_nodelay(true)
            .user_agent(concat!("graphbuild/", env!("CARGO_PKG_VERSION")))
            .map_err(|_| invalid("the host or port is not valid"))?;
        if tls {
            endpoint = endpoint
                .tls_config(
                    ClientTlsConfig::new()
                        .with_native_roots()
                        .with_webpki_roots(),
                )
                .map_err(|_| invalid("TLS cannot be set up for this host"))?;
        }
        // A lazy channel connects on first use (and reconnects after a failure).
        let channel = {
            let _context = runtime.enter();
            endpoint.connect_lazy()
        };
        Ok(ReapiCache {
            url: url.trim_end_matches('/').to_string(),
            instance: instance.to_string(),
            runtime: Arc::new(runtime),
            channel,
            authorization,
            timeout,
            cancel: None,
            limits: Arc::new(Mutex::new(None)),
        })
    }

    /// The same cache with another timeout (the longest silence, and the base of every
    /// call's deadline).
    pub fn with_timeout(mut self, timeout: Duration) -> ReapiCache {
        self.timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// The same cache, giving up on any call within [`CANCEL_POLL`] of `flag` being set.
    pub fn with_cancel(mut self, flag: Arc<AtomicBool>) -> ReapiCache {
        self.cancel = Some(flag);
        self
    }

    /// The instance name from the URL (empty for none).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub(crate) fn small_deadline(&self) -> Duration {
        self.timeout * 2
    }

    pub(crate) fn transfer_deadline(&self, size: u64) -> Duration {
        self.timeout * 2 + Duration::from_secs(size / MIN_TRANSFER_RATE)
    }

    /// A request carrying the token and the deadline.
    pub(crate) fn request<T>(&self, message: T, deadline: Duration) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(deadline);
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        request
    }

    /// Run `work` on the runtime until it ends, `deadline` passes, or the build is cancelled.
    pub(crate) fn run<T>(
        &self,
        method: &'static str,
        deadline: Duration,
        work: impl Future<Output = Result<T, RemoteError>>,
    ) -> Result<T, RemoteError> {
        let cancelled = || {
            self.cancel
                .as_ref()
                .is_some_and(|flag| flag.load(Ordering::Relaxed))
        };
        if cancelled() {
            return Err(RemoteError::Cancelled);
        }
        self.runtime.block_on(async {
            let watch = async {
                loop {
                    tokio::time::sleep(CANCEL_POLL).await;
                    if cancelled() {
                        return;
                    }
                }
            };
            tokio::select! {
                result = tokio::time::timeout(deadline, work) => match result {
                    Ok(result) => result,
                    Err(_) => Err(RemoteError::Unreachable {
                        method,
                        url: self.url.clone(),
                        message: format!("no answer within {:.1}s", deadline.as_secs_f64()),
                    }),
                },
                () = watch => Err(RemoteError::Cancelled),
            }
        })
    }

    /// [`run`](Self::run) whatever the cancel flag says: for what must still be said once a
    /// build is cancelled (cancelling its remote operations), within `deadline`.
    pub(crate) fn run_despite_cancel<T>(
        &self,
        deadline: Duration,
        work: impl Future<Output = T>,
    ) -> Option<T> {
        self.runtime
            .block_on(async { tokio::time::timeout(deadline, work).await.ok() })
    }

    /// A failed call as an error: the cache is unreachable, refuses us, or answered otherwise.
    pub(crate) fn status_error(&self, method: &'static str, status: &tonic::Status) -> RemoteError {
        let mut message: String = status.message().chars().take(512).collect();
        let mut source = std::error::Error::source(status);
        while let Some(cause) = source {
            message.push_str(": ");
            message.extend(cause.to_string().chars().take(256));
            source = cause.source();
        }
        let url = self.url.clone();
        match status.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => RemoteError::Unreachable {
                method,
                url,
                message,
            },
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => RemoteError::Refused {
                method,
                url,
                code: status.code().description(),
                message,
            },
            code => RemoteError::Rpc {
                method,
                url,
                code: code.description(),
                message,
            },
        }
    }

    /// The server's limits, asked once.
    pub(crate) fn check_capabilities(&self) -> Result<(), RemoteError> {
        self.limits().map(|_| ())
    }

    /// The channel every call of this client shares (for the execution and bots clients).
    pub(crate) fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The timeout this client was opened with.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    fn limits(&self) -> Result<Limits, RemoteError> {
        if let Some(limits) = *self.limits.lock().unwrap_or_else(|e| e.into_inner()) {
            return Ok(limits);
        }
        let method = "GetCapabilities";
        let capabilities = self.run(method, self.small_deadline(), async {
            let mut client = CapabilitiesClient::new(self.channel.clone())
                .max_decoding_message_size(MAX_ACTION_RESULT_SIZE as usize);
            let request = self.request(
                re::GetCapabilitiesRequest {
                    instance_name: self.instance.clone(),
                },
                self.small_deadline(),
            );
            client
                .get_capabilities(request)
                .await
                .map(tonic::Response::into_inner)
                .map_err(|status| self.status_error(method, &status))
        })?;
        let unsupported = |reason: &str| RemoteError::Unsupported {
            url: self.url.clone(),
            reason: reason.to_string(),
        };
        let cache = capabilities.cache_capabilities.ok_or_else(|| {
            unsupported("it offers no content-addressable storage or action cache")
        })?;
        if !cache.digest_functions.contains(&SHA256) {
            let names: Vec<String> = cache
                .digest_functions
                .iter()
                .map(|value| {
                    re::digest_function::Value::try_from(*value)
                        .map(|value| value.as_str_name().to_string())
                        .unwrap_or_else(|_| value.to_string())
                })
                .collect();
            return Err(unsupported(&format!(
                "it does not offer SHA-256 digests (it offers: {}), and OCI layers are addressed by SHA-256",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )));
        }
        let server_batch = u64::try_from(cache.max_batch_total_size_bytes)
            .ok()
            .filter(|size| *size > 0)
            .unwrap_or(DEFAULT_BATCH_LIMIT)
            .min(DEFAULT_BATCH_LIMIT);
        let limits = Limits {
            batch_blob: server_batch.saturating_sub(BATCH_OVERHEAD),
            update_enabled: cache
                .action_cache_update_capabilities
                .is_some_and(|update| update.update_enabled),
        };
        *self.limits.lock().unwrap_or_else(|e| e.into_inner()) = Some(limits);
        Ok(limits)
    }

    fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_STREAM_MESSAGE)
            .max_encoding_message_size(MAX_STREAM_MESSAGE)
    }

    fn blob_resource(&self, digest: &Digest, size: u64) -> String {
        let blob = format!("blobs/{}/{size}", digest.hex());
        if self.instance.is_empty() {
            blob
        } else {
            format!("{}/{blob}", self.instance)
        }
    }

    fn upload_resource(&self, digest: &Digest, size: u64) -> String {
        let upload = format!(
            "uploads/{}/blobs/{}/{size}",
            uuid::Uuid::new_v4(),
            digest.hex()
        );
        if self.instance.is_empty() {
            upload
        } else {
            format!("{}/{upload}", self.instance)
        }
    }

    /// The blobs of `blobs` the cache lacks.
    pub(crate) fn find_missing(&self, blobs: &[(Digest, u64)]) -> Result<Vec<Digest>, RemoteError> {
        let method = "FindMissingBlobs";
        let response = self.run(method, self.small_deadline(), async {
            let request = self.request(
                re::FindMissingBlobsRequest {
                    instance_name: self.instance.clone(),
                    blob_digests: blobs
                        .iter()
                        .map(|(digest, size)| proto_digest(digest, *size))
                        .collect(),
                    digest_function: SHA256,
                },
                self.small_deadline(),
            );
            self.cas()
                .find_missing_blobs(request)
                .await
                .map(tonic::Response::into_inner)
                .map_err(|status| self.status_error(method, &status))
        })?;
        Ok(response
            .missing_blob_digests
            .iter()
            .filter_map(|digest| parse_proto_digest(Some(digest)).ok())
            .map(|(digest, _)| digest)
            .collect())
    }

    /// Upload small blobs in one `BatchUpdateBlobs`; every one must be accepted.
    fn batch_update(&self, blobs: Vec<(Digest, Vec<u8>)>) -> Result<(), RemoteError> {
        let method = "BatchUpdateBlobs";
        let total: u64 = blobs.iter().map(|(_, data)| data.len() as u64).sum();
        let deadline = self.transfer_deadline(total);
        let response = self.run(method, deadline, async {
            let request = self.request(
                re::BatchUpdateBlobsRequest {
                    instance_name: self.instance.clone(),
                    requests: blobs
                        .into_iter()
                        .map(|(digest, data)| re::batch_update_blobs_request::Request {
                            digest: Some(proto_digest(&digest, data.len() as u64)),
                            data,
                            compressor: 0,
                        })
                        .collect(),
                    digest_function: SHA256,
                },
                deadline,
            );
            self.cas()
                .batch_update_blobs(request)
                .await
                .map(tonic::Response::into_inner)
                .map_err(|status| self.status_error(method, &status))
        })?;
        for answer in response.responses {
            if let Some(status) = answer.status.filter(|status| status.code != 0) {
                let code = tonic::Code::from_i32(status.code);
                return Err(self.status_error(method, &tonic::Status::new(code, status.message)));
            }
        }
        Ok(())
    }

    /// Upload a file of `size` bytes through `ByteStream.Write`.
    fn stream_upload(&self, digest: &Digest, size: u64, path: &Path) -> Result<(), RemoteError> {
        let method = "ByteStream.Write";
        let mut file = std::fs::File::open(path).map_err(|source| RemoteError::Io {
            action: "cannot open",
            path: path.to_path_buf(),
            source,
        })?;
        let resource = self.upload_resource(digest, size);
        let read_error: Arc<Mutex<Option<std::io::Error>>> = Arc::default();
        let failure = read_error.clone();
        // Chunks are read as the stream is sent; the last one says `finish_write`.
        let mut offset: u64 = 0;
        let mut finished = false;
        let chunks = std::iter::from_fn(move || {
            if finished {
                return None;
            }
            let mut data = vec![0u8; WRITE_CHUNK];
            let mut filled = 0;
            while filled < data.len() {
                match file.read(&mut data[filled..]) {
                    Ok(0) => break,
                    Ok(count) => filled += count,
                    Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(error) => {
                        *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
                        return None;
                    }
                }
            }
            data.truncate(filled);
            let request = bs::WriteRequest {
                resource_name: if offset == 0 {
                    resource.clone()
                } else {
                    String::new()
                },
                write_offset: offset as i64,
                finish_write: offset + filled as u64 >= size,
                data,
            };
            offset += filled as u64;
            finished = request.finish_write || filled == 0;
            Some(request)
        });
        let deadline = self.transfer_deadline(size);
        let response = self.run(method, deadline, async {
            let request = self.request(tonic::codegen::tokio_stream::iter(chunks), deadline);
            bs::byte_stream_client::ByteStreamClient::new(self.channel.clone())
                .max_encoding_message_size(MAX_STREAM_MESSAGE)
                .write(request)
                .await
                .map(tonic::Response::into_inner)
                .map_err(|status| self.status_error(method, &status))
        });
        if let Some(error) = read_error.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(RemoteError::Io {
                action: "cannot read",
                path: path.to_path_buf(),
                source: error,
            });
        }
        let response = response?;
        // A server that already had the blob may answer before the end, with its full size.
        if u64::try_from(response.committed_size).ok() != Some(size) {
            return Err(RemoteError::Rpc {
                method,
                url: self.url.clone(),
                code: "unexpected answer",
                message: format!("{} bytes committed of {size}", response.committed_size),
            });
        }
        Ok(())
    }

    /// Read a small blob through `BatchReadBlobs`; `None` if the cache does not have it.
    fn batch_read(&self, digest: &Digest, size: u64) -> Result<Option<Vec<u8>>, RemoteError> {
        let method = "BatchReadBlobs";
        let deadline = self.transfer_deadline(size);
        let response = self.run(method, deadline, async {
            let request = self.request(
                re::BatchReadBlobsRequest {
                    instance_name: self.instance.clone(),
                    digests: vec![proto_digest(digest, size)],
                    acceptable_compressors: Vec::new(),
                    digest_function: SHA256,
                },
                deadline,
            );
            self.cas()
                .batch_read_blobs(request)
                .await
                .map(tonic::Response::into_inner)
                .map_err(|status| self.status_error(method, &status))
        })?;
        let answer = response.responses.into_iter().find(|answer| {
            answer
                .digest
                .as_ref()
                .is_some_and(|d| d.hash == digest.hex())
        });
        let Some(answer) = answer else {
            return Err(RemoteError::Rpc {
                method,
                url: self.url.clone(),
                code: "unexpected answer",
                message: format!("no response for blob {digest}"),
            });
        };
        match answer
            .status
            .as_ref()
            .map(|status| status.code)
            .unwrap_or(0)
        {
            0 => {}
            code if code == tonic::Code::NotFound as i32 => return Ok(None),
            code => {
                let message = answer
                    .status
                    .map(|status| status.message)
                    .unwrap_or_default();
                return Err(self.status_error(
                    method,
                    &tonic::Status::new(tonic::Code::from_i32(code), message),
                ));
            }
        }
        if answer.compressor != 0 {
            return Err(RemoteError::Rpc {
                method,
                url: self.url.clone(),
                code: "unexpected answer",
                message: "a compressed blob that was not asked for".into(),
            });
        }
        Ok(Some(answer.data))
    }

    /// Stream a blob through `ByteStream.Read` into `sink`; `false` if the cache lacks it.
    fn stream_read(
        &self,
        digest: &Digest,
        size: u64,
        sink: &mut BlobSink,
    ) -> Result<bool, RemoteError> {
        let method = "ByteStream.Read";
        let deadline = self.transfer_deadline(size);
        let stall = self.timeout;
        self.run(method, deadline, async {
            let request = self.request(
                bs::ReadRequest {
                    resource_name: self.blob_resource(digest, size),
                    read_offset: 0,
                    read_limit: 0,
                },
                deadline,
            );
            let mut client = bs::byte_stream_client::ByteStreamClient::new(self.channel.clone())
                .max_decoding_message_size(MAX_STREAM_MESSAGE);
            let mut stream = match client.read(request).await {
                Ok(response) => response.into_inner(),
                Err(status) if status.code() == tonic::Code::NotFound => return Ok(false),
                Err(status) => return Err(self.status_error(method, &status)),
            };
            loop {
                let message = tokio::time::timeout(stall, stream.message())
                    .await
                    .map_err(|_| RemoteError::Unreachable {
                        method,
                        url: self.url.clone(),
                        message: format!("the download stalled for {:.1}s", stall.as_secs_f64()),
                    })?;
                match message {
                    Ok(Some(chunk)) => sink.write(&chunk.data)?,
                    Ok(None) => return Ok(true),
                    Err(status) if status.code() == tonic::Code::NotFound => return Ok(false),
                    Err(status) => return Err(self.status_error(method, &status)),
                }
            }
        })
    }
}

/// A download in progress: bytes go to a temp file beside the destination while they are
/// hashed; more than the expected size is refused at once, and the file lands only once its
/// size and sha256 match (dropping the sink deletes it).
struct BlobSink {
    digest: Digest,
    size: u64,
    received: u64,
    hasher: DigestWriter,
    temp: tempfile::NamedTempFile,
}

impl BlobSink {
    fn new(digest: Digest, size: u64, dest: &Path) -> Result<BlobSink, RemoteError> {
        let directory = match dest.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let temp = tempfile::Builder::new()
            .prefix(".download-")
            .tempfile_in(directory)
            .map_err(|source| RemoteError::Io {
                action: "cannot create a download file in",
                path: directory.to_path_buf(),
                source,
            })?;
        Ok(BlobSink {
            digest,
            size,
            received: 0,
            hasher: DigestWriter::new(),
            temp,
        })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), RemoteError> {
        self.received += bytes.len() as u64;
        if self.received > self.size {
            return Err(RemoteError::SizeMismatch {
                digest: self.digest,
                expected: self.size,
                actual: "more bytes".into(),
            });
        }
        self.hasher.update(bytes);
        self.temp
            .write_all(bytes)
            .map_err(|source| RemoteError::Io {
                action: "cannot write",
                path: self.temp.path().to_path_buf(),
                source,
            })
    }

    fn finish(self, dest: &Path) -> Result<(), RemoteError> {
        if self.received != self.size {
            return Err(RemoteError::SizeMismatch {
                digest: self.digest,
                expected: self.size,
                actual: format!("{} bytes", self.received),
            });
        }
        let actual = self.hasher.finish();
        if actual != self.digest {
            return Err(RemoteError::DigestMismatch {
                expected: self.digest,
                actual,
            });
        }
        self.temp
            .as_file()
            .sync_all()
            .map_err(|source| RemoteError::Io {
                action: "cannot sync",
                path: self.temp.path().to_path_buf(),
                source,
            })?;
        self.temp.persist(dest).map_err(|error| RemoteError::Io {
            action: "cannot move a download to",
            path: dest.to_path_buf(),
            source: error.error,
        })?;
        Ok(())
    }
}

fn check_key(key_hex: &str) -> Result<(), RemoteError> {
    if key_hex.len() == 64
        && key_hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(RemoteError::InvalidKey(key_hex.to_string()))
    }
}

impl RemoteCache for ReapiCache {
    fn url(&self) -> &str {
        &self.url
    }

    fn get_action(&self, key_hex: &str) -> Result<Option<ActionResult>, RemoteError> {
        check_key(key_hex)?;
        self.limits()?;
        let (action, _) = action_for_key(key_hex);
        let method = "GetActionResult";
        let response = self.run(method, self.small_deadline(), async {
            let request = self.request(
                re::GetActionResultRequest {
                    instance_name: self.instance.clone(),
                    action_digest: Some(proto_digest(&Digest::of(&action), action.len() as u64)),
                    digest_function: SHA256,
                    ..Default::default()
                },
                self.small_deadline(),
            );
            let mut client = ActionCacheClient::new(self.channel.clone())
                .max_decoding_message_size(MAX_ACTION_RESULT_SIZE as usize);
            match client.get_action_result(request).await {
                Ok(response) => Ok(Some(response.into_inner())),
                Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
                // tonic's answer to a message over the decoding limit.
                Err(status) if status.code() == tonic::Code::OutOfRange => {
                    Err(RemoteError::Decode {
                        key: key_hex.to_string(),
                        source: DecodeError::TooLarge,
                    })
                }
                Err(status) => Err(self.status_error(method, &status)),
            }
        })?;
        let Some(result) = response else {
            return Ok(None);
        };
        let decode = |source| RemoteError::Decode {
            key: key_hex.to_string(),
            source,
        };
        let mut output_files = Vec::with_capacity(result.output_files.len());
        for file in &result.output_files {
            let (digest, size_bytes) = parse_proto_digest(file.digest.as_ref()).map_err(decode)?;
            output_files.push(OutputFile {
                path: file.path.clone(),
                digest,
                size_bytes,
                is_executable: file.is_executable,
            });
        }
        Ok(Some(ActionResult {
            output_files,
            exit_code: result.exit_code,
        }))
    }

    fn put_action(&self, key_hex: &str, result: &ActionResult) -> Result<(), RemoteError> {
        check_key(key_hex)?;
        let limits = self.limits()?;
        if !limits.update_enabled {
            return Err(RemoteError::Unsupported {
                url: self.url.clone(),
                reason:
                    "it does not let clients write its action cache (use it with --cache-from only)"
                        .into(),
            });
        }
        // The action and its command, so the entry can be inspected with the server's tools.
        let (action, command) = action_for_key(key_hex);
        let action_digest = Digest::of(&action);
        let action_size = action.len() as u64;
        let missing = self.find_missing(&[
            (action_digest, action_size),
            (Digest::of(&command), command.len() as u64),
        ])?;
        let upload: Vec<(Digest, Vec<u8>)> = [action, command]
            .into_iter()
            .map(|bytes| (Digest::of(&bytes), bytes))
            .filter(|(digest, _)| missing.contains(digest))
            .collect();
        if !upload.is_empty() {
            self.batch_update(upload)?;
        }
        let method = "UpdateActionResult";
        let message = re::UpdateActionResultRequest {
            instance_name: self.instance.clone(),
            action_digest: Some(proto_digest(&action_digest, action_size)),
            action_result: Some(re::ActionResult {
                output_files: result
                    .output_files
                    .iter()
                    .map(|file| re::OutputFile {
                        path: file.path.clone(),
                        digest: Some(proto_digest(&file.digest, file.size_bytes)),
                        is_executable: file.is_executable,
                        ..Default::default()
                    })
                    .collect(),
                exit_code: result.exit_code,
                ..Default::default()
            }),
            results_cache_policy: None,
            digest_function: SHA256,
        };
        self.run(method, self.small_deadline(), async {
            let request = self.request(message, self.small_deadline());
            ActionCacheClient::new(self.channel.clone())
                .max_decoding_message_size(MAX_ACTION_RESULT_SIZE as usize)
                .update_action_result(request)
                .await
                .map(|_| ())
                .map_err(|status| self.status_error(method, &status))
        })
    }

    fn get_blob_to(&self, digest: &Digest, size: u64, dest: &Path) -> Result<bool, RemoteError> {
        let limits = self.limits()?;
        let mut sink = BlobSink::new(*digest, size, dest)?;
        if size <= limits.batch_blob {
            match self.batch_read(digest, size)? {
                None => return Ok(false),
                Some(data) => sink.write(&data)?,
            }
        } else if !self.stream_read(digest, size, &mut sink)? {
            return Ok(false);
        }
        sink.finish(dest)?;
        Ok(true)
    }

    fn put_blob_from(&self, digest: &Digest, path: &Path) -> Result<(), RemoteError> {
        let limits = self.limits()?;
        let size = std::fs::metadata(path)
            .map_err(|source| RemoteError::Io {
                action: "cannot read",
                path: path.to_path_buf(),
                source,
            })?
            .len();
        if self.find_missing(&[(*digest, size)])?.is_empty() {
            return Ok(());
        }
        if size <= limits.batch_blob {
            let data = std::fs::read(path).map_err(|source| RemoteError::Io {
                action: "cannot read",
                path: path.to_path_buf(),
                source,
            })?;
            self.batch_update(vec![(*digest, data)])
        } else {
            self.stream_upload(digest, size, path)
        }
    }

    fn put_blob_bytes(&self, bytes: &[u8]) -> Result<Digest, RemoteError> {
        let limits = self.limits()?;
        let digest = Digest::of(bytes);
        if bytes.len() as u64 <= limits.batch_blob {
            self.batch_update(vec![(digest, bytes.to_vec())])?;
        } else {
            let mut temp = tempfile::NamedTempFile::new().map_err(|source| RemoteError::Io {
                action: "cannot create a temp file in",
                path: std::env::temp_dir(),
                source,
            })?;
            temp.write_all(bytes).map_err(|source| RemoteError::Io {
                action: "cannot write",
                path: temp.path().to_path_buf(),
                source,
            })?;
            self.stream_upload(&digest, bytes.len() as u64, temp.path())?;
        }
        Ok(digest)
    }

    fn put_step_record(
        &self,
        key_hex: &str,
        record: &[u8],
        layers: &[(Digest, u64)],
    ) -> Result<(), RemoteError> {
        let digest = self.put_blob_bytes(record)?;
        let mut result = ActionResult::for_step_record(digest, record.len() as u64);
        result
            .output_files
            .extend(
                layers
                    .iter()
                    .enumerate()
                    .map(|(index, (digest, size))| OutputFile {
                        path: format!("graphbuild/layers/{index}"),
                        digest: *digest,
                        size_bytes: *size,
                        is_executable: false,
                    }),
            );
        self.put_action(key_hex, &result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_action_is_a_pure_function_of_the_key() {
        let key = "ab".repeat(32);
        let (action, command) = action_for_key(&key);
        assert_eq!(action_for_key(&key), (action.clone(), command.clone()));
        assert_ne!(action_for_key(&"cd".repeat(32)).0, action);
        let decoded = re::Action::decode(&action[..]).unwrap();
        assert_eq!(
            decoded.command_digest.unwrap().hash,
            Digest::of(&command).hex()
        );
        let command = re::Command::decode(&command[..]).unwrap();
        assert_eq!(command.arguments, ["graphbuild", "cache-entry", &key]);
        // Pinned (computed independently with BuildGrid's Python protobuf bindings): changing
        // the mapping orphans every entry in every team's cache.
        assert_eq!(
            Digest::of(&action).hex(),
            "64124d39908bdc07e81897445d93839c958dceb78e8018cf2e73560e8e8c0cb4",
            "the Action of a key changed: change ACTION_SALT's version on purpose, or restore it"
        );
    }

    #[test]
    fn urls_are_checked_and_tokens_never_shown() {
        for bad in [
            "http://host:1",
            "grpc://",
            "grpc://host",
            "grpc://user:secret@host:1",
            "grpc://host:1/a//b",
            "grpc://host:1/blobs",
            "grpc://host:1/x?y",
        ] {
            let error = ReapiCache::new(bad, None).unwrap_err();
            assert!(!error.to_string().contains("secret"), "{error}");
        }
        let cache = ReapiCache::new("grpc://127.0.0.1:9/team/ci/", Some("s3cret".into())).unwrap();
        assert_eq!(cache.instance(), "team/ci");
        assert_eq!(cache.url(), "grpc://127.0.0.1:9/team/ci");
        assert!(!format!("{cache:?}").contains("s3cret"));
        let digest = Digest::of(b"x");
        assert_eq!(
            cache.blob_resource(&digest, 1),
            format!("team/ci/blobs/{}/1", digest.hex())
        );
        let upload = cache.upload_resource(&digest, 1);
        assert!(upload.starts_with("team/ci/uploads/"), "{upload}");
        assert!(
            upload.ends_with(&format!("/blobs/{}/1", digest.hex())),
            "{upload}"
        );
        let plain = ReapiCache::new("grpcs://cache.example", None).unwrap();
        assert_eq!(plain.instance(), "");
        assert_eq!(
            plain.blob_resource(&digest, 1),
            format!("blobs/{}/1", digest.hex())
        );
    }

    #[test]
    fn a_dead_server_is_unreachable_quickly_and_without_the_token() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cache = ReapiCache::new(&format!("grpc://127.0.0.1:{port}"), Some("s3cret".into()))
            .unwrap()
            .with_timeout(Duration::from_secs(2));
        let started = std::time::Instant::now();
        let error = cache.get_action(&"ab".repeat(32)).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(
            matches!(error, RemoteError::Unreachable { .. }),
            "{error:?}"
        );
        assert!(!error.is_bad_entry());
        assert!(!format!("{error} {error:?}").contains("s3cret"));
    }

    #[test]
    fn malformed_digests_from_a_server_are_refused() {
        let good = proto_digest(&Digest::of(b"x"), 1);
        assert_eq!(
            parse_proto_digest(Some(&good)).unwrap(),
            (Digest::of(b"x"), 1)
        );
        let upper = re::Digest {
            hash: good.hash.to_uppercase(),
            size_bytes: 1,
        };
        assert_eq!(
            parse_proto_digest(Some(&upper)),
            Err(DecodeError::InvalidHash)
        );
        let negative = re::Digest {
            hash: good.hash.clone(),
            size_bytes: -1,
        };
        assert_eq!(
            parse_proto_digest(Some(&negative)),
            Err(DecodeError::NegativeSize)
        );
        assert_eq!(parse_proto_digest(None), Err(DecodeError::MissingDigest));
    }
}
