// IndexedDB bytes written per sync in Chromium (issue 9's benchmark), one run
// on this machine. A dataset of WALCAST_BENCH_IDB_KEYS keys (default
// 100,000) with 100-byte values is published with a snapshot, served by
// `walcast serve`, and two replicas in one page follow it:
//   - "incremental": persist: "indexeddb" (a base snapshot plus a log of the
//     batches each sync applied, compacted once the log outgrows the base);
//   - "whole-state": a { load, save } store that puts the whole snapshot()
//     into IndexedDB after every sync that applied something: what
//     persist: "indexeddb" wrote before the log.
// Each round publishes overwrites of random keys (one 100-byte put per
// batch), then syncs each replica in turn; the bytes of every value put to
// IndexedDB are counted by wrapping IDBObjectStore.prototype.put (a typed
// array counts its whole buffer). Rounds: syncs applying about 1 KiB, about
// 100 KiB, then about 2 MiB until the incremental store compacts; the
// amortized figure is the incremental store's bytes written over the bytes
// of batches applied across the 2 MiB rounds, compaction included.
// Figures only: nothing here asserts.
//
// Usage: node tests/js/bench-idb.mjs   (after scripts/build-js.sh and
//   scripts/browser-deps.sh; WALCAST_BIN names the walcast binary, default
//   the newer of target/release/walcast and target/debug/walcast)
import { execFileSync, spawn } from "node:child_process";
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync, statSync, writeSync } from "node:fs";
import http from "node:http";
import { tmpdir } from "node:os";
import { dirname, extname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { CHROMIUM, CHROMIUM_ARGS, DIST, loadPlaywright } from "./edge/lib.mjs";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const candidates = ["release", "debug"].map((p) => join(root, "target", p, "walcast")).filter(existsSync);
const walcast = process.env.WALCAST_BIN ?? candidates.sort((a, b) => statSync(b).mtimeMs - statSync(a).mtimeMs)[0];
if (!walcast) throw new Error("no walcast binary: cargo build -p walcast (or set WALCAST_BIN)");
const N = Number(process.env.WALCAST_BENCH_IDB_KEYS ?? 100_000);
const tmp = mkdtempSync(join(tmpdir(), "walcast-bench-idb-"));
const wal = join(tmp, "wal");
const ds = join(tmp, "ds");
const key = (i) => `key:${String(i).padStart(8, "0")}`;
const say = (...a) => console.error("bench-idb:", ...a);

// A fixed-seed generator: the same keys every run.
let seed = 0x2545f491;
const rand = (n) => {
  seed ^= seed << 13;
  seed ^= seed >>> 17;
  seed ^= seed << 5;
  return (seed >>> 0) % n;
};

function write(batches, perBatch, keyOf) {
  const f = join(tmp, "in.ndjson");
  const fd = openSync(f, "w");
  const value = "v".repeat(100);
  for (let b = 0; b < batches; b++) {
    const ops = [];
    for (let j = 0; j < perBatch; j++) ops.push({ op: "put", key: keyOf(b * perBatch + j), value });
    writeSync(fd, JSON.stringify(perBatch === 1 ? ops[0] : { batch: ops }) + "\n");
  }
  closeSync(fd);
  execFileSync("sh", ["-c", `"${walcast}" write --wal "${wal}" < "${f}" > /dev/null`]);
  rmSync(f);
}

function publish(extra = []) {
  execFileSync(walcast, ["publish", "--wal", wal, "--to", `file://${ds}`, "--once", "--snapshot-every", "0", ...extra], { stdio: "ignore" });
}

// --- the dataset and its server ------------------------------------------------------

say(`walcast ${walcast}; dataset of ${N} keys with 100-byte values`);
write(Math.ceil(N / 1000), 1000, (i) => key(Math.min(i, N - 1)));
execFileSync(walcast, ["publish", "--wal", wal, "--to", `file://${ds}`, "--once", "--snapshot-every", "1"], { stdio: "ignore" });

const server = spawn(walcast, ["serve", ds, "--addr", "127.0.0.1:0"], { stdio: ["ignore", "pipe", "inherit"] });
const dataUrl = await new Promise((resolve, reject) => {
  let buf = "";
  server.stdout.on("data", (d) => {
    buf += d;
    const m = /listening on (\S+)/.exec(buf);
    if (m) resolve(m[1].replace(/\/$/, ""));
  });
  server.once("exit", () => reject(new Error("walcast serve exited")));
});

// --- the page -------------------------------------------------------------------------

const PAGE_JS = `
import { Replica } from "/dist/web.js";
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
let meter = {};
const put = IDBObjectStore.prototype.put;
IDBObjectStore.prototype.put = function (value, key) {
  const s = (meter[this.name] ??= { puts: 0, bytes: 0 });
  s.puts++;
  s.bytes += cloneBytes(value);
  return put.call(this, value, key);
};
const req = (r) => new Promise((resolve, reject) => { r.onsuccess = () => resolve(r.result); r.onerror = () => reject(r.error); });
let wholeDb = null;
async function whole() {
  if (!wholeDb) {
    const r = indexedDB.open("bench-whole", 1);
    r.onupgradeneeded = () => r.result.createObjectStore("whole");
    wholeDb = await req(r);
  }
  return wholeDb;
}
// What persist: "indexeddb" did before the log: the whole state per write.
const wholeStore = {
  async load(url) { const db = await whole(); return req(db.transaction("whole").objectStore("whole").get(url)); },
  async save(url, rec) {
    const db = await whole();
    const tx = db.transaction("whole", "readwrite");
    tx.objectStore("whole").put(rec, url);
    await new Promise((resolve, reject) => { tx.oncomplete = resolve; tx.onerror = () => reject(tx.error); });
  },
};
const replicas = {};
window.bench = {
  async open(name, url) {
    replicas[name] = await Replica.open(url, { persist: name === "whole" ? wholeStore : "indexeddb" });
  },
  async sync(name) {
    meter = {};
    const before = replicas[name].status().bytesReceived;
    const t = performance.now();
    const lsn = await replicas[name].sync();
    const ms = performance.now() - t;
    return { lsn, ms, received: replicas[name].status().bytesReceived - before, meter };
  },
  /** A new replica opened from the store (what a reload does): ms to open, the LSN. */
  async reopen(url) {
    const t = performance.now();
    const r = await Replica.open(url, { persist: "indexeddb" });
    r.get("key:00000000");
    const ms = performance.now() - t;
    const lsn = r.status().appliedLsn;
    await r.close();
    return { ms, lsn };
  },
  async record(url) {
    const db = await req(indexedDB.open("walcast"));
    const r = await req(db.transaction("replicas").objectStore("replicas").get(url));
    db.close();
    return r ? { appliedLsn: r.appliedLsn, baseLsn: r.baseLsn, baseBytes: r.baseBytes, logBytes: r.logBytes } : null;
  },
};
window.benchReady = true;
`;
const TYPES = { ".js": "text/javascript", ".wasm": "application/wasm" };
const pageServer = http.createServer((q, res) => {
  const p = new URL(q.url, "http://x").pathname;
  if (p === "/") {
    res.writeHead(200, { "content-type": "text/html" });
    return res.end('<!doctype html><script type="module" src="/page.js"></script>');
  }
  if (p === "/page.js") {
    res.writeHead(200, { "content-type": "text/javascript" });
    return res.end(PAGE_JS);
  }
  const f = join(DIST, p.slice("/dist/".length));
  if (p.startsWith("/dist/") && !p.includes("..") && existsSync(f)) {
    res.writeHead(200, { "content-type": TYPES[extname(f)] ?? "application/octet-stream" });
    return res.end(readFileSync(f));
  }
  res.writeHead(404);
  res.end();
});
await new Promise((r) => pageServer.listen(0, "127.0.0.1", r));

const { chromium } = await loadPlaywright();
const browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
const rows = [];
try {
  const page = await (await browser.newContext()).newPage();
  await page.goto(`http://127.0.0.1:${pageServer.address().port}/`);
  await page.waitForFunction(() => window.benchReady === true);
  const sync = (name) => page.evaluate((n) => window.bench.sync(n), name);
  for (const name of ["incremental", "whole"]) await page.evaluate(([n, u]) => window.bench.open(n, u), [name, dataUrl]);

  const total = (m) => Object.values(m).reduce((n, s) => n + s.bytes, 0);
  const round = async (label, batches) => {
    if (batches > 0) {
      write(batches, 1, () => key(rand(N)));
      publish();
    }
    const inc = await sync("incremental");
    const whole = await sync("whole");
    if (inc.lsn !== whole.lsn) throw new Error(`the replicas disagree: ${inc.lsn} vs ${whole.lsn}`);
    const rec = await page.evaluate((u) => window.bench.record(u), dataUrl);
    const row = {
      label,
      batches,
      lsn: inc.lsn,
      applied: inc.meter.log?.bytes ?? 0,
      incremental: total(inc.meter),
      base: inc.meter.bases?.bytes ?? 0,
      whole: total(whole.meter),
      incMs: inc.ms,
      wholeMs: whole.ms,
      rec,
    };
    rows.push(row);
    say(
      `${label}: LSN ${row.lsn}; incremental ${row.incremental} B (log ${row.applied} B, base ${row.base} B; ${row.incMs.toFixed(0)} ms), ` +
        `whole-state ${row.whole} B (${row.wholeMs.toFixed(0)} ms); store ${JSON.stringify(rec)}`,
    );
    return row;
  };

  await round("first sync (bootstrap)", 0);
  for (let i = 0; i < 3; i++) await round("~1 KiB", 8);
  for (let i = 0; i < 3; i++) await round("~100 KiB", 800);
  // ~2 MiB rounds until the incremental store compacts (at most 12).
  const big = [];
  let reopenBefore = null;
  for (let i = 0; i < 12; i++) {
    const r = await round("~2 MiB", 16_000);
    big.push(r);
    if (r.base > 0) break;
    reopenBefore = { ...(await page.evaluate((u) => window.bench.reopen(u), dataUrl)), logBytes: r.rec.logBytes };
  }
  const reopenAfter = await page.evaluate((u) => window.bench.reopen(u), dataUrl);
  say(`reopen: with a ${reopenBefore?.logBytes} B log ${reopenBefore?.ms.toFixed(0)} ms; right after the compaction ${reopenAfter.ms.toFixed(0)} ms`);

  // --- report -----------------------------------------------------------------------
  const kib = (b) => `${(b / 1024).toFixed(1)} KiB`;
  const first = rows[0];
  console.log(`\n### IndexedDB bytes written per sync (Chromium ${browser.version()}, ${N.toLocaleString("en")} keys, 100-byte values)\n`);
  console.log(`Base (whole state) written by the first sync: ${kib(first.incremental)} incremental, ${kib(first.whole)} whole-state.\n`);
  console.log("| sync | batches applied | bytes of batches (log chunk) | incremental: bytes written | whole-state: bytes written | ratio |");
  console.log("| --- | --- | --- | --- | --- | --- |");
  const avg = (label) => {
    const rs = rows.filter((r) => r.label === label && r.base === 0);
    const mean = (f) => rs.reduce((n, r) => n + f(r), 0) / rs.length;
    return { label, n: rs.length, batches: mean((r) => r.batches), applied: mean((r) => r.applied), inc: mean((r) => r.incremental), whole: mean((r) => r.whole) };
  };
  for (const a of [avg("~1 KiB"), avg("~100 KiB"), avg("~2 MiB")]) {
    if (!a.n) continue;
    console.log(`| ${a.label} (mean of ${a.n}) | ${a.batches} | ${kib(a.applied)} | ${kib(a.inc)} | ${kib(a.whole)} | ${(a.whole / a.inc).toFixed(0)}× fewer |`);
  }
  const compaction = big.find((r) => r.base > 0);
  const appliedBytes = big.reduce((n, r) => n + r.batches, 0);
  const incBytes = big.reduce((n, r) => n + r.incremental, 0);
  const wholeBytes = big.reduce((n, r) => n + r.whole, 0);
  const logOnly = big.filter((r) => r.base === 0);
  const perBatch = logOnly.length ? logOnly.reduce((n, r) => n + r.applied, 0) / logOnly.reduce((n, r) => n + r.batches, 0) : NaN;
  if (compaction) {
    console.log(
      `\nCompaction: after ${big.length} syncs of ~2 MiB the log outgrew the base; that sync wrote ${kib(compaction.incremental)} ` +
        `(the whole state) in ${compaction.incMs.toFixed(0)} ms (an incremental ~2 MiB sync: ${(logOnly.reduce((n, r) => n + r.incMs, 0) / Math.max(1, logOnly.length)).toFixed(0)} ms). ` +
        `Over those ${big.length} syncs (${appliedBytes.toLocaleString("en")} batches, about ${kib(appliedBytes * perBatch)} of batches) the incremental store wrote ` +
        `${kib(incBytes)}: ${(incBytes / (appliedBytes * perBatch)).toFixed(2)} bytes per byte of batches applied, compaction included; ` +
        `the whole-state store wrote ${kib(wholeBytes)} (${(wholeBytes / (appliedBytes * perBatch)).toFixed(1)} per byte).`,
    );
  } else {
    console.log(`\nNo compaction within ${big.length} syncs of ~2 MiB.`);
  }
  if (reopenBefore) {
    console.log(
      `\nA reload (Replica.open from IndexedDB to the first read): ${reopenAfter.ms.toFixed(0)} ms from the base alone (right after the compaction), ` +
        `${reopenBefore.ms.toFixed(0)} ms from the base plus a ${kib(reopenBefore.logBytes)} log (the largest before it).`,
    );
  }
} finally {
  await browser.close().catch(() => {});
  await new Promise((r) => pageServer.close(r));
  server.kill();
  rmSync(tmp, { recursive: true, force: true });
}
