//! The HTTP surface: routing, authorization, streaming uploads and downloads.
//!
//! # Protocol (bazel-remote's HTTP cache API)
//!
//! | request | meaning |
//! |---|---|
//! | `GET /cas/<sha256 hex>` | the blob, 200 or 404 |
//! | `HEAD /cas/<sha256 hex>` | 200 with `Content-Length`, or 404 |
//! | `PUT /cas/<sha256 hex>` | store the body; 400 if it does not hash to the name |
//! | `GET`/`HEAD`/`PUT /ac/<64 hex key>` | the action cache, values up to 1 MiB |
//! | `…/<instance>/cas/…`, `…/<instance>/ac/…` | the same under an instance name |
//! | `GET /healthz` | `ok` |
//! | `GET /metrics` | Prometheus text format |
//!
//! The action cache is separate per instance; the CAS is one shared pool (a blob is its
//! hash, so sharing cannot leak or corrupt anything), but the instance still scopes tokens.
//!
//! # Uploads
//!
//! A PUT streams frames to a temp file while hashing, never holding more than one frame in
//! memory; then `fsync`, compare the hash, and hand the temp file to
//! [`crate::store::Store::commit`]. Every early return — mismatch, too large, client gone,
//! a body idle for [`crate::Timeouts::body_idle`] or slower on average than
//! [`crate::Timeouts::min_body_rate`] — drops the temp file, which deletes it. If the client
//! disconnects, hyper drops this handler's future mid-await, which drops it too.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http_body_util::BodyExt as _;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;
use tokio_util::io::ReaderStream;

use crate::auth::{Denied, Operation, Tokens};
use crate::metrics::Metrics;
use crate::store::{EntryId, Kind, Store, is_valid_instance, parse_hash};

/// Largest action-cache value accepted (an `ActionResult` is a few hundred bytes).
pub const AC_MAX_SIZE: u64 = 1024 * 1024;
/// An upload that sends nothing for this long is abandoned (the default of
/// [`crate::Timeouts::body_idle`]).
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Read size for downloads.
const DOWNLOAD_CHUNK: usize = 256 * 1024;

pub(crate) struct App {
    pub(crate) store: Arc<Store>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) tokens: Option<Tokens>,
    pub(crate) allow_anonymous_read: bool,
    pub(crate) timeouts: crate::Timeouts,
}

pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .fallback(entry)
        .with_state(app)
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let body = app.metrics.render(&app.store.stats(), app.store.max_size());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

struct Route {
    instance: Option<String>,
    kind: Kind,
    hash: [u8; 32],
}

fn text(status: StatusCode, message: impl Into<String>) -> Response {
    let mut message = message.into();
    message.push('\n');
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        message,
    )
        .into_response()
}

/// A refusal before any work: the status and a message for the client.
type Refusal = (StatusCode, &'static str);

fn parse_route(path: &str) -> Result<Route, Refusal> {
    const NOT_FOUND: Refusal = (
        StatusCode::NOT_FOUND,
        "no such resource: expected /cas/<sha256>, /ac/<64 hex key>, optionally under /<instance>/",
    );
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let (instance, kind, hash) = match segments.as_slice() {
        [kind, hash] => (None, *kind, *hash),
        [instance, kind, hash] => (Some(*instance), *kind, *hash),
        _ => return Err(NOT_FOUND),
    };
    let kind = match kind {
        "cas" => Kind::Cas,
        "ac" => Kind::Ac,
        _ => return Err(NOT_FOUND),
    };
    if let Some(instance) = instance
        && !is_valid_instance(instance)
    {
        return Err((
            StatusCode::BAD_REQUEST,
            "invalid instance name: use 1-128 letters, digits, `.`, `_`, `-`, starting with a letter or digit",
        ));
    }
    let Some(hash) = parse_hash(hash) else {
        return Err((
            StatusCode::BAD_REQUEST,
            "invalid hash: expected 64 lowercase hex digits",
        ));
    };
    Ok(Route {
        instance: instance.map(str::to_string),
        kind,
        hash,
    })
}

async fn entry(State(app): State<Arc<App>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let route = match parse_route(parts.uri.path()) {
        Ok(route) => route,
        Err((status, message)) => return text(status, message),
    };
    let write = match parts.method {
        Method::GET | Method::HEAD => false,
        Method::PUT => true,
        _ => {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "use GET, HEAD or PUT");
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD, PUT"));
            return response;
        }
    };
    if let Some(tokens) = &app.tokens {
        let operation = Operation {
            write,
            instance: route.instance.as_deref(),
        };
        let authorization = parts
            .headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        match tokens.check(authorization, &operation, app.allow_anonymous_read) {
            Ok(()) => {}
            Err(Denied::Unauthenticated) => {
                app.metrics.unauthorized.fetch_add(1, Ordering::Relaxed);
                let mut response = text(
                    StatusCode::UNAUTHORIZED,
                    "a valid token is required: send `Authorization: Bearer TOKEN`",
                );
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"graphbuild-cache\""),
                );
                return response;
            }
            Err(Denied::Forbidden(reason)) => {
                app.metrics.forbidden.fetch_add(1, Ordering::Relaxed);
                return text(StatusCode::FORBIDDEN, reason);
            }
        }
    }
    let id = EntryId::new(route.kind, route.instance.as_deref(), route.hash);
    if write {
        put(&app, id, &parts.headers, body).await
    } else {
        read(&app, id, parts.method == Method::HEAD).await
    }
}

async fn read(app: &App, id: EntryId, head_only: bool) -> Response {
    let path = app.store.path_of(&id);
    let file = match tokio::fs::File::open(&path).await {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            app.metrics.miss(id.kind);
            app.store.forget_if_missing(&id);
            return text(StatusCode::NOT_FOUND, "not in the cache");
        }
        Err(error) => return internal_error(&format!("opening {}", path.display()), &error),
    };
    // The size comes from the open descriptor: a concurrent replace or eviction only changes
    // the name, never what this descriptor reads.
    let size = match file.metadata().await {
        Ok(metadata) => metadata.len(),
        Err(error) => return internal_error(&format!("reading {}", path.display()), &error),
    };
    app.store.touch(&id);
    app.metrics.hit(id.kind);
    let body = if head_only {
        Body::empty()
    } else {
        app.metrics.bytes_sent.fetch_add(size, Ordering::Relaxed);
        Body::from_stream(ReaderStream::with_capacity(file, DOWNLOAD_CHUNK))
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, size)
        .body(body)
        .unwrap_or_else(|_| {
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "could not build the response",
            )
        })
}

/// Whether an upload that received `received` bytes in `elapsed` is below the minimum rate.
fn too_slow(elapsed: Duration, received: u64, timeouts: &crate::Timeouts) -> bool {
    let Some(rated) = elapsed.checked_sub(timeouts.body_grace) else {
        return false;
    };
    (received as f64) < rated.as_secs_f64() * timeouts.min_body_rate as f64
}

/// `response` with `Connection: close`: the rest of the request body is not wanted.
fn closing(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

fn internal_error(context: &str, error: &io::Error) -> Response {
    eprintln!("graphbuild-cache-server: {context}: {error}");
    text(StatusCode::INTERNAL_SERVER_ERROR, "internal storage error")
}

/// Counts an upload as incomplete unless it reached a verdict (stored or rejected for a
/// named reason). Runs on drop, so a handler cancelled by a disconnect counts too.
struct UploadOutcome<'a> {
    metrics: &'a Metrics,
    decided: bool,
}

impl Drop for UploadOutcome<'_> {
    fn drop(&mut self) {
        if !self.decided {
            self.metrics
                .rejected_incomplete
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn put(app: &App, id: EntryId, headers: &HeaderMap, mut body: Body) -> Response {
    let mut outcome = UploadOutcome {
        metrics: &app.metrics,
        decided: false,
    };
    let limit = match id.kind {
        Kind::Cas => app.store.max_size().unwrap_or(u64::MAX),
        Kind::Ac => AC_MAX_SIZE,
    };
    let too_large = |outcome: &mut UploadOutcome<'_>| {
        outcome.decided = true;
        app.metrics
            .rejected_too_large
            .fetch_add(1, Ordering::Relaxed);
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the body exceeds the limit of {limit} bytes for /{}/",
                id.kind.label()
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit) {
        return too_large(&mut outcome);
    }

    let (file, temp) = match app.store.begin_upload() {
        Ok(parts) => parts,
        Err(error) => return internal_error("creating an upload file", &error),
    };
    let mut file = tokio::fs::File::from_std(file);
    let mut hasher = Sha256::new();
    let mut received: u64 = 0;
    let started = tokio::time::Instant::now();
    let timeouts = app.timeouts;
    loop {
        let frame = match tokio::time::timeout(timeouts.body_idle, body.frame()).await {
            Err(_) => return closing(text(StatusCode::REQUEST_TIMEOUT, "the upload stalled")),
            Ok(None) => break,
            Ok(Some(Err(_))) => return text(StatusCode::BAD_REQUEST, "the upload was cut off"),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        received += data.len() as u64;
        app.metrics
            .bytes_received
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if received > limit {
            return too_large(&mut outcome);
        }
        if too_slow(started.elapsed(), received, &timeouts) {
            return closing(text(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the upload is too slow: under {} bytes per second",
                    timeouts.min_body_rate
                ),
            ));
        }
        hasher.update(&data);
        if let Err(error) = file.write_all(&data).await {
            return internal_error("writing an upload", &error);
        }
    }
    if let Err(error) = file.sync_all().await {
        return internal_error("syncing an upload", &error);
    }
    drop(file);

    if id.kind == Kind::Cas {
        let actual: [u8; 32] = hasher.finalize().into();
        if actual != id.hash {
            outcome.decided = true;
            app.metrics
                .rejected_digest_mismatch
                .fetch_add(1, Ordering::Relaxed);
            return text(
                StatusCode::BAD_REQUEST,
                format!(
                    "the body hashes to sha256:{}, not to its name sha256:{}; nothing was stored",
                    hex::encode(actual),
                    hex::encode(id.hash)
                ),
            );
        }
    }

    let store = app.store.clone();
    let kind = id.kind;
    match tokio::task::spawn_blocking(move || store.commit(id, temp, received)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => return internal_error("storing an upload", &error),
        Err(_) => return text(StatusCode::INTERNAL_SERVER_ERROR, "the storage task failed"),
    }
    outcome.decided = true;
    app.metrics.upload(kind);
    text(StatusCode::OK, "stored")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_minimum_rate_applies_after_the_grace_period() {
        let timeouts = crate::Timeouts {
            header_read: Duration::from_secs(1),
            body_idle: Duration::from_secs(1),
            min_body_rate: 1000,
            body_grace: Duration::from_secs(2),
        };
        let seconds = Duration::from_secs;
        assert!(!too_slow(seconds(1), 0, &timeouts));
        assert!(!too_slow(seconds(2), 0, &timeouts));
        assert!(too_slow(seconds(3), 999, &timeouts));
        assert!(!too_slow(seconds(3), 1000, &timeouts));
        assert!(too_slow(seconds(12), 9_000, &timeouts));
    }
}
