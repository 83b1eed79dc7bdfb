//! The ordered key/value state a replica serves, kept compact enough for an
//! edge isolate.
//!
//! Layout: most entries live in sorted, packed *leaves*. A leaf is one
//! `Vec<u8>` of entries `varint shared, varint unshared, varint value_len,
//! key suffix, value` (LevelDB-style prefix compression: an entry's key is
//! the first `shared` bytes of the key before it followed by its own
//! `unshared` bytes), plus the `u32` position of every 16th entry, a
//! *restart point*, which stores its whole key (`shared` is 0). A lookup
//! binary-searches the restart keys and scans forward at most 16 entries;
//! scans rebuild keys as they go. For keys such as `user:0001234` with
//! 100-byte values an entry takes about 105 bytes, against 112 bytes of key
//! and value. Leaves are written full into allocations of one size
//! (`PAGE`), so the memory of the leaves a merge frees holds the leaves
//! it writes.
//!
//! Recent writes go to a small ordered overlay (`overlay.rs`, with
//! tombstones); once it passes 1/48 of the leaves' bytes, its entries are
//! merged into the leaves a window (a third of the leaves, round robin)
//! at a time. Keys past the last one (sequential or time-ordered keys) are
//! appended to the last leaf directly. Reads consult the overlay first.

use std::borrow::Cow;
use std::ops::Bound;

use crate::batch::OpRef;

/// Bytes of a leaf's allocation. Leaves are written full, up to this size
/// (an entry larger than that has a leaf of its own size), so the leaves a
/// merge frees are holes of the size of the leaves it writes: a wasm heap,
/// which never shrinks, does not fill with holes too small to reuse.
const PAGE: usize = 32 << 10;
/// The overlay is merged once it holds this many bytes, or
/// 1/[`OVERLAY_SHARE`] of the leaves' bytes, whichever is larger.
const OVERLAY_MIN: usize = 1 << 20;
/// See [`OVERLAY_MIN`].
const OVERLAY_SHARE: usize = 48;
/// A full overlay is merged a window of leaves at a time: the next
/// 1/`WINDOWS` of the leaves in key order (round robin) with the overlay
/// entries between their keys, until the overlay is below its limit by
/// 1/`WINDOWS`. Under writes spread over the keys, a window's entries have
/// gathered over `WINDOWS` merges, more than the overlay's average (which
/// also holds windows merged recently), so a rewritten leaf byte takes in
/// more overlay entries than in a merge of everything at once, for an
/// overlay of the same size; and a merge rewrites (and holds twice) a
/// window's leaves rather than all of them. With 32 KiB leaves, an overlay
/// of 1/48 of the leaves and 3 windows, random-order writes of 100-byte
/// values peak at the least wasm memory of the settings tried, at every
/// size from 800,000 to 1,200,000 keys (docs/BENCHMARKS.md).
const WINDOWS: usize = 3;

/// What an overlay entry is counted as: its key and value and about 56
/// bytes for the map's share (key, LSN and value pointers) and the
/// two allocations.
fn overlay_cost(key: &[u8], value: Option<&[u8]>) -> usize {
    key.len() + value.map_or(0, <[u8]>::len) + 56
}

/// Entries between two restart points of a leaf: one `u32` offset and one
/// whole key per this many entries.
const RESTART_EVERY: u32 = 16;

/// One entry of a leaf, as stored.
#[derive(Debug, Clone, Copy)]
struct Entry<'a> {
    /// Leading bytes of the key shared with the entry before (0 at a
    /// restart point). Exactly the common prefix of the two keys: the
    /// lookups below rely on the byte after it differing.
    shared: usize,
    /// The rest of the key: the whole key when `shared` is 0.
    suffix: &'a [u8],
    value: &'a [u8],
    /// Position of the entry after this one.
    next: usize,
}

/// The entry at byte position `pos` of a leaf's data: the hot path of every
/// read and merge, without the error reporting of the format readers (a
/// leaf is written by this module only). Out of range gives an empty entry
/// that ends the data, never a panic.
#[inline]
fn entry_at(data: &[u8], pos: usize) -> Entry<'_> {
    let (shared, p) = varint_at(data, pos);
    let (unshared, p) = varint_at(data, p);
    let (vlen, p) = varint_at(data, p);
    let found = p.checked_add(unshared).and_then(|kend| {
        let vend = kend.checked_add(vlen)?;
        Some((data.get(p..kend)?, data.get(kend..vend)?, vend))
    });
    match found {
        Some((suffix, value, next)) => Entry {
            shared,
            suffix,
            value,
            next,
        },
        None => Entry {
            shared: 0,
            suffix: &[],
            value: &[],
            next: data.len(),
        },
    }
}

/// The varint at `at` and the position after it (one-byte varints first);
/// out of range or overlong gives 0 and the end of the data.
#[inline]
fn varint_at(data: &[u8], at: usize) -> (usize, usize) {
    match data.get(at) {
        Some(&b) if b < 0x80 => return (usize::from(b), at + 1),
        Some(_) => {}
        None => return (0, data.len()),
    }
    let mut v = 0usize;
    let mut pos = at;
    let mut shift = 0u32;
    loop {
        let Some(&b) = data.get(pos) else {
            return (0, data.len());
        };
        if shift >= usize::BITS {
            return (0, data.len());
        }
        pos += 1;
        v |= usize::from(b & 0x7f) << shift;
        if b < 0x80 {
            return (v, pos);
        }
        shift += 7;
    }
}

/// Most bytes of a varint of a `usize`.
const MAX_VARINT: usize = 10;

/// Writes `v` as a varint at `at` of `buf` and returns the position after it.
#[inline]
fn write_varint(buf: &mut [u8; 3 * MAX_VARINT], mut at: usize, mut v: usize) -> usize {
    while v >= 0x80 {
        buf[at] = (v as u8) | 0x80;
        v >>= 7;
        at += 1;
    }
    buf[at] = v as u8;
    at + 1
}

/// Length of the common prefix of `a` and `b`, eight bytes at a time.
#[inline]
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let mut i = 0;
    while let (Some(x), Some(y)) = (
        a.get(i..).and_then(<[u8]>::first_chunk::<8>),
        b.get(i..).and_then(<[u8]>::first_chunk::<8>),
    ) {
        let diff = u64::from_le_bytes(*x) ^ u64::from_le_bytes(*y);
        if diff != 0 {
            return i + (diff.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    i + a[i..]
        .iter()
        .zip(&b[i..])
        .take_while(|(x, y)| x == y)
        .count()
}

/// Sorted, prefix-compressed entries packed in one buffer. Entries are
/// addressed by their byte position in `data`; `restarts` holds the
/// position of every [`RESTART_EVERY`]th entry (the first included), whose
/// key is stored whole, so a lookup is a binary search over restarts and
/// then a short scan.
#[derive(Debug, Clone, Default)]
struct Leaf {
    data: Vec<u8>,
    restarts: Vec<u32>,
    count: u32,
}

impl Leaf {
    /// The whole key of the restart point at `pos`.
    fn restart_key(&self, pos: u32) -> &[u8] {
        entry_at(&self.data, pos as usize).suffix
    }

    fn first_key(&self) -> &[u8] {
        self.restart_key(0)
    }

    fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Position of the last restart point whose key is at or below `key`
    /// (0 when none is).
    fn restart_before(&self, key: &[u8]) -> usize {
        let r = self
            .restarts
            .partition_point(|&p| self.restart_key(p) <= key);
        r.checked_sub(1).map_or(0, |i| self.restarts[i] as usize)
    }

    /// `Ok(position)` of `key`, or `Err(position)` of the first entry above
    /// it (the end of the data when none is).
    ///
    /// The scan after the restart point compares without rebuilding keys:
    /// `matched` is the common prefix of `key` and the entry before, which
    /// sorts below `key`. An entry sharing less than that with the one
    /// before differs from it at a byte where `key` agrees with the one
    /// before, and is above it there: it is above `key`. One sharing more
    /// agrees with the one before where it is below `key`: it is below too.
    fn find(&self, key: &[u8]) -> Result<usize, usize> {
        let r = self
            .restarts
            .partition_point(|&p| self.restart_key(p) <= key);
        let Some(ri) = r.checked_sub(1) else {
            return Err(0);
        };
        let mut pos = self.restarts[ri] as usize;
        let end = self
            .restarts
            .get(ri + 1)
            .map_or(self.data.len(), |&p| p as usize);
        let mut matched = 0usize;
        while pos < end {
            let e = entry_at(&self.data, pos);
            if e.shared < matched {
                return Err(pos);
            }
            if e.shared == matched {
                let rest = key.get(matched..).unwrap_or_default();
                let cp = common_prefix(e.suffix, rest);
                matched += cp;
                match (e.suffix.get(cp), rest.get(cp)) {
                    (None, None) => return Ok(pos),
                    (Some(_), None) => return Err(pos),
                    (Some(a), Some(b)) if a > b => return Err(pos),
                    _ => {}
                }
            }
            pos = e.next;
        }
        Err(end)
    }

    /// Appends an entry above every key held when it fits in the leaf's
    /// page (always when the leaf is empty) and returns true; returns false
    /// and writes nothing when it does not fit. `prev` is the key of the
    /// last entry (ignored at a restart point).
    #[inline]
    fn try_push(&mut self, prev: &[u8], key: &[u8], value: &[u8]) -> bool {
        let restart = self.count % RESTART_EVERY == 0;
        let shared = if restart { 0 } else { common_prefix(prev, key) };
        self.try_push_shared(shared, key, value)
    }

    /// [`Leaf::try_push`] given the common prefix `shared` of `key` and the
    /// last entry's key (ignored at a restart point, which stores the
    /// whole key).
    #[inline]
    fn try_push_shared(&mut self, shared: usize, key: &[u8], value: &[u8]) -> bool {
        let restart = self.count % RESTART_EVERY == 0;
        let shared = if restart { 0 } else { shared.min(key.len()) };
        let suffix = &key[shared..];
        let mut head = [0u8; 3 * MAX_VARINT];
        let mut n = write_varint(&mut head, 0, shared);
        n = write_varint(&mut head, n, suffix.len());
        n = write_varint(&mut head, n, value.len());
        let pos = self.data.len();
        if self.count > 0 && pos + n + suffix.len() + value.len() > PAGE {
            return false;
        }
        if restart {
            self.restarts.push(pos as u32);
        }
        self.count += 1;
        self.data.reserve(n + suffix.len() + value.len());
        self.data.extend_from_slice(&head[..n]);
        self.data.extend_from_slice(suffix);
        self.data.extend_from_slice(value);
        true
    }

    /// Rebuilds the key of the last entry into `buf`.
    fn last_key_into(&self, buf: &mut Vec<u8>) {
        buf.clear();
        let Some(&r) = self.restarts.last() else {
            return;
        };
        let mut pos = r as usize;
        while pos < self.data.len() {
            let e = entry_at(&self.data, pos);
            buf.truncate(e.shared);
            buf.extend_from_slice(e.suffix);
            pos = e.next;
        }
    }

    fn heap_bytes(&self) -> usize {
        self.data.capacity() + self.restarts.capacity() * 4
    }
}

/// Appends sorted entries into full leaves: each leaf is written in place
/// in a [`PAGE`]-sized allocation until the next entry does not fit.
#[derive(Debug, Default)]
struct LeafWriter {
    out: Vec<Leaf>,
    cur: Leaf,
    /// The key pushed last (the prefix the next entry shares).
    prev: Vec<u8>,
}

impl LeafWriter {
    fn push(&mut self, key: &[u8], value: &[u8]) {
        if self.cur.is_empty() && self.cur.data.capacity() < PAGE {
            self.cur.data.reserve_exact(PAGE);
        }
        if !self.cur.try_push(&self.prev, key, value) {
            self.emit();
            self.cur.data.reserve_exact(PAGE);
            // An empty leaf takes any entry.
            self.cur.try_push(&self.prev, key, value);
        }
        self.prev.clear();
        self.prev.extend_from_slice(key);
    }

    /// Ends the leaf being written. A leaf less than a quarter full (the
    /// last of a merge, or of a small state) is cut to its size, as is one
    /// that grew past its page for a large entry.
    fn emit(&mut self) {
        if self.cur.is_empty() {
            return;
        }
        let mut leaf = std::mem::take(&mut self.cur);
        if leaf.data.len() < PAGE / 4 || leaf.data.capacity() > PAGE {
            leaf.data.shrink_to_fit();
        }
        leaf.restarts.shrink_to_fit();
        self.out.push(leaf);
    }

    /// Adds a leaf that needs no rewrite.
    fn keep(&mut self, leaf: Leaf) {
        self.emit();
        self.out.push(leaf);
    }

    fn finish(mut self) -> Vec<Leaf> {
        self.emit();
        self.out
    }
}

pub(crate) use crate::overlay::Overlay;

/// Writes the leaves `old` merged with the overlay entries `ov` (in key
/// order, tombstones as `None`; those below the second leaf go into the
/// first, those from the last leaf's first key on into the last one)
/// through `w`, taking each leaf out of `old` (an empty leaf stays in its
/// place). Leaves no entry touches are kept as they are; each one merged is
/// freed as soon as it is read, so its memory can hold the leaves written
/// next. Allocates nothing but the leaves it writes.
fn merge_leaves<'o, I>(old: &mut [Leaf], ov: I, w: &mut LeafWriter)
where
    I: Iterator<Item = (&'o [u8], Option<&'o [u8]>)>,
{
    let mut ov = ov.peekable();
    // The key of the old leaf's entry being merged, rebuilt.
    let mut lkey = Vec::new();
    for i in 0..old.len() {
        let leaf = std::mem::take(&mut old[i]);
        // Overlay entries belonging to this leaf: below the next leaf's first key.
        let upper = old.get(i + 1).map(Leaf::first_key);
        let below_upper = |k: &[u8]| upper.is_none_or(|u| k < u);
        if !ov.peek().is_some_and(|(k, _)| below_upper(k)) {
            w.keep(leaf);
            continue;
        }
        let mut j = 0;
        // The leaf's next entry (its key in `lkey`), decoded and not yet written.
        let mut pending: Option<&[u8]> = None;
        loop {
            if pending.is_none() && j < leaf.data.len() {
                let e = entry_at(&leaf.data, j);
                lkey.truncate(e.shared);
                lkey.extend_from_slice(e.suffix);
                pending = Some(e.value);
                j = e.next;
            }
            let next_ov = ov.peek().copied().filter(|(k, _)| below_upper(k));
            match (pending, next_ov) {
                (Some(lv), Some((ok, ov_value))) => match lkey.as_slice().cmp(ok) {
                    std::cmp::Ordering::Less => {
                        w.push(&lkey, lv);
                        pending = None;
                    }
                    std::cmp::Ordering::Equal => {
                        pending = None;
                        ov.next();
                        if let Some(v) = ov_value {
                            w.push(ok, v);
                        }
                    }
                    std::cmp::Ordering::Greater => {
                        ov.next();
                        if let Some(v) = ov_value {
                            w.push(ok, v);
                        }
                    }
                },
                (Some(lv), None) => {
                    w.push(&lkey, lv);
                    pending = None;
                }
                (None, Some((ok, ov_value))) => {
                    ov.next();
                    if let Some(v) = ov_value {
                        w.push(ok, v);
                    }
                }
                (None, None) => break,
            }
        }
        drop(leaf);
    }
}

/// An ordered map from byte keys to byte values.
#[derive(Debug, Clone, Default)]
pub struct KvState {
    leaves: Vec<Leaf>,
    leaf_bytes: usize,
    /// The key of the last entry of the last leaf (empty when there are no
    /// leaves): appends compare with it and share its prefix.
    max_key: Vec<u8>,
    overlay: Overlay,
    /// The [`overlay_cost`] of the overlay's entries.
    overlay_bytes: usize,
    /// The first leaf of the next window to merge.
    next_window: usize,
    len: u64,
}

impl KvState {
    /// An empty state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of keys present.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when no key is present.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        if let Some((_, v)) = self.overlay.get(key) {
            return v.as_deref();
        }
        self.base_get(key)
    }

    fn leaf_for(&self, key: &[u8]) -> Option<usize> {
        let n = self.leaves.partition_point(|l| l.first_key() <= key);
        n.checked_sub(1)
    }

    fn base_get(&self, key: &[u8]) -> Option<&[u8]> {
        // Appends (keys past the last one, as in time-ordered or sequential
        // keys) need no search.
        if self.leaves.is_empty() || key > self.max_key.as_slice() {
            return None;
        }
        let li = self.leaf_for(key)?;
        let leaf = &self.leaves[li];
        leaf.find(key)
            .ok()
            .map(|pos| entry_at(&leaf.data, pos).value)
    }

    /// Sets `key` to `value`.
    pub fn put(&mut self, key: &[u8], value: &[u8]) {
        if let Some(shared) = self.append_point(key) {
            self.append(key, value, shared);
            return;
        }
        self.overlay_bytes += overlay_cost(key, Some(value));
        // One overlay traversal: what the insert replaced says whether the key was present.
        match self.overlay.insert(key.into(), (0, Some(value.into()))) {
            Some((_, Some(old))) => self.overlay_bytes -= overlay_cost(key, Some(&old)),
            Some((_, None)) => {
                self.overlay_bytes -= overlay_cost(key, None);
                self.len += 1;
            }
            None => {
                if self.base_get(key).is_none() {
                    self.len += 1;
                }
            }
        }
        self.maybe_compact();
    }

    /// When `key` sorts after every key held, in the leaves and the
    /// overlay: the length of the prefix it shares with `max_key`. One
    /// word-at-a-time pass serves the comparison and the prefix
    /// compression of the append.
    #[inline]
    fn append_point(&self, key: &[u8]) -> Option<usize> {
        let shared = if self.leaves.is_empty() {
            0
        } else {
            let shared = common_prefix(&self.max_key, key);
            // Above `max_key`: `key` goes on where `max_key` ends or
            // differs from it with a greater byte.
            let above = match (self.max_key.get(shared), key.get(shared)) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(m), Some(k)) => k > m,
            };
            if !above {
                return None;
            }
            shared
        };
        self.overlay
            .last_key_value()
            .is_none_or(|(k, _)| key > k)
            .then_some(shared)
    }

    /// Adds a key that sorts after every key held straight to the last leaf
    /// (sequential and time-ordered keys skip the overlay). `shared` is the
    /// prefix it shares with `max_key`.
    fn append(&mut self, key: &[u8], value: &[u8], shared: usize) {
        let pushed = match self.leaves.last_mut() {
            Some(leaf) => {
                // The last leaf at a whole page (a merge or load may have cut
                // it to its size): appends fill it without regrowing it.
                if leaf.data.capacity() < PAGE {
                    leaf.data.reserve_exact(PAGE - leaf.data.len());
                }
                let before = leaf.data.len();
                leaf.try_push_shared(shared, key, value)
                    .then(|| leaf.data.len() - before)
            }
            None => None,
        };
        self.leaf_bytes += match pushed {
            Some(n) => n,
            None => {
                // A new leaf, a whole page at once: appends do not regrow it.
                let mut leaf = Leaf::default();
                leaf.data.reserve_exact(PAGE);
                leaf.try_push(&self.max_key, key, value);
                let n = leaf.data.len();
                self.leaves.push(leaf);
                n
            }
        };
        // `max_key` keeps the prefix it shares with `key`.
        self.max_key.truncate(shared);
        self.max_key
            .extend_from_slice(key.get(shared..).unwrap_or_default());
        self.len += 1;
    }

    /// Removes `key`; a no-op when absent.
    pub fn delete(&mut self, key: &[u8]) {
        if self.get(key).is_none() {
            return;
        }
        self.len -= 1;
        let replaced = if self.base_get(key).is_some() {
            self.overlay_bytes += overlay_cost(key, None);
            self.overlay.insert(key.into(), (0, None))
        } else {
            self.overlay.remove(key)
        };
        if let Some((_, old)) = replaced {
            self.overlay_bytes -= overlay_cost(key, old.as_deref());
        }
        self.maybe_compact();
    }

    /// Applies a batch's operations in order. Batches are validated before
    /// they get here ([`crate::batch::Batch::parse`] returns nothing unless
    /// all of it is valid), so this applies all of it.
    pub fn apply<'a>(&mut self, ops: impl IntoIterator<Item = OpRef<'a>>) {
        for op in ops {
            match op {
                OpRef::Put(k, v) => self.put(k, v),
                OpRef::Delete(k) => self.delete(k),
            }
        }
    }

    fn maybe_compact(&mut self) {
        let limit = OVERLAY_MIN.max(self.leaf_bytes / OVERLAY_SHARE);
        if self.overlay_bytes < limit {
            return;
        }
        if self.leaves.len() < 2 * WINDOWS {
            self.compact();
            return;
        }
        // Windows cover every leaf once in `WINDOWS` merges (leaves split as
        // they grow, so a cycle may miss a few: then everything is merged).
        let goal = limit - limit / WINDOWS;
        for _ in 0..WINDOWS {
            self.merge_window();
            if self.overlay_bytes <= goal {
                return;
            }
        }
        self.compact();
    }

    /// Merges the overlay into the leaves: a window at a time, from the
    /// first (the memory of one window's old leaves then holds the next
    /// window's new ones), or all at once in a small state.
    pub fn compact(&mut self) {
        if self.overlay.is_empty() {
            return;
        }
        if self.leaves.len() >= 2 * WINDOWS {
            self.next_window = 0;
            while !self.merge_window() {}
            if self.overlay.is_empty() {
                return;
            }
        }
        let mut old = std::mem::take(&mut self.leaves);
        let mut w = LeafWriter {
            out: Vec::with_capacity(old.len() + 1),
            ..LeafWriter::default()
        };
        let entries = self.overlay.iter().map(|(k, (_, v))| (k, v.as_deref()));
        if old.is_empty() {
            for (k, v) in entries {
                if let Some(v) = v {
                    w.push(k, v);
                }
            }
        } else {
            merge_leaves(&mut old, entries, &mut w);
        }
        drop(old);
        self.overlay = Overlay::new();
        self.overlay_bytes = 0;
        let mut out = w.finish();
        out.shrink_to_fit();
        self.leaf_bytes = out.iter().map(|l| l.data.len()).sum();
        self.leaves = out;
        self.next_window = 0;
        self.refresh_max_key();
    }

    /// Merges the next window of leaves with the overlay entries between
    /// their keys (the first window takes those below every leaf, the last
    /// those above). Returns true when the window was the last one.
    fn merge_window(&mut self) -> bool {
        let n = self.leaves.len();
        let a = if self.next_window < n {
            self.next_window
        } else {
            0
        };
        let b = (a + n.div_ceil(WINDOWS)).min(n);
        let lo = (a > 0).then(|| self.leaves[a].first_key().to_vec());
        let hi = (b < n).then(|| self.leaves[b].first_key().to_vec());
        let bounds = (
            lo.as_deref().map_or(Bound::Unbounded, Bound::Included),
            hi.as_deref().map_or(Bound::Unbounded, Bound::Excluded),
        );
        let old_bytes: usize = self.leaves[a..b].iter().map(|l| l.data.len()).sum();
        // Room for the window's leaves and a quarter more: the writer's list
        // does not regrow while pages are written.
        let mut w = LeafWriter {
            out: Vec::with_capacity((b - a) + (b - a) / 4 + 2),
            ..LeafWriter::default()
        };
        let entries = self
            .overlay
            .range(bounds)
            .map(|(k, (_, v))| (k, v.as_deref()));
        merge_leaves(&mut self.leaves[a..b], entries, &mut w);
        // The window's entries leave the overlay (without allocating).
        let mut taken = 0;
        self.overlay.retain(|k, (_, v)| {
            let inside =
                lo.as_deref().is_none_or(|l| k >= l) && hi.as_deref().is_none_or(|h| k < h);
            if inside {
                taken += overlay_cost(k, v.as_deref());
            }
            !inside
        });
        self.overlay_bytes -= taken;
        let new = w.finish();
        let new_bytes: usize = new.iter().map(|l| l.data.len()).sum();
        self.leaf_bytes = self.leaf_bytes - old_bytes + new_bytes;
        self.next_window = a + new.len();
        self.leaves.splice(a..b, new);
        if b == n {
            self.refresh_max_key();
        }
        b == n
    }

    /// Sets `max_key` from the last leaf.
    fn refresh_max_key(&mut self) {
        match self.leaves.last() {
            Some(l) => l.last_key_into(&mut self.max_key),
            None => self.max_key.clear(),
        }
        self.max_key.shrink_to_fit();
    }

    /// Iterates entries between `start` and `end` in key order.
    pub fn range(&self, start: Bound<&[u8]>, end: Bound<&[u8]>) -> Range<'_> {
        let empty = match (start, end) {
            (Bound::Included(s) | Bound::Excluded(s), Bound::Included(e) | Bound::Excluded(e)) => {
                s > e
                    || (s == e
                        && !(matches!(start, Bound::Included(_))
                            && matches!(end, Bound::Included(_))))
            }
            _ => false,
        };
        let overlay = if empty {
            None
        } else {
            Some(self.overlay.range((start, end)))
        };
        let mut r = Range {
            leaves: &self.leaves,
            li: if empty { self.leaves.len() } else { 0 },
            pos: 0,
            key: Vec::new(),
            end: match end {
                Bound::Unbounded => Bound::Unbounded,
                Bound::Included(k) => Bound::Included(k.into()),
                Bound::Excluded(k) => Bound::Excluded(k.into()),
            },
            overlay,
            ov_peek: None,
            base_peek: None,
        };
        if empty {
            return r;
        }
        let (Bound::Included(k) | Bound::Excluded(k)) = start else {
            return r;
        };
        let Some(li) = self.leaf_for(k) else {
            return r;
        };
        r.li = li;
        r.pos = self.leaves[li].restart_before(k);
        // Skip the entries below `start` after that restart point: fewer
        // than a restart interval (the next restart key, or the next leaf's
        // first key, is above `k`). They are below `end` too (the bounds
        // are not empty), so the end check does not stop the walk.
        while let Some(b) = r.next_base() {
            let below = match start {
                Bound::Included(_) => r.key.as_slice() < k,
                _ => r.key.as_slice() <= k,
            };
            if !below {
                r.base_peek = Some(b);
                break;
            }
        }
        r
    }

    /// Iterates entries whose key starts with `prefix`, in key order.
    pub fn prefix(&self, prefix: &[u8]) -> Range<'_> {
        match prefix_end_key(prefix) {
            Some(end) => self.range(Bound::Included(prefix), Bound::Excluded(&end)),
            None => self.range(Bound::Included(prefix), Bound::Unbounded),
        }
    }

    /// Iterates every entry in key order.
    pub fn iter(&self) -> Range<'_> {
        self.range(Bound::Unbounded, Bound::Unbounded)
    }

    /// Approximate heap bytes held by the state.
    pub fn heap_bytes(&self) -> usize {
        self.leaves.iter().map(Leaf::heap_bytes).sum::<usize>()
            + self.leaves.capacity() * std::mem::size_of::<Leaf>()
            + self.max_key.capacity()
            + self.overlay_bytes
    }

    /// Builds a state from a [`SortedBuilder`] (used by snapshot loading).
    pub(crate) fn from_sorted_leaves(builder: SortedBuilder) -> KvState {
        let mut w = builder.w;
        let max_key = std::mem::take(&mut w.prev);
        let leaves = w.finish();
        KvState {
            leaf_bytes: leaves.iter().map(|l| l.data.len()).sum(),
            max_key: if leaves.is_empty() {
                Vec::new()
            } else {
                max_key
            },
            leaves,
            overlay: Overlay::new(),
            overlay_bytes: 0,
            next_window: 0,
            len: builder.count,
        }
    }
}

/// Builds a [`KvState`] from entries in strictly ascending key order without
/// going through the overlay.
#[derive(Debug, Default)]
pub(crate) struct SortedBuilder {
    w: LeafWriter,
    count: u64,
}

impl SortedBuilder {
    /// Appends an entry; returns false if `key` is not above the previous key.
    pub(crate) fn push(&mut self, key: &[u8], value: &[u8]) -> bool {
        if self.count > 0 && key <= self.w.prev.as_slice() {
            return false;
        }
        self.w.push(key, value);
        self.count += 1;
        true
    }

    pub(crate) fn count(&self) -> u64 {
        self.count
    }
}

/// The smallest key above every key starting with `prefix` (`None` when no
/// such key exists: an empty prefix or one of only 0xff bytes): the
/// exclusive end of a prefix scan.
pub fn prefix_end_key(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

type OverlayRange<'a> = crate::overlay::Range<'a>;

/// A leaf entry a [`Range`] has decoded: its key is in the range's key
/// buffer, and also in the leaf when stored whole.
#[derive(Debug, Clone, Copy)]
struct BaseEntry<'a> {
    whole: Option<&'a [u8]>,
    value: &'a [u8],
}

/// The next entry of a [`Range`]: from the leaves (key in the range's
/// buffer) or from the overlay.
enum Hit<'a> {
    Base(BaseEntry<'a>),
    Overlay(&'a [u8], &'a [u8]),
}

/// Iterator over a key range of a [`KvState`], merging leaves and overlay.
///
/// Keys in the leaves are prefix-compressed, so the range rebuilds them: as
/// an [`Iterator`] it yields each key as a [`Cow`], borrowed where the key
/// is stored whole (restart points, the overlay) and owned otherwise;
/// [`Range::next_entry`] lends the key from the range's own buffer instead,
/// without allocating (for walks over a whole state, such as snapshot
/// encoding).
pub struct Range<'a> {
    leaves: &'a [Leaf],
    li: usize,
    /// Byte position of the next entry in the current leaf.
    pos: usize,
    /// The key of the leaf entry decoded last (that of `base_peek` when set).
    key: Vec<u8>,
    end: Bound<Box<[u8]>>,
    overlay: Option<OverlayRange<'a>>,
    ov_peek: Option<(&'a [u8], Option<&'a [u8]>)>,
    base_peek: Option<BaseEntry<'a>>,
}

impl std::fmt::Debug for Range<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Range")
            .field("leaf", &self.li)
            .field("entry", &self.pos)
            .finish()
    }
}

impl<'a> Range<'a> {
    /// The next leaf entry, its key rebuilt into `self.key`.
    fn next_base(&mut self) -> Option<BaseEntry<'a>> {
        let leaves = self.leaves;
        while let Some(leaf) = leaves.get(self.li) {
            if self.pos < leaf.data.len() {
                let e = entry_at(&leaf.data, self.pos);
                self.pos = e.next;
                self.key.truncate(e.shared);
                self.key.extend_from_slice(e.suffix);
                let before_end = match &self.end {
                    Bound::Unbounded => true,
                    Bound::Included(k) => self.key.as_slice() <= &**k,
                    Bound::Excluded(k) => self.key.as_slice() < &**k,
                };
                if !before_end {
                    self.li = leaves.len();
                    return None;
                }
                return Some(BaseEntry {
                    whole: (e.shared == 0).then_some(e.suffix),
                    value: e.value,
                });
            }
            self.li += 1;
            self.pos = 0;
        }
        None
    }

    fn next_overlay(&mut self) -> Option<(&'a [u8], Option<&'a [u8]>)> {
        self.overlay
            .as_mut()?
            .next()
            .map(|(k, (_, v))| (k, v.as_deref()))
    }

    /// The next entry of the merge of leaves and overlay (tombstones hide
    /// the leaf entry of their key and are not returned).
    fn step(&mut self) -> Option<Hit<'a>> {
        loop {
            if self.base_peek.is_none() {
                self.base_peek = self.next_base();
            }
            if self.ov_peek.is_none() {
                self.ov_peek = self.next_overlay();
            }
            match (self.base_peek, self.ov_peek) {
                (None, None) => return None,
                (Some(b), None) => {
                    self.base_peek = None;
                    return Some(Hit::Base(b));
                }
                (None, Some((k, v))) => {
                    self.ov_peek = None;
                    if let Some(v) = v {
                        return Some(Hit::Overlay(k, v));
                    }
                }
                (Some(b), Some((k, v))) => match self.key.as_slice().cmp(k) {
                    std::cmp::Ordering::Less => {
                        self.base_peek = None;
                        return Some(Hit::Base(b));
                    }
                    std::cmp::Ordering::Equal => {
                        self.base_peek = None;
                        self.ov_peek = None;
                        if let Some(v) = v {
                            return Some(Hit::Overlay(k, v));
                        }
                    }
                    std::cmp::Ordering::Greater => {
                        self.ov_peek = None;
                        if let Some(v) = v {
                            return Some(Hit::Overlay(k, v));
                        }
                    }
                },
            }
        }
    }

    /// The next entry, its key lent from the range (valid until the next
    /// call) rather than copied: `while let Some((k, v)) = r.next_entry()`.
    pub fn next_entry(&mut self) -> Option<(&[u8], &'a [u8])> {
        match self.step()? {
            Hit::Base(b) => Some((self.key.as_slice(), b.value)),
            Hit::Overlay(k, v) => Some((k, v)),
        }
    }
}

impl<'a> Iterator for Range<'a> {
    type Item = (Cow<'a, [u8]>, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        match self.step()? {
            Hit::Base(b) => {
                let key = match b.whole {
                    Some(k) => Cow::Borrowed(k),
                    None => Cow::Owned(self.key.clone()),
                };
                Some((key, b.value))
            }
            Hit::Overlay(k, v) => Some((Cow::Borrowed(k), v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// Appends after a merge that cut the last leaf to its size fill it up
    /// to one page, not past it: every leaf's allocation stays at most
    /// [`PAGE`] (the wasm heap reuses the pages merges free).
    #[test]
    fn appends_keep_leaves_within_a_page() {
        let mut s = KvState::new();
        for i in (0..40u32).rev() {
            s.put(format!("k{i:06}").as_bytes(), &[1u8; 100]);
        }
        s.compact();
        let cut = s.leaves.last().map(|l| l.data.capacity());
        assert!(cut.is_some_and(|c| c < PAGE / 4), "{cut:?}");
        for i in 40..2_000u32 {
            s.put(format!("k{i:06}").as_bytes(), &[2u8; 100]);
        }
        assert!(s.leaves.len() > 4);
        for l in &s.leaves {
            assert!(l.data.capacity() <= PAGE, "{}", l.data.capacity());
        }
        assert_eq!(s.get(b"k001999"), Some(&[2u8; 100][..]));
    }

    proptest! {
        /// The word-at-a-time common prefix is the byte-at-a-time one.
        #[test]
        fn common_prefix_is_bytewise(
            shared in proptest::collection::vec(any::<u8>(), 0..40),
            a in proptest::collection::vec(any::<u8>(), 0..20),
            b in proptest::collection::vec(any::<u8>(), 0..20),
        ) {
            let x = [shared.as_slice(), &a].concat();
            let y = [shared.as_slice(), &b].concat();
            let naive = x.iter().zip(&y).take_while(|(p, q)| p == q).count();
            prop_assert_eq!(common_prefix(&x, &y), naive);
        }
    }

    /// What the overlay's entries count, from scratch.
    fn overlay_cost_of(s: &KvState) -> usize {
        s.overlay
            .iter()
            .map(|(k, (_, v))| overlay_cost(k, v.as_deref()))
            .sum()
    }

    /// `s` holds what `m` holds, before and after a compaction, for every
    /// key in `keys` too.
    fn same_as(
        s: &mut KvState,
        m: &BTreeMap<Vec<u8>, Vec<u8>>,
        keys: impl Iterator<Item = Vec<u8>>,
    ) -> Result<(), TestCaseError> {
        prop_assert_eq!(s.len(), m.len() as u64);
        prop_assert_eq!(s.overlay_bytes, overlay_cost_of(s));
        let want: Vec<_> = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let got: Vec<_> = s.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
        prop_assert_eq!(&got, &want);
        s.compact();
        let got: Vec<_> = s.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
        prop_assert_eq!(&got, &want);
        for key in keys {
            prop_assert_eq!(s.get(&key), m.get(&key).map(|v| v.as_slice()));
        }
        Ok(())
    }

    proptest! {
        /// Keys of any length over two letters, so that a key is often a
        /// prefix of the greatest key held, or the greatest key a prefix
        /// of it: the append path's comparison and shared prefix.
        #[test]
        fn matches_btreemap_with_prefix_keys(ops in proptest::collection::vec((0u8..8, proptest::collection::vec(b'a'..=b'b', 0..7), 0usize..30), 1..2000)) {
            let mut s = KvState::new();
            let mut m = BTreeMap::new();
            for (i, (kind, key, vlen)) in ops.iter().enumerate() {
                let v = vec![(i % 251) as u8; *vlen];
                if *kind == 0 {
                    s.delete(key);
                    m.remove(key);
                } else {
                    s.put(key, &v);
                    m.insert(key.clone(), v);
                }
                prop_assert_eq!(s.get(key), m.get(key).map(|v| v.as_slice()));
                if i % 300 == 0 { s.compact(); }
            }
            let keys: Vec<Vec<u8>> = m.keys().cloned().collect();
            same_as(&mut s, &m, keys.into_iter())?;
        }
    }

    proptest! {
        #[test]
        fn matches_btreemap_mostly_ascending(ops in proptest::collection::vec((0u8..10, 0u16..40, 0usize..40), 1..3000)) {
            let mut s = KvState::new();
            let mut m = BTreeMap::new();
            let mut next = 0u32;
            for (i, (kind, back, vlen)) in ops.iter().enumerate() {
                let v = vec![(i % 251) as u8; *vlen];
                match kind {
                    // Mostly appends, sometimes an update or delete of a recent key.
                    0..=6 => {
                        let key = format!("k{next:06}").into_bytes();
                        next += 1;
                        s.put(&key, &v);
                        m.insert(key, v);
                    }
                    7 | 8 => {
                        let key = format!("k{:06}", next.saturating_sub(u32::from(*back))).into_bytes();
                        s.put(&key, &v);
                        m.insert(key, v);
                    }
                    _ => {
                        let key = format!("k{:06}", next.saturating_sub(u32::from(*back))).into_bytes();
                        s.delete(&key);
                        m.remove(&key);
                    }
                }
                if i % 700 == 0 { s.compact(); }
                prop_assert_eq!(s.len(), m.len() as u64);
            }
            same_as(&mut s, &m, (0..next).map(|k| format!("k{k:06}").into_bytes()))?;
        }

        #[test]
        fn matches_btreemap(ops in proptest::collection::vec((any::<bool>(), 0u16..600, 0usize..40), 1..3000)) {
            let mut s = KvState::new();
            let mut m = BTreeMap::new();
            for (i, (put, k, vlen)) in ops.iter().enumerate() {
                let key = format!("k{k:05}").into_bytes();
                if *put {
                    let v = vec![(i % 251) as u8; *vlen];
                    s.put(&key, &v);
                    m.insert(key, v);
                } else {
                    s.delete(&key);
                    m.remove(&key);
                }
                if i % 500 == 0 { s.compact(); }
            }
            same_as(&mut s, &m, (0u16..600).map(|k| format!("k{k:05}").into_bytes()))?;
            let lo = b"k00100".to_vec();
            let hi = b"k00200".to_vec();
            let got: Vec<_> = s.range(Bound::Included(&lo), Bound::Excluded(&hi)).map(|(k, _)| k.to_vec()).collect();
            let want: Vec<_> = m.range(lo.clone()..hi.clone()).map(|(k, _)| k.clone()).collect();
            prop_assert_eq!(got, want);
            let got: Vec<_> = s.prefix(b"k0001").map(|(k, _)| k.to_vec()).collect();
            let want: Vec<_> = m.keys().filter(|k| k.starts_with(b"k0001")).cloned().collect();
            prop_assert_eq!(got, want);
        }
    }

    fn bound(kind: u8, k: &[u8]) -> Bound<&[u8]> {
        match kind % 3 {
            0 => Bound::Included(k),
            1 => Bound::Excluded(k),
            _ => Bound::Unbounded,
        }
    }

    fn in_bounds(k: &[u8], start: Bound<&[u8]>, end: Bound<&[u8]>) -> bool {
        let above = match start {
            Bound::Included(s) => k >= s,
            Bound::Excluded(s) => k > s,
            Bound::Unbounded => true,
        };
        let below = match end {
            Bound::Included(e) => k <= e,
            Bound::Excluded(e) => k < e,
            Bound::Unbounded => true,
        };
        above && below
    }

    proptest! {
        /// Any pair of bounds, inverted or equal ones included, gives what a
        /// filter gives, with keys in the leaves and in the overlay.
        #[test]
        fn any_bounds_match_a_filter(
            keys in proptest::collection::vec(0u16..300, 0..400),
            compact_at in 0usize..400,
            ranges in proptest::collection::vec((0u8..3, 0u16..300, 0u8..3, 0u16..300), 1..40),
        ) {
            let mut s = KvState::new();
            let mut m = BTreeMap::new();
            for (i, k) in keys.iter().enumerate() {
                let key = format!("k{k:04}").into_bytes();
                s.put(&key, b"v");
                m.insert(key, b"v".to_vec());
                if i == compact_at { s.compact(); }
            }
            for (sk, a, ek, b) in ranges {
                let (a, b) = (format!("k{a:04}").into_bytes(), format!("k{b:04}").into_bytes());
                let (start, end) = (bound(sk, &a), bound(ek, &b));
                let got: Vec<_> = s.range(start, end).map(|(k, _)| k.to_vec()).collect();
                let want: Vec<_> = m.keys().filter(|k| in_bounds(k, start, end)).cloned().collect();
                prop_assert_eq!(got, want);
            }
        }
    }

    /// Keys built for prefix compression's edge cases: a long prefix shared
    /// by many keys, the empty key, keys that are prefixes of others (a
    /// short tail from a two-letter alphabet, possibly empty), and keys
    /// larger than a leaf.
    fn edge_key(stem: u8, tail: &[u8]) -> Vec<u8> {
        let mut k = match stem % 5 {
            0 => Vec::new(),
            1 => vec![b'p'; 300],
            2 => b"user:".to_vec(),
            3 => vec![b'q'; 40_000],
            _ => vec![0xff; 3],
        };
        k.extend(tail.iter().map(|b| b % 2));
        k
    }

    proptest! {
        #[test]
        fn edge_keys_match_a_btreemap(
            ops in proptest::collection::vec(
                (0u8..4, 0u8..5, proptest::collection::vec(any::<u8>(), 0..5), 0usize..3),
                1..400,
            ),
            ranges in proptest::collection::vec(
                (0u8..3, 0u8..5, proptest::collection::vec(any::<u8>(), 0..5),
                 0u8..3, 0u8..5, proptest::collection::vec(any::<u8>(), 0..5)),
                1..12,
            ),
        ) {
            let mut s = KvState::new();
            let mut m = BTreeMap::new();
            let mut pool = Vec::new();
            for (i, (kind, stem, tail, vsize)) in ops.iter().enumerate() {
                let key = edge_key(*stem, tail);
                pool.push(key.clone());
                match kind {
                    0 => {
                        s.delete(&key);
                        m.remove(&key);
                    }
                    3 => s.compact(),
                    _ => {
                        let v = vec![(i % 251) as u8; [0, 7, 20_000][*vsize]];
                        s.put(&key, &v);
                        m.insert(key, v);
                    }
                }
                prop_assert_eq!(s.len(), m.len() as u64);
            }
            // The same through the lending walk and the iterator.
            let mut lent = Vec::new();
            let mut r = s.iter();
            while let Some((k, v)) = r.next_entry() {
                lent.push((k.to_vec(), v.to_vec()));
            }
            let want: Vec<_> = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            prop_assert_eq!(&lent, &want);
            for (sk, sa, ta, ek, sb, tb) in &ranges {
                let (a, b) = (edge_key(*sa, ta), edge_key(*sb, tb));
                let (start, end) = (bound(*sk, &a), bound(*ek, &b));
                let want: Vec<_> = m.keys().filter(|k| in_bounds(k, start, end)).cloned().collect();
                let got: Vec<_> = s.range(start, end).map(|(k, _)| k.into_owned()).collect();
                prop_assert_eq!(&got, &want);
                let got: Vec<_> = s.prefix(&a).map(|(k, _)| k.into_owned()).collect();
                let want: Vec<_> = m.keys().filter(|k| k.starts_with(&a)).cloned().collect();
                prop_assert_eq!(got, want);
            }
            same_as(&mut s, &m, pool.into_iter())?;
        }
    }

    /// A long run of keys sharing a long prefix, each a prefix of the next:
    /// every entry but the restart points stores one byte of key.
    #[test]
    fn keys_that_extend_each_other() {
        let mut s = KvState::new();
        let mut m = BTreeMap::new();
        let mut key = vec![b'x'; 1000];
        for i in 0..3000u32 {
            key.push((i % 7) as u8);
            // Every third key goes through the overlay (written out of order).
            if i % 3 == 0 {
                m.insert(key.clone(), i.to_le_bytes().to_vec());
            } else {
                s.put(&key, &i.to_le_bytes());
                m.insert(key.clone(), i.to_le_bytes().to_vec());
            }
        }
        for (k, v) in m.iter().step_by(3) {
            s.put(k, v);
        }
        s.compact();
        assert!(s
            .iter()
            .map(|(k, v)| (k.into_owned(), v.to_vec()))
            .eq(m.clone()));
        for (k, v) in m.iter().step_by(11) {
            assert_eq!(s.get(k), Some(v.as_slice()));
            assert_eq!(s.get(&k[..k.len() - 1]).is_some(), k.len() > 1001);
            assert_eq!(
                s.range(Bound::Excluded(k), Bound::Unbounded)
                    .next()
                    .map(|(k, _)| k.into_owned()),
                m.range::<Vec<u8>, _>((Bound::Excluded(k), Bound::Unbounded))
                    .next()
                    .map(|(k, _)| k.clone())
            );
        }
        assert_eq!(s.prefix(&[b'x'; 1000]).count(), 3000);
    }

    #[test]
    fn inverted_and_empty_bounds_with_an_overlay_are_empty_not_a_panic() {
        let mut s = KvState::new();
        // Enough keys for the overlay to hold several chunks (in descending
        // order, so that they go to the overlay, not to the last leaf).
        for i in (0..=255u8).rev() {
            s.put(&[b'a', i], b"0");
        }
        s.put(b"a", b"1");
        s.put(b"b", b"2");
        assert_eq!(
            s.range(Bound::Included(b"b"), Bound::Excluded(b"a"))
                .count(),
            0
        );
        assert_eq!(
            s.range(Bound::Excluded(b"a"), Bound::Excluded(b"a"))
                .count(),
            0
        );
        assert_eq!(
            s.range(Bound::Included(b"a"), Bound::Excluded(b"a"))
                .count(),
            0
        );
        assert_eq!(
            s.range(Bound::Included(b"a"), Bound::Included(b"a"))
                .count(),
            1
        );
        assert_eq!(
            s.range(Bound::Included(b"b"), Bound::Included(b"a"))
                .count(),
            0
        );
    }

    /// Many leaves, merges that split groups at restart points, deletes,
    /// and every kind of bound landing inside and between restart intervals.
    #[test]
    fn many_leaves_match_a_btreemap() {
        let mut s = KvState::new();
        let mut m = BTreeMap::new();
        let mut x = 7u64;
        for i in 0..40_000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let key = format!("k{:06}", (x >> 33) % 30_000).into_bytes();
            if i % 7 == 3 {
                s.delete(&key);
                m.remove(&key);
            } else {
                let v = vec![(i % 251) as u8; (x % 300) as usize];
                s.put(&key, &v);
                m.insert(key, v);
            }
        }
        // Merged a window at a time along the way.
        assert!(s.leaves.len() >= 2 * WINDOWS, "{} leaves", s.leaves.len());
        assert_eq!(s.overlay_bytes, overlay_cost_of(&s));
        for compacted in [false, true] {
            if compacted {
                s.compact();
                assert!(s.overlay.is_empty());
            }
            assert_eq!(s.len(), m.len() as u64);
            assert!(s
                .iter()
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .eq(m.clone()));
            for k in (0..30_000u64).step_by(97) {
                let key = format!("k{k:06}").into_bytes();
                assert_eq!(s.get(&key), m.get(&key).map(Vec::as_slice));
                let got: Vec<_> = s
                    .range(Bound::Excluded(&key), Bound::Unbounded)
                    .take(40)
                    .map(|(k, _)| k.to_vec())
                    .collect();
                let want: Vec<_> = m
                    .range::<Vec<u8>, _>((Bound::Excluded(&key), Bound::Unbounded))
                    .take(40)
                    .map(|(k, _)| k.clone())
                    .collect();
                assert_eq!(got, want);
            }
        }
    }

    #[test]
    fn large_state_compacts_into_leaves() {
        let mut s = KvState::new();
        for i in 0..50_000u32 {
            s.put(
                format!("key:{:08}", (i * 7919) % 50_000).as_bytes(),
                &[7u8; 100],
            );
        }
        s.compact();
        assert_eq!(s.len(), 50_000);
        let per_entry = s.heap_bytes() as f64 / 50_000.0;
        // 12-byte keys, prefix-compressed to about 1.7 bytes (one at 15
        // entries of 16, the whole key at restart points), 100-byte values,
        // three length bytes and a quarter of an offset; and the free tail
        // of the last leaf each merge window wrote.
        assert!(per_entry < 108.0, "{per_entry} bytes per entry");
        assert_eq!(s.get(b"key:00012345"), Some(&[7u8; 100][..]));
        assert_eq!(s.prefix(b"key:0001").count(), 10_000);
    }
}
