//! Soak runs, outside CI (every test here is `#[ignore]`; `scripts/soak.sh`
//! runs them with `--ignored`): the end-to-end crash and race tests at
//! scale, with real processes.
//!
//! - `soak_publisher_kill9`: `SOAK_PUBLISHER_KILLS` (default 100) `kill -9`s
//!   of a running publisher while batches keep being committed; every tenth
//!   kill a replica must equal the origin at some committed LSN; at the end
//!   exactly every batch is visible, once.
//! - `soak_replica_kill9`: `SOAK_REPLICA_KILLS` (default 100) `kill -9`s of
//!   a replica mid catch-up (new batches are published before each run, so
//!   there is always something to catch up on); after each kill its
//!   directory equals the origin at some LSN, and the next run resumes from
//!   it; at the end it equals the origin.
//! - `soak_racing_publishers_moto`: `SOAK_PUBLISHERS` (default 8)
//!   publishers started at once on one WAL and one `s3://` prefix on moto,
//!   `SOAK_RACE_ROUNDS` (default 3) times: exactly one keeps publishing,
//!   every other exits with code 3 saying `fenced`, and a fresh replica has
//!   every batch exactly once.
//!
//! Each prints a `soak:` line with its figures; each prints its seed, replayed with `WALCAST_E2E_SEED`.

use crate::support;

use std::collections::BTreeMap;
use std::thread;
use std::time::{Duration, Instant};

use support::{
    assert_state_eq, committed_lsn, file_url, kill9, ms, replicate_once, run, scan, seed,
    walcast_cmd, write_random, Deadline, Env, GenOpts, KillRound, Model, Moto, Proc, Rng,
};
use tempfile::TempDir;

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn matches_some_lsn(model: &Model, state: &BTreeMap<Vec<u8>, Vec<u8>>, what: &str) -> u64 {
    let at = model.matching_lsns(state);
    assert!(
        !at.is_empty(),
        "{what}: the replica equals the origin at no LSN ≤ {}",
        model.lsn()
    );
    *at.last().unwrap()
}

#[test]
#[ignore = "soak: scripts/soak.sh"]
fn soak_publisher_kill9() {
    let name = "soak_publisher_kill9";
    let kills = env_count("SOAK_PUBLISHER_KILLS", 100);
    let started = Instant::now();
    let mut rng = Rng::new(seed(name));
    let tmp = TempDir::new().unwrap();
    let wal = tmp.path().join("wal");
    let ds = tmp.path().join("ds");
    let logs = tmp.path().join("logs");
    let mid = tmp.path().join("replica-mid");
    let url = file_url(&ds);
    let o = GenOpts {
        max_value: 300,
        ..GenOpts::default()
    };
    let mut model = Model::default();
    write_random(&wal, &mut model, &mut rng, 20, o);
    let mut early_kills = 0;
    for i in 0..kills {
        let round = KillRound {
            i,
            name: &format!("publish-{}", i % 4),
            wal: &wal,
            url: &url,
            logs: &logs,
        };
        if round.run(&mut model, &mut rng, o) {
            early_kills += 1;
        }
        if i % 10 == 9 {
            let out = replicate_once(&url, &mid, &Env::new());
            assert_eq!(
                out.code,
                Some(0),
                "replicate after kill {i}: {}",
                out.describe()
            );
            let at = matches_some_lsn(&model, &scan(&mid), &format!("after kill {i}"));
            eprintln!(
                "{name}: kill {}: written {}, replica at LSN {at}",
                i + 1,
                model.lsn()
            );
        }
    }
    run(
        &[
            "publish",
            "--wal",
            wal.to_str().unwrap(),
            "--to",
            &url,
            "--segment-bytes",
            "2000",
            "--once",
        ],
        &Env::new(),
        None,
    )
    .ok();
    assert_eq!(committed_lsn(&url, &Env::new()), model.lsn());
    let fresh = tmp.path().join("replica-fresh");
    replicate_once(&url, &fresh, &Env::new()).ok();
    assert_state_eq(&scan(&fresh), &model.map, "fresh replica after the kills");
    replicate_once(&url, &mid, &Env::new()).ok();
    assert_state_eq(
        &scan(&mid),
        &model.map,
        "incremental replica after the kills",
    );
    run(&["inspect", &url, "--verify"], &Env::new(), None).ok();
    eprintln!(
        "soak: publisher kill -9: {kills} kills ({early_kills} while starting up), {} batches, every batch visible once, {:.0} s",
        model.lsn(),
        started.elapsed().as_secs_f64()
    );
}

#[test]
#[ignore = "soak: scripts/soak.sh"]
fn soak_replica_kill9() {
    let name = "soak_replica_kill9";
    let kills = env_count("SOAK_REPLICA_KILLS", 100);
    let started = Instant::now();
    let mut rng = Rng::new(seed(name));
    let tmp = TempDir::new().unwrap();
    let wal = tmp.path().join("wal");
    let ds = tmp.path().join("ds");
    let logs = tmp.path().join("logs");
    let local = tmp.path().join("replica");
    let url = file_url(&ds);
    let o = GenOpts {
        max_value: 2000,
        ..GenOpts::default()
    };
    let publish = |extra: &[&str]| {
        let mut args = vec![
            "publish",
            "--wal",
            wal.to_str().unwrap(),
            "--to",
            &url,
            "--segment-bytes",
            "4096",
            "--once",
        ];
        args.extend_from_slice(extra);
        run(&args, &Env::new(), None).ok();
    };
    let mut model = Model::default();
    write_random(&wal, &mut model, &mut rng, 400, o);
    publish(&[]);
    let (mut mid_catch_up, mut attempts) = (0usize, 0usize);
    let mut delay_max = 40u64;
    let deadline = Deadline::after(Duration::from_secs(60 * 60), name);
    while mid_catch_up < kills {
        deadline.check();
        attempts += 1;
        // Something new to catch up on before every run.
        let n = rng.range(20, 120) as usize;
        write_random(&wal, &mut model, &mut rng, n, o);
        publish(&[]);
        let args = [
            "replicate",
            &url,
            "--local",
            local.to_str().unwrap(),
            "--once",
        ];
        let mut replica = Proc::spawn(
            &format!("replica-{}", attempts % 4),
            walcast_cmd(&args, &Env::new()),
            &logs,
        );
        let delay = rng.below(delay_max + 1);
        thread::sleep(ms(delay));
        let running = replica.try_status().is_none();
        kill9(&mut replica);
        let out = run(
            &["scan", "--local", local.to_str().unwrap()],
            &Env::new(),
            None,
        );
        if out.code != Some(0) {
            // Killed before its first state was written (the first runs
            // only): nothing to check yet.
            assert!(
                attempts <= 5 || mid_catch_up == 0,
                "scan after a kill at {delay} ms failed: {}",
                out.describe()
            );
            continue;
        }
        let at = matches_some_lsn(&model, &scan(&local), &format!("kill at {delay} ms"));
        if running && at < model.lsn() {
            mid_catch_up += 1;
        } else {
            // It had finished: kill sooner next time.
            delay_max = (delay_max * 3 / 4).max(5);
        }
        if attempts % 10 == 0 {
            eprintln!(
                "{name}: {attempts} runs, {mid_catch_up} killed mid catch-up (at LSN {at} of {})",
                model.lsn()
            );
        }
    }
    replicate_once(&url, &local, &Env::new()).ok();
    assert_state_eq(&scan(&local), &model.map, "the replica after every kill");
    eprintln!(
        "soak: replica kill -9: {mid_catch_up} kills mid catch-up in {attempts} runs, each left a state the origin had; resumed to LSN {}, {:.0} s",
        model.lsn(),
        started.elapsed().as_secs_f64()
    );
}

#[test]
#[ignore = "soak: scripts/soak.sh"]
fn soak_racing_publishers_moto() {
    let name = "soak_racing_publishers_moto";
    let publishers = env_count("SOAK_PUBLISHERS", 8).max(2);
    let rounds = env_count("SOAK_RACE_ROUNDS", 3).max(1);
    let started = Instant::now();
    let mut rng = Rng::new(seed(name));
    let moto = Moto::start();
    let env = moto.env();
    for round in 0..rounds {
        let tmp = TempDir::new().unwrap();
        let wal = tmp.path().join("wal");
        let logs = tmp.path().join("logs");
        let url = moto.url(&format!("race-{round}"));
        let o = GenOpts {
            max_value: 200,
            ..GenOpts::default()
        };
        let mut model = Model::default();
        write_random(&wal, &mut model, &mut rng, 50, o);
        let args = [
            "publish",
            "--wal",
            wal.to_str().unwrap(),
            "--to",
            &url,
            "--flush-interval",
            "50ms",
            "--segment-bytes",
            "4096",
        ];
        let mut pubs: Vec<Proc> = (0..publishers)
            .map(|i| Proc::spawn(&format!("publisher-{i}"), walcast_cmd(&args, &env), &logs))
            .collect();
        // Keep committing until all but one have stopped.
        let deadline = Deadline::after(Duration::from_secs(120), "all but one publisher fenced");
        while pubs.iter_mut().map(|p| p.running()).filter(|r| *r).count() > 1 && !deadline.passed()
        {
            write_random(&wal, &mut model, &mut rng, 3, o);
            thread::sleep(ms(100));
        }
        thread::sleep(ms(1500));
        let logs_of = |pubs: &[Proc]| pubs.iter().map(Proc::logs).collect::<Vec<_>>().join("\n");
        let running: Vec<usize> = (0..publishers).filter(|&i| pubs[i].running()).collect();
        assert_eq!(
            running.len(),
            1,
            "round {round}: exactly one publisher must keep running (running: {running:?})\n{}",
            logs_of(&pubs)
        );
        for (i, p) in pubs.iter_mut().enumerate() {
            if i == running[0] {
                continue;
            }
            let st = p.try_status().unwrap();
            assert_eq!(
                st.code(),
                Some(3),
                "round {round}: publisher {i} must exit 3 (fenced)\n{}",
                p.logs()
            );
            assert!(p.stderr().contains("fenced"), "{}", p.logs());
        }
        // The winner publishes what comes next; then everything is there once.
        write_random(&wal, &mut model, &mut rng, 20, o);
        let winner = running[0];
        let deadline = Deadline::after(Duration::from_secs(60), "the winner publishes the rest");
        while committed_lsn(&url, &env) < model.lsn() {
            deadline.check();
            assert!(pubs[winner].running(), "{}", pubs[winner].logs());
            thread::sleep(ms(200));
        }
        kill9(&mut pubs[winner]);
        let fresh = tmp.path().join("replica");
        replicate_once(&url, &fresh, &env).ok();
        assert_state_eq(&scan(&fresh), &model.map, "a fresh replica after the race");
        run(&["inspect", &url, "--verify"], &env, None).ok();
        eprintln!(
            "{name}: round {}: {publishers} publishers, 1 kept publishing, {} fenced, {} batches",
            round + 1,
            publishers - 1,
            model.lsn()
        );
    }
    eprintln!(
        "soak: racing publishers on moto: {rounds} rounds of {publishers}, exactly one winner each, {:.0} s",
        started.elapsed().as_secs_f64()
    );
}
