//! What a publisher is told: its configuration and the defaults and
//! bounds of its knobs.

/// Default [`PublisherConfig::max_commits_per_sec`]: ten commits a second,
/// about 20 PUTs a second under steady writes (a segment and the head each).
pub const DEFAULT_MAX_COMMITS_PER_SEC: u32 = 10;
/// Default [`PublisherConfig::commit_burst`].
pub const DEFAULT_COMMIT_BURST: u32 = 2;
/// Default [`PublisherConfig::tail_bytes`]: room for a commit's segments at
/// 1,000 small batches a second and ten commits a second, twice over.
pub const DEFAULT_TAIL_BYTES: usize = 32 << 10;
/// The largest `segment_bytes` that takes effect: a larger setting seals at
/// this size, so every segment (one record past it at most) stays within
/// [`crate::catalog::MAX_SEGMENT_BYTES`].
pub const MAX_SEGMENT_SEAL_BYTES: u64 = 128 << 20;

/// Most key writes a segment's key filter covers: a segment with more (a
/// bulk load) gets no filter, and a lazy replica that needs it fetches it.
/// Its filter takes at most 8,200 bytes, within
/// [`crate::catalog::MAX_SEGMENT_FILTER_BYTES`].
pub const MAX_SEGMENT_FILTER_KEYS: usize = 4096;

/// Bits per key of a segment's key filter, and its probes: about 0.05% false
/// positives, so that a cold read over the 20 or so segments past a chain
/// fetches one it does not need about once in a hundred reads.
pub const SEGMENT_FILTER_BITS_PER_KEY: u64 = 16;
/// See [`SEGMENT_FILTER_BITS_PER_KEY`].
pub const SEGMENT_FILTER_PROBES: u8 = 11;

/// Most bytes of segment key filters (decoded) a head carries, the newest
/// segments' first: a head stays far below
/// [`crate::catalog::MAX_HEAD_BYTES`] however large the segments past the
/// chain are (some 240 filters of 100 keys fit).
pub const MAX_HEAD_FILTER_BYTES: usize = 32 << 10;

/// Default [`PublisherConfig::snapshot_suffix_bytes`]: a snapshot's top
/// index of up to about 130 partitions (some 2,000,000 keys in 16 KiB data
/// blocks), about 5.5 KB of base64 in every head.
pub const DEFAULT_SNAPSHOT_SUFFIX_BYTES: usize = 4 << 10;

/// Tuning for a [`Publisher`](super::Publisher).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublisherConfig {
    /// Seal a segment once it holds this many bytes (at most
    /// [`MAX_SEGMENT_SEAL_BYTES`]).
    pub segment_bytes: u64,
    /// Longest time (ms) a record may wait before it is sealed, even while
    /// another upload is in flight.
    pub flush_interval_ms: u64,
    /// Shortest time (ms) between two seals, unless a segment is full: caps
    /// segment PUTs and head commits at about `1000 / min_commit_interval_ms`
    /// a second under steady writes, for at most this much added lag. 0 (the
    /// default) seals whenever data waits and no upload is in flight.
    pub min_commit_interval_ms: u64,
    /// Commit budget under steady writes: at most this many seals (each a
    /// segment PUT and a head PUT) a second on average, unless a segment is
    /// full. 0 turns the budget off (commit whenever data waits and no upload
    /// is in flight). The budget refills continuously, so the first batch
    /// after a quiet period is sealed at once.
    pub max_commits_per_sec: u32,
    /// Seals allowed back to back before the budget spaces them (at least 1).
    pub commit_burst: u32,
    /// Sealed segments waiting for upload or commit, at most.
    pub max_pending_segments: usize,
    /// Write a snapshot every this many LSNs (KV payloads only).
    pub snapshot_every: Option<u64>,
    /// Also write a snapshot once this many bytes of batches were pushed
    /// since the last one, however few LSNs that was (a bulk load in large
    /// batches): bounds what a replica replays after the snapshot in bytes,
    /// not only in LSNs. Needs `snapshot_every`.
    pub snapshot_bytes: Option<u64>,
    /// A snapshot is never due before this multiple (in percent: 200 is
    /// twice) of the last snapshot's size in bytes of batches was pushed
    /// since it, whatever
    /// `snapshot_every` and `snapshot_bytes` say: snapshots then cost at
    /// most `1 / snapshot_ratio` times the batches' bytes in uploads,
    /// however large the dataset, and a replica bootstrapping from one
    /// replays at most about that multiple of its size after it. The first
    /// snapshot is not held back. When fewer keys remain than the last
    /// snapshot held, its size is scaled down by their share (a dataset
    /// that shrank is weighed by what is left). With deltas, 100 uploads
    /// the least of the settings measured under writes spread over the keys
    /// (docs/BENCHMARKS.md). Unset: no floor.
    pub snapshot_ratio_percent: Option<u32>,
    /// Keep at least this many LSNs of history in segments; older ones
    /// leave the catalog once a snapshot covers them. The segment holding
    /// the committed LSN always stays (0 keeps one LSN): a restarted
    /// publisher checks its WAL against that record.
    pub retain_lsns: Option<u64>,
    /// Delete an object only this long (ms) after the commit that retired it.
    pub grace_ms: u64,
    /// Segments kept inline in the head (at least `page_fanout`). The
    /// segments past the newest snapshot or delta also stay inline while
    /// they number at most four times this (and at most 128), so the head
    /// then holds up to that many plus `page_fanout - 1`.
    pub inline_segments: usize,
    /// Bytes of the segment files a commit adds that its head carries as
    /// copies, so a replica following the tail applies a commit from the
    /// head alone (one GET per commit instead of two). Each segment is
    /// carried by one head only. 0: none. Capped at
    /// [`crate::catalog::MAX_TAIL_BYTES`]; a segment larger than this is
    /// only ever fetched.
    pub tail_bytes: usize,
    /// Entries per catalog page.
    pub page_fanout: usize,
    /// The head carries a block-indexed snapshot's top index and footer
    /// ([`crate::catalog::SnapshotEntry::suffix`]) when they take at most
    /// this many bytes, so a lazy replica's cold read saves a round trip
    /// (0: never). Capped at [`crate::catalog::MAX_SNAPSHOT_SUFFIX`].
    pub snapshot_suffix_bytes: usize,
    /// First retry delay (ms).
    pub retry_base_ms: u64,
    /// Longest retry delay (ms).
    pub retry_max_ms: u64,
    /// Failed attempts in a row before an [`Event::Error`](super::Event::Error)
    /// is reported, and again after every as many more (retries go on; 0
    /// counts as 1).
    pub max_attempts: u32,
    /// While idle, re-read the head this often (ms) to notice a newer epoch
    /// and stop, instead of learning it only at the next commit.
    pub head_check_ms: u64,
    /// Timeout the driver applies to GETs (ms).
    pub request_timeout_ms: u64,
    /// The snapshot layout written (see `docs/FORMAT.md`).
    pub snapshot_format: SnapshotFormat,
    /// Between snapshots, write a delta snapshot (the keys changed since the
    /// last one) every this many LSNs, merging older deltas size-tiered so
    /// the head names at most [`crate::catalog::MAX_DELTAS`]; a lazy replica
    /// then replays at most this many LSNs of segments on a cold read.
    /// Needs `snapshot_every` and the indexed snapshot format.
    pub delta_every: Option<u64>,
    /// Also write a delta snapshot once this many bytes of batches were
    /// pushed since the end of the chain, however few LSNs that was: a lazy
    /// replica's cold read then replays at most about this many bytes of
    /// segments. Needs `snapshot_every` and the indexed snapshot format.
    pub delta_bytes: Option<u64>,
    /// Write deltas of pointers (`docs/FORMAT.md`, "Pointer delta"): each
    /// key's entry names the record in a segment that wrote it last, not
    /// its value, so merging deltas rewrites some 30 bytes a key, not the
    /// values. After a restart the publisher places the records it replays
    /// in the catalog's segments (reading the pages that list them). A
    /// delta that would name a record it could not place, or one over
    /// [`crate::snapshot::pointer::MAX_POINTED_PAYLOAD`], is a value delta.
    pub pointer_deltas: bool,
    /// Store the head gzip-compressed (`docs/FORMAT.md`, "Head encoding"):
    /// its catalog and the base64 of its tail copies shrink to about half,
    /// and it is uploaded on every commit. Readers from this release on
    /// decode it; older ones read it only through an HTTP client that
    /// decodes `Content-Encoding: gzip` (browsers, workers), so it is
    /// opt-in. Needs the `gzip` feature (on by default); ignored without it.
    pub head_gzip: bool,
    /// Sign every head and page with this key, and record the digest of
    /// every object in the catalog (`docs/FORMAT.md`, "Signed datasets").
    pub signing_key: Option<crate::keys::SecretKey>,
    /// The key that signed the dataset before `signing_key`: it endorses the
    /// new key in the head's key chain, so pinned replicas follow the
    /// rotation.
    pub previous_key: Option<crate::keys::SecretKey>,
    /// Without `signing_key`, publish a dataset that was signed unsigned
    /// from now on (replicas that pin its key then refuse it). Off, such a
    /// publisher refuses a signed dataset when it claims it.
    pub drop_signature: bool,
}

/// The layout of the snapshots a publisher writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotFormat {
    /// Version 1: checksummed chunks, read front to back only.
    Chunked,
    /// Version 2: blocks with a partitioned index and a footer, read front to
    /// back or by point reads (the default).
    Indexed(crate::snapshot::indexed::IndexedOptions),
    /// Version 4: version 2 whose block handles carry SHA-256 digests; a
    /// signing publisher records the index digest in the head, so pinned
    /// replicas can verify lazy reads block by block. Readers older than
    /// version 4 refuse these snapshots, so it is opt-in.
    Verified(crate::snapshot::indexed::IndexedOptions),
}

impl Default for SnapshotFormat {
    fn default() -> Self {
        SnapshotFormat::Indexed(crate::snapshot::indexed::IndexedOptions::default())
    }
}

impl Default for PublisherConfig {
    fn default() -> Self {
        PublisherConfig {
            segment_bytes: 8 << 20,
            flush_interval_ms: 250,
            min_commit_interval_ms: 0,
            max_commits_per_sec: DEFAULT_MAX_COMMITS_PER_SEC,
            commit_burst: DEFAULT_COMMIT_BURST,
            max_pending_segments: 4,
            snapshot_every: None,
            snapshot_bytes: None,
            snapshot_ratio_percent: None,
            retain_lsns: None,
            grace_ms: 60_000,
            inline_segments: 16,
            tail_bytes: DEFAULT_TAIL_BYTES,
            page_fanout: 8,
            snapshot_suffix_bytes: DEFAULT_SNAPSHOT_SUFFIX_BYTES,
            retry_base_ms: 100,
            retry_max_ms: 10_000,
            max_attempts: 5,
            head_check_ms: 2_000,
            request_timeout_ms: 30_000,
            snapshot_format: SnapshotFormat::default(),
            delta_every: None,
            delta_bytes: None,
            pointer_deltas: false,
            head_gzip: false,
            signing_key: None,
            previous_key: None,
            drop_signature: false,
        }
    }
}
