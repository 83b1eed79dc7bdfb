//! The ordered map of recent writes that [`crate::state::KvState`] and the
//! lazy replica keep over their sorted data: keys to an LSN and a value or
//! a tombstone.
//!
//! A sorted vector cut into chunks of at most [`CHUNK`] entries: a lookup
//! binary-searches the chunks by their last key, then the chunk; an insert
//! moves at most a chunk's entries, and a full chunk splits in two (or, at
//! the end of the map, a new chunk starts, so keys written in order fill
//! their chunks); a chunk that removes leave under a quarter full joins a
//! neighbour it fits in, and `retain` joins every pair of neighbours that
//! fit in one. It does what the replica needs of `BTreeMap` (point
//! reads, ordered ranges, retain) in a fraction of its code, which counts
//! in the wasm module, with about the same memory per entry.

use std::ops::Bound;

/// An overlay entry's value: the LSN of the write (a lazy replica's
/// overlay keeps it to drop what a newer snapshot covers; a
/// [`crate::state::KvState`] stores 0) and the value, or `None` for a
/// deletion.
pub(crate) type Slot = (u64, Option<Box<[u8]>>);

type Entry = (Box<[u8]>, Slot);

/// Most entries a chunk holds (its allocation's size: chunks are allocated
/// full size once, and never grow).
const CHUNK: usize = 128;

/// Writes not yet merged into sorted data, by key.
#[derive(Debug, Default, Clone)]
pub(crate) struct Overlay {
    /// Non-empty, each sorted, each one's keys below the next one's.
    chunks: Vec<Vec<Entry>>,
    len: usize,
}

/// A position: chunk, then entry within it (`(chunks.len(), 0)` is the end).
type Pos = (usize, usize);

impl Overlay {
    /// An empty overlay.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Entries held.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds nothing.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops every entry.
    pub(crate) fn clear(&mut self) {
        *self = Self::default();
    }

    /// The first position whose entry's key is not `before` (keys are in
    /// order, so `before` holds for a prefix of them).
    fn pos(&self, before: impl Fn(&[u8]) -> bool) -> Pos {
        let c = self
            .chunks
            .partition_point(|ch| ch.last().is_some_and(|e| before(&e.0)));
        match self.chunks.get(c) {
            Some(ch) => (c, ch.partition_point(|e| before(&e.0))),
            None => (c, 0),
        }
    }

    /// Where `key` is (`Ok`) or would go (`Err`): chunk and entry.
    fn find(&self, key: &[u8]) -> (usize, Result<usize, usize>) {
        let (c, i) = self.pos(|k| k < key);
        match self.chunks.get(c) {
            Some(ch) if *ch[i].0 == *key => (c, Ok(i)),
            _ => (c, Err(i)),
        }
    }

    /// The value of `key`.
    pub(crate) fn get(&self, key: &[u8]) -> Option<&Slot> {
        match self.find(key) {
            (c, Ok(i)) => Some(&self.chunks[c][i].1),
            _ => None,
        }
    }

    /// The value of `key`, to change in place.
    pub(crate) fn get_mut(&mut self, key: &[u8]) -> Option<&mut Slot> {
        match self.find(key) {
            (c, Ok(i)) => Some(&mut self.chunks[c][i].1),
            _ => None,
        }
    }

    /// Whether `key` has an entry.
    pub(crate) fn contains_key(&self, key: &[u8]) -> bool {
        self.find(key).1.is_ok()
    }

    /// Sets the value of `key`; returns the value it replaced.
    pub(crate) fn insert(&mut self, key: Box<[u8]>, slot: Slot) -> Option<Slot> {
        let (mut c, mut i) = match self.find(&key) {
            (c, Ok(i)) => return Some(std::mem::replace(&mut self.chunks[c][i].1, slot)),
            (c, Err(i)) => (c, i),
        };
        if c == self.chunks.len() {
            // Past the last key: the last chunk, or a new one when it is full.
            match self.chunks.last() {
                Some(ch) if ch.len() < CHUNK => {
                    c -= 1;
                    i = ch.len();
                }
                _ => {
                    self.chunks.push(Vec::with_capacity(CHUNK));
                    i = 0;
                }
            }
        } else if self.chunks[c].len() == CHUNK {
            // A full chunk splits in two.
            let mut right = Vec::with_capacity(CHUNK);
            right.extend(self.chunks[c].drain(CHUNK / 2..));
            self.chunks.insert(c + 1, right);
            if i > CHUNK / 2 {
                c += 1;
                i -= CHUNK / 2;
            }
        }
        self.chunks[c].insert(i, (key, slot));
        self.len += 1;
        None
    }

    /// Removes `key`'s entry; returns its value.
    pub(crate) fn remove(&mut self, key: &[u8]) -> Option<Slot> {
        let (c, Ok(i)) = self.find(key) else {
            return None;
        };
        let (_, slot) = self.chunks[c].remove(i);
        self.len -= 1;
        // A chunk left nearly empty joins a neighbour it fits in, so that
        // removes do not leave a chunk's allocation behind for a few entries.
        let n = self.chunks[c].len();
        if n < CHUNK / 4 {
            if self.chunks.get(c + 1).is_some_and(|x| x.len() + n <= CHUNK) {
                let next = self.chunks.remove(c + 1);
                self.chunks[c].extend(next);
            } else if c > 0 && self.chunks[c - 1].len() + n <= CHUNK {
                let cur = self.chunks.remove(c);
                self.chunks[c - 1].extend(cur);
            } else if n == 0 {
                self.chunks.remove(c);
            }
        }
        Some(slot)
    }

    /// Keeps the entries for which `keep` says true, in order; then joins
    /// neighbouring chunks that fit in one (any two neighbours left hold
    /// more than a chunk's entries: the chunks stay over half full).
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&[u8], &mut Slot) -> bool) {
        let mut chunks: Vec<Vec<Entry>> = Vec::with_capacity(self.chunks.len());
        for mut ch in std::mem::take(&mut self.chunks) {
            ch.retain_mut(|(k, s)| keep(k, s));
            match chunks.last_mut() {
                Some(last) if last.len() + ch.len() <= CHUNK => last.append(&mut ch),
                _ => chunks.push(ch),
            }
        }
        chunks.retain(|ch| !ch.is_empty());
        self.len = chunks.iter().map(Vec::len).sum();
        self.chunks = chunks;
    }

    /// The entry with the greatest key.
    pub(crate) fn last_key_value(&self) -> Option<(&[u8], &Slot)> {
        let (k, s) = self.chunks.last()?.last()?;
        Some((k, s))
    }

    /// Every entry, in key order.
    pub(crate) fn iter(&self) -> Range<'_> {
        self.range((Bound::Unbounded, Bound::Unbounded))
    }

    /// The entries with keys within `bounds`, in key order (none when the
    /// bounds are inverted).
    pub(crate) fn range(&self, (start, end): (Bound<&[u8]>, Bound<&[u8]>)) -> Range<'_> {
        let at = match start {
            Bound::Unbounded => (0, 0),
            Bound::Included(s) => self.pos(|k| k < s),
            Bound::Excluded(s) => self.pos(|k| k <= s),
        };
        let end = match end {
            Bound::Unbounded => (self.chunks.len(), 0),
            Bound::Included(e) => self.pos(|k| k <= e),
            Bound::Excluded(e) => self.pos(|k| k < e),
        };
        Range {
            chunks: &self.chunks,
            at,
            end,
        }
    }
}

/// Entries of an [`Overlay`] in key order: see [`Overlay::range`].
#[derive(Debug, Clone)]
pub(crate) struct Range<'a> {
    chunks: &'a [Vec<Entry>],
    at: Pos,
    end: Pos,
}

impl<'a> Iterator for Range<'a> {
    type Item = (&'a [u8], &'a Slot);

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.end {
            return None;
        }
        let ch = &self.chunks[self.at.0];
        let (k, s) = &ch[self.at.1];
        self.at.1 += 1;
        if self.at.1 == ch.len() {
            self.at = (self.at.0 + 1, 0);
        }
        Some((k, s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn bound(kind: u8, k: &[u8]) -> Bound<&[u8]> {
        match kind % 3 {
            0 => Bound::Unbounded,
            1 => Bound::Included(k),
            _ => Bound::Excluded(k),
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u16, u64),
        Remove(u16),
        Retain(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (any::<u16>(), any::<u64>()).prop_map(|(k, v)| Op::Insert(k, v)),
            3 => any::<u16>().prop_map(Op::Remove),
            1 => any::<u16>().prop_map(Op::Retain),
        ]
    }

    /// Keys from a small space (so that inserts replace and removes hit),
    /// spread or in order.
    fn key(k: u16, ordered: bool) -> Box<[u8]> {
        let k = if ordered { k } else { k % 700 };
        format!("k{k:05}").into_bytes().into()
    }

    proptest! {
        #[test]
        fn behaves_as_a_btree_map(ops in proptest::collection::vec(op(), 0..3000), ordered: bool,
                                  ranges in proptest::collection::vec((any::<u8>(), any::<u16>(), any::<u8>(), any::<u16>()), 1..20)) {
            let mut o = Overlay::new();
            let mut m: BTreeMap<Box<[u8]>, Slot> = BTreeMap::new();
            let mut n = 0u16;
            for op in ops {
                match op {
                    Op::Insert(k, v) => {
                        let k = if ordered { n = n.wrapping_add(1 + k % 3); key(n, true) } else { key(k, false) };
                        let s = (v, (v % 5 != 0).then(|| v.to_le_bytes().into()));
                        prop_assert_eq!(o.insert(k.clone(), s.clone()), m.insert(k, s));
                    }
                    Op::Remove(k) => {
                        let k = key(k, ordered);
                        prop_assert_eq!(o.remove(&k), m.remove(&k));
                    }
                    Op::Retain(k) => {
                        // Drops the keys from `k` on, 50 of them.
                        let (lo, hi) = (key(k, ordered), key(k.saturating_add(50), ordered));
                        let keep = |x: &[u8]| x < &*lo || x >= &*hi;
                        o.retain(|x, s| { s.0 ^= 1; keep(x) });
                        m.retain(|x, s| { s.0 ^= 1; keep(x) });
                    }
                }
                prop_assert_eq!(o.len(), m.len());
            }
            prop_assert!(o.chunks.iter().all(|c| !c.is_empty() && c.len() <= CHUNK && c.capacity() <= CHUNK));
            prop_assert!(o.iter().map(|(k, s)| (k.to_vec(), s.clone())).eq(m.iter().map(|(k, s)| (k.to_vec(), s.clone()))));
            prop_assert_eq!(o.last_key_value().map(|(k, s)| (k.to_vec(), s.clone())), m.last_key_value().map(|(k, s)| (k.to_vec(), s.clone())));
            for (sk, s, ek, e) in ranges {
                let (s, e) = (key(s % 800, false), key(e % 800, false));
                let (lo, hi) = (bound(sk, &s), bound(ek, &e));
                let got: Vec<_> = o.range((lo, hi)).map(|(k, _)| k.to_vec()).collect();
                let want: Vec<_> = m.iter().filter(|(k, _)| {
                    (match lo { Bound::Unbounded => true, Bound::Included(s) => &***k >= s, Bound::Excluded(s) => &***k > s })
                    && (match hi { Bound::Unbounded => true, Bound::Included(e) => &***k <= e, Bound::Excluded(e) => &***k < e })
                }).map(|(k, _)| k.to_vec()).collect();
                prop_assert_eq!(got, want);
            }
            for k in 0..800u16 {
                let k = key(k, false);
                prop_assert_eq!(o.get(&k), m.get(&k));
                prop_assert_eq!(o.contains_key(&k), m.contains_key(&k));
            }
        }
    }

    /// The allocations held stay within a small multiple of the entries,
    /// however the entries left are spread.
    #[test]
    fn removes_and_retains_leave_no_sparse_chunks() {
        let key = |i: u32| i.wrapping_mul(2_654_435_761).to_be_bytes().into();
        let fill = |o: &mut Overlay| {
            for i in 0..100 * CHUNK as u32 {
                o.insert(key(i), (0, None));
            }
        };
        // At most 4 chunks per CHUNK entries, plus one.
        let sparse = |o: &Overlay| o.chunks.len() > 4 * o.len() / CHUNK + 1;
        let mut o = Overlay::new();
        fill(&mut o);
        for i in (0..100 * CHUNK as u32).filter(|i| i % 100 != 0) {
            assert!(o.remove(&key(i)).is_some());
            assert!(
                !sparse(&o),
                "{} chunks for {} entries",
                o.chunks.len(),
                o.len()
            );
        }
        let mut o = Overlay::new();
        fill(&mut o);
        let mut n = 0u32;
        o.retain(|_, _| {
            n += 1;
            n % 100 == 0
        });
        assert_eq!(o.len(), CHUNK);
        assert!(o.chunks.len() <= 2, "{} chunks", o.chunks.len());
    }

    #[test]
    fn keys_written_in_order_fill_their_chunks() {
        let mut o = Overlay::new();
        for i in 0..10 * CHUNK as u32 {
            o.insert(i.to_be_bytes().into(), (0, None));
        }
        assert_eq!(o.chunks.len(), 10);
        assert!(o.chunks.iter().all(|c| c.len() == CHUNK));
    }
}
