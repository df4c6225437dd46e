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
//! Ingest (MQTT over TLS), uplinks (AMQP, Kafka), the forwarder and metrics arrive with their own
//! issues and plug into the queue's `append` / `Reader` API.

pub mod certs;
pub mod config;
pub mod forwarder;
pub mod ingest;
pub mod queue;
pub mod uplink;
