//! The live scenarios, one system at a time: a writer commits small batches
//! at a steady rate while a reader follows (**lag**: commit at the writer to
//! visible at the reader); then nothing is written and the caught-up reader's
//! requests are counted (**idle cost**).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use walcast::counting::{Counting, RequestCounts, RequestStats};
use walcast_core::batch::{self, Op};

use crate::target::Target;
use crate::{kv, POLL_MS};

/// The shape of a live run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LivePlan {
    /// Batches a second.
    pub(crate) rate: u64,
    /// How long the writer writes.
    pub(crate) write_for: Duration,
    /// How long the caught-up reader is watched idle.
    pub(crate) idle_for: Duration,
}

/// What a live run measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct LiveResult {
    /// Commit-to-visible lag of every timed batch, in ms, sorted.
    pub(crate) lags_ms: Vec<f64>,
    /// Batches the writer committed in the timed window.
    pub(crate) written: u64,
    /// The reader's requests while idle.
    pub(crate) idle_reader: RequestCounts,
    /// The writer's requests while idle.
    pub(crate) idle_writer: RequestCounts,
    /// The idle window, in seconds.
    pub(crate) idle_secs: f64,
    /// The reader's requests while following the writer.
    pub(crate) follow_reader: RequestCounts,
    /// The writer's requests while writing (until the reader caught up).
    pub(crate) follow_writer: RequestCounts,
    /// walcast: head commits the publisher made over the whole run (0 for
    /// SlateDB).
    pub(crate) commits: u64,
    /// walcast: the writer's requests within the timed window only (from the
    /// first timed batch to the last; no start-up, no catch-up).
    pub(crate) window_writer: RequestCounts,
    /// walcast: the reader's requests within the timed window.
    pub(crate) window_reader: RequestCounts,
    /// walcast: head commits within the timed window.
    pub(crate) window_commits: u64,
    /// The timed window, in seconds.
    pub(crate) window_secs: f64,
    /// walcast: time between two head commits within the timed window, in
    /// ms, sorted (the commit budget's spacing as it happened).
    pub(crate) commit_gaps_ms: Vec<f64>,
}

const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);

/// The requests of a live run: while following, then while idle.
struct Counts {
    follow_reader: RequestCounts,
    follow_writer: RequestCounts,
    idle_reader: RequestCounts,
    idle_writer: RequestCounts,
    idle_secs: f64,
}

impl Counts {
    /// Takes the counts so far, then watches `idle_for` of nothing written.
    async fn observe(reader: &RequestStats, writer: &RequestStats, idle_for: Duration) -> Counts {
        Counts::observe_with(|| reader.snapshot(), || writer.snapshot(), idle_for).await
    }

    /// [`Counts::observe`] with counts taken by the given functions.
    async fn observe_with(
        reader: impl Fn() -> RequestCounts,
        writer: impl Fn() -> RequestCounts,
        idle_for: Duration,
    ) -> Counts {
        let (r0, w0, t0) = (reader(), writer(), Instant::now());
        tokio::time::sleep(idle_for).await;
        let (r1, w1) = (reader(), writer());
        Counts {
            follow_reader: r0,
            follow_writer: w0,
            idle_reader: r1.since(&r0),
            idle_writer: w1.since(&w0),
            idle_secs: t0.elapsed().as_secs_f64(),
        }
    }

    fn result(self, commits: &[Instant], visible: &[Option<Instant>]) -> Result<LiveResult> {
        Ok(LiveResult {
            lags_ms: sorted_lags(commits, visible)?,
            written: commits.len() as u64,
            idle_reader: self.idle_reader,
            idle_writer: self.idle_writer,
            idle_secs: self.idle_secs,
            follow_reader: self.follow_reader,
            follow_writer: self.follow_writer,
            ..Default::default()
        })
    }
}

fn sorted_lags(commits: &[Instant], visible: &[Option<Instant>]) -> Result<Vec<f64>> {
    let mut lags = Vec::with_capacity(commits.len());
    for (i, (c, v)) in commits.iter().zip(visible).enumerate() {
        let v = v.ok_or_else(|| anyhow!("batch {i} of the timed window never became visible"))?;
        lags.push(v.saturating_duration_since(*c).as_secs_f64() * 1e3);
    }
    lags.sort_by(f64::total_cmp);
    Ok(lags)
}

/// Paces a writer: batch `n` is due `n / rate` seconds after `start`.
fn due(start: Instant, n: u64, rate: u64) -> Instant {
    start + Duration::from_micros(n * 1_000_000 / rate.max(1))
}

/// How the walcast replica of a live run reads the dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub(crate) enum Via {
    /// Straight from the object store, polling the head every `POLL_MS`.
    Store,
    /// Over HTTP from `walcast serve` on the `file://` dataset, in this
    /// process and woken by each commit as `walcast publish --serve` does.
    /// `long_poll`: the server holds conditional head reads (its default);
    /// else it answers at once (`--max-wait 0`) and the replica polls every
    /// `POLL_MS`.
    Serve {
        /// The server holds head reads until the head changes.
        long_poll: bool,
    },
}

/// The walcast side of a live run.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub(crate) struct WalcastSetup {
    /// `walcast publish --min-commit-interval` (ms).
    pub(crate) min_commit_interval_ms: u64,
    /// `walcast publish --max-commit-rate`: `None` keeps the default budget,
    /// `Some(0)` turns it off.
    pub(crate) max_commits_per_sec: Option<u32>,
    /// Where the replica reads.
    pub(crate) via: Via,
    /// `walcast publish --flush-interval` (ms).
    pub(crate) flush_ms: u64,
    /// `walcast replicate --interval` (ms): the replica's head poll.
    pub(crate) poll_ms: u64,
}

impl WalcastSetup {
    /// The publisher's defaults (with the bench's flush interval), the
    /// replica on the store.
    pub(crate) fn store(min_commit_interval_ms: u64) -> WalcastSetup {
        WalcastSetup {
            min_commit_interval_ms,
            max_commits_per_sec: None,
            via: Via::Store,
            flush_ms: crate::FLUSH_MS,
            poll_ms: POLL_MS,
        }
    }
}

/// A replica's requests and bytes, from its metrics (`walcast replicate
/// --metrics-addr`): every GET by outcome, and the body bytes received.
fn replica_counts(m: &walcast::metrics::ReplicaMetrics) -> RequestCounts {
    let mut c = RequestCounts {
        bytes_down: m.bytes.get(),
        ..Default::default()
    };
    for line in m.encode().lines() {
        let Some(rest) = line.strip_prefix("walcast_replica_requests_total{") else {
            continue;
        };
        let n: u64 = rest
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0, |v| v as u64);
        c.gets += n;
        if rest.contains("outcome=\"not_modified\"") {
            c.not_modified += n;
        } else if rest.contains("outcome=\"not_found\"") {
            c.not_found += n;
        }
    }
    c
}

/// walcast: `Writer` → `publish` → store → native replica, in this process.
pub(crate) async fn walcast(
    target: &Target,
    name: &str,
    plan: LivePlan,
    min_commit_interval_ms: u64,
) -> Result<LiveResult> {
    walcast_with(
        target,
        name,
        plan,
        WalcastSetup::store(min_commit_interval_ms),
    )
    .await
}

/// walcast: `Writer` → `publish` → store → native replica (reading the
/// store, or `walcast serve` over HTTP), in this process.
pub(crate) async fn walcast_with(
    target: &Target,
    name: &str,
    plan: LivePlan,
    setup: WalcastSetup,
) -> Result<LiveResult> {
    let tmp = tempfile::tempdir()?;
    let wal = tmp.path().join("wal");
    let local = tmp.path().join("replica");
    let url = target.walcast_url(name)?;
    let writer = Arc::new(walcast::wal::Writer::open(&wal)?);
    let writer_stats = Arc::new(RequestStats::default());
    let reader_stats = Arc::new(RequestStats::default());
    let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let stopped = |tx: &tokio::sync::broadcast::Sender<()>| {
        let mut rx = tx.subscribe();
        async move {
            let _ = rx.recv().await;
        }
    };

    // One batch before the timed window, so the dataset exists.
    let (k, v) = kv(0);
    writer.commit(&[Op::put(k, v)])?;

    // Each commit wakes the server's held head reads, as `publish --serve`.
    let signal = walcast::longpoll::HeadSignal::new();
    let commit_count = Arc::new(AtomicU64::new(0));
    let commit_times: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let publisher = {
        let store = walcast::store::Store::open_counted(&url, writer_stats.clone())?;
        let defaults = crate::walcast_publisher_config();
        let opts = walcast::publish::PublishOptions {
            config: walcast_core::publisher::PublisherConfig {
                min_commit_interval_ms: setup.min_commit_interval_ms,
                flush_interval_ms: setup.flush_ms,
                max_commits_per_sec: setup
                    .max_commits_per_sec
                    .unwrap_or(defaults.max_commits_per_sec),
                ..defaults
            },
            ..Default::default()
        };
        let (signal, commit_count, commit_times) =
            (signal.clone(), commit_count.clone(), commit_times.clone());
        tokio::spawn(walcast::publish::publish(
            wal.clone(),
            store,
            opts,
            stopped(&stop_tx),
            move |_| {
                commit_count.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut t) = commit_times.lock() {
                    t.push(Instant::now());
                }
                signal.notify();
            },
        ))
    };
    let server = match setup.via {
        Via::Store => None,
        Via::Serve { long_poll } => {
            let Target::File { root } = target else {
                bail!("walcast serve serves file:// datasets only");
            };
            let dir = root.join(name);
            std::fs::create_dir_all(&dir)?;
            let opts = walcast::serve::ServeOptions {
                head_signal: Some(signal.clone()),
                max_wait: if long_poll {
                    walcast::longpoll::DEFAULT_MAX_WAIT
                } else {
                    Duration::ZERO
                },
                ..Default::default()
            };
            let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
            let task = tokio::spawn(walcast::serve::serve_with(
                dir,
                "127.0.0.1:0".parse()?,
                opts,
                move |a| {
                    let _ = bound_tx.send(a);
                },
                stopped(&stop_tx),
            ));
            match bound_rx.await {
                Ok(addr) => Some((addr, task)),
                Err(_) => {
                    task.await??;
                    bail!("walcast serve stopped before listening");
                }
            }
        }
    };
    let progress = Arc::new(walcast::replica::Progress::default());
    let replica_metrics = Arc::new(walcast::metrics::ReplicaMetrics::new());
    let replica = {
        let opts = walcast::replica::ReplicateOptions {
            sink: Some(progress.clone()),
            interval: Duration::from_millis(setup.poll_ms),
            once: false,
            concurrency: 4,
            progress: false,
            trust: Vec::new(),
        };
        match &server {
            None => {
                let store = walcast::store::Store::open_counted(&url, reader_stats.clone())?;
                let fetch =
                    walcast::replica::AnyFetch::Store(walcast::replica::StoreFetch::new(store));
                walcast::replica::spawn_replicate(fetch, local.clone(), opts, stopped(&stop_tx))
            }
            Some((addr, _)) => {
                // The replica driver is not `Send`: a thread and runtime of its own.
                let (http, local, metrics, stop) = (
                    format!("http://{addr}/"),
                    local.clone(),
                    replica_metrics.clone(),
                    stopped(&stop_tx),
                );
                tokio::task::spawn_blocking(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(walcast::replica::replicate_with_metrics(
                        &http,
                        &[],
                        &local,
                        &opts,
                        stop,
                        metrics,
                    ))
                })
            }
        }
    };
    let over_http = server.is_some();
    let reader_counts = || {
        if over_http {
            replica_counts(&replica_metrics)
        } else {
            reader_stats.snapshot()
        }
    };
    let applied = || progress.applied.load(Ordering::Relaxed);
    wait_for(|| applied() >= 1, "the walcast replica to apply LSN 1").await?;

    // The timed window: batch i (0-based) gets LSN i + 2.
    let window_start = (
        reader_counts(),
        writer_stats.snapshot(),
        commit_count.load(Ordering::Relaxed),
        Instant::now(),
    );
    let commits = {
        let writer = writer.clone();
        tokio::task::spawn_blocking(move || -> Result<Vec<Instant>> {
            let start = Instant::now();
            let mut times = Vec::new();
            let mut n = 0u64;
            while start.elapsed() < plan.write_for {
                if let Some(d) = due(start, n, plan.rate).checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
                // Every batch due by now, each its own LSN, in one append and
                // one fsync (the writer's group commit): the rate holds even
                // when an fsync takes longer than one batch's slot.
                let now = Instant::now();
                let mut end = n + 1;
                while end < n + 1_000 && due(start, end, plan.rate) <= now {
                    end += 1;
                }
                let payloads = (n..end)
                    .map(|i| {
                        let (k, v) = kv(i + 1);
                        batch::encode(&[Op::put(k, v)]).map_err(|e| anyhow!("{e}"))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
                writer.commit_many(&refs)?;
                let at = Instant::now();
                times.extend(std::iter::repeat_n(at, refs.len()));
                n = end;
            }
            Ok(times)
        })
        .await??
    };
    let window_end = Instant::now();
    let window = (
        reader_counts().since(&window_start.0),
        writer_stats.snapshot().since(&window_start.1),
        commit_count.load(Ordering::Relaxed) - window_start.2,
        window_start.3.elapsed().as_secs_f64(),
    );
    let last = commits.len() as u64 + 1;
    wait_for(|| applied() >= last, "the walcast replica to catch up").await?;
    let counts =
        Counts::observe_with(reader_counts, || writer_stats.snapshot(), plan.idle_for).await;

    let _ = stop_tx.send(());
    let published = publisher.await??;
    replica.await??;
    if let Some((_, task)) = server {
        task.await??;
    }

    let mut visible = vec![None; commits.len()];
    let applied_at = progress
        .applied_at
        .lock()
        .map_err(|_| anyhow!("poisoned"))?;
    for &(first, last, at) in applied_at.iter() {
        for lsn in first.max(2)..=last {
            if let Some(slot) = visible.get_mut(lsn as usize - 2) {
                *slot = Some(at);
            }
        }
    }
    let mut result = counts.result(&commits, &visible)?;
    result.commits = published.commits;
    (
        result.window_reader,
        result.window_writer,
        result.window_commits,
        result.window_secs,
    ) = window;
    let times = commit_times.lock().map_err(|_| anyhow!("poisoned"))?;
    let in_window: Vec<Instant> = times
        .iter()
        .copied()
        .filter(|t| *t >= window_start.3 && *t <= window_end)
        .collect();
    result.commit_gaps_ms = in_window
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).as_secs_f64() * 1e3)
        .collect();
    result.commit_gaps_ms.sort_by(f64::total_cmp);
    Ok(result)
}

async fn wait_for(mut done: impl FnMut() -> bool, what: &str) -> Result<()> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > CATCH_UP_TIMEOUT {
            bail!("timed out after {CATCH_UP_TIMEOUT:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// SlateDB: `Db` (the writer, flushing its WAL every `FLUSH_MS`) and a
/// `DbReader` following the latest state, polling every `POLL_MS`.
///
/// A watcher task finds when each batch becomes visible by reading its key
/// from the reader every millisecond (an in-memory read: the reader has
/// replayed the WAL into its memtable); its detection delay is at most about
/// a millisecond, which the report notes.
pub(crate) async fn slatedb(target: &Target, name: &str, plan: LivePlan) -> Result<LiveResult> {
    let inner = target.object_store()?;
    let writer_stats = Arc::new(RequestStats::default());
    let reader_stats = Arc::new(RequestStats::default());
    let wos: Arc<dyn object_store::ObjectStore> =
        Arc::new(Counting::new(inner.clone(), writer_stats.clone()));
    let ros: Arc<dyn object_store::ObjectStore> =
        Arc::new(Counting::new(inner, reader_stats.clone()));
    let db = Arc::new(
        slatedb::Db::builder(name, wos)
            .with_settings(crate::slate_settings())
            .build()
            .await?,
    );
    // One batch before the timed window, durable, so the reader has a WAL.
    let (k, v) = kv(0);
    db.put(k, v).await?.await_durable().await?;
    let reader = Arc::new(
        slatedb::DbReader::builder(name, ros)
            .with_options(crate::slate_reader_options())
            .with_reader_mode(slatedb::DbReaderMode::FollowLatest)
            .build()
            .await?,
    );

    let written = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let visible: Arc<Mutex<Vec<Option<Instant>>>> = Arc::default();
    let watcher = {
        let (reader, written, done, visible) = (
            reader.clone(),
            written.clone(),
            done.clone(),
            visible.clone(),
        );
        tokio::spawn(async move {
            let mut next = 0u64;
            let start = Instant::now();
            loop {
                let w = written.load(Ordering::Acquire);
                while next < w {
                    let (k, _) = kv(next + 1);
                    if reader.get(&k).await?.is_none() {
                        break;
                    }
                    let now = Instant::now();
                    let mut v = visible.lock().map_err(|_| anyhow!("poisoned"))?;
                    if v.len() <= next as usize {
                        v.resize(next as usize + 1, None);
                    }
                    v[next as usize] = Some(now);
                    next += 1;
                }
                if done.load(Ordering::Acquire) && next >= written.load(Ordering::Acquire) {
                    return Ok::<_, anyhow::Error>(());
                }
                if start.elapsed() > plan.write_for + CATCH_UP_TIMEOUT {
                    bail!("SlateDB reader: batch {next} never became visible");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };

    let start = Instant::now();
    let mut commits = Vec::new();
    let mut n = 0u64;
    while start.elapsed() < plan.write_for {
        tokio::time::sleep_until(due(start, n, plan.rate).into()).await;
        let (k, v) = kv(n + 1);
        db.put(k, v).await?;
        commits.push(Instant::now());
        n += 1;
        written.store(n, Ordering::Release);
    }
    done.store(true, Ordering::Release);
    watcher.await??;
    let counts = Counts::observe(&reader_stats, &writer_stats, plan.idle_for).await;

    reader.close().await?;
    db.close().await?;
    let visible = visible.lock().map_err(|_| anyhow!("poisoned"))?.clone();
    let mut all = vec![None; commits.len()];
    for (slot, v) in all.iter_mut().zip(visible) {
        *slot = v;
    }
    counts.result(&commits, &all)
}
