// The packed-tarball test's browser page (tests/js/pack/pack.test.mjs serves
// it from the fresh project that installed the tarball). "walcast" is a bare
// specifier: the page's import map points it at the entry that the installed
// package.json's "browser" export condition names, as a bundler would.
import * as walcast from "walcast";
import { conformanceCases } from "./conformance.js";

let cases = null;
let logs = [];

window.walcastPack = {
  ready: true,

  /** Builds the conformance cases for an orchestrator instance; returns their names. */
  setup(fixtures, control) {
    cases = conformanceCases({
      walcast,
      fixtures,
      runtime: `browser ${navigator.userAgent}`,
      log: (...a) => logs.push(a.map(String).join(" ")),
      mutate: async (name) => {
        const r = await fetch(`${control}/instances/${fixtures.instance}/mutate/${name}`, { method: "POST" });
        const body = await r.json();
        if (!r.ok) throw new Error(`mutate ${name}: ${body.error ?? r.status}`);
        return body;
      },
    });
    return cases.map((c) => c.name);
  },

  async runCase(i) {
    const c = cases[i];
    logs = [];
    const t0 = performance.now();
    let error = null;
    try {
      await c.fn();
    } catch (e) {
      error = String(e?.stack ?? e);
    }
    return { name: c.name, ok: !error, ms: Math.round(performance.now() - t0), error, logs };
  },
};
