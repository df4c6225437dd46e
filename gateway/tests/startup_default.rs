//! A newcomer's first run: `gateway run --config config/gateway.toml` in an empty directory makes
//! the development certificates, listens with TLS on 8883, serves the admin endpoint on
//! 127.0.0.1:9100 (ready), and delivers a `mosquitto_pub` message to the local RabbitMQ's
//! `telemetry` queue, which its default AMQP uplink declared.
//!
//! It uses the shipped defaults as they are, so it binds the fixed ports 8883 and 9100 (no other
//! test does).
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use lapin::options::BasicGetOptions;
use lapin::{Connection, ConnectionProperties};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get(path: &str) -> Option<(u16, String)> {
    let mut tcp = std::net::TcpStream::connect_timeout(
        &"127.0.0.1:9100".parse().ok()?,
        Duration::from_secs(2),
    )
    .ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut s = String::new();
    tcp.read_to_string(&mut s).ok()?;
    let code = s.get(9..12)?.parse().ok()?;
    Some((code, s.split_once("\r\n\r\n")?.1.to_string()))
}

#[tokio::test]
async fn default_config_on_a_clean_directory_starts_ready_and_delivers_to_rabbitmq() {
    let dir = tempfile::tempdir().unwrap();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/gateway.toml");
    let log = std::fs::File::create(dir.path().join("gateway.log")).unwrap();
    let _gw = Kill(
        Command::new(env!("CARGO_BIN_EXE_gateway"))
            .current_dir(dir.path())
            .arg("run")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let logs = || std::fs::read_to_string(dir.path().join("gateway.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    let ready = loop {
        if let Some((200, body)) = get("/readyz") {
            break body;
        }
        assert!(Instant::now() < deadline, "not ready in 30 s:\n{}", logs());
        std::thread::sleep(Duration::from_millis(100));
    };
    let v: serde_json::Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(v["ready"], true, "{ready}");
    assert_eq!(v["listeners"][0]["addr"], "0.0.0.0:8883", "{ready}");
    assert_eq!(v["listeners"][0]["tls"], true, "{ready}");
    assert_eq!(v["uplinks"][0]["name"], "rabbit", "{ready}");
    assert!(std::net::TcpStream::connect("127.0.0.1:8883").is_ok());
    let certs = dir.path().join("certs/dev");
    for f in [
        "ca.pem",
        "server.pem",
        "server.key",
        "devices/dev-00001.pem",
    ] {
        assert!(certs.join(f).exists(), "{f} was not made");
    }
    assert!(dir.path().join("data").is_dir());
    let log = logs();
    for line in [
        "listening for MQTT devices",
        "queue ready",
        "uplink configured",
        "admin endpoint",
    ] {
        assert!(
            log.contains(line),
            "the first lines do not say {line:?}:\n{log}"
        );
    }
    assert!(
        log.contains("guest:***@127.0.0.1:5672"),
        "target not shown masked:\n{log}"
    );
    assert!(
        !log.contains("guest:guest"),
        "a password was logged:\n{log}"
    );

    // The uplink connects and declares `telemetry`; then a device message arrives there.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !get("/readyz").is_some_and(|(_, b)| b.contains("\"state\":\"connected\"")) {
        assert!(
            Instant::now() < deadline,
            "the uplink did not connect:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let marker = format!(
        "first-run-{}",
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let d = certs.join("devices");
    let st = Command::new("mosquitto_pub")
        .args([
            "-h",
            "localhost",
            "-p",
            "8883",
            "-q",
            "1",
            "-i",
            "dev-00001",
        ])
        .arg("--cafile")
        .arg(certs.join("ca.pem"))
        .arg("--cert")
        .arg(d.join("dev-00001.pem"))
        .arg("--key")
        .arg(d.join("dev-00001.key"))
        .args(["-t", "devices/dev-00001/temp", "-m", &marker])
        .status()
        .expect("mosquitto_pub (Debian's mosquitto-clients) is needed");
    assert!(st.success());
    let conn = Connection::connect(URL, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    'found: loop {
        // Earlier runs may have left messages in the shared `telemetry` queue: take them all.
        while let Some(m) = ch
            .basic_get("telemetry".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            if m.delivery.data == marker.as_bytes() {
                break 'found;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the message did not reach RabbitMQ's telemetry queue:\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
