// Node runner of the conformance suite: `node --test tests/js/node.test.mjs`.
// Imports the package by its name (tests/js/node_modules/walcast links to js/,
// so the "node" export condition is what is tested). Uses a running
// orchestrator when WALCAST_DATASETS names its control URL, else starts one
// in-process. fake-indexeddb (when installed) stands in for IndexedDB.
import { after, test } from "node:test";
import { conformanceCases, TEST_TIMEOUT_MS, trackTimers } from "./conformance.js";
import { controlClient, startDatasets } from "./datasets.mjs";

try {
  await import("fake-indexeddb/auto");
} catch {
  console.error("node.test: fake-indexeddb not installed; the IndexedDB case is skipped");
}
const walcast = await import("walcast");

let datasets;
let own = null;
if (process.env.WALCAST_DATASETS) {
  datasets = controlClient(process.env.WALCAST_DATASETS);
} else {
  own = await startDatasets();
  datasets = own;
}
const fixtures = await datasets.newInstance();

after(async () => {
  await datasets.dropInstance(fixtures.instance).catch(() => {});
  if (own) await own.close();
});

const timers = trackTimers();
const cases = conformanceCases({
  timers,
  walcast,
  fixtures,
  mutate: (name) => datasets.mutate(fixtures.instance, name),
  runtime: `node ${process.version}`,
  log: (...a) => console.error("conformance:", ...a),
});
for (const c of cases) test(c.name, { timeout: TEST_TIMEOUT_MS }, c.fn);
