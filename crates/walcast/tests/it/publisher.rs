//! The embedding API's publisher: `walcast::Publisher::spawn` beside a
//! `Writer` in the same process reports every commit, `stop` publishes what
//! the WAL made durable, a restart reports the dataset's committed LSN, a
//! second publisher fences the first (which ends with `Fenced`), and a
//! `once` run ends by itself. Replicas read through `walcast::Replica`.

use std::time::Duration;

use walcast::{Fenced, PublishOptions, Publisher, Replica, ReplicaOptions, Writer};
use walcast_core::batch::Op;

const WAIT: Duration = Duration::from_secs(60);

fn file_url(dir: &std::path::Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    url::Url::from_directory_path(dir).unwrap().to_string()
}

fn put(k: &str, v: &str) -> Vec<Op> {
    vec![Op::put(k.as_bytes().to_vec(), v.as_bytes().to_vec())]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_in_process_reports_commits_and_stops_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let wal = tmp.path().join("wal");
    let url = file_url(&tmp.path().join("ds"));
    let writer = Writer::open(&wal).unwrap();

    let publisher = Publisher::spawn(&wal, &url, PublishOptions::default()).unwrap();
    let mut commits = publisher.commits();
    let mut last = 0;
    for i in 0..40 {
        last = writer
            .commit(&put(&format!("k{i:03}"), &format!("v{i}")))
            .unwrap();
    }
    assert_eq!(last, 40);
    assert_eq!(publisher.wait_for(last, WAIT).await.unwrap(), 40);
    assert!(commits.has_changed().unwrap());
    assert_eq!(*commits.borrow_and_update(), 40);
    assert!(!publisher.is_finished());

    // Commits reported one by one while a replica follows.
    let replica = Replica::open(
        &url,
        ReplicaOptions {
            poll_interval: Duration::from_millis(20),
            ..ReplicaOptions::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(replica.status().applied_lsn, 40);
    let lsn = writer.commit(&put("k000", "changed")).unwrap();
    tokio::time::timeout(WAIT, commits.changed())
        .await
        .expect("a commit is reported")
        .unwrap();
    replica.wait_for(lsn, WAIT).await.unwrap();
    assert_eq!(
        replica.get(b"k000").await.unwrap().as_deref(),
        Some(&b"changed"[..])
    );

    // A stop right after commits publishes them first.
    for i in 0..25 {
        last = writer.commit(&put(&format!("late{i}"), "x")).unwrap();
    }
    let report = publisher.stop().await.unwrap();
    assert_eq!(report.committed_lsn, last, "{report:?}");
    replica.wait_for(last, WAIT).await.unwrap();
    assert_eq!(replica.scan_prefix(b"late", 100).await.unwrap().len(), 25);

    // A restart reports the committed LSN it found, without new writes,
    // and stops at once with nothing to flush.
    let again = Publisher::spawn(&wal, &url, PublishOptions::default()).unwrap();
    assert_eq!(again.wait_for(last, WAIT).await.unwrap(), last);
    let report = again.stop().await.unwrap();
    assert_eq!(report.committed_lsn, last);
    assert_eq!(report.commits, 0);
    replica.close().await;

    // A `once` run ends by itself when everything durable is committed.
    last = writer.commit(&put("once", "1")).unwrap();
    let mut once = Publisher::spawn(
        &wal,
        &url,
        PublishOptions {
            once: true,
            ..PublishOptions::default()
        },
    )
    .unwrap();
    let report = tokio::time::timeout(WAIT, once.finished())
        .await
        .expect("a once run ends")
        .unwrap();
    assert_eq!(report.committed_lsn, last);
    assert!(once.is_finished());
    assert_eq!(once.stop().await.unwrap().committed_lsn, last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_publisher_fences_the_first() {
    let tmp = tempfile::tempdir().unwrap();
    let wal = tmp.path().join("wal");
    let url = file_url(&tmp.path().join("ds"));
    let writer = Writer::open(&wal).unwrap();
    let lsn = writer.commit(&put("a", "1")).unwrap();

    let mut first = Publisher::spawn(&wal, &url, PublishOptions::default()).unwrap();
    first.wait_for(lsn, WAIT).await.unwrap();
    let second = Publisher::spawn(&wal, &url, PublishOptions::default()).unwrap();
    second.wait_for(lsn, WAIT).await.unwrap();

    // The next commit: one of them wins it; the first, whose epoch is
    // stale, ends fenced when it tries.
    let lsn = writer.commit(&put("b", "2")).unwrap();
    second.wait_for(lsn, WAIT).await.unwrap();
    let err = tokio::time::timeout(WAIT, first.finished())
        .await
        .expect("the fenced publisher ends")
        .expect_err("the first publisher is fenced");
    assert!(err.downcast_ref::<Fenced>().is_some(), "{err:#}");
    assert!(first.wait_for(lsn + 1, WAIT).await.is_err());
    assert!(first.stop().await.is_err());
    assert_eq!(second.stop().await.unwrap().committed_lsn, lsn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_without_a_scheme_is_refused_with_what_to_write() {
    let tmp = tempfile::tempdir().unwrap();
    let err = Publisher::spawn(tmp.path(), "my-bucket/app", PublishOptions::default())
        .expect_err("no scheme");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("my-bucket/app") && msg.contains("s3://"),
        "{msg}"
    );
}
