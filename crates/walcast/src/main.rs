//! The `walcast` command: write, publish, serve, replicate, get, scan
//! (from a local replica, or lazily from a dataset URL), inspect, demo. See
//! the README for examples.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use clap::{Parser, Subcommand};
use walcast::publish::{Fenced, PublishOptions};
use walcast::replica::ReplicateOptions;
use walcast_core::batch::Op;
use walcast_core::publisher::PublisherConfig;

#[derive(Parser)]
#[command(
    name = "walcast",
    version,
    about = "Read replicas at the edge, fed from object storage",
    after_help = "Examples:\n  walcast demo                                   # everything on one machine, one command\n  echo '{\"op\":\"put\",\"key\":\"a\",\"value\":\"1\"}' | walcast write --wal ./wal\n  walcast publish --wal ./wal --to file:///tmp/dataset/\n  walcast serve /tmp/dataset\n  walcast replicate http://127.0.0.1:8787 --local ./replica\n  walcast get --local ./replica a\n  \n  Dataset URLs: file:///ABSOLUTE/DIR/, s3://BUCKET/PREFIX, gs://BUCKET/PREFIX,\n  az://CONTAINER/PREFIX, memory://, and http(s)://HOST/PREFIX for reading.\n  'walcast help COMMAND' shows each command's own examples."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// S3-compatible endpoint (R2, MinIO, …); same as AWS_ENDPOINT_URL.
    #[arg(long, global = true)]
    endpoint: Option<String>,
    /// Region of the S3 bucket; same as AWS_REGION.
    #[arg(long, global = true)]
    region: Option<String>,
    /// Allow a plain-HTTP endpoint; same as AWS_ALLOW_HTTP=true.
    #[arg(long, global = true)]
    allow_http: bool,
}

#[derive(Subcommand)]
enum Cmd {
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
    Publish {
        /// WAL directory.
        #[arg(long)]
        wal: PathBuf,
        /// Dataset URL.
        #[arg(long)]
        to: String,
        /// Longest time data may wait behind an upload in flight.
        #[arg(long, default_value = "250ms", value_parser = parse_duration)]
        flush_interval: Duration,
        /// Shortest time between two commits (segment + head PUT) unless a
        /// segment is full: fewer requests for at most this much more lag.
        #[arg(long, default_value = "0ms", value_parser = parse_duration)]
        min_commit_interval: Duration,
        /// Commit budget under steady writes: at most this many commits a
        /// second on average (each a segment PUT and a head PUT); the first
        /// batch after a quiet period is committed at once. 0: no budget.
        #[arg(long, default_value_t = walcast_core::publisher::DEFAULT_MAX_COMMITS_PER_SEC)]
        max_commit_rate: u32,
        /// Commits allowed back to back before the budget spaces them.
        #[arg(long, default_value_t = walcast_core::publisher::DEFAULT_COMMIT_BURST)]
        commit_burst: u32,
        /// Copies of the newest segments the head carries, at most this many
        /// bytes, so following replicas need no GET for them (0: none).
        #[arg(long, default_value = "32KiB", value_parser = parse_size)]
        tail_bytes: u64,
        /// Serve Prometheus metrics at http://ADDR/metrics (committed LSN,
        /// commits, requests by kind, bytes, errors).
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<SocketAddr>,
        /// Seal a segment at this size.
        #[arg(long, default_value = "8MiB", value_parser = parse_size)]
        segment_bytes: u64,
        /// Write a snapshot every N LSNs (0: never).
        #[arg(long, default_value_t = 100_000)]
        snapshot_every: u64,
        /// Also write a snapshot once this many bytes of batches were written
        /// since the last one, however few LSNs (a bulk load in large
        /// batches); needs --snapshot-every. Unset: by LSNs only.
        #[arg(long, value_parser = parse_size)]
        snapshot_bytes: Option<u64>,
        /// Never write a snapshot before this multiple of the last one's
        /// size in bytes of batches was written since it, whatever
        /// --snapshot-every and --snapshot-bytes say: snapshot uploads stay
        /// within 1/R of the batches' bytes however large the dataset (1
        /// with --delta-every; see docs/BENCHMARKS.md). The size is scaled
        /// down by the share of its keys left when fewer remain. Unset: no
        /// floor.
        #[arg(long, value_name = "R", value_parser = parse_ratio)]
        snapshot_ratio: Option<f64>,
        /// Between snapshots, write a delta snapshot (the keys changed since
        /// the last one) every N LSNs, so a lazy replica's cold read replays
        /// at most about N LSNs of segments (0: never).
        #[arg(long, default_value_t = 0)]
        delta_every: u64,
        /// Also write a delta snapshot once this many bytes of batches were
        /// written since the last one, however few LSNs, so a lazy replica's
        /// cold read replays at most about this many bytes of segments;
        /// needs --snapshot-every. Unset: by LSNs only.
        #[arg(long, value_parser = parse_size)]
        delta_bytes: Option<u64>,
        /// Keep this many LSNs of history in segments (older ones need the
        /// snapshot; needs --snapshot-every).
        #[arg(long)]
        retain: Option<u64>,
        /// Delete retired objects only this long after the head stopped naming them.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        grace: Duration,
        /// Publish everything committed so far, commit the head, and exit.
        #[arg(long)]
        once: bool,
        /// Sign every head and page with this secret key file (`walcast
        /// keygen`) and record every object's SHA-256 in the catalog.
        #[arg(long, value_name = "FILE")]
        signing_key: Option<PathBuf>,
        /// Key rotation: the secret key file of the key that signed the
        /// dataset until now; it endorses --signing-key in every head, so
        /// replicas that trust it follow.
        #[arg(long, value_name = "FILE", requires = "signing_key")]
        previous_key: Option<PathBuf>,
        /// Write snapshots in version 4, whose index carries each block's
        /// SHA-256, and record its index digest in the signed head: replicas
        /// pinned with --trust then read the snapshot by blocks instead of
        /// whole. Readers older than version 4 refuse these snapshots.
        #[arg(long, requires = "signing_key")]
        verified_blocks: bool,
        /// How the head is stored: `json`, or `gzip` (the head, uploaded on
        /// every commit, in about half its bytes; object stores keep it
        /// with Content-Encoding: gzip, `walcast serve` labels it).
        /// Replicas of this release read both; older ones read a gzip head
        /// only through an HTTP client that decodes it (browsers, workers).
        #[arg(long, value_enum, default_value_t = HeadEncoding::Json)]
        head_encoding: HeadEncoding,
        /// Also serve the (file://) dataset over HTTP on this address, as
        /// `walcast serve` does; held head requests are woken by each commit.
        #[arg(long, value_name = "ADDR")]
        serve: Option<SocketAddr>,
    },
    /// Serve a file:// dataset over HTTP (Range, ETag, If-None-Match, CORS, Cache-Control).
    #[command(after_help = "Examples:\n  walcast serve /tmp/dataset --addr 127.0.0.1:8787")]
    Serve {
        /// Dataset directory.
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
    Get {
        /// Local replica directory.
        #[arg(long)]
        local: Option<PathBuf>,
        /// Dataset URL to read lazily, without a local replica, fetching
        /// only what the read needs: http(s)://, s3://, gs://, az://, file://.
        #[arg(long, value_name = "URL")]
        from: Option<String>,
        /// With --from: print {"gets":N,"bytes":B,"round_trips":R} to stderr.
        #[arg(long, conflicts_with = "local")]
        stats: bool,
        /// With --from: a header sent with every GET of an http(s)://
        /// dataset, as 'Name: value' (repeatable). Never logged.
        #[arg(long = "header", value_name = "NAME: VALUE", conflicts_with = "local")]
        headers: Vec<String>,
        /// With --from: read only what a trusted key signed
        /// (ed25519:<base64>, repeatable), as `walcast replicate --trust`.
        #[arg(long = "trust", value_name = "ed25519:KEY", value_parser = parse_public_key, conflicts_with = "local")]
        trust: Vec<walcast_core::keys::PublicKey>,
        /// The key.
        key: String,
    },
    /// Print entries as NDJSON, in key order, from a local replica or read
    /// lazily from a dataset URL.
    #[command(group(clap::ArgGroup::new("source").required(true).args(["local", "from"])))]
    #[command(
        after_help = "Examples:\n  walcast scan --local ./replica --prefix user: --limit 10\n  walcast scan --from file:///tmp/dataset/ --prefix user:"
    )]
    Scan {
        /// Local replica directory.
        #[arg(long)]
        local: Option<PathBuf>,
        /// Dataset URL to read lazily, without a local replica, fetching
        /// only what the read needs: http(s)://, s3://, gs://, az://, file://.
        #[arg(long, value_name = "URL")]
        from: Option<String>,
        /// Only keys starting with this prefix.
        #[arg(long, default_value = "")]
        prefix: String,
        /// At most this many entries.
        #[arg(long)]
        limit: Option<usize>,
        /// With --from: print {"gets":N,"bytes":B,"round_trips":R} to stderr.
        #[arg(long, conflicts_with = "local")]
        stats: bool,
        /// With --from: a header sent with every GET of an http(s)://
        /// dataset, as 'Name: value' (repeatable). Never logged.
        #[arg(long = "header", value_name = "NAME: VALUE", conflicts_with = "local")]
        headers: Vec<String>,
        /// With --from: read only what a trusted key signed
        /// (ed25519:<base64>, repeatable), as `walcast replicate --trust`.
        #[arg(long = "trust", value_name = "ed25519:KEY", value_parser = parse_public_key, conflicts_with = "local")]
        trust: Vec<walcast_core::keys::PublicKey>,
    },
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
        /// The dataset prefix the token reads (`app` for app/catalog/head.json; "" for all).
        #[arg(long)]
        prefix: String,
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

/// `get --from` and `scan --from`: a lazy replica that catches up to the
/// head once (fetching no snapshot) and does not follow; reads fetch the
/// blocks they need, those of `key` while it catches up.
async fn open_lazy(
    url: &str,
    headers: Vec<String>,
    trust: Vec<walcast_core::keys::PublicKey>,
    key: &[u8],
) -> Result<walcast::Replica> {
    let opts = walcast::ReplicaOptions {
        lazy_cache_bytes: Some(8 << 20),
        headers,
        trust,
        follow: false,
        // The key's blocks come beside the tail's segments.
        prefetch: vec![key.to_vec()],
        ..walcast::ReplicaOptions::default()
    };
    walcast::Replica::open(url, opts).await
}

/// A public key flag's value; a wrong one says what to give instead.
fn parse_public_key(s: &str) -> Result<walcast_core::keys::PublicKey, String> {
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

fn parse_duration(s: &str) -> Result<Duration, String> {
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

fn parse_timeout(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d < Duration::from_millis(1) => Err(format!("{s:?}: at least 1ms")),
        d => Ok(d),
    }
}

fn parse_max_wait(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.subsec_nanos() != 0 || d > walcast::longpoll::MAX_WAIT_LIMIT => Err(format!(
            "{s:?}: whole seconds, at most {}s",
            walcast::longpoll::MAX_WAIT_LIMIT.as_secs()
        )),
        d => Ok(d),
    }
}

fn parse_max_connections(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=1 << 20).contains(&n) => Ok(n),
        _ => Err(format!("{s:?}: a number of connections from 1 to 1048576")),
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
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
fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if (0.01..=1e6).contains(&r) => Ok(r),
        _ => Err(format!(
            "invalid ratio {s:?}: a number from 0.01 to 1000000, such as 2 or 2.5"
        )),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    // Flags are the environment variables object_store reads; set them before
    // any thread starts.
    if let Some(e) = &cli.endpoint {
        std::env::set_var("AWS_ENDPOINT_URL", e);
    }
    if let Some(r) = &cli.region {
        std::env::set_var("AWS_REGION", r);
    }
    if cli.allow_http {
        std::env::set_var("AWS_ALLOW_HTTP", "true");
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("walcast: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let url = cli.cmd.dataset_url().map(str::to_string);
    match rt.block_on(run(cli.cmd)) {
        Ok(code) => code,
        Err(e) => {
            // The reader of stdout went away (`walcast scan | head`): what it
            // asked for was written; end quietly, as Unix tools do.
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            if e.downcast_ref::<Fenced>().is_some() {
                eprintln!("walcast: {e:#}");
                return ExitCode::from(3);
            }
            // A common mistake gets one line saying what to do; the details
            // with RUST_LOG=debug.
            match url.and_then(|u| walcast::hints::explain(&u, &format!("{e:#}"))) {
                Some(hint) => {
                    tracing::debug!("{e:#}");
                    eprintln!("walcast: error: {hint}");
                }
                None => eprintln!("walcast: error: {e:#}"),
            }
            ExitCode::from(1)
        }
    }
}

impl Cmd {
    /// The dataset URL the command works on, for messages.
    fn dataset_url(&self) -> Option<&str> {
        match self {
            Cmd::Publish { to, .. } => Some(to),
            Cmd::Replicate { url, .. } | Cmd::Inspect { url, .. } => Some(url),
            Cmd::Get { from, .. } | Cmd::Scan { from, .. } => from.as_deref(),
            _ => None,
        }
    }
}

type ServerTask = (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<()>>,
);

/// `walcast publish --serve ADDR`: serves the file:// dataset at `to` on
/// `addr` (as `walcast serve` with its defaults), waking held head requests
/// at each commit; returns once listening, with what stops it.
async fn serve_while_publishing(
    to: &str,
    addr: SocketAddr,
    mut commits: tokio::sync::watch::Receiver<u64>,
) -> Result<ServerTask> {
    let root = url::Url::parse(to)
        .ok()
        .filter(|u| u.scheme() == "file")
        .and_then(|u| u.to_file_path().ok())
        .ok_or_else(|| anyhow::anyhow!("--serve needs a file:// dataset, not {to}"))?;
    let signal = walcast::longpoll::HeadSignal::new();
    let opts = walcast::serve::ServeOptions {
        head_signal: Some(signal.clone()),
        ..walcast::serve::ServeOptions::default()
    };
    tokio::spawn(async move {
        while commits.changed().await.is_ok() {
            signal.notify();
        }
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(walcast::serve::serve_with(
        root,
        addr,
        opts,
        move |a| {
            println!("walcast serve: listening on http://{a}");
            let _ = std::io::stdout().flush();
            let _ = bound_tx.send(());
        },
        async move {
            let _ = stopped.await;
        },
    ));
    if bound_rx.await.is_err() {
        // It ended before listening: say why.
        task.await.context("walcast publish --serve")??;
        anyhow::bail!("walcast publish --serve: the server stopped");
    }
    Ok((stop, task))
}

async fn ctrl_c() {
    let _ = tokio::signal::ctrl_c().await;
}

async fn run(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::Write { wal } => write(wal),
        Cmd::Token { key, prefix, ttl } => {
            let secret = walcast::keyfile::read_secret_key(&key)?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .context("the system clock is before 1970")?
                .as_secs();
            println!("{}", walcast_core::token::issue(&secret, &prefix, now, ttl));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Keygen { out } => {
            let public = walcast::keyfile::generate(&out)?;
            println!("{public}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Publish {
            wal,
            to,
            flush_interval,
            min_commit_interval,
            max_commit_rate,
            commit_burst,
            tail_bytes,
            metrics_addr,
            segment_bytes,
            snapshot_every,
            snapshot_bytes,
            snapshot_ratio,
            delta_every,
            delta_bytes,
            retain,
            signing_key,
            previous_key,
            verified_blocks,
            head_encoding,
            grace,
            once,
            serve,
        } => {
            // Flags that act only with snapshots: refused without them,
            // rather than accepted and ignored.
            if snapshot_every == 0 {
                let needs = [
                    ("--snapshot-bytes", snapshot_bytes.is_some()),
                    ("--snapshot-ratio", snapshot_ratio.is_some()),
                    ("--delta-every", delta_every > 0),
                    ("--delta-bytes", delta_bytes.is_some()),
                    ("--retain", retain.is_some()),
                ];
                if let Some((flag, _)) = needs.iter().find(|(_, set)| *set) {
                    use clap::CommandFactory as _;
                    Cli::command()
                        .error(
                            clap::error::ErrorKind::ArgumentConflict,
                            format!(
                                "{flag} needs snapshots: it has no effect with --snapshot-every 0"
                            ),
                        )
                        .exit();
                }
            }
            let most = walcast_core::publisher::MAX_SEGMENT_SEAL_BYTES;
            if segment_bytes > most {
                bail!("--segment-bytes {segment_bytes} is above the limit of {most} bytes");
            }
            let opts = PublishOptions {
                config: PublisherConfig {
                    segment_bytes,
                    flush_interval_ms: flush_interval.as_millis() as u64,
                    min_commit_interval_ms: min_commit_interval.as_millis() as u64,
                    max_commits_per_sec: max_commit_rate,
                    commit_burst,
                    tail_bytes: tail_bytes.min(walcast_core::catalog::MAX_TAIL_BYTES as u64)
                        as usize,
                    snapshot_every: (snapshot_every > 0).then_some(snapshot_every),
                    delta_every: (delta_every > 0).then_some(delta_every),
                    snapshot_bytes: snapshot_bytes.filter(|&b| b > 0),
                    snapshot_ratio_percent: snapshot_ratio.map(|r| (r * 100.0).round() as u32),
                    delta_bytes: delta_bytes.filter(|&b| b > 0),
                    retain_lsns: retain,
                    grace_ms: grace.as_millis() as u64,
                    signing_key: signing_key
                        .as_deref()
                        .map(walcast::keyfile::read_secret_key)
                        .transpose()?,
                    previous_key: previous_key
                        .as_deref()
                        .map(walcast::keyfile::read_secret_key)
                        .transpose()?,
                    snapshot_format: if verified_blocks {
                        walcast_core::publisher::SnapshotFormat::Verified(Default::default())
                    } else {
                        Default::default()
                    },
                    head_gzip: head_encoding == HeadEncoding::Gzip,
                    ..PublisherConfig::default()
                },
                once,
                ..PublishOptions::default()
            };
            // The same handle apps embed: Ctrl-C publishes what the WAL made
            // durable, then stops.
            let mut publisher = match metrics_addr {
                None => walcast::Publisher::spawn(&wal, &to, opts)?,
                Some(addr) => {
                    let stats = std::sync::Arc::new(walcast::counting::RequestStats::default());
                    let store = walcast::store::Store::open_counted(&to, stats.clone())?;
                    let publisher = walcast::Publisher::spawn_on(&wal, store, opts);
                    let m = std::sync::Arc::new(walcast::metrics::PublisherMetrics::new(stats));
                    let mut commits = publisher.commits();
                    let mc = m.clone();
                    tokio::spawn(async move {
                        while commits.changed().await.is_ok() {
                            let lsn = *commits.borrow();
                            mc.committed(lsn);
                        }
                    });
                    let bound =
                        walcast::metrics::serve(addr, std::sync::Arc::new(move || m.encode()))
                            .await?;
                    eprintln!("walcast publish: metrics at http://{bound}/metrics");
                    publisher
                }
            };
            let server = match serve {
                Some(addr) => Some(serve_while_publishing(&to, addr, publisher.commits()).await?),
                None => None,
            };
            let ended = tokio::select! {
                r = publisher.finished() => Some(r),
                () = ctrl_c() => None,
            };
            let report = match ended {
                Some(r) => r?,
                None => publisher.stop().await?,
            };
            eprintln!(
                "walcast publish: epoch {}, committed LSN {}, {} commits",
                report.epoch, report.committed_lsn, report.commits
            );
            if let Some((stop, task)) = server {
                let _ = stop.send(());
                task.await.context("walcast publish --serve")??;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Serve {
            dir,
            addr,
            cors_origins,
            max_connections,
            header_timeout,
            idle_timeout,
            verify_keys,
            max_wait,
        } => {
            let root = dir
                .canonicalize()
                .with_context(|| format!("{}", dir.display()))?;
            let opts = walcast::serve::ServeOptions {
                cors_origins,
                max_connections,
                header_timeout,
                idle_timeout,
                verify_keys,
                max_wait,
                head_signal: None,
                drain_timeout: walcast::serve::DEFAULT_DRAIN_TIMEOUT,
            };
            walcast::serve::serve_with(
                root,
                addr,
                opts,
                |a| {
                    println!("walcast serve: listening on http://{a}");
                    let _ = std::io::stdout().flush();
                },
                ctrl_c(),
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Replicate {
            metrics_addr,
            url,
            local,
            interval,
            once,
            concurrency,
            headers,
            trust,
        } => {
            let opts = ReplicateOptions {
                interval,
                once,
                concurrency,
                progress: true,
                sink: None,
                trust,
            };
            let result = match metrics_addr {
                None => {
                    walcast::replica::replicate_with_headers(
                        &url,
                        &headers,
                        &local,
                        &opts,
                        ctrl_c(),
                    )
                    .await
                }
                Some(addr) => {
                    let m = std::sync::Arc::new(walcast::metrics::ReplicaMetrics::new());
                    let mc = m.clone();
                    let bound =
                        walcast::metrics::serve(addr, std::sync::Arc::new(move || mc.encode()))
                            .await?;
                    eprintln!("walcast replicate: metrics at http://{bound}/metrics");
                    walcast::replica::replicate_with_metrics(
                        &url,
                        &headers,
                        &local,
                        &opts,
                        ctrl_c(),
                        m,
                    )
                    .await
                }
            };
            if std::env::var("WALCAST_REPLICATE_STATS").is_ok_and(|v| v == "1") {
                eprintln!("requests={}", walcast::replica::last_requests());
            }
            let report = result?;
            eprintln!("walcast replicate: applied LSN {}", report.applied_lsn);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Get {
            local,
            from,
            stats,
            headers,
            trust,
            key,
        } => {
            let value = match (local, from) {
                (Some(local), _) => walcast::replica::load(&local)?
                    .state
                    .get(key.as_bytes())
                    .map(<[u8]>::to_vec),
                (None, Some(url)) => {
                    let r = open_lazy(&url, headers, trust, key.as_bytes()).await?;
                    let res = r.get(key.as_bytes()).await;
                    if stats {
                        eprintln!("{}", r.fetch_stats().to_json());
                    }
                    r.close().await;
                    res?
                }
                (None, None) => bail!("give --local DIR or --from URL"),
            };
            match value {
                Some(v) => {
                    std::io::stdout().write_all(&v)?;
                    Ok(ExitCode::SUCCESS)
                }
                None => {
                    eprintln!("walcast: not found: {key}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        Cmd::Scan {
            local,
            from,
            prefix,
            limit,
            stats,
            headers,
            trust,
        } => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let mut print = |k: &[u8], v: &[u8]| -> Result<()> {
                let mut obj = serde_json::Map::new();
                put_bytes(&mut obj, "key", k);
                put_bytes(&mut obj, "value", v);
                writeln!(out, "{}", serde_json::Value::Object(obj))?;
                Ok(())
            };
            match (local, from) {
                (Some(local), _) => {
                    let l = walcast::replica::load(&local)?;
                    for (k, v) in l
                        .state
                        .prefix(prefix.as_bytes())
                        .take(limit.unwrap_or(usize::MAX))
                    {
                        print(&k, v)?;
                    }
                }
                (None, Some(url)) => {
                    let r = open_lazy(&url, headers, trust, prefix.as_bytes()).await?;
                    let res = r
                        .scan_prefix(prefix.as_bytes(), limit.unwrap_or(usize::MAX))
                        .await;
                    if stats {
                        eprintln!("{}", r.fetch_stats().to_json());
                    }
                    r.close().await;
                    for (k, v) in res? {
                        print(&k, &v)?;
                    }
                }
                (None, None) => bail!("give --local DIR or --from URL"),
            }
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Inspect {
            url,
            verify,
            json,
            headers,
            trust,
        } => {
            walcast::inspect::inspect(&url, &headers, verify, json, &trust).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Demo { duration, rate } => {
            walcast::demo::demo(duration, rate).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn put_bytes(obj: &mut serde_json::Map<String, serde_json::Value>, name: &str, b: &[u8]) {
    match std::str::from_utf8(b) {
        Ok(s) => obj.insert(name.to_string(), s.into()),
        Err(_) => obj.insert(
            format!("{name}_b64"),
            base64::engine::general_purpose::STANDARD.encode(b).into(),
        ),
    };
}

fn field_bytes(
    o: &serde_json::Map<String, serde_json::Value>,
    name: &str,
) -> Result<Option<Vec<u8>>> {
    match (o.get(name), o.get(&format!("{name}_b64"))) {
        (Some(_), Some(_)) => bail!("both {name} and {name}_b64"),
        (Some(v), None) => Ok(Some(
            v.as_str()
                .ok_or_else(|| anyhow!("{name} is not a string"))?
                .as_bytes()
                .to_vec(),
        )),
        (None, Some(v)) => {
            let s = v
                .as_str()
                .ok_or_else(|| anyhow!("{name}_b64 is not a string"))?;
            Ok(Some(
                base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map_err(|e| anyhow!("{name}_b64: {e}"))?,
            ))
        }
        (None, None) => Ok(None),
    }
}

fn parse_op(v: &serde_json::Value) -> Result<Op> {
    let o = v
        .as_object()
        .ok_or_else(|| anyhow!("an op must be a JSON object"))?;
    let key = field_bytes(o, "key")?.ok_or_else(|| anyhow!("missing key"))?;
    match o.get("op").and_then(|v| v.as_str()) {
        Some("put") => {
            let value = field_bytes(o, "value")?.ok_or_else(|| anyhow!("put without value"))?;
            Ok(Op::put(key, value))
        }
        Some("delete") => Ok(Op::delete(key)),
        Some(other) => bail!("unknown op {other:?} (put or delete)"),
        None => bail!("missing \"op\""),
    }
}

/// One NDJSON line into one atomic batch.
fn parse_line(line: &str) -> Result<Vec<Op>> {
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| anyhow!("invalid JSON: {e}"))?;
    if let Some(b) = v.get("batch") {
        let arr = b
            .as_array()
            .ok_or_else(|| anyhow!("\"batch\" must be an array"))?;
        if arr.is_empty() {
            bail!("empty batch");
        }
        arr.iter()
            .enumerate()
            .map(|(i, op)| parse_op(op).map_err(|e| anyhow!("op {i}: {e}")))
            .collect()
    } else {
        Ok(vec![parse_op(&v)?])
    }
}

/// The longest line `walcast write` takes: a batch of the largest value
/// the format allows (64 MiB), as base64 in JSON, with room to spare.
const MAX_LINE_BYTES: u64 = 128 << 20;

/// `walcast publish --head-encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum HeadEncoding {
    /// Plain JSON.
    Json,
    /// One gzip stream of the JSON.
    Gzip,
}

fn write(wal: PathBuf) -> Result<ExitCode> {
    use std::io::{BufRead as _, Read as _};
    let w = walcast::wal::Writer::open(&wal)?;
    let mut input = std::io::BufReader::with_capacity(1 << 20, std::io::stdin());
    let mut out = std::io::stdout().lock();
    let mut lineno = 0usize;
    loop {
        // Every line already read is committed with one fsync (group
        // commit); a line on its own (interactive input) is committed at once.
        let mut group: Vec<Vec<u8>> = Vec::new();
        let mut bad: Option<(usize, anyhow::Error)> = None;
        let mut eof = false;
        loop {
            // A line is read as bytes, at most MAX_LINE_BYTES of it: one
            // that is not UTF-8 or too long is reported by number like a
            // line of bad JSON, after the lines before it are committed.
            let mut raw = Vec::new();
            let n = (&mut input)
                .take(MAX_LINE_BYTES + 1)
                .read_until(b'\n', &mut raw)
                .context("reading stdin")?;
            if n == 0 {
                eof = true;
                break;
            }
            lineno += 1;
            if raw.len() as u64 > MAX_LINE_BYTES {
                bad = Some((lineno, anyhow!("longer than {MAX_LINE_BYTES} bytes")));
                break;
            }
            let Ok(line) = String::from_utf8(raw) else {
                bad = Some((lineno, anyhow!("not UTF-8")));
                break;
            };
            if !line.trim().is_empty() {
                match parse_line(line.trim_end())
                    .and_then(|ops| walcast_core::batch::encode(&ops).map_err(anyhow::Error::new))
                {
                    Ok(p) => group.push(p),
                    Err(e) => {
                        bad = Some((lineno, e));
                        break;
                    }
                }
            }
            if input.buffer().is_empty() || group.len() >= 4096 {
                break;
            }
        }
        if !group.is_empty() {
            let refs: Vec<&[u8]> = group.iter().map(Vec::as_slice).collect();
            for lsn in w.commit_many(&refs)? {
                writeln!(out, "{{\"lsn\":{lsn}}}")?;
            }
            out.flush()?;
        }
        if let Some((n, e)) = bad {
            eprintln!("walcast write: line {n}: {e}; nothing of it was committed");
            return Ok(ExitCode::from(1));
        }
        if eof {
            return Ok(ExitCode::SUCCESS);
        }
    }
}
