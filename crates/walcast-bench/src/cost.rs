//! The cost scenario (`walcast-bench --cost`): what following a dataset
//! costs in requests, with every default of `walcast publish` and `walcast
//! replicate` (commit budget, flush interval, head tail, 1 s poll), at 1, 100
//! and 1,000 batches a second. Requests are counted in a timed window (no
//! start-up, no catch-up) and scaled to an hour, then priced on the list
//! prices of S3, R2 and GCS.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use walcast::counting::RequestCounts;
use walcast_core::publisher::PublisherConfig;

use crate::live::{self, LivePlan, WalcastSetup};
use crate::target::Target;

/// Batches a second of each run.
pub(crate) const RATES: [u64; 3] = [1, 100, 1_000];

/// `walcast replicate`'s default `--interval`.
const REPLICA_POLL_MS: u64 = 1_000;

/// One store's request prices, dollars per 1,000 requests.
struct Prices {
    name: &'static str,
    /// PUT, POST, LIST, copy (S3 "PUT, COPY, POST, LIST", R2 Class A, GCS Class A).
    write: f64,
    /// GET, HEAD (S3 "GET, SELECT", R2 Class B, GCS Class B).
    read: f64,
}

/// List prices (standard storage class, first tier), per 1,000 requests.
/// DELETEs are free on all three.
const PRICES: [Prices; 3] = [
    Prices {
        name: "S3",
        write: 0.005,
        read: 0.0004,
    },
    Prices {
        name: "R2",
        write: 0.0045,
        read: 0.00036,
    },
    Prices {
        name: "GCS",
        write: 0.005,
        read: 0.0004,
    },
];

/// One rate on one store.
#[derive(Debug, serde::Serialize)]
pub(crate) struct CostRun {
    /// The store's label.
    pub(crate) store: String,
    /// Batches a second written.
    pub(crate) rate: u64,
    /// Batches written in the window.
    pub(crate) batches: u64,
    /// The timed window, seconds.
    pub(crate) secs: f64,
    /// Head commits in the window.
    pub(crate) commits: u64,
    /// The publisher's requests in the window.
    pub(crate) writer: RequestCounts,
    /// One following replica's requests in the window.
    pub(crate) reader: RequestCounts,
}

impl CostRun {
    fn per_hour(&self, n: u64) -> f64 {
        n as f64 * 3600.0 / self.secs.max(1e-9)
    }

    /// Class A (writes, lists, copies) and class B (reads) requests an hour.
    fn classes(&self, c: &RequestCounts) -> (f64, f64) {
        (
            self.per_hour(c.puts + c.lists + c.others),
            self.per_hour(c.gets),
        )
    }
}

/// Runs every rate on `target` for `secs` each.
pub(crate) async fn run(target: &Target, secs: u64) -> Vec<Result<CostRun>> {
    let mut out = Vec::new();
    for rate in RATES {
        let setup = WalcastSetup {
            flush_ms: PublisherConfig::default().flush_interval_ms,
            poll_ms: REPLICA_POLL_MS,
            ..WalcastSetup::store(0)
        };
        let plan = LivePlan {
            rate,
            write_for: Duration::from_secs(secs),
            idle_for: Duration::from_millis(100),
        };
        let r = live::walcast_with(target, &format!("walcast-cost-{rate}"), plan, setup)
            .await
            .map(|l| CostRun {
                store: target.label().to_string(),
                rate,
                batches: l.written,
                secs: l.window_secs,
                commits: l.window_commits,
                writer: l.window_writer,
                reader: l.window_reader,
            });
        out.push(r);
    }
    out
}

/// Writes `cost.md` and `cost.json` into `out`; returns the markdown.
pub(crate) fn write(out: &Path, runs: &[CostRun], machine: &str, secs: u64) -> Result<String> {
    std::fs::write(out.join("cost.json"), serde_json::to_vec_pretty(runs)?)?;
    let mut md = String::new();
    writeln!(
        md,
        "# walcast: requests and dollars per hour, every default\n"
    )?;
    writeln!(
        md,
        "Machine: {machine}. `walcast publish` with its defaults (commit budget {} commits/s, \
         burst {}, flush interval {} ms, head tail {} KiB) and one replica with `walcast replicate`'s \
         defaults (head poll every {REPLICA_POLL_MS} ms) on the same store; each rate written for {secs} s, \
         requests counted in that window and scaled to an hour.\n",
        PublisherConfig::default().max_commits_per_sec,
        PublisherConfig::default().commit_burst,
        PublisherConfig::default().flush_interval_ms,
        PublisherConfig::default().tail_bytes / 1024,
    )?;
    writeln!(
        md,
        "| store | batches/s | commits/s | writer PUTs per commit | writer requests per hour (class A + B) | reader requests per commit | one replica's requests per hour |"
    )?;
    writeln!(md, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")?;
    for r in runs {
        let (wa, wb) = r.classes(&r.writer);
        let (ra, rb) = r.classes(&r.reader);
        let c = r.commits.max(1) as f64;
        writeln!(
            md,
            "| {} | {} | {:.1} | {:.2} | {:.0} + {:.0} | {:.2} | {:.0} |",
            r.store,
            r.rate,
            r.commits as f64 / r.secs.max(1e-9),
            r.writer.puts as f64 / c,
            wa,
            wb,
            r.reader.requests() as f64 / c,
            ra + rb
        )?;
    }
    writeln!(
        md,
        "\nDollars per hour at list prices (per 1,000 requests: S3 PUT $0.005, GET $0.0004; \
         R2 class A $0.0045, class B $0.00036; GCS class A $0.005, class B $0.0004; DELETE free; \
         storage and egress not included):\n"
    )?;
    let names: Vec<&str> = PRICES.iter().map(|p| p.name).collect();
    writeln!(
        md,
        "| store measured | batches/s | writer: {} | one replica: {} |",
        names.join(" / "),
        names.join(" / ")
    )?;
    writeln!(md, "| --- | ---: | ---: | ---: |")?;
    for r in runs {
        let dollars = |c: &RequestCounts| {
            let (a, b) = r.classes(c);
            PRICES
                .iter()
                .map(|p| format!("${:.4}", (a * p.write + b * p.read) / 1000.0))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        writeln!(
            md,
            "| {} | {} | {} | {} |",
            r.store,
            r.rate,
            dollars(&r.writer),
            dollars(&r.reader)
        )?;
    }
    std::fs::write(out.join("cost.md"), &md)?;
    Ok(md)
}
