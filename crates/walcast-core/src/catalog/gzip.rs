//! Heads stored as one gzip stream (`--head-encoding gzip`): decoding one
//! to at most [`MAX_HEAD_BYTES`], and writing one.

use super::*;

/// The first two bytes of a gzip stream (RFC 1952). A head is JSON and so
/// starts with `{`; a head stored gzip-compressed starts with these.
pub const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// The JSON of a head as stored: `bytes` themselves, or, when they are one
/// gzip stream ([`GZIP_MAGIC`]), what it decodes to. Decoding stops past
/// [`MAX_HEAD_BYTES`] (a `TooLarge` error, however far the stream would
/// go), and a stream that is damaged, truncated or followed by anything is
/// a `Json` error naming why.
#[cfg(feature = "gzip")]
pub fn head_json(bytes: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, DecodeError> {
    use std::io::Read as _;
    if !bytes.starts_with(&GZIP_MAGIC) {
        return Ok(std::borrow::Cow::Borrowed(bytes));
    }
    let too_large = |what, len: usize| DecodeError::TooLarge {
        what,
        at: 0,
        len: len as u64,
        limit: MAX_HEAD_BYTES as u64,
    };
    // The stored object is bounded as a JSON head is.
    if bytes.len() > MAX_HEAD_BYTES {
        return Err(too_large("catalog head (gzip)", bytes.len()));
    }
    let mut gz = flate2::bufread::GzDecoder::new(bytes);
    // Read by chunks into a buffer that never grows past the bound (plus
    // the byte that shows a stream going past it).
    let (mut out, mut chunk) = (Vec::new(), [0u8; 16 << 10]);
    loop {
        let n = match gz.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(DecodeError::Json(format!(
                    "the gzip-compressed head does not decode: {e}"
                )))
            }
        };
        let n = n.min(MAX_HEAD_BYTES + 1 - out.len());
        if out.capacity() < out.len() + n {
            let want = (out.capacity() * 2)
                .max(out.len() + n)
                .min(MAX_HEAD_BYTES + 1);
            out.reserve_exact(want - out.len());
        }
        out.extend_from_slice(&chunk[..n]);
        if out.len() > MAX_HEAD_BYTES {
            return Err(too_large("catalog head (gzip-decoded)", out.len()));
        }
    }
    let rest = gz.into_inner().len();
    if rest > 0 {
        return Err(DecodeError::Json(format!(
            "{rest} bytes follow the head's gzip stream"
        )));
    }
    // One stream of the JSON: not a stream of another stream.
    if out.starts_with(&GZIP_MAGIC) {
        return Err(DecodeError::Json(
            "the head's gzip stream holds another gzip stream, not JSON".into(),
        ));
    }
    Ok(std::borrow::Cow::Owned(out))
}

/// Without the `gzip` feature (the wasm module, whose JS driver decodes a
/// gzip head before it hands it over) the bytes as they are: a gzip head
/// then fails [`Head::decode`]'s first check.
#[cfg(not(feature = "gzip"))]
#[inline(always)]
pub fn head_json(bytes: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, DecodeError> {
    Ok(std::borrow::Cow::Borrowed(bytes))
}

/// Compresses a head's JSON ([`Head::encode`]) into one gzip stream, as a
/// publisher with [`crate::publisher::PublisherConfig::head_gzip`] stores
/// it. [`head_json`] gives the JSON back.
#[cfg(feature = "gzip")]
pub fn gzip_head(json: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(json.len() / 2),
        flate2::Compression::new(6),
    );
    // Writing into a Vec cannot fail.
    let _ = gz.write_all(json);
    gz.finish().unwrap_or_default()
}

#[cfg(all(test, feature = "gzip"))]
mod gzip_tests {
    use super::*;
    use std::io::Write as _;

    const HEAD: &[u8] = include_bytes!("../../tests/golden/head.json");

    fn gzip_raw(data: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn a_gzip_head_decodes_to_the_same_head() {
        let plain = Head::decode(HEAD).unwrap();
        let gz = gzip_head(HEAD);
        assert!(gz.starts_with(&GZIP_MAGIC) && gz.len() < HEAD.len());
        assert_eq!(Head::decode(&gz).unwrap(), plain);
        assert_eq!(&head_json(&gz).unwrap()[..], HEAD);
        // Plain JSON is passed through untouched.
        assert!(matches!(
            head_json(HEAD).unwrap(),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn a_gzip_bomb_stops_at_the_head_bound() {
        // 64 MiB of spaces after the head: less than a GET of the head
        // may bring.
        let mut big = HEAD.to_vec();
        big.resize(64 << 20, b' ');
        let gz = gzip_raw(&big);
        assert!(gz.len() < MAX_HEAD_BYTES, "{}", gz.len());
        let err = Head::decode(&gz).unwrap_err();
        assert!(
            matches!(err, DecodeError::TooLarge { len, limit, .. }
                if limit == MAX_HEAD_BYTES as u64 && len == limit + 1),
            "{err}"
        );
    }

    #[test]
    fn damaged_truncated_or_trailed_gzip_is_refused() {
        let gz = gzip_head(HEAD);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("truncated", gz[..gz.len() - 9].to_vec()),
            ("magic only", GZIP_MAGIC.to_vec()),
            ("trailing bytes", [gz.clone(), b"{}".to_vec()].concat()),
            ("a second member", [gz.clone(), gz.clone()].concat()),
            ("a flipped bit", {
                let mut d = gz.clone();
                let mid = d.len() / 2;
                d[mid] ^= 0x10;
                d
            }),
            ("not JSON inside", gzip_raw(b"\x00\x01 not a head")),
        ];
        for (what, bytes) in cases {
            let err = Head::decode(&bytes).expect_err(what);
            assert!(
                matches!(
                    err,
                    DecodeError::Json(_)
                        | DecodeError::Checksum { .. }
                        | DecodeError::TooLarge { .. }
                ),
                "{what}: {err}"
            );
        }
    }
}
