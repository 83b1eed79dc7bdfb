//! Signed datasets on the publishing side: the signer, the key rotation
//! chain and the digests of every object a head or page names
//! (`docs/FORMAT.md`, "Signed datasets").

use crate::catalog::{head_signature, Head, HeadTrust, KeyEndorsement, Page, MAX_KEY_CHAIN};
use crate::error::{Error, ErrorKind};
use crate::keys::{self, sha256_hex, PublicKey};

use super::Publisher;

/// Suffix of the key under which a snapshot's index digest waits for the
/// head that names it (object keys never contain a NUL byte).
const INDEX_SUFFIX: &str = "\0index";

impl Publisher {
    /// Remembers the digest of an object this publisher uploads, when it signs.
    pub(super) fn note_digest(&mut self, key: &str, bytes: &[u8]) {
        if self.cfg.signing_key.is_some() {
            self.digests.insert(key.to_string(), sha256_hex(bytes));
        }
    }

    /// Remembers the index digest of a version 4 snapshot this publisher
    /// uploads, when it signs (kept beside the whole-file digests under the
    /// key followed by [`INDEX_SUFFIX`]).
    pub(super) fn note_index_digest(&mut self, key: &str, bytes: &[u8]) {
        if self.cfg.signing_key.is_none() {
            return;
        }
        if let Some(d) = crate::snapshot::indexed::index_digest(bytes) {
            let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
            self.digests.insert(format!("{key}{INDEX_SUFFIX}"), hex);
        }
    }

    /// The digest of `key`: one this publisher computed, or the one the head
    /// it builds on recorded.
    fn digest_of(&self, h: &Head, key: &str) -> Option<String> {
        self.digests
            .get(key)
            .cloned()
            .or_else(|| h.digest(key).map(str::to_string))
    }

    /// Records in `page` the digest of every object it names (signing only).
    pub(super) fn page_digests(&self, h: &Head, page: &mut Page) {
        if self.cfg.signing_key.is_none() {
            return;
        }
        let keys = page
            .segments
            .iter()
            .map(|s| s.key.clone())
            .chain(page.pages.iter().map(|p| p.key.clone()));
        page.digests = keys
            .filter_map(|k| self.digest_of(h, &k).map(|d| (k, d)))
            .collect();
    }

    /// A signed head read from the store (`body`, decoded as `h`) that this
    /// publisher is about to build on: signing what it names again needs
    /// the head's signature to verify by this publisher's key, its
    /// previous key, or a key their chain in the head endorses. Otherwise
    /// a bucket's writer could change a digest (and the object it names)
    /// and have this publisher sign it for every replica that pins its
    /// key. Nothing to check when this publisher does not sign, or the
    /// head is not signed (refused elsewhere when it names history).
    pub(super) fn check_signed(&self, body: &[u8], h: &Head) -> Result<(), Error> {
        let (Some(key), Some(t)) = (&self.cfg.signing_key, &h.trust) else {
            return Ok(());
        };
        let mut trusted: Vec<PublicKey> = std::iter::once(key.public())
            .chain(self.cfg.previous_key.as_ref().map(|k| k.public()))
            .collect();
        loop {
            let before = trusted.len();
            for (by, new) in t.chain.iter().filter_map(KeyEndorsement::verify) {
                if trusted.contains(&by) && !trusted.contains(&new) {
                    trusted.push(new);
                }
            }
            if trusted.len() == before {
                break;
            }
        }
        let signed = head_signature(body).is_some_and(|(sig, covered)| {
            PublicKey::parse(&t.signer).is_ok_and(|signer| {
                trusted.contains(&signer) && signer.verify_b64(keys::HEAD_DOMAIN, covered, sig)
            })
        });
        if signed {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Untrusted,
            format!(
                "the head's signature (signer {}) does not verify by the signing key, the \
                 previous key or a key they endorse: the head or what it names may have been \
                 changed in the store, and this publisher does not sign it again (a dataset \
                 signed by another key of yours is published with that key as --previous-key)",
                t.signer
            ),
        )
        .with_object(crate::catalog::HEAD_KEY))
    }

    /// Sets the head's signer, key chain and digests (or clears them when
    /// this publisher does not sign).
    pub(super) fn sign_fields(&self, h: &mut Head) {
        let Some(key) = &self.cfg.signing_key else {
            h.trust = None;
            return;
        };
        let signer = key.public();
        let mut chain = h
            .trust
            .as_ref()
            .map(|t| t.chain.clone())
            .unwrap_or_default();
        if let Some(prev) = &self.cfg.previous_key {
            let (by, new) = (prev.public().to_string(), signer.to_string());
            if prev.public() != signer && !chain.iter().any(|e| e.by == by && e.key == new) {
                chain.push(KeyEndorsement::sign(prev, &signer));
            }
        }
        if chain.len() > MAX_KEY_CHAIN {
            chain.drain(..chain.len() - MAX_KEY_CHAIN);
        }
        let keys: Vec<String> = h
            .segments
            .iter()
            .map(|s| s.key.clone())
            .chain(h.pages.iter().map(|p| p.key.clone()))
            .chain(h.snapshot.iter().map(|s| s.key.clone()))
            .chain(h.deltas.iter().map(|d| d.key.clone()))
            .collect();
        let mut t = HeadTrust {
            signer: signer.to_string(),
            chain,
            ..Default::default()
        };
        // `h` is a copy of the head it builds on: its digests are still there.
        t.digests = keys
            .into_iter()
            .filter_map(|k| self.digest_of(h, &k).map(|d| (k, d)))
            .collect();
        if let Some(s) = &h.snapshot {
            let d = self
                .digests
                .get(&format!("{}{INDEX_SUFFIX}", s.key))
                .cloned()
                .or_else(|| h.index_digest(&s.key).map(str::to_string));
            if let Some(d) = d {
                t.index_digests.insert(s.key.clone(), d);
            }
        }
        h.trust = Some(t);
    }

    /// The bytes of a head: signed when this publisher has a signing key,
    /// gzip-compressed with [`super::PublisherConfig::head_gzip`].
    pub(super) fn encode_head(&self, h: &Head) -> Vec<u8> {
        let json = match &self.cfg.signing_key {
            Some(k) => h.encode_signed(k),
            None => h.encode(),
        };
        #[cfg(feature = "gzip")]
        if self.cfg.head_gzip {
            return crate::catalog::gzip_head(&json);
        }
        json
    }

    /// Forgets digests the committed head `h` now records itself.
    pub(super) fn forget_digests(&mut self, h: &Head) {
        if let Some(t) = &h.trust {
            self.digests.retain(|k, _| {
                let index = k
                    .strip_suffix(INDEX_SUFFIX)
                    .is_some_and(|s| t.index_digests.contains_key(s));
                !t.digests.contains_key(k) && !index
            });
        }
    }
}
