// The public API of the `walcast` npm package, shared by every runtime entry
// (node.js, web.js, workerd.js). It wraps the wasm-bindgen class WasmReplica
// (crates/walcast-wasm) and adds what is JS-side only: key encoding, the
// background polling loop, change events and persistence (IndexedDB or a
// caller's store). The entries only say where the .wasm comes from.

import initWasm, { WasmReplica } from "./wasm/walcast_wasm.js";
import { indexedDbStore, shouldReplace } from "./idb.js";

export { shouldReplace };

// --- wasm initialisation ------------------------------------------------------

let wasmSource = null; // () => source for wasm-bindgen's init (bytes, Module, URL)
let wasmReady = null;

/** Called by the runtime entry: how to get the module when first needed. */
export function setWasmSource(fn) {
  wasmSource = fn;
}

/**
 * Loads and instantiates the wasm module (once). `Replica.open` calls it; call
 * it yourself to load early, or to pass the module yourself (a
 * `WebAssembly.Module`, the bytes, a `Response`, or a URL).
 */
export function init(source) {
  if (source !== undefined) {
    if (wasmReady) return wasmReady;
    wasmSource = () => source;
  }
  if (!wasmReady) {
    if (!wasmSource) {
      return Promise.reject(walcastError("invalid_input", "walcast: no wasm source; import the package through its runtime entry or call init(source)"));
    }
    wasmReady = Promise.resolve()
      .then(wasmSource)
      .then((s) => initWasm({ module_or_path: s }))
      .then(() => undefined);
    wasmReady.catch(() => {
      wasmReady = null; // let a later call try again
    });
  }
  return wasmReady;
}

// --- helpers ------------------------------------------------------------------

const encoder = new TextEncoder();
const strictUtf8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });
const lenientUtf8 = new TextDecoder("utf-8", { ignoreBOM: true });
const NO_LIMIT = 0xffffffff;
const TOKEN = Symbol("walcast.Replica");

function walcastError(code, message, extra) {
  const e = new Error(message);
  e.name = "WalcastError";
  e.code = code;
  if (extra) Object.assign(e, extra);
  return e;
}

function toBytes(k, what) {
  if (typeof k === "string") return encoder.encode(k);
  if (k instanceof Uint8Array) return k;
  if (ArrayBuffer.isView(k)) return new Uint8Array(k.buffer, k.byteOffset, k.byteLength);
  if (k instanceof ArrayBuffer) return new Uint8Array(k);
  throw walcastError("invalid_input", `walcast: ${what} must be a string or a Uint8Array`);
}

function optBytes(k, what) {
  return k === undefined || k === null ? undefined : toBytes(k, what);
}

/** A scan key: a string when it is valid UTF-8, else the bytes. */
function keyOut(bytes) {
  try {
    return strictUtf8.decode(bytes);
  } catch {
    return bytes;
  }
}

function checkCount(v, name, { min = 0 } = {}) {
  if (v === undefined) return undefined;
  if (typeof v !== "number" || !Number.isFinite(v) || Math.floor(v) !== v || v < min) {
    throw walcastError("invalid_input", `walcast: ${name} must be an integer >= ${min}, got ${String(v)}`);
  }
  return v;
}

function pickStore(persist) {
  if (persist === undefined || persist === null || persist === "memory") return null;
  if (persist === "indexeddb") {
    if (typeof globalThis.indexedDB === "undefined") {
      throw walcastError("invalid_input", 'walcast: persist: "indexeddb" but this runtime has no indexedDB (use "memory")');
    }
    return indexedDbStore;
  }
  if (typeof persist === "object" && typeof persist.load === "function" && typeof persist.save === "function") {
    return persist;
  }
  throw walcastError("invalid_input", 'walcast: persist must be "memory", "indexeddb" or a { load, save } store');
}

// --- Replica ------------------------------------------------------------------

/** A read replica of one dataset (see index.d.ts for the full contract). */
export class Replica {
  #w;
  #url;
  #pollInterval;
  #store;
  #onError;
  #closed = false;
  // background loop
  #running = false;
  #loopGen = 0;
  #timer = null;
  #wake = null;
  // syncs: one at a time; a call during one runs once more after it
  #inflight = null;
  #queued = null;
  // events from wasm, dispatched after the sync that produced them
  #events = [];
  #changeCbs = new Set();
  #resetCbs = new Set();
  // persistence
  #persistedLsn = -1;
  #persistedDataset = null;
  #resetSincePersist = false;
  #persistError = null;

  constructor(token, url, options, w, store, restored) {
    if (token !== TOKEN) {
      throw walcastError("invalid_input", "walcast: use `await Replica.open(url, options)`");
    }
    this.#url = url;
    this.#w = w;
    this.#store = store;
    this.#pollInterval = options.pollInterval ?? 1000;
    this.#onError = typeof options.onError === "function" ? options.onError : null;
    if (restored) {
      this.#persistedLsn = restored.appliedLsn;
      this.#persistedDataset = restored.datasetId ?? null;
    }
    w.onApplied((first, last) => this.#event({ type: "applied", first, last }));
    w.onReset((lsn) => {
      this.#resetSincePersist = true;
      this.#event({ type: "reset", lsn });
    });
    if (typeof options.onRecord === "function") {
      const onRecord = options.onRecord;
      w.onRecord((lsn, payload) => {
        try {
          onRecord(lsn, payload);
        } catch (e) {
          this.#emitError(e);
        }
      });
    }
  }

  /**
   * Opens a replica of the dataset at `url`. With `persist: "indexeddb"` (or a
   * store) the last persisted state is restored first, so reads are served at
   * once, offline too; `sync()` then fetches only what is missing. No network
   * request is made here.
   */
  static async open(url, options = {}) {
    if (url instanceof URL) url = url.href;
    if (typeof url !== "string" || url === "") {
      throw walcastError("invalid_input", "walcast: Replica.open needs the dataset URL as a string");
    }
    if (options === null || typeof options !== "object") {
      throw walcastError("invalid_input", "walcast: options must be an object");
    }
    checkCount(options.pollInterval, "pollInterval");
    checkCount(options.concurrency, "concurrency", { min: 1 });
    if (options.onRecord !== undefined && typeof options.onRecord !== "function") {
      throw walcastError("invalid_input", "walcast: onRecord must be a function");
    }
    const store = pickStore(options.persist);
    await init();
    const wasmOpts = {};
    if (options.pollInterval !== undefined) wasmOpts.pollInterval = options.pollInterval;
    if (options.concurrency !== undefined) wasmOpts.concurrency = options.concurrency;
    if (options.headers !== undefined) wasmOpts.headers = { ...options.headers };
    if (options.raw !== undefined) wasmOpts.raw = !!options.raw;

    let w = null;
    let restored = null;
    if (store) {
      let rec;
      try {
        rec = await store.load(url);
      } catch (e) {
        reportTo(options.onError, e);
      }
      if (rec && rec.snapshot) {
        try {
          w = WasmReplica.restore(url, wasmOpts, toBytes(rec.snapshot, "snapshot"));
          restored = rec;
        } catch (e) {
          // An unreadable copy (another version, damage): start over; the next
          // persisted state replaces it.
          reportTo(options.onError, e);
        }
      }
    }
    if (!w) w = new WasmReplica(url, wasmOpts);
    return new Replica(TOKEN, url, options, w, store, restored);
  }

  /**
   * Opens a replica from bytes of `snapshot()` (persisted however you like):
   * reads are served at once and `sync()` fetches only what is missing.
   */
  static async restore(url, snapshot, options = {}) {
    if (url instanceof URL) url = url.href;
    const { persist: _ignored, ...rest } = options ?? {};
    await init();
    const wasmOpts = {};
    for (const k of ["pollInterval", "concurrency", "headers", "raw"]) {
      if (rest[k] !== undefined) wasmOpts[k] = rest[k];
    }
    const w = WasmReplica.restore(url, wasmOpts, toBytes(snapshot, "snapshot"));
    return new Replica(TOKEN, url, rest, w, null, null);
  }

  /** Number of keys held. */
  get size() {
    this.#open();
    return this.#w.size;
  }

  /** The dataset URL this replica follows. */
  get url() {
    return this.#url;
  }

  /** Catches up to the head as of now; resolves the applied LSN. */
  sync() {
    if (this.#closed) return Promise.reject(closedError());
    if (this.#inflight) {
      // The running sync may have read the head before this call: run once more.
      this.#queued ??= this.#inflight
        .then(noop, noop)
        .then(() => {
          this.#queued = null;
          return this.#closed ? Promise.reject(closedError()) : this.#runSync();
        });
      return this.#queued;
    }
    return this.#runSync();
  }

  #runSync() {
    const p = (async () => {
      try {
        return await this.#w.sync();
      } finally {
        await this.#afterSync();
      }
    })();
    this.#inflight = p;
    const clear = () => {
      if (this.#inflight === p) this.#inflight = null;
    };
    p.then(clear, clear);
    return p;
  }

  /** The value of `key`, or undefined. */
  get(key) {
    this.#open();
    const v = this.#w.get(toBytes(key, "key"));
    return v ?? undefined;
  }

  /** The value of `key` decoded as UTF-8, or undefined. */
  getText(key) {
    const v = this.get(key);
    return v === undefined ? undefined : lenientUtf8.decode(v);
  }

  /** The value of `key` parsed as JSON, or undefined. Throws on invalid JSON. */
  getJSON(key) {
    const t = this.getText(key);
    return t === undefined ? undefined : JSON.parse(t);
  }

  /** Entries in key order: `start` inclusive, `end` exclusive. */
  scan(options = {}) {
    this.#open();
    const { prefix, start, end, limit } = options ?? {};
    checkCount(limit, "limit");
    if (limit === 0) return [];
    const rows = this.#w.scan(
      optBytes(prefix, "prefix"),
      optBytes(start, "start"),
      optBytes(end, "end"),
      limit === undefined ? NO_LIMIT : Math.min(limit, NO_LIMIT),
    );
    const out = new Array(rows.length);
    for (let i = 0; i < rows.length; i++) {
      const [k, v] = rows[i];
      out[i] = { key: keyOut(k), value: v };
    }
    return out;
  }

  /** Where the replica is: LSNs, lag, state, last error, traffic. */
  status() {
    this.#open();
    const s = this.#w.status();
    const lastError = s.lastError ?? null;
    return {
      appliedLsn: s.appliedLsn,
      committedLsn: s.committedLsn,
      epoch: s.epoch,
      datasetId: s.datasetId ?? null,
      lagMs: s.lagMs,
      lastPollAt: s.lastPollAt ?? null,
      state: s.state,
      lastError: lastError ? { code: lastError.code, message: lastError.message } : null,
      requests: s.requests,
      bytesReceived: s.bytesReceived,
      running: this.#running,
      persistError: this.#persistError
        ? { code: this.#persistError.code ?? "persist", message: String(this.#persistError.message ?? this.#persistError) }
        : null,
    };
  }

  /** The whole state at the applied LSN, for `Replica.restore`. */
  snapshot() {
    this.#open();
    return this.#w.snapshot();
  }

  /** Starts background polling: sync, wait `pollInterval` ms, repeat. */
  start() {
    this.#open();
    if (this.#running) return;
    this.#running = true;
    const gen = ++this.#loopGen;
    this.#loop(gen);
  }

  async #loop(gen) {
    const live = () => this.#running && this.#loopGen === gen;
    while (live()) {
      try {
        await this.sync();
      } catch (e) {
        if (!live()) break;
        this.#emitError(e);
      }
      if (!live()) break;
      await new Promise((resolve) => {
        this.#wake = resolve;
        this.#timer = setTimeout(resolve, this.#pollInterval);
      });
      this.#timer = null;
      this.#wake = null;
    }
  }

  /** Stops background polling (a sync in flight finishes). */
  stop() {
    this.#running = false;
    this.#loopGen++;
    if (this.#timer !== null) clearTimeout(this.#timer);
    this.#timer = null;
    const wake = this.#wake;
    this.#wake = null;
    if (wake) wake();
  }

  /** `cb({ first, last })` after each applied LSN range; returns an unsubscribe function. */
  onChange(cb) {
    if (typeof cb !== "function") throw walcastError("invalid_input", "walcast: onChange needs a function");
    this.#changeCbs.add(cb);
    return () => this.#changeCbs.delete(cb);
  }

  /** `cb({ lsn })` when the state was replaced (re-bootstrap, new dataset); returns an unsubscribe function. */
  onReset(cb) {
    if (typeof cb !== "function") throw walcastError("invalid_input", "walcast: onReset needs a function");
    this.#resetCbs.add(cb);
    return () => this.#resetCbs.delete(cb);
  }

  /** Stops polling, waits for a sync in flight, and frees the wasm memory. */
  async close() {
    if (this.#closed) return;
    this.stop();
    this.#closed = true;
    const pending = this.#queued ?? this.#inflight;
    if (pending) await pending.then(noop, noop);
    if (this.#inflight) await this.#inflight.then(noop, noop);
    this.#changeCbs.clear();
    this.#resetCbs.clear();
    this.#w.free();
    this.#w = null;
  }

  // --- internals -------------------------------------------------------------

  #open() {
    if (this.#closed) throw closedError();
  }

  #event(ev) {
    this.#events.push(ev);
    // Events outside a sync (should the wasm side ever apply on its own) are
    // handled at the next turn.
    if (!this.#inflight && this.#events.length === 1) {
      queueMicrotask(() => {
        if (!this.#inflight && !this.#closed) this.#afterSync();
      });
    }
  }

  async #afterSync() {
    if (this.#events.length === 0 || this.#closed && !this.#w) return;
    const events = this.#events.splice(0);
    if (this.#store) {
      try {
        await this.#persist();
        this.#persistError = null;
      } catch (e) {
        this.#persistError = e;
        this.#emitError(e);
      }
    }
    for (const ev of events) {
      if (ev.type === "applied") {
        for (const cb of this.#changeCbs) this.#call(cb, { first: ev.first, last: ev.last });
      } else {
        for (const cb of this.#resetCbs) this.#call(cb, { lsn: ev.lsn });
      }
    }
  }

  async #persist() {
    const s = this.#w.status();
    const lsn = s.appliedLsn;
    const ds = s.datasetId ?? null;
    const replace = this.#resetSincePersist;
    if (!replace && lsn <= this.#persistedLsn && ds === this.#persistedDataset) return;
    const snapshot = this.#w.snapshot();
    await this.#store.save(this.#url, { snapshot, appliedLsn: lsn, datasetId: ds, savedAt: Date.now() }, { replace });
    this.#persistedLsn = lsn;
    this.#persistedDataset = ds;
    this.#resetSincePersist = false;
  }

  #call(cb, arg) {
    try {
      cb(arg);
    } catch (e) {
      this.#emitError(e);
    }
  }

  #emitError(e) {
    reportTo(this.#onError, e);
  }
}

function reportTo(onError, e) {
  if (typeof onError === "function") {
    try {
      onError(e);
    } catch {
      // an error handler that throws has nowhere left to report to
    }
  }
}

function closedError() {
  return walcastError("closed", "walcast: the replica is closed");
}

function noop() {}
