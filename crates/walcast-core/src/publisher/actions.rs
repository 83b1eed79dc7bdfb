//! What a publisher asks its driver to do ([`Action`]: GETs, PUTs,
//! DELETEs, events) and what the driver answers a PUT with.

use crate::catalog::DatasetId;
use crate::error::Error;
use crate::io::{GetRequest, RequestId};

/// The precondition of a PUT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutCondition {
    /// Create only: fail if the object exists (`If-None-Match: *`).
    CreateOnly,
    /// Replace only the version with this ETag (`If-Match`).
    IfMatch(String),
}

/// What the object is, so drivers can set cache headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// The mutable head.
    Head,
    /// An immutable segment.
    Segment,
    /// An immutable catalog page.
    Page,
    /// An immutable snapshot.
    Snapshot,
}

/// A conditional PUT for the driver to perform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutRequest {
    /// Pass back with the response.
    pub id: RequestId,
    /// Object key relative to the dataset prefix.
    pub key: String,
    /// The object's bytes.
    pub body: Vec<u8>,
    /// Precondition.
    pub condition: PutCondition,
    /// What kind of object it is.
    pub kind: ObjectKind,
}

/// What a PUT produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutResponse {
    /// Written; the new ETag when the store gives one.
    Ok {
        /// The object's new ETag.
        etag: Option<String>,
    },
    /// Create-only PUT found the object already there.
    AlreadyExists,
    /// `If-Match` did not match.
    PreconditionFailed,
    /// Failed, or the answer was lost: the write may or may not have happened.
    Failed {
        /// What went wrong.
        message: String,
    },
}

/// A DELETE for the driver to perform (a missing object counts as deleted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteRequest {
    /// Pass back with the response.
    pub id: RequestId,
    /// Object key relative to the dataset prefix.
    pub key: String,
}

/// Something that happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The dataset is ours at `epoch`; publishing resumes after `committed_lsn`.
    Claimed {
        /// Our epoch.
        epoch: u64,
        /// The dataset.
        dataset_id: DatasetId,
        /// The head's committed LSN at the claim.
        committed_lsn: u64,
    },
    /// A head naming everything up to `lsn` was committed.
    Committed {
        /// New committed LSN.
        lsn: u64,
        /// The head's generation.
        generation: u64,
        /// Size of the head's JSON in bytes, without a signature and
        /// before any gzip: a measure of the catalog it holds.
        head_bytes: u64,
    },
    /// An object was deleted after its grace period.
    Deleted {
        /// Its key.
        key: String,
    },
    /// Another publisher owns the dataset: stop for good.
    Fenced(Error),
    /// A failure that persisted through retries; the machine keeps retrying.
    Error(Error),
}

/// What the driver should do next.
#[must_use]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Perform this GET, then call [`Publisher::handle_get`](super::Publisher::handle_get).
    Get(GetRequest),
    /// Perform this PUT, then call [`Publisher::handle_put`](super::Publisher::handle_put).
    Put(PutRequest),
    /// Perform this DELETE, then call [`Publisher::handle_delete`](super::Publisher::handle_delete).
    Delete(DeleteRequest),
    /// Report or act on an event, then poll again.
    Event(Event),
    /// Nothing to do until `until` (ms), a response, or a new record.
    Wait {
        /// Next time to call [`Publisher::poll`](super::Publisher::poll).
        until: u64,
    },
}
