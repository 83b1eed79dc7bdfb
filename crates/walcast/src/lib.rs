//! walcast, native side: the local WAL [`wal::Writer`], the publisher on
//! object storage, the native replica and the `walcast` binary.

pub mod serve;
