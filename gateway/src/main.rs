//! The `gateway` binary: parses the command line, sets up logging, loads the config and calls
//! into the library. Everything that decides anything lives in the library.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use gateway::config::{Config, ConfigError, DEFAULT_CONFIG};
use gateway::queue::inspect::Inspector;
use gateway::queue::{bench, FsyncPolicy, Queue};
use gateway::sessions::store::{Event, Store, StoreError, StoredSession};

#[derive(Parser)]
#[command(
    name = "gateway",
    version,
    about = "Edge gateway: MQTT in, crash-safe disk queue, at-least-once uplinks"
)]
struct Cli {
    /// Log format: human-readable lines or one JSON object per line (for collectors).
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (until SIGINT or SIGTERM).
    Run {
        #[arg(long, default_value = "config/gateway.toml")]
        config: PathBuf,
    },
    /// Ask the running gateway to re-read its config (like SIGHUP), through its admin endpoint;
    /// prints what changed, or why the new config was rejected (the old one keeps running).
    Reload {
        #[arg(long, default_value = "config/gateway.toml")]
        config: PathBuf,
        /// Release the cursor of a removed uplink, so the queue may delete records that only it
        /// still needed (repeatable).
        #[arg(long)]
        release: Vec<String>,
    },
    /// Validate a config file: exit 0, or exit 1 listing every problem.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the commented default config.
    PrintDefaultConfig,
    /// Development certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Add or change a user in a password file (the password is read from stdin).
    Passwd {
        /// The password file (created if missing).
        file: PathBuf,
        user: String,
    },
    /// Look into a queue directory (works while a gateway holds it, without disturbing it).
    #[command(subcommand)]
    Queue(QueueCommand),
    /// The persistent sessions stored in DATA_DIR/sessions: list and inspect them (works while
    /// a gateway runs), or drop one (gateway stopped).
    #[command(subcommand)]
    Sessions(SessionsCommand),
}

#[derive(Subcommand)]
enum SessionsCommand {
    /// One line per stored session: client id, expiry, subscriptions, queued messages, and the
    /// newest queue seq routed into it.
    List {
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
    },
    /// A stored session's subscriptions (with their options) and queued messages.
    Inspect {
        client_id: String,
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
    },
    /// End a stored session (the gateway must be stopped): it is gone at the next start, with
    /// its subscriptions and queued messages.
    Drop {
        client_id: String,
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Write a throwaway CA, a server certificate for localhost/127.0.0.1 and N device
    /// certificates (CN = device id dev-00001...) for development and tests.
    Generate {
        #[arg(long, default_value = "certs/dev")]
        out: PathBuf,
        #[arg(long, default_value_t = 10)]
        devices: usize,
    },
    /// Revoke development device certificates: add DIR/devices/NAME.pem to the revocation list
    /// DIR/crl.pem (made if missing), signed by the development CA. Point a listener's
    /// tls.crl_file at it and reload: new connections with those certificates are refused and
    /// connected ones closed.
    Revoke {
        #[arg(long, default_value = "certs/dev")]
        dir: PathBuf,
        /// Device ids (dev-00001 ...); none writes a list that revokes nothing yet.
        names: Vec<String>,
    },
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Records, bytes, segments, oldest record age, and each cursor's position and lag.
    Stats {
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// One line per record: seq, time, device, topic, payload size, payload preview.
    Inspect {
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
        /// First sequence number to show.
        #[arg(long, default_value_t = 0)]
        from: u64,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Check every record's CRC; exit 1 on damage the queue has not already quarantined.
    Verify {
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// List the dead letters (records an uplink could not deliver, or no route took), with the
    /// reason; `--replay` (gateway stopped) puts them back into the queue for the uplinks.
    DeadLetters {
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Append them to the queue again and remove them from the dead letters.
        #[arg(long)]
        replay: bool,
    },
    /// Measure durable appends on this disk (writes into a temporary subdirectory of --data-dir).
    Bench {
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
        /// Payload bytes per record.
        #[arg(long, default_value_t = 64)]
        payload: usize,
        /// Concurrent appenders (device connections).
        #[arg(long, default_value_t = 64)]
        appenders: usize,
        /// Appends each appender keeps in flight.
        #[arg(long, default_value_t = 100)]
        inflight: usize,
        #[arg(long, value_enum, default_value_t = BenchFsync::Always)]
        fsync: BenchFsync,
        /// Sync period with --fsync interval.
        #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
        fsync_interval: Duration,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value = "64MiB", value_parser = parse_size)]
        segment_bytes: u64,
        /// Pre-write segments with zeros, as `[queue] preallocate = true` does.
        #[arg(long, value_enum, default_value_t = if gateway::config::DEFAULT_PREALLOCATE { OnOff::On } else { OnOff::Off })]
        preallocate: OnOff,
        #[arg(long)]
        json: bool,
        /// Keep the queue the bench wrote (in DATA_DIR/queue-bench-PID) instead of removing it.
        #[arg(long)]
        keep: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, ValueEnum)]
enum BenchFsync {
    Always,
    Interval,
}

fn parse_size(s: &str) -> Result<u64, String> {
    gateway::config::parse_size(s)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rustls=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")
}

fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::PrintDefaultConfig => {
            print!("{DEFAULT_CONFIG}");
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { config } => Ok(check_config(&config)),
        Command::Run { config: path } => {
            let config = match Config::load(&path).and_then(|c| c.check_files().map(|()| c)) {
                Ok(c) => c,
                Err(e) => {
                    report_config_error(&e);
                    return Ok(ExitCode::FAILURE);
                }
            };
            let path = std::path::absolute(&path).unwrap_or(path);
            runtime()?.block_on(run(config, path))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Reload { config, release } => reload(&config, &release),
        Command::Queue(q) => queue_command(q),
        Command::Sessions(s) => sessions_command(s),
        #[cfg(not(feature = "dev-certs"))]
        Command::Certs(CertsCommand::Generate { .. } | CertsCommand::Revoke { .. }) => {
            eprintln!(
                "error: gateway certs: {}",
                gateway::config::DEV_CERTS_NOT_BUILT
            );
            Ok(ExitCode::FAILURE)
        }
        #[cfg(feature = "dev-certs")]
        Command::Certs(CertsCommand::Generate { out, devices }) => {
            gateway::certs::generate(&out, devices)?;
            println!(
                "wrote {0}/ca.pem, {0}/server.pem (+ keys) and {1} device certificates in {0}/devices/",
                out.display(),
                devices
            );
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "dev-certs")]
        Command::Certs(CertsCommand::Revoke { dir, names }) => {
            let (path, n) = gateway::certs::revoke(&dir, &names)?;
            println!(
                "wrote {}: {n} certificate(s) revoked; point a listener's tls.crl_file at it and reload (gateway reload)",
                path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Passwd { file, user } => {
            let mut password = String::new();
            std::io::stdin()
                .read_line(&mut password)
                .context("read the password from stdin")?;
            let password = password.trim_end_matches(['\r', '\n']);
            if password.is_empty() {
                anyhow::bail!("empty password on stdin; pipe one in: echo 'secret' | gateway passwd FILE USER");
            }
            gateway::ingest::auth::set_password(&file, &user, password)?;
            println!("{}: set password for {user}", file.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn report_config_error(e: &ConfigError) {
    eprintln!(
        "error: {:#}",
        anyhow::Error::new(ErrorText(
            e.to_string(),
            std::error::Error::source(e).map(|s| s.to_string())
        ))
    );
}

/// A config error's text with its cause, for `{:#}` printing.
#[derive(Debug)]
struct ErrorText(String, Option<String>);

impl std::fmt::Display for ErrorText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.1 {
            Some(cause) => write!(f, "{}: {cause}", self.0),
            None => f.write_str(&self.0),
        }
    }
}

impl std::error::Error for ErrorText {}

fn check_config(path: &Path) -> ExitCode {
    match Config::load(path).and_then(|c| c.check_files()) {
        Ok(()) => {
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            report_config_error(&e);
            ExitCode::FAILURE
        }
    }
}

/// Runs the gateway until SIGINT/SIGTERM (see `gateway::service`).
async fn run(config: Config, path: PathBuf) -> Result<()> {
    gateway::service::Service::start(config, path)
        .await?
        .run()
        .await
}

/// `gateway reload`: asks the running gateway (through its admin endpoint, which takes this
/// from loopback only) to re-read its config, and prints what changed or why it was rejected.
fn reload(config: &Path, release: &[String]) -> Result<ExitCode> {
    use std::io::{Read, Write};
    let cfg = match Config::load(config) {
        Ok(c) => c,
        Err(e) => {
            report_config_error(&e);
            eprintln!("(the running gateway was not asked to reload)");
            return Ok(ExitCode::FAILURE);
        }
    };
    let token = match cfg.admin.token() {
        Ok(t) => t,
        Err(p) => {
            eprintln!("{p}");
            eprintln!(
                "(the running gateway was not asked to reload: its admin endpoint needs the token)"
            );
            return Ok(ExitCode::FAILURE);
        }
    };
    let auth = token.map_or(String::new(), |t| {
        format!("Authorization: Bearer {}\r\n", t.secret())
    });
    let Some(addr) = cfg.admin.addr() else {
        anyhow::bail!("admin.enabled = false in {}: send SIGHUP to the gateway instead (systemctl reload gateway)", config.display());
    };
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("cannot reach the gateway's admin endpoint at {addr} (admin.listen); is it running?"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(120)))?;
    let query = if release.is_empty() {
        String::new()
    } else {
        format!("?release={}", release.join(","))
    };
    write!(
        tcp,
        "POST /reload{query} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    tcp.read_to_string(&mut response)
        .context("read the reload answer")?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let v: serde_json::Value = serde_json::from_str(body.trim())
        .with_context(|| format!("unexpected answer from {addr}: {response}"))?;
    if v["ok"] == serde_json::Value::Bool(true) {
        println!("reloaded:");
        for c in v["changes"].as_array().into_iter().flatten() {
            println!("  {}", c.as_str().unwrap_or_default());
        }
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("reload rejected (the old config keeps running):");
        for e in v["errors"].as_array().into_iter().flatten() {
            eprintln!("  {}", e.as_str().unwrap_or_default());
        }
        Ok(ExitCode::FAILURE)
    }
}

fn fmt_time(us: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_micros(us)).to_string()
}

fn fmt_age(us: Option<u64>) -> String {
    let Some(us) = us else {
        return "-".into();
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    let secs = now.saturating_sub(us) / 1_000_000;
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

fn preview(payload: &[u8]) -> String {
    let shown = &payload[..payload.len().min(32)];
    let text = shown.iter().all(|&b| b.is_ascii_graphic() || b == b' ');
    let mut s = if text {
        format!("{:?}", String::from_utf8_lossy(shown))
    } else {
        shown.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    if payload.len() > shown.len() {
        s.push('…');
    }
    s
}

/// Cursor of `queue dead-letters --replay` in the dead-letter store: what is behind it was
/// replayed.
const REPLAY_CURSOR: &str = "_replay";

fn dead_letters(data_dir: &Path, limit: usize, replay: bool) -> Result<ExitCode> {
    let dl_dir = data_dir.join("dead-letters");
    if !dl_dir.join("segments").is_dir() {
        println!("no dead letters in {}", data_dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    if !replay {
        let insp = Inspector::open(&dl_dir)?;
        let from = insp
            .stats()
            .cursors
            .iter()
            .find(|c| c.name == REPLAY_CURSOR)
            .map_or(0, |c| c.acked + 1);
        let records = insp.records(from, limit)?;
        for r in &records {
            let prop = |k: &str| {
                r.user_properties
                    .iter()
                    .find(|(n, _)| n == k)
                    .map_or("-", |(_, v)| v.as_str())
            };
            println!(
                "{}  seq {:>10}  uplink {:<12} {:<20} {:<32} {:>6}B  {}",
                prop("x-dead-letter-time"),
                prop("x-original-seq"),
                prop("x-dead-letter-uplink"),
                r.device_id,
                r.topic,
                r.payload.len(),
                prop("x-dead-letter-reason")
            );
        }
        if records.is_empty() {
            println!("no dead letters");
        }
        return Ok(ExitCode::SUCCESS);
    }
    runtime()?.block_on(async {
        let main = Queue::open(gateway::queue::QueueOptions::new(data_dir))
            .map_err(|e| anyhow::anyhow!("{e} (stop the gateway before --replay)"))?
            .0;
        let mut o = gateway::queue::QueueOptions::new(&dl_dir);
        o.segment_bytes = 1 << 20;
        o.max_bytes = 64 << 20;
        let dl = Queue::open(o)?.0;
        // Commands go back to the command store (delivered to devices again, with their time
        // and expiry counted from now), records to the main queue (for the uplinks).
        let mut commands: Option<Queue> = None;
        let mut reader = dl.reader(REPLAY_CURSOR)?;
        let (mut n, mut n_commands) = (0u64, 0u64);
        loop {
            let batch = reader.read_now(1000, 8 << 20)?;
            let Some(last) = batch.last().map(|r| r.seq) else {
                break;
            };
            for r in &batch {
                let props: Vec<(String, String)> = r
                    .user_properties
                    .iter()
                    .filter(|(k, _)| !k.starts_with("x-dead-letter-") && k != "x-original-seq")
                    .cloned()
                    .collect();
                let from_downlink = r
                    .user_properties
                    .iter()
                    .any(|(k, v)| k == "x-dead-letter-uplink" && v.starts_with("downlink"));
                if from_downlink {
                    if commands.is_none() {
                        // Its bound as configured does not matter here: replay waits for none.
                        let store = gateway::downlink::open_store(
                            &gateway::queue::QueueOptions::new(data_dir),
                            gateway::config::DEFAULT_DOWNLINK_MAX_BYTES,
                        )?;
                        commands = Some(store);
                    }
                    let mut rec = r.to_new(&props);
                    rec.received_at = std::time::SystemTime::now();
                    if let Some(c) = &commands {
                        c.append(&rec).await?;
                    }
                    n_commands += 1;
                } else {
                    main.append(&r.to_new(&props)).await?;
                    n += 1;
                }
            }
            reader.ack_through(last).await?;
        }
        tokio::task::spawn_blocking(move || {
            dl.close();
            main.close();
            if let Some(c) = commands {
                c.close();
            }
        })
        .await?;
        println!(
            "replayed {n} dead letter(s) into the queue; the uplinks send them on the next start"
        );
        if n_commands > 0 {
            println!(
                "replayed {n_commands} command(s) into the command store; they go to their devices on the next start"
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// The session store of `data_dir`, if there is one (`Ok(None)`: no session was ever stored).
fn session_store_dir(data_dir: &Path) -> Result<Option<PathBuf>> {
    if !data_dir.is_dir() {
        anyhow::bail!(
            "no data directory {} (--data-dir: the gateway's queue.data_dir)",
            data_dir.display()
        );
    }
    let dir = data_dir.join("sessions");
    Ok(dir.join("segments").is_dir().then_some(dir))
}

fn unknown_session(id: &str, data_dir: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "no stored session with client id {id:?} in {}; `gateway sessions list --data-dir {}` lists them",
        data_dir.join("sessions").display(),
        data_dir.display()
    )
}

/// The stored sessions, read without the lock; says on stderr when a gateway holds the store.
fn stored_sessions(data_dir: &Path) -> Result<BTreeMap<String, StoredSession>> {
    let Some(dir) = session_store_dir(data_dir)? else {
        return Ok(BTreeMap::new());
    };
    if let Some(pid) = Inspector::open(&dir).ok().and_then(|i| i.held_by) {
        eprintln!("(a gateway is running, pid {pid}: this is what it had stored a moment ago)");
    }
    Ok(Store::read_only(&dir)?.sessions)
}

fn fmt_expiry(secs: u32) -> String {
    humantime::format_duration(Duration::from_secs(u64::from(secs))).to_string()
}

fn sessions_command(cmd: SessionsCommand) -> Result<ExitCode> {
    match cmd {
        SessionsCommand::List { data_dir } => {
            let sessions = stored_sessions(&data_dir)?;
            if sessions.is_empty() {
                println!("no stored sessions in {}", data_dir.display());
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<32} {:>12} {:>13} {:>8} {:>14}",
                "client id", "expiry", "subscriptions", "queued", "routed through"
            );
            for (id, s) in &sessions {
                println!(
                    "{:<32} {:>12} {:>13} {:>8} {:>14}",
                    id,
                    fmt_expiry(s.expiry_secs),
                    s.subs.len(),
                    s.msgs.len(),
                    s.routed_through
                );
            }
            println!("{} stored session(s)", sessions.len());
            Ok(ExitCode::SUCCESS)
        }
        SessionsCommand::Inspect {
            client_id,
            data_dir,
        } => {
            let sessions = stored_sessions(&data_dir)?;
            let s = sessions
                .get(&client_id)
                .ok_or_else(|| unknown_session(&client_id, &data_dir))?;
            println!("client id       {client_id}");
            println!("expiry          {}", fmt_expiry(s.expiry_secs));
            println!("routed through  {}", s.routed_through);
            println!("subscriptions   {}", s.subs.len());
            for (filter, o) in &s.subs {
                println!(
                    "  {filter}  qos {}  no_local {}  retain_as_published {}",
                    o.qos, o.no_local, o.retain_as_published
                );
            }
            let msgs = s.msgs_in_order();
            println!("queued messages {}", msgs.len());
            if !msgs.is_empty() {
                println!(
                    "  {:>5} {:>3} {:>8} {:>8}  topic",
                    "pkid", "qos", "released", "payload"
                );
            }
            for (pkid, qos, m, released) in &msgs {
                println!(
                    "  {:>5} {:>3} {:>8} {:>7}B  {}",
                    pkid,
                    qos,
                    if *released { "yes" } else { "no" },
                    m.payload.len(),
                    m.topic
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        SessionsCommand::Drop {
            client_id,
            data_dir,
        } => {
            let Some(dir) = session_store_dir(&data_dir)? else {
                return Err(unknown_session(&client_id, &data_dir));
            };
            let running = |pid: &str| {
                anyhow::anyhow!(
                    "the session store {} is in use by a running gateway (pid {pid}); stop the gateway, then run `gateway sessions drop` again (a running gateway keeps its sessions in memory)",
                    dir.display()
                )
            };
            if let Some(pid) = Inspector::open(&dir).ok().and_then(|i| i.held_by) {
                return Err(running(&pid));
            }
            runtime()?.block_on(async {
                // The store's own bound matters only when appending; one event always fits.
                let (store, recovered) = match Store::open(&dir, FsyncPolicy::Always, 1 << 40) {
                    Ok(x) => x,
                    Err(StoreError::Queue {
                        source: gateway::queue::QueueError::Locked { holder, .. },
                        ..
                    }) => return Err(running(&holder)),
                    Err(e) => return Err(e.into()),
                };
                let result = match recovered.sessions.get(&client_id) {
                    None => Err(unknown_session(&client_id, &data_dir)),
                    Some(s) => {
                        let end = Event::End {
                            id: client_id.clone(),
                        };
                        match store.append(&end) {
                            Some(p) => p.durable().await.map(|_| s.clone()).map_err(|e| {
                                anyhow::anyhow!(
                                    "could not store the end of session {client_id:?}: {e}"
                                )
                            }),
                            None => Err(anyhow::anyhow!(
                                "could not append to {} (is the disk full? see the log above)",
                                dir.display()
                            )),
                        }
                    }
                };
                tokio::task::spawn_blocking(move || store.close()).await?;
                let s = result?;
                println!(
                    "dropped session {client_id:?}: {} subscription(s), {} queued message(s); it is gone when the gateway starts",
                    s.subs.len(),
                    s.msgs.len()
                );
                for filter in s.subs.keys() {
                    println!("  {filter}");
                }
                Ok(ExitCode::SUCCESS)
            })
        }
    }
}

fn queue_command(cmd: QueueCommand) -> Result<ExitCode> {
    match cmd {
        QueueCommand::Stats { data_dir, json } => {
            let s = Inspector::open(&data_dir)?.stats();
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!("data_dir     {}", s.data_dir.display());
            println!(
                "in use by    {}",
                s.in_use_by_pid
                    .as_deref()
                    .map_or("nobody".into(), |p| format!("pid {p}"))
            );
            println!("records      {}", s.records);
            println!("bytes        {}", s.bytes);
            println!("segments     {}", s.segments);
            println!(
                "seq range    {}",
                match (s.first_seq, s.last_seq) {
                    (Some(a), Some(b)) => format!("{a}..={b}"),
                    _ => "empty".into(),
                }
            );
            println!("oldest age   {}", fmt_age(s.oldest_time_us));
            println!(
                "quarantine   {} file(s), {} bytes",
                s.quarantine_files, s.quarantine_bytes
            );
            if s.cursors.is_empty() {
                println!("cursors      none");
            } else {
                println!("cursors:");
                println!(
                    "  {:<24} {:>20} {:>12} {:>14} {:>10}",
                    "name", "acked", "lag", "oldest unacked", "dropped"
                );
                for c in &s.cursors {
                    println!(
                        "  {:<24} {:>20} {:>12} {:>14} {:>10}",
                        c.name,
                        c.acked,
                        c.lag_records,
                        fmt_age(c.oldest_unacked_time_us),
                        c.dropped
                    );
                }
            }
            for name in &s.damaged_cursors {
                println!("  {name}: cursor file damaged (reset to the oldest record on next open)");
            }
            Ok(ExitCode::SUCCESS)
        }
        QueueCommand::Inspect {
            data_dir,
            from,
            limit,
        } => {
            let records = Inspector::open(&data_dir)?.records(from, limit)?;
            for r in &records {
                println!(
                    "{:>12}  {}  {:<20}  {:<32}  {:>6}B  {}",
                    r.seq,
                    fmt_time(r.received_at_us),
                    r.device_id,
                    r.topic,
                    r.payload.len(),
                    preview(&r.payload)
                );
            }
            if records.is_empty() {
                eprintln!("no records from seq {from}");
            }
            Ok(ExitCode::SUCCESS)
        }
        QueueCommand::DeadLetters {
            data_dir,
            limit,
            replay,
        } => dead_letters(&data_dir, limit, replay),
        QueueCommand::Verify { data_dir, json } => {
            let r = Inspector::open(&data_dir)?.verify()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                for p in &r.problems {
                    println!(
                        "DAMAGED  {} offset {} ({} bytes): {}",
                        p.file.display(),
                        p.offset,
                        p.bytes,
                        p.reason
                    );
                }
                for p in &r.notes {
                    println!(
                        "note     {} offset {} ({} bytes): {}{}",
                        p.file.display(),
                        p.offset,
                        p.bytes,
                        p.reason,
                        if p.quarantined {
                            " [already quarantined]"
                        } else {
                            ""
                        }
                    );
                }
                println!(
                    "{} segment(s), {} record(s), {} bytes checked: {}",
                    r.segments,
                    r.records,
                    r.bytes,
                    if r.problems.is_empty() {
                        "ok".to_string()
                    } else {
                        format!("{} problem(s)", r.problems.len())
                    }
                );
            }
            Ok(if r.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        QueueCommand::Bench {
            data_dir,
            payload,
            appenders,
            inflight,
            fsync,
            fsync_interval,
            seconds,
            segment_bytes,
            preallocate,
            json,
            keep,
        } => {
            let opts = bench::BenchOptions {
                data_dir,
                payload_bytes: payload,
                appenders: appenders.max(1),
                inflight: inflight.max(1),
                fsync: match fsync {
                    BenchFsync::Always => FsyncPolicy::Always,
                    BenchFsync::Interval => FsyncPolicy::Interval(fsync_interval),
                },
                duration: Duration::from_secs(seconds),
                segment_bytes,
                preallocate: preallocate == OnOff::On,
                keep,
            };
            std::fs::create_dir_all(&opts.data_dir)
                .with_context(|| format!("create {}", opts.data_dir.display()))?;
            let r = runtime()?.block_on(bench::run(opts))?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} records in {:.1}s: {:.0} records/s, {:.1} MiB/s payload",
                    r.records, r.seconds, r.records_per_s, r.mib_per_s
                );
                println!(
                    "append-to-durable latency: p50 {} µs, p99 {} µs, max {} µs",
                    r.p50_us, r.p99_us, r.max_us
                );
                println!(
                    "disk bytes per record: {:.1} (payload {} + topic {} + {:.1} overhead)",
                    r.disk_bytes_per_record,
                    r.payload_bytes,
                    r.topic_bytes,
                    r.disk_bytes_per_record - (r.payload_bytes + r.topic_bytes) as f64
                );
                match r.device_bytes_per_record {
                    Some(b) => println!(
                        "bytes the disk was made to write per record: {b:.1} (preallocate {})",
                        if r.preallocate { "on" } else { "off" }
                    ),
                    None => println!("bytes written per record: not counted by this kernel"),
                }
                println!(
                    "fsyncs: {} ({:.0} records each, mean {} µs, max {} µs)",
                    r.fsyncs, r.records_per_fsync, r.mean_fsync_us, r.max_fsync_us
                );
                println!(
                    "reopen of the {} MiB backlog ({} records): {:.0} ms, RSS after {} MiB",
                    r.backlog_bytes >> 20,
                    r.backlog_records,
                    r.reopen_ms,
                    r.rss_kib_after_reopen >> 10
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
