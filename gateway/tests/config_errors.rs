//! `gateway check-config` on a table of bad configs: each one exits 1 with a message that names
//! the key and shows the offending value, and never shows a secret. Every bad config is a valid
//! base config with one edit, so each row tests exactly one mistake.
//!
//! Also: the example production config in `deploy/gateway.toml` is valid.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

/// A valid config touching every section. `@DIR@` is the test's directory and `@CERTS@` holds
/// certificates made at test time.
const BASE: &str = r#"
[queue]
data_dir = "@DIR@/data"
max_bytes = "64 MiB"
segment_bytes = "1 MiB"
fsync_interval = "100ms"

[[listeners]]
bind = "127.0.0.1:8883"
tls = { cert = "@CERTS@/server.pem", key = "@CERTS@/server.key", client_ca = "@CERTS@/ca.pem", require_client_cert = true }

[auth]
cert_identity = "cn"

[[acl]]
identity = "*"
publish = ["devices/%c/#"]

[limits]
max_packet_size = "256 KiB"

[gateway]
id = "gw-test"
shutdown_grace = "10s"

[admin]
listen = "127.0.0.1:9100"

[[uplinks]]
name = "rabbit"
type = "amqp"
url = "amqp://gateway:s3cret@127.0.0.1:5672/%2f"
exchange = "telemetry"
routing_key = "{topic}"

[[uplinks]]
name = "kafka"
type = "kafka"
bootstrap = ["127.0.0.1:9092"]
topic = "telemetry"

[[routes]]
filter = "devices/#"
uplinks = ["rabbit", "kafka"]
"#;

/// One row: what is wrong, how the base config is changed to get it, and what the output must
/// (and must not) contain.
struct Case {
    what: &'static str,
    /// `(text in BASE, replacement)`; the text must occur exactly once.
    edit: (&'static str, &'static str),
    /// Substrings of check-config's output: the key and the offending value, at least.
    expect: &'static [&'static str],
    /// Substrings that must not appear (secrets).
    reject: &'static [&'static str],
}

const fn case(
    what: &'static str,
    edit: (&'static str, &'static str),
    expect: &'static [&'static str],
) -> Case {
    Case {
        what,
        edit,
        expect,
        reject: &[],
    }
}

/// Mistakes the parser or `Config::validate` catch.
const CASES: &[Case] = &[
    case(
        "unknown key",
        ("[queue]\n", "[queue]\nmax_byte = \"1 GiB\"\n"),
        &["max_byte", "unknown field", "line 3"],
    ),
    case(
        "unknown section",
        ("[admin]\n", "[metrics]\nenabled = true\n\n[admin]\n"),
        &["metrics", "unknown field"],
    ),
    case(
        "unknown key in an uplink",
        (
            "exchange = \"telemetry\"",
            "exchange = \"telemetry\"\nexchnage = \"x\"",
        ),
        &["exchnage", "unknown field"],
    ),
    case(
        "duration that does not parse",
        ("fsync_interval = \"100ms\"", "fsync_interval = \"100\""),
        &["fsync_interval", "\"100\"", "not a duration"],
    ),
    case(
        "duration out of range",
        ("fsync_interval = \"100ms\"", "fsync_interval = \"2min\""),
        &["queue.fsync_interval = \"2m\"", "longer than 1m"],
    ),
    case(
        "size that does not parse",
        ("max_bytes = \"64 MiB\"", "max_bytes = \"lots\""),
        &["max_bytes", "\"lots\"", "not a byte size"],
    ),
    case(
        "size out of range",
        ("max_packet_size = \"256 KiB\"", "max_packet_size = \"2 GiB\""),
        &["limits.max_packet_size = \"2 GiB\""],
    ),
    case(
        "subscribe filter that is not a filter",
        (
            "publish = [\"devices/%c/#\"]",
            "publish = [\"devices/%c/#\"]\nsubscribe = [\"devices/#/x\"]",
        ),
        &["acl[0].subscribe[0] = \"devices/#/x\"", "not a topic filter"],
    ),
    case(
        "session bound larger than all sessions' bound",
        (
            "[gateway]\n",
            "[sessions]\nmax_bytes = \"1 MiB\"\nmax_queued_bytes = \"2 MiB\"\n\n[gateway]\n",
        ),
        &["sessions.max_queued_bytes = \"2 MiB\"", "sessions.max_bytes"],
    ),
    case(
        "no QoS 1/2 message could be in flight",
        ("[gateway]\n", "[sessions]\nmax_inflight = 0\n\n[gateway]\n"),
        &["sessions.max_inflight = 0"],
    ),
    case(
        "empty data_dir",
        ("data_dir = \"@DIR@/data\"", "data_dir = \"\""),
        &["queue.data_dir = \"\""],
    ),
    case(
        "duplicate uplink name",
        ("name = \"kafka\"", "name = \"rabbit\""),
        &["uplinks[1].name = \"rabbit\"", "unique"],
    ),
    case(
        "uplink name with a space",
        ("name = \"kafka\"", "name = \"kaf ka\""),
        &["uplinks[1].name = \"kaf ka\""],
    ),
    case(
        "route to an unknown uplink",
        (
            "uplinks = [\"rabbit\", \"kafka\"]",
            "uplinks = [\"rabbit\", \"nowhere\"]",
        ),
        &["routes[0].uplinks[1] = \"nowhere\"", "no [[uplinks]] has this name"],
    ),
    case(
        "route with a bad filter",
        ("filter = \"devices/#\"", "filter = \"devices/#/x\""),
        &["routes[0].filter = \"devices/#/x\""],
    ),
    case(
        "unknown template placeholder",
        ("routing_key = \"{topic}\"", "routing_key = \"{device}\""),
        &["uplinks[0].routing_key = \"{device}\"", "unknown placeholder"],
    ),
    case(
        "unknown placeholder in a Kafka topic",
        ("topic = \"telemetry\"", "topic = \"t.{device}\""),
        &["uplinks[1].topic = \"t.{device}\"", "unknown placeholder"],
    ),
    case(
        "plaintext listener without the explicit flag (no tls key)",
        (
            "tls = { cert = \"@CERTS@/server.pem\", key = \"@CERTS@/server.key\", client_ca = \"@CERTS@/ca.pem\", require_client_cert = true }\n",
            "",
        ),
        &["missing field `tls`", "listeners"],
    ),
    case(
        "tls = true without certificate files",
        (
            "tls = { cert = \"@CERTS@/server.pem\", key = \"@CERTS@/server.key\", client_ca = \"@CERTS@/ca.pem\", require_client_cert = true }",
            "tls = true",
        ),
        &["listeners[0].tls = true", "tls = false"],
    ),
    case(
        "mutual TLS without a client CA",
        (
            "client_ca = \"@CERTS@/ca.pem\", require_client_cert = true",
            "require_client_cert = true",
        ),
        &["listeners[0].tls.require_client_cert = true", "client_ca"],
    ),
    case(
        "listener address without a host",
        ("bind = \"127.0.0.1:8883\"", "bind = \"8883\""),
        &["listeners[0].bind = \"8883\""],
    ),
    case(
        "two listeners on one address",
        (
            "[auth]\n",
            "[[listeners]]\nbind = \"127.0.0.1:8883\"\ntls = false\n\n[auth]\n",
        ),
        &["listeners[1].bind = \"127.0.0.1:8883\""],
    ),
    case(
        "ACL with a bad topic filter",
        (
            "publish = [\"devices/%c/#\"]",
            "publish = [\"devices/#/%c\"]",
        ),
        &["acl[0].publish[0] = \"devices/#/%c\""],
    ),
    case(
        "admin.listen with a host name",
        (
            "listen = \"127.0.0.1:9100\"",
            "listen = \"localhost:9100\"",
        ),
        &["admin.listen = \"localhost:9100\""],
    ),
    case(
        "gateway.shutdown_grace too long",
        ("shutdown_grace = \"10s\"", "shutdown_grace = \"2h\""),
        &["gateway.shutdown_grace = \"2h\"", "longer than an hour"],
    ),
    case(
        "unknown uplink type",
        ("type = \"amqp\"", "type = \"nats\""),
        &["unknown variant `nats`", "amqp", "kafka", "mqtt"],
    ),
    case(
        "uplink without type",
        ("name = \"rabbit\"\ntype = \"amqp\"\n", "name = \"rabbit\"\n"),
        &["missing field `type`"],
    ),
    case(
        "uplink without url",
        (
            "url = \"amqp://gateway:s3cret@127.0.0.1:5672/%2f\"\n",
            "",
        ),
        &["uplinks[0].url = (missing)", "urls = [...]"],
    ),
    Case {
        what: "uplink url of the wrong scheme (the password is not shown)",
        edit: (
            "url = \"amqp://gateway:s3cret@127.0.0.1:5672/%2f\"",
            "url = \"http://gateway:s3cret@127.0.0.1:5672/%2f\"",
        ),
        expect: &["uplinks[0].url", "amqp://"],
        reject: &["s3cret"],
    },
    case(
        "Kafka bootstrap without a port",
        (
            "bootstrap = [\"127.0.0.1:9092\"]",
            "bootstrap = [\"localhost\"]",
        ),
        &["uplinks[1].bootstrap[0] = \"localhost\""],
    ),
    case(
        "TOML syntax error",
        ("[gateway]\n", "[gateway\n"),
        &["line", "[gateway"],
    ),
];

/// Files a config names that `check-config` must find and read. `Config::validate` does not
/// look at the listener's or the password file (only at an uplink's `ca_file`): these rows
/// fail until `check-config` checks them.
const FILE_CASES: &[Case] = &[
    case(
        "missing server certificate file",
        ("@CERTS@/server.pem", "@CERTS@/missing-server.pem"),
        &["listeners[0].tls.cert", "missing-server.pem"],
    ),
    case(
        "missing server key file",
        ("@CERTS@/server.key", "@CERTS@/missing-server.key"),
        &["listeners[0].tls.key", "missing-server.key"],
    ),
    case(
        "missing client CA file",
        ("@CERTS@/ca.pem", "@CERTS@/missing-ca.pem"),
        &["listeners[0].tls.client_ca", "missing-ca.pem"],
    ),
    case(
        "missing password file",
        (
            "[auth]\n",
            "[auth]\npassword_file = \"@DIR@/missing-passwd\"\n",
        ),
        &["auth.password_file", "missing-passwd"],
    ),
];

/// Mistakes inside a listener's `tls` table. `TlsSetting` is an untagged enum, so serde reports
/// only "data did not match any variant of untagged enum TlsSetting", naming neither the key nor
/// what is expected: these rows fail until `TlsSetting` gets a `Deserialize` that says `false` or
/// a table, and passes the table's own error through.
const TLS_TABLE_CASES: &[Case] = &[
    case(
        "misspelt key in the tls table",
        (
            "require_client_cert = true }",
            "require_client_cert = true, client_cert = \"x.pem\" }",
        ),
        &["client_cert", "unknown field"],
    ),
    case(
        "tls table without the key file",
        ("key = \"@CERTS@/server.key\", ", ""),
        &["missing field `key`"],
    ),
    case(
        "tls neither false nor a table",
        (
            "tls = { cert = \"@CERTS@/server.pem\", key = \"@CERTS@/server.key\", client_ca = \"@CERTS@/ca.pem\", require_client_cert = true }",
            "tls = \"yes\"",
        ),
        &["tls = \"yes\"", "false", "cert"],
    ),
];

/// Runs `gateway check-config --config path`: exit code and stdout + stderr.
fn check_config(path: &Path) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["check-config", "--config"])
        .arg(path)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// A temporary directory with certificates in `certs/`, and a function that writes a config
/// there (with `@DIR@` and `@CERTS@` filled in) and returns its path.
struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    fn new() -> Workspace {
        let dir = tempfile::tempdir().unwrap();
        gateway::certs::generate(&dir.path().join("certs"), 1).unwrap();
        Workspace { dir }
    }

    fn write(&self, name: &str, text: &str) -> std::path::PathBuf {
        let dir = self.dir.path().display().to_string();
        let text = text
            .replace("@CERTS@", &format!("{dir}/certs"))
            .replace("@DIR@", &dir);
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// Runs every row; returns one line per row that did not behave.
fn failures(cases: &[Case]) -> Vec<String> {
    let ws = Workspace::new();
    let mut failures = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let (from, to) = c.edit;
        assert_eq!(
            BASE.matches(from).count(),
            1,
            "row {:?}: the edit's text must occur once in BASE",
            c.what
        );
        let path = ws.write(&format!("bad-{i}.toml"), &BASE.replacen(from, to, 1));
        let (code, out) = check_config(&path);
        let mut wrong = Vec::new();
        if code != Some(1) {
            wrong.push(format!("exit code {code:?}, expected 1"));
        }
        if out.contains("panicked") {
            wrong.push("panicked".into());
        }
        for e in c.expect {
            if !out.contains(e) {
                wrong.push(format!("no {e:?}"));
            }
        }
        for r in c.reject {
            if out.contains(r) {
                wrong.push(format!("shows {r:?}"));
            }
        }
        if !wrong.is_empty() {
            failures.push(format!(
                "{}: {}\n    output: {}",
                c.what,
                wrong.join(", "),
                out.trim().replace('\n', "\n            ")
            ));
        }
    }
    failures
}

#[test]
fn the_base_config_is_valid() {
    let ws = Workspace::new();
    let (code, out) = check_config(&ws.write("good.toml", BASE));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(": ok"), "{out}");
}

#[test]
fn bad_configs_exit_1_naming_the_key_and_value() {
    let failures = failures(CASES);
    assert!(
        failures.is_empty(),
        "{} of {} rows wrong:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}

#[test]
fn missing_files_exit_1_naming_the_key_and_path() {
    let failures = failures(FILE_CASES);
    assert!(
        failures.is_empty(),
        "{} of {} rows wrong:\n{}",
        failures.len(),
        FILE_CASES.len(),
        failures.join("\n")
    );
}

#[test]
fn tls_table_mistakes_exit_1_naming_the_key() {
    let failures = failures(TLS_TABLE_CASES);
    assert!(
        failures.is_empty(),
        "{} of {} rows wrong:\n{}",
        failures.len(),
        TLS_TABLE_CASES.len(),
        failures.join("\n")
    );
}

#[test]
fn a_missing_config_file_exits_1_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nowhere.toml");
    let (code, out) = check_config(&path);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&path.display().to_string()), "{out}");
    assert!(out.contains("not found"), "{out}");
}

const DEPLOY_CONFIG: &str = include_str!("../../deploy/gateway.toml");

/// The example for /etc/gateway passes parsing and validation as it is (no files are read).
#[test]
fn deploy_config_parses_and_validates() {
    use gateway::config::{Config, TlsSetting, UplinkConfig};

    let config = Config::from_toml_str(DEPLOY_CONFIG).unwrap();
    assert_eq!(config.queue.data_dir, Path::new("/var/lib/gateway"));
    assert!(!config.listeners.is_empty());
    for l in &config.listeners {
        let TlsSetting::On(tls) = &l.tls else {
            panic!("production listener {} without TLS", l.bind);
        };
        assert!(tls.cert.starts_with("/etc/gateway/tls/"), "{tls:?}");
        assert!(tls.key.starts_with("/etc/gateway/tls/"), "{tls:?}");
        assert!(
            tls.require_client_cert && tls.client_ca.is_some(),
            "{tls:?}"
        );
    }
    assert!(
        config.admin.addr().unwrap().ip().is_loopback(),
        "{:?}",
        config.admin
    );
    assert!(!config.uplinks.is_empty());
    for u in &config.uplinks {
        if let UplinkConfig::Amqp(a) = u {
            assert!(a.password_env.is_some(), "{a:?}");
            let rest = a.url.split_once("://").map_or(a.url.as_str(), |(_, r)| r);
            let userinfo = rest.split_once('@').map_or("", |(u, _)| u);
            assert!(
                !userinfo.contains(':'),
                "the password belongs in the environment, not the file: {}",
                a.url
            );
        }
    }
}

/// The same file through the real `check-config`, with its certificate paths pointed at
/// certificates made here (the real ones live on the edge box).
#[test]
fn deploy_config_passes_check_config_given_its_files() {
    let ws = Workspace::new();
    let text = DEPLOY_CONFIG.replace("/etc/gateway/tls", "@CERTS@");
    assert_ne!(
        text, DEPLOY_CONFIG,
        "deploy/gateway.toml names no /etc/gateway/tls files"
    );
    let (code, out) = check_config(&ws.write("deploy.toml", &text));
    assert_eq!(code, Some(0), "{out}");
}

const DEPLOY_UNIT: &str = include_str!("../../deploy/systemd/gateway.service");

/// The value of `Key=` in the unit (the last one, as systemd reads a repeated key).
fn unit_value(key: &str) -> Option<&'static str> {
    DEPLOY_UNIT
        .lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .next_back()
}

/// The unit and the example config agree: the unit starts the gateway with that config, lets
/// it write its data_dir, and waits longer on stop than the config's shutdown_grace.
#[test]
fn deploy_unit_matches_deploy_config() {
    let config = gateway::config::Config::from_toml_str(DEPLOY_CONFIG).unwrap();
    assert_eq!(unit_value("Type"), Some("notify"));
    assert_eq!(unit_value("NotifyAccess"), Some("main"));
    assert_eq!(
        unit_value("ExecStart"),
        Some("/usr/local/bin/gateway run --config /etc/gateway/gateway.toml")
    );
    let data_dir = config.queue.data_dir.display().to_string();
    assert_eq!(unit_value("ReadWritePaths"), Some(data_dir.as_str()));
    assert_eq!(
        unit_value("StateDirectory").map(|d| format!("/var/lib/{d}")),
        Some(data_dir.clone())
    );
    assert_eq!(unit_value("ProtectSystem"), Some("strict"));
    let stop = humantime::parse_duration(unit_value("TimeoutStopSec").unwrap()).unwrap();
    assert!(
        stop >= config.gateway.shutdown_grace * 2,
        "TimeoutStopSec={stop:?} leaves too little beyond shutdown_grace = {:?}",
        config.gateway.shutdown_grace
    );
    let watchdog = humantime::parse_duration(unit_value("WatchdogSec").unwrap()).unwrap();
    assert!(
        watchdog >= std::time::Duration::from_secs(10),
        "{watchdog:?}"
    );
}
