// Unit tests of worker/src/handler.js with a fake Replica and a fake clock:
// when requests wait, when background syncs start, the stuck-sync watchdog,
// key and scan encoding. `node --test tests/js/workerd/handler.test.mjs`
import assert from "node:assert/strict";
import { test } from "node:test";
import { createHandler, percentBytes } from "../../../worker/src/handler.js";

const enc = new TextEncoder();
const hex = (b) => Buffer.from(b).toString("hex");

/** A fake of the package's Replica: a sorted Map of hex keys, syncs under test control. */
function fakeReplicaClass() {
  const made = [];
  class FakeReplica {
    constructor(url, entries = new Map(), lsn = 0) {
      this.url = url;
      this.entries = entries;
      this.lsn = lsn;
      this.requests = 0;
      this.bytes = 0;
      this.syncCalls = [];
      this.scanMaxBytes = [];
      this.closed = false;
      made.push(this);
    }
    static async open(url) {
      return new FakeReplica(url);
    }
    static async restore(url, snap) {
      return new FakeReplica(url, new Map(snap.entries), snap.lsn);
    }
    snapshot() {
      return { entries: [...this.entries], lsn: this.lsn };
    }
    /** Each call returns a promise the test settles: this.syncCalls[i].resolve(lsn) / .reject(e). */
    sync() {
      let call;
      const p = new Promise((resolve, reject) => {
        call = {
          resolve: (lsn) => {
            this.lsn = lsn;
            resolve(lsn);
          },
          reject,
        };
      });
      this.syncCalls.push(call);
      return p;
    }
    put(k, v) {
      this.entries.set(hex(typeof k === "string" ? enc.encode(k) : k), typeof v === "string" ? enc.encode(v) : v);
    }
    get(key) {
      return this.entries.get(hex(key));
    }
    /** Like the package's: ends at the row whose keys and values reach `maxBytes`. */
    scan({ prefix, start, limit, maxBytes }) {
      this.scanMaxBytes.push(maxBytes);
      let left = maxBytes ?? Infinity;
      const rows = [];
      for (const h of [...this.entries.keys()].sort()) {
        if (rows.length >= limit || left <= 0) break;
        if (prefix && !h.startsWith(hex(prefix))) continue;
        if (start && h < hex(start)) continue;
        const kb = Buffer.from(h, "hex");
        const s = kb.toString("utf8");
        const value = this.entries.get(h);
        left -= kb.length + value.byteLength;
        rows.push({ key: Buffer.from(s).equals(kb) ? s : new Uint8Array(kb), value });
      }
      return rows;
    }
    status() {
      return { appliedLsn: this.lsn, requests: this.requests, bytesReceived: this.bytes, lastError: null };
    }
    async close() {
      this.closed = true;
    }
  }
  return { FakeReplica, made };
}

function setup(env = {}) {
  const { FakeReplica, made } = fakeReplicaClass();
  let t = 1_000_000;
  const clock = { now: () => t, advance: (ms) => (t += ms) };
  const handle = createHandler(FakeReplica, { now: clock.now, log: () => {} });
  const deferred = [];
  const call = (p) => handle(new Request(`http://w${p}`), { DATASET_URL: "http://ds/x", ...env }, (q) => deferred.push(q));
  return { handle, call, made, clock, deferred };
}

const flush = () => new Promise((r) => setImmediate(r));

test("the first request waits for the initial sync; later ones answer at once", async () => {
  const { call, made } = setup();
  const first = call("/kv/a");
  await flush();
  assert.equal(made.length, 1, "one replica");
  const r = made[0];
  assert.equal(r.syncCalls.length, 1, "the first request started a sync");
  let answered = false;
  first.then(() => (answered = true));
  await flush();
  assert.equal(answered, false, "the first request waits for the sync");
  r.put("a", "1");
  r.syncCalls[0].resolve(5);
  const res = await first;
  assert.equal(res.status, 200);
  assert.equal(await res.text(), "1");
  assert.equal(res.headers.get("x-walcast-lsn"), "5");
});

test("a malformed request to an isolate still waiting for its first sync is answered 400 at once; a request that waited in vain gets 503 with Retry-After", async () => {
  const { call, made } = setup({ FIRST_SYNC_WAIT_MS: "50" });
  for (const bad of ["/kv/a?min_lsn=x", "/kv", "/scan?limit=abc", "/scan?start=b&end=a"]) {
    let answered = false;
    const p = call(bad).then((r) => {
      answered = true;
      return r;
    });
    await flush();
    await flush();
    assert.equal(answered, true, `${bad} waited for the first sync`);
    assert.equal((await p).status, 400, bad);
  }
  // The first sync never ends: a well-formed read waits FIRST_SYNC_WAIT_MS, then 503.
  const res = await call("/kv/a");
  assert.equal(made[0].syncCalls.length, 1);
  assert.equal(res.status, 503);
  assert.equal(res.headers.get("retry-after"), "1");
});

test("DATASET_PREFIX with a \".\" or \"..\" segment (which would name another prefix than tokens cover) is a configuration error", async () => {
  const bucket = { get: async () => null, head: async () => null };
  for (const prefix of ["app/../other", "..", "app/./x", "app/%2e%2e/other"]) {
    const { call } = setup({ BUCKET: bucket, DATASET_PREFIX: prefix });
    const res = await call("/kv/a");
    assert.equal(res.status, 500, prefix);
    assert.match((await res.json()).error.message, /DATASET_PREFIX/, prefix);
  }
});

test("a stale replica starts a background sync (deferred); a fresh one does not", async () => {
  const { call, made, clock, deferred } = setup({ MAX_AGE_MS: "1000" });
  const p = call("/status");
  await flush();
  made[0].syncCalls[0].resolve(1);
  await p;
  const base = made[0].syncCalls.length;
  clock.advance(500);
  await call("/kv/a");
  assert.equal(made[0].syncCalls.length, base, "within MAX_AGE_MS: no sync");
  clock.advance(600);
  const n = deferred.length;
  const res = await call("/kv/a"); // answers while the sync is pending
  assert.equal(res.status, 404);
  assert.equal(made[0].syncCalls.length, base + 1, "past MAX_AGE_MS: one background sync");
  assert.ok(deferred.length > n, "the sync was handed to defer (waitUntil)");
  await call("/kv/a");
  assert.equal(made[0].syncCalls.length, base + 1, "no second sync while one is in flight");
  made[0].syncCalls[base].resolve(2);
  await flush();
  assert.equal((await (await call("/status")).json()).appliedLsn, 2);
});

test("a sync with no progress for 180 s is replaced from a snapshot; a retrying one is not", async () => {
  const { call, made, clock } = setup({ MAX_AGE_MS: "0" });
  const p = call("/status");
  await flush();
  made[0].put("k", "v");
  made[0].syncCalls[0].resolve(7);
  await p;
  clock.advance(1);
  await call("/kv/k"); // starts a background sync that never settles
  assert.equal(made[0].syncCalls.length, 2);
  // Retrying: requests go up; not replaced.
  for (let i = 0; i < 5; i++) {
    clock.advance(60_000);
    made[0].requests++;
    await call("/kv/k");
  }
  assert.equal(made.length, 1, "a sync that makes progress is left alone");
  // Dead: nothing moves for longer than 180 s.
  for (let i = 0; i < 3; i++) {
    clock.advance(60_000);
    await call("/kv/k");
  }
  assert.equal(made.length, 1, "180 s without progress: not yet");
  clock.advance(60_000);
  const res = await call("/kv/k");
  assert.equal(made.length, 2, "replaced");
  assert.equal(res.status, 200, "the new replica serves the carried-over state");
  assert.equal(await res.text(), "v");
  const st = await (await call("/status")).json();
  assert.equal(st.appliedLsn, 7);
  assert.equal(st.worker.restarts, 1);
});

test("first-sync failures answer 503; the next request tries again", async () => {
  const { call, made } = setup({ FIRST_SYNC_WAIT_MS: "50" });
  const p = call("/kv/a");
  await flush();
  made[0].syncCalls[0].reject(Object.assign(new Error("no head"), { code: "not_found" }));
  const res = await p;
  assert.equal(res.status, 503);
  assert.equal((await res.json()).error.code, "not_found");
  const t0 = Date.now();
  const res2 = await call("/kv/a"); // the sync never settles: bounded by FIRST_SYNC_WAIT_MS
  assert.equal(res2.status, 503);
  assert.ok(Date.now() - t0 < 10_000, "the wait is bounded (the sync never settles)");
});

test("keys are percent-decoded bytes; scan rows carry text or base64", async () => {
  assert.equal(hex(percentBytes("%FF%00a%2Fb")), "ff00612f62");
  assert.equal(hex(percentBytes("ключ")), hex(enc.encode("ключ")));
  assert.equal(hex(percentBytes("100%")), hex(enc.encode("100%")), "a lone % stays");
  const { call, made } = setup();
  const p = call("/status");
  await flush();
  made[0].put(Uint8Array.of(0xff, 1), Uint8Array.of(0xc3));
  made[0].put("t", "text");
  made[0].syncCalls[0].resolve(1);
  await p;
  const rows = await (await call("/scan")).json();
  assert.deepEqual(rows, [
    { key: "t", value: "text" },
    { key_b64: "/wE=", value_b64: "ww==" },
  ]);
  assert.equal(hex(new Uint8Array(await (await call("/kv/%FF%01")).arrayBuffer())), "c3");
  assert.equal(hex(new Uint8Array(await (await call("/kv?key=%FF%01")).arrayBuffer())), "c3");
  made[0].put("a/../b", "dots");
  assert.equal(await (await call("/kv?key=a%2F..%2Fb")).text(), "dots");
  assert.equal((await call("/kv")).status, 400);
  assert.deepEqual(await (await call("/scan?limit=0")).json(), []);
  assert.equal((await call("/scan?limit=-1")).status, 400);
  assert.equal((await call("/other")).status, 404);
});

test("a /scan value goes as text only when JSON's escapes take no more than base64: a row answers at most 4/3 of its bytes", async () => {
  const { call, made } = setup();
  const p = call("/status");
  await flush();
  // 1 MiB of control bytes (valid UTF-8: JSON would escape each as six),
  // text with a few escapes, and text of quotes (two bytes each, under 4/3 only when few).
  const control = new Uint8Array(1 << 20).fill(1);
  made[0].put("c", control);
  made[0].put("t", 'a "quoted"\nline');
  made[0].put("q", '"'.repeat(30));
  made[0].syncCalls[0].resolve(1);
  await p;
  const res = await call("/scan");
  const body = await res.arrayBuffer();
  assert.ok(body.byteLength <= Math.ceil((4 / 3) * control.length) + 200, `${body.byteLength} bytes answered for a ${control.length}-byte value`);
  const rows = JSON.parse(new TextDecoder().decode(body));
  assert.deepEqual(rows.map((r) => Object.keys(r).join(",")), ["key,value_b64", "key,value_b64", "key,value"]);
  assert.equal(hex(Buffer.from(rows[0].value_b64, "base64")), hex(control));
  assert.equal(Buffer.from(rows[1].value_b64, "base64").toString(), '"'.repeat(30));
  assert.equal(rows[2].value, 'a "quoted"\nline');
});

test("/scan with start after end answers 400; start equal to end is empty; a non-UTF-8 parameter name is 400", async () => {
  const { call, made } = setup();
  const p = call("/status");
  await flush();
  made[0].put("a", "1");
  made[0].put("b", "2");
  made[0].syncCalls[0].resolve(1);
  await p;
  const bad = await call("/scan?start=b&end=a");
  assert.equal(bad.status, 400);
  const body = await bad.json();
  assert.equal(body.error.code, "invalid_input");
  assert.match(body.error.message, /start must not sort after end/);
  assert.equal((await call("/scan?start=%FF&end=%00")).status, 400, "byte bounds");
  assert.equal((await call("/scan?start=a&end=a")).status, 200, "start == end: an empty range");
  for (const q of ["/scan?%FF=1", "/scan?%C3%28=x", "/kv?%FF"]) {
    const r = await call(q);
    assert.equal(r.status, 400, q);
    assert.equal((await r.json()).error.code, "invalid_input", q);
  }
  assert.equal((await call("/kv/a")).status, 200, "still serving");
});

test("SCAN_MAX_BYTES: an answer is cut at it with Walcast-Scan-Next; above 2^32 - 1 it is 2^32 - 1, the module's largest bound", async () => {
  const ready = async (env) => {
    const { call, made } = setup(env);
    const p = call("/status");
    await flush();
    made[0].put("a", "1");
    made[0].put("b", "2");
    made[0].put("c", "3");
    made[0].syncCalls[0].resolve(1);
    await p;
    return { call, r: made[0] };
  };
  const { call, r } = await ready({ SCAN_MAX_BYTES: "3" });
  const cut = await call("/scan");
  assert.deepEqual(await cut.json(), [
    { key: "a", value: "1" },
    { key: "b", value: "2" },
  ]);
  assert.equal(cut.headers.get("walcast-scan-next"), "b%00");
  assert.deepEqual(r.scanMaxBytes, [3]);
  for (const raw of ["4294967295", "4294967296", "5000000000", "1e12", "99999999999999999999"]) {
    const { call, r } = await ready({ SCAN_MAX_BYTES: raw });
    const res = await call("/scan");
    assert.equal(res.status, 200, raw);
    assert.equal((await res.json()).length, 3, raw);
    assert.equal(res.headers.get("walcast-scan-next"), null, raw);
    assert.deepEqual(r.scanMaxBytes, [0xffffffff], `SCAN_MAX_BYTES=${raw}: the bound the scan is asked for`);
  }
  for (const raw of ["0", "-1", "x"]) {
    const { handle } = setup();
    const bad = await handle(new Request("http://w/scan"), { DATASET_URL: "http://ds/x", SCAN_MAX_BYTES: raw }, () => {});
    assert.equal(bad.status, 500, raw);
    assert.equal((await bad.json()).error.code, "config", raw);
  }
});

test("/status and error answers carry no DATASET_URL and no error text, only codes", async () => {
  const secretUrl = "https://user:s3cret@storage.example/bucket/app";
  const { handle, made } = (() => {
    const { FakeReplica, made } = fakeReplicaClass();
    return { handle: createHandler(FakeReplica, { log: () => {} }), made };
  })();
  const env = { DATASET_URL: secretUrl, FIRST_SYNC_WAIT_MS: "50" };
  const call = (p) => handle(new Request(`http://w${p}`), env, () => {});
  const leak = (text) => /s3cret|storage\.example/.test(text);
  const p = call("/kv/a");
  await flush();
  const raw = Object.assign(new Error(`GET ${secretUrl}/catalog/head.json: error sending request for url (${secretUrl})`), {
    code: "unavailable",
  });
  made[0].syncCalls[0].reject(raw);
  const first = await p;
  assert.equal(first.status, 503);
  const firstText = await first.text();
  assert.ok(!leak(firstText), `503 body leaks: ${firstText}`);
  assert.equal(JSON.parse(firstText).error.code, "unavailable");
  made[0].status = () => ({
    appliedLsn: 3,
    committedLsn: 4,
    epoch: 1,
    datasetId: "d",
    lagMs: 0,
    lastPollAt: 1,
    state: "retrying",
    requests: 2,
    bytesReceived: 9,
    running: false,
    persistError: { code: "persist", message: `cannot save ${secretUrl}` },
    lastError: { code: "data", message: `checksum mismatch in ${secretUrl}/segments/1/a.wseg`, object: "segments/1/a.wseg", lsn: 4 },
  });
  const res = await call("/status");
  const text = await res.text();
  assert.equal(res.status, 200);
  assert.ok(!leak(text), `/status leaks: ${text}`);
  const st = JSON.parse(text);
  assert.equal(st.appliedLsn, 3);
  assert.equal(st.state, "retrying");
  assert.deepEqual(Object.keys(st.lastError).sort(), ["code", "lsn", "message", "object"]);
  assert.equal(st.lastError.code, "data");
  assert.equal(st.lastError.object, "segments/1/a.wseg");
  assert.equal(st.lastError.lsn, 4);
  assert.equal(st.worker.url, undefined, "no worker.url");
  assert.equal(st.worker.lastSyncError.code, "unavailable");
  assert.equal(st.persistError, undefined, "only the replica's state fields");
  const bad = await handle(new Request("http://w/status"), { DATASET_URL: secretUrl, MAX_AGE_MS: "x" }, () => {});
  assert.equal(bad.status, 500);
  assert.ok(!leak(await bad.text()), "a config error names the variable only");
});

test("CORS_ORIGINS: default any origin; with a list, only listed origins are echoed, with Vary: Origin", async () => {
  const { call, made } = setup();
  const p = call("/status");
  await flush();
  made[0].syncCalls[0].resolve(1);
  await p;
  const dflt = await call("/kv/x");
  assert.equal(dflt.headers.get("access-control-allow-origin"), "*");
  assert.equal(dflt.headers.get("vary"), null);

  const { FakeReplica } = fakeReplicaClass();
  const handle = createHandler(FakeReplica, { log: () => {} });
  const env = { DATASET_URL: "http://ds/x", CORS_ORIGINS: " https://a.example , https://b.example/ ", FIRST_SYNC_WAIT_MS: "10" };
  const req = (p, origin, init = {}) => handle(new Request(`http://w${p}`, { ...init, headers: { ...(origin ? { origin } : {}), ...init.headers } }), env, () => {});
  for (const o of ["https://a.example", "https://b.example"]) {
    const r = await req("/status", o);
    assert.equal(r.headers.get("access-control-allow-origin"), o, o);
    assert.equal(r.headers.get("vary"), "Origin");
  }
  const evil = await req("/status", "https://evil.example");
  assert.equal(evil.headers.get("access-control-allow-origin"), null, "an unlisted origin is not echoed");
  assert.equal(evil.headers.get("vary"), "Origin");
  const none = await req("/nope");
  assert.equal(none.headers.get("access-control-allow-origin"), null);
  assert.equal(none.headers.get("vary"), "Origin");
  const pre = await req("/kv/a", "https://a.example", { method: "OPTIONS", headers: { "access-control-request-headers": "if-none-match" } });
  assert.equal(pre.status, 204);
  assert.equal(pre.headers.get("access-control-allow-origin"), "https://a.example");
  assert.match(pre.headers.get("access-control-allow-methods"), /GET/);
  assert.equal(pre.headers.get("access-control-allow-headers"), "if-none-match");
  const preEvil = await req("/kv/a", "https://evil.example", { method: "OPTIONS" });
  assert.equal(preEvil.headers.get("access-control-allow-origin"), null);
  assert.equal(preEvil.headers.get("access-control-allow-methods"), null);
  const star = await handle(new Request("http://w/nope", { headers: { origin: "https://x.example" } }), { DATASET_URL: "http://ds/x", CORS_ORIGINS: "*" }, () => {});
  assert.equal(star.headers.get("access-control-allow-origin"), "*");
});

test("a replica whose state was replaced by an empty one is not served until a sync succeeds", async () => {
  const { FakeReplica, made } = fakeReplicaClass();
  FakeReplica.prototype.onReset = function (cb) {
    this.resetCb = cb;
  };
  let t = 1_000_000;
  const handle = createHandler(FakeReplica, { now: () => t, log: () => {} });
  const env = { DATASET_URL: "http://ds/x", MAX_AGE_MS: "0", FIRST_SYNC_WAIT_MS: "20" };
  const call = (p) => handle(new Request(`http://w${p}`), env, () => {});
  const p = call("/kv/k");
  await flush();
  made[0].put("k", "v");
  made[0].syncCalls[0].resolve(5);
  assert.equal((await p).status, 200);
  // Rebuilt empty (e.g. after an internal error): no 404s for keys it will have again.
  made[0].entries.clear();
  made[0].lsn = 0;
  made[0].resetCb({ lsn: 0 });
  t += 1;
  const waiting = await call("/kv/k");
  assert.equal(waiting.status, 503, "not served while empty");
  const pending = made[0].syncCalls.at(-1);
  made[0].put("k", "v");
  pending.resolve(5);
  await flush();
  t += 1;
  const back = await call("/kv/k");
  assert.equal(back.status, 200);
  assert.equal(await back.text(), "v");
});

test("LOAD=lazy: the replica's open is the first sync; reads are awaited; failed block reads answer 502/503", async () => {
  const { FakeReplica, made } = fakeReplicaClass();
  const opens = [];
  const Lazy = class extends FakeReplica {
    static open(url, opts) {
      return new Promise((resolve, reject) => {
        opens.push({
          opts,
          resolve: (lsn) => {
            const r = new Lazy(url, new Map(), lsn);
            resolve(r);
            return r;
          },
          reject,
        });
      });
    }
    get(key) {
      const v = super.get(key);
      if (this.failWith) return Promise.reject(this.failWith);
      if (this.getHook) return this.getHook().then(() => v);
      return Promise.resolve(v);
    }
    scan(opts) {
      if (this.failWith) return Promise.reject(this.failWith);
      if (this.scanHook) return this.scanHook().then(() => super.scan(opts));
      return Promise.resolve(super.scan(opts));
    }
    status() {
      return { ...super.status(), mode: "lazy", cachedBytes: 7, blocksFetched: 2, overlayBytes: 3, overlayEntries: 1 };
    }
  };
  let t = 1_000_000;
  const handle = createHandler(Lazy, { now: () => t, log: () => {} });
  // (Scans of at most 64 KiB: 32 of them within SCAN_MEMORY_BYTES.)
  const env = { DATASET_URL: "http://ds/x", LOAD: "lazy", CACHE_BYTES: "65536", MAX_AGE_MS: "60000", FIRST_SYNC_WAIT_MS: "1000", SCAN_MAX_BYTES: "65536" };
  const call = (p) => handle(new Request(`http://w${p}`), env, () => {});
  const first = call("/kv/a");
  await flush();
  assert.equal(opens.length, 1, "one open");
  assert.deepEqual({ load: opens[0].opts.load, cacheBytes: opens[0].opts.cacheBytes }, { load: "lazy", cacheBytes: 65536 });
  const r = opens[0].resolve(9);
  r.put("a", "1");
  const res = await first;
  assert.equal(res.status, 200);
  assert.equal(await res.text(), "1");
  assert.equal(res.headers.get("x-walcast-lsn"), "9");
  assert.equal(r.syncCalls.length, 0, "no second sync right after the open");
  assert.equal(made.length, 1);
  const st = await (await call("/status")).json();
  assert.equal(st.mode, "lazy");
  assert.equal(st.blocksFetched, 2);
  assert.equal(st.worker.ready, true);
  assert.equal(st.worker.syncs, 1, "the open counts as the first sync");
  const rows = await (await call("/scan?prefix=a")).json();
  assert.deepEqual(rows, [{ key: "a", value: "1" }]);
  // A read outrun by a sync that applied more meanwhile: the answer is
  // labelled with an LSN it was read at or after, never a later one.
  let release;
  r.getHook = () => new Promise((res) => (release = res));
  const slow = call("/kv/a");
  await flush();
  r.lsn = 12;
  release();
  const late = await slow;
  assert.equal(late.status, 200);
  assert.equal(late.headers.get("x-walcast-lsn"), "9");
  assert.equal(late.headers.get("walcast-lsn"), "9", "both headers say the same");
  r.getHook = null;
  r.lsn = 9;
  // At most 32 lazy scans at once (the module keeps 64 open): the next one
  // answers 503 busy with Retry-After, and a slot freed is taken again.
  const releases = [];
  r.scanHook = () => new Promise((res) => releases.push(res));
  const held = Array.from({ length: 32 }, () => call("/scan?prefix=a"));
  await flush();
  assert.equal(releases.length, 32);
  const busy = await call("/scan?prefix=a");
  assert.equal(busy.status, 503);
  assert.equal((await busy.json()).error.code, "busy");
  assert.equal(busy.headers.get("retry-after"), "1");
  releases.shift()();
  assert.equal((await held[0]).status, 200);
  const again = call("/scan?prefix=a");
  await flush();
  assert.equal(releases.length, 32, "the freed slot was taken");
  r.scanHook = null;
  for (const f of releases) f();
  for (const p of [...held.slice(1), again]) assert.equal((await p).status, 200);
  for (const [code, status] of [["data", 502], ["not_found", 502], ["unavailable", 503]]) {
    r.failWith = Object.assign(new Error(`block of snapshots/1-1.wsnap at http://secret: ${code}`), { code, object: "snapshots/00000000000000000001-1.wsnap" });
    for (const p of ["/kv/a", "/scan"]) {
      const bad = await call(p);
      assert.equal(bad.status, status, `${p} with a ${code} block`);
      const body = await bad.json();
      assert.equal(body.error.code, code);
      assert.equal(body.error.object, "snapshots/00000000000000000001-1.wsnap");
      assert.ok(!JSON.stringify(body).includes("secret"), "no error text in the answer");
    }
  }
  r.failWith = null;
  assert.equal((await call("/kv/a")).status, 200, "reads work again");
  const bad = await handle(new Request("http://w/status"), { DATASET_URL: "http://ds/y", LOAD: "eager" }, () => {});
  assert.equal(bad.status, 500);
  assert.equal((await bad.json()).error.code, "config");
});

test("LOAD=lazy: an open that fails answers 503 with its code; /status answers 200; the next request opens again", async () => {
  const { FakeReplica } = fakeReplicaClass();
  let fail = true;
  let opens = 0;
  const Lazy = class extends FakeReplica {
    static async open(url) {
      opens++;
      if (fail) throw Object.assign(new Error("no head"), { code: "not_found", object: "catalog/head.json" });
      return new Lazy(url, new Map([[Buffer.from("k").toString("hex"), new TextEncoder().encode("v")]]), 3);
    }
  };
  const handle = createHandler(Lazy, { log: () => {} });
  const env = { DATASET_URL: "http://ds/x", LOAD: "lazy" };
  const call = (p) => handle(new Request(`http://w${p}`), env, () => {});
  const res = await call("/kv/k");
  assert.equal(res.status, 503);
  assert.equal((await res.json()).error.code, "not_found");
  const st = await call("/status");
  assert.equal(st.status, 200);
  const body = await st.json();
  assert.equal(body.worker.ready, false);
  assert.equal(body.lastError.code, "not_found");
  fail = false;
  const ok = await call("/kv/k");
  assert.equal(ok.status, 200);
  assert.equal(await ok.text(), "v");
  assert.equal(opens, 3);
});

test("LOAD=lazy: an open whose answers never come is started again after stuckSyncMs", async () => {
  const { FakeReplica, made } = fakeReplicaClass();
  let opens = 0;
  const Lazy = class extends FakeReplica {
    static open(url) {
      opens++;
      // The first open's request context was torn down: it never settles.
      if (opens === 1) return new Promise(() => {});
      return Promise.resolve(new Lazy(url, new Map([[hex(enc.encode("k")), enc.encode("v")]]), 4));
    }
  };
  let t = 1_000_000;
  const handle = createHandler(Lazy, { now: () => t, log: () => {}, stuckSyncMs: 1000 });
  const env = { DATASET_URL: "http://ds/x", LOAD: "lazy", FIRST_SYNC_WAIT_MS: "10" };
  const call = (p) => handle(new Request(`http://w${p}`), env, () => {});
  assert.equal((await call("/kv/k")).status, 503, "the open is still pending");
  t += 500;
  assert.equal((await call("/kv/k")).status, 503, "within stuckSyncMs: the same open");
  assert.equal(opens, 1);
  t += 600;
  const res = await call("/kv/k");
  assert.equal(opens, 2, "opened again");
  assert.equal(res.status, 200);
  assert.equal(await res.text(), "v");
  const st = await (await call("/status")).json();
  assert.equal(st.worker.restarts, 1);
  assert.equal(made.length, 1);
});

test("LOAD=lazy: while a stuck replica's replacement opens, requests are served by the old one, not held", { timeout: 20_000 }, async () => {
  const { FakeReplica, made } = fakeReplicaClass();
  const opens = [];
  const Lazy = class extends FakeReplica {
    static open(url) {
      return new Promise((resolve) => {
        opens.push((lsn, v) => {
          const r = new Lazy(url, new Map([[hex(enc.encode("k")), enc.encode(v)]]), lsn);
          resolve(r);
          return r;
        });
      });
    }
  };
  let t = 1_000_000;
  const handle = createHandler(Lazy, { now: () => t, log: () => {}, stuckSyncMs: 1000 });
  // A request that waited on the replacement would wait the whole minute.
  const env = { DATASET_URL: "http://ds/x", LOAD: "lazy", MAX_AGE_MS: "0", FIRST_SYNC_WAIT_MS: "60000" };
  const deferred = [];
  const call = (p) => handle(new Request(`http://w${p}`), env, (q) => deferred.push(q));
  const first = call("/kv/k");
  await flush();
  const old = opens[0](3, "old");
  assert.equal(await (await first).text(), "old");
  t += 1;
  assert.equal((await call("/kv/k")).status, 200); // starts a sync that never settles
  assert.equal(old.syncCalls.length, 1);
  t += 1_001;
  const n = deferred.length;
  assert.equal((await call("/kv/k")).status, 200); // still no progress: replaced
  assert.equal(opens.length, 2, "the replacement opens");
  assert.ok(deferred.length > n, "the replacement was handed to defer (waitUntil)");
  // The replacement's open never answers: requests do not wait on it.
  for (const p of ["/status", "/kv/k"]) {
    const res = await call(p);
    assert.equal(res.status, 200, p);
    if (p === "/kv/k") assert.equal(await res.text(), "old");
  }
  // A replacement pending for longer than stuckSyncMs is started again.
  t += 1_001;
  await call("/kv/k");
  assert.equal(opens.length, 3, "a second replacement");
  opens[2](9, "new");
  await flush();
  await flush();
  const res = await call("/kv/k");
  assert.equal(await res.text(), "new");
  assert.equal(res.headers.get("x-walcast-lsn"), "9");
  // The first replacement ends late: the replica in use stays.
  opens[1](8, "late");
  await flush();
  await flush();
  assert.equal(await (await call("/kv/k")).text(), "new");
  assert.ok(made[made.length - 1].closed, "the late replacement is closed");
});

test("min_lsn: a read waits until the LSN is applied; beyond it, 503 with Retry-After; every answer carries Walcast-Lsn", async () => {
  const { call, made } = setup();
  const first = call("/kv/a");
  await flush();
  const r = made[0];
  r.put("a", "1");
  r.syncCalls[0].resolve(5);
  let res = await first;
  assert.equal(res.headers.get("walcast-lsn"), "5");
  // Already applied: at once.
  res = await call("/kv/a?min_lsn=5");
  assert.equal(res.status, 200);
  assert.equal(res.headers.get("walcast-lsn"), "5");
  // Not yet: the read starts a sync and answers once it applied the LSN.
  const waiting = call("/kv/a?min_lsn=7");
  await flush();
  assert.equal(r.syncCalls.length, 2, "a sync for min_lsn");
  r.put("a", "2");
  r.syncCalls[1].resolve(7);
  res = await waiting;
  assert.equal(res.status, 200);
  assert.equal(await res.text(), "2");
  assert.equal(res.headers.get("walcast-lsn"), "7");
  // The header works too, on /scan.
  res = await call("/scan?prefix=a", {});
  assert.equal(res.headers.get("walcast-lsn"), "7");
  // Malformed: 400, never a wait.
  for (const bad of ["x", "-1", "1.5", ""]) {
    res = await call(`/kv/a?min_lsn=${bad}`);
    assert.equal(res.status, 400, bad);
    assert.equal(res.headers.get("walcast-lsn"), "7", "a 400 says the LSN too");
  }
  // /status and 404s carry the LSN.
  res = await call("/status");
  assert.equal(res.headers.get("walcast-lsn"), "7");
  res = await call("/nope");
  assert.equal(res.headers.get("walcast-lsn"), "7");
});

/** A handler with MIN_LSN_WAIT_MS `wait` whose replica synced to LSN 5 ("a" = "1"); `req(path, headers)`. */
async function syncedForMinLsn(wait) {
  const { handle, made, clock } = setup();
  const env = { DATASET_URL: "http://ds/x", MIN_LSN_WAIT_MS: String(wait) };
  const req = (p, h = {}) => handle(new Request(`http://w${p}`, { headers: h }), env, () => {});
  const first = req("/kv/a");
  await flush();
  const r = made[0];
  r.put("a", "1");
  r.syncCalls[0].resolve(5);
  await first;
  return { handle, env, req, r, clock };
}

test("min_lsn beyond the committed LSN answers 503 with Retry-After after MIN_LSN_WAIT_MS, not a hang", async () => {
  const { req, r, clock } = await syncedForMinLsn(200);
  // Every sync the read starts ends at LSN 5; the clock moves on.
  const t0 = Date.now();
  const pending = req("/kv/a", { "walcast-min-lsn": "1000000" });
  const settle = setInterval(() => {
    for (const c of r.syncCalls) c.resolve(5);
    clock.advance(50);
  }, 20);
  let res;
  try {
    res = await Promise.race([pending, new Promise((_, rej) => setTimeout(() => rej(new Error("hung")), 20_000))]);
  } finally {
    clearInterval(settle);
  }
  assert.equal(res.status, 503);
  assert.equal(res.headers.get("retry-after"), "1");
  assert.equal(res.headers.get("walcast-lsn"), "5");
  const body = await res.json();
  assert.equal(body.error.code, "not_applied");
  assert.equal(body.error.lsn, 1000000);
  assert.ok(Date.now() - t0 < 20_000);
});

test("reads waiting for an LSN that does not come back off: the syncs they start thin out to one a second", async () => {
  const { handle, env, req, r, clock } = await syncedForMinLsn(3000);
  const before = r.syncCalls.length;
  // Every sync ends at LSN 5 (nothing newer is committed); the fake clock
  // follows the real one, so a wait of 3 s of it pauses between its syncs
  // 100, 200, 400, 800 and then 1,000 ms (a fixed 100 ms pause: about 30).
  const waits = [1, 2, 3].map(() => req("/kv/a", { "walcast-min-lsn": "1000000" }));
  let last = Date.now();
  const settle = setInterval(() => {
    for (const c of r.syncCalls) c.resolve(5);
    const t = Date.now();
    clock.advance(t - last);
    last = t;
  }, 10);
  try {
    for (const res of await Promise.all(waits)) assert.equal(res.status, 503);
  } finally {
    clearInterval(settle);
  }
  const syncs = r.syncCalls.length - before;
  assert.ok(syncs >= 3 && syncs <= 9, `${syncs} syncs during a 3 s wait of three reads`);
  // A sync that applies something resets the pause.
  const waiting = req("/kv/a", { "walcast-min-lsn": "6" });
  await flush();
  r.put("a", "2");
  for (const c of r.syncCalls) c.resolve(6);
  assert.equal((await waiting).status, 200);
  // Five reads waiting on one sync that applies something each time: the
  // pause stays 100 ms (it is set once per sync, not once per waiting read).
  const env2 = { ...env, MIN_LSN_WAIT_MS: "1500" };
  const many = [1, 2, 3, 4, 5].map(() => handle(new Request("http://w/kv/a", { headers: { "walcast-min-lsn": "1000000" } }), env2, () => {}));
  const from = r.syncCalls.length;
  let lsn = 6;
  last = Date.now();
  const moving = setInterval(() => {
    for (const c of r.syncCalls) c.resolve(++lsn);
    const t = Date.now();
    clock.advance(t - last);
    last = t;
  }, 10);
  try {
    await Promise.all(many);
  } finally {
    clearInterval(moving);
  }
  const busy = r.syncCalls.length - from;
  assert.ok(busy >= 7, `${busy} syncs in 1.5 s while each applied something (100 ms apart: about 13)`);
});

test("LOAD=lazy: a read that never finishes answers 503 after the read timeout and frees its slot; reads and scans past their caps answer busy", { timeout: 30_000 }, async () => {
  const { FakeReplica } = fakeReplicaClass();
  const Lazy = class extends FakeReplica {
    static open(url) {
      return Promise.resolve(new Lazy(url, new Map(), 9));
    }
    get() {
      return new Promise(() => {}); // its block GETs never answer
    }
    scan() {
      return new Promise(() => {});
    }
    status() {
      return { ...super.status(), mode: "lazy" };
    }
  };
  const handle = createHandler(Lazy, { log: () => {}, readTimeoutMs: 50 });
  const env = { DATASET_URL: "http://ds/x", LOAD: "lazy", MAX_CONCURRENT_SCANS: "2", MAX_CONCURRENT_READS: "2" };
  const call = (p) => handle(new Request(`http://w${p}`), env, () => {});
  const kv = await call("/kv/a");
  assert.equal(kv.status, 503);
  assert.equal((await kv.json()).error.code, "unavailable");
  const codes = async (ps) => Promise.all((await Promise.all(ps)).map(async (r) => [r.status, (await r.json()).error.code]));
  // Point reads past MAX_CONCURRENT_READS are refused at once, not queued;
  // the slots of reads that timed out are free again.
  const reads = await codes([1, 2, 3].map((i) => call(`/kv/k${i}`)));
  assert.deepEqual(reads.map(([, c]) => c).sort(), ["busy", "unavailable", "unavailable"]);
  assert.ok(reads.every(([s]) => s === 503));
  assert.deepEqual(await codes([1, 2].map((i) => call(`/kv/k${i}`))), [
    [503, "unavailable"],
    [503, "unavailable"],
  ]);
  const first = await codes([1, 2, 3].map(() => call("/scan?prefix=a")));
  assert.deepEqual(first.map(([, c]) => c).sort(), ["busy", "unavailable", "unavailable"]);
  assert.ok(first.every(([s]) => s === 503));
  // The slots the timed-out scans held are free again: not busy.
  const again = await codes([1, 2].map(() => call("/scan?prefix=a")));
  assert.deepEqual(again, [
    [503, "unavailable"],
    [503, "unavailable"],
  ]);
});

test("lazy scans at once are bounded by the memory they may take (SCAN_MEMORY_BYTES, each at twice SCAN_MAX_BYTES), one always running", async () => {
  const { FakeReplica } = fakeReplicaClass();
  const Lazy = class extends FakeReplica {
    static open(url) {
      return Promise.resolve(new Lazy(url, new Map(), 9));
    }
    scan() {
      return new Promise(() => {}); // its block GETs never answer
    }
    status() {
      return { ...super.status(), mode: "lazy" };
    }
  };
  const handle = createHandler(Lazy, { log: () => {}, readTimeoutMs: 50 });
  const codes = async (env, n) => {
    const call = (p) => handle(new Request(`http://w${p}`), env, () => {});
    const res = await Promise.all(Array.from({ length: n }, (_, i) => call(`/scan?prefix=${i}`)));
    for (const r of res) if (r.status === 503 && r.headers.get("retry-after") === null) assert.fail("503 without Retry-After");
    return Promise.all(res.map(async (r) => (await r.json()).error.code)).then((c) => c.sort());
  };
  const base = { DATASET_URL: "http://ds/x", LOAD: "lazy", SCAN_MAX_BYTES: "1000" };
  // Two scans take 4,000 bytes: a third would pass 5,000.
  assert.deepEqual(await codes({ ...base, SCAN_MEMORY_BYTES: "5000" }, 4), ["busy", "busy", "unavailable", "unavailable"]);
  // A bound below one scan's share still lets one run.
  assert.deepEqual(await codes({ ...base, DATASET_URL: "http://ds/y", SCAN_MEMORY_BYTES: "10" }, 2), ["busy", "unavailable"]);
});

test("a replica whose status() throws while it is rebuilt after a trap is synced (the sync revives it), not left answering 503", async () => {
  const { call, made, clock } = setup({ MAX_AGE_MS: "1000" });
  const p = call("/kv/a");
  await flush();
  const r = made[0];
  r.put("a", "1");
  r.syncCalls[0].resolve(3);
  assert.equal((await p).status, 200);
  // A trap whose rebuild failed: every call but sync() throws unavailable.
  const status = r.status.bind(r);
  r.status = () => {
    if (r.rebuilding) throw Object.assign(new Error("being rebuilt"), { code: "unavailable" });
    return status();
  };
  r.rebuilding = true;
  clock.advance(2_000);
  const before = r.syncCalls.length;
  await call("/kv/a");
  await flush();
  assert.equal(r.syncCalls.length, before + 1, "a sync was started");
  r.rebuilding = false;
  r.syncCalls[before].resolve(3);
  await flush();
  const res = await call("/kv/a");
  assert.equal(res.status, 200);
  assert.equal(await res.text(), "1");
});

test("a page that ends at SCAN_LIMIT or MAX_SCAN_LIMIT, not at the caller's limit, carries Walcast-Scan-Next", async () => {
  const { call, made } = setup({ SCAN_LIMIT: "2", MAX_SCAN_LIMIT: "3" });
  const p = call("/status");
  await flush();
  for (const k of ["a", "b", "c", "d", "e"]) made[0].put(k, "1");
  made[0].syncCalls[0].resolve(1);
  await p;
  const page = async (q) => {
    const res = await call(`/scan${q}`);
    assert.equal(res.status, 200, q);
    return { keys: (await res.json()).map((r) => r.key), next: res.headers.get("walcast-scan-next") };
  };
  // No limit given: SCAN_LIMIT ends the page, and the page says so.
  assert.deepEqual(await page(""), { keys: ["a", "b"], next: "b%00" });
  // More than MAX_SCAN_LIMIT asked for: cut to it, and the page says so.
  assert.deepEqual(await page("?limit=10"), { keys: ["a", "b", "c"], next: "c%00" });
  assert.deepEqual(await page("?limit=10&start=c%00"), { keys: ["d", "e"], next: null }, "the rest, and no more");
  // The caller's own limit reached: it knows; nothing to say.
  assert.deepEqual(await page("?limit=3"), { keys: ["a", "b", "c"], next: null });
  assert.deepEqual(await page("?limit=2"), { keys: ["a", "b"], next: null });
});

test("with AUTH_KEY, a refused request and a preflight carry no Walcast-Lsn, even after an authorized read", async () => {
  const { subtle } = globalThis.crypto;
  const kp = await subtle.generateKey({ name: "Ed25519" }, true, ["sign", "verify"]);
  const raw = new Uint8Array(await subtle.exportKey("raw", kp.publicKey));
  const b64u = (b) => Buffer.from(b).toString("base64url");
  const claims = b64u(JSON.stringify({ scope: "read", prefix: "", iat: 1, exp: 4e9 }));
  const signed = Buffer.concat([Buffer.from("walcast-token-v1\0"), Buffer.from(claims)]);
  const token = `wct1.${claims}.${b64u(new Uint8Array(await subtle.sign({ name: "Ed25519" }, kp.privateKey, signed)))}`;
  const { handle, made } = setup();
  const env = { DATASET_URL: "http://ds/x", AUTH_KEY: `ed25519:${Buffer.from(raw).toString("base64")}` };
  const send = (path, init = {}) => handle(new Request(`http://w${path}`, init), env, () => {});
  const first = send("/kv/a", { headers: { authorization: `Bearer ${token}` } });
  // The token's check runs on WebCrypto's threads: wait for the sync it lets start.
  for (let i = 0; i < 400 && !made[0]?.syncCalls.length; i++) await new Promise((r) => setTimeout(r, 5));
  made[0].put("a", "1");
  made[0].syncCalls[0].resolve(4242);
  const ok = await first;
  assert.equal(ok.status, 200);
  assert.equal(ok.headers.get("walcast-lsn"), "4242", "an authorized answer says its LSN");
  for (const [method, path, status] of [["GET", "/kv/a", 401], ["GET", "/nope", 401], ["DELETE", "/kv/a", 401], ["GET", "/status", 401], ["OPTIONS", "/kv/a", 204]]) {
    const res = await send(path, { method });
    assert.equal(res.status, status, `${method} ${path}`);
    assert.equal(res.headers.get("walcast-lsn"), null, `${method} ${path} without a token: no LSN`);
    assert.equal(res.headers.get("x-walcast-lsn"), null, `${method} ${path} without a token: no LSN`);
  }
});

test("a request failing on a replica being rebuilt answers 503 unavailable with Retry-After, not 500", async () => {
  const { call, made } = setup();
  const p = call("/kv/a");
  await flush();
  const r = made[0];
  r.put("a", "1");
  r.syncCalls[0].resolve(3);
  assert.equal((await p).status, 200);
  r.get = () => {
    throw Object.assign(new Error("being rebuilt"), { code: "unavailable" });
  };
  const res = await call("/kv/a");
  assert.equal(res.status, 503);
  assert.equal(res.headers.get("retry-after"), "1");
  assert.equal((await res.json()).error.code, "unavailable");
});

test("a stuck sync that settles after its replica was replaced does not mark the new one ready", async () => {
  const { call, made, clock } = setup({ MAX_AGE_MS: "0", FIRST_SYNC_WAIT_MS: "10" });
  const p = call("/status");
  await flush();
  made[0].put("k", "v");
  made[0].syncCalls[0].resolve(7);
  await p;
  clock.advance(1);
  await call("/kv/k"); // a background sync that never settles
  assert.equal(made[0].syncCalls.length, 2);
  // The old replica's state cannot be carried over: the new one opens empty.
  made[0].snapshot = () => {
    throw Object.assign(new Error("being rebuilt"), { code: "unavailable" });
  };
  for (let i = 0; i < 4; i++) {
    clock.advance(60_000);
    await call("/kv/k");
  }
  await flush();
  assert.equal(made.length, 2, "replaced by a replica opened anew");
  const stale = made[0].syncCalls[1];
  stale.resolve(7); // the old sync ends at last
  await flush();
  const res = await call("/kv/k");
  assert.equal(res.status, 503, "the empty replica is not served on the old sync's word");
  const st = await (await call("/status")).json();
  assert.equal(st.worker.ready, false);
  // Its own first sync makes it ready.
  made[1].put("k", "v");
  made[1].syncCalls.at(-1).resolve(8);
  await flush();
  const after = await call("/kv/k");
  assert.equal(after.status, 200);
  assert.equal(await after.text(), "v");
});

test("an AUTH_KEY of small order (which would verify anyone's token) is a configuration error: no request is served under it", async () => {
  const b64 = (bytes) => btoa(String.fromCharCode(...bytes));
  const point = (first, fill, last) => [first, ...Array(30).fill(fill), last];
  // The identity (1, sign bit set too), 0, and p - 1.
  for (const raw of [point(0x01, 0, 0), point(0x01, 0, 0x80), point(0x00, 0, 0), point(0xec, 0xff, 0x7f)]) {
    const { handle } = setup();
    const res = await handle(new Request("http://w/kv/a", { headers: { authorization: "Bearer x" } }), { DATASET_URL: "http://ds/x", AUTH_KEY: `ed25519:${b64(raw)}` }, () => {});
    assert.equal(res.status, 500, String(raw));
    assert.equal((await res.json()).error.code, "config", String(raw));
  }
});

test("FIRST_SYNC_WAIT_MS and MIN_LSN_WAIT_MS above 2^31 - 1 ms (a timer would fire at once) are configuration errors", async () => {
  for (const name of ["FIRST_SYNC_WAIT_MS", "MIN_LSN_WAIT_MS"]) {
    const { handle } = setup();
    const res = await handle(new Request("http://w/kv/a"), { DATASET_URL: "http://ds/x", [name]: "3000000000" }, () => {});
    assert.equal(res.status, 500, name);
    const body = await res.json();
    assert.equal(body.error.code, "config", name);
    assert.match(body.error.message, new RegExp(`${name} must be at most 2147483647`));
  }
});

test("requests waiting for the first sync or for a min_lsn are capped by MAX_WAITING_REQUESTS: more answer 503 busy at once", async () => {
  const { call, made } = setup({ MAX_WAITING_REQUESTS: "2" });
  let answered = 0;
  const waits = [1, 2, 3].map((i) => call(`/kv/k${i}`).then((r) => (answered++, r)));
  await flush();
  await flush();
  // Two wait for the first sync; the third is turned away at once.
  assert.equal(answered, 1);
  const r = made[0];
  r.put("k1", "1");
  r.put("k2", "2");
  r.put("k3", "3");
  r.syncCalls[0].resolve(5);
  const got = await Promise.all(waits);
  const codes = await Promise.all(got.map(async (res) => (res.status === 200 ? 200 : (await res.json()).error.code)));
  assert.deepEqual(codes, [200, 200, "busy"]);
  assert.equal(got[2].headers.get("retry-after"), "1");
  // Once the wait is over, its places are free: min_lsn waits count too.
  answered = 0;
  const lsnWaits = [1, 2, 3].map(() => call("/kv/k1?min_lsn=7").then((res) => (answered++, res)));
  await flush();
  await flush();
  assert.equal(answered, 1);
  const calls = r.syncCalls.length;
  r.syncCalls[calls - 1].resolve(7);
  const after = await Promise.all(lsnWaits);
  const lsnCodes = await Promise.all(after.map(async (res) => (res.status === 200 ? 200 : (await res.json()).error.code)));
  assert.deepEqual(lsnCodes, [200, 200, "busy"]);
  // An LSN already applied never waits, however many wait.
  assert.equal((await call("/kv/k1?min_lsn=7")).status, 200);
  // MAX_WAITING_REQUESTS=0 is a configuration error.
  const zero = await setup({ MAX_WAITING_REQUESTS: "0" }).call("/kv/a");
  assert.equal(zero.status, 500);
});
