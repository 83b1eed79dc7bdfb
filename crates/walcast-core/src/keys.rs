//! Ed25519 keys and SHA-256 digests: the formats of signed datasets.
//!
//! - A **public key** is written `ed25519:<base64>`: the 32-byte Ed25519
//!   public key in standard base64 with padding (44 characters). This is how
//!   `walcast keygen` prints it, how `walcast replicate --trust`, the JS
//!   option `trust` and the worker's `TRUST` take it, and how a head names
//!   its signer.
//! - A **secret key file** holds one line: `walcast-ed25519-secret:<base64>`
//!   with the 32-byte Ed25519 seed in standard base64 with padding, then a
//!   newline. `walcast keygen --out FILE` writes it with mode 0600 and never
//!   overwrites an existing file.
//! - A **signature** is the 64-byte Ed25519 signature in standard base64 with
//!   padding (88 characters).
//! - A **digest** is SHA-256, written as 64 lowercase hex digits.
//!
//! Access tokens (`walcast token`, `walcast serve --verify-key`) reuse these
//! formats: the same secret key file and the same `ed25519:<base64>` public
//! keys. Every message signed under walcast starts with a domain string
//! naming what it is (see [`HEAD_DOMAIN`], [`PAGE_DOMAIN`],
//! [`ROTATION_DOMAIN`]), so a signature made for one purpose never verifies
//! for another.
//!
//! See `docs/FORMAT.md`, "Signed datasets".

use std::fmt;

use crate::b64;
use sha2::{Digest as _, Sha256};

use crate::error::{Error, ErrorKind, Result};

/// Prefix of a public key in text.
pub const PUBLIC_KEY_PREFIX: &str = "ed25519:";
/// Prefix of the one line in a secret key file.
pub const SECRET_KEY_PREFIX: &str = "walcast-ed25519-secret:";
/// Domain string that starts the message a head signature covers.
pub const HEAD_DOMAIN: &[u8] = b"walcast-head-v1\0";
/// Domain string that starts the message a page signature covers.
pub const PAGE_DOMAIN: &[u8] = b"walcast-page-v1\0";
/// Domain string that starts the message a key rotation signature covers.
pub const ROTATION_DOMAIN: &[u8] = b"walcast-key-rotation-v1\0";
/// Length of a signature in base64 text.
pub const SIGNATURE_B64_LEN: usize = 88;

/// An Ed25519 public key, written `ed25519:<base64>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// Parses `ed25519:<base64 of 32 bytes>`; surrounding ASCII whitespace is ignored.
    pub fn parse(text: &str) -> Result<PublicKey> {
        let text = text.trim_ascii();
        let b64 = text.strip_prefix(PUBLIC_KEY_PREFIX).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("public key must start with \"{PUBLIC_KEY_PREFIX}\""),
            )
        })?;
        let bytes = decode_fixed::<32>(b64, "public key")?;
        if has_small_order(&bytes) || !is_point(&bytes) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "not an Ed25519 public key (not a point, or of small order)",
            ));
        }
        Ok(PublicKey(bytes))
    }

    /// The 32 raw bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0
    }

    /// Verifies `signature` (64 bytes) over `message` (RFC 8032 with
    /// ed25519-compact: a non-canonical `S`, and a key or `R` of small
    /// order, are refused).
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let sig = ed25519_compact::Signature::new(*signature);
        ed25519_compact::PublicKey::new(self.0)
            .verify(message, &sig)
            .is_ok()
    }

    /// Verifies a base64 signature over `domain ‖ message`.
    pub fn verify_b64(&self, domain: &[u8], message: &[u8], signature_b64: &str) -> bool {
        let Ok(sig) = decode_fixed::<64>(signature_b64, "signature") else {
            return false;
        };
        let mut m = Vec::with_capacity(domain.len() + message.len());
        m.extend_from_slice(domain);
        m.extend_from_slice(message);
        self.verify(&m, &sig)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PUBLIC_KEY_PREFIX}{}", b64::Display(&self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for PublicKey {
    type Err = Error;
    fn from_str(s: &str) -> Result<PublicKey> {
        PublicKey::parse(s)
    }
}

/// Whether `bytes` encodes an Ed25519 point of small order (order 1, 2, 4
/// or 8), including the non-canonical encodings of such points: the
/// encodings libsodium refuses, compared with the sign bit of x cleared. A
/// key of small order would "verify" signatures of anyone's making.
pub fn has_small_order(bytes: &[u8; 32]) -> bool {
    const fn run(first: u8, fill: u8, last: u8) -> [u8; 32] {
        let mut b = [fill; 32];
        b[0] = first;
        b[31] = last;
        b
    }
    const SMALL_ORDER: [[u8; 32]; 7] = [
        run(0x00, 0x00, 0x00), // 0 (order 4)
        run(0x01, 0x00, 0x00), // 1 (order 1)
        [
            0x26, 0xe8, 0x95, 0x8f, 0xc2, 0xb2, 0x27, 0xb0, 0x45, 0xc3, 0xf4, 0x89, 0xf2, 0xef,
            0x98, 0xf0, 0xd5, 0xdf, 0xac, 0x05, 0xd3, 0xc6, 0x33, 0x39, 0xb1, 0x38, 0x02, 0x88,
            0x6d, 0x53, 0xfc, 0x05,
        ], // order 8
        [
            0xc7, 0x17, 0x6a, 0x70, 0x3d, 0x4d, 0xd8, 0x4f, 0xba, 0x3c, 0x0b, 0x76, 0x0d, 0x10,
            0x67, 0x0f, 0x2a, 0x20, 0x53, 0xfa, 0x2c, 0x39, 0xcc, 0xc6, 0x4e, 0xc7, 0xfd, 0x77,
            0x92, 0xac, 0x03, 0x7a,
        ], // order 8
        run(0xec, 0xff, 0x7f), // p - 1 (order 2)
        run(0xed, 0xff, 0x7f), // p, i.e. 0 (order 4)
        run(0xee, 0xff, 0x7f), // p + 1, i.e. 1 (order 1)
    ];
    SMALL_ORDER
        .iter()
        .any(|s| s[..31] == bytes[..31] && s[31] == bytes[31] & 0x7f)
}

/// Whether `bytes` decodes to a point of the curve. On wasm32 the core
/// carries no Ed25519 arithmetic (the JS host verifies signatures with
/// WebCrypto, see [`SignatureCheck`]): any 32 bytes pass here, and a key
/// that is not a point verifies no signature.
#[cfg(not(target_family = "wasm"))]
fn is_point(bytes: &[u8; 32]) -> bool {
    ed25519_compact::PublicKey::new(*bytes).validate().is_ok()
}

#[cfg(target_family = "wasm")]
fn is_point(_: &[u8; 32]) -> bool {
    true
}

/// One Ed25519 verification a replica makes: `key`'s signature
/// `signature` over `message` (its domain string included). Where the
/// host verifies signatures (wasm32, whose module carries no Ed25519 code,
/// or [`crate::replica::ReplicaConfig::host_verifies_signatures`]), the
/// replica lists the checks a response needs
/// ([`crate::replica::Replica::signature_checks`]), the host makes them
/// (WebCrypto's Ed25519 in JS), and hands back the `id`s of those that
/// verified ([`crate::replica::Replica::signatures_verified`]) before it
/// delivers the response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureCheck {
    /// SHA-256 of key, signature and message: what the replica remembers
    /// of a check that verified.
    pub id: [u8; 32],
    /// The key that must have signed.
    pub key: PublicKey,
    /// The signature (64 bytes).
    pub signature: [u8; 64],
    /// The message signed: a domain string, then the bytes it covers.
    pub message: Vec<u8>,
}

impl SignatureCheck {
    /// The check of `key`'s base64 signature over `domain ‖ covered`;
    /// `None` when the signature is not 64 bytes in base64 (it verifies
    /// nothing).
    pub fn new(
        key: &PublicKey,
        domain: &[u8],
        covered: &[u8],
        signature_b64: &str,
    ) -> Option<Self> {
        let signature = decode_signature(signature_b64)?;
        let mut message = Vec::with_capacity(domain.len() + covered.len());
        message.extend_from_slice(domain);
        message.extend_from_slice(covered);
        Some(SignatureCheck {
            id: Self::id_of(key, &signature, domain, covered),
            key: *key,
            signature,
            message,
        })
    }

    /// The `id` of a check, without building its message.
    pub fn id_of(key: &PublicKey, signature: &[u8; 64], domain: &[u8], covered: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(key.0);
        h.update(signature);
        h.update(domain);
        h.update(covered);
        h.finalize().into()
    }

    /// Makes the check here (Ed25519 in Rust); for hosts and tests.
    #[cfg(not(target_family = "wasm"))]
    pub fn verify(&self) -> bool {
        self.key.verify(&self.message, &self.signature)
    }
}

/// A signature from its base64 text; `None` unless it is 64 bytes.
pub(crate) fn decode_signature(b64: &str) -> Option<[u8; 64]> {
    decode_fixed::<64>(b64, "signature").ok()
}

/// An Ed25519 secret key (the 32-byte seed). Its `Debug` never shows it.
#[derive(Clone)]
pub struct SecretKey(ed25519_compact::KeyPair);

impl SecretKey {
    /// The key for a 32-byte seed (from the operating system's generator).
    pub fn from_seed(seed: [u8; 32]) -> SecretKey {
        SecretKey(ed25519_compact::KeyPair::from_seed(
            ed25519_compact::Seed::new(seed),
        ))
    }

    /// Parses the contents of a secret key file (one line, see the module doc).
    pub fn parse_file(text: &str) -> Result<SecretKey> {
        let b64 =
            text.trim_ascii()
                .strip_prefix(SECRET_KEY_PREFIX)
                .ok_or_else(|| {
                    Error::new(
                ErrorKind::InvalidInput,
                format!("secret key file must hold one line starting with \"{SECRET_KEY_PREFIX}\""),
            )
                })?;
        Ok(SecretKey::from_seed(decode_fixed::<32>(b64, "secret key")?))
    }

    /// The contents of a secret key file for this key.
    pub fn to_file(&self) -> String {
        format!("{SECRET_KEY_PREFIX}{}\n", b64::encode(&*self.0.sk.seed()))
    }

    /// The public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(*self.0.pk)
    }

    /// Signs `message` as is (64 bytes).
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        *self.0.sk.sign(message, None)
    }

    /// Signs `domain ‖ message`, as base64 ([`SIGNATURE_B64_LEN`] characters).
    pub fn sign_b64(&self, domain: &[u8], message: &[u8]) -> String {
        let mut m = Vec::with_capacity(domain.len() + message.len());
        m.extend_from_slice(domain);
        m.extend_from_slice(message);
        b64::encode(&self.sign(&m))
    }
}

/// Two secret keys are equal when their public keys are.
impl PartialEq for SecretKey {
    fn eq(&self, other: &Self) -> bool {
        self.public() == other.public()
    }
}

impl Eq for SecretKey {}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({})", self.public())
    }
}

/// SHA-256 of `bytes` as 64 lowercase hex digits.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// An incremental SHA-256, for objects that arrive in pieces.
#[derive(Clone, Default)]
pub struct Sha256Stream(Sha256);

impl Sha256Stream {
    /// A new, empty hash.
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    /// The digest as 64 lowercase hex digits.
    pub fn finish_hex(self) -> String {
        hex(&self.0.finalize())
    }
}

impl fmt::Debug for Sha256Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sha256Stream")
    }
}

/// Whether `s` is a digest as written in the catalog (64 lowercase hex digits).
pub fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn hex(bytes: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(D[(b >> 4) as usize] as char);
        s.push(D[(b & 15) as usize] as char);
    }
    s
}

fn decode_fixed<const N: usize>(text: &str, what: &str) -> Result<[u8; N]> {
    // Base64 of N bytes is at most 4 * ceil(N / 3) characters: check before decoding.
    if text.len() != N.div_ceil(3) * 4 {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("{what} must be {N} bytes in base64 (padded)"),
        ));
    }
    let v = b64::decode(text.as_bytes()).map_err(|e| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("{what} is not valid base64: {e}"),
        )
    })?;
    v.try_into()
        .map_err(|_| Error::new(ErrorKind::InvalidInput, format!("{what} must be {N} bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_sign() {
        let sk = SecretKey::from_seed([7; 32]);
        let file = sk.to_file();
        assert!(file.starts_with(SECRET_KEY_PREFIX) && file.ends_with('\n'));
        let sk2 = SecretKey::parse_file(&file).unwrap();
        assert_eq!(sk.public(), sk2.public());
        let pk_text = sk.public().to_string();
        assert_eq!(pk_text.len(), PUBLIC_KEY_PREFIX.len() + 44);
        let pk = PublicKey::parse(&pk_text).unwrap();
        assert_eq!(pk, sk.public());
        let sig = sk.sign_b64(HEAD_DOMAIN, b"hello");
        assert_eq!(sig.len(), SIGNATURE_B64_LEN);
        assert!(pk.verify_b64(HEAD_DOMAIN, b"hello", &sig));
        assert!(!pk.verify_b64(PAGE_DOMAIN, b"hello", &sig));
        assert!(!pk.verify_b64(HEAD_DOMAIN, b"hellp", &sig));
        assert!(!pk.verify_b64(HEAD_DOMAIN, b"hello", "not base64"));
        let other = SecretKey::from_seed([8; 32]).public();
        assert!(!other.verify_b64(HEAD_DOMAIN, b"hello", &sig));
    }

    #[test]
    fn bad_key_text_is_rejected_with_a_clear_error() {
        for bad in [
            "",
            "ed25519:",
            "rsa:AAAA",
            "ed25519:AAAA",
            "ed25519:!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!=",
        ] {
            let e = PublicKey::parse(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}");
        }
        assert!(SecretKey::parse_file("ed25519:AAAA").is_err());
        assert!(SecretKey::parse_file("walcast-ed25519-secret:AAAA").is_err());
    }

    #[test]
    fn keys_of_small_order_are_refused() {
        // libsodium's list, each also with the sign bit set.
        let listed: Vec<[u8; 32]> = [
            "0000000000000000000000000000000000000000000000000000000000000000",
            "0100000000000000000000000000000000000000000000000000000000000000",
            "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
            "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
            "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
            "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
            "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        ]
        .iter()
        .map(|h| {
            let mut b = [0u8; 32];
            for (i, o) in b.iter_mut().enumerate() {
                *o = u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap();
            }
            b
        })
        .collect();
        for b in &listed {
            for sign in [0u8, 0x80] {
                let mut k = *b;
                k[31] |= sign;
                assert!(has_small_order(&k), "{k:02x?}");
                // ed25519-compact refuses each of them too.
                assert!(ed25519_compact::PublicKey::new(k).validate().is_err());
                let text = format!("{PUBLIC_KEY_PREFIX}{}", b64::encode(&k));
                let e = PublicKey::parse(&text).unwrap_err();
                assert!(e.message().contains("small order"), "{e}");
            }
        }
        for n in 1..=255u8 {
            assert!(!has_small_order(
                &SecretKey::from_seed([n; 32]).public().to_bytes()
            ));
        }
    }

    #[test]
    fn a_signature_check_is_the_verification_it_names() {
        let sk = SecretKey::from_seed([3; 32]);
        let sig = sk.sign_b64(PAGE_DOMAIN, b"page bytes");
        let c = SignatureCheck::new(&sk.public(), PAGE_DOMAIN, b"page bytes", &sig).unwrap();
        assert!(c.verify());
        assert_eq!(c.message, [PAGE_DOMAIN, b"page bytes"].concat());
        let other = SignatureCheck::new(&sk.public(), HEAD_DOMAIN, b"page bytes", &sig).unwrap();
        assert!(!other.verify());
        assert_ne!(c.id, other.id);
        assert!(SignatureCheck::new(&sk.public(), PAGE_DOMAIN, b"x", "AAAA").is_none());
    }

    #[test]
    fn digests() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut s = Sha256Stream::new();
        s.update(b"a");
        s.update(b"bc");
        assert_eq!(s.finish_hex(), sha256_hex(b"abc"));
        assert!(is_digest(&sha256_hex(b"")));
        assert!(!is_digest("ABC"));
    }
}
