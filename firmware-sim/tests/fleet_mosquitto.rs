//! The fleet runner against the local Mosquitto (127.0.0.1:1883, plaintext): every message is
//! acknowledged, the manifest says so, and a subscriber sees every message arrive.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{bail, Context};
use firmware_sim::fleet::{self, FleetConfig, ProgressMode};
use firmware_sim::manifest::Manifest;
use firmware_sim::payload;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// Subscribes to `filter` and forwards every payload (with its topic) until dropped.
async fn subscribe(
    filter: &str,
    client_id: &str,
) -> anyhow::Result<tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>> {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", 1883);
    opts.set_clean_session(true)
        .set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(opts, 64);
    client.subscribe(filter, QoS::AtLeastOnce).await?;
    // Wait for the SUBACK so nothing published afterwards is missed.
    loop {
        match tokio::time::timeout(Duration::from_secs(5), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("subscriber: {e} (is Mosquitto running on 127.0.0.1:1883?)"),
            Err(_) => bail!("subscriber: no SUBACK within 5 s"),
        }
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let _client = client; // keeps the request channel open
        while let Ok(ev) = el.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = ev {
                if tx.send((p.topic, p.payload.to_vec())).is_err() {
                    break;
                }
            }
        }
    });
    Ok(rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_devices_qos1_all_acked_manifest_exact_and_all_arrive() -> anyhow::Result<()> {
    let run = common::unique("f");
    let mut arrivals =
        subscribe(&format!("{run}/devices/+/telemetry"), &format!("{run}-sub")).await?;
    let dir = tempfile::tempdir()?;
    let manifest_path = dir.path().join("manifest.json");
    let cfg = FleetConfig {
        broker: common::MOSQUITTO.into(),
        devices: 20,
        id_prefix: format!("{run}-"),
        count_per_device: Some(50),
        rate: 500.0,
        qos: 1,
        topic: format!("{run}/devices/{{id}}/telemetry"),
        status_topic: format!("{run}/devices/{{id}}/status"),
        seed: 7,
        manifest: Some(manifest_path.clone()),
        progress: ProgressMode::Off,
        ..FleetConfig::default()
    };
    let ids = cfg.device_ids();
    let report = tokio::time::timeout(
        Duration::from_secs(30),
        fleet::run(cfg, std::future::pending()),
    )
    .await
    .context("fleet run timed out")??;

    assert_eq!(report.sampled, 1000);
    assert_eq!(report.sent, 1000);
    assert_eq!(report.acked, 1000, "{report}");
    assert_eq!((report.dropped, report.unacked, report.unsent), (0, 0, 0));
    assert!(report.all_delivered());
    let latency = report.latency_ms.context("latency recorded")?;
    assert_eq!(latency.count, 1000);
    assert!(latency.p50 <= latency.p99 && latency.p99 <= latency.max);

    let manifest = Manifest::read(&manifest_path)?;
    assert_eq!(manifest, report.manifest);
    assert_eq!(manifest.run.devices, 20);
    assert_eq!(manifest.devices.keys().cloned().collect::<Vec<_>>(), ids);
    for (id, d) in &manifest.devices {
        assert_eq!(d.next_seq, 50, "{id}");
        assert_eq!(d.acked.ranges(), [(0, 49)], "{id}");
        assert!(d.unacked.is_empty() && d.dropped.is_empty() && d.unsent.is_empty());
    }
    // The JSON form compresses to ranges.
    let json = std::fs::read_to_string(&manifest_path)?;
    assert!(json.contains(r#""acked":[[0,49]]"#), "{json}");

    // Every acknowledged message reached the subscriber, decodable, on its device's topic.
    let mut seen: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while seen.values().map(BTreeSet::len).sum::<usize>() < 1000 {
        let (topic, bytes) = tokio::time::timeout_at(deadline, arrivals.recv())
            .await
            .context("subscriber saw fewer than 1000 messages")?
            .context("subscriber stopped")?;
        let t = payload::decode(&bytes)?;
        assert_eq!(topic, format!("{run}/devices/{}/telemetry", t.device_id));
        seen.entry(t.device_id).or_default().insert(t.seq);
    }
    assert_eq!(seen.keys().cloned().collect::<Vec<_>>(), ids);
    for seqs in seen.values() {
        assert_eq!(
            seqs.iter().copied().collect::<Vec<_>>(),
            (0..50).collect::<Vec<_>>()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mqtt_version_and_qos_level_delivers() -> anyhow::Result<()> {
    use firmware_sim::fleet::MqttVersion;
    for (version, qos) in [
        (MqttVersion::V311, 0),
        (MqttVersion::V311, 2),
        (MqttVersion::V5, 1),
        (MqttVersion::V5, 2),
    ] {
        let run = common::unique("q");
        let cfg = FleetConfig {
            broker: common::MOSQUITTO.into(),
            version,
            devices: 3,
            id_prefix: format!("{run}-"),
            count_per_device: Some(20),
            rate: 500.0,
            qos,
            topic: format!("{run}/devices/{{id}}/telemetry"),
            status_topic: format!("{run}/devices/{{id}}/status"),
            progress: ProgressMode::Off,
            ..FleetConfig::default()
        };
        let report = tokio::time::timeout(
            Duration::from_secs(20),
            fleet::run(cfg, std::future::pending()),
        )
        .await
        .with_context(|| format!("{version:?} QoS {qos} timed out"))??;
        assert!(report.all_delivered(), "{version:?} QoS {qos}: {report}");
        assert_eq!(report.sent, 60, "{version:?} QoS {qos}");
        if qos == 0 {
            // No acknowledgements: written readings are recorded as sent, not acked.
            assert_eq!((report.acked, report.unacked), (0, 60));
            assert!(report.latency_ms.is_none());
        } else {
            assert_eq!(report.acked, 60, "{version:?} QoS {qos}: {report}");
        }
    }
    Ok(())
}

#[test]
fn the_binary_runs_a_fleet_and_writes_json_and_a_manifest() -> anyhow::Result<()> {
    let run = common::unique("b");
    let dir = tempfile::tempdir()?;
    let manifest = dir.path().join("m.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_firmware-sim"))
        .args(["run", "--broker", common::MOSQUITTO, "--devices", "4"])
        .args([
            "--count-per-device",
            "10",
            "--rate",
            "100",
            "--qos",
            "1",
            "--json",
        ])
        .args(["--progress", "off", "--id-prefix", &format!("{run}-")])
        .args(["--topic", &format!("{run}/devices/{{id}}/telemetry")])
        .args(["--status-topic", &format!("{run}/devices/{{id}}/status")])
        .arg("--manifest")
        .arg(&manifest)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("stdout is one JSON object: {stderr}"))?;
    assert_eq!(json["devices"], 4);
    assert_eq!(json["acked"], 40);
    assert_eq!(json["dropped"], 0);
    assert!(json["latency_ms"]["p99"].as_f64().is_some());
    let m = Manifest::read(&manifest)?;
    assert_eq!(m.acked(), 40);
    Ok(())
}
