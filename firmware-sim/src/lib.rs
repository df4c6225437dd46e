//! `firmware-sim`: a fleet of simulated sensors that publish MQTT, and a verifier that reads
//! the upstream broker and reports what was lost, duplicated or reordered.
//!
//! ```text
//!  device.rs (state machine, no I/O)          fleet/ (I/O: one tokio task per device)
//!  ┌───────────────────────────────┐          ┌──────────────────────────────────────┐
//!  │ sample on schedule, seq 0,1,..│  tick /  │ device_task: timers, backoff, pkid ->│
//!  │ CBOR (payload.rs) into a fixed│  acked / │   seq mapping        link: rumqttc   │──> MQTT broker
//!  │ heapless buffer; heapless     │  connect │   v3.1.1 / v5, plaintext or TLS      │    or gateway
//!  │ outbox; block / drop-oldest   │ <──────> │   (tls.rs: configs built once)       │        │
//!  └───────────────────────────────┘          └─────────────┬────────────────────────┘        │
//!                                                           │ manifest.rs: per device,        │ uplink
//!                                                           v acked seqs as ranges (ranges.rs)v
//!                       verify/: consume (AMQP: lapin; Kafka: rskafka) -> tally -> report <── RabbitMQ / Kafka
//! ```
//!
//! Commands run the other way: `sender/` publishes them to RabbitMQ or Kafka (and writes a
//! command manifest), the gateway's downlink delivers them to the devices' command topics, the
//! device state machine answers (`command.rs` is the wire format), the replies go up like
//! telemetry, and `verify/commands.rs` checks every confirmed command was answered, in order.
//!
//! - [`device`]: the device state machine (fixed-size `heapless` buffers, as on firmware).
//! - [`command`]: downlink commands and replies (JSON): ids, parsing, encoding, the send plan.
//! - [`payload`]: the CBOR payload; the only module that uses the CBOR library (ciborium).
//!   Also decodes the same fields as JSON.
//! - [`fleet`]: the runner (`run`, `bench`): connections, reconnects, progress, summary.
//! - [`manifest`]: what a run acknowledged, per device; [`ranges`] compresses it.
//! - [`sender`]: `firmware-sim command`: commands upstream (AMQP or Kafka) and their manifest.
//! - [`verify`]: the delivery verifier (`verify --amqp` or `verify --kafka`).
//! - [`tls`]: rustls client configs (ring provider) from the `gateway certs generate` layout.
//! - [`cli`]: the command line (flags over `fleet.toml` over defaults).

pub mod cli;
pub mod command;
pub mod device;
pub mod fleet;
pub mod manifest;
pub mod payload;
pub mod ranges;
pub mod sender;
pub mod tls;
pub mod verify;
