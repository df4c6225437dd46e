//! Eclipse paho-mqtt (Python), a client nobody here wrote, publishes QoS 0/1/2 with MQTT 3.1.1
//! and 5 over mutual TLS (`tests/clients/paho_publish.py`); the records in the queue carry what
//! it sent, MQTT 5 properties included.
//!
//! Needs `python3` with paho-mqtt (`./run-tests` installs it with pip). Without the module the
//! test fails, naming `./run-tests`.
#![allow(clippy::unwrap_used)]

mod ingest_support;

use std::path::Path;
use std::time::Duration;

use ingest_support::TestGateway;

const DEV: &str = "dev-00003";

fn paho_available() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import paho.mqtt"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test]
async fn paho_publishes_qos_0_1_2_over_tls_with_mqtt311_and_5_into_the_queue() {
    assert!(
        paho_available(),
        "python3 cannot `import paho.mqtt`: run the suite with `./run-tests` (the README's test \
         command), which installs paho-mqtt==2.1.0, or `pip install paho-mqtt==2.1.0`"
    );
    let gw = TestGateway::start(|_, _| {}).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/paho_publish.py");
    let devices = gw.certs.join("devices");
    let run = tokio::process::Command::new("python3")
        .arg(&script)
        .args(["--host", "127.0.0.1", "--port"])
        .arg(gw.addr.port().to_string())
        .arg("--cafile")
        .arg(gw.certs.join("ca.pem"))
        .arg("--cert")
        .arg(devices.join(format!("{DEV}.pem")))
        .arg("--key")
        .arg(devices.join(format!("{DEV}.key")))
        .args(["--client-id", DEV, "--topic-prefix"])
        .arg(format!("devices/{DEV}/paho"))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("paho_publish.py finished within 60 s")
        .unwrap();
    assert!(
        out.status.success(),
        "paho_publish.py failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // QoS 1/2 were acknowledged, so they are stored; QoS 0 has no ack but went first on the
    // same connection, and the connection ended with DISCONNECT after the rest.
    let records = gw.wait_records(6).await;
    let seen: Vec<(String, u8, String)> = records
        .iter()
        .map(|r| {
            (
                r.topic.clone(),
                r.qos,
                String::from_utf8(r.payload.clone()).unwrap(),
            )
        })
        .collect();
    let mut want = Vec::new();
    for version in ["v311", "v5"] {
        for qos in 0..=2u8 {
            want.push((
                format!("devices/{DEV}/paho/{version}/q{qos}"),
                qos,
                format!("paho-{version}-q{qos}"),
            ));
        }
    }
    assert_eq!(seen, want);
    for r in &records {
        assert_eq!(
            r.device_id, DEV,
            "device id from the client id (= certificate CN)"
        );
        assert!(!r.retain);
        if r.topic.contains("/v5/") {
            assert_eq!(
                r.user_properties,
                [
                    ("site".to_string(), "north".to_string()),
                    ("unit".to_string(), "C".to_string())
                ],
                "{}",
                r.topic
            );
            assert_eq!(r.content_type.as_deref(), Some("application/json"));
            assert_eq!(r.payload_format, Some(1));
        } else {
            assert!(r.user_properties.is_empty());
            assert_eq!(r.content_type, None);
            assert_eq!(r.payload_format, None);
        }
    }
    gw.stop().await;
}
