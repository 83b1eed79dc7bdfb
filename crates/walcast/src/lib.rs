//! walcast, native side: read replicas fed from object storage, for Rust
//! apps and for the `walcast` binary.
//!
//! The embedding API:
//! - [`Replica::open`] holds a replica of a dataset in memory (full, or lazy
//!   with a byte-bounded block cache) and follows it in the background:
//!   `get`, `scan`, `status`, `wait_for`, `subscribe`, `close`.
//! - [`Writer`] commits KV batches durably to a local WAL, and
//!   [`Publisher::spawn`] publishes that WAL to object storage from the same
//!   process, reporting every committed LSN.
//!
//! Both speak to any dataset URL: `file://`, `s3://`, `gs://`, `az://`,
//! `memory://` (publish and read) and `http(s)://` (read: `walcast serve`,
//! a bucket website, a CDN).
//!
//! A whole round trip in a temporary directory: write, publish, read.
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use walcast::{PublishOptions, Publisher, Replica, ReplicaOptions, Writer};
//! use walcast_core::batch::Op;
//!
//! let tmp = tempfile::tempdir()?;
//! let wal = tmp.path().join("wal");
//! let url = url::Url::from_directory_path(tmp.path().join("dataset")).unwrap();
//!
//! let writer = Writer::open(&wal)?;
//! let publisher = Publisher::spawn(&wal, url.as_str(), PublishOptions::default())?;
//! writer.commit(&[Op::put(b"user:1".to_vec(), b"Ada".to_vec())])?;
//! let lsn = writer.commit(&[Op::put(b"user:2".to_vec(), b"Grace".to_vec())])?;
//! publisher.wait_for(lsn, Duration::from_secs(30)).await?;
//!
//! let replica = Replica::open(url.as_str(), ReplicaOptions::default()).await?;
//! assert_eq!(replica.get(b"user:2").await?.as_deref(), Some(&b"Grace"[..]));
//! assert_eq!(replica.scan_prefix(b"user:", 10).await?.len(), 2);
//! assert_eq!(replica.status().applied_lsn, lsn);
//!
//! // Read-your-writes: a new commit, awaited on the replica.
//! let lsn = writer.commit(&[Op::delete(b"user:1".to_vec())])?;
//! replica.wait_for(lsn, Duration::from_secs(30)).await?;
//! assert_eq!(replica.get(b"user:1").await?, None);
//!
//! replica.close().await;
//! publisher.stop().await?;
//! # Ok(()) }
//! ```
//!
//! The modules below are the parts the binary is made of: the WAL
//! ([`wal`]), the publish loop ([`publish`]), the replica with a local
//! directory ([`replica`]), the handle every native replica runs on
//! ([`handle`]: `walcast replicate`, `walcast get/scan --from` and apps),
//! `walcast serve` ([`serve`]), `walcast inspect` ([`inspect`]).

pub mod counting;
pub mod demo;
pub mod handle;
pub mod hints;
pub mod inspect;
pub mod keyfile;
pub mod longpoll;
pub mod metrics;
pub mod publish;
pub mod publisher;
pub mod replica;
pub mod serve;
pub mod store;
pub mod wal;

pub use handle::{FetchStats, ReplicaHandle as Replica, ReplicaOptions};
pub use publish::{Fenced, PublishOptions, PublishReport};
pub use publisher::Publisher;
pub use wal::Writer;
pub use walcast_core::replica::{Entries, Status};
