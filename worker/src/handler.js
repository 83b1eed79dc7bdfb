// The HTTP handler shared by the Cloudflare Worker (src/index.js) and the
// Deno entry (deno.js): ONE walcast replica per isolate, reads answered from
// it at once, catch-up syncs in the background.
//
//   GET /kv/<key>                  200 with the value's bytes, 404 when absent
//   GET /kv?key=<key>              the same, for keys with "." or ".." segments
//   GET /scan?prefix=&start=&end=&limit=
//                                  200, JSON [{ key, value }] in key order
//   GET /status                    200, JSON of replica.status() (+ `worker`)
//
// Keys and scan bounds are percent-encoded bytes: `/kv/user%3A42`, or
// `/kv/%FF%00` for a key that is not UTF-8. In /scan rows a key or value that
// is not valid UTF-8 comes as base64 under `key_b64` / `value_b64` instead.
//
// Freshness: the first request of an isolate waits for the initial sync. After
// that no request waits on object storage: when the last sync finished more
// than MAX_AGE_MS ago (default 1000), the request starts one in the background
// (`defer`, i.e. ctx.waitUntil on Workers) and answers from the local replica.
//
// Configuration (Worker vars / Deno env): DATASET_URL (required), MAX_AGE_MS,
// FIRST_SYNC_WAIT_MS (how long a request waits for the initial sync before it
// answers 503, default 30000), SCAN_LIMIT (default rows of /scan, 1000),
// MAX_SCAN_LIMIT (10000),
// DATASET_HEADERS (JSON object of headers sent with every GET, e.g. auth),
// CONCURRENCY (parallel segment GETs).

const DEFAULT_MAX_AGE_MS = 1000;
const DEFAULT_SCAN_LIMIT = 1000;
const DEFAULT_MAX_SCAN_LIMIT = 10000;
// On Workers, a background sync that has made no progress (no new request, no
// byte received) for this long is taken for lost: its request context was torn
// down with its I/O. The replica is then re-created from a snapshot of its
// state, so the isolate keeps serving and syncing. A live sync always makes
// progress sooner: requests time out after 30 s, retries wait at most 30 s.
// Deno (no request-scoped I/O) passes Infinity.
const STUCK_SYNC_MS = 90_000;
// The first request waits at most this long for the initial sync, then
// answers 503 (the sync goes on in the background).
const DEFAULT_FIRST_SYNC_WAIT_MS = 30_000;

const strictUtf8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });
const encoder = new TextEncoder();

function intVar(env, name, dflt, min = 0) {
  const raw = env?.[name];
  if (raw === undefined || raw === null || raw === "") return dflt;
  const n = Number(raw);
  if (!Number.isFinite(n) || n < min) throw configError(`${name} must be a number >= ${min}, got ${JSON.stringify(raw)}`);
  return Math.floor(n);
}

function configError(message) {
  const e = new Error(`walcast worker: ${message}`);
  e.code = "config";
  return e;
}

function readConfig(env) {
  const url = env?.DATASET_URL;
  if (typeof url !== "string" || url === "") throw configError("DATASET_URL is not set");
  let headers;
  if (env.DATASET_HEADERS) {
    try {
      headers = typeof env.DATASET_HEADERS === "string" ? JSON.parse(env.DATASET_HEADERS) : env.DATASET_HEADERS;
    } catch {
      throw configError("DATASET_HEADERS must be a JSON object");
    }
    if (!headers || typeof headers !== "object" || Array.isArray(headers)) throw configError("DATASET_HEADERS must be a JSON object");
  }
  const concurrency = intVar(env, "CONCURRENCY", undefined, 1);
  return {
    url,
    headers,
    concurrency,
    maxAgeMs: intVar(env, "MAX_AGE_MS", DEFAULT_MAX_AGE_MS),
    scanLimit: intVar(env, "SCAN_LIMIT", DEFAULT_SCAN_LIMIT),
    maxScanLimit: intVar(env, "MAX_SCAN_LIMIT", DEFAULT_MAX_SCAN_LIMIT, 1),
    firstSyncWaitMs: intVar(env, "FIRST_SYNC_WAIT_MS", DEFAULT_FIRST_SYNC_WAIT_MS),
  };
}

/** Percent-decodes `s` to bytes (UTF-8 for literal characters; `+` stays `+`). */
export function percentBytes(s) {
  const out = [];
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c === 0x25 /* % */ && i + 2 < s.length && /^[0-9a-fA-F]{2}$/.test(s.slice(i + 1, i + 3))) {
      out.push(parseInt(s.slice(i + 1, i + 3), 16));
      i += 2;
    } else if (c < 0x80) {
      out.push(c);
    } else {
      // a literal non-ASCII character (a client that did not encode it)
      const cp = s.codePointAt(i);
      const ch = String.fromCodePoint(cp);
      for (const b of encoder.encode(ch)) out.push(b);
      i += ch.length - 1;
    }
  }
  return Uint8Array.from(out);
}

/** The query string's parameters as raw bytes (first value wins; `+` is a space). */
function queryBytes(search) {
  const params = new Map();
  for (const part of search.replace(/^\?/, "").split("&")) {
    if (part === "") continue;
    const eq = part.indexOf("=");
    const name = eq < 0 ? part : part.slice(0, eq);
    const value = eq < 0 ? "" : part.slice(eq + 1);
    const key = strictUtf8.decode(percentBytes(name.replace(/\+/g, " ")));
    if (!params.has(key)) params.set(key, percentBytes(value.replace(/\+/g, " ")));
  }
  return params;
}

function text(bytes) {
  try {
    return strictUtf8.decode(bytes);
  } catch {
    return undefined;
  }
}

function toBase64(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

const COMMON_HEADERS = {
  "cache-control": "no-store",
  "access-control-allow-origin": "*",
  "access-control-expose-headers": "x-walcast-lsn",
};

function json(status, body, lsn) {
  const headers = { ...COMMON_HEADERS, "content-type": "application/json; charset=utf-8" };
  if (lsn !== undefined) headers["x-walcast-lsn"] = String(lsn);
  return new Response(JSON.stringify(body), { status, headers });
}

function errorBody(e) {
  return { error: { code: e?.code ?? "internal", message: String(e?.message ?? e) } };
}

/** Resolves when `p` settles or after `ms`, whichever is first. */
function withDeadline(p, ms) {
  let t;
  return Promise.race([p, new Promise((resolve) => (t = setTimeout(resolve, ms)))]).finally(() => clearTimeout(t));
}

/**
 * Makes the request handler. `Replica` is the walcast package's class (the
 * runtime's entry); `log` receives background errors (default console.warn);
 * `stuckSyncMs`: see STUCK_SYNC_MS.
 * Returns `handle(request, env, defer)` where `defer(promise)` keeps a
 * background promise alive (ctx.waitUntil on Workers).
 */
export function createHandler(Replica, { log = (...a) => console.warn(...a), now = () => Date.now(), stuckSyncMs = STUCK_SYNC_MS } = {}) {
  // The isolate's replica: { url, config, promise (resolves the Replica),
  // replica, ready, lastSyncAt, sync (in-flight promise), syncStartedAt }.
  let slot = null;

  function openSlot(config) {
    const s = {
      url: config.url,
      config,
      replica: null,
      ready: false, // an initial sync has succeeded
      lastSyncAt: null, // when the last successful sync finished
      lastSyncError: null,
      sync: null,
      syncStartedAt: null,
      progressAt: null, // when the in-flight sync last made progress
      progressMark: null,
      replacing: null,
      syncs: 0,
      restarts: 0,
    };
    s.promise = Replica.open(config.url, replicaOptions(config)).then((r) => {
      s.replica = r;
      return r;
    });
    s.promise.catch(() => {
      if (slot === s) slot = null; // let the next request try again
    });
    return s;
  }

  function replicaOptions(config) {
    const o = { persist: "memory" };
    if (config.headers) o.headers = config.headers;
    if (config.concurrency !== undefined) o.concurrency = config.concurrency;
    return o;
  }

  function progressMark(r) {
    const st = r.status();
    return `${st.requests}:${st.bytesReceived}`;
  }

  /** Starts (or joins) a sync of the slot's replica; never rejects. */
  function startSync(s) {
    if (s.sync) return s.sync;
    s.syncStartedAt = now();
    s.progressAt = now();
    s.progressMark = progressMark(s.replica);
    s.syncs++;
    const p = s.replica.sync().then(
      () => {
        s.ready = true;
        s.lastSyncAt = now();
        s.lastSyncError = null;
      },
      (e) => {
        s.lastSyncError = e;
        log(`walcast worker: sync of ${s.url} failed: ${e?.code ?? ""} ${e?.message ?? e}`);
      },
    );
    const settled = p.then(() => {
      if (s.sync === settled) {
        s.sync = null;
        s.syncStartedAt = null;
      }
    });
    s.sync = settled;
    return settled;
  }

  /** A sync that never settled: carry the state over to a fresh replica. */
  async function replaceStuck(s) {
    log(`walcast worker: a sync of ${s.url} made no progress in ${stuckSyncMs} ms; re-creating the replica`);
    const old = s.replica;
    let fresh;
    try {
      fresh = await Replica.restore(s.url, old.snapshot(), replicaOptions(s.config));
    } catch {
      fresh = await Replica.open(s.url, replicaOptions(s.config));
      s.ready = false;
    }
    s.replica = fresh;
    s.promise = Promise.resolve(fresh);
    s.sync = null;
    s.syncStartedAt = null;
    s.restarts++;
    // The old replica's sync may never settle; close() would wait for it.
    return fresh;
  }

  async function replicaFor(env, defer, { waitForFirst = true } = {}) {
    const config = readConfig(env);
    if (!slot || slot.url !== config.url) {
      const old = slot;
      slot = openSlot(config);
      if (old?.replica) defer(old.replica.close().catch(() => {}));
    }
    const s = slot;
    await s.promise;
    if (s.sync && !s.replacing) {
      const mark = progressMark(s.replica);
      if (mark !== s.progressMark) {
        s.progressMark = mark;
        s.progressAt = now();
      } else if (now() - s.progressAt > stuckSyncMs) {
        s.replacing = replaceStuck(s).finally(() => {
          s.replacing = null;
        });
      }
    }
    if (s.replacing) await s.replacing;
    if (!s.ready) {
      // The isolate's first request (or every request until a sync succeeds)
      // waits for the initial sync.
      const p = startSync(s);
      defer(p);
      if (waitForFirst) await withDeadline(p, s.config.firstSyncWaitMs);
    } else if (!s.sync && (s.lastSyncAt === null || now() - s.lastSyncAt >= s.config.maxAgeMs)) {
      defer(startSync(s));
    }
    return s;
  }

  async function handle(request, env, defer = (p) => p.catch(() => {})) {
    const url = new URL(request.url);
    const path = url.pathname;
    if (request.method === "OPTIONS") {
      return new Response(null, {
        status: 204,
        headers: { ...COMMON_HEADERS, "access-control-allow-methods": "GET, HEAD, OPTIONS", "access-control-max-age": "86400" },
      });
    }
    const route = path.startsWith("/kv/") || path === "/kv" ? "kv" : path === "/scan" ? "scan" : path === "/status" ? "status" : null;
    if (!route) return json(404, { error: { code: "not_found", message: `no route ${path}; try /kv/<key>, /scan, /status` } });
    if (request.method !== "GET" && request.method !== "HEAD") {
      return json(405, { error: { code: "method", message: `${request.method} is not allowed; use GET` } });
    }

    let s;
    try {
      s = await replicaFor(env, defer);
    } catch (e) {
      return json(e?.code === "config" ? 500 : 503, errorBody(e));
    }
    const replica = s.replica;

    if (route === "status") {
      const st = replica.status();
      return json(200, {
        ...st,
        worker: {
          url: s.url,
          ready: s.ready,
          lastSyncAt: s.lastSyncAt,
          syncing: s.sync !== null,
          syncs: s.syncs,
          restarts: s.restarts,
          maxAgeMs: s.config.maxAgeMs,
          lastSyncError: s.lastSyncError ? errorBody(s.lastSyncError).error : null,
        },
      }, st.appliedLsn);
    }

    if (!s.ready) {
      // No successful sync yet: nothing trustworthy to serve.
      const e = s.lastSyncError ?? replica.status().lastError ?? new Error("the initial sync has not finished");
      return json(503, errorBody(e));
    }
    const lsn = replica.status().appliedLsn;

    if (route === "kv") {
      // /kv/<key>, or /kv?key=<key> for keys the URL parser would rewrite
      // (dot segments such as "a/../b").
      let key;
      if (path === "/kv") {
        const q = queryBytes(url.search);
        if (!q.has("key")) return json(400, { error: { code: "invalid_input", message: "use /kv/<key> or /kv?key=<key>" } });
        key = q.get("key");
      } else {
        key = percentBytes(path.slice("/kv/".length));
      }
      const value = replica.get(key);
      if (value === undefined) return json(404, { error: { code: "not_found", message: "no such key" } }, lsn);
      return new Response(request.method === "HEAD" ? null : value, {
        status: 200,
        headers: {
          ...COMMON_HEADERS,
          "content-type": "application/octet-stream",
          "content-length": String(value.byteLength),
          "x-walcast-lsn": String(lsn),
        },
      });
    }

    // scan
    const q = queryBytes(url.search);
    let limit = s.config.scanLimit;
    if (q.has("limit")) {
      const raw = text(q.get("limit"));
      if (!/^\d+$/.test(raw ?? "")) return json(400, { error: { code: "invalid_input", message: "limit must be an integer >= 0" } });
      limit = Number(raw);
    }
    if (limit > s.config.maxScanLimit) limit = s.config.maxScanLimit;
    const opts = { limit };
    for (const f of ["prefix", "start", "end"]) if (q.has(f)) opts[f] = q.get(f);
    let rows;
    try {
      rows = limit === 0 ? [] : replica.scan(opts);
    } catch (e) {
      return json(e?.code === "invalid_input" ? 400 : 500, errorBody(e));
    }
    const out = rows.map(({ key, value }) => {
      const row = {};
      if (typeof key === "string") row.key = key;
      else row.key_b64 = toBase64(key);
      const t = text(value);
      if (t !== undefined) row.value = t;
      else row.value_b64 = toBase64(value);
      return row;
    });
    return json(200, out, lsn);
  }

  return handle;
}
