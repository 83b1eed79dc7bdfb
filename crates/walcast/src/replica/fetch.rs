//! The fetch seams of the native replica: reqwest for `http(s)://`
//! (same-origin redirects, headers, long-poll hints) and object_store for
//! the rest; a tokio timer.

use std::time::Duration;

use anyhow::Result;
use walcast_client::{Fetch, Timer};
use walcast_core::io::{
    parse_long_poll, wait_seconds, ContentRange, GetRequest, GetResponse, ResponseMeta,
    LONG_POLL_HEADER, WAIT_PARAM,
};

use crate::store::Store;

/// GETs over HTTP(S) with reqwest, relative to a base URL.
#[derive(Clone)]
pub struct HttpFetch {
    client: reqwest::Client,
    base: String,
    /// The dataset URL's query string (e.g. `?token=…`), added to every GET
    /// and left out of every message.
    query: Option<String>,
    /// GETs issued.
    pub requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl HttpFetch {
    /// A fetcher for objects under `base` (e.g. `https://cdn.example.com/app`).
    pub fn new(base: &str) -> Result<HttpFetch> {
        Self::with_headers(base, &[])
    }

    /// Like [`new`](Self::new), sending `headers` (each `Name: value`, e.g.
    /// `Authorization: Bearer …`) with every GET. Header values are marked
    /// sensitive and never printed; a query string in `base` (a token in a
    /// URL) is sent with every GET and left out of every message.
    pub fn with_headers(base: &str, headers: &[String]) -> Result<HttpFetch> {
        let mut map = reqwest::header::HeaderMap::new();
        for h in headers {
            let (name, value) = parse_header(h)?;
            map.append(name, value);
        }
        let client = reqwest::Client::builder()
            .user_agent(concat!("walcast/", env!("CARGO_PKG_VERSION")))
            .default_headers(map)
            .redirect(same_origin_redirects())
            // The previous URL may hold the access token in its query.
            .referer(false)
            .build()?;
        let (path, query) = match base.split_once('?') {
            Some((p, q)) if !q.is_empty() => (p, Some(q.to_string())),
            Some((p, _)) => (p, None),
            None => (base, None),
        };
        Ok(HttpFetch {
            client,
            base: path.trim_end_matches('/').to_string(),
            query,
            requests: Default::default(),
        })
    }
}

impl std::fmt::Debug for HttpFetch {
    // The query and the headers may hold credentials: show neither.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpFetch")
            .field("base", &self.base)
            .field("query", &self.query.as_ref().map(|_| "…"))
            .finish_non_exhaustive()
    }
}

/// Parses `Name: value` into a header whose value is marked sensitive.
fn parse_header(h: &str) -> Result<(reqwest::header::HeaderName, reqwest::header::HeaderValue)> {
    let (name, value) = h
        .split_once(':')
        .ok_or_else(|| anyhow::anyhow!("invalid_input: a header must be 'Name: value'"))?;
    let name = reqwest::header::HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| anyhow::anyhow!("invalid_input: invalid header name {:?}", name.trim()))?;
    let mut value = reqwest::header::HeaderValue::from_str(value.trim())
        .map_err(|_| anyhow::anyhow!("invalid_input: invalid value for header {name}"))?;
    value.set_sensitive(true);
    Ok((name, value))
}

impl HttpFetch {
    /// One GET, without the outer deadline.
    async fn exchange(
        &self,
        url: &str,
        shown: &str,
        req: &GetRequest,
        meta: &mut ResponseMeta,
    ) -> GetResponse {
        let failed = |status: Option<u16>, what: String| GetResponse::Failed {
            status,
            message: format!("GET {shown}: {what}"),
        };
        // reqwest's timeout covers the whole exchange, body included.
        let mut rb = self
            .client
            .get(url)
            .timeout(Duration::from_millis(req.timeout_ms.max(1)));
        if let Some(r) = req.range {
            rb = rb.header("range", r.to_header());
        }
        if let Some(e) = &req.if_none_match {
            rb = rb.header("if-none-match", e);
        }
        if let Some(w) = req.wait_ms {
            rb = rb.header("prefer", format!("wait={}", wait_seconds(w)));
        }
        let mut resp = match rb.send().await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return failed(None, format!("timed out after {} ms", req.timeout_ms))
            }
            // reqwest's error names the URL: print it without the query.
            Err(e) => return failed(None, error_chain(e.without_url())),
        };
        meta.long_poll_max_ms = resp
            .headers()
            .get(LONG_POLL_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_long_poll);
        let status = resp.status().as_u16();
        let range = match status {
            200 => None,
            206 => {
                // Parsed, not trusted: the machine checks it against the body
                // and the request. Without one, which bytes these are is unknown.
                let cr = resp
                    .headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .and_then(ContentRange::parse);
                match cr {
                    Some(cr) => Some(cr),
                    None => return failed(Some(206), "206 without a valid Content-Range".into()),
                }
            }
            304 => return GetResponse::NotModified,
            404 | 410 => return GetResponse::NotFound,
            416 => return GetResponse::RangeNotSatisfiable,
            s => {
                // A refusal says why in `WWW-Authenticate` (walcast serve
                // and the worker: `error_description="expired"`).
                let why = resp
                    .headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok())
                    .filter(|_| s == 401 || s == 403)
                    .map(|v| {
                        let v: String = v.chars().take(200).collect();
                        format!(" (WWW-Authenticate: {v})")
                    })
                    .unwrap_or_default();
                return GetResponse::Failed {
                    status: Some(s),
                    message: format!("GET {shown}{why}"),
                };
            }
        };
        let etag = resp
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let claimed = resp.content_length();
        // A stream of chunks, read only as far as max_bytes + 1; dropping
        // `resp` then closes the connection.
        let chunks = futures::stream::unfold(Some(&mut resp), |r| async move {
            let r = r?;
            match r.chunk().await {
                Ok(Some(c)) => Some((Ok(c), Some(r))),
                Ok(None) => None,
                Err(e) => Some((Err(e), None)),
            }
        });
        match walcast_client::read_body(chunks, req.max_bytes, claimed).await {
            Ok(body) => GetResponse::Ok { body, etag, range },
            Err(e) if e.is_timeout() => failed(
                Some(status),
                format!("reading the body: timed out after {} ms", req.timeout_ms),
            ),
            Err(e) => failed(
                Some(status),
                format!("reading the body: {}", error_chain(e.without_url())),
            ),
        }
    }
}

/// `e` and its causes, outermost first: reqwest's own text says only what
/// failed ("error sending request"), its sources why (connection refused, a
/// certificate, a body shorter than its `Content-Length`).
fn error_chain(e: reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        let c_text = c.to_string();
        if !text.ends_with(&c_text) {
            text = format!("{text}: {c_text}");
        }
        cause = c.source();
    }
    text
}

impl Fetch for HttpFetch {
    async fn get(&self, req: GetRequest) -> GetResponse {
        self.get_with_meta(req).await.0
    }

    async fn get_with_meta(&self, req: GetRequest) -> (GetResponse, ResponseMeta) {
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Messages name the object's URL without the query (it may hold a
        // credential).
        let shown = format!("{}/{}", self.base, req.key);
        // A long-poll's wait hint also goes in the query, for caches to key on.
        let wait = req
            .wait_ms
            .map(|w| format!("{WAIT_PARAM}={}", wait_seconds(w)));
        let url = match (&self.query, wait) {
            (Some(q), Some(w)) => format!("{shown}?{q}&{w}"),
            (Some(q), None) => format!("{shown}?{q}"),
            (None, Some(w)) => format!("{shown}?{w}"),
            (None, None) => shown.clone(),
        };
        // Also bounded here, whatever the client does with its timeout.
        let limit = Duration::from_millis(req.timeout_ms.max(1));
        let mut meta = ResponseMeta::default();
        let resp =
            match tokio::time::timeout(limit, self.exchange(&url, &shown, &req, &mut meta)).await {
                Ok(r) => r,
                Err(_) => GetResponse::Failed {
                    status: None,
                    message: format!("GET {shown}: timed out after {} ms", req.timeout_ms),
                },
            };
        (resp, meta)
    }
}

/// GETs through a [`Store`] (s3://, gs://, az://, file://, memory://).
#[derive(Debug, Clone)]
pub struct StoreFetch {
    /// The store, once open: a `file://` directory that did not exist yet
    /// is opened at the first GET that finds it.
    store: std::sync::Arc<std::sync::OnceLock<Store>>,
    url: String,
    /// GETs issued.
    pub requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl StoreFetch {
    /// A fetcher over `store`.
    pub fn new(store: Store) -> Self {
        StoreFetch {
            url: store.url().to_string(),
            store: std::sync::Arc::new(std::sync::OnceLock::from(store)),
            requests: Default::default(),
        }
    }

    /// A fetcher of the dataset at `url`. A `file://` directory that does
    /// not exist is not created (a reader's typo would leave one behind):
    /// every GET answers 404, as for a dataset not published yet, until it
    /// exists.
    pub fn open(url: &str) -> Result<Self> {
        if Store::missing_local_dir(url).is_some() {
            return Ok(StoreFetch {
                store: Default::default(),
                url: url.to_string(),
                requests: Default::default(),
            });
        }
        Ok(StoreFetch::new(Store::open(url)?))
    }
}

impl Fetch for StoreFetch {
    async fn get(&self, req: GetRequest) -> GetResponse {
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let store = match self.store.get() {
            Some(store) => store,
            None if Store::missing_local_dir(&self.url).is_some() => return GetResponse::NotFound,
            None => match Store::open(&self.url) {
                Ok(store) => self.store.get_or_init(|| store),
                Err(e) => {
                    return GetResponse::Failed {
                        status: None,
                        message: format!("{e:#}"),
                    }
                }
            },
        };
        store.get(&req).await
    }
}

/// Either seam, chosen by the URL's scheme.
#[derive(Debug, Clone)]
pub enum AnyFetch {
    /// `http(s)://`.
    Http(HttpFetch),
    /// Everything object_store opens.
    Store(StoreFetch),
}

impl AnyFetch {
    /// The seam for `url`.
    pub fn for_url(url: &str) -> Result<AnyFetch> {
        Self::for_url_with_headers(url, &[])
    }

    /// The seam for `url`, sending `headers` (`Name: value`) with every GET
    /// of an http(s):// dataset; other schemes take their credentials from
    /// the environment and refuse headers.
    pub fn for_url_with_headers(url: &str, headers: &[String]) -> Result<AnyFetch> {
        crate::hints::check_dataset_url(url)?;
        if url.starts_with("http://") || url.starts_with("https://") {
            Ok(AnyFetch::Http(HttpFetch::with_headers(url, headers)?))
        } else if !headers.is_empty() {
            anyhow::bail!(
                "invalid_input: --header applies to http(s):// datasets; {} takes credentials from the environment",
                url.split("://").next().unwrap_or("this scheme")
            )
        } else {
            Ok(AnyFetch::Store(StoreFetch::open(url)?))
        }
    }

    /// GETs issued so far.
    pub fn requests(&self) -> u64 {
        match self {
            AnyFetch::Http(h) => h.requests.load(std::sync::atomic::Ordering::Relaxed),
            AnyFetch::Store(s) => s.requests.load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

impl Fetch for AnyFetch {
    async fn get(&self, req: GetRequest) -> GetResponse {
        match self {
            AnyFetch::Http(h) => h.get(req).await,
            AnyFetch::Store(s) => s.get(req).await,
        }
    }

    async fn get_with_meta(&self, req: GetRequest) -> (GetResponse, ResponseMeta) {
        match self {
            AnyFetch::Http(h) => h.get_with_meta(req).await,
            AnyFetch::Store(s) => (s.get(req).await, ResponseMeta::default()),
        }
    }
}

/// Redirects followed: at most 5, and only to the same scheme, host and
/// port. The `--header` values (an API key, a CDN's access secret) and the
/// token in the dataset URL's query go with every GET, so a redirect to
/// another origin (a hostile or misconfigured server's `Location`) is not
/// followed: the 3xx is the answer, and the GET fails naming its status.
fn same_origin_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let Some(first) = attempt.previous().first() else {
            return attempt.stop();
        };
        let url = attempt.url();
        let same = url.scheme() == first.scheme()
            && url.host_str() == first.host_str()
            && url.port_or_known_default() == first.port_or_known_default();
        if !same || attempt.previous().len() > 5 {
            attempt.stop()
        } else {
            attempt.follow()
        }
    })
}

/// A clock that never goes back, and tokio timers: the wall clock's
/// milliseconds when first read, plus the monotonic time since. A step of
/// the wall clock (an NTP correction, a resumed VM) then moves no deadline
/// the replica machine set: were it read anew, a step back would hold every
/// sync until the wall clock caught up.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioTimer;

impl Timer for TokioTimer {
    fn now_ms(&self) -> u64 {
        static START: std::sync::OnceLock<(std::time::Instant, u64)> = std::sync::OnceLock::new();
        let (at, wall) =
            START.get_or_init(|| (std::time::Instant::now(), crate::publish::now_ms()));
        wall + u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX / 2)
    }

    async fn sleep_until(&self, at_ms: u64) {
        let now = self.now_ms();
        if at_ms > now {
            tokio::time::sleep(Duration::from_millis(at_ms - now)).await;
        } else {
            // Due already: still a turn for the runtime's I/O, so a driver
            // woken at once again and again never starves the GETs it waits on.
            tokio::task::yield_now().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sleep until a time already past still gives the runtime a turn: a
    /// driver woken at once again and again on a current-thread runtime
    /// (every native replica's) lets the tasks it waits on run.
    #[tokio::test(flavor = "current_thread")]
    async fn a_sleep_already_due_yields_to_other_tasks() {
        let ran = std::rc::Rc::new(std::cell::Cell::new(false));
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let other = ran.clone();
                tokio::task::spawn_local(async move { other.set(true) });
                for _ in 0..100 {
                    TokioTimer.sleep_until(0).await;
                    if ran.get() {
                        return;
                    }
                }
                panic!("100 due sleeps in a row never let another task run");
            })
            .await;
    }

    /// A reader of a `file://` directory that does not exist creates
    /// nothing (a typo in `get --from` left one behind): its GETs answer
    /// 404, as for a dataset not published yet, and find the dataset once
    /// its publisher made the directory.
    #[tokio::test]
    async fn readers_of_a_missing_directory_create_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("typo").join("app");
        let url = url::Url::from_directory_path(&dir).unwrap().to_string();
        let AnyFetch::Store(f) = AnyFetch::for_url(&url).unwrap() else {
            panic!("not a store");
        };
        let head = |id| GetRequest {
            id: walcast_core::io::RequestId(id),
            key: walcast_core::catalog::HEAD_KEY.to_string(),
            range: None,
            if_none_match: None,
            wait_ms: None,
            timeout_ms: 10_000,
            max_bytes: 1 << 20,
        };
        assert!(matches!(f.get(head(1)).await, GetResponse::NotFound));
        assert!(!tmp.path().join("typo").exists());
        std::fs::create_dir_all(dir.join("catalog")).unwrap();
        std::fs::write(dir.join(walcast_core::catalog::HEAD_KEY), b"{}").unwrap();
        match f.clone().get(head(2)).await {
            GetResponse::Ok { body, .. } => assert_eq!(body, b"{}"),
            other => panic!("{other:?}"),
        }
    }
}
