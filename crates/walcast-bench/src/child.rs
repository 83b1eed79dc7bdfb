//! Work measured in a process of its own, so that its peak RSS is its own:
//! the parent re-runs this binary as `walcast-bench child '<job JSON>'` and
//! reads one JSON line of [`Measured`] from its stdout.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use walcast::counting::{Counting, RequestCounts, RequestStats};

use crate::target::Target;
use crate::{kv, slate_settings};

/// A job for a child process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Job {
    /// walcast: publish the WAL backlog in `wal` to `url` (`publish --once`).
    WalcastPublish {
        /// The local WAL directory.
        wal: PathBuf,
        /// The dataset URL.
        url: String,
    },
    /// walcast: a fresh replica catches up from `url` (`replicate --once`).
    WalcastCatchUp {
        /// The dataset URL.
        url: String,
        /// The replica's (empty) local directory.
        local: PathBuf,
        /// Batches it must end with.
        n: u64,
    },
    /// SlateDB: the writer puts `n` batches and flushes its WAL.
    SlatePublish {
        /// The store.
        target: Target,
        /// The database's path in it.
        path: String,
        /// Batches.
        n: u64,
    },
    /// SlateDB: a fresh `DbReader` opens and reads the newest and oldest key.
    SlateCatchUp {
        /// The store.
        target: Target,
        /// The database's path in it.
        path: String,
        /// Batches written.
        n: u64,
    },
}

/// What a child measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Measured {
    /// Wall time of the job.
    pub(crate) secs: f64,
    /// Wall time to the first read of the newest key (catch-up jobs; for
    /// walcast, whose replica serves reads once it has replayed, the whole job).
    pub(crate) first_secs: f64,
    /// Requests made through the counting store.
    pub(crate) counts: RequestCounts,
    /// The process's peak resident set (VmHWM).
    pub(crate) peak_rss: u64,
}

/// This process's peak resident set size in bytes (Linux `VmHWM`).
pub(crate) fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Runs `job` in a child process and returns what it measured.
pub(crate) fn spawn(job: &Job) -> Result<Measured> {
    let exe = std::env::current_exe()?;
    let out = Command::new(exe)
        .arg("child")
        .arg(serde_json::to_string(job)?)
        .output()
        .context("starting a child process")?;
    if !out.status.success() {
        bail!(
            "child job {job:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.trim())
        .with_context(|| format!("child job {job:?}: unreadable result {line:?}"))
}

/// The child's side: runs the job, prints the result.
pub(crate) fn run(job_json: &str) -> Result<()> {
    let job: Job = serde_json::from_str(job_json).context("bad child job")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let stats = Arc::new(RequestStats::default());
    let start = Instant::now();
    let first = rt.block_on(run_job(&job, stats.clone(), start))?;
    let secs = start.elapsed().as_secs_f64();
    let m = Measured {
        secs,
        first_secs: first.unwrap_or(secs),
        counts: stats.snapshot(),
        peak_rss: peak_rss(),
    };
    println!("{}", serde_json::to_string(&m)?);
    Ok(())
}

/// Runs `job`; returns when (seconds after `started`) the newest key was
/// first readable, for jobs that read it before the end.
async fn run_job(job: &Job, stats: Arc<RequestStats>, started: Instant) -> Result<Option<f64>> {
    let mut first = None;
    match job {
        Job::WalcastPublish { wal, url } => {
            let store = walcast::store::Store::open_counted(url, stats)?;
            let opts = walcast::publish::PublishOptions {
                config: crate::walcast_publisher_config(),
                once: true,
                ..Default::default()
            };
            walcast::publish::publish(wal.clone(), store, opts, std::future::pending(), |_| {})
                .await?;
        }
        Job::WalcastCatchUp { url, local, n } => {
            let store = walcast::store::Store::open_counted(url, stats)?;
            let fetch = walcast::replica::AnyFetch::Store(walcast::replica::StoreFetch::new(store));
            let opts = walcast::replica::ReplicateOptions {
                sink: None,
                interval: Duration::from_millis(100),
                once: true,
                concurrency: 4,
                progress: false,
                trust: Vec::new(),
            };
            let report = walcast::replica::spawn_replicate(
                fetch,
                local.clone(),
                opts,
                std::future::pending(),
            )
            .await??;
            if report.applied_lsn != *n {
                bail!(
                    "walcast replica applied LSN {}, expected {n}",
                    report.applied_lsn
                );
            }
        }
        Job::SlatePublish { target, path, n } => {
            let os: Arc<dyn object_store::ObjectStore> =
                Arc::new(Counting::new(target.object_store()?, stats));
            let db = slatedb::Db::builder(path.as_str(), os)
                .with_settings(slate_settings())
                .build()
                .await?;
            for i in 0..*n {
                let (k, v) = kv(i);
                db.put(k, v).await?;
            }
            // Durable in the store; the writer stays as a live writer would
            // (no close, which would move the WAL into L0 tables).
            db.flush().await?;
        }
        Job::SlateCatchUp { target, path, n } => {
            let os: Arc<dyn object_store::ObjectStore> =
                Arc::new(Counting::new(target.object_store()?, stats));
            let reader = slatedb::DbReader::builder(path.as_str(), os)
                .with_options(crate::slate_reader_options())
                .with_reader_mode(slatedb::DbReaderMode::FollowLatest)
                .build()
                .await?;
            let (k, v) = kv(n - 1);
            match reader.get(&k).await? {
                Some(got) if got.as_ref() == v.as_slice() => {}
                other => bail!(
                    "SlateDB reader: key {} is {:?}, expected the {}-byte value written",
                    String::from_utf8_lossy(&k),
                    other.map(|b| b.len()),
                    v.len()
                ),
            }
            first = Some(started.elapsed().as_secs_f64());
            // Every key, as a walcast replica holds every key once caught up.
            // Fetched as walcast fetches segments: 8 MiB per request, 4 in flight
            // (SlateDB's default reads one 4 KiB block per request, one at a time).
            let scan = slatedb::config::ScanOptions {
                read_ahead_bytes: 8 << 20,
                max_fetch_tasks: 4,
                ..Default::default()
            };
            let mut it = reader
                .scan_with_options::<std::ops::RangeFull>(.., &scan)
                .await?;
            let mut seen = 0u64;
            while let Some(kv_) = it.next().await? {
                let (k, v) = kv(seen);
                if kv_.key.as_ref() != k.as_slice() || kv_.value.as_ref() != v.as_slice() {
                    bail!(
                        "SlateDB reader: entry {seen} is key {}, expected {}",
                        String::from_utf8_lossy(&kv_.key),
                        String::from_utf8_lossy(&k)
                    );
                }
                seen += 1;
            }
            if seen != *n {
                bail!("SlateDB reader: scanned {seen} keys, expected {n}");
            }
            reader.close().await?;
        }
    }
    Ok(first)
}
