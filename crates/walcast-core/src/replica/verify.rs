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
    /// (lsn, start, end) of each payload to apply, ascending from `from`.
    pub(super) records: Vec<(u64, usize, usize)>,
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
            other => Err(unavailable(&other).with_object(key.clone())),
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
        let data_err = |d| Error::decode(d).with_object(e.key.clone()).with_lsn(u.from);
        let whole = u.start.offset == segment::HEADER_LEN;
        // Work out which bytes of the file `body` holds; `checked` when
        // `segment::decode` verified every record of the whole file already.
        let (bytes, base, checked) = match range {
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
                    .with_object(e.key.clone())
                    .with_lsn(u.from));
                }
                // The digest first: a pinned replica calls any change untrusted.
                self.check_digest(&e.key, u.digest.as_deref(), &body)
                    .map_err(|err| err.with_lsn(u.from))?;
                let seg = segment::decode(&body, Some(e.crc32)).map_err(data_err)?;
                // Records from a start the file's own index names begin on a
                // record boundary: their checksums were verified above.
                let aligned = u.start.offset == segment::HEADER_LEN
                    || seg
                        .index
                        .iter()
                        .any(|i| i.offset == u.start.offset && i.lsn == u.start.lsn);
                (body, 0u64, aligned)
            }
            Some(cr) => {
                let want_end = e.records_end;
                if self.trust.pinned() {
                    return Err(Error::new(
                        ErrorKind::Untrusted,
                        "a range answer where the whole segment was asked for: only whole segments are bound to the signed head",
                    )
                    .with_object(e.key.clone())
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
                    .with_object(e.key.clone())
                    .with_lsn(u.from));
                }
                (body, cr.start, false)
            }
        };
        let lo = (u.start.offset - base) as usize;
        let hi = (e.records_end - base) as usize;
        let mut records = Vec::new();
        let mut last = u.start.lsn - 1;
        let mut recs = Records::new(&bytes[lo..hi], u.start.offset, u.start.lsn);
        if checked {
            recs = recs.already_verified();
        }
        for rec in recs {
            let rec = rec.map_err(data_err)?;
            last = rec.lsn;
            if rec.lsn >= u.from {
                let start = rec.payload.as_ptr() as usize - bytes.as_ptr() as usize;
                records.push((rec.lsn, start, start + rec.payload.len()));
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
            .with_object(e.key.clone())
            .with_lsn(last + 1));
        }
        Ok(Verified { bytes, records })
    }
}
