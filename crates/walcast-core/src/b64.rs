//! Standard base64 with padding (RFC 4648 §4), strict, as the catalog
//! (tail bodies, snapshot suffixes) and keys and signatures write it.
//!
//! The replica reads it in the wasm module, where the `base64` crate's
//! general engine costs about 5 KB of code; this is the one alphabet and
//! padding mode the formats use. Decoding accepts exactly what
//! `base64::engine::general_purpose::STANDARD` accepts (canonical padding,
//! no bits set after the last byte, nothing else); the tests hold it to
//! that crate.

use std::fmt;

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Why a text is not base64.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base64Error {
    /// The length is not a multiple of 4.
    Length(usize),
    /// A byte outside the alphabet, or padding where none may be, at this offset.
    Byte(usize),
    /// Bits set after the last byte the text encodes.
    TrailingBits,
}

impl fmt::Display for Base64Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Base64Error::Length(n) => write!(f, "length {n} is not a multiple of 4"),
            Base64Error::Byte(at) => write!(f, "invalid byte at offset {at}"),
            Base64Error::TrailingBits => f.write_str("bits set after the last byte"),
        }
    }
}

fn value(c: u8) -> Option<u32> {
    Some(u32::from(match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => return None,
    }))
}

/// Decodes `text`; allocates at most three quarters of its length.
pub fn decode(text: &[u8]) -> Result<Vec<u8>, Base64Error> {
    if text.len() % 4 != 0 {
        return Err(Base64Error::Length(text.len()));
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let quads = text.len() / 4;
    for (q, chunk) in text.chunks_exact(4).enumerate() {
        let last = q + 1 == quads;
        // Padding only at the end of the last quad, one or two bytes.
        let pad = if last {
            chunk.iter().rev().take_while(|&&c| c == b'=').count()
        } else {
            0
        };
        if pad > 2 {
            return Err(Base64Error::Byte(q * 4 + 1));
        }
        let mut n = 0u32;
        for (i, &c) in chunk[..4 - pad].iter().enumerate() {
            n = n << 6 | value(c).ok_or(Base64Error::Byte(q * 4 + i))?;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        let keep = 3 - pad;
        if bytes[keep..].iter().any(|&b| b != 0) {
            return Err(Base64Error::TrailingBits);
        }
        out.extend_from_slice(&bytes[..keep]);
    }
    Ok(out)
}

/// Shows bytes as base64 with padding (what [`encode`] returns).
pub struct Display<'a>(pub &'a [u8]);

impl fmt::Display for Display<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 4 * 64];
        for block in self.0.chunks(3 * 64) {
            let mut len = 0;
            for c in block.chunks(3) {
                let n = c
                    .iter()
                    .enumerate()
                    .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
                for i in 0..4 {
                    buf[len + i] = if i <= c.len() {
                        ALPHABET[(n >> (18 - 6 * i) & 63) as usize]
                    } else {
                        b'='
                    };
                }
                len += 4;
            }
            // Only ASCII from the alphabet and '=' was written.
            f.write_str(std::str::from_utf8(&buf[..len]).map_err(|_| fmt::Error)?)?;
        }
        Ok(())
    }
}

/// `bytes` as base64 with padding.
pub fn encode(bytes: &[u8]) -> String {
    Display(bytes).to_string()
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use proptest::prelude::*;

    #[test]
    fn rfc_4648_vectors() {
        for (plain, text) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(super::encode(plain.as_bytes()), text);
            assert_eq!(super::decode(text.as_bytes()).unwrap(), plain.as_bytes());
        }
        for bad in [
            "Zg=", "Zh==", "Zm9=v", "Z===", "====", "Zg==Zg==", "Zm9v\n", "Zm-v",
        ] {
            assert!(super::decode(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn encodes_as_the_base64_crate(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            prop_assert_eq!(super::encode(&bytes), STANDARD.encode(&bytes));
            prop_assert_eq!(super::decode(STANDARD.encode(&bytes).as_bytes()).unwrap(), bytes);
        }

        #[test]
        fn accepts_what_the_base64_crate_accepts(
            text in proptest::collection::vec(
                prop_oneof![Just(b'='), Just(b'A'), Just(b'/'), Just(b'Q'), Just(b'g'), any::<u8>()],
                0..40,
            )
        ) {
            prop_assert_eq!(super::decode(&text).ok(), STANDARD.decode(&text).ok());
        }
    }
}
