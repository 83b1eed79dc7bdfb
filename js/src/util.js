// Errors, key and option checks shared by the package's modules.

const encoder = new TextEncoder();
const strictUtf8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });
const lenientUtf8 = new TextDecoder("utf-8", { ignoreBOM: true });
const NO_LIMIT = 0xffffffff;
/** No bytes. */
export const EMPTY = new Uint8Array(0);

/** An Error with the package's `code` (and `extra` fields: object, lsn, cause). */
export function walcastError(code, message, extra) {
  const e = new Error(message);
  e.name = "WalcastError";
  e.code = code;
  if (extra) Object.assign(e, extra);
  return e;
}

/** A key or value as bytes (a string is UTF-8 encoded); throws `invalid_input` naming `what`. */
export function toBytes(k, what) {
  if (typeof k === "string") return encoder.encode(k);
  if (k instanceof Uint8Array) return k;
  if (ArrayBuffer.isView(k)) return new Uint8Array(k.buffer, k.byteOffset, k.byteLength);
  if (k instanceof ArrayBuffer) return new Uint8Array(k);
  throw walcastError("invalid_input", `walcast: ${what} must be a string or a Uint8Array`);
}

/** The longest delay setTimeout keeps (ms): a longer one fires at once. */
export const MAX_TIMER_MS = 2 ** 31 - 1;

/** The longest key a dataset holds (bytes; a batch refuses longer ones). */
export const MAX_KEY_LEN = 64 << 10;

/**
 * A scan bound as bytes, cut to MAX_KEY_LEN + 1 bytes: against keys of at
 * most MAX_KEY_LEN bytes, that cut orders exactly as the whole bound does
 * (a key at or past either is past the first MAX_KEY_LEN bytes of the bound,
 * or equal to them and so before both), and a bound of gigabytes is not
 * copied into the module.
 */
function optBytes(k, what) {
  if (k === undefined || k === null) return undefined;
  const b = toBytes(k, what);
  return b.length > MAX_KEY_LEN + 1 ? b.subarray(0, MAX_KEY_LEN + 1) : b;
}

/** Byte-wise comparison, as keys are ordered. */
function compareBytes(a, b) {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return a[i] - b[i];
  return a.length - b.length;
}

/** A scan key: a string when it is valid UTF-8, else the bytes. */
function keyOut(bytes) {
  try {
    return strictUtf8.decode(bytes);
  } catch {
    return bytes;
  }
}

/** `v` when undefined or an integer >= `min`; else throws `invalid_input` naming the option. */
export function checkCount(v, name, { min = 0 } = {}) {
  if (v === undefined) return undefined;
  if (typeof v !== "number" || !Number.isFinite(v) || Math.floor(v) !== v || v < min) {
    throw walcastError("invalid_input", `walcast: ${name} must be an integer >= ${min}, got ${String(v)}`);
  }
  return v;
}

/**
 * A scan's bounds as the module takes them: `{ prefix, start, end, limit }`
 * (limit NO_LIMIT for none), or null when nothing can match (`limit` 0, or
 * `end` at or before the lower bound). Throws `invalid_input`.
 */
export function scanBounds(options) {
  if (options !== undefined && (options === null || typeof options !== "object")) {
    throw walcastError("invalid_input", "walcast: scan takes an options object ({ prefix, start, end, limit, maxBytes })");
  }
  const { prefix, start, end, limit, maxBytes } = options ?? {};
  checkCount(limit, "limit");
  checkCount(maxBytes, "maxBytes", { min: 1 });
  const p = optBytes(prefix, "prefix");
  const s = optBytes(start, "start");
  const e = optBytes(end, "end");
  if (limit === 0) return null;
  if (e !== undefined) {
    const lower = s !== undefined && (p === undefined || compareBytes(s, p) > 0) ? s : p ?? EMPTY;
    if (compareBytes(e, lower) <= 0) return null;
  }
  const most = (n) => (n === undefined ? NO_LIMIT : Math.min(n, NO_LIMIT));
  return { prefix: p, start: s, end: e, limit: most(limit), maxBytes: most(maxBytes) };
}

/** The module's `[key, value]` pairs as scan entries. */
export function entries(rows) {
  const out = new Array(rows.length);
  for (let i = 0; i < rows.length; i++) {
    const [k, v] = rows[i];
    out[i] = { key: keyOut(k), value: v };
  }
  return out;
}

/** A value's bytes as text (invalid UTF-8 replaced), or undefined. */
export function textOf(v) {
  return v === undefined ? undefined : lenientUtf8.decode(v);
}

/** Text parsed as JSON, or undefined. */
export function jsonOf(t) {
  return t === undefined ? undefined : JSON.parse(t);
}

/** The custom fetch of `options.fetch`, or null (the runtime's global fetch, looked up per request). */
export function fetchOption(options) {
  const f = options.fetch;
  if (f === undefined || f === null) return null;
  if (typeof f !== "function") throw walcastError("invalid_input", "walcast: fetch must be a function (url, init) => Promise<Response>");
  return f;
}

/**
 * Splits a dataset URL into its base (no trailing slash) and its query
 * string ("" or "?…"): every object's URL is `base/key` followed by the
 * query, so a token in the query travels with every GET.
 */
export function splitUrl(url) {
  const hash = url.indexOf("#");
  if (hash >= 0) url = url.slice(0, hash);
  const q = url.indexOf("?");
  const base = (q >= 0 ? url.slice(0, q) : url).replace(/\/+$/, "");
  const query = q >= 0 && q < url.length - 1 ? url.slice(q) : "";
  return { base, query };
}

/**
 * The key a dataset's persisted state is stored under: its URL without the
 * query string, so a token passed in the query (which changes as tokens
 * expire) neither changes the key nor is written to storage. A raw replica
 * (no key-value state) keeps its own record, `#raw` appended: a key-value
 * replica of the same URL must never open at its LSN with none of its keys.
 */
export function storeKey(url, wasmOpts) {
  const q = url.search(/[?#]/);
  const base = q >= 0 ? url.slice(0, q) : url;
  return wasmOpts?.raw ? `${base}#raw` : base;
}

/** The `headers` option as `[name, value]` pairs (string values only); throws `invalid_input`. */
export function headerList(h) {
  if (h === undefined || h === null) return [];
  if (typeof h !== "object") throw walcastError("invalid_input", "walcast: headers must be an object of strings");
  const out = [];
  for (const [k, v] of Object.entries(h)) if (typeof v === "string") out.push([k, v]);
  return out;
}

/** A weak reference where the runtime has WeakRef, else a strong one. */
export const weak = typeof WeakRef === "function" ? (o) => new WeakRef(o) : (o) => ({ deref: () => o });

/** Hands `e` to the `onError` callback, if any (one that throws is ignored). */
export function reportTo(onError, e) {
  if (typeof onError === "function") {
    try {
      onError(e);
    } catch {
      // an error handler that throws has nowhere left to report to
    }
  }
}

/** The error of a call on a closed replica. */
export function closedError() {
  return walcastError("closed", "walcast: the replica is closed");
}

/** Does nothing. */
export function noop() {}
