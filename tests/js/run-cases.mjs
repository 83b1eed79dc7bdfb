// A runner of the conformance suite with no test framework, for runtimes
// without one the other runners use (Bun), and for the packed-tarball test
// (tests/js/pack/pack.test.mjs), which copies this file and conformance.js
// into a fresh project that installed the npm tarball:
//
//   WALCAST_DATASETS=<control URL> bun tests/js/run-cases.mjs
//   WALCAST_DATASETS=<control URL> node|deno run -A run-cases.mjs
//
// Imports the package by its name ("walcast"), so the runtime's own module
// resolution and export condition pick the entry; prints the entry it
// resolved, one line per case, and a closing "N passed, N failed" line; exits
// non-zero on any failure. Takes a new instance from the orchestrator named
// by WALCAST_DATASETS (tests/js/datasets.mjs serve) and drops it at the end.
// WALCAST_CASES=<regex> runs only the cases whose name matches.
import { conformanceCases, TEST_TIMEOUT_MS, trackTimers } from "./conformance.js";

const env = (k) => (globalThis.Deno ? globalThis.Deno.env.get(k) : globalThis.process?.env?.[k]);
const exit = (code) => (globalThis.Deno ? globalThis.Deno.exit(code) : globalThis.process.exit(code));

const runtime = globalThis.Bun
  ? `bun ${globalThis.Bun.version}`
  : globalThis.Deno
    ? `deno ${globalThis.Deno.version.deno}`
    : `node ${globalThis.process.version}`;
const control = env("WALCAST_DATASETS");
if (!control) {
  console.error("run-cases: set WALCAST_DATASETS to the control URL of `node tests/js/datasets.mjs serve`");
  exit(2);
}

async function call(method, p) {
  const r = await fetch(control + p, { method });
  const body = await r.json();
  if (!r.ok) throw new Error(`datasets control ${method} ${p}: ${body.error ?? r.status}`);
  return body;
}

let resolved = "?";
try {
  resolved = import.meta.resolve("walcast");
} catch {}
const walcast = await import("walcast");
console.log(`run-cases: ${runtime}, walcast resolved to ${resolved}`);

const fixtures = await call("POST", "/instances");
const only = env("WALCAST_CASES") ? new RegExp(env("WALCAST_CASES")) : null;
// Each case's deadline is set with the real setTimeout, taken before the
// timers check wraps it (that check must see only the replicas' timers).
const realSetTimeout = globalThis.setTimeout;
const realClearTimeout = globalThis.clearTimeout;
const timers = trackTimers();
const cases = conformanceCases({
  timers,
  walcast,
  fixtures,
  mutate: (name) => call("POST", `/instances/${fixtures.instance}/mutate/${name}`),
  runtime,
  log: (...a) => console.error("conformance:", ...a),
});
const t0 = Date.now();
let passed = 0;
let failed = 0;
for (const c of cases) {
  if (only && !only.test(c.name)) continue;
  const started = Date.now();
  let timer;
  let error = null;
  try {
    await Promise.race([
      c.fn(),
      new Promise((_, reject) => {
        timer = realSetTimeout(() => reject(new Error(`${c.name}: no answer in ${TEST_TIMEOUT_MS} ms`)), TEST_TIMEOUT_MS);
      }),
    ]);
  } catch (e) {
    error = String(e?.stack ?? e);
  } finally {
    realClearTimeout(timer);
  }
  if (error) failed++;
  else passed++;
  console.log(`${error ? "FAIL" : "ok  "} ${c.name} (${Date.now() - started} ms)${error ? `\n${error}` : ""}`);
}
await call("DELETE", `/instances/${fixtures.instance}`).catch(() => {});
console.log(`run-cases: ${runtime}: ${passed + failed} cases in ${Math.round((Date.now() - t0) / 1000)} s`);
console.log(`${runtime.split(" ")[0]}: ${passed} passed, ${failed} failed`);
exit(failed === 0 && passed > 0 ? 0 : 1);
