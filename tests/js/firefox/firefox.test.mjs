// Firefox runner: the walcast package's browser entry in Firefox ESR (Debian's
// /usr/bin/firefox-esr), driven by puppeteer-core over WebDriver BiDi (no
// browser download; scripts/runtime-deps.sh installs both).
//
//   node --test tests/js/firefox/firefox.test.mjs
//
// Serves the Chromium suite's test page (tests/js/chromium/page.js, which
// imports js/dist/web.js and tests/js/conformance.js) from 127.0.0.1 (a
// secure context: IndexedDB works), and
//   1. runs every conformance case in the page, one node test each (open,
//      sync, get and scan equality against the orchestrator's expected state,
//      and the rest of the suite);
//   2. reload: a replica with persist "indexeddb" syncs, the page reloads, and
//      the reopened replica serves every read from IndexedDB before its first
//      sync, with the dataset unreachable (the page's fetch refuses it); then
//      a sync reaches what was published meanwhile.
// Datasets come from tests/js/datasets.mjs (WALCAST_DATASETS=<control URL>
// uses a running orchestrator). Firefox is closed at the end.
import assert from "node:assert/strict";
import fs from "node:fs";
import http from "node:http";
import { createRequire } from "node:module";
import path from "node:path";
import { after, before, test } from "node:test";
import { pathToFileURL } from "node:url";
import { DIST, REPO, connectDatasets, distReady, log, makeTmp } from "../edge/lib.mjs";

const TIMEOUT = 300_000;
export const FIREFOX = process.env.WALCAST_FIREFOX ?? "/usr/bin/firefox-esr";
const RUNTIMES = path.join(REPO, "tests/js/runtimes");

if (!distReady()) throw new Error("js/dist is missing: run bash scripts/build-js.sh");
const missing = !fs.existsSync(FIREFOX)
  ? `${FIREFOX} is missing: run bash scripts/runtime-deps.sh`
  : !fs.existsSync(path.join(RUNTIMES, "node_modules/puppeteer-core/package.json"))
    ? "puppeteer-core is missing: run bash scripts/runtime-deps.sh"
    : null;
if (missing && process.env.WALCAST_NO_FIREFOX === "1") {
  test("firefox", { skip: missing }, () => {});
} else {
  if (missing) throw new Error(missing);
  await main();
}

async function main() {
  const puppeteer = (await import(pathToFileURL(createRequire(path.join(RUNTIMES, "package.json")).resolve("puppeteer-core")))).default;

  const datasets = await connectDatasets();
  const fxConf = await datasets.newInstance(); // the conformance cases
  const fxReload = await datasets.newInstance(); // the reload test

  const HTML = `<!doctype html>
<meta charset="utf-8">
<title>walcast firefox tests</title>
<script type="module" src="/page.js"></script>
`;
  const TYPES = { ".js": "text/javascript; charset=utf-8", ".wasm": "application/wasm", ".json": "application/json" };
  const sendFile = (res, file) => {
    if (!fs.existsSync(file) || !fs.statSync(file).isFile()) {
      res.writeHead(404, { "content-type": "text/plain" });
      return res.end("not found");
    }
    res.writeHead(200, { "content-type": TYPES[path.extname(file)] ?? "application/octet-stream", "cache-control": "no-store" });
    fs.createReadStream(file).pipe(res);
  };
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

  async function newPage(label) {
    const page = await browser.newPage();
    page.on("pageerror", (e) => log(`[firefox ${label}] page error: ${e?.message ?? e}`));
    page.on("console", (m) => {
      if (m.type() === "error" || m.type() === "warn") log(`[firefox ${label}] console.${m.type()}: ${m.text()}`);
    });
    await load(page);
    return page;
  }

  async function load(page, reload = false) {
    if (reload) await page.reload({ waitUntil: "load" });
    else await page.goto(PAGE, { waitUntil: "load" });
    await page.waitForFunction(() => window.walcastTest?.ready === true, { timeout: 30_000 });
  }

  before(async () => {
    browser = await puppeteer.launch({
      browser: "firefox",
      executablePath: FIREFOX,
      headless: true,
      userDataDir: makeTmp("walcast-firefox-profile-"),
      timeout: 90_000,
      protocolTimeout: TIMEOUT,
      extraPrefsFirefox: { "network.proxy.type": 0, "app.update.enabled": false, "browser.shell.checkDefaultBrowser": false },
    });
    const pid = browser.process()?.pid;
    // run-edge.sh stops what a runner killed before its teardown leaves behind.
    if (pid && process.env.WALCAST_EDGE_PIDS) fs.appendFileSync(process.env.WALCAST_EDGE_PIDS, `${pid} firefox\n`);
    log(`firefox ${await browser.version()} (pid ${pid}), page ${PAGE}`);
  });

  after(async () => {
    await browser?.close().catch(() => {});
    await new Promise((r) => pageServer.close(r));
    for (const i of [fxConf, fxReload]) await datasets.dropInstance(i.instance).catch(() => {});
    await datasets.close();
  });

  test("conformance in firefox", { timeout: 30 * 60_000 }, async (t) => {
    const page = await newPage("conformance");
    const names = await page.evaluate((fx, control) => window.walcastTest.setup(fx, control), fxConf, datasets.controlUrl);
    assert.ok(names.length > 10, `${names.length} cases`);
    for (let i = 0; i < names.length; i++) {
      await t.test(names[i], { timeout: TIMEOUT }, async () => {
        const res = await page.evaluate((i) => window.walcastTest.runCase(i), i);
        for (const l of res.logs ?? []) log(`firefox conformance: ${l}`);
        if (!res.ok) assert.fail(`${res.name}: ${res.error}`);
      });
    }
    await page.close();
  });

  test("reload: the replica reopens from IndexedDB (the base, then the base and its log) and serves reads before its first sync, offline", { timeout: TIMEOUT }, async () => {
    const f0 = fxReload.scenarios.midhistory;
    const url = f0.url;
    const page = await newPage("reload");
    const w = (fn, ...args) => page.evaluate(fn, ...args);

    await w((u) => window.walcastTest.open("r", u, { persist: "indexeddb" }), url);
    const first = await w(() => window.walcastTest.sync("r"));
    assert.equal(first.error, undefined, `first sync: ${JSON.stringify(first.error)}`);
    assert.equal(first.lsn, f0.expected.lsn, "first sync reaches stage 0");
    assert.equal(await w((e) => window.walcastTest.compare("r", e), f0.expected.entries), null, "get and scan equal the expected state");
    const persisted0 = await w((u) => window.walcastTest.persisted(u), url);
    assert.equal(persisted0?.appliedLsn, f0.expected.lsn, "IndexedDB holds the synced LSN");

    // Reload; the module is compiled first (its .wasm comes from the page's
    // server), then every fetch of the dataset is refused and counted.
    await load(page, true);
    await w(async (u) => {
      await (await import("/dist/web.js")).init();
      const real = window.fetch.bind(window);
      window.refused = 0;
      window.fetch = (input, init) => {
        const target = typeof input === "string" ? input : input.url;
        if (String(target).startsWith(u + "/")) {
          window.refused++;
          return Promise.reject(new TypeError("offline (the test refuses the dataset)"));
        }
        return real(input, init);
      };
      window.unblock = () => {
        window.fetch = real;
      };
    }, url);
    const reopened = await w((u) => window.walcastTest.open("r", u, { persist: "indexeddb" }), url);
    assert.equal(reopened.appliedLsn, f0.expected.lsn, "reopened at the persisted appliedLsn");
    assert.equal(reopened.datasetId, f0.datasetId, "reopened datasetId");
    assert.equal(await w((e) => window.walcastTest.compare("r", e), f0.expected.entries), null, "reads served from IndexedDB before any sync");
    assert.equal(await w(() => window.refused), 0, "no request before a sync");
    const offline = await w(() => window.walcastTest.sync("r"));
    assert.ok(offline.error, "a sync with the dataset unreachable fails");
    assert.equal(await w((e) => window.walcastTest.compare("r", e), f0.expected.entries), null, "reads still served after the failed sync");
    log(`firefox reload: offline sync failed with ${JSON.stringify(offline.error)}; ${await w(() => window.refused)} fetches refused`);

    // Back online, with more published: a sync reaches it.
    await w(() => window.unblock());
    const f1 = await datasets.mutate(fxReload.instance, "midhistory");
    const second = await w(() => window.walcastTest.sync("r"));
    assert.equal(second.error, undefined, `sync after reload: ${JSON.stringify(second.error)}`);
    assert.equal(second.lsn, f1.expected.lsn, "sync after reload reaches stage 1");
    assert.equal(await w((e) => window.walcastTest.compare("r", e), f1.expected.entries), null, "state after the sync");
    const persisted1 = await w((u) => window.walcastTest.persisted(u), url);
    assert.equal(persisted1?.baseLsn, f0.expected.lsn, "stage 1 was appended as a log to the stage 0 base");
    assert.ok(persisted1.logBytes > 0, "the log holds what the sync applied");

    // Reload again, offline: the base with the log replayed on it.
    await w(() => window.walcastTest.close("r"));
    await load(page, true);
    await w(async (u) => {
      await (await import("/dist/web.js")).init();
      window.refused = 0;
      const real = window.fetch.bind(window);
      window.fetch = (input, init) => {
        const target = typeof input === "string" ? input : input.url;
        if (String(target).startsWith(u + "/")) {
          window.refused++;
          return Promise.reject(new TypeError("offline (the test refuses the dataset)"));
        }
        return real(input, init);
      };
    }, url);
    const third = await w((u) => window.walcastTest.open("r", u, { persist: "indexeddb" }), url);
    assert.equal(third.appliedLsn, f1.expected.lsn, "reopened at stage 1 from the base and the log");
    assert.equal(await w((e) => window.walcastTest.compare("r", e), f1.expected.entries), null, "stage 1 served before any sync");
    assert.deepEqual(await w(() => window.walcastTest.errors("r")), [], "no error replaying the log");
    assert.equal(await w(() => window.refused), 0, "no request before a sync");
    await page.close();
  });
}
