//! CRC-32 (the ISO-HDLC polynomial of zlib and `crc32fast`) for every
//! checksum in the formats.
//!
//! Native builds use `crc32fast` (SIMD where the CPU has it, else
//! slicing-by-16). The wasm32 build uses the `crc` crate's slicing-by-16
//! instead, with its 16 KiB of tables computed once at run time rather than
//! shipped: `crc32fast`'s portable path carries them in the module, where
//! they do not compress (about 16 KB of the gzipped module), and wasm has no
//! CRC instructions to use. The checksums are the same bytes either way
//! (tested below against `crc32fast`).

#[cfg(not(target_arch = "wasm32"))]
pub(crate) use crc32fast::{hash, Hasher};

#[cfg(any(target_arch = "wasm32", test))]
mod small {
    use std::sync::OnceLock;

    /// CRC-32/ISO-HDLC, slicing-by-16.
    type Crc32 = crc::Crc<u32, crc::Table<16>>;

    /// Built on first use: `Crc::new` is a `const fn`, but calling it here,
    /// at run time, keeps its 16 KiB of tables out of the module's data.
    static CRC32: OnceLock<Crc32> = OnceLock::new();

    fn crc32() -> &'static Crc32 {
        CRC32.get_or_init(|| Crc32::new(&crc::CRC_32_ISO_HDLC))
    }

    /// The CRC-32 of `bytes`.
    pub(crate) fn hash(bytes: &[u8]) -> u32 {
        crc32().checksum(bytes)
    }

    /// An incremental CRC-32, with the calls of `crc32fast::Hasher`.
    #[derive(Clone)]
    pub(crate) struct Hasher(crc::Digest<'static, u32, crc::Table<16>>);

    impl Hasher {
        /// A hasher over no bytes yet.
        pub(crate) fn new() -> Self {
            Hasher(crc32().digest())
        }

        /// Adds `bytes`.
        pub(crate) fn update(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }

        /// The CRC-32 of every byte added.
        pub(crate) fn finalize(self) -> u32 {
            self.0.finalize()
        }
    }

    impl std::fmt::Debug for Hasher {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Hasher")
        }
    }
}

#[cfg(target_arch = "wasm32")]
pub(crate) use small::{hash, Hasher};

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn small_table_matches_crc32fast(bytes in proptest::collection::vec(any::<u8>(), 0..4096), cut in 0usize..4096) {
            prop_assert_eq!(super::small::hash(&bytes), crc32fast::hash(&bytes));
            let cut = cut.min(bytes.len());
            let mut h = super::small::Hasher::new();
            h.update(&bytes[..cut]);
            let mut g = h.clone();
            g.update(&bytes[cut..]);
            prop_assert_eq!(g.finalize(), crc32fast::hash(&bytes));
        }
    }

    #[test]
    fn check_value() {
        assert_eq!(super::small::hash(b"123456789"), 0xcbf4_3926);
    }
}
