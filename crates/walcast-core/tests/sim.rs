//! Deterministic simulation: publishers and replicas against a faulty
//! in-memory object store, checking DESIGN.md's invariants after every step.
//!
//! `SIM_SEEDS=N` runs N seeds (default 2000; `SIM_FIRST=F` starts at seed F)
//! and the regression seeds; `SIM_SEED=S` replays one seed;
//! `SIM_VERBOSE=1` traces it. A failure prints the line that replays it.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use walcast_core::batch::{self, Op};
use walcast_core::catalog::{Head, Page, PageRef, HEAD_KEY};
use walcast_core::io::{ByteRange, ContentRange, GetRequest, GetResponse};
use walcast_core::publisher::{
    self, DeleteRequest, Publisher, PublisherConfig, PutCondition, PutRequest, PutResponse,
    SnapshotFormat,
};
use walcast_core::replica::{self, Mode, Replica, ReplicaConfig};
use walcast_core::segment;
use walcast_core::snapshot::indexed::IndexedOptions;
use walcast_core::state::KvState;

type Model = BTreeMap<Vec<u8>, Vec<u8>>;

#[derive(Default, Clone, Copy, Debug)]
struct Faults {
    p_5xx: f64,
    p_lost_ack: f64,
    p_truncate: f64,
    p_ignore_range: f64,
    p_stale_head: f64,
    p_corrupt: f64,
    p_crash_pub: f64,
    p_crash_rep: f64,
}

#[derive(Default, Debug, Clone)]
struct Coverage {
    f5xx: u64,
    lost_ack: u64,
    truncated: u64,
    ignored_range: u64,
    stale_head: u64,
    corrupt: u64,
    pub_crash: u64,
    rep_crash: u64,
    fenced: u64,
    bootstraps: u64,
    gaps_rebootstrap: u64,
    not_found: u64,
    deletes: u64,
    pages: u64,
    range_gets: u64,
    head_304: u64,
    race_claims: u64,
    commits: u64,
    applied: u64,
    lazy_reads: u64,
    pointer_gets: u64,
    /// Pointer deltas naming a record of an earlier epoch: a restarted
    /// publisher placed the records it replayed.
    replayed_pointers: u64,
}

impl Coverage {
    fn add(&mut self, c: &Coverage) {
        macro_rules! sum {
            ($($f:ident),*) => { $(self.$f += c.$f;)* };
        }
        sum!(
            lazy_reads,
            pointer_gets,
            replayed_pointers,
            f5xx,
            lost_ack,
            truncated,
            ignored_range,
            stale_head,
            corrupt,
            pub_crash,
            rep_crash,
            fenced,
            bootstraps,
            gaps_rebootstrap,
            not_found,
            deletes,
            pages,
            range_gets,
            head_304,
            race_claims,
            commits,
            applied
        );
    }
}

struct Obj {
    body: Vec<u8>,
    etag: u64,
}

#[derive(Default)]
struct Store {
    objects: BTreeMap<String, Obj>,
    heads: Vec<(Vec<u8>, u64)>,
    next_etag: u64,
    max_committed: u64,
    last_epoch: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Who {
    Pub(usize, u64),
    Rep(usize, u64),
}

enum Req {
    Get(GetRequest),
    Put(PutRequest),
    Delete(DeleteRequest),
}

struct Pending {
    who: Who,
    req: Req,
}

struct PubActor {
    m: Publisher,
    inc: u64,
}

struct RepActor {
    m: Replica,
    inc: u64,
    raw: bool,
    slow: bool,
    applied: u64,
    persisted: Option<(KvState, u64, walcast_core::catalog::DatasetId, u64)>,
    cfg: ReplicaConfig,
    /// Lazy mode: reads go through `get_lazy`/`scan_lazy`; nothing persists.
    lazy: bool,
}

struct Sim {
    seed: u64,
    rng: ChaCha8Rng,
    now: u64,
    faults: Faults,
    store: Store,
    wal: Vec<Vec<u8>>,
    models: Vec<Model>,
    pubs: Vec<Option<PubActor>>,
    pub_cfg: PublisherConfig,
    reps: Vec<RepActor>,
    net: Vec<Pending>,
    inc: u64,
    cov: Coverage,
    verbose: bool,
}

fn fail(seed: u64, msg: String) -> ! {
    panic!("seed {seed}: {msg}\nreplay: SIM_SEED={seed} SIM_VERBOSE=1 cargo test -p walcast-core --test sim -- --nocapture");
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let level: f64 = [0.0, 0.02, 0.08, 0.2][rng.random_range(0..4)];
        let faults = Faults {
            p_5xx: level,
            p_lost_ack: level,
            p_truncate: level / 2.0,
            p_ignore_range: level,
            p_stale_head: level * 1.5,
            p_corrupt: level / 2.0,
            p_crash_pub: level / 8.0,
            p_crash_rep: level / 8.0,
        };
        let pub_cfg = PublisherConfig {
            segment_bytes: rng.random_range(100..3000),
            flush_interval_ms: rng.random_range(0..200),
            min_commit_interval_ms: if rng.random_bool(0.3) {
                rng.random_range(1..150)
            } else {
                0
            },
            max_commits_per_sec: if rng.random_bool(0.5) {
                rng.random_range(1..50)
            } else {
                0
            },
            commit_burst: rng.random_range(0..4),
            max_pending_segments: rng.random_range(1..4),
            snapshot_every: if rng.random_bool(0.8) {
                Some(rng.random_range(5..40))
            } else {
                None
            },
            retain_lsns: if rng.random_bool(0.7) {
                Some(rng.random_range(5..60))
            } else {
                None
            },
            grace_ms: rng.random_range(0..3000),
            inline_segments: rng.random_range(2..6),
            tail_bytes: if rng.random_bool(0.7) {
                rng.random_range(0..8_000)
            } else {
                0
            },
            page_fanout: rng.random_range(2..4),
            retry_base_ms: 10,
            retry_max_ms: 1000,
            max_attempts: 3,
            head_check_ms: rng.random_range(0..3) * 500,
            request_timeout_ms: 1000,
            snapshot_format: if rng.random_bool(0.3) {
                SnapshotFormat::Chunked
            } else {
                SnapshotFormat::Indexed(IndexedOptions {
                    block_bytes: rng.random_range(32..600),
                    index_block_bytes: rng.random_range(32..300),
                })
            },
            delta_every: rng.random_bool(0.5).then(|| rng.random_range(1..10)),
            ..PublisherConfig::default()
        };
        // Snapshots and deltas by bytes, from a stream of their own so that
        // every seed's scenario is otherwise what it was before they existed.
        let mut by_bytes = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_b17e_5000_0000);
        let pub_cfg = PublisherConfig {
            snapshot_bytes: by_bytes
                .random_bool(0.3)
                .then(|| by_bytes.random_range(100..3_000)),
            delta_bytes: by_bytes
                .random_bool(0.3)
                .then(|| by_bytes.random_range(50..1_000)),
            // Heads stored gzip-compressed, from a stream of its own too.
            head_gzip: ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_6219_0000_0000).random_bool(0.3),
            // Deltas of pointers, likewise.
            pointer_deltas: ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_9017_0000_0000)
                .random_bool(0.5),
            ..pub_cfg
        };
        let n_pubs = if rng.random_bool(0.3) { 2 } else { 1 };
        let n_reps = rng.random_range(1..4);
        let mut sim = Sim {
            seed,
            rng,
            now: 1_000_000,
            faults,
            store: Store::default(),
            wal: Vec::new(),
            models: vec![Model::new()],
            pubs: Vec::new(),
            pub_cfg,
            reps: Vec::new(),
            net: Vec::new(),
            inc: 0,
            cov: Coverage::default(),
            verbose: std::env::var("SIM_VERBOSE").is_ok(),
        };
        for i in 0..n_pubs {
            let a = sim.new_pub();
            sim.pubs.push(Some(a));
            let _ = i;
        }
        // Sometimes a lazy replica beside the others.
        let lazy_at = sim.rng.random_bool(0.5).then_some(n_reps);
        for i in 0..n_reps + usize::from(lazy_at.is_some()) {
            let raw = i == 2 && Some(i) != lazy_at;
            let lazy = Some(i) == lazy_at;
            let cfg = ReplicaConfig {
                poll_interval_ms: sim.rng.random_range(20..400),
                max_inflight: sim.rng.random_range(1..5),
                retry_base_ms: 10,
                retry_max_ms: 1000,
                max_attempts: 3,
                request_timeout_ms: 1000,
                snapshot_window: sim.rng.random_range(64..2048),
                mode: if raw { Mode::Raw } else { Mode::Kv },
                emit_records: !raw && i == 0,
                rewind_after_ms: 60_000,
                lazy_cache_bytes: lazy.then(|| sim.rng.random_range(64..4096)),
                ..ReplicaConfig::default()
            };
            let slow = i == 1;
            let seed = sim.rng.random();
            sim.inc += 1;
            sim.reps.push(RepActor {
                m: Replica::new(cfg.clone(), seed),
                inc: sim.inc,
                raw,
                slow,
                applied: 0,
                persisted: None,
                cfg,
                lazy,
            });
        }
        sim
    }

    fn new_pub(&mut self) -> PubActor {
        self.inc += 1;
        PubActor {
            m: Publisher::new(self.pub_cfg.clone(), self.rng.random()),
            inc: self.inc,
        }
    }

    fn log(&self, s: impl FnOnce() -> String) {
        if self.verbose {
            eprintln!("[{}] {}", self.now, s());
        }
    }

    fn commit_batch(&mut self) {
        let n = self.rng.random_range(1..5);
        let mut ops = Vec::new();
        let mut model = self.models.last().expect("model").clone();
        for _ in 0..n {
            let key = format!("k{:02}", self.rng.random_range(0..30)).into_bytes();
            if self.rng.random_bool(0.2) {
                model.remove(&key);
                ops.push(Op::delete(key));
            } else {
                let len = self.rng.random_range(0..24);
                let value: Vec<u8> = (0..len).map(|_| self.rng.random()).collect();
                model.insert(key.clone(), value.clone());
                ops.push(Op::put(key, value));
            }
        }
        self.wal.push(batch::encode(&ops).expect("encode"));
        self.models.push(model);
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.random_bool(p.min(1.0))
    }

    // ---- the store ----

    fn serve_get(&mut self, g: &GetRequest, faulty: bool) -> GetResponse {
        if faulty && self.chance(self.faults.p_5xx) {
            self.cov.f5xx += 1;
            return GetResponse::Failed {
                status: Some(503),
                message: "injected 503".into(),
            };
        }
        let (body, etag) = if g.key == HEAD_KEY
            && faulty
            && self.store.heads.len() > 1
            && self.chance(self.faults.p_stale_head)
        {
            self.cov.stale_head += 1;
            let i = self.rng.random_range(0..self.store.heads.len());
            let (b, e) = &self.store.heads[i];
            (b.clone(), *e)
        } else {
            match self.store.objects.get(&g.key) {
                None => {
                    if g.key != HEAD_KEY {
                        self.cov.not_found += 1;
                    }
                    return GetResponse::NotFound;
                }
                Some(o) => (o.body.clone(), o.etag),
            }
        };
        let etag_s = format!("\"{etag}\"");
        if g.if_none_match.as_deref() == Some(etag_s.as_str()) {
            self.cov.head_304 += 1;
            return GetResponse::NotModified;
        }
        let len = body.len() as u64;
        let (mut out, mut range) = match g.range {
            None => (body.clone(), None),
            Some(r) => {
                self.cov.range_gets += 1;
                // A pointer delta's pages or blocks (version 5).
                if body.len() > 6 && body[..4] == *b"WCSN" && body[4..6] == [5, 0] {
                    self.cov.pointer_gets += 1;
                }
                let (s, e) = match r {
                    ByteRange::Bounded { start, end } => (start, end.min(len)),
                    ByteRange::Suffix(n) => (len.saturating_sub(n), len),
                };
                if s >= len || s >= e {
                    return GetResponse::RangeNotSatisfiable;
                }
                (
                    body[s as usize..e as usize].to_vec(),
                    Some(ContentRange {
                        start: s,
                        end: e,
                        total: Some(len),
                    }),
                )
            }
        };
        if faulty && range.is_some() && self.chance(self.faults.p_ignore_range) {
            self.cov.ignored_range += 1;
            out = body.clone();
            range = None;
        }
        if faulty && !out.is_empty() && self.chance(self.faults.p_truncate) {
            self.cov.truncated += 1;
            let n = self.rng.random_range(0..out.len());
            out.truncate(n);
        }
        if faulty && !out.is_empty() && self.chance(self.faults.p_corrupt) {
            self.cov.corrupt += 1;
            let i = self.rng.random_range(0..out.len());
            out[i] ^= 1 << self.rng.random_range(0..8);
        }
        GetResponse::Ok {
            body: out,
            etag: Some(etag_s),
            range,
        }
    }

    fn serve_put(&mut self, p: &PutRequest, faulty: bool) -> PutResponse {
        if faulty && self.chance(self.faults.p_5xx) {
            self.cov.f5xx += 1;
            return PutResponse::Failed {
                message: "injected 503".into(),
            };
        }
        let cur = self.store.objects.get(&p.key).map(|o| o.etag);
        match (&p.condition, cur) {
            (PutCondition::CreateOnly, Some(_)) => return PutResponse::AlreadyExists,
            (PutCondition::IfMatch(_), None) => return PutResponse::PreconditionFailed,
            (PutCondition::IfMatch(e), Some(c)) if *e != format!("\"{c}\"") => {
                return PutResponse::PreconditionFailed
            }
            _ => {}
        }
        if p.body.len() > 6 && p.body[..4] == *b"WCSN" && p.body[4..6] == [5, 0] {
            // A record of an earlier epoch's segment: placed after a restart.
            if let Ok(d) = walcast_core::snapshot::pointer::decode_pointer_delta(&p.body) {
                if d.entries.iter().any(|(_, x)| x.epoch < d.header.epoch) {
                    self.cov.replayed_pointers += 1;
                }
            }
        }
        self.store.next_etag += 1;
        let etag = self.store.next_etag;
        self.store.objects.insert(
            p.key.clone(),
            Obj {
                body: p.body.clone(),
                etag,
            },
        );
        if p.key == HEAD_KEY {
            self.on_head_written(&p.body);
            self.store.heads.push((p.body.clone(), etag));
        }
        if faulty && self.chance(self.faults.p_lost_ack) {
            self.cov.lost_ack += 1;
            return PutResponse::Failed {
                message: "injected timeout after the write".into(),
            };
        }
        PutResponse::Ok {
            etag: Some(format!("\"{etag}\"")),
        }
    }

    /// Invariants of the committed head sequence.
    fn on_head_written(&mut self, body: &[u8]) {
        let seed = self.seed;
        let h = Head::decode(body)
            .unwrap_or_else(|e| fail(seed, format!("publisher wrote an invalid head: {e}")));
        if h.epoch < self.store.last_epoch {
            fail(
                seed,
                format!(
                    "head with epoch {} written after epoch {}",
                    h.epoch, self.store.last_epoch
                ),
            );
        }
        if h.committed_lsn < self.store.max_committed {
            fail(
                seed,
                format!(
                    "committed LSN went back from {} to {}",
                    self.store.max_committed, h.committed_lsn
                ),
            );
        }
        if h.committed_lsn > self.wal.len() as u64 {
            fail(
                seed,
                format!(
                    "committed {} beyond the WAL ({})",
                    h.committed_lsn,
                    self.wal.len()
                ),
            );
        }
        self.store.last_epoch = h.epoch;
        self.store.max_committed = h.committed_lsn;
        self.cov.commits += 1;
        // Every segment it names exists and holds exactly the WAL's records.
        let mut segs = h.segments.clone();
        let mut stack: Vec<PageRef> = h.pages.clone();
        while let Some(r) = stack.pop() {
            self.cov.pages += 1;
            let Some(o) = self.store.objects.get(&r.key) else {
                fail(seed, format!("head names missing page {}", r.key));
            };
            let page = Page::decode(&o.body, &r)
                .unwrap_or_else(|e| fail(seed, format!("page {}: {e}", r.key)));
            segs.extend(page.segments);
            stack.extend(page.pages);
        }
        for s in &segs {
            let Some(o) = self.store.objects.get(&s.key) else {
                fail(
                    seed,
                    format!("head gen {} names missing segment {}", h.generation, s.key),
                );
            };
            let seg = segment::decode(&o.body, Some(s.crc32))
                .unwrap_or_else(|e| fail(seed, format!("{}: {e}", s.key)));
            for r in seg.records() {
                let r = r.expect("verified");
                if self.wal[(r.lsn - 1) as usize] != r.payload {
                    fail(
                        seed,
                        format!(
                            "segment {} holds a record {} that differs from the WAL",
                            s.key, r.lsn
                        ),
                    );
                }
            }
        }
        if let Some(sn) = &h.snapshot {
            let Some(o) = self.store.objects.get(&sn.key) else {
                fail(seed, format!("head names missing snapshot {}", sn.key));
            };
            let (hd, st) = walcast_core::snapshot::decode(&o.body, Some(sn.crc32))
                .unwrap_or_else(|e| fail(seed, format!("{}: {e}", sn.key)));
            self.check_state(&st, hd.lsn, &format!("snapshot {}", sn.key));
        }
    }

    fn check_state(&self, st: &KvState, lsn: u64, what: &str) {
        let model = &self.models[lsn as usize];
        let got: Vec<(std::borrow::Cow<[u8]>, &[u8])> = st.iter().collect();
        let want: Vec<(std::borrow::Cow<[u8]>, &[u8])> = model
            .iter()
            .map(|(k, v)| (k.as_slice().into(), v.as_slice()))
            .collect();
        if got != want || st.len() != model.len() as u64 {
            fail(
                self.seed,
                format!("{what}: state differs from the origin at LSN {lsn}"),
            );
        }
    }

    fn deliver(&mut self, i: usize, faulty: bool) {
        let p = self.net.swap_remove(i);
        match p.req {
            Req::Get(g) => {
                let resp = self.serve_get(&g, faulty);
                self.log(|| {
                    format!(
                        "{:?} GET {} {:?} -> {}",
                        p.who,
                        g.key,
                        g.range,
                        short(&resp)
                    )
                });
                match p.who {
                    Who::Pub(i, inc) => {
                        if let Some(a) = self.pubs[i].as_mut().filter(|a| a.inc == inc) {
                            a.m.handle_get(g.id, self.now, resp);
                        }
                    }
                    Who::Rep(i, inc) => {
                        if self.reps[i].inc == inc {
                            self.reps[i].m.handle_response(g.id, self.now, resp);
                        }
                    }
                }
            }
            Req::Put(put) => {
                let resp = self.serve_put(&put, faulty);
                self.log(|| {
                    format!(
                        "{:?} PUT {} {:?} -> {:?}",
                        p.who, put.key, put.condition, resp
                    )
                });
                if let Who::Pub(i, inc) = p.who {
                    if let Some(a) = self.pubs[i].as_mut().filter(|a| a.inc == inc) {
                        a.m.handle_put(put.id, self.now, resp);
                    }
                }
            }
            Req::Delete(d) => {
                let r = if faulty && self.chance(self.faults.p_5xx) {
                    Err("injected 503".to_string())
                } else {
                    self.cov.deletes += 1;
                    self.store.objects.remove(&d.key);
                    Ok(())
                };
                self.log(|| format!("{:?} DELETE {} -> {:?}", p.who, d.key, r));
                if let Who::Pub(i, inc) = p.who {
                    if let Some(a) = self.pubs[i].as_mut().filter(|a| a.inc == inc) {
                        a.m.handle_delete(d.id, self.now, r);
                    }
                }
            }
        }
    }

    fn drive(&mut self) {
        let now = self.now;
        for i in 0..self.pubs.len() {
            let mut n = 0;
            loop {
                n += 1;
                if n > 10_000 {
                    fail(self.seed, "publisher livelock".into());
                }
                let Some(a) = self.pubs[i].as_mut() else {
                    break;
                };
                // Feed the WAL while there is room.
                while let Some(next) = a.m.next_lsn() {
                    if next > self.wal.len() as u64 || !a.m.has_room() {
                        break;
                    }
                    a.m.push(next, &self.wal[(next - 1) as usize], now)
                        .unwrap_or_else(|e| fail(self.seed, format!("push: {e}")));
                }
                let inc = a.inc;
                let act = a.m.poll(now);
                match act {
                    publisher::Action::Wait { .. } => break,
                    publisher::Action::Get(g) => self.net.push(Pending {
                        who: Who::Pub(i, inc),
                        req: Req::Get(g),
                    }),
                    publisher::Action::Put(p) => self.net.push(Pending {
                        who: Who::Pub(i, inc),
                        req: Req::Put(p),
                    }),
                    publisher::Action::Delete(d) => self.net.push(Pending {
                        who: Who::Pub(i, inc),
                        req: Req::Delete(d),
                    }),
                    publisher::Action::Event(e) => {
                        self.log(|| format!("pub{i} event {e:?}"));
                        match e {
                            publisher::Event::Fenced(err) => {
                                self.cov.fenced += 1;
                                if err.kind() == walcast_core::ErrorKind::Fenced {
                                    self.cov.race_claims += 1;
                                }
                                self.pubs[i] = None;
                                break;
                            }
                            publisher::Event::Committed { .. } => {}
                            _ => {}
                        }
                    }
                }
            }
        }
        for i in 0..self.reps.len() {
            let mut n = 0;
            loop {
                n += 1;
                if n > 10_000 {
                    fail(self.seed, "replica livelock".into());
                }
                let r = &mut self.reps[i];
                let inc = r.inc;
                match r.m.poll(now) {
                    replica::Action::Wait { .. } => break,
                    replica::Action::Fetch(g) => self.net.push(Pending {
                        who: Who::Rep(i, inc),
                        req: Req::Get(g),
                    }),
                    replica::Action::Event(e) => self.on_replica_event(i, e),
                }
            }
        }
    }

    fn on_replica_event(&mut self, i: usize, e: replica::Event) {
        self.log(|| {
            format!(
                "rep{i} event {}",
                match &e {
                    replica::Event::Record { lsn, .. } => format!("Record {lsn}"),
                    other => format!("{other:?}"),
                }
            )
        });
        let seed = self.seed;
        let max = self.store.max_committed;
        match e {
            replica::Event::Applied { first, last } => {
                let r = &self.reps[i];
                if first != r.applied + 1 || last < first {
                    fail(
                        seed,
                        format!("replica {i} applied {first}..={last} after {}", r.applied),
                    );
                }
                if last > max {
                    fail(
                        seed,
                        format!("replica {i} applied LSN {last} above the committed {max}"),
                    );
                }
                self.cov.applied += last - first + 1;
                let lazy = r.lazy;
                if !r.raw && !lazy {
                    self.check_state(r.m.state(), last, &format!("replica {i}"));
                }
                let r = &mut self.reps[i];
                r.applied = last;
                if lazy {
                    self.check_lazy_reads(i);
                } else if !r.raw {
                    r.persisted = Some((
                        r.m.state().clone(),
                        last,
                        r.m.dataset_id().expect("known"),
                        r.m.epoch(),
                    ));
                }
            }
            replica::Event::Record { lsn, payload } => {
                // Order is checked through the Applied events that follow.
                if lsn > max || payload != self.wal[(lsn - 1) as usize] {
                    fail(seed, format!("raw replica {i} got a wrong record {lsn}"));
                }
            }
            replica::Event::Bootstrapped { lsn, .. } => {
                let r = &self.reps[i];
                if lsn < r.applied {
                    fail(
                        seed,
                        format!("replica {i} went back from {} to snapshot {lsn}", r.applied),
                    );
                }
                if r.applied > 0 {
                    self.cov.gaps_rebootstrap += 1;
                }
                self.cov.bootstraps += 1;
                if r.lazy {
                    self.reps[i].applied = lsn;
                    self.check_lazy_reads(i);
                    return;
                }
                self.check_state(r.m.state(), lsn, &format!("replica {i} after bootstrap"));
                let r = &mut self.reps[i];
                r.applied = lsn;
                r.persisted = Some((
                    r.m.state().clone(),
                    lsn,
                    r.m.dataset_id().expect("known"),
                    r.m.epoch(),
                ));
            }
            replica::Event::Gap { from, to } => {
                let r = &mut self.reps[i];
                if from != r.applied + 1 {
                    fail(
                        seed,
                        format!("replica {i} gap from {from} after {}", r.applied),
                    );
                }
                self.cov.gaps_rebootstrap += 1;
                r.applied = to;
            }
            replica::Event::DatasetChanged { .. } => {
                fail(seed, "dataset changed in a single-dataset run".into())
            }
            replica::Event::CaughtUp { .. } | replica::Event::Error(_) => {}
        }
    }

    /// A lazy replica's reads, point and scan, against the origin's state
    /// at its applied LSN: a read that is ready must be right; a pending one
    /// queued the GETs it needs, which the network delivers later.
    fn check_lazy_reads(&mut self, i: usize) {
        let applied = self.reps[i].m.applied_lsn();
        let model = self.models[applied as usize].clone();
        let mut keys: Vec<Vec<u8>> = model.keys().take(3).cloned().collect();
        keys.push(format!("k{}", self.rng.random_range(0..40)).into_bytes());
        if let Some(k) = model
            .keys()
            .nth(self.rng.random_range(0..model.len().max(1)))
        {
            keys.push(k.clone());
        }
        for k in keys {
            if let Ok(replica::Read::Ready(v)) = self.reps[i].m.get_lazy(&k) {
                self.cov.lazy_reads += 1;
                if v.as_ref() != model.get(&k) {
                    fail(
                        self.seed,
                        format!("lazy replica {i} read {k:?} wrong at LSN {applied}"),
                    );
                }
            }
        }
        let limit = self.rng.random_range(0..8);
        let mut scan = replica::LazyScan::new(b"", None, limit);
        if let Ok(replica::Read::Ready(got)) = self.reps[i].m.scan_lazy(&mut scan) {
            self.cov.lazy_reads += 1;
            let want: Vec<_> = model
                .iter()
                .take(limit)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if got != want {
                fail(
                    self.seed,
                    format!("lazy replica {i} scanned wrong at LSN {applied}"),
                );
            }
        }
    }

    /// At the end: every key of the final state, read lazily, is right.
    fn check_lazy_end(&mut self, i: usize, target: u64) {
        let model = self.models[target as usize].clone();
        let mut scan = replica::LazyScan::new(b"", None, usize::MAX);
        let mut last = String::new();
        for _ in 0..100_000 {
            match self.reps[i].m.scan_lazy(&mut scan) {
                Ok(replica::Read::Ready(got)) => {
                    let want: Vec<_> = model.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                    if got != want {
                        fail(self.seed, format!("lazy replica {i}: final scan differs"));
                    }
                    return;
                }
                other => {
                    last = format!("{other:?}");
                    if self.net.is_empty() {
                        self.now += 20;
                        self.drive();
                    } else {
                        self.step(false, false);
                    }
                }
            }
        }
        fail(
            self.seed,
            format!(
                "lazy replica {i}: the final scan never completed: {last}, {:?}",
                self.reps[i].m.status(self.now)
            ),
        );
    }

    fn crash_replica(&mut self, i: usize) {
        self.cov.rep_crash += 1;
        self.inc += 1;
        let seed = self.rng.random();
        let r = &mut self.reps[i];
        r.inc = self.inc;
        r.m = match (&r.persisted, r.raw || r.lazy) {
            (Some((st, lsn, id, epoch)), false) => {
                Replica::restore(r.cfg.clone(), seed, st.clone(), *lsn, *id, *epoch)
            }
            _ => {
                r.applied = 0;
                Replica::new(r.cfg.clone(), seed)
            }
        };
        if let Some((_, lsn, _, _)) = &r.persisted {
            if !r.raw {
                r.applied = *lsn;
            }
        }
    }

    fn check_head_objects(&self) {
        let Some(o) = self.store.objects.get(HEAD_KEY) else {
            return;
        };
        let h = Head::decode(&o.body).expect("valid");
        // Every object the head names exists, and every one it gives a
        // whole-file CRC for holds those bytes.
        let mut keys: Vec<String> = h.segments.iter().map(|s| s.key.clone()).collect();
        keys.extend(h.snapshot.iter().map(|s| s.key.clone()));
        keys.extend(h.deltas.iter().map(|d| d.key.clone()));
        let mut crcs: Vec<(String, u32)> = h
            .segments
            .iter()
            .map(|s| (s.key.clone(), s.crc32))
            .collect();
        crcs.extend(h.snapshot.iter().map(|s| (s.key.clone(), s.crc32)));
        let mut stack = h.pages.clone();
        while let Some(r) = stack.pop() {
            let Some(o) = self.store.objects.get(&r.key) else {
                fail(
                    self.seed,
                    format!("the current head names deleted page {}", r.key),
                );
            };
            let page = Page::decode(&o.body, &r).expect("valid page");
            keys.extend(page.segments.iter().map(|s| s.key.clone()));
            crcs.extend(page.segments.iter().map(|s| (s.key.clone(), s.crc32)));
            stack.extend(page.pages);
        }
        for (k, crc) in crcs {
            if let Some(o) = self.store.objects.get(&k) {
                if crc32fast::hash(&o.body) != crc {
                    fail(
                        self.seed,
                        format!("the current head names {k} with a CRC its bytes do not have"),
                    );
                }
            }
        }
        for k in keys {
            if !self.store.objects.contains_key(&k) {
                fail(
                    self.seed,
                    format!("the current head names deleted object {k}"),
                );
            }
        }
    }

    fn step(&mut self, faulty: bool, writing: bool) {
        let roll: f64 = self.rng.random();
        if writing && roll < 0.25 {
            self.commit_batch();
        } else if roll < 0.85 && !self.net.is_empty() {
            // Deliver a random pending request (reordering); the slow
            // replica's requests mostly wait.
            for _ in 0..3 {
                let i = self.rng.random_range(0..self.net.len());
                let slow = matches!(self.net[i].who, Who::Rep(r, _) if self.reps[r].slow);
                if !slow || !faulty || self.rng.random_bool(0.1) {
                    self.deliver(i, faulty);
                    break;
                }
            }
        } else {
            self.now += self.rng.random_range(1..150);
        }
        if faulty {
            for i in 0..self.pubs.len() {
                if self.pubs[i].is_some() && self.chance(self.faults.p_crash_pub) {
                    self.cov.pub_crash += 1;
                    self.pubs[i] = None;
                } else if self.pubs[i].is_none() && self.rng.random_bool(0.05) {
                    let a = self.new_pub();
                    self.pubs[i] = Some(a);
                }
            }
            for i in 0..self.reps.len() {
                if self.chance(self.faults.p_crash_rep) {
                    self.crash_replica(i);
                }
            }
        }
        self.drive();
        self.check_head_objects();
    }

    fn run(&mut self) {
        let steps = self.rng.random_range(200..600);
        for _ in 0..steps {
            self.step(true, true);
        }
        // Quiesce: no faults, no crashes, no new writes; everything must converge.
        if self.pubs.iter().all(Option::is_none) {
            let a = self.new_pub();
            self.pubs[0] = Some(a);
        }
        for r in &mut self.reps {
            r.slow = false;
        }
        let target = self.wal.len() as u64;
        for n in 0..200_000 {
            let pub_done = self
                .pubs
                .iter()
                .flatten()
                .any(|a| a.m.is_drained() && a.m.committed_lsn() == target);
            let reps_done = self
                .reps
                .iter()
                .all(|r| r.applied == target && !r.raw || r.raw && r.m.applied_lsn() == target);
            if pub_done && reps_done {
                break;
            }
            if n == 199_999 {
                let st: Vec<_> = self
                    .reps
                    .iter()
                    .map(|r| (r.applied, r.m.status(self.now)))
                    .collect();
                fail(
                    self.seed,
                    format!(
                        "no convergence: WAL {target}, store committed {}, replicas {st:?}",
                        self.store.max_committed
                    ),
                );
            }
            if self.net.is_empty() {
                self.now += 20;
                self.drive();
            } else {
                self.step(false, false);
            }
            if n % 50 == 0 {
                self.now += 50;
            }
            // Keep the publisher alive if it was fenced by a zombie.
            if self.pubs.iter().all(Option::is_none) {
                let a = self.new_pub();
                self.pubs[0] = Some(a);
            }
        }
        for i in 0..self.reps.len() {
            let r = &self.reps[i];
            if r.lazy {
                self.check_lazy_end(i, target);
            } else if !r.raw {
                self.check_state(r.m.state(), target, &format!("replica {i} at the end"));
            }
        }
    }
}

fn short(r: &GetResponse) -> String {
    match r {
        GetResponse::Ok { body, range, .. } => format!("Ok({} bytes, {range:?})", body.len()),
        other => format!("{other:?}"),
    }
}

fn run_seed(seed: u64) -> Coverage {
    let mut sim = Sim::new(seed);
    sim.run();
    sim.cov
}

/// Seeds beyond the default count that once failed, run every time.
/// 6838, 25451, 29895: a lazy replica kept reading a delta chain the head
/// had replaced, and the publisher then deleted it (every later read: not
/// found).
const REGRESSION_SEEDS: &[u64] = &[6838, 25451, 29895];

#[test]
fn simulation() {
    let seeds: Vec<u64> = match std::env::var("SIM_SEED") {
        Ok(s) => vec![s.parse().expect("SIM_SEED is a number")],
        Err(_) => {
            let n: u64 = std::env::var("SIM_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(2000);
            // SIM_FIRST=F starts at seed F (to split a long run in parts).
            let first: u64 = std::env::var("SIM_FIRST")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            (first..first + n)
                .chain(
                    REGRESSION_SEEDS
                        .iter()
                        .copied()
                        .filter(|&s| s < first || s >= first + n),
                )
                .collect()
        }
    };
    let mut total = Coverage::default();
    let mut failures = Vec::new();
    for &seed in &seeds {
        match catch_unwind(AssertUnwindSafe(|| run_seed(seed))) {
            Ok(c) => total.add(&c),
            Err(_) => {
                failures.push(seed);
                if failures.len() >= 5 {
                    break;
                }
            }
        }
    }
    println!("simulation: {} seeds, coverage {total:#?}", seeds.len());
    assert!(
        failures.is_empty(),
        "failing seeds: {failures:?} (replay one with SIM_SEED=<seed> SIM_VERBOSE=1)"
    );
    if seeds.len() >= 100 {
        // The faults must actually have happened.
        for (name, n) in [
            ("5xx", total.f5xx),
            ("lost acks", total.lost_ack),
            ("truncated bodies", total.truncated),
            ("ignored ranges", total.ignored_range),
            ("stale heads", total.stale_head),
            ("corrupted bodies", total.corrupt),
            ("publisher crashes", total.pub_crash),
            ("replica crashes", total.rep_crash),
            ("fenced publishers", total.fenced),
            ("re-bootstraps", total.gaps_rebootstrap),
            ("deletions", total.deletes),
            ("pages", total.pages),
            ("range GETs", total.range_gets),
            ("304s", total.head_304),
            ("lazy reads answered", total.lazy_reads),
            ("pointer delta GETs", total.pointer_gets),
            (
                "pointer deltas over a restarted publisher's replayed records",
                total.replayed_pointers,
            ),
        ] {
            assert!(n > 0, "no {name} happened in {} seeds", seeds.len());
        }
    }
}
