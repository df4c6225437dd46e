//! The verifier against the real RabbitMQ (127.0.0.1:5672, guest/guest): a stream with a gap, a
//! duplicate and a reordering is reported and fails; a clean stream passes. Run both as a
//! library call and through the binary.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use firmware_sim::manifest::{DeviceRecord, Manifest, RunInfo, VERSION};
use firmware_sim::verify::{self, Source, VerifyOptions};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

/// A queue only this test uses; RabbitMQ deletes it after a minute unused even if the test
/// dies before its own cleanup.
struct TestQueue {
    conn: Connection,
    channel: Channel,
    name: String,
}

impl TestQueue {
    async fn declare(tag: &str) -> anyhow::Result<TestQueue> {
        let conn = Connection::connect(common::AMQP_URL, ConnectionProperties::default())
            .await
            .context("connecting to RabbitMQ at 127.0.0.1:5672 (guest/guest)")?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let name = common::unique(tag);
        let mut args = FieldTable::default();
        args.insert("x-expires".into(), AMQPValue::LongInt(60_000));
        channel
            .queue_declare(name.as_str().into(), QueueDeclareOptions::default(), args)
            .await?;
        Ok(TestQueue {
            conn,
            channel,
            name,
        })
    }

    /// Publishes each payload to the queue and waits for RabbitMQ's confirms.
    async fn publish(&self, payloads: &[Vec<u8>]) -> anyhow::Result<()> {
        for p in payloads {
            self.channel
                .basic_publish(
                    "".into(),
                    self.name.as_str().into(),
                    BasicPublishOptions::default(),
                    p,
                    BasicProperties::default(),
                )
                .await?
                .await?;
        }
        Ok(())
    }

    async fn delete(self) -> anyhow::Result<()> {
        self.channel
            .queue_delete(self.name.as_str().into(), QueueDeleteOptions::default())
            .await?;
        self.conn.close(200, "done".into()).await?;
        Ok(())
    }
}

fn manifest(devices: &[&str], acked: std::ops::Range<u64>) -> Manifest {
    let devices: BTreeMap<String, DeviceRecord> = devices
        .iter()
        .map(|id| {
            (
                id.to_string(),
                DeviceRecord {
                    next_seq: acked.end,
                    acked: acked.clone().collect(),
                    ..Default::default()
                },
            )
        })
        .collect();
    Manifest {
        version: VERSION,
        run: RunInfo {
            started_ms: 0,
            devices: devices.len(),
            qos: 1,
            seed: 1,
            topic: "devices/{id}/telemetry".into(),
        },
        devices,
    }
}

/// A CBOR reading, as a device would send it.
fn cbor(device: &str, seq: u64) -> Vec<u8> {
    let mut buf = heapless::Vec::<u8, 256>::new();
    let reading = firmware_sim::payload::Reading {
        device_id: device,
        seq,
        sample_time_ms: 1_700_000_000_000 + seq,
        temp_c: 20.5,
        humidity_pct: 40.0,
        battery_v: 3.9,
    };
    firmware_sim::payload::encode(&reading, 0, &mut buf).expect("encodes");
    buf.to_vec()
}

/// The same reading transcoded to JSON (as the gateway may forward it).
fn json(device: &str, seq: u64) -> Vec<u8> {
    serde_json::json!({
        "device_id": device, "seq": seq, "sample_time_ms": 1_700_000_000_000u64 + seq,
        "temp_c": 20.5, "humidity_pct": 40.0, "battery_v": 3.9
    })
    .to_string()
    .into_bytes()
}

/// Device a: 0..10 with 4 missing and 2 duplicated. Device b: 0..10 with 6 before 5, and
/// some of it as JSON. One message that is not telemetry at all.
fn faulty_stream(a: &str, b: &str) -> Vec<Vec<u8>> {
    let mut s = Vec::new();
    for seq in [0, 1, 2, 2, 3, 5, 6, 7, 8, 9] {
        s.push(cbor(a, seq));
    }
    for seq in [0, 1, 2, 3, 4, 6, 5, 7] {
        s.push(cbor(b, seq));
    }
    s.push(json(b, 8));
    s.push(json(b, 9));
    s.push(b"not telemetry".to_vec());
    s
}

fn clean_stream(a: &str, b: &str) -> Vec<Vec<u8>> {
    (0..10)
        .flat_map(|seq| [cbor(a, seq), json(b, seq)])
        .collect()
}

fn options(queue: &str, timeout: Duration) -> VerifyOptions {
    let mut o = VerifyOptions::new(Source::Amqp {
        url: common::AMQP_URL.into(),
        queue: queue.into(),
    });
    o.timeout = timeout;
    o
}

fn verify_binary(queue: &str, manifest: &std::path::Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_firmware-sim"))
        .args([
            "verify",
            "--amqp",
            common::AMQP_URL,
            "--queue",
            queue,
            "--expect",
        ])
        .arg(manifest)
        .args(extra)
        .output()
        .expect("runs the firmware-sim binary")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gap_duplicate_and_reordering_are_each_reported_and_fail() -> anyhow::Result<()> {
    let (a, b) = ("dev-00001", "dev-00002");
    let m = manifest(&[a, b], 0..10);

    // As a library call.
    let q = TestQueue::declare("v").await?;
    q.publish(&faulty_stream(a, b)).await?;
    let report = verify::verify(&options(&q.name, Duration::from_millis(1500)), &m).await?;
    q.delete().await?;
    assert!(!report.passed);
    assert!(report.timed_out, "device a's 4 never arrives");
    assert_eq!(report.total.received, 20);
    assert_eq!(report.total.undecodable, 1);
    let (da, db) = (&report.devices[a], &report.devices[b]);
    assert_eq!((da.missing, da.duplicates, da.out_of_order), (1, 1, 0));
    assert_eq!(da.missing_ranges, [(4, 4)]);
    assert_eq!(da.duplicate_examples, [2]);
    assert_eq!((db.missing, db.duplicates, db.out_of_order), (0, 0, 1));
    assert_eq!(
        (
            db.out_of_order_examples[0].seq,
            db.out_of_order_examples[0].after
        ),
        (5, 6)
    );
    assert_eq!(report.failures.len(), 2, "{:?}", report.failures);

    // Through the binary: the same stream, a fresh queue.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("manifest.json");
    m.write(&path)?;
    let q = TestQueue::declare("vb").await?;
    q.publish(&faulty_stream(a, b)).await?;
    let out = verify_binary(&q.name, &path, &["--timeout", "1.5", "--json"]);
    q.delete().await?;
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(json["passed"], false);
    assert_eq!(json["total"]["missing"], 1);
    assert_eq!(json["total"]["duplicates"], 1);
    assert_eq!(json["total"]["out_of_order"], 1);
    assert_eq!(
        json["devices"][a]["missing_ranges"],
        serde_json::json!([[4, 4]])
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stream_passes_with_exit_code_zero() -> anyhow::Result<()> {
    let (a, b) = ("dev-00001", "dev-00002");
    let m = manifest(&[a, b], 0..10);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("manifest.json");
    m.write(&path)?;

    let q = TestQueue::declare("c").await?;
    q.publish(&clean_stream(a, b)).await?;
    let report = verify::verify(&options(&q.name, Duration::from_secs(10)), &m).await?;
    assert!(report.passed, "{report}");
    assert!(!report.timed_out);
    assert_eq!((report.total.received, report.total.missing), (20, 0));

    q.publish(&clean_stream(a, b)).await?;
    let out = verify_binary(&q.name, &path, &["--timeout", "10"]);
    q.delete().await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("PASS"), "{stdout}");
    Ok(())
}

#[test]
fn kafka_without_a_broker_is_an_error_not_a_silent_pass() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("manifest.json");
    manifest(&["dev-00001"], 0..1)
        .write(&path)
        .expect("manifest");
    // A loopback port nobody listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let verify = |brokers: &str| {
        Command::new(env!("CARGO_BIN_EXE_firmware-sim"))
            .args(["verify", "--kafka", brokers, "--topic", "t"])
            .args(["--timeout", "2s", "--expect"])
            .arg(&path)
            .output()
            .expect("runs the firmware-sim binary")
    };
    let out = verify(&format!("127.0.0.1:{port}"));
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Kafka"), "{stderr}");
    let out = verify("not-a-broker-list");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("host:port"), "{stderr}");
}
