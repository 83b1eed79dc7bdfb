// The JS examples, run the way their READMEs say, against `walcast serve`:
//   - examples/worker-kv: `wrangler dev` (workerd) in a copy of the example
//     that installed the packed npm tarball; key lookups, a scan and the
//     status through the worker, a write that shows up, and its page in
//     Chromium reading a key through the worker.
//   - examples/browser-offline: `python3 -m http.server` in a copy of the
//     example with the tarball installed; Chromium loads the page, which must
//     show the dataset's keys and applied LSN, then a live update (a new
//     write appears in the table without a reload); a screenshot is taken;
//     every server is stopped, the page reloads and still shows the data
//     (its files from the service worker, the data from IndexedDB) and a
//     second screenshot is taken.
// Screenshots: target/examples/browser-offline.png and
// target/examples/browser-offline-offline.png (ignored paths).
//
//   node --test tests/js/examples/examples.test.mjs   (bash tests/js/run-edge.sh examples)
//
// Needs js/dist (scripts/build-js.sh), wrangler and Chromium
// (scripts/browser-deps.sh), python3, and target/debug/walcast (built when missing).
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { after, before, test } from "node:test";
import { walcastBin } from "../datasets.mjs";
import {
  CHROMIUM,
  CHROMIUM_ARGS,
  EDGE_MODULES,
  REPO,
  distReady,
  loadPlaywright,
  log,
  makeTmp,
  startOnFreePort,
  startProcess,
  stopProcess,
  wranglerEnv,
} from "../edge/lib.mjs";

const TIMEOUT = 300_000;
const WRANGLER = path.join(EDGE_MODULES, ".bin", "wrangler");
const SHOTS = path.join(REPO, "target/examples");

if (!distReady()) throw new Error("js/dist is missing: run bash scripts/build-js.sh");
for (const [what, p] of [
  ["wrangler", WRANGLER],
  ["chromium", CHROMIUM],
]) {
  if (!fs.existsSync(p)) throw new Error(`${what} is missing (${p}): run bash scripts/browser-deps.sh`);
}

/** Runs a command to its end without blocking the event loop; resolves stdout, rejects on failure. */
function run(cmd, args, { cwd, input, env } = {}) {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { cwd, env: { ...process.env, ...env }, stdio: ["pipe", "pipe", "pipe"] });
    let out = "";
    let err = "";
    child.stdout.on("data", (d) => (out += d));
    child.stderr.on("data", (d) => (err += d));
    const t = setTimeout(() => child.kill("SIGKILL"), 180_000);
    child.on("error", reject);
    child.on("exit", (code, signal) => {
      clearTimeout(t);
      if (code === 0) resolve(out);
      else reject(new Error(`${path.basename(cmd)} ${args.join(" ")} exited ${code ?? signal}:\n${err}`));
    });
    child.stdin.end(input ?? "");
  });
}

const tmp = makeTmp("walcast-examples-");
const WAL = path.join(tmp, "wal");
const DATA = path.join(tmp, "data");
const bin = walcastBin();
/** What the dataset holds (key -> value text), as the tests' model. */
const model = new Map();
let committed = 0;

/** Commits puts (one batch) and publishes them once; returns the committed LSN. */
async function publish(puts) {
  const line = JSON.stringify({ batch: Object.entries(puts).map(([key, value]) => ({ op: "put", key, value })) });
  const out = await run(bin, ["write", "--wal", WAL], { input: line + "\n" });
  committed = JSON.parse(out.trim().split("\n").at(-1)).lsn;
  await run(bin, ["publish", "--wal", WAL, "--to", `file://${DATA}`, "--once"]);
  for (const [k, v] of Object.entries(puts)) model.set(k, v);
  return committed;
}

let tarball;
let serve = null;
let servePort;
let base;

async function startServe() {
  ({ child: serve, port: servePort } = await startOnFreePort({
    start: (port) => startProcess(bin, ["serve", DATA, "--addr", `127.0.0.1:${port}`], { name: "walcast serve", logFile: path.join(tmp, "serve.log") }),
    readyUrl: (port) => `http://127.0.0.1:${port}/catalog/head.json`,
    logFile: path.join(tmp, "serve.log"),
    timeoutMs: 30_000,
  }));
  base = `http://127.0.0.1:${servePort}`;
}

/** A copy of examples/<name> outside the repository, with the packed tarball installed as its `walcast`. */
async function installExample(name) {
  const dir = path.join(tmp, name);
  fs.cpSync(path.join(REPO, "examples", name), dir, { recursive: true, filter: (p) => !p.includes("node_modules") });
  const pkg = JSON.parse(fs.readFileSync(path.join(dir, "package.json"), "utf8"));
  assert.ok(pkg.dependencies?.walcast, `examples/${name}/package.json depends on walcast`);
  pkg.dependencies.walcast = `file:${tarball}`;
  delete pkg.devDependencies; // wrangler: the repository's pinned copy (tests/js/edge)
  fs.writeFileSync(path.join(dir, "package.json"), JSON.stringify(pkg, null, 2));
  await run("npm", ["install", "--offline", "--no-audit", "--no-fund", "--loglevel=error"], { cwd: dir });
  assert.ok(fs.existsSync(path.join(dir, "node_modules/walcast/dist/web.js")), "the tarball is installed");
  return { dir, pkg };
}

const cities = {
  "city:paris": JSON.stringify({ country: "FR", population: 2102650 }),
  "city:oslo": JSON.stringify({ country: "NO", population: 709037 }),
  "city:lima": JSON.stringify({ country: "PE", population: 10151200 }),
  "city:osaka": JSON.stringify({ country: "JP", population: 2752412 }),
  "city:nairobi": JSON.stringify({ country: "KE", population: 4397073 }),
  "note:readme": "keys and values are bytes; these are UTF-8",
};

let browser;

before(async () => {
  const packed = JSON.parse(await run("npm", ["pack", "--json", "--pack-destination", tmp], { cwd: path.join(REPO, "js") }))[0];
  tarball = path.join(tmp, packed.filename);
  await publish(cities);
  await startServe();
  const { chromium } = await loadPlaywright();
  browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, timeout: 60_000 });
  log(`examples: dataset at ${base} (LSN ${committed}), chromium ${browser.version()}`);
});

after(async () => {
  await browser?.close().catch(() => {});
  await stopProcess(serve);
});

test("examples/worker-kv: wrangler dev against walcast serve answers reads, follows writes, and its page reads keys", { timeout: TIMEOUT }, async () => {
  const { dir, pkg } = await installExample("worker-kv");
  assert.match(pkg.scripts.start, /^wrangler dev\b/, "npm start is wrangler dev");
  const logFile = path.join(tmp, "wrangler-dev.log");
  // `npm start` with this port and this dataset (wrangler.toml's [vars] name another).
  const { child: dev, port } = await startOnFreePort({
    start: (port) =>
      startProcess(
        WRANGLER,
        ["dev", "--port", String(port), "--ip", "127.0.0.1", "--var", `DATASET_URL:${base}`, "--var", "MAX_AGE_MS:0", "--show-interactive-dev-session=false"],
        {
          cwd: dir,
          name: "wrangler",
          logFile,
          env: wranglerEnv(path.join(tmp, "wrangler-logs")),
        },
      ),
    readyUrl: (port) => `http://127.0.0.1:${port}/api/status`,
    logFile,
    timeoutMs: 120_000,
    signal: "SIGINT",
  });
  const worker = `http://127.0.0.1:${port}`;
  const get = async (p) => {
    const r = await fetch(worker + p);
    return { status: r.status, body: await r.json() };
  };
  try {
    let r = await get("/api/get?key=city:paris");
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.deepEqual(r.body, { key: "city:paris", value: model.get("city:paris"), lsn: committed });
    r = await get("/api/get?key=city:atlantis");
    assert.equal(r.status, 404, "an absent key");
    r = await get("/api/get");
    assert.equal(r.status, 400, "no ?key=");
    r = await get("/api/scan?prefix=city:o");
    assert.deepEqual(
      r.body.rows,
      [...model].filter(([k]) => k.startsWith("city:o")).sort().map(([key, value]) => ({ key, value })),
      "scan of a prefix",
    );
    r = await get("/api/scan?prefix=city:&limit=1.5");
    assert.equal(r.status, 200, "a fractional limit is rounded down, not an uncaught exception");
    assert.equal(r.body.rows.length, 1, "limit 1.5: one row");
    for (const bad of ["abc", "-5", ""]) {
      r = await get(`/api/scan?prefix=city:&limit=${bad}`);
      assert.equal(r.status, 400, `limit=${bad}: a malformed query`);
    }
    r = await get("/api/status");
    assert.equal(r.body.appliedLsn, committed, "status: applied LSN");

    // A write shows up (MAX_AGE_MS 0: every request syncs first).
    const lsn = await publish({ "city:quito": JSON.stringify({ country: "EC", population: 2800388 }) });
    r = await get("/api/get?key=city:quito");
    assert.deepEqual(r.body, { key: "city:quito", value: model.get("city:quito"), lsn }, "a new write is read through the worker");

    // The page: the table of keys, and a key read through the form.
    const page = await browser.newPage();
    page.on("pageerror", (e) => log(`[worker-kv page] ${e.message}`));
    await page.goto(worker + "/", { waitUntil: "load" });
    await page.waitForSelector("body[data-ready='1']", { timeout: 30_000 });
    assert.equal(await page.locator("#rows tr").count(), model.size, "the page lists every key");
    await page.fill("#key", "city:lima");
    await page.click("#get button");
    await page.waitForFunction(() => document.getElementById("value").textContent !== "", null, { timeout: 30_000 });
    assert.equal(await page.textContent("#value"), model.get("city:lima"), "the page reads a key through the worker");
    assert.match(await page.textContent("#status"), new RegExp(`applied LSN ${lsn} of ${lsn}`));
    fs.mkdirSync(SHOTS, { recursive: true });
    await page.screenshot({ path: path.join(SHOTS, "worker-kv.png"), fullPage: true });
    await page.close();
    log(`examples: worker-kv served LSN ${lsn} through wrangler dev; screenshot ${path.relative(REPO, path.join(SHOTS, "worker-kv.png"))}`);
  } finally {
    await stopProcess(dev, { signal: "SIGINT", graceMs: 10_000 });
  }
});

test("examples/browser-offline: the page shows the data live, and after a reload with every server stopped", { timeout: TIMEOUT }, async () => {
  const { dir, pkg } = await installExample("browser-offline");
  assert.match(pkg.scripts.start, /^python3 -m http\.server\b/, "npm start is python3 -m http.server");
  const { child: web, port } = await startOnFreePort({
    start: (port) =>
      startProcess("python3", ["-m", "http.server", String(port), "--bind", "127.0.0.1"], { cwd: dir, name: "python3", logFile: path.join(tmp, "http-server.log") }),
    readyUrl: (port) => `http://127.0.0.1:${port}/`,
    logFile: path.join(tmp, "http-server.log"),
    timeoutMs: 30_000,
  });
  const pageUrl = `http://127.0.0.1:${port}/?dataset=${encodeURIComponent(base)}`;
  const context = await browser.newContext({ viewport: { width: 1000, height: 900 } });
  try {
    const page = await context.newPage();
    page.on("pageerror", (e) => log(`[browser-offline page] ${e.message}`));
    page.on("console", (m) => m.type() === "error" && log(`[browser-offline page] console.error: ${m.text()}`));
    await page.goto(pageUrl, { waitUntil: "load" });
    await page.waitForSelector("body[data-ready='1']", { timeout: 30_000 });
    await page.waitForFunction((lsn) => document.body.dataset.appliedLsn === String(lsn), committed, { timeout: 30_000 });
    // The status is drawn every 500 ms from the replica; the table only once the
    // sync's IndexedDB write is done (onChange): wait for the table itself.
    await page.waitForFunction((n) => document.querySelectorAll("#rows tr").length === n, model.size, { timeout: 30_000 });
    const rows = async () =>
      page.$$eval("#rows tr", (trs) => trs.map((tr) => [...tr.querySelectorAll("td")].map((td) => td.textContent)));
    const expected = () => [...model].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    assert.deepEqual(await rows(), expected(), "the table shows every key and value");
    assert.match(await page.textContent("#source"), /nothing stored/, "the first visit loads from the dataset");

    // Live: a new write appears without a reload (onChange re-renders the table).
    const lsn = await publish({ "city:hanoi": JSON.stringify({ country: "VN", population: 8053663 }) });
    await page.waitForFunction((lsn) => document.body.dataset.appliedLsn === String(lsn), lsn, { timeout: 30_000 });
    await page.waitForSelector("tr[data-key='city:hanoi']", { timeout: 30_000 });
    assert.deepEqual(await rows(), expected(), "the table after a live update");
    assert.equal(await page.getAttribute("tr[data-key='city:hanoi']", "class"), "changed", "the new row is highlighted");
    assert.equal(await page.textContent("#committed"), String(lsn));
    assert.match(await page.textContent("#lag"), /^caught up \(head read \d+ ms ago\)$/, "caught up: how fresh it is");

    // The service worker holds the page's files before the servers stop.
    await page.waitForFunction(() => navigator.serviceWorker.controller !== null, null, { timeout: 30_000 });
    const cached = await page.evaluate(async () => {
      const names = await caches.keys();
      const out = [];
      for (const n of names) for (const r of await (await caches.open(n)).keys()) out.push(new URL(r.url).pathname);
      return out;
    });
    for (const f of ["/", "/app.js", "/node_modules/walcast/dist/web.js", "/node_modules/walcast/dist/wasm/walcast_wasm_bg.wasm"]) {
      assert.ok(cached.includes(f), `the service worker cached ${f} (${cached.join(", ")})`);
    }
    fs.mkdirSync(SHOTS, { recursive: true });
    const shot = path.join(SHOTS, "browser-offline.png");
    await page.screenshot({ path: shot, fullPage: true });

    // Every server stops; the page reloads and still shows the data.
    await stopProcess(web);
    await stopProcess(serve);
    serve = null;
    await page.reload({ waitUntil: "load" });
    await page.waitForSelector("body[data-ready='1']", { timeout: 30_000 });
    assert.match(await page.textContent("#source"), new RegExp(`^IndexedDB \\(LSN ${lsn}\\)`), "reopened from IndexedDB");
    assert.equal(await page.textContent("#applied"), String(lsn), "the applied LSN after the reload");
    assert.deepEqual(await rows(), expected(), "the table after the reload, offline");
    // The background sync fails (nothing answers) and says so; the data stays.
    await page.waitForFunction(() => document.getElementById("error").textContent !== "none", null, { timeout: 30_000 });
    assert.deepEqual(await rows(), expected(), "the table after a failed sync");
    const offlineShot = path.join(SHOTS, "browser-offline-offline.png");
    await page.screenshot({ path: offlineShot, fullPage: true });
    log(`examples: browser-offline at LSN ${lsn}; screenshots ${path.relative(REPO, shot)}, ${path.relative(REPO, offlineShot)}; offline error: ${await page.textContent("#error")}`);
  } finally {
    await context.close().catch(() => {});
    await stopProcess(web);
  }
});
