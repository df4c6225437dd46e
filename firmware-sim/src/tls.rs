//! TLS client configurations for the fleet, built once at start (never per connection or per
//! reconnect), with the `ring` provider.
//!
//! Layout written by `gateway certs generate --out certs/dev --devices N`:
//!
//! ```text
//! certs/dev/ca.pem                       the dev CA (trust anchor for the gateway's certificate)
//! certs/dev/devices/<device-id>.pem      a device's certificate chain
//! certs/dev/devices/<device-id>.key      its private key (PEM, PKCS#8)
//! ```
//!
//! Devices that present the same certificate (or none) share one `Arc<ClientConfig>`; with
//! per-device certificates each device gets its own, all sharing one root store and provider.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// Where the fleet's TLS material comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// CA certificate(s) to trust; defaults to `<certs_dir>/ca.pem`.
    pub ca: Option<PathBuf>,
    /// Per-device certificates: `<certs_dir>/devices/<id>.pem` and `.key`.
    pub certs_dir: Option<PathBuf>,
    /// One client certificate and key shared by every device (instead of `certs_dir`).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// Why the TLS configuration could not be built. Each names the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Neither `--tls-ca` nor `--certs-dir` says what to trust.
    #[error("TLS: needs a CA: pass --tls-ca FILE or --certs-dir DIR (with DIR/ca.pem)")]
    NoCa,
    /// A PEM file could not be read or holds nothing usable.
    #[error("TLS: {path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    /// rustls refused the material (for example a key that does not match its certificate).
    #[error("TLS: {path}: {error}")]
    Rustls { path: PathBuf, error: rustls::Error },
}

/// One TLS config per device, in device order. Shared configs are the same `Arc`.
pub fn client_configs(
    settings: &TlsSettings,
    device_ids: &[String],
) -> Result<Vec<Arc<ClientConfig>>, TlsError> {
    let ca = match (&settings.ca, &settings.certs_dir) {
        (Some(ca), _) => ca.clone(),
        (None, Some(dir)) => dir.join("ca.pem"),
        (None, None) => return Err(TlsError::NoCa),
    };
    let roots = Arc::new(root_store(&ca)?);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = |path: &Path| {
        ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(roots.clone()))
            .map_err(|error| TlsError::Rustls {
                path: path.to_owned(),
                error,
            })
    };
    let with_cert = |cert: &Path, key: &Path| -> Result<Arc<ClientConfig>, TlsError> {
        let chain = read_certs(cert)?;
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Pem {
            path: key.to_owned(),
            reason: format!("no usable private key: {e}"),
        })?;
        let config = builder(cert)?
            .with_client_auth_cert(chain, key_der)
            .map_err(|error| TlsError::Rustls {
                path: key.to_owned(),
                error,
            })?;
        Ok(Arc::new(config))
    };

    if let Some(dir) = &settings.certs_dir {
        let devices = dir.join("devices");
        // Keyed by certificate path, so devices pointing at one file share one config.
        let mut built: HashMap<PathBuf, Arc<ClientConfig>> = HashMap::new();
        let mut out = Vec::with_capacity(device_ids.len());
        for id in device_ids {
            let cert = devices.join(format!("{id}.pem"));
            let key = devices.join(format!("{id}.key"));
            if !cert.exists() {
                return Err(TlsError::Pem {
                    path: cert,
                    reason: format!(
                        "no certificate for device {id} (were certificates generated for fewer \
                         devices? `gateway certs generate --devices N`)"
                    ),
                });
            }
            let config = match built.get(&cert) {
                Some(c) => c.clone(),
                None => {
                    let c = with_cert(&cert, &key)?;
                    built.insert(cert, c.clone());
                    c
                }
            };
            out.push(config);
        }
        return Ok(out);
    }
    let shared = match &settings.client_cert {
        Some((cert, key)) => with_cert(cert, key)?,
        None => Arc::new(builder(&ca)?.with_no_client_auth()),
    };
    Ok(vec![shared; device_ids.len()])
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |reason: String| TlsError::Pem {
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err("no CERTIFICATE block".into()));
    }
    Ok(certs)
}

fn root_store(path: &Path) -> Result<RootCertStore, TlsError> {
    if !path.exists() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            reason: "CA certificate not found (development certificates: \
                     `gateway certs generate --out DIR --devices N`)"
                .into(),
        });
    }
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|error| TlsError::Rustls {
            path: path.to_owned(),
            error,
        })?;
    }
    Ok(roots)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Writes a CA and `n` device certificates in the `gateway certs generate` layout.
    fn write_layout(dir: &Path, n: usize) -> Vec<String> {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::create_dir_all(dir.join("devices")).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        (1..=n)
            .map(|i| {
                let id = format!("dev-{i:05}");
                let key = rcgen::KeyPair::generate().unwrap();
                let cert = rcgen::CertificateParams::new(vec![id.clone()])
                    .unwrap()
                    .signed_by(&key, &issuer)
                    .unwrap();
                std::fs::write(dir.join(format!("devices/{id}.pem")), cert.pem()).unwrap();
                std::fs::write(dir.join(format!("devices/{id}.key")), key.serialize_pem()).unwrap();
                id
            })
            .collect()
    }

    #[test]
    fn per_device_certificates_give_one_config_each() {
        let dir = tempfile::tempdir().unwrap();
        let ids = write_layout(dir.path(), 3);
        let settings = TlsSettings {
            certs_dir: Some(dir.path().to_owned()),
            ..Default::default()
        };
        let configs = client_configs(&settings, &ids).unwrap();
        assert_eq!(configs.len(), 3);
        assert!(!Arc::ptr_eq(&configs[0], &configs[1]));
        assert!(configs
            .iter()
            .all(|c| c.client_auth_cert_resolver.has_certs()));
    }

    #[test]
    fn devices_without_client_certificates_share_one_config() {
        let dir = tempfile::tempdir().unwrap();
        write_layout(dir.path(), 0);
        let settings = TlsSettings {
            ca: Some(dir.path().join("ca.pem")),
            ..Default::default()
        };
        let ids: Vec<String> = (1..=4).map(|i| format!("dev-{i:05}")).collect();
        let configs = client_configs(&settings, &ids).unwrap();
        assert!(configs.iter().all(|c| Arc::ptr_eq(c, &configs[0])));
    }

    #[test]
    fn a_missing_device_certificate_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut ids = write_layout(dir.path(), 1);
        ids.push("dev-00002".into());
        let settings = TlsSettings {
            certs_dir: Some(dir.path().to_owned()),
            ..Default::default()
        };
        let err = client_configs(&settings, &ids).unwrap_err().to_string();
        assert!(err.contains("dev-00002.pem"), "{err}");
        let no_ca = client_configs(&TlsSettings::default(), &ids).unwrap_err();
        assert!(matches!(no_ca, TlsError::NoCa));
    }
}
