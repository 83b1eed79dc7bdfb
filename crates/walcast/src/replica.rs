//! The native replica: the shared async driver ([`walcast_client::Driver`])
//! with reqwest (`http(s)://`) or object_store (`s3://`, `file://`, …) as the
//! fetch seam, and a local directory that survives `kill -9`.
//!
//! Local directory (`--local DIR`):
//! - `state.wsnap`: a checkpoint in the snapshot format (`docs/FORMAT.md`),
//!   epoch 0, at the checkpoint's LSN, replaced atomically (rename);
//! - `applied.log`: a 40-byte header (`WCRL`, version `u16`, flags `u16`,
//!   base LSN `u64`, dataset id 16 bytes, 4 reserved, `crc32` of bytes 0..36)
//!   then every record applied after the checkpoint, framed like segment
//!   records and fsynced at each applied unit. On open, the log is replayed
//!   on top of the checkpoint when its header names the same dataset and LSN;
//!   a torn tail is cut. A batch is therefore either wholly in the state or
//!   not at all, and nothing applied is fetched again.
//!
//!   Only the end of the log can be torn: a damaged record with whole
//!   records after it is an error naming `applied.log` and the offset for
//!   `get`/`scan --local`, while `replicate` warns, keeps the records before
//!   the damage and fetches the rest again. A header failing its own
//!   checksum is an error (a whole header for another checkpoint is stale,
//!   and ignored).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use walcast_client::{Fetch, Timer};
use walcast_core::batch;
use walcast_core::catalog::DatasetId;
use walcast_core::io::{
    parse_long_poll, wait_seconds, ContentRange, GetRequest, GetResponse, ResponseMeta,
    LONG_POLL_HEADER, WAIT_PARAM,
};
use walcast_core::segment::{encode_record, Records};
use walcast_core::snapshot;
use walcast_core::state::KvState;

use crate::store::{write_atomic, write_atomic_with, Store};

const LOG_MAGIC: &[u8; 4] = b"WCRL";
const LOG_HEADER: usize = 40;
/// Checkpoint once the log holds this many bytes.
const CHECKPOINT_BYTES: u64 = 64 << 20;

/// What a local replica directory holds.
#[derive(Debug, Default)]
pub struct Local {
    /// The state.
    pub state: KvState,
    /// Its applied LSN.
    pub applied: u64,
    /// Its dataset, if it ever synced.
    pub dataset: Option<DatasetId>,
}

/// A replica's local directory.
#[derive(Debug)]
pub struct LocalDir {
    dir: PathBuf,
    log: Option<File>,
    log_len: u64,
    buf: Vec<u8>,
}

fn log_header(base: u64, id: DatasetId) -> [u8; LOG_HEADER] {
    let mut h = [0u8; LOG_HEADER];
    h[..4].copy_from_slice(LOG_MAGIC);
    h[4..6].copy_from_slice(&1u16.to_le_bytes());
    h[8..16].copy_from_slice(&base.to_le_bytes());
    h[16..32].copy_from_slice(&id.0);
    let crc = crc32fast::hash(&h[..36]);
    h[36..40].copy_from_slice(&crc.to_le_bytes());
    h
}

impl LocalDir {
    /// Opens (creating) `dir` and loads what it holds.
    pub fn open(dir: &Path) -> Result<(LocalDir, Local)> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let (local, log) = read_local(dir)?;
        let mut ld = LocalDir {
            dir: dir.to_path_buf(),
            log: None,
            log_len: 0,
            buf: Vec::new(),
        };
        // Cut a torn tail off the log and append after its valid part. A
        // damaged record with whole records after it is not a torn tail:
        // the state stays at the last record before it, and what followed
        // is fetched again from the dataset (the remote is the source of
        // truth), with a warning naming the file and the offset.
        let logp = dir.join("applied.log");
        if let (Some(log), Some(id)) = (log, local.dataset) {
            if let Some(damage) = &log.damage {
                tracing::warn!(
                    "walcast replicate: {damage}; keeping the records before it (applied LSN {}) \
                     and fetching the rest again from the dataset",
                    local.applied
                );
            }
            let good = log.good;
            let f = OpenOptions::new()
                .write(true)
                .open(&logp)
                .with_context(|| format!("opening {}", logp.display()))?;
            f.set_len(good)
                .with_context(|| format!("truncating {}", logp.display()))?;
            f.sync_all()
                .with_context(|| format!("syncing {}", logp.display()))?;
            ld.log_len = good;
            let mut f = OpenOptions::new()
                .append(true)
                .open(&logp)
                .with_context(|| format!("opening {}", logp.display()))?;
            f.flush()?;
            ld.log = Some(f);
            // Keep the log tied to the checkpoint's base LSN: re-base it
            // by checkpointing when it replayed anything.
            if local.applied > 0 && good > LOG_HEADER as u64 {
                ld.checkpoint(&local.state, local.applied, id)?;
            }
        }
        Ok((ld, local))
    }

    /// Writes a checkpoint of `state` at `lsn` and starts a fresh log.
    pub fn checkpoint(&mut self, state: &KvState, lsn: u64, id: DatasetId) -> Result<()> {
        // Streamed: a checkpoint never holds a second copy of the state.
        write_atomic_with(&self.dir.join("state.wsnap"), |w| {
            let mut res = Ok(());
            snapshot::encode_to(state, lsn, 0, id, snapshot::DEFAULT_CHUNK_BYTES, &mut |b| {
                if res.is_ok() {
                    res = w.write_all(b);
                }
            });
            res
        })?;
        write_atomic(&self.dir.join("applied.log"), &log_header(lsn, id))?;
        self.log = Some(
            OpenOptions::new()
                .append(true)
                .open(self.dir.join("applied.log"))?,
        );
        self.log_len = LOG_HEADER as u64;
        Ok(())
    }

    /// Buffers an applied record for the log.
    pub fn record(&mut self, lsn: u64, payload: &[u8]) {
        encode_record(lsn, payload, &mut self.buf);
    }

    /// Makes the buffered records durable (after an applied unit); returns
    /// whether a checkpoint is due.
    pub fn flush(&mut self) -> Result<bool> {
        if self.buf.is_empty() {
            return Ok(false);
        }
        let f = self
            .log
            .as_mut()
            .ok_or_else(|| anyhow!("no log open: checkpoint first"))?;
        f.write_all(&self.buf)?;
        f.sync_data()?;
        self.log_len += self.buf.len() as u64;
        self.buf.clear();
        Ok(self.log_len > CHECKPOINT_BYTES)
    }

    /// Drops buffered records (after a reset).
    pub fn discard(&mut self) {
        self.buf.clear();
    }
}

/// The usable part of a replica directory's `applied.log`.
#[derive(Debug)]
struct LogState {
    /// Byte length of its valid part: the header and the whole records
    /// replayed.
    good: u64,
    /// Why the replay stopped before the end of the file, when it was not
    /// a torn tail: a damaged record with whole records after it (naming
    /// the file and the offset).
    damage: Option<String>,
}

/// Reads a replica directory without writing to it: the checkpoint, then
/// the log's records replayed on top when the log belongs to it. Also
/// returns the log's usable part (`None`: no log, or a stale one, left by a
/// crash between a checkpoint and its new log).
///
/// A torn tail (a record cut short by a crash mid-write, or one a running
/// `replicate` is appending to) ends the replay at the last whole record: a
/// bad record counts as torn only when nothing after it decodes as a whole
/// record. A damaged record with whole records after it is reported in
/// [`LogState::damage`]; a header failing its own checksum, or a record
/// whose checksum holds but whose batch does not decode, is an error naming
/// the file.
fn read_local(dir: &Path) -> Result<(Local, Option<LogState>)> {
    let mut local = Local::default();
    let snap = dir.join("state.wsnap");
    if snap.exists() {
        // Streamed in 1 MiB reads: loading never holds a second copy of the state.
        let mut f = File::open(&snap).with_context(|| format!("opening {}", snap.display()))?;
        let mut dec = snapshot::SnapshotDecoder::new();
        let mut chunk = vec![0u8; 1 << 20];
        loop {
            let n = f
                .read(&mut chunk)
                .with_context(|| format!("reading {}", snap.display()))?;
            if n == 0 {
                break;
            }
            dec.feed(&chunk[..n])
                .map_err(|e| anyhow!("{}: {e}", snap.display()))?;
        }
        let (h, st) = dec
            .finish(None)
            .map_err(|e| anyhow!("{}: {e}", snap.display()))?;
        local = Local {
            state: st,
            applied: h.lsn,
            dataset: Some(h.dataset_id),
        };
    }
    let logp = dir.join("applied.log");
    let Some(id) = local.dataset else {
        return Ok((local, None));
    };
    let mut f = match File::open(&logp) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((local, None)),
        Err(e) => return Err(e).with_context(|| format!("opening {}", logp.display())),
    };
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", logp.display()))?;
    let Some(header) = bytes.first_chunk::<LOG_HEADER>() else {
        anyhow::bail!(
            "{}: damaged header: {} bytes, shorter than the {LOG_HEADER}-byte header",
            logp.display(),
            bytes.len()
        );
    };
    let stored = u32::from_le_bytes(header[36..40].try_into().expect("4 bytes"));
    let computed = crc32fast::hash(&header[..36]);
    if stored != computed || &header[..4] != LOG_MAGIC {
        anyhow::bail!(
            "{}: damaged header (offset 0): crc32 {computed:08x} of bytes 0..36, stored \
             {stored:08x}, magic {:?}",
            logp.display(),
            String::from_utf8_lossy(&header[..4])
        );
    }
    // A whole header for another checkpoint: stale (a crash between
    // writing a new checkpoint and its new log), ignored.
    if *header != log_header(local.applied, id) {
        return Ok((local, None));
    }
    let mut good = LOG_HEADER;
    let mut damage = None;
    for rec in Records::new(&bytes[LOG_HEADER..], LOG_HEADER as u64, local.applied + 1) {
        let rec = match rec {
            Ok(rec) => rec,
            Err(e) => {
                if whole_record_after(&bytes, good, local.applied + 1) {
                    damage = Some(format!(
                        "{}: damaged record at offset {good} (LSN {}), with whole records \
                         after it: {e}",
                        logp.display(),
                        local.applied + 1
                    ));
                }
                break;
            }
        };
        let at = rec.payload.as_ptr() as usize - bytes.as_ptr() as usize - 16;
        let ops = batch::decode(rec.payload).map_err(|e| {
            anyhow!(
                "{}: record at offset {at} (LSN {}) does not decode: {e}",
                logp.display(),
                rec.lsn
            )
        })?;
        local.state.apply(&ops);
        local.applied = rec.lsn;
        good = at + 16 + rec.payload.len();
    }
    Ok((
        local,
        Some(LogState {
            good: good as u64,
            damage,
        }),
    ))
}

/// Whether a whole record (a plausible LSN, its checksum right) starts
/// anywhere in `bytes` after offset `bad`, where a record with LSN `lsn`
/// failed to decode: then the bad record is damage, not a torn tail (a
/// crash only tears the end of the log).
fn whole_record_after(bytes: &[u8], bad: usize, lsn: u64) -> bool {
    (bad + 1..bytes.len().saturating_sub(15)).any(|at| {
        let found = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        // Records are at least 16 bytes: the LSN of one starting `at`
        // is at most this far past the bad one's.
        let most = lsn.saturating_add(((at - bad) / 16) as u64);
        (lsn..=most).contains(&found)
            && matches!(
                Records::new(&bytes[at..], at as u64, found).next(),
                Some(Ok(_))
            )
    })
}

/// Loads a local replica directory for `get` and `scan`, read-only: it
/// creates, truncates, checkpoints and locks nothing, so it works on a
/// read-only directory and beside a running `replicate`. A damaged
/// `applied.log` (anything but a torn tail) is an error naming it and the
/// offset: `walcast replicate` on the directory keeps the records before the
/// damage and fetches the rest again.
pub fn load(dir: &Path) -> Result<Local> {
    if !dir.is_dir() {
        anyhow::bail!("{}: no such replica directory", dir.display());
    }
    let (local, log) = read_local(dir)?;
    if let Some(damage) = log.and_then(|l| l.damage) {
        anyhow::bail!("{damage}; run `walcast replicate` on the directory to fetch it again");
    }
    Ok(local)
}

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
            Err(e) => return failed(None, e.without_url().to_string()),
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
                return GetResponse::Failed {
                    status: Some(s),
                    message: format!("GET {shown}"),
                }
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
                format!("reading the body: {}", e.without_url()),
            ),
        }
    }
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
    store: Store,
    /// GETs issued.
    pub requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl StoreFetch {
    /// A fetcher over `store`.
    pub fn new(store: Store) -> Self {
        StoreFetch {
            store,
            requests: Default::default(),
        }
    }
}

impl Fetch for StoreFetch {
    async fn get(&self, req: GetRequest) -> GetResponse {
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.store.get(&req).await
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
            Ok(AnyFetch::Store(StoreFetch::new(Store::open(url)?)))
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
        }
    }
}

static LAST_REQUESTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// GETs made by the last [`replicate`] run in this process (also when it failed).
pub fn last_requests() -> u64 {
    LAST_REQUESTS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Live figures of a running replica, for progress displays.
#[derive(Debug, Default)]
pub struct Progress {
    /// Applied LSN.
    pub applied: std::sync::atomic::AtomicU64,
    /// Committed LSN of the newest head seen.
    pub committed: std::sync::atomic::AtomicU64,
    /// When each applied unit landed: (first LSN, last LSN, instant).
    pub applied_at: std::sync::Mutex<Vec<(u64, u64, std::time::Instant)>>,
}

/// Options of `walcast replicate`.
#[derive(Debug, Clone)]
pub struct ReplicateOptions {
    /// Where to publish live figures.
    pub sink: Option<std::sync::Arc<Progress>>,
    /// Head poll interval.
    pub interval: Duration,
    /// Catch up to the head as of the start, then return.
    pub once: bool,
    /// Segment GETs in flight at most.
    pub concurrency: usize,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// Pinned keys ([`walcast_core::replica::ReplicaConfig::trust`]): apply
    /// only what a trusted key signed. Empty: any dataset, signed or not.
    pub trust: Vec<walcast_core::keys::PublicKey>,
}

/// What a replicate run did.
#[derive(Debug, Clone, Default)]
pub struct ReplicateReport {
    /// Applied LSN at the end.
    pub applied_lsn: u64,
    /// GETs made.
    pub requests: u64,
}

/// Replicates the dataset at `url` into `local` until `stop` (or, with
/// `once`, until caught up). A replica error in `once` mode is returned and
/// leaves the last good state in place.
pub async fn replicate(
    url: &str,
    local: &Path,
    opts: &ReplicateOptions,
    stop: impl std::future::Future<Output = ()>,
) -> Result<ReplicateReport> {
    replicate_from(AnyFetch::for_url(url)?, local, opts, stop).await
}

/// [`replicate`] with headers (`Name: value`) sent with every GET of an
/// http(s):// dataset, e.g. `Authorization: Bearer …`.
pub async fn replicate_with_headers(
    url: &str,
    headers: &[String],
    local: &Path,
    opts: &ReplicateOptions,
    stop: impl std::future::Future<Output = ()>,
) -> Result<ReplicateReport> {
    replicate_from(
        AnyFetch::for_url_with_headers(url, headers)?,
        local,
        opts,
        stop,
    )
    .await
}

/// Runs [`replicate_from`] on a blocking thread with a current-thread
/// runtime of its own, for callers on a multi-threaded runtime: the replica
/// driver is not `Send` (it runs in wasm too).
pub fn spawn_replicate(
    fetch: AnyFetch,
    local: PathBuf,
    opts: ReplicateOptions,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<Result<ReplicateReport>> {
    tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(replicate_from(fetch, &local, &opts, stop))
    })
}

/// [`replicate_with_headers`], counting into `metrics` (`walcast replicate
/// --metrics-addr`).
pub async fn replicate_with_metrics(
    url: &str,
    headers: &[String],
    local: &Path,
    opts: &ReplicateOptions,
    stop: impl std::future::Future<Output = ()>,
    metrics: std::sync::Arc<crate::metrics::ReplicaMetrics>,
) -> Result<ReplicateReport> {
    replicate_from_metered(
        AnyFetch::for_url_with_headers(url, headers)?,
        local,
        opts,
        stop,
        Some(metrics),
    )
    .await
}

/// [`replicate`] through a fetch seam of the caller's (for example a
/// [`StoreFetch`] over a [`Store::open_counted`] store).
pub async fn replicate_from(
    fetch: AnyFetch,
    local: &Path,
    opts: &ReplicateOptions,
    stop: impl std::future::Future<Output = ()>,
) -> Result<ReplicateReport> {
    replicate_from_metered(fetch, local, opts, stop, None).await
}

async fn replicate_from_metered(
    fetch: AnyFetch,
    local: &Path,
    opts: &ReplicateOptions,
    stop: impl std::future::Future<Output = ()>,
    metrics: Option<std::sync::Arc<crate::metrics::ReplicaMetrics>>,
) -> Result<ReplicateReport> {
    use crate::handle::{Extras, ReplicaHandle, ReplicaOptions};

    // The same handle apps embed, on a local directory: one driver loop.
    let counter = fetch.clone();
    let options = ReplicaOptions {
        poll_interval: opts.interval,
        concurrency: opts.concurrency,
        trust: opts.trust.clone(),
        local: Some(local.to_path_buf()),
        follow: !opts.once,
        ..ReplicaOptions::default()
    };
    let extras = Extras {
        metrics,
        sink: opts.sink.clone(),
        progress_bar: opts.progress,
        follow_at_once: !opts.once,
    };
    let result = async {
        let mut handle = ReplicaHandle::open_with(fetch, options, extras).await?;
        if !opts.once {
            let mut stop = std::pin::pin!(stop);
            tokio::select! {
                r = handle.ended() => { r?; }
                () = &mut stop => {}
            }
        }
        handle.finish().await
    }
    .await;
    LAST_REQUESTS.store(counter.requests(), std::sync::atomic::Ordering::Relaxed);
    Ok(ReplicateReport {
        applied_lsn: result?,
        requests: counter.requests(),
    })
}

/// A replica's local directory as the driver loop keeps it: every applied
/// record logged and fsynced per applied unit, a checkpoint at a bootstrap,
/// at the first apply, and whenever the log grows past its bound.
#[derive(Debug)]
pub(crate) struct Persist {
    ld: LocalDir,
    has_log: bool,
}

impl Persist {
    /// Opens (creating) `dir`; returns what it holds to restore from.
    pub(crate) fn open(dir: &Path) -> Result<(Persist, Local)> {
        let (ld, local) = LocalDir::open(dir)?;
        let has_log = ld.log.is_some();
        Ok((Persist { ld, has_log }, local))
    }

    /// Persists what `e` says the machine `r` did.
    pub(crate) fn on_event(
        &mut self,
        r: &walcast_core::replica::Replica,
        e: &walcast_core::replica::Event,
    ) -> Result<()> {
        use walcast_core::replica::Event;
        match e {
            Event::Record { lsn, payload } => self.ld.record(*lsn, payload),
            Event::Applied { .. } => {
                let id = r
                    .dataset_id()
                    .ok_or_else(|| anyhow!("applied without a dataset"))?;
                if !self.has_log {
                    self.ld.discard();
                    self.ld.checkpoint(r.state(), r.applied_lsn(), id)?;
                    self.has_log = true;
                } else if self.ld.flush()? {
                    self.ld.checkpoint(r.state(), r.applied_lsn(), id)?;
                }
            }
            Event::Bootstrapped { lsn, dataset_id } => {
                self.ld.discard();
                self.ld.checkpoint(r.state(), *lsn, *dataset_id)?;
                self.has_log = true;
            }
            // The state starts over: the next apply checkpoints it, rather
            // than appending the new history to the old checkpoint's log.
            Event::DatasetChanged { .. } => {
                self.ld.discard();
                self.has_log = false;
            }
            _ => {}
        }
        Ok(())
    }
}
