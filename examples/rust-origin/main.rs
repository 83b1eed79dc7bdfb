//! An origin app that commits through walcast's `Writer` and publishes in
//! the same process with `Publisher::spawn`: it records page views as
//! `views:PAGE` counters, one atomic batch per visit, and prints each LSN
//! once replicas can see it.
//!
//! Run: `cargo run --example rust-origin -- --wal /tmp/origin-wal --to file:///tmp/origin-ds [--visits N]`
//!
//! With `--visits N` it stops after N more visits (publishing them all
//! first); otherwise it records one visit every 100 ms until Ctrl-C. Run
//! again over the same WAL, the counters go on from the values it holds.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use walcast::{PublishOptions, Publisher, Writer};
use walcast_core::batch::Op;

const PAGES: [&str; 4] = ["home", "pricing", "docs", "blog"];

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut wal, mut to, mut visits) = (None, None, None::<u64>);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--wal" => wal = Some(args.next().context("--wal needs DIR")?),
            "--to" => to = Some(args.next().context("--to needs URL")?),
            "--visits" => visits = Some(args.next().context("--visits needs N")?.parse()?),
            "-h" | "--help" => {
                println!("usage: rust-origin --wal DIR --to URL [--visits N]");
                return Ok(());
            }
            _ => bail!("unexpected argument {a:?}"),
        }
    }
    let (wal, to) = match (wal, to) {
        (Some(w), Some(t)) => (w, t),
        _ => bail!("usage: rust-origin --wal DIR --to URL [--visits N]"),
    };

    let writer = Writer::open(std::path::Path::new(&wal))?;
    let publisher = Publisher::spawn(&wal, &to, PublishOptions::default())?;
    // Print every commit as it happens, from a task of its own.
    let mut commits = publisher.commits();
    let reporter = tokio::spawn(async move {
        while commits.changed().await.is_ok() {
            let lsn = *commits.borrow_and_update();
            println!("{{\"committed\":{lsn}}}");
        }
    });

    // The counters go on from what the WAL holds (a restart with the same
    // `--wal`): the newest value each one was given.
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    let mut log = walcast::wal::WalReader::open(std::path::Path::new(&wal))?;
    while let Some((lsn, payload)) = log.next_record()? {
        let ops = walcast_core::batch::decode(&payload)
            .with_context(|| format!("{wal}: the batch at LSN {lsn}"))?;
        for op in ops {
            if let walcast_core::batch::OpRef::Put(k, v) = op {
                let page = PAGES.iter().find(|p| k == format!("views:{p}").as_bytes());
                if let (Some(page), Some(count)) = (
                    page,
                    std::str::from_utf8(v).ok().and_then(|v| v.parse().ok()),
                ) {
                    counts.insert(page, count);
                }
            }
        }
    }
    let mut n: u64 = counts.values().sum();
    let stop_at = visits.map(|v| n + v);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        if stop_at.is_some_and(|v| n >= v) {
            break;
        }
        tokio::select! {
            _ = tick.tick(), if visits.is_none() => {}
            _ = std::future::ready(()), if visits.is_some() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        let page = PAGES[(n % PAGES.len() as u64) as usize];
        let count = counts.entry(page).or_default();
        *count += 1;
        n += 1;
        // One atomic batch: the counter and the last visit.
        let lsn = writer.commit(&[
            Op::put(
                format!("views:{page}").into_bytes(),
                count.to_string().into_bytes(),
            ),
            Op::put(b"last_visit".to_vec(), format!("{page} #{n}").into_bytes()),
        ])?;
        eprintln!("visit {n} to {page}: LSN {lsn}");
    }

    // Publishes everything committed, then stops.
    let report = publisher.stop().await?;
    let _ = reporter.await;
    println!(
        "{{\"stopped\":true,\"committed_lsn\":{},\"epoch\":{}}}",
        report.committed_lsn, report.epoch
    );
    Ok(())
}
