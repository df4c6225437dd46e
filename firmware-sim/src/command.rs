//! Downlink commands: the wire format shared by the command sender (`firmware-sim command`), the
//! device state machine and the verifier. No I/O.
//!
//! ```text
//! command id    "{device}:{n}"        n = 0, 1, 2, ... per device, the order they were sent in
//! command       {"id":"dev-00001:7","n":7,"cmd":"set_rate","rate_ms":500}    (JSON)
//!               upstream: AMQP routing key devices.{device}.commands.{cmd} (message_id and
//!               correlation_id = id, reply_to = devices/{device}/replies), or a Kafka record
//!               keyed by the device id; the gateway delivers it on the MQTT topic
//!               devices/{device}/commands/{cmd}
//! reply         {"id":"dev-00001:7","cmd":"set_rate","n":7}                   (JSON)
//!               to the MQTT 5 response topic when the command carried one, else
//!               devices/{device}/replies; MQTT 5 correlation data echoed
//! ```
//!
//! The command name comes from the topic; a `cmd` in the payload, when present, must agree. The
//! id is in the payload (not only in MQTT 5 correlation data) so that MQTT 3.1.1 devices can
//! answer too.
//!
//! Parsing on the device borrows from the received bytes and encoding writes into a fixed
//! buffer, so a device allocates nothing per command.

use serde::{Deserialize, Serialize};

/// Longest command id a device accepts: a device id ([`crate::device::MAX_ID`]), `:` and a u64.
pub const MAX_COMMAND_ID: usize = crate::device::MAX_ID + 1 + 20;
/// Largest reply payload: `{"id":"<MAX_COMMAND_ID>","cmd":"set_rate","n":<u64>}` fits with room.
pub const REPLY_BYTES: usize = 160;
/// Smallest and largest `rate_ms` a `set_rate` may ask for (1 ms to 1 day).
pub const RATE_MS_RANGE: std::ops::RangeInclusive<u64> = 1..=86_400_000;

/// The built-in commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    /// Reply, nothing else.
    Ping,
    /// Change the sampling interval to `rate_ms`, then reply.
    SetRate,
    /// Reply, then disconnect and reconnect (the persistent session keeps pending commands).
    Reboot,
}

impl CommandKind {
    pub const ALL: [CommandKind; 3] =
        [CommandKind::Ping, CommandKind::SetRate, CommandKind::Reboot];

    /// The name in topics, routing keys and payloads.
    pub fn name(self) -> &'static str {
        match self {
            CommandKind::Ping => "ping",
            CommandKind::SetRate => "set_rate",
            CommandKind::Reboot => "reboot",
        }
    }

    pub fn from_name(name: &str) -> Option<CommandKind> {
        CommandKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// A command as a device reads it (borrowed from the received payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command<'a> {
    pub id: &'a str,
    pub n: u64,
    pub kind: CommandKind,
    /// `set_rate` only: the new sampling interval.
    pub rate_ms: Option<u64>,
}

/// Why a received command was not acted on (the device counts it as `commands_bad`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The topic's last level is not a built-in command.
    #[error("unknown command {0:?}")]
    Unknown(String),
    /// The payload is not a JSON object with a string `id` and a number `n`.
    #[error("command payload is not JSON with \"id\" and \"n\": {0}")]
    Payload(String),
    /// The payload's `cmd` names another command than the topic.
    #[error("payload cmd {payload:?} does not match the topic's {topic:?}")]
    Mismatch { topic: String, payload: String },
    /// The id is empty or longer than [`MAX_COMMAND_ID`].
    #[error("command id {0:?} is empty or longer than {MAX_COMMAND_ID} bytes")]
    Id(String),
    /// `set_rate` without `rate_ms`, or outside [`RATE_MS_RANGE`].
    #[error("set_rate needs rate_ms between 1 and 86400000, got {0:?}")]
    Rate(Option<u64>),
    /// A response topic or correlation data too long for the device's reply buffer.
    #[error("{0} does not fit the device's reply buffer")]
    TooLong(&'static str),
}

impl CommandError {
    /// A short label for counters and logs.
    pub fn as_label(&self) -> &'static str {
        match self {
            CommandError::Unknown(_) => "unknown",
            CommandError::Payload(_) => "payload",
            CommandError::Mismatch { .. } => "mismatch",
            CommandError::Id(_) => "id",
            CommandError::Rate(_) => "rate",
            CommandError::TooLong(_) => "too_long",
        }
    }
}

#[derive(Deserialize)]
struct WireCommand<'a> {
    #[serde(borrow)]
    id: &'a str,
    n: u64,
    #[serde(borrow, default)]
    cmd: Option<&'a str>,
    #[serde(default)]
    rate_ms: Option<u64>,
}

/// Parses a command received on topic level `name` (the last level of the command topic).
/// Never panics: anything unexpected is a [`CommandError`].
pub fn parse_command<'a>(name: &str, payload: &'a [u8]) -> Result<Command<'a>, CommandError> {
    let kind = CommandKind::from_name(name).ok_or_else(|| CommandError::Unknown(name.into()))?;
    // A borrowed &str cannot hold JSON escapes: such an id is refused, which no sender makes.
    let wire: WireCommand<'a> =
        serde_json::from_slice(payload).map_err(|e| CommandError::Payload(e.to_string()))?;
    if let Some(cmd) = wire.cmd {
        if cmd != name {
            return Err(CommandError::Mismatch {
                topic: name.into(),
                payload: cmd.into(),
            });
        }
    }
    if wire.id.is_empty() || wire.id.len() > MAX_COMMAND_ID {
        return Err(CommandError::Id(wire.id.into()));
    }
    let rate_ms = match kind {
        CommandKind::SetRate => match wire.rate_ms {
            Some(r) if RATE_MS_RANGE.contains(&r) => Some(r),
            other => return Err(CommandError::Rate(other)),
        },
        _ => None,
    };
    Ok(Command {
        id: wire.id,
        n: wire.n,
        kind,
        rate_ms,
    })
}

/// `dev-00001`, 7 -> `dev-00001:7`.
pub fn command_id(device: &str, n: u64) -> String {
    format!("{device}:{n}")
}

/// `dev-00001:7` -> (`dev-00001`, 7); `None` when it is not that shape.
pub fn split_command_id(id: &str) -> Option<(&str, u64)> {
    let (device, n) = id.rsplit_once(':')?;
    if device.is_empty() {
        return None;
    }
    Some((device, n.parse().ok()?))
}

#[derive(Serialize)]
struct WireOut<'a> {
    id: &'a str,
    n: u64,
    cmd: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    rate_ms: Option<u64>,
}

/// The JSON payload of command `n` for `device` (the sender's side).
pub fn encode_command(device: &str, n: u64, kind: CommandKind, rate_ms: Option<u64>) -> Vec<u8> {
    let id = command_id(device, n);
    let wire = WireOut {
        id: &id,
        n,
        cmd: kind.name(),
        rate_ms: if kind == CommandKind::SetRate {
            rate_ms
        } else {
            None
        },
    };
    // Serializing a struct of strings and integers cannot fail.
    serde_json::to_vec(&wire).unwrap_or_default()
}

/// A reply as the verifier reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub id: String,
    pub cmd: String,
    pub n: u64,
}

#[derive(Serialize)]
struct WireReply<'a> {
    id: &'a str,
    cmd: &'a str,
    n: u64,
}

/// `std::io::Write` into a fixed buffer: fails (rather than grows) when it is full.
struct FixedWriter<'a, const N: usize>(&'a mut heapless::Vec<u8, N>);

impl<const N: usize> std::io::Write for FixedWriter<'_, N> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .extend_from_slice(buf)
            .map_err(|_| std::io::Error::other("reply buffer full"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Encodes the reply to `cmd` into `out` (cleared first). Never allocates.
pub fn encode_reply<const N: usize>(
    cmd: &Command<'_>,
    out: &mut heapless::Vec<u8, N>,
) -> Result<(), CommandError> {
    out.clear();
    let wire = WireReply {
        id: cmd.id,
        cmd: cmd.kind.name(),
        n: cmd.n,
    };
    serde_json::to_writer(FixedWriter(out), &wire).map_err(|_| CommandError::TooLong("reply"))
}

/// Parses a reply (the verifier's side).
pub fn parse_reply(payload: &[u8]) -> Result<Reply, CommandError> {
    serde_json::from_slice(payload).map_err(|e| CommandError::Payload(e.to_string()))
}

/// Which command the sender issues as number `n` of a device: a reboot every `reboot_every`-th,
/// else a set_rate every `set_rate_every`-th, else a ping (0 = never). Deterministic, so a run
/// can be repeated.
pub fn planned_kind(n: u64, set_rate_every: u64, reboot_every: u64) -> CommandKind {
    let every = |k: u64| k > 0 && (n + 1).is_multiple_of(k);
    if every(reboot_every) {
        CommandKind::Reboot
    } else if every(set_rate_every) {
        CommandKind::SetRate
    } else {
        CommandKind::Ping
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_sent_command_parses_back_and_its_reply_round_trips() {
        let bytes = encode_command("dev-00001", 7, CommandKind::SetRate, Some(500));
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            r#"{"id":"dev-00001:7","n":7,"cmd":"set_rate","rate_ms":500}"#
        );
        let c = parse_command("set_rate", &bytes).unwrap();
        assert_eq!(
            c,
            Command {
                id: "dev-00001:7",
                n: 7,
                kind: CommandKind::SetRate,
                rate_ms: Some(500)
            }
        );
        let mut out = heapless::Vec::<u8, REPLY_BYTES>::new();
        encode_reply(&c, &mut out).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"id":"dev-00001:7","cmd":"set_rate","n":7}"#
        );
        assert_eq!(
            parse_reply(&out).unwrap(),
            Reply {
                id: "dev-00001:7".into(),
                cmd: "set_rate".into(),
                n: 7
            }
        );
        // Pings carry no rate, and a payload without cmd is fine.
        let ping = encode_command("d", 0, CommandKind::Ping, Some(500));
        assert!(!String::from_utf8(ping).unwrap().contains("rate_ms"));
        assert!(parse_command("ping", br#"{"id":"x:1","n":1}"#).is_ok());
    }

    #[test]
    fn bad_commands_are_errors_never_panics() {
        let cases: &[(&str, &[u8], &str)] = &[
            ("format_disk", br#"{"id":"a:1","n":1}"#, "unknown"),
            ("ping", b"hi", "payload"),
            ("ping", b"", "payload"),
            ("ping", b"\xff\xfe", "payload"),
            ("ping", br#"{"id":"a:1"}"#, "payload"),
            ("ping", br#"{"id":1,"n":1}"#, "payload"),
            ("ping", br#"{"id":"a:1","n":-1}"#, "payload"),
            ("ping", br#"[1,2]"#, "payload"),
            ("ping", br#"{"id":"a\"b","n":1}"#, "payload"),
            ("ping", br#"{"id":"a:1","n":1,"cmd":"reboot"}"#, "mismatch"),
            ("ping", br#"{"id":"","n":1}"#, "id"),
            ("set_rate", br#"{"id":"a:1","n":1}"#, "rate"),
            ("set_rate", br#"{"id":"a:1","n":1,"rate_ms":0}"#, "rate"),
            (
                "set_rate",
                br#"{"id":"a:1","n":1,"rate_ms":99999999999}"#,
                "rate",
            ),
        ];
        for (name, payload, label) in cases {
            let e = parse_command(name, payload).unwrap_err();
            assert_eq!(e.as_label(), *label, "{name} {payload:?}: {e}");
        }
        let long = format!(r#"{{"id":"{}","n":1}}"#, "x".repeat(MAX_COMMAND_ID + 1));
        assert_eq!(
            parse_command("ping", long.as_bytes())
                .unwrap_err()
                .as_label(),
            "id"
        );
        assert!(parse_reply(b"{\"device_id\":\"a\",\"seq\":1}").is_err());
        assert!(parse_reply(b"\x00").is_err());
    }

    #[test]
    fn a_reply_that_does_not_fit_is_an_error() {
        let c = Command {
            id: "dev-00001:12345",
            n: 12345,
            kind: CommandKind::Ping,
            rate_ms: None,
        };
        let mut small = heapless::Vec::<u8, 16>::new();
        assert_eq!(
            encode_reply(&c, &mut small).unwrap_err().as_label(),
            "too_long"
        );
        // The largest id fits the reply buffer.
        let id = format!("{}:{}", "d".repeat(crate::device::MAX_ID), u64::MAX);
        assert_eq!(id.len(), MAX_COMMAND_ID);
        let c = Command {
            id: &id,
            n: u64::MAX,
            kind: CommandKind::SetRate,
            rate_ms: None,
        };
        let mut out = heapless::Vec::<u8, REPLY_BYTES>::new();
        encode_reply(&c, &mut out).unwrap();
    }

    #[test]
    fn ids_split_and_the_plan_mixes_kinds() {
        assert_eq!(split_command_id("dev-00001:7"), Some(("dev-00001", 7)));
        assert_eq!(split_command_id("a:b:3"), Some(("a:b", 3)));
        for bad in ["", "x", ":3", "dev:", "dev:x", "dev:-1"] {
            assert_eq!(split_command_id(bad), None, "{bad}");
        }
        let kinds: Vec<_> = (0..20).map(|n| planned_kind(n, 10, 20)).collect();
        assert_eq!(kinds[9], CommandKind::SetRate);
        assert_eq!(kinds[19], CommandKind::Reboot);
        assert_eq!(
            kinds.iter().filter(|k| **k == CommandKind::Ping).count(),
            18
        );
        assert!((0..100).all(|n| planned_kind(n, 0, 0) == CommandKind::Ping));
    }
}
