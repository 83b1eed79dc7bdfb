// Helpers shared by the workerd and Chromium runners (tests/js/workerd,
// tests/js/chromium): the dataset orchestrator, free ports, child processes
// stopped by PID, and byte/URL encoding.
import { spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const HERE = path.dirname(fileURLToPath(import.meta.url));
export const REPO = path.resolve(HERE, "../../..");
export const DIST = path.join(REPO, "js", "dist");
export const EDGE_MODULES = path.join(HERE, "node_modules");

export function log(...a) {
  console.error("edge:", ...a);
}

/** The orchestrator: a running one (WALCAST_DATASETS = its control URL) or one started here. */
export async function connectDatasets() {
  const { controlClient, startDatasets } = await import("../datasets.mjs");
  if (process.env.WALCAST_DATASETS) {
    const c = controlClient(process.env.WALCAST_DATASETS);
    return { ...c, controlUrl: process.env.WALCAST_DATASETS, close: async () => {} };
  }
  const ds = await startDatasets();
  onSignalCleanup(() => ds.close());
  const controlUrl = await ds.listen();
  return {
    newInstance: () => ds.newInstance(),
    mutate: (id, name) => ds.mutate(id, name),
    reset: (id, name) => ds.reset(id, name),
    dropInstance: (id) => ds.dropInstance(id),
    controlUrl,
    close: () => ds.close(),
  };
}

/**
 * A TCP port free on 127.0.0.1 right now, for a child process to bind.
 *
 * The port is probed then released, so something else may take it before the
 * child binds. Two things make that rare: the port is drawn from below the
 * kernel's ephemeral range (ip_local_port_range), where neither `listen(0)`
 * nor the local end of an outgoing connection lands, and no port is handed out
 * twice by one process. Callers that start a server on it still retry on
 * "Address already in use" (see `isAddrInUse`).
 */
export async function freePort() {
  const [low] = ephemeralRange();
  const span = Math.max(0, Math.min(low, 65536) - PORT_FLOOR);
  for (let i = 0; span > 0 && i < 64; i++) {
    const port = PORT_FLOOR + Math.floor(Math.random() * span);
    if (handedOut.has(port)) continue;
    if (await canListen(port)) {
      handedOut.add(port);
      return port;
    }
  }
  for (;;) {
    const port = await listenPort(0);
    if (!handedOut.has(port)) {
      handedOut.add(port);
      return port;
    }
  }
}

const PORT_FLOOR = 20000;
const handedOut = new Set();

function ephemeralRange() {
  try {
    const [lo, hi] = fs.readFileSync("/proc/sys/net/ipv4/ip_local_port_range", "utf8").trim().split(/\s+/).map(Number);
    if (Number.isInteger(lo) && Number.isInteger(hi)) return [lo, hi];
  } catch {}
  return [32768, 60999];
}

function listenPort(port) {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on("error", reject);
    srv.listen(port, "127.0.0.1", () => {
      const got = srv.address().port;
      srv.close(() => resolve(got));
    });
  });
}

async function canListen(port) {
  try {
    await listenPort(port);
    return true;
  } catch {
    return false;
  }
}

/** Whether a child's log says a port it was given was taken before it bound. */
export function isAddrInUse(logText) {
  return /address already in use|EADDRINUSE|os error 98/i.test(logText);
}

/** Temp dirs made here; removed at exit unless WALCAST_KEEP_TMP=1. */
const tmpDirs = [];
export function makeTmp(prefix) {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  tmpDirs.push(d);
  return d;
}

/** Child processes started here; each is stopped by its PID (see stopAll). */
const children = new Set();

function recordPid(pid, name) {
  // run-edge.sh passes a file in which every runner lists what it started
  // ("PID NAME"), so a runner killed before its teardown leaves nothing running.
  const f = process.env.WALCAST_EDGE_PIDS;
  if (f) fs.appendFileSync(f, `${pid} ${name}\n`);
}

export function startProcess(cmd, args, { cwd, env, name = path.basename(cmd), logFile } = {}) {
  const out = logFile ? fs.openSync(logFile, "a") : "ignore";
  const child = spawn(cmd, args, { cwd, env: { ...process.env, ...env }, stdio: ["ignore", out, out] });
  if (logFile) fs.closeSync(out);
  children.add(child);
  recordPid(child.pid, path.basename(cmd));
  child.once("exit", () => children.delete(child));
  log(`started ${name} (pid ${child.pid})`);
  return child;
}

/**
 * Stops a child by its PID: `signal` (SIGTERM; workerd drains on SIGTERM and
 * stops on SIGINT), then SIGKILL after `graceMs`.
 */
export async function stopProcess(child, { signal = "SIGTERM", graceMs = 5000 } = {}) {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once("exit", resolve));
  try {
    process.kill(child.pid, signal);
  } catch {
    return;
  }
  const t = setTimeout(() => {
    try {
      process.kill(child.pid, "SIGKILL");
    } catch {}
  }, graceMs);
  await exited;
  clearTimeout(t);
}

export async function stopAll() {
  await Promise.all([...children].map((c) => stopProcess(c)));
}

/** Async cleanups (e.g. an in-process orchestrator's close) run when a signal stops the runner. */
const cleanups = [];
export function onSignalCleanup(fn) {
  cleanups.push(fn);
}

// A runner stopped by a signal still stops what it started.
for (const sig of ["SIGTERM", "SIGINT"]) {
  process.once(sig, async () => {
    for (const c of children) {
      try {
        process.kill(c.pid, "SIGKILL");
      } catch {}
    }
    const t = setTimeout(() => process.exit(130), 8000);
    await Promise.allSettled(cleanups.map((fn) => fn()));
    clearTimeout(t);
    process.exit(130);
  });
}
process.once("exit", () => {
  for (const c of children) {
    try {
      process.kill(c.pid, "SIGKILL");
    } catch {}
  }
  for (const d of tmpDirs) {
    if (process.env.WALCAST_KEEP_TMP === "1") console.error(`edge: kept ${d}`);
    else fs.rmSync(d, { recursive: true, force: true });
  }
});

/** Resolves once `url` answers (any HTTP status), or rejects after `ms`. */
export async function waitForHttp(url, ms = 30_000, child) {
  const end = Date.now() + ms;
  let last;
  while (Date.now() < end) {
    if (child && child.exitCode !== null) throw new Error(`process exited ${child.exitCode} before ${url} answered`);
    try {
      const r = await fetch(url, { signal: AbortSignal.timeout(2000) });
      await r.arrayBuffer();
      return;
    } catch (e) {
      last = e;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`${url} did not answer within ${ms} ms: ${last?.message ?? last}`);
}

/**
 * Starts a server on a port from `freePort`: `start(port)` spawns it (logging
 * to `logFile`), `readyUrl(port)` is polled until it answers. When the port was
 * taken before the child bound it, the child is stopped and started again on a
 * new port, at most `tries` times. Returns `{ child, port }`.
 */
export async function startOnFreePort({ start, readyUrl, logFile, timeoutMs = 60_000, tries = 4, signal }) {
  for (let attempt = 1; ; attempt++) {
    const port = await freePort();
    if (fs.existsSync(logFile)) fs.writeFileSync(logFile, "");
    const child = start(port);
    try {
      await waitForHttp(readyUrl(port), timeoutMs, child);
      return { child, port };
    } catch (e) {
      await stopProcess(child, signal ? { signal } : undefined);
      const text = fs.existsSync(logFile) ? fs.readFileSync(logFile, "utf8") : "";
      if (attempt < tries && isAddrInUse(text)) {
        log(`port ${port} was taken before the server bound it; trying another`);
        continue;
      }
      throw new Error(`${e.message}\n--- log (${logFile}):\n${text}`);
    }
  }
}

// The environment wrangler runs in under the tests: no metrics, error
// reports, banner or account lookups, its logs under `logDir`.
export function wranglerEnv(logDir) {
  return {
    WRANGLER_SEND_METRICS: "false",
    WRANGLER_SEND_ERROR_REPORTS: "false",
    CLOUDFLARE_CF_FETCH_ENABLED: "false",
    WRANGLER_HIDE_BANNER: "true",
    WRANGLER_LOG_PATH: logDir,
    CI: "true",
  };
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export const b64 = (bytes) => Buffer.from(bytes).toString("base64");
export const unb64 = (s) => new Uint8Array(Buffer.from(s, "base64"));

/** Percent-encodes every byte outside RFC 3986's unreserved set. */
export function pct(bytes) {
  let s = "";
  for (const b of bytes) {
    const c = String.fromCharCode(b);
    s += /[A-Za-z0-9\-._~]/.test(c) ? c : "%" + b.toString(16).toUpperCase().padStart(2, "0");
  }
  return s;
}

/** A fixture key/bound ({text} or {b64}) as bytes. */
export function argBytes(a) {
  return a.text !== undefined ? new TextEncoder().encode(a.text) : unb64(a.b64);
}

export function bytesEq(a, b) {
  return Buffer.compare(Buffer.from(a), Buffer.from(b)) === 0;
}

export function show(bytes) {
  const s = Buffer.from(bytes).toString("utf8");
  return Buffer.from(s, "utf8").equals(Buffer.from(bytes)) ? JSON.stringify(s) : `0x${Buffer.from(bytes).toString("hex")}`;
}

/** Runs `fn` on `items` with at most `n` in flight. */
export async function pool(items, n, fn) {
  let i = 0;
  const workers = Array.from({ length: Math.min(n, items.length) }, async () => {
    while (i < items.length) {
      const k = i++;
      await fn(items[k], k);
    }
  });
  await Promise.all(workers);
}

/** The worker's modules (worker/src/*.js) as file names, its entry index.js first. */
export function workerSources() {
  const dir = path.join(REPO, "worker", "src");
  return ["index.js", ...fs.readdirSync(dir).filter((f) => f.endsWith(".js") && f !== "index.js").sort()];
}

export function distReady() {
  for (const f of ["web.js", "workerd.js", "replica.js", "wasm/walcast_wasm.js", "wasm/walcast_wasm_bg.wasm"]) {
    if (!fs.existsSync(path.join(DIST, f))) return false;
  }
  return true;
}

/** playwright-core, from tests/js/edge/node_modules (scripts/browser-deps.sh). */
export async function loadPlaywright() {
  return import("playwright-core");
}

export const CHROMIUM = process.env.WALCAST_CHROMIUM ?? "/usr/bin/chromium";
export const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
