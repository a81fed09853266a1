//! The remote cache client: bazel-remote's HTTP protocol, blocking, over `ureq`.
//!
//! A protocol client kept in one file (about 1,000 lines of code, the rest tests): requests,
//! size caps, verification and cancellation share one set of rules for every call.
//!
//! # Protocol
//!
//! A remote cache is a base URL, `http(s)://host:port[/instance]`. Blobs live at
//! `BASE/cas/<sha256 hex>`, action entries at `BASE/ac/<64 hex key>`; `HEAD` asks whether an
//! entry exists, `GET` fetches it, `PUT` stores it. `graphbuild cache serve` speaks this, and so
//! do bazel-remote and other Bazel HTTP caches.
//!
//! # What graphbuild stores
//!
//! A step's result is a small JSON record (its layer digests, metadata) stored as a CAS blob;
//! the layers it names are CAS blobs too. The action-cache entry under the step's cache key is
//! an REAPI `build.bazel.remote.execution.v2.ActionResult` protobuf whose single output file
//! [`STEP_RECORD_PATH`] points at the record, so a standard cache accepts it unchanged and a
//! future remote-execution backend can produce it. [`ActionResult`] encodes and decodes the
//! few fields involved by hand (no protoc): unknown fields are skipped on decode, so entries
//! written by other tools decode as long as the fields we read are well-formed.
//!
//! Uploads go blobs first, then the action entry, so a reader that sees an entry finds its
//! blobs (unless evicted since: callers treat an entry with missing blobs as a miss).
//!
//! # Failure and secrets
//!
//! Every call either succeeds or returns a [`RemoteError`] that names the URL path and the
//! status; the caller decides whether a failing cache is fatal. The bearer token is sent only
//! in the `Authorization` header and never appears in an error, in `Debug` output, or in a
//! URL (URLs with `user:password@` are refused for that reason).
//!
//! # Hostile or broken servers
//!
//! The cache is not trusted with anything but availability:
//!
//! - **Bounded time.** Connecting gives up after [`CONNECT_TIMEOUT`]; waiting for response
//!   headers, and any silence while a body is sent or received, after the client's timeout
//!   ([`STALL_TIMEOUT`] by default, [`TIMEOUT_ENV`] or [`RemoteCache::with_timeout`] to
//!   change it). Each call also has a whole-call deadline: twice the timeout for small
//!   requests, plus one second per [`MIN_TRANSFER_RATE`] bytes for blob transfers, so a
//!   server trickling one byte at a time cannot hold a build either.
//! - **Cancellation.** With [`RemoteCache::with_cancel`], every call returns
//!   [`RemoteError::Cancelled`] within [`CANCEL_POLL`] of the flag being set (Ctrl-C or
//!   SIGTERM), whatever the network does: the transfer runs on a helper thread that is left
//!   to time out on its own.
//! - **Bounded size.** A blob is downloaded knowing its size (from the step record or the
//!   action entry that names it): a `Content-Length` that disagrees is refused before reading,
//!   and at most `size + 1` bytes are ever read. Action entries are read up to
//!   [`MAX_ACTION_RESULT_SIZE`], step records up to [`MAX_STEP_RECORD_SIZE`].
//! - **Nothing unverified lands.** Downloads stream to a temp file next to the destination
//!   and are renamed into place only once their size and sha256 match; anything else deletes
//!   the temp file.
//! - **A bad entry is a miss.** [`RemoteError::is_bad_entry`] tells errors about one entry
//!   (an undecodable action value, an entry that is not ours, a blob of the wrong size or
//!   content) from errors about the cache as a whole (unreachable, refused, timed out): the
//!   builder counts the former as a miss and keeps using the cache.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use crate::digest::{Digest, DigestWriter};

/// The output-file path that marks graphbuild's step record in an [`ActionResult`].
pub const STEP_RECORD_PATH: &str = "graphbuild/step.json";
/// Largest action-cache value the client reads.
pub const MAX_ACTION_RESULT_SIZE: u64 = 1024 * 1024;
/// Connecting to the cache gives up after this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The default timeout: waiting for response headers (uploads are synced before the server
/// answers, so this allows for a slow disk) and the longest silence inside a body.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// The slowest blob transfer accepted, in bytes per second, averaged over the whole transfer.
pub const MIN_TRANSFER_RATE: u64 = 256 * 1024;
/// Largest step record (the JSON blob an action entry names) the client fetches.
pub const MAX_STEP_RECORD_SIZE: u64 = 16 * 1024 * 1024;
/// How often a call waiting on the network checks for cancellation.
pub const CANCEL_POLL: Duration = Duration::from_millis(100);
/// Environment variable overriding [`STALL_TIMEOUT`], in seconds (decimals allowed).
pub const TIMEOUT_ENV: &str = "GRAPHBUILD_CACHE_TIMEOUT";

// ---------------------------------------------------------------------------------------------
// ActionResult codec
// ---------------------------------------------------------------------------------------------

/// The subset of REAPI `ActionResult` graphbuild uses: output files and the exit code.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ActionResult {
    /// Field 2, `repeated OutputFile output_files`.
    pub output_files: Vec<OutputFile>,
    /// Field 4, `int32 exit_code`.
    pub exit_code: i32,
}

/// REAPI `OutputFile`: `path = 1`, `digest = 2` (a `Digest { hash = 1, size_bytes = 2 }`),
/// `is_executable = 4`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputFile {
    pub path: String,
    pub digest: Digest,
    pub size_bytes: u64,
    pub is_executable: bool,
}

impl ActionResult {
    /// The action entry for a step: one output file, [`STEP_RECORD_PATH`], naming the record.
    pub fn for_step_record(record: Digest, size_bytes: u64) -> ActionResult {
        ActionResult {
            output_files: vec![OutputFile {
                path: STEP_RECORD_PATH.to_string(),
                digest: record,
                size_bytes,
                is_executable: false,
            }],
            exit_code: 0,
        }
    }

    /// The step record this entry points at (digest and size), if it is one of ours.
    pub fn step_record(&self) -> Option<(Digest, u64)> {
        self.output_files
            .iter()
            .find(|file| file.path == STEP_RECORD_PATH)
            .map(|file| (file.digest, file.size_bytes))
    }

    /// Protobuf wire encoding (proto3: zero/false/empty fields are omitted).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for file in &self.output_files {
            let mut digest = Vec::new();
            put_bytes_field(&mut digest, 1, file.digest.hex().as_bytes());
            if file.size_bytes != 0 {
                put_varint_field(&mut digest, 2, file.size_bytes);
            }
            let mut message = Vec::new();
            put_bytes_field(&mut message, 1, file.path.as_bytes());
            put_bytes_field(&mut message, 2, &digest);
            if file.is_executable {
                put_varint_field(&mut message, 4, 1);
            }
            put_bytes_field(&mut out, 2, &message);
        }
        if self.exit_code != 0 {
            // int32 is sign-extended to 64 bits on the wire.
            put_varint_field(&mut out, 4, i64::from(self.exit_code) as u64);
        }
        out
    }

    /// Decode the protobuf wire format, skipping fields this subset does not model.
    pub fn decode(bytes: &[u8]) -> Result<ActionResult, DecodeError> {
        let mut result = ActionResult::default();
        let mut reader = WireReader { bytes, position: 0 };
        while let Some((field, value)) = reader.next_field()? {
            match (field, value) {
                (2, WireValue::Bytes(message)) => {
                    result.output_files.push(decode_output_file(message)?)
                }
                (4, WireValue::Varint(value)) => {
                    result.exit_code = value as i64 as i32;
                }
                (2 | 4, _) => {
                    return Err(DecodeError::WrongWireType {
                        field,
                        message: "ActionResult",
                    });
                }
                _ => {}
            }
        }
        Ok(result)
    }
}

fn decode_output_file(bytes: &[u8]) -> Result<OutputFile, DecodeError> {
    let mut path = None;
    let mut digest = None;
    let mut is_executable = false;
    let mut reader = WireReader { bytes, position: 0 };
    while let Some((field, value)) = reader.next_field()? {
        match (field, value) {
            (1, WireValue::Bytes(text)) => {
                path =
                    Some(String::from_utf8(text.to_vec()).map_err(|_| DecodeError::InvalidPath)?);
            }
            (2, WireValue::Bytes(message)) => digest = Some(decode_digest(message)?),
            (4, WireValue::Varint(value)) => is_executable = value != 0,
            (1 | 2 | 4, _) => {
                return Err(DecodeError::WrongWireType {
                    field,
                    message: "OutputFile",
                });
            }
            _ => {}
        }
    }
    let (digest, size_bytes) = digest.ok_or(DecodeError::MissingDigest)?;
    Ok(OutputFile {
        path: path.unwrap_or_default(),
        digest,
        size_bytes,
        is_executable,
    })
}

fn decode_digest(bytes: &[u8]) -> Result<(Digest, u64), DecodeError> {
    let mut hash = None;
    let mut size_bytes = 0u64;
    let mut reader = WireReader { bytes, position: 0 };
    while let Some((field, value)) = reader.next_field()? {
        match (field, value) {
            (1, WireValue::Bytes(text)) => {
                let text = std::str::from_utf8(text).map_err(|_| DecodeError::InvalidHash)?;
                hash = Some(parse_lower_hex(text).ok_or(DecodeError::InvalidHash)?);
            }
            (2, WireValue::Varint(value)) => {
                // int64 on the wire; a negative size is nonsense.
                size_bytes = u64::try_from(value as i64).map_err(|_| DecodeError::NegativeSize)?;
            }
            (1 | 2, _) => {
                return Err(DecodeError::WrongWireType {
                    field,
                    message: "Digest",
                });
            }
            _ => {}
        }
    }
    Ok((hash.ok_or(DecodeError::MissingDigest)?, size_bytes))
}

fn parse_lower_hex(text: &str) -> Option<Digest> {
    text.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        .then(|| Digest::from_hex(text))
        .flatten()
}

/// Why an action-cache value could not be decoded.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the value ends in the middle of a field")]
    Truncated,
    #[error("a varint is longer than 10 bytes")]
    VarintTooLong,
    #[error("unsupported protobuf wire type {0}")]
    UnsupportedWireType(u8),
    #[error("field {field} of {message} has an unexpected wire type")]
    WrongWireType { field: u64, message: &'static str },
    #[error("an output file path is not UTF-8")]
    InvalidPath,
    #[error("a digest hash is not 64 lowercase hex digits (only sha256 is supported)")]
    InvalidHash,
    #[error("a digest has a negative size")]
    NegativeSize,
    #[error("an output file has no digest")]
    MissingDigest,
    #[error("the value is larger than {MAX_ACTION_RESULT_SIZE} bytes")]
    TooLarge,
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_varint_field(out: &mut Vec<u8>, field: u64, value: u64) {
    put_varint(out, field << 3);
    put_varint(out, value);
}

fn put_bytes_field(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(out, (field << 3) | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

enum WireValue<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

struct WireReader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> WireReader<'a> {
    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for index in 0..10 {
            let byte = *self
                .bytes
                .get(self.position)
                .ok_or(DecodeError::Truncated)?;
            self.position += 1;
            value |= u64::from(byte & 0x7f) << (7 * index);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::VarintTooLong)
    }

    fn take(&mut self, length: u64) -> Result<&'a [u8], DecodeError> {
        let length = usize::try_from(length).map_err(|_| DecodeError::Truncated)?;
        let end = self
            .position
            .checked_add(length)
            .ok_or(DecodeError::Truncated)?;
        let slice = self
            .bytes
            .get(self.position..end)
            .ok_or(DecodeError::Truncated)?;
        self.position = end;
        Ok(slice)
    }

    fn next_field(&mut self) -> Result<Option<(u64, WireValue<'a>)>, DecodeError> {
        if self.position == self.bytes.len() {
            return Ok(None);
        }
        let tag = self.varint()?;
        let field = tag >> 3;
        let value = match (tag & 7) as u8 {
            0 => WireValue::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                WireValue::Fixed
            }
            2 => {
                let length = self.varint()?;
                WireValue::Bytes(self.take(length)?)
            }
            5 => {
                self.take(4)?;
                WireValue::Fixed
            }
            other => return Err(DecodeError::UnsupportedWireType(other)),
        };
        Ok(Some((field, value)))
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP client
// ---------------------------------------------------------------------------------------------

/// Errors talking to a remote cache. None of them contains the token.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum RemoteError {
    #[error("invalid remote cache URL `{url}`: {reason}")]
    #[diagnostic(
        code(graphbuild::remote::url),
        help(
            "use http://HOST:PORT or http://HOST:PORT/INSTANCE; pass a token with GRAPHBUILD_CACHE_TOKEN"
        )
    )]
    InvalidUrl { url: String, reason: &'static str },

    #[error("invalid action key `{0}`: expected 64 lowercase hex digits")]
    #[diagnostic(code(graphbuild::remote::key))]
    InvalidKey(String),

    #[error("cannot reach the remote cache for {method} {url}: {message}")]
    #[diagnostic(
        code(graphbuild::remote::unreachable),
        help("check that the cache server is running and reachable from this machine")
    )]
    Unreachable {
        method: &'static str,
        url: String,
        message: String,
    },

    #[error("the remote cache refused {method} {url}: {status} (token missing or not valid)")]
    #[diagnostic(
        code(graphbuild::remote::unauthorized),
        help("set GRAPHBUILD_CACHE_TOKEN to a token listed in the server's tokens file")
    )]
    Unauthorized {
        method: &'static str,
        url: String,
        status: u16,
    },

    #[error("the remote cache forbids {method} {url}: {status} (the token lacks this permission)")]
    #[diagnostic(
        code(graphbuild::remote::forbidden),
        help(
            "writing needs an `rw` token, and an instance-limited token only works under its instance"
        )
    )]
    Forbidden {
        method: &'static str,
        url: String,
        status: u16,
    },

    #[error("the remote cache answered {method} {url} with {status}: {body}")]
    #[diagnostic(code(graphbuild::remote::status))]
    Status {
        method: &'static str,
        url: String,
        status: u16,
        body: String,
    },

    #[error(
        "the remote blob {expected} arrived with the wrong content ({actual}); it was discarded"
    )]
    #[diagnostic(
        code(graphbuild::remote::digest_mismatch),
        help("the cache server's copy is corrupt; delete it there or use another cache")
    )]
    DigestMismatch { expected: Digest, actual: Digest },

    #[error(
        "the remote blob {digest} has the wrong size: {expected} bytes expected, {actual}; it was discarded"
    )]
    #[diagnostic(
        code(graphbuild::remote::size_mismatch),
        help(
            "the cache server's copy is corrupt, or the entry naming it is; it is treated as a miss"
        )
    )]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        actual: String,
    },

    #[error("the remote action entry {key} is not usable: {reason}")]
    #[diagnostic(
        code(graphbuild::remote::invalid_entry),
        help("another tool may have written this key; it is treated as a miss")
    )]
    InvalidEntry { key: String, reason: String },

    #[error("`{TIMEOUT_ENV}={value}` is not a number of seconds")]
    #[diagnostic(
        code(graphbuild::remote::timeout),
        help("write a positive number of seconds, for example {TIMEOUT_ENV}=30, or unset it")
    )]
    InvalidTimeout { value: String },

    #[error("the transfer was cancelled")]
    #[diagnostic(code(graphbuild::remote::cancelled))]
    Cancelled,

    #[error("the remote action entry {key} is not a valid ActionResult")]
    #[diagnostic(
        code(graphbuild::remote::decode),
        help("another tool may have written this key; it is treated as unusable")
    )]
    Decode {
        key: String,
        #[source]
        source: DecodeError,
    },

    #[error("{action} {}", path.display())]
    #[diagnostic(code(graphbuild::remote::io))]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl RemoteError {
    /// Whether the error is about one entry rather than the cache: a value that does not
    /// decode, an entry that is not ours, a blob of the wrong size or content. Such an entry
    /// is a miss; the cache stays usable.
    pub fn is_bad_entry(&self) -> bool {
        matches!(
            self,
            RemoteError::Decode { .. }
                | RemoteError::InvalidEntry { .. }
                | RemoteError::SizeMismatch { .. }
                | RemoteError::DigestMismatch { .. }
        )
    }

    /// Whether the call gave up because the build is being cancelled.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, RemoteError::Cancelled)
    }
}

/// A remote cache at one base URL, with an optional bearer token. Cheap to clone; share it
/// between threads for parallel transfers (connections are pooled).
#[derive(Clone)]
pub struct RemoteCache {
    agent: ureq::Agent,
    base: String,
    authorization: Option<String>,
    /// Longest wait for response headers and longest silence inside a body.
    timeout: Duration,
    /// Set by a signal handler: a call waiting on the network returns [`RemoteError::Cancelled`].
    cancel: Option<Arc<AtomicBool>>,
}

impl std::fmt::Debug for RemoteCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteCache")
            .field("base", &self.base)
            .field("token", &self.authorization.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// `GRAPHBUILD_CACHE_TIMEOUT`: seconds (a decimal number, > 0), or the default when unset.
fn timeout_from_env() -> Result<Duration, RemoteError> {
    match std::env::var(TIMEOUT_ENV) {
        Err(_) => Ok(STALL_TIMEOUT),
        Ok(text) => text
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|seconds| seconds.is_finite() && *seconds > 0.0 && *seconds <= 86_400.0)
            .map(Duration::from_secs_f64)
            .ok_or(RemoteError::InvalidTimeout { value: text }),
    }
}

fn build_agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(CONNECT_TIMEOUT.min(timeout)))
        .timeout_recv_response(Some(timeout))
        // A silent peer: no byte for `timeout` while reading or writing a body.
        .timeout_per_read(Some(timeout))
        .timeout_per_write(Some(timeout))
        // Small requests (HEAD, action entries) as a whole; blob transfers set their own.
        .timeout_per_call(Some(timeout * 2))
        .max_redirects(0)
        .user_agent(concat!("graphbuild/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

impl RemoteCache {
    /// `url` is `http(s)://host[:port][/instance]`; `token` is sent as `Authorization: Bearer`.
    /// The timeout is [`STALL_TIMEOUT`] unless [`TIMEOUT_ENV`] says otherwise.
    pub fn new(url: &str, token: Option<String>) -> Result<RemoteCache, RemoteError> {
        let invalid = |reason| RemoteError::InvalidUrl {
            url: redact_userinfo(url),
            reason,
        };
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .ok_or_else(|| invalid("the scheme must be http:// or https://"))?;
        let authority = rest.split('/').next().unwrap_or("");
        if authority.is_empty() {
            return Err(invalid("the host is missing"));
        }
        if authority.contains('@') {
            return Err(invalid("credentials in the URL are not supported"));
        }
        if rest.contains(['?', '#']) {
            return Err(invalid("a query or fragment is not allowed"));
        }
        if token
            .as_deref()
            .is_some_and(|token| token.is_empty() || token.bytes().any(|b| !b.is_ascii_graphic()))
        {
            return Err(invalid("the token must be non-empty visible ASCII"));
        }
        let timeout = timeout_from_env()?;
        Ok(RemoteCache {
            agent: build_agent(timeout),
            base: url.trim_end_matches('/').to_string(),
            authorization: token.map(|token| format!("Bearer {token}")),
            timeout,
            cancel: None,
        })
    }

    /// The same cache with another timeout: the longest wait for an answer and the longest
    /// silence inside a body (see the module documentation).
    pub fn with_timeout(mut self, timeout: Duration) -> RemoteCache {
        self.timeout = timeout.max(Duration::from_millis(1));
        self.agent = build_agent(self.timeout);
        self
    }

    /// The same cache, giving up on any call within [`CANCEL_POLL`] of `flag` being set
    /// (a [`crate::scheduler::CancelToken`]'s flag, set by the Ctrl-C/SIGTERM handler).
    pub fn with_cancel(mut self, flag: Arc<AtomicBool>) -> RemoteCache {
        self.cancel = Some(flag);
        self
    }

    /// The base URL (never contains the token).
    pub fn url(&self) -> &str {
        &self.base
    }

    fn blob_url(&self, digest: &Digest) -> String {
        format!("{}/cas/{}", self.base, digest.hex())
    }

    fn action_url(&self, key_hex: &str) -> Result<String, RemoteError> {
        if key_hex.len() != 64
            || !key_hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(RemoteError::InvalidKey(key_hex.to_string()));
        }
        Ok(format!("{}/ac/{key_hex}", self.base))
    }

    /// The whole-call deadline of a transfer of `size` bytes.
    fn transfer_deadline(&self, size: u64) -> Duration {
        self.timeout * 2 + Duration::from_secs(size / MIN_TRANSFER_RATE)
    }

    fn authorize<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.authorization {
            Some(value) => request.header("Authorization", value),
            None => request,
        }
    }

    /// Run `work` so that a cancellation is honoured within [`CANCEL_POLL`]: with a cancel
    /// flag, `work` runs on a helper thread while this one polls the flag. A cancelled call
    /// returns at once; its thread ends by itself within the call's timeouts and never stores
    /// anything unverified (downloads land only after their size and digest matched).
    fn interruptible<T: Send + 'static>(
        &self,
        work: impl FnOnce(RemoteCache) -> Result<T, RemoteError> + Send + 'static,
    ) -> Result<T, RemoteError> {
        let Some(cancel) = self.cancel.clone() else {
            return work(self.clone());
        };
        if cancel.load(Ordering::Relaxed) {
            return Err(RemoteError::Cancelled);
        }
        let (sender, receiver) = std::sync::mpsc::sync_channel(1);
        let this = self.clone();
        std::thread::Builder::new()
            .name("graphbuild-remote".into())
            .spawn(move || {
                let _ = sender.send(work(this));
            })
            .map_err(|error| RemoteError::Unreachable {
                method: "CALL",
                url: self.base.clone(),
                message: format!("cannot start a transfer thread: {error}"),
            })?;
        loop {
            match receiver.recv_timeout(CANCEL_POLL) {
                Ok(result) => return result,
                Err(RecvTimeoutError::Timeout) => {
                    if cancel.load(Ordering::Relaxed) {
                        return Err(RemoteError::Cancelled);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(RemoteError::Unreachable {
                        method: "CALL",
                        url: self.base.clone(),
                        message: "the transfer thread panicked".into(),
                    });
                }
            }
        }
    }

    fn unreachable(method: &'static str, url: &str, error: ureq::Error) -> RemoteError {
        RemoteError::Unreachable {
            method,
            url: url.to_string(),
            message: error.to_string(),
        }
    }

    /// Turn a non-success status into an error, reading a short excerpt of the body.
    fn status_error(
        method: &'static str,
        url: &str,
        mut response: ureq::http::Response<ureq::Body>,
    ) -> RemoteError {
        let status = response.status().as_u16();
        match status {
            401 => RemoteError::Unauthorized {
                method,
                url: url.to_string(),
                status,
            },
            403 => RemoteError::Forbidden {
                method,
                url: url.to_string(),
                status,
            },
            _ => {
                let mut excerpt = Vec::new();
                let _ = response
                    .body_mut()
                    .as_reader()
                    .take(512)
                    .read_to_end(&mut excerpt);
                RemoteError::Status {
                    method,
                    url: url.to_string(),
                    status,
                    body: String::from_utf8_lossy(&excerpt).trim().to_string(),
                }
            }
        }
    }

    /// The action entry under `key_hex`, `None` if the cache has none. A value that is not a
    /// valid `ActionResult` is [`RemoteError::Decode`], a bad entry (see
    /// [`RemoteError::is_bad_entry`]).
    pub fn get_action(&self, key_hex: &str) -> Result<Option<ActionResult>, RemoteError> {
        let url = self.action_url(key_hex)?;
        let key_hex = key_hex.to_string();
        self.interruptible(move |this| this.get_action_now(&url, &key_hex))
    }

    fn get_action_now(
        &self,
        url: &str,
        key_hex: &str,
    ) -> Result<Option<ActionResult>, RemoteError> {
        let mut response = self
            .authorize(self.agent.get(url))
            .call()
            .map_err(|error| Self::unreachable("GET", url, error))?;
        match response.status().as_u16() {
            200 => {}
            404 => return Ok(None),
            _ => return Err(Self::status_error("GET", url, response)),
        }
        let bytes = response
            .body_mut()
            .with_config()
            .limit(MAX_ACTION_RESULT_SIZE)
            .read_to_vec()
            .map_err(|error| match error {
                ureq::Error::BodyExceedsLimit(_) => RemoteError::Decode {
                    key: key_hex.to_string(),
                    source: DecodeError::TooLarge,
                },
                error => Self::unreachable("GET", url, error),
            })?;
        ActionResult::decode(&bytes)
            .map(Some)
            .map_err(|source| RemoteError::Decode {
                key: key_hex.to_string(),
                source,
            })
    }

    /// The step record that the action entry under `key_hex` names, downloaded into `dir`
    /// (size-capped at [`MAX_STEP_RECORD_SIZE`], digest-verified) and returned as bytes.
    /// `None` when the entry or its record is missing. An entry that is garbage, is not one of
    /// ours, or names a record of the wrong size or content is a bad entry
    /// ([`RemoteError::is_bad_entry`]).
    pub fn get_step_record(
        &self,
        key_hex: &str,
        dir: &Path,
    ) -> Result<Option<Vec<u8>>, RemoteError> {
        let Some(action) = self.get_action(key_hex)? else {
            return Ok(None);
        };
        let Some((digest, size)) = action.step_record() else {
            return Err(RemoteError::InvalidEntry {
                key: key_hex.to_string(),
                reason: format!("it names no {STEP_RECORD_PATH}"),
            });
        };
        if size == 0 || size > MAX_STEP_RECORD_SIZE {
            return Err(RemoteError::InvalidEntry {
                key: key_hex.to_string(),
                reason: format!(
                    "its step record has a size of {size} bytes (at most {MAX_STEP_RECORD_SIZE})"
                ),
            });
        }
        let path = dir.join(format!("record-{}", digest.hex()));
        if !self.get_blob_to(&digest, size, &path)? {
            return Ok(None);
        }
        fs::read(&path).map(Some).map_err(|source| RemoteError::Io {
            action: "cannot read",
            path,
            source,
        })
    }

    /// Store `result` under `key_hex`. Upload the blobs it references first.
    pub fn put_action(&self, key_hex: &str, result: &ActionResult) -> Result<(), RemoteError> {
        let url = self.action_url(key_hex)?;
        let bytes = result.encode();
        self.interruptible(move |this| this.put_now(&url, &bytes[..], None))
    }

    /// Whether the cache holds the blob.
    pub fn has_blob(&self, digest: &Digest) -> Result<bool, RemoteError> {
        let url = self.blob_url(digest);
        self.interruptible(move |this| this.has_blob_now(&url))
    }

    fn has_blob_now(&self, url: &str) -> Result<bool, RemoteError> {
        let response = self
            .authorize(self.agent.head(url))
            .call()
            .map_err(|error| Self::unreachable("HEAD", url, error))?;
        match response.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            _ => Err(Self::status_error("HEAD", url, response)),
        }
    }

    /// Download the blob of `size` bytes to `dest` (through a temp file in the same directory,
    /// renamed into place once its size and sha256 match). At most `size + 1` bytes are read,
    /// whatever the server sends. `Ok(false)` if the cache does not have it; on a mismatch
    /// nothing is left and [`RemoteError::SizeMismatch`] or [`RemoteError::DigestMismatch`] is
    /// returned.
    pub fn get_blob_to(
        &self,
        digest: &Digest,
        size: u64,
        dest: &Path,
    ) -> Result<bool, RemoteError> {
        let digest = *digest;
        let dest = dest.to_path_buf();
        self.interruptible(move |this| this.get_blob_now(&digest, size, &dest))
    }

    fn get_blob_now(&self, digest: &Digest, size: u64, dest: &Path) -> Result<bool, RemoteError> {
        let url = self.blob_url(digest);
        let mut response = self
            .authorize(self.agent.get(&url))
            .config()
            .timeout_per_call(Some(self.transfer_deadline(size)))
            .build()
            .call()
            .map_err(|error| Self::unreachable("GET", &url, error))?;
        match response.status().as_u16() {
            200 => {}
            404 => return Ok(false),
            _ => return Err(Self::status_error("GET", &url, response)),
        }
        if let Some(declared) = response
            .headers()
            .get("content-length")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok())
            && declared != size
        {
            return Err(RemoteError::SizeMismatch {
                digest: *digest,
                expected: size,
                actual: format!("{declared} bytes announced"),
            });
        }
        let directory = match dest.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let io_error = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| RemoteError::Io {
                action,
                path,
                source,
            }
        };
        let mut temp = tempfile::Builder::new()
            .prefix(".download-")
            .tempfile_in(directory)
            .map_err(io_error("cannot create a download file in", directory))?;
        let mut hasher = DigestWriter::new();
        // One byte more than declared tells an overlong body from an exact one.
        let mut reader = response.body_mut().as_reader().take(size.saturating_add(1));
        let mut buffer = vec![0u8; 256 * 1024];
        let mut received: u64 = 0;
        loop {
            let count = match reader.read(&mut buffer) {
                Ok(0) => break,
                Ok(count) => count,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    return Err(RemoteError::Unreachable {
                        method: "GET",
                        url,
                        message: format!("the download broke off: {error}"),
                    });
                }
            };
            received += count as u64;
            if received > size {
                // Dropping `temp` deletes it.
                return Err(RemoteError::SizeMismatch {
                    digest: *digest,
                    expected: size,
                    actual: "more bytes".into(),
                });
            }
            hasher.update(&buffer[..count]);
            temp.write_all(&buffer[..count])
                .map_err(io_error("cannot write", temp.path()))?;
        }
        if received != size {
            return Err(RemoteError::SizeMismatch {
                digest: *digest,
                expected: size,
                actual: format!("{received} bytes"),
            });
        }
        let actual = hasher.finish();
        if actual != *digest {
            return Err(RemoteError::DigestMismatch {
                expected: *digest,
                actual,
            });
        }
        temp.as_file()
            .sync_all()
            .map_err(io_error("cannot sync", temp.path()))?;
        temp.persist(dest).map_err(|error| RemoteError::Io {
            action: "cannot move a download to",
            path: dest.to_path_buf(),
            source: error.error,
        })?;
        Ok(true)
    }

    /// Upload a file as the blob `digest`, streaming it; skipped when the cache already has
    /// it. The server checks the content against the digest and refuses a mismatch.
    pub fn put_blob_from(&self, digest: &Digest, path: &Path) -> Result<(), RemoteError> {
        let url = self.blob_url(digest);
        let path = path.to_path_buf();
        self.interruptible(move |this| {
            if this.has_blob_now(&url)? {
                return Ok(());
            }
            let file = fs::File::open(&path).map_err(|source| RemoteError::Io {
                action: "cannot open",
                path: path.clone(),
                source,
            })?;
            let size = file.metadata().map(|metadata| metadata.len()).unwrap_or(0);
            // `&File` is sent with its length as Content-Length, read as it goes.
            this.put_now(&url, &file, Some(size))
        })
    }

    /// Upload bytes as a blob; returns their digest.
    pub fn put_blob_bytes(&self, bytes: &[u8]) -> Result<Digest, RemoteError> {
        let digest = Digest::of(bytes);
        let url = self.blob_url(&digest);
        let bytes = bytes.to_vec();
        let size = bytes.len() as u64;
        self.interruptible(move |this| this.put_now(&url, &bytes[..], Some(size)))?;
        Ok(digest)
    }

    fn put_now(
        &self,
        url: &str,
        body: impl ureq::AsSendBody,
        size: Option<u64>,
    ) -> Result<(), RemoteError> {
        let mut request = self
            .authorize(self.agent.put(url))
            .header("Content-Type", "application/octet-stream");
        if let Some(size) = size {
            request = request
                .config()
                .timeout_per_call(Some(self.transfer_deadline(size)))
                .build();
        }
        let response = request
            .send(body)
            .map_err(|error| Self::unreachable("PUT", url, error))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(Self::status_error("PUT", url, response))
        }
    }
}

/// `scheme://user:pass@host/…` → `scheme://<redacted>@host/…`, for error messages.
fn redact_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://<redacted>@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::net::TcpListener;

    fn sample() -> ActionResult {
        ActionResult {
            output_files: vec![
                OutputFile {
                    path: STEP_RECORD_PATH.to_string(),
                    digest: Digest::of(b"record"),
                    size_bytes: 6,
                    is_executable: false,
                },
                OutputFile {
                    path: "bin/tool".to_string(),
                    digest: Digest::of(b""),
                    size_bytes: 0,
                    is_executable: true,
                },
            ],
            exit_code: -2,
        }
    }

    #[test]
    fn action_result_round_trips() {
        let result = sample();
        assert_eq!(ActionResult::decode(&result.encode()).unwrap(), result);
        assert_eq!(ActionResult::decode(&[]).unwrap(), ActionResult::default());
        let step = ActionResult::for_step_record(Digest::of(b"x"), 1);
        assert_eq!(step.step_record(), Some((Digest::of(b"x"), 1)));
        assert_eq!(ActionResult::decode(&step.encode()).unwrap(), step);
    }

    #[test]
    fn action_result_matches_known_protobuf_bytes() {
        // Hand-assembled from the REAPI schema:
        //   12 4b                       output_files (2), 75 bytes
        //     0a 01 "a"                 path (1) = "a"
        //     12 44                     digest (2), 68 bytes
        //       0a 40 <64 hex chars>    hash (1)
        //       10 05                   size_bytes (2) = 5
        //     20 01                     is_executable (4) = true
        //   20 07                       exit_code (4) = 7
        let digest = Digest::of(b"hello");
        let mut expected = vec![0x12, 0x4b, 0x0a, 0x01, b'a', 0x12, 0x44, 0x0a, 0x40];
        expected.extend_from_slice(digest.hex().as_bytes());
        expected.extend_from_slice(&[0x10, 0x05, 0x20, 0x01, 0x20, 0x07]);
        let result = ActionResult {
            output_files: vec![OutputFile {
                path: "a".to_string(),
                digest,
                size_bytes: 5,
                is_executable: true,
            }],
            exit_code: 7,
        };
        assert_eq!(result.encode(), expected);
        assert_eq!(ActionResult::decode(&expected).unwrap(), result);

        // -1 as int32 is ten bytes on the wire.
        let negative = ActionResult {
            output_files: vec![],
            exit_code: -1,
        };
        assert_eq!(
            negative.encode(),
            [
                0x20, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
            ]
        );
    }

    #[test]
    fn decode_skips_unknown_fields_and_rejects_garbage() {
        let mut bytes = sample().encode();
        // stdout_digest-like length-delimited field 5, a fixed64 field 9, a varint field 12.
        bytes.extend_from_slice(&[
            0x2a, 0x02, 0x08, 0x01, 0x49, 1, 2, 3, 4, 5, 6, 7, 8, 0x60, 0x03,
        ]);
        assert_eq!(ActionResult::decode(&bytes).unwrap(), sample());

        let encoded = sample().encode();
        assert_eq!(
            ActionResult::decode(&encoded[..encoded.len() - 3]),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            ActionResult::decode(&[0x12, 0x05, 0x0a]),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            ActionResult::decode(&[0x10, 0x01]),
            Err(DecodeError::WrongWireType {
                field: 2,
                message: "ActionResult"
            })
        );
        // An OutputFile whose digest hash is uppercase hex.
        let mut upper = vec![0x12, 0x44, 0x12, 0x42, 0x0a, 0x40];
        upper.extend_from_slice(Digest::of(b"x").hex().to_uppercase().as_bytes());
        assert_eq!(ActionResult::decode(&upper), Err(DecodeError::InvalidHash));
    }

    #[test]
    fn urls_are_checked_and_tokens_never_shown() {
        assert!(RemoteCache::new("ftp://host", None).is_err());
        assert!(RemoteCache::new("http://", None).is_err());
        let error = RemoteCache::new("http://user:hunter2@host:7070/team", None).unwrap_err();
        assert!(!error.to_string().contains("hunter2"), "{error}");
        let cache =
            RemoteCache::new("http://127.0.0.1:9/team/", Some("s3cret-token".into())).unwrap();
        assert_eq!(cache.url(), "http://127.0.0.1:9/team");
        assert!(!format!("{cache:?}").contains("s3cret-token"));
        assert!(matches!(
            cache.get_action("nothex"),
            Err(RemoteError::InvalidKey(_))
        ));
    }

    /// A one-shot HTTP server on 127.0.0.1 answering every request with `status` and `body`,
    /// recording request heads.
    fn fake_server(
        status: &'static str,
        body: Vec<u8>,
    ) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let mut heads = Vec::new();
            let Ok((stream, _)) = listener.accept() else {
                return heads;
            };
            let mut reader = io::BufReader::new(stream.try_clone().unwrap());
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            heads.push(head);
            let mut stream = stream;
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(&body);
            heads
        });
        (url, handle)
    }

    #[test]
    fn corrupt_download_is_discarded() {
        let (url, server) = fake_server("200 OK", b"not what you asked for".to_vec());
        let cache = RemoteCache::new(&url, Some("s3cret-token".into())).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("blob");
        let error = cache
            .get_blob_to(&Digest::of(b"expected"), 22, &dest)
            .unwrap_err();
        assert!(
            matches!(error, RemoteError::DigestMismatch { .. }),
            "{error}"
        );
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            0,
            "nothing may be left behind"
        );
        let heads = server.join().unwrap();
        assert!(heads[0].starts_with(&format!(
            "GET /cas/{} HTTP/1.1",
            Digest::of(b"expected").hex()
        )));
        assert!(
            heads[0].contains("authorization: Bearer s3cret-token")
                || heads[0].contains("Authorization: Bearer s3cret-token")
        );
    }

    #[test]
    fn good_download_lands_and_missing_blob_is_false() {
        let (url, server) = fake_server("200 OK", b"payload".to_vec());
        let cache = RemoteCache::new(&url, None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("blob");
        assert!(
            cache
                .get_blob_to(&Digest::of(b"payload"), 7, &dest)
                .unwrap()
        );
        assert_eq!(fs::read(&dest).unwrap(), b"payload");
        server.join().unwrap();

        let (url, server) = fake_server("404 Not Found", Vec::new());
        let cache = RemoteCache::new(&url, None).unwrap();
        assert!(
            !cache
                .get_blob_to(&Digest::of(b"other"), 5, &dir.path().join("other"))
                .unwrap()
        );
        assert!(!dir.path().join("other").exists());
        server.join().unwrap();
    }

    #[test]
    fn refusals_and_dead_servers_are_errors_without_the_token() {
        let (url, server) = fake_server("401 Unauthorized", b"a valid token is required".to_vec());
        let cache = RemoteCache::new(&url, Some("s3cret-token".into())).unwrap();
        let error = cache.put_blob_bytes(b"data").unwrap_err();
        assert!(
            matches!(error, RemoteError::Unauthorized { status: 401, .. }),
            "{error}"
        );
        assert!(!format!("{error} {error:?}").contains("s3cret-token"));
        server.join().unwrap();

        // Bind then drop, so nothing listens on the port.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cache = RemoteCache::new(
            &format!("http://127.0.0.1:{port}"),
            Some("s3cret-token".into()),
        )
        .unwrap();
        let error = cache.has_blob(&Digest::of(b"x")).unwrap_err();
        assert!(matches!(error, RemoteError::Unreachable { .. }), "{error}");
        assert!(!format!("{error} {error:?}").contains("s3cret-token"));
    }

    /// A one-connection server on 127.0.0.1: reads the request head, then hands the stream to
    /// `respond`.
    fn raw_server(
        respond: impl FnOnce(std::net::TcpStream) + Send + 'static,
    ) -> (String, std::thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let Ok((stream, _)) = listener.accept() else {
                return;
            };
            let mut reader = io::BufReader::new(stream.try_clone().unwrap());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
            }
            respond(stream);
        });
        (url, handle)
    }

    fn empty(dir: &Path) -> bool {
        fs::read_dir(dir).unwrap().next().is_none()
    }

    #[test]
    fn a_stalled_body_times_out_and_leaves_nothing() {
        let (url, server) = raw_server(|mut stream| {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789");
            let _ = stream.flush();
            std::thread::sleep(Duration::from_secs(4));
        });
        let cache = RemoteCache::new(&url, None)
            .unwrap()
            .with_timeout(Duration::from_millis(500));
        let dir = tempfile::tempdir().unwrap();
        let started = std::time::Instant::now();
        let error = cache
            .get_blob_to(&Digest::of(&[0; 100]), 100, &dir.path().join("blob"))
            .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert!(matches!(error, RemoteError::Unreachable { .. }), "{error}");
        assert!(!error.is_bad_entry());
        assert!(empty(dir.path()), "nothing may be left behind");
        server.join().unwrap();
    }

    #[test]
    fn an_endless_body_stops_at_the_declared_size() {
        let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = written.clone();
        // No Content-Length: the body runs until the connection closes, which it never does.
        let (url, server) = raw_server(move |mut stream| {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
            let chunk = [b'x'; 64 * 1024];
            while stream.write_all(&chunk).is_ok() {
                if counter.fetch_add(chunk.len() as u64, Ordering::Relaxed) > 1 << 30 {
                    break;
                }
            }
        });
        let cache = RemoteCache::new(&url, None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let error = cache
            .get_blob_to(&Digest::of(b"small"), 1000, &dir.path().join("blob"))
            .unwrap_err();
        assert!(matches!(error, RemoteError::SizeMismatch { .. }), "{error}");
        assert!(error.is_bad_entry());
        assert!(empty(dir.path()), "nothing may be left behind");
        server.join().unwrap();
        // The client stopped reading and closed: the server could only fill socket buffers.
        assert!(written.load(Ordering::Relaxed) < 64 << 20);

        // A Content-Length that disagrees with the record is refused before reading.
        let (url, server) = raw_server(|mut stream| {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n");
        });
        let cache = RemoteCache::new(&url, None).unwrap();
        let error = cache
            .get_blob_to(&Digest::of(b"small"), 5, &dir.path().join("blob"))
            .unwrap_err();
        assert!(matches!(error, RemoteError::SizeMismatch { .. }), "{error}");
        assert!(empty(dir.path()));
        server.join().unwrap();
    }

    #[test]
    fn a_cancelled_call_returns_at_once() {
        let (url, server) = raw_server(|mut stream| {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n");
            std::thread::sleep(Duration::from_secs(3));
        });
        let flag = Arc::new(AtomicBool::new(false));
        let cache = RemoteCache::new(&url, None)
            .unwrap()
            .with_timeout(Duration::from_secs(30))
            .with_cancel(flag.clone());
        let dir = tempfile::tempdir().unwrap();
        let setter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            flag.store(true, Ordering::Relaxed);
        });
        let started = std::time::Instant::now();
        let error = cache
            .get_blob_to(&Digest::of(&[0; 100]), 100, &dir.path().join("blob"))
            .unwrap_err();
        assert!(error.is_cancelled(), "{error}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        setter.join().unwrap();
        server.join().unwrap();
        assert!(!dir.path().join("blob").exists());
    }

    #[test]
    fn garbage_action_values_are_bad_entries() {
        let key = "ab".repeat(32);
        let (url, server) = fake_server("200 OK", b"\xff\xff\xff garbage".to_vec());
        let cache = RemoteCache::new(&url, None).unwrap();
        let error = cache.get_action(&key).unwrap_err();
        assert!(matches!(error, RemoteError::Decode { .. }), "{error}");
        assert!(error.is_bad_entry());
        server.join().unwrap();

        // An entry that decodes but names no step record.
        let other = ActionResult {
            output_files: vec![],
            exit_code: 0,
        };
        let (url, server) = fake_server("200 OK", other.encode());
        let cache = RemoteCache::new(&url, None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let error = cache.get_step_record(&key, dir.path()).unwrap_err();
        assert!(matches!(error, RemoteError::InvalidEntry { .. }), "{error}");
        server.join().unwrap();

        // A record of an absurd size is refused without downloading it.
        let huge = ActionResult::for_step_record(Digest::of(b"x"), MAX_STEP_RECORD_SIZE + 1);
        let (url, server) = fake_server("200 OK", huge.encode());
        let cache = RemoteCache::new(&url, None).unwrap();
        let error = cache.get_step_record(&key, dir.path()).unwrap_err();
        assert!(error.is_bad_entry(), "{error}");
        server.join().unwrap();
        assert!(empty(dir.path()));
    }
}
