//! Memory stays bounded with 10,000 offline persistent sessions: what is published for them
//! piles up only to `[sessions] max_bytes` (all sessions) and `max_queued_messages` (each), and
//! every message past a bound is counted as refused, none lost uncounted. The session registry
//! itself, without connections (the gateway-level figures, RSS included, come from
//! `ingest-bench --offline-sessions 10000`).

#![allow(clippy::unwrap_used)]

use std::sync::atomic::Ordering;

use gateway::queue::Record;
use gateway::sessions::{SessionBounds, Sessions, SubOptions};

const SESSIONS: u64 = 10_000;

fn record(seq: u64, payload: usize) -> Record {
    Record {
        seq,
        received_at_us: gateway::queue::micros_since_epoch(std::time::SystemTime::now()),
        device_id: "dev-1".into(),
        username: None,
        topic: "devices/dev-1/telemetry".into(),
        qos: 1,
        retain: false,
        user_properties: Vec::new(),
        content_type: None,
        payload_format: None,
        message_expiry: None,
        response_topic: None,
        correlation_data: None,
        payload: vec![0x5a; payload],
    }
}

/// 10,000 sessions subscribed at QoS 1, all offline.
fn offline_sessions(bounds: SessionBounds) -> Sessions {
    let s = Sessions::new(bounds);
    for i in 0..SESSIONS {
        let owner = i + 1;
        let (slot, present) = s.attach(&format!("client-{i:05}"), owner, false, 3600, None);
        assert!(!present);
        let options = SubOptions {
            qos: 1,
            no_local: false,
            retain_as_published: false,
            id: None,
        };
        s.subscribe(&slot, "devices/+/telemetry", options);
        s.detach(&slot, owner);
    }
    let (online, offline, subscriptions, bytes) = s.counts();
    assert_eq!((online, offline), (0, SESSIONS as usize));
    assert_eq!(subscriptions, SESSIONS as usize);
    assert_eq!(bytes, 0);
    s
}

#[test]
fn ten_thousand_offline_sessions_hold_no_more_than_the_all_sessions_byte_bound() {
    // The default bounds: 64 MiB for all sessions, 1,000 messages / 1 MiB each.
    let bounds = SessionBounds::default();
    let max_bytes = bounds.max_bytes;
    let s = offline_sessions(bounds);
    // 40 messages of 1 KiB for each session: 10,000 x 40 x ~1 KiB = ~420 MB if nothing held
    // them back, far past 64 MiB.
    let per_record = 1024;
    let mut seq = 0;
    for _ in 0..40 {
        let batch: Vec<Record> = (0..1)
            .map(|_| {
                seq += 1;
                record(seq, per_record)
            })
            .collect();
        let _ = s.route(batch);
    }
    let (_, offline, _, bytes) = s.counts();
    assert_eq!(offline, SESSIONS as usize);
    assert!(
        bytes <= max_bytes,
        "{bytes} bytes queued, bound {max_bytes}"
    );
    // Close to the bound: the bound, not something else, is what stopped them.
    let cost = "devices/dev-1/telemetry".len() + per_record + 32;
    assert!(
        bytes + cost > max_bytes,
        "{bytes} bytes queued, bound {max_bytes}"
    );
    let matched = s.stats.matched.load(Ordering::Relaxed);
    let refused = s.stats.refused_full.load(Ordering::Relaxed);
    assert_eq!(matched, SESSIONS * 40);
    assert_eq!(
        s.queued_messages() as u64 + refused,
        matched,
        "every message routed is queued or counted as refused"
    );
    assert_eq!(s.queued_messages() * cost, bytes);
}

#[test]
fn each_offline_session_holds_no_more_than_its_own_message_bound() {
    // A large all-sessions bound, so the per-session one (10 messages here) is what binds.
    let bounds = SessionBounds {
        max_queued_messages: 10,
        max_bytes: 1 << 30,
        ..SessionBounds::default()
    };
    let s = offline_sessions(bounds);
    for seq in 1..=25 {
        let _ = s.route(vec![record(seq, 16)]);
    }
    assert_eq!(s.queued_messages(), SESSIONS as usize * 10);
    assert_eq!(s.stats.refused_full.load(Ordering::Relaxed), SESSIONS * 15);
}
