//! An immutable page of older segment entries or page references.

use serde::Serialize;

use super::*;
use crate::error::DecodeError;
use crate::trust::check_digests;

/// An immutable catalog page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Page {
    /// Catalog format version.
    pub format: u32,
    /// Level: 0 holds segments, `L > 0` holds references of level `L - 1`.
    pub level: u32,
    /// Segment entries (level 0).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segments: Vec<SegmentEntry>,
    /// Page references (level above 0).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pages: Vec<PageRef>,
    /// Signed datasets only: SHA-256 of every segment or page the page
    /// names, by key.
    #[serde(default, skip_serializing_if = "Digests::is_empty")]
    pub digests: Digests,
}

impl Page {
    /// Serializes the page.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses and validates a page against the reference that named it.
    pub fn decode(bytes: &[u8], r: &PageRef) -> Result<Page, DecodeError> {
        if bytes.len() > MAX_PAGE_BYTES {
            return Err(DecodeError::TooLarge {
                what: "catalog page",
                at: 0,
                len: bytes.len() as u64,
                limit: MAX_PAGE_BYTES as u64,
            });
        }
        crate::codec::check_crc("catalog page", 0, r.crc32, bytes)?;
        check_format("catalog page", bytes)?;
        let page = json::page(bytes)?;
        let (first, last, count) = if page.level == 0 {
            for s in &page.segments {
                s.validate().map_err(DecodeError::Json)?;
            }
            (
                page.segments.first().map(|s| s.first_lsn),
                page.segments.last().map(|s| s.last_lsn),
                page.segments.len(),
            )
        } else {
            for p in &page.pages {
                p.validate().map_err(DecodeError::Json)?;
            }
            (
                page.pages.first().map(|s| s.first_lsn),
                page.pages.last().map(|s| s.last_lsn),
                page.pages.len(),
            )
        };
        let contiguous = if page.level == 0 {
            page.segments
                .windows(2)
                .all(|w| w[0].last_lsn.checked_add(1) == Some(w[1].first_lsn))
        } else {
            page.pages
                .windows(2)
                .all(|w| w[0].last_lsn.checked_add(1) == Some(w[1].first_lsn))
                && page
                    .pages
                    .iter()
                    .all(|p| p.level.checked_add(1) == Some(page.level))
        };
        let named: Vec<&str> = page
            .segments
            .iter()
            .map(|s| s.key.as_str())
            .chain(page.pages.iter().map(|p| p.key.as_str()))
            .collect();
        check_digests("page", &page.digests, &named).map_err(DecodeError::Json)?;
        if page.level != r.level
            || first != Some(r.first_lsn)
            || last != Some(r.last_lsn)
            || count != r.count as usize
            || !contiguous
        {
            return Err(DecodeError::Json(format!(
                "page {} does not match its reference",
                r.key
            )));
        }
        Ok(page)
    }
}
