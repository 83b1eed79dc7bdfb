//! `walcast-bench`: walcast side by side with SlateDB's reader, and with the
//! physical limit, on the same work, in the same run, on the same object
//! stores (`file://` and moto's S3 server), every request counted by the
//! same `object_store` wrapper (`walcast::counting::Counting`).
//!
//! ```sh
//! cargo run --release -p walcast-bench -- --quick     # CI: every scenario, small sizes
//! cargo run --release -p walcast-bench                # full mode, report in target/bench/
//! ```
//!
//! Scenarios: `lag` (and `idle`, measured on the same live pair), `catchup`
//! (with `publisher`, on the same backlog) and `replay`. See
//! `docs/BENCHMARKS.md`.

mod child;
mod cost;
mod live;
mod replay;
mod report;
mod target;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use clap::Parser;
use walcast_core::batch::{self, Op};
use walcast_core::publisher::PublisherConfig;

use crate::child::{Job, Measured};
use crate::live::{LivePlan, LiveResult, Via, WalcastSetup};
use crate::replay::ReplayResult;
use crate::target::{Moto, Target};

/// Both writers' flush interval (SlateDB's `flush_interval`, walcast's
/// `--flush-interval`).
pub(crate) const FLUSH_MS: u64 = 100;
/// Both readers' poll interval (SlateDB's `manifest_poll_interval`,
/// walcast's `--interval`).
pub(crate) const POLL_MS: u64 = 100;
/// Value bytes of every put.
pub(crate) const VALUE_LEN: usize = 100;

/// Batch `i` of every scenario: one put of a 12-byte key and a 100-byte value.
pub(crate) fn kv(i: u64) -> (Vec<u8>, Vec<u8>) {
    let key = format!("key:{i:08}").into_bytes();
    let mut value = vec![b'v'; VALUE_LEN];
    let tag = format!("{i}");
    value[..tag.len()].copy_from_slice(tag.as_bytes());
    (key, value)
}

/// walcast's publisher as `walcast publish --flush-interval 100ms` runs it.
pub(crate) fn walcast_publisher_config() -> PublisherConfig {
    PublisherConfig {
        flush_interval_ms: FLUSH_MS,
        ..PublisherConfig::default()
    }
}

/// The live scenario runs walcast a second time with commits at least this
/// far apart (`walcast publish --min-commit-interval 100ms`): at most as many
/// commits a second as SlateDB's flushes.
pub(crate) const SPACED_COMMIT_MS: u64 = FLUSH_MS;

/// The live tail over HTTP (`file://` only): `walcast serve` on the
/// dataset, woken by each commit, and a replica reading it over HTTP, each
/// with the commit budget and head reads named.
pub(crate) const HTTP_SETUPS: [(&str, Option<u32>, bool); 4] = [
    (
        "long-poll, default budget (10 commits/s, burst 2)",
        None,
        true,
    ),
    ("long-poll, `--max-commit-rate 50`", Some(50), true),
    (
        "long-poll, `--max-commit-rate 0` (commit whenever data waits)",
        Some(0),
        true,
    ),
    ("polling every 100 ms, default budget", None, false),
];

/// SlateDB's writer: its defaults with the shared flush interval.
pub(crate) fn slate_settings() -> slatedb::Settings {
    slatedb::Settings {
        flush_interval: Some(Duration::from_millis(FLUSH_MS)),
        ..slatedb::Settings::default()
    }
}

/// SlateDB's reader: its defaults with the shared poll interval.
pub(crate) fn slate_reader_options() -> slatedb::config::DbReaderOptions {
    slatedb::config::DbReaderOptions {
        manifest_poll_interval: Duration::from_millis(POLL_MS),
        ..Default::default()
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "walcast-bench",
    about = "walcast benchmarks side by side with SlateDB's reader and the physical limit"
)]
struct Cli {
    /// Small sizes (CI: under two minutes); checks only that every scenario produced a number.
    #[arg(long)]
    quick: bool,
    /// Where the report (report.md, lag.svg, results.json) goes.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Stores to run on: file, s3 (moto's S3 server; needs `bash scripts/e2e-deps.sh`).
    #[arg(long, value_delimiter = ',', default_values_t = ["file".to_string(), "s3".to_string()])]
    stores: Vec<String>,
    /// Override the live scenario's length.
    #[arg(long, value_parser = parse_secs)]
    lag_secs: Option<u64>,
    /// Override the catch-up backlog (batches).
    #[arg(long)]
    batches: Option<u64>,
    /// Only the cost scenario: requests and dollars per hour with every
    /// default, at 1, 100 and 1,000 batches/s (report in `--out`/cost.md).
    #[arg(long)]
    cost: bool,
    /// Seconds each rate of the cost scenario writes (default 30, quick 5).
    #[arg(long, value_parser = parse_secs)]
    cost_secs: Option<u64>,
    #[command(subcommand)]
    child: Option<ChildCmd>,
}

#[derive(clap::Subcommand, Debug)]
enum ChildCmd {
    /// Internal: run one measured job (JSON) and print what it measured.
    #[command(hide = true)]
    Child { job: String },
}

fn parse_secs(s: &str) -> Result<u64, String> {
    s.trim_end_matches('s')
        .parse()
        .map_err(|e| format!("{s:?}: {e}"))
}

/// Sizes of one run.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub(crate) struct Plan {
    /// Quick (CI) or full mode.
    pub(crate) quick: bool,
    /// Live scenario: batches a second.
    pub(crate) rate: u64,
    /// Live scenario: seconds of writing.
    pub(crate) lag_secs: u64,
    /// Idle scenario: seconds watched.
    pub(crate) idle_secs: u64,
    /// Catch-up and publisher: batches in the backlog.
    pub(crate) batches: u64,
    /// Replay limit: records in the segment.
    pub(crate) replay_records: u64,
}

/// Everything measured on one store.
#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct StoreRun {
    /// `file://` or `s3:// (moto)`.
    pub(crate) label: String,
    /// walcast's live run.
    pub(crate) live_walcast: Option<LiveResult>,
    /// SlateDB's live run.
    pub(crate) live_slatedb: Option<LiveResult>,
    /// walcast's live run with `--min-commit-interval` [`SPACED_COMMIT_MS`].
    pub(crate) live_walcast_spaced: Option<LiveResult>,
    /// walcast's live runs over HTTP ([`HTTP_SETUPS`]; `file://` only).
    pub(crate) live_http: Vec<HttpRun>,
    /// walcast's local WAL write of the backlog (not a store operation).
    pub(crate) write_walcast_secs: Option<f64>,
    /// WAL bytes of the walcast backlog.
    pub(crate) wal_bytes: u64,
    /// walcast `publish --once` of the backlog.
    pub(crate) publish_walcast: Option<Measured>,
    /// SlateDB's writer putting the backlog and flushing.
    pub(crate) publish_slatedb: Option<Measured>,
    /// A fresh walcast replica catching up the backlog.
    pub(crate) catchup_walcast: Option<Measured>,
    /// A fresh SlateDB reader catching up the backlog.
    pub(crate) catchup_slatedb: Option<Measured>,
}

/// One walcast live run with its replica on `walcast serve` over HTTP.
#[derive(Debug, serde::Serialize)]
pub(crate) struct HttpRun {
    /// What the report calls it.
    pub(crate) label: String,
    /// How it was set up.
    pub(crate) setup: WalcastSetup,
    /// What it measured.
    pub(crate) result: LiveResult,
}

/// The whole run.
#[derive(Debug, serde::Serialize)]
pub(crate) struct Results {
    /// The sizes.
    pub(crate) plan: Plan,
    /// The machine it ran on.
    pub(crate) machine: String,
    /// Per store.
    pub(crate) stores: Vec<StoreRun>,
    /// The replay limit (in memory, store-independent).
    pub(crate) replay: Option<ReplayResult>,
    /// Scenarios that failed, with why.
    pub(crate) failures: Vec<String>,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or_else(String::new, |kb| {
            format!(", {:.0} GiB", kb as f64 / 1024.0 / 1024.0)
        });
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    format!("{cores} cores ({cpu}){mem}, Linux {kernel}")
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match &cli.child {
        Some(ChildCmd::Child { job }) => child::run(job),
        None => bench(&cli),
    };
    if let Err(e) = r {
        eprintln!("walcast-bench: error: {e:#}");
        std::process::exit(1);
    }
}

fn say(msg: impl AsRef<str>) {
    eprintln!("bench: {}", msg.as_ref());
}

fn bench(cli: &Cli) -> Result<()> {
    let plan = if cli.quick {
        Plan {
            quick: true,
            rate: 1000,
            lag_secs: cli.lag_secs.unwrap_or(4),
            idle_secs: 5,
            batches: cli.batches.unwrap_or(50_000),
            replay_records: 100_000,
        }
    } else {
        Plan {
            quick: false,
            rate: 1000,
            lag_secs: cli.lag_secs.unwrap_or(30),
            idle_secs: 60,
            batches: cli.batches.unwrap_or(1_000_000),
            replay_records: 500_000,
        }
    };
    let root = workspace_root();
    let started = Instant::now();
    std::fs::create_dir_all(&cli.out).with_context(|| format!("creating {}", cli.out.display()))?;
    let tmp = tempfile::tempdir()?;

    // Moto first: it sets the AWS_* environment before any thread starts.
    let mut targets = Vec::new();
    let mut _moto = None;
    for s in &cli.stores {
        match s.as_str() {
            "file" => targets.push(Target::File {
                root: tmp.path().join("store"),
            }),
            "s3" => {
                let m = Moto::start(&root)?;
                targets.push(m.bucket("walcast-bench")?);
                _moto = Some(m);
            }
            other => return Err(anyhow!("unknown store {other:?} (use file, s3)")),
        }
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if cli.cost {
        let secs = cli.cost_secs.unwrap_or(if cli.quick { 5 } else { 30 });
        let mut runs = Vec::new();
        let mut failed = Vec::new();
        for t in &targets {
            say(format!(
                "{} cost: every default, {:?} batches/s, {secs} s each",
                t.label(),
                cost::RATES
            ));
            for r in rt.block_on(cost::run(t, secs)) {
                match r {
                    Ok(r) => {
                        say(format!(
                            "  {} batches/s: {} commits, writer {} requests, reader {} in {:.1} s",
                            r.rate,
                            r.commits,
                            r.writer.requests(),
                            r.reader.requests(),
                            r.secs
                        ));
                        runs.push(r);
                    }
                    Err(e) => {
                        say(format!("  FAILED: {e:#}"));
                        failed.push(format!("{} cost: {e:#}", t.label()));
                    }
                }
            }
        }
        drop(rt);
        let md = cost::write(&cli.out, &runs, &machine(), secs)?;
        println!("{md}");
        say(format!("report: {}", cli.out.join("cost.md").display()));
        if !failed.is_empty() {
            return Err(anyhow!(
                "{} cost run(s) failed: {}",
                failed.len(),
                failed.join("; ")
            ));
        }
        return Ok(());
    }
    let mut results = Results {
        plan,
        machine: machine(),
        stores: Vec::new(),
        replay: None,
        failures: Vec::new(),
    };
    let live_plan = LivePlan {
        rate: plan.rate,
        write_for: Duration::from_secs(plan.lag_secs),
        idle_for: Duration::from_secs(plan.idle_secs),
    };
    for t in &targets {
        let mut run = StoreRun {
            label: t.label().to_string(),
            ..Default::default()
        };
        let mut fail = |what: &str, e: anyhow::Error| {
            say(format!("{} {what}: FAILED: {e:#}", t.label()));
            results
                .failures
                .push(format!("{} {what}: {e:#}", t.label()));
        };

        say(format!(
            "{} lag + idle, walcast: {} batches/s for {} s, then {} s idle",
            t.label(),
            plan.rate,
            plan.lag_secs,
            plan.idle_secs
        ));
        match rt.block_on(live::walcast(t, "walcast-live", live_plan, 0)) {
            Ok(r) => {
                say(format!("  walcast: {}", live_summary(&r)));
                run.live_walcast = Some(r);
            }
            Err(e) => fail("lag/idle walcast", e),
        }
        say(format!(
            "{} lag, walcast with --min-commit-interval {SPACED_COMMIT_MS}ms",
            t.label()
        ));
        let spaced_plan = LivePlan {
            idle_for: Duration::from_secs(1),
            ..live_plan
        };
        match rt.block_on(live::walcast(
            t,
            "walcast-live-spaced",
            spaced_plan,
            SPACED_COMMIT_MS,
        )) {
            Ok(r) => {
                say(format!("  walcast (spaced): {}", live_summary(&r)));
                run.live_walcast_spaced = Some(r);
            }
            Err(e) => fail("lag walcast --min-commit-interval", e),
        }
        if matches!(t, Target::File { .. }) {
            for (i, (label, rate, long_poll)) in HTTP_SETUPS.iter().enumerate() {
                say(format!("{} lag over HTTP, walcast: {label}", t.label()));
                let setup = WalcastSetup {
                    max_commits_per_sec: *rate,
                    via: Via::Serve {
                        long_poll: *long_poll,
                    },
                    ..WalcastSetup::store(0)
                };
                // The first setup also measures the idle replica; quick
                // mode writes for less time over HTTP.
                let http_plan = LivePlan {
                    write_for: if plan.quick {
                        Duration::from_secs(2)
                    } else {
                        live_plan.write_for
                    },
                    idle_for: if i == 0 {
                        live_plan.idle_for
                    } else {
                        Duration::from_secs(1)
                    },
                    ..live_plan
                };
                match rt.block_on(live::walcast_with(
                    t,
                    &format!("walcast-http-{i}"),
                    http_plan,
                    setup,
                )) {
                    Ok(r) => {
                        say(format!("  walcast ({label}): {}", live_summary(&r)));
                        run.live_http.push(HttpRun {
                            label: label.to_string(),
                            setup,
                            result: r,
                        });
                    }
                    Err(e) => fail(&format!("lag over HTTP walcast ({label})"), e),
                }
            }
        }
        say(format!("{} lag + idle, SlateDB", t.label()));
        match rt.block_on(live::slatedb(t, "slatedb-live", live_plan)) {
            Ok(r) => {
                say(format!("  SlateDB: {}", live_summary(&r)));
                run.live_slatedb = Some(r);
            }
            Err(e) => fail("lag/idle SlateDB", e),
        }

        say(format!(
            "{} publisher + catch-up, walcast: {} batches",
            t.label(),
            plan.batches
        ));
        match offline_walcast(t, plan.batches, tmp.path(), &mut run) {
            Ok(()) => {}
            Err(e) => fail("publisher/catch-up walcast", e),
        }
        say(format!("{} publisher + catch-up, SlateDB", t.label()));
        match offline_slatedb(t, plan.batches, &mut run) {
            Ok(()) => {}
            Err(e) => fail("publisher/catch-up SlateDB", e),
        }
        results.stores.push(run);
    }
    drop(rt);

    say(format!(
        "replay limit: {} records in memory, native and wasm (Node)",
        plan.replay_records
    ));
    match replay::run(&root, plan.replay_records, tmp.path()) {
        Ok(r) => {
            if let Some(m) = &r.wasm_missing {
                results.failures.push(format!("replay limit wasm: {m}"));
            }
            results.replay = Some(r);
        }
        Err(e) => results.failures.push(format!("replay limit: {e:#}")),
    }

    let missing = report::missing(&results);
    report::write(&cli.out, &results, started.elapsed())?;
    say(format!(
        "report: {} ({} s)",
        cli.out.join("report.md").display(),
        started.elapsed().as_secs()
    ));
    if !results.failures.is_empty() || !missing.is_empty() {
        for f in results.failures.iter().chain(&missing) {
            eprintln!("walcast-bench: no figure: {f}");
        }
        return Err(anyhow!(
            "{} scenario figure(s) missing",
            results.failures.len() + missing.len()
        ));
    }
    Ok(())
}

fn say_measured(what: &str, m: &Measured) {
    say(format!(
        "  {what}: {:.2} s, {} requests, peak RSS {:.0} MB",
        m.secs,
        m.counts.requests(),
        m.peak_rss as f64 / 1e6
    ));
}

fn live_summary(r: &LiveResult) -> String {
    let p = |q| report::percentile(&r.lags_ms, q);
    let gaps = if r.commit_gaps_ms.is_empty() {
        String::new()
    } else {
        let g = |q| report::percentile(&r.commit_gaps_ms, q);
        format!(
            "; {} commits, gap p50 {:.0} ms p99 {:.0} ms max {:.0} ms",
            r.commits,
            g(0.5),
            g(0.99),
            g(1.0)
        )
    };
    format!(
        "{} batches, lag p50 {:.0} ms p99 {:.0} ms; idle {} reader requests in {:.0} s{gaps}",
        r.written,
        p(0.5),
        p(0.99),
        r.idle_reader.requests(),
        r.idle_secs
    )
}

/// walcast's backlog: `n` batches committed to a local WAL in groups, then
/// `publish --once` (child), then a fresh replica (child).
fn offline_walcast(t: &Target, n: u64, tmp: &Path, run: &mut StoreRun) -> Result<()> {
    let wal = tmp.join(format!("wal-{}", t.key()));
    let start = Instant::now();
    {
        let writer = walcast::wal::Writer::open(&wal)?;
        let mut i = 0;
        while i < n {
            let end = (i + 10_000).min(n);
            let payloads = (i..end)
                .map(|j| {
                    let (k, v) = kv(j);
                    batch::encode(&[Op::put(k, v)]).map_err(|e| anyhow!("{e}"))
                })
                .collect::<Result<Vec<_>>>()?;
            let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            writer.commit_many(&refs)?;
            i = end;
        }
    }
    run.write_walcast_secs = Some(start.elapsed().as_secs_f64());
    run.wal_bytes = std::fs::metadata(walcast::wal::log_path(&wal))?.len();
    let url = t.walcast_url("walcast-backlog")?;
    let p = child::spawn(&Job::WalcastPublish {
        wal: wal.clone(),
        url: url.clone(),
    })?;
    say_measured("walcast publish", &p);
    run.publish_walcast = Some(p);
    let c = child::spawn(&Job::WalcastCatchUp {
        url,
        local: tmp.join(format!("replica-{}", t.key())),
        n,
    })?;
    say_measured("walcast catch-up", &c);
    run.catchup_walcast = Some(c);
    let _ = std::fs::remove_dir_all(&wal);
    Ok(())
}

/// SlateDB's backlog: the writer puts `n` batches and flushes (child), then a
/// fresh reader opens (child).
fn offline_slatedb(t: &Target, n: u64, run: &mut StoreRun) -> Result<()> {
    let path = "slatedb-backlog".to_string();
    let p = child::spawn(&Job::SlatePublish {
        target: t.clone(),
        path: path.clone(),
        n,
    })?;
    say_measured("SlateDB put + flush", &p);
    run.publish_slatedb = Some(p);
    let c = child::spawn(&Job::SlateCatchUp {
        target: t.clone(),
        path,
        n,
    })?;
    say_measured("SlateDB catch-up", &c);
    run.catchup_slatedb = Some(c);
    Ok(())
}
