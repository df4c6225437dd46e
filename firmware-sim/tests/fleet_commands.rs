//! Devices taking commands, against the local Mosquitto (127.0.0.1:1883) as the broker, no
//! gateway: a test client publishes commands straight to `devices/{id}/commands/{name}` and reads
//! the replies. The device sessions are created first (as the gateway would find them: devices
//! that were online before), so commands published while the fleet is not yet running wait in
//! Mosquitto for the devices, like commands for an offline device.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use firmware_sim::command::{self, CommandKind};
use firmware_sim::fleet::{self, FleetConfig, FleetReport, MqttVersion, ProgressMode};
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc::UnboundedReceiver;

/// One reply as the test saw it: (topic, payload, correlation data).
type Seen = (String, command::Reply, Option<Vec<u8>>);

/// A connected MQTT 5 client; the event loop runs in a task that forwards every PUBLISH.
async fn client(
    client_id: &str,
    clean: bool,
    subscribe: Option<&str>,
) -> anyhow::Result<(AsyncClient, UnboundedReceiver<Seen>)> {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", 1883);
    opts.set_keep_alive(Duration::from_secs(30))
        .set_clean_start(clean);
    if !clean {
        opts.set_session_expiry_interval(Some(300));
    }
    let (client, mut el) = AsyncClient::new(opts, 256);
    if let Some(filter) = subscribe {
        client.subscribe(filter, QoS::AtLeastOnce).await?;
    }
    // Wait for the CONNACK (and the SUBACK) before anything else.
    let want_suback = subscribe.is_some();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) if !want_suback => break,
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("{client_id}: {e} (is Mosquitto running on 127.0.0.1:1883?)"),
            Err(_) => bail!("{client_id}: no CONNACK/SUBACK within 5 s"),
        }
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let keep = client.clone();
    tokio::spawn(async move {
        let _client = keep;
        while let Ok(ev) = el.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = ev {
                let topic = String::from_utf8_lossy(&p.topic).into_owned();
                let Ok(reply) = command::parse_reply(&p.payload) else {
                    continue;
                };
                let corr = p
                    .properties
                    .and_then(|pr| pr.correlation_data)
                    .map(|c| c.to_vec());
                if tx.send((topic, reply, corr)).is_err() {
                    break;
                }
            }
        }
    });
    Ok((client, rx))
}

/// Publishes command `n` of `device` as the gateway would deliver it.
async fn send(
    publisher: &AsyncClient,
    device: &str,
    n: u64,
    kind: CommandKind,
    response_topic: Option<String>,
) -> anyhow::Result<()> {
    let payload = command::encode_command(device, n, kind, Some(200));
    let topic = format!("devices/{device}/commands/{}", kind.name());
    match response_topic {
        Some(rt) => {
            let props = PublishProperties {
                response_topic: Some(rt),
                correlation_data: Some(format!("corr-{device}:{n}").into_bytes().into()),
                ..Default::default()
            };
            publisher
                .publish_with_properties(topic, QoS::AtLeastOnce, false, payload, props)
                .await?
        }
        None => {
            publisher
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await?
        }
    }
    Ok(())
}

/// Collects replies until `done` says so, or fails at the deadline with what it has.
async fn collect(
    rx: &mut UnboundedReceiver<Seen>,
    seen: &mut BTreeMap<String, Vec<Seen>>,
    done: impl Fn(&BTreeMap<String, Vec<Seen>>) -> bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done(seen) {
        let Ok(Some(r)) = tokio::time::timeout_at(deadline, rx.recv()).await else {
            bail!("replies so far: {seen:#?}");
        };
        let Some((device, _)) = command::split_command_id(&r.1.id) else {
            bail!("reply with a malformed id: {r:?}");
        };
        seen.entry(device.to_owned()).or_default().push(r);
    }
    Ok(())
}

/// The command numbers in the order of their first answer.
fn first_answers(got: &[Seen]) -> Vec<u64> {
    let mut seen = std::collections::BTreeSet::new();
    got.iter()
        .map(|r| r.1.n)
        .filter(|n| seen.insert(*n))
        .collect()
}

fn commands_of(report: &FleetReport) -> anyhow::Result<fleet::CommandCounts> {
    report.commands.context("report has command counts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_devices_answer_every_command_in_order_with_correlation_data_across_a_reboot(
) -> anyhow::Result<()> {
    let run = common::unique("c");
    let cfg = FleetConfig {
        broker: common::MOSQUITTO.into(),
        version: MqttVersion::V5,
        devices: 3,
        id_prefix: format!("{run}-"),
        count_per_device: Some(5),
        rate: 50.0,
        qos: 1,
        topic: format!("{run}/devices/{{id}}/telemetry"),
        status_topic: format!("{run}/devices/{{id}}/status"),
        progress: ProgressMode::Off,
        commands: true,
        expect_commands: Some(8),
        ..FleetConfig::default()
    };
    let ids = cfg.device_ids();
    common::precreate_sessions(&ids, "devices/{id}/commands/#").await?;
    let (publisher, mut replies) = client(
        &format!("{run}-pub"),
        true,
        Some(&format!("{run}/replies/#")),
    )
    .await?;
    let kind = |n: u64| command::planned_kind(n, 3, 4);
    let rt = |id: &str| Some(format!("{run}/replies/{id}"));
    // The first half waits in Mosquitto for devices that are not online yet (n = 3 is a reboot).
    for n in 0..4 {
        for id in &ids {
            send(&publisher, id, n, kind(n), rt(id)).await?;
        }
    }
    let fleet = tokio::spawn(fleet::run(cfg, std::future::pending()));
    let mut seen = BTreeMap::new();
    collect(&mut replies, &mut seen, |s| {
        s.len() == ids.len() && s.values().all(|v| first_answers(v).len() >= 4)
    })
    .await?;
    // The second half reaches devices that are online (or reconnecting after the reboot).
    for n in 4..8 {
        for id in &ids {
            send(&publisher, id, n, kind(n), rt(id)).await?;
        }
    }
    collect(&mut replies, &mut seen, |s| {
        s.values().all(|v| v.len() >= 8)
    })
    .await?;
    let report = tokio::time::timeout(Duration::from_secs(20), fleet)
        .await
        .context("fleet did not finish after its expected commands")???;

    for id in &ids {
        let got = &seen[id];
        assert_eq!(
            first_answers(got),
            (0..8).collect::<Vec<_>>(),
            "{id}: replies in order"
        );
        for (topic, reply, corr) in got {
            let n = reply.n;
            assert_eq!(topic, &format!("{run}/replies/{id}"));
            assert_eq!(reply.id, format!("{id}:{n}"));
            assert_eq!(reply.cmd, kind(n).name());
            assert_eq!(corr.as_deref(), Some(format!("corr-{id}:{n}").as_bytes()));
        }
    }
    let k = commands_of(&report)?;
    // Per device: n = 2 and 5 set_rate, 3 and 7 reboot, the rest ping. A reboot closes a
    // socket that may hold unread commands, which the broker then sends again: duplicates
    // (answered again, not acted on again) are allowed.
    assert_eq!(k.taken() - k.duplicates, 24, "{report}");
    assert_eq!(k.bad, 0, "{report}");
    assert!(k.set_rate >= 6 && k.reboot >= 6, "{report}");
    assert_eq!(k.reboots, 6, "{report}");
    assert_eq!(k.replies_acked, k.taken(), "{report}");
    assert!(report.all_delivered(), "{report}");
    assert!(report.reconnects >= 6, "a reboot is a reconnect: {report}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_devices_reply_on_their_reply_topic_count_bad_and_duplicate_commands(
) -> anyhow::Result<()> {
    let run = common::unique("d");
    let cfg = FleetConfig {
        broker: common::MOSQUITTO.into(),
        version: MqttVersion::V311,
        devices: 2,
        id_prefix: format!("{run}-"),
        count_per_device: Some(1),
        qos: 1,
        topic: format!("{run}/devices/{{id}}/telemetry"),
        status_topic: format!("{run}/devices/{{id}}/status"),
        progress: ProgressMode::Off,
        commands: true,
        expect_commands: Some(3),
        ..FleetConfig::default()
    };
    let ids = cfg.device_ids();
    // MQTT 3.1.1 devices get the MQTT 5 sessions pre-created; Mosquitto keeps them either way.
    common::precreate_sessions(&ids, "devices/{id}/commands/#").await?;
    let (publisher, mut replies) = client(&format!("{run}-pub"), true, None).await?;
    for id in &ids {
        publisher
            .subscribe(format!("devices/{id}/replies"), QoS::AtLeastOnce)
            .await?;
    }
    for id in &ids {
        let topic = format!("devices/{id}/commands/ping");
        publisher
            .publish(&topic, QoS::AtLeastOnce, false, "hi")
            .await?;
        publisher
            .publish(
                format!("devices/{id}/commands/launch"),
                QoS::AtLeastOnce,
                false,
                command::encode_command(id, 0, CommandKind::Ping, None),
            )
            .await?;
        for n in [0, 1, 1, 2] {
            send(&publisher, id, n, CommandKind::Ping, None).await?;
        }
    }
    let fleet = tokio::spawn(fleet::run(cfg, std::future::pending()));
    let mut seen = BTreeMap::new();
    collect(&mut replies, &mut seen, |s| {
        s.len() == ids.len() && s.values().all(|v| v.len() >= 4)
    })
    .await?;
    let report = tokio::time::timeout(Duration::from_secs(20), fleet)
        .await
        .context("fleet did not finish")???;
    for id in &ids {
        let got = &seen[id];
        let ns: Vec<u64> = got.iter().map(|r| r.1.n).collect();
        assert_eq!(ns, [0, 1, 1, 2], "{id}: the duplicate is answered again");
        assert!(got
            .iter()
            .all(|(t, _, corr)| t == &format!("devices/{id}/replies") && corr.is_none()));
    }
    let k = commands_of(&report)?;
    assert_eq!((k.ping, k.duplicates, k.bad), (8, 2, 4), "{report}");
    assert_eq!(k.reboots, 0);
    // Clean up the sessions (MQTT 3.1.1 sessions do not expire in Mosquitto).
    for id in &ids {
        let (c, _) = client(id, true, None).await?;
        c.disconnect().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_survive_connection_cuts_and_are_answered_in_order() -> anyhow::Result<()> {
    let run = common::unique("e");
    let proxy = common::Proxy::start(common::MOSQUITTO, None).await?;
    let cfg = FleetConfig {
        broker: proxy.addr.to_string(),
        version: MqttVersion::V5,
        devices: 3,
        id_prefix: format!("{run}-"),
        count_per_device: Some(1),
        qos: 1,
        topic: format!("{run}/devices/{{id}}/telemetry"),
        status_topic: format!("{run}/devices/{{id}}/status"),
        backoff: fleet::BackoffConfig {
            min: Duration::from_millis(20),
            max: Duration::from_millis(200),
        },
        progress: ProgressMode::Off,
        commands: true,
        expect_commands: Some(30),
        ..FleetConfig::default()
    };
    let ids = cfg.device_ids();
    common::precreate_sessions(&ids, "devices/{id}/commands/#").await?;
    let (publisher, mut replies) = client(
        &format!("{run}-pub"),
        true,
        Some(&format!("{run}/replies/#")),
    )
    .await?;
    let fleet = tokio::spawn(fleet::run(cfg, std::future::pending()));
    let mut seen = BTreeMap::new();
    for part in 0..3u64 {
        proxy
            .wait_active(3, Duration::from_secs(10))
            .await
            .with_context(|| format!("before part {part}"))?;
        for n in part * 10..part * 10 + 10 {
            for id in &ids {
                let rt = Some(format!("{run}/replies/{id}"));
                send(&publisher, id, n, CommandKind::Ping, rt).await?;
            }
        }
        // Cut while those commands are in flight; the sessions keep what is not acknowledged.
        proxy.cut_all();
    }
    collect(&mut replies, &mut seen, |s| {
        s.len() == ids.len() && s.values().all(|v| first_answers(v).len() >= 30)
    })
    .await?;
    let report = tokio::time::timeout(Duration::from_secs(20), fleet)
        .await
        .context("fleet did not finish after its expected commands")???;
    for id in &ids {
        assert_eq!(
            first_answers(&seen[id]),
            (0..30).collect::<Vec<_>>(),
            "{id}: every command answered, first answers in order"
        );
    }
    let k = commands_of(&report)?;
    assert_eq!((k.taken() - k.duplicates, k.bad), (90, 0), "{report}");
    assert!(report.connection_losses >= 3, "{report}");
    Ok(())
}
