// A worker that runs tests/js/conformance.js inside workerd, one case per
// request, against the package's workerd entry (imported as "walcast", the
// .wasm as a compiled module). Bindings: FIXTURES (JSON of an orchestrator
// instance), CONTROL (the orchestrator's control URL, for mutations).
//   GET /cases        -> ["name", ...]
//   GET /run?case=N   -> { name, ok, ms, error, logs }
import * as walcast from "walcast";
import { conformanceCases } from "./conformance.js";

let cases = null;
let logs = [];

function casesFor(env) {
  if (!cases) {
    const fixtures = JSON.parse(env.FIXTURES);
    cases = conformanceCases({
      walcast,
      fixtures,
      runtime: "workerd",
      log: (...a) => logs.push(a.map(String).join(" ")),
      mutate: async (name) => {
        const r = await fetch(`${env.CONTROL}/instances/${fixtures.instance}/mutate/${name}`, { method: "POST" });
        const body = await r.json();
        if (!r.ok) throw new Error(`mutate ${name}: ${body.error ?? r.status}`);
        return body;
      },
    });
  }
  return cases;
}

const json = (body, status = 200) => new Response(JSON.stringify(body), { status, headers: { "content-type": "application/json" } });

export default {
  async fetch(request, env) {
    const url = new URL(request.url);
    const all = casesFor(env);
    if (url.pathname === "/cases") return json(all.map((c) => c.name));
    if (url.pathname === "/run") {
      const i = Number(url.searchParams.get("case"));
      const c = all[i];
      if (!c) return json({ error: `no case ${i}` }, 404);
      logs = [];
      const t0 = Date.now();
      let error = null;
      try {
        await c.fn();
      } catch (e) {
        error = String(e?.stack ?? e);
      }
      return json({ name: c.name, ok: !error, ms: Date.now() - t0, error, logs });
    }
    return json({ error: "no route" }, 404);
  },
};
