// Many hostile clients at once against the worker in LOAD=lazy mode, over a
// real dataset (`walcast write` + `walcast publish --once`) served by a small
// Node server that honours Range (or, to inject a fault, ignores it):
// `node --test --test-force-exit tests/js/hostile.test.mjs` (after
// scripts/build-js.sh; uses target/debug/walcast or WALCAST_BIN).
//
// - Concurrent /kv reads of keys in distinct snapshot blocks: the block GETs
//   in flight at once must stay under a fixed cap, not grow with requests.
// - An origin that ignores Range (answers 200 with the whole snapshot): the
//   bytes pulled for N concurrent reads must not be N whole snapshots.
// - Every block answer must not re-run every waiting read (N reads waiting
//   on N blocks must not cost N^2 module reads).
// - A whole copy such an origin sent is not replayed where it is wrong: to
//   the read after a damaged one, to the module's retry, or to reads of a
//   new dataset at the same prefix (a snapshot under the same key).
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import http from "node:http";
import { tmpdir } from "node:os";
import path from "node:path";
import { after, test } from "node:test";
import { pathToFileURL } from "node:url";
import { walcastBin } from "./datasets.mjs";
import * as glue from "../../js/dist/wasm/walcast_wasm.js";

const { Replica } = await import("walcast");
const { createHandler } = await import("../../worker/src/handler.js");

const bin = walcastBin();
const tmp = fs.mkdtempSync(path.join(tmpdir(), "walcast-hostile-"));
after(() => fs.rmSync(tmp, { recursive: true, force: true }));

// 20,000 keys of about 100 bytes: a version 2 snapshot of about 2.5 MB in
// about 150 blocks of 16 KiB (it fits the default 8 MiB cache).
const KEYS = 20000;
const keyOf = (i) => `k:${String(i).padStart(6, "0")}`;
function buildDataset(name = "ds", fill = "v") {
  const wal = path.join(tmp, `${name}.wal`);
  const dir = path.join(tmp, name);
  const lines = [];
  for (let b = 0; b < 20; b++) {
    const ops = [];
    for (let i = b * 1000; i < (b + 1) * 1000; i++) ops.push({ op: "put", key: keyOf(i), value: `${fill.repeat(90)}${i}` });
    lines.push(JSON.stringify({ batch: ops }));
  }
  execFileSync(bin, ["write", "--wal", wal], { input: lines.join("\n") + "\n", stdio: ["pipe", "pipe", "pipe"] });
  execFileSync(bin, ["publish", "--wal", wal, "--to", pathToFileURL(dir).href, "--once", "--snapshot-every", "20"], { stdio: ["pipe", "pipe", "pipe"] });
  const head = JSON.parse(fs.readFileSync(path.join(dir, "catalog/head.json"), "utf8"));
  assert.ok(head.snapshot && head.snapshot.version >= 2, `a block-indexed snapshot: ${JSON.stringify(head.snapshot)}`);
  return { dir, snapshotSize: head.snapshot.size, snapshotKey: head.snapshot.key };
}
const ds = buildDataset();

/**
 * Serves `dir` under /ds with Range; snapshot answers wait `delayMs` (so
 * concurrent GETs overlap) and are counted: `peak` in flight, `bytes` sent.
 * `ignoreRange`: every answer is the whole object; `corrupt`: that many
 * snapshot answers come damaged; `live`: files are read on every GET.
 */
async function origin(dir, { delayMs = 200, ignoreRange = false, corrupt = 0, live = false } = {}) {
  const files = new Map();
  const stats = { inflight: 0, peak: 0, gets: 0, bytes: 0 };
  const server = http.createServer(async (req, res) => {
    const key = decodeURIComponent(new URL(req.url, "http://x").pathname.replace(/^\/ds\//, ""));
    const file = path.join(dir, key);
    if (!fs.existsSync(file)) return res.writeHead(404).end();
    // live: read on every GET (the directory changes under the server).
    if (!files.has(file) || live) files.set(file, fs.readFileSync(file));
    const data = files.get(file);
    const snap = key.startsWith("snapshots/");
    if (snap) {
      stats.gets++;
      stats.peak = Math.max(stats.peak, ++stats.inflight);
      // stats.gate, when set: snapshot answers wait for it (a stalled store).
      if (stats.gate) await stats.gate;
      await new Promise((r) => setTimeout(r, delayMs));
    }
    const m = /^bytes=(\d*)-(\d*)$/.exec(req.headers.range ?? "");
    let body = data;
    const h = { etag: '"1"' };
    let status = 200;
    if (m && !ignoreRange) {
      const s = m[1] === "" ? data.length - Number(m[2]) : Number(m[1]);
      const e = m[1] === "" || m[2] === "" ? data.length : Math.min(data.length, Number(m[2]) + 1);
      body = data.subarray(s, e);
      status = 206;
      h["content-range"] = `bytes ${s}-${e - 1}/${data.length}`;
    }
    // The first `corrupt` snapshot answers have a byte of the first data block flipped.
    if (snap && corrupt > 0) {
      corrupt--;
      body = Buffer.from(body);
      body[100] ^= 0xff; // in the first data block
    }
    if (snap) stats.bytes += body.length;
    res.writeHead(status, h);
    res.end(body, () => {
      if (snap) stats.inflight--;
    });
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  after(() => server.close());
  return { url: `http://127.0.0.1:${server.address().port}/ds`, stats };
}

/** A worker (the shared handler over the real package) in LOAD=lazy mode, opened. */
async function lazyWorker(url) {
  const handle = createHandler(Replica, { log: () => {} });
  const env = { DATASET_URL: url, LOAD: "lazy" };
  const defer = (p) => p.catch(() => {});
  const st = await handle(new Request("http://w/status"), env, defer);
  assert.equal(st.status, 200);
  return (p) => handle(new Request(`http://w${p}`), env, defer);
}

/** `n` keys spread evenly over the key space (each in its own block when n is below the block count). */
const spread = (n) => Array.from({ length: n }, (_, i) => keyOf(Math.floor((i * KEYS) / n)));

test("LOAD=lazy: concurrent reads of distinct keys keep a bounded number of block GETs in flight", { timeout: 60_000 }, async () => {
  const o = await origin(ds.dir, { delayMs: 300 });
  const get = await lazyWorker(o.url);
  const n = 120;
  const res = await Promise.all(spread(n).map((k) => get(`/kv/${k}`)));
  assert.deepEqual([...new Set(res.map((r) => r.status))], [200]);
  // A cap per isolate (a few times CONCURRENCY) would do; what must not
  // happen is one GET per waiting request.
  assert.ok(o.stats.peak <= 32, `${o.stats.peak} snapshot GETs were in flight at once for ${n} concurrent requests (${o.stats.gets} in all)`);
});

test("LOAD=lazy: reads whose callers gave up (their signal aborted) leave the queue and queue no more GETs", { timeout: 60_000 }, async () => {
  const o = await origin(ds.dir, { delayMs: 0 });
  const r = await Replica.open(o.url, { load: "lazy" });
  try {
    // The snapshot's index is read; then the store stalls, and twice as
    // many reads as run at once (32), each of a key in its own block, are
    // made; then every caller gives up.
    await r.get(keyOf(0));
    const before = o.stats.gets;
    let release;
    o.stats.gate = new Promise((res) => (release = res));
    const n = 64;
    const acs = Array.from({ length: n }, () => new AbortController());
    const reads = spread(n).map((k, i) => r.get(k, { signal: acs[i].signal }));
    while (o.stats.gets === before) await new Promise((res) => setTimeout(res, 10));
    for (const ac of acs) ac.abort();
    // The store answers again: the reads reject once their GETs out are
    // answered, and what goes out is at most what the reads that had
    // started asked for, not a block for every abandoned read.
    release();
    o.stats.gate = null;
    const settled = await Promise.allSettled(reads);
    // (A read of a key in the block already cached had its answer at once.)
    const given = settled.filter((x) => x.status === "rejected");
    assert.deepEqual([...new Set(given.map((x) => x.reason?.name))], ["AbortError"]);
    assert.ok(given.length >= n - 2, `${given.length} of ${n} reads rejected`);
    for (let i = 0; i < 100 && o.stats.inflight > 0; i++) await new Promise((res) => setTimeout(res, 20));
    await new Promise((res) => setTimeout(res, 300));
    assert.ok(o.stats.gets - before <= 36, `${o.stats.gets - before} snapshot GETs for ${n} reads given up, 32 of them never started`);
    // The replica still reads.
    const k = spread(n)[5];
    assert.equal(new TextDecoder().decode(await r.get(k)), `${"v".repeat(90)}${Number(k.slice(2))}`);
    const aborted = new AbortController();
    aborted.abort();
    await assert.rejects(r.get(k, { signal: aborted.signal }), { name: "AbortError" });
    await assert.rejects(r.get(k, { signal: "soon" }), { code: "invalid_input" });
  } finally {
    await r.close();
  }
});

test("LOAD=lazy: a read that has its answer does not wait for GETs other reads queued", { timeout: 60_000 }, async () => {
  const o = await origin(ds.dir, { delayMs: 50 });
  const get = await lazyWorker(o.url);
  const n = 120;
  const order = [];
  await Promise.all(
    spread(n).map((k, i) =>
      get(`/kv/${k}`).then((r) => {
        assert.equal(r.status, 200);
        order.push(i);
      }),
    ),
  );
  // The first reads go out first (block GETs are capped, the rest queue):
  // they are answered among the first half, not held until the queue drains.
  const rank = (i) => order.indexOf(i);
  const late = [0, 1, 2, 3].filter((i) => rank(i) >= n / 2);
  assert.deepEqual(late, [], `reads 0-3 finished at ranks ${[0, 1, 2, 3].map(rank)} of ${n}`);
});

test("LOAD=lazy: an origin that ignores Range is not sent one whole-snapshot GET per concurrent read", { timeout: 60_000 }, async () => {
  const o = await origin(ds.dir, { delayMs: 300, ignoreRange: true });
  const get = await lazyWorker(o.url);
  const n = 40;
  const before = o.stats.bytes;
  const res = await Promise.all(spread(n).map((k) => get(`/kv/${k}`)));
  assert.deepEqual([...new Set(res.map((r) => r.status))], [200]);
  const mb = (o.stats.bytes - before) / 1e6;
  const snapMb = ds.snapshotSize / 1e6;
  // Every answer holds the whole snapshot; the replica buffers each (up to
  // CACHE_BYTES apiece). A few whole copies at once are expected, not n.
  assert.ok(
    o.stats.bytes - before <= 4 * ds.snapshotSize,
    `${n} concurrent reads pulled ${mb.toFixed(1)} MB (${((o.stats.bytes - before) / ds.snapshotSize).toFixed(1)} whole ${snapMb.toFixed(1)} MB snapshots)`,
  );
});

test("LOAD=lazy: a block answer does not re-run every waiting read (no N^2 module reads)", { timeout: 120_000 }, async () => {
  const o = await origin(ds.dir, { delayMs: 0 });
  const get = await lazyWorker(o.url);
  // Instrumentation only: count the module's point reads.
  let calls = 0;
  const orig = glue.WasmReplica.prototype.getLazy;
  glue.WasmReplica.prototype.getLazy = function (k) {
    calls++;
    return orig.call(this, k);
  };
  try {
    const n = 400;
    const t0 = Date.now();
    const res = await Promise.all(spread(n).map((k) => get(`/kv/${k}`)));
    const ms = Date.now() - t0;
    assert.deepEqual([...new Set(res.map((r) => r.status))], [200]);
    assert.ok(calls <= 10 * n, `${n} concurrent reads made ${calls} module reads (${(calls / n).toFixed(0)} per request) in ${ms} ms`);
  } finally {
    glue.WasmReplica.prototype.getLazy = orig;
  }
});

// Values answered as base64 (not UTF-8), and values of control bytes: valid
// UTF-8 that JSON escapes six bytes for one (`\u0001`), as a value of small
// varints is.
for (const [load, kind] of [["full", "binary"], ["lazy", "binary"], ["full", "control"], ["lazy", "control"]]) {
  test(`/scan (${load}, ${kind} values): an answer is bounded in bytes, not only in rows, and Walcast-Scan-Next pages through the rest`, { timeout: 120_000 }, async () => {
    // 100 keys of 256 KiB values.
    const wal = path.join(tmp, `wal-big-${load}-${kind}`);
    const dir = path.join(tmp, `ds-big-${load}-${kind}`);
    const v = Buffer.alloc(256 << 10);
    for (let i = 0; i < v.length; i++) v[i] = (i * 131 + 7) & (kind === "binary" ? 0xff : 0x1f);
    if (kind === "binary") v[0] = 0xff;
    const lines = [];
    for (let b = 0; b < 10; b++) {
      const ops = [];
      for (let i = 0; i < 10; i++) ops.push({ op: "put", key: `b:${String(b * 10 + i).padStart(4, "0")}`, value_b64: v.toString("base64") });
      lines.push(JSON.stringify({ batch: ops }));
    }
    execFileSync(bin, ["write", "--wal", wal], { input: lines.join("\n") + "\n", stdio: ["pipe", "pipe", "pipe"] });
    execFileSync(bin, ["publish", "--wal", wal, "--to", pathToFileURL(dir).href, "--once", "--snapshot-every", "5"], { stdio: ["pipe", "pipe", "pipe"] });
    const o = await origin(dir, { delayMs: 0 });
    const handle = createHandler(Replica, { log: () => {} });
    // Lazy: a cache that holds every block, so one scan reads them all.
    const env = { DATASET_URL: o.url, LOAD: load, CACHE_BYTES: String(64 << 20) };
    const defer = (p) => p.catch(() => {});
    const keys = [];
    let next = "";
    for (let page = 0; page < 100; page++) {
      // A plain /scan first (the default SCAN_LIMIT of 1000 rows), then the pages it names.
      const res = await handle(new Request(`http://w/scan${page ? `?start=${next}` : ""}`), env, defer);
      assert.equal(res.status, 200);
      const body = await res.arrayBuffer();
      // A worker isolate has 128 MB; one answer must stay well under it.
      assert.ok(body.byteLength <= 8 << 20, `page ${page}: one /scan answered ${(body.byteLength / 1e6).toFixed(1)} MB`);
      const rows = JSON.parse(new TextDecoder().decode(body));
      for (const r of rows) {
        // Control bytes are valid UTF-8, but answered as base64: JSON's escapes would take more.
        assert.equal(r.value, undefined, r.key);
        assert.equal(Buffer.from(r.value_b64, "base64").equals(v), true, r.key);
        keys.push(r.key);
      }
      next = res.headers.get("walcast-scan-next");
      if (next === null) break;
      assert.ok(rows.length > 0 && rows.length < 100, `a cut page holds some rows: ${rows.length}`);
    }
    assert.deepEqual(keys, Array.from({ length: 100 }, (_, i) => `b:${String(i).padStart(4, "0")}`));
  });
}

test("LOAD=lazy: a damaged whole-object answer is not replayed to the reads after it", { timeout: 60_000 }, async () => {
  // An origin that ignores Range, whose first snapshot answer is damaged
  // (a transfer gone wrong): the read that got it fails, the next one
  // fetches the snapshot again and gets the value.
  const o = await origin(ds.dir, { delayMs: 0, ignoreRange: true, corrupt: 1 });
  const r = await Replica.open(o.url, { load: "lazy" });
  try {
    await assert.rejects(r.get(keyOf(5)), (e) => e.code === "data", "the damaged answer fails its read");
    const gets = o.stats.gets;
    const v = await r.getText(keyOf(5)).catch((e) => `rejected: ${e.code}: ${e.message}`);
    assert.equal(v, `${"v".repeat(90)}5`, `the read after it (snapshot GETs: ${gets} before, ${o.stats.gets} after)`);
  } finally {
    await r.close();
  }
});

test("LOAD=lazy: a whole-object copy of the dataset before a reset does not answer reads of the new one", { timeout: 60_000 }, async () => {
  // An origin that ignores Range, serving a directory that is replaced by
  // another dataset whose snapshot has the same key. The copy the first
  // read kept belongs to the old dataset: a read after the reset fetches.
  const other = buildDataset("ds-other", "w");
  assert.equal(other.snapshotKey, ds.snapshotKey, "both snapshots under one key");
  const live = path.join(tmp, "ds-live");
  fs.cpSync(ds.dir, live, { recursive: true });
  const o = await origin(live, { delayMs: 0, ignoreRange: true, live: true });
  const r = await Replica.open(o.url, { load: "lazy" });
  const resets = [];
  r.onReset((e) => resets.push(e));
  try {
    assert.equal(await r.getText(keyOf(5)), `${"v".repeat(90)}5`);
    fs.rmSync(live, { recursive: true });
    fs.cpSync(other.dir, live, { recursive: true });
    await r.sync();
    assert.ok(resets.length >= 1, `the replica started over on the new dataset: ${JSON.stringify(resets)}`);
    const v = await r.getText(keyOf(15000)).catch((e) => `rejected: ${e.code}: ${e.message}`);
    assert.equal(v, `${"w".repeat(90)}15000`);
  } finally {
    await r.close();
  }
});

test("full mode: a damaged whole-object answer is not replayed to the sync after the one it failed", { timeout: 60_000 }, async () => {
  // The same origin: it ignores Range, and its first snapshot answer is
  // damaged. The sync that got it may fail; the next one fetches the
  // snapshot again and loads it.
  const o = await origin(ds.dir, { delayMs: 0, ignoreRange: true, corrupt: 1 });
  const r = await Replica.open(o.url);
  try {
    const first = await r.sync().then(
      () => "loaded",
      (e) => `rejected: ${e.code}`,
    );
    if (first !== "loaded") {
      assert.equal(first, "rejected: data", "the damaged answer fails its sync as a data error");
      const gets = o.stats.gets;
      await r.sync();
      assert.ok(o.stats.gets > gets, "the sync after it fetched the snapshot again");
    }
    assert.equal(r.getText(keyOf(5)), `${"v".repeat(90)}5`);
  } finally {
    await r.close();
  }
});

test("full mode: the module's retry of a range the whole copy answered goes out, so one damaged answer does not fail the sync", { timeout: 60_000 }, async () => {
  const o = await origin(ds.dir, { delayMs: 0, ignoreRange: true, corrupt: 1 });
  const r = await Replica.open(o.url);
  try {
    const first = await r.sync().then(
      () => "loaded",
      (e) => `rejected: ${e.code}: ${e.message}`,
    );
    assert.equal(first, "loaded", `snapshot GETs: ${o.stats.gets}`);
    assert.equal(r.getText(keyOf(5)), `${"v".repeat(90)}5`);
  } finally {
    await r.close();
  }
});

test("a sync that failed settles although a failing server keeps one of the module's retries in flight at every moment", { timeout: 120_000 }, async () => {
  // Two segments too large for the head's tail, no snapshot: a fresh
  // replica fetches both at once.
  const wal = path.join(tmp, "wal-two");
  const dir = path.join(tmp, "ds-two");
  for (const i of [1, 2]) {
    const value = "v".repeat(48 << 10);
    execFileSync(bin, ["write", "--wal", wal], { input: JSON.stringify({ batch: [{ op: "put", key: `k${i}`, value }] }) + "\n", stdio: ["pipe", "pipe", "pipe"] });
    execFileSync(bin, ["publish", "--wal", wal, "--to", pathToFileURL(dir).href, "--once"], { stdio: ["pipe", "pipe", "pipe"] });
  }
  const head = JSON.parse(fs.readFileSync(path.join(dir, "catalog/head.json"), "utf8"));
  assert.ok(head.segments.length >= 2, JSON.stringify(head.segments));
  // Every GET but the head's fails (503), each held until the next one
  // arrives: one is in flight at every moment while the module retries.
  let held = null;
  let gets = 0;
  const fetch = (url, init) => {
    const key = new URL(url).pathname.replace(/^\/ds\//, "");
    if (key === "catalog/head.json") return Promise.resolve(new Response(fs.readFileSync(path.join(dir, key)), { status: 200, headers: { etag: '"h"' } }));
    gets++;
    held?.();
    return new Promise((resolve, reject) => {
      const release = () => resolve(new Response("busy", { status: 503 }));
      held = release;
      init.signal.addEventListener("abort", () => reject(new DOMException("aborted", "AbortError")), { once: true });
    });
  };
  const r = await Replica.open("http://origin.test/ds", { fetch });
  // Timers of at most 1 ms while the sync waits for its last GET: a wait
  // that spins instead of sleeping shows as thousands.
  const timeout = globalThis.setTimeout;
  let instant = 0;
  globalThis.setTimeout = (fn, ms, ...args) => {
    if (!(ms > 1)) instant++;
    return timeout(fn, ms, ...args);
  };
  try {
    const outcome = await r.sync().then(
      () => "synced",
      (e) => `rejected: ${e.code}`,
    );
    assert.equal(outcome, "rejected: unavailable", `${gets} segment GETs; ${JSON.stringify(r.status())}`);
    assert.ok(instant < 200, `${instant} timers of at most 1 ms while the sync settled`);
  } finally {
    globalThis.setTimeout = timeout;
    held?.();
    await r.close();
  }
});

test("a body is read into one buffer of its declared length when that is within the bound, and read whole whatever the length claims", { timeout: 30_000 }, async () => {
  const { performGet } = await import("../../js/dist/http.js");
  const body = new Uint8Array(300_000).map((_, i) => (i * 7) & 0xff);
  // The body in chunks of 1,000 bytes, under a Content-Length that may lie.
  const fetchWith = (length) => () =>
    Promise.resolve(
      new Response(
        new ReadableStream({
          start(c) {
            for (let at = 0; at < body.length; at += 1000) c.enqueue(body.slice(at, at + 1000));
            c.close();
          },
        }),
        { status: 200, headers: length === undefined ? {} : { "content-length": String(length) } },
      ),
    );
  for (const [what, length, maxBytes, want] of [
    ["the true length", body.length, 1 << 20, body.length],
    ["no length", undefined, 1 << 20, body.length],
    ["a length that claims less", 1000, 1 << 20, body.length],
    ["a length that claims more", body.length + 5000, 1 << 20, body.length],
    ["a length past the bound", body.length, 100_000, 100_001],
  ]) {
    const io = { base: "http://origin.test/ds", query: "", headers: [], fetch: fetchWith(length) };
    const res = await performGet(io, { key: "segments/1/x.wseg", timeoutMs: 5000, maxBytes }, new AbortController());
    assert.equal(res.status, 200, what);
    assert.equal(res.body.byteLength, want, what);
    assert.deepEqual(res.body, body.subarray(0, want), what);
    assert.equal(res.body.buffer.byteLength, want, `${what}: the answer holds no buffer larger than its bytes`);
  }
});

test("a key or bound of gigabytes is not copied into the module (no trap, no rebuilt instance), in full and lazy mode; a scan's options must be an object; restore checks its options as open does", { timeout: 120_000 }, async () => {
  const o = await origin(ds.dir, { delayMs: 0 });
  // 4 GiB - 1 of zeros: Node maps them lazily, and only a copy touches them.
  const huge = new Uint8Array(2 ** 32 - 1);
  for (const load of ["full", "lazy"]) {
    const r = await Replica.open(o.url, { load });
    try {
      await r.sync();
      assert.equal(await r.get(huge), undefined, `${load}: get`);
      assert.equal(await r.get(huge.subarray(0, (64 << 10) + 1)), undefined, `${load}: a key one byte too long`);
      assert.deepEqual(await r.scan({ prefix: huge }), [], `${load}: a prefix no key can have`);
      // A start of zeros past the longest key: every key (none starts with 0) is after it.
      const all = await r.scan({ limit: 5 });
      assert.deepEqual(await r.scan({ start: huge, limit: 5 }), all, `${load}: a huge start`);
      assert.deepEqual(await r.scan({ end: huge, limit: 5 }), [], `${load}: a huge end of zeros`);
      assert.equal(r.status().recoveries, 0, `${load}: no trap`);
      assert.equal(await r.getText(keyOf(7)), `${"v".repeat(90)}7`);
      let e = null;
      try {
        await r.scan("k:");
      } catch (x) {
        e = x;
      }
      assert.equal(e?.code, "invalid_input", `${load}: scan("k:")`);
    } finally {
      await r.close();
    }
  }
  for (const bad of [{ pollInterval: "fast" }, { pollInterval: -1 }, { concurrency: 0 }, { onRecord: 5 }]) {
    await assert.rejects(Replica.restore(o.url, new Uint8Array(0), bad), (e) => e.code === "invalid_input", JSON.stringify(bad));
  }
});

test("a GET's deadline cancels the body of a custom fetch that ignores the abort signal", { timeout: 30_000 }, async () => {
  const { performGet } = await import("../../js/dist/http.js");
  let cancelled = false;
  let sent = 0;
  // Headers at once, then a byte every 20 ms of a body that never ends.
  const fetch = () =>
    Promise.resolve(
      new Response(
        new ReadableStream({
          async pull(c) {
            await new Promise((r) => setTimeout(r, 20));
            sent++;
            c.enqueue(new Uint8Array([0x7b]));
          },
          cancel() {
            cancelled = true;
          },
        }),
        { status: 200 },
      ),
    );
  const io = { base: "http://origin.test/ds", query: "", headers: [], fetch };
  const res = await performGet(io, { key: "segments/1/x.wseg", timeoutMs: 200, maxBytes: 1 << 20 }, new AbortController());
  assert.equal(res.status, 0);
  const at = sent;
  await new Promise((r) => setTimeout(r, 300));
  assert.ok(cancelled, "the body was cancelled at the deadline");
  assert.ok(sent <= at + 1, `the body was read on after the deadline: ${sent - at} more bytes`);
});
