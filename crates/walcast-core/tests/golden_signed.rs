//! Golden signed encodings (`tests/golden/head-signed.json`,
//! `tests/golden/page-signed.json`): the golden head and page signed by a
//! fixed key (Ed25519 signatures are deterministic), with digests and a key
//! rotation in the head. Each test re-encodes and compares byte for byte,
//! then checks the committed file's signature. Rewrite them (only for an
//! intended format change) with
//! `WALCAST_BLESS=1 cargo test -p walcast-core --test golden_signed`.

#[path = "support/fixtures.rs"]
mod fixtures;

use std::path::PathBuf;

use fixtures::*;
use walcast_core::catalog::{
    head_signature, page_signature, Head, HeadTrust, KeyEndorsement, Page,
};
use walcast_core::keys::{sha256_hex, SecretKey, HEAD_DOMAIN, PAGE_DOMAIN};

fn check(name: &str, encoded: &[u8]) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("WALCAST_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, encoded).unwrap();
    }
    let golden = std::fs::read(&path).unwrap();
    assert!(
        golden == encoded,
        "the signed encoding of {name} changed: this breaks signed datasets already published"
    );
    golden
}

fn old_key() -> SecretKey {
    SecretKey::from_seed([1; 32])
}

fn key() -> SecretKey {
    SecretKey::from_seed([2; 32])
}

#[test]
fn golden_signed_page() {
    let mut page = golden_page();
    for s in &page.segments {
        page.digests
            .insert(s.key.clone(), sha256_hex(s.key.as_bytes()));
    }
    let golden = check("page-signed.json", &page.encode_signed(&key()));
    let (sig, signed) = page_signature(&golden).expect("signed");
    assert!(key().public().verify_b64(PAGE_DOMAIN, signed, sig));
    // Readers that know nothing of signatures read it as before.
    let decoded = Page::decode(&golden, &golden_page_ref(&golden)).unwrap();
    assert_eq!(decoded, page);
}

#[test]
fn golden_signed_head() {
    let mut head = golden_head();
    let mut t = HeadTrust {
        signer: key().public().to_string(),
        chain: vec![KeyEndorsement::sign(&old_key(), &key().public())],
        ..Default::default()
    };
    let keys = head
        .segments
        .iter()
        .map(|s| s.key.clone())
        .chain(head.pages.iter().map(|p| p.key.clone()))
        .chain(head.snapshot.iter().map(|s| s.key.clone()));
    for k in keys {
        t.digests.insert(k.clone(), sha256_hex(k.as_bytes()));
    }
    head.trust = Some(t);
    let golden = check("head-signed.json", &head.encode_signed(&key()));
    let (sig, signed) = head_signature(&golden).expect("signed");
    assert!(key().public().verify_b64(HEAD_DOMAIN, signed, sig));
    assert!(!old_key().public().verify_b64(HEAD_DOMAIN, signed, sig));
    let decoded = Head::decode(&golden).unwrap();
    assert_eq!(decoded, head);
    let (by, new) = decoded.trust.unwrap().chain[0].verify().expect("endorsed");
    assert_eq!((by, new), (old_key().public(), key().public()));
}
