//! **replay limit**: walcast's decode + verify + apply over a segment already
//! in memory, next to `crc32fast::hash` and a plain copy of the same bytes
//! (the ceiling), and the same replay in wasm (Node) next to native.

use std::hint::black_box;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use walcast_core::batch::{self, Op};
use walcast_core::segment::{self, SegmentBuilder};
use walcast_core::state::KvState;

use crate::kv;

/// What the replay scenario measured (best of several runs each).
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct ReplayResult {
    /// Records in the segment.
    pub(crate) records: u64,
    /// Segment bytes.
    pub(crate) bytes: u64,
    /// memcpy of the bytes into a buffer already allocated.
    pub(crate) copy_s: f64,
    /// `crc32fast::hash` over the bytes.
    pub(crate) crc_s: f64,
    /// SHA-256 of the bytes: what a replica pinned to a signed dataset adds
    /// to check a segment against the digest its signed catalog names.
    pub(crate) digest_s: f64,
    /// Decode + verify (the catalog's file checksum and every record's).
    pub(crate) verify_s: f64,
    /// Decode + verify + KV batch decode + apply to a `KvState`, as a replica does.
    pub(crate) apply_s: f64,
    /// The same without the catalog's file checksum (what the wasm hook does).
    pub(crate) apply_nocat_s: f64,
    /// The wasm hook (`benchReplay`) in Node, when the package is built.
    pub(crate) wasm_s: Option<f64>,
    /// Why there is no wasm figure.
    pub(crate) wasm_missing: Option<String>,
}

/// Best of `runs` timings of `f`. What `f` returns (a replayed state) is
/// dropped after the clock stops: freeing the result is not replay.
fn best<T>(runs: usize, mut f: impl FnMut() -> Result<T>) -> Result<f64> {
    let mut best = Duration::MAX;
    for _ in 0..runs {
        let t = Instant::now();
        let out = black_box(f()?);
        best = best.min(t.elapsed());
        drop(out);
    }
    Ok(best.as_secs_f64())
}

/// A replica's verify step (walcast-core's replica/verify.rs):
/// `segment::decode_with` checks the file and gathers the payload position
/// of each of its `n` records (their LSNs are dense) in its one walk.
fn verify(bytes: &[u8], crc: Option<u32>, n: u64) -> Result<Vec<(usize, usize)>> {
    let mut records = Vec::with_capacity(n as usize);
    let at = bytes.as_ptr() as usize;
    segment::decode_with(bytes, crc, |r| {
        let start = r.payload.as_ptr() as usize - at;
        records.push((start, start + r.payload.len()));
    })
    .map_err(|e| anyhow!("segment: {e}"))?;
    Ok(records)
}

/// Decode, verify and apply one segment of `n` records into a new state, as
/// a replica does (each batch checked, then applied from its bytes).
fn replay(bytes: &[u8], crc: Option<u32>, n: u64) -> Result<KvState> {
    let mut state = KvState::new();
    for ((s, e), lsn) in verify(bytes, crc, n)?.into_iter().zip(1u64..) {
        state.apply(batch::Batch::parse(&bytes[s..e]).map_err(|e| anyhow!("LSN {lsn}: {e}"))?);
    }
    Ok(state)
}

/// Runs the scenario over one segment of `n` single-put batches.
pub(crate) fn run(root: &Path, n: u64, tmp: &Path) -> Result<ReplayResult> {
    let mut b = SegmentBuilder::new(1, 1);
    for i in 0..n {
        let (k, v) = kv(i);
        let payload = batch::encode(&[Op::put(k, v)]).map_err(|e| anyhow!("{e}"))?;
        if !b.push(&payload) {
            bail!("segment builder refused record {i}");
        }
    }
    let (bytes, summary) = b.finish().ok_or_else(|| anyhow!("empty segment"))?;
    // The ceiling: memcpy into a buffer already allocated and touched (a
    // fresh allocation would time the kernel zeroing pages instead).
    let mut dst = vec![0u8; bytes.len()];
    let copy_s = best(5, || {
        dst.copy_from_slice(&bytes);
        Ok(dst[dst.len() / 2])
    })?;
    let crc_s = best(15, || Ok(crc32fast::hash(&bytes)))?;
    let digest_s = best(5, || Ok(walcast_core::keys::sha256_hex(&bytes)))?;
    let verify_s = best(5, || verify(&bytes, Some(summary.crc32), n))?;
    let apply_s = best(5, || {
        let state = replay(&bytes, Some(summary.crc32), n)?;
        if state.len() != n {
            bail!("replayed {} keys, expected {n}", state.len());
        }
        Ok(state)
    })?;
    let apply_nocat_s = best(5, || replay(&bytes, None, n))?;
    let (wasm_s, wasm_missing) = match wasm(root, &bytes, n, tmp) {
        Ok(s) => (Some(s), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    Ok(ReplayResult {
        records: n,
        bytes: bytes.len() as u64,
        copy_s,
        crc_s,
        digest_s,
        verify_s,
        apply_s,
        apply_nocat_s,
        wasm_s,
        wasm_missing,
    })
}

const NODE_SCRIPT: &str = r#"
const [dir, seg, want] = process.argv.slice(1);
const { readFileSync, readdirSync } = await import("node:fs");
const { join } = await import("node:path");
const bytes = readFileSync(join(dir, readdirSync(dir).find((f) => f.endsWith("_bg.wasm"))));
const wasm = await import(join(dir, "walcast_wasm.js"));
await wasm.default({ module_or_path: bytes });
const segment = readFileSync(seg);
let best = Infinity;
for (let i = 0; i < 5; i++) {
  const t = performance.now();
  const n = wasm.benchReplay(segment);
  best = Math.min(best, performance.now() - t);
  if (n !== Number(want)) throw new Error(`wasm replayed ${n} records, expected ${want}`);
}
console.log(JSON.stringify({ ms: best }));
"#;

/// Best of 5 of the wasm replay hook in Node, in seconds. The hook is in
/// the benchmark's module (the shipped one plus the feature `bench-hooks`),
/// which `scripts/build-bench-wasm.sh` builds (or finds up to date) first.
fn wasm(root: &Path, bytes: &[u8], n: u64, tmp: &Path) -> Result<f64> {
    let built = Command::new("bash")
        .arg(root.join("scripts/build-bench-wasm.sh"))
        .current_dir(root)
        .output()
        .context("running scripts/build-bench-wasm.sh")?;
    if !built.status.success() {
        bail!(
            "scripts/build-bench-wasm.sh failed (run `bash scripts/build-js.sh` first): {}",
            String::from_utf8_lossy(&built.stderr)
                .trim()
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    let dir = root.join("target/wasm-bench/pkg");
    let seg = tmp.join("replay.wseg");
    std::fs::write(&seg, bytes)?;
    let out = Command::new("node")
        .args(["--input-type=module", "-e", NODE_SCRIPT])
        .arg(&dir)
        .arg(&seg)
        .arg(n.to_string())
        .output()
        .context("running node")?;
    if !out.status.success() {
        bail!(
            "node: {}",
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .lines()
                .last()
                .unwrap_or("failed")
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("node printed {:?}", String::from_utf8_lossy(&out.stdout)))?;
    v["ms"]
        .as_f64()
        .map(|ms| ms / 1e3)
        .ok_or_else(|| anyhow!("node printed no time"))
}
