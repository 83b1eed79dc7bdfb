// Long-poll of the JS replica against `walcast serve`, and through proxies
// that get long-poll wrong: `node --test tests/js/longpoll.test.mjs` (after
// scripts/build-js.sh; uses target/debug/walcast or WALCAST_BIN).
//
// Each case publishes a real dataset (`walcast write` + `walcast publish
// --once`), serves it with `walcast serve`, and puts a small Node proxy in
// front of it that injects one fault:
//  - "early": claims long-poll support but answers every held read at once
//    (the wait hint is stripped before it reaches the server);
//  - "silent": never answers a held read;
//  - "cached": answers held reads with the first head it saw (a cache that
//    keys on the URL and ignores the ETag), so the answer is stale.
// No case asserts a time: request counts are bounds that a slower machine
// only makes easier to meet.
import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import http from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { pathToFileURL } from "node:url";
import { walcastBin } from "./datasets.mjs";

const { Replica } = await import("walcast");
const bin = walcastBin();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const tmp = mkdtempSync(join(tmpdir(), "walcast-longpoll-"));
const children = [];

function walcast(args, input) {
  return execFileSync(bin, args, { input, stdio: ["pipe", "pipe", "pipe"] }).toString();
}

/** A dataset of its own: `write(key, value)` commits and publishes one batch, returns its LSN. */
function dataset(name) {
  const wal = join(tmp, `${name}.wal`);
  const dir = join(tmp, name);
  const write = (key, value) => {
    const out = walcast(["write", "--wal", wal], JSON.stringify({ op: "put", key, value }) + "\n");
    walcast(["publish", "--wal", wal, "--to", pathToFileURL(dir).href, "--once"]);
    return JSON.parse(out.trim().split("\n").pop()).lsn;
  };
  return { dir, write };
}

async function serve(dir) {
  const child = spawn(bin, ["serve", dir, "--addr", "127.0.0.1:0"], { stdio: ["ignore", "pipe", "pipe"] });
  children.push(child);
  return new Promise((resolve, reject) => {
    let buf = "";
    child.stdout.on("data", (d) => {
      buf += d;
      const m = buf.match(/listening on (http:\/\/\S+)/);
      if (m) resolve(m[1].replace(/\/+$/, ""));
    });
    child.on("exit", (code) => reject(new Error(`walcast serve exited ${code}`)));
  });
}

/**
 * A proxy in front of `origin`. `fault(req, forward)` handles each request:
 * `forward(path, headers)` resolves the origin's `{ status, headers, body }`.
 * Counts requests (`held`: those carrying a wait hint).
 */
async function proxy(origin, fault) {
  const stats = { requests: 0, held: 0, aborted: 0 };
  const forward = async (path, headers) => {
    const res = await fetch(origin + path, { headers });
    const body = new Uint8Array(await res.arrayBuffer());
    return { status: res.status, headers: Object.fromEntries(res.headers), body };
  };
  const server = http.createServer(async (req, res) => {
    stats.requests++;
    const url = new URL(req.url, "http://x");
    const held = url.searchParams.has("wait");
    if (held) stats.held++;
    res.on("close", () => {
      if (!res.writableFinished) stats.aborted++;
    });
    const headers = {};
    for (const k of ["if-none-match", "range", "prefer"]) if (req.headers[k]) headers[k] = req.headers[k];
    try {
      const out = await fault({ url, held, headers }, forward);
      if (out === null) return; // never answered
      delete out.headers["content-length"];
      delete out.headers["content-encoding"];
      delete out.headers["transfer-encoding"];
      res.writeHead(out.status, out.headers);
      res.end(out.body);
    } catch (e) {
      res.writeHead(502);
      res.end(String(e));
    }
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return { url: `http://127.0.0.1:${server.address().port}`, stats, close: () => new Promise((r) => server.close(r)) };
}

const pathOf = (url) => url.pathname + url.search;
const withoutWait = (url) => {
  const u = new URL(url);
  u.searchParams.delete("wait");
  return pathOf(u);
};

/** Resolves once `cond()` holds; fails after `ms`. */
async function until(cond, ms, what) {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) assert.fail(`${what}: not within ${ms} ms`);
    await sleep(20);
  }
}

/** Resolves once `replica` applied `lsn`, checking that its applied LSN never goes back. */
function appliedAtLeast(replica, lsn, seen, ms = 60_000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`LSN ${lsn} not applied within ${ms} ms (applied ${seen.max})`)), ms);
    const done = () => {
      clearTimeout(timer);
      resolve();
    };
    const check = () => {
      const s = replica.status();
      assert.ok(s.appliedLsn >= seen.max, `applied LSN went back from ${seen.max} to ${s.appliedLsn}`);
      seen.max = s.appliedLsn;
      return s.appliedLsn >= lsn;
    };
    if (check()) return done();
    const off = replica.onChange(() => {
      if (check()) {
        off();
        done();
      }
    });
  });
}

after(async () => {
  for (const c of children) c.kill("SIGTERM");
  await sleep(100);
  rmSync(tmp, { recursive: true, force: true });
});

test("walcast serve: start() long-polls, idles on held reads, sync() and close() never wait on one", async () => {
  const ds = dataset("live");
  ds.write("a", "1");
  const origin = await serve(ds.dir);
  const p = await proxy(origin, ({ url, headers }, forward) => forward(pathOf(url), headers));
  const replica = await Replica.open(p.url);
  try {
    await replica.sync();
    replica.start();
    // The loop's next head read is a long-poll.
    await until(() => !(p.stats.held === 0), 60_000, "still p.stats.held === 0");
    assert.equal(replica.status().longPoll, true);
    // Idle: the held read is all there is.
    const before = p.stats.requests;
    await sleep(1500);
    assert.ok(p.stats.requests - before <= 1, `an idle replica made ${p.stats.requests - before} requests in 1.5 s`);
    // A write is applied through the held read.
    const seen = { max: 0 };
    const lsn = ds.write("b", "2");
    await appliedAtLeast(replica, lsn, seen);
    assert.equal(replica.getText("b"), "2");
    // Read-your-writes while following: waitFor waits on the held read.
    const lsnW = ds.write("w", "5");
    assert.ok((await replica.waitFor(lsnW, { timeout: 60_000 })) >= lsnW, "waitFor while long-polling");
    assert.equal(replica.getText("w"), "5");
    // A sync beside a held read reads the head at once.
    const lsn2 = ds.write("c", "3");
    assert.ok((await replica.sync()) >= lsn2);
    await until(() => !(p.stats.held < 2), 60_000, "still p.stats.held < 2");
    const st = replica.status();
    assert.ok(st.requestsByKind.longPoll >= 2, `requestsByKind ${JSON.stringify(st.requestsByKind)}`);
    // Counted when sent: one may still be on its way to the proxy.
    const k = st.requestsByKind.longPoll;
    assert.ok(k >= p.stats.held && k <= p.stats.held + 1, `${k} long-polls counted, ${p.stats.held} seen by the server`);
    assert.equal(Object.values(st.requestsByKind).reduce((a, b) => a + b, 0), st.requests, "requestsByKind adds up to requests");
  } finally {
    await replica.close();
  }
  // close() aborted the held read.
  await until(() => !(p.stats.aborted === 0), 60_000, "still p.stats.aborted === 0");
  await p.close();
});

test("a page in the background polls instead of holding a long-poll (browsers share six connections an origin among its tabs); shown again, it long-polls", async () => {
  const ds = dataset("hidden");
  ds.write("a", "1");
  const origin = await serve(ds.dir);
  const p = await proxy(origin, ({ url, headers }, forward) => forward(pathOf(url), headers));
  // A page's document, as a browser tab has one (Node has none).
  const doc = Object.assign(new EventTarget(), { visibilityState: "visible" });
  globalThis.document = doc;
  const show = (state) => {
    doc.visibilityState = state;
    doc.dispatchEvent(new Event("visibilitychange"));
  };
  const replica = await Replica.open(p.url, { pollInterval: 100 });
  const seen = { max: 0 };
  try {
    await replica.sync();
    replica.start();
    await until(() => p.stats.held >= 1, 60_000, "no long-poll while shown");
    // Hidden: the held read is aborted, and writes arrive by polling.
    show("hidden");
    await until(() => p.stats.aborted >= 1, 60_000, "the held read was not aborted when hidden");
    const held = p.stats.held;
    const polled = p.stats.requests;
    for (const [k, v] of [["b", "2"], ["c", "3"]]) {
      const lsn = ds.write(k, v);
      await appliedAtLeast(replica, lsn, seen);
      assert.equal(replica.getText(k), v);
    }
    const lsnW = ds.write("w", "4");
    assert.ok((await replica.waitFor(lsnW, { timeout: 60_000 })) >= lsnW, "waitFor while hidden");
    assert.equal(p.stats.held, held, "no long-poll was sent while hidden");
    assert.ok(p.stats.requests > polled, "the hidden page polled");
    // Shown again: it follows the head with held reads.
    show("visible");
    await until(() => p.stats.held > held, 60_000, "no long-poll once shown again");
    const lsn = ds.write("d", "5");
    await appliedAtLeast(replica, lsn, seen);
    assert.equal(replica.getText("d"), "5");
    assert.equal(replica.status().longPoll, true);
  } finally {
    await replica.close();
    delete globalThis.document;
  }
  await p.close();
});

test("close() ends a sync under way (a server that never answers): the sync rejects as closed, close() does not wait for it", async () => {
  const ds = dataset("closing");
  ds.write("a", "1");
  const origin = await serve(ds.dir);
  const p = await proxy(origin, () => null);
  const replica = await Replica.open(p.url, { longPoll: false });
  const sync = replica.sync();
  const outcome = sync.then(
    () => "resolved",
    (e) => e.code,
  );
  await until(() => p.stats.requests >= 1, 60_000, "the sync sent no GET");
  let closed = false;
  const closing = replica.close().then(() => (closed = true));
  // A second close() resolves with the first, not before it.
  const second = replica.close().then(() => closed);
  // The head is never answered: close() ends the sync, not waits for it.
  await until(() => closed, 10_000, "close() waited for the sync");
  await closing;
  assert.equal(await second, true, "a second close() resolved before the first");
  assert.equal(await outcome, "closed");
  assert.throws(() => replica.onChange(() => {}), (e) => e.code === "closed", "onChange after close");
  await until(() => p.stats.aborted >= 1, 10_000, "the GET was not aborted");
  await p.close();
});

test("a server that claims long-poll but answers at once: polling every pollInterval, no spin", async () => {
  const ds = dataset("early");
  ds.write("a", "1");
  const origin = await serve(ds.dir);
  // The wait hint never reaches the server: it answers 304 at once.
  const p = await proxy(origin, ({ url, headers }, forward) => {
    delete headers.prefer;
    return forward(withoutWait(url), headers);
  });
  const errors = [];
  const replica = await Replica.open(p.url, { pollInterval: 200, onError: (e) => errors.push(e) });
  try {
    await replica.sync();
    replica.start();
    await until(() => !(p.stats.held === 0), 60_000, "still p.stats.held === 0");
    const before = p.stats.requests;
    await sleep(2000);
    const made = p.stats.requests - before;
    // Polling every 200 ms is about 10 plain reads and 10 early long-polls; a spin is thousands.
    assert.ok(made <= 2 * (2000 / 200) + 4, `${made} requests in 2 s with pollInterval 200`);
    assert.ok(made >= 2, `${made} requests in 2 s: the replica stopped reading the head`);
    const seen = { max: 0 };
    const lsn = ds.write("b", "2");
    await appliedAtLeast(replica, lsn, seen);
    assert.deepEqual(errors, []);
  } finally {
    await replica.close();
    await p.close();
  }
});

test("a server that never answers a long-poll: sync() still returns, close() aborts it", async () => {
  const ds = dataset("silent");
  ds.write("a", "1");
  const origin = await serve(ds.dir);
  const p = await proxy(origin, ({ url, held, headers }, forward) => (held ? null : forward(pathOf(url), headers)));
  const replica = await Replica.open(p.url);
  try {
    await replica.sync();
    replica.start();
    await until(() => !(p.stats.held === 0), 60_000, "still p.stats.held === 0");
    const lsn = ds.write("b", "2");
    assert.ok((await replica.sync()) >= lsn, "a sync beside an unanswered long-poll");
    assert.equal(replica.getText("b"), "2");
    await until(() => !(p.stats.held < 2), 60_000, "still p.stats.held < 2");
  } finally {
    await replica.close();
  }
  await until(() => !(p.stats.aborted < p.stats.held), 60_000, "still p.stats.aborted < p.stats.held");
  await p.close();
});

test("a proxy that caches a long-poll answer: the replica never goes back and still catches up", async () => {
  const ds = dataset("cached");
  ds.write("a", "1");
  ds.write("b", "2");
  const origin = await serve(ds.dir);
  let cached = null;
  const p = await proxy(origin, async ({ url, held, headers }, forward) => {
    if (!held) return forward(pathOf(url), headers);
    // A cache keyed on the URL: the first head it saw, whatever the ETag.
    cached ??= await forward(withoutWait(url), {});
    return cached;
  });
  const errors = [];
  const replica = await Replica.open(p.url, { pollInterval: 200, onError: (e) => errors.push(e) });
  const seen = { max: 0 };
  try {
    await replica.sync();
    replica.start();
    await until(() => !(p.stats.held === 0), 60_000, "still p.stats.held === 0");
    // The cache now holds the head at LSN 2; newer heads come through plain reads only.
    const lsn = ds.write("c", "3");
    await appliedAtLeast(replica, lsn, seen);
    const lsn2 = ds.write("d", "4");
    await appliedAtLeast(replica, lsn2, seen);
    const before = p.stats.requests;
    await sleep(1000);
    assert.ok(replica.status().appliedLsn >= lsn2);
    const made = p.stats.requests - before;
    assert.ok(made <= 2 * (1000 / 200) + 4, `${made} requests in 1 s with pollInterval 200`);
  } finally {
    await replica.close();
    await p.close();
  }
});

test("malformed long-poll answers: a bad Walcast-Long-Poll header means polling; a garbled held answer is never applied", async () => {
  const ds = dataset("malformed");
  ds.write("a", "1");
  const origin = await serve(ds.dir);
  // First: the header is not a number of seconds.
  const bad = await proxy(origin, async ({ url, headers }, forward) => {
    const out = await forward(pathOf(url), headers);
    out.headers["walcast-long-poll"] = "soon";
    return out;
  });
  const r1 = await Replica.open(bad.url, { pollInterval: 100 });
  try {
    await r1.sync();
    assert.equal(r1.status().longPoll, false, "a malformed Walcast-Long-Poll header is no support");
    r1.start();
    await sleep(500);
    assert.equal(bad.stats.held, 0, "no wait hint sent to a server whose header is malformed");
  } finally {
    await r1.close();
    await bad.close();
  }
  // Then: held reads answered with a garbled head.
  const garbled = await proxy(origin, async ({ url, held, headers }, forward) => {
    if (held) return { status: 200, headers: { etag: '"garbled"', "walcast-long-poll": "60" }, body: new TextEncoder().encode("{not a head") };
    return forward(pathOf(url), headers);
  });
  const errors = [];
  const r2 = await Replica.open(garbled.url, { pollInterval: 100, onError: (e) => errors.push(e) });
  const seen = { max: 0 };
  try {
    await r2.sync();
    r2.start();
    await until(() => !(garbled.stats.held < 2), 60_000, "still garbled.stats.held < 2");
    const lsn = ds.write("b", "2");
    await appliedAtLeast(r2, lsn, seen);
    const before = garbled.stats.requests;
    await sleep(1000);
    const made = garbled.stats.requests - before;
    assert.ok(made <= 3 * (1000 / 100) + 4, `${made} requests in 1 s with pollInterval 100`);
    assert.equal(r2.getText("b"), "2");
    for (const e of errors) assert.ok(["data", "unavailable"].includes(e.code), `error code ${e.code}: ${e.message}`);
  } finally {
    await r2.close();
    await garbled.close();
  }
});

test("held reads that fail after holding: the error reaches onError while following, and the replica recovers", async () => {
  const ds = dataset("failing");
  ds.write("a", "1");
  const origin = await serve(ds.dir);
  let failing = false;
  // Grants 1 s waits; once failing, answers 503, holding each long-poll
  // 600 ms first (past half its wait, so the replica keeps long-polling).
  const p = await proxy(origin, async ({ url, held, headers }, forward) => {
    if (failing) {
      if (held) await sleep(600);
      return { status: 503, headers: { "walcast-long-poll": "1" }, body: new Uint8Array(0) };
    }
    const out = await forward(withoutWait(url), headers);
    if (out.headers["walcast-long-poll"]) out.headers["walcast-long-poll"] = "1";
    if (held && out.status === 304) await sleep(600);
    return out;
  });
  const errors = [];
  const replica = await Replica.open(p.url, { onError: (e) => errors.push(e) });
  try {
    await replica.sync();
    replica.start();
    await until(() => !(p.stats.held === 0), 60_000, "still p.stats.held === 0");
    failing = true;
    await until(() => errors.length > 0, 60_000, "an error reported to onError");
    assert.equal(errors[0].code, "unavailable", `onError: ${errors[0].message}`);
    assert.equal(errors[0].object, "catalog/head.json");
    assert.equal(replica.status().lastError?.code, "unavailable");
    failing = false;
    const seen = { max: 0 };
    const lsn = ds.write("b", "2");
    await appliedAtLeast(replica, lsn, seen);
    assert.equal(replica.getText("b"), "2");
  } finally {
    await replica.close();
    await p.close();
  }
});

test("persist: while the store has not answered a write, later syncs queue no writes behind it; the first after is whole", async () => {
  const ds = dataset("busy-store");
  ds.write("k0", "v0");
  const origin = await serve(ds.dir);
  let release;
  const gate = new Promise((r) => (release = r));
  const calls = [];
  // The first call hangs (a lock another tab holds) until released.
  const answer = () => (calls.length === 1 ? gate : Promise.resolve());
  const store = {
    load: async () => null,
    save: () => (calls.push("save"), answer()),
    append: () => (calls.push("append"), answer()),
  };
  const errors = [];
  const r = await Replica.open(origin, { persist: store, persistTimeoutMs: 100, longPoll: false, onError: (e) => errors.push(e) });
  try {
    await r.sync();
    for (let i = 1; i <= 4; i++) {
      ds.write(`k${i}`, `v${i}`);
      await r.sync();
    }
    assert.deepEqual(calls, ["save"], "one store call while it has not settled");
    assert.ok(errors.filter((e) => e.code === "persist").length >= 4, `each skipped write is reported (${errors.map((e) => `${e.code}: ${e.message}`).join("; ")})`);
    release();
    await sleep(20);
    ds.write("k5", "v5");
    await r.sync();
    assert.deepEqual(calls, ["save", "save"], "the first write after it settled is whole");
    assert.equal(r.getText("k5"), "v5");
  } finally {
    release();
    await r.close();
  }
});
