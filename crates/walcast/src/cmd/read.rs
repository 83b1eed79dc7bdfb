//! `walcast get` and `walcast scan`: from a local replica directory, or
//! lazily from a dataset URL without one.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{bail, Result};
use base64::Engine;

use super::args::{GetArgs, ScanArgs};

/// Prints a key's value; exit 1 when it is absent.
pub(crate) async fn get(args: GetArgs) -> Result<ExitCode> {
    let GetArgs {
        local,
        from,
        stats,
        headers,
        trust,
        key,
        key_b64,
    } = args;
    let (key, shown) = match (key, key_b64) {
        (Some(k), _) => (k.clone().into_bytes(), k),
        (None, Some(b)) => {
            use base64::Engine;
            let k = base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .map_err(|e| anyhow::anyhow!("--key-b64 {b:?}: not base64 ({e})"))?;
            (k, format!("(base64) {b}"))
        }
        (None, None) => bail!("give the key, or --key-b64"),
    };
    let value = match (local, from) {
        (Some(local), _) => walcast::replica::load(&local)?
            .state
            .get(&key)
            .map(<[u8]>::to_vec),
        (None, Some(url)) => {
            let r = open_lazy(&url, headers, trust, &key).await?;
            let res = r.get(&key).await;
            if stats {
                eprintln!("{}", r.fetch_stats().to_json());
            }
            r.close().await;
            res?
        }
        (None, None) => bail!("give --local DIR or --from URL"),
    };
    match value {
        Some(v) => {
            std::io::stdout().write_all(&v)?;
            Ok(ExitCode::SUCCESS)
        }
        None => {
            eprintln!("walcast: not found: {shown}");
            Ok(ExitCode::from(1))
        }
    }
}

/// Entries a page of `scan --from` holds.
const SCAN_PAGE: usize = 1000;

/// Bytes of keys and values a page of `scan --from` holds: it ends at the
/// entry that reaches them (values may be 64 MiB each).
const SCAN_PAGE_BYTES: usize = 64 << 20;

/// Prints entries as NDJSON, in key order.
pub(crate) async fn scan(args: ScanArgs) -> Result<ExitCode> {
    let ScanArgs {
        local,
        from,
        prefix,
        limit,
        stats,
        headers,
        trust,
    } = args;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut print = |k: &[u8], v: &[u8]| -> Result<()> {
        let mut obj = serde_json::Map::new();
        put_bytes(&mut obj, "key", k);
        put_bytes(&mut obj, "value", v);
        writeln!(out, "{}", serde_json::Value::Object(obj))?;
        Ok(())
    };
    match (local, from) {
        (Some(local), _) => {
            let l = walcast::replica::load(&local)?;
            for (k, v) in l
                .state
                .prefix(prefix.as_bytes())
                .take(limit.unwrap_or(usize::MAX))
            {
                print(&k, v)?;
            }
        }
        (None, Some(url)) => {
            let r = open_lazy(&url, headers, trust, prefix.as_bytes()).await?;
            // Pages of SCAN_PAGE entries or SCAN_PAGE_BYTES, each printed
            // as it comes: the output streams and memory holds one page,
            // however long the scan and large the values. The replica does
            // not follow the dataset, so every page reads the same state.
            let end = walcast_core::state::prefix_end_key(prefix.as_bytes());
            let mut start = prefix.as_bytes().to_vec();
            let mut left = limit.unwrap_or(usize::MAX);
            let res: Result<()> = async {
                while left > 0 {
                    let want = left.min(SCAN_PAGE);
                    let scan = walcast_core::replica::LazyScan::new(&start, end.as_deref(), want)
                        .max_bytes(SCAN_PAGE_BYTES);
                    let page = r.scan_with(scan).await?;
                    let mut bytes = 0;
                    for (k, v) in &page {
                        print(k, v)?;
                        bytes += k.len() + v.len();
                    }
                    left -= page.len();
                    match page.last() {
                        // The next page starts just past the last key.
                        Some((k, _)) if page.len() == want || bytes >= SCAN_PAGE_BYTES => {
                            start.clone_from(k);
                            start.push(0);
                        }
                        _ => break,
                    }
                }
                Ok(())
            }
            .await;
            if stats {
                eprintln!("{}", r.fetch_stats().to_json());
            }
            r.close().await;
            res?;
        }
        (None, None) => bail!("give --local DIR or --from URL"),
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// `get --from` and `scan --from`: a lazy replica that catches up to the
/// head once (fetching no snapshot) and does not follow; reads fetch the
/// blocks they need, those of `key` while it catches up.
async fn open_lazy(
    url: &str,
    headers: Vec<String>,
    trust: Vec<walcast_core::keys::PublicKey>,
    key: &[u8],
) -> Result<walcast::Replica> {
    let opts = walcast::ReplicaOptions {
        lazy_cache_bytes: Some(8 << 20),
        headers,
        trust,
        follow: false,
        // The key's blocks come beside the tail's segments.
        prefetch: vec![key.to_vec()],
        ..walcast::ReplicaOptions::default()
    };
    walcast::Replica::open(url, opts).await
}

/// Puts `b` under `name` as text, or as base64 under `<name>_b64` when it is
/// not UTF-8.
fn put_bytes(obj: &mut serde_json::Map<String, serde_json::Value>, name: &str, b: &[u8]) {
    match std::str::from_utf8(b) {
        Ok(s) => obj.insert(name.to_string(), s.into()),
        Err(_) => obj.insert(
            format!("{name}_b64"),
            base64::engine::general_purpose::STANDARD.encode(b).into(),
        ),
    };
}
