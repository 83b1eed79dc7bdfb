//! Bootstrapping from a snapshot: loading it window by window, checking it
//! against the catalog, and replacing the state with it.

use crate::catalog::{DatasetId, SnapshotEntry};
use crate::error::{Error, ErrorKind};
use crate::io::GetResponse;
use crate::snapshot::SnapshotDecoder;

use super::fetch::unavailable;
use super::{Event, Replica};

/// A snapshot being loaded.
#[derive(Debug)]
pub(super) struct Bootstrap {
    pub(super) entry: SnapshotEntry,
    pub(super) dataset_id: DatasetId,
    pub(super) decoder: SnapshotDecoder,
    pub(super) next: u64,
    pub(super) inflight: bool,
    /// A lazy replica past the snapshot holds writes after it in a delta
    /// chain that starts below it: the chain enters the overlay (read
    /// whole) before the load starts, so that the state stays at the
    /// replica's LSN instead of going back to the snapshot's.
    pub(super) chain: bool,
}

impl Replica {
    pub(super) fn on_snapshot(&mut self, now: u64, offset: u64, resp: GetResponse) {
        let Some(b) = self.bootstrap.as_mut() else {
            return;
        };
        b.inflight = false;
        let key = b.entry.key.clone();
        let size = b.entry.size;
        let fed: Result<u64, Error> = match resp {
            GetResponse::Ok { body, range, .. } => {
                // Which bytes did we get? A 206 says; a 200 is the whole object.
                let (start, bytes) = match range {
                    Some(cr) => (cr.start, &body[..]),
                    None => (0, &body[..]),
                };
                let range_lies =
                    range.is_some_and(|cr| cr.end - cr.start != body.len() as u64 || cr.end > size);
                if range_lies {
                    Err(Error::new(
                        ErrorKind::Data,
                        format!(
                            "snapshot answer's Content-Range disagrees with its {} bytes or the size {size}",
                            body.len()
                        ),
                    )
                    .with_object(&key))
                } else if range.is_none() && body.len() as u64 != size {
                    Err(Error::new(
                        ErrorKind::Data,
                        format!(
                            "snapshot answer is neither the range asked for nor all {size} \
                             bytes (a server ignoring Range serves at most {} bytes)",
                            super::fetch::MAX_WHOLE_SNAPSHOT_ANSWER
                        ),
                    )
                    .with_object(&key))
                } else if start > offset {
                    Err(Error::new(
                        ErrorKind::Data,
                        format!("snapshot answer does not cover byte {offset}"),
                    )
                    .with_object(&key))
                } else {
                    // Offsets stay u64 until they are known to fit the body,
                    // so a snapshot over 4 GiB works on 32-bit targets.
                    let skip = usize::try_from(offset - start).unwrap_or(usize::MAX);
                    let avail = bytes.get(skip..).unwrap_or(&[]);
                    // Take what arrived, up to the end of the file (a 200 or a
                    // generous 206 may carry more than the window asked for).
                    let left = size.saturating_sub(offset);
                    let take = usize::try_from(left).map_or(avail.len(), |l| avail.len().min(l));
                    if take == 0 {
                        Err(Error::new(
                            ErrorKind::Data,
                            format!("empty snapshot answer at byte {offset}"),
                        )
                        .with_object(&key))
                    } else {
                        self.trust.hash_snapshot(offset, &avail[..take]);
                        b.decoder
                            .feed(&avail[..take])
                            .map(|_| take as u64)
                            .map_err(|d| Error::decode(d).with_object(&key))
                    }
                }
            }
            GetResponse::NotFound => {
                self.missing(now, &key);
                return;
            }
            other => Err(unavailable(&other).with_object(&key)),
        };
        match fed {
            Ok(n) => {
                b.next += n;
                if b.next >= size {
                    self.finish_bootstrap(now);
                }
            }
            Err(err) => {
                // A decode error poisons the decoder: start the snapshot over.
                if err.kind() == ErrorKind::Data {
                    b.decoder = SnapshotDecoder::new();
                    b.next = 0;
                }
                self.distrust_head(now, &err);
                let d = self.failure(&key, err);
                self.retry_at.insert(0, now + d);
            }
        }
    }

    fn finish_bootstrap(&mut self, now: u64) {
        let Some(b) = self.bootstrap.take() else {
            return;
        };
        let key = b.entry.key.clone();
        let result = b
            .decoder
            .finish(Some(b.entry.crc32))
            .map_err(|d| Error::decode(d).with_object(&key))
            .and_then(|r| self.check_snapshot_trust(&key, b.entry.size).map(|()| r))
            .and_then(|(h, st)| {
                if h.lsn != b.entry.lsn
                    || h.dataset_id != b.dataset_id
                    || h.entry_count != b.entry.entries
                {
                    Err(Error::new(
                        ErrorKind::Data,
                        "snapshot header disagrees with the catalog",
                    )
                    .with_object(&key))
                } else {
                    Ok((h, st))
                }
            });
        match result {
            Ok((h, st)) => {
                self.success(&key);
                self.progress();
                let mut lsn = h.lsn;
                if let Some(l) = self.lazy.as_mut() {
                    // A lazy replica past the snapshot (it left a base the
                    // snapshot replaces) keeps its LSN when its overlay and
                    // deferred segments hold every write after the snapshot
                    // (none below the snapshot it does not hold): they stay
                    // on top of the snapshot's state, so the state never
                    // goes back. Else the state jumps to the snapshot and
                    // the overlay starts over.
                    // (A chain read into the overlay holds the writes after
                    // its base.)
                    let from = l.base.as_ref().map_or(l.state_lsn, |b| {
                        if b.deltas.is_empty() {
                            b.entry.lsn
                        } else {
                            b.chain_end
                        }
                    });
                    if self.applied > h.lsn && from <= h.lsn {
                        l.base = None;
                        l.shed_through(h.lsn);
                        l.keep_jobs(false);
                        lsn = self.applied;
                    } else {
                        l.clear();
                    }
                    // Deferred segments replay only their writes after it.
                    l.state_lsn = h.lsn;
                }
                self.state = st;
                self.applied = lsn;
                self.dataset = Some(h.dataset_id);
                self.plan_next = lsn + 1;
                self.last_error = None;
                self.events.push_back(Event::Bootstrapped {
                    lsn,
                    dataset_id: h.dataset_id,
                });
                self.clear_plan();
                if self.applied >= self.committed {
                    self.schedule_poll(now);
                }
            }
            Err(err) => {
                self.distrust_head(now, &err);
                let d = self.failure(&key, err);
                self.retry_at.insert(0, now + d);
                self.bootstrap = Some(Bootstrap {
                    decoder: SnapshotDecoder::new(),
                    next: 0,
                    inflight: false,
                    chain: false,
                    ..b
                });
            }
        }
    }
}
