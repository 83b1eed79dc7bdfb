// The GETs the module asks for: the runtime's fetch with a deadline, bodies
// read as bounded streams, redirects with the caller's headers kept within
// the origin, gzip heads decoded; and the kinds of object they are counted by.

import { EMPTY } from "./util.js";

/** The kinds of GET counted in `status().requestsByKind` and `bytesByKind`. */
const KINDS = ["head", "longPoll", "page", "segment", "snapshot", "delta", "other"];

/** A count of 0 for each kind. */
export function zeroKinds() {
  const o = {};
  for (const k of KINDS) o[k] = 0;
  return o;
}

/** Which kind of object a GET reads, from its key (docs/FORMAT.md names them). */
export function kindOf(req) {
  const key = req.key;
  if (key === "catalog/head.json") return req.wait != null ? "longPoll" : "head";
  if (key.startsWith("catalog/pages/")) return "page";
  if (key.startsWith("segments/")) return "segment";
  if (key.startsWith("snapshots/")) return "snapshot";
  if (key.startsWith("deltas/")) return "delta";
  return "other";
}

let cacheField; // whether fetch takes `cache: "no-store"` (older workerd does not)
function cacheFieldSupported() {
  if (cacheField === undefined) {
    try {
      new Request("http://127.0.0.1/", { cache: "no-store" });
      cacheField = true;
    } catch {
      cacheField = false;
    }
  }
  return cacheField;
}

/**
 * The runtime's text of a failed fetch, with every URL in it (which may
 * carry the dataset URL's credentials or `?token=`) replaced by the
 * object's key, as the native replica leaves the URL out of its errors.
 */
function errorText(e, io, key) {
  let text = `${e?.name ?? "Error"}: ${e?.message ?? e}`.replace(/[a-z][a-z0-9+.-]*:\/\/[^\s'"`<>]*[^\s'"`<>),.:;]/gi, key);
  if (io.query) text = text.split(io.query).join("");
  return text;
}

/**
 * Reads at most `limit` bytes of `res`'s body, as a stream: it stops there
 * and cancels the rest, whatever Content-Length claims. With `signal`, an
 * abort cancels the stream too (a custom fetch may ignore the signal, and
 * its body would otherwise be read on past the GET's deadline).
 */
async function readBounded(res, limit, signal) {
  if (!res.body) return EMPTY;
  const reader = res.body.getReader();
  const chunks = [];
  let total = 0;
  let complete = false;
  // A declared length within the bound: the body goes straight into one
  // buffer of that size, so a large answer is not held twice (its chunks,
  // then their join). Past it (a length that lied, a body the runtime
  // decoded), the chunks are gathered and joined as without one.
  const declared = Number(res.headers?.get?.("content-length") ?? NaN);
  let buf = Number.isSafeInteger(declared) && declared > 0 && declared <= limit ? new Uint8Array(declared) : null;
  const cancel = () => reader.cancel().catch(() => {});
  if (signal?.aborted) cancel();
  signal?.addEventListener("abort", cancel, { once: true });
  try {
    while (total < limit) {
      const { done, value } = await reader.read();
      if (done) {
        complete = true;
        break;
      }
      const room = limit - total;
      const chunk = value.byteLength > room ? value.subarray(0, room) : value;
      if (buf && total + chunk.byteLength <= buf.byteLength) buf.set(chunk, total);
      else {
        if (buf) chunks.push(buf.subarray(0, total));
        buf = null;
        chunks.push(chunk);
      }
      total += chunk.byteLength;
    }
    // (A stream cancelled by the abort ends as if done.)
    if (signal?.aborted) throw new Error("aborted");
  } finally {
    signal?.removeEventListener("abort", cancel);
    if (!complete) cancel();
  }
  if (buf) return total === buf.byteLength ? buf : buf.slice(0, total);
  if (chunks.length === 1) return chunks[0];
  const out = new Uint8Array(total);
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.byteLength;
  }
  return out;
}

/**
 * A head stored gzip-compressed (`--head-encoding gzip`) that reached us
 * as stored (a server that does not label it, file storage behind a plain
 * HTTP server): decoded here, at most `limit` bytes of it, as the module
 * reads JSON only. An HTTP client that decodes Content-Encoding hands over
 * JSON already. A stream that does not decode is handed over as it came,
 * and the module refuses it as a data error naming the head.
 */
async function gunzipHead(body, limit) {
  if (body.byteLength < 2 || body[0] !== 0x1f || body[1] !== 0x8b || typeof DecompressionStream !== "function") return body;
  try {
    // The compressed bytes go in 1 KiB at a time, as the decoder asks for
    // them: some runtimes (Deno, workerd) inflate a whole chunk before the
    // bound can stop them, and 1 MiB of gzip inflates to 1 GiB.
    let at = 0;
    const src = new ReadableStream(
      {
        pull(c) {
          if (at < body.byteLength) c.enqueue(body.subarray(at, (at += 1024)));
          else c.close();
        },
      },
      { highWaterMark: 0 },
    );
    const json = await readBounded({ body: src.pipeThrough(new DecompressionStream("gzip")) }, limit);
    // One member and nothing after it, as native readers take it: some
    // runtimes skip zero bytes after a stream or join further members,
    // which leaves the stored trailer's length (ISIZE) not the one decoded.
    const n = body.byteLength;
    const isize = (body[n - 4] | (body[n - 3] << 8) | (body[n - 2] << 16) | (body[n - 1] << 24)) >>> 0;
    return json.byteLength < limit && isize !== json.byteLength % 2 ** 32 ? body : json;
  } catch {
    return body;
  }
}

/**
 * Performs one GET the module asked for; resolves `{ status, body, etag,
 * contentRange, message }` (status 0: no response), never rejects, and
 * always within `req.timeoutMs` (even when a custom fetch ignores the abort
 * signal): the module waits for an answer to every GET it asked for.
 */
export function performGet(io, req, ac) {
  let timer;
  const deadline = new Promise((resolve) => {
    timer = setTimeout(() => {
      ac.abort();
      resolve({ status: 0, message: `no answer within ${req.timeoutMs} ms` });
    }, req.timeoutMs);
  });
  return Promise.race([fetchOnce(io, req, ac), deadline]).finally(() => clearTimeout(timer));
}

async function fetchOnce(io, req, ac) {
  let status = 0;
  try {
    const h = {};
    let own = 0; // headers of the caller's (credentials, perhaps)
    for (const [k, v] of io.headers) (h[k] = v), own++;
    if (req.range) h.range = req.range;
    if (req.ifNoneMatch) h["if-none-match"] = req.ifNoneMatch;
    // A long-poll: the wait hint as RFC 7240 asks and in the query (for caches to key on).
    if (req.wait != null) h.prefer = `wait=${req.wait}`;
    const init = { headers: h, signal: ac.signal };
    // Our own If-None-Match must reach the server; no HTTP cache may answer for us.
    if (cacheFieldSupported()) init.cache = "no-store";
    // With the caller's headers (an API key, a CDN's secret), redirects are
    // followed by hand and only within the origin, as the native replica
    // does: a hostile or misconfigured Location must not receive them.
    if (own) init.redirect = "manual";
    // The global fetch is looked up on every request, so a caller may wrap or replace it.
    let url = `${io.base}/${req.key}${io.query}`;
    if (req.wait != null) url += `${io.query ? "&" : "?"}wait=${req.wait}`;
    let res = await (io.fetch ? io.fetch(url, init) : globalThis.fetch(url, init));
    for (let hops = 0; own && (res.type === "opaqueredirect" || (res.status >= 300 && res.status < 400 && res.status !== 304)); hops++) {
      if (res.body) res.body.cancel().catch(() => {});
      const location = res.headers.get("location");
      const next = location == null ? null : new URL(location, url);
      if (!next || next.origin !== new URL(url).origin || hops === 5) {
        const why = !next ? "a redirect whose target the runtime does not show" : hops === 5 ? "more than 5 redirects" : `a redirect to another origin (${next.origin})`;
        return { status: 0, message: `${why}, not followed: the replica's headers would go with it` };
      }
      url = next.href;
      res = await (io.fetch ? io.fetch(url, init) : globalThis.fetch(url, init));
    }
    // Past the deadline (a fetch that ignored the signal): answered already.
    if (ac.signal.aborted) {
      if (res.body) res.body.cancel().catch(() => {});
      return { status: 0, message: `no answer within ${req.timeoutMs} ms` };
    }
    status = res.status;
    // Whether the server holds long-polls (each head answer says afresh).
    const longPoll = res.headers.get("walcast-long-poll");
    if (status !== 200 && status !== 206) {
      if (res.body) res.body.cancel().catch(() => {});
      // A refused token says why (walcast serve and the worker:
      // `error_description="expired"`, "missing", "wrong_prefix", ...).
      const why = status === 401 || status === 403
        ? /error_description="([^"]{1,64})"/.exec(res.headers.get("www-authenticate") ?? "")?.[1]
        : undefined;
      return { status, longPoll, message: why && `HTTP ${status} (${why})` };
    }
    let body = await readBounded(res, req.maxBytes + 1, ac.signal);
    if (req.key === "catalog/head.json") body = await gunzipHead(body, req.maxBytes + 1);
    const contentRange = res.headers.get("content-range");
    // (The module refuses a 206 whose Content-Range it cannot parse; this says why.)
    const message = status === 206 ? `a 206 answer without a valid Content-Range (${contentRange ?? "none"})` : undefined;
    return { status, body, etag: res.headers.get("etag"), contentRange, longPoll, message };
  } catch (e) {
    const message = ac.signal.aborted ? `no answer within ${req.timeoutMs} ms` : errorText(e, io, req.key);
    return { status, message: status ? `reading the body: ${message}` : message };
  }
}
