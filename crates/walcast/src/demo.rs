//! `walcast demo`: a writer, a publisher to a temporary `file://` dataset,
//! `walcast serve` on it, and a replica over HTTP, on embedded defaults, with
//! live progress and publish-to-visible lag.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use walcast_core::batch::Op;
use walcast_core::publisher::PublisherConfig;

use crate::publish::{publish, PublishOptions};
use crate::replica::{spawn_replicate, AnyFetch, Progress, ReplicateOptions};

/// Runs the demo until `duration` passes or Ctrl-C.
pub async fn demo(duration: Option<Duration>, rate: u64) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let wal = tmp.path().join("wal");
    let data = tmp.path().join("dataset");
    let local = tmp.path().join("replica");
    std::fs::create_dir_all(&data)?;
    let url = url::Url::from_directory_path(&data).map_err(|()| anyhow!("bad temp path"))?;
    println!(
        "walcast demo: WAL {}  dataset {url}  replica {}",
        wal.display(),
        local.display()
    );

    // Writer: `rate` batches a second, commit times kept for lag.
    let writer = Arc::new(crate::wal::Writer::open(&wal)?);
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let commit_times: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let wthread = {
        let (writer, stop, written, times) = (
            writer.clone(),
            stop.clone(),
            written.clone(),
            commit_times.clone(),
        );
        std::thread::spawn(move || -> Result<()> {
            let start = Instant::now();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let due = start + Duration::from_micros(n * 1_000_000 / rate.max(1));
                if let Some(d) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
                let key = format!("user:{:04}", n % 1000);
                let value = format!("{{\"visits\":{n},\"at\":{}}}", crate::publish::now_ms());
                let lsn = writer.commit(&[Op::put(key, value)])?;
                times
                    .lock()
                    .map_err(|_| anyhow!("poisoned"))?
                    .push(Instant::now());
                written.store(lsn, Ordering::Relaxed);
                n += 1;
            }
            Ok(())
        })
    };

    let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let stopped = |tx: &tokio::sync::broadcast::Sender<()>| {
        let mut rx = tx.subscribe();
        async move {
            let _ = rx.recv().await;
        }
    };

    // Publisher.
    let store = crate::store::Store::open(url.as_str())?;
    let committed = Arc::new(AtomicU64::new(0));
    let publisher = {
        let committed = committed.clone();
        let opts = PublishOptions {
            config: PublisherConfig {
                flush_interval_ms: 100,
                segment_bytes: 1 << 20,
                snapshot_every: Some(20_000),
                retain_lsns: Some(50_000),
                grace_ms: 10_000,
                ..PublisherConfig::default()
            },
            ..PublishOptions::default()
        };
        let stop = stopped(&stop_tx);
        tokio::spawn(publish(wal.clone(), store, opts, stop, move |lsn| {
            committed.store(lsn, Ordering::Relaxed)
        }))
    };

    // walcast serve.
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let server = {
        let stop = stopped(&stop_tx);
        let root = data.clone();
        tokio::spawn(async move {
            crate::serve::serve(
                root,
                "127.0.0.1:0".parse().expect("address"),
                move |a| {
                    let _ = addr_tx.send(a);
                },
                stop,
            )
            .await
        })
    };
    let addr = addr_rx
        .await
        .map_err(|_| anyhow!("walcast serve did not start"))?;
    let http = format!("http://{addr}");
    println!("walcast demo: serving the dataset at {http}/catalog/head.json");

    // Replica over HTTP.
    let progress = Arc::new(Progress::default());
    let replica = {
        let opts = ReplicateOptions {
            interval: Duration::from_millis(100),
            once: false,
            concurrency: 4,
            progress: false,
            sink: Some(progress.clone()),
            trust: Vec::new(),
        };
        spawn_replicate(
            AnyFetch::for_url(&http)?,
            local.clone(),
            opts,
            stopped(&stop_tx),
        )
    };

    // Live progress until Ctrl-C or the duration.
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let deadline = async {
        match duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let w = written.load(Ordering::Relaxed);
                let c = committed.load(Ordering::Relaxed);
                let a = progress.applied.load(Ordering::Relaxed);
                // Lag of the newest applied batch: its commit time to now.
                let lag = if a > 0 {
                    commit_times.lock().ok().and_then(|t| t.get(a as usize - 1).map(|i| i.elapsed().as_millis() as u64))
                } else {
                    None
                };
                println!(
                    "[{:>5.1}s] written LSN {w:>7} | published LSN {c:>7} | replica applied LSN {a:>7} | behind {:>5} batches | lag {}",
                    started.elapsed().as_secs_f64(),
                    w.saturating_sub(a),
                    lag.map_or("-".to_string(), |l| format!("{l} ms")),
                );
            }
            () = &mut deadline => break,
            _ = &mut ctrl_c => { println!("walcast demo: Ctrl-C, stopping"); break; }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(());
    wthread
        .join()
        .map_err(|_| anyhow!("writer thread panicked"))??;
    let p = publisher.await?;
    let r = replica.await?;
    server.await??;
    let p = p?;
    let r = r?;
    // Stopped before the replica applied anything: an empty state.
    let l = if local.join("state.wsnap").exists() {
        crate::replica::load(&local)?
    } else {
        crate::replica::Local::default()
    };
    // Publish-to-visible lag of every batch: its commit at the writer to its
    // apply at the replica.
    let mut lags: Vec<u64> = Vec::new();
    {
        let times = commit_times.lock().map_err(|_| anyhow!("poisoned"))?;
        let applied = progress
            .applied_at
            .lock()
            .map_err(|_| anyhow!("poisoned"))?;
        for &(first, last, at) in applied.iter() {
            for lsn in first..=last {
                if let Some(c) = times.get(lsn as usize - 1) {
                    lags.push(at.saturating_duration_since(*c).as_millis() as u64);
                }
            }
        }
    }
    lags.sort_unstable();
    let pct = |q: f64| {
        lags.get(((lags.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(0)
    };
    println!(
        "walcast demo: wrote {} batches; published up to LSN {} (epoch {}, {} commits); replica applied LSN {} holding {} keys ({} GETs)",
        written.load(Ordering::Relaxed),
        p.committed_lsn,
        p.epoch,
        p.commits,
        r.applied_lsn,
        l.state.len(),
        r.requests,
    );
    println!(
        "walcast demo: publish-to-visible lag over {} batches (flush interval 100 ms, poll 100 ms): p50 {} ms, p99 {} ms, max {} ms",
        lags.len(),
        pct(0.5),
        pct(0.99),
        lags.last().copied().unwrap_or(0)
    );
    Ok(())
}
