//! The fleet over mutual TLS with per-device certificates in the `gateway certs generate`
//! layout. A TLS-terminating proxy that requires a client certificate from the dev CA sits in
//! front of Mosquitto (which listens in plaintext only).

mod common;

use std::time::Duration;

use anyhow::Context;
use firmware_sim::fleet::{self, FleetConfig, ProgressMode};
use firmware_sim::tls::TlsSettings;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_per_device_certificates_gets_everything_acked() -> anyhow::Result<()> {
    let run = common::unique("t");
    let dir = tempfile::tempdir()?;
    let base = FleetConfig {
        devices: 3,
        id_prefix: format!("{run}-"),
        count_per_device: Some(20),
        rate: 200.0,
        qos: 1,
        topic: format!("{run}/devices/{{id}}/telemetry"),
        status_topic: format!("{run}/devices/{{id}}/status"),
        progress: ProgressMode::Off,
        ..FleetConfig::default()
    };
    let server = common::write_cert_layout(dir.path(), &base.device_ids())?;
    let proxy = common::Proxy::start(common::MOSQUITTO, Some(server)).await?;

    let cfg = FleetConfig {
        broker: proxy.addr.to_string(),
        tls: Some(TlsSettings {
            certs_dir: Some(dir.path().to_owned()),
            ..Default::default()
        }),
        ..base.clone()
    };
    let report = tokio::time::timeout(
        Duration::from_secs(30),
        fleet::run(cfg, std::future::pending()),
    )
    .await
    .context("fleet run timed out")??;
    assert!(report.tls);
    assert_eq!(report.acked, 60, "{report}");
    assert!(report.all_delivered());
    assert_eq!(proxy.accepted.load(std::sync::atomic::Ordering::Relaxed), 3);
    assert_eq!(report.reconnects, 0);

    // Without a client certificate the handshake is refused: nothing is acknowledged, the
    // devices keep retrying, and the run ends at its duration plus drain timeout.
    let cfg = FleetConfig {
        broker: proxy.addr.to_string(),
        devices: 1,
        count_per_device: None,
        duration: Some(Duration::from_millis(500)),
        drain_timeout: Duration::from_millis(300),
        tls: Some(TlsSettings {
            ca: Some(dir.path().join("ca.pem")),
            ..Default::default()
        }),
        ..base
    };
    let report = tokio::time::timeout(
        Duration::from_secs(10),
        fleet::run(cfg, std::future::pending()),
    )
    .await
    .context("fleet run timed out")??;
    assert_eq!(report.acked, 0);
    assert!(report.connect_errors >= 1, "{report}");
    assert!(!report.all_delivered());
    assert!(proxy.rejected.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    Ok(())
}
