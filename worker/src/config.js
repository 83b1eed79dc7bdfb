// The worker's configuration: its variables (Worker vars / Deno env) read and
// checked, with the defaults and bounds they fall back to.

import { R2_ORIGIN, isR2Bucket } from "./r2.js";

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

// The memory lazy scans in progress may take together (SCAN_MEMORY_BYTES):
// until it answers, a scan holds up to twice SCAN_MAX_BYTES in the module
// (the rows it collected, then their merge with the newer writes), and the
// module's memory never shrinks. Scans past it answer 503 `busy`; one scan
// always runs.
const DEFAULT_SCAN_MEMORY_BYTES = 32 << 20;

// Lazy point reads in progress at once (MAX_CONCURRENT_READS): the module
// runs 32 of them and queues the rest, so a flood of /kv requests would
// otherwise queue reads without bound, each run long after its request
// answered 503, fetching blocks nobody waits for.
const DEFAULT_MAX_CONCURRENT_READS = 1024;
const MAX_CONCURRENT_READS = 4096;

// Requests waiting at once, for the first sync or for a `min_lsn`
// (MAX_WAITING_REQUESTS), in either mode. Each holds its request and its
// promises for up to FIRST_SYNC_WAIT_MS or MIN_LSN_WAIT_MS: a flood of them
// against a dataset that is slow or never answers would otherwise fill the
// isolate's memory. More answer 503 `busy` at once.
const DEFAULT_MAX_WAITING_REQUESTS = 1024;
const MAX_WAITING_REQUESTS = 65536;

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
export const STUCK_SYNC_MS = 180_000;

// A read (lazy mode: its block GETs) that has not finished after this long
// answers 503 `unavailable`, and a scan's slot is freed: longer than a
// block GET's limit plus a retry.
export const READ_TIMEOUT_MS = 90_000;

// The first request waits at most this long for the initial sync, then
// answers 503 (the sync goes on in the background).
const DEFAULT_FIRST_SYNC_WAIT_MS = 30_000;

/**
 * The pause between the syncs that reads waiting for a `min_lsn` start: 100
 * ms after a sync that applied something, doubling after each that did not,
 * up to a second. A read-your-writes LSN lands within the first few pauses;
 * requests naming an LSN that never comes cost a head GET a second, not ten.
 */
export const MIN_LSN_PAUSE_MS = 100;
export const MAX_MIN_LSN_PAUSE_MS = 1_000;

/** How long a read with `min_lsn` waits for that LSN before answering 503. */
const DEFAULT_MIN_LSN_WAIT_MS = 5_000;

/** The longest wait a timer can hold (2^31 - 1 ms): a longer one fires at once. */
const MAX_WAIT_MS = 2 ** 31 - 1;

function intVar(env, name, dflt, min = 0, max = Infinity) {
  const raw = env?.[name];
  if (raw === undefined || raw === null || raw === "") return dflt;
  const n = Number(raw);
  if (!Number.isFinite(n) || n < min) throw configError(`${name} must be a number >= ${min}`);
  if (n > max) throw configError(`${name} must be at most ${max}`);
  return Math.floor(n);
}

export function configError(message) {
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

export function readConfig(env) {
  // A private R2 bucket bound as BUCKET is read through the binding.
  const bucket = isR2Bucket(env?.BUCKET) ? env.BUCKET : null;
  let url = env?.DATASET_URL;
  if (bucket) {
    const prefix = String(env.DATASET_PREFIX ?? "").replace(/^\/+|\/+$/g, "");
    // A "." or ".." segment would name another prefix once the URL is
    // normalized than the one AUTH_PREFIX (default: this) lets tokens cover.
    const dots = (seg) => {
      let d = seg;
      try {
        d = decodeURIComponent(seg);
      } catch {
        // not percent-encoding: as it is
      }
      return seg === "." || seg === ".." || d === "." || d === "..";
    };
    if (prefix.split("/").some(dots)) throw configError('DATASET_PREFIX must not hold "." or ".." segments');
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
    scanMemoryBytes: intVar(env, "SCAN_MEMORY_BYTES", DEFAULT_SCAN_MEMORY_BYTES, 1),
    maxConcurrentReads: Math.min(intVar(env, "MAX_CONCURRENT_READS", DEFAULT_MAX_CONCURRENT_READS, 1), MAX_CONCURRENT_READS),
    maxWaitingRequests: Math.min(intVar(env, "MAX_WAITING_REQUESTS", DEFAULT_MAX_WAITING_REQUESTS, 1), MAX_WAITING_REQUESTS),
    firstSyncWaitMs: intVar(env, "FIRST_SYNC_WAIT_MS", DEFAULT_FIRST_SYNC_WAIT_MS, 0, MAX_WAIT_MS),
    minLsnWaitMs: intVar(env, "MIN_LSN_WAIT_MS", DEFAULT_MIN_LSN_WAIT_MS, 0, MAX_WAIT_MS),
  };
}

/**
 * CORS_ORIGINS: "*" (the default) or a comma-separated list of origins
 * (`https://app.example.com`). Returns null for "*", else the set.
 */
export function corsOrigins(env) {
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

export function authOn(env) {
  return env?.AUTH_KEY !== undefined && env?.AUTH_KEY !== null && String(env.AUTH_KEY).trim() !== "";
}

/**
 * AUTH_PREFIX: the dataset's path the worker's tokens must cover (no
 * leading or trailing "/"). Default: DATASET_PREFIX with a BUCKET, else the
 * path of DATASET_URL, so a token for `walcast serve`'s `app/…` is good for
 * the worker serving `…/app` too.
 */
export function authPrefix(env) {
  if (env.AUTH_PREFIX !== undefined && env.AUTH_PREFIX !== null) return String(env.AUTH_PREFIX).replace(/^\/+|\/+$/g, "");
  if (isR2Bucket(env.BUCKET)) return String(env.DATASET_PREFIX ?? "").replace(/^\/+|\/+$/g, "");
  try {
    return decodeURIComponent(new URL(env.DATASET_URL).pathname).replace(/^\/+|\/+$/g, "");
  } catch {
    return "";
  }
}
