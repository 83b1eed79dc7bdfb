// Servers' answers the JS driver must not take at their word:
// `node --test tests/js/answers.test.mjs`.
// - With `headers` set (an API key, a CDN's access secret), the replica
//   follows a redirect only within the dataset's origin, as the native
//   replica does: a hostile or misconfigured server's Location never
//   receives them.
// - A 206 that does not say which part it is fails as the native drivers
//   fail it.
import assert from "node:assert/strict";
import http from "node:http";
import { test } from "node:test";

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
