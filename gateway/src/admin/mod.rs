//! The admin endpoint (HTTP/1.1, `[admin] listen`, loopback by default):
//!
//! - `GET /metrics`: Prometheus text format ([`metrics`]).
//! - `GET /healthz`: 200 while the process serves and the queue takes appends; 503 otherwise.
//! - `GET /readyz`: 200 or 503 with a JSON body: listeners, queue, each uplink's state. A down
//!   uplink does not make the gateway unready (it buffers, as designed); a full queue under
//!   `backpressure` does.
//! - `GET /`: the status page (one self-contained HTML file), fed by `GET /api/status`.
//! - `POST /reload[?release=NAME,...]`: re-read the config, like SIGHUP; loopback peers only.
//!
//! With a token (`admin.token_file` or `admin.token_env`, required for a non-loopback `listen`),
//! every request but `GET /healthz` must carry it: `Authorization: Bearer TOKEN`, or Basic
//! credentials whose password is the token (any user name), which is what a browser sends after
//! it asked for them, so the status page and its `/api/status` requests work in a browser too.
//! Without it the answer is 401 with `WWW-Authenticate` offering both. `/healthz` stays open
//! for load balancers and supervisors that cannot send a header, and it says nothing but
//! "ok" or why not; `/readyz` names the uplinks' targets and needs the token.
//!
//! The endpoint only reads counters and the queue's stats; it never touches the data path.

pub mod metrics;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::config::AdminToken;
use crate::status::{age_seconds, ReloadRequest, Status};

const STATUS_PAGE: &str = include_str!("status.html");

/// Serves the admin endpoint on `listener`, on a task of its own. The service binds the listener
/// early (a taken port fails the start before anything runs) and serves it last: requests wait
/// in the listen backlog until the uplinks are published, so the first scrape never sees a
/// half-started gateway.
/// `token`: see the module's header; `None` serves everyone (a loopback `listen`).
pub fn serve(
    listener: TcpListener,
    status: Arc<Status>,
    token: Option<AdminToken>,
) -> tokio::task::JoinHandle<()> {
    let token = token.map(Arc::new);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(error) => {
                    tracing::debug!(%error, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let status = status.clone();
            let token = token.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let status = status.clone();
                    let token = token.clone();
                    async move {
                        let allowed = match &token {
                            Some(t) => is_open(&req) || authorized(&req, t),
                            None => true,
                        };
                        if !allowed {
                            return Ok::<_, Infallible>(unauthorized(&req));
                        }
                        Ok::<_, Infallible>(route(req, peer, &status).await)
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .serve_connection(TokioIo::new(tcp), svc);
                if let Err(error) = conn.await {
                    tracing::debug!(%peer, %error, "admin connection ended with an error");
                }
            });
        }
    })
}

fn reply(code: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = code;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    r
}

/// What answers without the token: `GET /healthz` only.
fn is_open(req: &Request<Incoming>) -> bool {
    req.method() == Method::GET && req.uri().path() == "/healthz"
}

/// Whether `req` carries `token`: `Authorization: Bearer TOKEN`, or `Basic` with the token as
/// the password.
fn authorized(req: &Request<Incoming>, token: &AdminToken) -> bool {
    let Some(value) = req.headers().get(hyper::header::AUTHORIZATION) else {
        return false;
    };
    let value = value.as_bytes();
    let Some(space) = value.iter().position(|&b| b == b' ') else {
        return false;
    };
    let (scheme, rest) = (&value[..space], value[space..].trim_ascii());
    if scheme.eq_ignore_ascii_case(b"bearer") {
        token.matches(rest)
    } else if scheme.eq_ignore_ascii_case(b"basic") {
        let Some(decoded) = base64_decode(rest) else {
            return false;
        };
        match decoded.iter().position(|&b| b == b':') {
            Some(colon) => token.matches(&decoded[colon + 1..]),
            None => false,
        }
    } else {
        false
    }
}

/// 401 with the two schemes the endpoint takes. Bearer first (for API clients); a browser
/// skips it and asks its user for the Basic credentials.
fn unauthorized(req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let had_credentials = req.headers().contains_key(hyper::header::AUTHORIZATION);
    let mut r = reply(
        StatusCode::UNAUTHORIZED,
        "text/plain",
        if had_credentials {
            "wrong token\n"
        } else {
            "this endpoint needs the admin token: send `Authorization: Bearer TOKEN` (only /healthz is open)\n"
        },
    );
    let bearer = if had_credentials {
        r#"Bearer realm="gateway admin", error="invalid_token""#
    } else {
        r#"Bearer realm="gateway admin""#
    };
    let h = r.headers_mut();
    h.append(
        hyper::header::WWW_AUTHENTICATE,
        hyper::header::HeaderValue::from_static(bearer),
    );
    h.append(
        hyper::header::WWW_AUTHENTICATE,
        hyper::header::HeaderValue::from_static(r#"Basic realm="gateway admin", charset="UTF-8""#),
    );
    r
}

/// Standard base64 with padding (RFC 4648), as Basic credentials use; `None` if malformed.
fn base64_decode(text: &[u8]) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    if !text.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let chunks = text.len() / 4;
    for (i, chunk) in text.chunks(4).enumerate() {
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && i + 1 != chunks) {
            return None;
        }
        let mut n = 0u32;
        for &c in &chunk[..4 - pad] {
            n = (n << 6) | value(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..4 - pad]);
    }
    Some(out)
}

fn json(code: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    reply(code, "application/json", v.to_string())
}

async fn route(req: Request<Incoming>, peer: SocketAddr, status: &Status) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => match metrics::render(status) {
            Ok(text) => reply(StatusCode::OK, metrics::CONTENT_TYPE, text),
            Err(_) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                "metrics encoding failed\n",
            ),
        },
        (&Method::GET, "/healthz") => {
            if status.queue.is_writable() {
                reply(StatusCode::OK, "text/plain", "ok\n")
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "the queue is not writable (closed, or its last write failed: is the disk full?)\n",
                )
            }
        }
        (&Method::GET, "/readyz") => {
            let v = readiness(status);
            let code = if v["ready"] == serde_json::Value::Bool(true) {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(code, &v)
        }
        (&Method::GET, "/api/status") => json(StatusCode::OK, &status_json(status)),
        (&Method::GET, "/") => reply(StatusCode::OK, "text/html; charset=utf-8", STATUS_PAGE),
        (&Method::POST, "/reload") => {
            if !peer.ip().is_loopback() {
                return reply(
                    StatusCode::FORBIDDEN,
                    "text/plain",
                    "reload is accepted from loopback peers only\n",
                );
            }
            let release: Vec<String> = req
                .uri()
                .query()
                .unwrap_or("")
                .split('&')
                .filter_map(|kv| kv.strip_prefix("release="))
                .flat_map(|v| v.split(','))
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            let (tx, rx) = tokio::sync::oneshot::channel();
            if status
                .control
                .send(ReloadRequest { release, reply: tx })
                .await
                .is_err()
            {
                return reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "shutting down\n",
                );
            }
            match rx.await {
                Ok(Ok(changes)) => json(
                    StatusCode::OK,
                    &serde_json::json!({"ok": true, "changes": changes}),
                ),
                Ok(Err(errors)) => json(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &serde_json::json!({"ok": false, "errors": errors}),
                ),
                Err(_) => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "shutting down\n",
                ),
            }
        }
        (_, "/metrics" | "/healthz" | "/readyz" | "/api/status" | "/" | "/reload") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n",
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /metrics, /healthz, /readyz or /\n",
        ),
    }
}

fn uplinks_json(status: &Status) -> Vec<serde_json::Value> {
    let q = status.queue.stats();
    status
        .uplinks()
        .iter()
        .map(|u| {
            let cursor = q.cursors.iter().find(|c| c.name == u.name);
            serde_json::json!({
                "name": u.name,
                "type": u.kind,
                "target": u.target,
                "state": u.stats.state(),
                "node": u.stats.node(),
                "sent": u.stats.sent.load(Ordering::Relaxed),
                "confirmed": u.stats.confirmed.load(Ordering::Relaxed),
                "nacked": u.stats.nacked.load(Ordering::Relaxed),
                "returned": u.stats.returned.load(Ordering::Relaxed),
                "dead_lettered": u.stats.dead_lettered.load(Ordering::Relaxed),
                "reconnects": u.stats.reconnects.load(Ordering::Relaxed),
                "lag_records": cursor.map_or(0, |c| c.lag_records),
                "lag_seconds": cursor.and_then(|c| age_seconds(c.oldest_unacked_time_us)),
            })
        })
        .collect()
}

/// The downlinks and the command store (empty / null without them).
fn downlinks_json(status: &Status) -> serde_json::Value {
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let downlinks: Vec<serde_json::Value> = status
        .downlinks()
        .iter()
        .map(|d| {
            let s = &d.stats;
            let r = status
                .commands()
                .map(|c| c.router.of(&d.name))
                .unwrap_or_default();
            serde_json::json!({
                "name": d.name,
                "type": d.kind,
                "source": d.source,
                "state": s.state().as_str(),
                "node": s.node(),
                "consumed": load(&s.consumed),
                "stored": load(&s.stored),
                "acked_upstream": load(&s.acked),
                "duplicates": load(&s.duplicates),
                "dead_lettered": load(&s.dead_lettered),
                "backpressure": load(&s.backpressure),
                "routed": r.routed,
                "acked_by_devices": d.stats_acked_by_devices(&status.sessions),
                "held": r.held,
                "pending": r.pending,
                "dead_lettered_by_router": {
                    "unmatched": r.dead_unmatched,
                    "expired": r.dead_expired,
                    "too_large": r.dead_too_large,
                },
                "last_error": s.last_error(),
            })
        })
        .collect();
    let commands = status.commands().map(|c| {
        let q = c.store.stats();
        let r = &c.router;
        serde_json::json!({
            "store_records": q.records,
            "store_bytes": q.bytes,
            "store_max_bytes": q.max_bytes,
            "store_full": c.store.is_full(),
            "routed": load(&r.routed),
            "pending": load(&r.pending),
            "held": load(&r.held),
            "blocked": load(&r.blocked),
            "acked_by_devices": load(&status.sessions.stats.commands_done),
            "dead_lettered": {
                "unmatched": load(&r.dead_unmatched),
                "expired": load(&r.dead_expired),
                "too_large": load(&r.dead_too_large),
            },
        })
    });
    serde_json::json!({ "downlinks": downlinks, "commands": commands })
}

fn listeners_json(status: &Status) -> Vec<serde_json::Value> {
    status
        .listeners
        .iter()
        .map(|(a, tls)| serde_json::json!({"addr": a.to_string(), "tls": tls}))
        .collect()
}

/// Subscriber sessions, subscriptions and retained messages, for the status page.
fn sessions_json(status: &Status) -> serde_json::Value {
    let s = &status.sessions;
    let (online, offline, subscriptions, queued_bytes) = s.counts();
    let (retained, retained_bytes) = s.retained_counts();
    let d = &s.stats;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    serde_json::json!({
        "online": online,
        "offline": offline,
        "subscriptions": subscriptions,
        "queued_messages": s.queued_messages(),
        "queued_bytes": queued_bytes,
        "retained_messages": retained,
        "retained_bytes": retained_bytes,
        "delivered": load(&d.delivered),
        "dropped": load(&d.dropped_qos0) + load(&d.refused_full) + load(&d.discarded)
            + load(&d.retained_refused) + load(&d.messages_expired),
    })
}

/// The `/readyz` body.
pub fn readiness(status: &Status) -> serde_json::Value {
    let reasons = status.not_ready_reasons();
    let q = status.queue.stats();
    serde_json::json!({
        "ready": reasons.is_empty(),
        "reasons": reasons,
        "listeners": listeners_json(status),
        "queue": {
            "open": status.queue.is_writable(),
            "full": status.queue.is_full(),
            "records": q.records,
            "bytes": q.bytes,
            "max_bytes": q.max_bytes,
        },
        "uplinks": uplinks_json(status),
        "downlinks": downlinks_json(status),
    })
}

/// The `/api/status` body, for the status page.
pub fn status_json(status: &Status) -> serde_json::Value {
    let q = status.queue.stats();
    let i = &status.ingest;
    let refusals: serde_json::Map<String, serde_json::Value> = i
        .refusals()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into()))
        .collect();
    let reasons = status.not_ready_reasons();
    let history: Vec<_> = status
        .history
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .cloned()
        .collect();
    let dead_count = status.dead.queue().stats().records;
    serde_json::json!({
        "gateway_id": *status.gateway_id.read().unwrap_or_else(|e| e.into_inner()),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": status.started.elapsed().as_secs_f64(),
        "ready": reasons.is_empty(),
        "not_ready_reasons": reasons,
        "listeners": listeners_json(status),
        "devices_connected": i.connected.load(Ordering::Relaxed),
        "ingest": {
            "publishes": i.publishes.iter().map(|p| p.load(Ordering::Relaxed)).collect::<Vec<_>>(),
            "acks": i.acks.load(Ordering::Relaxed),
            "refusals": refusals,
        },
        "queue": {
            "data_dir": status.queue.data_dir().display().to_string(),
            "records": q.records,
            "bytes": q.bytes,
            "max_bytes": q.max_bytes,
            "segments": q.segments,
            "oldest_age_seconds": age_seconds(q.oldest_time_us),
            "dropped_records": q.dropped_records,
            "quarantined_records": q.quarantined_records,
            "full": status.queue.is_full(),
        },
        "uplinks": uplinks_json(status),
        "downlinks": downlinks_json(status),
        "sessions": sessions_json(status),
        "history": history,
        "dead_letters": {
            "count": dead_count,
            "recent": status.dead.recent(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::base64_decode;

    #[test]
    fn base64_decodes_basic_credentials_and_refuses_garbage() {
        assert_eq!(base64_decode(b"dTpwYXNz").as_deref(), Some(&b"u:pass"[..]));
        assert_eq!(base64_decode(b"OnRva2Vu").as_deref(), Some(&b":token"[..]));
        assert_eq!(base64_decode(b"YQ==").as_deref(), Some(&b"a"[..]));
        assert_eq!(base64_decode(b"YWI=").as_deref(), Some(&b"ab"[..]));
        assert_eq!(base64_decode(b"").as_deref(), Some(&b""[..]));
        assert_eq!(base64_decode(b"YQ="), None);
        assert_eq!(base64_decode(b"Y===").as_deref(), None);
        assert_eq!(base64_decode(b"YQ==YWJj"), None);
        assert_eq!(base64_decode(b"a!bc"), None);
    }
}
