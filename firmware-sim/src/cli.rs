//! The command line: `run`, `bench`, `verify`. Flags override `--config` (fleet.toml), which
//! overrides the built-in defaults. The commands return an exit code:
//!
//! - `run`: 0 when every reading that was sent got acknowledged (QoS 0: written) and none is
//!   left unsent; 1 when some are still outstanding at the end; 2 on an error.
//! - `bench`: 0, or 2 on an error.
//! - `command`: 0 when the broker confirmed every command; 1 when some were nacked, returned or
//!   unconfirmed; 2 on an error (broker unreachable, bad flags).
//! - `verify`: 0 when nothing acknowledged is missing and nothing is out of order (and
//!   duplicates are within `--max-duplicates`), and with `--commands` every confirmed command
//!   was answered, in order, with its own correlation data; 1 otherwise; 2 on an error (broker
//!   unreachable, queue or topic missing, bad manifest).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::device::FullPolicy;
use crate::fleet::{self, BackoffConfig, FleetConfig, FleetReport, MqttVersion, ProgressMode};
use crate::manifest::{CommandManifest, Manifest};
use crate::sender::{self, SendConfig, Target};
use crate::tls::TlsSettings;
use crate::verify::{self, Source, VerifyOptions};

/// Exit code for "ran, and found a problem".
pub const EXIT_PROBLEM: u8 = 1;
/// Exit code for "could not run".
pub const EXIT_ERROR: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "firmware-sim",
    version,
    about = "Simulated MQTT sensor fleet and end-to-end delivery verifier"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a fleet of simulated devices against an MQTT broker or the gateway.
    Run(RunArgs),
    /// Drive a broker flat out (or at --rate) and print acked publishes/s and latency.
    Bench(RunArgs),
    /// Read what reached the upstream broker and compare it with a run's manifest (telemetry)
    /// and/or a `command` run's manifest (replies to commands).
    Verify(VerifyArgs),
    /// Send commands for the fleet's devices upstream (RabbitMQ or Kafka), for the gateway to
    /// deliver; write what the broker confirmed.
    #[command(name = "command")]
    SendCommands(CommandArgs),
}

/// Flags of `command`.
#[derive(Debug, Args)]
pub struct CommandArgs {
    /// AMQP URL of the upstream RabbitMQ, e.g. amqp://guest:guest@127.0.0.1:5672/%2f
    #[arg(
        long,
        value_name = "URL",
        conflicts_with = "kafka",
        required_unless_present = "kafka"
    )]
    pub amqp: Option<String>,
    /// Topic exchange to publish to (declared durable if missing).
    #[arg(long, value_name = "X", default_value = "commands")]
    pub exchange: String,
    /// Kafka bootstrap brokers, host:port[,host:port...].
    #[arg(long, value_name = "BROKERS")]
    pub kafka: Option<String>,
    /// Kafka topic (created with one partition if missing).
    #[arg(long, value_name = "T", default_value = "commands")]
    pub topic: String,
    /// Devices PREFIX00001 .. PREFIX<N>, as the fleet names them.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub devices: usize,
    #[arg(long, value_name = "PREFIX", default_value = "dev-")]
    pub id_prefix: String,
    /// Commands per device.
    #[arg(long, value_name = "K", default_value_t = 10)]
    pub count: u64,
    /// Every k-th command is a set_rate (0: never).
    #[arg(long, value_name = "K", default_value_t = sender::DEFAULT_SET_RATE_EVERY)]
    pub set_rate_every: u64,
    /// Every k-th command is a reboot (0: never).
    #[arg(long, value_name = "K", default_value_t = sender::DEFAULT_REBOOT_EVERY)]
    pub reboot_every: u64,
    /// The sampling interval a set_rate asks for, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = sender::DEFAULT_RATE_MS)]
    pub rate_ms: u64,
    /// Commands per second over all devices [default: as fast as confirms allow]
    #[arg(long, value_name = "PER_S")]
    pub rate: Option<f64>,
    /// Outstanding confirms (AMQP) / records per produce request (Kafka).
    #[arg(long, value_name = "N", default_value_t = sender::DEFAULT_WINDOW)]
    pub window: usize,
    /// Command topic; {id} is the device id. Commands go to <T>/<name>.
    #[arg(long, value_name = "T", default_value = "devices/{id}/commands")]
    pub command_topic: String,
    /// Reply topic the commands name (AMQP reply_to, Kafka mqtt_response_topic).
    #[arg(long, value_name = "T", default_value = "devices/{id}/replies")]
    pub reply_topic: String,
    /// Give up waiting for the broker's confirms after this long.
    #[arg(long, value_name = "S", default_value = "30s")]
    pub confirm_timeout: String,
    /// Write the command manifest (per device, the confirmed command ids in send order).
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `run` and `bench`. Unset flags fall back to `--config`, then to the defaults.
#[derive(Debug, Default, Args)]
pub struct RunArgs {
    /// Fleet file (TOML) with defaults for the flags below, e.g. config/fleet.toml.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// MQTT broker or gateway [default: 127.0.0.1:1883]
    #[arg(long, value_name = "HOST:PORT")]
    pub broker: Option<String>,
    /// MQTT protocol version [default: 3.1.1]
    #[arg(long, value_enum)]
    pub mqtt_version: Option<MqttVersion>,
    /// Number of devices [default: 10]
    #[arg(long, value_name = "N")]
    pub devices: Option<usize>,
    /// Device ids are PREFIX00001, PREFIX00002, ... [default: dev-]
    #[arg(long, value_name = "PREFIX")]
    pub id_prefix: Option<String>,
    /// Index of the first device: 51 runs PREFIX00051 onwards [default: 1]
    #[arg(long, value_name = "K")]
    pub first_device: Option<usize>,
    /// Readings per second per device; 0 = flat out [default: 1; bench: 0]
    #[arg(long, value_name = "MSGS_PER_S_PER_DEVICE")]
    pub rate: Option<f64>,
    /// Pad each payload to at least this many bytes (at most 4096) [default: no padding]
    #[arg(long, value_name = "BYTES")]
    pub payload_bytes: Option<usize>,
    /// QoS 0, 1 or 2 [default: 1]
    #[arg(long)]
    pub qos: Option<u8>,
    /// Stop sampling after this long ("30", "30s", "5min") [bench default: 10s]
    #[arg(long, value_name = "S")]
    pub duration: Option<String>,
    /// Stop after this many readings per device.
    #[arg(long, value_name = "N")]
    pub count_per_device: Option<u64>,
    /// Telemetry topic; {id} is the device id [default: devices/{id}/telemetry]
    #[arg(long)]
    pub topic: Option<String>,
    /// Last-will topic for the offline status [default: devices/{id}/status]
    #[arg(long)]
    pub status_topic: Option<String>,
    /// Seed of the readings' random walk and of the reconnect jitter [default: 1]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Use TLS, trusting this CA (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Use TLS with per-device certificates DIR/devices/ID.pem + ID.key (and DIR/ca.pem).
    #[arg(long, value_name = "DIR")]
    pub certs_dir: Option<PathBuf>,
    /// One client certificate (PEM) for every device (with --client-key).
    #[arg(long, value_name = "FILE", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    #[arg(long, value_name = "FILE", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// MQTT username; {id} is the device id.
    #[arg(long)]
    pub username: Option<String>,
    /// MQTT password.
    #[arg(long, env = "FIRMWARE_SIM_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Outbox slots per device, also the in-flight window (1..=16) [default: 16]
    #[arg(long, value_name = "N")]
    pub outbox: Option<usize>,
    /// When the outbox is full: block sampling or drop the oldest reading [default: block]
    #[arg(long, value_enum)]
    pub full_policy: Option<FullPolicy>,
    /// MQTT keep-alive [default: 30s]
    #[arg(long, value_name = "S")]
    pub keep_alive: Option<String>,
    /// New connections per second at start [default: 1000]
    #[arg(long, value_name = "PER_S")]
    pub connect_rate: Option<f64>,
    /// First reconnect delay (doubles, with jitter) [default: 100ms]
    #[arg(long, value_name = "S")]
    pub reconnect_min: Option<String>,
    /// Longest reconnect delay [default: 10s]
    #[arg(long, value_name = "S")]
    pub reconnect_max: Option<String>,
    /// After the duration (or Ctrl-C), wait this long for outstanding acks [default: 10s]
    #[arg(long, value_name = "S")]
    pub drain_timeout: Option<String>,
    /// Write the manifest (per device: acknowledged sequence numbers) to FILE.
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Progress on stderr [default: auto: a bar on a terminal, plain lines otherwise]
    #[arg(long, value_enum)]
    pub progress: Option<ProgressMode>,
    /// Take commands: subscribe to COMMAND_TOPIC/# (persistent session, QoS 1) and answer
    /// ping / set_rate / reboot; devices stay online until the run ends.
    #[arg(long)]
    pub commands: bool,
    /// Command topic; {id} is the device id [default: devices/{id}/commands]
    #[arg(long, value_name = "T")]
    pub command_topic: Option<String>,
    /// Reply topic for commands without an MQTT 5 response topic [default: devices/{id}/replies]
    #[arg(long, value_name = "T")]
    pub reply_topic: Option<String>,
    /// MQTT 5 session expiry of devices taking commands [default: 1h]
    #[arg(long, value_name = "S")]
    pub session_expiry: Option<String>,
    /// With --commands: a device finishes after taking N distinct commands (and its readings).
    #[arg(long, value_name = "N")]
    pub expect_commands: Option<u64>,
}

/// `fleet.toml`: the same settings as the flags, snake_case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetFile {
    pub broker: Option<String>,
    pub mqtt_version: Option<String>,
    pub devices: Option<usize>,
    pub id_prefix: Option<String>,
    pub first_device: Option<usize>,
    pub rate: Option<f64>,
    pub payload_bytes: Option<usize>,
    pub qos: Option<u8>,
    pub duration: Option<String>,
    pub count_per_device: Option<u64>,
    pub topic: Option<String>,
    pub status_topic: Option<String>,
    pub seed: Option<u64>,
    pub tls_ca: Option<PathBuf>,
    pub certs_dir: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub outbox: Option<usize>,
    pub full_policy: Option<FullPolicy>,
    pub keep_alive: Option<String>,
    pub connect_rate: Option<f64>,
    pub reconnect_min: Option<String>,
    pub reconnect_max: Option<String>,
    pub drain_timeout: Option<String>,
    pub manifest: Option<PathBuf>,
    pub commands: Option<bool>,
    pub command_topic: Option<String>,
    pub reply_topic: Option<String>,
    pub session_expiry: Option<String>,
    pub expect_commands: Option<u64>,
}

impl FleetFile {
    pub fn read(path: &Path) -> Result<FleetFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading fleet config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("fleet config {}", path.display()))
    }
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// AMQP URL of the upstream RabbitMQ, e.g. amqp://guest:guest@127.0.0.1:5672/%2f
    #[arg(long, value_name = "URL", conflicts_with = "kafka", requires = "queue")]
    pub amqp: Option<String>,
    /// Queue to consume (the gateway's uplink routes into it).
    #[arg(long, value_name = "Q")]
    pub queue: Option<String>,
    /// Kafka bootstrap brokers, host:port[,host:port...]; every partition is read from offset 0.
    #[arg(long, value_name = "BROKERS", requires = "topic")]
    pub kafka: Option<String>,
    /// Kafka topic to read (the gateway's Kafka uplink produces into it).
    #[arg(long, value_name = "T")]
    pub topic: Option<String>,
    /// The manifest written by `run --manifest` (telemetry).
    #[arg(long, value_name = "MANIFEST", required_unless_present = "commands")]
    pub expect: Option<PathBuf>,
    /// The manifest written by `command --manifest`: check that every confirmed command was
    /// answered, in order (replies reach the upstream through the gateway like telemetry).
    #[arg(long, visible_alias = "commands-manifest", value_name = "MANIFEST")]
    pub commands: Option<PathBuf>,
    /// Stop waiting for missing messages after this long ("60", "2min").
    #[arg(long, value_name = "S", default_value = "60s")]
    pub timeout: String,
    /// Keep consuming this long after all expected messages arrived (trailing duplicates).
    #[arg(long, value_name = "S", default_value = "0s")]
    pub settle: String,
    /// Fail when there are more duplicates than N (by default duplicates never fail).
    #[arg(long, value_name = "N")]
    pub max_duplicates: Option<u64>,
    /// AMQP prefetch window (not used with --kafka).
    #[arg(long, default_value_t = verify::DEFAULT_PREFETCH)]
    pub prefetch: u16,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// "30" (seconds), "1.5", or a humantime string ("30s", "500ms", "5min").
pub fn parse_duration(key: &str, s: &str) -> Result<Duration> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Ok(Duration::from_secs_f64(secs));
        }
        bail!("{key} = {s:?}: must be a non-negative number of seconds");
    }
    humantime::parse_duration(s).with_context(|| {
        format!("{key} = {s:?}: expected seconds or a duration like \"30s\", \"500ms\", \"5min\"")
    })
}

fn parse_version(s: &str) -> Result<MqttVersion> {
    match s {
        "3.1.1" | "3" | "4" => Ok(MqttVersion::V311),
        "5" | "5.0" => Ok(MqttVersion::V5),
        other => bail!("mqtt_version = {other:?}: expected \"3.1.1\" or \"5\""),
    }
}

/// Merges flags over the file over the defaults. `bench` changes two defaults: flat out, and
/// 10 s when neither a duration nor a count is given.
pub fn fleet_config(args: RunArgs, bench: bool) -> Result<(FleetConfig, bool)> {
    let file = match &args.config {
        Some(path) => FleetFile::read(path)?,
        None => FleetFile::default(),
    };
    let d = FleetConfig::default();
    let dur = |key: &str, flag: Option<String>, file: Option<String>| -> Result<Option<Duration>> {
        flag.or(file).map(|s| parse_duration(key, &s)).transpose()
    };
    let version = match (args.mqtt_version, file.mqtt_version) {
        (Some(v), _) => v,
        (None, Some(s)) => parse_version(&s)?,
        (None, None) => d.version,
    };
    let mut duration = dur("duration", args.duration, file.duration)?;
    let count_per_device = args.count_per_device.or(file.count_per_device);
    if bench && duration.is_none() && count_per_device.is_none() {
        duration = Some(Duration::from_secs(10));
    }
    let tls_ca = args.tls_ca.or(file.tls_ca);
    let certs_dir = args.certs_dir.or(file.certs_dir);
    let client_cert = match (
        args.client_cert.or(file.client_cert),
        args.client_key.or(file.client_key),
    ) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => bail!("client_cert and client_key go together"),
    };
    let tls =
        (tls_ca.is_some() || certs_dir.is_some() || client_cert.is_some()).then_some(TlsSettings {
            ca: tls_ca,
            certs_dir,
            client_cert,
        });
    let credentials = match (
        args.username.or(file.username),
        args.password.or(file.password),
    ) {
        (Some(u), p) => Some((u, p.unwrap_or_default())),
        (None, Some(_)) => bail!("a password needs a username (--username)"),
        (None, None) => None,
    };
    let cfg = FleetConfig {
        broker: args.broker.or(file.broker).unwrap_or(d.broker),
        version,
        devices: args.devices.or(file.devices).unwrap_or(d.devices),
        id_prefix: args.id_prefix.or(file.id_prefix).unwrap_or(d.id_prefix),
        first_device: args
            .first_device
            .or(file.first_device)
            .unwrap_or(d.first_device),
        rate: args
            .rate
            .or(file.rate)
            .unwrap_or(if bench { 0.0 } else { d.rate }),
        payload_bytes: args
            .payload_bytes
            .or(file.payload_bytes)
            .unwrap_or(d.payload_bytes),
        qos: args.qos.or(file.qos).unwrap_or(d.qos),
        duration,
        count_per_device,
        topic: args.topic.or(file.topic).unwrap_or(d.topic),
        status_topic: args
            .status_topic
            .or(file.status_topic)
            .unwrap_or(d.status_topic),
        seed: args.seed.or(file.seed).unwrap_or(d.seed),
        tls,
        credentials,
        outbox: args.outbox.or(file.outbox).unwrap_or(d.outbox),
        policy: args.full_policy.or(file.full_policy).unwrap_or(d.policy),
        keep_alive: dur("keep_alive", args.keep_alive, file.keep_alive)?.unwrap_or(d.keep_alive),
        connect_rate: args
            .connect_rate
            .or(file.connect_rate)
            .unwrap_or(d.connect_rate),
        backoff: BackoffConfig {
            min: dur("reconnect_min", args.reconnect_min, file.reconnect_min)?
                .unwrap_or(d.backoff.min),
            max: dur("reconnect_max", args.reconnect_max, file.reconnect_max)?
                .unwrap_or(d.backoff.max),
        },
        drain_timeout: dur("drain_timeout", args.drain_timeout, file.drain_timeout)?
            .unwrap_or(d.drain_timeout),
        manifest: args.manifest.or(file.manifest),
        progress: args.progress.unwrap_or(d.progress),
        commands: args.commands || file.commands.unwrap_or(d.commands),
        command_topic: args
            .command_topic
            .or(file.command_topic)
            .unwrap_or(d.command_topic),
        reply_topic: args
            .reply_topic
            .or(file.reply_topic)
            .unwrap_or(d.reply_topic),
        session_expiry: dur("session_expiry", args.session_expiry, file.session_expiry)?
            .unwrap_or(d.session_expiry),
        expect_commands: args.expect_commands.or(file.expect_commands),
    };
    Ok((cfg, args.json))
}

/// Resolves when the user asks to stop (Ctrl-C or SIGTERM). A second Ctrl-C exits at once.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    eprintln!("stopping: draining outstanding acknowledgements (Ctrl-C again to quit now)");
    tokio::spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            std::process::exit(130);
        }
    });
}

/// `run` and `bench`.
pub async fn run_command(args: RunArgs, bench: bool) -> Result<ExitCode> {
    let (cfg, json) = fleet_config(args, bench)?;
    let report: FleetReport = fleet::run(cfg, shutdown_signal()).await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else if bench {
        println!("{}", report.bench_line());
    } else {
        print!("{report}");
    }
    let outstanding = report.unsent + if report.qos == 0 { 0 } else { report.unacked };
    Ok(if bench || outstanding == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_PROBLEM)
    })
}

/// `command`.
pub async fn send_command(args: CommandArgs) -> Result<ExitCode> {
    let target = match (args.amqp, args.kafka) {
        (Some(url), None) => Target::Amqp {
            url,
            exchange: args.exchange,
        },
        (None, Some(brokers)) => Target::Kafka {
            brokers,
            topic: args.topic,
        },
        _ => bail!("command needs --amqp URL or --kafka BROKERS"),
    };
    let cfg = SendConfig {
        devices: args.devices,
        id_prefix: args.id_prefix,
        count: args.count,
        set_rate_every: args.set_rate_every,
        reboot_every: args.reboot_every,
        rate_ms: args.rate_ms,
        rate: args.rate,
        window: args.window,
        command_topic: args.command_topic,
        reply_topic: args.reply_topic,
        confirm_timeout: parse_duration("confirm-timeout", &args.confirm_timeout)?,
        manifest: args.manifest,
        ..SendConfig::new(target)
    };
    let report = sender::run(&cfg).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{report}");
    }
    Ok(if report.all_confirmed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_PROBLEM)
    })
}

/// `verify`.
pub async fn verify_command(args: VerifyArgs) -> Result<ExitCode> {
    let source = match (args.amqp, args.queue, args.kafka, args.topic) {
        (Some(url), Some(queue), None, _) => Source::Amqp { url, queue },
        (None, _, Some(brokers), Some(topic)) => Source::Kafka { brokers, topic },
        _ => bail!("verify needs --amqp URL --queue Q (or --kafka BROKERS --topic T)"),
    };
    let manifest = args.expect.as_deref().map(Manifest::read).transpose()?;
    let commands = args
        .commands
        .as_deref()
        .map(CommandManifest::read)
        .transpose()?;
    let opts = VerifyOptions {
        source,
        timeout: parse_duration("timeout", &args.timeout)?,
        settle: parse_duration("settle", &args.settle)?,
        max_duplicates: args.max_duplicates,
        prefetch: args.prefetch.max(1),
        progress: !args.json,
    };
    let report = verify::verify_all(&opts, manifest.as_ref(), commands.as_ref()).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{report}");
    }
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_PROBLEM)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Command {
        Cli::try_parse_from(std::iter::once("firmware-sim").chain(args.iter().copied()))
            .unwrap()
            .command
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("fleet.toml");
        std::fs::write(
            &file,
            "broker = \"gw:8883\"\ndevices = 100\nqos = 2\nduration = \"1min\"\n\
             mqtt_version = \"5\"\nfull_policy = \"drop-oldest\"\ncerts_dir = \"certs/dev\"\n",
        )
        .unwrap();
        let Command::Run(args) = parse(&[
            "run",
            "--config",
            file.to_str().unwrap(),
            "--devices",
            "7",
            "--rate",
            "2.5",
        ]) else {
            panic!("not run")
        };
        let (cfg, json) = fleet_config(args, false).unwrap();
        assert!(!json);
        assert_eq!(cfg.broker, "gw:8883");
        assert_eq!(cfg.devices, 7);
        assert_eq!(cfg.rate, 2.5);
        assert_eq!(cfg.qos, 2);
        assert_eq!(cfg.duration, Some(Duration::from_secs(60)));
        assert_eq!(cfg.version, MqttVersion::V5);
        assert_eq!(cfg.policy, FullPolicy::DropOldest);
        assert_eq!(
            cfg.tls.unwrap().certs_dir.unwrap(),
            PathBuf::from("certs/dev")
        );
    }

    #[test]
    fn the_shipped_fleet_toml_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/fleet.toml");
        let args = RunArgs {
            config: Some(path),
            ..Default::default()
        };
        let (cfg, _) = fleet_config(args, false).unwrap();
        assert_eq!(cfg.broker, "127.0.0.1:8883");
        assert_eq!(cfg.devices, 100);
        assert!(cfg.tls.is_some());
        assert_eq!(cfg.duration, Some(Duration::from_secs(60)));
    }

    #[test]
    fn bench_defaults_to_flat_out_for_ten_seconds() {
        let Command::Bench(args) = parse(&["bench", "--devices", "3"]) else {
            panic!("not bench")
        };
        let (cfg, _) = fleet_config(args, true).unwrap();
        assert_eq!(
            (cfg.rate, cfg.duration),
            (0.0, Some(Duration::from_secs(10)))
        );
        assert!(cfg.tls.is_none());
    }

    #[test]
    fn unknown_file_keys_and_bad_durations_are_errors_that_name_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("fleet.toml");
        std::fs::write(&file, "devics = 3\n").unwrap();
        let err = format!("{:#}", FleetFile::read(&file).unwrap_err());
        assert!(err.contains("devics"), "{err}");
        let err = format!("{:#}", parse_duration("duration", "soon").unwrap_err());
        assert!(err.contains("duration") && err.contains("soon"), "{err}");
        assert_eq!(
            parse_duration("d", "1.5").unwrap(),
            Duration::from_millis(1500)
        );
    }

    #[test]
    fn verify_needs_a_source_and_kafka_parses() {
        assert!(Cli::try_parse_from([
            "firmware-sim",
            "verify",
            "--expect",
            "m.json",
            "--amqp",
            "u"
        ])
        .is_err());
        let Command::Verify(v) = parse(&[
            "verify",
            "--kafka",
            "127.0.0.1:9092",
            "--topic",
            "t",
            "--expect",
            "m.json",
        ]) else {
            panic!("not verify")
        };
        assert_eq!(v.kafka.as_deref(), Some("127.0.0.1:9092"));
        // A command manifest alone is enough; neither manifest is not.
        let Command::Verify(v) = parse(&[
            "verify",
            "--amqp",
            "u",
            "--queue",
            "q",
            "--commands-manifest",
            "c.json",
        ]) else {
            panic!("not verify")
        };
        assert_eq!(v.commands, Some(PathBuf::from("c.json")));
        assert!(v.expect.is_none());
        assert!(
            Cli::try_parse_from(["firmware-sim", "verify", "--amqp", "u", "--queue", "q"]).is_err()
        );
    }

    #[test]
    fn command_needs_one_broker_and_run_takes_command_flags() {
        let Command::SendCommands(c) = parse(&[
            "command",
            "--amqp",
            "amqp://x",
            "--devices",
            "3",
            "--count",
            "7",
            "--reboot-every",
            "0",
        ]) else {
            panic!("not command")
        };
        assert_eq!((c.devices, c.count, c.reboot_every), (3, 7, 0));
        assert_eq!(c.exchange, "commands");
        assert!(Cli::try_parse_from(["firmware-sim", "command"]).is_err());
        assert!(
            Cli::try_parse_from(["firmware-sim", "command", "--amqp", "u", "--kafka", "h:1"])
                .is_err()
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("fleet.toml");
        std::fs::write(
            &file,
            "commands = true\nexpect_commands = 4\nsession_expiry = \"10min\"\n",
        )
        .unwrap();
        let Command::Run(args) = parse(&["run", "--config", file.to_str().unwrap()]) else {
            panic!("not run")
        };
        let (cfg, _) = fleet_config(args, false).unwrap();
        assert!(cfg.commands);
        assert_eq!(cfg.expect_commands, Some(4));
        assert_eq!(cfg.session_expiry, Duration::from_secs(600));
        assert_eq!(cfg.command_topic, "devices/{id}/commands");
    }
}
