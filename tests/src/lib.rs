//! Helpers shared by the cross-process tests: locating (and if needed building) the workspace's
//! binaries, free loopback ports, the fault suite's scaffolding ([`faults`]), the power-cut
//! rig ([`power_cut`]), the persistent-session clients ([`subscribers`]) and the raw MQTT client
//! they use ([`raw`]).

pub mod bench;
pub mod faults;
pub mod power_cut;
/// The raw MQTT client of the gateway's own tests (hand-written packets from the specifications,
/// independent of the codec under test), compiled here too rather than copied.
#[path = "../../gateway/tests/ingest_support/raw.rs"]
#[allow(clippy::unwrap_used)]
pub mod raw;
pub mod subscribers;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A child process (the gateway) stopped with SIGTERM, then SIGKILL after 10 s, when dropped.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The binary `bin` of workspace package `package`, from the build this test belongs to.
///
/// Cargo builds a package's binaries only for that package's own integration tests, and
/// artifact dependencies (`CARGO_BIN_EXE_*` of another package) are unstable. So: a test
/// executable is `<target>/<profile>/deps/<test>-<hash>`, and the binary is
/// `<target>/<profile>/<bin>`. `cargo test --workspace` has just built it; after `cargo test -p
/// gateway-tests` it may be missing or older than the sources, and then this runs `cargo build -p
/// <package> --bin <bin>` for that profile and target directory. Not unconditionally: that build
/// resolves dependency features without the test crates' dev-dependencies, so it recompiles (and
/// the next `cargo test` recompiles back) several crates even when nothing changed.
pub fn workspace_binary(package: &str, bin: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable inside <target>/<profile>/deps")
        .to_path_buf();
    let target_dir = profile_dir
        .parent()
        .expect("a target directory above the profile directory")
        .to_path_buf();
    let path = profile_dir.join(bin);
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace above tests/")
        .to_path_buf();
    let sources = [
        workspace.join(package).join("src"),
        workspace.join(package).join("Cargo.toml"),
        workspace.join("gateway/src"),
        workspace.join("Cargo.toml"),
        workspace.join("Cargo.lock"),
    ];
    let built_at = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    let newest_source = sources.iter().filter_map(|p| newest_mtime(p)).max();
    if let (Some(built), Some(source)) = (built_at, newest_source) {
        if built >= source {
            return path;
        }
    }
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_string(),
        Some(other) => other.to_string(),
    };
    eprintln!("building {bin} ({path:?} is missing or older than its sources)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .current_dir(&workspace)
        .args(["build", "--quiet", "-p", package, "--bin", bin])
        .args(["--profile", &profile])
        .arg("--target-dir")
        .arg(&target_dir)
        .status();
    match status {
        Ok(s) if s.success() => {}
        other if path.exists() => {
            eprintln!("warning: `cargo build -p {package}` failed ({other:?}); using the existing {path:?}")
        }
        other => panic!("cannot build {bin} ({other:?}) and {path:?} is missing"),
    }
    assert!(path.exists(), "{path:?} missing after the build");
    path
}

/// The latest modification time of `path` or of any file below it.
fn newest_mtime(path: &Path) -> Option<std::time::SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| newest_mtime(&e.path()))
        .max()
}

/// A free TCP port on 127.0.0.1 (bound and released; the caller's server binds it right after).
///
/// The port comes from 20000..32000, below Linux's ephemeral range (32768..61000 by default),
/// and each call in a process gets a different one. A port the kernel hands out as `:0` is an
/// ephemeral one: while a gateway under test is down between restarts, an outgoing connection
/// (a reconnecting device, a broker client) can take it as its source port and the restart
/// then fails to bind.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const BASE: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Test binaries run one after another; a per-process start keeps a port of the last one
    // (perhaps in TIME_WAIT) out of the way of the next.
    let start = std::process::id().wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = BASE + (start + n) % SPAN;
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The real gateway binary, started for one test: certificates for `dev-00001..` in `certs`, the
/// queue in a temporary directory, MQTT with mutual TLS on a free loopback port, and the given
/// extra TOML (uplinks, routes); its log (info) in `gateway.log` there, see
/// [`GatewayProcess::log`]. Stopped (SIGTERM) when dropped.
pub struct GatewayProcess {
    pub port: u16,
    /// The admin endpoint (`/metrics`, `/readyz`, `POST /reload`) on 127.0.0.1.
    pub admin_port: u16,
    pub certs: PathBuf,
    pub dir: tempfile::TempDir,
    _running: Running,
}

/// Starts a [`GatewayProcess`] and waits until it listens.
pub fn start_gateway(devices: usize, extra_toml: &str) -> GatewayProcess {
    let gateway = workspace_binary("gateway", "gateway");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let certs = dir.path().join("certs");
    bench::generate_certs(&gateway, devices, &certs).expect("gateway certs generate");
    let port = free_port();
    let admin_port = free_port();
    let cfg = dir.path().join("gateway.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[queue]
data_dir = "{data}"

[[listeners]]
bind = "127.0.0.1:{port}"
tls = {{ cert = "{c}/server.pem", key = "{c}/server.key", client_ca = "{c}/ca.pem", require_client_cert = true }}

[gateway]
id = "e2e"

[admin]
listen = "127.0.0.1:{admin_port}"

{extra_toml}
"#,
            data = dir.path().join("data").display(),
            c = certs.display(),
        ),
    )
    .expect("write the gateway config");
    let log = std::fs::File::create(dir.path().join("gateway.log")).expect("create gateway.log");
    let running = Running(
        Command::new(&gateway)
            .arg("run")
            .arg("--config")
            .arg(&cfg)
            // Info: the uplink's connects, topic creation and state changes, a few dozen lines.
            .env("RUST_LOG", "info,rustls=error")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the gateway"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    // The MQTT listener is bound before the admin endpoint: wait for both.
    for p in [port, admin_port] {
        while std::net::TcpStream::connect(("127.0.0.1", p)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the gateway did not start listening on {p}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    GatewayProcess {
        port,
        admin_port,
        certs,
        dir,
        _running: running,
    }
}

impl GatewayProcess {
    /// What the gateway logged so far (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }
}

/// A rustls client config (ring provider) with `certs/ca.pem` and, when given, the device's certificate.
pub fn device_tls(certs: &Path, device: Option<&str>) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(certs.join("ca.pem"))
        .expect("test certificates")
    {
        roots
            .add(c.expect("test certificates"))
            .expect("test certificates");
    }
    let b = rustls::ClientConfig::builder_with_provider(gateway::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("test certificates")
        .with_root_certificates(roots);
    std::sync::Arc::new(match device {
        Some(d) => {
            let dev = certs.join("devices");
            let chain: Vec<_> =
                rustls::pki_types::CertificateDer::pem_file_iter(dev.join(format!("{d}.pem")))
                    .expect("test certificates")
                    .map(|c| c.expect("test certificates"))
                    .collect();
            let key = rustls::pki_types::PrivateKeyDer::from_pem_file(dev.join(format!("{d}.key")))
                .expect("test certificates");
            b.with_client_auth_cert(chain, key)
                .expect("test certificates")
        }
        None => b.with_no_client_auth(),
    })
}
