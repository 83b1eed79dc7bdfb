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
// most 64: more answer 503 `busy` with Retry-After), SCAN_MEMORY_BYTES (the
// memory lazy scans at once may take, each counted at twice SCAN_MAX_BYTES,
// 32 MiB: more answer 503 `busy`; one always runs), MAX_CONCURRENT_READS
// (lazy /kv reads at once, 1024, at most 4096: more answer 503 `busy` with
// Retry-After), MAX_WAITING_REQUESTS (requests waiting for the first sync
// or a min_lsn at once, 1024, at most 65536: more answer 503 `busy` with
// Retry-After), MIN_LSN_WAIT_MS (how long a read with `?min_lsn=N`
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
import { r2Fetch } from "./r2.js";
import { badRequest, compareBytes, corsHeaders, encoder, errorBody, json, jsonText, minLsnOf, percentBytes, percentEncode, queryBytes, readFailed, safeError, escapedLength, text, toBase64 } from "./answers.js";
import { MAX_MIN_LSN_PAUSE_MS, MIN_LSN_PAUSE_MS, READ_TIMEOUT_MS, STUCK_SYNC_MS, authOn, authPrefix, configError, readConfig } from "./config.js";

export { percentBytes } from "./answers.js";

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

/** Sleeps `ms`. */
function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * A read's promise, also handed to `defer` (ctx.waitUntil): should the
 * client go away, the GETs the read started (which other requests may be
 * waiting for) still finish.
 */
function kept(read, defer, ms) {
  // A lazy read that never settles (its I/O torn down with another request,
  // a sync it waits on stuck) answers 503 after `ms` and frees its slot;
  // the read is aborted, so it leaves the replica's queue of reads waiting
  // for a turn and fetches nothing more for a request already answered.
  const ac = new AbortController();
  const p = Promise.resolve(read(ac.signal));
  defer(p.catch(() => {}));
  let t;
  const late = new Promise((_, reject) => {
    t = setTimeout(() => {
      reject(Object.assign(new Error(`the read did not finish within ${ms} ms`), { code: "unavailable" }));
      ac.abort();
    }, ms);
  });
  return Promise.race([p, late]).finally(() => clearTimeout(t));
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
      reads: 0, // lazy point reads in progress
      waiting: 0, // requests waiting for a first sync or a min_lsn
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
    const r = s.replica;
    const p = r.sync().then(
      () => {
        // A replica replaced while this sync was out (stuck, then carried
        // over or opened anew) is not the one this sync brought up to date.
        if (s.replica !== r) return;
        s.ready = true;
        s.lastSyncAt = now();
        s.lastSyncError = null;
      },
      (e) => {
        if (s.replica !== r) return;
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

  /**
   * Waits for `p` at most `ms`, unless MAX_WAITING_REQUESTS requests wait
   * already: then at once, with `turn.busy` set (the route answers 503
   * `busy` if there is still nothing to serve).
   */
  async function waitTurn(s, p, ms, turn) {
    if (!(await asWaiting(s, () => withDeadline(p, ms)))) turn.busy = true;
  }

  /**
   * Runs `wait()` as one of at most MAX_WAITING_REQUESTS waiting requests;
   * false, without running it, when that many wait already.
   */
  async function asWaiting(s, wait) {
    if (s.waiting >= s.config.maxWaitingRequests) return false;
    s.waiting++;
    try {
      await wait();
    } finally {
      s.waiting--;
    }
    return true;
  }

  async function replicaFor(env, defer, turn = {}) {
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
      await waitTurn(s, s.promise.catch(() => {}), s.config.firstSyncWaitMs, turn);
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
    if (s.replacing && !s.ready) await waitTurn(s, s.replacing, s.config.firstSyncWaitMs, turn);
    if (!s.ready) {
      // The isolate's first request (or every request until a sync succeeds)
      // waits for the initial sync.
      const p = startSync(s);
      defer(p);
      await waitTurn(s, p, s.config.firstSyncWaitMs, turn);
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
    // Set by route() once the request is authorized: a refused request (and
    // a preflight, which carries no token) learns nothing of the dataset,
    // not even its LSN.
    const req = { authorized: false };
    try {
      const res = await route(request, env, defer, cors, req);
      // Every answer says the LSN it was answered at, once there is one.
      if (req.authorized && !res.headers.has("walcast-lsn") && slot?.replica) {
        try {
          res.headers.set("walcast-lsn", String(slot.replica.status().appliedLsn));
        } catch {
          // immutable headers: answered without
        }
      }
      return res;
    } catch (e) {
      // Whatever went wrong, an answer (and the error's code only).
      let where = "";
      try {
        where = ` ${new URL(request.url).pathname}`;
      } catch {
        // a URL the runtime could not make whole (an empty Host): unnamed
      }
      log(`walcast worker: ${request.method}${where} failed: ${e?.code ?? ""} ${e?.message ?? e}`);
      // By its code, as a read's failure: a replica being rebuilt after a
      // trap (`unavailable`) is 503 with Retry-After, not 500.
      return readFailed(e, cors);
    }
  }

  /**
   * Read-your-writes: waits until `minLsn` is applied (undefined), or
   * answers 503 with Retry-After when MIN_LSN_WAIT_MS pass (an LSN beyond
   * anything committed included: never a hang).
   */
  async function waitForLsn(s, replica, minLsn, cors, defer) {
    const until = now() + s.config.minLsnWaitMs;
    for (;;) {
      const st = replica.status();
      if (st.appliedLsn >= minLsn) return undefined;
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
      // (A status() that throws, the replica being rebuilt, rejects p: the
      // request answers 503; the kept copy logs no unhandled rejection.)
      defer(p.catch(() => {}));
      await withDeadline(p, left);
    }
  }

  async function route(request, env, defer, cors, req) {
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
    req.authorized = true;
    const route = path.startsWith("/kv/") || path === "/kv" ? "kv" : path === "/scan" ? "scan" : path === "/status" ? "status" : null;
    if (!route) return json(404, { error: { code: "not_found", message: "no such route; try /kv/<key>, /scan, /status" } }, undefined, cors);
    if (request.method !== "GET" && request.method !== "HEAD") {
      return json(405, { error: { code: "method", message: `${request.method} is not allowed; use GET` } }, undefined, cors);
    }
    // The query is checked before anything waits on the replica.
    const q = queryBytes(url.search);
    if (q === null) return json(400, badRequest("query parameter names must be percent-encoded UTF-8"), undefined, cors);
    // Everything a request asks is checked here too: a malformed one is
    // answered 400 at once, not after waiting for the first sync.
    const minLsn = route === "status" ? null : minLsnOf(request, q);
    if (minLsn === undefined) return json(400, badRequest("min_lsn (or Walcast-Min-Lsn) must be an LSN: an integer >= 0"), undefined, cors);
    let key;
    if (route === "kv") {
      // /kv/<key>, or /kv?key=<key> for keys the URL parser would rewrite
      // (dot segments such as "a/../b").
      if (path === "/kv") {
        if (!q.has("key")) return json(400, badRequest("use /kv/<key> or /kv?key=<key>"), undefined, cors);
        key = q.get("key");
      } else {
        key = percentBytes(path.slice("/kv/".length));
      }
    }
    let askedLimit = null;
    if (route === "scan") {
      if (q.has("limit")) {
        const raw = text(q.get("limit"));
        if (!/^\d+$/.test(raw ?? "")) return json(400, badRequest("limit must be an integer >= 0"), undefined, cors);
        askedLimit = Number(raw);
      }
      if (q.has("start") && q.has("end") && compareBytes(q.get("start"), q.get("end")) > 0) {
        return json(400, badRequest("start must not sort after end (start is inclusive, end exclusive)"), undefined, cors);
      }
    }

    let s;
    const turn = { busy: false };
    try {
      s = await replicaFor(env, defer, turn);
    } catch (e) {
      if (e?.code === "config") return json(500, errorBody(e), undefined, cors);
      // Not open (yet): worth a retry.
      const res = json(503, errorBody(e), undefined, cors);
      res.headers.set("retry-after", "1");
      return res;
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
      // No successful sync yet: nothing trustworthy to serve (503 with
      // Retry-After, whatever the sync's error was; `busy` for a request
      // that found too many waiting to wait itself).
      const e = turn.busy ? { code: "busy", message: "too many requests waiting for the first sync; retry" } : (s.lastSyncError ?? replica?.status().lastError ?? { code: "unavailable" });
      const res = json(503, errorBody(e), undefined, cors);
      res.headers.set("retry-after", "1");
      return res;
    }
    // Read-your-writes (waitForLsn), with at most MAX_WAITING_REQUESTS
    // requests waiting at once.
    if (minLsn !== null && replica.status().appliedLsn < minLsn) {
      let res;
      if (!(await asWaiting(s, async () => (res = await waitForLsn(s, replica, minLsn, cors, defer))))) {
        res = json(503, { error: { code: "busy", message: "too many requests waiting at once; retry" } }, replica.status().appliedLsn, cors);
        res.headers.set("retry-after", "1");
      }
      if (res) return res;
    }
    if (route === "kv") {
      // The LSN the answer is read at, or below it: taken before a lazy
      // read (which may fetch blocks while a sync applies more), so that an
      // answer is never labelled with an LSN newer than its data.
      const lsn = replica.status().appliedLsn;
      const lazyRead = s.config.load === "lazy";
      if (lazyRead && s.reads >= s.config.maxConcurrentReads) {
        const res = json(503, { error: { code: "busy", message: "too many reads at once; retry" } }, lsn, cors);
        res.headers.set("retry-after", "1");
        return res;
      }
      let value;
      if (lazyRead) s.reads++;
      try {
        // A promise in lazy mode (it may fetch snapshot blocks).
        value = await kept((signal) => replica.get(key, { signal }), defer, readTimeoutMs);
      } catch (e) {
        return readFailed(e, cors);
      } finally {
        if (lazyRead) s.reads--;
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
    // Whether the rows may end at a limit the caller did not ask for
    // (SCAN_LIMIT when it gave none, MAX_SCAN_LIMIT below what it gave):
    // a page that ends there says where the next one starts.
    let imposed = true;
    if (askedLimit !== null) {
      limit = askedLimit;
      imposed = false;
    }
    if (limit > s.config.maxScanLimit) {
      limit = s.config.maxScanLimit;
      imposed = true;
    }
    const opts = { limit, maxBytes: s.config.scanMaxBytes };
    for (const f of ["prefix", "start", "end"]) if (q.has(f)) opts[f] = q.get(f);
    // Lazy scans at once are capped below what the module keeps open (64):
    // past that, each step would evict the scan stepped next, and every scan
    // would start over for ever, fetching blocks.
    // And by the memory they may take together (SCAN_MEMORY_BYTES), each
    // counted at twice SCAN_MAX_BYTES: its rows, then their merge.
    const lazyScan = s.config.load === "lazy" && limit > 0;
    const scanMemory = (s.scans + 1) * 2 * s.config.scanMaxBytes;
    if (lazyScan && (s.scans >= s.config.maxConcurrentScans || (s.scans > 0 && scanMemory > s.config.scanMemoryBytes))) {
      const res = json(503, { error: { code: "busy", message: "too many scans at once; retry" } }, lsn, cors);
      res.headers.set("retry-after", "1");
      return res;
    }
    let rows;
    if (lazyScan) s.scans++;
    try {
      rows = limit === 0 ? [] : await kept((signal) => replica.scan({ ...opts, signal }), defer, readTimeoutMs);
    } catch (e) {
      return readFailed(e, cors);
    } finally {
      if (lazyScan) s.scans--;
    }
    // The module cut the rows at SCAN_MAX_BYTES of keys and values; the
    // answer is cut at it too, counting keys and values as they are
    // answered. A value goes as text only when JSON's escapes (six bytes
    // for a control byte: a value of small varints is valid UTF-8) take no
    // more than base64's four for three, so no value answers more than
    // 4/3 of its bytes.
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
      const b64 = 4 * Math.ceil(value.byteLength / 3);
      const escaped = escapedLength(value);
      const t = escaped <= b64 ? text(value) : undefined;
      const v = t !== undefined ? JSON.stringify(t) : `"${toBase64(value)}"`;
      parts.push(`{"${typeof key === "string" ? "key" : "key_b64"}":${k},"${t !== undefined ? "value" : "value_b64"}":${v}}`);
      answered += encoder.encode(k).byteLength - 2 + (t !== undefined ? escaped : b64); // (quotes aside)
      cut = answered >= s.config.scanMaxBytes && i < rows.length - 1;
    }
    const res = jsonText(200, `[${parts.join(",")}]`, lsn, cors);
    // Cut by SCAN_MAX_BYTES, or ended at a limit the caller did not set:
    // the next page starts past the last key.
    if ((cut || (rows.length < limit && bytes >= s.config.scanMaxBytes) || (imposed && rows.length === limit)) && last) {
      res.headers.set("walcast-scan-next", percentEncode([...last, 0]));
    }
    return res;
  }

  return handle;
}
