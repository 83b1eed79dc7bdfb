//! Decoding the catalog's JSON (heads and pages) into its types.
//!
//! A small pull reader of its own ([`Cursor`]) reads the catalog straight
//! into its types: one code path per member, no per-type visitor machinery
//! and no floating point (the catalog has no fractions), which keeps the
//! wasm module small. Encoding stays with `serde_json` (`Serialize` on the
//! public types), so the bytes the publisher writes are unchanged.
//!
//! What the reader accepts: one JSON object (RFC 8259) in UTF-8, with
//! nothing after it but whitespace. Unknown members are ignored (they must
//! still be well-formed JSON), as the compatibility rules in
//! `docs/FORMAT.md` require; a member given twice keeps its last value.
//! Integers must fit their field (`u16`, `u32` or `u64`): fractions,
//! exponents, negative numbers, leading zeros and `null` for a required
//! member are refused; `null` for an optional member means it is absent.
//! Arrays and objects nest at most [`MAX_JSON_DEPTH`] deep, checked before
//! anything is parsed.

use super::Digests;

use super::{
    DatasetId, DeltaEntry, Head, Page, PageRef, Retired, SegmentEntry, SlotPages, SnapshotEntry,
    TailSegment,
};
use crate::error::DecodeError;
use crate::segment::IndexEntry;
use crate::trust::{HeadTrust, KeyEndorsement};

/// Deepest nesting of arrays and objects accepted in a head or page. The
/// catalog's own members nest at most 4 deep; unknown members may add more,
/// up to this (the limit serde_json applies). The reader recurses once per
/// level of an unknown member, so the limit also bounds its stack.
pub(crate) const MAX_JSON_DEPTH: usize = 128;

/// Refuses input nesting arrays and objects deeper than [`MAX_JSON_DEPTH`]
/// (brackets inside strings do not count), in one pass that allocates
/// nothing.
fn check_depth(what: &str, bytes: &[u8]) -> Result<(), DecodeError> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (at, &b) in bytes.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return Err(DecodeError::Json(format!(
                        "{what} nests arrays and objects deeper than {MAX_JSON_DEPTH} \
                         (at offset {at})"
                    )));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// A reader's failure: the byte offset where the input stopped matching
/// what was expected.
type R<T> = Result<T, usize>;

/// A position in JSON text that is valid UTF-8.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    /// The next byte after whitespace (not consumed).
    fn peek(&mut self) -> Option<u8> {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.at) {
            self.at += 1;
        }
        self.b.get(self.at).copied()
    }

    /// Consumes `c` if it comes next.
    fn eat(&mut self, c: u8) -> bool {
        let next = self.peek() == Some(c);
        self.at += usize::from(next);
        next
    }

    fn expect(&mut self, c: u8) -> R<()> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(self.at)
        }
    }

    fn literal(&mut self, word: &[u8]) -> R<()> {
        self.peek();
        if self.b[self.at..].starts_with(word) {
            self.at += word.len();
            Ok(())
        } else {
            Err(self.at)
        }
    }

    /// An object: `member` gets each member's name with the cursor at its
    /// value, which it must read (or [`skip`](Self::skip)).
    fn object(&mut self, member: &mut dyn FnMut(&mut Self, &str) -> R<()>) -> R<()> {
        self.expect(b'{')?;
        if self.eat(b'}') {
            return Ok(());
        }
        loop {
            let name = self.string()?;
            self.expect(b':')?;
            member(self, &name)?;
            if !self.eat(b',') {
                return self.expect(b'}');
            }
        }
    }

    /// An array: `item` reads each element.
    fn array(&mut self, item: &mut dyn FnMut(&mut Self) -> R<()>) -> R<()> {
        self.expect(b'[')?;
        if self.eat(b']') {
            return Ok(());
        }
        loop {
            item(self)?;
            if !self.eat(b',') {
                return self.expect(b']');
            }
        }
    }

    /// An array whose elements `read` reads, as a vector.
    fn list<T>(&mut self, read: fn(&mut Self) -> R<T>) -> R<Vec<T>> {
        let mut out = Vec::new();
        self.array(&mut |c| read(c).map(|v| out.push(v)))?;
        Ok(out)
    }

    /// `None` for `null`, else what `read` reads.
    fn opt<T>(&mut self, read: impl FnOnce(&mut Self) -> R<T>) -> R<Option<T>> {
        if self.peek() == Some(b'n') {
            self.literal(b"null").map(|()| None)
        } else {
            read(self).map(Some)
        }
    }

    fn hex4(&mut self) -> R<u32> {
        let digits = self.b.get(self.at..self.at + 4).ok_or(self.at)?;
        let mut n = 0;
        for &d in digits {
            n = n << 4 | char::from(d).to_digit(16).ok_or(self.at)?;
        }
        self.at += 4;
        Ok(n)
    }

    /// A string, its escapes resolved (a lone surrogate is refused).
    fn string(&mut self) -> R<String> {
        self.expect(b'"')?;
        let mut out = String::new();
        loop {
            let start = self.at;
            // Copy the run up to the next quote, escape or control byte.
            while let Some(&c) = self.b.get(self.at) {
                if c == b'"' || c == b'\\' || c < 0x20 {
                    break;
                }
                self.at += 1;
            }
            out.push_str(std::str::from_utf8(&self.b[start..self.at]).map_err(|_| start)?);
            let c = *self.b.get(self.at).ok_or(self.at)?;
            let esc = self.at;
            self.at += 1;
            match c {
                b'"' => return Ok(out),
                b'\\' => {}
                _ => return Err(esc),
            }
            let e = *self.b.get(self.at).ok_or(self.at)?;
            self.at += 1;
            out.push(match e {
                b'"' => '"',
                b'\\' => '\\',
                b'/' => '/',
                b'b' => '\u{8}',
                b'f' => '\u{c}',
                b'n' => '\n',
                b'r' => '\r',
                b't' => '\t',
                b'u' => {
                    let hi = self.hex4()?;
                    let cp = match hi {
                        0xd800..=0xdbff => {
                            if self.b.get(self.at..self.at + 2) != Some(b"\\u") {
                                return Err(self.at);
                            }
                            self.at += 2;
                            let lo = self.hex4()?;
                            if !(0xdc00..=0xdfff).contains(&lo) {
                                return Err(self.at);
                            }
                            0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
                        }
                        _ => hi,
                    };
                    char::from_u32(cp).ok_or(esc)?
                }
                _ => return Err(esc),
            });
        }
    }

    /// An object key (of a segment, snapshot, delta, page, retired object
    /// or tail copy): printable ASCII without spaces, as every key the
    /// format derives is. Anything else could never name a dataset object,
    /// and is refused here, before a key can reach an error message.
    fn key(&mut self) -> R<String> {
        self.peek();
        let start = self.at;
        let k = self.string()?;
        if k.bytes().all(|b| b.is_ascii_graphic()) {
            Ok(k)
        } else {
            Err(start)
        }
    }

    /// A non-negative integer without sign, fraction, exponent or leading
    /// zero, at most `max`.
    fn uint(&mut self, max: u64) -> R<u64> {
        self.peek();
        let start = self.at;
        let mut n = 0u64;
        while let Some(d @ b'0'..=b'9') = self.b.get(self.at).copied() {
            n = n
                .checked_mul(10)
                .and_then(|n| n.checked_add(u64::from(d - b'0')))
                .filter(|&n| n <= max)
                .ok_or(start)?;
            self.at += 1;
        }
        let digits = &self.b[start..self.at];
        if digits.is_empty()
            || (digits.len() > 1 && digits[0] == b'0')
            || matches!(self.b.get(self.at), Some(b'.' | b'e' | b'E'))
        {
            return Err(start);
        }
        Ok(n)
    }

    fn u64(&mut self) -> R<u64> {
        self.uint(u64::MAX)
    }

    fn u32(&mut self) -> R<u32> {
        self.uint(u32::MAX.into()).map(|n| n as u32)
    }

    fn u16(&mut self) -> R<u16> {
        self.uint(u16::MAX.into()).map(|n| n as u16)
    }

    /// Any JSON value, checked and dropped (an unknown member's).
    fn skip(&mut self) -> R<()> {
        match self.peek().ok_or(self.at)? {
            b'{' => self.object(&mut |c, _| c.skip()),
            b'[' => self.array(&mut |c| c.skip()),
            b'"' => self.string().map(drop),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => self.number(),
        }
    }

    /// Any JSON number (RFC 8259 grammar).
    fn number(&mut self) -> R<()> {
        let start = self.at;
        let digits = |c: &mut Self| {
            let from = c.at;
            while c.b.get(c.at).is_some_and(u8::is_ascii_digit) {
                c.at += 1;
            }
            if c.at == from {
                Err(from)
            } else {
                Ok(())
            }
        };
        self.at += usize::from(self.b.get(self.at) == Some(&b'-'));
        if self.b.get(self.at) == Some(&b'0') {
            self.at += 1;
        } else {
            digits(self).map_err(|_| start)?;
        }
        if self.b.get(self.at) == Some(&b'.') {
            self.at += 1;
            digits(self)?;
        }
        if let Some(b'e' | b'E') = self.b.get(self.at) {
            self.at += 1;
            self.at += usize::from(matches!(self.b.get(self.at), Some(b'+' | b'-')));
            digits(self)?;
        }
        Ok(())
    }

    /// An object of digests, its members in strictly ascending key order
    /// (as every writer serializes them): a member out of order or
    /// repeated is refused where it stands, as is a value that is not a
    /// digest, so every member held takes at least the 70 bytes of JSON of
    /// `"":"<64 hex digits>"`: members of empty strings (6 bytes each) made
    /// a 16 MiB page hold some 15 times its size before they were checked.
    fn string_map(&mut self) -> R<Digests> {
        let mut m: Vec<(String, String)> = Vec::new();
        self.object(&mut |c, name| {
            c.peek();
            let at = c.at;
            if m.last().is_some_and(|(k, _)| k.as_str() >= name) {
                return Err(at);
            }
            let digest = c.string()?;
            if !crate::keys::is_digest(&digest) {
                return Err(at);
            }
            m.push((name.to_string(), digest));
            Ok(())
        })?;
        Ok(Digests::from_sorted(m))
    }
}

/// A required member's value, or the failure at the object's start.
fn need<T>(v: Option<T>, at: usize) -> R<T> {
    v.ok_or(at)
}

/// Parses `bytes` as one JSON object that `read` reads; `what` names the
/// object in the error ("catalog head", "catalog page").
fn parse<T>(what: &str, bytes: &[u8], read: fn(&mut Cursor) -> R<T>) -> Result<T, DecodeError> {
    check_depth(what, bytes)?;
    if let Err(e) = std::str::from_utf8(bytes) {
        return Err(DecodeError::Json(format!(
            "{what} is not UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        )));
    }
    let mut c = Cursor { b: bytes, at: 0 };
    read(&mut c)
        .and_then(|v| match c.peek() {
            None => Ok(v),
            Some(_) => Err(c.at),
        })
        .map_err(|at| {
            DecodeError::Json(format!(
                "{what} is not a valid catalog JSON object (at offset {at})"
            ))
        })
}

/// The catalog format version a head or page declares, read before anything
/// else so that a newer format is refused as such.
pub(super) fn format_of(what: &str, bytes: &[u8]) -> Result<u32, DecodeError> {
    parse(what, bytes, |c| {
        let (at, mut format) = (c.at, None);
        c.object(&mut |c, name| match name {
            "format" => c.u32().map(|v| format = Some(v)),
            _ => c.skip(),
        })?;
        need(format, at)
    })
}

fn segment(c: &mut Cursor) -> R<SegmentEntry> {
    let at = c.at;
    let (mut key, mut epoch, mut first_lsn, mut last_lsn) = (None, None, None, None);
    let (mut size, mut crc32, mut records_end, mut index) = (None, None, None, None);
    let mut filter = None;
    c.object(&mut |c, name| {
        match name {
            "key" => key = Some(c.key()?),
            "epoch" => epoch = Some(c.u64()?),
            "first_lsn" => first_lsn = Some(c.u64()?),
            "last_lsn" => last_lsn = Some(c.u64()?),
            "size" => size = Some(c.u64()?),
            "crc32" => crc32 = Some(c.u32()?),
            "records_end" => records_end = Some(c.u64()?),
            "index" => {
                // A sample of at most CATALOG_INDEX_SAMPLE entries: refused
                // at the first one past it, before it is held.
                let mut entries = Vec::new();
                c.array(&mut |c| {
                    if entries.len() == super::CATALOG_INDEX_SAMPLE {
                        return Err(c.at);
                    }
                    c.expect(b'[')?;
                    let lsn = c.u64()?;
                    c.expect(b',')?;
                    let offset = c.u64()?;
                    c.expect(b']')?;
                    entries.push(IndexEntry { lsn, offset });
                    Ok(())
                })?;
                index = Some(entries);
            }
            "filter" => {
                let text_at = c.at;
                filter = c
                    .opt(Cursor::string)?
                    .map(|t| {
                        crate::b64::decode(t.as_bytes())
                            .ok()
                            .filter(|b| b.len() <= super::MAX_SEGMENT_FILTER_BYTES)
                            .and_then(|b| {
                                crate::snapshot::delta::KeyFilter::parse(
                                    &b,
                                    "segment key filter",
                                    0,
                                )
                                .ok()
                            })
                            .ok_or(text_at)
                    })
                    .transpose()?;
            }
            _ => c.skip()?,
        }
        Ok(())
    })?;
    Ok(SegmentEntry {
        key: need(key, at)?,
        epoch: need(epoch, at)?,
        first_lsn: need(first_lsn, at)?,
        last_lsn: need(last_lsn, at)?,
        size: need(size, at)?,
        crc32: need(crc32, at)?,
        records_end: need(records_end, at)?,
        index: need(index, at)?,
        filter,
    })
}

/// A snapshot entry; its suffix still in base64.
fn snapshot(c: &mut Cursor) -> R<(SnapshotEntry, Option<String>)> {
    let at = c.at;
    let (mut key, mut lsn, mut epoch, mut size) = (None, None, None, None);
    let (mut crc32, mut entries, mut version, mut suffix) = (None, None, None, None);
    let mut footer_crc32 = None;
    c.object(&mut |c, name| {
        match name {
            "key" => key = Some(c.key()?),
            "lsn" => lsn = Some(c.u64()?),
            "epoch" => epoch = Some(c.u64()?),
            "size" => size = Some(c.u64()?),
            "crc32" => crc32 = Some(c.u32()?),
            "entries" => entries = Some(c.u64()?),
            "version" => version = c.opt(Cursor::u16)?,
            "suffix" => suffix = c.opt(Cursor::string)?,
            "footer_crc32" => footer_crc32 = c.opt(Cursor::u32)?,
            _ => c.skip()?,
        }
        Ok(())
    })?;
    let entry = SnapshotEntry {
        key: need(key, at)?,
        lsn: need(lsn, at)?,
        epoch: need(epoch, at)?,
        size: need(size, at)?,
        crc32: need(crc32, at)?,
        entries: need(entries, at)?,
        version: version.unwrap_or(1),
        suffix: None,
        footer_crc32,
    };
    Ok((entry, suffix))
}

fn delta(c: &mut Cursor) -> R<DeltaEntry> {
    let at = c.at;
    let (mut key, mut base_lsn, mut lsn, mut epoch) = (None, None, None, None);
    let (mut size, mut crc32, mut entries, mut suffix_len) = (None, None, None, None);
    let (mut footer_crc32, mut slots) = (None, None);
    c.object(&mut |c, name| {
        match name {
            "key" => key = Some(c.key()?),
            "slots" => slots = Some(slot_pages(c)?),
            "base_lsn" => base_lsn = Some(c.u64()?),
            "lsn" => lsn = Some(c.u64()?),
            "epoch" => epoch = Some(c.u64()?),
            "size" => size = Some(c.u64()?),
            "crc32" => crc32 = Some(c.u32()?),
            "entries" => entries = Some(c.u64()?),
            "suffix_len" => suffix_len = Some(c.u64()?),
            "footer_crc32" => footer_crc32 = c.opt(Cursor::u32)?,
            _ => c.skip()?,
        }
        Ok(())
    })?;
    Ok(DeltaEntry {
        key: need(key, at)?,
        base_lsn: need(base_lsn, at)?,
        lsn: need(lsn, at)?,
        epoch: need(epoch, at)?,
        size: need(size, at)?,
        crc32: need(crc32, at)?,
        entries: need(entries, at)?,
        suffix_len: need(suffix_len, at)?,
        footer_crc32,
        slots,
    })
}

fn slot_pages(c: &mut Cursor) -> R<SlotPages> {
    let at = c.at;
    let (mut pages, mut page_bytes) = (None, None);
    c.object(&mut |c, name| {
        match name {
            "pages" => pages = Some(c.u32()?),
            "page_bytes" => page_bytes = Some(c.u32()?),
            _ => c.skip()?,
        }
        Ok(())
    })?;
    Ok(SlotPages {
        pages: need(pages, at)?,
        page_bytes: need(page_bytes, at)?,
    })
}

fn page_ref(c: &mut Cursor) -> R<PageRef> {
    let at = c.at;
    let (mut key, mut level, mut first_lsn) = (None, None, None);
    let (mut last_lsn, mut count, mut crc32) = (None, None, None);
    c.object(&mut |c, name| {
        match name {
            "key" => key = Some(c.key()?),
            "level" => level = Some(c.u32()?),
            "first_lsn" => first_lsn = Some(c.u64()?),
            "last_lsn" => last_lsn = Some(c.u64()?),
            "count" => count = Some(c.u32()?),
            "crc32" => crc32 = Some(c.u32()?),
            _ => c.skip()?,
        }
        Ok(())
    })?;
    Ok(PageRef {
        key: need(key, at)?,
        level: need(level, at)?,
        first_lsn: need(first_lsn, at)?,
        last_lsn: need(last_lsn, at)?,
        count: need(count, at)?,
        crc32: need(crc32, at)?,
    })
}

/// An object of string members named in `names`, all required.
fn strings<const N: usize>(c: &mut Cursor, names: [&str; N]) -> R<[String; N]> {
    let at = c.at;
    let mut got: [Option<String>; N] = std::array::from_fn(|_| None);
    c.object(&mut |c, name| match names.iter().position(|n| *n == name) {
        Some(i) => c.string().map(|s| got[i] = Some(s)),
        None => c.skip(),
    })?;
    let mut out: [String; N] = std::array::from_fn(|_| String::new());
    for (o, g) in out.iter_mut().zip(got) {
        *o = need(g, at)?;
    }
    Ok(out)
}

fn retired(c: &mut Cursor) -> R<Retired> {
    let at = c.at;
    let (mut key, mut since_ms) = (None, None);
    c.object(&mut |c, name| {
        match name {
            "key" => key = Some(c.key()?),
            "since_ms" => since_ms = Some(c.u64()?),
            _ => c.skip()?,
        }
        Ok(())
    })?;
    Ok(Retired {
        key: need(key, at)?,
        since_ms: need(since_ms, at)?,
    })
}

fn trust(c: &mut Cursor) -> R<HeadTrust> {
    let at = c.at;
    let (mut signer, mut chain, mut digests, mut index_digests) = (None, None, None, None);
    c.object(&mut |c, name| {
        match name {
            "signer" => signer = Some(c.string()?),
            "chain" => {
                chain = c.opt(|c| {
                    c.list(|c| {
                        let [key, by, signature] = strings(c, ["key", "by", "signature"])?;
                        Ok(KeyEndorsement { key, by, signature })
                    })
                })?
            }
            "digests" => digests = c.opt(Cursor::string_map)?,
            "index_digests" => index_digests = c.opt(Cursor::string_map)?,
            _ => c.skip()?,
        }
        Ok(())
    })?;
    Ok(HeadTrust {
        signer: need(signer, at)?,
        chain: chain.unwrap_or_default(),
        digests: digests.unwrap_or_default(),
        index_digests: index_digests.unwrap_or_default(),
    })
}

/// A head as read, before its base64 members are decoded.
struct HeadJson {
    head: Head,
    dataset_id: String,
    snapshot_suffix: Option<String>,
    tail: Vec<[String; 2]>,
}

fn head_json(c: &mut Cursor) -> R<HeadJson> {
    let at = c.at;
    let (mut format, mut dataset_id, mut epoch, mut generation) = (None, None, None, None);
    let (mut committed_lsn, mut earliest_lsn, mut writer) = (None, None, None);
    let (mut committed_at_ms, mut snapshot_json, mut segments, mut pages) =
        (None, None, None, None);
    let (mut retired_list, mut deltas, mut tail, mut trust_json) = (None, None, None, None);
    c.object(&mut |c, name| {
        match name {
            "format" => format = Some(c.u32()?),
            "dataset_id" => dataset_id = Some(c.string()?),
            "epoch" => epoch = Some(c.u64()?),
            "generation" => generation = Some(c.u64()?),
            "committed_lsn" => committed_lsn = Some(c.u64()?),
            "earliest_lsn" => earliest_lsn = Some(c.u64()?),
            "writer" => writer = c.opt(Cursor::string)?,
            "committed_at_ms" => committed_at_ms = c.opt(Cursor::u64)?,
            "snapshot" => snapshot_json = c.opt(snapshot)?,
            "segments" => segments = Some(c.list(segment)?),
            "pages" => pages = c.opt(|c| c.list(page_ref))?,
            "retired" => retired_list = c.opt(|c| c.list(retired))?,
            "deltas" => deltas = c.opt(|c| c.list(delta))?,
            "tail" => {
                tail = c.opt(|c| {
                    c.list(|c| {
                        let [key, body] = strings(c, ["key", "body"])?;
                        if key.bytes().all(|b| b.is_ascii_graphic()) {
                            Ok([key, body])
                        } else {
                            Err(c.at)
                        }
                    })
                })?
            }
            "trust" => trust_json = c.opt(trust)?,
            _ => c.skip()?,
        }
        Ok(())
    })?;
    let (snapshot, snapshot_suffix) = snapshot_json.map_or((None, None), |(s, b)| (Some(s), b));
    Ok(HeadJson {
        head: Head {
            format: need(format, at)?,
            dataset_id: DatasetId::default(),
            epoch: need(epoch, at)?,
            generation: need(generation, at)?,
            committed_lsn: need(committed_lsn, at)?,
            earliest_lsn: need(earliest_lsn, at)?,
            writer: writer.unwrap_or_default(),
            committed_at_ms: committed_at_ms.unwrap_or_default(),
            snapshot,
            segments: need(segments, at)?,
            pages: pages.unwrap_or_default(),
            retired: retired_list.unwrap_or_default(),
            deltas: deltas.unwrap_or_default(),
            tail: Vec::new(),
            trust: trust_json,
        },
        dataset_id: need(dataset_id, at)?,
        snapshot_suffix,
        tail: tail.unwrap_or_default(),
    })
}

/// Parses a head's JSON (its checksum already verified by the caller).
pub(super) fn head(bytes: &[u8]) -> Result<Head, DecodeError> {
    let HeadJson {
        mut head,
        dataset_id,
        snapshot_suffix,
        tail,
    } = parse("catalog head", bytes, head_json)?;
    head.dataset_id = dataset_id.parse::<DatasetId>()?;
    for [key, body] in tail {
        let body = crate::b64::decode(body.as_bytes())
            .map_err(|e| DecodeError::Json(format!("tail body of {key} is not base64: {e}")))?;
        head.tail.push(TailSegment { key, body });
    }
    if let (Some(s), Some(b)) = (head.snapshot.as_mut(), snapshot_suffix) {
        s.suffix = Some(crate::b64::decode(b.as_bytes()).map_err(|e| {
            DecodeError::Json(format!(
                "the suffix of snapshot {} is not base64: {e}",
                s.key
            ))
        })?);
    }
    Ok(head)
}

/// Parses a page's JSON (its checksum already verified by the caller).
pub(crate) fn page(bytes: &[u8]) -> Result<Page, DecodeError> {
    parse("catalog page", bytes, |c| {
        let at = c.at;
        let (mut format, mut level, mut segments, mut pages, mut digests) =
            (None, None, None, None, None);
        c.object(&mut |c, name| {
            match name {
                "format" => format = Some(c.u32()?),
                "level" => level = Some(c.u32()?),
                "segments" => segments = c.opt(|c| c.list(segment))?,
                "pages" => pages = c.opt(|c| c.list(page_ref))?,
                "digests" => digests = c.opt(Cursor::string_map)?,
                _ => c.skip()?,
            }
            Ok(())
        })?;
        Ok(Page {
            format: need(format, at)?,
            level: need(level, at)?,
            segments: segments.unwrap_or_default(),
            pages: pages.unwrap_or_default(),
            digests: digests.unwrap_or_default(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::super::{DatasetId, Head, SegmentEntry, TailSegment};
    use crate::error::DecodeError;
    use crate::segment::IndexEntry;

    const HEAD: &str = include_str!("../../tests/golden/head.json");
    const PAGE: &str = include_str!("../../tests/golden/page.json");

    /// `text` with the one occurrence of `from` replaced by `to`.
    fn edit(text: &str, from: &str, to: &str) -> String {
        assert_eq!(
            text.matches(from).count(),
            1,
            "{from:?} is not unique in the input"
        );
        text.replacen(from, to, 1)
    }

    /// `text` with `from` replaced by `to`, checked to still be well-formed
    /// JSON, so that a refusal is about the catalog's shape, not the syntax.
    fn well_formed(text: &str, from: &str, to: &str) -> String {
        let out = edit(text, from, to);
        if let Err(e) = serde_json::from_str::<serde_json::Value>(&out) {
            panic!("{from:?} -> {to:?} is not well-formed JSON: {e}");
        }
        out
    }

    /// The message of a `DecodeError::Json`; panics on success or another kind.
    fn json_error<T: std::fmt::Debug>(r: Result<T, DecodeError>) -> String {
        match r {
            Err(DecodeError::Json(m)) => m,
            other => panic!("expected DecodeError::Json, got {other:?}"),
        }
    }

    fn head(text: &str) -> Result<Head, DecodeError> {
        super::head(text.as_bytes())
    }

    fn golden() -> Head {
        head(HEAD).expect("the golden head parses")
    }

    /// A head with one segment whose tail carries a copy of it.
    fn head_with_tail() -> String {
        let mut h = Head::new(DatasetId::from_seed(1), 3);
        let key = super::super::segment_key(3, 1, 1);
        h.committed_lsn = 1;
        h.segments.push(SegmentEntry {
            key: key.clone(),
            epoch: 3,
            first_lsn: 1,
            last_lsn: 1,
            size: 100,
            crc32: 7,
            records_end: 90,
            filter: None,
            index: vec![IndexEntry { lsn: 1, offset: 32 }],
        });
        h.tail.push(TailSegment {
            key,
            body: b"hello".to_vec(),
        });
        String::from_utf8(h.encode()).unwrap()
    }

    #[test]
    fn golden_head_and_page_parse() {
        let h = golden();
        assert_eq!(h.epoch, 7);
        assert_eq!(h.generation, 42);
        assert_eq!(h.writer, "5f0c2a9e8b7d6c41");
        assert_eq!(h.committed_at_ms, 1_795_000_000_000);
        assert_eq!(h.segments.len(), 1);
        assert_eq!(h.segments[0].index.len(), 7);
        assert_eq!(
            h.segments[0].index[1],
            IndexEntry {
                lsn: 102,
                offset: 298
            }
        );
        assert_eq!(h.pages.len(), 1);
        assert_eq!(h.pages[0].count, 2);
        assert_eq!(h.retired.len(), 1);
        assert_eq!(h.retired[0].since_ms, 1_794_999_990_000);
        let p = super::page(PAGE.as_bytes()).unwrap();
        assert_eq!((p.format, p.level, p.segments.len()), (1, 0, 2));
        assert!(p.pages.is_empty() && p.digests.is_empty());
        assert_eq!(
            super::format_of("catalog head", HEAD.as_bytes()).unwrap(),
            1
        );
    }

    #[test]
    fn a_built_head_round_trips() {
        let text = head_with_tail();
        let h = head(&text).unwrap();
        assert_eq!(h.tail_body(&h.segments[0].key), Some(&b"hello"[..]));
        assert_eq!(h.encode(), text.as_bytes());
    }

    #[test]
    fn unknown_members_are_ignored_at_every_level() {
        let junk =
            r#""zz_unknown":{"a":[1,-2,3.5e-7,true,false,null,"\u00e9",{}],"b":{"c":[[]]}},"#;
        let mut text = edit(HEAD, r#""format":1,"#, &format!(r#"{junk}"format":1,"#));
        for at in [
            r#"{"key":"snapshots/00000000000000000139"#,
            r#"{"key":"segments/"#,
            r#"{"key":"catalog/pages/"#,
            r#"{"key":"snapshots/00000000000000000060"#,
        ] {
            text = edit(&text, at, &at.replacen('{', &format!("{{{junk}"), 1));
        }
        // Last member of the object too (no comma after it).
        text = edit(&text, "}]}", r#"}],"zz_last":[0]}"#);
        assert_eq!(text.matches("zz_unknown").count(), 5);
        assert_eq!(head(&text).unwrap(), golden());

        let page = edit(PAGE, r#""level":0,"#, &format!(r#""level":0,{junk}"#));
        let page = edit(
            &page,
            r#""epoch":6,"first_lsn":1,"#,
            &format!(r#""epoch":6,{junk}"first_lsn":1,"#),
        );
        assert_eq!(
            super::page(page.as_bytes()).unwrap(),
            super::page(PAGE.as_bytes()).unwrap()
        );
    }

    #[test]
    fn deeply_nested_unknown_values_are_ignored_without_recursion() {
        // The catalog head itself opens one object; the member's nesting
        // may take the rest of the limit.
        const DEPTH: usize = super::MAX_JSON_DEPTH - 1;
        let deep = format!("{}{}", "[".repeat(DEPTH), "]".repeat(DEPTH));
        let deep_maps = format!("{}1{}", r#"{"a":"#.repeat(DEPTH), "}".repeat(DEPTH));
        let text = edit(
            HEAD,
            r#""format":1,"#,
            &format!(r#""deep":{deep},"deep_maps":{deep_maps},"format":1,"#),
        );
        let unclosed = edit(
            HEAD,
            r#""format":1,"#,
            &format!(r#""deep":{},"format":1,"#, "[".repeat(DEPTH)),
        );
        let page = edit(
            PAGE,
            r#""level":0,"#,
            &format!(r#""level":0,"deep":{deep},"#),
        );
        // A small stack: a reader that recursed per level would overflow it.
        let (h, bad, p, f) = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || {
                (
                    head(&text),
                    head(&unclosed),
                    super::page(page.as_bytes()),
                    super::format_of("catalog head", text.as_bytes()),
                )
            })
            .unwrap()
            .join()
            .expect("the reader does not overflow the stack");
        assert_eq!(h.unwrap(), golden());
        json_error(bad);
        assert_eq!(p.unwrap(), super::page(PAGE.as_bytes()).unwrap());
        assert_eq!(f.unwrap(), 1);
    }

    /// Past the limit, nesting is refused before anything is parsed, with
    /// the offset where it went too deep; brackets in strings do not count.
    #[test]
    fn nesting_past_the_limit_is_refused_naming_the_offset() {
        let over = super::MAX_JSON_DEPTH;
        for deep in [
            format!("{}{}", "[".repeat(over), "]".repeat(over)),
            format!("{}1{}", r#"{"a":"#.repeat(over), "}".repeat(over)),
            "[".repeat(1 << 20),
        ] {
            let text = edit(
                HEAD,
                r#""format":1,"#,
                &format!(r#""deep":{deep},"format":1,"#),
            );
            let err = json_error(head(&text));
            assert!(
                err.contains(&format!("deeper than {}", super::MAX_JSON_DEPTH))
                    && err.contains("offset"),
                "{err}"
            );
            assert!(super::format_of("catalog head", text.as_bytes()).is_err());
        }
        let brackets = "[".repeat(10_000);
        let text = edit(
            HEAD,
            r#""writer":"5f0c2a9e8b7d6c41","#,
            &format!(r#""writer":"{brackets}","#),
        );
        assert_eq!(head(&text).unwrap().writer, brackets);
    }

    /// A snapshot's suffix in the head is refused when it is over
    /// `MAX_SNAPSHOT_SUFFIX`, larger than the file, or on a version 1
    /// snapshot (no top index to take), naming the snapshot; within the
    /// limits it round-trips.
    #[test]
    fn a_snapshot_suffix_out_of_bounds_is_refused() {
        let with = |version: u16, size: u64, len: usize| {
            let mut h = golden();
            let s = h.snapshot.as_mut().unwrap();
            s.version = version;
            s.size = size;
            s.suffix = Some(vec![7; len]);
            Head::decode(&h.encode())
        };
        let max = super::super::MAX_SNAPSHOT_SUFFIX;
        let ok = with(2, 1 << 20, max).unwrap();
        assert_eq!(ok.snapshot.unwrap().suffix.unwrap().len(), max);
        for (version, size, len) in [(2, 1 << 20, max + 1), (2, 200, 201), (1, 1 << 20, 10)] {
            let err = json_error(with(version, size, len));
            assert!(
                err.contains("snapshots/") && err.contains("suffix"),
                "{err}"
            );
        }
    }

    /// `footer_crc32` of a snapshot or delta: any `u32` round-trips, `null`
    /// is leaving it out, and anything else (a sign, a fraction, past
    /// `u32`, a string) makes the head invalid.
    #[test]
    fn a_footer_crc32_that_is_not_a_u32_is_refused() {
        let mut h = golden();
        let s = h.snapshot.as_mut().unwrap();
        s.version = 2;
        s.size = 1 << 20;
        s.footer_crc32 = Some(u32::MAX);
        let text = String::from_utf8(h.encode()).unwrap();
        let back = Head::decode(text.as_bytes()).unwrap();
        assert_eq!(back.snapshot.unwrap().footer_crc32, Some(u32::MAX));
        let field = format!(r#""footer_crc32":{}"#, u32::MAX);
        assert!(text.contains(&field), "{text}");
        let with = |value: &str| {
            let body = text.replacen(&field, &format!(r#""footer_crc32":{value}"#), 1);
            // The JSON alone (the checksum prefix is a member it ignores).
            head(&body)
        };
        assert_eq!(with("null").unwrap().snapshot.unwrap().footer_crc32, None);
        assert_eq!(with("0").unwrap().snapshot.unwrap().footer_crc32, Some(0));
        for bad in ["-1", "4294967296", "1.5", "1e3", "\"1\"", "[1]", "01"] {
            assert!(with(bad).is_err(), "footer_crc32 {bad} was accepted");
        }
    }

    /// A snapshot smaller than its header and footer is refused, naming it:
    /// a lazy reader of a version 2 snapshot of size 0 would otherwise ask
    /// for an empty suffix, take the answer for one of a snapshot it left,
    /// and ask again for ever.
    #[test]
    fn a_snapshot_smaller_than_its_header_and_footer_is_refused() {
        let with = |version: u16, size: u64| {
            let mut h = golden();
            let s = h.snapshot.as_mut().unwrap();
            s.version = version;
            s.size = size;
            Head::decode(&h.encode())
        };
        for (version, least) in [(1, 56), (2, 104), (4, 136)] {
            assert!(with(version, least).is_ok(), "version {version}");
            for size in [0, least - 1] {
                let err = json_error(with(version, size));
                assert!(err.contains("snapshots/") && err.contains("size"), "{err}");
            }
        }
    }

    #[test]
    fn a_missing_required_member_is_an_error() {
        for (from, to) in [
            (r#""format":1,"#, ""),
            (r#""dataset_id":"11111111111111111111111111111111","#, ""),
            (r#""epoch":7,"generation""#, r#""generation""#),
            (r#""generation":42,"#, ""),
            (r#""committed_lsn":139,"#, ""),
            (r#""earliest_lsn":1,"#, ""),
            (r#","segments":[{"#, r#","zegments":[{"#),
            (r#""lsn":139,"epoch":7,"#, r#""epoch":7,"#),
            (r#","entries":29"#, ""),
            (r#""records_end":1673,"#, ""),
            (r#","index":[[100"#, r#","zndex":[[100"#),
            (r#""count":2,"#, ""),
            (r#","since_ms":1794999990000"#, ""),
        ] {
            let text = well_formed(HEAD, from, to);
            let msg = json_error(head(&text));
            assert!(msg.contains("catalog head"), "{msg}");
        }
        let text = well_formed(&head_with_tail(), r#","body":"aGVsbG8=""#, "");
        json_error(head(&text));
        for (from, to) in [
            (r#""format":1,"#, ""),
            (r#""level":0,"#, ""),
            (r#""size":1844,"#, ""),
        ] {
            json_error(super::page(well_formed(PAGE, from, to).as_bytes()));
        }
        json_error(super::format_of(
            "catalog head",
            well_formed(HEAD, r#""format":1,"#, "").as_bytes(),
        ));
        json_error(head("{}"));
        json_error(super::page(b"{}"));
    }

    #[test]
    fn members_of_the_wrong_type_are_errors() {
        for (from, to) in [
            (r#""epoch":7,"generation""#, r#""epoch":"7","generation""#),
            (r#""epoch":7,"generation""#, r#""epoch":null,"generation""#),
            (r#""epoch":7,"generation""#, r#""epoch":true,"generation""#),
            (r#""epoch":7,"generation""#, r#""epoch":[7],"generation""#),
            (
                r#""dataset_id":"11111111111111111111111111111111""#,
                r#""dataset_id":11111111111111111111111111111111"#,
            ),
            (
                r#""dataset_id":"11111111111111111111111111111111""#,
                r#""dataset_id":null"#,
            ),
            (r#""writer":"5f0c2a9e8b7d6c41""#, r#""writer":5"#),
            (
                r#""committed_at_ms":1795000000000"#,
                r#""committed_at_ms":"1795000000000""#,
            ),
            (r#""segments":[{"#, r#""segments":null,"x":[{"#),
            (r#""segments":[{"#, r#""segments":7,"x":[{"#),
            (r#"[[100,32],"#, r#"[[100,"32"],"#),
            (r#"[[100,32],"#, r#"[[100],"#),
            (r#"[[100,32],"#, r#"[[100,32,1],"#),
            (r#""lsn":139,"epoch":7,"#, r#""lsn":null,"epoch":7,"#),
            (
                r#""key":"snapshots/00000000000000000139-7.wsnap""#,
                r#""key":139"#,
            ),
            (r#""retired":[{"#, r#""retired":"x","y":[{"#),
            (r#""pages":[{"#, r#""pages":[7,{"#),
            (r#""segments":[{"#, r#""segments":[[],{"#),
        ] {
            let text = well_formed(HEAD, from, to);
            json_error(head(&text));
        }
        json_error(super::page(
            well_formed(PAGE, r#""level":0"#, r#""level":"0""#).as_bytes(),
        ));
        json_error(super::page(
            well_formed(PAGE, r#""level":0"#, r#""level":null"#).as_bytes(),
        ));
        // Not an object at all.
        for text in ["[]", "1", "\"x\"", "null", ""] {
            json_error(head(text));
            json_error(super::page(text.as_bytes()));
        }
    }

    #[test]
    fn integers_must_be_plain_and_fit_their_field() {
        /// A member: where it is in the golden head, and the text to put
        /// there with `{}` for the number.
        type Site = (&'static str, &'static str);
        const U64: [Site; 3] = [
            (r#""epoch":7,"generation""#, r#""epoch":{},"generation""#),
            (r#","since_ms":1794999990000"#, r#","since_ms":{}"#),
            (r#"[[100,32],"#, r#"[[100,{}],"#),
        ];
        const U32: [Site; 3] = [
            (r#""format":1,"#, r#""format":{},"#),
            (r#""crc32":3727579689,"#, r#""crc32":{},"#),
            (r#""count":2,"#, r#""count":{},"#),
        ];
        const U16: [Site; 1] = [(r#","entries":29"#, r#","entries":29,"version":{}"#)];
        // Well-formed JSON numbers that are not integers of the width.
        let not_integers = ["-1", "-0", "1.0", "7.0", "1e3", "7E0", "0.7e1", "1e-0"];
        let cases: [(&[Site], &str, &str); 3] = [
            (&U64, "18446744073709551615", "18446744073709551616"),
            (&U32, "4294967295", "4294967296"),
            (&U16, "65535", "65536"),
        ];
        for (sites, max, above) in cases {
            for (from, template) in sites {
                let text = well_formed(HEAD, from, &template.replace("{}", max));
                head(&text).unwrap_or_else(|e| panic!("{template} with {max}: {e}"));
                for bad in not_integers
                    .iter()
                    .chain(&[above, "99999999999999999999999"])
                {
                    let text = well_formed(HEAD, from, &template.replace("{}", bad));
                    json_error(head(&text));
                }
            }
        }
        let text = well_formed(HEAD, r#""format":1,"#, r#""format":1.0,"#);
        json_error(super::format_of("catalog head", text.as_bytes()));
        let text = well_formed(HEAD, r#""format":1,"#, r#""format":4294967296,"#);
        json_error(super::format_of("catalog head", text.as_bytes()));
        for bad in not_integers.iter().chain(&["4294967296"]) {
            let page = well_formed(PAGE, r#""level":0,"#, &format!(r#""level":{bad},"#));
            json_error(super::page(page.as_bytes()));
        }
        // Not JSON numbers at all.
        for bad in ["007", "+7", "0x7", ".7", "7.", "7e", "-", "Infinity", "NaN"] {
            let text = edit(
                HEAD,
                r#""epoch":7,"generation""#,
                &format!(r#""epoch":{bad},"generation""#),
            );
            assert!(serde_json::from_str::<serde_json::Value>(&text).is_err());
            json_error(head(&text));
        }
    }

    #[test]
    fn the_largest_integers_fit() {
        let text = edit(
            HEAD,
            r#""epoch":7,"generation""#,
            r#""epoch":18446744073709551615,"generation""#,
        );
        assert_eq!(head(&text).unwrap().epoch, u64::MAX);
        let text = edit(HEAD, r#""crc32":3727579689,"#, r#""crc32":4294967295,"#);
        assert_eq!(head(&text).unwrap().segments[0].crc32, u32::MAX);
        let text = edit(HEAD, r#"[[100,32],"#, r#"[[18446744073709551615,0],"#);
        assert_eq!(
            head(&text).unwrap().segments[0].index[0],
            IndexEntry {
                lsn: u64::MAX,
                offset: 0
            }
        );
        let text = edit(HEAD, r#","entries":29"#, r#","entries":29,"version":65535"#);
        assert_eq!(head(&text).unwrap().snapshot.unwrap().version, u16::MAX);
    }

    #[test]
    fn invalid_utf8_is_an_error_naming_its_offset() {
        let at = HEAD.find("5f0c2a9e").unwrap();
        for bad in [&[0xff][..], &[0xc3], &[0xed, 0xa0, 0x80], &[0xc0, 0x80]] {
            let mut bytes = HEAD.as_bytes().to_vec();
            bytes.splice(at..at, bad.iter().copied());
            let msg = json_error(super::head(&bytes));
            assert!(msg.contains(&format!("offset {at})")), "{msg}");
            assert!(msg.contains("not UTF-8"), "{msg}");
            let msg = json_error(super::format_of("catalog head", &bytes));
            assert!(msg.contains(&format!("offset {at})")), "{msg}");
        }
        let mut bytes = PAGE.as_bytes().to_vec();
        bytes[3] = 0x80;
        let msg = json_error(super::page(&bytes));
        assert!(
            msg.contains("catalog page") && msg.contains("offset 3)"),
            "{msg}"
        );
    }

    #[test]
    fn only_whitespace_may_follow_the_object() {
        assert_eq!(head(&format!(" \n{HEAD}\t\r\n ")).unwrap(), golden());
        for garbage in ["x", "{}", ",", "}", "]", "0", "null", " \"", "\0", "/"] {
            json_error(head(&format!("{HEAD}{garbage}")));
            json_error(head(&format!("{HEAD}\n{garbage}")));
            json_error(super::page(format!("{PAGE}{garbage}").as_bytes()));
        }
        // Truncated objects.
        for cut in [1, HEAD.len() / 2, HEAD.len() - 1] {
            json_error(head(&HEAD[..cut]));
        }
    }

    #[test]
    fn null_optional_members_are_absent() {
        let mut h = golden();
        let mut text = HEAD.to_string();
        for (from, to) in [
            (r#""writer":"5f0c2a9e8b7d6c41""#, r#""writer":null"#),
            (
                r#""committed_at_ms":1795000000000"#,
                r#""committed_at_ms":null"#,
            ),
        ] {
            text = edit(&text, from, to);
        }
        let text = edit(
            &text,
            r#"}]}"#,
            r#"}],"deltas":null,"tail":null,"trust":null}"#,
        );
        h.writer = String::new();
        h.committed_at_ms = 0;
        assert_eq!(head(&text).unwrap(), h);

        let start = text.find(r#""pages":["#).unwrap();
        let end = text.find(r#","deltas""#).unwrap();
        let text = format!(
            r#"{}"pages":null,"retired":null{}"#,
            &text[..start],
            &text[end..]
        );
        h.pages.clear();
        h.retired.clear();
        assert_eq!(head(&text).unwrap(), h);

        let start = text.find(r#""snapshot":{"#).unwrap();
        let end = text.find(r#","segments""#).unwrap();
        let text = format!(r#"{}"snapshot":null{}"#, &text[..start], &text[end..]);
        h.snapshot = None;
        assert_eq!(head(&text).unwrap(), h);

        let text = edit(HEAD, r#","entries":29"#, r#","entries":29,"version":null"#);
        assert_eq!(head(&text).unwrap().snapshot.unwrap().version, 1);

        let signed = edit(
            HEAD,
            r#"}]}"#,
            r#"}],"trust":{"signer":"k","chain":null,"digests":null,"index_digests":null}}"#,
        );
        let trust = head(&signed).unwrap().trust.expect("trust present");
        assert_eq!(trust.signer, "k");
        assert!(
            trust.chain.is_empty() && trust.digests.is_empty() && trust.index_digests.is_empty()
        );

        let page = edit(
            PAGE,
            r#""level":0,"#,
            r#""level":0,"pages":null,"digests":null,"#,
        );
        assert_eq!(
            super::page(page.as_bytes()).unwrap(),
            super::page(PAGE.as_bytes()).unwrap()
        );
        let page = r#"{"format":1,"level":2,"segments":null}"#;
        let p = super::page(page.as_bytes()).unwrap();
        assert_eq!(p.level, 2);
        assert!(p.segments.is_empty() && p.pages.is_empty());
    }

    #[test]
    fn snapshot_version_absent_means_1() {
        assert!(!HEAD.contains("\"version\""));
        assert_eq!(golden().snapshot.unwrap().version, 1);
        let text = edit(HEAD, r#","entries":29"#, r#","entries":29,"version":2"#);
        assert_eq!(head(&text).unwrap().snapshot.unwrap().version, 2);
        let text = edit(HEAD, r#","entries":29"#, r#","version":0,"entries":29"#);
        assert_eq!(head(&text).unwrap().snapshot.unwrap().version, 0);
    }

    #[test]
    fn a_segment_key_filter_round_trips_and_a_bad_one_is_an_error() {
        let keys: Vec<&[u8]> = vec![b"a", b"b", b"c"];
        let filter = crate::snapshot::delta::KeyFilter::build(keys.into_iter());
        let mut h = Head::decode(head_with_tail().as_bytes()).unwrap();
        h.segments[0].filter = Some(filter.clone());
        let text = String::from_utf8(h.encode()).unwrap();
        let back = head(&text).unwrap();
        assert_eq!(back.segments[0].filter.as_ref(), Some(&filter));
        assert!(back.segments[0].filter.as_ref().unwrap().may_contain(b"b"));
        let good = format!(r#""filter":"{}""#, crate::b64::Display(&filter.encode()));
        assert!(text.contains(&good), "{text}");
        let mut wrong_probes = filter.encode();
        wrong_probes[4] = 0;
        let mut short = filter.encode();
        short.pop();
        let too_big = {
            let mut b = vec![0u8; super::super::MAX_SEGMENT_FILTER_BYTES + 8];
            let nbits = ((b.len() - 8) * 8) as u32;
            b[..4].copy_from_slice(&nbits.to_le_bytes());
            b[4] = 7;
            b
        };
        for bad in [
            "!!!!".to_string(),
            crate::b64::Display(&wrong_probes).to_string(),
            crate::b64::Display(&short).to_string(),
            crate::b64::Display(&too_big).to_string(),
            String::new(),
        ] {
            let t = edit(&text, &good, &format!(r#""filter":"{bad}""#));
            let msg = json_error(head(&t));
            assert!(msg.contains("catalog head"), "{bad}: {msg}");
        }
        // Absent or null: no filter.
        let t = edit(&text, &good, r#""filter":null"#);
        assert_eq!(head(&t).unwrap().segments[0].filter, None);
    }

    #[test]
    fn a_tail_body_that_is_not_base64_is_an_error_naming_its_key() {
        let text = head_with_tail();
        let key = super::super::segment_key(3, 1, 1);
        for bad in [
            "aGVsbG8",
            "aGVs bG8=",
            "aGVsbG8=x",
            "!!!!",
            "aGVsbG9=",
            "aGVsbG8-",
        ] {
            let t = edit(&text, r#""body":"aGVsbG8=""#, &format!(r#""body":"{bad}""#));
            let msg = json_error(head(&t));
            assert!(
                msg.contains(&key) && msg.contains("not base64"),
                "{bad}: {msg}"
            );
        }
        let t = edit(&text, r#""body":"aGVsbG8=""#, r#""body":"""#);
        assert_eq!(head(&t).unwrap().tail[0].body, b"");
        let t = edit(&text, r#""body":"aGVsbG8=""#, r#""body":"aGVs\u0062G8=""#);
        assert_eq!(head(&t).unwrap().tail[0].body, b"hello");
    }

    #[test]
    fn string_escapes_decode() {
        let text = edit(
            HEAD,
            r#""writer":"5f0c2a9e8b7d6c41""#,
            r#""writer":"\u00e9\u00E9 \ud83d\ude00 \uD834\uDD1E \"\\\/\b\f\n\r\t \u0000 é""#,
        );
        assert_eq!(
            head(&text).unwrap().writer,
            "éé \u{1f600} \u{1d11e} \"\\/\u{8}\u{c}\n\r\t \0 é"
        );
        // Escapes in member names too.
        let text = edit(HEAD, r#""generation":42"#, r#""gener\u0061tion":42"#);
        assert_eq!(head(&text).unwrap().generation, 42);
    }

    #[test]
    fn malformed_strings_are_errors() {
        for bad in [
            r#"\ud800"#,
            r#"\ud800x"#,
            r#"\ud800\u0041"#,
            r#"\ud800\ud800"#,
            r#"\udc00"#,
            r#"\ude00\ud83d"#,
            r#"\u00g0"#,
            r#"\u00e"#,
            r#"\x41"#,
            r#"\'"#,
            "tab\there",
            "new\nline",
        ] {
            let text = edit(
                HEAD,
                r#""writer":"5f0c2a9e8b7d6c41""#,
                &format!(r#""writer":"{bad}""#),
            );
            json_error(head(&text));
        }
    }

    /// Object keys are printable ASCII (as every derived key is): others are
    /// refused while reading, so no error message can carry a control byte
    /// from the network.
    #[test]
    fn object_keys_outside_printable_ascii_are_refused() {
        let golden_key = r#""key":"snapshots/00000000000000000139-7.wsnap""#;
        for bad in [r"s\n\u001b[2Jx", "s x", r"\u00e9", r"a\u0000"] {
            let text = well_formed(HEAD, golden_key, &format!(r#""key":"{bad}""#));
            let msg = json_error(head(&text));
            assert!(!msg.bytes().any(|b| b.is_ascii_control()), "{msg}");
        }
        let text = well_formed(
            &head_with_tail(),
            r#""segments":[{"key":"segments/"#,
            r#""segments":[{"key":"x\n\u001b[2J","k2":"segments/"#,
        );
        json_error(head(&text));
        let tail_key = head_with_tail();
        let at = tail_key.find(r#""tail":[{"key":""#).unwrap() + r#""tail":[{"key":""#.len();
        let text = format!(r"{}x\n{}", &tail_key[..at], &tail_key[at..]);
        let msg = json_error(head(&text));
        assert!(!msg.bytes().any(|b| b.is_ascii_control()), "{msg}");
    }

    #[test]
    fn a_member_given_twice_keeps_its_last_value() {
        let text = edit(
            HEAD,
            r#""generation":42,"#,
            r#""generation":41,"generation":42,"#,
        );
        assert_eq!(head(&text).unwrap(), golden());
        let text = edit(
            HEAD,
            r#""generation":42,"#,
            r#""generation":42,"generation":43,"#,
        );
        assert_eq!(head(&text).unwrap().generation, 43);
    }

    /// A segment entry's `index` is a sample of at most
    /// [`super::super::CATALOG_INDEX_SAMPLE`] entries: one more is refused
    /// where it starts, before it is held.
    #[test]
    fn an_index_sample_past_sixteen_entries_is_refused_where_it_starts() {
        let old = "[[100,32],[102,298],[109,555],[117,841],[124,1098],[132,1384],[139,1641]]";
        let sample = |n: u64| {
            let entries: Vec<String> = (0..n)
                .map(|i| format!("[{},{}]", 100 + i, 32 + 100 * i))
                .collect();
            format!("[{}]", entries.join(","))
        };
        let text = well_formed(HEAD, old, &sample(16));
        let h = head(&text).expect("16 entries");
        assert_eq!(h.segments[0].index.len(), 16);
        let text = well_formed(HEAD, old, &sample(17));
        let at = text.find("[116,1632]").unwrap();
        let msg = json_error(head(&text));
        assert!(msg.contains(&format!("at offset {at}")), "{msg}");
    }

    /// A digest member whose value is not a digest is refused where it
    /// stands, while parsing: a page of many members such as `"":""` (six
    /// bytes each) used to be collected whole, some fifteen times its
    /// size in memory, before the digests were checked.
    #[test]
    fn a_digest_member_that_is_not_a_digest_is_refused_at_its_offset() {
        let digest = "0".repeat(64);
        let text = PAGE.replacen('{', &format!(r#"{{"digests":{{"a":"{digest}"}},"#), 1);
        super::page(text.as_bytes()).expect("a well-formed digest parses");
        for bad in [r#""""#, r#""00""#, &format!(r#""{}""#, "A".repeat(64))] {
            let text = PAGE.replacen(
                '{',
                &format!(r#"{{"digests":{{"":"{digest}","b": {bad}}},"#),
                1,
            );
            let at = text.find(&format!(r#""b": {bad}"#)).unwrap() + 5;
            let msg = json_error(super::page(text.as_bytes()));
            assert!(msg.contains(&format!("at offset {at}")), "{bad}: {msg}");
        }
    }

    /// Digests are written in strictly ascending key order; a member out
    /// of that order, or repeated, is refused at its value.
    #[test]
    fn digest_members_out_of_order_or_repeated_are_refused() {
        let d = "0".repeat(64);
        let with = |members: &str| PAGE.replacen('{', &format!(r#"{{"digests":{{{members}}},"#), 1);
        let ok = with(&format!(r#""a":"{d}","b":"{d}","ba":"{d}""#));
        let p = super::page(ok.as_bytes()).expect("ascending keys parse");
        assert_eq!(p.digests.keys().collect::<Vec<_>>(), ["a", "b", "ba"]);
        for members in [
            format!(r#""b":"{d}","a":"{d}""#),
            format!(r#""a":"{d}","a":"{d}""#),
        ] {
            let text = with(&members);
            let at = text.rfind(&format!(r#":"{d}""#)).unwrap() + 1;
            let msg = json_error(super::page(text.as_bytes()));
            assert!(msg.contains(&format!("at offset {at}")), "{members}: {msg}");
        }
    }
}
