//! MQTT 5 features of subscriptions (issue 11): subscription identifiers, message expiry while
//! queued, response topic and correlation data, reason strings. A raw client over TLS, so each
//! test sees the exact properties the gateway sends.

#![allow(clippy::unwrap_used)]

mod ingest_support;

use std::time::Duration;

use gateway::config::AclRule;
use ingest_support::raw::{self, kind, property_values, Connect, Publish, WAIT};
use ingest_support::TestGateway;

const DEVICE: &str = "dev-00001";
const SUBSCRIBER: &str = "dev-00005";

/// Property identifiers (MQTT 5 §2.2.2.2).
const SUBSCRIPTION_ID: u8 = 0x0B;
const SUBSCRIPTION_IDS_AVAILABLE: u8 = 0x29;

/// Every device may publish under its own tree and subscribe to every device's.
async fn gateway() -> TestGateway {
    TestGateway::start(|c, _| {
        c.acl = vec![AclRule {
            identity: "*".into(),
            publish: vec!["devices/%c/#".into()],
            subscribe: vec!["devices/#".into()],
        }];
    })
    .await
}

fn varint(n: usize) -> Vec<u8> {
    let mut b = Vec::new();
    raw::varint(n, &mut b);
    b
}

#[tokio::test]
async fn subscription_identifiers_of_every_matching_subscription_come_with_each_publish() {
    let gw = gateway().await;
    let mut dev = gw.raw_connected(DEVICE, &Connect::v5(DEVICE)).await;
    // A retained message before anyone subscribes.
    dev.publish(
        &Publish::new(true, "devices/dev-00001/status", b"up")
            .qos(1, 1)
            .retain(),
    )
    .await;
    assert_eq!(dev.recv().await.kind, kind::PUBACK);
    gw.wait_until("the retained message is kept", WAIT, |g| {
        g.sessions.retained_counts().0 == 1
    })
    .await;

    let mut sub = gw.raw(Some(SUBSCRIBER)).await;
    let ack = sub.connect(&Connect::v5(SUBSCRIBER)).await;
    assert_eq!(ack.connack_code(), 0);
    assert!(
        ack.connack_properties()
            .iter()
            .all(|(id, _)| *id != SUBSCRIPTION_IDS_AVAILABLE),
        "subscription identifiers available (the property's absence says so): {ack:?}"
    );
    // Two overlapping subscriptions with their own ids (one the largest allowed), and one
    // without an id.
    sub.send(&raw::subscribe_v5_props(
        1,
        &raw::subscription_id(5),
        &[("devices/+/telemetry", 1)],
    ))
    .await
    .unwrap();
    assert_eq!(sub.recv().await.suback_codes(true), [1]);
    sub.send(&raw::subscribe_v5_props(
        2,
        &raw::subscription_id(268_435_455),
        &[("devices/dev-00001/#", 1)],
    ))
    .await
    .unwrap();
    assert_eq!(sub.recv().await.suback_codes(true), [1]);
    // The retained message goes to the subscription that matched it, with its id.
    let r = sub.recv().await.publish(true);
    assert_eq!(
        (r.topic.as_str(), r.retain),
        ("devices/dev-00001/status", true)
    );
    assert_eq!(
        property_values(&r.properties, SUBSCRIPTION_ID),
        [varint(268_435_455)]
    );
    sub.send(&raw::puback(r.pkid)).await.unwrap();
    sub.send(&raw::subscribe_with(
        true,
        3,
        &[("devices/dev-00001/other", 0)],
    ))
    .await
    .unwrap();
    assert_eq!(sub.recv().await.suback_codes(true), [0]);

    dev.publish_qos1(true, "devices/dev-00001/telemetry", 2, b"both")
        .await;
    dev.publish_qos1(true, "devices/dev-00001/other", 3, b"one")
        .await;
    let both = sub.recv().await.publish(true);
    assert_eq!(both.payload, b"both");
    assert_eq!(
        property_values(&both.properties, SUBSCRIPTION_ID),
        [varint(5), varint(268_435_455)],
        "one PUBLISH carrying the ids of both matching subscriptions"
    );
    sub.send(&raw::puback(both.pkid)).await.unwrap();
    let one = sub.recv().await.publish(true);
    assert_eq!(one.payload, b"one");
    assert_eq!(
        property_values(&one.properties, SUBSCRIPTION_ID),
        [varint(268_435_455)],
        "the subscription without an id adds none"
    );
    sub.send(&raw::puback(one.pkid)).await.unwrap();
    assert!(sub.recv_within(Duration::from_millis(300)).await.is_err());
    gw.stop().await;
}

#[tokio::test]
async fn a_subscription_identifier_of_0_is_a_protocol_error() {
    let gw = gateway().await;
    let mut sub = gw.raw_connected(SUBSCRIBER, &Connect::v5(SUBSCRIBER)).await;
    sub.send(&raw::subscribe_v5_props(
        1,
        &raw::subscription_id(0),
        &[("devices/#", 1)],
    ))
    .await
    .unwrap();
    let got = sub.until_closed(WAIT).await;
    let d = got.last().expect("a DISCONNECT before the close");
    assert_eq!(d.disconnect_reason(), 0x82, "{got:?}");
    gw.stop().await;
}

#[tokio::test]
async fn subscription_identifiers_survive_a_restart_with_the_stored_session() {
    let gw = gateway().await;
    let mut sub = gw
        .raw_connected(SUBSCRIBER, &Connect::v5(SUBSCRIBER).persistent(600))
        .await;
    sub.send(&raw::subscribe_v5_props(
        1,
        &raw::subscription_id(77),
        &[("devices/+/telemetry", 1)],
    ))
    .await
    .unwrap();
    assert_eq!(sub.recv().await.suback_codes(true), [1]);
    sub.send(&raw::DISCONNECT).await.unwrap();
    gw.wait_disconnected().await;
    let gw = gw.restart().await;
    let mut dev = gw.raw_connected(DEVICE, &Connect::v5(DEVICE)).await;
    dev.publish_qos1(true, "devices/dev-00001/telemetry", 1, b"later")
        .await;
    let mut sub = gw.raw(Some(SUBSCRIBER)).await;
    let ack = sub.connect(&Connect::v5(SUBSCRIBER).persistent(600)).await;
    assert!(ack.session_present());
    let r = sub.recv().await.publish(true);
    assert_eq!(r.payload, b"later");
    assert_eq!(
        property_values(&r.properties, SUBSCRIPTION_ID),
        [varint(77)]
    );
    gw.stop().await;
}
