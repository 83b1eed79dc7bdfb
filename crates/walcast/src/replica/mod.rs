//! The native replica: the shared async driver ([`walcast_client::Driver`])
//! with reqwest (`http(s)://`) or object_store (`s3://`, `file://`, …) as the
//! fetch seam, and a local directory that survives `kill -9`.
//!
//! `local.rs` keeps the local directory, `fetch.rs` the fetch seams; here
//! the `replicate` entry points.

mod fetch;
mod local;

pub use self::fetch::{AnyFetch, HttpFetch, StoreFetch, TokioTimer};
pub(crate) use self::local::Persist;
pub use self::local::{load, Local, LocalDir};

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

static LAST_REQUESTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// GETs made by the last [`replicate`] run in this process (also when it failed).
pub fn last_requests() -> u64 {
    LAST_REQUESTS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Live figures of a running replica, for progress displays.
#[derive(Debug, Default)]
pub struct Progress {
    /// Applied LSN.
    pub applied: std::sync::atomic::AtomicU64,
    /// Committed LSN of the newest head seen.
    pub committed: std::sync::atomic::AtomicU64,
    /// When each applied unit landed: (first LSN, last LSN, instant).
    pub applied_at: std::sync::Mutex<Vec<(u64, u64, std::time::Instant)>>,
}

/// Options of `walcast replicate`.
#[derive(Debug, Clone)]
pub struct ReplicateOptions {
    /// Where to publish live figures.
    pub sink: Option<std::sync::Arc<Progress>>,
    /// Head poll interval.
    pub interval: Duration,
    /// Catch up to the head as of the start, then return.
    pub once: bool,
    /// Segment GETs in flight at most.
    pub concurrency: usize,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// Pinned keys ([`walcast_core::replica::ReplicaConfig::trust`]): apply
    /// only what a trusted key signed. Empty: any dataset, signed or not.
    pub trust: Vec<walcast_core::keys::PublicKey>,
}

/// What a replicate run did.
#[derive(Debug, Clone, Default)]
pub struct ReplicateReport {
    /// Applied LSN at the end.
    pub applied_lsn: u64,
    /// GETs made.
    pub requests: u64,
}

/// Replicates the dataset at `url` into `local` until `stop` (or, with
/// `once`, until caught up). A replica error in `once` mode is returned and
/// leaves the last good state in place.
pub async fn replicate(
    url: &str,
    local: &Path,
    opts: &ReplicateOptions,
    stop: impl std::future::Future<Output = ()>,
) -> Result<ReplicateReport> {
    replicate_from(AnyFetch::for_url(url)?, local, opts, stop).await
}

/// [`replicate`] with headers (`Name: value`) sent with every GET of an
/// http(s):// dataset, e.g. `Authorization: Bearer …`.
pub async fn replicate_with_headers(
    url: &str,
    headers: &[String],
    local: &Path,
    opts: &ReplicateOptions,
    stop: impl std::future::Future<Output = ()>,
) -> Result<ReplicateReport> {
    replicate_from(
        AnyFetch::for_url_with_headers(url, headers)?,
        local,
        opts,
        stop,
    )
    .await
}

/// Runs [`replicate_from`] on a blocking thread with a current-thread
/// runtime of its own, for callers on a multi-threaded runtime: the replica
/// driver is not `Send` (it runs in wasm too).
pub fn spawn_replicate(
    fetch: AnyFetch,
    local: PathBuf,
    opts: ReplicateOptions,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<Result<ReplicateReport>> {
    tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(replicate_from(fetch, &local, &opts, stop))
    })
}

/// [`replicate_with_headers`], counting into `metrics` (`walcast replicate
/// --metrics-addr`).
pub async fn replicate_with_metrics(
    url: &str,
    headers: &[String],
    local: &Path,
    opts: &ReplicateOptions,
    stop: impl std::future::Future<Output = ()>,
    metrics: std::sync::Arc<crate::metrics::ReplicaMetrics>,
) -> Result<ReplicateReport> {
    replicate_from_metered(
        AnyFetch::for_url_with_headers(url, headers)?,
        local,
        opts,
        stop,
        Some(metrics),
    )
    .await
}

/// [`replicate`] through a fetch seam of the caller's (for example a
/// [`StoreFetch`] over a [`Store::open_counted`](crate::store::Store::open_counted) store).
pub async fn replicate_from(
    fetch: AnyFetch,
    local: &Path,
    opts: &ReplicateOptions,
    stop: impl std::future::Future<Output = ()>,
) -> Result<ReplicateReport> {
    replicate_from_metered(fetch, local, opts, stop, None).await
}

async fn replicate_from_metered(
    fetch: AnyFetch,
    local: &Path,
    opts: &ReplicateOptions,
    stop: impl std::future::Future<Output = ()>,
    metrics: Option<std::sync::Arc<crate::metrics::ReplicaMetrics>>,
) -> Result<ReplicateReport> {
    use crate::handle::{Extras, ReplicaHandle, ReplicaOptions};

    // The same handle apps embed, on a local directory: one driver loop.
    let counter = fetch.clone();
    let options = ReplicaOptions {
        poll_interval: opts.interval,
        concurrency: opts.concurrency,
        trust: opts.trust.clone(),
        local: Some(local.to_path_buf()),
        follow: !opts.once,
        ..ReplicaOptions::default()
    };
    let extras = Extras {
        metrics,
        sink: opts.sink.clone(),
        progress_bar: opts.progress,
        follow_at_once: !opts.once,
    };
    let result = async {
        let mut handle = ReplicaHandle::open_with(fetch, options, extras).await?;
        if !opts.once {
            let mut stop = std::pin::pin!(stop);
            tokio::select! {
                r = handle.ended() => { r?; }
                () = &mut stop => {}
            }
        }
        handle.finish().await
    }
    .await;
    LAST_REQUESTS.store(counter.requests(), std::sync::atomic::Ordering::Relaxed);
    Ok(ReplicateReport {
        applied_lsn: result?,
        requests: counter.requests(),
    })
}
