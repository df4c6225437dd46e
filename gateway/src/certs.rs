//! Development certificates (rcgen, pure Rust): a throwaway CA, a server certificate for
//! localhost/127.0.0.1 and one client certificate per device whose CN is the device id.
//!
//! Layout written by [`generate`] (and read by `firmware-sim --certs-dir`):
//!
//! ```text
//! OUT/ca.pem  OUT/ca.key              the CA (its key signs device certificates)
//! OUT/server.pem  OUT/server.key      CN and SANs localhost, 127.0.0.1, ::1
//! OUT/devices/<id>.pem  <id>.key      CN = device id, for mutual TLS
//! ```
//!
//! Keys are PKCS#8 PEM, written with mode 0600. These are for development and tests only.
//! So is [`tls_tunnel`], the TLS client side for test clients that speak plain TCP.

use std::fs;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_util::sync::{CancellationToken, DropGuard};

use rustls::pki_types::pem::PemObject;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};

/// Why certificates could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("could not write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {why}")]
    Parse { path: PathBuf, why: String },
}

/// A CA that can sign more certificates (the one in `OUT/ca.*`).
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn dn(cn: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::CommonName, cn);
    d.push(DnType::OrganizationName, "edge gateway dev (throwaway)");
    d
}

fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), CertError> {
    let err = |source| CertError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(err)?;
    }
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if private {
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)
}

impl DevCa {
    /// A new self-signed CA.
    pub fn new() -> Result<(DevCa, String), CertError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn("edge gateway dev CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok((
            DevCa {
                issuer: Issuer::new(params, key),
                pem: cert.pem(),
            },
            key_pem,
        ))
    }

    /// Loads the CA from `ca.pem` / `ca.key` in `dir`.
    pub fn load(dir: &Path) -> Result<DevCa, CertError> {
        let read = |p: PathBuf| {
            fs::read_to_string(&p).map_err(|source| CertError::Read { path: p, source })
        };
        let pem = read(dir.join("ca.pem"))?;
        let key = KeyPair::from_pem(&read(dir.join("ca.key"))?)?;
        let issuer = Issuer::from_ca_cert_pem(&pem, key)?;
        Ok(DevCa { issuer, pem })
    }

    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A server certificate for these DNS names / IP addresses. Returns (cert PEM, key PEM).
    pub fn server_cert(&self, names: &[&str]) -> Result<(String, String), CertError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(names.first().copied().unwrap_or("localhost"));
        for n in names {
            params.subject_alt_names.push(match n.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*n).try_into()?),
            });
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A device (client) certificate with CN = `device_id`, valid from `not_before` for `valid`.
    pub fn device_cert_valid(
        &self,
        device_id: &str,
        not_before: SystemTime,
        valid: Duration,
    ) -> Result<(String, String), CertError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(device_id);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before.into();
        params.not_after = (not_before + valid).into();
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A device certificate valid for ten years from yesterday.
    pub fn device_cert(&self, device_id: &str) -> Result<(String, String), CertError> {
        let yesterday = SystemTime::now() - Duration::from_secs(86_400);
        self.device_cert_valid(device_id, yesterday, Duration::from_secs(10 * 365 * 86_400))
    }
}

/// Device ids as `firmware-sim` names them: `dev-00001` ...
pub fn device_id(n: usize) -> String {
    format!("dev-{n:05}")
}

/// Writes a new CA, a server certificate and `devices` device certificates into `out`.
pub fn generate(out: &Path, devices: usize) -> Result<(), CertError> {
    let (ca, ca_key) = DevCa::new()?;
    write_file(&out.join("ca.pem"), ca.pem(), false)?;
    write_file(&out.join("ca.key"), &ca_key, true)?;
    let (cert, key) = ca.server_cert(&["localhost", "127.0.0.1", "::1"])?;
    write_file(&out.join("server.pem"), &cert, false)?;
    write_file(&out.join("server.key"), &key, true)?;
    for n in 1..=devices {
        let id = device_id(n);
        let (cert, key) = ca.device_cert(&id)?;
        write_file(&out.join("devices").join(format!("{id}.pem")), &cert, false)?;
        write_file(&out.join("devices").join(format!("{id}.key")), &key, true)?;
    }
    Ok(())
}

/// How long a development CRL is valid (its next update).
pub const DEV_CRL_VALIDITY: Duration = Duration::from_secs(30 * 86_400);

/// Adds the device certificates `names` (`DIR/devices/<name>.pem`) to the development CA's
/// revocation list `DIR/crl.pem` (made if missing; the ones it revoked already stay), signed by
/// `DIR/ca.*`, valid for [`DEV_CRL_VALIDITY`]. Returns its path and how many it now revokes.
/// `names` may be empty: an empty list to start from.
pub fn revoke(dir: &Path, names: &[String]) -> Result<(PathBuf, usize), CertError> {
    let ca = DevCa::load(dir)?;
    let crl_path = dir.join("crl.pem");
    let now = SystemTime::now();
    let mut revoked: Vec<RevokedCertParams> = Vec::new();
    let mut serials: Vec<Vec<u8>> = Vec::new();
    let mut number = 1u64;
    if crl_path.exists() {
        let pem = fs::read(&crl_path).map_err(|source| CertError::Read {
            path: crl_path.clone(),
            source,
        })?;
        let parse = |why: String| CertError::Parse {
            path: crl_path.clone(),
            why,
        };
        let der = rustls::pki_types::CertificateRevocationListDer::pem_slice_iter(&pem)
            .next()
            .ok_or_else(|| parse("no X509 CRL in it".into()))?
            .map_err(|e| parse(e.to_string()))?;
        let (_, crl) =
            x509_parser::parse_x509_crl(der.as_ref()).map_err(|e| parse(e.to_string()))?;
        number = crl
            .crl_number()
            .and_then(|n| u64::try_from(n).ok())
            .map_or(1, |n| n + 1);
        for r in crl.iter_revoked_certificates() {
            serials.push(r.raw_serial().to_vec());
            revoked.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(r.raw_serial()),
                revocation_time: r.revocation_date.to_datetime(),
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            });
        }
    }
    for name in names {
        let path = dir.join("devices").join(format!("{name}.pem"));
        let pem = fs::read(&path).map_err(|source| CertError::Read {
            path: path.clone(),
            source,
        })?;
        let der = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
            .next()
            .ok_or_else(|| CertError::Parse {
                path: path.clone(),
                why: "no certificate in it".into(),
            })?
            .map_err(|e| CertError::Parse {
                path: path.clone(),
                why: e.to_string(),
            })?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| CertError::Parse {
                path: path.clone(),
                why: e.to_string(),
            })?;
        let serial = cert.tbs_certificate.raw_serial().to_vec();
        if !serials.contains(&serial) {
            revoked.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial),
                revocation_time: now.into(),
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            });
            serials.push(serial);
        }
    }
    let params = CertificateRevocationListParams {
        this_update: (now - Duration::from_secs(60)).into(),
        next_update: (now + DEV_CRL_VALIDITY).into(),
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&ca.issuer)?;
    write_file(&crl_path, &crl.pem()?, false)?;
    Ok((crl_path, serials.len()))
}

/// A running [`tls_tunnel`]: plain TCP in at [`addr`](TlsTunnel::addr), mutual TLS out.
/// Dropping it stops the listener and ends the connections it carries.
pub struct TlsTunnel {
    /// Where a client connects with plain TCP (on 127.0.0.1).
    pub addr: SocketAddr,
    _stop: DropGuard,
}

/// Listens on 127.0.0.1:0; for each plain TCP connection accepted, connects to `target`, does
/// the TLS handshake as the client with `config` (server name: `target`'s IP address) and copies
/// bytes both ways until either side ends. When the TLS side ends, or its connection or
/// handshake fails (a refused certificate), the plain connection is closed, so the client sees
/// a closed connection as it would over TLS.
///
/// Why: the test clients (rumqttc) would otherwise need rumqttc's rustls feature, which pulls in
/// rustls-webpki 0.102 (RUSTSEC advisories) and the unmaintained rustls-pemfile. The gateway's
/// TLS stays real; only the test client's half of it is done here, with the workspace's rustls.
pub async fn tls_tunnel(
    target: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsTunnel> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let connector = TlsConnector::from(config);
    let server_name = rustls::pki_types::ServerName::from(target.ip());
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    tokio::spawn(stop.clone().run_until_cancelled_owned(async move {
        while let Ok((mut plain, _)) = listener.accept().await {
            let (connector, server_name) = (connector.clone(), server_name.clone());
            tokio::spawn(stopped.clone().run_until_cancelled_owned(async move {
                let tcp = TcpStream::connect(target).await?;
                let mut tls = connector.connect(server_name, tcp).await?;
                tokio::io::copy_bidirectional(&mut plain, &mut tls).await
                // Either way `plain` is dropped here: the client sees its connection close.
            }));
        }
    }));
    Ok(TlsTunnel {
        addr,
        _stop: stop.drop_guard(),
    })
}
