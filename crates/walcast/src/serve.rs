//! `walcast serve`: HTTP for a `file://` dataset.
//!
//! Serves a directory holding a walcast dataset to browsers, workers and
//! CDNs, and nothing else in it:
//!
//! - `GET`/`HEAD` of the dataset's own objects only, by percent-decoded URL
//!   path: `catalog/head.json`, `catalog/pages/<level>-<first>-<last>-<epoch>.json`,
//!   `segments/<epoch>/<first>-<last>.wseg`, `snapshots/<lsn>-<epoch>.wsnap`
//!   and `deltas/<base>-<lsn>-<epoch>.wdelta`,
//!   spelt exactly as the publisher names them (see
//!   [`walcast_core::catalog::segment_key`] and its siblings), at the root or
//!   under a prefix of plain directory names (a root holding several
//!   datasets: `/<name>/catalog/head.json`). Any other path (dotfiles, lock
//!   and staging files, near misses) answers 404 without touching the
//!   filesystem; an object whose path resolves (through symlinks) outside
//!   the root, or that is not a regular file, answers 404 too;
//! - a missing object answers 404; any other IO error (permission denied,
//!   a symlink loop, …) answers 500 and is logged with the file's path;
//! - single byte ranges (`bytes=a-b`, `bytes=a-`, `bytes=-n`) answer 206,
//!   unsatisfiable ones 416, multi-range or malformed ones are ignored (200);
//! - strong ETags `"<crc32 hex>-<len hex>"` and `If-None-Match` → 304;
//! - `Cache-Control: public, max-age=31536000, immutable` for the immutable
//!   objects (segments, snapshots, pages) and `no-cache` for the head;
//! - CORS for any origin (`*`), or only for the origins listed in
//!   [`ServeOptions::cors_origins`] (the request's `Origin` is echoed when
//!   listed; `Vary: Origin` is always sent), with the range/ETag headers
//!   exposed; with access tokens required, no origin unless listed (`*`
//!   must then be asked for);
//! - access tokens ([`walcast_core::token`]) when
//!   [`ServeOptions::verify_keys`] is set: every GET/HEAD needs a valid,
//!   unexpired token whose prefix covers the object, in `Authorization:
//!   Bearer <token>` or the query parameter `token`; else 401 with a
//!   `WWW-Authenticate` naming why (`missing`, `malformed`,
//!   `bad_signature`, `expired`, `wrong_prefix`). Range and conditional
//!   requests work as without. An immutable object fetched with the token
//!   in the header is `private` to caches (a shared cache keyed by URL would
//!   hand it to anyone); with the token in the query the URL carries the
//!   token, and the answer stays `public` for caching proxies.
//!
//! Connections are bounded ([`ServeOptions`]): at most `max_connections` are
//! served at once (further ones wait, unaccepted, in the listen backlog); a
//! request's head must arrive within `header_timeout` of the server starting
//! to wait for it (which also bounds a kept-alive connection waiting for its
//! next request); a connection on which no byte moves either way for
//! `idle_timeout` (a silent client, a download the client stopped reading)
//! is closed.
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
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;
use axum::Router;
use bytes::Bytes;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tower_http::cors::{AllowHeaders, AllowOrigin, Any, CorsLayer};
use walcast_core::catalog::{delta_key, page_key, segment_key, snapshot_key, HEAD_KEY};
use walcast_core::keys::PublicKey;

use crate::longpoll::{self, HeadSignal, HeadWatch, DEFAULT_MAX_WAIT, MAX_WAIT_LIMIT};
use walcast_core::token;

/// Files up to this size are read whole on every request.
const SMALL_FILE: u64 = 1 << 20;
/// Read size when hashing or streaming large files.
const CHUNK: usize = 256 * 1024;
/// Bound on cached ETags (the cache is simply cleared when it is exceeded).
const ETAG_CACHE_MAX: usize = 16 * 1024;

/// Default of [`ServeOptions::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default of [`ServeOptions::header_timeout`].
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`ServeOptions::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest accepted [`ServeOptions::max_connections`].
const MAX_CONNECTIONS_LIMIT: usize = 1 << 20;

const IMMUTABLE: &str = "public, max-age=31536000, immutable";
/// [`IMMUTABLE`] for an answer to a request whose token came in a header.
const IMMUTABLE_PRIVATE: &str = "private, max-age=31536000, immutable";
const NO_CACHE: &str = "no-cache";
const JSON: &str = "application/json";
const OCTETS: &str = "application/octet-stream";

/// How `walcast serve` treats browsers and connections.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Origins (`https://app.example`, as [`parse_cors_origin`] normalises
    /// them) whose pages may read the dataset; empty, or containing `*`:
    /// any origin (`Access-Control-Allow-Origin: *`).
    pub cors_origins: Vec<String>,
    /// Connections served at once at most; further ones wait in the listen
    /// backlog until one ends. At least 1.
    pub max_connections: usize,
    /// A request's head (request line and headers) must arrive within this
    /// long of the server starting to wait for it, on a new connection or
    /// after the previous response on a kept-alive one; else the connection
    /// is closed. Not zero.
    pub header_timeout: Duration,
    /// A connection on which nothing has been read or written for this long
    /// is closed (an idle keep-alive connection, a download its client
    /// stopped reading). Not zero.
    pub idle_timeout: Duration,
    /// Keys whose access tokens are accepted (`--verify-key`, repeatable for
    /// a rotation); empty: no token needed.
    pub verify_keys: Vec<PublicKey>,
    /// The longest a conditional head GET with a wait hint is held (see
    /// [`crate::longpoll`]); zero: no long-poll. Whole seconds. A held
    /// request keeps its connection (and its slot of `max_connections`)
    /// but does not count as idle.
    pub max_wait: Duration,
    /// Wakes held head requests when a publisher in the same process
    /// commits (`walcast publish --serve`); the file watch works without.
    pub head_signal: Option<HeadSignal>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            cors_origins: Vec::new(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            verify_keys: Vec::new(),
            max_wait: DEFAULT_MAX_WAIT,
            head_signal: None,
        }
    }
}

/// Parses a `--cors-origin` value: `*`, or an origin `scheme://host[:port]`
/// (a trailing `/` is allowed), returned the way browsers send it in
/// `Origin` (lowercase host, no default port, no `/`).
pub fn parse_cors_origin(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s == "*" {
        return Ok(s.to_string());
    }
    let url = url::Url::parse(s)
        .map_err(|e| format!("{s:?} is not an origin like https://app.example: {e}"))?;
    if url.path() != "/"
        || url.query().is_some()
        || url.fragment().is_some()
        || !url.username().is_empty()
        || url.password().is_some()
    {
        return Err(format!(
            "{s:?} is not an origin: only scheme://host[:port], no path, query or user"
        ));
    }
    let origin = url.origin();
    if !origin.is_tuple() {
        return Err(format!(
            "{s:?} is not an origin: use an http:// or https:// scheme"
        ));
    }
    Ok(origin.ascii_serialization())
}

/// The dataset's object kinds, the only things served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Object {
    Head,
    Page,
    Segment,
    Snapshot,
    Delta,
}

impl Object {
    /// The kind of the object at `rel`: `[<prefix>/]<key>`, where `<key>` is
    /// one the publisher writes (see [`Object::key`]) and the optional
    /// prefix, for a directory holding several datasets, is made of plain
    /// names (ASCII letters, digits, `-`, `_`, `.`, not starting with `.`).
    fn of(rel: &str) -> Option<Object> {
        let parts: Vec<&str> = rel.split('/').collect();
        // Keys have two (`catalog/head.json`, `snapshots/…`) or three
        // (`catalog/pages/…`, `segments/<epoch>/…`) components.
        for n in [2, 3] {
            let Some(split) = parts.len().checked_sub(n) else {
                continue;
            };
            let (prefix, key) = parts.split_at(split);
            if let Some(kind) = Object::key(&key.join("/")) {
                return prefix.iter().all(|c| plain_name(c)).then_some(kind);
            }
        }
        None
    }

    /// The kind of the object at `key`, if it is a key the publisher writes,
    /// spelt exactly as it spells it (numbers round-trip through the
    /// catalog's key functions, so no other spelling passes).
    fn key(rel: &str) -> Option<Object> {
        /// `N` decimal numbers joined by `-`.
        fn numbers<const N: usize>(s: &str) -> Option<[u64; N]> {
            let mut out = [0u64; N];
            let mut parts = s.split('-');
            for n in &mut out {
                let p = parts.next()?;
                if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                *n = p.parse().ok()?;
            }
            parts.next().is_none().then_some(out)
        }
        if rel == HEAD_KEY {
            return Some(Object::Head);
        }
        let (kind, key) = if let Some(name) = rel
            .strip_prefix("catalog/pages/")
            .and_then(|r| r.strip_suffix(".json"))
        {
            let [level, first, last, epoch] = numbers(name)?;
            let level = u32::try_from(level).ok()?;
            (Object::Page, page_key(level, first, last, epoch))
        } else if let Some(rest) = rel
            .strip_prefix("segments/")
            .and_then(|r| r.strip_suffix(".wseg"))
        {
            let (epoch, name) = rest.split_once('/')?;
            let [epoch] = numbers(epoch)?;
            let [first, last] = numbers(name)?;
            (Object::Segment, segment_key(epoch, first, last))
        } else if let Some(name) = rel
            .strip_prefix("snapshots/")
            .and_then(|r| r.strip_suffix(".wsnap"))
        {
            let [lsn, epoch] = numbers(name)?;
            (Object::Snapshot, snapshot_key(lsn, epoch))
        } else if let Some(name) = rel
            .strip_prefix("deltas/")
            .and_then(|r| r.strip_suffix(".wdelta"))
        {
            let [base, lsn, epoch] = numbers(name)?;
            (Object::Delta, delta_key(base, lsn, epoch))
        } else {
            return None;
        };
        (key == rel).then_some(kind)
    }

    fn cache_control(self) -> &'static str {
        match self {
            Object::Head => NO_CACHE,
            Object::Page | Object::Segment | Object::Snapshot | Object::Delta => IMMUTABLE,
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Object::Head | Object::Page => JSON,
            Object::Segment | Object::Snapshot | Object::Delta => OCTETS,
        }
    }
}

/// A directory name allowed in a dataset's prefix.
fn plain_name(c: &str) -> bool {
    !c.is_empty()
        && !c.starts_with('.')
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Shared state of the router.
struct Served {
    root: PathBuf,
    verify_keys: Vec<PublicKey>,
    etags: Mutex<HashMap<PathBuf, CachedTag>>,
    /// Long-poll: the longest wait granted (zero: none), what wakes held
    /// requests, and the server stopping (held requests answer at once).
    max_wait: Duration,
    signal: HeadSignal,
    stop: watch::Sender<bool>,
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

/// The router serving the dataset at `root`, with CORS for
/// `opts.cors_origins` and tokens checked with `opts.verify_keys`.
pub fn router(root: PathBuf, opts: &ServeOptions) -> Router {
    build(root, opts).0
}

/// The router and its shared state.
fn build(root: PathBuf, opts: &ServeOptions) -> (Router, Arc<Served>) {
    let state = Arc::new(Served {
        root,
        verify_keys: opts.verify_keys.clone(),
        etags: Mutex::new(HashMap::new()),
        max_wait: opts.max_wait,
        signal: opts.head_signal.clone().unwrap_or_default(),
        stop: watch::channel(false).0,
    });
    let origins = &opts.cors_origins;
    // With tokens required, no wildcard unless asked for.
    let any_origin =
        origins.iter().any(|o| o == "*") || (origins.is_empty() && opts.verify_keys.is_empty());
    let allow_origin = if any_origin {
        AllowOrigin::from(Any)
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    // tower-http's default `Vary` (`origin` and the preflight request
    // headers) goes on every response, so caches keep one answer per origin.
    let cors = CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([Method::GET, Method::HEAD, Method::OPTIONS])
        // Any request header a page sends (`Range`, `If-None-Match`,
        // `Authorization`, `Prefer`, and whatever a replica's `headers`
        // option adds): reads are GETs of public-by-URL objects, and the
        // token check, not CORS, guards private ones.
        .allow_headers(AllowHeaders::mirror_request())
        .expose_headers([
            header::ETAG,
            header::CONTENT_RANGE,
            header::CONTENT_LENGTH,
            header::ACCEPT_RANGES,
            HeaderName::from_static(walcast_core::io::LONG_POLL_HEADER),
            HeaderName::from_static("preference-applied"),
        ])
        .max_age(Duration::from_secs(24 * 60 * 60));
    let app = Router::new()
        .fallback(handle)
        .with_state(Arc::clone(&state))
        .layer(cors);
    (app, state)
}

/// [`serve_with`] on [`ServeOptions::default`].
pub async fn serve(
    root: PathBuf,
    addr: SocketAddr,
    on_bound: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with(root, addr, ServeOptions::default(), on_bound, shutdown).await
}

/// Binds `addr` (port 0 allowed), calls `on_bound(actual_addr)`, and serves
/// the dataset at `root` until `shutdown` resolves; then stops accepting,
/// lets the requests in flight finish and returns.
pub async fn serve_with(
    root: PathBuf,
    addr: SocketAddr,
    opts: ServeOptions,
    on_bound: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=MAX_CONNECTIONS_LIMIT).contains(&opts.max_connections),
        "the connection limit must be between 1 and {MAX_CONNECTIONS_LIMIT}"
    );
    anyhow::ensure!(
        !opts.header_timeout.is_zero() && !opts.idle_timeout.is_zero(),
        "timeouts must not be zero"
    );
    for origin in &opts.cors_origins {
        let parsed = parse_cors_origin(origin).map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            &parsed == origin,
            "CORS origin {origin:?} is not in its normal form {parsed:?}"
        );
    }
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

    anyhow::ensure!(
        opts.max_wait <= MAX_WAIT_LIMIT && opts.max_wait.subsec_nanos() == 0,
        "the longest wait must be whole seconds, at most {} s",
        MAX_WAIT_LIMIT.as_secs()
    );
    let (app, served) = build(root.clone(), &opts);
    // New heads wake held requests at once; without a watch (no inotify
    // left, say) they re-read the head every FALLBACK_POLL.
    let _watch = if opts.max_wait.is_zero() {
        None
    } else {
        match HeadWatch::start(&root, served.signal.clone()) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(
                    root = %root.display(),
                    error = %e,
                    "walcast serve: no file watch on the dataset; long-polls re-read the head every {} ms",
                    longpoll::FALLBACK_POLL.as_millis()
                );
                None
            }
        }
    };
    let limits = Limits {
        header_timeout: opts.header_timeout,
        idle_timeout: opts.idle_timeout,
    };
    // One permit per connection: at the cap, the loop stops accepting until
    // a connection ends, and the kernel keeps new ones in the backlog.
    let slots = Arc::new(Semaphore::new(opts.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            p = Arc::clone(&slots).acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little
                    // rather than spin.
                    tracing::error!(error = %e, "walcast serve: accepting a connection");
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            },
        };
        tokio::spawn(connection(
            tcp,
            peer,
            app.clone(),
            limits,
            stop_rx.clone(),
            permit,
        ));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    served.stop.send_replace(true);
    // Every connection holds a permit until it ends.
    let all = u32::try_from(opts.max_connections).expect("bounded above");
    let _ = slots.acquire_many(all).await;
    Ok(())
}

/// Per-connection time limits.
#[derive(Clone, Copy)]
struct Limits {
    header_timeout: Duration,
    idle_timeout: Duration,
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Serves one connection until it ends, its head or idle timeout passes, or
/// the server stops (then it finishes the request in flight and closes).
async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
) {
    let _ = tcp.set_nodelay(true);
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Tracked {
        io: tcp,
        activity: Arc::clone(&activity),
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    // Handlers mark the connection busy while they hold a long-poll.
    let app = app.layer(axum::Extension(Arc::clone(&activity)));
    let conn = builder.serve_connection(io, TowerToHyperService::new(app));
    let mut conn = std::pin::pin!(conn);
    let mut stopping = false;
    loop {
        // A held long-poll is not idle.
        let idle_at = if activity.held() {
            Instant::now() + limits.idle_timeout
        } else {
            activity.last() + limits.idle_timeout
        };
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(%peer, error = %e, "walcast serve: connection ended");
                }
                return;
            }
            () = tokio::time::sleep_until(idle_at) => {
                if !activity.held() && activity.last() + limits.idle_timeout <= Instant::now() {
                    tracing::debug!(%peer, "walcast serve: closing an idle connection");
                    return;
                }
            }
            _ = stop.wait_for(|stop| *stop), if !stopping => {
                conn.as_mut().graceful_shutdown();
                stopping = true;
            }
        }
    }
}

/// When a connection last moved a byte.
struct Activity {
    start: Instant,
    /// Milliseconds after `start`.
    last_ms: AtomicU64,
    /// Long-polls held on the connection.
    held: AtomicUsize,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            held: AtomicUsize::new(0),
        }
    }

    fn held(&self) -> bool {
        self.held.load(Ordering::Relaxed) > 0
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A stream that notes in its [`Activity`] every read or write that moved
/// bytes.
struct Tracked {
    io: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Marks a connection busy while a long-poll is held on it.
struct Held(Arc<Activity>);

impl Held {
    fn new(activity: Arc<Activity>) -> Held {
        activity.held.fetch_add(1, Ordering::Relaxed);
        Held(activity)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.touch();
        self.0.held.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn handle(
    State(state): State<Arc<Served>>,
    activity: Option<axum::Extension<Arc<Activity>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let activity = activity.map(|a| a.0);
    let response = respond(&state, &method, &uri, &headers, activity).await;
    tracing::debug!(
        %method,
        path = uri.path(),
        range = ?headers.get(header::RANGE),
        status = response.status().as_u16(),
        "walcast serve request"
    );
    response
}

async fn respond(
    state: &Arc<Served>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    activity: Option<Arc<Activity>>,
) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return Response::builder()
            .status(StatusCode::METHOD_NOT_ALLOWED)
            .header(header::ALLOW, "GET, HEAD, OPTIONS")
            .body(Body::empty())
            .expect("static response");
    }
    // With tokens required, nothing (not even a 404) without a valid one.
    let token_in_header = match authorize(state, uri, headers) {
        Ok(in_header) => in_header,
        Err(refused) => return refused,
    };
    let Some(rel) = relative_path(uri.path()) else {
        return not_found();
    };
    // Nothing but the dataset's own objects: no filesystem access otherwise.
    let Some(object) = Object::of(&rel) else {
        return not_found();
    };
    // Long-poll: a conditional head GET with a wait hint.
    let long_poll = object == Object::Head && !state.max_wait.is_zero();
    let wait = if long_poll && method == Method::GET && longpoll::is_conditional(headers) {
        match longpoll::requested_wait(uri, headers, state.max_wait) {
            Ok(w) => w,
            Err(msg) => return bad_request(&msg),
        }
    } else {
        None
    };
    // Subscribed before the head is read, so no change is missed.
    let changes = wait.map(|_| state.signal.subscribe());
    let mut entity = match open_object(state, &rel).await {
        Ok(e) => e,
        Err(r) => return r,
    };
    if let (Some(wait), Some(changes)) = (wait, changes) {
        if if_none_match(headers, &entity.etag) {
            let _held = activity.map(Held::new);
            match hold(state, &rel, headers, wait, changes).await {
                Some(Ok(e)) => entity = e,
                Some(Err(r)) => return r,
                None => {}
            }
        }
    }

    let cache_control = match object.cache_control() {
        IMMUTABLE if token_in_header => IMMUTABLE_PRIVATE,
        c => c,
    };
    let content_type = object.content_type();
    let etag = HeaderValue::from_str(&entity.etag).expect("ETag is ASCII");
    let builder = Response::builder()
        .header(header::ETAG, etag)
        .header(header::CACHE_CONTROL, cache_control)
        .header(header::ACCEPT_RANGES, "bytes");
    let builder = if long_poll {
        builder.header(
            walcast_core::io::LONG_POLL_HEADER,
            state.max_wait.as_secs().to_string(),
        )
    } else {
        builder
    };
    let builder = match wait {
        Some(w) => builder.header("preference-applied", longpoll::preference_applied(w)),
        None => builder,
    };

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
                tracing::error!(
                    path = %state.root.join(&rel).display(),
                    error = %e,
                    "walcast serve: cannot read a dataset object"
                );
                return status_only(StatusCode::INTERNAL_SERVER_ERROR);
            }
        }
    };
    builder.body(body).expect("valid response")
}

/// Checks the request's access token when tokens are required: `Ok(true)`
/// when it came in the `Authorization` header, `Ok(false)` when in the query
/// (or none is needed), else the 401 to answer.
#[allow(clippy::result_large_err)]
fn authorize(state: &Served, uri: &Uri, headers: &HeaderMap) -> Result<bool, Response> {
    if state.verify_keys.is_empty() {
        return Ok(false);
    }
    let (found, in_header) = match bearer(headers) {
        Some(t) => (Some(t), true),
        None => (query_token(uri), false),
    };
    let Some(found) = found else {
        return Err(unauthorized("missing", "an access token is required"));
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let path = percent_decode(uri.path()).unwrap_or_else(|| uri.path().to_string());
    match token::verify_for(&found, &state.verify_keys, now, &path) {
        Ok(_) => Ok(in_header),
        Err(e) => {
            tracing::info!(
                path = uri.path(),
                reason = e.code(),
                "walcast serve: token refused"
            );
            Err(unauthorized(e.code(), &e.to_string()))
        }
    }
}

/// The token of `Authorization: Bearer <token>`, if there is one.
fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim().to_string())
}

/// The value of the query parameter `token`, percent-decoded.
fn query_token(uri: &Uri) -> Option<String> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == "token").then(|| percent_decode(v).unwrap_or_default())
    })
}

/// 401 with `WWW-Authenticate: Bearer` naming why (`reason` is a fixed code).
fn unauthorized(reason: &str, message: &str) -> Response {
    Response::builder()
        .status(StatusCode::UNAUTHORIZED)
        .header(
            header::WWW_AUTHENTICATE,
            format!(
                "Bearer realm=\"walcast\", error=\"invalid_token\", error_description=\"{reason}\""
            ),
        )
        .header(header::CACHE_CONTROL, "no-store")
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from(format!("401 Unauthorized: {message}\n")))
        .expect("valid response")
}

/// Opens the object at `rel`, or the answer for why it cannot be served.
async fn open_object(state: &Arc<Served>, rel: &str) -> Result<Entity, Response> {
    let opened = {
        let state = Arc::clone(state);
        let rel = rel.to_string();
        tokio::task::spawn_blocking(move || open_entity(&state, &rel)).await
    };
    match opened {
        Ok(Ok(entity)) => Ok(entity),
        Ok(Err(e)) if is_not_found(&e) => Err(not_found()),
        Ok(Err(e)) => {
            tracing::error!(
                path = %state.root.join(rel).display(),
                error = %e,
                "walcast serve: cannot read a dataset object"
            );
            Err(status_only(StatusCode::INTERNAL_SERVER_ERROR))
        }
        Err(e) => {
            tracing::warn!(path = rel, error = %e, "walcast serve: blocking task failed");
            Err(status_only(StatusCode::INTERNAL_SERVER_ERROR))
        }
    }
}

/// Holds a long-poll on the head at `rel` until its ETag no longer matches
/// the request's `If-None-Match` (then the new head, or why it cannot be
/// served), or `wait` runs out or the server stops (then `None`: 304).
async fn hold(
    state: &Arc<Served>,
    rel: &str,
    headers: &HeaderMap,
    wait: Duration,
    mut changes: watch::Receiver<u64>,
) -> Option<Result<Entity, Response>> {
    let deadline = Instant::now() + wait;
    let mut stop = state.stop.subscribe();
    loop {
        let now = Instant::now();
        if now >= deadline || *stop.borrow() {
            return None;
        }
        let tick = (deadline - now).min(longpoll::FALLBACK_POLL);
        tokio::select! {
            _ = changes.changed() => {}
            () = tokio::time::sleep(tick) => {}
            _ = stop.wait_for(|s| *s) => return None,
        }
        match open_object(state, rel).await {
            Ok(e) if if_none_match(headers, &e.etag) => continue,
            other => return Some(other),
        }
    }
}

fn bad_request(message: &str) -> Response {
    Response::builder()
        .status(StatusCode::BAD_REQUEST)
        .header(header::CACHE_CONTROL, NO_CACHE)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from(format!("400 Bad Request: {message}\n")))
        .expect("valid response")
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

/// Whether an error opening an object means it is not there (a missing file
/// or directory on its path, a directory in its place). Anything else,
/// permission denied included, is the server's problem.
fn is_not_found(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory | io::ErrorKind::IsADirectory
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
        tracing::warn!(
            path = %root.join(rel).display(),
            target = %path.display(),
            "walcast serve: not serving an object that leads outside the dataset directory"
        );
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
}
