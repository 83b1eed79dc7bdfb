//! Request counting around any `object_store`: how many GETs, PUTs, DELETEs
//! and LISTs a component makes and how many bytes they move, counted the
//! same way whatever sits on top (walcast's replica and publisher, or another
//! system that takes an `ObjectStore`).
//!
//! One request is one call on the [`ObjectStore`] trait (a multipart upload
//! counts its create, each part and its completion; a LIST counts once per
//! call). Bytes down are the bodies GETs return; bytes up are PUT bodies.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result, UploadPart,
};

/// Counters of the requests made through a [`Counting`] store (or a
/// [`crate::store::Store`] opened with them).
#[derive(Debug, Default)]
pub struct RequestStats {
    gets: AtomicU64,
    puts: AtomicU64,
    deletes: AtomicU64,
    lists: AtomicU64,
    others: AtomicU64,
    not_found: AtomicU64,
    not_modified: AtomicU64,
    bytes_down: AtomicU64,
    bytes_up: AtomicU64,
}

/// A point-in-time copy of [`RequestStats`]; subtract two for a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RequestCounts {
    /// GET (and HEAD) requests, whatever their outcome.
    pub gets: u64,
    /// PUT requests, multipart parts and completions included.
    pub puts: u64,
    /// DELETE requests (a batch delete counts each key).
    pub deletes: u64,
    /// LIST calls.
    pub lists: u64,
    /// Copies and renames.
    pub others: u64,
    /// GETs answered "not found" (404).
    pub not_found: u64,
    /// GETs answered "not modified" (304).
    pub not_modified: u64,
    /// Body bytes returned by GETs.
    pub bytes_down: u64,
    /// Body bytes sent by PUTs.
    pub bytes_up: u64,
}

impl RequestCounts {
    /// Every request of every kind.
    pub fn requests(&self) -> u64 {
        self.gets + self.puts + self.deletes + self.lists + self.others
    }

    /// Bytes moved in both directions.
    pub fn bytes(&self) -> u64 {
        self.bytes_down + self.bytes_up
    }

    /// The requests made between `earlier` and `self`.
    pub fn since(&self, earlier: &RequestCounts) -> RequestCounts {
        RequestCounts {
            gets: self.gets - earlier.gets,
            puts: self.puts - earlier.puts,
            deletes: self.deletes - earlier.deletes,
            lists: self.lists - earlier.lists,
            others: self.others - earlier.others,
            not_found: self.not_found - earlier.not_found,
            not_modified: self.not_modified - earlier.not_modified,
            bytes_down: self.bytes_down - earlier.bytes_down,
            bytes_up: self.bytes_up - earlier.bytes_up,
        }
    }
}

impl RequestStats {
    /// A copy of the counters now.
    pub fn snapshot(&self) -> RequestCounts {
        RequestCounts {
            gets: self.gets.load(Relaxed),
            puts: self.puts.load(Relaxed),
            deletes: self.deletes.load(Relaxed),
            lists: self.lists.load(Relaxed),
            others: self.others.load(Relaxed),
            not_found: self.not_found.load(Relaxed),
            not_modified: self.not_modified.load(Relaxed),
            bytes_down: self.bytes_down.load(Relaxed),
            bytes_up: self.bytes_up.load(Relaxed),
        }
    }

    /// Records one GET with its outcome: `Ok(body bytes)`, or the error.
    pub fn record_get(&self, outcome: std::result::Result<u64, &object_store::Error>) {
        self.gets.fetch_add(1, Relaxed);
        match outcome {
            Ok(n) => {
                self.bytes_down.fetch_add(n, Relaxed);
            }
            Err(object_store::Error::NotFound { .. }) => {
                self.not_found.fetch_add(1, Relaxed);
            }
            Err(object_store::Error::NotModified { .. }) => {
                self.not_modified.fetch_add(1, Relaxed);
            }
            Err(_) => {}
        }
    }

    /// Records one GET answered without `object_store` (the `file://` head).
    pub fn record_local_get(&self, r: &walcast_core::io::GetResponse) {
        use walcast_core::io::GetResponse;
        self.gets.fetch_add(1, Relaxed);
        match r {
            GetResponse::Ok { body, .. } => {
                self.bytes_down.fetch_add(body.len() as u64, Relaxed);
            }
            GetResponse::NotFound => {
                self.not_found.fetch_add(1, Relaxed);
            }
            GetResponse::NotModified => {
                self.not_modified.fetch_add(1, Relaxed);
            }
            _ => {}
        }
    }

    /// Records one PUT of `bytes`.
    pub fn record_put(&self, bytes: u64) {
        self.puts.fetch_add(1, Relaxed);
        self.bytes_up.fetch_add(bytes, Relaxed);
    }

    fn record_delete(&self) {
        self.deletes.fetch_add(1, Relaxed);
    }
}

/// An [`ObjectStore`] that counts every request made through it into a
/// shared [`RequestStats`] and passes it on to the store it wraps.
#[derive(Debug)]
pub struct Counting {
    inner: Arc<dyn ObjectStore>,
    stats: Arc<RequestStats>,
}

impl Counting {
    /// Wraps `inner`, counting into `stats`.
    pub fn new(inner: Arc<dyn ObjectStore>, stats: Arc<RequestStats>) -> Counting {
        Counting { inner, stats }
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<RequestStats> {
        &self.stats
    }
}

impl fmt::Display for Counting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Counting({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for Counting {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.stats.record_put(payload.content_length() as u64);
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.stats.record_put(0);
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(CountingUpload {
            inner,
            stats: self.stats.clone(),
        }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let head = options.head;
        let r = self.inner.get_opts(location, options).await;
        match &r {
            Ok(_) if head => self.stats.record_get(Ok(0)),
            Ok(res) => self.stats.record_get(Ok(res.range.end - res.range.start)),
            Err(e) => self.stats.record_get(Err(e)),
        }
        r
    }

    // `get_ranges` keeps the trait's default, which goes through `get_opts`
    // (and so is counted range by range after coalescing).

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let stats = self.stats.clone();
        let counted = locations
            .map(move |p| {
                stats.record_delete();
                p
            })
            .boxed();
        self.inner.delete_stream(counted)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.stats.lists.fetch_add(1, Relaxed);
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.stats.lists.fetch_add(1, Relaxed);
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.stats.lists.fetch_add(1, Relaxed);
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.stats.others.fetch_add(1, Relaxed);
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.stats.others.fetch_add(1, Relaxed);
        self.inner.rename_opts(from, to, options).await
    }
}

#[derive(Debug)]
struct CountingUpload {
    inner: Box<dyn MultipartUpload>,
    stats: Arc<RequestStats>,
}

#[async_trait]
impl MultipartUpload for CountingUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        self.stats.record_put(data.content_length() as u64);
        self.inner.put_part(data)
    }

    async fn complete(&mut self) -> Result<PutResult> {
        self.stats.record_put(0);
        self.inner.complete().await
    }

    async fn abort(&mut self) -> Result<()> {
        self.stats.record_delete();
        self.inner.abort().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use object_store::ObjectStoreExt;

    #[tokio::test]
    async fn counts_requests_outcomes_and_bytes() {
        let stats = Arc::new(RequestStats::default());
        let os = Counting::new(Arc::new(InMemory::new()), stats.clone());
        let p = Path::from("a/b");
        os.put(&p, PutPayload::from(vec![7u8; 100])).await.unwrap();
        let got = os.get_range(&p, 10..30).await.unwrap();
        assert_eq!(got.len(), 20);
        let etag = os.head(&p).await.unwrap().e_tag;
        let nm = os
            .get_opts(
                &p,
                GetOptions {
                    if_none_match: etag,
                    ..Default::default()
                },
            )
            .await;
        assert!(matches!(nm, Err(object_store::Error::NotModified { .. })));
        assert!(os.get(&Path::from("missing")).await.is_err());
        os.delete(&p).await.unwrap();
        let c = stats.snapshot();
        assert_eq!(
            c,
            RequestCounts {
                gets: 4,
                puts: 1,
                deletes: 1,
                lists: 0,
                others: 0,
                not_found: 1,
                not_modified: 1,
                bytes_down: 20,
                bytes_up: 100,
            }
        );
        assert_eq!(c.requests(), 6);
        assert_eq!(c.since(&c), RequestCounts::default());
    }
}
