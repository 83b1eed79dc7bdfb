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

/// One NDJSON line into one atomic batch's payload, encoded op by op as the
/// JSON is read: a `{"batch":[...]}` of millions of small ops holds one
/// op's JSON tree at a time (a tree costs tens of times its text), so a
/// line costs about twice its length however many ops it has.
fn encode_line(line: &str) -> Result<Vec<u8>> {
    use serde::Deserializer as _;
    let mut de = serde_json::Deserializer::from_str(line);
    // Room for the header (version, op count) before the ops.
    let mut body = vec![0u8; HEADER_ROOM];
    let read = de
        .deserialize_any(LineVisitor { body: &mut body })
        .and_then(|line| de.end().map(|()| line));
    let (count, fields) = match read {
        Ok(line) => line,
        // Broken JSON says so; the rest says what the line lacks.
        Err(e) if e.is_data() => bail!("{e}"),
        Err(e) => bail!("invalid JSON: {e}"),
    };
    let Some(fields) = fields else {
        return Ok(with_header(body, count));
    };
    let op = parse_op(&serde_json::Value::Object(fields))?;
    walcast_core::batch::encode(&[op]).map_err(anyhow::Error::new)
}

/// Bytes kept before the ops for the header: the version and a varint.
const HEADER_ROOM: usize = 11;

/// The payload: the header written just before the ops, the room before it
/// cut off in place.
fn with_header(mut body: Vec<u8>, count: u64) -> Vec<u8> {
    let mut header = vec![walcast_core::batch::VERSION];
    let mut n = count;
    while n >= 0x80 {
        header.push((n as u8) | 0x80);
        n >>= 7;
    }
    header.push(n as u8);
    let at = HEADER_ROOM - header.len();
    body[at..HEADER_ROOM].copy_from_slice(&header);
    body.drain(..at);
    body
}

/// A line's top-level object: `batch`, streamed into the payload, or the
/// fields of one op. Yields the batch's op count, or the op's fields.
struct LineVisitor<'a> {
    body: &'a mut Vec<u8>,
}

impl<'de> serde::de::Visitor<'de> for LineVisitor<'_> {
    type Value = (u64, Option<serde_json::Map<String, serde_json::Value>>);

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an op or a batch (a JSON object)")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
        let mut fields = serde_json::Map::new();
        let mut count = None;
        while let Some(k) = m.next_key::<String>()? {
            if k == "batch" {
                // The last `batch` counts, as in a JSON object read whole.
                self.body.truncate(HEADER_ROOM);
                count = Some(m.next_value_seed(OpsSeed {
                    body: &mut *self.body,
                })?);
            } else {
                fields.insert(k, m.next_value()?);
            }
        }
        Ok(match count {
            Some(n) => (n, None),
            None => (0, Some(fields)),
        })
    }
}

/// A batch's array of ops, each parsed and encoded as it is read.
struct OpsSeed<'a> {
    body: &'a mut Vec<u8>,
}

impl<'de> serde::de::DeserializeSeed<'de> for OpsSeed<'_> {
    type Value = u64;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<u64, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for OpsSeed<'_> {
    type Value = u64;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("\"batch\" to be an array of ops")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<u64, A::Error> {
        use serde::de::Error as _;
        let mut i = 0u64;
        while let Some(v) = seq.next_element::<serde_json::Value>()? {
            let encoded = parse_op(&v)
                .and_then(|op| walcast_core::batch::encode(&[op]).map_err(anyhow::Error::new))
                .map_err(|e| {
                    // (The encoder numbers the one op it was given.)
                    let e = e.to_string();
                    let e = e.strip_prefix("invalid_input: ").unwrap_or(&e);
                    A::Error::custom(format!("op {i}: {}", e.strip_prefix("op 0: ").unwrap_or(e)))
                })?;
            // The one op, without the header of its one-op batch.
            self.body.extend_from_slice(&encoded[2..]);
            i += 1;
        }
        if i == 0 {
            return Err(A::Error::custom("empty batch"));
        }
        Ok(i)
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
                match encode_line(line.trim_end()).and_then(|p| match p.len() as u64 {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The ops of a line, read as a whole JSON tree (what the streaming
    /// encoder must agree with).
    fn tree_ops(line: &str) -> Vec<Op> {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        match v.get("batch") {
            Some(b) => b
                .as_array()
                .unwrap()
                .iter()
                .map(|o| parse_op(o).unwrap())
                .collect(),
            None => vec![parse_op(&v).unwrap()],
        }
    }

    #[test]
    fn a_line_streamed_encodes_as_its_whole_tree() {
        let many: Vec<String> = (0..300)
            .map(|i| format!(r#"{{"op":"put","key":"k{i}","value":"{}"}}"#, "v".repeat(i)))
            .collect();
        for line in [
            r#"{"op":"put","key":"a","value":"b"}"#.to_string(),
            r#"{"value":"é\"\n","key":"k\u00e9","op":"put"}"#.to_string(),
            r#"{"batch":[{"op":"delete","key_b64":"AAE="},{"op":"put","key":"x","value_b64":"/w=="}]}"#
                .to_string(),
            r#"{"x":1,"batch":[{"op":"delete","key":"a"}],"op":"put"}"#.to_string(),
            r#"{"batch":[{"op":"delete","key":"a"}],"batch":[{"op":"delete","key":"b"}]}"#
                .to_string(),
            format!(r#"{{"batch":[{}]}}"#, many.join(",")),
        ] {
            let want = walcast_core::batch::encode(&tree_ops(&line)).unwrap();
            assert_eq!(encode_line(&line).unwrap(), want, "{line}");
        }
    }
}
