//! A small map from `u64` keys (LSNs, file offsets) to values, kept as a
//! sorted vector: the replica's bookkeeping maps hold tens to a few
//! thousand entries and change once per network answer, where a sorted
//! vector is as fast as a tree and its code is a fraction of the size (one
//! `BTreeMap` or `HashMap` instantiation per value type weighs several KiB
//! in the wasm module).

/// A map from `u64` to `V`, sorted by key.
#[derive(Debug, Clone)]
pub(crate) struct VecMap<V> {
    entries: Vec<(u64, V)>,
}

impl<V> Default for VecMap<V> {
    fn default() -> Self {
        VecMap {
            entries: Vec::new(),
        }
    }
}

impl<V> VecMap<V> {
    fn find(&self, key: u64) -> Result<usize, usize> {
        self.entries.binary_search_by_key(&key, |(k, _)| *k)
    }

    /// The value at `key`.
    pub(crate) fn get(&self, key: u64) -> Option<&V> {
        self.find(key).ok().map(|i| &self.entries[i].1)
    }

    /// The value at `key`, mutably.
    pub(crate) fn get_mut(&mut self, key: u64) -> Option<&mut V> {
        self.find(key).ok().map(|i| &mut self.entries[i].1)
    }

    /// True when `key` has a value.
    pub(crate) fn contains_key(&self, key: u64) -> bool {
        self.find(key).is_ok()
    }

    /// Sets `key` to `value`; returns the value it replaces.
    pub(crate) fn insert(&mut self, key: u64, value: V) -> Option<V> {
        match self.find(key) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].1, value)),
            Err(i) => {
                self.entries.insert(i, (key, value));
                None
            }
        }
    }

    /// Removes `key`; returns its value.
    pub(crate) fn remove(&mut self, key: u64) -> Option<V> {
        self.find(key).ok().map(|i| self.entries.remove(i).1)
    }

    /// Keeps the entries `keep` says to keep.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(u64, &mut V) -> bool) {
        self.entries.retain_mut(|(k, v)| keep(*k, v));
    }

    /// Removes every entry.
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
    }

    /// Entries held.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Entries in key order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &V)> {
        self.entries.iter().map(|(k, v)| (*k, v))
    }
}

#[cfg(test)]
mod tests {
    use super::VecMap;
    use std::collections::BTreeMap;

    /// Any sequence of operations leaves the same entries as a `BTreeMap`.
    #[test]
    fn matches_a_btreemap() {
        let mut m = VecMap::default();
        let mut model = BTreeMap::new();
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        for i in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let key = x % 300;
            match x % 5 {
                0 | 1 => assert_eq!(m.insert(key, i), model.insert(key, i)),
                2 => assert_eq!(m.remove(key), model.remove(&key)),
                3 => {
                    assert_eq!(m.get(key), model.get(&key));
                    if let (Some(a), Some(b)) = (m.get_mut(key), model.get_mut(&key)) {
                        *a += 1;
                        *b += 1;
                    }
                }
                _ => {
                    let cut = x % 7;
                    m.retain(|k, _| k % 7 != cut);
                    model.retain(|k, _| k % 7 != cut);
                }
            }
            assert_eq!(m.len(), model.len());
            assert_eq!(m.contains_key(key), model.contains_key(&key));
        }
        let got: Vec<(u64, u64)> = m.iter().map(|(k, v)| (k, *v)).collect();
        let want: Vec<(u64, u64)> = model.into_iter().collect();
        assert_eq!(got, want);
        m.clear();
        assert_eq!(m.len(), 0);
    }
}
