//! The status page at `/` on the admin address, loaded in headless Chromium from the real gateway
//! binary: a plaintext listener with one device connected, an AMQP uplink to the RabbitMQ on
//! 127.0.0.1:5672 and a second uplink whose records the broker returns (so there is a dead letter).
//! The page must show the numbers that `/api/status` reports, and a screenshot is kept under
//! `target/test-artifacts/status-page.png` for a person to look at.
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Bound on every wait for the gateway (start, connect, deliver).
const WAIT: Duration = Duration::from_secs(30);
/// Bound on one Chromium run (its virtual time budget is 8 s; a busy machine starts it slowly).
const CHROMIUM_WAIT: Duration = Duration::from_secs(120);
/// Records published to the route that reaches RabbitMQ.
const PUBLISHED: usize = 25;

fn unique(prefix: &str) -> String {
    let n = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{n}", std::process::id())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Debian's `chromium`, found on PATH.
fn chromium() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("chromium"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "this test loads the status page in headless Chromium, and `chromium` is not on \
                 PATH: run the suite with `./run-tests` (the README's test command), which \
                 installs Debian's `chromium` package"
            )
        })
}

/// The gateway process, killed when dropped (also when the test panics).
struct Gateway {
    child: Child,
    log: PathBuf,
}

impl Gateway {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("the gateway exited ({status}); its log:\n{}", self.log());
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` over HTTP/1.0 (so the body is neither chunked nor kept alive): status and body.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

fn api_status(addr: SocketAddr) -> Value {
    let (status, body) = http_get(addr, "/api/status").unwrap();
    assert_eq!(status, 200, "GET /api/status: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/api/status is not JSON ({e}): {body}"))
}

/// Polls `/api/status` until `done` holds for it, or panics after [`WAIT`] naming `what`.
fn wait_for_status(
    gw: &mut Gateway,
    addr: SocketAddr,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        gw.assert_running();
        let last = match http_get(addr, "/api/status") {
            Ok((200, body)) => match serde_json::from_str::<Value>(&body) {
                Ok(v) if done(&v) => return v,
                _ => body,
            },
            Ok((code, body)) => format!("HTTP {code}: {body}"),
            Err(e) => e.to_string(),
        };
        assert!(
            Instant::now() < deadline,
            "waited {WAIT:?} for {what}; last /api/status: {last}\ngateway log:\n{}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn uplink<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["uplinks"]
        .as_array()
        .and_then(|u| u.iter().find(|u| u["name"] == name))
        .unwrap_or_else(|| panic!("no uplink {name} in {status}"))
}

/// Runs headless Chromium on `url` with `args`, bounded by [`CHROMIUM_WAIT`]; returns stdout.
fn run_chromium(profile: &Path, args: &[String], url: &str) -> String {
    let out_path = profile.with_extension("stdout");
    let err_path = profile.with_extension("stderr");
    let mut child = Command::new(chromium())
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            // Enough for the first poll and a few more (one every 2 s).
            "--virtual-time-budget=8000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + CHROMIUM_WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium {args:?} did not finish within {CHROMIUM_WAIT:?}; stderr:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "chromium {args:?} failed ({status}); stderr:\n{}",
        std::fs::read_to_string(&err_path).unwrap_or_default()
    );
    std::fs::read_to_string(&out_path).unwrap()
}

/// The text of the element with `id` in serialized HTML, for elements that hold only text.
fn text_of(dom: &str, id: &str) -> String {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no element with id {id:?} in the page:\n{dom}"));
    let start = at + dom[at..].find('>').unwrap() + 1;
    let end = start + dom[start..].find('<').unwrap();
    dom[start..end].trim().to_string()
}

/// The value of `series` (name and labels, as written) in Prometheus text.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// How the page writes a count: digits grouped by commas.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

struct Names {
    exchange: String,
    queue: String,
    lost_exchange: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_the_live_numbers_in_headless_chromium_and_a_screenshot_is_saved() {
    let names = Names {
        exchange: unique("gw-status-x"),
        queue: unique("gw-status-q"),
        lost_exchange: unique("gw-status-lost"),
    };
    // Run the test, then delete what it declared in the shared RabbitMQ, whatever happened.
    let result = AssertUnwindSafe(status_page(&names)).catch_unwind().await;
    if let Ok(conn) = Connection::connect(AMQP_URL, ConnectionProperties::default()).await {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete(names.queue.as_str().into(), QueueDeleteOptions::default())
                .await;
            for x in [&names.exchange, &names.lost_exchange] {
                let _ = ch
                    .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
        }
        let _ = conn.close(200, "done".into()).await;
    }
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

async fn status_page(names: &Names) {
    // Fail first, and clearly, when Chromium is missing.
    chromium();
    let dir = tempfile::tempdir().unwrap();
    let mqtt_port = free_port();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[queue]
data_dir = {data:?}
max_bytes = "64 MiB"
segment_bytes = "1 MiB"

[[listeners]]
bind = "127.0.0.1:{mqtt_port}"
tls = false

[auth]
allow_anonymous = true

[admin]
enabled = true
listen = "{admin}"

[gateway]
id = "status-page-test"

[[uplinks]]
name = "rabbit"
type = "amqp"
url = "{AMQP_URL}"
exchange = "{exchange}"
declare = true
declare_queue = "{queue}"

# An exchange with no queue bound: the broker returns every record (312 NO_ROUTE), which makes
# a dead letter for the page to list.
[[uplinks]]
name = "lost"
type = "amqp"
url = "{AMQP_URL}"
exchange = "{lost}"
declare = true

[[routes]]
filter = "devices/#"
uplinks = ["rabbit"]

[[routes]]
filter = "devices/+/lost"
uplinks = ["lost"]
"#,
            data = dir.path().join("data").display().to_string(),
            exchange = names.exchange,
            queue = names.queue,
            lost = names.lost_exchange,
        ),
    )
    .unwrap();
    let log = dir.path().join("gateway.log");
    let log_file = File::create(&log).unwrap();
    let mut gw = Gateway {
        child: Command::new(env!("CARGO_BIN_EXE_gateway"))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap(),
        log,
    };

    tokio::task::block_in_place(|| {
        wait_for_status(&mut gw, admin, "the rabbit uplink to connect", |s| {
            uplink(s, "rabbit")["state"] == "connected"
        })
    });

    // One device, connected for the rest of the test, publishing at QoS 1.
    let mut o = MqttOptions::new("dev-00001", "127.0.0.1", mqtt_port);
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(o, PUBLISHED + 3);
    // It subscribes to its command tree, and the first publish is a retained command to itself:
    // one session online, one subscription, one retained message, one delivery.
    client
        .subscribe("devices/dev-00001/commands/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    for i in 0..PUBLISHED {
        let (topic, retain) = if i == 0 {
            ("devices/dev-00001/commands/set", true)
        } else {
            ("devices/dev-00001/t", false)
        };
        client
            .publish(topic, QoS::AtLeastOnce, retain, format!("{i}"))
            .await
            .unwrap();
    }
    client
        .publish("devices/dev-00001/lost", QoS::AtLeastOnce, false, "x")
        .await
        .unwrap();
    let mut acks = 0;
    tokio::time::timeout(WAIT, async {
        while acks < PUBLISHED + 1 {
            if let Event::Incoming(Packet::PubAck(_)) = events.poll().await.unwrap() {
                acks += 1;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{acks} of {} PUBACKs within {WAIT:?}", PUBLISHED + 1));
    // Keep the connection alive (pings) while Chromium looks.
    let device = tokio::spawn(async move { while events.poll().await.is_ok() {} });

    // Wait until nothing moves: everything delivered, the returned record dead-lettered.
    let total = (PUBLISHED + 1) as u64;
    let before = tokio::task::block_in_place(|| {
        wait_for_status(&mut gw, admin, "delivery and the dead letter", |s| {
            let rabbit = uplink(s, "rabbit");
            s["devices_connected"] == 1
                && rabbit["confirmed"].as_u64() == Some(total)
                && rabbit["lag_records"] == 0
                && s["dead_letters"]["count"] == 1
                && s["sessions"]["delivered"] == 1
        })
    });
    let sessions = &before["sessions"];
    for (key, want) in [
        ("online", 1),
        ("offline", 0),
        ("subscriptions", 1),
        ("queued_messages", 0),
        ("queued_bytes", 0),
        ("retained_messages", 1),
        ("dropped", 0),
    ] {
        assert_eq!(
            sessions[key], want,
            "sessions.{key} in /api/status: {before}"
        );
    }
    let (code, metrics) = http_get(admin, "/metrics").unwrap();
    assert_eq!(code, 200, "{metrics}");
    for (series, want) in [
        ("gateway_sessions{state=\"online\"}", 1.0),
        ("gateway_sessions{state=\"offline\"}", 0.0),
        ("gateway_subscriptions", 1.0),
        ("gateway_session_queued_messages", 0.0),
        ("gateway_session_queued_bytes", 0.0),
        ("gateway_retained_messages", 1.0),
        // topic + payload + 32
        ("gateway_retained_bytes", 63.0),
        ("gateway_session_messages_delivered_total", 1.0),
        (
            "gateway_session_messages_dropped_total{reason=\"qos0_full_or_offline\"}",
            0.0,
        ),
        (
            "gateway_session_messages_dropped_total{reason=\"refused_full\"}",
            0.0,
        ),
        (
            "gateway_session_messages_dropped_total{reason=\"discarded_session_end\"}",
            0.0,
        ),
        (
            "gateway_session_messages_dropped_total{reason=\"retained_refused\"}",
            0.0,
        ),
        (
            "gateway_session_messages_dropped_total{reason=\"expired\"}",
            0.0,
        ),
        ("gateway_session_router_records_skipped_total", 0.0),
        ("gateway_sessions_ended_total{reason=\"expired\"}", 0.0),
        ("gateway_sessions_ended_total{reason=\"evicted\"}", 0.0),
    ] {
        assert_eq!(
            metric(&metrics, series),
            Some(want),
            "{series} in /metrics:\n{metrics}"
        );
    }
    assert_eq!(
        before["ingest"]["publishes"][1].as_u64(),
        Some(total),
        "QoS 1 publishes in /api/status: {before}"
    );

    let url = format!("http://{admin}/");
    let dom = tokio::task::block_in_place(|| {
        run_chromium(
            &dir.path().join("chromium-dom"),
            &["--dump-dom".to_string()],
            &url,
        )
    });
    let now = api_status(admin);

    assert!(dom.contains("<svg"), "the page has its charts:\n{dom}");
    assert_eq!(text_of(&dom, "ready"), "Ready", "{now}");
    assert_eq!(text_of(&dom, "error"), "", "no failed fetch reported");
    assert_eq!(text_of(&dom, "devices-connected"), "1");
    assert_eq!(text_of(&dom, "ingest-publishes"), grouped(total));
    let records = now["queue"]["records"].as_u64().unwrap();
    assert!(records > 0, "{now}");
    assert_eq!(text_of(&dom, "queue-records"), grouped(records));
    assert_eq!(text_of(&dom, "uplink-rabbit-state"), "connected");
    assert_eq!(text_of(&dom, "uplink-rabbit-lag"), "0");
    assert_eq!(
        text_of(&dom, "uplink-lost-state"),
        uplink(&now, "lost")["state"].as_str().unwrap()
    );
    assert_eq!(text_of(&dom, "dead-letter-count"), "1");
    for (id, want) in [
        ("sessions-online", "1"),
        ("sessions-offline", "0"),
        ("sessions-subscriptions", "1"),
        ("sessions-queued", "0"),
        ("sessions-retained", "1"),
        ("sessions-retained-bytes", "63 B"),
        ("sessions-delivered", "1"),
        ("sessions-dropped", "0"),
    ] {
        assert_eq!(text_of(&dom, id), want, "{id}");
    }
    assert!(
        dom.contains("NO_ROUTE") && dom.contains("devices/dev-00001/lost"),
        "the dead letter with its reason and topic:\n{dom}"
    );
    assert!(
        dom.contains(&format!("127.0.0.1:{mqtt_port}")),
        "the listener's address:\n{dom}"
    );

    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let png = artifacts.join("status-page.png");
    let _ = std::fs::remove_file(&png);
    tokio::task::block_in_place(|| {
        run_chromium(
            &dir.path().join("chromium-png"),
            &[
                format!("--screenshot={}", png.display()),
                "--window-size=1280,800".to_string(),
            ],
            &url,
        )
    });
    let image = std::fs::read(&png).unwrap_or_else(|e| panic!("no screenshot at {png:?}: {e}"));
    assert!(image.starts_with(b"\x89PNG\r\n\x1a\n"), "{png:?} is a PNG");
    // A blank 1280x800 page compresses to a few KB; text, tables and charts take far more.
    assert!(
        image.len() > 20_000,
        "{png:?} is only {} bytes: the page looks empty",
        image.len()
    );
    println!("status page screenshot: {}", png.display());

    device.abort();
    let _ = client.disconnect().await;
    gw.assert_running();
    drop(gw);
}
