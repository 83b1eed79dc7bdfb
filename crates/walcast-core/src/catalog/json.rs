//! Decoding the catalog's JSON (heads and pages) into its types.
//!
//! The catalog is parsed with `miniserde`, whose JSON reader is small enough
//! for the wasm module (one parser with no per-type code paths), into plain
//! mirror structs that say which members are optional; the conversion to the
//! public types below is where defaults are filled in. Encoding stays with
//! `serde_json` (`Serialize` on the public types), so the bytes the
//! publisher writes are unchanged.
//!
//! What the reader accepts: one JSON object (RFC 8259) in UTF-8, with
//! nothing after it but whitespace. Unknown members are ignored, as the
//! compatibility rules in `docs/FORMAT.md` require; a member given twice
//! keeps its last value. Integers must fit their field (`u32` or `u64`):
//! fractions, exponents, negative numbers and `null` for a required member
//! are refused. Nesting depth costs no stack (the reader keeps its own).

use std::collections::BTreeMap;

use miniserde::Deserialize;

use super::{
    DatasetId, DeltaEntry, Head, Page, PageRef, Retired, SegmentEntry, SnapshotEntry, TailSegment,
};
use crate::error::DecodeError;
use crate::segment::IndexEntry;
use crate::trust::{HeadTrust, KeyEndorsement};

/// Parses `bytes` as one JSON value of type `T`; `what` names the object in
/// the error ("catalog head", "catalog page").
fn parse<T: Deserialize>(what: &str, bytes: &[u8]) -> Result<T, DecodeError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        DecodeError::Json(format!(
            "{what} is not UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })?;
    miniserde::json::from_str(text).map_err(|_| {
        DecodeError::Json(format!(
            "{what} is not a JSON object of the catalog's shape (malformed JSON, a \
             required member missing, or a member of the wrong type or range)"
        ))
    })
}

/// The catalog format version a head or page declares, read before anything
/// else so that a newer format is refused as such.
pub(super) fn format_of(what: &str, bytes: &[u8]) -> Result<u32, DecodeError> {
    #[derive(Deserialize)]
    struct Probe {
        format: u32,
    }
    parse::<Probe>(what, bytes).map(|p| p.format)
}

#[derive(Deserialize)]
struct SegmentJson {
    key: String,
    epoch: u64,
    first_lsn: u64,
    last_lsn: u64,
    size: u64,
    crc32: u32,
    records_end: u64,
    index: Vec<(u64, u64)>,
}

impl From<SegmentJson> for SegmentEntry {
    fn from(s: SegmentJson) -> Self {
        SegmentEntry {
            key: s.key,
            epoch: s.epoch,
            first_lsn: s.first_lsn,
            last_lsn: s.last_lsn,
            size: s.size,
            crc32: s.crc32,
            records_end: s.records_end,
            index: s.index.into_iter().map(IndexEntry::from).collect(),
        }
    }
}

#[derive(Deserialize)]
struct SnapshotJson {
    key: String,
    lsn: u64,
    epoch: u64,
    size: u64,
    crc32: u32,
    entries: u64,
    version: Option<u16>,
}

#[derive(Deserialize)]
struct DeltaJson {
    key: String,
    base_lsn: u64,
    lsn: u64,
    epoch: u64,
    size: u64,
    crc32: u32,
    entries: u64,
    suffix_len: u64,
}

#[derive(Deserialize)]
struct PageRefJson {
    key: String,
    level: u32,
    first_lsn: u64,
    last_lsn: u64,
    count: u32,
    crc32: u32,
}

impl From<PageRefJson> for PageRef {
    fn from(p: PageRefJson) -> Self {
        PageRef {
            key: p.key,
            level: p.level,
            first_lsn: p.first_lsn,
            last_lsn: p.last_lsn,
            count: p.count,
            crc32: p.crc32,
        }
    }
}

#[derive(Deserialize)]
struct TailJson {
    key: String,
    body: String,
}

#[derive(Deserialize)]
struct RetiredJson {
    key: String,
    since_ms: u64,
}

#[derive(Deserialize)]
struct EndorsementJson {
    key: String,
    by: String,
    signature: String,
}

#[derive(Deserialize)]
struct TrustJson {
    signer: String,
    chain: Option<Vec<EndorsementJson>>,
    digests: Option<BTreeMap<String, String>>,
    index_digests: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct HeadJson {
    format: u32,
    dataset_id: String,
    epoch: u64,
    generation: u64,
    committed_lsn: u64,
    earliest_lsn: u64,
    writer: Option<String>,
    committed_at_ms: Option<u64>,
    snapshot: Option<SnapshotJson>,
    segments: Vec<SegmentJson>,
    pages: Option<Vec<PageRefJson>>,
    retired: Option<Vec<RetiredJson>>,
    deltas: Option<Vec<DeltaJson>>,
    tail: Option<Vec<TailJson>>,
    trust: Option<TrustJson>,
}

#[derive(Deserialize)]
struct PageJson {
    format: u32,
    level: u32,
    segments: Option<Vec<SegmentJson>>,
    pages: Option<Vec<PageRefJson>>,
    digests: Option<BTreeMap<String, String>>,
}

fn list<J, T: From<J>>(v: Option<Vec<J>>) -> Vec<T> {
    v.unwrap_or_default().into_iter().map(T::from).collect()
}

/// Parses a head's JSON (its checksum already verified by the caller).
pub(super) fn head(bytes: &[u8]) -> Result<Head, DecodeError> {
    use base64::Engine as _;
    let h: HeadJson = parse("catalog head", bytes)?;
    let tail = h
        .tail
        .unwrap_or_default()
        .into_iter()
        .map(|t| {
            let body = base64::engine::general_purpose::STANDARD
                .decode(t.body.as_bytes())
                .map_err(|e| {
                    DecodeError::Json(format!("tail body of {} is not base64: {e}", t.key))
                })?;
            Ok(TailSegment { key: t.key, body })
        })
        .collect::<Result<Vec<_>, DecodeError>>()?;
    Ok(Head {
        format: h.format,
        dataset_id: h.dataset_id.parse::<DatasetId>()?,
        epoch: h.epoch,
        generation: h.generation,
        committed_lsn: h.committed_lsn,
        earliest_lsn: h.earliest_lsn,
        writer: h.writer.unwrap_or_default(),
        committed_at_ms: h.committed_at_ms.unwrap_or_default(),
        snapshot: h.snapshot.map(|s| SnapshotEntry {
            key: s.key,
            lsn: s.lsn,
            epoch: s.epoch,
            size: s.size,
            crc32: s.crc32,
            entries: s.entries,
            version: s.version.unwrap_or(1),
        }),
        segments: h.segments.into_iter().map(SegmentEntry::from).collect(),
        pages: list(h.pages),
        retired: h
            .retired
            .unwrap_or_default()
            .into_iter()
            .map(|r| Retired {
                key: r.key,
                since_ms: r.since_ms,
            })
            .collect(),
        deltas: h
            .deltas
            .unwrap_or_default()
            .into_iter()
            .map(|d| DeltaEntry {
                key: d.key,
                base_lsn: d.base_lsn,
                lsn: d.lsn,
                epoch: d.epoch,
                size: d.size,
                crc32: d.crc32,
                entries: d.entries,
                suffix_len: d.suffix_len,
            })
            .collect(),
        tail,
        trust: h.trust.map(|t| HeadTrust {
            signer: t.signer,
            chain: t
                .chain
                .unwrap_or_default()
                .into_iter()
                .map(|e| KeyEndorsement {
                    key: e.key,
                    by: e.by,
                    signature: e.signature,
                })
                .collect(),
            digests: t.digests.unwrap_or_default(),
            index_digests: t.index_digests.unwrap_or_default(),
        }),
    })
}

/// Parses a page's JSON (its checksum already verified by the caller).
pub(crate) fn page(bytes: &[u8]) -> Result<Page, DecodeError> {
    let p: PageJson = parse("catalog page", bytes)?;
    Ok(Page {
        format: p.format,
        level: p.level,
        segments: list(p.segments),
        pages: list(p.pages),
        digests: p.digests.unwrap_or_default(),
    })
}
