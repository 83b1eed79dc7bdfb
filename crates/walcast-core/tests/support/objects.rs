//! An in-memory bucket for driving a `Publisher` in tests: whole-object
//! GETs, and PUTs that honour create-only and If-Match conditions with an
//! ETag per version. Shared by the takeover tests.

use std::collections::HashMap;

use walcast_core::catalog::{Head, HEAD_KEY};
use walcast_core::io::GetResponse;
use walcast_core::publisher::{PutCondition, PutRequest, PutResponse};

/// Objects by key: bytes and ETag.
pub(crate) type Objects = HashMap<String, (Vec<u8>, u64)>;

/// Answers a PUT: stores it when its condition holds, under a new ETag one
/// past `etag` (which it advances).
pub(crate) fn put(objects: &mut Objects, etag: &mut u64, req: &PutRequest) -> PutResponse {
    let cur = objects.get(&req.key).map(|(_, e)| e.to_string());
    match &req.condition {
        PutCondition::CreateOnly if cur.is_some() => return PutResponse::AlreadyExists,
        PutCondition::IfMatch(e) if cur.as_deref() != Some(e.as_str()) => {
            return PutResponse::PreconditionFailed
        }
        _ => {}
    }
    *etag += 1;
    objects.insert(req.key.clone(), (req.body.clone(), *etag));
    PutResponse::Ok {
        etag: Some(etag.to_string()),
    }
}

/// Answers a GET of the whole object `key`.
pub(crate) fn get(objects: &Objects, key: &str) -> GetResponse {
    match objects.get(key) {
        Some((b, e)) => GetResponse::Ok {
            body: b.clone(),
            etag: Some(e.to_string()),
            range: None,
        },
        None => GetResponse::NotFound,
    }
}

/// The dataset's head.
pub(crate) fn head(objects: &Objects) -> Head {
    Head::decode(&objects[HEAD_KEY].0).expect("the head decodes")
}
