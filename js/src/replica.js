// The public API of the `walcast` npm package, shared by every runtime entry
// (node.js, web.js, workerd.js). It wraps the wasm-bindgen class WasmReplica
// (crates/walcast-wasm) and adds what is JS-side only: the GETs (the
// runtime's global `fetch`, bodies read as bounded streams), key encoding,
// the background polling loop, change events, persistence (IndexedDB or a
// caller's store), lazy reads (`load: "lazy"`: get/scan return promises and
// wait for the snapshot blocks they need), and recovery from a trap of the
// wasm module. The entries only say where the .wasm comes from.
//
// Traps. Every call into the module is synchronous (JS steps the module,
// performs the GETs it asks for and hands every answer back; see
// crates/walcast-wasm), so a trap (a Rust
// panic aborts; a stack overflow) surfaces at the call. The module instance
// is then poisoned for good (borrows stay taken, its stack is not unwound),
// so it is replaced: every live replica's state is carried over to a fresh
// instance of the same compiled module, and the replica whose call trapped is
// rebuilt from its last good state — its state as it was when a read trapped,
// else its persisted copy, else empty (the next sync fetches the dataset
// again; a lazy replica always starts over: its next read syncs first).
// The call that trapped throws an Error with code "internal".

import * as glue from "./wasm/walcast_wasm.js";
import { indexedDbStore, shouldReplace } from "./idb.js";

const { WasmReplica } = glue;

export { shouldReplace };

// --- errors and helpers ---------------------------------------------------------

const encoder = new TextEncoder();
const strictUtf8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });
const lenientUtf8 = new TextDecoder("utf-8", { ignoreBOM: true });
const NO_LIMIT = 0xffffffff;
const EMPTY = new Uint8Array(0);
const TOKEN = Symbol("walcast.Replica");
/** Test-only: `replica[Symbol.for("walcast.testTrap")](mode)` makes the module trap on purpose. */
const TEST_TRAP = Symbol.for("walcast.testTrap");

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

/** Byte-wise comparison, as keys are ordered. */
function compareBytes(a, b) {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return a[i] - b[i];
  return a.length - b.length;
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

/** Lazy scans one replica keeps open in the module at once (the module keeps 64). */
const MAX_OPEN_SCANS = 48;

/**
 * A lazy scan holding its slot longer than this (ms) is taken for stranded
 * and its slot is given to a waiting scan. A runtime that tears down a
 * request's I/O (Cloudflare Workers, when the request that started a fetch
 * ends) can leave a scan's read never settling; without this, 48 such scans
 * would hold every slot and each later scan would wait forever. A scan that
 * is merely slow keeps going: past MAX_OPEN_SCANS the module forgets the
 * least recently stepped scan, which then opens again.
 */
const SCAN_SLOT_STALE_MS = 120_000;

/**
 * Lazy point reads one replica runs at once; more wait their turn. Every
 * answer to a GET wakes the reads waiting on other reads' GETs, so what one
 * answer costs grows with the reads running: this keeps it bounded however
 * many requests arrive at once.
 */
const MAX_ACTIVE_READS = 32;

/**
 * A server that answers a ranged GET with the whole object (it ignores
 * Range): ranged GETs of the same object this soon after (ms) are answered
 * with that copy instead of another download. The module lets one such GET
 * of an object out at a time, so concurrent reads cost one copy.
 */
const WHOLE_ANSWER_KEEP_MS = 60_000;

/** A point read holding its slot longer than this (ms) is taken for stranded (see SCAN_SLOT_STALE_MS). */
const READ_SLOT_STALE_MS = 120_000;

/**
 * At most `max` holders at once, the rest waiting first come first served.
 * A slot held `staleMs` or longer is taken back: its holder is taken for
 * stranded (a runtime that tore its request's I/O down).
 */
class Slots {
  constructor(max, staleMs) {
    this.max = max;
    this.staleMs = staleMs;
    this.held = new Map(); // slot -> Date.now() when taken
    this.waiters = []; // wake-up functions, first come first
  }

  /** A free slot, once one is free (or stale). `closed()` true: throws closedError. */
  async take(closed) {
    let first = this.waiters.length === 0; // else queue behind the waiters
    for (;;) {
      if (closed()) throw closedError();
      const now = Date.now();
      let oldest = Infinity;
      for (const [slot, at] of this.held) {
        if (now - at >= this.staleMs) this.held.delete(slot);
        else oldest = Math.min(oldest, at);
      }
      // Slots freed by staleness go to those waiting first (a waiter whose
      // own timer a torn-down request never fires is woken here).
      while (this.held.size < this.max && this.waiters.length > 0) {
        const handed = {};
        this.held.set(handed, now);
        this.waiters.shift()(handed);
      }
      if (this.held.size < this.max) {
        const slot = {};
        this.held.set(slot, now);
        return slot;
      }
      // Handed a slot by a release, or woken when the oldest slot turns
      // stale. The timer is this caller's own: a stranded holder's timers
      // may never fire.
      const handed = await new Promise((resolve) => {
        let timer;
        const wake = (slot) => {
          clearTimeout(timer);
          const i = this.waiters.indexOf(wake);
          if (i >= 0) this.waiters.splice(i, 1);
          resolve(slot);
        };
        const wait = Math.max(1, Math.min(oldest + this.staleMs - now, this.staleMs, 2 ** 31 - 1));
        timer = setTimeout(() => wake(null), wait);
        // A waiter that got no slot when woken keeps its place in front.
        if (first) this.waiters.unshift(wake);
        else this.waiters.push(wake);
      });
      if (handed) return handed;
      first = true;
    }
  }

  /** Gives `slot` back; it goes to the first waiter, if any (a stale slot was already given away). */
  release(slot) {
    if (!this.held.delete(slot)) return;
    const next = this.waiters.shift();
    if (next) {
      const handed = {};
      this.held.set(handed, Date.now());
      next(handed);
    }
  }

  /** Wakes every waiter empty-handed (their take() then sees closed). */
  wakeAll() {
    for (const wake of this.waiters.splice(0)) wake(null);
  }
}

/** Default `persistTimeoutMs`: how long one call of the persist store may take. */
const DEFAULT_PERSIST_TIMEOUT_MS = 30_000;

/**
 * `p` (a persist store's call), or a rejection once `ms` pass: a store that
 * never answers (a custom one, an IndexedDB lock held by a stuck tab) fails
 * that call instead of holding up every sync, `start()` and `close()`.
 */
function storeCall(p, method, ms) {
  ms = Math.min(ms, 2 ** 31 - 1); // setTimeout's largest delay (a larger one fires at once)
  let t;
  const late = new Promise((_, reject) => {
    t = setTimeout(() => reject(new Error(`${method} did not settle within ${ms} ms`)), ms);
  });
  return Promise.race([Promise.resolve(p), late]).finally(() => clearTimeout(t));
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

/**
 * A WasmReplica from a persisted record: its snapshot, with its `log`
 * chunks (incremental persistence) replayed on top. Returns `{ w, damage }`:
 * `damage` (an Error) when the replay stopped short of `rec.appliedLsn` (a
 * damaged or missing log record; the replica then holds the last good
 * state before it, and the next sync fetches the rest).
 */
function restoreRecord(wasmOpts, rec, key) {
  const claim = rec.appliedLsn;
  const shown = String(claim).slice(0, 40);
  const snapshot = binary(rec.snapshot);
  if (!snapshot) {
    throw walcastError("data", `walcast: the persisted copy of ${key} (LSN ${shown}) is damaged: its snapshot is not bytes; starting over`, {
      object: "persisted snapshot",
    });
  }
  // What the record claims that its bytes cannot back (checked before any
  // use: a claimed LSN or size is never trusted, nor allocated by).
  let why = null;
  let object = "persisted record";
  if (!Number.isSafeInteger(claim) || claim < 0) why = `its appliedLsn ${shown} is not an LSN`;
  else if (typeof rec.damaged === "string") why = rec.damaged; // the store's own finding (IndexedDB: the record disagrees with its bytes)
  // A whole state (a custom store, layout version 1) has no log.
  let chunks = null;
  if (Array.isArray(rec.log)) {
    chunks = [];
    for (let i = 0; i < rec.log.length; i++) {
      const c = binary(rec.log[i]);
      if (!c) {
        why ??= `persisted log chunk ${i} is not bytes`;
        object = `persisted log chunk ${i}`;
        break; // the replay stops before it
      }
      chunks.push(c);
    }
  }
  let w;
  try {
    w = WasmReplica.restoreLog(wasmOpts, snapshot, chunks ?? []);
  } catch (e) {
    // A damaged base: nothing of the copy is usable. Say whose copy it is.
    if (e?.code !== "data") throw e;
    throw walcastError("data", `walcast: the persisted copy of ${key} (LSN ${shown}) is damaged: ${e.message}; starting over`, {
      object: e.object ?? "persisted snapshot",
      ...(e.lsn !== undefined ? { lsn: e.lsn } : {}),
    });
  }
  let damage = null;
  try {
    const got = w.status().appliedLsn;
    // A key-value replica never opens at an LSN with no keys and no log
    // from the store: older versions kept a raw replica's record (no
    // key-value state) under this same key. An empty state is cheap to
    // fetch again; a raw record read as one would miss every key.
    if (!wasmOpts?.raw && got > 0 && w.size === 0 && !chunks?.some((c) => c.length > 0)) {
      throw walcastError(
        "data",
        `walcast: the persisted copy of ${key} (LSN ${shown}) holds no keys and no log, as a raw replica's record kept under this key by older versions does; starting over from the dataset`,
        { object: "persisted snapshot" },
      );
    }
    const d = chunks ? w.restoreDamage() : undefined;
    if (d || why || (chunks && got < claim)) {
      const text = d ? d.message : (why ?? `its log ends at LSN ${got}`);
      damage = walcastError(
        "data",
        `walcast: the persisted copy of ${key} (LSN ${shown}) is damaged: ${text}; reopened at LSN ${got}, the rest is fetched again`,
        { object: d?.object ?? (why ? object : "persisted log"), lsn: d?.lsn ?? got + 1 },
      );
    }
  } catch (e) {
    w.free();
    throw e;
  }
  return { w, damage };
}

/** Bytes of a persisted value (never a string: a persisted copy holds bytes), or null. */
function binary(v) {
  if (v instanceof Uint8Array) return v;
  if (ArrayBuffer.isView(v)) return new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
  if (v instanceof ArrayBuffer) return new Uint8Array(v);
  return null;
}

/**
 * What a persistence store's `method` threw, as an error naming the store
 * and the dataset (code `persist`; `cause`: what it threw).
 */
function storeError(method, key, e) {
  if (e?.name === "WalcastError") return e;
  const what = e instanceof Error ? `${e.name}: ${e.message}` : String(e);
  return walcastError("persist", `walcast: the persist store's ${method}(${key}) failed: ${what.slice(0, 500)}`, {
    object: `persist store ${method}`,
    cause: e,
  });
}

/** The kinds of GET counted in `status().requestsByKind` and `bytesByKind`. */
const KINDS = ["head", "longPoll", "page", "segment", "snapshot", "delta", "other"];

function zeroKinds() {
  const o = {};
  for (const k of KINDS) o[k] = 0;
  return o;
}

/** Which kind of object a GET reads, from its key (docs/FORMAT.md names them). */
function kindOf(req) {
  const key = req.key;
  if (key === "catalog/head.json") return req.wait != null ? "longPoll" : "head";
  if (key.startsWith("catalog/pages/")) return "page";
  if (key.startsWith("segments/")) return "segment";
  if (key.startsWith("snapshots/")) return "snapshot";
  if (key.startsWith("deltas/")) return "delta";
  return "other";
}

/** An operation (a sync, a lazy read): counts the GETs it started that are not answered yet. */
function newOp() {
  // done: the operation has its outcome and only waits for its GETs.
  return { owned: 0, done: false };
}

/** Whether `e` is the error a trap of the module was reported with (the call that trapped). */
function isTrapError(e) {
  return e?.code === "internal" || e?.code === "closed" || e === RESTART;
}

/**
 * How often at most an operation waiting for progress steps the module on
 * its own timer (and looks for GETs whose answer was lost).
 */
const STEP_EVERY_MS = 1000;
/**
 * Request-scoped I/O (Workers): an operation is woken only by the answers to
 * its own GETs and by its own timer, which then looks this often for what
 * other requests' GETs brought (a promise one request resolves for another
 * may run its continuation in the wrong request).
 */
const SCOPED_POLL_MS = 10;
let scopedIo = false;

/**
 * Called by the workerd entry: I/O belongs to the request that started it,
 * and a request must not be woken by another's promise resolution.
 */
export function setRequestScopedIo(on) {
  scopedIo = !!on;
}
/** A GET not answered this long after its deadline lost its answer (Workers tore its I/O down). */
const LOST_ANSWER_GRACE_MS = 5000;

/** A lazy replica's module reads the head on its own at most this often (sync() reads it whenever called). */
const LAZY_HEAD_INTERVAL_MS = 3_600_000;

/** Snapshot block bytes a lazy replica caches by default. */
const DEFAULT_CACHE_BYTES = 8 * 1024 * 1024;

/** Checks `load` and `cacheBytes`; whether the replica is lazy. */
function checkLoad(options) {
  const load = options.load ?? "full";
  if (load !== "full" && load !== "lazy") {
    throw walcastError("invalid_input", `walcast: load must be "full" or "lazy", got ${String(load)}`);
  }
  checkCount(options.cacheBytes, "cacheBytes");
  if (load === "lazy" && options.raw) {
    throw walcastError("invalid_input", 'walcast: raw mode has no key-value state to read lazily (use load: "full")');
  }
  return load === "lazy";
}

/**
 * Checks the `trust` option: one public key `ed25519:<base64 of 32 bytes>`
 * or a non-empty array of them. Returns the keys as an array (empty: none
 * pinned). Throws `invalid_input`; the module parses each key again.
 */
function trustKeys(trust) {
  if (trust === undefined || trust === null) return [];
  const list = Array.isArray(trust) ? trust : [trust];
  if (list.length === 0) throw walcastError("invalid_input", 'walcast: trust must name at least one key ("ed25519:<base64>")');
  for (const k of list) {
    const b64 = typeof k === "string" && k.startsWith("ed25519:") ? k.slice(8).trim() : null;
    let ok = false;
    if (b64 !== null && /^[A-Za-z0-9+/]{43}=$/.test(b64)) {
      try {
        ok = atob(b64).length === 32;
      } catch {
        ok = false;
      }
    }
    if (!ok) {
      throw walcastError(
        "invalid_input",
        `walcast: trust must be a public key "ed25519:<base64 of 32 bytes>" or an array of them, got ${typeof k === "string" ? JSON.stringify(k) : String(k)}`,
      );
    }
  }
  return list;
}

function wasmOptions(options) {
  const o = {};
  const trust = trustKeys(options.trust);
  if (trust.length) o.trust = trust;
  if (options.pollInterval !== undefined) o.pollInterval = options.pollInterval;
  if (options.concurrency !== undefined) o.concurrency = options.concurrency;
  if (options.raw !== undefined) o.raw = !!options.raw;
  // Incremental persistence: the module collects each applied batch for
  // the store's append (full KV mode; the module ignores it otherwise).
  if (options.persist === "indexeddb" || typeof options.persist?.append === "function") o.persistLog = true;
  // Long-poll only where a held GET may outlive the call that started it
  // (not with request-scoped I/O: a worker's request must not wait on a
  // head read held for another).
  if (options.longPoll === false || scopedIo) o.longPoll = false;
  if (options.load === "lazy") {
    o.load = "lazy";
    o.cacheBytes = options.cacheBytes ?? DEFAULT_CACHE_BYTES;
    // The head is read by sync() (and start()'s loop) only: a read that
    // steps the module fetches the blocks it needs, not the head because
    // the last read of it is old.
    o.pollInterval = LAZY_HEAD_INTERVAL_MS;
  }
  return o;
}

/**
 * A scan's bounds as the module takes them: `{ prefix, start, end, limit }`
 * (limit NO_LIMIT for none), or null when nothing can match (`limit` 0, or
 * `end` at or before the lower bound). Throws `invalid_input`.
 */
function scanBounds(options) {
  const { prefix, start, end, limit, maxBytes } = options ?? {};
  checkCount(limit, "limit");
  checkCount(maxBytes, "maxBytes", { min: 1 });
  const p = optBytes(prefix, "prefix");
  const s = optBytes(start, "start");
  const e = optBytes(end, "end");
  if (limit === 0) return null;
  if (e !== undefined) {
    const lower = s !== undefined && (p === undefined || compareBytes(s, p) > 0) ? s : p ?? EMPTY;
    if (compareBytes(e, lower) <= 0) return null;
  }
  const most = (n) => (n === undefined ? NO_LIMIT : Math.min(n, NO_LIMIT));
  return { prefix: p, start: s, end: e, limit: most(limit), maxBytes: most(maxBytes) };
}

/** The module's `[key, value]` pairs as scan entries. */
function entries(rows) {
  const out = new Array(rows.length);
  for (let i = 0; i < rows.length; i++) {
    const [k, v] = rows[i];
    out[i] = { key: keyOut(k), value: v };
  }
  return out;
}

function textOf(v) {
  return v === undefined ? undefined : lenientUtf8.decode(v);
}

function jsonOf(t) {
  return t === undefined ? undefined : JSON.parse(t);
}

/** The custom fetch of `options.fetch`, or null (the runtime's global fetch, looked up per request). */
function fetchOption(options) {
  const f = options.fetch;
  if (f === undefined || f === null) return null;
  if (typeof f !== "function") throw walcastError("invalid_input", "walcast: fetch must be a function (url, init) => Promise<Response>");
  return f;
}

/**
 * Splits a dataset URL into its base (no trailing slash) and its query
 * string ("" or "?…"): every object's URL is `base/key` followed by the
 * query, so a token in the query travels with every GET.
 */
function splitUrl(url) {
  const hash = url.indexOf("#");
  if (hash >= 0) url = url.slice(0, hash);
  const q = url.indexOf("?");
  const base = (q >= 0 ? url.slice(0, q) : url).replace(/\/+$/, "");
  const query = q >= 0 && q < url.length - 1 ? url.slice(q) : "";
  return { base, query };
}

/**
 * The key a dataset's persisted state is stored under: its URL without the
 * query string, so a token passed in the query (which changes as tokens
 * expire) neither changes the key nor is written to storage. A raw replica
 * (no key-value state) keeps its own record, `#raw` appended: a key-value
 * replica of the same URL must never open at its LSN with none of its keys.
 */
function storeKey(url, wasmOpts) {
  const q = url.search(/[?#]/);
  const base = q >= 0 ? url.slice(0, q) : url;
  return wasmOpts?.raw ? `${base}#raw` : base;
}

function headerList(h) {
  if (h === undefined || h === null) return [];
  if (typeof h !== "object") throw walcastError("invalid_input", "walcast: headers must be an object of strings");
  const out = [];
  for (const [k, v] of Object.entries(h)) if (typeof v === "string") out.push([k, v]);
  return out;
}

const weak = typeof WeakRef === "function" ? (o) => new WeakRef(o) : (o) => ({ deref: () => o });

// --- the wasm module: one compiled module, a replaceable instance ------------------

let wasmSource = null; // () => source: a WebAssembly.Module, bytes, a Response, or a URL
let wasmReady = null;

/**
 * The instance the wasm-bindgen glue calls. The glue keeps one `wasm`
 * object for good; it is `engine.shim`, whose properties are the current
 * instance's exports, so a fresh instance is swapped in underneath it.
 */
const engine = {
  module: null,
  imports: null, // the glue's import object (captured while it initialises)
  shim: null,
  exports: null, // the current instance's exports
  replaceable: false, // false when the glue could not be set up this way
  pending: null, // an asynchronous replacement in progress
  poisoned: false, // a trap's instance is still installed: no fresh one came yet
};

// Test-only faults, armed through the trap hook: the next re-instantiations
// of the module, or constructions of a WasmReplica in a rebuild, fail.
const testFaults = { instantiate: 0, construct: 0 };
function testFault(kind) {
  if (testFaults[kind] > 0) {
    testFaults[kind]--;
    throw new Error(`walcast test: the ${kind} fails`);
  }
}

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
      .then(compile)
      .then(start);
    wasmReady.catch(() => {
      wasmReady = null; // let a later call try again
    });
  }
  return wasmReady;
}

async function compile(src) {
  src = await src;
  if (src instanceof WebAssembly.Module) return src;
  if (typeof src === "string" || (typeof URL === "function" && src instanceof URL) || (typeof Request === "function" && src instanceof Request)) {
    src = await fetch(src);
  }
  if (typeof Response === "function" && src instanceof Response) {
    if (!src.ok) throw walcastError("unavailable", `walcast: loading the wasm module: HTTP ${src.status}`);
    const type = src.headers.get("content-type") ?? "";
    if (typeof WebAssembly.compileStreaming === "function" && type.split(";")[0].trim() === "application/wasm") {
      return WebAssembly.compileStreaming(src);
    }
    return WebAssembly.compile(await src.arrayBuffer());
  }
  if (src instanceof ArrayBuffer || ArrayBuffer.isView(src)) return WebAssembly.compile(src);
  throw walcastError("invalid_input", "walcast: the wasm source must be a WebAssembly.Module, bytes, a Response or a URL");
}

async function start(module) {
  engine.module = module;
  if (!engine.imports) captureImports(module);
  if (engine.imports) {
    engine.replaceable = true;
    install((await WebAssembly.instantiate(module, engine.imports)).exports);
  } else {
    // The glue was set up by someone else (or the runtime froze WebAssembly):
    // its one instance for good (after a trap, replicas are rebuilt in it).
    engine.exports = await glue.default({ module_or_path: module });
  }
}

/**
 * Lets the glue set itself up with `engine.shim` as its instance: its
 * initSync constructs `new WebAssembly.Instance(module, imports)`, which here
 * only hands over the import object.
 */
function captureImports(module) {
  const shim = { __wbindgen_start() {} };
  const Real = WebAssembly.Instance;
  let imports = null;
  try {
    WebAssembly.Instance = function Instance(_module, importObject) {
      imports = importObject;
      return { exports: shim };
    };
    if (WebAssembly.Instance !== Real) glue.initSync({ module });
  } catch {
    // not replaceable here
  } finally {
    if (WebAssembly.Instance !== Real) WebAssembly.Instance = Real;
  }
  if (imports) {
    engine.imports = imports;
    engine.shim = shim;
  }
}

const RealInstance = WebAssembly.Instance;

/** Makes `exports` the instance behind the glue. */
function install(exports) {
  const old = engine.exports;
  Object.assign(engine.shim, exports);
  engine.exports = exports;
  // The glue caches views of the old memory; detaching its buffer makes it
  // take new ones from the fresh instance's memory.
  if (old && old.memory && old.memory !== exports.memory) {
    try {
      old.memory.grow(0);
    } catch {
      // nothing else holds it
    }
  }
  if (typeof exports.__wbindgen_start === "function") exports.__wbindgen_start();
}

// Every live WasmReplica, so a replacement reaches them all. A handle holds
// its WasmReplica strongly until it is freed or retired, so wasm-bindgen's
// own finalizer never frees one behind our back (after a replacement it
// would free a pointer of the old instance in the new one).
const handles = new Set(); // { w, dead, owner: WeakRef<Replica> }
const finalizer =
  typeof FinalizationRegistry === "function" ? new FinalizationRegistry((slot) => releaseHandle(slot.h)) : null;

function releaseHandle(h) {
  if (!h || h.dead) return;
  h.dead = true;
  handles.delete(h);
  try {
    h.w.free();
  } catch {
    // a poisoned object: dropped with its instance
  }
}

function isTrap(e) {
  // A trap (unreachable, out-of-bounds access, ...), or a stack overflow /
  // failed memory growth inside the module.
  return e instanceof WebAssembly.RuntimeError || e instanceof RangeError || e?.name === "InternalError";
}

function panicMessage() {
  try {
    return glue.takePanicMessage() ?? null;
  } catch {
    return null;
  }
}

/**
 * Replaces the poisoned instance after a trap in a call of `culprit` (a
 * handle; `kind` "read" when the call only read the state). Returns the
 * Error the trapped call throws.
 */
function recoverFromTrap(cause, culprit, kind) {
  const panic = panicMessage();
  const what = panic ? `it panicked: ${panic.split("\n").slice(-1)[0]}` : `${cause?.name ?? "Error"}: ${cause?.message ?? cause}`;
  const err = walcastError("internal", `walcast: the wasm module trapped (${what}); the replica was rebuilt`, { cause });
  // Carry each replica's state over: a snapshot of every state that no
  // trapped call was changing.
  const moves = [];
  for (const h of [...handles]) {
    const owner = h.owner.deref();
    let snapshot = null;
    if (owner && (h !== culprit || kind === "read")) {
      try {
        snapshot = h.w.snapshot();
      } catch {
        snapshot = null;
      }
    }
    h.dead = true;
    handles.delete(h);
    try {
      h.w.__destroy_into_raw(); // its instance goes away whole
    } catch {
      // already detached
    }
    if (owner) moves.push({ owner, snapshot, culprit: h === culprit });
  }
  const finish = (first) => {
    for (const m of moves) m.owner[REBUILD](m.snapshot, first && m.culprit ? err : null, "rebuilt");
  };
  if (!engine.replaceable) {
    // No fresh instance to be had (the glue was set up elsewhere): new
    // objects in the old one. Their own borrows are fresh; what the trapped
    // call left behind stays allocated.
    finish(true);
    return err;
  }
  engine.poisoned = true;
  let exports = null;
  try {
    testFault("instantiate");
    exports = new RealInstance(engine.module, engine.imports).exports;
  } catch {
    exports = null; // e.g. synchronous instantiation not allowed here
  }
  if (exports) {
    install(exports);
    engine.poisoned = false;
    finish(true);
  } else {
    for (const m of moves) m.owner[REBUILD](m.snapshot, m.culprit ? err : null, "pending");
    // When this fails too, each replica tries again on its next sync
    // (ensureEngine): none is left without a module for good.
    reinstantiate().then(() => finish(false), noop);
  }
  return err;
}

/** A fresh instance of the module, asynchronously (engine.pending until it is installed or failed). */
function reinstantiate() {
  const p = (async () => {
    testFault("instantiate");
    const inst = await WebAssembly.instantiate(engine.module, engine.imports);
    install(inst.exports);
    engine.poisoned = false;
  })();
  engine.pending = p;
  const clear = () => {
    if (engine.pending === p) engine.pending = null;
  };
  p.then(clear, clear);
  return p;
}

/**
 * Waits for the fresh instance a trap asked for; when none is coming (the
 * last try failed), tries again. Rejects when this try fails.
 */
function ensureEngine() {
  if (engine.pending) return engine.pending;
  if (engine.poisoned && engine.replaceable) return reinstantiate();
  return null;
}

/** ensureEngine for a new replica: never one in a trap's instance when a fresh one can be had. */
async function readyEngine() {
  // A try started elsewhere (the trap's own) that fails gets one of ours.
  let theirs = Boolean(engine.pending);
  for (;;) {
    try {
      await ensureEngine();
      return;
    } catch (e) {
      if (theirs) {
        theirs = false;
        continue;
      }
      throw walcastError("internal", `walcast: the wasm module could not be instantiated again after a trap (${e?.message ?? e}); try again`, { cause: e });
    }
  }
}

/** Runs `fn(w)` on the handle's WasmReplica; a trap replaces the instance and throws code "internal". */
function call(h, kind, fn) {
  if (!h || h.dead) {
    throw walcastError("unavailable", "walcast: the replica is being rebuilt after an internal error; try again");
  }
  try {
    return fn(h.w);
  } catch (e) {
    if (!isTrap(e)) throw e;
    throw recoverFromTrap(e, h, kind);
  }
}

/** A new WasmReplica (`fn` constructs it); a trap while constructing also replaces the instance. */
function construct(fn) {
  // Never in a trapped instance, nor in one about to be replaced (its
  // pointer would point into the fresh instance's memory, at nothing).
  if (engine.pending || engine.poisoned) {
    throw walcastError("unavailable", "walcast: the wasm module is being replaced after an internal error; try again");
  }
  try {
    return fn();
  } catch (e) {
    if (!isTrap(e)) throw e;
    throw recoverFromTrap(e, null, "read");
  }
}

// --- Signatures --------------------------------------------------------------------

/**
 * Makes the Ed25519 checks a response needs before the module sees it: the
 * module carries no Ed25519 code, so a replica that pins keys has the
 * runtime's WebCrypto verify the head's and pages' signatures, and hands the
 * module the ids of the checks that held (`signatureChecks`,
 * `signaturesVerified`). A check that fails, or a runtime whose WebCrypto
 * lacks Ed25519, confirms nothing: the module then refuses the object as
 * not signed by a trusted key (code `untrusted`). Never throws.
 */
async function verifySignatures(h, req, res) {
  const key = req.key;
  if (!res.body || (key !== "catalog/head.json" && !key.startsWith("catalog/pages/"))) return;
  try {
    if (!h || h.dead || !h.w.pinned) return;
    const checks = call(h, "sync", (w) => w.signatureChecks(key, res.body));
    if (!checks.length) return;
    const held = await Promise.all(checks.map(ed25519Verify));
    const ids = new Uint8Array(32 * held.filter(Boolean).length);
    let at = 0;
    checks.forEach((c, i) => {
      if (held[i]) ids.set(c.id, 32 * at++);
    });
    if (at && !h.dead) call(h, "sync", (w) => w.signaturesVerified(ids));
  } catch {
    // A trap rebuilt the module (the answer goes nowhere), or WebCrypto
    // failed: nothing confirmed.
  }
}

/** WebCrypto's Ed25519 (RFC 8032) over one check; false when it fails or is missing. */
async function ed25519Verify(c) {
  try {
    const subtle = globalThis.crypto.subtle;
    const key = await subtle.importKey("raw", c.key, { name: "Ed25519" }, false, ["verify"]);
    return await subtle.verify({ name: "Ed25519" }, key, c.signature, c.message);
  } catch {
    return false;
  }
}

// --- GETs ------------------------------------------------------------------------

let cacheField; // whether fetch takes `cache: "no-store"` (older workerd does not)
function cacheFieldSupported() {
  if (cacheField === undefined) {
    try {
      new Request("http://127.0.0.1/", { cache: "no-store" });
      cacheField = true;
    } catch {
      cacheField = false;
    }
  }
  return cacheField;
}

function errorText(e) {
  return `${e?.name ?? "Error"}: ${e?.message ?? e}`;
}

/**
 * Reads at most `limit` bytes of `res`'s body, as a stream: it stops there
 * and cancels the rest, whatever Content-Length claims.
 */
async function readBounded(res, limit) {
  if (!res.body) return EMPTY;
  const reader = res.body.getReader();
  const chunks = [];
  let total = 0;
  let complete = false;
  try {
    while (total < limit) {
      const { done, value } = await reader.read();
      if (done) {
        complete = true;
        break;
      }
      const room = limit - total;
      const chunk = value.byteLength > room ? value.subarray(0, room) : value;
      chunks.push(chunk);
      total += chunk.byteLength;
    }
  } finally {
    if (!complete) reader.cancel().catch(() => {});
  }
  if (chunks.length === 1) return chunks[0];
  const out = new Uint8Array(total);
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.byteLength;
  }
  return out;
}

/**
 * A head stored gzip-compressed (`--head-encoding gzip`) that reached us
 * as stored (a server that does not label it, file storage behind a plain
 * HTTP server): decoded here, at most `limit` bytes of it, as the module
 * reads JSON only. An HTTP client that decodes Content-Encoding hands over
 * JSON already. A stream that does not decode is handed over as it came,
 * and the module refuses it as a data error naming the head.
 */
async function gunzipHead(body, limit) {
  if (body.byteLength < 2 || body[0] !== 0x1f || body[1] !== 0x8b || typeof DecompressionStream !== "function") return body;
  try {
    const json = await readBounded({ body: new Response(body).body.pipeThrough(new DecompressionStream("gzip")) }, limit);
    // One member and nothing after it, as native readers take it: some
    // runtimes skip zero bytes after a stream or join further members,
    // which leaves the stored trailer's length (ISIZE) not the one decoded.
    const n = body.byteLength;
    const isize = (body[n - 4] | (body[n - 3] << 8) | (body[n - 2] << 16) | (body[n - 1] << 24)) >>> 0;
    return json.byteLength < limit && isize !== json.byteLength % 2 ** 32 ? body : json;
  } catch {
    return body;
  }
}

/**
 * Performs one GET the module asked for; resolves `{ status, body, etag,
 * contentRange, message }` (status 0: no response), never rejects, and
 * always within `req.timeoutMs` (even when a custom fetch ignores the abort
 * signal): the module waits for an answer to every GET it asked for.
 */
function performGet(io, req, ac) {
  let timer;
  const deadline = new Promise((resolve) => {
    timer = setTimeout(() => {
      ac.abort();
      resolve({ status: 0, message: `no answer within ${req.timeoutMs} ms` });
    }, req.timeoutMs);
  });
  return Promise.race([fetchOnce(io, req, ac), deadline]).finally(() => clearTimeout(timer));
}

async function fetchOnce(io, req, ac) {
  let status = 0;
  try {
    const h = {};
    let own = 0; // headers of the caller's (credentials, perhaps)
    for (const [k, v] of io.headers) (h[k] = v), own++;
    if (req.range) h.range = req.range;
    if (req.ifNoneMatch) h["if-none-match"] = req.ifNoneMatch;
    // A long-poll: the wait hint as RFC 7240 asks and in the query (for caches to key on).
    if (req.wait != null) h.prefer = `wait=${req.wait}`;
    const init = { headers: h, signal: ac.signal };
    // Our own If-None-Match must reach the server; no HTTP cache may answer for us.
    if (cacheFieldSupported()) init.cache = "no-store";
    // With the caller's headers (an API key, a CDN's secret), redirects are
    // followed by hand and only within the origin, as the native replica
    // does: a hostile or misconfigured Location must not receive them.
    if (own) init.redirect = "manual";
    // The global fetch is looked up on every request, so a caller may wrap or replace it.
    let url = `${io.base}/${req.key}${io.query}`;
    if (req.wait != null) url += `${io.query ? "&" : "?"}wait=${req.wait}`;
    let res = await (io.fetch ? io.fetch(url, init) : globalThis.fetch(url, init));
    for (let hops = 0; own && (res.type === "opaqueredirect" || (res.status >= 300 && res.status < 400 && res.status !== 304)); hops++) {
      if (res.body) res.body.cancel().catch(() => {});
      const location = res.headers.get("location");
      const next = location == null ? null : new URL(location, url);
      if (!next || next.origin !== new URL(url).origin || hops === 5) {
        const why = !next ? "a redirect whose target the runtime does not show" : hops === 5 ? "more than 5 redirects" : `a redirect to another origin (${next.origin})`;
        return { status: 0, message: `${why}, not followed: the replica's headers would go with it` };
      }
      url = next.href;
      res = await (io.fetch ? io.fetch(url, init) : globalThis.fetch(url, init));
    }
    status = res.status;
    // Whether the server holds long-polls (each head answer says afresh).
    const longPoll = res.headers.get("walcast-long-poll");
    if (status !== 200 && status !== 206) {
      if (res.body) res.body.cancel().catch(() => {});
      return { status, longPoll };
    }
    let body = await readBounded(res, req.maxBytes + 1);
    if (req.key === "catalog/head.json") body = await gunzipHead(body, req.maxBytes + 1);
    const contentRange = res.headers.get("content-range");
    // (The module refuses a 206 whose Content-Range it cannot parse; this says why.)
    const message = status === 206 ? `a 206 answer without a valid Content-Range (${contentRange ?? "none"})` : undefined;
    return { status, body, etag: res.headers.get("etag"), contentRange, longPoll, message };
  } catch (e) {
    const message = ac.signal.aborted ? `no answer within ${req.timeoutMs} ms` : errorText(e);
    return { status, message: status ? `reading the body: ${message}` : message };
  }
}

// --- Replica ------------------------------------------------------------------

const RESTART = Symbol("restart"); // the instance was replaced under a running sync
const REBUILD = Symbol("walcast.rebuild");

/** A read replica of one dataset (see index.d.ts for the full contract). */
export class Replica {
  #slot = { h: null }; // the current handle (replaced after a trap)
  #url;
  #io; // { base, query, headers, fetch }: how GETs are made
  #wasmOpts;
  #onRecordFn = null;
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
  // the module's GETs, and who waits for them
  #gets = new Map(); // request id -> { ac, op, held, deadline } (of the current handle)
  // Long-polls of the head the module asked for (id -> the entry in #gets,
  // or null when not performed or aborted): the server may hold them for
  // long, so no operation waits for them; the next sync abandons them.
  #held = new Map();
  // The last whole object a server sent for a ranged GET (it ignores
  // Range): later ranged GETs of that key within WHOLE_ANSWER_KEEP_MS take
  // it instead of downloading it again. { key, res, at } or null.
  #wholeAnswer = null;
  #unsent = 0; // long-polls the module counted but that were never sent (no start())
  #requestsByKind = zeroKinds(); // GETs sent, by kind of object
  #bytesByKind = zeroKinds(); // body bytes received, by kind of object
  #waiters = []; // { resolve, reject }: woken by the next answer or timer
  #nextStep = -1; // when the module next wants a step (ms; -1: only an answer moves it)
  // lazy mode
  #lazy = false;
  #lazyReady = false; // a sync succeeded since the replica was (re)built
  // events from wasm, dispatched after the sync that produced them
  #events = [];
  #changeCbs = new Set();
  #resetCbs = new Set();
  // persistence
  #persistedLsn = -1;
  #persistedDataset = null;
  #resetSincePersist = false;
  #persistError = null;
  #persistRepair = false; // the persisted copy was damaged: rewrite it whole
  #persistRepairOf = undefined; // the appliedLsn that damaged copy claimed
  #persistWhole = false; // records were lost (a failed write): write the next state whole
  // recovery from traps
  #recoveries = 0;
  #trapError = null;
  #reloading = null;
  #scanSlots = new Slots(MAX_OPEN_SCANS, SCAN_SLOT_STALE_MS); // lazy scans open in the module
  #readSlots = new Slots(MAX_ACTIVE_READS, READ_SLOT_STALE_MS); // lazy point reads running
  #testHangScans = 0; // test-only: this many next scans never settle (a torn-down request's I/O)
  #testFailRebuild = false; // test-only: the next rebuild makes no WasmReplica (restore and construct fail)
  #persistTimeoutMs = DEFAULT_PERSIST_TIMEOUT_MS;
  #carried = null; // the state a trap carried over, while the new instance is pending
  #storeBusy = null; // a store call that outlived persistTimeoutMs and has not settled yet

  constructor(token, url, options, w, store, restored) {
    if (token !== TOKEN) {
      throw walcastError("invalid_input", "walcast: use `await Replica.open(url, options)`");
    }
    this.#url = url;
    this.#io = { ...splitUrl(url), headers: headerList(options.headers), fetch: fetchOption(options) };
    this.#wasmOpts = wasmOptions(options);
    this.#store = store;
    this.#persistTimeoutMs = options.persistTimeoutMs ?? DEFAULT_PERSIST_TIMEOUT_MS;
    // setTimeout's largest delay: a larger one fires at once (a tight loop).
    this.#pollInterval = Math.min(options.pollInterval ?? 1000, 2 ** 31 - 1);
    this.#lazy = options.load === "lazy";
    this.#onError = typeof options.onError === "function" ? options.onError : null;
    if (typeof options.onRecord === "function") this.#onRecordFn = options.onRecord;
    if (restored) {
      this.#persistedLsn = restored.appliedLsn;
      this.#persistedDataset = restored.datasetId ?? null;
      this.#persistRepair = !!restored.damaged;
      this.#persistRepairOf = restored.damaged ? restored.repairOf : undefined;
    }
    this.#attach(w);
    if (finalizer) finalizer.register(this, this.#slot, this.#slot);
  }

  /** Wires a WasmReplica to this replica. Callbacks hold the replica weakly (it may be collected). */
  #attach(w) {
    // GETs of the replaced WasmReplica are not delivered to this one.
    this.#abortGets();
    this.#unsent = 0;
    if (this.#waiters.length && !scopedIo) queueMicrotask(() => this.#wakeWaiters());
    const ref = weak(this);
    const h = { w, dead: false, owner: ref };
    handles.add(h);
    this.#slot.h = h;
    w.onApplied((first, last) => ref.deref()?.#event({ type: "applied", first, last }));
    w.onReset((lsn) => {
      const r = ref.deref();
      if (!r) return;
      r.#resetSincePersist = true;
      r.#event({ type: "reset", lsn });
    });
    if (this.#onRecordFn) {
      const onRecord = this.#onRecordFn;
      w.onRecord((lsn, payload) => {
        try {
          onRecord(lsn, payload);
        } catch (e) {
          ref.deref()?.#emitError(e);
        }
      });
    }
  }

  /**
   * The instance was replaced: take up a WasmReplica in the fresh one, from
   * `snapshot` (the state carried over) or empty. `err` is set for the
   * replica whose call trapped.
   */
  [REBUILD](snapshot, err, how) {
    if (err) {
      this.#recoveries++;
      this.#trapError = err;
    }
    if (this.#closed) return;
    if (how !== "rebuilt") {
      // The state carried over, kept until the new instance is ready (a
      // revival before the trap's own try rebuilds from it too).
      this.#carried = snapshot;
      this.#slot.h = null; // "pending": attached when the new instance is ready
      this.#lazyReady = false;
      this.#abortGets();
      // Deferred: the call that trapped reports its error to its waiters first.
      if (!scopedIo) queueMicrotask(() => this.#wakeWaiters());
      return;
    }
    snapshot ??= this.#carried;
    // Put back below if no replica can be built yet: the next sync's
    // revival restores from it then.
    this.#carried = null;
    // Plain calls here: a fresh instance that traps at once is not replaced again.
    let w = null;
    const failRebuild = this.#testFailRebuild;
    this.#testFailRebuild = false;
    if (snapshot) {
      try {
        if (failRebuild) throw new Error("walcast test: the restore fails");
        w = WasmReplica.restoreLog(this.#wasmOpts, snapshot, []);
      } catch {
        w = null;
      }
    }
    const empty = !w;
    try {
      if (!w) testFault("construct");
      if (failRebuild) throw new Error("walcast test: the construct fails");
      w ??= new WasmReplica(this.#wasmOpts);
    } catch (e) {
      // No replica in the fresh instance: the next sync tries again (#revive).
      this.#carried = snapshot ?? null;
      this.#slot.h = null;
      this.#lazyReady = false;
      this.#emitError(e);
      return;
    }
    this.#attach(w);
    if (empty) {
      // The state is gone with the instance: start over from the persisted
      // copy, else from the dataset (the next sync; a lazy replica's next
      // read syncs first). A persisted copy is never overwritten with the
      // empty state (no #resetSincePersist).
      this.#lazyReady = false;
      this.#events.push({ type: "reset", lsn: 0 });
      if (this.#store) this.#reloading = this.#reload().finally(() => (this.#reloading = null));
      if (!this.#inflight) queueMicrotask(() => this.#afterSync());
    }
  }

  /** After a trap: restores the persisted copy into the (empty) rebuilt replica. */
  async #reload() {
    let rec;
    try {
      rec = await storeCall(this.#store.load(storeKey(this.#url, this.#wasmOpts)), "load", this.#persistTimeoutMs);
    } catch (e) {
      this.#emitError(storeError("load", storeKey(this.#url, this.#wasmOpts), e));
      return;
    }
    if (this.#closed || !rec || !rec.snapshot) return;
    // A trap during the load may be replacing the instance: restore into the
    // fresh one; a replica left without one reloads when it is rebuilt.
    try {
      await readyEngine();
    } catch {
      return;
    }
    const h = this.#slot.h;
    if (!h || h.dead || this.#closed) return;
    let w;
    try {
      if (call(h, "read", (x) => x.status()).appliedLsn >= rec.appliedLsn) return;
      let damage = null;
      w = construct(() => {
        const r = restoreRecord(this.#wasmOpts, rec, storeKey(this.#url, this.#wasmOpts));
        damage = r.damage;
        return r.w;
      });
      if (damage) {
        this.#persistRepair = true;
        this.#persistRepairOf = rec.appliedLsn;
        this.#emitError(damage);
      }
    } catch (e) {
      // An unreadable copy: the next whole state replaces it (repair).
      this.#persistRepair = true;
      this.#persistRepairOf = rec.appliedLsn;
      this.#emitError(e);
      return;
    }
    releaseHandle(h);
    this.#attach(w);
    const lsn = call(this.#slot.h, "read", (x) => x.status()).appliedLsn;
    this.#persistedLsn = Number.isSafeInteger(rec.appliedLsn) ? rec.appliedLsn : lsn;
    this.#persistedDataset = rec.datasetId ?? null;
    this.#events.push({ type: "reset", lsn });
    if (!this.#inflight) queueMicrotask(() => this.#afterSync());
  }

  /**
   * A replica left without a WasmReplica after a trap (its rebuild, or the
   * module's re-instantiation, failed): waits for or retries the module,
   * then takes up a fresh WasmReplica (from the persisted copy, else empty).
   * Throws code "internal" when that fails again; the next call retries.
   */
  /** Whether a call must wait for the module or a fresh WasmReplica first (#revive). */
  #needsRevive() {
    return !this.#slot.h || engine.pending !== null || engine.poisoned;
  }

  async #revive() {
    await readyEngine();
    if (this.#closed || this.#slot.h) return;
    this[REBUILD](null, null, "rebuilt");
    if (!this.#slot.h) throw walcastError("internal", "walcast: the replica could not be rebuilt after a trap; try again");
  }

  /** The current handle, for a call. */
  #h() {
    if (this.#closed) throw closedError();
    return this.#slot.h;
  }

  /** Runs `fn(w)` on this replica's WasmReplica, recovering from a trap. */
  #call(kind, fn) {
    return call(this.#h(), kind, fn);
  }

  /**
   * Opens a replica of the dataset at `url`. With `persist: "indexeddb"` (or a
   * store) the last persisted state is restored first, so reads are served at
   * once, offline too; `sync()` then fetches only what is missing. No network
   * request is made here, except with `load: "lazy"`: then the first sync
   * runs before this resolves (the head, and the segments after its
   * snapshot; no snapshot download), and it rejects with that sync's error.
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
    checkCount(options.persistTimeoutMs, "persistTimeoutMs", { min: 1 });
    if (options.onRecord !== undefined && typeof options.onRecord !== "function") {
      throw walcastError("invalid_input", "walcast: onRecord must be a function");
    }
    const lazy = checkLoad(options);
    headerList(options.headers);
    fetchOption(options);
    trustKeys(options.trust);
    if (lazy && options.persist !== undefined && options.persist !== null && options.persist !== "memory") {
      throw walcastError(
        "invalid_input",
        'walcast: persist needs load: "full" (a lazy replica reads the snapshot in blocks and never holds the whole state to persist)',
      );
    }
    const store = pickStore(options.persist);
    await init();
    await readyEngine();
    const wasmOpts = wasmOptions(options);

    let w = null;
    let restored = null;
    if (store) {
      let rec;
      try {
        rec = await storeCall(store.load(storeKey(url, wasmOpts)), "load", options.persistTimeoutMs ?? DEFAULT_PERSIST_TIMEOUT_MS);
      } catch (e) {
        reportTo(options.onError, storeError("load", storeKey(url, wasmOpts), e));
      }
      if (rec && rec.snapshot) {
        // The load took a while: a trap meanwhile may be replacing the instance.
        await readyEngine();
        try {
          let damage = null;
          w = construct(() => {
            const r = restoreRecord(wasmOpts, rec, storeKey(url, wasmOpts));
            damage = r.damage;
            return r.w;
          });
          restored = rec;
          if (damage) {
            // Whatever it claimed, the store holds the state at the LSN reopened at.
            const at = w.status().appliedLsn;
            restored = { appliedLsn: at, datasetId: rec.datasetId, damaged: true, repairOf: rec.appliedLsn };
            reportTo(options.onError, damage);
          }
        } catch (e) {
          // An unreadable copy (another version, damage): start over; the next
          // persisted state replaces it, even at the same LSN (repair).
          restored = { appliedLsn: -1, datasetId: null, damaged: true, repairOf: rec.appliedLsn };
          reportTo(options.onError, e);
        }
      }
    }
    if (!w) {
      await readyEngine();
      w = construct(() => new WasmReplica(wasmOpts));
    }
    const replica = new Replica(TOKEN, url, options, w, store, restored);
    if (lazy) {
      try {
        await replica.sync();
      } catch (e) {
        await replica.close();
        throw e;
      }
    }
    return replica;
  }

  /**
   * Opens a replica from bytes of `snapshot()` (persisted however you like):
   * reads are served at once and `sync()` fetches only what is missing.
   * Full mode only.
   */
  static async restore(url, snapshot, options = {}) {
    if (url instanceof URL) url = url.href;
    if (typeof url !== "string" || url === "") {
      throw walcastError("invalid_input", "walcast: Replica.restore needs the dataset URL as a string");
    }
    const { persist: _ignored, ...rest } = options ?? {};
    if (checkLoad(rest)) {
      throw walcastError("invalid_input", 'walcast: Replica.restore takes a whole state: use load: "full" (or Replica.open with load: "lazy")');
    }
    headerList(rest.headers);
    fetchOption(rest);
    await init();
    await readyEngine();
    const w = construct(() => WasmReplica.restoreLog(wasmOptions(rest), toBytes(snapshot, "snapshot"), []));
    return new Replica(TOKEN, url, rest, w, null, null);
  }

  /** Number of keys held (full mode; undefined in lazy mode, which does not know it without reading every block). */
  get size() {
    if (this.#lazy) {
      this.#h();
      return undefined;
    }
    return this.#call("read", (w) => w.size);
  }

  /** "full" or "lazy" (how the replica loads the dataset). */
  get mode() {
    return this.#lazy ? "lazy" : "full";
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

  /**
   * Read-your-writes: resolves the applied LSN once it is at least `lsn`
   * (for example the `{"lsn":N}` that `walcast write` printed). Syncs
   * meanwhile, whether or not `start()` was called, at most every 100 ms.
   * Rejects with code "timeout" after `timeout` ms (default 30000), naming
   * the LSN, with the state left as it was; an error of a sync is retried
   * until then.
   */
  async waitFor(lsn, options = {}) {
    if (!Number.isSafeInteger(lsn) || lsn < 0) {
      throw walcastError("invalid_input", `walcast: waitFor needs an LSN (an integer >= 0), got ${String(lsn)}`);
    }
    const timeout = options?.timeout ?? 30_000;
    checkCount(timeout, "timeout");
    const until = Date.now() + timeout;
    let lastError = null;
    for (;;) {
      if (this.#closed) throw closedError();
      if (this.#needsRevive()) await this.#revive();
      const s = this.#call("read", (w) => w.status());
      if (s.appliedLsn >= lsn) return s.appliedLsn;
      const left = until - Date.now();
      if (left <= 0) {
        const why = lastError ? `; last error: ${lastError.message}` : "";
        throw walcastError(
          "timeout",
          `walcast: LSN ${lsn} not applied within ${timeout} ms (applied ${s.appliedLsn}, committed ${s.committedLsn})${why}`,
        );
      }
      const started = Date.now();
      let timer = null;
      const expired = new Promise((resolve) => (timer = setTimeout(resolve, left)));
      // start()'s loop long-polls: the held read brings the commit as soon
      // as the server has it (a sync would abandon that read for a new one).
      const following = this.#running && s.longPoll;
      try {
        await Promise.race([following ? this.#nextChange(Math.min(left, 1000)) : this.sync(), expired]);
        lastError = null;
      } catch (e) {
        if (e?.code === "closed") throw e;
        lastError = e;
      } finally {
        clearTimeout(timer);
      }
      // The head did not name `lsn` yet (the publisher has not committed
      // it): read it again shortly, not in a tight loop.
      const pause = Math.min(100 - (Date.now() - started), until - Date.now());
      // (A trap in that sync: the next round revives the replica.)
      if (!following && pause > 0 && !this.#needsRevive() && this.#call("read", (w) => w.status()).appliedLsn < lsn) {
        await new Promise((resolve) => setTimeout(resolve, pause));
      }
    }
  }

  /** Resolves at the next onChange or onReset, or after `ms`. */
  #nextChange(ms) {
    return new Promise((resolve) => {
      let timer = null;
      const done = () => {
        clearTimeout(timer);
        offChange();
        offReset();
        resolve();
      };
      const offChange = this.onChange(done);
      const offReset = this.onReset(done);
      timer = setTimeout(done, ms);
    });
  }

  #runSync() {
    const p = (async () => {
      try {
        if (this.#needsRevive()) await this.#revive();
        if (this.#reloading) await this.#reloading;
        const lsn = await this.#pump();
        this.#trapError = null;
        this.#lazyReady = true;
        return lsn;
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

  /** Runs one sync; starts it over on the new instance when the old one was replaced under it. */
  async #pump() {
    for (;;) {
      if (this.#closed) throw closedError();
      if (this.#needsRevive()) await this.#revive();
      try {
        return await this.#drive(this.#h());
      } catch (e) {
        if (e !== RESTART) throw e;
      }
    }
  }

  /** Drives the module's sync: steps it, and waits for answers and timers between steps. */
  async #drive(h) {
    const live = () => {
      if (h.dead || this.#slot.h !== h) throw RESTART;
    };
    const op = newOp();
    call(h, "sync", (w) => w.syncBegin());
    this.#releaseHeld(h);
    // Errors of the module following the head on its own before this sync
    // (kept in status().lastError): this sync reports its own.
    call(h, "sync", (w) => w.takeErrors());
    try {
      let outcome = null;
      while (!outcome) {
        live();
        this.#step(h, op);
        try {
          const r = call(h, "sync", (w) => w.syncResult());
          if (typeof r === "number") outcome = { lsn: r };
        } catch (e) {
          if (isTrapError(e)) throw e;
          outcome = { error: e };
        }
        if (!outcome) await this.#progress(h, op);
      }
      await this.#settle(h, op);
      if (outcome.error) throw outcome.error;
      return outcome.lsn;
    } finally {
      if (!h.dead) {
        try {
          call(h, "sync", (w) => w.syncAbort());
        } catch {
          // reported by the call that trapped first
        }
      }
    }
  }

  // --- the module's GETs ------------------------------------------------------
  //
  // The module asks for GETs whenever it is stepped, by a sync or by a lazy
  // read (an operation); they are performed here and every one is answered
  // (a timeout or a network error is an answer too), so the module never
  // waits for an answer that will not come. An answer steps the module again
  // (new GETs belong to the operation the answered one belonged to) and wakes
  // every operation waiting for progress. An operation settles only once
  // the GETs it started are answered: in runtimes whose I/O belongs to a
  // request (Workers), a request's GETs never outlive it, and while it waits
  // it keeps a timer of its own (so it is never taken for hung while another
  // request's GET brings what it needs). The timer also steps the module for
  // its retries, and answers GETs whose answer was lost (their request's I/O
  // torn down) as failed once they are well past their deadline.

  /** Runs the module until it waits, and starts the GETs it asked for (on behalf of `op`). */
  #step(h, op) {
    this.#nextStep = call(h, "sync", (w) => w.step());
    for (const req of call(h, "sync", (w) => w.takeRequests())) this.#startGet(h, req, op);
  }

  #startGet(h, req, op) {
    const held = req.wait != null;
    if (held && !this.#running) {
      // Nobody follows the head (no start()): the next sync abandons it.
      this.#held.set(req.id, null);
      this.#unsent++;
      return;
    }
    const ac = new AbortController();
    const kind = kindOf(req);
    let kept = this.#wholeAnswer;
    if (kept && Date.now() - kept.at >= WHOLE_ANSWER_KEEP_MS) kept = this.#wholeAnswer = null;
    const fresh = kept && req.range && kept.key === req.key && kept.res.body.byteLength <= req.maxBytes;
    if (!fresh) this.#requestsByKind[kind]++;
    const entry = { ac, op, held, kind, fresh, deadline: Date.now() + req.timeoutMs + LOST_ANSWER_GRACE_MS };
    this.#gets.set(req.id, entry);
    if (held) this.#held.set(req.id, entry);
    else op.owned++;
    (fresh ? Promise.resolve(kept.res) : performGet(this.#io, req, ac))
      .then((res) => {
        // A whole object for a range: the module takes what it asked for
        // from it, and verifies it as any answer.
        if (!fresh && req.range && res.status === 200 && res.body && res.body.byteLength <= req.maxBytes) this.#wholeAnswer = { key: req.key, res, at: Date.now() };
        return res;
      })
      .then((res) => verifySignatures(h, req, res).then(() => res))
      .then((res) => this.#answer(h, req.id, entry, res));
  }

  /** Aborts the long-polls in flight (stop(), close()); the next sync abandons them. */
  #parkHeld() {
    for (const [id, entry] of this.#held) {
      if (!entry) continue;
      this.#gets.delete(id);
      this.#held.set(id, null);
      try {
        entry.ac.abort();
      } catch {
        // already over
      }
    }
  }

  /**
   * After syncBegin (the machine abandoned its long-poll and reads the head
   * now): aborts the held GETs and tells the module they are over.
   */
  #releaseHeld(h) {
    this.#parkHeld();
    const ids = [...this.#held.keys()];
    this.#held.clear();
    for (const id of ids) call(h, "sync", (w) => w.deliver(id, 0, undefined, undefined, undefined, "abandoned for a new head read"));
  }

  /** Hands an answer to the module (once per GET), steps it, and wakes every waiting operation. */
  #answer(h, id, entry, res) {
    if (this.#gets.get(id) !== entry) return; // aborted, or answered as lost
    this.#gets.delete(id);
    if (entry.held) this.#held.delete(id);
    if (res.body && !entry.fresh) this.#bytesByKind[entry.kind] += res.body.byteLength;
    let error = null;
    // Who to wake is decided before the module is stepped: a read it gives
    // new GETs to may have waited for this very answer.
    const chosen = this.#waiting(entry.op);
    if (!h.dead && this.#slot.h === h) {
      try {
        call(h, "sync", (w) =>
          w.deliver(id, res.status, res.body, res.etag ?? undefined, res.contentRange ?? undefined, res.message, res.longPoll ?? undefined),
        );
        // The GETs the module asks for next belong to an operation that
        // still waits: one that has its outcome would wait for them before
        // it settles, for as long as other reads keep GETs queued. With
        // request-scoped I/O the waiting one's own timer steps the module
        // (I/O started here would belong to this request).
        const next = !entry.op.done ? entry.op : scopedIo ? null : this.#waiters.find((w) => !w.op.done)?.op;
        if (next) this.#step(h, next);
      } catch (e) {
        error = e;
      }
    }
    if (!entry.held) entry.op.owned--;
    this.#wakeWaiters(error, entry.op, chosen);
  }

  /** Answers GETs whose answer never came (past their deadline plus a grace) as failed. */
  #answerLost(h) {
    const now = Date.now();
    for (const [id, entry] of [...this.#gets]) {
      if (entry.deadline < now) this.#answer(h, id, entry, { status: 0, message: "the answer was lost (its request's I/O was torn down)" });
    }
  }

  #abortGets() {
    for (const entry of this.#gets.values()) {
      if (!entry.held) entry.op.owned--;
      try {
        entry.ac.abort();
      } catch {
        // started on behalf of another request (Workers): it ends with it
      }
    }
    this.#gets.clear();
    this.#held.clear();
  }

  /**
   * Resolves at the next answer, or at this operation's own timer (the
   * module's next step, at most STEP_EVERY_MS away), which steps the module
   * on its behalf. Rejects when handling an answer failed (a trap).
   */
  #progress(h, op, stoppable = false) {
    let timer = null;
    let wake = null;
    const waiting = new Promise((resolve, reject) => {
      const waiter = { resolve, reject, op };
      this.#waiters.push(waiter);
      if (stoppable) {
        // start()'s loop following the head: stop() ends the wait at once.
        wake = () => {
          this.#waiters = this.#waiters.filter((w) => w !== waiter);
          resolve();
        };
        this.#wake = wake;
      }
      const next = this.#nextStep < 0 ? Infinity : this.#nextStep - Date.now();
      const most = scopedIo && op.owned === 0 ? SCOPED_POLL_MS : STEP_EVERY_MS;
      timer = setTimeout(() => {
        timer = null;
        let error = null;
        if (!h.dead && this.#slot.h === h) {
          try {
            this.#answerLost(h);
            this.#step(h, op);
          } catch (e) {
            error = e;
          }
        }
        this.#wakeWaiters(error, op);
      }, Math.max(0, Math.min(next, most)));
    });
    // Cleared by the operation itself (its own request's timer).
    return waiting.finally(() => {
      if (timer !== null) clearTimeout(timer);
      if (wake !== null && this.#wake === wake) this.#wake = null;
    });
  }

  /** Waits until every GET `op` started is answered. */
  async #settle(h, op) {
    while (op.owned > 0 && !h.dead && this.#slot.h === h && !this.#closed) await this.#progress(h, op);
  }

  /**
   * The waiters `op`'s GET or timer may concern: `op`'s own, and besides
   * them only operations with no GET of their own in flight (the others
   * are woken by their own answers, so an answer does not re-run every
   * read waiting); with request-scoped I/O, only `op`'s.
   */
  #waiting(op) {
    const mine = scopedIo && op ? (w) => w.op === op : (w) => !op || w.op === op || w.op.owned === 0;
    return this.#waiters.filter(mine);
  }

  /**
   * Wakes the operations waiting for `op`'s GET or timer (with `error`:
   * rejects every waiting one): `op` itself, and those that own no GET in
   * flight (they wait for GETs other operations started); with
   * request-scoped I/O, only `op`.
   */
  #wakeWaiters(error = null, op = null, chosen = this.#waiting(op)) {
    const waiters = error ? this.#waiters : chosen.filter((w) => this.#waiters.includes(w));
    this.#waiters = this.#waiters.filter((w) => !waiters.includes(w));
    for (const w of waiters) {
      if (error) w.reject(error);
      else w.resolve();
    }
    if (error && waiters.length === 0) this.#emitError(error);
  }

  /**
   * A lazy read: `op(w, h)` answers, or returns null while the blocks it
   * needs are fetched (the module queued their GETs). A replica with nothing
   * synced yet (rebuilt after a trap) syncs first.
   */
  async #lazyRead(read) {
    for (;;) {
      if (this.#closed) throw closedError();
      if (engine.pending) await engine.pending.catch(noop);
      if (!this.#lazyReady) {
        await this.sync();
        continue;
      }
      const h = this.#h();
      const op = newOp();
      let outcome = null;
      while (!outcome && !h.dead && this.#slot.h === h) {
        if (this.#closed) throw closedError();
        try {
          const r = call(h, "read", (w) => read(w, h));
          if (r !== null) outcome = { value: r };
        } catch (e) {
          if (isTrapError(e)) throw e;
          outcome = { error: e };
        }
        if (!outcome) {
          this.#step(h, op);
          await this.#progress(h, op);
        }
      }
      if (!outcome) continue; // another WasmReplica now: read it there
      op.done = true;
      // A whole copy that failed verification is not offered again.
      if (outcome.error?.code === "data" && outcome.error.object === this.#wholeAnswer?.key) this.#wholeAnswer = null;
      await this.#settle(h, op);
      if (outcome.error) throw outcome.error;
      return outcome.value;
    }
  }

  async #lazyGet(key) {
    const k = toBytes(key, "key");
    const slot = await this.#readSlots.take(() => this.#closed);
    try {
      return await this.#lazyRead((w) => w.getLazy(k));
    } finally {
      this.#readSlots.release(slot);
    }
  }

  async #lazyScan(options) {
    const b = scanBounds(options);
    if (b === null) return [];
    // At most MAX_OPEN_SCANS open in the module at once (it keeps 64 and
    // forgets the least recently stepped past that): more wait their turn
    // instead of forgetting each other and starting over without end.
    const slot = await this.#scanSlots.take(() => this.#closed);
    try {
      if (this.#testHangScans > 0) {
        this.#testHangScans--;
        return await new Promise(() => {});
      }
      return await this.#lazyScanOpen(b);
    } finally {
      this.#scanSlots.release(slot);
    }
  }

  async #lazyScanOpen(b) {
    let id = 0;
    let owner = null; // the handle the scan was opened on
    try {
      const rows = await this.#lazyRead((w, h) => {
        if (owner !== h) {
          id = w.scanOpen(b.prefix, b.start, b.end, b.limit, b.maxBytes);
          owner = h;
        }
        try {
          return w.scanLazy(id);
        } catch (e) {
          // Forgotten while more scans than the module keeps were open:
          // start it again.
          if (!String(e?.message).includes("no such scan")) throw e;
          id = w.scanOpen(b.prefix, b.start, b.end, b.limit, b.maxBytes);
          return w.scanLazy(id);
        }
      });
      return entries(rows);
    } finally {
      if (owner && !owner.dead) {
        try {
          owner.w.scanClose(id);
        } catch {
          // a poisoned instance goes away whole
        }
      }
    }
  }

  /** The value of `key`, or undefined (lazy mode: a promise of it). */
  get(key) {
    if (this.#lazy) return this.#lazyGet(key);
    const k = toBytes(key, "key");
    const v = this.#call("read", (w) => w.get(k));
    return v ?? undefined;
  }

  /** The value of `key` decoded as UTF-8, or undefined (lazy mode: a promise of it). */
  getText(key) {
    if (this.#lazy) return this.#lazyGet(key).then(textOf);
    return textOf(this.get(key));
  }

  /** The value of `key` parsed as JSON, or undefined (lazy mode: a promise of it). Throws on invalid JSON. */
  getJSON(key) {
    if (this.#lazy) return this.#lazyGet(key).then((v) => jsonOf(textOf(v)));
    return jsonOf(this.getText(key));
  }

  /**
   * Entries in key order: `start` inclusive, `end` exclusive; empty when `end`
   * is not after `start` (lazy mode: a promise of them).
   */
  scan(options = {}) {
    if (this.#lazy) return this.#lazyScan(options);
    this.#h();
    const b = scanBounds(options);
    if (b === null) return [];
    return entries(this.#call("read", (w) => w.scan(b.prefix, b.start, b.end, b.limit, b.maxBytes)));
  }

  /** Where the replica is: LSNs, lag, state, last error, traffic. */
  status() {
    const s = this.#call("read", (w) => w.status());
    const e = s.lastError ?? null;
    let lastError = null;
    if (e) {
      lastError = { code: e.code, message: e.message };
      if (e.object !== undefined) lastError.object = e.object;
      if (e.lsn !== undefined) lastError.lsn = e.lsn;
    } else if (this.#trapError) {
      lastError = { code: "internal", message: this.#trapError.message };
    }
    return {
      mode: s.mode,
      appliedLsn: s.appliedLsn,
      committedLsn: s.committedLsn,
      epoch: s.epoch,
      datasetId: s.datasetId ?? null,
      lagMs: s.lagMs,
      lastPollAt: s.lastPollAt ?? null,
      state: s.state,
      signer: s.signer ?? null,
      lastError,
      requests: s.requests - this.#unsent,
      bytesReceived: s.bytesReceived,
      cachedBytes: s.cachedBytes,
      blocksFetched: s.blocksFetched,
      overlayBytes: s.overlayBytes,
      overlayEntries: s.overlayEntries,
      longPoll: !!s.longPoll,
      requestsByKind: { ...this.#requestsByKind },
      bytesByKind: { ...this.#bytesByKind },
      running: this.#running,
      recoveries: this.#recoveries,
      persistError: this.#persistError
        ? { code: this.#persistError.code ?? "persist", message: String(this.#persistError.message ?? this.#persistError) }
        : null,
    };
  }

  /** The whole state at the applied LSN, for `Replica.restore`. */
  snapshot() {
    return this.#call("read", (w) => w.snapshot());
  }

  /** Test-only: makes the wasm module trap ("read", "abort"), the next sync trap ("sync"), or the recovery from the next trap fail (see below). */
  [TEST_TRAP](mode) {
    // "fail-instantiate": the next trap's fresh instance fails (both the
    // synchronous and the asynchronous try); "async-instantiate": only the
    // synchronous try fails (the instance comes asynchronously);
    // "fail-construct": the next rebuild's new WasmReplica fails;
    // "clear-faults" disarms them. "fail-rebuild": this replica's next
    // rebuild makes no WasmReplica at all (its restore and its construct
    // fail). "hang-scans:N": this replica's next N
    // lazy scans never settle, as if a torn-down request's I/O stranded
    // them; "scan-stale-ms:MS": its scan slots turn stale after MS ms.
    const [name, arg] = String(mode).split(":");
    if (name === "hang-scans") return void (this.#testHangScans = Number(arg));
    if (name === "fail-rebuild") return void (this.#testFailRebuild = true);
    if (name === "scan-stale-ms") return void (this.#scanSlots.staleMs = Number(arg));
    if (["fail-instantiate", "async-instantiate", "fail-construct", "clear-faults"].includes(mode)) {
      testFaults.instantiate = mode === "fail-instantiate" ? 2 : mode === "async-instantiate" ? 1 : 0;
      testFaults.construct = mode === "fail-construct" ? 1 : 0;
      return engine.replaceable;
    }
    return this.#call("read", (w) => w.__testTrap(String(mode)));
  }

  /**
   * Starts following the head in the background: sync, then, while the
   * server holds long-polls (`walcast serve`), one held head read after
   * another (a change is applied as soon as the server sees it); else wait
   * `pollInterval` ms and sync again.
   */
  start() {
    this.#h();
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
      try {
        await this.#follow(live);
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

  /**
   * Long-poll: lets the module follow the head on its own (its held head
   * reads, then what a new head names), stepping it on answers and on its
   * timer, until the server stops holding (an answer came back at once: a
   * server or proxy that does not hold; then back to polling), the module
   * reports an error (to onError; the loop syncs after `pollInterval`),
   * the instance is replaced, or stop().
   */
  async #follow(live) {
    const h = this.#slot.h;
    const op = newOp();
    while (live() && !this.#closed && h && !h.dead && this.#slot.h === h) {
      const errors = call(h, "sync", (w) => w.takeErrors());
      if (errors.length > 0) {
        for (const e of errors) this.#emitError(e);
        return;
      }
      if (!call(h, "read", (w) => w.status()).longPoll) return;
      await this.#progress(h, op, true);
    }
  }

  /** Stops background polling (a sync in flight finishes; a held long-poll is aborted). */
  stop() {
    this.#running = false;
    this.#loopGen++;
    this.#parkHeld();
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
    // Scans waiting for a slot reject with closed now, their timers cleared.
    this.#wholeAnswer = null;
    this.#scanSlots.wakeAll();
    this.#readSlots.wakeAll();
    const pending = this.#queued ?? this.#inflight;
    if (pending) await pending.then(noop, noop);
    if (this.#inflight) await this.#inflight.then(noop, noop);
    if (this.#reloading) await this.#reloading.then(noop, noop);
    this.#changeCbs.clear();
    this.#resetCbs.clear();
    // GETs still in flight (lazy reads' blocks) and reads waiting for them
    // (with request-scoped I/O, their own timers see the replica closed).
    this.#abortGets();
    if (!scopedIo) this.#wakeWaiters();
    if (finalizer) finalizer.unregister(this.#slot);
    releaseHandle(this.#slot.h);
    this.#slot.h = null;
  }

  // --- internals -------------------------------------------------------------

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
    // Also right after close(): the last sync's state is still persisted.
    if (this.#events.length === 0 || !this.#slot.h) return;
    const events = this.#events.splice(0);
    if (this.#store && events.some((e) => e.type === "applied" || e.lsn > 0)) {
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
        for (const cb of this.#changeCbs) this.#callback(cb, { first: ev.first, last: ev.last });
      } else {
        for (const cb of this.#resetCbs) this.#callback(cb, { lsn: ev.lsn });
      }
    }
  }

  /**
   * The store's call `p`, timed. One that outlives persistTimeoutMs makes
   * the store busy until it settles (calls within the limit may overlap).
   */
  #storeCall(p, method) {
    const raw = Promise.resolve(p);
    let settled = false;
    const done = () => {
      settled = true;
      if (this.#storeBusy === raw) this.#storeBusy = null;
    };
    raw.then(done, done);
    return storeCall(raw, method, this.#persistTimeoutMs).catch((e) => {
      if (!settled) this.#storeBusy = raw;
      throw e;
    });
  }

  async #persist() {
    const h = this.#slot.h;
    if (this.#storeBusy) {
      // The store has not answered the last write (a lock another tab
      // holds, a transaction that never completes): queue nothing more,
      // each holding a state, behind it. The batches since are dropped from
      // the log; the first write once it answers is whole.
      if (typeof this.#store.append === "function") call(h, "read", (w) => w.takeLog());
      this.#persistWhole = true;
      throw walcastError(
        "persist",
        `walcast: the persist store's last write for ${storeKey(this.#url, this.#wasmOpts)} has not settled (over ${this.#persistTimeoutMs} ms); this state is written whole once it does`,
        { object: "persist store" },
      );
    }
    const s = call(h, "read", (w) => w.status());
    const lsn = s.appliedLsn;
    const ds = s.datasetId ?? null;
    const replace = this.#resetSincePersist;
    const repair = this.#persistRepair;
    // The batches applied since the last write (incremental persistence).
    const chunk = typeof this.#store.append === "function" ? call(h, "read", (w) => w.takeLog()) : undefined;
    if (!replace && !repair && lsn <= this.#persistedLsn && ds === this.#persistedDataset) return;
    const key = storeKey(this.#url, this.#wasmOpts);
    if (chunk && !replace && !repair && !this.#persistWhole && ds === this.#persistedDataset) {
      // Append the chunk; the store asks for the whole state instead when
      // its log is due for compaction or does not line up with the chunk.
      let wholeLsn = -1;
      const whole = () => {
        const hh = this.#slot.h;
        if (!hh || hh.dead) return null;
        const st = call(hh, "read", (w) => w.status());
        if ((st.datasetId ?? null) !== ds) return null;
        wholeLsn = st.appliedLsn;
        return { snapshot: call(hh, "read", (w) => w.snapshot()), appliedLsn: st.appliedLsn, datasetId: ds, savedAt: Date.now() };
      };
      try {
        await this.#storeCall(this.#store.append(key, { datasetId: ds, first: chunk.first, last: chunk.last, bytes: chunk.bytes, whole }), "append");
        // The store now holds at least this (its own copy may be newer).
        this.#persistedLsn = Math.max(this.#persistedLsn, chunk.last, wholeLsn);
      } catch (e) {
        this.#persistWhole = true; // the chunk is gone: the next write is whole
        throw storeError("append", key, e);
      }
      return;
    }
    const snapshot = call(h, "read", (w) => w.snapshot());
    const opts = { replace, repair };
    if (repair && this.#persistRepairOf !== undefined) opts.repairOf = this.#persistRepairOf;
    try {
      await this.#storeCall(this.#store.save(key, { snapshot, appliedLsn: lsn, datasetId: ds, savedAt: Date.now() }, opts), "save");
    } catch (e) {
      throw storeError("save", key, e);
    }
    this.#persistRepairOf = undefined;
    this.#persistedLsn = lsn;
    this.#persistedDataset = ds;
    this.#resetSincePersist = false;
    this.#persistRepair = false;
    this.#persistWhole = false;
  }

  #callback(cb, arg) {
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
