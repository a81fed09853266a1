//! The remote cache client: bazel-remote's HTTP protocol, blocking, over `ureq`.
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
//! URL (URLs with `user:password@` are refused for that reason). Downloads are streamed to a
//! temp file next to the destination, verified against their sha256, and renamed into place
//! only when they match; nothing is ever buffered whole except action entries (≤ 1 MiB).

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::digest::{Digest, DigestWriter};

/// The output-file path that marks graphbuild's step record in an [`ActionResult`].
pub const STEP_RECORD_PATH: &str = "graphbuild/step.json";
/// Largest action-cache value the client reads.
pub const MAX_ACTION_RESULT_SIZE: u64 = 1024 * 1024;
/// Connecting to the cache gives up after this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Waiting for response headers gives up after this long (uploads are synced before the
/// server answers, so this allows for a slow disk).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

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

/// A remote cache at one base URL, with an optional bearer token. Cheap to clone; share it
/// between threads for parallel transfers (connections are pooled).
#[derive(Clone)]
pub struct RemoteCache {
    agent: ureq::Agent,
    base: String,
    authorization: Option<String>,
}

impl std::fmt::Debug for RemoteCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteCache")
            .field("base", &self.base)
            .field("token", &self.authorization.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl RemoteCache {
    /// `url` is `http(s)://host[:port][/instance]`; `token` is sent as `Authorization: Bearer`.
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
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_recv_response(Some(RESPONSE_TIMEOUT))
            .max_redirects(0)
            .user_agent(concat!("graphbuild/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(RemoteCache {
            agent: config.into(),
            base: url.trim_end_matches('/').to_string(),
            authorization: token.map(|token| format!("Bearer {token}")),
        })
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

    fn authorize<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.authorization {
            Some(value) => request.header("Authorization", value),
            None => request,
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

    /// The action entry under `key_hex`, `None` if the cache has none.
    pub fn get_action(&self, key_hex: &str) -> Result<Option<ActionResult>, RemoteError> {
        let url = self.action_url(key_hex)?;
        let mut response = self
            .authorize(self.agent.get(&url))
            .call()
            .map_err(|error| Self::unreachable("GET", &url, error))?;
        match response.status().as_u16() {
            200 => {}
            404 => return Ok(None),
            _ => return Err(Self::status_error("GET", &url, response)),
        }
        let bytes = response
            .body_mut()
            .with_config()
            .limit(MAX_ACTION_RESULT_SIZE)
            .read_to_vec()
            .map_err(|error| Self::unreachable("GET", &url, error))?;
        ActionResult::decode(&bytes)
            .map(Some)
            .map_err(|source| RemoteError::Decode {
                key: key_hex.to_string(),
                source,
            })
    }

    /// Store `result` under `key_hex`. Upload the blobs it references first.
    pub fn put_action(&self, key_hex: &str, result: &ActionResult) -> Result<(), RemoteError> {
        let url = self.action_url(key_hex)?;
        self.put(&url, &result.encode()[..])
    }

    /// Whether the cache holds the blob.
    pub fn has_blob(&self, digest: &Digest) -> Result<bool, RemoteError> {
        let url = self.blob_url(digest);
        let response = self
            .authorize(self.agent.head(&url))
            .call()
            .map_err(|error| Self::unreachable("HEAD", &url, error))?;
        match response.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            _ => Err(Self::status_error("HEAD", &url, response)),
        }
    }

    /// Download the blob to `dest` (through a temp file in the same directory, renamed into
    /// place once its sha256 matches). `Ok(false)` if the cache does not have it; on a
    /// mismatch nothing is left and [`RemoteError::DigestMismatch`] is returned.
    pub fn get_blob_to(&self, digest: &Digest, dest: &Path) -> Result<bool, RemoteError> {
        let url = self.blob_url(digest);
        let mut response = self
            .authorize(self.agent.get(&url))
            .call()
            .map_err(|error| Self::unreachable("GET", &url, error))?;
        match response.status().as_u16() {
            200 => {}
            404 => return Ok(false),
            _ => return Err(Self::status_error("GET", &url, response)),
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
        let mut reader = response.body_mut().as_reader();
        let mut buffer = vec![0u8; 256 * 1024];
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
            hasher.update(&buffer[..count]);
            temp.write_all(&buffer[..count])
                .map_err(io_error("cannot write", temp.path()))?;
        }
        let actual = hasher.finish();
        if actual != *digest {
            // Dropping `temp` deletes it.
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
        if self.has_blob(digest)? {
            return Ok(());
        }
        let file = fs::File::open(path).map_err(|source| RemoteError::Io {
            action: "cannot open",
            path: path.to_path_buf(),
            source,
        })?;
        // `&File` is sent with its length as Content-Length, read as it goes.
        self.put(&self.blob_url(digest), &file)
    }

    /// Upload bytes as a blob; returns their digest.
    pub fn put_blob_bytes(&self, bytes: &[u8]) -> Result<Digest, RemoteError> {
        let digest = Digest::of(bytes);
        self.put(&self.blob_url(&digest), bytes)?;
        Ok(digest)
    }

    fn put(&self, url: &str, body: impl ureq::AsSendBody) -> Result<(), RemoteError> {
        let response = self
            .authorize(self.agent.put(url))
            .header("Content-Type", "application/octet-stream")
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
            .get_blob_to(&Digest::of(b"expected"), &dest)
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
        assert!(cache.get_blob_to(&Digest::of(b"payload"), &dest).unwrap());
        assert_eq!(fs::read(&dest).unwrap(), b"payload");
        server.join().unwrap();

        let (url, server) = fake_server("404 Not Found", Vec::new());
        let cache = RemoteCache::new(&url, None).unwrap();
        assert!(
            !cache
                .get_blob_to(&Digest::of(b"other"), &dir.path().join("other"))
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
}
