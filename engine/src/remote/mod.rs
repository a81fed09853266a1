//! The team cache: one interface ([`RemoteCache`]) and its clients.
//!
//! A team cache stores two things: blobs by sha256 (layers, step records), and action
//! entries, an REAPI `build.bazel.remote.execution.v2.ActionResult` per step key whose output
//! file [`STEP_RECORD_PATH`] names the step's record. The build (`crate::build`) sees only the
//! [`RemoteCache`] trait; `crate::build::open_cache` picks the client from the URL's scheme:
//!
//! - `http://`, `https://`: [`http::HttpCache`], bazel-remote's HTTP protocol, which
//!   `graphbuild cache serve` speaks.
//! - `grpc://`, `grpcs://`: `crate::reapi::ReapiCache`, the Remote Execution API v2 (BuildGrid,
//!   Buildbarn, BuildBuddy, NativeLink…); docs/remote.md.
//!
//! # Rules every client keeps
//!
//! - **Failure and secrets.** Every call either succeeds or returns a [`RemoteError`] that
//!   names the call and the cache; the caller decides whether a failing cache is fatal. The
//!   token is sent only as a credential and never appears in an error, in `Debug` output, or
//!   in a URL (URLs with `user:password@` are refused for that reason).
//! - **Bounded time.** Connecting gives up after [`CONNECT_TIMEOUT`], a silent server after
//!   the client's timeout ([`STALL_TIMEOUT`] by default, [`TIMEOUT_ENV`] to change it), and a
//!   blob transfer also has a whole-call deadline of twice the timeout plus one second per
//!   [`MIN_TRANSFER_RATE`] bytes.
//! - **Cancellation.** A client opened with a cancel flag returns [`RemoteError::Cancelled`]
//!   within [`CANCEL_POLL`] of the flag being set (Ctrl-C or SIGTERM).
//! - **Bounded size.** A blob is downloaded knowing its size (from the step record or the
//!   action entry that names it), and at most `size + 1` bytes are ever read. Action entries
//!   are read up to [`MAX_ACTION_RESULT_SIZE`], step records up to [`MAX_STEP_RECORD_SIZE`].
//! - **Nothing unverified lands.** Downloads stream to a temp file next to the destination and
//!   are renamed into place only once their size and sha256 match.
//! - **A bad entry is a miss.** [`RemoteError::is_bad_entry`] tells errors about one entry
//!   (an undecodable action value, an entry that is not ours, a blob of the wrong size or
//!   content) from errors about the cache as a whole (unreachable, refused, timed out): the
//!   builder counts the former as a miss and keeps using the cache.
//! - **Blobs before entries.** Uploads go blobs first, then the action entry, so a reader
//!   that sees an entry finds its blobs (unless evicted since: an entry with missing blobs is
//!   a miss).
//!
//! # The action-entry codec
//!
//! [`ActionResult`] encodes and decodes by hand the few fields of the REAPI message that the
//! HTTP protocol stores as bytes: unknown fields are skipped on decode, so entries written by
//! other tools decode as long as the fields we read are well-formed.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::digest::Digest;

pub mod http;

pub use http::HttpCache;

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
// Errors
// ---------------------------------------------------------------------------------------------

/// Errors talking to a remote cache. None of them contains the token.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum RemoteError {
    #[error("invalid remote cache URL `{url}`: {reason}")]
    #[diagnostic(
        code(graphbuild::remote::url),
        help(
            "use http(s)://HOST:PORT[/INSTANCE] for a graphbuild or bazel-remote cache, grpc(s)://HOST:PORT[/INSTANCE] for an REAPI cache; pass a token with GRAPHBUILD_CACHE_TOKEN"
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

    #[error("the remote cache refused {method} on {url}: {code} ({message})")]
    #[diagnostic(
        code(graphbuild::remote::refused),
        help(
            "check GRAPHBUILD_CACHE_TOKEN: it is sent as `authorization: Bearer TOKEN`, and writing needs a token allowed to write"
        )
    )]
    Refused {
        method: &'static str,
        url: String,
        code: &'static str,
        message: String,
    },

    #[error("the remote cache answered {method} on {url} with {code}: {message}")]
    #[diagnostic(code(graphbuild::remote::rpc))]
    Rpc {
        method: &'static str,
        url: String,
        code: &'static str,
        message: String,
    },

    #[error("the remote cache {url} cannot serve graphbuild: {reason}")]
    #[diagnostic(
        code(graphbuild::remote::unsupported),
        help(
            "graphbuild needs an REAPI v2 cache with SHA-256 digests and an action cache (docs/remote.md)"
        )
    )]
    Unsupported { url: String, reason: String },

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

// ---------------------------------------------------------------------------------------------
// The cache interface
// ---------------------------------------------------------------------------------------------

/// A team cache, as the build uses it: action entries by step key, blobs by sha256. Every
/// client keeps the rules of the module documentation (bounded time and size, verified
/// downloads, bad entries told apart, no token in any message). Shared between threads.
pub trait RemoteCache: Send + Sync + std::fmt::Debug {
    /// The cache's address, for messages (never contains the token).
    fn url(&self) -> &str;

    /// The action entry under `key_hex` (64 lowercase hex digits), `None` if the cache has
    /// none. A value that is not a valid `ActionResult` is a bad entry
    /// ([`RemoteError::is_bad_entry`]).
    fn get_action(&self, key_hex: &str) -> Result<Option<ActionResult>, RemoteError>;

    /// Store `result` under `key_hex`. Upload the blobs it references first.
    fn put_action(&self, key_hex: &str, result: &ActionResult) -> Result<(), RemoteError>;

    /// Download the blob of `size` bytes to `dest`, renamed into place once its size and
    /// sha256 match. `Ok(false)` if the cache does not have it; on a mismatch nothing is left
    /// and [`RemoteError::SizeMismatch`] or [`RemoteError::DigestMismatch`] is returned.
    fn get_blob_to(&self, digest: &Digest, size: u64, dest: &Path) -> Result<bool, RemoteError>;

    /// Upload a file as the blob `digest`, unless the cache already has it.
    fn put_blob_from(&self, digest: &Digest, path: &Path) -> Result<(), RemoteError>;

    /// Upload bytes as a blob; returns their digest.
    fn put_blob_bytes(&self, bytes: &[u8]) -> Result<Digest, RemoteError>;

    /// The step record that the action entry under `key_hex` names, downloaded into `dir`
    /// (size-capped at [`MAX_STEP_RECORD_SIZE`], digest-verified) and returned as bytes.
    /// `None` when the entry or its record is missing. An entry that is garbage, is not one of
    /// ours, or names a record of the wrong size or content is a bad entry
    /// ([`RemoteError::is_bad_entry`]).
    fn get_step_record(&self, key_hex: &str, dir: &Path) -> Result<Option<Vec<u8>>, RemoteError> {
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
        std::fs::read(&path)
            .map(Some)
            .map_err(|source| RemoteError::Io {
                action: "cannot read",
                path,
                source,
            })
    }

    /// Publish a step's record (`record`, its JSON bytes) under `key_hex`: the record blob,
    /// then the action entry naming it. The layers the record names (`layers`, digest and
    /// size) must already be uploaded.
    fn put_step_record(
        &self,
        key_hex: &str,
        record: &[u8],
        layers: &[(Digest, u64)],
    ) -> Result<(), RemoteError> {
        let _ = layers;
        let digest = self.put_blob_bytes(record)?;
        self.put_action(
            key_hex,
            &ActionResult::for_step_record(digest, record.len() as u64),
        )
    }
}

/// `GRAPHBUILD_CACHE_TIMEOUT`: seconds (a decimal number, > 0), or the default when unset.
pub(crate) fn timeout_from_env() -> Result<Duration, RemoteError> {
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

/// `scheme://user:pass@host/…` → `scheme://<redacted>@host/…`, for error messages.
pub(crate) fn redact_userinfo(url: &str) -> String {
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
}
