//! A private dataset over plain HTTP: the server answers 401 unless a GET
//! carries the right `Authorization` header and the right token in the
//! query string. `walcast replicate` and `walcast inspect` reach it with
//! `--header` and a dataset URL holding the query, and never print either
//! credential, not even at debug level or when the server refuses them.

use crate::support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use support::{
    file_url, gen_batches, publish_once, replicate_once, run, scan, write, Env, GenOpts, Rng,
};

const SECRET: &str = "Bearer s3cr3t-h34d3r";
const TOKEN: &str = "t0k3n-in-the-query";

/// Reads one request's line and header lines from `c` (without their line
/// ends); `None` when the connection ends before the request line.
fn read_request(c: &std::net::TcpStream) -> Option<(String, Vec<String>)> {
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return None;
    }
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        headers.push(h.trim_end().to_string());
    }
    Some((line.trim_end().to_string(), headers))
}

/// A tiny file server for `root` on a thread: 401 without both credentials,
/// 404 for missing files, else the whole file (no Range: the replica copes).
fn private_server(root: PathBuf) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let Some((line, headers)) = read_request(&c) else {
                continue;
            };
            let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
            let auth = headers.iter().find_map(|h| {
                let (k, v) = h.split_once(':')?;
                k.eq_ignore_ascii_case("authorization")
                    .then(|| v.trim().to_string())
            });
            let (path, query) = target.split_once('?').unwrap_or((&target, ""));
            let reply = |c: &mut std::net::TcpStream, status: &str, body: &[u8]| {
                let _ = write!(
                    c,
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = c.write_all(body);
            };
            if auth.as_deref() != Some(SECRET) || query != format!("token={TOKEN}") {
                reply(&mut c, "401 Unauthorized", b"unauthorized");
                continue;
            }
            let rel = path.trim_start_matches('/');
            if rel.split('/').any(|p| p == ".." || p.is_empty()) {
                reply(&mut c, "404 Not Found", b"");
                continue;
            }
            match std::fs::read(root.join(rel)) {
                Ok(b) => reply(&mut c, "200 OK", &b),
                Err(_) => reply(&mut c, "404 Not Found", b""),
            }
        }
    });
    port
}

fn dataset(dir: &Path) -> (PathBuf, u64) {
    let wal = dir.join("wal");
    let ds = dir.join("ds");
    let mut rng = Rng::new(7);
    let batches = gen_batches(&mut rng, 60, GenOpts::default());
    let lsns = write(&wal, &batches);
    publish_once(&wal, &file_url(&ds), &[], &Env::new()).ok();
    (ds, *lsns.last().unwrap())
}

#[test]
fn replicate_and_inspect_reach_a_private_dataset_without_printing_credentials() {
    let tmp = tempfile::tempdir().unwrap();
    let (ds, _) = dataset(tmp.path());
    let port = private_server(ds.clone());
    let url = format!("http://127.0.0.1:{port}/?token={TOKEN}");
    let header = format!("Authorization: {SECRET}");
    let debug: Env = vec![("RUST_LOG".into(), "walcast=debug".into())];

    // Without the header: refused, and neither credential is printed.
    let local = tmp.path().join("denied");
    let out = replicate_once(&url, &local, &debug).failed();
    assert!(out.stderr.contains("401"), "{}", out.describe());
    assert!(
        !out.stderr.contains(TOKEN),
        "token printed: {}",
        out.describe()
    );

    // With both: the replica equals the local one.
    let local = tmp.path().join("replica");
    let out = run(
        &[
            "replicate",
            &url,
            "--local",
            local.to_str().unwrap(),
            "--once",
            "--header",
            &header,
        ],
        &debug,
        None,
    )
    .ok();
    for secret in [TOKEN, "s3cr3t"] {
        assert!(
            !out.stderr.contains(secret),
            "credential printed: {}",
            out.describe()
        );
    }
    let direct = tmp.path().join("direct");
    replicate_once(&file_url(&ds), &direct, &Env::new()).ok();
    assert_eq!(scan(&local), scan(&direct));

    let out = run(
        &["inspect", &url, "--header", &header, "--verify"],
        &debug,
        None,
    )
    .ok();
    assert!(out.stdout_str().contains("verify"), "{}", out.describe());
    for secret in [TOKEN, "s3cr3t"] {
        assert!(
            !out.stderr.contains(secret),
            "credential printed: {}",
            out.describe()
        );
        assert!(
            !out.stdout_str().contains(secret),
            "credential printed: {}",
            out.describe()
        );
    }

    // A header for a store that takes credentials from the environment is
    // refused, not ignored.
    let out = run(
        &["inspect", &file_url(&ds), "--header", &header],
        &Env::new(),
        None,
    )
    .failed();
    assert!(out.stderr.contains("--header"), "{}", out.describe());
    assert!(!out.stderr.contains("s3cr3t"), "{}", out.describe());
}

/// A server that answers every GET with `302 Location: {to}{path}`.
fn redirecting_server(to: String) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let Some((line, _)) = read_request(&c) else {
                continue;
            };
            let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
            let _ = write!(
                c,
                "HTTP/1.1 302 Found\r\nLocation: {to}{target}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    port
}

/// A server that records every request it is sent (line and headers) and answers 404.
fn recording_server() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let (line, headers) = read_request(&c).unwrap_or_default();
            log.lock()
                .unwrap()
                .push(format!("{line}\n{}", headers.join("\n")));
            let _ = write!(
                c,
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    (port, seen)
}

#[test]
fn a_redirect_to_another_origin_is_not_followed_and_carries_no_credential_there() {
    let (other, seen) = recording_server();
    // Another origin: "localhost" is not the host the dataset URL names.
    let port = redirecting_server(format!("http://localhost:{other}"));
    let url = format!("http://127.0.0.1:{port}/?token={TOKEN}");
    let header = "X-Api-Key: s3cr3t-api-key";
    let out = run(
        &["get", "--from", &url, "k", "--header", header],
        &Env::new(),
        None,
    )
    .failed();
    assert!(out.stderr.contains("302"), "{}", out.describe());
    let seen = seen.lock().unwrap();
    assert!(
        seen.is_empty(),
        "the redirect was followed to another origin: {seen:?}"
    );
    for secret in [TOKEN, "s3cr3t"] {
        assert!(!out.stderr.contains(secret), "{}", out.describe());
    }
}
