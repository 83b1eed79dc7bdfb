//! The objects served: which paths name a dataset object, the files behind
//! them with their ETags, and byte ranges.

use super::*;

/// The dataset's object kinds, the only things served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Object {
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
    pub(super) fn of(rel: &str) -> Option<Object> {
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
    pub(super) fn key(rel: &str) -> Option<Object> {
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

    pub(super) fn cache_control(self) -> &'static str {
        match self {
            Object::Head => NO_CACHE,
            Object::Page | Object::Segment | Object::Snapshot | Object::Delta => IMMUTABLE,
        }
    }

    pub(super) fn content_type(self) -> &'static str {
        match self {
            Object::Head | Object::Page => JSON,
            Object::Segment | Object::Snapshot | Object::Delta => OCTETS,
        }
    }
}

/// A directory name allowed in a dataset's prefix.
pub(super) fn plain_name(c: &str) -> bool {
    !c.is_empty()
        && !c.starts_with('.')
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

pub(super) struct CachedTag {
    pub(super) len: u64,
    pub(super) mtime: Option<SystemTime>,
    pub(super) id: FileId,
    pub(super) etag: String,
}

/// Which version of a large file an ETag is for: its canonical path, length,
/// modification time and [`FileId`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct TagKey {
    pub(super) path: PathBuf,
    pub(super) len: u64,
    pub(super) mtime: Option<SystemTime>,
    pub(super) id: FileId,
}

/// What tells two versions of a file apart when their length and
/// modification time are equal: on Unix its device, inode and status-change
/// time. A file replaced by another of the same length whose modification
/// time was carried over (`cp -p`, `touch -r`, `tar x`, a restore) is
/// another inode, and a file rewritten in place gets a new ctime (which,
/// unlike the modification time, cannot be set back); either way its cached
/// ETag no longer applies. Elsewhere, nothing more than length and time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct FileId {
    /// Device and inode.
    #[cfg(unix)]
    node: (u64, u64),
    /// Status-change time: seconds and nanoseconds.
    #[cfg(unix)]
    ctime: (i64, i64),
}

impl FileId {
    /// The identity of the file `meta` describes.
    pub(super) fn of(meta: &std::fs::Metadata) -> FileId {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt as _;
            FileId {
                node: (meta.dev(), meta.ino()),
                ctime: (meta.ctime(), meta.ctime_nsec()),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = meta;
            FileId {}
        }
    }
}

/// A hash of one [`TagKey`] in progress, which every request for that
/// version awaits (an error is shared as the `io::Error` it was).
pub(super) type Hashing =
    futures::future::Shared<futures::future::BoxFuture<'static, Result<String, Arc<io::Error>>>>;

/// An opened regular file with its validator.
pub(super) struct Entity {
    /// The file, for a large one (a small one is in `data`); `None` too
    /// once a held long-poll let it go.
    pub(super) file: Option<File>,
    pub(super) len: u64,
    pub(super) etag: String,
    /// The whole contents, for small files.
    pub(super) data: Option<Bytes>,
}

/// A file [`open_entity`] opened.
pub(super) enum Opened {
    /// With its ETag: a small file, or a large one whose ETag is cached.
    Ready(Entity),
    /// A large file whose ETag is not cached yet: see [`etag_of_file`].
    Unhashed(File, TagKey),
}

/// The percent-decoded URL path as a `/`-joined relative path of plain
/// components, or `None` if it is malformed or tries to leave the root.
pub(super) fn relative_path(uri_path: &str) -> Option<String> {
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

pub(super) fn percent_decode(s: &str) -> Option<String> {
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

/// Resolves `rel` under the root (refusing anything outside it) and opens
/// it: a small file is read whole, with its ETag; a large one comes with
/// its cached ETag, if any. Blocking.
pub(super) fn open_entity(state: &Served, rel: &str) -> io::Result<Opened> {
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
    // Never blocks on a FIFO or device at the path: anything but a regular
    // file is not served.
    let mut file = crate::store::open_regular(&path).map_err(|e| match e.kind() {
        io::ErrorKind::InvalidData => io::Error::new(io::ErrorKind::NotFound, e),
        _ => e,
    })?;
    let meta = file.metadata()?;
    let len = meta.len();
    if len <= SMALL_FILE {
        // Counted against the bytes held for answers until the last copy
        // of them is dropped (sent, or the client gone).
        let kib = u32::try_from(len.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
        let head = path.ends_with("catalog/head.json");
        let budget = if head {
            &state.head_bytes
        } else {
            &state.small_bytes
        };
        let Ok(permit) = Arc::clone(budget).try_acquire_many_owned(kib) else {
            return Err(io::Error::other(SmallBytesFull));
        };
        let mut data = Vec::with_capacity(len as usize);
        // At most the length it had when opened (a file still growing is
        // read as far as that). The file is closed once read.
        (&mut file).take(len).read_to_end(&mut data)?;
        let etag = etag_of(crc32fast::hash(&data), data.len() as u64);
        return Ok(Opened::Ready(Entity {
            file: None,
            len: data.len() as u64,
            etag,
            data: Some(Bytes::from_owner(Held {
                data,
                _permit: permit,
            })),
        }));
    }
    let key = TagKey {
        path,
        len,
        mtime: meta.modified().ok(),
        id: FileId::of(&meta),
    };
    Ok(match cached_etag(state, &key) {
        Some(etag) => Opened::Ready(Entity {
            file: Some(file),
            len,
            etag,
            data: None,
        }),
        None => Opened::Unhashed(file, key),
    })
}

/// The bytes of small files held for answers are at their bound.
#[derive(Debug)]
pub(super) struct SmallBytesFull;

impl std::fmt::Display for SmallBytesFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the bytes of small files held for answers are at their bound")
    }
}

impl std::error::Error for SmallBytesFull {}

/// A small file's bytes with their share of the bytes held for answers.
struct Held {
    data: Vec<u8>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

/// The cached ETag of `key`, if any.
fn cached_etag(state: &Served, key: &TagKey) -> Option<String> {
    let etags = state.etags.lock().unwrap_or_else(|e| e.into_inner());
    etags
        .get(&key.path)
        .filter(|c| c.len == key.len && c.mtime == key.mtime && c.id == key.id)
        .map(|c| c.etag.clone())
}

/// The ETag of the large file version `key`: cached, or hashed once however
/// many requests ask for it at the same time. The hash runs on a task of its
/// own, so once begun it completes into the cache even when every request
/// waiting for it has gone (a client's retry then finds it there, or awaits
/// the same hash, rather than starting another); at most [`MAX_HASHING`]
/// hashes read files at once, the others wait their turn without a
/// blocking thread, and one whose requests have all gone by its turn is
/// given up.
pub(super) async fn etag_of_file(state: &Arc<Served>, key: TagKey) -> io::Result<String> {
    let hashing = {
        let mut hashing = state.hashing.lock().unwrap_or_else(|e| e.into_inner());
        // Under the `hashing` lock: a hash adds its ETag to the cache before
        // it leaves the map, so one or the other is seen.
        if let Some(etag) = cached_etag(state, &key) {
            return Ok(etag);
        }
        hashing
            .entry(key.clone())
            .or_insert_with(|| start_hash(state, key))
            .clone()
    };
    hashing.await.map_err(|e| match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    })
}

/// Starts hashing `key` on a task that waits for a turn (`hash_turns`),
/// hashes on a blocking thread, caches the ETag, then leaves
/// `state.hashing` (with or without one).
fn start_hash(state: &Arc<Served>, key: TagKey) -> Hashing {
    use futures::FutureExt as _;
    let state = Arc::clone(state);
    let task = tokio::spawn(async move {
        // The semaphore is never closed: a turn always comes.
        let turn = Arc::clone(&state.hash_turns).acquire_owned().await;
        {
            // Nobody waits for it any more (requests that asked and left,
            // a client sending HEADs for many large files and closing):
            // no hash, so a queue of them does not hold back the ones
            // asked for. Under the `hashing` lock, where a request takes
            // its share of the hash: one that comes later starts another.
            let mut hashing = state.hashing.lock().unwrap_or_else(|e| e.into_inner());
            let waited = hashing
                .get(&key)
                .and_then(futures::future::Shared::strong_count)
                .is_some_and(|n| n > 1);
            if !waited {
                hashing.remove(&key);
                return Err(Arc::new(io::Error::other(
                    "the ETag hash was given up: nobody waits for it",
                )));
            }
        }
        let hashing = tokio::task::spawn_blocking(move || {
            let _turn = turn;
            let hashed = hash_file(&key);
            if let Ok(etag) = &hashed {
                let mut etags = state.etags.lock().unwrap_or_else(|e| e.into_inner());
                cache_etag(
                    &mut etags,
                    key.path.clone(),
                    CachedTag {
                        len: key.len,
                        mtime: key.mtime,
                        id: key.id,
                        etag: etag.clone(),
                    },
                );
            }
            state
                .hashing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
            hashed.map_err(Arc::new)
        });
        hashing
            .await
            .unwrap_or_else(|e| Err(Arc::new(io::Error::other(e))))
    });
    async move {
        task.await
            .unwrap_or_else(|e| Err(Arc::new(io::Error::other(e))))
    }
    .boxed()
    .shared()
}

/// Caches `tag` for `path`. A full cache gives up one other entry for it,
/// so that requests cycling through more large files than it holds cost a
/// hash each, not every cached ETag at once.
pub(super) fn cache_etag(etags: &mut HashMap<PathBuf, CachedTag>, path: PathBuf, tag: CachedTag) {
    if etags.len() >= ETAG_CACHE_MAX && !etags.contains_key(&path) {
        if let Some(other) = etags.keys().next().cloned() {
            etags.remove(&other);
        }
    }
    etags.insert(path, tag);
}

/// The ETag of the file version `key`, read whole from a file of its own.
/// Blocking.
fn hash_file(key: &TagKey) -> io::Result<String> {
    let changed = || {
        io::Error::other(format!(
            "{} changed while hashing it for its ETag",
            key.path.display()
        ))
    };
    let mut file = crate::store::open_regular(&key.path)?;
    let meta = file.metadata()?;
    if meta.len() != key.len || meta.modified().ok() != key.mtime || FileId::of(&meta) != key.id {
        return Err(changed());
    }
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
    if read != key.len {
        return Err(changed());
    }
    Ok(etag_of(hasher.finalize(), key.len))
}

pub(super) fn etag_of(crc: u32, len: u64) -> String {
    format!("\"{crc:08x}-{len:x}\"")
}

/// Streams `len` bytes of `file` from `start`.
pub(super) async fn stream_slice(mut file: File, start: u64, len: u64) -> io::Result<Body> {
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
        let mut buf = vec![0u8; usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK))];
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
pub(super) fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag)
}

/// Whether `If-Match` holds: absent, `*`, or naming `etag` (strong
/// comparison: a weak tag never matches).
pub(super) fn if_match(headers: &HeaderMap, etag: &str) -> bool {
    let mut values = headers.get_all(header::IF_MATCH).iter().peekable();
    values.peek().is_none()
        || values
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .any(|t| t == "*" || t == etag)
}

/// Whether a `Range` should be honoured given `If-Range`: only if absent or
/// strongly matching our ETag (we send no `Last-Modified`, so dates never
/// match).
pub(super) fn range_applies(headers: &HeaderMap, etag: &str) -> bool {
    match headers.get(header::IF_RANGE) {
        None => true,
        Some(v) => v.to_str().is_ok_and(|v| v.trim() == etag),
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum RangeReq {
    /// No (usable) range: send the whole representation.
    Ignore,
    /// 416.
    Unsatisfiable,
    /// 206 with this inclusive byte range.
    Slice(u64, u64),
}

/// Parses a `Range` header value against a representation of `total` bytes.
pub(super) fn parse_range(value: &[u8], total: u64) -> RangeReq {
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
