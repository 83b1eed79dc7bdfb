// A key-value reader at the edge: one walcast replica per isolate, synced
// from DATASET_URL (object storage over HTTP), answering reads from memory.
//
//   GET /                      a page that reads keys through this worker
//   GET /api/get?key=K         {"key", "value", "lsn"} (404 when absent)
//   GET /api/scan?prefix=P&limit=N   {"rows": [{"key", "value"}], "lsn"}
//   GET /api/status            the replica's status (applied LSN, lag, ...)
//
// A request that finds the last sync older than MAX_AGE_MS syncs first, for
// at most SYNC_WAIT_MS (default 2000): a slow or silent origin then gets the
// last good state, while the sync goes on in the background.
// The first request of an isolate waits for the first sync.
import { Replica } from "walcast";
import { PAGE } from "./page.js";

let replica = null;
let opening = null;
let lastSync = 0;

/** A sync that lives on past the request (ctx.waitUntil). The replica runs
 * one at a time, and a call during one queues at most one more. */
function sync(ctx) {
  const s = replica.sync().then(() => {
    lastSync = Date.now();
  });
  ctx?.waitUntil?.(s.catch(() => {}));
  return s;
}

async function ready(env, ctx) {
  if (!env.DATASET_URL) throw new Error("DATASET_URL is not set (wrangler.toml [vars])");
  if (!replica) {
    opening ??= Replica.open(env.DATASET_URL).finally(() => (opening = null));
    replica = await opening;
  }
  const maxAge = Number(env.MAX_AGE_MS ?? 1000);
  if (Date.now() - lastSync > maxAge) {
    const s = sync(ctx);
    if (replica.status().appliedLsn === 0) {
      await s; // nothing to answer from yet
    } else {
      let timer;
      const waited = new Promise((resolve) => (timer = setTimeout(resolve, Number(env.SYNC_WAIT_MS ?? 2000))));
      // A failed or slow sync: the last good state answers.
      await Promise.race([s.catch(() => {}), waited]).finally(() => clearTimeout(timer));
    }
  }
  return replica;
}

const json = (body, status = 200) =>
  new Response(JSON.stringify(body), {
    status,
    headers: { "content-type": "application/json; charset=utf-8", "cache-control": "no-store" },
  });

const decoder = new TextDecoder("utf-8", { fatal: false });
const text = (bytes) => decoder.decode(bytes);
const keyText = (k) => (typeof k === "string" ? k : text(k));

export default {
  async fetch(request, env, ctx) {
    try {
      return await route(request, env, ctx);
    } catch (e) {
      // A bad query (invalid_input) is the client's; anything else (a
      // replica being rebuilt after an internal error) passes.
      if (e?.code === "invalid_input") return json({ error: e.code, message: e.message }, 400);
      return json({ error: e?.code ?? "internal", message: e?.message ?? String(e) }, 503);
    }
  },
};

async function route(request, env, ctx) {
  const url = new URL(request.url);
  if (url.pathname === "/") {
    return new Response(PAGE, { headers: { "content-type": "text/html; charset=utf-8" } });
  }
  if (!url.pathname.startsWith("/api/")) return json({ error: "not found" }, 404);
  let r;
  try {
    r = await ready(env, ctx);
  } catch (e) {
    // The replica keeps its last good state; without one there is nothing to answer.
    if (!replica || replica.status().appliedLsn === 0) return json({ error: e.code ?? "unavailable", message: e.message }, 503);
    r = replica;
  }
  const lsn = r.status().appliedLsn;
  switch (url.pathname) {
    case "/api/get": {
      const key = url.searchParams.get("key");
      if (key === null) return json({ error: "missing ?key=" }, 400);
      const value = r.get(key);
      if (value === undefined) return json({ key, lsn, error: "not found" }, 404);
      return json({ key, value: text(value), lsn });
    }
    case "/api/scan": {
      const prefix = url.searchParams.get("prefix") ?? "";
      const asked = url.searchParams.get("limit");
      // A number of rows (rounded down), at most 1,000 answered.
      const n = asked === null ? 100 : asked.trim() === "" ? NaN : Number(asked);
      if (!(n >= 0)) return json({ error: "?limit= takes a number of rows" }, 400);
      const limit = Math.floor(Math.min(n, 1000));
      const rows = r.scan({ prefix, limit }).map((e) => ({ key: keyText(e.key), value: text(e.value) }));
      return json({ rows, lsn });
    }
    case "/api/status": {
      const s = r.status();
      return json({ appliedLsn: s.appliedLsn, committedLsn: s.committedLsn, lagMs: s.lagMs, state: s.state, datasetId: s.datasetId });
    }
    default:
      return json({ error: "not found" }, 404);
  }
}
