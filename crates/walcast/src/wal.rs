//! The local write-ahead log: [`Writer`] appends KV batches durably (fsync,
//! group commit under concurrency); [`WalReader`] tails it, in the same
//! process or another one, and [`DurableMark`] says how far it may read.
//!
//! Layout (`docs/FORMAT.md`): `DIR/wal.log` holds a 16-byte header (`WCWL`,
//! version `u16`, 10 reserved bytes) followed by records framed exactly like
//! segment records (`lsn u64, len u32, crc32 u32, payload`), dense from
//! LSN 1. `DIR/wal.lock` keeps a second writer out. `DIR/wal.durable` holds
//! the durable watermark. The directory is created `0700` and its files
//! `0600`: batches are application data.
//!
//! Durable before visible. A record is in `wal.log` as soon as it is
//! written, before its fsync returns, and a power loss can still take it;
//! a writer reopened after that gives its LSN to another batch. So readers
//! that publish (the publisher) read only up to the durable watermark, which
//! the writer records after an fsync succeeds and never before: every LSN at
//! or below it is on disk. The watermark itself needs no fsync. A stale
//! value after a crash only holds the publisher back until a writer reopens
//! the WAL, and [`Writer::open`] fsyncs what it recovered before recording
//! the watermark again. (Having the publisher fsync `wal.log` itself before
//! publishing what it read would not do: after a failed fsync Linux marks the
//! pages clean, so a later fsync on another descriptor returns `Ok` for
//! bytes that never reached the disk.)
//!
//! A failed append or fsync poisons the writer: the page cache no longer
//! says what is on disk, so every later commit is refused. Records after the
//! watermark are then cut from the log (best effort), so that reopening the
//! WAL cannot take them for durable ones; their commits all failed.
//!
//! Recovery truncates a torn tail: a record is acknowledged only after its
//! bytes are synced, so every acknowledged batch survives.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{anyhow, bail, Context, Result};
use walcast_core::batch::{self, Op};
use walcast_core::segment::{encode_record, MAX_RECORD_LEN, RECORD_HEADER_LEN};

const MAGIC: &[u8; 4] = b"WCWL";
const VERSION: u16 = 1;
const HEADER_LEN: u64 = 16;
const MARK_MAGIC: &[u8; 4] = b"WCWD";
const MARK_LEN: usize = 16;
/// Reads of `wal.durable` before a checksum mismatch is taken for a torn
/// write rather than a read that raced the writer's 16-byte rewrite.
const MARK_READS: u32 = 16;

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

/// The durable watermark file inside a WAL directory.
pub fn durable_path(dir: &Path) -> PathBuf {
    dir.join("wal.durable")
}

/// `wal.durable`: magic `WCWD`, the LSN (`u64`), `crc32` of the 12 bytes
/// before it. Rewritten in place; the checksum tells a torn read.
fn encode_mark(lsn: u64) -> [u8; MARK_LEN] {
    let mut b = [0u8; MARK_LEN];
    b[..4].copy_from_slice(MARK_MAGIC);
    b[4..12].copy_from_slice(&lsn.to_le_bytes());
    let crc = crc32fast::hash(&b[..12]);
    b[12..].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode_mark(b: &[u8; MARK_LEN]) -> Option<u64> {
    let crc = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
    (&b[..4] == MARK_MAGIC && crc32fast::hash(&b[..12]) == crc)
        .then(|| u64::from_le_bytes([b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11]]))
}

/// The durable watermark of the WAL in `dir`: the highest LSN its writer has
/// made durable, or `None` when no writer recorded one (or it cannot be read).
pub fn durable_lsn(dir: &Path) -> Option<u64> {
    DurableMark::open(dir).read().ok().flatten()
}

/// Creates `dir` and any missing parent, owner-only.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
}

/// `wal.unsynced`: present after an fsync failed at open (see
/// `Writer::open`).
fn unsynced_path(dir: &Path) -> PathBuf {
    dir.join("wal.unsynced")
}

/// Whether the bytes of `file` from `from` to `to` are all zero.
fn zeros_between(mut file: &File, from: u64, to: u64) -> std::io::Result<bool> {
    file.seek(SeekFrom::Start(from))?;
    let mut buf = vec![0u8; 64 << 10];
    let mut left = to.saturating_sub(from);
    while left > 0 {
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        file.read_exact(&mut buf[..n])?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        left -= n as u64;
    }
    Ok(true)
}

/// Takes `file`'s lock for this writer: refused when another holds it, and
/// an error naming the cause when the file system cannot lock.
fn take_lock(file: &File, path: &Path) -> Result<()> {
    match file.try_lock() {
        Ok(()) => Ok(()),
        Err(std::fs::TryLockError::WouldBlock) => {
            bail!("another writer holds {}", path.display())
        }
        Err(std::fs::TryLockError::Error(e)) => Err(anyhow::Error::new(e).context(format!(
            "locking {} (a file system without locks cannot hold a WAL: one writer \
             at a time is what keeps it whole)",
            path.display()
        ))),
    }
}

/// Options that create a file owner-only (`0600`) when it does not exist.
fn private_file() -> OpenOptions {
    let mut o = OpenOptions::new();
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o
}

/// The file operations a [`Writer`]'s durability rests on; tests put a
/// layer that fails or stalls them in place of the OS.
pub(crate) trait LogIo: Send + Sync {
    /// Appends `buf` at the file's position.
    fn append(&self, file: &mut File, buf: &[u8]) -> std::io::Result<()> {
        file.write_all(buf)
    }

    /// Makes everything appended durable.
    fn sync(&self, file: &File) -> std::io::Result<()> {
        file.sync_data()
    }
}

struct OsIo;

impl LogIo for OsIo {}

struct Inner {
    file: File,
    next_lsn: u64,
    len: u64,
}

/// What the last successful fsync covered, and the watermark recording it.
struct Synced {
    lsn: u64,
    len: u64,
    mark: File,
}

/// A durable, append-only local WAL of KV batches.
pub struct Writer {
    io: Arc<dyn LogIo>,
    inner: Mutex<Inner>,
    /// The fsync happens under this lock so one fsync covers every record
    /// appended before it (group commit).
    synced: Mutex<Synced>,
    sync_file: File,
    /// Why the writer refuses commits, after a failed append or fsync.
    failed: OnceLock<String>,
    _lock: File,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").finish_non_exhaustive()
    }
}

impl Writer {
    /// Opens (creating if needed, owner-only) the WAL in `dir`, recovers it
    /// (truncating a torn tail), makes what it holds durable, records the
    /// durable watermark, and takes the directory's writer lock.
    pub fn open(dir: &Path) -> Result<Writer> {
        Writer::open_with(dir, Arc::new(OsIo))
    }

    pub(crate) fn open_with(dir: &Path, io: Arc<dyn LogIo>) -> Result<Writer> {
        create_private_dir(dir)
            .with_context(|| format!("creating WAL directory {}", dir.display()))?;
        let lock = private_file()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("wal.lock"))
            .context("opening wal.lock")?;
        take_lock(&lock, &dir.join("wal.lock"))?;
        let path = log_path(dir);
        let mut file = private_file()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // The log itself is locked too: a `wal.lock` a running writer
        // holds, deleted by hand as if stale, must not let a second writer
        // append beside it (both would write the same LSNs at one offset).
        // (Unix only: on Windows a file lock is mandatory, and would keep
        // the writer's own reader and the publisher out of the log.)
        #[cfg(unix)]
        take_lock(&file, &path)?;
        // A log of zeros alone holds no record: a crash right after the
        // file was created can leave its length without its header. Begun
        // again, unless the watermark says records were acknowledged.
        let len = file.metadata()?.len();
        if len > 0 && durable_lsn(dir).unwrap_or(0) == 0 && zeros_between(&file, 0, len)? {
            tracing::warn!(
                bytes = len,
                "a WAL of zeros alone: writing its header again"
            );
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
        }
        if file.metadata()?.len() == 0 {
            file.write_all(&header())?;
            file.sync_all()?;
            File::open(dir)?.sync_all()?;
        }
        let unsynced = unsynced_path(dir);
        if let Ok(note) = std::fs::read_to_string(&unsynced) {
            bail!(
                "{}: {} Check the disk; then delete {} to keep the log as it reads now \
                 (or move the WAL directory aside and publish from a fresh one)",
                unsynced.display(),
                note.trim(),
                unsynced.display()
            );
        }
        let watermark = durable_lsn(dir);
        let mut reader = WalReader::open(dir)?;
        let mut last = 0;
        // The end of the watermark's record: what the last writer knew durable.
        let mut marked_end = reader.offset();
        // Damage past the watermark may be a group commit that reached the
        // disk out of order in a crash (records never acknowledged): the
        // error says how an operator who judges so keeps the rest.
        let hint = |e: anyhow::Error, reader: &WalReader| {
            let (at, bad) = (reader.offset(), reader.next_lsn());
            if watermark.is_some_and(|m| bad <= m) {
                return e;
            }
            anyhow!(
                "{e:#}. If the machine crashed while writing, a group commit may have reached \
                 the disk out of order (records never acknowledged: none at or below the durable \
                 watermark, {}); to keep the records before LSN {bad} and lose those after, copy \
                 the file aside, then `truncate -s {at} {}`",
                watermark.unwrap_or(0),
                path.display()
            )
        };
        while let Some((lsn, _)) = reader.next_record().map_err(|e| hint(e, &reader))? {
            last = lsn;
            if watermark.is_some_and(|m| lsn <= m) {
                marked_end = reader.offset();
            }
        }
        let good = reader.offset();
        let len = file.metadata()?.len();
        // The watermark is written after the fsync it records: a record at
        // or below it was acknowledged, so a "tail" that cuts one is damage
        // to acknowledged data, never a torn write.
        if let Some(mark) = watermark.filter(|&m| m > last) {
            bail!(
                "{}: corrupt at byte {good} (the record of LSN {}): LSNs up to {mark} were acknowledged \
                 as durable, and opening would cut them; nothing was changed",
                path.display(),
                last + 1
            );
        }
        if len > good {
            tracing::warn!(
                torn_bytes = len - good,
                last_lsn = last,
                "truncating a torn WAL tail"
            );
            file.set_len(good)?;
        }
        // A writer that died between its append and its fsync left records
        // that may exist only in the page cache: make them durable before
        // the watermark says so. Should that fsync fail (a writeback error
        // the page cache keeps), the next one would succeed without the
        // bytes reaching the disk: `wal.unsynced` records the failure, and
        // every open refuses until an operator removes it. Nothing is cut:
        // the watermark (not fsynced itself) may lag what was acknowledged.
        if let Err(e) = io.sync(&file) {
            let note = format!(
                "an fsync of {} failed at open ({e}): the records after LSN {} \
                 (byte {marked_end}) may not be on disk\n",
                path.display(),
                watermark.unwrap_or(0)
            );
            let kept = std::fs::write(unsynced_path(dir), note)
                .and_then(|()| File::open(unsynced_path(dir))?.sync_all())
                .and_then(|()| File::open(dir)?.sync_all());
            if let Err(m) = kept {
                tracing::error!("recording the failed fsync in wal.unsynced: {m}");
            }
            return Err(anyhow::Error::new(e).context(format!(
                "fsync of {} failed: the records after LSN {} may not be on disk (recorded in {})",
                path.display(),
                watermark.unwrap_or(0),
                unsynced_path(dir).display()
            )));
        }
        file.sync_all()
            .with_context(|| format!("fsync of {}", path.display()))?;
        file.seek(SeekFrom::Start(good))?;
        let mut mark = private_file()
            .create(true)
            .truncate(false)
            .write(true)
            .open(durable_path(dir))
            .context("opening wal.durable")?;
        mark.write_all(&encode_mark(last))
            .context("recording the durable watermark")?;
        let sync_file = file.try_clone()?;
        Ok(Writer {
            io,
            inner: Mutex::new(Inner {
                file,
                next_lsn: last + 1,
                len: good,
            }),
            synced: Mutex::new(Synced {
                lsn: last,
                len: good,
                mark,
            }),
            sync_file,
            failed: OnceLock::new(),
            _lock: lock,
        })
    }

    /// The LSN of the last batch appended (0 when empty). After a failed
    /// fsync, the last durable one.
    pub fn last_lsn(&self) -> u64 {
        self.inner.lock().map(|i| i.next_lsn - 1).unwrap_or(0)
    }

    /// The highest LSN made durable (what the watermark says).
    pub fn durable_lsn(&self) -> u64 {
        self.synced.lock().map(|s| s.lsn).unwrap_or(0)
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

    /// Refuses to go on after a failed append or fsync.
    fn check_usable(&self) -> Result<()> {
        if let Some(why) = self.failed.get() {
            bail!(
                "the WAL refuses commits after an earlier failure ({why}); \
                 open it again to recover what is on disk"
            );
        }
        Ok(())
    }

    /// Commits several payloads, each its own atomic batch with its own LSN,
    /// with one append and one fsync. Durable when this returns.
    ///
    /// After an error the outcome of these batches is unknown, and the
    /// writer refuses every later commit (see the module docs).
    pub fn commit_many(&self, payloads: &[&[u8]]) -> Result<Vec<u64>> {
        if let Some(p) = payloads.iter().find(|p| p.len() as u64 > MAX_RECORD_LEN) {
            bail!("batch of {} bytes exceeds {MAX_RECORD_LEN}", p.len());
        }
        if payloads.is_empty() {
            return Ok(Vec::new());
        }
        self.check_usable()?;
        let (first, last) = {
            let mut i = self
                .inner
                .lock()
                .map_err(|_| anyhow::anyhow!("WAL lock poisoned"))?;
            self.check_usable()?;
            let first = i.next_lsn;
            let last = first + payloads.len() as u64 - 1;
            let mut buf = Vec::with_capacity(
                payloads
                    .iter()
                    .map(|p| p.len() + RECORD_HEADER_LEN as usize)
                    .sum(),
            );
            for (k, p) in payloads.iter().enumerate() {
                encode_record(first + k as u64, p, &mut buf);
            }
            if let Err(e) = self.io.append(&mut i.file, &buf) {
                let _ = self
                    .failed
                    .set(format!("appending LSNs {first}..={last} failed: {e}"));
                // Cut a partial frame so the log stays well-formed.
                let len = i.len;
                let _ = i.file.set_len(len);
                let _ = i.file.seek(SeekFrom::Start(len));
                return Err(e).context("appending to the WAL");
            }
            i.len += buf.len() as u64;
            i.next_lsn = last + 1;
            (first, last)
        };
        // Group commit: one fsync covers everything appended before it.
        let mut s = self
            .synced
            .lock()
            .map_err(|_| anyhow::anyhow!("WAL lock poisoned"))?;
        if s.lsn >= last {
            // An fsync that succeeded covered these records.
            return Ok((first..=last).collect());
        }
        // The fsync that covered them (if one did) failed: a second one
        // would find the pages clean and return Ok.
        self.check_usable()?;
        let (upto, upto_len) = {
            let i = self
                .inner
                .lock()
                .map_err(|_| anyhow::anyhow!("WAL lock poisoned"))?;
            (i.next_lsn - 1, i.len)
        };
        if let Err(e) = self.io.sync(&self.sync_file) {
            let _ = self.failed.set(format!(
                "fsync failed with LSNs {}..={upto} not durable: {e}",
                s.lsn + 1
            ));
            self.cut_to(&s);
            return Err(e).context("fsync of the WAL");
        }
        // Only now may the publisher see these LSNs.
        let mark = encode_mark(upto);
        if let Err(e) = s
            .mark
            .seek(SeekFrom::Start(0))
            .and_then(|_| s.mark.write_all(&mark))
        {
            let _ = self.failed.set(format!(
                "recording the durable watermark at LSN {upto} failed: {e}"
            ));
            return Err(e).context("recording the WAL's durable watermark");
        }
        s.lsn = upto;
        s.len = upto_len;
        Ok((first..=last).collect())
    }

    /// After a failed fsync: drops every record after the last durable one
    /// from the log (best effort), so that a reopened writer cannot count
    /// bytes the page cache holds but the disk may not as durable. No commit
    /// of them succeeded.
    fn cut_to(&self, s: &Synced) {
        let Ok(mut i) = self.inner.lock() else { return };
        let cut = i
            .file
            .set_len(s.len)
            .and_then(|()| i.file.seek(SeekFrom::Start(s.len)).map(|_| ()))
            .and_then(|()| i.file.sync_all());
        if let Err(e) = cut {
            tracing::error!(
                "cutting the WAL back to LSN {} after a failed fsync: {e}",
                s.lsn
            );
        }
        i.len = s.len;
        i.next_lsn = s.lsn + 1;
    }
}

/// Reads a WAL directory's durable watermark (`wal.durable`), for readers
/// in the writer's process or another one.
#[derive(Debug)]
pub struct DurableMark {
    path: PathBuf,
    file: Option<File>,
}

impl DurableMark {
    /// The watermark of the WAL in `dir` (the file need not exist yet).
    pub fn open(dir: &Path) -> DurableMark {
        DurableMark {
            path: durable_path(dir),
            file: None,
        }
    }

    /// The highest LSN the writer has made durable; `None` when no writer
    /// recorded one yet. A read that caught the writer mid-update is read
    /// again; a mark that still fails its checksum (a write torn by a
    /// crash, which the writer mends when it next opens the WAL) is an
    /// error naming the file.
    pub fn read(&mut self) -> Result<Option<u64>> {
        for _ in 0..MARK_READS {
            if let Some(v) = self.read_once()? {
                return Ok(v);
            }
            std::thread::yield_now();
        }
        anyhow::bail!(
            "{} fails its checksum in {MARK_READS} reads: a write torn by a crash \
             (the WAL's writer rewrites it when it opens the WAL)",
            self.path.display()
        )
    }

    /// One read: `None` when the mark fails its checksum.
    fn read_once(&mut self) -> Result<Option<Option<u64>>> {
        if self.file.is_none() {
            match File::open(&self.path) {
                Ok(f) => self.file = Some(f),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some(None)),
                Err(e) => {
                    return Err(e).with_context(|| format!("opening {}", self.path.display()))
                }
            }
        }
        let Some(f) = self.file.as_mut() else {
            return Ok(Some(None));
        };
        let mut b = [0u8; MARK_LEN];
        f.seek(SeekFrom::Start(0))?;
        match f.read_exact(&mut b) {
            Ok(()) => Ok(decode_mark(&b).map(Some)),
            // Created, not yet written: no watermark recorded.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(Some(None)),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.path.display())),
        }
    }
}

/// Reads a WAL directory's records in order; stops (returns `None`) at the
/// end or at an incomplete tail, and can be called again as the log grows.
///
/// It reads every complete record, durable or not: a reader that publishes
/// must stop at the [`DurableMark`].
pub struct WalReader {
    file: File,
    /// The log's path, named in every error.
    path: PathBuf,
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
        if &h[..4] != MAGIC {
            bail!("{} is not a walcast WAL (no WAL magic)", path.display());
        }
        let version = u16::from_le_bytes([h[4], h[5]]);
        if version != VERSION {
            bail!(
                "{} is a walcast WAL of version {version}; this release reads version {VERSION}",
                path.display()
            );
        }
        Ok(WalReader {
            file,
            path,
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
        let at = |r: &WalReader| {
            format!(
                "reading {} at byte {} (LSN {})",
                r.path.display(),
                r.offset,
                r.next_lsn
            )
        };
        let len = self.file.metadata().with_context(|| at(self))?.len();
        if len < self.offset + RECORD_HEADER_LEN {
            return Ok(None);
        }
        self.file
            .seek(SeekFrom::Start(self.offset))
            .with_context(|| at(self))?;
        let mut h = [0u8; 16];
        self.file.read_exact(&mut h).with_context(|| at(self))?;
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
        let ctx = at(self);
        self.file.read_exact(&mut self.buf[16..]).context(ctx)?;
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
        // A bad record followed by zeros alone is a tail too: a filesystem
        // that kept a crashed append's new length but not all its data (ext4
        // with data=writeback, some network filesystems) leaves them, and
        // they hold no record (a record's LSN is never 0). Like any tail, it
        // is cut only above the watermark (`Writer::open`).
        if end < len && !self.zeros_from(end, len) {
            bail!(
                "{}: WAL corrupt at byte {} (LSN {}): {why}; {} bytes follow, refusing to drop them",
                self.path.display(),
                self.offset,
                self.next_lsn,
                len - end
            );
        }
        tracing::debug!(offset = self.offset, why, "stopping at a torn WAL tail");
        Ok(None)
    }

    /// Whether every byte from `from` to `len` is zero (false when they
    /// cannot be read).
    fn zeros_from(&self, from: u64, len: u64) -> bool {
        zeros_between(&self.file, from, len).unwrap_or(false)
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

/// A fault-injecting [`LogIo`] for tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::fs::File;
    use std::io::Write;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Condvar, Mutex};
    use std::time::{Duration, Instant};

    use super::{log_path, LogIo};

    /// Fails the next append or fsync on request, stalls fsyncs while held,
    /// and keeps the log's bytes as they stood after the last fsync that
    /// succeeded: what a power loss would leave on disk.
    #[derive(Debug)]
    pub(crate) struct FaultIo {
        path: PathBuf,
        fail_append: AtomicBool,
        fail_sync: AtomicBool,
        held: Mutex<bool>,
        release: Condvar,
        stalled: AtomicBool,
        durable: Mutex<Vec<u8>>,
    }

    impl FaultIo {
        /// A layer for the WAL in `dir`.
        pub(crate) fn new(dir: &Path) -> Self {
            FaultIo {
                path: log_path(dir),
                fail_append: AtomicBool::new(false),
                fail_sync: AtomicBool::new(false),
                held: Mutex::new(false),
                release: Condvar::new(),
                stalled: AtomicBool::new(false),
                durable: Mutex::new(Vec::new()),
            }
        }

        /// The next append fails (after writing nothing).
        pub(crate) fn fail_next_append(&self) {
            self.fail_append.store(true, Ordering::SeqCst);
        }

        /// The next fsync fails, once: like Linux after a writeback error,
        /// the fsync after it succeeds although the data never reached the disk.
        pub(crate) fn fail_next_sync(&self) {
            self.fail_sync.store(true, Ordering::SeqCst);
        }

        /// Fsyncs wait until [`release`](Self::release).
        pub(crate) fn hold(&self) {
            *self.held.lock().unwrap() = true;
        }

        /// Lets held fsyncs go on.
        pub(crate) fn release(&self) {
            *self.held.lock().unwrap() = false;
            self.release.notify_all();
        }

        /// Waits until an fsync is stalled by [`hold`](Self::hold).
        pub(crate) fn wait_stalled(&self) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !self.stalled.load(Ordering::SeqCst) {
                assert!(Instant::now() < deadline, "no fsync stalled");
                std::thread::sleep(Duration::from_millis(1));
            }
        }

        /// The log as the last successful fsync left it on disk.
        pub(crate) fn durable_image(&self) -> Vec<u8> {
            self.durable.lock().unwrap().clone()
        }
    }

    impl LogIo for FaultIo {
        fn append(&self, file: &mut File, buf: &[u8]) -> std::io::Result<()> {
            if self.fail_append.swap(false, Ordering::SeqCst) {
                return Err(std::io::Error::other("injected write failure"));
            }
            file.write_all(buf)
        }

        fn sync(&self, file: &File) -> std::io::Result<()> {
            {
                let mut held = self.held.lock().unwrap();
                while *held {
                    self.stalled.store(true, Ordering::SeqCst);
                    held = self.release.wait(held).unwrap();
                }
            }
            if self.fail_sync.swap(false, Ordering::SeqCst) {
                return Err(std::io::Error::other("injected fsync failure (EIO)"));
            }
            file.sync_data()?;
            *self.durable.lock().unwrap() = std::fs::read(&self.path)?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::testing::FaultIo;
    use super::*;

    fn put(k: &str, v: &str) -> Vec<Op> {
        vec![Op::put(k.as_bytes().to_vec(), v.as_bytes().to_vec())]
    }

    fn records(dir: &Path) -> Vec<u64> {
        let mut r = WalReader::open(dir).unwrap();
        let mut out = Vec::new();
        while let Some((lsn, _)) = r.next_record().unwrap() {
            out.push(lsn);
        }
        out
    }

    /// An operator deletes `wal.lock` of a running writer as if it were
    /// stale, then starts a second writer: it must be refused, not append
    /// the same LSNs as the first at the same offset.
    #[test]
    fn a_deleted_lock_file_does_not_let_a_second_writer_in() {
        let dir = tempfile::tempdir().unwrap();
        let w = Writer::open(dir.path()).unwrap();
        assert_eq!(w.commit(&put("a", "1")).unwrap(), 1);
        std::fs::remove_file(dir.path().join("wal.lock")).unwrap();
        let err = Writer::open(dir.path()).expect_err("a second writer beside a running one");
        assert!(
            format!("{err:#}").contains("another writer holds"),
            "{err:#}"
        );
        assert_eq!(w.commit(&put("b", "2")).unwrap(), 2);
        drop(w);
        assert_eq!(records(dir.path()), [1, 2]);
    }

    /// A reader's corruption error names the log, the byte and the LSN.
    #[test]
    fn a_readers_corruption_error_names_the_log() {
        let dir = tempfile::tempdir().unwrap();
        {
            let w = Writer::open(dir.path()).unwrap();
            for i in 0..3 {
                w.commit(&put(&format!("k{i}"), "v")).unwrap();
            }
        }
        let path = log_path(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        // The first record's payload: its checksum fails, records follow.
        bytes[HEADER_LEN as usize + RECORD_HEADER_LEN as usize] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let mut r = WalReader::open(dir.path()).unwrap();
        let msg = format!("{:#}", r.next_record().expect_err("corrupt"));
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains("LSN 1"),
            "{msg}"
        );
    }

    #[test]
    fn a_failed_fsync_poisons_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let io = Arc::new(FaultIo::new(dir.path()));
        let w = Writer::open_with(dir.path(), io.clone()).unwrap();
        assert_eq!(w.commit(&put("a", "1")).unwrap(), 1);
        io.fail_next_sync();
        let err = w.commit(&put("b", "2")).unwrap_err();
        assert!(format!("{err:#}").contains("fsync"), "{err:#}");
        // The next fsync would succeed (the kernel reported the error once
        // and marked the pages clean): the writer must not try it.
        let err = w
            .commit(&put("c", "3"))
            .expect_err("a commit after a failed fsync must be refused");
        let msg = format!("{err:#}");
        assert!(msg.contains("fsync") && msg.contains("earlier"), "{msg}");
        assert!(w.commit_many(&[b"x", b"y"]).is_err());
        assert_eq!(durable_lsn(dir.path()), Some(1));
        drop(w);
        // Reopening drops what the failed fsync covered and carries on.
        let w = Writer::open(dir.path()).unwrap();
        assert_eq!(w.last_lsn(), 1);
        assert_eq!(w.commit(&put("b", "2")).unwrap(), 2);
        drop(w);
        assert_eq!(records(dir.path()), [1, 2]);
    }

    /// A WAL directory holding LSNs 1 to 3, committed and closed.
    fn three_commits() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let w = Writer::open(dir.path()).unwrap();
        for (k, v) in [("a", "1"), ("b", "2"), ("c", "3")] {
            w.commit(&put(k, v)).unwrap();
        }
        dir
    }

    /// A writer died between appending LSN 4 and its fsync, and the
    /// kernel's writeback of it failed: the open's fsync reports the error
    /// (once: the next would succeed without the bytes on disk). The open
    /// fails, and so does every open after it, naming `wal.unsynced`, until
    /// an operator removes it; nothing is cut.
    #[test]
    fn a_failed_fsync_at_open_is_not_forgotten_by_the_next_open() {
        let dir = three_commits();
        let mut frame = Vec::new();
        encode_record(4, &batch::encode(&put("d", "4")).unwrap(), &mut frame);
        let mut f = OpenOptions::new()
            .append(true)
            .open(log_path(dir.path()))
            .unwrap();
        f.write_all(&frame).unwrap();
        drop(f);
        assert_eq!(records(dir.path()), [1, 2, 3, 4]);
        let io = Arc::new(FaultIo::new(dir.path()));
        io.fail_next_sync();
        let err = Writer::open_with(dir.path(), io).expect_err("the fsync failed");
        assert!(format!("{err:#}").contains("fsync"), "{err:#}");
        let err = format!("{:#}", Writer::open(dir.path()).expect_err("still refused"));
        assert!(
            err.contains("wal.unsynced") && err.contains("LSN 3"),
            "{err}"
        );
        assert_eq!(records(dir.path()), [1, 2, 3, 4], "nothing was cut");
        std::fs::remove_file(dir.path().join("wal.unsynced")).unwrap();
        let w = Writer::open(dir.path()).unwrap();
        assert_eq!((w.last_lsn(), w.durable_lsn()), (4, 4));
    }

    /// A crash left the log longer than what reached the disk, the rest
    /// zeros (a filesystem that kept the new length, not the data): the
    /// zeros are a torn tail, cut at open, not damage that keeps the WAL
    /// from opening. Garbage that is not all zeros still refuses.
    #[test]
    fn a_tail_of_zeros_a_crash_left_is_cut() {
        let dir = three_commits();
        let path = log_path(dir.path());
        let len = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len + 4096)
            .unwrap();
        let w = Writer::open(dir.path()).unwrap();
        assert_eq!(w.last_lsn(), 3);
        assert_eq!(w.commit(&put("d", "4")).unwrap(), 4);
        drop(w);
        assert_eq!(records(dir.path()), [1, 2, 3, 4]);
        // A frame whose end did not reach the disk (zeros in its place),
        // zeros after it: a tail too.
        let mut frame = Vec::new();
        encode_record(
            5,
            &batch::encode(&put("e", &"x".repeat(200))).unwrap(),
            &mut frame,
        );
        let cut = frame.len() - 100;
        frame[cut..].fill(0);
        frame.extend_from_slice(&[0; 4096]);
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&frame)
            .unwrap();
        let w = Writer::open(dir.path()).unwrap();
        assert_eq!(w.last_lsn(), 4);
        drop(w);
        // Not all zeros: refused, nothing changed.
        let len = std::fs::metadata(&path).unwrap().len();
        let mut f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len + 4096).unwrap();
        f.seek(SeekFrom::Start(len + 4000)).unwrap();
        f.write_all(&[1]).unwrap();
        drop(f);
        let err = Writer::open(dir.path()).expect_err("garbage after the records");
        assert!(format!("{err:#}").contains("refusing to drop"), "{err:#}");
        // It says how to keep what comes before.
        assert!(
            format!("{err:#}").contains(&format!("truncate -s {len} {}", path.display())),
            "{err:#}"
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len + 4096);
        // Which does: the log opens with the records before.
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len)
            .unwrap();
        assert_eq!(Writer::open(dir.path()).unwrap().last_lsn(), 4);
    }

    /// A crash right after the log was created left its length, not its
    /// header (zeros alone): the log holds no record and is begun again.
    /// The same zeros where the watermark says records were acknowledged
    /// are damage: refused, the file left as it was.
    #[test]
    fn a_log_of_zeros_alone_is_begun_again_unless_records_were_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_path(dir.path());
        std::fs::write(&path, [0u8; 16]).unwrap();
        let w = Writer::open(dir.path()).unwrap();
        assert_eq!(w.commit(&put("a", "1")).unwrap(), 1);
        drop(w);
        assert_eq!(records(dir.path()), [1]);
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::write(&path, vec![0u8; len as usize]).unwrap();
        let err = Writer::open(dir.path()).expect_err("LSN 1 was acknowledged");
        assert!(format!("{err:#}").contains("wal.log"), "{err:#}");
        assert_eq!(std::fs::read(&path).unwrap(), vec![0u8; len as usize]);
        // A log of another version is named as such.
        let mut h = header();
        h[4] = 9;
        std::fs::write(&path, h).unwrap();
        let err = format!("{:#}", Writer::open(dir.path()).unwrap_err());
        assert!(err.contains("version 9"), "{err}");
    }

    #[test]
    fn a_commit_waiting_on_a_failed_fsync_fails_too() {
        let dir = tempfile::tempdir().unwrap();
        let io = Arc::new(FaultIo::new(dir.path()));
        let w = Arc::new(Writer::open_with(dir.path(), io.clone()).unwrap());
        io.hold();
        let a = {
            let w = w.clone();
            std::thread::spawn(move || w.commit(&put("a", "1")))
        };
        io.wait_stalled();
        // B appends while A's fsync is in flight, then waits for the fsync lock.
        let b = {
            let w = w.clone();
            std::thread::spawn(move || w.commit(&put("b", "2")))
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while w.last_lsn() < 2 {
            assert!(std::time::Instant::now() < deadline);
            std::thread::yield_now();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        io.fail_next_sync();
        io.release();
        assert!(a.join().unwrap().is_err());
        // B's record was written before the failed fsync; a second fsync
        // would return Ok without its bytes being on disk.
        assert!(
            b.join().unwrap().is_err(),
            "a batch covered by a failed fsync was acknowledged"
        );
        assert!(w.commit(&put("c", "3")).is_err());
    }

    #[test]
    fn a_failed_append_poisons_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let io = Arc::new(FaultIo::new(dir.path()));
        let w = Writer::open_with(dir.path(), io.clone()).unwrap();
        assert_eq!(w.commit(&put("a", "1")).unwrap(), 1);
        io.fail_next_append();
        assert!(w.commit(&put("b", "2")).is_err());
        let err = w.commit(&put("c", "3")).unwrap_err();
        assert!(format!("{err:#}").contains("earlier"), "{err:#}");
        drop(w);
        let w = Writer::open(dir.path()).unwrap();
        assert_eq!(w.commit(&put("b", "2")).unwrap(), 2);
    }

    #[cfg(unix)]
    #[test]
    fn wal_files_and_directories_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/wal");
        let w = Writer::open(&dir).unwrap();
        w.commit(&put("k", "v")).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        for d in [tmp.path().join("a"), tmp.path().join("a/b"), dir.clone()] {
            assert_eq!(mode(&d), 0o700, "{}", d.display());
        }
        let mut files = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            assert_eq!(mode(&p), 0o600, "{}", p.display());
            files += 1;
        }
        assert!(files >= 3, "wal.log, wal.lock and the durable watermark");
    }

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
        // Tear the last record, as a writer that died before its fsync
        // leaves it: the watermark never said it was durable.
        let path = log_path(dir.path());
        let len = std::fs::metadata(&path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 3).unwrap();
        std::fs::write(durable_path(dir.path()), encode_mark(99)).unwrap();
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

#[cfg(test)]
mod damage_tests {
    use super::*;

    fn put(i: u32) -> Vec<Op> {
        vec![Op::put(i.to_le_bytes().to_vec(), vec![7; 20])]
    }

    /// A WAL directory of `n` acknowledged commits, `put(0..n)`.
    fn committed(n: u32) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let w = Writer::open(dir.path()).unwrap();
        for i in 0..n {
            w.commit(&put(i)).unwrap();
        }
        dir
    }

    /// A length field damaged in an old, acknowledged record (one that the
    /// durable watermark covers) is corruption, not a torn tail: reopening
    /// must refuse rather than cut every later acknowledged record.
    #[test]
    fn damaged_length_of_an_old_record_does_not_drop_acknowledged_ones() {
        let dir = committed(10);
        assert_eq!(durable_lsn(dir.path()), Some(10));
        // Record 3's length field (byte 8 of its frame): one flipped bit, a
        // claimed length of 1 MiB + the real one, past the end of the file.
        let path = log_path(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        let frame = RECORD_HEADER_LEN as usize + batch::encode(&put(0)).unwrap().len();
        let at = HEADER_LEN as usize + 2 * frame + 8;
        bytes[at + 2] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        match Writer::open(dir.path()) {
            Err(e) => assert!(format!("{e:#}").contains("corrupt"), "{e:#}"),
            Ok(w) => panic!(
                "opened a WAL whose acknowledged LSNs 3..=10 are damaged; it now ends at LSN {} \
                 (file {} bytes, was {})",
                w.last_lsn(),
                std::fs::metadata(&path).unwrap().len(),
                bytes.len()
            ),
        }
    }

    /// A bad checksum in an acknowledged record with records after it: an
    /// error that does not suggest cutting the log there (a crash cannot
    /// have torn what was acknowledged; the disk damaged it).
    #[test]
    fn damage_to_acknowledged_records_suggests_no_cut() {
        let dir = committed(10);
        let path = log_path(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        let frame = RECORD_HEADER_LEN as usize + batch::encode(&put(0)).unwrap().len();
        bytes[HEADER_LEN as usize + 2 * frame + frame - 1] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let Err(e) = Writer::open(dir.path()) else {
            panic!("opened a WAL whose acknowledged LSN 3 is damaged");
        };
        let e = format!("{e:#}");
        assert!(
            e.contains("refusing to drop") && !e.contains("truncate -s"),
            "{e}"
        );
    }

    /// A flipped byte in the last acknowledged record: the watermark says it
    /// was durable, so it is not a torn write to be cut silently.
    #[test]
    fn damaged_last_acknowledged_record_is_not_cut_as_a_torn_tail() {
        let dir = committed(3);
        let path = log_path(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 1] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(w) = Writer::open(dir.path()) {
            panic!(
                "acknowledged LSN 3 (durable watermark 3) was cut as a torn tail; WAL ends at {}",
                w.last_lsn()
            );
        }
    }
}
