//! Kafka downlink (rskafka): reads every partition of one topic and stores each record as a
//! command. rskafka has no consumer groups, so the gateway keeps the offsets itself
//! ([`super::offsets`]): the mirror of an AMQP ack is the partition's next offset, moved past a
//! record only once its command is durable in the command store (or the record is durable in
//! the dead letters, or a duplicate), and written to the offsets file after that.
//!
//! ```text
//! partition p: fetch(next) --records--> map --try_append_after (one chain per partition)-->
//!   all durable --> next = last + 1 (in memory) --> offsets file (temp, fsync, rename, fsync dir)
//! ```
//!
//! - **Order**: one loop per partition, fetching the next batch only when the last one is
//!   settled; its appends are chained ([`Queue::try_append_after`]) so a failed append is never
//!   followed by a stored one. A producer keys a device's commands by the device, so they share
//!   a partition and reach the store, and the device, in order. Partitions run concurrently.
//! - **Partitions** are listed at each connect (so a reconnect finds partitions added since).
//!   One with no stored offset starts at `start` (earliest or latest), and that offset is
//!   stored at once, so "latest" does not move on after a restart. An offset the broker no
//!   longer has (retention, a re-created topic) is reset the same way, with a warning.
//! - **Mapping** ([`command_of`]): the key (UTF-8) is the template's `{key}`; every header is a
//!   byte header for [`super::map::map`] (`mqtt_topic`, `mqtt_qos`, `mqtt_message_expiry`,
//!   `mqtt_response_topic`, `mqtt_correlation_data`, `content_type`; the rest become user
//!   properties); the message id is the `message_id` header, else `{topic}:{partition}:{offset}`.
//! - **Bad records** (not a command, or one the store cannot encode) go to the dead letters
//!   with the reason, and the offset moves past them: never a stuck partition.
//! - **Duplicates**: a message id seen among the downlink's recent ones ([`RecentIds`], seeded
//!   at start with the ids of its commands still in the command store) is skipped, so records
//!   read again after a reconnect, or after a crash between the store's sync and the offsets
//!   write, are not stored twice. (A command already delivered and removed from the store
//!   before such a crash would be stored again: at least once.)
//! - **Backpressure**: a full command store stops the partition's fetching
//!   ([`Queue::wait_for_space`]); state `paused`, counted in `backpressure`. The broker keeps
//!   the records.

use std::sync::atomic::Ordering;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use rskafka::client::error::{Error as KafkaError, ProtocolError};
use rskafka::client::partition::{OffsetAt, PartitionClient, UnknownTopicHandling};
use rskafka::record::Record as KafkaRecord;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::map::{self, Command, HeaderValue, Upstream};
use super::offsets::{Offsets, OffsetsError};
use super::{DownlinkState, DownlinkStats, RecentIds};
use crate::config::{KafkaDownlinkConfig, KafkaStart};
use crate::forwarder::DeadLetters;
use crate::queue::{AppendMarker, PendingAppend, Queue, QueueError};
use crate::uplink::kafka::{client, ClientOptions};

/// What one run of the downlink shares between its partition loops.
struct Ctx<'a> {
    cfg: &'a KafkaDownlinkConfig,
    origin: &'a str,
    store: &'a Queue,
    dead: &'a DeadLetters,
    stats: &'a DownlinkStats,
    recent: &'a Mutex<RecentIds>,
    /// Invariant: every offset in here is settled (see [`super::offsets`]); the file lags it.
    offsets: &'a Mutex<Offsets>,
    /// Signalled when `offsets` changed: the consumer writes the file.
    changed: &'a Notify,
}

impl Ctx<'_> {
    fn set_offset(&self, partition: i32, next: i64) {
        let mut o = self.offsets.lock().unwrap_or_else(PoisonError::into_inner);
        if o.get(&self.cfg.topic, partition) != Some(next) {
            o.set(&self.cfg.topic, partition, next);
            self.changed.notify_one();
        }
    }

    fn seen(&self, id: &str) -> bool {
        self.recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .seen(id)
    }

    fn forget(&self, id: &str) {
        self.recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .forget(id);
    }

    /// Longest a request may take: a fetch waits up to `max_wait` at the broker.
    fn request_bound(&self) -> Duration {
        self.cfg.max_wait + self.cfg.request_timeout
    }
}

/// Consumes until `shutdown`, reconnecting with jittered backoff. `store_dir` is the command
/// store's directory (the offsets file lives there).
pub async fn run(
    cfg: KafkaDownlinkConfig,
    client_id: String,
    store_dir: std::path::PathBuf,
    store: Queue,
    dead: DeadLetters,
    stats: std::sync::Arc<DownlinkStats>,
    shutdown: CancellationToken,
) {
    let origin = super::origin(&cfg.name);
    let path = Offsets::path(&store_dir, &cfg.name);
    // A damaged offsets file stops this downlink (it says why in its status) until it is
    // fixed: reading from `start` instead could replay or skip a topic's commands.
    let offsets = loop {
        let (p, name) = (path.clone(), cfg.name.clone());
        let loaded = tokio::task::spawn_blocking(move || Offsets::load(&p, &name))
            .await
            .unwrap_or_else(|e| {
                Err(OffsetsError::Read {
                    path: path.clone(),
                    source: std::io::Error::other(e.to_string()),
                })
            });
        match loaded {
            Ok(o) => break o,
            Err(e) => {
                tracing::error!(downlink = %cfg.name, error = %e, "downlink cannot start");
                stats.set_state(DownlinkState::Down);
                stats.set_error(e.to_string());
                tokio::select! {
                    _ = tokio::time::sleep(cfg.backoff_max) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    };
    let offsets = Mutex::new(offsets);
    // Records read again after a crash between the store's sync and the offsets write are
    // recognised by the message ids of this downlink's commands still in the store.
    let recent = {
        let (store, origin) = (store.clone(), origin.clone());
        tokio::task::spawn_blocking(move || RecentIds::from_store(&store, &origin))
            .await
            .unwrap_or_default()
    };
    let recent = Mutex::new(recent);
    let changed = Notify::new();
    let ctx = Ctx {
        cfg: &cfg,
        origin: &origin,
        store: &store,
        dead: &dead,
        stats: &stats,
        recent: &recent,
        offsets: &offsets,
        changed: &changed,
    };
    let source = format!("{} topic {}", cfg.bootstrap.join(","), cfg.topic);
    let mut failures = 0u32;
    loop {
        stats.set_state(DownlinkState::Connecting);
        let connected = tokio::select! {
            r = connect(&ctx, &client_id) => r,
            _ = shutdown.cancelled() => return,
        };
        match connected {
            Ok(partitions) => {
                failures = 0;
                stats.connects.fetch_add(1, Ordering::Relaxed);
                tracing::info!(downlink = %cfg.name, %source, partitions = partitions.len(), "downlink consuming");
                stats.set_state(DownlinkState::Consuming);
                match consume(&ctx, partitions, &shutdown).await {
                    None => {
                        stats.set_state(DownlinkState::Down);
                        return;
                    }
                    Some(why) => {
                        tracing::warn!(downlink = %cfg.name, %source, error = %why, "downlink lost its connection; reconnecting");
                        stats.set_error(why);
                    }
                }
            }
            Err(why) => {
                tracing::warn!(downlink = %cfg.name, %source, error = %why, "downlink cannot connect");
                stats.set_error(why);
                failures += 1;
            }
        }
        stats.set_state(DownlinkState::Down);
        let wait = match failures {
            0 => cfg.backoff_min,
            n => crate::forwarder::backoff(n, cfg.backoff_min, cfg.backoff_max),
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Connects and opens a client for each partition of the topic (listed now).
async fn connect(ctx: &Ctx<'_>, client_id: &str) -> Result<Vec<(i32, PartitionClient)>, String> {
    let cfg = ctx.cfg;
    let bound = ctx.request_bound();
    let client = client(
        &ClientOptions {
            bootstrap: &cfg.bootstrap,
            tls: cfg.tls,
            ca_file: cfg.ca_file.as_deref(),
            sasl: cfg.sasl.as_ref(),
            backoff_min: cfg.backoff_min,
            backoff_max: cfg.backoff_max,
            timeout: bound,
        },
        client_id,
    )
    .await?;
    let topics = tokio::time::timeout(bound, client.list_topics())
        .await
        .map_err(|_| format!("no metadata within {bound:?}"))?
        .map_err(|e| format!("metadata: {e}"))?;
    let partitions = topics
        .into_iter()
        .find(|t| t.name == cfg.topic)
        .map(|t| t.partitions)
        .filter(|p| !p.is_empty())
        .ok_or_else(|| format!("topic {} does not exist", cfg.topic))?;
    let mut clients = Vec::with_capacity(partitions.len());
    for p in partitions {
        let c = tokio::time::timeout(
            bound,
            client.partition_client(cfg.topic.as_str(), p, UnknownTopicHandling::Error),
        )
        .await
        .map_err(|_| format!("partition {}/{p}: no answer within {bound:?}", cfg.topic))?
        .map_err(|e| format!("partition {}/{p}: {e}", cfg.topic))?;
        clients.push((p, c));
    }
    Ok(clients)
}

/// Runs the partition loops and writes the offsets file as they move, until one fails (the
/// reason) or `shutdown` (None). Either way the last settled offsets are written before it
/// returns.
async fn consume(
    ctx: &Ctx<'_>,
    partitions: Vec<(i32, PartitionClient)>,
    shutdown: &CancellationToken,
) -> Option<String> {
    let stop = shutdown.child_token();
    let mut loops: FuturesUnordered<_> = partitions
        .into_iter()
        .map(|(p, c)| partition(ctx, p, c, &stop))
        .collect();
    let mut failure: Option<String> = None;
    let mut saving: Option<tokio::task::JoinHandle<Result<(), OffsetsError>>> = None;
    let mut written: Option<Offsets> = None;
    loop {
        if saving.is_none() {
            if loops.is_empty() {
                break;
            }
            let now = ctx
                .offsets
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            if written.as_ref() != Some(&now) {
                written = Some(now.clone());
                saving = Some(tokio::task::spawn_blocking(move || now.save()));
            }
        }
        tokio::select! {
            r = loops.next(), if !loops.is_empty() => {
                if let Some(Err(why)) = r {
                    failure.get_or_insert(why);
                    stop.cancel();
                }
            }
            r = async {
                match saving.as_mut() {
                    Some(h) => h.await,
                    None => std::future::pending().await,
                }
            }, if saving.is_some() => {
                saving = None;
                let r = r.unwrap_or_else(|e| Err(OffsetsError::Write {
                    path: std::path::PathBuf::new(),
                    source: std::io::Error::other(e.to_string()),
                }));
                if let Err(e) = r {
                    // Consuming on would only widen what a crash re-reads: stop and retry.
                    tracing::error!(downlink = %ctx.cfg.name, error = %e, "cannot keep the consumed offsets");
                    written = None;
                    failure.get_or_insert(e.to_string());
                    stop.cancel();
                }
            }
            _ = ctx.changed.notified() => {}
        }
    }
    // The loops have stopped: what they settled last is written now.
    let last = ctx
        .offsets
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    if written.as_ref() != Some(&last) {
        match tokio::task::spawn_blocking(move || last.save()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(downlink = %ctx.cfg.name, error = %e, "cannot keep the consumed offsets");
                failure.get_or_insert(e.to_string());
            }
            Err(e) => {
                failure.get_or_insert(format!("offsets write task: {e}"));
            }
        }
    }
    match failure {
        Some(why) if !shutdown.is_cancelled() => Some(why),
        _ => None,
    }
}

/// A record read and what became of it, until it is settled.
enum Taken {
    /// Dead-lettered (durable) or a duplicate: settled.
    Done,
    /// Appended to the command store: settled once durable.
    Stored(PendingAppend, String),
}

/// One partition: fetch, store, move the offset; until `stop` (Ok) or a failure (the reason;
/// the offset stays at the first record not settled, which is read again after the reconnect).
async fn partition(
    ctx: &Ctx<'_>,
    p: i32,
    client: PartitionClient,
    stop: &CancellationToken,
) -> Result<(), String> {
    let cfg = ctx.cfg;
    let topic = cfg.topic.as_str();
    let bound = ctx.request_bound();
    let stored = ctx
        .offsets
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(topic, p);
    let mut next = match stored {
        Some(o) => o,
        None => {
            let o = tokio::select! {
                r = start_offset(&client, cfg.start, bound) => r?,
                _ = stop.cancelled() => return Ok(()),
            };
            tracing::info!(downlink = %cfg.name, topic, partition = p, offset = o, start = ?cfg.start, "no stored offset; starting there");
            ctx.set_offset(p, o);
            o
        }
    };
    let max_wait_ms = i32::try_from(cfg.max_wait.as_millis()).unwrap_or(i32::MAX);
    let fetch_bytes = i32::try_from(cfg.fetch_bytes).unwrap_or(i32::MAX);
    // The last append of this partition: the next one is refused once it failed.
    let mut after: Option<AppendMarker> = None;
    loop {
        let began = tokio::time::Instant::now();
        let fetched = tokio::select! {
            r = tokio::time::timeout(bound, client.fetch_records(next, 1..fetch_bytes, max_wait_ms)) => r,
            _ = stop.cancelled() => return Ok(()),
        };
        let records = match fetched {
            Err(_) => {
                return Err(format!(
                    "fetch {topic}/{p} at offset {next}: no answer within {bound:?}"
                ))
            }
            Ok(Err(KafkaError::ServerError {
                protocol_error: ProtocolError::OffsetOutOfRange,
                ..
            })) => {
                let o = tokio::select! {
                    r = reset_offset(&client, next, cfg.start, bound) => r?,
                    _ = stop.cancelled() => return Ok(()),
                };
                tracing::warn!(downlink = %cfg.name, topic, partition = p, from = next, to = o, "the broker no longer has the stored offset (retention, or the topic was re-created); moved on");
                next = o;
                ctx.set_offset(p, next);
                continue;
            }
            Ok(Err(e)) => return Err(format!("fetch {topic}/{p} at offset {next}: {e}")),
            Ok(Ok((records, _high_watermark))) => records,
        };
        if records.is_empty() {
            // A broker that answers an empty fetch before `max_wait` would make this a busy
            // loop: wait out the rest of it here.
            tokio::select! {
                _ = tokio::time::sleep_until(began + cfg.max_wait) => {}
                _ = stop.cancelled() => return Ok(()),
            }
            continue;
        }
        let mut taken: Vec<(i64, Taken)> = Vec::with_capacity(records.len());
        // Why the batch stopped short: Some(None) on stop, Some(Some(why)) on a failure.
        let mut cut: Option<Option<String>> = None;
        for r in records {
            if r.offset < next {
                continue;
            }
            ctx.stats.consumed.fetch_add(1, Ordering::Relaxed);
            let (upstream, command) = command_of(cfg, p, r.offset, &r.record);
            let command = match command {
                Ok(c) => c,
                Err(why) => match dead_letter(ctx, p, r.offset, &r.record, &upstream, &why).await {
                    Ok(()) => {
                        taken.push((r.offset, Taken::Done));
                        continue;
                    }
                    Err(e) => {
                        cut = Some(Some(e));
                        break;
                    }
                },
            };
            let id = command
                .message_id
                .clone()
                .unwrap_or_else(|| format!("{topic}:{p}:{}", r.offset));
            if ctx.seen(&id) {
                ctx.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(downlink = %cfg.name, message_id = %id, "command read again, already stored; skipped");
                taken.push((r.offset, Taken::Done));
                continue;
            }
            match append(ctx, &command, after.as_ref(), stop).await {
                Ok(pending) => {
                    after = Some(pending.marker());
                    taken.push((r.offset, Taken::Stored(pending, id)));
                }
                Err(AppendFailed::Stopped) => {
                    ctx.forget(&id);
                    cut = Some(None);
                    break;
                }
                Err(AppendFailed::Unstorable(e)) => {
                    ctx.forget(&id);
                    let why = format!("the command store cannot take it: {e}");
                    match dead_letter(ctx, p, r.offset, &r.record, &upstream, &why).await {
                        Ok(()) => taken.push((r.offset, Taken::Done)),
                        Err(e) => {
                            cut = Some(Some(e));
                            break;
                        }
                    }
                }
                Err(AppendFailed::Failed(e)) => {
                    ctx.forget(&id);
                    cut = Some(Some(format!("store a command of {topic}/{p}: {e}")));
                    break;
                }
            }
        }
        // Settle in offset order: the offset passes a record only once it and every record
        // before it are settled.
        let mut failed: Option<String> = None;
        for (offset, t) in taken {
            match t {
                Taken::Done if failed.is_none() => {
                    next = offset + 1;
                    ctx.stats.acked.fetch_add(1, Ordering::Relaxed);
                }
                Taken::Done => {}
                Taken::Stored(pending, id) => {
                    if failed.is_some() {
                        // Appended after a failed one: refused or failed with it.
                        ctx.forget(&id);
                        continue;
                    }
                    match pending.durable().await {
                        Ok(_) => {
                            next = offset + 1;
                            ctx.stats.stored.fetch_add(1, Ordering::Relaxed);
                            ctx.stats.acked.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            ctx.forget(&id);
                            failed = Some(format!("store a command of {topic}/{p}: {e}"));
                        }
                    }
                }
            }
        }
        ctx.set_offset(p, next);
        if let Some(why) = failed.or(cut.clone().flatten()) {
            return Err(why);
        }
        if cut.is_some() {
            return Ok(());
        }
    }
}

enum AppendFailed {
    /// Stopped while waiting for room.
    Stopped,
    /// The command can never be stored (too large for a segment): a dead letter.
    Unstorable(QueueError),
    /// The store failed (I/O, closed): read it again later.
    Failed(QueueError),
}

/// Appends `command`, waiting for room while the store is full (paused, counted).
async fn append(
    ctx: &Ctx<'_>,
    command: &Command,
    after: Option<&AppendMarker>,
    stop: &CancellationToken,
) -> Result<PendingAppend, AppendFailed> {
    loop {
        match ctx
            .store
            .try_append_after(&command.record(ctx.origin, SystemTime::now()), after)
        {
            Ok(p) => return Ok(p),
            Err(QueueError::Full { .. }) => {
                ctx.stats.backpressure.fetch_add(1, Ordering::Relaxed);
                ctx.stats.set_state(DownlinkState::Paused);
                tokio::select! {
                    _ = ctx.store.wait_for_space() => {}
                    _ = stop.cancelled() => return Err(AppendFailed::Stopped),
                }
                ctx.stats.set_state(DownlinkState::Consuming);
            }
            Err(QueueError::Closed) => return Err(AppendFailed::Stopped),
            Err(e @ QueueError::Encode(_)) => return Err(AppendFailed::Unstorable(e)),
            Err(e) => return Err(AppendFailed::Failed(e)),
        }
    }
}

/// Puts a record that cannot be a command in the dead letters (durable when `Ok`), counted.
async fn dead_letter(
    ctx: &Ctx<'_>,
    p: i32,
    offset: i64,
    r: &KafkaRecord,
    m: &Upstream,
    why: &str,
) -> Result<(), String> {
    let cfg = ctx.cfg;
    let mut source = vec![
        ("kafka_topic".to_string(), cfg.topic.clone()),
        ("kafka_partition".to_string(), p.to_string()),
        ("kafka_offset".to_string(), offset.to_string()),
    ];
    if let Some(k) = &r.key {
        source.push(("kafka_key".into(), String::from_utf8_lossy(k).into_owned()));
    }
    let topic = map::expand(&cfg.command.topic, &m.routing_key);
    tracing::warn!(downlink = %cfg.name, topic = %cfg.topic, partition = p, offset, reason = %why, "record is not a command; dead-lettered");
    super::reject(ctx.dead, ctx.origin, m, source, topic, why)
        .await
        .map_err(|e| format!("dead-letter {}/{p} offset {offset}: {e}", cfg.topic))?;
    ctx.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// The transport-neutral view of a record, and the command it makes (or why none).
pub fn command_of(
    cfg: &KafkaDownlinkConfig,
    partition: i32,
    offset: i64,
    r: &KafkaRecord,
) -> (Upstream, Result<Command, String>) {
    let headers: Vec<(String, HeaderValue)> = r
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), HeaderValue::Bytes(v.clone())))
        .collect();
    let header = |name: &str| r.headers.get(name);
    let key = r.key.as_deref().map(std::str::from_utf8);
    let mut upstream = Upstream {
        routing_key: match key {
            Some(Ok(k)) => k.to_string(),
            _ => String::new(),
        },
        headers,
        message_id: None,
        payload: r.value.clone().unwrap_or_default(),
        ..Upstream::default()
    };
    let message_id = match header("message_id") {
        Some(v) => match std::str::from_utf8(v) {
            Ok(id) if !id.is_empty() => Ok(id.to_string()),
            _ => Err("header message_id is not UTF-8 text".to_string()),
        },
        None => Ok(format!("{}:{partition}:{offset}", cfg.topic)),
    };
    let id = match message_id {
        Ok(id) => id,
        Err(why) => return (upstream, Err(why)),
    };
    upstream.message_id = Some(id);
    if header("mqtt_topic").is_none() {
        match key {
            Some(Err(_)) => {
                return (
                    upstream,
                    Err("the record key is not UTF-8 text (and there is no mqtt_topic header)"
                        .into()),
                )
            }
            None | Some(Ok("")) if cfg.command.topic.contains('{') => {
                return (
                    upstream,
                    Err(format!(
                        "the record has no key and no mqtt_topic header: the topic template {:?} needs the key",
                        cfg.command.topic
                    )),
                )
            }
            _ => {}
        }
    }
    let command = map::map(&cfg.command, &upstream);
    (upstream, command)
}

async fn start_offset(
    client: &PartitionClient,
    start: KafkaStart,
    bound: Duration,
) -> Result<i64, String> {
    let at = match start {
        KafkaStart::Earliest => OffsetAt::Earliest,
        KafkaStart::Latest => OffsetAt::Latest,
    };
    let topic = client.topic();
    let p = client.partition();
    tokio::time::timeout(bound, client.get_offset(at))
        .await
        .map_err(|_| format!("{topic}/{p}: no offset within {bound:?}"))?
        .map_err(|e| format!("{topic}/{p}: list offsets: {e}"))
}

/// Where to go on when `next` is out of the broker's range: the earliest offset it still
/// has if `next` is below it (records deleted by retention are gone), else `start`.
async fn reset_offset(
    client: &PartitionClient,
    next: i64,
    start: KafkaStart,
    bound: Duration,
) -> Result<i64, String> {
    let earliest = start_offset(client, KafkaStart::Earliest, bound).await?;
    if next < earliest {
        return Ok(earliest);
    }
    start_offset(client, start, bound).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, DownlinkConfig};
    use std::collections::BTreeMap;

    fn cfg(extra: &str) -> KafkaDownlinkConfig {
        let c = Config::from_toml_str(&format!(
            "[[downlinks]]\nname = \"k\"\ntype = \"kafka\"\nbootstrap = [\"127.0.0.1:9092\"]\ntopic = \"commands\"\n{extra}"
        ))
        .expect("config");
        match &c.downlinks[0] {
            DownlinkConfig::Kafka(k) => k.clone(),
            other => panic!("{other:?}"),
        }
    }

    fn record(key: Option<&str>, headers: &[(&str, &[u8])], value: &[u8]) -> KafkaRecord {
        KafkaRecord {
            key: key.map(|k| k.as_bytes().to_vec()),
            value: Some(value.to_vec()),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_vec()))
                .collect::<BTreeMap<_, _>>(),
            timestamp: rskafka::chrono::DateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn the_key_names_the_device_and_headers_carry_mqtt5_properties() {
        let c = cfg("");
        let (_, cmd) = command_of(&c, 0, 7, &record(Some("dev-1"), &[], b"hi"));
        let cmd = cmd.expect("a command");
        assert_eq!(cmd.topic, "devices/dev-1/commands");
        assert_eq!(cmd.message_id.as_deref(), Some("commands:0:7"));
        assert_eq!(cmd.payload, b"hi");
        let (_, cmd) = command_of(
            &c,
            1,
            8,
            &record(
                Some("dev-1"),
                &[
                    ("mqtt_topic", b"devices/dev-1/commands/ping"),
                    ("message_id", b"m-1"),
                    ("mqtt_correlation_data", b"\x00\x01"),
                    ("mqtt_response_topic", b"devices/dev-1/replies"),
                    ("content_type", b"application/json"),
                    ("mqtt_message_expiry", b"30"),
                    ("mqtt_qos", b"2"),
                    ("site", b"north"),
                ],
                b"{}",
            ),
        );
        let cmd = cmd.expect("a command");
        assert_eq!(cmd.topic, "devices/dev-1/commands/ping");
        assert_eq!(cmd.message_id.as_deref(), Some("m-1"));
        assert_eq!(cmd.correlation_data.as_deref(), Some(&b"\x00\x01"[..]));
        assert_eq!(cmd.response_topic.as_deref(), Some("devices/dev-1/replies"));
        assert_eq!(cmd.content_type.as_deref(), Some("application/json"));
        assert_eq!(cmd.message_expiry, Some(30));
        assert_eq!(cmd.qos, 2);
        assert_eq!(
            cmd.user_properties,
            vec![
                ("message_id".to_string(), "m-1".to_string()),
                ("site".to_string(), "north".to_string())
            ]
        );
    }

    #[test]
    fn records_that_cannot_be_commands_say_why() {
        let c = cfg("");
        let why = |r: KafkaRecord| command_of(&c, 0, 1, &r).1.expect_err("refused");
        assert!(why(record(None, &[], b"x")).contains("no key"));
        assert!(why(record(Some(""), &[], b"x")).contains("no key"));
        let mut r = record(None, &[], b"x");
        r.key = Some(vec![0xff]);
        assert!(why(r).contains("not UTF-8"));
        assert!(why(record(Some("d"), &[("message_id", b"\xff")], b"x")).contains("message_id"));
        assert!(why(record(Some("a/b"), &[], b"x")).contains("allowed_topics"));
        assert!(why(record(Some("d+"), &[], b"x")).contains("not a valid MQTT topic"));
        // With a header the key is not needed.
        let r = record(None, &[("mqtt_topic", b"devices/d/commands/x")], b"x");
        assert!(command_of(&c, 0, 1, &r).1.is_ok());
    }

    #[test]
    fn the_template_is_mqtt_topic_and_topic_is_the_kafka_topic() {
        let c = cfg("mqtt_topic = \"devices/{key[0]}/commands/{key[1]}\"\nstart = \"latest\"");
        assert_eq!(c.topic, "commands");
        assert_eq!(c.start, KafkaStart::Latest);
        let (_, cmd) = command_of(&c, 0, 1, &record(Some("d1.reboot"), &[], b""));
        assert_eq!(cmd.expect("command").topic, "devices/d1/commands/reboot");
    }
}
