//! Decoding the catalog's JSON (heads and pages) into its types.
//!
//! The catalog is parsed with `miniserde`, whose JSON reader is small enough
//! for the wasm module (one parser with no per-type code paths), into plain
//! mirror structs that say which members are optional; the conversion to the
//! public types below is where defaults are filled in. Encoding stays with
//! `serde_json` (`Serialize` on the public types), so the bytes the
//! publisher writes are unchanged.
//!
//! What the reader accepts: one JSON object (RFC 8259) in UTF-8, with
//! nothing after it but whitespace. Unknown members are ignored, as the
//! compatibility rules in `docs/FORMAT.md` require; a member given twice
//! keeps its last value. Integers must fit their field (`u32` or `u64`):
//! fractions, exponents, negative numbers and `null` for a required member
//! are refused. Arrays and objects nest at most [`MAX_JSON_DEPTH`] deep;
//! nesting costs no stack (the reader keeps its own).

use std::collections::BTreeMap;

use miniserde::Deserialize;

use super::{
    DatasetId, DeltaEntry, Head, Page, PageRef, Retired, SegmentEntry, SnapshotEntry, TailSegment,
};
use crate::error::DecodeError;
use crate::segment::IndexEntry;
use crate::trust::{HeadTrust, KeyEndorsement};

/// Deepest nesting of arrays and objects accepted in a head or page. The
/// catalog's own members nest at most 4 deep; unknown members may add more,
/// up to this (the limit serde_json applied before). The reader keeps a
/// stack entry per open level, so without a limit a hostile page of 16 MiB
/// of `[` would take hundreds of MB.
pub(crate) const MAX_JSON_DEPTH: usize = 128;

/// Refuses input nesting arrays and objects deeper than [`MAX_JSON_DEPTH`]
/// (brackets inside strings do not count), in one pass that allocates
/// nothing.
fn check_depth(what: &str, bytes: &[u8]) -> Result<(), DecodeError> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (at, &b) in bytes.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return Err(DecodeError::Json(format!(
                        "{what} nests arrays and objects deeper than {MAX_JSON_DEPTH} \
                         (at offset {at})"
                    )));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Parses `bytes` as one JSON value of type `T`; `what` names the object in
/// the error ("catalog head", "catalog page").
fn parse<T: Deserialize>(what: &str, bytes: &[u8]) -> Result<T, DecodeError> {
    check_depth(what, bytes)?;
    let text = std::str::from_utf8(bytes).map_err(|e| {
        DecodeError::Json(format!(
            "{what} is not UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })?;
    miniserde::json::from_str(text).map_err(|_| {
        DecodeError::Json(format!(
            "{what} is not a JSON object of the catalog's shape (malformed JSON, a \
             required member missing, or a member of the wrong type or range)"
        ))
    })
}

/// The catalog format version a head or page declares, read before anything
/// else so that a newer format is refused as such.
pub(super) fn format_of(what: &str, bytes: &[u8]) -> Result<u32, DecodeError> {
    #[derive(Deserialize)]
    struct Probe {
        format: u32,
    }
    parse::<Probe>(what, bytes).map(|p| p.format)
}

#[derive(Deserialize)]
struct SegmentJson {
    key: String,
    epoch: u64,
    first_lsn: u64,
    last_lsn: u64,
    size: u64,
    crc32: u32,
    records_end: u64,
    index: Vec<(u64, u64)>,
}

impl From<SegmentJson> for SegmentEntry {
    fn from(s: SegmentJson) -> Self {
        SegmentEntry {
            key: s.key,
            epoch: s.epoch,
            first_lsn: s.first_lsn,
            last_lsn: s.last_lsn,
            size: s.size,
            crc32: s.crc32,
            records_end: s.records_end,
            index: s.index.into_iter().map(IndexEntry::from).collect(),
        }
    }
}

#[derive(Deserialize)]
struct SnapshotJson {
    key: String,
    lsn: u64,
    epoch: u64,
    size: u64,
    crc32: u32,
    entries: u64,
    version: Option<u16>,
    suffix: Option<String>,
}

#[derive(Deserialize)]
struct DeltaJson {
    key: String,
    base_lsn: u64,
    lsn: u64,
    epoch: u64,
    size: u64,
    crc32: u32,
    entries: u64,
    suffix_len: u64,
}

#[derive(Deserialize)]
struct PageRefJson {
    key: String,
    level: u32,
    first_lsn: u64,
    last_lsn: u64,
    count: u32,
    crc32: u32,
}

impl From<PageRefJson> for PageRef {
    fn from(p: PageRefJson) -> Self {
        PageRef {
            key: p.key,
            level: p.level,
            first_lsn: p.first_lsn,
            last_lsn: p.last_lsn,
            count: p.count,
            crc32: p.crc32,
        }
    }
}

#[derive(Deserialize)]
struct TailJson {
    key: String,
    body: String,
}

#[derive(Deserialize)]
struct RetiredJson {
    key: String,
    since_ms: u64,
}

#[derive(Deserialize)]
struct EndorsementJson {
    key: String,
    by: String,
    signature: String,
}

#[derive(Deserialize)]
struct TrustJson {
    signer: String,
    chain: Option<Vec<EndorsementJson>>,
    digests: Option<BTreeMap<String, String>>,
    index_digests: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct HeadJson {
    format: u32,
    dataset_id: String,
    epoch: u64,
    generation: u64,
    committed_lsn: u64,
    earliest_lsn: u64,
    writer: Option<String>,
    committed_at_ms: Option<u64>,
    snapshot: Option<SnapshotJson>,
    segments: Vec<SegmentJson>,
    pages: Option<Vec<PageRefJson>>,
    retired: Option<Vec<RetiredJson>>,
    deltas: Option<Vec<DeltaJson>>,
    tail: Option<Vec<TailJson>>,
    trust: Option<TrustJson>,
}

#[derive(Deserialize)]
struct PageJson {
    format: u32,
    level: u32,
    segments: Option<Vec<SegmentJson>>,
    pages: Option<Vec<PageRefJson>>,
    digests: Option<BTreeMap<String, String>>,
}

fn list<J, T: From<J>>(v: Option<Vec<J>>) -> Vec<T> {
    v.unwrap_or_default().into_iter().map(T::from).collect()
}

/// Parses a head's JSON (its checksum already verified by the caller).
pub(super) fn head(bytes: &[u8]) -> Result<Head, DecodeError> {
    let h: HeadJson = parse("catalog head", bytes)?;
    let tail = h
        .tail
        .unwrap_or_default()
        .into_iter()
        .map(|t| {
            let body = crate::b64::decode(t.body.as_bytes()).map_err(|e| {
                DecodeError::Json(format!("tail body of {} is not base64: {e}", t.key))
            })?;
            Ok(TailSegment { key: t.key, body })
        })
        .collect::<Result<Vec<_>, DecodeError>>()?;
    Ok(Head {
        format: h.format,
        dataset_id: h.dataset_id.parse::<DatasetId>()?,
        epoch: h.epoch,
        generation: h.generation,
        committed_lsn: h.committed_lsn,
        earliest_lsn: h.earliest_lsn,
        writer: h.writer.unwrap_or_default(),
        committed_at_ms: h.committed_at_ms.unwrap_or_default(),
        snapshot: match h.snapshot {
            None => None,
            Some(s) => Some(SnapshotEntry {
                suffix: s
                    .suffix
                    .map(|b| {
                        crate::b64::decode(b.as_bytes()).map_err(|e| {
                            DecodeError::Json(format!(
                                "the suffix of snapshot {} is not base64: {e}",
                                s.key
                            ))
                        })
                    })
                    .transpose()?,
                key: s.key,
                lsn: s.lsn,
                epoch: s.epoch,
                size: s.size,
                crc32: s.crc32,
                entries: s.entries,
                version: s.version.unwrap_or(1),
            }),
        },
        segments: h.segments.into_iter().map(SegmentEntry::from).collect(),
        pages: list(h.pages),
        retired: h
            .retired
            .unwrap_or_default()
            .into_iter()
            .map(|r| Retired {
                key: r.key,
                since_ms: r.since_ms,
            })
            .collect(),
        deltas: h
            .deltas
            .unwrap_or_default()
            .into_iter()
            .map(|d| DeltaEntry {
                key: d.key,
                base_lsn: d.base_lsn,
                lsn: d.lsn,
                epoch: d.epoch,
                size: d.size,
                crc32: d.crc32,
                entries: d.entries,
                suffix_len: d.suffix_len,
            })
            .collect(),
        tail,
        trust: h.trust.map(|t| HeadTrust {
            signer: t.signer,
            chain: t
                .chain
                .unwrap_or_default()
                .into_iter()
                .map(|e| KeyEndorsement {
                    key: e.key,
                    by: e.by,
                    signature: e.signature,
                })
                .collect(),
            digests: t.digests.unwrap_or_default(),
            index_digests: t.index_digests.unwrap_or_default(),
        }),
    })
}

/// Parses a page's JSON (its checksum already verified by the caller).
pub(crate) fn page(bytes: &[u8]) -> Result<Page, DecodeError> {
    let p: PageJson = parse("catalog page", bytes)?;
    Ok(Page {
        format: p.format,
        level: p.level,
        segments: list(p.segments),
        pages: list(p.pages),
        digests: p.digests.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::super::{DatasetId, Head, SegmentEntry, TailSegment};
    use crate::error::DecodeError;
    use crate::segment::IndexEntry;

    const HEAD: &str = include_str!("../../tests/golden/head.json");
    const PAGE: &str = include_str!("../../tests/golden/page.json");

    /// `text` with the one occurrence of `from` replaced by `to`.
    fn edit(text: &str, from: &str, to: &str) -> String {
        assert_eq!(
            text.matches(from).count(),
            1,
            "{from:?} is not unique in the input"
        );
        text.replacen(from, to, 1)
    }

    /// `text` with `from` replaced by `to`, checked to still be well-formed
    /// JSON, so that a refusal is about the catalog's shape, not the syntax.
    fn well_formed(text: &str, from: &str, to: &str) -> String {
        let out = edit(text, from, to);
        if let Err(e) = serde_json::from_str::<serde_json::Value>(&out) {
            panic!("{from:?} -> {to:?} is not well-formed JSON: {e}");
        }
        out
    }

    /// The message of a `DecodeError::Json`; panics on success or another kind.
    fn json_error<T: std::fmt::Debug>(r: Result<T, DecodeError>) -> String {
        match r {
            Err(DecodeError::Json(m)) => m,
            other => panic!("expected DecodeError::Json, got {other:?}"),
        }
    }

    fn head(text: &str) -> Result<Head, DecodeError> {
        super::head(text.as_bytes())
    }

    fn golden() -> Head {
        head(HEAD).expect("the golden head parses")
    }

    /// A head with one segment whose tail carries a copy of it.
    fn head_with_tail() -> String {
        let mut h = Head::new(DatasetId::from_seed(1), 3);
        let key = super::super::segment_key(3, 1, 1);
        h.committed_lsn = 1;
        h.segments.push(SegmentEntry {
            key: key.clone(),
            epoch: 3,
            first_lsn: 1,
            last_lsn: 1,
            size: 100,
            crc32: 7,
            records_end: 90,
            index: vec![IndexEntry { lsn: 1, offset: 32 }],
        });
        h.tail.push(TailSegment {
            key,
            body: b"hello".to_vec(),
        });
        String::from_utf8(h.encode()).unwrap()
    }

    #[test]
    fn golden_head_and_page_parse() {
        let h = golden();
        assert_eq!(h.epoch, 7);
        assert_eq!(h.generation, 42);
        assert_eq!(h.writer, "5f0c2a9e8b7d6c41");
        assert_eq!(h.committed_at_ms, 1_795_000_000_000);
        assert_eq!(h.segments.len(), 1);
        assert_eq!(h.segments[0].index.len(), 7);
        assert_eq!(
            h.segments[0].index[1],
            IndexEntry {
                lsn: 102,
                offset: 298
            }
        );
        assert_eq!(h.pages.len(), 1);
        assert_eq!(h.pages[0].count, 2);
        assert_eq!(h.retired.len(), 1);
        assert_eq!(h.retired[0].since_ms, 1_794_999_990_000);
        let p = super::page(PAGE.as_bytes()).unwrap();
        assert_eq!((p.format, p.level, p.segments.len()), (1, 0, 2));
        assert!(p.pages.is_empty() && p.digests.is_empty());
        assert_eq!(
            super::format_of("catalog head", HEAD.as_bytes()).unwrap(),
            1
        );
    }

    #[test]
    fn a_built_head_round_trips() {
        let text = head_with_tail();
        let h = head(&text).unwrap();
        assert_eq!(h.tail_body(&h.segments[0].key), Some(&b"hello"[..]));
        assert_eq!(h.encode(), text.as_bytes());
    }

    #[test]
    fn unknown_members_are_ignored_at_every_level() {
        let junk =
            r#""zz_unknown":{"a":[1,-2,3.5e-7,true,false,null,"\u00e9",{}],"b":{"c":[[]]}},"#;
        let mut text = edit(HEAD, r#""format":1,"#, &format!(r#"{junk}"format":1,"#));
        for at in [
            r#"{"key":"snapshots/00000000000000000139"#,
            r#"{"key":"segments/"#,
            r#"{"key":"catalog/pages/"#,
            r#"{"key":"snapshots/00000000000000000060"#,
        ] {
            text = edit(&text, at, &at.replacen('{', &format!("{{{junk}"), 1));
        }
        // Last member of the object too (no comma after it).
        text = edit(&text, "}]}", r#"}],"zz_last":[0]}"#);
        assert_eq!(text.matches("zz_unknown").count(), 5);
        assert_eq!(head(&text).unwrap(), golden());

        let page = edit(PAGE, r#""level":0,"#, &format!(r#""level":0,{junk}"#));
        let page = edit(
            &page,
            r#""epoch":6,"first_lsn":1,"#,
            &format!(r#""epoch":6,{junk}"first_lsn":1,"#),
        );
        assert_eq!(
            super::page(page.as_bytes()).unwrap(),
            super::page(PAGE.as_bytes()).unwrap()
        );
    }

    #[test]
    fn deeply_nested_unknown_values_are_ignored_without_recursion() {
        // The catalog head itself opens one object; the member's nesting
        // may take the rest of the limit.
        const DEPTH: usize = super::MAX_JSON_DEPTH - 1;
        let deep = format!("{}{}", "[".repeat(DEPTH), "]".repeat(DEPTH));
        let deep_maps = format!("{}1{}", r#"{"a":"#.repeat(DEPTH), "}".repeat(DEPTH));
        let text = edit(
            HEAD,
            r#""format":1,"#,
            &format!(r#""deep":{deep},"deep_maps":{deep_maps},"format":1,"#),
        );
        let unclosed = edit(
            HEAD,
            r#""format":1,"#,
            &format!(r#""deep":{},"format":1,"#, "[".repeat(DEPTH)),
        );
        let page = edit(
            PAGE,
            r#""level":0,"#,
            &format!(r#""level":0,"deep":{deep},"#),
        );
        // A small stack: a reader that recursed per level would overflow it.
        let (h, bad, p, f) = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || {
                (
                    head(&text),
                    head(&unclosed),
                    super::page(page.as_bytes()),
                    super::format_of("catalog head", text.as_bytes()),
                )
            })
            .unwrap()
            .join()
            .expect("the reader does not overflow the stack");
        assert_eq!(h.unwrap(), golden());
        json_error(bad);
        assert_eq!(p.unwrap(), super::page(PAGE.as_bytes()).unwrap());
        assert_eq!(f.unwrap(), 1);
    }

    /// Past the limit, nesting is refused before anything is parsed, with
    /// the offset where it went too deep; brackets in strings do not count.
    #[test]
    fn nesting_past_the_limit_is_refused_naming_the_offset() {
        let over = super::MAX_JSON_DEPTH;
        for deep in [
            format!("{}{}", "[".repeat(over), "]".repeat(over)),
            format!("{}1{}", r#"{"a":"#.repeat(over), "}".repeat(over)),
            "[".repeat(1 << 20),
        ] {
            let text = edit(
                HEAD,
                r#""format":1,"#,
                &format!(r#""deep":{deep},"format":1,"#),
            );
            let err = json_error(head(&text));
            assert!(
                err.contains(&format!("deeper than {}", super::MAX_JSON_DEPTH))
                    && err.contains("offset"),
                "{err}"
            );
            assert!(super::format_of("catalog head", text.as_bytes()).is_err());
        }
        let brackets = "[".repeat(10_000);
        let text = edit(
            HEAD,
            r#""writer":"5f0c2a9e8b7d6c41","#,
            &format!(r#""writer":"{brackets}","#),
        );
        assert_eq!(head(&text).unwrap().writer, brackets);
    }

    /// A snapshot's suffix in the head is refused when it is over
    /// `MAX_SNAPSHOT_SUFFIX`, larger than the file, or on a version 1
    /// snapshot (no top index to take), naming the snapshot; within the
    /// limits it round-trips.
    #[test]
    fn a_snapshot_suffix_out_of_bounds_is_refused() {
        let with = |version: u16, size: u64, len: usize| {
            let mut h = golden();
            let s = h.snapshot.as_mut().unwrap();
            s.version = version;
            s.size = size;
            s.suffix = Some(vec![7; len]);
            Head::decode(&h.encode())
        };
        let max = super::super::MAX_SNAPSHOT_SUFFIX;
        let ok = with(2, 1 << 20, max).unwrap();
        assert_eq!(ok.snapshot.unwrap().suffix.unwrap().len(), max);
        for (version, size, len) in [(2, 1 << 20, max + 1), (2, 100, 101), (1, 1 << 20, 10)] {
            let err = json_error(with(version, size, len));
            assert!(
                err.contains("snapshots/") && err.contains("suffix"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_missing_required_member_is_an_error() {
        for (from, to) in [
            (r#""format":1,"#, ""),
            (r#""dataset_id":"11111111111111111111111111111111","#, ""),
            (r#""epoch":7,"generation""#, r#""generation""#),
            (r#""generation":42,"#, ""),
            (r#""committed_lsn":139,"#, ""),
            (r#""earliest_lsn":1,"#, ""),
            (r#","segments":[{"#, r#","zegments":[{"#),
            (r#""lsn":139,"epoch":7,"#, r#""epoch":7,"#),
            (r#","entries":29"#, ""),
            (r#""records_end":1673,"#, ""),
            (r#","index":[[100"#, r#","zndex":[[100"#),
            (r#""count":2,"#, ""),
            (r#","since_ms":1794999990000"#, ""),
        ] {
            let text = well_formed(HEAD, from, to);
            let msg = json_error(head(&text));
            assert!(msg.contains("catalog head"), "{msg}");
        }
        let text = well_formed(&head_with_tail(), r#","body":"aGVsbG8=""#, "");
        json_error(head(&text));
        for (from, to) in [
            (r#""format":1,"#, ""),
            (r#""level":0,"#, ""),
            (r#""size":1844,"#, ""),
        ] {
            json_error(super::page(well_formed(PAGE, from, to).as_bytes()));
        }
        json_error(super::format_of(
            "catalog head",
            well_formed(HEAD, r#""format":1,"#, "").as_bytes(),
        ));
        json_error(head("{}"));
        json_error(super::page(b"{}"));
    }

    #[test]
    fn members_of_the_wrong_type_are_errors() {
        for (from, to) in [
            (r#""epoch":7,"generation""#, r#""epoch":"7","generation""#),
            (r#""epoch":7,"generation""#, r#""epoch":null,"generation""#),
            (r#""epoch":7,"generation""#, r#""epoch":true,"generation""#),
            (r#""epoch":7,"generation""#, r#""epoch":[7],"generation""#),
            (
                r#""dataset_id":"11111111111111111111111111111111""#,
                r#""dataset_id":11111111111111111111111111111111"#,
            ),
            (
                r#""dataset_id":"11111111111111111111111111111111""#,
                r#""dataset_id":null"#,
            ),
            (r#""writer":"5f0c2a9e8b7d6c41""#, r#""writer":5"#),
            (
                r#""committed_at_ms":1795000000000"#,
                r#""committed_at_ms":"1795000000000""#,
            ),
            (r#""segments":[{"#, r#""segments":null,"x":[{"#),
            (r#""segments":[{"#, r#""segments":7,"x":[{"#),
            (r#"[[100,32],"#, r#"[[100,"32"],"#),
            (r#"[[100,32],"#, r#"[[100],"#),
            (r#"[[100,32],"#, r#"[[100,32,1],"#),
            (r#""lsn":139,"epoch":7,"#, r#""lsn":null,"epoch":7,"#),
            (
                r#""key":"snapshots/00000000000000000139-7.wsnap""#,
                r#""key":139"#,
            ),
            (r#""retired":[{"#, r#""retired":"x","y":[{"#),
            (r#""pages":[{"#, r#""pages":[7,{"#),
            (r#""segments":[{"#, r#""segments":[[],{"#),
        ] {
            let text = well_formed(HEAD, from, to);
            json_error(head(&text));
        }
        json_error(super::page(
            well_formed(PAGE, r#""level":0"#, r#""level":"0""#).as_bytes(),
        ));
        json_error(super::page(
            well_formed(PAGE, r#""level":0"#, r#""level":null"#).as_bytes(),
        ));
        // Not an object at all.
        for text in ["[]", "1", "\"x\"", "null", ""] {
            json_error(head(text));
            json_error(super::page(text.as_bytes()));
        }
    }

    #[test]
    fn integers_must_be_plain_and_fit_their_field() {
        /// A member: where it is in the golden head, and the text to put
        /// there with `{}` for the number.
        type Site = (&'static str, &'static str);
        const U64: [Site; 3] = [
            (r#""epoch":7,"generation""#, r#""epoch":{},"generation""#),
            (r#","since_ms":1794999990000"#, r#","since_ms":{}"#),
            (r#"[[100,32],"#, r#"[[100,{}],"#),
        ];
        const U32: [Site; 3] = [
            (r#""format":1,"#, r#""format":{},"#),
            (r#""crc32":3727579689,"#, r#""crc32":{},"#),
            (r#""count":2,"#, r#""count":{},"#),
        ];
        const U16: [Site; 1] = [(r#","entries":29"#, r#","entries":29,"version":{}"#)];
        // Well-formed JSON numbers that are not integers of the width.
        let not_integers = ["-1", "-0", "1.0", "7.0", "1e3", "7E0", "0.7e1", "1e-0"];
        let cases: [(&[Site], &str, &str); 3] = [
            (&U64, "18446744073709551615", "18446744073709551616"),
            (&U32, "4294967295", "4294967296"),
            (&U16, "65535", "65536"),
        ];
        for (sites, max, above) in cases {
            for (from, template) in sites {
                let text = well_formed(HEAD, from, &template.replace("{}", max));
                head(&text).unwrap_or_else(|e| panic!("{template} with {max}: {e}"));
                for bad in not_integers
                    .iter()
                    .chain(&[above, "99999999999999999999999"])
                {
                    let text = well_formed(HEAD, from, &template.replace("{}", bad));
                    json_error(head(&text));
                }
            }
        }
        let text = well_formed(HEAD, r#""format":1,"#, r#""format":1.0,"#);
        json_error(super::format_of("catalog head", text.as_bytes()));
        let text = well_formed(HEAD, r#""format":1,"#, r#""format":4294967296,"#);
        json_error(super::format_of("catalog head", text.as_bytes()));
        for bad in not_integers.iter().chain(&["4294967296"]) {
            let page = well_formed(PAGE, r#""level":0,"#, &format!(r#""level":{bad},"#));
            json_error(super::page(page.as_bytes()));
        }
        // Not JSON numbers at all.
        for bad in ["007", "+7", "0x7", ".7", "7.", "7e", "-", "Infinity", "NaN"] {
            let text = edit(
                HEAD,
                r#""epoch":7,"generation""#,
                &format!(r#""epoch":{bad},"generation""#),
            );
            assert!(serde_json::from_str::<serde_json::Value>(&text).is_err());
            json_error(head(&text));
        }
    }

    #[test]
    fn the_largest_integers_fit() {
        let text = edit(
            HEAD,
            r#""epoch":7,"generation""#,
            r#""epoch":18446744073709551615,"generation""#,
        );
        assert_eq!(head(&text).unwrap().epoch, u64::MAX);
        let text = edit(HEAD, r#""crc32":3727579689,"#, r#""crc32":4294967295,"#);
        assert_eq!(head(&text).unwrap().segments[0].crc32, u32::MAX);
        let text = edit(HEAD, r#"[[100,32],"#, r#"[[18446744073709551615,0],"#);
        assert_eq!(
            head(&text).unwrap().segments[0].index[0],
            IndexEntry {
                lsn: u64::MAX,
                offset: 0
            }
        );
        let text = edit(HEAD, r#","entries":29"#, r#","entries":29,"version":65535"#);
        assert_eq!(head(&text).unwrap().snapshot.unwrap().version, u16::MAX);
    }

    #[test]
    fn invalid_utf8_is_an_error_naming_its_offset() {
        let at = HEAD.find("5f0c2a9e").unwrap();
        for bad in [&[0xff][..], &[0xc3], &[0xed, 0xa0, 0x80], &[0xc0, 0x80]] {
            let mut bytes = HEAD.as_bytes().to_vec();
            bytes.splice(at..at, bad.iter().copied());
            let msg = json_error(super::head(&bytes));
            assert!(msg.contains(&format!("offset {at})")), "{msg}");
            assert!(msg.contains("not UTF-8"), "{msg}");
            let msg = json_error(super::format_of("catalog head", &bytes));
            assert!(msg.contains(&format!("offset {at})")), "{msg}");
        }
        let mut bytes = PAGE.as_bytes().to_vec();
        bytes[3] = 0x80;
        let msg = json_error(super::page(&bytes));
        assert!(
            msg.contains("catalog page") && msg.contains("offset 3)"),
            "{msg}"
        );
    }

    #[test]
    fn only_whitespace_may_follow_the_object() {
        assert_eq!(head(&format!(" \n{HEAD}\t\r\n ")).unwrap(), golden());
        for garbage in ["x", "{}", ",", "}", "]", "0", "null", " \"", "\0", "/"] {
            json_error(head(&format!("{HEAD}{garbage}")));
            json_error(head(&format!("{HEAD}\n{garbage}")));
            json_error(super::page(format!("{PAGE}{garbage}").as_bytes()));
        }
        // Truncated objects.
        for cut in [1, HEAD.len() / 2, HEAD.len() - 1] {
            json_error(head(&HEAD[..cut]));
        }
    }

    #[test]
    fn null_optional_members_are_absent() {
        let mut h = golden();
        let mut text = HEAD.to_string();
        for (from, to) in [
            (r#""writer":"5f0c2a9e8b7d6c41""#, r#""writer":null"#),
            (
                r#""committed_at_ms":1795000000000"#,
                r#""committed_at_ms":null"#,
            ),
        ] {
            text = edit(&text, from, to);
        }
        let text = edit(
            &text,
            r#"}]}"#,
            r#"}],"deltas":null,"tail":null,"trust":null}"#,
        );
        h.writer = String::new();
        h.committed_at_ms = 0;
        assert_eq!(head(&text).unwrap(), h);

        let start = text.find(r#""pages":["#).unwrap();
        let end = text.find(r#","deltas""#).unwrap();
        let text = format!(
            r#"{}"pages":null,"retired":null{}"#,
            &text[..start],
            &text[end..]
        );
        h.pages.clear();
        h.retired.clear();
        assert_eq!(head(&text).unwrap(), h);

        let start = text.find(r#""snapshot":{"#).unwrap();
        let end = text.find(r#","segments""#).unwrap();
        let text = format!(r#"{}"snapshot":null{}"#, &text[..start], &text[end..]);
        h.snapshot = None;
        assert_eq!(head(&text).unwrap(), h);

        let text = edit(HEAD, r#","entries":29"#, r#","entries":29,"version":null"#);
        assert_eq!(head(&text).unwrap().snapshot.unwrap().version, 1);

        let signed = edit(
            HEAD,
            r#"}]}"#,
            r#"}],"trust":{"signer":"k","chain":null,"digests":null,"index_digests":null}}"#,
        );
        let trust = head(&signed).unwrap().trust.expect("trust present");
        assert_eq!(trust.signer, "k");
        assert!(
            trust.chain.is_empty() && trust.digests.is_empty() && trust.index_digests.is_empty()
        );

        let page = edit(
            PAGE,
            r#""level":0,"#,
            r#""level":0,"pages":null,"digests":null,"#,
        );
        assert_eq!(
            super::page(page.as_bytes()).unwrap(),
            super::page(PAGE.as_bytes()).unwrap()
        );
        let page = r#"{"format":1,"level":2,"segments":null}"#;
        let p = super::page(page.as_bytes()).unwrap();
        assert_eq!(p.level, 2);
        assert!(p.segments.is_empty() && p.pages.is_empty());
    }

    #[test]
    fn snapshot_version_absent_means_1() {
        assert!(!HEAD.contains("\"version\""));
        assert_eq!(golden().snapshot.unwrap().version, 1);
        let text = edit(HEAD, r#","entries":29"#, r#","entries":29,"version":2"#);
        assert_eq!(head(&text).unwrap().snapshot.unwrap().version, 2);
        let text = edit(HEAD, r#","entries":29"#, r#","version":0,"entries":29"#);
        assert_eq!(head(&text).unwrap().snapshot.unwrap().version, 0);
    }

    #[test]
    fn a_tail_body_that_is_not_base64_is_an_error_naming_its_key() {
        let text = head_with_tail();
        let key = super::super::segment_key(3, 1, 1);
        for bad in [
            "aGVsbG8",
            "aGVs bG8=",
            "aGVsbG8=x",
            "!!!!",
            "aGVsbG9=",
            "aGVsbG8-",
        ] {
            let t = edit(&text, r#""body":"aGVsbG8=""#, &format!(r#""body":"{bad}""#));
            let msg = json_error(head(&t));
            assert!(
                msg.contains(&key) && msg.contains("not base64"),
                "{bad}: {msg}"
            );
        }
        let t = edit(&text, r#""body":"aGVsbG8=""#, r#""body":"""#);
        assert_eq!(head(&t).unwrap().tail[0].body, b"");
        let t = edit(&text, r#""body":"aGVsbG8=""#, r#""body":"aGVs\u0062G8=""#);
        assert_eq!(head(&t).unwrap().tail[0].body, b"hello");
    }

    #[test]
    fn string_escapes_decode() {
        let text = edit(
            HEAD,
            r#""writer":"5f0c2a9e8b7d6c41""#,
            r#""writer":"\u00e9\u00E9 \ud83d\ude00 \uD834\uDD1E \"\\\/\b\f\n\r\t \u0000 é""#,
        );
        assert_eq!(
            head(&text).unwrap().writer,
            "éé \u{1f600} \u{1d11e} \"\\/\u{8}\u{c}\n\r\t \0 é"
        );
        // Escapes in member names too.
        let text = edit(HEAD, r#""generation":42"#, r#""gener\u0061tion":42"#);
        assert_eq!(head(&text).unwrap().generation, 42);
    }

    #[test]
    fn malformed_strings_are_errors() {
        for bad in [
            r#"\ud800"#,
            r#"\ud800x"#,
            r#"\ud800\u0041"#,
            r#"\ud800\ud800"#,
            r#"\udc00"#,
            r#"\ude00\ud83d"#,
            r#"\u00g0"#,
            r#"\u00e"#,
            r#"\x41"#,
            r#"\'"#,
            "tab\there",
            "new\nline",
        ] {
            let text = edit(
                HEAD,
                r#""writer":"5f0c2a9e8b7d6c41""#,
                &format!(r#""writer":"{bad}""#),
            );
            json_error(head(&text));
        }
    }

    #[test]
    fn a_member_given_twice_keeps_its_last_value() {
        let text = edit(
            HEAD,
            r#""generation":42,"#,
            r#""generation":41,"generation":42,"#,
        );
        assert_eq!(head(&text).unwrap(), golden());
        let text = edit(
            HEAD,
            r#""generation":42,"#,
            r#""generation":42,"generation":43,"#,
        );
        assert_eq!(head(&text).unwrap().generation, 43);
    }
}
