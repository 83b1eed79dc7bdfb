// Measures the edge replica (issue figures), in one run on this machine:
//  - the wasm module's size, raw and gzipped;
//  - replay throughput (decode + verify + apply of the same segment) in wasm
//    (Node) relative to native;
//  - Replica.open + sync to the first read, for a 100,000-key snapshot, in
//    Node and in workerd (the worker's first /kv request);
//  - wasm memory of a replica state holding 1,000,000 keys with 100-byte
//    values, against the 128 MB a Workers isolate may use;
//  - a cold first read, full mode against lazy mode (`load: "lazy"`), for
//    datasets of 100,000 and 1,000,000 keys with 100-byte values (a
//    block-indexed snapshot of every key plus a short tail), in Node
//    (Replica.open to the first get) and in workerd (a new isolate's first
//    /kv request, LOAD=full vs LOAD=lazy): GETs, bytes received, ms.
// Figures only: nothing here asserts a time.
//
//  - the peak memory of a lazy replica (Node) serving 10,000 random reads
//    with an 8 MiB cache over 1,000,000 keys (WALCAST_BENCH_LAZY_KEYS).
//
// Usage: node tests/js/bench.mjs [size|replay|open|memory|lazypeak|cold]...   (default: all)
//   after scripts/build-js.sh; needs target/release/walcast (WALCAST_BIN
//   overrides) and, for workerd, tests/js/edge/node_modules (browser-deps.sh).
//   WALCAST_BENCH_COLD_KEYS=100000,1000000 sets the cold-read dataset sizes.
import { execFileSync, spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync, statSync, openSync, writeSync, closeSync } from "node:fs";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join, dirname, relative } from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";
import { workerSources } from "./edge/lib.mjs";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const walcast = process.env.WALCAST_BIN ?? join(root, "target", "release", "walcast");
const wasmDir = join(root, "js", "dist", "wasm");
const dist = join(root, "js", "dist");
const workerdBin = join(root, "tests", "js", "edge", "node_modules", ".bin", "workerd");
const wasmFile = readdirSync(wasmDir).find((f) => f.endsWith("_bg.wasm"));
const wasmBytes = readFileSync(join(wasmDir, wasmFile));

// The shipped module plus the benchmark hooks (`benchReplay`,
// `benchStateMemory`), built by scripts/build-bench-wasm.sh.
let benchPkg;
function benchWasm() {
  if (!benchPkg) {
    execFileSync("bash", [join(root, "scripts", "build-bench-wasm.sh")], { cwd: root, stdio: ["ignore", "ignore", "inherit"] });
    const dir = join(root, "target", "wasm-bench", "pkg");
    benchPkg = { js: join(dir, "walcast_wasm.js"), bytes: readFileSync(join(dir, "walcast_wasm_bg.wasm")) };
  }
  return benchPkg;
}
const tmp = mkdtempSync(join(tmpdir(), "walcast-bench-"));
const out = [];
const report = (k, v) => { out.push(`| ${k} | ${v} |`); console.error(`bench: ${k}: ${v}`); };
const sections = new Set(process.argv.slice(2));
const want = (s) => sections.size === 0 || sections.has(s);

function walcastWrite(wal, n, keyFmt, perLine = 1) {
  const f = join(tmp, `in-${n}-${perLine}.ndjson`);
  const fd = openSync(f, "w");
  const value = "v".repeat(100);
  for (let i = 0; i < n; i += perLine) {
    const ops = [];
    for (let j = i; j < Math.min(n, i + perLine); j++) ops.push({ op: "put", key: keyFmt(j), value });
    writeSync(fd, JSON.stringify(perLine === 1 ? ops[0] : { batch: ops }) + "\n");
  }
  closeSync(fd);
  execFileSync("sh", ["-c", `"${walcast}" write --wal "${wal}" < "${f}" > /dev/null`]);
  rmSync(f);
}

/** `walcast serve dir` on a free port; resolves { url, stop }. */
async function serve(dir) {
  const child = spawn(walcast, ["serve", dir, "--addr", "127.0.0.1:0"], { stdio: ["ignore", "pipe", "inherit"] });
  const url = await new Promise((resolve, reject) => {
    let buf = "";
    child.stdout.on("data", (d) => { buf += d; const m = /listening on (\S+)/.exec(buf); if (m) resolve(m[1].replace(/\/$/, "")); });
    child.on("exit", () => reject(new Error("walcast serve exited")));
  });
  child.removeAllListeners("exit");
  return { url, stop: () => child.kill() };
}

/**
 * A workerd process serving worker/src (the package's workerd entry) with
 * `bindings`; resolves { port, stop } once it listens. No HTTP request is
 * made before the caller's: the first one reaches a new isolate.
 */
async function startWorkerd(name, bindings) {
  const lit = (x) => JSON.stringify(x);
  const emb = (p) => lit(relative(tmp, p)); // workerd embeds paths relative to the config
  const mods = [
    // The worker's modules, its entry first.
    ...workerSources().map((f) => `(name = ${lit(f)}, esModule = embed ${emb(join(root, "worker/src", f))})`),
    `(name = "walcast", esModule = embed ${emb(join(dist, "workerd.js"))})`,
  ];
  for (const f of readdirSync(dist)) if (f.endsWith(".js") && !["node.js", "web.js", "workerd.js"].includes(f)) mods.push(`(name = ${lit(f)}, esModule = embed ${emb(join(dist, f))})`);
  for (const f of readdirSync(wasmDir)) {
    if (f.endsWith(".wasm")) mods.push(`(name = ${lit("wasm/" + f)}, wasm = embed ${emb(join(wasmDir, f))})`);
    else if (f.endsWith(".js")) mods.push(`(name = ${lit("wasm/" + f)}, esModule = embed ${emb(join(wasmDir, f))})`);
  }
  const port = 20000 + Math.floor(Math.random() * 20000);
  const b = Object.entries(bindings).map(([k, v]) => `(name = ${lit(k)}, text = ${lit(String(v))})`).join(", ");
  const config = join(tmp, `${name}.capnp`);
  writeFileSync(config, `using Workerd = import "/workerd/workerd.capnp";
const config :Workerd.Config = (
  services = [
    (name = "main", worker = (modules = [ ${mods.join(", ")} ], compatibilityDate = "2025-11-01",
      bindings = [ ${b} ], globalOutbound = "net")),
    (name = "net", network = (allow = ["public", "private", "local"])),
  ],
  sockets = [ (name = "http", address = ${lit(`127.0.0.1:${port}`)}, http = (), service = "main") ],
);
`);
  const child = spawn(workerdBin, ["serve", config], { stdio: ["ignore", "ignore", "inherit"] });
  // Wait until workerd listens (a TCP connect, no HTTP request: any request would start the sync).
  for (let i = 0; ; i++) {
    const ok = await new Promise((r) => { const c = connect(port, "127.0.0.1", () => { c.destroy(); r(true); }); c.on("error", () => r(false)); });
    if (ok) break;
    if (i > 600 || child.exitCode !== null) throw new Error("workerd did not start");
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    port,
    stop: () => new Promise((resolve) => { child.once("exit", resolve); child.kill("SIGINT"); }),
  };
}

const mb = (b) => `${(b / 1e6).toFixed(b < 1e6 ? 3 : 1)} MB`;

/**
 * A dataset of `n` keys (`key:%08d`) with 100-byte values in tmp: a
 * block-indexed snapshot of all of them and a tail of 100 overwrites.
 * Returns { ds, key, snap }.
 */
function coldDataset(n) {
  const wal = join(tmp, `cold-wal-${n}`);
  const ds = join(tmp, `cold-ds-${n}`);
  const key = (i) => `key:${String(i).padStart(8, "0")}`;
  const perLine = 1000;
  const batches = Math.ceil(n / perLine);
  const t = performance.now();
  walcastWrite(wal, n, key, perLine);
  execFileSync(walcast, ["publish", "--wal", wal, "--to", `file://${ds}`, "--once", "--snapshot-every", String(batches)], { stdio: "ignore" });
  walcastWrite(wal, 100, (i) => key((i * 7919) % n));
  execFileSync(walcast, ["publish", "--wal", wal, "--to", `file://${ds}`, "--once", "--snapshot-every", "0"], { stdio: "ignore" });
  rmSync(wal, { recursive: true, force: true });
  const head = JSON.parse(readFileSync(join(ds, "catalog", "head.json"), "utf8"));
  const snap = head.snapshot;
  if (!snap || snap.version !== 2 || snap.entries !== n) throw new Error(`cold ${n}: the head's snapshot is ${JSON.stringify(snap)}`);
  console.error(`bench: cold ${n}: dataset built in ${((performance.now() - t) / 1000).toFixed(1)} s; snapshot ${mb(snap.size)} at LSN ${snap.lsn}, committed ${head.committed_lsn}`);
  return { ds, key, snap };
}

// A lazy replica in a Node process of its own: open with an 8 MiB cache,
// 10,000 reads of keys drawn at random (a fixed seed), then the process's
// peak resident memory (VmHWM) before the first read and after the last.
const LAZY_PEAK_SCRIPT = `
const [dist, url, n, reads, cacheBytes] = process.argv.slice(1);
const { readFileSync } = await import("node:fs");
const hwm = () => Number(/VmHWM:\\s+(\\d+)/.exec(readFileSync("/proc/self/status", "utf8"))[1]) * 1024;
// The module's memory, seen by wrapping instantiate (wasm memory never shrinks: its size is its peak).
const mems = [];
const instantiate = WebAssembly.instantiate;
WebAssembly.instantiate = async (...args) => {
  const r = await instantiate(...args);
  const m = (r.instance ?? r).exports?.memory;
  if (m) mems.push(m);
  return r;
};
const { Replica, init } = await import(dist + "/node.js");
await init();
const before = hwm();
const t = performance.now();
const r = await Replica.open(url, { load: "lazy", cacheBytes: Number(cacheBytes) });
let x = 12345;
for (let i = 0; i < Number(reads); i++) {
  x = (Math.imul(x, 1103515245) + 12345) >>> 0;
  const k = "key:" + String(x % Number(n)).padStart(8, "0");
  const v = await r.get(k);
  if (!v || v.length !== 100) throw new Error("lazy read of " + k + " found " + v);
}
const ms = performance.now() - t;
const s = r.status();
const wasm = mems.length ? mems[mems.length - 1].buffer.byteLength : null;
console.log(JSON.stringify({ before, after: hwm(), wasm, ms, cachedBytes: s.cachedBytes, blocksFetched: s.blocksFetched, requests: s.requests, bytesReceived: s.bytesReceived }));
await r.close();
process.exit(0);
`;

/** Peak memory of a lazy replica serving random reads over `n` keys. */
async function lazyPeak(n, reads, cacheBytes) {
  const { ds } = coldDataset(n);
  const server = await serve(ds);
  try {
    const outp = await new Promise((resolve, reject) => {
      const child = spawn(process.execPath, ["--input-type=module", "-e", LAZY_PEAK_SCRIPT, dist, server.url, String(n), String(reads), String(cacheBytes)], { stdio: ["ignore", "pipe", "inherit"] });
      let buf = "";
      child.stdout.on("data", (d) => { buf += d; });
      child.on("exit", (code) => (code === 0 ? resolve(buf) : reject(new Error(`lazy peak child exited with ${code}`))));
    });
    const m = JSON.parse(outp.trim().split("\n").pop());
    report(`Node, lazy replica over ${n.toLocaleString("en")} keys, ${reads.toLocaleString("en")} random reads, cacheBytes ${mb(cacheBytes)}: peak RSS (VmHWM) after init / after the reads`, `${mb(m.before)} / ${mb(m.after)} (+${mb(m.after - m.before)}); wasm memory ${m.wasm === null ? "not seen" : mb(m.wasm)}; cache ${mb(m.cachedBytes)}, ${m.blocksFetched} blocks fetched, ${m.requests} GETs, ${mb(m.bytesReceived)}, ${m.ms.toFixed(0)} ms`);
  } finally {
    server.stop();
    rmSync(ds, { recursive: true, force: true });
  }
}

/**
 * Cold first read of one key, full vs lazy, in Node and in workerd, for a
 * dataset of `n` keys with 100-byte values: a snapshot of all of them
 * (block-indexed, the publisher's default) and a tail of 100 overwrites.
 */
async function coldReads(n) {
  const { ds, key, snap } = coldDataset(n);
  let t;
  const probe = key(Math.floor(n * 0.61803));
  const server = await serve(ds);
  try {
    const { Replica, init } = await import(join(dist, "node.js"));
    await init(); // the module's compile time is not part of either figure
    for (const load of ["full", "lazy"]) {
      t = performance.now();
      const r = await Replica.open(server.url, { load });
      if (load === "full") await r.sync();
      const v = await r.get(probe);
      const ms = performance.now() - t;
      if (!v || v.length !== 100) throw new Error(`cold ${n} ${load}: the first read found ${v}`);
      const s = r.status();
      report(`Node, ${n.toLocaleString("en")} keys (snapshot ${mb(snap.size)}), ${load}: Replica.open${load === "full" ? " + sync" : ""} + first get`, `${s.requests} GETs, ${mb(s.bytesReceived)}, ${ms.toFixed(0)} ms`);
      await r.close();
    }
    if (existsSync(workerdBin)) {
      for (const load of ["full", "lazy"]) {
        const w = await startWorkerd(`cold-${n}-${load}`, { DATASET_URL: server.url, LOAD: load, MAX_AGE_MS: "3600000", FIRST_SYNC_WAIT_MS: "600000" });
        try {
          t = performance.now();
          const res = await fetch(`http://127.0.0.1:${w.port}/kv/${probe}`);
          const body = await res.arrayBuffer();
          const ms = performance.now() - t;
          if (res.status !== 200 || body.byteLength !== 100) throw new Error(`cold ${n} workerd ${load}: /kv answered ${res.status}: ${Buffer.from(body).toString().slice(0, 200)}`);
          const s = await (await fetch(`http://127.0.0.1:${w.port}/status`)).json();
          report(`workerd, ${n.toLocaleString("en")} keys, LOAD=${load}: a new isolate's first /kv`, `${s.requests} GETs, ${mb(s.bytesReceived)}, ${ms.toFixed(0)} ms`);
        } finally {
          await w.stop();
        }
      }
    } else {
      console.error(`bench: no workerd at ${workerdBin} (bash scripts/browser-deps.sh): the workerd cold reads are skipped`);
    }
  } finally {
    server.stop();
    rmSync(ds, { recursive: true, force: true });
  }
}

try {
  if (want("size")) report("wasm module (raw / gzip -9)", `${wasmBytes.length} B / ${gzipSync(wasmBytes, { level: 9 }).length} B`);

  if (want("replay") || want("open")) {
    // One segment of 200,000 batches (100,000 keys; 26 MB, under the 128 MiB a segment may take), and a snapshot of them.
    const wal = join(tmp, "wal"), ds = join(tmp, "ds");
    walcastWrite(wal, 200000, (i) => `key:${String(i % 100000).padStart(8, "0")}`);
    execFileSync(walcast, ["publish", "--wal", wal, "--to", `file://${ds}`, "--once", "--segment-bytes", "128MiB", "--snapshot-every", "100000"], { stdio: "ignore" });

    if (want("replay")) {
      // Replay: the segment, native vs wasm.
      const segDir = join(ds, "segments", "1");
      const seg = readdirSync(segDir).map((f) => join(segDir, f)).sort((a, b) => statSync(b).size - statSync(a).size)[0];
      execFileSync("cargo", ["build", "-q", "--release", "-p", "walcast-core", "--example", "replay_file"], { cwd: root, stdio: "ignore" });
      const native = execFileSync(join(root, "target", "release", "examples", "replay_file"), [seg]).toString();
      const nativeMs = Number(/ms=([\d.]+)/.exec(native)[1]);
      const records = Number(/records=(\d+)/.exec(native)[1]);
      const bench = benchWasm();
      const wasm = await import(bench.js);
      await wasm.default({ module_or_path: bench.bytes });
      const segBytes = readFileSync(seg);
      let wasmMs = Infinity;
      for (let i = 0; i < 5; i++) {
        const t = performance.now();
        const n = wasm.benchReplay(segBytes);
        wasmMs = Math.min(wasmMs, performance.now() - t);
        if (n !== records) throw new Error(`wasm applied ${n} records, native ${records}`);
      }
      const size = segBytes.length / 1e6;
      report(`replay of one ${size.toFixed(1)} MB segment (${records} batches): native`, `${nativeMs.toFixed(1)} ms (${(size / nativeMs * 1e3).toFixed(0)} MB/s)`);
      report("… same bytes in wasm (Node)", `${wasmMs.toFixed(1)} ms (${(size / wasmMs * 1e3).toFixed(0)} MB/s) = ${(nativeMs / wasmMs).toFixed(2)}x native throughput`);
    }

    if (want("open")) {
      // Open to first read from a 100,000-key snapshot, over `walcast serve`.
      const server = await serve(ds);
      try {
        const { Replica } = await import(join(dist, "node.js"));
        const head = JSON.parse(readFileSync(join(ds, "catalog", "head.json"), "utf8"));
        const t = performance.now();
        const replica = await Replica.open(server.url, {});
        await replica.sync();
        const v = replica.get("key:00012345");
        const ms = performance.now() - t;
        if (!v) throw new Error("first read found nothing");
        report(`Node: Replica.open + sync + first read (snapshot of ${head.snapshot.entries} keys at LSN ${head.snapshot.lsn}, ${head.committed_lsn} committed)`, `${ms.toFixed(0)} ms, ${replica.status().requests} GETs`);
        await replica.close();

        // The same in workerd: the worker's first /kv request awaits the initial sync.
        if (existsSync(workerdBin)) {
          const w = await startWorkerd("open", { DATASET_URL: server.url });
          try {
            const start = performance.now();
            const res = await fetch(`http://127.0.0.1:${w.port}/kv/key:00012345`);
            const body = await res.arrayBuffer();
            const ms = performance.now() - start;
            if (res.status !== 200 || body.byteLength !== 100) throw new Error(`workerd /kv answered ${res.status}`);
            report(`workerd: first /kv request to a new isolate (the worker's Replica.open + sync + read, same dataset)`, `${ms.toFixed(0)} ms`);
          } finally {
            await w.stop();
          }
        }
      } finally {
        server.stop();
      }
    }
    rmSync(wal, { recursive: true, force: true });
    rmSync(ds, { recursive: true, force: true });
  }

  if (want("memory")) {
    // Memory of 1,000,000 keys with 100-byte values, in wasm: each order in a
    // fresh module instance (wasm memory never shrinks).
    const bench = benchWasm();
    for (const shuffled of [false, true]) {
      const inst = await import(bench.js + `?${shuffled ? "shuffled" : "sorted"}`);
      await inst.default({ module_or_path: bench.bytes });
      const [entries, heap, mem] = inst.benchStateMemory(1000000, 100, shuffled);
      report(`wasm: ${entries} keys with 100-byte values, ${shuffled ? "written in random order" : "written in key order (as a snapshot bootstrap)"}`, `state ${(heap / 1e6).toFixed(1)} MB, wasm memory ${(mem / 1e6).toFixed(1)} MB (a Workers isolate may use 128 MB)`);
    }
  }

  if (want("lazypeak")) {
    const n = Number(process.env.WALCAST_BENCH_LAZY_KEYS ?? 1000000);
    await lazyPeak(n, 10000, 8 << 20);
  }

  if (want("cold")) {
    const sizes = (process.env.WALCAST_BENCH_COLD_KEYS ?? "100000,1000000").split(",").map(Number).filter((x) => x > 0);
    for (const n of sizes) await coldReads(n);
  }
  console.log("| figure | value |\n| --- | --- |\n" + out.join("\n"));
} finally {
  rmSync(tmp, { recursive: true, force: true });
}
