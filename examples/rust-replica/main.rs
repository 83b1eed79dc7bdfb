//! A small HTTP service that holds a walcast replica in memory and answers
//! reads from it:
//!
//! ```text
//! GET /get/KEY                 the value (404 when absent)
//! GET /scan?prefix=P&limit=N   {"key":…,"value":…} lines, in key order
//! GET /status                  {"applied_lsn":…,"committed_lsn":…,"lag_ms":…,"phase":…}
//! GET /wait?lsn=N              200 once LSN N is applied (read-your-writes), 504 after 10 s
//! ```
//!
//! Run: `cargo run --example rust-replica -- URL [--addr 127.0.0.1:8788] [--lazy BYTES]`

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use walcast::{Replica, ReplicaOptions};

type Shared = Arc<Replica>;

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut url, mut addr, mut lazy) = (None, "127.0.0.1:8788".to_string(), None);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--addr" => addr = args.next().context("--addr needs HOST:PORT")?,
            "--lazy" => lazy = Some(args.next().context("--lazy needs BYTES")?.parse()?),
            "-h" | "--help" => {
                println!("usage: rust-replica URL [--addr 127.0.0.1:8788] [--lazy CACHE_BYTES]");
                return Ok(());
            }
            _ if url.is_none() => url = Some(a),
            _ => bail!("unexpected argument {a:?}"),
        }
    }
    let url = url.context("usage: rust-replica URL [--addr HOST:PORT] [--lazy CACHE_BYTES]")?;
    let addr: SocketAddr = addr.parse().context("--addr")?;

    // Opens and catches up, then follows the dataset in the background.
    let options = ReplicaOptions {
        lazy_cache_bytes: lazy,
        poll_interval: Duration::from_millis(500),
        ..ReplicaOptions::default()
    };
    let replica = Arc::new(Replica::open(&url, options).await?);
    eprintln!("replica at LSN {}", replica.status().applied_lsn);

    let app = Router::new()
        .route("/get/{*key}", get(get_key))
        .route("/scan", get(scan))
        .route("/status", get(status))
        .route("/wait", get(wait))
        .with_state(replica.clone());
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    if let Ok(replica) = Arc::try_unwrap(replica) {
        replica.close().await;
    }
    Ok(())
}

/// The query string's parameters.
fn params(q: Option<String>) -> HashMap<String, String> {
    url::form_urlencoded::parse(q.unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

fn failed(e: anyhow::Error) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}\n")).into_response()
}

async fn get_key(State(r): State<Shared>, Path(key): Path<String>) -> Response {
    match r.get(key.as_bytes()).await {
        Ok(Some(v)) => v.into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, "not found\n").into_response(),
        Err(e) => failed(e),
    }
}

async fn scan(State(r): State<Shared>, RawQuery(q): RawQuery) -> Response {
    let q = params(q);
    let prefix = q.get("prefix").map(String::as_str).unwrap_or("");
    // A page: at most 1,000 entries and 4 MiB of keys and values, whatever
    // the client asks (a scan holds its page in memory while it runs).
    let limit = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(100)
        .min(1_000);
    let page = walcast_core::replica::LazyScan::prefix(prefix.as_bytes(), limit).max_bytes(4 << 20);
    match r.scan_with(page).await {
        Ok(entries) => entries
            .iter()
            .map(|(k, v)| {
                let line = serde_json::json!({
                    "key": String::from_utf8_lossy(k),
                    "value": String::from_utf8_lossy(v),
                });
                format!("{line}\n")
            })
            .collect::<String>()
            .into_response(),
        Err(e) => failed(e),
    }
}

async fn status(State(r): State<Shared>) -> Response {
    let s = r.status();
    let body = serde_json::json!({
        "applied_lsn": s.applied_lsn,
        "committed_lsn": s.committed_lsn,
        "lag_ms": s.lag_ms,
        "phase": s.phase.as_str(),
    });
    format!("{body}\n").into_response()
}

async fn wait(State(r): State<Shared>, RawQuery(q): RawQuery) -> Response {
    let q = params(q);
    let Some(lsn) = q.get("lsn").and_then(|l| l.parse().ok()) else {
        return (StatusCode::BAD_REQUEST, "give ?lsn=N\n").into_response();
    };
    match r.wait_for(lsn, Duration::from_secs(10)).await {
        Ok(applied) => format!("{applied}\n").into_response(),
        Err(e) => (StatusCode::GATEWAY_TIMEOUT, format!("{e:#}\n")).into_response(),
    }
}
