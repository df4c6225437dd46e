//! No device speaks for another (issue 15, item 1), over real TLS: a password login may use only
//! the client ids its username owns (`[auth] client_id`), a session can be taken over only by
//! the identity it belongs to, and the device id of every stored record is one its identity owns.
#![allow(clippy::unwrap_used)]

mod ingest_support;

use std::sync::atomic::Ordering;

use gateway::config::Config;
use ingest_support::raw::{self, Connect, WAIT};
use ingest_support::{client_tls, TestGateway};

const DEV: &str = "dev-00001";
const TOPIC: &str = "devices/dev-00001/telemetry";

fn passwords(c: &mut Config, dir: &std::path::Path) {
    let file = dir.join("passwd");
    gateway::ingest::auth::set_password(&file, "alice", "s3cret").unwrap();
    gateway::ingest::auth::set_password(&file, "bob", "hunter2").unwrap();
    c.auth.password_file = Some(file);
}

/// A TLS client without a certificate (the password, or nothing, decides).
async fn dial(gw: &TestGateway) -> raw::TlsRaw {
    raw::tls_connect(gw.addr, client_tls(&gw.certs, None))
        .await
        .unwrap()
}

fn takeovers_refused(gw: &TestGateway) -> u64 {
    gw.stats.takeovers_refused.load(Ordering::SeqCst)
}

/// The report: alice logs in with a password under dev-00001's client id, to store
/// records as dev-00001 and take over its session. Refused, in both protocol versions; the real
/// dev-00001 (certificate) stays connected; alice under her own name gets in.
#[tokio::test]
async fn a_password_login_under_another_devices_client_id_is_refused() {
    let gw = TestGateway::start(passwords).await;
    let mut victim = gw.raw_connected(DEV, &Connect::v4(DEV)).await;

    let mut c = dial(&gw).await;
    let ack = c.connect(&Connect::v4(DEV).login("alice", "s3cret")).await;
    assert_eq!(ack.connack_code(), 0x02, "3.1.1: identifier rejected");
    assert_eq!(c.until_closed(WAIT).await, []);

    let mut c = dial(&gw).await;
    let ack = c.connect(&Connect::v5(DEV).login("alice", "s3cret")).await;
    assert_eq!(
        ack.connack_code(),
        0x85,
        "MQTT 5: client identifier not valid"
    );
    assert_eq!(c.until_closed(WAIT).await, []);

    // bob's name is bob's, not alice's.
    let mut c = dial(&gw).await;
    let ack = c
        .connect(&Connect::v4("bob").login("alice", "s3cret"))
        .await;
    assert_eq!(ack.connack_code(), 0x02);
    gw.wait_refused("client_id", 3).await;
    assert_eq!(gw.stats.takeovers.load(Ordering::SeqCst), 0);

    // The victim was never disturbed.
    let ack = victim.publish_qos1(false, TOPIC, 1, b"still here").await;
    assert_eq!(ack.ack_reason(), 0);

    // alice under her own client id: in, and her records carry her id.
    let mut alice = dial(&gw).await;
    let ack = alice
        .connect(&Connect::v4("alice").login("alice", "s3cret"))
        .await;
    assert_eq!(ack.connack_code(), 0);
    alice
        .publish_qos1(false, "devices/alice/telemetry", 1, b"mine")
        .await;
    let records = gw.wait_records(2).await;
    let who: Vec<_> = records
        .iter()
        .map(|r| (r.device_id.as_str(), r.username.as_deref(), &r.payload[..]))
        .collect();
    assert_eq!(
        who,
        [
            (DEV, None, &b"still here"[..]),
            ("alice", Some("alice"), &b"mine"[..])
        ]
    );
    gw.stop().await;
}

/// With `client_id = "%u-*"` a user owns a namespace: several devices share one login, none
/// can step outside it, and a device that sends no client id is given one inside it.
#[tokio::test]
async fn a_client_id_pattern_gives_each_user_a_namespace() {
    let gw = TestGateway::start(|c, dir| {
        passwords(c, dir);
        c.auth.client_id = "%u-*".into();
    })
    .await;
    let mut a1 = dial(&gw).await;
    let ack = a1
        .connect(&Connect::v4("alice-1").login("alice", "s3cret"))
        .await;
    assert_eq!(ack.connack_code(), 0);
    let mut a2 = dial(&gw).await;
    let ack = a2
        .connect(&Connect::v5("alice-2").login("alice", "s3cret"))
        .await;
    assert_eq!(ack.connack_code(), 0);

    for (id, what) in [("bob-1", "another user's namespace"), ("alice", "no '-'")] {
        let mut c = dial(&gw).await;
        let ack = c.connect(&Connect::v5(id).login("alice", "s3cret")).await;
        assert_eq!(ack.connack_code(), 0x85, "{what}");
    }
    gw.wait_refused("client_id", 2).await;

    // No client id: MQTT 5 is told the one assigned, inside alice's namespace.
    let mut a3 = dial(&gw).await;
    let ack = a3.connect(&Connect::v5("").login("alice", "s3cret")).await;
    assert_eq!(ack.connack_code(), 0);
    let assigned = ack
        .connack_properties()
        .into_iter()
        .find(|(id, _)| *id == 0x12)
        .map(|(_, v)| String::from_utf8(v[2..].to_vec()).unwrap())
        .expect("assigned client identifier");
    assert!(assigned.starts_with("alice-"), "{assigned}");

    a1.publish_qos1(false, "devices/alice-1/t", 1, b"1").await;
    a2.publish_qos1(true, "devices/alice-2/t", 1, b"2").await;
    a3.publish_qos1(true, &format!("devices/{assigned}/t"), 1, b"3")
        .await;
    let records = gw.wait_records(3).await;
    let ids: Vec<_> = records.iter().map(|r| r.device_id.clone()).collect();
    assert_eq!(ids, ["alice-1".to_string(), "alice-2".into(), assigned]);
    gw.stop().await;
}

/// An anonymous device (allowed) tries the client id of a certificate device: while that
/// device is connected, and after it left a persistent session behind. Refused both times with
/// "not valid"; the owner stays connected, and later resumes its session.
#[tokio::test]
async fn anonymous_devices_cannot_take_over_a_certificate_devices_session() {
    let gw = TestGateway::start(|c, _| c.auth.allow_anonymous = true).await;
    let mut victim = gw
        .raw_connected(DEV, &Connect::v5(DEV).persistent(3600))
        .await;

    let mut c = dial(&gw).await;
    let ack = c.connect(&Connect::v5(DEV)).await;
    assert_eq!(ack.connack_code(), 0x85);
    assert_eq!(c.until_closed(WAIT).await, []);
    let mut c = dial(&gw).await;
    let ack = c.connect(&Connect::v4(DEV)).await;
    assert_eq!(ack.connack_code(), 0x02);
    gw.wait_refused("client_id", 2).await;
    assert_eq!(takeovers_refused(&gw), 2);
    assert_eq!(gw.stats.takeovers.load(Ordering::SeqCst), 0);

    let ack = victim.publish_qos1(true, TOPIC, 1, b"owner").await;
    assert_eq!(ack.ack_reason(), 0, "the victim is still connected");
    drop(victim);
    gw.wait_disconnected().await;

    // Offline, its session is still its own: an anonymous clean start may not end it.
    let mut c = dial(&gw).await;
    let ack = c.connect(&Connect::v4(DEV)).await;
    assert_eq!(ack.connack_code(), 0x02);
    gw.wait_refused("client_id", 3).await;

    // The owner comes back to its session.
    let mut owner = gw.raw(Some(DEV)).await;
    let ack = owner.connect(&Connect::v5(DEV).persistent(3600)).await;
    assert_eq!(ack.connack_code(), 0);
    assert!(ack.session_present(), "the session was kept for its owner");

    // Anonymous devices under their own ids are fine.
    let mut anon = dial(&gw).await;
    assert_eq!(
        anon.connect(&Connect::v4("sensor-x")).await.connack_code(),
        0
    );
    anon.publish_qos1(false, "devices/sensor-x/t", 1, b"anon")
        .await;
    let ids: Vec<_> = gw
        .wait_records(2)
        .await
        .iter()
        .map(|r| r.device_id.clone())
        .collect();
    assert_eq!(ids, [DEV, "sensor-x"]);
    gw.stop().await;
}

/// Without `client_id_must_match`, a certificate device may choose its client id, but not
/// one whose session belongs to another certificate; the owner itself still takes its own
/// session over (a reconnect after a half-open connection).
#[tokio::test]
async fn a_certificate_cannot_take_over_another_certificates_session_but_its_owner_can() {
    let gw = TestGateway::start(|c, _| c.auth.client_id_must_match = false).await;
    let mut victim = gw.raw_connected(DEV, &Connect::v4(DEV)).await;

    let mut thief = gw.raw(Some("dev-00002")).await;
    let ack = thief.connect(&Connect::v4(DEV)).await;
    assert_eq!(ack.connack_code(), 0x02, "3.1.1: identifier rejected");
    gw.wait_refused("client_id", 1).await;
    assert_eq!(takeovers_refused(&gw), 1);
    let ack = victim.publish_qos1(false, TOPIC, 1, b"undisturbed").await;
    assert_eq!(ack.ack_reason(), 0);

    // The same identity again: a takeover, as MQTT says.
    let mut again = gw.raw(Some(DEV)).await;
    assert_eq!(again.connect(&Connect::v4(DEV)).await.connack_code(), 0);
    assert_eq!(
        victim.until_closed(WAIT).await,
        [],
        "taken over by its owner"
    );
    assert_eq!(gw.stats.takeovers.load(Ordering::SeqCst), 1);
    let ack = again.publish_qos1(false, TOPIC, 2, b"back").await;
    assert_eq!(ack.ack_reason(), 0);
    let ids: Vec<_> = gw
        .wait_records(2)
        .await
        .iter()
        .map(|r| r.device_id.clone())
        .collect();
    assert_eq!(ids, [DEV, DEV]);
    gw.stop().await;
}

/// The owner of a persistent session is stored with it: after a restart an anonymous device
/// still cannot take the session, and its owner resumes it.
#[tokio::test]
async fn a_kept_sessions_owner_survives_a_restart() {
    let gw = TestGateway::start(|c, _| c.auth.allow_anonymous = true).await;
    let mut owner = gw
        .raw_connected(DEV, &Connect::v5(DEV).persistent(3600))
        .await;
    owner.send(&raw::DISCONNECT).await.unwrap();
    gw.wait_disconnected().await;
    let gw = gw.restart().await;

    let mut c = dial(&gw).await;
    let ack = c.connect(&Connect::v5(DEV).persistent(3600)).await;
    assert_eq!(ack.connack_code(), 0x85, "anonymous, after the restart");
    assert_eq!(takeovers_refused(&gw), 1);

    let mut owner = gw.raw(Some(DEV)).await;
    let ack = owner.connect(&Connect::v5(DEV).persistent(3600)).await;
    assert_eq!(ack.connack_code(), 0);
    assert!(ack.session_present());
    gw.stop().await;
}

/// The report, with the client it used: `mosquitto_pub -u alice -P ... -i dev-00001`
/// over TLS fails (both protocol versions) and stores nothing; with `-i alice` it works.
#[tokio::test]
async fn mosquitto_pub_with_a_password_cannot_publish_as_another_device() {
    let gw = TestGateway::start(passwords).await;
    let port = gw.addr.port().to_string();
    let publish = |id: &'static str, version: &'static str, topic: &'static str| {
        let mut c = tokio::process::Command::new("mosquitto_pub");
        c.args(["-h", "127.0.0.1", "-p", &port, "-V", version, "-q", "1"])
            .args(["-u", "alice", "-P", "s3cret", "-i", id, "-t", topic])
            .args(["-m", "reading"])
            .arg("--cafile")
            .arg(gw.certs.join("ca.pem"));
        c
    };
    for version in ["mqttv311", "mqttv5"] {
        let out = publish(DEV, version, TOPIC)
            .output()
            .await
            .expect("mosquitto_pub (Debian's mosquitto-clients; `./run-tests` installs it)");
        assert!(!out.status.success(), "{version}: accepted as {DEV}");
    }
    gw.wait_refused("client_id", 2).await;
    let out = publish("alice", "mqttv5", "devices/alice/telemetry")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records = gw.wait_records(1).await;
    let ids: Vec<_> = records.iter().map(|r| r.device_id.as_str()).collect();
    assert_eq!(ids, ["alice"]);
    gw.stop().await;
}
