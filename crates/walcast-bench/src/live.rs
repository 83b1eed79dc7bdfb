//! The live scenarios, one system at a time: a writer commits small batches
//! at a steady rate while a reader follows (**lag**: commit at the writer to
//! visible at the reader); then nothing is written and the caught-up reader's
//! requests are counted (**idle cost**).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use walcast::counting::{Counting, RequestCounts, RequestStats};
use walcast_core::batch::Op;

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
        let (r0, w0, t0) = (reader.snapshot(), writer.snapshot(), Instant::now());
        tokio::time::sleep(idle_for).await;
        let (r1, w1) = (reader.snapshot(), writer.snapshot());
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
            commits: 0,
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

/// walcast: `Writer` → `publish` → store → native replica, in this process.
pub(crate) async fn walcast(
    target: &Target,
    name: &str,
    plan: LivePlan,
    min_commit_interval_ms: u64,
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

    let publisher = {
        let store = walcast::store::Store::open_counted(&url, writer_stats.clone())?;
        let opts = walcast::publish::PublishOptions {
            config: walcast_core::publisher::PublisherConfig {
                min_commit_interval_ms,
                ..crate::walcast_publisher_config()
            },
            ..Default::default()
        };
        tokio::spawn(walcast::publish::publish(
            wal.clone(),
            store,
            opts,
            stopped(&stop_tx),
            |_| {},
        ))
    };
    let progress = Arc::new(walcast::replica::Progress::default());
    let replica = {
        let store = walcast::store::Store::open_counted(&url, reader_stats.clone())?;
        let fetch = walcast::replica::AnyFetch::Store(walcast::replica::StoreFetch::new(store));
        let opts = walcast::replica::ReplicateOptions {
            sink: Some(progress.clone()),
            interval: Duration::from_millis(POLL_MS),
            once: false,
            concurrency: 4,
            progress: false,
            trust: Vec::new(),
        };
        walcast::replica::spawn_replicate(fetch, local.clone(), opts, stopped(&stop_tx))
    };
    let applied = || progress.applied.load(Ordering::Relaxed);
    wait_for(|| applied() >= 1, "the walcast replica to apply LSN 1").await?;

    // The timed window: batch i (0-based) gets LSN i + 2.
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
                let (k, v) = kv(n + 1);
                writer.commit(&[Op::put(k, v)])?;
                times.push(Instant::now());
                n += 1;
            }
            Ok(times)
        })
        .await??
    };
    let last = commits.len() as u64 + 1;
    wait_for(|| applied() >= last, "the walcast replica to catch up").await?;
    let counts = Counts::observe(&reader_stats, &writer_stats, plan.idle_for).await;

    let _ = stop_tx.send(());
    let published = publisher.await??;
    replica.await??;

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
