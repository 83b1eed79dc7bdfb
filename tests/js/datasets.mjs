#!/usr/bin/env node
// Dataset orchestrator for the JS conformance tests (Node 20+, no dependencies).
//
// Builds walcast datasets with the native binary (`walcast write` + `walcast
// publish --once`), computes the expected state of each with its own model,
// serves them with `walcast serve`, and performs each scenario's mutation on
// request, so runtimes in other processes (Deno, workerd, Chromium) can run the
// same scenarios. See tests/js/README.md for the protocol.
//
//   node tests/js/datasets.mjs serve [--out fixtures.json] [--root DIR] [--keep]
//       prepares everything, serves, prints one JSON line {"ready":true,...},
//       writes fixtures.json (instance "i1"), runs until SIGTERM/SIGINT.
//   node tests/js/datasets.mjs mutate NAME [--control URL] [--instance ID]
//       asks a running orchestrator to mutate a scenario; prints the fixture.
//   node tests/js/datasets.mjs instance [--control URL]
//       asks for a fresh instance (every scenario back at stage 0); prints fixtures.
//
// As a module: `const ds = await startDatasets(); const fx = await ds.newInstance();
// await ds.mutate(fx.instance, "corrupt"); await ds.close();`

import { spawn, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import zlib from "node:zlib";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, "../..");
export const SCENARIOS = ["basic", "midhistory", "corrupt", "retention", "newdataset", "lazy", "lazydamage", "lazydeltas", "signed"];

// --- small utilities ------------------------------------------------------------

function log(...a) {
  if (process.env.WALCAST_DATASETS_QUIET !== "1") console.error("datasets:", ...a);
}

/** mulberry32: a tiny seeded PRNG (deterministic datasets). */
function rng(seed) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return {
    next,
    int: (n) => Math.floor(next() * n), // 0..n-1
    pick: (arr) => arr[Math.floor(next() * arr.length)],
    bytes: (n) => Uint8Array.from({ length: n }, () => Math.floor(next() * 256)),
  };
}

const enc = new TextEncoder();
const hex = (b) => Buffer.from(b).toString("hex");
const b64 = (b) => Buffer.from(b).toString("base64");
const isUtf8 = (b) => {
  try {
    new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }).decode(b);
    return true;
  } catch {
    return false;
  }
};

function copyDir(src, dst) {
  fs.mkdirSync(dst, { recursive: true });
  for (const e of fs.readdirSync(src, { withFileTypes: true })) {
    const s = path.join(src, e.name);
    const d = path.join(dst, e.name);
    if (e.isDirectory()) copyDir(s, d);
    else if (e.isFile()) fs.copyFileSync(s, d);
  }
}

/** Replaces dir `dst` by a copy of `src` (copy beside it, then two renames). */
function replaceDir(src, dst) {
  const next = `${dst}.next`;
  const old = `${dst}.old`;
  fs.rmSync(next, { recursive: true, force: true });
  fs.rmSync(old, { recursive: true, force: true });
  copyDir(src, next);
  if (fs.existsSync(dst)) fs.renameSync(dst, old);
  fs.renameSync(next, dst);
  fs.rmSync(old, { recursive: true, force: true });
}

function walk(dir, base = dir, out = []) {
  if (!fs.existsSync(dir)) return out;
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) walk(p, base, out);
    else out.push(path.relative(base, p).split(path.sep).join("/"));
  }
  return out.sort();
}

// --- the walcast binary ----------------------------------------------------------

export function walcastBin() {
  if (process.env.WALCAST_BIN) return process.env.WALCAST_BIN;
  const bin = path.join(REPO, "target/debug/walcast");
  if (!fs.existsSync(bin)) {
    log("building target/debug/walcast (cargo build -p walcast)");
    const r = spawnSync("cargo", ["build", "-p", "walcast"], { cwd: REPO, stdio: ["ignore", "inherit", "inherit"] });
    if (r.status !== 0) throw new Error("cargo build -p walcast failed");
  }
  return bin;
}

function run(bin, args, input) {
  const r = spawnSync(bin, args, { input, maxBuffer: 256 << 20, encoding: "utf8" });
  if (r.status !== 0) {
    throw new Error(`walcast ${args.join(" ")} exited ${r.status ?? r.signal}:\n${r.stderr}`);
  }
  return r.stdout;
}

// --- model + data generation -------------------------------------------------------

/** The expected state: key bytes (hex) -> { key, value }, plus what was deleted. */
class Model {
  constructor() {
    this.map = new Map();
    this.deleted = new Map(); // hex -> key bytes, keys deleted and not put again
    this.lsn = 0;
    this.payloadCount = 0;
  }
  apply(ops) {
    for (const op of ops) {
      const h = hex(op.key);
      if (op.op === "put") {
        this.map.set(h, { key: op.key, value: op.value });
        this.deleted.delete(h);
      } else {
        if (this.map.delete(h)) this.deleted.set(h, op.key);
      }
    }
    this.lsn++;
  }
  entries() {
    return [...this.map.keys()].sort().map((h) => this.map.get(h));
  }
}

/** One op in walcast write's NDJSON: text fields when the bytes are text. */
function jsonOp(op) {
  const o = { op: op.op };
  if (op.keyText !== undefined) o.key = op.keyText;
  else o.key_b64 = b64(op.key);
  if (op.op === "put") {
    if (op.valueText !== undefined) o.value = op.valueText;
    else o.value_b64 = b64(op.value);
  }
  return o;
}

function textPut(key, value) {
  return { op: "put", key: enc.encode(key), keyText: key, value: enc.encode(value), valueText: value };
}

/** Keys that test the edges of key and value handling; written in the first batch. */
function specialOps() {
  return [
    textPut("\uFEFFbom", "a key starting with a byte order mark"),
    textPut("ключ:1", "кириллица"),
    textPut("emoji:🙂", "🙂"),
    textPut("nul:a\u0000b", "a key with a NUL inside"),
    textPut("empty-value", ""),
    { op: "put", key: Uint8Array.of(0xff, 0x00, 0x01), value: Uint8Array.of(0xde, 0xad, 0xbe, 0xef) },
    { op: "put", key: Uint8Array.of(0xc3), value: enc.encode("a lone UTF-8 lead byte: not text") },
    textPut("user:0", JSON.stringify({ id: 0, name: "Ada", tags: ["a", "b"] })),
  ];
}

const SPECIAL = new Set(specialOps().map((op) => hex(op.key)));

function genBatches(r, model, n, { prefixes = ["user:", "item:", "order/"], keySpace = 400, maxValue = 200, specials = false } = {}) {
  const lines = [];
  const batches = [];
  for (let i = 0; i < n; i++) {
    const ops = [];
    if (specials && i === 0) ops.push(...specialOps());
    const count = 1 + r.int(4);
    for (let j = 0; j < count; j++) {
      const roll = r.next();
      if (roll < 0.15 && model.map.size > 0) {
        // delete an existing key (or, now and then, one that is not there)
        const keys = [...model.map.values()].filter((e) => !SPECIAL.has(hex(e.key)));
        const victim = r.next() < 0.9 ? r.pick(keys).key : enc.encode(`absent:${r.int(1e6)}`);
        const t = isUtf8(victim) ? new TextDecoder().decode(victim) : undefined;
        ops.push({ op: "delete", key: victim, keyText: t !== undefined && enc.encode(t).length === victim.length ? t : undefined });
      } else if (roll < 0.25) {
        // binary key (never valid UTF-8: 0xff cannot appear in UTF-8) and value
        const key = new Uint8Array([0xff, ...r.bytes(1 + r.int(8))]);
        ops.push({ op: "put", key, value: r.bytes(r.int(maxValue)) });
      } else {
        const prefix = r.pick(prefixes);
        const id = r.int(keySpace);
        const key = `${prefix}${id}`;
        const value =
          prefix === "user:"
            ? JSON.stringify({ id, name: `name-${r.int(1e6)}`, score: r.int(1000), pad: "x".repeat(r.int(maxValue)) })
            : `v${r.int(1e9)}:${"y".repeat(r.int(maxValue))}`;
        ops.push(textPut(key, value));
      }
    }
    model.apply(ops);
    batches.push(ops);
    lines.push(JSON.stringify(ops.length === 1 ? jsonOp(ops[0]) : { batch: ops.map(jsonOp) }));
  }
  return lines.join("\n") + "\n";
}

/** Commits the NDJSON to the WAL and checks the LSNs walcast printed. */
function write(bin, wal, ndjson, model) {
  const out = run(bin, ["write", "--wal", wal], ndjson)
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l).lsn);
  const want = ndjson.split("\n").filter(Boolean).length;
  if (out.length !== want) throw new Error(`walcast write printed ${out.length} LSNs for ${want} lines`);
  if (out[out.length - 1] !== model.lsn) {
    throw new Error(`walcast write ended at LSN ${out[out.length - 1]}, the model at ${model.lsn}`);
  }
}

function publish(bin, wal, ds, flags = []) {
  fs.mkdirSync(ds, { recursive: true });
  run(bin, ["publish", "--wal", wal, "--to", pathToFileURL(ds).href, "--once", ...flags]);
}

/** The head's JSON, decoded when it is stored gzip-compressed (`--head-encoding gzip`). */
function readHead(ds) {
  const stored = fs.readFileSync(path.join(ds, "catalog/head.json"));
  const json = stored[0] === 0x1f && stored[1] === 0x8b ? zlib.gunzipSync(stored) : stored;
  return JSON.parse(json.toString("utf8"));
}

/** Segment files of a dataset dir: { key, first, last, size }, in LSN order. */
function segmentsOf(ds) {
  return walk(path.join(ds, "segments"))
    .map((rel) => {
      const m = /^(\d+)\/(\d+)-(\d+)\.wseg$/.exec(rel);
      if (!m) return null;
      const key = `segments/${rel}`;
      return { key, epoch: +m[1], first: +m[2], last: +m[3], size: fs.statSync(path.join(ds, key)).size };
    })
    .filter(Boolean)
    .sort((a, b) => a.first - b.first);
}

/** count and sha256 over (u32le len ‖ payload) of every WAL record, in LSN order. */
function walRecords(wal) {
  const buf = fs.readFileSync(path.join(wal, "wal.log"));
  if (buf.subarray(0, 4).toString("latin1") !== "WCWL") throw new Error("not a walcast WAL");
  const h = createHash("sha256");
  let pos = 16;
  let count = 0;
  while (pos + 16 <= buf.length) {
    const lsn = Number(buf.readBigUInt64LE(pos));
    const len = buf.readUInt32LE(pos + 8);
    if (lsn !== count + 1 || pos + 16 + len > buf.length) break;
    const lenBytes = Buffer.alloc(4);
    lenBytes.writeUInt32LE(len);
    h.update(lenBytes);
    h.update(buf.subarray(pos + 16, pos + 16 + len));
    pos += 16 + len;
    count++;
  }
  return { count, sha256: h.digest("hex") };
}

// --- fixtures --------------------------------------------------------------------------

/** A key or bound as the conformance script takes it: text when it is text. */
function arg(bytes) {
  return isUtf8(bytes) ? { text: new TextDecoder("utf-8", { ignoreBOM: true }).decode(bytes) } : { b64: b64(bytes) };
}

function inRange(k, { prefix, start, end }) {
  const h = hex(k);
  if (prefix && !h.startsWith(hex(prefix))) return false;
  if (start && h < hex(start)) return false;
  if (end && h >= hex(end)) return false;
  return true;
}

function scanCases(model) {
  const entries = model.entries();
  const binKeys = entries.filter((e) => e.key[0] === 0xff).map((e) => e.key);
  const specs = [
    { name: "everything" },
    { name: "prefix user:", prefix: enc.encode("user:") },
    { name: "prefix user: limit 10", prefix: enc.encode("user:"), limit: 10 },
    { name: "start item: end user: (exclusive)", start: enc.encode("item:"), end: enc.encode("user:") },
    { name: "prefix order/ from order/2", prefix: enc.encode("order/"), start: enc.encode("order/2") },
    { name: "end exactly at a present key", start: enc.encode("user:1"), end: enc.encode("user:2") },
    { name: "binary prefix 0xff", prefix: Uint8Array.of(0xff) },
    { name: "limit 0", limit: 0 },
    { name: "limit 1", limit: 1 },
    { name: "no match", prefix: enc.encode("zzz-nothing:") },
    { name: "start after every key", start: Uint8Array.of(0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff) },
  ];
  if (binKeys.length > 2) {
    specs.push({ name: "binary start..end", start: binKeys[1], end: binKeys[binKeys.length - 1] });
  }
  return specs.map((s) => {
    let rows = entries.filter((e) => inRange(e.key, s));
    if (s.limit !== undefined) rows = rows.slice(0, s.limit);
    const c = { name: s.name, expect: rows.map((e) => [b64(e.key), b64(e.value)]) };
    for (const f of ["prefix", "start", "end"]) if (s[f]) c[f] = arg(s[f]);
    if (s.limit !== undefined) c.limit = s.limit;
    return c;
  });
}

function getCases(model, r) {
  const out = [];
  const entries = model.entries();
  for (const e of entries.filter((x) => x.key.length > 0).slice(0, 12)) out.push({ key: arg(e.key), value: b64(e.value) });
  for (let i = 0; i < 20 && entries.length; i++) {
    const e = r.pick(entries);
    out.push({ key: arg(e.key), value: b64(e.value) });
  }
  for (const k of [...model.deleted.values()].slice(0, 20)) out.push({ key: arg(k), absent: true });
  out.push({ key: { text: "never-written" }, absent: true });
  out.push({ key: { b64: b64(Uint8Array.of(0xfe, 0xfd)) }, absent: true });
  return out;
}

function stageFixture(ds, model, extra = {}) {
  const head = readHead(ds);
  return {
    datasetId: head.dataset_id,
    committedLsn: head.committed_lsn,
    earliestLsn: head.earliest_lsn,
    epoch: head.epoch,
    snapshot: head.snapshot ? head.snapshot.key : null,
    pages: (head.pages ?? []).length,
    segments: segmentsOf(ds),
    expected: { lsn: model.lsn, entries: model.entries().map((e) => [b64(e.key), b64(e.value)]) },
    ...extra,
  };
}

// --- scenarios ----------------------------------------------------------------------------
//
// Each scenario builds two template dirs, stage0 (what a test first syncs) and
// stage1 (what its mutation swaps in), and their fixtures. Instances copy them.

function buildScenarios(bin, work) {
  const t0 = Date.now();
  const out = {};
  const dirs = (name) => {
    const d = path.join(work, name);
    return { wal: path.join(d, "wal"), ds: path.join(d, "ds"), stage0: path.join(d, "stage0"), stage1: path.join(d, "stage1") };
  };

  // basic: ~2,000 random batches with deletes and binary keys, many small
  // segments (enough that the head spills into catalog pages). No mutation.
  {
    const d = dirs("basic");
    const m = new Model();
    const r = rng(1);
    const flags = ["--segment-bytes", "8192", "--snapshot-every", "0"];
    write(bin, d.wal, genBatches(r, m, 1000, { specials: true }), m);
    publish(bin, d.wal, d.ds, flags);
    write(bin, d.wal, genBatches(r, m, 1000), m);
    publish(bin, d.wal, d.ds, flags);
    copyDir(d.ds, d.stage0);
    const records = walRecords(d.wal);
    if (records.count !== m.lsn) throw new Error(`basic: WAL has ${records.count} records, model ${m.lsn}`);
    const fx = stageFixture(d.stage0, m, { scans: scanCases(m), gets: getCases(m, r), records });
    if (fx.segments.length < 3) throw new Error(`basic: only ${fx.segments.length} segments`);
    out.basic = { stages: [{ dir: d.stage0, fixture: fx }] };
  }

  // midhistory: a replica synced at stage 0 and restored from its snapshot()
  // after stage 1 was published must fetch only the tail (LSN > tailFrom - 1).
  {
    const d = dirs("midhistory");
    const m = new Model();
    const r = rng(2);
    const flags = ["--segment-bytes", "16384", "--snapshot-every", "0"];
    write(bin, d.wal, genBatches(r, m, 600), m);
    publish(bin, d.wal, d.ds, flags);
    copyDir(d.ds, d.stage0);
    const fx0 = stageFixture(d.stage0, m);
    const at = m.lsn;
    write(bin, d.wal, genBatches(r, m, 400), m);
    publish(bin, d.wal, d.ds, flags);
    copyDir(d.ds, d.stage1);
    const fx1 = stageFixture(d.stage1, m, { tailFrom: at + 1 });
    out.midhistory = { stages: [{ dir: d.stage0, fixture: fx0 }, { dir: d.stage1, fixture: fx1 }] };
  }

  // corrupt: stage 1 publishes more, then one byte of the payload of LSN
  // goodLsn + 1 (first record of its segment) is flipped: sync must reject
  // with code "data" and keep serving the state at goodLsn.
  {
    const d = dirs("corrupt");
    const m = new Model();
    const r = rng(3);
    // No head tail copies: the replica must GET the segment that is damaged.
    const flags = ["--segment-bytes", "4096", "--snapshot-every", "0", "--tail-bytes", "0"];
    write(bin, d.wal, genBatches(r, m, 300), m);
    publish(bin, d.wal, d.ds, flags);
    copyDir(d.ds, d.stage0);
    const fx0 = stageFixture(d.stage0, m);
    const good = m.lsn;
    write(bin, d.wal, genBatches(r, m, 300), m);
    publish(bin, d.wal, d.ds, flags);
    copyDir(d.ds, d.stage1);
    const seg = segmentsOf(d.stage1).find((s) => s.first <= good + 1 && good + 1 <= s.last);
    if (!seg || seg.first !== good + 1) throw new Error(`corrupt: no segment starts at LSN ${good + 1}`);
    const file = path.join(d.stage1, seg.key);
    const bytes = fs.readFileSync(file);
    const lsn = Number(bytes.readBigUInt64LE(32));
    const len = bytes.readUInt32LE(40);
    if (lsn !== good + 1 || len < 1) throw new Error(`corrupt: unexpected first record (lsn ${lsn}, len ${len})`);
    const at = 48 + Math.floor(len / 2);
    bytes[at] ^= 0x10;
    fs.writeFileSync(file, bytes);
    const fx1 = stageFixture(d.stage1, fx0Model(fx0), {
      expectError: { code: "data", object: seg.key, lsn: good + 1, flippedByte: at },
      goodLsn: good,
    });
    out.corrupt = { stages: [{ dir: d.stage0, fixture: fx0 }, { dir: d.stage1, fixture: fx1 }] };
  }

  // retention: small snapshot interval and retention, grace 0s. Stage 1 is
  // published far ahead (several commits, so retired objects really are
  // deleted) until the segment holding stage 0's LSN + 1 is gone: the next
  // sync must re-bootstrap from the snapshot by itself.
  {
    const d = dirs("retention");
    const m = new Model();
    const r = rng(4);
    const flags = ["--segment-bytes", "4096", "--snapshot-every", "100", "--retain", "50", "--grace", "0s"];
    write(bin, d.wal, genBatches(r, m, 300), m);
    publish(bin, d.wal, d.ds, flags);
    copyDir(d.ds, d.stage0);
    const fx0 = stageFixture(d.stage0, m);
    const at = m.lsn;
    let gone = false;
    for (let round = 0; round < 12 && !gone; round++) {
      write(bin, d.wal, genBatches(r, m, 150), m);
      publish(bin, d.wal, d.ds, flags);
      const head = readHead(d.ds);
      const holder = segmentsOf(d.ds).find((s) => s.first <= at + 1 && at + 1 <= s.last);
      gone = round >= 2 && head.earliest_lsn > at + 1 && !holder;
    }
    if (!gone) throw new Error(`retention: the segment holding LSN ${at + 1} was never deleted`);
    copyDir(d.ds, d.stage1);
    const fx1 = stageFixture(d.stage1, m, { passedLsn: at });
    if (!fx1.snapshot) throw new Error("retention: no snapshot in the head");
    out.retention = { stages: [{ dir: d.stage0, fixture: fx0 }, { dir: d.stage1, fixture: fx1 }] };
  }

  // newdataset: stage 1 is another dataset (fresh WAL, new dataset id)
  // published at the same URL: the replica must start over.
  {
    const d = dirs("newdataset");
    const m0 = new Model();
    const r = rng(5);
    write(bin, d.wal, genBatches(r, m0, 200, { prefixes: ["old:", "both:"], keySpace: 150 }), m0);
    publish(bin, d.wal, d.ds, ["--segment-bytes", "4096", "--snapshot-every", "0"]);
    copyDir(d.ds, d.stage0);
    const fx0 = stageFixture(d.stage0, m0);
    const wal1 = path.join(work, "newdataset", "wal1");
    const ds1 = path.join(work, "newdataset", "ds1");
    const m1 = new Model();
    write(bin, wal1, genBatches(r, m1, 257, { prefixes: ["new:", "both:"], keySpace: 150 }), m1);
    publish(bin, wal1, ds1, ["--segment-bytes", "3000", "--snapshot-every", "0"]);
    copyDir(ds1, d.stage1);
    const fx1 = stageFixture(d.stage1, m1, { previousDatasetId: fx0.datasetId });
    if (fx1.datasetId === fx0.datasetId) throw new Error("newdataset: same dataset id twice");
    out.newdataset = { stages: [{ dir: d.stage0, fixture: fx0 }, { dir: d.stage1, fixture: fx1 }] };
  }

  out.lazy = buildLazy(bin, dirs("lazy"));
  out.lazydamage = buildLazyDamage(bin, dirs("lazydamage"));
  out.lazydeltas = buildLazyDeltas(bin, dirs("lazydeltas"));
  out.signed = buildSigned(bin, dirs("signed"));

  log(`scenarios built in ${Date.now() - t0} ms`);
  return out;
}

// --- lazy scenarios -------------------------------------------------------------------------
//
// Datasets whose head names a block-indexed snapshot (version 2, as the
// publisher writes by default) followed by a tail that overwrites and deletes
// snapshot keys and adds new ones. Their fixtures carry no full entry list
// (too large to hand to every runtime): `probes` (keys with their expected
// values, or absent), scan specs with their expected row counts, and the
// expected LSN and key count. The conformance cases compare lazy reads with
// a full-mode replica of the same dataset in the same runtime.

/** A 100-byte value for `key` written at `tag` ("s0", "t0", ...). */
function value100(key, tag) {
  const head = `${hex(key).slice(0, 40)}|${tag}|`;
  return head + "v".repeat(Math.max(0, 100 - head.length));
}

function putOp(key, tag) {
  const v = value100(key, tag);
  return isUtf8(key)
    ? { op: "put", key, keyText: new TextDecoder().decode(key), value: enc.encode(v), valueText: v }
    : { op: "put", key, value: enc.encode(v), valueText: v };
}

function delOp(key) {
  return isUtf8(key) ? { op: "delete", key, keyText: new TextDecoder().decode(key) } : { op: "delete", key };
}

/** NDJSON of `batches` (arrays of ops), applied to `model`. */
function ndjsonOf(model, batches) {
  const lines = [];
  for (const ops of batches) {
    model.apply(ops);
    lines.push(JSON.stringify(ops.length === 1 ? jsonOp(ops[0]) : { batch: ops.map(jsonOp) }));
  }
  return lines.join("\n") + "\n";
}

function chunks(ops, n) {
  const out = [];
  for (let i = 0; i < ops.length; i += n) out.push(ops.slice(i, i + n));
  return out;
}

/** The snapshot the head names: { key, lsn, size, version, entries }. */
function headSnapshot(ds) {
  const s = readHead(ds).snapshot;
  return s ? { key: s.key, lsn: s.lsn, size: s.size, version: s.version ?? 1, entries: s.entries } : null;
}

function lazyFixture(ds, model, probeKeys, scanSpecs, extra = {}) {
  const head = readHead(ds);
  const entries = model.entries();
  const probes = probeKeys.map(({ key, kind }) => {
    const e = model.map.get(hex(key));
    return e ? { key: arg(key), kind, value: b64(e.value) } : { key: arg(key), kind, absent: true };
  });
  const scans = scanSpecs.map((sp) => {
    let rows = entries.filter((e) => inRange(e.key, sp));
    if (sp.limit !== undefined) rows = rows.slice(0, sp.limit);
    const c = { name: sp.name, count: rows.length };
    if (rows.length) {
      c.first = b64(rows[0].key);
      c.last = b64(rows[rows.length - 1].key);
    }
    for (const f of ["prefix", "start", "end"]) if (sp[f]) c[f] = arg(sp[f]);
    if (sp.limit !== undefined) c.limit = sp.limit;
    return c;
  });
  return {
    datasetId: head.dataset_id,
    committedLsn: head.committed_lsn,
    earliestLsn: head.earliest_lsn,
    epoch: head.epoch,
    snapshot: head.snapshot ? head.snapshot.key : null,
    snapshotInfo: headSnapshot(ds),
    pages: (head.pages ?? []).length,
    segments: segmentsOf(ds),
    expected: { lsn: model.lsn, count: entries.length },
    probes,
    scans,
    ...extra,
  };
}

// lazy: 20,000 keys of 100-byte values under four prefixes (plus a few
// binary keys), a snapshot at LSN 200 and a tail after it. Stage 1 publishes
// more writes (no new snapshot) with its head stored gzip-compressed; stage 2 publishes a newer snapshot and a
// short tail after it (the lazy base moves).
function buildLazy(bin, d) {
  const m = new Model();
  const r = rng(6);
  const prefixes = ["acct:", "item:", "user:", "zone:"];
  const base = [];
  for (let i = 0; i < 20000; i++) base.push(enc.encode(`${prefixes[i % 4]}${String(i).padStart(6, "0")}`));
  for (let i = 0; i < 48; i++) base.push(Uint8Array.of(0xff, i, 0x00, (i * 37) & 0xff));
  const initial = [];
  for (let i = 0; i < 19900; i++) initial.push(putOp(base[i], "s0"));
  // 200 batches: the snapshot at LSN 200 holds all of them (the last 148 keys come in its final batches).
  const batches = chunks(initial, 100);
  batches.push(base.slice(19900).map((k) => putOp(k, "s0")));
  while (batches.length > 200) batches.splice(batches.length - 2, 2, [...batches[batches.length - 2], ...batches[batches.length - 1]]);
  if (batches.length !== 200) throw new Error(`lazy: ${batches.length} initial batches`);
  write(bin, d.wal, ndjsonOf(m, batches), m);
  publish(bin, d.wal, d.ds, ["--segment-bytes", "1048576", "--snapshot-every", "200"]);
  const snap0 = headSnapshot(d.ds);
  if (!snap0 || snap0.lsn !== 200 || snap0.version !== 2) throw new Error(`lazy: expected a version 2 snapshot at LSN 200, head has ${JSON.stringify(snap0)}`);

  const present = () => [...m.map.values()].map((e) => e.key);
  const touched = { overwritten: new Map(), deleted: new Map(), added: new Map() };
  /** Random tail ops: overwrites, deletes and new keys (between existing ones). */
  const tailOps = (tag, { over, del, add, reput }) => {
    const ops = [];
    const keys = present();
    for (let i = 0; i < over; i++) {
      const k = r.pick(keys);
      ops.push(putOp(k, tag));
      touched.overwritten.set(hex(k), k);
    }
    for (let i = 0; i < del; i++) {
      const k = r.pick(keys);
      ops.push(delOp(k));
      touched.deleted.set(hex(k), k);
    }
    for (let i = 0; i < add; i++) {
      const k = enc.encode(`${r.pick(prefixes)}${String(r.int(20000)).padStart(6, "0")}~${tag}`);
      ops.push(putOp(k, tag));
      touched.added.set(hex(k), k);
    }
    for (const k of [...touched.deleted.values()].slice(0, reput)) ops.push(putOp(k, `${tag}r`));
    // Shuffled, in batches of 1..8 ops.
    for (let i = ops.length - 1; i > 0; i--) {
      const j = r.int(i + 1);
      [ops[i], ops[j]] = [ops[j], ops[i]];
    }
    const out = [];
    for (let i = 0; i < ops.length; ) {
      const n = 1 + r.int(8);
      out.push(ops.slice(i, i + n));
      i += n;
    }
    return out;
  };
  const tailFlags = ["--segment-bytes", "8192", "--snapshot-every", "0"];
  write(bin, d.wal, ndjsonOf(m, tailOps("t0", { over: 400, del: 250, add: 150, reput: 0 })), m);
  publish(bin, d.wal, d.ds, tailFlags);

  const special = [
    enc.encode("acct:000000"), // the first key
    enc.encode("zone:019999"), // the last text key
    base[base.length - 1], // a binary key
    enc.encode("aaaa"), // below every key
    enc.encode("item:000001~never"), // between two keys
    Uint8Array.of(0xff, 0xff, 0xff), // above every key
    enc.encode("item:"), // a prefix, not a key
  ];
  const probeKeys = () => {
    const untouched = [];
    for (let i = 0; untouched.length < 40 && i < 400; i++) {
      const k = base[(i * 523) % base.length];
      const h = hex(k);
      if (!touched.overwritten.has(h) && !touched.deleted.has(h)) untouched.push(k);
    }
    const pick = (map, n) => [...map.values()].slice(0, n);
    return [
      ...untouched.map((key) => ({ key, kind: "snapshot" })),
      ...pick(touched.overwritten, 40).map((key) => ({ key, kind: "overwritten" })),
      ...pick(touched.deleted, 40).map((key) => ({ key, kind: "deleted" })),
      ...pick(touched.added, 30).map((key) => ({ key, kind: "new" })),
      ...special.map((key) => ({ key, kind: "edge" })),
    ];
  };
  const scanSpecs = [
    { name: "everything" },
    { name: "prefix item:", prefix: enc.encode("item:") },
    { name: "prefix item: limit 1", prefix: enc.encode("item:"), limit: 1 },
    { name: "prefix item: limit 10", prefix: enc.encode("item:"), limit: 10 },
    { name: "prefix item: limit 1000", prefix: enc.encode("item:"), limit: 1000 },
    { name: "prefix user:0123", prefix: enc.encode("user:0123") },
    { name: "prefix zone: from zone:019000", prefix: enc.encode("zone:"), start: enc.encode("zone:019000") },
    { name: "acct:005000 to acct:006000", start: enc.encode("acct:005000"), end: enc.encode("acct:006000") },
    { name: "from item:010000 limit 50", start: enc.encode("item:010000"), limit: 50 },
    { name: "from user:010000 limit 3000 (many blocks)", start: enc.encode("user:010000"), limit: 3000 },
    { name: "up to acct:000100", end: enc.encode("acct:000100") },
    { name: "item:000123 to item:000128 (new keys between)", start: enc.encode("item:000123"), end: enc.encode("item:000128") },
    { name: "binary prefix 0xff", prefix: Uint8Array.of(0xff) },
    { name: "binary 0xff 0x10 to 0xff 0x20", start: Uint8Array.of(0xff, 0x10), end: Uint8Array.of(0xff, 0x20) },
    { name: "no match", prefix: enc.encode("nothing:") },
    { name: "start after every key", start: Uint8Array.of(0xff, 0xff, 0xff, 0xff) },
    { name: "limit 0", limit: 0 },
  ];
  copyDir(d.ds, d.stage0);
  const fx0 = lazyFixture(d.stage0, m, probeKeys(), scanSpecs);

  // Stage 1: more writes, the same snapshot; the head stored gzip-compressed
  // (stage 2 goes back to JSON).
  write(bin, d.wal, ndjsonOf(m, tailOps("t1", { over: 120, del: 80, add: 40, reput: 20 })), m);
  publish(bin, d.wal, d.ds, [...tailFlags, "--head-encoding", "gzip"]);
  if (fs.readFileSync(path.join(d.ds, "catalog/head.json"))[0] !== 0x1f) throw new Error("lazy: stage 1's head is not gzip");
  copyDir(d.ds, d.stage1);
  const fx1 = lazyFixture(d.stage1, m, probeKeys(), scanSpecs);
  if (fx1.snapshotInfo.lsn !== 200) throw new Error(`lazy: stage 1 moved the snapshot to ${fx1.snapshotInfo.lsn}`);

  // Stage 2: a newer snapshot, 12 LSNs before the new head.
  const more = tailOps("t2", { over: 300, del: 60, add: 60, reput: 10 });
  const first = m.lsn + 1;
  const snapAt = m.lsn + more.length - 12;
  write(bin, d.wal, ndjsonOf(m, more), m);
  publish(bin, d.wal, d.ds, ["--segment-bytes", "8192", "--snapshot-every", String(snapAt - 200)]);
  const stage2 = path.join(path.dirname(d.stage1), "stage2");
  copyDir(d.ds, stage2);
  const fx2 = lazyFixture(stage2, m, probeKeys(), scanSpecs);
  if (fx2.snapshotInfo.lsn !== snapAt || fx2.snapshotInfo.version !== 2) {
    throw new Error(`lazy: stage 2 snapshot ${JSON.stringify(fx2.snapshotInfo)}, expected version 2 at LSN ${snapAt} (writes ${first}..${m.lsn})`);
  }
  return {
    stages: [
      { dir: d.stage0, fixture: fx0 },
      { dir: d.stage1, fixture: fx1 },
      { dir: stage2, fixture: fx2 },
    ],
  };
}

// lazydeltas: 5,000 keys of 100-byte values and a snapshot at LSN 50, then
// 120 batches that overwrite, delete and add keys, published in one run
// with pointer deltas every 20 LSNs (--pointer-deltas): the head names a
// chain of deltas whose entries point at records in segments, and a few
// segments past it.
function buildLazyDeltas(bin, d) {
  const m = new Model();
  const r = rng(0x5eed0d17);
  const keys = [];
  for (let i = 0; i < 5000; i++) keys.push(enc.encode(`p:${String(i).padStart(6, "0")}`));
  write(bin, d.wal, ndjsonOf(m, chunks(keys.map((k) => putOp(k, "s0")), 100)), m);
  publish(bin, d.wal, d.ds, ["--snapshot-every", "50"]);
  const batches = [];
  for (let b = 0; b < 120; b++) {
    const ops = [];
    for (let j = 1 + r.int(6); j > 0; j--) {
      const k = r.int(10) === 0 ? enc.encode(`q:${String(r.int(400)).padStart(4, "0")}`) : keys[r.int(keys.length)];
      ops.push(r.int(5) === 0 ? delOp(k) : putOp(k, `t${b}`));
    }
    batches.push(ops);
  }
  write(bin, d.wal, ndjsonOf(m, batches), m);
  publish(bin, d.wal, d.ds, ["--snapshot-every", "100000", "--delta-every", "20", "--pointer-deltas", "--segment-bytes", "2048"]);
  const head = readHead(d.ds);
  const pointers = (head.deltas ?? []).filter((x) => x.slots);
  if (pointers.length < 1) throw new Error(`lazydeltas: expected pointer deltas, head has ${JSON.stringify(head.deltas)}`);
  copyDir(d.ds, d.stage0);
  const touched = [...new Set(batches.flat().map((o) => hex(o.key)))].slice(0, 60).map((h) => Uint8Array.from(Buffer.from(h, "hex")));
  const probes = [
    ...keys.filter((_, i) => i % 211 === 0).map((key) => ({ key, kind: "snapshot" })),
    ...touched.map((key) => ({ key, kind: "written" })),
    { key: enc.encode("q:9999"), kind: "edge" },
  ];
  const scanSpecs = [
    { name: "everything" },
    { name: "prefix q:", prefix: enc.encode("q:") },
    { name: "prefix p:001 limit 40", prefix: enc.encode("p:001"), limit: 40 },
    { name: "p:002000 to p:002300", start: enc.encode("p:002000"), end: enc.encode("p:002300") },
  ];
  const fx = lazyFixture(d.stage0, m, probes, scanSpecs, { pointerDeltas: pointers.length });
  return { stages: [{ dir: d.stage0, fixture: fx }] };
}

// lazydamage: 3,000 keys, a snapshot at LSN 30 and a short tail. Stage 1 is
// the same dataset with one byte of `damagedKey`'s value flipped inside the
// snapshot (its data block fails its checksum); stage 2 is stage 0 again
// (repaired).
function buildLazyDamage(bin, d) {
  const m = new Model();
  const keys = [];
  for (let i = 0; i < 3000; i++) keys.push(enc.encode(`d:${String(i).padStart(6, "0")}`));
  write(bin, d.wal, ndjsonOf(m, chunks(keys.map((k) => putOp(k, "s0")), 100)), m);
  publish(bin, d.wal, d.ds, ["--snapshot-every", "30"]);
  const tail = [];
  for (let i = 0; i < 20; i++) tail.push([putOp(keys[i * 97], "t0"), delOp(keys[i * 97 + 3])]);
  write(bin, d.wal, ndjsonOf(m, tail), m);
  publish(bin, d.wal, d.ds, ["--snapshot-every", "0"]);
  copyDir(d.ds, d.stage0);
  const snap = headSnapshot(d.stage0);
  if (!snap || snap.lsn !== 30 || snap.version !== 2) throw new Error(`lazydamage: expected a version 2 snapshot at LSN 30, head has ${JSON.stringify(snap)}`);
  const damagedKey = keys[1500];
  const farKey = keys[10];
  const probeKeys = [damagedKey, farKey, keys[0], keys[97], keys[100], keys[2999], enc.encode("d:999999")].map((key) => ({ key, kind: "probe" }));
  const fx0 = lazyFixture(d.stage0, m, probeKeys, [{ name: "everything" }, { name: "prefix d:0015", prefix: enc.encode("d:0015") }]);

  copyDir(d.stage0, d.stage1);
  const file = path.join(d.stage1, snap.key);
  const bytes = fs.readFileSync(file);
  const needle = Buffer.from(value100(damagedKey, "s0"));
  const at = bytes.indexOf(needle);
  if (at < 0 || bytes.indexOf(needle, at + 1) >= 0) throw new Error("lazydamage: the damaged value is not in the snapshot exactly once");
  const flipped = at + 50;
  if (flipped >= bytes.length - 70000) throw new Error("lazydamage: the damaged value lies in the snapshot's last 64 KiB (read with the footer)");
  bytes[flipped] ^= 0x20;
  fs.writeFileSync(file, bytes);
  const fx1 = { ...fx0, damagedKey: arg(damagedKey), farKey: arg(farKey), flippedByte: flipped };
  const stage2 = path.join(path.dirname(d.stage1), "stage2");
  copyDir(d.stage0, stage2);
  const fx2 = { ...fx0, damagedKey: arg(damagedKey), farKey: arg(farKey) };
  return {
    stages: [
      { dir: d.stage0, fixture: { ...fx0, damagedKey: arg(damagedKey), farKey: arg(farKey) } },
      { dir: d.stage1, fixture: fx1 },
      { dir: stage2, fixture: fx2 },
    ],
  };
}

// --- signed scenario -------------------------------------------------------------------------

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

/** CRC-32 (IEEE), as the head's `crc32` member. */
function crc32(bytes) {
  let c = 0xffffffff;
  for (const b of bytes) c = CRC_TABLE[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** `walcast keygen --out FILE`: the public key it prints. */
function keygen(bin, file) {
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.rmSync(file, { force: true });
  const key = run(bin, ["keygen", "--out", file]).trim();
  if (!/^ed25519:[A-Za-z0-9+/]{43}=$/.test(key)) throw new Error(`walcast keygen printed ${JSON.stringify(key)}`);
  return key;
}

// signed: a dataset published with --signing-key (a snapshot, segments, no
// head tail copies). Stage 1 publishes more, then changes one digit of a
// digest in the signed head and fixes its CRC-32 up (only the signature
// tells); stage 2 is stage 1's real head with one byte flipped in the
// segment that starts at goodLsn + 1 (only the digest tells).
function buildSigned(bin, d) {
  const m = new Model();
  const r = rng(7);
  const signing = path.join(path.dirname(d.ds), "signing.key");
  const trustKey = keygen(bin, signing);
  const wrongKey = keygen(bin, path.join(path.dirname(d.ds), "other.key"));
  const flags = ["--segment-bytes", "4096", "--snapshot-every", "100", "--tail-bytes", "0", "--signing-key", signing];
  write(bin, d.wal, genBatches(r, m, 250), m);
  publish(bin, d.wal, d.ds, flags);
  copyDir(d.ds, d.stage0);
  const head0 = readHead(d.stage0);
  if (!head0.trust || head0.trust.signer !== trustKey) throw new Error(`signed: the head is not signed by ${trustKey}`);
  if (!head0.snapshot) throw new Error("signed: no snapshot in the head");
  const fx0 = stageFixture(d.stage0, m, { trustKey, wrongKey });
  const good = m.lsn;
  write(bin, d.wal, genBatches(r, m, 150), m);
  publish(bin, d.wal, d.ds, flags);
  const real = path.join(path.dirname(d.ds), "stage1-real");
  copyDir(d.ds, real);

  // Stage 1: a CRC-valid head whose signed bytes were changed.
  copyDir(real, d.stage1);
  const headFile = path.join(d.stage1, "catalog/head.json");
  const text = fs.readFileSync(headFile, "latin1");
  const at = text.indexOf('"digests":{');
  const digest = at < 0 ? null : /":"([0-9a-f]{64})"/.exec(text.slice(at));
  if (!digest) throw new Error("signed: no digest in the stage 1 head");
  const pos = at + digest.index + 3 + 63;
  const body = Buffer.from(text.slice(0, pos) + (text[pos] === "0" ? "1" : "0") + text.slice(pos + 1), "latin1");
  const crc = crc32(body.subarray(20)).toString(16).padStart(8, "0");
  body.write(`{"crc32":"${crc}",`, 0, "latin1");
  fs.writeFileSync(headFile, body);
  const fx1 = stageFixture(d.stage1, fx0Model(fx0), {
    trustKey,
    wrongKey,
    goodLsn: good,
    realLsn: m.lsn,
    expectError: { code: "untrusted", object: "catalog/head.json" },
  });

  // Stage 2: the real head, one segment damaged.
  const stage2 = path.join(path.dirname(d.stage1), "stage2");
  copyDir(real, stage2);
  const seg = segmentsOf(stage2).find((x) => x.first === good + 1);
  if (!seg) throw new Error(`signed: no segment starts at LSN ${good + 1}`);
  const file = path.join(stage2, seg.key);
  const bytes = fs.readFileSync(file);
  const flipped = 48 + Math.floor(bytes.readUInt32LE(40) / 2);
  bytes[flipped] ^= 0x10;
  fs.writeFileSync(file, bytes);
  const fx2 = stageFixture(stage2, fx0Model(fx0), {
    trustKey,
    wrongKey,
    goodLsn: good,
    expectError: { code: "untrusted", object: seg.key, flippedByte: flipped },
  });
  return {
    stages: [
      { dir: d.stage0, fixture: fx0 },
      { dir: d.stage1, fixture: fx1 },
      { dir: stage2, fixture: fx2 },
    ],
  };
}

/** A Model-like view of stage 0's fixture (for corrupt: stage 1 keeps stage 0's state). */
function fx0Model(fx0) {
  return {
    lsn: fx0.expected.lsn,
    entries: () => fx0.expected.entries.map(([k, v]) => ({ key: Buffer.from(k, "base64"), value: Buffer.from(v, "base64") })),
  };
}

// --- the orchestrator -------------------------------------------------------------------

function startServe(bin, dir) {
  return new Promise((resolve, reject) => {
    const child = spawn(bin, ["serve", dir, "--addr", "127.0.0.1:0"], { stdio: ["ignore", "pipe", "pipe"] });
    let buf = "";
    let stderr = "";
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`walcast serve did not start in 30 s:\n${stderr}`));
    }, 30_000);
    child.stderr.on("data", (d) => {
      stderr += d;
    });
    child.stdout.on("data", (d) => {
      buf += d;
      const m = /listening on (http:\/\/[^\s]+)/.exec(buf);
      if (m) {
        clearTimeout(timer);
        child.stdout.removeAllListeners("data");
        child.stdout.resume();
        resolve({ child, url: m[1].replace(/\/$/, "") });
      }
    });
    child.on("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`walcast serve exited ${code}:\n${stderr}`));
    });
  });
}

/**
 * Builds every scenario and serves them. Returns
 * { baseUrl, newInstance(), mutate(instance, name), reset(instance, name),
 *   dropInstance(instance), listen() -> controlUrl, close() }.
 */
export async function startDatasets({ root } = {}) {
  const bin = walcastBin();
  const own = !root;
  root ??= fs.mkdtempSync(path.join(os.tmpdir(), "walcast-js-"));
  const work = path.join(root, "work");
  const served = path.join(root, "served");
  fs.rmSync(work, { recursive: true, force: true });
  fs.rmSync(served, { recursive: true, force: true });
  fs.mkdirSync(served, { recursive: true });
  const scenarios = buildScenarios(bin, work);
  const serve = await startServe(bin, served);
  serve.child.removeAllListeners("exit");
  log(`walcast serve ${served} at ${serve.url} (pid ${serve.child.pid})`);

  const instances = new Map(); // id -> { stage: {name: n} }
  let nextId = 1;
  let control = null;
  let controlUrl = null;

  const scenarioFixture = (id, name, stage) => ({
    name,
    url: `${serve.url}/${id}/${name}`,
    stage,
    stages: scenarios[name].stages.length,
    ...scenarios[name].stages[stage].fixture,
  });

  const api = {
    root,
    baseUrl: serve.url,
    get controlUrl() {
      return controlUrl;
    },
    scenarioNames: SCENARIOS,

    /** Fresh copies of every scenario at stage 0, under /<id>/<name>. */
    async newInstance() {
      await api.listen(); // fixtures name the control URL (hostile bodies are served there)
      const id = `i${nextId++}`;
      const stage = {};
      const fx = { instance: id, base: `${serve.url}/${id}`, control: controlUrl, scenarios: {} };
      for (const name of SCENARIOS) {
        replaceDir(scenarios[name].stages[0].dir, path.join(served, id, name));
        stage[name] = 0;
        fx.scenarios[name] = scenarioFixture(id, name, 0);
      }
      instances.set(id, { stage });
      return fx;
    },

    /** Moves scenario `name` of instance `id` to its next stage; returns its fixture. */
    async mutate(id, name) {
      const inst = instances.get(id);
      if (!inst) throw new Error(`no instance ${id}`);
      if (!scenarios[name]) throw new Error(`no scenario ${name}`);
      const next = inst.stage[name] + 1;
      if (next >= scenarios[name].stages.length) throw new Error(`scenario ${name} of ${id} has no stage ${next}`);
      replaceDir(scenarios[name].stages[next].dir, path.join(served, id, name));
      inst.stage[name] = next;
      return scenarioFixture(id, name, next);
    },

    /** Puts scenario `name` of instance `id` back at stage 0. */
    async reset(id, name) {
      const inst = instances.get(id);
      if (!inst) throw new Error(`no instance ${id}`);
      replaceDir(scenarios[name].stages[0].dir, path.join(served, id, name));
      inst.stage[name] = 0;
      return scenarioFixture(id, name, 0);
    },

    async dropInstance(id) {
      instances.delete(id);
      fs.rmSync(path.join(served, id), { recursive: true, force: true });
    },

    /** Starts the HTTP control endpoint (see README); resolves its URL. */
    async listen(port = 0) {
      if (controlUrl) return controlUrl;
      control = http.createServer((req, res) => handleControl(api, req, res));
      await new Promise((resolve) => control.listen(port, "127.0.0.1", resolve));
      controlUrl = `http://127.0.0.1:${control.address().port}`;
      return controlUrl;
    },

    async close({ keep = false } = {}) {
      if (control) await new Promise((resolve) => control.close(resolve));
      control = null;
      if (serve.child.exitCode === null) {
        const exited = new Promise((resolve) => serve.child.once("exit", resolve));
        serve.child.kill("SIGTERM");
        const t = setTimeout(() => serve.child.kill("SIGKILL"), 5000);
        await exited;
        clearTimeout(t);
      }
      if (own && !keep) fs.rmSync(root, { recursive: true, force: true });
    },
  };
  return api;
}

// --- hostile bodies ---------------------------------------------------------------------
// GET <control>/hostile/<mode>/<token>/<key> answers 200 with a body far larger
// than any object a replica may buffer (HOSTILE_TOTAL bytes of "x", in 64 KiB
// chunks, written only as fast as the client reads): `endless` without a
// Content-Length, `claim` with a Content-Length of 1 TiB (the connection is
// cut after HOSTILE_TOTAL). GET <control>/hostile-stats/<token> answers
// { requests, maxSent, totalSent, open }: what the client actually pulled.
const HOSTILE_TOTAL = 64 * 1024 * 1024;
const HOSTILE_CHUNK = Buffer.alloc(64 * 1024, "x");
const hostileStats = new Map(); // token -> { requests, maxSent, totalSent, open }

function serveHostile(mode, token, req, res) {
  const st = hostileStats.get(token) ?? { requests: 0, maxSent: 0, totalSent: 0, open: 0 };
  hostileStats.set(token, st);
  st.requests++;
  st.open++;
  const headers = { "content-type": "application/json", "access-control-allow-origin": "*", "cache-control": "no-store", etag: '"hostile"' };
  if (mode === "claim") headers["content-length"] = String(1024 ** 4);
  res.writeHead(200, headers);
  let sent = 0;
  let done = false;
  const finish = () => {
    if (done) return;
    done = true;
    st.open--;
    clearTimeout(deadline);
  };
  // A client that neither reads nor goes away is cut off after 60 s.
  const deadline = setTimeout(() => res.destroy(), 60_000);
  res.on("close", finish);
  const pump = () => {
    while (!done && sent < HOSTILE_TOTAL) {
      sent += HOSTILE_CHUNK.length;
      st.totalSent += HOSTILE_CHUNK.length;
      st.maxSent = Math.max(st.maxSent, sent);
      if (!res.write(HOSTILE_CHUNK)) return res.once("drain", pump);
    }
    if (done) return;
    if (mode === "claim") res.destroy(); // short of what Content-Length claimed
    else res.end();
  };
  pump();
}

async function handleControl(api, req, res) {
  {
    const parts = new URL(req.url, "http://x").pathname.split("/").filter(Boolean);
    if (req.method === "GET" && parts[0] === "hostile" && parts.length >= 3 && ["endless", "claim"].includes(parts[1])) {
      return serveHostile(parts[1], parts[2], req, res);
    }
    if (req.method === "GET" && parts[0] === "hostile-stats" && parts.length === 2) {
      res.writeHead(200, { "content-type": "application/json", "access-control-allow-origin": "*", "cache-control": "no-store" });
      return res.end(JSON.stringify(hostileStats.get(parts[1]) ?? { requests: 0, maxSent: 0, totalSent: 0, open: 0 }));
    }
  }
  const send = (status, body) => {
    res.writeHead(status, {
      "content-type": "application/json",
      "access-control-allow-origin": "*",
      "access-control-allow-methods": "GET, POST, DELETE, OPTIONS",
      "access-control-allow-headers": "*",
      "cache-control": "no-store",
    });
    res.end(JSON.stringify(body));
  };
  try {
    const url = new URL(req.url, "http://x");
    const parts = url.pathname.split("/").filter(Boolean);
    if (req.method === "OPTIONS") return send(204, {});
    if (req.method === "GET" && parts[0] === "health") return send(200, { ok: true, base: api.baseUrl });
    if (req.method === "POST" && parts.length === 1 && parts[0] === "instances") return send(200, await api.newInstance());
    if (parts[0] === "instances" && parts.length === 2 && req.method === "DELETE") {
      await api.dropInstance(parts[1]);
      return send(200, { ok: true });
    }
    if (req.method === "POST" && parts[0] === "instances" && parts.length === 4 && parts[2] === "mutate") {
      return send(200, await api.mutate(parts[1], parts[3]));
    }
    if (req.method === "POST" && parts[0] === "instances" && parts.length === 4 && parts[2] === "reset") {
      return send(200, await api.reset(parts[1], parts[3]));
    }
    return send(404, { error: `no route ${req.method} ${url.pathname}` });
  } catch (e) {
    return send(400, { error: String(e?.message ?? e) });
  }
}

// --- client helpers (other processes) --------------------------------------------------

/** For runners in other processes: the same API over the control endpoint. */
export function controlClient(controlUrl) {
  const call = async (method, p) => {
    const r = await fetch(controlUrl + p, { method });
    const body = await r.json();
    if (!r.ok) throw new Error(`datasets control ${method} ${p}: ${body.error ?? r.status}`);
    return body;
  };
  return {
    newInstance: () => call("POST", "/instances"),
    mutate: (id, name) => call("POST", `/instances/${id}/mutate/${name}`),
    reset: (id, name) => call("POST", `/instances/${id}/reset/${name}`),
    dropInstance: (id) => call("DELETE", `/instances/${id}`),
  };
}

// --- CLI --------------------------------------------------------------------------------

function flag(args, name, dflt) {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : dflt;
}

async function main(argv) {
  const [cmd, ...args] = argv;
  if (cmd === "serve") {
    const out = flag(args, "--out");
    const rootArg = flag(args, "--root");
    const keep = args.includes("--keep");
    const ds = await startDatasets({ root: rootArg ? path.resolve(rootArg) : undefined });
    const controlUrl = await ds.listen(Number(flag(args, "--port", "0")));
    const fx = await ds.newInstance();
    if (out) fs.writeFileSync(out, JSON.stringify(fx, null, 1));
    let closing = false;
    const shutdown = async () => {
      if (closing) return;
      closing = true;
      await ds.close({ keep });
      process.exit(0);
    };
    process.on("SIGTERM", shutdown);
    process.on("SIGINT", shutdown);
    process.stdout.write(JSON.stringify({ ready: true, control: controlUrl, base: ds.baseUrl, fixtures: out ?? null, instance: fx.instance, pid: process.pid }) + "\n");
    // Bounded: a forgotten orchestrator stops by itself.
    const maxSeconds = Number(process.env.WALCAST_DATASETS_MAX_SECONDS ?? 3600);
    setTimeout(shutdown, maxSeconds * 1000).unref();
    return;
  }
  if (cmd === "mutate" || cmd === "instance" || cmd === "reset") {
    const controlUrl = flag(args, "--control", process.env.WALCAST_DATASETS);
    if (!controlUrl) throw new Error("--control URL (or WALCAST_DATASETS) is required");
    const c = controlClient(controlUrl);
    const id = flag(args, "--instance", "i1");
    const name = args.find((a, i) => !a.startsWith("--") && !(i > 0 && args[i - 1].startsWith("--")));
    const body = cmd === "instance" ? await c.newInstance() : cmd === "mutate" ? await c.mutate(id, name) : await c.reset(id, name);
    process.stdout.write(JSON.stringify(body) + "\n");
    return;
  }
  console.error("usage: datasets.mjs serve [--out FILE] [--root DIR] [--keep] [--port N]\n" +
    "       datasets.mjs instance [--control URL]\n" +
    "       datasets.mjs mutate|reset NAME [--instance ID] [--control URL]");
  process.exit(2);
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main(process.argv.slice(2)).catch((e) => {
    console.error("datasets:", e?.stack ?? e);
    process.exit(1);
  });
}
