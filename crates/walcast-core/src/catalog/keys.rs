//! The dataset's identity and the keys the format derives for its objects.

use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};

use crate::codec::cut;
use crate::error::{DecodeError, Quoted};

/// Checks that `key` is exactly the key the format derives for the object it
/// names, so no catalog entry can point outside the dataset's own object kinds
/// (`../x`, the head itself, an absolute path, a query).
pub(super) fn check_key(what: &str, key: &str, expected: &str) -> Result<(), String> {
    if key == expected {
        Ok(())
    } else {
        Err(format!(
            "{what} key {} is not the key the format derives ({})",
            Quoted::str(key),
            Quoted::str(expected)
        ))
    }
}

/// The kind of immutable object `key` names, if it has the exact shape of a
/// segment, snapshot or page key; `None` for anything else (the head, a
/// relative path with `..`, stray files).
pub fn object_kind(key: &str) -> Option<&'static str> {
    // Each shape: its prefix, suffix and kind, and its numbers between
    // them, each with its width (0: any) and the byte after it (0: the
    // last). Numbers hold digits only, so the last has no separator in it:
    // a key has exactly the parts of its shape.
    type Shape = (
        &'static str,
        &'static str,
        &'static str,
        &'static [(usize, u8)],
    );
    const SHAPES: [Shape; 4] = [
        (
            "segments/",
            ".wseg",
            "segment",
            &[(0, b'/'), (20, b'-'), (20, 0)],
        ),
        ("snapshots/", ".wsnap", "snapshot", &[(20, b'-'), (0, 0)]),
        (
            "deltas/",
            ".wdelta",
            "delta",
            &[(20, b'-'), (20, b'-'), (0, 0)],
        ),
        (
            "catalog/pages/",
            ".json",
            "page",
            &[(0, b'-'), (20, b'-'), (20, b'-'), (0, 0)],
        ),
    ];
    for (prefix, suffix, kind, numbers) in SHAPES {
        let Some(rest) = key.strip_prefix(prefix) else {
            continue;
        };
        let mut rest = rest.strip_suffix(suffix)?;
        for &(width, sep) in numbers {
            let (n, more) = match sep {
                0 => (rest, ""),
                _ => cut(rest, sep)?,
            };
            let ok = !n.is_empty()
                && n.len() <= 20
                && n.bytes().all(|b| b.is_ascii_digit())
                && (width == 0 || n.len() == width)
                && n.parse::<u64>().is_ok();
            if !ok {
                return None;
            }
            rest = more;
        }
        return Some(kind);
    }
    None
}

/// A dataset's random 128-bit identity, written as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct DatasetId(pub [u8; 16]);

impl DatasetId {
    /// Derives an id from a caller-provided seed (the core has no randomness
    /// of its own; drivers pass random bytes).
    pub fn from_seed(seed: u64) -> Self {
        let mut s = seed;
        let mut out = [0u8; 16];
        for chunk in out.chunks_mut(8) {
            chunk.copy_from_slice(&crate::rng::splitmix64(&mut s).to_le_bytes());
        }
        DatasetId(out)
    }
}

impl fmt::Display for DatasetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for DatasetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatasetId({self})")
    }
}

impl FromStr for DatasetId {
    type Err = DecodeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        let bad = || {
            DecodeError::Json(format!(
                "dataset_id {} is not 32 lowercase hex digits",
                Quoted::str(s)
            ))
        };
        if b.len() != 32 {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        for (i, pair) in b.chunks(2).enumerate() {
            let hex = |c: u8| match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                _ => None,
            };
            out[i] = (hex(pair[0]).ok_or_else(bad)? << 4) | hex(pair[1]).ok_or_else(bad)?;
        }
        Ok(DatasetId(out))
    }
}

impl Serialize for DatasetId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Key of a segment: `segments/<epoch>/<first:020>-<last:020>.wseg`.
pub fn segment_key(epoch: u64, first: u64, last: u64) -> String {
    format!("segments/{epoch}/{first:020}-{last:020}.wseg")
}

/// Key of a snapshot: `snapshots/<lsn:020>-<epoch>.wsnap`.
pub fn snapshot_key(lsn: u64, epoch: u64) -> String {
    format!("snapshots/{lsn:020}-{epoch}.wsnap")
}

/// Key of a delta snapshot: `deltas/<base:020>-<lsn:020>-<epoch>.wdelta`.
pub fn delta_key(base_lsn: u64, lsn: u64, epoch: u64) -> String {
    format!("deltas/{base_lsn:020}-{lsn:020}-{epoch}.wdelta")
}

/// Key of a page: `catalog/pages/<level>-<first:020>-<last:020>-<epoch>.json`.
pub fn page_key(level: u32, first: u64, last: u64, epoch: u64) -> String {
    format!("catalog/pages/{level}-{first:020}-{last:020}-{epoch}.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_kind_takes_the_derived_keys_and_nothing_near_them() {
        assert_eq!(object_kind(&segment_key(3, 1, 20)), Some("segment"));
        assert_eq!(object_kind(&snapshot_key(7, 2)), Some("snapshot"));
        assert_eq!(object_kind(&delta_key(7, 90, 2)), Some("delta"));
        assert_eq!(object_kind(&page_key(1, 5, 9, 2)), Some("page"));
        let z = "0".repeat(20);
        for key in [
            "head.json".to_string(),
            format!("segments/3/{z}-{z}-{z}.wseg"),
            format!("segments/3-{z}/{z}.wseg"),
            format!("segments/3/{z}{z}.wseg"),
            format!("segments//{z}-{z}.wseg"),
            format!("segments/3/{z}-{z}.wsnap"),
            format!("segments/x/{z}-{z}.wseg"),
            format!("snapshots/{z}.wsnap"),
            format!("snapshots/{z}-2-3.wsnap"),
            "snapshots/0-2.wsnap".to_string(),
            format!("deltas/{z}-{z}.wdelta"),
            format!("deltas/{z}-{z}-2-3.wdelta"),
            format!("deltas/{z}-{z}-.wdelta"),
            format!("catalog/pages/1-{z}-{z}.json"),
            format!("catalog/pages/1-{z}-{z}-2-3.json"),
            format!("catalog/pages/1-{z}-{z}-99999999999999999999999.json"),
            format!("catalog/pages/../1-{z}-{z}-2.json"),
        ] {
            assert_eq!(object_kind(&key), None, "{key}");
        }
    }
}
