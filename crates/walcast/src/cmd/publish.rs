//! `walcast publish`: the embedding handle (`walcast::Publisher`) run from
//! its flags, with metrics and `--serve` beside it.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use walcast::publish::PublishOptions;
use walcast_core::publisher::PublisherConfig;

use super::args::{Cli, HeadEncoding, PublishArgs};
use super::ctrl_c;

/// Runs `walcast publish` until `--once` is done, the publisher fails or Ctrl-C.
pub(crate) async fn publish(args: PublishArgs) -> Result<ExitCode> {
    let PublishArgs {
        wal,
        to,
        flush_interval,
        min_commit_interval,
        max_commit_rate,
        commit_burst,
        tail_bytes,
        metrics_addr,
        segment_bytes,
        snapshot_every,
        snapshot_bytes,
        snapshot_ratio,
        delta_every,
        delta_bytes,
        pointer_deltas,
        retain,
        signing_key,
        previous_key,
        drop_signature,
        verified_blocks,
        head_encoding,
        grace,
        once,
        serve,
    } = args;
    // Flags that act only with snapshots: refused without them,
    // rather than accepted and ignored.
    if snapshot_every == 0 {
        let needs = [
            ("--snapshot-bytes", snapshot_bytes.is_some()),
            ("--snapshot-ratio", snapshot_ratio.is_some()),
            ("--delta-every", delta_every > 0),
            ("--delta-bytes", delta_bytes.is_some()),
            ("--pointer-deltas", pointer_deltas),
            ("--retain", retain.is_some()),
        ];
        if let Some((flag, _)) = needs.iter().find(|(_, set)| *set) {
            use clap::CommandFactory as _;
            Cli::command()
                .error(
                    clap::error::ErrorKind::ArgumentConflict,
                    format!("{flag} needs snapshots: it has no effect with --snapshot-every 0"),
                )
                .exit();
        }
    }
    if pointer_deltas && delta_every == 0 && delta_bytes.is_none() {
        use clap::CommandFactory as _;
        Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--pointer-deltas needs --delta-every or --delta-bytes: it has no effect without deltas",
            )
            .exit();
    }
    let most = walcast_core::publisher::MAX_SEGMENT_SEAL_BYTES;
    if segment_bytes > most {
        bail!("--segment-bytes {segment_bytes} is above the limit of {most} bytes");
    }
    let opts = PublishOptions {
        config: PublisherConfig {
            segment_bytes,
            flush_interval_ms: flush_interval.as_millis() as u64,
            min_commit_interval_ms: min_commit_interval.as_millis() as u64,
            max_commits_per_sec: max_commit_rate,
            commit_burst,
            tail_bytes: tail_bytes.min(walcast_core::catalog::MAX_TAIL_BYTES as u64) as usize,
            snapshot_every: (snapshot_every > 0).then_some(snapshot_every),
            delta_every: (delta_every > 0).then_some(delta_every),
            snapshot_bytes: snapshot_bytes.filter(|&b| b > 0),
            snapshot_ratio_percent: snapshot_ratio.map(|r| (r * 100.0).round() as u32),
            delta_bytes: delta_bytes.filter(|&b| b > 0),
            pointer_deltas,
            retain_lsns: retain,
            grace_ms: grace.as_millis() as u64,
            signing_key: signing_key
                .as_deref()
                .map(walcast::keyfile::read_secret_key)
                .transpose()?,
            previous_key: previous_key
                .as_deref()
                .map(walcast::keyfile::read_secret_key)
                .transpose()?,
            drop_signature,
            snapshot_format: if verified_blocks {
                walcast_core::publisher::SnapshotFormat::Verified(Default::default())
            } else {
                Default::default()
            },
            head_gzip: head_encoding == HeadEncoding::Gzip,
            ..PublisherConfig::default()
        },
        once,
        ..PublishOptions::default()
    };
    // The same handle apps embed: Ctrl-C publishes what the WAL made
    // durable, then stops.
    let mut publisher = match metrics_addr {
        None => walcast::Publisher::spawn(&wal, &to, opts)?,
        Some(addr) => {
            let stats = std::sync::Arc::new(walcast::counting::RequestStats::default());
            let store = walcast::store::Store::open_counted(&to, stats.clone())?;
            let publisher = walcast::Publisher::spawn_on(&wal, store, opts);
            let m = std::sync::Arc::new(walcast::metrics::PublisherMetrics::new(stats));
            let mut commits = publisher.commits();
            let mc = m.clone();
            tokio::spawn(async move {
                while commits.changed().await.is_ok() {
                    let lsn = *commits.borrow();
                    mc.committed(lsn);
                }
            });
            let bound =
                walcast::metrics::serve(addr, std::sync::Arc::new(move || m.encode())).await?;
            eprintln!("walcast publish: metrics at http://{bound}/metrics");
            publisher
        }
    };
    let server = match serve {
        Some(addr) => Some(serve_while_publishing(&to, addr, publisher.commits()).await?),
        None => None,
    };
    let ended = tokio::select! {
        r = publisher.finished() => Some(r),
        () = ctrl_c() => None,
    };
    let report = match ended {
        Some(r) => r?,
        None => publisher.stop().await?,
    };
    eprintln!(
        "walcast publish: epoch {}, committed LSN {}, {} commits",
        report.epoch, report.committed_lsn, report.commits
    );
    if let Some((stop, task)) = server {
        let _ = stop.send(());
        task.await.context("walcast publish --serve")??;
    }
    Ok(ExitCode::SUCCESS)
}

type ServerTask = (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<()>>,
);

/// `walcast publish --serve ADDR`: serves the file:// dataset at `to` on
/// `addr` (as `walcast serve` with its defaults), waking held head requests
/// at each commit; returns once listening, with what stops it.
async fn serve_while_publishing(
    to: &str,
    addr: SocketAddr,
    mut commits: tokio::sync::watch::Receiver<u64>,
) -> Result<ServerTask> {
    let root = url::Url::parse(to)
        .ok()
        .filter(|u| u.scheme() == "file")
        .and_then(|u| u.to_file_path().ok())
        .ok_or_else(|| anyhow::anyhow!("--serve needs a file:// dataset, not {to}"))?;
    let signal = walcast::longpoll::HeadSignal::new();
    let opts = walcast::serve::ServeOptions {
        head_signal: Some(signal.clone()),
        ..walcast::serve::ServeOptions::default()
    };
    tokio::spawn(async move {
        while commits.changed().await.is_ok() {
            signal.notify();
        }
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(walcast::serve::serve_with(
        root,
        addr,
        opts,
        move |a| {
            println!("walcast serve: listening on http://{a}");
            let _ = std::io::stdout().flush();
            let _ = bound_tx.send(());
        },
        async move {
            let _ = stopped.await;
        },
    ));
    if bound_rx.await.is_err() {
        // It ended before listening: say why.
        task.await.context("walcast publish --serve")??;
        anyhow::bail!("walcast publish --serve: the server stopped");
    }
    Ok((stop, task))
}
