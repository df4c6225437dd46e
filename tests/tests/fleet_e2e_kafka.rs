//! End to end through Kafka: a simulated fleet (firmware-sim) publishes over mutual TLS to the real
//! gateway binary, which forwards through its Kafka uplink (creating the topic) to tansu, a
//! Kafka-compatible broker started for this test; the verifier reads every partition of the topic
//! and must find every acknowledged message, in per-device order.
//!
//! Needs `tansu` 0.6.0 (`$TANSU`, `$CARGO_HOME/bin/tansu` or on `PATH`); without it the test
//! fails, saying how to install it.
#![allow(clippy::unwrap_used)]

use std::time::SystemTime;

use gateway_tests::{start_gateway, workspace_binary};

const DEVICES: u64 = 100;
const PER_DEVICE: u64 = 100;

#[path = "../../gateway/tests/tansu/mod.rs"]
mod tansu;
use tansu::Tansu;

#[tokio::test]
async fn fleet_through_the_gateway_to_kafka_loses_and_reorders_nothing() {
    let sim = workspace_binary("firmware-sim", "firmware-sim");
    let tansu = Tansu::start();
    let n = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let topic = format!("e2e-{n}");
    let gw = start_gateway(
        DEVICES as usize,
        &format!(
            r#"[[uplinks]]
name = "kafka"
type = "kafka"
bootstrap = ["{bootstrap}"]
topic = "{topic}"
create_topics = true

[[routes]]
filter = "devices/#"
uplinks = ["kafka"]
"#,
            bootstrap = tansu.bootstrap(),
        ),
    );
    let (port, certs, dir) = (gw.port, gw.certs.clone(), gw.dir.path().to_path_buf());

    let manifest = dir.join("manifest.json");
    let run = tokio::process::Command::new(&sim)
        .args(["run", "--broker", &format!("127.0.0.1:{port}")])
        .arg("--certs-dir")
        .arg(&certs)
        .args(["--devices", &DEVICES.to_string()])
        .args(["--count-per-device", &PER_DEVICE.to_string()])
        .args(["--rate", "50", "--qos", "1", "--progress", "off", "--json"])
        .arg("--manifest")
        .arg(&manifest)
        .output()
        .await
        .unwrap();
    let summary = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "fleet run failed: {summary}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );

    let verify = tokio::process::Command::new(&sim)
        .args(["verify", "--kafka", &tansu.bootstrap(), "--topic", &topic])
        .args(["--timeout", "60", "--json", "--expect"])
        .arg(&manifest)
        .output()
        .await
        .unwrap();
    let report = String::from_utf8_lossy(&verify.stdout);
    eprintln!("fleet: {summary}\nverifier: {report}");
    assert!(
        verify.status.success(),
        "verifier found problems: {report}\n{}\nbroker log:\n{}",
        String::from_utf8_lossy(&verify.stderr),
        tansu.log()
    );
    let v: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    let total = &v["total"];
    assert_eq!(total["missing"], 0, "{report}");
    assert_eq!(total["out_of_order"], 0, "{report}");
    assert_eq!(total["undecodable"], 0, "{report}");
    assert!(
        total["received"].as_u64().unwrap() >= DEVICES * PER_DEVICE,
        "{report}"
    );

    // A topic the gateway never wrote is an error (exit 2), not an empty pass or a wait.
    let missing = tokio::process::Command::new(&sim)
        .args(["verify", "--kafka", &tansu.bootstrap()])
        .args(["--topic", &format!("{topic}-missing"), "--timeout", "10"])
        .arg("--expect")
        .arg(&manifest)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(missing.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("topic not found"), "{stderr}");

    drop(gw);
    drop(tansu);
}
