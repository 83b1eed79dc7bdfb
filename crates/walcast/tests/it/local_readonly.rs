//! `walcast get --local` and `walcast scan --local` only read the replica
//! directory: no checkpoint, no log rewrite, no file left behind, and a
//! read-only directory works.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use walcast::publish::{publish, PublishOptions};
use walcast::replica::{replicate, ReplicateOptions};
use walcast::store::Store;
use walcast::wal::Writer;
use walcast_core::batch::Op;

fn walcast(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_walcast"))
        .args(args)
        .output()
        .expect("running walcast")
}

/// Everything observable about a directory's entries and the directory itself.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    len: u64,
    mtime: Option<std::time::SystemTime>,
    ctime_ino: (i64, u64),
    crc32: u32,
}

fn snapshot(dir: &Path) -> BTreeMap<String, Entry> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let meta = std::fs::metadata(dir).unwrap();
    out.insert(
        ".".to_string(),
        Entry {
            len: 0,
            mtime: meta.modified().ok(),
            ctime_ino: (meta.ctime() * 1_000_000_000 + meta.ctime_nsec(), meta.ino()),
            crc32: 0,
        },
    );
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        out.insert(
            e.file_name().to_string_lossy().into_owned(),
            Entry {
                len: m.len(),
                mtime: m.modified().ok(),
                ctime_ino: (m.ctime() * 1_000_000_000 + m.ctime_nsec(), m.ino()),
                crc32: crc32fast::hash(&std::fs::read(e.path()).unwrap()),
            },
        );
    }
    out
}

/// `publish --once` of `wal` to `url`, then `replicate --once` into `local`.
fn publish_and_replicate(rt: &tokio::runtime::Runtime, wal: &Path, url: &str, local: &Path) {
    rt.block_on(async {
        let opts = PublishOptions {
            once: true,
            ..PublishOptions::default()
        };
        let store = Store::open(url).unwrap();
        publish(
            wal.to_path_buf(),
            store,
            opts,
            std::future::pending(),
            |_| {},
        )
        .await
        .unwrap();
        let opts = ReplicateOptions {
            sink: None,
            interval: Duration::from_millis(50),
            once: true,
            concurrency: 2,
            progress: false,
            trust: Vec::new(),
        };
        replicate(url, local, &opts, std::future::pending())
            .await
            .unwrap();
    });
}

/// A replica directory whose `applied.log` holds records after its checkpoint.
fn replica_with_log(tmp: &Path) -> PathBuf {
    let wal = tmp.join("wal");
    let data = tmp.join("data");
    let local = tmp.join("replica");
    std::fs::create_dir_all(&data).unwrap();
    let url = url::Url::from_directory_path(&data).unwrap().to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let w = Writer::open(&wal).unwrap();
    let step = |w: &Writer, from: u32, to: u32| {
        for i in from..to {
            w.commit(&[Op::put(format!("user:{i:03}"), format!("v{i}"))])
                .unwrap();
        }
        publish_and_replicate(&rt, &wal, &url, &local);
    };
    step(&w, 0, 10);
    step(&w, 10, 20);
    let log = std::fs::metadata(local.join("applied.log")).unwrap().len();
    assert!(log > 40, "applied.log holds records after the checkpoint");
    local
}

fn check_reads(local: &Path) {
    let p = local.to_str().unwrap();
    let out = walcast(&["get", "--local", p, "user:015"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"v15");
    let out = walcast(&["get", "--local", p, "user:999"]);
    assert_eq!(out.status.code(), Some(1));
    let out = walcast(&["scan", "--local", p, "--prefix", "user:01", "--limit", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "{\"key\":\"user:010\",\"value\":\"v10\"}\n\
         {\"key\":\"user:011\",\"value\":\"v11\"}\n\
         {\"key\":\"user:012\",\"value\":\"v12\"}\n"
    );
}

#[test]
fn get_and_scan_leave_the_replica_directory_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let local = replica_with_log(tmp.path());
    let before = snapshot(&local);
    // A coarse filesystem clock would hide a rewrite done at once.
    std::thread::sleep(Duration::from_millis(20));
    check_reads(&local);
    check_reads(&local);
    assert_eq!(
        snapshot(&local),
        before,
        "get/scan changed the replica directory"
    );
}

#[test]
fn get_and_scan_work_on_a_read_only_copy() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let local = replica_with_log(tmp.path());
    let ro = tmp.path().join("read-only");
    std::fs::create_dir(&ro).unwrap();
    for e in std::fs::read_dir(&local).unwrap() {
        let e = e.unwrap();
        let to = ro.join(e.file_name());
        std::fs::copy(e.path(), &to).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o444)).unwrap();
    }
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    let before = snapshot(&ro);
    std::thread::sleep(Duration::from_millis(20));
    check_reads(&ro);
    let after = snapshot(&ro);
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(
        after, before,
        "get/scan changed a read-only replica directory"
    );
    // A directory that does not exist is an error, and is not created.
    let missing = tmp.path().join("missing");
    let out = walcast(&["get", "--local", missing.to_str().unwrap(), "k"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!missing.exists());
}

/// A replica directory that followed a dataset which was then started over
/// at the same URL (a new dataset id, history from LSN 1 again, no
/// snapshot): after the next `replicate`, the directory holds the new
/// dataset, not the old checkpoint with the new records appended to its log
/// (which a restart or `get --local` would read as the old dataset).
#[test]
fn a_dataset_started_over_replaces_the_local_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let local = replica_with_log(tmp.path());
    let data = tmp.path().join("data");
    std::fs::remove_dir_all(&data).unwrap();
    std::fs::create_dir_all(&data).unwrap();
    let wal = tmp.path().join("wal2");
    let url = url::Url::from_directory_path(&data).unwrap().to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let w = Writer::open(&wal).unwrap();
    for i in 0..5u32 {
        w.commit(&[Op::put(format!("other:{i:03}"), format!("o{i}"))])
            .unwrap();
    }
    publish_and_replicate(&rt, &wal, &url, &local);
    let p = local.to_str().unwrap();
    let out = walcast(&["get", "--local", p, "other:003"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "o3");
    let out = walcast(&["get", "--local", p, "user:015"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the old dataset's key is gone: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A replica directory whose `applied.log` has one damaged byte in its
/// first record, with whole, valid records after it (bit rot or a stray
/// write, not a torn tail: a crash only tears the end). `get --local` of a
/// key a later record wrote must not answer "not found" as if the write
/// never happened: it should fail naming the damaged file (or read past the
/// damage); silently rolling the state back is a wrong answer.
#[test]
fn a_damaged_record_mid_log_is_not_read_as_a_torn_tail() {
    let tmp = tempfile::tempdir().unwrap();
    let local = replica_with_log(tmp.path());
    let log = local.join("applied.log");
    let mut bytes = std::fs::read(&log).unwrap();
    // Inside the first record after the 40-byte header; the later records
    // (user:015 among them) stay intact.
    bytes[40 + 20] ^= 0xff;
    std::fs::write(&log, &bytes).unwrap();
    let out = walcast(&["get", "--local", local.to_str().unwrap(), "user:015"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        (out.status.success() && out.stdout == b"v15") || stderr.contains("applied.log"),
        "exit {:?}, stdout {:?}, stderr {stderr}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// `replicate` on a directory whose `applied.log` is damaged mid-log does
/// not cut the committed records after the damage silently: it warns,
/// naming the file, keeps the records before the damage and fetches the
/// rest again from the dataset.
#[test]
fn replicate_fetches_again_what_followed_a_damaged_record() {
    let tmp = tempfile::tempdir().unwrap();
    let local = replica_with_log(tmp.path());
    let url = url::Url::from_directory_path(tmp.path().join("data"))
        .unwrap()
        .to_string();
    let log = local.join("applied.log");
    let mut bytes = std::fs::read(&log).unwrap();
    bytes[40 + 20] ^= 0xff;
    std::fs::write(&log, &bytes).unwrap();
    let p = local.to_str().unwrap();
    let out = walcast(&["replicate", &url, "--local", p, "--once"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("applied.log") && stderr.contains("offset 40"),
        "{stderr}"
    );
    check_reads(&local);
}

/// A torn tail (the last record cut short, as by a crash mid-write) is cut:
/// the records before it are read. A header failing its own checksum is an
/// error naming the file, not a log ignored as stale.
#[test]
fn a_torn_tail_is_cut_and_a_damaged_header_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let local = replica_with_log(tmp.path());
    let log = local.join("applied.log");
    let bytes = std::fs::read(&log).unwrap();
    let p = local.to_str().unwrap();
    for cut in [1, 5, 17] {
        std::fs::write(&log, &bytes[..bytes.len() - cut]).unwrap();
        let out = walcast(&["get", "--local", p, "user:015"]);
        assert!(
            out.status.success() && out.stdout == b"v15",
            "cut {cut}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut damaged = bytes.clone();
    damaged[10] ^= 0x01;
    std::fs::write(&log, &damaged).unwrap();
    let out = walcast(&["get", "--local", p, "user:015"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("applied.log") && stderr.contains("header"),
        "{stderr}"
    );
}
