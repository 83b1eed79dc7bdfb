//! Segment answers: checking a whole object or a range answer against the
//! catalog entry, and the verified records waiting to be applied.

use crate::error::{Error, ErrorKind};
use crate::io::{ContentRange, GetResponse};
use crate::segment::{self, Records};

use super::fetch::unavailable;
use super::plan::Unit;
use super::Replica;

/// A segment answer that passed verification, waiting to be applied.
#[derive(Debug)]
pub(super) struct Verified {
    pub(super) bytes: Vec<u8>,
    /// The LSN of the first payload in `records`.
    pub(super) first: u64,
    /// (start, end) in `bytes` of each payload to apply, of dense LSNs from
    /// `first` on (`u32`: a segment is at most `MAX_SEGMENT_BYTES`, and half
    /// the size of `usize` pairs on 64-bit hosts is half the fresh memory
    /// a large catch-up writes before it applies).
    pub(super) records: Vec<(u32, u32)>,
}

impl Replica {
    pub(super) fn on_segment(&mut self, now: u64, u: Unit, resp: GetResponse) {
        self.inflight_units.remove(u.from);
        let key = u.entry.key.clone();
        let result = match resp {
            GetResponse::Ok { body, range, .. } => self.verify_segment(&u, body, range),
            GetResponse::NotFound => {
                self.missing(now, &key);
                return;
            }
            other => Err(unavailable(&other).with_object(&key)),
        };
        match result {
            Ok(v) => {
                self.ready.insert(u.from, v);
            }
            Err(err) => {
                self.distrust_head(now, &err);
                let d = self.failure(&key, err);
                self.retry_at.insert(u.from, now + d);
            }
        }
    }

    pub(super) fn verify_segment(
        &self,
        u: &Unit,
        body: Vec<u8>,
        range: Option<ContentRange>,
    ) -> Result<Verified, Error> {
        let e = &u.entry;
        let data_err = |d| Error::decode(d).with_object(&e.key).with_lsn(u.from);
        let whole = u.start.offset == segment::HEADER_LEN;
        let cr = match range {
            None => {
                // The whole object (asked for, or a server that ignored Range).
                if body.len() as u64 != e.size {
                    return Err(Error::new(
                        ErrorKind::Data,
                        format!(
                            "segment body is {} bytes, catalog says {}",
                            body.len(),
                            e.size
                        ),
                    )
                    .with_object(&e.key)
                    .with_lsn(u.from));
                }
                // The digest first: a pinned replica calls any change untrusted.
                self.check_digest(&e.key, u.digest.as_deref(), &body)
                    .map_err(|err| err.with_lsn(u.from))?;
                // One walk over the records: the decode's own, which checks
                // them, gathers those from `u.from` on.
                // As many as the catalog names from `u.from` on, and no more
                // than the body could frame (a record is at least 16 bytes).
                let want = e.last_lsn.saturating_sub(u.from).saturating_add(1);
                let mut records = Vec::with_capacity(want.min(body.len() as u64 / 16) as usize);
                let at = body.as_ptr() as usize;
                let t = segment::decode_with(&body, Some(e.crc32), |rec| {
                    if rec.lsn >= u.from {
                        let start = rec.payload.as_ptr() as usize - at;
                        records.push((start as u32, (start + rec.payload.len()) as u32));
                    }
                })
                .map_err(data_err)?
                .trailer;
                if t.first_lsn != e.first_lsn
                    || t.last_lsn != e.last_lsn
                    || t.footer_offset != e.records_end
                {
                    return Err(Error::new(
                        ErrorKind::Data,
                        format!(
                            "segment holds LSNs {}..={} with records ending at byte {}, catalog says {}..={} ending at {}",
                            t.first_lsn, t.last_lsn, t.footer_offset, e.first_lsn, e.last_lsn, e.records_end
                        ),
                    )
                    .with_object(&e.key)
                    .with_lsn(u.from));
                }
                return Ok(Verified {
                    bytes: body,
                    first: u.from.max(e.first_lsn),
                    records,
                });
            }
            Some(cr) => cr,
        };
        // A range answer: the records from the unit's start to their end,
        // each checked by its own checksum.
        let want_end = e.records_end;
        if self.trust.pinned() {
            return Err(Error::new(
                ErrorKind::Untrusted,
                "a range answer for a signed whole segment",
            )
            .with_object(&e.key)
            .with_lsn(u.from));
        }
        if whole
            || cr.start != u.start.offset
            || cr.end != want_end
            || body.len() as u64 != want_end - cr.start
        {
            return Err(Error::new(
                ErrorKind::Data,
                format!(
                    "range answer {}..{} with {} bytes does not match the request {}..{}",
                    cr.start,
                    cr.end,
                    body.len(),
                    u.start.offset,
                    want_end
                ),
            )
            .with_object(&e.key)
            .with_lsn(u.from));
        }
        // The answer starts at the unit's start (checked above).
        let bytes = body;
        let hi = (e.records_end - cr.start) as usize;
        let mut records = Vec::new();
        let mut last = u.start.lsn - 1;
        for rec in Records::new(&bytes[..hi], u.start.offset, u.start.lsn) {
            let rec = rec.map_err(data_err)?;
            last = rec.lsn;
            if rec.lsn >= u.from {
                let start = rec.payload.as_ptr() as usize - bytes.as_ptr() as usize;
                records.push((start as u32, (start + rec.payload.len()) as u32));
            }
        }
        if last != e.last_lsn {
            return Err(Error::new(
                ErrorKind::Data,
                format!(
                    "segment records end at LSN {last}, catalog says {}",
                    e.last_lsn
                ),
            )
            .with_object(&e.key)
            .with_lsn(last + 1));
        }
        Ok(Verified {
            bytes,
            first: u.from.max(u.start.lsn),
            records,
        })
    }
}
