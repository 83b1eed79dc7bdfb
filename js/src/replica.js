// The public API of the `walcast` npm package, shared by every runtime entry
// (node.js, web.js, workerd.js). It wraps the wasm-bindgen class WasmReplica
// (crates/walcast-wasm) and adds what is JS-side only: the background
// polling loop, syncs and lazy reads (`load: "lazy"`: get/scan return
// promises and wait for the snapshot blocks they need), change events and
// persisting the state. The entries only say where the .wasm comes from.
//
// Beside this file:
//   engine.js      the wasm module: one compiled module, a replaceable
//                  instance, and recovery from a trap (every replica's state
//                  carried over to a fresh instance)
//   http.js        the GETs the module asks for (the runtime's fetch, bounded
//                  bodies, deadlines, redirects, gzip heads)
//   signatures.js  Ed25519 checks with WebCrypto for a replica that pins keys
//   persist.js     the persist store's calls, and reopening a persisted copy
//   idb.js         the IndexedDB store of `persist: "indexeddb"`
//   slots.js       bounded slots for lazy reads and scans running at once
//   util.js        errors, key encoding and option checks

import { WasmReplica } from "./wasm/walcast_wasm.js";
import { shouldReplace } from "./idb.js";
import { REBUILD, call, construct, engine, finalizer, handles, init, readyEngine, releaseHandle, setWasmSource, testFault, testFaults } from "./engine.js";
import { kindOf, performGet, zeroKinds } from "./http.js";
import { DEFAULT_PERSIST_TIMEOUT_MS, pickStore, restoreRecord, storeCall, storeError } from "./persist.js";
import { verifySignatures } from "./signatures.js";
import { Slots } from "./slots.js";
import { MAX_KEY_LEN, MAX_TIMER_MS, checkCount, closedError, entries, fetchOption, headerList, jsonOf, noop, reportTo, scanBounds, splitUrl, storeKey, textOf, toBytes, walcastError, weak } from "./util.js";

export { shouldReplace };
export { init, setWasmSource };

const TOKEN = Symbol("walcast.Replica");
/** Test-only: `replica[Symbol.for("walcast.testTrap")](mode)` makes the module trap on purpose. */
const TEST_TRAP = Symbol.for("walcast.testTrap");

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

/** An operation (a sync, a lazy read): counts the GETs it started that are not answered yet. */
/** A read's `signal` option: an `AbortSignal` or nothing. */
function signalOption(options) {
  const signal = options?.signal;
  if (signal == null) return null;
  if (typeof signal.throwIfAborted !== "function" || typeof signal.addEventListener !== "function") {
    throw walcastError("invalid_input", "walcast: signal must be an AbortSignal");
  }
  return signal;
}

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

/** Whether this is a page the user does not see (a background tab). */
function pageHidden() {
  return globalThis.document?.visibilityState === "hidden";
}

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
/** Throws `invalid_input` for options `open` and `restore` cannot take. */
function checkOptions(options) {
  if (options === null || typeof options !== "object") {
    throw walcastError("invalid_input", "walcast: options must be an object");
  }
  // (Past setTimeout's range it is taken as MAX_TIMER_MS; 0 as 1 ms.)
  checkCount(options.pollInterval, "pollInterval");
  checkCount(options.concurrency, "concurrency", { min: 1 });
  checkCount(options.persistTimeoutMs, "persistTimeoutMs", { min: 1 });
  if (options.onRecord !== undefined && typeof options.onRecord !== "function") {
    throw walcastError("invalid_input", "walcast: onRecord must be a function");
  }
}

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

const RESTART = Symbol("restart"); // the instance was replaced under a running sync

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
  #onVisibility = null; // start()'s listener of the page's visibilitychange
  #closing = null; // close()'s promise
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
  #resets = 0; // bumped on every reset: a GET sent before one keeps no whole copy
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
  /** The dataset went back in history since the last write (see shouldReplace's `rewind`). */
  #rewindSincePersist = false;
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
    this.#pollInterval = Math.min(options.pollInterval ?? 1000, MAX_TIMER_MS);
    this.#lazy = options.load === "lazy";
    this.#onError = typeof options.onError === "function" ? options.onError : null;
    if (typeof options.onRecord === "function") this.#onRecordFn = options.onRecord;
    if (restored) {
      this.#persistedLsn = restored.appliedLsn;
      this.#persistedDataset = restored.datasetId ?? null;
      this.#persistRepair = !!restored.damaged;
      this.#persistRepairOf = restored.damaged ? restored.repairOf : undefined;
      this.#resetSincePersist = !!restored.replace;
    }
    this.#attach(w);
    if (finalizer) finalizer.register(this, this.#slot, this.#slot);
    if (restored?.replace) {
      // A record naming another dataset than its base: rewritten now, with
      // the state it holds (offline too), not at the next change.
      queueMicrotask(() => {
        if (this.#closed) return;
        this.#persist().then(
          () => (this.#persistError = null),
          (e) => {
            this.#persistError = e;
            this.#emitError(e);
          },
        );
      });
    }
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
      // A whole copy kept from before is another state's object, perhaps
      // under the same key (a dataset started over at the prefix), as is
      // one a GET sent before now brings.
      r.#wholeAnswer = null;
      r.#resets++;
      // 0: the dataset changed; under the same id, its history went back.
      if (lsn === 0) r.#rewindSincePersist = true;
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
      let replace = false;
      w = construct(() => {
        const r = restoreRecord(this.#wasmOpts, rec, storeKey(this.#url, this.#wasmOpts));
        damage = r.damage;
        replace = r.replace;
        return r.w;
      });
      // A record naming another dataset than its base: the next write
      // replaces it, as after an open (an append to it would be refused).
      if (replace) this.#resetSincePersist = true;
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
    checkOptions(options);
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
          let replace = false;
          w = construct(() => {
            const r = restoreRecord(wasmOpts, rec, storeKey(url, wasmOpts));
            damage = r.damage;
            replace = r.replace;
            return r.w;
          });
          restored = rec;
          if (damage) {
            // Whatever it claimed, the store holds the state at the LSN reopened at.
            const at = w.status().appliedLsn;
            // A record naming another dataset than its base is replaced.
            restored = { appliedLsn: at, datasetId: rec.datasetId, damaged: true, repairOf: rec.appliedLsn, replace };
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
    checkOptions(options ?? {});
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
      const expired = new Promise((resolve) => (timer = setTimeout(resolve, Math.min(left, MAX_TIMER_MS))));
      // start()'s loop long-polls: the held read brings the commit as soon
      // as the server has it (a sync would abandon that read for a new one).
      const following = this.#running && s.longPoll && !pageHidden();
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
        // close() ends a sync under way (its GETs aborted), not waits for it.
        if (this.#closed) throw closedError();
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
      // Only its GETs are waited for now: the module's later GETs (its
      // retries after a failed sync) are not this sync's, which would
      // otherwise settle only once a failing server let a moment pass with
      // none of them in flight.
      op.done = true;
      this.#forgetFailedWhole(outcome.error);
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

  /** A whole copy that failed verification or its digest (a sync's or a read's `error`) is not offered again. */
  #forgetFailedWhole(error) {
    if ((error?.code === "data" || error?.code === "untrusted") && error.object === this.#wholeAnswer?.key) this.#wholeAnswer = null;
  }

  #startGet(h, req, op) {
    const held = req.wait != null;
    if (held && (!this.#running || pageHidden())) {
      // Nobody follows the head (no start(), or a page in the background):
      // the next sync abandons it.
      this.#held.set(req.id, null);
      this.#unsent++;
      return;
    }
    const ac = new AbortController();
    const kind = kindOf(req);
    let kept = this.#wholeAnswer;
    if (kept && Date.now() - kept.at >= WHOLE_ANSWER_KEEP_MS) kept = this.#wholeAnswer = null;
    // A range the copy already answered is asked again only as a retry
    // (the copy failed verification, or its digest): that one goes out.
    const range = req.range ?? "";
    const fresh = kept && req.range && kept.key === req.key && kept.res.body.byteLength <= req.maxBytes && !kept.served.has(range);
    if (fresh) kept.served.add(range);
    else this.#requestsByKind[kind]++;
    const entry = { ac, op, held, kind, fresh, deadline: Date.now() + req.timeoutMs + LOST_ANSWER_GRACE_MS };
    this.#gets.set(req.id, entry);
    if (held) this.#held.set(req.id, entry);
    else op.owned++;
    const resets = this.#resets;
    (fresh ? Promise.resolve(kept.res) : performGet(this.#io, req, ac))
      .then((res) => {
        // A whole object for a range: the module takes what it asked for
        // from it, and verifies it as any answer.
        if (!fresh && resets === this.#resets && req.range && res.status === 200 && res.body && res.body.byteLength <= req.maxBytes) this.#wholeAnswer = { key: req.key, res, at: Date.now(), served: new Set([range]) };
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
  #progress(h, op, stoppable = false, signal = null) {
    let timer = null;
    let wake = null;
    let abort = null;
    const waiting = new Promise((resolve, reject) => {
      const waiter = { resolve, reject, op };
      this.#waiters.push(waiter);
      if (signal) {
        // A read whose caller gave up (its signal aborted) waits no more.
        abort = () => {
          this.#waiters = this.#waiters.filter((w) => w !== waiter);
          resolve();
        };
        signal.addEventListener("abort", abort);
      }
      if (stoppable) {
        // start()'s loop following the head: stop() ends the wait at once.
        wake = () => {
          this.#waiters = this.#waiters.filter((w) => w !== waiter);
          resolve();
        };
        this.#wake = wake;
      }
      // One with its outcome steps nothing (below), so the module's next
      // wake is not its to keep: its timer only looks for lost answers.
      const next = op.done || this.#nextStep < 0 ? Infinity : this.#nextStep - Date.now();
      const most = scopedIo && op.owned === 0 ? SCOPED_POLL_MS : STEP_EVERY_MS;
      timer = setTimeout(() => {
        timer = null;
        let error = null;
        if (!h.dead && this.#slot.h === h) {
          try {
            this.#answerLost(h);
            // On behalf of an operation that still waits, as an answer
            // steps the module (`#answer`): one that has its outcome is
            // charged no GETs it would then wait for.
            const next = !op.done ? op : scopedIo ? null : this.#waiters.find((w) => !w.op.done)?.op;
            if (next) this.#step(h, next);
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
      if (abort !== null) signal.removeEventListener("abort", abort);
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
   * synced yet (rebuilt after a trap) syncs first. `signal` aborted: the
   * read steps no more and rejects with its reason once its GETs out are
   * answered (the module's cache keeps what they bring; GETs the module
   * queued for it may still go out).
   */
  async #lazyRead(read, signal) {
    for (;;) {
      if (this.#closed) throw closedError();
      signal?.throwIfAborted();
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
        if (signal?.aborted) {
          // Its GETs out are waited for, so that a runtime which ties I/O
          // to the request that started it (Workers) does not tear down
          // GETs other reads wait for too.
          op.done = true;
          await this.#settle(h, op);
          throw signal.reason;
        }
        try {
          const r = call(h, "read", (w) => read(w, h));
          if (r !== null) outcome = { value: r };
        } catch (e) {
          if (isTrapError(e)) throw e;
          outcome = { error: e };
        }
        if (!outcome) {
          this.#step(h, op);
          await this.#progress(h, op, false, signal);
        }
      }
      if (!outcome) continue; // another WasmReplica now: read it there
      op.done = true;
      this.#forgetFailedWhole(outcome.error);
      await this.#settle(h, op);
      if (outcome.error) throw outcome.error;
      return outcome.value;
    }
  }

  async #lazyGet(key, options) {
    const k = toBytes(key, "key");
    if (k.length > MAX_KEY_LEN) return void this.#h();
    const signal = signalOption(options);
    const slot = await this.#readSlots.take(() => this.#closed, signal);
    try {
      return await this.#lazyRead((w) => w.getLazy(k), signal);
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
    const signal = signalOption(options);
    const slot = await this.#scanSlots.take(() => this.#closed, signal);
    try {
      if (this.#testHangScans > 0) {
        this.#testHangScans--;
        return await new Promise(() => {});
      }
      return await this.#lazyScanOpen(b, signal);
    } finally {
      this.#scanSlots.release(slot);
    }
  }

  async #lazyScanOpen(b, signal) {
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
      }, signal);
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

  /**
   * The value of `key`, or undefined (lazy mode: a promise of it; with
   * `options.signal`, an `AbortSignal`, a read whose caller gave up rejects
   * with the signal's reason and queues no more GETs).
   */
  get(key, options) {
    if (this.#lazy) return this.#lazyGet(key, options);
    const k = toBytes(key, "key");
    // No key is longer: not copied into the module.
    if (k.length > MAX_KEY_LEN) return void this.#h();
    const v = this.#call("read", (w) => w.get(k));
    return v ?? undefined;
  }

  /** The value of `key` decoded as UTF-8, or undefined (lazy mode: a promise of it). */
  getText(key, options) {
    if (this.#lazy) return this.#lazyGet(key, options).then(textOf);
    return textOf(this.get(key));
  }

  /** The value of `key` parsed as JSON, or undefined (lazy mode: a promise of it). Throws on invalid JSON. */
  getJSON(key, options) {
    if (this.#lazy) return this.#lazyGet(key, options).then((v) => jsonOf(textOf(v)));
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
    // A page in the background polls instead of holding a long-poll:
    // browsers give an origin six HTTP/1.1 connections, shared by its tabs,
    // and a held read keeps one. Hidden, the held read is aborted and the
    // loop polls every `pollInterval`; shown again, it syncs at once and
    // follows the head.
    const doc = globalThis.document;
    if (!this.#onVisibility && typeof doc?.addEventListener === "function") {
      this.#onVisibility = () => {
        if (!this.#running) return;
        if (pageHidden()) this.#parkHeld();
        const wake = this.#wake;
        this.#wake = null;
        if (wake) wake();
      };
      doc.addEventListener("visibilitychange", this.#onVisibility);
    }
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
    while (live() && !this.#closed && h && !h.dead && this.#slot.h === h && !pageHidden()) {
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
    if (this.#onVisibility) globalThis.document?.removeEventListener?.("visibilitychange", this.#onVisibility);
    this.#onVisibility = null;
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
    this.#h(); // closed: an error, not a callback never called
    this.#changeCbs.add(cb);
    return () => this.#changeCbs.delete(cb);
  }

  /** `cb({ lsn })` when the state was replaced (re-bootstrap, new dataset); returns an unsubscribe function. */
  onReset(cb) {
    if (typeof cb !== "function") throw walcastError("invalid_input", "walcast: onReset needs a function");
    this.#h();
    this.#resetCbs.add(cb);
    return () => this.#resetCbs.delete(cb);
  }

  /** Stops polling, ends a sync in flight (it rejects as closed), and frees the wasm memory; every call resolves once that is done. */
  close() {
    // Every call resolves when the replica is closed, not only the first.
    this.#closing ??= this.#close();
    return this.#closing;
  }

  async #close() {
    this.stop();
    this.#closed = true;
    // Scans waiting for a slot reject with closed now, their timers cleared.
    this.#wholeAnswer = null;
    this.#scanSlots.wakeAll();
    this.#readSlots.wakeAll();
    // A sync under way (a large snapshot, a server that does not answer)
    // ends now with a closed error: its GETs are aborted and it is woken.
    if (this.#inflight) {
      this.#abortGets();
      if (!scopedIo) this.#wakeWaiters();
    }
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
    // A key-value state says so: an empty one is then opened as it is.
    const kv = this.#wasmOpts?.raw ? {} : { kv: true };
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
        return { snapshot: call(hh, "read", (w) => w.snapshot()), appliedLsn: st.appliedLsn, datasetId: ds, savedAt: Date.now(), ...kv };
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
    // The store's copy of this dataset holds the history it went back from.
    if (this.#rewindSincePersist && ds === this.#persistedDataset) opts.rewind = true;
    if (repair && this.#persistRepairOf !== undefined) opts.repairOf = this.#persistRepairOf;
    try {
      await this.#storeCall(this.#store.save(key, { snapshot, appliedLsn: lsn, datasetId: ds, savedAt: Date.now(), ...kv }, opts), "save");
    } catch (e) {
      throw storeError("save", key, e);
    }
    this.#persistRepairOf = undefined;
    this.#persistedLsn = lsn;
    this.#persistedDataset = ds;
    this.#resetSincePersist = false;
    this.#rewindSincePersist = false;
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
