// workerd runner: the walcast Worker (worker/src/index.js + handler.js) and the
// conformance suite, in the real Cloudflare runtime.
//
//   node --test tests/js/workerd/workerd.test.mjs
//
// Generates a config.capnp in a temp dir that loads the worker with the built
// package (js/dist: workerd.js as the module "walcast", its .wasm as a wasm
// module), one service per scenario with DATASET_URL pointing at the
// orchestrator's `walcast serve` on 127.0.0.1 (outbound fetch through a
// `network` service allowing local addresses), starts `workerd serve` on free
// ports, and checks over HTTP (/kv, /scan, /status) what the worker serves.
// A second worker runs tests/js/conformance.js inside workerd, one case per
// request. workerd is stopped by its PID at the end.
//
// Needs: js/dist (scripts/build-js.sh), workerd (scripts/browser-deps.sh).
// WALCAST_DATASETS=<control URL> uses a running orchestrator.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import http from "node:http";
import path from "node:path";
import { after, before, test } from "node:test";
import {
  DIST, EDGE_MODULES, REPO, argBytes, bytesEq, connectDatasets, distReady, freePort, isAddrInUse, log, makeTmp, pct, pool, show,
  sleep, startOnFreePort, startProcess, stopAll, stopProcess, unb64, waitForHttp, workerSources, wranglerEnv,
} from "../edge/lib.mjs";

const WORKERD = path.join(EDGE_MODULES, ".bin", "workerd");
const COMPAT_DATE = "2025-11-01";
const TIMEOUT = 300_000;

if (!distReady()) throw new Error("js/dist is missing: run bash scripts/build-js.sh");
if (!fs.existsSync(WORKERD)) throw new Error(`${WORKERD} is missing: run bash scripts/browser-deps.sh`);

// --- setup ---------------------------------------------------------------------------

const datasets = await connectDatasets();
const fx = await datasets.newInstance(); // the worker services' datasets
const fxSlow = await datasets.newInstance(); // behind the delaying proxy
const fxConf = await datasets.newInstance(); // the in-isolate conformance run
const fxDeno = await datasets.newInstance(); // worker/deno.js under Deno
const fxMore = await datasets.newInstance(); // bad scans, CORS_ORIGINS
const instances = [fx, fxSlow, fxConf, fxDeno, fxMore];
const hostileToken = `workerd-${process.pid}-${Date.now()}`;
const tmp = makeTmp("walcast-workerd-");

// A proxy in front of `walcast serve` that can hold every response back, to
// show that requests after the first never wait on object storage.
const proxy = { delayMs: 0, requests: [] };
const proxyServer = http.createServer((req, res) => {
  const upstream = new URL(fx.base);
  proxy.requests.push({ url: req.url, at: Date.now() });
  const go = () => {
    const up = http.request(
      { host: upstream.hostname, port: upstream.port, path: req.url, method: req.method, headers: { ...req.headers, host: upstream.host } },
      (r) => {
        res.writeHead(r.statusCode, r.headers);
        r.pipe(res);
      },
    );
    up.on("error", (e) => {
      res.writeHead(502);
      res.end(String(e));
    });
    req.pipe(up);
  };
  if (proxy.delayMs > 0) setTimeout(go, proxy.delayMs);
  else go();
});
await new Promise((r) => proxyServer.listen(0, "127.0.0.1", r));
const proxyBase = `http://127.0.0.1:${proxyServer.address().port}`;
const slowUrl = fxSlow.scenarios.midhistory.url.replace(new URL(fxSlow.base).origin, proxyBase);

/** capnp text literal (ASCII, escaped). */
const lit = (s) => JSON.stringify(s).replace(/[^\x20-\x7e]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, "0")}`);
const rel = (p) => path.relative(tmp, p).split(path.sep).join("/");

/** The package's modules as workerd sees them: "walcast" is the workerd entry. */
function packageModules() {
  const mods = [`(name = "walcast", esModule = embed ${lit(rel(path.join(DIST, "workerd.js")))})`];
  const walk = (dir, prefix) => {
    for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
      const p = path.join(dir, e.name);
      const name = prefix + e.name;
      if (e.isDirectory()) walk(p, name + "/");
      else if (name.endsWith(".wasm")) mods.push(`(name = ${lit(name)}, wasm = embed ${lit(rel(p))})`);
      // node.js and web.js are other runtimes' entries; workerd.js is "walcast".
      else if (name.endsWith(".js") && !["node.js", "web.js", "workerd.js"].includes(name)) {
        mods.push(`(name = ${lit(name)}, esModule = embed ${lit(rel(p))})`);
      }
    }
  };
  walk(DIST, "");
  return mods;
}

function workerService(name, modules, bindings) {
  const b = Object.entries(bindings).map(([k, v]) =>
    v.embed ? `(name = ${lit(k)}, text = embed ${lit(rel(v.embed))})` : `(name = ${lit(k)}, text = ${lit(String(v))})`,
  );
  return `(name = ${lit(name)}, worker = (
      modules = [
        ${modules.join(",\n        ")}
      ],
      compatibilityDate = ${lit(COMPAT_DATE)},
      bindings = [ ${b.join(", ")} ],
      globalOutbound = "net",
    ))`;
}

const pkg = packageModules();
// The worker's modules (its entry first), then the package's.
const workerModules = [
  ...workerSources().map((f) => `(name = ${lit(f)}, esModule = embed ${lit(rel(path.join(REPO, "worker/src", f)))})`),
  ...pkg,
];
const names = workerModules.map((m) => /name = "([^"]+)"/.exec(m)[1]);
assert.equal(new Set(names).size, names.length, `module names collide: ${names.join(", ")}`);
const confModules = [
  `(name = "main.js", esModule = embed ${lit(rel(path.join(REPO, "tests/js/workerd/conformance-worker.js")))})`,
  `(name = "conformance.js", esModule = embed ${lit(rel(path.join(REPO, "tests/js/conformance.js")))})`,
  ...pkg,
];

// worker/wrangler.toml as Cloudflare would build it: `wrangler deploy
// --dry-run` bundles src/index.js with the package (alias) and the .wasm
// (CompiledWasm rule); the bundle runs as one more service.
const WRANGLER = path.join(EDGE_MODULES, ".bin", "wrangler");
let bundle = null;
if (fs.existsSync(WRANGLER)) {
  const out = path.join(tmp, "wrangler-out");
  const r = spawnSync(WRANGLER, ["deploy", "--dry-run", "--outdir", out], {
    cwd: path.join(REPO, "worker"),
    encoding: "utf8",
    timeout: 180_000,
    env: { ...process.env, ...wranglerEnv(path.join(tmp, "wrangler-logs")) },
  });
  const files = fs.existsSync(out) ? fs.readdirSync(out) : [];
  bundle = { status: r.status, output: `${r.stdout ?? ""}${r.stderr ?? ""}${r.error ?? ""}`, out, files };
  bundle.wasm = files.find((f) => f.endsWith(".wasm"));
  bundle.ok = r.status === 0 && files.includes("index.js") && !!bundle.wasm;
}

// One worker service (an isolate, a replica) per scenario.
const services = {};
for (const name of ["basic", "midhistory", "corrupt", "retention", "newdataset"]) {
  services[name] = { bindings: { DATASET_URL: fx.scenarios[name].url, MAX_AGE_MS: "0" } };
}
services.slow = { bindings: { DATASET_URL: slowUrl, MAX_AGE_MS: "0" } };
services.idle = { bindings: { DATASET_URL: fxSlow.scenarios.basic.url } }; // MAX_AGE_MS default
services.unset = { bindings: {} };
if (bundle?.ok) {
  services.bundled = {
    modules: [
      `(name = "index.js", esModule = embed ${lit(rel(path.join(bundle.out, "index.js")))})`,
      `(name = ${lit(bundle.wasm)}, wasm = embed ${lit(rel(path.join(bundle.out, bundle.wasm)))})`,
    ],
    bindings: { DATASET_URL: fxSlow.scenarios.newdataset.url },
  };
}
services.missing = { bindings: { DATASET_URL: `${fx.base}/no-such-dataset`, FIRST_SYNC_WAIT_MS: "3000" } };
services.scanbad = { bindings: { DATASET_URL: fxMore.scenarios.midhistory.url, MAX_AGE_MS: "0" } };
services.cors = { bindings: { DATASET_URL: fxMore.scenarios.basic.url, CORS_ORIGINS: "https://app.example, https://admin.example" } };
// LOAD=lazy: a fresh isolate per dataset (MAX_AGE_MS default: no background sync during the cold read).
services.lazy = { bindings: { DATASET_URL: fx.scenarios.lazy.url, LOAD: "lazy" } };
services.lazysmall = { bindings: { DATASET_URL: fxSlow.scenarios.lazy.url, LOAD: "lazy", CACHE_BYTES: "65536", MAX_AGE_MS: "0" } };
services.lazyburst = { bindings: { DATASET_URL: fxSlow.scenarios.lazy.url, LOAD: "lazy", CACHE_BYTES: "16384", MAX_AGE_MS: "0" } };
services.lazydamage = { bindings: { DATASET_URL: fxMore.scenarios.lazydamage.url, LOAD: "lazy", MAX_AGE_MS: "0" } };
// TRUST: pinned keys (the signed scenario's publisher key, another key; an unsigned dataset).
const signedFx = fxMore.scenarios.signed;
services.trusted = { bindings: { DATASET_URL: signedFx.url, TRUST: ` ${signedFx.wrongKey} , ${signedFx.trustKey}`, MAX_AGE_MS: "0" } };
services.trustwrong = { bindings: { DATASET_URL: signedFx.url, TRUST: signedFx.wrongKey, MAX_AGE_MS: "0", FIRST_SYNC_WAIT_MS: "1000" } };
services.trustunsigned = { bindings: { DATASET_URL: fxMore.scenarios.basic.url, TRUST: signedFx.trustKey, MAX_AGE_MS: "0", FIRST_SYNC_WAIT_MS: "1000" } };
services.trustbad = { bindings: { DATASET_URL: signedFx.url, TRUST: "ed25519:nope" } };
// min_lsn: reads through the counting proxy (proxy.requests: the worker's GETs), a short wait.
const MIN_LSN_WAIT_MS = 1000;
const minLsnFx = fxMore.scenarios.newdataset; // stage 0 only (never mutated in fxMore)
const minLsnPath = new URL(minLsnFx.url).pathname;
services.minlsn = { bindings: { DATASET_URL: minLsnFx.url.replace(new URL(fxMore.base).origin, proxyBase), MIN_LSN_WAIT_MS: String(MIN_LSN_WAIT_MS) } };
services.hostile = { bindings: { DATASET_URL: `${datasets.controlUrl}/hostile/endless/${hostileToken}`, MAX_AGE_MS: "0", FIRST_SYNC_WAIT_MS: "1000" } };
fs.writeFileSync(path.join(tmp, "fixtures.json"), JSON.stringify(fxConf));
services.conformance = { modules: confModules, bindings: { FIXTURES: { embed: path.join(tmp, "fixtures.json") }, CONTROL: datasets.controlUrl } };

for (const s of Object.values(services)) s.port = await freePort();
function workerdServices() {
  return Object.entries(services).filter(([, s]) => !s.deno);
}
const configPath = path.join(tmp, "config.capnp");
function writeConfig() {
  const config = `using Workerd = import "/workerd/workerd.capnp";

const config :Workerd.Config = (
  services = [
    ${workerdServices().map(([n, s]) => workerService(n, s.modules ?? workerModules, s.bindings)).join(",\n    ")},
    (name = "net", network = (allow = ["public", "private", "local"])),
  ],
  sockets = [
    ${workerdServices().map(([n, s]) => `(name = ${lit(`http-${n}`)}, address = ${lit(`127.0.0.1:${s.port}`)}, http = (), service = ${lit(n)})`).join(",\n    ")},
  ],
);
`;
  fs.writeFileSync(configPath, config);
}
const workerdLog = path.join(tmp, "workerd.log");
let workerd;

// worker/deno.js: the same handler under Deno.serve, one process per dataset.
const DENO = process.env.DENO ?? path.join(REPO, "tests/js/node_modules/.bin/deno");
const haveDeno = fs.existsSync(DENO);
const denoServices = { "deno-basic": fxDeno.scenarios.basic.url, "deno-midhistory": fxDeno.scenarios.midhistory.url, "deno-lazy": fxDeno.scenarios.lazy.url };
const denoProcs = [];
if (haveDeno) {
  for (const [name, url] of Object.entries(denoServices)) {
    // HOSTNAME as containers set it (their own name, which may not resolve):
    // the server still listens on 127.0.0.1 (LISTEN_HOST names the address).
    const more = name === "deno-lazy" ? { LOAD: "lazy" } : { HOSTNAME: "walcast-no-such-host.invalid" };
    services[name] = { port: null, deno: true, bindings: { DATASET_URL: url, MAX_AGE_MS: "0", ...more } };
  }
}

// A port handed out by freePort may be taken before the child binds it: then
// the child is started again on a new port (at most BIND_TRIES times).
const BIND_TRIES = 4;

async function startDeno() {
  for (const [name, s] of Object.entries(services).filter(([, s]) => s.deno)) {
    const logFile = path.join(tmp, `${name}.log`);
    const { child, port } = await startOnFreePort({
      start: (port) =>
        startProcess(
          DENO,
          ["run", "--allow-net", "--allow-env", "--allow-read", "--config", path.join(REPO, "worker/deno.json"), path.join(REPO, "worker/deno.js")],
          {
            cwd: REPO,
            name: `deno (${name})`,
            logFile,
            env: {
              ...s.bindings,
              PORT: String(port),
              DENO_NO_UPDATE_CHECK: "1",
              DENO_NO_PROMPT: "1",
              DENO_DIR: process.env.DENO_DIR ?? path.join(REPO, ".deno"),
            },
          },
        ),
      readyUrl: (port) => `http://127.0.0.1:${port}/nope`,
      logFile,
      tries: BIND_TRIES,
    });
    s.port = port;
    denoProcs.push(child);
  }
}

before(async () => {
  for (let attempt = 1; ; attempt++) {
    writeConfig();
    fs.writeFileSync(workerdLog, "");
    workerd = startProcess(WORKERD, ["serve", configPath], { cwd: tmp, name: "workerd", logFile: workerdLog });
    try {
      await waitForHttp(`http://127.0.0.1:${services.unset.port}/status`, 60_000, workerd);
      break;
    } catch (e) {
      await stopProcess(workerd, { signal: "SIGINT" });
      const text = fs.readFileSync(workerdLog, "utf8");
      if (attempt < BIND_TRIES && isAddrInUse(text)) {
        // workerd names the socket it could not bind; every port is drawn again.
        log(`a port was taken before workerd bound it; trying new ports\n${text.trim()}`);
        for (const s of Object.values(services)) if (!s.deno) s.port = await freePort();
        continue;
      }
      throw new Error(`${e.message}\n--- workerd log:\n${text}`);
    }
  }
  log(`workerd ${workerd.pid} serving ${Object.values(services).filter((s) => !s.deno).length} services (config ${configPath})`);
  if (haveDeno) await startDeno();
  else log(`no deno at ${DENO} (bash scripts/js-deps.sh installs it): the worker/deno.js tests are skipped`);
});

after(async () => {
  await stopProcess(workerd, { signal: "SIGINT" });
  for (const d of denoProcs) await stopProcess(d);
  await new Promise((r) => proxyServer.close(r));
  for (const i of instances) await datasets.dropInstance(i.instance).catch(() => {});
  await datasets.close();
  await stopAll(); // the temp dir goes at exit (lib.mjs)
});

// --- HTTP helpers -------------------------------------------------------------------------

const base = (svc) => `http://127.0.0.1:${services[svc].port}`;

async function get(svc, p, init = {}) {
  const r = await fetch(base(svc) + p, { signal: AbortSignal.timeout(150_000), ...init });
  const body = new Uint8Array(await r.arrayBuffer());
  return { status: r.status, headers: r.headers, body };
}

async function getJSON(svc, p) {
  const r = await get(svc, p);
  const text = Buffer.from(r.body).toString("utf8");
  try {
    return { status: r.status, json: JSON.parse(text), headers: r.headers };
  } catch {
    throw new Error(`GET ${p} (${svc}): ${r.status}, not JSON: ${text.slice(0, 300)}`);
  }
}

async function status(svc) {
  const r = await getJSON(svc, "/status");
  assert.equal(r.status, 200, `/status of ${svc}: ${JSON.stringify(r.json)}`);
  return r.json;
}

async function until(fn, ms, what) {
  const end = Date.now() + ms;
  let last;
  for (;;) {
    last = await fn();
    if (last.done) return last.value;
    if (Date.now() > end) throw new Error(`${what}: not within ${ms} ms; last: ${JSON.stringify(last.value)}`);
    await sleep(50);
  }
}

function rowBytes(row) {
  const k = row.key !== undefined ? new TextEncoder().encode(row.key) : unb64(row.key_b64);
  const v = row.value !== undefined ? new TextEncoder().encode(row.value) : unb64(row.value_b64);
  if (row.key !== undefined && row.key_b64 !== undefined) throw new Error("a row with key and key_b64");
  if (row.value !== undefined && row.value_b64 !== undefined) throw new Error("a row with value and value_b64");
  return [k, v, row];
}

function isUtf8(b) {
  try {
    new TextDecoder("utf-8", { fatal: true }).decode(b);
    return true;
  } catch {
    return false;
  }
}

function scanQuery(c) {
  const q = [];
  for (const f of ["prefix", "start", "end"]) if (c[f]) q.push(`${f}=${pct(argBytes(c[f]))}`);
  if (c.limit !== undefined) q.push(`limit=${c.limit}`);
  return q.length ? `?${q.join("&")}` : "";
}

function checkRows(rows, expect, label) {
  for (let i = 0; i < Math.min(rows.length, expect.length); i++) {
    const [k, v, row] = rowBytes(rows[i]);
    const wk = unb64(expect[i][0]);
    const wv = unb64(expect[i][1]);
    assert.ok(bytesEq(k, wk), `${label}: row ${i} key ${show(k)}, expected ${show(wk)}`);
    assert.ok(bytesEq(v, wv), `${label}: row ${i} (${show(k)}) value ${show(v)}, expected ${show(wv)}`);
    assert.equal(row.key !== undefined, isUtf8(wk), `${label}: row ${i}: key as text exactly when it is UTF-8`);
    assert.equal(row.value !== undefined, isUtf8(wv), `${label}: row ${i}: value as text exactly when it is UTF-8`);
  }
  assert.equal(rows.length, expect.length, `${label}: number of rows`);
}

/** Everything the worker serves equals `expected`: a full /scan and /kv of each key. */
async function expectServed(svc, expected, label) {
  const n = expected.entries.length;
  assert.ok(n < 10000, "the fixture fits one /scan");
  const r = await getJSON(svc, `/scan?limit=10000`);
  assert.equal(r.status, 200, `${label}: /scan ${JSON.stringify(r.json)}`);
  checkRows(r.json, expected.entries, `${label}: /scan`);
  await pool(expected.entries, 8, async ([kb, vb]) => {
    const k = unb64(kb);
    const got = await get(svc, `/kv/${pct(k)}`);
    assert.equal(got.status, 200, `${label}: /kv/${pct(k)} status`);
    assert.ok(bytesEq(got.body, unb64(vb)), `${label}: /kv/${pct(k)} = ${show(got.body)}, expected ${show(unb64(vb))}`);
  });
}

// --- the worker over HTTP ----------------------------------------------------------------

test("worker: the first request waits for the initial sync; /status", { timeout: TIMEOUT }, async () => {
  const f = fx.scenarios.basic;
  const s = await status("basic");
  assert.equal(s.appliedLsn, f.expected.lsn, "appliedLsn");
  assert.equal(s.committedLsn, f.committedLsn, "committedLsn");
  assert.equal(s.datasetId, f.datasetId, "datasetId");
  assert.equal(s.epoch, f.epoch, "epoch");
  assert.equal(s.lastError, null, "lastError");
  assert.equal(typeof s.lagMs, "number", "lagMs");
  assert.equal(typeof s.lastPollAt, "number", "lastPollAt");
  assert.equal(typeof s.state, "string", "state");
  assert.ok(s.requests >= 2, `requests ${s.requests}`);
  assert.equal(s.lagLsns, 0, "lagLsns: caught up");
  // A worker's request-scoped I/O never holds a head read across requests,
  // even though walcast serve advertises long-poll.
  assert.equal(s.headReads, "polling", "headReads");
  const kinds = ["head", "longPoll", "page", "segment", "snapshot", "delta", "other"];
  assert.deepEqual(Object.keys(s.requestsByKind).sort(), [...kinds].sort(), "requestsByKind's kinds");
  assert.deepEqual(Object.keys(s.bytesByKind).sort(), [...kinds].sort(), "bytesByKind's kinds");
  assert.equal(s.requestsByKind.longPoll, 0, "no long-poll from a worker");
  assert.ok(s.requestsByKind.head >= 1, `head reads ${JSON.stringify(s.requestsByKind)}`);
  assert.equal(Object.values(s.requestsByKind).reduce((a, b) => a + b, 0), s.requests, "requestsByKind adds up to requests");
  assert.equal(Object.values(s.bytesByKind).reduce((a, b) => a + b, 0), s.bytesReceived, "bytesByKind adds up to bytesReceived");
  assert.equal(s.worker.ready, true, "worker.ready");
  assert.equal(s.worker.maxAgeMs, 0, "MAX_AGE_MS from the binding");
  const idle = await status("idle");
  assert.equal(idle.worker.maxAgeMs, 1000, "MAX_AGE_MS defaults to 1000");
  assert.equal(idle.appliedLsn, fxSlow.scenarios.basic.expected.lsn, "idle service appliedLsn");
});

test("worker: /kv of every key and of absent keys", { timeout: TIMEOUT }, async () => {
  const f = fx.scenarios.basic;
  await expectServed("basic", f.expected, "basic");
  for (const g of f.gets) {
    const k = argBytes(g.key);
    const r = await get("basic", `/kv/${pct(k)}`);
    if (g.absent) {
      assert.equal(r.status, 404, `/kv/${pct(k)} of an absent key`);
    } else {
      assert.equal(r.status, 200, `/kv/${pct(k)}`);
      assert.ok(bytesEq(r.body, unb64(g.value)), `/kv/${pct(k)} = ${show(r.body)}`);
      assert.equal(r.headers.get("content-type"), "application/octet-stream");
      assert.equal(r.headers.get("x-walcast-lsn"), String(f.expected.lsn), "x-walcast-lsn");
    }
  }
  // literal (unencoded) UTF-8 in the path, an empty value, a binary key
  const utf8 = f.expected.entries.map(([k, v]) => [Buffer.from(k, "base64"), Buffer.from(v, "base64")]).filter(([k]) => k.toString() !== k.toString("latin1") && Buffer.from(k.toString()).equals(k));
  assert.ok(utf8.length > 0, "the fixture has a non-ASCII UTF-8 key");
  for (const [k, v] of utf8) {
    const r = await get("basic", `/kv/${k.toString().replace(/[?#%]/g, encodeURIComponent)}`);
    assert.ok(bytesEq(r.body, v), `/kv/${k.toString()} (unencoded UTF-8)`);
  }
  const empty = await get("basic", "/kv/empty-value");
  assert.equal(empty.status, 200, "an empty value is 200");
  assert.equal(empty.body.length, 0, "an empty value has an empty body");
  const bin = await get("basic", "/kv/%FF%00%01");
  assert.ok(bytesEq(bin.body, Uint8Array.of(0xde, 0xad, 0xbe, 0xef)), `binary key: ${show(bin.body)}`);
});

test("worker: /scan cases (prefix, start, end, limit; text or base64)", { timeout: TIMEOUT }, async () => {
  const f = fx.scenarios.basic;
  for (const c of f.scans) {
    const q = c.name === "everything" ? "?limit=10000" : scanQuery(c);
    const r = await getJSON("basic", `/scan${q}`);
    assert.equal(r.status, 200, `/scan${q}: ${JSON.stringify(r.json)}`);
    checkRows(r.json, c.expect, `scan ${c.name} (/scan${q})`);
  }
  const dflt = await getJSON("basic", "/scan");
  assert.equal(dflt.json.length, Math.min(1000, f.expected.entries.length), "/scan without limit returns SCAN_LIMIT (1000) rows");
});

test("worker: bad requests", { timeout: TIMEOUT }, async () => {
  assert.equal((await get("basic", "/nope")).status, 404, "unknown route");
  assert.equal((await getJSON("basic", "/scan?limit=x")).status, 400, "limit=x");
  const post = await fetch(`${base("basic")}/kv/a`, { method: "POST", body: "x" });
  await post.arrayBuffer();
  assert.equal(post.status, 405, "POST");
  const unset = await getJSON("unset", "/kv/a");
  assert.equal(unset.status, 500, "no DATASET_URL");
  assert.equal(unset.json.error.code, "config");
  const missing = await getJSON("missing", "/kv/a");
  assert.equal(missing.status, 503, "a dataset that is not there: 503");
  assert.equal(missing.json.error.code, "not_found", JSON.stringify(missing.json));
  // Later requests keep answering (within FIRST_SYNC_WAIT_MS) while the dataset is missing.
  const t = Date.now();
  const again = await getJSON("missing", "/kv/a");
  assert.equal(again.status, 503, "a dataset that is not there: 503 again");
  assert.ok(Date.now() - t < 10_000, `the second request answered in ${Date.now() - t} ms`);
  const ms = await status("missing");
  assert.equal(ms.lastError?.code, "not_found", "status of a missing dataset");
  assert.equal(ms.worker.ready, false, "worker.ready of a missing dataset");
});

test("worker: a later publish is picked up in the background (midhistory)", { timeout: TIMEOUT }, async () => {
  const f0 = fx.scenarios.midhistory;
  assert.equal((await status("midhistory")).appliedLsn, f0.expected.lsn, "stage 0");
  await expectServed("midhistory", f0.expected, "midhistory stage 0");
  const before = (await status("midhistory")).requests;
  const f1 = await datasets.mutate(fx.instance, "midhistory");
  const s = await until(async () => {
    const s = await status("midhistory");
    return { done: s.appliedLsn === f1.expected.lsn, value: s };
  }, 60_000, "background sync reaches the new head");
  assert.equal(s.lastError, null);
  await expectServed("midhistory", f1.expected, "midhistory stage 1");
  const tail = f1.segments.filter((x) => x.last >= f1.tailFrom).length;
  log(`midhistory: catching up took ${s.requests - before} requests (tail: ${tail} segments), incl. idle polls`);
});

test("worker: corruption -> lastError data, the last good values still served", { timeout: TIMEOUT }, async () => {
  const f0 = fx.scenarios.corrupt;
  assert.equal((await status("corrupt")).appliedLsn, f0.expected.lsn, "stage 0");
  const f1 = await datasets.mutate(fx.instance, "corrupt");
  const s = await until(async () => {
    const s = await status("corrupt");
    return { done: s.lastError?.code === "data", value: s };
  }, 120_000, "status shows lastError.code data");
  assert.equal(s.appliedLsn, f1.goodLsn, "appliedLsn stays at the last good LSN");
  assert.equal(s.lastError.object, f1.expectError.object, `the error names the object: ${JSON.stringify(s.lastError)}`);
  assert.ok(s.lagLsns > 0 && s.lagLsns === s.committedLsn - s.appliedLsn, `lagLsns ${s.lagLsns} behind the committed LSN`);
  // The error is its code, the object and a fixed message: no URL, no error text.
  assert.ok(!JSON.stringify(s).includes("http"), `/status names no URL: ${JSON.stringify(s.lastError)}`);
  await expectServed("corrupt", f1.expected, "after the data error");
  assert.equal((await status("corrupt")).appliedLsn, f1.goodLsn, "still at the last good LSN");
});

test("worker: retention passed the replica -> it re-bootstraps by itself", { timeout: TIMEOUT }, async () => {
  const f0 = fx.scenarios.retention;
  assert.equal((await status("retention")).appliedLsn, f0.expected.lsn, "stage 0");
  const f1 = await datasets.mutate(fx.instance, "retention");
  await until(async () => {
    const s = await status("retention");
    return { done: s.appliedLsn === f1.expected.lsn && s.lastError === null, value: s };
  }, 120_000, "re-bootstrap reaches the new head");
  await expectServed("retention", f1.expected, "after re-bootstrap");
});

test("worker: a new dataset at the URL -> it starts over", { timeout: TIMEOUT }, async () => {
  const f0 = fx.scenarios.newdataset;
  const s0 = await status("newdataset");
  assert.equal(s0.appliedLsn, f0.expected.lsn, "stage 0");
  assert.equal(s0.datasetId, f0.datasetId, "stage 0 dataset");
  const oldKey = unb64(f0.expected.entries.find(([k]) => Buffer.from(k, "base64").toString().startsWith("old:"))[0]);
  assert.equal((await get("newdataset", `/kv/${pct(oldKey)}`)).status, 200, "an old: key at stage 0");
  const f1 = await datasets.mutate(fx.instance, "newdataset");
  await until(async () => {
    const s = await status("newdataset");
    return { done: s.datasetId === f1.datasetId && s.appliedLsn === f1.expected.lsn, value: s };
  }, 120_000, "the replica follows the new dataset");
  await expectServed("newdataset", f1.expected, "new dataset");
  assert.equal((await get("newdataset", `/kv/${pct(oldKey)}`)).status, 404, "the old dataset's key is gone");
});

test("worker: only the first request waits on object storage", { timeout: TIMEOUT }, async () => {
  const f0 = fxSlow.scenarios.midhistory;
  const DELAY = 400;
  proxy.delayMs = DELAY;
  let t = Date.now();
  const first = await status("slow");
  const firstMs = Date.now() - t;
  assert.equal(first.appliedLsn, f0.expected.lsn, "first request: synced");
  assert.ok(firstMs >= DELAY, `the first request waited for the initial sync (${firstMs} ms)`);

  // Publish more; every response from object storage now takes DELAY ms.
  const f1 = await datasets.mutate(fxSlow.instance, "midhistory");
  const key = f0.expected.entries[0][0];
  const times = [];
  const proxied = proxy.requests.length;
  for (let i = 0; i < 10; i++) {
    t = Date.now();
    const r = await get("slow", `/kv/${pct(unb64(key))}`);
    times.push(Date.now() - t);
    assert.equal(r.status, 200);
    await sleep(50);
  }
  const max = Math.max(...times);
  log(`slow storage (${DELAY} ms a response): the first request took ${firstMs} ms; later reads ${times.join(", ")} ms`);
  // A read that waited on object storage takes at least DELAY ms.
  assert.ok(max < DELAY, `reads after the first answered from the replica at once (max ${max} ms, storage ${DELAY} ms)`);
  assert.ok(proxy.requests.length > proxied, "background syncs went to object storage meanwhile");
  await until(async () => {
    const s = await status("slow");
    return { done: s.appliedLsn === f1.expected.lsn, value: s };
  }, 120_000, "the background syncs catch up");
  proxy.delayMs = 0;
  await expectServed("slow", f1.expected, "slow, caught up");
});

test("worker: with MAX_AGE_MS 1000, reads within a second start no sync", { timeout: TIMEOUT }, async () => {
  const s0 = await status("idle");
  const syncs = s0.worker.syncs;
  for (let i = 0; i < 5; i++) await get("idle", "/kv/user%3A0");
  const s1 = await status("idle");
  assert.ok(s1.worker.syncs - syncs <= 1, `${s1.worker.syncs - syncs} syncs for 6 requests within ~1 s`);
  await sleep(1100);
  await get("idle", "/kv/user%3A0");
  await until(async () => {
    const s = await status("idle");
    return { done: s.worker.syncs > s1.worker.syncs && !s.worker.syncing, value: s.worker };
  }, 10_000, "a request after MAX_AGE_MS starts a background sync");
});

test("worker: /scan with start after end answers 400; the replica keeps syncing", { timeout: TIMEOUT }, async () => {
  const f0 = fxMore.scenarios.midhistory;
  assert.equal((await status("scanbad")).appliedLsn, f0.expected.lsn, "stage 0");
  const bad = await getJSON("scanbad", "/scan?start=b&end=a");
  assert.equal(bad.status, 400, `/scan?start=b&end=a: ${JSON.stringify(bad.json)}`);
  assert.equal(bad.json.error.code, "invalid_input");
  assert.match(bad.json.error.message, /start/);
  const same = await getJSON("scanbad", "/scan?start=user%3A&end=user%3A");
  assert.equal(same.status, 200, "start == end");
  assert.deepEqual(same.json, [], "start == end: an empty range");
  const inPrefix = await getJSON("scanbad", "/scan?prefix=user%3A&end=a");
  assert.equal(inPrefix.status, 200, "end before the prefix");
  assert.deepEqual(inPrefix.json, [], "end before the prefix: empty");
  for (const q of ["/scan?%FF=1", "/kv?%FE%FF=a"]) {
    const r = await getJSON("scanbad", q);
    assert.equal(r.status, 400, `${q}: ${JSON.stringify(r.json)}`);
    assert.equal(r.json.error.code, "invalid_input", q);
  }
  // Later publishes are still picked up, and reads still served.
  const f1 = await datasets.mutate(fxMore.instance, "midhistory");
  const s = await until(async () => {
    const s = await status("scanbad");
    return { done: s.appliedLsn === f1.expected.lsn, value: s };
  }, 60_000, "a later publish is applied after the bad scans");
  assert.equal(s.worker.lastSyncError, null, "no sync error");
  assert.equal(s.lastError, null, "no replica error");
  await expectServed("scanbad", f1.expected, "after the bad scans");
});

test("worker TRUST: a pinned replica serves a signed dataset and /status names the signer; a wrong key, an unsigned dataset or a tampered head is untrusted", { timeout: TIMEOUT }, async () => {
  const f0 = signedFx;
  const s = await status("trusted");
  assert.equal(s.appliedLsn, f0.expected.lsn, "appliedLsn");
  assert.deepEqual(s.trust, { keys: 2, signer: f0.trustKey }, "/status trust: the pinned key count and the signer");
  assert.equal(s.lastError, null, "lastError");
  await expectServed("trusted", f0.expected, "pinned worker");
  assert.equal((await status("basic")).trust, null, "no TRUST: trust is null");
  // Refused: nothing to serve (503 with code untrusted), /status says why.
  await Promise.all(["trustwrong", "trustunsigned"].map(async (svc) => {
    const st = await until(async () => {
      const st = await status(svc);
      return { done: st.lastError?.code === "untrusted" || st.worker.lastSyncError?.code === "untrusted", value: st };
    }, 120_000, `${svc}: /status shows untrusted`);
    assert.equal(st.appliedLsn, 0, `${svc}: nothing applied`);
    assert.equal((st.lastError ?? st.worker.lastSyncError).object, "catalog/head.json", `${svc}: the error names the head`);
    const kv = await getJSON(svc, `/kv/${pct(unb64(f0.expected.entries[0][0]))}`);
    assert.equal(kv.status, 503, `${svc}: /kv before any trusted sync`);
    assert.equal(kv.json.error.code, "untrusted", `${svc}: /kv error code`);
  }));
  const bad = await getJSON("trustbad", "/status");
  assert.equal(bad.status, 500, "a malformed TRUST is a configuration error");
  assert.match(bad.json.error.message, /TRUST must be/, "the error names TRUST");
  assert.ok(!JSON.stringify(bad.json).includes("nope"), "the error does not echo the value");
  // A tampered signed head: the last good state is still served.
  const f1 = await datasets.mutate(fxMore.instance, "signed");
  const st = await until(async () => {
    const st = await status("trusted");
    return { done: st.lastError?.code === "untrusted", value: st };
  }, 120_000, "status shows lastError.code untrusted");
  assert.equal(st.lastError.object, f1.expectError.object, "the error names the head");
  assert.equal(st.appliedLsn, f1.goodLsn, "appliedLsn stays at the last good LSN");
  await expectServed("trusted", f1.expected, "after the tampered head");
});

test("worker: /status carries the replica's state and error codes only, never DATASET_URL", { timeout: TIMEOUT }, async () => {
  const hostOf = (u) => new URL(u).host;
  for (const svc of ["basic", "missing"]) {
    const r = await get(svc, "/status");
    const text = Buffer.from(r.body).toString("utf8");
    const url = services[svc].bindings.DATASET_URL;
    assert.ok(!text.includes(hostOf(url)) && !text.includes(new URL(url).pathname), `/status of ${svc} names DATASET_URL: ${text}`);
    const st = JSON.parse(text);
    assert.equal(st.worker.url, undefined, "no worker.url");
    for (const e of [st.lastError, st.worker.lastSyncError]) {
      if (e) assert.deepEqual(Object.keys(e).filter((k) => !["code", "message", "object", "lsn"].includes(k)), [], JSON.stringify(e));
    }
  }
  const missing = await getJSON("missing", "/kv/a");
  assert.equal(missing.status, 503);
  assert.equal(missing.json.error.code, "not_found");
  assert.ok(!JSON.stringify(missing.json).includes(hostOf(fx.base)), `503 names the dataset URL: ${JSON.stringify(missing.json)}`);
});

test("worker: CORS_ORIGINS echoes only listed origins, with Vary: Origin; the default is any origin", { timeout: TIMEOUT }, async () => {
  const ok = await get("cors", "/status", { headers: { origin: "https://app.example" } });
  assert.equal(ok.status, 200);
  assert.equal(ok.headers.get("access-control-allow-origin"), "https://app.example");
  assert.match(ok.headers.get("vary") ?? "", /Origin/);
  const other = await get("cors", "/kv/user%3A0", { headers: { origin: "https://evil.example" } });
  assert.equal(other.headers.get("access-control-allow-origin"), null, "an unlisted origin gets no CORS grant");
  assert.match(other.headers.get("vary") ?? "", /Origin/);
  const pre = await get("cors", "/kv/user%3A0", { method: "OPTIONS", headers: { origin: "https://admin.example", "access-control-request-method": "GET" } });
  assert.equal(pre.status, 204);
  assert.equal(pre.headers.get("access-control-allow-origin"), "https://admin.example");
  const preOther = await get("cors", "/kv/user%3A0", { method: "OPTIONS", headers: { origin: "https://evil.example", "access-control-request-method": "GET" } });
  assert.equal(preOther.headers.get("access-control-allow-origin"), null);
  const dflt = await get("basic", "/status", { headers: { origin: "https://anything.example" } });
  assert.equal(dflt.headers.get("access-control-allow-origin"), "*", "default: any origin");
});

test("worker: a head body far over 1 MiB is cut off: data error naming catalog/head.json, bounded transfer", { timeout: TIMEOUT }, async () => {
  const s = await until(async () => {
    const s = await status("hostile");
    return { done: s.lastError?.code === "data" || s.worker.lastSyncError?.code === "data", value: s };
  }, 120_000, "status shows a data error");
  const e = s.lastError?.code === "data" ? s.lastError : s.worker.lastSyncError;
  assert.equal(e.object, "catalog/head.json", JSON.stringify(s));
  assert.ok(s.bytesReceived <= s.requests * (2 ** 20 + 1), `${s.bytesReceived} body bytes in ${s.requests} requests`);
  const kv = await getJSON("hostile", "/kv/a");
  assert.equal(kv.status, 503);
  assert.equal(kv.json.error.code, "data");
  const stats = await (await fetch(`${datasets.controlUrl}/hostile-stats/${hostileToken}`)).json();
  log(`workerd hostile head: ${stats.requests} requests, at most ${stats.maxSent} bytes sent of one (offered 64 MiB)`);
  assert.ok(stats.requests >= 1);
  assert.ok(stats.maxSent <= 24 * 2 ** 20, `workerd pulled ${stats.maxSent} bytes of one response`);
});

// --- LOAD=lazy ----------------------------------------------------------------------------

/** A full-mode replica of `url` in this Node process: the answers a lazy worker must give. */
async function fullReplica(url) {
  const { Replica } = await import(path.join(DIST, "node.js"));
  const r = await Replica.open(url);
  await r.sync();
  return r;
}

/** What a lazy worker serves equals the fixture's probes and a full replica's scans. */
async function expectLazyServed(svc, f, full, label) {
  const enc = new TextEncoder();
  await pool(f.probes, 8, async (p) => {
    const k = argBytes(p.key);
    const r = await get(svc, `/kv/${pct(k)}`);
    if (p.absent) {
      assert.equal(r.status, 404, `${label}: /kv/${pct(k)} (${p.kind}, absent): ${Buffer.from(r.body).toString()}`);
    } else {
      assert.equal(r.status, 200, `${label}: /kv/${pct(k)} (${p.kind}): ${Buffer.from(r.body).toString()}`);
      assert.ok(bytesEq(r.body, unb64(p.value)), `${label}: /kv/${pct(k)} = ${show(r.body)}, expected ${show(unb64(p.value))}`);
    }
  });
  for (const c of f.scans) {
    const opts = {};
    for (const x of ["prefix", "start", "end"]) if (c[x]) opts[x] = argBytes(c[x]);
    opts.limit = c.limit ?? 1000; // the worker's SCAN_LIMIT
    const r = await getJSON(svc, `/scan${scanQuery(c)}`);
    assert.equal(r.status, 200, `${label}: /scan${scanQuery(c)}: ${JSON.stringify(r.json).slice(0, 300)}`);
    const want = opts.limit === 0 ? [] : full.scan(opts).map((e) => [Buffer.from(typeof e.key === "string" ? enc.encode(e.key) : e.key).toString("base64"), Buffer.from(e.value).toString("base64")]);
    checkRows(r.json, want, `${label}: scan ${c.name}`);
  }
}

test("worker LOAD=lazy: a new isolate answers /kv with a few block GETs, without loading the dataset", { timeout: TIMEOUT }, async () => {
  const f = fx.scenarios.lazy;
  const probe = f.probes.find((p) => p.kind === "snapshot");
  const t0 = Date.now();
  const r = await get("lazy", `/kv/${pct(argBytes(probe.key))}`);
  const ms = Date.now() - t0;
  assert.equal(r.status, 200, Buffer.from(r.body).toString());
  assert.ok(bytesEq(r.body, unb64(probe.value)), `value ${show(r.body)}`);
  assert.equal(r.headers.get("x-walcast-lsn"), String(f.expected.lsn));
  const s = await status("lazy");
  assert.equal(s.mode, "lazy", "mode");
  assert.equal(s.appliedLsn, f.expected.lsn, "appliedLsn");
  assert.equal(s.worker.ready, true, "ready");
  assert.ok(s.blocksFetched > 0 && s.cachedBytes > 0, `blocks ${s.blocksFetched}, cached ${s.cachedBytes}`);
  const tail = f.segments.filter((x) => x.last > f.snapshotInfo.lsn).length;
  log(`workerd lazy: the first /kv took ${ms} ms, ${s.requests} GETs (head + ${tail} tail segments + blocks), ${s.bytesReceived} bytes; the snapshot is ${f.snapshotInfo.size} bytes`);
  assert.ok(s.requests - (tail + 1) < 10, `${s.requests} GETs: the head, ${tail} tail segments and fewer than 10 for blocks`);
  assert.ok(s.bytesReceived < f.snapshotInfo.size / 4, `${s.bytesReceived} bytes received, not under a quarter of the ${f.snapshotInfo.size}-byte snapshot`);
});

test("worker LOAD=lazy: /kv and /scan equal a full replica's answers; later writes and a newer snapshot are picked up", { timeout: TIMEOUT }, async () => {
  const f0 = fx.scenarios.lazy;
  let full = await fullReplica(f0.url);
  try {
    await expectLazyServed("lazy", f0, full, "lazy stage 0");
    // A 64 KiB cache answers the same.
    const small = await fullReplica(fxSlow.scenarios.lazy.url);
    try {
      await expectLazyServed("lazysmall", fxSlow.scenarios.lazy, small, "lazy, CACHE_BYTES 64 KiB");
      const st = await status("lazysmall");
      assert.ok(st.cachedBytes <= 128 * 1024, `cachedBytes ${st.cachedBytes} with CACHE_BYTES 65536`);
    } finally {
      await small.close();
    }
    for (const stage of [1, 2]) {
      const f = await datasets.mutate(fx.instance, "lazy");
      await sleep(1100); // MAX_AGE_MS 1000: the next request starts a background sync
      await until(async () => {
        const s = await status("lazy");
        return { done: s.appliedLsn === f.expected.lsn, value: s };
      }, 60_000, `the lazy worker reaches stage ${stage}`);
      await full.sync();
      assert.equal(full.status().appliedLsn, f.expected.lsn);
      await expectLazyServed("lazy", f, full, `lazy stage ${stage}`);
    }
    assert.equal((await status("lazy")).lastError, null, "no error");
  } finally {
    await full.close();
  }
});

test("worker LOAD=lazy: 64 concurrent requests to a new isolate all answer right (no request waits on another's I/O)", { timeout: TIMEOUT }, async () => {
  const f = fxSlow.scenarios.lazy;
  const full = await fullReplica(f.url);
  try {
    const prefixes = ["acct:", "item:", "user:", "zone:"];
    const keys = [];
    for (let i = 0; i < 600; i++) keys.push(new TextEncoder().encode(`${prefixes[i % 4]}${String((i * 7919) % 20000).padStart(6, "0")}`));
    const bad = [];
    await pool(keys, 64, async (k) => {
      const r = await get("lazyburst", `/kv/${pct(k)}`);
      const want = full.get(k);
      if (want === undefined ? r.status !== 404 : r.status !== 200 || !bytesEq(r.body, want)) {
        bad.push(`${show(k)}: ${r.status} ${Buffer.from(r.body).toString().slice(0, 120)}`);
      }
    });
    const s = await status("lazyburst");
    log(`workerd lazy burst: ${keys.length} keys, 64 at once, CACHE_BYTES 16384: ${s.requests} GETs, ${s.blocksFetched} blocks, ${s.bytesReceived} bytes`);
    assert.deepEqual(bad.slice(0, 10), [], `${bad.length} of ${keys.length} answers wrong`);
  } finally {
    await full.close();
  }
});

test("worker LOAD=lazy: a damaged snapshot block answers 502 (data, naming the snapshot); after the repair 200", { timeout: TIMEOUT }, async () => {
  const f0 = fxMore.scenarios.lazydamage;
  const value = (f, k) => unb64(f.probes.find((p) => bytesEq(argBytes(p.key), argBytes(k))).value);
  const far = await get("lazydamage", `/kv/${pct(argBytes(f0.farKey))}`);
  assert.equal(far.status, 200, "stage 0");
  const f1 = await datasets.mutate(fxMore.instance, "lazydamage");
  const bad = await getJSON("lazydamage", `/kv/${pct(argBytes(f1.damagedKey))}`);
  assert.equal(bad.status, 502, JSON.stringify(bad.json));
  assert.equal(bad.json.error.code, "data");
  assert.equal(bad.json.error.object, f1.snapshot);
  const scan = await getJSON("lazydamage", "/scan?prefix=d%3A0015");
  assert.equal(scan.status, 502, `a scan across the damaged block: ${JSON.stringify(scan.json)}`);
  const other = await get("lazydamage", `/kv/${pct(argBytes(f1.farKey))}`);
  assert.equal(other.status, 200, "a key in another block");
  assert.ok(bytesEq(other.body, value(f1, f1.farKey)));
  const s = await status("lazydamage");
  assert.equal(s.lastError?.code, "data");
  assert.equal(s.lastError?.object, f1.snapshot);
  const f2 = await datasets.mutate(fxMore.instance, "lazydamage");
  const good = await get("lazydamage", `/kv/${pct(argBytes(f2.damagedKey))}`);
  assert.equal(good.status, 200, "after the repair");
  assert.ok(bytesEq(good.body, value(f2, f2.damagedKey)));
});

// --- the conformance suite inside workerd -----------------------------------------------

test("conformance in workerd", { timeout: 30 * 60_000 }, async (t) => {
  const r = await getJSON("conformance", "/cases");
  assert.equal(r.status, 200, JSON.stringify(r.json));
  const names = r.json;
  assert.ok(names.length > 10, `${names.length} cases`);
  for (let i = 0; i < names.length; i++) {
    await t.test(names[i], { timeout: TIMEOUT }, async () => {
      const res = await getJSON("conformance", `/run?case=${i}`);
      for (const l of res.json.logs ?? []) log(`workerd conformance: ${l}`);
      if (!res.json.ok) assert.fail(`${res.json.name}: ${res.json.error}`);
    });
  }
});

test("worker: min_lsn beyond the head answers 503 with Retry-After after MIN_LSN_WAIT_MS; concurrent waits share one sync loop; malformed or huge values are 400", { timeout: TIMEOUT }, async () => {
  const want = minLsnFx.expected.lsn;
  const upstream = new URL(fxMore.base).origin;
  assert.equal(new URL(fx.base).origin, upstream, "the counting proxy reaches fxMore's datasets");
  // Applied already: at once, with the LSN it was read at.
  let r = await get("minlsn", `/scan?limit=1&min_lsn=${want}`);
  assert.equal(r.status, 200, Buffer.from(r.body).toString());
  assert.equal(r.headers.get("walcast-lsn"), String(want));
  // Malformed or out of range (more than 15 digits): 400 at once, never a wait.
  const bad = ["x", "-1", "1.5", "1e3", "0x10", "+5", "", "%20", "١٢", "9".repeat(16), "18446744073709551616", "9".repeat(4000)];
  for (const v of bad) {
    r = await get("minlsn", `/kv/a?min_lsn=${v}`);
    assert.equal(r.status, 400, `min_lsn=${v.slice(0, 40)}`);
    assert.equal(r.headers.get("walcast-lsn"), String(want), "a 400 carries the LSN");
    if (!/^[\x21-\x7e]+$/.test(v)) continue; // not a header value
    r = await get("minlsn", "/scan", { headers: { "walcast-min-lsn": v } });
    assert.equal(r.status, 400, `Walcast-Min-Lsn: ${v.slice(0, 40)}`);
  }
  // Far beyond anything published, 8 requests at once (query and header, /kv
  // and /scan): each answers 503 with Retry-After, not before the wait, and
  // the worker's GETs meanwhile are one shared loop's (a sync, a pause), not
  // one loop per request.
  const far = "999999999999999";
  const heads = () => proxy.requests.filter((q) => q.url.startsWith(`${minLsnPath}/catalog/head.json`)).length;
  const h0 = heads();
  const s0 = await status("minlsn");
  const n = 8;
  const t0 = performance.now();
  const answers = await Promise.all(
    Array.from({ length: n }, (_, i) =>
      i % 2 ? get("minlsn", `/kv/a?min_lsn=${far}`) : get("minlsn", "/scan?limit=1", { headers: { "Walcast-Min-Lsn": far } }),
    ),
  );
  const took = performance.now() - t0;
  for (const a of answers) {
    assert.equal(a.status, 503);
    assert.match(a.headers.get("retry-after") ?? "", /^\d+$/);
    assert.equal(a.headers.get("walcast-lsn"), String(want));
    const body = JSON.parse(Buffer.from(a.body).toString());
    assert.equal(body.error.code, "not_applied");
    assert.equal(body.error.lsn, Number(far));
  }
  assert.ok(took >= MIN_LSN_WAIT_MS - 5, `answered after ${took.toFixed(0)} ms, before MIN_LSN_WAIT_MS (${MIN_LSN_WAIT_MS})`);
  const s1 = await status("minlsn");
  const syncs = s1.worker.syncs - s0.worker.syncs;
  const gets = heads() - h0;
  // One loop: a sync, then at least 100 ms before the next (plus one in flight at each end).
  const oneLoop = Math.ceil(took / 100) + 2;
  log(`min_lsn: ${n} requests waited ${took.toFixed(0)} ms: ${syncs} syncs, ${gets} head GETs (one loop allows ${oneLoop})`);
  assert.ok(syncs >= 1, "the wait asked the store again");
  assert.ok(syncs <= oneLoop, `${syncs} syncs for ${n} concurrent waits (one loop: at most ${oneLoop})`);
  assert.ok(gets <= oneLoop, `${gets} head GETs for ${n} concurrent waits (one loop: at most ${oneLoop})`);
  assert.equal(s1.appliedLsn, want, "nothing applied that was never published");
});

// --- worker/wrangler.toml ---------------------------------------------------------------

test("wrangler: worker/wrangler.toml builds (deploy --dry-run) and the bundle serves in workerd", { timeout: TIMEOUT, skip: bundle ? false : "no wrangler" }, async () => {
  assert.ok(bundle.ok, `wrangler deploy --dry-run exited ${bundle.status}, wrote ${bundle.files.join(", ")}:\n${bundle.output}`);
  const f = fxSlow.scenarios.newdataset;
  const s = await status("bundled");
  assert.equal(s.appliedLsn, f.expected.lsn, "appliedLsn");
  assert.equal(s.worker.maxAgeMs, 1000, "MAX_AGE_MS default");
  await expectServed("bundled", f.expected, "bundled worker");
  log(`wrangler bundle: ${bundle.files.map((x) => `${x} ${fs.statSync(path.join(bundle.out, x)).size} B`).join(", ")}`);
});

// --- worker/deno.js: the same handler under Deno.serve ------------------------------------

test("deno: worker/deno.js serves /status, /kv and /scan from its replica", { timeout: TIMEOUT, skip: haveDeno ? false : "no deno" }, async () => {
  const f = fxDeno.scenarios.basic;
  const s = await status("deno-basic");
  assert.equal(s.appliedLsn, f.expected.lsn, "appliedLsn");
  assert.equal(s.datasetId, f.datasetId, "datasetId");
  assert.equal(s.worker.ready, true, "worker.ready");
  await expectServed("deno-basic", f.expected, "deno basic");
  for (const c of f.scans) {
    const q = c.name === "everything" ? "?limit=10000" : scanQuery(c);
    const r = await getJSON("deno-basic", `/scan${q}`);
    assert.equal(r.status, 200, `/scan${q}: ${JSON.stringify(r.json)}`);
    checkRows(r.json, c.expect, `deno scan ${c.name}`);
  }
  assert.equal((await get("deno-basic", "/kv/never-written")).status, 404, "absent key");
});

test("deno: a later publish is picked up in the background", { timeout: TIMEOUT, skip: haveDeno ? false : "no deno" }, async () => {
  const f0 = fxDeno.scenarios.midhistory;
  assert.equal((await status("deno-midhistory")).appliedLsn, f0.expected.lsn, "stage 0");
  const f1 = await datasets.mutate(fxDeno.instance, "midhistory");
  await until(async () => {
    const s = await status("deno-midhistory");
    return { done: s.appliedLsn === f1.expected.lsn, value: s };
  }, 60_000, "background sync reaches the new head");
  await expectServed("deno-midhistory", f1.expected, "deno midhistory stage 1");
});

test("deno: worker/deno.js with LOAD=lazy serves /kv and /scan from snapshot blocks", { timeout: TIMEOUT, skip: haveDeno ? false : "no deno" }, async () => {
  const f = fxDeno.scenarios.lazy;
  const full = await fullReplica(f.url);
  try {
    await expectLazyServed("deno-lazy", f, full, "deno lazy");
  } finally {
    await full.close();
  }
  const s = await status("deno-lazy");
  assert.equal(s.mode, "lazy");
  assert.ok(s.blocksFetched > 0, `blocksFetched ${s.blocksFetched}`);
  log(`deno lazy: ${s.requests} GETs, ${s.bytesReceived} bytes for ${f.probes.length} keys and ${f.scans.length} scans; the snapshot is ${f.snapshotInfo.size} bytes`);
});
