// The page's service worker: keeps the page's own files (the HTML, app.js,
// walcast's module and .wasm) so the page loads with its server down. Network
// first, so a running server always gives the newest files; the cache answers
// only when the network fails. Requests to the dataset (another origin, or
// anything not listed) are not touched: the replica keeps its own state in
// IndexedDB.
const CACHE = "walcast-browser-offline-v2";
const SHELL = [
  "./",
  "./index.html",
  "./app.js",
  "./node_modules/walcast/dist/web.js",
  "./node_modules/walcast/dist/replica.js",
  "./node_modules/walcast/dist/engine.js",
  "./node_modules/walcast/dist/http.js",
  "./node_modules/walcast/dist/signatures.js",
  "./node_modules/walcast/dist/persist.js",
  "./node_modules/walcast/dist/idb.js",
  "./node_modules/walcast/dist/slots.js",
  "./node_modules/walcast/dist/util.js",
  "./node_modules/walcast/dist/wasm/walcast_wasm.js",
  "./node_modules/walcast/dist/wasm/walcast_wasm_bg.wasm",
];
const shellUrls = new Set(SHELL.map((p) => new URL(p, self.location).href));

self.addEventListener("install", (event) => {
  event.waitUntil(
    caches
      .open(CACHE)
      .then((cache) => Promise.allSettled(SHELL.map((p) => cache.add(new Request(p, { cache: "reload" })))))
      .then(() => self.skipWaiting()),
  );
});

self.addEventListener("activate", (event) => {
  event.waitUntil(self.clients.claim());
});

self.addEventListener("fetch", (event) => {
  const req = event.request;
  const url = new URL(req.url);
  url.search = "";
  if (req.method !== "GET" || !shellUrls.has(url.href)) return;
  event.respondWith(
    (async () => {
      const cache = await caches.open(CACHE);
      try {
        const res = await fetch(req);
        if (res.ok) await cache.put(url.href, res.clone());
        return res;
      } catch (e) {
        const hit = await cache.match(url.href);
        if (hit) return hit;
        throw e;
      }
    })(),
  );
});
