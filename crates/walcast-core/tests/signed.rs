//! Signed datasets: a publisher machine with a signing key writes into an
//! in-memory store, and replica machines that pin keys read it. Tampered
//! bytes, unsigned or wrongly signed heads, older signed heads and objects
//! whose digest differs are refused with `untrusted`, the replica keeps its
//! last good state; key rotations are followed along the head's chain.

use std::collections::HashMap;

use walcast_core::batch::{self, Op};
use walcast_core::catalog::{head_signature, Head, HEAD_KEY};
use walcast_core::io::{ByteRange, ContentRange, GetRequest, GetResponse};
use walcast_core::keys::{PublicKey, SecretKey};
use walcast_core::publisher::{
    Action as PAction, Event as PEvent, Publisher, PublisherConfig, PutCondition, PutResponse,
};
use walcast_core::replica::{Action, Event, Replica, ReplicaConfig};
use walcast_core::state::KvState;
use walcast_core::ErrorKind;

type Store = HashMap<String, (Vec<u8>, u64)>;

fn key(n: u8) -> SecretKey {
    SecretKey::from_seed([n; 32])
}

fn ops(lsn: u64) -> Vec<Op> {
    vec![Op::put(
        format!("k{:02}", lsn % 37).into_bytes(),
        format!("v{lsn}").into_bytes(),
    )]
}

fn expected(last: u64) -> KvState {
    let mut s = KvState::new();
    for lsn in 1..=last {
        for op in ops(lsn) {
            match op {
                Op::Put { key, value } => s.put(&key, &value),
                Op::Delete { key } => s.delete(&key),
            }
        }
    }
    s
}

/// Small segments and few inline: the segments past a snapshot outnumber
/// four times `inline_segments`, so heads name pages (signed, checked).
fn cfg(signing: Option<SecretKey>, previous: Option<SecretKey>) -> PublisherConfig {
    PublisherConfig {
        segment_bytes: 100,
        inline_segments: 2,
        page_fanout: 2,
        snapshot_every: Some(40),
        retain_lsns: Some(30),
        grace_ms: 1_000_000,
        max_commits_per_sec: 0,
        signing_key: signing,
        previous_key: previous,
        ..PublisherConfig::default()
    }
}

/// Runs a publisher until it committed `last`; returns the clock.
fn publish(store: &mut Store, cfg: PublisherConfig, last: u64, now: u64) -> u64 {
    publish_ops(store, cfg, last, now, &ops)
}

/// Like [`publish`], writing `ops(lsn)` at each LSN.
fn publish_ops(
    store: &mut Store,
    cfg: PublisherConfig,
    last: u64,
    mut now: u64,
    ops: &dyn Fn(u64) -> Vec<Op>,
) -> u64 {
    let mut p = Publisher::new(cfg, now);
    let mut etag = store.values().map(|(_, e)| *e).max().unwrap_or(0);
    let mut committed = 0;
    let mut rounds = 0;
    while committed < last {
        rounds += 1;
        assert!(rounds < 100_000, "publisher did not commit {last}");
        now += 5;
        while let Some(next) = p.next_lsn() {
            if next > last || !p.has_room() {
                break;
            }
            let payload = batch::encode(&ops(next)).expect("encode");
            p.push(next, &payload, now).expect("push");
        }
        let mut puts = Vec::new();
        loop {
            match p.poll(now) {
                PAction::Wait { .. } => break,
                PAction::Get(g) => {
                    let resp = match store.get(&g.key) {
                        Some((b, e)) => GetResponse::Ok {
                            body: b.clone(),
                            etag: Some(e.to_string()),
                            range: None,
                        },
                        None => GetResponse::NotFound,
                    };
                    p.handle_get(g.id, now, resp);
                }
                PAction::Put(put) => puts.push(put),
                PAction::Delete(d) => {
                    store.remove(&d.key);
                    p.handle_delete(d.id, now, Ok(()));
                }
                PAction::Event(PEvent::Committed { lsn, .. }) => committed = lsn,
                PAction::Event(PEvent::Fenced(e)) => panic!("fenced: {e}"),
                PAction::Event(_) => {}
            }
        }
        for put in puts {
            let cur = store.get(&put.key).map(|(_, e)| *e);
            let resp = match (&put.condition, cur) {
                (PutCondition::CreateOnly, Some(_)) => PutResponse::AlreadyExists,
                (PutCondition::IfMatch(e), Some(c)) if *e != c.to_string() => {
                    PutResponse::PreconditionFailed
                }
                (PutCondition::IfMatch(_), None) => PutResponse::PreconditionFailed,
                _ => {
                    etag += 1;
                    store.insert(put.key.clone(), (put.body.clone(), etag));
                    PutResponse::Ok {
                        etag: Some(etag.to_string()),
                    }
                }
            };
            p.handle_put(put.id, now, resp);
        }
    }
    now
}

fn serve(store: &Store, g: &GetRequest) -> GetResponse {
    let Some((body, e)) = store.get(&g.key) else {
        return GetResponse::NotFound;
    };
    let etag = format!("\"{e}-{:08x}\"", crc32fast::hash(body));
    if g.if_none_match.as_deref() == Some(etag.as_str()) {
        return GetResponse::NotModified;
    }
    let len = body.len() as u64;
    let (start, end) = match g.range {
        None => {
            return GetResponse::Ok {
                body: body.clone(),
                etag: Some(etag),
                range: None,
            }
        }
        Some(ByteRange::Bounded { start, end }) => (start, end.min(len)),
        Some(ByteRange::Suffix(n)) => (len.saturating_sub(n), len),
    };
    if start >= end {
        return GetResponse::RangeNotSatisfiable;
    }
    GetResponse::Ok {
        body: body[start as usize..end as usize].to_vec(),
        etag: Some(etag),
        range: Some(ContentRange {
            start,
            end,
            total: Some(len),
        }),
    }
}

struct Reader {
    r: Replica,
    now: u64,
    errors: Vec<walcast_core::Error>,
    /// Host-verified signatures: checks this host made and confirmed.
    confirmed: usize,
    /// Whether this host confirms the checks that hold (false: none).
    confirm: bool,
}

thread_local! {
    /// Whether new readers have their host make the Ed25519 checks (as the
    /// wasm module's JS driver does with WebCrypto).
    static HOST_VERIFIES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the core verifying signatures, then with the host doing it.
fn both_ways(f: impl Fn()) {
    for host in [false, true] {
        HOST_VERIFIES.set(host);
        f();
    }
    HOST_VERIFIES.set(false);
}

/// What a host that verifies signatures does before delivering `resp` to
/// GET `key`: makes the checks the replica lists, hands back those that hold.
fn host_verify(r: &mut Replica, key: &str, resp: &GetResponse) -> usize {
    let GetResponse::Ok { body, .. } = resp else {
        return 0;
    };
    let ok: Vec<[u8; 32]> = r
        .signature_checks(key, body)
        .into_iter()
        .filter(|c| c.verify())
        .map(|c| c.id)
        .collect();
    let n = ok.len();
    r.signatures_verified(ok);
    n
}

impl Reader {
    fn new(trust: &[PublicKey]) -> Self {
        let cfg = ReplicaConfig {
            poll_interval_ms: 50,
            retry_base_ms: 10,
            retry_max_ms: 100,
            trust: trust.to_vec(),
            long_poll_wait_ms: 0,
            host_verifies_signatures: HOST_VERIFIES.get(),
            ..ReplicaConfig::default()
        };
        Reader {
            r: Replica::new(cfg, 7),
            now: 0,
            errors: Vec::new(),
            confirmed: 0,
            confirm: true,
        }
    }

    /// Runs for `ms` of virtual time against `store`.
    fn run(&mut self, store: &Store, ms: u64) {
        let until = self.now + ms;
        while self.now < until {
            let mut steps = 0;
            loop {
                steps += 1;
                let action = self.r.poll(self.now);
                assert!(
                    steps < 100_000,
                    "poll did not settle: {action:?}, {:?}",
                    self.r.status(self.now)
                );
                match action {
                    Action::Fetch(req) => {
                        let resp = serve(store, &req);
                        if HOST_VERIFIES.get() && self.confirm {
                            self.confirmed += host_verify(&mut self.r, &req.key, &resp);
                        }
                        self.r.handle_response(req.id, self.now, resp);
                    }
                    Action::Event(Event::Error(e)) => self.errors.push(e),
                    Action::Event(_) => {}
                    Action::Wait { until: t } => {
                        self.now = t.max(self.now + 1).min(until.max(self.now + 1));
                        break;
                    }
                }
            }
        }
    }

    /// The error the replica reports now.
    fn last(&self) -> walcast_core::Error {
        self.r.status(self.now).last_error.expect("an error")
    }

    fn untrusted(&self) -> Vec<&walcast_core::Error> {
        self.errors
            .iter()
            .filter(|e| e.kind() == ErrorKind::Untrusted)
            .collect()
    }
}

fn head_of(store: &Store) -> Head {
    Head::decode(&store[HEAD_KEY].0).expect("head")
}

/// Re-signs `head` with `k` and stores it as the new head.
fn put_head(store: &mut Store, head: &Head, k: Option<&SecretKey>) {
    let bytes = match k {
        Some(k) => head.encode_signed(k),
        None => head.encode(),
    };
    let e = store.values().map(|(_, e)| *e).max().unwrap_or(0) + 1;
    store.insert(HEAD_KEY.into(), (bytes, e));
}

/// A replica pinning each of `trusts` (none: unpinned) reads `store` to
/// LSN 150 without an error, to the state the publisher wrote.
fn reads_all(store: &Store, trusts: &[Vec<PublicKey>]) {
    for trust in trusts {
        let mut r = Reader::new(trust);
        r.run(store, 5_000);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(r.r.applied_lsn(), 150);
        assert!(same(r.r.state(), &expected(150)));
    }
}

fn same(a: &KvState, b: &KvState) -> bool {
    a.iter().eq(b.iter())
}

#[test]
fn a_signed_dataset_is_read_by_pinned_and_unpinned_replicas() {
    both_ways(|| {
        let mut store = Store::new();
        publish(&mut store, cfg(Some(key(1)), None), 150, 1_000);
        let head = head_of(&store);
        assert!(head_signature(&store[HEAD_KEY].0).is_some());
        let t = head.trust.as_ref().expect("signed head");
        assert_eq!(t.signer, key(1).public().to_string());
        assert!(!head.pages.is_empty(), "the test needs pages");
        assert!(head.snapshot.is_some(), "the test needs a snapshot");
        assert!(head.earliest_lsn > 1, "the test needs a bootstrap");
        for k in head
            .segments
            .iter()
            .map(|s| &s.key)
            .chain(head.pages.iter().map(|p| &p.key))
        {
            assert!(t.digests.contains_key(k), "no digest for {k}");
        }
        reads_all(
            &store,
            &[
                vec![],
                vec![key(1).public()],
                vec![key(9).public(), key(1).public()],
            ],
        );
    });
}

#[test]
fn a_host_verifying_signatures_confirms_heads_chains_and_pages() {
    let mut store = Store::new();
    let now = publish(&mut store, cfg(Some(key(1)), None), 60, 1_000);
    publish(&mut store, cfg(Some(key(2)), Some(key(1))), 150, now);
    let head = head_of(&store);
    assert!(!head.pages.is_empty(), "the test needs pages");
    assert_eq!(head.trust.as_ref().unwrap().chain.len(), 1);
    HOST_VERIFIES.set(true);
    // The checks a head needs: the chain's endorsement, then the signer's.
    let r = Reader::new(&[key(1).public()]);
    let checks = r.r.signature_checks(HEAD_KEY, &store[HEAD_KEY].0);
    assert_eq!(checks.len(), 2);
    assert!(checks.iter().all(|c| c.verify()));
    assert_eq!(
        (checks[0].key, checks[1].key),
        (key(1).public(), key(2).public())
    );
    // A chain that starts at a key nobody trusts gets no checks made: a
    // hostile head cannot have the host verify its own endorsements.
    let mut other = Store::new();
    let t = publish(&mut other, cfg(Some(key(3)), None), 20, 1_000);
    publish(&mut other, cfg(Some(key(4)), Some(key(3))), 40, t);
    assert_eq!(head_of(&other).trust.unwrap().chain.len(), 1);
    assert!(r
        .r
        .signature_checks(HEAD_KEY, &other[HEAD_KEY].0)
        .is_empty());
    // An unpinned replica needs none.
    assert!(Reader::new(&[])
        .r
        .signature_checks(HEAD_KEY, &store[HEAD_KEY].0)
        .is_empty());
    // A host that confirms what holds: the head, the chain and the pages.
    let mut r = Reader::new(&[key(1).public()]);
    r.run(&store, 5_000);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.r.applied_lsn(), 150);
    assert!(same(r.r.state(), &expected(150)));
    // The head's two checks, then at least one page's.
    assert!(r.confirmed >= 3, "{} checks confirmed", r.confirmed);
    // A host that confirms nothing (a runtime without Ed25519): untrusted.
    let mut r = Reader::new(&[key(1).public()]);
    r.confirm = false;
    r.run(&store, 2_000);
    assert_eq!(r.r.applied_lsn(), 0);
    assert_eq!(r.last().kind(), ErrorKind::Untrusted);
    assert!(r.last().message().contains("not trusted"), "{}", r.last());
    // Confirmations of another head's checks do not carry over: the head
    // re-signed after a change needs its own.
    let mut r = Reader::new(&[key(2).public()]);
    let old: Vec<[u8; 32]> =
        r.r.signature_checks(HEAD_KEY, &store[HEAD_KEY].0)
            .into_iter()
            .map(|c| c.id)
            .collect();
    let mut h = head_of(&store);
    h.generation += 1;
    let mut changed = store.clone();
    put_head(&mut changed, &h, Some(&key(2)));
    r.r.signatures_verified(old);
    r.confirm = false;
    r.run(&changed, 2_000);
    assert_eq!(r.r.applied_lsn(), 0);
    assert!(
        r.last().message().contains("does not verify"),
        "{}",
        r.last()
    );
    HOST_VERIFIES.set(false);
}

/// What `publish` panicked with (a publisher fenced), if it did.
fn fenced(store: &mut Store, cfg: PublisherConfig, last: u64, now: u64) -> Option<String> {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        publish(store, cfg, last, now);
    }));
    r.err().map(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .unwrap_or_else(|| "?".into())
    })
}

/// Signed or not stays the dataset's: a publisher without a key refuses a
/// signed dataset unless told to drop the signature, and one with a key
/// refuses history published unsigned (no digests to record), so neither
/// silently leaves pinned replicas refusing everything after it.
#[test]
fn a_publisher_does_not_silently_sign_or_unsign_a_dataset() {
    let mut store = Store::new();
    let now = publish(&mut store, cfg(None, None), 10, 1_000);
    let err = fenced(&mut store, cfg(Some(key(1)), None), 20, now).expect("refused");
    assert!(err.contains("published unsigned"), "{err}");
    assert!(head_of(&store).trust.is_none());

    let mut store = Store::new();
    let now = publish(&mut store, cfg(Some(key(1)), None), 10, 1_000);
    let err = fenced(&mut store, cfg(None, None), 20, now).expect("refused");
    assert!(
        err.contains("is signed") && err.contains("--drop-signature"),
        "{err}"
    );
    assert!(head_of(&store).trust.is_some());
    let dropping = PublisherConfig {
        drop_signature: true,
        ..cfg(None, None)
    };
    publish(&mut store, dropping, 20, now + 10_000);
    assert!(head_of(&store).trust.is_none());
}

/// A signed head changed in the store (a digest, and so the object it
/// names, swapped by whoever can write to the bucket), stored unsigned or
/// signed by another key: a publisher with the signing key does not claim
/// it and sign it again (pinned replicas would then take what it names),
/// and says why.
#[test]
fn a_publisher_does_not_sign_again_a_head_whose_signature_fails() {
    for by in [None, Some(key(9))] {
        let mut store = Store::new();
        let now = publish(&mut store, cfg(Some(key(1)), None), 10, 1_000);
        let mut h = head_of(&store);
        let t = h.trust.as_mut().expect("signed");
        let seg = h.segments[0].key.clone();
        t.digests.insert(seg.clone(), "00".repeat(32));
        put_head(&mut store, &h, by.as_ref());
        let err = fenced(&mut store, cfg(Some(key(1)), None), 20, now).expect("refused");
        assert!(err.contains("does not verify"), "{err}");
        assert_eq!(
            head_of(&store).committed_lsn,
            10,
            "a head was written over it"
        );
        let mut r = Reader::new(&[key(1).public()]);
        r.run(&store, 3_000);
        assert_eq!(r.r.applied_lsn(), 0);
        assert!(!r.untrusted().is_empty());
    }
}

#[test]
fn an_unsigned_dataset_is_read_unpinned_and_refused_pinned() {
    let mut store = Store::new();
    publish(&mut store, cfg(None, None), 60, 1_000);
    assert!(head_of(&store).trust.is_none());
    let mut r = Reader::new(&[]);
    r.run(&store, 3_000);
    assert_eq!(r.r.applied_lsn(), 60);
    let mut p = Reader::new(&[key(1).public()]);
    p.run(&store, 3_000);
    assert_eq!(p.r.applied_lsn(), 0);
    assert!(!p.untrusted().is_empty());
    assert_eq!(
        p.r.status(p.now).last_error.map(|e| e.kind()),
        Some(ErrorKind::Untrusted)
    );
}

#[test]
fn a_head_signed_by_another_key_or_changed_after_signing_is_untrusted() {
    both_ways(|| {
        let mut store = Store::new();
        publish(&mut store, cfg(Some(key(1)), None), 80, 1_000);
        let mut r = Reader::new(&[key(1).public()]);
        r.run(&store, 3_000);
        assert_eq!(r.r.applied_lsn(), 80);
        let good = store.clone();
        // The same head signed by an untrusted key, naming it as signer.
        let mut h = head_of(&store);
        h.generation += 1;
        h.trust.as_mut().unwrap().signer = key(2).public().to_string();
        put_head(&mut store, &h, Some(&key(2)));
        r.run(&store, 1_000);
        assert!(r.last().message().contains("not trusted"), "{}", r.last());
        assert_eq!(r.last().kind(), ErrorKind::Untrusted);
        // Signed by a trusted key's name, but the bytes changed after signing
        // (checksum recomputed): the signature does not verify.
        let mut bytes = good[HEAD_KEY].0.clone();
        let (_, signed) = head_signature(&bytes).unwrap();
        let at = bytes.len() - signed.len();
        let s = String::from_utf8(bytes[at..].to_vec()).unwrap();
        let s = s.replace("\"generation\":", "\"generation\":1");
        bytes.truncate(at);
        bytes.extend_from_slice(s.as_bytes());
        let crc = crc32fast::hash(&bytes[20..]);
        bytes[..20].copy_from_slice(format!("{{\"crc32\":\"{crc:08x}\",").as_bytes());
        store.insert(HEAD_KEY.into(), (bytes, 999));
        r.run(&store, 1_000);
        assert!(
            r.last().message().contains("does not verify"),
            "{}",
            r.last()
        );
        // Unsigned.
        let h = head_of(&good);
        put_head(&mut store, &h, None);
        r.run(&store, 1_000);
        assert!(r.last().message().contains("not signed"), "{}", r.last());
        // Through all of it: the last good state.
        assert_eq!(r.r.applied_lsn(), 80);
        assert!(same(r.r.state(), &expected(80)));
    });
}

#[test]
fn a_tampered_segment_byte_or_a_digest_mismatch_is_untrusted() {
    both_ways(|| {
        let mut store = Store::new();
        publish(&mut store, cfg(Some(key(1)), None), 60, 1_000);
        let mut r = Reader::new(&[key(1).public()]);
        r.run(&store, 3_000);
        assert_eq!(r.r.applied_lsn(), 60);
        let now = publish(&mut store, cfg(Some(key(1)), None), 90, 50_000);
        // Every segment after LSN 60 with one byte flipped (those the head
        // carries in full come with the signed head itself).
        let mut bad = store.clone();
        let head = head_of(&store);
        for (k, (body, _)) in bad.iter_mut() {
            if k.starts_with("segments/") && !k.ends_with("00000000000000000060.wseg") {
                let mid = body.len() / 2;
                body[mid] ^= 1;
            }
        }
        r.run(&bad, 2_000);
        let last = r.last();
        assert_eq!(last.kind(), ErrorKind::Untrusted, "{last}");
        assert!(
            last.object().is_some_and(|o| o.starts_with("segments/")),
            "{last}"
        );
        assert!(r.r.applied_lsn() < 90);
        assert!(same(r.r.state(), &expected(r.r.applied_lsn())));
        // A fresh replica, and a head that records another digest for the
        // intact snapshot (what a CRC collision with the right digest stands for).
        let mut h = head.clone();
        let snap = h.snapshot.as_ref().unwrap().key.clone();
        let old = h
            .trust
            .as_mut()
            .unwrap()
            .digests
            .insert(snap.clone(), "0".repeat(64));
        assert!(old.is_some());
        let mut bad = store.clone();
        put_head(&mut bad, &h, Some(&key(1)));
        let mut fresh = Reader::new(&[key(1).public()]);
        fresh.run(&bad, 2_000);
        let last = fresh.last();
        assert_eq!(last.kind(), ErrorKind::Untrusted, "{last}");
        assert!(last.message().contains("SHA-256"), "{last}");
        assert_eq!(last.object(), Some(snap.as_str()));
        assert_eq!(fresh.r.applied_lsn(), 0);
        // The honest objects again, under a newer head: carried on.
        publish(&mut store, cfg(Some(key(1)), None), 100, now);
        r.run(&store, 3_000);
        assert_eq!(r.r.applied_lsn(), 100);
        assert!(same(r.r.state(), &expected(100)));
    });
}

#[test]
fn a_pinned_replica_never_goes_back_to_an_older_signed_head() {
    both_ways(|| {
        let mut store = Store::new();
        let now = publish(&mut store, cfg(Some(key(1)), None), 50, 1_000);
        let old = store.clone();
        publish(&mut store, cfg(Some(key(1)), None), 90, now);
        let mut r = Reader::new(&[key(1).public()]);
        r.run(&store, 3_000);
        assert_eq!(r.r.applied_lsn(), 90);
        // The older, genuinely signed head served again, for longer than an
        // unpinned replica's rewind: refused every time, the state kept.
        r.run(&old, 200_000);
        assert!(r
            .untrusted()
            .iter()
            .any(|e| e.message().contains("refusing to go back")));
        assert_eq!(r.r.applied_lsn(), 90);
        assert!(same(r.r.state(), &expected(90)));
        // Same LSN, older generation: refused too.
        let mut h = head_of(&store);
        h.generation -= 1;
        let mut older = store.clone();
        put_head(&mut older, &h, Some(&key(1)));
        r.run(&older, 1_000);
        assert!(
            r.last().message().contains("older than generation"),
            "{}",
            r.last()
        );
        assert_eq!(r.r.applied_lsn(), 90);
    });
}

/// One key signing two datasets: the head of the other one, newer, served
/// in place of the one a pinned replica follows, is refused (it used to be
/// taken as the dataset started over, and followed).
#[test]
fn a_pinned_replica_does_not_switch_to_another_dataset_signed_by_its_key() {
    both_ways(|| {
        let mut a = Store::new();
        publish(&mut a, cfg(Some(key(1)), None), 50, 1_000);
        let mut b = Store::new();
        publish_ops(&mut b, cfg(Some(key(1)), None), 60, 5_000_000, &|lsn| {
            vec![Op::put(b"other".to_vec(), format!("b{lsn}").into_bytes())]
        });
        assert_ne!(head_of(&a).dataset_id, head_of(&b).dataset_id);
        assert!(head_of(&b).committed_at_ms > head_of(&a).committed_at_ms);
        let mut r = Reader::new(&[key(1).public()]);
        r.run(&a, 3_000);
        assert_eq!(r.r.applied_lsn(), 50);
        r.run(&b, 10_000);
        assert!(
            r.untrusted()
                .iter()
                .any(|e| e.message().contains("does not switch datasets")),
            "{:?}",
            r.untrusted()
        );
        assert_eq!(r.r.applied_lsn(), 50);
        assert!(same(r.r.state(), &expected(50)));
        // A fresh pinned replica reads either.
        let mut fresh = Reader::new(&[key(1).public()]);
        fresh.run(&b, 3_000);
        assert_eq!(fresh.r.applied_lsn(), 60);
    });
}

#[test]
fn replicas_follow_a_chain_of_key_rotations() {
    both_ways(|| {
        let mut store = Store::new();
        let now = publish(&mut store, cfg(Some(key(1)), None), 40, 1_000);
        let mut a = Reader::new(&[key(1).public()]);
        a.run(&store, 3_000);
        assert_eq!(a.r.applied_lsn(), 40);
        // Rotate 1 -> 2: a replica pinned to 1 follows.
        let now = publish(&mut store, cfg(Some(key(2)), Some(key(1))), 70, now);
        a.run(&store, 3_000);
        assert!(a.untrusted().is_empty(), "{:?}", a.errors);
        assert_eq!(a.r.applied_lsn(), 70);
        // Rotate 2 -> 3 while another replica pinned to 1 was away: the chain
        // 1 -> 2 -> 3 in the head takes it there.
        publish(&mut store, cfg(Some(key(3)), Some(key(2))), 100, now);
        let chain = &head_of(&store).trust.unwrap().chain;
        assert_eq!(chain.len(), 2);
        for trust in [key(1).public(), key(2).public(), key(3).public()] {
            let mut r = Reader::new(&[trust]);
            r.run(&store, 5_000);
            assert!(r.untrusted().is_empty(), "{trust}: {:?}", r.errors);
            assert_eq!(r.r.applied_lsn(), 100);
            assert!(same(r.r.state(), &expected(100)));
        }
        a.run(&store, 3_000);
        assert_eq!(a.r.applied_lsn(), 100);
        // A key nobody endorsed is not followed.
        let mut r = Reader::new(&[key(4).public()]);
        r.run(&store, 2_000);
        assert_eq!(r.r.applied_lsn(), 0);
        assert!(!r.untrusted().is_empty());
    });
}

/// The first `CaughtUp` or `Error` event after a sync starts, running
/// `reader` against `store` for at most `ms` of virtual time.
fn sync_outcome(reader: &mut Reader, store: &Store, ms: u64) -> Option<Event> {
    reader.r.sync_now(reader.now);
    let until = reader.now + ms;
    let mut steps = 0;
    while reader.now < until {
        steps += 1;
        assert!(steps < 100_000, "poll did not settle");
        match reader.r.poll(reader.now) {
            Action::Fetch(req) => {
                let resp = serve(store, &req);
                reader.r.handle_response(req.id, reader.now, resp);
            }
            Action::Event(e @ (Event::CaughtUp { .. } | Event::Error(_))) => return Some(e),
            Action::Event(_) => {}
            Action::Wait { until: t } => reader.now = t.max(reader.now + 1),
        }
    }
    None
}

#[test]
fn a_sync_over_an_untrusted_head_ends_with_the_error_not_caught_up() {
    let mut store = Store::new();
    publish(&mut store, cfg(Some(key(1)), None), 80, 1_000);
    let mut r = Reader::new(&[key(1).public()]);
    assert_eq!(r.r.status(r.now).signer, None);
    r.run(&store, 3_000);
    assert_eq!(r.r.applied_lsn(), 80);
    let signer = Some(key(1).public().to_string());
    assert_eq!(r.r.status(r.now).signer, signer, "status names the signer");
    // A newer head signed by an untrusted key: a sync must not end as
    // "caught up" at the old LSN; it ends with the untrusted error.
    let mut bad = store.clone();
    let mut h = head_of(&store);
    h.generation += 1;
    h.trust.as_mut().unwrap().signer = key(2).public().to_string();
    put_head(&mut bad, &h, Some(&key(2)));
    match sync_outcome(&mut r, &bad, 60_000) {
        Some(Event::Error(e)) => {
            assert_eq!(e.kind(), ErrorKind::Untrusted, "{e}");
            assert_eq!(e.object(), Some(HEAD_KEY), "{e}");
        }
        other => panic!("a sync over an untrusted head ended with {other:?}"),
    }
    assert_eq!(r.r.applied_lsn(), 80);
    // The honest head again: the next sync is caught up.
    match sync_outcome(&mut r, &store, 60_000) {
        Some(Event::CaughtUp { lsn }) => assert_eq!(lsn, 80),
        other => panic!("a sync over the honest head ended with {other:?}"),
    }
    assert_eq!(r.r.status(r.now).signer, signer);
    // An unpinned replica names no signer.
    let mut loose = Reader::new(&[]);
    loose.run(&store, 3_000);
    assert_eq!(loose.r.applied_lsn(), 80);
    assert_eq!(loose.r.status(loose.now).signer, None);
}

#[test]
fn a_verified_snapshot_is_bound_by_its_index_digest_in_the_signed_head() {
    use walcast_core::publisher::SnapshotFormat;
    use walcast_core::snapshot::indexed::{index_digest, IndexedOptions};
    let mut store = Store::new();
    let c = PublisherConfig {
        snapshot_format: SnapshotFormat::Verified(IndexedOptions {
            block_bytes: 256,
            index_block_bytes: 128,
        }),
        ..cfg(Some(key(1)), None)
    };
    publish(&mut store, c, 150, 1_000);
    let head = head_of(&store);
    let snap = head.snapshot.as_ref().expect("the test needs a snapshot");
    assert_eq!(snap.version, 4);
    let bytes = &store[&snap.key].0;
    let want: String = index_digest(bytes)
        .expect("a version 4 snapshot")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(head.index_digest(&snap.key), Some(want.as_str()));
    let t = head.trust.as_ref().expect("signed head");
    assert_eq!(t.index_digests.len(), 1, "only the head's snapshot");
    // Pinned and unpinned replicas read the dataset.
    reads_all(&store, &[vec![], vec![key(1).public()]]);
    // An index digest for an object the head does not name is refused.
    let mut bad = head.clone();
    if let Some(t) = bad.trust.as_mut() {
        t.index_digests.insert("segments/none".into(), want);
    }
    let signed = bad.encode_signed(&key(1));
    assert!(Head::decode(&signed).is_err());
}

/// Drains `poll` at `now`, answering every fetch from `store`; adds the
/// GETs and body bytes of `key` to `count`.
fn drain_counting(r: &mut Replica, store: &Store, now: u64, key: &str, count: &mut (u64, u64)) {
    drain_answering(r, now, &mut |req| {
        let resp = serve(store, req);
        if req.key == key {
            count.0 += 1;
            if let GetResponse::Ok { body, .. } = &resp {
                count.1 += body.len() as u64;
            }
        }
        resp
    });
}

#[test]
fn a_pinned_lazy_replica_reads_a_verified_snapshot_by_blocks() {
    use walcast_core::publisher::SnapshotFormat;
    use walcast_core::replica::Read;
    use walcast_core::snapshot::indexed::IndexedOptions;
    let mut store = Store::new();
    let c = PublisherConfig {
        snapshot_format: SnapshotFormat::Verified(IndexedOptions {
            block_bytes: 128,
            index_block_bytes: 256,
        }),
        delta_every: None,
        ..cfg(Some(key(1)), None)
    };
    // Every LSN writes a new key: the snapshot alone holds the older ones.
    let unique = |lsn: u64| {
        vec![Op::put(
            format!("u{lsn:05}").into_bytes(),
            vec![lsn as u8; 300],
        )]
    };
    let last = 400;
    publish_ops(&mut store, c, last, 1_000, &unique);
    let head = head_of(&store);
    let snap = head.snapshot.clone().expect("the test needs a snapshot");
    assert!(head.deltas.is_empty());
    let size = store[&snap.key].0.len() as u64;
    // The keys only the snapshot holds.
    let want: Vec<(Vec<u8>, Vec<u8>)> = (1..=snap.lsn)
        .flat_map(unique)
        .map(|op| match op {
            Op::Put { key, value } => (key, value),
            Op::Delete { .. } => unreachable!("only puts"),
        })
        .collect();
    assert!(want.len() > 100, "the test needs a large snapshot");
    let rcfg = ReplicaConfig {
        poll_interval_ms: 50,
        retry_base_ms: 10,
        trust: vec![key(1).public()],
        long_poll_wait_ms: 0,
        lazy_cache_bytes: Some(1 << 20),
        ..ReplicaConfig::default()
    };
    let mut r = Replica::new(rcfg.clone(), 7);
    let mut count = (0, 0);
    let mut now = 0;
    while r.applied_lsn() < last && now < 5_000 {
        drain_counting(&mut r, &store, now, &snap.key, &mut count);
        now += 50;
    }
    assert_eq!(r.applied_lsn(), last);
    assert_eq!(count, (0, 0), "a sync does not read the snapshot");
    // One point read of a key only the snapshot holds: a few blocks.
    let (k, v) = want[want.len() / 2].clone();
    let got = loop {
        match r.get_lazy(&k).expect("read") {
            Read::Ready(v) => break v,
            Read::Pending => drain_counting(&mut r, &store, now, &snap.key, &mut count),
        }
    };
    assert_eq!(got.as_deref(), Some(v.as_slice()));
    eprintln!(
        "pinned lazy point read: {} GETs, {} bytes of a {size}-byte snapshot",
        count.0, count.1
    );
    assert!(count.0 <= 3, "{} GETs", count.0);
    assert!(count.1 < size * 3 / 4, "{} bytes of {size}", count.1);
    // Every key reads right.
    for (k, v) in want.iter() {
        let got = loop {
            match r.get_lazy(k).expect("read") {
                Read::Ready(v) => break v,
                Read::Pending => drain_counting(&mut r, &store, now, &snap.key, &mut count),
            }
        };
        assert_eq!(got.as_deref(), Some(v.as_slice()), "{k:?}");
    }

    // A byte changed anywhere in the snapshot: a cold pinned replica's
    // reads of it fail naming the snapshot, as `untrusted` or `data`;
    // nothing wrong is answered and the applied LSN stays.
    for at in [size / 3, size - 100, size - 10] {
        let mut bad = store.clone();
        if let Some((b, _)) = bad.get_mut(&snap.key) {
            b[at as usize] ^= 0x40;
        }
        let mut r = Replica::new(rcfg.clone(), 7);
        let mut now = 0;
        while r.applied_lsn() < last && now < 5_000 {
            drain_counting(&mut r, &bad, now, "", &mut (0, 0));
            now += 50;
        }
        let mut saw = false;
        for (k, v) in want.iter() {
            loop {
                match r.get_lazy(k) {
                    Ok(Read::Pending) => drain_counting(&mut r, &bad, now, "", &mut (0, 0)),
                    Ok(Read::Ready(got)) => {
                        assert_eq!(
                            got.as_deref(),
                            Some(v.as_slice()),
                            "{k:?} with byte {at} changed"
                        );
                        break;
                    }
                    Err(e) => {
                        assert!(
                            matches!(e.kind(), ErrorKind::Untrusted | ErrorKind::Data),
                            "{e}"
                        );
                        assert_eq!(e.object(), Some(snap.key.as_str()), "{e}");
                        saw = true;
                        break;
                    }
                }
            }
        }
        assert!(saw, "the changed byte {at} was never read");
        assert_eq!(r.applied_lsn(), last);
    }
}

/// A pinned lazy replica on a verified snapshot moves to the next one even
/// when the head names deltas over it (which it does not read): it must not
/// stay on its old snapshot, which the publisher retires and deletes.
#[test]
fn a_pinned_lazy_replica_leaves_a_retired_snapshot_for_one_with_deltas() {
    use walcast_core::publisher::SnapshotFormat;
    use walcast_core::replica::Read;
    use walcast_core::snapshot::indexed::IndexedOptions;
    let mut store = Store::new();
    let c = PublisherConfig {
        snapshot_format: SnapshotFormat::Verified(IndexedOptions {
            block_bytes: 128,
            index_block_bytes: 256,
        }),
        delta_every: None,
        // No gap: the replica follows the segments (and keeps its snapshot).
        retain_lsns: None,
        ..cfg(Some(key(1)), None)
    };
    let unique = |lsn: u64| {
        vec![Op::put(
            format!("u{lsn:05}").into_bytes(),
            vec![lsn as u8; 300],
        )]
    };
    let now = publish_ops(&mut store, c.clone(), 400, 1_000, &unique);
    let old = head_of(&store).snapshot.expect("a snapshot");
    assert!(head_of(&store).deltas.is_empty());
    let rcfg = ReplicaConfig {
        poll_interval_ms: 50,
        retry_base_ms: 10,
        trust: vec![key(1).public()],
        long_poll_wait_ms: 0,
        lazy_cache_bytes: Some(1 << 20),
        ..ReplicaConfig::default()
    };
    let mut r = Replica::new(rcfg, 7);
    let sync = |r: &mut Replica, store: &Store, last: u64| {
        let mut t = 0;
        while r.applied_lsn() < last && t < 20_000 {
            drain_counting(r, store, t, "", &mut (0, 0));
            t += 50;
        }
        assert_eq!(r.applied_lsn(), last);
    };
    sync(&mut r, &store, 400);
    // The publisher goes on with deltas: a newer snapshot, deltas over it.
    let c = PublisherConfig {
        delta_every: Some(10),
        ..c
    };
    publish_ops(&mut store, c, 455, now, &unique);
    let head = head_of(&store);
    assert!(head.snapshot.as_ref().expect("a snapshot").lsn > old.lsn);
    assert!(!head.deltas.is_empty(), "the test needs deltas");
    sync(&mut r, &store, 455);
    // The old snapshot's grace period ends.
    store.remove(&old.key);
    for lsn in (1..=455).step_by(7) {
        let k = format!("u{lsn:05}").into_bytes();
        let mut tries = 0;
        let got = loop {
            tries += 1;
            assert!(tries < 100, "the read of {lsn} never settles");
            match r.get_lazy(&k) {
                Ok(Read::Ready(v)) => break v,
                Ok(Read::Pending) => drain_counting(&mut r, &store, 0, "", &mut (0, 0)),
                Err(e) => panic!("the read of {lsn}: {e}"),
            }
        };
        assert_eq!(got, Some(vec![lsn as u8; 300]), "{lsn}");
    }
}

// ---------------------------------------------------------------------
// A hostile store that does not hold the trusted private key.
// ---------------------------------------------------------------------

/// Forces the CRC-32 of `msg` to `want` by choosing the 4 bytes at `at`
/// (CRC-32 is affine over GF(2): solve for the 32 bits).
fn force_crc32(msg: &mut [u8], at: usize, want: u32) {
    msg[at..at + 4].copy_from_slice(&[0; 4]);
    let base = crc32fast::hash(msg);
    // Basis rows: (effect on the CRC, which bits of the 4 bytes give it).
    let mut rows: Vec<(u32, u32)> = Vec::new();
    for bit in 0..32u32 {
        let mut m = msg.to_vec();
        m[at + (bit / 8) as usize] ^= 1 << (bit % 8);
        let mut v = (crc32fast::hash(&m) ^ base, 1u32 << bit);
        for r in &rows {
            if v.0 & (1 << (31 - r.0.leading_zeros())) != 0 {
                v.0 ^= r.0;
                v.1 ^= r.1;
            }
        }
        if v.0 != 0 {
            // Keep the basis reduced: clear the new pivot from the others.
            let p = 1 << (31 - v.0.leading_zeros());
            for r in rows.iter_mut() {
                if r.0 & p != 0 {
                    r.0 ^= v.0;
                    r.1 ^= v.1;
                }
            }
            rows.push(v);
        }
    }
    let mut t = want ^ base;
    let mut x = 0u32;
    for r in &rows {
        if t & (1 << (31 - r.0.leading_zeros())) != 0 {
            t ^= r.0;
            x ^= r.1;
        }
    }
    assert_eq!(t, 0, "CRC forcing failed");
    for bit in 0..32 {
        if x & (1 << bit) != 0 {
            msg[at + (bit / 8) as usize] ^= 1 << (bit % 8);
        }
    }
    assert_eq!(crc32fast::hash(msg), want);
}

/// The store, its snapshot's entry, a pinned lazy replica's config, and
/// the snapshot's entries.
type V4Dataset = (
    Store,
    walcast_core::catalog::SnapshotEntry,
    ReplicaConfig,
    Vec<(Vec<u8>, Vec<u8>)>,
);

/// A published, signed dataset whose head names a version 4 snapshot
/// without carrying its suffix, and a pinned lazy replica synced to it.
fn v4_dataset_without_suffix() -> V4Dataset {
    use walcast_core::publisher::SnapshotFormat;
    use walcast_core::snapshot::indexed::IndexedOptions;
    let mut store = Store::new();
    let c = PublisherConfig {
        snapshot_format: SnapshotFormat::Verified(IndexedOptions {
            block_bytes: 128,
            index_block_bytes: 256,
        }),
        delta_every: None,
        // A large top index is not carried in the head either.
        snapshot_suffix_bytes: 0,
        ..cfg(Some(key(1)), None)
    };
    let unique = |lsn: u64| {
        vec![Op::put(
            format!("u{lsn:05}").into_bytes(),
            vec![lsn as u8; 300],
        )]
    };
    publish_ops(&mut store, c, 400, 1_000, &unique);
    let snap = head_of(&store).snapshot.expect("a snapshot");
    assert_eq!(snap.version, 4);
    assert!(snap.suffix.is_none());
    let want = (1..=snap.lsn)
        .flat_map(unique)
        .map(|op| match op {
            Op::Put { key, value } => (key, value),
            Op::Delete { .. } => unreachable!(),
        })
        .collect();
    let rcfg = ReplicaConfig {
        poll_interval_ms: 50,
        retry_base_ms: 10,
        retry_max_ms: 100,
        trust: vec![key(1).public()],
        long_poll_wait_ms: 0,
        lazy_cache_bytes: Some(1 << 20),
        ..ReplicaConfig::default()
    };
    (store, snap, rcfg, want)
}

/// Drains `poll` at `now`, answering with `answer` (which may lie).
fn drain_answering(r: &mut Replica, now: u64, answer: &mut dyn FnMut(&GetRequest) -> GetResponse) {
    for _ in 0..100_000 {
        match r.poll(now) {
            Action::Fetch(req) => {
                let resp = answer(&req);
                r.handle_response(req.id, now, resp);
            }
            Action::Event(_) => {}
            Action::Wait { .. } => return,
        }
    }
    panic!("poll did not settle");
}

/// One hostile answer to a pinned lazy replica's first suffix GET of its
/// version 4 snapshot: the real last 64 KiB, with the footer changed to
/// name a top index that starts before those bytes (its CRC-32 forced to
/// the `footer_crc32` the signed head records). Nothing binds that footer
/// to the index digest until its top index arrives, which can then never
/// verify: the footer must be dropped with it, so that once the store is
/// honest again reads fetch the true footer and are answered (not fail
/// until the publisher writes another snapshot).
#[test]
fn a_forged_footer_does_not_outlive_the_answer_that_brought_it() {
    use walcast_core::replica::Read;
    let (store, snap, rcfg, want) = v4_dataset_without_suffix();
    let file = store[&snap.key].0.clone();
    let size = file.len() as u64;
    let n: usize = 64 << 10;
    assert!(
        size > n as u64 + 4096,
        "the test needs a snapshot over 64 KiB"
    );
    let mut forged = file[file.len() - n..].to_vec();
    let f = forged.len() - 80;
    let body_end = size - 80;
    let top_len = n as u32 + 1000;
    let top_off = body_end - u64::from(top_len);
    forged[f..f + 8].copy_from_slice(&top_off.to_le_bytes()); // index_offset
    forged[f + 8..f + 16].copy_from_slice(&top_off.to_le_bytes()); // top.offset
    forged[f + 16..f + 20].copy_from_slice(&top_len.to_le_bytes()); // top.len
    let crc = snap
        .footer_crc32
        .expect("the head binds the footer's CRC-32");
    // data_blocks (bytes 64..68) absorb the change.
    force_crc32(&mut forged[f..f + 72], 64, crc);
    assert_eq!(
        u32::from_le_bytes(forged[f + 72..f + 76].try_into().unwrap()),
        crc
    );

    let mut r = Replica::new(rcfg, 7);
    let mut now = 0;
    while r.applied_lsn() < 400 && now < 5_000 {
        drain_answering(&mut r, now, &mut |g| serve(&store, g));
        now += 50;
    }
    assert_eq!(r.applied_lsn(), 400);

    // The hostile store answers the suffix GET once.
    let mut lied = false;
    let (k, v) = want[want.len() / 2].clone();
    for _ in 0..20 {
        let mut hostile = |g: &GetRequest| {
            if g.key == snap.key && matches!(g.range, Some(ByteRange::Suffix(_))) && !lied {
                lied = true;
                return GetResponse::Ok {
                    body: forged.clone(),
                    etag: None,
                    range: Some(ContentRange {
                        start: size - n as u64,
                        end: size,
                        total: Some(size),
                    }),
                };
            }
            serve(&store, g)
        };
        match r.get_lazy(&k) {
            Ok(Read::Pending) => drain_answering(&mut r, now, &mut hostile),
            Ok(Read::Ready(got)) => {
                assert_eq!(got.as_deref(), Some(v.as_slice()), "a wrong answer");
                break;
            }
            Err(e) => {
                eprintln!("while the store lies: {e}");
                break;
            }
        }
    }
    assert!(lied, "the suffix GET was answered by the hostile store");

    // From now on the store is honest (and the head unchanged). Ten
    // minutes of reads, head polls and retries.
    let mut last_err = None;
    let mut answered = false;
    for _ in 0..6_000 {
        now += 100;
        drain_answering(&mut r, now, &mut |g| serve(&store, g));
        match r.get_lazy(&k) {
            Ok(Read::Ready(got)) => {
                assert_eq!(got.as_deref(), Some(v.as_slice()));
                answered = true;
                break;
            }
            Ok(Read::Pending) => {}
            Err(e) => last_err = Some(e),
        }
    }
    assert!(
        answered,
        "a pinned lazy replica stays wedged after one hostile answer, the store honest \
         for 10 minutes: {last_err:?}"
    );
}

/// A signed head stored gzip-compressed: the signature covers its JSON, so
/// pinned replicas read it whether the core or the host verifies, and a
/// host is asked for the same checks as for the JSON.
#[test]
#[cfg(feature = "gzip")]
fn a_signed_head_stored_gzip_compressed_is_read_pinned() {
    both_ways(|| {
        let mut store = Store::new();
        let c = PublisherConfig {
            head_gzip: true,
            ..cfg(Some(key(1)), None)
        };
        publish(&mut store, c, 150, 1_000);
        let stored = &store[HEAD_KEY].0;
        assert!(stored.starts_with(&walcast_core::catalog::GZIP_MAGIC));
        let json = walcast_core::catalog::head_json(stored).unwrap();
        assert!(head_signature(&json).is_some());
        assert!(json.len() > stored.len());
        let r = Reader::new(&[key(1).public()]);
        let (gz, plain) = (
            r.r.signature_checks(HEAD_KEY, stored),
            r.r.signature_checks(HEAD_KEY, &json),
        );
        assert_eq!(gz.len(), 1);
        assert_eq!(
            gz.iter().map(|c| c.id).collect::<Vec<_>>(),
            plain.iter().map(|c| c.id).collect::<Vec<_>>()
        );
        reads_all(&store, &[vec![], vec![key(1).public()]]);
        // Signed by another key: refused as untrusted, gzip or not.
        let mut r = Reader::new(&[key(2).public()]);
        r.run(&store, 2_000);
        assert_eq!(r.r.applied_lsn(), 0);
        assert_eq!(r.last().kind(), ErrorKind::Untrusted);
    });
}
