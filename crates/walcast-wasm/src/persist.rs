//! Incremental persistence (`persist: "indexeddb"`, full KV mode): the
//! batches a sync applied, framed like segment records, for the JS layer to
//! append to its persisted log, and the replay of such a log on top of a
//! persisted base snapshot. The persisted layout is in docs/FORMAT.md
//! ("A browser replica's IndexedDB store").

use walcast_core::batch;
use walcast_core::catalog::DatasetId;
use walcast_core::segment::{encode_record, Records};
use walcast_core::snapshot;
use walcast_core::state::KvState;
use walcast_core::Error;

/// The batches applied since the driver last took them: a dense LSN run
/// `first..=last`, each record framed like a segment record (lsn, len, crc,
/// payload).
#[derive(Default)]
pub(crate) struct AppliedLog {
    bytes: Vec<u8>,
    first: u64,
    last: u64,
    /// The run passed [`MAX_LOG_BYTES`] and was dropped: nothing more is
    /// collected, and the next take gives nothing (the state is then
    /// written whole).
    dropped: bool,
}

/// The most bytes of records collected between two takes: a catch-up of
/// gigabytes would otherwise hold them all in memory until its sync ends,
/// for a log the store would replace with the whole state anyway.
pub(crate) const MAX_LOG_BYTES: usize = 64 << 20;

/// What a replica keeps for incremental persistence.
#[derive(Default)]
pub(crate) struct Persist {
    /// The applied records not taken yet; `None` when not collecting
    /// (option `persistLog` off, raw or lazy mode).
    pub log: Option<AppliedLog>,
    /// Why the replay of the persisted log stopped early, when it did.
    pub damage: Option<Error>,
}

/// A run of applied records taken from an [`AppliedLog`].
pub(crate) struct LogChunk {
    /// LSN of the first record.
    pub first: u64,
    /// LSN of the last record.
    pub last: u64,
    /// The framed records.
    pub bytes: Vec<u8>,
}

impl AppliedLog {
    /// Appends the record applied at `lsn`. A record that does not follow
    /// the last one (the state was replaced in between) starts the run over.
    pub(crate) fn push(&mut self, lsn: u64, payload: &[u8]) {
        if self.dropped {
            return;
        }
        if self.bytes.is_empty() || lsn != self.last + 1 {
            self.bytes.clear();
            self.first = lsn;
        }
        if self.bytes.len() + payload.len() > MAX_LOG_BYTES {
            self.bytes = Vec::new();
            self.dropped = true;
            return;
        }
        encode_record(lsn, payload, &mut self.bytes);
        self.last = lsn;
    }

    /// Forgets what was collected (the state was replaced: the driver
    /// writes it whole).
    pub(crate) fn clear(&mut self) {
        self.bytes.clear();
    }

    /// Takes the run collected so far, if any (none once it was dropped
    /// for its size: the state is then written whole).
    pub(crate) fn take(&mut self) -> Option<LogChunk> {
        if std::mem::take(&mut self.dropped) || self.bytes.is_empty() {
            return None;
        }
        Some(LogChunk {
            first: self.first,
            last: self.last,
            bytes: std::mem::take(&mut self.bytes),
        })
    }
}

/// A persisted state rebuilt from its base snapshot and log.
pub(crate) struct Restored {
    /// The state at `lsn`.
    pub state: KvState,
    /// The last LSN applied: the base's, or the last good log record's.
    pub lsn: u64,
    /// The dataset of the base snapshot.
    pub dataset_id: DatasetId,
    /// The base snapshot's epoch.
    pub epoch: u64,
    /// Why the replay stopped before the end of the log (a damaged or
    /// missing record): the state is then the one at `lsn`, a state the
    /// dataset had, and what follows is fetched again.
    pub damage: Option<Error>,
}

/// Decodes the base snapshot (any damage there is an error: nothing is
/// usable), then applies each chunk's records in LSN order. Every record's
/// checksum is verified and LSNs must continue densely from the base; the
/// replay stops at the first record that fails (a batch is applied whole or
/// not at all) and reports it in [`Restored::damage`].
pub(crate) fn replay<'a>(
    base: &[u8],
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Restored, Error> {
    let (h, mut state) = snapshot::decode(base, None)
        .map_err(|e| Error::decode(e).with_object("persisted snapshot"))?;
    let mut lsn = h.lsn;
    let mut damage = None;
    'chunks: for (i, chunk) in chunks.into_iter().enumerate() {
        let object = format!("persisted log chunk {i}");
        if chunk.is_empty() {
            damage = Some(Error::new(
                walcast_core::ErrorKind::Data,
                format!("{object} is empty (expected records from LSN {})", lsn + 1),
            ));
            break;
        }
        for rec in Records::new(chunk, 0, lsn + 1) {
            let rec = match rec {
                Ok(r) => r,
                Err(e) => {
                    damage = Some(Error::decode(e).with_object(object).with_lsn(lsn + 1));
                    break 'chunks;
                }
            };
            match batch::Batch::parse(rec.payload) {
                Ok(ops) => state.apply(ops),
                Err(e) => {
                    damage = Some(Error::decode(e).with_object(object).with_lsn(rec.lsn));
                    break 'chunks;
                }
            }
            lsn = rec.lsn;
        }
    }
    Ok(Restored {
        state,
        lsn,
        dataset_id: h.dataset_id,
        epoch: h.epoch,
        damage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use walcast_core::batch::Op;

    fn put(k: &str, v: &str) -> Vec<u8> {
        batch::encode(&[Op::put(k, v)]).unwrap()
    }

    fn base() -> Vec<u8> {
        let mut s = KvState::new();
        s.put(b"a", b"0");
        snapshot::encode(&s, 10, 3, DatasetId([7; 16]))
    }

    fn log(first: u64, vals: &[&str]) -> Vec<u8> {
        let mut l = AppliedLog::default();
        for (i, v) in vals.iter().enumerate() {
            l.push(first + i as u64, &put("a", v));
        }
        l.take().unwrap().bytes
    }

    #[test]
    fn replays_chunks_in_order() {
        let c1 = log(11, &["1", "2"]);
        let c2 = log(13, &["3"]);
        let r = replay(&base(), [c1.as_slice(), c2.as_slice()]).unwrap();
        assert_eq!(r.lsn, 13);
        assert!(r.damage.is_none());
        assert_eq!(r.state.get(b"a"), Some(&b"3"[..]));
        assert_eq!(r.dataset_id, DatasetId([7; 16]));
        assert_eq!(r.epoch, 3);
    }

    #[test]
    fn stops_at_a_damaged_record_with_a_committed_state() {
        let c1 = log(11, &["1", "2"]);
        let mut c2 = log(13, &["3", "4"]);
        let n = c2.len();
        c2[n - 1] ^= 1; // the last record's payload
        let r = replay(&base(), [c1.as_slice(), c2.as_slice()]).unwrap();
        assert_eq!(r.lsn, 13);
        assert_eq!(r.state.get(b"a"), Some(&b"3"[..]));
        let d = r.damage.unwrap();
        assert_eq!(d.lsn(), Some(14));
        assert_eq!(d.object(), Some("persisted log chunk 1"));
    }

    #[test]
    fn a_missing_chunk_stops_the_replay() {
        let c2 = log(13, &["3"]);
        let r = replay(&base(), [c2.as_slice()]).unwrap();
        assert_eq!(r.lsn, 10);
        assert_eq!(r.state.get(b"a"), Some(&b"0"[..]));
        assert!(r.damage.is_some());
    }

    #[test]
    fn a_damaged_base_is_an_error() {
        let mut b = base();
        b[20] ^= 0xff;
        assert!(replay(&b, []).is_err());
    }

    /// A run past MAX_LOG_BYTES is dropped, not held: the take after it
    /// gives nothing (the state is written whole), and collecting starts
    /// again after that take.
    #[test]
    fn a_run_past_the_bound_is_dropped_until_taken() {
        let mut l = AppliedLog::default();
        let payload = vec![7u8; 1 << 20];
        for lsn in 1..=200 {
            l.push(lsn, &payload);
            assert!(
                l.bytes.len() <= MAX_LOG_BYTES,
                "{} bytes held at LSN {lsn}",
                l.bytes.len()
            );
        }
        assert!(l.take().is_none(), "a dropped run is not taken");
        l.push(201, b"x");
        let c = l.take().unwrap();
        assert_eq!((c.first, c.last), (201, 201));
    }

    #[test]
    fn a_gap_in_the_applied_log_starts_the_run_over() {
        let mut l = AppliedLog::default();
        l.push(5, b"x");
        l.push(9, b"y");
        let c = l.take().unwrap();
        assert_eq!((c.first, c.last), (9, 9));
        assert!(l.take().is_none());
    }
}
