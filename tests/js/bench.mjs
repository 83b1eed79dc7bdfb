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
