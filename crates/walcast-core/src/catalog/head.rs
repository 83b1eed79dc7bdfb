//! The head (`catalog/head.json`): decoding with every check, encoding.

use serde::Serialize;

use super::*;
use crate::error::{DecodeError, Quoted};

/// The catalog head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Head {
    /// Catalog format version.
    pub format: u32,
    /// The dataset's identity.
    pub dataset_id: DatasetId,
    /// Epoch of the publisher that wrote this head.
    pub epoch: u64,
    /// Bumped by one on every head write.
    pub generation: u64,
    /// Everything at or below is visible.
    pub committed_lsn: u64,
    /// Lowest LSN still fetchable from segments.
    pub earliest_lsn: u64,
    /// Random id of the publisher process that claimed `epoch`; tells two
    /// claims of the same epoch apart when an acknowledgement is lost.
    #[serde(default)]
    pub writer: String,
    /// Publisher clock at the commit, ms since the Unix epoch.
    #[serde(default)]
    pub committed_at_ms: u64,
    /// The latest snapshot.
    pub snapshot: Option<SnapshotEntry>,
    /// Recent segments, ascending and contiguous, ending at `committed_lsn`.
    pub segments: Vec<SegmentEntry>,
    /// Older entries, ascending and contiguous with `segments`.
    #[serde(default)]
    pub pages: Vec<PageRef>,
    /// Objects waiting to be deleted.
    #[serde(default)]
    pub retired: Vec<Retired>,
    /// Delta snapshots over `snapshot`, oldest first, each starting where
    /// the one before ends (the first at the snapshot's LSN). Absent when
    /// empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deltas: Vec<DeltaEntry>,
    /// Copies of the newest inline segments (at most [`MAX_TAIL_BYTES`] in
    /// all), for replicas following the tail. Absent when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tail: Vec<TailSegment>,
    /// Signed datasets only: the signer, the key rotation chain and the
    /// digest of every object the head names (`docs/FORMAT.md`, "Signed
    /// datasets"). Absent in unsigned heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<HeadTrust>,
}

impl Head {
    /// A claimed, empty dataset.
    pub fn new(dataset_id: DatasetId, epoch: u64) -> Self {
        Head {
            format: FORMAT,
            dataset_id,
            epoch,
            generation: 1,
            committed_lsn: 0,
            earliest_lsn: 1,
            writer: String::new(),
            committed_at_ms: 0,
            snapshot: None,
            segments: Vec::new(),
            pages: Vec::new(),
            retired: Vec::new(),
            deltas: Vec::new(),
            tail: Vec::new(),
            trust: None,
        }
    }

    /// The tail's copy of segment `key`, if the head carries one.
    pub fn tail_body(&self, key: &str) -> Option<&[u8]> {
        self.tail
            .iter()
            .find(|t| t.key == key)
            .map(|t| t.body.as_slice())
    }

    /// Serializes the head: JSON whose first member is `"crc32"`, eight hex
    /// digits of the CRC-32 of every byte after the 20-byte prefix
    /// `{"crc32":"xxxxxxxx",`.
    pub fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).unwrap_or_default();
        let rest = &json[1..];
        let mut out = Vec::with_capacity(json.len() + HEAD_PREFIX_LEN);
        out.extend_from_slice(
            format!("{{\"crc32\":\"{:08x}\",", crate::crc::hash(rest)).as_bytes(),
        );
        out.extend_from_slice(rest);
        out
    }

    /// Parses and validates a head, verifying its checksum first. A head
    /// stored gzip-compressed is decoded first ([`head_json`]).
    pub fn decode(bytes: &[u8]) -> Result<Head, DecodeError> {
        let json = head_json(bytes)?;
        let bytes = &json[..];
        if bytes.len() > MAX_HEAD_BYTES {
            return Err(DecodeError::TooLarge {
                what: "catalog head",
                at: 0,
                len: bytes.len() as u64,
                limit: MAX_HEAD_BYTES as u64,
            });
        }
        let prefix = bytes.get(..HEAD_PREFIX_LEN).unwrap_or(bytes);
        let stored = (prefix.len() == HEAD_PREFIX_LEN
            && prefix.starts_with(b"{\"crc32\":\"")
            && prefix.ends_with(b"\","))
        .then(|| std::str::from_utf8(&prefix[10..18]).ok())
        .flatten()
        .filter(|h| {
            h.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        })
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or_else(|| {
            DecodeError::Json(
                "the head is not gzip and does not start with {\"crc32\":\"<8 hex digits>\","
                    .into(),
            )
        })?;
        crate::codec::check_crc(
            "catalog head",
            HEAD_PREFIX_LEN as u64,
            stored,
            &bytes[HEAD_PREFIX_LEN..],
        )?;
        check_format("catalog head", bytes)?;
        let head = json::head(bytes)?;
        head.validate().map_err(DecodeError::Json)?;
        Ok(head)
    }

    /// The LSN ranges covered, oldest first: pages then inline segments.
    pub fn first_covered_lsn(&self) -> Option<u64> {
        self.pages
            .first()
            .map(|p| p.first_lsn)
            .or_else(|| self.segments.first().map(|s| s.first_lsn))
    }

    fn validate(&self) -> Result<(), String> {
        if self.epoch == 0 {
            return Err("epoch 0 is not valid".into());
        }
        let after = self
            .committed_lsn
            .checked_add(1)
            .ok_or_else(|| "committed_lsn is u64::MAX".to_string())?;
        if self.earliest_lsn == 0 || self.earliest_lsn > after {
            return Err(format!(
                "earliest_lsn {} outside 1..={after}",
                self.earliest_lsn
            ));
        }
        if let Some(s) = &self.snapshot {
            if s.lsn > self.committed_lsn || s.lsn + 1 < self.earliest_lsn {
                return Err(format!(
                    "snapshot LSN {} outside {}..={}",
                    s.lsn,
                    self.earliest_lsn - 1,
                    self.committed_lsn
                ));
            }
        } else if self.earliest_lsn > 1 {
            return Err("earliest_lsn above 1 without a snapshot".into());
        }
        if let Some(s) = &self.snapshot {
            check_key("snapshot", &s.key, &snapshot_key(s.lsn, s.epoch))?;
            // A file shorter than its header and footer cannot be read, and a
            // lazy reader must never ask for an empty suffix.
            let least = crate::snapshot::HEADER_LEN
                + match s.version {
                    crate::snapshot::indexed::VERSION_VERIFIED => {
                        crate::snapshot::indexed::FOOTER_LEN_V4
                    }
                    v if v >= 2 => crate::snapshot::indexed::FOOTER_LEN,
                    _ => 0,
                };
            if s.size < least {
                return Err(format!(
                    "snapshot {} has a size of {} bytes, below the {least} of its header and footer",
                    s.key, s.size
                ));
            }
            if let Some(suffix) = &s.suffix {
                if suffix.len() > MAX_SNAPSHOT_SUFFIX
                    || suffix.len() as u64 > s.size
                    || s.version < 2
                {
                    return Err(format!(
                        "snapshot {} carries a suffix of {} bytes (at most {MAX_SNAPSHOT_SUFFIX}, \
                         within the file, for a block-indexed snapshot)",
                        s.key,
                        suffix.len()
                    ));
                }
            }
        }
        self.validate_deltas()?;
        let mut tail_bytes = 0usize;
        for (i, t) in self.tail.iter().enumerate() {
            if !self.segments.iter().any(|s| s.key == t.key) {
                return Err(format!(
                    "tail segment {} is not one of the head's segments",
                    Quoted::str(&t.key)
                ));
            }
            if self.tail[..i].iter().any(|u| u.key == t.key) {
                return Err(format!(
                    "tail segment {} appears twice",
                    Quoted::str(&t.key)
                ));
            }
            // A segment file is at least 72 bytes: the copies' count is
            // bounded too (each is compared with those before it).
            tail_bytes = tail_bytes.saturating_add(t.body.len().max(72));
            if tail_bytes > MAX_TAIL_BYTES {
                return Err(format!("the tail carries over {MAX_TAIL_BYTES} bytes"));
            }
        }
        for r in &self.retired {
            if object_kind(&r.key).is_none() {
                return Err(format!(
                    "retired key {} is not a segment, snapshot or page key",
                    Quoted::str(&r.key)
                ));
            }
        }
        // Pages then segments: ascending, contiguous, ending at committed_lsn.
        let mut next: Option<u64> = None;
        for p in &self.pages {
            p.validate()?;
            if p.last_lsn < p.first_lsn || next.is_some_and(|n| n != p.first_lsn) {
                return Err(format!("page {} is not contiguous", p.key));
            }
            next = Some(
                p.last_lsn
                    .checked_add(1)
                    .ok_or_else(|| format!("page {} ends at u64::MAX", p.key))?,
            );
        }
        for s in &self.segments {
            s.validate()?;
            if next.is_some_and(|n| n != s.first_lsn) {
                return Err(format!("segment {} is not contiguous", s.key));
            }
            next = Some(
                s.last_lsn
                    .checked_add(1)
                    .ok_or_else(|| format!("segment {} ends at u64::MAX", s.key))?,
            );
        }
        match next {
            Some(n) if n != after => {
                return Err(format!(
                    "segments end at {} but committed_lsn is {}",
                    n - 1,
                    self.committed_lsn
                ))
            }
            None if self.committed_lsn >= self.earliest_lsn => {
                return Err("no segments cover committed LSNs".into())
            }
            _ => {}
        }
        if let Some(first) = self.first_covered_lsn() {
            if first > self.earliest_lsn {
                return Err(format!(
                    "history starts at {first}, after earliest_lsn {}",
                    self.earliest_lsn
                ));
            }
        }
        self.validate_trust()?;
        Ok(())
    }
}

impl Head {
    /// The LSN the snapshot and its deltas reach together, if there is a
    /// snapshot.
    pub fn delta_lsn(&self) -> Option<u64> {
        let s = self.snapshot.as_ref()?;
        Some(self.deltas.last().map_or(s.lsn, |d| d.lsn))
    }

    fn validate_deltas(&self) -> Result<(), String> {
        if self.deltas.is_empty() {
            return Ok(());
        }
        let Some(s) = &self.snapshot else {
            return Err("delta snapshots without a snapshot".into());
        };
        if self.deltas.len() > MAX_DELTAS {
            return Err(format!(
                "{} delta snapshots, above the limit {MAX_DELTAS}",
                self.deltas.len()
            ));
        }
        let mut at = s.lsn;
        for d in &self.deltas {
            d.validate()?;
            if d.base_lsn != at {
                return Err(format!(
                    "delta {} starts after LSN {}, not where the chain ends ({at})",
                    d.key, d.base_lsn
                ));
            }
            at = d.lsn;
        }
        if at > self.committed_lsn {
            return Err(format!(
                "delta snapshots reach LSN {at}, above committed_lsn {}",
                self.committed_lsn
            ));
        }
        Ok(())
    }
}
