//! `gateway sessions list | inspect | drop`: the stored sessions of a data directory, made by an
//! in-process gateway (real TLS clients), then read by the binary. `list` and `inspect` work
//! while the gateway runs; `drop` needs it stopped, and the dropped session is gone at the next
//! start.

#![allow(clippy::unwrap_used)]

mod ingest_support;

use std::path::Path;

use gateway::config::AclRule;
use ingest_support::raw::{self, Connect, WAIT};
use ingest_support::TestGateway;

const DEVICE: &str = "dev-00001";
const OTHER: &str = "dev-00002";
const DASHBOARD: &str = "dev-00005";

/// Runs the gateway binary: (success, stdout, stderr).
fn gateway_cmd(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn sessions(cmd: &[&str], data: &Path) -> (bool, String, String) {
    let mut args = vec!["sessions"];
    args.extend_from_slice(cmd);
    args.extend_from_slice(&["--data-dir", data.to_str().unwrap()]);
    gateway_cmd(&args)
}

/// A gateway keeping its data in `data` (so it outlives the gateway).
async fn gateway(data: &Path) -> TestGateway {
    let data = data.to_path_buf();
    TestGateway::start(move |c, _| {
        c.queue.data_dir = data;
        c.acl = vec![
            AclRule {
                identity: "*".into(),
                publish: vec!["devices/%c/#".into()],
                subscribe: vec!["devices/%c/commands/#".into()],
            },
            AclRule {
                identity: DASHBOARD.into(),
                publish: vec![],
                subscribe: vec!["devices/+/telemetry".into()],
            },
        ];
    })
    .await
}

async fn subscribe(c: &mut raw::TlsRaw, v5: bool, filter: &str, options: u8) {
    c.send(&raw::subscribe_with(v5, 1, &[(filter, options)]))
        .await
        .unwrap();
    assert_eq!(c.recv().await.suback_codes(v5), [options & 3]);
}

/// The line of `out` that starts with `first` (after leading spaces).
fn line<'a>(out: &'a str, first: &str) -> &'a str {
    out.lines()
        .find(|l| l.trim_start().starts_with(first))
        .unwrap_or_else(|| panic!("no line starting with {first:?} in:\n{out}"))
}

fn words(l: &str) -> Vec<&str> {
    l.split_whitespace().collect()
}

#[tokio::test]
async fn stored_sessions_are_listed_inspected_and_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let gw = gateway(&data).await;
    // The dashboard keeps a 3.1.1 session (expiry 7 days) with a QoS 1 subscription; the
    // device an MQTT 5 one (1 hour) with a QoS 2, no-local subscription.
    let mut dash = gw
        .raw_connected(DASHBOARD, &Connect::v4(DASHBOARD).persistent(0))
        .await;
    subscribe(&mut dash, false, "devices/+/telemetry", 1).await;
    drop(dash);
    let mut dev = gw
        .raw_connected(DEVICE, &Connect::v5(DEVICE).persistent(3600))
        .await;
    subscribe(&mut dev, true, "devices/dev-00001/commands/#", 2 | 4).await;
    drop(dev);
    gw.wait_until("both sessions offline", WAIT, |g| {
        g.sessions.counts().1 == 2
    })
    .await;
    // Two messages for the absent dashboard.
    let mut other = gw.raw_connected(OTHER, &Connect::v4(OTHER)).await;
    other
        .publish_qos1(false, "devices/dev-00002/telemetry", 1, b"t0")
        .await;
    other
        .publish_qos1(false, "devices/dev-00002/telemetry", 2, b"t1!")
        .await;
    gw.wait_until("two messages queued", WAIT, |g| {
        g.sessions.queued_messages() == 2
    })
    .await;
    drop(other);

    // While it runs: listed (subscriptions are durable before their SUBACK), not dropped.
    let (ok, out, err) = sessions(&["list"], &data);
    assert!(ok, "{out}{err}");
    assert!(err.contains("a gateway is running"), "{err}");
    assert!(out.contains(DASHBOARD) && out.contains(DEVICE), "{out}");
    let (ok, out, err) = sessions(&["drop", DASHBOARD], &data);
    assert!(!ok, "{out}");
    assert!(
        err.contains("in use by a running gateway") && err.contains("stop the gateway"),
        "{err}"
    );
    gw.stop().await;

    let (ok, out, err) = sessions(&["list"], &data);
    assert!(ok, "{out}{err}");
    assert!(!err.contains("running"), "{err}");
    assert_eq!(
        words(line(&out, DASHBOARD))[..4],
        [DASHBOARD, "7days", "1", "2"]
    );
    assert_eq!(words(line(&out, DEVICE))[..4], [DEVICE, "1h", "1", "0"]);
    assert!(out.contains("2 stored session(s)"), "{out}");

    let (ok, out, err) = sessions(&["inspect", DASHBOARD], &data);
    assert!(ok, "{out}{err}");
    assert_eq!(
        words(line(&out, "devices/+/telemetry")),
        [
            "devices/+/telemetry",
            "qos",
            "1",
            "no_local",
            "false",
            "retain_as_published",
            "false"
        ]
    );
    assert!(out.contains("queued messages 2"), "{out}");
    let queued: Vec<Vec<&str>> = out
        .lines()
        .filter(|l| l.contains("devices/dev-00002/telemetry"))
        .map(words)
        .collect();
    // pkid, qos, released, payload size, topic; in the order they were queued.
    assert_eq!(queued.len(), 2, "{out}");
    assert_eq!(
        queued[0][1..],
        ["1", "no", "2B", "devices/dev-00002/telemetry"]
    );
    assert_eq!(
        queued[1][1..],
        ["1", "no", "3B", "devices/dev-00002/telemetry"]
    );
    let (ok, out, _) = sessions(&["inspect", DEVICE], &data);
    assert!(ok);
    assert!(
        line(&out, "devices/dev-00001/commands/#").contains("qos 2  no_local true"),
        "{out}"
    );

    // Bad input says what is wrong and what to do.
    let (ok, _, err) = sessions(&["inspect", "nobody"], &data);
    assert!(!ok);
    assert!(
        err.contains("no stored session with client id \"nobody\"")
            && err.contains("gateway sessions list --data-dir"),
        "{err}"
    );
    let (ok, _, err) = sessions(&["drop", "nobody"], &data);
    assert!(!ok);
    assert!(
        err.contains("no stored session with client id \"nobody\""),
        "{err}"
    );
    let missing = dir.path().join("missing");
    let (ok, _, err) = sessions(&["list"], &missing);
    assert!(!ok);
    assert!(
        err.contains("no data directory") && err.contains("missing"),
        "{err}"
    );

    let (ok, out, err) = sessions(&["drop", DASHBOARD], &data);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("dropped session \"dev-00005\": 1 subscription(s), 2 queued message(s)"),
        "{out}"
    );
    let (ok, out, _) = sessions(&["list"], &data);
    assert!(ok);
    assert!(!out.contains(DASHBOARD) && out.contains(DEVICE), "{out}");

    // The next start has the device's session only.
    let gw = gateway(&data).await;
    assert_eq!(gw.sessions.counts().1, 1, "one session recovered");
    assert_eq!(gw.sessions.queued_messages(), 0);
    let mut dash = gw.raw(Some(DASHBOARD)).await;
    let ack = dash.connect(&Connect::v4(DASHBOARD).persistent(0)).await;
    assert!(!ack.session_present(), "the dropped session is gone");
    let mut dev = gw.raw(Some(DEVICE)).await;
    let ack = dev.connect(&Connect::v5(DEVICE).persistent(3600)).await;
    assert!(ack.session_present(), "the other one is kept");
    gw.stop().await;
}
