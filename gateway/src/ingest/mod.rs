//! MQTT 3.1.1 and 5 over TLS: listeners, the per-connection session loop, authentication and ACLs.
//!
//! ```text
//! accept (bounded by max_connections) --TLS handshake + CONNECT within connect_timeout-->
//!   connection::serve: reader decodes (codec) -> session (state machine, no I/O) -> actions
//!                      writer sends packets; PUBACK/PUBREC only after queue append is durable
//! ```
//!
//! Device MQTT is terminated here rather than by an embedded broker because the acknowledgement
//! must wait for the disk: see DESIGN.md, "PUBACK means durable".

pub mod abuse;
pub mod auth;
pub mod codec;
mod connection;
#[doc(hidden)]
pub mod fuzz;
pub mod rate;
pub mod session;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, LimitsConfig, TlsSetting};
use crate::queue::Queue;
use auth::{Acl, Authenticator};
use session::SessionLimits;

/// Why ingest could not start.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("cannot listen on {addr}: {source}; is another process using it? (the default MQTT-over-TLS port 8883 can be changed in [[listeners]])")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error("cannot open the session store: {0}")]
    SessionStore(#[from] crate::sessions::store::StoreError),
    #[error("the [[listeners]] addresses changed; that takes a restart (a reload keeps the listening sockets so that no device is dropped)")]
    ListenersChanged,
}

/// Counters of the ingest side (exported as metrics by the metrics module).
#[derive(Debug, Default)]
pub struct IngestStats {
    pub connected: AtomicU64,
    pub connections_total: AtomicU64,
    /// Publishes received, by QoS 0, 1, 2.
    pub publishes: [AtomicU64; 3],
    /// PUBACK/PUBREC sent after a durable append.
    pub acks: AtomicU64,
    pub takeovers: AtomicU64,
    /// CONNECTs refused because the session of their client id belongs to another identity
    /// (also counted in the refusals as `client_id`).
    pub takeovers_refused: AtomicU64,
    /// Connections closed because a reloaded revocation list revokes their certificate.
    pub revoked_closed: AtomicU64,
    /// 3.1.1 publishes held back by `publish_rate` / `publish_bytes_rate` (their socket was
    /// not read until the tokens were there). MQTT 5 publishes over the rate are refusals
    /// (`rate`) instead.
    pub publishes_delayed: AtomicU64,
    /// Passwords checked (argon2 runs): bounded under a guessing flood by the per-address
    /// failure limit and the bound on waiting checks.
    pub password_checks: AtomicU64,
    /// "connection refused: too many from this address" / "password CONNECTs refused": one
    /// line per 10 s each.
    connect_rate_log: crate::throttle::LogThrottle,
    login_throttle_log: crate::throttle::LogThrottle,
    pub wills: AtomicU64,
    refusals: Mutex<HashMap<&'static str, u64>>,
    /// "append failed" repeats for every publish while the disk is full: one line per 10 s.
    append_failed_log: crate::throttle::LogThrottle,
}

impl IngestStats {
    /// Logs a failed append (`what` says which). A full disk, which fails every publish and
    /// will of every device until space returns, is logged once per 10 s with the count left out
    /// (the queue's writer logs when it ends); any other error every time.
    pub(crate) fn warn_append_failed(&self, error: &crate::queue::QueueError, what: &str) {
        let left_out = match error {
            crate::queue::QueueError::DiskFull { .. } => self.append_failed_log.admit(),
            _ => Some(0),
        };
        if let Some(left_out) = left_out {
            tracing::warn!(%error, similar_left_out = left_out, "{what}");
        }
    }

    pub(crate) fn refused(&self, label: &'static str) {
        *self
            .refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(label)
            .or_default() += 1;
    }

    /// Refusals by reason (auth, acl, limit, malformed, quota, tls, timeout, ...).
    pub fn refusals(&self) -> Vec<(&'static str, u64)> {
        let mut v: Vec<_> = self
            .refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        v.sort();
        v
    }

    pub fn refused_count(&self, label: &str) -> u64 {
        self.refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(label)
            .copied()
            .unwrap_or(0)
    }
}

/// What a reload can change: who may connect, what they may publish, the limits and the TLS
/// certificates. A connection reads it at its start (limits, TLS, authentication) and the ACL at
/// every publish, so a reload never drops a connected device and a revoked permission applies at
/// once.
pub(crate) struct Policy {
    auth: Authenticator,
    acl: Acl,
    limits: LimitsConfig,
    sessions: crate::config::SessionsConfig,
    /// The acceptor of each listener, in `config.listeners` order (`None`: plaintext).
    tls: Vec<Option<TlsAcceptor>>,
    /// The client certificates the listeners' revocation lists revoke (a reload closes their
    /// connections).
    revoked: std::collections::HashSet<crate::tls::CertKey>,
}

impl Policy {
    fn new(config: &Config) -> Result<Policy, IngestError> {
        let mut tls = Vec::new();
        let mut revoked = std::collections::HashSet::new();
        for l in &config.listeners {
            tls.push(match &l.tls {
                TlsSetting::On(t) => {
                    revoked.extend(crate::tls::load_crls(&t.crl_file.paths())?.revoked);
                    Some(TlsAcceptor::from(crate::tls::server_config(t)?))
                }
                TlsSetting::Off(_) => None,
            });
        }
        Ok(Policy {
            auth: Authenticator::new(&config.auth)?,
            acl: Acl::new(config.acl.clone()),
            limits: config.limits.clone(),
            sessions: config.sessions.clone(),
            tls,
            revoked,
        })
    }

    pub(crate) fn authenticate(
        &self,
        c: &codec::Connect,
        cert_identity: Option<&str>,
    ) -> Result<session::Identity, u8> {
        self.auth.authenticate(c, cert_identity)
    }

    pub(crate) fn acl(&self) -> &Acl {
        &self.acl
    }

    pub(crate) fn limits(&self) -> &LimitsConfig {
        &self.limits
    }

    pub(crate) fn session_limits(&self) -> SessionLimits {
        SessionLimits {
            max_packet_size: u32::try_from(self.limits.max_packet_size).unwrap_or(u32::MAX),
            receive_maximum: self.limits.receive_maximum,
            max_topic_length: self.limits.max_topic_length,
            max_client_id_length: 128,
            v311_session_expiry: secs_u32(self.sessions.expiry),
            max_session_expiry: secs_u32(self.sessions.max_expiry),
        }
    }
}

fn secs_u32(d: std::time::Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

/// What every connection shares.
pub(crate) struct Shared {
    queue: Queue,
    policy: std::sync::RwLock<Arc<Policy>>,
    /// Bumped each time a new policy is put in force: a connection keeps its copy of the policy
    /// and reads the lock only when this changed (not once per packet).
    policy_gen: AtomicU64,
    /// Connected client ids.
    registry: Mutex<HashMap<String, Registration>>,
    next_reg: AtomicU64,
    auth_permits: Semaphore,
    /// Password checks waiting for a permit (bounded by [`MAX_WAITING_PASSWORD_CHECKS`]).
    waiting_password_checks: std::sync::atomic::AtomicUsize,
    /// Per-source-address connection and failed-login limits.
    addresses: Mutex<abuse::AddressTable>,
    stats: Arc<IngestStats>,
    /// Subscriptions and deliveries of the connected clients.
    sessions: Arc<crate::sessions::Sessions>,
    /// Connections with a client certificate: its issuer and serial, the identity it gave, and
    /// what closes the connection (a reload whose revocation lists revoke it).
    cert_conns: Mutex<HashMap<u64, (crate::tls::CertKey, String, CancellationToken)>>,
    next_cert_conn: AtomicU64,
}

/// Password checks that may wait for a permit at once; more are refused as "server busy" at
/// once. An argon2 check takes tens of ms, so with a permit per core these wait at most a few
/// seconds, inside the default `connect_timeout`: a good device that gets a place in line
/// connects in time, and a flood from many addresses costs bounded memory and CPU.
pub(crate) const MAX_WAITING_PASSWORD_CHECKS: usize = 64;

/// A connected client id in [`Shared::registry`].
pub(crate) struct Registration {
    pub(crate) reg: u64,
    /// Closes that connection (taken over).
    pub(crate) taken_over: Arc<Notify>,
    /// Its identity (`Identity::owner`): only the same identity may take it over.
    pub(crate) owner: String,
}

impl Shared {
    /// The per-address table (the lock is held only for a lookup).
    pub(crate) fn addresses(&self) -> std::sync::MutexGuard<'_, abuse::AddressTable> {
        self.addresses.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The identity (`Identity::owner`) that `client_id`'s connected device or kept session
    /// belongs to, when it is not `owner`: then `owner` may not take it over.
    pub(crate) fn owned_by_another(&self, client_id: &str, owner: &str) -> Option<String> {
        let live = self
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(client_id)
            .map(|r| r.owner.clone());
        if let Some(o) = live.filter(|o| o != owner) {
            return Some(o);
        }
        self.sessions
            .identity_of(client_id)
            .filter(|o| &**o != owner)
            .map(|o| o.to_string())
    }

    /// The generation of the policy in force (see `policy_gen`).
    pub(crate) fn policy_generation(&self) -> u64 {
        self.policy_gen.load(Ordering::Acquire)
    }

    /// The policy in force now.
    pub(crate) fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A bound listener, ready to accept.
struct Listener {
    tcp: TcpListener,
    /// Index into [`Policy::tls`].
    index: usize,
    tls: bool,
}

/// Ingest with its sockets bound; [`Ingest::run`] serves until the shutdown token fires.
pub struct Ingest {
    listeners: Vec<Listener>,
    handle: IngestHandle,
}

/// Reaches a running ingest: its counters, and [`IngestHandle::reload`].
#[derive(Clone)]
pub struct IngestHandle {
    shared: Arc<Shared>,
    connections: Arc<Semaphore>,
    max_connections: Arc<Mutex<usize>>,
    binds: Vec<String>,
}

impl IngestHandle {
    pub fn stats(&self) -> Arc<IngestStats> {
        self.shared.stats.clone()
    }

    /// The live sessions (subscriptions and deliveries).
    pub fn sessions(&self) -> Arc<crate::sessions::Sessions> {
        self.shared.sessions.clone()
    }

    /// Checks that `config`'s ingest side can be applied (certificates and key files load, the
    /// password file reads) without applying it.
    pub fn prepare(&self, config: &Config) -> Result<PreparedPolicy, IngestError> {
        let binds: Vec<String> = config.listeners.iter().map(|l| l.bind.clone()).collect();
        if binds != self.binds {
            return Err(IngestError::ListenersChanged);
        }
        Ok(PreparedPolicy(Arc::new(Policy::new(config)?)))
    }

    /// Puts a prepared policy in force: new connections use it, connected devices stay
    /// connected and get the new ACL from their next publish.
    pub fn apply(&self, p: PreparedPolicy) {
        self.shared
            .sessions
            .set_bounds(crate::sessions::SessionBounds::from_config(&p.0.sessions));
        let want = p.0.limits.max_connections;
        *self
            .shared
            .policy
            .write()
            .unwrap_or_else(|e| e.into_inner()) = p.0;
        self.shared.policy_gen.fetch_add(1, Ordering::Release);
        self.close_revoked();
        let mut have = self
            .max_connections
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if want > *have {
            self.connections.add_permits(want - *have);
        } else if want < *have {
            // Permits held by live connections are not taken back: the limit applies as they
            // close (whatever cannot be forgotten now stays available, a bounded overshoot).
            let shortfall = *have - want;
            let forgotten = self.connections.forget_permits(shortfall);
            *have -= forgotten;
            if forgotten < shortfall {
                tracing::warn!(
                    want,
                    now = *have,
                    "max_connections lowered while devices are connected: the new limit applies to the permits free now; the rest is kept until restart"
                );
            }
            return;
        }
        *have = want;
    }
}

impl IngestHandle {
    /// Closes the connections whose client certificate the policy in force revokes (after a
    /// reload brought a new revocation list); returns how many.
    fn close_revoked(&self) -> usize {
        let policy = self.shared.policy();
        if policy.revoked.is_empty() {
            return 0;
        }
        let conns = self
            .shared
            .cert_conns
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        for (key, identity, close) in conns.values() {
            if policy.revoked.contains(key) && !close.is_cancelled() {
                tracing::warn!(certificate = %identity, "closing a connection: its client certificate is revoked (tls.crl_file, reloaded)");
                close.cancel();
                n += 1;
            }
        }
        self.shared
            .stats
            .revoked_closed
            .fetch_add(n as u64, Ordering::Relaxed);
        n
    }
}

/// A checked ingest policy, ready for [`IngestHandle::apply`].
pub struct PreparedPolicy(Arc<Policy>);

impl Ingest {
    /// Builds TLS configs and binds every listener (no connection is accepted yet).
    pub async fn bind(config: &Config, queue: Queue) -> Result<Ingest, IngestError> {
        let policy = Policy::new(config)?;
        let mut listeners = Vec::new();
        for (index, l) in config.listeners.iter().enumerate() {
            if let TlsSetting::Off(_) = &l.tls {
                tracing::warn!(bind = %l.bind, "plaintext MQTT listener (tls = false): credentials and data cross the network unencrypted");
            }
            let tcp = TcpListener::bind(&l.bind)
                .await
                .map_err(|source| IngestError::Bind {
                    addr: l.bind.clone(),
                    source,
                })?;
            listeners.push(Listener {
                tcp,
                index,
                tls: matches!(l.tls, TlsSetting::On(_)),
            });
        }
        if config.auth.allow_anonymous {
            tracing::warn!("anonymous devices are allowed ([auth] allow_anonymous = true)");
        }
        let sessions = open_sessions(config, &queue).await?;
        let shared = Arc::new(Shared {
            queue,
            policy: std::sync::RwLock::new(Arc::new(policy)),
            policy_gen: AtomicU64::new(0),
            registry: Mutex::new(HashMap::new()),
            next_reg: AtomicU64::new(1),
            auth_permits: Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            ),
            waiting_password_checks: std::sync::atomic::AtomicUsize::new(0),
            addresses: Mutex::new(abuse::AddressTable::new()),
            stats: Arc::new(IngestStats::default()),
            sessions,
            cert_conns: Mutex::new(HashMap::new()),
            next_cert_conn: AtomicU64::new(0),
        });
        Ok(Ingest {
            listeners,
            handle: IngestHandle {
                shared,
                connections: Arc::new(Semaphore::new(config.limits.max_connections)),
                max_connections: Arc::new(Mutex::new(config.limits.max_connections)),
                binds: config.listeners.iter().map(|l| l.bind.clone()).collect(),
            },
        })
    }

    /// The addresses actually bound (useful with port 0), with whether each is TLS.
    pub fn local_addrs(&self) -> Vec<(SocketAddr, bool)> {
        self.listeners
            .iter()
            .filter_map(|l| l.tcp.local_addr().ok().map(|a| (a, l.tls)))
            .collect()
    }

    pub fn stats(&self) -> Arc<IngestStats> {
        self.handle.stats()
    }

    /// A handle for counters and reloads that outlives [`Ingest::run`]'s start.
    pub fn handle(&self) -> IngestHandle {
        self.handle.clone()
    }

    /// Accepts and serves until `shutdown` fires, then closes every connection (each finishes the
    /// acks for what it already stored) and waits for them.
    pub async fn run(self, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        tracker.spawn(crate::sessions::router::run(
            self.handle.shared.queue.clone(),
            self.handle.shared.sessions.clone(),
            shutdown.clone(),
        ));
        tracker.spawn(crate::sessions::router::expire(
            self.handle.shared.sessions.clone(),
            shutdown.clone(),
        ));
        for l in self.listeners {
            tracker.spawn(accept_loop(
                l,
                self.handle.shared.clone(),
                self.handle.connections.clone(),
                tracker.clone(),
                shutdown.clone(),
            ));
        }
        tracker.close();
        shutdown.cancelled().await;
        tracker.wait().await;
        if let Some(store) = self.handle.shared.sessions.store().cloned() {
            let _ = tokio::task::spawn_blocking(move || store.close()).await;
        }
    }
}

/// The sessions, with their store in `data_dir/sessions` (same fsync policy as the queue) and
/// what it recovered.
async fn open_sessions(
    config: &Config,
    queue: &Queue,
) -> Result<Arc<crate::sessions::Sessions>, IngestError> {
    use crate::sessions::{store::Store, SessionBounds, Sessions};
    let dir = queue.data_dir().join("sessions");
    let fsync = queue.options().fsync;
    // Room for the live sessions twice over (a snapshot is written before the old events go).
    let max_bytes = config.sessions.max_bytes.saturating_mul(2) + (16 << 20);
    let (store, recovered) =
        tokio::task::spawn_blocking(move || Store::open(&dir, fsync, max_bytes))
            .await
            .map_err(|_| IngestError::SessionStore(crate::sessions::store::StoreError::Closed))??;
    if !recovered.sessions.is_empty() || !recovered.retained.is_empty() {
        tracing::info!(
            sessions = recovered.sessions.len(),
            retained = recovered.retained.len(),
            "persistent sessions and retained messages recovered"
        );
    }
    Ok(Arc::new(Sessions::with_store(
        SessionBounds::from_config(&config.sessions),
        Arc::new(store),
        recovered,
    )))
}

async fn accept_loop(
    l: Listener,
    shared: Arc<Shared>,
    connections: Arc<Semaphore>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            r = l.tcp.accept() => match r {
                Ok(x) => x,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let policy = shared.policy();
        if !shared.addresses().admit_connection(
            peer.ip(),
            tokio::time::Instant::now(),
            &policy.limits,
        ) {
            shared.stats.refused("connect_rate");
            if let Some(left_out) = shared.stats.connect_rate_log.admit() {
                tracing::warn!(
                    address = %peer.ip(),
                    similar_left_out = left_out,
                    "connection refused: too many new connections from this address ([limits] connect_rate_per_address)"
                );
            }
            drop(tcp);
            continue;
        }
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            shared.stats.refused("limit");
            tracing::warn!(%peer, "connection refused: max_connections reached");
            drop(tcp);
            continue;
        };
        shared
            .stats
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
        let _ = tcp.set_nodelay(true);
        let deadline = Instant::now() + policy.limits.connect_timeout;
        let tls = policy.tls.get(l.index).cloned().flatten();
        let (shared, shutdown) = (shared.clone(), shutdown.clone());
        // The handshake runs in the connection's own task: the accept loop never waits on it.
        tracker.spawn(async move {
            let _permit = permit;
            handle(tcp, peer, tls, shared, deadline, shutdown).await;
        });
    }
}

async fn handle(
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    deadline: Instant,
    shutdown: CancellationToken,
) {
    let Some(acceptor) = tls else {
        connection::serve(tcp, peer, None, shared, deadline, shutdown).await;
        return;
    };
    let budget = deadline.saturating_duration_since(Instant::now());
    let stream = match tokio::time::timeout(budget, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(error)) => {
            shared.stats.refused("tls");
            tracing::debug!(%peer, %error, "TLS handshake failed");
            return;
        }
        Err(_) => {
            shared.stats.refused("timeout");
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec());
    let cert_identity = leaf
        .as_deref()
        .and_then(|der| auth::identity_from_cert(der, shared.policy().auth.cert_identity_mode()));
    // A certificate connection is registered, so that a reload revoking its certificate can
    // close it.
    let registered = leaf.as_deref().and_then(crate::tls::cert_key).map(|key| {
        let id = shared.next_cert_conn.fetch_add(1, Ordering::Relaxed);
        let close = shutdown.child_token();
        let who = cert_identity.clone().unwrap_or_default();
        shared
            .cert_conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, (key, who, close.clone()));
        (id, close)
    });
    let conn_shutdown = registered
        .as_ref()
        .map_or_else(|| shutdown.clone(), |(_, c)| c.clone());
    connection::serve(
        stream,
        peer,
        cert_identity,
        shared.clone(),
        deadline,
        conn_shutdown,
    )
    .await;
    if let Some((id, _)) = registered {
        shared
            .cert_conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }
}
