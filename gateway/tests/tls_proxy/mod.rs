//! A TLS-terminating TCP proxy for tests: it accepts TLS (tokio-rustls, a certificate for
//! `127.0.0.1` and `localhost` signed by a throwaway CA made at start with rcgen) and forwards the
//! plaintext to a target, so an uplink can speak `amqps://` or Kafka over TLS to the shared
//! brokers, which have no TLS listener of their own (and must not be reconfigured).
//!
//! The CA certificate is written to [`TlsProxy::ca_file`] for the uplink's `ca_file`. The target
//! may be set after start ([`TlsProxy::set_target`]): a Kafka broker must advertise the proxy's
//! address, so the proxy has to exist first. [`TlsProxy::handshakes`] counts completed TLS
//! handshakes (proof that the client really spoke TLS), [`TlsProxy::failed_handshakes`] the
//! connections that were not TLS or did not trust the certificate. Dropping the proxy stops it.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use gateway::certs::DevCa;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::{CancellationToken, DropGuard};

struct Shared {
    target: Mutex<Option<SocketAddr>>,
    handshakes: AtomicU64,
    failed: AtomicU64,
    stop: CancellationToken,
}

/// The proxy; stops when dropped.
pub struct TlsProxy {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    shared: Arc<Shared>,
    _stop: DropGuard,
}

impl TlsProxy {
    /// Listens on `127.0.0.1:0` with a new CA and server certificate; forwards to `target`
    /// (connections that come before a target is set are closed).
    pub async fn start(target: Option<SocketAddr>) -> TlsProxy {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _ca_key) = DevCa::new().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        let (cert_pem, key_pem) = ca.server_cert(&["127.0.0.1", "localhost"]).unwrap();
        let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(gateway::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            target: Mutex::new(target),
            handshakes: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            stop: stop.clone(),
        });
        tokio::spawn(accept_loop(listener, acceptor, shared.clone()));
        TlsProxy {
            addr,
            dir,
            shared,
            _stop: stop.drop_guard(),
        }
    }

    pub fn set_target(&self, target: SocketAddr) {
        *self.shared.target.lock().unwrap() = Some(target);
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The PEM file of the CA that signed the proxy's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// TLS handshakes completed.
    pub fn handshakes(&self) -> u64 {
        self.shared.handshakes.load(Ordering::Relaxed)
    }

    /// Connections whose TLS handshake failed (plaintext, or an untrusted certificate).
    pub fn failed_handshakes(&self) -> u64 {
        self.shared.failed.load(Ordering::Relaxed)
    }
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    loop {
        let client = tokio::select! {
            r = listener.accept() => match r {
                Ok((c, _)) => c,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = shared.stop.cancelled() => return,
        };
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            let handshake =
                tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(client));
            let mut tls = match handshake.await {
                Ok(Ok(s)) => s,
                _ => {
                    shared.failed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            shared.handshakes.fetch_add(1, Ordering::Relaxed);
            let target = *shared.target.lock().unwrap();
            let Some(target) = target else { return };
            let Ok(mut server) = TcpStream::connect(target).await else {
                return;
            };
            let _ = server.set_nodelay(true);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut tls, &mut server) => {}
                _ = shared.stop.cancelled() => {}
            }
        });
    }
}
