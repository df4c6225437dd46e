//! The `[sessions]` section: bounds of subscriber sessions and how long they are kept.

use std::time::Duration;

use serde::Deserialize;

use super::{de, duration_value, size_value, Problem};

/// `[sessions]`. Defaults are sized for an edge box: 64 MiB for every session's queued messages
/// together, 1,000 messages or 1 MiB per session.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionsConfig {
    /// The bound on the bytes queued for all sessions together; past it, new messages for a
    /// session are refused (QoS 0 dropped first) and counted.
    #[serde(deserialize_with = "de::byte_size")]
    pub max_bytes: u64,
    /// Messages waiting or in flight for one session.
    pub max_queued_messages: usize,
    /// Bytes (topic + payload + 32) waiting or in flight for one session.
    #[serde(deserialize_with = "de::byte_size")]
    pub max_queued_bytes: u64,
    /// QoS 1/2 publishes unacknowledged at a subscriber (its MQTT 5 receive maximum, if lower).
    pub max_inflight: u16,
    /// Sessions kept at once, connected or not; past it the session offline longest ends early
    /// (counted).
    pub max_sessions: usize,
    /// Retained messages kept (topics); a retained publish to a new topic past it is not kept
    /// (counted; it still goes to the uplinks and live subscribers).
    pub max_retained_messages: usize,
    /// Bytes (topic + payload + 32) of all retained messages.
    #[serde(deserialize_with = "de::byte_size")]
    pub max_retained_bytes: u64,
    /// How long an MQTT 3.1.1 session with clean session = 0 outlives its connection.
    #[serde(deserialize_with = "de::duration")]
    pub expiry: Duration,
    /// The longest session expiry an MQTT 5 client is granted (CONNACK says when it asked more).
    #[serde(deserialize_with = "de::duration")]
    pub max_expiry: Duration,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig {
            max_bytes: 64 << 20,
            max_queued_messages: 1000,
            max_queued_bytes: 1 << 20,
            max_inflight: 32,
            max_sessions: 100_000,
            max_retained_messages: 10_000,
            max_retained_bytes: 16 << 20,
            expiry: Duration::from_secs(7 * 86_400),
            max_expiry: Duration::from_secs(30 * 86_400),
        }
    }
}

impl SessionsConfig {
    pub(super) fn check(&self, problems: &mut Vec<Problem>) {
        let mut p = |key: &str, value: String, reason: &str| {
            problems.push(Problem {
                key: format!("sessions.{key}"),
                value,
                reason: reason.into(),
            })
        };
        if self.max_queued_messages == 0 {
            p(
                "max_queued_messages",
                "0".into(),
                "no message could wait for a subscriber; set at least 1",
            );
        }
        if self.max_inflight == 0 {
            p(
                "max_inflight",
                "0".into(),
                "no QoS 1/2 message could be sent; set at least 1",
            );
        }
        if self.max_sessions == 0 {
            p(
                "max_sessions",
                "0".into(),
                "no client could subscribe; set at least 1",
            );
        }
        if self.max_queued_messages > 60_000 {
            p(
                "max_queued_messages",
                self.max_queued_messages.to_string(),
                "more than 60000: each queued QoS 1/2 message holds one of MQTT's 65535 packet ids; lower it",
            );
        }
        if self.max_queued_bytes < 1024 {
            p(
                "max_queued_bytes",
                size_value(self.max_queued_bytes),
                "smaller than 1 KiB: hardly one message fits; raise it",
            );
        }
        if self.max_queued_bytes > self.max_bytes {
            p(
                "max_queued_bytes",
                size_value(self.max_queued_bytes),
                "larger than sessions.max_bytes, which bounds all sessions together; lower it or raise max_bytes",
            );
        }
        for (key, d) in [("expiry", self.expiry), ("max_expiry", self.max_expiry)] {
            if d.as_secs() > u64::from(u32::MAX) {
                p(
                    key,
                    duration_value(d),
                    "longer than MQTT's largest session expiry (about 136 years)",
                );
            }
        }
    }
}
