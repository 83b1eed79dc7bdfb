//! The `walcast` command: write, publish, serve, replicate, get, scan
//! (from a local replica, or lazily from a dataset URL), inspect, demo. See
//! the README for examples.

mod cmd;

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use walcast::publish::Fenced;
use walcast::replica::ReplicateOptions;

use cmd::args::{Cli, Cmd};
use cmd::ctrl_c;

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

/// Runs one command; the shorter ones here, the others in `cmd/`.
async fn run(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::Write { wal } => cmd::write::write(wal),
        Cmd::Token {
            key,
            prefix,
            all,
            ttl,
        } => {
            // An empty `$PREFIX` or a lone `/` must not quietly mean every
            // dataset: that takes --all.
            let prefix = match prefix {
                Some(p) if walcast_core::token::normalize_prefix(&p).is_empty() => {
                    anyhow::bail!(
                        "--prefix {p:?} names no dataset: give the dataset's prefix \
                         (`app` for app/catalog/head.json), or --all for a token that reads \
                         every dataset"
                    )
                }
                Some(p) => p,
                None => {
                    debug_assert!(all);
                    String::new()
                }
            };
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
        Cmd::Publish(args) => cmd::publish::publish(args).await,
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
            // A directory, or the file:// URL the other commands take.
            let dir = match dir.to_str().filter(|d| d.starts_with("file://")) {
                Some(u) => url::Url::parse(u)
                    .ok()
                    .and_then(|u| u.to_file_path().ok())
                    .with_context(|| format!("{u}: not a file:// URL of a local directory"))?,
                None => dir,
            };
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
        Cmd::Get(args) => cmd::read::get(args).await,
        Cmd::Scan(args) => cmd::read::scan(args).await,
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
