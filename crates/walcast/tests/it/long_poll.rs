//! Long-poll on the head, with real processes: `walcast serve` holds a
//! conditional head GET with a wait hint until the head changes (or the
//! wait runs out: 304), refuses a malformed `?wait=`, ignores a malformed
//! `Prefer`; `walcast publish --serve` wakes held requests at each commit;
//! `walcast replicate` follows by long-poll, seeing a write long before its
//! poll interval.
//!
//! Timing: nothing here asserts how fast anything is, only that a held
//! request is not answered before its wait (a lower bound) and that a write
//! arrives well within a poll interval of ten minutes.

use crate::support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use support::*;
use tempfile::TempDir;

/// One HTTP/1.1 GET with `headers`; (status, headers lowercased, body).
pub(crate) fn get(
    addr: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    let mut req = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&resp[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let hs = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, hs, resp[split + 4..].to_vec())
}

fn header<'a>(hs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    hs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn write_kv(wal: &Path, key: &str, value: &str) -> u64 {
    let line = format!("{{\"op\":\"put\",\"key\":\"{key}\",\"value\":\"{value}\"}}\n");
    let out = run(
        &["write", "--wal", p(wal)],
        &Env::new(),
        Some(line.as_bytes()),
    )
    .ok();
    let s = out.stdout_str();
    let lsn = s
        .trim()
        .strip_prefix("{\"lsn\":")
        .and_then(|r| r.strip_suffix('}'))
        .and_then(|n| n.parse().ok());
    lsn.unwrap_or_else(|| panic!("an LSN from walcast write: {}", out.describe()))
}

fn committed_lsn(body: &[u8]) -> u64 {
    // The head is JSON (with its checksum as the first member).
    let text = String::from_utf8_lossy(body);
    let json = &text[text.find('{').expect("JSON in the head")..];
    let v: serde_json::Value = serde_json::from_str(json).expect("head JSON");
    v["committed_lsn"].as_u64().expect("committed_lsn")
}

#[test]
fn serve_holds_a_conditional_head_get_until_the_head_changes() {
    let name = "serve_holds_a_conditional_head_get_until_the_head_changes";
    if skip(name) {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let wal = tmp.path().join("wal");
    let ds = tmp.path().join("ds");
    let url = file_url(&ds);
    write_kv(&wal, "a", "1");
    publish_once(&wal, &url, &[], &Env::new()).ok();
    let serve = Serve::start(&ds);
    let addr = serve.url.trim_start_matches("http://").to_string();
    let head = "/catalog/head.json";

    // Every head answer advertises long-poll.
    let (status, hs, body) = get(&addr, head, &[]);
    assert_eq!(status, 200);
    assert_eq!(header(&hs, "walcast-long-poll"), Some("60"), "{hs:?}");
    let etag = header(&hs, "etag").expect("an ETag").to_string();
    let first = committed_lsn(&body);

    // The wait runs out: 304, not before the wait, with Preference-Applied.
    let t = Instant::now();
    let (status, hs, _) = get(
        &addr,
        &format!("{head}?wait=1"),
        &[("If-None-Match", &etag)],
    );
    assert_eq!(status, 304);
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "held for the wait"
    );
    assert_eq!(header(&hs, "preference-applied"), Some("wait=1"));
    // A hold of an unchanged head reads it a few times, not in a loop
    // (reading the head must not wake the hold that read it).
    let before = crate::serve::rchar(serve.pid());
    let (status, _, _) = get(
        &addr,
        &format!("{head}?wait=2"),
        &[("If-None-Match", &etag)],
    );
    assert_eq!(status, 304);
    let read = crate::serve::rchar(serve.pid()) - before;
    assert!(
        read < 64 * body.len() as u64 + (64 << 10),
        "a 2 s hold of a {}-byte head read {read} bytes",
        body.len()
    );
    assert_eq!(header(&hs, "walcast-long-poll"), Some("60"));
    let (status, hs, _) = get(
        &addr,
        head,
        &[("If-None-Match", &etag), ("Prefer", "wait=1")],
    );
    assert_eq!(status, 304);
    assert_eq!(header(&hs, "preference-applied"), Some("wait=1"));

    // Malformed hints: ?wait= is refused with a message, Prefer ignored
    // (answered at once), a wait without If-None-Match answered at once.
    let (status, _, body) = get(
        &addr,
        &format!("{head}?wait=soon"),
        &[("If-None-Match", &etag)],
    );
    assert_eq!(status, 400);
    let msg = String::from_utf8_lossy(&body);
    assert!(msg.contains("wait"), "{msg}");
    let (status, hs, _) = get(
        &addr,
        head,
        &[("If-None-Match", &etag), ("Prefer", "wait=soon")],
    );
    assert_eq!(status, 304);
    assert_eq!(header(&hs, "preference-applied"), None);
    let (status, hs, _) = get(&addr, &format!("{head}?wait=30"), &[]);
    assert_eq!(status, 200);
    assert_eq!(header(&hs, "preference-applied"), None, "not held");
    // A wait whose ETag no longer matches: the head at once, not held.
    let (status, hs, _) = get(
        &addr,
        &format!("{head}?wait=30"),
        &[("If-None-Match", "\"an-older-head\"")],
    );
    assert_eq!(status, 200);
    assert_eq!(header(&hs, "preference-applied"), None, "not held");

    // A held request is answered with the new head once it is committed.
    let held = {
        let addr = addr.clone();
        let etag = etag.clone();
        thread::spawn(move || {
            get(
                &addr,
                "/catalog/head.json?wait=60",
                &[("If-None-Match", &etag)],
            )
        })
    };
    thread::sleep(Duration::from_millis(300));
    write_kv(&wal, "b", "2");
    publish_once(&wal, &url, &[], &Env::new()).ok();
    let (status, hs, body) = held.join().expect("the held request");
    assert_eq!(status, 200, "the held request sees the new head");
    assert_ne!(header(&hs, "etag"), Some(etag.as_str()));
    // The publisher's claim (a new epoch) may be the change that woke it.
    assert!(committed_lsn(&body) >= first);
    let (_, _, body) = get(&addr, head, &[]);
    assert_eq!(committed_lsn(&body), first + 1);
}

#[test]
fn replicate_follows_publish_serve_by_long_poll() {
    let name = "replicate_follows_publish_serve_by_long_poll";
    if skip(name) {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let logs = tmp.path().join("logs");
    let wal = tmp.path().join("wal");
    let ds = tmp.path().join("ds");
    let local = tmp.path().join("local");
    write_kv(&wal, "k0", "v0");
    let cmd = walcast_cmd(
        &[
            "publish",
            "--wal",
            p(&wal),
            "--to",
            &file_url(&ds),
            "--serve",
            "127.0.0.1:0",
        ],
        &Env::new(),
    );
    let mut publisher = Proc::spawn("publish", cmd, &logs);
    let addr = publisher.wait_for_addr("walcast serve: listening on");
    // Polling every ten minutes: only long-poll can bring a write sooner.
    let cmd = walcast_cmd(
        &[
            "replicate",
            &format!("http://{addr}"),
            "--local",
            p(&local),
            "--interval",
            "600s",
        ],
        &Env::new(),
    );
    let mut replica = Proc::spawn("replicate", cmd, &logs);
    let read = |key: &str| {
        let out = run(&["get", "--local", p(&local), key], &Env::new(), None);
        (out.code == Some(0)).then(|| out.stdout_str().trim().to_string())
    };
    let wait_for = |key: &str, want: &str, what: &'static str| {
        let deadline = Deadline::after(Duration::from_secs(60), what);
        loop {
            if read(key).as_deref() == Some(want) {
                return;
            }
            if deadline.passed() {
                panic!(
                    "{what}: {key} never became {want}\n{}\n{}",
                    publisher.logs(),
                    replica.logs()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for("k0", "v0", "the first write replicated");
    for i in 1..=3 {
        // Let the replica go idle on a held long-poll.
        thread::sleep(Duration::from_millis(500));
        let (k, v) = (format!("k{i}"), format!("v{i}"));
        write_kv(&wal, &k, &v);
        wait_for(&k, &v, "a write seen by long-poll, not the 600 s poll");
    }
    assert!(replica.running(), "replicate runs on:\n{}", replica.logs());
    assert!(
        publisher.running(),
        "publish runs on:\n{}",
        publisher.logs()
    );
}
