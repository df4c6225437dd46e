//! The fuzz target shared by the libFuzzer harness (`fuzz/`) and the randomized test: arbitrary
//! device bytes through the codec and the session state machine, as the connection loop feeds
//! them. It must never panic, and the invariants checked below must hold for any input.
//!
//! Subscriptions are driven too: each granted filter puts a message into a
//! [`sessions::outbox::Outbox`](crate::sessions::outbox::Outbox) at the granted QoS (as the router
//! would), its publishes are encoded as the connection would send them, and the acks the device
//! sends (PUBACK, PUBREC, PUBCOMP) go into the outbox, whose bounds must hold throughout.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::codec::{self, Inbound, Outbound, Version};
use super::session::{Action, Identity, PublishAcl, Session, SessionLimits, SubscriberAck};
use crate::sessions::outbox::{Message, Outbox, Send};

/// The outbox's bounds here: small, so that inputs reach them.
const RECEIVE_MAXIMUM: u16 = 3;
const MAX_MESSAGES: usize = 8;
const MAX_BYTES: usize = 1024;

struct AllowMost;

impl PublishAcl for AllowMost {
    fn may_publish(&self, _: &Identity, _: &str, topic: &str) -> bool {
        !topic.starts_with("deny")
    }

    fn may_subscribe(&self, _: &Identity, _: &str, filter: &str) -> bool {
        !filter.starts_with("deny")
    }
}

/// A valid CONNECT (3.1.1 or 5) for client id "fuzz", to get past the first packet.
fn connect_bytes(v5: bool) -> Vec<u8> {
    let mut body = vec![
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        if v5 { 5 } else { 4 },
        0x02,
        0,
        30,
    ];
    if v5 {
        body.push(0); // no properties
    }
    body.extend_from_slice(&[0, 4, b'f', b'u', b'z', b'z']);
    let mut p = vec![0x10, body.len() as u8];
    p.extend_from_slice(&body);
    p
}

/// What one input reached (to check that inputs get past the codec into subscriptions).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reached {
    /// Filters granted.
    pub subscribed: usize,
    /// Filters in UNSUBSCRIBEs.
    pub unsubscribed: usize,
    /// PUBLISHes the outbox sent (QoS 1/2 and 0, resends included).
    pub published: usize,
    /// PUBACKs that matched a message in flight.
    pub acked: usize,
    /// PUBRECs that matched (a PUBREL went out).
    pub released: usize,
    /// PUBCOMPs that matched.
    pub completed: usize,
}

/// Runs one input. The first byte picks a prefix (none / a 3.1.1 CONNECT / a 5 CONNECT) and how
/// the rest is split into reads; the remaining bytes are what the device sends.
pub fn run(data: &[u8]) {
    run_counted(data);
}

/// [`run`], saying what the input reached.
pub fn run_counted(data: &[u8]) -> Reached {
    let mut reached = Reached::default();
    let Some((&mode, rest)) = data.split_first() else {
        return reached;
    };
    let mut input = Vec::with_capacity(rest.len() + 16);
    match mode % 3 {
        1 => input.extend_from_slice(&connect_bytes(false)),
        2 => input.extend_from_slice(&connect_bytes(true)),
        _ => {}
    }
    input.extend_from_slice(rest);
    let chunk = usize::from(mode / 3).max(1);
    let limits = SessionLimits {
        max_packet_size: 4096,
        ..SessionLimits::default()
    };
    let max_packet = limits.max_packet_size as usize;
    let mut session = Session::new(limits);
    let mut outbox = Outbox::new(RECEIVE_MAXIMUM, MAX_MESSAGES, MAX_BYTES);
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            let actions = match codec::decode(&mut buf, session.version(), max_packet) {
                Ok(Some(p)) => {
                    // Invariant: a decoded packet consumed bytes.
                    assert!(
                        buf.len() < before,
                        "decode returned a packet without consuming"
                    );
                    session.on_packet(p, &AllowMost)
                }
                Ok(None) => break,
                Err(e) => session.on_decode_error(matches!(e, codec::DecodeError::TooLarge { .. })),
            };
            if !perform(&mut session, &mut outbox, actions, &mut out, &mut reached) {
                return reached;
            }
        }
    }
    reached
}

/// Encodes what the outbox lets go now, as the connection's writer would, and checks its bounds.
fn drain(outbox: &mut Outbox, v: Version, out: &mut BytesMut, reached: &mut Reached) {
    while let Some(send) = outbox.next_publish() {
        reached.published += 1;
        encode_send(send, v, out);
    }
    assert!(
        outbox.in_flight() <= usize::from(RECEIVE_MAXIMUM),
        "in flight past the bound"
    );
    assert!(outbox.len() <= MAX_MESSAGES, "more messages than the bound");
    assert!(outbox.bytes() <= MAX_BYTES, "more bytes than the bound");
}

fn encode_send(send: Send, v: Version, out: &mut BytesMut) {
    if let Send::Publish { qos, pkid, .. } = &send {
        assert!(
            (*qos == 0) == (*pkid == 0),
            "a packet id exactly for QoS 1/2"
        );
    }
    super::connection::encode_delivery(send, v, std::time::SystemTime::now(), out);
}

/// A message for a granted filter (its text as the topic, wildcards replaced).
fn message_for(filter: &str) -> Arc<Message> {
    Arc::new(Message {
        topic: filter.replace(['+', '#'], "x").into(),
        payload: Bytes::from_static(b"fuzz"),
        retain: filter.len().is_multiple_of(2),
        user_properties: vec![("k".into(), "v".into())],
        content_type: None,
        payload_format: None,
        response_topic: None,
        correlation_data: None,
        subscription_ids: Vec::new(),
        expires_at: None,
        command: None,
    })
}

/// Performs actions without I/O: encodes what would be sent. `false` once the session closed.
fn perform(
    session: &mut Session,
    outbox: &mut Outbox,
    actions: Vec<Action>,
    out: &mut BytesMut,
    reached: &mut Reached,
) -> bool {
    let mut queue: std::collections::VecDeque<Action> = actions.into();
    while let Some(a) = queue.pop_front() {
        match a {
            Action::Send(p) => {
                // Invariant: no acknowledgement of a publish outside an Append.
                if let Outbound::PubAck { reason: 0, .. } | Outbound::PubRec { reason: 0, .. } = p {
                    // A PUBREC for a QoS 2 resend is allowed: the record was stored before.
                    assert!(
                        matches!(p, Outbound::PubRec { .. }),
                        "PUBACK success without an append"
                    );
                }
                codec::encode(&p, session.version().unwrap_or(Version::V311), out);
            }
            Action::Authenticate(c) => {
                let r = if c.client_id.starts_with('x') {
                    Err(codec::reason::NOT_AUTHORIZED)
                } else {
                    let id = if c.client_id.is_empty() {
                        "gw-assigned"
                    } else {
                        &c.client_id
                    };
                    Ok(Identity::anonymous(id))
                };
                let more = session.authenticated(r, &AllowMost);
                for m in more.into_iter().rev() {
                    queue.push_front(m);
                }
            }
            Action::Append { message, ack } => {
                assert!(!message.topic.is_empty() && !message.topic.contains(['+', '#']));
                if let Some(a) = ack {
                    codec::encode(&a, session.version().unwrap_or(Version::V311), out);
                }
            }
            Action::Refused(_) => {}
            Action::StartSession { clean_start, .. } => {
                if !clean_start {
                    // As a resumed session: what was in flight goes again first.
                    outbox.on_disconnect();
                    let v = session.version().unwrap_or(Version::V311);
                    for send in outbox.resume() {
                        if matches!(send, Send::Publish { .. }) {
                            reached.published += 1;
                        }
                        encode_send(send, v, out);
                    }
                }
            }
            Action::Subscribe(subs) => {
                let v = session.version().unwrap_or(Version::V311);
                for s in subs {
                    assert!(crate::topic::check_filter(&s.filter).is_ok() && s.qos <= 2);
                    // A granted subscription's identifier is within 1..=268,435,455.
                    assert!(s
                        .subscription_id
                        .is_none_or(|id| (1..=268_435_455).contains(&id)));
                    // As the router would: a message for the new subscription, carrying its
                    // identifier (a full outbox refuses it, which is fine).
                    let mut m = message_for(&s.filter);
                    if let Some(id) = s.subscription_id {
                        Arc::make_mut(&mut m).subscription_ids.push(id);
                    }
                    let _ = outbox.push(m, s.qos);
                    reached.subscribed += 1;
                }
                drain(outbox, v, out, reached);
            }
            Action::Delivered(ack) => {
                let v = session.version().unwrap_or(Version::V311);
                // An unknown packet id is the subscriber's mistake; the outbox is unchanged.
                match ack {
                    SubscriberAck::PubAck(pkid) => {
                        reached.acked += usize::from(outbox.on_puback(pkid).is_ok());
                    }
                    SubscriberAck::PubRec(pkid) => {
                        if let Ok(send) = outbox.on_pubrec(pkid) {
                            assert_eq!(send, Send::PubRel { pkid });
                            reached.released += 1;
                            encode_send(send, v, out);
                        }
                    }
                    SubscriberAck::PubComp(pkid) => {
                        reached.completed += usize::from(outbox.on_pubcomp(pkid).is_ok());
                    }
                }
                drain(outbox, v, out, reached);
            }
            Action::Unsubscribe { pkid, filters } => {
                reached.unsubscribed += filters.len();
                let codes = vec![codec::reason::SUCCESS; filters.len()];
                codec::encode(
                    &Outbound::UnsubAck { pkid, codes },
                    session.version().unwrap_or(Version::V311),
                    out,
                );
            }
            Action::Close { .. } => {
                let _ = session.take_will();
                return false;
            }
        }
    }
    out.clear();
    true
}

/// Decodes `data` as one packet stream of a known version (for a second, codec-only target).
pub fn decode_only(data: &[u8], v5: bool) {
    let mut buf = BytesMut::from(data);
    let v = Some(if v5 { Version::V5 } else { Version::V311 });
    while let Ok(Some(p)) = codec::decode(&mut buf, v, 1 << 16) {
        if matches!(p, Inbound::Connect(_)) {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic xorshift stream of inputs: random bytes, and valid packets with one
    /// byte mutated. (The coverage-guided run is `fuzz/`; this keeps the target exercised in CI.)
    #[test]
    fn random_and_mutated_device_bytes_never_panic_the_session() {
        let mut seeds: Vec<Vec<u8>> = vec![
            vec![1, 0x30, 0x05, 0, 1, b'a', b'h', b'i'],
            vec![2, 0x32, 0x0a, 0, 3, b'a', b'/', b'b', 0, 1, 0, b'h', b'i'],
            vec![
                1, 0x34, 0x07, 0, 1, b'x', 0, 2, b'h', b'i', 0x62, 0x02, 0, 2,
            ],
            vec![2, 0xe0, 0x00],
            vec![1, 0x82, 0x06, 0, 1, 0, 1, b'#', 0],
            vec![
                0, 0x10, 0x0c, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 2, 0, 30,
            ],
            vec![2, 0xf0, 0x00],
            vec![1, 0xc0, 0x00, 0xe0, 0x00],
        ];
        seeds.extend(subscriber_seeds());
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut total = Reached::default();
        for i in 0..20_000u32 {
            let mut input = seeds[(i as usize) % seeds.len()].clone();
            match next() % 3 {
                0 => {
                    let n = (next() % 64) as usize;
                    input.truncate(1);
                    input.extend((0..n).map(|_| next() as u8));
                }
                1 => {
                    let at = (next() as usize) % input.len();
                    input[at] = next() as u8;
                }
                _ => {
                    let extra = (next() % 16) as usize;
                    input.extend((0..extra).map(|_| next() as u8));
                }
            }
            let r = run_counted(&input);
            total.acked += r.acked;
            total.released += r.released;
            total.completed += r.completed;
            total.unsubscribed += r.unsubscribed;
            decode_only(&input[1..], i % 2 == 0);
        }
        // The mutations reach the subscriber's acks, not only the codec.
        assert!(
            total.acked > 0 && total.released > 0 && total.completed > 0 && total.unsubscribed > 0,
            "{total:?}"
        );
    }

    /// SUBSCRIBE (two filters, QoS 1 and 2), the subscriber's PUBACK 1, PUBREC 2 (PUBREL goes
    /// out), PUBCOMP 2, UNSUBSCRIBE, DISCONNECT: 3.1.1 and MQTT 5 (no-local, retain handling 1,
    /// subscription identifier 42), one byte at a time and whole. Also in `fuzz/corpus/session/` for the coverage-guided run.
    fn subscriber_seeds() -> Vec<Vec<u8>> {
        let acks = [0x40, 2, 0, 1, 0x50, 2, 0, 2, 0x70, 2, 0, 2];
        let mut v311 = vec![1, 0x82, 12, 0, 1, 0, 3, b'a', b'/', b'#', 1, 0, 1, b'b', 2];
        v311.extend_from_slice(&acks);
        v311.extend_from_slice(&[0xa2, 5, 0, 3, 0, 1, b'b', 0xe0, 0]);
        let mut v5 = vec![
            2, 0x82, 15, 0, 1, 2, 0x0b, 42, 0, 3, b'a', b'/', b'#', 0x15, 0, 1, b'b', 2,
        ];
        v5.extend_from_slice(&acks);
        v5.extend_from_slice(&[0xa2, 6, 0, 3, 0, 0, 1, b'b', 0xe0, 0]);
        // The first byte: 1 / 2 = 3.1.1 / 5 CONNECT, reads of one byte; 250 / 251: reads of 83.
        let mut whole311 = v311.clone();
        whole311[0] = 250;
        let mut whole5 = v5.clone();
        whole5[0] = 251;
        vec![v311, v5, whole311, whole5]
    }

    #[test]
    fn subscriber_seeds_reach_subscribe_the_outbox_and_every_subscriber_ack() {
        for seed in subscriber_seeds() {
            let r = run_counted(&seed);
            assert_eq!(
                r,
                Reached {
                    subscribed: 2,
                    unsubscribed: 1,
                    published: 2,
                    acked: 1,
                    released: 1,
                    completed: 1,
                },
                "{seed:?}"
            );
        }
    }
}
