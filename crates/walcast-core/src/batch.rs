//! The KV batch codec: the payload of one record in KV mode, applied
//! atomically. See `docs/FORMAT.md`.

use crate::codec::{invalid, put_len_prefixed, put_varint, Reader};
use crate::error::DecodeError;

/// KV batch format version.
pub const VERSION: u8 = 1;
/// Largest key accepted.
pub const MAX_KEY_LEN: u64 = 64 << 10;
/// Largest value accepted.
pub const MAX_VALUE_LEN: u64 = 64 << 20;

const TAG_PUT: u8 = 1;
const TAG_DELETE: u8 = 2;

/// One operation of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Op {
    /// Set `key` to `value`.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
    },
    /// Remove `key` (a no-op when absent).
    Delete {
        /// The key.
        key: Vec<u8>,
    },
}

impl Op {
    /// A put.
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
        }
    }

    /// A delete.
    pub fn delete(key: impl Into<Vec<u8>>) -> Self {
        Op::Delete { key: key.into() }
    }

    /// The key the op touches.
    pub fn key(&self) -> &[u8] {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }
}

/// A borrowed operation, as decoded from a record without copying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpRef<'a> {
    /// Set `key` to `value`.
    Put(&'a [u8], &'a [u8]),
    /// Remove `key`.
    Delete(&'a [u8]),
}

/// Encodes a batch. Returns an error naming the op when a key or value is
/// above the limits.
pub fn encode(ops: &[Op]) -> Result<Vec<u8>, crate::Error> {
    let mut out = Vec::with_capacity(
        2 + ops
            .iter()
            .map(|o| match o {
                Op::Put { key, value } => key.len() + value.len() + 8,
                Op::Delete { key } => key.len() + 4,
            })
            .sum::<usize>(),
    );
    out.push(VERSION);
    put_varint(&mut out, ops.len() as u64);
    for (i, op) in ops.iter().enumerate() {
        if op.key().len() as u64 > MAX_KEY_LEN {
            return Err(crate::Error::new(
                crate::ErrorKind::InvalidInput,
                format!(
                    "op {i}: key of {} bytes exceeds {MAX_KEY_LEN}",
                    op.key().len()
                ),
            ));
        }
        match op {
            Op::Put { key, value } => {
                if value.len() as u64 > MAX_VALUE_LEN {
                    return Err(crate::Error::new(
                        crate::ErrorKind::InvalidInput,
                        format!(
                            "op {i}: value of {} bytes exceeds {MAX_VALUE_LEN}",
                            value.len()
                        ),
                    ));
                }
                out.push(TAG_PUT);
                put_len_prefixed(&mut out, key);
                put_len_prefixed(&mut out, value);
            }
            Op::Delete { key } => {
                out.push(TAG_DELETE);
                put_len_prefixed(&mut out, key);
            }
        }
    }
    Ok(out)
}

/// A batch whose every operation was checked: iterating it yields them in
/// order from the payload's bytes, allocating nothing, however many tiny
/// operations the payload holds.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    /// The bytes after the op count.
    ops: &'a [u8],
    count: usize,
}

impl<'a> Batch<'a> {
    /// Validates a whole batch without allocating. Nothing is returned
    /// unless the whole payload is valid, so applying the result is
    /// all-or-nothing.
    pub fn parse(payload: &'a [u8]) -> Result<Self, DecodeError> {
        parse_careful(payload)
    }

    /// The number of operations.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the batch holds no operation.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The operations, in order.
    pub fn iter(&self) -> Ops<'a> {
        Ops {
            rest: self.ops,
            left: self.count,
        }
    }
}

impl<'a> IntoIterator for Batch<'a> {
    type Item = OpRef<'a>;
    type IntoIter = Ops<'a>;

    fn into_iter(self) -> Ops<'a> {
        self.iter()
    }
}

/// The operations of a [`Batch`], in order.
#[derive(Debug, Clone)]
pub struct Ops<'a> {
    rest: &'a [u8],
    left: usize,
}

impl<'a> Iterator for Ops<'a> {
    type Item = OpRef<'a>;

    #[inline]
    fn next(&mut self) -> Option<OpRef<'a>> {
        // The bytes were validated: the `?`s below never stop a batch
        // early (they keep a broken invariant from panicking).
        self.left = self.left.checked_sub(1)?;
        let (&tag, r) = self.rest.split_first()?;
        let (key, r) = split_len_prefixed(r)?;
        let (op, r) = if tag == TAG_PUT {
            let (value, r) = split_len_prefixed(r)?;
            (OpRef::Put(key, value), r)
        } else {
            (OpRef::Delete(key), r)
        };
        self.rest = r;
        Some(op)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

/// A varint length of a validated batch and that many bytes, and the bytes
/// after them.
#[inline]
fn split_len_prefixed(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = match short_varint(b) {
        Some(x) => x,
        None => {
            let mut v = 0u64;
            let end = b.iter().take(10).position(|&x| x < 0x80)?;
            for (i, &x) in b[..=end].iter().enumerate() {
                v |= u64::from(x & 0x7f) << (7 * i);
            }
            (usize::try_from(v).ok()?, &b[end + 1..])
        }
    };
    (len <= rest.len()).then(|| rest.split_at(len))
}

/// Decodes and validates a whole batch into borrowed ops (a vector of them:
/// [`Batch::parse`] checks and yields them without one). Nothing is
/// returned unless the whole payload is valid.
pub fn decode(payload: &[u8]) -> Result<Vec<OpRef<'_>>, DecodeError> {
    Batch::parse(payload).map(|b| b.iter().collect())
}

/// A minimal varint of one or two bytes (below 16,384) and the bytes after it.
#[inline]
fn short_varint(b: &[u8]) -> Option<(usize, &[u8])> {
    match *b {
        [x, ref rest @ ..] if x < 0x80 => Some((usize::from(x), rest)),
        // Minimal: a second byte of 0 would not be.
        [x, y, ref rest @ ..] if (1..0x80).contains(&y) => {
            Some((usize::from(x & 0x7f) | usize::from(y) << 7, rest))
        }
        _ => None,
    }
}

/// The careful decoder: any valid batch, and an error naming the offset of
/// the first fault of an invalid one.
fn parse_careful(payload: &[u8]) -> Result<Batch<'_>, DecodeError> {
    let mut r = Reader::new(payload, 0);
    let version = r.u8("KV batch")?;
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion {
            what: "KV batch",
            version: u64::from(version),
            known: u64::from(VERSION),
        });
    }
    let at = r.offset();
    let count = r.varint("KV batch op count")?;
    // Every op takes at least 2 bytes: a bound from the bytes actually present.
    if count > (r.remaining() as u64) / 2 {
        return Err(invalid(
            "KV batch",
            at,
            format!("op count {count} exceeds what the payload can hold"),
        ));
    }
    let ops = &payload[r.offset() as usize..];
    for _ in 0..count {
        let at = r.offset();
        match r.u8("KV op tag")? {
            TAG_PUT => {
                r.len_prefixed("KV key", MAX_KEY_LEN)?;
                r.len_prefixed("KV value", MAX_VALUE_LEN)?;
            }
            TAG_DELETE => {
                r.len_prefixed("KV key", MAX_KEY_LEN)?;
            }
            t => return Err(invalid("KV op tag", at, format!("unknown op tag {t}"))),
        }
    }
    if !r.is_empty() {
        return Err(invalid(
            "KV batch",
            r.offset(),
            "trailing bytes after the last op",
        ));
    }
    Ok(Batch {
        ops,
        // At most half the payload's length: it fits.
        count: count as usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Batches with lengths of one, two and three varint bytes decode to
    /// the ops they encode; cut, extended and malformed ones are refused.
    #[test]
    fn batches_decode_to_their_ops_and_nothing_else_is_taken() {
        let big = vec![9u8; 300];
        let huge = vec![8u8; 20_000];
        let good = [
            vec![Op::put(b"k".to_vec(), b"v".to_vec())],
            vec![
                Op::put(b"k".to_vec(), big.clone()),
                Op::delete(b"d".to_vec()),
            ],
            vec![Op::put(big.clone(), huge), Op::delete(big.clone())],
            vec![],
        ];
        let mut bad: Vec<Vec<u8>> = vec![
            vec![],
            vec![2, 0],
            vec![1, 1, 3, 0],
            // A non-minimal two-byte length.
            vec![1, 1, 2, 0x81, 0x00, b'k'],
            // A count the payload cannot hold.
            vec![1, 0x80, 0x01, 1, 0, 0],
        ];
        for ops in &good {
            let g = encode(ops).unwrap();
            let back: Vec<Op> = Batch::parse(&g)
                .unwrap()
                .iter()
                .map(|op| match op {
                    OpRef::Put(k, v) => Op::put(k, v),
                    OpRef::Delete(k) => Op::delete(k),
                })
                .collect();
            assert_eq!(&back, ops);
            assert_eq!(decode(&g).unwrap().len(), ops.len());
            bad.push(g[..g.len() - 1].to_vec());
            let mut trailing = g.clone();
            trailing.push(0);
            bad.push(trailing);
        }
        for p in &bad {
            assert!(Batch::parse(p).is_err(), "payload {p:?}");
        }
    }
}
