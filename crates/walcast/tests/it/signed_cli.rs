//! Signed datasets end to end with the `walcast` binary: keygen, a signed
//! publish to a file:// dataset, pinned and unpinned replicas, a key
//! rotation, and refusals with the `untrusted` error code.

use crate::support::{self, Env, Out};

use std::path::Path;

/// `walcast ARGS` with `stdin`, bounded (`support::run`).
fn walcast(args: &[&str], stdin: Option<&str>) -> Out {
    support::run(args, &Env::new(), stdin.map(str::as_bytes))
}

/// Its stdout; panics unless it exited 0.
fn ok(out: &Out) -> String {
    assert_eq!(out.code, Some(0), "walcast failed: {}", out.describe());
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

fn replicate(url: &str, local: &Path, trust: &[&str]) -> Out {
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
    let pub_a = support::keygen(&key_a);
    let pub_b = support::keygen(&key_b);
    // The secret key file: one line, owner-only, never overwritten.
    let text = std::fs::read_to_string(&key_a).unwrap();
    assert!(text.starts_with("walcast-ed25519-secret:") && text.ends_with('\n'));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key_a).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let again = walcast(&["keygen", "--out", key_a.to_str().unwrap()], None);
    assert!(again.code != Some(0));
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
    assert!(out.code != Some(0));
    let err = out.stderr.as_str();
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
    // (Refused without saying so.)
    write(&wal, 80, 90);
    let out = walcast(&to, None);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains("--drop-signature"),
        "{}",
        out.describe()
    );
    let mut args = to.to_vec();
    args.push("--drop-signature");
    ok(&walcast(&args, None));
    let out = replicate(&url, &pinned, &[&pub_a]);
    assert!(out.code != Some(0));
    assert!(out.stderr.as_str().contains("untrusted"));
    assert_eq!(get(&pinned, "user:079"), "v79");
    let out = walcast(
        &["get", "--local", pinned.to_str().unwrap(), "user:085"],
        None,
    );
    assert_ne!(out.code, Some(0));

    // A malformed key is refused on the command line.
    let out = replicate(&url, &open, &["ed25519:nope"]);
    assert!(out.code != Some(0));
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
    let pub_a = support::keygen(&key_a);
    let pub_b = support::keygen(&key_b);
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
    assert_eq!(out.code, Some(1));
    assert!(out.stdout.is_empty());
    let err = out.stderr.as_str();
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
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.as_str().contains("signed by"));

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
    publish(&["--drop-signature"]);
    let out = get_from("user:091", &[&pub_a]);
    assert_eq!(out.code, Some(1));
    let err = out.stderr.as_str();
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
    let public = support::keygen(&key);
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
    assert_ne!(walcast(&no_key, None).code, Some(0));
}

/// Flips byte `at` of `orig` and re-checksums, as an attacker would, so that
/// every CRC-32 still matches: `reseal` fixes the inner checksum (a record's
/// or a chunk's), and the four bytes at `free` (inside what `reseal` covers)
/// are solved for the whole file's CRC-32 (the catalog's `crc32`) to come
/// out unchanged: CRC-32 is affine over GF(2), so this is Gaussian
/// elimination over 32 bits. Returns the tampered file.
fn recrc(orig: &[u8], at: usize, free: [usize; 4], reseal: impl Fn(&mut Vec<u8>)) -> Vec<u8> {
    assert!(!free.contains(&at));
    let with = |d: u32| {
        let mut b = orig.to_vec();
        b[at] ^= 0x5a;
        for (i, &f) in free.iter().enumerate() {
            b[f] ^= (d >> (8 * i)) as u8;
        }
        reseal(&mut b);
        b
    };
    let f0 = crc32fast::hash(&with(0));
    let target = f0 ^ crc32fast::hash(orig);
    // Columns: what each free bit does to the file's checksum.
    let mut pivots: Vec<(u32, u32)> = Vec::new();
    for (mut v, mut d) in (0..32).map(|i| (crc32fast::hash(&with(1 << i)) ^ f0, 1u32 << i)) {
        for &(pv, pd) in &pivots {
            if v ^ pv < v {
                v ^= pv;
                d ^= pd;
            }
        }
        if v != 0 {
            pivots.push((v, d));
            pivots.sort_by_key(|b| std::cmp::Reverse(b.0));
        }
    }
    let (mut v, mut d) = (target, 0u32);
    for &(pv, pd) in &pivots {
        if v ^ pv < v {
            v ^= pv;
            d ^= pd;
        }
    }
    assert_eq!(
        v, 0,
        "the free bytes cannot cancel the change (pick others)"
    );
    let out = with(d);
    assert_ne!(out, orig);
    assert_eq!(crc32fast::hash(&out), crc32fast::hash(orig));
    out
}

/// A segment whose record holding payload byte `at` is changed, the
/// record's CRC-32 and the file's both still matching.
fn tamper_keeping_crcs(seg: &[u8], at: usize) -> Vec<u8> {
    // The record around `at`: walk the framing from the header.
    let mut pos = 32;
    let (start, len) = loop {
        let len = u32::from_le_bytes(seg[pos + 8..pos + 12].try_into().unwrap()) as usize;
        if at >= pos + 16 && at < pos + 16 + len {
            break (pos, len);
        }
        pos += 16 + len;
        assert!(pos < seg.len(), "byte {at} is not in a record's payload");
    };
    assert!(len >= 6, "a payload of {len} bytes is too short");
    // Four payload bytes other than `at` to solve for.
    let f = if at >= start + 16 + 4 {
        start + 16
    } else {
        start + 16 + len - 4
    };
    recrc(seg, at, [f, f + 1, f + 2, f + 3], |b| {
        let crc =
            crc32fast::hash(&[&b[start..start + 12], &b[start + 16..start + 16 + len]].concat());
        b[start + 12..start + 16].copy_from_slice(&crc.to_le_bytes());
    })
}

/// A version 2 snapshot (the publisher's default) with one data block whose
/// value byte is changed, and every checksum fixed up as an attacker would:
/// the block's CRC-32, its handle's copy in the top index, the top index's
/// CRC-32, the footer's handle and CRC-32, and four more value bytes solved
/// for the whole file's CRC-32 (the catalog's) to come out unchanged.
fn tamper_snapshot_keeping_crcs(snap: &[u8]) -> Vec<u8> {
    let u32_at = |b: &[u8], p: usize| u32::from_le_bytes(b[p..p + 4].try_into().unwrap());
    assert_eq!(
        u16::from_le_bytes([snap[4], snap[5]]),
        2,
        "a version 2 snapshot"
    );
    let footer = snap.len() - 48;
    assert_eq!(&snap[footer + 44..], b"WCS2");
    assert_eq!(u32_at(snap, footer + 32), 1, "one data block");
    assert_eq!(snap[footer + 36], 1, "one index level");
    let top = u64::from_le_bytes(snap[footer + 8..footer + 16].try_into().unwrap()) as usize;
    let top_len = u32_at(snap, footer + 16) as usize;
    // The data block at 56: len, count, crc, then entries (varint shared,
    // varint unshared, varint value_len, key suffix, value) and restarts.
    let (blk, len, count) = (56, u32_at(snap, 56) as usize, u32_at(snap, 60));
    let varint = |p: &mut usize| {
        let (mut v, mut shift) = (0usize, 0);
        loop {
            let b = snap[*p];
            *p += 1;
            v |= ((b & 0x7f) as usize) << shift;
            if b & 0x80 == 0 {
                return v;
            }
            shift += 7;
        }
    };
    let mut values = Vec::new();
    let mut p = blk + 12;
    for _ in 0..count {
        let _shared = varint(&mut p);
        let unshared = varint(&mut p);
        let vlen = varint(&mut p);
        p += unshared;
        values.extend(p..p + vlen);
        p += vlen;
    }
    assert!(
        p <= blk + 12 + len && values.len() >= 5,
        "{} value bytes",
        values.len()
    );
    // Where the top index holds the data block's crc (its handle's last field).
    let old_crc = u32_at(snap, blk + 8).to_le_bytes();
    let in_top: Vec<usize> = (top + 12..top + top_len - 3)
        .filter(|&i| snap[i..i + 4] == old_crc)
        .collect();
    assert_eq!(in_top.len(), 1, "the data block's handle in the top index");
    let handle_crc = in_top[0];
    recrc(
        snap,
        values[0],
        [values[1], values[2], values[3], values[4]],
        |b| {
            let crc = crc32fast::hash(&[&b[blk..blk + 8], &b[blk + 12..blk + 12 + len]].concat());
            b[blk + 8..blk + 12].copy_from_slice(&crc.to_le_bytes());
            b[handle_crc..handle_crc + 4].copy_from_slice(&crc.to_le_bytes());
            let tcrc = crc32fast::hash(&[&b[top..top + 8], &b[top + 12..top + top_len]].concat());
            b[top + 8..top + 12].copy_from_slice(&tcrc.to_le_bytes());
            b[footer + 20..footer + 24].copy_from_slice(&tcrc.to_le_bytes());
            let fcrc = crc32fast::hash(&b[footer..footer + 40]);
            b[footer + 40..footer + 44].copy_from_slice(&fcrc.to_le_bytes());
        },
    )
}

/// A segment changed and re-checksummed (record CRCs and the whole file's
/// CRC-32 still match the catalog) passes every CRC check; `inspect
/// --verify` still fails it on a signed dataset, through the signed SHA-256
/// digest, naming the segment, with or without `--trust`. An unsigned copy
/// of the same dataset (the same tampered bytes) passes, and `inspect`
/// says that only CRC-32s were checked; with `--trust` it is refused.
#[test]
fn inspect_verify_catches_a_recrc_d_segment_by_its_signed_digest() {
    let tmp = tempfile::tempdir().unwrap();
    let wal = tmp.path().join("wal");
    let (signed_dir, plain_dir) = (tmp.path().join("signed"), tmp.path().join("plain"));
    let key = tmp.path().join("a.key");
    let public = support::keygen(&key);
    write(&wal, 0, 60);
    let mut urls = Vec::new();
    for (dir, sign) in [(&signed_dir, true), (&plain_dir, false)] {
        std::fs::create_dir_all(dir).unwrap();
        let url = url::Url::from_directory_path(dir).unwrap().to_string();
        let mut args = vec![
            "publish",
            "--wal",
            wal.to_str().unwrap(),
            "--to",
            &url,
            "--once",
            "--segment-bytes",
            "1024",
            "--snapshot-every",
            "40",
            // No copies of segments in the head: the file is what is read.
            "--tail-bytes",
            "0",
        ];
        if sign {
            args.extend(["--signing-key", key.to_str().unwrap()]);
        }
        ok(&walcast(&args, None));
        urls.push(url);
    }
    // The same segment in both copies: the first one after the snapshot.
    let mut segs: Vec<_> = walk(&signed_dir.join("segments"));
    segs.sort();
    let seg_path = segs.last().unwrap().clone();
    let rel = seg_path.strip_prefix(&signed_dir).unwrap().to_path_buf();
    let rel_key = rel.to_str().unwrap().to_string();
    let original = std::fs::read(&seg_path).unwrap();
    assert_eq!(original, std::fs::read(plain_dir.join(&rel)).unwrap());
    // The last byte of the first record's payload (a value byte).
    let first_len = u32::from_le_bytes(original[40..44].try_into().unwrap()) as usize;
    let tampered = tamper_keeping_crcs(&original, 32 + 16 + first_len - 1);
    walcast_core::segment::decode(&tampered, Some(crc32fast::hash(&original)))
        .expect("the tampered segment passes every CRC-32 check");
    for dir in [&signed_dir, &plain_dir] {
        std::fs::write(dir.join(&rel), &tampered).unwrap();
    }

    // Signed, pinned: the digest names the segment.
    for trust in [&["--trust", public.as_str()][..], &[]] {
        let mut args = vec!["inspect", &urls[0], "--verify"];
        args.extend(trust);
        let out = walcast(&args, None);
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), out.stderr.as_str());
        assert_eq!(out.code, Some(1), "{trust:?}: {stdout}\n{stderr}");
        assert!(stdout.contains("verify       1 FAILED"), "{stdout}");
        assert!(
            stderr.contains(&format!("data: {rel_key}: SHA-256 "))
                && stderr.contains("the signed catalog's (untrusted)"),
            "{trust:?}: {stderr}"
        );
        if trust.is_empty() {
            assert!(stdout.contains("no key pinned: give --trust"), "{stdout}");
        }
    }
    // The unsigned copy: CRC-32 cannot tell, and inspect says what it could not check.
    let out = ok(&walcast(&["inspect", &urls[1], "--verify"], None));
    assert!(out.contains("verify       OK"), "{out}");
    assert!(
        out.contains("CRC-32 only") && out.contains("not signed"),
        "{out}"
    );
    let out = walcast(&["inspect", &urls[1], "--verify", "--trust", &public], None);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr
            .as_str()
            .contains("untrusted: the dataset is not signed"),
        "{}",
        out.stderr.as_str()
    );
    // The snapshot, changed and re-checksummed the same way: also refused
    // by its signed digest, naming it.
    std::fs::write(&seg_path, &original).unwrap();
    let snaps = walk(&signed_dir.join("snapshots"));
    assert_eq!(snaps.len(), 1);
    let snap_key = snaps[0]
        .strip_prefix(&signed_dir)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let snap = std::fs::read(&snaps[0]).unwrap();
    let bad_snap = tamper_snapshot_keeping_crcs(&snap);
    walcast_core::snapshot::decode(&bad_snap, Some(crc32fast::hash(&snap)))
        .expect("the tampered snapshot passes every CRC-32 check");
    std::fs::write(&snaps[0], &bad_snap).unwrap();
    let out = walcast(&["inspect", &urls[0], "--verify", "--trust", &public], None);
    let stderr = out.stderr.as_str();
    assert_eq!(out.code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("data: {snap_key}: SHA-256 ")) && !stderr.contains(&rel_key),
        "{stderr}"
    );
    // Put back, it verifies again.
    std::fs::write(&snaps[0], &snap).unwrap();
    ok(&walcast(
        &["inspect", &urls[0], "--verify", "--trust", &public],
        None,
    ));
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
