//! `walcast serve`: HTTP semantics of the dataset server (ranges, ETags,
//! caching, CORS, path safety), exercised over real sockets.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use reqwest::header::{self, HeaderMap};
use reqwest::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

const SEGMENT: &str = "segments/1/1-10.wseg";
const SNAPSHOT: &str = "snapshots/00000001.wsnap";
const PAGE: &str = "catalog/pages/0.json";
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
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    write(&root, HEAD, br#"{"epoch":1,"last":10}"#);
    write(&root, PAGE, br#"{"segments":[]}"#);
    write(&root, SEGMENT, &segment());
    write(&root, SNAPSHOT, &snapshot());
    write(dir.path(), "secret.txt", b"outside the root");

    let (stop, stopped) = oneshot::channel::<()>();
    let (bound_tx, bound_rx) = oneshot::channel();
    let task = tokio::spawn(walcast::serve::serve(
        root.clone(),
        "127.0.0.1:0".parse().unwrap(),
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
                ("access-control-request-headers", "range,if-none-match"),
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
        // A symlink leading outside the root is refused; one inside is fine.
        std::os::unix::fs::symlink(
            s.root.parent().unwrap().join("secret.txt"),
            s.root.join("escape"),
        )
        .unwrap();
        std::os::unix::fs::symlink("/etc", s.root.join("etc")).unwrap();
        std::os::unix::fs::symlink(s.root.join(SEGMENT), s.root.join("inside")).unwrap();
        assert_eq!(s.get("/escape", &[]).await.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            s.get("/etc/passwd", &[]).await.status(),
            StatusCode::NOT_FOUND
        );
        let resp = s.get("/inside", &[]).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.bytes().await.unwrap(), segment());
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
