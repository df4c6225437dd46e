//! rustls set-up for the whole gateway: the server configuration of each MQTT listener (built
//! once at start and again on reload, never per connection) and the client configuration of
//! uplinks that speak TLS. One crypto provider everywhere, `ring`: pure Rust plus assembly, no C
//! toolchain or cmake needed to cross-compile for ARM edge boards.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::config::TlsConfig;

/// Why a listener's TLS configuration could not be built. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS file {path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    let why = match std::fs::metadata(path) {
        Err(_) => format!("cannot read it ({e}); check the path in the listener's tls section"),
        Ok(_) => format!("not usable: {e}"),
    };
    TlsError::File {
        path: path.to_path_buf(),
        why,
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// A certificate as revocation lists name it: its issuer's name (DER) and its serial number.
pub type CertKey = (Vec<u8>, Vec<u8>);

/// A listener's revocation lists, loaded: what rustls checks in the handshake, and the
/// certificates they revoke (a reload closes their connections).
#[derive(Debug, Default)]
pub struct Crls {
    pub ders: Vec<CertificateRevocationListDer<'static>>,
    pub revoked: HashSet<CertKey>,
    /// Lists whose next update has passed: the file and that date. They are still applied.
    pub stale: Vec<(PathBuf, String)>,
}

/// Loads the revocation lists in `paths` (each PEM, possibly several, or one DER).
pub fn load_crls(paths: &[&Path]) -> Result<Crls, TlsError> {
    let mut out = Crls::default();
    for path in paths {
        let bytes = std::fs::read(path).map_err(|e| file_err(path, e))?;
        let ders: Vec<CertificateRevocationListDer<'static>> =
            if bytes.windows(10).any(|w| w == b"-----BEGIN") {
                CertificateRevocationListDer::pem_slice_iter(&bytes)
                    .collect::<Result<_, _>>()
                    .map_err(|e| file_err(path, e))?
            } else {
                vec![CertificateRevocationListDer::from(bytes)]
            };
        if ders.is_empty() {
            return Err(file_err(path, "no X509 CRL in it (PEM or DER)"));
        }
        for der in ders {
            let (_, crl) = x509_parser::parse_x509_crl(der.as_ref())
                .map_err(|e| file_err(path, format!("not a certificate revocation list: {e}")))?;
            let issuer = crl.issuer().as_raw().to_vec();
            for r in crl.iter_revoked_certificates() {
                out.revoked
                    .insert((issuer.clone(), r.raw_serial().to_vec()));
            }
            if let Some(next) = crl.next_update() {
                if next < x509_parser::time::ASN1Time::now() {
                    out.stale.push((path.to_path_buf(), next.to_string()));
                }
            }
            out.ders.push(der);
        }
    }
    Ok(out)
}

/// The issuer and serial of a certificate (DER), as revocation lists name it.
pub fn cert_key(der: &[u8]) -> Option<CertKey> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some((
        cert.issuer().as_raw().to_vec(),
        cert.tbs_certificate.raw_serial().to_vec(),
    ))
}

/// The crypto provider used for every TLS config of the gateway.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the server config for one listener.
pub fn server_config(t: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certs(&t.cert)?;
    let key = PrivateKeyDer::from_pem_file(&t.key).map_err(|e| file_err(&t.key, e))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = match &t.client_ca {
        Some(ca_path) => {
            let mut roots = RootCertStore::empty();
            for c in certs(ca_path)? {
                roots.add(c).map_err(|e| file_err(ca_path, e))?;
            }
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let crls = load_crls(&t.crl_file.paths())?;
            for (path, next) in &crls.stale {
                tracing::warn!(file = %path.display(), next_update = %next, "certificate revocation list past its next update: still applied (certificates it revokes stay refused); publish a new one and reload");
            }
            // A device certificate is checked against the lists; one from a CA without a list
            // (or an intermediate) is not refused for it; a list past its next update still
            // applies (see the README's Security section).
            let v = if crls.ders.is_empty() {
                v
            } else {
                v.with_crls(crls.ders)
                    .only_check_end_entity_revocation()
                    .allow_unknown_revocation_status()
            };
            let v = if t.require_client_cert {
                v
            } else {
                v.allow_unauthenticated()
            };
            builder
                .with_client_cert_verifier(v.build().map_err(|e| TlsError::Rustls(e.to_string()))?)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(chain, key)
        .map_err(|e| file_err(&t.key, format!("does not match the certificate: {e}")))?;
    // Many small messages per connection: tickets make device reconnects cheap.
    cfg.send_tls13_tickets = 2;
    Ok(Arc::new(cfg))
}

/// A rustls client config that trusts the system's CA store plus `ca_file` (PEM), if set: for
/// uplinks with TLS. The error says what is wrong in words an operator can act on.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    client_config_with_identity(ca_file, None)
}

/// A client certificate chain and its key, read for mutual TLS (an uplink's `cert_file` and
/// `key_file`). The error names the key of the file that is wrong, and why.
pub type ClientIdentity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// Reads `cert_file` (PEM chain) and `key_file` (PEM key) and checks that they belong together.
pub fn load_client_identity(
    cert_file: &Path,
    key_file: &Path,
) -> Result<ClientIdentity, (&'static str, String)> {
    let chain: Vec<_> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            (
                "cert_file",
                format!("cannot read PEM certificates from it: {e}"),
            )
        })?;
    if chain.is_empty() {
        return Err((
            "cert_file",
            "holds no PEM certificate (\"-----BEGIN CERTIFICATE-----\")".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
        (
            "key_file",
            format!("cannot read a PEM private key from it: {e}"),
        )
    })?;
    // Checks that the key is usable and matches the certificate.
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ("cert_file", format!("TLS setup: {e}")))?
        .with_root_certificates(RootCertStore::empty())
        .with_client_auth_cert(chain.clone(), key.clone_key())
        .map_err(|e| ("key_file", format!("does not match cert_file: {e}")))?;
    Ok((chain, key))
}

/// [`client_config`] that also presents a client certificate (mutual TLS) when `identity` is
/// `Some((cert_file, key_file))`.
pub fn client_config_with_identity(
    ca_file: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    // A system store that cannot be read is not fatal when `ca_file` names the broker's CA.
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        let certs = crate::config::load_ca_file(path)
            .map_err(|why| format!("ca_file {}: {why}", path.display()))?;
        let (_, ignored) = roots.add_parsable_certificates(certs);
        if ignored > 0 {
            return Err(format!(
                "ca_file {}: {ignored} certificate(s) are not valid CA certificates",
                path.display()
            ));
        }
    }
    if roots.is_empty() {
        return Err(
            "TLS is on but there is no CA certificate to trust: the system store is empty; set ca_file"
                .into(),
        );
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots);
    let config = match identity {
        None => config.with_no_client_auth(),
        Some((cert_file, key_file)) => {
            let (chain, key) = load_client_identity(cert_file, key_file)
                .map_err(|(which, why)| format!("{which}: {why}"))?;
            config
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("key_file: {e}"))?
        }
    };
    Ok(Arc::new(config))
}
