//! `walcast inspect`: the head, segments, pages, snapshot, LSN coverage, and
//! with `--verify` every checksum.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;

use anyhow::{anyhow, bail, Result};
use serde_json::json;
use walcast_client::Fetch;
use walcast_core::catalog::{
    head_signature, page_signature, Head, Page, PageRef, SegmentEntry, HEAD_KEY, MAX_HEAD_BYTES,
    MAX_PAGE_BYTES,
};
use walcast_core::io::{GetRequest, GetResponse, RequestId};
use walcast_core::keys::{self, PublicKey};
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
    let c = read_catalog_bytes(f).await?;
    Ok((
        c.head,
        c.segments,
        c.pages.into_iter().map(|(r, _, _)| r).collect(),
    ))
}

/// The catalog as read: the head and its bytes, every segment entry in LSN
/// order, and every page with its bytes and decoded digests.
struct Catalog {
    head_bytes: Vec<u8>,
    head: Head,
    segments: Vec<SegmentEntry>,
    pages: Vec<(PageRef, Vec<u8>, walcast_core::catalog::Digests)>,
}

async fn read_catalog_bytes(f: &AnyFetch) -> Result<Catalog> {
    let head_bytes = get(f, HEAD_KEY, MAX_HEAD_BYTES as u64).await?;
    let head = Head::decode(&head_bytes).map_err(|e| anyhow!("data: {HEAD_KEY}: {e}"))?;
    let mut segments = Vec::new();
    let mut pages = Vec::new();
    // Depth-first, in order.
    let mut stack: Vec<PageRef> = head.pages.iter().rev().cloned().collect();
    while let Some(r) = stack.pop() {
        let body = get(f, &r.key, MAX_PAGE_BYTES as u64).await?;
        let page = Page::decode(&body, &r).map_err(|e| anyhow!("data: {}: {e}", r.key))?;
        segments.extend(page.segments);
        stack.extend(page.pages.into_iter().rev());
        pages.push((r, body, page.digests));
    }
    segments.extend(head.segments.iter().cloned());
    Ok(Catalog {
        head_bytes,
        head,
        segments,
        pages,
    })
}

/// Who signed a head, and the keys a reader may accept from it.
struct Signed {
    signer: PublicKey,
    /// Key rotations as `(by, key)`, each checked.
    chain: Vec<(String, String, bool)>,
    /// The keys whose page signatures count: the pinned keys and those the
    /// chain endorses from them, or (nothing pinned) the head's signer.
    keys: Vec<PublicKey>,
}

/// Checks the head's signature, and with pinned keys that its signer is
/// one of them or endorsed by one through the chain. An unsigned head is
/// `None` without pinned keys and an `untrusted` error with them.
fn check_head(head_bytes: &[u8], head: &Head, trust: &[PublicKey]) -> Result<Option<Signed>> {
    let (Some(t), Some((sig, covered))) = (&head.trust, head_signature(head_bytes)) else {
        if trust.is_empty() {
            return Ok(None);
        }
        bail!("untrusted: {HEAD_KEY}: the head is not signed, and --trust pins keys");
    };
    let signer = PublicKey::parse(&t.signer)
        .map_err(|e| anyhow!("data: {HEAD_KEY}: signer: {}", e.message()))?;
    let chain: Vec<(String, String, bool)> = t
        .chain
        .iter()
        .map(|e| (e.by.clone(), e.key.clone(), e.verify().is_some()))
        .collect();
    if !signer.verify_b64(keys::HEAD_DOMAIN, covered, sig) {
        bail!("untrusted: {HEAD_KEY}: the signature by {signer} does not verify");
    }
    if trust.is_empty() {
        return Ok(Some(Signed {
            signer,
            chain,
            keys: vec![signer],
        }));
    }
    let mut trusted = trust.to_vec();
    loop {
        let before = trusted.len();
        for (by, key) in t.chain.iter().filter_map(|e| e.verify()) {
            if trusted.contains(&by) && !trusted.contains(&key) {
                trusted.push(key);
            }
        }
        if trusted.len() == before {
            break;
        }
    }
    if !trusted.contains(&signer) {
        bail!("untrusted: {HEAD_KEY}: the head is signed by {signer}, which is not trusted");
    }
    Ok(Some(Signed {
        signer,
        chain,
        keys: trusted,
    }))
}

/// Runs `walcast inspect`. A signed dataset's signer and key rotations are
/// shown; with `trust` (pinned keys) the head must be signed by one of them
/// or a key they endorse. With `verify`, every object is downloaded and its
/// checksum checked, and in a signed dataset every page's signature and
/// every object's SHA-256 against the digest the signed catalog records.
pub async fn inspect(
    url: &str,
    headers: &[String],
    verify: bool,
    as_json: bool,
    trust: &[PublicKey],
) -> Result<()> {
    let f = AnyFetch::for_url_with_headers(url, headers)?;
    // A query string may carry a credential: never print it.
    let url = match url.split_once('?') {
        Some((base, _)) => format!("{base}?…"),
        None => url.to_string(),
    };
    let catalog = read_catalog_bytes(&f).await?;
    let signed = check_head(&catalog.head_bytes, &catalog.head, trust)?;
    let Catalog {
        head,
        segments,
        pages: page_bodies,
        ..
    } = catalog;
    // Every digest the signed catalog records, by key.
    let mut digests: BTreeMap<String, String> = head
        .trust
        .as_ref()
        .map(|t| {
            t.digests
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    for (_, _, d) in &page_bodies {
        digests.extend(d.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    let pages: Vec<PageRef> = page_bodies.iter().map(|(r, _, _)| r.clone()).collect();
    // The digest check of one object's bytes (signed datasets only).
    let check_digest = |key: &str, bytes: &[u8], failures: &mut Vec<String>| {
        if signed.is_none() {
            return;
        }
        match digests.get(key) {
            None => failures.push(format!(
                "{key}: no digest in the signed catalog (untrusted)"
            )),
            Some(want) => {
                let got = keys::sha256_hex(bytes);
                if &got != want {
                    failures.push(format!(
                        "{key}: SHA-256 {got} differs from {want}, the signed catalog's (untrusted)"
                    ));
                }
            }
        }
    };
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
        if let Some(sg) = &signed {
            for (r, body, _) in &page_bodies {
                check_digest(&r.key, body, &mut failures);
                let ok = page_signature(body).is_some_and(|(sig, m)| {
                    sg.keys
                        .iter()
                        .any(|k| k.verify_b64(keys::PAGE_DOMAIN, m, sig))
                });
                if !ok {
                    failures.push(format!(
                        "{}: not signed by a trusted key (untrusted)",
                        r.key
                    ));
                }
            }
        }
        for s in &segments {
            if s.size > walcast_core::catalog::MAX_SEGMENT_BYTES {
                // As a replica: never read into memory.
                failures.push(format!(
                    "{}: claims {} bytes, above the limit of {} a replica reads",
                    s.key,
                    s.size,
                    walcast_core::catalog::MAX_SEGMENT_BYTES
                ));
                pb.inc(1);
                continue;
            }
            match get(&f, &s.key, s.size).await {
                Ok(b) => {
                    if let Err(e) = segment::decode(&b, Some(s.crc32)) {
                        failures.push(format!("{}: {e}", s.key));
                    }
                    check_digest(&s.key, &b, &mut failures);
                }
                Err(e) => failures.push(e.to_string()),
            }
            pb.inc(1);
        }
        if let Some(sn) = &head.snapshot {
            let got = get(&f, &sn.key, sn.size).await;
            if let Ok(b) = &got {
                check_digest(&sn.key, b, &mut failures);
            }
            match got {
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
    // The report is written at once; a reader that goes away early
    // (`walcast inspect … | head`) ends the command quietly (see main).
    let mut text = String::new();
    macro_rules! say {
        ($($arg:tt)*) => {{
            let _ = writeln!(text, $($arg)*);
        }};
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
            "signer": signed.as_ref().map(|s| s.signer.to_string()),
            "pinned": !trust.is_empty(),
            "key_chain": signed.as_ref().map(|s| s.chain.iter().map(|(by, key, ok)| json!({"by": by, "key": key, "valid": ok})).collect::<Vec<_>>()),
            "verified": verify,
            "failures": failures,
        });
        say!("{out}");
    } else {
        say!("dataset      {}", head.dataset_id);
        say!("url          {url}");
        say!(
            "epoch        {}   generation {}",
            head.epoch,
            head.generation
        );
        say!(
            "committed    LSN {}   earliest LSN {}",
            head.committed_lsn,
            head.earliest_lsn
        );
        match &head.snapshot {
            Some(s) => say!(
                "snapshot     LSN {}  {} entries  {} bytes  {}",
                s.lsn,
                s.entries,
                s.size,
                s.key
            ),
            None => say!("snapshot     none"),
        }
        say!(
            "segments     {} ({} inline, {} in {} pages), {} bytes",
            segments.len(),
            head.segments.len(),
            segments.len() - head.segments.len(),
            pages.len(),
            bytes
        );
        say!("retired      {} awaiting deletion", head.retired.len());
        match &signed {
            Some(sg) => {
                say!(
                    "signed       by {}{}",
                    sg.signer,
                    if trust.is_empty() {
                        "  (no key pinned: give --trust to check who signed)"
                    } else {
                        "  (trusted)"
                    }
                );
                for (by, key, ok) in &sg.chain {
                    say!(
                        "key chain    {by} endorses {key}{}",
                        if *ok { "" } else { "  (INVALID)" }
                    );
                }
            }
            None => say!("signed       no"),
        }
        match (segments.first(), segments.last()) {
            (Some(a), Some(b)) => say!(
                "coverage     LSN {}..={}{}",
                a.first_lsn,
                b.last_lsn,
                if gaps.is_empty() {
                    "  (no gaps)".to_string()
                } else {
                    format!("  gaps {gaps:?}")
                }
            ),
            _ => say!("coverage     empty"),
        }
        say!();
        say!(
            "{:>20} {:>20} {:>6} {:>10}  key",
            "first LSN",
            "last LSN",
            "epoch",
            "bytes"
        );
        let show: Vec<&SegmentEntry> = if segments.len() > 20 {
            say!("{:>20} (… {} older segments)", "", segments.len() - 20);
            segments[segments.len() - 20..].iter().collect()
        } else {
            segments.iter().collect()
        };
        for s in show {
            say!(
                "{:>20} {:>20} {:>6} {:>10}  {}",
                s.first_lsn,
                s.last_lsn,
                s.epoch,
                s.size,
                s.key
            );
        }
        if verify {
            if failures.is_empty() {
                say!(
                    "\nverify       OK: {} segments{} checked{}",
                    segments.len(),
                    if head.snapshot.is_some() {
                        " and the snapshot"
                    } else {
                        ""
                    },
                    match &signed {
                        // What could not be checked: a CRC-32 is recomputed
                        // by anyone who changes an object.
                        None => "  (CRC-32 only: the dataset is not signed, so a changed and re-checksummed object passes)",
                        Some(_) if trust.is_empty() => "  (CRC-32 and SHA-256 against the head's own signer: give --trust to pin who signed)",
                        Some(_) => "  (CRC-32 and SHA-256 against the signed catalog)",
                    }
                );
            } else {
                say!("\nverify       {} FAILED", failures.len());
            }
        }
    }
    std::io::stdout().lock().write_all(text.as_bytes())?;
    if !failures.is_empty() {
        for f in &failures {
            eprintln!("data: {f}");
        }
        bail!("{} objects failed verification", failures.len());
    }
    Ok(())
}
