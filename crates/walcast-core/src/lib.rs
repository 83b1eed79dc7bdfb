//! # walcast-core
//!
//! The formats and pure state machines of walcast, which replicates a
//! database's write-ahead log through object storage to read replicas at the
//! edge, in browsers and in native processes.
//!
//! This crate does no IO, reads no clock and has no randomness of its own:
//! every input carries `now` (milliseconds) and seeds come from the caller,
//! so the same inputs always give the same outputs. It builds for
//! `wasm32-unknown-unknown` with no host imports.
//!
//! - Formats ([`segment`], [`batch`], [`snapshot`], [`catalog`]) as specified
//!   byte by byte in `docs/FORMAT.md`. Decoders never panic and never allocate
//!   from a length they have not checked against the bytes present.
//! - [`keys`]: Ed25519 keys, signatures and SHA-256 digests of signed
//!   datasets (and of access tokens).
//! - [`state::KvState`]: the compact ordered key/value state a replica serves.
//! - [`replica::Replica`]: the replay machine. It asks for GETs
//!   ([`replica::Action::Fetch`]), verifies what comes back, and applies
//!   batches in dense LSN order.
//! - [`publisher::Publisher`]: the commit machine. It claims the dataset,
//!   seals and uploads segments, and commits the head with compare-and-swap.
//! - [`Error`] / [`ErrorKind`]: detailed errors that name the object and LSN,
//!   and a small stable kind that says what the caller should do.
//!
//! Cargo feature `gzip` (on by default; flate2, pure Rust): heads stored
//! gzip-compressed are read ([`catalog::head_json`], in [`catalog::Head::decode`])
//! and written ([`publisher::PublisherConfig::head_gzip`]). The wasm module
//! goes without it; its JS driver decodes such heads before handing them over.
//!
//! Drivers (the native publisher, the async replica client, the wasm
//! bindings) perform the requests these machines ask for and feed the
//! responses back; after every input they drain `poll(now)` until it returns
//! `Wait`.

pub mod b64;
pub mod batch;
pub mod catalog;
mod codec;
mod crc;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod io;
pub mod keys;
mod overlay;
pub mod publisher;
pub mod replica;
mod rng;
pub mod segment;
pub mod snapshot;
pub mod state;
pub mod token;
mod trust;
mod vecmap;

pub use error::{DecodeError, Error, ErrorKind, Result};
