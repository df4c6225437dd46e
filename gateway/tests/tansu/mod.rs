//! tansu, the Kafka-compatible test broker: find the binary, start one per test on a free
//! loopback port with its own sqlite database (plus the index its schema lacks, see
//! [`index_headers`]), restart it, create topics, kill it on drop.
//! [`Tansu::start_advertising`] makes it advertise another address in its metadata (a proxy's),
//! so that every client connection after the bootstrap goes through that proxy.
//! Shared by the gateway's Kafka tests and the fleet end-to-end test (`#[path]`-included there).
#![allow(dead_code, clippy::unwrap_used)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const INSTALL_TANSU: &str =
    "cargo install tansu --version 0.6.0 --locked --features dynostore,libsql";

/// The tansu binary, or a failure saying how to install it.
pub fn tansu_binary() -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("TANSU") {
        candidates.push(PathBuf::from(p));
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")));
    if let Some(h) = cargo_home {
        candidates.push(h.join("bin/tansu"));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("tansu")));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "tansu (the Kafka-compatible test broker) is not installed: not in $TANSU, \
             ~/.cargo/bin or PATH. Run the suite with `./run-tests` (the README's test \
             command), which builds it into ~/.cargo/bin (about 10 minutes on 2 cores), or \
             install it with `{INSTALL_TANSU}`."
            )
        })
}

/// A tansu broker on a free loopback port, killed when dropped.
pub struct Tansu {
    pub child: Child,
    pub port: u16,
    /// `host:port` that tansu advertises in metadata (its own unless started behind a proxy).
    pub advertised: String,
    /// More `tansu broker` arguments (e.g. `--authentication`), kept across restarts.
    extra: Vec<String>,
    bin: PathBuf,
    dir: tempfile::TempDir,
}

/// A loopback port that is free when we look.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Tansu {
    pub fn start() -> Tansu {
        let bin = tansu_binary();
        let dir = tempfile::tempdir().unwrap();
        // The port is free when we look; should another process take it before tansu binds it,
        // tansu exits, and we try another port.
        for _ in 0..3 {
            let port = free_port();
            let advertised = format!("127.0.0.1:{port}");
            match start_on(&bin, dir.path(), port, &advertised, &[]) {
                Ok(child) => {
                    return Tansu {
                        child,
                        port,
                        advertised,
                        extra: Vec::new(),
                        bin,
                        dir,
                    }
                }
                Err(why) => eprintln!("tansu on port {port}: {why}"),
            }
        }
        panic!("tansu did not start (see above)");
    }

    /// Starts tansu on `port` (from [`free_port`]), advertising `advertised` (`host:port`, e.g. a
    /// fault or TLS proxy in front of it) as the broker's address in metadata. `Err` if tansu
    /// did not start (say, another process took the port meanwhile).
    pub fn start_advertising(port: u16, advertised: &str) -> Result<Tansu, String> {
        let bin = tansu_binary();
        let dir = tempfile::tempdir().unwrap();
        let child = start_on(&bin, dir.path(), port, advertised, &[])?;
        Ok(Tansu {
            child,
            port,
            advertised: advertised.to_string(),
            extra: Vec::new(),
            bin,
            dir,
        })
    }

    /// Kills the broker and starts it again on the same port and database.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = start_on(
            &self.bin,
            self.dir.path(),
            self.port,
            &self.advertised,
            &self.extra,
        )
        .unwrap_or_else(|why| panic!("tansu restart on port {}: {why}", self.port));
    }

    /// Restarts it (same port and database) with these extra `tansu broker` arguments, e.g.
    /// `--authentication` (SASL required; users from [`Tansu::create_user`] made before).
    pub fn restart_with(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|a| a.to_string()).collect();
        self.restart();
    }

    /// Creates a SCRAM user (`mechanism`: "scram256" or "scram512") with tansu's CLI. Needs a
    /// broker without `--authentication` (the CLI does not authenticate).
    pub fn create_user(&self, name: &str, password: &str, mechanism: &str) {
        let out = Command::new(&self.bin)
            .args(["user", "create", name, password])
            .args(["--mechanism", mechanism])
            .args(["--broker", &format!("tcp://127.0.0.1:{}", self.port)])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tansu user create {name}: {}\n{}\nbroker log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The database file (sqlite).
    pub fn database(&self) -> PathBuf {
        self.dir.path().join("tansu.db")
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("tansu-{}.log", self.port)))
            .unwrap_or_default()
    }

    pub fn create_topic(&self, name: &str, partitions: u32) {
        let out = Command::new(&self.bin)
            .args(["topic", "create", name])
            .args(["--partitions", &partitions.to_string()])
            .args(["--broker", &format!("tcp://127.0.0.1:{}", self.port)])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tansu topic create {name}: {}\n{}\nbroker log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }
}

/// Starts tansu on `port`, advertising `advertised`, and waits until it accepts connections
/// (or exits).
fn start_on(
    bin: &Path,
    dir: &Path,
    port: u16,
    advertised: &str,
    extra: &[String],
) -> Result<Child, String> {
    let url = format!("tcp://127.0.0.1:{port}");
    let advertised = format!("tcp://{advertised}");
    let log_path = dir.join(format!("tansu-{port}.log"));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(bin)
        .arg("broker")
        .args(["--listener-url", &url])
        .args(["--advertised-listener-url", &advertised])
        // tansu resolves a sqlite URL against its working directory (host + path).
        .args(["--storage-engine", "sqlite://tansu.db"])
        .args(extra)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            if let Err(why) = index_headers(&dir.join("tansu.db"), deadline) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{why}\nbroker log:\n{}", log());
            }
            return Ok(child);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited ({status}):\n{}", log()));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("not ready within 10 s:\n{}", log()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The index on `header (topition, offset_id)` that tansu 0.6's sqlite schema lacks, created
/// once tansu has made its tables ("if not exists": a restart keeps it).
///
/// Without it every fetch is quadratic: tansu reads each fetched record's headers with a query
/// that scans the whole header table, so reading back N records while the database holds H
/// header rows visits N x H rows. The gateway sends 5 headers per record, so reading back the
/// fleet test's 10,000 records visited 5 * 10^8 rows (3 ms per record): its verifier received
/// nothing for 47 s and then everything (tansu answers a whole partition at once), 50 s on a
/// quiet machine; under load it timed out at 60 s with 0 received, although the gateway had had
/// every record confirmed within 4 s of the fleet's end. With the index the read takes 2.5 s.
/// Made with python3's sqlite3 module (the Kafka read-back tests need python3 anyway); tansu
/// picks up the new schema at its next statement.
pub fn index_headers(db: &Path, deadline: Instant) -> Result<(), String> {
    const SCRIPT: &str = "import sqlite3, sys\n\
        c = sqlite3.connect(sys.argv[1], timeout=5)\n\
        c.execute('create index if not exists header_topition_offset on header (topition, offset_id)')\n\
        c.commit()\n";
    loop {
        let out = Command::new("python3")
            .args(["-c", SCRIPT])
            .arg(db)
            .output()
            .map_err(|e| {
                format!(
                    "cannot run python3 ({e}) to index tansu's database: install python3, or run \
                     the suite with `./run-tests` (the README's test command)"
                )
            })?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Should tansu ever accept connections before it has made its tables: wait for them.
        if !stderr.contains("no such table") || Instant::now() > deadline {
            return Err(format!(
                "cannot index tansu's database {}: {stderr}",
                db.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
