//! The publisher inside an app: [`Publisher::spawn`] publishes a WAL
//! directory to a dataset URL on a task of its own, reports every committed
//! LSN, and [`Publisher::stop`] publishes what the writer made durable before
//! it stops. `walcast publish` runs through this same handle.
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use walcast::{Publisher, PublishOptions, Writer};
//! use walcast_core::batch::Op;
//!
//! let tmp = tempfile::tempdir()?;
//! let wal = tmp.path().join("wal");
//! let url = url::Url::from_directory_path(tmp.path().join("dataset")).unwrap();
//!
//! // The app writes through the WAL and publishes in the same process.
//! let writer = Writer::open(&wal)?;
//! let publisher = Publisher::spawn(&wal, url.as_str(), PublishOptions::default())?;
//! let lsn = writer.commit(&[Op::put(b"user:42".to_vec(), b"Ada".to_vec())])?;
//! publisher.wait_for(lsn, Duration::from_secs(30)).await?;
//! assert!(publisher.committed_lsn() >= lsn);
//!
//! let report = publisher.stop().await?;
//! assert_eq!(report.committed_lsn, lsn);
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Result};
use tokio::sync::{oneshot, watch};

use crate::publish::{PublishOptions, PublishReport};
use crate::store::Store;
use crate::wal::DurableMark;

/// How long [`Publisher::stop`] waits for the durable records to be
/// committed before it stops anyway (the next run publishes them).
pub const STOP_FLUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// A publisher running on a task of its own.
#[derive(Debug)]
pub struct Publisher {
    wal_dir: PathBuf,
    committed: watch::Receiver<u64>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<PublishReport>>>,
    done: Option<Result<PublishReport>>,
}

impl Publisher {
    /// Starts publishing the WAL in `wal_dir` to the dataset at `to`
    /// (`file://`, `s3://`, `gs://`, `az://`, `memory://`): claims the
    /// dataset (a new epoch), then commits what the writer makes durable,
    /// until [`stop`](Self::stop) (or, with `options.once`, until everything
    /// durable at the start is committed). Call it inside a tokio runtime.
    pub fn spawn(
        wal_dir: impl AsRef<Path>,
        to: &str,
        options: PublishOptions,
    ) -> Result<Publisher> {
        // Said as an error rather than as tokio::spawn's panic.
        tokio::runtime::Handle::try_current().map_err(|_| {
            anyhow::anyhow!(
                "invalid_input: Publisher::spawn needs a tokio runtime: call it inside one \
                 (#[tokio::main], Runtime::block_on or enter)"
            )
        })?;
        let store = Store::open(to)?;
        Ok(Self::spawn_on(wal_dir, store, options))
    }

    /// [`spawn`](Self::spawn) onto a [`Store`] of the caller's (for example
    /// one opened with [`Store::open_counted`]). Panics outside a tokio
    /// runtime, as `tokio::spawn` does.
    pub fn spawn_on(wal_dir: impl AsRef<Path>, store: Store, options: PublishOptions) -> Publisher {
        let wal_dir = wal_dir.as_ref().to_path_buf();
        let (tx, committed) = watch::channel(0u64);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let dir = wal_dir.clone();
        let task = tokio::spawn(async move {
            let stop = async {
                let _ = stop_rx.await;
            };
            crate::publish::publish(dir, store, options, stop, |lsn| {
                tx.send_replace(lsn);
            })
            .await
        });
        Publisher {
            wal_dir,
            committed,
            stop: Some(stop_tx),
            task: Some(task),
            done: None,
        }
    }

    /// The highest LSN committed (visible to replicas) by this publisher so
    /// far; 0 before its first commit.
    pub fn committed_lsn(&self) -> u64 {
        *self.committed.borrow()
    }

    /// A receiver of the committed LSN: `changed().await` wakes on every
    /// commit. It reports an error once the publisher has ended.
    pub fn commits(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }

    /// Resolves once `lsn` is committed (replicas can see it), or fails
    /// after `timeout` with an `unavailable` error, or when the publisher
    /// ended first.
    pub async fn wait_for(&self, lsn: u64, timeout: Duration) -> Result<u64> {
        let mut rx = self.committed.clone();
        let waited = tokio::time::timeout(timeout, async {
            rx.wait_for(|c| *c >= lsn).await.map(|c| *c)
        })
        .await;
        match waited {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(_)) => Err(anyhow!(
                "unavailable: the publisher ended before LSN {lsn} was committed (committed: {})",
                self.committed_lsn()
            )),
            Err(_) => Err(anyhow!(
                "unavailable: LSN {lsn} was not committed within {} ms (committed: {})",
                timeout.as_millis(),
                self.committed_lsn()
            )),
        }
    }

    /// Whether the publisher has ended by itself (a `once` run that is
    /// done, a fenced publisher, an error). [`finished`](Self::finished)
    /// tells how.
    pub fn is_finished(&self) -> bool {
        self.done.is_some() || self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits until the publisher ends by itself: a `once` run once
    /// everything durable at its start is committed; otherwise only when it
    /// was fenced (the error is a [`crate::publish::Fenced`]) or failed.
    /// Cancel-safe: it can be raced against a shutdown signal, then
    /// [`stop`](Self::stop) called.
    pub async fn finished(&mut self) -> Result<PublishReport> {
        if self.done.is_none() {
            let task = self
                .task
                .as_mut()
                .ok_or_else(|| anyhow!("internal: the publisher has no task"))?;
            let r = task.await;
            self.task = None;
            self.done =
                Some(r.unwrap_or_else(|e| Err(anyhow!("internal: the publisher task: {e}"))));
        }
        // The first caller gets the error itself (a [`crate::publish::Fenced`]
        // stays one); later calls get its text.
        match self.done.take() {
            Some(Ok(report)) => {
                self.done = Some(Ok(report.clone()));
                Ok(report)
            }
            Some(Err(e)) => {
                self.done = Some(Err(anyhow!("{e:#}")));
                Err(e)
            }
            None => Err(anyhow!("internal: the publisher has no result")),
        }
    }

    /// Stops cleanly: first waits (up to [`STOP_FLUSH_TIMEOUT`]) until
    /// everything the writer had made durable when `stop` was called is
    /// committed, then stops the task and returns what it did, or the
    /// store's last error when it was failing as it stopped with durable
    /// records not committed. Records it could not commit stay in the WAL
    /// for the next run.
    pub async fn stop(self) -> Result<PublishReport> {
        self.stop_within(STOP_FLUSH_TIMEOUT).await
    }

    /// [`stop`](Self::stop) waiting at most `flush_timeout` for the flush.
    pub async fn stop_within(mut self, flush_timeout: Duration) -> Result<PublishReport> {
        if self.done.is_none() && !self.is_finished() {
            let durable = DurableMark::open(&self.wal_dir).read().ok().flatten();
            if let Some(durable) = durable.filter(|d| *d > self.committed_lsn()) {
                if let Err(e) = self.wait_for(durable, flush_timeout).await {
                    tracing::warn!("stopping before every durable LSN was published: {e}");
                }
            }
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.finished().await
    }
}

impl Drop for Publisher {
    /// A dropped handle stops the publisher without a flush.
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    /// Outside a tokio runtime `spawn` says so in its error, instead of
    /// panicking inside `tokio::spawn`.
    #[test]
    fn spawn_outside_a_runtime_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let err = super::Publisher::spawn(dir.path(), "memory:///", Default::default())
            .expect_err("no runtime");
        assert!(err.to_string().contains("tokio runtime"), "{err}");
    }
}
