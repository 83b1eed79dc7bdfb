//! One request: authorization, the object's answer (ranges, ETags, long-poll holds).

use super::*;

pub(super) async fn handle(
    State(state): State<Arc<Served>>,
    activity: Option<axum::Extension<Arc<Activity>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let activity = activity.map(|a| a.0);
    let response = respond(&state, &method, &uri, &headers, activity).await;
    tracing::debug!(
        %method,
        path = uri.path(),
        range = ?headers.get(header::RANGE),
        status = response.status().as_u16(),
        "walcast serve request"
    );
    response
}

pub(super) async fn respond(
    state: &Arc<Served>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    activity: Option<Arc<Activity>>,
) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return Response::builder()
            .status(StatusCode::METHOD_NOT_ALLOWED)
            .header(header::ALLOW, "GET, HEAD, OPTIONS")
            .body(Body::empty())
            .expect("static response");
    }
    // With tokens required, nothing (not even a 404) without a valid one.
    let access = match authorize(state, uri, headers) {
        Ok(access) => access,
        Err(refused) => return refused,
    };
    let Some(rel) = relative_path(uri.path()) else {
        return not_found();
    };
    // Nothing but the dataset's own objects: no filesystem access otherwise.
    let Some(object) = Object::of(&rel) else {
        return not_found();
    };
    // Long-poll: a conditional head GET with a wait hint.
    let long_poll = object == Object::Head && !state.max_wait.is_zero();
    let mut wait = if long_poll && method == Method::GET && longpoll::is_conditional(headers) {
        match longpoll::requested_wait(uri, headers, state.max_wait) {
            Ok(w) => w,
            Err(msg) => return bad_request(&msg),
        }
    } else {
        None
    };
    // Subscribed before the head is read, so no change is missed.
    let changes = wait.map(|_| state.signal.subscribe());
    // Opening may hash a large file for its ETag, or wait for a turn to:
    // the server's own work, not an idle client. The connection counts as
    // busy meanwhile, so the idle timeout cannot cut the request off.
    let busy = activity.as_ref().map(|a| Held::new(Arc::clone(a)));
    let mut entity = match open_object(state, &rel).await {
        Ok(e) => e,
        Err(r) => return r,
    };
    drop(busy);
    // Whether the object is stored gzip-compressed (a head written with
    // `--head-encoding gzip`), known before a hold lets its bytes go: a 304
    // ending the hold varies on Accept-Encoding all the same.
    let stored_gzip = |e: &Entity| {
        e.data
            .as_ref()
            .is_some_and(|d| d.starts_with(&walcast_core::catalog::GZIP_MAGIC))
    };
    let mut gzip = stored_gzip(&entity);
    // RFC 9110 13.1.1: an `If-Match` no ETag of the object satisfies is
    // answered 412, before `If-None-Match` and any hold.
    if !if_match(headers, &entity.etag) {
        return Response::builder()
            .status(StatusCode::PRECONDITION_FAILED)
            .body(Body::empty())
            .expect("valid response");
    }
    if let (Some(w), Some(changes)) = (wait, changes) {
        if if_none_match(headers, &entity.etag) {
            match HoldSlot::take(state) {
                Some(_slot) => {
                    // A held request keeps no file open (descriptors are for
                    // the requests being answered): a hold ending without a
                    // new head answers 304, with no body to read.
                    entity.file = None;
                    entity.data = None;
                    let _held = activity.map(Held::new);
                    match hold(state, &rel, headers, w, changes).await {
                        Some(Ok(e)) => {
                            gzip = stored_gzip(&e);
                            entity = e;
                        }
                        Some(Err(r)) => return r,
                        None => {}
                    }
                    // The token was checked before the hold: a head that
                    // came after it expired is not answered.
                    if let Err(refused) = authorize(state, uri, headers) {
                        return refused;
                    }
                }
                // Every hold is taken: answered at once, without
                // Preference-Applied (the replica then polls).
                None => wait = None,
            }
        } else {
            // Nothing to hold for (no If-None-Match, or the head already
            // changed): answered at once, without Preference-Applied.
            wait = None;
        }
    }

    // An object read with a token is kept no longer than the token is
    // valid (a cache would otherwise serve it, to whoever has the URL, long
    // after the token expired), and privately when the token came in a
    // header (the URL alone does not name who may read it).
    let cache_control = match (object.cache_control(), access) {
        (IMMUTABLE, Some(a)) => std::borrow::Cow::Owned(format!(
            "{}, max-age={}, immutable",
            if a.in_header { "private" } else { "public" },
            a.valid_for.min(IMMUTABLE_MAX_AGE)
        )),
        (c, _) => std::borrow::Cow::Borrowed(c),
    };
    let mut content_type = object.content_type();
    let etag = HeaderValue::from_str(&entity.etag).expect("ETag is ASCII");
    let mut builder = Response::builder()
        .header(header::ETAG, etag)
        .header(header::CACHE_CONTROL, cache_control.as_ref())
        .header(header::ACCEPT_RANGES, "bytes");
    // A head stored gzip-compressed (`--head-encoding gzip`) is JSON with
    // Content-Encoding: gzip for clients that accept it, else the stored
    // bytes as they are (walcast's readers decode them either way). Every
    // answer varies on Accept-Encoding; only one with a body is labelled.
    let gzip_head = object == Object::Head && gzip;
    if gzip_head {
        builder = builder.header(header::VARY, "accept-encoding");
    }
    let builder = if long_poll {
        builder.header(
            walcast_core::io::LONG_POLL_HEADER,
            state.max_wait.as_secs().to_string(),
        )
    } else {
        builder
    };
    let builder = match wait {
        Some(w) => builder.header("preference-applied", longpoll::preference_applied(w)),
        None => builder,
    };

    if if_none_match(headers, &entity.etag) {
        return builder
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .expect("valid response");
    }

    let total = entity.len;
    let range = if range_applies(headers, &entity.etag) {
        let mut values = headers.get_all(header::RANGE).iter();
        match (values.next(), values.next()) {
            (Some(v), None) => parse_range(v.as_bytes(), total),
            _ => RangeReq::Ignore,
        }
    } else {
        RangeReq::Ignore
    };
    let builder = match (gzip_head, accepts_gzip(headers)) {
        (true, true) => builder.header(header::CONTENT_ENCODING, "gzip"),
        (true, false) => {
            content_type = "application/gzip";
            builder
        }
        (false, _) => builder,
    };
    let builder = builder
        .header(header::CONTENT_TYPE, content_type)
        .header("x-content-type-options", "nosniff");
    let (builder, start, end) = match range {
        RangeReq::Unsatisfiable => {
            let mut res = builder
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{total}"))
                .header(header::CONTENT_LENGTH, 0)
                .body(Body::empty())
                .expect("valid response");
            // Not the object's `immutable`: a shared cache that keys on the
            // URL alone must not answer later GETs of it with this.
            res.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            return res;
        }
        RangeReq::Slice(start, last) => (
            builder.status(StatusCode::PARTIAL_CONTENT).header(
                header::CONTENT_RANGE,
                format!("bytes {start}-{last}/{total}"),
            ),
            start,
            last + 1,
        ),
        RangeReq::Ignore => (builder.status(StatusCode::OK), 0, total),
    };
    let builder = builder.header(header::CONTENT_LENGTH, end - start);
    let body = if method == Method::HEAD || start == end {
        Body::empty()
    } else if let Some(data) = entity.data {
        // Small file: already in memory. `end <= total == data.len()`.
        Body::from(data.slice(start as usize..end as usize))
    } else {
        // A large file let go by a hold is opened again: the same version
        // (ETag) only, since the headers name it.
        let file = match entity.file {
            Some(file) => file,
            None => match open_object(state, &rel).await {
                Ok(Entity {
                    file: Some(file),
                    etag,
                    ..
                }) if etag == entity.etag => file,
                Ok(_) => return retry_later(),
                Err(r) => return r,
            },
        };
        match stream_slice(file, start, end - start).await {
            Ok(body) => body,
            Err(e) => {
                tracing::error!(
                    path = %state.root.join(&rel).display(),
                    error = %e,
                    "walcast serve: cannot read a dataset object"
                );
                return status_only(StatusCode::INTERNAL_SERVER_ERROR);
            }
        }
    };
    builder.body(body).expect("valid response")
}

/// Whether `Accept-Encoding` takes gzip (RFC 9110 12.5.3): gzip (or
/// x-gzip) listed with a weight above zero, or `*` so listed while gzip is
/// not listed at all.
pub(super) fn accepts_gzip(headers: &HeaderMap) -> bool {
    let (mut gzip, mut any) = (None, None);
    for item in headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
    {
        let mut parts = item.split(';').map(str::trim);
        let coding = parts.next().unwrap_or("");
        let weight = parts
            .find_map(|p| {
                let (name, value) = p.split_once('=')?;
                name.trim().eq_ignore_ascii_case("q").then_some(value)
            })
            .map_or(Some(1.0), |q| q.trim().parse::<f32>().ok());
        let takes = weight.is_some_and(|w| w > 0.0);
        if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            gzip = Some(gzip.unwrap_or(false) || takes);
        } else if coding == "*" {
            any = Some(any.unwrap_or(false) || takes);
        }
    }
    gzip.or(any).unwrap_or(false)
}

/// A request's valid access token.
#[derive(Clone, Copy, Debug)]
pub(super) struct Access {
    /// It came in the `Authorization` header (else in the query).
    pub(super) in_header: bool,
    /// Seconds until it expires.
    pub(super) valid_for: u64,
}

/// Checks the request's access token when tokens are required: `Ok(None)`
/// when none is needed, `Ok(Some(access))` for a valid one, else the 401 to
/// answer.
#[allow(clippy::result_large_err)]
pub(super) fn authorize(
    state: &Served,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Option<Access>, Response> {
    if state.verify_keys.is_empty() {
        return Ok(None);
    }
    let (found, in_header) = match bearer(headers) {
        Some(t) => (Some(t), true),
        None => (query_token(uri), false),
    };
    let Some(found) = found else {
        return Err(unauthorized("missing", "an access token is required"));
    };
    // A clock before 1970 has no "now" to check an expiry against: every
    // token counts as expired.
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(u64::MAX, |d| d.as_secs());
    let path = percent_decode(uri.path()).unwrap_or_else(|| uri.path().to_string());
    match token::verify_for(&found, &state.verify_keys, now, &path) {
        Ok(claims) => Ok(Some(Access {
            in_header,
            valid_for: claims.exp.saturating_sub(now),
        })),
        Err(e) => {
            tracing::info!(
                path = uri.path(),
                reason = e.code(),
                "walcast serve: token refused"
            );
            Err(unauthorized(e.code(), &e.to_string()))
        }
    }
}

/// The token of `Authorization: Bearer <token>`, if there is one.
pub(super) fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim().to_string())
}

/// The value of the query parameter `token`, percent-decoded.
pub(super) fn query_token(uri: &Uri) -> Option<String> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == "token").then(|| percent_decode(v).unwrap_or_default())
    })
}

/// 401 with `WWW-Authenticate: Bearer` naming why (`reason` is a fixed code).
pub(super) fn unauthorized(reason: &str, message: &str) -> Response {
    Response::builder()
        .status(StatusCode::UNAUTHORIZED)
        .header(
            header::WWW_AUTHENTICATE,
            format!(
                "Bearer realm=\"walcast\", error=\"invalid_token\", error_description=\"{reason}\""
            ),
        )
        .header(header::CACHE_CONTROL, "no-store")
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from(format!("401 Unauthorized: {message}\n")))
        .expect("valid response")
}

/// Opens the object at `rel`, with its ETag (see [`etag_of_file`]), or the
/// answer for why it cannot be served: 404 when it is not there, 503 with
/// `Retry-After` when the process is out of file descriptors, else 500.
pub(super) async fn open_object(state: &Arc<Served>, rel: &str) -> Result<Entity, Response> {
    let opened = {
        let state = Arc::clone(state);
        let rel = rel.to_string();
        tokio::task::spawn_blocking(move || open_entity(&state, &rel)).await
    };
    let opened = match opened {
        Ok(Ok(Opened::Ready(entity))) => Ok(Ok(entity)),
        Ok(Ok(Opened::Unhashed(file, key))) => {
            let len = key.len;
            Ok(etag_of_file(state, key).await.map(|etag| Entity {
                file: Some(file),
                len,
                etag,
                data: None,
            }))
        }
        Ok(Err(e)) => Ok(Err(e)),
        Err(e) => Err(e),
    };
    match opened {
        Ok(Ok(entity)) => Ok(entity),
        Ok(Err(e)) if is_not_found(&e) => Err(not_found()),
        Ok(Err(e)) if e.get_ref().is_some_and(|r| r.is::<SmallBytesFull>()) => {
            tracing::warn!(
                path = rel,
                "walcast serve: the bytes of small files held for answers are at their \
                 bound (clients reading slowly); answering 503"
            );
            Err(retry_later())
        }
        Ok(Err(e)) if is_out_of_fds(&e) => {
            tracing::warn!(
                path = %state.root.join(rel).display(),
                error = %e,
                "walcast serve: out of file descriptors; answering 503 (lower \
                 --max-connections or raise `ulimit -n`)"
            );
            Err(retry_later())
        }
        Ok(Err(e)) => {
            tracing::error!(
                path = %state.root.join(rel).display(),
                error = %e,
                "walcast serve: cannot read a dataset object"
            );
            Err(status_only(StatusCode::INTERNAL_SERVER_ERROR))
        }
        Err(e) => {
            tracing::warn!(path = rel, error = %e, "walcast serve: blocking task failed");
            Err(status_only(StatusCode::INTERNAL_SERVER_ERROR))
        }
    }
}

/// Holds a long-poll on the head at `rel` until its ETag no longer matches
/// the request's `If-None-Match` (then the new head, or why it cannot be
/// served), or `wait` runs out or the server stops (then `None`: 304).
pub(super) async fn hold(
    state: &Arc<Served>,
    rel: &str,
    headers: &HeaderMap,
    wait: Duration,
    mut changes: watch::Receiver<u64>,
) -> Option<Result<Entity, Response>> {
    let deadline = Instant::now() + wait;
    let mut stop = state.stop.subscribe();
    loop {
        let now = Instant::now();
        if now >= deadline || *stop.borrow() {
            return None;
        }
        let poll = if state.watched.load(std::sync::atomic::Ordering::Relaxed) {
            longpoll::WATCHED_POLL
        } else {
            longpoll::FALLBACK_POLL
        };
        let tick = (deadline - now).min(poll);
        tokio::select! {
            _ = changes.changed() => {}
            () = tokio::time::sleep(tick) => {}
            _ = stop.wait_for(|s| *s) => return None,
        }
        match open_object(state, rel).await {
            Ok(e) if if_none_match(headers, &e.etag) => continue,
            // Short of descriptors or of the bytes held for answers for a
            // moment: the hold goes on (its client asked to wait anyway).
            Err(r) if r.status() == StatusCode::SERVICE_UNAVAILABLE => continue,
            other => return Some(other),
        }
    }
}

pub(super) fn bad_request(message: &str) -> Response {
    Response::builder()
        .status(StatusCode::BAD_REQUEST)
        .header(header::CACHE_CONTROL, NO_CACHE)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from(format!("400 Bad Request: {message}\n")))
        .expect("valid response")
}

pub(super) fn status_only(status: StatusCode) -> Response {
    Response::builder()
        .status(status)
        .header(header::CACHE_CONTROL, NO_CACHE)
        .body(Body::empty())
        .expect("static response")
}

/// 503 with `Retry-After: 1`: a passing shortage (file descriptors), or an
/// object that changed under the request.
pub(super) fn retry_later() -> Response {
    Response::builder()
        .status(StatusCode::SERVICE_UNAVAILABLE)
        .header(header::CACHE_CONTROL, "no-store")
        .header(header::RETRY_AFTER, "1")
        .body(Body::empty())
        .expect("static response")
}

/// Whether an error means the process (`EMFILE`) or the system (`ENFILE`)
/// has no file descriptor left.
pub(super) fn is_out_of_fds(e: &io::Error) -> bool {
    #[cfg(unix)]
    {
        matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
    }
    #[cfg(not(unix))]
    {
        let _ = e;
        false
    }
}

pub(super) fn not_found() -> Response {
    status_only(StatusCode::NOT_FOUND)
}

/// Whether an error opening an object means it is not there (a missing file
/// or directory on its path, a directory in its place). Anything else,
/// permission denied included, is the server's problem.
pub(super) fn is_not_found(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory | io::ErrorKind::IsADirectory
    )
}

/// One of the [`Served::max_holding`] long-polls that may be held at once.
pub(super) struct HoldSlot<'a>(&'a Served);

impl<'a> HoldSlot<'a> {
    /// A slot, unless every one is taken.
    pub(super) fn take(state: &'a Served) -> Option<HoldSlot<'a>> {
        let mut n = state.holding.load(Ordering::Relaxed);
        loop {
            if n >= state.max_holding {
                return None;
            }
            match state
                .holding
                .compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Some(HoldSlot(state)),
                Err(now) => n = now,
            }
        }
    }
}

impl Drop for HoldSlot<'_> {
    fn drop(&mut self) {
        self.0.holding.fetch_sub(1, Ordering::AcqRel);
    }
}
