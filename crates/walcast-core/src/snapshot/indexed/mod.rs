//! The block-indexed snapshot (format version 2): data blocks, an index of
//! them (partitioned into index blocks under a top index when large), and a
//! fixed 48-byte footer a reader finds with one suffix range GET. A point
//! read fetches the footer, the top index, at most one index block and one
//! data block, and verifies each before use. See `docs/FORMAT.md`.
//!
//! [`LazySnapshot`] is the pure point reader: ask it for a key and it answers
//! with a value, or with the byte range it needs next ("need more bytes" is a
//! value, not an error).
//!
//! Here: the format's constants, block handles and the footer; `encode.rs`
//! writes a snapshot, `decode.rs` reads a whole one (and checks the index a
//! streaming reader met), `lazy.rs` reads one by blocks.

mod decode;
mod encode;
mod lazy;
#[cfg(test)]
mod tests;

pub use self::decode::decode_indexed;
pub(crate) use self::decode::verify_index;
pub use self::encode::{encode_indexed, encode_readable, encode_verified};
pub use self::lazy::{LazySnapshot, Lookup, Need, ScanCursor};

use crate::vecmap::VecMap;

use sha2::{Digest, Sha256};

use super::block::{Block, BlockBuilder, BlockHandle, HANDLE_LEN};
use super::{SnapshotHeader, HEADER_LEN, MAGIC};
use crate::catalog::DatasetId;
use crate::codec::{invalid, le32, le64};
use crate::error::DecodeError;
use crate::state::KvState;

/// Version of the block-indexed snapshot.
pub const VERSION_INDEXED: u16 = 2;
/// Version of the block-indexed snapshot whose handles carry each block's
/// SHA-256 (verified lazy reads of signed datasets).
pub const VERSION_VERIFIED: u16 = 4;
/// Bytes of the footer (version 2).
pub const FOOTER_LEN: u64 = 48;
/// Bytes of the footer of version 4.
pub const FOOTER_LEN_V4: u64 = 80;
/// Magic at the end of a block-indexed snapshot (version 2).
pub const FOOTER_MAGIC: [u8; 4] = *b"WCS2";
/// Magic at the end of a version 4 snapshot.
pub const FOOTER_MAGIC_V4: [u8; 4] = *b"WCS4";
/// Bytes of a version 4 handle: the 16 bytes of version 2, then the
/// block's SHA-256.
pub const DIGEST_HANDLE_LEN: usize = HANDLE_LEN + 32;

/// The SHA-256 of `bytes`.
fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Checks `bytes` against `digest` when there is one.
fn verify_digest(
    bytes: &[u8],
    digest: Option<&[u8; 32]>,
    what: &'static str,
    at: u64,
) -> Result<(), DecodeError> {
    match digest {
        Some(d) if sha256(bytes) != *d => Err(DecodeError::Digest { what, at }),
        _ => Ok(()),
    }
}

/// Bytes of the footer a file's last bytes `tail` end with: the magic in
/// the last 4 bytes says the version (a version 2 footer otherwise).
pub fn footer_len(tail: &[u8]) -> u64 {
    if tail.len() >= 4 && tail[tail.len() - 4..] == FOOTER_MAGIC_V4 {
        FOOTER_LEN_V4
    } else {
        FOOTER_LEN
    }
}

/// The CRC-32 of a block-indexed file's footer fields (its last
/// [`footer_len`] bytes but the checksum and magic that end them: the
/// footer's own checksum: a CRC over that checksum too is the same for
/// every footer), which catalog entries record; `file` may be any suffix.
pub fn footer_crc32(file: &[u8]) -> u32 {
    let flen = usize::try_from(footer_len(file)).unwrap_or(usize::MAX);
    let end = file.len().saturating_sub(8);
    crate::crc::hash(&file[file.len().saturating_sub(flen).min(end)..end])
}

/// A block-indexed file's last bytes from its top index block on (the top
/// index and the footer): what a lazy reader's first suffix read needs.
/// `None` when the file has no valid footer.
pub fn top_suffix(file: &[u8]) -> Option<&[u8]> {
    let flen = usize::try_from(footer_len(file)).ok()?;
    let fb = file.get(file.len().checked_sub(flen)?..)?;
    let footer = Footer::decode(fb, file.len() as u64).ok()?;
    file.get(usize::try_from(footer.top.offset).ok()?..)
}

/// An index entry's value: a handle, with the block's SHA-256 in version 4.
fn encode_handle(h: &BlockHandle, digest: Option<&[u8; 32]>) -> Vec<u8> {
    let mut v = h.encode().to_vec();
    if let Some(d) = digest {
        v.extend_from_slice(d);
    }
    v
}

/// Parses an index entry's value found at byte `at`: 16 bytes, or 48 with
/// the block's SHA-256 when `digests` (version 4).
pub fn decode_handle(
    bytes: &[u8],
    at: u64,
    digests: bool,
) -> Result<(BlockHandle, Option<[u8; 32]>), DecodeError> {
    if !digests {
        return Ok((BlockHandle::decode(bytes, at)?, None));
    }
    if bytes.len() != DIGEST_HANDLE_LEN {
        return Err(invalid(
            "block handle",
            at,
            format!(
                "{} bytes, a version 4 handle has {DIGEST_HANDLE_LEN}",
                bytes.len()
            ),
        ));
    }
    let h = BlockHandle::decode(&bytes[..HANDLE_LEN], at)?;
    let mut d = [0u8; 32];
    d.copy_from_slice(&bytes[HANDLE_LEN..]);
    Ok((h, Some(d)))
}

/// The digest a signed head records for a version 4 snapshot
/// (`trust.index_digests`): the SHA-256 of the top index block followed by
/// the footer, the file's last `top.len + 80` bytes. `None` for a file
/// that is not a well-formed version 4 snapshot.
pub fn index_digest(file: &[u8]) -> Option<[u8; 32]> {
    let size = file.len() as u64;
    if footer_len(file) != FOOTER_LEN_V4 || size < FOOTER_LEN_V4 {
        return None;
    }
    let footer = Footer::decode(&file[(size - FOOTER_LEN_V4) as usize..], size).ok()?;
    Some(sha256(&file[footer.top.offset as usize..]))
}
/// Default target bytes of a data block.
pub const DEFAULT_BLOCK_BYTES: usize = 16 << 10;
/// Default target bytes of an index block.
pub const DEFAULT_INDEX_BLOCK_BYTES: usize = 64 << 10;
/// Bytes a reader asks for in its first suffix GET: the footer and, for all
/// but huge snapshots, the whole top index.
pub const SUFFIX_GUESS: u64 = 64 << 10;

/// Block sizes for [`encode_indexed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexedOptions {
    /// Target bytes of a data block.
    pub block_bytes: usize,
    /// Target bytes of an index block.
    pub index_block_bytes: usize,
}

impl Default for IndexedOptions {
    fn default() -> Self {
        IndexedOptions {
            block_bytes: DEFAULT_BLOCK_BYTES,
            index_block_bytes: DEFAULT_INDEX_BLOCK_BYTES,
        }
    }
}

/// The footer of a block-indexed snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    /// End of the data blocks, start of the index blocks.
    pub index_offset: u64,
    /// The top index block.
    pub top: BlockHandle,
    /// Entries in the snapshot.
    pub entry_count: u64,
    /// Data blocks in the snapshot.
    pub data_blocks: u32,
    /// 1: the top index names data blocks; 2: it names index blocks, which
    /// name data blocks.
    pub levels: u8,
    /// Version 4: the SHA-256 of the top index block (and every handle in
    /// the index carries its block's SHA-256). `None` in version 2.
    pub top_sha256: Option<[u8; 32]>,
}

impl Footer {
    /// Bytes of this footer: 48 in version 2, 80 in version 4.
    pub fn wire_len(&self) -> u64 {
        if self.top_sha256.is_some() {
            FOOTER_LEN_V4
        } else {
            FOOTER_LEN
        }
    }

    /// Whether the footer is of version 4 (handles carry digests).
    pub fn has_digests(&self) -> bool {
        self.top_sha256.is_some()
    }

    /// The footer's bytes (48, or 80 in version 4).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(FOOTER_LEN_V4 as usize);
        b.extend_from_slice(&self.index_offset.to_le_bytes());
        b.extend_from_slice(&encode_handle(&self.top, self.top_sha256.as_ref()));
        b.extend_from_slice(&self.entry_count.to_le_bytes());
        b.extend_from_slice(&self.data_blocks.to_le_bytes());
        b.push(self.levels);
        b.extend_from_slice(&[0, 0, 0]);
        let crc = crate::crc::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b.extend_from_slice(if self.top_sha256.is_some() {
            &FOOTER_MAGIC_V4
        } else {
            &FOOTER_MAGIC
        });
        b
    }

    /// Parses the footer of a file of `size` bytes; `bytes` are its last 48
    /// (version 2) or 80 (version 4, magic `WCS4`).
    pub fn decode(bytes: &[u8], size: u64) -> Result<Footer, DecodeError> {
        let flen = footer_len(bytes);
        let digests = flen == FOOTER_LEN_V4;
        let magic = if digests {
            FOOTER_MAGIC_V4
        } else {
            FOOTER_MAGIC
        };
        let at = super::check_footer("snapshot footer", bytes, size, flen, magic)?;
        let hlen = if digests {
            DIGEST_HANDLE_LEN
        } else {
            HANDLE_LEN
        };
        // `flen` bytes, checked above: fixed offsets from here on.
        let index_offset = le64(bytes, 0);
        let (top, top_sha256) = decode_handle(&bytes[8..8 + hlen], at + 8, digests)?;
        let o = 8 + hlen;
        let entry_count = le64(bytes, o);
        let data_blocks = le32(bytes, o + 8);
        let levels = bytes[o + 12];
        let reserved = &bytes[o + 13..o + 16];
        if reserved != [0, 0, 0] || !(1..=2).contains(&levels) {
            return Err(invalid(
                "snapshot footer",
                at,
                "unknown levels or reserved bits",
            ));
        }
        let body_end = size - flen;
        if index_offset < HEADER_LEN
            || index_offset > body_end
            || top.offset < index_offset
            || top.end() != body_end
        {
            return Err(invalid(
                "snapshot footer",
                at,
                "the index lies outside the file",
            ));
        }
        Ok(Footer {
            index_offset,
            top,
            entry_count,
            data_blocks,
            levels,
            top_sha256,
        })
    }
}

/// Parses a 56-byte snapshot header of version 2 or 4.
pub fn decode_indexed_header(bytes: &[u8]) -> Result<SnapshotHeader, DecodeError> {
    super::decode_header_of(
        bytes,
        "block-indexed snapshot",
        &[VERSION_INDEXED, VERSION_VERIFIED],
    )
}

/// Whether `bytes` (at least the first 6 of a snapshot) are version 2 or 4.
pub fn is_indexed(bytes: &[u8]) -> bool {
    bytes.len() >= 6
        && bytes[..4] == MAGIC
        && (bytes[4..6] == VERSION_INDEXED.to_le_bytes() || is_verified(bytes))
}

/// Whether `bytes` (at least the first 6 of a snapshot) are version 4.
pub fn is_verified(bytes: &[u8]) -> bool {
    bytes.len() >= 6 && bytes[..4] == MAGIC && bytes[4..6] == VERSION_VERIFIED.to_le_bytes()
}
