//! A gateway (queue + ingest) on 127.0.0.1:0 with certificates made at test time, and TLS
//! client configurations for devices.
#![allow(dead_code, clippy::unwrap_used)]

pub mod raw;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use raw::{Connect, TlsRaw};

use gateway::config::{Config, ListenerConfig, TlsConfig, TlsSetting};
use gateway::ingest::{Ingest, IngestStats};
use gateway::queue::{Queue, Record};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

pub struct TestGateway {
    pub addr: SocketAddr,
    pub certs: PathBuf,
    pub queue: Queue,
    pub stats: Arc<IngestStats>,
    pub sessions: Arc<gateway::sessions::Sessions>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    config: Config,
    _dir: tempfile::TempDir,
}

/// Certificates in `dir/certs`: ca, server (localhost/127.0.0.1), devices dev-00001..=dev-00005.
pub fn make_certs(dir: &std::path::Path) -> PathBuf {
    let certs = dir.join("certs");
    gateway::certs::generate(&certs, 5).unwrap();
    certs
}

/// A config listening with mutual TLS on 127.0.0.1:0, queue in `dir/data`.
pub fn base_config(dir: &std::path::Path, certs: &std::path::Path) -> Config {
    let mut c = Config::default();
    c.queue.data_dir = dir.join("data");
    c.queue.segment_bytes = 1 << 20;
    c.queue.max_bytes = 64 << 20;
    c.listeners = vec![ListenerConfig {
        bind: "127.0.0.1:0".into(),
        tls: TlsSetting::On(TlsConfig {
            cert: certs.join("server.pem"),
            key: certs.join("server.key"),
            client_ca: Some(certs.join("ca.pem")),
            require_client_cert: false,
            crl_file: Default::default(),
        }),
    }];
    c
}

impl TestGateway {
    /// Starts with the base config, changed by `tweak`.
    pub async fn start(tweak: impl FnOnce(&mut Config, &std::path::Path)) -> TestGateway {
        let dir = tempfile::tempdir().unwrap();
        let certs = make_certs(dir.path());
        let mut config = base_config(dir.path(), &certs);
        tweak(&mut config, dir.path());
        config.validate().unwrap();
        Self::start_with(config, certs, dir).await
    }

    async fn start_with(config: Config, certs: PathBuf, dir: tempfile::TempDir) -> TestGateway {
        let (queue, _) = Queue::open(config.queue.to_options()).unwrap();
        let ingest = Ingest::bind(&config, queue.clone()).await.unwrap();
        let addr = ingest.local_addrs()[0].0;
        let stats = ingest.stats();
        let sessions = ingest.handle().sessions();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(ingest.run(shutdown.clone()));
        TestGateway {
            addr,
            certs,
            queue,
            stats,
            sessions,
            shutdown,
            task: Some(task),
            config,
            _dir: dir,
        }
    }

    /// Stops the gateway cleanly and starts it again on the same data directory and config
    /// (a new port).
    pub async fn restart(mut self) -> TestGateway {
        self.shutdown_now().await;
        let dir = std::mem::replace(&mut self._dir, tempfile::tempdir().unwrap());
        let (config, certs) = (self.config.clone(), self.certs.clone());
        Self::start_with(config, certs, dir).await
    }

    /// Every record in the queue so far (from a cursor of its own).
    pub fn records(&self) -> Vec<Record> {
        let mut r = self.queue.reader("test-inspect").unwrap();
        let mut out = Vec::new();
        loop {
            let b = r.read_now(1000, usize::MAX).unwrap();
            if b.is_empty() {
                return out;
            }
            out.extend(b);
        }
    }

    /// Polls until `n` records are in the queue (or 10 s pass).
    pub async fn wait_records(&self, n: usize) -> Vec<Record> {
        for _ in 0..200 {
            let r = self.records();
            if r.len() >= n {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.records()
    }

    /// A raw MQTT client over TLS, presenting `device`'s certificate if given.
    pub async fn raw(&self, device: Option<&str>) -> TlsRaw {
        raw::tls_connect(self.addr, client_tls(&self.certs, device))
            .await
            .unwrap()
    }

    /// A raw client with `device`'s certificate, connected with `connect` (CONNACK success
    /// asserted).
    pub async fn raw_connected(&self, device: &str, connect: &Connect) -> TlsRaw {
        let mut c = self.raw(Some(device)).await;
        let ack = c.connect(connect).await;
        assert_eq!(ack.connack_code(), 0, "CONNACK for {device}: {ack:?}");
        c
    }

    /// Polls `cond` every 10 ms until it holds; panics after `within`.
    pub async fn wait_until(&self, what: &str, within: Duration, cond: impl Fn(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + within;
        while !cond(self) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {within:?} waiting for {what}; refusals {:?}",
                self.stats.refusals()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the refusal counter `label` reaches `n`.
    pub async fn wait_refused(&self, label: &str, n: u64) {
        self.wait_until(&format!("{n} refusal(s) {label:?}"), raw::WAIT, |g| {
            g.stats.refused_count(label) >= n
        })
        .await;
        assert_eq!(self.stats.refused_count(label), n, "refusals {label:?}");
    }

    /// Waits until no device is connected (every connection has finished, will included).
    pub async fn wait_disconnected(&self) {
        self.wait_until("every connection to finish", raw::WAIT, |g| {
            g.stats.connected.load(std::sync::atomic::Ordering::SeqCst) == 0
        })
        .await;
    }

    pub async fn stop(mut self) {
        self.shutdown_now().await;
    }

    async fn shutdown_now(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        let q = self.queue.clone();
        tokio::task::spawn_blocking(move || q.close())
            .await
            .unwrap();
    }
}

/// A rustls client config trusting the test CA, with device `device`'s certificate if given.
pub fn client_tls(certs: &std::path::Path, device: Option<&str>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(certs.join("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(gateway::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match device {
        Some(d) => {
            let dev = certs.join("devices");
            let chain: Vec<_> = CertificateDer::pem_file_iter(dev.join(format!("{d}.pem")))
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
            let key = PrivateKeyDer::from_pem_file(dev.join(format!("{d}.key"))).unwrap();
            b.with_client_auth_cert(chain, key).unwrap()
        }
        None => b.with_no_client_auth(),
    })
}

/// Makes the (only) listener require a client certificate signed by the test CA.
pub fn require_client_cert(config: &mut Config) {
    for l in &mut config.listeners {
        if let TlsSetting::On(t) = &mut l.tls {
            t.require_client_cert = true;
        }
    }
}

/// A rustls client config trusting the test CA in `certs`, presenting the given certificate
/// and key (PEM), e.g. one signed by another CA or already expired.
pub fn client_tls_pem(
    certs: &std::path::Path,
    cert_pem: &str,
    key_pem: &str,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(certs.join("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<_> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(gateway::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap(),
    )
}

/// A [`gateway::certs::tls_tunnel`] to `addr` with `device`'s certificate: rumqttc connects to
/// its address with plain TCP, and it does the mutual TLS to the gateway. Keep it while the
/// client runs.
pub async fn tunnel(
    addr: SocketAddr,
    certs: &std::path::Path,
    device: &str,
) -> gateway::certs::TlsTunnel {
    gateway::certs::tls_tunnel(addr, client_tls(certs, Some(device)))
        .await
        .unwrap()
}

/// rumqttc (3.1.1) options for `device` over mutual TLS to `addr` (through the returned tunnel,
/// which must live as long as the client).
pub async fn v4_options(
    addr: SocketAddr,
    certs: &std::path::Path,
    device: &str,
) -> (rumqttc::MqttOptions, gateway::certs::TlsTunnel) {
    let tunnel = tunnel(addr, certs, device).await;
    let mut o = rumqttc::MqttOptions::new(device, "127.0.0.1", tunnel.addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    (o, tunnel)
}
