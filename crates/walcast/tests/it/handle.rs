//! The embedding API: `ReplicaHandle` in full and lazy mode against a
//! dataset published by the real binary, compared with a replica made by
//! `walcast replicate`; read-your-writes with `wait_for`.

use crate::support;

use std::time::Duration;

use support::{
    file_url, gen_batches, publish_once, replicate_once, scan, write, Env, GenOpts, Rng,
};
use walcast::handle::{ReplicaHandle, ReplicaOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handles_read_what_a_replicate_run_holds_and_wait_for_new_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let wal = tmp.path().join("wal");
    let ds = tmp.path().join("ds");
    let url = file_url(&ds);
    let mut rng = Rng::new(11);
    let opts = GenOpts {
        keys: 300,
        max_value: 200,
        ..GenOpts::default()
    };
    // History, a snapshot at 150, then a tail that rewrites and deletes.
    let b = gen_batches(&mut rng, 200, opts);
    write(&wal, &b);
    publish_once(&wal, &url, &["--snapshot-every", "150"], &Env::new()).ok();
    let mut committed = 200;
    for lazy in [None, Some(4096)] {
        let local = tmp
            .path()
            .join(format!("replica-before-{}", lazy.is_some()));
        replicate_once(&url, &local, &Env::new()).ok();
        let want = scan(&local);
        assert!(want.len() > 50);
        let h = ReplicaHandle::open(
            &url,
            ReplicaOptions {
                lazy_cache_bytes: lazy,
                poll_interval: Duration::from_millis(50),
                ..ReplicaOptions::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(h.status().applied_lsn, committed, "lazy {lazy:?}");
        for (k, v) in want.iter().take(80) {
            assert_eq!(h.get(k).await.unwrap().as_ref(), Some(v), "lazy {lazy:?}");
        }
        assert_eq!(h.get(b"no such key").await.unwrap(), None);
        let all = h.scan(b"", None, usize::MAX).await.unwrap();
        let all: std::collections::BTreeMap<_, _> = all.into_iter().collect();
        assert_eq!(all, want, "lazy {lazy:?}");
        let some = h.scan_prefix(b"k", 7).await.unwrap();
        let expect: Vec<_> = want
            .iter()
            .filter(|(k, _)| k.starts_with(b"k"))
            .take(7)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(some, expect);
        // Bounded in bytes: pages end at the entry that reaches the bound,
        // and paging past each one's last key reads everything once.
        let (mut paged, mut start, mut pages) = (Vec::new(), Vec::new(), 0);
        loop {
            let scan =
                walcast_core::replica::LazyScan::new(&start, None, usize::MAX).max_bytes(500);
            let page = h.scan_with(scan).await.unwrap();
            let bytes: usize = page.iter().map(|(k, v)| k.len() + v.len()).sum();
            assert!(
                page.len() <= 1 || bytes - page.last().map_or(0, |(k, v)| k.len() + v.len()) < 500,
                "lazy {lazy:?}: a page past its bound"
            );
            let Some((k, _)) = page.last() else { break };
            start = [&k[..], &[0]].concat();
            paged.extend(page);
            pages += 1;
        }
        assert!(pages > 2, "lazy {lazy:?}: {pages} pages");
        assert_eq!(
            paged
                .into_iter()
                .collect::<std::collections::BTreeMap<_, _>>(),
            want,
            "lazy {lazy:?}: paged by bytes"
        );
        if lazy.is_some() {
            let st = h.status();
            assert!(st.lazy.is_some_and(|l| l.blocks_fetched > 0), "{st:?}");
        }

        // Read-your-writes: new batches, published, then awaited.
        let mut sub = h.subscribe();
        let more = gen_batches(&mut rng, 5, opts);
        let lsns = write(&wal, &more);
        let last = *lsns.last().unwrap();
        committed = last;
        publish_once(&wal, &url, &["--snapshot-every", "150"], &Env::new()).ok();
        let applied = h.wait_for(last, Duration::from_secs(30)).await.unwrap();
        assert!(applied >= last);
        assert!(sub.has_changed().unwrap());
        let _ = sub.borrow_and_update();
        let local2 = tmp.path().join(format!("replica-{}", lazy.is_some()));
        replicate_once(&url, &local2, &Env::new()).ok();
        for (k, v) in scan(&local2).iter().take(50) {
            assert_eq!(h.get(k).await.unwrap().as_ref(), Some(v));
        }
        let err = h
            .wait_for(u64::MAX, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(err.to_string().starts_with("unavailable"), "{err}");
        h.close().await;
    }

    // A dataset that does not exist fails the open with a clear error.
    let missing = tmp.path().join("nothing");
    std::fs::create_dir_all(&missing).unwrap();
    let err = ReplicaHandle::open(&file_url(&missing), ReplicaOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("catalog/head.json"), "{err}");
}

/// `ReplicaOptions::local`: a full replica that survives a restart in the
/// directory `walcast replicate --local` writes. Reopened, it restores the
/// state and fetches only the head (nothing applied is fetched again); the
/// directory reads with `walcast get --local`; lazy mode refuses a local
/// directory; `fetch_stats` counts what opening cost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_directory_survives_a_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let wal = tmp.path().join("wal");
    let ds = tmp.path().join("ds");
    let url = file_url(&ds);
    let mut rng = Rng::new(12);
    let opts = GenOpts {
        keys: 100,
        max_value: 100,
        ..GenOpts::default()
    };
    let lsns = write(&wal, &gen_batches(&mut rng, 120, opts));
    // Small segments: a cold open takes several GETs.
    publish_once(
        &wal,
        &url,
        &["--segment-bytes", "2048", "--tail-bytes", "0"],
        &Env::new(),
    )
    .ok();
    let local = tmp.path().join("replica");
    let options = ReplicaOptions {
        local: Some(local.clone()),
        ..ReplicaOptions::default()
    };
    let h = ReplicaHandle::open(&url, options.clone()).await.unwrap();
    let last = *lsns.last().unwrap();
    assert_eq!(h.status().applied_lsn, last);
    let cold = h.fetch_stats();
    assert!(
        cold.gets > 2 && cold.bytes > 0 && cold.round_trips >= 2,
        "{cold:?}"
    );
    let all: std::collections::BTreeMap<_, _> = h
        .scan(b"", None, usize::MAX)
        .await
        .unwrap()
        .into_iter()
        .collect();
    h.close().await;
    assert_eq!(
        scan(&local),
        all,
        "the directory holds what the handle held"
    );

    // Reopened: restored from the directory, only the head fetched.
    let h = ReplicaHandle::open(&url, options.clone()).await.unwrap();
    assert_eq!(h.status().applied_lsn, last);
    let warm = h.fetch_stats();
    assert_eq!(warm.gets, 1, "only the head: {warm:?}");
    let again: std::collections::BTreeMap<_, _> = h
        .scan(b"", None, usize::MAX)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(again, all);
    h.close().await;

    let err = ReplicaHandle::open(
        &url,
        ReplicaOptions {
            lazy_cache_bytes: Some(1 << 20),
            ..options
        },
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("local directory"), "{err}");
}

/// `walcast replicate` without `--once` runs on the handle from the start:
/// started before the dataset exists, it waits (retrying), catches up once
/// the dataset is published, follows new commits, and on Ctrl-C (SIGINT)
/// stops cleanly, exit 0, naming the applied LSN; its directory then reads
/// with `get --local`.
#[test]
fn replicate_waits_for_the_dataset_follows_and_stops_on_ctrl_c() {
    use support::{run, walcast_cmd, Deadline, Proc};

    let tmp = tempfile::tempdir().unwrap();
    let wal = tmp.path().join("wal");
    let ds = tmp.path().join("ds");
    std::fs::create_dir_all(&ds).unwrap();
    let url = file_url(&ds);
    let local = tmp.path().join("replica");
    let mut p = Proc::spawn(
        "replicate",
        walcast_cmd(
            &[
                "replicate",
                &url,
                "--local",
                local.to_str().unwrap(),
                "--interval",
                "50ms",
            ],
            &Env::new(),
        ),
        &tmp.path().join("logs"),
    );
    let get = |key: &str| {
        run(
            &["get", "--local", local.to_str().unwrap(), key],
            &Env::new(),
            None,
        )
    };
    for (round, key) in ["a", "b"].iter().enumerate() {
        let line = format!("{{\"op\":\"put\",\"key\":\"{key}\",\"value\":\"{round}\"}}\n");
        run(
            &["write", "--wal", wal.to_str().unwrap()],
            &Env::new(),
            Some(line.as_bytes()),
        )
        .ok();
        publish_once(&wal, &url, &[], &Env::new()).ok();
        let deadline = Deadline::after(Duration::from_secs(60), "the replica applies the commit");
        while !local.is_dir() || get(key).code != Some(0) {
            assert!(p.running(), "replicate ended: {}", p.logs());
            deadline.check();
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(get(key).stdout, round.to_string().as_bytes());
    }
    let pid = p.pid().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = p
        .wait_timeout(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("replicate did not stop on SIGINT: {}", p.logs()));
    assert!(status.success(), "{}", p.logs());
    assert!(
        p.stderr().contains("walcast replicate: applied LSN 2"),
        "{}",
        p.logs()
    );
    assert_eq!(get("a").stdout, b"0");
}

/// A replica whose thread ends on an error (here its local directory,
/// replaced by a file, cannot take the checkpoint a new dataset at the same
/// prefix needs) answers later reads with that error, not "closed".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_after_the_replica_stopped_on_an_error_name_the_error() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("ds");
    let url = file_url(&ds);
    let mut rng = Rng::new(5);
    let opts = GenOpts {
        keys: 20,
        max_value: 50,
        ..GenOpts::default()
    };
    let wal = tmp.path().join("wal");
    write(&wal, &gen_batches(&mut rng, 10, opts));
    publish_once(&wal, &url, &[], &Env::new()).ok();
    let local = tmp.path().join("replica");
    let mut h = ReplicaHandle::open(
        &url,
        ReplicaOptions {
            local: Some(local.clone()),
            poll_interval: Duration::from_millis(20),
            ..ReplicaOptions::default()
        },
    )
    .await
    .unwrap();
    // The directory becomes a file (root writes into a read-only one).
    std::fs::remove_dir_all(&local).unwrap();
    std::fs::write(&local, b"not a directory").unwrap();
    // A new dataset at the same prefix: the replica starts over and must
    // checkpoint it.
    std::fs::remove_dir_all(&ds).unwrap();
    let wal2 = tmp.path().join("wal2");
    write(&wal2, &gen_batches(&mut rng, 10, opts));
    publish_once(&wal2, &url, &[], &Env::new()).ok();
    let ended = tokio::time::timeout(Duration::from_secs(30), h.ended())
        .await
        .expect("the replica's thread ends");
    let cause = ended.expect_err("it ended on an error").to_string();
    assert!(
        cause.contains(&local.display().to_string()),
        "the error names the directory: {cause}"
    );
    for err in [
        h.get(b"k").await.unwrap_err(),
        h.scan(b"", None, 10).await.unwrap_err(),
    ] {
        let err = format!("{err:#}");
        assert!(
            err.contains(&cause) && err.contains("stopped"),
            "a read names what stopped the replica ({cause}): {err}"
        );
    }
    h.close().await;
}

/// A dataset's directory served over HTTP with `Range`, whose snapshot GETs
/// wait while the gate is shut: a store that stalls the blocks lazy reads
/// need, and then recovers.
struct GatedStore {
    url: String,
    open: tokio::sync::watch::Sender<bool>,
    snapshot_gets: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl GatedStore {
    async fn start(dir: std::path::PathBuf) -> GatedStore {
        use axum::http::{header, HeaderMap, StatusCode, Uri};
        use axum::response::IntoResponse;
        use std::sync::atomic::Ordering;
        let (open, gate) = tokio::sync::watch::channel(true);
        let snapshot_gets = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = snapshot_gets.clone();
        let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap| {
            let (dir, mut gate, count) = (dir.clone(), gate.clone(), count.clone());
            async move {
                let path = uri.path().trim_start_matches('/').to_string();
                if path.starts_with("snapshots/") {
                    count.fetch_add(1, Ordering::SeqCst);
                    let _ = gate.wait_for(|open| *open).await;
                }
                let Ok(body) = std::fs::read(dir.join(&path)) else {
                    return StatusCode::NOT_FOUND.into_response();
                };
                let len = body.len() as u64;
                let range = headers
                    .get(header::RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|r| r.strip_prefix("bytes="))
                    .and_then(|r| r.split_once('-'))
                    .map(
                        |(a, b)| match (a.parse::<u64>().ok(), b.parse::<u64>().ok()) {
                            (Some(a), Some(b)) => (a, (b + 1).min(len)),
                            (Some(a), None) => (a, len),
                            (None, Some(n)) => (len.saturating_sub(n), len),
                            (None, None) => (0, len),
                        },
                    );
                match range {
                    None => (StatusCode::OK, body).into_response(),
                    Some((a, b)) if a < b => (
                        StatusCode::PARTIAL_CONTENT,
                        [(header::CONTENT_RANGE, format!("bytes {a}-{}/{len}", b - 1))],
                        body[a as usize..b as usize].to_vec(),
                    )
                        .into_response(),
                    Some(_) => StatusCode::RANGE_NOT_SATISFIABLE.into_response(),
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        GatedStore {
            url,
            open,
            snapshot_gets,
        }
    }

    fn gets(&self) -> u64 {
        self.snapshot_gets.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Reads whose callers gave up (a timeout dropped the future, as a server
/// does for a client that hung up) leave the replica at once: over a store
/// that stalls the snapshot's blocks, 64 reads given up send no GET once
/// it answers again, and a new read is answered then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_given_up_by_their_callers_send_no_more_gets() {
    let tmp = tempfile::tempdir().unwrap();
    let wal = tmp.path().join("wal");
    let ds = tmp.path().join("ds");
    let mut rng = Rng::new(21);
    let opts = GenOpts {
        keys: 5_000,
        max_value: 300,
        max_ops: 40,
        ..GenOpts::default()
    };
    let batches = gen_batches(&mut rng, 400, opts);
    write(&wal, &batches);
    publish_once(
        &wal,
        &file_url(&ds),
        &["--snapshot-every", "400"],
        &Env::new(),
    )
    .ok();
    let store = GatedStore::start(ds.clone()).await;
    let h = ReplicaHandle::open(
        &store.url,
        ReplicaOptions {
            lazy_cache_bytes: Some(64 << 10),
            follow: false,
            ..ReplicaOptions::default()
        },
    )
    .await
    .unwrap();
    store.open.send_replace(false);
    let reads = (0..64u64).map(|i| {
        let h = &h;
        async move {
            let key = support::key_of(i * 77);
            tokio::time::timeout(Duration::from_millis(200), h.get(&key)).await
        }
    });
    let given_up = futures::future::join_all(reads).await;
    assert!(given_up.iter().all(Result::is_err), "the store stalls");
    // GETs sent before the reads were given up may reach the store a
    // little later on a loaded machine: counted once none has come for
    // 300 ms (while the store still stalls).
    let mut stalled = store.gets();
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = store.gets();
        if now == stalled {
            break;
        }
        stalled = now;
    }
    assert!(stalled > 0);
    store.open.send_replace(true);
    // Time for reads still running to send their next GETs (none should).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        store.gets(),
        stalled,
        "snapshot GETs sent for reads given up after the store answered again"
    );
    let v = tokio::time::timeout(Duration::from_secs(30), h.get(b"k0102"))
        .await
        .expect("a new read is answered");
    v.unwrap();
    assert!(store.gets() > stalled);
    h.close().await;
}

/// Runs `f` to completion on this thread without Tokio (another executor).
fn block_on_plain<F: std::future::Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(std::sync::Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let std::task::Poll::Ready(o) = f.as_mut().poll(&mut cx) {
            return o;
        }
        std::thread::park_timeout(Duration::from_millis(50));
    }
}

/// Opened from an executor that is not Tokio, a handle whose local
/// directory another handle holds fails with that error (it panicked,
/// waiting for its thread with Tokio's blocking pool).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_that_fails_outside_tokio_returns_its_error() {
    let tmp = tempfile::tempdir().unwrap();
    let wal = tmp.path().join("wal");
    let ds = tmp.path().join("ds");
    let url = file_url(&ds);
    write(&wal, &gen_batches(&mut Rng::new(5), 10, GenOpts::default()));
    publish_once(&wal, &url, &[], &Env::new()).ok();
    let options = ReplicaOptions {
        local: Some(tmp.path().join("replica")),
        ..ReplicaOptions::default()
    };
    let held = ReplicaHandle::open(&url, options.clone()).await.unwrap();
    let (url2, options2) = (url.clone(), options.clone());
    let err = std::thread::spawn(move || block_on_plain(ReplicaHandle::open(&url2, options2)))
        .join()
        .expect("no panic")
        .unwrap_err();
    assert!(err.to_string().contains("replica.lock"), "{err:#}");
    held.close().await;
}
