//! Snapshots: encoding the replayed state every `snapshot_every` LSNs, to
//! upload before a head names it.

use crate::catalog::{self, SnapshotEntry};

use super::{Publisher, Up};

/// A snapshot waiting for upload, or uploaded and waiting for a head.
#[derive(Debug)]
pub(super) struct PendingSnapshot {
    pub(super) entry: SnapshotEntry,
    pub(super) bytes: Vec<u8>,
    pub(super) up: Up,
}

impl Publisher {
    pub(super) fn maybe_snapshot(&mut self, lsn: u64) {
        let (Some(every), Some(state), Some(head)) =
            (self.cfg.snapshot_every, &self.state, &self.head)
        else {
            return;
        };
        let last = head.snapshot.as_ref().map_or(0, |s| s.lsn);
        if self.snapshot.is_some() || lsn < last + every {
            return;
        }
        let version = match self.cfg.snapshot_format {
            super::SnapshotFormat::Chunked => 1,
            super::SnapshotFormat::Indexed(_) => 2,
        };
        let bytes = match self.cfg.snapshot_format {
            super::SnapshotFormat::Chunked => {
                crate::snapshot::encode(state, lsn, self.epoch, head.dataset_id)
            }
            super::SnapshotFormat::Indexed(opts) => crate::snapshot::indexed::encode_indexed(
                state,
                lsn,
                self.epoch,
                head.dataset_id,
                opts,
            ),
        };
        let entry = SnapshotEntry {
            key: catalog::snapshot_key(lsn, self.epoch),
            lsn,
            epoch: self.epoch,
            size: bytes.len() as u64,
            crc32: crc32fast::hash(&bytes),
            entries: state.len(),
            version,
        };
        self.snapshot = Some(PendingSnapshot {
            entry,
            bytes,
            up: Up::Waiting(0),
        });
    }
}
