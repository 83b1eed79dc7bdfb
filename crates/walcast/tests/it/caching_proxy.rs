//! Fan-out through a cache: `examples/caching-proxy/nginx.conf` (nginx with
//! `proxy_cache` and `proxy_cache_lock`) in front of a `walcast serve`
//! process, with many in-process replicas polling through it while a writer
//! commits. The origin must see about one head request per head change
//! whatever the replica count, every segment exactly once, and no replica
//! may ever go backwards.
//!
//! Needs nginx (`scripts/e2e-deps.sh`); `WALCAST_E2E_SKIP=1` skips.
//! The benchmark mode (10, 100 and 1,000 replicas; origin requests and lag
//! p99) runs with
//! `cargo test --release -p walcast --test it -- caching_proxy:: --ignored --nocapture`.

use crate::support;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use support::*;
use tempfile::TempDir;
use walcast::handle::{ReplicaHandle, ReplicaOptions};
use walcast_core::batch::Op;
use walcast_core::publisher::PublisherConfig;

/// The shipped polling example.
const POLLING: &str = "nginx.conf";
/// The shipped example that collapses long-polls.
const LONG_POLL: &str = "nginx-long-poll.conf";

/// The shipped example `file` (in examples/caching-proxy), with its listen
/// address, origin and cache directory replaced, run without a master
/// process (so it needs no user switch).
fn proxy_conf(file: &str, listen: u16, origin: &str, dir: &Path) -> String {
    let path = workspace_root().join("examples/caching-proxy").join(file);
    let conf = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let d = dir.display();
    let swaps = [
        (
            "worker_processes auto;",
            "daemon off;\nmaster_process off;\nworker_processes 1;".to_string(),
        ),
        (
            "    access_log off;",
            format!(
                "    log_format origin '$upstream_status $upstream_cache_status $uri';\n    access_log {d}/access.log origin;\n    client_body_temp_path {d}/client_body;\n    proxy_temp_path {d}/proxy;\n    fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;"
            ),
        ),
        ("/var/cache/walcast", format!("{d}/cache")),
        ("server 127.0.0.1:8787;", format!("server {origin};")),
        ("listen 127.0.0.1:8080;", format!("listen 127.0.0.1:{listen};")),
    ];
    let mut out = conf;
    for (from, to) in swaps {
        assert_eq!(
            out.matches(from).count(),
            1,
            "the example config no longer holds {from:?}"
        );
        out = out.replace(from, &to);
    }
    out
}

struct Proxy {
    port: u16,
    dir: TempDir,
    proc: Proc,
}

impl Proxy {
    fn start(file: &str, origin: &str) -> Proxy {
        let exe = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.is_file())
            .map(Path::to_path_buf)
            .or_else(|| {
                std::env::var_os("PATH").and_then(|p| {
                    std::env::split_paths(&p)
                        .map(|d| d.join("nginx"))
                        .find(|p| p.is_file())
                })
            })
            .expect("nginx is missing: run scripts/e2e-deps.sh (or set WALCAST_E2E_SKIP=1)");
        let dir = TempDir::new().unwrap();
        for sub in [
            "cache",
            "client_body",
            "proxy",
            "fastcgi",
            "uwsgi",
            "scgi",
            "logs",
        ] {
            fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        // The port is drawn again if another process took it before nginx
        // bound it (nginx then exits naming the address in use).
        let conf = dir.path().join("nginx.conf");
        let error_log = dir.path().join("error.log");
        for attempt in 1..=3 {
            let port = free_port();
            fs::write(&conf, proxy_conf(file, port, origin, dir.path())).unwrap();
            let _ = fs::remove_file(&error_log);
            let mut cmd = Command::new(&exe);
            cmd.arg("-e")
                .arg(&error_log)
                .arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(&conf);
            let mut proc = Proc::spawn("nginx-proxy", cmd, &dir.path().join("logs"));
            let addr = format!("127.0.0.1:{port}");
            let deadline = Deadline::after(Duration::from_secs(15), "the caching proxy to start");
            let up = loop {
                if http("GET", &addr, "/catalog/head.json", b"")
                    .ok()
                    .map(|r| r.0)
                    == Some(200)
                {
                    break true;
                }
                if !proc.running() {
                    break false;
                }
                deadline.check();
                thread::sleep(Duration::from_millis(50));
            };
            if up {
                return Proxy { port, dir, proc };
            }
            let errors = fs::read_to_string(&error_log).unwrap_or_default();
            assert!(
                attempt < 3 && errors.contains("Address already in use"),
                "nginx exited: {}\n{errors}",
                proc.logs()
            );
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Origin requests seen so far: by kind ("head", "segment", "other")
    /// and by segment key, and all requests for the head.
    fn origin_requests(&self) -> (BTreeMap<String, u64>, BTreeMap<String, u64>, u64) {
        let log = fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default();
        let (mut kinds, mut segments, mut head_all) = (BTreeMap::new(), BTreeMap::new(), 0);
        for line in log.lines() {
            let mut parts = line.split(' ');
            let (Some(upstream), Some(_cache), Some(uri)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let head = uri.ends_with("/catalog/head.json");
            head_all += u64::from(head);
            if upstream == "-" {
                continue;
            }
            let kind = if head {
                "head"
            } else if uri.contains("/segments/") {
                *segments.entry(uri.to_string()).or_insert(0) += 1;
                "segment"
            } else {
                "other"
            };
            *kinds.entry(kind.to_string()).or_insert(0) += 1;
        }
        (kinds, segments, head_all)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.proc.kill9();
    }
}

/// What one run measured.
#[derive(Debug)]
struct Fanout {
    replicas: usize,
    head_changes: u64,
    /// Seconds from the first write to the last count of origin requests.
    elapsed_s: f64,
    origin_head: u64,
    proxy_head: u64,
    origin_segments: u64,
    segments_fetched_twice: Vec<String>,
    went_backwards: bool,
    lag_p50_ms: f64,
    lag_p99_ms: f64,
    lag_max_ms: f64,
}

/// A writer commits `writes` batches `every` apart; `replicas` replicas
/// follow through the proxy configured by `conf` (polling every `poll`, or
/// long-polling where the proxy lets them) until they hold the last one.
fn fanout(conf: &str, replicas: usize, writes: u64, every: Duration, poll: Duration) -> Fanout {
    let tmp = TempDir::new().unwrap();
    let wal = tmp.path().join("wal");
    let ds = tmp.path().join("ds");
    fs::create_dir_all(&ds).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let writer = Arc::new(walcast::wal::Writer::open(&wal).unwrap());
    writer
        .commit(&[Op::put(b"k:0".to_vec(), b"v".to_vec())])
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let publisher = {
        let store = walcast::store::Store::open(&file_url(&ds)).unwrap();
        let opts = walcast::publish::PublishOptions {
            // No tail: replicas fetch every segment, which the proxy must
            // fetch from the origin once.
            config: PublisherConfig {
                tail_bytes: 0,
                ..PublisherConfig::default()
            },
            ..Default::default()
        };
        rt.spawn(walcast::publish::publish(
            wal.clone(),
            store,
            opts,
            async {
                let _ = stop_rx.await;
            },
            |_| {},
        ))
    };
    let head = ds.join("catalog/head.json");
    let deadline = Deadline::after(Duration::from_secs(20), "the first commit");
    while !head.exists() {
        deadline.check();
        thread::sleep(Duration::from_millis(20));
    }

    let mut serve = Proc::spawn(
        "serve",
        {
            let mut c = Command::new(bin());
            c.args(["serve", ds.to_str().unwrap(), "--addr", "127.0.0.1:0"]);
            c
        },
        tmp.path(),
    );
    let origin_addr = serve.wait_for_addr("walcast serve: listening on");
    let deadline = Deadline::after(Duration::from_secs(20), "walcast serve");
    while http("GET", &origin_addr, "/catalog/head.json", b"")
        .ok()
        .map(|r| r.0)
        != Some(200)
    {
        assert!(serve.running(), "walcast serve exited: {}", serve.logs());
        deadline.check();
        thread::sleep(Duration::from_millis(50));
    }
    let proxy = Proxy::start(conf, &origin_addr);
    let url = format!("http://127.0.0.1:{}/", proxy.port);

    // Replicas, and a watcher per replica: when it first held each LSN,
    // and whether it ever went back.
    let backwards = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<BTreeMap<u64, Instant>>>> =
        Arc::new(Mutex::new(vec![BTreeMap::new(); replicas]));
    let handles: Vec<ReplicaHandle> = rt.block_on(async {
        let opens = (0..replicas).map(|_| {
            ReplicaHandle::open(
                &url,
                ReplicaOptions {
                    poll_interval: poll,
                    ..ReplicaOptions::default()
                },
            )
        });
        futures::future::try_join_all(opens).await.unwrap()
    });
    for (i, h) in handles.iter().enumerate() {
        let mut rx = h.subscribe();
        let (backwards, seen) = (backwards.clone(), seen.clone());
        rt.spawn(async move {
            let mut last = rx.borrow().applied_lsn;
            while rx.changed().await.is_ok() {
                let now = Instant::now();
                let lsn = rx.borrow().applied_lsn;
                if lsn < last {
                    backwards.store(true, Ordering::SeqCst);
                }
                if lsn > last {
                    let mut s = seen.lock().unwrap();
                    for l in last + 1..=lsn {
                        s[i].entry(l).or_insert(now);
                    }
                }
                last = last.max(lsn);
            }
        });
    }
    let (kinds0, _, proxy_head0) = proxy.origin_requests();
    let started = Instant::now();

    // The writes: LSN 2..=writes + 1.
    let mut committed_at = BTreeMap::new();
    for n in 0..writes {
        thread::sleep(every);
        let lsn = writer
            .commit(&[Op::put(format!("k:{}", n + 1).into_bytes(), b"v".to_vec())])
            .unwrap();
        committed_at.insert(lsn, Instant::now());
    }
    let last = writes + 1;
    let deadline = Deadline::after(Duration::from_secs(60), "every replica to catch up");
    while !handles.iter().all(|h| h.status().applied_lsn >= last) {
        assert!(serve.running(), "walcast serve exited: {}", serve.logs());
        deadline.check();
        thread::sleep(Duration::from_millis(20));
    }
    // One more poll round: late polls are counted too.
    thread::sleep(poll * 2);
    let (kinds, segments, proxy_head) = proxy.origin_requests();
    let elapsed_s = started.elapsed().as_secs_f64();
    let head_changes = committed_head_changes(&ds, last);

    rt.block_on(async {
        for h in handles {
            h.close().await;
        }
    });
    let _ = stop_tx.send(());
    rt.block_on(publisher).unwrap().unwrap();
    serve.kill9();

    let mut lags: Vec<f64> = Vec::new();
    for s in seen.lock().unwrap().iter() {
        for (lsn, at) in &committed_at {
            if let Some(v) = s.get(lsn) {
                lags.push(v.saturating_duration_since(*at).as_secs_f64() * 1e3);
            }
        }
    }
    lags.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        lags.get(((lags.len() as f64 * p) as usize).min(lags.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    let get = |m: &BTreeMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
    Fanout {
        replicas,
        head_changes,
        elapsed_s,
        origin_head: get(&kinds, "head") - get(&kinds0, "head"),
        proxy_head: proxy_head - proxy_head0,
        origin_segments: get(&kinds, "segment"),
        segments_fetched_twice: segments
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|(k, n)| format!("{k} ({n}×)"))
            .collect(),
        went_backwards: backwards.load(Ordering::SeqCst),
        lag_p50_ms: pct(0.5),
        lag_p99_ms: pct(0.99),
        lag_max_ms: lags.last().copied().unwrap_or(f64::NAN),
    }
}

/// Head changes while the writes went out: the head's generation moved
/// from the one that committed LSN 1 to the one that committed `last`,
/// read from the final head (each commit bumps it by one).
fn committed_head_changes(ds: &Path, last: u64) -> u64 {
    let bytes = fs::read(ds.join("catalog/head.json")).unwrap();
    let head = walcast_core::catalog::Head::decode(&bytes).unwrap();
    assert!(head.committed_lsn >= last);
    // Generation 1 is the claim, 2 the commit of LSN 1.
    head.generation.saturating_sub(2)
}

/// No replica went backwards, the head changed at least 6 times, the origin
/// saw about one head request per change and the proxy 20 times as many,
/// and no segment reached the origin twice.
///
/// The proxy keeps the head for a second and then asks the origin again, so
/// besides the changes the origin may see about one head request per second
/// the run took (a slow machine stretches the run, not the count per
/// change); however many replicas poll, the count does not grow with them.
fn assert_one_origin_head_per_change(f: &Fanout) {
    eprintln!("{f:#?}");
    assert!(!f.went_backwards, "a replica went backwards");
    assert!(f.head_changes >= 6, "only {} head changes", f.head_changes);
    let limit = (f.head_changes * 2 + 4).max(f.head_changes + f.elapsed_s.ceil() as u64 + 4);
    assert!(
        f.origin_head <= limit,
        "{} origin head requests for {} head changes in {:.1} s (limit {limit})",
        f.origin_head,
        f.head_changes,
        f.elapsed_s
    );
    assert!(
        f.proxy_head >= f.origin_head * 20,
        "{} head requests reached the proxy, {} the origin",
        f.proxy_head,
        f.origin_head
    );
    assert!(
        f.segments_fetched_twice.is_empty(),
        "segments fetched from the origin more than once: {:?}",
        f.segments_fetched_twice
    );
}

#[test]
fn hundred_replicas_behind_nginx_cost_the_origin_one_head_request_per_change() {
    if skip("caching_proxy") {
        return;
    }
    let f = fanout(
        POLLING,
        100,
        12,
        Duration::from_millis(700),
        Duration::from_millis(200),
    );
    // About one origin head request per head change (the proxy caches the
    // head for a second and collapses concurrent misses), however many
    // replicas poll: 100 replicas polling five times a second would
    // otherwise send about 500 a second.
    assert_one_origin_head_per_change(&f);
    assert!(f.origin_segments >= 1, "no segment went through the proxy");
}

#[test]
fn hundred_replicas_long_polling_through_nginx_share_one_held_origin_request() {
    if skip("caching_proxy") {
        return;
    }
    let f = fanout(
        LONG_POLL,
        100,
        12,
        Duration::from_millis(700),
        Duration::from_millis(200),
    );
    // Replicas holding the same head wait on one held origin request.
    assert_one_origin_head_per_change(&f);
}

/// Origin requests and lag p99 at 10, 100 and 1,000 replicas, behind each
/// shipped proxy configuration.
#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn bench_fanout_10_100_1000() {
    let counts: Vec<usize> = std::env::var("WALCAST_FANOUT_REPLICAS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![10, 100, 1_000]);
    println!("| proxy | replicas | head changes | head requests at the proxy | origin head requests | per head change | origin segment GETs | lag p50 | lag p99 | lag max |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let confs: Vec<String> = std::env::var("WALCAST_FANOUT_PROXIES")
        .map(|v| v.split(',').map(str::to_string).collect())
        .unwrap_or_else(|_| vec![POLLING.into(), LONG_POLL.into()]);
    for conf in &confs {
        for &n in &counts {
            let f = fanout(
                conf,
                n,
                20,
                Duration::from_millis(500),
                Duration::from_millis(1000),
            );
            assert!(!f.went_backwards);
            println!(
                "| {conf} | {} | {} | {} | {} | {:.2} | {} | {:.0} ms | {:.0} ms | {:.0} ms |",
                f.replicas,
                f.head_changes,
                f.proxy_head,
                f.origin_head,
                f.origin_head as f64 / f.head_changes.max(1) as f64,
                f.origin_segments,
                f.lag_p50_ms,
                f.lag_p99_ms,
                f.lag_max_ms
            );
        }
    }
}
