//! `walcast get --from URL` and `walcast scan --from URL`: lazy reads of a
//! remote dataset (a version 2 snapshot plus a tail that overwrites and
//! deletes its keys), over `file://` and over `walcast serve`, compared with
//! `get --local` and `scan --local` of a replica made by `replicate --once`;
//! the version 1 fallback; a damaged snapshot block; `--stats`.
//!
//! Real processes: the `walcast` binary for every step.

use crate::support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::Value;
use support::*;
use tempfile::TempDir;

/// Keys a command line can name: UTF-8, not taken for a flag.
fn arg_key(k: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(k).ok()?;
    (!s.is_empty() && !s.starts_with('-')).then(|| s.to_string())
}

/// The head of a `file://` dataset, as JSON (decoded when it is stored
/// gzip-compressed).
fn head(ds: &Path) -> Value {
    let bytes = std::fs::read(ds.join("catalog/head.json")).expect("head.json");
    let json = walcast_core::catalog::head_json(&bytes).expect("a head");
    // The checksum prefix is a JSON member: the file is one object.
    serde_json::from_slice(&json).expect("head JSON")
}

/// Writes `batches`, records them in `model`.
fn write_batches(wal: &Path, model: &mut Model, batches: &[Batch]) {
    let lsns = write(wal, batches);
    model.commit(batches, &lsns);
}

/// A dataset with a version 2 snapshot at LSN 1500 (about 1000 keys, bigger
/// than the reader's first suffix GET, so blocks are read by range) and a
/// tail of 500 LSNs over keys 0..1300: overwrites and deletes of snapshot
/// keys, and keys only the tail has. The tail's small segments spill into
/// catalog pages.
struct Dataset {
    tmp: TempDir,
    ds: std::path::PathBuf,
    model: Model,
    snapshot_lsn: u64,
}

fn dataset(name: &str) -> Dataset {
    dataset_with(name, &[])
}

/// [`dataset`], with `more` flags for the second publish (the tail).
fn dataset_with(name: &str, more: &[&str]) -> Dataset {
    let mut rng = Rng::new(seed(name));
    let tmp = TempDir::new().unwrap();
    let wal = tmp.path().join("wal");
    let ds = tmp.path().join("ds");
    let url = file_url(&ds);
    let mut model = Model::default();
    let round1 = GenOpts {
        keys: 1000,
        max_value: 2048,
        max_ops: 4,
        delete_pct: 5,
    };
    write_batches(&wal, &mut model, &gen_batches(&mut rng, 1500, round1));
    publish_once(
        &wal,
        &url,
        &["--snapshot-every", "1500", "--segment-bytes", "65536"],
        &Env::new(),
    )
    .ok();
    let round2 = GenOpts {
        keys: 1300,
        max_value: 600,
        max_ops: 5,
        delete_pct: 30,
    };
    write_batches(&wal, &mut model, &gen_batches(&mut rng, 500, round2));
    let flags = ["--snapshot-every", "1500", "--segment-bytes", "1024"];
    publish_once(&wal, &url, &[&flags[..], more].concat(), &Env::new()).ok();
    let h = head(&ds);
    assert_eq!(h["committed_lsn"], 2000, "{h}");
    assert_eq!(h["snapshot"]["lsn"], 1500, "a snapshot at 1500: {h}");
    let snap = ds.join(h["snapshot"]["key"].as_str().unwrap());
    let bytes = std::fs::read(&snap).unwrap();
    assert_eq!(&bytes[..6], b"WCSN\x02\x00", "a version 2 snapshot");
    assert!(bytes.len() > 64 << 10, "{} bytes", bytes.len());
    Dataset {
        tmp,
        ds,
        model,
        snapshot_lsn: 1500,
    }
}

/// Keys of every kind: in the snapshot only, overwritten or deleted by the
/// tail, only in the tail, never written; at most `per` of each.
fn sample_keys(d: &Dataset, per: usize) -> Vec<String> {
    let at_snap = d.model.at(d.snapshot_lsn);
    let mut touched = BTreeSet::new();
    for b in &d.model.history[d.snapshot_lsn as usize..] {
        for op in &b.ops {
            match op {
                Op::Put(k, _) | Op::Delete(k) => touched.insert(k.clone()),
            };
        }
    }
    let mut kinds: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let all: BTreeSet<Vec<u8>> = at_snap
        .keys()
        .chain(d.model.map.keys())
        .chain(touched.iter())
        .cloned()
        .collect();
    for k in &all {
        let Some(s) = arg_key(k) else { continue };
        let kind = match (at_snap.get(k), d.model.map.get(k), touched.contains(k)) {
            (Some(_), Some(_), false) => "snapshot only",
            (Some(_), Some(_), true) => "overwritten",
            (Some(_), None, _) => "deleted",
            (None, Some(_), _) => "tail only",
            (None, None, _) => "written and deleted in the tail",
        };
        let v = kinds.entry(kind).or_default();
        if v.len() < per {
            v.push(s);
        }
    }
    for kind in ["snapshot only", "overwritten", "deleted", "tail only"] {
        assert!(
            kinds.get(kind).is_some_and(|v| !v.is_empty()),
            "no key of kind {kind:?}: {kinds:?}"
        );
    }
    let mut keys: Vec<String> = kinds.into_values().flatten().collect();
    keys.extend(["k9999", "never", "ключ/9999", "zzz"].map(String::from));
    keys
}

/// `get --from` and `scan --from` at `url` equal `--local` reads of `local`
/// and the model.
fn compare(d: &Dataset, url: &str, local: &Path, keys: &[String]) {
    for key in keys {
        let lazy = run(&["get", "--from", url, key], &Env::new(), None);
        let want = d.model.map.get(key.as_bytes());
        match want {
            Some(v) => {
                let lazy = lazy.ok();
                assert_eq!(&lazy.stdout, v, "get --from {url} {key}");
            }
            None => {
                let lazy = lazy.code(1);
                assert!(lazy.stdout.is_empty(), "{}", lazy.describe());
                assert!(lazy.stderr.contains("not found"), "{}", lazy.describe());
            }
        }
        let local = run(&["get", "--local", p(local), key], &Env::new(), None);
        assert_eq!(local.code, Some(if want.is_some() { 0 } else { 1 }));
        assert_eq!(local.stdout, want.cloned().unwrap_or_default(), "{key}");
    }
    let limits: [Option<&str>; 5] = [None, Some("1"), Some("7"), Some("60"), Some("0")];
    for prefix in ["", "k", "k0", "k01", "k12", "ключ/", "zz"] {
        for limit in limits {
            let mut tail = vec!["--prefix", prefix];
            if let Some(l) = limit {
                tail.extend(["--limit", l]);
            }
            let lazy = run(
                &[&["scan", "--from", url][..], &tail].concat(),
                &Env::new(),
                None,
            )
            .ok();
            let local_out = run(
                &[&["scan", "--local", p(local)][..], &tail].concat(),
                &Env::new(),
                None,
            )
            .ok();
            assert_eq!(
                lazy.stdout_str(),
                local_out.stdout_str(),
                "scan --prefix {prefix:?} --limit {limit:?} from {url}"
            );
            let want: BTreeMap<_, _> = d
                .model
                .map
                .iter()
                .filter(|(k, _)| k.starts_with(prefix.as_bytes()))
                .take(limit.map_or(usize::MAX, |l| l.parse().unwrap()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            assert_state_eq(
                &parse_scan(&lazy.stdout_str()),
                &want,
                &format!("scan --from {url} --prefix {prefix:?} --limit {limit:?}"),
            );
        }
    }
}

#[test]
fn lazy_reads_equal_a_replica_over_file_and_http() {
    let d = dataset("lazy_reads_equal_a_replica_over_file_and_http");
    let url = file_url(&d.ds);
    let local = d.tmp.path().join("replica");
    replicate_once(&url, &local, &Env::new()).ok();
    assert_state_eq(&scan(&local), &d.model.map, "the replica");
    let keys = sample_keys(&d, 25);
    compare(&d, &url, &local, &keys);
    let serve = Serve::start(&d.ds);
    compare(&d, &serve.url, &local, &keys);

    // --stats: one JSON line on stderr, the value on stdout.
    let key = keys.first().unwrap();
    let out = run(
        &["get", "--from", &serve.url, "--stats", key],
        &Env::new(),
        None,
    );
    let line = out
        .stderr
        .lines()
        .find(|l| l.starts_with("{\"gets\":"))
        .unwrap_or_else(|| panic!("no stats line: {}", out.describe()));
    let v: Value = serde_json::from_str(line).unwrap();
    let (gets, bytes, rounds) = (
        v["gets"].as_u64().unwrap(),
        v["bytes"].as_u64().unwrap(),
        v["round_trips"].as_u64().unwrap(),
    );
    assert!(rounds >= 2 && gets > rounds && bytes > 0, "{line}");
    let out = run(
        &["scan", "--from", &url, "--stats", "--limit", "3"],
        &Env::new(),
        None,
    )
    .ok();
    assert!(
        out.stderr.contains("\"round_trips\":"),
        "{}",
        out.describe()
    );
    assert_eq!(out.stdout_str().lines().count(), 3);
}

/// A dataset whose tail is covered by delta snapshots: `walcast serve`
/// serves them (with ranges), and lazy reads through them over HTTP equal
/// the origin's state.
#[test]
fn lazy_reads_through_deltas_over_http() {
    let d = dataset_with(
        "lazy_reads_through_deltas_over_http",
        &["--delta-every", "100", "--snapshot-ratio", "2"],
    );
    let h = head(&d.ds);
    let deltas = h["deltas"].as_array().cloned().unwrap_or_default();
    assert!(!deltas.is_empty(), "deltas over the snapshot: {h}");
    // (Named by its file:// URL, as the other commands name it.)
    let serve = Serve::start_at(&file_url(&d.ds));
    let key = deltas[0]["key"].as_str().unwrap();
    let size = deltas[0]["size"].as_u64().unwrap();
    let addr = serve.url.strip_prefix("http://").unwrap();
    let (status, _, body) = crate::long_poll::get(addr, &format!("/{key}"), &[]);
    assert_eq!((status, body.len() as u64), (200, size), "GET {key}");
    let (status, _, body) =
        crate::long_poll::get(addr, &format!("/{key}"), &[("Range", "bytes=-64")]);
    assert_eq!((status, body.len()), (206, 64), "ranged GET {key}");
    let local = d.tmp.path().join("replica");
    replicate_once(&file_url(&d.ds), &local, &Env::new()).ok();
    assert_state_eq(&scan(&local), &d.model.map, "the replica");
    compare(&d, &serve.url, &local, &sample_keys(&d, 10));
}

/// `--pointer-deltas`: the chain's deltas name records in segments; lazy
/// reads through them over HTTP (`get --from`, ranged GETs of the slot
/// pages and the records) equal the origin's state, and `inspect --verify`
/// verifies them whole. A later `publish --once` (a new process, which
/// replays the WAL) still writes pointer deltas, those that absorb the
/// last run's included: it places the replayed records in the catalog's
/// segments, most of them listed in pages.
#[test]
fn lazy_reads_through_pointer_deltas_over_http() {
    let mut d = dataset_with(
        "lazy_reads_through_pointer_deltas_over_http",
        &[
            "--delta-every",
            "100",
            "--snapshot-ratio",
            "2",
            "--pointer-deltas",
        ],
    );
    let h = head(&d.ds);
    let deltas = h["deltas"].as_array().cloned().unwrap_or_default();
    assert!(
        deltas
            .iter()
            .any(|d| d["slots"]["pages"].as_u64().is_some()),
        "pointer deltas over the snapshot: {h}"
    );
    let serve = Serve::start_at(&file_url(&d.ds));
    // A replica, lazy reads over HTTP and `inspect --verify` (a delta that
    // fails to verify whole fails the command) against the origin.
    let readers_agree = |d: &Dataset, replica: &str| {
        let local = d.tmp.path().join(replica);
        replicate_once(&file_url(&d.ds), &local, &Env::new()).ok();
        assert_state_eq(&scan(&local), &d.model.map, "the replica");
        compare(d, &serve.url, &local, &sample_keys(d, 10));
        run(
            &["inspect", &file_url(&d.ds), "--verify"],
            &Env::new(),
            None,
        )
        .ok();
    };
    readers_agree(&d, "replica");

    let epoch = h["epoch"].as_u64().unwrap();
    let wal = d.tmp.path().join("wal");
    let mut rng = Rng::new(seed("a later run"));
    let round3 = GenOpts {
        keys: 1300,
        max_value: 600,
        max_ops: 5,
        delete_pct: 10,
    };
    write_batches(&wal, &mut d.model, &gen_batches(&mut rng, 400, round3));
    let flags = [
        "--snapshot-every",
        "1500",
        "--segment-bytes",
        "1024",
        "--delta-every",
        "100",
        "--snapshot-ratio",
        "2",
        "--pointer-deltas",
    ];
    publish_once(&wal, &file_url(&d.ds), &flags, &Env::new()).ok();
    let h = head(&d.ds);
    assert_eq!(h["committed_lsn"], 2400, "{h}");
    assert!(h["pages"].as_array().is_some_and(|p| !p.is_empty()), "{h}");
    let later: Vec<_> = h["deltas"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|x| x["epoch"].as_u64() > Some(epoch))
        .collect();
    assert!(
        later.iter().any(|x| x["base_lsn"].as_u64() < Some(2000)),
        "a delta of the later run absorbing the last run's: {h}"
    );
    assert!(
        later.iter().all(|x| x["slots"]["pages"].as_u64().is_some()),
        "every delta of the later run points at records: {h}"
    );
    readers_agree(&d, "replica2");
}

/// `--head-encoding gzip`: the head is stored as one gzip stream, and
/// every reader reads it as the JSON head: `replicate`, `get --from` and
/// `scan --from` over `file://` and over `walcast serve` (which labels it
/// Content-Encoding: gzip for clients that accept gzip, and sends it as it
/// is to others), and `inspect --verify`, which reports both sizes.
#[test]
fn heads_stored_gzip_compressed_are_read_everywhere() {
    let d = dataset_with(
        "heads_stored_gzip_compressed_are_read_everywhere",
        &["--delta-every", "100", "--head-encoding", "gzip"],
    );
    let stored = std::fs::read(d.ds.join("catalog/head.json")).unwrap();
    assert_eq!(&stored[..2], &[0x1f, 0x8b], "a gzip head");
    let h = head(&d.ds);
    assert!(
        h["deltas"].as_array().is_some_and(|a| !a.is_empty()),
        "deltas over the snapshot: {h}"
    );
    let url = file_url(&d.ds);
    let local = d.tmp.path().join("replica");
    replicate_once(&url, &local, &Env::new()).ok();
    assert_state_eq(&scan(&local), &d.model.map, "the replica over file://");
    let keys = sample_keys(&d, 4);
    compare(&d, &url, &local, &keys);
    let serve = Serve::start(&d.ds);
    let over_http = d.tmp.path().join("replica-http");
    replicate_once(&serve.url, &over_http, &Env::new()).ok();
    assert_state_eq(&scan(&over_http), &d.model.map, "the replica over HTTP");
    compare(&d, &serve.url, &local, &keys);

    let addr = serve.url.strip_prefix("http://").unwrap();
    let header = |headers: &[(String, String)], name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let (status, headers, body) = crate::long_poll::get(
        addr,
        "/catalog/head.json",
        &[("Accept-Encoding", "br, gzip;q=0.5")],
    );
    assert_eq!(status, 200);
    assert_eq!(
        header(&headers, "content-encoding").as_deref(),
        Some("gzip")
    );
    assert_eq!(
        header(&headers, "content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(header(&headers, "vary").as_deref(), Some("accept-encoding"));
    assert_eq!(body, stored, "the stored bytes, labelled");
    // A 304 varies on Accept-Encoding too, and labels no body.
    let etag = header(&headers, "etag").expect("an ETag");
    let (status, headers, _) = crate::long_poll::get(
        addr,
        "/catalog/head.json",
        &[("Accept-Encoding", "gzip"), ("If-None-Match", &etag)],
    );
    assert_eq!(status, 304);
    assert_eq!(header(&headers, "content-encoding"), None);
    assert_eq!(header(&headers, "vary").as_deref(), Some("accept-encoding"));
    // So does one that ends a long-poll held for a change that did not come.
    let (status, headers, _) = crate::long_poll::get(
        addr,
        "/catalog/head.json",
        &[
            ("Accept-Encoding", "gzip"),
            ("If-None-Match", &etag),
            ("Prefer", "wait=1"),
        ],
    );
    assert_eq!(status, 304);
    assert_eq!(header(&headers, "vary").as_deref(), Some("accept-encoding"));
    for accept in [None, Some("identity"), Some("gzip;q=0")] {
        let extra: Vec<(&str, &str)> = accept.map(|a| ("Accept-Encoding", a)).into_iter().collect();
        let (status, headers, body) = crate::long_poll::get(addr, "/catalog/head.json", &extra);
        assert_eq!(status, 200);
        assert_eq!(header(&headers, "content-encoding"), None, "{accept:?}");
        assert_eq!(
            header(&headers, "content-type").as_deref(),
            Some("application/gzip"),
            "{accept:?}"
        );
        assert_eq!(body, stored, "{accept:?}");
    }

    let out = run(&["inspect", &url, "--verify"], &Env::new(), None).ok();
    assert!(
        out.stdout_str()
            .contains(&format!("head         {} bytes, gzip of", stored.len())),
        "{}",
        out.describe()
    );
    let v = inspect_json(&url, &Env::new());
    let (bytes, json) = (
        v["head_bytes"].as_u64().unwrap(),
        v["head_json_bytes"].as_u64().unwrap(),
    );
    assert_eq!(bytes, stored.len() as u64);
    assert!(json > bytes, "{v}");
    assert_eq!(v["head_encoding"], "gzip", "{v}");
}

/// `inspect --verify` reads every delta the head names: a clean dataset
/// passes, and a delta with one byte flipped in a data block fails, naming
/// the delta.
#[test]
fn inspect_verifies_the_deltas() {
    let d = dataset_with(
        "inspect_verifies_the_deltas",
        &["--delta-every", "100", "--snapshot-ratio", "2"],
    );
    let url = file_url(&d.ds);
    run(&["inspect", &url, "--verify"], &Env::new(), None).ok();
    let h = head(&d.ds);
    let deltas = h["deltas"].as_array().cloned().unwrap_or_default();
    assert!(!deltas.is_empty(), "deltas over the snapshot: {h}");
    let key = deltas[0]["key"].as_str().unwrap();
    let path = d.ds.join(key);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[60] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let out = run(&["inspect", &url, "--verify"], &Env::new(), None);
    assert!(matches!(out.code, Some(c) if c != 0), "{}", out.describe());
    let text = format!("{}{}", out.stdout_str(), out.stderr);
    assert!(text.contains(key), "{}", out.describe());
}

/// `--snapshot-ratio` takes a positive multiple; anything else is refused
/// before anything is published, naming the flag's value.
#[test]
fn snapshot_ratio_must_be_a_positive_multiple() {
    let tmp = TempDir::new().unwrap();
    let wal = p(tmp.path());
    let url = file_url(tmp.path());
    for bad in ["0", "-1", "nan", "inf", "two"] {
        let flag = format!("--snapshot-ratio={bad}");
        let out = run(
            &["publish", "--wal", wal, "--to", &url, "--once", &flag],
            &Env::new(),
            None,
        );
        assert_eq!(out.code, Some(2), "{bad}: {}", out.describe());
        assert!(
            out.stderr.contains("invalid ratio"),
            "{bad}: {}",
            out.describe()
        );
    }
}

/// `inspect --verify` over a head naming a segment above the size a
/// replica reads: reported, naming the segment, without reading it.
#[test]
fn inspect_reports_an_oversized_segment_without_reading_it() {
    let tmp = TempDir::new().unwrap();
    let wal = tmp.path().join("wal");
    let ds = tmp.path().join("ds");
    let url = file_url(&ds);
    let lines = "{\"op\":\"put\",\"key\":\"a\",\"value\":\"1\"}\n";
    run(
        &["write", "--wal", p(&wal)],
        &Env::new(),
        Some(lines.as_bytes()),
    )
    .ok();
    publish_once(&wal, &url, &[], &Env::new()).ok();
    let path = ds.join(walcast_core::catalog::HEAD_KEY);
    let mut h = walcast_core::catalog::Head::decode(&std::fs::read(&path).unwrap()).unwrap();
    h.segments[0].size = walcast_core::catalog::MAX_SEGMENT_BYTES + 1;
    let key = h.segments[0].key.clone();
    std::fs::write(&path, h.encode()).unwrap();
    let out = run(&["inspect", &url, "--verify"], &Env::new(), None);
    assert!(matches!(out.code, Some(c) if c != 0), "{}", out.describe());
    let text = format!("{}{}", out.stdout_str(), out.stderr);
    assert!(
        text.contains(&key) && text.contains("above the limit"),
        "{}",
        out.describe()
    );
}

#[test]
fn exactly_one_source() {
    let tmp = TempDir::new().unwrap();
    let dir = p(tmp.path());
    let url = file_url(tmp.path());
    for args in [
        vec!["get", "k"],
        vec!["get", "--local", dir, "--from", &url, "k"],
        vec!["scan"],
        vec!["scan", "--local", dir, "--from", &url],
        vec!["get", "--local", dir, "--stats", "k"],
    ] {
        let out = run(&args, &Env::new(), None);
        assert_eq!(out.code, Some(2), "{}", out.describe());
    }
}

/// A version 1 snapshot (as publishers before version 2 wrote) is read
/// whole, with a warning, and answers the same.
#[test]
fn version_1_snapshot_falls_back_to_a_whole_read() {
    use walcast::publish::{publish, PublishOptions};
    use walcast::store::Store;
    use walcast::wal::Writer;
    use walcast_core::batch::Op as KvOp;
    use walcast_core::publisher::{PublisherConfig, SnapshotFormat};

    let tmp = TempDir::new().unwrap();
    let wal = tmp.path().join("wal");
    let ds = tmp.path().join("ds");
    let url = file_url(&ds);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let w = Writer::open(&wal).unwrap();
    let round = || {
        let opts = PublishOptions {
            config: PublisherConfig {
                snapshot_every: Some(300),
                snapshot_format: SnapshotFormat::Chunked,
                ..PublisherConfig::default()
            },
            once: true,
            ..PublishOptions::default()
        };
        rt.block_on(publish(
            wal.clone(),
            Store::open(&url).unwrap(),
            opts,
            std::future::pending(),
            |_| {},
        ))
        .unwrap();
    };
    for i in 0..300 {
        w.commit(&[KvOp::put(format!("v1:{i:04}"), "x".repeat(i % 400))])
            .unwrap();
    }
    round();
    for i in 0..60 {
        let key = format!("v1:{:04}", i * 5);
        let op = match i % 3 {
            0 => KvOp::delete(key),
            1 => KvOp::put(key, format!("new {i}")),
            _ => KvOp::put(format!("v1:tail:{i}"), "t"),
        };
        w.commit(&[op]).unwrap();
    }
    round();
    let h = head(&ds);
    assert_eq!(h["snapshot"]["lsn"], 300, "{h}");
    let snap = std::fs::read(ds.join(h["snapshot"]["key"].as_str().unwrap())).unwrap();
    assert_eq!(&snap[..6], b"WCSN\x01\x00", "a version 1 snapshot");

    let local = tmp.path().join("replica");
    replicate_once(&url, &local, &Env::new()).ok();
    let serve = Serve::start(&ds);
    for source in [url.as_str(), serve.url.as_str()] {
        for key in [
            "v1:0000",
            "v1:0005",
            "v1:0010",
            "v1:0011",
            "v1:tail:2",
            "v1:0299",
            "v1:9999",
        ] {
            let lazy = run(&["get", "--from", source, key], &Env::new(), None);
            let loc = run(&["get", "--local", p(&local), key], &Env::new(), None);
            assert_eq!(
                (lazy.code, &lazy.stdout),
                (loc.code, &loc.stdout),
                "get {key} from {source}: {}",
                lazy.describe()
            );
            if lazy.code == Some(0) || key == "v1:0000" {
                assert!(
                    lazy.stderr.contains("version 1"),
                    "a warning: {}",
                    lazy.describe()
                );
            }
        }
        for (prefix, limit) in [("v1:", "10"), ("v1:00", "1000"), ("v1:t", "2")] {
            let lazy = run(
                &[
                    "scan", "--from", source, "--prefix", prefix, "--limit", limit,
                ],
                &Env::new(),
                None,
            )
            .ok();
            let loc = run(
                &[
                    "scan",
                    "--local",
                    p(&local),
                    "--prefix",
                    prefix,
                    "--limit",
                    limit,
                ],
                &Env::new(),
                None,
            )
            .ok();
            assert_eq!(lazy.stdout_str(), loc.stdout_str(), "scan {prefix} {limit}");
        }
    }
}

/// A flipped byte in a snapshot data block: `get --from` and `scan --from`
/// exit 1 with a data error naming the snapshot; keys in other blocks and
/// keys the tail settles still read.
#[test]
fn damaged_snapshot_block_is_a_data_error() {
    let tmp = TempDir::new().unwrap();
    let wal = tmp.path().join("wal");
    let ds = tmp.path().join("ds");
    let url = file_url(&ds);
    let value = "v".repeat(100);
    let mut lines = String::new();
    for i in 0..3000 {
        lines.push_str(&format!(
            "{{\"op\":\"put\",\"key\":\"s:{i:04}\",\"value\":\"{value}\"}}\n"
        ));
    }
    run(
        &["write", "--wal", p(&wal)],
        &Env::new(),
        Some(lines.as_bytes()),
    )
    .ok();
    publish_once(&wal, &url, &["--snapshot-every", "3000"], &Env::new()).ok();
    let tail = "{\"op\":\"put\",\"key\":\"t:1\",\"value\":\"tail\"}\n\
                {\"op\":\"put\",\"key\":\"s:0001\",\"value\":\"new\"}\n";
    run(
        &["write", "--wal", p(&wal)],
        &Env::new(),
        Some(tail.as_bytes()),
    )
    .ok();
    publish_once(&wal, &url, &["--snapshot-every", "3000"], &Env::new()).ok();
    let h = head(&ds);
    let key = h["snapshot"]["key"].as_str().unwrap().to_string();
    assert_eq!(h["snapshot"]["lsn"], 3000, "{h}");

    // The first data block starts right after the 56-byte header; its body
    // after the 12-byte block header. It holds s:0000.
    let path = ds.join(&key);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[56 + 12 + 40] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();

    let serve = Serve::start(&ds);
    for source in [url.as_str(), serve.url.as_str()] {
        for args in [
            vec!["get", "--from", source, "s:0000"],
            vec!["scan", "--from", source, "--prefix", "s:"],
        ] {
            let out = run(&args, &Env::new(), None).code(1);
            assert!(
                out.stderr.contains("data") && out.stderr.contains(&key),
                "a data error naming {key}: {}",
                out.describe()
            );
            assert!(out.stdout.is_empty(), "{}", out.describe());
        }
        let out = run(&["get", "--from", source, "s:2999"], &Env::new(), None).ok();
        assert_eq!(out.stdout, value.as_bytes());
        let out = run(&["get", "--from", source, "s:0001"], &Env::new(), None).ok();
        assert_eq!(out.stdout, b"new");
        let out = run(&["get", "--from", source, "t:1"], &Env::new(), None).ok();
        assert_eq!(out.stdout, b"tail");
    }
}

/// A FIFO at an object's path (a hostile or broken dataset directory) fails
/// the GET of that object, over file:// and through `walcast serve` alike,
/// instead of blocking in the open until another process writes to it.
#[test]
fn a_fifo_at_an_object_path_fails_its_get_instead_of_hanging() {
    let tmp = TempDir::new().unwrap();
    let wal = tmp.path().join("wal");
    let ds = tmp.path().join("ds");
    let url = file_url(&ds);
    let mut lines = String::new();
    for i in 0..300 {
        lines.push_str(&format!(
            "{{\"op\":\"put\",\"key\":\"f:{i:04}\",\"value\":\"v{i}\"}}\n"
        ));
    }
    run(
        &["write", "--wal", p(&wal)],
        &Env::new(),
        Some(lines.as_bytes()),
    )
    .ok();
    publish_once(&wal, &url, &["--snapshot-every", "300"], &Env::new()).ok();
    let h = head(&ds);
    let snap = h["snapshot"]["key"].as_str().unwrap().to_string();
    let serve = Serve::start(&ds);
    for (object, what) in [
        (snap.as_str(), "the snapshot"),
        ("catalog/head.json", "the head"),
    ] {
        let path = ds.join(object);
        let kept = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(made.success(), "mkfifo {}", path.display());
        for source in [url.as_str(), serve.url.as_str()] {
            let out = run_timeout(
                &["get", "--from", source, "f:0001"],
                &Env::new(),
                None,
                std::time::Duration::from_secs(60),
            );
            assert_ne!(out.code, Some(0), "{what} is a FIFO: {}", out.describe());
            assert!(out.stdout.is_empty(), "{}", out.describe());
        }
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, kept).unwrap();
    }
    let out = run(&["get", "--from", &url, "f:0001"], &Env::new(), None).ok();
    assert_eq!(out.stdout, b"v1");
}

/// A head is one gzip stream of its JSON: a gzip stream of a gzip head
/// (what a proxy that compresses `application/gzip` again would store or
/// send) is refused by `get --from`, `scan --from`, `replicate` and
/// `inspect` alike, as the publisher's own read of the head refuses it.
#[test]
fn a_gzip_head_compressed_twice_is_refused_by_every_reader() {
    let d = dataset_with(
        "a_gzip_head_compressed_twice_is_refused_by_every_reader",
        &["--head-encoding", "gzip"],
    );
    let path = d.ds.join("catalog/head.json");
    let stored = std::fs::read(&path).unwrap();
    assert_eq!(&stored[..2], &[0x1f, 0x8b], "a gzip head");
    assert!(walcast_core::catalog::Head::decode(&stored).is_ok());
    let twice = walcast_core::catalog::gzip_head(&stored);
    assert!(
        walcast_core::catalog::Head::decode(&twice).is_err(),
        "the publisher's read refuses it"
    );
    std::fs::write(&path, &twice).unwrap();
    let url = file_url(&d.ds);
    let key = String::from_utf8(d.model.map.keys().next().unwrap().clone()).unwrap();
    let local = d.tmp.path().join("replica");
    for args in [
        vec!["get", "--from", &url, &key],
        vec!["scan", "--from", &url, "--limit", "1"],
        vec!["inspect", &url],
        vec!["replicate", &url, "--local", p(&local), "--once"],
    ] {
        let out = run_timeout(&args, &Env::new(), None, std::time::Duration::from_secs(60));
        assert!(
            out.code != Some(0) && out.stderr.contains("catalog/head.json"),
            "{}",
            out.describe()
        );
    }
}
