//! walcast-core: formats and pure state machines
#![allow(missing_docs)]
pub mod batch;
pub mod catalog;
mod codec;
pub mod error;
pub mod io;
pub mod publisher;
pub mod replica;
mod rng;
pub mod segment;
pub mod snapshot;
pub mod state;
pub use error::{DecodeError, Error, ErrorKind, Result};
pub fn x() {}
