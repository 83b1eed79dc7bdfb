// Ed25519 checks of signed heads and pages with the runtime's WebCrypto (the
// wasm module carries no Ed25519 code).

import { call } from "./engine.js";

/**
 * Makes the Ed25519 checks a response needs before the module sees it: the
 * module carries no Ed25519 code, so a replica that pins keys has the
 * runtime's WebCrypto verify the head's and pages' signatures, and hands the
 * module the ids of the checks that held (`signatureChecks`,
 * `signaturesVerified`). A check that fails, or a runtime whose WebCrypto
 * lacks Ed25519, confirms nothing: the module then refuses the object as
 * not signed by a trusted key (code `untrusted`). Never throws.
 */
export async function verifySignatures(h, req, res) {
  const key = req.key;
  if (!res.body || (key !== "catalog/head.json" && !key.startsWith("catalog/pages/"))) return;
  try {
    if (!h || h.dead || !h.w.pinned) return;
    const checks = call(h, "sync", (w) => w.signatureChecks(key, res.body));
    if (!checks.length) return;
    const held = await Promise.all(checks.map(ed25519Verify));
    const ids = new Uint8Array(32 * held.filter(Boolean).length);
    let at = 0;
    checks.forEach((c, i) => {
      if (held[i]) ids.set(c.id, 32 * at++);
    });
    if (at && !h.dead) call(h, "sync", (w) => w.signaturesVerified(ids));
  } catch {
    // A trap rebuilt the module (the answer goes nowhere), or WebCrypto
    // failed: nothing confirmed.
  }
}

/** WebCrypto's Ed25519 (RFC 8032) over one check; false when it fails or is missing. */
async function ed25519Verify(c) {
  try {
    const subtle = globalThis.crypto.subtle;
    const key = await subtle.importKey("raw", c.key, { name: "Ed25519" }, false, ["verify"]);
    return await subtle.verify({ name: "Ed25519" }, key, c.signature, c.message);
  } catch {
    return false;
  }
}
