//! The values that cross the seam between a state machine and its driver:
//! requests for bytes and the responses to them.

/// Identifies one request a machine asked its driver to perform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// A byte range of an object, as in an HTTP `Range` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// Bytes `start..end` (end exclusive): `Range: bytes=start-(end-1)`.
    Bounded {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// The last `n` bytes: `Range: bytes=-n`.
    Suffix(u64),
}

impl ByteRange {
    /// The value of an HTTP `Range` header for this range.
    pub fn to_header(&self) -> String {
        match *self {
            ByteRange::Bounded { start, end } => format!("bytes={start}-{}", end.saturating_sub(1)),
            ByteRange::Suffix(n) => format!("bytes=-{n}"),
        }
    }
}

/// A GET the driver should perform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetRequest {
    /// Which request this is; pass it back with the response.
    pub id: RequestId,
    /// Object key relative to the dataset prefix.
    pub key: String,
    /// Byte range to ask for, or the whole object.
    pub range: Option<ByteRange>,
    /// `If-None-Match` value (the ETag last seen), for the head.
    pub if_none_match: Option<String>,
    /// Long-poll: ask the server to hold this conditional head GET for up
    /// to this many ms until the head changes (sent as `Prefer: wait=N` and
    /// `?wait=N`, in whole seconds; see [`wait_seconds`]). Set only for
    /// servers that advertised support ([`LONG_POLL_HEADER`]);
    /// `timeout_ms` already includes the wait.
    pub wait_ms: Option<u64>,
    /// Give up and answer [`GetResponse::Failed`] after this many ms.
    pub timeout_ms: u64,
    /// The most body bytes the machine can use: the object's size as the
    /// catalog states it, or the format's limit (the head, a page). A driver
    /// must never buffer more than `max_bytes + 1` bytes of a body, whatever
    /// `Content-Length` claims: it stops reading there and hands over what it
    /// has, and the machine reports the oversized object as a `data` error.
    pub max_bytes: u64,
}

/// The response header with which a server says it holds conditional head
/// GETs (long-poll); its value is the longest wait it grants, in whole
/// seconds (`Walcast-Long-Poll: 60`).
pub const LONG_POLL_HEADER: &str = "walcast-long-poll";

/// The query parameter carrying the wait hint of a long-poll (whole
/// seconds), so a CDN can key on it.
pub const WAIT_PARAM: &str = "wait";

/// The wait hint of `wait_ms` in whole seconds, as sent in `Prefer: wait=N`
/// and `?wait=N` (at least 1).
pub fn wait_seconds(wait_ms: u64) -> u64 {
    (wait_ms / 1000).max(1)
}

/// Parses a [`LONG_POLL_HEADER`] value: the longest wait the server grants,
/// in ms. `None` for anything but a whole number of seconds from 1 to
/// 86,400.
pub fn parse_long_poll(value: &str) -> Option<u64> {
    let v = value.trim_ascii();
    if v.is_empty() || v.len() > 5 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: u64 = v.parse().ok()?;
    (1..=86_400).contains(&secs).then_some(secs * 1000)
}

/// What a driver saw in a response's headers besides its body, for the
/// machine: whether the server holds long-polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResponseMeta {
    /// The server's [`LONG_POLL_HEADER`], parsed by [`parse_long_poll`]:
    /// the longest wait it grants (ms). `None`: plain polling.
    pub long_poll_max_ms: Option<u64>,
}

/// The `Content-Range` of a 206 answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentRange {
    /// First byte in the body.
    pub start: u64,
    /// One past the last byte in the body.
    pub end: u64,
    /// Size of the whole object, when the server said.
    pub total: Option<u64>,
}

impl ContentRange {
    /// Parses an HTTP `Content-Range` value such as `bytes 0-99/1000`
    /// (`*` for an unknown total).
    pub fn parse(value: &str) -> Option<ContentRange> {
        let rest = value.trim_ascii().strip_prefix("bytes ")?;
        let (range, total) = crate::codec::cut(rest, b'/')?;
        let (a, b) = crate::codec::cut(range, b'-')?;
        let start: u64 = a.trim_ascii().parse().ok()?;
        let last: u64 = b.trim_ascii().parse().ok()?;
        if last < start {
            return None;
        }
        Some(ContentRange {
            start,
            end: last.checked_add(1)?,
            total: total.trim_ascii().parse().ok(),
        })
    }
}

/// What a GET produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GetResponse {
    /// 200 (whole object, `range: None`) or 206 (`range: Some`).
    Ok {
        /// The body as received (possibly truncated: the machine checks).
        body: Vec<u8>,
        /// The `ETag`, if any.
        etag: Option<String>,
        /// The `Content-Range` of a 206.
        range: Option<ContentRange>,
    },
    /// 304: the `If-None-Match` ETag still matches.
    NotModified,
    /// 404 (or the store's "no such key").
    NotFound,
    /// 416: the range is outside the object.
    RangeNotSatisfiable,
    /// Anything else: 5xx, 403, timeout, connection failure.
    Failed {
        /// HTTP status, when there was one.
        status: Option<u16>,
        /// What went wrong.
        message: String,
    },
}
