// The Chromium test page's module (served by chromium.test.mjs from
// 127.0.0.1, a secure context). Imports the package's browser entry
// (/dist/web.js: the .wasm is fetched and compiled next to it) and the shared
// conformance cases, and exposes what the runner drives on `window.walcastTest`.
import * as walcast from "/dist/web.js";
import { conformanceCases } from "/conformance.js";

const { Replica } = walcast;
let cases = null;
let logs = [];
const replicas = new Map(); // name -> Replica
const errors = new Map(); // name -> errors reported to onError

// --- IndexedDB meter: bytes of every value put, per object store --------------------
// What a structured clone stores: a typed array with its whole buffer, a
// string two bytes a character, a number 8 bytes, objects their fields.
function cloneBytes(v) {
  if (v === null || v === undefined || typeof v === "boolean") return 1;
  if (typeof v === "number") return 8;
  if (typeof v === "string") return 2 * v.length;
  if (ArrayBuffer.isView(v)) return v.buffer.byteLength;
  if (v instanceof ArrayBuffer) return v.byteLength;
  if (Array.isArray(v)) return v.reduce((n, x) => n + cloneBytes(x), 0);
  if (typeof v === "object") return Object.entries(v).reduce((n, [k, x]) => n + 2 * k.length + cloneBytes(x), 0);
  return 0;
}
const meter = { puts: 0, bytes: 0, stores: {} };
{
  const put = IDBObjectStore.prototype.put;
  IDBObjectStore.prototype.put = function (value, key) {
    const b = cloneBytes(value);
    const s = (meter.stores[this.name] ??= { puts: 0, bytes: 0 });
    s.puts++;
    s.bytes += b;
    meter.puts++;
    meter.bytes += b;
    return put.call(this, value, key);
  };
}

function openIdb() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open("walcast");
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

function request(req) {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

function b64dec(s) {
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

function hex(b) {
  return [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
}

const enc = new TextEncoder();
const keyBytes = (k) => (typeof k === "string" ? enc.encode(k) : k);

/** Compares the replica with expected entries ([b64 key, b64 value] in key order). */
function compare(r, entries) {
  const rows = r.scan();
  if (rows.length !== entries.length) return `scan has ${rows.length} rows, expected ${entries.length}`;
  for (let i = 0; i < rows.length; i++) {
    const k = hex(keyBytes(rows[i].key));
    const v = hex(rows[i].value);
    if (k !== hex(b64dec(entries[i][0]))) return `row ${i}: key ${k}, expected ${hex(b64dec(entries[i][0]))}`;
    if (v !== hex(b64dec(entries[i][1]))) return `row ${i} (${k}): value differs`;
    const g = r.get(b64dec(entries[i][0]));
    if (!g || hex(g) !== v) return `get(${k}) differs from its scan row`;
  }
  return null;
}

window.walcastTest = {
  ready: true,

  /** Builds the conformance cases for an orchestrator instance; returns their names. */
  setup(fixtures, control) {
    cases = conformanceCases({
      walcast,
      fixtures,
      runtime: `chromium ${navigator.userAgent}`,
      log: (...a) => logs.push(a.map(String).join(" ")),
      mutate: async (name) => {
        const r = await fetch(`${control}/instances/${fixtures.instance}/mutate/${name}`, { method: "POST" });
        const body = await r.json();
        if (!r.ok) throw new Error(`mutate ${name}: ${body.error ?? r.status}`);
        return body;
      },
    });
    return cases.map((c) => c.name);
  },

  async runCase(i) {
    const c = cases[i];
    logs = [];
    const t0 = performance.now();
    let error = null;
    try {
      await c.fn();
    } catch (e) {
      error = String(e?.stack ?? e);
    }
    return { name: c.name, ok: !error, ms: Math.round(performance.now() - t0), error, logs };
  },

  /** Opens (or reopens) a replica kept under `name`; returns its status. No request is made. */
  async open(name, url, options = {}) {
    const errs = [];
    errors.set(name, errs);
    const r = await Replica.open(url, { ...options, onError: (e) => errs.push({ code: e.code, message: e.message, lsn: e.lsn, object: e.object }) });
    replicas.set(name, r);
    return r.status();
  },

  /** Errors reported to `name`'s onError since it was opened. */
  errors(name) {
    return errors.get(name) ?? [];
  },

  /** The IndexedDB meter: { puts, bytes, stores: { name: { puts, bytes } } } since the last reset. */
  meter(reset = false) {
    const out = JSON.parse(JSON.stringify(meter));
    if (reset) {
      meter.puts = 0;
      meter.bytes = 0;
      meter.stores = {};
    }
    return out;
  },

  /**
   * Damages the persisted log of `url`: "drop-last" deletes its last chunk,
   * "corrupt-first" flips a payload byte of the first record of its first
   * chunk. Returns the chunks' first LSNs before. "corrupt-base" flips a
   * byte in the middle of the base snapshot instead; "claims-huge" makes
   * the record claim 2^53 bytes of log and a 1 TiB base.
   */
  async damageLog(url, how) {
    const db = await openIdb();
    try {
      if (how === "corrupt-base") {
        const tx = db.transaction("bases", "readwrite");
        const base = await request(tx.objectStore("bases").get(url));
        const copy = base.slice();
        copy[copy.length >> 1] ^= 0x20;
        await request(tx.objectStore("bases").put(copy, url));
        return [];
      }
      if (how === "claims-huge") {
        const tx = db.transaction("replicas", "readwrite");
        const rec = await request(tx.objectStore("replicas").get(url));
        await request(tx.objectStore("replicas").put({ ...rec, logBytes: 2 ** 53, baseBytes: 2 ** 40 }, url));
        return [];
      }
      const tx = db.transaction("log", "readwrite");
      const store = tx.objectStore("log");
      const range = IDBKeyRange.bound([url, 0], [url, Infinity]);
      const keys = await request(store.getAllKeys(range));
      if (keys.length === 0) throw new Error(`no log chunk for ${url}`);
      if (how === "drop-last") {
        await request(store.delete(keys[keys.length - 1]));
      } else if (how === "corrupt-first") {
        const chunk = await request(store.get(keys[0]));
        const copy = chunk.slice();
        copy[16] ^= 0x20; // the first byte of the first payload
        await request(store.put(copy, keys[0]));
      } else {
        throw new Error(`damageLog: unknown ${how}`);
      }
      await new Promise((resolve, reject) => {
        tx.oncomplete = resolve;
        tx.onerror = () => reject(tx.error);
      });
      return keys.map((k) => k[1]);
    } finally {
      db.close();
    }
  },

  async sync(name) {
    const r = replicas.get(name);
    try {
      const lsn = await r.sync();
      return { lsn, status: r.status() };
    } catch (e) {
      return { error: { code: e.code, message: e.message }, status: r.status() };
    }
  },

  status(name) {
    return replicas.get(name).status();
  },

  /** null when the replica equals the entries, else what differs. */
  compare(name, entries) {
    return compare(replicas.get(name), entries);
  },

  getText(name, key) {
    return replicas.get(name).getText(key) ?? null;
  },

  async close(name) {
    const r = replicas.get(name);
    replicas.delete(name);
    if (r) await r.close();
  },

  /** The raw IndexedDB record of `url` (what the next open restores). */
  async persisted(url) {
    const db = await new Promise((resolve, reject) => {
      const req = indexedDB.open("walcast");
      req.onsuccess = () => resolve(req.result);
      req.onerror = () => reject(req.error);
    });
    try {
      if (!db.objectStoreNames.contains("replicas")) return null;
      const rec = await new Promise((resolve, reject) => {
        const req = db.transaction("replicas", "readonly").objectStore("replicas").get(url);
        req.onsuccess = () => resolve(req.result);
        req.onerror = () => reject(req.error);
      });
      if (!rec) return null;
      const out = { appliedLsn: rec.appliedLsn, datasetId: rec.datasetId, bytes: rec.snapshot?.length ?? null, format: rec.format ?? 1 };
      if (rec.format === 2) Object.assign(out, { baseLsn: rec.baseLsn, baseBytes: rec.baseBytes, logBytes: rec.logBytes });
      return out;
    } finally {
      db.close();
    }
  },
};
