//! The publisher: drives the core's commit machine with tokio, reading the
//! local WAL and uploading through a [`Store`].
//!
//! Group commit: the machine seals as soon as data waits and no upload is in
//! flight, so publish-to-visible lag is one upload plus the replica's poll;
//! `flush_interval` only bounds how long data may wait behind an upload.
//! Memory stays bounded however large the backlog: records are read from the
//! WAL only while the machine has room.
//!
//! Durable before visible: records are read only up to the WAL's durable
//! watermark ([`crate::wal::DurableMark`]), which the writer advances after
//! its fsync succeeds. A record written but not yet synced can vanish in a
//! power loss, and its LSN would then be given to another batch; publishing
//! it would make replicas diverge from the origin for good.
//!
//! On claiming the dataset, the publisher checks that the WAL still holds
//! the head's committed LSN, with the bytes that were published. A WAL that
//! ends before it lost published LSNs (restored from an old copy, a fresh
//! directory, a disk that lied about an fsync), and one whose record there
//! differs has given published LSNs to other batches; either way the
//! publisher stops with an error naming the LSNs rather than publish a
//! history that contradicts the one replicas already hold.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::sync::mpsc;
use walcast_core::catalog::Head;
use walcast_core::io::{ByteRange, GetRequest, GetResponse, RequestId};
use walcast_core::publisher::{Action, Event, Publisher, PublisherConfig, PutResponse};
use walcast_core::ErrorKind;

use crate::store::Store;
use crate::wal::{DurableMark, WalReader};

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
/// `on_commit` sees the committed LSN found on claiming the dataset (when
/// there is one), then every committed LSN.
pub async fn publish(
    wal_dir: PathBuf,
    store: Store,
    opts: PublishOptions,
    stop: impl std::future::Future<Output = ()>,
    mut on_commit: impl FnMut(u64),
) -> Result<PublishReport> {
    // The seed makes this process's writer id, which alone tells two claims
    // of one epoch apart: from the OS's randomness, so that two processes
    // started alike (pid 1 in two containers, in the same millisecond) do
    // not share it; the clock and pid only where that randomness fails.
    let mut bytes = [0u8; 8];
    let seed = match getrandom::fill(&mut bytes) {
        Ok(()) => u64::from_le_bytes(bytes),
        Err(_) => now_ms() ^ u64::from(std::process::id()).rotate_left(32),
    };
    let mut m = Publisher::new(opts.config.clone(), seed);
    let (tx, mut rx) = mpsc::unbounded_channel::<Done>();
    let mut reader = WalReader::open(&wal_dir)?;
    let mut mark = DurableMark::open(&wal_dir);
    let mut durable = match mark.read() {
        Ok(Some(lsn)) => lsn,
        Ok(None) => {
            tracing::warn!(
                "{}: no durable watermark yet; records are published once a writer has made them durable",
                wal_dir.display()
            );
            0
        }
        // `--once` publishes what is durable now, which is unknown.
        Err(e) if opts.once => return Err(e).context("reading the WAL's durable watermark"),
        Err(e) => {
            tracing::warn!("{e:#}; records are published once the writer has rewritten it");
            0
        }
    };
    // The WAL checked against the head as it is before claiming it: a WAL
    // that cannot hold the dataset (the wrong one, an empty one) stops here,
    // before its claim fences the publisher that is running on the right
    // one. The check on claiming stays: the head may move in between.
    if let Some(head) = current_head(&store).await {
        check_wal_holds_head(&wal_dir, &store, Some(&head), head.committed_lsn).await?;
    }
    let mut mark_retry_at: Option<std::time::Instant> = None;
    // With `once`: everything durable at the start.
    let target = opts.once.then_some(durable);
    let mut report = PublishReport::default();
    // Nothing is read from the WAL before the claim's check passed.
    let mut wal_checked = false;
    let mut pending_record: Option<(u64, Vec<u8>)> = None;
    let mut stop = Box::pin(stop);
    // The error the machine reported last, until the next commit: a stop
    // meanwhile ends the run with it (what was durable is not all out).
    let mut failing: Option<walcast_core::Error> = None;
    loop {
        let now = now_ms();
        // Feed the WAL while the machine has room.
        while let Some(next) = m.next_lsn().filter(|_| wal_checked) {
            // Records at or below the committed LSN (replayed to rebuild the
            // snapshot state) were published, hence durable, already; the
            // claim's check found them in the WAL.
            let committed = m.committed_lsn();
            if !m.has_room() || target.is_some_and(|t| next > t.max(committed)) {
                break;
            }
            if next > durable.max(committed) {
                // A mark torn by a crash (the writer rewrites it when it
                // opens the WAL) is read again once a second, and said once.
                if mark_retry_at.is_none_or(|t| t <= std::time::Instant::now()) {
                    match mark.read() {
                        Ok(read) => {
                            durable = read.unwrap_or(durable);
                            mark_retry_at = None;
                        }
                        Err(e) => {
                            if mark_retry_at.is_none() {
                                tracing::warn!("{e:#}");
                            }
                            mark_retry_at =
                                Some(std::time::Instant::now() + Duration::from_secs(1));
                        }
                    }
                }
                if next > durable.max(committed) {
                    break;
                }
            }
            if reader.next_lsn() > next {
                reader = WalReader::open(&wal_dir)?;
            }
            if pending_record.as_ref().is_none_or(|(l, _)| *l != next) {
                let found = if reader.seek_lsn(next)? {
                    reader.next_record()?
                } else {
                    None
                };
                match found {
                    Some(r) => pending_record = Some(r),
                    // The writer synced this record before it advanced the
                    // watermark: the log lost durable records.
                    None => bail!(
                        "{}: the WAL ends at LSN {} although its durable watermark is LSN \
                         {durable}: durable records are missing, refusing to publish",
                        wal_dir.display(),
                        reader.next_lsn() - 1,
                    ),
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
                    failing = None;
                    check_wal_holds_head(&wal_dir, &store, m.head(), committed_lsn).await?;
                    wal_checked = true;
                    report.epoch = epoch;
                    report.committed_lsn = committed_lsn;
                    if committed_lsn > 0 {
                        on_commit(committed_lsn);
                    }
                }
                Event::Committed {
                    lsn,
                    generation,
                    head_bytes,
                } => {
                    tracing::debug!(lsn, generation, head_bytes, "committed");
                    report.committed_lsn = lsn;
                    report.commits += 1;
                    failing = None;
                    on_commit(lsn);
                }
                Event::Deleted { key } => tracing::debug!(%key, "deleted after the grace period"),
                Event::Fenced(err) => {
                    if err.kind() == ErrorKind::Fenced {
                        return Err(Fenced(err).into());
                    }
                    bail!("{err}");
                }
                // With `once`, an error again with no commit in between
                // (the machine retried in between) ends the run, as
                // `replicate --once` ends: the store keeps failing. One
                // the publisher goes on from (a page it retires alone, a
                // delete) is followed by a commit.
                Event::Error(err)
                    if failing.is_some()
                        && target.is_some_and(|t| !wal_checked || m.committed_lsn() < t) =>
                {
                    bail!("{err}")
                }
                Event::Error(err) => {
                    tracing::warn!("{err} (retrying)");
                    failing = Some(err);
                }
            },
            Action::Wait { until } => {
                if let Some(t) = target {
                    if m.is_drained() && m.committed_lsn() >= t {
                        return Ok(report);
                    }
                }
                let wait = Duration::from_millis(until.saturating_sub(now)).min(opts.tail_interval);
                tokio::select! {
                    // Stopped with durable batches unpublished while the
                    // store was failing: say why they are not out.
                    () = &mut stop => return match failing {
                        Some(err) if m.committed_lsn()
                            < mark.read().ok().flatten().unwrap_or(durable).max(durable) =>
                        Err(anyhow::anyhow!(
                            "stopped while failing, LSN {} and after not published: {err}",
                            m.committed_lsn() + 1
                        )),
                        _ => Ok(report),
                    },
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

/// The dataset's head as the store holds it now, if it can be read and
/// decoded (anything else is left to the claim, which reads it again).
async fn current_head(store: &Store) -> Option<Head> {
    let req = GetRequest {
        id: RequestId(0),
        key: walcast_core::catalog::HEAD_KEY.to_string(),
        range: None,
        if_none_match: None,
        wait_ms: None,
        timeout_ms: 30_000,
        max_bytes: walcast_core::catalog::MAX_HEAD_BYTES as u64,
    };
    match store.get(&req).await {
        GetResponse::Ok { body, .. } => {
            let json = walcast_core::catalog::head_json(&body).ok()?;
            Head::decode(&json).ok()
        }
        _ => None,
    }
}

/// Checks, on claiming, that the WAL in `wal_dir` holds the head's
/// committed LSN with the bytes published for it: a WAL that ends before it
/// lost published LSNs, and one with other bytes there reused them. Either
/// way, publishing on would contradict what replicas already applied.
async fn check_wal_holds_head(
    wal_dir: &std::path::Path,
    store: &Store,
    head: Option<&Head>,
    committed: u64,
) -> Result<()> {
    if committed == 0 {
        return Ok(());
    }
    let mut r = WalReader::open(wal_dir)?;
    let record = if r.seek_lsn(committed)? {
        r.next_record()?
    } else {
        None
    };
    let Some((_, ours)) = record else {
        let last = r.next_lsn() - 1;
        bail!(
            "the dataset's head has committed LSN {committed} but the WAL in {} ends at LSN {last}: \
             LSNs {}..={committed} were published and then lost from this WAL (or it is not \
             the WAL this dataset was published from). A writer on it would give those LSNs \
             to other batches, so nothing is published; restore the WAL, or publish it as a \
             new dataset under another prefix",
            wal_dir.display(),
            last + 1,
        );
    };
    // The published record at `committed`: the head's last segment ends there.
    let Some(seg) = head
        .and_then(|h| h.segments.last())
        .filter(|s| s.first_lsn <= committed && committed <= s.last_lsn)
    else {
        // Retention keeps that segment; a head written without it (by an
        // older publisher) leaves the bytes unchecked.
        tracing::warn!(
            committed,
            "the dataset's head names no segment holding its committed LSN: the WAL's \
             record there cannot be compared with the published one"
        );
        return Ok(());
    };
    let start = seg.start_for(committed);
    // The range is the head's word: read no more than a replica would.
    let len = seg.records_end.saturating_sub(start.offset);
    if len > walcast_core::catalog::MAX_SEGMENT_BYTES {
        bail!(
            "the dataset's head says LSN {committed} lies {len} bytes into {} (from its index \
             entry at byte {}), more than a segment read ({} bytes) may hold: the WAL cannot be \
             checked against it, so nothing is published; check the head",
            seg.key,
            start.offset,
            walcast_core::catalog::MAX_SEGMENT_BYTES
        );
    }
    let req = GetRequest {
        id: RequestId(0),
        key: seg.key.clone(),
        range: Some(ByteRange::Bounded {
            start: start.offset,
            end: seg.records_end,
        }),
        if_none_match: None,
        wait_ms: None,
        timeout_ms: 30_000,
        max_bytes: len,
    };
    let mut attempt = 0;
    let body = loop {
        match store.get(&req).await {
            GetResponse::Ok { body, range, .. } => {
                // A store that ignored the range sent the whole object.
                let skip = if range.is_some() {
                    0
                } else {
                    usize::try_from(start.offset).unwrap_or(usize::MAX)
                };
                break body.get(skip..).map(<[u8]>::to_vec).unwrap_or_default();
            }
            other if attempt < 4 => {
                attempt += 1;
                tracing::warn!(key = %seg.key, "reading the last published segment: {other:?} (retrying)");
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
            other => bail!(
                "reading {} to check the WAL against LSN {committed}: {other:?}",
                seg.key
            ),
        }
    };
    let recs = walcast_core::segment::Records::new(&body, start.offset, start.lsn);
    for rec in recs {
        let rec = rec.map_err(|e| anyhow::anyhow!("{}: {e}", seg.key))?;
        if rec.lsn == committed {
            if rec.payload != ours.as_slice() {
                bail!(
                    "the WAL in {} holds LSN {committed} with other bytes than the dataset \
                     published (in {}): the WAL lost published LSNs and a writer gave them to \
                     other batches. Nothing is published; restore the WAL, or publish it as a \
                     new dataset under another prefix",
                    wal_dir.display(),
                    seg.key
                );
            }
            return Ok(());
        }
    }
    bail!("{}: no record at LSN {committed}", seg.key)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use walcast_core::batch::Op;

    use super::*;
    use crate::wal::testing::FaultIo;
    use crate::wal::{log_path, Writer};

    fn put(k: &str, v: &str) -> Vec<Op> {
        vec![Op::put(k.as_bytes().to_vec(), v.as_bytes().to_vec())]
    }

    fn dataset(dir: &Path) -> (String, Store) {
        let url = url::Url::from_directory_path(dir).unwrap().to_string();
        let store = Store::open(&url).unwrap();
        (url, store)
    }

    async fn publish_once(wal: &Path, store: &Store) -> Result<PublishReport> {
        publish_once_with(wal, store, PublisherConfig::default()).await
    }

    async fn publish_once_with(
        wal: &Path,
        store: &Store,
        config: PublisherConfig,
    ) -> Result<PublishReport> {
        let opts = PublishOptions {
            config,
            once: true,
            ..PublishOptions::default()
        };
        tokio::time::timeout(
            Duration::from_secs(30),
            publish(
                wal.to_path_buf(),
                store.clone(),
                opts,
                std::future::pending(),
                |_| {},
            ),
        )
        .await
        .expect("publish --once finishes")
    }

    /// The value of `key` in a fresh replica of the dataset at `url`.
    async fn replica_value(url: &str, key: &str) -> Option<Vec<u8>> {
        let local = tempfile::tempdir().unwrap();
        let opts = crate::replica::ReplicateOptions {
            sink: None,
            interval: Duration::from_millis(50),
            once: true,
            concurrency: 2,
            progress: false,
            trust: Vec::new(),
        };
        crate::replica::replicate(url, local.path(), &opts, std::future::pending())
            .await
            .unwrap();
        let l = crate::replica::load(local.path()).unwrap();
        l.state.get(key.as_bytes()).map(<[u8]>::to_vec)
    }

    /// A durable watermark torn by a crash (it fails its checksum on every
    /// read): `publish --once`, which publishes what is durable now, fails
    /// naming the file instead of publishing nothing and saying it is done.
    /// The writer mends it when it next opens the WAL.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_torn_durable_watermark_fails_publish_once() {
        let wal = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let (_url, store) = dataset(data.path());
        let w = Writer::open(wal.path()).unwrap();
        assert_eq!(w.commit(&put("k1", "one")).unwrap(), 1);
        drop(w);
        let mark = crate::wal::durable_path(wal.path());
        let mut bytes = std::fs::read(&mark).unwrap();
        bytes[5] ^= 0xff;
        std::fs::write(&mark, &bytes).unwrap();
        let err = publish_once(wal.path(), &store)
            .await
            .expect_err("published with no watermark to go by");
        assert!(format!("{err:#}").contains("wal.durable"), "{err:#}");
        drop(Writer::open(wal.path()).unwrap());
        let report = publish_once(wal.path(), &store).await.unwrap();
        assert_eq!(report.committed_lsn, 1);
    }

    /// A batch written to the WAL whose fsync has not returned is not
    /// durable: a power loss can take it, and the writer then gives its LSN
    /// to another batch. The publisher must leave it alone until the fsync
    /// succeeds, so the dataset never holds an LSN the WAL can lose.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publishes_only_what_the_wal_made_durable() {
        let wal = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let (url, store) = dataset(data.path());
        let io = Arc::new(FaultIo::new(wal.path()));
        let w = Arc::new(Writer::open_with(wal.path(), io.clone()).unwrap());
        assert_eq!(w.commit(&put("k1", "one")).unwrap(), 1);
        assert_eq!(w.commit(&put("k2", "two")).unwrap(), 2);
        // LSN 3 is written to the log, its fsync stalls.
        io.hold();
        let stalled = {
            let w = w.clone();
            std::thread::spawn(move || w.commit(&put("k3", "lost in the power cut")))
        };
        io.wait_stalled();
        let report = publish_once(wal.path(), &store).await.unwrap();
        assert_eq!(
            report.committed_lsn, 2,
            "published an LSN whose fsync had not returned"
        );

        // Power cut: the disk holds the log as the last fsync left it.
        let after = tempfile::tempdir().unwrap();
        std::fs::write(log_path(after.path()), io.durable_image()).unwrap();
        io.release();
        assert_eq!(stalled.join().unwrap().unwrap(), 3);
        drop(w);
        let w = Writer::open(after.path()).unwrap();
        assert_eq!(w.last_lsn(), 2, "LSN 3 was lost with the power");
        assert_eq!(w.commit(&put("k3", "kept")).unwrap(), 3);
        drop(w);
        let report = publish_once(after.path(), &store).await.unwrap();
        assert_eq!(report.committed_lsn, 3);
        // Replicas see the batch the WAL holds at LSN 3, not the lost one.
        assert_eq!(
            replica_value(&url, "k3").await.as_deref(),
            Some(&b"kept"[..])
        );
    }

    /// A writer that restarts on a WAL that lost published LSNs must not
    /// reuse them: the publisher stops with an error naming them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refuses_a_wal_behind_the_published_head() {
        refuses_a_wal_behind(PublisherConfig::default()).await;
        // With snapshots on, a publisher replays the WAL from LSN 1.
        refuses_a_wal_behind(PublisherConfig {
            snapshot_every: Some(2),
            ..PublisherConfig::default()
        })
        .await;
        // With no history retained, the check still has the segment that
        // holds the committed LSN to compare the WAL's bytes against.
        refuses_a_wal_behind(PublisherConfig {
            snapshot_every: Some(1),
            retain_lsns: Some(0),
            grace_ms: 0,
            ..PublisherConfig::default()
        })
        .await;
    }

    async fn refuses_a_wal_behind(config: PublisherConfig) {
        let data = tempfile::tempdir().unwrap();
        let (url, store) = dataset(data.path());
        let wal = tempfile::tempdir().unwrap();
        let w = Writer::open(wal.path()).unwrap();
        for i in 1..=3 {
            w.commit(&put(&format!("k{i}"), "v")).unwrap();
            // One run per LSN: later runs snapshot what earlier ones
            // committed, and retention lets their segments go.
            if config.retain_lsns.is_some() || i == 3 {
                publish_once_with(wal.path(), &store, config.clone())
                    .await
                    .unwrap();
            }
        }
        drop(w);
        assert_eq!(
            publish_once_with(wal.path(), &store, config.clone())
                .await
                .unwrap()
                .committed_lsn,
            3
        );

        let head = current_head(&store).await.expect("a head");
        let claimed = head.epoch;
        if config.retain_lsns == Some(0) {
            // Retention let the history before LSN 3 go, not LSN 3's segment.
            assert_eq!(head.earliest_lsn, 3);
            assert!(head
                .segments
                .iter()
                .any(|s| s.first_lsn <= 3 && 3 <= s.last_lsn));
        }
        // The WAL lost LSNs 2 and 3.
        let lost = tempfile::tempdir().unwrap();
        let w = Writer::open(lost.path()).unwrap();
        w.commit(&put("k1", "v")).unwrap();
        drop(w);
        let err = publish_once_with(lost.path(), &store, config.clone())
            .await
            .expect_err("a WAL behind the head must be refused");
        let msg = format!("{err:#}");
        assert!(
            msg.contains("committed LSN 3")
                && msg.contains("ends at LSN 1")
                && msg.contains("LSNs 2..=3"),
            "{msg}"
        );
        // The writer went on and gave LSNs 2 and 3 to other batches, and more.
        let w = Writer::open(lost.path()).unwrap();
        for i in 2..=4 {
            w.commit(&put(&format!("k{i}"), "reused")).unwrap();
        }
        drop(w);
        let err = publish_once_with(lost.path(), &store, config.clone())
            .await
            .expect_err("a WAL that reused published LSNs must be refused");
        let msg = format!("{err:#}");
        assert!(msg.contains("holds LSN 3 with other bytes"), "{msg}");
        // Refused before claiming: a publisher running on the right WAL
        // would not have been fenced.
        let epoch = current_head(&store).await.expect("a head").epoch;
        assert_eq!(
            epoch, claimed,
            "a publisher refused for its WAL claimed the dataset"
        );
        // Nothing of it became visible.
        assert_eq!(replica_value(&url, "k4").await, None);
        assert_eq!(replica_value(&url, "k3").await.as_deref(), Some(&b"v"[..]));
    }
}
