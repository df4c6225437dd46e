//! Connections cut in the middle of a run (a proxy between the fleet and Mosquitto drops every
//! socket, twice): devices reconnect with backoff, resend what was not acknowledged, and the
//! verifier - reading a RabbitMQ queue fed by an MQTT-to-AMQP bridge standing in for the
//! gateway - finds nothing acknowledged missing and nothing out of order.

mod common;

use std::time::Duration;

use anyhow::Context;
use firmware_sim::device::FullPolicy;
use firmware_sim::fleet::{self, BackoffConfig, FleetConfig, FleetReport, ProgressMode};
use firmware_sim::verify::{self, Source, VerifyOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_mid_run_lose_nothing_acknowledged_and_keep_order() -> anyhow::Result<()> {
    let run = common::unique("x");
    let (conn, channel, queue) = common::declare_queue("x").await?;
    let bridge = common::Bridge::start(
        &format!("{run}/devices/+/telemetry"),
        &queue,
        &format!("{run}-bridge"),
    )
    .await?;
    let proxy = common::Proxy::start(common::MOSQUITTO, None).await?;

    let cfg = FleetConfig {
        broker: proxy.addr.to_string(),
        devices: 5,
        id_prefix: format!("{run}-"),
        // 3 s of readings at 200/s: the fleet is still mid-run at both cuts, however long the
        // waits for its connections take under load.
        count_per_device: Some(600),
        rate: 200.0,
        qos: 1,
        topic: format!("{run}/devices/{{id}}/telemetry"),
        status_topic: format!("{run}/devices/{{id}}/status"),
        backoff: BackoffConfig {
            min: Duration::from_millis(20),
            max: Duration::from_millis(200),
        },
        progress: ProgressMode::Off,
        ..FleetConfig::default()
    };
    let fleet = tokio::spawn(fleet::run(cfg, std::future::pending()));
    for cut in 1..=2 {
        // Every device connected (again) and publishing: the cut is a loss for each of them.
        proxy
            .wait_active(5, Duration::from_secs(10))
            .await
            .with_context(|| format!("before cut {cut}"))?;
        proxy.cut_all();
    }
    let report = tokio::time::timeout(Duration::from_secs(30), fleet)
        .await
        .context("fleet run timed out")???;

    assert_eq!(report.acked, 3000, "{report}");
    assert!(report.all_delivered(), "{report}");
    assert!(
        report.connection_losses >= 10,
        "every device lost its connection twice: {report}"
    );
    assert!(report.reconnects >= 10, "{report}");
    for (id, d) in &report.manifest.devices {
        assert_eq!(d.acked.ranges(), [(0, 599)], "{id}");
    }

    let mut opts = VerifyOptions::new(Source::Amqp {
        url: common::AMQP_URL.into(),
        queue: queue.clone(),
    });
    opts.timeout = Duration::from_secs(15);
    opts.settle = Duration::from_millis(300);
    let verdict = verify::verify(&opts, &report.manifest).await?;
    bridge.stop();
    eprintln!("{report}\n{verdict}");
    common::delete_queue(conn, channel, &queue).await?;
    assert!(verdict.passed, "{verdict}");
    assert_eq!(verdict.total.missing, 0);
    assert_eq!(verdict.total.out_of_order, 0);
    assert_eq!(verdict.total.unique, 3000);
    // Resends after the cuts may arrive twice; the verifier counts them, they do not fail it.
    assert_eq!(verdict.total.received, 3000 + verdict.total.duplicates);
    Ok(())
}

/// Runs 3 devices x 200 readings (1 s at 200/s, outbox 8) under `policy`, with the broker
/// unreachable for 1.5 s from when every device is connected and publishing (so the readings
/// taken during the outage overflow the outbox even if the fleet is slowed down); returns the
/// report.
async fn run_with_outage(run: &str, policy: FullPolicy) -> anyhow::Result<FleetReport> {
    let proxy = common::Proxy::start(common::MOSQUITTO, None).await?;
    let cfg = FleetConfig {
        broker: proxy.addr.to_string(),
        devices: 3,
        id_prefix: format!("{run}-"),
        count_per_device: Some(200),
        rate: 200.0,
        outbox: 8,
        policy,
        topic: format!("{run}/devices/{{id}}/telemetry"),
        status_topic: format!("{run}/devices/{{id}}/status"),
        backoff: BackoffConfig {
            min: Duration::from_millis(20),
            max: Duration::from_millis(100),
        },
        progress: ProgressMode::Off,
        ..FleetConfig::default()
    };
    let fleet = tokio::spawn(fleet::run(cfg, std::future::pending()));
    proxy
        .wait_active(3, Duration::from_secs(10))
        .await
        .context("before the outage")?;
    proxy.refuse(true);
    proxy.cut_all();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.refuse(false);
    let report = tokio::time::timeout(Duration::from_secs(30), fleet)
        .await
        .context("fleet run timed out")???;
    // Every sequence number is accounted for exactly once.
    for (id, d) in &report.manifest.devices {
        let accounted = d.acked.count() + d.unacked.count() + d.dropped.count() + d.unsent.count();
        assert_eq!(accounted, d.next_seq, "{id}: {d:?}");
    }
    assert!(report.connect_errors > 0, "the outage was seen: {report}");
    Ok(report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_with_drop_oldest_counts_drops_and_the_verifier_does_not_call_them_missing(
) -> anyhow::Result<()> {
    let run = common::unique("d");
    let (conn, channel, queue) = common::declare_queue("d").await?;
    let bridge = common::Bridge::start(
        &format!("{run}/devices/+/telemetry"),
        &queue,
        &format!("{run}-bridge"),
    )
    .await?;
    let report = run_with_outage(&run, FullPolicy::DropOldest).await?;
    assert_eq!(report.sampled, 600, "drop-oldest keeps sampling: {report}");
    // How many depends on how fast the fleet samples; that every device dropped some does not.
    assert!(report.dropped >= 10, "{report}");
    for (id, d) in &report.manifest.devices {
        assert!(d.dropped.count() > 0, "{id} dropped nothing: {d:?}");
    }
    assert_eq!(report.blocked, 0);
    assert_eq!(report.acked + report.dropped, 600, "{report}");

    let mut opts = VerifyOptions::new(Source::Amqp {
        url: common::AMQP_URL.into(),
        queue: queue.clone(),
    });
    opts.timeout = Duration::from_secs(15);
    opts.settle = Duration::from_millis(300);
    let verdict = verify::verify(&opts, &report.manifest).await?;
    bridge.stop();
    common::delete_queue(conn, channel, &queue).await?;
    eprintln!("{report}\n{verdict}");
    assert!(verdict.passed, "{verdict}");
    assert_eq!(verdict.total.missing, 0);
    assert_eq!(verdict.total.out_of_order, 0);
    // A dropped reading that had been sent before the cut may still have arrived.
    assert_eq!(
        verdict.total.dropped_on_device + verdict.total.arrived_unacked,
        report.dropped
    );
    assert!(verdict.total.dropped_on_device > 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_with_block_skips_readings_and_leaves_no_gaps() -> anyhow::Result<()> {
    let run = common::unique("b");
    let report = run_with_outage(&run, FullPolicy::Block).await?;
    eprintln!("{report}");
    // How many depends on how fast the fleet samples; that every device blocked some (below)
    // does not.
    assert!(report.blocked >= 10, "{report}");
    assert_eq!(report.dropped, 0);
    assert_eq!(
        report.sampled, 600,
        "blocked readings use no sequence number"
    );
    for (id, d) in &report.manifest.devices {
        assert_eq!(d.acked.ranges(), [(0, 199)], "{id}");
        assert!(d.blocked > 0, "{id}");
    }
    Ok(())
}
