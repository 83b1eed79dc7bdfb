//! `walcast write`: NDJSON batches from stdin committed to a local WAL,
//! lines read together committed with one fsync.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use walcast_core::batch::Op;

fn field_bytes(
    o: &serde_json::Map<String, serde_json::Value>,
    name: &str,
) -> Result<Option<Vec<u8>>> {
    match (o.get(name), o.get(&format!("{name}_b64"))) {
        (Some(_), Some(_)) => bail!("both {name} and {name}_b64"),
        (Some(v), None) => Ok(Some(
            v.as_str()
                .ok_or_else(|| anyhow!("{name} is not a string"))?
                .as_bytes()
                .to_vec(),
        )),
        (None, Some(v)) => {
            let s = v
                .as_str()
                .ok_or_else(|| anyhow!("{name}_b64 is not a string"))?;
            Ok(Some(
                base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map_err(|e| anyhow!("{name}_b64: {e}"))?,
            ))
        }
        (None, None) => Ok(None),
    }
}

fn parse_op(v: &serde_json::Value) -> Result<Op> {
    let o = v
        .as_object()
        .ok_or_else(|| anyhow!("an op must be a JSON object"))?;
    let key = field_bytes(o, "key")?.ok_or_else(|| anyhow!("missing key"))?;
    match o.get("op").and_then(|v| v.as_str()) {
        Some("put") => {
            let value = field_bytes(o, "value")?.ok_or_else(|| anyhow!("put without value"))?;
            Ok(Op::put(key, value))
        }
        Some("delete") => Ok(Op::delete(key)),
        Some(other) => bail!("unknown op {other:?} (put or delete)"),
        None => bail!("missing \"op\""),
    }
}

/// One NDJSON line into one atomic batch.
fn parse_line(line: &str) -> Result<Vec<Op>> {
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| anyhow!("invalid JSON: {e}"))?;
    if let Some(b) = v.get("batch") {
        let arr = b
            .as_array()
            .ok_or_else(|| anyhow!("\"batch\" must be an array"))?;
        if arr.is_empty() {
            bail!("empty batch");
        }
        arr.iter()
            .enumerate()
            .map(|(i, op)| parse_op(op).map_err(|e| anyhow!("op {i}: {e}")))
            .collect()
    } else {
        Ok(vec![parse_op(&v)?])
    }
}

/// The longest line `walcast write` takes: a batch of the largest value
/// the format allows (64 MiB), as base64 in JSON, with room to spare.
const MAX_LINE_BYTES: u64 = 128 << 20;

/// Batch bytes committed together at most (with one fsync): a group of
/// large lines is not held in memory whole.
const MAX_GROUP_BYTES: usize = 64 << 20;

/// Commits stdin's lines to the WAL at `wal`; exit 1 at the first bad line.
pub(crate) fn write(wal: PathBuf) -> Result<ExitCode> {
    use std::io::{BufRead as _, Read as _};
    let w = walcast::wal::Writer::open(&wal)?;
    let mut input = std::io::BufReader::with_capacity(1 << 20, std::io::stdin());
    let mut out = std::io::stdout().lock();
    let mut lineno = 0usize;
    loop {
        // Every line already read is committed with one fsync (group
        // commit); a line on its own (interactive input) is committed at once.
        let mut group: Vec<Vec<u8>> = Vec::new();
        let mut group_bytes = 0;
        let mut bad: Option<(usize, anyhow::Error)> = None;
        let mut eof = false;
        loop {
            // A line is read as bytes, at most MAX_LINE_BYTES of it: one
            // that is not UTF-8 or too long is reported by number like a
            // line of bad JSON, after the lines before it are committed.
            let mut raw = Vec::new();
            let n = (&mut input)
                .take(MAX_LINE_BYTES + 1)
                .read_until(b'\n', &mut raw)
                .context("reading stdin")?;
            if n == 0 {
                eof = true;
                break;
            }
            lineno += 1;
            if raw.len() as u64 > MAX_LINE_BYTES {
                bad = Some((lineno, anyhow!("longer than {MAX_LINE_BYTES} bytes")));
                break;
            }
            let Ok(line) = String::from_utf8(raw) else {
                bad = Some((lineno, anyhow!("not UTF-8")));
                break;
            };
            if !line.trim().is_empty() {
                let max = walcast_core::segment::MAX_RECORD_LEN;
                match parse_line(line.trim_end())
                    .and_then(|ops| walcast_core::batch::encode(&ops).map_err(anyhow::Error::new))
                    .and_then(|p| match p.len() as u64 {
                        n if n > max => Err(anyhow!(
                            "a batch of {n} bytes, above the {max} a record may hold"
                        )),
                        _ => Ok(p),
                    }) {
                    Ok(p) => {
                        group_bytes += p.len();
                        group.push(p);
                    }
                    Err(e) => {
                        bad = Some((lineno, e));
                        break;
                    }
                }
            }
            if input.buffer().is_empty() || group.len() >= 4096 || group_bytes >= MAX_GROUP_BYTES {
                break;
            }
        }
        if !group.is_empty() {
            let refs: Vec<&[u8]> = group.iter().map(Vec::as_slice).collect();
            for lsn in w.commit_many(&refs)? {
                writeln!(out, "{{\"lsn\":{lsn}}}")?;
            }
            out.flush()?;
        }
        if let Some((n, e)) = bad {
            eprintln!("walcast write: line {n}: {e}; nothing of it was committed");
            return Ok(ExitCode::from(1));
        }
        if eof {
            return Ok(ExitCode::SUCCESS);
        }
    }
}
