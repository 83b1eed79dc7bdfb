//! `walcast inspect`: the head, segments, pages, snapshot, LSN coverage, and
//! with `--verify` every checksum.

use anyhow::{anyhow, bail, Result};
use serde_json::json;
use walcast_client::Fetch;
use walcast_core::catalog::{
    Head, Page, PageRef, SegmentEntry, HEAD_KEY, MAX_HEAD_BYTES, MAX_PAGE_BYTES,
};
use walcast_core::io::{GetRequest, GetResponse, RequestId};
use walcast_core::{segment, snapshot};

use crate::replica::AnyFetch;

/// GETs `key` whole, reading at most `max_bytes` (+1) of its body.
async fn get(f: &AnyFetch, key: &str, max_bytes: u64) -> Result<Vec<u8>> {
    let req = GetRequest {
        id: RequestId(0),
        key: key.to_string(),
        range: None,
        if_none_match: None,
        wait_ms: None,
        timeout_ms: 60_000,
        max_bytes,
    };
    match f.get(req).await {
        GetResponse::Ok { body, .. } => Ok(body),
        GetResponse::NotFound => bail!("not_found: {key} is missing"),
        other => bail!("unavailable: GET {key}: {other:?}"),
    }
}

/// Reads the head and every page; returns the head, all segment entries in
/// LSN order, and the pages.
pub async fn read_catalog(f: &AnyFetch) -> Result<(Head, Vec<SegmentEntry>, Vec<PageRef>)> {
    let bytes = get(f, HEAD_KEY, MAX_HEAD_BYTES as u64).await?;
    let head = Head::decode(&bytes).map_err(|e| anyhow!("data: {HEAD_KEY}: {e}"))?;
    let mut segments = Vec::new();
    let mut pages = Vec::new();
    // Depth-first, in order.
    let mut stack: Vec<PageRef> = head.pages.iter().rev().cloned().collect();
    while let Some(r) = stack.pop() {
        let body = get(f, &r.key, MAX_PAGE_BYTES as u64).await?;
        let page = Page::decode(&body, &r).map_err(|e| anyhow!("data: {}: {e}", r.key))?;
        segments.extend(page.segments);
        stack.extend(page.pages.into_iter().rev());
        pages.push(r);
    }
    segments.extend(head.segments.iter().cloned());
    Ok((head, segments, pages))
}

/// Runs `walcast inspect`.
pub async fn inspect(url: &str, headers: &[String], verify: bool, as_json: bool) -> Result<()> {
    let f = AnyFetch::for_url_with_headers(url, headers)?;
    // A query string may carry a credential: never print it.
    let url = match url.split_once('?') {
        Some((base, _)) => format!("{base}?…"),
        None => url.to_string(),
    };
    let (head, segments, pages) = read_catalog(&f).await?;
    let mut gaps = Vec::new();
    let mut next = segments.first().map(|s| s.first_lsn);
    for s in &segments {
        if let Some(n) = next {
            if s.first_lsn != n {
                gaps.push((n, s.first_lsn.saturating_sub(1)));
            }
        }
        next = Some(s.last_lsn + 1);
    }
    let bytes: u64 = segments.iter().map(|s| s.size).sum();
    let mut failures = Vec::new();
    if verify {
        let pb = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            indicatif::ProgressBar::new(segments.len() as u64 + 1)
        } else {
            indicatif::ProgressBar::hidden()
        };
        for s in &segments {
            match get(&f, &s.key, s.size).await {
                Ok(b) => {
                    if let Err(e) = segment::decode(&b, Some(s.crc32)) {
                        failures.push(format!("{}: {e}", s.key));
                    }
                }
                Err(e) => failures.push(e.to_string()),
            }
            pb.inc(1);
        }
        if let Some(sn) = &head.snapshot {
            match get(&f, &sn.key, sn.size).await {
                Ok(b) => match snapshot::decode(&b, Some(sn.crc32)) {
                    Ok((h, _)) if h.lsn == sn.lsn && h.dataset_id == head.dataset_id => {}
                    Ok(_) => {
                        failures.push(format!("{}: header disagrees with the catalog", sn.key))
                    }
                    Err(e) => failures.push(format!("{}: {e}", sn.key)),
                },
                Err(e) => failures.push(e.to_string()),
            }
        }
        pb.finish_and_clear();
    }
    if as_json {
        let out = json!({
            "url": url,
            "format": head.format,
            "dataset_id": head.dataset_id.to_string(),
            "epoch": head.epoch,
            "generation": head.generation,
            "committed_lsn": head.committed_lsn,
            "earliest_lsn": head.earliest_lsn,
            "committed_at_ms": head.committed_at_ms,
            "snapshot": head.snapshot.as_ref().map(|s| json!({"key": s.key, "lsn": s.lsn, "size": s.size, "entries": s.entries})),
            "segments": segments.len(),
            "inline_segments": head.segments.len(),
            "segment_bytes": bytes,
            "pages": pages.len(),
            "retired": head.retired.len(),
            "head_bytes": head.encode().len(),
            "gaps": gaps,
            "verified": verify,
            "failures": failures,
        });
        println!("{out}");
    } else {
        println!("dataset      {}", head.dataset_id);
        println!("url          {url}");
        println!(
            "epoch        {}   generation {}",
            head.epoch, head.generation
        );
        println!(
            "committed    LSN {}   earliest LSN {}",
            head.committed_lsn, head.earliest_lsn
        );
        match &head.snapshot {
            Some(s) => println!(
                "snapshot     LSN {}  {} entries  {} bytes  {}",
                s.lsn, s.entries, s.size, s.key
            ),
            None => println!("snapshot     none"),
        }
        println!(
            "segments     {} ({} inline, {} in {} pages), {} bytes",
            segments.len(),
            head.segments.len(),
            segments.len() - head.segments.len(),
            pages.len(),
            bytes
        );
        println!("retired      {} awaiting deletion", head.retired.len());
        match (segments.first(), segments.last()) {
            (Some(a), Some(b)) => println!(
                "coverage     LSN {}..={}{}",
                a.first_lsn,
                b.last_lsn,
                if gaps.is_empty() {
                    "  (no gaps)".to_string()
                } else {
                    format!("  gaps {gaps:?}")
                }
            ),
            _ => println!("coverage     empty"),
        }
        println!();
        println!(
            "{:>20} {:>20} {:>6} {:>10}  key",
            "first LSN", "last LSN", "epoch", "bytes"
        );
        let show: Vec<&SegmentEntry> = if segments.len() > 20 {
            println!("{:>20} (… {} older segments)", "", segments.len() - 20);
            segments[segments.len() - 20..].iter().collect()
        } else {
            segments.iter().collect()
        };
        for s in show {
            println!(
                "{:>20} {:>20} {:>6} {:>10}  {}",
                s.first_lsn, s.last_lsn, s.epoch, s.size, s.key
            );
        }
        if verify {
            if failures.is_empty() {
                println!(
                    "\nverify       OK: {} segments{} checked",
                    segments.len(),
                    if head.snapshot.is_some() {
                        " and the snapshot"
                    } else {
                        ""
                    }
                );
            } else {
                println!("\nverify       {} FAILED", failures.len());
            }
        }
    }
    if !failures.is_empty() {
        for f in &failures {
            eprintln!("data: {f}");
        }
        bail!("{} objects failed verification", failures.len());
    }
    Ok(())
}
