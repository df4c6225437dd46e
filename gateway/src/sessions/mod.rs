//! Subscriptions, sessions and delivery to local subscribers (issue 11, being built in steps).
//!
//! ```text
//! queue --follower--> router --route()--> Sessions: index (filters) -> each session's Outbox
//!                                              connection writer <- wake; acks -> Outbox
//! ```
//!
//! Built so far: the subscription index ([`index`]), one session's delivery state with no I/O
//! ([`outbox`]), the live sessions of connected clients ([`registry`]) and the router
//! ([`router`]). Sessions last as long as their connection. Still to come: sessions kept across
//! disconnects and crashes (a durable session store), retained messages, wills to subscribers.

pub mod index;
pub mod outbox;
pub mod registry;
pub mod router;
pub mod store;

pub use registry::{SessionBounds, Sessions, Slot, SubOptions};
