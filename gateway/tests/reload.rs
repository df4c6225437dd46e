//! Reload of the ingest side (`Service::reload`, what SIGHUP and `POST /reload` call): a changed
//! ACL applies to the next publish of a device that stays connected, new TLS certificates serve
//! new connections while the old ones stay up, and a config whose files do not load is rejected
//! whole while the old one keeps running.
#![allow(clippy::unwrap_used)]

mod ingest_support;

use std::path::Path;
use std::time::Duration;

use gateway::config::Config;
use gateway::service::Service;
use ingest_support::client_tls;
use ingest_support::raw::{self, Connect};

fn write_config(path: &Path, dir: &Path, certs: &Path, publish: &str) {
    std::fs::write(
        path,
        format!(
            r#"[queue]
data_dir = "{data}"
segment_bytes = "1 MiB"
max_bytes = "64 MiB"

[[listeners]]
bind = "127.0.0.1:0"
tls = {{ cert = "{c}/server.pem", key = "{c}/server.key", client_ca = "{c}/ca.pem" }}

[[acl]]
identity = "*"
publish = [{publish}]

[admin]
enabled = false
"#,
            data = dir.join("data").display(),
            c = certs.display(),
        ),
    )
    .unwrap();
}

#[tokio::test]
async fn acl_and_certificates_change_on_reload_without_dropping_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let (certs_a, certs_b) = (dir.path().join("a"), dir.path().join("b"));
    gateway::certs::generate(&certs_a, 2).unwrap();
    gateway::certs::generate(&certs_b, 2).unwrap();
    let path = dir.path().join("gateway.toml");
    write_config(&path, dir.path(), &certs_a, r#""devices/%c/#""#);
    let mut service = Service::start(Config::load(&path).unwrap(), path.clone())
        .await
        .unwrap();
    let status = service.status();
    let addr = status.listeners[0].0;

    // An MQTT 5 device (certificate from CA a): its own topic is allowed, `other/...` is not
    // (PUBACK 0x87, the connection stays).
    let mut dev = raw::tls_connect(addr, client_tls(&certs_a, Some("dev-00001")))
        .await
        .unwrap();
    assert_eq!(
        dev.connect(&Connect::v5("dev-00001")).await.connack_code(),
        0
    );
    let ok = dev
        .publish_qos1(true, "devices/dev-00001/t", 1, b"one")
        .await;
    assert_eq!(ok.ack_reason(), 0);
    let denied = dev.publish_qos1(true, "other/dev-00001", 2, b"two").await;
    assert_eq!(
        denied.ack_reason(),
        0x87,
        "not authorized before the reload"
    );

    // A client that trusts only CA b cannot connect yet.
    assert!(
        raw::tls_connect(addr, client_tls(&certs_b, Some("dev-00001")))
            .await
            .is_err()
    );

    // Reload: `other/%c` allowed, and the server certificate from CA b.
    write_config(&path, dir.path(), &certs_b, r#""devices/%c/#", "other/%c""#);
    let changes = service.reload(&[]).await.unwrap();
    assert!(changes.iter().any(|c| c.contains("ingest")), "{changes:?}");

    // The same connection: the next publish gets the new ACL.
    let allowed = dev.publish_qos1(true, "other/dev-00001", 3, b"three").await;
    assert_eq!(allowed.ack_reason(), 0, "the reloaded ACL applies at once");
    // New connections get the new certificate (and clients of CA a no longer trust it).
    let mut fresh = raw::tls_connect(addr, client_tls(&certs_b, Some("dev-00002")))
        .await
        .unwrap();
    assert_eq!(
        fresh
            .connect(&Connect::v5("dev-00002"))
            .await
            .connack_code(),
        0
    );
    assert!(
        raw::tls_connect(addr, client_tls(&certs_a, Some("dev-00002")))
            .await
            .is_err()
    );

    // A config naming a missing key file is rejected whole, with the key named; the ACL and
    // certificates in force stay.
    std::fs::remove_file(certs_b.join("server.key")).unwrap();
    write_config(&path, dir.path(), &certs_b, r#""devices/%c/#""#);
    let errors = service.reload(&[]).await.unwrap_err();
    assert!(
        errors.iter().any(|e| e.contains("listeners[0].tls.key")),
        "{errors:?}"
    );
    let still = dev.publish_qos1(true, "other/dev-00001", 4, b"four").await;
    assert_eq!(still.ack_reason(), 0, "the rejected reload changed nothing");
    assert!(dev.is_open_after(Duration::from_millis(200)).await);
    assert_eq!(
        status
            .ingest
            .connections_total
            .load(std::sync::atomic::Ordering::Relaxed),
        4
    );

    let q = status.queue.stats();
    assert_eq!(q.appended_records, 3, "one, three and four were stored");
    service.shutdown().await.unwrap();
}

/// Removing an uplink keeps its cursor (and the records only it still needs) until the
/// operator confirms with `release`; releasing a name that is still configured, or unknown, is
/// refused.
#[tokio::test]
async fn a_removed_uplinks_cursor_is_kept_until_released() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    gateway::certs::generate(&certs, 1).unwrap();
    let path = dir.path().join("gateway.toml");
    // An uplink to a port where nothing listens: it backs off, its cursor stays at 0.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    write_config(&path, dir.path(), &certs, r#""devices/%c/#""#);
    let base = std::fs::read_to_string(&path).unwrap();
    let with_uplink = format!(
        "{base}\n[[uplinks]]\nname = \"gone\"\ntype = \"amqp\"\nurl = \"amqp://guest:guest@127.0.0.1:{dead}/%2f\"\nexchange = \"x\"\nbackoff_max = \"1s\"\n\n[[routes]]\nfilter = \"#\"\nuplinks = [\"gone\"]\n"
    );
    std::fs::write(&path, &with_uplink).unwrap();
    let mut service = Service::start(Config::load(&path).unwrap(), path.clone())
        .await
        .unwrap();
    let status = service.status();
    let addr = status.listeners[0].0;
    let mut dev = raw::tls_connect(addr, client_tls(&certs, Some("dev-00001")))
        .await
        .unwrap();
    assert_eq!(
        dev.connect(&Connect::v5("dev-00001")).await.connack_code(),
        0
    );
    for i in 1..=5u16 {
        let ack = dev.publish_qos1(true, "devices/dev-00001/t", i, b"x").await;
        assert_eq!(ack.ack_reason(), 0);
    }
    let lag = |name: &str| {
        status
            .queue
            .stats()
            .cursors
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.lag_records)
    };
    assert_eq!(lag("gone"), Some(5));

    // Still configured: cannot be released.
    let refused = service.reload(&["gone".to_string()]).await.unwrap_err();
    assert!(
        refused.iter().any(|e| e.contains("still configured")),
        "{refused:?}"
    );

    // Removed: the forwarder stops, the cursor stays and the reload says how to release it.
    std::fs::write(&path, &base).unwrap();
    let changes = service.reload(&[]).await.unwrap();
    assert!(
        changes.iter().any(|c| c == "uplink gone: removed"),
        "{changes:?}"
    );
    assert!(
        changes
            .iter()
            .any(|c| c.contains("cursor gone kept (5 record(s)") && c.contains("--release gone")),
        "{changes:?}"
    );
    assert_eq!(lag("gone"), Some(5));
    assert!(status.uplinks().is_empty());

    let internal = service
        .reload(&["_unrouted".to_string()])
        .await
        .unwrap_err();
    assert!(
        internal.iter().any(|e| e.contains("gateway's own cursor")),
        "{internal:?}"
    );
    let unknown = service.reload(&["nope".to_string()]).await.unwrap_err();
    assert!(
        unknown.iter().any(|e| e.contains("no cursor named")),
        "{unknown:?}"
    );

    let changes = service.reload(&["gone".to_string()]).await.unwrap();
    assert!(
        changes.iter().any(|c| c == "cursor gone released"),
        "{changes:?}"
    );
    assert_eq!(lag("gone"), None);
    assert!(dev.is_open_after(Duration::from_millis(100)).await);
    service.shutdown().await.unwrap();
}
