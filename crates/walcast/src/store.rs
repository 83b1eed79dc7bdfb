//! Object storage for a dataset, through the `object_store` crate:
//! `file://`, `s3://` (any S3-compatible endpoint), `gs://`, `az://`,
//! `memory://`. Maps the core's requests (GET with range and
//! `If-None-Match`, conditional PUT, DELETE) onto it.
//!
//! On `gs://`, a conditional replace names the object's generation
//! (`x-goog-if-generation-match`), not its ETag: the token handed to the core
//! for the head carries both (`g<generation>:<ETag>`).
//!
//! On `file://`, object_store cannot replace an object conditionally, so the
//! head's compare-and-swap is done here: under an exclusive lock on
//! `catalog/.head.lock`, compare the current head's ETag, write a temporary
//! file, fsync, rename over the head, fsync the directory.
//!
//! Every file of a `file://` dataset — the head, pages, segments, snapshots —
//! gets the one mode [`DATASET_FILE_MODE`] (0644) narrowed by the process
//! umask, whichever path wrote it, so that a server running as another user
//! (`walcast serve`, nginx) can read all of them or none.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use futures::FutureExt as _;
use object_store::path::Path as ObjPath;
use object_store::{
    Attribute, AttributeValue, GetOptions, GetRange, GetResult, GetResultPayload, ObjectStore,
    ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion,
};
use walcast_core::catalog::{GZIP_MAGIC, HEAD_KEY};
use walcast_core::io::{ByteRange, ContentRange, GetRequest, GetResponse};
use walcast_core::publisher::{ObjectKind, PutCondition, PutRequest, PutResponse};

use crate::counting::{Counting, RequestStats};

/// Mode of every file of a `file://` dataset (head, pages, segments,
/// snapshots): owner read-write, everyone else read-only, narrowed by the
/// process umask as any file creation is (umask 022 keeps 0644, 077 makes it
/// 0600). Directories are created 0777 less the umask.
pub const DATASET_FILE_MODE: u32 = 0o644;

/// `Cache-Control` stored with the head in object stores: caches revalidate
/// it on every read (an `ETag` match costs a `304`).
pub const HEAD_CACHE_CONTROL: &str = "no-cache";

/// `Cache-Control` stored with a head stored gzip-compressed: as
/// [`HEAD_CACHE_CONTROL`], and served as stored (no store or cache decodes
/// it on the way).
pub const HEAD_GZIP_CACHE_CONTROL: &str = "no-cache, no-transform";

/// `Cache-Control` stored with segments, pages, snapshots and deltas, which
/// never change.
pub const IMMUTABLE_CACHE_CONTROL: &str = "public, max-age=31536000, immutable";

/// A dataset's objects under a prefix of some object store.
#[derive(Clone)]
pub struct Store {
    os: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    /// For `file://`: the dataset directory (the head's CAS is done here).
    local: Option<PathBuf>,
    url: String,
    /// Counters of the requests made (see [`Store::open_counted`]).
    stats: Option<Arc<RequestStats>>,
    /// `gs://`: versions are generations (see [`gcs_token`]).
    gcs: bool,
    /// The bound on a DELETE, and on a PUT besides its body's time.
    write_timeout: std::time::Duration,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.url)
    }
}

/// object_store's client options walcast sets unless the environment does.
/// Its default bound of 30 s on a whole request would fail every PUT or GET
/// of a large snapshot on a slow link, again and again: walcast bounds each
/// request itself, by the bytes it moves (GETs by the machines' limits, PUTs
/// and DELETEs in [`Store::put`] and [`Store::delete`]), so the client's
/// total bound is a backstop. (No `read_timeout`: reqwest runs it from the
/// request's start until the answer's headers, so a PUT that uploads for
/// longer would fail as surely as under the 30 s bound.)
const CLIENT_DEFAULTS: [(&str, &str); 1] = [("timeout", "24h")];

fn env_options(scheme: &str) -> Vec<(String, String)> {
    let pfx = match scheme {
        "s3" | "s3a" => "AWS_",
        "gs" => "GOOGLE_",
        "az" | "abfs" | "abfss" | "azure" => "AZURE_",
        _ => return Vec::new(),
    };
    // First, so that the environment's own (AWS_TIMEOUT, say) win.
    let mut out: Vec<(String, String)> = CLIENT_DEFAULTS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (k, v) in std::env::vars() {
        if let Some(rest) = k.strip_prefix(pfx) {
            let key = match (pfx, rest) {
                // The standard AWS_ENDPOINT_URL and AWS_ALLOW_HTTP.
                ("AWS_", "ENDPOINT_URL") => "aws_endpoint".to_string(),
                ("AWS_", "ALLOW_HTTP") => "allow_http".to_string(),
                _ => k.to_ascii_lowercase(),
            };
            out.push((key, v));
        }
    }
    out
}

impl Store {
    /// Opens the dataset at `url`.
    pub fn open(url: &str) -> Result<Store> {
        Store::open_inner(url, None)
    }

    /// The directory of a `file://` URL when it does not exist (a reader
    /// does not create it, as [`open`](Self::open) does for a publisher).
    pub fn missing_local_dir(url: &str) -> Option<PathBuf> {
        url::Url::parse(url)
            .ok()
            .filter(|u| u.scheme() == "file")
            .and_then(|u| u.to_file_path().ok())
            .filter(|dir| !dir.is_dir())
    }

    /// Opens the dataset at `url` and counts every request made through it
    /// into `stats`: those through `object_store` (see [`Counting`]) and, on
    /// `file://`, the head's GETs and compare-and-swap PUTs done here.
    pub fn open_counted(url: &str, stats: Arc<RequestStats>) -> Result<Store> {
        Store::open_inner(url, Some(stats))
    }

    fn open_inner(url: &str, stats: Option<Arc<RequestStats>>) -> Result<Store> {
        crate::hints::check_dataset_url(url)?;
        let parsed =
            url::Url::parse(url).with_context(|| format!("invalid dataset URL {url:?}"))?;
        let scheme = parsed.scheme().to_string();
        let (os, prefix, local): (Arc<dyn ObjectStore>, ObjPath, Option<PathBuf>) = match scheme.as_str() {
            "file" => {
                let dir = parsed
                    .to_file_path()
                    .map_err(|()| anyhow!("{url}: not an absolute file path"))?;
                std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
                (Arc::new(local_store(&dir)?), ObjPath::default(), Some(dir))
            }
            "memory" => (Arc::new(object_store::memory::InMemory::new()), ObjPath::default(), None),
            "s3" | "s3a" | "gs" | "az" | "abfs" | "abfss" | "azure" => {
                let (os, path) = object_store::parse_url_opts(&parsed, env_options(&scheme))
                    .with_context(|| format!("opening {url}"))?;
                (Arc::from(os), path, None)
            }
            other => bail!("unsupported dataset URL scheme {other:?} in {url} (use file://, s3://, gs://, az:// or memory://)"),
        };
        let os: Arc<dyn ObjectStore> = match &stats {
            Some(st) => Arc::new(Counting::new(os, st.clone())),
            None => os,
        };
        Ok(Store {
            os,
            prefix,
            local,
            url: url.to_string(),
            stats,
            gcs: scheme == "gs",
            write_timeout: LOCAL_WRITE_TIMEOUT,
        })
    }

    /// Sets how long a DELETE may take, and a PUT besides its body's time
    /// ([`LOCAL_WRITE_TIMEOUT`] unless set).
    pub fn with_write_timeout(mut self, d: std::time::Duration) -> Self {
        self.write_timeout = d;
        self
    }

    /// The URL it was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, key: &str) -> ObjPath {
        let mut p = self.prefix.clone();
        for part in key.split('/') {
            p = p.clone().join(part);
        }
        p
    }

    /// Performs a GET, reading at most `req.max_bytes + 1` bytes of the body
    /// (never reserving memory from a length the server claims), all within
    /// `req.timeout_ms`.
    pub async fn get(&self, req: &GetRequest) -> GetResponse {
        if req.key == HEAD_KEY {
            if let Some(dir) = &self.local {
                // Off the replica's thread and within the GET's time limit:
                // a head on a hung mount fails this GET, as a hung server's.
                let (dir, inm, max_bytes) = (dir.clone(), req.if_none_match.clone(), req.max_bytes);
                let r = match blocking_within(req, move || {
                    local_head_get(&dir, inm.as_deref(), max_bytes)
                })
                .await
                {
                    Ok(r) => r,
                    Err(failed) => failed,
                };
                if let Some(st) = &self.stats {
                    st.record_local_get(&r);
                }
                return r;
            }
        }
        if let Some(dir) = &self.local {
            // A FIFO or device at an object's path would block the open in
            // object_store's worker thread for good: refused first.
            let path = req.key.split('/').fold(dir.clone(), |p, part| p.join(part));
            match blocking_within(req, move || std::fs::metadata(path).map(|m| m.is_file())).await {
                Ok(Ok(false)) => {
                    return GetResponse::Failed {
                        status: None,
                        message: format!("GET {}: not a regular file", req.key),
                    }
                }
                Err(failed) => return failed,
                Ok(_) => {}
            }
        }
        let gcs = self.gcs;
        let opts = GetOptions {
            if_none_match: req
                .if_none_match
                .as_deref()
                .map(|t| if gcs { gcs_token_parts(t).1 } else { t }.to_string()),
            range: req.range.map(|r| match r {
                ByteRange::Bounded { start, end } => GetRange::Bounded(start..end),
                ByteRange::Suffix(n) => GetRange::Suffix(n),
            }),
            ..Default::default()
        };
        let max_bytes = req.max_bytes;
        let fut = async {
            let res = self.os.get_opts(&self.path(&req.key), opts).await?;
            let range = res.range.clone();
            let total = res.meta.size;
            let etag = if gcs {
                gcs_token(res.meta.version.as_deref(), res.meta.e_tag.as_deref())
            } else {
                res.meta.e_tag.clone()
            };
            let body = read_payload(res, max_bytes).await?;
            Ok::<_, object_store::Error>((body, range, total, etag))
        };
        // object_store parses a server's headers with plain arithmetic, which
        // overflow-checked builds turn into a panic on hostile values: such an
        // answer fails this GET, not the process.
        let fut = std::panic::AssertUnwindSafe(fut).catch_unwind();
        let timeout = std::time::Duration::from_millis(req.timeout_ms.max(1));
        match tokio::time::timeout(timeout, fut).await {
            Err(_) => GetResponse::Failed {
                status: None,
                message: format!("GET {} timed out after {} ms", req.key, req.timeout_ms),
            },
            Ok(Err(_)) => GetResponse::Failed {
                status: None,
                message: format!("GET {}: the store client failed on the answer", req.key),
            },
            Ok(Ok(Ok((body, range, total, etag)))) => GetResponse::Ok {
                body,
                etag,
                range: req.range.map(|_| ContentRange {
                    start: range.start,
                    end: range.end,
                    total: Some(total),
                }),
            },
            Ok(Ok(Err(object_store::Error::NotFound { .. }))) => GetResponse::NotFound,
            Ok(Ok(Err(object_store::Error::NotModified { .. }))) => GetResponse::NotModified,
            Ok(Ok(Err(e))) if range_not_satisfiable(&e) => GetResponse::RangeNotSatisfiable,
            Ok(Ok(Err(e))) => GetResponse::Failed {
                status: http_status(&e),
                message: e.to_string(),
            },
        }
    }

    /// Performs a conditional PUT. It fails after [`LOCAL_WRITE_TIMEOUT`]
    /// (see [`Store::with_write_timeout`]) and the time its body takes at
    /// 128 KiB a second (a mount that hangs, the head's lock held by a
    /// stopped process, a store that stops reading) instead of holding the
    /// publisher; the write may still land, as with any answer lost.
    pub async fn put(&self, req: &PutRequest) -> PutResponse {
        // Plus the body at 128 KiB a second: a large snapshot on a slow
        // disk or link is not given up (and written again) while it is
        // written.
        // And a second: the head's write gives up waiting for its lock at
        // `write_timeout` itself, answering before this bound.
        let limit = self
            .write_timeout
            .saturating_add(std::time::Duration::from_secs(1))
            .saturating_add(std::time::Duration::from_millis(
                (req.body.len() as u64).saturating_mul(1000)
                    / walcast_core::replica::MIN_TRANSFER_BYTES_PER_SEC,
            ));
        match tokio::time::timeout(limit, self.put_now(req)).await {
            Ok(r) => r,
            Err(_) => PutResponse::Failed {
                message: format!(
                    "PUT {}{} took over {} ms",
                    req.key,
                    if self.local.is_some() {
                        " into the local directory"
                    } else {
                        ""
                    },
                    limit.as_millis()
                ),
            },
        }
    }

    async fn put_now(&self, req: &PutRequest) -> PutResponse {
        if req.key == HEAD_KEY {
            if let Some(dir) = &self.local {
                if let Some(st) = &self.stats {
                    st.record_put(req.body.len() as u64);
                }
                let dir = dir.clone();
                let body = req.body.clone();
                let cond = req.condition.clone();
                // The lock is waited for until the write's own timeout,
                // so a lock held for good leaves no thread behind.
                let until = std::time::Instant::now().checked_add(self.write_timeout);
                return tokio::task::spawn_blocking(move || {
                    local_head_put(&dir, &body, &cond, until)
                })
                .await
                .unwrap_or_else(|e| PutResponse::Failed {
                    message: e.to_string(),
                });
            }
        }
        let mode = match &req.condition {
            PutCondition::CreateOnly => PutMode::Create,
            PutCondition::IfMatch(e) if self.gcs => {
                let (generation, e_tag) = gcs_token_parts(e);
                PutMode::Update(UpdateVersion {
                    e_tag: Some(e_tag.to_string()),
                    version: generation.map(str::to_string),
                })
            }
            PutCondition::IfMatch(e) => PutMode::Update(UpdateVersion {
                e_tag: Some(e.clone()),
                version: None,
            }),
        };
        let mut opts = PutOptions {
            mode,
            ..Default::default()
        };
        // The store serves what a CDN in front of it caches by: the head
        // briefly, never stale (a CDN's default lifetime would hold an old
        // head for hours), immutable objects for good. A local directory
        // keeps no such attributes (`walcast serve` sets the headers).
        if self.local.is_none() {
            let cache = match req.kind {
                ObjectKind::Head => HEAD_CACHE_CONTROL,
                ObjectKind::Segment | ObjectKind::Page | ObjectKind::Snapshot => {
                    IMMUTABLE_CACHE_CONTROL
                }
            };
            // A head stored gzip-compressed says so: HTTP clients in front
            // of the store (browsers, workers, CDNs) then decode it as they
            // read it; walcast's own readers decode it either way. With
            // `no-transform`, a store that would decode it for clients not
            // asking for gzip (GCS's decompressive transcoding, which
            // answers without ETag or Content-Length) serves it as stored.
            let cache = if req.kind == ObjectKind::Head && req.body.starts_with(&GZIP_MAGIC) {
                opts.attributes
                    .insert(Attribute::ContentEncoding, AttributeValue::from("gzip"));
                HEAD_GZIP_CACHE_CONTROL
            } else {
                cache
            };
            opts.attributes
                .insert(Attribute::CacheControl, AttributeValue::from(cache));
        }
        match self
            .os
            .put_opts(
                &self.path(&req.key),
                PutPayload::from(req.body.clone()),
                opts,
            )
            .await
        {
            Ok(r) => {
                self.local_mode(&req.key);
                let etag = if self.gcs {
                    gcs_token(r.version.as_deref(), r.e_tag.as_deref())
                } else {
                    r.e_tag
                };
                PutResponse::Ok { etag }
            }
            Err(object_store::Error::AlreadyExists { .. }) => PutResponse::AlreadyExists,
            Err(object_store::Error::Precondition { .. }) => PutResponse::PreconditionFailed,
            Err(e) => PutResponse::Failed {
                message: e.to_string(),
            },
        }
    }

    /// Deletes an object; a missing object counts as deleted. It fails
    /// after [`LOCAL_WRITE_TIMEOUT`], as a PUT does.
    pub async fn delete(&self, key: &str) -> Result<(), String> {
        let delete = async {
            match self.os.delete(&self.path(key)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(e.to_string()),
            }
        };
        tokio::time::timeout(self.write_timeout, delete)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "DELETE {key} took over {} ms",
                    self.write_timeout.as_millis()
                ))
            })
    }

    /// Writes an object unconditionally (tests and tools only).
    pub async fn put_raw(&self, key: &str, body: Vec<u8>) -> Result<()> {
        if key == HEAD_KEY {
            if let Some(dir) = &self.local {
                return write_dataset_file(&dir.join(HEAD_KEY), &body);
            }
        }
        self.os.put(&self.path(key), PutPayload::from(body)).await?;
        self.local_mode(key);
        Ok(())
    }

    /// On `file://`, brings the file object_store just wrote for `key`
    /// (created 0666 less the umask) to [`DATASET_FILE_MODE`] less the umask.
    fn local_mode(&self, key: &str) {
        #[cfg(unix)]
        if let Some(dir) = &self.local {
            use std::os::unix::fs::PermissionsExt as _;
            let path = dir.join(key);
            let narrowed = std::fs::metadata(&path).and_then(|m| {
                let mode = m.permissions().mode() & 0o7777;
                let wanted = mode & DATASET_FILE_MODE;
                if mode == wanted {
                    return Ok(());
                }
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(wanted))
            });
            if let Err(e) = narrowed {
                tracing::warn!(path = %path.display(), error = %e, "setting a dataset file's mode");
            }
        }
        #[cfg(not(unix))]
        let _ = key;
    }
}

/// The token a `gs://` store hands the core for an object's version:
/// `g<generation>:<ETag>`. GCS replaces an object conditionally only on its
/// generation (object_store sends `x-goog-if-generation-match` and needs the
/// generation for [`PutMode::Update`]), while a conditional GET compares the
/// ETag: the token carries both, and [`gcs_token_parts`] splits it again.
/// Without a generation it is the ETag alone.
pub(crate) fn gcs_token(generation: Option<&str>, e_tag: Option<&str>) -> Option<String> {
    match (generation, e_tag) {
        (Some(g), e) => Some(format!("g{g}:{}", e.unwrap_or(""))),
        (None, e) => e.map(str::to_string),
    }
}

/// Splits a token of [`gcs_token`] into the generation (if it has one) and
/// the ETag.
pub(crate) fn gcs_token_parts(token: &str) -> (Option<&str>, &str) {
    token
        .strip_prefix('g')
        .and_then(|rest| rest.split_once(':'))
        .filter(|(g, _)| !g.is_empty() && g.bytes().all(|b| b.is_ascii_digit()))
        .map_or((None, token), |(g, e)| (Some(g), e))
}

fn local_etag(bytes: &[u8]) -> String {
    format!("\"{:08x}-{:x}\"", crc32fast::hash(bytes), bytes.len())
}

/// The body of a GET, at most `max_bytes + 1` bytes of it: a local file is
/// read directly (bounded), anything else as a stream (see
/// [`walcast_client::read_body`]), so a claimed size is never allocated.
async fn read_payload(res: GetResult, max_bytes: u64) -> object_store::Result<Vec<u8>> {
    let claimed = res.range.end.saturating_sub(res.range.start);
    match res.payload {
        GetResultPayload::File(file, _) => {
            let start = res.range.start;
            tokio::task::spawn_blocking(move || read_file_range(file, start, claimed, max_bytes))
                .await
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
                .and_then(|r| r.map_err(|e| Box::new(e) as _))
                .map_err(|source| object_store::Error::Generic {
                    store: "LocalFileSystem",
                    source,
                })
        }
        GetResultPayload::Stream(s) => walcast_client::read_body(s, max_bytes, Some(claimed)).await,
    }
}

/// Reads at most `min(len, max_bytes + 1)` bytes of `file` from `start`.
fn read_file_range(
    mut file: std::fs::File,
    start: u64,
    len: u64,
    max_bytes: u64,
) -> std::io::Result<Vec<u8>> {
    use std::io::{Seek, SeekFrom};
    file.seek(SeekFrom::Start(start))?;
    read_bounded(file, len, max_bytes)
}

/// Reads at most `min(len, max_bytes + 1)` bytes of `r`; `len` (a size as
/// stated) only sizes the first reservation, capped.
fn read_bounded(r: impl std::io::Read, len: u64, max_bytes: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let take = len.min(max_bytes.saturating_add(1));
    let cap = usize::try_from(take)
        .unwrap_or(usize::MAX)
        .min(walcast_client::MAX_PREALLOC);
    let mut buf = Vec::with_capacity(cap);
    r.take(take).read_to_end(&mut buf)?;
    Ok(buf)
}

/// How long a DELETE may take before it fails, and a PUT besides its
/// body's time at 128 KiB a second (on a local directory and a cloud store
/// alike).
pub const LOCAL_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The HTTP status of a store error that came from an HTTP answer.
///
/// object_store does not expose its request error type, so this reads the
/// status where object_store itself formats it: first, in the message of
/// the request error in the chain ("Server returned non-2xx status code:
/// 416 Range Not Satisfiable: <body>"). Text a server or an object key
/// puts elsewhere (a body, a URL) cannot match.
fn http_status(e: &object_store::Error) -> Option<u16> {
    const PREFIX: &str = "Server returned non-2xx status code: ";
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if let Some(rest) = text.strip_prefix(PREFIX) {
            let code = rest
                .get(..3)
                .filter(|c| c.bytes().all(|b| b.is_ascii_digit()));
            if let Some(code) = code.and_then(|c| c.parse().ok()) {
                return Some(code);
            }
        }
        cur = err.source();
    }
    None
}

/// Whether a store error says the range starts past the object's end: an
/// HTTP 416, or object_store's own range check (local and in-memory
/// stores, and a 206 whose stated total is below the range), recognised by
/// the message of its error kind (`InvalidGetRange::StartTooLarge`, whose
/// type object_store does not export) at the start of an error in the chain.
fn range_not_satisfiable(e: &object_store::Error) -> bool {
    if http_status(e) == Some(416) {
        return true;
    }
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.to_string().starts_with("Wanted range starting at ") {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Runs blocking file work for the GET `req` off the caller's thread and
/// within its time limit (a hung mount fails the GET, as a hung server's
/// would); `Err` is the failed answer.
async fn blocking_within<T: Send + 'static>(
    req: &GetRequest,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, GetResponse> {
    let timeout = std::time::Duration::from_millis(req.timeout_ms.max(1));
    match tokio::time::timeout(timeout, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(_)) => Err(GetResponse::Failed {
            status: None,
            message: format!("GET {}: reading the local file failed", req.key),
        }),
        Err(_) => Err(GetResponse::Failed {
            status: None,
            message: format!("GET {} timed out after {} ms", req.key, req.timeout_ms),
        }),
    }
}

/// Opens a local object for reading, refusing anything but a regular file.
/// On unix it opens without blocking (`O_NONBLOCK`, which reads of a
/// regular file ignore): a FIFO, device or socket placed at an object's
/// path would otherwise block the open itself, until another process
/// writes to it.
pub(crate) fn open_regular(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.custom_flags(libc::O_NONBLOCK);
    }
    let f = o.open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    Ok(f)
}

fn local_head_get(dir: &std::path::Path, inm: Option<&str>, max_bytes: u64) -> GetResponse {
    let read = open_regular(&dir.join(HEAD_KEY)).and_then(|f| {
        let len = f.metadata()?.len();
        read_bounded(f, len, max_bytes)
    });
    match read {
        Ok(body) => {
            let etag = local_etag(&body);
            if inm == Some(etag.as_str()) {
                GetResponse::NotModified
            } else {
                GetResponse::Ok {
                    body,
                    etag: Some(etag),
                    range: None,
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => GetResponse::NotFound,
        Err(e) => GetResponse::Failed {
            status: None,
            message: format!("reading {HEAD_KEY}: {e}"),
        },
    }
}

fn local_head_put(
    dir: &std::path::Path,
    body: &[u8],
    cond: &PutCondition,
    until: Option<std::time::Instant>,
) -> PutResponse {
    let run = || -> Result<PutResponse> {
        let catalog = dir.join("catalog");
        std::fs::create_dir_all(&catalog)?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(catalog.join(".head.lock"))?;
        loop {
            match lock.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock)
                    if until.is_none_or(|u| std::time::Instant::now() < u) =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Ok(PutResponse::Failed {
                        message: format!(
                            "{HEAD_KEY}: the head's lock (catalog/.head.lock) stayed held \
                             (by another process, or a write of this one still under way)"
                        ),
                    })
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
            }
        }
        let path = dir.join(HEAD_KEY);
        // At most a head's bound is read: a larger file (no head this
        // publisher wrote) matches no ETag.
        let max = walcast_core::catalog::MAX_HEAD_BYTES as u64;
        let current = match open_regular(&path) {
            Ok(f) => {
                let b = read_bounded(f, max + 1, max)?;
                Some(if b.len() as u64 > max {
                    String::new()
                } else {
                    local_etag(&b)
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        match (cond, &current) {
            (PutCondition::CreateOnly, Some(_)) => return Ok(PutResponse::AlreadyExists),
            (PutCondition::IfMatch(_), None) => return Ok(PutResponse::PreconditionFailed),
            (PutCondition::IfMatch(e), Some(c)) if e != c => {
                return Ok(PutResponse::PreconditionFailed)
            }
            _ => {}
        }
        write_dataset_file(&path, body)?;
        Ok(PutResponse::Ok {
            etag: Some(local_etag(body)),
        })
    };
    run().unwrap_or_else(|e| PutResponse::Failed {
        message: e.to_string(),
    })
}

/// Writes `path` atomically: temporary file, fsync, rename, fsync directory.
/// The file is private to its owner (0600).
pub fn write_atomic(path: &std::path::Path, body: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(body))
}

/// [`write_atomic`] for a file of a dataset: mode [`DATASET_FILE_MODE`]
/// less the umask.
fn write_dataset_file(path: &std::path::Path, body: &[u8]) -> Result<()> {
    write_atomic_mode(path, Some(DATASET_FILE_MODE), |w| w.write_all(body))
}

/// [`write_atomic`] with the body streamed by `write` (through a buffer), so
/// that a large body need not sit in memory whole.
pub fn write_atomic_with(
    path: &std::path::Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    write_atomic_mode(path, None, write)
}

/// [`write_atomic_with`], the file created with `mode` (less the umask)
/// instead of 0600.
fn write_atomic_mode(
    path: &std::path::Path,
    mode: Option<u32>,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent", path.display()))?;
    std::fs::create_dir_all(dir)?;
    let mut builder = tempfile::Builder::new();
    #[cfg(unix)]
    if let Some(mode) = mode {
        use std::os::unix::fs::PermissionsExt as _;
        builder.permissions(std::fs::Permissions::from_mode(mode));
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut tmp = builder.tempfile_in(dir)?;
    {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, tmp.as_file_mut());
        write(&mut w)?;
        w.flush()?;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// The object store of a `file://` dataset: every object it writes is
/// synced (file and directory) before the write returns, so a head, which
/// is synced when it is replaced, never names an object a power loss could
/// take back.
fn local_store(dir: &std::path::Path) -> Result<object_store::local::LocalFileSystem> {
    Ok(object_store::local::LocalFileSystem::new_with_prefix(dir)?.with_fsync(true))
}

#[cfg(test)]
mod tests {
    use super::{env_options, gcs_token, gcs_token_parts, local_store, Store, CLIENT_DEFAULTS};
    use walcast_core::catalog::HEAD_KEY;
    use walcast_core::publisher::{ObjectKind, PutCondition, PutRequest, PutResponse};

    fn head_put(body: &[u8], condition: PutCondition) -> PutRequest {
        PutRequest {
            id: walcast_core::io::RequestId(1),
            key: HEAD_KEY.into(),
            body: body.to_vec(),
            condition,
            kind: ObjectKind::Head,
        }
    }

    /// Cloud stores are opened with walcast's client options first (the
    /// environment's after them win): no 30 s bound on a whole request,
    /// which a large snapshot's PUT on a slow link never met; object_store
    /// accepts them for every scheme.
    #[test]
    fn cloud_stores_take_the_client_options_without_a_total_30_s_bound() {
        for scheme in ["s3", "gs", "az"] {
            let opts = env_options(scheme);
            let first: Vec<(&str, &str)> = opts
                .iter()
                .take(CLIENT_DEFAULTS.len())
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            assert_eq!(first, CLIENT_DEFAULTS, "{scheme}");
        }
        assert!(env_options("file").is_empty());
        // The values parse: an unparseable duration fails the open.
        Store::open("s3://walcast-bucket/prefix").expect("s3 opens with the options");
    }

    /// A head write into a directory whose head lock another process holds
    /// (stopped mid-write) fails after the write timeout, naming the head,
    /// instead of waiting for ever, and leaves nothing waiting behind.
    #[tokio::test]
    async fn a_local_head_write_behind_a_held_lock_fails_after_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let store = Store::open(&url)
            .unwrap()
            .with_write_timeout(std::time::Duration::from_millis(300));
        std::fs::create_dir_all(dir.path().join("catalog")).unwrap();
        let lock = std::fs::File::create(dir.path().join("catalog/.head.lock")).unwrap();
        lock.lock().unwrap();
        let r = store.put(&head_put(b"{}", PutCondition::CreateOnly)).await;
        match r {
            PutResponse::Failed { message } => assert!(message.contains(HEAD_KEY), "{message}"),
            other => panic!("{other:?}"),
        }
        // The write that gave up left no thread waiting for the lock, to
        // write the head once it is free.
        drop(lock);
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert!(
            !dir.path().join(HEAD_KEY).exists(),
            "a write given up landed later"
        );
    }

    /// A head file far larger than any head is not read whole to compare
    /// its ETag: it matches none, and a conditional write is refused.
    #[tokio::test]
    async fn a_huge_local_head_file_matches_no_etag() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let store = Store::open(&url).unwrap();
        std::fs::create_dir_all(dir.path().join("catalog")).unwrap();
        let f = std::fs::File::create(dir.path().join(HEAD_KEY)).unwrap();
        // Sparse: 10 GiB claimed, nothing written.
        f.set_len(10 << 30).unwrap();
        let etag = super::local_etag(&[]);
        let r = store
            .put(&head_put(b"{}", PutCondition::IfMatch(etag)))
            .await;
        assert_eq!(r, PutResponse::PreconditionFailed);
        let r = store.put(&head_put(b"{}", PutCondition::CreateOnly)).await;
        assert_eq!(r, PutResponse::AlreadyExists);
    }

    #[test]
    fn file_datasets_sync_what_they_write() {
        // The flag is private to object_store; its Debug output shows it.
        let dir = std::env::temp_dir();
        let store = local_store(&dir).unwrap();
        assert!(format!("{store:?}").contains("fsync: true"), "{store:?}");
    }

    #[test]
    fn gcs_tokens_carry_the_generation_and_the_etag() {
        let t = gcs_token(Some("1712345678901234"), Some("\"abc\"")).unwrap();
        assert_eq!(t, "g1712345678901234:\"abc\"");
        assert_eq!(gcs_token_parts(&t), (Some("1712345678901234"), "\"abc\""));
        // No generation: the ETag alone, which splits back to itself.
        assert_eq!(gcs_token(None, Some("\"x\"")).as_deref(), Some("\"x\""));
        assert_eq!(gcs_token(None, None), None);
        for plain in ["\"g1:x\"", "g:x", "gx:1", "abc", ""] {
            assert_eq!(gcs_token_parts(plain), (None, plain), "{plain:?}");
        }
        assert_eq!(gcs_token_parts("g7:"), (Some("7"), ""));
    }
}
