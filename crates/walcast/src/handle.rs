//! An in-memory replica for a native app: [`ReplicaHandle::open`] follows a
//! dataset on a thread of its own (the replay driver is not `Send`: it also
//! runs in wasm) and answers `get`, `scan`, `status`, `wait_for` and change
//! subscriptions from any task, in full mode or lazily.
//!
//! This is the one path every native replica takes: `walcast replicate`
//! (full mode with a local directory), `walcast get --from` and `walcast
//! scan --from` (lazy, not following) and apps embedding the crate.
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

use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use tokio::sync::{mpsc, oneshot, watch};
use walcast_client::{Driver, Fetch, RunError, Until};
use walcast_core::io::{GetRequest, GetResponse, ResponseMeta};
use walcast_core::keys::PublicKey;
use walcast_core::replica::{Entries, Event, LazyScan, Replica, ReplicaConfig, Status};

use crate::metrics::{MeteredFetch, ReplicaMetrics};

/// Point reads a lazy replica runs at once; more wait their turn (as the
/// JS package's).
const MAX_ACTIVE_READS: usize = 32;
use crate::replica::{AnyFetch, Persist, Progress, TokioTimer};

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
    /// Pinned keys (`ed25519:…`): apply only heads a trusted key (or a key
    /// it endorsed) signed, never an older signed head, and only objects
    /// whose digest the signed catalog records. Empty: any dataset.
    pub trust: Vec<PublicKey>,
    /// Full mode only: a local directory the replica survives restarts in
    /// (the layout `walcast replicate --local` writes). On open, the state it
    /// holds is restored and only what came after is fetched.
    pub local: Option<PathBuf>,
    /// Follow the head after opening (`false`: catch up once, then answer
    /// reads from that state until closed; lazy reads still fetch blocks).
    pub follow: bool,
    /// Lazy mode: keys whose snapshot blocks (footer, index and data block)
    /// are fetched while the open catches up, beside the tail's segments, so
    /// a first read of them after the open needs no further round trip.
    pub prefetch: Vec<Vec<u8>>,
}

impl Default for ReplicaOptions {
    fn default() -> Self {
        ReplicaOptions {
            poll_interval: Duration::from_secs(1),
            lazy_cache_bytes: None,
            headers: Vec::new(),
            concurrency: 4,
            trust: Vec::new(),
            local: None,
            follow: true,
            prefetch: Vec::new(),
        }
    }
}

/// What a replica's reads and syncs cost so far, counted at the fetch seam.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchStats {
    /// GETs issued.
    pub gets: u64,
    /// Body bytes received.
    pub bytes: u64,
    /// Waves of GETs, each issued with none in flight: round trips.
    pub round_trips: u64,
}

impl FetchStats {
    /// One JSON line: `{"gets":N,"bytes":B,"round_trips":R}`.
    pub fn to_json(&self) -> String {
        format!(
            "{{\"gets\":{},\"bytes\":{},\"round_trips\":{}}}",
            self.gets, self.bytes, self.round_trips
        )
    }
}

#[derive(Debug, Default)]
struct Counters {
    gets: AtomicU64,
    bytes: AtomicU64,
    round_trips: AtomicU64,
    inflight: AtomicU64,
}

/// Ends an in-flight count, also when the GET is dropped (timed out).
struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A fetch seam counting GETs, body bytes and round trips.
#[derive(Debug, Clone)]
struct Counted<F> {
    inner: F,
    counters: Arc<Counters>,
}

impl<F: Fetch> Fetch for Counted<F> {
    async fn get(&self, req: GetRequest) -> GetResponse {
        self.get_with_meta(req).await.0
    }

    async fn get_with_meta(&self, req: GetRequest) -> (GetResponse, ResponseMeta) {
        let c = &self.counters;
        c.gets.fetch_add(1, Ordering::Relaxed);
        if c.inflight.fetch_add(1, Ordering::Relaxed) == 0 {
            c.round_trips.fetch_add(1, Ordering::Relaxed);
        }
        let _in_flight = InFlight(&c.inflight);
        let (resp, meta) = self.inner.get_with_meta(req).await;
        if let GetResponse::Ok { body, .. } = &resp {
            c.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
        }
        (resp, meta)
    }
}

/// What `walcast replicate` adds to a handle: metrics, live figures, a
/// progress bar, and following from the start (errors retried, also
/// before the first catch-up).
#[derive(Debug, Default)]
pub(crate) struct Extras {
    pub(crate) metrics: Option<Arc<ReplicaMetrics>>,
    pub(crate) sink: Option<Arc<Progress>>,
    pub(crate) progress_bar: bool,
    /// Open at once and follow, retrying errors, instead of failing the open
    /// on the first error of the first catch-up.
    pub(crate) follow_at_once: bool,
}

enum Cmd {
    Get(Vec<u8>, oneshot::Sender<Result<Option<Vec<u8>>>>),
    Scan(Box<LazyScan>, oneshot::Sender<Result<Entries>>),
}

/// A replica held in memory, followed on a thread of its own.
pub struct ReplicaHandle {
    cmds: mpsc::UnboundedSender<Cmd>,
    status: watch::Receiver<Status>,
    /// The latest status, also after reads (lazy mode's cache figures).
    live: Arc<Mutex<Status>>,
    counters: Arc<Counters>,
    stop: Option<oneshot::Sender<()>>,
    /// The thread's outcome: the applied LSN, or what ended it.
    done: Option<oneshot::Receiver<Result<u64>>>,
    /// What ended the thread, set before it stops taking reads: later reads
    /// fail with it rather than with "closed".
    stopped: Arc<Mutex<Option<String>>>,
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
    /// the head in the background until [`close`](Self::close) (unless
    /// [`ReplicaOptions::follow`] is off).
    pub async fn open(url: &str, options: ReplicaOptions) -> Result<ReplicaHandle> {
        let fetch = AnyFetch::for_url_with_headers(url, &options.headers)?;
        Self::open_with(fetch, options, Extras::default()).await
    }

    /// [`open`](Self::open) through a fetch seam, with what `walcast
    /// replicate` adds.
    pub(crate) async fn open_with(
        fetch: AnyFetch,
        options: ReplicaOptions,
        extras: Extras,
    ) -> Result<ReplicaHandle> {
        if options.local.is_some() && options.lazy_cache_bytes.is_some() {
            bail!("invalid_input: a local directory holds a full replica; lazy mode keeps none");
        }
        let cfg = ReplicaConfig {
            poll_interval_ms: u64::try_from(options.poll_interval.as_millis()).unwrap_or(u64::MAX),
            max_inflight: options.concurrency.max(1),
            lazy_cache_bytes: options.lazy_cache_bytes,
            emit_records: options.local.is_some(),
            trust: options.trust.clone(),
            ..ReplicaConfig::default()
        };
        let seed = crate::publish::now_ms() ^ u64::from(std::process::id());
        // The local directory is read on the replica's thread (a state of
        // gigabytes takes seconds to load): the caller's runtime goes on.
        let local = options.local.clone();
        let machine = Replica::new(cfg.clone(), seed);
        let counters = Arc::new(Counters::default());
        let fetch = Counted {
            inner: MeteredFetch::new(fetch, extras.metrics.clone()),
            counters: counters.clone(),
        };
        let (status_tx, status) = watch::channel(machine.status(0));
        let live = Arc::new(Mutex::new(machine.status(0)));
        let live_thread = live.clone();
        let (cmds, cmd_rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        let stopped = Arc::new(Mutex::new(None));
        let stopped_thread = stopped.clone();
        let mut hooks = Hooks {
            persist: None,
            lazy: options.lazy_cache_bytes.is_some(),
            follow: options.follow,
            prefetch: options.prefetch.clone(),
            extras,
            warned_v1: false,
            bar: indicatif::ProgressBar::hidden(),
        };
        let thread = std::thread::Builder::new()
            .name("walcast-replica".into())
            .spawn(move || {
                let machine = match local.map(|dir| Persist::open(&dir)) {
                    None => machine,
                    Some(Err(e)) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                    Some(Ok((persist, loaded))) => {
                        hooks.persist = Some(persist);
                        match loaded.dataset {
                            Some(id) => {
                                let r = Replica::restore(
                                    cfg,
                                    seed,
                                    loaded.state,
                                    loaded.applied,
                                    id,
                                    0,
                                );
                                status_tx.send_replace(r.status(0));
                                if let Ok(mut l) = live_thread.lock() {
                                    *l = r.status(0);
                                }
                                r
                            }
                            None => machine,
                        }
                    }
                };
                let end = follow(
                    machine,
                    fetch,
                    hooks,
                    (status_tx, live_thread),
                    (cmd_rx, stopped_thread),
                    stop_rx,
                    ready_tx,
                );
                let _ = done_tx.send(end);
            })?;
        let handle = ReplicaHandle {
            cmds,
            status,
            live,
            counters,
            stop: Some(stop_tx),
            done: Some(done_rx),
            stopped,
            thread: Some(thread),
        };
        match ready_rx.await {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(e)) => {
                // Waits for the thread (and the directory it may hold) on
                // Tokio; elsewhere the thread, told to stop, ends alone.
                if tokio::runtime::Handle::try_current().is_ok() {
                    handle.close().await;
                }
                Err(e)
            }
            Err(_) => Err(handle
                .finish()
                .await
                .err()
                .unwrap_or_else(|| anyhow!("internal: the replica thread ended while opening"))),
        }
    }

    /// The value of `key` in the state at the applied LSN.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Get(key.to_vec(), tx))
            .map_err(|_| self.gone("invalid_input: the replica is closed"))?;
        rx.await
            .map_err(|_| self.gone("internal: the replica thread ended"))?
    }

    /// Why reads are no longer answered: the error that ended the replica's
    /// thread, or `otherwise` (closed).
    fn gone(&self, otherwise: &str) -> anyhow::Error {
        match self.stopped.lock().ok().and_then(|s| s.clone()) {
            Some(e) => anyhow!("{e} (the replica stopped on this error)"),
            None => anyhow!("{otherwise}"),
        }
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

    /// Runs `scan` as [`LazyScan`] builds it: for example bounded in bytes
    /// with [`LazyScan::max_bytes`], so that one answer stays near that
    /// size however large the values (the next one starts just past its
    /// last key).
    pub async fn scan_with(&self, scan: LazyScan) -> Result<Entries> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Scan(Box::new(scan), tx))
            .map_err(|_| self.gone("invalid_input: the replica is closed"))?;
        rx.await
            .map_err(|_| self.gone("internal: the replica thread ended"))?
    }

    /// The replica's progress: applied and committed LSNs, lag, phase, the
    /// last error, and in lazy mode the cache's figures.
    pub fn status(&self) -> Status {
        self.live
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|_| self.status.borrow().clone())
    }

    /// GETs, body bytes and round trips this replica made so far (opening,
    /// following and reads together).
    pub fn fetch_stats(&self) -> FetchStats {
        FetchStats {
            gets: self.counters.gets.load(Ordering::Relaxed),
            bytes: self.counters.bytes.load(Ordering::Relaxed),
            round_trips: self.counters.round_trips.load(Ordering::Relaxed),
        }
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
            Ok(Err(_)) => Err(self.gone("internal: the replica thread ended")),
            Err(_) => Err(anyhow!(
                "unavailable: LSN {lsn} was not applied within {} ms (applied: {})",
                timeout.as_millis(),
                self.status.borrow().applied_lsn
            )),
        }
    }

    /// Resolves when the replica's thread ends on its own: an error that
    /// stopped it (a local directory that cannot be written). Pending
    /// while it follows.
    pub async fn ended(&mut self) -> Result<u64> {
        match self.done.as_mut() {
            Some(done) => {
                let r = done
                    .await
                    .unwrap_or_else(|_| Err(anyhow!("internal: the replica thread ended")));
                self.done = None;
                r
            }
            None => std::future::pending().await,
        }
    }

    /// Stops following and waits for the replica's thread to end (which
    /// releases a [`ReplicaOptions::local`] directory: a handle only dropped
    /// stops its thread without waiting, so the directory may stay locked a
    /// moment). Needs a Tokio runtime, as [`wait_for`](Self::wait_for) does;
    /// the other calls run under any executor.
    pub async fn close(self) {
        let _ = self.finish().await;
    }

    /// Stops following, waits for the thread, and returns the applied LSN,
    /// or the error that ended the thread.
    pub(crate) async fn finish(mut self) -> Result<u64> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        match self.done.take() {
            Some(done) => done
                .await
                .unwrap_or_else(|_| Err(anyhow!("internal: the replica thread ended"))),
            None => Ok(self.status().applied_lsn),
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

/// What the driver loop does with each event besides the status: persist
/// to the local directory, count metrics, report progress, warn.
struct Hooks {
    persist: Option<Persist>,
    lazy: bool,
    follow: bool,
    prefetch: Vec<Vec<u8>>,
    extras: Extras,
    warned_v1: bool,
    bar: indicatif::ProgressBar,
}

impl Hooks {
    fn on_event(&mut self, r: &Replica, e: &Event) -> Result<()> {
        if let Some(p) = self.persist.as_mut() {
            p.on_event(r, e)?;
        }
        let retrying = self.extras.follow_at_once || self.follow;
        match e {
            Event::Applied { first, last } => {
                let st = r.status(crate::publish::now_ms());
                if let Some(m) = &self.extras.metrics {
                    m.applied(*last, st.committed_lsn, st.lag_ms);
                }
                if let Some(p) = &self.extras.sink {
                    if let Ok(mut v) = p.applied_at.lock() {
                        v.push((*first, *last, std::time::Instant::now()));
                    }
                    p.applied.store(*last, Ordering::Relaxed);
                    p.committed.store(st.committed_lsn, Ordering::Relaxed);
                }
                self.bar.set_length(st.committed_lsn);
                self.bar.set_position(*last);
                tracing::debug!(lsn = last, "applied");
            }
            Event::Bootstrapped { lsn, .. } => {
                // Lazy mode reads version 2 snapshots by block; a version 1
                // snapshot (no block index) loads whole.
                if self.lazy && !self.warned_v1 && !r.state().is_empty() {
                    self.warned_v1 = true;
                    tracing::warn!(
                        "the dataset's snapshot is version 1 (no block index): it was read whole; \
                         a publisher of this version writes snapshots that reads fetch by block"
                    );
                }
                tracing::info!(lsn, "bootstrapped from the snapshot");
            }
            Event::DatasetChanged { dataset_id } => {
                tracing::warn!(%dataset_id, "the dataset changed: starting over");
            }
            Event::Gap { from, to } => tracing::warn!(from, to, "gap"),
            Event::CaughtUp { lsn } => {
                self.bar.set_position(*lsn);
                tracing::debug!(lsn, "caught up");
            }
            Event::Error(err) => {
                if let Some(m) = &self.extras.metrics {
                    m.errors.inc();
                }
                if retrying {
                    tracing::warn!("{err} (retrying)");
                }
            }
            Event::Record { .. } => {}
        }
        Ok(())
    }
}

fn progress_bar() -> indicatif::ProgressBar {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(0);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} LSN {pos}/{len} {wide_bar} {per_sec} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb
}

type Seam = Counted<MeteredFetch<AnyFetch>>;

/// The replica's thread, the one driver loop of every native replica:
/// catch up, report readiness, then follow the head while answering reads,
/// until stopped. Returns the applied LSN, or the error that ended it.
fn follow(
    machine: Replica,
    fetch: Seam,
    mut hooks: Hooks,
    (status, live): (watch::Sender<Status>, Arc<Mutex<Status>>),
    (mut cmds, stopped): (mpsc::UnboundedReceiver<Cmd>, Arc<Mutex<Option<String>>>),
    stop: oneshot::Receiver<()>,
    ready: oneshot::Sender<Result<()>>,
) -> Result<u64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if hooks.extras.progress_bar {
        hooks.bar = progress_bar();
    }
    let local = tokio::task::LocalSet::new();
    let end = local.block_on(&rt, async move {
        let shared = Rc::new(std::cell::RefCell::new(machine));
        let mut runner = Driver::shared(shared.clone(), fetch.clone(), TokioTimer);
        let reader = Rc::new(runner.sibling(fetch, TokioTimer));
        let prefetch = std::mem::take(&mut hooks.prefetch);
        let hooks = std::cell::RefCell::new(hooks);
        // Set once lazy mode adopts the snapshot as its base.
        let based = Rc::new(tokio::sync::Notify::new());
        let mut on_event = |r: &Replica, e: &Event| -> Result<()> {
            hooks.borrow_mut().on_event(r, e)?;
            if matches!(e, Event::Bootstrapped { .. }) {
                based.notify_one();
            }
            if let Ok(mut l) = live.lock() {
                *l = r.status(crate::publish::now_ms());
            }
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
            Ok(())
        };
        let follow_at_once = hooks.borrow().extras.follow_at_once;
        let following = hooks.borrow().follow;
        // Shared: both runs below may wait on it, and a stop during the
        // catch-up also ends the follow loop at once.
        let stop = futures::FutureExt::shared(async {
            let _ = stop.await;
        });
        let mut ready = Some(ready);
        if follow_at_once {
            if let Some(r) = ready.take() {
                let _ = r.send(Ok(()));
            }
        } else {
            if !prefetch.is_empty() && hooks.borrow().lazy {
                // Beside the catch-up: the blocks of the keys to be read,
                // from the base as soon as it is adopted. On a task of its
                // own, so GETs it issued are answered even after the open.
                let (reader, based) = (reader.clone(), based.clone());
                tokio::task::spawn_local(async move {
                    based.notified().await;
                    let reads = prefetch.iter().map(|k| reader.get(k));
                    let _ = futures::future::join_all(reads).await;
                });
            }
            // Catch up first; a failure ends the open.
            let first = runner
                .run(Until::CaughtUp, stop.clone(), &mut on_event)
                .await;
            if let Err(e) = first {
                let e = match e {
                    RunError::Replica(e) => anyhow::Error::new(e),
                    RunError::Callback(e) => e,
                };
                if let Some(r) = ready.take() {
                    let _ = r.send(Err(e));
                }
                hooks.borrow().bar.finish_and_clear();
                return Ok(shared.borrow().applied_lsn());
            }
            if let Some(r) = ready.take() {
                let _ = r.send(Ok(()));
            }
        }
        // Reads run beside the follow loop, on the same machine: at most
        // MAX_ACTIVE_READS point reads at once, the rest waiting their turn
        // (blocks fetched for reads that have not run yet are kept past
        // the cache only up to about the block GETs out at once).
        let turns = Rc::new(tokio::sync::Semaphore::new(MAX_ACTIVE_READS));
        let serve_reads = async {
            while let Some(cmd) = cmds.recv().await {
                let reader = reader.clone();
                let live = live.clone();
                let turns = turns.clone();
                tokio::task::spawn_local(async move {
                    let set_live = |reader: &Driver<Seam, TokioTimer>| {
                        if let Ok(mut l) = live.lock() {
                            *l = reader.replica().status(crate::publish::now_ms());
                        }
                    };
                    // A read whose caller gave up (dropped its future: a
                    // timeout, a client that hung up) leaves its turn and
                    // its GETs at once, instead of running to its end.
                    match cmd {
                        Cmd::Get(key, mut tx) => {
                            let read = async {
                                let _turn = turns.acquire().await;
                                reader.get(&key).await.map_err(anyhow::Error::new)
                            };
                            tokio::select! {
                                r = read => {
                                    set_live(&reader);
                                    let _ = tx.send(r);
                                }
                                () = tx.closed() => {}
                            }
                        }
                        Cmd::Scan(scan, mut tx) => {
                            let read = reader.scan(*scan);
                            tokio::select! {
                                r = read => {
                                    set_live(&reader);
                                    let _ = tx.send(r.map_err(anyhow::Error::new));
                                }
                                () = tx.closed() => {}
                            }
                        }
                    }
                });
            }
            std::future::pending::<()>().await;
        };
        let result = if following {
            let run = runner.run(Until::Stopped, stop.clone(), &mut on_event);
            tokio::select! {
                r = run => r.map(|_| ()),
                () = serve_reads => Ok(()),
            }
        } else {
            tokio::select! {
                () = stop.clone() => Ok(()),
                () = serve_reads => Ok(()),
            }
        };
        hooks.borrow().bar.finish_and_clear();
        let applied = shared.borrow().applied_lsn();
        let end = match result {
            Ok(()) => Ok(applied),
            Err(RunError::Replica(e)) => Err(anyhow::Error::new(e)),
            Err(RunError::Callback(e)) => Err(e),
        };
        // Before the reads' channel closes: a read sent from now on fails
        // with what ended the replica.
        if let (Err(e), Ok(mut s)) = (&end, stopped.lock()) {
            *s = Some(format!("{e:#}"));
        }
        end
    });
    // Without waiting for blocking reads still out (a `file://` dataset on
    // a mount that hangs: each GET's deadline passed, its thread did not
    // return): dropping the runtime would wait for them, and `close()` or a
    // failed open with it, for ever.
    drop(local);
    rt.shutdown_background();
    end
}
