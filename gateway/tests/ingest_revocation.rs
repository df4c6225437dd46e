//! Certificate revocation (issue 15, item 2): a listener's `tls.crl_file` is checked in the
//! handshake, and a reload with a new list closes the connected sessions of the certificates it
//! revokes while the others stay. The list is made by `gateway certs revoke` (here its library
//! function), signed by the development CA. Real TLS clients with device certificates.

#![allow(clippy::unwrap_used)]

mod ingest_support;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use gateway::config::Config;
use gateway::service::Service;
use ingest_support::client_tls;
use ingest_support::raw::{self, Connect};

fn write_config(path: &Path, dir: &Path, certs: &Path) {
    std::fs::write(
        path,
        format!(
            r#"
[queue]
data_dir = "{data}"
segment_bytes = "1 MiB"
max_bytes = "64 MiB"

[[listeners]]
bind = "127.0.0.1:0"
tls = {{ cert = "{c}/server.pem", key = "{c}/server.key", client_ca = "{c}/ca.pem", require_client_cert = true, crl_file = "{c}/crl.pem" }}

[admin]
enabled = false
"#,
            data = dir.join("data").display(),
            c = certs.display(),
        ),
    )
    .unwrap();
}

/// Connects `device` with its certificate and sends CONNECT: the CONNACK code, or `None` when
/// the TLS handshake or the connection failed.
async fn connect(service: &Service, certs: &Path, device: &str) -> Option<(raw::TlsRaw, u8)> {
    let addr = service.status().listeners[0].0;
    let mut c = raw::tls_connect(addr, client_tls(certs, Some(device)))
        .await
        .ok()?;
    // TLS 1.3: a refused client certificate shows at the first read after the handshake.
    c.send(&Connect::v4(device).encode()).await.ok()?;
    let ack = c.recv_within(raw::WAIT).await.ok()?;
    Some((c, ack.connack_code()))
}

#[tokio::test]
async fn a_revoked_certificate_is_refused_and_a_reload_closes_its_connected_session_only() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    gateway::certs::generate(&certs, 3).unwrap();
    // dev-00003 is revoked from the start.
    gateway::certs::revoke(&certs, &["dev-00003".to_string()]).unwrap();
    let path = dir.path().join("gateway.toml");
    write_config(&path, dir.path(), &certs);
    let mut service = Service::start(Config::load(&path).unwrap(), path.clone())
        .await
        .unwrap();
    let status = service.status();

    assert!(
        connect(&service, &certs, "dev-00003").await.is_none(),
        "a certificate on the list is refused in the handshake"
    );
    let (mut one, code) = connect(&service, &certs, "dev-00001").await.unwrap();
    assert_eq!(code, 0);
    let (mut two, code) = connect(&service, &certs, "dev-00002").await.unwrap();
    assert_eq!(code, 0);

    // dev-00002 is revoked while connected; the reload reads the new list.
    let (_, revoked) = gateway::certs::revoke(&certs, &["dev-00002".to_string()]).unwrap();
    assert_eq!(revoked, 2, "the list keeps dev-00003 and adds dev-00002");
    service.reload(&[]).await.unwrap();
    let closed = two.until_closed(Duration::from_secs(5)).await;
    assert!(
        closed.iter().all(|p| p.kind != raw::kind::PUBLISH),
        "{closed:?}"
    );
    assert!(
        one.is_open_after(Duration::from_millis(300)).await,
        "dev-00001 is not revoked: it stays connected"
    );
    assert_eq!(status.ingest.revoked_closed.load(Ordering::Relaxed), 1);
    assert!(
        connect(&service, &certs, "dev-00002").await.is_none(),
        "dev-00002 cannot come back"
    );
    assert!(
        status.ingest.refused_count("tls") >= 2,
        "{:?}",
        status.ingest.refusals()
    );
    // dev-00001 still works: a publish is acknowledged.
    one.publish_qos1(false, "devices/dev-00001/telemetry", 1, b"still here")
        .await;
    service.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_crl_file_that_is_not_a_revocation_list_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    gateway::certs::generate(&certs, 1).unwrap();
    std::fs::write(certs.join("crl.pem"), "not a list\n").unwrap();
    let path = dir.path().join("gateway.toml");
    write_config(&path, dir.path(), &certs);
    let err = match Service::start(Config::load(&path).unwrap(), path.clone()).await {
        Ok(_) => panic!("started with a bad crl_file"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("crl.pem") && err.contains("revocation list"),
        "{err}"
    );
}
