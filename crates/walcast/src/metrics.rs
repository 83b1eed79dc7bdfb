//! Prometheus metrics for `walcast replicate` and `walcast publish`
//! (`--metrics-addr`): the applied and committed LSN, a lag histogram,
//! requests by kind and outcome, bytes, errors, commits, and whether a
//! replica long-polls or polls. Encoded with `prometheus-client` (the
//! OpenMetrics text format, which Prometheus scrapes) and served at
//! `GET /metrics`.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use walcast_client::Fetch;
use walcast_core::io::{GetRequest, GetResponse, ResponseMeta};

use crate::counting::RequestStats;

/// Lag buckets, in seconds: 5 ms to 30 s.
const LAG_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0,
];

/// The labels of a request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// What the request was for: `head`, `segment`, `page`, `snapshot`
    /// (a replica), or `get`, `put`, `delete`, `list` (a publisher).
    pub kind: String,
    /// How it ended: `ok`, `not_modified`, `not_found`, `failed` (a
    /// replica's GETs), or `sent` (a publisher's requests).
    pub outcome: String,
}

/// A replica's metrics.
#[derive(Debug)]
pub struct ReplicaMetrics {
    registry: Registry,
    /// Applied LSN.
    pub applied_lsn: Gauge,
    /// Committed LSN of the newest head seen.
    pub committed_lsn: Gauge,
    /// Commit-to-applied lag of each applied unit, seconds.
    pub lag: Histogram,
    /// GETs by kind and outcome.
    pub requests: Family<RequestLabels, Counter>,
    /// Body bytes received.
    pub bytes: Counter,
    /// Errors the replica reported (after its retries).
    pub errors: Counter,
    /// 1 while the server holds the replica's head reads (long-poll), 0
    /// while it polls.
    pub long_poll: Gauge,
}

impl Default for ReplicaMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplicaMetrics {
    /// Registers every metric, prefixed `walcast_replica_`.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("walcast_replica");
        let m = ReplicaMetrics {
            applied_lsn: Gauge::default(),
            committed_lsn: Gauge::default(),
            lag: Histogram::new(LAG_BUCKETS),
            requests: Family::default(),
            bytes: Counter::default(),
            errors: Counter::default(),
            long_poll: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("applied_lsn", "Applied LSN", m.applied_lsn.clone());
        registry.register(
            "committed_lsn",
            "Committed LSN of the newest head seen",
            m.committed_lsn.clone(),
        );
        registry.register(
            "lag_seconds",
            "Time from a commit at the publisher to its batches applied here",
            m.lag.clone(),
        );
        registry.register(
            "requests",
            "GETs by object kind and outcome",
            m.requests.clone(),
        );
        registry.register("received_bytes", "Body bytes received", m.bytes.clone());
        registry.register(
            "errors",
            "Errors reported after retries (the replica keeps retrying)",
            m.errors.clone(),
        );
        registry.register(
            "long_poll",
            "1 while the server holds head reads (long-poll), 0 while polling",
            m.long_poll.clone(),
        );
        ReplicaMetrics { registry, ..m }
    }

    /// Records an applied unit: the LSNs and the lag the replica reports.
    pub fn applied(&self, applied: u64, committed: u64, lag_ms: u64) {
        self.applied_lsn.set(applied.min(i64::MAX as u64) as i64);
        self.committed_lsn
            .set(committed.min(i64::MAX as u64) as i64);
        self.lag.observe(lag_ms as f64 / 1e3);
    }

    fn count(&self, req: &GetRequest, resp: &GetResponse, meta: Option<&ResponseMeta>) {
        let kind = object_kind(&req.key);
        let outcome = match resp {
            GetResponse::Ok { body, .. } => {
                self.bytes.inc_by(body.len() as u64);
                "ok"
            }
            GetResponse::NotModified => "not_modified",
            GetResponse::NotFound => "not_found",
            _ => "failed",
        };
        self.requests
            .get_or_create(&RequestLabels {
                kind: kind.into(),
                outcome: outcome.into(),
            })
            .inc();
        if let (Some(meta), "head", false) = (meta, kind, outcome == "failed") {
            self.long_poll
                .set(i64::from(meta.long_poll_max_ms.is_some()));
        }
    }

    /// The metrics in the text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

fn object_kind(key: &str) -> &'static str {
    if key == walcast_core::catalog::HEAD_KEY {
        "head"
    } else {
        walcast_core::catalog::object_kind(key).unwrap_or("other")
    }
}

/// A fetch seam that counts every GET into [`ReplicaMetrics`] (when given)
/// and passes it on.
#[derive(Debug, Clone)]
pub struct MeteredFetch<F> {
    inner: F,
    metrics: Option<Arc<ReplicaMetrics>>,
}

impl<F> MeteredFetch<F> {
    /// Wraps `inner`; `None` counts nothing.
    pub fn new(inner: F, metrics: Option<Arc<ReplicaMetrics>>) -> Self {
        MeteredFetch { inner, metrics }
    }
}

impl<F: Fetch> Fetch for MeteredFetch<F> {
    async fn get(&self, req: GetRequest) -> GetResponse {
        let resp = self.inner.get(req.clone()).await;
        if let Some(m) = &self.metrics {
            m.count(&req, &resp, None);
        }
        resp
    }

    async fn get_with_meta(&self, req: GetRequest) -> (GetResponse, ResponseMeta) {
        let (resp, meta) = self.inner.get_with_meta(req.clone()).await;
        if let Some(m) = &self.metrics {
            m.count(&req, &resp, Some(&meta));
        }
        (resp, meta)
    }
}

/// A publisher's metrics.
#[derive(Debug)]
pub struct PublisherMetrics {
    registry: Registry,
    /// Committed LSN.
    pub committed_lsn: Gauge,
    /// Head commits.
    pub commits: Counter,
    /// Requests to the store, read from the store's counters at scrape time.
    pub stats: Arc<RequestStats>,
    requests: Family<RequestLabels, Counter>,
    bytes_sent: Counter,
    errors: Counter,
    seen: std::sync::Mutex<crate::counting::RequestCounts>,
}

impl PublisherMetrics {
    /// Registers every metric, prefixed `walcast_publisher_`; `stats` are
    /// the counters of the store the publisher writes through
    /// ([`crate::store::Store::open_counted`]).
    pub fn new(stats: Arc<RequestStats>) -> Self {
        let mut registry = Registry::with_prefix("walcast_publisher");
        let committed_lsn = Gauge::default();
        let commits = Counter::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let bytes_sent = Counter::default();
        let errors = Counter::default();
        registry.register("committed_lsn", "Committed LSN", committed_lsn.clone());
        registry.register("commits", "Head commits", commits.clone());
        registry.register(
            "requests",
            "Requests to the object store by kind",
            requests.clone(),
        );
        registry.register("sent_bytes", "Body bytes uploaded", bytes_sent.clone());
        registry.register(
            "errors",
            "Errors reported after retries (the publisher keeps retrying)",
            errors.clone(),
        );
        PublisherMetrics {
            registry,
            committed_lsn,
            commits,
            stats,
            requests,
            bytes_sent,
            errors,
            seen: Default::default(),
        }
    }

    /// Records a commit of everything up to `lsn`.
    pub fn committed(&self, lsn: u64) {
        self.committed_lsn.set(lsn.min(i64::MAX as u64) as i64);
        self.commits.inc();
    }

    /// Records an error the publisher reported.
    pub fn error(&self) {
        self.errors.inc();
    }

    /// The metrics in the text exposition format.
    pub fn encode(&self) -> String {
        let now = self.stats.snapshot();
        if let Ok(mut seen) = self.seen.lock() {
            let d = now.since(&seen);
            for (kind, n) in [
                ("get", d.gets),
                ("put", d.puts),
                ("delete", d.deletes),
                ("list", d.lists),
                ("other", d.others),
            ] {
                self.requests
                    .get_or_create(&RequestLabels {
                        kind: kind.into(),
                        outcome: "sent".into(),
                    })
                    .inc_by(n);
            }
            self.bytes_sent.inc_by(d.bytes_up);
            *seen = now;
        }
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Connections to the metrics endpoint at once; more wait in the kernel's
/// backlog until one ends.
const METRICS_MAX_CONNECTIONS: usize = 64;
/// How long a metrics connection may take to send its request head.
const METRICS_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a metrics connection stays open in all: a scrape takes
/// milliseconds, so a connection that sends nothing, or reads its answer a
/// byte at a time, holds a descriptor and a slot no longer than this.
const METRICS_CONNECTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves `render()` at `GET /metrics` on `addr` until the process ends.
/// Returns the bound address (port 0 picks one). At most 64 connections
/// are served at once, each for one request and at most 30 s in all (5 s to
/// send its request head): the endpoint never holds the process's file
/// descriptors for a client that idles.
pub async fn serve(
    addr: SocketAddr,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    render(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        let slots = Arc::new(tokio::sync::Semaphore::new(METRICS_MAX_CONNECTIONS));
        loop {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            let tcp = match listener.accept().await {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of descriptors and the like: wait rather than spin.
                    tracing::warn!("metrics endpoint: accepting a connection: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let app = app.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(METRICS_HEADER_TIMEOUT)
                    .keep_alive(false);
                let conn = builder.serve_connection(
                    hyper_util::rt::TokioIo::new(tcp),
                    hyper_util::service::TowerToHyperService::new(app),
                );
                let _ = tokio::time::timeout(METRICS_CONNECTION_TIMEOUT, conn).await;
            });
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn the_endpoint_answers_a_scrape_and_closes_a_connection_that_sends_nothing() {
        let addr = serve(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(|| "walcast_test 1\n# EOF\n".to_string()),
        )
        .await
        .unwrap();
        // A scrape: one request, answered, then the connection ends.
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(60),
            c.read_to_end(&mut answer),
        )
        .await
        .expect("the answer ends the connection")
        .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("walcast_test 1"), "{answer}");
        // A client that connects and sends nothing is closed, not kept.
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(std::time::Duration::from_secs(60), idle.read(&mut buf))
            .await
            .expect("an idle connection is closed after the header timeout");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    }
}
