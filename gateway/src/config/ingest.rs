//! The device-facing sections: `[[listeners]]`, `[auth]`, `[[acl]]` and `[limits]`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{de, duration_value, quoted, size_value, Problem};

/// Where the default config's development certificates live; `gateway run` makes them when
/// they are missing (and only for these paths).
pub const DEV_CERT_DIR: &str = "certs/dev";

/// What a build without the `dev-certs` feature says where development certificates are asked
/// for (`gateway certs generate`, the default config's first run).
pub const DEV_CERTS_NOT_BUILT: &str = "this gateway was built without the `dev-certs` feature, \
    which makes throwaway development certificates; build it with `cargo build --release -p \
    gateway` (dev-certs is a default feature) or `--features dev-certs` and run `gateway certs \
    generate`, or use certificates from your own CA (deploy/README.md, step 3)";
pub const DEV_SERVER_CERT: &str = "certs/dev/server.pem";
pub const DEV_SERVER_KEY: &str = "certs/dev/server.key";
pub const DEV_CA: &str = "certs/dev/ca.pem";

/// The default listener: MQTT over TLS on the standard port on all interfaces. Not 1883: that is
/// plaintext MQTT's port, and on our machines Mosquitto holds it.
pub const DEFAULT_BIND: &str = "0.0.0.0:8883";
/// Device connections: enough for a large site, bounded so that a connect flood cannot exhaust
/// file descriptors and memory (about 30 KiB per idle TLS connection).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Sensor messages are small; 256 KiB leaves room for firmware-sized blobs and bounds memory
/// per connection.
pub const DEFAULT_MAX_PACKET_SIZE: u64 = 256 << 10;
/// QoS 1/2 publishes a device may have unacknowledged: enough to keep a link busy through one
/// group commit (a few ms), small enough to bound memory per connection.
pub const DEFAULT_RECEIVE_MAXIMUM: u16 = 64;
pub const DEFAULT_MAX_TOPIC_LENGTH: usize = 256;
/// TLS handshake plus CONNECT: a slow cellular link needs a few seconds, a slow-loris client is
/// cut off after this.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a publish waits for queue space (backpressure) before MQTT 5 devices are told
/// "quota exceeded".
pub const DEFAULT_QUOTA_WAIT: Duration = Duration::from_secs(5);

/// A password login's client id is its username: one user, one device, and no user can act
/// (store records, take over a session) under another device's id. Fleets whose devices share
/// a login use "%u-*".
pub const DEFAULT_PASSWORD_CLIENT_ID: &str = "%u";

/// Publish rate limits are off by default: the gateway cannot know a fleet's normal rate, and
/// the moment devices publish fastest is the one that matters most, when they flush what they
/// buffered through an outage. A default low enough to stop a runaway device would throttle
/// that catch-up; the queue's bounds (`backpressure`) already protect the disk. Set a limit
/// per site, a few times the devices' normal rate with a burst of their buffer.
pub const DEFAULT_PUBLISH_RATE: Option<u32> = None;

/// New connections per address: off by default. Devices of one site often share one address
/// (a NAT, a cellular router, a protocol converter), and their reconnect storm after an outage
/// is when a limit would hurt most; `max_connections` and `connect_timeout` already bound the
/// handshake work, and password guessing is limited on its own (`failed_login_burst`). On an
/// untrusted network set e.g. 20 (each TLS handshake costs about a millisecond of CPU).
pub const DEFAULT_CONNECT_RATE_PER_ADDRESS: u32 = 0;
/// When `connect_rate_per_address` is set: a whole site of a few hundred devices behind one NAT
/// reconnecting at once.
pub const DEFAULT_CONNECT_BURST_PER_ADDRESS: u32 = 200;
/// Ten wrong passwords in a row is a misconfigured device or a guesser; either way more
/// guesses should cost time, not argon2 work.
pub const DEFAULT_FAILED_LOGIN_BURST: u32 = 10;
/// Then one more try every 6 s (10 a minute): a guesser gets ~14,000 tries a day per address,
/// hopeless against a real password; a device whose password was fixed is back within a
/// minute.
pub const DEFAULT_FAILED_LOGIN_INTERVAL: Duration = Duration::from_secs(6);
/// About 1 MiB of memory; an address-spraying flood gets past per-address limits anyway (the
/// global bound on password checks still holds).
pub const DEFAULT_ADDRESS_TABLE_SIZE: usize = 10_000;

/// `[[listeners]]`: one bound socket.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Address and port, e.g. "0.0.0.0:8883".
    pub bind: String,
    /// A table with the certificate files, or `false` for plaintext (only when said explicitly).
    pub tls: TlsSetting,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            bind: DEFAULT_BIND.into(),
            tls: TlsSetting::On(TlsConfig {
                cert: PathBuf::from(DEV_SERVER_CERT),
                key: PathBuf::from(DEV_SERVER_KEY),
                client_ca: Some(PathBuf::from(DEV_CA)),
                require_client_cert: true,
                crl_file: Default::default(),
            }),
        }
    }
}

/// `tls = false` or `tls = { cert = ..., key = ... }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSetting {
    /// Must be `false`: plaintext, logged as a warning.
    Off(bool),
    On(TlsConfig),
}

/// By hand rather than `untagged`, so that a mistake inside the table (an unknown or missing
/// key) is reported as such, not as "did not match any variant".
impl<'de> Deserialize<'de> for TlsSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = TlsSetting;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "`false` (plaintext) or a table like { cert = \"server.pem\", key = \"server.key\" }",
                )
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<TlsSetting, E> {
                Ok(TlsSetting::Off(v))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<TlsSetting, A::Error> {
                TlsConfig::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(TlsSetting::On)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// CA bundle (PEM) for client certificates; without it no client certificate is asked for.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Refuse clients without a valid certificate (mutual TLS).
    #[serde(default)]
    pub require_client_cert: bool,
    /// Certificate revocation lists (PEM or DER; a file may hold several) checked in the
    /// handshake against client certificates: one path or a list. A reload reads them again and
    /// closes the connections of certificates they revoke.
    #[serde(default)]
    pub crl_file: CrlFiles,
}

/// `crl_file`: one path or a list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(untagged)]
pub enum CrlFiles {
    #[default]
    None,
    One(PathBuf),
    Many(Vec<PathBuf>),
}

impl CrlFiles {
    pub fn paths(&self) -> Vec<&Path> {
        match self {
            CrlFiles::None => Vec::new(),
            CrlFiles::One(p) => vec![p.as_path()],
            CrlFiles::Many(v) => v.iter().map(PathBuf::as_path).collect(),
        }
    }
}

impl TlsConfig {
    /// Whether these are exactly the default config's development certificate paths.
    pub fn is_dev_default(&self) -> bool {
        self.cert == std::path::Path::new(DEV_SERVER_CERT)
            && self.key == std::path::Path::new(DEV_SERVER_KEY)
            && self
                .client_ca
                .as_deref()
                .is_none_or(|c| c == std::path::Path::new(DEV_CA))
    }
}

/// Where a device's identity comes from when it presents a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CertIdentity {
    /// The subject's common name.
    #[default]
    Cn,
    /// The first DNS subject alternative name.
    San,
}

/// `[auth]`: who may connect.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// `user:argon2-hash` lines, managed with `gateway passwd FILE USER`.
    pub password_file: Option<PathBuf>,
    /// Accept connections with neither a client certificate nor a password (logged as a warning).
    pub allow_anonymous: bool,
    pub cert_identity: CertIdentity,
    /// With a client certificate, the MQTT client id must equal the certificate's identity.
    pub client_id_must_match: bool,
    /// The client ids a password login owns: `%u` is the username, `*` any characters. A
    /// CONNECT with another client id is refused (identifier rejected / client identifier not
    /// valid); one with none is given the pattern with `*` as random characters.
    pub client_id: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            password_file: None,
            allow_anonymous: false,
            cert_identity: CertIdentity::Cn,
            client_id_must_match: true,
            client_id: DEFAULT_PASSWORD_CLIENT_ID.into(),
        }
    }
}

/// `[[acl]]`: topics an identity may publish to and filters it may subscribe to. `%c` is the
/// client id, `%u` the username.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    /// An identity (certificate CN/SAN or username), or a pattern with `*` (any characters).
    #[serde(default = "any_identity")]
    pub identity: String,
    /// MQTT topic filters (`+`, `#`) the identity may publish to.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Topic filters the identity may subscribe to: a SUBSCRIBE filter is granted when one of
    /// these covers it. Default: the device's own command tree, `devices/%c/commands/#`.
    #[serde(default = "default_subscribe")]
    pub subscribe: Vec<String>,
}

fn any_identity() -> String {
    "*".into()
}

fn default_subscribe() -> Vec<String> {
    vec!["devices/%c/commands/#".into()]
}

/// The rule that applies when no `[[acl]]` is configured.
pub fn default_acl() -> Vec<AclRule> {
    vec![AclRule {
        identity: any_identity(),
        publish: vec!["devices/%c/#".into()],
        subscribe: default_subscribe(),
    }]
}

/// `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_connections: usize,
    #[serde(deserialize_with = "de::byte_size")]
    pub max_packet_size: u64,
    pub receive_maximum: u16,
    pub max_topic_length: usize,
    #[serde(deserialize_with = "de::duration")]
    pub connect_timeout: Duration,
    #[serde(deserialize_with = "de::duration")]
    pub quota_wait: Duration,
    /// PUBLISH packets per second one device connection may send (a token bucket); `None`:
    /// no limit (the default, see [`DEFAULT_PUBLISH_RATE`]). Over it, MQTT 5 gets PUBACK/PUBREC
    /// 0x97 "message rate too high" and the message is not stored; 3.1.1 is slowed (its
    /// socket is not read).
    pub publish_rate: Option<u32>,
    /// Publishes a device may send at once above `publish_rate`; default: one second's worth.
    pub publish_burst: Option<u32>,
    /// Payload bytes per second one device connection may publish; `None`: no limit.
    #[serde(deserialize_with = "de::optional_byte_size")]
    pub publish_bytes_rate: Option<u64>,
    /// Payload bytes a device may send at once; default: one second's worth. A publish larger
    /// than this passes when the bucket is full and leaves it in debt.
    #[serde(deserialize_with = "de::optional_byte_size")]
    pub publish_bytes_burst: Option<u64>,
    /// New TCP connections per second from one source address (0: no limit); past the burst
    /// they are closed before the TLS handshake.
    pub connect_rate_per_address: u32,
    pub connect_burst_per_address: u32,
    /// Failed password logins one source address may make at once (0: no limit); past them
    /// its password CONNECTs are refused without checking the password, until
    /// `failed_login_interval` has given it another try.
    pub failed_login_burst: u32,
    #[serde(deserialize_with = "de::duration")]
    pub failed_login_interval: Duration,
    /// Source addresses tracked for the two limits above; when full, addresses whose limits are
    /// back to full go first, then the one seen longest ago.
    pub address_table_size: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_packet_size: DEFAULT_MAX_PACKET_SIZE,
            receive_maximum: DEFAULT_RECEIVE_MAXIMUM,
            max_topic_length: DEFAULT_MAX_TOPIC_LENGTH,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            quota_wait: DEFAULT_QUOTA_WAIT,
            publish_rate: DEFAULT_PUBLISH_RATE,
            publish_burst: None,
            publish_bytes_rate: None,
            publish_bytes_burst: None,
            connect_rate_per_address: DEFAULT_CONNECT_RATE_PER_ADDRESS,
            connect_burst_per_address: DEFAULT_CONNECT_BURST_PER_ADDRESS,
            failed_login_burst: DEFAULT_FAILED_LOGIN_BURST,
            failed_login_interval: DEFAULT_FAILED_LOGIN_INTERVAL,
            address_table_size: DEFAULT_ADDRESS_TABLE_SIZE,
        }
    }
}

pub(super) fn check_listeners(listeners: &[ListenerConfig], problems: &mut Vec<Problem>) {
    if listeners.is_empty() {
        problems.push(Problem {
            key: "listeners".into(),
            value: "[]".into(),
            reason: "no listener: devices could not connect; add a [[listeners]] section".into(),
        });
    }
    let mut seen = Vec::new();
    for (i, l) in listeners.iter().enumerate() {
        let key = |k: &str| format!("listeners[{i}].{k}");
        match l.bind.parse::<SocketAddr>() {
            Ok(addr) => {
                if seen.contains(&addr) {
                    problems.push(Problem {
                        key: key("bind"),
                        value: quoted(&l.bind),
                        reason: "bound by another listener too; give each listener its own address"
                            .into(),
                    });
                }
                seen.push(addr);
            }
            Err(_) => problems.push(Problem {
                key: key("bind"),
                value: quoted(&l.bind),
                reason: "not an address:port; write e.g. \"0.0.0.0:8883\" or \"127.0.0.1:8883\""
                    .into(),
            }),
        }
        match &l.tls {
            TlsSetting::Off(true) => problems.push(Problem {
                key: key("tls"),
                value: "true".into(),
                reason: "tls = true needs the certificate files; write tls = { cert = \"...\", key = \"...\" }, or tls = false for plaintext".into(),
            }),
            TlsSetting::Off(false) => {}
            TlsSetting::On(t) => {
                if t.require_client_cert && t.client_ca.is_none() {
                    problems.push(Problem {
                        key: key("tls.require_client_cert"),
                        value: "true".into(),
                        reason: "needs tls.client_ca, the CA that signs device certificates".into(),
                    });
                }
                if !t.crl_file.paths().is_empty() && t.client_ca.is_none() {
                    problems.push(Problem {
                        key: key("tls.crl_file"),
                        value: quoted(&t.crl_file.paths()[0].display().to_string()),
                        reason: "revocation lists apply to client certificates: set tls.client_ca too".into(),
                    });
                }
            }
        }
    }
}

pub(super) fn check_limits(l: &LimitsConfig, problems: &mut Vec<Problem>) {
    let mut p = |k: &str, value: String, reason: &str| {
        problems.push(Problem {
            key: format!("limits.{k}"),
            value,
            reason: reason.into(),
        })
    };
    if l.max_connections == 0 {
        p(
            "max_connections",
            "0".into(),
            "no device could connect; set at least 1",
        );
    }
    if l.max_packet_size < 1024 || l.max_packet_size > 256 << 20 {
        p(
            "max_packet_size",
            size_value(l.max_packet_size),
            "must be between \"1 KiB\" and \"256 MiB\"",
        );
    }
    if l.receive_maximum == 0 {
        p("receive_maximum", "0".into(), "MQTT requires at least 1");
    }
    if l.max_topic_length == 0 || l.max_topic_length > 65_535 {
        p(
            "max_topic_length",
            l.max_topic_length.to_string(),
            "must be between 1 and 65535 (MQTT's limit)",
        );
    }
    if l.publish_rate == Some(0) {
        p(
            "publish_rate",
            "0".into(),
            "no device could publish; set at least 1 (messages per second), or remove the key for no limit",
        );
    }
    if l.publish_burst == Some(0) {
        p(
            "publish_burst",
            "0".into(),
            "no publish could pass; set at least 1, or remove the key (default: one second's worth)",
        );
    }
    if l.publish_burst.is_some() && l.publish_rate.is_none() {
        p(
            "publish_burst",
            l.publish_burst.unwrap_or(0).to_string(),
            "a burst without publish_rate limits nothing; set publish_rate too, or remove it",
        );
    }
    if l.publish_bytes_rate == Some(0) {
        p(
            "publish_bytes_rate",
            "0".into(),
            "no device could publish; set a size per second such as \"64 KiB\", or remove the key for no limit",
        );
    }
    if l.publish_bytes_burst == Some(0) {
        p(
            "publish_bytes_burst",
            "0".into(),
            "no publish could pass; set a size such as \"256 KiB\", or remove the key (default: one second's worth)",
        );
    }
    if let (Some(b), None) = (l.publish_bytes_burst, l.publish_bytes_rate) {
        p(
            "publish_bytes_burst",
            size_value(b),
            "a burst without publish_bytes_rate limits nothing; set publish_bytes_rate too, or remove it",
        );
    }
    if l.connect_burst_per_address == 0 && l.connect_rate_per_address > 0 {
        p(
            "connect_burst_per_address",
            "0".into(),
            "no connection could pass; set at least 1, or connect_rate_per_address = 0 for no limit",
        );
    }
    if l.failed_login_burst > 0 && l.failed_login_interval.is_zero() {
        p(
            "failed_login_interval",
            duration_value(l.failed_login_interval),
            "zero gives a new try at once, which limits nothing; write e.g. \"6s\", or failed_login_burst = 0 for no limit",
        );
    }
    if l.address_table_size == 0 && (l.connect_rate_per_address > 0 || l.failed_login_burst > 0) {
        p(
            "address_table_size",
            "0".into(),
            "the per-address limits need a table; set e.g. 10000, or turn them off (connect_rate_per_address = 0, failed_login_burst = 0)",
        );
    }
    if l.connect_timeout < Duration::from_millis(100) {
        p(
            "connect_timeout",
            duration_value(l.connect_timeout),
            "shorter than 100ms: no TLS handshake completes that fast; raise it",
        );
    }
}

pub(super) fn check_acl(rules: &[AclRule], problems: &mut Vec<Problem>) {
    if rules.is_empty() {
        problems.push(Problem {
            key: "acl".into(),
            value: "[]".into(),
            reason: "no rule: no device could publish anything; add an [[acl]] section".into(),
        });
    }
    for (i, r) in rules.iter().enumerate() {
        if r.publish.is_empty() && r.subscribe.is_empty() {
            problems.push(Problem {
                key: format!("acl[{i}].publish"),
                value: "[]".into(),
                reason: "empty, and so is subscribe: the rule allows nothing; list topic filters \
                         or remove the rule"
                    .into(),
            });
        }
        for (what, filters) in [("publish", &r.publish), ("subscribe", &r.subscribe)] {
            for (j, f) in filters.iter().enumerate() {
                if let Err(e) = crate::topic::check_filter(f) {
                    problems.push(Problem {
                        key: format!("acl[{i}].{what}[{j}]"),
                        value: quoted(f),
                        reason: format!("not a topic filter: {e}"),
                    });
                }
            }
        }
    }
}

pub(super) fn check_auth(a: &AuthConfig, problems: &mut Vec<Problem>) {
    if let Err(why) = check_client_id_pattern(&a.client_id) {
        problems.push(Problem {
            key: "auth.client_id".into(),
            value: quoted(&a.client_id),
            reason: format!(
                "{why}; write \"%u\" (the client id is the username) or a pattern such as \"%u-*\""
            ),
        });
    }
}

/// A client id pattern has exactly one `%u`, no other `%`, and at most one `*` (after `%u`).
pub fn check_client_id_pattern(p: &str) -> Result<(), &'static str> {
    if p.matches("%u").count() != 1 {
        return Err("must contain %u (the username) exactly once");
    }
    if p.replace("%u", "").contains('%') {
        return Err("only %u may be substituted");
    }
    if p.matches('*').count() > 1 {
        return Err("at most one '*'");
    }
    if p.find('*')
        .is_some_and(|star| p.find("%u").is_some_and(|u| star < u))
    {
        return Err("'*' must come after %u, so that the username starts where it is expected");
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::{Config, ConfigError};

    fn auth_problems(client_id: &str) -> Vec<String> {
        match Config::from_toml_str(&format!("[auth]\nclient_id = {client_id:?}\n")) {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid { problems }) => {
                problems.iter().map(|p| p.to_string()).collect()
            }
            Err(other) => panic!("{other}"),
        }
    }

    #[test]
    fn client_id_patterns_are_checked_and_the_error_says_what_to_write() {
        for ok in ["%u", "%u-*", "site1-%u", "%u/*"] {
            assert_eq!(auth_problems(ok), Vec::<String>::new(), "{ok}");
        }
        for (bad, why) in [
            ("dev-*", "exactly once"),
            ("%u-%u", "exactly once"),
            ("%u-%c", "only %u"),
            ("%u-*-*", "at most one"),
            ("*-%u", "after %u"),
        ] {
            let found = auth_problems(bad);
            assert_eq!(found.len(), 1, "{bad}: {found:?}");
            assert!(
                found[0].starts_with(&format!("auth.client_id = {bad:?}: "))
                    && found[0].contains(why)
                    && found[0].contains("write \"%u\""),
                "{bad}: {}",
                found[0]
            );
        }
    }

    fn limits_problems(body: &str) -> Vec<String> {
        match Config::from_toml_str(&format!("[limits]\n{body}\n")) {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid { problems }) => {
                problems.iter().map(|p| p.to_string()).collect()
            }
            Err(other) => panic!("{other}"),
        }
    }

    #[test]
    fn publish_rates_are_read_and_nonsense_is_named() {
        let c = Config::from_toml_str(
            "[limits]\npublish_rate = 50\npublish_burst = 500\n\
             publish_bytes_rate = \"64 KiB\"\npublish_bytes_burst = \"1 MiB\"\n",
        )
        .unwrap();
        assert_eq!(
            (
                c.limits.publish_rate,
                c.limits.publish_burst,
                c.limits.publish_bytes_rate,
                c.limits.publish_bytes_burst
            ),
            (Some(50), Some(500), Some(64 << 10), Some(1 << 20))
        );
        assert_eq!(
            Config::default().limits.publish_rate,
            None,
            "off by default"
        );
        for (body, key, says) in [
            (
                "publish_rate = 0",
                "limits.publish_rate = 0",
                "remove the key",
            ),
            (
                "publish_rate = 5\npublish_burst = 0",
                "limits.publish_burst = 0",
                "at least 1",
            ),
            (
                "publish_burst = 10",
                "limits.publish_burst = 10",
                "set publish_rate too",
            ),
            (
                "publish_bytes_rate = 0",
                "limits.publish_bytes_rate = 0",
                "KiB",
            ),
            (
                "publish_bytes_burst = \"1 MiB\"",
                "limits.publish_bytes_burst = \"1 MiB\"",
                "set publish_bytes_rate too",
            ),
        ] {
            let found = limits_problems(body);
            assert_eq!(found.len(), 1, "{body}: {found:?}");
            assert!(
                found[0].starts_with(&format!("{key}: ")) && found[0].contains(says),
                "{body}: {}",
                found[0]
            );
        }
    }

    #[test]
    fn failed_logins_are_limited_by_default_and_zero_turns_each_limit_off() {
        let d = Config::default().limits;
        assert_eq!(
            (
                d.connect_rate_per_address,
                d.connect_burst_per_address,
                d.failed_login_burst,
                d.failed_login_interval.as_secs(),
                d.address_table_size
            ),
            (0, 200, 10, 6, 10_000)
        );
        let off = "connect_rate_per_address = 0\nconnect_burst_per_address = 0\n\
                   failed_login_burst = 0\nfailed_login_interval = \"0s\"\naddress_table_size = 0";
        assert_eq!(limits_problems(off), Vec::<String>::new());
        for (body, key, says) in [
            (
                "connect_rate_per_address = 20\nconnect_burst_per_address = 0",
                "limits.connect_burst_per_address = 0",
                "connect_rate_per_address = 0",
            ),
            (
                "failed_login_interval = \"0s\"",
                "limits.failed_login_interval = \"0s\"",
                "failed_login_burst = 0",
            ),
            (
                "address_table_size = 0",
                "limits.address_table_size = 0",
                "10000",
            ),
        ] {
            let found = limits_problems(body);
            assert_eq!(found.len(), 1, "{body}: {found:?}");
            assert!(
                found[0].starts_with(&format!("{key}: ")) && found[0].contains(says),
                "{body}: {}",
                found[0]
            );
        }
    }
}
