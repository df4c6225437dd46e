//! End to end, commands (issue 12), once through RabbitMQ and once through the Kafka test broker
//! (tansu): `firmware-sim command` publishes commands for 100 devices upstream; the real gateway binary's AMQP downlink takes them and delivers them over
//! mutual TLS to the fleet's devices (persistent sessions). Half the devices are offline while
//! the commands arrive (they subscribed once, then left) and come back afterwards; the online
//! half speaks MQTT 5 (response topic and correlation data), the other 3.1.1. Each device
//! answers every command (ping, set_rate, reboot: it disconnects and reconnects) on its reply
//! topic; the replies go up through the gateway's uplink to the same broker; `firmware-sim verify --commands`
//! must find every confirmed command answered, in the order sent, per device.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant, SystemTime};

use gateway_tests::faults::{http_get, Metrics};
use gateway_tests::{start_gateway, workspace_binary, GatewayProcess};
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};

#[path = "../../gateway/tests/tansu/mod.rs"]
mod tansu;
use tansu::Tansu;

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const COMMANDS: u32 = 10;

async fn metric(gw: &GatewayProcess, name: &str) -> f64 {
    match http_get(gw.admin_port, "/metrics").await {
        Some(text) => Metrics::parse(&text).get(name).unwrap_or(0.0),
        None => 0.0,
    }
}

async fn wait_metric(gw: &GatewayProcess, name: &str, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = metric(gw, name).await;
        if v >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stayed at {v} (waiting for {at_least}); gateway log:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `firmware-sim run` for `devices` devices from `first`, taking commands.
fn fleet(
    sim: &std::path::Path,
    gw: &GatewayProcess,
    first: u32,
    devices: u32,
    expect: u32,
    mqtt: &str,
) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(sim);
    c.args(["run", "--broker", &format!("127.0.0.1:{}", gw.port)])
        .arg("--certs-dir")
        .arg(&gw.certs)
        .args(["--first-device", &first.to_string()])
        .args(["--devices", &devices.to_string()])
        .args(["--count-per-device", "3", "--rate", "5", "--qos", "1"])
        .args(["--commands", "--expect-commands", &expect.to_string()])
        .args(["--mqtt-version", mqtt])
        .args(["--progress", "off", "--json"]);
    c.kill_on_drop(true);
    c
}

/// Where commands come from and replies go: the same broker both ways.
enum Upstream {
    Amqp,
    Kafka(String),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_reach_100_devices_half_of_them_offline_and_every_one_is_answered_in_order() {
    scenario(Upstream::Amqp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_commands_reach_100_devices_half_of_them_offline_and_every_one_is_answered_in_order()
{
    let tansu = Tansu::start();
    scenario(Upstream::Kafka(tansu.bootstrap())).await;
    drop(tansu);
}

async fn scenario(upstream: Upstream) {
    let sim = workspace_binary("firmware-sim", "firmware-sim");
    let n = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let (up_x, up_q) = (format!("cmd-e2e-up-{n}"), format!("cmd-e2e-upq-{n}"));
    let (cmd_x, cmd_q) = (format!("cmd-e2e-x-{n}"), format!("cmd-e2e-q-{n}"));
    let links = match &upstream {
        Upstream::Amqp => format!(
            r#"[[uplinks]]
name = "up"
type = "amqp"
url = "{URL}"
exchange = "{up_x}"
routing_key = "{{topic}}"
declare = true
declare_queue = "{up_q}"

[[downlinks]]
name = "commands"
type = "amqp"
url = "{URL}"
queue = "{cmd_q}"
declare = true
exchange = "{cmd_x}"
"#
        ),
        Upstream::Kafka(bootstrap) => format!(
            r#"[[uplinks]]
name = "up"
type = "kafka"
bootstrap = ["{bootstrap}"]
topic = "{up_q}"
create_topics = true

[[downlinks]]
name = "commands"
type = "kafka"
bootstrap = ["{bootstrap}"]
topic = "{cmd_q}"
backoff_max = "1s"
"#
        ),
    };
    let gw = start_gateway(
        100,
        &format!("{links}\n[[routes]]\nfilter = \"devices/#\"\nuplinks = [\"up\"]\n"),
    );
    let dir = gw.dir.path().to_path_buf();

    // Devices 51-100 make their persistent sessions and subscriptions, then go away.
    let out = fleet(&sim, &gw, 51, 50, 0, "3.1.1").output().await.unwrap();
    assert!(
        out.status.success(),
        "the first run of devices 51-100 failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    wait_metric(&gw, "gateway_subscriptions", 50.0).await;
    // Devices 1-50 are online and stay until they took every command.
    let online = fleet(&sim, &gw, 1, 50, COMMANDS, "5").spawn().unwrap();
    wait_metric(&gw, "gateway_subscriptions", 100.0).await;

    let manifest = dir.join("commands.json");
    let mut command = tokio::process::Command::new(&sim);
    command.arg("command");
    match &upstream {
        Upstream::Amqp => command.args(["--amqp", URL, "--exchange", &cmd_x]),
        Upstream::Kafka(b) => command.args(["--kafka", b, "--topic", &cmd_q]),
    };
    let sent = command
        .args(["--devices", "100", "--count", &COMMANDS.to_string()])
        .args([
            "--reboot-every",
            "7",
            "--set-rate-every",
            "3",
            "--json",
            "--manifest",
        ])
        .arg(&manifest)
        .output()
        .await
        .unwrap();
    let sent_report = String::from_utf8_lossy(&sent.stdout).to_string();
    assert!(
        sent.status.success(),
        "command failed: {sent_report}\n{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    // The offline half's commands are stored in their sessions before they come back.
    wait_metric(
        &gw,
        "gateway_commands_routed_total",
        f64::from(100 * COMMANDS),
    )
    .await;
    let offline = fleet(&sim, &gw, 51, 50, COMMANDS, "3.1.1").spawn().unwrap();
    let (a, b) = tokio::join!(online.wait_with_output(), offline.wait_with_output());
    for (what, out) in [("online", a.unwrap()), ("returning", b.unwrap())] {
        assert!(
            out.status.success(),
            "the {what} half failed: {}\n{}\ngateway log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            gw.log()
        );
    }

    let mut verify = tokio::process::Command::new(&sim);
    verify.arg("verify");
    match &upstream {
        Upstream::Amqp => verify.args(["--amqp", URL, "--queue", &up_q]),
        Upstream::Kafka(b) => verify.args(["--kafka", b, "--topic", &up_q]),
    };
    let verify = verify
        .args(["--timeout", "60", "--json", "--commands"])
        .arg(&manifest)
        .output()
        .await
        .unwrap();
    let report = String::from_utf8_lossy(&verify.stdout).to_string();
    eprintln!("command: {sent_report}\nverifier: {report}");
    assert!(
        verify.status.success(),
        "verifier found problems: {report}\n{}\ngateway log:\n{}",
        String::from_utf8_lossy(&verify.stderr),
        gw.log()
    );
    let v: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    let c = &v["commands"];
    assert_eq!(c["confirmed"], 100 * COMMANDS, "{report}");
    assert_eq!(c["answered"], 100 * COMMANDS, "{report}");
    assert_eq!(c["missing"], 0, "{report}");
    assert_eq!(c["out_of_order"], 0, "{report}");
    // Duplicates: a reboot's command whose PUBACK the device's disconnect cut off comes again
    // (DUP) after the reconnect, and is answered again (not acted on again).
    let kind = match upstream {
        Upstream::Amqp => "amqp",
        Upstream::Kafka(_) => "kafka",
    };
    println!(
        "FAULT scenario=downlink-fleet-{kind} devices=100 offline=50 confirmed={} answered={} missing={} duplicates={} out_of_order={} correlation_mismatch={}",
        c["confirmed"], c["answered"], c["missing"], c["duplicates"], c["out_of_order"], c["correlation_mismatch"]
    );

    drop(gw);
    if let Upstream::Amqp = upstream {
        let conn = Connection::connect(URL, ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        for q in [&up_q, &cmd_q] {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for x in [&up_x, &cmd_x] {
            let _ = ch
                .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
}
