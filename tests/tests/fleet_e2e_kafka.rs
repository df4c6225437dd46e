//! End to end through Kafka: a simulated fleet (firmware-sim) publishes over mutual TLS to the real
//! gateway binary, which forwards through its Kafka uplink (creating the topic) to tansu, a
//! Kafka-compatible broker started for this test; the verifier reads every partition of the topic
//! and must find every acknowledged message, in per-device order.
//!
//! Three phases, each timed and each waited on with a deadline proportionate to its work: the
//! fleet's run (every PUBACK), the gateway's forwarding (its `/metrics` say every record is
//! confirmed by Kafka and its lag is 0), the verifier's read. A failure says which phase stalled
//! and prints what the gateway logged and counted and the broker's log.
//!
//! Needs `tansu` 0.6.0 (`$TANSU`, `$CARGO_HOME/bin/tansu` or on `PATH`); without it the test
//! fails, saying how to install it.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant, SystemTime};

use gateway_tests::faults::{http_get, Metrics};
use gateway_tests::{start_gateway, workspace_binary, GatewayProcess};

const DEVICES: u64 = 100;
const PER_DEVICE: u64 = 100;
const RECORDS: u64 = DEVICES * PER_DEVICE;

/// The slowest pace accepted from the gateway's forwarding and from the verifier's read, in
/// records per second. On the shared 2-core machine under load from other builds both take
/// about 3 s for the 10,000 records (3,000 rec/s); this leaves a margin of 15.
const FLOOR_RATE: u64 = 200;

/// The deadline of a phase that moves `records`: a fixed part for connecting and metadata, plus
/// the records at [`FLOOR_RATE`] (60 s for this test's 10,000).
fn deadline_for(records: u64) -> Duration {
    Duration::from_secs(10 + records / FLOOR_RATE)
}

#[path = "../../gateway/tests/tansu/mod.rs"]
mod tansu;
use tansu::Tansu;

/// The uplink's counters from the gateway's `/metrics`: (confirmed, lag in records); `None` if
/// the endpoint did not answer or has no such series yet.
async fn forwarded(gw: &GatewayProcess) -> Option<(f64, f64)> {
    let m = Metrics::parse(&http_get(gw.admin_port, "/metrics").await?);
    let confirmed = m
        .series
        .get(r#"gateway_uplink_records_confirmed_total{uplink="kafka"}"#)?;
    let lag = m
        .series
        .get(r#"gateway_uplink_lag_records{uplink="kafka"}"#)?;
    Some((*confirmed, *lag))
}

/// What a failure message needs to say which side stalled: the gateway's counters and log, the
/// broker's log, and how long each phase took.
async fn diagnosis(gw: &GatewayProcess, tansu: &Tansu, phases: &str) -> String {
    let metrics = http_get(gw.admin_port, "/metrics")
        .await
        .map(|body| {
            body.lines()
                .filter(|l| l.starts_with("gateway_uplink_"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_else(|| "(no answer from /metrics)".into());
    format!(
        "phases: {phases}\ngateway uplink metrics:\n{metrics}\ngateway log:\n{}\nbroker log:\n{}",
        gw.log(),
        tansu.log()
    )
}

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
    let t = Instant::now();
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
    let mut phases = format!("fleet {:.1} s", t.elapsed().as_secs_f64());
    let summary = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "fleet run failed: {summary}\n{}\n{}",
        String::from_utf8_lossy(&run.stderr),
        diagnosis(&gw, &tansu, &phases).await
    );

    // Every acknowledged record is in the gateway's queue; wait until Kafka has confirmed them
    // all, so that a slow read below is the reader's, not the forwarder's.
    let t = Instant::now();
    let limit = deadline_for(RECORDS);
    let mut last = None;
    loop {
        last = forwarded(&gw).await.or(last);
        if matches!(last, Some((confirmed, lag)) if confirmed >= RECORDS as f64 && lag == 0.0) {
            break;
        }
        if t.elapsed() > limit {
            panic!(
                "the gateway did not forward the fleet's {RECORDS} records within {limit:?} \
                 (confirmed, lag: {last:?})\n{}",
                diagnosis(&gw, &tansu, &phases).await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    phases += &format!(", forwarding {:.1} s", t.elapsed().as_secs_f64());

    let t = Instant::now();
    let verify = tokio::process::Command::new(&sim)
        .args(["verify", "--kafka", &tansu.bootstrap(), "--topic", &topic])
        .args(["--timeout", &deadline_for(RECORDS).as_secs().to_string()])
        .args(["--json", "--expect"])
        .arg(&manifest)
        .output()
        .await
        .unwrap();
    phases += &format!(", verifier {:.1} s", t.elapsed().as_secs_f64());
    let report = String::from_utf8_lossy(&verify.stdout);
    eprintln!("fleet: {summary}\nverifier: {report}\nphases: {phases}");
    assert!(
        verify.status.success(),
        "verifier found problems: {report}\n{}\n{}",
        String::from_utf8_lossy(&verify.stderr),
        diagnosis(&gw, &tansu, &phases).await
    );
    let v: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    let total = &v["total"];
    assert_eq!(total["missing"], 0, "{report}");
    assert_eq!(total["out_of_order"], 0, "{report}");
    assert_eq!(total["undecodable"], 0, "{report}");
    assert!(total["received"].as_u64().unwrap() >= RECORDS, "{report}");

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
