//! graphbuild's team cache server: an HTTP cache compatible with bazel-remote's protocol.
//!
//! # Overview
//!
//! Two stores behind one HTTP server: the CAS (content-addressed blobs, named by their
//! sha256: layers, step records) and the action cache (small values named by a client-chosen
//! key: graphbuild stores an REAPI `ActionResult` there that points into the CAS). Builds on
//! different machines share results through it; see `docs/cache-server.md`.
//!
//! - [`http`]: routes, auth decisions, streaming uploads and downloads.
//! - [`store`]: the directory layout, crash-safe commits, the LRU index and eviction.
//! - [`auth`]: the tokens file and bearer-token decisions.
//! - [`metrics`]: counters for `/metrics`.
//!
//! # Embedding
//!
//! ```no_run
//! # async fn example() -> Result<(), graphbuild_cache_server::ServerError> {
//! use graphbuild_cache_server::{ServerConfig, bind};
//! let server = bind(ServerConfig::new("/var/cache/graphbuild")).await?;
//! println!("listening on http://{}", server.local_addr());
//! server.run(async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```
//!
//! The library needs a multi-threaded tokio runtime and never parses command lines.
//!
//! # Slow and silent clients
//!
//! Connections are served by hyper's HTTP/1 server with a timer, so a client that does not
//! finish sending request headers within [`Timeouts::header_read`] is disconnected — this
//! also bounds a half-open connection that never sends anything and an idle keep-alive
//! connection. Upload bodies are bounded twice by the PUT handler: silence for
//! [`Timeouts::body_idle`], and an average below [`Timeouts::min_body_rate`] bytes per second
//! once [`Timeouts::body_grace`] has passed; either answers 408 and closes the connection. A
//! client trickling one byte at a time therefore holds a connection for at most about
//! `body_grace` plus one idle timeout. On the way out, a write that makes no progress for
//! [`Timeouts::body_idle`] (a client that stopped reading a download) closes the connection.

mod auth;
mod conn;
mod http;
mod metrics;
mod store;

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;

pub use auth::{Access, Tokens};
pub use http::{AC_MAX_SIZE, BODY_IDLE_TIMEOUT};

/// Time limits that keep slow or silent clients from holding connections (see the crate
/// documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// A request's headers must be complete this long after the server starts waiting for them
    /// (on a new connection, or after the previous response on a kept-alive one).
    pub header_read: Duration,
    /// An upload whose body sends nothing for this long is abandoned; a connection whose
    /// client reads nothing of a response for this long is closed.
    pub body_idle: Duration,
    /// Once `body_grace` has passed, an upload must have averaged at least this many bytes per
    /// second since its start.
    pub min_body_rate: u64,
    /// How long an upload may take before `min_body_rate` applies.
    pub body_grace: Duration,
}

impl Default for Timeouts {
    /// 30 s for headers, [`BODY_IDLE_TIMEOUT`] of silence, 4 KiB/s after 30 s.
    fn default() -> Timeouts {
        Timeouts {
            header_read: Duration::from_secs(30),
            body_idle: BODY_IDLE_TIMEOUT,
            min_body_rate: 4 * 1024,
            body_grace: Duration::from_secs(30),
        }
    }
}

/// Where `graphbuild cache serve` listens unless told otherwise.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 7070);

/// How to run the server; the fields mirror the command-line flags.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// `--listen`: address and port (port 0 picks a free one, see [`BoundServer::local_addr`]).
    pub listen: SocketAddr,
    /// `--dir`: the store directory, created if missing.
    pub dir: PathBuf,
    /// `--max-size`: total bytes kept before least recently used entries are evicted.
    pub max_size: Option<u64>,
    /// `--tokens`: the tokens file (format in `docs/cache-server.md`); `None` = open server.
    pub tokens_file: Option<PathBuf>,
    /// `--allow-anonymous-read`: GET and HEAD need no token.
    pub allow_anonymous_read: bool,
    /// Limits on slow clients; [`Timeouts::default`] unless embedding code changes them.
    pub timeouts: Timeouts,
}

impl ServerConfig {
    /// Defaults: [`DEFAULT_LISTEN`], no size limit, no tokens.
    pub fn new(dir: impl Into<PathBuf>) -> ServerConfig {
        ServerConfig {
            listen: DEFAULT_LISTEN,
            dir: dir.into(),
            max_size: None,
            tokens_file: None,
            allow_anonymous_read: false,
            timeouts: Timeouts::default(),
        }
    }
}

#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum ServerError {
    #[error("cannot listen on {addr}")]
    #[diagnostic(
        code(graphbuild::cache_server::bind),
        help("is another server already listening there? pick another address with --listen")
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "{} is not empty and is not a cache server directory (it has no {} file); refusing to use it",
        path.display(),
        store::MARKER
    )]
    #[diagnostic(
        code(graphbuild::cache_server::not_a_store),
        help(
            "give --dir a new or empty directory, such as /var/cache/graphbuild: the server deletes files in its directory, so it never takes over one it did not create"
        )
    )]
    NotAStore { path: PathBuf },

    #[error("cannot open the cache directory {}", path.display())]
    #[diagnostic(
        code(graphbuild::cache_server::store),
        help("check that --dir exists or can be created, and that this user can write to it")
    )]
    Store {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot read the tokens file {}", path.display())]
    #[diagnostic(
        code(graphbuild::cache_server::tokens),
        help("check the --tokens path and its permissions")
    )]
    TokensRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{}:{line}: {message}", path.display())]
    #[diagnostic(
        code(graphbuild::cache_server::tokens_syntax),
        help("each line is `TOKEN ro|rw [INSTANCE]`; `#` starts a comment")
    )]
    TokensSyntax {
        path: PathBuf,
        line: usize,
        message: String,
    },

    #[error("--max-size must be at least 1 byte")]
    #[diagnostic(
        code(graphbuild::cache_server::max_size),
        help("leave --max-size out for no limit")
    )]
    ZeroMaxSize,

    #[error("the cache server stopped with an I/O error")]
    #[diagnostic(code(graphbuild::cache_server::serve))]
    Serve(#[source] std::io::Error),
}

/// A server that is listening but not yet serving: learn its address, then [`run`](Self::run).
pub struct BoundServer {
    listener: tokio::net::TcpListener,
    local_addr: SocketAddr,
    app: Arc<http::App>,
}

impl BoundServer {
    /// The actual address, with the port the OS chose when `listen` had port 0.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serve until `shutdown` completes, then finish in-flight requests and return.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let store = self.app.store.clone();
        let evictor = tokio::spawn(async move {
            loop {
                store.eviction_needed.notified().await;
                let store = store.clone();
                // A panic in eviction must not stop the loop; the next notification retries.
                let _ = tokio::task::spawn_blocking(move || store.evict_to_target()).await;
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(Some(self.app.timeouts.header_read));
        let router = http::router(self.app.clone());

        // Dropping the receiver tells the accept loop and every connection to stop.
        let (signal_sender, signal_receiver) = tokio::sync::watch::channel(());
        tokio::spawn(async move {
            shutdown.await;
            drop(signal_receiver);
        });
        // Each connection holds a receiver; the sender's `closed()` waits for them all.
        let (close_sender, close_receiver) = tokio::sync::watch::channel(());
        loop {
            let stream = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) if is_connection_error(&error) => continue,
                    Err(error) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        eprintln!("graphbuild-cache-server: accepting a connection: {error}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                },
                () = signal_sender.closed() => break,
            };
            let _ = stream.set_nodelay(true);
            let stream = conn::WriteStallTimeout::new(stream, self.app.timeouts.body_idle);
            let service = TowerToHyperService::new(router.clone());
            let builder = builder.clone();
            let signal_sender = signal_sender.clone();
            let close_receiver = close_receiver.clone();
            tokio::spawn(async move {
                let mut connection = pin!(builder.serve_connection(TokioIo::new(stream), service));
                let mut signalled = pin!(signal_sender.closed());
                let mut shutting_down = false;
                loop {
                    tokio::select! {
                        _ = connection.as_mut() => break,
                        () = &mut signalled, if !shutting_down => {
                            shutting_down = true;
                            connection.as_mut().graceful_shutdown();
                        }
                    }
                }
                drop(close_receiver);
            });
        }
        drop(close_receiver);
        drop(self.listener);
        close_sender.closed().await;
        evictor.abort();
        Ok(())
    }
}

fn is_connection_error(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// Open the store (deleting leftover uploads, rebuilding the index), read the tokens file and
/// bind the listening socket.
pub async fn bind(config: ServerConfig) -> Result<BoundServer, ServerError> {
    if config.max_size == Some(0) {
        return Err(ServerError::ZeroMaxSize);
    }
    let tokens = config
        .tokens_file
        .as_deref()
        .map(Tokens::load)
        .transpose()?;
    let metrics = Arc::new(metrics::Metrics::default());
    let dir = config.dir.clone();
    let max_size = config.max_size;
    let store_metrics = metrics.clone();
    let store =
        tokio::task::spawn_blocking(move || store::Store::open(&dir, max_size, store_metrics))
            .await
            .map_err(|join_error| ServerError::Store {
                path: config.dir.clone(),
                source: std::io::Error::other(join_error.to_string()),
            })?
            .map_err(|error| match error {
                store::OpenError::NotAStore => ServerError::NotAStore {
                    path: config.dir.clone(),
                },
                store::OpenError::Io(source) => ServerError::Store {
                    path: config.dir.clone(),
                    source,
                },
            })?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: config.listen,
        source,
    })?;
    Ok(BoundServer {
        listener,
        local_addr,
        app: Arc::new(http::App {
            store: Arc::new(store),
            metrics,
            tokens,
            allow_anonymous_read: config.allow_anonymous_read,
            timeouts: config.timeouts,
        }),
    })
}

/// [`bind`] then [`BoundServer::run`].
pub async fn serve(
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    bind(config).await?.run(shutdown).await
}
