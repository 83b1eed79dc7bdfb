// Measures the edge replica (issue figures), in one run on this machine:
//  - the wasm module's size, raw and gzipped;
//  - Replica.open + sync to the first read, for a 100,000-key snapshot, in Node;
//  - replay throughput (decode + verify + apply of the same segment) in wasm
//    (Node) relative to native;
//  - wasm memory of a replica state holding 1,000,000 keys with 100-byte
//    values, against the 128 MB a Workers isolate may use.
// Usage: node tests/js/bench.mjs   (after scripts/build-js.sh; needs target/release/walcast)
import { execFileSync, spawn } from "node:child_process";
import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const walcast = join(root, "target", "release", "walcast");
const wasmDir = join(root, "js", "dist", "wasm");
const wasmFile = readdirSync(wasmDir).find((f) => f.endsWith("_bg.wasm"));
const wasmBytes = readFileSync(join(wasmDir, wasmFile));
const tmp = mkdtempSync(join(tmpdir(), "walcast-bench-"));
const out = [];
const report = (k, v) => { out.push(`| ${k} | ${v} |`); console.error(`bench: ${k}: ${v}`); };

function walcastWrite(wal, n, keyFmt) {
  let lines = "";
  for (let i = 0; i < n; i++) lines += JSON.stringify({ op: "put", key: keyFmt(i), value: "v".repeat(100) }) + "\n";
  const f = join(tmp, `in-${n}.ndjson`);
  writeFileSync(f, lines);
  execFileSync("sh", ["-c", `"${walcast}" write --wal "${wal}" < "${f}" > /dev/null`]);
}

try {
  report("wasm module (raw / gzip -9)", `${wasmBytes.length} B / ${gzipSync(wasmBytes, { level: 9 }).length} B`);

  // Replay: one segment of 200,000 batches, native vs wasm.
  const wal = join(tmp, "wal"), ds = join(tmp, "ds");
  walcastWrite(wal, 200000, (i) => `key:${String(i % 100000).padStart(8, "0")}`);
  execFileSync(walcast, ["publish", "--wal", wal, "--to", `file://${ds}`, "--once", "--segment-bytes", "1GiB", "--snapshot-every", "100000"], { stdio: "ignore" });
  const segDir = join(ds, "segments", "1");
  const seg = readdirSync(segDir).map((f) => join(segDir, f)).sort((a, b) => statSync(b).size - statSync(a).size)[0];
  execFileSync("cargo", ["build", "-q", "--release", "-p", "walcast-core", "--example", "replay_file"], { cwd: root, stdio: "ignore" });
  const native = execFileSync(join(root, "target", "release", "examples", "replay_file"), [seg]).toString();
  const nativeMs = Number(/ms=([\d.]+)/.exec(native)[1]);
  const records = Number(/records=(\d+)/.exec(native)[1]);
  const wasm = await import(join(wasmDir, "walcast_wasm.js"));
  await wasm.default({ module_or_path: wasmBytes });
  const segBytes = readFileSync(seg);
  let wasmMs = Infinity;
  for (let i = 0; i < 5; i++) {
    const t = performance.now();
    const n = wasm.benchReplay(segBytes);
    wasmMs = Math.min(wasmMs, performance.now() - t);
    if (n !== records) throw new Error(`wasm applied ${n} records, native ${records}`);
  }
  const mb = segBytes.length / 1e6;
  report(`replay of one ${mb.toFixed(1)} MB segment (${records} batches): native`, `${nativeMs.toFixed(1)} ms (${(mb / nativeMs * 1e3).toFixed(0)} MB/s)`);
  report("… same bytes in wasm (Node)", `${wasmMs.toFixed(1)} ms (${(mb / wasmMs * 1e3).toFixed(0)} MB/s) = ${(nativeMs / wasmMs).toFixed(2)}x native throughput`);

  // Open to first read from a 100,000-key snapshot, over `walcast serve`.
  const serve = spawn(walcast, ["serve", ds, "--addr", "127.0.0.1:0"], { stdio: ["ignore", "pipe", "inherit"] });
  const url = await new Promise((resolve, reject) => {
    let buf = "";
    serve.stdout.on("data", (d) => { buf += d; const m = /listening on (\S+)/.exec(buf); if (m) resolve(m[1]); });
    serve.on("exit", () => reject(new Error("walcast serve exited")));
  });
  try {
    const { Replica } = await import(join(root, "js", "dist", "node.js"));
    const head = JSON.parse(readFileSync(join(ds, "catalog", "head.json"), "utf8"));
    const t = performance.now();
    const replica = await Replica.open(url, {});
    await replica.sync();
    const v = replica.get("key:00012345");
    const ms = performance.now() - t;
    if (!v) throw new Error("first read found nothing");
    report(`Node: Replica.open + sync + first read (snapshot of ${head.snapshot.entries} keys at LSN ${head.snapshot.lsn}, ${head.committed_lsn} committed)`, `${ms.toFixed(0)} ms, ${replica.status().requests} GETs`);
    replica.close?.();

    // The same in workerd: the worker's first /kv request awaits the initial sync.
    const workerd = join(root, "tests", "js", "edge", "node_modules", ".bin", "workerd");
    const dist = join(root, "js", "dist");
    const lit = (x) => JSON.stringify(x);
    const { relative } = await import("node:path");
    const emb = (p) => lit(relative(tmp, p)); // workerd embeds paths relative to the config
    const mods = [
      `(name = "index.js", esModule = embed ${emb(join(root, "worker/src/index.js"))})`,
      `(name = "handler.js", esModule = embed ${emb(join(root, "worker/src/handler.js"))})`,
      `(name = "walcast", esModule = embed ${emb(join(dist, "workerd.js"))})`,
    ];
    for (const f of readdirSync(dist)) if (f.endsWith(".js") && !["node.js", "web.js", "workerd.js"].includes(f)) mods.push(`(name = ${lit(f)}, esModule = embed ${emb(join(dist, f))})`);
    for (const f of readdirSync(wasmDir)) {
      if (f.endsWith(".wasm")) mods.push(`(name = ${lit("wasm/" + f)}, wasm = embed ${emb(join(wasmDir, f))})`);
      else if (f.endsWith(".js")) mods.push(`(name = ${lit("wasm/" + f)}, esModule = embed ${emb(join(wasmDir, f))})`);
    }
    const port = 20000 + Math.floor(Math.random() * 20000);
    writeFileSync(join(tmp, "config.capnp"), `using Workerd = import "/workerd/workerd.capnp";
const config :Workerd.Config = (
  services = [
    (name = "main", worker = (modules = [ ${mods.join(", ")} ], compatibilityDate = "2025-11-01",
      bindings = [ (name = "DATASET_URL", text = ${lit(url)}) ], globalOutbound = "net")),
    (name = "net", network = (allow = ["public", "private", "local"])),
  ],
  sockets = [ (name = "http", address = ${lit(`127.0.0.1:${port}`)}, http = (), service = "main") ],
);
`);
    const wd2 = spawn(workerd, ["serve", join(tmp, "config.capnp")], { stdio: ["ignore", "ignore", "inherit"] });
    try {
      // Wait until workerd listens (a TCP connect, no HTTP request: any request would start the sync).
      const { connect } = await import("node:net");
      for (let i = 0; ; i++) {
        const ok = await new Promise((r) => { const c = connect(port, "127.0.0.1", () => { c.destroy(); r(true); }); c.on("error", () => r(false)); });
        if (ok) break;
        if (i > 600) throw new Error("workerd did not start");
        await new Promise((r) => setTimeout(r, 50));
      }
      const start = performance.now();
      const res = await fetch(`http://127.0.0.1:${port}/kv/key:00012345`);
      const body = await res.arrayBuffer();
      const ms = performance.now() - start;
      if (res.status !== 200 || body.byteLength !== 100) throw new Error(`workerd /kv answered ${res.status}`);
      report(`workerd: first /kv request to a new isolate (the worker's Replica.open + sync + read, same dataset)`, `${ms.toFixed(0)} ms`);
    } finally {
      wd2.kill("SIGINT");
    }
  } finally {
    serve.kill();
  }

  // Memory of 1,000,000 keys with 100-byte values, in wasm: each order in a
  // fresh module instance (wasm memory never shrinks).
  for (const shuffled of [false, true]) {
    const inst = await import(join(wasmDir, "walcast_wasm.js") + `?${shuffled ? "shuffled" : "sorted"}`);
    await inst.default({ module_or_path: wasmBytes });
    const [entries, heap, mem] = inst.benchStateMemory(1000000, 100, shuffled);
    report(`wasm: ${entries} keys with 100-byte values, ${shuffled ? "written in random order" : "written in key order (as a snapshot bootstrap)"}`, `state ${(heap / 1e6).toFixed(1)} MB, wasm memory ${(mem / 1e6).toFixed(1)} MB (a Workers isolate may use 128 MB)`);
  }
  console.log("| figure | value |\n| --- | --- |\n" + out.join("\n"));
} finally {
  rmSync(tmp, { recursive: true, force: true });
}
