//! `--metrics-addr`: `walcast publish` and `walcast replicate`, real
//! processes, scraped over HTTP while they run.

use crate::support;

use std::collections::BTreeMap;
use std::fs;
use std::thread;
use std::time::Duration;

use support::*;
use tempfile::TempDir;

/// The samples of a text exposition: `name{labels}` -> value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Scrapes `addr` until `done` holds for its samples.
fn scrape_until(
    addr: &str,
    what: &'static str,
    procs: &mut [&mut Proc],
    done: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> (String, BTreeMap<String, f64>) {
    let deadline = Deadline::after(Duration::from_secs(30), what);
    loop {
        for p in procs.iter_mut() {
            assert!(p.running(), "{} exited: {}", p.name(), p.logs());
        }
        if let Ok((200, body)) = http("GET", addr, "/metrics", b"") {
            let text = String::from_utf8(body).expect("UTF-8 metrics");
            let s = samples(&text);
            if done(&s) {
                return (text, s);
            }
            if deadline.passed() {
                panic!("timed out waiting for {what}; last scrape:\n{text}");
            }
        } else {
            deadline.check();
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn get(s: &BTreeMap<String, f64>, k: &str) -> f64 {
    s.get(k).copied().unwrap_or(0.0)
}

#[test]
fn publish_and_replicate_expose_prometheus_metrics() {
    let tmp = TempDir::new().unwrap();
    let wal = tmp.path().join("wal");
    let ds = tmp.path().join("ds");
    fs::create_dir_all(&ds).unwrap();
    let env = Env::new();
    let lines: String = (0..20)
        .map(|i| format!("{{\"op\":\"put\",\"key\":\"k{i}\",\"value\":\"v\"}}\n"))
        .collect();
    run(
        &["write", "--wal", wal.to_str().unwrap()],
        &env,
        Some(lines.as_bytes()),
    )
    .ok();

    let mut publisher = Proc::spawn(
        "publish",
        walcast_cmd(
            &[
                "publish",
                "--wal",
                wal.to_str().unwrap(),
                "--to",
                &file_url(&ds),
                "--metrics-addr",
                "127.0.0.1:0",
            ],
            &env,
        ),
        tmp.path(),
    );
    let pub_addr = publisher.wait_for_addr("walcast publish: metrics at");
    let (text, s) = scrape_until(
        &pub_addr,
        "the publisher's commit",
        &mut [&mut publisher],
        |s| get(s, "walcast_publisher_committed_lsn") >= 20.0,
    );
    assert!(get(&s, "walcast_publisher_commits_total") >= 1.0, "{text}");
    assert!(
        get(
            &s,
            "walcast_publisher_requests_total{kind=\"put\",outcome=\"sent\"}"
        ) >= 2.0,
        "a segment and a head PUT at least:\n{text}"
    );
    assert!(
        get(&s, "walcast_publisher_sent_bytes_total") > 0.0,
        "{text}"
    );
    assert!(
        text.contains("# TYPE walcast_publisher_errors counter"),
        "{text}"
    );

    let local = tmp.path().join("replica");
    let mut replica = Proc::spawn(
        "replicate",
        walcast_cmd(
            &[
                "replicate",
                &file_url(&ds),
                "--local",
                local.to_str().unwrap(),
                "--interval",
                "100ms",
                "--metrics-addr",
                "127.0.0.1:0",
            ],
            &env,
        ),
        tmp.path(),
    );
    let rep_addr = replica.wait_for_addr("walcast replicate: metrics at");
    let (text, s) = scrape_until(
        &rep_addr,
        "the replica to apply LSN 20",
        &mut [&mut publisher, &mut replica],
        |s| get(s, "walcast_replica_applied_lsn") >= 20.0,
    );
    assert_eq!(get(&s, "walcast_replica_committed_lsn"), 20.0, "{text}");
    assert!(
        get(
            &s,
            "walcast_replica_requests_total{kind=\"head\",outcome=\"ok\"}"
        ) >= 1.0,
        "{text}"
    );
    assert!(
        get(&s, "walcast_replica_received_bytes_total") > 0.0,
        "{text}"
    );
    assert!(
        get(&s, "walcast_replica_lag_seconds_count") >= 1.0,
        "{text}"
    );
    assert_eq!(
        get(&s, "walcast_replica_long_poll"),
        0.0,
        "file:// is polled:\n{text}"
    );

    // More writes: the replica's figures follow, and idle polls show as 304s
    // or repeated head reads.
    let more: String = (20..30)
        .map(|i| format!("{{\"op\":\"put\",\"key\":\"k{i}\",\"value\":\"v\"}}\n"))
        .collect();
    run(
        &["write", "--wal", wal.to_str().unwrap()],
        &env,
        Some(more.as_bytes()),
    )
    .ok();
    let (text, s) = scrape_until(
        &rep_addr,
        "the replica to apply LSN 30",
        &mut [&mut publisher, &mut replica],
        |s| get(s, "walcast_replica_applied_lsn") >= 30.0,
    );
    let heads: f64 = s
        .iter()
        .filter(|(k, _)| k.starts_with("walcast_replica_requests_total{kind=\"head\""))
        .map(|(_, v)| v)
        .sum();
    assert!(heads >= 2.0, "{text}");
    let (_, s) = scrape_until(
        &pub_addr,
        "the publisher's second commit",
        &mut [&mut publisher],
        |s| get(s, "walcast_publisher_committed_lsn") >= 30.0,
    );
    assert!(get(&s, "walcast_publisher_commits_total") >= 2.0);
    replica.kill9();
    publisher.kill9();
}
