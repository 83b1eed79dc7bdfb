// Deno runner of the conformance suite:
//   deno test --allow-read --allow-net --allow-env --allow-run tests/js/deno.test.mjs
// Imports the package by its name through tests/js/node_modules (deno.json:
// nodeModulesDir "manual"), so the "deno" export condition is what is tested.
// Uses a running orchestrator when WALCAST_DATASETS names its control URL,
// else starts `node datasets.mjs serve` and stops it (by its PID) at the end.
import * as walcast from "walcast";
import { conformanceCases, trackTimers } from "./conformance.js";

const here = new URL(".", import.meta.url);

async function client(controlUrl) {
  const call = async (method, p) => {
    const r = await fetch(controlUrl + p, { method });
    const body = await r.json();
    if (!r.ok) throw new Error(`datasets control ${method} ${p}: ${body.error ?? r.status}`);
    return body;
  };
  return {
    newInstance: () => call("POST", "/instances"),
    mutate: (id, name) => call("POST", `/instances/${id}/mutate/${name}`),
    dropInstance: (id) => call("DELETE", `/instances/${id}`),
  };
}

async function spawnOrchestrator() {
  const child = new Deno.Command(Deno.env.get("NODE") ?? "node", {
    args: [new URL("datasets.mjs", here).pathname, "serve"],
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  const deadline = setTimeout(() => child.kill("SIGKILL"), 300_000);
  while (!buf.includes("\n")) {
    const { value, done } = await reader.read();
    if (done) throw new Error("datasets.mjs serve exited before it was ready");
    buf += value;
  }
  clearTimeout(deadline);
  reader.releaseLock();
  child.stdout.cancel().catch(() => {});
  return { child, ready: JSON.parse(buf.slice(0, buf.indexOf("\n"))) };
}

let orchestrator = null;
let controlUrl = Deno.env.get("WALCAST_DATASETS");
if (!controlUrl) {
  orchestrator = await spawnOrchestrator();
  controlUrl = orchestrator.ready.control;
}
const datasets = await client(controlUrl);
const fixtures = await datasets.newInstance();

const timers = trackTimers();
const cases = conformanceCases({
  timers,
  walcast,
  fixtures,
  mutate: (name) => datasets.mutate(fixtures.instance, name),
  runtime: `deno ${Deno.version.deno}`,
  log: (...a) => console.error("conformance:", ...a),
});
const opts = { sanitizeOps: false, sanitizeResources: false };
for (const c of cases) Deno.test({ name: c.name, fn: c.fn, ...opts });
Deno.test({
  name: "teardown: drop the instance, stop the orchestrator this runner started",
  ...opts,
  fn: async () => {
    await datasets.dropInstance(fixtures.instance).catch(() => {});
    if (orchestrator) {
      orchestrator.child.kill("SIGTERM");
      await orchestrator.child.status;
    }
  },
});
