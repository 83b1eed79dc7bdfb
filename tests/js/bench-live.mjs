// Measures the live tail with every default, end to end: `walcast publish`
// following the WAL, `walcast serve`, and a JS replica opened with no
// options and start()ed (long-poll against walcast serve). Prints:
//  - an idle replica's requests per minute (over WALCAST_BENCH_IDLE_S, default 60 s);
//  - single-write visibility: from `walcast write` returning the write's LSN
//    to the replica's onChange covering it, for WALCAST_BENCH_WRITES writes
//    (default 20) spaced by a quiet second; median and worst, in ms.
// Figures only: nothing here asserts a time.
//
// Usage: node tests/js/bench-live.mjs   (after scripts/build-js.sh; needs
//   target/debug/walcast or WALCAST_BIN)
import { execFileSync, spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const walcast = process.env.WALCAST_BIN ?? join(root, "target", "debug", "walcast");
const idleS = Number(process.env.WALCAST_BENCH_IDLE_S ?? 60);
const writes = Number(process.env.WALCAST_BENCH_WRITES ?? 20);
const { Replica } = await import(pathToFileURL(join(root, "js", "dist", "node.js")).href);

const tmp = mkdtempSync(join(tmpdir(), "walcast-live-"));
const wal = join(tmp, "wal");
const ds = join(tmp, "ds");
const children = [];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function write(key, value) {
  const out = execFileSync(walcast, ["write", "--wal", wal], { input: JSON.stringify({ op: "put", key, value }) + "\n" });
  return JSON.parse(out.toString().trim().split("\n").pop()).lsn;
}

function start(args, ready) {
  const child = spawn(walcast, args, { stdio: ["ignore", "pipe", "pipe"] });
  children.push(child);
  return new Promise((resolve, reject) => {
    let buf = "";
    child.stdout.on("data", (d) => {
      buf += d;
      const m = ready(buf);
      if (m) resolve(m);
    });
    child.on("exit", (code) => reject(new Error(`walcast ${args[0]} exited ${code}`)));
  });
}

try {
  write("seed", "0");
  start(["publish", "--wal", wal, "--to", `file://${ds}`], () => null).catch(() => {});
  // The dataset exists once the publisher claimed it.
  for (let i = 0; i < 200; i++) {
    try {
      execFileSync(walcast, ["inspect", `file://${ds}`], { stdio: "ignore" });
      break;
    } catch {
      await sleep(50);
    }
  }
  const url = await start(["serve", ds, "--addr", "127.0.0.1:0"], (b) => b.match(/listening on (http:\/\/\S+)/)?.[1]);
  const replica = await Replica.open(url);
  await replica.sync();
  replica.start();
  await sleep(2000);

  // Idle.
  const r0 = replica.status().requests;
  await sleep(idleS * 1000);
  const idle = ((replica.status().requests - r0) * 60) / idleS;
  console.log(`| idle replica requests per minute (${idleS} s, long-poll ${replica.status().longPoll === true}) | ${idle.toFixed(1)} |`);

  // Single writes after a quiet second.
  const seen = [];
  for (let i = 0; i < writes; i++) {
    await sleep(1000);
    const lsn = write(`k${i}`, `v${i}`);
    const t0 = performance.now();
    if (replica.status().appliedLsn < lsn) {
      await new Promise((resolve) => {
        const off = replica.onChange(({ last }) => {
          if (last >= lsn) {
            off();
            resolve();
          }
        });
      });
    }
    seen.push(performance.now() - t0);
  }
  seen.sort((a, b) => a - b);
  const median = seen[Math.floor(seen.length / 2)];
  console.log(`| single-write visibility, ${writes} writes: median / worst (ms) | ${median.toFixed(0)} / ${seen[seen.length - 1].toFixed(0)} |`);
  await replica.close();
} finally {
  for (const c of children) c.kill("SIGTERM");
  await sleep(200);
  for (const c of children) c.kill("SIGKILL");
  rmSync(tmp, { recursive: true, force: true });
}
