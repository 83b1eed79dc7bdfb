// Servers' answers the JS driver must not take at their word:
// `node --test tests/js/answers.test.mjs`.
// - With `headers` set (an API key, a CDN's access secret), the replica
//   follows a redirect only within the dataset's origin, as the native
//   replica does: a hostile or misconfigured server's Location never
//   receives them.
// - A 206 that does not say which part it is fails as the native drivers
//   fail it; a 401 says why the token was refused (WWW-Authenticate).
// - A wasm module whose download stalls fails the load after its deadline.
// - A head stored gzip-compressed (`--head-encoding gzip`) is read whether
//   the server labels it (Content-Encoding: gzip) or sends it as stored, in
//   full and lazy mode; one that decodes past the head's 1 MiB bound, or has
//   bytes after its stream, is a data error naming the head.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import http from "node:http";
import { tmpdir } from "node:os";
import path from "node:path";
import { after, test } from "node:test";
import { pathToFileURL } from "node:url";
import zlib from "node:zlib";
import { walcastBin } from "./datasets.mjs";

const { Replica } = await import("walcast");
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const secrets = { "x-api-key": "secret-api-key", authorization: "Bearer secret-token" };

function listen(handler) {
  const server = http.createServer(handler);
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server)));
}

/** Syncs once (at most `ms`), and returns the replica's last error. */
async function syncOnce(r, ms = 3000) {
  const e = await Promise.race([r.sync().then(() => null, (e) => e), sleep(ms).then(() => null)]);
  return e ?? r.status().lastError;
}

test("a redirect to another origin is not followed, and that origin receives nothing", async () => {
  const seen = [];
  const other = await listen((req, res) => {
    seen.push({ url: req.url, headers: req.headers });
    res.writeHead(404).end();
  });
  const otherOrigin = `http://127.0.0.1:${other.address().port}`;
  const origin = await listen((req, res) => res.writeHead(302, { location: otherOrigin + req.url }).end());
  try {
    const r = await Replica.open(`http://127.0.0.1:${origin.address().port}/app`, { headers: secrets });
    const err = await syncOnce(r);
    await r.close().catch(() => {});
    assert.deepEqual(seen, [], `the other origin (${otherOrigin}) was sent requests`);
    assert.ok(err, "the sync reports an error");
    assert.match(String(err.message), /another origin/, `the error says why: ${err.message}`);
  } finally {
    origin.close();
    other.close();
  }
});

test("a refused token's reason (WWW-Authenticate) is in the error", async () => {
  const origin = await listen((req, res) =>
    res.writeHead(401, { "www-authenticate": 'Bearer realm="walcast", error="invalid_token", error_description="expired"' }).end());
  try {
    const r = await Replica.open(`http://127.0.0.1:${origin.address().port}/app`);
    const err = await syncOnce(r);
    await r.close().catch(() => {});
    assert.ok(err, "the sync reports an error");
    assert.match(String(err.message), /HTTP 401 \(expired\)/, err.message);
  } finally {
    origin.close();
  }
});

test("a redirect within the origin is followed, with the caller's headers", async () => {
  const seen = [];
  const origin = await listen((req, res) => {
    seen.push({ url: req.url, key: req.headers["x-api-key"] });
    if (req.url.startsWith("/old/")) res.writeHead(301, { location: req.url.replace("/old/", "/new/") }).end();
    else res.writeHead(404).end();
  });
  try {
    const r = await Replica.open(`http://127.0.0.1:${origin.address().port}/old`, { headers: secrets });
    await syncOnce(r);
    await r.close().catch(() => {});
    assert.ok(
      seen.some((s) => s.url === "/new/catalog/head.json" && s.key === secrets["x-api-key"]),
      `the redirect was followed with the headers: ${JSON.stringify(seen)}`,
    );
  } finally {
    origin.close();
  }
});

test("a redirect loop within the origin ends with an error", async () => {
  let hits = 0;
  const origin = await listen((req, res) => {
    hits++;
    res.writeHead(302, { location: req.url }).end();
  });
  try {
    const r = await Replica.open(`http://127.0.0.1:${origin.address().port}/app`, { headers: secrets });
    const err = await syncOnce(r);
    await r.close().catch(() => {});
    assert.ok(err, "the sync reports an error");
    assert.match(String(err.message), /more than 5 redirects/, `${err.message}`);
    assert.ok(hits < 100, `${hits} requests`);
  } finally {
    origin.close();
  }
});

test("a failed GET's error names the object, never the dataset URL's credentials or token", async () => {
  const origin = await listen((req, res) => res.writeHead(302, { location: "http://[" }).end());
  try {
    const port = origin.address().port;
    // The runtime's own error quotes the URL (Node refuses credentials in
    // one; Deno names the base of a Location it cannot parse).
    for (const [url, opts] of [
      [`http://user:s3cret@127.0.0.1:${port}/app?token=SECRET-TOKEN`, {}],
      [`http://127.0.0.1:${port}/app?token=SECRET-TOKEN`, { headers: secrets }],
    ]) {
      const r = await Replica.open(url, opts);
      const err = await syncOnce(r);
      const last = r.status().lastError;
      await r.close().catch(() => {});
      assert.ok(err, `${url}: the sync reports an error`);
      for (const text of [String(err.message), JSON.stringify(last)]) {
        assert.doesNotMatch(text, /s3cret|SECRET-TOKEN/, text);
        assert.match(text, /catalog\/head\.json/, text);
      }
    }
  } finally {
    origin.close();
  }
});

test("a 206 without a Content-Range is a failure naming the header, not a whole object", async () => {
  // A head the replica would accept as a whole answer (an empty dataset's).
  const origin = await listen((req, res) => res.writeHead(206, { "content-type": "application/json" }).end("{}"));
  try {
    const r = await Replica.open(`http://127.0.0.1:${origin.address().port}/app`);
    const err = await syncOnce(r);
    await r.close().catch(() => {});
    assert.ok(err, "the sync reports an error");
    assert.equal(err.code, "unavailable", `${err.code}: ${err.message}`);
    assert.match(String(err.message), /206 answer without a valid Content-Range/, `${err.message}`);
  } finally {
    origin.close();
  }
});

// --- heads stored gzip-compressed ----------------------------------------------------

const tmp = fs.mkdtempSync(path.join(tmpdir(), "walcast-answers-"));
after(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** 2,000 keys, a block-indexed snapshot at LSN 20 and a tail, published with gzip heads. */
function gzipDataset() {
  const bin = walcastBin();
  const wal = path.join(tmp, "wal");
  const dir = path.join(tmp, "ds");
  const lines = [];
  for (let b = 0; b < 24; b++) {
    const ops = [];
    for (let i = 0; i < 100; i++) ops.push({ op: "put", key: `g:${String((b * 100 + i) % 2000).padStart(5, "0")}`, value: `v${b}-${i}` });
    lines.push(JSON.stringify({ batch: ops }));
  }
  execFileSync(bin, ["write", "--wal", wal], { input: lines.join("\n") + "\n", stdio: ["pipe", "pipe", "pipe"] });
  const to = pathToFileURL(dir).href;
  execFileSync(bin, ["publish", "--wal", wal, "--to", to, "--once", "--snapshot-every", "20", "--head-encoding", "gzip"], { stdio: ["pipe", "pipe", "pipe"] });
  const stored = fs.readFileSync(path.join(dir, "catalog/head.json"));
  assert.deepEqual([...stored.subarray(0, 2)], [0x1f, 0x8b], "the head is stored as gzip");
  const head = JSON.parse(zlib.gunzipSync(stored).toString("utf8"));
  assert.equal(head.committed_lsn, 24);
  assert.ok(head.snapshot && head.snapshot.version >= 2, JSON.stringify(head.snapshot));
  return dir;
}
const gzDir = gzipDataset();

/** Serves `dir` with Range; the head's answer is `head(stored)` ({ body, headers }) when given. */
async function staticOrigin(dir, head) {
  const server = await listen((req, res) => {
    const key = decodeURIComponent(new URL(req.url, "http://x").pathname.replace(/^\/ds\//, ""));
    const file = path.join(dir, key);
    if (!fs.existsSync(file)) return res.writeHead(404).end();
    let data = fs.readFileSync(file);
    const h = { etag: `"${data.length}"` };
    if (key === "catalog/head.json" && head) {
      const a = head(data);
      data = a.body;
      Object.assign(h, a.headers ?? {});
    }
    const m = /^bytes=(\d*)-(\d*)$/.exec(req.headers.range ?? "");
    if (!m) return res.writeHead(200, h).end(data);
    const s = m[1] === "" ? Math.max(0, data.length - Number(m[2])) : Number(m[1]);
    const e = m[1] === "" || m[2] === "" ? data.length : Math.min(data.length, Number(m[2]) + 1);
    res.writeHead(206, { ...h, "content-range": `bytes ${s}-${e - 1}/${data.length}` }).end(data.subarray(s, e));
  });
  after(() => server.close());
  return `http://127.0.0.1:${server.address().port}/ds`;
}

for (const [label, head] of [
  ["sent as stored", null],
  ["labelled Content-Encoding: gzip", (b) => ({ body: b, headers: { "content-encoding": "gzip" } })],
]) {
  test(`a gzip head ${label} is read in full and lazy mode`, async () => {
    const url = await staticOrigin(gzDir, head);
    const full = await Replica.open(url);
    try {
      await full.sync();
      assert.equal(full.status().appliedLsn, 24);
      assert.equal(new TextDecoder().decode(full.get("g:00123")), "v21-23");
      assert.equal(full.get("g:02000"), undefined);
    } finally {
      await full.close();
    }
    const lazy = await Replica.open(url, { load: "lazy" });
    try {
      assert.equal(new TextDecoder().decode(await lazy.get("g:01999")), "v19-99");
      assert.equal(new TextDecoder().decode(await lazy.get("g:00050")), "v20-50");
      assert.equal(lazy.status().appliedLsn, 24);
    } finally {
      await lazy.close();
    }
  });
}

/** The data error a replica over `url` reports at its first sync. */
async function headError(url) {
  const r = await Replica.open(url);
  try {
    const err = await syncOnce(r);
    assert.ok(err, "the sync reports an error");
    assert.equal(r.status().appliedLsn, 0);
    return err;
  } finally {
    await r.close().catch(() => {});
  }
}

test("a gzip head that decodes past 1 MiB is a data error naming the head, decoded no further and fed to the decoder a little at a time", async () => {
  // The real head's JSON followed by 64 MiB of spaces (valid JSON whitespace).
  const json = zlib.gunzipSync(fs.readFileSync(path.join(gzDir, "catalog/head.json")));
  const bomb = zlib.gzipSync(Buffer.concat([json, Buffer.alloc(64 << 20, 0x20)]), { level: 9 });
  assert.ok(bomb.length < 1 << 20, `${bomb.length} bytes`);
  // What the decoder is fed: some runtimes (Deno, workerd) inflate a whole
  // chunk before the bound can stop them (a 1 MiB chunk of this kind held
  // 1 GB in Deno), so the stored bytes go in a little at a time.
  const Native = globalThis.DecompressionStream;
  let largest = 0;
  globalThis.DecompressionStream = class {
    constructor(format) {
      const inner = new Native(format);
      const count = new TransformStream({
        transform(chunk, c) {
          largest = Math.max(largest, chunk.byteLength);
          c.enqueue(chunk);
        },
      });
      count.readable.pipeTo(inner.writable).catch(() => {});
      this.writable = count.writable;
      this.readable = inner.readable;
    }
  };
  let err;
  try {
    err = await headError(await staticOrigin(gzDir, () => ({ body: bomb })));
  } finally {
    globalThis.DecompressionStream = Native;
  }
  assert.equal(err.code, "data", `${err.code}: ${err.message}`);
  assert.equal(err.object, "catalog/head.json");
  assert.match(String(err.message), /too large|exceeds|limit|1048576/i, err.message);
  assert.ok(largest > 0 && largest <= 1024, `the decoder was fed ${largest} of the ${bomb.length} stored bytes at once`);
});

test("a gzip head with bytes after its stream, or cut short, is a data error naming the head", async () => {
  const stored = fs.readFileSync(path.join(gzDir, "catalog/head.json"));
  for (const body of [Buffer.concat([stored, Buffer.from("junk")]), stored.subarray(0, stored.length - 6)]) {
    const err = await headError(await staticOrigin(gzDir, () => ({ body })));
    assert.equal(err.code, "data", `${err.code}: ${err.message}`);
    assert.equal(err.object, "catalog/head.json");
    assert.match(String(err.message), /gzip/, err.message);
  }
});

test("a gzip head followed by zero bytes, an empty member or a second member is a data error naming the head", async () => {
  // The head is one gzip stream and nothing after it (docs/FORMAT.md,
  // "Head encoding"), whatever the runtime's DecompressionStream does
  // with what follows the first member.
  const stored = fs.readFileSync(path.join(gzDir, "catalog/head.json"));
  const json = zlib.gunzipSync(stored);
  const half = json.length >> 1;
  const cases = [
    ["zero bytes after the stream", Buffer.concat([stored, Buffer.alloc(8)])],
    ["an empty second member", Buffer.concat([stored, zlib.gzipSync(Buffer.alloc(0))])],
    ["the JSON split over two members", Buffer.concat([zlib.gzipSync(json.subarray(0, half)), zlib.gzipSync(json.subarray(half))])],
  ];
  for (const [what, body] of cases) {
    const err = await headError(await staticOrigin(gzDir, () => ({ body })));
    assert.equal(err.code, "data", `${what}: ${err.code}: ${err.message}`);
    assert.equal(err.object, "catalog/head.json", what);
  }
});

test("a server that never finishes sending the wasm module, or sends or claims far more than one, fails the load; the next load tries again", async () => {
  // A process of its own: the module loads once per process.
  const wasm = fs.readFileSync(new URL("../../js/dist/wasm/walcast_wasm_bg.wasm", import.meta.url));
  const closed = [];
  const server = await listen((req, res) => {
    if (req.url === "/closed") return res.end(JSON.stringify(closed));
    if (req.url === "/hang.wasm") {
      // Headers and half the module, then nothing more.
      res.writeHead(200, { "content-type": "application/wasm", "content-length": wasm.length });
      res.write(wasm.subarray(0, wasm.length >> 1));
      req.socket.on("close", () => closed.push(req.url));
      return;
    }
    if (req.url === "/endless.wasm" || req.url === "/claims.wasm") {
      // A module's header and a custom section claiming 4 GiB, then its
      // zeros for ever (chunked), as a compiler waits for them; or a
      // claimed 1 GiB and a first chunk.
      const endless = req.url === "/endless.wasm";
      res.writeHead(200, { "content-type": "application/wasm", ...(endless ? {} : { "content-length": 1 << 30 }) });
      let gone = false;
      req.socket.on("close", () => {
        gone = true;
        closed.push(req.url);
      });
      const chunk = Buffer.alloc(64 << 10);
      const pump = () => {
        while (!gone && endless) if (!res.write(chunk)) return res.once("drain", pump);
      };
      res.write(Buffer.from([0, 0x61, 0x73, 0x6d, 1, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f]));
      res.write(chunk);
      pump();
      return;
    }
    res.writeHead(200, { "content-type": "application/wasm" });
    res.end(wasm);
  });
  try {
    const base = `http://127.0.0.1:${server.address().port}`;
    const script = `
      // The browser entry (it fetches the module by URL), next to Node's.
      const web = new URL("./web.js", import.meta.resolve("walcast"));
      const { init, Replica } = await import(web);
      const bad = await init(${JSON.stringify(base + "/ok.wasm")}, { timeoutMs: "soon" }).then(() => null, (e) => e.code);
      const err = await init(${JSON.stringify(base + "/hang.wasm")}, { timeoutMs: 500 }).then(() => null, (e) => e);
      // Whether the stalled download's connection was closed, asked while
      // this process still runs (its exit would close it anyway).
      let closed = [];
      for (let i = 0; i < 100 && !closed.length; i++) {
        closed = await (await fetch(${JSON.stringify(base + "/closed")})).json();
        if (!closed.length) await new Promise((r) => setTimeout(r, 20));
      }
      const big = [];
      for (const name of ["endless", "claims"]) {
        const e = await init(${JSON.stringify(base)} + "/" + name + ".wasm", { timeoutMs: 20000 }).then(() => null, (e) => e);
        big.push({ code: e?.code, message: e?.message });
      }
      for (let i = 0; i < 100 && closed.length < 3; i++) {
        closed = await (await fetch(${JSON.stringify(base + "/closed")})).json();
        if (closed.length < 3) await new Promise((r) => setTimeout(r, 20));
      }
      console.log(JSON.stringify({ bad, code: err?.code, message: err?.message, closed, big }));
      await init(${JSON.stringify(base + "/ok.wasm")});
      console.log(JSON.stringify({ loaded: typeof Replica.open }));
      process.exit(0);
    `;
    const { execFile } = await import("node:child_process");
    const out = await new Promise((resolve, reject) =>
      execFile(process.execPath, ["--input-type=module", "-e", script], { cwd: path.dirname(new URL(import.meta.url).pathname), timeout: 30_000 }, (e, stdout, stderr) =>
        e ? reject(new Error(`${e.message}\n${stderr}`)) : resolve(stdout),
      ),
    );
    const [first, second] = out.trim().split("\n").map((l) => JSON.parse(l));
    assert.equal(first.bad, "invalid_input", "a timeoutMs that is no number of milliseconds");
    assert.equal(first.code, "timeout", first.message);
    assert.match(first.message, /wasm module.*500 ms/);
    assert.deepEqual(first.closed.slice().sort(), ["/claims.wasm", "/endless.wasm", "/hang.wasm"], "the stalled and oversized downloads were aborted");
    for (const b of first.big) {
      assert.equal(b.code, "data", b.message);
      assert.match(b.message, /wasm module: .*bytes, above the 16777216 a module may have/);
    }
    assert.match(first.big[1].message, /1073741824 bytes/, "the claimed length, refused before reading");
    assert.deepEqual(second, { loaded: "function" });
  } finally {
    server.closeAllConnections?.();
    server.close();
  }
});

// --- a sync after an outage ------------------------------------------------------

/** 40 segments of 5 batches each and no snapshot, in a directory. */
function segmentsDataset() {
  const bin = walcastBin();
  const wal = path.join(tmp, "segs-wal");
  const dir = path.join(tmp, "segs");
  const lines = [];
  for (let b = 0; b < 200; b++) lines.push(JSON.stringify({ batch: [{ op: "put", key: `k${b % 50}`, value: "x".repeat(400) + b }] }));
  execFileSync(bin, ["write", "--wal", wal], { input: lines.join("\n") + "\n", stdio: ["pipe", "pipe", "pipe"] });
  const to = pathToFileURL(dir).href;
  execFileSync(bin, ["publish", "--wal", wal, "--to", to, "--once", "--snapshot-every", "0", "--segment-bytes", "2000"], { stdio: ["pipe", "pipe", "pipe"] });
  return dir;
}

test("a sync after an outage reports its own outcome, not errors of the last sync's GETs answered after it ended", async () => {
  const dir = segmentsDataset();
  let failing = true;
  const origin = await listen(async (req, res) => {
    const key = decodeURIComponent(new URL(req.url, "http://x").pathname.replace(/^\/ds\//, ""));
    if (failing && key.startsWith("segments/")) {
      await sleep(100);
      return res.writeHead(503).end();
    }
    const file = path.join(dir, key);
    if (!fs.existsSync(file)) return res.writeHead(404).end();
    res.writeHead(200).end(fs.readFileSync(file));
  });
  try {
    const url = `http://127.0.0.1:${origin.address().port}/ds`;
    let stale = 0;
    for (let trial = 0; trial < 3; trial++) {
      failing = true;
      const r = await Replica.open(url, { concurrency: 4 });
      await assert.rejects(r.sync(), "the sync in the outage fails");
      // The outage's GETs still out are answered (failing) after it ended.
      await sleep(800);
      failing = false;
      try {
        await r.sync();
        assert.equal(r.status().appliedLsn, 200);
      } catch (e) {
        stale++;
      } finally {
        await r.close().catch(() => {});
      }
    }
    assert.equal(stale, 0, "syncs after the outage failed with its errors");
  } finally {
    origin.close();
  }
});
