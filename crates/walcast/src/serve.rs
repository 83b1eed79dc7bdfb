//! `walcast serve`: HTTP for a `file://` dataset.
//!
//! Serves a directory holding a walcast dataset (`catalog/head.json`,
//! `catalog/pages/*.json`, `segments/<epoch>/<first>-<last>.wseg`,
//! `snapshots/*.wsnap`) to browsers, workers and CDNs:
//!
//! - `GET`/`HEAD` of any regular file under the root, by percent-decoded URL
//!   path; `..`, absolute paths, directories and anything resolving (through
//!   symlinks) outside the root answer 404;
//! - single byte ranges (`bytes=a-b`, `bytes=a-`, `bytes=-n`) answer 206,
//!   unsatisfiable ones 416, multi-range or malformed ones are ignored (200);
//! - strong ETags `"<crc32 hex>-<len hex>"` and `If-None-Match` → 304;
//! - `Cache-Control: public, max-age=31536000, immutable` for the immutable
//!   objects (`segments/`, `snapshots/`, `catalog/pages/`) and `no-cache` for
//!   everything else, notably the head;
//! - CORS for any origin, with the range/ETag headers exposed.
//!
//! Small files are read whole on every request (so the head, replaced by an
//! atomic rename, is always fresh); large ones are streamed from a seek to the
//! requested slice, their ETag computed once and cached by (path, length,
//! modification time).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;
use axum::Router;
use bytes::Bytes;
use tokio::io::AsyncReadExt as _;
use tower_http::cors::{Any, CorsLayer};

/// Files up to this size are read whole on every request.
const SMALL_FILE: u64 = 1 << 20;
/// Read size when hashing or streaming large files.
const CHUNK: usize = 256 * 1024;
/// Bound on cached ETags (the cache is simply cleared when it is exceeded).
const ETAG_CACHE_MAX: usize = 16 * 1024;

const IMMUTABLE: &str = "public, max-age=31536000, immutable";
const NO_CACHE: &str = "no-cache";
const JSON: &str = "application/json";
const OCTETS: &str = "application/octet-stream";

/// Shared state of the router.
struct Served {
    root: PathBuf,
    etags: Mutex<HashMap<PathBuf, CachedTag>>,
}

struct CachedTag {
    len: u64,
    mtime: Option<SystemTime>,
    etag: String,
}

/// An opened regular file with its validator.
struct Entity {
    file: File,
    len: u64,
    etag: String,
    /// The whole contents, for small files.
    data: Option<Bytes>,
}

/// The router serving `root`.
pub fn router(root: PathBuf) -> Router {
    let state = Arc::new(Served {
        root,
        etags: Mutex::new(HashMap::new()),
    });
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::HEAD, Method::OPTIONS])
        .allow_headers([header::RANGE, header::IF_NONE_MATCH, header::AUTHORIZATION])
        .expose_headers([
            header::ETAG,
            header::CONTENT_RANGE,
            header::CONTENT_LENGTH,
            header::ACCEPT_RANGES,
        ])
        .max_age(Duration::from_secs(24 * 60 * 60));
    Router::new().fallback(handle).with_state(state).layer(cors)
}

/// Binds `addr` (port 0 allowed), calls `on_bound(actual_addr)`, and serves until `shutdown` resolves.
pub async fn serve(
    root: PathBuf,
    addr: SocketAddr,
    on_bound: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        tokio::fs::metadata(&root)
            .await
            .with_context(|| format!("dataset directory {}", root.display()))?
            .is_dir(),
        "{} is not a directory",
        root.display()
    );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let bound = listener.local_addr().context("local address")?;
    tracing::info!(root = %root.display(), addr = %bound, "walcast serve listening");
    on_bound(bound);
    axum::serve(listener, router(root))
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving HTTP")?;
    Ok(())
}

async fn handle(
    State(state): State<Arc<Served>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let response = respond(&state, &method, &uri, &headers).await;
    tracing::debug!(
        %method,
        path = uri.path(),
        range = ?headers.get(header::RANGE),
        status = response.status().as_u16(),
        "walcast serve request"
    );
    response
}

async fn respond(state: &Arc<Served>, method: &Method, uri: &Uri, headers: &HeaderMap) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return Response::builder()
            .status(StatusCode::METHOD_NOT_ALLOWED)
            .header(header::ALLOW, "GET, HEAD, OPTIONS")
            .body(Body::empty())
            .expect("static response");
    }
    let Some(rel) = relative_path(uri.path()) else {
        return not_found();
    };
    let opened = {
        let state = Arc::clone(state);
        let rel = rel.clone();
        tokio::task::spawn_blocking(move || open_entity(&state, &rel)).await
    };
    let entity = match opened {
        Ok(Ok(entity)) => entity,
        Ok(Err(e)) if is_not_found(&e) => return not_found(),
        Ok(Err(e)) => {
            tracing::warn!(path = rel, error = %e, "walcast serve: reading file");
            return status_only(StatusCode::INTERNAL_SERVER_ERROR);
        }
        Err(e) => {
            tracing::warn!(path = rel, error = %e, "walcast serve: blocking task failed");
            return status_only(StatusCode::INTERNAL_SERVER_ERROR);
        }
    };

    let cache_control = if ["segments/", "snapshots/", "catalog/pages/"]
        .iter()
        .any(|p| rel.starts_with(p))
    {
        IMMUTABLE
    } else {
        NO_CACHE
    };
    let content_type = if rel.ends_with(".json") { JSON } else { OCTETS };
    let etag = HeaderValue::from_str(&entity.etag).expect("ETag is ASCII");
    let builder = Response::builder()
        .header(header::ETAG, etag)
        .header(header::CACHE_CONTROL, cache_control)
        .header(header::ACCEPT_RANGES, "bytes");

    if if_none_match(headers, &entity.etag) {
        return builder
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .expect("valid response");
    }

    let total = entity.len;
    let range = if range_applies(headers, &entity.etag) {
        let mut values = headers.get_all(header::RANGE).iter();
        match (values.next(), values.next()) {
            (Some(v), None) => parse_range(v.as_bytes(), total),
            _ => RangeReq::Ignore,
        }
    } else {
        RangeReq::Ignore
    };
    let builder = builder
        .header(header::CONTENT_TYPE, content_type)
        .header("x-content-type-options", "nosniff");
    let (builder, start, end) = match range {
        RangeReq::Unsatisfiable => {
            return builder
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{total}"))
                .header(header::CONTENT_LENGTH, 0)
                .body(Body::empty())
                .expect("valid response");
        }
        RangeReq::Slice(start, last) => (
            builder.status(StatusCode::PARTIAL_CONTENT).header(
                header::CONTENT_RANGE,
                format!("bytes {start}-{last}/{total}"),
            ),
            start,
            last + 1,
        ),
        RangeReq::Ignore => (builder.status(StatusCode::OK), 0, total),
    };
    let builder = builder.header(header::CONTENT_LENGTH, end - start);
    let body = if method == Method::HEAD || start == end {
        Body::empty()
    } else if let Some(data) = entity.data {
        // Small file: already in memory. `end <= total == data.len()`.
        Body::from(data.slice(start as usize..end as usize))
    } else {
        match stream_slice(entity.file, start, end - start).await {
            Ok(body) => body,
            Err(e) => {
                tracing::warn!(path = rel, error = %e, "walcast serve: seeking");
                return status_only(StatusCode::INTERNAL_SERVER_ERROR);
            }
        }
    };
    builder.body(body).expect("valid response")
}

fn status_only(status: StatusCode) -> Response {
    Response::builder()
        .status(status)
        .header(header::CACHE_CONTROL, NO_CACHE)
        .body(Body::empty())
        .expect("static response")
}

fn not_found() -> Response {
    status_only(StatusCode::NOT_FOUND)
}

fn is_not_found(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound
            | io::ErrorKind::PermissionDenied
            | io::ErrorKind::IsADirectory
            | io::ErrorKind::NotADirectory
    )
}

/// The percent-decoded URL path as a `/`-joined relative path of plain
/// components, or `None` if it is malformed or tries to leave the root.
fn relative_path(uri_path: &str) -> Option<String> {
    let decoded = percent_decode(uri_path)?;
    let mut parts = Vec::new();
    for seg in decoded.split('/') {
        if seg.is_empty() {
            continue;
        }
        if seg.contains(['\0', '\\']) {
            return None;
        }
        let mut comps = Path::new(seg).components();
        match (comps.next(), comps.next()) {
            (Some(Component::Normal(_)), None) => parts.push(seg),
            _ => return None,
        }
    }
    if parts.is_empty() {
        return None;
    }
    Some(parts.join("/"))
}

fn percent_decode(s: &str) -> Option<String> {
    fn hex(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = b.get(i + 1..i + 3)?;
            out.push(hex(h[0])? << 4 | hex(h[1])?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Resolves `rel` under the root (refusing anything outside it), opens it and
/// computes its ETag. Blocking.
fn open_entity(state: &Served, rel: &str) -> io::Result<Entity> {
    let root = state.root.canonicalize()?;
    let path = root.join(rel).canonicalize()?;
    if !path.starts_with(&root) {
        return Err(io::Error::new(io::ErrorKind::NotFound, "outside the root"));
    }
    let mut file = File::open(&path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(io::ErrorKind::NotFound, "not a file"));
    }
    let len = meta.len();
    if len <= SMALL_FILE {
        let mut data = Vec::with_capacity(len as usize);
        file.read_to_end(&mut data)?;
        let etag = etag_of(crc32fast::hash(&data), data.len() as u64);
        return Ok(Entity {
            file,
            len: data.len() as u64,
            etag,
            data: Some(Bytes::from(data)),
        });
    }
    let mtime = meta.modified().ok();
    let cached = {
        let etags = state.etags.lock().unwrap_or_else(|e| e.into_inner());
        etags
            .get(&path)
            .filter(|c| c.len == len && c.mtime == mtime)
            .map(|c| c.etag.clone())
    };
    let etag = match cached {
        Some(etag) => etag,
        None => {
            let mut hasher = crc32fast::Hasher::new();
            let mut buf = vec![0u8; CHUNK];
            let mut read = 0u64;
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                read += n as u64;
            }
            if read != len {
                return Err(io::Error::other("file changed while hashing"));
            }
            let etag = etag_of(hasher.finalize(), len);
            let mut etags = state.etags.lock().unwrap_or_else(|e| e.into_inner());
            if etags.len() >= ETAG_CACHE_MAX {
                etags.clear();
            }
            etags.insert(
                path,
                CachedTag {
                    len,
                    mtime,
                    etag: etag.clone(),
                },
            );
            etag
        }
    };
    Ok(Entity {
        file,
        len,
        etag,
        data: None,
    })
}

fn etag_of(crc: u32, len: u64) -> String {
    format!("\"{crc:08x}-{len:x}\"")
}

/// Streams `len` bytes of `file` from `start`.
async fn stream_slice(mut file: File, start: u64, len: u64) -> io::Result<Body> {
    let file = tokio::task::spawn_blocking(move || {
        file.seek(SeekFrom::Start(start))?;
        Ok::<_, io::Error>(file)
    })
    .await
    .map_err(io::Error::other)??;
    let file = tokio::fs::File::from_std(file);
    let stream = futures::stream::unfold((file, len), |(mut file, left)| async move {
        if left == 0 {
            return None;
        }
        let mut buf = vec![0u8; CHUNK.min(left as usize)];
        match file.read(&mut buf).await {
            Ok(0) => Some((
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file shrank while streaming",
                )),
                (file, 0),
            )),
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), (file, left - n as u64)))
            }
            Err(e) => Some((Err(e), (file, 0))),
        }
    });
    Ok(Body::from_stream(stream))
}

/// Whether `If-None-Match` (weak comparison, as RFC 9110 requires) matches.
fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag)
}

/// Whether a `Range` should be honoured given `If-Range`: only if absent or
/// strongly matching our ETag (we send no `Last-Modified`, so dates never
/// match).
fn range_applies(headers: &HeaderMap, etag: &str) -> bool {
    match headers.get(header::IF_RANGE) {
        None => true,
        Some(v) => v.to_str().is_ok_and(|v| v.trim() == etag),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum RangeReq {
    /// No (usable) range: send the whole representation.
    Ignore,
    /// 416.
    Unsatisfiable,
    /// 206 with this inclusive byte range.
    Slice(u64, u64),
}

/// Parses a `Range` header value against a representation of `total` bytes.
fn parse_range(value: &[u8], total: u64) -> RangeReq {
    fn num(s: &str) -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    }
    let Ok(s) = std::str::from_utf8(value) else {
        return RangeReq::Ignore;
    };
    let Some((unit, spec)) = s.trim().split_once('=') else {
        return RangeReq::Ignore;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
        return RangeReq::Ignore;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeReq::Ignore;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        let Some(n) = num(b) else {
            return RangeReq::Ignore;
        };
        if n == 0 || total == 0 {
            return RangeReq::Unsatisfiable;
        }
        return RangeReq::Slice(total - n.min(total), total - 1);
    }
    let Some(first) = num(a) else {
        return RangeReq::Ignore;
    };
    let last = if b.is_empty() {
        None
    } else {
        match num(b) {
            Some(last) if last >= first => Some(last),
            _ => return RangeReq::Ignore,
        }
    };
    if first >= total {
        return RangeReq::Unsatisfiable;
    }
    RangeReq::Slice(first, last.map_or(total - 1, |l| l.min(total - 1)))
}

#[cfg(test)]
mod tests {
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
}
