//! Decoding a whole block-indexed snapshot, and checking its index and
//! footer against the blocks a streaming reader decoded.

use super::*;

/// Decodes a whole block-indexed snapshot held in memory, verifying every
/// block, the index and the footer, and `crc32` (the catalog's whole-file
/// checksum) when given. The same checks as a streaming
/// [`SnapshotDecoder`](crate::snapshot::SnapshotDecoder), which reads both versions.
pub fn decode_indexed(
    bytes: &[u8],
    crc32: Option<u32>,
) -> Result<(SnapshotHeader, KvState), DecodeError> {
    if !is_indexed(bytes) {
        return Err(invalid("snapshot", 0, "not a block-indexed snapshot"));
    }
    crate::snapshot::decode(bytes, crc32)
}

/// Checks the index region and footer of a version 2 or 4 snapshot against
/// the data blocks a streaming reader decoded: `tail` holds the file's bytes
/// from `tail_at` (the end of the data blocks) to `size`; `blocks` the first
/// key and handle of each data block, in order; `digests` the SHA-256 of
/// each data block for version 4 (`None`: version 2); `entries` the
/// entries read.
pub(crate) fn verify_index(
    tail: &[u8],
    tail_at: u64,
    size: u64,
    blocks: &[(Vec<u8>, BlockHandle)],
    digests: Option<&[[u8; 32]]>,
    entries: u64,
) -> Result<(), DecodeError> {
    let flen = if digests.is_some() {
        FOOTER_LEN_V4
    } else {
        FOOTER_LEN
    };
    if (tail.len() as u64) < flen || tail_at + tail.len() as u64 != size {
        return Err(DecodeError::Truncated {
            what: "snapshot index",
            at: tail_at,
            need: flen,
            have: tail.len() as u64,
        });
    }
    if footer_len(tail) != flen {
        return Err(invalid(
            "snapshot footer",
            size - flen,
            "the footer's version differs from the header's",
        ));
    }
    let footer = Footer::decode(&tail[tail.len() - flen as usize..], size)?;
    if footer.index_offset != tail_at
        || footer.data_blocks as usize != blocks.len()
        || footer.entry_count != entries
    {
        return Err(invalid(
            "snapshot footer",
            size - flen,
            "the footer disagrees with the data blocks read",
        ));
    }
    let has = digests.is_some();
    let slice =
        |h: &BlockHandle| &tail[(h.offset - tail_at) as usize..(h.end() - tail_at) as usize];
    type Named = (Vec<u8>, BlockHandle, Option<[u8; 32]>);
    let handles = |b: &Block, at: u64| -> Result<Vec<Named>, DecodeError> {
        b.entries()
            .iter()
            .map(|(k, v)| {
                let (h, d) = decode_handle(v, at, has)?;
                Ok((k.clone(), h, d))
            })
            .collect()
    };
    let top = Block::decode(slice(&footer.top), &footer.top, "snapshot top index")?;
    verify_digest(
        slice(&footer.top),
        footer.top_sha256.as_ref(),
        "snapshot top index",
        footer.top.offset,
    )?;
    let named = if footer.levels == 1 {
        if footer.top.offset != tail_at {
            return Err(invalid(
                "snapshot index",
                tail_at,
                "bytes between the data and the index",
            ));
        }
        handles(&top, footer.top.offset)?
    } else {
        let mut next = tail_at;
        let mut named = Vec::new();
        for (first, ih, id) in handles(&top, footer.top.offset)? {
            if ih.offset != next || ih.end() > footer.top.offset {
                return Err(invalid(
                    "snapshot top index",
                    ih.offset,
                    "index blocks are not contiguous",
                ));
            }
            next = ih.end();
            let part = Block::decode(slice(&ih), &ih, "snapshot index block")?;
            verify_digest(slice(&ih), id.as_ref(), "snapshot index block", ih.offset)?;
            let children = handles(&part, ih.offset)?;
            if children.first().map(|(k, _, _)| k) != Some(&first) {
                return Err(invalid(
                    "snapshot top index",
                    ih.offset,
                    "an index block's first key disagrees with the top index",
                ));
            }
            named.extend(children);
        }
        if next != footer.top.offset {
            return Err(invalid(
                "snapshot top index",
                next,
                "index blocks do not reach the top index",
            ));
        }
        named
    };
    let same = named.len() == blocks.len()
        && named
            .iter()
            .zip(blocks)
            .all(|((k, h, _), (bk, bh))| k == bk && h == bh);
    if !same {
        return Err(invalid(
            "snapshot index",
            tail_at,
            "the index disagrees with the data blocks read",
        ));
    }
    if let Some(ds) = digests {
        for ((_, h, d), want) in named.iter().zip(ds) {
            if d.as_ref() != Some(want) {
                return Err(DecodeError::Digest {
                    what: "snapshot data block",
                    at: h.offset,
                });
            }
        }
    }
    Ok(())
}
