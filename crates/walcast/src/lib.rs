//! walcast, native side: the local WAL [`wal::Writer`], the publisher on
//! object storage ([`publish`]), the native replica ([`replica`]) and the
//! `walcast` binary.

pub mod counting;
pub mod demo;
pub mod inspect;
pub mod publish;
pub mod replica;
pub mod serve;
pub mod store;
pub mod wal;
