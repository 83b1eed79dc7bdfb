//! Where the benchmarks store their objects: a local directory (`file://`)
//! or moto's S3 server, started here on a free port of 127.0.0.1.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use object_store::ObjectStore;
use serde::{Deserialize, Serialize};

/// One object store both systems use, opened afresh in every process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Target {
    /// A directory through `object_store`'s `LocalFileSystem`.
    File {
        /// The store's root.
        root: PathBuf,
    },
    /// An S3 bucket at `endpoint` (moto).
    S3 {
        /// `http://127.0.0.1:<port>`.
        endpoint: String,
        /// The bucket.
        bucket: String,
    },
}

impl Target {
    /// The short name used in the report.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Target::File { .. } => "file://",
            Target::S3 { .. } => "s3:// (moto)",
        }
    }

    /// A stable key for results.
    pub(crate) fn key(&self) -> &'static str {
        match self {
            Target::File { .. } => "file",
            Target::S3 { .. } => "s3",
        }
    }

    /// The store's root, for SlateDB (which takes a path inside it).
    pub(crate) fn object_store(&self) -> Result<Arc<dyn ObjectStore>> {
        Ok(match self {
            Target::File { root } => {
                std::fs::create_dir_all(root)?;
                Arc::new(object_store::local::LocalFileSystem::new_with_prefix(root)?)
            }
            Target::S3 { endpoint, bucket } => Arc::new(
                object_store::aws::AmazonS3Builder::new()
                    .with_endpoint(endpoint)
                    .with_allow_http(true)
                    .with_virtual_hosted_style_request(false)
                    .with_bucket_name(bucket)
                    .with_region("us-east-1")
                    .with_access_key_id("test")
                    .with_secret_access_key("test")
                    .build()?,
            ),
        })
    }

    /// The URL of the walcast dataset `name` in this store (opened by
    /// `walcast::store::Store`, which reads the `AWS_*` environment set by
    /// [`Moto::start`]).
    pub(crate) fn walcast_url(&self, name: &str) -> Result<String> {
        Ok(match self {
            Target::File { root } => url::Url::from_directory_path(root.join(name))
                .map_err(|()| anyhow!("{}: not an absolute path", root.display()))?
                .to_string(),
            Target::S3 { bucket, .. } => format!("s3://{bucket}/{name}"),
        })
    }
}

/// A moto S3 server started for the run; killed on drop.
pub(crate) struct Moto {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub(crate) endpoint: String,
    _dir: tempfile::TempDir,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A minimal HTTP/1.1 request (moto's readiness and bucket creation need no more).
fn http(addr: &str, method: &str, path: &str) -> Result<u16> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let line = String::from_utf8_lossy(&resp);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("{method} {path}: malformed HTTP response from moto"))
}

impl Moto {
    /// Starts `.tools/moto/bin/moto_server` (installed by
    /// `scripts/e2e-deps.sh`) and sets the `AWS_*` environment so that
    /// `s3://` URLs reach it. Call before any other thread starts.
    pub(crate) fn start(root: &Path) -> Result<Moto> {
        let exe = root.join(".tools/moto/bin/moto_server");
        if !exe.exists() {
            bail!(
                "{} not found: run `bash scripts/e2e-deps.sh` first (or pass --stores file)",
                exe.display()
            );
        }
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let child = Command::new(&exe)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let mut moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        let addr = format!("127.0.0.1:{port}");
        let start = Instant::now();
        loop {
            if let Ok(200) = http(&addr, "GET", "/moto-api/") {
                break;
            }
            if let Some(st) = moto.child.try_wait()? {
                bail!("moto_server exited at start ({st})");
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("moto_server did not answer on {addr} within 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for (k, v) in [
            ("AWS_ENDPOINT_URL", moto.endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
        ] {
            std::env::set_var(k, v);
        }
        tracing::info!(endpoint = %moto.endpoint, ms = start.elapsed().as_millis() as u64, "moto started");
        Ok(moto)
    }

    /// Creates `bucket` and returns the target for it.
    pub(crate) fn bucket(&self, bucket: &str) -> Result<Target> {
        let addr = self.endpoint.trim_start_matches("http://");
        let st = http(addr, "PUT", &format!("/{bucket}"))?;
        if st != 200 {
            bail!("moto: creating bucket {bucket}: HTTP {st}");
        }
        Ok(Target::S3 {
            endpoint: self.endpoint.clone(),
            bucket: bucket.to_string(),
        })
    }
}
