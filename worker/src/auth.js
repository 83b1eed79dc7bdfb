// Access tokens for the worker's own routes (AUTH_KEY): the tokens of
// `walcast token`, checked with WebCrypto's Ed25519 (workerd, Deno, Node and
// browsers have it), so the wasm module carries no signature code for it.
// The format is docs/FORMAT.md's "Access tokens" (walcast_core::token):
//
//   wct1.<claims: base64url JSON {scope, prefix, iat, exp}>.<signature: base64url>
//
// signed over "walcast-token-v1\0" followed by the claims' base64url text.

const TOKEN_PREFIX = "wct1.";
const MAX_TOKEN_LEN = 2048;
const DOMAIN = new TextEncoder().encode("walcast-token-v1\0");
const CLAIM_FIELDS = ["exp", "iat", "prefix", "scope"];
/** How far (seconds) a token's `iat` may be ahead of the clock (as the Rust verifier). */
export const MAX_CLOCK_SKEW = 300;

/** Standard or URL-safe base64 (padding optional) to bytes; null when it is not base64. */
function b64bytes(s, urlSafe) {
  if (urlSafe ? !/^[A-Za-z0-9_-]*$/.test(s) : !/^[A-Za-z0-9+/]*={0,2}$/.test(s)) return null;
  let t = s.replace(/-/g, "+").replace(/_/g, "/").replace(/=+$/, "");
  if (t.length % 4 === 1) return null;
  t += "=".repeat((4 - (t.length % 4)) % 4);
  try {
    const bin = atob(t);
    // Canonical only, as walcast_core's decoder takes it: bits past the
    // last byte must be zero, or 16 spellings of one signature would pass.
    if (btoa(bin) !== t) return null;
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  } catch {
    return null;
  }
}

// The encodings of the Ed25519 points of small order (as libsodium and the
// core's `keys::has_small_order` refuse them), compared with the sign bit of
// x cleared: such a key "verifies" signatures of anyone's making.
const run = (first, fill, last) => [first, ...Array(30).fill(fill), last];
const SMALL_ORDER = [
  run(0x00, 0x00, 0x00),
  run(0x01, 0x00, 0x00),
  [0x26, 0xe8, 0x95, 0x8f, 0xc2, 0xb2, 0x27, 0xb0, 0x45, 0xc3, 0xf4, 0x89, 0xf2, 0xef, 0x98, 0xf0, 0xd5, 0xdf, 0xac, 0x05, 0xd3, 0xc6, 0x33, 0x39, 0xb1, 0x38, 0x02, 0x88, 0x6d, 0x53, 0xfc, 0x05],
  [0xc7, 0x17, 0x6a, 0x70, 0x3d, 0x4d, 0xd8, 0x4f, 0xba, 0x3c, 0x0b, 0x76, 0x0d, 0x10, 0x67, 0x0f, 0x2a, 0x20, 0x53, 0xfa, 0x2c, 0x39, 0xcc, 0xc6, 0x4e, 0xc7, 0xfd, 0x77, 0x92, 0xac, 0x03, 0x7a],
  run(0xec, 0xff, 0x7f),
  run(0xed, 0xff, 0x7f),
  run(0xee, 0xff, 0x7f),
];

/** Whether a 32-byte key is a point of small order. */
function hasSmallOrder(raw) {
  return SMALL_ORDER.some((s) => s.every((b, i) => b === (i === 31 ? raw[i] & 0x7f : raw[i])));
}

/** `ed25519:<base64 of 32 bytes>` to the raw key; throws naming the problem. */
export function parsePublicKey(text) {
  const t = String(text).trim();
  if (!t.startsWith("ed25519:")) throw new Error('a key must be "ed25519:<base64>"');
  const raw = b64bytes(t.slice("ed25519:".length), false);
  if (!raw || raw.length !== 32) throw new Error("an ed25519 key must be 32 bytes in base64");
  if (hasSmallOrder(raw)) throw new Error("not an Ed25519 public key (a point of small order verifies anyone's signatures)");
  return raw;
}

const imported = new Map(); // AUTH_KEY text -> Promise<CryptoKey[]>

/** The WebCrypto keys of AUTH_KEY (one key, or several separated by commas or spaces: a rotation). */
export function importKeys(text) {
  let p = imported.get(text);
  if (!p) {
    const raws = String(text)
      .split(/[\s,]+/)
      .filter((k) => k !== "")
      .map(parsePublicKey);
    if (raws.length === 0) throw new Error("AUTH_KEY holds no key");
    p = Promise.all(raws.map((raw) => crypto.subtle.importKey("raw", raw, { name: "Ed25519" }, false, ["verify"])));
    p.catch(() => imported.delete(text));
    if (imported.size > 16) imported.clear();
    imported.set(text, p);
  }
  return p;
}

/** Whether the token's prefix covers `path` (equal, or followed by "/"; "" covers all). */
export function prefixCovers(prefix, path) {
  const p = String(path).replace(/^\/+/, "");
  return prefix === "" || p === prefix || (p.startsWith(prefix) && p[prefix.length] === "/");
}

/**
 * Verifies `token` with any of `keys` (CryptoKeys) at `now` (Unix seconds)
 * for `path`. Resolves `{ ok: true, claims }` or `{ ok: false, reason }`
 * with reason `missing`, `malformed`, `bad_signature`, `expired`,
 * `not_yet_valid` (issued more than `MAX_CLOCK_SKEW` seconds ahead of
 * `now`) or `wrong_prefix`. The signature is checked before the claims are decoded.
 */
export async function verifyToken(token, keys, now, path) {
  if (token === null || token === undefined || token === "") return { ok: false, reason: "missing" };
  const t = String(token);
  const malformed = { ok: false, reason: "malformed" };
  if (t.length > MAX_TOKEN_LEN || !t.startsWith(TOKEN_PREFIX)) return malformed;
  const parts = t.slice(TOKEN_PREFIX.length).split(".");
  if (parts.length !== 2 || parts[0] === "") return malformed;
  const [body, sigText] = parts;
  const sig = b64bytes(sigText, true);
  if (!sig || sig.length !== 64 || !/^[A-Za-z0-9_-]+$/.test(body)) return malformed;
  const msg = new Uint8Array(DOMAIN.length + body.length);
  msg.set(DOMAIN);
  for (let i = 0; i < body.length; i++) msg[DOMAIN.length + i] = body.charCodeAt(i);
  let verified = false;
  for (const k of keys) {
    try {
      if (await crypto.subtle.verify({ name: "Ed25519" }, k, sig, msg)) {
        verified = true;
        break;
      }
    } catch {
      // a key or signature the runtime rejects: not verified
    }
  }
  if (!verified) return { ok: false, reason: "bad_signature" };
  let claims;
  try {
    const json = b64bytes(body, true);
    claims = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(json));
  } catch {
    return malformed;
  }
  if (!claims || typeof claims !== "object" || Array.isArray(claims)) return malformed;
  const fields = Object.keys(claims).sort();
  if (fields.length !== CLAIM_FIELDS.length || fields.some((f, i) => f !== CLAIM_FIELDS[i])) return malformed;
  const { scope, prefix, iat, exp } = claims;
  if (scope !== "read" || typeof prefix !== "string" || /^\/|\/$/.test(prefix)) return malformed;
  if (!Number.isSafeInteger(iat) || !Number.isSafeInteger(exp) || iat < 0 || exp < 0) return malformed;
  if (now >= exp) return { ok: false, reason: "expired" };
  if (iat > now + MAX_CLOCK_SKEW) return { ok: false, reason: "not_yet_valid" };
  if (!prefixCovers(prefix, path)) return { ok: false, reason: "wrong_prefix" };
  return { ok: true, claims };
}

/** The token of a request: `Authorization: Bearer <token>`, else the query parameter `token`. */
export function requestToken(request, url) {
  const auth = request.headers.get("authorization");
  if (auth) {
    const m = /^\s*bearer\s+(\S+)\s*$/i.exec(auth);
    if (m) return m[1];
  }
  return url.searchParams.get("token");
}
