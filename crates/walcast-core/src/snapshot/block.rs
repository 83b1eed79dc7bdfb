//! Blocks of a block-indexed snapshot (format version 2): sorted entries with
//! prefix-compressed keys and restart points, framed by a 12-byte header that
//! carries the block's checksum. Data blocks and index blocks share this
//! codec; an index entry's value is a [`BlockHandle`]. See `docs/FORMAT.md`.

use crate::codec::{invalid, le32, le64, put_varint, Reader};
use crate::error::DecodeError;

/// Bytes of a block header: `len: u32, count: u32, crc: u32`.
pub const BLOCK_HEADER_LEN: u64 = 12;
/// Entries between restart points (a restart stores its key whole).
pub const RESTART_INTERVAL: usize = 16;
/// Largest block body accepted. Writers close a block before an entry that
/// would take it past this ([`BlockBuilder::fits`]); an entry that passes
/// it alone (a value over about 32 MiB; a batch takes up to 64 MiB) makes
/// the block too wide ([`BlockBuilder::too_wide`]), and the writer writes
/// another layout (version 1 snapshots, whose chunks take 64 MiB).
pub const MAX_BLOCK_LEN: u64 = 32 << 20;
/// Bytes of an encoded [`BlockHandle`].
pub const HANDLE_LEN: usize = 16;

/// Where a block lives in the file, and the checksum it must carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHandle {
    /// Offset of the block header in the file.
    pub offset: u64,
    /// Bytes of the whole block, header included.
    pub len: u32,
    /// The block's checksum, as its header must state it.
    pub crc: u32,
}

impl BlockHandle {
    /// The handle's 16 bytes: `offset: u64, len: u32, crc: u32`, little-endian.
    pub fn encode(&self) -> [u8; HANDLE_LEN] {
        let mut b = [0u8; HANDLE_LEN];
        b[..8].copy_from_slice(&self.offset.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..].copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    /// The fields of a handle's 16 bytes, unchecked (`bytes` holds at
    /// least [`HANDLE_LEN`]).
    pub(crate) fn fields(bytes: &[u8]) -> BlockHandle {
        BlockHandle {
            offset: le64(bytes, 0),
            len: le32(bytes, 8),
            crc: le32(bytes, 12),
        }
    }

    /// Parses a handle found at byte `at`.
    pub fn decode(bytes: &[u8], at: u64) -> Result<BlockHandle, DecodeError> {
        if bytes.len() != HANDLE_LEN {
            return Err(invalid(
                "block handle",
                at,
                format!("{} bytes, a handle has {HANDLE_LEN}", bytes.len()),
            ));
        }
        let h = BlockHandle::fields(bytes);
        if u64::from(h.len) < BLOCK_HEADER_LEN
            || u64::from(h.len) > BLOCK_HEADER_LEN + MAX_BLOCK_LEN
        {
            return Err(invalid(
                "block handle",
                at,
                format!("block length {} outside the format's bounds", h.len),
            ));
        }
        Ok(h)
    }

    /// One past the block's last byte.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(u64::from(self.len))
    }
}

/// Builds one block from entries given in strictly ascending key order.
#[derive(Debug, Default)]
pub struct BlockBuilder {
    body: Vec<u8>,
    restarts: Vec<u32>,
    count: u32,
    last_key: Vec<u8>,
    first_key: Vec<u8>,
    /// What the entries so far decode to (as [`Block::heap_bytes`] counts).
    decoded: u64,
    /// A finished block decodes past [`decoded_limit`].
    too_wide: bool,
}

impl BlockBuilder {
    /// An empty block.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether an entry of `key_len` and `value_len` bytes keeps the block's
    /// body within [`MAX_BLOCK_LEN`] (counted as if its key shared nothing,
    /// with a restart point), or the block is empty. Writers close the
    /// block first when it does not.
    pub fn fits(&self, key_len: usize, value_len: usize) -> bool {
        let entry = (3 * 10 + 4 + key_len + value_len) as u64;
        self.count == 0 || (self.size() as u64) + entry <= MAX_BLOCK_LEN
    }

    /// Appends an entry; keys must ascend strictly (the caller's duty).
    pub fn push(&mut self, key: &[u8], value: &[u8]) {
        let shared = if self.count as usize % RESTART_INTERVAL == 0 {
            self.restarts.push(self.body.len() as u32);
            0
        } else {
            key.iter()
                .zip(&self.last_key)
                .take_while(|(a, b)| a == b)
                .count()
        };
        if self.count == 0 {
            self.first_key = key.to_vec();
        }
        put_varint(&mut self.body, shared as u64);
        put_varint(&mut self.body, (key.len() - shared) as u64);
        put_varint(&mut self.body, value.len() as u64);
        self.body.extend_from_slice(&key[shared..]);
        self.body.extend_from_slice(value);
        self.last_key.clear();
        self.last_key.extend_from_slice(key);
        self.count += 1;
        self.decoded += (key.len() + value.len()) as u64 + ENTRY_OVERHEAD;
    }

    /// Whether a block this builder finished decodes to more than readers
    /// take ([`decoded_limit`]): keys of kilobytes that share most of their
    /// bytes, in a block of megabytes; or is longer than they take
    /// ([`MAX_BLOCK_LEN`]). A writer then writes another layout.
    pub fn too_wide(&self) -> bool {
        self.too_wide
    }

    /// Entries so far.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Bytes the block would take now, header included.
    pub fn size(&self) -> usize {
        BLOCK_HEADER_LEN as usize + self.body.len() + 4 * self.restarts.len() + 4
    }

    /// The first key pushed.
    pub fn first_key(&self) -> &[u8] {
        &self.first_key
    }

    /// The block's bytes (header, entries, restarts), and its checksum; the
    /// builder is left empty.
    pub fn finish(&mut self) -> (Vec<u8>, u32) {
        let mut body = std::mem::take(&mut self.body);
        for r in &self.restarts {
            body.extend_from_slice(&r.to_le_bytes());
        }
        body.extend_from_slice(&(self.restarts.len() as u32).to_le_bytes());
        // A body past what readers take (one entry of a value over 32 MiB;
        // a top index block of thousands of 64 KiB keys, which nothing
        // closes early) is too wide too; its length may not even fit the
        // header's u32.
        self.too_wide |= body.len() as u64 > MAX_BLOCK_LEN;
        let len = body.len() as u32;
        self.too_wide |= self.decoded > decoded_limit(u64::from(len) + BLOCK_HEADER_LEN);
        self.decoded = 0;
        let count = self.count;
        let mut h = crate::crc::Hasher::new();
        h.update(&len.to_le_bytes());
        h.update(&count.to_le_bytes());
        h.update(&body);
        let crc = h.finalize();
        let mut out = Vec::with_capacity(body.len() + BLOCK_HEADER_LEN as usize);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&body);
        self.restarts.clear();
        self.count = 0;
        self.last_key.clear();
        self.first_key.clear();
        (out, crc)
    }
}

/// Bytes of memory an entry takes beyond its key and value (two `Vec`s).
const ENTRY_OVERHEAD: u64 = 48;

/// What a block's entries may decode to beyond twice its bytes on the wire
/// (prefix-compressed keys expand, up to 16 times with restart points);
/// past it the block is refused, so a hostile block cannot make a reader
/// hold far more than it fetched. Writers keep every block within it (see
/// [`BlockBuilder::too_wide`]).
pub const MAX_DECODED_EXTRA: u64 = 16 << 20;

/// What a block of `len` bytes (header included) may decode to.
pub fn decoded_limit(len: u64) -> u64 {
    MAX_DECODED_EXTRA + 2 * len
}

/// A verified block: every entry was decoded, its keys ascend strictly, and
/// its checksum matched the handle that named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// Keys and values, ascending by key.
    entries: Vec<(Vec<u8>, Vec<u8>)>,
    /// Bytes the block took on the wire.
    wire_len: u64,
}

impl Block {
    /// Decodes and verifies the block `bytes` (header included) that
    /// `handle` names. `what` names the block kind in errors.
    pub fn decode(
        bytes: &[u8],
        handle: &BlockHandle,
        what: &'static str,
    ) -> Result<Block, DecodeError> {
        let at = handle.offset;
        if bytes.len() as u64 != u64::from(handle.len) {
            return Err(DecodeError::Truncated {
                what,
                at,
                need: u64::from(handle.len),
                have: bytes.len() as u64,
            });
        }
        let mut r = Reader::new(bytes, at);
        let len = r.u32(what)?;
        let count = r.u32(what)?;
        let crc = r.u32(what)?;
        if u64::from(len) + BLOCK_HEADER_LEN != u64::from(handle.len) {
            return Err(invalid(
                what,
                at,
                format!("header says {len} bytes, the index {}", handle.len),
            ));
        }
        if crc != handle.crc {
            return Err(DecodeError::Checksum {
                what,
                at,
                stored: handle.crc,
                computed: crc,
            });
        }
        let mut h = crate::crc::Hasher::new();
        h.update(&bytes[..8]);
        h.update(&bytes[BLOCK_HEADER_LEN as usize..]);
        let computed = h.finalize();
        if computed != crc {
            return Err(DecodeError::Checksum {
                what,
                at,
                stored: crc,
                computed,
            });
        }
        let body = &bytes[BLOCK_HEADER_LEN as usize..];
        let body_at = at + BLOCK_HEADER_LEN;
        if body.len() < 4 {
            return Err(invalid(what, body_at, "no restart count"));
        }
        let nrestarts = u32::from_le_bytes(body[body.len() - 4..].try_into().unwrap_or([0; 4]));
        let restarts_len = u64::from(nrestarts) * 4 + 4;
        if restarts_len > body.len() as u64 {
            return Err(invalid(what, body_at, "restart table outside the block"));
        }
        let data_end = body.len() - restarts_len as usize;
        let want_restarts = (count as u64).div_ceil(RESTART_INTERVAL as u64);
        if u64::from(nrestarts) != want_restarts {
            return Err(invalid(
                what,
                body_at,
                format!("{nrestarts} restarts for {count} entries"),
            ));
        }
        // Prefix compression lets a small block name long keys; what it
        // may decode to is bounded, so a hostile block cannot make a reader
        // hold far more than it fetched. The cache charges what a block
        // holds decoded.
        let limit = decoded_limit(u64::from(handle.len));
        // Never reserve from a claim: at least three bytes per entry, and
        // no more entries than the decoded bound holds.
        let most = data_end / 3 + 1;
        let mut entries: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(
            (count as usize)
                .min(most)
                .min((limit / ENTRY_OVERHEAD) as usize),
        );
        let mut r = Reader::new(&body[..data_end], body_at);
        let mut key: Vec<u8> = Vec::new();
        let mut restart_i = 0usize;
        let mut decoded = 0u64;
        for i in 0..count as usize {
            let entry_at = r.offset();
            let shared = r.varint("block entry")?;
            let unshared = r.varint("block entry")?;
            let vlen = r.varint("block entry")?;
            if i % RESTART_INTERVAL == 0 {
                let stored = u32::from_le_bytes(
                    body[data_end + restart_i * 4..data_end + restart_i * 4 + 4]
                        .try_into()
                        .unwrap_or([0; 4]),
                );
                if u64::from(stored) != entry_at - body_at || shared != 0 {
                    return Err(invalid(what, entry_at, "restart point does not match"));
                }
                restart_i += 1;
            }
            if shared > key.len() as u64 {
                return Err(invalid(
                    what,
                    entry_at,
                    "shared prefix longer than the last key",
                ));
            }
            if shared.saturating_add(unshared) > crate::batch::MAX_KEY_LEN {
                return Err(invalid(
                    what,
                    entry_at,
                    format!(
                        "a key of {} bytes, above the limit of {}",
                        shared.saturating_add(unshared),
                        crate::batch::MAX_KEY_LEN
                    ),
                ));
            }
            // `vlen` is any varint (up to u64::MAX); past `limit` it fails
            // below either way, so the sum cannot overflow.
            decoded = decoded.saturating_add(shared + unshared + vlen.min(limit) + ENTRY_OVERHEAD);
            if decoded > limit {
                return Err(invalid(
                    what,
                    entry_at,
                    format!("the entries decode to more than {limit} bytes"),
                ));
            }
            let suffix = r.bytes(unshared, "block entry key")?;
            let value = r.bytes(vlen, "block entry value")?;
            let mut k = Vec::with_capacity(shared as usize + suffix.len());
            k.extend_from_slice(&key[..shared as usize]);
            k.extend_from_slice(suffix);
            if i > 0 && k <= key {
                return Err(invalid(what, entry_at, "keys do not ascend"));
            }
            key.clone_from(&k);
            entries.push((k, value.to_vec()));
        }
        if !r.is_empty() {
            return Err(invalid(what, r.offset(), "bytes after the last entry"));
        }
        Ok(Block {
            entries,
            wire_len: u64::from(handle.len),
        })
    }

    /// The entries, ascending by key.
    pub fn entries(&self) -> &[(Vec<u8>, Vec<u8>)] {
        &self.entries
    }

    /// The value stored for `key`.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.entries
            .binary_search_by(|(k, _)| k.as_slice().cmp(key))
            .ok()
            .map(|i| self.entries[i].1.as_slice())
    }

    /// Index of the first entry whose key is at or above `key`.
    pub fn lower_bound(&self, key: &[u8]) -> usize {
        self.entries.partition_point(|(k, _)| k.as_slice() < key)
    }

    /// For an index block: the child whose range holds `key` (the last entry
    /// whose first key is at or below it), if any.
    pub fn child_for(&self, key: &[u8]) -> Option<usize> {
        self.entries
            .partition_point(|(k, _)| k.as_slice() <= key)
            .checked_sub(1)
    }

    /// Bytes the block took on the wire.
    pub fn wire_len(&self) -> u64 {
        self.wire_len
    }

    /// Bytes it holds in memory, roughly.
    pub fn heap_bytes(&self) -> u64 {
        self.entries
            .iter()
            .map(|(k, v)| (k.len() + v.len()) as u64 + ENTRY_OVERHEAD)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Entries = Vec<(Vec<u8>, Vec<u8>)>;

    fn build(n: usize) -> (Vec<u8>, BlockHandle, Entries) {
        let mut b = BlockBuilder::new();
        let mut want = Vec::new();
        for i in 0..n {
            let k = format!("user:{:06}", i * 3).into_bytes();
            let v = vec![i as u8; i % 7];
            b.push(&k, &v);
            want.push((k, v));
        }
        let (bytes, crc) = b.finish();
        let h = BlockHandle {
            offset: 56,
            len: bytes.len() as u32,
            crc,
        };
        (bytes, h, want)
    }

    #[test]
    fn round_trips_and_finds_keys() {
        for n in [1, 15, 16, 17, 100] {
            let (bytes, h, want) = build(n);
            let b = Block::decode(&bytes, &h, "data block").unwrap();
            assert_eq!(b.entries(), &want[..]);
            assert_eq!(b.get(b"user:000003"), (n > 1).then_some(&[1u8][..]));
            assert_eq!(b.get(b"user:000004"), None);
            assert_eq!(b.child_for(b"a"), None);
            assert_eq!(b.child_for(b"user:000004"), Some(1.min(n - 1)));
        }
    }

    /// An entry whose value length is the largest varint (u64::MAX), in a
    /// block whose checksums are right: an error, not an overflow.
    #[test]
    fn a_value_length_of_u64_max_is_an_error() {
        let mut body = vec![0u8, 0];
        body.extend_from_slice(&[0xff; 9]);
        body.push(0x01);
        body.extend_from_slice(&0u32.to_le_bytes()); // restart 0
        body.extend_from_slice(&1u32.to_le_bytes()); // one restart
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&1u32.to_le_bytes());
        let mut h = crate::crc::Hasher::new();
        h.update(&bytes[..8]);
        h.update(&body);
        let crc = h.finalize();
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes.extend_from_slice(&body);
        let handle = BlockHandle {
            offset: 56,
            len: bytes.len() as u32,
            crc,
        };
        assert!(Block::decode(&bytes, &handle, "data block").is_err());
    }

    #[test]
    fn every_flipped_bit_is_an_error() {
        let (bytes, h, _) = build(20);
        for i in 0..bytes.len() {
            for bit in [0, 3, 7] {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(
                    Block::decode(&b, &h, "data block").is_err(),
                    "byte {i} bit {bit}"
                );
            }
        }
        assert!(Block::decode(&bytes[..bytes.len() - 1], &h, "data block").is_err());
        let other = BlockHandle {
            crc: h.crc ^ 1,
            ..h
        };
        assert!(Block::decode(&bytes, &other, "data block").is_err());
    }

    fn handle_of(b: &mut BlockBuilder) -> (Vec<u8>, BlockHandle) {
        let (bytes, crc) = b.finish();
        let h = BlockHandle {
            offset: 56,
            len: bytes.len() as u32,
            crc,
        };
        (bytes, h)
    }

    /// Keys that each extend the last: prefix compression writes a byte or
    /// so per entry (and a whole key per restart), but every key decodes
    /// whole. Past what a block may decode to, it is refused, and the
    /// writer that built it knows. A key longer than a batch may hold is
    /// refused.
    #[test]
    fn a_block_decoding_to_far_more_than_it_holds_is_refused() {
        // 8,000 keys of up to 8,000 bytes: about 32 MB decoded from a
        // block of about 1 MB.
        let mut b = BlockBuilder::new();
        let mut key = Vec::new();
        for _ in 0..8_000 {
            key.push(b'a');
            b.push(&key, b"");
        }
        let (bytes, h) = handle_of(&mut b);
        assert!(b.too_wide(), "the writer knows readers refuse it");
        let e = Block::decode(&bytes, &h, "data block").unwrap_err();
        assert!(e.to_string().contains("decode to more than"), "{e}");
        // The same shape, smaller, decodes; the cache is charged what it
        // holds decoded, not its bytes on the wire.
        let mut b = BlockBuilder::new();
        let mut key = Vec::new();
        for _ in 0..500 {
            key.push(b'a');
            b.push(&key, b"");
        }
        let (bytes, h) = handle_of(&mut b);
        assert!(!b.too_wide());
        let block = Block::decode(&bytes, &h, "data block").unwrap();
        assert!(block.heap_bytes() > 10 * block.wire_len());
        // A key longer than any batch may hold.
        let mut b = BlockBuilder::new();
        b.push(&vec![b'k'; crate::batch::MAX_KEY_LEN as usize + 1], b"v");
        let (bytes, h) = handle_of(&mut b);
        let e = Block::decode(&bytes, &h, "data block").unwrap_err();
        assert!(e.to_string().contains("above the limit"), "{e}");
    }
}
