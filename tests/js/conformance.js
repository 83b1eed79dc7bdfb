// The JS conformance suite: one set of cases written against the public
// `Replica` API of the `walcast` package, run unchanged in every runtime
// (Node, Deno, workerd, Chromium). No imports: the runner passes everything in.
//
//   import { conformanceCases, runConformance } from "./conformance.js";
//   const cases = conformanceCases({ walcast, fixtures, mutate, runtime });
//   // register each { name, fn } with the runtime's test runner, in order, or:
//   const { passed, failed, results } = await runConformance(ctx);
//
// ctx:
//   walcast   the imported package module ({ Replica, init, shouldReplace })
//   fixtures  an instance's fixtures from tests/js/datasets.mjs (newInstance())
//   mutate    async (scenarioName) => the scenario's next-stage fixture
//   runtime   a name for messages ("node", "deno", "workerd", "chromium")
//   log       optional (...args) => void
//
// Cases of one scenario depend on each other's order (a mutation is one-way):
// run them in the order given, each instance once.

const enc = new TextEncoder();
const strictUtf8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

export class ConformanceError extends Error {
  constructor(message) {
    super(message);
    this.name = "ConformanceError";
  }
}

function fail(msg) {
  throw new ConformanceError(msg);
}
function ok(cond, msg) {
  if (!cond) fail(msg);
}
function eq(actual, expected, msg) {
  if (actual !== expected) fail(`${msg}: got ${show(actual)}, expected ${show(expected)}`);
}
function show(v) {
  if (v instanceof Uint8Array) {
    try {
      return JSON.stringify(strictUtf8.decode(v));
    } catch {
      return `0x${[...v].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
    }
  }
  if (typeof v === "string") return JSON.stringify(v.length > 80 ? v.slice(0, 80) + "…" : v);
  return String(v);
}
function b64dec(s) {
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}
function bytesEq(a, b) {
  if (!(a instanceof Uint8Array) || !(b instanceof Uint8Array) || a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}
function isUtf8(b) {
  try {
    strictUtf8.decode(b);
    return true;
  } catch {
    return false;
  }
}
/** A fixture key/bound ({text} or {b64}) as the API takes it. */
function argOf(a) {
  if (a === undefined) return undefined;
  return a.text !== undefined ? a.text : b64dec(a.b64);
}
function keyBytes(k) {
  return typeof k === "string" ? enc.encode(k) : k;
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function withTimeout(p, ms, what) {
  let t;
  return Promise.race([
    p.finally(() => clearTimeout(t)),
    new Promise((_, reject) => {
      t = setTimeout(() => reject(new ConformanceError(`${what}: no answer within ${ms} ms`)), ms);
    }),
  ]);
}

async function rejectsWith(p, code, what, ms = 90_000) {
  let err = null;
  try {
    const v = await withTimeout(p, ms, what);
    fail(`${what}: resolved ${show(v)}, expected a rejection with code ${show(code)}`);
  } catch (e) {
    if (e instanceof ConformanceError) throw e;
    err = e;
  }
  ok(err instanceof Error, `${what}: rejected with a non-Error ${show(err)}`);
  eq(err.code, code, `${what}: error.code (message: ${err.message})`);
  return err;
}

async function until(cond, ms, what) {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) fail(`${what}: not within ${ms} ms`);
    await sleep(20);
  }
}

/** The replica equals the expected state: scan() entry by entry, and get() of each key. */
function expectState(replica, expected, label) {
  const rows = replica.scan();
  const want = expected.entries;
  for (let i = 0; i < Math.min(rows.length, want.length); i++) {
    const k = b64dec(want[i][0]);
    const v = b64dec(want[i][1]);
    const row = rows[i];
    const rk = keyBytes(row.key);
    if (!bytesEq(rk, k)) fail(`${label}: scan row ${i} has key ${show(rk)}, expected ${show(k)}`);
    if (isUtf8(k)) {
      eq(typeof row.key, "string", `${label}: scan row ${i} (${show(k)}): a UTF-8 key comes back as a string`);
    } else {
      ok(row.key instanceof Uint8Array, `${label}: scan row ${i} (${show(k)}): a non-UTF-8 key comes back as a Uint8Array`);
    }
    ok(row.value instanceof Uint8Array, `${label}: scan row ${i}: value is a Uint8Array`);
    if (!bytesEq(row.value, v)) fail(`${label}: value of ${show(k)} is ${show(row.value)}, expected ${show(v)}`);
  }
  eq(rows.length, want.length, `${label}: number of entries`);
  for (const [kb, vb] of want) {
    const k = b64dec(kb);
    const got = replica.get(k);
    if (!bytesEq(got, b64dec(vb))) fail(`${label}: get(${show(k)}) = ${show(got)}, expected ${show(b64dec(vb))}`);
  }
}

/** Records every fetch (url, method, Range, If-None-Match) while installed. */
function recordFetches() {
  const orig = globalThis.fetch;
  const log = [];
  globalThis.fetch = function recordingFetch(input, init) {
    const url = typeof input === "string" ? input : input instanceof URL ? input.href : input.url;
    const headers = new Headers(init?.headers ?? (typeof input === "object" && input.headers ? input.headers : undefined));
    log.push({ url, range: headers.get("range"), ifNoneMatch: headers.get("if-none-match") });
    return orig.call(globalThis, input, init);
  };
  return {
    log,
    restore() {
      globalThis.fetch = orig;
    },
  };
}

/** Makes every fetch to `prefix` fail as a network error would, while installed. */
function goOffline(prefix) {
  const orig = globalThis.fetch;
  let count = 0;
  globalThis.fetch = function offlineFetch(input, init) {
    const url = typeof input === "string" ? input : input instanceof URL ? input.href : input.url;
    if (url.startsWith(prefix)) {
      count++;
      return Promise.reject(new TypeError("conformance: offline"));
    }
    return orig.call(globalThis, input, init);
  };
  return {
    get count() {
      return count;
    },
    restore() {
      globalThis.fetch = orig;
    },
  };
}

/** A persistence store kept in a Map (the { load, save } interface). */
function mapStore() {
  const m = new Map();
  return {
    map: m,
    saves: 0,
    async load(url) {
      return m.get(url);
    },
    async save(url, rec) {
      this.saves++;
      m.set(url, { ...rec, snapshot: rec.snapshot.slice() });
    },
  };
}

function relKey(url, base) {
  return url.startsWith(base + "/") ? url.slice(base.length + 1).split("?")[0] : null;
}

export function conformanceCases(ctx) {
  const { walcast, fixtures, mutate } = ctx;
  const log = ctx.log ?? (() => {});
  const { Replica } = walcast;
  const sc = fixtures.scenarios;
  const open = [];
  const track = (r) => (open.push(r), r);
  const closeAll = async () => {
    while (open.length) await open.pop().close().catch(() => {});
  };
  const cases = [];
  const add = (name, fn) =>
    cases.push({
      name,
      fn: async () => {
        try {
          await fn();
        } finally {
          await closeAll();
        }
      },
    });

  // --- API surface -------------------------------------------------------------------

  add("module exports Replica with open/restore", async () => {
    eq(typeof Replica, "function", "Replica");
    eq(typeof Replica.open, "function", "Replica.open");
    eq(typeof Replica.restore, "function", "Replica.restore");
    eq(typeof walcast.init, "function", "init");
    await walcast.init();
  });

  add("open validates its input (invalid_input)", async () => {
    await rejectsWith(Replica.open(""), "invalid_input", "open('')");
    await rejectsWith(Replica.open(sc.basic.url, { pollInterval: -5 }), "invalid_input", "pollInterval -5");
    await rejectsWith(Replica.open(sc.basic.url, { concurrency: 0 }), "invalid_input", "concurrency 0");
    await rejectsWith(Replica.open(sc.basic.url, { persist: "floppy" }), "invalid_input", "persist floppy");
    const r = track(await Replica.open(sc.basic.url));
    let e = null;
    try {
      r.get(42);
    } catch (x) {
      e = x;
    }
    eq(e?.code, "invalid_input", "get(42)");
    e = null;
    try {
      r.scan({ limit: -1 });
    } catch (x) {
      e = x;
    }
    eq(e?.code, "invalid_input", "scan limit -1");
  });

  // --- basic ---------------------------------------------------------------------------

  add("basic: sync reaches the head and equals the expected state", async () => {
    const fx = sc.basic;
    const r = track(await Replica.open(fx.url));
    const s0 = r.status();
    eq(s0.appliedLsn, 0, "appliedLsn before sync");
    eq(s0.lastError, null, "lastError before sync");
    const lsn = await withTimeout(r.sync(), 120_000, "sync");
    eq(lsn, fx.expected.lsn, "sync() resolves the applied LSN");
    const s = r.status();
    eq(s.appliedLsn, fx.expected.lsn, "status().appliedLsn");
    eq(s.committedLsn, fx.committedLsn, "status().committedLsn");
    eq(s.datasetId, fx.datasetId, "status().datasetId");
    eq(s.epoch, fx.epoch, "status().epoch");
    eq(s.lastError, null, "status().lastError");
    eq(typeof s.state, "string", "status().state");
    eq(typeof s.lagMs, "number", "status().lagMs");
    eq(typeof s.lastPollAt, "number", "status().lastPollAt after a sync");
    ok(Math.abs(s.lastPollAt - Date.now()) < 600_000, `status().lastPollAt ${s.lastPollAt} is a time in ms`);
    ok(s.requests >= 2, `status().requests ${s.requests} counts head + segments`);
    ok(s.bytesReceived > 0, "status().bytesReceived");
    expectState(r, fx.expected, "basic");
  });

  add("basic: get/getText/getJSON, string and byte keys, empty values, absent keys", async () => {
    const fx = sc.basic;
    const r = track(await Replica.open(fx.url));
    await r.sync();
    for (const g of fx.gets) {
      const k = argOf(g.key);
      const got = r.get(k);
      if (g.absent) {
        eq(got, undefined, `get(${show(keyBytes(k))}) of a deleted/never written key`);
        eq(r.getText(k), undefined, `getText(${show(keyBytes(k))}) absent`);
      } else {
        ok(bytesEq(got, b64dec(g.value)), `get(${show(keyBytes(k))}) = ${show(got)}`);
        // the same key passed the other way (bytes <-> string)
        if (typeof k === "string") ok(bytesEq(r.get(enc.encode(k)), got), `get(bytes of ${show(k)})`);
      }
    }
    const empty = r.get("empty-value");
    ok(empty instanceof Uint8Array && empty.length === 0, `an empty value is an empty Uint8Array, not ${show(empty)}`);
    eq(r.getText("empty-value"), "", "getText of an empty value");
    eq(r.getText("ключ:1"), "кириллица", "getText of a Cyrillic key");
    eq(r.getText("emoji:🙂"), "🙂", "getText of an emoji key");
    eq(r.getText("\uFEFFbom"), "a key starting with a byte order mark", "a key starting with U+FEFF is not stripped");
    eq(r.getText("nul:a\u0000b"), "a key with a NUL inside", "a key with a NUL");
    const deadbeef = r.get(Uint8Array.of(0xff, 0x00, 0x01));
    ok(bytesEq(deadbeef, Uint8Array.of(0xde, 0xad, 0xbe, 0xef)), `binary key: ${show(deadbeef)}`);
    const user0 = r.getJSON("user:0");
    if (user0 !== undefined) eq(user0.id, 0, "getJSON(user:0).id");
    const someUser = fx.expected.entries.map(([k]) => b64dec(k)).find((k) => isUtf8(k) && strictUtf8.decode(k).startsWith("user:"));
    const obj = r.getJSON(strictUtf8.decode(someUser));
    eq(typeof obj, "object", `getJSON(${show(someUser)})`);
    eq(r.getJSON("never-written"), undefined, "getJSON of an absent key");
    // A view into a larger buffer is read as just its bytes.
    const big = new Uint8Array([9, 9, ...enc.encode("empty-value"), 9]);
    ok(r.get(big.subarray(2, big.length - 1)) instanceof Uint8Array, "get(subarray view)");
  });

  add("basic: scan cases (prefix, start inclusive, end exclusive, limit)", async () => {
    const fx = sc.basic;
    const r = track(await Replica.open(fx.url));
    await r.sync();
    for (const c of fx.scans) {
      const opts = {};
      for (const f of ["prefix", "start", "end"]) if (c[f]) opts[f] = argOf(c[f]);
      if (c.limit !== undefined) opts.limit = c.limit;
      const rows = c.name === "everything" ? r.scan() : r.scan(opts);
      eq(rows.length, c.expect.length, `scan ${c.name}: row count`);
      c.expect.forEach(([kb, vb], i) => {
        ok(bytesEq(keyBytes(rows[i].key), b64dec(kb)), `scan ${c.name}: row ${i} key ${show(keyBytes(rows[i].key))}, expected ${show(b64dec(kb))}`);
        ok(bytesEq(rows[i].value, b64dec(vb)), `scan ${c.name}: row ${i} value`);
      });
    }
  });

  add("basic: an idle sync is one conditional GET of the head", async () => {
    const fx = sc.basic;
    const r = track(await Replica.open(fx.url));
    await r.sync();
    const before = r.status();
    const rec = recordFetches();
    let lsn;
    try {
      lsn = await r.sync();
    } finally {
      rec.restore();
    }
    const after = r.status();
    eq(lsn, fx.expected.lsn, "second sync");
    eq(after.requests - before.requests, 1, "requests of an idle sync");
    ok(after.bytesReceived - before.bytesReceived < 512, `an idle sync received ${after.bytesReceived - before.bytesReceived} bytes (304 has no body)`);
    if (rec.log.length === 1) {
      ok(rec.log[0].url.endsWith("/catalog/head.json"), `idle sync fetched ${rec.log[0].url}`);
      ok(rec.log[0].ifNoneMatch, "the head GET is conditional (If-None-Match)");
    } else {
      log(`note: fetch wrapper saw ${rec.log.length} fetches (the module may not call globalThis.fetch late)`);
    }
  });

  add("fetch option: every GET goes through the custom fetch, with the URL's query and the headers; persisted without the query", async () => {
    const fx = sc.basic;
    const seen = [];
    const custom = (url, init) => {
      seen.push({ url: String(url), headers: { ...(init?.headers ?? {}) } });
      return globalThis.fetch(String(url).replace(/\?token=abc$/, ""), init);
    };
    const store = mapStore();
    await rejectsWith(Replica.open(fx.url, { fetch: "nope" }), "invalid_input", "fetch that is not a function");
    const r = track(await Replica.open(`${fx.url}?token=abc`, { fetch: custom, headers: { "x-walcast-test": "1" }, persist: store }));
    const lsn = await withTimeout(r.sync(), 120_000, "sync through a custom fetch");
    eq(lsn, fx.expected.lsn, "sync through a custom fetch");
    expectState(r, fx.expected, "custom fetch");
    ok(seen.length >= 2, `the custom fetch saw ${seen.length} GETs`);
    eq(seen.length, r.status().requests, "every GET went through the custom fetch");
    for (const g of seen) {
      ok(g.url.startsWith(`${fx.url}/`) && g.url.endsWith("?token=abc"), `GET ${g.url}: the object's URL with the dataset URL's query`);
      eq(g.headers["x-walcast-test"], "1", `GET ${g.url}: headers option`);
    }
    ok(seen.some((g) => g.url.includes("/catalog/head.json?")), "the head was read through it");
    ok(store.map.has(fx.url), "persisted under the URL without its query");
    ok(![...store.map.keys()].some((k) => k.includes("token=")), "no token in a persisted key");
  });

  add("waitFor: resolves once the LSN is applied, rejects with timeout past the head, refuses a bad LSN", async () => {
    const fx = sc.basic;
    const r = track(await Replica.open(fx.url));
    eq(await withTimeout(r.waitFor(fx.expected.lsn), 120_000, "waitFor the head's LSN"), fx.expected.lsn, "waitFor resolves the applied LSN");
    eq(await r.waitFor(1, { timeout: 0 }), fx.expected.lsn, "an LSN already applied resolves at once");
    await rejectsWith(r.waitFor(fx.expected.lsn + 1000, { timeout: 300 }), "timeout", "an LSN past the head");
    eq(r.status().appliedLsn, fx.expected.lsn, "the state is unchanged after a timeout");
    await rejectsWith(r.waitFor(-1), "invalid_input", "a negative LSN");
    await rejectsWith(r.waitFor("7"), "invalid_input", "an LSN that is not a number");
    expectState(r, fx.expected, "after waitFor");
  });

  add("basic: onChange covers 1..lsn densely; concurrent sync() calls are safe", async () => {
    const fx = sc.basic;
    const r = track(await Replica.open(fx.url));
    const events = [];
    const unsubscribe = r.onChange((e) => events.push(e));
    const results = await withTimeout(Promise.all([r.sync(), r.sync(), r.sync()]), 120_000, "3 concurrent syncs");
    for (const v of results) eq(v, fx.expected.lsn, "each concurrent sync resolves the head's LSN");
    ok(events.length > 0, "onChange fired");
    let next = 1;
    for (const e of events) {
      eq(e.first, next, "onChange ranges are dense and ascending (first)");
      ok(e.last >= e.first, `onChange range ${e.first}..${e.last}`);
      next = e.last + 1;
    }
    eq(next - 1, fx.expected.lsn, "onChange ranges end at the applied LSN");
    unsubscribe();
    expectState(r, fx.expected, "after concurrent syncs");
  });

  add("basic: snapshot() and Replica.restore serve reads with no request; a sync then fetches only the head", async () => {
    const fx = sc.basic;
    const a = track(await Replica.open(fx.url));
    await a.sync();
    const snap = a.snapshot();
    ok(snap instanceof Uint8Array && snap.length > 0, "snapshot() is non-empty bytes");
    const rec = recordFetches();
    let b;
    try {
      b = track(await Replica.restore(fx.url, snap));
      expectState(b, fx.expected, "restored");
      eq(b.status().appliedLsn, fx.expected.lsn, "restored appliedLsn");
      eq(b.status().datasetId, fx.datasetId, "restored datasetId");
      eq(rec.log.length, 0, "restore made no request");
      eq(await b.sync(), fx.expected.lsn, "sync after restore");
    } finally {
      rec.restore();
    }
    const st = b.status();
    ok(st.requests <= 2, `a restored replica at the head made ${st.requests} requests (head only)`);
    ok(!rec.log.some((x) => /\/(segments|snapshots)\//.test(x.url)), `restored replica fetched ${rec.log.map((x) => x.url).join(", ")}`);
  });

  add("basic: raw mode hands every verified record to onRecord in LSN order", async () => {
    const fx = sc.basic;
    const payloads = [];
    let next = 1;
    let bad = null;
    const r = track(
      await Replica.open(fx.url, {
        raw: true,
        onRecord: (lsn, payload) => {
          if (lsn !== next && !bad) bad = `record ${lsn} after ${next - 1}`;
          next = lsn + 1;
          payloads.push(payload.slice());
        },
      }),
    );
    eq(await withTimeout(r.sync(), 120_000, "raw sync"), fx.expected.lsn, "raw sync");
    eq(bad, null, "records arrive densely in LSN order");
    eq(payloads.length, fx.records.count, "number of records");
    let total = 0;
    for (const p of payloads) total += 4 + p.length;
    const buf = new Uint8Array(total);
    const dv = new DataView(buf.buffer);
    let pos = 0;
    for (const p of payloads) {
      dv.setUint32(pos, p.length, true);
      buf.set(p, pos + 4);
      pos += 4 + p.length;
    }
    const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", buf));
    const hexd = [...digest].map((b) => b.toString(16).padStart(2, "0")).join("");
    eq(hexd, fx.records.sha256, "sha256 of (len ‖ payload) of all records = the WAL's");
  });

  add("basic: start() polls in the background, stop() stops it", async () => {
    const fx = sc.basic;
    const errors = [];
    // Polling (walcast serve would hold the head read: see the long-poll case).
    const r = track(await Replica.open(fx.url, { pollInterval: 50, longPoll: false, onError: (e) => errors.push(e) }));
    const changes = [];
    r.onChange((e) => changes.push(e));
    r.start();
    r.start(); // idempotent
    eq(r.status().running, true, "status().running after start()");
    await until(() => r.status().appliedLsn === fx.expected.lsn, 120_000, "background sync reaches the head");
    await until(() => r.status().requests > 0 && changes.length > 0, 5_000, "onChange from the loop");
    // a few idle polls happen
    const polled = r.status().requests;
    await until(() => r.status().requests >= polled + 2, 10_000, "idle polls continue");
    r.stop();
    eq(r.status().running, false, "status().running after stop()");
    await sleep(100); // a poll in flight may finish
    const stopped = r.status().requests;
    await sleep(400);
    eq(r.status().requests, stopped, "no request after stop()");
    eq(errors.length, 0, `onError calls: ${errors.map((e) => e.message).join("; ")}`);
    expectState(r, fx.expected, "after background polling");
    eq(r.status().longPoll, false, "status().longPoll with longPoll: false");
  });

  add("basic: against walcast serve, start() long-polls the head; sync() and stop() do not wait on the held read", async () => {
    const fx = sc.basic;
    const errors = [];
    const r = track(await Replica.open(fx.url, { onError: (e) => errors.push(e) }));
    eq(await r.sync(), fx.expected.lsn, "sync()");
    // Under Workers a request's I/O cannot wait on a read held for another: always polling.
    const scoped = String(ctx.runtime ?? "").startsWith("workerd");
    eq(r.status().longPoll, !scoped, `status().longPoll (${scoped ? "workerd: never" : "walcast serve advertises Walcast-Long-Poll"})`);
    if (scoped) {
      ok(r.status().requestsByKind.longPoll === 0, "no long-poll under Workers");
      return;
    }
    r.start();
    // The loop's sync, then one head read the server holds (30 s): nothing else.
    await until(() => r.status().requests >= 2, 10_000, "the loop's sync");
    const held = r.status().requests;
    await sleep(300);
    ok(r.status().requests <= held + 1, `an idle long-polling replica made ${r.status().requests - held} requests in 300 ms`);
    eq(await r.sync(), fx.expected.lsn, "a sync beside the held read");
    r.stop();
    const stopped = r.status().requests;
    await sleep(200);
    eq(r.status().requests, stopped, "no request after stop()");
    eq(errors.length, 0, `onError calls: ${errors.map((e) => e.message).join("; ")}`);
    expectState(r, fx.expected, "after long-polling");
  });

  add("persist: a store keeps the state; a reopened replica serves reads offline", async () => {
    const fx = sc.basic;
    const store = mapStore();
    const a = track(await Replica.open(fx.url, { persist: store }));
    await a.sync();
    const rec = store.map.get(fx.url);
    ok(rec, "the store holds a record for the dataset URL after a sync");
    eq(rec.appliedLsn, fx.expected.lsn, "persisted appliedLsn");
    eq(rec.datasetId, fx.datasetId, "persisted datasetId");
    ok(rec.snapshot instanceof Uint8Array && rec.snapshot.length > 0, "persisted snapshot bytes");
    const saves = store.saves;
    await a.sync(); // nothing new: no write
    eq(store.saves, saves, "an idle sync writes nothing");
    await a.close();

    const off = goOffline(fixtures.base);
    try {
      const errors = [];
      const b = track(await Replica.open(fx.url, { persist: store, onError: (e) => errors.push(e) }));
      eq(off.count, 0, "opening from the store made no request");
      eq(b.status().appliedLsn, fx.expected.lsn, "reopened appliedLsn");
      expectState(b, fx.expected, "reopened offline");
      await rejectsWith(b.sync(), "unavailable", "sync while offline");
      eq(b.status().lastError?.code, "unavailable", "status().lastError.code after an offline sync");
      eq(b.getText("ключ:1"), "кириллица", "reads still served after a failed sync");
    } finally {
      off.restore();
    }
  });

  add("persist: shouldReplace keeps the newest state per dataset", async () => {
    const { shouldReplace } = walcast;
    eq(typeof shouldReplace, "function", "shouldReplace export");
    const snap = Uint8Array.of(1);
    const old = { snapshot: snap, appliedLsn: 10, datasetId: "a" };
    eq(shouldReplace(undefined, { appliedLsn: 1, datasetId: "a" }), true, "nothing stored");
    eq(shouldReplace(old, { appliedLsn: 11, datasetId: "a" }), true, "newer LSN");
    eq(shouldReplace(old, { appliedLsn: 10, datasetId: "a" }), false, "same LSN");
    eq(shouldReplace(old, { appliedLsn: 9, datasetId: "a" }), false, "older LSN");
    eq(shouldReplace(old, { appliedLsn: 3, datasetId: "b" }), false, "other dataset without a reset");
    eq(shouldReplace(old, { appliedLsn: 3, datasetId: "b" }, { replace: true }), true, "other dataset after a reset");
  });

  if (typeof globalThis.indexedDB !== "undefined") {
    add("persist: indexeddb survives a reopen and serves reads offline", async () => {
      const fx = sc.basic;
      const a = track(await Replica.open(fx.url, { persist: "indexeddb" }));
      await a.sync();
      await a.close();
      const off = goOffline(fixtures.base);
      try {
        const b = track(await Replica.open(fx.url, { persist: "indexeddb" }));
        eq(off.count, 0, "opening from IndexedDB made no request");
        eq(b.status().appliedLsn, fx.expected.lsn, "appliedLsn restored from IndexedDB");
        expectState(b, fx.expected, "restored from IndexedDB");
      } finally {
        off.restore();
      }
    });
  }

  // --- errors ---------------------------------------------------------------------------

  add("errors: a missing dataset rejects with not_found", async () => {
    const r = track(await Replica.open(`${fixtures.base}/no-such-dataset`));
    await rejectsWith(r.sync(), "not_found", "sync of a missing dataset");
    eq(r.status().lastError?.code, "not_found", "status().lastError.code");
    eq(r.status().appliedLsn, 0, "nothing applied");
  });

  add("errors: an unreachable server rejects with unavailable", async () => {
    const r = track(await Replica.open("http://127.0.0.1:9/nothing-listens-here"));
    await rejectsWith(r.sync(), "unavailable", "sync against a closed port");
  });

  add("close: later calls fail with code closed; close twice is fine", async () => {
    const r = await Replica.open(sc.basic.url);
    await r.close();
    await r.close();
    let e = null;
    try {
      r.get("x");
    } catch (x) {
      e = x;
    }
    eq(e?.code, "closed", "get after close");
    await rejectsWith(r.sync(), "closed", "sync after close", 5_000);
  });

  // --- scan bounds, traps and recovery -------------------------------------------------

  add("scan: end at or before start is an empty result, never a trap; the replica keeps syncing", async () => {
    const fx = sc.basic;
    const r = track(await Replica.open(fx.url));
    eq(await withTimeout(r.sync(), 120_000, "sync"), fx.expected.lsn, "sync");
    const cases = [
      [{ start: "b", end: "a" }, "start after end"],
      [{ start: "user:", end: "user:" }, "start equal to end"],
      [{ start: Uint8Array.of(0xff), end: Uint8Array.of(0x00) }, "byte bounds, start after end"],
      [{ prefix: "user:", end: "user" }, "end before the prefix"],
      [{ prefix: "user:", start: "user:9", end: "user:1", limit: 5 }, "start after end within a prefix"],
    ];
    for (const [opts, what] of cases) {
      let rows;
      try {
        rows = r.scan(opts);
      } catch (e) {
        fail(`scan ${what} threw ${e?.name}: ${e?.message} (code ${show(e?.code)})`);
      }
      ok(Array.isArray(rows) && rows.length === 0, `scan ${what} is empty, got ${rows?.length} rows`);
    }
    eq(r.status().lastError, null, "no error after the scans");
    eq(await withTimeout(r.sync(), 60_000, "a sync after the scans"), fx.expected.lsn, "a sync after the scans settles");
    expectState(r, fx.expected, "after the scans");
  });

  const TRAP = Symbol.for("walcast.testTrap");
  const trapOf = (r, mode) => {
    eq(typeof r[TRAP], "function", "the test-only trap hook replica[Symbol.for('walcast.testTrap')]");
    let e = null;
    try {
      r[TRAP](mode);
    } catch (x) {
      e = x;
    }
    return e;
  };

  // --- lazy mode -------------------------------------------------------------------------

  /** The rows of two scans are the same (keys as the API gives them, values as bytes). */
  const sameRows = (got, want, label) => {
    ok(Array.isArray(got), `${label}: a scan resolves an array, got ${show(got)}`);
    for (let i = 0; i < Math.min(got.length, want.length); i++) {
      const gk = keyBytes(got[i].key);
      const wk = keyBytes(want[i].key);
      if (!bytesEq(gk, wk)) fail(`${label}: row ${i} key ${show(gk)}, full mode has ${show(wk)}`);
      eq(typeof got[i].key, typeof want[i].key, `${label}: row ${i} (${show(gk)}) key type`);
      if (!bytesEq(got[i].value, want[i].value)) fail(`${label}: row ${i} (${show(gk)}) value ${show(got[i].value)}, full mode has ${show(want[i].value)}`);
    }
    eq(got.length, want.length, `${label}: number of rows`);
  };
  const scanOpts = (c) => {
    const o = {};
    for (const f of ["prefix", "start", "end"]) if (c[f]) o[f] = argOf(c[f]);
    if (c.limit !== undefined) o.limit = c.limit;
    return o;
  };
  /** Lazy reads equal the fixture's probes and scan counts, and a full replica's answers. */
  const expectLazy = async (lazy, full, fx, label) => {
    eq(lazy.status().appliedLsn, fx.expected.lsn, `${label}: lazy appliedLsn`);
    eq(full.status().appliedLsn, fx.expected.lsn, `${label}: full appliedLsn`);
    for (const p of fx.probes) {
      const k = argOf(p.key);
      const pending = lazy.get(k);
      ok(pending instanceof Promise, `${label}: lazy get() returns a promise`);
      const got = await pending;
      const want = full.get(k);
      if (p.absent) {
        eq(got, undefined, `${label}: lazy get(${show(keyBytes(k))}) of an absent key (${p.kind})`);
      } else {
        ok(bytesEq(got, b64dec(p.value)), `${label}: lazy get(${show(keyBytes(k))}) (${p.kind}) = ${show(got)}, expected ${show(b64dec(p.value))}`);
      }
      ok(got === undefined ? want === undefined : bytesEq(got, want), `${label}: lazy and full get(${show(keyBytes(k))}) differ`);
    }
    for (const c of fx.scans) {
      const opts = scanOpts(c);
      const got = await (c.name === "everything" ? lazy.scan() : lazy.scan(opts));
      eq(got.length, c.count, `${label}: lazy scan ${c.name}: row count`);
      if (c.count > 0) {
        ok(bytesEq(keyBytes(got[0].key), b64dec(c.first)), `${label}: lazy scan ${c.name}: first key ${show(keyBytes(got[0].key))}`);
        ok(bytesEq(keyBytes(got[got.length - 1].key), b64dec(c.last)), `${label}: lazy scan ${c.name}: last key`);
      }
      sameRows(got, c.name === "everything" ? full.scan() : full.scan(opts), `${label}: scan ${c.name}`);
    }
    // maxBytes: each page is the whole scan's next entries, through the one
    // whose keys and values reach the bound, in both modes.
    const all = full.scan();
    // (The first 12 pages of the smaller bounds; every page of 1 MiB.)
    for (const maxBytes of [1, 700, 20000, 1 << 20]) {
      let start = new Uint8Array(0);
      let at = 0;
      for (let page = 0; at < all.length && (page < 12 || maxBytes === 1 << 20); page++) {
        const lazyPage = await lazy.scan({ start, maxBytes });
        const fullPage = full.scan({ start, maxBytes });
        let bytes = 0;
        let n = 0;
        while (at + n < all.length && bytes < maxBytes) {
          bytes += keyBytes(all[at + n].key).byteLength + all[at + n].value.byteLength;
          n++;
        }
        sameRows(lazyPage, all.slice(at, at + n), `${label}: lazy scan maxBytes ${maxBytes}, page ${page}`);
        sameRows(fullPage, all.slice(at, at + n), `${label}: full scan maxBytes ${maxBytes}, page ${page}`);
        at += n;
        const last = keyBytes(all[at - 1].key);
        start = new Uint8Array([...last, 0]);
      }
      if (maxBytes === 1 << 20) eq(at, all.length, `${label}: scan pages of maxBytes ${maxBytes} cover every entry`);
    }
    await rejectsWith(lazy.scan({ maxBytes: 0 }), "invalid_input", "lazy scan maxBytes 0");
    // The module's bound is a u32: a larger maxBytes is its largest, no bound
    // in practice (never a bound of what is left after 2^32, e.g. 0 for 2^32).
    // Over the first 64 entries: 2^32 taken modulo 2^32 (a bound of 0)
    // would cut them to one.
    const range = { start: keyBytes(all[0].key), end: keyBytes(all[Math.min(64, all.length - 1)].key) };
    const first = all.slice(0, Math.min(64, all.length - 1));
    ok(first.length > 1, `${label}: entries to bound`);
    for (const maxBytes of [2 ** 32 - 1, 2 ** 32, 5e9, 1e12, 1e20]) {
      sameRows(await lazy.scan({ ...range, maxBytes }), first, `${label}: lazy scan maxBytes ${maxBytes}`);
      sameRows(full.scan({ ...range, maxBytes }), first, `${label}: full scan maxBytes ${maxBytes}`);
    }
  };

  add("lazy: open refuses what a lazy replica cannot do (invalid_input)", async () => {
    const fx = sc.lazy;
    await rejectsWith(Replica.open(fx.url, { load: "eager" }), "invalid_input", "load: eager");
    await rejectsWith(Replica.open(fx.url, { load: "lazy", cacheBytes: -1 }), "invalid_input", "cacheBytes -1");
    await rejectsWith(Replica.open(fx.url, { load: "lazy", cacheBytes: 1.5 }), "invalid_input", "cacheBytes 1.5");
    const pe = await rejectsWith(Replica.open(fx.url, { load: "lazy", persist: "indexeddb" }), "invalid_input", "persist indexeddb with load lazy");
    ok(/persist/.test(pe.message) && /lazy/.test(pe.message), `the error says why: ${pe.message}`);
    await rejectsWith(Replica.open(fx.url, { load: "lazy", persist: mapStore() }), "invalid_input", "a custom store with load lazy");
    await rejectsWith(Replica.open(fx.url, { load: "lazy", raw: true, onRecord() {} }), "invalid_input", "raw with load lazy");
    await rejectsWith(Replica.restore(fx.url, Uint8Array.of(1, 2, 3), { load: "lazy" }), "invalid_input", "restore with load lazy");
    const r = track(await Replica.open(fx.url, { load: "lazy", persist: "memory" }));
    eq(r.mode, "lazy", "mode");
    await rejectsWith(r.get(42), "invalid_input", "lazy get(42)");
    await rejectsWith(r.scan({ limit: -1 }), "invalid_input", "lazy scan limit -1");
    let e = null;
    try {
      r.snapshot();
    } catch (x) {
      e = x;
    }
    eq(e?.code, "invalid_input", "snapshot() of a lazy replica");
    eq(r.size, undefined, "size of a lazy replica");
  });

  add("lazy: open reads the head and the tail, no snapshot; a cold read makes few GETs and moves a small part of the snapshot", async () => {
    const fx = sc.lazy;
    const snap = fx.snapshotInfo;
    const rec = recordFetches();
    let r;
    try {
      r = track(await withTimeout(Replica.open(fx.url, { load: "lazy" }), 120_000, "lazy open"));
    } finally {
      rec.restore();
    }
    const s0 = r.status();
    eq(s0.mode, "lazy", "status().mode");
    eq(s0.appliedLsn, fx.expected.lsn, "open synced: appliedLsn");
    eq(s0.committedLsn, fx.committedLsn, "committedLsn");
    eq(s0.blocksFetched, 0, "no block fetched by open");
    eq(s0.cachedBytes, 0, "nothing cached by open");
    ok(s0.overlayEntries > 0 && s0.overlayBytes > 0, `the tail is in the overlay: ${s0.overlayEntries} entries, ${s0.overlayBytes} bytes`);
    const tail = fx.segments.filter((x) => x.last > snap.lsn);
    ok(s0.requests <= tail.length + 2, `open made ${s0.requests} GETs (the head and ${tail.length} tail segments)`);
    ok(s0.bytesReceived < snap.size / 4, `open received ${s0.bytesReceived} bytes; the snapshot is ${snap.size}`);
    const keys = rec.log.map((x) => relKey(x.url, fx.url)).filter(Boolean);
    for (const k of keys) {
      ok(!k.startsWith("snapshots/"), `open fetched ${k}`);
      ok(k === "catalog/head.json" || tail.some((t) => t.key === k), `open fetched ${k}, neither the head nor a tail segment`);
    }
    if (keys.length === 0) log("note: fetch wrapper saw no requests; checked request and byte counts only");

    const probe = fx.probes.find((p) => p.kind === "snapshot");
    const v = await withTimeout(r.get(argOf(probe.key)), 60_000, "a cold lazy read");
    ok(bytesEq(v, b64dec(probe.value)), `cold read of ${show(keyBytes(argOf(probe.key)))}`);
    const s1 = r.status();
    const gets = s1.requests - s0.requests;
    const bytes = s1.bytesReceived - s0.bytesReceived;
    log(`lazy cold read: ${gets} GETs, ${bytes} bytes of a ${snap.size}-byte snapshot (${s1.blocksFetched} blocks)`);
    ok(gets >= 1 && gets < 10, `a cold read made ${gets} GETs (fewer than 10)`);
    ok(bytes < snap.size / 4, `a cold read moved ${bytes} bytes, not under a quarter of the ${snap.size}-byte snapshot`);
    ok(s1.blocksFetched > 0, `status().blocksFetched ${s1.blocksFetched}`);
    ok(s1.cachedBytes > 0, `status().cachedBytes ${s1.cachedBytes}`);
    // The same key again: from the cache.
    ok(bytesEq(await r.get(argOf(probe.key)), b64dec(probe.value)), "a second read");
    eq(r.status().requests, s1.requests, "a second read of the same key makes no GET");
    eq(r.status().lastError, null, "no error");
  });

  add("lazy: get, getText, getJSON and scans equal a full replica's answers (probes, prefixes, limits, bounds)", async () => {
    const fx = sc.lazy;
    const full = track(await Replica.open(fx.url));
    eq(await withTimeout(full.sync(), 120_000, "full sync"), fx.expected.lsn, "full sync");
    eq(full.status().mode, "full", "full mode's status().mode");
    eq(full.status().blocksFetched, 0, "full mode's blocksFetched");
    eq(full.size, fx.expected.count, "full replica's key count");
    const lazy = track(await Replica.open(fx.url, { load: "lazy" }));
    await expectLazy(lazy, full, fx, "stage 0");
    const some = fx.probes.find((p) => !p.absent && p.kind === "overwritten");
    const t = await lazy.getText(argOf(some.key));
    eq(t, full.getText(argOf(some.key)), "getText");
    ok(typeof t === "string" && t.length === 100, `getText of a 100-byte value: ${show(t)}`);
    eq(await lazy.getText("aaaa"), undefined, "getText of an absent key");
    eq(await lazy.getJSON("aaaa"), undefined, "getJSON of an absent key");
    let je = null;
    try {
      await lazy.getJSON(argOf(some.key));
    } catch (x) {
      je = x;
    }
    ok(je instanceof SyntaxError, `getJSON of a value that is not JSON rejects with a SyntaxError, got ${je}`);
    // Reads in parallel (as a worker serves them) give the same answers.
    const many = fx.probes.map((p) => argOf(p.key));
    const fresh = track(await Replica.open(fx.url, { load: "lazy" }));
    const answers = await withTimeout(Promise.all(many.map((k) => fresh.get(k))), 120_000, "parallel lazy reads");
    many.forEach((k, i) => {
      const want = full.get(k);
      ok(answers[i] === undefined ? want === undefined : bytesEq(answers[i], want), `parallel read of ${show(keyBytes(k))}`);
    });
    const scans = await Promise.all([fresh.scan({ prefix: "user:", limit: 500 }), fresh.scan({ start: "zone:018000" }), fresh.get("acct:000004")]);
    sameRows(scans[0], full.scan({ prefix: "user:", limit: 500 }), "parallel scan user:");
    sameRows(scans[1], full.scan({ start: "zone:018000" }), "parallel scan from zone:018000");
    // Empty ranges, as in full mode.
    for (const opts of [{ start: "b", end: "a" }, { start: "item:", end: "item:" }, { prefix: "user:", end: "user" }]) {
      const rows = await lazy.scan(opts);
      ok(Array.isArray(rows) && rows.length === 0, `lazy scan ${JSON.stringify(opts)} is empty`);
    }
    eq(lazy.status().lastError, null, "no error after the reads");
  });

  add("lazy: through a chain of pointer deltas, reads and scans equal a full replica's answers, with a large cache and a tiny one", async () => {
    const fx = sc.lazydeltas;
    ok(fx.pointerDeltas >= 1, `the head names ${fx.pointerDeltas} pointer deltas`);
    const full = track(await Replica.open(fx.url));
    eq(await withTimeout(full.sync(), 120_000, "full sync"), fx.expected.lsn, "full sync");
    for (const cacheBytes of [8 << 20, 16 << 10]) {
      const lazy = track(await Replica.open(fx.url, { load: "lazy", cacheBytes }));
      await expectLazy(lazy, full, fx, `pointer deltas, cache ${cacheBytes}`);
      eq(lazy.status().lastError, null, "no error after the reads");
    }
  });

  add("lazy: a cache far smaller than the snapshot still answers every read and scan", async () => {
    const fx = sc.lazy;
    const full = track(await Replica.open(fx.url));
    await withTimeout(full.sync(), 120_000, "full sync");
    const lazy = track(await Replica.open(fx.url, { load: "lazy", cacheBytes: 48 * 1024 }));
    sameRows(await withTimeout(lazy.scan(), 120_000, "a whole scan with a 48 KiB cache"), full.scan(), "whole scan, 48 KiB cache");
    ok(lazy.status().cachedBytes <= 96 * 1024, `cachedBytes ${lazy.status().cachedBytes} stays near cacheBytes`);
    for (const p of fx.probes.slice(0, 60)) {
      const k = argOf(p.key);
      const got = await lazy.get(k);
      const want = full.get(k);
      ok(got === undefined ? want === undefined : bytesEq(got, want), `get(${show(keyBytes(k))}) with a 48 KiB cache`);
    }
  });

  add("lazy: more scans at once than the module keeps open all finish (they wait their turn)", async () => {
    const fx = sc.lazy;
    const full = track(await Replica.open(fx.url));
    await withTimeout(full.sync(), 120_000, "full sync");
    const want = full.scan({ limit: 400 });
    // A cache of a few blocks: every scan waits for GETs, so all of them
    // are open at once.
    const lazy = track(await Replica.open(fx.url, { load: "lazy", cacheBytes: 48 * 1024 }));
    const scans = Array.from({ length: 100 }, () => lazy.scan({ limit: 400 }));
    const got = await withTimeout(Promise.all(scans), 240_000, "100 scans at once");
    for (const [i, rows] of got.entries()) sameRows(rows, want, `scan ${i} of 100 at once`);
  });

  add("lazy: scans stranded by torn-down I/O give their slots up; later scans answer", async () => {
    const fx = sc.lazy;
    const full = track(await Replica.open(fx.url));
    await withTimeout(full.sync(), 120_000, "full sync");
    const want = full.scan({ prefix: "item:", limit: 50 });
    const lazy = track(await Replica.open(fx.url, { load: "lazy" }));
    const trap = lazy[Symbol.for("walcast.testTrap")].bind(lazy);
    // 48 scans (every slot) whose reads never settle, as a Workers request's
    // fetches do once that request ended; their slots turn stale in 300 ms.
    trap("scan-stale-ms:300");
    trap("hang-scans:48");
    for (let i = 0; i < 48; i++) lazy.scan({ prefix: "item:", limit: 50 });
    const later = await Promise.all(
      Array.from({ length: 3 }, () => withTimeout(lazy.scan({ prefix: "item:", limit: 50 }), 60_000, "a scan after 48 stranded ones")),
    );
    for (const [i, rows] of later.entries()) sameRows(rows, want, `scan ${i} after 48 stranded ones`);
  });

  add("lazy: close rejects scans waiting for a slot at once, leaving no timer", async () => {
    const fx = sc.lazy;
    const r = await Replica.open(fx.url, { load: "lazy" });
    const trap = r[Symbol.for("walcast.testTrap")].bind(r);
    // Every slot held by a scan that never settles (stale only after the
    // default two minutes), then one more scan that waits for a slot.
    trap("hang-scans:48");
    for (let i = 0; i < 48; i++) r.scan({ prefix: "item:", limit: 5 });
    const waiting = r.scan({ prefix: "item:", limit: 5 });
    await new Promise((resolve) => setTimeout(resolve, 50));
    await r.close();
    // (Its slot would turn stale only after two minutes.)
    await rejectsWith(waiting, "closed", "a scan waiting for a slot at close", 5_000);
  });

  add("lazy: close rejects later reads with closed", async () => {
    const fx = sc.lazy;
    const r = await Replica.open(fx.url, { load: "lazy" });
    const pending = r.get("acct:000000");
    await r.close();
    try {
      await pending; // answered, or rejected with closed: never left hanging
    } catch (e) {
      eq(e.code, "closed", `a read in flight at close (message: ${e.message})`);
    }
    await rejectsWith(r.get("acct:000000"), "closed", "get after close", 5_000);
    await rejectsWith(r.scan(), "closed", "scan after close", 5_000);
    await rejectsWith(r.sync(), "closed", "sync after close", 5_000);
  });

  add("lazy: a trap rebuilds the lazy replica; its next read syncs again and answers", async () => {
    const fx = sc.lazy;
    const full = track(await Replica.open(fx.url));
    await withTimeout(full.sync(), 120_000, "full sync");
    const r = track(await Replica.open(fx.url, { load: "lazy" }));
    const p = fx.probes.find((x) => x.kind === "snapshot");
    ok(bytesEq(await r.get(argOf(p.key)), b64dec(p.value)), "read before the trap");
    const e = trapOf(r, "read");
    eq(e?.code, "internal", `trap: error.code (message: ${e?.message})`);
    ok(r.status().recoveries >= 1, "status().recoveries");
    ok(bytesEq(await withTimeout(r.get(argOf(p.key)), 60_000, "read after the trap"), b64dec(p.value)), "read after the trap");
    eq(r.status().appliedLsn, fx.expected.lsn, "synced again");
    sameRows(await r.scan({ prefix: "item:", limit: 200 }), full.scan({ prefix: "item:", limit: 200 }), "scan after the trap");
    // A trap while a sync delivers: the sync rejects; reads go on.
    trapOf(r, "sync");
    await rejectsWith(r.sync(), "internal", "the lazy sync that trapped", 60_000);
    ok(bytesEq(await withTimeout(r.get(argOf(p.key)), 60_000, "read after a trap in a sync"), b64dec(p.value)), "read after a trap in a sync");
  });

  add("recovery: a trap in a call throws code internal; every replica keeps its state, reads and syncs", async () => {
    const fx = sc.basic;
    const a = track(await Replica.open(fx.url));
    const b = track(await Replica.open(sc.midhistory.url));
    await withTimeout(Promise.all([a.sync(), b.sync()]), 120_000, "syncs");
    const bLsn = b.status().appliedLsn;
    const bSize = b.size;
    for (const mode of ["read", "abort"]) {
      const e = trapOf(a, mode);
      ok(e instanceof Error, `trap (${mode}): the call throws an Error, got ${show(e)}`);
      eq(e.code, "internal", `trap (${mode}): error.code (message: ${e.message})`);
      ok(/trap/.test(e.message), `trap (${mode}): the message says the module trapped: ${e.message}`);
      const st = a.status();
      eq(st.lastError?.code, "internal", `trap (${mode}): status().lastError.code`);
      ok(st.recoveries >= 1, `trap (${mode}): status().recoveries ${st.recoveries}`);
      eq(st.appliedLsn, fx.expected.lsn, `trap (${mode}): the state is carried over (appliedLsn)`);
      expectState(a, fx.expected, `after a trap (${mode})`);
      eq(b.status().appliedLsn, bLsn, `trap (${mode}): another replica keeps its LSN`);
      eq(b.size, bSize, `trap (${mode}): another replica keeps its keys`);
      eq(await withTimeout(a.sync(), 60_000, `sync after a trap (${mode})`), fx.expected.lsn, `sync after a trap (${mode})`);
      eq(a.status().lastError, null, `trap (${mode}): a successful sync clears lastError`);
      eq(await withTimeout(b.sync(), 60_000, `another replica's sync after a trap (${mode})`), bLsn, "another replica's sync");
    }
  });

  add("recovery: a trap during sync rejects it (code internal, never hangs); the persisted copy is reloaded", async () => {
    const fx = sc.basic;
    const store = mapStore();
    const errors = [];
    const a = track(await Replica.open(fx.url, { persist: store, onError: (e) => errors.push(e) }));
    eq(await withTimeout(a.sync(), 120_000, "sync"), fx.expected.lsn, "sync");
    eq(store.map.get(fx.url)?.appliedLsn, fx.expected.lsn, "persisted");
    const other = track(await Replica.open(sc.midhistory.url));
    await withTimeout(other.sync(), 120_000, "other sync");
    eq(trapOf(a, "sync"), null, "arming a trap in the next sync throws nothing");
    const concurrent = other.sync(); // runs while the instance is replaced under it
    const e = await rejectsWith(a.sync(), "internal", "the sync that trapped", 60_000);
    ok(/trap/.test(e.message), `the message says the module trapped: ${e.message}`);
    eq(await withTimeout(concurrent, 60_000, "a concurrent sync of another replica"), other.status().appliedLsn, "another replica's concurrent sync");
    // Reads work at once; the persisted copy comes back before the next sync.
    a.get("user:0");
    eq(await withTimeout(a.sync(), 60_000, "sync after the trap"), fx.expected.lsn, "sync after the trap");
    expectState(a, fx.expected, "after recovery from the persisted copy");
    eq(a.status().lastError, null, "lastError cleared by the next sync");
    eq(a.status().recoveries, 1, "recoveries");
    eq(store.map.get(fx.url)?.appliedLsn, fx.expected.lsn, "the persisted copy was not replaced by an empty state");
  });

  add("recovery: without a persisted copy, a replica whose sync trapped starts over from the dataset", async () => {
    const fx = sc.basic;
    const a = track(await Replica.open(fx.url));
    eq(await withTimeout(a.sync(), 120_000, "sync"), fx.expected.lsn, "sync");
    const resets = [];
    a.onReset((x) => resets.push(x));
    trapOf(a, "sync");
    await rejectsWith(a.sync(), "internal", "the sync that trapped", 60_000);
    eq(a.status().appliedLsn, 0, "rebuilt empty: appliedLsn");
    eq(a.get("user:0"), undefined, "rebuilt empty: no keys");
    await until(() => resets.some((x) => x.lsn === 0), 5_000, "onReset({ lsn: 0 }) for the state that was lost");
    eq(await withTimeout(a.sync(), 120_000, "sync after the trap"), fx.expected.lsn, "sync after the trap");
    expectState(a, fx.expected, "after starting over");
  });

  add("recovery: a rebuild that fails (no fresh instance, or no replica in it) is tried again by the next sync, never a dead replica", async () => {
    const fx = sc.basic;
    const a = track(await Replica.open(fx.url));
    eq(await withTimeout(a.sync(), 120_000, "sync"), fx.expected.lsn, "sync");
    try {
      // The new WasmReplica of the rebuild fails once: the next sync makes one.
      trapOf(a, "fail-construct");
      trapOf(a, "sync");
      await rejectsWith(a.sync(), "internal", "the sync that trapped", 60_000);
      let e = null;
      try {
        a.get("user:0");
      } catch (x) {
        e = x;
      }
      eq(e?.code, "unavailable", "a read while no replica could be rebuilt: code unavailable");
      eq(await withTimeout(a.sync(), 120_000, "the sync after a failed rebuild"), fx.expected.lsn, "the next sync rebuilds and catches up");
      expectState(a, fx.expected, "after a failed rebuild");
      // No fresh instance of the module at all (both tries fail): every
      // replica waits without one; the next sync instantiates it again.
      let replaceable = null;
      try {
        replaceable = a[TRAP]("fail-instantiate");
      } catch {
        replaceable = null;
      }
      if (replaceable === true) {
        const b = track(await Replica.open(sc.midhistory.url));
        await withTimeout(b.sync(), 120_000, "other sync");
        const bLsn = b.status().appliedLsn;
        const bSize = b.size;
        const bResets = [];
        b.onReset((ev) => bResets.push(ev.lsn));
        eq(trapOf(a, "read")?.code, "internal", "the read that trapped");
        // Another replica keeps the state it had, carried over while no
        // instance could be made, and waitFor revives it.
        eq(await withTimeout(b.waitFor(bLsn, { timeout: 60_000 }), 90_000, "waitFor while rebuilding"), bLsn, "waitFor revives a replica");
        eq(b.size, bSize, "another replica keeps its keys through a failed instantiation");
        eq(bResets.length, 0, `another replica is not reset (resets: ${bResets.join(", ")})`);
        let e2 = null;
        try {
          a.get("user:0");
        } catch (x) {
          e2 = x;
        }
        eq(e2?.code, "unavailable", "a read while no instance could be made: code unavailable");
        eq(await withTimeout(a.sync(), 120_000, "a sync after a failed instantiation"), fx.expected.lsn, "the replica that trapped syncs again");
        expectState(a, fx.expected, "after a failed instantiation");
        eq(await withTimeout(b.sync(), 120_000, "another replica's sync after a failed instantiation"), bLsn, "another replica syncs again");
        // Another replica whose own rebuild makes no WasmReplica keeps the
        // state carried over: its revival restores it, not an empty one.
        b[TRAP]("fail-rebuild");
        eq(trapOf(a, "read")?.code, "internal", "the read that trapped (b's rebuild failing)");
        eq(await withTimeout(b.waitFor(bLsn, { timeout: 60_000 }), 90_000, "waitFor after a failed rebuild"), bLsn, "waitFor revives it");
        eq(b.size, bSize, "the carried state survives a rebuild that made no replica");
        eq(bResets.length, 0, `not reset by a failed rebuild (resets: ${bResets.join(", ")})`);
        eq(await withTimeout(a.sync(), 120_000, "a sync after b's failed rebuild"), fx.expected.lsn, "the replica that trapped syncs again");
      } else {
        log("note: the module is not replaceable here (glue set up elsewhere); the instantiation fault is not exercised");
      }
    } finally {
      try {
        a[TRAP]("clear-faults");
      } catch {
        // closed
      }
    }
  });

  add("recovery: a replica opened while the module is being replaced lives in the fresh instance", async () => {
    const fx = sc.basic;
    const a = track(await Replica.open(fx.url));
    eq(await withTimeout(a.sync(), 120_000, "sync"), fx.expected.lsn, "sync");
    const saved = { snapshot: a.snapshot(), appliedLsn: fx.expected.lsn, datasetId: a.status().datasetId };
    let release;
    const gate = new Promise((resolve) => (release = resolve));
    const store = {
      async load() {
        await gate;
        return saved;
      },
      async save() {},
    };
    let replaceable = null;
    try {
      replaceable = a[TRAP]("async-instantiate");
    } catch {
      replaceable = null;
    }
    try {
      if (replaceable !== true) {
        log("note: the module is not replaceable here; the replacement in flight is not exercised");
        return;
      }
      const opening = Replica.open(fx.url, { persist: store });
      await sleep(50); // the open waits in the store's load
      eq(trapOf(a, "read")?.code, "internal", "the read that trapped");
      release(); // the load answers while the fresh instance is still coming
      const b = track(await withTimeout(opening, 60_000, "the open"));
      expectState(b, fx.expected, "a replica opened while the module was replaced");
      eq(await withTimeout(b.sync(), 60_000, "its sync"), fx.expected.lsn, "its sync");
      expectState(a, fx.expected, "the replica that trapped");
    } finally {
      a[TRAP]("clear-faults");
    }
  });

  add("persist: a raw replica and a key-value replica of one URL keep separate records", async () => {
    const fx = sc.basic;
    const store = mapStore();
    let records = 0;
    const raw = track(await Replica.open(fx.url, { raw: true, onRecord: () => records++, persist: store }));
    eq(await withTimeout(raw.sync(), 120_000, "raw sync"), fx.expected.lsn, "raw sync");
    ok(records > 0, "records delivered");
    await raw.close();
    const kv = track(await Replica.open(fx.url, { persist: store }));
    eq(kv.status().appliedLsn, 0, "a key-value replica does not open at the raw replica's LSN");
    eq(await withTimeout(kv.sync(), 120_000, "kv sync"), fx.expected.lsn, "kv sync");
    expectState(kv, fx.expected, "a key-value replica beside a raw one");
    await kv.close();
    const again = track(await Replica.open(fx.url, { persist: store }));
    eq(again.status().appliedLsn, fx.expected.lsn, "the key-value record reopens");
    expectState(again, fx.expected, "reopened beside a raw record");
    ok(store.map.size === 2, `two records (${[...store.map.keys()].join(", ")})`);
  });

  // A store holding a raw replica's record of `fx` (no key-value state, at
  // its LSN) under the plain key, as `change` makes it; returns the store
  // and the record as the raw replica wrote it.
  async function rawRecordAtPlainKey(fx, change) {
    const store = mapStore();
    const raw = track(await Replica.open(fx.url, { raw: true, onRecord: () => {}, persist: store }));
    eq(await withTimeout(raw.sync(), 120_000, "raw sync"), fx.expected.lsn, "raw sync");
    await raw.close();
    const rawKey = [...store.map.keys()].find((k) => k.endsWith("#raw"));
    ok(rawKey !== undefined, "the raw replica's record");
    const rec = store.map.get(rawKey);
    store.map.set(rawKey.slice(0, -"#raw".length), change(rec));
    store.map.delete(rawKey);
    return { store, rec };
  }

  add("persist: a raw replica's record under the plain key (older versions) never opens a key-value replica with no keys", async () => {
    const fx = sc.basic;
    // Where older versions kept it: the key a key-value replica opens from.
    const { store } = await rawRecordAtPlainKey(fx, (rec) => rec);
    const errors = [];
    const kv = track(await Replica.open(fx.url, { persist: store, onError: (e) => errors.push(e) }));
    eq(kv.status().appliedLsn, 0, "not opened at the raw record's LSN with none of its keys");
    ok(
      errors.some((e) => e.code === "data" && /no keys/.test(e.message)),
      `a data error saying so (${errors.map((e) => e.message).join("; ")})`,
    );
    eq(await withTimeout(kv.sync(), 120_000, "kv sync"), fx.expected.lsn, "kv sync");
    expectState(kv, fx.expected, "the key-value replica that found a raw record");
  });

  add("persist: a key-value copy with no keys that says it is one (kv: a dataset whose keys were all deleted) opens as it is", async () => {
    const fx = sc.basic;
    // An empty key-value state at an LSN above 0, as a key-value replica
    // writes it (kv) once every key was deleted.
    const { store, rec } = await rawRecordAtPlainKey(fx, (r) => ({ ...r, kv: true }));
    const errors = [];
    const kv = track(await Replica.open(fx.url, { persist: store, onError: (e) => errors.push(e) }));
    eq(kv.status().appliedLsn, rec.appliedLsn, "opened at the copy's LSN");
    eq(kv.size, 0, "with no keys");
    ok(errors.length === 0, `no error (${errors.map((e) => e.message).join("; ")})`);
    await kv.close();
    // What a key-value replica writes says so.
    const mine = mapStore();
    const w = track(await Replica.open(fx.url, { persist: mine }));
    await withTimeout(w.sync(), 120_000, "sync");
    await w.close();
    const saved = [...mine.map.values()];
    ok(saved.length === 1 && saved[0].kv === true, "a key-value replica's copy carries kv: true");
  });

  add("start: a pollInterval past setTimeout's range does not poll in a tight loop", async () => {
    const fx = sc.basic;
    const r = track(await Replica.open(fx.url, { pollInterval: 2 ** 31 + 5, longPoll: false }));
    await withTimeout(r.sync(), 120_000, "sync");
    const before = r.status().requests;
    r.start();
    await new Promise((res) => setTimeout(res, 500));
    r.stop();
    const made = r.status().requests - before;
    ok(made <= 4, `start() made ${made} requests in 500 ms`);
  });

  add("persist: a store call that never settles fails after persistTimeoutMs; syncs, start() and close() go on", async () => {
    const fx = sc.basic;
    const errors = [];
    const never = () => new Promise(() => {});
    const store = { load: async () => null, save: never, append: never };
    const r = await Replica.open(fx.url, { persist: store, persistTimeoutMs: 200, onError: (e) => errors.push(e) });
    eq(await withTimeout(r.sync(), 60_000, "a sync whose save never settles"), fx.expected.lsn, "the sync settles");
    await until(() => errors.some((e) => e.code === "persist"), 10_000, "a persist error");
    const e = errors.find((x) => x.code === "persist");
    ok(/did not settle within 200 ms/.test(e.message), `the error says why: ${e.message}`);
    eq(await withTimeout(r.sync(), 60_000, "the next sync"), fx.expected.lsn, "the next sync");
    await withTimeout(r.close(), 10_000, "close");
    const bad = await rejectsWith(Replica.open(fx.url, { persistTimeoutMs: 0 }), "invalid_input", "persistTimeoutMs 0");
    ok(/persistTimeoutMs/.test(bad.message), bad.message);
  });

  // --- bounded bodies -----------------------------------------------------------------

  const MAX_HEAD = 1 << 20;
  for (const mode of ["endless", "claim"]) {
    const what = mode === "endless" ? "an endless head body" : "a head claiming a 1 TiB Content-Length";
    add(`limits: ${what} is cut at 1 MiB + 1 byte: data error naming catalog/head.json, bounded transfer`, async () => {
      ok(fixtures.control, "fixtures.control (the orchestrator's control URL) is set");
      const token = `${mode}-${ctx.runtime ?? "rt"}-${Date.now()}-${Math.random().toString(36).slice(2)}`.replace(/[^A-Za-z0-9_-]/g, "_");
      const r = track(await Replica.open(`${fixtures.control}/hostile/${mode}/${token}`));
      const e = await rejectsWith(r.sync(), "data", `sync against ${what}`, 120_000);
      const named = String(e.object ?? "") + " " + e.message;
      ok(named.includes("catalog/head.json"), `the error names catalog/head.json: object ${show(e.object)}, message ${e.message}`);
      const st = r.status();
      eq(st.lastError?.code, "data", "status().lastError.code");
      ok(st.requests >= 1, "requests made");
      ok(st.bytesReceived <= st.requests * (MAX_HEAD + 1), `${st.bytesReceived} body bytes for ${st.requests} requests: at most 1 MiB + 1 each`);
      await r.close();
      // What the server had to send: cut off near the limit (plus socket buffers), not the 64 MiB it offered.
      let stats;
      await until(async () => {
        stats = await (await fetch(`${fixtures.control}/hostile-stats/${token}`)).json();
        return stats.open === 0;
      }, 30_000, "every hostile response is closed by the client");
      ok(stats.requests >= 1, `hostile requests: ${stats.requests}`);
      log(`limits (${mode}): ${stats.requests} requests, the server sent at most ${stats.maxSent} bytes of one (offered 64 MiB); ${st.bytesReceived} body bytes reached the replica`);
      ok(stats.maxSent <= 24 * MAX_HEAD, `the client pulled at most ${stats.maxSent} bytes of one response (bounded near 1 MiB, far below 64 MiB)`);
    });
  }

  add("errors: a network error whose text says 416 is a transient failure (unavailable), classified by status only", async () => {
    const fx = sc.basic;
    const r = track(await Replica.open(fx.url));
    const orig = globalThis.fetch;
    globalThis.fetch = function fake416(input, init) {
      const url = typeof input === "string" ? input : input instanceof URL ? input.href : input.url;
      if (url.startsWith(fixtures.base)) return Promise.reject(new TypeError("connection reset: 416 Range Not Satisfiable"));
      return orig.call(globalThis, input, init);
    };
    try {
      await rejectsWith(r.sync(), "unavailable", "sync whose fetch fails with '416' in its text", 120_000);
    } finally {
      globalThis.fetch = orig;
    }
    eq(await withTimeout(r.sync(), 120_000, "sync once the network is back"), fx.expected.lsn, "sync once the network is back");
  });

  // --- scenarios with a mutation (order matters) -------------------------------------

  add("midhistory: a replica restored from snapshot() fetches only the tail", async () => {
    const fx0 = sc.midhistory;
    const a = track(await Replica.open(fx0.url));
    eq(await a.sync(), fx0.expected.lsn, "stage 0 sync");
    const snap = a.snapshot();
    const fresh0 = a.status().bytesReceived;
    await a.close();
    const fx1 = await mutate("midhistory");
    const tail = fx1.segments.filter((s) => s.last >= fx1.tailFrom);
    const old = new Set(fx1.segments.filter((s) => s.last < fx1.tailFrom).map((s) => s.key));
    const tailBytes = tail.reduce((n, s) => n + s.size, 0);
    const rec = recordFetches();
    let b;
    try {
      b = track(await Replica.restore(fx1.url, snap));
      eq(await withTimeout(b.sync(), 120_000, "sync after restore"), fx1.expected.lsn, "sync after restore");
    } finally {
      rec.restore();
    }
    expectState(b, fx1.expected, "restored + tail");
    const st = b.status();
    ok(st.bytesReceived <= tailBytes + 64 * 1024, `restored replica received ${st.bytesReceived} bytes; the tail is ${tailBytes} (whole history ${fresh0 + tailBytes})`);
    ok(st.requests <= tail.length + 3, `restored replica made ${st.requests} requests for ${tail.length} tail segments`);
    const keys = rec.log.map((x) => relKey(x.url, fx1.url)).filter(Boolean);
    for (const k of keys) {
      ok(!old.has(k), `restored replica fetched ${k}, which lies wholly below LSN ${fx1.tailFrom}`);
      ok(!k.startsWith("snapshots/"), `restored replica fetched a snapshot (${k})`);
    }
    if (keys.length === 0) log("note: fetch wrapper saw no requests; checked bytes and request counts only");
  });

  add("corrupt: a flipped byte is never applied; the last good state is kept", async () => {
    const fx0 = sc.corrupt;
    const a = track(await Replica.open(fx0.url));
    eq(await a.sync(), fx0.expected.lsn, "stage 0 sync");
    const fx1 = await mutate("corrupt");
    const e = await rejectsWith(a.sync(), "data", "sync over a flipped byte", 120_000);
    ok(typeof e.message === "string" && e.message.length > 0, "the error has a message");
    if (e.object !== undefined && e.object !== null) {
      ok(String(e.object).includes(fx1.expectError.object.split("/").pop()), `error.object ${show(String(e.object))} names ${fx1.expectError.object}`);
    } else {
      ok(e.message.includes(fx1.expectError.object.split("/").pop()), `error names the object: ${e.message}`);
    }
    if (e.lsn !== undefined && e.lsn !== null) eq(Number(e.lsn), fx1.expectError.lsn, "error.lsn");
    const st = a.status();
    eq(st.appliedLsn, fx1.goodLsn, "appliedLsn stays at the last good LSN");
    eq(st.lastError?.code, "data", "status().lastError.code");
    expectState(a, fx1.expected, "after the data error");

    const fresh = track(await Replica.open(fx1.url));
    await rejectsWith(fresh.sync(), "data", "a fresh replica's sync over the flipped byte", 120_000);
    const fs = fresh.status();
    ok(fs.appliedLsn <= fx1.goodLsn, `a fresh replica applied ${fs.appliedLsn} > ${fx1.goodLsn}`);
    if (fs.appliedLsn === fx1.goodLsn) expectState(fresh, fx1.expected, "fresh replica at the last good LSN");
  });

  add("retention: a replica passed by retention re-bootstraps by itself", async () => {
    const fx0 = sc.retention;
    const store = mapStore();
    const a = track(await Replica.open(fx0.url, { persist: store }));
    eq(await a.sync(), fx0.expected.lsn, "stage 0 sync");
    expectState(a, fx0.expected, "stage 0");
    const resets = [];
    a.onReset((e) => resets.push(e));
    const fx1 = await mutate("retention");
    eq(await withTimeout(a.sync(), 120_000, "sync after retention passed"), fx1.expected.lsn, "sync after retention passed");
    expectState(a, fx1.expected, "after re-bootstrap");
    ok(resets.length >= 1, "onReset fired for the re-bootstrap");
    eq(a.status().lastError, null, "no error left");
    eq(store.map.get(fx1.url)?.appliedLsn, fx1.expected.lsn, "the store holds the re-bootstrapped state");
  });

  add("newdataset: a new dataset id makes the replica start over", async () => {
    const fx0 = sc.newdataset;
    const store = mapStore();
    const a = track(await Replica.open(fx0.url, { persist: store }));
    eq(await a.sync(), fx0.expected.lsn, "stage 0 sync");
    eq(a.status().datasetId, fx0.datasetId, "stage 0 datasetId");
    const resets = [];
    a.onReset((e) => resets.push(e));
    const fx1 = await mutate("newdataset");
    eq(await withTimeout(a.sync(), 120_000, "sync after the dataset changed"), fx1.expected.lsn, "sync after the dataset changed");
    eq(a.status().datasetId, fx1.datasetId, "new datasetId");
    expectState(a, fx1.expected, "new dataset");
    ok(resets.length >= 1, "onReset fired");
    const rec = store.map.get(fx1.url);
    eq(rec?.datasetId, fx1.datasetId, "the store holds the new dataset");
    eq(rec?.appliedLsn, fx1.expected.lsn, "persisted LSN of the new dataset");
  });

  add("lazy: writes published after open are seen after sync(); a newer snapshot moves the base", async () => {
    const fx0 = sc.lazy;
    const lazy = track(await Replica.open(fx0.url, { load: "lazy" }));
    const small = track(await Replica.open(fx0.url, { load: "lazy", cacheBytes: 64 * 1024 }));
    const full = track(await Replica.open(fx0.url));
    await withTimeout(full.sync(), 120_000, "full sync");
    // Warm the cache with stage 0's blocks: later answers must not come from stale blocks.
    for (const p of fx0.probes) await lazy.get(argOf(p.key));
    const changes = [];
    lazy.onChange((c) => changes.push(c));
    const fx1 = await mutate("lazy");
    eq(await withTimeout(lazy.sync(), 120_000, "lazy sync to stage 1"), fx1.expected.lsn, "lazy sync to stage 1");
    eq(await withTimeout(small.sync(), 120_000, "small-cache sync to stage 1"), fx1.expected.lsn, "small-cache sync");
    eq(await withTimeout(full.sync(), 120_000, "full sync to stage 1"), fx1.expected.lsn, "full sync to stage 1");
    ok(changes.length > 0 && changes[changes.length - 1].last === fx1.expected.lsn, `onChange reached ${fx1.expected.lsn}: ${JSON.stringify(changes.slice(-1))}`);
    eq(lazy.status().blocksFetched > 0, true, "blocks were fetched before");
    await expectLazy(lazy, full, fx1, "stage 1");
    await expectLazy(small, full, fx1, "stage 1, 64 KiB cache");
    const fx2 = await mutate("lazy");
    ok(fx2.snapshotInfo.lsn > fx1.snapshotInfo.lsn, `stage 2 has a newer snapshot (${fx2.snapshotInfo.lsn})`);
    eq(await withTimeout(lazy.sync(), 120_000, "lazy sync to stage 2"), fx2.expected.lsn, "lazy sync to stage 2");
    eq(await withTimeout(full.sync(), 120_000, "full sync to stage 2"), fx2.expected.lsn, "full sync to stage 2");
    await expectLazy(lazy, full, fx2, "stage 2 (newer snapshot)");
    // A replica opened now starts from the newer snapshot.
    const later = track(await Replica.open(fx2.url, { load: "lazy" }));
    const st = later.status();
    ok(st.bytesReceived < fx2.snapshotInfo.size / 4, `a lazy open at stage 2 received ${st.bytesReceived} bytes`);
    await expectLazy(later, full, fx2, "stage 2, opened there");
    eq(lazy.status().lastError, null, "no error");
  });

  add("lazydamage: a damaged snapshot block is a data error naming the snapshot; other reads go on, and all work after repair", async () => {
    const fx0 = sc.lazydamage;
    const r = track(await Replica.open(fx0.url, { load: "lazy" }));
    const damaged = argOf(fx0.damagedKey);
    const far = argOf(fx0.farKey);
    const fx1 = await mutate("lazydamage");
    ok(fx1.flippedByte > 0, "stage 1 is the damaged one");
    const e = await rejectsWith(r.get(damaged), "data", `get(${show(keyBytes(damaged))}) from the damaged block`, 60_000);
    eq(e.object, fx1.snapshot, `error.object names the snapshot (message: ${e.message})`);
    eq(r.status().lastError?.code, "data", "status().lastError.code");
    eq(r.status().lastError?.object, fx1.snapshot, "status().lastError.object");
    // A key in another block still reads, and so does the overlay.
    const farProbe = fx1.probes.find((p) => bytesEq(keyBytes(argOf(p.key)), keyBytes(far)));
    ok(bytesEq(await withTimeout(r.get(far), 60_000, "a read in another block"), b64dec(farProbe.value)), "a key in another block");
    // A scan across the damaged block fails the same way (and never hangs).
    await rejectsWith(r.scan({ prefix: "d:0015" }), "data", "a scan across the damaged block", 60_000);
    // The damage persists: the read fails again (nothing bad was cached).
    await rejectsWith(r.get(damaged), "data", "the damaged block, read again", 60_000);
    const fx2 = await mutate("lazydamage");
    for (const p of fx2.probes) {
      const got = await withTimeout(r.get(argOf(p.key)), 60_000, `get after the repair`);
      if (p.absent) eq(got, undefined, `get(${show(keyBytes(argOf(p.key)))}) after the repair`);
      else ok(bytesEq(got, b64dec(p.value)), `get(${show(keyBytes(argOf(p.key)))}) after the repair = ${show(got)}`);
    }
    for (const c of fx2.scans) {
      const rows = await withTimeout(c.name === "everything" ? r.scan() : r.scan(scanOpts(c)), 60_000, `scan ${c.name} after the repair`);
      eq(rows.length, c.count, `scan ${c.name} after the repair: row count`);
    }
    eq(await withTimeout(r.sync(), 60_000, "sync after the repair"), fx2.expected.lsn, "sync after the repair");
  });

  // --- signed (trust) ------------------------------------------------------------------

  /** The error names `object` (error.object, else the message). */
  const namesObject = (e, object, what) => {
    const tail = object.split("/").pop();
    if (e.object !== undefined && e.object !== null) ok(String(e.object).includes(tail), `${what}: error.object ${show(String(e.object))} names ${object}`);
    else ok(String(e.message).includes(tail), `${what}: the error names ${object}: ${e.message}`);
  };

  add("signed: trust checks its keys (invalid_input)", async () => {
    const fx = sc.signed;
    await rejectsWith(Replica.open(fx.url, { trust: "ed25519:notakey" }), "invalid_input", "trust: a malformed key");
    await rejectsWith(Replica.open(fx.url, { trust: fx.trustKey.replace("ed25519:", "") }), "invalid_input", "trust: a key without ed25519:");
    await rejectsWith(Replica.open(fx.url, { trust: [] }), "invalid_input", "trust: []");
    await rejectsWith(Replica.open(fx.url, { trust: 42 }), "invalid_input", "trust: 42");
    await rejectsWith(Replica.open(fx.url, { trust: [fx.trustKey, 7] }), "invalid_input", "trust: [key, 7]");
    // A key of small order (the point 1, whose "signatures" anyone can make).
    const e = await rejectsWith(Replica.open(fx.url, { trust: "ed25519:AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=" }), "invalid_input", "trust: a key of small order");
    ok(e.message.includes("small order"), `the error says why: ${e.message}`);
  });

  add("signed: a replica trusting the publisher's key syncs and reads; status().signer names the key", async () => {
    const fx = sc.signed;
    const a = track(await Replica.open(fx.url, { trust: fx.trustKey }));
    eq(a.status().signer, null, "signer before the first head");
    eq(await withTimeout(a.sync(), 120_000, "pinned sync"), fx.expected.lsn, "pinned sync");
    eq(a.status().signer, fx.trustKey, "status().signer");
    eq(a.status().lastError, null, "lastError after a trusted sync");
    expectState(a, fx.expected, "pinned replica");
    // Several keys: one of them signed.
    const b = track(await Replica.open(fx.url, { trust: [fx.wrongKey, fx.trustKey] }));
    eq(await withTimeout(b.sync(), 120_000, "sync with two pinned keys"), fx.expected.lsn, "sync with two pinned keys");
    // A replica that pins nothing reads a signed dataset as any other.
    const c = track(await Replica.open(fx.url));
    eq(await withTimeout(c.sync(), 120_000, "unpinned sync"), fx.expected.lsn, "unpinned sync of a signed dataset");
    eq(c.status().signer, null, "an unpinned replica reports no signer");
    // Lazy and pinned: reads equal the full replica's.
    const lz = track(await Replica.open(fx.url, { load: "lazy", trust: fx.trustKey }));
    for (const [kb, vb] of [fx.expected.entries[0], fx.expected.entries[Math.floor(fx.expected.entries.length / 2)], fx.expected.entries.at(-1)]) {
      const got = await withTimeout(lz.get(b64dec(kb)), 60_000, "pinned lazy get");
      ok(bytesEq(got, b64dec(vb)), `pinned lazy get(${show(b64dec(kb))}) = ${show(got)}`);
    }
    eq((await withTimeout(lz.scan(), 60_000, "pinned lazy scan")).length, fx.expected.entries.length, "pinned lazy scan: row count");
  });

  add("signed: a wrong key, or an unsigned dataset, is refused with untrusted", async () => {
    const fx = sc.signed;
    const a = track(await Replica.open(fx.url, { trust: fx.wrongKey }));
    const u = track(await Replica.open(sc.basic.url, { trust: fx.trustKey }));
    // Side by side: each refusal takes the replica's retries.
    const [e, eu] = await Promise.all([
      rejectsWith(a.sync(), "untrusted", "sync trusting another key", 120_000),
      rejectsWith(u.sync(), "untrusted", "sync of an unsigned dataset with trust", 120_000),
    ]);
    namesObject(e, "catalog/head.json", "wrong key");
    ok(e.message.includes(fx.trustKey), `the error names the signer: ${e.message}`);
    eq(a.status().appliedLsn, 0, "nothing applied under a wrong key");
    eq(a.status().lastError?.code, "untrusted", "status().lastError.code");
    eq(a.get(b64dec(fx.expected.entries[0][0])), undefined, "nothing readable under a wrong key");
    namesObject(eu, "catalog/head.json", "unsigned dataset");
    eq(u.status().appliedLsn, 0, "nothing applied from an unsigned dataset");
  });

  add("signed: a tampered signed head, then a damaged segment, are refused (untrusted); the last good state is kept", async () => {
    const fx0 = sc.signed;
    const a = track(await Replica.open(fx0.url, { trust: fx0.trustKey }));
    eq(await withTimeout(a.sync(), 120_000, "stage 0 sync"), fx0.expected.lsn, "stage 0 sync");
    const fx1 = await mutate("signed");
    const e1 = await rejectsWith(a.sync(), "untrusted", "sync over a tampered signed head", 120_000);
    namesObject(e1, fx1.expectError.object, "tampered head");
    eq(a.status().appliedLsn, fx1.goodLsn, "appliedLsn stays at the last good LSN");
    expectState(a, fx1.expected, "after the tampered head");
    // Only the signature tells: the CRC-32 is right, so a replica pinning nothing takes it.
    const loose = track(await Replica.open(fx1.url));
    eq(await withTimeout(loose.sync(), 120_000, "unpinned sync of the tampered head"), fx1.realLsn, "an unpinned replica applies the tampered head");

    const fx2 = await mutate("signed");
    const e2 = await rejectsWith(a.sync(), "untrusted", "sync over a damaged segment", 120_000);
    namesObject(e2, fx2.expectError.object, "damaged segment");
    eq(a.status().appliedLsn, fx2.goodLsn, "appliedLsn stays at the last good LSN");
    expectState(a, fx2.expected, "after the damaged segment");
    eq(a.status().signer, fx0.trustKey, "status().signer after the refusals");
  });

  if (ctx.timers) {
    add("timers: closed replicas leave no long timer pending (the process can exit)", async () => {
      await sleep(50);
      const left = ctx.timers.pending();
      ok(
        left.length === 0,
        `${left.length} setTimeout timer(s) of >= ${ctx.timers.minMs} ms neither fired nor cleared after every replica was closed ` +
          `(delays ms: ${[...new Set(left)].slice(0, 8).join(", ")}); they keep Node/Deno alive and hold closures until they fire`,
      );
    });
  }

  return cases;
}

/**
 * Tracks setTimeout timers of at least `minMs` that are still pending (not
 * fired, not cleared). Install before the cases run; `pending()` lists their
 * delays. Pass the result as ctx.timers.
 */
export function trackTimers(minMs = 60_000) {
  const pending = new Map();
  const st = globalThis.setTimeout;
  const ct = globalThis.clearTimeout;
  globalThis.setTimeout = function trackedSetTimeout(fn, ms, ...args) {
    let h;
    const wrapped = typeof fn === "function" ? function (...a) {
      pending.delete(key(h));
      return fn.apply(this, a);
    } : fn;
    h = st(wrapped, ms, ...args);
    if (Number(ms) >= minMs) pending.set(key(h), Number(ms));
    return h;
  };
  globalThis.clearTimeout = function trackedClearTimeout(h) {
    pending.delete(key(h));
    return ct(h);
  };
  function key(h) {
    return typeof h === "object" && h !== null && typeof h[Symbol.toPrimitive] === "function" ? Number(h) : h;
  }
  return {
    minMs,
    pending: () => [...pending.values()],
    restore() {
      globalThis.setTimeout = st;
      globalThis.clearTimeout = ct;
    },
  };
}

/** Runs every case in order (runtimes without a test runner); never throws. */
export async function runConformance(ctx, { filter, onResult } = {}) {
  const results = [];
  for (const c of conformanceCases(ctx)) {
    if (filter && !filter(c.name)) continue;
    const t0 = Date.now();
    let error = null;
    try {
      await withTimeout(c.fn(), 300_000, c.name);
    } catch (e) {
      error = e;
    }
    const r = { name: c.name, ok: !error, ms: Date.now() - t0, error: error ? String(error.stack ?? error) : null };
    results.push(r);
    if (onResult) onResult(r);
  }
  const failed = results.filter((r) => !r.ok).length;
  return { passed: results.length - failed, failed, results };
}

export const TEST_TIMEOUT_MS = 300_000;
export { withTimeout };
