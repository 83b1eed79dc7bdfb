// Chromium runner: the walcast package's browser entry in a real browser
// (Debian's /usr/bin/chromium driven by playwright-core; no browser download).
//
//   node --test tests/js/chromium/chromium.test.mjs
//
// Serves a test page from 127.0.0.1 (a secure context: IndexedDB works) that
// imports js/dist/web.js and tests/js/conformance.js, and
//   1. runs every conformance case in the page, one node test each;
//   2. reload: a replica with persist "indexeddb" syncs, the page reloads, the
//      replica reopens from IndexedDB at the same LSN and serves reads with
//      object storage unreachable; after more is published, a sync fetches
//      only the head and the new segments (request counts are logged) and
//      writes only a log chunk of what it applied (bytes put to IndexedDB
//      counted by wrapping IDBObjectStore.put), which a reload replays; a
//      damaged log record makes a reload open at the last good state and
//      report a data error, and the next sync rewrites the store whole;
//   3. two tabs on one dataset sync concurrently; a reloaded tab's state is
//      one whole committed state; a store whose last log chunk is gone
//      opens at the state before it.
// Datasets come from tests/js/datasets.mjs (WALCAST_DATASETS=<control URL>
// uses a running orchestrator). Chromium is closed at the end.
import assert from "node:assert/strict";
import fs from "node:fs";
import http from "node:http";
import path from "node:path";
import { after, before, test } from "node:test";
import { CHROMIUM, CHROMIUM_ARGS, DIST, REPO, connectDatasets, distReady, loadPlaywright, log } from "../edge/lib.mjs";

const TIMEOUT = 300_000;
if (!distReady()) throw new Error("js/dist is missing: run bash scripts/build-js.sh");
if (!fs.existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} is missing: run bash scripts/browser-deps.sh`);
const { chromium } = await loadPlaywright();

// --- setup --------------------------------------------------------------------------

const datasets = await connectDatasets();
const fxConf = await datasets.newInstance(); // the conformance cases
const fxReload = await datasets.newInstance(); // the reload test
const fxTabs = await datasets.newInstance(); // the two-tab test
const instances = [fxConf, fxReload, fxTabs];

const HTML = `<!doctype html>
<meta charset="utf-8">
<title>walcast chromium tests</title>
<script type="module" src="/page.js"></script>
`;
const TYPES = { ".js": "text/javascript; charset=utf-8", ".mjs": "text/javascript; charset=utf-8", ".wasm": "application/wasm", ".json": "application/json" };

function sendFile(res, file) {
  if (!fs.existsSync(file) || !fs.statSync(file).isFile()) {
    res.writeHead(404, { "content-type": "text/plain" });
    return res.end("not found");
  }
  res.writeHead(200, { "content-type": TYPES[path.extname(file)] ?? "application/octet-stream", "cache-control": "no-store" });
  fs.createReadStream(file).pipe(res);
}

const pageServer = http.createServer((req, res) => {
  const p = decodeURIComponent(new URL(req.url, "http://x").pathname);
  if (p === "/" || p === "/index.html") {
    res.writeHead(200, { "content-type": "text/html; charset=utf-8", "cache-control": "no-store" });
    return res.end(HTML);
  }
  if (p === "/page.js") return sendFile(res, path.join(REPO, "tests/js/chromium/page.js"));
  if (p === "/conformance.js") return sendFile(res, path.join(REPO, "tests/js/conformance.js"));
  if (p.startsWith("/dist/") && !p.includes("..")) return sendFile(res, path.join(DIST, p.slice("/dist/".length)));
  res.writeHead(404, { "content-type": "text/plain" });
  res.end("not found");
});
await new Promise((r) => pageServer.listen(0, "127.0.0.1", r));
const PAGE = `http://127.0.0.1:${pageServer.address().port}/`;

let browser;
let context;
/** GETs the pages made, as playwright saw them: { url, method, page }. */
const requests = [];

async function newPage(label) {
  const page = await context.newPage();
  page.on("pageerror", (e) => log(`[${label}] page error: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error" || m.type() === "warning") log(`[${label}] console.${m.type()}: ${m.text()}`);
  });
  page.on("request", (r) => requests.push({ url: r.url(), method: r.method(), page: label }));
  await load(page);
  return page;
}

async function load(page, reload = false) {
  if (reload) await page.reload({ waitUntil: "load" });
  else await page.goto(PAGE, { waitUntil: "load" });
  await page.waitForFunction(() => window.walcastTest?.ready === true, null, { timeout: 30_000 });
}

before(async () => {
  browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, timeout: 60_000 });
  context = await browser.newContext();
  log(`chromium ${browser.version()}, page ${PAGE}`);
});

after(async () => {
  await browser?.close().catch(() => {});
  await new Promise((r) => pageServer.close(r));
  for (const i of instances) await datasets.dropInstance(i.instance).catch(() => {});
  await datasets.close();
});

/** Requests to a dataset URL since `from` (an index into `requests`), as keys under it. */
function datasetRequests(url, from, page) {
  return requests
    .slice(from)
    .filter((r) => r.url.startsWith(url + "/") && r.method === "GET" && (!page || r.page === page))
    .map((r) => r.url.slice(url.length + 1).split("?")[0]);
}

// --- 1. conformance in the page ----------------------------------------------------------

test("conformance in chromium", { timeout: 30 * 60_000 }, async (t) => {
  const page = await newPage("conformance");
  const names = await page.evaluate(([fx, control]) => window.walcastTest.setup(fx, control), [fxConf, datasets.controlUrl]);
  assert.ok(names.length > 10, `${names.length} cases`);
  for (let i = 0; i < names.length; i++) {
    await t.test(names[i], { timeout: TIMEOUT }, async () => {
      const res = await page.evaluate((i) => window.walcastTest.runCase(i), i);
      for (const l of res.logs ?? []) log(`chromium conformance: ${l}`);
      if (!res.ok) assert.fail(`${res.name}: ${res.error}`);
    });
  }
  await page.close();
});

// --- 2. reload: IndexedDB, offline reads, only the tail fetched ---------------------------

test("reload: the replica reopens from IndexedDB, serves reads offline, then fetches only the head and new segments", { timeout: TIMEOUT }, async () => {
  const f0 = fxReload.scenarios.midhistory;
  const url = f0.url;
  const page = await newPage("reload");
  const w = (fn, ...args) => page.evaluate(fn, args);

  // First visit: bootstrap from nothing.
  let mark = requests.length;
  await w(([u]) => window.walcastTest.open("r", u, { persist: "indexeddb" }), url);
  const first = await w(() => window.walcastTest.sync("r"));
  assert.equal(first.error, undefined, `first sync: ${JSON.stringify(first.error)}`);
  assert.equal(first.lsn, f0.expected.lsn, "first sync reaches stage 0");
  assert.equal(await w(([e]) => window.walcastTest.compare("r", e), f0.expected.entries), null, "state after the first sync");
  const firstKeys = datasetRequests(url, mark);
  const firstStatusRequests = first.status.requests;
  const persisted0 = await w(([u]) => window.walcastTest.persisted(u), url);
  assert.equal(persisted0?.appliedLsn, f0.expected.lsn, "IndexedDB holds the synced LSN");

  // Reload with object storage unreachable: open from IndexedDB, read.
  await load(page, true);
  await page.evaluate(() => import("/dist/web.js").then((m) => m.init())); // the .wasm itself comes from the page's server
  let blocked = 0;
  const block = (route) => {
    blocked++;
    return route.abort("internetdisconnected");
  };
  await context.route(`${url}/**`, block);
  mark = requests.length;
  let reopened;
  try {
    reopened = await w(([u]) => window.walcastTest.open("r", u, { persist: "indexeddb" }), url);
    assert.equal(reopened.appliedLsn, f0.expected.lsn, "reopened at the persisted appliedLsn");
    assert.equal(reopened.datasetId, f0.datasetId, "reopened datasetId");
    assert.equal(await w(([e]) => window.walcastTest.compare("r", e), f0.expected.entries), null, "reads served from IndexedDB, offline");
    assert.equal(datasetRequests(url, mark).length, 0, "no request before a sync");
    assert.equal(blocked, 0, "nothing tried to reach object storage");
  } finally {
    await context.unroute(`${url}/**`, block);
  }

  // Publish more (stage 1: the same dataset, 400 more LSNs), sync.
  const f1 = await datasets.mutate(fxReload.instance, "midhistory");
  const tail = f1.segments.filter((s) => s.last >= f1.tailFrom);
  const below = new Set(f1.segments.filter((s) => s.last < f1.tailFrom).map((s) => s.key));
  mark = requests.length;
  const received0 = (await w(() => window.walcastTest.status("r"))).bytesReceived;
  await w(() => window.walcastTest.meter(true));
  const second = await w(() => window.walcastTest.sync("r"));
  assert.equal(second.error, undefined, `sync after reload: ${JSON.stringify(second.error)}`);
  assert.equal(second.lsn, f1.expected.lsn, "sync after reload reaches stage 1");
  assert.equal(await w(([e]) => window.walcastTest.compare("r", e), f1.expected.entries), null, "state after the sync");
  const keys = datasetRequests(url, mark);
  const heads = keys.filter((k) => k === "catalog/head.json").length;
  const segs = keys.filter((k) => k.startsWith("segments/"));
  log(
    `reload counts: first visit ${firstKeys.length} GETs (status.requests ${firstStatusRequests}, ` +
      `${f0.segments.length} segments in stage 0); after reload + publish ${keys.length} GETs ` +
      `(${heads} head, ${segs.length} segments; the tail is ${tail.length} segments of ${f1.segments.length}; ` +
      `status.requests ${second.status.requests}): ${keys.join(", ")}`,
  );
  assert.equal(heads, 1, "one head GET");
  for (const k of keys) {
    assert.ok(k === "catalog/head.json" || k.startsWith("segments/") || k.startsWith("catalog/pages/"), `unexpected GET ${k}`);
    assert.ok(!below.has(k), `fetched ${k}, which lies wholly below LSN ${f1.tailFrom} (already in IndexedDB)`);
    assert.ok(!k.startsWith("snapshots/"), `fetched a snapshot ${k}`);
  }
  assert.ok(segs.length <= tail.length, `${segs.length} segment GETs for ${tail.length} new segments`);
  assert.ok(keys.length < firstKeys.length, `after reload ${keys.length} GETs, first visit ${firstKeys.length}`);
  assert.equal(second.status.requests, keys.length, "status().requests counts exactly the GETs the page made");

  // Incremental persistence: the sync wrote one log chunk of what it applied
  // (no more bytes than the records it received) and the small record.
  const m = await w(() => window.walcastTest.meter(true));
  const persisted1 = await w(([u]) => window.walcastTest.persisted(u), url);
  const received = second.status.bytesReceived - received0;
  log(
    `reload IndexedDB writes: first sync (whole) ${persisted0.baseBytes} base bytes; ` +
      `sync of LSNs ${f0.expected.lsn + 1}..${f1.expected.lsn}: ${m.bytes} bytes in ${m.puts} puts ` +
      `(${JSON.stringify(m.stores)}), ${received} bytes received`,
  );
  assert.equal(persisted0.format, 2, "the store's layout version");
  assert.equal(m.stores.bases, undefined, "no base rewritten by an incremental sync");
  assert.equal(m.stores.log?.puts, 1, "one log chunk");
  assert.ok(m.stores.log.bytes <= received, `log chunk ${m.stores.log.bytes} bytes, ${received} bytes received`);
  assert.equal(m.stores.replicas?.puts, 1, "one record update");
  assert.ok(m.stores.replicas.bytes < 1024, `record ${m.stores.replicas.bytes} bytes`);
  assert.equal(persisted1.appliedLsn, f1.expected.lsn, "the record's LSN");
  assert.equal(persisted1.baseLsn, f0.expected.lsn, "the base is still stage 0");
  assert.equal(persisted1.logBytes, m.stores.log.bytes, "the record counts the log's bytes");

  // And that is persisted too: one more reload opens at stage 1 (the base
  // with the log replayed on it), offline.
  await load(page, true);
  await page.evaluate(() => import("/dist/web.js").then((m) => m.init()));
  await context.route(`${url}/**`, block);
  blocked = 0;
  try {
    const third = await w(([u]) => window.walcastTest.open("r", u, { persist: "indexeddb" }), url);
    assert.equal(third.appliedLsn, f1.expected.lsn, "a second reload opens at stage 1");
    assert.equal(await w(([e]) => window.walcastTest.compare("r", e), f1.expected.entries), null, "stage 1 from IndexedDB, offline");
    assert.deepEqual(await w(() => window.walcastTest.errors("r")), [], "no error replaying the log");
    assert.equal(blocked, 0, "nothing tried to reach object storage");
  } finally {
    await context.unroute(`${url}/**`, block);
  }

  // A damaged log record (the first one after the base): the reload opens at
  // the base's LSN, reports a data error naming the LSN, serves stage 0
  // offline; a sync fetches the rest and rewrites the store whole.
  await w(() => window.walcastTest.close("r"));
  await w(([u]) => window.walcastTest.damageLog(u, "corrupt-first"), url);
  await load(page, true);
  await page.evaluate(() => import("/dist/web.js").then((m) => m.init()));
  await context.route(`${url}/**`, block);
  try {
    const damaged = await w(([u]) => window.walcastTest.open("r", u, { persist: "indexeddb" }), url);
    assert.equal(damaged.appliedLsn, f0.expected.lsn, "opened at the last good LSN (the base)");
    assert.equal(await w(([e]) => window.walcastTest.compare("r", e), f0.expected.entries), null, "stage 0, never a mix");
    const errs = await w(() => window.walcastTest.errors("r"));
    assert.equal(errs.length, 1, `one error reported: ${JSON.stringify(errs)}`);
    assert.equal(errs[0].code, "data", errs[0].message);
    assert.equal(errs[0].lsn, f0.expected.lsn + 1, errs[0].message);
  } finally {
    await context.unroute(`${url}/**`, block);
  }
  const repaired = await w(() => window.walcastTest.sync("r"));
  assert.equal(repaired.lsn, f1.expected.lsn, `sync after the damage: ${JSON.stringify(repaired.error)}`);
  const persisted2 = await w(([u]) => window.walcastTest.persisted(u), url);
  assert.equal(persisted2.baseLsn, f1.expected.lsn, "the store was rewritten whole");
  assert.equal(persisted2.logBytes, 0, "with an empty log");
  await load(page, true);
  const fourth = await w(([u]) => window.walcastTest.open("r", u, { persist: "indexeddb" }), url);
  assert.equal(fourth.appliedLsn, f1.expected.lsn, "the repaired store opens at stage 1");
  assert.equal(await w(([e]) => window.walcastTest.compare("r", e), f1.expected.entries), null, "repaired: stage 1");
  assert.deepEqual(await w(() => window.walcastTest.errors("r")), [], "no error after the repair");

  // A damaged base: nothing of the copy is used (the replica opens empty and
  // reports it); the first sync rewrites the store, at the same LSN too.
  await w(() => window.walcastTest.close("r"));
  await w(([u]) => window.walcastTest.damageLog(u, "corrupt-base"), url);
  await load(page, true);
  const fresh = await w(([u]) => window.walcastTest.open("r", u, { persist: "indexeddb" }), url);
  assert.equal(fresh.appliedLsn, 0, "a damaged base is not used");
  const baseErrs = await w(() => window.walcastTest.errors("r"));
  assert.equal(baseErrs[0]?.code, "data", `the damage is reported: ${JSON.stringify(baseErrs)}`);
  const resynced = await w(() => window.walcastTest.sync("r"));
  assert.equal(resynced.lsn, f1.expected.lsn, `sync after a damaged base: ${JSON.stringify(resynced.error)}`);
  await load(page, true);
  const fifth = await w(([u]) => window.walcastTest.open("r", u, { persist: "indexeddb" }), url);
  assert.equal(fifth.appliedLsn, f1.expected.lsn, "the rewritten store opens at stage 1");
  assert.equal(await w(([e]) => window.walcastTest.compare("r", e), f1.expected.entries), null, "rewritten: stage 1");
  assert.deepEqual(await w(() => window.walcastTest.errors("r")), [], "no error after the rewrite");

  // A record claiming sizes its bytes do not have (2^53 bytes of log, a 1
  // TiB base): a data error naming the record; opened at what is stored.
  await w(() => window.walcastTest.close("r"));
  await w(([u]) => window.walcastTest.damageLog(u, "claims-huge"), url);
  await load(page, true);
  const sixth = await w(([u]) => window.walcastTest.open("r", u, { persist: "indexeddb" }), url);
  assert.equal(sixth.appliedLsn, f1.expected.lsn, "opened at what the base holds");
  assert.equal(await w(([e]) => window.walcastTest.compare("r", e), f1.expected.entries), null, "claims refused: stage 1");
  const claimErrs = await w(() => window.walcastTest.errors("r"));
  assert.equal(claimErrs.length, 1, JSON.stringify(claimErrs));
  assert.equal(claimErrs[0].code, "data", claimErrs[0].message);
  assert.equal(claimErrs[0].object, "persisted record", claimErrs[0].message);
  await page.close();
});

// --- 3. two tabs ------------------------------------------------------------------------

test("two tabs on one dataset sync concurrently without corrupting the store", { timeout: TIMEOUT }, async () => {
  const f0 = fxTabs.scenarios.midhistory;
  const url = f0.url;
  const a = await newPage("tab-a");
  const b = await newPage("tab-b");
  const open = (p) => p.evaluate(([u]) => window.walcastTest.open("r", u, { persist: "indexeddb" }), [url]);
  const sync = (p) => p.evaluate(() => window.walcastTest.sync("r"));
  const compare = (p, e) => p.evaluate(([e]) => window.walcastTest.compare("r", e), [e]);
  const stateAt = (lsn) => ({ [f0.expected.lsn]: f0.expected.entries })[lsn];

  await Promise.all([open(a), open(b)]);
  const [sa, sb] = await Promise.all([sync(a), sync(b)]);
  assert.equal(sa.lsn, f0.expected.lsn, `tab a: ${JSON.stringify(sa.error)}`);
  assert.equal(sb.lsn, f0.expected.lsn, `tab b: ${JSON.stringify(sb.error)}`);

  // Reload a: it opens from the store both tabs wrote.
  await load(a, true);
  const ra = await open(a);
  assert.equal(ra.appliedLsn, f0.expected.lsn, "reloaded tab a opens at stage 0");
  assert.equal(await compare(a, stateAt(ra.appliedLsn)), null, "reloaded tab a: state");

  // More is published; both sync at once (a from IndexedDB, b from memory).
  const f1 = await datasets.mutate(fxTabs.instance, "midhistory");
  const [ta, tb] = await Promise.all([sync(a), sync(b)]);
  assert.equal(ta.lsn, f1.expected.lsn, `tab a stage 1: ${JSON.stringify(ta.error)}`);
  assert.equal(tb.lsn, f1.expected.lsn, `tab b stage 1: ${JSON.stringify(tb.error)}`);

  // Reload b: one whole committed state (stage 1), equal to the expected one.
  await load(b, true);
  const rb = await open(b);
  assert.equal(rb.appliedLsn, f1.expected.lsn, "reloaded tab b opens at stage 1");
  assert.equal(await compare(b, f1.expected.entries), null, "reloaded tab b: state");
  const rec = await b.evaluate(([u]) => window.walcastTest.persisted(u), [url]);
  assert.equal(rec?.appliedLsn, f1.expected.lsn, "the store's record");
  assert.equal(rec?.datasetId, f1.datasetId, "the store's dataset");
  assert.equal(rec?.baseLsn, f0.expected.lsn, "stage 1 was appended as a log to the stage 0 base");

  // An older tab cannot roll the store back: a's replica (at stage 1) and a
  // fresh tab c opening from the store agree after b closed.
  await b.close();
  const c = await newPage("tab-c");
  const rc = await open(c);
  assert.equal(rc.appliedLsn, f1.expected.lsn, "a new tab opens at stage 1");
  assert.equal(await compare(c, f1.expected.entries), null, "new tab: state");

  // The log's last chunk gone (a store torn after the record was written):
  // a new tab opens at the state before it, reports it, and catches up.
  await c.evaluate(([u]) => window.walcastTest.damageLog(u, "drop-last"), [url]);
  const d = await newPage("tab-d");
  const rd = await open(d);
  assert.equal(rd.appliedLsn, f0.expected.lsn, "a torn store opens at the base");
  assert.equal(await compare(d, f0.expected.entries), null, "torn store: stage 0");
  const errs = await d.evaluate(() => window.walcastTest.errors("r"));
  assert.equal(errs[0]?.code, "data", `the damage is reported: ${JSON.stringify(errs)}`);
  const td = await sync(d);
  assert.equal(td.lsn, f1.expected.lsn, `tab d catches up: ${JSON.stringify(td.error)}`);
  assert.equal(await compare(d, f1.expected.entries), null, "tab d: stage 1");
  await Promise.all([a.close(), c.close(), d.close()]);
});
