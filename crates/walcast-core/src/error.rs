//! Errors in two levels: a detailed [`DecodeError`] / [`Error`] for
//! diagnostics, and a small, stable [`ErrorKind`] that says what the caller
//! should do.

use std::fmt;

/// What kind of failure happened, and therefore what the caller should do.
///
/// This is the stable, public classification; JS sees it as `error.code`
/// (see [`ErrorKind::code`]). New kinds may be added.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Bytes failed verification or could not be decoded (checksum mismatch,
    /// truncated or malformed object). Nothing from them was applied. Retrying
    /// may help when a cache served a bad copy; otherwise the published data
    /// is damaged and an operator must look at the named object.
    Data,
    /// The store or network failed transiently (5xx, timeout, connection
    /// reset). Retry with backoff; the replica keeps serving its last state.
    Unavailable,
    /// This publisher lost the dataset to a newer epoch. Stop publishing for
    /// good: another publisher owns the dataset now.
    Fenced,
    /// The caller passed something invalid (bad URL, bad option, malformed
    /// input line). Fix the input; retrying the same call will fail again.
    InvalidInput,
    /// An object the protocol needs is absent (no catalog at the URL, or an
    /// object the catalog still names). Check the URL; replicas re-read the
    /// head and carry on by themselves when retention removed it.
    NotFound,
    /// A replica that pins trusted keys met a head that is unsigned, signed
    /// by a key it does not trust, wrongly signed, older than a signed head
    /// it already applied, or an object whose digest differs from the one
    /// its signed head records. Nothing from it was applied; the replica
    /// keeps serving its last good state and retries.
    Untrusted,
}

impl ErrorKind {
    /// Stable string code of this kind, as exposed to JS and in JSON output.
    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::Data => "data",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Fenced => "fenced",
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Untrusted => "untrusted",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A detailed decoding failure, with the byte offset where it was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Fewer bytes than the format requires.
    #[error("truncated {what} at byte {at}: need {need} bytes, have {have}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Byte offset where it starts.
        at: u64,
        /// Bytes needed.
        need: u64,
        /// Bytes present.
        have: u64,
    },
    /// A magic number did not match.
    #[error(
        "bad magic for {what} at byte {at}: expected {}, found {}",
        Quoted::bytes(expected),
        Quoted::bytes(found)
    )]
    BadMagic {
        /// What was being read.
        what: &'static str,
        /// Byte offset.
        at: u64,
        /// Expected magic.
        expected: [u8; 4],
        /// Found bytes.
        found: [u8; 4],
    },
    /// A version this reader does not know.
    #[error("unsupported {what} version {version} (this reader knows {known})")]
    UnsupportedVersion {
        /// What was being read.
        what: &'static str,
        /// Version found.
        version: u64,
        /// Highest version known.
        known: u64,
    },
    /// Flag bits this reader does not understand.
    #[error("unknown {what} flags {flags:#06x}")]
    UnknownFlags {
        /// What was being read.
        what: &'static str,
        /// The flags found.
        flags: u16,
    },
    /// A checksum mismatch.
    #[error("checksum mismatch in {what} at byte {at}: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// What was being verified.
        what: &'static str,
        /// Byte offset.
        at: u64,
        /// Checksum stored in the data (or the catalog).
        stored: u32,
        /// Checksum computed over the bytes.
        computed: u32,
    },
    /// LSNs were not dense and ascending.
    #[error("LSN out of order at byte {at}: expected {expected}, found {found}")]
    LsnOrder {
        /// Byte offset.
        at: u64,
        /// LSN expected.
        expected: u64,
        /// LSN found.
        found: u64,
    },
    /// A length field above the format's limit.
    #[error("{what} length {len} at byte {at} exceeds the limit {limit}")]
    TooLarge {
        /// What was being read.
        what: &'static str,
        /// Byte offset.
        at: u64,
        /// Length found.
        len: u64,
        /// Limit.
        limit: u64,
    },
    /// Anything else that breaks the format's rules.
    #[error("invalid {what} at byte {at}: {why}")]
    Invalid {
        /// What was being read.
        what: &'static str,
        /// Byte offset.
        at: u64,
        /// Why it is invalid.
        why: String,
    },
    /// The catalog JSON could not be parsed or broke a rule.
    #[error("invalid catalog JSON: {0}")]
    Json(String),
    /// Bytes whose SHA-256 differs from the digest a verified parent (a
    /// signed head, an index) states for them: an `untrusted` error.
    #[error("{what} at byte {at} does not match its SHA-256 digest")]
    Digest {
        /// What was being verified.
        what: &'static str,
        /// Byte offset.
        at: u64,
    },
}

/// A walcast error: a kind, a message, and the object and LSN it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    object: Option<String>,
    lsn: Option<u64>,
    decode: Option<DecodeError>,
}

impl Error {
    /// A new error of `kind` with a human-readable message.
    // Out of line, as are `decode`, `with_object` and `with_lsn`: error
    // paths are cold, and inlined into every decoder and handler they cost
    // the wasm module kilobytes (docs/BENCHMARKS.md).
    #[inline(never)]
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            object: None,
            lsn: None,
            decode: None,
        }
    }

    /// A data error wrapping a decoding failure.
    #[inline(never)]
    pub fn decode(err: DecodeError) -> Self {
        let kind = if matches!(err, DecodeError::Digest { .. }) {
            ErrorKind::Untrusted
        } else {
            ErrorKind::Data
        };
        Error {
            kind,
            message: err.to_string(),
            object: None,
            lsn: None,
            decode: Some(err),
        }
    }

    /// Names the object (key relative to the dataset prefix) this error concerns.
    #[must_use]
    #[inline(never)]
    pub fn with_object(mut self, key: impl Into<String>) -> Self {
        self.object = Some(key.into());
        self
    }

    /// Names the LSN this error concerns.
    #[must_use]
    #[inline(never)]
    pub fn with_lsn(mut self, lsn: u64) -> Self {
        self.lsn = Some(lsn);
        self
    }

    /// The stable classification: what to do about it.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message without object and LSN.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The object key this error concerns, if any.
    pub fn object(&self) -> Option<&str> {
        self.object.as_deref()
    }

    /// The LSN this error concerns, if any.
    pub fn lsn(&self) -> Option<u64> {
        self.lsn
    }

    /// The detailed decoding failure, when this is a data error from a decoder.
    pub fn decode_error(&self) -> Option<&DecodeError> {
        self.decode.as_ref()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)?;
        if let Some(o) = &self.object {
            write!(f, " (object {o}")?;
            if let Some(l) = self.lsn {
                write!(f, ", LSN {l}")?;
            }
            f.write_str(")")?;
        } else if let Some(l) = self.lsn {
            write!(f, " (LSN {l})")?;
        }
        Ok(())
    }
}

/// The decoding detail is part of the message (and available through
/// [`Error::decode_error`]), so it is not repeated as a `source`.
impl std::error::Error for Error {}

impl From<DecodeError> for Error {
    fn from(e: DecodeError) -> Self {
        Error::decode(e)
    }
}

/// Result alias for walcast operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shows a name or bytes that came from the network in double quotes, as
/// error messages name keys: printable ASCII as it is, `"` and `\` escaped,
/// every other byte as `\xNN` (a non-ASCII character shows as its UTF-8
/// bytes). A hostile name can therefore not forge a log line, and the wasm
/// module needs none of the Unicode tables that `{:?}` on a string brings.
pub struct Quoted<'a>(pub &'a [u8]);

impl<'a> Quoted<'a> {
    /// Quotes a string.
    pub fn str(s: &'a str) -> Self {
        Quoted(s.as_bytes())
    }

    /// Quotes bytes.
    pub fn bytes(b: &'a [u8]) -> Self {
        Quoted(b)
    }
}

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write;
        f.write_char('"')?;
        for &b in self.0 {
            match b {
                b'"' | b'\\' => {
                    f.write_char('\\')?;
                    f.write_char(char::from(b))?;
                }
                0x20..=0x7e => f.write_char(char::from(b))?,
                _ => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    f.write_str("\\x")?;
                    f.write_char(char::from(HEX[usize::from(b >> 4)]))?;
                    f.write_char(char::from(HEX[usize::from(b & 15)]))?;
                }
            }
        }
        f.write_char('"')
    }
}

impl fmt::Debug for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::Quoted;

    #[test]
    fn quoted_escapes_everything_outside_printable_ascii() {
        assert_eq!(
            Quoted::str("segments/a.seg").to_string(),
            "\"segments/a.seg\""
        );
        assert_eq!(
            Quoted::str("a\"b\\c\nd\u{1b}[2Jé").to_string(),
            "\"a\\\"b\\\\c\\x0ad\\x1b[2J\\xc3\\xa9\""
        );
        assert_eq!(Quoted::bytes(b"WC\x00\xff").to_string(), "\"WC\\x00\\xff\"");
    }
}
