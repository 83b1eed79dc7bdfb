//! The golden access token (`tests/golden/token.txt`): the exact text
//! `walcast token` issues for a fixed key, prefix and time (Ed25519
//! signatures are deterministic), and that it verifies. The worker's
//! WebCrypto verifier checks the same file. Rewrite it (only for an
//! intended format change, with a new version) with
//! `WALCAST_BLESS=1 cargo test -p walcast-core --test golden_token`.

use std::path::PathBuf;

use walcast_core::keys::SecretKey;
use walcast_core::token;

#[test]
fn golden_token() {
    let key = SecretKey::from_seed([1; 32]);
    let issued = token::issue(&key, "app", 1000, 3600);
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/token.txt");
    if std::env::var_os("WALCAST_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, format!("{}\n{issued}\n", key.public())).unwrap();
    }
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines = text.lines();
    let public = lines.next().expect("the public key line");
    let golden = lines.next().expect("the token line");
    assert_eq!(public, key.public().to_string(), "the golden key changed");
    assert_eq!(
        golden, issued,
        "the token format changed: this breaks tokens already issued"
    );
    let claims = token::verify_for(
        golden,
        &[public.parse().unwrap()],
        4599,
        "app/catalog/head.json",
    )
    .unwrap();
    assert_eq!(
        (claims.prefix.as_str(), claims.iat, claims.exp),
        ("app", 1000, 4600)
    );
    assert_eq!(
        token::verify(golden, &public.parse().unwrap(), 4600)
            .unwrap_err()
            .code(),
        "expired"
    );
}
