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
    const r = await Replica.open(url, options);
    replicas.set(name, r);
    return r.status();
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
      return rec ? { appliedLsn: rec.appliedLsn, datasetId: rec.datasetId, bytes: rec.snapshot?.length ?? null } : null;
    } finally {
      db.close();
    }
  },
};
