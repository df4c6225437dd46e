//! `/metrics`: the gateway's counters in the Prometheus text format, encoded by
//! `prometheus-client`.
//!
//! The data path keeps plain atomics ([`crate::ingest::IngestStats`],
//! [`crate::forwarder::ForwarderStats`], the queue's counters); a [`Collector`] reads them at
//! scrape time, so nothing is registered or updated per message. Labels are bounded: `qos`,
//! `reason`, `uplink`, `state`, `result` (never a device id, client id or topic).

use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::forwarder::UplinkState;
use crate::queue::hist::Histogram;
use crate::status::{age_seconds, Status};

pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Renders every metric of `status`.
pub fn render(status: &Status) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("gateway");
    registry.register_collector(Box::new(Snapshot::take(status)));
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
    Ok(out)
}

/// A label set: bounded names and values.
type Labels = Vec<(&'static str, String)>;
/// One metric family: name, help, and a value per label set.
type Family<T> = (&'static str, &'static str, Vec<(Labels, T)>);

/// Every value read once, so one scrape is consistent with itself.
#[derive(Debug)]
struct Snapshot {
    counters: Vec<Family<u64>>,
    gauges: Vec<Family<f64>>,
    histograms: Vec<(&'static str, &'static str, f64, Histogram)>,
}

fn one<T>(v: T) -> Vec<(Labels, T)> {
    vec![(Vec::new(), v)]
}

fn per_uplink<T>(rows: impl Iterator<Item = (String, T)>) -> Vec<(Labels, T)> {
    rows.map(|(name, v)| (vec![("uplink", name)], v)).collect()
}

impl Snapshot {
    fn take(status: &Status) -> Snapshot {
        let i = &status.ingest;
        let q = status.queue.stats();
        let uplinks = status.uplinks();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let mut refusals: Vec<(Labels, u64)> = i
            .refusals()
            .into_iter()
            .map(|(r, n)| (vec![("reason", r.to_string())], n))
            .collect();
        // The usual reasons are always present (at 0), so dashboards and alerts have a series.
        for r in [
            "auth",
            "acl",
            "client_id",
            "connect_rate",
            "limit",
            "login_throttled",
            "malformed",
            "quota",
            "rate",
        ] {
            if !refusals.iter().any(|(l, _)| l[0].1 == r) {
                refusals.push((vec![("reason", r.to_string())], 0));
            }
        }
        refusals.sort();
        let cursor = |name: &str| q.cursors.iter().find(|c| c.name == name);
        let d = &status.sessions.stats;
        let (online, offline, subscriptions, queued_bytes) = status.sessions.counts();
        let queued_messages = status.sessions.queued_messages();
        let (retained, retained_bytes) = status.sessions.retained_counts();
        let by_reason = |rows: &[(&str, u64)]| -> Vec<(Labels, u64)> {
            rows.iter()
                .map(|(r, n)| (vec![("reason", r.to_string())], *n))
                .collect()
        };
        let counter_of = |f: fn(&crate::forwarder::ForwarderStats) -> u64| {
            per_uplink(uplinks.iter().map(|u| (u.name.clone(), f(&u.stats))))
        };
        let downlinks = status.downlinks();
        let commands = status.commands();
        let per_downlink = |f: fn(&crate::downlink::DownlinkStats) -> u64| -> Vec<(Labels, u64)> {
            downlinks
                .iter()
                .map(|d| (vec![("downlink", d.name.clone())], f(&d.stats)))
                .collect()
        };
        let router = |f: fn(&crate::downlink::router::RouterStats) -> u64| -> u64 {
            commands.as_ref().map_or(0, |c| f(&c.router))
        };
        // Each downlink's share of the router's counters, and of the devices' acks.
        let per: Vec<(String, crate::downlink::router::PerDownlink, u64)> = downlinks
            .iter()
            .map(|d| {
                let p = commands
                    .as_ref()
                    .map(|c| c.router.of(&d.name))
                    .unwrap_or_default();
                let acked = d.stats_acked_by_devices(&status.sessions);
                (d.name.clone(), p, acked)
            })
            .collect();
        let per_down = |f: fn(&crate::downlink::router::PerDownlink) -> u64| -> Vec<(Labels, u64)> {
            per.iter()
                .map(|(n, p, _)| (vec![("downlink", n.clone())], f(p)))
                .collect()
        };
        let mut counters = vec![
            (
                "connections",
                "Device connections accepted (TCP).",
                one(load(&i.connections_total)),
            ),
            (
                "publishes_received",
                "PUBLISH packets received from devices, by QoS.",
                (0..3)
                    .map(|qos| (vec![("qos", qos.to_string())], load(&i.publishes[qos])))
                    .collect(),
            ),
            (
                "acks_sent",
                "PUBACK/PUBREC sent to devices (each after a durable append).",
                one(load(&i.acks)),
            ),
            (
                "refusals",
                "Connections or packets refused, by reason.",
                refusals,
            ),
            (
                "session_takeovers",
                "Sessions taken over by a new connection with the same client id.",
                one(load(&i.takeovers)),
            ),
            (
                "password_checks",
                "Password logins checked (argon2), past the per-address and waiting limits.",
                one(load(&i.password_checks)),
            ),
            (
                "publishes_delayed",
                "MQTT 3.1.1 publishes held back by publish_rate / publish_bytes_rate (the socket is not read until they may pass).",
                one(load(&i.publishes_delayed)),
            ),
            (
                "session_takeovers_refused",
                "CONNECTs refused because their client id's session belongs to another identity.",
                one(load(&i.takeovers_refused)),
            ),
            (
                "connections_revoked",
                "Connections closed because a reloaded revocation list (tls.crl_file) revokes their client certificate.",
                one(load(&i.revoked_closed)),
            ),
            (
                "queue_appended_records",
                "Records appended to the queue since start.",
                one(q.appended_records),
            ),
            (
                "queue_dropped_records",
                "Records dropped by drop-oldest or max_age before every cursor had confirmed them.",
                one(q.dropped_records),
            ),
            (
                "queue_quarantined_records",
                "Records moved to quarantine by recovery since start.",
                one(q.quarantined_records),
            ),
            (
                "queue_failed_batches",
                "Group commits that failed (nothing in them was acknowledged).",
                one(q.failed_batches),
            ),
            (
                "uplink_records_sent",
                "Records sent to the uplink (re-sends included).",
                counter_of(|s| s.sent.load(Ordering::Relaxed)),
            ),
            (
                "uplink_records_confirmed",
                "Records the upstream confirmed.",
                counter_of(|s| s.confirmed.load(Ordering::Relaxed)),
            ),
            (
                "uplink_records_nacked",
                "Negative acknowledgements from the upstream.",
                counter_of(|s| s.nacked.load(Ordering::Relaxed)),
            ),
            (
                "uplink_records_returned",
                "Records the broker returned as unroutable.",
                counter_of(|s| s.returned.load(Ordering::Relaxed)),
            ),
            (
                "uplink_records_dead_lettered",
                "Records of this uplink moved to the dead letters.",
                counter_of(|s| s.dead_lettered.load(Ordering::Relaxed)),
            ),
            (
                "uplink_reconnects",
                "Reconnections after a lost or stalled connection.",
                counter_of(|s| s.reconnects.load(Ordering::Relaxed)),
            ),
            (
                "dead_letters_stored",
                "Records moved to the dead-letter store since start.",
                one(status.dead.count()),
            ),
            (
                "session_messages_routed",
                "Messages matching a subscriber session (one per session; the dropped ones included).",
                one(load(&d.matched)),
            ),
            (
                "session_messages_delivered",
                "PUBLISH packets sent to subscribers from their sessions (retained ones included; not the resends after a reconnect).",
                one(load(&d.delivered)),
            ),
            (
                "session_messages_resent",
                "PUBLISH (DUP) and PUBREL packets sent again to resumed sessions.",
                one(load(&d.resent)),
            ),
            (
                "session_messages_dropped",
                "Messages for subscribers not kept, by reason.",
                by_reason(&[
                    ("qos0_full_or_offline", load(&d.dropped_qos0)),
                    ("refused_full", load(&d.refused_full)),
                    ("discarded_session_end", load(&d.discarded)),
                    ("retained_refused", load(&d.retained_refused)),
                    ("expired", load(&d.messages_expired)),
                ]),
            ),
            (
                "session_router_records_skipped",
                "Queue records the local router could not read and skipped (at most this many: sequence numbers may have gaps); their messages reached no subscriber.",
                one(load(&d.router_skipped)),
            ),
            (
                "sessions_ended",
                "Sessions ended by their expiry, or early by the max_sessions bound.",
                by_reason(&[("expired", load(&d.expired)), ("evicted", load(&d.evicted))]),
            ),
            (
                "config_reloads",
                "Config reloads, by result.",
                vec![
                    (vec![("result", "ok".to_string())], load(&status.reloads_ok)),
                    (
                        vec![("result", "rejected".to_string())],
                        load(&status.reloads_failed),
                    ),
                ],
            ),
        ];
        counters.extend([
            (
                "downlink_consumed",
                "Messages received from the downlink's upstream.",
                per_downlink(|s| s.consumed.load(Ordering::Relaxed)),
            ),
            (
                "downlink_stored",
                "Commands stored durably (then acked upstream).",
                per_downlink(|s| s.stored.load(Ordering::Relaxed)),
            ),
            (
                "downlink_acked",
                "Messages acked upstream (stored, dead-lettered or duplicate).",
                per_downlink(|s| s.acked.load(Ordering::Relaxed)),
            ),
            (
                "downlink_duplicates",
                "Redeliveries of a message id already stored (acked, not stored again).",
                per_downlink(|s| s.duplicates.load(Ordering::Relaxed)),
            ),
            (
                "downlink_dead_lettered",
                "Upstream messages that could not be commands (bad topic, size, header): dead letters.",
                per_downlink(|s| s.dead_lettered.load(Ordering::Relaxed)),
            ),
            (
                "downlink_backpressure",
                "Times the downlink stopped consuming because the command store was full.",
                per_downlink(|s| s.backpressure.load(Ordering::Relaxed)),
            ),
            (
                "downlink_connects",
                "Connections the downlink made.",
                per_downlink(|s| s.connects.load(Ordering::Relaxed)),
            ),
            (
                "commands_routed",
                "Commands put into their subscribed sessions (all downlinks).",
                one(router(|r| r.routed.load(Ordering::Relaxed))),
            ),
            (
                "downlink_commands_routed",
                "The downlink's commands put into their subscribed sessions.",
                per_down(|p| p.routed),
            ),
            (
                "downlink_commands_acked_by_devices",
                "The downlink's commands their devices acknowledged (PUBACK or PUBCOMP).",
                per.iter()
                    .map(|(n, _, a)| (vec![("downlink", n.clone())], *a))
                    .collect(),
            ),
            (
                "downlink_commands_dead_lettered",
                "The downlink's commands the router moved to the dead letters, by reason.",
                per.iter()
                    .flat_map(|(n, p, _)| {
                        [
                            ("unmatched", p.dead_unmatched),
                            ("expired", p.dead_expired),
                            ("too_large", p.dead_too_large),
                        ]
                        .map(|(r, v)| {
                            (
                                vec![("downlink", n.clone()), ("reason", r.to_string())],
                                v,
                            )
                        })
                    })
                    .collect(),
            ),
            (
                "commands_delivered_acked",
                "Commands their devices acknowledged (PUBACK or PUBCOMP).",
                one(d.commands_done.load(Ordering::Relaxed)),
            ),
            (
                "commands_blocked",
                "Times command routing waited for a full session (backpressure).",
                one(router(|r| r.blocked.load(Ordering::Relaxed))),
            ),
            (
                "commands_dead_lettered",
                "Commands moved to the dead letters by the router, by reason.",
                by_reason(&[
                    ("unmatched", router(|r| r.dead_unmatched.load(Ordering::Relaxed))),
                    ("expired", router(|r| r.dead_expired.load(Ordering::Relaxed))),
                    ("too_large", router(|r| r.dead_too_large.load(Ordering::Relaxed))),
                ]),
            ),
        ]);
        let states = [
            UplinkState::Connecting,
            UplinkState::Connected,
            UplinkState::BackingOff,
            UplinkState::Stalled,
        ];
        let mut state_rows = Vec::new();
        for u in &uplinks {
            let now = u.stats.state();
            for s in states {
                let label = match s {
                    UplinkState::Connecting => "connecting",
                    UplinkState::Connected => "connected",
                    UplinkState::BackingOff => "backing-off",
                    UplinkState::Stalled => "stalled",
                };
                state_rows.push((
                    vec![("uplink", u.name.clone()), ("state", label.to_string())],
                    if s == now { 1.0 } else { 0.0 },
                ));
            }
        }
        let mut downlink_states = Vec::new();
        for d in &downlinks {
            let now = d.stats.state();
            for s in [
                crate::downlink::DownlinkState::Connecting,
                crate::downlink::DownlinkState::Consuming,
                crate::downlink::DownlinkState::Paused,
                crate::downlink::DownlinkState::Down,
            ] {
                downlink_states.push((
                    vec![
                        ("downlink", d.name.clone()),
                        ("state", s.as_str().to_string()),
                    ],
                    if s == now { 1.0 } else { 0.0 },
                ));
            }
        }
        let mut gauges = vec![
            (
                "devices_connected",
                "Devices connected now.",
                one(load(&i.connected) as f64),
            ),
            (
                "ready",
                "1 when /readyz says ready.",
                one(if status.not_ready_reasons().is_empty() {
                    1.0
                } else {
                    0.0
                }),
            ),
            (
                "queue_bytes",
                "Bytes the queue holds on disk.",
                one(q.bytes as f64),
            ),
            (
                "queue_max_bytes",
                "The queue's byte limit (max_bytes).",
                one(q.max_bytes as f64),
            ),
            (
                "queue_records",
                "Records in the queue.",
                one(q.records as f64),
            ),
            (
                "queue_segments",
                "Segment files in the queue.",
                one(q.segments as f64),
            ),
            (
                "queue_oldest_record_age_seconds",
                "Age of the oldest record in the queue (0 when empty).",
                one(age_seconds(q.oldest_time_us).unwrap_or(0.0)),
            ),
            (
                "queue_waiting_appenders",
                "Appends waiting for space (backpressure).",
                one(q.waiting_appenders as f64),
            ),
            (
                "queue_writable",
                "1 while the queue takes appends.",
                one(if status.queue.is_writable() { 1.0 } else { 0.0 }),
            ),
            (
                "uplink_state",
                "1 for the uplink's current state (connecting, connected, backing-off, stalled).",
                state_rows,
            ),
            (
                "uplink_node",
                "1 for the node the uplink is connected to or trying (of a cluster's urls; no password).",
                uplinks
                    .iter()
                    .map(|u| {
                        (
                            vec![("uplink", u.name.clone()), ("node", u.stats.node())],
                            1.0,
                        )
                    })
                    .collect(),
            ),
            (
                "uplink_lag_records",
                "Records behind the uplink's cursor.",
                per_uplink(uplinks.iter().map(|u| {
                    (
                        u.name.clone(),
                        cursor(&u.name).map_or(0.0, |c| c.lag_records as f64),
                    )
                })),
            ),
            (
                "uplink_lag_seconds",
                "Age of the oldest record the uplink has not confirmed (0 when none).",
                per_uplink(uplinks.iter().map(|u| {
                    (
                        u.name.clone(),
                        cursor(&u.name)
                            .and_then(|c| age_seconds(c.oldest_unacked_time_us))
                            .unwrap_or(0.0),
                    )
                })),
            ),
            (
                "sessions",
                "Subscriber sessions now, by state (offline: kept for a returning client).",
                vec![
                    (vec![("state", "online".to_string())], online as f64),
                    (vec![("state", "offline".to_string())], offline as f64),
                ],
            ),
            (
                "subscriptions",
                "Subscriptions of every session.",
                one(subscriptions as f64),
            ),
            (
                "session_queued_messages",
                "Messages waiting or in flight in every session.",
                one(queued_messages as f64),
            ),
            (
                "session_queued_bytes",
                "Bytes of the messages queued in every session (topic + payload + 32 each).",
                one(queued_bytes as f64),
            ),
            (
                "retained_messages",
                "Retained messages kept.",
                one(retained as f64),
            ),
            (
                "retained_bytes",
                "Bytes of the retained messages kept (topic + payload + 32 each).",
                one(retained_bytes as f64),
            ),
            (
                "dead_letters",
                "Records in the dead-letter store.",
                one(status.dead.queue().stats().records as f64),
            ),
            (
                "uptime_seconds",
                "Seconds since the gateway started.",
                one(status.started.elapsed().as_secs_f64()),
            ),
        ];
        gauges.extend([
            (
                "downlink_state",
                "1 for the downlink's current state (connecting, consuming, paused, down).",
                downlink_states,
            ),
            (
                "commands_pending",
                "Commands in the command store not yet in their sessions (held ones included).",
                one(router(|r| r.pending.load(Ordering::Relaxed)) as f64),
            ),
            (
                "downlink_commands_pending",
                "The downlink's commands not yet in their sessions, held ones included (taken once a second).",
                per.iter()
                    .map(|(n, p, _)| (vec![("downlink", n.clone())], p.pending as f64))
                    .collect(),
            ),
            (
                "downlink_commands_held",
                "The downlink's commands waiting for a device to subscribe (taken once a second).",
                per.iter()
                    .map(|(n, p, _)| (vec![("downlink", n.clone())], p.held as f64))
                    .collect(),
            ),
            (
                "commands_held",
                "Commands waiting for a device to subscribe (dead-lettered after the downlink's hold).",
                one(router(|r| r.held.load(Ordering::Relaxed)) as f64),
            ),
            (
                "command_store_bytes",
                "Bytes in the command store (bounded by [downlink] max_bytes).",
                one(commands.as_ref().map_or(0, |c| c.store.stats().bytes) as f64),
            ),
        ]);
        let histograms = vec![
            (
                "queue_fsync_seconds",
                "fdatasync latency of the queue's writer.",
                1e-6,
                q.fsync_hist,
            ),
            (
                "queue_append_batch_records",
                "Records per group commit (one write + fdatasync).",
                1.0,
                q.batch_hist,
            ),
        ];
        Snapshot {
            counters,
            gauges,
            histograms,
        }
    }
}

/// A histogram already counted elsewhere, scaled (µs to seconds) on the way out.
#[derive(Debug)]
struct ConstHistogram<'a> {
    h: &'a Histogram,
    scale: f64,
}

impl EncodeMetric for ConstHistogram<'_> {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = self
            .h
            .cumulative()
            .into_iter()
            .map(|(b, c)| (b as f64 * self.scale, c))
            .chain(std::iter::once((f64::MAX, self.h.count())))
            .collect();
        encoder.encode_histogram::<NoLabelSet>(
            self.h.sum as f64 * self.scale,
            self.h.count(),
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, rows) in &self.counters {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (labels, v) in rows {
                ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
            }
        }
        for (name, help, rows) in &self.gauges {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (labels, v) in rows {
                ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
            }
        }
        for (name, help, scale, h) in &self.histograms {
            let m = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            ConstHistogram { h, scale: *scale }.encode(m)?;
        }
        Ok(())
    }
}
