//! Subscriptions, sessions and delivery to local subscribers (issue 11, being built in steps).
//!
//! ```text
//! queue --follower--> router --route()--> Sessions: index (filters) -> each session's Outbox
//!                                              connection writer <- wake; acks -> Outbox
//! ```
//!
//! Built so far: the subscription index ([`index`]), one session's delivery state with no I/O
//! ([`outbox`]), the live sessions of connected clients ([`registry`]) and the router
//! ([`router`]), persistent sessions in a durable store ([`store`]), retained messages, and the
//! MQTT 5 extras: subscription identifiers, message expiry while queued, response topic and
//! correlation data.

pub mod index;
pub mod outbox;
pub mod registry;
pub mod router;
pub mod store;

pub use registry::{SessionBounds, Sessions, Slot, SubOptions};
