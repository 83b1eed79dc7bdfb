//! The report: `report.md` (tables of walcast, SlateDB and the ratio between
//! them, and replay against the ceiling), `lag.svg` (the lag distributions)
//! and `results.json` (every raw figure).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use plotters::prelude::*;

use crate::{LiveResult, Results, StoreRun, FLUSH_MS, POLL_MS, VALUE_LEN};

/// The `q` quantile of sorted values (nearest rank); NaN when empty.
pub(crate) fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[derive(Clone, Copy, PartialEq)]
enum Better {
    Lower,
    Higher,
}

#[derive(Clone, Copy)]
enum Unit {
    Ms,
    Secs,
    Count,
    Mb,
    PerSec,
    MbPerSec,
}

fn fmt_value(v: Option<f64>, unit: Unit) -> String {
    let Some(v) = v.filter(|v| v.is_finite()) else {
        return "—".into();
    };
    match unit {
        Unit::Ms => format!("{v:.0} ms"),
        Unit::Secs => format!("{v:.2} s"),
        Unit::Count => thousands(v.round() as u64),
        Unit::Mb => format!("{v:.1} MB"),
        Unit::PerSec => format!("{}/s", thousands(v.round() as u64)),
        Unit::MbPerSec => format!("{v:.1} MB/s"),
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

struct Row {
    scenario: &'static str,
    metric: &'static str,
    unit: Unit,
    better: Better,
    walcast: Option<f64>,
    slatedb: Option<f64>,
}

impl Row {
    /// How many times better walcast is (below 1: worse); None when not comparable.
    fn advantage(&self) -> Option<f64> {
        let (w, s) = (self.walcast?, self.slatedb?);
        if !w.is_finite() || !s.is_finite() {
            return None;
        }
        let (num, den) = match self.better {
            Better::Lower => (s, w),
            Better::Higher => (w, s),
        };
        if den == 0.0 && num == 0.0 {
            Some(1.0)
        } else if den == 0.0 {
            Some(f64::INFINITY)
        } else {
            Some(num / den)
        }
    }

    fn ratio_text(&self) -> String {
        match self.advantage() {
            None => "—".into(),
            Some(a) if a.is_infinite() => "∞ (walcast 0)".into(),
            Some(0.0) => "SlateDB 0".into(),
            Some(a) if (a - 1.0).abs() < 0.05 => "same".into(),
            Some(a) if a > 1.0 => format!("**{a:.1}× better**"),
            Some(a) => format!("{:.1}× worse", 1.0 / a),
        }
    }
}

fn per_min(count: u64, secs: f64) -> f64 {
    count as f64 * 60.0 / secs
}

/// One figure of walcast's and SlateDB's runs, where each ran.
fn both<T>(w: Option<&T>, s: Option<&T>, f: impl Fn(&T) -> f64) -> (Option<f64>, Option<f64>) {
    (w.map(&f), s.map(&f))
}

fn row(
    scenario: &'static str,
    metric: &'static str,
    unit: Unit,
    better: Better,
    (walcast, slatedb): (Option<f64>, Option<f64>),
) -> Row {
    Row {
        scenario,
        metric,
        unit,
        better,
        walcast,
        slatedb,
    }
}

fn rows(run: &StoreRun, batches: u64) -> Vec<Row> {
    use Better::*;
    use Unit::*;
    let (lw, ls) = (run.live_walcast.as_ref(), run.live_slatedb.as_ref());
    let (pw, ps) = (run.publish_walcast.as_ref(), run.publish_slatedb.as_ref());
    let (cw, cs) = (run.catchup_walcast.as_ref(), run.catchup_slatedb.as_ref());
    let mb = |b: u64| b as f64 / 1e6;
    let n = batches as f64;
    let mut out = lag_rows(lw, ls);
    out.extend([
        row(
            "catch-up",
            "time to the newest key",
            Secs,
            Lower,
            both(cw, cs, |m| m.first_secs),
        ),
        row(
            "catch-up",
            "time to every key",
            Secs,
            Lower,
            both(cw, cs, |m| m.secs),
        ),
        row(
            "catch-up",
            "requests",
            Count,
            Lower,
            both(cw, cs, |m| m.counts.requests() as f64),
        ),
        row(
            "catch-up",
            "bytes transferred",
            Mb,
            Lower,
            both(cw, cs, |m| mb(m.counts.bytes())),
        ),
        row(
            "catch-up",
            "peak RSS",
            Mb,
            Lower,
            both(cw, cs, |m| mb(m.peak_rss)),
        ),
        row(
            "idle cost",
            "reader requests per minute",
            Count,
            Lower,
            both(lw, ls, |l| per_min(l.idle_reader.requests(), l.idle_secs)),
        ),
        row(
            "idle cost",
            "reader bytes per minute",
            Count,
            Lower,
            both(lw, ls, |l| per_min(l.idle_reader.bytes(), l.idle_secs)),
        ),
        row(
            "idle cost",
            "writer requests per minute",
            Count,
            Lower,
            both(lw, ls, |l| per_min(l.idle_writer.requests(), l.idle_secs)),
        ),
        row(
            "publisher",
            "batches per second",
            PerSec,
            Higher,
            both(pw, ps, |m| n / m.secs),
        ),
        row(
            "publisher",
            "MB per second uploaded",
            MbPerSec,
            Higher,
            both(pw, ps, |m| mb(m.counts.bytes_up) / m.secs),
        ),
        row(
            "publisher",
            "requests",
            Count,
            Lower,
            both(pw, ps, |m| m.counts.requests() as f64),
        ),
        row(
            "publisher",
            "peak RSS",
            Mb,
            Lower,
            both(pw, ps, |m| mb(m.peak_rss)),
        ),
    ]);
    out
}

/// walcast with spaced commits beside SlateDB: the lag rows only.
fn spaced_rows(run: &StoreRun) -> Vec<Row> {
    lag_rows(run.live_walcast_spaced.as_ref(), run.live_slatedb.as_ref())
}

/// The lag scenario's rows for two live runs.
fn lag_rows(lw: Option<&LiveResult>, ls: Option<&LiveResult>) -> Vec<Row> {
    let lag = |q: f64| both(lw, ls, |l| percentile(&l.lags_ms, q));
    let lag_row = |metric, unit, figures| row("lag", metric, unit, Better::Lower, figures);
    vec![
        lag_row("p50", Unit::Ms, lag(0.5)),
        lag_row("p99", Unit::Ms, lag(0.99)),
        lag_row("max", Unit::Ms, lag(1.0)),
        lag_row(
            "reader requests while following",
            Unit::Count,
            both(lw, ls, |l| l.follow_reader.requests() as f64),
        ),
        lag_row(
            "reader bytes while following",
            Unit::Mb,
            both(lw, ls, |l| l.follow_reader.bytes() as f64 / 1e6),
        ),
        lag_row(
            "writer requests while writing",
            Unit::Count,
            both(lw, ls, |l| l.follow_writer.requests() as f64),
        ),
    ]
}

/// Every figure the run should have produced and did not.
pub(crate) fn missing(r: &Results) -> Vec<String> {
    let mut out = Vec::new();
    for run in &r.stores {
        let spaced = spaced_rows(run).into_iter().map(|mut row| {
            row.metric = match row.metric {
                "p50" => "p50 (spaced commits)",
                "p99" => "p99 (spaced commits)",
                "max" => "max (spaced commits)",
                "reader requests while following" => "reader requests (spaced commits)",
                "reader bytes while following" => "reader bytes (spaced commits)",
                _ => "writer requests (spaced commits)",
            };
            row
        });
        for row in rows(run, r.plan.batches).into_iter().chain(spaced) {
            for (sys, v) in [("walcast", row.walcast), ("SlateDB", row.slatedb)] {
                if !v.is_some_and(f64::is_finite) {
                    out.push(format!(
                        "{} {} {} ({sys})",
                        run.label, row.scenario, row.metric
                    ));
                }
            }
        }
    }
    match &r.replay {
        None => out.push("replay limit".into()),
        Some(p) => {
            for (name, v) in [
                ("copy", Some(p.copy_s)),
                ("crc32fast", Some(p.crc_s)),
                ("walcast", Some(p.apply_s)),
                ("wasm", p.wasm_s),
            ] {
                if !v.is_some_and(|v| v.is_finite() && v > 0.0) {
                    out.push(format!("replay limit {name}"));
                }
            }
        }
    }
    out
}

/// Writes `report.md`, `lag.svg` and `results.json` into `out`.
pub(crate) fn write(out: &Path, r: &Results, took: Duration) -> Result<()> {
    std::fs::write(out.join("results.json"), serde_json::to_vec_pretty(r)?)?;
    let chart = chart(&out.join("lag.svg"), r);
    let p = &r.plan;
    let mut md = String::new();
    let mode = if p.quick { "quick" } else { "full" };
    writeln!(md, "# walcast vs SlateDB 0.18 — {mode} mode\n")?;
    writeln!(
        md,
        "Machine: {}. Run took {} s. Every figure below was measured in this one run; \
         compare the ratios, not the absolute numbers across machines.\n",
        r.machine,
        took.as_secs()
    )?;
    writeln!(
        md,
        "Work: every batch is one put of a 12-byte key and a {VALUE_LEN}-byte value. \
         Both writers flush every {FLUSH_MS} ms, both readers poll every {POLL_MS} ms. \
         **lag**: {} batches/s for {} s, commit at the writer to visible at the reader; \
         **idle cost**: the caught-up pair, nothing written, for {} s; \
         **publisher** and **catch-up**: a backlog of {} batches. \
         Requests and bytes are counted by one `object_store` wrapper both systems go through. \
         \"× better\" is SlateDB's figure over walcast's (for throughput, walcast's over SlateDB's).\n",
        p.rate,
        p.lag_secs,
        p.idle_secs,
        thousands(p.batches)
    )?;
    let mut worst: Option<(f64, String)> = None;
    for run in &r.stores {
        writeln!(md, "## {}\n", run.label)?;
        writeln!(
            md,
            "| scenario | metric | walcast | SlateDB | walcast vs SlateDB |"
        )?;
        writeln!(md, "| --- | --- | ---: | ---: | ---: |")?;
        for row in rows(run, p.batches) {
            writeln!(
                md,
                "| {} | {} | {} | {} | {} |",
                row.scenario,
                row.metric,
                fmt_value(row.walcast, row.unit),
                fmt_value(row.slatedb, row.unit),
                row.ratio_text()
            )?;
            if let Some(a) = row.advantage().filter(|a| a.is_finite()) {
                if worst.as_ref().is_none_or(|(w, _)| a < *w) {
                    worst = Some((
                        a,
                        format!(
                            "{} {} {} ({})",
                            run.label,
                            row.scenario,
                            row.metric,
                            row.ratio_text()
                        ),
                    ));
                }
            }
        }
        writeln!(
            md,
            "\nThe same lag run with `walcast publish --min-commit-interval {}ms` (at most as many commits a second as SlateDB's flushes):\n",
            crate::SPACED_COMMIT_MS
        )?;
        writeln!(
            md,
            "| scenario | metric | walcast, spaced commits | SlateDB | walcast vs SlateDB |"
        )?;
        writeln!(md, "| --- | --- | ---: | ---: | ---: |")?;
        for row in spaced_rows(run) {
            writeln!(
                md,
                "| {} | {} | {} | {} | {} |",
                row.scenario,
                row.metric,
                fmt_value(row.walcast, row.unit),
                fmt_value(row.slatedb, row.unit),
                row.ratio_text()
            )?;
        }
        if !run.live_http.is_empty() {
            http_table(&mut md, run)?;
        }
        if let (Some(w), Some(s)) = (&run.live_walcast, &run.live_slatedb) {
            writeln!(
                md,
                "\nLag samples: walcast {} batches, SlateDB {}. walcast's local WAL write of the backlog (fsync per group of 10,000) took {}; its WAL is {:.1} MB.\n",
                thousands(w.written),
                thousands(s.written),
                fmt_value(run.write_walcast_secs, Unit::Secs),
                run.wal_bytes as f64 / 1e6
            )?;
            let per_commit = |l: &LiveResult| {
                let c = l.commits.max(1) as f64;
                (
                    l.commits,
                    l.follow_reader.requests() as f64 / c,
                    l.follow_writer.requests() as f64 / c,
                )
            };
            let (c, r, w) = per_commit(w);
            write!(
                md,
                "walcast made {} commits: {r:.2} reader requests and {w:.2} writer requests per commit",
                thousands(c)
            )?;
            if let Some(sp) = &run.live_walcast_spaced {
                let (c, r, w) = per_commit(sp);
                write!(
                    md,
                    "; with spaced commits {} commits, {r:.2} and {w:.2}",
                    thousands(c)
                )?;
            }
            writeln!(md, ".\n")?;
        } else {
            writeln!(md)?;
        }
    }
    if let Some(rp) = &r.replay {
        let mbs = |s: f64| rp.bytes as f64 / 1e6 / s;
        writeln!(
            md,
            "## replay limit (in memory)\n\nOne segment of {} batches ({:.1} MB), best of several runs.\n",
            thousands(rp.records),
            rp.bytes as f64 / 1e6
        )?;
        writeln!(
            md,
            "| step | MB/s | share of a plain copy | share of crc32fast::hash |"
        )?;
        writeln!(md, "| --- | ---: | ---: | ---: |")?;
        let mut line = |name: &str, s: Option<f64>| -> Result<()> {
            match s {
                Some(s) => writeln!(
                    md,
                    "| {name} | {:.0} | {:.2} | {:.2} |",
                    mbs(s),
                    rp.copy_s / s,
                    rp.crc_s / s
                )?,
                None => writeln!(md, "| {name} | — | — | — |")?,
            }
            Ok(())
        };
        line(
            "plain copy (memcpy into a buffer already allocated): the ceiling",
            Some(rp.copy_s),
        )?;
        line("crc32fast::hash over the bytes", Some(rp.crc_s))?;
        line("walcast: decode + verify every checksum", Some(rp.verify_s))?;
        line(
            "SHA-256 over the bytes (a signed dataset's segment digest)",
            Some(rp.digest_s),
        )?;
        line(
            "walcast: decode + verify + apply to the KV state",
            Some(rp.apply_s),
        )?;
        line(
            "… the same in wasm (Node), without the catalog checksum",
            rp.wasm_s,
        )?;
        match (rp.wasm_s, &rp.wasm_missing) {
            (Some(w), _) => writeln!(
                md,
                "\nwasm (Node) replays at {:.2}× native throughput (native without the catalog checksum: {:.0} MB/s).\n",
                rp.apply_nocat_s / w,
                mbs(rp.apply_nocat_s)
            )?,
            (None, Some(why)) => writeln!(md, "\nwasm: no figure ({why}).\n")?,
            (None, None) => writeln!(md)?,
        }
        writeln!(
            md,
            "Checking a segment against its signed digest costs {:.2}× replaying it (SHA-256 time over decode + verify + apply time).\n",
            rp.digest_s / rp.apply_s
        )?;
        worst_ceiling(&mut md, rp)?;
    }
    if let Some((_, w)) = worst {
        writeln!(md, "Furthest behind SlateDB (or closest to it): {w}.\n")?;
    }
    match chart {
        Ok(()) => writeln!(md, "![publish-to-visible lag](lag.svg)\n")?,
        Err(e) => writeln!(md, "(no chart: {e:#})\n")?,
    }
    if !r.failures.is_empty() {
        writeln!(md, "## failures\n")?;
        for f in &r.failures {
            writeln!(md, "- {f}")?;
        }
    }
    std::fs::write(out.join("report.md"), md)?;
    Ok(())
}

/// The live tail over HTTP: each walcast setup's lag, commits and
/// requests, with SlateDB's run on the same store below them.
fn http_table(md: &mut String, run: &StoreRun) -> Result<()> {
    writeln!(
        md,
        "\nThe live tail over HTTP: the replica reads `walcast serve` on this dataset \
         (in the bench's process, woken by each commit as `walcast publish --serve` does) \
         instead of the store. Writer requests are the publisher's on the store; reader \
         requests and bytes are the replica's HTTP GETs (long-polls included). SlateDB's \
         reader reads the store; its row is the run above.\n"
    )?;
    writeln!(
        md,
        "| setup | lag p50 | lag p99 | lag max | p99 vs SlateDB | batches | commits | writer requests | reader requests | reader bytes | reader requests per commit |"
    )?;
    writeln!(
        md,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )?;
    let slate_p99 = run
        .live_slatedb
        .as_ref()
        .map(|s| percentile(&s.lags_ms, 0.99));
    let line = |md: &mut String, label: &str, l: &LiveResult, commits: Option<u64>| {
        let p = |q| fmt_value(Some(percentile(&l.lags_ms, q)), Unit::Ms);
        let vs = Row {
            scenario: "lag",
            metric: "p99",
            unit: Unit::Ms,
            better: Better::Lower,
            walcast: Some(percentile(&l.lags_ms, 0.99)),
            slatedb: slate_p99,
        };
        writeln!(
            md,
            "| {label} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            p(0.5),
            p(0.99),
            p(1.0),
            if commits.is_some() {
                vs.ratio_text()
            } else {
                "—".into()
            },
            thousands(l.written),
            commits.map_or("—".into(), thousands),
            thousands(l.follow_writer.requests()),
            thousands(l.follow_reader.requests()),
            fmt_value(Some(l.follow_reader.bytes() as f64 / 1e6), Unit::Mb),
            commits.map_or("—".into(), |c| format!(
                "{:.2}",
                l.follow_reader.requests() as f64 / c.max(1) as f64
            )),
        )
    };
    for h in &run.live_http {
        line(md, &h.label, &h.result, Some(h.result.commits))?;
    }
    if let Some(s) = &run.live_slatedb {
        line(md, "SlateDB (reader on the store)", s, None)?;
    }
    if let Some(h) = run.live_http.first() {
        let l = &h.result;
        writeln!(
            md,
            "\nIdle, {}: the caught-up replica made {} request{} in {:.0} s ({:.1} a minute).",
            h.label,
            l.idle_reader.requests(),
            if l.idle_reader.requests() == 1 {
                ""
            } else {
                "s"
            },
            l.idle_secs,
            per_min(l.idle_reader.requests(), l.idle_secs)
        )?;
    }
    Ok(())
}

fn worst_ceiling(md: &mut String, rp: &crate::replay::ReplayResult) -> Result<()> {
    writeln!(
        md,
        "Replay runs at {:.2} of a plain copy and {:.2} of crc32fast::hash alone.\n",
        rp.copy_s / rp.apply_s,
        rp.crc_s / rp.apply_s
    )?;
    Ok(())
}

/// The lag distributions as CDFs, one line per system and store.
fn chart(path: &Path, r: &Results) -> Result<()> {
    let mut series: Vec<(String, &[f64], RGBColor)> = Vec::new();
    let colors = [
        (
            RGBColor(31, 119, 180),
            RGBColor(44, 160, 44),
            RGBColor(214, 39, 40),
        ),
        (
            RGBColor(23, 190, 207),
            RGBColor(148, 103, 189),
            RGBColor(255, 127, 14),
        ),
    ];
    for (run, (cw, cp, cs)) in r.stores.iter().zip(colors.iter().cycle()) {
        if let Some(l) = &run.live_walcast {
            series.push((format!("walcast, {}", run.label), &l.lags_ms, *cw));
        }
        if let Some(l) = &run.live_walcast_spaced {
            series.push((
                format!(
                    "walcast --min-commit-interval {}ms, {}",
                    crate::SPACED_COMMIT_MS,
                    run.label
                ),
                &l.lags_ms,
                *cp,
            ));
        }
        for (h, color) in run.live_http.iter().zip([
            RGBColor(0, 0, 0),
            RGBColor(127, 127, 127),
            RGBColor(188, 189, 34),
            RGBColor(227, 119, 194),
        ]) {
            series.push((
                format!("walcast over HTTP, {}", h.label.replace('`', "")),
                &h.result.lags_ms,
                color,
            ));
        }
        if let Some(l) = &run.live_slatedb {
            series.push((format!("SlateDB, {}", run.label), &l.lags_ms, *cs));
        }
    }
    let xmax = series
        .iter()
        .filter_map(|(_, l, _)| l.last().copied())
        .fold(1.0f64, f64::max)
        * 1.05;
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Commit-to-visible lag, {} batches/s, flush {FLUSH_MS} ms, poll {POLL_MS} ms",
                r.plan.rate
            ),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..xmax, 0f64..1f64)?;
    chart
        .configure_mesh()
        .x_desc("lag (ms)")
        .y_desc("fraction of batches visible")
        .draw()?;
    for (label, lags, color) in series {
        let n = lags.len().max(1) as f64;
        let step = (lags.len() / 2000).max(1);
        let pts: Vec<(f64, f64)> = lags
            .iter()
            .enumerate()
            .filter(|(i, _)| i % step == 0 || *i + 1 == lags.len())
            .map(|(i, &v)| (v, (i + 1) as f64 / n))
            .collect();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
