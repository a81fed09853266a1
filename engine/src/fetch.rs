//! Downloading the file of an `add "https://…"` on the host, never in a sandbox.
//!
//! # How
//!
//! One blocking GET with the HTTP client the registry client already uses (ureq, TLS by rustls
//! with the system's and webpki's roots), so no second HTTP stack enters the build:
//!
//! - at most [`MAX_REDIRECTS`] redirects, which never carry credentials to another host;
//! - a connect timeout and a per-read timeout of [`TIMEOUT`]: a stalled server fails the step
//!   instead of hanging it;
//! - at most [`max_download_size`] bytes (`GRAPHBUILD_MAX_DOWNLOAD_SIZE`, 4 GiB by default): a
//!   larger body stops the download at the limit, whatever `Content-Length` claims;
//! - the body streams into the store ([`Store::blob_writer`]) while it is hashed; with an
//!   expected digest (`checksum=`, or the digest `plan` fetched) a different body is refused
//!   and nothing is published, so the store never holds a file under the wrong name.
//!
//! # Credentials
//!
//! A URL may carry `user:password@` or a token in its query. They go to the server (the user
//! and password as a `Basic` authorization, never to a host a redirect names) and nowhere else:
//! every message, description and key uses [`redact`], and errors of the HTTP client are
//! scrubbed of the URL before they are shown.

use std::io::{self, Read};
use std::time::Duration;

use crate::digest::Digest;
use crate::store::{Store, StoreError};

/// The environment variable that sets [`max_download_size`] (bytes, or with a `K`, `M`, `G`
/// or `T` suffix).
pub const MAX_DOWNLOAD_SIZE_ENV: &str = "GRAPHBUILD_MAX_DOWNLOAD_SIZE";

/// The default of [`max_download_size`]: 4 GiB.
pub const DEFAULT_MAX_DOWNLOAD_SIZE: u64 = 4 << 30;

/// Redirects followed before giving up.
pub const MAX_REDIRECTS: u32 = 5;

/// Connect and per-read timeout.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The most bytes one `add` may download: `GRAPHBUILD_MAX_DOWNLOAD_SIZE` when set (and valid),
/// else 4 GiB.
pub fn max_download_size() -> u64 {
    std::env::var(MAX_DOWNLOAD_SIZE_ENV)
        .ok()
        .and_then(|text| crate::unpack::parse_size(&text))
        .unwrap_or(DEFAULT_MAX_DOWNLOAD_SIZE)
}

/// Why a download failed. Every message names the URL redacted.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The server could not be reached (no network, a name that does not resolve, a refused
    /// connection, a timeout): an environment problem.
    #[error("cannot download {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("cannot download {url}: the server answered {status}")]
    Status { url: String, status: u16 },
    #[error("cannot download {url}: it is larger than the limit of {limit} bytes")]
    TooLarge { url: String, limit: u64 },
    #[error(
        "the checksum of {url} does not match: expected {expected}, downloaded {actual}; nothing was stored"
    )]
    Mismatch {
        url: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("cannot store the download of {url}: {source}")]
    Store { url: String, source: StoreError },
}

impl FetchError {
    /// An environment problem (the network), not the build file's.
    pub fn is_environment(&self) -> bool {
        matches!(self, FetchError::Unreachable { .. })
    }
}

/// The URL as it may be shown: without `user:password@`, and with the query (which may hold
/// a token) replaced by `?…`. Fragments are kept (a git reference is no secret).
pub fn redact(url: &str) -> String {
    let (before_fragment, fragment) = match url.split_once('#') {
        Some((before, fragment)) => (before, Some(fragment)),
        None => (url, None),
    };
    let (before_query, has_query) = match before_fragment.split_once('?') {
        Some((before, _)) => (before, true),
        None => (before_fragment, false),
    };
    let mut shown = match split_userinfo(before_query) {
        Some((scheme, _, rest)) => format!("{scheme}{rest}"),
        None => before_query.to_string(),
    };
    if has_query {
        shown.push_str("?…");
    }
    if let Some(fragment) = fragment {
        shown.push('#');
        shown.push_str(fragment);
    }
    shown
}

/// `scheme://user:password@rest` → (`scheme://`, `user:password`, `rest`).
fn split_userinfo(url: &str) -> Option<(&str, &str, &str)> {
    let scheme_end = url.find("://")? + 3;
    let authority_end = url[scheme_end..]
        .find('/')
        .map_or(url.len(), |index| scheme_end + index);
    let at = url[scheme_end..authority_end].rfind('@')? + scheme_end;
    Some((&url[..scheme_end], &url[scheme_end..at], &url[at + 1..]))
}

/// The last segment of the URL's path (percent-decoding left as is), for the file's name;
/// `None` when the path has none (`https://example.com/`).
pub fn file_name(url: &str) -> Option<String> {
    let without = url.split(['#', '?']).next().unwrap_or(url);
    let path = match without.find("://") {
        Some(index) => {
            let rest = &without[index + 3..];
            rest.find('/').map_or("", |slash| &rest[slash..])
        }
        None => without,
    };
    let name = path.rsplit('/').next().unwrap_or("");
    (!name.is_empty() && name != "." && name != "..").then(|| name.to_string())
}

/// Download `url` into `store`, verifying `expected` when given; returns the body's digest.
pub fn download(url: &str, expected: Option<Digest>, store: &Store) -> Result<Digest, FetchError> {
    let shown = redact(url);
    let limit = max_download_size();
    let (address, basic) = match split_userinfo(url) {
        Some((scheme, userinfo, rest)) => (
            format!("{scheme}{rest}"),
            Some(crate::registry::auth::base64_encode(userinfo.as_bytes())),
        ),
        None => (url.to_string(), None),
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .user_agent(concat!("graphbuild/", env!("CARGO_PKG_VERSION")))
        .timeout_connect(Some(TIMEOUT))
        .timeout_per_read(Some(TIMEOUT))
        .max_redirects(MAX_REDIRECTS)
        .build()
        .new_agent();
    let scrub = |message: String| {
        let mut message = message.replace(url, &shown).replace(&address, &shown);
        if let Some((_, userinfo, _)) = split_userinfo(url) {
            message = message.replace(userinfo, "…");
        }
        message
    };
    let mut request = agent.get(&address);
    if let Some(basic) = &basic {
        request = request.header("Authorization", format!("Basic {basic}"));
    }
    let response = request.call().map_err(|error| FetchError::Unreachable {
        url: shown.clone(),
        message: scrub(error.to_string()),
    })?;
    let status = response.status().as_u16();
    if !(200..300).contains(&status) {
        return Err(FetchError::Status { url: shown, status });
    }
    let store_error = |source: StoreError| FetchError::Store {
        url: shown.clone(),
        source,
    };
    let mut writer = store.blob_writer().map_err(store_error)?;
    // One byte past the limit tells a body of exactly the limit from a larger one.
    let mut body = response
        .into_body()
        .into_reader()
        .take(limit.saturating_add(1));
    let copied = io::copy(&mut body, &mut writer).map_err(|error| FetchError::Unreachable {
        url: shown.clone(),
        message: scrub(error.to_string()),
    })?;
    if copied > limit {
        return Err(FetchError::TooLarge { url: shown, limit });
    }
    match writer.finish(expected) {
        Ok((digest, _)) => Ok(digest),
        Err(StoreError::DigestMismatch { expected, actual }) => Err(FetchError::Mismatch {
            url: shown,
            expected,
            actual,
        }),
        Err(source) => Err(store_error(source)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_and_queries_are_never_shown() {
        assert_eq!(
            redact("https://user:secret@example.com/a/b.tgz?token=xyz#frag"),
            "https://example.com/a/b.tgz?…#frag"
        );
        assert_eq!(redact("https://example.com/x"), "https://example.com/x");
        // An `@` in the path is not userinfo.
        assert_eq!(
            redact("https://example.com/@scope/pkg"),
            "https://example.com/@scope/pkg"
        );
    }

    #[test]
    fn the_file_name_is_the_last_path_segment() {
        assert_eq!(
            file_name("https://u:p@example.com/dl/tool-1.2.tar.gz?x=1").as_deref(),
            Some("tool-1.2.tar.gz")
        );
        assert_eq!(file_name("https://example.com/"), None);
        assert_eq!(file_name("https://example.com"), None);
    }
}
