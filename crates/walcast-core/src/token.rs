//! Access tokens: read-only, expiring, prefix-scoped credentials signed with
//! Ed25519 (`walcast token`, checked by `walcast serve --verify-key` and by
//! the worker's `AUTH_KEY`).
//!
//! A token is ASCII text safe in a header and in a query parameter:
//!
//! ```text
//! wct1.<claims>.<signature>
//! ```
//!
//! - `claims`: base64url without padding of a JSON object with exactly the
//!   fields `scope` (`"read"`), `prefix` (a dataset prefix such as `"app"`,
//!   no leading or trailing `/`; `""` for everything), `iat` and `exp`
//!   (Unix seconds: issued at, expires at).
//! - `signature`: base64url without padding of the 64-byte Ed25519
//!   signature over [`TOKEN_DOMAIN`] followed by the ASCII bytes of `claims`
//!   as they appear in the token.
//!
//! A token grants GETs of objects whose path (relative to what the server
//! serves, without a leading `/`) equals its prefix or starts with the
//! prefix followed by `/`, while `now < exp`. Verification checks, in this
//! order: the shape and size, the signature (before the claims are even
//! decoded), the claims, the expiry, the prefix. See `docs/FORMAT.md`,
//! "Access tokens".

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::keys::{PublicKey, SecretKey};

/// Domain string that starts the message a token signature covers.
pub const TOKEN_DOMAIN: &[u8] = b"walcast-token-v1\0";
/// The text every token starts with (its format version).
pub const TOKEN_PREFIX: &str = "wct1.";
/// The longest token accepted (bytes); longer input is malformed, unread.
pub const MAX_TOKEN_LEN: usize = 2048;
/// The only scope there is: read-only.
pub const SCOPE_READ: &str = "read";
/// How far (seconds) a token's `iat` may be ahead of the verifier's clock:
/// a token issued later than that is refused as `not_yet_valid`.
pub const MAX_CLOCK_SKEW: u64 = 300;

/// What a token grants.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// Always [`SCOPE_READ`].
    pub scope: String,
    /// The dataset prefix the token reads (`""`: everything).
    pub prefix: String,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Expires at, Unix seconds (valid while `now < exp`).
    pub exp: u64,
}

/// Why a token was refused. The text never repeats the token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenError {
    /// Not a token: wrong shape, size, encoding or claims.
    Malformed(String),
    /// The signature does not verify with the key.
    BadSignature,
    /// `now >= exp`.
    Expired {
        /// The token's `exp`.
        exp: u64,
        /// The time it was checked at.
        now: u64,
    },
    /// `iat` is more than [`MAX_CLOCK_SKEW`] seconds after the time it was
    /// checked at: issued by a clock far ahead, or forged ahead of time.
    NotYetValid {
        /// The token's `iat`.
        iat: u64,
        /// The time it was checked at.
        now: u64,
    },
    /// The object is outside the token's prefix.
    WrongPrefix {
        /// The token's prefix.
        prefix: String,
        /// The path asked for.
        path: String,
    },
}

impl TokenError {
    /// A short stable code: `malformed`, `bad_signature`, `expired`,
    /// `not_yet_valid`, `wrong_prefix`.
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Malformed(_) => "malformed",
            TokenError::BadSignature => "bad_signature",
            TokenError::Expired { .. } => "expired",
            TokenError::NotYetValid { .. } => "not_yet_valid",
            TokenError::WrongPrefix { .. } => "wrong_prefix",
        }
    }
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::Malformed(why) => write!(f, "malformed token: {why}"),
            TokenError::BadSignature => f.write_str("token signature does not verify"),
            TokenError::Expired { exp, now } => {
                write!(f, "token expired at {exp} (now {now}, Unix seconds)")
            }
            TokenError::NotYetValid { iat, now } => write!(
                f,
                "token issued at {iat}, later than now ({now}, Unix seconds) by more than {MAX_CLOCK_SKEW} s"
            ),
            TokenError::WrongPrefix { prefix, path } => {
                write!(f, "token for prefix {prefix:?} does not cover {path:?}")
            }
        }
    }
}

impl std::error::Error for TokenError {}

/// The largest `iat` or `exp` a token may carry: 2^53 - 1, the largest
/// integer a JSON number holds exactly in JS.
const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// A prefix as tokens hold it: without leading or trailing `/`.
pub fn normalize_prefix(prefix: &str) -> String {
    prefix.trim_matches('/').to_string()
}

/// Whether `prefix` (normalized) covers `path` (relative, without a leading
/// `/`): equal, or `path` continues with `/` after it. `""` covers every path.
pub fn prefix_covers(prefix: &str, path: &str) -> bool {
    let path = path.trim_start_matches('/');
    prefix.is_empty()
        || path == prefix
        || (path.len() > prefix.len()
            && path.starts_with(prefix)
            && path.as_bytes()[prefix.len()] == b'/')
}

/// Issues a read token for `prefix` valid from `now` for `ttl_secs` seconds.
pub fn issue(key: &SecretKey, prefix: &str, now: u64, ttl_secs: u64) -> String {
    let claims = Claims {
        scope: SCOPE_READ.to_string(),
        prefix: normalize_prefix(prefix),
        iat: now,
        exp: now.saturating_add(ttl_secs),
    };
    // Serializing this struct cannot fail (strings and integers only).
    let json = serde_json::to_vec(&claims).unwrap_or_default();
    let body = URL_SAFE_NO_PAD.encode(json);
    let mut msg = TOKEN_DOMAIN.to_vec();
    msg.extend_from_slice(body.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(key.sign(&msg));
    format!("{TOKEN_PREFIX}{body}.{sig}")
}

/// Verifies `token` with `key` at `now` (Unix seconds): its shape, its
/// signature, its claims and its expiry. Returns the claims; the caller
/// checks the prefix (or use [`verify_for`]).
pub fn verify(token: &str, key: &PublicKey, now: u64) -> Result<Claims, TokenError> {
    verify_any(token, std::slice::from_ref(key), now)
}

/// [`verify`] with any of `keys` (key rotation: the old and the new key
/// during the overlap).
pub fn verify_any(token: &str, keys: &[PublicKey], now: u64) -> Result<Claims, TokenError> {
    let malformed = |why: &str| TokenError::Malformed(why.to_string());
    if token.len() > MAX_TOKEN_LEN {
        return Err(malformed("longer than 2048 bytes"));
    }
    let rest = token
        .strip_prefix(TOKEN_PREFIX)
        .ok_or_else(|| malformed("does not start with \"wct1.\""))?;
    let (body, sig) = rest
        .split_once('.')
        .ok_or_else(|| malformed("not three dot-separated parts"))?;
    if body.is_empty() || sig.contains('.') {
        return Err(malformed("not three dot-separated parts"));
    }
    let sig: [u8; 64] = URL_SAFE_NO_PAD
        .decode(sig)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| malformed("signature is not 64 bytes of base64url"))?;
    let mut msg = TOKEN_DOMAIN.to_vec();
    msg.extend_from_slice(body.as_bytes());
    if !keys.iter().any(|k| k.verify(&msg, &sig)) {
        return Err(TokenError::BadSignature);
    }
    let json = URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| malformed("claims are not base64url"))?;
    let claims: Claims =
        serde_json::from_slice(&json).map_err(|e| TokenError::Malformed(format!("claims: {e}")))?;
    if claims.scope != SCOPE_READ {
        return Err(TokenError::Malformed(format!(
            "scope {:?} is not \"read\"",
            claims.scope
        )));
    }
    if claims.prefix != normalize_prefix(&claims.prefix) {
        return Err(malformed("prefix starts or ends with '/'"));
    }
    // JSON numbers a JS verifier (the worker's) reads exactly: both
    // verifiers take the same tokens.
    if claims.iat > MAX_SAFE_INTEGER || claims.exp > MAX_SAFE_INTEGER {
        return Err(malformed("iat or exp above 2^53 - 1"));
    }
    if now >= claims.exp {
        return Err(TokenError::Expired {
            exp: claims.exp,
            now,
        });
    }
    if claims.iat > now.saturating_add(MAX_CLOCK_SKEW) {
        return Err(TokenError::NotYetValid {
            iat: claims.iat,
            now,
        });
    }
    Ok(claims)
}

/// Verifies `token` for reading `path` (relative to what is served): as
/// [`verify_any`], then the prefix.
pub fn verify_for(
    token: &str,
    keys: &[PublicKey],
    now: u64,
    path: &str,
) -> Result<Claims, TokenError> {
    let claims = verify_any(token, keys, now)?;
    if !prefix_covers(&claims.prefix, path) {
        return Err(TokenError::WrongPrefix {
            prefix: claims.prefix,
            path: path.trim_start_matches('/').to_string(),
        });
    }
    Ok(claims)
}

/// Parses a duration such as `90s`, `15m`, `1h`, `7d` (or plain seconds) into seconds.
pub fn parse_ttl(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad duration {text:?}: use e.g. 90s, 15m, 1h, 7d"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("bad duration {text:?}: use e.g. 90s, 15m, 1h, 7d")),
    };
    let secs = n
        .checked_mul(mult)
        .ok_or_else(|| format!("duration {text:?} is too long"))?;
    if secs == 0 {
        return Err(format!("duration {text:?} must be positive"));
    }
    // (Its expiry must stay within what a token may carry.)
    if secs > 1 << 52 {
        return Err(format!("duration {text:?} is too long"));
    }
    Ok(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed([n; 32])
    }

    #[test]
    fn issue_and_verify() {
        let k = key(1);
        let t = issue(&k, "/app/", 1000, 3600);
        assert!(t.starts_with(TOKEN_PREFIX));
        assert!(t
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)));
        let c = verify(&t, &k.public(), 1000).unwrap();
        assert_eq!(c.prefix, "app");
        assert_eq!((c.iat, c.exp), (1000, 4600));
        verify_for(&t, &[k.public()], 4599, "app/catalog/head.json").unwrap();
        verify_for(&t, &[k.public()], 4599, "/app").unwrap();
    }

    #[test]
    fn every_refusal() {
        let k = key(1);
        let t = issue(&k, "app", 1000, 60);
        let pk = [k.public()];
        assert_eq!(
            verify_for(&t, &pk, 1060, "app/x").unwrap_err(),
            TokenError::Expired {
                exp: 1060,
                now: 1060
            }
        );
        // Issued more than the clock skew allows ahead of the verifier.
        assert_eq!(
            verify_for(&t, &pk, 699, "app/x").unwrap_err(),
            TokenError::NotYetValid {
                iat: 1000,
                now: 699
            }
        );
        verify_for(&t, &pk, 700, "app/x").unwrap();
        assert_eq!(
            verify_for(&t, &pk, 1000, "apple/catalog/head.json")
                .unwrap_err()
                .code(),
            "wrong_prefix"
        );
        assert_eq!(
            verify_for(&t, &pk, 1000, "other/x").unwrap_err().code(),
            "wrong_prefix"
        );
        assert_eq!(
            verify(&t, &key(2).public(), 1000).unwrap_err(),
            TokenError::BadSignature
        );
        // A claim changed after signing.
        let forged_claims = URL_SAFE_NO_PAD
            .encode(br#"{"scope":"read","prefix":"","iat":1000,"exp":1060}"#.as_slice());
        let sig = t.rsplit('.').next().unwrap();
        let forged = format!("{TOKEN_PREFIX}{forged_claims}.{sig}");
        assert_eq!(
            verify(&forged, &pk[0], 1000).unwrap_err(),
            TokenError::BadSignature
        );
        for bad in [
            "",
            "wct1.",
            "wct2.a.b",
            "wct1.abc",
            "wct1..sig",
            "wct1.a.b.c",
            "wct1.a.!!!",
            &"x".repeat(5000),
        ] {
            assert_eq!(
                verify(bad, &pk[0], 1000).unwrap_err().code(),
                "malformed",
                "{bad:?}"
            );
        }
        // Signed, but not claims walcast knows.
        let sign = |claims: &[u8]| {
            let body = URL_SAFE_NO_PAD.encode(claims);
            let mut m = TOKEN_DOMAIN.to_vec();
            m.extend_from_slice(body.as_bytes());
            format!(
                "{TOKEN_PREFIX}{body}.{}",
                URL_SAFE_NO_PAD.encode(k.sign(&m))
            )
        };
        for claims in [
            br#"{"scope":"write","prefix":"","iat":1,"exp":9999}"#.as_slice(),
            br#"{"scope":"read","prefix":"","iat":1,"exp":9999,"admin":true}"#,
            br#"{"scope":"read","prefix":"/a","iat":1,"exp":9999}"#,
            br#"{"scope":"read","prefix":""}"#,
            b"not json",
            // Past what the worker's JS reads exactly: refused by both.
            br#"{"scope":"read","prefix":"","iat":1,"exp":9007199254740992}"#,
            br#"{"scope":"read","prefix":"","iat":9007199254740992,"exp":1}"#,
            br#"{"scope":"read","prefix":"","iat":1,"exp":18446744073709551615}"#,
        ] {
            assert_eq!(
                verify(&sign(claims), &pk[0], 1000).unwrap_err().code(),
                "malformed"
            );
        }
        // Rotation: either key verifies.
        let both = [key(2).public(), k.public()];
        verify_any(&t, &both, 1000).unwrap();
    }

    #[test]
    fn prefixes_and_ttls() {
        assert!(prefix_covers("", "anything"));
        assert!(prefix_covers("a/b", "a/b/c"));
        assert!(!prefix_covers("a/b", "a/bc"));
        assert!(!prefix_covers("a/b", "a"));
        assert_eq!(parse_ttl("1h"), Ok(3600));
        assert_eq!(parse_ttl("90"), Ok(90));
        assert_eq!(parse_ttl("15m"), Ok(900));
        assert_eq!(parse_ttl("7d"), Ok(604_800));
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("1y").is_err());
        assert!(parse_ttl("h").is_err());
        assert!(parse_ttl("99999999999999999999d").is_err());
    }
}
