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

/// Reads a secret key file written by [`generate`]. Each way of giving the
/// wrong file (none there, a public key, something else) is one line that
/// says which file to give.
pub fn read_secret_key(path: &Path) -> Result<SecretKey> {
    let shown = path.display();
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{shown}: no such key file: create one with `walcast keygen --out {shown}`, \
             or give the file it wrote"
        ),
        Err(e) => return Err(e).with_context(|| format!("reading {shown}")),
    };
    let not_a_key = |what: &str| {
        anyhow::anyhow!(
            "{shown} is not a walcast secret key file ({what}): give the file \
             `walcast keygen --out FILE` wrote (one line starting with \"{}\")",
            walcast_core::keys::SECRET_KEY_PREFIX
        )
    };
    if !meta.is_file() {
        return Err(not_a_key("not a regular file"));
    }
    if meta.len() > 4096 {
        return Err(not_a_key("too large"));
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {shown}"))?;
    let text = String::from_utf8(bytes).map_err(|_| not_a_key("not text"))?;
    if PublicKey::parse(&text).is_ok() {
        bail!(
            "{shown} holds a public key (ed25519:…), which verifies but cannot sign: give the \
             secret key file `walcast keygen --out FILE` wrote (its public key goes to readers' \
             --trust, or to `walcast serve --verify-key` for tokens)"
        );
    }
    let key = SecretKey::parse_file(&text).map_err(|e| not_a_key(e.message()))?;
    // Anyone who can write the file can swap the key (`keygen` writes it
    // 0600); one others can read is said (a mounted secret is often 0644).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o022 != 0 {
            bail!(
                "{shown} is writable by others (mode {mode:04o}): anyone who can write it \
                 can change the key; `chmod 600 {shown}`"
            );
        }
        if mode & 0o044 != 0 {
            tracing::warn!("{shown} is readable by others (mode {mode:04o}): `chmod 600 {shown}`");
        }
    }
    Ok(key)
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    /// A key file others can write is refused, naming its mode; one others
    /// can only read is used (a warning says so).
    #[test]
    fn a_key_file_others_can_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        let public = generate(&path).unwrap();
        let set = |mode| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode));
        set(0o666).unwrap();
        let err = format!("{:#}", read_secret_key(&path).unwrap_err());
        assert!(err.contains("writable by others (mode 0666)"), "{err}");
        set(0o620).unwrap();
        assert!(read_secret_key(&path).is_err());
        set(0o644).unwrap();
        assert_eq!(read_secret_key(&path).unwrap().public(), public);
        set(0o600).unwrap();
        assert_eq!(read_secret_key(&path).unwrap().public(), public);
    }
}
