//! Limits and bad input over real TLS: oversize packets, too many connections, clients that
//! never finish the TLS handshake or never send CONNECT, over-long topics, malformed bytes.
//! Each refusal is counted, and other connections never notice.
#![allow(clippy::unwrap_used)]

mod ingest_support;

use std::time::{Duration, Instant};

use ingest_support::raw::{self, Connect, Packet, Publish, RecvError, WAIT};
use ingest_support::{client_tls, TestGateway};
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEV: &str = "dev-00001";
const TOPIC: &str = "devices/dev-00001/telemetry";

/// A QoS 1 PUBLISH to [`TOPIC`] whose encoding is exactly `size` (128..16384) bytes.
fn sized_publish(v5: bool, size: usize, fill: u8, pkid: u16) -> Publish {
    let mut p = Publish::new(v5, TOPIC, &[]).qos(1, pkid);
    let overhead = p.encode().len() + 1; // the remaining length takes 2 bytes
    p.payload = vec![fill; size - overhead];
    assert_eq!(p.encode().len(), size);
    p
}

#[tokio::test]
async fn oversize_publish_is_refused_and_the_connection_closed() {
    let gw = TestGateway::start(|c, _| c.limits.max_packet_size = 1024).await;

    // MQTT 5: CONNACK says the limit; a packet within it is fine; a larger one gets
    // DISCONNECT 0x95 (packet too large) and the close.
    let mut c = gw.raw(Some(DEV)).await;
    let ack = c.connect(&Connect::v5(DEV)).await;
    assert_eq!(ack.connack_code(), 0);
    assert!(
        ack.connack_properties()
            .contains(&(0x27, 1024u32.to_be_bytes().to_vec())),
        "maximum packet size 1024 in CONNACK: {:?}",
        ack.connack_properties()
    );
    // Exactly 1024 bytes, fixed header included, is within the limit; one more is not.
    let fits = sized_publish(true, 1024, b'a', 1);
    c.publish(&fits).await;
    assert_eq!(c.recv().await.ack_reason(), 0, "a 1024-byte packet fits");
    c.publish(&sized_publish(true, 1025, b'b', 2)).await;
    let last = c.until_closed(WAIT).await;
    assert_eq!(last.len(), 1, "{last:?}");
    assert_eq!(last[0].disconnect_reason(), 0x95, "packet too large");
    gw.wait_refused("limit", 1).await;

    // 3.1.1: just the close.
    let mut c = gw.raw_connected(DEV, &Connect::v4(DEV)).await;
    c.publish(&Publish::new(false, TOPIC, &[b'c'; 5000]).qos(1, 3))
        .await;
    assert_eq!(c.until_closed(WAIT).await, []);
    gw.wait_refused("limit", 2).await;

    let records = gw.records();
    assert_eq!(
        records.len(),
        1,
        "only the packet within the limit is stored"
    );
    assert_eq!(records[0].payload, fits.payload);
    gw.stop().await;
}

#[tokio::test]
async fn connections_beyond_max_connections_are_refused() {
    let gw = TestGateway::start(|c, _| c.limits.max_connections = 2).await;
    let mut first = gw
        .raw_connected("dev-00001", &Connect::v4("dev-00001"))
        .await;
    let mut second = gw
        .raw_connected("dev-00002", &Connect::v5("dev-00002"))
        .await;

    // The third is dropped right after accept: its TLS handshake (or first read) fails.
    let third = raw::tls_connect(gw.addr, client_tls(&gw.certs, Some("dev-00003"))).await;
    if let Ok(mut c) = third {
        let _ = c.send(&Connect::v4("dev-00003").encode()).await;
        let got = c.recv_within(WAIT).await;
        assert!(matches!(got, Err(RecvError::Closed(_))), "{got:?}");
    }
    gw.wait_refused("limit", 1).await;

    // The two admitted connections are untouched.
    first
        .publish_qos1(false, "devices/dev-00001/t", 1, b"one")
        .await;
    second
        .publish_qos1(true, "devices/dev-00002/t", 1, b"two")
        .await;

    // When one leaves, a new device gets its place.
    first.send(&raw::DISCONNECT).await.unwrap();
    first.until_closed(WAIT).await;
    let deadline = Instant::now() + WAIT;
    let mut third = loop {
        let attempt = async {
            let mut c = gw.raw(Some("dev-00003")).await;
            c.send(&Connect::v4("dev-00003").encode()).await.ok()?;
            let ack = c.recv_within(WAIT).await.ok()?;
            (ack.connack_code() == 0).then_some(c)
        };
        if let Some(c) = attempt.await {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "the freed place was never given out"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    third
        .publish_qos1(false, "devices/dev-00003/t", 1, b"three")
        .await;
    assert_eq!(gw.records().len(), 3);
    gw.stop().await;
}

#[tokio::test]
async fn client_that_never_finishes_the_handshake_is_dropped_after_connect_timeout() {
    // Long enough that a working client's TLS handshake and publish (debug build, fsync, other
    // tests on the same 2 cores) fit well inside it: that client must not wait for the stalled.
    let timeout = Duration::from_secs(3);
    let gw = TestGateway::start(|c, _| c.limits.connect_timeout = timeout).await;
    let started = Instant::now();
    // Silent after the TCP connect.
    let mut silent = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    // Half a ClientHello: a handshake record header announcing 512 bytes, then nothing.
    let mut half = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .await
        .unwrap();

    // Meanwhile other devices connect and publish.
    let mut busy = gw.raw_connected(DEV, &Connect::v4(DEV)).await;
    busy.publish_qos1(false, TOPIC, 1, b"while others stall")
        .await;
    assert!(
        started.elapsed() < timeout,
        "the working client had to wait for the stalled ones ({:?})",
        started.elapsed()
    );

    for (what, stream) in [("silent", &mut silent), ("half a ClientHello", &mut half)] {
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(WAIT * 2, stream.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "{what}: still open after {:?}", WAIT * 2);
        let after = started.elapsed();
        assert!(
            after >= timeout - Duration::from_millis(100) && after <= timeout * 3,
            "{what}: dropped after {after:?}, expected about {timeout:?}"
        );
    }
    gw.wait_refused("timeout", 2).await;
    busy.publish_qos1(false, TOPIC, 2, b"still fine").await;
    gw.stop().await;
}

#[tokio::test]
async fn client_that_finishes_tls_but_never_sends_connect_is_dropped_after_connect_timeout() {
    let gw = TestGateway::start(|c, _| c.limits.connect_timeout = Duration::from_millis(500)).await;
    let started = Instant::now();
    let mut idle = gw.raw(Some(DEV)).await;
    let got = idle.recv_within(WAIT).await;
    let after = started.elapsed();
    assert!(matches!(got, Err(RecvError::Closed(_))), "{got:?}");
    // The upper bound leaves room for a loaded machine; a missing timeout would show as the
    // connection staying open for all of WAIT.
    assert!(
        after >= Duration::from_millis(400) && after <= Duration::from_millis(3500),
        "dropped after {after:?}, expected about 500 ms"
    );
    gw.wait_refused("timeout", 1).await;

    // A client that connects in time keeps its connection well past connect_timeout.
    let mut ok = gw.raw_connected(DEV, &Connect::v4(DEV)).await;
    assert!(ok.is_open_after(Duration::from_millis(800)).await);
    ok.publish_qos1(false, TOPIC, 1, b"in time").await;
    gw.stop().await;
}

#[tokio::test]
async fn topic_longer_than_max_topic_length_is_refused() {
    let gw = TestGateway::start(|c, _| c.limits.max_topic_length = 32).await;
    let longest = format!("devices/{DEV}/{}", "x".repeat(32 - 18));
    assert_eq!(longest.len(), 32);
    let long = format!("{longest}y");
    let mut c = gw.raw_connected(DEV, &Connect::v5(DEV)).await;
    c.publish_qos1(true, &longest, 1, b"just fits").await;
    c.publish(&Publish::new(true, &long, b"long").qos(1, 2))
        .await;
    let last = c.until_closed(WAIT).await;
    assert_eq!(last.len(), 1, "{last:?}");
    assert_eq!(last[0].disconnect_reason(), 0x90, "topic name invalid");
    gw.wait_refused("limit", 1).await;
    assert_eq!(gw.records().len(), 1, "only the topic within the limit");
    gw.stop().await;
}

/// Byte strings that are not valid MQTT after a successful CONNECT.
fn malformed_inputs() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "remaining length longer than 4 bytes",
            vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x01],
        ),
        (
            "topic length past the end of the packet",
            vec![0x32, 0x04, 0x00, 0x10, b'a', b'b'],
        ),
        ("reserved packet type 0", vec![0x00, 0x00]),
        (
            "PUBREL with reserved flags 0000",
            vec![0x60, 0x02, 0x00, 0x01],
        ),
        (
            "PUBLISH with QoS 3",
            vec![0x36, 0x07, 0x00, 0x01, b'a', 0x00, 0x01, b'x', b'y'],
        ),
        (
            "topic that is not UTF-8",
            vec![0x30, 0x05, 0x00, 0x02, 0xc3, 0x28, b'x'],
        ),
    ]
}

#[tokio::test]
async fn malformed_bytes_after_connect_close_that_connection_only() {
    let gw = TestGateway::start(|_, _| {}).await;
    let mut bystander = gw
        .raw_connected("dev-00002", &Connect::v5("dev-00002"))
        .await;
    let inputs = malformed_inputs();
    let mut pkid = 0;
    for v5 in [false, true] {
        for (what, bytes) in &inputs {
            let connect = if v5 {
                Connect::v5(DEV)
            } else {
                Connect::v4(DEV)
            };
            let mut c = gw.raw_connected(DEV, &connect).await;
            c.send(bytes).await.unwrap();
            let last: Vec<Packet> = c.until_closed(WAIT).await;
            if v5 {
                assert_eq!(last.len(), 1, "{what}: {last:?}");
                assert_eq!(
                    last[0].disconnect_reason(),
                    0x81,
                    "{what}: malformed packet"
                );
            } else {
                assert_eq!(last, [], "{what}");
            }
            // Everyone else goes on.
            pkid += 1;
            bystander
                .publish_qos1(true, "devices/dev-00002/t", pkid, what.as_bytes())
                .await;
        }
    }
    gw.wait_refused("malformed", 2 * inputs.len() as u64).await;
    assert_eq!(gw.records().len(), 2 * inputs.len());
    assert!(gw.records().iter().all(|r| r.device_id == "dev-00002"));
    gw.stop().await;
}

#[tokio::test]
async fn will_is_stored_when_the_gateway_closes_a_connection_for_bad_input() {
    let gw = TestGateway::start(|c, _| c.limits.max_packet_size = 1024).await;
    let (malformed, bytes) = malformed_inputs().swap_remove(1);
    let oversize = Publish::new(false, TOPIC, &[0; 2000]).qos(1, 1).encode();
    let denied = Publish::new(false, "devices/dev-00002/t", b"x")
        .qos(1, 1)
        .encode();
    let cases = [
        (malformed, bytes),
        ("oversize packet", oversize),
        ("3.1.1 publish outside the ACL", denied),
    ];
    for (what, bytes) in &cases {
        let connect = Connect::v4(DEV).will("devices/dev-00001/status", what.as_bytes(), 1);
        let mut c = gw.raw_connected(DEV, &connect).await;
        c.send(bytes).await.unwrap();
        c.until_closed(WAIT).await;
        gw.wait_disconnected().await;
    }
    let wills: Vec<String> = gw
        .records()
        .iter()
        .map(|r| String::from_utf8(r.payload.clone()).unwrap())
        .collect();
    assert_eq!(wills, cases.map(|(what, _)| what.to_string()));
    gw.stop().await;
}

#[tokio::test]
async fn random_bytes_from_many_devices_never_hurt_the_gateway() {
    let gw = TestGateway::start(|_, _| {}).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6d71_7474);
    for round in 0..60u16 {
        let v5 = round % 2 == 0;
        let connect = if v5 {
            Connect::v5(DEV)
        } else {
            Connect::v4(DEV)
        };
        let mut c = gw.raw_connected(DEV, &connect).await;
        let len = rng.gen_range(1..200);
        let mut junk: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        if round % 3 == 0 {
            // Keep a plausible first byte sometimes, so the junk gets past the fixed header.
            junk[0] = 0x30 | (junk[0] & 0x0f);
        }
        let _ = c.send(&junk).await;
        // Whatever it made of it, the gateway answers a well-formed client right after.
        drop(c);
        let mut ok = gw
            .raw_connected("dev-00002", &Connect::v4("dev-00002"))
            .await;
        ok.publish_qos1(false, "devices/dev-00002/t", round + 1, b"ok")
            .await;
    }
    let from_ok: usize = gw
        .records()
        .iter()
        .filter(|r| r.device_id == "dev-00002")
        .count();
    assert_eq!(from_ok, 60);
    gw.stop().await;
}
