//! End to end, commands (issue 12): `firmware-sim command` publishes commands for 100 devices to
//! the real RabbitMQ; the real gateway binary's AMQP downlink takes them and delivers them over
//! mutual TLS to the fleet's devices (persistent sessions). Half the devices are offline while
//! the commands arrive (they subscribed once, then left) and come back afterwards; the online
//! half speaks MQTT 5 (response topic and correlation data), the other 3.1.1. Each device
//! answers every command (ping, set_rate, reboot: it disconnects and reconnects) on its reply
//! topic; the replies go up through the gateway's AMQP uplink; `firmware-sim verify --commands`
//! must find every confirmed command answered, in the order sent, per device.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant, SystemTime};

use gateway_tests::faults::{http_get, Metrics};
use gateway_tests::{start_gateway, workspace_binary, GatewayProcess};
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_reach_100_devices_half_of_them_offline_and_every_one_is_answered_in_order() {
    let sim = workspace_binary("firmware-sim", "firmware-sim");
    let n = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let (up_x, up_q) = (format!("cmd-e2e-up-{n}"), format!("cmd-e2e-upq-{n}"));
    let (cmd_x, cmd_q) = (format!("cmd-e2e-x-{n}"), format!("cmd-e2e-q-{n}"));
    let gw = start_gateway(
        100,
        &format!(
            r#"[[uplinks]]
name = "rabbit"
type = "amqp"
url = "{URL}"
exchange = "{up_x}"
routing_key = "{{topic}}"
declare = true
declare_queue = "{up_q}"

[[routes]]
filter = "devices/#"
uplinks = ["rabbit"]

[[downlinks]]
name = "commands"
type = "amqp"
url = "{URL}"
queue = "{cmd_q}"
declare = true
exchange = "{cmd_x}"
"#
        ),
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
    let sent = tokio::process::Command::new(&sim)
        .args(["command", "--amqp", URL, "--exchange", &cmd_x])
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
        "gateway_downlink_acked_total",
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

    let verify = tokio::process::Command::new(&sim)
        .args(["verify", "--amqp", URL, "--queue", &up_q])
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
    println!(
        "FAULT scenario=downlink-fleet devices=100 offline=50 confirmed={} answered={} missing={} duplicates={} out_of_order={} correlation_mismatch={}",
        c["confirmed"], c["answered"], c["missing"], c["duplicates"], c["out_of_order"], c["correlation_mismatch"]
    );

    drop(gw);
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
