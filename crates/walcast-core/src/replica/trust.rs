//! Pinned keys: a replica configured with trusted keys
//! ([`super::ReplicaConfig::trust`]) applies only heads a trusted key
//! signed (following the head's key rotation chain), never a signed head
//! older than one it applied, and only objects whose SHA-256 equals the
//! digest the signed head (or a page it binds) records. Anything else is an
//! [`ErrorKind::Untrusted`] error; nothing from it is applied.

use crate::catalog::{
    head_signature, object_kind, page_signature, DatasetId, Head, PageRef, HEAD_KEY,
};
use crate::error::{Error, ErrorKind};
use crate::keys::{self, PublicKey, Sha256Stream, SignatureCheck};

use super::Replica;

/// What a pinned replica trusts and has accepted.
#[derive(Debug, Default)]
pub(super) struct Trust {
    /// Pinned keys, and keys they endorsed through a head's chain.
    keys: Vec<PublicKey>,
    /// The newest signed head accepted: dataset, generation, commit time.
    last: Option<(DatasetId, u64, u64)>,
    /// The snapshot being loaded: the next byte expected and the hash so far.
    snap: Option<(u64, Sha256Stream)>,
    /// The key that signed the newest head accepted.
    signer: Option<PublicKey>,
    /// Whether the host makes the Ed25519 checks (always so on wasm32).
    host_verifies: bool,
    /// Ids of the checks the host made and found valid, newest last (at
    /// most [`VERIFIED_KEPT`]).
    verified: Vec<[u8; 32]>,
}

/// Host-verified checks remembered: more than the responses in flight need.
const VERIFIED_KEPT: usize = 64;

impl Trust {
    pub(super) fn new(keys: &[PublicKey], host_verifies: bool) -> Self {
        Trust {
            keys: keys.to_vec(),
            host_verifies: host_verifies || cfg!(target_family = "wasm"),
            ..Trust::default()
        }
    }

    /// Whether `key`'s base64 signature over `domain ‖ covered` verifies:
    /// checked here, or, where the host verifies, found among the checks
    /// it made.
    fn verify(&self, key: &PublicKey, domain: &[u8], covered: &[u8], sig: &str) -> bool {
        if !self.host_verifies {
            return verify_here(key, domain, covered, sig);
        }
        keys::decode_signature(sig).is_some_and(|signature| {
            let id = SignatureCheck::id_of(key, &signature, domain, covered);
            self.verified.contains(&id)
        })
    }

    /// Whether this replica pins keys at all.
    pub(super) fn pinned(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The key that signed the newest head accepted (pinned replicas only).
    pub(super) fn signer(&self) -> Option<&PublicKey> {
        self.signer.as_ref()
    }

    /// Feeds snapshot bytes starting at `offset` into the snapshot's hash.
    pub(super) fn hash_snapshot(&mut self, offset: u64, bytes: &[u8]) {
        if !self.pinned() {
            return;
        }
        if offset == 0 {
            self.snap = Some((0, Sha256Stream::new()));
        }
        match self.snap.as_mut() {
            Some((next, h)) if *next == offset => {
                h.update(bytes);
                *next += bytes.len() as u64;
            }
            _ => self.snap = None,
        }
    }
}

/// Ed25519 in Rust.
#[cfg(not(target_family = "wasm"))]
fn verify_here(key: &PublicKey, domain: &[u8], covered: &[u8], sig: &str) -> bool {
    key.verify_b64(domain, covered, sig)
}

/// The wasm32 core carries no Ed25519 code; its host always verifies.
#[cfg(target_family = "wasm")]
fn verify_here(_: &PublicKey, _: &[u8], _: &[u8], _: &str) -> bool {
    false
}

fn untrusted(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Untrusted, msg)
}

impl Replica {
    /// Checks a decoded head against the pinned keys (nothing to check for
    /// an unpinned replica): signed, by a trusted key or one the chain
    /// endorses, and not older than a signed head already accepted.
    pub(super) fn check_head_trust(&mut self, body: &[u8], head: &Head) -> Result<(), Error> {
        if !self.trust.pinned() {
            return Ok(());
        }
        let err = |m: String| {
            untrusted(m)
                .with_object(HEAD_KEY)
                .with_lsn(head.committed_lsn)
        };
        let (Some(t), Some((sig, signed))) = (&head.trust, head_signature(body)) else {
            return Err(err(
                "the head is not signed, and this replica pins keys".into()
            ));
        };
        let signer = PublicKey::parse(&t.signer).map_err(|e| err(e.message().to_string()))?;
        // Follow the rotation chain from the keys already trusted.
        let mut trusted = self.trust.keys.clone();
        loop {
            let before = trusted.len();
            for e in &t.chain {
                let (Ok(by), Ok(key)) = (PublicKey::parse(&e.by), PublicKey::parse(&e.key)) else {
                    continue;
                };
                if trusted.contains(&by)
                    && !trusted.contains(&key)
                    && self
                        .trust
                        .verify(&by, keys::ROTATION_DOMAIN, &key.to_bytes(), &e.signature)
                {
                    trusted.push(key);
                }
            }
            if trusted.len() == before {
                break;
            }
        }
        if !trusted.contains(&signer) {
            return Err(err(format!(
                "the head is signed by {signer}, which is not trusted"
            )));
        }
        if !self.trust.verify(&signer, keys::HEAD_DOMAIN, signed, sig) {
            return Err(err(format!(
                "the head's signature by {signer} does not verify"
            )));
        }
        // Another dataset signed by the same key (one key signing several
        // datasets, one served in place of another), or a dataset started
        // over: not followed by itself. The dataset this replica holds
        // survives restarts (it is persisted with the state), so a
        // restarted replica refuses likewise.
        if let Some(d) = self.dataset.filter(|d| *d != head.dataset_id) {
            return Err(err(format!(
                "the head is of dataset {}, but this replica follows dataset {d}; a replica \
                 that pins keys does not switch datasets (start it without its persisted state)",
                head.dataset_id
            )));
        }
        // Rollback: never a signed head older than one already applied.
        if self.dataset == Some(head.dataset_id) && head.committed_lsn < self.applied {
            return Err(err(format!(
                "signed head commits LSN {} but this replica applied {}: refusing to go back",
                head.committed_lsn, self.applied
            )));
        }
        match self.trust.last {
            Some((id, generation, _)) if id == head.dataset_id && head.generation < generation => {
                return Err(err(format!(
                    "signed head generation {} is older than generation {generation} already accepted",
                    head.generation
                )));
            }
            Some((id, _, at)) if id != head.dataset_id && head.committed_at_ms <= at => {
                return Err(err(format!(
                    "signed head of dataset {} is not newer than the accepted head of dataset {id}",
                    head.dataset_id
                )));
            }
            _ => {}
        }
        self.trust.keys = trusted;
        self.trust.signer = Some(signer);
        self.trust.last = Some((head.dataset_id, head.generation, head.committed_at_ms));
        Ok(())
    }

    /// Whether this replica pins keys ([`super::ReplicaConfig::trust`]).
    pub fn pins_keys(&self) -> bool {
        self.trust.pinned()
    }

    /// The Ed25519 checks delivering `body`, the answer to a GET of `key`,
    /// will make: none unless this replica pins keys and `key` is the head
    /// or a page. A host that verifies signatures itself (wasm32, or
    /// [`super::ReplicaConfig::host_verifies_signatures`]) makes them and
    /// passes the ids of those that verified to
    /// [`signatures_verified`](Self::signatures_verified) before it hands
    /// the response over; a check it did not confirm counts as failed.
    pub fn signature_checks(&self, key: &str, body: &[u8]) -> Vec<SignatureCheck> {
        let mut out = Vec::new();
        if !self.trust.pinned() {
            return out;
        }
        if key == HEAD_KEY {
            #[cfg(feature = "gzip")]
            let json = crate::catalog::head_json(body).unwrap_or_default();
            #[cfg(feature = "gzip")]
            let body = &json[..];
            let (Ok(head), Some((sig, signed))) = (Head::decode(body), head_signature(body)) else {
                return out;
            };
            let Some(t) = &head.trust else {
                return out;
            };
            // The chain's endorsements reachable from the keys trusted (as
            // `check_head_trust` follows them), then the signer's, if
            // reachable: a hostile head gets no checks made for keys
            // nothing trusted endorses.
            let mut reach = self.trust.keys.clone();
            let mut listed = vec![false; t.chain.len()];
            loop {
                let before = out.len();
                for (e, done) in t.chain.iter().zip(listed.iter_mut()) {
                    let (Ok(by), Ok(k)) = (PublicKey::parse(&e.by), PublicKey::parse(&e.key))
                    else {
                        continue;
                    };
                    if *done || !reach.contains(&by) {
                        continue;
                    }
                    *done = true;
                    if let Some(c) =
                        SignatureCheck::new(&by, keys::ROTATION_DOMAIN, &k.to_bytes(), &e.signature)
                    {
                        out.push(c);
                        if !reach.contains(&k) {
                            reach.push(k);
                        }
                    }
                }
                if out.len() == before {
                    break;
                }
            }
            if let Ok(signer) = PublicKey::parse(&t.signer) {
                if reach.contains(&signer) {
                    out.extend(SignatureCheck::new(&signer, keys::HEAD_DOMAIN, signed, sig));
                }
            }
        } else if object_kind(key) == Some("page") {
            if let Some((sig, m)) = page_signature(body) {
                for k in &self.trust.keys {
                    out.extend(SignatureCheck::new(k, keys::PAGE_DOMAIN, m, sig));
                }
            }
        }
        out
    }

    /// Records checks from [`signature_checks`](Self::signature_checks)
    /// that the host made and found valid, by id.
    pub fn signatures_verified(&mut self, ids: impl IntoIterator<Item = [u8; 32]>) {
        let v = &mut self.trust.verified;
        for id in ids {
            if !v.contains(&id) {
                v.push(id);
            }
        }
        let extra = v.len().saturating_sub(VERIFIED_KEPT);
        v.drain(..extra);
    }

    /// The digest recorded for `key` by `head` or a cached, verified page.
    pub(super) fn digest_for(&self, head: &Head, key: &str) -> Option<String> {
        if !self.trust.pinned() {
            return None;
        }
        head.digest(key)
            .or_else(|| {
                self.pages
                    .iter()
                    .find_map(|(_, p)| p.digests.get(key).map(String::as_str))
            })
            .map(str::to_string)
    }

    /// Checks `bytes` of object `key` against its recorded digest (pinned
    /// replicas only).
    pub(super) fn check_digest(
        &self,
        key: &str,
        digest: Option<&str>,
        bytes: &[u8],
    ) -> Result<(), Error> {
        if !self.trust.pinned() {
            return Ok(());
        }
        let Some(want) = digest else {
            return Err(
                untrusted("no digest for this object in the signed catalog").with_object(key)
            );
        };
        let got = keys::sha256_hex(bytes);
        if got != want {
            return Err(untrusted(format!(
                "SHA-256 {got} differs from {want}, the digest the signed catalog records"
            ))
            .with_object(key));
        }
        Ok(())
    }

    /// Checks a page's bytes: its digest, and its signature by a trusted key.
    pub(super) fn check_page_trust(&self, r: &PageRef, body: &[u8]) -> Result<(), Error> {
        if !self.trust.pinned() {
            return Ok(());
        }
        let digest = self
            .head
            .as_ref()
            .and_then(|h| self.digest_for(h, &r.key))
            .or_else(|| {
                self.pages
                    .iter()
                    .find_map(|(_, p)| p.digests.get(&r.key).cloned())
            });
        self.check_digest(&r.key, digest.as_deref(), body)?;
        let signed = page_signature(body).is_some_and(|(sig, m)| {
            self.trust
                .keys
                .iter()
                .any(|k| self.trust.verify(k, keys::PAGE_DOMAIN, m, sig))
        });
        if !signed {
            return Err(untrusted("the page is not signed by a trusted key").with_object(&r.key));
        }
        Ok(())
    }

    /// Checks a loaded snapshot's hash against the digest the head records.
    pub(super) fn check_snapshot_trust(&mut self, key: &str, size: u64) -> Result<(), Error> {
        if !self.trust.pinned() {
            return Ok(());
        }
        let want = self
            .head
            .as_ref()
            .and_then(|h| h.digest(key))
            .map(str::to_string);
        let Some(want) = want else {
            return Err(
                untrusted("no digest for this snapshot in the signed head").with_object(key)
            );
        };
        match self.trust.snap.take() {
            Some((next, h)) if next == size => {
                let got = h.finish_hex();
                if got != want {
                    return Err(untrusted(format!(
                        "SHA-256 {got} differs from {want}, the digest the signed head records"
                    ))
                    .with_object(key));
                }
                Ok(())
            }
            _ => Err(untrusted("snapshot bytes out of order for hashing").with_object(key)),
        }
    }
}
