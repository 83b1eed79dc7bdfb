//! `walcast serve`: HTTP semantics of the dataset server (ranges, ETags,
//! caching, CORS, which paths it serves, connection limits and timeouts,
//! errors), exercised over real sockets.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::header::{self, HeaderMap};
use reqwest::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use walcast::serve::ServeOptions;

// Keys exactly as the publisher names them (checked against the catalog's
// key functions in `keys_are_the_publishers`).
const SEGMENT: &str = "segments/1/00000000000000000001-00000000000000000010.wseg";
const SNAPSHOT: &str = "snapshots/00000000000000000010-1.wsnap";
const PAGE: &str = "catalog/pages/0-00000000000000000001-00000000000000000005-1.json";
const HEAD: &str = "catalog/head.json";
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

struct Server {
    _dir: tempfile::TempDir,
    root: PathBuf,
    addr: SocketAddr,
    client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        self.request(Method::GET, path, headers).await
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut req = self.client.request(method, self.url(path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.expect("request")
    }

    /// Sends `target` verbatim (no client-side dot-segment normalisation)
    /// and returns the status code.
    async fn raw_status(&self, method: &str, target: &str) -> u16 {
        let mut conn = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let req =
            format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        conn.write_all(req.as_bytes()).await.unwrap();
        let mut resp = Vec::new();
        conn.read_to_end(&mut resp).await.unwrap();
        let resp = String::from_utf8_lossy(&resp);
        let status = resp.split(' ').nth(1).expect("status line");
        status.parse().expect("status code")
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
        .collect()
}

fn write(root: &Path, rel: &str, data: &[u8]) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

/// A file of `size` zero bytes at `rel`, sparse: no disk needed, and
/// reads are as fast as they get.
fn write_sparse(root: &Path, rel: &str, size: u64) {
    write(root, rel, b"");
    std::fs::OpenOptions::new()
        .write(true)
        .open(root.join(rel))
        .unwrap()
        .set_len(size)
        .unwrap();
}

fn etag_of(data: &[u8]) -> String {
    format!("\"{:08x}-{:x}\"", crc32fast::hash(data), data.len())
}

fn header(headers: &HeaderMap, name: impl header::AsHeaderName) -> &str {
    headers.get(name).expect("header present").to_str().unwrap()
}

fn segment() -> Vec<u8> {
    pattern(1000, 1)
}

/// Bigger than the whole-file threshold, so served by seeking and streaming.
fn snapshot() -> Vec<u8> {
    pattern(3 * 1024 * 1024 + 17, 2)
}

async fn start() -> Server {
    start_with(ServeOptions::default()).await
}

async fn start_with(opts: ServeOptions) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    write(&root, HEAD, br#"{"epoch":1,"last":10}"#);
    write(&root, PAGE, br#"{"segments":[]}"#);
    write(&root, SEGMENT, &segment());
    write(&root, SNAPSHOT, &snapshot());
    write(dir.path(), "secret.txt", b"outside the root");

    let (stop, stopped) = oneshot::channel::<()>();
    let (bound_tx, bound_rx) = oneshot::channel();
    let task = tokio::spawn(walcast::serve::serve_with(
        root.clone(),
        "127.0.0.1:0".parse().unwrap(),
        opts,
        move |addr| bound_tx.send(addr).unwrap(),
        async move {
            let _ = stopped.await;
        },
    ));
    let addr = bound_rx.await.unwrap();
    assert_ne!(addr.port(), 0);
    Server {
        _dir: dir,
        root,
        addr,
        client: reqwest::Client::new(),
        stop: Some(stop),
        task,
    }
}

#[tokio::test]
async fn segment_and_head_have_etag_and_cache_control() {
    let s = start().await;

    let resp = s.get(SEGMENT, &[]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers().clone();
    assert_eq!(header(&h, header::ETAG), etag_of(&segment()));
    assert_eq!(header(&h, header::CACHE_CONTROL), IMMUTABLE);
    assert_eq!(header(&h, header::ACCEPT_RANGES), "bytes");
    assert_eq!(header(&h, header::CONTENT_TYPE), "application/octet-stream");
    assert_eq!(header(&h, header::CONTENT_LENGTH), "1000");
    assert_eq!(resp.bytes().await.unwrap(), segment());

    let resp = s.get(HEAD, &[]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers().clone();
    let head = std::fs::read(s.root.join(HEAD)).unwrap();
    assert_eq!(header(&h, header::ETAG), etag_of(&head));
    assert_eq!(header(&h, header::CACHE_CONTROL), "no-cache");
    assert_eq!(header(&h, header::CONTENT_TYPE), "application/json");
    assert_eq!(resp.bytes().await.unwrap(), head);

    let resp = s.get(PAGE, &[]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(resp.headers(), header::CACHE_CONTROL), IMMUTABLE);
    assert_eq!(
        header(resp.headers(), header::CONTENT_TYPE),
        "application/json"
    );

    // The large file, streamed whole.
    let resp = s.get(SNAPSHOT, &[]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers().clone();
    assert_eq!(header(&h, header::ETAG), etag_of(&snapshot()));
    assert_eq!(header(&h, header::CACHE_CONTROL), IMMUTABLE);
    assert_eq!(
        header(&h, header::CONTENT_LENGTH),
        snapshot().len().to_string()
    );
    assert_eq!(resp.bytes().await.unwrap(), snapshot());

    // Query strings are ignored.
    let resp = s.get(&format!("{SEGMENT}?v=1"), &[]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    s.stop().await;
}

#[tokio::test]
async fn ranges() {
    let s = start().await;
    let seg = segment();

    let resp = s.get(SEGMENT, &[("range", "bytes=10-19")]).await;
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        header(resp.headers(), header::CONTENT_RANGE),
        "bytes 10-19/1000"
    );
    assert_eq!(header(resp.headers(), header::CONTENT_LENGTH), "10");
    assert_eq!(header(resp.headers(), header::ETAG), etag_of(&seg));
    assert_eq!(resp.bytes().await.unwrap(), seg[10..20]);

    // Open-ended, and an end past the length (clamped).
    let resp = s.get(SEGMENT, &[("range", "bytes=990-")]).await;
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        header(resp.headers(), header::CONTENT_RANGE),
        "bytes 990-999/1000"
    );
    assert_eq!(resp.bytes().await.unwrap(), seg[990..]);
    let resp = s.get(SEGMENT, &[("range", "bytes=995-5000")]).await;
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        header(resp.headers(), header::CONTENT_RANGE),
        "bytes 995-999/1000"
    );
    assert_eq!(resp.bytes().await.unwrap(), seg[995..]);

    // Multi-range and malformed ranges are ignored.
    for value in ["bytes=0-1,5-6", "bytes=5-1", "bytes=x-", "pages=1-2"] {
        let resp = s.get(SEGMENT, &[("range", value)]).await;
        assert_eq!(resp.status(), StatusCode::OK, "{value}");
        assert!(resp.headers().get(header::CONTENT_RANGE).is_none());
        assert_eq!(resp.bytes().await.unwrap(), seg, "{value}");
    }

    // The large file: ranges by seeking.
    let snap = snapshot();
    let total = snap.len();
    let resp = s.get(SNAPSHOT, &[("range", "bytes=2000000-2600000")]).await;
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        header(resp.headers(), header::CONTENT_RANGE),
        format!("bytes 2000000-2600000/{total}")
    );
    assert_eq!(header(resp.headers(), header::CONTENT_LENGTH), "600001");
    assert_eq!(resp.bytes().await.unwrap(), snap[2_000_000..=2_600_000]);
    s.stop().await;
}

#[tokio::test]
async fn suffix_range() {
    let s = start().await;
    let seg = segment();
    let resp = s.get(SEGMENT, &[("range", "bytes=-100")]).await;
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        header(resp.headers(), header::CONTENT_RANGE),
        "bytes 900-999/1000"
    );
    assert_eq!(resp.bytes().await.unwrap(), seg[900..]);

    // A suffix longer than the file is the whole file.
    let resp = s.get(SEGMENT, &[("range", "bytes=-5000")]).await;
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        header(resp.headers(), header::CONTENT_RANGE),
        "bytes 0-999/1000"
    );
    assert_eq!(resp.bytes().await.unwrap(), seg);

    let snap = snapshot();
    let total = snap.len();
    let resp = s.get(SNAPSHOT, &[("range", "bytes=-70000")]).await;
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        header(resp.headers(), header::CONTENT_RANGE),
        format!("bytes {}-{}/{total}", total - 70000, total - 1)
    );
    assert_eq!(resp.bytes().await.unwrap(), snap[total - 70000..]);
    s.stop().await;
}

#[tokio::test]
async fn unsatisfiable_range_is_416() {
    let s = start().await;
    for value in ["bytes=1000-", "bytes=1000-2000", "bytes=-0"] {
        let resp = s.get(SEGMENT, &[("range", value)]).await;
        assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE, "{value}");
        assert_eq!(
            header(resp.headers(), header::CONTENT_RANGE),
            "bytes */1000"
        );
        // Never stored by a cache (one keyed on the URL alone would answer
        // the segment's later GETs with it).
        let cc: Vec<_> = resp
            .headers()
            .get_all(header::CACHE_CONTROL)
            .iter()
            .collect();
        assert_eq!(cc, ["no-store"], "{value}");
        assert!(resp.bytes().await.unwrap().is_empty());
    }
    let total = snapshot().len();
    let resp = s
        .get(SNAPSHOT, &[("range", &format!("bytes={total}-"))])
        .await;
    assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        header(resp.headers(), header::CONTENT_RANGE),
        format!("bytes */{total}")
    );
    s.stop().await;
}

#[tokio::test]
async fn if_none_match_is_304() {
    let s = start().await;
    let etag = etag_of(&segment());
    let list = format!("\"nope\", {etag}");
    let weak = format!("W/{etag}");
    for value in [etag.as_str(), list.as_str(), weak.as_str(), "*"] {
        let resp = s.get(SEGMENT, &[("if-none-match", value)]).await;
        assert_eq!(resp.status(), StatusCode::NOT_MODIFIED, "{value}");
        assert_eq!(header(resp.headers(), header::ETAG), etag);
        assert_eq!(header(resp.headers(), header::CACHE_CONTROL), IMMUTABLE);
        assert!(resp.bytes().await.unwrap().is_empty());
    }
    // If-None-Match wins over Range.
    let resp = s
        .get(SEGMENT, &[("if-none-match", &etag), ("range", "bytes=0-9")])
        .await;
    assert_eq!(resp.status(), StatusCode::NOT_MODIFIED);

    let resp = s.get(SEGMENT, &[("if-none-match", "\"nope\"")]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.bytes().await.unwrap(), segment());

    // The large file's cached ETag.
    let snap_etag = etag_of(&snapshot());
    for _ in 0..2 {
        let resp = s.get(SNAPSHOT, &[("if-none-match", &snap_etag)]).await;
        assert_eq!(resp.status(), StatusCode::NOT_MODIFIED);
        assert!(resp.bytes().await.unwrap().is_empty());
    }
    s.stop().await;
}

/// RFC 9110 13.1.1: `If-Match` naming the object's ETag (strongly), or
/// `*`, is served; any other is 412, and wins over `Range`.
#[tokio::test]
async fn if_match_that_fails_is_412() {
    let s = start().await;
    let etag = etag_of(&segment());
    let list = format!("\"nope\", {etag}");
    for value in [etag.as_str(), list.as_str(), "*"] {
        let resp = s.get(SEGMENT, &[("if-match", value)]).await;
        assert_eq!(resp.status(), StatusCode::OK, "{value}");
        assert_eq!(resp.bytes().await.unwrap(), segment());
    }
    let weak = format!("W/{etag}");
    for value in ["\"nope\"", weak.as_str()] {
        let resp = s
            .get(SEGMENT, &[("if-match", value), ("range", "bytes=0-9")])
            .await;
        assert_eq!(resp.status(), StatusCode::PRECONDITION_FAILED, "{value}");
        assert!(resp.bytes().await.unwrap().is_empty());
    }
    s.stop().await;
}

#[tokio::test]
async fn replaced_head_gets_new_etag() {
    let s = start().await;
    let resp = s.get(HEAD, &[]).await;
    let old = header(resp.headers(), header::ETAG).to_owned();

    let new_head = br#"{"epoch":1,"last":11}"#;
    let tmp = s.root.join("catalog/.head.json.tmp");
    std::fs::write(&tmp, new_head).unwrap();
    std::fs::rename(&tmp, s.root.join(HEAD)).unwrap();

    let resp = s.get(HEAD, &[("if-none-match", &old)]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let new = header(resp.headers(), header::ETAG).to_owned();
    assert_ne!(new, old);
    assert_eq!(new, etag_of(new_head));
    assert_eq!(resp.bytes().await.unwrap(), &new_head[..]);

    let resp = s.get(HEAD, &[("if-none-match", &new)]).await;
    assert_eq!(resp.status(), StatusCode::NOT_MODIFIED);
    s.stop().await;
}

/// A large object replaced (renamed over) by other bytes of the same length
/// whose modification time was carried over (`cp -p`, `touch -r`, a
/// restore) is another version: its ETag is that of the new bytes, the old
/// ETag neither answers 304 nor validates a range (`If-Range`), so no client
/// gets the new bytes under the old validator or stitches the two together.
#[tokio::test]
async fn large_object_replaced_with_same_length_and_mtime_gets_new_etag() {
    let s = start().await;
    let old = snapshot();
    let resp = s.get(SNAPSHOT, &[]).await;
    assert_eq!(header(resp.headers(), header::ETAG), etag_of(&old));
    assert_eq!(resp.bytes().await.unwrap(), old);

    let new = pattern(old.len(), 3);
    assert_ne!(new, old);
    let path = s.root.join(SNAPSHOT);
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    let tmp = s.root.join("snapshots/.replacement.tmp");
    std::fs::write(&tmp, &new).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&tmp)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), old.len() as u64);
    assert_eq!(meta.modified().unwrap(), mtime);

    let old_etag = etag_of(&old);
    let resp = s.get(SNAPSHOT, &[("if-none-match", &old_etag)]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(resp.headers(), header::ETAG), etag_of(&new));
    assert_eq!(resp.bytes().await.unwrap(), new);

    let resp = s
        .get(
            SNAPSHOT,
            &[("range", "bytes=1000-"), ("if-range", &old_etag)],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(resp.headers(), header::ETAG), etag_of(&new));
    assert_eq!(resp.bytes().await.unwrap(), new);
    s.stop().await;
}

#[tokio::test]
async fn cors() {
    let s = start().await;
    let resp = s
        .request(
            Method::OPTIONS,
            SEGMENT,
            &[
                ("origin", "https://example.com"),
                ("access-control-request-method", "GET"),
                (
                    "access-control-request-headers",
                    "range,if-none-match,authorization",
                ),
            ],
        )
        .await;
    assert!(resp.status().is_success(), "{}", resp.status());
    let h = resp.headers();
    assert_eq!(header(h, header::ACCESS_CONTROL_ALLOW_ORIGIN), "*");
    let allowed = header(h, header::ACCESS_CONTROL_ALLOW_HEADERS).to_ascii_lowercase();
    for name in ["range", "if-none-match", "authorization"] {
        assert!(allowed.contains(name), "{allowed}");
    }
    let methods = header(h, header::ACCESS_CONTROL_ALLOW_METHODS);
    for m in ["GET", "HEAD", "OPTIONS"] {
        assert!(methods.contains(m), "{methods}");
    }

    let resp = s
        .get(
            SEGMENT,
            &[("origin", "https://example.com"), ("range", "bytes=0-3")],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    let h = resp.headers();
    assert_eq!(header(h, header::ACCESS_CONTROL_ALLOW_ORIGIN), "*");
    let exposed = header(h, header::ACCESS_CONTROL_EXPOSE_HEADERS).to_ascii_lowercase();
    for name in ["etag", "content-range", "content-length", "accept-ranges"] {
        assert!(exposed.contains(name), "{exposed}");
    }
    s.stop().await;
}

#[tokio::test]
async fn traversal_and_non_files_are_404() {
    let s = start().await;
    assert!(s.root.parent().unwrap().join("secret.txt").is_file());
    // Sanity: the raw client reaches real files.
    assert_eq!(s.raw_status("GET", &format!("/{SEGMENT}")).await, 200);
    for target in [
        "/../etc/passwd",
        "/%2e%2e/etc/passwd",
        "/%2E%2E/%2e%2e/%2e%2e/etc/passwd",
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/..%2fsecret.txt",
        "/catalog/..%2f..%2fsecret.txt",
        "/catalog/../../secret.txt",
        "/catalog/%2e%2e/%2e%2e/secret.txt",
        "/..%5csecret.txt",
        "/%2fetc%2fpasswd",
        "/./catalog/head.json",
        "/catalog/head.json%00",
        "/bad%zzescape",
    ] {
        assert_eq!(s.raw_status("GET", target).await, 404, "{target}");
        assert_eq!(s.raw_status("HEAD", target).await, 404, "{target}");
    }
    // Through reqwest (which normalises dot segments client-side).
    for path in ["/../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd"] {
        let resp = s.get(path, &[]).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
    }
    // Directories, the root and missing files.
    for path in ["/", "/catalog", "/catalog/", "/segments/1", "/nope.json"] {
        let resp = s.get(path, &[]).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
    }
    #[cfg(unix)]
    {
        // A symlink at an object's key leading outside the root is refused,
        // and so is a directory of objects that leads outside; one inside
        // the root is followed.
        let escape = "segments/1/00000000000000000011-00000000000000000020.wseg";
        std::os::unix::fs::symlink(
            s.root.parent().unwrap().join("secret.txt"),
            s.root.join(escape),
        )
        .unwrap();
        let outside = s.root.parent().unwrap().join("elsewhere");
        write(
            &outside,
            "00000000000000000001-00000000000000000010.wseg",
            b"outside",
        );
        std::os::unix::fs::symlink(&outside, s.root.join("segments/7")).unwrap();
        let inside = "segments/2/00000000000000000001-00000000000000000010.wseg";
        std::fs::create_dir_all(s.root.join("segments/2")).unwrap();
        std::os::unix::fs::symlink(s.root.join(SEGMENT), s.root.join(inside)).unwrap();
        for path in [
            escape,
            "segments/7/00000000000000000001-00000000000000000010.wseg",
        ] {
            let resp = s.get(path, &[]).await;
            assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
        }
        let resp = s.get(inside, &[]).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.bytes().await.unwrap(), segment());
        // A FIFO at an object's key is not a file: 404 at once, where
        // opening it would wait for a writer that never comes.
        let fifo = "segments/3/00000000000000000001-00000000000000000010.wseg";
        std::fs::create_dir_all(s.root.join("segments/3")).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(s.root.join(fifo))
            .status()
            .unwrap();
        assert!(made.success());
        for method in ["GET", "HEAD"] {
            let status = tokio::time::timeout(
                Duration::from_secs(30),
                s.raw_status(method, &format!("/{fifo}")),
            )
            .await
            .expect("a FIFO is answered, not waited on");
            assert_eq!(status, 404, "{method} of a FIFO");
        }
    }
    // Other methods.
    let resp = s.request(Method::POST, SEGMENT, &[]).await;
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    s.stop().await;
}

#[tokio::test]
async fn head_gives_headers_without_body() {
    let s = start().await;
    let resp = s.request(Method::HEAD, SEGMENT, &[]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers().clone();
    assert_eq!(header(&h, header::CONTENT_LENGTH), "1000");
    assert_eq!(header(&h, header::ETAG), etag_of(&segment()));
    assert_eq!(header(&h, header::CACHE_CONTROL), IMMUTABLE);
    assert_eq!(header(&h, header::ACCEPT_RANGES), "bytes");
    assert!(resp.bytes().await.unwrap().is_empty());

    let total = snapshot().len();
    let resp = s.request(Method::HEAD, SNAPSHOT, &[]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        header(resp.headers(), header::CONTENT_LENGTH),
        total.to_string()
    );
    assert_eq!(header(resp.headers(), header::ETAG), etag_of(&snapshot()));
    assert!(resp.bytes().await.unwrap().is_empty());

    let resp = s
        .request(Method::HEAD, SNAPSHOT, &[("range", "bytes=5-14")])
        .await;
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(header(resp.headers(), header::CONTENT_LENGTH), "10");
    assert_eq!(
        header(resp.headers(), header::CONTENT_RANGE),
        format!("bytes 5-14/{total}")
    );
    assert!(resp.bytes().await.unwrap().is_empty());

    // On the raw wire too.
    assert_eq!(s.raw_status("HEAD", &format!("/{HEAD}")).await, 200);
    s.stop().await;
}

#[tokio::test]
async fn serve_rejects_missing_root() {
    let dir = tempfile::tempdir().unwrap();
    let err = walcast::serve::serve(
        dir.path().join("missing"),
        "127.0.0.1:0".parse().unwrap(),
        |_| panic!("must not bind"),
        async {},
    )
    .await;
    assert!(err.is_err());
}

#[test]
fn keys_are_the_publishers() {
    use walcast_core::catalog::{page_key, segment_key, snapshot_key, HEAD_KEY};
    assert_eq!(SEGMENT, segment_key(1, 1, 10));
    assert_eq!(SNAPSHOT, snapshot_key(10, 1));
    assert_eq!(PAGE, page_key(0, 1, 5, 1));
    assert_eq!(HEAD, HEAD_KEY);
}

#[tokio::test]
async fn only_dataset_objects_are_served() {
    let s = start().await;
    let staging = format!("{SEGMENT}#1");
    let not_objects = [
        ".env",
        ".git/config",
        ".htpasswd",
        "secret.txt",
        "index.html",
        "wal.log",
        "head.json",
        // The file:// store's lock and temporary files, object_store's staging files.
        "catalog/.head.lock",
        "catalog/.tmpAbC123",
        staging.as_str(),
        "catalog/head.json.bak",
        "catalog/head.json~",
        "segments/1/.00000000000000000001-00000000000000000010.wseg",
        // Near misses of the key shapes.
        "catalog/Head.json",
        "catalog/pages/0.json",
        "catalog/pages/0-00000000000000000001-00000000000000000005.json",
        "catalog/pages/0-00000000000000000001-00000000000000000005-1.json.tmp",
        "segments/1/1-10.wseg",
        "segments/01/00000000000000000001-00000000000000000010.wseg",
        "segments/1/00000000000000000001-00000000000000000010.WSEG",
        "segments/1/00000000000000000001-00000000000000000010.wseg.tmp",
        "segments/1/00000000000000000001_00000000000000000010.wseg",
        "segments/1/2/00000000000000000001-00000000000000000010.wseg",
        "segments/00000000000000000001-00000000000000000010.wseg",
        "snapshots/00000000000000000010.wsnap",
        "snapshots/1/00000000000000000010-1.wsnap",
        "snapshots/+0000000000000000010-1.wsnap",
    ];
    for rel in not_objects {
        write(&s.root, rel, b"not a dataset object");
    }
    for rel in not_objects {
        let target = format!("/{}", rel.replace('#', "%23"));
        for method in ["GET", "HEAD"] {
            assert_eq!(
                s.raw_status(method, &target).await,
                404,
                "{method} {target}"
            );
        }
    }
    // Percent-encoded spellings of the same names.
    for target in [
        "/%2eenv",
        "/catalog/%2Ehead.lock",
        "/catalog/head%2ejson%7e",
    ] {
        assert_eq!(s.raw_status("GET", target).await, 404, "{target}");
    }
    #[cfg(unix)]
    {
        // Outside the key shapes nothing on disk is even looked at: a symlink
        // loop where no key can be is 404, the same loop at a key is an IO
        // error (500).
        std::os::unix::fs::symlink("loop", s.root.join("loop")).unwrap();
        assert_eq!(s.raw_status("GET", "/loop").await, 404);
        let at_key = "segments/1/00000000000000000021-00000000000000000030.wseg";
        std::os::unix::fs::symlink(
            "00000000000000000021-00000000000000000030.wseg",
            s.root.join(at_key),
        )
        .unwrap();
        assert_eq!(s.raw_status("GET", &format!("/{at_key}")).await, 500);
    }
    // The dataset's own objects are still served, and so are those of
    // datasets under a prefix of plain names; not under a hidden directory.
    for rel in [HEAD, PAGE, SEGMENT, SNAPSHOT] {
        assert_eq!(s.get(rel, &[]).await.status(), StatusCode::OK, "{rel}");
        let nested = format!("i1/basic/{rel}");
        write(&s.root, &nested, b"nested");
        assert_eq!(
            s.get(&nested, &[]).await.status(),
            StatusCode::OK,
            "{nested}"
        );
        let hidden = format!("i1/.git/{rel}");
        write(&s.root, &hidden, b"hidden");
        assert_eq!(
            s.raw_status("GET", &format!("/{hidden}")).await,
            404,
            "{hidden}"
        );
    }
    s.stop().await;
}

fn varies_on_origin(h: &HeaderMap) -> bool {
    h.get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("origin"))
}

async fn preflight(s: &Server, origin: &str) -> reqwest::Response {
    s.request(
        Method::OPTIONS,
        SEGMENT,
        &[
            ("origin", origin),
            ("access-control-request-method", "GET"),
            ("access-control-request-headers", "range"),
        ],
    )
    .await
}

#[tokio::test]
async fn cors_origin_allowlist() {
    let s = start_with(ServeOptions {
        cors_origins: vec!["https://app.example".into(), "http://localhost:3000".into()],
        ..ServeOptions::default()
    })
    .await;
    for origin in ["https://app.example", "http://localhost:3000"] {
        let resp = s.get(SEGMENT, &[("origin", origin)]).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let h = resp.headers();
        assert_eq!(header(h, header::ACCESS_CONTROL_ALLOW_ORIGIN), origin);
        assert!(varies_on_origin(h), "{h:?}");
        let exposed = header(h, header::ACCESS_CONTROL_EXPOSE_HEADERS).to_ascii_lowercase();
        assert!(exposed.contains("etag"), "{exposed}");

        let resp = preflight(&s, origin).await;
        assert!(resp.status().is_success(), "{}", resp.status());
        let h = resp.headers();
        assert_eq!(header(h, header::ACCESS_CONTROL_ALLOW_ORIGIN), origin);
        assert!(varies_on_origin(h), "{h:?}");

        // A page's replica may add headers of its own (the JS `headers`
        // option): the preflight allows what it asks for.
        let resp = s
            .request(
                Method::OPTIONS,
                SEGMENT,
                &[
                    ("origin", origin),
                    ("access-control-request-method", "GET"),
                    (
                        "access-control-request-headers",
                        "range,if-none-match,prefer,x-api-key",
                    ),
                ],
            )
            .await;
        assert!(resp.status().is_success(), "{}", resp.status());
        let allowed =
            header(resp.headers(), header::ACCESS_CONTROL_ALLOW_HEADERS).to_ascii_lowercase();
        for h in ["range", "if-none-match", "prefer", "x-api-key"] {
            assert!(allowed.contains(h), "{h} not in {allowed}");
        }
    }
    for origin in [
        "https://evil.example",
        "https://app.example.evil.example",
        "http://app.example",
        "https://app.example:8443",
        "null",
    ] {
        // The bytes are public either way; a browser just may not hand them
        // to a page from another origin.
        let resp = s.get(SEGMENT, &[("origin", origin)]).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let h = resp.headers();
        assert!(
            h.get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_none(),
            "{origin}: {h:?}"
        );
        assert!(varies_on_origin(h), "{h:?}");
        let resp = preflight(&s, origin).await;
        assert!(
            resp.headers()
                .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
                .is_none(),
            "{origin}"
        );
    }
    // No Origin at all (a CDN, curl): no CORS header, but caches are told
    // that the answer depends on it.
    let resp = s.get(HEAD, &[]).await;
    assert!(resp
        .headers()
        .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
        .is_none());
    assert!(varies_on_origin(resp.headers()));
    s.stop().await;
}

/// Whether the server has closed `c` (reading whatever it sent first into
/// `got`); never blocks.
fn closed_by_server(c: &std::net::TcpStream, got: &mut Vec<u8>) -> bool {
    use std::io::Read as _;
    let mut buf = [0u8; 4096];
    loop {
        match (&*c).read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
}

/// A connection that sent part of a request line and nothing more.
async fn slow_connection(addr: SocketAddr) -> std::net::TcpStream {
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET /catalog/head.json HT").await.unwrap();
    let c = c.into_std().unwrap();
    c.set_nonblocking(true).unwrap();
    c
}

/// `n` of [`slow_connection`].
async fn slow_connections(addr: SocketAddr, n: usize) -> Vec<std::net::TcpStream> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(slow_connection(addr).await);
    }
    conns
}

/// Waits (up to a generous bound) until the server has closed every one of
/// `conns`, and checks it answered none of them.
async fn wait_all_closed(conns: &[std::net::TcpStream], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got = vec![Vec::new(); conns.len()];
    let mut open: Vec<usize> = (0..conns.len()).collect();
    while !open.is_empty() {
        open.retain(|&i| !closed_by_server(&conns[i], &mut got[i]));
        if open.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {} connections still open after 60 s",
            open.len(),
            conns.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for g in got {
        let g = String::from_utf8_lossy(&g);
        assert!(g.is_empty() || g.starts_with("HTTP/1.1 408"), "{what}: {g}");
    }
}

#[tokio::test]
async fn slow_request_heads_are_closed_after_the_header_timeout() {
    let header_timeout = Duration::from_secs(2);
    let s = start_with(ServeOptions {
        header_timeout,
        ..ServeOptions::default()
    })
    .await;
    let opened = Instant::now();
    let slow = slow_connections(s.addr, 300).await;
    // One more that keeps sending a byte at a time: the timeout bounds the
    // whole head, not the gap between two reads.
    let mut drip = TcpStream::connect(s.addr).await.unwrap();
    let drip = tokio::spawn(async move {
        for b in b"GET /catalog/head.json HTTP/1.1\r\nX-Pad: "
            .iter()
            .chain([b'a'; 4096].iter())
        {
            if drip.write_all(&[*b]).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    });

    // While they wait, a normal request is answered.
    let resp = s.get(HEAD, &[]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.bytes().await.unwrap(),
        std::fs::read(s.root.join(HEAD)).unwrap()
    );
    let mut scratch = Vec::new();
    let still_open = slow
        .iter()
        .filter(|c| !closed_by_server(c, &mut scratch))
        .count();
    if opened.elapsed() < header_timeout {
        // Too early for any of them to have timed out: the request above
        // was served beside all of them.
        assert_eq!(still_open, slow.len());
    }

    // Then the server closes every one of them.
    wait_all_closed(&slow, "partial request lines").await;
    let cut_off = tokio::time::timeout(Duration::from_secs(60), drip)
        .await
        .expect("the dripping connection is closed within 60 s")
        .unwrap();
    assert!(cut_off, "the server read a 4 KiB header dripped over 400 s");
    // And serves as before.
    assert_eq!(s.get(SEGMENT, &[]).await.status(), StatusCode::OK);
    s.stop().await;
}

/// A request head over 64 KiB is refused (431, or the connection closed
/// before it was all read), so that a connection still sending its head
/// holds no more than that (hyper's own bound, about 400 KiB, let a
/// thousand connections hold 400 MB for the header timeout); a large
/// ordinary head (a 16 KiB cookie) is served.
#[tokio::test]
async fn request_heads_over_64_kib_are_refused() {
    let s = start().await;
    let cookie = "a".repeat(16 * 1024);
    let resp = s.get(HEAD, &[("cookie", &cookie)]).await;
    assert_eq!(resp.status(), StatusCode::OK);

    let mut conn = TcpStream::connect(s.addr).await.unwrap();
    let req = format!(
        "GET /{HEAD} HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    // The server may close the connection before it has read it all, and
    // reset it then.
    let _ = conn.write_all(req.as_bytes()).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut got))
        .await
        .expect("the oversized head is answered or closed within 30 s");
    let got = String::from_utf8_lossy(&got);
    assert!(
        got.is_empty() || got.starts_with("HTTP/1.1 431 "),
        "{}",
        got.lines().next().unwrap_or("")
    );
    // And serves as before.
    assert_eq!(s.get(HEAD, &[]).await.status(), StatusCode::OK);
    s.stop().await;
}

/// Reads one response with a `Content-Length` from a keep-alive connection.
async fn read_response(c: &mut TcpStream) -> (u16, Vec<u8>) {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 1024];
        let n = c.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed mid-response");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .expect("content-length");
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let mut chunk = [0u8; 1024];
        let n = c.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed mid-body");
        body.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(body.len(), len);
    (status, body)
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let s = start_with(ServeOptions {
        idle_timeout: Duration::from_secs(1),
        ..ServeOptions::default()
    })
    .await;
    let head = std::fs::read(s.root.join(HEAD)).unwrap();
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    for _ in 0..2 {
        c.write_all(b"GET /catalog/head.json HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_response(&mut c).await, (200, head.clone()));
    }
    // Then the client goes quiet; the server hangs up.
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(60), c.read_to_end(&mut rest))
        .await
        .expect("an idle keep-alive connection is closed within 60 s");
    assert!(r.is_err() || rest.is_empty(), "{rest:?}");
    s.stop().await;
}

#[tokio::test]
async fn stalled_downloads_are_closed_after_the_idle_timeout() {
    let s = start_with(ServeOptions {
        idle_timeout: Duration::from_millis(500),
        ..ServeOptions::default()
    })
    .await;
    let big = "snapshots/00000000000000000020-1.wsnap";
    let len = 32 << 20;
    write(&s.root, big, &vec![7u8; len]);
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(16 * 1024).unwrap();
    let mut c = sock.connect(s.addr).await.unwrap();
    // `Connection: close`: a transfer left to finish ends the connection.
    c.write_all(format!("GET /{big} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut first = [0u8; 1];
    c.read_exact(&mut first).await.unwrap();
    // The client stops reading: once the socket buffers are full nothing
    // moves, and the server gives up on the connection.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(60), c.read_to_end(&mut got))
        .await
        .expect("the stalled connection ends within 60 s");
    assert!(
        got.len() + 1 < len,
        "the whole {len}-byte body arrived ({} bytes): the stalled transfer was not cut off",
        got.len() + 1
    );
    s.stop().await;
}

/// Hashing a large file for its ETag (the first request after a start, or
/// a new snapshot) is the server's work, not an idle client: the idle
/// timeout does not cut the request off, however long the hash takes.
#[tokio::test]
async fn a_request_waiting_for_its_etag_hash_is_not_idle() {
    let s = start_with(ServeOptions {
        idle_timeout: Duration::from_millis(50),
        ..ServeOptions::default()
    })
    .await;
    let big = "snapshots/00000000000000000020-1.wsnap";
    let len: u64 = 4 << 30;
    write_sparse(&s.root, big, len);
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(format!("HEAD /{big} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut chunk = [0u8; 1024];
        let n = c.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "the connection was closed while the server hashed the file"
        );
        got.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&got).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains(&format!("content-length: {len}")), "{head}");
    s.stop().await;
}

#[tokio::test]
async fn connections_over_the_cap_wait_for_a_free_slot() {
    let s = start_with(ServeOptions {
        max_connections: 8,
        header_timeout: Duration::from_secs(2),
        ..ServeOptions::default()
    })
    .await;
    let slow = slow_connections(s.addr, 8).await;
    // A ninth connection is taken only once one of the eight is gone.
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"GET /catalog/head.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), c.read_to_end(&mut resp))
        .await
        .expect("the waiting connection is served within 60 s")
        .unwrap();
    assert!(
        resp.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&resp)
    );
    let mut scratch = Vec::new();
    let closed = slow
        .iter()
        .filter(|c| closed_by_server(c, &mut scratch))
        .count();
    assert!(
        closed >= 1,
        "a ninth connection was served while all eight others were open"
    );
    wait_all_closed(&slow, "connections at the cap").await;
    s.stop().await;
}

/// Long-polls are held on at most three quarters of the connection slots:
/// past that one is answered at once (304 without Preference-Applied, so the
/// replica polls), and long-polling clients never take every slot from the
/// GETs of segments and snapshots.
#[tokio::test]
async fn long_polls_hold_at_most_three_quarters_of_the_connections() {
    let s = start_with(ServeOptions {
        max_connections: 4,
        ..ServeOptions::default()
    })
    .await;
    let etag = etag_of(br#"{"epoch":1,"last":10}"#);
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = TcpStream::connect(s.addr).await.unwrap();
        let req = format!(
            "GET /{HEAD}?wait=30 HTTP/1.1\r\nHost: x\r\nIf-None-Match: {etag}\r\nConnection: close\r\n\r\n"
        );
        c.write_all(req.as_bytes()).await.unwrap();
        held.push(c);
    }
    // The three are held (given time to reach the hold before the fourth
    // asks): none has answered yet.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut buf = [0u8; 1];
    for c in &mut held {
        let r = tokio::time::timeout(Duration::from_millis(50), c.read(&mut buf)).await;
        assert!(
            r.is_err(),
            "a long-poll within the cap was answered at once"
        );
    }
    let resp = s
        .get(
            &format!("{HEAD}?wait=30"),
            &[("If-None-Match", etag.as_str())],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::NOT_MODIFIED);
    assert!(
        resp.headers().get("preference-applied").is_none(),
        "a fourth long-poll was held"
    );
    let resp = s.get(SEGMENT, &[]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), segment().as_slice());
    drop(held);
    s.stop().await;
}

/// The mode of a file this process creates without asking for one (0666
/// less the umask) and its owner.
fn fresh_file(dir: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt as _;
    let probe = dir.join("probe");
    std::fs::write(&probe, b"").unwrap();
    let meta = std::fs::metadata(&probe).unwrap();
    std::fs::remove_file(&probe).unwrap();
    (meta.mode() & 0o777, meta.uid())
}

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).unwrap().mode() & 0o777
}

async fn put(
    store: &walcast::store::Store,
    key: &str,
    body: &[u8],
    condition: walcast_core::publisher::PutCondition,
) -> Option<String> {
    use walcast_core::publisher::{ObjectKind, PutRequest, PutResponse};
    let kind = match key.split('/').next() {
        Some("segments") => ObjectKind::Segment,
        Some("snapshots") => ObjectKind::Snapshot,
        _ if key == HEAD => ObjectKind::Head,
        _ => ObjectKind::Page,
    };
    let req = PutRequest {
        id: walcast_core::io::RequestId(1),
        key: key.into(),
        body: body.to_vec(),
        condition,
        kind,
    };
    match store.put(&req).await {
        PutResponse::Ok { etag } => etag,
        other => panic!("PUT {key}: {other:?}"),
    }
}

#[tokio::test]
async fn dataset_files_share_one_mode() {
    use walcast_core::publisher::PutCondition;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    let store = walcast::store::Store::open(&format!("file://{}", root.display())).unwrap();
    let etag = put(&store, HEAD, b"{\"v\":1}", PutCondition::CreateOnly).await;
    let expected = fresh_file(dir.path()).0 & 0o644;
    assert_eq!(mode_of(&root.join(HEAD)), expected, "new head");
    put(
        &store,
        HEAD,
        b"{\"v\":2}",
        PutCondition::IfMatch(etag.unwrap()),
    )
    .await;
    for key in [SEGMENT, PAGE, SNAPSHOT] {
        put(&store, key, b"immutable", PutCondition::CreateOnly).await;
    }
    for key in [HEAD, SEGMENT, PAGE, SNAPSHOT] {
        assert_eq!(mode_of(&root.join(key)), expected, "{key}");
    }
    store.put_raw(HEAD, b"{\"v\":3}".to_vec()).await.unwrap();
    assert_eq!(
        mode_of(&root.join(HEAD)),
        expected,
        "head written by put_raw"
    );
}

/// `walcast serve` as a separate process: as another user than the one that
/// published when the tests run as root (through `setpriv`), else as this
/// one.
#[tokio::test]
async fn permission_errors_are_500_and_published_objects_readable() {
    use std::io::BufRead as _;
    use std::os::unix::fs::PermissionsExt as _;
    use std::process::{Command, Stdio};
    use walcast_core::publisher::PutCondition;

    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let root = dir.path().join("data");
    let store = walcast::store::Store::open(&format!("file://{}", root.display())).unwrap();
    let head = b"{\"v\":1}";
    put(&store, HEAD, head, PutCondition::CreateOnly).await;
    put(&store, SEGMENT, &segment(), PutCondition::CreateOnly).await;
    let locked = "segments/1/00000000000000000011-00000000000000000020.wseg";
    put(&store, locked, b"locked", PutCondition::CreateOnly).await;
    std::fs::set_permissions(root.join(locked), std::fs::Permissions::from_mode(0o000)).unwrap();

    let (mode, uid) = fresh_file(dir.path());
    let as_other = uid == 0;
    if as_other && Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("SKIP: running as root without setpriv: cannot serve as another user");
        return;
    }
    let bin = env!("CARGO_BIN_EXE_walcast");
    let mut cmd = if as_other {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            bin,
        ]);
        c
    } else {
        Command::new(bin)
    };
    let mut child = cmd
        .arg("serve")
        .arg(&root)
        .args([
            "--addr",
            "127.0.0.1:0",
            "--cors-origin",
            "https://app.example",
        ])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let _ = tx.send(line.unwrap_or_default());
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(60));
    let Ok(line) = line else {
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        panic!(
            "walcast serve did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let base = line
        .split("http://")
        .nth(1)
        .expect("listening line")
        .trim()
        .to_owned();
    let client = reqwest::Client::new();
    let get = |rel: &str, origin: Option<&str>| {
        let mut req = client.get(format!("http://{base}/{rel}"));
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        req.send()
    };

    if !as_other || mode & 0o004 != 0 {
        let resp = get(HEAD, None).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "the published head");
        assert_eq!(resp.bytes().await.unwrap(), &head[..]);
    }
    let resp = get(SEGMENT, Some("https://app.example")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        header(resp.headers(), header::ACCESS_CONTROL_ALLOW_ORIGIN),
        "https://app.example"
    );
    let resp = get(SEGMENT, Some("https://evil.example")).await.unwrap();
    assert!(resp
        .headers()
        .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
        .is_none());
    // An object the server may not read is a server problem, not a missing object.
    let resp = get(locked, None).await.unwrap();
    let status = resp.status();

    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{stderr}");
    let path = root.join(locked).display().to_string();
    assert!(
        stderr.contains(&path),
        "no log line names {path}:\n{stderr}"
    );
}

/// A client that keeps a download going a few bytes at a time never lets
/// its connection go idle: shutdown waits for it only the drain timeout.
#[tokio::test]
async fn shutdown_drops_a_trickling_download_after_the_drain_timeout() {
    let mut s = start_with(ServeOptions {
        drain_timeout: Duration::from_millis(500),
        // Longer than the test waits: only the drain timeout can end it.
        idle_timeout: Duration::from_secs(600),
        ..ServeOptions::default()
    })
    .await;
    // Far more than the socket buffers hold, so the response is still
    // being written while the client trickles.
    let big = "snapshots/00000000000000000020-1.wsnap";
    write(&s.root, big, &pattern(64 << 20, 3));
    let addr = s.addr;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let reader = {
        let done = done.clone();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            write!(c, "GET /{big} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut buf = [0u8; 4096];
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        let _ = started_tx.send(());
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // The download has begun, at about 200 KB/s (5 minutes for all of it).
    tokio::task::spawn_blocking(move || started_rx.recv().unwrap())
        .await
        .unwrap();
    s.stop.take().unwrap().send(()).unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(60), &mut s.task).await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(
        stopped.is_ok(),
        "serve did not return: it waited on the trickling download"
    );
    stopped.unwrap().unwrap().unwrap();
    tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap();
}

/// Bytes a process has read through `read(2)` and friends (`rchar`).
pub(crate) fn rchar(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("rchar:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A one-byte range of a large object not yet in the ETag cache (after a
/// restart, or any change of its mtime), asked for by 8 clients at once:
/// each request hashes the whole file for its strong ETag, in parallel, so
/// 8 one-byte GETs make the server read 8 × the file (a 10 GB snapshot: 80
/// GB, and no answer within a replica's 30 s timeout, whose retries start
/// more). The hash of one file should be computed once (single-flight), or
/// the validator should not need the whole content.
#[test]
fn concurrent_range_gets_of_a_large_object_hash_it_once() {
    use std::io::{Read as _, Write as _};
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write(root, HEAD, br#"{"epoch":1}"#);
    let size: u64 = 512 << 20;
    write_sparse(root, SNAPSHOT, size);
    let serve = crate::support::Serve::start(root);
    let pid = serve.pid();
    let addr = serve.url.trim_start_matches("http://").to_string();
    let before = rchar(pid);
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut c = std::net::TcpStream::connect(&addr).unwrap();
                write!(
                    c,
                    "GET /{SNAPSHOT} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-0\r\nConnection: close\r\n\r\n"
                )
                .unwrap();
                let mut out = Vec::new();
                c.read_to_end(&mut out).unwrap();
                String::from_utf8_lossy(&out).lines().next().unwrap_or("").to_string()
            })
        })
        .collect();
    for c in clients {
        let status = c.join().unwrap();
        assert!(status.contains(" 206 "), "{status}\n{}", serve.logs());
    }
    let read = rchar(pid) - before;
    eprintln!("8 one-byte range GETs of a {size}-byte object read {read} bytes");
    assert!(
        read < 2 * size,
        "8 one-byte range GETs read {} MiB of a {} MiB object",
        read >> 20,
        size >> 20
    );
}

/// A client that asks for the first byte of each of many large objects
/// not yet in the ETag cache and closes its connections at once (a
/// request costs it a hundred bytes): the hashes its requests queued are
/// given up when their turn comes and nobody waits for them, instead of
/// the server reading every object whole while the objects replicas ask
/// for wait behind them.
#[test]
fn hashes_nobody_waits_for_any_more_are_given_up() {
    use std::io::Write as _;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write(root, HEAD, br#"{"epoch":1}"#);
    let size: u64 = 256 << 20;
    let files = 16u64;
    let keys: Vec<String> = (1..=files)
        .map(|i| format!("snapshots/{:020}-1.wsnap", i * 10))
        .collect();
    for k in &keys {
        write_sparse(root, k, size);
    }
    let serve = crate::support::Serve::start(root);
    let pid = serve.pid();
    let addr = serve.url.trim_start_matches("http://").to_string();
    let before = rchar(pid);
    let conns: Vec<_> = keys
        .iter()
        .map(|k| {
            let mut c = std::net::TcpStream::connect(&addr).unwrap();
            write!(
                c,
                "GET /{k} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-0\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            c
        })
        .collect();
    // Long enough for each request to queue its hash, then gone.
    std::thread::sleep(Duration::from_millis(300));
    drop(conns);
    // Until the server has read nothing more for a second.
    let mut read = rchar(pid) - before;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = rchar(pid) - before;
        if now == read {
            break;
        }
        read = now;
    }
    eprintln!("{files} abandoned one-byte GETs of {size}-byte objects read {read} bytes");
    assert!(
        read < 8 * size,
        "{files} abandoned one-byte GETs made the server read {} MiB ({} objects of {} MiB)",
        read >> 20,
        files,
        size >> 20
    );
    // The server still answers, and hashes what is asked for.
    let mut c = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        c,
        "GET /{} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-0\r\nConnection: close\r\n\r\n",
        keys[keys.len() - 1]
    )
    .unwrap();
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut c, &mut out).unwrap();
    let status = String::from_utf8_lossy(&out)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    assert!(status.contains(" 206 "), "{status}\n{}", serve.logs());
}

/// `walcast serve` under a file-descriptor limit below its connection cap
/// (the default cap is 1024, as is the usual soft `RLIMIT_NOFILE`): clients
/// that open connections and trickle nothing take every descriptor, and a
/// client already connected then gets 500 for the head (the server cannot
/// open the file), with new connections refused by `accept`. The cap should
/// leave descriptors for the files requests open (clamp it to the limit
/// less a reserve, or raise the soft limit), so that the flood waits in the
/// backlog and the head answers.
#[test]
fn connections_up_to_the_fd_limit_do_not_starve_file_opens() {
    use std::io::{Read as _, Write as _};
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write(root, HEAD, br#"{"epoch":1}"#);
    let logs = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg("ulimit -n 64 && exec \"$0\" serve \"$1\" --addr 127.0.0.1:0")
        .arg(crate::support::bin())
        .arg(root);
    let mut proc = crate::support::Proc::spawn("serve", cmd, logs.path());
    let deadline = Instant::now() + Duration::from_secs(20);
    let url = loop {
        let out = proc.stdout();
        if let Some(l) = out.lines().next().filter(|_| out.contains('\n')) {
            break l
                .strip_prefix("walcast serve: listening on ")
                .unwrap()
                .trim()
                .trim_end_matches('/')
                .to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no listening line\n{}",
            proc.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let addr = url.trim_start_matches("http://").to_string();
    let mut kept = std::net::TcpStream::connect(&addr).unwrap();
    // The flood: more connections than descriptors, each a partial request.
    let mut flood = Vec::new();
    for _ in 0..80 {
        let mut c = std::net::TcpStream::connect(&addr).unwrap();
        let _ = c.write_all(b"GET / HTTP/1.1\r\n");
        flood.push(c);
    }
    std::thread::sleep(Duration::from_millis(500));
    write!(
        kept,
        "GET /{HEAD} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    kept.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut out = Vec::new();
    let _ = kept.read_to_end(&mut out);
    let status = String::from_utf8_lossy(&out)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    drop(flood);
    proc.kill9();
    assert!(
        status.contains(" 200 "),
        "the head answered {status:?}\n{}",
        proc.logs()
    );
}
