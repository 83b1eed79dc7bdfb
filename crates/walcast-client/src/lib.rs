//! # walcast-client
//!
//! The async driver of walcast's replay machine
//! ([`walcast_core::replica::Replica`]). It turns the machine's fetch
//! requests into GETs through one narrow seam, [`Fetch`], runs independent
//! fetches concurrently (up to the machine's `max_inflight`) while the
//! machine applies in LSN order, and waits as the machine says.
//!
//! It is runtime-agnostic: no tokio, no threads. The caller supplies the
//! clock and the timer ([`Timer`]), and futures need not be `Send`: the
//! native replica (the `walcast` crate) drives it on tokio, and any other
//! executor can. (The npm package does not use it: its JS drives the wasm
//! machine itself, through the runtime's `fetch`.)

use std::cell::{Ref, RefCell};
use std::future::Future;
use std::pin::{pin, Pin};
use std::rc::Rc;

use futures::future::{self, Either};
use futures::stream::{FuturesUnordered, Stream, StreamExt};
use walcast_core::io::{GetRequest, GetResponse, RequestId, ResponseMeta};
use walcast_core::replica::{Action, Event, Replica};
use walcast_core::Error;

/// The one seam between the driver and the network or storage: perform a
/// GET of `req.key` (relative to the dataset's base URL or prefix) with
/// `req.range` and `req.if_none_match`, giving up after `req.timeout_ms`
/// for the whole exchange, body included.
///
/// Implementations never fail: transport errors, timeouts and unexpected
/// statuses become [`GetResponse::Failed`]. They classify by the HTTP status
/// (or the store's error kind), never by an error's text. They read a body
/// as a stream and keep at most `req.max_bytes + 1` bytes of it (see
/// [`read_body`]), whatever `Content-Length` claims, and hand a 206's
/// `Content-Range` over as parsed by
/// [`ContentRange::parse`](walcast_core::io::ContentRange::parse) for the
/// machine to check against the body; a 206 without a valid one is a
/// failure, not a whole object.
///
/// The [`Driver`] also gives up on a GET that has not answered within
/// `timeout_ms`, so a seam that misses a deadline cannot stall it.
///
/// A seam that can see response headers implements
/// [`get_with_meta`](Fetch::get_with_meta) too: it then sends a head GET's
/// wait hint (`req.wait_ms`: `Prefer: wait=N` and `?wait=N`) and reports the
/// server's long-poll support, and the replica long-polls where it can.
pub trait Fetch {
    /// Performs one GET.
    fn get(&self, req: GetRequest) -> impl Future<Output = GetResponse>;

    /// Performs one GET and reports what the response's headers said
    /// besides the body. The default performs [`get`](Fetch::get) and
    /// reports nothing (the replica then polls).
    fn get_with_meta(&self, req: GetRequest) -> impl Future<Output = (GetResponse, ResponseMeta)> {
        async move { (self.get(req).await, ResponseMeta::default()) }
    }
}

/// The caller's clock and timer.
pub trait Timer {
    /// Milliseconds on a clock that never goes backwards (wall-clock ms since
    /// the Unix epoch are used for lag reports).
    fn now_ms(&self) -> u64;
    /// Completes once `now_ms() >= at_ms`.
    fn sleep_until(&self, at_ms: u64) -> impl Future<Output = ()>;
}

/// The most a body reader reserves up front, whatever the size it is told:
/// memory then grows with the bytes that actually arrive.
pub const MAX_PREALLOC: usize = 8 << 20;

/// Reads a response body given as a stream of chunks, keeping at most
/// `max_bytes + 1` bytes: once it holds that many it stops and drops the
/// stream (which, for a network body, closes the connection). One byte over
/// the limit is kept so that the machine sees the object is too large and
/// reports it as a `data` error naming the object.
///
/// `claimed_len` (a `Content-Length`, an object's stated size) only sizes
/// the first reservation, capped at `max_bytes + 1` and [`MAX_PREALLOC`]: a
/// claim is never trusted for more. A body that arrives as one chunk is
/// handed over without a copy. The first error of the stream is returned.
pub async fn read_body<S, B, E>(
    body: S,
    max_bytes: u64,
    claimed_len: Option<u64>,
) -> Result<Vec<u8>, E>
where
    S: Stream<Item = Result<B, E>>,
    B: AsRef<[u8]> + Into<Vec<u8>>,
{
    let limit = usize::try_from(max_bytes.saturating_add(1)).unwrap_or(usize::MAX);
    let mut body = pin!(body);
    // The first chunk stays as it came until a second one arrives.
    let mut first: Option<B> = None;
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        let bytes = chunk.as_ref();
        if bytes.is_empty() {
            continue;
        }
        if let Some(f) = first.take() {
            let f = f.as_ref();
            let claim = claimed_len
                .and_then(|c| usize::try_from(c).ok())
                .unwrap_or(0)
                .max(f.len() + bytes.len());
            buf = Vec::with_capacity(claim.min(limit).min(MAX_PREALLOC));
            buf.extend_from_slice(f);
        } else if buf.is_empty() {
            let full = bytes.len() >= limit;
            first = Some(chunk);
            if full {
                break;
            }
            continue;
        }
        let take = bytes.len().min(limit - buf.len());
        buf.extend_from_slice(&bytes[..take]);
        if buf.len() >= limit {
            break;
        }
    }
    if let Some(f) = first {
        let mut v: Vec<u8> = f.into();
        v.truncate(limit);
        return Ok(v);
    }
    Ok(buf)
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

type Answer = (RequestId, GetResponse, ResponseMeta);
type Pending<'a> = Pin<Box<dyn Future<Output = Answer> + 'a>>;
type Next<'a> = Pin<Box<dyn Future<Output = Option<Answer>> + 'a>>;

/// Drives a [`Replica`] through a [`Fetch`] seam and a [`Timer`].
///
/// The machine is shared (`Rc<RefCell<_>>`) and borrowed only between
/// awaits, so readers (a request handler on the same thread) can use the
/// state while a sync is in flight.
#[derive(Debug)]
pub struct Driver<F, T> {
    replica: Rc<RefCell<Replica>>,
    fetch: F,
    timer: T,
    /// GETs a read or run ended with while its caller held a borrow of the
    /// machine, with the clock then: settled at the next call of this
    /// driver or of a [`sibling`](Self::sibling).
    orphans: Rc<RefCell<Vec<(RequestId, u64)>>>,
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
            orphans: Rc::default(),
        }
    }

    /// A second driver of this one's machine (a reader beside a run, say),
    /// through its own seam and timer. Use it rather than
    /// [`shared`](Self::shared) over [`handle`](Self::handle): siblings
    /// settle each other's abandoned GETs, which a read dropped while its
    /// caller held a borrow of the machine leaves behind (two drivers made
    /// with `shared` each settle only their own, at their next call).
    pub fn sibling<F2: Fetch, T2: Timer>(&self, fetch: F2, timer: T2) -> Driver<F2, T2> {
        Driver {
            replica: self.replica.clone(),
            fetch,
            timer,
            orphans: self.orphans.clone(),
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
    /// resolves. Either way, should `stop` resolve first, it returns the LSN
    /// applied by then, caught up or not (the machine's
    /// [`status`](Replica::status) tells: `committed_lsn`).
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
        // Among this run's GETs may be a lazy read's blocks (queued by a
        // read, taken by `poll`): those still out when the run returns are
        // abandoned, so that a read asks for them again (see `Outstanding`).
        let mut outstanding = Outstanding {
            replica,
            orphans: &self.orphans,
            ids: Vec::new(),
            now: timer.now_ms(),
        };
        if until == Until::CaughtUp {
            let mut r = replica.borrow_mut();
            // Errors of reads made while no run took them are not this
            // run's: it returns the first error it meets.
            r.forget_errors();
            r.sync_now(timer.now_ms());
        }
        loop {
            let now = timer.now_ms();
            outstanding.now = now;
            let action = {
                let mut r = replica.borrow_mut();
                outstanding.settle_orphans(&mut r);
                r.poll(now)
            };
            match action {
                Action::Fetch(req) => {
                    outstanding.ids.push(req.id);
                    inflight.push(Box::pin(bounded_get(fetch, timer, now, req)));
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
                        Either::Right((Either::Left((Some((id, resp, meta)), _)), _)) => {
                            outstanding.ids.retain(|&i| i != id);
                            replica.borrow_mut().handle_response_with(
                                id,
                                timer.now_ms(),
                                resp,
                                meta,
                            );
                        }
                        Either::Right(_) => {}
                    }
                }
            }
        }
    }
}

impl<F: Fetch, T: Timer> Driver<F, T> {
    /// Reads `key` from the state at the applied LSN. In lazy mode the
    /// blocks the read needs are fetched here (point reads of a cold replica
    /// fetch a footer, an index block and a data block); in full mode the
    /// answer is immediate. Safe beside a [`run`](Self::run) of the same
    /// machine: this only performs block GETs, and waits briefly when the
    /// run loop took them.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        self.read(|r| r.get_lazy(key)).await
    }

    /// An ordered scan of the state at the applied LSN (see
    /// [`LazyScan`](walcast_core::replica::LazyScan)), fetching the blocks it
    /// needs in lazy mode.
    pub async fn scan(
        &self,
        mut scan: walcast_core::replica::LazyScan,
    ) -> Result<walcast_core::replica::Entries, Error> {
        self.read(move |r| r.scan_lazy(&mut scan)).await
    }

    async fn read<R>(
        &self,
        mut attempt: impl FnMut(&mut Replica) -> Result<walcast_core::replica::Read<R>, Error>,
    ) -> Result<R, Error> {
        use walcast_core::replica::Read;
        let mut inflight: FuturesUnordered<Pending<'_>> = FuturesUnordered::new();
        // Declared after `inflight`, so dropped before it: the GETs this read
        // performed and has not answered yet are forgotten by the machine
        // when the read ends, returned or dropped by its caller.
        let mut outstanding = Outstanding {
            replica: &self.replica,
            orphans: &self.orphans,
            ids: Vec::new(),
            now: self.timer.now_ms(),
        };
        loop {
            {
                let mut r = self.replica.borrow_mut();
                // Each pass: a read dropped meanwhile may have left the
                // GET this one waits for.
                outstanding.settle_orphans(&mut r);
                if let Read::Ready(v) = attempt(&mut r)? {
                    return Ok(v);
                }
            }
            let now = self.timer.now_ms();
            outstanding.now = now;
            while let Some(req) = self.replica.borrow_mut().poll_read_fetch() {
                outstanding.ids.push(req.id);
                inflight.push(Box::pin(bounded_get(&self.fetch, &self.timer, now, req)));
            }
            match inflight.next().await {
                Some((id, resp, meta)) => {
                    outstanding.ids.retain(|&i| i != id);
                    self.replica.borrow_mut().handle_response_with(
                        id,
                        self.timer.now_ms(),
                        resp,
                        meta,
                    );
                }
                // A run loop took the GETs: let it answer them.
                None => self.timer.sleep_until(now + 5).await,
            }
        }
    }
}

/// The GETs a lazy read (or a run) performed and has not answered. A read
/// may end with some still out (it had what it needed, or its caller
/// dropped it), and a run returns with some out (caught up, stopped, an
/// error, or dropped by its caller): the machine would wait for their
/// answers for ever (the deadline is the dropped future's) and never send
/// them again. So when the read or run ends, a lazy read's block GETs are
/// abandoned (the next read asks again), and any other GET (the head, a
/// segment, a page, a snapshot) is answered as failed, as if it had timed
/// out at `now`: the machine retries it after its backoff. A read dropped
/// while its caller holds a borrow of the machine leaves its GETs to the
/// driver, whose next call and reads under way settle them first.
struct Outstanding<'a> {
    replica: &'a RefCell<Replica>,
    orphans: &'a RefCell<Vec<(RequestId, u64)>>,
    ids: Vec<RequestId>,
    /// The driver's clock when last seen.
    now: u64,
}

impl Outstanding<'_> {
    /// Settles the GETs earlier reads and runs could not (see `Drop`).
    fn settle_orphans(&self, r: &mut Replica) {
        for (id, now) in self.orphans.take() {
            give_up(r, id, now);
        }
    }
}

/// Forgets `id`, a GET no one will answer: abandoned if a lazy read's
/// block, failed as timed out at `now` otherwise.
fn give_up(r: &mut Replica, id: RequestId, now: u64) {
    r.abandon_read_fetch(id);
    // Ignored for a block abandoned above.
    r.handle_response(
        id,
        now,
        GetResponse::Failed {
            status: None,
            message: "given up: the run or read that sent it ended".into(),
        },
    );
}

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        match self.replica.try_borrow_mut() {
            Ok(mut r) => {
                self.settle_orphans(&mut r);
                for id in self.ids.drain(..) {
                    give_up(&mut r, id, self.now);
                }
            }
            // The caller holds the machine (it dropped the read inside a
            // borrow): the next call settles these.
            Err(_) => {
                let now = self.now;
                self.orphans
                    .borrow_mut()
                    .extend(self.ids.drain(..).map(|id| (id, now)));
            }
        }
    }
}

/// `fetch.get_with_meta(req)`, given up (and dropped) once `req.timeout_ms`
/// (which includes a long-poll's wait) have passed since `now`, whether or
/// not the seam keeps its own deadline.
async fn bounded_get<F: Fetch, T: Timer>(
    fetch: &F,
    timer: &T,
    now: u64,
    req: GetRequest,
) -> Answer {
    let id = req.id;
    let timeout_ms = req.timeout_ms.max(1);
    let key = req.key.clone();
    let get = pin!(fetch.get_with_meta(req));
    let deadline = pin!(timer.sleep_until(now.saturating_add(timeout_ms)));
    match future::select(get, deadline).await {
        Either::Left(((resp, meta), _)) => (id, resp, meta),
        Either::Right(((), _)) => (
            id,
            GetResponse::Failed {
                status: None,
                message: format!("GET {key}: timed out after {timeout_ms} ms"),
            },
            ResponseMeta::default(),
        ),
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

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::task::Poll;

    use futures::stream;
    use walcast_core::catalog::HEAD_KEY;
    use walcast_core::replica::ReplicaConfig;
    use walcast_core::ErrorKind;

    use super::*;

    /// Polls `f` to completion; everything here is ready without waking.
    fn block_on<O>(f: impl Future<Output = O>) -> O {
        let mut f = pin!(f);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        for _ in 0..1_000_000 {
            if let Poll::Ready(o) = f.as_mut().poll(&mut cx) {
                return o;
            }
        }
        panic!("the future did not complete");
    }

    fn chunks(parts: &[&[u8]]) -> Vec<Result<Vec<u8>, String>> {
        parts.iter().map(|p| Ok(p.to_vec())).collect()
    }

    #[test]
    fn read_body_keeps_at_most_max_bytes_plus_one() {
        let body = block_on(read_body(
            stream::iter(chunks(&[b"abc", b"def", b"ghi"])),
            4,
            None,
        ));
        assert_eq!(body.unwrap(), b"abcde");
        // One big chunk is cut too.
        let body = block_on(read_body(stream::iter(chunks(&[&[1u8; 100]])), 9, None));
        assert_eq!(body.unwrap().len(), 10);
        // Exactly max_bytes: all of it.
        let body = block_on(read_body(stream::iter(chunks(&[b"ab", b"cd"])), 4, Some(4)));
        assert_eq!(body.unwrap(), b"abcd");
        // Empty chunks and an empty body.
        let body = block_on(read_body(stream::iter(chunks(&[b"", b"a", b""])), 4, None));
        assert_eq!(body.unwrap(), b"a");
        let body = block_on(read_body(stream::iter(chunks(&[])), 4, Some(0)));
        assert_eq!(body.unwrap(), b"");
    }

    #[test]
    fn read_body_stops_reading_an_endless_stream() {
        let pulled = Cell::new(0u64);
        let endless = stream::repeat_with(|| {
            pulled.set(pulled.get() + 1);
            Ok::<_, String>(vec![b' '; 1000])
        });
        let body = block_on(read_body(endless, 1 << 20, None)).unwrap();
        assert_eq!(body.len(), (1 << 20) + 1);
        assert_eq!(pulled.get(), 1049);
    }

    #[test]
    fn read_body_does_not_trust_a_claimed_length() {
        // 64 TiB claimed, 3 bytes sent: nothing near the claim is reserved.
        let body = block_on(read_body(
            stream::iter(chunks(&[b"a", b"b", b"c"])),
            u64::MAX,
            Some(70_368_744_177_664),
        ))
        .unwrap();
        assert_eq!(body, b"abc");
        assert!(body.capacity() <= MAX_PREALLOC);
        let body = block_on(read_body(
            stream::iter(chunks(&[b"a", b"b"])),
            10,
            Some(u64::MAX),
        ))
        .unwrap();
        assert!(body.capacity() <= 11, "{}", body.capacity());
    }

    #[test]
    fn read_body_returns_the_first_error() {
        let items: Vec<Result<Vec<u8>, String>> = vec![Ok(b"a".to_vec()), Err("reset".into())];
        let r = block_on(read_body(stream::iter(items), 10, None));
        assert_eq!(r, Err("reset".to_string()));
    }

    /// Virtual time: a sleep yields once (so that whatever else is ready
    /// goes first), then moves the clock to its deadline and completes.
    struct Virtual(Rc<Cell<u64>>);

    impl Timer for Virtual {
        fn now_ms(&self) -> u64 {
            self.0.get()
        }
        fn sleep_until(&self, at_ms: u64) -> impl Future<Output = ()> {
            let clock = self.0.clone();
            let mut yielded = false;
            future::poll_fn(move |cx| {
                if clock.get() >= at_ms {
                    Poll::Ready(())
                } else if !yielded {
                    yielded = true;
                    cx.waker().wake_by_ref();
                    Poll::Pending
                } else {
                    clock.set(at_ms);
                    Poll::Ready(())
                }
            })
        }
    }

    /// A seam that never answers (a server that never finishes a body,
    /// and a seam that keeps no deadline of its own).
    struct Never(Cell<u32>);

    impl Fetch for Never {
        fn get(&self, _req: GetRequest) -> impl Future<Output = GetResponse> {
            self.0.set(self.0.get() + 1);
            future::pending()
        }
    }

    #[test]
    fn a_get_that_never_answers_is_given_up_after_timeout_ms() {
        let cfg = ReplicaConfig {
            request_timeout_ms: 1000,
            ..ReplicaConfig::default()
        };
        let max_attempts = cfg.max_attempts;
        let clock = Rc::new(Cell::new(0));
        let timer = Virtual(clock.clone());
        let mut driver = Driver::new(Replica::new(cfg, 1), Never(Cell::new(0)), timer);
        // Without a deadline the run would wait for ever: stop it after a
        // virtual hour so that the test fails instead of hanging.
        let stop = future::poll_fn(move |_| {
            if clock.get() > 3_600_000 {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        let r = block_on(driver.run(Until::CaughtUp, stop, |_, _| Ok::<(), ()>(())));
        match r {
            Err(RunError::Replica(e)) => {
                assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
                assert!(e.to_string().contains("timed out after 1000 ms"), "{e}");
                assert!(e.to_string().contains(HEAD_KEY), "{e}");
            }
            other => panic!("expected a timeout error, got {other:?}"),
        }
        assert_eq!(driver.fetch().0.get(), max_attempts);
        assert!(driver.timer.now_ms() < 3_600_000);
    }

    /// An in-memory store answering ranges, counting GETs.
    struct Mem(std::collections::HashMap<String, Vec<u8>>, Cell<u32>);

    impl Fetch for Mem {
        fn get(&self, req: GetRequest) -> impl Future<Output = GetResponse> {
            use walcast_core::io::{ByteRange, ContentRange};
            self.1.set(self.1.get() + 1);
            let resp = match self.0.get(&req.key) {
                None => GetResponse::NotFound,
                Some(b) => {
                    let len = b.len() as u64;
                    let (start, end, range) = match req.range {
                        None => (0, len, false),
                        Some(ByteRange::Bounded { start, end }) => (start, end.min(len), true),
                        Some(ByteRange::Suffix(n)) => (len.saturating_sub(n), len, true),
                    };
                    GetResponse::Ok {
                        body: b[start as usize..end as usize].to_vec(),
                        etag: None,
                        range: range.then_some(ContentRange {
                            start,
                            end,
                            total: Some(len),
                        }),
                    }
                }
            };
            future::ready(resp)
        }
    }

    /// A lazy dataset: an indexed snapshot of 20,000 keys `k000000`.. (a
    /// 40-byte value each, every byte the key's number) at LSN 1, and a
    /// segment at LSN 2 that overwrites `k000007` with `new` and deletes
    /// `k000008`.
    fn lazy_objects() -> std::collections::HashMap<String, Vec<u8>> {
        use walcast_core::batch::{self, Op};
        use walcast_core::catalog::{snapshot_key, DatasetId, Head, SegmentEntry, SnapshotEntry};
        use walcast_core::segment::SegmentBuilder;
        use walcast_core::snapshot::indexed::{encode_indexed, IndexedOptions};
        use walcast_core::state::KvState;

        let id = DatasetId([9; 16]);
        let mut st = KvState::new();
        for i in 0..20_000u32 {
            st.put(format!("k{i:06}").as_bytes(), &[i as u8; 40]);
        }
        let snap = encode_indexed(&st, 1, 1, id, IndexedOptions::default());
        // The tail: LSN 2 overwrites one key and deletes another.
        let mut b = SegmentBuilder::new(1, 2);
        let ops = vec![
            Op::put(b"k000007".to_vec(), b"new".to_vec()),
            Op::delete(b"k000008".to_vec()),
        ];
        assert!(b.push(&batch::encode(&ops).unwrap()));
        let (seg, summary) = b.finish().unwrap();
        let entry = SegmentEntry::from_summary(&summary);
        let mut head = Head::new(id, 1);
        head.committed_lsn = 2;
        head.earliest_lsn = 2;
        head.generation = 2;
        head.segments = vec![entry.clone()];
        head.snapshot = Some(SnapshotEntry {
            key: snapshot_key(1, 1),
            lsn: 1,
            epoch: 1,
            size: snap.len() as u64,
            crc32: crc32fast::hash(&snap),
            entries: st.len(),
            version: 2,
            suffix: None,
            footer_crc32: None,
        });
        let mut objects = std::collections::HashMap::new();
        objects.insert(HEAD_KEY.to_string(), head.encode());
        objects.insert(entry.key.clone(), seg);
        objects.insert(snapshot_key(1, 1), snap);
        objects
    }

    /// A lazy replica caught up on `objects`.
    fn lazy_driver<F: Fetch>(fetch: F) -> Driver<F, Virtual> {
        let cfg = ReplicaConfig {
            lazy_cache_bytes: Some(1 << 20),
            ..ReplicaConfig::default()
        };
        let mut driver = Driver::new(Replica::new(cfg, 1), fetch, Virtual(Rc::new(Cell::new(0))));
        let lsn = block_on(driver.run(Until::CaughtUp, future::pending(), |_, _| Ok::<(), ()>(())));
        assert_eq!(lsn.unwrap(), 2);
        driver
    }

    #[test]
    fn lazy_reads_fetch_only_the_blocks_they_need() {
        use walcast_core::replica::LazyScan;

        let driver = lazy_driver(Mem(lazy_objects(), Cell::new(0)));
        let caught_up = driver.fetch().1.get();
        assert_eq!(caught_up, 2, "the head and the tail's segment, no snapshot");
        assert_eq!(
            block_on(driver.get(b"k000007")).unwrap().as_deref(),
            Some(&b"new"[..])
        );
        assert_eq!(block_on(driver.get(b"k000008")).unwrap(), None);
        let v = block_on(driver.get(b"k012345")).unwrap();
        assert_eq!(v.as_deref(), Some(&[12345u32 as u8; 40][..]));
        let gets = driver.fetch().1.get() - caught_up;
        assert!(gets <= 4, "{gets} GETs for three point reads");
        let got = block_on(driver.scan(LazyScan::prefix(b"k00000", 100))).unwrap();
        let keys: Vec<_> = got
            .iter()
            .map(|(k, _)| String::from_utf8(k.clone()).unwrap())
            .collect();
        assert_eq!(
            keys,
            [
                "k000000", "k000001", "k000002", "k000003", "k000004", "k000005", "k000006",
                "k000007", "k000009"
            ]
        );
    }

    /// Settings past what the machine can do (a poll every 0 ms, more
    /// GETs at once than a count doubled can hold, in full mode and lazy):
    /// taken within bounds, so a sync still ends caught up, after a few
    /// GETs, instead of reading the head for ever or planning nothing.
    #[test]
    fn absurd_settings_still_catch_up() {
        for (poll, inflight, lazy) in [
            (0, 4, None),
            (1000, usize::MAX, None),
            (0, usize::MAX, Some(1 << 20)),
            (u64::MAX, 1 << 63, None),
        ] {
            let cfg = ReplicaConfig {
                poll_interval_ms: poll,
                max_inflight: inflight,
                lazy_cache_bytes: lazy,
                ..ReplicaConfig::default()
            };
            let fetch = Mem(lazy_objects(), Cell::new(0));
            let clock = Rc::new(Cell::new(0));
            let mut driver = Driver::new(Replica::new(cfg, 1), fetch, Virtual(clock));
            let mut run =
                Box::pin(driver.run(Until::CaughtUp, future::pending(), |_, _| Ok::<(), ()>(())));
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            let lsn = (0..10_000).find_map(|_| match run.as_mut().poll(&mut cx) {
                Poll::Ready(r) => Some(r),
                Poll::Pending => None,
            });
            let lsn = lsn.unwrap_or_else(|| panic!("no end ({poll} ms, {inflight} at once)"));
            drop(run);
            assert_eq!(lsn.unwrap(), 2, "{poll} ms, {inflight} at once");
            let gets = driver.fetch().1.get();
            assert!(gets <= 4, "{gets} GETs ({poll} ms, {inflight} at once)");
        }
    }

    /// A seam whose snapshot GETs answer 404 while `.1` is set.
    struct Missing(Mem, Cell<bool>);

    impl Fetch for Missing {
        fn get(&self, req: GetRequest) -> impl Future<Output = GetResponse> {
            let gone = self.1.get() && req.key.starts_with("snapshots/");
            let resp = self.0.get(req);
            async move {
                if gone {
                    GetResponse::NotFound
                } else {
                    resp.await
                }
            }
        }
    }

    /// Lazy reads that failed while no run was going (their snapshot gone,
    /// then back) leave no error for the next sync to return unread: it
    /// reads the head and returns the LSN.
    #[test]
    fn errors_of_reads_no_run_took_do_not_end_the_next_sync() {
        let mut driver = lazy_driver(Missing(Mem(lazy_objects(), Cell::new(0)), Cell::new(true)));
        for _ in 0..6 {
            assert!(block_on(driver.get(b"k012345")).is_err());
        }
        driver.fetch().1.set(false);
        let gets = driver.fetch().0 .1.get();
        let lsn = block_on(driver.run(Until::CaughtUp, future::pending(), |_, _| Ok::<(), ()>(())));
        assert_eq!(lsn.unwrap(), 2);
        assert!(driver.fetch().0 .1.get() > gets, "the sync read the head");
        let v = block_on(driver.get(b"k012345")).unwrap();
        assert_eq!(v.as_deref(), Some(&[12345u32 as u8; 40][..]));
    }

    /// A seam whose GETs of keys starting with `.2` wait for ever while
    /// `open` is false.
    struct Gate(Mem, Cell<bool>, &'static str);

    impl Fetch for Gate {
        fn get(&self, req: GetRequest) -> impl Future<Output = GetResponse> {
            let open = self.1.get() || !req.key.starts_with(self.2);
            let resp = self.0.get(req);
            async move {
                if !open {
                    future::pending::<()>().await;
                }
                resp.await
            }
        }
    }

    /// A lazy replica caught up, whose GETs from now on wait at a closed
    /// gate (`.1`).
    fn gated() -> Driver<Gate, Virtual> {
        let driver = lazy_driver(Gate(Mem(lazy_objects(), Cell::new(0)), Cell::new(true), ""));
        driver.fetch().1.set(false);
        driver
    }

    /// Polls `f` once: it waits (its GETs are out at the gate).
    fn poll_pending<O>(f: Pin<&mut impl Future<Output = O>>) {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(f.poll(&mut cx).is_pending());
    }

    /// A read dropped by its caller while its GETs are out (a timeout, a
    /// select): the machine forgets those GETs, and the next read of the key
    /// asks again instead of waiting for their answers for ever.
    #[test]
    fn a_dropped_read_does_not_leave_its_gets_waiting() {
        let driver = gated();
        poll_pending(pin!(driver.get(b"k012345")));
        let asked = driver.fetch().0 .1.get();
        assert!(asked >= 1, "the dropped read performed a GET");
        driver.fetch().1.set(true);
        let v = block_on(driver.get(b"k012345")).unwrap();
        assert_eq!(v.as_deref(), Some(&[12345u32 as u8; 40][..]));
        assert!(
            driver.fetch().0 .1.get() > asked,
            "the block was asked for again"
        );
    }

    /// A read dropped while its caller holds a borrow of the machine (the
    /// driver cannot reach the machine then): the next read settles the
    /// dropped read's GETs first, and asks for the block again instead of
    /// waiting for their answers for ever.
    #[test]
    fn a_read_dropped_inside_a_borrow_does_not_leave_its_gets_waiting() {
        let driver = gated();
        let mut read = Box::pin(driver.get(b"k012345"));
        poll_pending(read.as_mut());
        let held = driver.replica();
        drop(read);
        drop(held);
        assert_eq!(
            driver.orphans.borrow().len(),
            1,
            "the block GET waits to be settled"
        );
        let asked = driver.fetch().0 .1.get();
        driver.fetch().1.set(true);
        let v = block_on(driver.get(b"k012345")).unwrap();
        assert_eq!(v.as_deref(), Some(&[12345u32 as u8; 40][..]));
        assert!(driver.orphans.borrow().is_empty());
        assert!(
            driver.fetch().0 .1.get() > asked,
            "the block was asked for again"
        );
    }

    /// A read under way that waits for the GET another read sent, dropped
    /// inside a borrow: it settles that GET itself and asks again, instead
    /// of waiting for the next call on the driver.
    #[test]
    fn a_read_waiting_on_a_read_dropped_inside_a_borrow_asks_again() {
        let driver = gated();
        let mut first = Box::pin(driver.get(b"k012345"));
        let mut second = Box::pin(driver.get(b"k012345"));
        poll_pending(first.as_mut());
        poll_pending(second.as_mut());
        let held = driver.replica();
        drop(first);
        drop(held);
        driver.fetch().1.set(true);
        let v = block_on(second).unwrap();
        assert_eq!(v.as_deref(), Some(&[12345u32 as u8; 40][..]));
        assert!(driver.orphans.borrow().is_empty());
    }

    /// A read of one driver dropped inside a borrow, while a sibling (a
    /// reader beside a run, as `walcast`'s handle has) waits on its GET:
    /// the sibling settles that GET and asks again at once, instead of
    /// waiting until the GET's deadline passes (virtual time here).
    #[test]
    fn a_sibling_settles_the_gets_of_a_read_dropped_inside_a_borrow() {
        let driver = gated();
        let clock = driver.timer.0.clone();
        let sibling = driver.sibling(
            Gate(Mem(lazy_objects(), Cell::new(0)), Cell::new(true), ""),
            Virtual(clock.clone()),
        );
        let mut first = Box::pin(driver.get(b"k012345"));
        poll_pending(first.as_mut());
        let held = driver.replica();
        drop(first);
        drop(held);
        let start = clock.get();
        let v = block_on(sibling.get(b"k012345")).unwrap();
        assert_eq!(v.as_deref(), Some(&[12345u32 as u8; 40][..]));
        assert!(
            clock.get() - start < 1_000,
            "the sibling waited {} ms for a GET no one would answer",
            clock.get() - start
        );
        assert!(sibling.fetch().0 .1.get() >= 1, "the sibling asked again");
        assert!(driver.orphans.borrow().is_empty());
    }

    /// A run stopped while its head GET is out (a `stop` future, or a
    /// timeout around the run): the machine does not wait for that answer
    /// for ever, and the next run reads the head again and catches up.
    #[test]
    fn a_run_stopped_with_its_head_get_out_does_not_wedge_the_next() {
        let driver = lazy_driver(Gate(
            Mem(lazy_objects(), Cell::new(0)),
            Cell::new(true),
            "catalog/head.json",
        ));
        let mut driver = driver;
        driver.fetch().1.set(false);
        let clock = driver.timer.0.clone();
        // Ready on its second poll: before the head GET's deadline.
        let mut polls = 0;
        let stop = future::poll_fn(move |_| {
            polls += 1;
            if polls >= 2 {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        let asked = driver.fetch().0 .1.get();
        let lsn = block_on(driver.run(Until::CaughtUp, stop, |_, _| Ok::<(), ()>(())));
        assert_eq!(lsn.unwrap(), 2, "stopped");
        assert_eq!(
            driver.fetch().0 .1.get(),
            asked + 1,
            "the head GET went out"
        );
        assert!(clock.get() < 30_000, "stopped before the GET's deadline");
        driver.fetch().1.set(true);
        let asked = driver.fetch().0 .1.get();
        let hour = clock.get() + 3_600_000;
        let c = clock.clone();
        let stop = future::poll_fn(move |_| {
            if c.get() >= hour {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        let lsn = block_on(driver.run(Until::CaughtUp, stop, |_, _| Ok::<(), ()>(())));
        assert_eq!(lsn.unwrap(), 2);
        assert!(
            clock.get() < hour,
            "the second run waited for the first run's head GET"
        );
        assert!(
            driver.fetch().0 .1.get() > asked,
            "the second run read the head again"
        );
    }

    /// A run (a periodic sync beside reads) that returns while block GETs a
    /// read queued are out (the run's `poll` performed them): the machine
    /// forgets them, and the next read of the key asks again instead of
    /// waiting for their answers for ever.
    #[test]
    fn a_run_that_returns_does_not_leave_read_gets_waiting() {
        use walcast_core::replica::Read;

        let mut driver = lazy_driver(Gate(
            Mem(lazy_objects(), Cell::new(0)),
            Cell::new(true),
            "snapshots/",
        ));
        driver.fetch().1.set(false);
        let pending = driver.handle().borrow_mut().get_lazy(b"k012345").unwrap();
        assert_eq!(pending, Read::Pending);
        let lsn = block_on(driver.run(Until::CaughtUp, future::pending(), |_, _| Ok::<(), ()>(())));
        assert_eq!(lsn.unwrap(), 2);
        let asked = driver.fetch().0 .1.get();
        driver.fetch().1.set(true);
        // Stop after a virtual hour, so that the test fails instead of
        // hanging.
        let clock = driver.timer.0.clone();
        let stop = future::poll_fn(move |_| {
            if clock.get() > 3_600_000 {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        match block_on(future::select(pin!(driver.get(b"k012345")), pin!(stop))) {
            Either::Left((v, _)) => {
                assert_eq!(v.unwrap().as_deref(), Some(&[12345u32 as u8; 40][..]))
            }
            Either::Right(_) => panic!("the read waited for a GET the run dropped"),
        }
        assert!(
            driver.fetch().0 .1.get() > asked,
            "the block was asked for again"
        );
    }
}
