// A read replica in the page: opened with IndexedDB persistence (reads are
// served from the stored state at once, before any request, and offline),
// polled in the background, and shown live: applied LSN, lag, and a table of
// the keys that re-renders on every change.
//
// The dataset URL comes from ?dataset=<url>; the default is `walcast serve`'s
// default address.
import { Replica } from "walcast";

const MAX_ROWS = 500;
const $ = (id) => document.getElementById(id);
const dataset = new URLSearchParams(location.search).get("dataset") ?? "http://127.0.0.1:8787";
const text = new TextDecoder();
const show = (k) => (typeof k === "string" ? k : `0x${[...k].map((b) => b.toString(16).padStart(2, "0")).join("")}`);

// The page itself (this file, walcast's module and .wasm) is kept by a
// service worker, so a reload works with every server down.
if ("serviceWorker" in navigator) {
  navigator.serviceWorker.register("./sw.js").catch((e) => console.warn("service worker:", e));
}

const replica = await Replica.open(dataset, {
  persist: "indexeddb",
  pollInterval: 1000,
  onError: () => renderStatus(),
});
const restored = replica.status().appliedLsn;
$("dataset").textContent = dataset;
$("source").textContent = restored > 0 ? `IndexedDB (LSN ${restored}), before any request` : "nothing stored: the first sync loads it";

let previous = new Map();
function renderRows(changed) {
  const rows = replica.scan({ limit: MAX_ROWS + 1 });
  const next = new Map();
  const trs = rows.slice(0, MAX_ROWS).map(({ key, value }) => {
    const k = show(key);
    const v = text.decode(value);
    next.set(k, v);
    const tr = document.createElement("tr");
    tr.dataset.key = k;
    if (changed && previous.get(k) !== v) tr.className = "changed";
    tr.appendChild(document.createElement("td")).textContent = k;
    tr.appendChild(document.createElement("td")).textContent = v;
    return tr;
  });
  previous = next;
  $("rows").replaceChildren(...trs);
  $("more").textContent = rows.length > MAX_ROWS ? `(the first ${MAX_ROWS} keys)` : `${rows.length} keys`;
}

function renderStatus() {
  const s = replica.status();
  $("applied").textContent = s.appliedLsn;
  $("committed").textContent = s.committedLsn;
  // Caught up: as fresh as the last head read. Behind: how old the newest
  // commit it knows of and has not applied yet is.
  $("lag").textContent = !s.lastPollAt
    ? "not synced yet"
    : s.appliedLsn >= s.committedLsn
      ? `caught up (head read ${Math.max(0, Date.now() - s.lastPollAt)} ms ago)`
      : `${s.lagMs} ms behind`;
  $("state").textContent = s.state;
  $("error").textContent = s.lastError ? s.lastError.message : "none";
  $("error").className = s.lastError ? "error" : "";
  document.body.dataset.appliedLsn = String(s.appliedLsn);
}

renderRows(false);
renderStatus();
replica.onChange(() => {
  renderRows(true);
  renderStatus();
});
replica.onReset(() => renderRows(false));
setInterval(renderStatus, 500);
replica.start();
document.body.dataset.ready = "1";
// For the console: the replica itself.
window.replica = replica;
