//! The edge gateway as a library: the `gateway` binary is a thin CLI over it.
//!
//! Data path (see `DESIGN.md`, "The chain of custody"):
//!
//! ```text
//! device --MQTT/TLS--> ingest --append--> queue (group commit, fdatasync) --> PUBACK
//!                                           |
//!                       forwarder per uplink reads from its cursor --> uplink --confirm--> ack_through
//! ```
//!
//! - [`config`]: the TOML config, its defaults and validation.
//! - [`queue`]: the bounded, crash-safe, segmented on-disk log with named cursors. It knows
//!   nothing of MQTT or uplinks.
//!
//! - [`ingest`]: MQTT 3.1.1/5 over TLS, PUBACK after the durable append.
//! - [`uplink`], [`forwarder`]: AMQP and Kafka, one forwarder per uplink on its own cursor.
//!
//! Cargo features (both default): `kafka` (the Kafka uplink, rskafka) and `dev-certs`
//! (`certs`: development certificates with rcgen). Without them the gateway is AMQP-only and
//! says so where a config or command asks for what is missing.
//! - [`service`]: the running gateway (start, reload, ordered stop); [`status`]: the view of it
//!   that [`admin`] serves (metrics, health, readiness, the status page); [`notify`]: systemd
//!   readiness and watchdog; [`throttle`]: log lines for failures that repeat per message.
//! - [`topic`]: MQTT topic names and filters, validated and matched in one place; [`tls`]: the
//!   rustls set-up of listeners and uplinks.

pub mod admin;
#[cfg(any(test, feature = "dev-certs"))]
pub mod certs;
pub mod config;
pub mod downlink;
pub mod forwarder;
pub mod ingest;
pub mod notify;
pub mod queue;
pub mod service;
pub mod sessions;
pub mod status;
pub mod throttle;
pub mod tls;
pub mod topic;
pub mod uplink;
