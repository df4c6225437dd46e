//! Clients for the persistent-session crash tests (kill -9 and power cuts): a publisher of
//! numbered messages (even numbers at QoS 1, odd at QoS 2) that records each acknowledgement, and
//! subscribers with persistent sessions that record what they receive. Each runs until its
//! connection ends or it is told to stop; the tests start them again after each restart.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, Incoming, MqttOptions, QoS, TlsConfiguration,
};

use crate::faults::Gateway;

pub const PUBLISHER: &str = "dev-00001";
/// Subscribes at QoS 1.
pub const SUBSCRIBER: &str = "dev-00003";
/// Subscribes at QoS 2: the odd numbers reach it at QoS 2, exactly once.
pub const SUBSCRIBER_QOS2: &str = "dev-00002";
pub const FILTER: &str = "devices/+/telemetry";

/// `[[acl]]` sections: every device publishes under its own tree, the subscribers may subscribe
/// to [`FILTER`].
pub fn acl() -> String {
    format!(
        "[[acl]]\nidentity = \"*\"\npublish = [\"devices/%c/#\"]\n\n\
         [[acl]]\nidentity = \"{SUBSCRIBER}\"\nsubscribe = [\"{FILTER}\"]\n\n\
         [[acl]]\nidentity = \"{SUBSCRIBER_QOS2}\"\nsubscribe = [\"{FILTER}\"]\n"
    )
}

/// rumqttc options for `device` over mutual TLS to `gw`, clean session = 0.
pub fn options(gw: &Gateway, device: &str) -> MqttOptions {
    let mut o = MqttOptions::new(device, "127.0.0.1", gw.port);
    o.set_transport(rumqttc::Transport::tls_with_config(
        TlsConfiguration::Rustls(crate::device_tls(&gw.certs, Some(device))),
    ));
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(false);
    o
}

/// What a subscriber received, over all its connections.
#[derive(Debug, Default)]
pub struct Received {
    /// Numbers in the order of their first delivery.
    pub first: Vec<u64>,
    /// Deliveries of each number (more than one: a QoS 1 redelivery, or a QoS 2 duplicate).
    pub count: BTreeMap<u64, u32>,
    /// QoS 2 numbers delivered twice to the application: a PUBLISH with a new packet id, or
    /// one that came again after the client had completed it (the client keeps the packet ids it
    /// sent PUBREC for until PUBREL, as MQTT's receiver does, across its connections).
    pub qos2_duplicates: Vec<u64>,
    awaiting_rel: HashSet<u16>,
}

impl Received {
    pub fn numbers(&self) -> BTreeSet<u64> {
        self.count.keys().copied().collect()
    }

    /// First deliveries that came after a higher number (per-publisher order broken).
    pub fn out_of_order(&self) -> usize {
        self.first.windows(2).filter(|w| w[1] < w[0]).count()
    }
}

/// A subscriber: connects with clean session = 0 and records every message until the connection
/// ends or `stop` is set. Returns CONNACK's session-present flag. Messages are acknowledged only
/// after they were recorded (manual acks): rumqttc would otherwise ack messages still waiting in
/// its event queue when the subscriber leaves, and the gateway rightly forgets them.
pub async fn subscribe_until_gone(
    mut o: MqttOptions,
    got: Arc<Mutex<Received>>,
    stop: Arc<AtomicBool>,
) -> Option<bool> {
    o.set_manual_acks(true);
    let (client, mut ev) = AsyncClient::new(o, 64);
    let mut present = None;
    while !stop.load(Ordering::SeqCst) {
        match tokio::time::timeout(Duration::from_millis(200), ev.poll()).await {
            Err(_) => continue,
            Ok(Ok(Event::Incoming(Incoming::ConnAck(c)))) => {
                assert_eq!(c.code, ConnectReturnCode::Success);
                present = Some(c.session_present);
            }
            Ok(Ok(Event::Incoming(Incoming::Publish(p)))) => {
                let n: u64 = std::str::from_utf8(&p.payload)
                    .expect("a numbered payload")
                    .parse()
                    .expect("a numbered payload");
                let mut g = got.lock().expect("the received log");
                let repeat = p.qos == QoS::ExactlyOnce && !g.awaiting_rel.insert(p.pkid);
                if !repeat {
                    let c = g.count.entry(n).or_insert(0);
                    *c += 1;
                    if *c == 1 {
                        g.first.push(n);
                    } else if p.qos == QoS::ExactlyOnce {
                        g.qos2_duplicates.push(n);
                    }
                }
                drop(g);
                if client.try_ack(&p).is_err() {
                    break;
                }
            }
            Ok(Ok(Event::Incoming(Incoming::PubRel(r)))) => {
                got.lock()
                    .expect("the received log")
                    .awaiting_rel
                    .remove(&r.pkid);
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) => break,
        }
    }
    // Not `disconnect().await`: with the event loop no longer polled, a request channel full of
    // acks would wait for ever.
    let _ = client.try_disconnect();
    present
}

/// The publisher: sends `next`, `next + 1`, ... one at a time (even numbers at QoS 1, odd at
/// QoS 2) and records each number the gateway acknowledged (PUBACK, or PUBREC for QoS 2: the
/// record is stored), until the connection ends or `stop` is set.
pub async fn publish_until_gone(
    o: MqttOptions,
    next: Arc<Mutex<u64>>,
    acked: Arc<Mutex<BTreeSet<u64>>>,
    stop: Arc<AtomicBool>,
) {
    let (client, mut ev) = AsyncClient::new(o, 8);
    let mut waiting: Option<u64> = None;
    loop {
        if waiting.is_none() {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let n = *next.lock().expect("the next number");
            let qos = if n.is_multiple_of(2) {
                QoS::AtLeastOnce
            } else {
                QoS::ExactlyOnce
            };
            let topic = format!("devices/{PUBLISHER}/telemetry");
            if client
                .try_publish(topic, qos, false, n.to_string())
                .is_err()
            {
                break;
            }
            waiting = Some(n);
        }
        match tokio::time::timeout(Duration::from_secs(2), ev.poll()).await {
            Ok(Ok(Event::Incoming(Incoming::PubAck(_) | Incoming::PubRec(_)))) => {
                if let Some(n) = waiting.take() {
                    acked.lock().expect("the acked set").insert(n);
                    *next.lock().expect("the next number") = n + 1;
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    // Not acknowledged: it may or may not be stored; the next connection sends a new number.
    if waiting.is_some() {
        *next.lock().expect("the next number") += 1;
    }
}
