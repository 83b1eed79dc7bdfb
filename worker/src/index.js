// walcast read replica as a Cloudflare Worker (module syntax).
//
// One replica per isolate, held by the shared handler (./handler.js): the
// isolate's first request waits for the initial sync; every later request is
// answered from the local replica at once, and when the last sync is older
// than MAX_AGE_MS a catch-up sync runs in the background (ctx.waitUntil).
//
// Configure in wrangler.toml: DATASET_URL (the dataset prefix served over
// HTTP, e.g. an R2 public bucket or a CDN), MAX_AGE_MS (default 1000), LOAD
// ("lazy": a new isolate reads only the snapshot blocks its requests need).
import { Replica } from "walcast";
import { createHandler } from "./handler.js";

const handle = createHandler(Replica);

export default {
  async fetch(request, env, ctx) {
    return handle(request, env, (p) => ctx.waitUntil(p));
  },
};
