//! # walcast-wasm
//!
//! The read replica for JS runtimes — browsers, Cloudflare Workers, Deno,
//! Node — as a thin binding of the core's replay machine
//! ([`walcast_core::replica::Replica`]). One `--target web` build serves
//! every runtime; the `walcast` npm package (`js/`) wraps [`WasmReplica`] in
//! the documented `Replica` API and adds persistence.
//!
//! The module performs no I/O of its own, runs no futures and holds no JS
//! callbacks across calls. JS drives the machine: [`WasmReplica::step`] runs
//! it until it waits and says when it next wants a step;
//! [`WasmReplica::take_requests`] hands over the GETs it asked for, which JS
//! performs (the runtime's global `fetch`, bodies read as streams and cut at
//! the request's `max_bytes + 1`, see `js/src/http.js`) and hands back
//! with [`WasmReplica::deliver`]. Every GET the machine asks for is answered
//! exactly once (a timeout or network error is an answer too), whoever was
//! waiting: a sync ([`WasmReplica::sync_begin`] /
//! [`WasmReplica::sync_result`]) or a lazy read ([`WasmReplica::get_lazy`],
//! [`WasmReplica::scan_lazy`]) that is pending until the snapshot blocks it
//! needs arrive. So a sync may end while block GETs are in flight, and reads
//! may go on while a sync runs, without the machine ever waiting for an
//! answer nobody will deliver.
//!
//! Every call into the module is a synchronous call from JS: a trap (a
//! panic aborts) surfaces at the caller, never in a detached task, and a
//! trapped instance can be replaced by a fresh one without a callback of the
//! old one ever reaching it.
//!
//! Bytes cross as `Uint8Array`; errors are JS `Error`s with a stable `code`
//! (the core's [`walcast_core::ErrorKind::code`]) and, when known, the
//! `object` key and `lsn` they concern. The module as shipped
//! (`scripts/build-js.sh`) is built with panics as immediate traps, which
//! keeps panic message formatting out of it; a module built with std as
//! shipped (panic=abort) reports a panic on `console.error` (and keeps it
//! for [`take_panic_message`]) before it traps.

mod persist;

use std::cell::RefCell;

use js_sys::{Array, Function, Object, Reflect, Uint8Array};
use walcast_core::catalog::DatasetId;
use walcast_core::error::Quoted;
use walcast_core::io::{
    parse_long_poll, wait_seconds, ContentRange, GetRequest, GetResponse, RequestId, ResponseMeta,
};
use walcast_core::keys::PublicKey;
use walcast_core::replica::{Action, Event, LazyScan, Mode, Read, Replica, ReplicaConfig};
use walcast_core::{snapshot, Error, ErrorKind};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;

#[cfg(not(any(panic = "immediate-abort", walcast_panic_trap)))]
fn global() -> JsValue {
    js_sys::global().into()
}

fn get(obj: &JsValue, key: &str) -> JsValue {
    Reflect::get(obj, &JsValue::from_str(key)).unwrap_or(JsValue::UNDEFINED)
}

fn set(obj: &JsValue, key: &str, value: impl Into<JsValue>) {
    let _ = Reflect::set(obj, &JsValue::from_str(key), &value.into());
}

// The module's allocator: talc, whose code is a quarter of dlmalloc's (std's
// allocator on wasm32; about 1.5 KB of the gzipped module), with the same
// memory for a full replica of 1,000,000 keys (docs/BENCHMARKS.md). It
// grows wasm memory as dlmalloc does and never shrinks it.
#[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
#[global_allocator]
static TALC: talc::wasm::WasmDynamicTalc = talc::wasm::new_wasm_dynamic_allocator();

#[cfg(not(any(panic = "immediate-abort", walcast_panic_trap)))]
thread_local! {
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Reports panics on `console.error` and keeps the message for
/// [`take_panic_message`]. A module built with panics as immediate traps
/// never runs a hook, so it has none (`walcast_panic_trap`: the cfg
/// scripts/wasm-toolchain.sh sets where the compiler predates the
/// `immediate-abort` panic strategy and std's `panic_immediate_abort`
/// feature does the same).
#[cfg(any(panic = "immediate-abort", walcast_panic_trap))]
fn install_panic_hook() {}

/// Reports panics on `console.error` and keeps the message for
/// [`take_panic_message`].
#[cfg(not(any(panic = "immediate-abort", walcast_panic_trap)))]
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
    #[cfg(not(any(panic = "immediate-abort", walcast_panic_trap)))]
    return LAST_PANIC.with(|p| p.try_borrow_mut().ok().and_then(|mut p| p.take()));
    // Panics trap at once in this build: no message is ever kept.
    #[cfg(any(panic = "immediate-abort", walcast_panic_trap))]
    None
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

// --- the machine and its I/O ----------------------------------------------------------

/// Most actions one [`WasmReplica::step`] takes before it hands control back
/// to JS (which steps again at once), so a long catch-up never holds the
/// event loop for long.
const STEP_ACTIONS: usize = 256;

/// Snapshot block bytes a lazy replica caches unless `cacheBytes` says.
const DEFAULT_CACHE_BYTES: u64 = 8 << 20;

/// Where the running sync stands.
enum SyncState {
    /// Waiting for the machine to catch up to a head read after the start.
    Running,
    /// Caught up at this LSN.
    Done(u64),
    /// Failed: the machine's error after its retries, or a callback's.
    Failed(JsValue),
}

/// The GETs between the machine and JS, and the running sync.
#[derive(Default)]
struct Io {
    /// GETs to hand to JS, in the order the machine asked.
    outbox: Vec<GetRequest>,
    /// GETs handed out and not answered yet: request id -> object key.
    inflight: Vec<(u64, String)>,
    sync: Option<SyncState>,
    /// Errors the machine reported while no sync was running (a replica
    /// that follows the head on its own, by long-poll): for
    /// [`WasmReplica::take_errors`].
    errors: Vec<JsValue>,
    /// Test hook: the next delivered response panics.
    trap_on_delivery: bool,
}

#[derive(Default, Clone)]
struct Callbacks {
    applied: Option<Function>,
    record: Option<Function>,
    reset: Option<Function>,
}

/// Lazy scans in progress, by id (they live across calls while blocks are
/// fetched), at most [`MAX_OPEN_SCANS`].
#[derive(Default)]
struct Scans {
    next: u32,
    open: Vec<(u32, LazyScan)>,
}

impl Scans {
    /// Keeps `scan` under a new id, forgetting the least recently stepped
    /// scan (the first) when [`MAX_OPEN_SCANS`] are open.
    fn open(&mut self, scan: LazyScan) -> u32 {
        self.next = self.next.wrapping_add(1);
        let id = self.next;
        self.open.retain(|(i, _)| *i != id);
        if self.open.len() >= MAX_OPEN_SCANS {
            self.open.remove(0);
        }
        self.open.push((id, scan));
        id
    }

    /// Scan `id`, now the most recently stepped (the last forgotten: a
    /// scan whose caller went away is the one that goes).
    fn step(&mut self, id: u32) -> Option<&mut LazyScan> {
        let at = self.open.iter().position(|(i, _)| *i == id)?;
        let stepped = self.open.remove(at);
        self.open.push(stepped);
        self.open.last_mut().map(|(_, s)| s)
    }
}

/// Most lazy scans open at once: opening one more forgets the one least
/// recently stepped (a scan whose caller went away without closing it, as
/// when a Worker's request is torn down while it waits); a step of a
/// forgotten scan fails with "no such scan", and js/src/replica.js then
/// opens it again.
const MAX_OPEN_SCANS: usize = 64;

// --- the replica ----------------------------------------------------------------------

/// A read replica of a walcast dataset, for JS.
#[wasm_bindgen]
pub struct WasmReplica {
    replica: RefCell<Replica>,
    io: RefCell<Io>,
    callbacks: RefCell<Callbacks>,
    scans: RefCell<Scans>,
    persist: RefCell<persist::Persist>,
    lazy: bool,
}

/// A `trust` option of the wrong shape (the JS wrapper checks it first,
/// with a longer message).
const TRUST_SHAPE: &str = "walcast: trust must be one or more \"ed25519:<base64>\" keys";

/// The `trust` option: one `ed25519:<base64>` key or an array of them.
fn parse_trust(v: &JsValue) -> Result<Vec<PublicKey>, JsValue> {
    if v.is_undefined() || v.is_null() {
        return Ok(Vec::new());
    }
    let items: Vec<JsValue> = if Array::is_array(v) {
        Array::from(v).iter().collect()
    } else {
        vec![v.clone()]
    };
    if items.is_empty() {
        return Err(invalid(TRUST_SHAPE));
    }
    items
        .iter()
        .map(|k| {
            let text = k.as_string().ok_or_else(|| invalid(TRUST_SHAPE))?;
            PublicKey::parse(&text).map_err(|e| {
                invalid(&format!(
                    "walcast: trust key {}: {}",
                    Quoted::str(&text),
                    e.message()
                ))
            })
        })
        .collect()
}

fn parse_options(options: &JsValue) -> Result<ReplicaConfig, JsValue> {
    let mut cfg = ReplicaConfig::default();
    if options.is_object() {
        cfg.trust = parse_trust(&get(options, "trust"))?;
        if let Some(p) = get(options, "pollInterval").as_f64() {
            cfg.poll_interval_ms = p.max(0.0) as u64;
        }
        if let Some(c) = get(options, "concurrency").as_f64() {
            cfg.max_inflight = (c as usize).max(1);
        }
        if get(options, "longPoll").as_bool() == Some(false) {
            cfg.long_poll_wait_ms = 0;
        }
        if get(options, "raw").as_bool() == Some(true) {
            cfg.mode = Mode::Raw;
        }
        if get(options, "load").as_string().as_deref() == Some("lazy") {
            let bytes = get(options, "cacheBytes")
                .as_f64()
                .map_or(DEFAULT_CACHE_BYTES, |b| b.max(0.0) as u64);
            cfg.lazy_cache_bytes = Some(bytes);
        }
        // Incremental persistence: collect each applied batch (full KV mode).
        if get(options, "persistLog").as_bool() == Some(true)
            && matches!(cfg.mode, Mode::Kv)
            && cfg.lazy_cache_bytes.is_none()
        {
            cfg.emit_records = true;
        }
    }
    Ok(cfg)
}

fn seed() -> u64 {
    (js_sys::Math::random() * (u64::MAX as f64)) as u64 ^ js_sys::Date::now() as u64
}

fn now_ms() -> u64 {
    js_sys::Date::now() as u64
}

/// The lowest key a scan with `prefix` and `start` can return.
fn scan_lower(prefix: &[u8], start: Option<&[u8]>) -> Vec<u8> {
    match start {
        Some(s) if s > prefix => s.to_vec(),
        _ => prefix.to_vec(),
    }
}

use walcast_core::state::prefix_end_key as prefix_end;

/// The exclusive upper bound of a scan: the lower of `end` and the
/// prefix's end (`None`: unbounded).
fn scan_upper(prefix: &[u8], end: Option<&[u8]>) -> Option<Vec<u8>> {
    match (end, prefix_end(prefix)) {
        (Some(e), Some(p)) => Some(if e < p.as_slice() { e.to_vec() } else { p }),
        (Some(e), None) => Some(e.to_vec()),
        (None, p) => p,
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
    let range = content_range.as_deref().and_then(ContentRange::parse);
    match status {
        0 => failed(None),
        // A partial answer that does not say which part it is: a failure,
        // as the native drivers take it.
        206 if range.is_none() => failed(Some(206)),
        200 | 206 => match body {
            Some(body) => GetResponse::Ok {
                body,
                etag,
                range: range.filter(|_| status == 206),
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

/// A scan of the keys starting with `prefix`, at or after `start`, before
/// `end`, at most `limit` (0: no limit), ending at the entry that brings
/// the keys and values to `max_bytes`.
fn new_scan(
    prefix: Option<Vec<u8>>,
    start: Option<Vec<u8>>,
    end: Option<Vec<u8>>,
    limit: u32,
    max_bytes: u32,
) -> LazyScan {
    let prefix = prefix.unwrap_or_default();
    let lower = scan_lower(&prefix, start.as_deref());
    let upper = scan_upper(&prefix, end.as_deref());
    let limit = if limit == 0 {
        usize::MAX
    } else {
        limit as usize
    };
    LazyScan::new(&lower, upper.as_deref(), limit).max_bytes(max_bytes as usize)
}

fn pairs(rows: Vec<(Vec<u8>, Vec<u8>)>) -> Array {
    let out = Array::new();
    for (k, v) in rows {
        let pair = Array::new();
        pair.push(&Uint8Array::from(k.as_slice()));
        pair.push(&Uint8Array::from(v.as_slice()));
        out.push(&pair);
    }
    out
}

#[wasm_bindgen]
impl WasmReplica {
    /// A replica with no state yet. `options`: `{ pollInterval, concurrency,
    /// raw, load, cacheBytes, trust }`; `load: "lazy"` reads the newest
    /// snapshot lazily, caching at most `cacheBytes` of its blocks; `trust`
    /// (`"ed25519:<base64>"` or an array of them) pins keys: only heads they
    /// sign, and objects those heads bind by digest, are applied (anything
    /// else is an `untrusted` error). A malformed option throws
    /// `invalid_input`.
    #[wasm_bindgen(constructor)]
    pub fn new(options: JsValue) -> Result<WasmReplica, JsValue> {
        install_panic_hook();
        let cfg = parse_options(&options)?;
        let logging = cfg.emit_records;
        Ok(Self::with(Replica::new(cfg, seed()), logging))
    }

    fn with(replica: Replica, logging: bool) -> WasmReplica {
        let lazy = replica.status(0).lazy.is_some();
        WasmReplica {
            replica: RefCell::new(replica),
            io: RefCell::default(),
            callbacks: RefCell::default(),
            scans: RefCell::default(),
            persist: RefCell::new(persist::Persist {
                log: logging.then(persist::AppliedLog::default),
                damage: None,
            }),
            lazy,
        }
    }

    /// A replica resuming from a base snapshot (bytes of
    /// [`WasmReplica::snapshot`]; `chunks` empty to resume from it alone)
    /// with `chunks` of applied records replayed
    /// on top (each a run taken with [`take_log`](Self::take_log), in LSN
    /// order). Full mode only. A damaged base is an error; a damaged or
    /// missing record stops the replay there (see
    /// [`restore_damage`](Self::restore_damage)): the replica then holds the
    /// state at the last good record's LSN and fetches the rest.
    #[wasm_bindgen(js_name = restoreLog)]
    pub fn restore_log(
        options: JsValue,
        base: &[u8],
        chunks: Array,
    ) -> Result<WasmReplica, JsValue> {
        install_panic_hook();
        let cfg = parse_options(&options)?;
        if cfg.lazy_cache_bytes.is_some() {
            return Err(invalid(
                "walcast: a lazy replica holds no whole state (open it with load: \"full\")",
            ));
        }
        let chunks: Vec<Vec<u8>> = chunks
            .iter()
            .map(|c| {
                c.dyn_into::<Uint8Array>()
                    .map(|b| b.to_vec())
                    .map_err(|_| invalid("walcast: persisted log chunks must be Uint8Arrays"))
            })
            .collect::<Result<_, _>>()?;
        let r =
            persist::replay(base, chunks.iter().map(Vec::as_slice)).map_err(|e| js_error(&e))?;
        let logging = cfg.emit_records;
        let replica = Replica::restore(cfg, seed(), r.state, r.lsn, r.dataset_id, r.epoch);
        let w = Self::with(replica, logging);
        w.persist.borrow_mut().damage = r.damage;
        Ok(w)
    }

    /// Why the last [`restore_log`](Self::restore_log) stopped before the
    /// end of the log (an Error with `code`, `object` and `lsn`), or
    /// undefined.
    #[wasm_bindgen(js_name = restoreDamage)]
    pub fn restore_damage(&self) -> JsValue {
        match &self.persist.borrow().damage {
            Some(e) => js_error(e),
            None => JsValue::UNDEFINED,
        }
    }

    /// Incremental persistence (option `persistLog`): the batches applied
    /// since the last call, as `{ first, last, bytes }` (a dense LSN run,
    /// each record framed like a segment record), or undefined when none.
    /// A reset (bootstrap, new dataset) drops what was collected: the state
    /// is then written whole.
    #[wasm_bindgen(js_name = takeLog)]
    pub fn take_log(&self) -> JsValue {
        let chunk = self
            .persist
            .borrow_mut()
            .log
            .as_mut()
            .and_then(persist::AppliedLog::take);
        match chunk {
            Some(c) => {
                let o: JsValue = Object::new().into();
                set(&o, "first", c.first as f64);
                set(&o, "last", c.last as f64);
                set(&o, "bytes", Uint8Array::from(c.bytes.as_slice()));
                o
            }
            None => JsValue::UNDEFINED,
        }
    }

    /// Runs the machine until it waits: queues the GETs it asks for (see
    /// [`take_requests`](Self::take_requests)) and hands its events to the
    /// callbacks and the running sync. Returns when it next wants a step
    /// (ms since the epoch; at or before now: at once), or -1 when only an
    /// answer can move it. Step again after every delivery.
    pub fn step(&self) -> f64 {
        let now = now_ms();
        for _ in 0..STEP_ACTIONS {
            let action = self.replica.borrow_mut().poll(now);
            match action {
                Action::Fetch(req) => {
                    let mut io = self.io.borrow_mut();
                    io.inflight.push((req.id.0, req.key.clone()));
                    io.outbox.push(req);
                }
                Action::Event(e) => self.on_event(e),
                Action::Wait { until } => {
                    return if until == u64::MAX {
                        -1.0
                    } else {
                        until as f64
                    };
                }
            }
        }
        0.0
    }

    /// Incremental persistence: keeps an applied record for
    /// [`take_log`](Self::take_log). False when not collecting.
    fn collect(&self, lsn: u64, payload: &[u8]) -> bool {
        match self.persist.borrow_mut().log.as_mut() {
            Some(log) => {
                log.push(lsn, payload);
                true
            }
            None => false,
        }
    }

    fn on_event(&self, e: Event) {
        if matches!(e, Event::Bootstrapped { .. } | Event::DatasetChanged { .. }) {
            if let Some(log) = self.persist.borrow_mut().log.as_mut() {
                log.clear();
            }
        }
        // Cloned out and no borrow held: a callback may call back in.
        let cb = self.callbacks.borrow().clone();
        let called = match &e {
            Event::Applied { first, last } => cb.applied.as_ref().map(|f| {
                f.call2(
                    &JsValue::NULL,
                    &(*first as f64).into(),
                    &(*last as f64).into(),
                )
            }),
            Event::Record { lsn, payload } if self.collect(*lsn, payload) => None,
            Event::Record { lsn, payload } => cb.record.as_ref().map(|f| {
                f.call2(
                    &JsValue::NULL,
                    &(*lsn as f64).into(),
                    &Uint8Array::from(payload.as_slice()).into(),
                )
            }),
            Event::Bootstrapped { lsn, .. } => cb
                .reset
                .as_ref()
                .map(|f| f.call1(&JsValue::NULL, &(*lsn as f64).into())),
            Event::DatasetChanged { .. } => cb
                .reset
                .as_ref()
                .map(|f| f.call1(&JsValue::NULL, &0.0.into())),
            Event::CaughtUp { lsn } => {
                self.settle(SyncState::Done(*lsn));
                None
            }
            Event::Error(err) => {
                let e = js_error(err);
                let mut io = self.io.borrow_mut();
                if matches!(io.sync, Some(SyncState::Running)) {
                    io.sync = Some(SyncState::Failed(e));
                } else if io.errors.len() < 64 {
                    io.errors.push(e);
                }
                None
            }
            Event::Gap { .. } => None,
        };
        if let Some(Err(e)) = called {
            self.settle(SyncState::Failed(e));
        }
    }

    /// Ends the running sync with `outcome` (the first outcome counts).
    fn settle(&self, outcome: SyncState) {
        let mut io = self.io.borrow_mut();
        if matches!(io.sync, Some(SyncState::Running)) {
            io.sync = Some(outcome);
        }
    }

    /// Starts a sync: catch up to the head as of now. Step the machine and
    /// ask [`sync_result`](Self::sync_result) after each step. A sync
    /// already running is replaced.
    #[wasm_bindgen(js_name = syncBegin)]
    pub fn sync_begin(&self) {
        // The events queued now are taken first, before this sync runs: an
        // error among them (GETs of an earlier sync answered after it
        // ended, an outage's) is not this sync's, and goes to `takeErrors`
        // (or to a sync this one replaces).
        let now = now_ms();
        let queued = self.replica.borrow().queued_events();
        for _ in 0..queued {
            let action = self.replica.borrow_mut().poll(now);
            if let Action::Event(e) = action {
                self.on_event(e);
            }
        }
        self.replica.borrow_mut().sync_now(now);
        self.io.borrow_mut().sync = Some(SyncState::Running);
    }

    /// The running sync's outcome: the applied LSN once caught up,
    /// `undefined` while it runs; throws its error (an `Error` with a
    /// `code`). The sync is over once this returned an LSN or threw.
    #[wasm_bindgen(js_name = syncResult)]
    pub fn sync_result(&self) -> Result<JsValue, JsValue> {
        let mut io = self.io.borrow_mut();
        match io.sync.take() {
            None => Err(invalid("walcast: no sync is running")),
            Some(SyncState::Running) => {
                io.sync = Some(SyncState::Running);
                Ok(JsValue::UNDEFINED)
            }
            Some(SyncState::Done(lsn)) => Ok(JsValue::from_f64(lsn as f64)),
            Some(SyncState::Failed(e)) => Err(e),
        }
    }

    /// Stops waiting for the running sync, if any. Its GETs in flight are
    /// still delivered: the machine expects every answer.
    #[wasm_bindgen(js_name = syncAbort)]
    pub fn sync_abort(&self) {
        self.io.borrow_mut().sync = None;
    }

    /// The GETs to perform now: `[{ id, key, range, ifNoneMatch, wait,
    /// timeoutMs, maxBytes }]` (`range`: a `Range` header value or `null`;
    /// `wait`: for a long-poll of the head, the wait hint in whole seconds,
    /// sent as `Prefer: wait=N` and `?wait=N`, else `null`). Read at most
    /// `maxBytes + 1` bytes of a body, and answer each with
    /// [`deliver`](Self::deliver), within `timeoutMs` (which includes a
    /// long-poll's wait).
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
            set(
                &o,
                "wait",
                r.wait_ms
                    .map_or(JsValue::NULL, |w| JsValue::from_f64(wait_seconds(w) as f64)),
            );
            set(&o, "timeoutMs", r.timeout_ms as f64);
            set(&o, "maxBytes", r.max_bytes as f64);
            out.push(&o);
        }
        out
    }

    /// Whether the replica pins keys (`trust`): only then do responses
    /// need [`signatureChecks`](Self::signature_checks).
    #[wasm_bindgen(getter)]
    pub fn pinned(&self) -> bool {
        self.replica.borrow().pins_keys()
    }

    /// The Ed25519 checks delivering `body`, the answer to the GET of `key`,
    /// needs (none unless the replica pins keys and `key` is the head or a
    /// page): objects `{ id, key, signature, message }` of bytes. The
    /// module carries no Ed25519 code: JS verifies each with WebCrypto and
    /// passes the ids of those that verified to
    /// [`signaturesVerified`](Self::signatures_verified) before it calls
    /// [`deliver`](Self::deliver); a check not confirmed counts as failed.
    #[wasm_bindgen(js_name = signatureChecks)]
    pub fn signature_checks(&self, key: &str, body: &[u8]) -> Array {
        let out = Array::new();
        for c in self.replica.borrow().signature_checks(key, body) {
            let o: JsValue = Object::new().into();
            set(&o, "id", Uint8Array::from(&c.id[..]));
            set(&o, "key", Uint8Array::from(&c.key.to_bytes()[..]));
            set(&o, "signature", Uint8Array::from(&c.signature[..]));
            set(&o, "message", Uint8Array::from(&c.message[..]));
            out.push(&o);
        }
        out
    }

    /// Records checks from [`signatureChecks`](Self::signature_checks) that
    /// verified: their ids, 32 bytes each, one after another.
    #[wasm_bindgen(js_name = signaturesVerified)]
    pub fn signatures_verified(&self, ids: &[u8]) {
        let ids = ids
            .chunks_exact(32)
            .filter_map(|c| <[u8; 32]>::try_from(c).ok());
        self.replica.borrow_mut().signatures_verified(ids);
    }

    /// Hands over the outcome of GET `id`: the HTTP `status` (0 when there
    /// was no response: network error, timeout), the body read (at most
    /// `maxBytes + 1` bytes; `undefined` when reading it failed), the `ETag`
    /// and `Content-Range` headers, what went wrong, if anything, and the
    /// `Walcast-Long-Poll` header (the server holds conditional head GETs;
    /// the machine then long-polls the head). Classified by `status` alone.
    /// Step the machine afterwards.
    // One argument per response field: JS passes them without building an object.
    #[allow(clippy::too_many_arguments)]
    pub fn deliver(
        &self,
        id: f64,
        status: u16,
        body: Option<Vec<u8>>,
        etag: Option<String>,
        content_range: Option<String>,
        message: Option<String>,
        long_poll: Option<String>,
    ) {
        let id = id as u64;
        let key = {
            let mut io = self.io.borrow_mut();
            let Some(key) = io
                .inflight
                .iter()
                .position(|(i, _)| *i == id)
                .map(|at| io.inflight.swap_remove(at).1)
            else {
                return; // not (or no longer) asked for
            };
            if std::mem::take(&mut io.trap_on_delivery) {
                drop(io);
                let _held = self.replica.borrow_mut();
                panic!("walcast: deliberate test trap while handling a response");
            }
            key
        };
        let resp = classify(status, &key, body, etag, content_range, message);
        let meta = ResponseMeta {
            long_poll_max_ms: long_poll.as_deref().and_then(parse_long_poll),
        };
        self.replica
            .borrow_mut()
            .handle_response_with(RequestId(id), now_ms(), resp, meta);
    }

    /// The value of `key`, or `undefined` (full mode).
    pub fn get(&self, key: &[u8]) -> Option<Uint8Array> {
        self.replica.borrow().state().get(key).map(Uint8Array::from)
    }

    /// Entries in key order (full mode): keys starting with `prefix`, at or
    /// after `start`, before `end`; at most `limit` (0: no limit), ending
    /// at the entry that brings the keys and values to `max_bytes`
    /// (`u32::MAX`: no bound). Returns an array of `[key, value]` pairs; empty when the
    /// bounds leave nothing between them (`end` at or before `start`).
    pub fn scan(
        &self,
        prefix: Option<Vec<u8>>,
        start: Option<Vec<u8>>,
        end: Option<Vec<u8>>,
        limit: u32,
        max_bytes: u32,
    ) -> Array {
        let mut scan = new_scan(prefix, start, end, limit, max_bytes);
        match self.replica.borrow_mut().scan_lazy(&mut scan) {
            Ok(Read::Ready(rows)) => pairs(rows),
            _ => Array::new(),
        }
    }

    /// Reads `key` from the state at the applied LSN, in either mode: the
    /// value (`Uint8Array`), `undefined` when absent, or `null` while the
    /// snapshot blocks it needs are being fetched (their GETs are queued:
    /// step, deliver, and ask again). Throws a block's failure once (`data`,
    /// `not_found`, `unavailable`, naming the snapshot).
    #[wasm_bindgen(js_name = getLazy)]
    pub fn get_lazy(&self, key: &[u8]) -> Result<JsValue, JsValue> {
        let read = self.replica.borrow_mut().get_lazy(key);
        match read {
            Ok(Read::Ready(Some(v))) => Ok(Uint8Array::from(v.as_slice()).into()),
            Ok(Read::Ready(None)) => Ok(JsValue::UNDEFINED),
            Ok(Read::Pending) => Ok(JsValue::NULL),
            Err(e) => Err(js_error(&e)),
        }
    }

    /// Starts an ordered scan for [`scan_lazy`](Self::scan_lazy) (bounds,
    /// `limit` and `max_bytes` as for [`scan`](Self::scan)); returns its
    /// id. Close it with [`scan_close`](Self::scan_close).
    #[wasm_bindgen(js_name = scanOpen)]
    pub fn scan_open(
        &self,
        prefix: Option<Vec<u8>>,
        start: Option<Vec<u8>>,
        end: Option<Vec<u8>>,
        limit: u32,
        max_bytes: u32,
    ) -> u32 {
        let scan = new_scan(prefix, start, end, limit, max_bytes);
        self.scans.borrow_mut().open(scan)
    }

    /// Advances scan `id`: an array of `[key, value]` pairs when done,
    /// `null` while blocks are being fetched (as for
    /// [`get_lazy`](Self::get_lazy)); throws a block's failure once.
    #[wasm_bindgen(js_name = scanLazy)]
    pub fn scan_lazy(&self, id: u32) -> Result<JsValue, JsValue> {
        let mut scans = self.scans.borrow_mut();
        let Some(scan) = scans.step(id) else {
            return Err(invalid("walcast: no such scan"));
        };
        let read = self.replica.borrow_mut().scan_lazy(scan);
        match read {
            Ok(Read::Ready(rows)) => Ok(pairs(rows).into()),
            Ok(Read::Pending) => Ok(JsValue::NULL),
            Err(e) => Err(js_error(&e)),
        }
    }

    /// Forgets scan `id`.
    #[wasm_bindgen(js_name = scanClose)]
    pub fn scan_close(&self, id: u32) {
        self.scans.borrow_mut().open.retain(|(i, _)| *i != id);
    }

    /// Progress: `{ mode, appliedLsn, committedLsn, epoch, datasetId, lagMs,
    /// lastPollAt, state, lastError, requests, bytesReceived, cachedBytes,
    /// blocksFetched, overlayBytes, overlayEntries, longPoll }`; `longPoll`
    /// says whether the head is read by long-poll (else polled every
    /// `pollInterval`); `lastError` is
    /// `{ code, message, object?, lsn? }` or `null`; the lazy figures are 0
    /// in full mode.
    pub fn status(&self) -> JsValue {
        let st = self.replica.borrow().status(now_ms());
        let o: JsValue = Object::new().into();
        set(&o, "mode", if self.lazy { "lazy" } else { "full" });
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
        set(
            &o,
            "signer",
            st.signer.map_or(JsValue::NULL, |k| JsValue::from_str(&k)),
        );
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
        let lazy = st.lazy.unwrap_or_default();
        set(&o, "cachedBytes", lazy.cached_bytes as f64);
        set(&o, "blocksFetched", lazy.blocks_fetched as f64);
        set(&o, "overlayBytes", lazy.overlay_bytes as f64);
        set(&o, "overlayEntries", lazy.overlay_entries as f64);
        set(&o, "longPoll", st.long_poll);
        o
    }

    /// The errors the machine reported while no sync was running (it
    /// follows the head on its own between syncs when the server holds
    /// long-polls): `Error`s with a `code`, oldest first; emptied by the
    /// call.
    #[wasm_bindgen(js_name = takeErrors)]
    pub fn take_errors(&self) -> Array {
        let errors = std::mem::take(&mut self.io.borrow_mut().errors);
        errors.into_iter().collect()
    }

    /// The whole state at the applied LSN, in walcast's snapshot format, for
    /// persistence (reopen with [`WasmReplica::restore_log`]). Full mode only: a
    /// lazy replica does not hold the whole state.
    pub fn snapshot(&self) -> Result<Uint8Array, JsValue> {
        if self.lazy {
            return Err(invalid(
                "walcast: a lazy replica holds no whole state (open it with load: \"full\")",
            ));
        }
        let r = self.replica.borrow();
        let id = r.dataset_id().unwrap_or(DatasetId([0; 16]));
        Ok(Uint8Array::from(
            snapshot::encode(r.state(), r.applied_lsn(), r.epoch(), id).as_slice(),
        ))
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

    /// Number of keys held (full mode; a lazy replica does not know it
    /// without reading every block: NaN).
    #[wasm_bindgen(getter)]
    pub fn size(&self) -> f64 {
        if self.lazy {
            return f64::NAN;
        }
        self.replica.borrow().state().len() as f64
    }

    /// Test hook: makes the module trap on purpose, so the JS layer's
    /// recovery can be tested without depending on a bug. `"read"`: panics
    /// now, inside a read that holds the state borrowed; `"sync"`: the next
    /// response delivered panics; `"abort"`: traps now without a panic.
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
#[cfg(feature = "bench-hooks")]
#[wasm_bindgen(js_name = benchReplay)]
pub fn bench_replay(segment: &[u8]) -> Result<f64, JsValue> {
    // The replica's own path: one walk that checks the records and gathers
    // their payloads, then each batch checked and applied.
    let mut payloads = Vec::new();
    walcast_core::segment::decode_with(segment, None, |rec| payloads.push(rec.payload))
        .map_err(|e| js_error(&Error::decode(e)))?;
    let mut state = walcast_core::state::KvState::new();
    for p in &payloads {
        let ops = walcast_core::batch::Batch::parse(p).map_err(|e| js_error(&Error::decode(e)))?;
        state.apply(ops);
    }
    Ok(payloads.len() as f64)
}

/// Benchmark hook: builds a state of `n` keys (`user:<7 digits>`) with
/// `value_len`-byte values, in ascending key order (as a snapshot bootstrap
/// or an append-mostly WAL fills it) or shuffled (random updates), and
/// returns `[entries, stateHeapBytes, wasmMemoryBytes]`. Wasm memory only
/// grows, so measure each order in a fresh instance.
#[cfg(feature = "bench-hooks")]
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
    fn scans_left_open_are_bounded() {
        let mut scans = Scans::default();
        let ids: Vec<u32> = (0..MAX_OPEN_SCANS + 10)
            .map(|_| scans.open(LazyScan::prefix(b"k", 10)))
            .collect();
        assert_eq!(scans.open.len(), MAX_OPEN_SCANS);
        // The oldest went first; the newest are all there.
        let kept: Vec<u32> = scans.open.iter().map(|(i, _)| *i).collect();
        assert_eq!(kept, ids[10..]);
        assert!(scans.step(ids[0]).is_none(), "forgotten");
        // A scan stepped since is kept over one never stepped again.
        assert!(scans.step(ids[10]).is_some());
        scans.open(LazyScan::prefix(b"k", 10));
        let kept: Vec<u32> = scans.open.iter().map(|(i, _)| *i).collect();
        assert!(
            kept.contains(&ids[10]) && !kept.contains(&ids[11]),
            "{kept:?}"
        );
    }

    #[test]
    fn scan_lower_is_the_larger_of_prefix_and_start() {
        assert_eq!(scan_lower(b"b", Some(b"a")), b"b");
        assert_eq!(scan_lower(b"b", Some(b"c")), b"c");
        assert_eq!(scan_lower(b"", None), b"");
    }

    #[test]
    fn scan_upper_is_the_lower_of_end_and_the_prefix_end() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
        assert_eq!(scan_upper(b"user:", None), Some(b"user;".to_vec()));
        assert_eq!(
            scan_upper(b"user:", Some(b"user:5")),
            Some(b"user:5".to_vec())
        );
        assert_eq!(scan_upper(b"user:", Some(b"zzz")), Some(b"user;".to_vec()));
        assert_eq!(scan_upper(b"", Some(b"k")), Some(b"k".to_vec()));
        assert_eq!(scan_upper(b"\xff", None), None);
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
