//! AMQP 0-9-1 downlink (lapin): consumes one queue with manual acks and a prefetch window. A
//! delivery is acked only once its command is durable in the command store (or, when it cannot
//! be a command, once it is in the dead letters). Deliveries are stored concurrently (the
//! store's group commit makes one sync for many) and acked as each becomes durable.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};
use tokio_util::sync::CancellationToken;

use super::map::{self, HeaderValue, Upstream};
use super::{DownlinkState, DownlinkStats, RecentIds};
use crate::config::AmqpDownlinkConfig;
use crate::forwarder::DeadLetters;
use crate::queue::{Queue, QueueError};
use crate::uplink::amqp::{masked_url, open_connection};

/// No handshake by then: the node is a black hole; try the next.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Consumes until `shutdown`, reconnecting (the next node of `urls` each time, with jittered
/// backoff once all were tried).
pub async fn run(
    cfg: AmqpDownlinkConfig,
    store: Queue,
    dead: DeadLetters,
    stats: Arc<DownlinkStats>,
    shutdown: CancellationToken,
) {
    let origin = super::origin(&cfg.name);
    let mut recent = {
        let (store, origin) = (store.clone(), origin.clone());
        tokio::task::spawn_blocking(move || RecentIds::from_store(&store, &origin))
            .await
            .unwrap_or_default()
    };
    let urls: Vec<String> = cfg.urls().into_iter().map(String::from).collect();
    let mut node = 0usize;
    let mut failures = 0u32;
    loop {
        stats.set_state(DownlinkState::Connecting);
        stats.set_node(node);
        let url = &urls[node % urls.len()];
        let connected = tokio::select! {
            r = tokio::time::timeout(CONNECT_TIMEOUT, connect(&cfg, url)) => r.unwrap_or_else(|_| Err(format!("no AMQP handshake within {} s", CONNECT_TIMEOUT.as_secs()))),
            _ = shutdown.cancelled() => return,
        };
        match connected {
            Ok((connection, channel)) => {
                failures = 0;
                stats.connects.fetch_add(1, Ordering::Relaxed);
                tracing::info!(downlink = %cfg.name, node = %masked_url(url), queue = %cfg.queue, "downlink consuming");
                stats.set_state(DownlinkState::Consuming);
                let why = consume(
                    &cfg,
                    &channel,
                    &origin,
                    &store,
                    &dead,
                    &stats,
                    &mut recent,
                    &shutdown,
                )
                .await;
                let _ = connection.close(200, "bye".into()).await;
                match why {
                    None => {
                        stats.set_state(DownlinkState::Down);
                        return;
                    }
                    Some(why) => {
                        tracing::warn!(downlink = %cfg.name, node = %masked_url(url), error = %why, "downlink lost its connection; reconnecting");
                        stats.set_error(why);
                    }
                }
            }
            Err(why) => {
                tracing::warn!(downlink = %cfg.name, node = %masked_url(url), error = %why, "downlink cannot connect");
                stats.set_error(format!("{}: {why}", masked_url(url)));
                failures += 1;
            }
        }
        stats.set_state(DownlinkState::Down);
        node = (node + 1) % urls.len();
        // Straight to the next node; back off once every node has failed in a row.
        if failures > 0 && (failures as usize).is_multiple_of(urls.len()) {
            let attempt = (failures as usize / urls.len()) as u32;
            let wait = crate::forwarder::backoff(attempt, cfg.backoff_min, cfg.backoff_max);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return,
            }
        } else if failures == 0 {
            tokio::select! {
                _ = tokio::time::sleep(cfg.backoff_min) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

async fn connect(cfg: &AmqpDownlinkConfig, url: &str) -> Result<(Connection, Channel), String> {
    let connection =
        open_connection(url, cfg.password_env.as_deref(), cfg.ca_file.as_deref()).await?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| format!("open channel: {e}"))?;
    channel
        .basic_qos(cfg.prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| format!("basic.qos: {e}"))?;
    if cfg.declare {
        channel
            .queue_declare(
                cfg.queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("declare queue {}: {e}", cfg.queue))?;
        if let Some(x) = &cfg.exchange {
            channel
                .exchange_declare(
                    x.as_str().into(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| format!("declare exchange {x}: {e}"))?;
            channel
                .queue_bind(
                    cfg.queue.as_str().into(),
                    x.as_str().into(),
                    cfg.binding_key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| format!("bind queue {} to {x}: {e}", cfg.queue))?;
        }
    }
    Ok((connection, channel))
}

type Storing = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = (Delivery, Option<String>, Result<u64, QueueError>)>
            + Send,
    >,
>;

type Acking = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;

/// How long an ack may take before the connection counts as broken.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a pending ack is polled again. lapin's ack future was seen (one run in five of the
/// outage test) to stay pending after its frame went out, on a healthy connection: polled again,
/// it completes. So each ack is polled on this period as well as when woken.
const ACK_REPOLL: Duration = Duration::from_millis(100);

/// Acks `delivery`, within [`ACK_TIMEOUT`].
fn ack(delivery: Delivery) -> Acking {
    Box::pin(async move {
        let fut = delivery.acker.ack(BasicAckOptions::default());
        tokio::pin!(fut);
        let deadline = tokio::time::Instant::now() + ACK_TIMEOUT;
        loop {
            match tokio::time::timeout(ACK_REPOLL, &mut fut).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => return Err(format!("basic.ack: {e}")),
                Err(_) if tokio::time::Instant::now() >= deadline => {
                    return Err(format!(
                        "basic.ack not done within {} s",
                        ACK_TIMEOUT.as_secs()
                    ))
                }
                Err(_) => {}
            }
        }
    })
}

/// Consumes on `channel` until it fails (the reason) or `shutdown` (None).
#[allow(clippy::too_many_arguments)]
async fn consume(
    cfg: &AmqpDownlinkConfig,
    channel: &Channel,
    origin: &str,
    store: &Queue,
    dead: &DeadLetters,
    stats: &DownlinkStats,
    recent: &mut RecentIds,
    shutdown: &CancellationToken,
) -> Option<String> {
    let mut consumer = match channel
        .basic_consume(
            cfg.queue.as_str().into(),
            format!("gateway-{}", cfg.name).as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
    {
        Ok(c) => c,
        Err(e) => return Some(format!("basic.consume {}: {e}", cfg.queue)),
    };
    let mut storing: FuturesUnordered<Storing> = FuturesUnordered::new();
    let mut acking: FuturesUnordered<Acking> = FuturesUnordered::new();
    loop {
        tokio::select! {
            Some(done) = acking.next(), if !acking.is_empty() => match done {
                Ok(()) => {
                    stats.acked.fetch_add(1, Ordering::Relaxed);
                }
                // The broker delivers it again on the next connection (and the message id,
                // if any, keeps it from being stored twice).
                Err(why) => return Some(why),
            },
            Some((delivery, id, durable)) = storing.next(), if !storing.is_empty() => {
                match durable {
                    Ok(_) => {
                        stats.stored.fetch_add(1, Ordering::Relaxed);
                        acking.push(ack(delivery));
                    }
                    Err(error) => {
                        // Not stored: the broker keeps it (requeued) and delivers it again.
                        tracing::warn!(downlink = %cfg.name, %error, "a command could not be stored; returned to the broker");
                        if let Some(id) = id {
                            recent.forget(&id);
                        }
                        let _ = delivery.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }).await;
                    }
                }
            }
            next = consumer.next() => {
                let delivery = match next {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => return Some(format!("consumer: {e}")),
                    None => return Some("the broker ended the consumer".into()),
                };
                stats.consumed.fetch_add(1, Ordering::Relaxed);
                let upstream = upstream_of(&delivery);
                let command = match map::map(&cfg.command, &upstream) {
                    Ok(c) => c,
                    Err(why) => {
                        let source = vec![("amqp_routing_key".to_string(), upstream.routing_key.clone())];
                        let topic = upstream.routing_key.replace('.', "/");
                        if let Err(e) = super::reject(dead, origin, &upstream, source, topic, &why).await {
                            // Not in the dead letters: leave it to the broker.
                            tracing::warn!(downlink = %cfg.name, error = %e, "a bad command could not be dead-lettered; returned to the broker");
                            let _ = delivery.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }).await;
                            continue;
                        }
                        stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                        acking.push(ack(delivery));
                        continue;
                    }
                };
                if let Some(id) = &command.message_id {
                    if recent.seen(id) {
                        stats.duplicates.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(downlink = %cfg.name, message_id = %id, "redelivered command already stored; acked");
                        acking.push(ack(delivery));
                        continue;
                    }
                }
                // Room in the store first: while it is full nothing more is taken (the broker
                // keeps the rest beyond the prefetch window).
                let pending = loop {
                    match store.try_append(&command.record(origin, SystemTime::now())) {
                        Err(QueueError::Full { .. }) => {
                            stats.backpressure.fetch_add(1, Ordering::Relaxed);
                            stats.set_state(DownlinkState::Paused);
                            tokio::select! {
                                _ = store.wait_for_space() => {}
                                _ = shutdown.cancelled() => return None,
                            }
                            stats.set_state(DownlinkState::Consuming);
                        }
                        other => break other,
                    }
                };
                let id = command.message_id.clone();
                match pending {
                    Ok(p) => storing.push(Box::pin(async move {
                        let r = p.durable().await;
                        (delivery, id, r)
                    })),
                    Err(error @ QueueError::Encode(_)) => {
                        // It can never be stored (larger than a command-store segment): a dead
                        // letter, not a message the broker would hand back forever.
                        let why = format!("cannot be stored: {error}");
                        let source = vec![("amqp_routing_key".to_string(), upstream.routing_key.clone())];
                        let topic = command.topic.clone();
                        if super::reject(dead, origin, &upstream, source, topic, &why).await.is_ok() {
                            stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                            acking.push(ack(delivery));
                        } else {
                            // Neither stored nor dead-lettered: the broker keeps it, and its
                            // redelivery must not pass for a duplicate.
                            tracing::warn!(downlink = %cfg.name, %error, "a command that cannot be stored could not be dead-lettered either; returned to the broker");
                            if let Some(id) = &id {
                                recent.forget(id);
                            }
                            let _ = delivery.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }).await;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(downlink = %cfg.name, %error, "a command could not be stored; returned to the broker");
                        if let Some(id) = id {
                            recent.forget(&id);
                        }
                        let _ = delivery.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }).await;
                        if matches!(error, QueueError::Closed) {
                            return None;
                        }
                    }
                }
            }
            _ = shutdown.cancelled() => {
                // Finish what is being stored (acks for what is durable): at most a sync.
                while let Some((delivery, _, durable)) = storing.next().await {
                    if durable.is_ok() {
                        stats.stored.fetch_add(1, Ordering::Relaxed);
                        acking.push(ack(delivery));
                    }
                }
                while let Some(done) = acking.next().await {
                    if done.is_ok() {
                        stats.acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
                return None;
            }
        }
    }
}

/// The transport-neutral view of a delivery.
fn upstream_of(d: &Delivery) -> Upstream {
    let p = &d.properties;
    let headers = p
        .headers()
        .as_ref()
        .map(|t| {
            t.inner()
                .iter()
                .map(|(k, v)| (k.to_string(), header_value(v)))
                .collect()
        })
        .unwrap_or_default();
    Upstream {
        routing_key: d.routing_key.to_string(),
        headers,
        message_id: p.message_id().as_ref().map(|s| s.to_string()),
        correlation_id: p
            .correlation_id()
            .as_ref()
            .map(|s| s.as_str().as_bytes().to_vec()),
        reply_to: p.reply_to().as_ref().map(|s| s.to_string()),
        content_type: p.content_type().as_ref().map(|s| s.to_string()),
        expiration: p.expiration().as_ref().map(|s| s.to_string()),
        payload: d.data.clone(),
    }
}

fn header_value(v: &AMQPValue) -> HeaderValue {
    match v {
        AMQPValue::LongString(s) => HeaderValue::Bytes(s.as_bytes().to_vec()),
        AMQPValue::ShortString(s) => HeaderValue::Text(s.to_string()),
        AMQPValue::Boolean(b) => HeaderValue::Bool(*b),
        AMQPValue::ShortShortInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::ShortShortUInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::ShortInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::ShortUInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::LongInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::LongUInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::LongLongInt(i) => HeaderValue::Int(*i),
        AMQPValue::ByteArray(b) => HeaderValue::Bytes(b.as_slice().to_vec()),
        _ => HeaderValue::Other,
    }
}
