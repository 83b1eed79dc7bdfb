//! Access tokens end to end: `walcast keygen`, `walcast token`, `walcast
//! serve --verify-key` answering 401 for every kind of bad token (missing,
//! malformed, wrong signature, expired, wrong prefix) and serving Range and
//! conditional requests with a good one, in the header or the query; then a
//! native replica reading through the token (`--header`, and `?token=`).

use crate::support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::header;
use reqwest::StatusCode;
use support::{
    file_url, gen_batches, publish_once, replicate_once, run, scan, walcast_cmd, write, Deadline,
    Env, GenOpts, Proc, Rng,
};
use walcast_core::keys::SecretKey;
use walcast_core::token;

/// `walcast serve ROOT --verify-key KEY [extra…]`, its URL once it listens.
fn serve(root: &Path, key: &str, extra: &[&str], logs: &Path) -> (Proc, String) {
    let mut args = vec![
        "serve",
        root.to_str().unwrap(),
        "--addr",
        "127.0.0.1:0",
        "--verify-key",
        key,
    ];
    args.extend_from_slice(extra);
    let mut proc = Proc::spawn("serve", walcast_cmd(&args, &Env::new()), logs);
    let deadline = Deadline::after(Duration::from_secs(30), "walcast serve start");
    loop {
        let out = proc.stdout();
        if let Some(line) = out.lines().next().filter(|_| out.contains('\n')) {
            let url = line
                .strip_prefix("walcast serve: listening on ")
                .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
                .trim()
                .to_string();
            return (proc, url);
        }
        assert!(proc.try_status().is_none(), "serve exited\n{}", proc.logs());
        deadline.check();
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A dataset published under `root/app`; returns its last LSN.
fn dataset(root: &Path, tmp: &Path) -> u64 {
    let wal = tmp.join("wal");
    let mut rng = Rng::new(11);
    let batches = gen_batches(&mut rng, 80, GenOpts::default());
    let lsns = write(&wal, &batches);
    publish_once(&wal, &file_url(&root.join("app")), &[], &Env::new()).ok();
    *lsns.last().unwrap()
}

/// An answer, read whole.
struct Resp {
    status: StatusCode,
    headers: header::HeaderMap,
    body: Vec<u8>,
}

/// A blocking HTTP client over reqwest's async one.
struct Client {
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
}

impl Client {
    fn new() -> Client {
        Client {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            client: reqwest::Client::new(),
        }
    }

    fn send(&self, method: reqwest::Method, url: &str, headers: &[(&str, &str)]) -> Resp {
        self.rt.block_on(async {
            let mut req = self.client.request(method, url);
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status();
            let headers = resp.headers().clone();
            let body = resp.bytes().await.unwrap().to_vec();
            Resp {
                status,
                headers,
                body,
            }
        })
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn newest_segment(root: &Path) -> String {
    let mut segs = Vec::new();
    let dir = root.join("app/segments");
    for epoch in std::fs::read_dir(&dir).unwrap() {
        let epoch = epoch.unwrap();
        for f in std::fs::read_dir(epoch.path()).unwrap() {
            let f = f.unwrap();
            segs.push(format!(
                "app/segments/{}/{}",
                epoch.file_name().to_string_lossy(),
                f.file_name().to_string_lossy()
            ));
        }
    }
    segs.sort();
    segs.pop().expect("a segment")
}

#[test]
fn serve_requires_a_valid_token_and_replicas_read_with_one() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let last = dataset(&root, tmp.path());
    let logs = tmp.path().join("logs");

    // keygen writes the key; token reads it.
    let keyfile = tmp.path().join("token.key");
    let out = run(
        &["keygen", "--out", keyfile.to_str().unwrap()],
        &Env::new(),
        None,
    )
    .ok();
    let public = out.stdout_str().trim().to_string();
    assert!(public.starts_with("ed25519:"), "{public}");
    let out = run(
        &[
            "token",
            "--key",
            keyfile.to_str().unwrap(),
            "--prefix",
            "app",
            "--ttl",
            "1h",
        ],
        &Env::new(),
        None,
    )
    .ok();
    let good = out.stdout_str().trim().to_string();
    assert!(good.starts_with("wct1."), "{good}");
    let claims = token::verify(&good, &public.parse().unwrap(), now()).unwrap();
    assert_eq!(claims.prefix, "app");
    assert!((3590..=3610).contains(&(claims.exp - claims.iat)));
    let bad_ttl = run(
        &[
            "token",
            "--key",
            keyfile.to_str().unwrap(),
            "--prefix",
            "app",
            "--ttl",
            "1y",
        ],
        &Env::new(),
        None,
    )
    .failed();
    assert!(bad_ttl.stderr.contains("1y"), "{}", bad_ttl.describe());
    let secret = SecretKey::parse_file(&std::fs::read_to_string(&keyfile).unwrap()).unwrap();

    let (mut server, url) = serve(&root, &public, &[], &logs);
    let client = Client::new();
    let head = "app/catalog/head.json";
    let segment = newest_segment(&root);
    let get = |path: &str, headers: &[(&str, &str)]| {
        client.send(reqwest::Method::GET, &format!("{url}/{path}"), headers)
    };
    let bearer = format!("Bearer {good}");

    // Every refusal: 401, WWW-Authenticate naming why, nothing else.
    let other = SecretKey::from_seed([9; 32]);
    let cases: Vec<(&str, String, Option<String>)> = vec![
        ("missing", head.into(), None),
        ("malformed", head.into(), Some("Bearer not-a-token".into())),
        (
            "malformed",
            head.into(),
            Some(format!("Bearer {}x.y", &good[..good.len() / 2])),
        ),
        (
            "bad_signature",
            head.into(),
            Some(format!(
                "Bearer {}",
                token::issue(&other, "app", now(), 3600)
            )),
        ),
        (
            "expired",
            head.into(),
            Some(format!(
                "Bearer {}",
                token::issue(&secret, "app", now() - 7200, 3600)
            )),
        ),
        (
            "wrong_prefix",
            head.into(),
            Some(format!(
                "Bearer {}",
                token::issue(&secret, "other", now(), 3600)
            )),
        ),
        (
            "wrong_prefix",
            head.into(),
            Some(format!(
                "Bearer {}",
                token::issue(&secret, "ap", now(), 3600)
            )),
        ),
        // Refused before anything else: no 404 for what does not exist.
        ("missing", "app/no/such/object".into(), None),
    ];
    for (why, path, auth) in &cases {
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("authorization", a)])
            .unwrap_or_default();
        let resp = get(path, &headers);
        assert_eq!(resp.status, StatusCode::UNAUTHORIZED, "{why} {path}");
        let www = resp.headers[header::WWW_AUTHENTICATE].to_str().unwrap();
        assert!(
            www.starts_with("Bearer ") && www.contains(&format!("error_description=\"{why}\"")),
            "{why}: {www}"
        );
        assert_eq!(resp.headers[header::CACHE_CONTROL], "no-store");
        let body = String::from_utf8_lossy(&resp.body);
        assert!(!body.contains(&good), "a token echoed: {body}");
    }
    // A bad token in the query is refused too.
    let resp = get(
        &format!(
            "{head}?token={}",
            token::issue(&secret, "app", now() - 7200, 60)
        ),
        &[],
    );
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED);

    // With a good token: the object, Range and If-None-Match as without.
    let resp = get(head, &[("authorization", &bearer)]);
    assert_eq!(resp.status, StatusCode::OK);
    let etag = resp.headers[header::ETAG].to_str().unwrap().to_string();
    let resp = get(
        head,
        &[("authorization", &bearer), ("if-none-match", &etag)],
    );
    assert_eq!(resp.status, StatusCode::NOT_MODIFIED);
    let whole = std::fs::read(root.join(&segment)).unwrap();
    let resp = get(
        &segment,
        &[("authorization", &bearer), ("range", "bytes=2-9")],
    );
    assert_eq!(resp.status, StatusCode::PARTIAL_CONTENT);
    // Cached no longer than the token (1 h) is valid.
    let cached = |resp: &Resp, scope: &str| {
        let cc = resp.headers[header::CACHE_CONTROL]
            .to_str()
            .unwrap()
            .to_string();
        let age: u64 = cc
            .strip_prefix(&format!("{scope}, max-age="))
            .and_then(|r| r.strip_suffix(", immutable"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{cc}"));
        assert!((3_000..=3_600).contains(&age), "{cc}");
    };
    cached(&resp, "private");
    assert_eq!(resp.body.as_slice(), &whole[2..10]);
    let resp = get(&format!("{segment}?token={good}"), &[("range", "bytes=-4")]);
    assert_eq!(resp.status, StatusCode::PARTIAL_CONTENT);
    // A token in the URL: the URL is the cache key.
    cached(&resp, "public");
    assert_eq!(resp.body.as_slice(), &whole[whole.len() - 4..]);

    // No wildcard CORS with tokens on (none asked for).
    let resp = get(
        head,
        &[
            ("authorization", &bearer),
            ("origin", "https://evil.example"),
        ],
    );
    assert_eq!(resp.status, StatusCode::OK);
    assert!(
        resp.headers
            .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
            .is_none(),
        "{:?}",
        resp.headers
    );

    // Lazy reads (`get --from`): the token in a header, or in the URL.
    let key = {
        let state = {
            let local = tmp.path().join("probe");
            replicate_once(&file_url(&root.join("app")), &local, &Env::new()).ok();
            scan(&local)
        };
        let (k, v) = state
            .into_iter()
            .find(|(k, _)| {
                std::str::from_utf8(k).is_ok_and(|s| !s.is_empty() && !s.starts_with('-'))
            })
            .expect("a UTF-8 key");
        (String::from_utf8(k).unwrap(), v)
    };
    let header_arg = format!("Authorization: Bearer {good}");
    for args in [
        vec![
            "get",
            "--from",
            &format!("{url}/app"),
            &key.0,
            "--header",
            &header_arg,
        ],
        vec!["get", "--from", &format!("{url}/app?token={good}"), &key.0],
    ] {
        let out = run(&args, &Env::new(), None).ok();
        assert_eq!(out.stdout, key.1, "get --from with a token");
    }
    let out = run(
        &["get", "--from", &format!("{url}/app"), &key.0],
        &Env::new(),
        None,
    )
    .failed();
    // It says why, and what to pass.
    assert!(
        out.stderr.contains("401 (missing)") && out.stderr.contains("walcast token"),
        "{}",
        out.describe()
    );

    // Native replicas: the token in a header, or in the dataset URL.
    let debug: Env = vec![("RUST_LOG".into(), "walcast=debug".into())];
    let local = tmp.path().join("denied");
    let out = replicate_once(&format!("{url}/app"), &local, &Env::new()).failed();
    assert!(out.stderr.contains("401"), "{}", out.describe());
    let direct = tmp.path().join("direct");
    replicate_once(&file_url(&root.join("app")), &direct, &Env::new()).ok();
    let want = scan(&direct);
    assert!(!want.is_empty());
    for (name, url, header) in [
        (
            "header",
            format!("{url}/app"),
            Some(format!("Authorization: Bearer {good}")),
        ),
        ("query", format!("{url}/app?token={good}"), None),
    ] {
        let local: PathBuf = tmp.path().join(format!("replica-{name}"));
        let mut args = vec![
            "replicate".to_string(),
            url.clone(),
            "--local".into(),
            local.to_str().unwrap().into(),
            "--once".into(),
        ];
        if let Some(h) = &header {
            args.push("--header".into());
            args.push(h.clone());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(&args, &debug, None).ok();
        assert!(
            !out.stderr.contains(&good) && !out.stdout_str().contains(&good),
            "{name}: the token was printed\n{}",
            out.describe()
        );
        assert_eq!(scan(&local), want, "{name}");
        let _ = last;
    }
    server.kill9();
}

#[test]
fn serve_with_tokens_takes_an_explicit_wildcard_and_rotated_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    dataset(&root, tmp.path());
    let old = SecretKey::from_seed([1; 32]);
    let new = SecretKey::from_seed([2; 32]);
    let (old_pub, new_pub) = (old.public().to_string(), new.public().to_string());
    let (mut server, url) = serve(
        &root,
        &old_pub,
        &["--verify-key", &new_pub, "--cors-origin", "*"],
        &tmp.path().join("logs"),
    );
    let client = Client::new();
    for key in [&old, &new] {
        let t = format!("Bearer {}", token::issue(key, "", now(), 60));
        let resp = client.send(
            reqwest::Method::GET,
            &format!("{url}/app/catalog/head.json"),
            &[("authorization", &t), ("origin", "https://app.example")],
        );
        assert_eq!(resp.status, StatusCode::OK);
        assert_eq!(resp.headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
    }
    // A preflight needs no token (browsers send none).
    let resp = client.send(
        reqwest::Method::OPTIONS,
        &format!("{url}/app/catalog/head.json"),
        &[
            ("origin", "https://app.example"),
            ("access-control-request-method", "GET"),
            ("access-control-request-headers", "authorization"),
        ],
    );
    assert!(resp.status.is_success(), "{}", resp.status);
    server.kill9();
}

#[test]
fn a_long_poll_held_past_its_tokens_expiry_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    dataset(&root, tmp.path());
    let key = SecretKey::from_seed([3; 32]);
    let (mut server, url) = serve(
        &root,
        &key.public().to_string(),
        &[],
        &tmp.path().join("logs"),
    );
    let head = format!("{url}/app/catalog/head.json");
    let lasting = format!("Bearer {}", token::issue(&key, "app", now(), 3600));
    let first = Client::new().send(reqwest::Method::GET, &head, &[("authorization", &lasting)]);
    assert_eq!(first.status, StatusCode::OK);
    let etag = first.headers[header::ETAG].to_str().unwrap().to_string();
    // A token that expires in 2 s holds a long-poll on the head...
    let issued = now();
    let short = format!("Bearer {}", token::issue(&key, "app", issued, 2));
    let held = std::thread::spawn(move || {
        Client::new().send(
            reqwest::Method::GET,
            &head,
            &[
                ("authorization", &short),
                ("if-none-match", &etag),
                ("prefer", "wait=20"),
            ],
        )
    });
    // ...and the head changes only after it expired.
    while now() <= issued + 3 {
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut rng = Rng::new(12);
    write(
        &tmp.path().join("wal"),
        &gen_batches(&mut rng, 5, GenOpts::default()),
    );
    publish_once(
        &tmp.path().join("wal"),
        &file_url(&root.join("app")),
        &[],
        &Env::new(),
    )
    .ok();
    let resp = held.join().unwrap();
    assert_eq!(
        resp.status,
        StatusCode::UNAUTHORIZED,
        "a head that came after the token expired: {}",
        String::from_utf8_lossy(&resp.body)
    );
    server.kill9();
}
