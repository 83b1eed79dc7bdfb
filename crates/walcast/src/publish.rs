//! The publisher: drives the core's commit machine with tokio, reading the
//! local WAL and uploading through a [`Store`].
//!
//! Group commit: the machine seals as soon as data waits and no upload is in
//! flight, so publish-to-visible lag is one upload plus the replica's poll;
//! `flush_interval` only bounds how long data may wait behind an upload.
//! Memory stays bounded however large the backlog: records are read from the
//! WAL only while the machine has room.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use tokio::sync::mpsc;
use walcast_core::io::{GetResponse, RequestId};
use walcast_core::publisher::{Action, Event, Publisher, PublisherConfig, PutResponse};
use walcast_core::ErrorKind;

use crate::store::Store;
use crate::wal::WalReader;

/// Options of `walcast publish`.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// The machine's tuning.
    pub config: PublisherConfig,
    /// Publish everything committed so far, commit the head, and return.
    pub once: bool,
    /// How often to look for new WAL records written by another process.
    pub tail_interval: Duration,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            config: PublisherConfig::default(),
            once: false,
            tail_interval: Duration::from_millis(5),
        }
    }
}

/// What a finished publish run did.
#[derive(Debug, Clone, Default)]
pub struct PublishReport {
    /// The epoch this publisher claimed.
    pub epoch: u64,
    /// The head's committed LSN when it stopped.
    pub committed_lsn: u64,
    /// Head commits made.
    pub commits: u64,
}

/// A publisher lost the dataset to a newer epoch.
#[derive(Debug)]
pub struct Fenced(pub walcast_core::Error);

impl std::fmt::Display for Fenced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::error::Error for Fenced {}

enum Done {
    Get(RequestId, GetResponse),
    Put(RequestId, PutResponse),
    Delete(RequestId, Result<(), String>),
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Publishes the WAL in `wal_dir` to `store` until `stop` resolves (or, with
/// `once`, until everything committed at the start is published).
/// `on_commit` sees every committed LSN.
pub async fn publish(
    wal_dir: PathBuf,
    store: Store,
    opts: PublishOptions,
    stop: impl std::future::Future<Output = ()>,
    mut on_commit: impl FnMut(u64),
) -> Result<PublishReport> {
    let seed =
        now_ms() ^ u64::from(std::process::id()).rotate_left(32) ^ (&opts as *const _ as u64);
    let mut m = Publisher::new(opts.config.clone(), seed);
    let (tx, mut rx) = mpsc::unbounded_channel::<Done>();
    let mut reader = WalReader::open(&wal_dir)?;
    let target = if opts.once {
        // Everything committed at the start.
        let mut r = WalReader::open(&wal_dir)?;
        let mut last = 0;
        while let Some((lsn, _)) = r.next_record()? {
            last = lsn;
        }
        Some(last)
    } else {
        None
    };
    let mut report = PublishReport::default();
    let mut pending_record: Option<(u64, Vec<u8>)> = None;
    let mut stop = Box::pin(stop);
    loop {
        let now = now_ms();
        // Feed the WAL while the machine has room.
        while let Some(next) = m.next_lsn() {
            if !m.has_room() || target.is_some_and(|t| next > t) {
                break;
            }
            if reader.next_lsn() > next {
                reader = WalReader::open(&wal_dir)?;
            }
            if pending_record.as_ref().is_none_or(|(l, _)| *l != next) {
                pending_record = None;
                if !reader.seek_lsn(next)? {
                    break;
                }
                match reader.next_record()? {
                    Some(r) => pending_record = Some(r),
                    None => break,
                }
            }
            let (lsn, payload) = pending_record.take().expect("read above");
            if let Err(e) = m.push(lsn, &payload, now) {
                bail!("{e}");
            }
        }
        match m.poll(now) {
            Action::Get(req) => {
                let (s, tx) = (store.clone(), tx.clone());
                tokio::spawn(async move {
                    let _ = tx.send(Done::Get(req.id, s.get(&req).await));
                });
            }
            Action::Put(req) => {
                let (s, tx) = (store.clone(), tx.clone());
                tokio::spawn(async move {
                    let _ = tx.send(Done::Put(req.id, s.put(&req).await));
                });
            }
            Action::Delete(req) => {
                let (s, tx) = (store.clone(), tx.clone());
                tokio::spawn(async move {
                    let _ = tx.send(Done::Delete(req.id, s.delete(&req.key).await));
                });
            }
            Action::Event(e) => match e {
                Event::Claimed {
                    epoch,
                    dataset_id,
                    committed_lsn,
                } => {
                    tracing::info!(epoch, %dataset_id, committed_lsn, "claimed the dataset");
                    report.epoch = epoch;
                    report.committed_lsn = committed_lsn;
                }
                Event::Committed {
                    lsn,
                    generation,
                    head_bytes,
                } => {
                    tracing::debug!(lsn, generation, head_bytes, "committed");
                    report.committed_lsn = lsn;
                    report.commits += 1;
                    on_commit(lsn);
                }
                Event::Deleted { key } => tracing::debug!(%key, "deleted after the grace period"),
                Event::Fenced(err) => {
                    if err.kind() == ErrorKind::Fenced {
                        return Err(Fenced(err).into());
                    }
                    bail!("{err}");
                }
                Event::Error(err) => tracing::warn!("{err} (retrying)"),
            },
            Action::Wait { until } => {
                if let Some(t) = target {
                    if m.is_drained() && m.committed_lsn() >= t {
                        return Ok(report);
                    }
                }
                let wait = Duration::from_millis(until.saturating_sub(now)).min(opts.tail_interval);
                tokio::select! {
                    () = &mut stop => return Ok(report),
                    Some(done) = rx.recv() => {
                        let now = now_ms();
                        match done {
                            Done::Get(id, r) => m.handle_get(id, now, r),
                            Done::Put(id, r) => m.handle_put(id, now, r),
                            Done::Delete(id, r) => m.handle_delete(id, now, r),
                        }
                        // Drain whatever else finished.
                        while let Ok(done) = rx.try_recv() {
                            match done {
                                Done::Get(id, r) => m.handle_get(id, now, r),
                                Done::Put(id, r) => m.handle_put(id, now, r),
                                Done::Delete(id, r) => m.handle_delete(id, now, r),
                            }
                        }
                    }
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}
