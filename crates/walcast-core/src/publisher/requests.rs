//! Requests and their outcomes: request ids, GET and PUT construction,
//! per-object failure counts with jittered backoff, and decoding a head read.

use crate::catalog::{Head, HEAD_KEY};
use crate::error::{Error, ErrorKind};
use crate::io::{GetRequest, GetResponse, RequestId};
use crate::rng::splitmix64;

use super::{Action, Event, ObjectKind, Publisher, PutCondition, PutRequest, Req};

impl Publisher {
    pub(super) fn id(&mut self, req: Req) -> RequestId {
        self.next_id += 1;
        let id = RequestId(self.next_id);
        self.pending.insert(id, req);
        id
    }

    pub(super) fn get(&mut self, req: Req, key: String) -> Action {
        let id = self.id(req);
        let max_bytes = if key == HEAD_KEY {
            crate::catalog::MAX_HEAD_BYTES as u64
        } else {
            crate::catalog::MAX_PAGE_BYTES as u64
        };
        Action::Get(GetRequest {
            id,
            key,
            range: None,
            if_none_match: None,
            wait_ms: None,
            timeout_ms: self.cfg.request_timeout_ms,
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
        Action::Put(PutRequest {
            id,
            key,
            body,
            condition,
            kind,
        })
    }

    pub(super) fn backoff(&mut self, key: &str, err: Error) -> u64 {
        let n = self.attempts.entry(key.to_string()).or_insert(0);
        *n += 1;
        let n = *n;
        if n == self.cfg.max_attempts {
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
                format!("reading the head failed: {status:?} {message}"),
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
