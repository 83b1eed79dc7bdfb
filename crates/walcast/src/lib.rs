//! walcast, native side: the local WAL [`wal::Writer`], the publisher on
//! object storage ([`publish`]), the native replica ([`replica`]), an
//! in-memory replica handle for apps ([`handle`]), lazy reads of a remote
//! dataset ([`lazy`]) and the `walcast` binary.

pub mod counting;
pub mod demo;
pub mod handle;
pub mod inspect;
pub mod lazy;
pub mod publish;
pub mod replica;
pub mod serve;
pub mod store;
pub mod wal;
