//! The ordered key/value state a replica serves, kept compact enough for an
//! edge isolate.
//!
//! Layout: most entries live in sorted, packed *leaves* (one `Vec<u8>` of
//! `varint key_len, key, varint value_len, value` plus a `u32` offset per
//! 16 entries: about 2.3 bytes of overhead per entry). Recent writes go to a small
//! ordered overlay (a `BTreeMap` with tombstones), merged into the leaves it
//! touches once it grows past a fraction of the state. Reads consult the
//! overlay first.

use std::collections::BTreeMap;
use std::ops::Bound;

use crate::batch::OpRef;
use crate::codec::put_len_prefixed;

/// Target bytes of entries per leaf.
const LEAF_TARGET: usize = 16 << 10;
/// The overlay is merged once it holds this many bytes, or 1/16 of the
/// leaves' bytes, whichever is larger.
const OVERLAY_MIN: usize = 1 << 20;

/// Entries between two restart points of a leaf: one `u32` offset per
/// this many entries instead of one per entry.
const RESTART_EVERY: u32 = 16;

/// Sorted entries packed in one buffer. Entries are addressed by their byte
/// position in `data`; `restarts` holds the position of every
/// [`RESTART_EVERY`]th entry (the first included), so a lookup is a binary
/// search over restarts and then a short scan.
#[derive(Debug, Clone, Default)]
struct Leaf {
    data: Vec<u8>,
    restarts: Vec<u32>,
    count: u32,
    /// Position of the last entry.
    last: u32,
}

impl Leaf {
    /// The entry at byte position `pos` and the position after it.
    fn at(&self, pos: usize) -> (&[u8], &[u8], usize) {
        // Leaves are only built by this module from validated entries, so the
        // reads cannot fail; out of range gives empty slices rather than panic.
        let (k, after_key) = len_prefixed_at(&self.data, pos);
        let (v, next) = len_prefixed_at(&self.data, after_key);
        (k, v, next)
    }

    fn first_key(&self) -> &[u8] {
        len_prefixed_at(&self.data, 0).0
    }

    fn last_key(&self) -> &[u8] {
        len_prefixed_at(&self.data, self.last as usize).0
    }

    fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// `Ok(position)` of `key`, or `Err(position)` of the first entry above
    /// it (the end of the data when none is).
    fn find(&self, key: &[u8]) -> Result<usize, usize> {
        let r = self
            .restarts
            .partition_point(|&p| len_prefixed_at(&self.data, p as usize).0 <= key);
        let Some(ri) = r.checked_sub(1) else {
            return Err(0);
        };
        let mut pos = self.restarts[ri] as usize;
        let end = self
            .restarts
            .get(ri + 1)
            .map_or(self.data.len(), |&p| p as usize);
        while pos < end {
            let (k, _, next) = self.at(pos);
            match k.cmp(key) {
                std::cmp::Ordering::Less => pos = next,
                std::cmp::Ordering::Equal => return Ok(pos),
                std::cmp::Ordering::Greater => return Err(pos),
            }
        }
        Err(end)
    }

    fn push(&mut self, key: &[u8], value: &[u8]) {
        let pos = self.data.len() as u32;
        if self.count % RESTART_EVERY == 0 {
            self.restarts.push(pos);
        }
        self.last = pos;
        self.count += 1;
        put_len_prefixed(&mut self.data, key);
        put_len_prefixed(&mut self.data, value);
    }

    fn shrink(&mut self) {
        self.data.shrink_to_fit();
        self.restarts.shrink_to_fit();
    }

    fn heap_bytes(&self) -> usize {
        self.data.capacity() + self.restarts.capacity() * 4
    }
}

/// The length-prefixed bytes at `at` of a leaf's data and the position
/// after them: the hot path of every read and merge, without the error
/// reporting of the format readers (a leaf is written by this module only). Out of
/// range gives empty bytes.
#[inline]
fn len_prefixed_at(data: &[u8], at: usize) -> (&[u8], usize) {
    let mut len = 0usize;
    let mut pos = at;
    let mut shift = 0u32;
    loop {
        let Some(&b) = data.get(pos) else {
            return (&[], data.len());
        };
        pos += 1;
        len |= usize::from(b & 0x7f) << shift;
        if b < 0x80 {
            break;
        }
        shift += 7;
        if shift >= usize::BITS {
            return (&[], data.len());
        }
    }
    match pos
        .checked_add(len)
        .and_then(|end| data.get(pos..end).map(|s| (s, end)))
    {
        Some(found) => found,
        None => (&[], data.len()),
    }
}

/// Appends sorted entries into leaves of the target size.
///
/// Entries are written into one scratch buffer that keeps its capacity, and
/// each leaf is then copied out at its exact size: a leaf never holds the
/// slack of a growing vector, and the allocations a merge makes are of the
/// sizes of the leaves it frees (little fragmentation of a wasm heap, which
/// never shrinks). A group (the entries replacing one old leaf) ends with
/// [`LeafWriter::end_group`]: a group below twice the target stays one
/// leaf, so merging a few overlay entries into a leaf does not split off a
/// small one.
#[derive(Debug, Default)]
struct LeafWriter {
    out: Vec<Leaf>,
    cur: Leaf,
}

impl LeafWriter {
    fn push(&mut self, key: &[u8], value: &[u8]) {
        self.cur.push(key, value);
        if self.cur.data.len() >= 2 * LEAF_TARGET {
            self.emit_head();
        }
    }

    /// Emits the entries before the first restart point at or after
    /// [`LEAF_TARGET`] as a leaf, keeping the rest in the scratch buffer
    /// (cutting at a restart point keeps both parts' restarts aligned).
    fn emit_head(&mut self) {
        let c = &mut self.cur;
        let ri = c
            .restarts
            .partition_point(|&p| (p as usize) < LEAF_TARGET)
            .max(1);
        if ri >= c.restarts.len() {
            self.emit_all();
            return;
        }
        let at = c.restarts[ri] as usize;
        // The head's last entry: walk its last restart interval.
        let mut last = c.restarts[ri - 1] as usize;
        loop {
            let (_, _, next) = c.at(last);
            if next >= at {
                break;
            }
            last = next;
        }
        self.out.push(Leaf {
            data: c.data[..at].to_vec(),
            restarts: c.restarts[..ri].to_vec(),
            count: ri as u32 * RESTART_EVERY,
            last: last as u32,
        });
        c.data.drain(..at);
        c.restarts.drain(..ri);
        for p in &mut c.restarts {
            *p -= at as u32;
        }
        c.count -= ri as u32 * RESTART_EVERY;
        c.last -= at as u32;
    }

    fn emit_all(&mut self) {
        let c = &mut self.cur;
        if !c.is_empty() {
            self.out.push(Leaf {
                data: c.data.as_slice().to_vec(),
                restarts: c.restarts.as_slice().to_vec(),
                count: c.count,
                last: c.last,
            });
            c.data.clear();
            c.restarts.clear();
            c.count = 0;
            c.last = 0;
        }
    }

    /// Ends a group: what the scratch buffer holds becomes one leaf.
    fn end_group(&mut self) {
        self.emit_all();
    }

    /// Adds a leaf that needs no rewrite.
    fn keep(&mut self, leaf: Leaf) {
        self.end_group();
        self.out.push(leaf);
    }

    fn finish(mut self) -> Vec<Leaf> {
        self.end_group();
        self.out
    }
}

type Overlay = BTreeMap<Box<[u8]>, Option<Box<[u8]>>>;

/// An ordered map from byte keys to byte values.
#[derive(Debug, Clone, Default)]
pub struct KvState {
    leaves: Vec<Leaf>,
    leaf_bytes: usize,
    overlay: Overlay,
    overlay_bytes: usize,
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
        if let Some(v) = self.overlay.get(key) {
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
        let last = self.leaves.last()?;
        if !last.is_empty() && key > last.last_key() {
            return None;
        }
        let li = self.leaf_for(key)?;
        let leaf = &self.leaves[li];
        leaf.find(key).ok().map(|pos| leaf.at(pos).1)
    }

    /// Sets `key` to `value`.
    pub fn put(&mut self, key: &[u8], value: &[u8]) {
        if self.is_append(key) {
            self.append(key, value);
            return;
        }
        self.overlay_bytes += key.len() + value.len() + 48;
        // One overlay traversal: what the insert replaced says whether the key was present.
        match self.overlay.insert(key.into(), Some(value.into())) {
            Some(Some(_)) => {}
            Some(None) => self.len += 1,
            None => {
                if self.base_get(key).is_none() {
                    self.len += 1;
                }
            }
        }
        self.maybe_compact();
    }

    /// True when `key` sorts after every key held, in the leaves and the overlay.
    fn is_append(&self, key: &[u8]) -> bool {
        let past_leaves = match self.leaves.last() {
            None => true,
            Some(l) => !l.is_empty() && key > l.last_key(),
        };
        past_leaves
            && self
                .overlay
                .last_key_value()
                .is_none_or(|(k, _)| key > &**k)
    }

    /// Adds a key that sorts after every key held straight to the last leaf
    /// (sequential and time-ordered keys skip the overlay).
    fn append(&mut self, key: &[u8], value: &[u8]) {
        let full = self
            .leaves
            .last()
            .is_none_or(|l| l.data.len() >= LEAF_TARGET);
        if full {
            if let Some(l) = self.leaves.last_mut() {
                l.shrink();
            }
            // Room for a full leaf at once: appends do not regrow it (a
            // leaf is full at LEAF_TARGET, shrunk to its size then).
            self.leaves.push(Leaf {
                data: Vec::with_capacity(LEAF_TARGET + 256),
                ..Leaf::default()
            });
        }
        let leaf = self.leaves.last_mut().expect("pushed above");
        let before = leaf.data.len();
        leaf.push(key, value);
        self.leaf_bytes += leaf.data.len() - before;
        self.len += 1;
    }

    /// Removes `key`; a no-op when absent.
    pub fn delete(&mut self, key: &[u8]) {
        if self.get(key).is_none() {
            return;
        }
        self.len -= 1;
        if self.base_get(key).is_some() {
            self.overlay_bytes += key.len() + 48;
            self.overlay.insert(key.into(), None);
        } else {
            self.overlay.remove(key);
        }
        self.maybe_compact();
    }

    /// Applies a decoded batch. Batches are validated before they get here
    /// ([`crate::batch::decode`] returns nothing unless all of it is valid),
    /// so this applies all of it.
    pub fn apply(&mut self, ops: &[OpRef<'_>]) {
        for op in ops {
            match *op {
                OpRef::Put(k, v) => self.put(k, v),
                OpRef::Delete(k) => self.delete(k),
            }
        }
    }

    fn maybe_compact(&mut self) {
        if self.overlay_bytes >= OVERLAY_MIN.max(self.leaf_bytes / 16) {
            self.compact();
        }
    }

    /// Merges the overlay into the leaves.
    pub fn compact(&mut self) {
        if self.overlay.is_empty() {
            return;
        }
        let overlay = std::mem::take(&mut self.overlay);
        self.overlay_bytes = 0;
        let old = std::mem::take(&mut self.leaves);
        let mut w = LeafWriter {
            out: Vec::with_capacity(old.len() + 1),
            ..LeafWriter::default()
        };
        let mut ov = overlay.into_iter().peekable();
        let nleaves = old.len();
        let firsts: Vec<Vec<u8>> = old.iter().skip(1).map(|l| l.first_key().to_vec()).collect();
        for (i, leaf) in old.into_iter().enumerate() {
            // Overlay entries belonging to this leaf: below the next leaf's first key.
            let upper = firsts.get(i).map(Vec::as_slice);
            let touches = match (ov.peek(), upper) {
                (Some((k, _)), Some(u)) => &**k < u,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if !touches {
                w.keep(leaf);
                continue;
            }
            let mut j = 0;
            while j < leaf.data.len()
                || ov
                    .peek()
                    .is_some_and(|(k, _)| upper.is_none_or(|u| &**k < u))
            {
                let next_ov = ov.peek().filter(|(k, _)| upper.is_none_or(|u| &**k < u));
                match (j < leaf.data.len(), next_ov) {
                    (true, Some((ok, _))) => {
                        let (lk, lv, next) = leaf.at(j);
                        match lk.cmp(ok) {
                            std::cmp::Ordering::Less => {
                                w.push(lk, lv);
                                j = next;
                            }
                            std::cmp::Ordering::Equal => {
                                j = next;
                                let (k, v) = ov.next().expect("peeked");
                                if let Some(v) = v {
                                    w.push(&k, &v);
                                }
                            }
                            std::cmp::Ordering::Greater => {
                                let (k, v) = ov.next().expect("peeked");
                                if let Some(v) = v {
                                    w.push(&k, &v);
                                }
                            }
                        }
                    }
                    (true, None) => {
                        let (lk, lv, next) = leaf.at(j);
                        w.push(lk, lv);
                        j = next;
                    }
                    (false, Some(_)) => {
                        let (k, v) = ov.next().expect("peeked");
                        if let Some(v) = v {
                            w.push(&k, &v);
                        }
                    }
                    (false, None) => break,
                }
            }
            // The old leaf goes before the next one is written, so its
            // memory can hold the next leaf.
            drop(leaf);
            w.end_group();
        }
        if nleaves == 0 {
            for (k, v) in ov {
                if let Some(v) = v {
                    w.push(&k, &v);
                }
            }
        }
        let mut out = w.finish();
        out.shrink_to_fit();
        self.leaf_bytes = out.iter().map(|l| l.data.len()).sum();
        self.leaves = out;
    }

    /// Iterates entries between `start` and `end` in key order.
    pub fn range(&self, start: Bound<&[u8]>, end: Bound<&[u8]>) -> Range<'_> {
        let (li, ei) = match start {
            Bound::Unbounded => (0, 0),
            Bound::Included(k) | Bound::Excluded(k) => match self.leaf_for(k) {
                None => (0, 0),
                Some(li) => {
                    let leaf = &self.leaves[li];
                    let ei = match leaf.find(k) {
                        Ok(pos) if matches!(start, Bound::Excluded(_)) => leaf.at(pos).2,
                        Ok(pos) | Err(pos) => pos,
                    };
                    (li, ei)
                }
            },
        };
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
            self.overlay
                .range::<[u8], _>((Bound::Included(&[][..]), Bound::Excluded(&[][..])))
        } else {
            self.overlay.range::<[u8], _>((start, end))
        };
        Range {
            leaves: &self.leaves,
            li: if empty { self.leaves.len() } else { li },
            ei,
            end: match end {
                Bound::Unbounded => Bound::Unbounded,
                Bound::Included(k) => Bound::Included(k.into()),
                Bound::Excluded(k) => Bound::Excluded(k.into()),
            },
            overlay: if empty { None } else { Some(overlay) },
            ov_peek: None,
            base_peek: None,
        }
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
            + self.overlay_bytes
    }

    /// Builds a state from a [`SortedBuilder`] (used by snapshot loading).
    pub(crate) fn from_sorted_leaves(builder: SortedBuilder) -> KvState {
        let leaves = builder.w.finish();
        KvState {
            leaf_bytes: leaves.iter().map(|l| l.data.len()).sum(),
            leaves,
            overlay: BTreeMap::new(),
            overlay_bytes: 0,
            len: builder.count,
        }
    }
}

/// Builds a [`KvState`] from entries in strictly ascending key order without
/// going through the overlay.
#[derive(Debug, Default)]
pub(crate) struct SortedBuilder {
    w: LeafWriter,
    last: Option<Vec<u8>>,
    count: u64,
}

impl SortedBuilder {
    /// Appends an entry; returns false if `key` is not above the previous key.
    pub(crate) fn push(&mut self, key: &[u8], value: &[u8]) -> bool {
        if let Some(l) = &self.last {
            if key <= l.as_slice() {
                return false;
            }
        }
        self.last = Some(key.to_vec());
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

type OverlayRange<'a> = std::collections::btree_map::Range<'a, Box<[u8]>, Option<Box<[u8]>>>;

/// Iterator over a key range of a [`KvState`], merging leaves and overlay.
pub struct Range<'a> {
    leaves: &'a [Leaf],
    li: usize,
    /// Byte position of the next entry in the current leaf.
    ei: usize,
    end: Bound<Box<[u8]>>,
    overlay: Option<OverlayRange<'a>>,
    ov_peek: Option<(&'a [u8], Option<&'a [u8]>)>,
    base_peek: Option<(&'a [u8], &'a [u8])>,
}

impl std::fmt::Debug for Range<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Range")
            .field("leaf", &self.li)
            .field("entry", &self.ei)
            .finish()
    }
}

impl<'a> Range<'a> {
    fn next_base(&mut self) -> Option<(&'a [u8], &'a [u8])> {
        while self.li < self.leaves.len() {
            let leaf = &self.leaves[self.li];
            if self.ei < leaf.data.len() {
                let (k, v, next) = leaf.at(self.ei);
                let e = (k, v);
                self.ei = next;
                let before_end = match &self.end {
                    Bound::Unbounded => true,
                    Bound::Included(k) => e.0 <= &**k,
                    Bound::Excluded(k) => e.0 < &**k,
                };
                if !before_end {
                    self.li = self.leaves.len();
                    return None;
                }
                return Some(e);
            }
            self.li += 1;
            self.ei = 0;
        }
        None
    }

    fn next_overlay(&mut self) -> Option<(&'a [u8], Option<&'a [u8]>)> {
        self.overlay
            .as_mut()?
            .next()
            .map(|(k, v)| (&**k, v.as_deref()))
    }
}

impl<'a> Iterator for Range<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
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
                    return Some(b);
                }
                (None, Some((k, v))) => {
                    self.ov_peek = None;
                    if let Some(v) = v {
                        return Some((k, v));
                    }
                }
                (Some(b), Some((k, v))) => match b.0.cmp(k) {
                    std::cmp::Ordering::Less => {
                        self.base_peek = None;
                        return Some(b);
                    }
                    std::cmp::Ordering::Equal => {
                        self.base_peek = None;
                        self.ov_peek = None;
                        if let Some(v) = v {
                            return Some((k, v));
                        }
                    }
                    std::cmp::Ordering::Greater => {
                        self.ov_peek = None;
                        if let Some(v) = v {
                            return Some((k, v));
                        }
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `s` holds what `m` holds, before and after a compaction, for every
    /// key in `keys` too.
    fn same_as(
        s: &mut KvState,
        m: &BTreeMap<Vec<u8>, Vec<u8>>,
        keys: impl Iterator<Item = Vec<u8>>,
    ) -> Result<(), TestCaseError> {
        prop_assert_eq!(s.len(), m.len() as u64);
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

    #[test]
    fn inverted_and_empty_bounds_with_an_overlay_are_empty_not_a_panic() {
        let mut s = KvState::new();
        // Enough keys for the overlay's tree to have inner nodes.
        for i in 0..100u8 {
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
        for compacted in [false, true] {
            if compacted {
                s.compact();
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
        // 12-byte keys + 100-byte values + ~2.3 bytes framing and offsets.
        assert!(per_entry < 125.0, "{per_entry} bytes per entry");
        assert_eq!(s.get(b"key:00012345"), Some(&[7u8; 100][..]));
        assert_eq!(s.prefix(b"key:0001").count(), 10_000);
    }
}
