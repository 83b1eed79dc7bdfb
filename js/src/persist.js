// Persistence: picking the store of `persist`, bounding its calls in time,
// and reopening a WasmReplica from a persisted record (its base and log),
// checked against its bytes before any use.

import { WasmReplica } from "./wasm/walcast_wasm.js";
import { indexedDbStore } from "./idb.js";
import { MAX_TIMER_MS, walcastError } from "./util.js";

/** Default `persistTimeoutMs`: how long one call of the persist store may take. */
export const DEFAULT_PERSIST_TIMEOUT_MS = 30_000;

/**
 * `p` (a persist store's call), or a rejection once `ms` pass: a store that
 * never answers (a custom one, an IndexedDB lock held by a stuck tab) fails
 * that call instead of holding up every sync, `start()` and `close()`.
 */
export function storeCall(p, method, ms) {
  ms = Math.min(ms, MAX_TIMER_MS);
  let t;
  const late = new Promise((_, reject) => {
    t = setTimeout(() => reject(new Error(`${method} did not settle within ${ms} ms`)), ms);
  });
  return Promise.race([Promise.resolve(p), late]).finally(() => clearTimeout(t));
}

/** The store `persist` names: null (memory), the IndexedDB store, or a caller's `{ load, save }`. */
export function pickStore(persist) {
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
export function restoreRecord(wasmOpts, rec, key) {
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
    // A damaged base: nothing of the copy is usable. Say whose copy it is,
    // and what the store found (a base it could not read back) if it did.
    if (e?.code !== "data") throw e;
    const found = typeof rec.damaged === "string" ? `${rec.damaged}; ` : "";
    throw walcastError("data", `walcast: the persisted copy of ${key} (LSN ${shown}) is damaged: ${found}${e.message}; starting over`, {
      object: e.object ?? "persisted snapshot",
      ...(e.lsn !== undefined ? { lsn: e.lsn } : {}),
    });
  }
  let damage = null;
  let otherDataset = false;
  try {
    const got = w.status().appliedLsn;
    // A key-value replica never opens at an LSN with no keys and no log
    // from the store: older versions kept a raw replica's record (no
    // key-value state) under this same key. An empty state is cheap to
    // fetch again; a raw record read as one would miss every key.
    // A record that says it holds a key-value state (`kv`, written since)
    // is one: a dataset whose keys were all deleted opens from it.
    if (!wasmOpts?.raw && rec.kv !== true && got > 0 && w.size === 0 && !chunks?.some((c) => c.length > 0)) {
      throw walcastError(
        "data",
        `walcast: the persisted copy of ${key} (LSN ${shown}) holds no keys and no log, as a raw replica's record kept under this key by older versions does; starting over from the dataset`,
        { object: "persisted snapshot" },
      );
    }
    // The record names its base's dataset: one naming another (tampered,
    // another program's) would have every later write refused as that
    // dataset's.
    const base = w.status().datasetId ?? null;
    otherDataset = rec.datasetId != null && rec.datasetId !== base;
    if (otherDataset) why ??= `it names dataset ${String(rec.datasetId).slice(0, 40)}, its base ${base}`;
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
  // `replace`: the record names another dataset than its base (the next
  // write must replace it).
  return { w, damage, replace: otherDataset };
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
export function storeError(method, key, e) {
  if (e?.name === "WalcastError") return e;
  const what = e instanceof Error ? `${e.name}: ${e.message}` : String(e);
  return walcastError("persist", `walcast: the persist store's ${method}(${key}) failed: ${what.slice(0, 500)}`, {
    object: `persist store ${method}`,
    cause: e,
  });
}
