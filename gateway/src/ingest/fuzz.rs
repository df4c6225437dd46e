//! The fuzz target shared by the libFuzzer harness (`fuzz/`) and the randomized test: arbitrary
//! device bytes through the codec and the session state machine, as the connection loop feeds
//! them. It must never panic, and the invariants checked below must hold for any input.

use bytes::BytesMut;

use super::codec::{self, Inbound, Outbound, Version};
use super::session::{Action, Identity, PublishAcl, Session, SessionLimits};

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

/// Runs one input. The first byte picks a prefix (none / a 3.1.1 CONNECT / a 5 CONNECT) and how
/// the rest is split into reads; the remaining bytes are what the device sends.
pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
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
            if !perform(&mut session, actions, &mut out) {
                return;
            }
        }
    }
}

/// Performs actions without I/O: encodes what would be sent. `false` once the session closed.
fn perform(session: &mut Session, actions: Vec<Action>, out: &mut BytesMut) -> bool {
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
                    Ok(Identity {
                        name: c.client_id.clone(),
                        username: c.username.clone(),
                    })
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
            Action::Refused(_) | Action::Delivered(_) | Action::StartSession { .. } => {}
            Action::Subscribe(subs) => {
                for s in subs {
                    assert!(crate::topic::check_filter(&s.filter).is_ok() && s.qos <= 2);
                }
            }
            Action::Unsubscribe { pkid, filters } => {
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
        let seeds: Vec<Vec<u8>> = vec![
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
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
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
            run(&input);
            decode_only(&input[1..], i % 2 == 0);
        }
    }
}
