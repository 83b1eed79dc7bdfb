//! Heads stored gzip-compressed (`docs/FORMAT.md`, "Head encoding"): the
//! bounds on what a reader takes in and spends to decode one.

#![cfg(feature = "gzip")]

use walcast_core::catalog::{gzip_head, head_json, Head, MAX_HEAD_BYTES};
use walcast_core::DecodeError;

const HEAD: &[u8] = include_bytes!("golden/head.json");

/// One gzip member of `data` made of stored deflate blocks, followed by
/// empty stored blocks (and an `FEXTRA` field of a few bytes) so that the
/// whole stream is `total` bytes long.
fn padded_gzip(data: &[u8], total: usize) -> Vec<u8> {
    assert!(data.len() < 0xffff);
    let fixed = 10 + 2 + (5 + data.len()) + 5 + 8;
    let room = total - fixed;
    let (empty, extra) = (room / 5, room % 5);
    // FEXTRA: the flag, then XLEN and XLEN bytes.
    let mut out = vec![0x1f, 0x8b, 8, 0x04, 0, 0, 0, 0, 0, 0xff];
    out.extend_from_slice(&(extra as u16).to_le_bytes());
    out.resize(out.len() + extra, 0);
    let stored = |out: &mut Vec<u8>, last: bool, bytes: &[u8]| {
        out.push(u8::from(last));
        let n = bytes.len() as u16;
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&(!n).to_le_bytes());
        out.extend_from_slice(bytes);
    };
    stored(&mut out, false, data);
    for _ in 0..empty {
        stored(&mut out, false, &[]);
    }
    stored(&mut out, true, &[]);
    out.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    assert_eq!(out.len(), total);
    out
}

/// The stored head is at most 1 MiB whatever its encoding: a gzip head of
/// 1 MiB + 1 bytes (here made of empty deflate blocks) is refused like a JSON
/// head of that size, even though what it decodes to is small.
#[test]
fn a_gzip_head_stored_in_more_than_1_mib_is_refused() {
    // 1 MiB stored: a head.
    let ok = padded_gzip(HEAD, MAX_HEAD_BYTES);
    assert_eq!(Head::decode(&ok).unwrap(), Head::decode(HEAD).unwrap());
    let stored = padded_gzip(HEAD, MAX_HEAD_BYTES + 1);
    let err = Head::decode(&stored).expect_err("a stored head over 1 MiB");
    assert!(
        matches!(err, DecodeError::TooLarge { len, limit, .. }
            if limit == MAX_HEAD_BYTES as u64 && len == MAX_HEAD_BYTES as u64 + 1),
        "{err}"
    );
}

/// Decoding a head takes at most the 1 MiB bound on what it decodes to
/// (plus the one byte that shows a stream going past it): JSON of exactly
/// 1 MiB is not read into a buffer twice that size.
#[test]
fn decoding_a_gzip_head_reserves_at_most_its_bound() {
    let json = vec![b' '; MAX_HEAD_BYTES];
    let gz = gzip_head(&json);
    let out = head_json(&gz).expect("1 MiB decodes");
    assert_eq!(out.len(), MAX_HEAD_BYTES);
    let std::borrow::Cow::Owned(v) = out else {
        panic!("decoded into a buffer of its own")
    };
    assert!(
        v.capacity() <= MAX_HEAD_BYTES + 4096,
        "decoding 1 MiB reserved {} bytes",
        v.capacity()
    );
}

/// A head is one gzip stream of its JSON: a gzip stream inside it is not a
/// head, for any reader (a publisher's `Head::decode` refuses it, and so
/// must whatever decodes the stream first and then decodes the head).
#[test]
fn the_json_of_a_gzip_head_is_not_itself_gzip() {
    let twice = gzip_head(&gzip_head(HEAD));
    assert!(Head::decode(&twice).is_err());
    // What a reader that decodes first hands to `Head::decode`.
    let once = head_json(&twice).map(|j| j.into_owned());
    assert!(
        once.as_ref().map_or(true, |j| Head::decode(j).is_err()),
        "decoding the stream then the head reads a gzip stream inside a gzip stream"
    );
}
