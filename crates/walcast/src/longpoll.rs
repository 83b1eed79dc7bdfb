//! Long-poll on the catalog head, for `walcast serve`.
//!
//! A conditional head GET (`If-None-Match` naming the current head's ETag)
//! that carries a wait hint, `Prefer: wait=N` (RFC 7240) or the query
//! parameter `?wait=N` (whole seconds; a CDN can key on it), is held until
//! the head's ETag changes (then `200` with the new head) or the wait runs
//! out (then `304`), and answered with `Preference-Applied: wait=N`. Waits
//! are capped at [`ServeOptions::max_wait`](crate::serve::ServeOptions)
//! (default [`DEFAULT_MAX_WAIT`], 60 s). Every head answer advertises the
//! cap in [`LONG_POLL_HEADER`](walcast_core::io::LONG_POLL_HEADER)
//! (`Walcast-Long-Poll: 60`), by which replicas detect support.
//!
//! A malformed `?wait=` is refused with `400` and a message naming the
//! parameter; a malformed `Prefer` is ignored (RFC 7240), so the request is
//! answered at once. A wait without `If-None-Match`, or whose ETag no longer
//! matches, is answered at once.
//!
//! The server learns of a new head at once: a file watch ([`HeadWatch`],
//! the `notify` crate) on the served directory wakes every held request
//! when a file named `head.json` changes, and a publisher in the same
//! process (`walcast publish --serve`) signals each commit through a
//! [`HeadSignal`]. Held requests also re-read the head every
//! [`FALLBACK_POLL`] when no watch could be started, and every
//! [`WATCHED_POLL`] when one runs, so a missed event costs at most that
//! (and idle long-pollers cost the server a head read every 5 s each, not
//! two a second).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderMap, Uri};
use tokio::sync::watch;

/// The longest wait `walcast serve` grants by default.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(60);

/// Longest accepted `--max-wait`.
pub const MAX_WAIT_LIMIT: Duration = Duration::from_secs(3600);

/// How often a held request re-reads the head when no file watch runs.
pub const FALLBACK_POLL: Duration = Duration::from_millis(500);

/// How often a held request re-reads the head while a file watch (or an
/// in-process publisher's [`HeadSignal`]) wakes it on every change: only
/// against an event the watch missed.
pub const WATCHED_POLL: Duration = Duration::from_secs(5);

/// Wakes held long-polls: a new head may be there. Cheap to clone; every
/// clone signals the same server.
#[derive(Clone, Debug)]
pub struct HeadSignal {
    tx: Arc<watch::Sender<u64>>,
}

impl Default for HeadSignal {
    fn default() -> Self {
        HeadSignal::new()
    }
}

impl HeadSignal {
    /// A signal no server listens to yet.
    pub fn new() -> HeadSignal {
        HeadSignal {
            tx: Arc::new(watch::channel(0).0),
        }
    }

    /// Wakes every held request, which re-reads the head.
    pub fn notify(&self) {
        self.tx.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that sees every later [`notify`](Self::notify).
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }
}

/// A file watch on a served directory that signals a [`HeadSignal`] when a
/// `head.json` under it changes (is created, written, renamed or removed:
/// not when it is read). The watch ends when this is dropped.
pub struct HeadWatch {
    _watcher: notify::RecommendedWatcher,
}

impl std::fmt::Debug for HeadWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadWatch").finish_non_exhaustive()
    }
}

impl HeadWatch {
    /// Watches `root` recursively.
    pub fn start(root: &Path, signal: HeadSignal) -> notify::Result<HeadWatch> {
        use notify::Watcher as _;
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            match ev {
                Ok(ev) => {
                    // A change, not a read: a hold reading the head (an
                    // open is an event too) must not wake itself.
                    let change = !matches!(ev.kind, notify::EventKind::Access(_));
                    if change
                        && ev
                            .paths
                            .iter()
                            .any(|p| p.file_name().is_some_and(|n| n == "head.json"))
                    {
                        signal.notify();
                    }
                }
                // A lost event (an overflowed queue): wake everyone.
                Err(_) => signal.notify(),
            }
        })?;
        watcher.watch(root, notify::RecursiveMode::Recursive)?;
        Ok(HeadWatch { _watcher: watcher })
    }
}

/// The wait a request asks for, capped at `max`: `Ok(None)` for none (or
/// long-poll disabled: `max` zero); `Err` with a message for a malformed
/// `?wait=`.
pub(crate) fn requested_wait(
    uri: &Uri,
    headers: &HeaderMap,
    max: Duration,
) -> Result<Option<Duration>, String> {
    let mut secs = None;
    if let Some(q) = uri.query() {
        for kv in q.split('&') {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            if k != walcast_core::io::WAIT_PARAM {
                continue;
            }
            let Some(n) = whole_seconds(v) else {
                return Err(format!(
                    "invalid wait hint ?wait={:?}: whole seconds expected (at most {} are granted)",
                    v.chars().take(32).collect::<String>(),
                    max.as_secs()
                ));
            };
            secs = Some(n);
            break;
        }
    }
    if secs.is_none() {
        secs = prefer_wait(headers);
    }
    Ok(secs
        .map(|s| Duration::from_secs(s).min(max))
        .filter(|d| !d.is_zero()))
}

/// The `wait` preference of the request's `Prefer` headers (RFC 7240:
/// `Prefer: wait=10`, among other preferences), ignored when malformed.
fn prefer_wait(headers: &HeaderMap) -> Option<u64> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|pref| {
            // A preference's parameters follow `;`.
            let pref = pref.split(';').next()?.trim();
            let (name, value) = pref.split_once('=')?;
            if !name.trim().eq_ignore_ascii_case("wait") {
                return None;
            }
            whole_seconds(value.trim().trim_matches('"'))
        })
}

/// A whole number of seconds (at most 9 digits).
fn whole_seconds(v: &str) -> Option<u64> {
    if v.is_empty() || v.len() > 9 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

/// The `Preference-Applied` value for a held request.
pub(crate) fn preference_applied(wait: Duration) -> String {
    format!("wait={}", wait.as_secs())
}

/// Whether `headers` hold an `If-None-Match` at all.
pub(crate) fn is_conditional(headers: &HeaderMap) -> bool {
    headers.contains_key(header::IF_NONE_MATCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait(uri: &str, prefer: Option<&str>) -> Result<Option<u64>, String> {
        let uri: Uri = uri.parse().unwrap();
        let mut h = HeaderMap::new();
        if let Some(p) = prefer {
            h.insert("prefer", p.parse().unwrap());
        }
        requested_wait(&uri, &h, DEFAULT_MAX_WAIT).map(|d| d.map(|d| d.as_secs()))
    }

    #[test]
    fn wait_hints() {
        assert_eq!(wait("/catalog/head.json", None), Ok(None));
        assert_eq!(wait("/catalog/head.json?wait=30", None), Ok(Some(30)));
        assert_eq!(wait("/catalog/head.json?token=x&wait=5", None), Ok(Some(5)));
        assert_eq!(wait("/catalog/head.json?wait=600", None), Ok(Some(60)));
        assert_eq!(wait("/catalog/head.json?wait=0", None), Ok(None));
        assert_eq!(wait("/h", Some("wait=10")), Ok(Some(10)));
        assert_eq!(wait("/h", Some("respond-async, wait=7")), Ok(Some(7)));
        assert_eq!(wait("/h", Some("Wait = \"12\"; x=y")), Ok(Some(12)));
        assert_eq!(wait("/h?wait=3", Some("wait=10")), Ok(Some(3)));
        // A malformed Prefer is ignored; a malformed ?wait= is refused.
        assert_eq!(wait("/h", Some("wait=soon")), Ok(None));
        assert_eq!(wait("/h", Some("wait=-1")), Ok(None));
        assert_eq!(wait("/h", Some("wait=99999999999999999999")), Ok(None));
        for bad in [
            "?wait=",
            "?wait=abc",
            "?wait=-1",
            "?wait=1.5",
            "?wait",
            "?wait=99999999999",
        ] {
            let e = wait(&format!("/h{bad}"), None).unwrap_err();
            assert!(e.contains("wait"), "{e}");
        }
        // Disabled.
        let uri: Uri = "/h?wait=30".parse().unwrap();
        assert_eq!(
            requested_wait(&uri, &HeaderMap::new(), Duration::ZERO),
            Ok(None)
        );
    }
}
