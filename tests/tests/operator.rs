//! The operator's promises, end to end with the real binary, fleet, verifier and RabbitMQ:
//! `/metrics` tells the truth, a reload under load drops no device and loses nothing, and a
//! SIGTERM under load followed by a restart loses nothing.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use gateway_tests::{free_port, workspace_binary};
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn unique(prefix: &str) -> String {
    let n = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{n}")
}

/// A gateway on a fixed data dir, port and config file, restartable.
struct Gw {
    dir: tempfile::TempDir,
    certs: PathBuf,
    config: PathBuf,
    port: u16,
    admin: u16,
    exchange: String,
    queue: String,
    child: Option<Child>,
    starts: u32,
}

impl Gw {
    fn new(devices: usize) -> Gw {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        gateway_tests::bench::generate_certs(
            &workspace_binary("gateway", "gateway"),
            devices,
            &certs,
        )
        .unwrap();
        let config = dir.path().join("gateway.toml");
        Gw {
            config,
            certs,
            dir,
            port: free_port(),
            admin: free_port(),
            exchange: unique("op-x"),
            queue: unique("op-q"),
            child: None,
            starts: 0,
        }
    }

    /// Writes the config: one AMQP uplink `rabbit` (`uplink_extra` appended to it) and the
    /// given routes.
    fn write_config(&self, uplink_extra: &str, routes: &str) {
        std::fs::write(
            &self.config,
            format!(
                r#"[queue]
data_dir = "{data}"

[[listeners]]
bind = "127.0.0.1:{port}"
tls = {{ cert = "{c}/server.pem", key = "{c}/server.key", client_ca = "{c}/ca.pem", require_client_cert = true }}

[gateway]
id = "op"
shutdown_grace = "5s"

[admin]
listen = "127.0.0.1:{admin}"

[[uplinks]]
name = "rabbit"
type = "amqp"
url = "{URL}"
exchange = "{x}"
routing_key = "{{topic}}"
declare = true
declare_queue = "{q}"
{uplink_extra}

{routes}
"#,
                data = self.dir.path().join("data").display(),
                port = self.port,
                c = self.certs.display(),
                admin = self.admin,
                x = self.exchange,
                q = self.queue,
            ),
        )
        .unwrap();
    }

    fn start(&mut self) {
        self.starts += 1;
        let log =
            std::fs::File::create(self.dir.path().join(format!("gateway-{}.log", self.starts)))
                .unwrap();
        let child = Command::new(workspace_binary("gateway", "gateway"))
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        // The MQTT listener is bound before the admin endpoint: wait for both, or the first
        // scrape after a restart can find the admin port closed.
        for port in [self.port, self.admin] {
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "the gateway did not listen on {port}: {}",
                    self.logs()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn logs(&self) -> String {
        (1..=self.starts)
            .map(|n| {
                std::fs::read_to_string(self.dir.path().join(format!("gateway-{n}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n---- restart ----\n")
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id();
        assert!(Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .unwrap()
            .success());
    }

    /// SIGTERM, then the exit status (None: still running after `within`, then killed).
    fn stop(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    fn http(&self, method: &str, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", self.admin)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        write!(
            tcp,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut s = String::new();
        tcp.read_to_string(&mut s).unwrap();
        let code = s[9..12].parse().unwrap();
        let body = s.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
        (code, body)
    }

    /// `/metrics` as name{labels} -> value.
    fn metrics(&self) -> HashMap<String, f64> {
        let (code, body) = self.http("GET", "/metrics");
        assert_eq!(code, 200);
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    fn metric(&self, key: &str) -> f64 {
        *self
            .metrics()
            .get(key)
            .unwrap_or_else(|| panic!("no metric {key}"))
    }

    /// Waits until the uplink's cursor has caught up.
    fn wait_drained(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.metric("gateway_uplink_lag_records{uplink=\"rabbit\"}") == 0.0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the uplink did not drain: {}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    async fn cleanup(&self) {
        let conn = Connection::connect(URL, ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let _ = ch
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = ch
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

const ROUTE_ALL: &str = "[[routes]]\nfilter = \"devices/#\"\nuplinks = [\"rabbit\"]\n";

/// Starts the fleet in the background; the task yields its JSON report.
fn spawn_fleet(
    gw: &Gw,
    manifest: &Path,
    args: &'static [&'static str],
) -> tokio::task::JoinHandle<serde_json::Value> {
    start_fleet(gw, manifest, args).1
}

/// Like [`spawn_fleet`], and also the fleet's pid, so that the test can end it (SIGTERM: the
/// fleet stops sampling, drains its outstanding acknowledgements and exits).
fn start_fleet(
    gw: &Gw,
    manifest: &Path,
    args: &'static [&'static str],
) -> (u32, tokio::task::JoinHandle<serde_json::Value>) {
    let sim = workspace_binary("firmware-sim", "firmware-sim");
    let child = tokio::process::Command::new(sim)
        .args(["run", "--broker", &format!("127.0.0.1:{}", gw.port)])
        .arg("--certs-dir")
        .arg(&gw.certs)
        .args(args)
        .args(["--qos", "1", "--progress", "off", "--json", "--manifest"])
        .arg(manifest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A failed test must not leave a fleet running.
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let run = tokio::spawn(async move {
        let out = child.wait_with_output().await.unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let f: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        eprintln!("fleet: {f}");
        f
    });
    (pid, run)
}

/// Waits for the uplink to catch up, runs the verifier, and asserts nothing acknowledged is
/// missing or out of order; returns its report.
async fn verify_delivered(gw: &Gw, manifest: &Path) -> serde_json::Value {
    gw.wait_drained();
    let v = verify(gw, manifest).await;
    assert_eq!(v["total"]["missing"], 0);
    assert_eq!(v["total"]["out_of_order"], 0);
    v
}

/// SIGTERM must end in exit 0; then the test's exchange and queue go.
async fn stop_cleanly(mut gw: Gw) {
    assert_eq!(
        gw.stop(Duration::from_secs(20)).map(|s| s.code()),
        Some(Some(0))
    );
    gw.cleanup().await;
}

async fn verify(gw: &Gw, manifest: &Path) -> serde_json::Value {
    let out = tokio::process::Command::new(workspace_binary("firmware-sim", "firmware-sim"))
        .args(["verify", "--amqp", URL, "--queue", &gw.queue])
        .args(["--timeout", "60", "--json", "--expect"])
        .arg(manifest)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("verifier: {text}");
    assert!(
        out.status.success(),
        "verifier found problems: {text}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.logs()
    );
    serde_json::from_str(text.trim()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_what_the_fleet_and_the_verifier_counted() {
    let mut gw = Gw::new(20);
    gw.write_config("", ROUTE_ALL);
    gw.start();
    let manifest = gw.dir.path().join("manifest.json");
    let f = spawn_fleet(
        &gw,
        &manifest,
        &[
            "--devices",
            "20",
            "--count-per-device",
            "50",
            "--rate",
            "25",
        ],
    )
    .await
    .unwrap();
    gw.wait_drained();
    let v = verify(&gw, &manifest).await;
    let m = gw.metrics();
    let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no metric {k}"));
    let acked = f["acked"].as_f64().unwrap();
    assert_eq!(acked, 1000.0);
    assert_eq!(f["resent"], 0, "no faults here: nothing may be re-sent");
    assert_eq!(get("gateway_publishes_received_total{qos=\"1\"}"), acked);
    assert_eq!(get("gateway_publishes_received_total{qos=\"0\"}"), 0.0);
    assert_eq!(get("gateway_acks_sent_total"), acked);
    assert_eq!(get("gateway_queue_appended_records_total"), acked);
    // Plus one: start() probes the port with a bare TCP connect.
    assert_eq!(
        get("gateway_connections_total"),
        f["connects"].as_f64().unwrap() + 1.0
    );
    assert_eq!(get("gateway_devices_connected"), 0.0);
    let received = v["total"]["received"].as_f64().unwrap();
    assert_eq!(v["total"]["missing"], 0);
    assert_eq!(
        get("gateway_uplink_records_confirmed_total{uplink=\"rabbit\"}"),
        received
    );
    assert_eq!(
        get("gateway_uplink_records_sent_total{uplink=\"rabbit\"}"),
        received
    );
    assert_eq!(
        get("gateway_uplink_records_nacked_total{uplink=\"rabbit\"}"),
        0.0
    );
    assert_eq!(
        get("gateway_uplink_state{uplink=\"rabbit\",state=\"connected\"}"),
        1.0
    );
    assert_eq!(get("gateway_uplink_lag_records{uplink=\"rabbit\"}"), 0.0);
    assert_eq!(get("gateway_refusals_total{reason=\"auth\"}"), 0.0);
    assert_eq!(get("gateway_ready"), 1.0);
    // The fsync histogram saw every group commit; the batch histogram holds every record.
    assert!(get("gateway_queue_fsync_seconds_count") >= 1.0);
    assert_eq!(get("gateway_queue_append_batch_records_sum"), acked);
    assert_eq!(
        get("gateway_queue_fsync_seconds_bucket{le=\"+Inf\"}"),
        get("gateway_queue_fsync_seconds_count")
    );
    stop_cleanly(gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_drops_no_device_and_loses_nothing() {
    let mut gw = Gw::new(100);
    gw.write_config("window = 256", ROUTE_ALL);
    gw.start();
    let manifest = gw.dir.path().join("manifest.json");
    // The test ends the fleet itself (SIGTERM) once the reloads are done: the duration is only a
    // cap, longer than all of the test's own waits, so the fleet cannot run out (and its devices
    // disconnect) while the reloads are still being checked on a slow machine.
    let (fleet_pid, run) = start_fleet(
        &gw,
        &manifest,
        &[
            "--devices",
            "100",
            "--rate",
            "10",
            "--duration",
            "180s",
            "--connect-rate",
            "200",
        ],
    );
    // Wait for the whole fleet to be connected and publishing.
    let deadline = Instant::now() + Duration::from_secs(30);
    while gw.metric("gateway_devices_connected") < 100.0 {
        assert!(Instant::now() < deadline, "the fleet did not connect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Every connection the gateway accepted so far (the fleet's, start()'s TCP probe, and any
    // first connect attempt a slow handshake made the fleet give up on). From here on, a new
    // connection can only be a device that was dropped and came back.
    let connections = gw.metric("gateway_connections_total");
    assert!(connections >= 101.0, "{connections}");
    let all_connected = |gw: &Gw, after: &str| {
        assert_eq!(
            gw.metric("gateway_devices_connected"),
            100.0,
            "a device was disconnected by {after}"
        );
        assert_eq!(
            gw.metric("gateway_connections_total"),
            connections,
            "a device reconnected after {after}"
        );
    };

    // 1. SIGHUP with a changed route (same coverage, another filter).
    gw.write_config(
        "window = 256",
        "[[routes]]\nfilter = \"devices/+/#\"\nuplinks = [\"rabbit\"]\n",
    );
    gw.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(20);
    while gw.metric("gateway_config_reloads_total{result=\"ok\"}") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "SIGHUP reload did not happen: {}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    all_connected(&gw, "the SIGHUP reload");
    tokio::time::sleep(Duration::from_secs(2)).await;
    all_connected(&gw, "the SIGHUP reload");

    // 2. `gateway reload` with a changed uplink (window and confirm timeout): its forwarder is
    //    restarted on its cursor.
    gw.write_config(
        "window = 64\nconfirm_timeout = \"15s\"",
        "[[routes]]\nfilter = \"devices/+/#\"\nuplinks = [\"rabbit\"]\n",
    );
    let out = Command::new(workspace_binary("gateway", "gateway"))
        .args(["reload", "--config"])
        .arg(&gw.config)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("uplink rabbit: changed"), "{said}");
    all_connected(&gw, "`gateway reload`");

    // 3. A broken config is rejected with the key named, and the old one keeps running.
    std::fs::write(&gw.config, "[queue]\nfsync = \"sometimes\"\n").unwrap();
    let (code, body) = gw.http("POST", "/reload");
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("fsync"), "{body}");
    assert_eq!(
        gw.metric("gateway_config_reloads_total{result=\"rejected\"}"),
        1.0
    );
    all_connected(&gw, "the rejected reload");

    // End the fleet: it drains its outstanding acknowledgements and disconnects cleanly.
    let stopped = Command::new("kill")
        .args(["-TERM", &fleet_pid.to_string()])
        .status()
        .unwrap()
        .success();
    let f = run.await.unwrap();
    assert!(stopped, "the fleet ended before the test stopped it: {f}");
    assert_eq!(f["connection_losses"], 0, "a device was disconnected: {f}");
    assert_eq!(f["reconnects"], 0, "{f}");
    assert_eq!(
        gw.metric("gateway_connections_total"),
        connections,
        "a device reconnected: {f}"
    );
    let v = verify_delivered(&gw, &manifest).await;
    // The forwarder restart waited for its confirms, so nothing was sent twice.
    assert_eq!(v["total"]["duplicates"], 0, "{v}");
    stop_cleanly(gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_then_restart_loses_nothing() {
    let mut gw = Gw::new(50);
    gw.write_config("", ROUTE_ALL);
    gw.start();
    let manifest = gw.dir.path().join("manifest.json");
    let run = spawn_fleet(
        &gw,
        &manifest,
        &[
            "--devices",
            "50",
            "--rate",
            "20",
            "--duration",
            "10s",
            "--reconnect-min",
            "0.2",
            "--reconnect-max",
            "1",
            "--drain-timeout",
            "30s",
        ],
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    let before = gw.metric("gateway_acks_sent_total");
    assert!(before > 0.0, "the fleet is not publishing");
    let t = Instant::now();
    let status = gw.stop(Duration::from_secs(30));
    let stopped_in = t.elapsed();
    assert_eq!(
        status.map(|s| s.code()),
        Some(Some(0)),
        "SIGTERM must end in an orderly exit 0: {}",
        gw.logs()
    );
    let log = gw.logs();
    assert!(log.contains("shutting down"), "{log}");
    assert!(log.contains("stopped"), "{log}");
    eprintln!("stopped in {stopped_in:?} after {before} acks");
    tokio::time::sleep(Duration::from_secs(1)).await;
    gw.start();
    let f = run.await.unwrap();
    assert!(f["reconnects"].as_u64().unwrap() >= 50, "{f}");
    assert_eq!(f["unacked"], 0, "{f}");
    verify_delivered(&gw, &manifest).await;
    stop_cleanly(gw).await;
}

/// SIGTERM lets the forwarders drain for `shutdown_grace`; a second SIGTERM during that drain
/// exits at once (130), and the restart finds every record still queued or delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_during_the_drain_exits_at_once_and_loses_nothing() {
    let mut gw = Gw::new(5);
    // max_rate = 5/s: 500 records take 100 s to drain, far longer than the test waits.
    gw.write_config("max_rate = 5", ROUTE_ALL);
    let config = std::fs::read_to_string(&gw.config).unwrap();
    std::fs::write(
        &gw.config,
        config.replace("shutdown_grace = \"5s\"", "shutdown_grace = \"60s\""),
    )
    .unwrap();
    gw.start();
    let manifest = gw.dir.path().join("manifest.json");
    let f = spawn_fleet(
        &gw,
        &manifest,
        &[
            "--devices",
            "5",
            "--count-per-device",
            "100",
            "--rate",
            "100",
        ],
    )
    .await
    .unwrap();
    assert_eq!(f["acked"], 500);
    let deadline = Instant::now() + Duration::from_secs(20);
    while gw.metric("gateway_uplink_state{uplink=\"rabbit\",state=\"connected\"}") != 1.0 {
        assert!(
            Instant::now() < deadline,
            "the uplink did not connect: {}",
            gw.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    gw.signal("TERM");
    // Draining: the process is still there (the grace period is 60 s).
    std::thread::sleep(Duration::from_secs(2));
    let child = gw.child.as_mut().unwrap();
    assert!(
        child.try_wait().unwrap().is_none(),
        "exited before the grace period"
    );
    let t = Instant::now();
    gw.signal("TERM");
    let status = loop {
        if let Some(st) = gw.child.as_mut().unwrap().try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the second SIGTERM did not stop it"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!(
        "second SIGTERM: exit {:?} after {:?}",
        status.code(),
        t.elapsed()
    );
    assert_eq!(status.code(), Some(130));
    gw.child = None;
    assert!(gw.logs().contains("second signal"), "{}", gw.logs());

    // Restart without the rate limit: everything is delivered, nothing lost.
    gw.write_config("", ROUTE_ALL);
    gw.start();
    verify_delivered(&gw, &manifest).await;
    stop_cleanly(gw).await;
}
