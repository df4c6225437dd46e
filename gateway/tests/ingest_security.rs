//! Who may connect and what they may publish, over real TLS: ACL denials, client certificates
//! from an unknown CA or past their validity, a client id that is not the certificate's CN,
//! plaintext MQTT on the TLS port, and password files.
#![allow(clippy::unwrap_used)]

mod ingest_support;

use std::time::{Duration, SystemTime};

use gateway::certs::DevCa;
use ingest_support::raw::{self, kind, Connect, Publish, RecvError, WAIT};
use ingest_support::{client_tls, client_tls_pem, require_client_cert, TestGateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEV: &str = "dev-00001";
const TOPIC: &str = "devices/dev-00001/telemetry";
const OTHERS_TOPIC: &str = "devices/dev-00002/telemetry";

#[tokio::test]
async fn acl_denial_in_mqtt5_is_puback_0x87_and_nothing_is_stored() {
    let gw = TestGateway::start(|_, _| {}).await;
    let mut c = gw.raw_connected(DEV, &Connect::v5(DEV)).await;

    c.publish(&Publish::new(true, OTHERS_TOPIC, b"denied-1").qos(1, 1))
        .await;
    let ack = c.recv().await;
    assert_eq!(
        (ack.kind, ack.pkid(), ack.ack_reason()),
        (kind::PUBACK, 1, 0x87),
        "PUBACK Not authorized: {ack:?}"
    );
    c.publish(&Publish::new(true, OTHERS_TOPIC, b"denied-2").qos(2, 2))
        .await;
    let rec = c.recv().await;
    assert_eq!(
        (rec.kind, rec.pkid(), rec.ack_reason()),
        (kind::PUBREC, 2, 0x87),
        "PUBREC Not authorized: {rec:?}"
    );
    c.publish(&Publish::new(true, OTHERS_TOPIC, b"denied-0"))
        .await;
    // Outside devices/%c/# in other ways too.
    for (pkid, topic) in [(3, "elsewhere/dev-00001/t"), (4, "devices/dev-000012/t")] {
        c.publish(&Publish::new(true, topic, b"denied").qos(1, pkid))
            .await;
        assert_eq!(c.recv().await.ack_reason(), 0x87, "{topic}");
    }

    // The session goes on.
    let ok = c.publish_qos1(true, TOPIC, 5, b"allowed").await;
    assert_eq!(ok.ack_reason(), 0);
    gw.wait_refused("acl", 5).await;
    let records = gw.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].payload, b"allowed");
    gw.stop().await;
}

#[tokio::test]
async fn acl_denial_in_mqtt311_closes_the_connection_and_nothing_is_stored() {
    let gw = TestGateway::start(|_, _| {}).await;
    let mut c = gw.raw_connected(DEV, &Connect::v4(DEV)).await;
    c.publish_qos1(false, TOPIC, 1, b"allowed").await;
    c.publish(&Publish::new(false, OTHERS_TOPIC, b"denied").qos(1, 2))
        .await;
    let got = c.until_closed(WAIT).await;
    assert_eq!(
        got,
        [],
        "3.1.1 cannot refuse a publish: no PUBACK, just the close"
    );
    gw.wait_refused("acl", 1).await;
    let records = gw.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].payload, b"allowed");
    gw.stop().await;
}

/// Asserts that a TLS client was refused: the handshake failed, or (TLS 1.3, where the client
/// finishes before the server has checked its certificate) the first read ends the connection
/// without any MQTT packet.
async fn assert_refused_by_tls(result: std::io::Result<raw::TlsRaw>) {
    let Ok(mut c) = result else { return };
    let _ = c.send(&Connect::v4(DEV).encode()).await;
    match c.recv_within(WAIT).await {
        Err(RecvError::Closed(_)) => {}
        other => panic!("expected the TLS layer to refuse the client, got {other:?}"),
    }
}

#[tokio::test]
async fn client_certificate_from_an_unknown_ca_is_rejected() {
    let gw = TestGateway::start(|c, _| require_client_cert(c)).await;
    let (stranger_ca, _) = DevCa::new().unwrap();
    let (cert, key) = stranger_ca.device_cert(DEV).unwrap();
    let tls = client_tls_pem(&gw.certs, &cert, &key);
    assert_refused_by_tls(raw::tls_connect(gw.addr, tls).await).await;
    gw.wait_refused("tls", 1).await;

    // Without any certificate: refused as well.
    let result = raw::tls_connect(gw.addr, client_tls(&gw.certs, None)).await;
    assert_refused_by_tls(result).await;
    gw.wait_refused("tls", 2).await;

    // The CA's own device certificate still gets in.
    let mut ok = gw.raw_connected(DEV, &Connect::v4(DEV)).await;
    ok.publish_qos1(false, TOPIC, 1, b"trusted").await;
    assert_eq!(gw.records().len(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn expired_client_certificate_is_rejected() {
    let gw = TestGateway::start(|c, _| require_client_cert(c)).await;
    let ca = DevCa::load(&gw.certs).unwrap();
    let month_ago = SystemTime::now() - Duration::from_secs(30 * 86_400);
    let (cert, key) = ca
        .device_cert_valid(DEV, month_ago, Duration::from_secs(86_400))
        .unwrap();
    let tls = client_tls_pem(&gw.certs, &cert, &key);
    assert_refused_by_tls(raw::tls_connect(gw.addr, tls).await).await;
    gw.wait_refused("tls", 1).await;

    // Not yet valid is no better.
    let next_week = SystemTime::now() + Duration::from_secs(7 * 86_400);
    let (cert, key) = ca
        .device_cert_valid(DEV, next_week, Duration::from_secs(365 * 86_400))
        .unwrap();
    let tls = client_tls_pem(&gw.certs, &cert, &key);
    assert_refused_by_tls(raw::tls_connect(gw.addr, tls).await).await;
    gw.wait_refused("tls", 2).await;
    assert!(gw.records().is_empty());
    gw.stop().await;
}

#[tokio::test]
async fn client_id_other_than_the_certificate_cn_is_refused_in_connack() {
    let gw = TestGateway::start(|c, _| require_client_cert(c)).await;
    // dev-00001's certificate, dev-00002's client id.
    let mut c = gw.raw(Some(DEV)).await;
    let ack = c.connect(&Connect::v4("dev-00002")).await;
    assert_eq!(ack.connack_code(), 0x02, "3.1.1: identifier rejected");
    assert_eq!(c.until_closed(WAIT).await, []);

    let mut c = gw.raw(Some(DEV)).await;
    let ack = c.connect(&Connect::v5("dev-00002")).await;
    assert_eq!(
        ack.connack_code(),
        0x85,
        "MQTT 5: client identifier not valid"
    );
    assert_eq!(c.until_closed(WAIT).await, []);

    gw.wait_refused("client_id", 2).await;
    assert!(gw.records().is_empty());
    gw.stop().await;
}

#[tokio::test]
async fn plaintext_mqtt_to_the_tls_port_fails_the_handshake() {
    let gw = TestGateway::start(|_, _| {}).await;
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    tcp.write_all(&Connect::v4(DEV).encode()).await.unwrap();
    // Whatever comes back (a TLS alert at most) ends in a close, and is not MQTT.
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, tcp.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the gateway kept a plaintext client open");
    assert_ne!(
        answer.first(),
        Some(&0x20),
        "a CONNACK in plaintext: {answer:x?}"
    );
    gw.wait_refused("tls", 1).await;

    // The listener serves TLS clients as before.
    let mut ok = gw.raw_connected(DEV, &Connect::v4(DEV)).await;
    ok.publish_qos1(false, TOPIC, 1, b"after plaintext").await;
    gw.stop().await;
}

#[tokio::test]
async fn password_file_lets_in_good_passwords_and_refuses_bad_ones() {
    let gw = TestGateway::start(|c, dir| {
        let file = dir.join("passwd");
        gateway::ingest::auth::set_password(&file, "alice", "s3cret").unwrap();
        gateway::ingest::auth::set_password(&file, "bob", "hunter2").unwrap();
        c.auth.password_file = Some(file);
    })
    .await;
    // No client certificate: the password decides.
    let anonymous_tls = client_tls(&gw.certs, None);
    let dial = || raw::tls_connect(gw.addr, anonymous_tls.clone());

    let mut alice = dial().await.unwrap();
    let ack = alice
        .connect(&Connect::v4("alice").login("alice", "s3cret"))
        .await;
    assert_eq!(ack.connack_code(), 0);
    alice
        .publish_qos1(false, "devices/alice/temp", 1, b"21.5")
        .await;

    let mut bob = dial().await.unwrap();
    let ack = bob
        .connect(&Connect::v5("bob").login("bob", "hunter2"))
        .await;
    assert_eq!(ack.connack_code(), 0);
    bob.publish_qos1(true, "devices/bob/temp", 1, b"19.0").await;

    let refusals: [(Connect, u8, &str); 5] = [
        (
            Connect::v4("alice").login("alice", "wrong"),
            0x04,
            "3.1.1 bad password: bad user name or password",
        ),
        (
            Connect::v5("alice").login("alice", "wrong"),
            0x86,
            "MQTT 5 bad password: bad user name or password",
        ),
        (
            Connect::v4("mallory").login("mallory", "s3cret"),
            0x04,
            "unknown user",
        ),
        (
            Connect::v4("bob").login("bob", "s3cret"),
            0x04,
            "another user's password",
        ),
        (
            Connect::v4("sensor-9"),
            0x05,
            "no credentials: not authorized",
        ),
    ];
    for (connect, code, what) in &refusals {
        let mut c = dial().await.unwrap();
        let ack = c.connect(connect).await;
        assert_eq!(ack.connack_code(), *code, "{what}");
        assert_eq!(
            c.until_closed(WAIT).await,
            [],
            "{what}: closed after CONNACK"
        );
    }
    gw.wait_refused("auth", refusals.len() as u64).await;

    let records = gw.records();
    assert_eq!(records.len(), 2);
    assert_eq!(
        (
            records[0].device_id.as_str(),
            records[0].username.as_deref()
        ),
        ("alice", Some("alice"))
    );
    assert_eq!(
        (
            records[1].device_id.as_str(),
            records[1].username.as_deref()
        ),
        ("bob", Some("bob"))
    );
    gw.stop().await;
}

#[tokio::test]
async fn will_topic_outside_the_acl_is_refused_at_connect() {
    let gw = TestGateway::start(|_, _| {}).await;
    let mut c = gw.raw(Some(DEV)).await;
    let ack = c
        .connect(&Connect::v4(DEV).will(OTHERS_TOPIC, b"w", 1))
        .await;
    assert_eq!(ack.connack_code(), 0x05, "3.1.1: not authorized");
    assert_eq!(c.until_closed(WAIT).await, []);

    let mut c = gw.raw(Some(DEV)).await;
    let ack = c
        .connect(&Connect::v5(DEV).will(OTHERS_TOPIC, b"w", 1))
        .await;
    assert_eq!(ack.connack_code(), 0x87, "MQTT 5: not authorized");
    assert_eq!(c.until_closed(WAIT).await, []);
    gw.wait_refused("acl", 2).await;
    assert!(gw.records().is_empty());
    gw.stop().await;
}
