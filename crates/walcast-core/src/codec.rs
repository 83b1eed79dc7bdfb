//! Small, bounds-checked byte readers and writers shared by the binary formats.

use crate::error::DecodeError;

/// `s` split at the first `sep` (an ASCII byte), without it: what
/// `str::split_once` does with a `char`, without the code of `char`
/// patterns in the wasm module.
pub(crate) fn cut(s: &str, sep: u8) -> Option<(&str, &str)> {
    let i = s.bytes().position(|b| b == sep)?;
    // An ASCII byte is a whole character: both ends are boundaries.
    Some((&s[..i], &s[i + 1..]))
}

/// A cursor over a byte slice that reports truncation as a [`DecodeError`]
/// and never panics. `base` is added to positions in errors so they name the
/// offset within the whole object.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    base: u64,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], base: u64) -> Self {
        Reader { buf, pos: 0, base }
    }

    pub(crate) fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    pub(crate) fn bytes(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() as u64 {
            return Err(DecodeError::Truncated {
                what,
                at: self.offset(),
                need: n,
                have: self.remaining() as u64,
            });
        }
        let n = n as usize;
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn array<const N: usize>(
        &mut self,
        what: &'static str,
    ) -> Result<[u8; N], DecodeError> {
        let s = self.bytes(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn magic(
        &mut self,
        expected: &[u8; 4],
        what: &'static str,
    ) -> Result<(), DecodeError> {
        let at = self.offset();
        let found = self.array::<4>(what)?;
        if &found != expected {
            return Err(DecodeError::BadMagic {
                what,
                at,
                expected: *expected,
                found,
            });
        }
        Ok(())
    }

    /// Unsigned LEB128, at most 10 bytes, minimal encoding.
    pub(crate) fn varint(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        // One byte (below 128: lengths of keys and small values, op
        // counts) is the common case of every batch a replica applies.
        if let Some(&b) = self.buf.get(self.pos) {
            if b < 0x80 {
                self.pos += 1;
                return Ok(u64::from(b));
            }
        }
        let at = self.offset();
        let mut value: u64 = 0;
        for i in 0..10u32 {
            let b = self.u8(what)?;
            let low = u64::from(b & 0x7f);
            if i == 9 && b > 1 {
                return Err(invalid(what, at, "varint overflows u64"));
            }
            value |= low << (7 * i);
            if b & 0x80 == 0 {
                if b == 0 && i > 0 {
                    return Err(invalid(what, at, "varint is not minimal"));
                }
                return Ok(value);
            }
        }
        Err(invalid(what, at, "varint longer than 10 bytes"))
    }

    /// A varint length followed by that many bytes, with `len <= limit`.
    pub(crate) fn len_prefixed(
        &mut self,
        what: &'static str,
        limit: u64,
    ) -> Result<&'a [u8], DecodeError> {
        let at = self.offset();
        let len = self.varint(what)?;
        if len > limit {
            return Err(DecodeError::TooLarge {
                what,
                at,
                len,
                limit,
            });
        }
        self.bytes(len, what)
    }
}

// `invalid` and `check_crc` stay out of line: every decoder calls them, and
// inlined they cost the wasm module more than a call (docs/BENCHMARKS.md).
#[inline(never)]
pub(crate) fn invalid(what: &'static str, at: u64, why: impl Into<String>) -> DecodeError {
    DecodeError::Invalid {
        what,
        at,
        why: why.into(),
    }
}

#[inline(never)]
pub(crate) fn check_crc(
    what: &'static str,
    at: u64,
    stored: u32,
    bytes: &[u8],
) -> Result<(), DecodeError> {
    let computed = crate::crc::hash(bytes);
    if computed != stored {
        return Err(DecodeError::Checksum {
            what,
            at,
            stored,
            computed,
        });
    }
    Ok(())
}

pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(crate) fn put_len_prefixed(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// The little-endian `u32` at `bytes[i..i + 4]`, for fields at fixed
/// offsets of a structure whose length was checked (panics otherwise).
pub(crate) fn le32(bytes: &[u8], i: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&bytes[i..i + 4]);
    u32::from_le_bytes(w)
}

/// The little-endian `u64` at `bytes[i..i + 8]` (see [`le32`]).
pub(crate) fn le64(bytes: &[u8], i: usize) -> u64 {
    u64::from(le32(bytes, i)) | u64::from(le32(bytes, i + 4)) << 32
}
