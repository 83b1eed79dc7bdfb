//! Unit tests of `walcast serve`'s parts.

use super::*;

#[test]
fn ranges() {
    use RangeReq::*;
    assert_eq!(parse_range(b"bytes=0-9", 100), Slice(0, 9));
    assert_eq!(parse_range(b"bytes=90-200", 100), Slice(90, 99));
    assert_eq!(parse_range(b"Bytes=10-", 100), Slice(10, 99));
    assert_eq!(parse_range(b"bytes=-10", 100), Slice(90, 99));
    assert_eq!(parse_range(b"bytes=-1000", 100), Slice(0, 99));
    assert_eq!(parse_range(b"bytes=100-", 100), Unsatisfiable);
    assert_eq!(parse_range(b"bytes=100-200", 100), Unsatisfiable);
    assert_eq!(parse_range(b"bytes=-0", 100), Unsatisfiable);
    assert_eq!(parse_range(b"bytes=0-", 0), Unsatisfiable);
    assert_eq!(parse_range(b"bytes=-5", 0), Unsatisfiable);
    assert_eq!(parse_range(b"bytes=0-1,3-4", 100), Ignore);
    assert_eq!(parse_range(b"bytes=5-1", 100), Ignore);
    assert_eq!(parse_range(b"bytes=-", 100), Ignore);
    assert_eq!(parse_range(b"bytes=a-b", 100), Ignore);
    assert_eq!(parse_range(b"bytes=+1-2", 100), Ignore);
    assert_eq!(parse_range(b"items=0-1", 100), Ignore);
    assert_eq!(parse_range(b"bytes 0-1", 100), Ignore);
    assert_eq!(parse_range(b"bytes=99999999999999999999-", 100), Ignore);
}

#[test]
fn objects() {
    use Object::*;
    let ok = [
        ("catalog/head.json", Head),
        (
            "catalog/pages/0-00000000000000000001-00000000000000000005-1.json",
            Page,
        ),
        (
            "catalog/pages/4294967295-00000000000000000001-18446744073709551615-18446744073709551615.json",
            Page,
        ),
        (
            "segments/1/00000000000000000001-00000000000000000010.wseg",
            Segment,
        ),
        (
            "segments/18446744073709551615/00000000000000000001-00000000000000000010.wseg",
            Segment,
        ),
        ("snapshots/00000000000000000010-1.wsnap", Snapshot),
        (
            "deltas/00000000000000000010-00000000000000000020-1.wdelta",
            Delta,
        ),
    ];
    for (rel, kind) in ok {
        assert_eq!(Object::of(rel), Some(kind), "{rel}");
        // Under a prefix of plain names (several datasets in one root).
        for prefix in ["i1/basic", "app", "a-b_c.d/0"] {
            let rel = format!("{prefix}/{rel}");
            assert_eq!(Object::of(&rel), Some(kind), "{rel}");
        }
        for prefix in [".git", "a/.hidden", "a/..", "a b", "a%2f", "~user", "a\\b"] {
            let rel = format!("{prefix}/{rel}");
            assert_eq!(Object::of(&rel), None, "{rel}");
        }
    }
    assert_eq!(Object::of(&segment_key(7, 100, 200)), Some(Segment));
    assert_eq!(Object::of(&snapshot_key(100, 7)), Some(Snapshot));
    assert_eq!(Object::of(&page_key(2, 1, 99, 7)), Some(Page));
    assert_eq!(Object::of(&delta_key(100, 200, 7)), Some(Delta));
    for rel in [
        "",
        "catalog",
        "catalog/head.json.tmp",
        "catalog/.head.lock",
        "catalog/.tmpabc",
        "catalog/pages/0.json",
        "catalog/pages/4294967296-00000000000000000001-00000000000000000005-1.json",
        "catalog/pages/0-00000000000000000001-00000000000000000005-01.json",
        "catalog/pages/0-00000000000000000001-00000000000000000005-1-2.json",
        "catalog/pages/0-00000000000000000001-00000000000000000005-.json",
        "segments/1/1-10.wseg",
        "segments/1/00000000000000000001-00000000000000000010.wseg#1",
        "segments/1/00000000000000000001-00000000000000000010.wseg/x",
        "segments/+1/00000000000000000001-00000000000000000010.wseg",
        "segments/1/00000000000000000001-00000000000000000010-3.wseg",
        "segments/1/x/00000000000000000001-00000000000000000010.wseg",
        "segments/18446744073709551616/00000000000000000001-00000000000000000010.wseg",
        "segments/1/.00000000000000000001-00000000000000000010.wseg",
        "segments/00000000000000000001-00000000000000000010.wseg",
        "snapshots/00000000000000000010.wsnap",
        "snapshots/00000000000000000010-1.wsnap.tmp",
        "snapshots/0000000000000000010-1.wsnap",
        "deltas/00000000000000000010-1.wdelta",
        "deltas/00000000000000000010-00000000000000000020.wdelta",
        "deltas/00000000000000000010-0000000000000000020-1.wdelta",
        "deltas/00000000000000000010-00000000000000000020-1.wdelta.tmp",
        "deltas/00000000000000000010-00000000000000000020-1-2.wdelta",
        ".env",
        "../catalog/head.json",
        "a/catalog/head.json/b",
        "catalog/head.json/catalog/pages",
        "x/.tmp1/catalog/head.json",
    ] {
        assert_eq!(Object::of(rel), None, "{rel}");
    }
}

#[test]
fn cors_origins() {
    for (given, want) in [
        ("*", "*"),
        ("https://app.example", "https://app.example"),
        ("https://App.Example/", "https://app.example"),
        ("https://app.example:443", "https://app.example"),
        ("http://localhost:3000", "http://localhost:3000"),
        ("https://bücher.example", "https://xn--bcher-kva.example"),
    ] {
        assert_eq!(parse_cors_origin(given).as_deref(), Ok(want), "{given}");
    }
    for bad in [
        "",
        "app.example",
        "https://app.example/path",
        "https://app.example/?q",
        "https://user@app.example",
        "null",
        "data:text/plain,x",
    ] {
        assert!(parse_cors_origin(bad).is_err(), "{bad}");
    }
}

#[test]
fn paths() {
    assert_eq!(
        relative_path("/catalog/head.json").as_deref(),
        Some("catalog/head.json")
    );
    assert_eq!(
        relative_path("//segments///1/a.wseg").as_deref(),
        Some("segments/1/a.wseg")
    );
    assert_eq!(relative_path("/a%20b").as_deref(), Some("a b"));
    assert_eq!(relative_path("/"), None);
    assert_eq!(relative_path("/../etc/passwd"), None);
    assert_eq!(relative_path("/%2e%2e/etc/passwd"), None);
    assert_eq!(relative_path("/a/%2E%2E%2f%2e%2e/x"), None);
    assert_eq!(relative_path("/a/./b"), None);
    assert_eq!(relative_path("/a%00b"), None);
    assert_eq!(relative_path("/a%5c..%5cb"), None);
    assert_eq!(relative_path("/a%zz"), None);
    assert_eq!(relative_path("/a%2"), None);
    assert_eq!(relative_path("/%ff"), None);
}

#[test]
fn connections_leave_descriptors_for_files() {
    // No limit: as asked.
    assert_eq!(connection_cap(1024, None), 1024);
    // The usual 1024: 64 kept, and a file beside every connection's socket.
    assert_eq!(connection_cap(1024, Some(1024)), 480);
    // Small limits: 64 kept, but never more than half.
    assert_eq!(connection_cap(1024, Some(200)), 68);
    assert_eq!(connection_cap(1024, Some(64)), 16);
    assert_eq!(connection_cap(1024, Some(1)), 1);
    assert_eq!(connection_cap(1024, Some(0)), 1);
    // A high limit: as asked.
    assert_eq!(connection_cap(1024, Some(1 << 20)), 1024);
}

#[test]
fn out_of_descriptors_is_a_passing_shortage() {
    #[cfg(unix)]
    {
        assert!(is_out_of_fds(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(is_out_of_fds(&io::Error::from_raw_os_error(libc::ENFILE)));
        assert!(!is_out_of_fds(&io::Error::from_raw_os_error(libc::EACCES)));
    }
    let r = retry_later();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()[header::RETRY_AFTER], "1");
}

#[test]
fn accept_encoding_takes_gzip_as_rfc_9110_weighs_it() {
    let takes = |values: &[&str]| {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(
                axum::http::header::ACCEPT_ENCODING,
                axum::http::HeaderValue::from_str(v).unwrap(),
            );
        }
        respond::accepts_gzip(&h)
    };
    for yes in [
        &["gzip"][..],
        &["br, GZIP"],
        &["gzip;q=0.5"],
        &["gzip; Q=1"],
        &["x-gzip"],
        &["*"],
        &["br", "gzip;q=0.1"],
        &["gzip;q=0", "gzip"],
    ] {
        assert!(takes(yes), "{yes:?}");
    }
    for no in [
        &[][..],
        &["identity"],
        &["br"],
        &["gzip;q=0"],
        &["gzip;Q=0.0"],
        &["gzip;q=nan"],
        &["gzip;q="],
        &["*;q=0"],
        &["*", "gzip;q=0"],
    ] {
        assert!(!takes(no), "{no:?}");
    }
}

#[test]
fn a_full_etag_cache_gives_up_one_entry_for_a_new_one_not_all() {
    let tag = |n: u64| CachedTag {
        len: n,
        mtime: None,
        id: FileId::of(&std::fs::metadata(".").expect("the working directory")),
        etag: etag_of(0, n),
    };
    let mut etags = HashMap::new();
    for n in 0..ETAG_CACHE_MAX as u64 {
        cache_etag(&mut etags, PathBuf::from(format!("f{n}")), tag(n));
    }
    assert_eq!(etags.len(), ETAG_CACHE_MAX);
    cache_etag(&mut etags, PathBuf::from("new"), tag(7));
    assert_eq!(etags.len(), ETAG_CACHE_MAX, "one entry gave way");
    assert_eq!(etags[&PathBuf::from("new")].len, 7);
    // A path already cached is replaced in place.
    cache_etag(&mut etags, PathBuf::from("new"), tag(8));
    assert_eq!(etags.len(), ETAG_CACHE_MAX);
    assert_eq!(etags[&PathBuf::from("new")].len, 8);
}

/// Small files read for answers count against [`SMALL_BYTES_KIB`] until
/// every copy of their bytes is dropped (the answer sent, or its client
/// gone): past the bound an open is refused (the route answers 503), and
/// the bytes come back once an answer lets go of them. Heads count apart,
/// against [`HEAD_BYTES_KIB`]: slow readers of other files do not take
/// their room.
#[test]
fn small_files_held_for_answers_are_bounded_in_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let head = "catalog/head.json";
    let page = "catalog/pages/00000000000000000001-00000000000000000002.json";
    std::fs::create_dir_all(tmp.path().join("catalog/pages")).unwrap();
    std::fs::write(tmp.path().join(head), vec![b' '; 1 << 20]).unwrap();
    std::fs::write(tmp.path().join(page), vec![b' '; 1 << 20]).unwrap();
    let (_, state) = build(tmp.path().to_path_buf(), &ServeOptions::default());
    for (key, bound) in [(page, SMALL_BYTES_KIB), (head, HEAD_BYTES_KIB)] {
        let mut held = Vec::new();
        let refused = loop {
            match open_entity(&state, key) {
                Ok(Opened::Ready(e)) => held.push(e.data.expect("small").slice(10..20)),
                Ok(Opened::Unhashed(..)) => panic!("a small file"),
                Err(e) => break e,
            }
            assert!(held.len() <= bound / 1024, "{} MiB held", held.len());
        };
        assert!(refused.get_ref().is_some_and(|r| r.is::<SmallBytesFull>()));
        assert_eq!(held.len(), bound / 1024, "{key}");
        // A slice kept the whole file's share; dropping it frees the share.
        held.pop();
        assert!(matches!(open_entity(&state, key), Ok(Opened::Ready(_))));
        if key == page {
            // Other small files at their bound: the head is still read.
            assert!(matches!(open_entity(&state, head), Ok(Opened::Ready(_))));
            held.push(match open_entity(&state, key) {
                Ok(Opened::Ready(e)) => e.data.unwrap(),
                _ => panic!("the share freed above"),
            });
            assert!(open_entity(&state, key).is_err());
            assert!(matches!(open_entity(&state, head), Ok(Opened::Ready(_))));
        }
    }
}

/// A long-poll held while the bytes held for answers are at their bound
/// (slow readers elsewhere) keeps holding through its re-reads of the
/// head, and ends as a hold does (304), not with a 503 its replica would
/// count as a failure.
#[tokio::test]
async fn a_hold_goes_on_while_the_bytes_held_for_answers_are_at_their_bound() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("catalog")).unwrap();
    std::fs::write(tmp.path().join("catalog/head.json"), br#"{"epoch":1}"#).unwrap();
    let (_, state) = build(tmp.path().to_path_buf(), &ServeOptions::default());
    let _all = Arc::clone(&state.head_bytes)
        .try_acquire_many_owned(HEAD_BYTES_KIB as u32)
        .unwrap();
    let mut headers = HeaderMap::new();
    headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"x\""));
    let changes = state.signal.subscribe();
    // A wake as if the head changed: the re-read finds no room.
    state.signal.notify();
    let held = hold(
        &state,
        "catalog/head.json",
        &headers,
        Duration::from_millis(300),
        changes,
    )
    .await;
    assert!(
        held.is_none(),
        "{:?}",
        held.map(|r| r.err().map(|r| r.status()))
    );
}
