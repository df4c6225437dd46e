//! End to end through Kafka: a simulated fleet (firmware-sim) publishes over mutual TLS to the real
//! gateway binary, which forwards through its Kafka uplink (creating the topic) to tansu, a
//! Kafka-compatible broker started for this test; the verifier reads every partition of the topic
//! and must find every acknowledged message, in per-device order.
//!
//! Needs `tansu` 0.6.0 (`$TANSU`, `$CARGO_HOME/bin/tansu` or on `PATH`); without it the test
//! fails, saying how to install it.
#![allow(clippy::unwrap_used)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use gateway_tests::{free_port, workspace_binary};

const INSTALL_TANSU: &str =
    "cargo install tansu --version 0.6.0 --locked --features dynostore,libsql";
const DEVICES: u64 = 100;
const PER_DEVICE: u64 = 100;

/// A child process stopped with SIGTERM (then SIGKILL) when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The tansu binary, or a failure saying how to install it.
fn tansu_binary() -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("TANSU") {
        candidates.push(PathBuf::from(p));
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")));
    if let Some(h) = cargo_home {
        candidates.push(h.join("bin/tansu"));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("tansu")));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "tansu (the Kafka-compatible test broker) is not installed: not in $TANSU, \
                 ~/.cargo/bin or PATH. Install it with `{INSTALL_TANSU}`."
            )
        })
}

/// A tansu broker on a free loopback port with its sqlite database in a temporary directory,
/// killed when dropped.
struct Tansu {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Tansu {
    fn start() -> Tansu {
        let bin = tansu_binary();
        let dir = tempfile::tempdir().unwrap();
        // The port is free when we look; should another process take it before tansu binds it,
        // tansu exits, and we try another port.
        for _ in 0..3 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            match start_on(&bin, dir.path(), port) {
                Ok(child) => return Tansu { child, port, dir },
                Err(why) => eprintln!("tansu on port {port}: {why}"),
            }
        }
        panic!("tansu did not start (see above)");
    }

    fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("tansu-{}.log", self.port)))
            .unwrap_or_default()
    }
}

/// Starts tansu on `port` and waits until it accepts connections (or exits).
fn start_on(bin: &Path, dir: &Path, port: u16) -> Result<Child, String> {
    let url = format!("tcp://127.0.0.1:{port}");
    let log_path = dir.join(format!("tansu-{port}.log"));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(bin)
        .arg("broker")
        .args(["--listener-url", &url])
        .args(["--advertised-listener-url", &url])
        // tansu resolves a sqlite URL against its working directory (host + path).
        .args(["--storage-engine", "sqlite://tansu.db"])
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(child);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited ({status}):\n{}", log()));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("not ready within 10 s:\n{}", log()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn fleet_through_the_gateway_to_kafka_loses_and_reorders_nothing() {
    let gateway = workspace_binary("gateway", "gateway");
    let sim = workspace_binary("firmware-sim", "firmware-sim");
    let tansu = Tansu::start();
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let st = Command::new(&gateway)
        .args([
            "certs",
            "generate",
            "--devices",
            &DEVICES.to_string(),
            "--out",
        ])
        .arg(&certs)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );

    let n = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let topic = format!("e2e-{n}");
    let port = free_port();
    let cfg = dir.path().join("gateway.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[queue]
data_dir = "{data}"

[[listeners]]
bind = "127.0.0.1:{port}"
tls = {{ cert = "{c}/server.pem", key = "{c}/server.key", client_ca = "{c}/ca.pem", require_client_cert = true }}

[gateway]
id = "e2e"

[[uplinks]]
name = "kafka"
type = "kafka"
bootstrap = ["{bootstrap}"]
topic = "{topic}"
create_topics = true

[[routes]]
filter = "devices/#"
uplinks = ["kafka"]
"#,
            data = dir.path().join("data").display(),
            c = certs.display(),
            bootstrap = tansu.bootstrap(),
        ),
    )
    .unwrap();
    let gw = Running(
        Command::new(&gateway)
            .arg("run")
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the gateway did not start listening"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let manifest = dir.path().join("manifest.json");
    let run = tokio::process::Command::new(&sim)
        .args(["run", "--broker", &format!("127.0.0.1:{port}")])
        .arg("--certs-dir")
        .arg(&certs)
        .args(["--devices", &DEVICES.to_string()])
        .args(["--count-per-device", &PER_DEVICE.to_string()])
        .args(["--rate", "50", "--qos", "1", "--progress", "off", "--json"])
        .arg("--manifest")
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
        .args(["verify", "--kafka", &tansu.bootstrap(), "--topic", &topic])
        .args(["--timeout", "60", "--json", "--expect"])
        .arg(&manifest)
        .output()
        .await
        .unwrap();
    let report = String::from_utf8_lossy(&verify.stdout);
    eprintln!("fleet: {summary}\nverifier: {report}");
    assert!(
        verify.status.success(),
        "verifier found problems: {report}\n{}\nbroker log:\n{}",
        String::from_utf8_lossy(&verify.stderr),
        tansu.log()
    );
    let v: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    let total = &v["total"];
    assert_eq!(total["missing"], 0, "{report}");
    assert_eq!(total["out_of_order"], 0, "{report}");
    assert_eq!(total["undecodable"], 0, "{report}");
    assert!(
        total["received"].as_u64().unwrap() >= DEVICES * PER_DEVICE,
        "{report}"
    );

    // A topic the gateway never wrote is an error (exit 2), not an empty pass or a wait.
    let missing = tokio::process::Command::new(&sim)
        .args(["verify", "--kafka", &tansu.bootstrap()])
        .args(["--topic", &format!("{topic}-missing"), "--timeout", "10"])
        .arg("--expect")
        .arg(&manifest)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(missing.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("topic not found"), "{stderr}");

    drop(gw);
    drop(tansu);
}
