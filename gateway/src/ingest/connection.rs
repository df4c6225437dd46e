//! One device connection: reads bytes, feeds the session state machine, performs its actions.
//!
//! Two tasks per connection. The reader decodes packets and appends publishes to the queue. The
//! writer owns the socket's write half and sends what the reader queues for it, in order: for a
//! QoS 1/2 publish that is "wait until the append is durable, then PUBACK/PUBREC", so acks leave
//! in the order the publishes arrived and never before the record is on disk. The channel
//! between them is bounded: when a device has `receive_maximum` publishes waiting for the disk,
//! the reader stops reading its socket (TCP flow control slows the device down).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::codec::{self, reason, DecodeError, OutPublish, Outbound, Version};
use super::session::{Action, Message, Refusal, Session, SubscriberAck};
use super::Shared;
use crate::queue::{NewRecord, PendingAppend, QueueError};
use crate::sessions::outbox::Send as Delivery;
use crate::sessions::{Slot, SubOptions};

/// The connection's session and its registration id, set once the CONNACK is queued (the writer
/// sends deliveries from it while the connection owns it).
type SlotCell = Arc<std::sync::OnceLock<(Arc<Slot>, u64)>>;

/// The reason string of a refusal because the message could not be stored.
const STORE_FAILED: &str = "could not store the message";
/// The reason string of a refusal over `[limits] publish_rate` / `publish_bytes_rate`.
const RATE_TOO_HIGH: &str = "message rate too high ([limits] publish_rate / publish_bytes_rate)";
/// How long a new subscription waits for the router to keep the retained publishes already
/// acknowledged (normally well under a millisecond; longer only when the router lags).
const RETAINED_SETTLE_BOUND: Duration = Duration::from_secs(1);

/// What the reader hands the writer.
enum Out {
    Packet(Outbound),
    /// Send `ack` once `pending` is durable.
    AfterDurable {
        pending: PendingAppend,
        ack: Option<Outbound>,
    },
    Close,
}

/// Runs a connection to the end. `cert_identity`: from a verified client certificate.
pub(crate) async fn serve<S>(
    stream: S,
    peer: std::net::SocketAddr,
    cert_identity: Option<String>,
    shared: Arc<Shared>,
    deadline: Instant,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    let policy_gen = shared.policy_generation();
    let policy = shared.policy();
    let (tx, rx) = mpsc::channel(usize::from(policy.limits().receive_maximum) + 8);
    let version = Arc::new(std::sync::OnceLock::new());
    let reason_strings = Arc::new(AtomicBool::new(false));
    let acks_sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let slot = SlotCell::default();
    let writer = tokio::spawn(write_loop(
        wr,
        rx,
        version.clone(),
        reason_strings.clone(),
        shared.clone(),
        acks_sent.clone(),
        slot.clone(),
    ));
    let limiter = super::rate::PublishLimiter::new(policy.limits(), tokio::time::Instant::now());
    let mut conn = Conn {
        session: Session::new(policy.session_limits()),
        policy,
        policy_gen,
        shared: shared.clone(),
        tx,
        version,
        reason_strings,
        cert_identity,
        registered: None,
        taken_over: Arc::new(Notify::new()),
        owner: None,
        peer,
        connect_deadline: deadline,
        limiter,
        shutdown: shutdown.clone(),
        acks_sent,
        last_append: None,
        slot,
        client_receive_maximum: None,
        starting: None,
        retained_after_suback: Vec::new(),
    };
    let span = tracing::debug_span!("conn", %peer);
    tracing::Instrument::instrument(
        async {
            conn.read_loop(rd, deadline, shutdown).await;
            conn.finish().await;
        },
        span,
    )
    .await;
    drop(conn);
    let _ = writer.await;
}

struct Conn {
    session: Session,
    /// The policy in force, as of `policy_gen` (see [`Conn::refresh_policy`]).
    policy: Arc<super::Policy>,
    policy_gen: u64,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Out>,
    version: Arc<std::sync::OnceLock<Version>>,
    /// Whether refusals may carry a reason string (MQTT 5, the client did not ask for none and
    /// one fits its maximum packet size); set with the CONNACK, read by the writer.
    reason_strings: Arc<AtomicBool>,
    cert_identity: Option<String>,
    /// (client id, registration id) once connected.
    registered: Option<(String, u64)>,
    taken_over: Arc<Notify>,
    /// The authenticated identity's `Identity::owner`, once authenticated.
    owner: Option<String>,
    /// The device's address (per-address login limits).
    peer: std::net::SocketAddr,
    /// When TLS handshake plus CONNECT must be done (`connect_timeout`).
    connect_deadline: Instant,
    /// This connection's publish rate limits (`[limits] publish_rate`, ...).
    limiter: super::rate::PublishLimiter,
    shutdown: CancellationToken,
    /// Acks the writer has put on the wire (for the receive maximum).
    acks_sent: Arc<std::sync::atomic::AtomicU64>,
    /// This connection's latest append: once it failed, later publishes are refused too, so
    /// the device's records are stored in the order it sent them or not at all.
    last_append: Option<crate::queue::AppendMarker>,
    slot: SlotCell,
    client_receive_maximum: Option<u16>,
    /// The session started for this connection, until its CONNACK is queued; and whether it
    /// was resumed.
    starting: Option<(Arc<Slot>, bool)>,
    /// Subscriptions of the SUBSCRIBE being answered whose retained messages go out after its
    /// SUBACK: (filter, options, retain handling, new).
    retained_after_suback: Vec<(String, SubOptions, u8, bool)>,
}

enum Step {
    Continue,
    Stop,
}

impl Conn {
    async fn read_loop<R: AsyncRead + Unpin>(
        &mut self,
        mut rd: R,
        connect_deadline: Instant,
        shutdown: CancellationToken,
    ) {
        let max_packet = self.policy.limits().max_packet_size as usize;
        let mut buf = BytesMut::with_capacity(4096);
        loop {
            // Everything complete in the buffer first.
            loop {
                match codec::decode(&mut buf, self.session.version(), max_packet) {
                    Ok(Some(packet)) => {
                        self.session
                            .acks_sent(self.acks_sent.load(Ordering::Acquire));
                        self.refresh_policy();
                        let acts = self.session.on_packet(packet, self.policy.acl());
                        if let Step::Stop = self.perform(acts).await {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "bad packet from device");
                        let too_large = matches!(e, DecodeError::TooLarge { .. });
                        let acts = self.session.on_decode_error(too_large);
                        let _ = self.perform(acts).await;
                        return;
                    }
                }
            }
            let timeout = if self.session.is_connected() {
                match self.session.keep_alive() {
                    ka if ka.is_zero() => None,
                    ka => Some(ka + ka / 2),
                }
            } else {
                Some(connect_deadline.saturating_duration_since(Instant::now()))
            };
            let read = async {
                match timeout {
                    Some(t) => tokio::time::timeout(t, rd.read_buf(&mut buf)).await.ok(),
                    None => Some(rd.read_buf(&mut buf).await),
                }
            };
            tokio::select! {
                r = read => match r {
                    None => {
                        let acts = if self.session.is_connected() {
                            self.session.on_keep_alive_expired()
                        } else {
                            self.shared.stats.refused("timeout");
                            vec![Action::Close { publish_will: false }]
                        };
                        let _ = self.perform(acts).await;
                        return;
                    }
                    Some(Ok(0)) | Some(Err(_)) => return, // peer closed or reset
                    Some(Ok(_)) => {}
                },
                _ = self.taken_over.notified() => {
                    let acts = self.session.on_taken_over();
                    let _ = self.perform(acts).await;
                    return;
                }
                _ = shutdown.cancelled() => {
                    let acts = self.session.on_shutdown();
                    let _ = self.perform(acts).await;
                    return;
                }
            }
        }
    }

    /// Takes up a reloaded policy: one atomic load per packet, the lock only after a reload.
    fn refresh_policy(&mut self) {
        let generation = self.shared.policy_generation();
        if generation != self.policy_gen {
            self.policy = self.shared.policy();
            self.policy_gen = generation;
            self.limiter
                .configure(self.policy.limits(), tokio::time::Instant::now());
        }
    }

    /// Holds a publish to `publish_rate` / `publish_bytes_rate`: `Ok(ack)` once it may be
    /// stored, `Err(step)` when it was refused. Over the rate an MQTT 5 device is told 0x97
    /// "message rate too high" and the message is not stored; a 3.1.1 device is slowed
    /// instead: its socket is not read while it waits for the tokens.
    async fn rate_limit(
        &mut self,
        m: &Message,
        ack: Option<Outbound>,
    ) -> Result<Option<Outbound>, Step> {
        if !self.limiter.is_on() {
            return Ok(ack);
        }
        let v5 = self.session.version() == Some(Version::V5);
        let mut delayed = false;
        loop {
            // A reload during the wait applies to it.
            self.refresh_policy();
            let wait = match self
                .limiter
                .try_take(m.payload.len(), tokio::time::Instant::now())
            {
                Ok(()) => return Ok(ack),
                Err(wait) => wait,
            };
            if v5 {
                self.shared.stats.refused("rate");
                // 0x96 "message rate too high" is a DISCONNECT reason only: MQTT 5 does not
                // allow it in PUBACK/PUBREC, and clients (rumqttc among them) reject the
                // packet. 0x97 is the ack's code for "slow down"; the reason string says why.
                return Err(self
                    .refuse(ack, reason::QUOTA_EXCEEDED, RATE_TOO_HIGH)
                    .await);
            }
            if !delayed {
                delayed = true;
                self.shared
                    .stats
                    .publishes_delayed
                    .fetch_add(1, Ordering::Relaxed);
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.shutdown.cancelled() => {
                    // Not stored, not acknowledged: the device resends to whoever runs next.
                    let _ = self.send(Out::Close).await;
                    return Err(Step::Stop);
                }
            }
        }
    }

    async fn send(&self, out: Out) -> bool {
        self.tx.send(out).await.is_ok()
    }

    async fn perform(&mut self, actions: Vec<Action>) -> Step {
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(a) = queue.pop_front() {
            match a {
                Action::Send(mut p) => {
                    if let Some(v) = self.session.version() {
                        let _ = self.version.set(v);
                    }
                    if matches!(p, Outbound::ConnAck { code: 0, .. }) {
                        let probe = Outbound::PubAck {
                            pkid: 1,
                            reason: reason::UNSPECIFIED,
                        };
                        let with = self.session.with_reason(probe, STORE_FAILED);
                        self.reason_strings.store(
                            matches!(with, Outbound::WithReason { .. }),
                            Ordering::Relaxed,
                        );
                    }
                    let starting = match &mut p {
                        Outbound::ConnAck {
                            code: 0,
                            session_present,
                            ..
                        } => {
                            let s = self.starting.take();
                            *session_present = s.as_ref().is_some_and(|(_, present)| *present);
                            s
                        }
                        _ => None,
                    };
                    if !self.send(Out::Packet(p)).await {
                        return Step::Stop;
                    }
                    // Deliveries (and a resumed session's resends) go out after the CONNACK.
                    if let (Some((slot, _)), Some((_, reg))) = (starting, &self.registered) {
                        let _ = self.slot.set((slot.clone(), *reg));
                        slot.wake.notify_one();
                    }
                    if !self.retained_after_suback.is_empty() {
                        self.send_retained().await;
                    }
                }
                Action::StartSession {
                    clean_start,
                    expiry_secs,
                } => {
                    if let Some((id, reg)) = &self.registered {
                        self.starting = Some(self.shared.sessions.attach_as(
                            id,
                            *reg,
                            self.owner.as_deref(),
                            clean_start,
                            expiry_secs,
                            self.client_receive_maximum,
                        ));
                    }
                }
                Action::Authenticate(c) => {
                    self.client_receive_maximum = c.client_receive_maximum;
                    let result = self.authenticate(&c).await;
                    let result = self.check_owner(&c, result);
                    self.refresh_policy();
                    let mut more = self.session.authenticated(result, self.policy.acl());
                    if self.session.is_connected() && !self.register() {
                        // Lost a race with a connection of another identity: no CONNACK.
                        let id = self.session.client_id().unwrap_or_default().to_string();
                        self.refused_takeover(&id, "another identity");
                        self.shared.stats.refused(Refusal::ClientId.as_label());
                        let _ = self.session.take_will();
                        more = vec![Action::Close {
                            publish_will: false,
                        }];
                    }
                    more.extend(queue.drain(..));
                    queue = more.into();
                }
                Action::Append { message, ack } => {
                    if let Step::Stop = self.append(*message, ack).await {
                        return Step::Stop;
                    }
                }
                Action::Refused(r) => self.shared.stats.refused(r.as_label()),
                Action::Subscribe(subs) => {
                    let mut last = None;
                    if let Some((slot, _)) = self.slot.get() {
                        for s in subs {
                            let options = SubOptions {
                                qos: s.qos,
                                no_local: s.no_local,
                                retain_as_published: s.retain_as_published,
                                id: s.subscription_id,
                            };
                            let (existed, p) =
                                self.shared.sessions.subscribe(slot, &s.filter, options);
                            last = p.or(last);
                            self.retained_after_suback.push((
                                s.filter,
                                options,
                                s.retain_handling,
                                !existed,
                            ));
                        }
                    }
                    // A persistent session's subscriptions are durable before the SUBACK.
                    if let Some(p) = last {
                        if let Err(error) = p.durable().await {
                            tracing::warn!(%error, "could not store a subscription");
                        }
                    }
                }
                Action::Unsubscribe { pkid, filters } => {
                    let mut last = None;
                    let mut codes = Vec::with_capacity(filters.len());
                    for f in &filters {
                        let existed = match self.slot.get() {
                            Some((slot, _)) => {
                                let (existed, p) = self.shared.sessions.unsubscribe(slot, f);
                                last = p.or(last);
                                existed
                            }
                            None => false,
                        };
                        codes.push(if existed {
                            reason::SUCCESS
                        } else {
                            reason::NO_SUBSCRIPTION_EXISTED
                        });
                    }
                    if let Some(p) = last {
                        if let Err(error) = p.durable().await {
                            tracing::warn!(%error, "could not store an unsubscribe");
                        }
                    }
                    if !self
                        .send(Out::Packet(Outbound::UnsubAck { pkid, codes }))
                        .await
                    {
                        return Step::Stop;
                    }
                }
                Action::Delivered(ack) => {
                    if let Step::Stop = self.delivered(ack).await {
                        return Step::Stop;
                    }
                }
                Action::Close { publish_will } => {
                    if publish_will {
                        self.publish_will().await;
                    }
                    let _ = self.send(Out::Close).await;
                    return Step::Stop;
                }
            }
        }
        Step::Continue
    }

    /// The retained messages of the subscriptions just acknowledged.
    async fn send_retained(&mut self) {
        let Some((slot, _)) = self.slot.get() else {
            self.retained_after_suback.clear();
            return;
        };
        // A retained publish acknowledged just before is kept by the router a moment later:
        // wait for it, so a subscriber gets the newest retained message.
        if !self.retained_after_suback.is_empty() {
            self.shared
                .sessions
                .retained_settled(RETAINED_SETTLE_BOUND)
                .await;
        }
        let mut last = None;
        for (filter, options, handling, new) in std::mem::take(&mut self.retained_after_suback) {
            let p = self
                .shared
                .sessions
                .send_retained(slot, &filter, options, handling, new);
            last = p.or(last);
        }
        if let Some(p) = last {
            let seq = p.seq();
            if let Err(error) = p.durable().await {
                tracing::warn!(%error, "could not store retained messages for a persistent session");
            }
            // Held until stored (delivered from memory if storing failed).
            slot.stored_through(seq);
        }
        slot.wake.notify_one();
    }

    /// An ack from the client for a publish we sent it. An ack for nothing in flight (late,
    /// repeated, or made up) changes nothing.
    async fn delivered(&mut self, ack: SubscriberAck) -> Step {
        let Some((slot, _)) = self.slot.get() else {
            return Step::Continue;
        };
        let result = match ack {
            SubscriberAck::PubAck(pkid) => slot.on_done(pkid, false).map(|()| None),
            SubscriberAck::PubRec(pkid) => slot.on_pubrec(pkid).map(Some),
            SubscriberAck::PubComp(pkid) => slot.on_done(pkid, true).map(|()| None),
        };
        match result {
            Ok(Some((Delivery::PubRel { pkid }, stored))) => {
                // Stored before the PUBREL: after a restart only PUBREL goes again.
                if let Some(p) = stored {
                    if let Err(error) = p.durable().await {
                        tracing::warn!(%error, "could not store a PUBREC");
                    }
                }
                if !self.send(Out::Packet(Outbound::PubRel { pkid })).await {
                    return Step::Stop;
                }
            }
            // Room in flight again: the writer sends what waits.
            Ok(_) => slot.wake.notify_one(),
            Err(unknown) => {
                tracing::debug!(pkid = unknown.0, ?ack, "ack for no publish in flight");
            }
        }
        Step::Continue
    }

    async fn authenticate(&self, c: &codec::Connect) -> Result<super::session::Identity, u8> {
        let policy = self.shared.policy();
        let cert = self.cert_identity.clone();
        let checks_password = cert.is_none() && c.username.is_some() && c.password.is_some();
        if !checks_password {
            // A certificate, or anonymous: nothing to guess, no argon2, no wait.
            return policy.authenticate(c, cert.as_deref());
        }
        let ip = self.peer.ip();
        let limits = policy.limits();
        let now = tokio::time::Instant::now();
        if !self.shared.addresses().begin_password(ip, now, limits) {
            if let Some(left_out) = self.shared.stats.login_throttle_log.admit() {
                tracing::warn!(
                    address = %ip,
                    similar_left_out = left_out,
                    "password CONNECT refused unchecked: too many failed logins from this address ([limits] failed_login_burst / failed_login_interval)"
                );
            }
            return Err(reason::CONNECTION_RATE_EXCEEDED);
        }
        let permit = {
            let waiting = &self.shared.waiting_password_checks;
            if waiting.fetch_add(1, Ordering::AcqRel) >= super::MAX_WAITING_PASSWORD_CHECKS {
                waiting.fetch_sub(1, Ordering::AcqRel);
                self.not_checked(ip, limits);
                return Err(reason::SERVER_BUSY);
            }
            // argon2 costs tens of ms and ~19 MiB: a permit per core, off the async workers,
            // and no longer than the CONNECT may take.
            let deadline = tokio::time::Instant::from_std(self.connect_deadline);
            let permit =
                tokio::time::timeout_at(deadline, self.shared.auth_permits.acquire()).await;
            waiting.fetch_sub(1, Ordering::AcqRel);
            match permit {
                Ok(Ok(p)) => p,
                _ => {
                    self.not_checked(ip, limits);
                    return Err(reason::SERVER_BUSY);
                }
            }
        };
        self.shared
            .stats
            .password_checks
            .fetch_add(1, Ordering::Relaxed);
        let c = c.clone();
        let p = policy.clone();
        let result = tokio::task::spawn_blocking(move || p.authenticate(&c, None))
            .await
            .unwrap_or(Err(reason::SERVER_BUSY));
        drop(permit);
        // A wrong password keeps the token it took; anything else gives it back.
        if result != Err(reason::BAD_USER_OR_PASSWORD) {
            self.not_checked(ip, limits);
        }
        result
    }

    /// Gives back the failed-login token a password CONNECT took (see `abuse`).
    fn not_checked(&self, ip: std::net::IpAddr, limits: &crate::config::LimitsConfig) {
        self.shared
            .addresses()
            .password_ok(ip, tokio::time::Instant::now(), limits);
    }

    /// Refuses an authenticated CONNECT whose client id's session (connected or kept) belongs
    /// to another identity, and logs every client id refusal. The connected device stays.
    fn check_owner(
        &mut self,
        c: &codec::Connect,
        result: Result<super::session::Identity, u8>,
    ) -> Result<super::session::Identity, u8> {
        match result {
            Ok(ident) => {
                let owner = ident.owner();
                if let Some(other) = self.shared.owned_by_another(&ident.client_id, &owner) {
                    self.refused_takeover(&ident.client_id, &other);
                    return Err(reason::CLIENT_ID_NOT_VALID);
                }
                tracing::debug!(client_id = %ident.client_id, identity = %ident.name, "authenticated");
                self.owner = Some(owner);
                Ok(ident)
            }
            Err(reason::CLIENT_ID_NOT_VALID) => {
                tracing::warn!(
                    client_id = %c.client_id,
                    username = c.username.as_deref().unwrap_or(""),
                    certificate = self.cert_identity.as_deref().unwrap_or(""),
                    "CONNECT refused: this identity does not own the client id \
                     ([auth] client_id for password logins, client_id_must_match for certificates)"
                );
                Err(reason::CLIENT_ID_NOT_VALID)
            }
            Err(code) => Err(code),
        }
    }

    fn refused_takeover(&self, client_id: &str, owner: &str) {
        self.shared
            .stats
            .takeovers_refused
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            %client_id,
            session_owner = %owner,
            "CONNECT refused: the session of this client id belongs to another identity; \
             the device connected under it stays connected"
        );
    }

    fn register(&mut self) -> bool {
        let Some(id) = self.session.client_id().map(str::to_string) else {
            return true;
        };
        let owner = self.owner.clone().unwrap_or_default();
        let reg = self.shared.next_reg.fetch_add(1, Ordering::Relaxed);
        let previous = {
            let mut map = self
                .shared
                .registry
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if map.get(&id).is_some_and(|r| r.owner != owner) {
                return false;
            }
            map.insert(
                id.clone(),
                super::Registration {
                    reg,
                    taken_over: self.taken_over.clone(),
                    owner,
                },
            )
        };
        if let Some(old) = previous {
            tracing::info!(client_id = %id, "session taken over by a new connection");
            self.shared.stats.takeovers.fetch_add(1, Ordering::Relaxed);
            old.taken_over.notify_one();
        }
        self.shared.stats.connected.fetch_add(1, Ordering::Relaxed);
        self.registered = Some((id, reg));
        true
    }

    /// Appends a message, holding the device back while the queue is full (backpressure).
    async fn append(&mut self, m: Message, ack: Option<Outbound>) -> Step {
        self.shared.stats.publishes[usize::from(m.qos.min(2))].fetch_add(1, Ordering::Relaxed);
        let ack = match self.rate_limit(&m, ack).await {
            Ok(ack) => ack,
            Err(step) => return step,
        };
        let v5 = self.session.version() == Some(Version::V5);
        // Read only when the queue is full: the common path takes no lock for it.
        let mut quota_deadline = None;
        let queue = self.shared.queue.clone();
        loop {
            let notified = queue.wait_for_space();
            let rec = record_of(&m);
            match queue.try_append_after(&rec, self.last_append.as_ref()) {
                Ok(pending) => {
                    if m.retain {
                        self.shared.sessions.note_retained(pending.seq());
                    }
                    self.last_append = Some(pending.marker());
                    return if self.send(Out::AfterDurable { pending, ack }).await {
                        Step::Continue
                    } else {
                        Step::Stop
                    };
                }
                Err(QueueError::Full { .. }) => {
                    // Not reading the socket while we wait: the device is slowed by TCP.
                    let now = Instant::now();
                    let quota_deadline = *quota_deadline
                        .get_or_insert_with(|| now + self.shared.policy().limits().quota_wait);
                    if v5 && now >= quota_deadline {
                        self.shared.stats.refused("quota");
                        return self.refuse(ack, reason::QUOTA_EXCEEDED, "queue full").await;
                    }
                    let wait = if v5 {
                        quota_deadline.saturating_duration_since(now)
                    } else {
                        Duration::from_secs(1)
                    };
                    tokio::select! {
                        _ = tokio::time::timeout(wait, notified) => {}
                        _ = self.shutdown.cancelled() => {
                            // Not stored, not acknowledged: the device resends to whoever runs next.
                            let _ = self.send(Out::Close).await;
                            return Step::Stop;
                        }
                    }
                }
                Err(e) => {
                    self.shared.stats.warn_append_failed(
                        &e,
                        "append failed; the device gets no acknowledgement",
                    );
                    self.shared.stats.refused(e.as_label());
                    if self.last_append.as_ref().is_some_and(|m| m.failed()) {
                        // An earlier publish of this connection failed: nothing after it may be
                        // stored before it is. Close, so the device resends in order (a
                        // negative ack here would make most MQTT 5 clients drop the message).
                        let _ = self.send(Out::Close).await;
                        return Step::Stop;
                    }
                    return self.refuse(ack, reason::UNSPECIFIED, STORE_FAILED).await;
                }
            }
        }
    }

    /// The message was not stored: MQTT 5 is told with a reason code; 3.1.1 cannot be told, so
    /// its connection is closed (the device resends after reconnecting).
    async fn refuse(&mut self, ack: Option<Outbound>, code: u8, why: &str) -> Step {
        if ack.is_some() {
            // The refusal takes the place of the ack the session counted as in flight.
            self.acks_sent.fetch_add(1, Ordering::Release);
        }
        if let Some(Outbound::PubRec { pkid, .. }) = &ack {
            self.session.not_stored(*pkid);
        }
        let refusal = match ack {
            None => return Step::Continue, // QoS 0: dropped, counted by the caller
            Some(Outbound::PubAck { pkid, .. }) => Outbound::PubAck { pkid, reason: code },
            Some(Outbound::PubRec { pkid, .. }) => Outbound::PubRec { pkid, reason: code },
            Some(other) => other,
        };
        let refusal = self.session.with_reason(refusal, why);
        if self.session.version() == Some(Version::V5) {
            if self.send(Out::Packet(refusal)).await {
                Step::Continue
            } else {
                Step::Stop
            }
        } else {
            let _ = self.send(Out::Close).await;
            Step::Stop
        }
    }

    async fn publish_will(&mut self) {
        let Some(will) = self.session.take_will() else {
            return;
        };
        let rec = record_of(&will);
        match self.shared.queue.try_append(&rec) {
            Ok(p) => {
                if will.retain {
                    self.shared.sessions.note_retained(p.seq());
                }
                if let Err(error) = p.durable().await {
                    self.shared
                        .stats
                        .warn_append_failed(&error, "could not store last will");
                } else {
                    self.shared.stats.wills.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(error) => self
                .shared
                .stats
                .warn_append_failed(&error, "could not store last will"),
        }
    }

    /// The connection ended (any way): the will if it ended without DISCONNECT, deregister.
    async fn finish(&mut self) {
        if self.session.is_connected() {
            self.publish_will().await;
        }
        let _ = self.send(Out::Close).await;
        if let Some((slot, reg)) = self.slot.get() {
            self.shared.sessions.detach(slot, *reg);
        }
        if let Some((id, reg)) = self.registered.take() {
            let mut map = self
                .shared
                .registry
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if map.get(&id).is_some_and(|r| r.reg == reg) {
                map.remove(&id);
            }
            self.shared.stats.connected.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Waits for the session's wake-up, or for ever before there is a session.
async fn woken(slot: &SlotCell) {
    match slot.get() {
        Some((s, _)) => s.wake.notified().await,
        None => std::future::pending().await,
    }
}

/// Encodes what a session's outbox says to send (the writer, and the fuzz harness); `now`
/// gives a PUBLISH with an expiry its time left.
pub(super) fn encode_delivery(d: Delivery, v: Version, now: SystemTime, buf: &mut BytesMut) {
    match d {
        Delivery::Publish {
            message,
            qos,
            pkid,
            dup,
        } => codec::encode_publish(
            &OutPublish {
                topic: &message.topic,
                qos,
                retain: message.retain,
                dup,
                pkid,
                payload: &message.payload,
                user_properties: &message.user_properties,
                content_type: message.content_type.as_deref(),
                payload_format: message.payload_format,
                response_topic: message.response_topic.as_deref(),
                correlation_data: message.correlation_data.as_deref(),
                message_expiry: message.remaining_expiry(now),
                subscription_ids: &message.subscription_ids,
            },
            v,
            buf,
        ),
        Delivery::PubRel { pkid } => codec::encode(&Outbound::PubRel { pkid }, v, buf),
    }
}

fn record_of(m: &Message) -> NewRecord<'_> {
    NewRecord {
        received_at: m.received_at,
        device_id: &m.device_id,
        username: m.username.as_deref(),
        topic: &m.topic,
        qos: m.qos,
        retain: m.retain,
        user_properties: &m.user_properties,
        content_type: m.content_type.as_deref(),
        payload_format: m.payload_format,
        message_expiry: m.message_expiry,
        response_topic: m.response_topic.as_deref(),
        correlation_data: m.correlation_data.as_deref(),
        payload: &m.payload,
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Out>,
    version: Arc<std::sync::OnceLock<Version>>,
    reason_strings: Arc<AtomicBool>,
    shared: Arc<Shared>,
    acks_sent: Arc<std::sync::atomic::AtomicU64>,
    slot: SlotCell,
) {
    let mut buf = BytesMut::with_capacity(1024);
    let mut resumed = false;
    // Whether this connection still watches its session's wake-ups (see below).
    let mut watching = true;
    'outer: loop {
        let mut next = tokio::select! {
            biased;
            out = rx.recv() => match out {
                Some(out) => Some(out),
                None => break,
            },
            _ = woken(&slot), if watching => None,
        };
        let woke = next.is_none();
        // Encode everything that is ready, then write it in one go.
        while let Some(out) = next.take() {
            let v = version.get().copied().unwrap_or(Version::V311);
            match out {
                Out::Packet(p) => codec::encode(&p, v, &mut buf),
                Out::AfterDurable { pending, ack } => {
                    // Write what is encoded only when this ack must wait for the disk: the
                    // acks of one group commit (and deliveries) leave in one TLS write.
                    if !pending.is_settled() && !buf.is_empty() {
                        if wr.write_all(&buf).await.is_err() {
                            break 'outer;
                        }
                        buf.clear();
                    }
                    // Counted before the ack is written: the device can only send its next
                    // publish after reading it.
                    if ack.is_some() {
                        acks_sent.fetch_add(1, Ordering::Release);
                    }
                    match pending.durable().await {
                        Ok(_) => {
                            if let Some(a) = ack {
                                codec::encode(&a, v, &mut buf);
                                shared.stats.acks.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(error) => {
                            shared.stats.warn_append_failed(
                                &error,
                                "append failed after it was queued; no acknowledgement",
                            );
                            shared.stats.refused(error.as_label());
                            let refusal = match (v, ack) {
                                (Version::V5, Some(Outbound::PubAck { pkid, .. })) => {
                                    Some(Outbound::PubAck {
                                        pkid,
                                        reason: reason::UNSPECIFIED,
                                    })
                                }
                                (Version::V5, Some(Outbound::PubRec { pkid, .. })) => {
                                    Some(Outbound::PubRec {
                                        pkid,
                                        reason: reason::UNSPECIFIED,
                                    })
                                }
                                (_, None) => None,
                                // 3.1.1: no negative ack exists; close, the device resends.
                                _ => break 'outer,
                            };
                            if let Some(refusal) = refusal {
                                let refusal = if reason_strings.load(Ordering::Relaxed) {
                                    Outbound::WithReason {
                                        packet: Box::new(refusal),
                                        text: STORE_FAILED.into(),
                                    }
                                } else {
                                    refusal
                                };
                                codec::encode(&refusal, v, &mut buf);
                            }
                        }
                    }
                }
                Out::Close => {
                    let _ = wr.write_all(&buf).await;
                    break 'outer;
                }
            }
            next = rx.try_recv().ok();
        }
        if let Some((slot, reg)) = slot.get() {
            if slot.owned_by(*reg) {
                let v = version.get().copied().unwrap_or(Version::V311);
                // One clock read for everything this pass sends (expiry checks and time left).
                let now = SystemTime::now();
                slot.with_outbox(|o| {
                    if !resumed {
                        // What was in flight when the session's last connection ended, again.
                        resumed = true;
                        for d in o.resume() {
                            encode_delivery(d, v, now, &mut buf);
                        }
                    }
                    while let Some(d) = o.next_publish_at(now) {
                        encode_delivery(d, v, now, &mut buf);
                    }
                });
            } else if woke {
                // Another connection owns the session now (this one is ending, or was taken
                // over), and the wake-up was meant for its writer: pass it on, and stop
                // watching. (`Notify` keeps one wake-up for one waiter: a writer that swallowed
                // it left a resumed session's resends unsent.)
                slot.wake.notify_one();
                watching = false;
            }
        }
        if !buf.is_empty() {
            if wr.write_all(&buf).await.is_err() {
                break;
            }
            buf.clear();
        }
        if wr.flush().await.is_err() {
            break;
        }
    }
    let _ = wr.flush().await;
    let _ = wr.shutdown().await;
}
