//! Subscriptions with clients nobody here wrote, over mutual TLS to an in-process gateway:
//! `mosquitto_sub` (MQTT 3.1.1 and 5, live and with a persistent session `-c`), Eclipse
//! paho-mqtt 2.x from Python (`tests/clients/paho_subscribe.py`: QoS 1 and 2, a retained
//! message, MQTT 5 no-local and retain handling) and rumqttc (3.1.1 and `rumqttc::v5`).
//!
//! Needs `mosquitto_sub` (Debian's mosquitto-clients) and `python3` with paho-mqtt 2.x: without
//! them the tests fail and say so (`./run-tests` checks for them and says how to install them);
//! they never pass without having run.
#![allow(clippy::unwrap_used)]

mod ingest_support;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use gateway::config::AclRule;
use ingest_support::raw::{self, kind, Connect, Publish, WAIT};
use ingest_support::TestGateway;

const PUBLISHER: &str = "dev-00001";
const SUBSCRIBER: &str = "dev-00005";
const OTHER: &str = "dev-00003";
/// The longest a client process may take.
const CLIENT_TIME: Duration = Duration::from_secs(15);

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

fn require_mosquitto_sub() {
    let ok = std::process::Command::new("mosquitto_sub")
        .arg("--help")
        .output()
        .is_ok();
    assert!(
        ok,
        "mosquitto_sub is missing: install Debian's mosquitto-clients; `./run-tests` checks for \
         it and says how (these tests never skip)"
    );
}

fn require_paho() {
    let ok = std::process::Command::new("python3")
        .args([
            "-c",
            "import paho.mqtt, sys; sys.exit(0 if paho.mqtt.__version__.startswith('2') else 1)",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "python3 cannot `import paho.mqtt` 2.x: `pip install paho-mqtt==2.1.0`; `./run-tests` \
         checks for it and says how (these tests never skip)"
    );
}

/// `mosquitto_sub` with `id`'s certificate and client id, and `args`, not yet started.
fn mosquitto_sub(gw: &TestGateway, id: &str, args: &[&str]) -> tokio::process::Command {
    let dev = gw.certs.join("devices");
    let mut c = tokio::process::Command::new("mosquitto_sub");
    c.args(["-h", "127.0.0.1", "-p"])
        .arg(gw.addr.port().to_string())
        .arg("--cafile")
        .arg(gw.certs.join("ca.pem"))
        .arg("--cert")
        .arg(dev.join(format!("{id}.pem")))
        .arg("--key")
        .arg(dev.join(format!("{id}.key")))
        .args(["-i", id, "-F", "%t|%q|%r|%p"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    c
}

/// Waits (bounded) for a client process and asserts it succeeded.
async fn finished(what: &str, child: tokio::process::Child) -> Output {
    let out = tokio::time::timeout(CLIENT_TIME, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {CLIENT_TIME:?}"))
        .unwrap();
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Publishes `(topic, qos, payload)` in order from `PUBLISHER` with the raw client, waiting for
/// each acknowledgement (QoS 2: PUBREC, PUBREL, PUBCOMP).
async fn publish_all(gw: &TestGateway, v5: bool, messages: &[(&str, u8, &str)]) {
    let connect = if v5 {
        Connect::v5(PUBLISHER)
    } else {
        Connect::v4(PUBLISHER)
    };
    let mut c = gw.raw_connected(PUBLISHER, &connect).await;
    for (i, (topic, qos, payload)) in messages.iter().enumerate() {
        let pkid = u16::try_from(i).unwrap() + 1;
        let p = Publish::new(v5, topic, payload.as_bytes());
        match qos {
            0 => c.publish(&p).await,
            1 => {
                c.publish_qos1(v5, topic, pkid, payload.as_bytes()).await;
            }
            _ => {
                c.publish(&p.qos(2, pkid)).await;
                let rec = c.recv().await;
                assert_eq!((rec.kind, rec.pkid()), (kind::PUBREC, pkid));
                c.send(&raw::pubrel(pkid)).await.unwrap();
                let comp = c.recv().await;
                assert_eq!((comp.kind, comp.pkid()), (kind::PUBCOMP, pkid));
            }
        }
    }
    c.send(&raw::DISCONNECT).await.unwrap();
}

/// Waits until the gateway holds `n` subscriptions (a client process has had its SUBACK).
async fn wait_subscriptions(gw: &TestGateway, n: usize) {
    gw.wait_until(&format!("{n} subscription(s)"), WAIT, |g| {
        g.sessions.counts().2 == n
    })
    .await;
}

#[tokio::test]
async fn mosquitto_sub_receives_live_at_the_lower_qos_with_mqtt311_and_5() {
    require_mosquitto_sub();
    for version in ["mqttv311", "5"] {
        let gw = gateway().await;
        let child = mosquitto_sub(
            &gw,
            SUBSCRIBER,
            &[
                "-V",
                version,
                "-q",
                "2",
                "-t",
                "devices/+/telemetry",
                "-C",
                "3",
                "-W",
                "14",
            ],
        )
        .spawn()
        .unwrap();
        wait_subscriptions(&gw, 1).await;
        let topic = "devices/dev-00001/telemetry";
        publish_all(
            &gw,
            version == "5",
            // QoS 2 last: libmosquitto hands a QoS 2 message to the application at the PUBREL,
            // after what came later at QoS 0 or 1.
            &[
                (topic, 0, "zero"),
                (topic, 1, "one"),
                ("devices/dev-00001/other", 1, "unmatched"),
                (topic, 2, "two"),
            ],
        )
        .await;
        let out = finished(&format!("mosquitto_sub -V {version}"), child).await;
        assert_eq!(
            lines(&out),
            [
                format!("{topic}|0|0|zero"),
                format!("{topic}|1|0|one"),
                format!("{topic}|2|0|two"),
            ],
            "-V {version}"
        );
        gw.stop().await;
    }
}

#[tokio::test]
async fn mosquitto_sub_with_a_persistent_session_gets_what_was_published_while_it_was_away() {
    require_mosquitto_sub();
    for version in ["mqttv311", "5"] {
        let gw = gateway().await;
        let filter = "devices/+/telemetry";
        // -c with a fixed client id (the certificate's CN); -E: leave once subscribed.
        let first = mosquitto_sub(
            &gw,
            SUBSCRIBER,
            &["-V", version, "-c", "-q", "1", "-t", filter, "-E"],
        )
        .spawn()
        .unwrap();
        finished(&format!("mosquitto_sub -c -E -V {version}"), first).await;
        gw.wait_until("the session to be kept offline", WAIT, |g| {
            let (online, offline, subs, _) = g.sessions.counts();
            (online, offline, subs) == (0, 1, 1)
        })
        .await;
        let topic = "devices/dev-00001/telemetry";
        publish_all(
            &gw,
            false,
            &[(topic, 1, "a"), (topic, 1, "b"), (topic, 2, "c")],
        )
        .await;
        let again = mosquitto_sub(
            &gw,
            SUBSCRIBER,
            &[
                "-V", version, "-c", "-q", "1", "-t", filter, "-C", "3", "-W", "14",
            ],
        )
        .spawn()
        .unwrap();
        let out = finished(&format!("mosquitto_sub -c -V {version} again"), again).await;
        assert_eq!(
            lines(&out),
            [
                format!("{topic}|1|0|a"),
                format!("{topic}|1|0|b"),
                format!("{topic}|1|0|c"),
            ],
            "-V {version}: queued while away, at the subscription's QoS 1"
        );
        gw.stop().await;
    }
}

/// Runs `paho_subscribe.py` for `version` and returns the JSON lines it printed.
async fn paho_subscribe(version: &str) -> Vec<serde_json::Value> {
    let gw = gateway().await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/paho_subscribe.py");
    let child = tokio::process::Command::new("python3")
        .arg(&script)
        .args(["--host", "127.0.0.1", "--port"])
        .arg(gw.addr.port().to_string())
        .arg("--cafile")
        .arg(gw.certs.join("ca.pem"))
        .arg("--devices")
        .arg(gw.certs.join("devices"))
        .args(["--version", version, "--sub-id", SUBSCRIBER, "--pub-id"])
        .args([PUBLISHER, "--other-id", OTHER])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = finished(&format!("paho_subscribe.py --version {version}"), child).await;
    gw.stop().await;
    lines(&out)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `(to, topic, payload, qos, retain)` of each message received, in order.
fn received(lines: &[serde_json::Value]) -> Vec<(String, String, String, u64, bool)> {
    lines
        .iter()
        .filter(|l| l.get("to").is_some())
        .map(|l| {
            (
                l["to"].as_str().unwrap().to_string(),
                l["topic"].as_str().unwrap().to_string(),
                l["payload"].as_str().unwrap().to_string(),
                l["qos"].as_u64().unwrap(),
                l["retain"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn subacks(lines: &[serde_json::Value]) -> Vec<Vec<u64>> {
    lines
        .iter()
        .filter_map(|l| l.get("suback"))
        .map(|c| {
            c.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn paho_mqtt311_gets_a_retained_message_then_qos1_and_qos2() {
    require_paho();
    let out = paho_subscribe("v311").await;
    assert_eq!(out.last().unwrap(), "DONE");
    assert_eq!(subacks(&out), [vec![2]]);
    let base = "devices/dev-00001/paho-v311";
    let s = |topic: &str, payload: &str, qos, retain| {
        (
            SUBSCRIBER.to_string(),
            format!("{base}/{topic}"),
            payload.to_string(),
            qos,
            retain,
        )
    };
    assert_eq!(
        received(&out),
        [
            s("state", "retained-v311", 1, true),
            s("data", "q1-v311", 1, false),
            s("data", "q2-v311", 2, false),
        ]
    );
}

#[tokio::test]
async fn paho_mqtt5_gets_a_retained_message_qos1_and_qos2_and_no_local_holds_its_own() {
    require_paho();
    let out = paho_subscribe("v5").await;
    assert_eq!(out.last().unwrap(), "DONE");
    assert_eq!(subacks(&out), [vec![2], vec![1]]);
    let base = "devices/dev-00001/paho-v5";
    let s = |topic: &str, payload: &str, qos, retain| {
        (
            SUBSCRIBER.to_string(),
            format!("{base}/{topic}"),
            payload.to_string(),
            qos,
            retain,
        )
    };
    assert_eq!(
        received(&out),
        [
            s("state", "retained-v5", 1, true),
            s("data", "q1-v5", 1, false),
            s("data", "q2-v5", 2, false),
            // No-local: not "own"; retain handling 2: not "retained-nl".
            (
                PUBLISHER.to_string(),
                "devices/dev-00003/paho-v5-nl".to_string(),
                "other".to_string(),
                1,
                false
            ),
        ]
    ); // MQTT 5 properties as paho reads them: the subscription's identifier on what it
       // delivers (the retained message too), and q1's expiry (the time left), response topic and
       // correlation data.
    let of = |payload: &str| {
        out.iter()
            .find(|l| l.get("payload").and_then(|p| p.as_str()) == Some(payload))
            .unwrap_or_else(|| panic!("{payload} not received: {out:?}"))
            .clone()
    };
    for p in ["retained-v5", "q1-v5", "q2-v5"] {
        assert_eq!(of(p)["sub_ids"], serde_json::json!([11]), "{p}");
    }
    let q1 = of("q1-v5");
    let expiry = q1["expiry"].as_u64().expect("an expiry interval");
    assert!((3590..=3600).contains(&expiry), "{q1}");
    assert_eq!(q1["response_topic"], format!("{base}/reply"));
    assert_eq!(q1["correlation"], "c-1");
    assert!(of("q2-v5").get("expiry").is_none());
}

#[tokio::test]
async fn rumqttc_v4_and_v5_subscribe_and_receive_qos1_and_qos2() {
    use rumqttc::v5::mqttbytes::v5::Packet as P5;
    use rumqttc::v5::mqttbytes::QoS as Q5;
    use rumqttc::{Event, Packet, QoS};

    let gw = gateway().await;
    let certs = gw.certs.clone();

    // Subscriber: rumqttc::v5 (dev-00005), QoS 2.
    let tunnel5 = ingest_support::tunnel(gw.addr, &certs, SUBSCRIBER).await;
    let o5 = rumqttc::v5::MqttOptions::new(SUBSCRIBER, "127.0.0.1", tunnel5.addr.port());
    let (sub5, mut loop5) = rumqttc::v5::AsyncClient::new(o5, 16);
    sub5.subscribe("devices/+/rumqttc", Q5::ExactlyOnce)
        .await
        .unwrap();
    // Subscriber: rumqttc 3.1.1 (dev-00003), QoS 1.
    let (mut o4, _tunnel4) = ingest_support::v4_options(gw.addr, &certs, OTHER).await;
    o4.set_clean_session(true);
    let (sub4, mut loop4) = rumqttc::AsyncClient::new(o4, 16);
    sub4.subscribe("devices/+/rumqttc", QoS::AtLeastOnce)
        .await
        .unwrap();

    let v5_task = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < 3 {
            if let rumqttc::v5::Event::Incoming(P5::Publish(p)) = loop5.poll().await.unwrap() {
                got.push((
                    String::from_utf8(p.topic.to_vec()).unwrap(),
                    String::from_utf8(p.payload.to_vec()).unwrap(),
                    p.qos as u8,
                ));
            }
        }
        // Let the acks go out.
        sub5.disconnect().await.unwrap();
        while loop5.poll().await.is_ok() {}
        got
    });
    let v4_task = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < 3 {
            if let Event::Incoming(Packet::Publish(p)) = loop4.poll().await.unwrap() {
                got.push((
                    p.topic.clone(),
                    String::from_utf8(p.payload.to_vec()).unwrap(),
                    p.qos as u8,
                ));
            }
        }
        sub4.disconnect().await.unwrap();
        while loop4.poll().await.is_ok() {}
        got
    });
    wait_subscriptions(&gw, 2).await;

    // Publisher: rumqttc 3.1.1 (dev-00001), QoS 0, 1, 2 in that order.
    let (o, _pub_tunnel) = ingest_support::v4_options(gw.addr, &certs, PUBLISHER).await;
    let (publisher, mut pub_loop) = rumqttc::AsyncClient::new(o, 16);
    let topic = "devices/dev-00001/rumqttc";
    for (qos, payload) in [
        (QoS::AtMostOnce, "zero"),
        (QoS::AtLeastOnce, "one"),
        (QoS::ExactlyOnce, "two"),
    ] {
        publisher
            .publish(topic, qos, false, payload.as_bytes())
            .await
            .unwrap();
    }
    let publishing = async {
        let mut acked = 0;
        while acked < 2 {
            match pub_loop.poll().await.unwrap() {
                Event::Incoming(Packet::PubAck(_)) | Event::Incoming(Packet::PubComp(_)) => {
                    acked += 1
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(CLIENT_TIME, publishing)
        .await
        .expect("the publisher's QoS 1 and 2 acknowledged");

    let v5_got = tokio::time::timeout(CLIENT_TIME, v5_task)
        .await
        .expect("rumqttc v5 received 3")
        .unwrap();
    let v4_got = tokio::time::timeout(CLIENT_TIME, v4_task)
        .await
        .expect("rumqttc v4 received 3")
        .unwrap();
    let m = |payload: &str, qos: u8| (topic.to_string(), payload.to_string(), qos);
    assert_eq!(v5_got, [m("zero", 0), m("one", 1), m("two", 2)]);
    assert_eq!(v4_got, [m("zero", 0), m("one", 1), m("two", 1)]);
    gw.stop().await;
}
