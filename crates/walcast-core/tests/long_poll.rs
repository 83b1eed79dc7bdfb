//! Long-poll on the head, in virtual time: a replica long-polls a server
//! that holds its conditional head GETs, polls one that does not, and never
//! spins on one that claims to hold but answers at once, on a proxy that
//! cached a long-poll's answer, or on one that never answers.

#[path = "support/fixtures.rs"]
mod fixtures;

use std::collections::HashMap;

use fixtures::{build_segment, golden_head, golden_segment, golden_snapshot, EPOCH, LAST_LSN};
use walcast_core::catalog::{Head, SegmentEntry, HEAD_KEY};
use walcast_core::io::{ByteRange, ContentRange, GetRequest, GetResponse, ResponseMeta};
use walcast_core::replica::{Action, Event, Replica, ReplicaConfig};

const MINUTE: u64 = 60_000;

/// How the fake server treats a long-poll (a conditional head GET with a
/// wait hint) whose ETag still matches.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Server {
    /// Holds it for the wait, or until the head changes.
    Holds,
    /// Claims support but answers 304 at once.
    AnswersAtOnce,
    /// Claims support but answers 200 with the old head at once (a proxy
    /// that cached a long-poll's answer).
    CachedAnswer,
    /// No long-poll: no header, 304 at once.
    Plain,
    /// Claims support and never answers a long-poll (the driver's deadline
    /// fails it).
    NeverAnswers,
    /// Claims support and answers every long-poll at once with the head of
    /// another dataset (two backends of other datasets behind one URL).
    AlternatesDatasets,
}

struct Sim {
    server: Server,
    objects: HashMap<String, Vec<u8>>,
    head: Vec<u8>,
    /// A newer head to publish at this time.
    next_head: Option<(u64, Vec<u8>)>,
    /// Answers to deliver: (at, request, response).
    due: Vec<(u64, GetRequest, GetResponse)>,
    /// Head requests sent at or after `counting_from`, and whether each
    /// was a long-poll.
    head_gets: Vec<(u64, Option<u64>)>,
    replica: Replica,
    now: u64,
    max_applied: u64,
}

fn etag(b: &[u8]) -> String {
    format!("\"{:08x}\"", crc32fast::hash(b))
}

fn slice(body: &[u8], range: Option<ByteRange>) -> GetResponse {
    match range {
        None => GetResponse::Ok {
            body: body.to_vec(),
            etag: Some(etag(body)),
            range: None,
        },
        Some(ByteRange::Bounded { start, end }) => {
            let end = end.min(body.len() as u64);
            GetResponse::Ok {
                body: body[start as usize..end as usize].to_vec(),
                etag: Some(etag(body)),
                range: Some(ContentRange {
                    start,
                    end,
                    total: Some(body.len() as u64),
                }),
            }
        }
        Some(ByteRange::Suffix(_)) => unreachable!("not asked for here"),
    }
}

/// The golden head, and a second one that commits five more LSNs in a
/// second segment.
fn heads() -> (HashMap<String, Vec<u8>>, Vec<u8>, Vec<u8>) {
    let mut objects = HashMap::new();
    let head1 = golden_head();
    let (seg, _) = golden_segment();
    objects.insert(summary_key(&head1, 0), seg);
    objects.insert(
        head1
            .snapshot
            .as_ref()
            .expect("golden snapshot")
            .key
            .clone(),
        golden_snapshot(),
    );
    let (seg2, summary2) = build_segment(EPOCH, LAST_LSN + 1, LAST_LSN + 5, 256);
    let mut head2 = head1.clone();
    head2.generation += 1;
    head2.committed_lsn = LAST_LSN + 5;
    head2.committed_at_ms += 1000;
    head2.segments.push(SegmentEntry::from_summary(&summary2));
    objects.insert(summary_key(&head2, 1), seg2);
    (objects, head1.encode(), head2.encode())
}

fn summary_key(head: &Head, i: usize) -> String {
    head.segments[i].key.clone()
}

impl Sim {
    fn new(server: Server, cfg: ReplicaConfig) -> Sim {
        let (objects, head1, head2) = heads();
        Sim {
            server,
            objects,
            head: head1,
            next_head: Some((u64::MAX, head2)),
            due: Vec::new(),
            head_gets: Vec::new(),
            replica: Replica::new(cfg, 7),
            now: 1_795_000_000_000,
            max_applied: 0,
        }
    }

    fn meta(&self) -> ResponseMeta {
        ResponseMeta {
            long_poll_max_ms: (self.server != Server::Plain).then_some(60_000),
        }
    }

    /// Answers `req` now or later, as the server does.
    fn serve(&mut self, req: GetRequest) {
        let now = self.now;
        if req.key != HEAD_KEY {
            let resp = match self.objects.get(&req.key) {
                Some(b) => slice(b, req.range),
                None => GetResponse::NotFound,
            };
            self.due.push((now + 1, req, resp));
            return;
        }
        self.head_gets.push((now, req.wait_ms));
        let matches = req.if_none_match.as_deref() == Some(etag(&self.head).as_str());
        if !matches {
            let resp = slice(&self.head.clone(), None);
            self.due.push((now + 1, req, resp));
            return;
        }
        match (req.wait_ms, self.server) {
            (Some(_), Server::AlternatesDatasets) => {
                let h = Head::decode(&self.head).unwrap();
                let mut other = golden_head();
                if h.dataset_id == other.dataset_id {
                    other.dataset_id = walcast_core::catalog::DatasetId::from_seed(99);
                }
                self.head = other.encode();
                let resp = slice(&self.head.clone(), None);
                self.due.push((now + 1, req, resp));
            }
            (Some(w), Server::Holds) => {
                // Answered when the head changes (see `step`) or at the end.
                self.due.push((now + w, req, GetResponse::NotModified));
            }
            (Some(_), Server::NeverAnswers) => {
                // The driver gives up at the request's deadline.
                let at = now + req.timeout_ms;
                let failed = GetResponse::Failed {
                    status: None,
                    message: "timed out".into(),
                };
                self.due.push((at, req, failed));
            }
            (Some(_), Server::CachedAnswer) => {
                let resp = slice(&self.head.clone(), None);
                self.due.push((now + 1, req, resp));
            }
            _ => self.due.push((now + 1, req, GetResponse::NotModified)),
        }
    }

    /// Runs until `until` (virtual ms).
    fn run_until(&mut self, until: u64) {
        let mut steps = 0u64;
        loop {
            steps += 1;
            assert!(steps < 1_000_000, "the replica spins");
            match self.replica.poll(self.now) {
                Action::Fetch(req) => self.serve(req),
                Action::Event(Event::Error(e)) if self.server != Server::NeverAnswers => {
                    panic!("unexpected error: {e}")
                }
                Action::Event(_) => {}
                Action::Wait { until: wake } => {
                    self.max_applied = self.max_applied.max(self.replica.applied_lsn());
                    assert!(
                        // (A change of dataset starts the state over.)
                        self.server == Server::AlternatesDatasets
                            || self.replica.applied_lsn() >= self.max_applied,
                        "the replica went backwards"
                    );
                    // The next thing to happen: a wake-up, an answer, a new head.
                    let next_answer = self.due.iter().map(|d| d.0).min().unwrap_or(u64::MAX);
                    let next_head = self.next_head.as_ref().map_or(u64::MAX, |h| h.0);
                    let t = wake.min(next_answer).min(next_head);
                    if t >= until {
                        self.now = until;
                        return;
                    }
                    self.now = self.now.max(t);
                    if next_head <= self.now {
                        let (_, h) = self.next_head.take().expect("checked");
                        self.head = h;
                        // A holding server answers its held long-polls now.
                        if self.server == Server::Holds {
                            for d in &mut self.due {
                                if d.1.key == HEAD_KEY && d.1.wait_ms.is_some() {
                                    d.0 = self.now;
                                    d.2 = slice(&self.head, None);
                                }
                            }
                        }
                    }
                    let now = self.now;
                    let (ready, later): (Vec<_>, Vec<_>) =
                        self.due.drain(..).partition(|d| d.0 <= now);
                    self.due = later;
                    let meta = self.meta();
                    for (_, req, resp) in ready {
                        self.replica.handle_response_with(req.id, now, resp, meta);
                    }
                }
            }
        }
    }

    /// Catches up from scratch, then counts head GETs from here on.
    fn caught_up(server: Server) -> Sim {
        let cfg = ReplicaConfig::default();
        let mut sim = Sim::new(server, cfg);
        let start = sim.now;
        sim.run_until(start + 5_000);
        assert_eq!(sim.replica.applied_lsn(), LAST_LSN, "{server:?}");
        sim.head_gets.clear();
        sim
    }

    fn head_gets_since(&self, t: u64) -> usize {
        self.head_gets.iter().filter(|g| g.0 >= t).count()
    }
}

#[test]
fn an_idle_replica_long_polls_twice_a_minute() {
    let mut sim = Sim::caught_up(Server::Holds);
    let start = sim.now;
    sim.run_until(start + 10 * MINUTE);
    let gets = sim.head_gets_since(start);
    // One 30 s long-poll after another.
    assert!(gets <= 21, "{gets} head GETs in 10 idle minutes");
    assert!(sim.head_gets.iter().all(|g| g.1 == Some(30_000)));
    assert!(sim.replica.status(sim.now).long_poll);
}

#[test]
fn a_sync_ends_before_the_long_poll_that_follows_it() {
    let mut sim = Sim::caught_up(Server::Holds);
    for round in 0..3 {
        let now = sim.now;
        sim.replica.sync_now(now);
        // Drive until CaughtUp, answering only what is answered at once.
        let mut caught_up = false;
        for _ in 0..1000 {
            match sim.replica.poll(sim.now) {
                Action::Fetch(req) => sim.serve(req),
                Action::Event(Event::CaughtUp { lsn }) => {
                    assert_eq!(lsn, LAST_LSN);
                    caught_up = true;
                    break;
                }
                Action::Event(_) => {}
                Action::Wait { until } => {
                    let t = sim.now;
                    let (ready, later): (Vec<_>, Vec<_>) =
                        sim.due.drain(..).partition(|d| d.0 <= t + 1);
                    sim.due = later;
                    assert!(!ready.is_empty() || until > t, "round {round}: stuck");
                    sim.now = t + 1;
                    let meta = sim.meta();
                    for (_, req, resp) in ready {
                        sim.replica
                            .handle_response_with(req.id, sim.now, resp, meta);
                    }
                }
            }
        }
        assert!(
            caught_up,
            "round {round}: the sync ended without waiting out a long-poll"
        );
    }
}

#[test]
fn a_held_long_poll_delivers_a_new_head_at_once_and_polls_again() {
    let mut sim = Sim::caught_up(Server::Holds);
    let publish_at = sim.now + 12_345;
    sim.next_head.as_mut().expect("second head").0 = publish_at;
    sim.run_until(publish_at + 100);
    // Applied within the simulated round trips, long before a poll interval.
    assert_eq!(sim.replica.applied_lsn(), LAST_LSN + 5);
    sim.run_until(publish_at + 5 * MINUTE);
    let after = sim.head_gets_since(publish_at + 100);
    assert!(after <= 11, "{after} head GETs in 5 idle minutes");
    let last = sim.head_gets.last().expect("long-polls after the change");
    assert_eq!(last.1, Some(30_000));
}

#[test]
fn a_server_without_long_poll_is_polled_at_the_interval() {
    let mut sim = Sim::caught_up(Server::Plain);
    let start = sim.now;
    sim.run_until(start + MINUTE);
    let gets = sim.head_gets_since(start);
    assert!((55..=61).contains(&gets), "{gets} head GETs in a minute");
    assert!(sim.head_gets.iter().all(|g| g.1.is_none()));
    assert!(!sim.replica.status(sim.now).long_poll);
}

#[test]
fn a_server_that_answers_long_polls_at_once_is_polled_at_the_interval() {
    let mut sim = Sim::caught_up(Server::AnswersAtOnce);
    let start = sim.now;
    sim.run_until(start + MINUTE);
    let gets = sim.head_gets_since(start);
    // Never more than plain polling (1 s), plus the one that found out.
    assert!(gets <= 62, "{gets} head GETs in a minute");
    assert!(!sim.replica.status(sim.now).long_poll);
}

#[test]
fn a_cached_long_poll_answer_neither_spins_nor_goes_back() {
    let mut sim = Sim::caught_up(Server::CachedAnswer);
    let start = sim.now;
    sim.run_until(start + MINUTE);
    let gets = sim.head_gets_since(start);
    assert!(gets <= 62, "{gets} head GETs in a minute");
    assert_eq!(sim.replica.applied_lsn(), LAST_LSN);
    // A newer head is still taken (the newest head decides), once the
    // proxy's answer changes.
    sim.next_head.as_mut().expect("second head").0 = sim.now + 10;
    let t = sim.now;
    sim.run_until(t + 5_000);
    assert_eq!(sim.replica.applied_lsn(), LAST_LSN + 5);
}

#[test]
fn a_long_poll_that_never_answers_times_out_and_the_replica_goes_on() {
    let mut sim = Sim::caught_up(Server::NeverAnswers);
    let start = sim.now;
    sim.run_until(start + 10 * MINUTE);
    let gets = sim.head_gets_since(start);
    // Each long-poll fails at its deadline (30 s request timeout plus the
    // 30 s wait); the head is read again after the backoff.
    assert!((2..=40).contains(&gets), "{gets} head GETs in 10 minutes");
    // A new head is still found.
    sim.next_head.as_mut().expect("second head").0 = sim.now;
    let t = sim.now;
    sim.run_until(t + 2 * MINUTE);
    assert_eq!(sim.replica.applied_lsn(), LAST_LSN + 5);
}

#[test]
fn sync_now_reads_the_head_beside_a_held_long_poll() {
    let mut sim = Sim::caught_up(Server::Holds);
    let start = sim.now;
    sim.run_until(start + 1_000);
    assert!(
        sim.due
            .iter()
            .any(|d| d.1.key == HEAD_KEY && d.1.wait_ms.is_some()),
        "a long-poll is held"
    );
    sim.replica.sync_now(sim.now);
    let Action::Fetch(req) = sim.replica.poll(sim.now) else {
        panic!("sync reads the head at once");
    };
    assert_eq!(req.key, HEAD_KEY);
    assert_eq!(req.wait_ms, None, "a sync does not wait");
    sim.serve(req);
    let t = sim.now;
    sim.run_until(t + 1_000);
    assert_eq!(sim.replica.applied_lsn(), LAST_LSN);
}

#[test]
fn long_poll_requests_carry_the_wait_and_a_longer_deadline() {
    let cfg = ReplicaConfig::default();
    let mut sim = Sim::caught_up(Server::Holds);
    let start = sim.now;
    sim.run_until(start + 10);
    let (_, req, _) = sim
        .due
        .iter()
        .find(|d| d.1.key == HEAD_KEY)
        .expect("a held long-poll");
    assert_eq!(req.wait_ms, Some(30_000));
    assert!(req.if_none_match.is_some());
    assert_eq!(req.timeout_ms, cfg.request_timeout_ms + 30_000);
    // Disabled by configuration: plain polling.
    let mut sim = Sim::new(
        Server::Holds,
        ReplicaConfig {
            long_poll_wait_ms: 0,
            ..ReplicaConfig::default()
        },
    );
    let t = sim.now;
    sim.run_until(t + MINUTE);
    assert!(sim.head_gets.iter().all(|g| g.1.is_none()));
}

/// Every long-poll answered at once with the head of another dataset (two
/// backends behind one URL, each answering the other's ETag at once): a
/// change of dataset is not taken for news that makes an early answer
/// fine, so the replica polls at its interval, not back to back.
#[test]
fn a_server_alternating_datasets_on_long_polls_is_polled_at_the_interval() {
    let mut sim = Sim::new(Server::AlternatesDatasets, ReplicaConfig::default());
    let page = fixtures::golden_page();
    sim.objects
        .insert(fixtures::golden_page_ref(&page.encode()).key, page.encode());
    for (first, last) in [(1, 49), (50, 99)] {
        let (bytes, summary) = build_segment(6, first, last, 512);
        sim.objects
            .insert(SegmentEntry::from_summary(&summary).key, bytes);
    }
    let start = sim.now;
    sim.run_until(start + MINUTE);
    let gets = sim.head_gets_since(start);
    assert!(gets <= 62, "{gets} head GETs in a minute");
}
