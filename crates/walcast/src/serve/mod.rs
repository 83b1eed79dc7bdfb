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
//! - strong ETags `"<crc32 hex>-<len hex>"`, `If-None-Match` → 304 and a
//!   failing `If-Match` → 412;
//! - `Cache-Control: public, max-age=31536000, immutable` for the immutable
//!   objects (segments, snapshots, pages; with access tokens, a max-age no
//!   longer than the token has left, and `private` for a token in the
//!   header) and `no-cache` for the head;
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
//!   `bad_signature`, `expired`, `not_yet_valid`, `wrong_prefix`). Range and conditional
//!   requests work as without. An immutable object fetched with the token
//!   in the header is `private` to caches (a shared cache keyed by URL would
//!   hand it to anyone); with the token in the query the URL carries the
//!   token, and the answer stays `public` for caching proxies.
//!
//! Connections are bounded ([`ServeOptions`]): at most `max_connections` are
//! served at once (further ones wait, unaccepted, in the listen backlog); a
//! request's head may take at most 64 KiB (431 beyond) and must arrive
//! within `header_timeout` of the server starting to wait for it (which
//! also bounds a kept-alive connection waiting for its next request); a
//! connection on which no byte moves either way for `idle_timeout` (a
//! silent client, a download the client stopped reading) is closed, unless
//! the server itself is at work on its request (a held long-poll, or an
//! ETag being hashed or waiting for its turn to be).
//!
//! Small files are read whole on every request (so the head, replaced by an
//! atomic rename, is always fresh); large ones are streamed from a seek to the
//! requested slice, their ETag computed once and cached by (path, length,
//! modification time and, on Unix, inode and status-change time, so that a
//! file replaced by one of the same length and modification time is hashed
//! again): requests for a version being hashed await that one
//! hash, which completes into the cache even if they all leave once it has
//! begun (a hash still waiting for its turn when they have all left is
//! given up).
//!
//! File descriptors: on Unix the soft `RLIMIT_NOFILE` is raised to the hard
//! limit at start, and `max_connections` is clamped to leave a descriptor
//! for a file beside every connection's socket, after a reserve of 64 (at
//! most half the limit), with a warning. A held
//! long-poll keeps no file open, and running out of descriptors anyway
//! answers 503 with `Retry-After` rather than 500.
//!
//! Memory: small files are read whole for each answer, and the bytes held
//! for answers not yet sent are bounded (256 MiB): past it a
//! request answers 503 with `Retry-After`, so clients that read slowly
//! cannot make the server hold a megabyte per connection.

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

mod conn;
mod files;
mod respond;
#[cfg(test)]
mod tests;

use conn::*;
use files::*;
use respond::*;

/// Files up to this size are read whole on every request.
const SMALL_FILE: u64 = 1 << 20;
/// Read size when hashing or streaming large files.
const CHUNK: usize = 256 * 1024;
/// Bound on cached ETags: past it, each new one takes the place of another.
const ETAG_CACHE_MAX: usize = 16 * 1024;
/// Large files hashed for their ETags at once. A request for one waits its
/// turn; the blocking threads that open and read objects stay free
/// however many large files are asked for at once (a HEAD costs a client
/// a hundred bytes and the server a read of the whole file).
const MAX_HASHING: usize = 2;

/// Bytes of small files held in memory at once, read for answers not yet
/// sent, counted in KiB (a semaphore's permits): past it a request answers
/// 503 with `Retry-After`. Clients that read slowly (or not at all) would
/// otherwise hold up to a megabyte each, a gigabyte at 1,024 connections.
const SMALL_BYTES_KIB: usize = 256 * 1024;

/// The same for heads (`catalog/head.json`), apart: clients reading other
/// small files slowly cannot take the room every replica's head read needs
/// (a head of tens of KiB takes more connections than the server accepts
/// to fill it).
const HEAD_BYTES_KIB: usize = 64 * 1024;

/// Default of [`ServeOptions::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default of [`ServeOptions::header_timeout`].
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`ServeOptions::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of [`ServeOptions::drain_timeout`].
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request head (request line and headers) read, in bytes: a
/// larger one is refused with 431 and its connection closed. walcast's own
/// requests take a few hundred bytes (a token at most 2 KiB); this leaves
/// room for a browser's cookies while bounding what a connection still
/// sending its head holds (hyper's default, about 400 KiB, let a thousand
/// such connections hold 400 MB).
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest accepted [`ServeOptions::max_connections`].
const MAX_CONNECTIONS_LIMIT: usize = 1 << 20;

const IMMUTABLE: &str = "public, max-age=31536000, immutable";
/// [`IMMUTABLE`]'s max-age (a year, in seconds): an object read with a
/// token is cached for at most what is left of the token's life.
const IMMUTABLE_MAX_AGE: u64 = 31_536_000;
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
    /// backlog until one ends. At least 1. On Unix, clamped below the limit
    /// on open files (see the module's documentation).
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
    /// but does not count as idle; at most three quarters of
    /// `max_connections` are held at once, and a long-poll past that is
    /// answered at once (without `Preference-Applied`).
    pub max_wait: Duration,
    /// Wakes held head requests when a publisher in the same process
    /// commits (`walcast publish --serve`); the file watch works without.
    pub head_signal: Option<HeadSignal>,
    /// On shutdown, how long responses in progress may take to finish;
    /// connections still open then are dropped (a download its client
    /// reads a byte at a time never counts as idle, and would otherwise hold
    /// the shutdown for as long as the client likes).
    pub drain_timeout: Duration,
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
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
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

/// Shared state of the router.
struct Served {
    root: PathBuf,
    verify_keys: Vec<PublicKey>,
    etags: Mutex<HashMap<PathBuf, CachedTag>>,
    /// Large files being hashed for their ETag, one hash per version,
    /// awaited by every request for it.
    hashing: Mutex<HashMap<TagKey, Hashing>>,
    /// Turns to hash a large file: [`MAX_HASHING`].
    hash_turns: Arc<tokio::sync::Semaphore>,
    /// KiB of small files held for answers: [`SMALL_BYTES_KIB`], and of
    /// heads: [`HEAD_BYTES_KIB`].
    small_bytes: Arc<tokio::sync::Semaphore>,
    head_bytes: Arc<tokio::sync::Semaphore>,
    /// Long-poll: the longest wait granted (zero: none), what wakes held
    /// requests, and the server stopping (held requests answer at once).
    max_wait: Duration,
    signal: HeadSignal,
    stop: watch::Sender<bool>,
    /// Long-polls held now, and the most held at once: three quarters of
    /// `max_connections`, rounded down (a held request keeps its
    /// connection's slot), so that long-polling clients never take every
    /// slot from other GETs (with a single connection, none is held).
    holding: AtomicUsize,
    max_holding: usize,
    /// Whether held requests are woken on every new head (a file watch
    /// runs, or the publisher is in this process): then they re-read the
    /// head only every `WATCHED_POLL`, else every `FALLBACK_POLL`.
    watched: std::sync::atomic::AtomicBool,
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
        hashing: Mutex::new(HashMap::new()),
        hash_turns: Arc::new(tokio::sync::Semaphore::new(MAX_HASHING)),
        small_bytes: Arc::new(tokio::sync::Semaphore::new(SMALL_BYTES_KIB)),
        head_bytes: Arc::new(tokio::sync::Semaphore::new(HEAD_BYTES_KIB)),
        max_wait: opts.max_wait,
        signal: opts.head_signal.clone().unwrap_or_default(),
        stop: watch::channel(false).0,
        holding: AtomicUsize::new(0),
        max_holding: opts.max_connections * 3 / 4,
        watched: std::sync::atomic::AtomicBool::new(opts.head_signal.is_some()),
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

/// `opts` with `max_connections` clamped to what the limit on open files
/// allows once raised (see [`raise_fd_limit`] and [`connection_cap`]),
/// with a warning when it is lowered.
fn clamp_connections(mut opts: ServeOptions) -> ServeOptions {
    let limit = raise_fd_limit();
    let cap = connection_cap(opts.max_connections, limit);
    if cap < opts.max_connections {
        tracing::warn!(
            asked = opts.max_connections,
            max_connections = cap,
            open_files_limit = limit,
            "walcast serve: fewer connections than asked, to leave file descriptors for the \
             files requests open (raise `ulimit -n` for more)"
        );
        opts.max_connections = cap;
    }
    opts
}

/// Raises the process's soft limit on open files (`RLIMIT_NOFILE`) to its
/// hard limit, and returns the soft limit then in force; `None` when there
/// is none to respect (unlimited, unknown, or not Unix).
#[cfg(unix)]
fn raise_fd_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
    let (mut soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    // Where the hard limit is above what the system allows (macOS: an
    // unlimited hard limit, `OPEN_MAX` soft), the soft one stays.
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        soft = hard;
    }
    (soft != RLIM_INFINITY).then_some(soft)
}

#[cfg(not(unix))]
fn raise_fd_limit() -> Option<u64> {
    None
}

/// The connections served at once for `asked` under a limit of `fd_limit`
/// open files: every connection may hold a file open besides its socket (a
/// body being streamed, a request waiting for its ETag), so half of what
/// is left after a reserve of 64 (at most half the limit) for the rest of
/// the process (its listener, a publisher beside it), at least 1.
fn connection_cap(asked: usize, fd_limit: Option<u64>) -> usize {
    let Some(limit) = fd_limit else {
        return asked;
    };
    let reserve = 64.min(limit / 2);
    let cap = usize::try_from((limit - reserve) / 2)
        .unwrap_or(usize::MAX)
        .max(1);
    asked.min(cap)
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
    let opts = clamp_connections(opts);
    let (app, served) = build(root.clone(), &opts);
    // New heads wake held requests at once; without a watch (no inotify
    // left, say) they re-read the head every FALLBACK_POLL (with one, every
    // WATCHED_POLL, against a missed event).
    let _watch = if opts.max_wait.is_zero() {
        None
    } else {
        match HeadWatch::start(&root, served.signal.clone()) {
            Ok(w) => {
                served.watched.store(true, Ordering::Relaxed);
                Some(w)
            }
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
    // The connections' tasks: those still running after the drain timeout
    // are aborted.
    let mut conns = tokio::task::JoinSet::new();
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
        conns.spawn(connection(
            tcp,
            peer,
            app.clone(),
            limits,
            stop_rx.clone(),
            permit,
        ));
        while conns.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = stop_tx.send(true);
    served.stop.send_replace(true);
    // Every connection holds a permit until it ends; those still open
    // after the drain timeout are aborted.
    let all = u32::try_from(opts.max_connections).expect("bounded above");
    if tokio::time::timeout(opts.drain_timeout, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            open = all as usize - slots.available_permits(),
            "walcast serve: connections still open after the drain timeout are dropped"
        );
        conns.abort_all();
    }
    Ok(())
}
