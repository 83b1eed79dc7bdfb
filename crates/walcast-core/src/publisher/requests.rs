//! Requests and their outcomes: request ids, GET and PUT construction,
//! per-object failure counts with jittered backoff, and decoding a head read.

use crate::catalog::{Head, HEAD_KEY};
use crate::error::{Error, ErrorKind};
use crate::io::{GetRequest, GetResponse, RequestId};
use crate::rng::splitmix64;

use super::{
    Action, Event, ObjectKind, Publisher, PutCondition, PutRequest, PutResponse, Req, Role,
};

impl Publisher {
    pub(super) fn id(&mut self, req: Req) -> RequestId {
        self.next_id += 1;
        let id = RequestId(self.next_id);
        self.pending.insert(id, req);
        id
    }

    pub(super) fn get(&mut self, req: Req, key: String) -> Action {
        let max_bytes = if key == HEAD_KEY {
            crate::catalog::MAX_HEAD_BYTES as u64
        } else {
            crate::catalog::MAX_PAGE_BYTES as u64
        };
        self.get_sized(req, key, max_bytes)
    }

    /// A whole-object GET of at most `max_bytes` useful bytes; one larger
    /// than a page gets the time to move them at the replicas' slowest
    /// assumed rate on top of the plain limit (as a replica's GET does).
    pub(super) fn get_sized(&mut self, req: Req, key: String, max_bytes: u64) -> Action {
        let id = self.id(req);
        let transfer = if max_bytes > crate::catalog::MAX_PAGE_BYTES as u64 {
            crate::replica::fetch::transfer_allowance_ms(max_bytes)
        } else {
            0
        };
        Action::Get(GetRequest {
            id,
            key,
            range: None,
            if_none_match: None,
            wait_ms: None,
            timeout_ms: self.cfg.request_timeout_ms.saturating_add(transfer),
            max_bytes,
        })
    }

    pub(super) fn put(
        &mut self,
        req: Req,
        key: String,
        body: Vec<u8>,
        condition: PutCondition,
        kind: ObjectKind,
    ) -> Action {
        let id = self.id(req);
        if condition == PutCondition::CreateOnly && kind != ObjectKind::Head {
            let sum = (key.clone(), body.len() as u64, crate::crc::hash(&body));
            self.created.insert(id, sum);
        }
        Action::Put(PutRequest {
            id,
            key,
            body,
            condition,
            kind,
        })
    }

    /// The answer to reading back an object whose create-only PUT found its
    /// key taken: our bytes settle the PUT as written; another object there
    /// stops this publisher, since committing a head naming it would point
    /// readers at bytes that are not ours (its epoch was used before at this
    /// prefix, by a head since deleted or rolled back); a failed read tries
    /// the PUT again.
    pub(super) fn on_confirm(
        &mut self,
        now: u64,
        of: Req,
        key: String,
        (len, crc): (u64, u32),
        resp: GetResponse,
    ) {
        if self.role == Role::Fenced {
            return;
        }
        match resp {
            GetResponse::Ok {
                body, range: None, ..
            } if body.len() as u64 == len && crate::crc::hash(&body) == crc => {
                self.settle_put(now, of, PutResponse::Ok { etag: None });
            }
            GetResponse::Ok { body, .. } => {
                let err = Error::new(
                    ErrorKind::Fenced,
                    format!(
                        "{key} already holds other bytes ({}{} bytes, ours {len}): epoch {} was used before at this prefix, by a head since deleted or rolled back; publish to an empty prefix, or remove what that epoch left",
                        if body.len() as u64 > len { "over " } else { "" },
                        body.len(),
                        self.epoch
                    ),
                )
                .with_object(key);
                self.stop(err);
            }
            other => {
                let message = format!("reading back {key}, whose key was taken, failed: {other:?}");
                self.settle_put(now, of, PutResponse::Failed { message });
            }
        }
    }

    pub(super) fn backoff(&mut self, key: &str, err: Error) -> u64 {
        let n = self.attempts.entry(key.to_string()).or_insert(0);
        *n += 1;
        let n = *n;
        // Reported after every `max_attempts` failures in a row, not only
        // the first such run: a store that keeps refusing stays visible.
        if n % self.cfg.max_attempts.max(1) == 0 {
            self.events.push_back(Event::Error(err));
        }
        let exp = self
            .cfg
            .retry_base_ms
            .saturating_mul(1 << n.min(16))
            .min(self.cfg.retry_max_ms);
        exp / 2 + splitmix64(&mut self.rng) % (exp / 2 + 1)
    }

    pub(super) fn decode_head(resp: GetResponse) -> Result<Option<(Head, Option<String>)>, Error> {
        match resp {
            GetResponse::Ok { body, etag, .. } => Head::decode(&body)
                .map(|h| Some((h, etag)))
                .map_err(|e| Error::decode(e).with_object(HEAD_KEY)),
            GetResponse::NotFound => Ok(None),
            GetResponse::Failed { status, message } => Err(Error::new(
                ErrorKind::Unavailable,
                match status {
                    Some(s) => format!("reading the head failed: HTTP {s}: {message}"),
                    None => format!("reading the head failed: {message}"),
                },
            )
            .with_object(HEAD_KEY)),
            other => Err(Error::new(
                ErrorKind::Unavailable,
                format!("unexpected answer {other:?}"),
            )
            .with_object(HEAD_KEY)),
        }
    }
}
