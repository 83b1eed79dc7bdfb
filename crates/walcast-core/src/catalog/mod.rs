//! The catalog: the mutable head (`catalog/head.json`) and immutable pages of
//! older segment entries. See `docs/FORMAT.md`.
//!
//! `head.rs` the head, `page.rs` pages, `entries.rs` what they name
//! (segments, the snapshot, deltas, page references, the tail, retired
//! objects), `keys.rs` the dataset's id and the keys the format derives,
//! `gzip.rs` heads stored gzip-compressed, `json.rs` the JSON reader.

mod entries;
mod gzip;
mod head;
pub(crate) mod json;
mod keys;
mod page;

pub use self::entries::{
    DeltaEntry, PageRef, Retired, SegmentEntry, SlotPages, SnapshotEntry, TailSegment, MAX_DELTAS,
    MAX_SEGMENT_FILTER_BYTES, MAX_SNAPSHOT_SUFFIX,
};
#[cfg(feature = "gzip")]
pub use self::gzip::gzip_head;
pub use self::gzip::{head_json, GZIP_MAGIC};
pub use self::head::Head;
use self::keys::check_key;
pub use self::keys::{delta_key, object_kind, page_key, segment_key, snapshot_key, DatasetId};
pub use self::page::Page;
use crate::error::DecodeError;
pub use crate::trust::{
    head_signature, page_signature, Digests, HeadTrust, KeyEndorsement, MAX_KEY_CHAIN,
};

/// Catalog format version written and understood by this crate.
pub const FORMAT: u32 = 1;
/// Key of the head, relative to the dataset prefix.
pub const HEAD_KEY: &str = "catalog/head.json";
/// Largest head accepted.
pub const MAX_HEAD_BYTES: usize = 1 << 20;
/// Largest page accepted.
pub const MAX_PAGE_BYTES: usize = 16 << 20;
/// Bytes of the head's checksum prefix `{"crc32":"xxxxxxxx",`.
pub const HEAD_PREFIX_LEN: usize = 20;
/// Index entries kept per segment in the catalog.
pub const CATALOG_INDEX_SAMPLE: usize = 16;
/// Most bytes of segment files the head may carry in its tail (decoded).
/// Keeps the head well under [`MAX_HEAD_BYTES`] with base64's 4/3.
pub const MAX_TAIL_BYTES: usize = 256 << 10;
/// Largest segment file a replica fetches, so that what it reads into
/// memory for one segment is bounded whatever a head claims. A catalog may
/// name a larger one (publishers before this limit wrote them): it is
/// refused when a replica would fetch it, never read, and a snapshot past
/// it still serves. A publisher seals a segment once it holds
/// [`crate::publisher::MAX_SEGMENT_SEAL_BYTES`] at most, and one record
/// ([`crate::segment::MAX_RECORD_LEN`]) can take it past that.
pub const MAX_SEGMENT_BYTES: u64 = 256 << 20;
/// Highest page level accepted. Pages fan out by 16 by default, so 16 levels
/// cover 2^64 segments, as many as LSNs exist; a deeper tree can only come
/// from a hostile store.
pub const MAX_PAGE_LEVEL: u32 = 16;

fn check_format(what: &str, bytes: &[u8]) -> Result<(), DecodeError> {
    let format = json::format_of(what, bytes)?;
    if format != FORMAT {
        return Err(DecodeError::UnsupportedVersion {
            what: "catalog",
            version: u64::from(format),
            known: u64::from(FORMAT),
        });
    }
    Ok(())
}
