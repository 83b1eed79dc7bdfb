// A private R2 bucket read through its binding, and the worker's access
// tokens (AUTH_KEY). The Worker (worker/src/*,
// the built package) runs in miniflare (workerd inside, R2 simulated on
// disk under a temp dir) with the bucket bound as BUCKET and no DATASET_URL.
// A dataset written by the native binary is put into the bucket object by
// object; the worker must serve it in full and lazy mode, follow new
// commits, and the R2 fetch adapter must answer Range and If-None-Match as
// an HTTP server would. A worker with AUTH_KEY answers 401 on every route
// for a missing, malformed, wrongly signed, expired or wrong-prefix token,
// and serves with a token of `walcast token` in the header or the query.
//
//   node --test tests/js/workerd/r2.test.mjs
//
// Needs: js/dist (scripts/build-js.sh), miniflare (scripts/browser-deps.sh),
// target/debug/walcast (built when missing).
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";
import { after, before, test } from "node:test";
import { walcastBin } from "../datasets.mjs";
import { DIST, EDGE_MODULES, REPO, distReady, makeTmp, workerSources } from "../edge/lib.mjs";

if (!distReady()) throw new Error("js/dist is missing: run bash scripts/build-js.sh");
const { Miniflare } = await import(pathToFileURL(path.join(EDGE_MODULES, "miniflare", "dist", "src", "index.js")).href);

const tmp = makeTmp("walcast-r2-");
const bin = walcastBin();
const wal = path.join(tmp, "wal");
const ds = path.join(tmp, "ds");

function run(args, input) {
  const r = spawnSync(bin, args, { input, encoding: "utf8", timeout: 120_000 });
  if (r.status !== 0) throw new Error(`walcast ${args.join(" ")}: ${r.stderr}`);
  return r.stdout;
}

/** Writes `n` keys `key:<i>` (value `v<round>-<i>`) and publishes them. */
function writeRound(round, n, flags) {
  const lines = [];
  for (let i = 0; i < n; i++) lines.push(JSON.stringify({ op: "put", key: `key:${String(i).padStart(5, "0")}`, value: `v${round}-${i}` }));
  run(["write", "--wal", wal], lines.join("\n") + "\n");
  fs.mkdirSync(ds, { recursive: true });
  run(["publish", "--wal", wal, "--to", pathToFileURL(ds).href, "--once", ...flags]);
}

function walk(dir, base = dir, out = []) {
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) walk(p, base, out);
    else if (!e.name.startsWith(".")) out.push(path.relative(base, p).split(path.sep).join("/"));
  }
  return out;
}

/** Copies the dataset dir into the bucket under `prefix` (the head last, as a publisher commits). */
async function upload(bucket, prefix) {
  const keys = walk(ds).sort((a, b) => (a === "catalog/head.json") - (b === "catalog/head.json"));
  for (const k of keys) await bucket.put(`${prefix}${k}`, Uint8Array.from(fs.readFileSync(path.join(ds, k))).buffer);
  return keys.length;
}

// The package's modules as the worker imports them ("walcast" is the workerd entry).
function modules() {
  const mods = [
    // The worker's modules, its entry first.
    ...workerSources().map((f) => ({
      type: "ESModule",
      path: path.join(tmp, "src", f),
      contents: fs.readFileSync(path.join(REPO, "worker/src", f), "utf8"),
    })),
    { type: "ESModule", path: path.join(tmp, "src", "walcast"), contents: fs.readFileSync(path.join(DIST, "workerd.js"), "utf8") },
  ];
  for (const f of fs.readdirSync(DIST)) {
    if (f.endsWith(".js") && !["node.js", "web.js", "workerd.js"].includes(f)) {
      mods.push({ type: "ESModule", path: path.join(tmp, "src", f), contents: fs.readFileSync(path.join(DIST, f), "utf8") });
    }
  }
  const wasmDir = path.join(DIST, "wasm");
  for (const f of fs.readdirSync(wasmDir)) {
    const p = path.join(tmp, "src", "wasm", f);
    if (f.endsWith(".wasm")) mods.push({ type: "CompiledWasm", path: p, contents: fs.readFileSync(path.join(wasmDir, f)) });
    else if (f.endsWith(".js")) mods.push({ type: "ESModule", path: p, contents: fs.readFileSync(path.join(wasmDir, f), "utf8") });
  }
  return mods;
}

let mf;
let bucket;
const URLS = {};

// Keys and tokens of the real CLI (walcast keygen / walcast token).
const keyFile = path.join(tmp, "auth.key");
const otherKeyFile = path.join(tmp, "other.key");
const authKey = run(["keygen", "--out", keyFile]).trim();
const otherKey = run(["keygen", "--out", otherKeyFile]).trim();
const thirdKeyFile = path.join(tmp, "third.key");
run(["keygen", "--out", thirdKeyFile]);
// (`prefix` null: a token for every dataset, `--all`.)
const cliToken = (file, prefix, ttl = "1h") =>
  run(["token", "--key", file, ...(prefix === null ? ["--all"] : ["--prefix", prefix]), "--ttl", ttl]).trim();

/** Signs claims as `walcast token` does, with the seed in `file` (WebCrypto, PKCS#8 of the seed). */
async function signToken(file, claims) {
  const seed = Buffer.from(fs.readFileSync(file, "utf8").trim().replace(/^walcast-ed25519-secret:/, ""), "base64");
  const pkcs8 = Buffer.concat([Buffer.from("302e020100300506032b657004220420", "hex"), seed]);
  const key = await crypto.subtle.importKey("pkcs8", pkcs8, { name: "Ed25519" }, false, ["sign"]);
  const body = Buffer.from(JSON.stringify(claims)).toString("base64url");
  const msg = Buffer.concat([Buffer.from("walcast-token-v1\0"), Buffer.from(body)]);
  const sig = Buffer.from(await crypto.subtle.sign({ name: "Ed25519" }, key, msg)).toString("base64url");
  return `wct1.${body}.${sig}`;
}

before(async () => {
  writeRound(1, 300, ["--segment-bytes", "4096", "--snapshot-every", "200"]);
  const mods = modules();
  const worker = (name, bindings) => ({
    name,
    modules: mods,
    modulesRoot: path.join(tmp, "src"),
    compatibilityDate: "2025-11-01",
    bindings: { MAX_AGE_MS: "0", ...bindings },
    r2Buckets: { BUCKET: "walcast-private" },
    routes: [`${name}.test/*`],
  });
  // A worker with no binding at all shares nothing: DATASET_URL unset is a config error.
  mf = new Miniflare({
    workers: [
      worker("full", { DATASET_PREFIX: "app" }),
      worker("lazy", { DATASET_PREFIX: "app/", LOAD: "lazy", CACHE_BYTES: "16384" }),
      worker("auth", { DATASET_PREFIX: "app", AUTH_KEY: `${otherKey}, ${authKey}` }),
      { name: "unbound", modules: mods, modulesRoot: path.join(tmp, "src"), compatibilityDate: "2025-11-01", routes: ["unbound.test/*"] },
    ],
    r2Persist: path.join(tmp, "r2"),
  });
  await mf.ready;
  bucket = await mf.getR2Bucket("BUCKET", "full");
  await upload(bucket, "app/");
  for (const n of ["full", "lazy", "unbound", "auth"]) URLS[n] = `http://${n}.test`;
});

after(async () => {
  await mf?.dispose();
  fs.rmSync(tmp, { recursive: true, force: true });
});

async function get(worker, p, headers = {}) {
  const res = await mf.dispatchFetch(`${URLS[worker]}${p}`, { headers });
  const body = await res.text();
  return { status: res.status, body, lsn: res.headers.get("x-walcast-lsn"), headers: res.headers };
}

test("full mode: the worker reads the private bucket through BUCKET", async () => {
  const a = await get("full", "/kv/key:00007");
  assert.equal(a.status, 200, a.body);
  assert.equal(a.body, "v1-7");
  assert.equal(a.lsn, "300");
  const s = await get("full", "/scan?prefix=key:0029&limit=20");
  assert.equal(s.status, 200, s.body);
  assert.deepEqual(JSON.parse(s.body).map((r) => r.value), Array.from({ length: 10 }, (_, i) => `v1-${290 + i}`));
  const st = JSON.parse((await get("full", "/status")).body);
  assert.equal(st.appliedLsn, 300);
  assert.ok(!JSON.stringify(st).includes("r2.invalid"), "status names no dataset URL");
});

test("lazy mode: snapshot blocks come through the binding with ranges", async () => {
  const a = await get("lazy", "/kv/key:00150");
  assert.equal(a.status, 200, a.body);
  assert.equal(a.body, "v1-150");
  const s = await get("lazy", "/scan?start=key:00100&limit=150");
  assert.equal(s.status, 200, s.body);
  const rows = JSON.parse(s.body);
  assert.equal(rows.length, 150);
  assert.equal(rows[149].value, "v1-249");
  const st = JSON.parse((await get("lazy", "/status")).body);
  assert.equal(st.mode, "lazy");
  assert.ok(st.blocksFetched > 0, `blocks fetched: ${st.blocksFetched}`);
});

test("new commits in the bucket reach both workers", async () => {
  writeRound(2, 50, ["--segment-bytes", "4096", "--snapshot-every", "0"]);
  await upload(bucket, "app/");
  for (const w of ["full", "lazy"]) {
    let a;
    for (let i = 0; i < 100; i++) {
      a = await get(w, "/kv/key:00003");
      if (a.body === "v2-3") break;
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal(a.body, "v2-3", `${w}: ${a.body}`);
    assert.equal((await get(w, "/kv/key:00200")).body, "v1-200", w);
  }
});

test("no BUCKET and no DATASET_URL: a configuration error naming both", async () => {
  const r = await get("unbound", "/kv/x");
  assert.equal(r.status, 500);
  assert.match(r.body, /DATASET_URL is not set \(or bind an R2 bucket as BUCKET\)/);
});

test("r2Fetch answers Range, If-None-Match and missing keys like an HTTP server", async () => {
  // Run inside the runtime: a worker that exercises the adapter on its own binding.
  const probe = new Miniflare({
    modules: [
      { type: "ESModule", path: path.join(tmp, "p", "main.js"), contents: PROBE },
      { type: "ESModule", path: path.join(tmp, "p", "r2.js"), contents: fs.readFileSync(path.join(REPO, "worker/src/r2.js"), "utf8") },
    ],
    modulesRoot: path.join(tmp, "p"),
    compatibilityDate: "2025-11-01",
    r2Buckets: ["BUCKET"],
  });
  try {
    const res = await probe.dispatchFetch("http://probe.test/");
    const out = await res.json();
    assert.deepEqual(out, {
      whole: [200, "0123456789", '"etag"', "10"],
      bounded: [206, "234", "bytes 2-4/10"],
      open: [206, "789", "bytes 7-9/10"],
      suffix: [206, "6789", "bytes 6-9/10"],
      clipped: [206, "89", "bytes 8-9/10"],
      bigSuffix: [206, "0123456789", "bytes 0-9/10"],
      past: [416, "", "bytes */10"],
      bad: [416, "", null],
      notModified: [304, ""],
      modified: [200, "0123456789"],
      missing: [404, ""],
      post: [405],
      encoded: [200, "x"],
    });
  } finally {
    await probe.dispose();
  }
});

test("r2Fetch labels an answer with the range R2 says it sent, not the one asked for", async () => {
  const { r2Fetch } = await import(pathToFileURL(path.join(REPO, "worker/src/r2.js")).href);
  const data = new TextEncoder().encode("0123456789");
  // A store answering bytes 0-2 whatever range it is asked for.
  const bucket = {
    head: async () => ({ size: 10, etag: "e" }),
    get: async () => ({ body: new Response(data.slice(0, 3)).body, size: 10, etag: "e", range: { offset: 0, length: 3 } }),
  };
  const res = await r2Fetch(bucket)("https://r2.invalid/obj", { headers: { range: "bytes=5-7" } });
  assert.equal(res.status, 206);
  assert.equal(res.headers.get("content-range"), "bytes 0-2/10");
});

const PROBE = `
import { r2Fetch } from "./r2.js";
export default {
  async fetch(request, env) {
    await env.BUCKET.put("d/obj", "0123456789");
    await env.BUCKET.put("d/a b", "x");
    const f = r2Fetch(env.BUCKET);
    const u = "https://r2.invalid/d/obj";
    const etag = (await env.BUCKET.head("d/obj")).httpEtag;
    const t = async (res, ...hs) => [res.status, ...(res.status === 405 ? [] : [await res.text()]), ...hs.map((h) => res.headers.get(h))];
    const out = {};
    const whole = await f(u, { headers: {} });
    out.whole = await t(whole, "content-length");
    out.whole.splice(2, 0, whole.headers.get("etag") === etag ? '"etag"' : whole.headers.get("etag"));
    out.bounded = await t(await f(u, { headers: { range: "bytes=2-4" } }), "content-range");
    out.open = await t(await f(u, { headers: { range: "bytes=7-" } }), "content-range");
    out.suffix = await t(await f(u, { headers: { range: "bytes=-4" } }), "content-range");
    out.clipped = await t(await f(u, { headers: { range: "bytes=8-100" } }), "content-range");
    out.bigSuffix = await t(await f(u, { headers: { range: "bytes=-40" } }), "content-range");
    out.past = await t(await f(u, { headers: { range: "bytes=10-20" } }), "content-range");
    out.bad = await t(await f(u, { headers: { range: "bytes=1-2,4-5" } }), "content-range");
    out.notModified = await t(await f(u, { headers: { "if-none-match": etag } }));
    out.modified = await t(await f(u, { headers: { "if-none-match": '"nope"' } }));
    out.missing = await t(await f("https://r2.invalid/d/none", { headers: {} }));
    out.post = await t(await f(u, { method: "POST", headers: {} }));
    out.encoded = await t(await f("https://r2.invalid/d/a%20b", { headers: {} }));
    return Response.json(out);
  },
};
`;

test("AUTH_KEY: every route needs a valid token; each refusal is 401 with its reason", async () => {
  const now = Math.floor(Date.now() / 1000);
  const good = cliToken(keyFile, "app");
  const cases = [
    ["missing", {}],
    ["malformed", { authorization: "Bearer nope" }],
    ["malformed", { authorization: `Bearer ${good.slice(0, -3)}.x` }],
    ["bad_signature", { authorization: `Bearer ${cliToken(thirdKeyFile, "app")}` }],
    ["expired", { authorization: `Bearer ${await signToken(keyFile, { scope: "read", prefix: "app", iat: now - 7200, exp: now - 3600 })}` }],
    ["wrong_prefix", { authorization: `Bearer ${cliToken(keyFile, "apple")}` }],
    ["wrong_prefix", { authorization: `Bearer ${cliToken(keyFile, "app/sub")}` }],
    ["malformed", { authorization: `Bearer ${await signToken(keyFile, { scope: "write", prefix: "app", iat: now, exp: now + 60 })}` }],
  ];
  for (const route of ["/kv/key:00001", "/scan?limit=2", "/status", "/nope"]) {
    for (const [why, headers] of cases) {
      const r = await get("auth", route, headers);
      assert.equal(r.status, 401, `${route} ${why}: ${r.body}`);
      assert.equal(JSON.parse(r.body).error.code, "unauthorized");
      assert.match(r.headers.get("www-authenticate"), new RegExp(`error_description="${why}"`), `${route} ${why}`);
      assert.equal(r.headers.get("cache-control"), "no-store");
      assert.ok(!r.body.includes("wct1."), "no token echoed");
    }
  }
  // A token of either key (rotation), in the header or the query; one of --all covers every prefix.
  const other = cliToken(otherKeyFile, null);
  for (const [how, p, headers] of [
    ["header", "/kv/key:00001", { authorization: `Bearer ${good}` }],
    ["query", `/kv/key:00001?token=${good}`, {}],
    ["other key", "/kv/key:00001", { authorization: `Bearer ${other}` }],
    ["scan", `/scan?prefix=key:0000&limit=3&token=${good}`, {}],
    ["status", "/status", { authorization: `bearer ${good}` }],
  ]) {
    const r = await get("auth", p, headers);
    assert.equal(r.status, 200, `${how}: ${r.body}`);
  }
  assert.equal((await get("auth", `/kv/key:00001?token=${good}`)).body.startsWith("v"), true);
  // No wildcard CORS with AUTH_KEY and no CORS_ORIGINS.
  const r = await get("auth", "/status", { authorization: `Bearer ${good}`, origin: "https://app.example" });
  assert.equal(r.headers.get("access-control-allow-origin"), null);
});

test("the worker's WebCrypto verifier accepts the golden token of walcast_core::token", async () => {
  const { importKeys, verifyToken } = await import(pathToFileURL(path.join(REPO, "worker/src/auth.js")).href);
  const [pub, token] = fs.readFileSync(path.join(REPO, "crates/walcast-core/tests/golden/token.txt"), "utf8").trim().split("\n");
  const keys = await importKeys(pub);
  assert.deepEqual(await verifyToken(token, keys, 4599, "app"), { ok: true, claims: { scope: "read", prefix: "app", iat: 1000, exp: 4600 } });
  assert.deepEqual(await verifyToken(token, keys, 4600, "app"), { ok: false, reason: "expired" });
  // Issued (iat 1000) more than 300 s after the verifier's clock, as the core refuses it.
  assert.deepEqual(await verifyToken(token, keys, 699, "app"), { ok: false, reason: "not_yet_valid" });
  assert.equal((await verifyToken(token, keys, 700, "app")).ok, true);
  assert.deepEqual(await verifyToken(token, keys, 4599, "apple"), { ok: false, reason: "wrong_prefix" });
  assert.deepEqual(await verifyToken(token.replace("wct1.e", "wct1.f"), keys, 4599, "app"), { ok: false, reason: "bad_signature" });
  // The signature spelled with bits set past its last byte (base64 that
  // decodes to the same bytes): not canonical, refused as the core does.
  const abc = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  const last = token[token.length - 1];
  const respelled = token.slice(0, -1) + abc[abc.indexOf(last) | 1];
  assert.notEqual(respelled, token);
  assert.deepEqual(await verifyToken(respelled, keys, 4599, "app"), { ok: false, reason: "malformed" });
});
