//! # walcast-wasm
//!
//! The read replica for JS runtimes — browsers, Cloudflare Workers, Deno,
//! Node — built on the shared async driver ([`walcast_client::Driver`]) with
//! a fetch seam that calls the runtime's global `fetch` through js-sys, and
//! timers from the global `setTimeout`. One `--target web` build serves every
//! runtime; the `walcast` npm package (`js/`) wraps [`WasmReplica`] in the
//! documented `Replica` API and adds persistence.
//!
//! Bytes cross as `Uint8Array`; errors are JS `Error`s with a stable `code`
//! (the core's [`walcast_core::ErrorKind::code`]) and, when known, the
//! `object` key and `lsn` they concern. A panic is reported on
//! `console.error` before the module traps.

use std::cell::{Cell, RefCell};
use std::ops::Bound;
use std::rc::Rc;

use js_sys::{Array, Function, Object, Promise, Reflect, Uint8Array};
use walcast_client::{Driver, Fetch, RunError, Timer, Until};
use walcast_core::catalog::DatasetId;
use walcast_core::io::{ContentRange, GetRequest, GetResponse};
use walcast_core::replica::{Event, Mode, Replica, ReplicaConfig};
use walcast_core::{snapshot, Error, ErrorKind};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;

fn global() -> JsValue {
    js_sys::global().into()
}

fn get(obj: &JsValue, key: &str) -> JsValue {
    Reflect::get(obj, &JsValue::from_str(key)).unwrap_or(JsValue::UNDEFINED)
}

fn set(obj: &JsValue, key: &str, value: impl Into<JsValue>) {
    let _ = Reflect::set(obj, &JsValue::from_str(key), &value.into());
}

fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let console = get(&global(), "console");
            if let Ok(f) = get(&console, "error").dyn_into::<Function>() {
                let _ = f.call1(
                    &console,
                    &JsValue::from_str(&format!("walcast panicked: {info}")),
                );
            }
        }));
    });
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

/// The runtime's global `fetch`, relative to a base URL.
#[derive(Debug)]
struct JsFetch {
    base: String,
    headers: Vec<(String, String)>,
    /// Whether the runtime accepts `cache: "no-store"` (workerd does not).
    cache_field: Cell<bool>,
}

impl JsFetch {
    async fn call(&self, req: &GetRequest) -> Result<JsValue, JsValue> {
        let url = format!("{}/{}", self.base, req.key);
        let fetch: Function = get(&global(), "fetch").dyn_into()?;
        loop {
            let init = Object::new();
            let headers = Object::new();
            for (k, v) in &self.headers {
                set(&headers, k, v.as_str());
            }
            if let Some(r) = req.range {
                set(&headers, "range", r.to_header());
            }
            if let Some(e) = &req.if_none_match {
                set(&headers, "if-none-match", e.as_str());
            }
            set(&init, "headers", headers);
            if self.cache_field.get() {
                // Our own If-None-Match must reach the server; the HTTP cache
                // must not answer (or revalidate) for us.
                set(&init, "cache", "no-store");
            }
            // AbortSignal.timeout where the runtime has it.
            let abort = get(&global(), "AbortSignal");
            if let Ok(t) = get(&abort, "timeout").dyn_into::<Function>() {
                if let Ok(sig) = t.call1(&abort, &JsValue::from_f64(req.timeout_ms as f64)) {
                    set(&init, "signal", sig);
                }
            }
            let called = fetch.call2(&global(), &JsValue::from_str(&url), &init);
            let res = match called {
                Ok(p) => JsFuture::from(Promise::resolve(&p)).await,
                Err(e) => Err(e),
            };
            match res {
                Err(e) if self.cache_field.get() && format!("{e:?}").contains("cache") => {
                    self.cache_field.set(false);
                }
                other => return other,
            }
        }
    }
}

impl Fetch for JsFetch {
    async fn get(&self, req: GetRequest) -> GetResponse {
        let resp = match self.call(&req).await {
            Ok(r) => r,
            Err(e) => {
                return GetResponse::Failed {
                    status: None,
                    message: format!("fetch {}: {}", req.key, js_message(&e)),
                }
            }
        };
        let status = get(&resp, "status").as_f64().unwrap_or(0.0) as u16;
        let headers = get(&resp, "headers");
        let header = |name: &str| -> Option<String> {
            let f: Function = get(&headers, "get").dyn_into().ok()?;
            f.call1(&headers, &JsValue::from_str(name))
                .ok()?
                .as_string()
        };
        match status {
            200 | 206 => {
                let etag = header("etag");
                let range = if status == 206 {
                    header("content-range").and_then(|v| ContentRange::parse(&v))
                } else {
                    None
                };
                let ab = match get(&resp, "arrayBuffer")
                    .dyn_into::<Function>()
                    .and_then(|f| f.call0(&resp))
                {
                    Ok(p) => JsFuture::from(Promise::resolve(&p)).await,
                    Err(e) => Err(e),
                };
                match ab {
                    Ok(buf) => GetResponse::Ok {
                        body: Uint8Array::new(&buf).to_vec(),
                        etag,
                        range,
                    },
                    Err(e) => GetResponse::Failed {
                        status: Some(status),
                        message: format!("reading {}: {}", req.key, js_message(&e)),
                    },
                }
            }
            304 => GetResponse::NotModified,
            404 | 410 => GetResponse::NotFound,
            416 => GetResponse::RangeNotSatisfiable,
            s => GetResponse::Failed {
                status: Some(s),
                message: format!("GET {}", req.key),
            },
        }
    }
}

fn js_message(e: &JsValue) -> String {
    get(e, "message")
        .as_string()
        .unwrap_or_else(|| format!("{e:?}"))
}

/// `Date.now()` and `setTimeout`.
#[derive(Debug, Clone, Copy)]
struct JsTimer;

/// A `setTimeout` as a future; dropping it (a response won the race)
/// clears the timeout, so no timer outlives its use.
struct Sleep {
    fut: JsFuture,
    id: JsValue,
}

impl std::future::Future for Sleep {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        std::pin::Pin::new(&mut self.fut).poll(cx).map(|_| ())
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Ok(ct) = get(&global(), "clearTimeout").dyn_into::<Function>() {
            let _ = ct.call1(&global(), &self.id);
        }
    }
}

impl Timer for JsTimer {
    fn now_ms(&self) -> u64 {
        js_sys::Date::now() as u64
    }

    fn sleep_until(&self, at_ms: u64) -> impl std::future::Future<Output = ()> {
        let delay = at_ms.saturating_sub(self.now_ms()).min(i32::MAX as u64) as f64;
        let mut id = JsValue::UNDEFINED;
        let p = Promise::new(&mut |resolve, _reject| {
            if let Ok(st) = get(&global(), "setTimeout").dyn_into::<Function>() {
                if let Ok(v) = st.call2(&global(), &resolve, &JsValue::from_f64(delay)) {
                    id = v;
                }
            }
        });
        Sleep {
            fut: JsFuture::from(p),
            id,
        }
    }
}

#[derive(Default)]
struct Callbacks {
    applied: Option<Function>,
    record: Option<Function>,
    reset: Option<Function>,
}

/// A read replica of a walcast dataset, for JS.
#[wasm_bindgen]
pub struct WasmReplica {
    replica: Rc<RefCell<Replica>>,
    fetch: Rc<JsFetch>,
    callbacks: Rc<RefCell<Callbacks>>,
    inflight: Rc<RefCell<Option<Promise>>>,
}

fn parse_options(url: &str, options: &JsValue) -> Result<(ReplicaConfig, JsFetch), JsValue> {
    if url.is_empty() {
        return Err(invalid("the dataset URL is empty"));
    }
    let mut cfg = ReplicaConfig::default();
    let mut headers = Vec::new();
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
        let h = get(options, "headers");
        if h.is_object() {
            for key in Object::keys(h.unchecked_ref::<Object>()).iter() {
                if let Some(k) = key.as_string() {
                    if let Some(v) = get(&h, &k).as_string() {
                        headers.push((k, v));
                    }
                }
            }
        }
    }
    Ok((
        cfg,
        JsFetch {
            base: url.trim_end_matches('/').to_string(),
            headers,
            cache_field: Cell::new(true),
        },
    ))
}

fn seed() -> u64 {
    (js_sys::Math::random() * (u64::MAX as f64)) as u64 ^ js_sys::Date::now() as u64
}

#[wasm_bindgen]
impl WasmReplica {
    /// A replica of the dataset at `url` with no state yet.
    #[wasm_bindgen(constructor)]
    pub fn new(url: &str, options: JsValue) -> Result<WasmReplica, JsValue> {
        install_panic_hook();
        let (cfg, fetch) = parse_options(url, &options)?;
        Ok(Self::with(Replica::new(cfg, seed()), fetch))
    }

    /// A replica resuming from bytes produced by [`WasmReplica::snapshot`].
    pub fn restore(url: &str, options: JsValue, snapshot: &[u8]) -> Result<WasmReplica, JsValue> {
        install_panic_hook();
        let (cfg, fetch) = parse_options(url, &options)?;
        let (h, state) = snapshot::decode(snapshot, None)
            .map_err(|e| js_error(&Error::decode(e).with_object("persisted snapshot")))?;
        let replica = Replica::restore(cfg, seed(), state, h.lsn, h.dataset_id, h.epoch);
        Ok(Self::with(replica, fetch))
    }

    fn with(replica: Replica, fetch: JsFetch) -> WasmReplica {
        WasmReplica {
            replica: Rc::new(RefCell::new(replica)),
            fetch: Rc::new(fetch),
            callbacks: Rc::default(),
            inflight: Rc::default(),
        }
    }

    /// Catches up to the head as of now. Resolves the applied LSN; rejects
    /// with an `Error` whose `code` says what failed (the state stays at its
    /// last good LSN). Concurrent calls share one sync.
    pub fn sync(&self) -> Promise {
        if let Some(p) = self.inflight.borrow().as_ref() {
            return p.clone();
        }
        let replica = self.replica.clone();
        let fetch = self.fetch.clone();
        let callbacks = self.callbacks.clone();
        let inflight = self.inflight.clone();
        let p = wasm_bindgen_futures::future_to_promise(async move {
            let mut driver = Driver::shared(replica, SharedFetch(fetch), JsTimer);
            let result = driver
                .run(
                    Until::CaughtUp,
                    std::future::pending(),
                    |_r, e| -> Result<(), JsValue> {
                        // Clone the callbacks out, so a callback may register others.
                        let cb = {
                            let c = callbacks.borrow();
                            Callbacks {
                                applied: c.applied.clone(),
                                record: c.record.clone(),
                                reset: c.reset.clone(),
                            }
                        };
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
            inflight.borrow_mut().take();
            match result {
                Ok(lsn) => Ok(JsValue::from_f64(lsn as f64)),
                Err(RunError::Replica(e)) => Err(js_error(&e)),
                Err(RunError::Callback(e)) => Err(e),
            }
        });
        *self.inflight.borrow_mut() = Some(p.clone());
        p
    }

    /// The value of `key`, or `undefined`.
    pub fn get(&self, key: &[u8]) -> Option<Uint8Array> {
        self.replica.borrow().state().get(key).map(Uint8Array::from)
    }

    /// Entries in key order: keys starting with `prefix`, at or after
    /// `start`, before `end`; at most `limit` (0: no limit). Returns an array
    /// of `[key, value]` pairs.
    pub fn scan(
        &self,
        prefix: Option<Vec<u8>>,
        start: Option<Vec<u8>>,
        end: Option<Vec<u8>>,
        limit: u32,
    ) -> Array {
        let r = self.replica.borrow();
        let prefix = prefix.unwrap_or_default();
        let lower = match start {
            Some(s) if s > prefix => s,
            _ => prefix.clone(),
        };
        let upper = end.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
        let out = Array::new();
        let limit = if limit == 0 { u32::MAX } else { limit };
        for (k, v) in r.state().range(Bound::Included(&lower), upper) {
            if !k.starts_with(&prefix) {
                break;
            }
            if out.length() >= limit {
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
    /// lastPollAt, state, lastError, requests, bytesReceived }`.
    pub fn status(&self) -> JsValue {
        let st = self.replica.borrow().status(js_sys::Date::now() as u64);
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
}

/// The fetch seam shared between concurrent syncs.
struct SharedFetch(Rc<JsFetch>);

impl Fetch for SharedFetch {
    async fn get(&self, req: GetRequest) -> GetResponse {
        self.0.get(req).await
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
