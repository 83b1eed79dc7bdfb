//! The head's tail: copies of the newest segments carried in the head
//! (`Head::tail`), applied without a GET after the same verification as a
//! fetched whole segment. A copy that fails verification is set aside and
//! the segment object is fetched instead.

use crate::error::Error;

use super::plan::Unit;
use super::Replica;

/// Keys of refused tail copies remembered at most (the tail names a few
/// segments; a head that keeps sending bad copies costs one GET each).
const MAX_REFUSED: usize = 64;

impl Replica {
    /// Verifies the planned units the accepted head carries a copy of and
    /// makes them ready to apply. Returns whether any became ready.
    pub(super) fn take_from_tail(&mut self) -> bool {
        let Some(head) = self.head.as_ref() else {
            return false;
        };
        if head.tail.is_empty() {
            return false;
        }
        let units: Vec<(Unit, Vec<u8>)> = self
            .plan
            .iter()
            .filter(|u| {
                !self.inflight_units.contains_key(u.from)
                    && !self.ready.contains_key(u.from)
                    && !self.tail_refused.contains(&u.entry.key)
            })
            .filter_map(|u| {
                head.tail_body(&u.entry.key)
                    .map(|b| (u.clone(), b.to_vec()))
            })
            .collect();
        let mut took = false;
        for (u, body) in units {
            match self.verify_segment(&u, body, None) {
                Ok(v) => {
                    self.retry_at.remove(u.from);
                    self.ready.insert(u.from, v);
                    self.tail_units += 1;
                    took = true;
                }
                Err(err) => {
                    if self.tail_refused.len() >= MAX_REFUSED {
                        self.tail_refused.clear();
                    }
                    self.tail_refused.push(u.entry.key.clone());
                    self.last_error = Some(Error::new(
                        err.kind(),
                        format!("the head's copy of the segment fails verification ({err}); fetching the object"),
                    )
                    .with_object(&u.entry.key)
                    .with_lsn(u.from));
                }
            }
        }
        took
    }

    /// Segments applied from the head's tail without a GET, so far.
    pub fn tail_applied(&self) -> u64 {
        self.tail_units
    }
}
