// A fetch over an R2 bucket binding, for a replica of a private bucket: the
// worker reads the dataset through `env.BUCKET` (no public bucket, no
// credentials in DATASET_URL). It answers the GETs a walcast replica makes
// the way an HTTP server would:
//
//   GET <origin>/<key>                    200 with the object, 404 when absent
//   Range: bytes=a-b | bytes=a- | bytes=-n   206 with Content-Range, 416 when
//                                         the range starts past the end
//   If-None-Match: "<etag>"               304 when the object's ETag matches
//
// Every answer carries the object's ETag (quoted, as R2 gives it in
// `httpEtag`). Keys are the URL's path after the origin, percent-decoded.
//
//   import { r2Fetch, R2_ORIGIN } from "./r2.js";
//   Replica.open(`${R2_ORIGIN}/app`, { fetch: r2Fetch(env.BUCKET) });

/** The origin of the URLs an R2 fetch answers (any origin is accepted; this one names the binding). */
export const R2_ORIGIN = "https://r2.invalid";

/** Whether `b` looks like an R2 bucket binding (it has `get` and `head`). */
export function isR2Bucket(b) {
  return !!b && typeof b === "object" && typeof b.get === "function" && typeof b.head === "function";
}

/**
 * A `Range` header's value as an R2 range: `{ offset, length }`,
 * `{ offset }` or `{ suffix }`; undefined without one; null for a value that
 * is not a single byte range (answered 416, as a server would).
 */
export function parseRange(value) {
  if (value === null || value === undefined || value === "") return undefined;
  const m = /^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$/i.exec(String(value));
  if (!m || (m[1] === "" && m[2] === "")) return null;
  if (m[1] === "") {
    const suffix = Number(m[2]);
    return Number.isSafeInteger(suffix) && suffix > 0 ? { suffix } : null;
  }
  const offset = Number(m[1]);
  if (!Number.isSafeInteger(offset)) return null;
  if (m[2] === "") return { offset };
  const last = Number(m[2]);
  if (!Number.isSafeInteger(last) || last < offset) return null;
  return { offset, length: last - offset + 1 };
}

/** The ETag of an `If-None-Match` value as R2 compares it (no quotes, no `W/`); undefined for none or `*`. */
function bareEtag(value) {
  if (value === null || value === undefined) return undefined;
  const v = String(value).trim();
  if (v === "" || v === "*") return undefined;
  return v.replace(/^W\//, "").replace(/^"(.*)"$/, "$1");
}

function headerOf(headers, name) {
  if (!headers) return null;
  if (typeof headers.get === "function") return headers.get(name);
  for (const [k, v] of Array.isArray(headers) ? headers : Object.entries(headers)) {
    if (String(k).toLowerCase() === name) return String(v);
  }
  return null;
}

/** The byte span `[start, end)` an R2 range covers in an object of `size` bytes; null when it is past the end. */
function span(range, size) {
  if (!range) return { start: 0, end: size };
  if (range.suffix !== undefined) return { start: Math.max(0, size - range.suffix), end: size };
  if (range.offset >= size) return null;
  const end = range.length === undefined ? size : Math.min(size, range.offset + range.length);
  return { start: range.offset, end };
}

/**
 * A fetch-like function over the R2 bucket binding `bucket`: `fetch(url,
 * init)` reads the object named by `url`'s path (without the leading "/")
 * with `bucket.get(key, { range, onlyIf })`. Only GET and HEAD; any other
 * method is 405. `prefix` (optional) is put before every key.
 */
export function r2Fetch(bucket, { prefix = "" } = {}) {
  if (!isR2Bucket(bucket)) throw new TypeError("r2Fetch needs an R2 bucket binding (env.BUCKET)");
  const pre = prefix.replace(/^\/+/, "");
  return async function fetchFromR2(input, init = {}) {
    const url = new URL(typeof input === "string" ? input : input.url);
    const method = String(init.method ?? (typeof input === "object" ? input.method : undefined) ?? "GET").toUpperCase();
    if (method !== "GET" && method !== "HEAD") return new Response(null, { status: 405 });
    const headers = init.headers ?? (typeof input === "object" ? input.headers : undefined);
    let key;
    try {
      key = pre + decodeURIComponent(url.pathname.replace(/^\/+/, ""));
    } catch {
      return new Response(null, { status: 400 });
    }
    if (key === "") return new Response(null, { status: 404 });
    const range = parseRange(headerOf(headers, "range"));
    if (range === null) return new Response(null, { status: 416 });
    const etag = bareEtag(headerOf(headers, "if-none-match"));
    const opts = {};
    if (etag !== undefined) opts.onlyIf = { etagDoesNotMatch: etag };
    // An R2 range past the object's end is an error there: ask for the size first.
    let rangeNeeded = range;
    if (range && range.suffix === undefined) {
      const head = await bucket.head(key);
      if (!head) return new Response(null, { status: 404 });
      if (etag !== undefined && head.etag === etag) return notModified(head);
      const s = span(range, head.size);
      if (!s) return new Response(null, { status: 416, headers: { "content-range": `bytes */${head.size}` } });
      rangeNeeded = { offset: s.start, length: s.end - s.start };
    }
    if (rangeNeeded) opts.range = rangeNeeded;
    const obj = await bucket.get(key, opts);
    if (!obj) return new Response(null, { status: 404 });
    // With a failed onlyIf, R2 answers the object's metadata without a body.
    if (!("body" in obj) || obj.body === null || obj.body === undefined) return notModified(obj);
    const h = { etag: obj.httpEtag ?? `"${obj.etag}"`, "content-type": "application/octet-stream", "accept-ranges": "bytes" };
    if (!range) {
      h["content-length"] = String(obj.size);
      return new Response(method === "HEAD" ? null : obj.body, { status: 200, headers: h });
    }
    // Labelled with the range R2 says it answered (the one asked for when
    // it says none): a store answering another range is then refused by
    // the module for its Content-Range, not taken for the range asked.
    const said = obj.range && typeof obj.range === "object" ? span(obj.range, obj.size) : null;
    const s = said ?? span(rangeNeeded, obj.size) ?? { start: 0, end: 0 };
    if (s.end <= s.start) {
      // An empty object and a suffix range: nothing to send.
      obj.body.cancel?.().catch?.(() => {});
      return new Response(null, { status: 416, headers: { "content-range": `bytes */${obj.size}` } });
    }
    h["content-range"] = `bytes ${s.start}-${s.end - 1}/${obj.size}`;
    h["content-length"] = String(s.end - s.start);
    return new Response(method === "HEAD" ? null : obj.body, { status: 206, headers: h });
  };
}

function notModified(obj) {
  return new Response(null, { status: 304, headers: { etag: obj.httpEtag ?? `"${obj.etag}"` } });
}
