//! The command line: every command and flag (clap), and the parsers of
//! flag values (durations, sizes, keys).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "walcast",
    version,
    about = "Read replicas at the edge, fed from object storage",
    after_help = "Examples:\n  walcast demo                                   # everything on one machine, one command\n  echo '{\"op\":\"put\",\"key\":\"a\",\"value\":\"1\"}' | walcast write --wal ./wal\n  walcast publish --wal ./wal --to file:///tmp/dataset/\n  walcast serve /tmp/dataset\n  walcast replicate http://127.0.0.1:8787 --local ./replica\n  walcast get --local ./replica a\n  \n  Dataset URLs: file:///ABSOLUTE/DIR/, s3://BUCKET/PREFIX, gs://BUCKET/PREFIX,\n  az://CONTAINER/PREFIX, memory://, and http(s)://HOST/PREFIX for reading.\n  'walcast help COMMAND' shows each command's own examples."
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
    /// S3-compatible endpoint (R2, MinIO, …); same as AWS_ENDPOINT_URL.
    #[arg(long, global = true)]
    pub(crate) endpoint: Option<String>,
    /// Region of the S3 bucket; same as AWS_REGION.
    #[arg(long, global = true)]
    pub(crate) region: Option<String>,
    /// Allow a plain-HTTP endpoint; same as AWS_ALLOW_HTTP=true.
    #[arg(long, global = true)]
    pub(crate) allow_http: bool,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
    /// Commit NDJSON batches from stdin to a local WAL; prints {"lsn":N} per line.
    ///
    /// A line that is not UTF-8 JSON of a batch (or is over 128 MiB) stops
    /// the command with exit 1 and an error naming the line; every line
    /// before it is committed and acknowledged.
    #[command(
        after_help = "Examples:\n  echo '{\"op\":\"put\",\"key\":\"user:1\",\"value\":\"Ada\"}' | walcast write --wal ./wal\n  echo '{\"batch\":[{\"op\":\"put\",\"key\":\"a\",\"value\":\"1\"},{\"op\":\"delete\",\"key\":\"b\"}]}' | walcast write --wal ./wal"
    )]
    Write {
        /// WAL directory.
        #[arg(long)]
        wal: PathBuf,
    },
    /// Publish a local WAL to object storage (file://, s3://, gs://, az://, memory://).
    #[command(
        after_help = "Examples:\n  walcast publish --wal ./wal --to file:///tmp/dataset/\n  AWS_REGION=eu-west-1 walcast publish --wal ./wal --to s3://my-bucket/app\n  walcast publish --wal ./wal --to file:///tmp/dataset/ --once"
    )]
    Publish(PublishArgs),
    /// Serve a file:// dataset over HTTP (Range, ETag, If-None-Match, CORS, Cache-Control).
    #[command(after_help = "Examples:\n  walcast serve /tmp/dataset --addr 127.0.0.1:8787")]
    Serve {
        /// Dataset directory (a path, or its file:// URL).
        dir: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8787")]
        addr: SocketAddr,
        /// Origin whose pages may read the dataset (`https://app.example`);
        /// repeat for more. None given: any origin (`*`).
        #[arg(long = "cors-origin", value_name = "ORIGIN", value_parser = walcast::serve::parse_cors_origin)]
        cors_origins: Vec<String>,
        /// Connections served at once; further ones wait to be accepted.
        #[arg(long, default_value_t = walcast::serve::DEFAULT_MAX_CONNECTIONS, value_parser = parse_max_connections)]
        max_connections: usize,
        /// A request's line and headers must arrive within this long (also
        /// how long a kept-alive connection may wait for its next request).
        #[arg(long, default_value = "10s", value_parser = parse_timeout)]
        header_timeout: Duration,
        /// Close a connection on which nothing was read or written for this long.
        #[arg(long, default_value = "30s", value_parser = parse_timeout)]
        idle_timeout: Duration,
        /// Require an access token (`walcast token`) signed by this key,
        /// `ed25519:<base64>`, in `Authorization: Bearer` or `?token=`;
        /// repeat to accept several keys (a rotation). No wildcard CORS
        /// origin then, unless `--cors-origin '*'` is given.
        #[arg(long = "verify-key", value_name = "ed25519:KEY", value_parser = walcast_core::keys::PublicKey::parse)]
        verify_keys: Vec<walcast_core::keys::PublicKey>,
        /// Hold a conditional head GET with a wait hint (`Prefer: wait=N`
        /// or `?wait=N`) at most this long until the head changes (long-poll);
        /// whole seconds, 0: answer at once.
        #[arg(long, default_value = "60s", value_parser = parse_max_wait)]
        max_wait: Duration,
    },
    /// Follow a dataset into a local replica directory.
    #[command(
        after_help = "Examples:\n  walcast replicate http://127.0.0.1:8787 --local ./replica\n  walcast replicate s3://my-bucket/app --local ./replica --once"
    )]
    Replicate {
        /// Dataset URL: http(s)://, s3://, gs://, az://, file://.
        url: String,
        /// Local replica directory.
        #[arg(long)]
        local: PathBuf,
        /// Head poll interval.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        interval: Duration,
        /// Catch up to the head as of now, then exit.
        #[arg(long)]
        once: bool,
        /// Segment GETs in flight at most.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Apply only heads signed by this key (ed25519:<base64>, from
        /// `walcast keygen`) or a key it endorsed, never an older signed
        /// head, and only objects whose digest the signed catalog records
        /// (repeatable).
        #[arg(long = "trust", value_name = "ed25519:KEY", value_parser = parse_public_key)]
        trust: Vec<walcast_core::keys::PublicKey>,
        /// A header sent with every GET of an http(s):// dataset, as
        /// 'Name: value' (repeatable), e.g. 'Authorization: Bearer …'. Never logged.
        #[arg(long = "header", value_name = "NAME: VALUE")]
        headers: Vec<String>,
        /// Serve Prometheus metrics at http://ADDR/metrics (applied and
        /// committed LSN, lag histogram, requests by kind, bytes, errors,
        /// long-poll or polling).
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<SocketAddr>,
    },
    /// Print a key's value from a local replica, or read lazily from a
    /// dataset URL (exit 1 when absent).
    #[command(group(clap::ArgGroup::new("source").required(true).args(["local", "from"])))]
    #[command(
        after_help = "Examples:\n  walcast get --local ./replica user:1\n  walcast get --from https://cdn.example.com/app user:1 --stats\n  walcast get --from https://cdn.example.com/app user:1 --trust ed25519:…"
    )]
    Get(GetArgs),
    /// Print entries as NDJSON, in key order, from a local replica or read
    /// lazily from a dataset URL.
    #[command(group(clap::ArgGroup::new("source").required(true).args(["local", "from"])))]
    #[command(
        after_help = "Examples:\n  walcast scan --local ./replica --prefix user: --limit 10\n  walcast scan --from file:///tmp/dataset/ --prefix user:"
    )]
    Scan(ScanArgs),
    /// Show a dataset's head, segments, pages, snapshot and coverage.
    #[command(
        after_help = "Examples:\n  walcast inspect file:///tmp/dataset/ --verify\n  walcast inspect https://cdn.example.com/app --json\n  walcast inspect file:///tmp/dataset/ --verify --trust ed25519:…"
    )]
    Inspect {
        /// Dataset URL.
        url: String,
        /// Download every object the catalog names (segments, the snapshot
        /// by ranges of at most 64 MiB, deltas) and check every checksum.
        #[arg(long)]
        verify: bool,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// A header sent with every GET of an http(s):// dataset, as
        /// 'Name: value' (repeatable). Never logged.
        #[arg(long = "header", value_name = "NAME: VALUE")]
        headers: Vec<String>,
        /// Require the head to be signed by this key (ed25519:<base64>) or
        /// a key it endorsed (repeatable); with --verify, also every page's
        /// signature and every object's SHA-256.
        #[arg(long = "trust", value_name = "ed25519:KEY", value_parser = parse_public_key)]
        trust: Vec<walcast_core::keys::PublicKey>,
    },
    /// Write a new Ed25519 signing key to FILE (mode 0600, never
    /// overwritten) and print its public key as ed25519:<base64>.
    Keygen {
        /// The secret key file to create.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print a read-only access token for `walcast serve --verify-key` and
    /// the worker's AUTH_KEY: objects under PREFIX, for TTL, signed with the
    /// secret key in FILE (`walcast keygen`).
    Token {
        /// The secret key file (`walcast keygen --out FILE`).
        #[arg(long)]
        key: PathBuf,
        /// The dataset prefix the token reads (`app` for app/catalog/head.json).
        #[arg(long, required_unless_present = "all", conflicts_with = "all")]
        prefix: Option<String>,
        /// A token that reads every dataset the verifying server or worker
        /// serves (its prefix is empty).
        #[arg(long)]
        all: bool,
        /// How long the token is valid: 90s, 15m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = walcast_core::token::parse_ttl)]
        ttl: u64,
    },
    /// Writer, publisher, `walcast serve` and a replica on embedded defaults.
    #[command(after_help = "Examples:\n  walcast demo --duration 30s")]
    Demo {
        /// Stop after this long (default: until Ctrl-C).
        #[arg(long, value_parser = parse_duration)]
        duration: Option<Duration>,
        /// Batches per second the demo writer commits (at least 1).
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
        rate: u64,
    },
}

impl Cmd {
    /// The dataset URL the command works on, for messages.
    pub(crate) fn dataset_url(&self) -> Option<&str> {
        match self {
            Cmd::Publish(a) => Some(&a.to),
            Cmd::Replicate { url, .. } | Cmd::Inspect { url, .. } => Some(url),
            Cmd::Get(a) => a.from.as_deref(),
            Cmd::Scan(a) => a.from.as_deref(),
            _ => None,
        }
    }
}

/// The flags of `walcast publish`.
#[derive(Args)]
pub(crate) struct PublishArgs {
    /// WAL directory.
    #[arg(long)]
    pub(crate) wal: PathBuf,
    /// Dataset URL.
    #[arg(long)]
    pub(crate) to: String,
    /// Longest time data may wait behind an upload in flight.
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    pub(crate) flush_interval: Duration,
    /// Shortest time between two commits (segment + head PUT) unless a
    /// segment is full: fewer requests for at most this much more lag.
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    pub(crate) min_commit_interval: Duration,
    /// Commit budget under steady writes: at most this many commits a
    /// second on average (each a segment PUT and a head PUT); the first
    /// batch after a quiet period is committed at once. 0: no budget.
    #[arg(long, default_value_t = walcast_core::publisher::DEFAULT_MAX_COMMITS_PER_SEC)]
    pub(crate) max_commit_rate: u32,
    /// Commits allowed back to back before the budget spaces them.
    #[arg(long, default_value_t = walcast_core::publisher::DEFAULT_COMMIT_BURST)]
    pub(crate) commit_burst: u32,
    /// Copies of the newest segments the head carries, at most this many
    /// bytes, so following replicas need no GET for them (0: none).
    #[arg(long, default_value = "32KiB", value_parser = parse_size)]
    pub(crate) tail_bytes: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics (committed LSN,
    /// commits, requests by kind, bytes, errors).
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics_addr: Option<SocketAddr>,
    /// Seal a segment at this size.
    #[arg(long, default_value = "8MiB", value_parser = parse_size)]
    pub(crate) segment_bytes: u64,
    /// Write a snapshot every N LSNs (0: never).
    #[arg(long, default_value_t = 100_000)]
    pub(crate) snapshot_every: u64,
    /// Also write a snapshot once this many bytes of batches were written
    /// since the last one, however few LSNs (a bulk load in large
    /// batches); needs --snapshot-every. Unset: by LSNs only.
    #[arg(long, value_parser = parse_size)]
    pub(crate) snapshot_bytes: Option<u64>,
    /// Never write a snapshot before this multiple of the last one's
    /// size in bytes of batches was written since it, whatever
    /// --snapshot-every and --snapshot-bytes say: snapshot uploads stay
    /// within 1/R of the batches' bytes however large the dataset (1
    /// with --delta-every; see docs/BENCHMARKS.md). The size is scaled
    /// down by the share of its keys left when fewer remain. Unset: no
    /// floor.
    #[arg(long, value_name = "R", value_parser = parse_ratio)]
    pub(crate) snapshot_ratio: Option<f64>,
    /// Between snapshots, write a delta snapshot (the keys changed since
    /// the last one) every N LSNs, so a lazy replica's cold read replays
    /// at most about N LSNs of segments (0: never).
    #[arg(long, default_value_t = 0)]
    pub(crate) delta_every: u64,
    /// Also write a delta snapshot once this many bytes of batches were
    /// written since the last one, however few LSNs, so a lazy replica's
    /// cold read replays at most about this many bytes of segments;
    /// needs --snapshot-every. Unset: by LSNs only.
    #[arg(long, value_parser = parse_size)]
    pub(crate) delta_bytes: Option<u64>,
    /// Write deltas whose entries point at each key's record in a segment
    /// instead of holding its value (docs/FORMAT.md, "Pointer delta"):
    /// merging deltas then rewrites some 30 bytes a key, not the values,
    /// and cold point reads cost the same round trips; an ordered scan
    /// fetches a record per key the chain changed. Readers older than
    /// this release refuse these deltas.
    #[arg(long)]
    pub(crate) pointer_deltas: bool,
    /// Keep this many LSNs of history in segments (older ones need the
    /// snapshot; needs --snapshot-every). The segment holding the newest
    /// LSN always stays: a restarted publisher checks its WAL against it.
    #[arg(long)]
    pub(crate) retain: Option<u64>,
    /// Delete retired objects only this long after the head stopped naming them.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub(crate) grace: Duration,
    /// Publish everything committed so far, commit the head, and exit.
    #[arg(long)]
    pub(crate) once: bool,
    /// Sign every head and page with this secret key file (`walcast
    /// keygen`) and record every object's SHA-256 in the catalog.
    #[arg(long, value_name = "FILE")]
    pub(crate) signing_key: Option<PathBuf>,
    /// Key rotation: the secret key file of the key that signed the
    /// dataset until now; it endorses --signing-key in every head, so
    /// replicas that trust it follow.
    #[arg(long, value_name = "FILE", requires = "signing_key")]
    pub(crate) previous_key: Option<PathBuf>,
    /// Publish a signed dataset unsigned from now on. Without it, a
    /// publisher with no --signing-key refuses a signed dataset: every
    /// replica pinned to its key (--trust) would refuse what it publishes.
    #[arg(long, conflicts_with = "signing_key")]
    pub(crate) drop_signature: bool,
    /// Write snapshots in version 4, whose index carries each block's
    /// SHA-256, and record its index digest in the signed head: replicas
    /// pinned with --trust then read the snapshot by blocks instead of
    /// whole. Readers older than version 4 refuse these snapshots.
    #[arg(long, requires = "signing_key")]
    pub(crate) verified_blocks: bool,
    /// How the head is stored: `json`, or `gzip` (the head, uploaded on
    /// every commit, in about half its bytes; object stores keep it
    /// with Content-Encoding: gzip, `walcast serve` labels it).
    /// Replicas of this release read both; older ones read a gzip head
    /// only through an HTTP client that decodes it (browsers, workers).
    #[arg(long, value_enum, default_value_t = HeadEncoding::Json)]
    pub(crate) head_encoding: HeadEncoding,
    /// Also serve the (file://) dataset over HTTP on this address, as
    /// `walcast serve` does; held head requests are woken by each commit.
    #[arg(long, value_name = "ADDR")]
    pub(crate) serve: Option<SocketAddr>,
}

/// The flags of `walcast get`.
#[derive(Args)]
pub(crate) struct GetArgs {
    /// Local replica directory.
    #[arg(long)]
    pub(crate) local: Option<PathBuf>,
    /// Dataset URL to read lazily, without a local replica, fetching
    /// only what the read needs: http(s)://, s3://, gs://, az://, file://.
    #[arg(long, value_name = "URL")]
    pub(crate) from: Option<String>,
    /// With --from: print {"gets":N,"bytes":B,"round_trips":R} to stderr.
    #[arg(long, conflicts_with = "local")]
    pub(crate) stats: bool,
    /// With --from: a header sent with every GET of an http(s)://
    /// dataset, as 'Name: value' (repeatable). Never logged.
    #[arg(long = "header", value_name = "NAME: VALUE", conflicts_with = "local")]
    pub(crate) headers: Vec<String>,
    /// With --from: read only what a trusted key signed
    /// (ed25519:<base64>, repeatable), as `walcast replicate --trust`.
    #[arg(long = "trust", value_name = "ed25519:KEY", value_parser = parse_public_key, conflicts_with = "local")]
    pub(crate) trust: Vec<walcast_core::keys::PublicKey>,
    /// The key.
    #[arg(required_unless_present = "key_b64")]
    pub(crate) key: Option<String>,
    /// The key as base64, for keys that are not UTF-8 text (as `walcast
    /// write` takes them in `key_b64`).
    #[arg(long, value_name = "BASE64", conflicts_with = "key")]
    pub(crate) key_b64: Option<String>,
}

/// The flags of `walcast scan`.
#[derive(Args)]
pub(crate) struct ScanArgs {
    /// Local replica directory.
    #[arg(long)]
    pub(crate) local: Option<PathBuf>,
    /// Dataset URL to read lazily, without a local replica, fetching
    /// only what the read needs: http(s)://, s3://, gs://, az://, file://.
    #[arg(long, value_name = "URL")]
    pub(crate) from: Option<String>,
    /// Only keys starting with this prefix.
    #[arg(long, default_value = "")]
    pub(crate) prefix: String,
    /// At most this many entries.
    #[arg(long)]
    pub(crate) limit: Option<usize>,
    /// With --from: print {"gets":N,"bytes":B,"round_trips":R} to stderr.
    #[arg(long, conflicts_with = "local")]
    pub(crate) stats: bool,
    /// With --from: a header sent with every GET of an http(s)://
    /// dataset, as 'Name: value' (repeatable). Never logged.
    #[arg(long = "header", value_name = "NAME: VALUE", conflicts_with = "local")]
    pub(crate) headers: Vec<String>,
    /// With --from: read only what a trusted key signed
    /// (ed25519:<base64>, repeatable), as `walcast replicate --trust`.
    #[arg(long = "trust", value_name = "ed25519:KEY", value_parser = parse_public_key, conflicts_with = "local")]
    pub(crate) trust: Vec<walcast_core::keys::PublicKey>,
}

/// `walcast publish --head-encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum HeadEncoding {
    /// Plain JSON.
    Json,
    /// One gzip stream of the JSON.
    Gzip,
}

/// A public key flag's value; a wrong one says what to give instead.
pub(crate) fn parse_public_key(s: &str) -> Result<walcast_core::keys::PublicKey, String> {
    walcast_core::keys::PublicKey::parse(s).map_err(|e| {
        if s.trim().starts_with(walcast_core::keys::SECRET_KEY_PREFIX) {
            "this is a secret key, which must stay with the publisher: give its public key, \
             the ed25519:<base64> line `walcast keygen` printed"
                .to_string()
        } else {
            format!(
                "{}: give the ed25519:<base64> line `walcast keygen` printed",
                e.message()
            )
        }
    })
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let n: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let ms = match unit {
        "ms" | "" => n,
        "s" => n * 1e3,
        "m" => n * 60e3,
        "h" => n * 3600e3,
        _ => return Err(format!("invalid duration unit in {s:?} (use ms, s, m, h)")),
    };
    Ok(Duration::from_micros((ms * 1e3) as u64))
}

pub(crate) fn parse_timeout(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d < Duration::from_millis(1) => Err(format!("{s:?}: at least 1ms")),
        d => Ok(d),
    }
}

pub(crate) fn parse_max_wait(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.subsec_nanos() != 0 || d > walcast::longpoll::MAX_WAIT_LIMIT => Err(format!(
            "{s:?}: whole seconds, at most {}s",
            walcast::longpoll::MAX_WAIT_LIMIT.as_secs()
        )),
        d => Ok(d),
    }
}

pub(crate) fn parse_max_connections(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=1 << 20).contains(&n) => Ok(n),
        _ => Err(format!("{s:?}: a number of connections from 1 to 1048576")),
    }
}

pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let mul = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        _ => return Err(format!("invalid size unit in {s:?}")),
    };
    n.checked_mul(mul)
        .ok_or_else(|| format!("size {s:?} is above 2^64 bytes"))
}

/// A positive, finite multiple (`--snapshot-ratio`).
pub(crate) fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if (0.01..=1e6).contains(&r) => Ok(r),
        _ => Err(format!(
            "invalid ratio {s:?}: a number from 0.01 to 1000000, such as 2 or 2.5"
        )),
    }
}
