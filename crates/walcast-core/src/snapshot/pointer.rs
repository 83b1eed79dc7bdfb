//! The pointer delta (snapshot format version 5): the keys written between
//! two LSNs, each with a pointer to the record in a segment that wrote it
//! last, not its value. A value is stored once, in its segment; a pointer
//! delta costs some 30 bytes a key however large the values, so merging
//! deltas down the chain rewrites pointers, not values.
//!
//! Two structures name the same pointers:
//! - slot pages, a hash table of fixed-size pages whose geometry the head
//!   states, so a cold point read fetches the one page its key hashes to
//!   with no index first, and then the record (two round trips after the
//!   head, as a value delta's suffix and block);
//! - sorted data blocks under one index block (version 2's block framing),
//!   whose entries are the keys in order with their pointers: ordered scans
//!   and whole-file reads.
//!
//! See `docs/FORMAT.md`, "Pointer delta".

use super::block::{Block, BlockBuilder, BlockHandle};
use super::{SnapshotHeader, HEADER_LEN};
use crate::codec::{check_crc, invalid, le32, le64, put_varint, Reader};
use crate::error::DecodeError;

/// Version of the pointer delta.
pub const VERSION_POINTER: u16 = 5;
/// Bytes of the footer.
pub const POINTER_FOOTER_LEN: u64 = 64;
/// Magic at the end of a pointer delta.
pub const POINTER_FOOTER_MAGIC: [u8; 4] = *b"WCP1";
/// Bytes of a slot page the writer uses.
pub const DEFAULT_PAGE_BYTES: u32 = 16 << 10;
/// Smallest and largest slot page accepted.
pub const MIN_PAGE_BYTES: u32 = 256;
/// See [`MIN_PAGE_BYTES`].
pub const MAX_PAGE_BYTES: u32 = 256 << 10;
/// Bytes of a page's header: `base_lsn: u64, lsn: u64, page: u32, pages:
/// u32, count: u32`.
pub const PAGE_HEADER_LEN: usize = 28;
/// Largest record payload a pointer may name: a cold read fetches the
/// record whole, so a key last written by a larger batch is not pointed
/// to (the writer writes a value delta instead).
pub const MAX_POINTED_PAYLOAD: u32 = 256 << 10;
/// Share of a page's room the writer fills on average, in percent; a page
/// that would overflow makes it try again with more pages.
const FILL_PERCENT: u64 = 85;

/// Where a key's newest write is: the record (framing and payload) of LSN
/// `lsn` at byte `offset` of segment `segments/<epoch>/<first>-<last>.wseg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pointer {
    /// LSN of the record.
    pub lsn: u64,
    /// The segment's epoch.
    pub epoch: u64,
    /// The segment's first LSN.
    pub first: u64,
    /// The segment's last LSN.
    pub last: u64,
    /// Byte offset of the record's framing in the segment.
    pub offset: u64,
    /// The record's payload length (the framing adds 16 bytes).
    pub len: u32,
}

impl Pointer {
    /// The segment's object key.
    pub fn segment_key(&self) -> String {
        crate::catalog::segment_key(self.epoch, self.first, self.last)
    }

    /// The byte range of the record (framing and payload) in the segment.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset + crate::segment::RECORD_HEADER_LEN + u64::from(self.len)
    }

    /// Whether a delta of `base_lsn..=lsn` at `epoch` can name it.
    fn fits(&self, base_lsn: u64, lsn: u64, epoch: u64) -> bool {
        self.lsn > base_lsn
            && self.lsn <= lsn
            && self.first <= self.lsn
            && self.lsn <= self.last
            && self.epoch <= epoch
            && self.len <= MAX_POINTED_PAYLOAD
            && self.offset >= crate::segment::HEADER_LEN
            && self.offset <= crate::catalog::MAX_SEGMENT_BYTES
            && self.range().end <= crate::catalog::MAX_SEGMENT_BYTES
    }

    /// Appends the pointer's varints, relative to the delta's `base_lsn`
    /// and `epoch`.
    fn encode(&self, base_lsn: u64, epoch: u64, out: &mut Vec<u8>) {
        put_varint(out, self.lsn - base_lsn);
        put_varint(out, self.lsn - self.first);
        put_varint(out, self.last - self.first);
        put_varint(out, self.offset);
        put_varint(out, u64::from(self.len));
        put_varint(out, epoch - self.epoch);
    }

    fn decode(
        r: &mut Reader<'_>,
        base_lsn: u64,
        lsn: u64,
        epoch: u64,
    ) -> Result<Pointer, DecodeError> {
        let at = r.offset();
        let mut v = [0u64; 6];
        for x in &mut v {
            *x = r.varint("pointer")?;
        }
        let p = (|| {
            let rec = base_lsn.checked_add(v[0])?;
            let first = rec.checked_sub(v[1])?;
            Some(Pointer {
                lsn: rec,
                epoch: epoch.checked_sub(v[5])?,
                first,
                last: first.checked_add(v[2])?,
                offset: v[3],
                len: u32::try_from(v[4]).ok()?,
            })
        })()
        .filter(|p| p.fits(base_lsn, lsn, epoch));
        p.ok_or_else(|| invalid("pointer", at, "names no record of the delta's LSNs"))
    }
}

/// The footer of a pointer delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PointerFooter {
    /// The delta holds the changes after this LSN (up to the header's LSN).
    pub base_lsn: u64,
    /// The index block (first key and handle of every data block).
    pub index: BlockHandle,
    /// Slot pages, from offset 56.
    pub pages: u32,
    /// Bytes of each slot page.
    pub page_bytes: u32,
    /// Entries (changed keys) in the delta.
    pub entry_count: u64,
    /// Data blocks in the delta.
    pub data_blocks: u32,
}

impl PointerFooter {
    /// The footer's 64 bytes.
    pub fn encode(&self) -> [u8; POINTER_FOOTER_LEN as usize] {
        let mut b = [0u8; POINTER_FOOTER_LEN as usize];
        b[..8].copy_from_slice(&self.base_lsn.to_le_bytes());
        b[8..24].copy_from_slice(&self.index.encode());
        b[24..28].copy_from_slice(&self.pages.to_le_bytes());
        b[28..32].copy_from_slice(&self.page_bytes.to_le_bytes());
        b[32..40].copy_from_slice(&self.entry_count.to_le_bytes());
        b[40..44].copy_from_slice(&self.data_blocks.to_le_bytes());
        let crc = crate::crc::hash(&b[..56]);
        b[56..60].copy_from_slice(&crc.to_le_bytes());
        b[60..].copy_from_slice(&POINTER_FOOTER_MAGIC);
        b
    }

    /// Parses the footer of a pointer delta of `size` bytes; `bytes` are
    /// its last 64.
    pub fn decode(bytes: &[u8], size: u64) -> Result<PointerFooter, DecodeError> {
        let what = "pointer delta footer";
        let at = super::check_footer(what, bytes, size, POINTER_FOOTER_LEN, POINTER_FOOTER_MAGIC)?;
        let f = PointerFooter {
            base_lsn: le64(bytes, 0),
            index: BlockHandle::decode(&bytes[8..24], at + 8)?,
            pages: le32(bytes, 24),
            page_bytes: le32(bytes, 28),
            entry_count: le64(bytes, 32),
            data_blocks: le32(bytes, 40),
        };
        let pages_end = u64::from(f.pages) * u64::from(f.page_bytes) + HEADER_LEN;
        if le32(bytes, 44) != 0
            || le64(bytes, 48) != 0
            || f.pages == 0
            || !(MIN_PAGE_BYTES..=MAX_PAGE_BYTES).contains(&f.page_bytes)
            || pages_end > f.index.offset
            || f.index.end() != at
        {
            return Err(invalid(
                what,
                at,
                "page geometry, index handle or reserved bytes out of range",
            ));
        }
        Ok(f)
    }

    /// The byte range of the slot page `key` hashes to.
    pub fn page_range(&self, key: &[u8]) -> (u32, std::ops::Range<u64>) {
        page_range(self.pages, self.page_bytes, key)
    }
}

/// The page of `pages` that `key` hashes to, and its byte range.
pub fn page_range(pages: u32, page_bytes: u32, key: &[u8]) -> (u32, std::ops::Range<u64>) {
    let (page, _) = place(super::delta::key_hash(key), pages);
    let start = HEADER_LEN + u64::from(page) * u64::from(page_bytes);
    (page, start..start + u64::from(page_bytes))
}

/// A key hash's page of `pages` and its fingerprint. The page comes from
/// the hash mixed by a multiply (FNV-1a's low bits of keys alike, such as
/// sequential ones, crowd a few pages).
fn place(h: u64, pages: u32) -> (u32, u32) {
    let m = h.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
    (((m * u64::from(pages)) >> 32) as u32, (h >> 32) as u32)
}

/// What [`encode_pointer_delta`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PointerMeta {
    /// The changes are those after this LSN...
    pub base_lsn: u64,
    /// ... up to and including this one.
    pub lsn: u64,
    /// Epoch of the writer.
    pub epoch: u64,
    /// The dataset.
    pub dataset_id: crate::catalog::DatasetId,
}

/// Encodes `changes` (keys strictly ascending, each with its newest
/// record) as a pointer delta with slot pages of `page_bytes`, or `None`
/// when one of them cannot be named (a pointer outside the delta's LSNs or
/// epoch, a record over [`MAX_POINTED_PAYLOAD`]) or a data block would
/// decode to more than readers take.
pub fn encode_pointer_delta<'a>(
    changes: impl ExactSizeIterator<Item = (&'a [u8], Pointer)> + Clone,
    meta: PointerMeta,
    page_bytes: u32,
    block_bytes: usize,
) -> Option<Vec<u8>> {
    let page_bytes = page_bytes.clamp(MIN_PAGE_BYTES, MAX_PAGE_BYTES);
    let count = changes.len() as u64;
    // Every slot, with its page hash: fingerprint then the pointer.
    let mut slots: Vec<(u64, Vec<u8>)> = Vec::with_capacity(changes.len());
    let mut total = 0u64;
    for (k, p) in changes.clone() {
        if !p.fits(meta.base_lsn, meta.lsn, meta.epoch) {
            return None;
        }
        let h = super::delta::key_hash(k);
        let mut s = (h >> 32).to_le_bytes()[..4].to_vec();
        p.encode(meta.base_lsn, meta.epoch, &mut s);
        total += s.len() as u64;
        slots.push((h, s));
    }
    // Pages no larger than the slots need: a small delta gets one small
    // page, not one mostly padding.
    let need = (total * 100 / FILL_PERCENT + PAGE_HEADER_LEN as u64 + 4).next_power_of_two();
    let page_bytes = page_bytes
        .min(need.min(u64::from(MAX_PAGE_BYTES)) as u32)
        .max(MIN_PAGE_BYTES);
    let room = u64::from(page_bytes) - PAGE_HEADER_LEN as u64 - 4;
    let mut pages = total
        .saturating_mul(100)
        .div_ceil(room * FILL_PERCENT)
        .max(1);
    // Keys whose hashes crowd one page (chosen to, say) make no pointer
    // delta past twice the pages they need: the writer writes a value
    // delta instead.
    let most = pages * 2 + 8;
    let body = loop {
        if pages > most {
            return None;
        }
        let n = u32::try_from(pages).ok()?;
        let mut fill = vec![(0u64, 0u32); n as usize];
        for (h, s) in &slots {
            let (page, _) = place(*h, n);
            let f = &mut fill[page as usize];
            f.0 += s.len() as u64;
            f.1 += 1;
        }
        if fill.iter().all(|f| f.0 <= room) {
            let mut body = vec![0u8; (u64::from(n) * u64::from(page_bytes)) as usize];
            let mut used = vec![PAGE_HEADER_LEN; n as usize];
            for (h, s) in &slots {
                let (page, _) = place(*h, n);
                let at = page as usize * page_bytes as usize + used[page as usize];
                body[at..at + s.len()].copy_from_slice(s);
                used[page as usize] += s.len();
            }
            for (i, f) in fill.iter().enumerate() {
                let p = &mut body[i * page_bytes as usize..(i + 1) * page_bytes as usize];
                p[..8].copy_from_slice(&meta.base_lsn.to_le_bytes());
                p[8..16].copy_from_slice(&meta.lsn.to_le_bytes());
                p[16..20].copy_from_slice(&(i as u32).to_le_bytes());
                p[20..24].copy_from_slice(&n.to_le_bytes());
                p[24..28].copy_from_slice(&f.1.to_le_bytes());
                let end = p.len() - 4;
                let crc = crate::crc::hash(&p[..end]);
                p[end..].copy_from_slice(&crc.to_le_bytes());
            }
            break body;
        }
        pages += pages / 8 + 1;
    };
    let pages = (body.len() / page_bytes as usize) as u32;
    let mut out = super::encode_header(
        VERSION_POINTER,
        meta.lsn,
        meta.epoch,
        meta.dataset_id,
        count,
    );
    out.extend_from_slice(&body);
    drop(body);
    let mut index = BlockBuilder::new();
    let mut b = BlockBuilder::new();
    let mut data_blocks = 0u32;
    let mut value = Vec::new();
    let mut flush = |b: &mut BlockBuilder, out: &mut Vec<u8>, index: &mut BlockBuilder| {
        if b.count() == 0 {
            return;
        }
        let first = b.first_key().to_vec();
        let (bytes, crc) = b.finish();
        let h = BlockHandle {
            offset: out.len() as u64,
            len: bytes.len() as u32,
            crc,
        };
        out.extend_from_slice(&bytes);
        index.push(&first, &h.encode());
        data_blocks += 1;
    };
    for (k, p) in changes {
        value.clear();
        p.encode(meta.base_lsn, meta.epoch, &mut value);
        if !b.fits(k.len(), value.len()) {
            flush(&mut b, &mut out, &mut index);
        }
        b.push(k, &value);
        if b.size() >= block_bytes {
            flush(&mut b, &mut out, &mut index);
        }
    }
    flush(&mut b, &mut out, &mut index);
    if b.too_wide() || index.too_wide() {
        return None;
    }
    let (ibytes, icrc) = index.finish();
    let index_h = BlockHandle {
        offset: out.len() as u64,
        len: ibytes.len() as u32,
        crc: icrc,
    };
    out.extend_from_slice(&ibytes);
    let footer = PointerFooter {
        base_lsn: meta.base_lsn,
        index: index_h,
        pages,
        page_bytes,
        entry_count: count,
        data_blocks,
    };
    out.extend_from_slice(&footer.encode());
    Some(out)
}

/// Parses the 56-byte header of a pointer delta.
pub fn decode_pointer_header(bytes: &[u8]) -> Result<SnapshotHeader, DecodeError> {
    super::decode_header_of(bytes, "pointer delta", &[VERSION_POINTER])
}

/// The delta a slot page belongs to, as the head names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageOf {
    /// The delta's `base_lsn`.
    pub base_lsn: u64,
    /// The delta's LSN.
    pub lsn: u64,
    /// The delta's epoch.
    pub epoch: u64,
    /// Its slot pages.
    pub pages: u32,
    /// Bytes of each.
    pub page_bytes: u32,
}

impl PageOf {
    /// The pointers of slot page `page` whose fingerprint is `key`'s (at
    /// most a few; a fingerprint names a key only almost surely, so the
    /// record says whether it holds the key), after verifying the page
    /// (`bytes`, fetched at `at`).
    pub fn lookup(&self, bytes: &[u8], page: u32, key: &[u8]) -> Result<Vec<Pointer>, DecodeError> {
        let (want_page, fp) = place(super::delta::key_hash(key), self.pages);
        if want_page != page {
            let at = HEADER_LEN + u64::from(page) * u64::from(self.page_bytes);
            return Err(invalid("slot page", at, "is not the key's page"));
        }
        let mut found = Vec::new();
        self.slots(bytes, page, &mut |f, p| {
            if f == fp {
                found.push(p);
            }
        })?;
        Ok(found)
    }

    /// Verifies slot page `page` (`bytes`) and calls `each` with every
    /// slot's fingerprint and pointer; returns the slots' count.
    pub fn slots(
        &self,
        bytes: &[u8],
        page: u32,
        each: &mut dyn FnMut(u32, Pointer),
    ) -> Result<u32, DecodeError> {
        let what = "slot page";
        let at = HEADER_LEN + u64::from(page) * u64::from(self.page_bytes);
        if bytes.len() != self.page_bytes as usize
            || page >= self.pages
            || self.page_bytes < MIN_PAGE_BYTES
        {
            return Err(DecodeError::Truncated {
                what,
                at,
                need: u64::from(self.page_bytes),
                have: bytes.len() as u64,
            });
        }
        let end = bytes.len() - 4;
        check_crc(what, at, le32(bytes, end), &bytes[..end])?;
        // (The page count too: a head that states other pages than the
        // file's would otherwise read a valid page that is not the key's.)
        if le64(bytes, 0) != self.base_lsn
            || le64(bytes, 8) != self.lsn
            || le32(bytes, 16) != page
            || le32(bytes, 20) != self.pages
        {
            return Err(invalid(what, at, "belongs to another delta or page"));
        }
        let count = le32(bytes, 24);
        let mut r = Reader::new(&bytes[PAGE_HEADER_LEN..end], at + PAGE_HEADER_LEN as u64);
        for _ in 0..count {
            let f = r.u32(what)?;
            each(
                f,
                Pointer::decode(&mut r, self.base_lsn, self.lsn, self.epoch)?,
            );
        }
        if bytes[end - r.remaining()..end].iter().any(|&b| b != 0) {
            return Err(invalid(what, at, "bytes after its slots"));
        }
        Ok(count)
    }
}

/// What a record says of a key a pointer named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// The key's value then (`None`: deleted).
    Change(super::delta::Change),
    /// The record does not write the key (the fingerprint named another).
    NotHere,
}

/// Verifies the record `bytes` (framing and payload, the range `p` names)
/// and reads `key`'s last write in it.
pub fn resolve(bytes: &[u8], p: &Pointer, key: &[u8]) -> Result<Resolved, DecodeError> {
    let what = "pointed record";
    let at = p.offset;
    let want = p.range().end - p.offset;
    if bytes.len() as u64 != want {
        return Err(DecodeError::Truncated {
            what,
            at,
            need: want,
            have: bytes.len() as u64,
        });
    }
    let payload = &bytes[crate::segment::RECORD_HEADER_LEN as usize..];
    check_crc(what, at, le32(bytes, 12), &[&bytes[..12], payload].concat())?;
    if le64(bytes, 0) != p.lsn || le32(bytes, 8) != p.len {
        return Err(invalid(what, at, "is not the record the pointer names"));
    }
    let batch = crate::batch::Batch::parse(payload)?;
    let mut last = Resolved::NotHere;
    for op in batch {
        match op {
            crate::batch::OpRef::Put(k, v) if k == key => {
                last = Resolved::Change(Some(v.to_vec()));
            }
            crate::batch::OpRef::Delete(k) if k == key => last = Resolved::Change(None),
            _ => {}
        }
    }
    Ok(last)
}

/// The index block of a pointer delta: its data blocks' first keys and
/// handles.
pub fn decode_index(bytes: &[u8], f: &PointerFooter) -> Result<Block, DecodeError> {
    Block::decode(bytes, &f.index, "pointer delta index")
}

/// The entries of a verified data block: keys in order with their pointers.
pub fn decode_entries(
    block: &Block,
    base_lsn: u64,
    lsn: u64,
    epoch: u64,
) -> Result<Vec<(Vec<u8>, Pointer)>, DecodeError> {
    block
        .entries()
        .iter()
        .map(|(k, v)| {
            let mut r = Reader::new(v, 0);
            let p = Pointer::decode(&mut r, base_lsn, lsn, epoch)?;
            if !r.is_empty() {
                return Err(invalid("pointer", 0, "bytes after the pointer"));
            }
            Ok((k.clone(), p))
        })
        .collect()
}

/// A whole pointer delta, verified and decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointerDelta {
    /// The header (`lsn` is the last LSN the delta covers).
    pub header: SnapshotHeader,
    /// The changes are those after this LSN.
    pub base_lsn: u64,
    /// Changed keys, ascending, with the records that wrote them last.
    pub entries: Vec<(Vec<u8>, Pointer)>,
}

/// Verifies and decodes a whole pointer delta: header, footer, index, every
/// data block (keys ascending), and every slot page, which must hold
/// exactly one slot per entry, in the entry's page, with its pointer.
pub fn decode_pointer_delta(bytes: &[u8]) -> Result<PointerDelta, DecodeError> {
    let what = "pointer delta";
    let size = bytes.len() as u64;
    if size < HEADER_LEN + POINTER_FOOTER_LEN {
        return Err(DecodeError::Truncated {
            what,
            at: 0,
            need: HEADER_LEN + POINTER_FOOTER_LEN,
            have: size,
        });
    }
    let header = decode_pointer_header(&bytes[..HEADER_LEN as usize])?;
    let f = PointerFooter::decode(&bytes[(size - POINTER_FOOTER_LEN) as usize..], size)?;
    let (lsn, epoch) = (header.lsn, header.epoch);
    let idx = super::delta::DeltaIndex::decode_pointer_suffix(
        &bytes[f.index.offset as usize..],
        size,
        lsn,
        epoch,
    )?;
    if header.entry_count != f.entry_count || f.base_lsn >= lsn {
        return Err(invalid(what, 0, "header and footer disagree"));
    }
    let mut entries: Vec<(Vec<u8>, Pointer)> = Vec::new();
    let mut from: Vec<u8> = Vec::new();
    for _ in 0..f.data_blocks {
        let Some((h, _, next)) = idx.block_from(&from) else {
            break;
        };
        let block = Block::decode(
            &bytes[h.offset as usize..h.end() as usize],
            &h,
            "delta data block",
        )?;
        for (k, p) in decode_entries(&block, f.base_lsn, lsn, epoch)? {
            if entries.last().is_some_and(|(last, _)| *last >= k) {
                return Err(invalid("delta data block", h.offset, "keys do not ascend"));
            }
            entries.push((k, p));
        }
        match next {
            Some(n) => from = n.to_vec(),
            None => break,
        }
    }
    if entries.len() as u64 != header.entry_count {
        return Err(invalid(
            what,
            0,
            format!(
                "{} entries, the header says {}",
                entries.len(),
                header.entry_count
            ),
        ));
    }
    let po = PageOf {
        base_lsn: f.base_lsn,
        lsn,
        epoch,
        pages: f.pages,
        page_bytes: f.page_bytes,
    };
    // Every slot is one entry's: the slots of each page, matched one for
    // one with the entries that hash to it.
    let mut by_page: Vec<Vec<(u32, Pointer)>> = Vec::new();
    for page in 0..f.pages {
        let at = (HEADER_LEN + u64::from(page) * u64::from(f.page_bytes)) as usize;
        let mut slots = Vec::new();
        po.slots(
            &bytes[at..at + f.page_bytes as usize],
            page,
            &mut |fp, p| slots.push((fp, p)),
        )?;
        by_page.push(slots);
    }
    for (k, p) in &entries {
        let (page, fp) = place(super::delta::key_hash(k), f.pages);
        let slots = &mut by_page[page as usize];
        let Some(i) = slots.iter().position(|s| *s == (fp, *p)) else {
            return Err(invalid(
                what,
                0,
                "a key's slot page does not name its pointer",
            ));
        };
        slots.swap_remove(i);
    }
    if by_page.iter().any(|s| !s.is_empty()) {
        return Err(invalid(what, 0, "a slot names no entry"));
    }
    Ok(PointerDelta {
        header,
        base_lsn: f.base_lsn,
        entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::DatasetId;

    fn meta() -> PointerMeta {
        PointerMeta {
            base_lsn: 100,
            lsn: 400,
            epoch: 3,
            dataset_id: DatasetId([7; 16]),
        }
    }

    /// Key `i`'s record: LSN 101 + i, in segments of ten records.
    fn pointer(i: u64) -> Pointer {
        let lsn = 101 + i;
        let first = lsn - (lsn - 101) % 10;
        Pointer {
            lsn,
            epoch: 3 - (i % 2),
            first,
            last: first + 9,
            offset: 32 + (lsn - first) * 40,
            len: 24,
        }
    }

    fn keys(n: u64) -> Vec<Vec<u8>> {
        (0..n).map(|i| format!("key:{i:06}").into_bytes()).collect()
    }

    fn encode(n: u64, page_bytes: u32) -> Vec<u8> {
        let k = keys(n);
        encode_pointer_delta(
            k.iter()
                .enumerate()
                .map(|(i, k)| (k.as_slice(), pointer(i as u64))),
            meta(),
            page_bytes,
            512,
        )
        .expect("encodes")
    }

    fn page_of(f: &PointerFooter) -> PageOf {
        PageOf {
            base_lsn: 100,
            lsn: 400,
            epoch: 3,
            pages: f.pages,
            page_bytes: f.page_bytes,
        }
    }

    /// Every key's slot page names its pointer; the sorted blocks hold
    /// every key in order with it; a key not in the delta finds nothing.
    #[test]
    fn slot_pages_and_blocks_name_every_pointer() {
        let n = 300;
        let bytes = encode(n, 1024);
        let size = bytes.len() as u64;
        let f = PointerFooter::decode(&bytes[bytes.len() - 64..], size).unwrap();
        assert!(f.pages > 1, "{} pages", f.pages);
        let po = page_of(&f);
        for (i, k) in keys(n).iter().enumerate() {
            let (page, r) = f.page_range(k);
            let found = po
                .lookup(&bytes[r.start as usize..r.end as usize], page, k)
                .unwrap();
            assert_eq!(found, [pointer(i as u64)], "key {i}");
        }
        let (page, r) = f.page_range(b"absent");
        let found = po
            .lookup(&bytes[r.start as usize..r.end as usize], page, b"absent")
            .unwrap();
        assert!(found.is_empty());
        let idx = crate::snapshot::delta::DeltaIndex::decode_pointer_suffix(
            &bytes[f.index.offset as usize..],
            size,
            400,
            3,
        )
        .unwrap();
        assert_eq!(idx.footer().entry_count, n);
        let mut all = Vec::new();
        let index =
            decode_index(&bytes[f.index.offset as usize..f.index.end() as usize], &f).unwrap();
        for (_, hb) in index.entries() {
            let h = BlockHandle::decode(hb, 0).unwrap();
            let b = Block::decode(&bytes[h.offset as usize..h.end() as usize], &h, "b").unwrap();
            all.extend(decode_entries(&b, 100, 400, 3).unwrap());
        }
        let want: Vec<_> = keys(n)
            .into_iter()
            .enumerate()
            .map(|(i, k)| (k, pointer(i as u64)))
            .collect();
        assert_eq!(all, want);
    }

    /// A page that fails its checksum, belongs to another page or delta, or
    /// is cut short is a `data` error, never a wrong pointer.
    #[test]
    fn a_bad_slot_page_is_refused() {
        let bytes = encode(100, 512);
        let size = bytes.len() as u64;
        let f = PointerFooter::decode(&bytes[bytes.len() - 64..], size).unwrap();
        let k = b"key:000007";
        let (page, r) = f.page_range(k);
        let good = bytes[r.start as usize..r.end as usize].to_vec();
        let po = page_of(&f);
        let mut flipped = good.clone();
        flipped[30] ^= 1;
        assert!(po.lookup(&flipped, page, k).is_err());
        assert!(po.lookup(&good[..good.len() - 1], page, k).is_err());
        // The same bytes as another delta's page.
        let other = PageOf { lsn: 401, ..po };
        assert!(other.lookup(&good, page, k).is_err());
        // Another page's bytes for this key.
        let next = (page + 1) % f.pages;
        let s = (HEADER_LEN + u64::from(next) * u64::from(f.page_bytes)) as usize;
        assert!(po
            .lookup(&bytes[s..s + f.page_bytes as usize], page, k)
            .is_err());
        // A page number past the pages.
        assert!(po.lookup(&good, f.pages, k).is_err());
    }

    /// A record resolves the key it writes; another key is not here; a
    /// record at another LSN, or one that fails its CRC, is an error.
    #[test]
    fn a_record_resolves_its_key_or_says_it_is_not_here() {
        let payload = crate::batch::encode(&[
            crate::batch::Op::put(b"a".to_vec(), b"1".to_vec()),
            crate::batch::Op::delete(b"b".to_vec()),
            crate::batch::Op::put(b"a".to_vec(), b"2".to_vec()),
        ])
        .unwrap();
        let mut seg = crate::segment::SegmentBuilder::new(3, 150);
        assert!(seg.push(&payload));
        let (bytes, _) = seg.finish().unwrap();
        let p = Pointer {
            lsn: 150,
            epoch: 3,
            first: 150,
            last: 150,
            offset: 32,
            len: payload.len() as u32,
        };
        let rec = &bytes[p.range().start as usize..p.range().end as usize];
        assert_eq!(
            resolve(rec, &p, b"a").unwrap(),
            Resolved::Change(Some(b"2".to_vec()))
        );
        assert_eq!(resolve(rec, &p, b"b").unwrap(), Resolved::Change(None));
        assert_eq!(resolve(rec, &p, b"c").unwrap(), Resolved::NotHere);
        let other = Pointer { lsn: 151, ..p };
        assert!(resolve(rec, &other, b"a").is_err());
        let mut bad = rec.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(resolve(&bad, &p, b"a").is_err());
        assert!(resolve(&rec[..rec.len() - 1], &p, b"a").is_err());
    }

    /// A pointer outside the delta's LSNs or epoch, or to a record larger
    /// than a cold read takes, makes no delta.
    #[test]
    fn pointers_a_delta_cannot_name_make_no_delta() {
        let k = b"k".as_slice();
        let enc = |p: Pointer| encode_pointer_delta([(k, p)].into_iter(), meta(), 1024, 512);
        assert!(enc(pointer(0)).is_some());
        assert!(enc(Pointer {
            lsn: 100,
            first: 100,
            ..pointer(0)
        })
        .is_none());
        assert!(enc(Pointer {
            lsn: 401,
            last: 401,
            ..pointer(0)
        })
        .is_none());
        assert!(enc(Pointer {
            epoch: 4,
            ..pointer(0)
        })
        .is_none());
        assert!(enc(Pointer {
            len: MAX_POINTED_PAYLOAD + 1,
            ..pointer(0)
        })
        .is_none());
    }
}
