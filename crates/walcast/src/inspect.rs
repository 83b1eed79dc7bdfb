//! `walcast inspect`: the head, segments, pages, snapshot, LSN coverage, and
//! with `--verify` every checksum.

use std::fmt::Write as _;
use std::io::Write as _;

use anyhow::{anyhow, bail, Result};
use serde_json::json;
use walcast_client::Fetch;
use walcast_core::catalog::{
    head_json, head_signature, page_signature, Head, Page, PageRef, SegmentEntry, HEAD_KEY,
    MAX_HEAD_BYTES, MAX_PAGE_BYTES,
};
use walcast_core::io::{ByteRange, GetRequest, GetResponse, RequestId};
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
        other => bail!("unavailable: GET {key}: {}", answer_text(&other)),
    }
}

/// What went wrong with an answer that is not the object, as a line.
fn answer_text(r: &GetResponse) -> String {
    match r {
        GetResponse::Failed {
            status: Some(s),
            message,
        } => format!("HTTP {s}: {message}"),
        GetResponse::Failed {
            status: None,
            message,
        } => message.clone(),
        GetResponse::NotModified => "an unexpected 304".into(),
        GetResponse::RangeNotSatisfiable => "an unexpected 416".into(),
        GetResponse::NotFound => "not found".into(),
        GetResponse::Ok { .. } => "an unexpected answer".into(),
    }
}

/// The most bytes one GET of a snapshot asks for: a snapshot is verified
/// in ranges of this size, so the whole file is never held at once.
const SNAPSHOT_CHUNK: u64 = walcast_core::replica::MAX_WHOLE_SNAPSHOT_ANSWER;

/// Reads the snapshot `sn` names by ranges of at most [`SNAPSHOT_CHUNK`]
/// bytes, verifying it as it arrives (every block, its index, the catalog's
/// size and checksum), and feeds `sha` the same bytes. Memory is one range
/// plus the state the snapshot holds; a server that sends more or less than
/// a range asks for, or a file of another size than the catalog's, fails.
async fn verify_snapshot(
    f: &AnyFetch,
    sn: &walcast_core::catalog::SnapshotEntry,
    mut sha: Option<keys::Sha256Stream>,
    chunk: u64,
) -> Result<(snapshot::SnapshotHeader, Option<keys::Sha256Stream>)> {
    let mut d = snapshot::SnapshotDecoder::new();
    // The file's last bytes, for the footer the catalog may pin.
    let mut last: Vec<u8> = Vec::new();
    while d.position() < sn.size {
        let start = d.position();
        let end = sn.size.min(start + chunk.max(1));
        let req = GetRequest {
            id: RequestId(0),
            key: sn.key.clone(),
            range: Some(ByteRange::Bounded { start, end }),
            if_none_match: None,
            wait_ms: None,
            timeout_ms: 120_000,
            max_bytes: end - start,
        };
        let body = match f.get(req).await {
            GetResponse::Ok { body, range, .. } => {
                // A whole object (a server without ranges) is taken only
                // as the first range of a file that fits in one.
                let whole = range.is_none() && start == 0;
                let ok_range = range.is_some_and(|r| r.start == start && r.end == end);
                if !(ok_range || whole) || body.len() as u64 != end - start {
                    bail!(
                        "asked for bytes {start}..{end} of {} the catalog states, got {} bytes{}",
                        sn.size,
                        body.len(),
                        range.map_or(String::new(), |r| format!(" as {}..{}", r.start, r.end))
                    );
                }
                if let Some(total) = range.and_then(|r| r.total).filter(|t| *t != sn.size) {
                    bail!(
                        "the object is {total} bytes, the catalog states {}",
                        sn.size
                    );
                }
                body
            }
            GetResponse::NotFound => bail!("not_found: the snapshot is missing"),
            GetResponse::RangeNotSatisfiable => bail!(
                "the file is shorter than the {} bytes the catalog states",
                sn.size
            ),
            other => bail!(
                "unavailable: GET bytes {start}..{end}: {}",
                answer_text(&other)
            ),
        };
        if let Some(h) = sha.as_mut() {
            h.update(&body);
        }
        d.feed(&body)?;
        last.extend_from_slice(&body[body.len().saturating_sub(256)..]);
        last.drain(..last.len().saturating_sub(256));
    }
    let (h, _) = d.finish(Some(sn.crc32))?;
    if let Some(c) = sn.footer_crc32 {
        let got = snapshot::indexed::footer_crc32(&last);
        if got != c {
            bail!("footer checksum {got:08x} differs from the catalog's {c:08x}");
        }
    }
    Ok((h, sha))
}

/// Verifies a whole delta snapshot (value or pointer) against its catalog entry: size,
/// checksum, every block, and the header's and footer's LSNs, dataset and
/// entry count.
fn verify_delta(d: &walcast_core::catalog::DeltaEntry, head: &Head, bytes: &[u8]) -> Result<()> {
    if bytes.len() as u64 != d.size {
        bail!("{} bytes, the catalog states {}", bytes.len(), d.size);
    }
    let crc = crc32fast::hash(bytes);
    if crc != d.crc32 {
        bail!(
            "checksum {crc:08x} differs from the catalog's {:08x}",
            d.crc32
        );
    }
    let (header, base_lsn) = match d.slots {
        Some(_) => {
            let p = snapshot::pointer::decode_pointer_delta(bytes)?;
            (p.header, p.base_lsn)
        }
        None => {
            let delta = snapshot::delta::decode_delta(bytes)?;
            (delta.header, delta.base_lsn)
        }
    };
    let fields = header.lsn == d.lsn
        && base_lsn == d.base_lsn
        && header.entry_count == d.entries
        && header.dataset_id == head.dataset_id
        && d.footer_crc32
            .is_none_or(|c| c == snapshot::delta::footer_crc32(&bytes[bytes.len() - 64..]));
    if !fields {
        bail!("header or footer disagrees with the catalog");
    }
    Ok(())
}

/// The failure of an object whose SHA-256 is `got` in a signed dataset:
/// none when it is `want`, the digest the signed catalog records for `key`
/// (in the head or page that names it).
fn digest_failure(want: Option<&String>, key: &str, got: String) -> Option<String> {
    match want {
        None => Some(format!(
            "{key}: no digest in the signed catalog (untrusted)"
        )),
        Some(want) if &got != want => Some(format!(
            "{key}: SHA-256 {got} differs from {want}, the signed catalog's (untrusted)"
        )),
        Some(_) => None,
    }
}

/// Reads the head and every page; returns the head, all segment entries in
/// LSN order, and the pages. All of them are held at once: `walcast
/// inspect` walks the pages one at a time instead.
pub async fn read_catalog(f: &AnyFetch) -> Result<(Head, Vec<SegmentEntry>, Vec<PageRef>)> {
    let (_, head, _) = read_head(f).await?;
    let mut walk = PageWalk::new(&head);
    let (mut segments, mut pages) = (Vec::new(), Vec::new());
    while let Some(p) = walk.next(f).await? {
        segments.extend(p.page.segments);
        pages.push(p.r);
    }
    segments.extend(head.segments.iter().cloned());
    Ok((head, segments, pages))
}

/// The head's JSON (decoded when it is stored gzip-compressed) and the
/// head, with the bytes it is stored as and whether they are gzip.
async fn read_head(f: &AnyFetch) -> Result<(Vec<u8>, Head, (usize, bool))> {
    let stored = get(f, HEAD_KEY, MAX_HEAD_BYTES as u64).await?;
    let json = head_json(&stored)
        .map_err(|e| anyhow!("data: {HEAD_KEY}: {e}"))?
        .into_owned();
    let head = Head::decode(&json).map_err(|e| anyhow!("data: {HEAD_KEY}: {e}"))?;
    let gzip = stored.starts_with(&walcast_core::catalog::GZIP_MAGIC);
    Ok((json, head, (stored.len(), gzip)))
}

/// One page of a [`PageWalk`]: its reference, the digest its parent
/// records for it (signed datasets), its bytes and the page, whose child
/// references the walk has taken (`page.pages` is empty).
struct WalkedPage {
    r: PageRef,
    digest: Option<String>,
    body: Vec<u8>,
    page: Page,
}

/// A depth-first walk of the pages under a head, in LSN order: each page
/// is read, handed over and dropped before the next. What the walk holds
/// is the references still to read, each with the digest its parent
/// records for it: at most the fanout of every level on the path to the
/// current page. Memory is bounded by the tree's depth times its fanout,
/// however many pages and segments it has.
struct PageWalk {
    stack: Vec<(PageRef, Option<String>)>,
}

impl PageWalk {
    fn new(head: &Head) -> Self {
        let digest = |key: &str| {
            head.trust
                .as_ref()
                .and_then(|t| t.digests.get(key).cloned())
        };
        PageWalk {
            stack: head
                .pages
                .iter()
                .rev()
                .map(|r| (r.clone(), digest(&r.key)))
                .collect(),
        }
    }

    /// The next page, `None` after the last.
    async fn next(&mut self, f: &AnyFetch) -> Result<Option<WalkedPage>> {
        let Some((r, digest)) = self.stack.pop() else {
            return Ok(None);
        };
        let body = get(f, &r.key, MAX_PAGE_BYTES as u64).await?;
        let mut page = Page::decode(&body, &r).map_err(|e| anyhow!("data: {}: {e}", r.key))?;
        for child in std::mem::take(&mut page.pages).into_iter().rev() {
            let d = page.digests.get(&child.key).cloned();
            self.stack.push((child, d));
        }
        Ok(Some(WalkedPage {
            r,
            digest,
            body,
            page,
        }))
    }
}

/// Segments the text report lists: the newest ones.
const SHOWN_SEGMENTS: usize = 20;

/// Gaps or failures a report lists at most; the rest are counted.
const MAX_LISTED: usize = 1000;

/// A list that keeps its first [`MAX_LISTED`] items and counts the rest, so
/// that what a report holds of gaps or failures does not grow with a
/// catalog however many it has.
struct Capped<T> {
    items: Vec<T>,
    total: usize,
}

impl<T> Default for Capped<T> {
    fn default() -> Self {
        Capped {
            items: Vec::new(),
            total: 0,
        }
    }
}

impl<T> Capped<T> {
    fn push(&mut self, t: T) {
        self.total += 1;
        if self.items.len() < MAX_LISTED {
            self.items.push(t);
        }
    }

    fn extend(&mut self, items: impl IntoIterator<Item = T>) {
        items.into_iter().for_each(|t| self.push(t));
    }

    fn is_empty(&self) -> bool {
        self.total == 0
    }

    fn len(&self) -> usize {
        self.total
    }

    /// Items counted but not kept.
    fn unlisted(&self) -> usize {
        self.total - self.items.len()
    }
}

/// The segments as the report describes them, gathered one at a time in
/// LSN order: how many, their bytes, the gaps between them, the first LSN
/// and the newest [`SHOWN_SEGMENTS`].
#[derive(Default)]
struct Coverage {
    count: usize,
    bytes: u64,
    first_lsn: Option<u64>,
    next: Option<u64>,
    gaps: Capped<(u64, u64)>,
    newest: std::collections::VecDeque<SegmentEntry>,
}

impl Coverage {
    fn add(&mut self, s: &SegmentEntry) {
        if let Some(n) = self.next {
            if s.first_lsn != n {
                self.gaps.push((n, s.first_lsn.saturating_sub(1)));
            }
        }
        self.next = Some(s.last_lsn.saturating_add(1));
        self.first_lsn.get_or_insert(s.first_lsn);
        self.count += 1;
        self.bytes = self.bytes.saturating_add(s.size);
        if self.newest.len() == SHOWN_SEGMENTS {
            self.newest.pop_front();
        }
        self.newest.push_back(s.clone());
    }
}

/// Downloads segment `s` and checks it: its checksum and framing, and in a
/// signed dataset its SHA-256 against `digest`, the one the head or page
/// naming it records. A segment claiming more than a replica reads is not
/// downloaded.
async fn verify_segment(
    f: &AnyFetch,
    s: &SegmentEntry,
    signed: bool,
    digest: Option<&String>,
    failures: &mut Capped<String>,
) {
    if s.size > walcast_core::catalog::MAX_SEGMENT_BYTES {
        // As a replica: never read into memory.
        failures.push(format!(
            "{}: claims {} bytes, above the limit of {} a replica reads",
            s.key,
            s.size,
            walcast_core::catalog::MAX_SEGMENT_BYTES
        ));
        return;
    }
    match get(f, &s.key, s.size).await {
        Ok(b) => {
            if let Err(e) = segment::decode(&b, Some(s.crc32)) {
                failures.push(format!("{}: {e}", s.key));
            }
            if signed {
                failures.extend(digest_failure(digest, &s.key, keys::sha256_hex(&b)));
            }
        }
        Err(e) => failures.push(e.to_string()),
    }
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
    let (head_bytes, head, (stored, gzip)) = read_head(&f).await?;
    let signed = check_head(&head_bytes, &head, trust)?;
    // The digests the head records (signed datasets): of its pages, inline
    // segments, snapshot and deltas. A page's are used as it is walked.
    let head_digests = head.trust.as_ref().map(|t| &t.digests);
    let head_digest = |key: &str| head_digests.and_then(|d| d.get(key));
    let mut failures = Capped::default();
    let pb = if verify && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        // The snapshot, and the segments as the walk finds them.
        indicatif::ProgressBar::new(1)
    } else {
        indicatif::ProgressBar::hidden()
    };
    // The pages are walked one at a time and the segments each names are
    // counted (and with --verify checked) as it is read: nothing is kept of
    // a page once it is handled, so memory does not grow with the catalog.
    let mut coverage = Coverage::default();
    let mut pages = 0usize;
    let mut walk = PageWalk::new(&head);
    while let Some(p) = walk.next(&f).await? {
        pages += 1;
        if let (true, Some(sg)) = (verify, &signed) {
            // The page's SHA-256 (its digest is its parent's) and signature.
            failures.extend(digest_failure(
                p.digest.as_ref(),
                &p.r.key,
                keys::sha256_hex(&p.body),
            ));
            let ok = page_signature(&p.body).is_some_and(|(sig, m)| {
                sg.keys
                    .iter()
                    .any(|k| k.verify_b64(keys::PAGE_DOMAIN, m, sig))
            });
            if !ok {
                failures.push(format!(
                    "{}: not signed by a trusted key (untrusted)",
                    p.r.key
                ));
            }
        }
        pb.inc_length(p.page.segments.len() as u64);
        for s in &p.page.segments {
            coverage.add(s);
            if verify {
                let d = p.page.digests.get(&s.key);
                verify_segment(&f, s, signed.is_some(), d, &mut failures).await;
                pb.inc(1);
            }
        }
    }
    pb.inc_length(head.segments.len() as u64);
    for s in &head.segments {
        coverage.add(s);
        if verify {
            verify_segment(&f, s, signed.is_some(), head_digest(&s.key), &mut failures).await;
            pb.inc(1);
        }
    }
    // The digest check of one object the head names (signed datasets
    // only): its SHA-256 against the one the head records.
    let check_sha = |key: &str, got: String, failures: &mut Capped<String>| {
        if signed.is_some() {
            failures.extend(digest_failure(head_digest(key), key, got));
        }
    };
    let check_digest = |key: &str, bytes: &[u8], failures: &mut Capped<String>| {
        if signed.is_some() {
            check_sha(key, keys::sha256_hex(bytes), failures);
        }
    };
    let Coverage {
        count: segment_count,
        bytes,
        first_lsn,
        gaps,
        newest,
        ..
    } = coverage;
    if verify {
        if let Some(sn) = &head.snapshot {
            let sha = signed.is_some().then(keys::Sha256Stream::new);
            match verify_snapshot(&f, sn, sha, SNAPSHOT_CHUNK).await {
                Ok((h, sha)) => {
                    if h.lsn != sn.lsn || h.dataset_id != head.dataset_id {
                        failures.push(format!("{}: header disagrees with the catalog", sn.key));
                    }
                    if let Some(sha) = sha {
                        check_sha(&sn.key, sha.finish_hex(), &mut failures);
                    }
                }
                Err(e) => failures.push(format!("{}: {e}", sn.key)),
            }
        }
        for d in &head.deltas {
            if d.size > walcast_core::catalog::MAX_SEGMENT_BYTES {
                failures.push(format!(
                    "{}: claims {} bytes, above the limit of {} a replica reads",
                    d.key,
                    d.size,
                    walcast_core::catalog::MAX_SEGMENT_BYTES
                ));
                continue;
            }
            match get(&f, &d.key, d.size).await {
                Ok(b) => {
                    check_digest(&d.key, &b, &mut failures);
                    if let Err(e) = verify_delta(d, &head, &b) {
                        failures.push(format!("{}: {e}", d.key));
                    }
                }
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
            "segments": segment_count,
            "inline_segments": head.segments.len(),
            "segment_bytes": bytes,
            "pages": pages,
            "retired": head.retired.len(),
            "head_bytes": stored,
            "head_encoding": if gzip { "gzip" } else { "json" },
            "head_json_bytes": head_bytes.len(),
            "gaps": gaps.items,
            "gaps_unlisted": gaps.unlisted(),
            "signer": signed.as_ref().map(|s| s.signer.to_string()),
            "pinned": !trust.is_empty(),
            "key_chain": signed.as_ref().map(|s| s.chain.iter().map(|(by, key, ok)| json!({"by": by, "key": key, "valid": ok})).collect::<Vec<_>>()),
            "verified": verify,
            "failures": failures.items,
            "failures_unlisted": failures.unlisted(),
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
        if !gzip {
            say!("head         {stored} bytes of JSON");
        } else {
            say!(
                "head         {stored} bytes, gzip of {} bytes of JSON",
                head_bytes.len()
            );
        }
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
            segment_count,
            head.segments.len(),
            segment_count - head.segments.len(),
            pages,
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
        match (first_lsn, newest.back()) {
            (Some(a), Some(b)) => say!(
                "coverage     LSN {}..={}{}",
                a,
                b.last_lsn,
                match (gaps.is_empty(), gaps.unlisted()) {
                    (true, _) => "  (no gaps)".to_string(),
                    (false, 0) => format!("  gaps {:?}", gaps.items),
                    (false, n) => format!("  gaps {:?} and {n} more", gaps.items),
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
        if segment_count > newest.len() {
            say!(
                "{:>20} (… {} older segments)",
                "",
                segment_count - newest.len()
            );
        }
        for s in &newest {
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
                    segment_count,
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
        for f in &failures.items {
            eprintln!("data: {f}");
        }
        if failures.unlisted() > 0 {
            eprintln!("data: … and {} more", failures.unlisted());
        }
        bail!("{} objects failed verification", failures.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use walcast_core::catalog::{DatasetId, SnapshotEntry};
    use walcast_core::snapshot::indexed::{encode_indexed, IndexedOptions};
    use walcast_core::state::KvState;

    /// A block-indexed snapshot of 3,000 keys in a `file://` dataset, and
    /// the catalog entry naming it.
    fn dataset(dir: &std::path::Path) -> (AnyFetch, SnapshotEntry, std::path::PathBuf) {
        let mut state = KvState::new();
        for i in 0..3_000u32 {
            state.put(format!("key:{i:06}").as_bytes(), &[i as u8; 40]);
        }
        let id = DatasetId([9; 16]);
        let opts = IndexedOptions {
            block_bytes: 1024,
            ..IndexedOptions::default()
        };
        let bytes = encode_indexed(&state, 77, 1, id, opts);
        let key = "snapshots/00000000000000000077-1.wsnap".to_string();
        let path = dir.join(&key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        let entry = SnapshotEntry {
            key,
            lsn: 77,
            epoch: 1,
            size: bytes.len() as u64,
            crc32: crc32fast::hash(&bytes),
            entries: 3_000,
            version: 2,
            suffix: None,
            footer_crc32: Some(snapshot::indexed::footer_crc32(&bytes)),
        };
        let url = format!("file://{}", dir.display());
        (AnyFetch::for_url(&url).unwrap(), entry, path)
    }

    /// Coverage lists the first [`MAX_LISTED`] gaps between the segments it
    /// is given and counts the rest (a validated catalog has none; what a
    /// report holds stays bounded whatever it meets).
    #[test]
    fn coverage_lists_the_first_gaps_and_counts_the_rest() {
        let mut c = Coverage::default();
        for i in 1..=1_200u64 {
            c.add(&SegmentEntry {
                key: walcast_core::catalog::segment_key(1, 2 * i, 2 * i),
                epoch: 1,
                first_lsn: 2 * i,
                last_lsn: 2 * i,
                size: 10,
                crc32: 0,
                records_end: 0,
                index: Vec::new(),
                filter: None,
            });
        }
        // The first segment starts the coverage: no gap before it.
        assert_eq!(c.gaps.len(), 1_199);
        assert_eq!(c.gaps.items.len(), MAX_LISTED);
        assert_eq!(c.gaps.items[0], (3, 3));
        assert_eq!(c.gaps.items[MAX_LISTED - 1], (2001, 2001));
        assert_eq!(c.gaps.unlisted(), 199);
        assert_eq!(c.count, 1_200);
        assert_eq!(c.bytes, 12_000);
        assert_eq!(c.newest.len(), SHOWN_SEGMENTS);
        assert_eq!(c.newest.back().map(|s| s.first_lsn), Some(2_400));
    }

    /// The snapshot is read by ranges no larger than asked: a file of many
    /// ranges verifies, and its SHA-256 is the whole file's.
    #[tokio::test]
    async fn a_snapshot_is_verified_by_ranges() {
        let tmp = tempfile::TempDir::new().unwrap();
        let (f, entry, path) = dataset(tmp.path());
        assert!(entry.size > 20 * 4096, "several ranges: {}", entry.size);
        let sha = Some(keys::Sha256Stream::new());
        let (h, sha) = verify_snapshot(&f, &entry, sha, 4096).await.unwrap();
        assert_eq!((h.lsn, h.entry_count), (77, 3_000));
        let whole = std::fs::read(&path).unwrap();
        assert_eq!(sha.unwrap().finish_hex(), keys::sha256_hex(&whole));
    }

    /// A flipped byte, a file shorter or longer than the catalog states, or
    /// a footer other than the one the catalog pins: each fails.
    #[tokio::test]
    async fn a_damaged_snapshot_fails_its_ranged_verification() {
        let tmp = tempfile::TempDir::new().unwrap();
        let (f, entry, path) = dataset(tmp.path());
        let good = std::fs::read(&path).unwrap();
        let mut flipped = good.clone();
        flipped[good.len() / 2] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        assert!(verify_snapshot(&f, &entry, None, 4096).await.is_err());
        std::fs::write(&path, &good[..good.len() - 1000]).unwrap();
        let e = verify_snapshot(&f, &entry, None, 4096).await.unwrap_err();
        assert!(e.to_string().contains("bytes"), "{e}");
        let mut longer = good.clone();
        longer.extend_from_slice(&[0; 10]);
        std::fs::write(&path, &longer).unwrap();
        let e = verify_snapshot(&f, &entry, None, 4096).await.unwrap_err();
        assert!(e.to_string().contains("the catalog states"), "{e}");
        std::fs::write(&path, &good).unwrap();
        let pinned = SnapshotEntry {
            footer_crc32: Some(entry.footer_crc32.unwrap() ^ 1),
            ..entry.clone()
        };
        let e = verify_snapshot(&f, &pinned, None, 4096).await.unwrap_err();
        assert!(e.to_string().contains("footer"), "{e}");
        verify_snapshot(&f, &entry, None, 4096).await.unwrap();
    }
}
