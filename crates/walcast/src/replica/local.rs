//! A replica's local directory (`--local DIR`), which survives `kill -9`:
//!
//! - `state.wsnap`: a checkpoint in the snapshot format (`docs/FORMAT.md`),
//!   epoch 0, at the checkpoint's LSN, replaced atomically (rename);
//! - `applied.log`: a 40-byte header (`WCRL`, version `u16`, flags `u16`,
//!   base LSN `u64`, dataset id 16 bytes, 4 reserved, `crc32` of bytes 0..36)
//!   then every record applied after the checkpoint, framed like segment
//!   records and fsynced at each applied unit. On open, the log is replayed
//!   on top of the checkpoint when its header names the same dataset and LSN;
//!   a torn tail is cut. A batch is therefore either wholly in the state or
//!   not at all, and nothing applied is fetched again.
//!
//!   Only the end of the log can be torn: a damaged record with whole
//!   records after it is an error naming `applied.log` and the offset for
//!   `get`/`scan --local`, while `replicate` warns, keeps the records before
//!   the damage and fetches the rest again. A header failing its own
//!   checksum is an error (a whole header for another checkpoint is stale,
//!   and ignored).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use walcast_core::batch;
use walcast_core::catalog::DatasetId;
use walcast_core::segment::{encode_record, Records};
use walcast_core::snapshot;
use walcast_core::state::KvState;

use crate::store::{write_atomic, write_atomic_with};

const LOG_MAGIC: &[u8; 4] = b"WCRL";
const LOG_HEADER: usize = 40;
/// Checkpoint once the log holds this many bytes.
const CHECKPOINT_BYTES: u64 = 64 << 20;

/// The most of `applied.log` a load reads: a checkpoint is due past
/// [`CHECKPOINT_BYTES`] after an applied unit (a segment, at most
/// `MAX_SEGMENT_BYTES`), with room for one that failed. Records past it
/// are cut as a torn tail and fetched again; a file of junk that large is
/// refused by its header.
const MAX_LOG_READ: u64 = CHECKPOINT_BYTES + 2 * walcast_core::catalog::MAX_SEGMENT_BYTES;

/// What a local replica directory holds.
#[derive(Debug, Default)]
pub struct Local {
    /// The state.
    pub state: KvState,
    /// Its applied LSN.
    pub applied: u64,
    /// Its dataset, if it ever synced.
    pub dataset: Option<DatasetId>,
}

/// A replica's local directory.
#[derive(Debug)]
pub struct LocalDir {
    dir: PathBuf,
    log: Option<File>,
    log_len: u64,
    buf: Vec<u8>,
    /// `replica.lock` and the directory itself, locked while this process
    /// replicates into the directory: two at once would append the same
    /// LSNs to one log and checkpoint over each other. (The directory's
    /// lock holds when `replica.lock` is deleted by hand.)
    _lock: (File, Option<File>),
}

fn log_header(base: u64, id: DatasetId) -> [u8; LOG_HEADER] {
    let mut h = [0u8; LOG_HEADER];
    h[..4].copy_from_slice(LOG_MAGIC);
    h[4..6].copy_from_slice(&1u16.to_le_bytes());
    h[8..16].copy_from_slice(&base.to_le_bytes());
    h[16..32].copy_from_slice(&id.0);
    let crc = crc32fast::hash(&h[..36]);
    h[36..40].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Removes the temporary files of atomic writes (`.tmp…`) in `dir` that a
/// process killed mid-write left behind.
fn sweep_temp_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if name.to_string_lossy().starts_with(".tmp") && e.file_type().is_ok_and(|t| t.is_file()) {
            if let Err(err) = std::fs::remove_file(e.path()) {
                tracing::warn!("{}: not removed ({err})", e.path().display());
            }
        }
    }
}

impl LocalDir {
    /// Opens (creating) `dir` and loads what it holds.
    pub fn open(dir: &Path) -> Result<(LocalDir, Local)> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let lockp = dir.join("replica.lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lockp)
            .with_context(|| format!("opening {}", lockp.display()))?;
        // Where a directory opens as a file (Unix), its lock too: a file
        // system that locks no directories leaves `replica.lock` alone.
        let dir_lock = File::open(dir).ok();
        let locked = lock
            .try_lock()
            .and_then(|()| match dir_lock.as_ref().map(File::try_lock) {
                Some(Err(std::fs::TryLockError::WouldBlock)) => {
                    Err(std::fs::TryLockError::WouldBlock)
                }
                _ => Ok(()),
            });
        match locked {
            // Held: temporary files a killed checkpoint left (each as large
            // as the state) are no one's now.
            Ok(()) => sweep_temp_files(dir),
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "another `walcast replicate` (or a replica handle not yet closed) holds {}: one \
                 replica writes a directory at a time (`get` and `scan --local` read it beside \
                 that one)",
                lockp.display()
            ),
            // A file system without locks (NFS without a lock daemon, some
            // FUSE mounts): replicated into as before, unguarded.
            Err(std::fs::TryLockError::Error(e)) => tracing::warn!(
                "{}: cannot be locked ({e}); nothing stops a second `walcast replicate` \
                 from writing the directory too",
                lockp.display()
            ),
        }
        let (local, log) = read_local(dir)?;
        let mut ld = LocalDir {
            dir: dir.to_path_buf(),
            log: None,
            log_len: 0,
            buf: Vec::new(),
            _lock: (lock, dir_lock),
        };
        // Cut a torn tail off the log and append after its valid part. A
        // damaged record with whole records after it is not a torn tail:
        // the state stays at the last record before it, and what followed
        // is fetched again from the dataset (the remote is the source of
        // truth), with a warning naming the file and the offset.
        let logp = dir.join("applied.log");
        if let (Some(log), Some(id)) = (log, local.dataset) {
            if let Some(damage) = &log.damage {
                tracing::warn!(
                    "walcast replicate: {damage}; keeping the records before it (applied LSN {}) \
                     and fetching the rest again from the dataset",
                    local.applied
                );
            }
            let good = log.good;
            let f = OpenOptions::new()
                .write(true)
                .open(&logp)
                .with_context(|| format!("opening {}", logp.display()))?;
            f.set_len(good)
                .with_context(|| format!("truncating {}", logp.display()))?;
            f.sync_all()
                .with_context(|| format!("syncing {}", logp.display()))?;
            ld.log_len = good;
            let mut f = OpenOptions::new()
                .append(true)
                .open(&logp)
                .with_context(|| format!("opening {}", logp.display()))?;
            f.flush()?;
            ld.log = Some(f);
            // Keep the log tied to the checkpoint's base LSN: re-base it
            // by checkpointing when it replayed anything.
            if local.applied > 0 && good > LOG_HEADER as u64 {
                ld.checkpoint(&local.state, local.applied, id)?;
            }
        }
        Ok((ld, local))
    }

    /// Writes a checkpoint of `state` at `lsn` and starts a fresh log.
    pub fn checkpoint(&mut self, state: &KvState, lsn: u64, id: DatasetId) -> Result<()> {
        // Streamed: a checkpoint never holds a second copy of the state.
        write_atomic_with(&self.dir.join("state.wsnap"), |w| {
            let mut res = Ok(());
            snapshot::encode_to(state, lsn, 0, id, snapshot::DEFAULT_CHUNK_BYTES, &mut |b| {
                if res.is_ok() {
                    res = w.write_all(b);
                }
            });
            res
        })?;
        write_atomic(&self.dir.join("applied.log"), &log_header(lsn, id))?;
        self.log = Some(
            OpenOptions::new()
                .append(true)
                .open(self.dir.join("applied.log"))?,
        );
        self.log_len = LOG_HEADER as u64;
        Ok(())
    }

    /// Buffers an applied record for the log.
    pub fn record(&mut self, lsn: u64, payload: &[u8]) {
        encode_record(lsn, payload, &mut self.buf);
    }

    /// Makes the buffered records durable (after an applied unit); returns
    /// whether a checkpoint is due.
    pub fn flush(&mut self) -> Result<bool> {
        if self.buf.is_empty() {
            return Ok(false);
        }
        let f = self
            .log
            .as_mut()
            .ok_or_else(|| anyhow!("no log open: checkpoint first"))?;
        f.write_all(&self.buf)?;
        f.sync_data()?;
        self.log_len += self.buf.len() as u64;
        self.buf.clear();
        Ok(self.log_len > CHECKPOINT_BYTES)
    }

    /// Drops buffered records (after a reset).
    pub fn discard(&mut self) {
        self.buf.clear();
    }
}

/// The usable part of a replica directory's `applied.log`.
#[derive(Debug)]
struct LogState {
    /// Byte length of its valid part: the header and the whole records
    /// replayed.
    good: u64,
    /// Why the replay stopped before the end of the file, when it was not
    /// a torn tail: a damaged record with whole records after it (naming
    /// the file and the offset).
    damage: Option<String>,
}

/// Reads a replica directory without writing to it: the checkpoint, then
/// the log's records replayed on top when the log belongs to it. Also
/// returns the log's usable part (`None`: no log, or a stale one, left by a
/// crash between a checkpoint and its new log).
///
/// A torn tail (a record cut short by a crash mid-write, or one a running
/// `replicate` is appending to) ends the replay at the last whole record: a
/// bad record counts as torn only when nothing after it decodes as a whole
/// record. A damaged record with whole records after it is reported in
/// [`LogState::damage`]; a header failing its own checksum, or a record
/// whose checksum holds but whose batch does not decode, is an error naming
/// the file.
fn read_local(dir: &Path) -> Result<(Local, Option<LogState>)> {
    let mut local = Local::default();
    let snap = dir.join("state.wsnap");
    // Any error but its absence (a directory the caller may not search) is
    // one: the state is not taken for empty.
    let present = match std::fs::metadata(&snap) {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e).with_context(|| format!("reading {}", snap.display())),
    };
    if present {
        // Streamed in 1 MiB reads: loading never holds a second copy of the state.
        // Never a FIFO or device, which would block or never end.
        let mut f = crate::store::open_regular(&snap)
            .with_context(|| format!("opening {}", snap.display()))?;
        let mut dec = snapshot::SnapshotDecoder::new();
        let mut chunk = vec![0u8; 1 << 20];
        loop {
            let n = f
                .read(&mut chunk)
                .with_context(|| format!("reading {}", snap.display()))?;
            if n == 0 {
                break;
            }
            dec.feed(&chunk[..n])
                .map_err(|e| anyhow!("{}: {e}", snap.display()))?;
        }
        let (h, st) = dec
            .finish(None)
            .map_err(|e| anyhow!("{}: {e}", snap.display()))?;
        if h.lsn == u64::MAX {
            anyhow::bail!(
                "{}: the snapshot claims LSN {}, past any LSN",
                snap.display(),
                h.lsn
            );
        }
        local = Local {
            state: st,
            applied: h.lsn,
            dataset: Some(h.dataset_id),
        };
    }
    let logp = dir.join("applied.log");
    let Some(id) = local.dataset else {
        return Ok((local, None));
    };
    let f = match crate::store::open_regular(&logp) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((local, None)),
        Err(e) => return Err(e).with_context(|| format!("opening {}", logp.display())),
    };
    let mut bytes = Vec::new();
    f.take(MAX_LOG_READ)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", logp.display()))?;
    let Some(header) = bytes.first_chunk::<LOG_HEADER>() else {
        anyhow::bail!(
            "{}: damaged header: {} bytes, shorter than the {LOG_HEADER}-byte header",
            logp.display(),
            bytes.len()
        );
    };
    let stored = u32::from_le_bytes(header[36..40].try_into().expect("4 bytes"));
    let computed = crc32fast::hash(&header[..36]);
    if stored != computed || &header[..4] != LOG_MAGIC {
        anyhow::bail!(
            "{}: damaged header (offset 0): crc32 {computed:08x} of bytes 0..36, stored \
             {stored:08x}, magic {:?}",
            logp.display(),
            String::from_utf8_lossy(&header[..4])
        );
    }
    // A version, flags or reserved bytes this release does not know (a
    // newer release's log): an error, neither a stale log nor one to
    // overwrite.
    let version = u16::from_le_bytes([header[4], header[5]]);
    let flags = u16::from_le_bytes([header[6], header[7]]);
    if version != 1 || flags != 0 || header[32..36] != [0; 4] {
        anyhow::bail!(
            "{}: a log of version {version}, flags {flags:#06x} (this release reads version 1, \
             flags 0, with zero reserved bytes): written by a newer walcast?",
            logp.display()
        );
    }
    // A whole header for another checkpoint: stale (a crash between
    // writing a new checkpoint and its new log), ignored.
    if *header != log_header(local.applied, id) {
        return Ok((local, None));
    }
    let mut good = LOG_HEADER;
    let mut damage = None;
    for rec in Records::new(&bytes[LOG_HEADER..], LOG_HEADER as u64, local.applied + 1) {
        let rec = match rec {
            Ok(rec) => rec,
            Err(e) => {
                if whole_record_after(&bytes, good, local.applied + 1) {
                    damage = Some(format!(
                        "{}: damaged record at offset {good} (LSN {}), with whole records \
                         after it: {e}",
                        logp.display(),
                        local.applied + 1
                    ));
                }
                break;
            }
        };
        let at = rec.payload.as_ptr() as usize - bytes.as_ptr() as usize - 16;
        if rec.lsn == u64::MAX {
            anyhow::bail!(
                "{}: record at offset {at} claims LSN {}, past any LSN",
                logp.display(),
                rec.lsn
            );
        }
        let ops = batch::Batch::parse(rec.payload).map_err(|e| {
            anyhow!(
                "{}: record at offset {at} (LSN {}) does not decode: {e}",
                logp.display(),
                rec.lsn
            )
        })?;
        local.state.apply(ops);
        local.applied = rec.lsn;
        good = at + 16 + rec.payload.len();
    }
    Ok((
        local,
        Some(LogState {
            good: good as u64,
            damage,
        }),
    ))
}

/// Whether a whole record (a plausible LSN, its checksum right) starts
/// anywhere in `bytes` after offset `bad`, where a record with LSN `lsn`
/// failed to decode: then the bad record is damage, not a torn tail (a
/// crash only tears the end of the log).
fn whole_record_after(bytes: &[u8], bad: usize, lsn: u64) -> bool {
    // Bytes checksummed so far: a crafted log of frames each claiming the
    // rest of the file would otherwise cost quadratic time. Past twice the
    // log's size the bad record is taken for damage, the safe answer (reads
    // fail; `replicate` fetches the rest again).
    let mut hashed = 0usize;
    (bad + 1..bytes.len().saturating_sub(15)).any(|at| {
        let found = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        // Records are at least 16 bytes: the LSN of one starting `at`
        // is at most this far past the bad one's.
        let most = lsn.saturating_add(((at - bad) / 16) as u64);
        if !(lsn..=most).contains(&found) {
            return false;
        }
        let claimed = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4 bytes"));
        // A frame running past the end is no whole record (and costs no
        // checksum to refuse).
        if claimed as usize > bytes.len() - at - 16 {
            return false;
        }
        hashed = hashed.saturating_add(claimed as usize);
        hashed > bytes.len().saturating_mul(2)
            || matches!(
                Records::new(&bytes[at..], at as u64, found).next(),
                Some(Ok(_))
            )
    })
}

/// Loads a local replica directory for `get` and `scan`, read-only: it
/// creates, truncates, checkpoints and locks nothing, so it works on a
/// read-only directory and beside a running `replicate`. A damaged
/// `applied.log` (anything but a torn tail) is an error naming it and the
/// offset: `walcast replicate` on the directory keeps the records before the
/// damage and fetches the rest again.
pub fn load(dir: &Path) -> Result<Local> {
    if !dir.is_dir() {
        anyhow::bail!("{}: no such replica directory", dir.display());
    }
    let (local, log) = read_local(dir)?;
    if local.dataset.is_none() {
        anyhow::bail!(
            "{}: holds no replica state (no state.wsnap): run `walcast replicate` into it, \
             and read once it has applied a batch",
            dir.display()
        );
    }
    if let Some(damage) = log.and_then(|l| l.damage) {
        anyhow::bail!("{damage}; run `walcast replicate` on the directory to fetch it again");
    }
    Ok(local)
}

/// A replica's local directory as the driver loop keeps it: every applied
/// record logged and fsynced per applied unit, a checkpoint at a bootstrap,
/// at the first apply, and whenever the log grows past its bound.
#[derive(Debug)]
pub(crate) struct Persist {
    ld: LocalDir,
    has_log: bool,
}

impl Persist {
    /// Opens (creating) `dir`; returns what it holds to restore from.
    pub(crate) fn open(dir: &Path) -> Result<(Persist, Local)> {
        let (ld, local) = LocalDir::open(dir)?;
        let has_log = ld.log.is_some();
        Ok((Persist { ld, has_log }, local))
    }

    /// Persists what `e` says the machine `r` did; an error names the
    /// directory.
    pub(crate) fn on_event(
        &mut self,
        r: &walcast_core::replica::Replica,
        e: &walcast_core::replica::Event,
    ) -> Result<()> {
        self.persist(r, e).with_context(|| {
            format!(
                "io: the replica directory {} could not be written",
                self.ld.dir.display()
            )
        })
    }

    fn persist(
        &mut self,
        r: &walcast_core::replica::Replica,
        e: &walcast_core::replica::Event,
    ) -> Result<()> {
        use walcast_core::replica::Event;
        match e {
            Event::Record { lsn, payload } => self.ld.record(*lsn, payload),
            Event::Applied { .. } => {
                let id = r
                    .dataset_id()
                    .ok_or_else(|| anyhow!("applied without a dataset"))?;
                if !self.has_log {
                    self.ld.discard();
                    self.ld.checkpoint(r.state(), r.applied_lsn(), id)?;
                    self.has_log = true;
                } else if self.ld.flush()? {
                    self.ld.checkpoint(r.state(), r.applied_lsn(), id)?;
                }
            }
            Event::Bootstrapped { lsn, dataset_id } => {
                self.ld.discard();
                self.ld.checkpoint(r.state(), *lsn, *dataset_id)?;
                self.has_log = true;
            }
            // The state starts over: the next apply checkpoints it, rather
            // than appending the new history to the old checkpoint's log.
            Event::DatasetChanged { .. } => {
                self.ld.discard();
                self.has_log = false;
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset() -> DatasetId {
        DatasetId::from_seed(7)
    }

    /// A replica directory checkpointed at LSN 5, with an empty log.
    fn checkpointed_at_5() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let (mut ld, local) = LocalDir::open(dir.path()).unwrap();
        ld.checkpoint(&local.state, 5, dataset()).unwrap();
        dir
    }

    /// Appends `bytes` to the directory's `applied.log` as they are.
    fn append_to_log(dir: &tempfile::TempDir, bytes: &[u8]) {
        let logp = dir.path().join("applied.log");
        let mut all = std::fs::read(&logp).unwrap();
        all.extend_from_slice(bytes);
        std::fs::write(&logp, all).unwrap();
    }

    /// A log file far larger than any log (a sparse file of 60 GiB) is
    /// read no further than a log can be, and its junk header names the
    /// file; a FIFO at a file's place is refused at once, not waited on.
    #[test]
    fn a_huge_or_special_file_in_the_directory_is_refused_without_reading_it_all() {
        let dir = checkpointed_at_5();
        let logp = dir.path().join("applied.log");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&logp)
            .unwrap()
            .set_len(60 << 30)
            .unwrap();
        // Loads the header only: the zeros past it are a torn tail.
        let l = load(dir.path()).unwrap();
        assert_eq!(l.applied, 5);
        std::fs::remove_file(&logp).unwrap();
        let junk = std::fs::File::create(&logp).unwrap();
        junk.set_len(60 << 30).unwrap();
        let err = format!("{:#}", load(dir.path()).unwrap_err());
        assert!(
            err.contains("applied.log") && err.contains("damaged header"),
            "{err}"
        );
        #[cfg(unix)]
        for name in ["applied.log", "state.wsnap"] {
            let path = dir.path().join(name);
            std::fs::remove_file(&path).unwrap();
            let made = std::process::Command::new("mkfifo").arg(&path).status();
            assert!(made.unwrap().success());
            let err = format!("{:#}", load(dir.path()).unwrap_err());
            assert!(err.contains(name), "{err}");
            std::fs::remove_file(&path).unwrap();
            if name == "applied.log" {
                // The checkpoint alone again, for the next case.
                let (mut ld, local) = LocalDir::open(dir.path()).unwrap();
                ld.checkpoint(&local.state, 5, dataset()).unwrap();
            }
        }
    }

    /// A log whose header holds (its checksum too) but names a version,
    /// flags or reserved bytes this release does not know: an error naming
    /// the file for reads and for `replicate`, not a stale log to ignore
    /// (a silent rollback) and overwrite.
    #[test]
    fn a_log_of_a_newer_version_is_an_error_not_a_stale_log() {
        for (at, value) in [(4usize, 2u8), (6, 1), (33, 1)] {
            let dir = checkpointed_at_5();
            let logp = dir.path().join("applied.log");
            let mut h = log_header(5, dataset());
            h[at] = value;
            let crc = crc32fast::hash(&h[..36]);
            h[36..40].copy_from_slice(&crc.to_le_bytes());
            std::fs::write(&logp, h).unwrap();
            let err = format!("{:#}", load(dir.path()).unwrap_err());
            assert!(
                err.contains("applied.log") && err.contains("version"),
                "{err}"
            );
            let err = format!("{:#}", LocalDir::open(dir.path()).unwrap_err());
            assert!(err.contains("applied.log"), "{err}");
            assert_eq!(
                std::fs::read(&logp).unwrap(),
                h,
                "the log was left as it was"
            );
        }
    }

    /// A checkpoint's temporary file left by a process killed mid-write is
    /// removed when the directory is next opened for writing.
    #[test]
    fn temporary_files_a_killed_checkpoint_left_are_removed() {
        let dir = checkpointed_at_5();
        let tmp = dir.path().join(".tmpAbC123");
        std::fs::write(&tmp, vec![0u8; 4096]).unwrap();
        let (_ld, local) = LocalDir::open(dir.path()).unwrap();
        assert_eq!(local.applied, 5);
        assert!(!tmp.exists(), "the temporary file stays");
        assert!(dir.path().join("state.wsnap").exists());
    }

    /// A log record at LSN u64::MAX (after a checkpoint at u64::MAX - 1)
    /// is refused naming the file: no LSN follows it.
    #[test]
    fn a_log_record_at_the_last_lsn_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ld, local) = LocalDir::open(dir.path()).unwrap();
        ld.checkpoint(&local.state, u64::MAX - 1, dataset())
            .unwrap();
        drop(ld);
        let mut rec = Vec::new();
        let payload = batch::encode(&[batch::Op::put(b"k".to_vec(), b"v".to_vec())]).unwrap();
        encode_record(u64::MAX, &payload, &mut rec);
        append_to_log(&dir, &rec);
        let err = format!("{:#}", load(dir.path()).unwrap_err());
        assert!(
            err.contains("applied.log") && err.contains("past any LSN"),
            "{err}"
        );
    }

    /// Two `replicate` processes into one directory would append the same
    /// LSNs to one log and checkpoint over each other: the second is
    /// refused while the first holds the directory.
    #[test]
    fn one_replicate_at_a_time_holds_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (mut first, local) = LocalDir::open(dir.path()).unwrap();
        first.checkpoint(&local.state, 5, dataset()).unwrap();
        let err = LocalDir::open(dir.path()).expect_err("a second replicate");
        assert!(format!("{err:#}").contains("replica.lock"), "{err:#}");
        // Readers are not held back.
        assert_eq!(load(dir.path()).unwrap().applied, 5);
        drop(first);
        LocalDir::open(dir.path()).unwrap();
    }

    /// `replica.lock` deleted by hand while a `replicate` holds the
    /// directory: a second is still refused (the directory is locked too).
    #[cfg(unix)]
    #[test]
    fn a_deleted_lock_file_does_not_let_a_second_replicate_in() {
        let dir = tempfile::tempdir().unwrap();
        let (first, _) = LocalDir::open(dir.path()).unwrap();
        std::fs::remove_file(dir.path().join("replica.lock")).unwrap();
        let err = LocalDir::open(dir.path()).expect_err("a second replicate");
        assert!(format!("{err:#}").contains("replica.lock"), "{err:#}");
        drop(first);
        LocalDir::open(dir.path()).unwrap();
    }

    /// A directory that holds no replica (never replicated into, or its
    /// checkpoint gone) is an error naming it, not an empty state whose
    /// reads answer "not found".
    #[test]
    fn a_directory_without_a_checkpoint_is_no_empty_replica() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(dir.path()).expect_err("no state.wsnap");
        assert!(format!("{err:#}").contains("no replica state"), "{err:#}");
    }

    /// A crafted log: a bad record, then frames each claiming the rest of
    /// the file with a plausible LSN. Looking for a whole record after the
    /// bad one checksummed each claim: hours for a few MiB. It is bounded
    /// now, and the bad record counts as damage (reads fail, naming it).
    #[test]
    fn a_log_of_frames_claiming_the_rest_of_the_file_is_damage_found_quickly() {
        let dir = checkpointed_at_5();
        let n = (1usize << 20) / 16;
        let mut tail = Vec::with_capacity(n * 16);
        for i in 0..n {
            let rest = ((n - i - 1) * 16) as u32;
            tail.extend_from_slice(&6u64.to_le_bytes());
            tail.extend_from_slice(&rest.to_le_bytes());
            tail.extend_from_slice(&0u32.to_le_bytes());
        }
        append_to_log(&dir, &tail);
        let err = load(dir.path()).expect_err("damage");
        assert!(format!("{err:#}").contains("damaged record"), "{err:#}");
    }

    /// A torn last record (a crash mid-append) whose partial payload holds
    /// bytes that read as a frame with a plausible LSN and a huge length
    /// is still a torn tail: such a frame runs past the end of the file.
    #[test]
    fn a_torn_tail_holding_a_frame_that_runs_past_the_end_is_torn() {
        let dir = checkpointed_at_5();
        let mut torn = Vec::new();
        torn.extend_from_slice(&6u64.to_le_bytes());
        torn.extend_from_slice(&1000u32.to_le_bytes());
        torn.extend_from_slice(&0u32.to_le_bytes());
        torn.extend_from_slice(&[0x41; 8]);
        torn.extend_from_slice(&6u64.to_le_bytes());
        torn.extend_from_slice(&u32::MAX.to_le_bytes());
        torn.extend_from_slice(&[0x41; 40]);
        append_to_log(&dir, &torn);
        assert_eq!(load(dir.path()).unwrap().applied, 5);
    }

    /// A checkpoint claiming LSN u64::MAX (whose successor overflows).
    #[test]
    fn a_checkpoint_at_the_last_lsn_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = Vec::new();
        snapshot::encode_to(
            &KvState::default(),
            u64::MAX,
            0,
            dataset(),
            snapshot::DEFAULT_CHUNK_BYTES,
            &mut |b| bytes.extend_from_slice(b),
        );
        std::fs::write(dir.path().join("state.wsnap"), bytes).unwrap();
        let err = load(dir.path()).expect_err("LSN u64::MAX");
        assert!(format!("{err:#}").contains("state.wsnap"), "{err:#}");
    }
}
