//! Secret key files on disk: `walcast keygen` writes one, `walcast publish
//! --signing-key` (and access tokens) read one. The bytes are
//! [`walcast_core::keys`]'s secret key file format.

use std::io::Write as _;
use std::path::Path;

use anyhow::{bail, Context, Result};
use walcast_core::keys::{PublicKey, SecretKey};

/// Draws a new Ed25519 key from the operating system's generator and writes
/// it to `out` (created with mode 0600; an existing file is never
/// overwritten). Returns its public key.
pub fn generate(out: &Path) -> Result<PublicKey> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)
        .map_err(|e| anyhow::anyhow!("drawing a key from the operating system: {e}"))?;
    let key = SecretKey::from_seed(seed);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = match opts.open(out) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            bail!(
                "{} already exists; a key file is never overwritten",
                out.display()
            )
        }
        Err(e) => return Err(e).with_context(|| format!("creating {}", out.display())),
    };
    f.write_all(key.to_file().as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(key.public())
}

/// Reads a secret key file written by [`generate`].
pub fn read_secret_key(path: &Path) -> Result<SecretKey> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if meta.len() > 4096 {
        bail!(
            "{} is not a walcast secret key file (too large)",
            path.display()
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    SecretKey::parse_file(&text).with_context(|| format!("secret key file {}", path.display()))
}
