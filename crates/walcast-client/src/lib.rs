//! # walcast-client
//!
//! The async driver of walcast's replay machine
//! ([`walcast_core::replica::Replica`]). It turns the machine's fetch
//! requests into GETs through one narrow seam, [`Fetch`], runs independent
//! fetches concurrently (up to the machine's `max_inflight`) while the
//! machine applies in LSN order, and waits as the machine says.
//!
//! It is runtime-agnostic: no tokio, no threads. The caller supplies the
//! clock and the timer ([`Timer`]), so the same driver runs natively (tokio)
//! and in wasm32 (JS timers and the runtime's global `fetch`). Futures need
//! not be `Send`.

use std::cell::{Ref, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use futures::future::{self, Either};
use futures::stream::{FuturesUnordered, StreamExt};
use walcast_core::io::{GetRequest, GetResponse, RequestId};
use walcast_core::replica::{Action, Event, Replica};
use walcast_core::Error;

/// The one seam between the driver and the network or storage: perform a
/// GET of `req.key` (relative to the dataset's base URL or prefix) with
/// `req.range` and `req.if_none_match`, giving up after `req.timeout_ms`.
///
/// Implementations never fail: transport errors, timeouts and unexpected
/// statuses become [`GetResponse::Failed`].
pub trait Fetch {
    /// Performs one GET.
    fn get(&self, req: GetRequest) -> impl Future<Output = GetResponse>;
}

/// The caller's clock and timer.
pub trait Timer {
    /// Milliseconds on a clock that never goes backwards (wall-clock ms since
    /// the Unix epoch are used for lag reports).
    fn now_ms(&self) -> u64;
    /// Completes once `now_ms() >= at_ms`.
    fn sleep_until(&self, at_ms: u64) -> impl Future<Output = ()>;
}

/// When [`Driver::run`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// Catch up to the head as of now, then return the applied LSN; return
    /// the first error the machine reports (after its retries).
    CaughtUp,
    /// Keep following the head; errors are handed to the event callback and
    /// the machine keeps retrying. Returns only when `stop` resolves.
    Stopped,
}

type Pending<'a> = Pin<Box<dyn Future<Output = (RequestId, GetResponse)> + 'a>>;
type Next<'a> = Pin<Box<dyn Future<Output = Option<(RequestId, GetResponse)>> + 'a>>;

/// Drives a [`Replica`] through a [`Fetch`] seam and a [`Timer`].
///
/// The machine is shared (`Rc<RefCell<_>>`) and borrowed only between
/// awaits, so readers (a JS `get()`, a worker's request handler) can use the
/// state while a sync is in flight.
#[derive(Debug)]
pub struct Driver<F, T> {
    replica: Rc<RefCell<Replica>>,
    fetch: F,
    timer: T,
}

impl<F: Fetch, T: Timer> Driver<F, T> {
    /// A driver for `replica`.
    pub fn new(replica: Replica, fetch: F, timer: T) -> Self {
        Self::shared(Rc::new(RefCell::new(replica)), fetch, timer)
    }

    /// A driver for a machine shared with readers.
    pub fn shared(replica: Rc<RefCell<Replica>>, fetch: F, timer: T) -> Self {
        Driver {
            replica,
            fetch,
            timer,
        }
    }

    /// The machine (for reads of its state and status). Do not hold the
    /// borrow across an await of [`run`](Self::run).
    pub fn replica(&self) -> Ref<'_, Replica> {
        self.replica.borrow()
    }

    /// The shared handle.
    pub fn handle(&self) -> Rc<RefCell<Replica>> {
        self.replica.clone()
    }

    /// The fetch seam.
    pub fn fetch(&self) -> &F {
        &self.fetch
    }

    /// Runs the machine. `on_event` sees every event with the machine in the
    /// state that event describes (e.g. persist on [`Event::Applied`]); an
    /// error it returns stops the run. With [`Until::CaughtUp`], returns the
    /// applied LSN once the replica holds everything committed as of the head
    /// read after the call; with [`Until::Stopped`], returns when `stop`
    /// resolves.
    pub async fn run<E>(
        &mut self,
        until: Until,
        stop: impl Future<Output = ()>,
        mut on_event: impl FnMut(&Replica, &Event) -> Result<(), E>,
    ) -> Result<u64, RunError<E>> {
        let mut stop = Box::pin(stop);
        let mut inflight: FuturesUnordered<Pending<'_>> = FuturesUnordered::new();
        let fetch = &self.fetch;
        let timer = &self.timer;
        let replica = &self.replica;
        if until == Until::CaughtUp {
            replica.borrow_mut().sync_now(timer.now_ms());
        }
        loop {
            let now = timer.now_ms();
            let action = replica.borrow_mut().poll(now);
            match action {
                Action::Fetch(req) => {
                    let id = req.id;
                    inflight.push(Box::pin(async move { (id, fetch.get(req).await) }));
                }
                Action::Event(e) => {
                    on_event(&replica.borrow(), &e).map_err(RunError::Callback)?;
                    match e {
                        Event::CaughtUp { lsn } if until == Until::CaughtUp => return Ok(lsn),
                        Event::Error(err) if until == Until::CaughtUp => {
                            return Err(RunError::Replica(err))
                        }
                        _ => {}
                    }
                }
                Action::Wait { until: at } => {
                    // Wake on a response, the machine's deadline, or stop.
                    let at = at.min(now.saturating_add(3_600_000));
                    let sleep = Box::pin(timer.sleep_until(at));
                    let next: Next<'_> = if inflight.is_empty() {
                        Box::pin(future::pending())
                    } else {
                        Box::pin(inflight.next())
                    };
                    match future::select(stop.as_mut(), future::select(next, sleep)).await {
                        Either::Left(((), _)) => return Ok(replica.borrow().applied_lsn()),
                        Either::Right((Either::Left((Some((id, resp)), _)), _)) => {
                            replica
                                .borrow_mut()
                                .handle_response(id, timer.now_ms(), resp);
                        }
                        Either::Right(_) => {}
                    }
                }
            }
        }
    }
}

/// Why [`Driver::run`] stopped early.
#[derive(Debug)]
pub enum RunError<E> {
    /// The machine reported an error that persisted through its retries.
    Replica(Error),
    /// The event callback failed.
    Callback(E),
}

impl<E: std::fmt::Display> std::fmt::Display for RunError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Replica(e) => write!(f, "{e}"),
            RunError::Callback(e) => write!(f, "{e}"),
        }
    }
}

impl<E: std::fmt::Debug + std::fmt::Display> std::error::Error for RunError<E> {}
