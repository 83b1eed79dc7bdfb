//! # walcast-wasm
//!
//! The read replica for JS runtimes — browsers, Cloudflare Workers, Deno,
//! Node — built on the shared async driver ([`walcast_client::Driver`]).
//! One `--target web` build serves every runtime; the `walcast` npm package
//! (`js/`) wraps [`WasmReplica`] in the documented `Replica` API and adds
//! persistence.
//!
//! The module performs no I/O of its own and holds no JS callbacks across
//! calls: the driver's fetch seam and timer hand their work to the JS side
//! through a queue ([`WasmReplica::take_requests`], [`WasmReplica::deliver`],
//! [`WasmReplica::next_timer`]), and JS polls the sync
//! ([`WasmReplica::sync_poll`]). The GETs themselves (the runtime's global
//! `fetch`, bodies read as streams and cut at the request's `max_bytes + 1`)
//! are done by `js/src/replica.js`. So every call into the module is a
//! synchronous call from JS: a trap (a panic aborts) surfaces at the caller,
//! never in a detached microtask, and a trapped instance can be replaced by a
//! fresh one without a callback of the old one ever reaching it.
//!
//! Bytes cross as `Uint8Array`; errors are JS `Error`s with a stable `code`
//! (the core's [`walcast_core::ErrorKind::code`]) and, when known, the
//! `object` key and `lsn` they concern. A panic is reported on
//! `console.error` (and kept for [`take_panic_message`]) before the module
//! traps.

use std::cell::RefCell;
use std::future::Future;
use std::ops::Bound;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use js_sys::{Array, Function, Object, Reflect, Uint8Array};
use walcast_client::{Driver, Fetch, RunError, Timer, Until};
use walcast_core::catalog::DatasetId;
use walcast_core::io::{ContentRange, GetRequest, GetResponse};
use walcast_core::replica::{Event, Mode, Replica, ReplicaConfig};
use walcast_core::{snapshot, Error, ErrorKind};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;

fn global() -> JsValue {
    js_sys::global().into()
}

fn get(obj: &JsValue, key: &str) -> JsValue {
    Reflect::get(obj, &JsValue::from_str(key)).unwrap_or(JsValue::UNDEFINED)
}

fn set(obj: &JsValue, key: &str, value: impl Into<JsValue>) {
    let _ = Reflect::set(obj, &JsValue::from_str(key), &value.into());
}

thread_local! {
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let msg = info.to_string();
            let console = get(&global(), "console");
            if let Ok(f) = get(&console, "error").dyn_into::<Function>() {
                let _ = f.call1(
                    &console,
                    &JsValue::from_str(&format!("walcast panicked: {msg}")),
                );
            }
            LAST_PANIC.with(|p| {
                if let Ok(mut p) = p.try_borrow_mut() {
                    *p = Some(msg);
                }
            });
        }));
    });
}

/// The message of the last panic, if any (read from a trapped instance to
/// say what went wrong).
#[wasm_bindgen(js_name = takePanicMessage)]
pub fn take_panic_message() -> Option<String> {
    LAST_PANIC.with(|p| p.try_borrow_mut().ok().and_then(|mut p| p.take()))
}

/// A JS `Error` carrying the core error's `code`, `object` and `lsn`.
fn js_error(e: &Error) -> JsValue {
    let err = js_sys::Error::new(&e.to_string());
    let v: JsValue = err.into();
    set(&v, "code", e.kind().code());
    if let Some(o) = e.object() {
        set(&v, "object", o);
    }
    if let Some(l) = e.lsn() {
        set(&v, "lsn", l as f64);
    }
    v
}

fn invalid(msg: &str) -> JsValue {
    js_error(&Error::new(ErrorKind::InvalidInput, msg))
}

// --- the I/O queue between the driver and JS ------------------------------------------

/// Requests the driver wants performed, responses JS delivered, and the
/// timers the driver waits on. Shared by the fetch seam, the timer and
/// [`WasmReplica`]. A handful of entries at a time (the machine's
/// concurrency), so plain vectors.
#[derive(Default)]
struct Io {
    /// GETs to perform, in the order the machine asked.
    outbox: Vec<GetRequest>,
    /// GETs handed to JS and not yet answered to the machine.
    inflight: Vec<InFlight>,
    /// GETs whose future was dropped: JS aborts them.
    cancelled: Vec<u64>,
    /// Pending sleeps: (sequence number, deadline ms, waker).
    timers: Vec<(u64, u64, Option<Waker>)>,
    next_timer: u64,
    /// Test hook: the next delivered response panics inside the driver.
    trap_on_delivery: bool,
}

struct InFlight {
    id: u64,
    key: String,
    response: Option<GetResponse>,
    waker: Option<Waker>,
}

type SharedIo = Rc<RefCell<Io>>;

impl Io {
    fn wake_due(&mut self, now: u64) {
        for (_, at, w) in &mut self.timers {
            if *at <= now {
                if let Some(w) = w.take() {
                    w.wake();
                }
            }
        }
    }

    fn forget(&mut self, id: u64) {
        self.inflight.retain(|f| f.id != id);
    }
}

/// The driver's fetch seam: queues the request for JS and completes when JS
/// delivers the response.
struct QueuedFetch(SharedIo);

struct FetchFuture {
    io: SharedIo,
    id: u64,
    req: Option<GetRequest>,
    done: bool,
}

impl Future for FetchFuture {
    type Output = GetResponse;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<GetResponse> {
        let id = self.id;
        let io = self.io.clone();
        let mut io = io.borrow_mut();
        if let Some(req) = self.req.take() {
            io.inflight.push(InFlight {
                id,
                key: req.key.clone(),
                response: None,
                waker: None,
            });
            io.outbox.push(req);
        }
        let Some(at) = io.inflight.iter().position(|f| f.id == id) else {
            // Cannot happen: the entry lives until this future takes its response.
            return Poll::Ready(GetResponse::Failed {
                status: None,
                message: "request lost".into(),
            });
        };
        if io.inflight[at].response.is_some() {
            let f = io.inflight.swap_remove(at);
            self.done = true;
            if std::mem::take(&mut io.trap_on_delivery) {
                drop(io);
                panic!("walcast: deliberate test trap while handling a response");
            }
            return Poll::Ready(f.response.unwrap_or(GetResponse::NotFound));
        }
        io.inflight[at].waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for FetchFuture {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Ok(mut io) = self.io.try_borrow_mut() {
            if self.req.is_none() {
                io.forget(self.id);
                // JS may have it in flight: abort it.
                io.cancelled.push(self.id);
            }
        }
    }
}

impl Fetch for QueuedFetch {
    fn get(&self, req: GetRequest) -> impl Future<Output = GetResponse> {
        FetchFuture {
            io: self.0.clone(),
            id: req.id.0,
            req: Some(req),
            done: false,
        }
    }
}

/// `Date.now()`, and sleeps that JS ends by polling after [`WasmReplica::next_timer`].
struct QueuedTimer(SharedIo);

struct SleepFuture {
    io: SharedIo,
    at: u64,
    seq: Option<u64>,
}

fn now_ms() -> u64 {
    js_sys::Date::now() as u64
}

impl Future for SleepFuture {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let io = self.io.clone();
        let mut io = io.borrow_mut();
        let seq = self.seq;
        if now_ms() >= self.at {
            if let Some(seq) = self.seq.take() {
                io.timers.retain(|t| t.0 != seq);
            }
            return Poll::Ready(());
        }
        let waker = Some(cx.waker().clone());
        match seq.and_then(|s| io.timers.iter_mut().find(|t| t.0 == s)) {
            Some(t) => t.2 = waker,
            None => {
                io.next_timer += 1;
                let s = io.next_timer;
                self.seq = Some(s);
                io.timers.push((s, self.at, waker));
            }
        }
        Poll::Pending
    }
}

impl Drop for SleepFuture {
    fn drop(&mut self) {
        if let Some(seq) = self.seq {
            if let Ok(mut io) = self.io.try_borrow_mut() {
                io.timers.retain(|t| t.0 != seq);
            }
        }
    }
}

impl Timer for QueuedTimer {
    fn now_ms(&self) -> u64 {
        now_ms()
    }

    fn sleep_until(&self, at_ms: u64) -> impl Future<Output = ()> {
        SleepFuture {
            io: self.0.clone(),
            at: at_ms,
            seq: None,
        }
    }
}

/// The sync's waker: records that the sync wants another poll.
#[derive(Default)]
struct Woken(AtomicBool);

impl Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.store(true, Ordering::Relaxed);
    }
}

type SyncFuture = Pin<Box<dyn Future<Output = Result<u64, JsValue>>>>;

struct SyncTask {
    fut: SyncFuture,
    woken: Arc<Woken>,
}

#[derive(Default, Clone)]
struct Callbacks {
    applied: Option<Function>,
    record: Option<Function>,
    reset: Option<Function>,
}

// --- the replica ----------------------------------------------------------------------

/// A read replica of a walcast dataset, for JS.
#[wasm_bindgen]
pub struct WasmReplica {
    replica: Rc<RefCell<Replica>>,
    io: SharedIo,
    callbacks: Rc<RefCell<Callbacks>>,
    task: RefCell<Option<SyncTask>>,
}

fn parse_options(options: &JsValue) -> ReplicaConfig {
    let mut cfg = ReplicaConfig::default();
    if options.is_object() {
        if let Some(p) = get(options, "pollInterval").as_f64() {
            cfg.poll_interval_ms = p.max(0.0) as u64;
        }
        if let Some(c) = get(options, "concurrency").as_f64() {
            cfg.max_inflight = (c as usize).max(1);
        }
        if get(options, "raw").as_bool() == Some(true) {
            cfg.mode = Mode::Raw;
        }
    }
    cfg
}

fn seed() -> u64 {
    (js_sys::Math::random() * (u64::MAX as f64)) as u64 ^ js_sys::Date::now() as u64
}

/// The lowest key a scan with `prefix` and `start` can return.
fn scan_lower(prefix: &[u8], start: Option<&[u8]>) -> Vec<u8> {
    match start {
        Some(s) if s > prefix => s.to_vec(),
        _ => prefix.to_vec(),
    }
}

/// What a JS delivery means for the machine: classified by HTTP status only
/// (0: no response at all, e.g. a network error or a timeout).
fn classify(
    status: u16,
    key: &str,
    body: Option<Vec<u8>>,
    etag: Option<String>,
    content_range: Option<String>,
    message: Option<String>,
) -> GetResponse {
    let failed = |status: Option<u16>| GetResponse::Failed {
        status,
        message: match &message {
            Some(m) => format!("GET {key}: {m}"),
            None => match status {
                Some(s) => format!("GET {key}: HTTP {s}"),
                None => format!("GET {key} failed"),
            },
        },
    };
    match status {
        0 => failed(None),
        200 | 206 => match body {
            Some(body) => GetResponse::Ok {
                body,
                etag,
                range: if status == 206 {
                    content_range.as_deref().and_then(ContentRange::parse)
                } else {
                    None
                },
            },
            // The body could not be read (connection lost mid-way).
            None => failed(Some(status)),
        },
        304 => GetResponse::NotModified,
        404 | 410 => GetResponse::NotFound,
        416 => GetResponse::RangeNotSatisfiable,
        s => failed(Some(s)),
    }
}

#[wasm_bindgen]
impl WasmReplica {
    /// A replica with no state yet. `options`: `{ pollInterval, concurrency, raw }`.
    #[wasm_bindgen(constructor)]
    pub fn new(options: JsValue) -> WasmReplica {
        install_panic_hook();
        Self::with(Replica::new(parse_options(&options), seed()))
    }

    /// A replica resuming from bytes produced by [`WasmReplica::snapshot`].
    pub fn restore(options: JsValue, snapshot: &[u8]) -> Result<WasmReplica, JsValue> {
        install_panic_hook();
        let cfg = parse_options(&options);
        let (h, state) = snapshot::decode(snapshot, None)
            .map_err(|e| js_error(&Error::decode(e).with_object("persisted snapshot")))?;
        let replica = Replica::restore(cfg, seed(), state, h.lsn, h.dataset_id, h.epoch);
        Ok(Self::with(replica))
    }

    fn with(replica: Replica) -> WasmReplica {
        WasmReplica {
            replica: Rc::new(RefCell::new(replica)),
            io: Rc::default(),
            callbacks: Rc::default(),
            task: RefCell::new(None),
        }
    }

    /// Starts a sync: catch up to the head as of now. Drive it with
    /// [`sync_poll`](Self::sync_poll) until that returns the applied LSN or
    /// throws. A sync already running is restarted.
    #[wasm_bindgen(js_name = syncBegin)]
    pub fn sync_begin(&self) {
        self.sync_abort();
        let replica = self.replica.clone();
        let io = self.io.clone();
        let callbacks = self.callbacks.clone();
        let fut = async move {
            let mut driver = Driver::shared(replica, QueuedFetch(io.clone()), QueuedTimer(io));
            let result = driver
                .run(
                    Until::CaughtUp,
                    std::future::pending(),
                    |_r, e| -> Result<(), JsValue> {
                        // Cloned out, so a callback may register others.
                        let cb = callbacks.borrow().clone();
                        match e {
                            Event::Applied { first, last } => {
                                if let Some(f) = &cb.applied {
                                    f.call2(
                                        &JsValue::NULL,
                                        &(*first as f64).into(),
                                        &(*last as f64).into(),
                                    )?;
                                }
                            }
                            Event::Record { lsn, payload } => {
                                if let Some(f) = &cb.record {
                                    f.call2(
                                        &JsValue::NULL,
                                        &(*lsn as f64).into(),
                                        &Uint8Array::from(payload.as_slice()).into(),
                                    )?;
                                }
                            }
                            Event::Bootstrapped { lsn, .. } => {
                                if let Some(f) = &cb.reset {
                                    f.call1(&JsValue::NULL, &(*lsn as f64).into())?;
                                }
                            }
                            Event::DatasetChanged { .. } => {
                                if let Some(f) = &cb.reset {
                                    f.call1(&JsValue::NULL, &0.0.into())?;
                                }
                            }
                            _ => {}
                        }
                        Ok(())
                    },
                )
                .await;
            match result {
                Ok(lsn) => Ok(lsn),
                Err(RunError::Replica(e)) => Err(js_error(&e)),
                Err(RunError::Callback(e)) => Err(e),
            }
        };
        *self.task.borrow_mut() = Some(SyncTask {
            fut: Box::pin(fut),
            woken: Arc::default(),
        });
    }

    /// Advances the running sync. Returns the applied LSN when it is done,
    /// `undefined` while it waits for a delivery or a timer
    /// ([`next_timer`](Self::next_timer)), `null` when it wants to be polled
    /// again soon; throws the sync's error (an `Error` with a `code`).
    #[wasm_bindgen(js_name = syncPoll)]
    pub fn sync_poll(&self) -> Result<JsValue, JsValue> {
        self.io.borrow_mut().wake_due(now_ms());
        let mut slot = self.task.borrow_mut();
        let Some(task) = slot.as_mut() else {
            return Err(invalid("walcast: no sync is running"));
        };
        let waker = Waker::from(task.woken.clone());
        let mut cx = Context::from_waker(&waker);
        for _ in 0..16 {
            task.woken.0.store(false, Ordering::Relaxed);
            match task.fut.as_mut().poll(&mut cx) {
                Poll::Ready(r) => {
                    *slot = None;
                    return r.map(|lsn| JsValue::from_f64(lsn as f64));
                }
                Poll::Pending => {
                    if !task.woken.0.load(Ordering::Relaxed) {
                        return Ok(JsValue::UNDEFINED);
                    }
                }
            }
        }
        Ok(JsValue::NULL)
    }

    /// Drops the running sync, if any (its GETs show up in
    /// [`take_cancelled`](Self::take_cancelled)).
    #[wasm_bindgen(js_name = syncAbort)]
    pub fn sync_abort(&self) {
        let task = self.task.borrow_mut().take();
        drop(task);
    }

    /// The GETs to perform now: `[{ id, key, range, ifNoneMatch, timeoutMs,
    /// maxBytes }]` (`range`: a `Range` header value or `null`). Read at most
    /// `maxBytes + 1` bytes of a body.
    #[wasm_bindgen(js_name = takeRequests)]
    pub fn take_requests(&self) -> Array {
        let reqs = std::mem::take(&mut self.io.borrow_mut().outbox);
        let out = Array::new();
        for r in reqs {
            let o: JsValue = Object::new().into();
            set(&o, "id", r.id.0 as f64);
            set(&o, "key", r.key.as_str());
            set(
                &o,
                "range",
                r.range
                    .map_or(JsValue::NULL, |x| JsValue::from_str(&x.to_header())),
            );
            set(
                &o,
                "ifNoneMatch",
                r.if_none_match
                    .as_deref()
                    .map_or(JsValue::NULL, JsValue::from_str),
            );
            set(&o, "timeoutMs", r.timeout_ms as f64);
            set(&o, "maxBytes", r.max_bytes as f64);
            out.push(&o);
        }
        out
    }

    /// Ids of GETs the sync no longer waits for: abort them.
    #[wasm_bindgen(js_name = takeCancelled)]
    pub fn take_cancelled(&self) -> Array {
        let ids = std::mem::take(&mut self.io.borrow_mut().cancelled);
        ids.into_iter()
            .map(|i| JsValue::from_f64(i as f64))
            .collect()
    }

    /// When the sync next wants a poll without a delivery (ms since the
    /// epoch), or -1.
    #[wasm_bindgen(js_name = nextTimer)]
    pub fn next_timer(&self) -> f64 {
        self.io
            .borrow()
            .timers
            .iter()
            .map(|t| t.1)
            .min()
            .map_or(-1.0, |at| at as f64)
    }

    /// Hands over the outcome of GET `id`: the HTTP `status` (0 when there
    /// was no response: network error, timeout), the body read (at most
    /// `maxBytes + 1` bytes; `undefined` when reading it failed), the `ETag`
    /// and `Content-Range` headers, and what went wrong, if anything.
    /// Classified by `status` alone. Poll the sync afterwards.
    pub fn deliver(
        &self,
        id: f64,
        status: u16,
        body: Option<Vec<u8>>,
        etag: Option<String>,
        content_range: Option<String>,
        message: Option<String>,
    ) {
        let id = id as u64;
        let mut io = self.io.borrow_mut();
        let Some(f) = io
            .inflight
            .iter_mut()
            .find(|f| f.id == id && f.response.is_none())
        else {
            return; // not (or no longer) waited for
        };
        f.response = Some(classify(status, &f.key, body, etag, content_range, message));
        if let Some(w) = f.waker.take() {
            w.wake();
        }
    }

    /// The value of `key`, or `undefined`.
    pub fn get(&self, key: &[u8]) -> Option<Uint8Array> {
        self.replica.borrow().state().get(key).map(Uint8Array::from)
    }

    /// Entries in key order: keys starting with `prefix`, at or after
    /// `start`, before `end`; at most `limit` (0: no limit). Returns an array
    /// of `[key, value]` pairs; empty when the bounds leave nothing between
    /// them (`end` at or before `start`).
    pub fn scan(
        &self,
        prefix: Option<Vec<u8>>,
        start: Option<Vec<u8>>,
        end: Option<Vec<u8>>,
        limit: u32,
    ) -> Array {
        let r = self.replica.borrow();
        let out = Array::new();
        let prefix = prefix.unwrap_or_default();
        let lower = scan_lower(&prefix, start.as_deref());
        if end.as_deref().is_some_and(|e| e <= lower.as_slice()) {
            return out;
        }
        let upper = end.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
        let limit = if limit == 0 { u32::MAX } else { limit };
        for (k, v) in r.state().range(Bound::Included(&lower), upper) {
            if !k.starts_with(&prefix) || out.length() >= limit {
                break;
            }
            let pair = Array::new();
            pair.push(&Uint8Array::from(k));
            pair.push(&Uint8Array::from(v));
            out.push(&pair);
        }
        out
    }

    /// Progress: `{ appliedLsn, committedLsn, epoch, datasetId, lagMs,
    /// lastPollAt, state, lastError, requests, bytesReceived }`; `lastError`
    /// is `{ code, message, object?, lsn? }` or `null`.
    pub fn status(&self) -> JsValue {
        let st = self.replica.borrow().status(now_ms());
        let o: JsValue = Object::new().into();
        set(&o, "appliedLsn", st.applied_lsn as f64);
        set(&o, "committedLsn", st.committed_lsn as f64);
        set(&o, "epoch", st.epoch as f64);
        set(
            &o,
            "datasetId",
            st.dataset_id
                .map_or(JsValue::NULL, |d| JsValue::from_str(&d.to_string())),
        );
        set(&o, "lagMs", st.lag_ms as f64);
        set(
            &o,
            "lastPollAt",
            st.last_poll_at
                .map_or(JsValue::NULL, |t| JsValue::from_f64(t as f64)),
        );
        set(&o, "state", st.phase.as_str());
        let err = match &st.last_error {
            Some(e) => {
                let x: JsValue = Object::new().into();
                set(&x, "code", e.kind().code());
                set(&x, "message", e.to_string());
                if let Some(obj) = e.object() {
                    set(&x, "object", obj);
                }
                if let Some(l) = e.lsn() {
                    set(&x, "lsn", l as f64);
                }
                x
            }
            None => JsValue::NULL,
        };
        set(&o, "lastError", err);
        set(&o, "requests", st.requests as f64);
        set(&o, "bytesReceived", st.bytes_received as f64);
        o
    }

    /// The whole state at the applied LSN, in walcast's snapshot format, for
    /// persistence (reopen with [`WasmReplica::restore`]).
    pub fn snapshot(&self) -> Uint8Array {
        let r = self.replica.borrow();
        let id = r.dataset_id().unwrap_or(DatasetId([0; 16]));
        Uint8Array::from(snapshot::encode(r.state(), r.applied_lsn(), r.epoch(), id).as_slice())
    }

    /// Calls `cb(first, last)` after each applied run of batches.
    #[wasm_bindgen(js_name = onApplied)]
    pub fn on_applied(&self, cb: Function) {
        self.callbacks.borrow_mut().applied = Some(cb);
    }

    /// Raw mode: calls `cb(lsn, payload)` for each verified record, in order.
    #[wasm_bindgen(js_name = onRecord)]
    pub fn on_record(&self, cb: Function) {
        self.callbacks.borrow_mut().record = Some(cb);
    }

    /// Calls `cb(lsn)` when the state was replaced (bootstrap from a
    /// snapshot, or a new dataset): persisted copies must be rewritten.
    #[wasm_bindgen(js_name = onReset)]
    pub fn on_reset(&self, cb: Function) {
        self.callbacks.borrow_mut().reset = Some(cb);
    }

    /// Number of keys held.
    #[wasm_bindgen(getter)]
    pub fn size(&self) -> f64 {
        self.replica.borrow().state().len() as f64
    }

    /// Test hook: makes the module trap on purpose, so the JS layer's
    /// recovery can be tested without depending on a bug. `"read"`: panics
    /// now, inside a read that holds the state borrowed; `"sync"`: the next
    /// response delivered to a sync panics inside the driver; `"abort"`:
    /// traps now without a panic.
    #[wasm_bindgen(js_name = __testTrap)]
    pub fn test_trap(&self, mode: &str) {
        match mode {
            "read" => {
                let _held = self.replica.borrow();
                panic!("walcast: deliberate test trap in a read");
            }
            "sync" => self.io.borrow_mut().trap_on_delivery = true,
            "abort" => {
                #[cfg(target_arch = "wasm32")]
                core::arch::wasm32::unreachable();
                #[cfg(not(target_arch = "wasm32"))]
                std::process::abort();
            }
            _ => {}
        }
    }
}

/// Benchmark hook: decodes and verifies a whole segment file and applies its
/// KV batches to a fresh state, as a replica does. Returns the number of
/// records applied. Used by `tests/js/bench.mjs` to compare wasm with native
/// on the same bytes.
#[wasm_bindgen(js_name = benchReplay)]
pub fn bench_replay(segment: &[u8]) -> Result<f64, JsValue> {
    let seg =
        walcast_core::segment::decode(segment, None).map_err(|e| js_error(&Error::decode(e)))?;
    let mut state = walcast_core::state::KvState::new();
    let mut n = 0u64;
    for rec in seg.records() {
        let rec = rec.map_err(|e| js_error(&Error::decode(e)))?;
        let ops = walcast_core::batch::decode(rec.payload)
            .map_err(|e| js_error(&Error::decode(e).with_lsn(rec.lsn)))?;
        state.apply(&ops);
        n += 1;
    }
    Ok(n as f64)
}

/// Benchmark hook: builds a state of `n` keys (`user:<7 digits>`) with
/// `value_len`-byte values, in ascending key order (as a snapshot bootstrap
/// or an append-mostly WAL fills it) or shuffled (random updates), and
/// returns `[entries, stateHeapBytes, wasmMemoryBytes]`. Wasm memory only
/// grows, so measure each order in a fresh instance.
#[wasm_bindgen(js_name = benchStateMemory)]
pub fn bench_state_memory(n: u32, value_len: u32, shuffled: bool) -> Array {
    let mut state = walcast_core::state::KvState::new();
    let value = vec![7u8; value_len as usize];
    for i in 0..n {
        let k = if shuffled {
            (u64::from(i) * 7919) % u64::from(n.max(1))
        } else {
            u64::from(i)
        };
        state.put(format!("user:{k:07}").as_bytes(), &value);
    }
    state.compact();
    #[cfg(target_arch = "wasm32")]
    let memory = core::arch::wasm32::memory_size(0) as f64 * 65536.0;
    #[cfg(not(target_arch = "wasm32"))]
    let memory = 0.0;
    let out = Array::new();
    out.push(&(state.len() as f64).into());
    out.push(&(state.heap_bytes() as f64).into());
    out.push(&memory.into());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_lower_is_the_larger_of_prefix_and_start() {
        assert_eq!(scan_lower(b"b", Some(b"a")), b"b");
        assert_eq!(scan_lower(b"b", Some(b"c")), b"c");
        assert_eq!(scan_lower(b"", None), b"");
    }

    #[test]
    fn responses_are_classified_by_status_only() {
        let msg = Some("416 Range Not Satisfiable".to_string());
        assert!(matches!(
            classify(0, "catalog/head.json", None, None, None, msg.clone()),
            GetResponse::Failed { status: None, .. }
        ));
        assert!(matches!(
            classify(503, "catalog/head.json", None, None, None, msg),
            GetResponse::Failed {
                status: Some(503),
                ..
            }
        ));
        assert_eq!(
            classify(416, "k", None, None, None, None),
            GetResponse::RangeNotSatisfiable
        );
        assert!(matches!(
            classify(200, "k", None, None, None, None),
            GetResponse::Failed {
                status: Some(200),
                ..
            }
        ));
        assert_eq!(
            classify(
                206,
                "k",
                Some(vec![1]),
                None,
                Some("bytes 0-0/9".into()),
                None
            ),
            GetResponse::Ok {
                body: vec![1],
                etag: None,
                range: Some(ContentRange {
                    start: 0,
                    end: 1,
                    total: Some(9)
                })
            }
        );
    }
}
