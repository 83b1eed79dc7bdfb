//! Hostile servers against the native fetch seams: reqwest for `http(s)://`
//! and object_store for `s3://` (pointed at the same fake endpoint), plus the
//! `file://` and `memory://` stores. The server here sends what a real one
//! never would — an endless body, a `Content-Length` of 64 TiB, a body that
//! drips, a `Content-Range` past `u64::MAX` — and every test checks that the
//! process stays up, memory stays bounded by the request's `max_bytes`, and
//! the replica machine ends with a clear error.

use crate::support;

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use walcast::replica::HttpFetch;
use walcast::store::Store;
use walcast_client::Fetch;
use walcast_core::catalog::{HEAD_KEY, MAX_HEAD_BYTES};
use walcast_core::io::{ByteRange, ContentRange, GetRequest, GetResponse, RequestId};

use support::{run_watched, Env, Watched};

/// The `Content-Length` an S3 endpoint answered with when the process
/// aborted on allocation: 64 TiB.
const HUGE: u64 = 70_368_744_177_664;

/// What the server was asked.
#[derive(Debug, Clone)]
struct Request {
    /// The request target, e.g. `/catalog/head.json`.
    path: String,
    /// The `Range` header, if any.
    range: Option<String>,
}

/// How the body after the head of a reply is sent.
#[derive(Debug, Clone)]
enum Body {
    /// These bytes, then close.
    Bytes(Vec<u8>),
    /// 64 KiB writes until the client hangs up or `limit` bytes were sent.
    Endless { limit: u64 },
    /// One byte every `every`, until the client hangs up.
    Drip { every: Duration },
}

/// One reply: the status line and header lines (without the blank line),
/// then a body.
#[derive(Debug, Clone)]
struct Reply {
    head: String,
    body: Body,
}

impl Reply {
    fn new(status: &str, headers: &[(&str, String)], body: Body) -> Reply {
        let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        Reply { head, body }
    }

    /// A complete answer with a correct `Content-Length`.
    fn full(status: &str, headers: &[(&str, String)], body: &[u8]) -> Reply {
        let mut h = headers.to_vec();
        h.push(("Content-Length", body.len().to_string()));
        Reply::new(status, &h, Body::Bytes(body.to_vec()))
    }
}

type Handler = dyn Fn(&Request) -> Reply + Send + Sync + 'static;

/// A hostile HTTP/1.1 server on a thread (and runtime) of its own, so that
/// synchronous tests can watch child processes while it serves them.
struct Hostile {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hostile {
    fn start(handler: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> Hostile {
        let handler: Arc<Handler> = Arc::new(handler);
        let requests = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = oneshot::channel::<()>();
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let counter = requests.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("server runtime");
            rt.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                bound_tx.send(listener.local_addr().unwrap()).unwrap();
                let accept = async {
                    loop {
                        let Ok((sock, _)) = listener.accept().await else {
                            continue;
                        };
                        let h = handler.clone();
                        let c = counter.clone();
                        tokio::spawn(async move {
                            let _ = serve_one(sock, &*h, &c).await;
                        });
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stopped => {}
                }
            });
        });
        let addr = bound_rx.recv().expect("server address");
        Hostile {
            addr,
            requests,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Environment for an `s3://` replica whose endpoint is this server.
    fn s3_env(&self) -> Env {
        support::s3_env(&self.url())
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve_one(
    mut sock: TcpStream,
    handler: &Handler,
    counter: &AtomicU64,
) -> std::io::Result<()> {
    // Read the request head (at most 64 KiB).
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut chunk).await?;
        if n == 0 || buf.len() > 64 << 10 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    counter.fetch_add(1, Ordering::Relaxed);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = text.split("\r\n");
    let path = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("/")
        .to_string();
    let range = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("range"))
        .map(|(_, v)| v.trim().to_string());
    let reply = handler(&Request { path, range });
    sock.write_all(reply.head.as_bytes()).await?;
    sock.write_all(b"\r\n").await?;
    match reply.body {
        Body::Bytes(b) => sock.write_all(&b).await?,
        Body::Endless { limit } => {
            let block = vec![b' '; 64 << 10];
            let mut sent = 0u64;
            while sent < limit {
                let n = (limit - sent).min(block.len() as u64) as usize;
                sock.write_all(&block[..n]).await?;
                sent += n as u64;
            }
        }
        Body::Drip { every } => loop {
            sock.write_all(b" ").await?;
            sock.flush().await?;
            tokio::time::sleep(every).await;
        },
    }
    sock.flush().await?;
    sock.shutdown().await
}

fn get_req(key: &str, max_bytes: u64, timeout_ms: u64) -> GetRequest {
    GetRequest {
        id: RequestId(1),
        key: key.to_string(),
        range: None,
        if_none_match: None,
        wait_ms: None,
        timeout_ms,
        max_bytes,
    }
}

fn describe(r: &GetResponse) -> String {
    match r {
        GetResponse::Ok { body, etag, range } => {
            format!(
                "Ok {{ body: {} bytes, etag: {etag:?}, range: {range:?} }}",
                body.len()
            )
        }
        other => format!("{other:?}"),
    }
}

/// `walcast replicate URL --local <tmp> --once`, watched.
fn replicate_watched(url: &str, env: &Env, max_rss_mib: u64) -> Watched {
    let local = tempfile::tempdir().unwrap();
    run_watched(
        "replicate",
        &[
            "replicate",
            url,
            "--local",
            local.path().to_str().unwrap(),
            "--once",
            "--interval",
            "100ms",
        ],
        env,
        max_rss_mib,
        Duration::from_secs(60),
    )
}

/// The replica ended by itself (no signal, no panic) with a `data` error
/// about the head, quickly and in bounded memory.
fn assert_head_data_error(w: &Watched) {
    eprintln!(
        "exit {:?} after {:?}, peak RSS {} MiB",
        w.code,
        w.elapsed,
        w.hwm_kib >> 10
    );
    assert_eq!(w.signal, None, "killed by a signal\n{}", w.logs);
    assert_eq!(w.code, Some(1), "expected exit code 1\n{}", w.logs);
    assert!(!w.stderr.contains("panicked"), "panicked\n{}", w.logs);
    assert!(
        w.stderr.contains("data:") && w.stderr.contains(HEAD_KEY),
        "expected a data error naming {HEAD_KEY}\n{}",
        w.logs
    );
    assert!(
        w.hwm_kib < 160 << 10,
        "peak RSS {} MiB\n{}",
        w.hwm_kib >> 10,
        w.logs
    );
    assert!(
        w.elapsed < Duration::from_secs(30),
        "took {:?}\n{}",
        w.elapsed,
        w.logs
    );
}

fn endless_head() -> Hostile {
    Hostile::start(|_| {
        Reply::new(
            "200 OK",
            &[("Content-Type", "application/json".into())],
            Body::Endless { limit: u64::MAX },
        )
    })
}

fn huge_length() -> Hostile {
    Hostile::start(|_| {
        Reply::new(
            "200 OK",
            &[
                ("Content-Length", HUGE.to_string()),
                ("ETag", "\"e\"".into()),
                ("Last-Modified", "Tue, 01 Dec 2026 00:00:00 GMT".into()),
            ],
            Body::Endless { limit: u64::MAX },
        )
    })
}

// ---------------------------------------------------------------------------
// 1. Bodies are bounded by max_bytes
// ---------------------------------------------------------------------------

/// A head that streams without end, over HTTP: the replica reads at most
/// 1 MiB + 1 of each answer, reports a data error naming the head and exits.
#[test]
fn endless_head_over_http_ends_in_a_data_error() {
    let server = endless_head();
    let w = replicate_watched(&server.url(), &Env::new(), 512);
    assert_head_data_error(&w);
    assert!(server.requests() >= 1);
}

/// `Content-Length: 64 TiB` and an endless body, over HTTP.
#[test]
fn huge_content_length_over_http_does_not_abort() {
    let server = huge_length();
    let w = replicate_watched(&server.url(), &Env::new(), 512);
    assert_head_data_error(&w);
}

/// `Content-Length: 64 TiB` and an endless body from an S3 endpoint: the
/// object_store client must not preallocate from the claim.
#[test]
fn huge_content_length_over_s3_does_not_abort() {
    let server = huge_length();
    let w = replicate_watched("s3://bucket/app", &server.s3_env(), 512);
    assert_head_data_error(&w);
}

/// The reqwest seam in-process: an endless body is cut at `max_bytes + 1`.
#[tokio::test]
async fn http_fetch_reads_at_most_max_bytes_plus_one() {
    // Bounded on the server side too, so that an unbounded reader fails
    // the assertion instead of exhausting the machine.
    let server = Hostile::start(|_| Reply::new("200 OK", &[], Body::Endless { limit: 64 << 20 }));
    let f = HttpFetch::new(&server.url()).unwrap();
    let max = MAX_HEAD_BYTES as u64;
    let r = f.get(get_req(HEAD_KEY, max, 20_000)).await;
    match &r {
        GetResponse::Ok { body, .. } => assert_eq!(body.len() as u64, max + 1, "{}", describe(&r)),
        _ => panic!("expected Ok with a cut body: {}", describe(&r)),
    }

    let server = huge_length();
    let f = HttpFetch::new(&server.url()).unwrap();
    let r = f.get(get_req("segments/1/x.wseg", 1000, 20_000)).await;
    match &r {
        GetResponse::Ok { body, .. } => assert_eq!(body.len(), 1001, "{}", describe(&r)),
        _ => panic!("expected Ok with a cut body: {}", describe(&r)),
    }
}

/// The `file://` store: objects and the head are read at most
/// `max_bytes + 1`; a whole small object is read whole.
#[tokio::test]
async fn file_store_reads_at_most_max_bytes_plus_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&support::file_url(dir.path())).unwrap();
    store
        .put_raw("segments/1/big.wseg", vec![7u8; 100_000])
        .await
        .unwrap();
    let r = store
        .get(&get_req("segments/1/big.wseg", 1000, 10_000))
        .await;
    match &r {
        GetResponse::Ok { body, .. } => assert_eq!(body.len(), 1001, "{}", describe(&r)),
        _ => panic!("{}", describe(&r)),
    }
    let r = store
        .get(&get_req("segments/1/big.wseg", 100_000, 10_000))
        .await;
    match &r {
        GetResponse::Ok { body, .. } => assert_eq!(body, &vec![7u8; 100_000]),
        _ => panic!("{}", describe(&r)),
    }
    // A range inside the object still answers with the range.
    let mut req = get_req("segments/1/big.wseg", 100_000, 10_000);
    req.range = Some(ByteRange::Bounded { start: 10, end: 20 });
    let r = store.get(&req).await;
    match &r {
        GetResponse::Ok { body, range, .. } => {
            assert_eq!(body.len(), 10);
            assert_eq!(
                *range,
                Some(ContentRange {
                    start: 10,
                    end: 20,
                    total: Some(100_000)
                })
            );
        }
        _ => panic!("{}", describe(&r)),
    }
    // The head of a file:// dataset is read by the store itself.
    let head = dir.path().join(HEAD_KEY);
    std::fs::create_dir_all(head.parent().unwrap()).unwrap();
    let mut f = std::fs::File::create(&head).unwrap();
    f.write_all(&vec![b' '; 3 * MAX_HEAD_BYTES]).unwrap();
    drop(f);
    let r = store
        .get(&get_req(HEAD_KEY, MAX_HEAD_BYTES as u64, 10_000))
        .await;
    match &r {
        GetResponse::Ok { body, .. } => {
            assert_eq!(body.len(), MAX_HEAD_BYTES + 1, "{}", describe(&r))
        }
        _ => panic!("{}", describe(&r)),
    }
}

/// The `memory://` store: bounded too, and a range starting past the end
/// is "range not satisfiable" by the store's error kind.
#[tokio::test]
async fn memory_store_bounds_bodies_and_classifies_ranges() {
    let store = Store::open("memory://").unwrap();
    store.put_raw("a/b", vec![1u8; 5000]).await.unwrap();
    let r = store.get(&get_req("a/b", 100, 10_000)).await;
    match &r {
        GetResponse::Ok { body, .. } => assert_eq!(body.len(), 101, "{}", describe(&r)),
        _ => panic!("{}", describe(&r)),
    }
    let mut req = get_req("a/b", 5000, 10_000);
    req.range = Some(ByteRange::Bounded {
        start: 6000,
        end: 7000,
    });
    let r = store.get(&req).await;
    assert_eq!(r, GetResponse::RangeNotSatisfiable);
}

// ---------------------------------------------------------------------------
// 2. "416" is a status, not a substring
// ---------------------------------------------------------------------------

/// An S3 error whose text mentions 416 (in the body and in the bucket's
/// name) is an ordinary failure, not "range not satisfiable".
#[test]
fn s3_error_text_with_416_is_not_range_not_satisfiable() {
    let server = Hostile::start(|_| {
        Reply::full(
            "400 Bad Request",
            &[("Content-Type", "application/xml".into())],
            b"<Error><Code>InvalidRequest</Code><Message>416 requests over quota</Message></Error>",
        )
    });
    let w = replicate_watched("s3://bucket416/app416", &server.s3_env(), 512);
    assert_eq!(w.code, Some(1), "{}", w.logs);
    assert!(
        !w.stderr.contains("shorter than the catalog"),
        "a 400 was taken for a 416\n{}",
        w.logs
    );
    assert!(w.stderr.contains("unavailable"), "{}", w.logs);
}

/// A real 416 from an S3 endpoint is "range not satisfiable".
#[test]
fn s3_status_416_is_range_not_satisfiable() {
    let server = Hostile::start(|_| Reply::full("416 Range Not Satisfiable", &[], b""));
    let w = replicate_watched("s3://bucket/app", &server.s3_env(), 512);
    assert_eq!(w.code, Some(1), "{}", w.logs);
    assert!(
        w.stderr.contains("shorter than the catalog"),
        "a 416 was not recognised\n{}",
        w.logs
    );
}

/// Over HTTP, a 503 whose body says 416 stays a 503.
#[tokio::test]
async fn http_error_text_with_416_is_not_range_not_satisfiable() {
    let server = Hostile::start(|_| Reply::full("503 Service Unavailable", &[], b"416 416 416"));
    let f = HttpFetch::new(&format!("{}/416", server.url())).unwrap();
    let r = f.get(get_req("segments/1/416-416.wseg", 100, 10_000)).await;
    assert!(
        matches!(
            r,
            GetResponse::Failed {
                status: Some(503),
                ..
            }
        ),
        "{}",
        describe(&r)
    );
}

// ---------------------------------------------------------------------------
// 3. Content-Range is parsed safely and never trusted
// ---------------------------------------------------------------------------

/// A 206 whose Content-Range disagrees with its body is handed over as it
/// came, for the machine to reject.
#[tokio::test]
async fn http_206_with_a_mismatched_content_range_is_passed_through() {
    let server = Hostile::start(|_| {
        Reply::full(
            "206 Partial Content",
            &[("Content-Range", "bytes 0-99/1000".into())],
            &[9u8; 10],
        )
    });
    let f = HttpFetch::new(&server.url()).unwrap();
    let mut req = get_req("segments/1/x.wseg", 1000, 10_000);
    req.range = Some(ByteRange::Bounded { start: 0, end: 100 });
    let r = f.get(req).await;
    assert_eq!(
        r,
        GetResponse::Ok {
            body: vec![9u8; 10],
            etag: None,
            range: Some(ContentRange {
                start: 0,
                end: 100,
                total: Some(1000)
            }),
        }
    );
}

/// A 206 whose Content-Range cannot be parsed (here: it overflows u64) is
/// not taken for a whole object.
#[tokio::test]
async fn http_206_with_an_overflowing_content_range_is_not_trusted() {
    let server = Hostile::start(|_| {
        Reply::full(
            "206 Partial Content",
            &[("Content-Range", "bytes 0-18446744073709551615/*".into())],
            &[9u8; 10],
        )
    });
    let f = HttpFetch::new(&server.url()).unwrap();
    let mut req = get_req("segments/1/x.wseg", 10, 10_000);
    req.range = Some(ByteRange::Bounded { start: 0, end: 10 });
    let r = f.get(req).await;
    assert!(
        matches!(
            r,
            GetResponse::Failed {
                status: Some(206),
                ..
            }
        ),
        "{}",
        describe(&r)
    );
}

/// The same overflowing Content-Range from an S3 endpoint, on the range GETs
/// of a snapshot bootstrap: object_store's own parser must not take the
/// process down.
#[test]
fn s3_206_with_an_overflowing_content_range_fails_the_get_not_the_process() {
    // A real dataset with a snapshot, served as an S3 bucket, except that
    // every snapshot range GET gets the hostile 206.
    let tmp = tempfile::tempdir().unwrap();
    let wal = tmp.path().join("wal");
    let ds = tmp.path().join("ds");
    let mut rng = support::Rng::new(7);
    let batches = support::gen_batches(&mut rng, 20, support::GenOpts::default());
    support::write(&wal, &batches);
    support::publish_once(
        &wal,
        &support::file_url(&ds),
        &["--snapshot-every", "1"],
        &Env::new(),
    )
    .ok();
    let root = ds.clone();
    let server = Hostile::start(move |req| {
        let key = req
            .path
            .strip_prefix("/bucket/app/")
            .unwrap_or("")
            .split('?')
            .next()
            .unwrap_or("");
        if key.starts_with("snapshots/") {
            return Reply::full(
                "206 Partial Content",
                &[
                    ("Content-Range", "bytes 0-18446744073709551615/100".into()),
                    ("ETag", "\"s\"".into()),
                ],
                &[0u8; 10],
            );
        }
        match std::fs::read(root.join(key)) {
            Ok(b) if req.range.is_none() => Reply::full("200 OK", &[("ETag", "\"h\"".into())], &b),
            Ok(_) => Reply::full("416 Range Not Satisfiable", &[], b""),
            Err(_) => Reply::full("404 Not Found", &[], b""),
        }
    });
    let w = replicate_watched("s3://bucket/app", &server.s3_env(), 512);
    // Overflow-checked builds still print object_store's panic message; the
    // GET fails and the replica carries on to a clean error (a panic that
    // escaped would exit 101).
    assert_eq!(w.signal, None, "{}", w.logs);
    assert_eq!(w.code, Some(1), "{}", w.logs);
    assert!(
        w.stderr.contains("walcast: error: unavailable") && w.stderr.contains("snapshots/"),
        "{}",
        w.logs
    );
}

// ---------------------------------------------------------------------------
// 4. timeout_ms bounds the whole body
// ---------------------------------------------------------------------------

/// Headers at once, then one byte every 50 ms of a 1000-byte body: the GET
/// gives up after `timeout_ms`, not when the body ends.
#[tokio::test]
async fn http_slow_drip_is_bounded_by_the_request_timeout() {
    let server = Hostile::start(|_| {
        Reply::new(
            "200 OK",
            &[("Content-Length", "1000".into())],
            Body::Drip {
                every: Duration::from_millis(50),
            },
        )
    });
    let f = HttpFetch::new(&server.url()).unwrap();
    let start = Instant::now();
    let r = f.get(get_req(HEAD_KEY, MAX_HEAD_BYTES as u64, 800)).await;
    let took = start.elapsed();
    match &r {
        GetResponse::Failed { message, .. } => assert!(
            message.contains("timed out") && message.contains(HEAD_KEY),
            "{}",
            describe(&r)
        ),
        _ => panic!("{}", describe(&r)),
    }
    assert!(took < Duration::from_secs(5), "took {took:?}");

    // No headers at all.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let f = HttpFetch::new(&format!("http://{addr}")).unwrap();
    let start = Instant::now();
    let r = f.get(get_req(HEAD_KEY, MAX_HEAD_BYTES as u64, 800)).await;
    assert!(matches!(r, GetResponse::Failed { .. }), "{}", describe(&r));
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    drop(listener);
}

/// A head in the publisher's own bucket whose last segment claims 1.5 GiB
/// (the catalog allows any size): on claiming, the publisher checks its WAL
/// against the head's last record, which it reads from that segment. The
/// read is bounded as a replica's (`MAX_SEGMENT_BYTES`): the publisher
/// stops with an error naming the segment instead of buffering the claimed
/// range (here a sparse file; over HTTP an endless body).
#[test]
fn the_publishers_wal_check_reads_no_more_of_a_segment_than_a_replica() {
    use walcast_core::catalog::Head;
    let tmp = tempfile::tempdir().unwrap();
    let wal = tmp.path().join("wal");
    let ds = tmp.path().join("ds");
    let mut rng = support::Rng::new(11);
    let batches = support::gen_batches(&mut rng, 5, support::GenOpts::default());
    support::write(&wal, &batches);
    let url = support::file_url(&ds);
    support::publish_once(&wal, &url, &[], &Env::new()).ok();

    // The hostile head: the last segment is 1.5 GiB, records end at its end.
    let head_path = ds.join(HEAD_KEY);
    let mut head = Head::decode(&std::fs::read(&head_path).unwrap()).unwrap();
    head.tail.clear();
    let huge: u64 = 3 << 29;
    let seg = head.segments.last_mut().unwrap();
    seg.size = huge;
    seg.records_end = huge - 1;
    let seg_key = seg.key.clone();
    let seg_path = seg.key.split('/').fold(ds.clone(), |p, part| p.join(part));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg_path)
        .unwrap()
        .set_len(huge)
        .unwrap();
    std::fs::write(&head_path, head.encode()).unwrap();

    let w = run_watched(
        "publish",
        &[
            "publish",
            "--wal",
            wal.to_str().unwrap(),
            "--to",
            &url,
            "--once",
        ],
        &Env::new(),
        512,
        Duration::from_secs(60),
    );
    assert!(w.hwm_kib < 512 << 10, "peak RSS {} MiB", w.hwm_kib >> 10);
    assert_ne!(w.code, Some(0), "{}", w.logs);
    assert!(
        w.logs.contains(&seg_key) && w.logs.contains("nothing is published"),
        "{}",
        w.logs
    );
}

/// A failed GET says why, not only what: a refused connection, and a body
/// that ends before its `Content-Length`, keep the cause reqwest's own
/// text leaves out.
#[tokio::test]
async fn http_failures_name_their_cause() {
    // A port nothing listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let f = HttpFetch::new(&format!("http://127.0.0.1:{port}")).unwrap();
    let r = f.get(get_req(HEAD_KEY, 1000, 10_000)).await;
    let text = describe(&r);
    assert!(text.to_lowercase().contains("refused"), "{text}");

    let server = Hostile::start(|_| {
        Reply::new(
            "200 OK",
            &[("Content-Length", "1000".to_string())],
            Body::Bytes(vec![b'x'; 10]),
        )
    });
    let f = HttpFetch::new(&server.url()).unwrap();
    let r = f.get(get_req("segments/1/x.wseg", 5000, 10_000)).await;
    let text = describe(&r);
    assert!(
        text.contains("reading the body") && text.contains("before message length"),
        "{text}"
    );
}
