//! MQTT sessions end to end over TLS, seen packet by packet with a raw client: takeover,
//! keep-alive, last will, QoS 2 duplicates, acknowledgement order, SUBSCRIBE refusal, MQTT 3.1,
//! and what CONNACK tells an MQTT 5 device.
#![allow(clippy::unwrap_used)]

mod ingest_support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ingest_support::raw::{self, kind, Connect, Packet, Publish, WAIT};
use ingest_support::TestGateway;

const DEV: &str = "dev-00001";
const TOPIC: &str = "devices/dev-00001/telemetry";
const WILL_TOPIC: &str = "devices/dev-00001/status";

fn payloads(records: &[gateway::queue::Record]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8(r.payload.clone()).unwrap())
        .collect()
}

#[tokio::test]
async fn takeover_sends_the_old_mqtt5_connection_disconnect_0x8e_and_closes_it() {
    let gw = TestGateway::start(|_, _| {}).await;
    let mut old = gw.raw_connected(DEV, &Connect::v5(DEV)).await;
    old.publish_qos1(true, TOPIC, 1, b"before").await;

    let mut new = gw.raw_connected(DEV, &Connect::v5(DEV)).await;
    let last = old.until_closed(WAIT).await;
    assert_eq!(last.len(), 1, "the old connection got {last:?}");
    assert_eq!(last[0].disconnect_reason(), 0x8E, "Session taken over");

    // The new connection owns the client id and works.
    new.publish_qos1(true, TOPIC, 1, b"after").await;
    assert_eq!(gw.stats.takeovers.load(Ordering::SeqCst), 1);
    assert_eq!(payloads(&gw.records()), ["before", "after"]);
    gw.stop().await;
}

#[tokio::test]
async fn takeover_closes_the_old_mqtt311_connection() {
    let gw = TestGateway::start(|_, _| {}).await;
    let mut old = gw.raw_connected(DEV, &Connect::v4(DEV)).await;
    let mut new = gw.raw_connected(DEV, &Connect::v4(DEV)).await;
    // 3.1.1 has no server DISCONNECT: the connection just ends.
    assert_eq!(old.until_closed(WAIT).await, []);
    new.publish_qos1(false, TOPIC, 9, b"after").await;
    // A third connection takes over from the second, and so on.
    let _third = gw.raw_connected(DEV, &Connect::v4(DEV)).await;
    assert_eq!(new.until_closed(WAIT).await, []);
    assert_eq!(gw.stats.takeovers.load(Ordering::SeqCst), 2);
    gw.stop().await;
}

#[tokio::test]
async fn silent_client_is_closed_after_one_and_a_half_keepalives() {
    let gw = TestGateway::start(|_, _| {}).await;
    let mut c = gw.raw_connected(DEV, &Connect::v4(DEV).keep_alive(1)).await;
    let silent_since = Instant::now();
    let before_close = c.until_closed(WAIT).await;
    let silent_for = silent_since.elapsed();
    assert_eq!(before_close, [], "3.1.1: no packet, just the close");
    assert!(
        silent_for >= Duration::from_millis(1300) && silent_for <= Duration::from_millis(2500),
        "closed after {silent_for:?}; expected about 1.5 s (1.5 x keep-alive 1 s)"
    );
    gw.wait_disconnected().await;
    gw.stop().await;
}

#[tokio::test]
async fn silent_mqtt5_client_gets_disconnect_0x8d_keep_alive_timeout() {
    let gw = TestGateway::start(|_, _| {}).await;
    let mut c = gw.raw_connected(DEV, &Connect::v5(DEV).keep_alive(1)).await;
    let silent_since = Instant::now();
    let last = c.until_closed(WAIT).await;
    let silent_for = silent_since.elapsed();
    assert_eq!(last.len(), 1, "{last:?}");
    assert_eq!(last[0].disconnect_reason(), 0x8D, "Keep alive timeout");
    assert!(
        silent_for >= Duration::from_millis(1300) && silent_for <= Duration::from_millis(2500),
        "closed after {silent_for:?}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn will_is_stored_when_the_keepalive_expires() {
    let gw = TestGateway::start(|_, _| {}).await;
    for (v5, payload) in [(false, "offline-311"), (true, "offline-5")] {
        let connect = if v5 {
            Connect::v5(DEV)
        } else {
            Connect::v4(DEV)
        };
        let connect = connect
            .keep_alive(1)
            .will(WILL_TOPIC, payload.as_bytes(), 1);
        let mut c = gw.raw_connected(DEV, &connect).await;
        c.until_closed(WAIT).await;
        gw.wait_disconnected().await;
    }
    // The connections ended without DISCONNECT: the wills go into the queue.
    let records = gw.records();
    assert_eq!(payloads(&records), ["offline-311", "offline-5"]);
    for will in &records {
        assert_eq!(will.device_id, DEV);
        assert_eq!(will.topic, WILL_TOPIC);
        assert_eq!(will.qos, 1);
    }
    gw.stop().await;
}

#[tokio::test]
async fn pingreq_keeps_a_connection_with_a_short_keepalive_open() {
    let gw = TestGateway::start(|_, _| {}).await;
    let mut c = gw.raw_connected(DEV, &Connect::v4(DEV).keep_alive(1)).await;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.send(&raw::PINGREQ).await.unwrap();
        assert_eq!(c.recv().await.kind, kind::PINGRESP);
    }
    // 3 s with keep-alive 1 s, and still open.
    c.publish_qos1(false, TOPIC, 1, b"still here").await;
    gw.stop().await;
}

#[tokio::test]
async fn will_is_stored_when_the_connection_drops_without_disconnect() {
    let gw = TestGateway::start(|_, _| {}).await;
    for (v5, payload) in [(false, "gone-311"), (true, "gone-5")] {
        let connect = if v5 {
            Connect::v5(DEV)
        } else {
            Connect::v4(DEV)
        };
        let mut c = gw
            .raw_connected(DEV, &connect.will(WILL_TOPIC, payload.as_bytes(), 1))
            .await;
        c.publish_qos1(v5, TOPIC, 1, b"data").await;
        drop(c); // TCP close, no DISCONNECT
        gw.wait_disconnected().await;
    }
    let records = gw.records();
    assert_eq!(payloads(&records), ["data", "gone-311", "data", "gone-5"]);
    for will in [&records[1], &records[3]] {
        assert_eq!(will.topic, WILL_TOPIC);
        assert_eq!(will.device_id, DEV);
        assert_eq!(will.qos, 1);
    }
    assert_eq!(gw.stats.wills.load(Ordering::SeqCst), 2);
    gw.stop().await;
}

#[tokio::test]
async fn will_is_not_stored_after_a_normal_disconnect() {
    let gw = TestGateway::start(|_, _| {}).await;
    let cases: [(Connect, Vec<u8>, &str); 3] = [
        (
            Connect::v4(DEV),
            raw::DISCONNECT.to_vec(),
            "3.1.1 DISCONNECT",
        ),
        (
            Connect::v5(DEV),
            raw::disconnect_v5(0x00),
            "MQTT 5 DISCONNECT 0x00",
        ),
        (
            Connect::v5(DEV),
            raw::disconnect_v5(0x8B),
            "MQTT 5 DISCONNECT with another reason than 0x04",
        ),
    ];
    for (connect, disconnect, what) in cases {
        let mut c = gw
            .raw_connected(DEV, &connect.will(WILL_TOPIC, what.as_bytes(), 1))
            .await;
        c.send(&disconnect).await.unwrap();
        assert_eq!(c.until_closed(WAIT).await, [], "{what}");
        gw.wait_disconnected().await;
    }
    assert_eq!(payloads(&gw.records()), Vec::<String>::new());
    assert_eq!(gw.stats.wills.load(Ordering::SeqCst), 0);
    gw.stop().await;
}

#[tokio::test]
async fn mqtt5_disconnect_with_remaining_length_0_is_a_normal_disconnect() {
    let gw = TestGateway::start(|_, _| {}).await;
    let mut c = gw
        .raw_connected(
            DEV,
            &Connect::v5(DEV).will(WILL_TOPIC, b"must not appear", 1),
        )
        .await;
    c.publish_qos1(true, TOPIC, 1, b"data").await;
    c.send(&raw::DISCONNECT).await.unwrap(); // E0 00: reason 0x00, no properties
    let last = c.until_closed(WAIT).await;
    assert_eq!(
        last,
        [],
        "no DISCONNECT 0x81 (malformed) for the short form"
    );
    gw.wait_disconnected().await;
    assert_eq!(payloads(&gw.records()), ["data"]);
    assert_eq!(gw.stats.refused_count("malformed"), 0);
    assert_eq!(gw.stats.wills.load(Ordering::SeqCst), 0);
    gw.stop().await;
}

#[tokio::test]
async fn mqtt5_disconnect_with_will_message_stores_the_will() {
    let gw = TestGateway::start(|_, _| {}).await;
    let mut c = gw
        .raw_connected(DEV, &Connect::v5(DEV).will(WILL_TOPIC, b"asked for", 1))
        .await;
    c.send(&raw::disconnect_v5(0x04)).await.unwrap();
    assert_eq!(c.until_closed(WAIT).await, []);
    gw.wait_disconnected().await;
    assert_eq!(payloads(&gw.records()), ["asked for"]);
    gw.stop().await;
}

/// PUBLISH QoS 2 with `pkid`, expecting PUBREC `pkid` with success.
async fn expect_pubrec(c: &mut raw::TlsRaw, pkid: u16) {
    let p = c.recv().await;
    assert_eq!(
        (p.kind, p.pkid(), p.ack_reason()),
        (kind::PUBREC, pkid, 0),
        "{p:?}"
    );
}

#[tokio::test]
async fn qos2_duplicate_publish_with_the_same_packet_id_is_stored_once() {
    let gw = TestGateway::start(|_, _| {}).await;
    for v5 in [false, true] {
        let connect = if v5 {
            Connect::v5(DEV)
        } else {
            Connect::v4(DEV)
        };
        let mut c = gw.raw_connected(DEV, &connect).await;
        let first = Publish::new(v5, TOPIC, format!("once-{v5}").as_bytes()).qos(2, 7);
        // The resend after the PUBREC ...
        c.publish(&first).await;
        expect_pubrec(&mut c, 7).await;
        c.publish(&first.clone().dup()).await;
        expect_pubrec(&mut c, 7).await;
        // ... and one right behind the original, before its PUBREC could have been seen.
        let other = Publish::new(v5, TOPIC, format!("twice-sent-{v5}").as_bytes()).qos(2, 8);
        let mut both = other.encode();
        both.extend(other.clone().dup().encode());
        c.send(&both).await.unwrap();
        expect_pubrec(&mut c, 8).await;
        expect_pubrec(&mut c, 8).await;
        for pkid in [7, 8] {
            c.send(&raw::pubrel(pkid)).await.unwrap();
            let comp = c.recv().await;
            assert_eq!((comp.kind, comp.pkid()), (kind::PUBCOMP, pkid));
        }
        // After PUBCOMP the id is free again: the same id is a new message.
        c.publish(&Publish::new(v5, TOPIC, format!("reused-{v5}").as_bytes()).qos(2, 7))
            .await;
        expect_pubrec(&mut c, 7).await;
        c.send(&raw::DISCONNECT).await.unwrap();
        c.until_closed(WAIT).await;
    }
    let records = gw.records();
    assert_eq!(
        payloads(&records),
        [
            "once-false",
            "twice-sent-false",
            "reused-false",
            "once-true",
            "twice-sent-true",
            "reused-true"
        ]
    );
    assert!(records.iter().all(|r| r.qos == 2));
    gw.stop().await;
}

/// The acks a device gets for `publishes`, in the order they arrive.
async fn acks_for(c: &mut raw::TlsRaw, publishes: &[Publish]) -> Vec<(u8, u16)> {
    let mut burst = Vec::new();
    for p in publishes {
        burst.extend(p.encode());
    }
    c.send(&burst).await.unwrap();
    let mut acks = Vec::new();
    for _ in 0..publishes.iter().filter(|p| p.qos > 0).count() {
        let p: Packet = c.recv().await;
        acks.push((p.kind, p.pkid()));
    }
    acks
}

#[tokio::test]
async fn acks_go_out_in_the_order_the_publishes_arrived() {
    let gw = TestGateway::start(|_, _| {}).await;
    // Three devices at once, so appends of different connections share group commits.
    let mut tasks = Vec::new();
    for (n, v5, count) in [(1, false, 300u16), (2, false, 300), (3, true, 60)] {
        let dev = format!("dev-0000{n}");
        let connect = if v5 {
            Connect::v5(&dev)
        } else {
            Connect::v4(&dev)
        };
        let mut c = gw.raw_connected(&dev, &connect).await;
        tasks.push(tokio::spawn(async move {
            let topic = format!("devices/{dev}/t");
            let publishes: Vec<Publish> = (1..=count)
                .map(|i| {
                    let qos = match i % 5 {
                        0 => 2,
                        3 => 0,
                        _ => 1,
                    };
                    Publish::new(v5, &topic, format!("{dev}-{i}").as_bytes())
                        .qos(qos, if qos == 0 { 0 } else { i })
                })
                .collect();
            let expected: Vec<(u8, u16)> = publishes
                .iter()
                .filter(|p| p.qos > 0)
                .map(|p| {
                    (
                        if p.qos == 1 {
                            kind::PUBACK
                        } else {
                            kind::PUBREC
                        },
                        p.pkid,
                    )
                })
                .collect();
            let got = acks_for(&mut c, &publishes).await;
            assert_eq!(got, expected, "{dev}: acks out of publish order");
            (dev, publishes)
        }));
    }
    let mut sent = Vec::new();
    for t in tasks {
        sent.push(t.await.unwrap());
    }
    // Every acknowledged publish is stored, each device's in its own order.
    let records = gw.records();
    for (dev, publishes) in sent {
        let stored: Vec<Vec<u8>> = records
            .iter()
            .filter(|r| r.device_id == dev)
            .map(|r| r.payload.clone())
            .collect();
        let want: Vec<Vec<u8>> = publishes.iter().map(|p| p.payload.clone()).collect();
        assert_eq!(stored, want, "{dev}: records out of order or missing");
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_subscribe_outside_the_subscribe_acl_is_refused_and_the_session_goes_on() {
    let gw = TestGateway::start(|_, _| {}).await;
    for v5 in [false, true] {
        let connect = if v5 {
            Connect::v5(DEV)
        } else {
            Connect::v4(DEV)
        };
        let mut c = gw.raw_connected(DEV, &connect).await;
        // The default ACL allows a device its own command tree only.
        c.send(&raw::subscribe(
            v5,
            5,
            &["cmd/#", "devices/dev-00001/commands/#"],
        ))
        .await
        .unwrap();
        let suback = c.recv().await;
        assert_eq!(suback.pkid(), 5);
        let refused = if v5 { 0x87 } else { 0x80 };
        assert_eq!(suback.suback_codes(v5), [refused, 1], "one code per filter");
        c.send(&raw::PINGREQ).await.unwrap();
        assert_eq!(c.recv().await.kind, kind::PINGRESP);
        c.publish_qos1(v5, TOPIC, 6, b"after subscribe").await;
        c.send(&raw::DISCONNECT).await.unwrap();
        gw.wait_disconnected().await;
    }
    assert_eq!(
        payloads(&gw.records()),
        ["after subscribe", "after subscribe"]
    );
    gw.stop().await;
}

#[tokio::test]
async fn mqtt31_connect_gets_connack_return_code_1_and_is_closed() {
    let gw = TestGateway::start(|_, _| {}).await;
    let mut c = gw.raw(Some(DEV)).await;
    c.send(&Connect::v31(DEV).encode()).await.unwrap();
    let got = c.until_closed(WAIT).await;
    assert_eq!(
        got,
        [Packet {
            kind: kind::CONNACK,
            flags: 0,
            body: vec![0x00, 0x01]
        }],
        "CONNACK 'unacceptable protocol version' in the 3.x layout, then the close"
    );
    assert!(gw.records().is_empty());
    gw.stop().await;
}

#[tokio::test]
async fn mqtt5_connack_states_the_gateways_limits_and_missing_features() {
    let gw = TestGateway::start(|c, _| {
        c.limits.receive_maximum = 32;
        c.limits.max_packet_size = 64 << 10;
    })
    .await;
    let mut c = gw.raw(Some(DEV)).await;
    let ack = c.connect(&Connect::v5(DEV)).await;
    assert_eq!(ack.connack_code(), 0);
    let props = ack.connack_properties();
    let prop = |id: u8| {
        props
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("CONNACK property {id:#x} missing: {props:?}"))
    };
    assert_eq!(prop(0x21), 32u16.to_be_bytes(), "receive maximum");
    assert_eq!(
        prop(0x27),
        (64u32 << 10).to_be_bytes(),
        "maximum packet size"
    );
    assert_eq!(prop(0x22), [0, 0], "topic alias maximum");
    assert!(
        props.iter().all(|(id, _)| *id != 0x25),
        "retain available (the property's absence says so)"
    );
    assert!(
        props.iter().all(|(id, _)| *id != 0x28),
        "wildcard subscriptions available (the property's absence says so)"
    );
    assert_eq!(prop(0x2A), [0], "shared subscription available");
    gw.stop().await;
}

#[tokio::test]
async fn publish_pipelined_behind_connect_is_accepted() {
    let gw = TestGateway::start(|_, _| {}).await;
    for v5 in [false, true] {
        let connect = if v5 {
            Connect::v5(DEV)
        } else {
            Connect::v4(DEV)
        };
        let mut c = gw.raw(Some(DEV)).await;
        // CONNECT and PUBLISH in one write, before the CONNACK could have been seen.
        let mut both = connect.encode();
        both.extend(Publish::new(v5, TOPIC, b"eager").qos(1, 1).encode());
        c.send(&both).await.unwrap();
        assert_eq!(c.recv().await.connack_code(), 0);
        let ack = c.recv().await;
        assert_eq!(
            (ack.kind, ack.pkid(), ack.ack_reason()),
            (kind::PUBACK, 1, 0)
        );
        c.send(&raw::DISCONNECT).await.unwrap();
        c.until_closed(WAIT).await;
    }
    assert_eq!(payloads(&gw.records()), ["eager", "eager"]);
    gw.stop().await;
}

#[tokio::test]
async fn records_carry_the_retain_flag_of_a_mqtt311_publish() {
    let gw = TestGateway::start(|_, _| {}).await;
    let mut c = gw.raw_connected(DEV, &Connect::v4(DEV)).await;
    c.publish(&Publish::new(false, TOPIC, b"retained").qos(1, 1).retain())
        .await;
    assert_eq!(c.recv().await.pkid(), 1);
    c.publish_qos1(false, TOPIC, 2, b"plain").await;
    let records = gw.records();
    assert_eq!(
        records
            .iter()
            .map(|r| (r.payload.as_slice(), r.retain))
            .collect::<Vec<_>>(),
        [(&b"retained"[..], true), (&b"plain"[..], false)]
    );
    gw.stop().await;
}

#[tokio::test]
async fn mqtt5_topic_alias_is_refused_with_disconnect_0x94() {
    // CONNACK says topic alias maximum 0, so any alias is a protocol error.
    let gw = TestGateway::start(|_, _| {}).await;
    let mut c = gw.raw_connected(DEV, &Connect::v5(DEV)).await;
    c.publish(
        &Publish::new(true, TOPIC, b"aliased")
            .qos(1, 1)
            .property(0x23, &1u16.to_be_bytes()),
    )
    .await;
    let last = c.until_closed(WAIT).await;
    assert_eq!(last.len(), 1, "{last:?}");
    assert_eq!(last[0].disconnect_reason(), 0x94, "topic alias invalid");
    assert!(gw.records().is_empty());
    gw.stop().await;
}
