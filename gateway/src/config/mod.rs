//! The operator's TOML configuration: parsing, defaults and validation.
//!
//! Loading happens in two steps. First serde parses the text into [`Config`]. Syntax errors,
//! unknown keys, wrong types and unreadable sizes or durations stop the parse there, and come
//! back as [`ConfigError::Parse`] with the line and key that the `toml` crate reports. Then
//! [`Config::validate`] checks the rules that span values or ranges. It collects every
//! [`Problem`], not just the first, so that an operator can fix the whole file in one pass.
//!
//! Every key has a default, so an empty file is a valid config. `config/gateway.toml` spells the
//! defaults out with comments. It is embedded as [`DEFAULT_CONFIG`], and a test checks that it
//! matches [`Config::default`].
//!
//! Value formats:
//! - Byte sizes are a whole number of bytes (`1048576`) or a string with a case-insensitive unit:
//!   `"512 MiB"`, `"16MiB"`, `"10 MB"`. `KiB`/`MiB`/`GiB`/`TiB` are powers of 1024,
//!   `KB`/`MB`/`GB`/`TB` are powers of 1000, and `B` or no unit means bytes.
//! - Durations are strings parsed by `humantime`: `"500ms"`, `"10s"`, `"7days"`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::queue::{self, FsyncPolicy, QueueOptions};

mod admin;
mod downlink;
mod ingest;
mod sessions;
mod uplink;
pub use admin::*;
pub use downlink::*;
pub use ingest::*;
pub use sessions::*;
pub use uplink::*;

/// The commented default configuration, as printed by `gateway print-default-config`.
pub const DEFAULT_CONFIG: &str = include_str!("../../../config/gateway.toml");

/// Default for `queue.data_dir`. It is relative so that a first run works from any directory
/// without root. Packaged installs set an absolute path such as `/var/lib/gateway`.
pub const DEFAULT_DATA_DIR: &str = "./data";
/// Default for `queue.max_bytes`: 1 GiB. That rides out about an hour of uplink outage at 1,000
/// messages/s of ~300 bytes, yet stays a small share of the 8-32 GB SD card or eMMC that a
/// Pi-class box has.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
/// Default for `queue.max_age`: no age limit. Data that was accepted is only ever dropped
/// because of `full_policy`, never because an outage lasted long.
pub const DEFAULT_MAX_AGE: Option<Duration> = None;
/// Default for `queue.segment_bytes`: 16 MiB. The default `max_bytes` then holds 64 segments,
/// so space is freed in steps of 1/64 of the limit. A file this size is also cheap to create,
/// scan on recovery and delete.
pub const DEFAULT_SEGMENT_BYTES: u64 = 16 << 20;
/// Default for `queue.fsync`: `always`, because PUBACK must mean durable even across a power
/// cut, which is the gateway's central promise. Group commit keeps this to one fdatasync per
/// batch rather than one per message.
pub const DEFAULT_FSYNC: FsyncMode = FsyncMode::Always;
/// Default for `queue.fsync_interval`, used only with `fsync = "interval"`: 100 ms. A power cut
/// then loses at most a tenth of a second of acknowledged messages. Ten syncs a second are
/// cheap even on SD cards.
pub const DEFAULT_FSYNC_INTERVAL: Duration = Duration::from_millis(100);
/// Default for `queue.full_policy`: `backpressure`. It never throws away a message that was
/// acknowledged. Devices hold their data instead, and operators choose data loss explicitly
/// with `drop-oldest`.
pub const DEFAULT_FULL_POLICY: FullPolicy = FullPolicy::Backpressure;
/// Default for `queue.preallocate`: off. Pre-writing each segment with zeros spares the file
/// system a journal commit per fdatasync (a little latency, see the README's figures), but the
/// disk then writes every segment twice: on the SD cards and eMMC of edge boxes that halves the
/// card's life for a gain the devices do not notice.
pub const DEFAULT_PREALLOCATE: bool = false;

/// The smallest allowed `queue.segment_bytes`. Below this the writer would start a new file
/// (create, fsync the file and its directory) every few records.
pub const MIN_SEGMENT_BYTES: u64 = 64 << 10;
/// The largest allowed `queue.segment_bytes`. Space is freed one whole segment at a time, so
/// bigger segments make `max_bytes` a coarse limit and make each recovery scan long.
pub const MAX_SEGMENT_BYTES: u64 = 1 << 30;
/// The shortest allowed `queue.fsync_interval`. Anything shorter is `fsync = "always"` with
/// extra timer wake-ups.
pub const MIN_FSYNC_INTERVAL: Duration = Duration::from_millis(1);
/// The longest allowed `queue.fsync_interval`. Beyond this a power cut loses minutes of
/// acknowledged messages, which nobody should choose without noticing.
pub const MAX_FSYNC_INTERVAL: Duration = Duration::from_secs(60);
/// The shortest allowed `queue.max_age`. A shorter age would expire records before an uplink
/// could deliver them. It is most likely a typo, such as "500ms" written for "500s".
pub const MIN_MAX_AGE: Duration = Duration::from_secs(1);

/// The whole gateway configuration: the root of the TOML file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[queue]`: the on-disk store-and-forward queue.
    pub queue: QueueConfig,
    /// `[[listeners]]`: where devices connect. Default: TLS on 0.0.0.0:8883 with the development
    /// certificates.
    pub listeners: Vec<ListenerConfig>,
    /// `[auth]`: who may connect.
    pub auth: AuthConfig,
    /// `[[acl]]`: what each identity may publish to. Default: `devices/%c/#` for everyone.
    pub acl: Vec<AclRule>,
    /// `[limits]`: per-connection and global bounds.
    pub limits: LimitsConfig,
    /// `[sessions]`: subscriber sessions' bounds and expiry.
    pub sessions: SessionsConfig,
    /// `[gateway]`: identity towards the upstream.
    pub gateway: GatewayConfig,
    /// `[[uplinks]]`: where records are forwarded. None: records stay in the queue.
    pub uplinks: Vec<UplinkConfig>,
    /// `[[routes]]`: which records go to which uplinks.
    pub routes: Vec<RouteConfig>,
    /// `[admin]`: metrics, health, the status page and reload.
    pub admin: AdminConfig,
    /// `[downlink]`: the store that holds commands until devices acknowledge them.
    pub downlink: DownlinkStoreConfig,
    /// `[[downlinks]]`: where commands for devices come from. None: nothing flows down.
    pub downlinks: Vec<DownlinkConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            queue: QueueConfig::default(),
            listeners: vec![ListenerConfig::default()],
            auth: AuthConfig::default(),
            acl: default_acl(),
            limits: LimitsConfig::default(),
            sessions: SessionsConfig::default(),
            gateway: GatewayConfig::default(),
            uplinks: Vec::new(),
            routes: Vec::new(),
            admin: AdminConfig::default(),
            downlink: DownlinkStoreConfig::default(),
            downlinks: Vec::new(),
        }
    }
}

/// The `[queue]` section. Each field defaults to the matching `DEFAULT_*` constant.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// The directory for segments, cursors and quarantine. A relative path is resolved against
    /// the process's working directory when [`QueueConfig::to_options`] is called, not against
    /// the location of the config file.
    pub data_dir: PathBuf,
    /// The bound on the queue's disk use, in bytes.
    #[serde(deserialize_with = "de::byte_size")]
    pub max_bytes: u64,
    /// Records older than this are deleted and counted as dropped. `None` means no age limit.
    #[serde(deserialize_with = "de::optional_duration")]
    pub max_age: Option<Duration>,
    /// The size at which a segment file is sealed and a new one started, in bytes.
    #[serde(deserialize_with = "de::byte_size")]
    pub segment_bytes: u64,
    /// When an append counts as durable. This decides when the device gets its PUBACK.
    pub fsync: FsyncMode,
    /// The sync period for `fsync = "interval"`. It is ignored with `always`, but validated
    /// anyway so that a bad value does not go unnoticed until someone switches modes.
    #[serde(deserialize_with = "de::duration")]
    pub fsync_interval: Duration,
    /// What an append does when the queue already holds `max_bytes`.
    pub full_policy: FullPolicy,
    /// Pre-write segments with zeros before use (lower sync latency, twice the bytes written).
    pub preallocate: bool,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            max_bytes: DEFAULT_MAX_BYTES,
            max_age: DEFAULT_MAX_AGE,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            fsync: DEFAULT_FSYNC,
            fsync_interval: DEFAULT_FSYNC_INTERVAL,
            full_policy: DEFAULT_FULL_POLICY,
            preallocate: DEFAULT_PREALLOCATE,
        }
    }
}

/// `queue.fsync`: `"always"` or `"interval"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FsyncMode {
    /// Sync before acknowledging. This survives a process crash and a power cut.
    Always,
    /// Acknowledge once the write reaches the OS, and sync every `fsync_interval`. This
    /// survives a process crash, but not a power cut or kernel crash.
    Interval,
}

/// `queue.full_policy`: `"backpressure"` or `"drop-oldest"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FullPolicy {
    /// Stop accepting until uplinks free space. Nothing stored is lost.
    Backpressure,
    /// Delete the oldest segment to make room, and count what was lost.
    DropOldest,
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read. It is missing, unreadable, or not UTF-8.
    #[error("{}", read_message(.path, .source))]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid TOML, or has an unknown key, a value of the wrong type, or a size,
    /// duration or choice that does not parse. Parsing stops at the first such error.
    /// `message` is the `toml` crate's: line, column, the offending line and what was expected.
    /// `path` is `None` when parsing a string rather than a file.
    #[error("{}", parse_message(.path.as_deref(), .message))]
    Parse {
        path: Option<PathBuf>,
        message: String,
    },
    /// The file parsed, but values break the rules (ranges, or relations between keys). Holds
    /// every problem found, never an empty list.
    #[error("{}", invalid_message(.problems))]
    Invalid { problems: Vec<Problem> },
}

fn read_message(path: &Path, source: &std::io::Error) -> String {
    // The io::Error is the `source()`, so the message does not repeat its text.
    let path = path.display();
    if source.kind() == std::io::ErrorKind::NotFound {
        format!(
            "config file {path} not found; to start from the defaults, run \
             `gateway print-default-config > {path}`"
        )
    } else {
        format!("cannot read config file {path}")
    }
}

fn parse_message(path: Option<&Path>, message: &str) -> String {
    match path {
        Some(path) => format!("cannot parse config file {}:\n{message}", path.display()),
        None => format!("cannot parse config:\n{message}"),
    }
}

fn invalid_message(problems: &[Problem]) -> String {
    match problems {
        [one] => format!("invalid config: {one}"),
        _ => {
            let mut out = format!("invalid config ({} problems):", problems.len());
            for problem in problems {
                out.push_str("\n  ");
                out.push_str(&problem.to_string());
            }
            out
        }
    }
}

/// One rule that a parsed config breaks. Its display looks like this:
/// `queue.max_bytes = "1 MiB": smaller than two segments (2 x 16 MiB); raise max_bytes or lower segment_bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The dotted key path, for example `queue.max_bytes`.
    pub key: String,
    /// The value as TOML would write it, quotes included, for example `"1 MiB"`. Sizes and
    /// durations are shown normalized, which may differ from the text in the file.
    pub value: String,
    /// What is wrong, and then, after a `;`, what to do about it.
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {}: {}", self.key, self.value, self.reason)
    }
}

impl Config {
    /// Parses and validates a config from TOML text. Missing keys take their defaults.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        Self::parse(text, None)
    }

    /// Reads, parses and validates the config file at `path`. Errors name the file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, Some(path))
    }

    /// Checks the rules that serde cannot express. Returns every problem found.
    /// [`Config::from_toml_str`] and [`Config::load`] already call this. Call it yourself on a
    /// config built in code.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        self.queue.check(&mut problems);
        ingest::check_listeners(&self.listeners, &mut problems);
        ingest::check_limits(&self.limits, &mut problems);
        ingest::check_acl(&self.acl, &mut problems);
        ingest::check_auth(&self.auth, &mut problems);
        self.sessions.check(&mut problems);
        uplink::check(&self.uplinks, &self.routes, &mut problems);
        self.admin.check(&mut problems);
        self.gateway.check(&mut problems);
        downlink::check(&self.downlinks, &mut problems);
        if self.downlink.max_bytes < 1 << 20 {
            problems.push(Problem {
                key: "downlink.max_bytes".into(),
                value: self.downlink.max_bytes.to_string(),
                reason: "use at least 1 MiB".into(),
            });
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid { problems })
        }
    }

    /// Checks the files the config names (TLS certificates and keys, the password file, the
    /// admin token's file or environment variable): each must be readable. Separate from
    /// [`Config::validate`] so that a config can be checked on another machine; `gateway
    /// check-config` and `run` call both. The default config's development certificates may be
    /// missing (the gateway makes them).
    pub fn check_files(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut readable = |key: String, path: &Path| {
            if let Err(e) = std::fs::File::open(path) {
                problems.push(Problem {
                    key,
                    value: quoted(&path.display().to_string()),
                    reason: format!("cannot read it ({e}); check the path and that the gateway's user may read it"),
                });
            }
        };
        for (i, l) in self.listeners.iter().enumerate() {
            let TlsSetting::On(t) = &l.tls else { continue };
            if t.is_dev_default() && !t.cert.exists() && !t.key.exists() {
                continue;
            }
            readable(format!("listeners[{i}].tls.cert"), &t.cert);
            readable(format!("listeners[{i}].tls.key"), &t.key);
            for (j, crl) in t.crl_file.paths().into_iter().enumerate() {
                readable(format!("listeners[{i}].tls.crl_file[{j}]"), crl);
            }
            if let Some(ca) = &t.client_ca {
                readable(format!("listeners[{i}].tls.client_ca"), ca);
            }
        }
        if let Some(p) = &self.auth.password_file {
            readable("auth.password_file".into(), p);
        }
        if self.admin.enabled {
            if let Err(p) = self.admin.token() {
                problems.push(p);
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid { problems })
        }
    }

    fn parse(text: &str, path: Option<&Path>) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|err| ConfigError::Parse {
            path: path.map(Path::to_path_buf),
            message: err.to_string().trim_end().to_owned(),
        })?;
        config.validate()?;
        Ok(config)
    }
}

impl QueueConfig {
    /// Maps this section onto the queue's own options. A relative `data_dir` is made absolute
    /// against the current working directory, so call this at startup, before anything changes
    /// directory. If the working directory cannot be read, the path is passed through as
    /// written.
    pub fn to_options(&self) -> QueueOptions {
        QueueOptions {
            data_dir: std::path::absolute(&self.data_dir).unwrap_or_else(|_| self.data_dir.clone()),
            max_bytes: self.max_bytes,
            max_age: self.max_age,
            segment_bytes: self.segment_bytes,
            fsync: match self.fsync {
                FsyncMode::Always => FsyncPolicy::Always,
                FsyncMode::Interval => FsyncPolicy::Interval(self.fsync_interval),
            },
            full_policy: match self.full_policy {
                FullPolicy::Backpressure => queue::FullPolicy::Backpressure,
                FullPolicy::DropOldest => queue::FullPolicy::DropOldest,
            },
            preallocate: self.preallocate,
        }
    }

    fn check(&self, problems: &mut Vec<Problem>) {
        let mut problem = |key: &str, value: String, reason: String| {
            problems.push(Problem {
                key: format!("queue.{key}"),
                value,
                reason,
            });
        };

        if self.data_dir.as_os_str().is_empty() {
            problem(
                "data_dir",
                quoted(""),
                "empty path; set data_dir to the directory for queue files, \
                 e.g. \"/var/lib/gateway\""
                    .to_owned(),
            );
        }

        let segment_ok = if self.segment_bytes < MIN_SEGMENT_BYTES {
            problem(
                "segment_bytes",
                size_value(self.segment_bytes),
                format!(
                    "smaller than {min}, which would start a new file every few records; \
                     raise segment_bytes to at least \"{min}\"",
                    min = format_size(MIN_SEGMENT_BYTES),
                ),
            );
            false
        } else if self.segment_bytes > MAX_SEGMENT_BYTES {
            problem(
                "segment_bytes",
                size_value(self.segment_bytes),
                format!(
                    "larger than {max}, which makes space free up in huge steps; \
                     lower segment_bytes to at most \"{max}\"",
                    max = format_size(MAX_SEGMENT_BYTES),
                ),
            );
            false
        } else {
            true
        };

        // With a bad segment size the relation check would only repeat that problem.
        if segment_ok && self.max_bytes < self.segment_bytes.saturating_mul(2) {
            problem(
                "max_bytes",
                size_value(self.max_bytes),
                format!(
                    "smaller than two segments (2 x {}); raise max_bytes or lower segment_bytes",
                    format_size(self.segment_bytes),
                ),
            );
        }

        if let Some(max_age) = self.max_age {
            if max_age < MIN_MAX_AGE {
                problem(
                    "max_age",
                    duration_value(max_age),
                    format!(
                        "shorter than {min}, so records would expire before an uplink could \
                         deliver them; raise max_age to at least \"{min}\", or remove the key \
                         for no age limit",
                        min = humantime::format_duration(MIN_MAX_AGE),
                    ),
                );
            }
        }

        if self.fsync_interval < MIN_FSYNC_INTERVAL {
            problem(
                "fsync_interval",
                duration_value(self.fsync_interval),
                format!(
                    "shorter than {min}; raise fsync_interval to at least \"{min}\", or use \
                     fsync = \"always\" to sync before every acknowledgement",
                    min = humantime::format_duration(MIN_FSYNC_INTERVAL),
                ),
            );
        } else if self.fsync_interval > MAX_FSYNC_INTERVAL {
            problem(
                "fsync_interval",
                duration_value(self.fsync_interval),
                format!(
                    "longer than {max}, so a power cut could lose minutes of acknowledged \
                     messages; lower fsync_interval to at most \"{max}\"",
                    max = humantime::format_duration(MAX_FSYNC_INTERVAL),
                ),
            );
        }
    }
}

/// `s` as a TOML string literal, quotes included.
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn size_value(bytes: u64) -> String {
    quoted(&format_size(bytes))
}

fn duration_value(duration: Duration) -> String {
    quoted(&humantime::format_duration(duration).to_string())
}

/// What units the byte-size parser accepts, for error messages.
const SIZE_UNITS_HELP: &str =
    "use B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)";

/// Parses a byte size: `"1000000"`, `"512 MiB"`, `"16MiB"`, `"10 MB"`. The number must be
/// whole, the unit is case-insensitive, and spaces around either are allowed. The error says
/// what was wrong and what is accepted.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    // Invariant: `find` returns the byte index of a char, so the split is on a char boundary.
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let unit = unit.trim_start();

    if digits.is_empty() {
        return Err(format!(
            "{text:?} is not a byte size; write a whole number of bytes, or a number and a \
             unit such as \"512 MiB\""
        ));
    }
    if unit.starts_with(['.', ',']) {
        return Err(format!(
            "{text:?} is not a whole number; write a smaller unit instead, e.g. \"1536 MiB\" \
             rather than \"1.5 GiB\""
        ));
    }
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {text:?}; {SIZE_UNITS_HELP}"
            ))
        }
    };
    // `digits` is non-empty ASCII digits, so parsing fails only on overflow.
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| format!("{text:?} is too large for a byte size"))
}

/// Formats a byte size in the largest unit that divides it exactly, so the result parses back
/// to the same number. For example 16777216 becomes "16 MiB", 10000000 becomes "10 MB", and
/// 1500 becomes "1500 B".
fn format_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 8] = [
        (1 << 40, "TiB"),
        (1_000_000_000_000, "TB"),
        (1 << 30, "GiB"),
        (1_000_000_000, "GB"),
        (1 << 20, "MiB"),
        (1_000_000, "MB"),
        (1 << 10, "KiB"),
        (1_000, "KB"),
    ];
    if bytes != 0 {
        for (unit, name) in UNITS {
            if bytes.is_multiple_of(unit) {
                return format!("{} {name}", bytes / unit);
            }
        }
    }
    format!("{bytes} B")
}

/// serde `deserialize_with` helpers for sizes and durations.
mod de {
    use std::fmt;
    use std::time::Duration;

    use serde::de::{self, Deserializer, Visitor};

    pub(super) fn byte_size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
        deserializer.deserialize_any(ByteSizeVisitor)
    }

    pub(super) fn duration<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Duration, D::Error> {
        deserializer.deserialize_any(DurationVisitor)
    }

    /// A present key is always `Some`. A missing key takes the struct default, `None`.
    pub(super) fn optional_byte_size<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<u64>, D::Error> {
        byte_size(deserializer).map(Some)
    }

    /// A present key is always `Some`. A missing key takes the struct default, `None`.
    pub(super) fn optional_duration<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        duration(deserializer).map(Some)
    }

    struct ByteSizeVisitor;

    impl Visitor<'_> for ByteSizeVisitor {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a byte size: a whole number of bytes, or a string such as \"512 MiB\"")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::custom(format!("byte size {v} is negative")))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            super::parse_size(v).map_err(E::custom)
        }
    }

    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration string such as \"500ms\", \"10s\" or \"7days\"")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            humantime::parse_duration(v).map_err(|err| {
                E::custom(format!(
                    "{v:?} is not a duration ({err}); write a number and a unit, \
                     e.g. \"500ms\", \"10s\", \"7days\""
                ))
            })
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The error for `text`, which must fail.
    fn error(text: &str) -> ConfigError {
        match Config::from_toml_str(text) {
            Ok(config) => panic!("expected an error for {text:?}, got {config:?}"),
            Err(err) => err,
        }
    }

    /// The problems for `text`, which must parse but fail validation.
    fn problems(text: &str) -> Vec<Problem> {
        match error(text) {
            ConfigError::Invalid { problems } => problems,
            other => panic!("expected validation problems for {text:?}, got: {other}"),
        }
    }

    /// The parse error message for `text`, which must fail to parse.
    fn parse_error(text: &str) -> String {
        match error(text) {
            ConfigError::Parse {
                path: None,
                message,
            } => message,
            other => panic!("expected a parse error for {text:?}, got: {other}"),
        }
    }

    fn queue(body: &str) -> String {
        format!("[queue]\n{body}\n")
    }

    #[test]
    fn default_config_file_parses_and_equals_default() {
        let mut config = Config::from_toml_str(DEFAULT_CONFIG).unwrap();
        // The file adds what a missing key does not: the AMQP uplink to a local RabbitMQ, with
        // its route, so that a first run delivers somewhere, and the AMQP downlink from it.
        let uplinks = std::mem::take(&mut config.uplinks);
        let routes = std::mem::take(&mut config.routes);
        let downlinks = std::mem::take(&mut config.downlinks);
        assert_eq!(config, Config::default());
        match &downlinks[..] {
            [DownlinkConfig::Amqp(a)] => {
                assert_eq!(
                    (a.queue.as_str(), a.exchange.as_deref()),
                    ("commands", Some("commands"))
                );
                assert!(a.declare && a.binding_key == "#");
                assert_eq!(
                    a.command.allowed_topics,
                    vec![DEFAULT_ALLOWED_TOPICS.to_string()]
                );
                assert_eq!(a.command.hold, DEFAULT_HOLD);
            }
            other => panic!("the default downlink is not one AMQP downlink: {other:?}"),
        }
        assert_eq!(uplinks.len(), 1);
        assert_eq!(uplinks[0].name(), "rabbit");
        match &uplinks[0] {
            UplinkConfig::Amqp(a) => {
                assert_eq!(a.url, "amqp://guest:guest@127.0.0.1:5672/%2f");
                assert!(a.declare && a.declare_queue.as_deref() == Some("telemetry"));
            }
            other => panic!("the default uplink is not AMQP: {other:?}"),
        }
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].uplinks, vec!["rabbit".to_string()]);
    }

    #[test]
    fn default_config_file_mentions_every_key() {
        for key in [
            "data_dir",
            "max_bytes",
            "max_age",
            "segment_bytes",
            "fsync",
            "fsync_interval",
            "full_policy",
            "preallocate",
            "bind",
            "tls",
            "allow_anonymous",
            "cert_identity",
            "client_id_must_match",
            "publish",
            "max_connections",
            "max_packet_size",
            "receive_maximum",
            "max_topic_length",
            "connect_timeout",
            "quota_wait",
            "shutdown_grace",
            "enabled",
            "listen",
        ] {
            assert!(
                DEFAULT_CONFIG.contains(&format!("{key} = ")),
                "config/gateway.toml does not show `{key}`"
            );
        }
    }

    #[test]
    fn empty_file_and_empty_section_are_the_defaults() {
        assert_eq!(Config::from_toml_str("").unwrap(), Config::default());
        assert_eq!(Config::from_toml_str("[queue]").unwrap(), Config::default());
        assert_eq!(
            Config::from_toml_str("# only a comment\n").unwrap(),
            Config::default()
        );
    }

    #[test]
    fn default_config_is_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn every_key_is_read() {
        let config = Config::from_toml_str(&queue(
            r#"
            data_dir = "/var/lib/gateway"
            max_bytes = "10 GB"
            max_age = "7days"
            segment_bytes = 1048576
            fsync = "interval"
            fsync_interval = "250ms"
            full_policy = "drop-oldest"
            preallocate = true
            "#,
        ))
        .unwrap();
        assert_eq!(
            config.queue,
            QueueConfig {
                data_dir: PathBuf::from("/var/lib/gateway"),
                max_bytes: 10_000_000_000,
                max_age: Some(Duration::from_secs(7 * 86_400)),
                segment_bytes: 1 << 20,
                fsync: FsyncMode::Interval,
                fsync_interval: Duration::from_millis(250),
                full_policy: FullPolicy::DropOldest,
                preallocate: true,
            }
        );
    }

    #[test]
    fn default_options_match_queue_options_new() {
        let ours = QueueConfig::default().to_options();
        let theirs = QueueOptions::new(DEFAULT_DATA_DIR);
        assert_eq!(ours.max_bytes, theirs.max_bytes);
        assert_eq!(ours.max_age, theirs.max_age);
        assert_eq!(ours.segment_bytes, theirs.segment_bytes);
        assert_eq!(ours.fsync, theirs.fsync);
        assert_eq!(ours.full_policy, theirs.full_policy);
        assert_eq!(ours.preallocate, theirs.preallocate);
    }

    #[test]
    fn to_options_maps_interval_and_drop_oldest() {
        let config = QueueConfig {
            fsync: FsyncMode::Interval,
            fsync_interval: Duration::from_millis(20),
            full_policy: FullPolicy::DropOldest,
            max_age: Some(Duration::from_secs(60)),
            ..QueueConfig::default()
        };
        let options = config.to_options();
        assert_eq!(
            options.fsync,
            FsyncPolicy::Interval(Duration::from_millis(20))
        );
        assert_eq!(options.full_policy, queue::FullPolicy::DropOldest);
        assert_eq!(options.max_age, Some(Duration::from_secs(60)));
    }

    #[test]
    fn relative_data_dir_is_resolved_against_the_working_directory() {
        let options = QueueConfig::default().to_options();
        assert!(options.data_dir.is_absolute());
        let cwd = std::env::current_dir().unwrap();
        assert!(options.data_dir.starts_with(&cwd));
        assert!(options.data_dir.ends_with("data"));

        let absolute = QueueConfig {
            data_dir: PathBuf::from("/var/lib/gateway"),
            ..QueueConfig::default()
        };
        assert_eq!(
            absolute.to_options().data_dir,
            PathBuf::from("/var/lib/gateway")
        );
    }

    #[test]
    fn sizes_parse() {
        let cases: &[(&str, u64)] = &[
            ("0", 0),
            ("1000000", 1_000_000),
            ("512 MiB", 512 << 20),
            ("16MiB", 16 << 20),
            ("1 GiB", 1 << 30),
            ("64 KiB", 64 << 10),
            ("10 MB", 10_000_000),
            ("10 mb", 10_000_000),
            ("1 kb", 1_000),
            ("1 KB", 1_000),
            ("3 gb", 3_000_000_000),
            ("2 TiB", 2 << 40),
            ("1 TB", 1_000_000_000_000),
            ("1 gib", 1 << 30),
            ("7 B", 7),
            ("7b", 7),
            ("  8   MIB  ", 8 << 20),
            ("18446744073709551615", u64::MAX),
        ];
        for &(text, bytes) in cases {
            assert_eq!(parse_size(text), Ok(bytes), "parsing {text:?}");
        }
    }

    #[test]
    fn bad_sizes_are_rejected_with_a_reason() {
        let cases: &[(&str, &str)] = &[
            ("", "not a byte size"),
            ("   ", "not a byte size"),
            ("lots", "not a byte size"),
            ("MiB", "not a byte size"),
            ("-5 MiB", "not a byte size"),
            ("1.5 GiB", "whole number"),
            ("1,5 GiB", "whole number"),
            ("5 XB", "unknown unit \"XB\""),
            ("5 M", "unknown unit"),
            ("5 MiB extra", "unknown unit"),
            ("5 µB", "unknown unit"),
            ("18446744073709551616", "too large"),
            ("17179869184 GiB", "too large"),
            ("99999999999999999999999 TiB", "too large"),
        ];
        for &(text, expected) in cases {
            let err = parse_size(text).unwrap_err();
            assert!(
                err.contains(expected),
                "parsing {text:?}: {err:?} lacks {expected:?}"
            );
        }
    }

    #[test]
    fn sizes_format_in_the_largest_exact_unit() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1500), "1500 B");
        assert_eq!(format_size(2000), "2 KB");
        assert_eq!(format_size(64 << 10), "64 KiB");
        assert_eq!(format_size(16 << 20), "16 MiB");
        assert_eq!(format_size(10_000_000), "10 MB");
        assert_eq!(format_size(1 << 30), "1 GiB");
        assert_eq!(format_size(3 << 40), "3 TiB");
        assert_eq!(format_size(u64::MAX), "18446744073709551615 B");
    }

    #[test]
    fn integer_sizes_are_bytes() {
        let config =
            Config::from_toml_str(&queue("max_bytes = 1073741824\nsegment_bytes = 65536")).unwrap();
        assert_eq!(config.queue.max_bytes, 1 << 30);
        assert_eq!(config.queue.segment_bytes, 64 << 10);
    }

    #[test]
    fn durations_parse() {
        let cases: &[(&str, Duration)] = &[
            ("10s", Duration::from_secs(10)),
            ("7days", Duration::from_secs(7 * 86_400)),
            ("1h 30min", Duration::from_secs(5_400)),
        ];
        for &(text, expected) in cases {
            let config = Config::from_toml_str(&queue(&format!("max_age = \"{text}\""))).unwrap();
            assert_eq!(config.queue.max_age, Some(expected), "parsing {text:?}");
        }
        let cases: &[(&str, Duration)] = &[
            ("1ms", Duration::from_millis(1)),
            ("500ms", Duration::from_millis(500)),
            ("10s", Duration::from_secs(10)),
        ];
        for &(text, expected) in cases {
            let config =
                Config::from_toml_str(&queue(&format!("fsync_interval = \"{text}\""))).unwrap();
            assert_eq!(config.queue.fsync_interval, expected, "parsing {text:?}");
        }
    }

    /// Values that cannot be read at all stop the parse, and the toml crate's message shows the
    /// line that holds the key.
    #[test]
    fn unreadable_values_name_the_key_and_line() {
        let cases: &[(&str, &str)] = &[
            ("data_dir = 5", "invalid type"),
            ("max_bytes = \"lots\"", "not a byte size"),
            ("max_bytes = -1", "negative"),
            ("max_bytes = 1.5", "invalid type"),
            ("max_age = \"soon\"", "not a duration"),
            ("max_age = 10", "invalid type"),
            ("segment_bytes = \"1.5 MiB\"", "whole number"),
            ("segment_bytes = true", "invalid type"),
            ("fsync = \"sometimes\"", "`always`"),
            ("fsync_interval = \"100\"", "not a duration"),
            ("full_policy = \"drop-newest\"", "`drop-oldest`"),
        ];
        for &(line, expected) in cases {
            let message = parse_error(&queue(line));
            let key = line.split(' ').next().unwrap();
            assert!(message.contains("line 2"), "{line}: {message}");
            assert!(message.contains(key), "{line}: {message}");
            assert!(message.contains(expected), "{line}: {message}");
        }
    }

    /// Values that parse but break a rule come back as problems naming the key.
    #[test]
    fn out_of_range_values_name_the_key() {
        let cases: &[(&str, &str)] = &[
            ("data_dir = \"\"", "queue.data_dir"),
            ("max_bytes = \"1 MiB\"", "queue.max_bytes"),
            ("max_bytes = 0", "queue.max_bytes"),
            ("max_age = \"500ms\"", "queue.max_age"),
            ("segment_bytes = \"16 KiB\"", "queue.segment_bytes"),
            (
                "segment_bytes = \"2 GiB\"\nmax_bytes = \"8 GiB\"",
                "queue.segment_bytes",
            ),
            ("fsync_interval = \"0s\"", "queue.fsync_interval"),
            ("fsync_interval = \"500us\"", "queue.fsync_interval"),
            ("fsync_interval = \"2min\"", "queue.fsync_interval"),
        ];
        for &(body, key) in cases {
            let found = problems(&queue(body));
            assert_eq!(found.len(), 1, "{body}: {found:?}");
            assert_eq!(found[0].key, key, "{body}");
            assert!(
                found[0].reason.contains("; "),
                "{body}: no advice in {:?}",
                found[0].reason
            );
        }
    }

    #[test]
    fn max_bytes_problem_reads_well() {
        let found = problems(&queue("max_bytes = \"1 MiB\""));
        assert_eq!(
            found[0].to_string(),
            "queue.max_bytes = \"1 MiB\": smaller than two segments (2 x 16 MiB); \
             raise max_bytes or lower segment_bytes"
        );
        assert_eq!(found[0].value, "\"1 MiB\"");
    }

    #[test]
    fn max_bytes_of_exactly_two_segments_is_enough() {
        let config = Config::from_toml_str(&queue(
            "max_bytes = \"128 KiB\"\nsegment_bytes = \"64 KiB\"",
        ))
        .unwrap();
        assert_eq!(config.queue.max_bytes, 2 * config.queue.segment_bytes);
        problems(&queue("max_bytes = 131071\nsegment_bytes = \"64 KiB\""));
    }

    #[test]
    fn limits_themselves_are_accepted() {
        Config::from_toml_str(&queue(
            r#"
            segment_bytes = "64 KiB"
            max_bytes = "128 KiB"
            max_age = "1s"
            fsync_interval = "1ms"
            "#,
        ))
        .unwrap();
        Config::from_toml_str(&queue(
            "segment_bytes = \"1 GiB\"\nmax_bytes = \"2 GiB\"\nfsync_interval = \"60s\"",
        ))
        .unwrap();
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let message = parse_error(&queue("max_byte = \"1 GiB\""));
        assert!(message.contains("max_byte"), "{message}");
        assert!(message.contains("unknown field"), "{message}");

        let message = parse_error("[queues]\nmax_bytes = 1\n");
        assert!(message.contains("queues"), "{message}");
        assert!(message.contains("unknown field"), "{message}");

        let message = parse_error("verbose = true\n");
        assert!(message.contains("verbose"), "{message}");
    }

    #[test]
    fn syntax_errors_give_the_line() {
        let message = parse_error("[queue]\nmax_bytes = \n");
        assert!(message.contains("line 2"), "{message}");
        let message = parse_error("[queue\n");
        assert!(message.contains("line 1"), "{message}");
        let message = parse_error("queue = 5\n");
        assert!(message.contains("queue"), "{message}");
    }

    #[test]
    fn all_problems_are_reported() {
        let err = error(&queue(
            r#"
            data_dir = ""
            max_age = "10ms"
            fsync_interval = "5min"
            max_bytes = "16 MiB"
            "#,
        ));
        let ConfigError::Invalid { problems } = &err else {
            panic!("expected problems, got: {err}");
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "queue.data_dir",
                "queue.max_bytes",
                "queue.max_age",
                "queue.fsync_interval"
            ]
        );
        let text = err.to_string();
        assert!(text.starts_with("invalid config (4 problems):"), "{text}");
        for key in keys {
            assert!(text.contains(key), "{text}");
        }
    }

    #[test]
    fn a_bad_segment_size_is_not_repeated_as_a_max_bytes_problem() {
        let found = problems(&queue("segment_bytes = \"4 GiB\""));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].key, "queue.segment_bytes");
    }

    #[test]
    fn missing_file_names_the_path_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        let err = Config::load(&path).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("gateway print-default-config >"), "{text}");
    }

    #[test]
    fn load_reads_a_file_and_names_it_in_parse_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, DEFAULT_CONFIG).unwrap();
        assert_eq!(
            Config::load(&path).unwrap(),
            Config::from_toml_str(DEFAULT_CONFIG).unwrap()
        );

        std::fs::write(&path, "[queue]\nfsync = \"never\"\n").unwrap();
        let err = Config::load(&path).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Parse { path: Some(p), .. } if *p == path),
            "{err:?}"
        );
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    mod no_panics {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn any_text_gives_a_config_or_an_error(text in any::<String>()) {
                let _ = Config::from_toml_str(&text);
            }

            #[test]
            fn any_queue_value_gives_a_config_or_an_error(
                key in prop::sample::select(vec![
                    "data_dir", "max_bytes", "max_age", "segment_bytes",
                    "fsync", "fsync_interval", "full_policy", "preallocate", "other",
                ]),
                value in prop_oneof![
                    any::<i64>().prop_map(|n| n.to_string()),
                    any::<f64>().prop_map(|n| format!("{n:?}")),
                    "[ -~]{0,20}".prop_map(|s| toml::Value::String(s).to_string()),
                    "[0-9]{1,25} ?[kKmMgGtTiIbB]{0,3}".prop_map(|s| format!("\"{s}\"")),
                ],
            ) {
                let _ = Config::from_toml_str(&format!("[queue]\n{key} = {value}\n"));
            }

            #[test]
            fn any_size_text_parses_or_errs(text in any::<String>()) {
                let _ = parse_size(&text);
            }

            #[test]
            fn formatted_sizes_parse_back(bytes in any::<u64>()) {
                prop_assert_eq!(parse_size(&format_size(bytes)), Ok(bytes));
            }
        }
    }
}
