//! An in-memory replica for a native app: [`ReplicaHandle::open`] follows a
//! dataset on a thread of its own (the replay driver is not `Send`: it also
//! runs in wasm) and answers `get`, `scan`, `status`, `wait_for` and change
//! subscriptions from any task, in full mode or lazily.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use walcast::{Replica, ReplicaOptions};
//!
//! let replica = Replica::open("https://cdn.example.com/app", ReplicaOptions::default()).await?;
//! if let Some(v) = replica.get(b"user:42").await? {
//!     println!("{}", String::from_utf8_lossy(&v));
//! }
//! let users = replica.scan_prefix(b"user:", 100).await?;
//! println!("{} users at LSN {}", users.len(), replica.status().applied_lsn);
//! replica.close().await;
//! # Ok(()) }
//! ```

use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Result};
use tokio::sync::{mpsc, oneshot, watch};
use walcast_client::{Driver, Until};
use walcast_core::replica::{Entries, Event, LazyScan, Replica, ReplicaConfig, Status};

use crate::replica::{AnyFetch, TokioTimer};

/// How to open a [`ReplicaHandle`].
#[derive(Debug, Clone)]
pub struct ReplicaOptions {
    /// Head poll interval.
    pub poll_interval: Duration,
    /// Lazy mode with this many bytes of snapshot blocks cached: the
    /// replica does not download the snapshot, and reads fetch the blocks
    /// they need. `None`: full mode (the whole state in memory).
    pub lazy_cache_bytes: Option<u64>,
    /// Headers (`Name: value`) sent with every GET of an http(s):// dataset.
    pub headers: Vec<String>,
    /// Segment GETs in flight at most.
    pub concurrency: usize,
}

impl Default for ReplicaOptions {
    fn default() -> Self {
        ReplicaOptions {
            poll_interval: Duration::from_secs(1),
            lazy_cache_bytes: None,
            headers: Vec::new(),
            concurrency: 4,
        }
    }
}

enum Cmd {
    Get(Vec<u8>, oneshot::Sender<Result<Option<Vec<u8>>>>),
    Scan(LazyScan, oneshot::Sender<Result<Entries>>),
}

/// A replica held in memory, followed on a thread of its own.
pub struct ReplicaHandle {
    cmds: mpsc::UnboundedSender<Cmd>,
    status: watch::Receiver<Status>,
    /// The latest status, also after reads (lazy mode's cache figures).
    live: Arc<Mutex<Status>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for ReplicaHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaHandle")
            .field("status", &*self.status.borrow())
            .finish_non_exhaustive()
    }
}

impl ReplicaHandle {
    /// Opens a replica of the dataset at `url` (http(s)://, s3://, gs://,
    /// az://, file://, memory://) and catches up to the head as of now
    /// before returning (in lazy mode: to the newest snapshot and the
    /// history after it, without downloading the snapshot). Then it follows
    /// the head in the background until [`close`](Self::close).
    pub async fn open(url: &str, options: ReplicaOptions) -> Result<ReplicaHandle> {
        let fetch = AnyFetch::for_url_with_headers(url, &options.headers)?;
        let cfg = ReplicaConfig {
            poll_interval_ms: options.poll_interval.as_millis().max(1) as u64,
            max_inflight: options.concurrency.max(1),
            lazy_cache_bytes: options.lazy_cache_bytes,
            ..ReplicaConfig::default()
        };
        let seed = crate::publish::now_ms() ^ u64::from(std::process::id());
        let machine = Replica::new(cfg, seed);
        let (status_tx, status) = watch::channel(machine.status(0));
        let live = Arc::new(Mutex::new(machine.status(0)));
        let live_thread = live.clone();
        let (cmds, cmd_rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("walcast-replica".into())
            .spawn(move || {
                follow(
                    machine,
                    fetch,
                    (status_tx, live_thread),
                    cmd_rx,
                    stop_rx,
                    ready_tx,
                )
            })?;
        let handle = ReplicaHandle {
            cmds,
            status,
            live,
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        match ready_rx.await {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(e)) => {
                handle.close().await;
                Err(e)
            }
            Err(_) => Err(anyhow!("internal: the replica thread ended while opening")),
        }
    }

    /// The value of `key` in the state at the applied LSN.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Get(key.to_vec(), tx))
            .map_err(|_| anyhow!("invalid_input: the replica is closed"))?;
        rx.await
            .map_err(|_| anyhow!("internal: the replica thread ended"))?
    }

    /// Entries with keys in `start..end` (`end` exclusive; `None`: to the
    /// last key), at most `limit`, in key order, from one state.
    pub async fn scan(&self, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<Entries> {
        self.scan_with(LazyScan::new(start, end, limit)).await
    }

    /// Entries whose keys start with `prefix`, at most `limit`.
    pub async fn scan_prefix(&self, prefix: &[u8], limit: usize) -> Result<Entries> {
        self.scan_with(LazyScan::prefix(prefix, limit)).await
    }

    async fn scan_with(&self, scan: LazyScan) -> Result<Entries> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Scan(scan, tx))
            .map_err(|_| anyhow!("invalid_input: the replica is closed"))?;
        rx.await
            .map_err(|_| anyhow!("internal: the replica thread ended"))?
    }

    /// The replica's progress: applied and committed LSNs, lag, phase, the
    /// last error, and in lazy mode the cache's figures.
    pub fn status(&self) -> Status {
        self.live
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|_| self.status.borrow().clone())
    }

    /// A receiver that changes whenever the replica applies batches (or
    /// moves to a snapshot): `changed().await`, then read its status.
    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Resolves once the replica has applied `lsn` (read-your-writes: pass
    /// the LSN `walcast write` or the `Writer` printed), or fails after
    /// `timeout` with an `unavailable` error.
    pub async fn wait_for(&self, lsn: u64, timeout: Duration) -> Result<u64> {
        let mut rx = self.status.clone();
        let waited = tokio::time::timeout(timeout, async {
            rx.wait_for(|s| s.applied_lsn >= lsn)
                .await
                .map(|s| s.applied_lsn)
        })
        .await;
        match waited {
            Ok(Ok(applied)) => Ok(applied),
            Ok(Err(_)) => Err(anyhow!("internal: the replica thread ended")),
            Err(_) => Err(anyhow!(
                "unavailable: LSN {lsn} was not applied within {} ms (applied: {})",
                timeout.as_millis(),
                self.status.borrow().applied_lsn
            )),
        }
    }

    /// Stops following and waits for the replica's thread to end.
    pub async fn close(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

impl Drop for ReplicaHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The replica's thread: catch up, report readiness, then follow the head
/// while answering reads, until stopped.
fn follow(
    machine: Replica,
    fetch: AnyFetch,
    (status, live): (watch::Sender<Status>, Arc<Mutex<Status>>),
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    stop: oneshot::Receiver<()>,
    ready: oneshot::Sender<Result<()>>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e.into()));
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let shared = Rc::new(std::cell::RefCell::new(machine));
        let mut runner = Driver::shared(shared.clone(), fetch.clone(), TokioTimer);
        let reader = Rc::new(Driver::shared(shared.clone(), fetch, TokioTimer));
        let set_live = |r: &Replica| {
            if let Ok(mut l) = live.lock() {
                *l = r.status(crate::publish::now_ms());
            }
        };
        let publish = |r: &Replica, e: &Event| {
            set_live(r);
            if matches!(
                e,
                Event::Applied { .. }
                    | Event::Bootstrapped { .. }
                    | Event::CaughtUp { .. }
                    | Event::Error(_)
                    | Event::DatasetChanged { .. }
            ) {
                status.send_replace(r.status(crate::publish::now_ms()));
            }
            Ok::<(), std::convert::Infallible>(())
        };
        // Catch up first; a failure ends the open.
        let first = runner
            .run(Until::CaughtUp, std::future::pending(), publish)
            .await;
        match first {
            Ok(_) => {
                let _ = ready.send(Ok(()));
            }
            Err(e) => {
                let _ = ready.send(Err(anyhow!("{e}")));
                return;
            }
        }
        // Reads run beside the follow loop, on the same machine.
        let serve_reads = async {
            while let Some(cmd) = cmds.recv().await {
                let reader = reader.clone();
                let live = live.clone();
                tokio::task::spawn_local(async move {
                    match cmd {
                        Cmd::Get(key, tx) => {
                            let r = reader.get(&key).await.map_err(|e| anyhow!("{e}"));
                            if let Ok(mut l) = live.lock() {
                                *l = reader.replica().status(crate::publish::now_ms());
                            }
                            let _ = tx.send(r);
                        }
                        Cmd::Scan(scan, tx) => {
                            let r = reader.scan(scan).await.map_err(|e| anyhow!("{e}"));
                            if let Ok(mut l) = live.lock() {
                                *l = reader.replica().status(crate::publish::now_ms());
                            }
                            let _ = tx.send(r);
                        }
                    }
                });
            }
        };
        let stop = async {
            let _ = stop.await;
        };
        let follow = runner.run(Until::Stopped, stop, publish);
        tokio::select! {
            _ = follow => {}
            _ = serve_reads => {}
        }
    });
}
