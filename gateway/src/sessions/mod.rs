//! Subscriptions, sessions and delivery to local subscribers (issue 11, being built in steps).
//!
//! Built so far: [`index::FilterIndex`], the subscription index that finds, for a published topic,
//! every subscriber whose filter matches. Still to come (see the README's "Subscriptions" section
//! once it exists): the per-session delivery state machine, the durable session store, retained
//! messages and the router that reads the queue and feeds sessions.

pub mod index;
pub mod outbox;
