//! Signed datasets in the catalog: the signed encodings of heads and pages,
//! the signer and key rotation chain a head carries, and the digests that
//! bind every object to the signed head (`docs/FORMAT.md`, "Signed
//! datasets"). The types are re-exported from [`crate::catalog`].

use serde::{Serialize, Serializer};

use crate::catalog::{Head, Page, HEAD_PREFIX_LEN};
use crate::error::Quoted;
use crate::keys::{self, PublicKey, SecretKey};

/// Most key rotations a head carries.
pub const MAX_KEY_CHAIN: usize = 16;

/// The signed parts of a signed head that tell a replica which key signed it
/// and what every object it names must hash to.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct HeadTrust {
    /// The key that signed this head, `ed25519:<base64>`.
    pub signer: String,
    /// Key rotations, oldest first: each says "key `by` endorses key `key`".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<KeyEndorsement>,
    /// SHA-256 (64 lowercase hex digits) of every segment, page and snapshot
    /// the head names, by key.
    #[serde(default)]
    pub digests: Digests,
    /// For a version 4 snapshot the head names: the SHA-256 of its top index
    /// block followed by its footer (see
    /// [`index_digest`](crate::snapshot::indexed::index_digest)), which binds
    /// every block of the file through the digests its index carries. Left
    /// out of the JSON when empty.
    #[serde(default, skip_serializing_if = "Digests::is_empty")]
    pub index_digests: Digests,
}

/// One key rotation: `by` signed `key` (see [`keys::ROTATION_DOMAIN`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyEndorsement {
    /// The new key, `ed25519:<base64>`.
    pub key: String,
    /// The key that endorses it, `ed25519:<base64>`.
    pub by: String,
    /// `by`'s signature (base64) over the rotation domain and `key`'s 32 bytes.
    pub signature: String,
}

impl KeyEndorsement {
    /// `old` endorses `new`.
    pub fn sign(old: &SecretKey, new: &PublicKey) -> Self {
        KeyEndorsement {
            key: new.to_string(),
            by: old.public().to_string(),
            signature: old.sign_b64(keys::ROTATION_DOMAIN, &new.to_bytes()),
        }
    }

    /// `(by, key)` when the endorsement is well formed and `by` really
    /// signed `key`.
    pub fn verify(&self) -> Option<(PublicKey, PublicKey)> {
        let by = PublicKey::parse(&self.by).ok()?;
        let key = PublicKey::parse(&self.key).ok()?;
        by.verify_b64(keys::ROTATION_DOMAIN, &key.to_bytes(), &self.signature)
            .then_some((by, key))
    }
}

/// Length of the signature member `"signature":"<88 base64>",`.
const SIGNATURE_MEMBER_LEN: usize = 13 + keys::SIGNATURE_B64_LEN + 2;

/// Splits `"signature":"<88 base64>",` off the front of `bytes`: the
/// signature and the bytes after the member, which it covers.
fn split_signature(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let member = bytes.get(..SIGNATURE_MEMBER_LEN)?;
    let sig = member
        .strip_prefix(b"\"signature\":\"")?
        .strip_suffix(b"\",")?;
    Some((
        std::str::from_utf8(sig).ok()?,
        &bytes[SIGNATURE_MEMBER_LEN..],
    ))
}

/// The signature of a signed head and the bytes it covers (everything after
/// the signature member, from the next member to the final `}`); `None` for
/// an unsigned head. The head's checksum is checked by [`Head::decode`].
pub fn head_signature(bytes: &[u8]) -> Option<(&str, &[u8])> {
    split_signature(bytes.get(HEAD_PREFIX_LEN..)?)
}

/// The signature of a signed page and the bytes it covers; `None` for an
/// unsigned page.
pub fn page_signature(bytes: &[u8]) -> Option<(&str, &[u8])> {
    split_signature(bytes.strip_prefix(b"{")?)
}

/// Digests by object key (a head's or page's `digests`, a head's
/// `index_digests`): a map kept as a vector sorted by key, serialized as a
/// JSON object in key order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Digests(Vec<(String, String)>);

impl Digests {
    /// An empty map.
    pub fn new() -> Self {
        Digests(Vec::new())
    }

    /// From entries whose keys strictly ascend (the caller checked).
    pub(crate) fn from_sorted(v: Vec<(String, String)>) -> Self {
        debug_assert!(v.windows(2).all(|w| w[0].0 < w[1].0));
        Digests(v)
    }

    fn find(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(key))
    }

    /// The digest recorded for `key`.
    pub fn get(&self, key: &str) -> Option<&String> {
        self.find(key).ok().map(|i| &self.0[i].1)
    }

    /// Whether `key` has a digest.
    pub fn contains_key(&self, key: &str) -> bool {
        self.find(key).is_ok()
    }

    /// Records `digest` for `key`, returning the one it replaces (at the
    /// end in O(1); elsewhere it shifts the keys after it: collect many
    /// keys in any order with [`FromIterator`] instead).
    pub fn insert(&mut self, key: String, digest: String) -> Option<String> {
        if self.0.last().is_none_or(|(k, _)| *k < key) {
            self.0.push((key, digest));
            return None;
        }
        match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, digest)),
            Err(i) => {
                self.0.insert(i, (key, digest));
                None
            }
        }
    }

    /// How many keys have digests.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no key has a digest.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The keys and digests in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter().map(|(k, d)| (k, d))
    }

    /// The keys in order.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(k, _)| k)
    }
}

impl FromIterator<(String, String)> for Digests {
    /// Collects in any order; of repeated keys the last one stays.
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        let mut v: Vec<(String, String)> = iter.into_iter().collect();
        // Stable: repeated keys keep their order, and the last is kept.
        v.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(String, String)> = Vec::with_capacity(v.len());
        for e in v {
            match out.last_mut() {
                Some(last) if last.0 == e.0 => *last = e,
                _ => out.push(e),
            }
        }
        Digests(out)
    }
}

impl<'a> IntoIterator for &'a Digests {
    type Item = (&'a String, &'a String);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, String)>,
        fn(&'a (String, String)) -> (&'a String, &'a String),
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, d)| (k, d))
    }
}

impl Serialize for Digests {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

/// Checks a digest map: every value a digest, every key one the document names.
pub(crate) fn check_digests(what: &str, digests: &Digests, named: &[&str]) -> Result<(), String> {
    for (k, d) in digests {
        if !keys::is_digest(d) {
            return Err(format!(
                "{what}: digest of {} is not 64 lowercase hex digits",
                Quoted::str(k)
            ));
        }
    }
    // Every digest names an entry: one lookup in the (ordered) map per
    // named key, marking the digest it finds, not a scan of the names per
    // digest (quadratic for a page of tens of thousands of entries).
    let mut seen = vec![false; digests.len()];
    for n in named {
        if let Ok(i) = digests.find(n) {
            seen[i] = true;
        }
    }
    match seen.iter().position(|s| !s) {
        Some(i) => Err(format!(
            "{what}: digest for {}, which it does not name",
            Quoted::str(&digests.0[i].0)
        )),
        None => Ok(()),
    }
}

impl Head {
    /// Serializes and signs the head: like [`Head::encode`], with the
    /// member `"signature":"<base64>",` right after the checksum member. The
    /// signature covers [`keys::HEAD_DOMAIN`] followed by every byte after
    /// that member; the checksum covers every byte after its own prefix, the
    /// signature member included.
    pub fn encode_signed(&self, key: &SecretKey) -> Vec<u8> {
        let json = serde_json::to_vec(self).unwrap_or_default();
        let rest = &json[1..];
        let sig = key.sign_b64(keys::HEAD_DOMAIN, rest);
        let mut body = Vec::with_capacity(rest.len() + SIGNATURE_MEMBER_LEN);
        body.extend_from_slice(format!("\"signature\":\"{sig}\",").as_bytes());
        body.extend_from_slice(rest);
        let mut out = Vec::with_capacity(body.len() + HEAD_PREFIX_LEN);
        out.extend_from_slice(
            format!("{{\"crc32\":\"{:08x}\",", crate::crc::hash(&body)).as_bytes(),
        );
        out.extend_from_slice(&body);
        out
    }

    /// The digest the head records for `key`, if it is signed and names one.
    pub fn digest(&self, key: &str) -> Option<&str> {
        self.trust.as_ref()?.digests.get(key).map(String::as_str)
    }

    /// The index digest the head records for the version 4 snapshot `key`,
    /// if it is signed and names one.
    pub fn index_digest(&self, key: &str) -> Option<&str> {
        self.trust
            .as_ref()?
            .index_digests
            .get(key)
            .map(String::as_str)
    }

    pub(crate) fn validate_trust(&self) -> Result<(), String> {
        let Some(t) = &self.trust else {
            return Ok(());
        };
        PublicKey::parse(&t.signer).map_err(|e| format!("head signer: {}", e.message()))?;
        if t.chain.len() > MAX_KEY_CHAIN {
            return Err(format!("key chain longer than {MAX_KEY_CHAIN}"));
        }
        let mut named: Vec<&str> = self.segments.iter().map(|s| s.key.as_str()).collect();
        named.extend(self.pages.iter().map(|p| p.key.as_str()));
        named.extend(self.snapshot.iter().map(|s| s.key.as_str()));
        named.extend(self.deltas.iter().map(|d| d.key.as_str()));
        check_digests("head", &t.digests, &named)?;
        let snapshots: Vec<&str> = self.snapshot.iter().map(|s| s.key.as_str()).collect();
        check_digests("head (index digests)", &t.index_digests, &snapshots)
    }
}

impl Page {
    /// Serializes and signs the page: `{"signature":"<base64>",` then the
    /// unsigned encoding without its opening `{`; the signature covers
    /// [`keys::PAGE_DOMAIN`] followed by every byte after the member.
    pub fn encode_signed(&self, key: &SecretKey) -> Vec<u8> {
        let json = serde_json::to_vec(self).unwrap_or_default();
        let rest = &json[1..];
        let sig = key.sign_b64(keys::PAGE_DOMAIN, rest);
        let mut out = Vec::with_capacity(json.len() + SIGNATURE_MEMBER_LEN);
        out.extend_from_slice(format!("{{\"signature\":\"{sig}\",").as_bytes());
        out.extend_from_slice(rest);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::{check_digests, Digests};

    /// A digest map of many entries and one more, for a key the document
    /// does not name (sorting last): the error names that key, found with
    /// one lookup per name (a scan of the names per digest: some 5·10⁹
    /// comparisons here).
    #[test]
    fn an_unnamed_digest_among_many_is_named_in_the_error() {
        let names: Vec<String> = (0..100_000)
            .map(|i| format!("segments/1/{i:020}-{i:020}.wseg"))
            .collect();
        let named: Vec<&str> = names.iter().map(String::as_str).collect();
        let hex = "0".repeat(64);
        let mut digests: Digests = names.iter().map(|n| (n.clone(), hex.clone())).collect();
        assert_eq!(check_digests("page", &digests, &named), Ok(()));
        digests.insert("~".into(), hex);
        let err = check_digests("page", &digests, &named).unwrap_err();
        assert!(
            err.contains("\"~\"") && err.contains("does not name"),
            "{err}"
        );
    }

    #[test]
    fn digests_keep_key_order_and_the_last_value_of_a_key() {
        let pairs = [("s/2", "b"), ("c/1", "a"), ("s/10", "c"), ("c/1", "d")];
        let owned = || pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let collected: Digests = owned().collect();
        let mut inserted = Digests::new();
        for (k, v) in owned() {
            inserted.insert(k, v);
        }
        for m in [&collected, &inserted] {
            let got: Vec<(&str, &str)> = m.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            assert_eq!(got, [("c/1", "d"), ("s/10", "c"), ("s/2", "b")]);
            assert_eq!(m.get("c/1").map(String::as_str), Some("d"));
            assert!(m.contains_key("s/2") && !m.contains_key("s/3"));
            assert_eq!(m.len(), 3);
        }
        assert_eq!(collected, inserted);
        let json = serde_json::to_string(&collected).unwrap();
        assert_eq!(json, r#"{"c/1":"d","s/10":"c","s/2":"b"}"#);
    }
}
