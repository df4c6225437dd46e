//! What a build without the default features (`--no-default-features`, the AMQP-only edge
//! build) says when asked for what it lacks: a Kafka uplink in the config, development
//! certificates. In the default build these tests are empty.

#![cfg(not(all(feature = "kafka", feature = "dev-certs")))]
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

fn gateway(args: &[&str], dir: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run the gateway binary")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[cfg(not(feature = "kafka"))]
#[test]
fn a_kafka_uplink_is_a_config_error_naming_the_key_and_the_feature() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        r#"
[[listeners]]
bind = "127.0.0.1:0"
tls = false

[auth]
allow_anonymous = true

[[uplinks]]
type = "kafka"
name = "cloud"
bootstrap = ["127.0.0.1:9092"]
topic = "telemetry"
"#,
    )
    .unwrap();
    let out = gateway(
        &["check-config", "--config", config.to_str().unwrap()],
        dir.path(),
    );
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("uplinks[0].type = \"kafka\"") && said.contains("`kafka` feature"),
        "the error names neither the key nor the missing feature:\n{said}"
    );
    assert!(!said.contains("panicked"), "{said}");
}

#[cfg(not(feature = "dev-certs"))]
#[test]
fn certs_generate_says_how_to_get_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let out = gateway(&["certs", "generate", "--out", "certs"], dir.path());
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("`dev-certs` feature") && said.contains("--features dev-certs"),
        "it does not say how to get the command:\n{said}"
    );
    assert!(!dir.path().join("certs").exists(), "it wrote something");
}

#[cfg(not(feature = "dev-certs"))]
#[test]
fn the_default_config_without_certificates_says_how_to_get_them() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    // The shipped default config, on ports nobody uses, with no certs/dev/ beside it.
    let default = include_str!("../../config/gateway.toml")
        .replace("0.0.0.0:8883", "127.0.0.1:0")
        .replace("127.0.0.1:9100", "127.0.0.1:0");
    std::fs::write(&config, default).unwrap();
    let out = gateway(&["run", "--config", config.to_str().unwrap()], dir.path());
    let said = text(&out);
    assert!(
        !out.status.success(),
        "it ran without certificates:\n{said}"
    );
    assert!(
        said.contains("certs/dev") && said.contains("`dev-certs` feature"),
        "it does not say what is missing and how to get it:\n{said}"
    );
    assert!(!said.contains("panicked"), "{said}");
}
