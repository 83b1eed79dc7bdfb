//! The snapshot file: the full KV state at an LSN, in checksummed chunks that
//! a reader decodes as bytes arrive. See `docs/FORMAT.md`.

pub mod block;
pub mod delta;
pub mod indexed;
pub mod pointer;

use crate::catalog::DatasetId;
use crate::codec::{check_crc, invalid, le32, le64, put_len_prefixed, Reader};
use crate::error::DecodeError;
use crate::state::{KvState, SortedBuilder};

/// Magic at the start of a snapshot.
pub const MAGIC: [u8; 4] = *b"WCSN";
/// Magic of a chunk header.
pub const CHUNK_MAGIC: [u8; 4] = *b"WCCK";
/// Magic at the end of a snapshot.
pub const TRAILER_MAGIC: [u8; 4] = *b"WCSX";
/// Snapshot format version.
pub const VERSION: u16 = 1;
/// Header bytes.
pub const HEADER_LEN: u64 = 56;
/// Chunk header bytes.
pub const CHUNK_HEADER_LEN: u64 = 16;
/// Trailer bytes.
pub const TRAILER_LEN: u64 = 40;
/// Largest chunk body accepted.
pub const MAX_CHUNK_LEN: u64 = 64 << 20;
/// Default target bytes of entries per chunk.
pub const DEFAULT_CHUNK_BYTES: usize = 256 << 10;

/// The header of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// The state includes every LSN up to and including this one.
    pub lsn: u64,
    /// Epoch of the writer that made it (0 for a replica's local copy).
    pub epoch: u64,
    /// Dataset the state belongs to.
    pub dataset_id: DatasetId,
    /// Number of entries.
    pub entry_count: u64,
}

/// Checks the frame of a footer that ends a file of `size` bytes (`bytes`
/// are its last `len`): its length, then its last 4 bytes (`magic`), then
/// the CRC-32 before them, of the bytes before that. Returns the footer's
/// offset in the file.
pub(crate) fn check_footer(
    what: &'static str,
    bytes: &[u8],
    size: u64,
    len: u64,
    magic: [u8; 4],
) -> Result<u64, DecodeError> {
    let at = size.saturating_sub(len);
    let n = bytes.len();
    if n as u64 != len || size < HEADER_LEN + len || n < 8 {
        return Err(DecodeError::Truncated {
            what,
            at,
            need: len,
            have: n as u64,
        });
    }
    let mut found = [0u8; 4];
    found.copy_from_slice(&bytes[n - 4..]);
    if found != magic {
        return Err(DecodeError::BadMagic {
            what,
            at: at + len - 4,
            expected: magic,
            found,
        });
    }
    check_crc(what, at, le32(bytes, n - 8), &bytes[..n - 8])?;
    Ok(at)
}

/// The 56-byte header every snapshot version starts with (FORMAT.md):
/// magic, `version`, reserved, `lsn`, `epoch`, the dataset id, `entries`,
/// reserved, and the CRC-32 of the bytes before it.
pub(crate) fn encode_header(
    version: u16,
    lsn: u64,
    epoch: u64,
    dataset_id: DatasetId,
    entries: u64,
) -> Vec<u8> {
    let mut head = Vec::with_capacity(HEADER_LEN as usize);
    head.extend_from_slice(&MAGIC);
    head.extend_from_slice(&version.to_le_bytes());
    head.extend_from_slice(&0u16.to_le_bytes());
    head.extend_from_slice(&lsn.to_le_bytes());
    head.extend_from_slice(&epoch.to_le_bytes());
    head.extend_from_slice(&dataset_id.0);
    head.extend_from_slice(&entries.to_le_bytes());
    head.extend_from_slice(&0u32.to_le_bytes());
    let crc = crate::crc::hash(&head);
    head.extend_from_slice(&crc.to_le_bytes());
    head
}

/// Encodes `state` as a snapshot at `lsn`.
pub fn encode(state: &KvState, lsn: u64, epoch: u64, dataset_id: DatasetId) -> Vec<u8> {
    encode_with_chunk_bytes(state, lsn, epoch, dataset_id, DEFAULT_CHUNK_BYTES)
}

/// Like [`encode`] with a custom chunk size.
pub fn encode_with_chunk_bytes(
    state: &KvState,
    lsn: u64,
    epoch: u64,
    dataset_id: DatasetId,
    chunk_bytes: usize,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(state.heap_bytes() + 4096);
    encode_to(state, lsn, epoch, dataset_id, chunk_bytes, &mut |b| {
        out.extend_from_slice(b)
    });
    out
}

/// Encodes `state` as a snapshot at `lsn`, handing the bytes to `emit` in
/// order, one chunk at a time: the same bytes as [`encode_with_chunk_bytes`]
/// without holding the whole snapshot in memory (a replica writing its local
/// checkpoint streams it to a file this way).
pub fn encode_to(
    state: &KvState,
    lsn: u64,
    epoch: u64,
    dataset_id: DatasetId,
    chunk_bytes: usize,
    emit: &mut dyn FnMut(&[u8]),
) {
    let head = encode_header(VERSION, lsn, epoch, dataset_id, state.len());
    emit(&head);
    let mut written = head.len() as u64;

    let mut index: Vec<(u64, u32, u32)> = Vec::new();
    let mut body = Vec::with_capacity(chunk_bytes + 1024);
    let mut count = 0u32;
    let mut flush = |body: &mut Vec<u8>, count: &mut u32, written: &mut u64| {
        if *count == 0 {
            return;
        }
        let len = body.len() as u32;
        let mut h = crate::crc::Hasher::new();
        h.update(&count.to_le_bytes());
        h.update(&len.to_le_bytes());
        h.update(body);
        let mut ch = [0u8; 16];
        ch[..4].copy_from_slice(&CHUNK_MAGIC);
        ch[4..8].copy_from_slice(&count.to_le_bytes());
        ch[8..12].copy_from_slice(&len.to_le_bytes());
        ch[12..16].copy_from_slice(&h.finalize().to_le_bytes());
        emit(&ch);
        emit(body);
        index.push((*written, *count, len));
        *written += (ch.len() + body.len()) as u64;
        body.clear();
        *count = 0;
    };
    let mut entries = state.iter();
    while let Some((k, v)) = entries.next_entry() {
        // A chunk is closed once it holds `chunk_bytes`, and before an
        // entry that would take it past what readers take (one entry a
        // batch holds fits alone).
        if body.len() >= chunk_bytes
            || (body.len() + 2 * 10 + k.len() + v.len()) as u64 > MAX_CHUNK_LEN
        {
            flush(&mut body, &mut count, &mut written);
        }
        put_len_prefixed(&mut body, k);
        put_len_prefixed(&mut body, v);
        count += 1;
    }
    flush(&mut body, &mut count, &mut written);

    let index_offset = written;
    let mut tail = Vec::with_capacity(index.len() * 16 + 64);
    for (offset, count, len) in &index {
        tail.extend_from_slice(&offset.to_le_bytes());
        tail.extend_from_slice(&count.to_le_bytes());
        tail.extend_from_slice(&len.to_le_bytes());
    }
    let index_crc = crate::crc::hash(&tail);
    let tstart = tail.len();
    tail.extend_from_slice(&index_offset.to_le_bytes());
    tail.extend_from_slice(&state.len().to_le_bytes());
    tail.extend_from_slice(&(index.len() as u32).to_le_bytes());
    tail.extend_from_slice(&index_crc.to_le_bytes());
    tail.extend_from_slice(&0u64.to_le_bytes());
    let tcrc = crate::crc::hash(&tail[tstart..]);
    tail.extend_from_slice(&tcrc.to_le_bytes());
    tail.extend_from_slice(&TRAILER_MAGIC);
    emit(&tail);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Header,
    Chunks,
    Tail,
    Done,
    /// Version 2: data blocks until the header's entry count is reached.
    Blocks,
    /// Version 2: the index blocks and footer, checked by `finish`.
    IndexTail,
}

/// Decodes a snapshot incrementally: [`feed`](Self::feed) bytes in order as
/// they arrive, then [`finish`](Self::finish). Memory is bounded by one chunk
/// plus the state being built.
#[derive(Debug)]
pub struct SnapshotDecoder {
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    at: u64,
    phase: Phase,
    hasher: crate::crc::Hasher,
    header: Option<SnapshotHeader>,
    builder: SortedBuilder,
    chunks: Vec<(u64, u32, u32)>,
    /// Version 2: the first key and handle of every data block read.
    blocks: Vec<(Vec<u8>, block::BlockHandle)>,
    /// Version 4: the SHA-256 of every data block read (`None` otherwise).
    digests: Option<Vec<[u8; 32]>>,
    total: u64,
}

impl Default for SnapshotDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl SnapshotDecoder {
    /// A decoder at the start of a snapshot.
    pub fn new() -> Self {
        SnapshotDecoder {
            buf: Vec::new(),
            at: 0,
            phase: Phase::Header,
            hasher: crate::crc::Hasher::new(),
            header: None,
            builder: SortedBuilder::default(),
            chunks: Vec::new(),
            blocks: Vec::new(),
            digests: None,
            total: 0,
        }
    }

    /// Bytes fed so far (the offset the next byte has in the file).
    pub fn position(&self) -> u64 {
        self.total
    }

    /// The header, once decoded.
    pub fn header(&self) -> Option<&SnapshotHeader> {
        self.header.as_ref()
    }

    /// Feeds the next bytes of the file.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), DecodeError> {
        if self.phase == Phase::Done && !bytes.is_empty() {
            return Err(invalid("snapshot", self.total, "bytes after the trailer"));
        }
        self.hasher.update(bytes);
        self.total += bytes.len() as u64;
        self.buf.extend_from_slice(bytes);
        let mut used = 0usize;
        loop {
            let avail = &self.buf[used..];
            let at = self.at + used as u64;
            match self.phase {
                Phase::Header => {
                    if (avail.len() as u64) < HEADER_LEN {
                        break;
                    }
                    let header_bytes = &avail[..HEADER_LEN as usize];
                    let v2 = indexed::is_indexed(header_bytes);
                    if indexed::is_verified(header_bytes) {
                        self.digests = Some(Vec::new());
                    }
                    self.header = Some(if v2 {
                        indexed::decode_indexed_header(header_bytes)?
                    } else {
                        decode_header_of(header_bytes, "snapshot", &[VERSION])?
                    });
                    used += HEADER_LEN as usize;
                    let empty = self.header.is_some_and(|h| h.entry_count == 0);
                    self.phase = match (v2, empty) {
                        (false, true) => Phase::Tail,
                        (false, false) => Phase::Chunks,
                        (true, true) => Phase::IndexTail,
                        (true, false) => Phase::Blocks,
                    };
                }
                Phase::Blocks => {
                    if (avail.len() as u64) < block::BLOCK_HEADER_LEN {
                        break;
                    }
                    let mut r = Reader::new(avail, at);
                    let len = r.u32("snapshot data block")?;
                    let _count = r.u32("snapshot data block")?;
                    let crc = r.u32("snapshot data block")?;
                    if u64::from(len) > block::MAX_BLOCK_LEN {
                        return Err(DecodeError::TooLarge {
                            what: "snapshot data block",
                            at,
                            len: u64::from(len),
                            limit: block::MAX_BLOCK_LEN,
                        });
                    }
                    let need = block::BLOCK_HEADER_LEN + u64::from(len);
                    if (avail.len() as u64) < need {
                        break;
                    }
                    let handle = block::BlockHandle {
                        offset: at,
                        len: need as u32,
                        crc,
                    };
                    let b = block::Block::decode(
                        &avail[..need as usize],
                        &handle,
                        "snapshot data block",
                    )?;
                    let Some((first, _)) = b.entries().first() else {
                        return Err(invalid("snapshot data block", at, "an empty data block"));
                    };
                    self.blocks.push((first.clone(), handle));
                    if let Some(ds) = self.digests.as_mut() {
                        use sha2::Digest;
                        ds.push(sha2::Sha256::digest(&avail[..need as usize]).into());
                    }
                    for (k, v) in b.entries() {
                        if !self.builder.push(k, v) {
                            return Err(invalid(
                                "snapshot data block",
                                at,
                                "keys not strictly ascending",
                            ));
                        }
                    }
                    used += need as usize;
                    let expected = self.header.map_or(0, |h| h.entry_count);
                    if self.builder.count() > expected {
                        return Err(invalid(
                            "snapshot",
                            at,
                            "more entries than the header declares",
                        ));
                    }
                    if self.builder.count() == expected {
                        self.phase = Phase::IndexTail;
                    }
                }
                // Kept whole until `finish`: the index is a small part of
                // the file, and only the end of the input says where the
                // footer starts.
                Phase::IndexTail => break,
                Phase::Chunks => {
                    if (avail.len() as u64) < CHUNK_HEADER_LEN {
                        break;
                    }
                    let mut r = Reader::new(avail, at);
                    r.magic(&CHUNK_MAGIC, "snapshot chunk")?;
                    let count = r.u32("snapshot chunk")?;
                    let len = r.u32("snapshot chunk")?;
                    let stored = r.u32("snapshot chunk")?;
                    if u64::from(len) > MAX_CHUNK_LEN {
                        return Err(DecodeError::TooLarge {
                            what: "snapshot chunk",
                            at: at + 8,
                            len: u64::from(len),
                            limit: MAX_CHUNK_LEN,
                        });
                    }
                    if count == 0 || u64::from(count) > u64::from(len) / 2 {
                        return Err(invalid(
                            "snapshot chunk",
                            at + 4,
                            format!("{count} entries cannot fit {len} bytes"),
                        ));
                    }
                    let need = (CHUNK_HEADER_LEN + u64::from(len)) as usize;
                    if avail.len() < need {
                        break;
                    }
                    let mut h = crate::crc::Hasher::new();
                    h.update(&avail[4..12]);
                    h.update(&avail[16..need]);
                    let computed = h.finalize();
                    if computed != stored {
                        return Err(DecodeError::Checksum {
                            what: "snapshot chunk",
                            at,
                            stored,
                            computed,
                        });
                    }
                    let mut er = Reader::new(&avail[16..need], at + 16);
                    for _ in 0..count {
                        let eat = er.offset();
                        let k = er.len_prefixed("snapshot key", crate::batch::MAX_KEY_LEN)?;
                        let v = er.len_prefixed("snapshot value", crate::batch::MAX_VALUE_LEN)?;
                        if !self.builder.push(k, v) {
                            return Err(invalid(
                                "snapshot entry",
                                eat,
                                "keys not strictly ascending",
                            ));
                        }
                    }
                    if !er.is_empty() {
                        return Err(invalid(
                            "snapshot chunk",
                            er.offset(),
                            "bytes after the chunk's entries",
                        ));
                    }
                    self.chunks.push((at, count, len));
                    used += need;
                    let expected = self.header.map_or(0, |h| h.entry_count);
                    if self.builder.count() > expected {
                        return Err(invalid(
                            "snapshot",
                            at,
                            "more entries than the header declares",
                        ));
                    }
                    if self.builder.count() == expected {
                        self.phase = Phase::Tail;
                    }
                }
                Phase::Tail => {
                    let ilen = 16 * self.chunks.len() as u64;
                    if (avail.len() as u64) < ilen + TRAILER_LEN {
                        break;
                    }
                    let (index, rest) = avail.split_at(ilen as usize);
                    let trailer = &rest[..TRAILER_LEN as usize];
                    let mut r = Reader::new(trailer, at + ilen);
                    let index_offset = r.u64("snapshot trailer")?;
                    let entry_count = r.u64("snapshot trailer")?;
                    let chunk_count = r.u32("snapshot trailer")?;
                    let index_crc = r.u32("snapshot trailer")?;
                    let reserved = r.u64("snapshot trailer")?;
                    let tcrc = r.u32("snapshot trailer")?;
                    check_crc("snapshot trailer", at + ilen + 32, tcrc, &trailer[..32])?;
                    r.magic(&TRAILER_MAGIC, "snapshot trailer")?;
                    check_crc("snapshot index", at, index_crc, index)?;
                    if index_offset != at
                        || Some(entry_count) != self.header.map(|h| h.entry_count)
                        || chunk_count as usize != self.chunks.len()
                        || reserved != 0
                    {
                        return Err(invalid(
                            "snapshot trailer",
                            at + ilen,
                            "trailer disagrees with the chunks read",
                        ));
                    }
                    let mut ir = Reader::new(index, at);
                    for &(o, c, l) in &self.chunks {
                        if ir.u64("snapshot index")? != o
                            || ir.u32("snapshot index")? != c
                            || ir.u32("snapshot index")? != l
                        {
                            return Err(invalid(
                                "snapshot index",
                                at,
                                "index disagrees with the chunks read",
                            ));
                        }
                    }
                    used += (ilen + TRAILER_LEN) as usize;
                    self.phase = Phase::Done;
                }
                Phase::Done => {
                    if used < self.buf.len() {
                        return Err(invalid("snapshot", at, "bytes after the trailer"));
                    }
                    break;
                }
            }
        }
        self.buf.drain(..used);
        self.at += used as u64;
        if self.phase == Phase::IndexTail {
            // The index names each data block read by its first key and
            // handle (at most twice: partitions and the top index), then
            // the footer: no more is kept, whatever size was claimed.
            let most = 4096
                + self
                    .blocks
                    .iter()
                    .map(|(k, _)| 2 * (k.len() as u64 + 64))
                    .sum::<u64>();
            if self.buf.len() as u64 > most {
                return Err(DecodeError::TooLarge {
                    what: "snapshot index",
                    at: self.at,
                    len: self.buf.len() as u64,
                    limit: most,
                });
            }
        }
        Ok(())
    }

    /// Checks that the whole snapshot was read (and matches the catalog's
    /// checksum when given) and returns its header and state.
    pub fn finish(
        self,
        expected_crc: Option<u32>,
    ) -> Result<(SnapshotHeader, KvState), DecodeError> {
        if self.phase == Phase::IndexTail {
            indexed::verify_index(
                &self.buf,
                self.at,
                self.total,
                &self.blocks,
                self.digests.as_deref(),
                self.builder.count(),
            )?;
        } else if self.phase != Phase::Done {
            return Err(DecodeError::Truncated {
                what: "snapshot",
                at: self.total,
                need: 1,
                have: 0,
            });
        }
        let computed = self.hasher.finalize();
        if let Some(stored) = expected_crc {
            if stored != computed {
                return Err(DecodeError::Checksum {
                    what: "snapshot file (catalog checksum)",
                    at: 0,
                    stored,
                    computed,
                });
            }
        }
        let header = self
            .header
            .ok_or_else(|| invalid("snapshot", 0, "no header"))?;
        Ok((header, KvState::from_sorted_leaves(self.builder)))
    }
}

/// Decodes and verifies a snapshot held in memory.
pub fn decode(
    bytes: &[u8],
    expected_crc: Option<u32>,
) -> Result<(SnapshotHeader, KvState), DecodeError> {
    let mut d = SnapshotDecoder::new();
    d.feed(bytes)?;
    d.finish(expected_crc)
}

/// Parses a 56-byte header, a layout every snapshot version shares, whose
/// version is one of `versions` (else an error naming `what`, the kind of
/// file). Version 1 must leave its reserved field 0; later versions' readers
/// ignore it.
pub(crate) fn decode_header_of(
    bytes: &[u8],
    what: &'static str,
    versions: &[u16],
) -> Result<SnapshotHeader, DecodeError> {
    if bytes.len() < HEADER_LEN as usize {
        return Err(DecodeError::Truncated {
            what,
            at: 0,
            need: HEADER_LEN,
            have: bytes.len() as u64,
        });
    }
    let mut found = [0u8; 4];
    found.copy_from_slice(&bytes[..4]);
    if found != MAGIC {
        return Err(DecodeError::BadMagic {
            what,
            at: 0,
            expected: MAGIC,
            found,
        });
    }
    let word = le32(bytes, 4);
    let (version, flags) = (word as u16, (word >> 16) as u16);
    if !versions.contains(&version) {
        return Err(DecodeError::UnsupportedVersion {
            what,
            version: u64::from(version),
            known: u64::from(versions[versions.len() - 1]),
        });
    }
    if flags != 0 {
        return Err(DecodeError::UnknownFlags { what, flags });
    }
    check_crc(what, 0, le32(bytes, 52), &bytes[..52])?;
    if version == VERSION && le32(bytes, 48) != 0 {
        return Err(invalid(what, 48, "reserved field is not zero"));
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&bytes[24..40]);
    Ok(SnapshotHeader {
        lsn: le64(bytes, 8),
        epoch: le64(bytes, 16),
        dataset_id: DatasetId(id),
        entry_count: le64(bytes, 40),
    })
}
