//! End-to-end tests of the `walcast` binary: real processes, a real S3 API
//! (moto), `walcast serve` and nginx, crashes by SIGKILL and damaged objects.
//!
//! Needs `scripts/e2e-deps.sh` (moto in `.tools/moto`, nginx). Set
//! `WALCAST_E2E_SKIP=1` to skip; `WALCAST_E2E_SEED=N` replays a seed.
//! Run with `cargo test -p walcast --test it -- e2e:: --test-threads=1`.

use crate::support;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use support::*;
use tempfile::TempDir;

// ---------------------------------------------------------------------------
// write: the NDJSON contract
// ---------------------------------------------------------------------------

/// A malformed line: `line N` on stderr, exit 1, earlier lines committed,
/// nothing of that line; the next `write` continues at the next LSN.
#[test]
fn w_write_malformed_line_commits_nothing_of_it() {
    if skip("w_write_malformed_line_commits_nothing_of_it") {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let wal = tmp.path().join("wal");
    let ds = tmp.path().join("ds");
    let input = concat!(
        r#"{"op":"put","key":"a","value":"1"}"#,
        "\n",
        r#"{"batch":[{"op":"put","key":"b","value":"2"},{"op":"delete","key":"a"}]}"#,
        "\n",
        r#"{"op":"put","key_b64":"/w==","value_b64":"AAEC"}"#,
        "\n",
        r#"{"batch":[{"op":"put","key":"c","value":"3"},{"op":"frobnicate","key":"d"}]}"#,
        "\n",
    );
    let out = run(
        &["write", "--wal", p(&wal)],
        &Env::new(),
        Some(input.as_bytes()),
    )
    .code(1);
    assert!(
        out.stderr.contains("line 4"),
        "stderr must name `line 4`: {}",
        out.describe()
    );
    assert_eq!(
        parse_lsns(&out.stdout_str()),
        vec![1, 2, 3],
        "{}",
        out.describe()
    );

    let out = run(
        &["write", "--wal", p(&wal)],
        &Env::new(),
        Some(b"{\"op\":\"put\",\"key\":\"f\",\"value\":\"6\"}\n"),
    )
    .ok();
    assert_eq!(parse_lsns(&out.stdout_str()), vec![4], "{}", out.describe());

    let url = file_url(&ds);
    publish_once(&wal, &url, &[], &Env::new()).ok();
    assert_eq!(committed_lsn(&url, &Env::new()), 4);
    let local = tmp.path().join("replica");
    replicate_once(&url, &local, &Env::new()).ok();
    let want: BTreeMap<Vec<u8>, Vec<u8>> = [
        (b"b".to_vec(), b"2".to_vec()),
        (vec![0xff], vec![0, 1, 2]),
        (b"f".to_vec(), b"6".to_vec()),
    ]
    .into_iter()
    .collect();
    assert_state_eq(&scan(&local), &want, "after a malformed line");
}

// ---------------------------------------------------------------------------
// a. S3 API (moto)
// ---------------------------------------------------------------------------

/// Publish to s3:// (moto), replicate from s3://, then incrementally again.
#[test]
fn a_moto_s3_publish_replicate_incremental() {
    let name = "a_moto_s3_publish_replicate_incremental";
    if skip(name) {
        return;
    }
    let mut rng = Rng::new(seed(name));
    let moto = Moto::start();
    let tmp = TempDir::new().unwrap();
    let prefix = format!("e2e-a-{:08x}", rng.next_u64() as u32);
    let url = moto.url(&prefix);
    publish_replicate_incremental(name, &url, &moto.env(), tmp.path(), &mut rng, &|| {
        moto.logs()
    });
    // The store serves the head to be revalidated on every read and the
    // immutable objects to be cached for good (a CDN in front caches by it).
    let os = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(format!("http://127.0.0.1:{}", moto.port))
        .with_allow_http(true)
        .with_bucket_name(&moto.bucket)
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .with_region("us-east-1")
        .build()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cache_control = |key: &str| {
        rt.block_on(async {
            use object_store::ObjectStore as _;
            let got = os
                .get_opts(
                    &object_store::path::Path::from(key),
                    object_store::GetOptions {
                        head: true,
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            got.attributes
                .get(&object_store::Attribute::CacheControl)
                .map(|v| v.to_string())
        })
    };
    assert_eq!(
        cache_control(&format!("{prefix}/catalog/head.json")).as_deref(),
        Some("no-cache"),
        "the head"
    );
    let segment = rt.block_on(async {
        use futures::TryStreamExt as _;
        use object_store::ObjectStore as _;
        let p = object_store::path::Path::from(format!("{prefix}/segments"));
        os.list(Some(&p))
            .try_next()
            .await
            .unwrap()
            .expect("a segment")
            .location
    });
    assert_eq!(
        cache_control(segment.as_ref()).as_deref(),
        Some("public, max-age=31536000, immutable"),
        "{segment}"
    );
}

// ---------------------------------------------------------------------------
// b. file:// served over HTTP by `walcast serve` and by nginx
// ---------------------------------------------------------------------------

/// Replicate the same file:// dataset over HTTP from `walcast serve` and from
/// nginx; `get` and `scan --prefix --limit` on the replicas.
#[test]
fn b_http_serve_and_nginx() {
    let name = "b_http_serve_and_nginx";
    if skip(name) {
        return;
    }
    let started = Instant::now();
    let mut rng = Rng::new(seed(name));
    let tmp = TempDir::new().unwrap();
    let wal = tmp.path().join("wal");
    let www = tmp.path().join("www");
    let ds = www.join("ds");
    let url = file_url(&ds);
    let mut model = Model::default();
    write_random(&wal, &mut model, &mut rng, 300, GenOpts::default());
    publish_once(&wal, &url, &["--segment-bytes", "8192"], &Env::new()).ok();
    check_segment_sizes(&ds, 8192);

    let serve = Serve::start(&ds);
    let nginx = Nginx::start(&www);
    let sources = [
        ("serve", serve.url.clone()),
        ("nginx", format!("{}/ds", nginx.url())),
    ];
    let logs = |which: &str| {
        if which == "serve" {
            serve.logs()
        } else {
            nginx.logs()
        }
    };

    for round in 0..2 {
        if round == 1 {
            write_random(&wal, &mut model, &mut rng, 100, GenOpts::default());
            publish_once(&wal, &url, &["--segment-bytes", "8192"], &Env::new()).ok();
        }
        for (which, http_url) in &sources {
            let local = tmp.path().join(format!("replica-{which}"));
            let out = replicate_once(http_url, &local, &Env::new());
            assert_eq!(
                out.code,
                Some(0),
                "replicate from {which}: {}\n{}",
                out.describe(),
                logs(which)
            );
            assert_state_eq(
                &scan(&local),
                &model.map,
                &format!("replica from {which}, round {round}"),
            );
            assert_eq!(
                committed_lsn(http_url, &Env::new()),
                model.lsn(),
                "inspect {http_url}: committed_lsn"
            );
        }
    }

    let local = tmp.path().join("replica-nginx");
    let (key, value) = model.some_text_key().expect("a text key in the model");
    let out = run(&["get", "--local", p(&local), &key], &Env::new(), None).ok();
    assert_eq!(out.stdout, value, "get {key:?}: {}", out.describe());
    let out = run(
        &["get", "--local", p(&local), "no-such-key"],
        &Env::new(),
        None,
    )
    .code(1);
    assert!(
        out.stderr.contains("not found"),
        "get of an absent key: {}",
        out.describe()
    );

    let out = run(
        &[
            "scan",
            "--local",
            p(&local),
            "--prefix",
            "k00",
            "--limit",
            "5",
        ],
        &Env::new(),
        None,
    )
    .ok();
    let want: BTreeMap<_, _> = model
        .map
        .iter()
        .filter(|(k, _)| k.starts_with(b"k00"))
        .take(5)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_state_eq(
        &parse_scan(&out.stdout_str()),
        &want,
        "scan --prefix k00 --limit 5",
    );
    eprintln!("{name}: {} batches in {:?}", model.lsn(), started.elapsed());
}

// ---------------------------------------------------------------------------
// c. kill -9 the publisher, again and again
// ---------------------------------------------------------------------------

/// SIGKILL a running publisher at random moments ≥ 20 times while `write`
/// keeps committing; a final `publish --once` leaves exactly every committed
/// batch visible, once.
#[test]
fn c_publisher_kill9_exactly_once() {
    let name = "c_publisher_kill9_exactly_once";
    if skip(name) {
        return;
    }
    let started = Instant::now();
    let deadline = Deadline::after(Duration::from_secs(150), name);
    let mut rng = Rng::new(seed(name));
    let tmp = TempDir::new().unwrap();
    let wal = tmp.path().join("wal");
    let ds = tmp.path().join("ds");
    let logs = tmp.path().join("logs");
    let mid = tmp.path().join("replica-mid");
    let url = file_url(&ds);
    let opts = GenOpts {
        max_value: 300,
        ..GenOpts::default()
    };
    let mut model = Model::default();
    write_random(&wal, &mut model, &mut rng, 20, opts);

    let kills = 24;
    for i in 0..kills {
        deadline.check();
        let round = KillRound {
            i,
            name: &format!("publish-{i}"),
            wal: &wal,
            url: &url,
            logs: &logs,
        };
        round.run(&mut model, &mut rng, opts);
        if rng.pct(30) {
            let n = rng.range(1, 10) as usize;
            write_random(&wal, &mut model, &mut rng, n, opts);
        }
        if i % 6 == 5 {
            // A replica in between: prefix-consistent, at or below what was written.
            let out = replicate_once(&url, &mid, &Env::new());
            assert_eq!(
                out.code,
                Some(0),
                "replicate after kill {i}: {}",
                out.describe()
            );
            let state = scan(&mid);
            let at = model.matching_lsns(&state);
            assert!(
                !at.is_empty(),
                "replica after kill {i} equals the model at no LSN ≤ {}",
                model.lsn()
            );
            eprintln!(
                "{name}: after kill {i}: written {}, replica matches LSN(s) {at:?}",
                model.lsn()
            );
        }
    }
    publish_once(&wal, &url, &["--segment-bytes", "2000"], &Env::new()).ok();
    let last = model.lsn();
    let segments = check_segment_sizes(&ds, 2000);
    eprintln!("{name}: {segments} segment files");
    assert_eq!(
        committed_lsn(&url, &Env::new()),
        last,
        "committed_lsn after the final publish --once"
    );

    let fresh = tmp.path().join("replica-fresh");
    replicate_once(&url, &fresh, &Env::new()).ok();
    assert_state_eq(
        &scan(&fresh),
        &model.map,
        "fresh replica after 24 publisher kills",
    );
    replicate_once(&url, &mid, &Env::new()).ok();
    assert_state_eq(
        &scan(&mid),
        &model.map,
        "incremental replica after 24 publisher kills",
    );
    run(&["inspect", &url, "--verify"], &Env::new(), None).ok();
    eprintln!(
        "{name}: {kills} kills, {last} batches, {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// d. two publishers: one is fenced
// ---------------------------------------------------------------------------

/// Two long-running publishers on the same WAL and target: exactly one exits
/// with code 3 and `fenced`; the other keeps publishing.
#[test]
fn d_two_publishers_one_fenced() {
    let name = "d_two_publishers_one_fenced";
    if skip(name) {
        return;
    }
    let mut rng = Rng::new(seed(name));
    let tmp = TempDir::new().unwrap();
    let url = file_url(&tmp.path().join("ds"));
    two_publishers_one_fenced(name, &url, &Env::new(), tmp.path(), &mut rng);
}

// ---------------------------------------------------------------------------
// e. kill -9 a replica mid catch-up; it resumes
// ---------------------------------------------------------------------------

/// A replica killed mid catch-up is prefix-consistent and resumes with fewer
/// requests than a fresh replica makes.
#[test]
fn e_replica_kill9_resumes() {
    let name = "e_replica_kill9_resumes";
    if skip(name) {
        return;
    }
    let started = Instant::now();
    let mut rng = Rng::new(seed(name));
    let tmp = TempDir::new().unwrap();
    let wal = tmp.path().join("wal");
    let ds = tmp.path().join("ds");
    let logs = tmp.path().join("logs");
    let url = file_url(&ds);
    let opts = GenOpts {
        keys: 2000,
        max_value: 48,
        max_ops: 3,
        delete_pct: 10,
    };
    let mut model = Model::default();
    write_random(&wal, &mut model, &mut rng, 20_000, opts);
    eprintln!("{name}: wrote 20000 batches in {:?}", started.elapsed());
    publish_once(&wal, &url, &["--segment-bytes", "4096"], &Env::new()).ok();
    let head = inspect_json(&url, &Env::new());
    eprintln!("{name}: published in {:?}: {head}", started.elapsed());

    let segments = check_segment_sizes(&ds, 4096);
    eprintln!("{name}: {segments} segment files");
    let serve = Serve::start(&ds);

    // Kill -9 a running replica after a delay that adapts until it is caught
    // mid catch-up: some but not all LSNs applied. Every kill must leave a
    // prefix-consistent state.
    let total = model.lsn();
    let mut delay = 30u64;
    let mut dir_no = 0;
    let mut local = tmp.path().join("replica-0");
    let mut attempt = 0;
    let applied = loop {
        attempt += 1;
        assert!(
            attempt <= 40,
            "could not kill a replica mid catch-up in 40 attempts (last delay {delay} ms)"
        );
        let cmd = walcast_cmd(
            &[
                "replicate",
                &serve.url,
                "--local",
                p(&local),
                "--interval",
                "50ms",
            ],
            &Env::new(),
        );
        let mut replica = Proc::spawn(&format!("replicate-{attempt}"), cmd, &logs);
        thread::sleep(ms(delay));
        if let Some(st) = replica.try_status() {
            panic!("replicate (not --once) exited {st}\n{}", replica.logs());
        }
        kill9(&mut replica);
        let mut lsn = 0;
        if local.exists() {
            let out = run(&["scan", "--local", p(&local)], &Env::new(), None);
            if out.code == Some(0) {
                let state = parse_scan(&out.stdout_str());
                let at = model.matching_lsns(&state);
                assert!(
                    !at.is_empty(),
                    "a replica killed after {delay} ms equals the model at no LSN ({} keys)\n{}",
                    state.len(),
                    replica.logs()
                );
                lsn = *at.last().unwrap();
            } else {
                eprintln!(
                    "{name}: scan after a kill at {delay} ms failed: {}",
                    out.describe()
                );
            }
        }
        eprintln!("{name}: attempt {attempt}: killed after {delay} ms at LSN {lsn} of {total}");
        // Killed inside the first segments, a resumed replica fetches them
        // again and saves nothing to compare: too early, like LSN 0.
        if lsn < total / 50 {
            delay = delay * 3 / 2 + 10;
        } else if lsn >= total {
            dir_no += 1;
            local = tmp.path().join(format!("replica-{dir_no}"));
            delay = (delay / 3).max(5);
        } else {
            break lsn;
        }
    };
    eprintln!("{name}: replica killed mid catch-up at LSN {applied} of {total}");

    let stats: Env = vec![("WALCAST_REPLICATE_STATS".into(), "1".into())];
    let out = replicate_once(&serve.url, &local, &stats);
    assert_eq!(
        out.code,
        Some(0),
        "resume after kill -9: {}\n{}",
        out.describe(),
        serve.logs()
    );
    assert_state_eq(&scan(&local), &model.map, "resumed replica");
    let resumed = requests_stat(&out.stderr);

    let fresh = tmp.path().join("replica-fresh");
    let out = replicate_once(&serve.url, &fresh, &stats).ok();
    assert_state_eq(&scan(&fresh), &model.map, "fresh replica");
    let full = requests_stat(&out.stderr);
    eprintln!(
        "{name}: requests: resumed {resumed}, fresh {full}; {:?}",
        started.elapsed()
    );
    assert!(
        resumed < full,
        "a resumed replica must make fewer requests ({resumed}) than a fresh one ({full})"
    );
}

// ---------------------------------------------------------------------------
// f. damaged objects: never a wrong replica
// ---------------------------------------------------------------------------

struct Damaged {
    _tmp: TempDir,
    tmp: PathBuf,
    ds: PathBuf,
    model: Model,
    synced_lsn: u64,
    synced: BTreeMap<Vec<u8>, Vec<u8>>,
    replica: PathBuf,
    serve: Serve,
    /// Relative key of the segment that holds `synced_lsn + 1`.
    segment: String,
}

/// Publish options of the damaged-object cases: small segments, and no copies
/// of the newest segments in the head, so the replica must GET the segment
/// that is damaged (a head's inline copy is covered by the head's own CRC and
/// would let it catch up without touching the damaged object).
const DAMAGED_PUBLISH: &[&str] = &["--segment-bytes", "4096", "--tail-bytes", "0"];

/// Two published rounds; a replica synced to the first; the segment the
/// replica needs next is found.
fn damaged_setup(name: &str) -> (Damaged, Rng) {
    let mut rng = Rng::new(seed(name));
    let tmp = TempDir::new().unwrap();
    let root = tmp.path().to_path_buf();
    let wal = root.join("wal");
    let ds = root.join("ds");
    let url = file_url(&ds);
    let opts = GenOpts {
        max_value: 400,
        ..GenOpts::default()
    };
    let mut model = Model::default();
    write_random(&wal, &mut model, &mut rng, 150, opts);
    publish_once(&wal, &url, DAMAGED_PUBLISH, &Env::new()).ok();
    let serve = Serve::start(&ds);
    let replica = root.join("replica");
    replicate_once(&serve.url, &replica, &Env::new()).ok();
    let synced = scan(&replica);
    assert_state_eq(&synced, &model.map, "replica before the damage");
    let synced_lsn = model.lsn();
    write_random(&wal, &mut model, &mut rng, 150, opts);
    publish_once(&wal, &url, DAMAGED_PUBLISH, &Env::new()).ok();
    check_segment_sizes(&ds, 4096);
    assert_eq!(committed_lsn(&url, &Env::new()), model.lsn());

    let want = synced_lsn + 1;
    let mut found = None;
    for epoch in fs::read_dir(ds.join("segments")).expect("segments/ in the dataset") {
        let epoch = epoch.unwrap();
        for f in fs::read_dir(epoch.path()).unwrap() {
            let f = f.unwrap();
            let fname = f.file_name().into_string().unwrap();
            let Some(stem) = fname.strip_suffix(".wseg") else {
                continue;
            };
            let Some((a, b)) = stem.split_once('-') else {
                continue;
            };
            let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
            if a <= want && want <= b {
                found = Some(format!(
                    "segments/{}/{fname}",
                    epoch.file_name().to_string_lossy()
                ));
            }
        }
    }
    let segment =
        found.unwrap_or_else(|| panic!("no segment file holds LSN {want} under {}", ds.display()));
    eprintln!(
        "{name}: replica synced to LSN {synced_lsn}; committed {}; the segment it needs next is {segment}",
        model.lsn()
    );
    (
        Damaged {
            _tmp: tmp,
            tmp: root,
            ds,
            model,
            synced_lsn,
            synced,
            replica,
            serve,
            segment,
        },
        rng,
    )
}

/// The synced replica and a fresh one after the damage: both fail as `check`
/// says, the synced one keeps its state, the fresh one is at some LSN.
fn damaged_check(d: &Damaged, check: impl Fn(&Out)) {
    let out = replicate_once(&d.serve.url, &d.replica, &Env::new());
    eprintln!(
        "damaged: replicate --once exited {:?}, stderr:\n{}",
        out.code,
        out.stderr.trim_end()
    );
    check(&out);
    assert_state_eq(
        &scan(&d.replica),
        &d.synced,
        "a synced replica after the damage keeps its last good state",
    );

    let fresh = d.tmp.join("replica-fresh");
    let out = replicate_once(&d.serve.url, &fresh, &Env::new());
    if out.code == Some(0) {
        // Only possible if it bootstrapped around the damage (a snapshot).
        assert_state_eq(
            &scan(&fresh),
            &d.model.map,
            "a fresh replica that reported success",
        );
    } else if fresh.exists() {
        let out = run(&["scan", "--local", p(&fresh)], &Env::new(), None);
        if out.code == Some(0) {
            let state = parse_scan(&out.stdout_str());
            let at = d.model.matching_lsns(&state);
            assert!(
                !at.is_empty(),
                "a fresh replica after the damage equals the model at no LSN"
            );
        } else {
            eprintln!(
                "note: scan of a fresh replica that never synced: {}",
                out.describe()
            );
        }
    }
    let url = file_url(&d.ds);
    let out = run(&["inspect", &url, "--verify"], &Env::new(), None);
    assert!(
        matches!(out.code, Some(c) if c != 0),
        "inspect --verify must fail on the damaged dataset: {}",
        out.describe()
    );
    eprintln!("damaged: synced replica stayed at LSN {}", d.synced_lsn);
}

fn assert_names(out: &Out, what: &[&str]) {
    for w in what {
        assert!(
            out.stderr.contains(w),
            "stderr must contain {w:?}: {}",
            out.describe()
        );
    }
}

/// f1: one flipped byte inside a segment's records.
#[test]
fn f1_flipped_byte_in_segment() {
    let name = "f1_flipped_byte_in_segment";
    if skip(name) {
        return;
    }
    let (d, mut rng) = damaged_setup(name);
    let path = d.ds.join(&d.segment);
    let mut bytes = fs::read(&path).unwrap();
    assert!(bytes.len() > 72, "segment too small");
    let trailer = bytes.len() - 40;
    let footer = u64::from_le_bytes(bytes[trailer..trailer + 8].try_into().unwrap()) as usize;
    assert!(
        footer > 48 && footer <= trailer,
        "bad footer_offset {footer} in {}",
        d.segment
    );
    let at = rng.range(48, footer as u64 - 1) as usize;
    bytes[at] ^= 1 << rng.below(8);
    fs::write(&path, &bytes).unwrap();
    eprintln!(
        "{name}: flipped byte {at} of {} (records end at {footer})",
        bytes.len()
    );
    damaged_check(&d, |out| {
        assert_eq!(
            out.code,
            Some(1),
            "replicate over a flipped byte must exit 1: {}",
            out.describe()
        );
        assert_names(out, &[&d.segment, "LSN"]);
    });
}

/// f2: a truncated segment.
#[test]
fn f2_truncated_segment() {
    let name = "f2_truncated_segment";
    if skip(name) {
        return;
    }
    let (d, mut rng) = damaged_setup(name);
    let path = d.ds.join(&d.segment);
    let bytes = fs::read(&path).unwrap();
    let keep = rng.range(1, bytes.len() as u64 - 1) as usize;
    fs::write(&path, &bytes[..keep]).unwrap();
    eprintln!("{name}: truncated to {keep} of {} bytes", bytes.len());
    damaged_check(&d, |out| {
        assert_eq!(
            out.code,
            Some(1),
            "replicate over a truncated segment must exit 1: {}",
            out.describe()
        );
        assert_names(out, &[&d.segment]);
    });
}

/// f3: a segment the head still names is gone.
#[test]
fn f3_missing_segment() {
    let name = "f3_missing_segment";
    if skip(name) {
        return;
    }
    let (d, _rng) = damaged_setup(name);
    fs::remove_file(d.ds.join(&d.segment)).unwrap();
    damaged_check(&d, |out| {
        assert!(
            matches!(out.code, Some(c) if c != 0),
            "replicate with a missing segment must fail: {}",
            out.describe()
        );
        assert_names(out, &[&d.segment]);
        let e = out.stderr.to_lowercase();
        assert!(
            e.contains("not_found") || e.contains("missing") || e.contains("not found"),
            "stderr must say not_found/missing: {}",
            out.describe()
        );
    });
}

/// f4: the head is not JSON.
#[test]
fn f4_garbage_head() {
    let name = "f4_garbage_head";
    if skip(name) {
        return;
    }
    let (d, _rng) = damaged_setup(name);
    fs::write(d.ds.join("catalog/head.json"), "not json").unwrap();
    damaged_check(&d, |out| {
        assert!(
            matches!(out.code, Some(c) if c != 0),
            "replicate with a garbage head must fail: {}",
            out.describe()
        );
        assert_names(out, &["catalog/head.json"]);
    });
}

// ---------------------------------------------------------------------------
// The harness itself
// ---------------------------------------------------------------------------

/// moto and nginx start, answer and stop; nginx serves Range, ETag and CORS.
#[test]
fn s_test_servers_start() {
    if skip("s_test_servers_start") {
        return;
    }
    let moto = Moto::start();
    let (st, _) = http(
        "GET",
        &format!("127.0.0.1:{}", moto.port),
        "/moto-api/",
        b"",
    )
    .unwrap();
    assert_eq!(st, 200);

    let tmp = TempDir::new().unwrap();
    fs::create_dir_all(tmp.path().join("ds/catalog")).unwrap();
    fs::write(tmp.path().join("ds/catalog/head.json"), "0123456789").unwrap();
    let nginx = Nginx::start(tmp.path());
    let addr = format!("127.0.0.1:{}", nginx.port);
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    use std::io::{Read, Write};
    write!(
        s,
        "GET /ds/catalog/head.json HTTP/1.1\r\nHost: x\r\nRange: bytes=2-4\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 206"), "{resp}\n{}", nginx.logs());
    assert!(resp.ends_with("\r\n\r\n234"), "{resp}");
    let lower = resp.to_lowercase();
    assert!(lower.contains("etag:"), "{resp}");
    assert!(lower.contains("access-control-allow-origin: *"), "{resp}");
    assert!(
        lower.contains("content-type: application/octet-stream"),
        "{resp}"
    );
    let pid = nginx.pid();
    drop(nginx);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists() || {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.contains(") Z ")
        },
        "nginx {pid} still running after drop"
    );
}
