// The HTTP handler shared by the Cloudflare Worker (src/index.js) and the
// Deno entry (deno.js): ONE walcast replica per isolate, reads answered from
// it at once, catch-up syncs in the background.
//
//   GET /kv/<key>                  200 with the value's bytes, 404 when absent
//   GET /kv?key=<key>              the same, for keys with "." or ".." segments
//   GET /scan?prefix=&start=&end=&limit=
//                                  200, JSON [{ key, value }] in key order
//                                  (400 when start sorts after end)
//   GET /status                    200, JSON of the replica's state fields (+ `worker`)
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
// Configuration (Worker vars / Deno env): DATASET_URL (required unless BUCKET
// is bound), BUCKET (an R2 bucket binding: the dataset is read through it,
// under DATASET_PREFIX, default the bucket's root; DATASET_URL is then
// ignored, so a private bucket needs no public access), MAX_AGE_MS,
// FIRST_SYNC_WAIT_MS (how long a request waits for the initial sync before it
// answers 503, default 30000), SCAN_LIMIT (default rows of /scan, 1000),
// MAX_SCAN_LIMIT (10000), SCAN_MAX_BYTES (a /scan answer ends at the row
// whose keys and values reach this many bytes, counted as bytes and as
// answered (JSON escapes, base64), default 4 MiB, at most
// 2^32 - 1, and then carries `Walcast-Scan-Next`: the percent-encoded
// `start` of the next page), MAX_CONCURRENT_SCANS (lazy scans at once, 32, at
// most 64: more answer 503 `busy` with Retry-After), MIN_LSN_WAIT_MS (how long a read with `?min_lsn=N`
// or `Walcast-Min-Lsn: N` waits for LSN N to be applied before it answers 503
// with Retry-After, default 5000; every answer carries `Walcast-Lsn`, the
// LSN it was answered at, so a client can chain reads across isolates),
// DATASET_HEADERS (JSON object of headers sent with every GET, e.g. auth),
// CONCURRENCY (parallel segment GETs), CORS_ORIGINS (comma-separated origins
// allowed to read from a browser; default "*": any), LOAD ("full", the
// default: the isolate loads the whole dataset; "lazy": it reads the head and
// the segments after the newest snapshot, and fetches only the snapshot
// blocks a request needs) and CACHE_BYTES (lazy: snapshot block bytes kept,
// default 8 MiB), AUTH_KEY (`ed25519:<base64>`, several separated by commas:
// every route needs a token of `walcast token` signed by one of them, in
// `Authorization: Bearer` or `?token=`; 401 otherwise; CORS then allows no
// origin unless CORS_ORIGINS lists it), TRUST (`ed25519:<base64>`, several
// separated by commas: the replica applies only heads these keys signed and
// objects those heads bind by digest; /status then reports `trust: { keys,
// signer }`; a refused dataset is an `untrusted` error) and AUTH_PREFIX (the path tokens must
// cover; default DATASET_PREFIX with BUCKET, else DATASET_URL's path).
//
// Lazy reads can fail on their own (a snapshot block that fails
// verification, a store that does not answer): /kv and /scan then answer
// 502 (`data`, `not_found`) or 503 (`unavailable`) with the error's code.
//
// Answers never carry DATASET_URL, DATASET_HEADERS or an error's own text
// (either may hold credentials): errors are { code, message } with a fixed
// message per code, plus the dataset object and LSN they concern.

import { importKeys, requestToken, verifyToken } from "./auth.js";
import { R2_ORIGIN, isR2Bucket, r2Fetch } from "./r2.js";

const DEFAULT_MAX_AGE_MS = 1000;
const DEFAULT_SCAN_LIMIT = 1000;
const DEFAULT_MAX_SCAN_LIMIT = 10000;
const DEFAULT_SCAN_MAX_BYTES = 4 << 20;
// The largest byte bound of a scan the module holds (a u32): a larger
// SCAN_MAX_BYTES means this, so that an answer the module cut at it still
// carries Walcast-Scan-Next.
const MODULE_SCAN_MAX_BYTES = 0xffffffff;
// Lazy scans in progress at once (MAX_CONCURRENT_SCANS), at most what the
// wasm module keeps open (`MAX_OPEN_SCANS`).
const DEFAULT_MAX_CONCURRENT_SCANS = 32;
const MODULE_OPEN_SCANS = 64;
// On Workers, a background sync that has made no progress (no new request, no
// byte received) for this long is taken for lost: its request context was torn
// down with its I/O. The replica is then re-created from a snapshot of its
// state, so the isolate keeps serving and syncing. A live sync always makes
// progress sooner: requests time out after at most 120 s (30 s, plus up to
// 90 s for the bytes of a large segment or snapshot window), retries wait
// at most 30 s.
// The same holds for a lazy replica's open (its first sync) and for the open
// of a replacement: one pending this long is abandoned and started again.
// Requests never wait on a replacement longer than FIRST_SYNC_WAIT_MS: the
// replica it replaces serves meanwhile. Deno (no request-scoped I/O) passes
// Infinity.
const STUCK_SYNC_MS = 180_000;
// A read (lazy mode: its block GETs) that has not finished after this long
// answers 503 `unavailable`, and a scan's slot is freed: longer than a
// block GET's limit plus a retry.
const READ_TIMEOUT_MS = 90_000;
// The first request waits at most this long for the initial sync, then
// answers 503 (the sync goes on in the background).
const DEFAULT_FIRST_SYNC_WAIT_MS = 30_000;
/**
 * The pause between the syncs that reads waiting for a `min_lsn` start: 100
 * ms after a sync that applied something, doubling after each that did not,
 * up to a second. A read-your-writes LSN lands within the first few pauses;
 * requests naming an LSN that never comes cost a head GET a second, not ten.
 */
const MIN_LSN_PAUSE_MS = 100;
const MAX_MIN_LSN_PAUSE_MS = 1_000;
/** How long a read with `min_lsn` waits for that LSN before answering 503. */
const DEFAULT_MIN_LSN_WAIT_MS = 5_000;

const strictUtf8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });
const encoder = new TextEncoder();

function intVar(env, name, dflt, min = 0) {
  const raw = env?.[name];
  if (raw === undefined || raw === null || raw === "") return dflt;
  const n = Number(raw);
  if (!Number.isFinite(n) || n < min) throw configError(`${name} must be a number >= ${min}`);
  return Math.floor(n);
}

function configError(message) {
  const e = new Error(`walcast worker: ${message}`);
  e.code = "config";
  return e;
}

/**
 * TRUST: the publisher's public keys, `ed25519:<base64>`, several separated
 * by commas; [] when unset. The replica then applies only what they signed.
 */
function trustVar(env) {
  const raw = env?.TRUST;
  if (raw === undefined || raw === null || String(raw).trim() === "") return [];
  const keys = String(raw)
    .split(",")
    .map((k) => k.trim())
    .filter((k) => k !== "");
  if (keys.length === 0 || !keys.every((k) => /^ed25519:[A-Za-z0-9+/]{43}=$/.test(k))) {
    throw configError('TRUST must be "ed25519:<base64>" (several: separated by commas)');
  }
  return keys;
}

function readConfig(env) {
  // A private R2 bucket bound as BUCKET is read through the binding.
  const bucket = isR2Bucket(env?.BUCKET) ? env.BUCKET : null;
  let url = env?.DATASET_URL;
  if (bucket) {
    const prefix = String(env.DATASET_PREFIX ?? "").replace(/^\/+|\/+$/g, "");
    url = `${R2_ORIGIN}/${prefix.split("/").map(encodeURIComponent).join("/")}`;
  } else if (typeof url !== "string" || url === "") {
    throw configError("DATASET_URL is not set (or bind an R2 bucket as BUCKET)");
  }
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
  const load = env.LOAD === undefined || env.LOAD === null || env.LOAD === "" ? "full" : String(env.LOAD);
  if (load !== "full" && load !== "lazy") throw configError('LOAD must be "full" or "lazy"');
  return {
    url,
    trust: trustVar(env),
    bucket,
    headers,
    concurrency,
    load,
    cacheBytes: intVar(env, "CACHE_BYTES", undefined),
    maxAgeMs: intVar(env, "MAX_AGE_MS", DEFAULT_MAX_AGE_MS),
    scanLimit: intVar(env, "SCAN_LIMIT", DEFAULT_SCAN_LIMIT),
    maxScanLimit: intVar(env, "MAX_SCAN_LIMIT", DEFAULT_MAX_SCAN_LIMIT, 1),
    scanMaxBytes: Math.min(intVar(env, "SCAN_MAX_BYTES", DEFAULT_SCAN_MAX_BYTES, 1), MODULE_SCAN_MAX_BYTES),
    maxConcurrentScans: Math.min(intVar(env, "MAX_CONCURRENT_SCANS", DEFAULT_MAX_CONCURRENT_SCANS, 1), MODULE_OPEN_SCANS),
    firstSyncWaitMs: intVar(env, "FIRST_SYNC_WAIT_MS", DEFAULT_FIRST_SYNC_WAIT_MS),
    minLsnWaitMs: intVar(env, "MIN_LSN_WAIT_MS", DEFAULT_MIN_LSN_WAIT_MS),
  };
}

/** Percent-encodes bytes for a query value (unreserved characters stay as they are). */
function percentEncode(bytes) {
  let out = "";
  for (const b of bytes) {
    const c = String.fromCharCode(b);
    out += /[A-Za-z0-9\-._~]/.test(c) ? c : `%${b.toString(16).toUpperCase().padStart(2, "0")}`;
  }
  return out;
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

/**
 * The query string's parameters as raw bytes (first value wins; `+` is a
 * space). Parameter names must be UTF-8; null when one is not.
 */
function queryBytes(search) {
  const params = new Map();
  for (const part of search.replace(/^\?/, "").split("&")) {
    if (part === "") continue;
    const eq = part.indexOf("=");
    const name = eq < 0 ? part : part.slice(0, eq);
    const value = eq < 0 ? "" : part.slice(eq + 1);
    const key = text(percentBytes(name.replace(/\+/g, " ")));
    if (key === undefined) return null;
    if (!params.has(key)) params.set(key, percentBytes(value.replace(/\+/g, " ")));
  }
  return params;
}

function compareBytes(a, b) {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return a[i] - b[i];
  return a.length - b.length;
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

/**
 * CORS_ORIGINS: "*" (the default) or a comma-separated list of origins
 * (`https://app.example.com`). Returns null for "*", else the set.
 */
function corsOrigins(env) {
  const raw = env?.CORS_ORIGINS;
  // With tokens required (AUTH_KEY), no origin unless listed ("*" must be asked for).
  if (raw === undefined || raw === null || String(raw).trim() === "") return authOn(env) ? new Set() : null;
  const list = String(raw)
    .split(",")
    .map((o) => o.trim().replace(/\/+$/, ""))
    .filter((o) => o !== "");
  if (list.length === 0 || list.includes("*")) return null;
  return new Set(list.map((o) => o.toLowerCase()));
}

function authOn(env) {
  return env?.AUTH_KEY !== undefined && env?.AUTH_KEY !== null && String(env.AUTH_KEY).trim() !== "";
}

/**
 * AUTH_PREFIX: the dataset's path the worker's tokens must cover (no
 * leading or trailing "/"). Default: DATASET_PREFIX with a BUCKET, else the
 * path of DATASET_URL, so a token for `walcast serve`'s `app/…` is good for
 * the worker serving `…/app` too.
 */
function authPrefix(env) {
  if (env.AUTH_PREFIX !== undefined && env.AUTH_PREFIX !== null) return String(env.AUTH_PREFIX).replace(/^\/+|\/+$/g, "");
  if (isR2Bucket(env.BUCKET)) return String(env.DATASET_PREFIX ?? "").replace(/^\/+|\/+$/g, "");
  try {
    return decodeURIComponent(new URL(env.DATASET_URL).pathname).replace(/^\/+|\/+$/g, "");
  } catch {
    return "";
  }
}

/**
 * With AUTH_KEY set: null when the request carries a valid token (see
 * ./auth.js), else the 401 to answer (its reason in WWW-Authenticate and
 * the body's error, never the token).
 */
async function authorize(request, url, env, cors, now) {
  if (!authOn(env)) return null;
  let keys;
  try {
    keys = await importKeys(String(env.AUTH_KEY));
  } catch {
    throw configError('AUTH_KEY must be "ed25519:<base64>" (several: separated by commas)');
  }
  const v = await verifyToken(requestToken(request, url), keys, Math.floor(now() / 1000), authPrefix(env));
  if (v.ok) return null;
  return new Response(JSON.stringify({ error: { code: "unauthorized", message: `a valid access token is required (${v.reason})` } }), {
    status: 401,
    headers: {
      "cache-control": "no-store",
      ...cors,
      "content-type": "application/json; charset=utf-8",
      "www-authenticate": `Bearer realm="walcast", error="invalid_token", error_description="${v.reason}"`,
    },
  });
}

/** The CORS headers of an answer to `request`. */
function corsHeaders(request, env) {
  const allowed = corsOrigins(env);
  const h = { "access-control-expose-headers": "walcast-lsn, x-walcast-lsn, walcast-scan-next, retry-after" };
  if (allowed === null) {
    h["access-control-allow-origin"] = "*";
    return h;
  }
  // The answer depends on the request's Origin: caches must keep them apart.
  h.vary = "Origin";
  const origin = request.headers.get("origin");
  if (origin && allowed.has(origin.toLowerCase())) h["access-control-allow-origin"] = origin;
  else delete h["access-control-expose-headers"];
  return h;
}

function json(status, body, lsn, cors) {
  return jsonText(status, JSON.stringify(body), lsn, cors);
}

/** A JSON answer whose text is already written (see `json`). */
function jsonText(status, text, lsn, cors) {
  const headers = { "cache-control": "no-store", ...cors, "content-type": "application/json; charset=utf-8" };
  if (lsn !== undefined) {
    headers["walcast-lsn"] = String(lsn);
    headers["x-walcast-lsn"] = String(lsn);
  }
  return new Response(text, { status, headers });
}

/**
 * The read-your-writes LSN of a request: `?min_lsn=N` or the
 * `Walcast-Min-Lsn` header (the query wins); null when absent, undefined
 * when malformed.
 */
function minLsnOf(request, q) {
  let raw = null;
  if (q.has("min_lsn")) raw = text(q.get("min_lsn")) ?? "";
  else if (request.headers.has("walcast-min-lsn")) raw = request.headers.get("walcast-min-lsn").trim();
  if (raw === null) return null;
  if (!/^\d{1,15}$/.test(raw)) return undefined;
  return Number(raw);
}

/** Sleeps `ms`. */
function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// What an error says in an answer: its code and a fixed message. An error's
// own text can hold the dataset URL (with credentials in it) or a header.
const ERROR_MESSAGES = {
  data: "an object of the dataset failed verification; the last good state is served",
  unavailable: "object storage is unavailable; retrying",
  not_found: "the dataset, or an object it names, was not found",
  invalid_input: "invalid input",
  fenced: "the dataset is owned by another publisher",
  internal: "internal error",
  closed: "the replica was closed",
  untrusted: "the dataset failed a check against the trusted keys (signature, rollback or digest); the last good state is served",
};

/** `{ code, message, object?, lsn? }` of an error, safe to answer with. */
function safeError(e) {
  if (!e) return null;
  const code = typeof e.code === "string" && ERROR_MESSAGES[e.code] ? e.code : "internal";
  const out = { code, message: ERROR_MESSAGES[code] };
  if (typeof e.object === "string") out.object = e.object;
  if (typeof e.lsn === "number" && Number.isFinite(e.lsn)) out.lsn = e.lsn;
  return out;
}

function errorBody(e) {
  // Configuration errors are the worker's own words (they name a variable, not its value).
  if (e?.code === "config") return { error: { code: "config", message: String(e.message) } };
  return { error: safeError(e) };
}

/**
 * A read's promise, also handed to `defer` (ctx.waitUntil): should the
 * client go away, the GETs the read started (which other requests may be
 * waiting for) still finish.
 */
function kept(read, defer, ms) {
  const p = Promise.resolve(read);
  defer(p.catch(() => {}));
  // A lazy read that never settles (its I/O torn down with another request,
  // a sync it waits on stuck) answers 503 after `ms` and frees its scan slot.
  let t;
  const late = new Promise((_, reject) => {
    t = setTimeout(() => reject(Object.assign(new Error(`the read did not finish within ${ms} ms`), { code: "unavailable" })), ms);
  });
  return Promise.race([p, late]).finally(() => clearTimeout(t));
}

/**
 * The answer to a read that failed: 400 for bad input; in lazy mode a
 * snapshot block that failed verification or is missing is 502, a store
 * that does not answer 503.
 */
function readFailed(e, cors) {
  const code = e?.code;
  const status = code === "invalid_input" ? 400 : code === "data" || code === "not_found" ? 502 : code === "unavailable" || code === "closed" ? 503 : 500;
  return json(status, errorBody(e), undefined, cors);
}

function badRequest(message) {
  return { error: { code: "invalid_input", message } };
}

/** Resolves when `p` settles or after `ms`, whichever is first. */
function withDeadline(p, ms) {
  let t;
  return Promise.race([p, new Promise((resolve) => (t = setTimeout(resolve, ms)))]).finally(() => clearTimeout(t));
}

/**
 * Makes the request handler. `Replica` is the walcast package's class (the
 * runtime's entry); `log` receives background errors (default console.warn);
 * `stuckSyncMs`: see STUCK_SYNC_MS; `readTimeoutMs`: see READ_TIMEOUT_MS.
 * Returns `handle(request, env, defer)` where `defer(promise)` keeps a
 * background promise alive (ctx.waitUntil on Workers).
 */
export function createHandler(Replica, { log = (...a) => console.warn(...a), now = () => Date.now(), stuckSyncMs = STUCK_SYNC_MS, readTimeoutMs = READ_TIMEOUT_MS } = {}) {
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
      replacingSince: null,
      syncs: 0,
      restarts: 0,
      // Reads waiting for a min_lsn share one loop: no sync they start
      // begins before this time (ms; the last one's end plus a pause).
      minLsnNextAt: 0,
      minLsnPause: MIN_LSN_PAUSE_MS, // the next pause (backs off while nothing new is applied)
      minLsnSeen: -1, // the applied LSN after the last such sync
      minLsnSync: null, // the sync the pause was last set after, and that update
      minLsnUpdate: null,
      scans: 0, // lazy scans in progress
    };
    if (config.load === "lazy") {
      // A lazy replica's open is its first sync (the head and the tail after
      // the snapshot; no snapshot download).
      s.syncs++;
      s.syncStartedAt = now();
    }
    s.promise = Replica.open(config.url, replicaOptions(config)).then((r) => {
      s.replica = r;
      // An open that ended after it was given up for stuck: nobody reads it.
      if (s.abandoned) {
        r.close().catch(() => {});
        return r;
      }
      watch(s, r);
      if (config.load === "lazy") opened(s);
      return r;
    });
    s.promise.catch((e) => {
      if (config.load === "lazy") {
        s.lastSyncError = e;
        log(`walcast worker: opening the lazy replica failed: ${e?.code ?? ""} ${e?.message ?? e}`);
      }
      if (slot === s) slot = null; // let the next request try again
    });
    return s;
  }

  /**
   * The replica's state was replaced by an empty one (a new dataset at the
   * URL, or a rebuild after an internal error): until a sync succeeds there
   * is nothing to serve, so requests wait for it (or answer 503) as at start.
   */
  function watch(s, r) {
    if (typeof r.onReset !== "function") return;
    r.onReset(({ lsn }) => {
      if (lsn === 0 && s.replica === r) s.ready = false;
    });
  }

  /** A lazy replica opened: its open was a successful sync. */
  function opened(s) {
    s.ready = true;
    s.lastSyncAt = now();
    s.lastSyncError = null;
    s.syncStartedAt = null;
  }

  function replicaOptions(config) {
    const o = { persist: "memory" };
    if (config.headers) o.headers = config.headers;
    if (config.bucket) o.fetch = r2Fetch(config.bucket);
    if (config.concurrency !== undefined) o.concurrency = config.concurrency;
    if (config.trust.length) o.trust = config.trust;
    if (config.load === "lazy") {
      o.load = "lazy";
      if (config.cacheBytes !== undefined) o.cacheBytes = config.cacheBytes;
    }
    return o;
  }

  function progressMark(r) {
    try {
      const st = r.status();
      return `${st.requests}:${st.bytesReceived}`;
    } catch {
      // Being rebuilt after a trap (status() throws unavailable): the sync
      // this mark is taken for is what revives it.
      return "rebuilding";
    }
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
        // Operator logs; the dataset URL itself stays out of them.
        log(`walcast worker: sync failed: ${e?.code ?? ""} ${e?.message ?? e}`);
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
    log(`walcast worker: a sync made no progress in ${stuckSyncMs} ms; re-creating the replica`);
    const old = s.replica;
    let fresh;
    let reopened = false;
    try {
      // A lazy replica holds no whole state to carry over: it opens anew.
      if (s.config.load === "lazy") throw new Error("lazy");
      fresh = await Replica.restore(s.url, old.snapshot(), replicaOptions(s.config));
    } catch {
      fresh = await Replica.open(s.url, replicaOptions(s.config));
      reopened = true;
    }
    if (s.replica !== old || slot !== s) {
      // Another replacement ended first, or the slot was given up.
      fresh.close().catch(() => {});
      return s.replica;
    }
    if (reopened) {
      if (s.config.load === "lazy") opened(s);
      else s.ready = false;
    }
    s.replica = fresh;
    watch(s, fresh);
    s.promise = Promise.resolve(fresh);
    s.sync = null;
    s.syncStartedAt = null;
    s.restarts++;
    // The old replica's sync may never settle; close() would wait for it.
    return fresh;
  }

  async function replicaFor(env, defer, { waitForFirst = true } = {}) {
    const config = readConfig(env);
    if (!slot || slot.url !== config.url || slot.config.trust.join(",") !== config.trust.join(",")) {
      const old = slot;
      slot = openSlot(config);
      if (old?.replica) defer(old.replica.close().catch(() => {}));
    }
    let s = slot;
    if (s.config.load === "lazy" && !s.replica && now() - s.syncStartedAt > stuckSyncMs) {
      // The lazy open made no answer for longer than a live one can take:
      // its request's I/O is gone. Open anew.
      log(`walcast worker: the lazy replica's open did not end in ${stuckSyncMs} ms; opening it again`);
      const restarts = s.restarts + 1;
      s.abandoned = true;
      s = slot = openSlot(config);
      s.restarts = restarts;
    }
    if (s.config.load === "lazy" && !s.replica) {
      // The lazy replica's open is its first sync: wait as for one. Still
      // opening (or failed): no replica; the route answers 503.
      defer(s.promise.catch(() => {}));
      if (waitForFirst) await withDeadline(s.promise.catch(() => {}), s.config.firstSyncWaitMs);
      if (!s.replica) return s;
    }
    await s.promise;
    // A replacement pending for as long as a stuck sync is stuck too.
    if (s.sync && (!s.replacing || now() - s.replacingSince > stuckSyncMs)) {
      const mark = progressMark(s.replica);
      if (mark !== s.progressMark) {
        s.progressMark = mark;
        s.progressAt = now();
      } else if (now() - s.progressAt > stuckSyncMs) {
        const r = replaceStuck(s)
          .catch((e) => {
            s.lastSyncError = e;
            s.progressAt = now(); // the next attempt after another stuckSyncMs
            log(`walcast worker: re-creating the replica failed: ${e?.code ?? ""} ${e?.message ?? e}`);
          })
          .finally(() => {
            if (s.replacing === r) s.replacing = null;
          });
        s.replacing = r;
        s.replacingSince = now();
        defer(r);
      }
    }
    // The replica being replaced serves meanwhile (its state is one the
    // origin had); a request waits for the new one only when there is
    // nothing to serve yet, and then no longer than for a first sync.
    if (s.replacing && !s.ready) await withDeadline(s.replacing, s.config.firstSyncWaitMs);
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
    let cors;
    try {
      cors = corsHeaders(request, env);
    } catch {
      cors = {};
    }
    try {
      const res = await route(request, env, defer, cors);
      // Every answer says the LSN it was answered at, once there is one.
      if (!res.headers.has("walcast-lsn") && slot?.replica) {
        try {
          res.headers.set("walcast-lsn", String(slot.replica.status().appliedLsn));
        } catch {
          // immutable headers: answered without
        }
      }
      return res;
    } catch (e) {
      // Whatever went wrong, an answer (and the error's code only).
      log(`walcast worker: ${request.method} ${new URL(request.url).pathname} failed: ${e?.code ?? ""} ${e?.message ?? e}`);
      return json(e?.code === "invalid_input" ? 400 : 500, errorBody(e), undefined, cors);
    }
  }

  async function route(request, env, defer, cors) {
    const url = new URL(request.url);
    const path = url.pathname;
    if (request.method === "OPTIONS") {
      const headers = { ...cors };
      if (headers["access-control-allow-origin"]) {
        headers["access-control-allow-methods"] = "GET, HEAD, OPTIONS";
        headers["access-control-max-age"] = "86400";
        const asked = request.headers.get("access-control-request-headers");
        if (asked) headers["access-control-allow-headers"] = asked;
      }
      return new Response(null, { status: 204, headers });
    }
    // With AUTH_KEY, nothing (not even a 404) without a valid token.
    let refused;
    try {
      refused = await authorize(request, url, env, cors, now);
    } catch (e) {
      return json(500, errorBody(e), undefined, cors);
    }
    if (refused) return refused;
    const route = path.startsWith("/kv/") || path === "/kv" ? "kv" : path === "/scan" ? "scan" : path === "/status" ? "status" : null;
    if (!route) return json(404, { error: { code: "not_found", message: "no such route; try /kv/<key>, /scan, /status" } }, undefined, cors);
    if (request.method !== "GET" && request.method !== "HEAD") {
      return json(405, { error: { code: "method", message: `${request.method} is not allowed; use GET` } }, undefined, cors);
    }
    // The query is checked before anything waits on the replica.
    const q = queryBytes(url.search);
    if (q === null) return json(400, badRequest("query parameter names must be percent-encoded UTF-8"), undefined, cors);

    let s;
    try {
      s = await replicaFor(env, defer);
    } catch (e) {
      return json(e?.code === "config" ? 500 : 503, errorBody(e), undefined, cors);
    }
    const replica = s.replica;

    if (route === "status") {
      // A lazy replica still opening (or whose open failed) has no status of its own yet.
      const st = replica ? replica.status() : { appliedLsn: 0, committedLsn: 0, epoch: 0, lagMs: 0, state: "starting", requests: 0, bytesReceived: 0, lastError: s.lastSyncError };
      // The replica's state fields only: no URL, no error text.
      return json(200, {
        appliedLsn: st.appliedLsn,
        committedLsn: st.committedLsn,
        epoch: st.epoch,
        datasetId: st.datasetId ?? null,
        lagMs: st.lagMs,
        lagLsns: Math.max(0, st.committedLsn - st.appliedLsn),
        lastPollAt: st.lastPollAt ?? null,
        // A worker reads the head per request (plain conditional GETs): a
        // request's I/O cannot wait on a head read held for another.
        headReads: st.longPoll ? "long-poll" : "polling",
        state: st.state,
        // Public keys only: whether keys are pinned, and which one signed the head applied.
        trust: s.config.trust.length ? { keys: s.config.trust.length, signer: st.signer ?? null } : null,
        lastError: safeError(st.lastError),
        requests: st.requests,
        requestsByKind: st.requestsByKind ?? {},
        bytesReceived: st.bytesReceived,
        bytesByKind: st.bytesByKind ?? {},
        recoveries: st.recoveries ?? 0,
        mode: st.mode ?? s.config.load,
        cachedBytes: st.cachedBytes ?? 0,
        blocksFetched: st.blocksFetched ?? 0,
        overlayBytes: st.overlayBytes ?? 0,
        overlayEntries: st.overlayEntries ?? 0,
        worker: {
          ready: s.ready,
          lastSyncAt: s.lastSyncAt,
          syncing: s.sync !== null,
          syncs: s.syncs,
          restarts: s.restarts,
          maxAgeMs: s.config.maxAgeMs,
          lastSyncError: safeError(s.lastSyncError),
        },
      }, st.appliedLsn, cors);
    }

    if (!s.ready || !replica) {
      // No successful sync yet: nothing trustworthy to serve.
      const e = s.lastSyncError ?? replica?.status().lastError ?? { code: "unavailable" };
      return json(503, errorBody(e), undefined, cors);
    }
    // Read-your-writes: answer only once `min_lsn` is applied, else 503
    // with Retry-After when MIN_LSN_WAIT_MS pass (an LSN beyond anything
    // committed included: never a hang).
    const minLsn = route === "status" ? null : minLsnOf(request, q);
    if (minLsn === undefined) return json(400, badRequest("min_lsn (or Walcast-Min-Lsn) must be an LSN: an integer >= 0"), undefined, cors);
    if (minLsn !== null) {
      const until = now() + s.config.minLsnWaitMs;
      for (;;) {
        const st = replica.status();
        if (st.appliedLsn >= minLsn) break;
        const left = until - now();
        if (left <= 0) {
          const res = json(
            503,
            { error: { code: "not_applied", message: "the requested LSN is not applied yet; retry", lsn: minLsn } },
            st.appliedLsn,
            cors,
          );
          res.headers.set("retry-after", "1");
          return res;
        }
        // Every waiting read pauses until the same time, then joins the one
        // sync in flight: concurrent waits make one loop of GETs, not one each.
        const pause = s.minLsnNextAt - now();
        if (pause > 0) {
          await sleep(Math.min(pause, left));
          continue;
        }
        const sync = startSync(s);
        let p = sync;
        if (s.minLsnSync !== sync) {
          // Once per sync, however many reads wait on it: a pause before
          // asking the store again, longer each time it had nothing new.
          s.minLsnSync = sync;
          p = sync.then(() => {
            const applied = s.replica.status().appliedLsn;
            s.minLsnPause = applied > s.minLsnSeen ? MIN_LSN_PAUSE_MS : Math.min(s.minLsnPause * 2, MAX_MIN_LSN_PAUSE_MS);
            s.minLsnSeen = applied;
            s.minLsnNextAt = Math.max(s.minLsnNextAt, now() + s.minLsnPause);
          });
          s.minLsnUpdate = p;
        } else {
          p = s.minLsnUpdate;
        }
        defer(p);
        await withDeadline(p, left);
      }
    }
    if (route === "kv") {
      // /kv/<key>, or /kv?key=<key> for keys the URL parser would rewrite
      // (dot segments such as "a/../b").
      let key;
      if (path === "/kv") {
        if (!q.has("key")) return json(400, badRequest("use /kv/<key> or /kv?key=<key>"), undefined, cors);
        key = q.get("key");
      } else {
        key = percentBytes(path.slice("/kv/".length));
      }
      // The LSN the answer is read at, or below it: taken before a lazy
      // read (which may fetch blocks while a sync applies more), so that an
      // answer is never labelled with an LSN newer than its data.
      const lsn = replica.status().appliedLsn;
      let value;
      try {
        // A promise in lazy mode (it may fetch snapshot blocks).
        value = await kept(replica.get(key), defer, readTimeoutMs);
      } catch (e) {
        return readFailed(e, cors);
      }
      if (value === undefined) return json(404, { error: { code: "not_found", message: "no such key" } }, lsn, cors);
      return new Response(request.method === "HEAD" ? null : value, {
        status: 200,
        headers: {
          "cache-control": "no-store",
          ...cors,
          "content-type": "application/octet-stream",
          "content-length": String(value.byteLength),
          "walcast-lsn": String(lsn),
          "x-walcast-lsn": String(lsn),
        },
      });
    }

    // scan
    const lsn = replica.status().appliedLsn;
    let limit = s.config.scanLimit;
    if (q.has("limit")) {
      const raw = text(q.get("limit"));
      if (!/^\d+$/.test(raw ?? "")) return json(400, badRequest("limit must be an integer >= 0"), undefined, cors);
      limit = Number(raw);
    }
    if (limit > s.config.maxScanLimit) limit = s.config.maxScanLimit;
    const opts = { limit, maxBytes: s.config.scanMaxBytes };
    for (const f of ["prefix", "start", "end"]) if (q.has(f)) opts[f] = q.get(f);
    if (opts.start !== undefined && opts.end !== undefined && compareBytes(opts.start, opts.end) > 0) {
      return json(400, badRequest("start must not sort after end (start is inclusive, end exclusive)"), lsn, cors);
    }
    // Lazy scans at once are capped below what the module keeps open (64):
    // past that, each step would evict the scan stepped next, and every scan
    // would start over for ever, fetching blocks.
    const lazyScan = s.config.load === "lazy" && limit > 0;
    if (lazyScan && s.scans >= s.config.maxConcurrentScans) {
      const res = json(503, { error: { code: "busy", message: "too many scans at once; retry" } }, lsn, cors);
      res.headers.set("retry-after", "1");
      return res;
    }
    let rows;
    if (lazyScan) s.scans++;
    try {
      rows = limit === 0 ? [] : await kept(replica.scan(opts), defer, readTimeoutMs);
    } catch (e) {
      return readFailed(e, cors);
    } finally {
      if (lazyScan) s.scans--;
    }
    // The module cut the rows at SCAN_MAX_BYTES of keys and values; the
    // answer is cut at it too, counting keys and values as they are
    // answered: JSON escapes a control byte as six (`\u0001`; a value of
    // small varints is valid UTF-8) and base64 takes four for three, so
    // rows of 4 MiB could otherwise answer 24 MiB.
    let bytes = 0; // the rows' keys and values
    let answered = 0; // the same, as the answer encodes them
    let cut = false; // cut here, before the module's end
    let last = null;
    const parts = [];
    for (let i = 0; i < rows.length && !cut; i++) {
      const { key, value } = rows[i];
      last = typeof key === "string" ? encoder.encode(key) : key;
      bytes += last.byteLength + value.byteLength;
      const k = typeof key === "string" ? JSON.stringify(key) : `"${toBase64(key)}"`;
      const t = text(value);
      const v = t !== undefined ? JSON.stringify(t) : `"${toBase64(value)}"`;
      parts.push(`{"${typeof key === "string" ? "key" : "key_b64"}":${k},"${t !== undefined ? "value" : "value_b64"}":${v}}`);
      answered += encoder.encode(k).byteLength + encoder.encode(v).byteLength - 4; // (quotes aside)
      cut = answered >= s.config.scanMaxBytes && i < rows.length - 1;
    }
    const res = jsonText(200, `[${parts.join(",")}]`, lsn, cors);
    // Cut by SCAN_MAX_BYTES: the next page starts past the last key.
    if ((cut || (rows.length < limit && bytes >= s.config.scanMaxBytes)) && last) {
      res.headers.set("walcast-scan-next", percentEncode([...last, 0]));
    }
    return res;
  }

  return handle;
}
