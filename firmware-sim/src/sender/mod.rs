//! `firmware-sim command`: sends commands for the fleet's devices upstream (RabbitMQ or Kafka),
//! where the gateway's downlink picks them up, and records what the broker confirmed.
//!
//! ```text
//! plan: n = 0..count, for each device      (n-major, so every device gets its n-th command
//!   kind = planned_kind(n, ...)             before any gets its n+1-th)
//!     └─> amqp: one channel, publisher confirms, persistent + mandatory, a window of confirms
//!     └─> kafka: records keyed by device id, produced in order per partition (acks=all)
//!           └─> CommandManifest: per device, confirmed ids in send order (+ unconfirmed)
//! ```
//!
//! One ordered publishing channel (AMQP) or one partition per device (Kafka) keeps each device's
//! commands in order upstream. A command is confirmed only by a publisher confirm that is not a
//! return (AMQP) or a produce response (Kafka); everything else is unconfirmed, counted, and the
//! run exits non-zero.

mod amqp;
mod kafka;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::command::{self, CommandKind};
use crate::manifest::{
    CommandManifest, CommandRecord, CommandRunInfo, ManifestError, COMMANDS_KIND, VERSION,
};

/// Confirms outstanding at once (AMQP) or records per produce request (Kafka): enough to keep a
/// long link busy without buffering a whole run.
pub const DEFAULT_WINDOW: usize = 256;
/// Every 10th command is a set_rate.
pub const DEFAULT_SET_RATE_EVERY: u64 = 10;
/// Every 50th command is a reboot: rare, as in a fleet, but several per device in a long run.
pub const DEFAULT_REBOOT_EVERY: u64 = 50;
/// The rate a set_rate asks for: one reading a second, the fleet's default.
pub const DEFAULT_RATE_MS: u64 = 1000;
/// How long to wait for the broker's confirms after the last command.
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the commands go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An AMQP topic exchange (declared durable if missing); routing key = the MQTT topic with
    /// `/` as `.`.
    Amqp { url: String, exchange: String },
    /// A Kafka topic (created with one partition if missing); key = device id.
    Kafka { brokers: String, topic: String },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Amqp { exchange, .. } => write!(f, "amqp exchange {exchange}"),
            Target::Kafka { brokers, topic } => write!(f, "kafka {brokers} topic {topic}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SendConfig {
    pub target: Target,
    pub devices: usize,
    /// Device ids are `<id_prefix><5-digit index>` from 1, as the fleet names them.
    pub id_prefix: String,
    /// Commands per device.
    pub count: u64,
    /// Every k-th command is a set_rate (0: never).
    pub set_rate_every: u64,
    /// Every k-th command is a reboot (0: never); a reboot wins over a set_rate.
    pub reboot_every: u64,
    /// The interval a set_rate asks for.
    pub rate_ms: u64,
    /// Commands per second over all devices; `None`: as fast as the window allows.
    pub rate: Option<f64>,
    pub window: usize,
    /// Command topic (`{id}` = device id); a command goes to `<command_topic>/<name>`.
    pub command_topic: String,
    /// The reply topic the command names (AMQP `reply_to`, Kafka `mqtt_response_topic`).
    pub reply_topic: String,
    pub confirm_timeout: Duration,
    pub manifest: Option<PathBuf>,
}

impl SendConfig {
    pub fn new(target: Target) -> Self {
        SendConfig {
            target,
            devices: 10,
            id_prefix: "dev-".into(),
            count: 10,
            set_rate_every: DEFAULT_SET_RATE_EVERY,
            reboot_every: DEFAULT_REBOOT_EVERY,
            rate_ms: DEFAULT_RATE_MS,
            rate: None,
            window: DEFAULT_WINDOW,
            command_topic: "devices/{id}/commands".into(),
            reply_topic: "devices/{id}/replies".into(),
            confirm_timeout: DEFAULT_CONFIRM_TIMEOUT,
            manifest: None,
        }
    }

    fn validate(&self) -> Result<(), SendError> {
        let bad = |key: &'static str, value: String, reason: &str| {
            Err(SendError::Config {
                key,
                value,
                reason: reason.into(),
            })
        };
        if self.devices == 0 || self.devices > 99_999 {
            return bad("devices", self.devices.to_string(), "must be 1..=99999");
        }
        if self.id_prefix.len() + 5 > crate::device::MAX_ID {
            return bad(
                "id-prefix",
                self.id_prefix.clone(),
                "device ids must fit 32 bytes",
            );
        }
        if !command::RATE_MS_RANGE.contains(&self.rate_ms) {
            return bad("rate-ms", self.rate_ms.to_string(), "1..=86400000");
        }
        if let Some(r) = self.rate {
            if !(r.is_finite() && r > 0.0) {
                return bad("rate", r.to_string(), "commands per second, above 0");
            }
        }
        if self.window == 0 {
            return bad("window", "0".into(), "at least 1");
        }
        for (key, t) in [
            ("command-topic", &self.command_topic),
            ("reply-topic", &self.reply_topic),
        ] {
            if t.is_empty() || t.contains(['#', '+']) || t.ends_with('/') {
                return bad(
                    key,
                    t.clone(),
                    "a topic name without wildcards or trailing '/'",
                );
            }
        }
        Ok(())
    }

    /// Every command of the run, in send order.
    pub fn plan(&self) -> Vec<Planned> {
        let ids: Vec<String> = (1..=self.devices)
            .map(|i| format!("{}{i:05}", self.id_prefix))
            .collect();
        let mut out = Vec::with_capacity(ids.len() * self.count as usize);
        for n in 0..self.count {
            let kind = command::planned_kind(n, self.set_rate_every, self.reboot_every);
            for device in &ids {
                let topic = format!(
                    "{}/{}",
                    self.command_topic.replace("{id}", device),
                    kind.name()
                );
                out.push(Planned {
                    id: command::command_id(device, n),
                    device: device.clone(),
                    n,
                    kind,
                    payload: command::encode_command(device, n, kind, Some(self.rate_ms)),
                    topic,
                    reply_topic: self.reply_topic.replace("{id}", device),
                });
            }
        }
        out
    }
}

/// One command to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// `{device}:{n}`: AMQP message_id and correlation_id; Kafka message_id and correlation data.
    pub id: String,
    pub device: String,
    pub n: u64,
    pub kind: CommandKind,
    /// The JSON command.
    pub payload: Vec<u8>,
    /// The MQTT topic it is meant for: `devices/{device}/commands/{name}`.
    pub topic: String,
    pub reply_topic: String,
}

impl Planned {
    /// The AMQP routing key: the MQTT topic with `/` as `.` (the gateway maps it back).
    pub fn routing_key(&self) -> String {
        self.topic.replace('/', ".")
    }
}

/// What became of one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Confirmed,
    /// AMQP basic.nack.
    Nacked,
    /// AMQP basic.return (no queue bound for the routing key).
    Returned(String),
    /// The connection failed or the confirm timed out before an answer.
    Failed(String),
    /// Never sent (the run stopped at an earlier failure).
    Unsent,
}

/// Why a run could not start (or stopped).
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// A setting is out of range; names the flag.
    #[error("invalid setting {key} = {value}: {reason}")]
    Config {
        key: &'static str,
        value: String,
        reason: String,
    },
    /// An AMQP operation at setup failed (connect, channel, confirm.select, exchange.declare).
    #[error("AMQP {operation} ({target}): {error}")]
    Amqp {
        operation: &'static str,
        target: String,
        error: lapin::Error,
    },
    /// `--kafka` is not a list of host:port.
    #[error("--kafka {0:?}: expected bootstrap brokers as host:port[,host:port...]")]
    KafkaBrokers(String),
    /// A Kafka operation at setup failed (connect, metadata, create topic, open partition).
    #[error("Kafka {operation} ({target}): {error}")]
    Kafka {
        operation: &'static str,
        target: String,
        error: Box<rskafka::client::error::Error>,
    },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

/// The end-of-run summary.
#[derive(Debug, Clone, Serialize)]
pub struct SendReport {
    pub target: String,
    pub devices: usize,
    pub planned: u64,
    pub sent: u64,
    pub confirmed: u64,
    pub nacked: u64,
    pub returned: u64,
    pub failed: u64,
    pub unsent: u64,
    /// Confirmed, by kind.
    pub ping: u64,
    pub set_rate: u64,
    pub reboot: u64,
    pub elapsed_s: f64,
    /// Confirmed commands per second.
    pub confirmed_per_s: f64,
    /// The first failure, if any (nack, return, lost connection).
    pub first_error: Option<String>,
    #[serde(skip)]
    pub manifest: CommandManifest,
}

impl SendReport {
    /// Every planned command was confirmed.
    pub fn all_confirmed(&self) -> bool {
        self.confirmed == self.planned
    }
}

impl std::fmt::Display for SendReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "target      {}", self.target)?;
        writeln!(
            f,
            "commands    {} for {} devices: sent {}, confirmed {} (ping {}, set_rate {}, reboot {})",
            self.planned,
            self.devices,
            self.sent,
            self.confirmed,
            self.ping,
            self.set_rate,
            self.reboot
        )?;
        writeln!(
            f,
            "failed      nacked {}, returned {}, failed {}, unsent {}",
            self.nacked, self.returned, self.failed, self.unsent
        )?;
        writeln!(
            f,
            "rate        {:.1} confirmed/s  ({:.2} s)",
            self.confirmed_per_s, self.elapsed_s
        )?;
        if let Some(e) = &self.first_error {
            writeln!(f, "first error {e}")?;
        }
        Ok(())
    }
}

/// Paces sends to `rate` per second (none: no pacing).
pub(crate) struct Pace {
    started: Instant,
    rate: Option<f64>,
    sent: u64,
}

impl Pace {
    fn new(rate: Option<f64>) -> Self {
        Pace {
            started: Instant::now(),
            rate,
            sent: 0,
        }
    }

    /// Waits until the next send is due.
    pub(crate) async fn next(&mut self) {
        if let Some(rate) = self.rate {
            let due = self.started + Duration::from_secs_f64(self.sent as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        self.sent += 1;
    }
}

/// Sends every planned command and writes the manifest (if asked for). `Ok` with
/// unconfirmed commands means the run worked and the broker refused some (or the connection
/// failed mid-run); `Err` means it could not start.
pub async fn run(cfg: &SendConfig) -> Result<SendReport, SendError> {
    cfg.validate()?;
    let plan = cfg.plan();
    let started = Instant::now();
    let started_ms = crate::verify::now_us() / 1000;
    let mut pace = Pace::new(cfg.rate);
    let outcomes = match &cfg.target {
        Target::Amqp { url, exchange } => {
            amqp::send(
                url,
                exchange,
                cfg,
                &plan,
                &mut pace,
                &cfg.target.to_string(),
            )
            .await?
        }
        Target::Kafka { brokers, topic } => {
            kafka::send(
                brokers,
                topic,
                cfg,
                &plan,
                &mut pace,
                &cfg.target.to_string(),
            )
            .await?
        }
    };
    let report = summarize(cfg, &plan, &outcomes, started, started_ms);
    if let Some(path) = &cfg.manifest {
        report.manifest.write(path)?;
    }
    Ok(report)
}

fn summarize(
    cfg: &SendConfig,
    plan: &[Planned],
    outcomes: &[Outcome],
    started: Instant,
    started_ms: u64,
) -> SendReport {
    let mut devices: BTreeMap<String, CommandRecord> = BTreeMap::new();
    let mut r = SendReport {
        target: cfg.target.to_string(),
        devices: cfg.devices,
        planned: plan.len() as u64,
        sent: 0,
        confirmed: 0,
        nacked: 0,
        returned: 0,
        failed: 0,
        unsent: 0,
        ping: 0,
        set_rate: 0,
        reboot: 0,
        elapsed_s: started.elapsed().as_secs_f64(),
        confirmed_per_s: 0.0,
        first_error: None,
        manifest: CommandManifest {
            version: VERSION,
            kind: COMMANDS_KIND.into(),
            run: CommandRunInfo {
                started_ms,
                devices: cfg.devices,
                count: cfg.count,
                target: cfg.target.to_string(),
            },
            devices: BTreeMap::new(),
        },
    };
    for (p, o) in plan.iter().zip(outcomes) {
        let rec = devices.entry(p.device.clone()).or_default();
        if *o != Outcome::Unsent {
            r.sent += 1;
        }
        let mut error = |e: String| {
            if r.first_error.is_none() {
                r.first_error = Some(format!("{}: {e}", p.id));
            }
        };
        match o {
            Outcome::Confirmed => {
                rec.confirmed.push(p.id.clone());
                r.confirmed += 1;
                match p.kind {
                    CommandKind::Ping => r.ping += 1,
                    CommandKind::SetRate => r.set_rate += 1,
                    CommandKind::Reboot => r.reboot += 1,
                }
                continue;
            }
            Outcome::Nacked => {
                error("nacked by the broker".into());
                r.nacked += 1;
            }
            Outcome::Returned(why) => {
                error(format!("returned: {why}"));
                r.returned += 1;
            }
            Outcome::Failed(why) => {
                error(why.clone());
                r.failed += 1;
            }
            Outcome::Unsent => {
                r.unsent += 1;
                continue;
            }
        }
        rec.unconfirmed.push(p.id.clone());
    }
    r.confirmed_per_s = if r.elapsed_s > 0.0 {
        r.confirmed as f64 / r.elapsed_s
    } else {
        0.0
    };
    r.manifest.devices = devices;
    r
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cfg() -> SendConfig {
        let mut c = SendConfig::new(Target::Amqp {
            url: "amqp://x".into(),
            exchange: "commands".into(),
        });
        c.devices = 2;
        c.count = 3;
        c.set_rate_every = 2;
        c.reboot_every = 3;
        c.rate_ms = 500;
        c
    }

    #[test]
    fn the_plan_is_n_major_with_topics_routing_keys_and_payloads() {
        let plan = cfg().plan();
        let ids: Vec<&str> = plan.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "dev-00001:0",
                "dev-00002:0",
                "dev-00001:1",
                "dev-00002:1",
                "dev-00001:2",
                "dev-00002:2"
            ]
        );
        let p = &plan[2];
        assert_eq!(p.kind, CommandKind::SetRate);
        assert_eq!(p.topic, "devices/dev-00001/commands/set_rate");
        assert_eq!(p.routing_key(), "devices.dev-00001.commands.set_rate");
        assert_eq!(p.reply_topic, "devices/dev-00001/replies");
        assert_eq!(
            std::str::from_utf8(&p.payload).unwrap(),
            r#"{"id":"dev-00001:1","n":1,"cmd":"set_rate","rate_ms":500}"#
        );
        assert_eq!(plan[4].kind, CommandKind::Reboot);
    }

    #[test]
    fn the_manifest_keeps_send_order_and_separates_the_unconfirmed() {
        let c = cfg();
        let plan = c.plan();
        let outcomes = [
            Outcome::Confirmed,
            Outcome::Confirmed,
            Outcome::Returned("NO_ROUTE".into()),
            Outcome::Confirmed,
            Outcome::Confirmed,
            Outcome::Unsent,
        ];
        let r = summarize(&c, &plan, &outcomes, Instant::now(), 0);
        assert!(!r.all_confirmed());
        assert_eq!(
            (r.planned, r.sent, r.confirmed, r.returned, r.unsent),
            (6, 5, 4, 1, 1)
        );
        assert_eq!((r.ping, r.set_rate, r.reboot), (2, 1, 1));
        let d1 = &r.manifest.devices["dev-00001"];
        assert_eq!(d1.confirmed, ["dev-00001:0", "dev-00001:2"]);
        assert_eq!(d1.unconfirmed, ["dev-00001:1"]);
        assert_eq!(
            r.manifest.devices["dev-00002"].confirmed,
            ["dev-00002:0", "dev-00002:1"]
        );
        assert!(r
            .first_error
            .as_deref()
            .unwrap()
            .contains("dev-00001:1: returned: NO_ROUTE"));
        assert!(r.to_string().contains("returned 1"));
    }

    #[test]
    fn bad_settings_name_the_flag() {
        let mut c = cfg();
        c.rate_ms = 0;
        assert!(c.validate().unwrap_err().to_string().contains("rate-ms"));
        let mut c = cfg();
        c.command_topic = "devices/{id}/commands/#".into();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("command-topic"));
        let mut c = cfg();
        c.rate = Some(0.0);
        assert!(c.validate().unwrap_err().to_string().contains("rate"));
    }
}
