//! End to end: a simulated fleet (firmware-sim) publishes over mutual TLS to the real gateway
//! binary, which forwards through its AMQP uplink to the real RabbitMQ; the verifier reads the
//! queue there and must find every acknowledged message, once per device order.
#![allow(clippy::unwrap_used)]

use std::time::SystemTime;

use gateway_tests::{start_gateway, workspace_binary};
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

#[tokio::test]
async fn fleet_of_100_devices_through_the_gateway_to_rabbitmq_loses_and_reorders_nothing() {
    let sim = workspace_binary("firmware-sim", "firmware-sim");
    let n = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let exchange = format!("e2e-x-{n}");
    let queue = format!("e2e-q-{n}");
    let gw = start_gateway(
        100,
        &format!(
            r#"[[uplinks]]
name = "rabbit"
type = "amqp"
url = "{URL}"
exchange = "{exchange}"
routing_key = "{{topic}}"
declare = true
declare_queue = "{queue}"

[[routes]]
filter = "devices/#"
uplinks = ["rabbit"]
"#
        ),
    );
    let (port, certs, dir) = (gw.port, gw.certs.clone(), gw.dir.path().to_path_buf());

    let manifest = dir.join("manifest.json");
    let run = tokio::process::Command::new(&sim)
        .args(["run", "--broker", &format!("127.0.0.1:{port}")])
        .arg("--certs-dir")
        .arg(&certs)
        .args([
            "--devices",
            "100",
            "--count-per-device",
            "100",
            "--rate",
            "50",
        ])
        .args(["--qos", "1", "--progress", "off", "--json", "--manifest"])
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
        .args([
            "verify",
            "--amqp",
            URL,
            "--queue",
            &queue,
            "--timeout",
            "60",
            "--json",
            "--expect",
        ])
        .arg(&manifest)
        .output()
        .await
        .unwrap();
    let report = String::from_utf8_lossy(&verify.stdout);
    eprintln!("fleet: {summary}\nverifier: {report}");
    assert!(
        verify.status.success(),
        "verifier found problems: {report}\n{}\ngateway log:\n{}",
        String::from_utf8_lossy(&verify.stderr),
        gw.log()
    );
    let v: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    let total = &v["total"];
    assert_eq!(total["missing"], 0, "{report}");
    assert_eq!(total["out_of_order"], 0, "{report}");
    assert!(total["received"].as_u64().unwrap() >= 10_000, "{report}");

    drop(gw);
    let conn = Connection::connect(URL, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
}
