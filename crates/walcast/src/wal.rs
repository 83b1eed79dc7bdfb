//! The local write-ahead log: [`Writer`] appends KV batches durably (fsync,
//! group commit under concurrency); [`WalReader`] tails it, in the same
//! process or another one.
//!
//! Layout: `DIR/wal.log` holds a 16-byte header (`WCWL`, version `u16`,
//! 10 reserved bytes) followed by records framed exactly like segment records
//! (`lsn u64, len u32, crc32 u32, payload`), dense from LSN 1. `DIR/wal.lock`
//! keeps a second writer out. Recovery truncates a torn tail: a record is
//! acknowledged only after its bytes are synced, so every acknowledged batch
//! survives.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use walcast_core::batch::{self, Op};
use walcast_core::segment::{encode_record, MAX_RECORD_LEN, RECORD_HEADER_LEN};

const MAGIC: &[u8; 4] = b"WCWL";
const VERSION: u16 = 1;
const HEADER_LEN: u64 = 16;

fn header() -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(MAGIC);
    h[4..6].copy_from_slice(&VERSION.to_le_bytes());
    h
}

/// The log file inside a WAL directory.
pub fn log_path(dir: &Path) -> PathBuf {
    dir.join("wal.log")
}

struct Inner {
    file: File,
    next_lsn: u64,
    len: u64,
    poisoned: bool,
}

/// A durable, append-only local WAL of KV batches.
pub struct Writer {
    inner: Mutex<Inner>,
    /// Highest LSN known synced; the fsync itself happens under this lock so
    /// one fsync covers every record appended before it (group commit).
    synced: Mutex<u64>,
    sync_file: File,
    _lock: File,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").finish_non_exhaustive()
    }
}

impl Writer {
    /// Opens (creating if needed) the WAL in `dir`, recovers it (truncating a
    /// torn tail), and takes the directory's writer lock.
    pub fn open(dir: &Path) -> Result<Writer> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating WAL directory {}", dir.display()))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("wal.lock"))
            .context("opening wal.lock")?;
        if lock.try_lock().is_err() {
            bail!("another writer holds {}", dir.join("wal.lock").display());
        }
        let path = log_path(dir);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        if file.metadata()?.len() == 0 {
            file.write_all(&header())?;
            file.sync_all()?;
            if let Some(parent) = path.parent() {
                File::open(parent)?.sync_all()?;
            }
        }
        let mut reader = WalReader::open(dir)?;
        let mut last = 0;
        while let Some((lsn, _)) = reader.next_record()? {
            last = lsn;
        }
        let good = reader.offset();
        let len = file.metadata()?.len();
        if len > good {
            tracing::warn!(
                torn_bytes = len - good,
                last_lsn = last,
                "truncating a torn WAL tail"
            );
            file.set_len(good)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::Start(good))?;
        let sync_file = file.try_clone()?;
        Ok(Writer {
            inner: Mutex::new(Inner {
                file,
                next_lsn: last + 1,
                len: good,
                poisoned: false,
            }),
            synced: Mutex::new(last),
            sync_file,
            _lock: lock,
        })
    }

    /// The LSN of the last committed batch (0 when empty).
    pub fn last_lsn(&self) -> u64 {
        self.inner.lock().map(|i| i.next_lsn - 1).unwrap_or(0)
    }

    /// Commits one atomic batch; durable when this returns.
    pub fn commit(&self, ops: &[Op]) -> Result<u64> {
        let payload = batch::encode(ops).map_err(anyhow::Error::new)?;
        self.commit_payload(&payload)
    }

    /// Commits a raw payload (for WALs that are not KV batches).
    pub fn commit_payload(&self, payload: &[u8]) -> Result<u64> {
        Ok(self.commit_many(&[payload])?[0])
    }

    /// Commits several payloads, each its own atomic batch with its own LSN,
    /// with one append and one fsync. Durable when this returns.
    pub fn commit_many(&self, payloads: &[&[u8]]) -> Result<Vec<u64>> {
        if let Some(p) = payloads.iter().find(|p| p.len() as u64 > MAX_RECORD_LEN) {
            bail!("batch of {} bytes exceeds {MAX_RECORD_LEN}", p.len());
        }
        let (first, last) = {
            let mut i = self
                .inner
                .lock()
                .map_err(|_| anyhow::anyhow!("WAL lock poisoned"))?;
            if i.poisoned {
                bail!("the WAL failed earlier; reopen it");
            }
            let first = i.next_lsn;
            let mut buf = Vec::with_capacity(
                payloads
                    .iter()
                    .map(|p| p.len() + RECORD_HEADER_LEN as usize)
                    .sum(),
            );
            for (k, p) in payloads.iter().enumerate() {
                encode_record(first + k as u64, p, &mut buf);
            }
            if let Err(e) = i.file.write_all(&buf) {
                // Cut a partial frame so the log stays well-formed.
                let len = i.len;
                let _ = i.file.set_len(len);
                let _ = i.file.seek(SeekFrom::Start(len));
                i.poisoned = true;
                return Err(e).context("appending to the WAL");
            }
            i.len += buf.len() as u64;
            i.next_lsn += payloads.len() as u64;
            (first, i.next_lsn - 1)
        };
        // Group commit: one fsync covers everything appended before it.
        let mut synced = self
            .synced
            .lock()
            .map_err(|_| anyhow::anyhow!("WAL lock poisoned"))?;
        if *synced < last {
            let upto = self.last_lsn();
            self.sync_file.sync_data().context("fsync of the WAL")?;
            *synced = upto;
        }
        Ok((first..=last).collect())
    }
}

/// Reads a WAL directory's records in order; stops (returns `None`) at the
/// end or at an incomplete tail, and can be called again as the log grows.
pub struct WalReader {
    file: File,
    offset: u64,
    next_lsn: u64,
    buf: Vec<u8>,
}

impl WalReader {
    /// Opens the log of `dir` at its first record.
    pub fn open(dir: &Path) -> Result<WalReader> {
        let path = log_path(dir);
        let mut file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let mut h = [0u8; 16];
        file.read_exact(&mut h)
            .with_context(|| format!("{}: no WAL header", path.display()))?;
        if &h[..4] != MAGIC || h[4..6] != VERSION.to_le_bytes() {
            bail!(
                "{} is not a walcast WAL (version {})",
                path.display(),
                VERSION
            );
        }
        Ok(WalReader {
            file,
            offset: HEADER_LEN,
            next_lsn: 1,
            buf: Vec::new(),
        })
    }

    /// Byte offset of the next record.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// LSN of the next record.
    pub fn next_lsn(&self) -> u64 {
        self.next_lsn
    }

    /// The next record, or `None` at the (possibly incomplete) tail.
    /// A complete record with a bad checksum or LSN before the tail is an error.
    pub fn next_record(&mut self) -> Result<Option<(u64, Vec<u8>)>> {
        let len = self.file.metadata()?.len();
        if len < self.offset + RECORD_HEADER_LEN {
            return Ok(None);
        }
        self.file.seek(SeekFrom::Start(self.offset))?;
        let mut h = [0u8; 16];
        self.file.read_exact(&mut h)?;
        let plen = u64::from(u32::from_le_bytes([h[8], h[9], h[10], h[11]]));
        if plen > MAX_RECORD_LEN {
            // A garbage length can only come from a torn header at the tail.
            return self.tail_or_error(
                len,
                self.offset + RECORD_HEADER_LEN,
                "record length above the limit",
            );
        }
        if len < self.offset + RECORD_HEADER_LEN + plen {
            return Ok(None);
        }
        self.buf.clear();
        self.buf.extend_from_slice(&h);
        self.buf.resize(16 + plen as usize, 0);
        self.file.read_exact(&mut self.buf[16..])?;
        let mut recs = walcast_core::segment::Records::new(&self.buf, self.offset, self.next_lsn);
        match recs.next() {
            Some(Ok(r)) => {
                let out = (r.lsn, r.payload.to_vec());
                self.offset += self.buf.len() as u64;
                self.next_lsn += 1;
                Ok(Some(out))
            }
            Some(Err(e)) => {
                self.tail_or_error(len, self.offset + RECORD_HEADER_LEN + plen, &e.to_string())
            }
            None => Ok(None),
        }
    }

    /// A bad record that is the last thing in the file is a torn write (never
    /// acknowledged); one followed by more bytes is corruption, an error.
    fn tail_or_error(&self, len: u64, end: u64, why: &str) -> Result<Option<(u64, Vec<u8>)>> {
        if end < len {
            bail!(
                "WAL corrupt at byte {} (LSN {}): {why}; {} bytes follow, refusing to drop them",
                self.offset,
                self.next_lsn,
                len - end
            );
        }
        tracing::debug!(offset = self.offset, why, "stopping at a torn WAL tail");
        Ok(None)
    }

    /// Skips records until the next one is `lsn` (which must not be behind).
    pub fn seek_lsn(&mut self, lsn: u64) -> Result<bool> {
        while self.next_lsn < lsn {
            if self.next_record()?.is_none() {
                return Ok(false);
            }
        }
        Ok(self.next_lsn == lsn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_survive_and_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        {
            let w = Writer::open(dir.path()).unwrap();
            for i in 0..100u32 {
                assert_eq!(
                    w.commit(&[Op::put(i.to_le_bytes().to_vec(), vec![1; 10])])
                        .unwrap(),
                    u64::from(i) + 1
                );
            }
        }
        // Tear the last record.
        let path = log_path(dir.path());
        let len = std::fs::metadata(&path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 3).unwrap();
        let w = Writer::open(dir.path()).unwrap();
        assert_eq!(w.last_lsn(), 99);
        assert_eq!(w.commit(&[Op::delete(b"x".to_vec())]).unwrap(), 100);
        drop(w);
        let mut r = WalReader::open(dir.path()).unwrap();
        let mut n = 0;
        while let Some((lsn, _)) = r.next_record().unwrap() {
            n += 1;
            assert_eq!(lsn, n);
        }
        assert_eq!(n, 100);
    }

    #[test]
    fn group_commit_under_concurrency() {
        let dir = tempfile::tempdir().unwrap();
        let w = std::sync::Arc::new(Writer::open(dir.path()).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let w = w.clone();
                std::thread::spawn(move || {
                    (0..50)
                        .map(|i| {
                            w.commit(&[Op::put(format!("{t}-{i}").into_bytes(), vec![])])
                                .unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<u64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        all.sort_unstable();
        assert_eq!(all, (1..=400).collect::<Vec<_>>());
        assert!(
            Writer::open(dir.path()).is_err(),
            "a second writer is locked out"
        );
    }
}
