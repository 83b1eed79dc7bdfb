//! Signed datasets end to end with the `walcast` binary: keygen, a signed
//! publish to a file:// dataset, pinned and unpinned replicas, a key
//! rotation, and refusals with the `untrusted` error code.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn walcast(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_walcast"))
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running walcast");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    child.wait_with_output().expect("walcast output")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "walcast failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn write(wal: &Path, from: u32, to: u32) {
    let lines: String = (from..to)
        .map(|i| format!("{{\"op\":\"put\",\"key\":\"user:{i:03}\",\"value\":\"v{i}\"}}\n"))
        .collect();
    ok(&walcast(
        &["write", "--wal", wal.to_str().unwrap()],
        Some(&lines),
    ));
}

fn keygen(path: &Path) -> String {
    let out = ok(&walcast(&["keygen", "--out", path.to_str().unwrap()], None));
    let public = out.trim().to_string();
    assert!(
        public.starts_with("ed25519:") && public.len() == 52,
        "{public}"
    );
    public
}

fn replicate(url: &str, local: &Path, trust: &[&str]) -> Output {
    let mut args = vec![
        "replicate",
        url,
        "--local",
        local.to_str().unwrap(),
        "--once",
    ];
    for t in trust {
        args.extend(["--trust", t]);
    }
    walcast(&args, None)
}

fn get(local: &Path, key: &str) -> String {
    ok(&walcast(
        &["get", "--local", local.to_str().unwrap(), key],
        None,
    ))
    .trim()
    .to_string()
}

#[test]
fn signed_publish_pinned_replicas_and_rotation() {
    let tmp = tempfile::tempdir().unwrap();
    let wal = tmp.path().join("wal");
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let url = url::Url::from_directory_path(&data).unwrap().to_string();
    let (key_a, key_b) = (tmp.path().join("a.key"), tmp.path().join("b.key"));
    let pub_a = keygen(&key_a);
    let pub_b = keygen(&key_b);
    // The secret key file: one line, owner-only, never overwritten.
    let text = std::fs::read_to_string(&key_a).unwrap();
    assert!(text.starts_with("walcast-ed25519-secret:") && text.ends_with('\n'));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key_a).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let again = walcast(&["keygen", "--out", key_a.to_str().unwrap()], None);
    assert!(!again.status.success());
    assert_eq!(std::fs::read_to_string(&key_a).unwrap(), text);

    write(&wal, 0, 50);
    let to = [
        "publish",
        "--wal",
        wal.to_str().unwrap(),
        "--to",
        &url,
        "--once",
    ];
    let mut args = to.to_vec();
    args.extend(["--signing-key", key_a.to_str().unwrap()]);
    ok(&walcast(&args, None));
    let head = std::fs::read_to_string(data.join("catalog/head.json")).unwrap();
    assert!(
        head.contains("\"signature\":\"") && head.contains(&pub_a),
        "{head}"
    );

    // Pinned to A, and unpinned: both read it.
    let pinned = tmp.path().join("pinned");
    ok(&replicate(&url, &pinned, &[&pub_a]));
    assert_eq!(get(&pinned, "user:049"), "v49");
    let open = tmp.path().join("open");
    ok(&replicate(&url, &open, &[]));
    assert_eq!(get(&open, "user:049"), "v49");

    // Pinned to B only: untrusted, nothing applied.
    let wrong = tmp.path().join("wrong");
    let out = replicate(&url, &wrong, &[&pub_b]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("untrusted"), "{err}");

    // Rotate A -> B: the replica pinned to A follows.
    write(&wal, 50, 80);
    let mut args = to.to_vec();
    args.extend([
        "--signing-key",
        key_b.to_str().unwrap(),
        "--previous-key",
        key_a.to_str().unwrap(),
    ]);
    ok(&walcast(&args, None));
    ok(&replicate(&url, &pinned, &[&pub_a]));
    assert_eq!(get(&pinned, "user:079"), "v79");
    ok(&replicate(&url, &wrong, &[&pub_b]));
    assert_eq!(get(&wrong, "user:079"), "v79");

    // The same dataset published unsigned again: pinned replicas refuse it
    // and keep what they have.
    write(&wal, 80, 90);
    ok(&walcast(&to, None));
    let out = replicate(&url, &pinned, &[&pub_a]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("untrusted"));
    assert_eq!(get(&pinned, "user:079"), "v79");
    assert!(!walcast(
        &["get", "--local", pinned.to_str().unwrap(), "user:085"],
        None
    )
    .status
    .success());

    // A malformed key is refused on the command line.
    let out = replicate(&url, &open, &["ed25519:nope"]);
    assert!(!out.status.success());
}

/// `walcast get/scan --from --trust` and `walcast inspect --trust`: a
/// signed dataset reads with its key, is refused (`untrusted`, nothing on
/// stdout) with another, after a rotation reads with the old key through
/// the chain, and unsigned again is refused; inspect shows the signer and
/// the chain, and `--verify` checks every page signature and digest.
#[test]
fn lazy_reads_and_inspect_pin_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let wal = tmp.path().join("wal");
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let url = url::Url::from_directory_path(&data).unwrap().to_string();
    let (key_a, key_b) = (tmp.path().join("a.key"), tmp.path().join("b.key"));
    let pub_a = keygen(&key_a);
    let pub_b = keygen(&key_b);
    let publish = |extra: &[&str]| {
        let mut args = vec![
            "publish",
            "--wal",
            wal.to_str().unwrap(),
            "--to",
            &url,
            "--once",
            // Small segments and a snapshot: pages, segments and a snapshot
            // all carry digests.
            "--segment-bytes",
            "1024",
            "--snapshot-every",
            "40",
        ];
        args.extend(extra);
        ok(&walcast(&args, None));
    };
    write(&wal, 0, 60);
    publish(&["--signing-key", key_a.to_str().unwrap()]);

    let get_from = |key: &str, trust: &[&str]| {
        let mut args = vec!["get", "--from", &url, key];
        for t in trust {
            args.extend(["--trust", t]);
        }
        walcast(&args, None)
    };
    assert_eq!(ok(&get_from("user:007", &[&pub_a])), "v7");
    assert_eq!(ok(&get_from("user:059", &[&pub_b, &pub_a])), "v59");
    let scan = ok(&walcast(
        &[
            "scan", "--from", &url, "--trust", &pub_a, "--prefix", "user:05",
        ],
        None,
    ));
    assert_eq!(scan.lines().count(), 10, "{scan}");
    let out = get_from("user:007", &[&pub_b]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&pub_a) && err.contains("--trust"), "{err}");

    // inspect: the signer; pinned and verified; another key refused.
    let shown = ok(&walcast(&["inspect", &url], None));
    assert!(
        shown.contains(&format!("signed       by {pub_a}")) && shown.contains("no key pinned"),
        "{shown}"
    );
    let shown = ok(&walcast(
        &["inspect", &url, "--verify", "--trust", &pub_a],
        None,
    ));
    assert!(
        shown.contains("(trusted)") && shown.contains("verify       OK"),
        "{shown}"
    );
    let out = walcast(&["inspect", &url, "--trust", &pub_b], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("signed by"));

    // Rotate A -> B: readers pinned to A follow the chain; inspect shows it.
    write(&wal, 60, 90);
    publish(&[
        "--signing-key",
        key_b.to_str().unwrap(),
        "--previous-key",
        key_a.to_str().unwrap(),
    ]);
    assert_eq!(ok(&get_from("user:089", &[&pub_a])), "v89");
    let json = ok(&walcast(
        &["inspect", &url, "--json", "--verify", "--trust", &pub_a],
        None,
    ));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["signer"], pub_b.as_str(), "{v}");
    assert_eq!(v["pinned"], true);
    assert_eq!(v["key_chain"][0]["by"], pub_a.as_str(), "{v}");
    assert_eq!(v["key_chain"][0]["key"], pub_b.as_str(), "{v}");
    assert_eq!(v["key_chain"][0]["valid"], true);
    assert_eq!(v["failures"].as_array().unwrap().len(), 0, "{v}");

    // Unsigned again: pinned readers refuse it.
    write(&wal, 90, 95);
    publish(&[]);
    let out = get_from("user:091", &[&pub_a]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not signed"), "{err}");
    assert_eq!(ok(&get_from("user:091", &[])), "v91");
}

#[test]
fn verified_blocks_publish_version_4_with_its_index_digest_in_the_signed_head() {
    let tmp = tempfile::tempdir().unwrap();
    let wal = tmp.path().join("wal");
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let url = url::Url::from_directory_path(&data).unwrap().to_string();
    let key = tmp.path().join("a.key");
    let public = keygen(&key);
    write(&wal, 0, 50);
    let args = [
        "publish",
        "--wal",
        wal.to_str().unwrap(),
        "--to",
        &url,
        "--once",
        "--snapshot-every",
        "10",
        "--signing-key",
        key.to_str().unwrap(),
        "--verified-blocks",
    ];
    ok(&walcast(&args, None));
    let head = std::fs::read_to_string(data.join("catalog/head.json")).unwrap();
    assert!(head.contains("\"index_digests\":{\""), "{head}");
    assert!(head.contains("\"version\":4"), "{head}");
    // A pinned replica reads it.
    let pinned = tmp.path().join("pinned");
    ok(&replicate(&url, &pinned, &[&public]));
    assert_eq!(get(&pinned, "user:049"), "v49");
    assert_eq!(get(&pinned, "user:001"), "v1");
    // The flag needs a signing key.
    let mut no_key = args[..8].to_vec();
    no_key.push("--verified-blocks");
    assert!(!walcast(&no_key, None).status.success());
}
