// walcast read replica as a Deno server (Deno Deploy or `deno run`): the same
// handler as the Cloudflare Worker (src/handler.js). Background syncs simply
// run on (Deno has no waitUntil; the process stays up).
//
//   DATASET_URL=http://127.0.0.1:8787/app PORT=8000 \
//     deno run --allow-net --allow-env --allow-read --config worker/deno.json worker/deno.js
//
// Env: DATASET_URL (required), PORT (default 8000), LISTEN_HOST (default
// 127.0.0.1; 0.0.0.0 to listen on every interface: not HOSTNAME, which
// containers set to their own name), MAX_AGE_MS (default 1000), and the other
// variables src/handler.js lists.
import { Replica } from "walcast";
import { createHandler } from "./src/handler.js";

const env = Deno.env.toObject();
if (!env.DATASET_URL) {
  console.error("walcast worker: set DATASET_URL to the dataset prefix (where catalog/head.json lives)");
  Deno.exit(2);
}
// A background sync here is never torn down from outside: no stuck-sync watchdog.
const handle = createHandler(Replica, { stuckSyncMs: Infinity });
const origin = (url) => {
  try {
    return new URL(url).origin;
  } catch {
    return "a dataset URL that does not parse";
  }
};
const defer = (p) => {
  p.catch(() => {});
};

Deno.serve(
  {
    port: Number(env.PORT ?? 8000),
    hostname: env.LISTEN_HOST || "127.0.0.1",
    // The dataset's origin only: its URL may carry a token in its query.
    onListen: ({ hostname, port }) => console.log(`walcast worker: listening on http://${hostname}:${port}/ for ${origin(env.DATASET_URL)}`),
  },
  (request) => handle(request, env, defer),
);
