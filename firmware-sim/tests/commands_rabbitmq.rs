//! Commands end to end without the gateway: `firmware-sim command` publishes to a RabbitMQ topic
//! exchange, a stand-in for the gateway's downlink carries them to Mosquitto (MQTT 5, response
//! topic and correlation data from `reply_to` and `correlation_id`), the fleet answers, a
//! stand-in for the uplink carries the replies to a RabbitMQ queue with the gateway's headers,
//! and `verify --commands` finds every command answered, in order. Then the binary reports a
//! command that a second manifest claims but nobody answered, and exits 1.

mod common;

use std::time::Duration;

use anyhow::Context;
use firmware_sim::command::{self, CommandKind};
use firmware_sim::fleet::{self, FleetConfig, MqttVersion, ProgressMode};
use firmware_sim::manifest::CommandManifest;
use firmware_sim::sender::{self, SendConfig, Target};
use firmware_sim::verify::{self, Source, VerifyOptions};
use lapin::options::{ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions};
use lapin::types::FieldTable;
use lapin::ExchangeKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_from_rabbitmq_are_answered_in_order_and_verified() -> anyhow::Result<()> {
    let run = common::unique("k");
    let exchange = format!("{run}-commands");
    let (cconn, cchan, command_queue) = common::declare_queue("kc").await?;
    let (rconn, rchan, reply_queue) = common::declare_queue("kr").await?;
    cchan
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    cchan
        .queue_bind(
            command_queue.as_str().into(),
            exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

    let devices = 4;
    let count = 10;
    let fleet_cfg = FleetConfig {
        broker: common::MOSQUITTO.into(),
        version: MqttVersion::V5,
        devices,
        id_prefix: format!("{run}-"),
        count_per_device: Some(3),
        rate: 20.0,
        topic: format!("{run}/devices/{{id}}/telemetry"),
        status_topic: format!("{run}/devices/{{id}}/status"),
        progress: ProgressMode::Off,
        commands: true,
        reply_topic: format!("{run}/replies/{{id}}"),
        expect_commands: Some(count),
        ..FleetConfig::default()
    };
    let ids = fleet_cfg.device_ids();
    // The devices were online before: their sessions hold what arrives while they are away.
    common::precreate_sessions(&ids, "devices/{id}/commands/#").await?;
    let bridge = common::ReplyBridge::start(
        &format!("{run}/replies/#"),
        &reply_queue,
        &format!("{run}-up"),
    )
    .await?;
    let downlink = common::Downlink::start(&command_queue, &format!("{run}-down")).await?;

    let dir = tempfile::tempdir()?;
    let manifest_path = dir.path().join("commands.json");
    let send_cfg = SendConfig {
        devices,
        id_prefix: format!("{run}-"),
        count,
        set_rate_every: 3,
        reboot_every: 5,
        rate_ms: 200,
        reply_topic: format!("{run}/replies/{{id}}"),
        manifest: Some(manifest_path.clone()),
        ..SendConfig::new(Target::Amqp {
            url: common::AMQP_URL.into(),
            exchange: exchange.clone(),
        })
    };
    let sent = sender::run(&send_cfg).await?;
    assert!(sent.all_confirmed(), "{sent}");
    assert_eq!(
        (sent.confirmed, sent.reboot, sent.set_rate),
        (40, 8, 12),
        "{sent}"
    );
    let manifest = CommandManifest::read(&manifest_path)?;
    assert_eq!(manifest.confirmed(), 40);
    assert_eq!(
        manifest.devices[&ids[0]].confirmed,
        (0..count)
            .map(|n| command::command_id(&ids[0], n))
            .collect::<Vec<_>>()
    );

    // Half the commands are out before the fleet starts; it starts now and takes them all.
    let report = tokio::time::timeout(
        Duration::from_secs(30),
        fleet::run(fleet_cfg, std::future::pending()),
    )
    .await
    .context("fleet did not take its commands in time")??;
    let k = report.commands.context("command counts")?;
    // A reboot closes a socket that may hold unread commands; the broker then sends those
    // again: duplicates (answered again) are allowed, a lost or bad command is not.
    assert_eq!(
        (k.taken() - k.duplicates, k.bad, k.reboots),
        (40, 0, 8),
        "{report}"
    );

    let mut opts = VerifyOptions::new(Source::Amqp {
        url: common::AMQP_URL.into(),
        queue: reply_queue.clone(),
    });
    opts.timeout = Duration::from_secs(20);
    let verdict = verify::verify_all(&opts, None, Some(&manifest)).await?;
    assert!(verdict.passed, "{verdict}");
    let c = verdict.commands.as_ref().context("command report")?;
    assert_eq!(
        (
            c.confirmed,
            c.answered,
            c.missing,
            c.out_of_order,
            c.correlation_mismatch
        ),
        (40, 40, 0, 0, 0),
        "{verdict}"
    );

    // What the downlink saw is the contract: routing key, ids, reply_to, persistent JSON.
    let seen = downlink.seen.lock().map(|s| s.clone()).unwrap_or_default();
    assert_eq!(seen.len(), 40);
    let first = seen
        .iter()
        .find(|s| s.message_id.as_deref() == Some(&command::command_id(&ids[1], 4)))
        .context("dev 2's command 4")?;
    assert_eq!(
        first.routing_key,
        format!("devices.{}.commands.reboot", ids[1])
    );
    assert_eq!(first.correlation_id, first.message_id);
    assert_eq!(first.reply_to, Some(format!("{run}/replies/{}", ids[1])));
    assert_eq!(first.content_type.as_deref(), Some("application/json"));
    assert_eq!(first.delivery_mode, Some(2));
    assert_eq!(
        first.payload,
        command::encode_command(&ids[1], 4, CommandKind::Reboot, None)
    );
    downlink.stop();
    bridge.stop();

    // The binary, with a manifest that claims one more command nobody answered: exit 1.
    let mut claimed = manifest.clone();
    let ghost = format!("{run}-99999");
    claimed.devices.insert(
        ghost.clone(),
        firmware_sim::manifest::CommandRecord {
            confirmed: vec![command::command_id(&ghost, 0)],
            unconfirmed: vec![],
        },
    );
    let claimed_path = dir.path().join("claimed.json");
    claimed.write(&claimed_path)?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_firmware-sim"))
        .args([
            "verify",
            "--amqp",
            common::AMQP_URL,
            "--queue",
            &reply_queue,
        ])
        .arg("--commands-manifest")
        .arg(&claimed_path)
        .args(["--timeout", "1"])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    // The first verify consumed the replies (late duplicates may remain in the queue).
    assert!(
        stdout.contains(&format!("{ghost}: replies 0, missing 1 [{ghost}:0]")),
        "{stdout}"
    );
    assert!(stdout.contains("never answered at the timeout"), "{stdout}");

    cchan
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await?;
    common::delete_queue(cconn, cchan, &command_queue).await?;
    common::delete_queue(rconn, rchan, &reply_queue).await?;
    Ok(())
}
