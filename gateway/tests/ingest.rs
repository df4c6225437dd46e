//! MQTT ingest end to end: real clients over TLS to a gateway on 127.0.0.1:0, records checked in
//! the queue.
#![allow(clippy::unwrap_used)]

mod ingest_support;

use std::time::Duration;

use ingest_support::{v4_options, TestGateway};
use rumqttc::{AsyncClient, Event, Packet, QoS};

/// Publishes `n` QoS 1 messages and returns the packet ids PUBACKed.
async fn publish_and_collect_acks(
    client: &AsyncClient,
    eventloop: &mut rumqttc::EventLoop,
    topic: &str,
    n: usize,
) -> usize {
    for i in 0..n {
        client
            .publish(topic, QoS::AtLeastOnce, false, format!("m{i}"))
            .await
            .unwrap();
    }
    let mut acks = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while acks < n {
        let ev = tokio::time::timeout_at(deadline, eventloop.poll())
            .await
            .expect("acks within 10 s")
            .unwrap();
        if let Event::Incoming(Packet::PubAck(_)) = ev {
            acks += 1;
        }
    }
    acks
}

#[tokio::test]
async fn qos1_publishes_over_mutual_tls_are_acked_and_stored_in_order() {
    let gw = TestGateway::start(|_, _| {}).await;
    let (o, _tunnel) = v4_options(gw.addr, &gw.certs, "dev-00001").await;
    let (client, mut el) = AsyncClient::new(o, 100);
    let acks = publish_and_collect_acks(&client, &mut el, "devices/dev-00001/telemetry", 50).await;
    assert_eq!(acks, 50);
    // PUBACK means durable: every acked message is in the queue already.
    let records = gw.records();
    assert_eq!(records.len(), 50);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.payload, format!("m{i}").as_bytes());
        assert_eq!(r.device_id, "dev-00001");
        assert_eq!(r.topic, "devices/dev-00001/telemetry");
        assert_eq!(r.qos, 1);
    }
    assert_eq!(gw.stats.acks.load(std::sync::atomic::Ordering::Relaxed), 50);
    gw.stop().await;
}

/// Through the test TLS tunnel (`gateway::certs::tls_tunnel`) a refused certificate still looks
/// like a closed connection to rumqttc, as it does over rumqttc's own TLS: nothing is stored.
#[tokio::test]
async fn rumqttc_through_the_tunnel_with_a_refused_certificate_sees_the_connection_close() {
    let gw = TestGateway::start(|_, _| {}).await;
    let (stranger_ca, _) = gateway::certs::DevCa::new().unwrap();
    let (cert, key) = stranger_ca.device_cert("dev-00001").unwrap();
    let tunnel = gateway::certs::tls_tunnel(
        gw.addr,
        ingest_support::client_tls_pem(&gw.certs, &cert, &key),
    )
    .await
    .unwrap();
    let o = rumqttc::MqttOptions::new("dev-00001", "127.0.0.1", tunnel.addr.port());
    let (client, mut el) = AsyncClient::new(o, 10);
    client
        .publish("devices/dev-00001/telemetry", QoS::AtLeastOnce, false, "m")
        .await
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(c))) => panic!("connected: {c:?}"),
                Ok(_) => {}
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("the connection ends within 10 s");
    // Closed while rumqttc waits for its CONNACK (over rumqttc's TLS it would be the TLS alert's
    // I/O error instead: either way the connection is gone before CONNACK).
    assert!(
        matches!(
            closed,
            rumqttc::ConnectionError::Io(_)
                | rumqttc::ConnectionError::MqttState(rumqttc::StateError::ConnectionAborted)
        ),
        "{closed:?}"
    );
    assert!(gw.records().is_empty());
    gw.stop().await;
}

#[tokio::test]
async fn mosquitto_pub_with_a_device_certificate_lands_in_the_queue() {
    if std::process::Command::new("mosquitto_pub")
        .arg("--help")
        .output()
        .is_err()
    {
        panic!(
            "mosquitto_pub is missing: run the suite with `./run-tests` (the README's test \
             command), which installs Debian's mosquitto-clients"
        );
    }
    let gw = TestGateway::start(|_, _| {}).await;
    let certs = gw.certs.clone();
    let port = gw.addr.port().to_string();
    for (qos, version) in [
        ("0", "mqttv311"),
        ("1", "mqttv311"),
        ("2", "mqttv311"),
        ("1", "mqttv5"),
    ] {
        let out = tokio::process::Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-i",
                "dev-00002",
                "-q",
                qos,
                "-V",
                version,
            ])
            .arg("--cafile")
            .arg(certs.join("ca.pem"))
            .arg("--cert")
            .arg(certs.join("devices/dev-00002.pem"))
            .arg("--key")
            .arg(certs.join("devices/dev-00002.key"))
            .args(["-t", "devices/dev-00002/status", "-m"])
            .arg(format!("qos{qos}-{version}"))
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "mosquitto_pub failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let records = gw.wait_records(4).await;
    let payloads: Vec<String> = records
        .iter()
        .map(|r| String::from_utf8(r.payload.clone()).unwrap())
        .collect();
    assert_eq!(
        payloads,
        [
            "qos0-mqttv311",
            "qos1-mqttv311",
            "qos2-mqttv311",
            "qos1-mqttv5"
        ]
    );
    assert_eq!(
        records.iter().map(|r| r.qos).collect::<Vec<_>>(),
        [0, 1, 2, 1]
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_plaintext_listener_works_only_when_configured_with_tls_false() {
    let gw = TestGateway::start(|c, _| {
        c.listeners[0].tls = gateway::config::TlsSetting::Off(false);
        c.auth.allow_anonymous = true;
    })
    .await;
    let mut o = rumqttc::MqttOptions::new("plain-1", "127.0.0.1", gw.addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(o, 10);
    let acks = publish_and_collect_acks(&client, &mut el, "devices/plain-1/t", 3).await;
    assert_eq!(acks, 3);
    assert_eq!(gw.records().len(), 3);
    gw.stop().await;
}

#[tokio::test]
async fn a_missing_certificate_file_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let certs = ingest_support::make_certs(dir.path());
    let mut config = ingest_support::base_config(dir.path(), &certs);
    if let gateway::config::TlsSetting::On(t) = &mut config.listeners[0].tls {
        t.cert = dir.path().join("nope/server.pem");
    }
    let (queue, _) = gateway::queue::Queue::open(config.queue.to_options()).unwrap();
    let err = match gateway::ingest::Ingest::bind(&config, queue.clone()).await {
        Ok(_) => panic!("bind must fail without the certificate file"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("nope/server.pem"), "{err}");
    queue.close();
}
