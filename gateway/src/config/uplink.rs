//! The forwarding sections: `[gateway]`, `[[uplinks]]` and `[[routes]]`.

use std::time::Duration;

use serde::Deserialize;

use super::{de, duration_value, quoted, Problem};

/// Confirm window: enough messages in flight to hide a broker's fsync, small enough that a
/// reconnect re-sends little.
pub const DEFAULT_WINDOW: usize = 256;
/// A broker that has not confirmed within this is stalled: reconnect and re-send.
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// Nacks of one record before it goes to the dead letters.
pub const DEFAULT_MAX_RETRIES: u32 = 5;
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// `[gateway]`: this gateway's identity towards the upstream.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Part of every message id (`{id}-{seq}`), so consumers can deduplicate across gateways.
    pub id: String,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            id: "edge-gateway".into(),
        }
    }
}

/// `[[uplinks]]`: where records are forwarded, tagged by `type`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum UplinkConfig {
    Amqp(AmqpConfig),
}

impl UplinkConfig {
    pub fn name(&self) -> &str {
        match self {
            UplinkConfig::Amqp(a) => &a.name,
        }
    }
}

/// An AMQP 0-9-1 uplink (RabbitMQ).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    /// Names the uplink and its queue cursor.
    pub name: String,
    /// `amqp://user:pass@host:port/vhost` or `amqps://...` (credentials are never logged).
    pub url: String,
    /// An environment variable holding the password (replaces the one in `url`).
    #[serde(default)]
    pub password_env: Option<String>,
    /// Exchange (template), e.g. "telemetry".
    pub exchange: String,
    /// Routing key (template); `{topic}` has `/` turned into `.`.
    #[serde(default = "default_routing_key")]
    pub routing_key: String,
    /// Declare the exchange (topic, durable) at connect; off by default.
    #[serde(default)]
    pub declare: bool,
    /// With `declare`: also declare this durable queue and bind it with `#`.
    #[serde(default)]
    pub declare_queue: Option<String>,
    #[serde(default = "default_window")]
    pub window: usize,
    #[serde(default = "default_confirm_timeout", deserialize_with = "de::duration")]
    pub confirm_timeout: Duration,
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    #[serde(default = "default_backoff_min", deserialize_with = "de::duration")]
    pub backoff_min: Duration,
    #[serde(default = "default_backoff_max", deserialize_with = "de::duration")]
    pub backoff_max: Duration,
    /// At most this many records per second to this uplink (so a backlog after a long outage
    /// does not flood the upstream). Not set: as fast as the upstream confirms.
    #[serde(default)]
    pub max_rate: Option<u32>,
}

fn default_routing_key() -> String {
    "{topic}".into()
}
fn default_window() -> usize {
    DEFAULT_WINDOW
}
fn default_confirm_timeout() -> Duration {
    DEFAULT_CONFIRM_TIMEOUT
}
fn default_max_retries() -> u32 {
    DEFAULT_MAX_RETRIES
}
fn default_backoff_min() -> Duration {
    DEFAULT_BACKOFF_MIN
}
fn default_backoff_max() -> Duration {
    DEFAULT_BACKOFF_MAX
}

/// Payload handling per route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PayloadMode {
    /// Forward the device's bytes unchanged.
    #[default]
    Raw,
    /// Decode the device's CBOR and send JSON; undecodable payloads go to dead letters.
    CborToJson,
}

/// `[[routes]]`: which records go to which uplinks.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// An MQTT topic filter (`+`, `#`).
    pub filter: String,
    pub uplinks: Vec<String>,
    #[serde(default)]
    pub payload: PayloadMode,
}

/// Placeholders a template may use.
pub const PLACEHOLDERS: &[&str] = &["topic", "client_id", "username"];

/// Checks a template: `{topic}`, `{client_id}`, `{username}`, `{topic[N]}`; returns why not.
pub fn check_template(t: &str) -> Result<(), String> {
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            return Err("a '{' without its '}'".into());
        };
        let name = &after[..close];
        let ok = PLACEHOLDERS.contains(&name)
            || name
                .strip_prefix("topic[")
                .and_then(|n| n.strip_suffix(']'))
                .is_some_and(|n| n.parse::<usize>().is_ok());
        if !ok {
            return Err(format!(
                "unknown placeholder {{{name}}}; use {{topic}}, {{client_id}}, {{username}} or {{topic[N]}}"
            ));
        }
        rest = &after[close + 1..];
    }
    if rest.contains('}') {
        return Err("a '}' without its '{'".into());
    }
    Ok(())
}

pub(super) fn check(uplinks: &[UplinkConfig], routes: &[RouteConfig], problems: &mut Vec<Problem>) {
    let mut names: Vec<&str> = Vec::new();
    for (i, u) in uplinks.iter().enumerate() {
        let UplinkConfig::Amqp(a) = u;
        let key = |k: &str| format!("uplinks[{i}].{k}");
        if names.contains(&a.name.as_str()) {
            problems.push(Problem {
                key: key("name"),
                value: quoted(&a.name),
                reason: "another uplink has this name; names must be unique (they name cursors)"
                    .into(),
            });
        }
        if a.name.is_empty()
            || a.name.len() > 64
            || a.name.starts_with('_')
            || !a
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            problems.push(Problem {
                key: key("name"),
                value: quoted(&a.name),
                reason: "use 1-64 of A-Z a-z 0-9 - _ (not starting with '_')".into(),
            });
        }
        names.push(&a.name);
        if !(a.url.starts_with("amqp://") || a.url.starts_with("amqps://")) {
            problems.push(Problem {
                key: key("url"),
                value: "(hidden)".into(),
                reason: "must start with amqp:// or amqps://".into(),
            });
        }
        for (k, t) in [("exchange", &a.exchange), ("routing_key", &a.routing_key)] {
            if let Err(why) = check_template(t) {
                problems.push(Problem {
                    key: key(k),
                    value: quoted(t),
                    reason: why,
                });
            }
        }
        if a.window == 0 || a.window > 65_535 {
            problems.push(Problem {
                key: key("window"),
                value: a.window.to_string(),
                reason: "must be between 1 and 65535".into(),
            });
        }
        if a.backoff_min > a.backoff_max || a.backoff_min.is_zero() {
            problems.push(Problem {
                key: key("backoff_min"),
                value: duration_value(a.backoff_min),
                reason: "must be above zero and at most backoff_max".into(),
            });
        }
        if a.max_rate == Some(0) {
            problems.push(Problem {
                key: key("max_rate"),
                value: "0".into(),
                reason: "nothing would ever be sent; remove the key for no limit".into(),
            });
        }
        if a.declare_queue.is_some() && !a.declare {
            problems.push(Problem {
                key: key("declare_queue"),
                value: quoted(a.declare_queue.as_deref().unwrap_or("")),
                reason: "only used with declare = true".into(),
            });
        }
    }
    for (i, r) in routes.iter().enumerate() {
        if !super::ingest::filter_ok(&r.filter) {
            problems.push(Problem {
                key: format!("routes[{i}].filter"),
                value: quoted(&r.filter),
                reason: "not a topic filter".into(),
            });
        }
        if r.uplinks.is_empty() {
            problems.push(Problem {
                key: format!("routes[{i}].uplinks"),
                value: "[]".into(),
                reason: "a route must name at least one uplink".into(),
            });
        }
        for (j, u) in r.uplinks.iter().enumerate() {
            if !names.contains(&u.as_str()) {
                problems.push(Problem {
                    key: format!("routes[{i}].uplinks[{j}]"),
                    value: quoted(u),
                    reason: "no [[uplinks]] has this name".into(),
                });
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn templates_accept_known_placeholders_and_name_unknown_ones() {
        assert!(check_template("{topic}").is_ok());
        assert!(check_template("site.{client_id}.{topic[1]}").is_ok());
        assert!(check_template("plain").is_ok());
        let e = check_template("{device}").unwrap_err();
        assert!(e.contains("{device}"), "{e}");
        assert!(check_template("{topic").is_err());
        assert!(check_template("{topic[x]}").is_err());
    }
}
