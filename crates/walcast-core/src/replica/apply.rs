//! Applying verified units in dense LSN order, one unit per poll, and
//! scheduling the next head read once caught up.

use crate::batch;
use crate::error::Error;

use super::{Event, Mode, Replica};

impl Replica {
    pub(super) fn apply_ready(&mut self, now: u64) {
        // One unit per poll, so the state matches the event the driver sees.
        if let Some(front) = self.plan.front() {
            let from = front.from;
            if from != self.applied + 1 {
                // The plan no longer lines up (after a reset): rebuild it.
                self.clear_plan();
                return;
            }
            let Some(v) = self.ready.remove(from) else {
                // Lazy mode: a segment whose key filter the catalog gives
                // is read only when a read needs it.
                self.defer_front_if_able();
                return;
            };
            let unit = self.plan.pop_front().expect("front exists");
            let key = unit.entry.key.clone();
            let first = self.applied + 1;
            // The records first: the LSN counter is not advanced past the
            // last one (which may be u64::MAX - 1).
            for (&(s, e), lsn) in v.records.iter().zip(v.first..) {
                let payload = &v.bytes[s as usize..e as usize];
                match self.cfg.mode {
                    Mode::Kv => match batch::Batch::parse(payload) {
                        Ok(ops) => {
                            match self.lazy.as_mut() {
                                Some(l) => l.apply(lsn, ops),
                                None => self.state.apply(ops),
                            }
                            if self.cfg.emit_records {
                                self.events.push_back(Event::Record {
                                    lsn,
                                    payload: payload.to_vec(),
                                });
                            }
                        }
                        Err(d) => {
                            if lsn > first {
                                self.events.push_back(Event::Applied {
                                    first,
                                    last: lsn - 1,
                                });
                            }
                            let err = Error::decode(d).with_object(&key).with_lsn(lsn);
                            let delay = self.failure(&key, err);
                            self.clear_plan();
                            self.backoff_until = Some(now + delay);
                            self.head_due = Some(now);
                            self.head_fresh = true;
                            return;
                        }
                    },
                    Mode::Raw => self.events.push_back(Event::Record {
                        lsn,
                        payload: payload.to_vec(),
                    }),
                }
                self.applied = lsn;
            }
            self.success(&key);
            self.progress();
            self.last_error = None;
            if self.applied >= first {
                self.events.push_back(Event::Applied {
                    first,
                    last: self.applied,
                });
            }
            if self.applied >= self.committed {
                self.schedule_poll_from_last();
            }
        }
    }

    /// Lazy mode: counts the front unit of the plan as applied, unread,
    /// when a read can fetch it later (see [`Replica::deferrable`]).
    /// Returns whether it did.
    pub(super) fn defer_front_if_able(&mut self) -> bool {
        let able = self.plan.front().is_some_and(|u| {
            u.from == self.applied + 1
                && !self.ready.contains_key(u.from)
                && !self.inflight_units.contains_key(u.from)
                && self.deferrable(u)
        });
        if able {
            self.defer_front();
            if self.applied >= self.committed {
                self.schedule_poll_from_last();
            }
        }
        able
    }

    fn schedule_poll_from_last(&mut self) {
        if self.head_due.is_none() && !self.head_inflight {
            let base = self.last_poll_at.unwrap_or(0);
            // With long-poll, at once: the server holds the read.
            self.head_due = Some(base + self.idle_delay());
        }
    }
}
