//! Subscriptions and live delivery to local subscribers (issue 11, first steps): SUBSCRIBE with
//! per-filter codes and the subscribe ACL, delivery at the lower of the subscription's and the
//! publish's QoS in publish order, QoS 2 with PUBREL, UNSUBSCRIBE, and a stuck subscriber that
//! holds up nobody. Real TLS connections to an in-process gateway.

#![allow(clippy::unwrap_used)]

mod ingest_support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use gateway::config::AclRule;
use ingest_support::raw::{self, kind, Connect, Publish, Received, WAIT};
use ingest_support::TestGateway;

const DEVICE: &str = "dev-00001";
const OTHER: &str = "dev-00002";
/// May subscribe to every device's telemetry (a site dashboard).
const DASHBOARD: &str = "dev-00005";

async fn gateway() -> TestGateway {
    TestGateway::start(|c, _| {
        c.acl = vec![
            AclRule {
                identity: "*".into(),
                publish: vec!["devices/%c/#".into()],
                subscribe: vec!["devices/%c/commands/#".into()],
            },
            AclRule {
                identity: DASHBOARD.into(),
                publish: vec![],
                subscribe: vec!["devices/+/telemetry".into()],
            },
        ];
    })
    .await
}

/// Receives `n` PUBLISHes, acking QoS 1 ones, failing on anything else.
async fn receive(c: &mut raw::TlsRaw, v5: bool, n: usize) -> Vec<Received> {
    let mut got = Vec::new();
    while got.len() < n {
        let p = c.recv().await;
        let r = p.publish(v5);
        if r.qos == 1 {
            c.send(&raw::puback(r.pkid)).await.unwrap();
        }
        got.push(r);
    }
    got
}

#[tokio::test]
async fn a_subscriber_gets_each_publish_in_order_at_the_lower_of_both_qos() {
    let gw = gateway().await;
    let mut dash = gw.raw_connected(DASHBOARD, &Connect::v4(DASHBOARD)).await;
    dash.send(&raw::subscribe_with(
        false,
        1,
        &[("devices/+/telemetry", 1)],
    ))
    .await
    .unwrap();
    let ack = dash.recv().await;
    assert_eq!((ack.pkid(), ack.suback_codes(false)), (1, vec![1]));

    let mut dev = gw.raw_connected(DEVICE, &Connect::v4(DEVICE)).await;
    for i in 0..5u16 {
        dev.publish_qos1(
            false,
            "devices/dev-00001/telemetry",
            i + 1,
            format!("m{i}").as_bytes(),
        )
        .await;
    }
    // QoS 2 published, QoS 1 granted: delivered at 1. QoS 0 published: delivered at 0.
    dev.publish(&Publish::new(false, "devices/dev-00001/telemetry", b"q2").qos(2, 9))
        .await;
    assert_eq!(dev.recv().await.kind, kind::PUBREC);
    dev.send(&raw::pubrel(9)).await.unwrap();
    assert_eq!(dev.recv().await.kind, kind::PUBCOMP);
    dev.publish(&Publish::new(false, "devices/dev-00001/telemetry", b"q0"))
        .await;
    // Not matched by the filter.
    dev.publish_qos1(false, "devices/dev-00001/other", 20, b"no")
        .await;

    let got = receive(&mut dash, false, 7).await;
    let payloads: Vec<_> = got
        .iter()
        .map(|r| String::from_utf8_lossy(&r.payload).to_string())
        .collect();
    assert_eq!(payloads, ["m0", "m1", "m2", "m3", "m4", "q2", "q0"]);
    let qos: Vec<_> = got.iter().map(|r| r.qos).collect();
    assert_eq!(qos, [1, 1, 1, 1, 1, 1, 0]);
    assert!(got
        .iter()
        .all(|r| r.topic == "devices/dev-00001/telemetry" && !r.dup && !r.retain));
    assert!(
        dash.recv_within(Duration::from_millis(300)).await.is_err(),
        "nothing more: devices/dev-00001/other matches no subscription"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_denied_or_invalid_filter_is_refused_while_the_others_are_granted() {
    let gw = gateway().await;
    // 3.1.1: one failure code, 0x80.
    let mut c = gw.raw_connected(DEVICE, &Connect::v4(DEVICE)).await;
    c.send(&raw::subscribe_with(
        false,
        3,
        &[
            ("devices/dev-00001/commands/#", 2),
            ("devices/dev-00002/commands/#", 1),
            ("devices/#", 0),
            ("a/#/b", 1),
        ],
    ))
    .await
    .unwrap();
    assert_eq!(c.recv().await.suback_codes(false), [2, 0x80, 0x80, 0x80]);
    // MQTT 5: each refusal with its own reason code.
    let mut c5 = gw.raw_connected(OTHER, &Connect::v5(OTHER)).await;
    c5.send(&raw::subscribe_with(
        true,
        4,
        &[
            ("devices/dev-00001/commands/#", 1),
            ("devices/dev-00002/commands/+", 1),
            ("$share/g/devices/dev-00002/commands/#", 1),
            ("a/b#", 0),
        ],
    ))
    .await
    .unwrap();
    assert_eq!(c5.recv().await.suback_codes(true), [0x87, 1, 0x9E, 0x8F]);
    assert!(c.is_open_after(Duration::from_millis(100)).await);
    assert!(c5.is_open_after(Duration::from_millis(100)).await);
    assert_eq!(
        gw.stats.refused_count("acl"),
        3,
        "denied by the subscribe ACL"
    );
    assert_eq!(gw.stats.refused_count("malformed"), 2, "invalid filters");
    gw.stop().await;
}

#[tokio::test]
async fn qos2_is_delivered_once_with_pubrec_pubrel_pubcomp() {
    let gw = gateway().await;
    let mut sub = gw.raw_connected(DEVICE, &Connect::v5(DEVICE)).await;
    sub.send(&raw::subscribe_with(
        true,
        1,
        &[("devices/dev-00001/commands/#", 2)],
    ))
    .await
    .unwrap();
    assert_eq!(sub.recv().await.suback_codes(true), [2]);
    // Only dev-00001 may publish under its own tree: it sends itself a command (no-local off).
    sub.publish(&Publish::new(true, "devices/dev-00001/commands/reboot", b"now").qos(2, 7))
        .await;
    let mut publish = None;
    let mut acked = false;
    while publish.is_none() || !acked {
        let p = sub.recv().await;
        match p.kind {
            kind::PUBREC => {
                assert_eq!(p.pkid(), 7);
                sub.send(&raw::pubrel(7)).await.unwrap();
            }
            kind::PUBCOMP => acked = true,
            kind::PUBLISH => publish = Some(p.publish(true)),
            _ => panic!("unexpected {p:?}"),
        }
    }
    let r = publish.unwrap();
    assert_eq!((r.qos, r.payload.as_slice()), (2, &b"now"[..]));
    sub.send(&raw::pubrec(r.pkid)).await.unwrap();
    let rel = sub.recv().await;
    assert_eq!((rel.kind, rel.pkid()), (kind::PUBREL, r.pkid));
    sub.send(&raw::pubcomp(r.pkid)).await.unwrap();
    assert!(
        sub.recv_within(Duration::from_millis(300)).await.is_err(),
        "delivered once, nothing resent"
    );
    gw.stop().await;
}

#[tokio::test]
async fn no_local_keeps_a_clients_own_publishes_from_it() {
    let gw = gateway().await;
    let mut c = gw.raw_connected(DEVICE, &Connect::v5(DEVICE)).await;
    // Options: QoS 1 | no-local.
    c.send(&raw::subscribe_with(
        true,
        1,
        &[("devices/dev-00001/commands/#", 0x05)],
    ))
    .await
    .unwrap();
    assert_eq!(c.recv().await.suback_codes(true), [1]);
    c.publish_qos1(true, "devices/dev-00001/commands/x", 2, b"mine")
        .await;
    assert!(c.recv_within(Duration::from_millis(300)).await.is_err());
    gw.stop().await;
}

#[tokio::test]
async fn unsubscribe_ends_delivery_and_says_which_filters_existed() {
    let gw = gateway().await;
    let mut dash = gw.raw_connected(DASHBOARD, &Connect::v5(DASHBOARD)).await;
    dash.send(&raw::subscribe_with(true, 1, &[("devices/+/telemetry", 1)]))
        .await
        .unwrap();
    assert_eq!(dash.recv().await.suback_codes(true), [1]);
    let mut dev = gw.raw_connected(DEVICE, &Connect::v4(DEVICE)).await;
    dev.publish_qos1(false, "devices/dev-00001/telemetry", 1, b"before")
        .await;
    assert_eq!(receive(&mut dash, true, 1).await[0].payload, b"before");
    dash.send(&raw::unsubscribe(
        true,
        2,
        &["devices/+/telemetry", "never/subscribed"],
    ))
    .await
    .unwrap();
    let ack = dash.recv().await;
    assert_eq!((ack.pkid(), ack.unsuback_codes()), (2, vec![0x00, 0x11]));
    dev.publish_qos1(false, "devices/dev-00001/telemetry", 2, b"after")
        .await;
    assert!(dash.recv_within(Duration::from_millis(300)).await.is_err());
    assert_eq!(
        gw.records().len(),
        2,
        "both stored for the uplinks all the same"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_stuck_subscriber_holds_up_no_publisher_and_what_it_misses_is_counted() {
    let gw = gateway().await;
    let sessions = gw.sessions.clone();
    // Subscribes, then never reads again and never acks.
    let mut stuck = gw.raw_connected(DASHBOARD, &Connect::v4(DASHBOARD)).await;
    stuck
        .send(&raw::subscribe_with(
            false,
            1,
            &[("devices/+/telemetry", 1)],
        ))
        .await
        .unwrap();
    assert_eq!(stuck.recv().await.suback_codes(false), [1]);
    let mut dev = gw.raw_connected(DEVICE, &Connect::v4(DEVICE)).await;
    let payload = vec![b'x'; 2048];
    let n = 3000u16;
    for i in 0..n {
        dev.publish(&Publish::new(false, "devices/dev-00001/telemetry", &payload).qos(1, i + 1))
            .await;
    }
    // Every PUBACK comes back: the publisher is never held by the subscriber.
    for i in 0..n {
        let ack = dev.recv().await;
        assert_eq!((ack.kind, ack.pkid()), (kind::PUBACK, i + 1));
    }
    // At most 32 in flight to it and 1000 waiting (the default bounds).
    let (delivered_max, queued_max) = (32u64, 1000u64);
    gw.wait_until("the router to take every record", WAIT, |_| {
        sessions.stats.routed.load(Ordering::SeqCst) >= u64::from(n)
    })
    .await;
    let refused = sessions.stats.refused_full.load(Ordering::SeqCst);
    assert!(
        refused >= u64::from(n) - delivered_max - queued_max,
        "the full session's refusals are counted: {refused}"
    );
    assert_eq!(gw.records().len(), usize::from(n), "every publish stored");
    gw.stop().await;
}

/// Connects `id` (certificate and client id), returning the client and CONNACK's session
/// present flag.
async fn connect(gw: &TestGateway, id: &str, c: &Connect) -> (raw::TlsRaw, bool) {
    let mut client = gw.raw(Some(id)).await;
    let ack = client.connect(c).await;
    assert_eq!(ack.connack_code(), 0, "{ack:?}");
    (client, ack.session_present())
}

async fn subscribe(c: &mut raw::TlsRaw, v5: bool, filter: &str, qos: u8) {
    c.send(&raw::subscribe_with(v5, 1, &[(filter, qos)]))
        .await
        .unwrap();
    assert_eq!(c.recv().await.suback_codes(v5), [qos]);
}

#[tokio::test]
async fn a_persistent_session_keeps_its_subscription_and_qos1_messages_across_a_disconnect() {
    let gw = gateway().await;
    let (mut dash, present) = connect(&gw, DASHBOARD, &Connect::v4(DASHBOARD).persistent(0)).await;
    assert!(!present, "no session stored yet");
    subscribe(&mut dash, false, "devices/+/telemetry", 1).await;
    let mut dev = gw.raw_connected(DEVICE, &Connect::v4(DEVICE)).await;
    dev.publish_qos1(false, "devices/dev-00001/telemetry", 1, b"m0")
        .await;
    // Received but never acknowledged: the connection drops.
    let first = dash.recv().await.publish(false);
    assert_eq!((first.payload.as_slice(), first.dup), (&b"m0"[..], false));
    drop(dash);
    gw.wait_until("the subscriber's connection to end", WAIT, |g| {
        g.sessions.counts().1 == 1
    })
    .await;
    for (i, m) in ["m1", "m2", "m3"].iter().enumerate() {
        dev.publish_qos1(
            false,
            "devices/dev-00001/telemetry",
            2 + i as u16,
            m.as_bytes(),
        )
        .await;
    }
    // QoS 0 is not kept for an offline session.
    dev.publish(&Publish::new(false, "devices/dev-00001/telemetry", b"q0"))
        .await;
    dev.publish_qos1(false, "devices/dev-00001/other", 9, b"sync")
        .await;
    // A PUBACK says stored, not routed: "q0" must reach the router while the session is
    // offline (routed after the reconnect, it would go to the connected client).
    gw.wait_until("the router to take all 6 records", WAIT, |g| {
        g.sessions.stats.routed.load(Ordering::SeqCst) >= 6
    })
    .await;

    let (mut dash, present) = connect(&gw, DASHBOARD, &Connect::v4(DASHBOARD).persistent(0)).await;
    assert!(present, "the stored session is resumed");
    let got = receive(&mut dash, false, 4).await;
    let seen: Vec<_> = got
        .iter()
        .map(|r| (String::from_utf8_lossy(&r.payload).to_string(), r.dup))
        .collect();
    assert_eq!(
        seen,
        [
            ("m0".to_string(), true),
            ("m1".to_string(), false),
            ("m2".to_string(), false),
            ("m3".to_string(), false)
        ],
        "the unacknowledged one again with DUP, then what came while offline, in order"
    );
    assert!(dash.recv_within(Duration::from_millis(300)).await.is_err());
    // The subscription is still there.
    dev.publish_qos1(false, "devices/dev-00001/telemetry", 10, b"m4")
        .await;
    assert_eq!(receive(&mut dash, false, 1).await[0].payload, b"m4");
    gw.stop().await;
}

#[tokio::test]
async fn a_clean_start_ends_the_stored_session() {
    let gw = gateway().await;
    let (mut dash, _) = connect(&gw, DASHBOARD, &Connect::v5(DASHBOARD).persistent(3600)).await;
    subscribe(&mut dash, true, "devices/+/telemetry", 1).await;
    drop(dash);
    gw.wait_until("the session to go offline", WAIT, |g| {
        g.sessions.counts().1 == 1
    })
    .await;
    let mut dev = gw.raw_connected(DEVICE, &Connect::v4(DEVICE)).await;
    dev.publish_qos1(false, "devices/dev-00001/telemetry", 1, b"while away")
        .await;
    gw.wait_until("the message to be queued for it", WAIT, |g| {
        g.sessions.counts().3 > 0
    })
    .await;
    let (mut dash, present) = connect(&gw, DASHBOARD, &Connect::v5(DASHBOARD)).await;
    assert!(!present);
    assert!(
        dash.recv_within(Duration::from_millis(300)).await.is_err(),
        "the stored message went with the session"
    );
    dev.publish_qos1(false, "devices/dev-00001/telemetry", 2, b"later")
        .await;
    assert!(
        dash.recv_within(Duration::from_millis(300)).await.is_err(),
        "and so did the subscription"
    );
    assert_eq!(gw.sessions.stats.discarded.load(Ordering::SeqCst), 1);
    gw.stop().await;
}

#[tokio::test]
async fn an_offline_session_ends_when_its_expiry_passes_and_a_long_expiry_is_capped() {
    let gw = TestGateway::start(|c, _| {
        c.sessions.max_expiry = Duration::from_secs(60);
        c.acl[0].subscribe = vec!["devices/%c/commands/#".into()];
    })
    .await;
    let mut c = gw.raw(Some(DEVICE)).await;
    let ack = c.connect(&Connect::v5(DEVICE).persistent(86_400)).await;
    assert_eq!(
        ack.connack_properties()
            .into_iter()
            .find(|(id, _)| *id == 0x11)
            .map(|(_, v)| v),
        Some(60u32.to_be_bytes().to_vec()),
        "CONNACK grants the capped session expiry"
    );
    drop(c);
    let (c, _) = connect(&gw, OTHER, &Connect::v5(OTHER).persistent(1)).await;
    drop(c);
    gw.wait_until(
        "dev-00002's session to expire after 1 s",
        Duration::from_secs(10),
        |g| g.sessions.stats.expired.load(Ordering::SeqCst) == 1,
    )
    .await;
    let (_, present) = connect(&gw, OTHER, &Connect::v5(OTHER).persistent(1)).await;
    assert!(!present, "expired");
    let (_, present) = connect(&gw, DEVICE, &Connect::v5(DEVICE).persistent(60)).await;
    assert!(present, "not expired");
    gw.stop().await;
}

#[tokio::test]
async fn qos2_across_a_reconnect_is_released_not_published_again() {
    let gw = gateway().await;
    let (mut sub, _) = connect(&gw, DEVICE, &Connect::v5(DEVICE).persistent(3600)).await;
    subscribe(&mut sub, true, "devices/dev-00001/commands/#", 2).await;
    let (mut cmd, _) = connect(&gw, DEVICE, &Connect::v5(DEVICE).persistent(3600)).await;
    // The first connection was taken over; the second publishes a command to itself.
    let _ = sub.until_closed(WAIT).await;
    cmd.publish(&Publish::new(true, "devices/dev-00001/commands/go", b"once").qos(2, 3))
        .await;
    let mut delivered = None;
    while delivered.is_none() {
        let p = cmd.recv().await;
        match p.kind {
            kind::PUBREC => cmd.send(&raw::pubrel(3)).await.unwrap(),
            kind::PUBCOMP => {}
            kind::PUBLISH => delivered = Some(p.publish(true)),
            _ => panic!("unexpected {p:?}"),
        }
    }
    let d = delivered.unwrap();
    cmd.send(&raw::pubrec(d.pkid)).await.unwrap();
    loop {
        let p = cmd.recv().await;
        if p.kind == kind::PUBREL {
            break;
        }
        assert_eq!(p.kind, kind::PUBCOMP, "{p:?}");
    }
    // Gone before PUBCOMP: the resumed session sends PUBREL again, never the PUBLISH.
    drop(cmd);
    gw.wait_until("the session to go offline", WAIT, |g| {
        g.sessions.counts().1 == 1
    })
    .await;
    let (mut again, present) = connect(&gw, DEVICE, &Connect::v5(DEVICE).persistent(3600)).await;
    assert!(present);
    let p = again.recv().await;
    assert_eq!((p.kind, p.pkid()), (kind::PUBREL, d.pkid), "{p:?}");
    again.send(&raw::pubcomp(d.pkid)).await.unwrap();
    assert!(again.recv_within(Duration::from_millis(300)).await.is_err());
    gw.stop().await;
}

#[tokio::test]
async fn a_restart_keeps_persistent_sessions_their_messages_and_a_qos2_release() {
    let gw = gateway().await;
    // dev-00001 keeps a session with a QoS 2 subscription to its command tree; the dashboard
    // one with QoS 1 to the telemetry.
    let (mut sub, _) = connect(&gw, DEVICE, &Connect::v5(DEVICE).persistent(3600)).await;
    subscribe(&mut sub, true, "devices/dev-00001/commands/#", 2).await;
    let (mut dash, _) = connect(&gw, DASHBOARD, &Connect::v4(DASHBOARD).persistent(0)).await;
    subscribe(&mut dash, false, "devices/+/telemetry", 1).await;
    drop(dash);
    // A command to itself, received and PUBREC'd, then the connection is gone before PUBCOMP.
    sub.publish(&Publish::new(true, "devices/dev-00001/commands/a", b"c1").qos(2, 1))
        .await;
    let mut delivered = None;
    let mut rel_pkid = None;
    while delivered.is_none() || rel_pkid.is_none() {
        let p = sub.recv().await;
        match p.kind {
            kind::PUBREC => sub.send(&raw::pubrel(1)).await.unwrap(),
            kind::PUBCOMP => {}
            kind::PUBLISH => {
                let d = p.publish(true);
                sub.send(&raw::pubrec(d.pkid)).await.unwrap();
                delivered = Some(d);
            }
            kind::PUBREL => rel_pkid = Some(p.pkid()),
            _ => panic!("unexpected {p:?}"),
        }
    }
    assert_eq!(rel_pkid, delivered.as_ref().map(|d| d.pkid));
    drop(sub);
    // Telemetry for the absent dashboard.
    let mut dev = gw.raw_connected(OTHER, &Connect::v4(OTHER)).await;
    for i in 0..3u16 {
        dev.publish_qos1(
            false,
            "devices/dev-00002/telemetry",
            i + 1,
            format!("t{i}").as_bytes(),
        )
        .await;
    }
    gw.wait_until("three messages queued for the dashboard", WAIT, |g| {
        g.sessions.counts().3 >= 3 * ("devices/dev-00002/telemetry".len() + 2 + 32)
    })
    .await;
    drop(dev);

    let gw = gw.restart().await;
    assert_eq!(
        gw.sessions.counts().1,
        2,
        "both sessions recovered, offline"
    );
    let (mut dash, present) = connect(&gw, DASHBOARD, &Connect::v4(DASHBOARD).persistent(0)).await;
    assert!(present);
    let got = receive(&mut dash, false, 3).await;
    let payloads: Vec<_> = got.iter().map(|r| r.payload.clone()).collect();
    assert_eq!(payloads, [b"t0".to_vec(), b"t1".to_vec(), b"t2".to_vec()]);
    let (mut sub, present) = connect(&gw, DEVICE, &Connect::v5(DEVICE).persistent(3600)).await;
    assert!(present);
    let p = sub.recv().await;
    assert_eq!(
        (p.kind, p.pkid()),
        (kind::PUBREL, rel_pkid.unwrap()),
        "only the PUBREL again, with the same packet id"
    );
    sub.send(&raw::pubcomp(rel_pkid.unwrap())).await.unwrap();
    assert!(sub.recv_within(Duration::from_millis(300)).await.is_err());
    // The subscriptions came back too.
    let mut dev = gw.raw_connected(OTHER, &Connect::v4(OTHER)).await;
    dev.publish_qos1(false, "devices/dev-00002/telemetry", 9, b"after")
        .await;
    assert_eq!(receive(&mut dash, false, 1).await[0].payload, b"after");
    gw.stop().await;
}

#[tokio::test]
async fn retained_messages_go_to_new_subscriptions_as_retain_handling_says_and_are_cleared() {
    let gw = gateway().await;
    let mut dev = gw.raw_connected(DEVICE, &Connect::v5(DEVICE)).await;
    for (t, p) in [("telemetry", "r1"), ("other", "not matched")] {
        let topic = format!("devices/dev-00001/{t}");
        dev.publish(&Publish::new(true, &topic, p.as_bytes()).qos(1, 1).retain())
            .await;
        assert_eq!(dev.recv().await.kind, kind::PUBACK);
    }
    // A newer retained message replaces the older one of the same topic.
    dev.publish(
        &Publish::new(true, "devices/dev-00001/telemetry", b"r2")
            .qos(1, 2)
            .retain(),
    )
    .await;
    assert_eq!(dev.recv().await.kind, kind::PUBACK);
    gw.wait_until("two retained topics", WAIT, |g| {
        g.sessions.retained_counts().0 == 2
    })
    .await;

    // 3.1.1: sent on subscribe with the retain flag, at the lower QoS.
    let mut dash = gw.raw_connected(DASHBOARD, &Connect::v4(DASHBOARD)).await;
    subscribe(&mut dash, false, "devices/+/telemetry", 0).await;
    let r = dash.recv().await.publish(false);
    assert_eq!(
        (r.payload.as_slice(), r.retain, r.qos),
        (&b"r2"[..], true, 0)
    );
    assert!(dash.recv_within(Duration::from_millis(200)).await.is_err());
    // Live deliveries keep retain cleared (no retain-as-published).
    dev.publish(
        &Publish::new(true, "devices/dev-00001/telemetry", b"r3")
            .qos(1, 3)
            .retain(),
    )
    .await;
    let live = dash.recv().await.publish(false);
    assert_eq!((live.payload.as_slice(), live.retain), (&b"r3"[..], false));
    drop(dash);

    // MQTT 5 retain handling: 1 sends only for a new subscription, 2 never.
    let mut d5 = gw.raw_connected(DASHBOARD, &Connect::v5(DASHBOARD)).await;
    d5.send(&raw::subscribe_with(
        true,
        1,
        &[("devices/+/telemetry", 0x11)],
    ))
    .await
    .unwrap();
    assert_eq!(d5.recv().await.suback_codes(true), [1]);
    let r = d5.recv().await.publish(true);
    assert_eq!((r.payload.as_slice(), r.retain), (&b"r3"[..], true));
    d5.send(&raw::puback(r.pkid)).await.unwrap();
    d5.send(&raw::subscribe_with(
        true,
        2,
        &[("devices/+/telemetry", 0x11)],
    ))
    .await
    .unwrap();
    assert_eq!(d5.recv().await.suback_codes(true), [1]);
    assert!(
        d5.recv_within(Duration::from_millis(200)).await.is_err(),
        "retain handling 1: not again for an existing subscription"
    );
    d5.send(&raw::subscribe_with(
        true,
        3,
        &[("devices/dev-00001/telemetry", 0x21)],
    ))
    .await
    .unwrap();
    assert_eq!(d5.recv().await.suback_codes(true), [1]);
    assert!(
        d5.recv_within(Duration::from_millis(200)).await.is_err(),
        "retain handling 2: never"
    );
    drop(d5);

    // An empty retained publish clears the topic.
    dev.publish(
        &Publish::new(true, "devices/dev-00001/telemetry", b"")
            .qos(1, 4)
            .retain(),
    )
    .await;
    assert_eq!(dev.recv().await.kind, kind::PUBACK);
    gw.wait_until("one retained topic left", WAIT, |g| {
        g.sessions.retained_counts().0 == 1
    })
    .await;
    let mut dash = gw.raw_connected(DASHBOARD, &Connect::v4(DASHBOARD)).await;
    subscribe(&mut dash, false, "devices/+/telemetry", 1).await;
    assert!(dash.recv_within(Duration::from_millis(200)).await.is_err());
    gw.stop().await;
}

#[tokio::test]
async fn retained_messages_are_bounded_and_survive_a_restart() {
    let gw = TestGateway::start(|c, _| {
        c.sessions.max_retained_messages = 2;
    })
    .await;
    let mut dev = gw.raw_connected(DEVICE, &Connect::v4(DEVICE)).await;
    for (i, t) in ["a", "b", "c"].iter().enumerate() {
        let topic = format!("devices/dev-00001/commands/{t}");
        dev.publish(
            &Publish::new(false, &topic, t.as_bytes())
                .qos(1, i as u16 + 1)
                .retain(),
        )
        .await;
        assert_eq!(dev.recv().await.kind, kind::PUBACK);
    }
    gw.wait_until("the third to be refused", WAIT, |g| {
        g.sessions.stats.retained_refused.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(gw.sessions.retained_counts().0, 2);
    assert_eq!(gw.records().len(), 3, "all three stored for the uplinks");
    drop(dev);
    let gw = gw.restart().await;
    assert_eq!(gw.sessions.retained_counts().0, 2, "recovered");
    let mut sub = gw.raw_connected(DEVICE, &Connect::v4(DEVICE)).await;
    subscribe(&mut sub, false, "devices/dev-00001/commands/#", 1).await;
    let got = receive(&mut sub, false, 2).await;
    let payloads: Vec<_> = got.iter().map(|r| r.payload.clone()).collect();
    assert_eq!(payloads, [b"a".to_vec(), b"b".to_vec()]);
    assert!(got.iter().all(|r| r.retain));
    gw.stop().await;
}

#[tokio::test]
async fn a_will_reaches_subscribers_and_the_uplinks() {
    let gw = gateway().await;
    let mut dash = gw.raw_connected(DASHBOARD, &Connect::v4(DASHBOARD)).await;
    // dev-00002 may subscribe to its own command tree only; the dashboard to telemetry.
    subscribe(&mut dash, false, "devices/+/telemetry", 1).await;
    let mut dev = gw.raw(Some(DEVICE)).await;
    let ack = dev
        .connect(&Connect::v4(DEVICE).will("devices/dev-00001/telemetry", b"gone", 1))
        .await;
    assert_eq!(ack.connack_code(), 0);
    drop(dev); // no DISCONNECT: the will is published
    let got = receive(&mut dash, false, 1).await;
    assert_eq!(got[0].payload, b"gone");
    assert_eq!(gw.wait_records(1).await[0].payload, b"gone");
    gw.stop().await;
}

/// Every device may publish under its own tree and subscribe to every device's.
async fn open_gateway(tweak: impl FnOnce(&mut gateway::config::Config)) -> TestGateway {
    TestGateway::start(|c, _| {
        c.acl = vec![AclRule {
            identity: "*".into(),
            publish: vec!["devices/%c/#".into()],
            subscribe: vec!["devices/#".into()],
        }];
        tweak(c);
    })
    .await
}

#[tokio::test]
async fn overlapping_subscriptions_deliver_each_message_once_at_the_highest_matching_qos() {
    let gw = open_gateway(|_| {}).await;
    for v5 in [false, true] {
        let connect = |id| {
            if v5 {
                Connect::v5(id)
            } else {
                Connect::v4(id)
            }
        };
        let mut sub = gw.raw_connected(DASHBOARD, &connect(DASHBOARD)).await;
        sub.send(&raw::subscribe_with(
            v5,
            1,
            &[("devices/#", 0), ("devices/+/telemetry", 2)],
        ))
        .await
        .unwrap();
        assert_eq!(sub.recv().await.suback_codes(v5), [0, 2]);
        let mut dev = gw.raw_connected(DEVICE, &connect(DEVICE)).await;
        let telemetry = "devices/dev-00001/telemetry";
        let status = "devices/dev-00001/status";
        dev.publish(&Publish::new(v5, telemetry, b"t0")).await;
        dev.publish_qos1(v5, telemetry, 1, b"t1").await;
        for (topic, pkid, payload) in [(telemetry, 2, &b"t2"[..]), (status, 3, b"s2")] {
            dev.publish(&Publish::new(v5, topic, payload).qos(2, pkid))
                .await;
            assert_eq!(dev.recv().await.kind, kind::PUBREC);
            dev.send(&raw::pubrel(pkid)).await.unwrap();
            assert_eq!(dev.recv().await.kind, kind::PUBCOMP);
        }
        dev.publish_qos1(v5, status, 4, b"s1").await;

        // Each once, at min(2, published) where both filters match, at 0 where only devices/#.
        let mut got = Vec::new();
        while got.len() < 5 {
            let p = sub.recv().await;
            match p.kind {
                kind::PUBLISH => {
                    let r = p.publish(v5);
                    match r.qos {
                        1 => sub.send(&raw::puback(r.pkid)).await.unwrap(),
                        2 => sub.send(&raw::pubrec(r.pkid)).await.unwrap(),
                        _ => {}
                    }
                    got.push((r.topic, String::from_utf8(r.payload).unwrap(), r.qos));
                }
                kind::PUBREL => sub.send(&raw::pubcomp(p.pkid())).await.unwrap(),
                _ => panic!("unexpected {p:?}"),
            }
        }
        let m = |t: &str, p: &str, q| (t.to_string(), p.to_string(), q);
        assert_eq!(
            got,
            [
                m(telemetry, "t0", 0),
                m(telemetry, "t1", 1),
                m(telemetry, "t2", 2),
                m(status, "s2", 0),
                m(status, "s1", 0),
            ],
            "v5 {v5}"
        );
        // The last PUBREL, then nothing more: no message twice.
        loop {
            match sub.recv_within(Duration::from_millis(300)).await {
                Ok(p) if p.kind == kind::PUBREL => sub.send(&raw::pubcomp(p.pkid())).await.unwrap(),
                Ok(p) => panic!("v5 {v5}: nothing more expected, got {p:?}"),
                Err(_) => break,
            }
        }
        sub.send(&raw::DISCONNECT).await.unwrap();
        dev.send(&raw::DISCONNECT).await.unwrap();
        gw.wait_disconnected().await;
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_subscriber_that_never_reads_holds_up_no_publisher_under_full_load_and_is_bounded() {
    let (max_queued, max_inflight) = (200usize, 16u16);
    let gw = open_gateway(|c| {
        c.sessions.max_queued_messages = max_queued;
        c.sessions.max_inflight = max_inflight;
    })
    .await;
    let sessions = gw.sessions.clone();
    // Subscribes at QoS 1, then never reads again (its socket buffers fill) and never acks.
    let mut stuck = gw.raw_connected(DASHBOARD, &Connect::v5(DASHBOARD)).await;
    stuck
        .send(&raw::subscribe_with(true, 1, &[("devices/+/telemetry", 1)]))
        .await
        .unwrap();
    assert_eq!(stuck.recv().await.suback_codes(true), [1]);

    // Three publishers at once, each with up to 64 QoS 1 publishes unacknowledged.
    let per_publisher = 1500u16;
    let mut publishers = Vec::new();
    for dev in ["dev-00001", "dev-00002", "dev-00003"] {
        let mut c = gw.raw_connected(dev, &Connect::v4(dev)).await;
        let topic = format!("devices/{dev}/telemetry");
        publishers.push(tokio::spawn(async move {
            let payload = vec![b'x'; 512];
            let (mut sent, mut acked) = (0u16, 0u16);
            while acked < per_publisher {
                while sent < per_publisher && sent - acked < 64 {
                    sent += 1;
                    c.publish(&Publish::new(false, &topic, &payload).qos(1, sent))
                        .await;
                }
                let ack = c.recv().await;
                acked += 1;
                assert_eq!((ack.kind, ack.pkid()), (kind::PUBACK, acked));
            }
            c.send(&raw::DISCONNECT).await.unwrap();
        }));
    }
    for p in publishers {
        tokio::time::timeout(Duration::from_secs(30), p)
            .await
            .expect("every PUBACK within 30 s")
            .unwrap();
    }
    let total = 3 * u64::from(per_publisher);
    gw.wait_until("the router to take every record", WAIT, |_| {
        sessions.stats.routed.load(Ordering::SeqCst) >= total
    })
    .await;
    assert_eq!(sessions.stats.matched.load(Ordering::SeqCst), total);
    let refused = sessions.stats.refused_full.load(Ordering::SeqCst);
    let held = (max_queued + usize::from(max_inflight)) as u64;
    assert!(
        refused >= total - held,
        "the bound holds at most {held} for it; the rest are refused and counted: {refused}"
    );
    assert!(refused < total, "it got some: {refused}");
    assert_eq!(gw.records().len() as u64, total, "every publish stored");
    // The publishers leave; the stuck subscriber is still connected.
    gw.wait_until("only the stuck subscriber to be connected", WAIT, |g| {
        g.stats.connected.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(sessions.counts().0, 1);
    drop(stuck);
    gw.stop().await;
}
