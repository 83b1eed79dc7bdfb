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
    /// Give up and answer [`GetResponse::Failed`] after this many ms.
    pub timeout_ms: u64,
    /// The most body bytes the machine can use: the object's size as the
    /// catalog states it, or the format's limit (the head, a page). A driver
    /// must never buffer more than `max_bytes + 1` bytes of a body, whatever
    /// `Content-Length` claims: it stops reading there and hands over what it
    /// has, and the machine reports the oversized object as a `data` error.
    pub max_bytes: u64,
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
        let rest = value.trim().strip_prefix("bytes ")?;
        let (range, total) = rest.split_once('/')?;
        let (a, b) = range.split_once('-')?;
        let start: u64 = a.trim().parse().ok()?;
        let last: u64 = b.trim().parse().ok()?;
        if last < start {
            return None;
        }
        Some(ContentRange {
            start,
            end: last.checked_add(1)?,
            total: total.trim().parse().ok(),
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
