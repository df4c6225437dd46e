//! Clients for the persistent-session crash tests (kill -9 and power cuts): publishers of
//! numbered messages that record each acknowledgement, and subscribers with persistent sessions
//! that record what they receive. Each runs until its connection ends or it is told to stop; the
//! tests start them again after each restart.
//!
//! The publishers are rumqttc clients (a new instance per connection: nothing of a publisher's
//! state has to outlive its connection, as every connection sends new numbers). The subscribers
//! are [`raw`] clients: a subscriber's QoS 2 receiver state (the packet ids it answered PUBREC for
//! and has not seen PUBREL for) must outlive its connections and the gateway's restarts, as a
//! real client's persistent session must, and rumqttc keeps it in the client instance.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gateway::certs::TlsTunnel;
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};

use crate::faults::Gateway;
use crate::raw::{self, kind, Connect, RecvError};

pub const PUBLISHER: &str = "dev-00001";
/// Subscribes at QoS 1.
pub const SUBSCRIBER: &str = "dev-00003";
/// Subscribes at QoS 2: QoS 2 publishes reach it at QoS 2, exactly once.
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

/// rumqttc options for `device` over mutual TLS to `gw`, clean session = 0: rumqttc connects
/// with plain TCP to the returned [`gateway::certs::tls_tunnel`], which must live as long as the
/// client (it outlives the gateway's restarts: each connection makes a new TLS connection).
pub async fn options(gw: &Gateway, device: &str) -> (MqttOptions, TlsTunnel) {
    let target = SocketAddr::from(([127, 0, 0, 1], gw.port));
    let tunnel = gateway::certs::tls_tunnel(target, crate::device_tls(&gw.certs, Some(device)))
        .await
        .expect("a TLS tunnel on 127.0.0.1");
    let mut o = MqttOptions::new(device, "127.0.0.1", tunnel.addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(false);
    (o, tunnel)
}

/// Even numbers at QoS 1, odd at QoS 2 (for [`publish_until_gone`]).
pub fn alternate_qos(n: u64) -> QoS {
    if n.is_multiple_of(2) {
        QoS::AtLeastOnce
    } else {
        QoS::ExactlyOnce
    }
}

/// The publisher: sends `next`, `next + 1`, ... one at a time on `devices/<its id>/telemetry`,
/// each at `qos(n)`, and records each number the gateway acknowledged (PUBACK, or PUBREC for
/// QoS 2: the gateway sends PUBREC once the record is durable, as it does PUBACK), until the
/// connection ends or `stop` is set.
pub async fn publish_until_gone(
    o: MqttOptions,
    qos: fn(u64) -> QoS,
    next: Arc<Mutex<u64>>,
    acked: Arc<Mutex<BTreeSet<u64>>>,
    stop: Arc<AtomicBool>,
) {
    let topic = format!("devices/{}/telemetry", o.client_id());
    let (client, mut ev) = AsyncClient::new(o, 8);
    let mut waiting: Option<u64> = None;
    loop {
        if waiting.is_none() {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let n = *next.lock().expect("the next number");
            if client
                .try_publish(&topic, qos(n), false, n.to_string())
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

/// One message as the subscriber's application got it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// The publishing device's number (`devices/dev-00004/telemetry`: 4).
    pub from: u32,
    /// The payload: the publisher's message number.
    pub n: u64,
    /// The QoS it came at.
    pub qos: u8,
    /// Its packet id and DUP flag, and which connection of the subscriber it came on (0: the
    /// first), for a failing run's dump.
    pub pkid: u16,
    pub dup: bool,
    pub connection: usize,
}

/// What a subscriber received, over all its connections, and the state a real client keeps with
/// its persistent session (its "storage": it outlives every connection and gateway restart).
///
/// QoS 2 receiver, delivering at PUBLISH receipt (MQTT 3.1.1 section 4.3.3, method A): a QoS 2
/// PUBLISH whose packet id is not awaiting PUBREL is delivered and its id stored, then PUBREC
/// goes; one whose id is stored (a resend, DUP set) is only answered with PUBREC again; PUBREL
/// releases the id and is answered with PUBCOMP (also for an id not stored: a PUBREL resent after
/// the PUBCOMP was lost).
#[derive(Debug, Default)]
pub struct Received {
    /// Every delivery to the application, in order.
    pub deliveries: Vec<Delivery>,
    /// CONNACK's session-present flag of each connection, in order.
    pub session_present: Vec<bool>,
    /// QoS 2 resends whose packet id was awaiting PUBREL (answered, not delivered again).
    pub qos2_resends_ignored: u64,
    /// PUBRELs for an id not awaiting PUBREL (answered with PUBCOMP).
    pub pubrels_unknown: u64,
    /// QoS 1/2 resends (DUP set) of any kind.
    pub dup_flags: u64,
    /// Protocol surprises from the gateway (a QoS 2 PUBLISH with an id awaiting PUBREL but no
    /// DUP, a packet a subscriber never gets, a refused CONNECT or SUBSCRIBE).
    pub anomalies: Vec<String>,
    /// Packet id to the (publisher, number) delivered with it.
    awaiting_rel: HashMap<u16, (u32, u64)>,
}

impl Received {
    /// Every number received, from any publisher.
    pub fn numbers(&self) -> BTreeSet<u64> {
        self.deliveries.iter().map(|d| d.n).collect()
    }

    /// The numbers received from device number `from`.
    pub fn numbers_from(&self, from: u32) -> BTreeSet<u64> {
        self.deliveries
            .iter()
            .filter(|d| d.from == from)
            .map(|d| d.n)
            .collect()
    }

    /// How often each (publisher, number) was delivered, and at which QoS levels.
    fn counts(&self) -> BTreeMap<(u32, u64), (u32, u8)> {
        let mut m: BTreeMap<(u32, u64), (u32, u8)> = BTreeMap::new();
        for d in &self.deliveries {
            let e = m.entry((d.from, d.n)).or_default();
            e.0 += 1;
            e.1 = e.1.max(d.qos);
        }
        m
    }

    /// Distinct messages delivered at `qos` (a message delivered at both counts at the higher).
    pub fn distinct_at(&self, qos: u8) -> usize {
        self.counts().values().filter(|(_, q)| *q == qos).count()
    }

    /// Repeated deliveries of messages delivered at `qos` (a QoS 1 redelivery after a reconnect
    /// is allowed; at QoS 2 any is a duplicate).
    pub fn repeats_at(&self, qos: u8) -> u64 {
        self.counts()
            .values()
            .filter(|(_, q)| *q == qos)
            .map(|(c, _)| u64::from(c - 1))
            .sum()
    }

    /// The (publisher, number) pairs delivered at QoS 2 more than once.
    pub fn qos2_duplicates(&self) -> Vec<(u32, u64)> {
        self.counts()
            .into_iter()
            .filter(|(_, (c, q))| *q == 2 && *c > 1)
            .map(|(k, _)| k)
            .collect()
    }

    /// Order per publisher: the sequence of first deliveries of each of its numbers must be
    /// strictly increasing (a repeat of a number already delivered, a QoS 1 resend, is not a
    /// first delivery and is not counted). Returns each first delivery that came after a higher
    /// number of the same publisher: (publisher, number, the highest before it).
    pub fn out_of_order(&self) -> Vec<(u32, u64, u64)> {
        let mut highest: BTreeMap<u32, u64> = BTreeMap::new();
        let mut seen: HashSet<(u32, u64)> = HashSet::new();
        let mut bad = Vec::new();
        for d in &self.deliveries {
            if !seen.insert((d.from, d.n)) {
                continue;
            }
            match highest.get(&d.from) {
                Some(&h) if d.n < h => bad.push((d.from, d.n, h)),
                _ => {
                    highest.insert(d.from, d.n);
                }
            }
        }
        bad
    }

    /// QoS 2 packet ids delivered and not yet released by PUBREL.
    pub fn awaiting_rel(&self) -> usize {
        self.awaiting_rel.len()
    }
}

/// How a subscriber's connection ends when told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leave {
    /// DISCONNECT, then close.
    Disconnect,
    /// Close the socket without a word (as a device losing its network).
    Drop,
}

/// A subscriber with a persistent session (MQTT 3.1.1, clean session = 0) over mutual TLS, on
/// the raw client. Clones share the same [`Received`] log and state.
#[derive(Clone)]
pub struct Subscriber {
    pub device: String,
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    pub log: Arc<Mutex<Received>>,
}

impl Subscriber {
    pub fn new(gw: &Gateway, device: &str) -> Subscriber {
        Subscriber {
            device: device.to_string(),
            addr: SocketAddr::from(([127, 0, 0, 1], gw.port)),
            tls: crate::device_tls(&gw.certs, Some(device)),
            log: Arc::default(),
        }
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Received> {
        self.log.lock().expect("the received log")
    }

    /// The first connection: subscribes to `filter` at `qos` and disconnects. Returns the
    /// granted QoS (0x80: refused).
    pub async fn subscribe(&self, filter: &str, qos: u8) -> u8 {
        let mut c = raw::tls_connect(self.addr, self.tls.clone())
            .await
            .expect("connect to the gateway");
        let ack = c.connect(&Connect::v4(&self.device).persistent(0)).await;
        assert_eq!(ack.connack_code(), 0, "{}: CONNECT refused", self.device);
        c.send(&raw::subscribe_with(false, 1, &[(filter, qos)]))
            .await
            .expect("send SUBSCRIBE");
        let suback = c.recv().await;
        let granted = suback.suback_codes(false);
        assert_eq!(granted.len(), 1, "{}: {suback:?}", self.device);
        let _ = c.send(&raw::DISCONNECT).await;
        granted[0]
    }

    /// One connection: connects (clean session = 0) and records every message until the gateway
    /// ends the connection or `stop` is set; then leaves as `leave` says. Returns CONNACK's
    /// session-present flag (`None`: no CONNACK, e.g. the gateway was down). Each message is
    /// recorded before it is acknowledged.
    pub async fn run(&self, stop: Arc<AtomicBool>, leave: Leave) -> Option<bool> {
        let mut c = raw::tls_connect(self.addr, self.tls.clone()).await.ok()?;
        c.send(&Connect::v4(&self.device).persistent(0).encode())
            .await
            .ok()?;
        let ack = c.recv_within(raw::WAIT).await.ok()?;
        if ack.kind != kind::CONNACK || ack.connack_code() != 0 {
            self.log()
                .anomalies
                .push(format!("{}: CONNECT answered with {ack:?}", self.device));
            return None;
        }
        let present = ack.session_present();
        self.log().session_present.push(present);
        let mut last_sent = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            let p = match c.recv_within(Duration::from_millis(100)).await {
                Ok(p) => p,
                Err(RecvError::Timeout) => {
                    // Keep-alive is 30 s: a PINGREQ when nothing went for 10 s.
                    if last_sent.elapsed() > Duration::from_secs(10) {
                        if c.send(&raw::PINGREQ).await.is_err() {
                            return Some(present);
                        }
                        last_sent = Instant::now();
                    }
                    continue;
                }
                Err(RecvError::Closed(_)) => return Some(present),
            };
            let answer = match p.kind {
                kind::PUBLISH => self.on_publish(&p),
                kind::PUBREL => {
                    let pkid = p.pkid();
                    let mut g = self.log();
                    if g.awaiting_rel.remove(&pkid).is_none() {
                        g.pubrels_unknown += 1;
                    }
                    Some(raw::pubcomp(pkid))
                }
                kind::PINGRESP => None,
                other => {
                    self.log().anomalies.push(format!(
                        "{}: unexpected packet type {other}: {p:?}",
                        self.device
                    ));
                    None
                }
            };
            if let Some(bytes) = answer {
                if c.send(&bytes).await.is_err() {
                    return Some(present);
                }
                last_sent = Instant::now();
            }
        }
        if leave == Leave::Disconnect {
            let _ = c.send(&raw::DISCONNECT).await;
        }
        Some(present)
    }

    /// Records a PUBLISH (delivering it unless it is a QoS 2 resend awaiting PUBREL) and returns
    /// the ack to send.
    fn on_publish(&self, p: &raw::Packet) -> Option<Vec<u8>> {
        let m = p.publish(false);
        let mut g = self.log();
        if m.dup {
            g.dup_flags += 1;
        }
        let parsed = (|| {
            let from = m.topic.strip_prefix("devices/dev-")?.split('/').next()?;
            let n = std::str::from_utf8(&m.payload).ok()?.parse().ok()?;
            Some((from.parse().ok()?, n))
        })();
        let Some((from, n)) = parsed else {
            g.anomalies
                .push(format!("{}: not a numbered message: {m:?}", self.device));
            return None;
        };
        let deliver = match m.qos {
            2 if g.awaiting_rel.contains_key(&m.pkid) => {
                if !m.dup {
                    let held = g.awaiting_rel.get(&m.pkid).copied();
                    let connection = g.session_present.len().saturating_sub(1);
                    g.anomalies.push(format!(
                        "{}: QoS 2 PUBLISH id {} without DUP (publisher {from}, number {n}) while \
                         that id awaits PUBREL (for publisher, number {held:?}), connection {}",
                        self.device, m.pkid, connection
                    ));
                }
                g.qos2_resends_ignored += 1;
                false
            }
            2 => {
                g.awaiting_rel.insert(m.pkid, (from, n));
                true
            }
            _ => true,
        };
        if deliver {
            let connection = g.session_present.len().saturating_sub(1);
            g.deliveries.push(Delivery {
                from,
                n,
                qos: m.qos,
                pkid: m.pkid,
                dup: m.dup,
                connection,
            });
        }
        match m.qos {
            0 => None,
            1 => Some(raw::puback(m.pkid)),
            _ => Some(raw::pubrec(m.pkid)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(ds: &[(u32, u64, u8)]) -> Received {
        Received {
            deliveries: ds
                .iter()
                .map(|&(from, n, qos)| Delivery {
                    from,
                    n,
                    qos,
                    pkid: 0,
                    dup: false,
                    connection: 0,
                })
                .collect(),
            ..Received::default()
        }
    }

    #[test]
    fn order_is_that_of_first_deliveries_per_publisher() {
        // A QoS 1 resend of 2 after 3 is not a first delivery; publishers interleave freely.
        let r = log(&[
            (1, 1, 1),
            (4, 7, 2),
            (1, 2, 1),
            (1, 3, 1),
            (1, 2, 1),
            (4, 8, 2),
        ]);
        assert!(r.out_of_order().is_empty());
        assert_eq!(r.repeats_at(1), 1);
        assert_eq!(r.distinct_at(1), 3);
        assert_eq!(r.distinct_at(2), 2);
        // 5 first delivered after 6: out of order, whatever comes later.
        let r = log(&[(1, 4, 1), (1, 6, 1), (1, 5, 1), (1, 7, 1)]);
        assert_eq!(r.out_of_order(), [(1, 5, 6)]);
    }

    #[test]
    fn a_qos2_message_delivered_twice_is_a_duplicate() {
        let r = log(&[(4, 1, 2), (4, 2, 2), (4, 2, 2), (1, 2, 1)]);
        assert_eq!(r.qos2_duplicates(), [(4, 2)]);
        assert_eq!(r.repeats_at(2), 1);
        assert_eq!(r.numbers_from(4), BTreeSet::from([1, 2]));
        assert_eq!(r.numbers(), BTreeSet::from([1, 2]));
    }
}
