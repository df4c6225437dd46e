//! Kill -9 of the real `gateway` binary at random moments while devices publish QoS 1 over
//! mutual TLS: every message the gateway PUBACKed is in the queue after the restart.
//!
//! Each trial starts the gateway on the same data directory (so it recovers from the previous
//! kill), checks that every payload PUBACKed in any earlier trial is in the queue, lets two
//! rumqttc publishers (dev-00001, dev-00002) send uniquely numbered QoS 1 messages, and SIGKILLs
//! the gateway after a random delay. The queue is read with the read-only `Inspector` while the
//! restarted gateway holds it, and at the end opened (recovered) in this process.
//!
//! `INGEST_KILL_TRIALS` sets the number of trials (default 20), `INGEST_KILL_SEED` the seed of
//! the kill delays.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gateway::queue::inspect::Inspector;
use gateway::queue::{Queue, QueueOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, Outgoing, QoS};

const DEVICES: [&str; 2] = ["dev-00001", "dev-00002"];
/// How long the gateway may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(15);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn gateway_binary() -> PathBuf {
    gateway_tests::workspace_binary("gateway", "gateway")
}

fn free_port() -> u16 {
    gateway_tests::free_port()
}

fn toml_path(p: &Path) -> String {
    let s = p.to_str().expect("UTF-8 temp path");
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A running `gateway run`, its stderr going to a log file.
struct Gateway {
    child: Child,
    log: PathBuf,
}

impl Gateway {
    fn start(bin: &Path, config: &Path, log: &Path) -> Gateway {
        let child = Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(log).unwrap())
            .spawn()
            .unwrap();
        let mut gw = Gateway {
            child,
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = gw.child.try_wait().unwrap() {
                panic!("the gateway exited at start ({status}):\n{}", gw.log_text());
            }
            if gw.log_text().contains("listening for MQTT devices") {
                return gw;
            }
            assert!(
                Instant::now() < deadline,
                "the gateway did not listen within {START_TIMEOUT:?}:\n{}",
                gw.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, and reap it.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // A failed assertion must not leave a gateway running.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Publishes uniquely numbered QoS 1 messages until the connection dies; returns the payloads
/// PUBACKed, in ack order.
async fn publish_until_killed(
    port: u16,
    certs: PathBuf,
    device: &'static str,
    trial: u32,
) -> Vec<String> {
    // rumqttc speaks plain TCP to a local tunnel that does the mutual TLS to the gateway.
    let tunnel = gateway::certs::tls_tunnel(
        ([127, 0, 0, 1], port).into(),
        gateway_tests::device_tls(&certs, Some(device)),
    )
    .await
    .unwrap();
    let mut opts = MqttOptions::new(device, "127.0.0.1", tunnel.addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(64);
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    // Payloads handed to rumqttc, not yet sent: rumqttc sends requests in order, so the next
    // Outgoing::Publish is the front one.
    let handed: Arc<Mutex<VecDeque<String>>> = Arc::default();
    let producer = {
        let handed = handed.clone();
        let topic = format!("devices/{device}/kill");
        tokio::spawn(async move {
            for n in 0u64.. {
                let payload = format!("t{trial:03}-{device}-{n:08}");
                handed.lock().unwrap().push_back(payload.clone());
                if client
                    .publish(&topic, QoS::AtLeastOnce, false, payload)
                    .await
                    .is_err()
                {
                    return; // the event loop is gone
                }
            }
        })
    };
    let mut in_flight: HashMap<u16, String> = HashMap::new();
    let mut acked = Vec::new();
    loop {
        // Bounded: a kill ends the connection at once; 10 s of silence means something hangs.
        let event = match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            Ok(Ok(e)) => e,
            Ok(Err(_)) => break, // the gateway is gone (or never was reachable this trial)
            Err(_) => panic!("{device}: no MQTT event for 10 s"),
        };
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                let payload = handed.lock().unwrap().pop_front().unwrap();
                assert!(
                    in_flight.insert(pkid, payload).is_none(),
                    "pkid {pkid} reused while in flight"
                );
            }
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
                panic!("{device}: packet id {pkid} collided: the gateway acked out of order")
            }
            Event::Incoming(Incoming::PubAck(ack)) => {
                let payload = in_flight.remove(&ack.pkid).unwrap_or_else(|| {
                    panic!("{device}: PUBACK for unknown packet id {}", ack.pkid)
                });
                acked.push(payload);
            }
            _ => {}
        }
    }
    drop(eventloop);
    producer.await.unwrap();
    acked
}

/// Every payload in the queue directory, read-only (the gateway may hold it).
fn stored_payloads(data_dir: &Path) -> Vec<String> {
    let records = Inspector::open(data_dir)
        .unwrap()
        .records(0, usize::MAX)
        .unwrap();
    records
        .into_iter()
        .map(|r| String::from_utf8(r.payload).unwrap())
        .collect()
}

/// Asserts every acked payload is stored, and nothing is stored twice.
fn assert_all_acked_stored(stored: &[String], acked: &HashSet<String>, ctx: &str) {
    let set: HashSet<&String> = stored.iter().collect();
    assert_eq!(
        set.len(),
        stored.len(),
        "{ctx}: a record is in the queue twice"
    );
    let missing: Vec<&String> = acked.iter().filter(|p| !set.contains(p)).collect();
    if !missing.is_empty() {
        let mut sample = missing.iter().take(10).fold(String::new(), |mut s, p| {
            let _ = write!(s, " {p}");
            s
        });
        sample.push_str(if missing.len() > 10 { " ..." } else { "" });
        panic!(
            "{ctx}: {} of {} PUBACKed messages are not in the queue:{sample}",
            missing.len(),
            acked.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_pubacked_before_a_sigkill_is_in_the_queue_after_restart() {
    let started = Instant::now();
    let trials: u32 = env_or("INGEST_KILL_TRIALS", 20);
    let seed: u64 = env_or("INGEST_KILL_SEED", rand::random());
    let mut rng = StdRng::seed_from_u64(seed);
    let bin = tokio::task::spawn_blocking(gateway_binary).await.unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    let out = Command::new(&bin)
        .args(["certs", "generate", "--devices", "2", "--out"])
        .arg(&certs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "certs generate: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let data_dir = tmp.path().join("data");
    let port = free_port();
    let config = tmp.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            r#"[admin]
enabled = false

[queue]
data_dir = {data}
segment_bytes = "1 MiB"
max_bytes = "1 GiB"
fsync = "always"

[[listeners]]
bind = "127.0.0.1:{port}"
tls = {{ cert = {cert}, key = {key}, client_ca = {ca}, require_client_cert = true }}
"#,
            data = toml_path(&data_dir),
            cert = toml_path(&certs.join("server.pem")),
            key = toml_path(&certs.join("server.key")),
            ca = toml_path(&certs.join("ca.pem")),
        ),
    )
    .unwrap();

    let mut acked: HashSet<String> = HashSet::new();
    for trial in 0..trials {
        let log = tmp.path().join(format!("gateway-{trial}.log"));
        let gw = {
            let (bin, config, log) = (bin.clone(), config.clone(), log.clone());
            tokio::task::spawn_blocking(move || Gateway::start(&bin, &config, &log))
                .await
                .unwrap()
        };
        let ctx = format!("trial {trial} (seed {seed:#x})");
        if trial > 0 {
            // Restarted on the data of the previous kill: everything acked is there.
            let stored = stored_payloads(&data_dir);
            assert_all_acked_stored(&stored, &acked, &format!("{ctx}, after restart"));
        }

        let publishers: Vec<_> = DEVICES
            .iter()
            .map(|d| tokio::spawn(publish_until_killed(port, certs.clone(), d, trial)))
            .collect();
        let kill_after = Duration::from_millis(rng.gen_range(0..=600));
        tokio::time::sleep(kill_after).await;
        gw.kill();
        let mut now = 0;
        for p in publishers {
            let got = tokio::time::timeout(Duration::from_secs(15), p)
                .await
                .expect("publisher ends after the kill")
                .unwrap();
            now += got.len();
            for payload in got {
                assert!(acked.insert(payload), "{ctx}: a payload acked twice");
            }
        }
        eprintln!(
            "{ctx}: killed after {kill_after:?}, {now} PUBACKs, {} in all ({:.1}s)",
            acked.len(),
            started.elapsed().as_secs_f64()
        );
    }

    // After the last kill: recover the directory here, as the next gateway would.
    let mut opts = QueueOptions::new(&data_dir);
    opts.segment_bytes = 1 << 20; // as in the config above
    let (queue, report) = tokio::task::spawn_blocking(move || Queue::open(opts))
        .await
        .unwrap()
        .unwrap();
    // A process crash only tears the tail; it never damages a record in the middle.
    assert_eq!(report.quarantined_records, 0, "{report:?}");
    queue.close();
    drop(queue);
    let stored = stored_payloads(&data_dir);
    assert_all_acked_stored(&stored, &acked, "after the last kill");
    // And the operator's tool finds every record's CRC intact.
    let verify = Command::new(&bin)
        .args(["queue", "verify", "--data-dir"])
        .arg(&data_dir)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "gateway queue verify: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        acked.len() as u32 >= trials,
        "only {} messages were PUBACKed in {trials} trials: the test did not exercise the gateway",
        acked.len()
    );
    eprintln!(
        "{trials} trials (seed {seed:#x}): {} PUBACKed messages, all in the queue ({} stored); {:.1}s",
        acked.len(),
        stored.len(),
        started.elapsed().as_secs_f64()
    );
}
