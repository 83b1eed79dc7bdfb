// What the worker answers: keys and bounds decoded from a request, values
// encoded for JSON, CORS headers, JSON bodies, and errors with a fixed
// message per code (never an error's own text).

import { corsOrigins } from "./config.js";

const strictUtf8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });
export const encoder = new TextEncoder();

/** Percent-encodes bytes for a query value (unreserved characters stay as they are). */
export function percentEncode(bytes) {
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
export function queryBytes(search) {
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

export function compareBytes(a, b) {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return a[i] - b[i];
  return a.length - b.length;
}

export function text(bytes) {
  try {
    return strictUtf8.decode(bytes);
  } catch {
    return undefined;
  }
}

/**
 * The UTF-8 bytes `JSON.stringify` takes for these bytes read as text,
 * quotes aside: a control byte six (`\u0001`) or two (`\n`, `\t`, `\r`,
 * `\b`, `\f`), a quote or backslash two, anything else itself.
 */
export function escapedLength(bytes) {
  let n = bytes.length;
  for (let i = 0; i < bytes.length; i++) {
    const b = bytes[i];
    if (b < 0x20) n += b === 8 || b === 9 || b === 10 || b === 12 || b === 13 ? 1 : 5;
    else if (b === 0x22 || b === 0x5c) n++;
  }
  return n;
}

export function toBase64(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

/** The CORS headers of an answer to `request`. */
export function corsHeaders(request, env) {
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

export function json(status, body, lsn, cors) {
  return jsonText(status, JSON.stringify(body), lsn, cors);
}

/** A JSON answer whose text is already written (see `json`). */
export function jsonText(status, text, lsn, cors) {
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
export function minLsnOf(request, q) {
  let raw = null;
  if (q.has("min_lsn")) raw = text(q.get("min_lsn")) ?? "";
  else if (request.headers.has("walcast-min-lsn")) raw = request.headers.get("walcast-min-lsn").trim();
  if (raw === null) return null;
  if (!/^\d{1,15}$/.test(raw)) return undefined;
  return Number(raw);
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
  busy: "too many requests at once; retry",
  untrusted: "the dataset failed a check against the trusted keys (signature, rollback or digest); the last good state is served",
};

/** `{ code, message, object?, lsn? }` of an error, safe to answer with. */
export function safeError(e) {
  if (!e) return null;
  const code = typeof e.code === "string" && ERROR_MESSAGES[e.code] ? e.code : "internal";
  const out = { code, message: ERROR_MESSAGES[code] };
  if (typeof e.object === "string") out.object = e.object;
  if (typeof e.lsn === "number" && Number.isFinite(e.lsn)) out.lsn = e.lsn;
  return out;
}

export function errorBody(e) {
  // Configuration errors are the worker's own words (they name a variable, not its value).
  if (e?.code === "config") return { error: { code: "config", message: String(e.message) } };
  return { error: safeError(e) };
}

/**
 * The answer to a read that failed: 400 for bad input; in lazy mode a
 * snapshot block that failed verification or is missing is 502, a store
 * that does not answer (or a replica being rebuilt) 503 with Retry-After.
 */
export function readFailed(e, cors) {
  const code = e?.code;
  const status = code === "invalid_input" ? 400 : code === "data" || code === "not_found" ? 502 : code === "unavailable" || code === "closed" ? 503 : 500;
  const res = json(status, errorBody(e), undefined, cors);
  // Worth a retry: the store or the replica comes back.
  if (status === 503) res.headers.set("retry-after", "1");
  return res;
}

export function badRequest(message) {
  return { error: { code: "invalid_input", message } };
}
