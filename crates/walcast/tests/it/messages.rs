//! Errors and help that guide: `walcast --help` and each subcommand's help
//! show examples; a dataset URL without a scheme, a missing dataset (a
//! `file://` directory and a moto bucket), a bucket without credentials
//! (moto) and a bucket in another region each end the command with exit 1
//! and one line on stderr that names the URL and says what to do; so do a
//! wrong key file (none there, a public key, not a key), a `--trust` key that
//! did not sign the dataset, and `--trust` on an unsigned dataset; a
//! malformed `--trust` key is a usage error (exit 2) that says what to give.
//!
//! Real processes: the `walcast` binary, moto for S3. The wrong region is a
//! fault injected by a stand-in S3 endpoint that answers every request as S3
//! does for a bucket addressed in another region (301 `PermanentRedirect`
//! without a `Location`): moto serves every region alike.

use crate::support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{bin, file_url, p, Env, Moto};

/// Every variable that could give the S3 client credentials or a region.
const AWS_VARS: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT",
    "AWS_ALLOW_HTTP",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_SKIP_SIGNATURE",
    "AWS_PROFILE",
];

/// Runs `walcast args` with only `env` of the AWS variables; returns (exit
/// code, stdout, stderr). Bounded: a command that hangs fails the test.
fn walcast(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for v in AWS_VARS {
        cmd.env_remove(v);
    }
    cmd.env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn walcast");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("walcast {args:?} did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The command failed with exit 1 and exactly one line on stderr, which
/// holds every one of `wants`; returns the line.
fn one_line(args: &[&str], env: &[(&str, &str)], wants: &[&str]) -> String {
    let (code, _, err) = walcast(args, env);
    assert_eq!(code, Some(1), "walcast {args:?}: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "walcast {args:?}: one line: {err}");
    for w in wants {
        assert!(lines[0].contains(w), "walcast {args:?}: {w:?} in {err}");
    }
    eprintln!("walcast {}: {}", args.join(" "), lines[0]);
    lines[0].to_string()
}

#[test]
fn help_shows_examples() {
    let (code, out, _) = walcast(&["--help"], &[]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("Examples:") && out.contains("walcast demo"),
        "{out}"
    );
    for cmd in [
        "write",
        "publish",
        "serve",
        "replicate",
        "get",
        "scan",
        "inspect",
        "demo",
    ] {
        let (code, out, err) = walcast(&[cmd, "--help"], &[]);
        assert_eq!(code, Some(0), "{cmd}: {err}");
        assert!(
            out.contains("Examples:") && out.contains(&format!("walcast {cmd} ")),
            "walcast {cmd} --help shows an example: {out}"
        );
    }
}

#[test]
fn a_url_without_a_scheme_says_which_forms_work() {
    let tmp = tempfile::tempdir().unwrap();
    let local = tmp.path().join("r");
    let local = local.to_str().unwrap();
    let wants = ["\"my-bucket/app\" is not a dataset URL", "s3://", "file://"];
    one_line(
        &["replicate", "my-bucket/app", "--local", local, "--once"],
        &[],
        &wants,
    );
    one_line(&["get", "--from", "my-bucket/app", "k"], &[], &wants);
    one_line(&["inspect", "my-bucket/app"], &[], &wants);
    // A directory that exists gets its file:// URL.
    let ds = tmp.path().join("ds");
    std::fs::create_dir_all(&ds).unwrap();
    let wal = tmp.path().join("wal");
    let line = one_line(
        &[
            "publish",
            "--wal",
            wal.to_str().unwrap(),
            "--to",
            ds.to_str().unwrap(),
        ],
        &[],
        &["is not a dataset URL"],
    );
    assert!(line.contains(&file_url(&ds)), "{line}");
}

#[test]
fn a_missing_dataset_says_to_check_the_url_or_publish() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let url = file_url(&empty);
    let local = tmp.path().join("r");
    let wants = ["no dataset here", "walcast publish --wal DIR --to"];
    one_line(
        &[
            "replicate",
            &url,
            "--local",
            local.to_str().unwrap(),
            "--once",
        ],
        &[],
        &wants,
    );
    one_line(&["get", "--from", &url, "k"], &[], &wants);

    if support::skip("a_missing_dataset_says_to_check_the_url_or_publish (moto)") {
        return;
    }
    let moto = Moto::start();
    let endpoint = moto.endpoint();
    let env = [
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
    ];
    let s3 = moto.url("nothing-here");
    let line = one_line(
        &[
            "replicate",
            &s3,
            "--local",
            local.to_str().unwrap(),
            "--once",
        ],
        &env,
        &wants,
    );
    assert!(line.contains(&s3), "{line}");
}

#[test]
fn a_bucket_without_credentials_says_which_variables_to_set() {
    if support::skip("a_bucket_without_credentials_says_which_variables_to_set") {
        return;
    }
    let moto = Moto::start();
    let endpoint = moto.endpoint();
    let tmp = tempfile::tempdir().unwrap();
    let local = tmp.path().join("r");
    let url = moto.url("app");
    let wants = [
        "no valid credentials",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ];
    // Through the variable and through the flag.
    let env = [
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
    ];
    one_line(
        &[
            "replicate",
            &url,
            "--local",
            local.to_str().unwrap(),
            "--once",
        ],
        &env,
        &wants,
    );
    one_line(
        &[
            "publish",
            "--wal",
            tmp.path().join("wal").to_str().unwrap(),
            "--to",
            &url,
            "--endpoint",
            &endpoint,
            "--allow-http",
        ],
        &[],
        &wants,
    );
    // Wrong keys: moto refuses the signature of an unknown key only in its
    // IAM mode, so this case is the missing-keys one above.
}

/// A stand-in S3 endpoint that answers every request as S3 answers one
/// addressed to a bucket in another region.
fn other_region_endpoint() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            std::thread::spawn(move || {
                let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = [0u8; 8192];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>PermanentRedirect</Code><Message>The bucket you are attempting to access must be addressed using the specified endpoint. Please send all future requests to this endpoint.</Message></Error>";
                let resp = format!(
                    "HTTP/1.1 301 Moved Permanently\r\nx-amz-bucket-region: eu-west-1\r\ncontent-type: application/xml\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = c.write_all(resp.as_bytes());
            });
        }
    });
    format!("http://{addr}")
}

#[test]
fn a_bucket_in_another_region_says_to_set_the_region() {
    let endpoint = other_region_endpoint();
    let tmp = tempfile::tempdir().unwrap();
    let local = tmp.path().join("r");
    let env = [
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
    ];
    let wants = ["s3://bucket/app", "another region", "AWS_REGION"];
    one_line(
        &[
            "replicate",
            "s3://bucket/app",
            "--local",
            local.to_str().unwrap(),
            "--once",
        ],
        &env,
        &wants,
    );
    one_line(&["inspect", "s3://bucket/app"], &env, &wants);
}

/// A signed dataset of a few keys at `ds`, published with the key in
/// `key`; returns the key's public half.
fn signed_dataset(tmp: &std::path::Path, ds: &std::path::Path, key: &std::path::Path) -> String {
    let public = support::keygen(key);
    let wal = tmp.join("wal");
    let put = b"{\"op\":\"put\",\"key\":\"k\",\"value\":\"v\"}\n";
    support::run(&["write", "--wal", p(&wal)], &Env::new(), Some(put)).ok();
    let url = file_url(ds);
    let (code, _, err) = walcast(
        &[
            "publish",
            "--wal",
            wal.to_str().unwrap(),
            "--to",
            &url,
            "--once",
            "--signing-key",
            key.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{err}");
    public
}

#[test]
fn a_wrong_key_file_says_which_file_to_give() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("ds");
    let key = tmp.path().join("a.key");
    let public = signed_dataset(tmp.path(), &ds, &key);
    let url = file_url(&ds);
    let wal = tmp.path().join("wal");
    let publish = |file: &std::path::Path, wants: &[&str]| {
        let f = file.to_str().unwrap();
        let args = [
            "publish",
            "--wal",
            wal.to_str().unwrap(),
            "--to",
            &url,
            "--once",
            "--signing-key",
            f,
        ];
        let line = one_line(&args, &[], wants);
        assert!(line.contains(f), "names the file: {line}");
        one_line(&["token", "--key", f, "--all"], &[], wants);
    };
    // None there.
    publish(
        &tmp.path().join("missing.key"),
        &["no such key file", "walcast keygen --out"],
    );
    // The public key where the secret key belongs.
    let pub_file = tmp.path().join("a.pub");
    std::fs::write(&pub_file, format!("{public}\n")).unwrap();
    publish(
        &pub_file,
        &["holds a public key", "walcast keygen --out FILE", "--trust"],
    );
    // Something else.
    let other = tmp.path().join("notes.txt");
    std::fs::write(&other, "hello\n").unwrap();
    publish(
        &other,
        &[
            "is not a walcast secret key file",
            "walcast keygen --out FILE",
        ],
    );
    let (code, out, err) = walcast(&["get", "--from", &url, "k"], &[]);
    assert_eq!((code, out.as_str()), (Some(0), "v"), "{err}");
}

#[test]
fn a_wrong_trust_key_says_which_key_to_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("ds");
    let public = signed_dataset(tmp.path(), &ds, &tmp.path().join("a.key"));
    let (_, other, _) = walcast(
        &[
            "keygen",
            "--out",
            tmp.path().join("b.key").to_str().unwrap(),
        ],
        &[],
    );
    let other = other.trim();
    let url = file_url(&ds);
    let local = tmp.path().join("r");
    let wants = [url.as_str(), "signed by", public.as_str(), "--signing-key"];
    one_line(&["get", "--from", &url, "--trust", other, "k"], &[], &wants);
    one_line(&["scan", "--from", &url, "--trust", other], &[], &wants);
    one_line(
        &[
            "replicate",
            &url,
            "--local",
            local.to_str().unwrap(),
            "--once",
            "--trust",
            other,
        ],
        &[],
        &wants,
    );
    one_line(&["inspect", &url, "--trust", other], &[], &wants);

    // An unsigned dataset read with --trust.
    let plain = tmp.path().join("plain");
    let wal = tmp.path().join("wal");
    let plain_url = file_url(&plain);
    let (code, _, err) = walcast(
        &[
            "publish",
            "--wal",
            wal.to_str().unwrap(),
            "--to",
            &plain_url,
            "--once",
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{err}");
    let wants = [
        plain_url.as_str(),
        "not signed",
        "--signing-key",
        "without --trust",
    ];
    one_line(
        &["get", "--from", &plain_url, "--trust", &public, "k"],
        &[],
        &wants,
    );
    one_line(&["inspect", &plain_url, "--trust", &public], &[], &wants);
}

#[test]
fn a_malformed_key_says_what_to_give() {
    let tmp = tempfile::tempdir().unwrap();
    let url = file_url(tmp.path());
    let secret = "walcast-ed25519-secret:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    for (key, want) in [
        (
            "ed25519:nope",
            "ed25519:<base64> line `walcast keygen` printed",
        ),
        ("nope", "ed25519:<base64> line `walcast keygen` printed"),
        (secret, "give its public key"),
    ] {
        for args in [
            vec!["get", "--from", url.as_str(), "--trust", key, "k"],
            vec!["inspect", url.as_str(), "--trust", key],
            vec![
                "replicate",
                url.as_str(),
                "--local",
                "r",
                "--once",
                "--trust",
                key,
            ],
        ] {
            let (code, _, err) = walcast(&args, &[]);
            assert_eq!(code, Some(2), "a usage error: {err}");
            let first = err.lines().next().unwrap_or_default();
            assert!(
                first.starts_with("error: invalid value") && first.contains(want),
                "{args:?}: {err}"
            );
            eprintln!("walcast {}: {first}", args.join(" "));
        }
    }
}

/// A reader that goes away early (`walcast scan | head -1`) ends the command
/// quietly with exit 0: no panic, no error line.
#[test]
fn a_reader_that_closes_stdout_ends_the_command_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    let wal = tmp.path().join("wal");
    let ds = tmp.path().join("ds");
    // Far more output than a pipe buffers, so the writes meet a closed pipe.
    let mut input = String::new();
    for i in 0..4000 {
        input.push_str(&format!(
            "{{\"op\":\"put\",\"key\":\"key-{i:05}\",\"value\":\"{}\"}}\n",
            "v".repeat(40)
        ));
    }
    support::run(
        &["write", "--wal", p(&wal)],
        &Env::new(),
        Some(input.as_bytes()),
    )
    .ok();
    let url = file_url(&ds);
    let (code, _, err) = walcast(
        &[
            "publish",
            "--wal",
            wal.to_str().unwrap(),
            "--to",
            &url,
            "--once",
            "--segment-bytes",
            "4096",
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{err}");
    let args = ["scan", "--from", url.as_str()];
    let mut child = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn walcast");
    let mut first = [0u8; 1];
    child
        .stdout
        .take()
        .unwrap()
        .read_exact(&mut first)
        .expect("the first byte of the output");
    // stdout is closed here; the rest of the output meets a closed pipe.
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "walcast {} with its reader gone: {stderr}",
        args.join(" ")
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("error"),
        "walcast {} with its reader gone wrote to stderr: {stderr}",
        args.join(" ")
    );
}

/// `publish --once` against a store that keeps failing ends, exit 1, with
/// the error naming the object, once the publisher's retries are spent
/// (it retried for ever before, as a publisher without `--once` does).
#[test]
fn publish_once_ends_on_a_store_that_keeps_failing() {
    let tmp = tempfile::tempdir().unwrap();
    let wal = tmp.path().join("wal");
    let ds = tmp.path().join("ds");
    // The head's key is a directory: every read of it fails.
    std::fs::create_dir_all(ds.join("catalog/head.json")).unwrap();
    let (code, _, err) = walcast(&["write", "--wal", p(&wal)], &[]);
    assert_eq!(code, Some(0), "{err}");
    let url = file_url(&ds);
    let (code, _, err) = walcast(&["publish", "--wal", p(&wal), "--to", &url, "--once"], &[]);
    assert_eq!(code, Some(1), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains("reading the head failed") && last.contains("catalog/head.json"),
        "{err}"
    );
}

/// `walcast token --prefix` that names no dataset (empty, as from an unset
/// `$PREFIX`, or only slashes) is refused, saying that a token for every
/// dataset takes `--all`; `--all` gives one with the empty prefix.
#[test]
fn a_token_for_every_dataset_takes_all() {
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("k.key");
    let (code, _, err) = walcast(&["keygen", "--out", p(&key)], &[]);
    assert_eq!(code, Some(0), "{err}");
    for prefix in ["", "/", "//"] {
        one_line(
            &["token", "--key", p(&key), "--prefix", prefix],
            &[],
            &["names no dataset", "--all"],
        );
    }
    let (code, out, err) = walcast(&["token", "--key", p(&key), "--all"], &[]);
    assert_eq!(code, Some(0), "{err}");
    let public: walcast_core::keys::PublicKey = std::fs::read_to_string(&key)
        .ok()
        .and_then(|s| walcast_core::keys::SecretKey::parse_file(&s).ok())
        .map(|k| k.public())
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = walcast_core::token::verify(out.trim(), &public, now).unwrap();
    assert_eq!(claims.prefix, "");
}
