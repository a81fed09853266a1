//! Counters for `/metrics`, rendered in the Prometheus text exposition format (version 0.0.4).
//!
//! Counters are plain relaxed atomics bumped by the request handlers and the evictor; gauges
//! (entries, disk used) are read from the store index when `/metrics` is scraped.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::store::{Kind, StoreStats};

#[derive(Default)]
pub(crate) struct Metrics {
    pub(crate) cas_hits: AtomicU64,
    pub(crate) cas_misses: AtomicU64,
    pub(crate) ac_hits: AtomicU64,
    pub(crate) ac_misses: AtomicU64,
    pub(crate) cas_uploads: AtomicU64,
    pub(crate) ac_uploads: AtomicU64,
    pub(crate) rejected_digest_mismatch: AtomicU64,
    pub(crate) rejected_too_large: AtomicU64,
    pub(crate) rejected_incomplete: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) evictions: AtomicU64,
    pub(crate) evicted_bytes: AtomicU64,
    pub(crate) unauthorized: AtomicU64,
    pub(crate) forbidden: AtomicU64,
}

impl Metrics {
    pub(crate) fn hit(&self, kind: Kind) {
        match kind {
            Kind::Cas => &self.cas_hits,
            Kind::Ac => &self.ac_hits,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn miss(&self, kind: Kind) {
        match kind {
            Kind::Cas => &self.cas_misses,
            Kind::Ac => &self.ac_misses,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn upload(&self, kind: Kind) {
        match kind {
            Kind::Cas => &self.cas_uploads,
            Kind::Ac => &self.ac_uploads,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn render(&self, stats: &StoreStats, max_size: Option<u64>) -> String {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        family(
            "graphbuild_cache_hits_total",
            "counter",
            "GET and HEAD requests that found the entry",
            &[
                (r#"{kind="cas"}"#, get(&self.cas_hits)),
                (r#"{kind="ac"}"#, get(&self.ac_hits)),
            ],
        );
        family(
            "graphbuild_cache_misses_total",
            "counter",
            "GET and HEAD requests that did not find the entry",
            &[
                (r#"{kind="cas"}"#, get(&self.cas_misses)),
                (r#"{kind="ac"}"#, get(&self.ac_misses)),
            ],
        );
        family(
            "graphbuild_cache_uploads_total",
            "counter",
            "PUT requests stored",
            &[
                (r#"{kind="cas"}"#, get(&self.cas_uploads)),
                (r#"{kind="ac"}"#, get(&self.ac_uploads)),
            ],
        );
        family(
            "graphbuild_cache_uploads_rejected_total",
            "counter",
            "PUT requests refused or abandoned; nothing was stored",
            &[
                (
                    r#"{reason="digest_mismatch"}"#,
                    get(&self.rejected_digest_mismatch),
                ),
                (r#"{reason="too_large"}"#, get(&self.rejected_too_large)),
                (r#"{reason="incomplete"}"#, get(&self.rejected_incomplete)),
            ],
        );
        family(
            "graphbuild_cache_bytes_received_total",
            "counter",
            "request body bytes received by PUT requests",
            &[("", get(&self.bytes_received))],
        );
        family(
            "graphbuild_cache_bytes_sent_total",
            "counter",
            "response body bytes served by GET requests",
            &[("", get(&self.bytes_sent))],
        );
        family(
            "graphbuild_cache_evictions_total",
            "counter",
            "entries removed to stay under the maximum size",
            &[("", get(&self.evictions))],
        );
        family(
            "graphbuild_cache_evicted_bytes_total",
            "counter",
            "bytes removed to stay under the maximum size",
            &[("", get(&self.evicted_bytes))],
        );
        family(
            "graphbuild_cache_auth_denied_total",
            "counter",
            "requests refused by authentication (401) or authorization (403)",
            &[
                (r#"{status="401"}"#, get(&self.unauthorized)),
                (r#"{status="403"}"#, get(&self.forbidden)),
            ],
        );
        family(
            "graphbuild_cache_entries",
            "gauge",
            "entries currently stored",
            &[
                (r#"{kind="cas"}"#, stats.cas_entries),
                (r#"{kind="ac"}"#, stats.ac_entries),
            ],
        );
        family(
            "graphbuild_cache_disk_used_bytes",
            "gauge",
            "total size of the stored entries",
            &[("", stats.total_size)],
        );
        if let Some(max_size) = max_size {
            family(
                "graphbuild_cache_max_size_bytes",
                "gauge",
                "the configured maximum size",
                &[("", max_size)],
            );
        }
        out
    }
}
