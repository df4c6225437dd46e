//! The running gateway: starts the queue, ingest, the forwarders and the admin endpoint from one
//! config, reloads what can change while devices stay connected, and stops in order.
//!
//! ```text
//! start:    queue open -> MQTT listeners bound -> dead letters -> admin bound -> accept devices
//!           -> forwarders -> admin served (requests wait in its backlog until then) -> READY
//! reload:   load + validate the file -> prepare ingest (certs, passwords) -> all good? apply:
//!           ingest policy swapped, routes swapped, changed uplinks' forwarders stopped (in-flight
//!           confirms awaited, so nothing is re-sent) and started again on the same cursor
//! stop:     stop accepting, connections finish their acks -> forwarders drain for
//!           `shutdown_grace` -> forwarders stop (in-flight confirms awaited) -> queue closed
//! ```
//!
//! What a reload cannot change (`[queue]`, the listener addresses, `[admin]`) is reported and
//! kept as it was; the rest of the new config still applies.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, DownlinkConfig, TlsSetting, UplinkConfig, DEV_CERT_DIR};
use crate::downlink::router::{Holds, RouterStats};
use crate::downlink::DownlinkStats;
use crate::forwarder::Routes;
use crate::forwarder::{self, DeadLetters, ForwarderStats};
use crate::ingest::{Ingest, IngestHandle};
use crate::notify;
use crate::queue::Queue;
use crate::status::{age_seconds, ReloadOutcome, ReloadRequest, Status, UplinkView, HISTORY_EVERY};
use crate::uplink::describe;

struct RunningDownlink {
    cfg: DownlinkConfig,
    stats: Arc<DownlinkStats>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// The command store and its router.
struct Commands {
    store: Queue,
    holds: Holds,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

struct Running {
    cfg: UplinkConfig,
    stats: Arc<ForwarderStats>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// The gateway while it runs.
pub struct Service {
    config: Config,
    config_path: PathBuf,
    queue: Queue,
    ingest: IngestHandle,
    dead: DeadLetters,
    routes: watch::Sender<Arc<Routes>>,
    forwarders: HashMap<String, Running>,
    downlinks: HashMap<String, RunningDownlink>,
    commands: Option<Commands>,
    unrouted: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
    status: Arc<Status>,
    control: mpsc::Receiver<ReloadRequest>,
    ingest_stop: CancellationToken,
    serving: Option<tokio::task::JoinHandle<()>>,
    admin: Option<tokio::task::JoinHandle<()>>,
}

/// Makes the default config's development certificates when they are missing (only for the
/// default paths: any other missing file is an error from the TLS setup, naming it).
pub fn ensure_dev_certs(config: &Config) -> Result<()> {
    let needs = config.listeners.iter().any(|l| {
        matches!(&l.tls, TlsSetting::On(t) if t.is_dev_default() && !t.cert.exists() && !t.key.exists())
    });
    #[cfg(not(feature = "dev-certs"))]
    if needs {
        anyhow::bail!(
            "the development certificates in {DEV_CERT_DIR}/ are missing and {}",
            crate::config::DEV_CERTS_NOT_BUILT
        );
    }
    #[cfg(feature = "dev-certs")]
    if needs {
        crate::certs::generate(std::path::Path::new(DEV_CERT_DIR), 10)?;
        tracing::warn!(
            dir = DEV_CERT_DIR,
            "development certificates were missing and have been created (a throwaway CA, a server certificate for localhost and 10 device certificates dev-00001..dev-00010); do not use them in production"
        );
    }
    Ok(())
}

impl Service {
    /// Starts everything `config` describes and begins accepting devices.
    pub async fn start(config: Config, config_path: PathBuf) -> Result<Service> {
        ensure_dev_certs(&config)?;
        // Read once, here: a reload does not change [admin].
        let admin_token = match config.admin.enabled {
            true => config.admin.token().map_err(|p| anyhow::anyhow!("{p}"))?,
            false => None,
        };
        let opts = config.queue.to_options();
        let (queue, report) = tokio::task::spawn_blocking(move || Queue::open(opts))
            .await
            .context("queue open task")??;
        let q = queue.stats();
        tracing::info!(
            data_dir = %queue.data_dir().display(),
            records = q.records,
            bytes = q.bytes,
            max_bytes = q.max_bytes,
            full = format!("{:.1}%", q.bytes as f64 * 100.0 / q.max_bytes.max(1) as f64),
            oldest_age_s = age_seconds(q.oldest_time_us).map(|a| a.round()),
            fsync = ?queue.options().fsync,
            full_policy = ?queue.options().full_policy,
            truncated_bytes = report.truncated_bytes,
            quarantined_records = report.quarantined_records,
            "queue ready"
        );
        let ingest = Ingest::bind(&config, queue.clone()).await?;
        let listeners = ingest.local_addrs();
        for (addr, tls) in &listeners {
            tracing::info!(%addr, tls, "listening for MQTT devices");
        }
        let opts = config.queue.to_options();
        let dead = tokio::task::spawn_blocking(move || DeadLetters::open(&opts))
            .await
            .context("dead-letter store open task")??;
        // The command store: opened when a downlink is configured, or when it holds commands
        // from an earlier config (they are still delivered).
        let commands_store = {
            let opts = config.queue.to_options();
            let max = config.downlink.max_bytes;
            let wanted =
                !config.downlinks.is_empty() || crate::downlink::store_dir(&opts.data_dir).exists();
            match wanted {
                true => Some(
                    tokio::task::spawn_blocking(move || crate::downlink::open_store(&opts, max))
                        .await
                        .context("command store open task")?
                        .context("cannot open the command store (data_dir/downlink)")?,
                ),
                false => None,
            }
        };
        let (routes, _) = watch::channel(Arc::new(Routes::new(config.routes.clone())));
        let (control_tx, control) = mpsc::channel(4);
        let status = Arc::new(Status {
            gateway_id: RwLock::new(config.gateway.id.clone()),
            started: Instant::now(),
            queue: queue.clone(),
            ingest: ingest.stats(),
            sessions: ingest.handle().sessions(),
            listeners,
            uplinks: RwLock::new(Vec::new()),
            downlinks: RwLock::new(Vec::new()),
            commands: RwLock::new(None),
            dead: dead.clone(),
            history: Mutex::new(VecDeque::new()),
            accepting: AtomicBool::new(false),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            control: control_tx,
        });
        // Bound now (a taken port fails the start before anything runs), served at the end.
        let admin_listener = match config.admin.addr() {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot serve the admin endpoint on {addr} (admin.listen); is another process using it? change admin.listen or set admin.enabled = false"))?;
                let bound = listener
                    .local_addr()
                    .context("the admin endpoint's address")?;
                Some((listener, bound))
            }
            None => None,
        };
        let ingest_stop = CancellationToken::new();
        let handle = ingest.handle();
        let serving = tokio::spawn(ingest.run(ingest_stop.clone()));
        let mut service = Service {
            config_path,
            queue,
            ingest: handle,
            dead,
            routes,
            forwarders: HashMap::new(),
            downlinks: HashMap::new(),
            commands: None,
            unrouted: None,
            status: status.clone(),
            control,
            ingest_stop,
            serving: Some(serving),
            admin: None,
            config: config.clone(),
        };
        if config.uplinks.is_empty() {
            tracing::warn!(
                "no [[uplinks]] configured: messages are stored in the queue and stay there"
            );
        }
        for u in &config.uplinks {
            service.start_forwarder(u.clone());
        }
        service.sync_unrouted();
        service.publish_uplinks();
        if let Some(store) = commands_store {
            service.start_commands(store);
        }
        status.accepting.store(true, Ordering::Relaxed);
        status.sample();
        // Nothing after the tasks above are spawned may fail: the caller would see a failed
        // start while devices are being acknowledged.
        if let Some((listener, bound)) = admin_listener {
            tracing::info!(addr = %bound, token = admin_token.is_some(), "admin endpoint: /metrics /healthz /readyz, status page at /");
            service.admin = Some(crate::admin::serve(listener, status.clone(), admin_token));
        }
        Ok(service)
    }

    pub fn status(&self) -> Arc<Status> {
        self.status.clone()
    }

    fn start_forwarder(&mut self, cfg: UplinkConfig) {
        let (kind, target) = describe(&cfg);
        tracing::info!(uplink = cfg.name(), kind, %target, "uplink configured");
        let stop = CancellationToken::new();
        let (stats, task) = forwarder::spawn_with_routes(
            cfg.clone(),
            self.config.gateway.id.clone(),
            self.queue.clone(),
            self.routes.subscribe(),
            self.dead.clone(),
            stop.clone(),
        );
        self.forwarders.insert(
            cfg.name().to_string(),
            Running {
                cfg,
                stats,
                stop,
                task,
            },
        );
    }

    /// Starts the downlink router on the command store, and the configured downlinks.
    fn start_commands(&mut self, store: Queue) {
        let holds: Holds = Arc::new(RwLock::new(
            self.config
                .downlinks
                .iter()
                .map(|d| (crate::downlink::origin(d.name()), d.common().hold))
                .collect(),
        ));
        let stats = Arc::new(RouterStats::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn(crate::downlink::router::run(
            store.clone(),
            self.ingest.sessions(),
            self.dead.clone(),
            holds.clone(),
            stats.clone(),
            stop.clone(),
        ));
        *self
            .status
            .commands
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(crate::status::CommandsView {
            store: store.clone(),
            router: stats.clone(),
        });
        self.commands = Some(Commands {
            store,
            holds,
            stop,
            task,
        });
        for d in self.config.downlinks.clone() {
            self.start_downlink(d);
        }
        self.publish_downlinks();
    }

    fn start_downlink(&mut self, cfg: DownlinkConfig) {
        let Some(commands) = &self.commands else {
            tracing::warn!(downlink = cfg.name(), "no command store (it could not be opened at start); downlink not started until a restart");
            return;
        };
        let stats = Arc::new(DownlinkStats::default());
        let stop = CancellationToken::new();
        let task = match &cfg {
            DownlinkConfig::Amqp(a) => {
                tracing::info!(downlink = %a.name, node = %crate::uplink::amqp::masked_url(a.urls()[0]), queue = %a.queue, "downlink configured");
                tokio::spawn(crate::downlink::amqp::run(
                    a.clone(),
                    commands.store.clone(),
                    self.dead.clone(),
                    stats.clone(),
                    stop.clone(),
                ))
            }
            #[cfg(feature = "kafka")]
            DownlinkConfig::Kafka(k) => {
                tracing::info!(downlink = %k.name, bootstrap = %k.bootstrap.join(","), topic = %k.topic, "downlink configured");
                tokio::spawn(crate::downlink::kafka::run(
                    k.clone(),
                    self.config.gateway.id.clone(),
                    commands.store.data_dir().to_path_buf(),
                    commands.store.clone(),
                    self.dead.clone(),
                    stats.clone(),
                    stop.clone(),
                ))
            }
            // The config check refuses it in a build without Kafka; never reached.
            #[cfg(not(feature = "kafka"))]
            DownlinkConfig::Kafka(k) => {
                tracing::error!(downlink = %k.name, "{}", crate::config::KAFKA_NOT_BUILT);
                return;
            }
        };
        self.downlinks.insert(
            cfg.name().to_string(),
            RunningDownlink {
                cfg,
                stats,
                stop,
                task,
            },
        );
    }

    async fn stop_downlink(r: RunningDownlink) {
        r.stop.cancel();
        let mut task = r.task;
        if tokio::time::timeout(Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            tracing::warn!(downlink = r.cfg.name(), "downlink did not stop within 5 s; aborted (the broker delivers its unacked commands again)");
            task.abort();
        }
    }

    /// Downlinks after a reload: the removed and changed ones stop (what they were storing is
    /// acked; the rest stays at the broker), the new and changed ones start. Holds apply to
    /// the commands already held too.
    async fn reload_downlinks(&mut self, changes: &mut Vec<String>) {
        if self.commands.is_none() && !self.config.downlinks.is_empty() {
            let opts = self.config.queue.to_options();
            let max = self.config.downlink.max_bytes;
            match tokio::task::spawn_blocking(move || crate::downlink::open_store(&opts, max)).await
            {
                Ok(Ok(store)) => {
                    self.start_commands(store);
                    changes.push("downlinks: command store opened; downlinks started".into());
                    return;
                }
                Ok(Err(e)) => changes.push(format!(
                    "downlinks: cannot open the command store: {e}; not started"
                )),
                Err(e) => changes.push(format!("downlinks: command store open task: {e}")),
            }
            return;
        }
        let Some(commands) = &self.commands else {
            return;
        };
        *commands.holds.write().unwrap_or_else(|e| e.into_inner()) = self
            .config
            .downlinks
            .iter()
            .map(|d| (crate::downlink::origin(d.name()), d.common().hold))
            .collect();
        let mut stopping = Vec::new();
        let mut starting = Vec::new();
        for (name, r) in std::mem::take(&mut self.downlinks) {
            match self.config.downlinks.iter().find(|d| d.name() == name) {
                Some(d) if *d == r.cfg => {
                    self.downlinks.insert(name, r);
                }
                Some(d) => {
                    changes.push(format!("downlink {name}: changed; restarted"));
                    starting.push(d.clone());
                    stopping.push(Self::stop_downlink(r));
                }
                None => {
                    changes.push(format!(
                        "downlink {name}: removed (its stored commands are still delivered)"
                    ));
                    stopping.push(Self::stop_downlink(r));
                }
            }
        }
        for d in &self.config.downlinks {
            if !self.downlinks.contains_key(d.name())
                && !starting.iter().any(|s| s.name() == d.name())
            {
                changes.push(format!("downlink {}: added", d.name()));
                starting.push(d.clone());
            }
        }
        futures_util::future::join_all(stopping).await;
        for d in starting {
            self.start_downlink(d);
        }
        self.publish_downlinks();
    }

    fn publish_downlinks(&self) {
        let mut views: Vec<crate::status::DownlinkView> = self
            .downlinks
            .values()
            .map(|r| {
                let (kind, source) = match &r.cfg {
                    DownlinkConfig::Amqp(a) => (
                        "amqp",
                        format!(
                            "{} queue {}",
                            crate::uplink::amqp::masked_url(
                                a.urls()[r.stats.node() % a.urls().len()]
                            ),
                            a.queue
                        ),
                    ),
                    DownlinkConfig::Kafka(k) => (
                        "kafka",
                        format!("{} topic {}", k.bootstrap.join(","), k.topic),
                    ),
                };
                crate::status::DownlinkView {
                    name: r.cfg.name().to_string(),
                    kind,
                    source,
                    stats: r.stats.clone(),
                }
            })
            .collect();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        *self
            .status
            .downlinks
            .write()
            .unwrap_or_else(|e| e.into_inner()) = views;
    }

    /// Stops a forwarder: it finishes the send in flight (bounded by its confirm timeout) and
    /// acks what was confirmed. One that does not stop within that bound is aborted; its
    /// unconfirmed records are re-sent by the next forwarder on the cursor.
    async fn stop_forwarder(r: Running) {
        r.stop.cancel();
        let bound = r.cfg.confirm_timeout() + Duration::from_secs(2);
        let mut task = r.task;
        if tokio::time::timeout(bound, &mut task).await.is_err() {
            tracing::warn!(uplink = r.cfg.name(), "forwarder did not stop within its confirm timeout; aborted (its unconfirmed records go out again later)");
            task.abort();
        }
    }

    /// The unrouted-record task runs when there is at least one uplink (with none, records
    /// simply stay in the queue).
    fn sync_unrouted(&mut self) {
        let want = !self.config.uplinks.is_empty();
        match (&self.unrouted, want) {
            (None, true) => {
                let stop = CancellationToken::new();
                let task = forwarder::spawn_unrouted(
                    self.queue.clone(),
                    self.routes.subscribe(),
                    self.dead.clone(),
                    stop.clone(),
                );
                self.unrouted = Some((stop, task));
            }
            (Some(_), false) => {
                if let Some((stop, task)) = self.unrouted.take() {
                    stop.cancel();
                    task.abort();
                }
            }
            _ => {}
        }
    }

    fn publish_uplinks(&self) {
        let mut views: Vec<UplinkView> = self
            .config
            .uplinks
            .iter()
            .filter_map(|u| {
                let r = self.forwarders.get(u.name())?;
                let (kind, target) = describe(u);
                Some(UplinkView {
                    name: u.name().to_string(),
                    kind,
                    target,
                    stats: r.stats.clone(),
                })
            })
            .collect();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        *self
            .status
            .uplinks
            .write()
            .unwrap_or_else(|e| e.into_inner()) = views;
    }

    /// Serves until SIGTERM/SIGINT, reloading on SIGHUP or an admin request; then stops in
    /// order. A second SIGTERM/SIGINT exits at once.
    pub async fn run(mut self) -> Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("listen for SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("listen for SIGINT")?;
        let mut hup = signal(SignalKind::hangup()).context("listen for SIGHUP")?;
        let mut history =
            tokio::time::interval_at(tokio::time::Instant::now() + HISTORY_EVERY, HISTORY_EVERY);
        history.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let watchdog_every = notify::watchdog_interval();
        let mut watchdog =
            tokio::time::interval(watchdog_every.unwrap_or(Duration::from_secs(3600)));
        notify::ready(&self.summary());
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => {
                    tracing::info!(path = %self.config_path.display(), "SIGHUP: reloading the config");
                    let _ = self.reload(&[]).await;
                }
                Some(req) = self.control.recv() => {
                    let outcome = self.reload(&req.release).await;
                    let _ = req.reply.send(outcome);
                }
                _ = history.tick() => self.status.sample(),
                _ = watchdog.tick(), if watchdog_every.is_some() => {
                    // Alive means the queue is open, not just that this loop runs. Not tied to
                    // the last write's success: a restart does not cure a full disk, and the
                    // queue recovers by itself when space returns.
                    if self.queue.is_open() {
                        notify::watchdog();
                    }
                }
            }
        }
        // A second signal: stop now. The queue is crash-safe, so this loses nothing acknowledged.
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::warn!("second signal: exiting at once (the queue is crash-safe; unsent records stay queued)");
            std::process::exit(130);
        });
        self.shutdown().await
    }

    fn summary(&self) -> String {
        let q = self.queue.stats();
        format!(
            "{} device(s) connected, {} record(s) queued, {} uplink(s)",
            self.status.ingest.connected.load(Ordering::Relaxed),
            q.records,
            self.forwarders.len()
        )
    }

    /// Stops in order: no new connections, devices' last acks sent, forwarders drain for the
    /// grace period, then stop; the queue is closed (flushed) last.
    pub async fn shutdown(mut self) -> Result<()> {
        notify::stopping();
        let grace = self.config.gateway.shutdown_grace;
        tracing::info!(
            grace = ?grace,
            "shutting down: closing device connections (in-flight acks finish), then forwarders drain for the grace period, then the queue closes"
        );
        self.status.accepting.store(false, Ordering::Relaxed);
        // Downlinks first: what they are storing is acked upstream, the rest stays there.
        let stops: Vec<_> = self
            .downlinks
            .drain()
            .map(|(_, r)| Self::stop_downlink(r))
            .collect();
        futures_util::future::join_all(stops).await;
        // Then the command router, while the session store is still open.
        if let Some(c) = self.commands.as_mut() {
            c.stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut c.task).await;
        }
        self.ingest_stop.cancel();
        if let Some(s) = self.serving.take() {
            let _ = s.await;
        }
        let deadline = Instant::now() + grace;
        let names: Vec<String> = self.forwarders.keys().cloned().collect();
        if !names.is_empty() {
            loop {
                let q = self.queue.stats();
                let lag: u64 = q
                    .cursors
                    .iter()
                    .filter(|c| names.contains(&c.name))
                    .map(|c| c.lag_records)
                    .sum();
                if lag == 0 {
                    tracing::info!("uplinks drained");
                    break;
                }
                let any_connected = self
                    .forwarders
                    .values()
                    .any(|r| r.stats.state() == crate::forwarder::UplinkState::Connected);
                if !any_connected {
                    tracing::info!(records = lag, "no uplink is connected; undelivered records stay in the queue for the next start");
                    break;
                }
                if Instant::now() >= deadline {
                    tracing::info!(records = lag, "grace period over; undelivered records stay in the queue for the next start");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let stops: Vec<_> = self
            .forwarders
            .drain()
            .map(|(_, r)| Self::stop_forwarder(r))
            .collect();
        futures_util::future::join_all(stops).await;
        if let Some((stop, task)) = self.unrouted.take() {
            stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        if let Some(a) = self.admin.take() {
            a.abort();
        }
        let commands = self.commands.take().map(|c| c.store);
        let (queue, dead) = (self.queue.clone(), self.dead.clone());
        tokio::task::spawn_blocking(move || {
            if let Some(c) = commands {
                c.close();
            }
            dead.close();
            queue.close();
        })
        .await
        .context("queue close task")?;
        tracing::info!("stopped");
        Ok(())
    }

    /// Re-reads the config file and applies what changed. Rejected as a whole (the old config
    /// keeps running) when the new one is invalid or its certificates or password file do not
    /// load.
    pub async fn reload(&mut self, release: &[String]) -> ReloadOutcome {
        notify::reloading();
        let outcome = self.try_reload(release).await;
        match &outcome {
            Ok(changes) => {
                self.status.reloads_ok.fetch_add(1, Ordering::Relaxed);
                tracing::info!(changes = %changes.join("; "), "config reloaded");
            }
            Err(errors) => {
                self.status.reloads_failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(errors = %errors.join("; "), "config reload rejected; the old config keeps running");
            }
        }
        notify::ready(&self.summary());
        outcome
    }

    async fn try_reload(&mut self, release: &[String]) -> ReloadOutcome {
        let path = self.config_path.clone();
        let mut new = tokio::task::spawn_blocking(move || {
            Config::load(&path).and_then(|c| c.check_files().map(|()| c))
        })
        .await
        .map_err(|e| vec![format!("config load task: {e}")])?
        .map_err(|e| match e {
            crate::config::ConfigError::Invalid { problems } => {
                problems.iter().map(ToString::to_string).collect()
            }
            other => vec![other.to_string()],
        })?;
        let mut changes = Vec::new();
        if new.queue != self.config.queue {
            changes.push("[queue] changed: that takes a restart; kept as it was".to_string());
            new.queue = self.config.queue.clone();
        }
        if new.admin != self.config.admin {
            changes.push("[admin] changed: that takes a restart; kept as it was".to_string());
            new.admin = self.config.admin.clone();
        }
        // Changed listener addresses are refused by `IngestHandle::prepare` below.
        let new_names: Vec<&str> = new.uplinks.iter().map(UplinkConfig::name).collect();
        let mut errors = Vec::new();
        for r in release {
            if r.starts_with('_') {
                errors.push(format!(
                    "--release {r}: {r:?} is the gateway's own cursor, not an uplink's; it cannot be released"
                ));
            } else if new_names.contains(&r.as_str()) {
                errors.push(format!(
                    "--release {r}: uplink {r:?} is still configured; remove it from the config to release its cursor"
                ));
            } else if !self.queue.stats().cursors.iter().any(|c| &c.name == r) {
                errors.push(format!("--release {r}: there is no cursor named {r:?}"));
            }
        }
        let prepared = {
            let ingest = self.ingest.clone();
            let cfg = new.clone();
            match tokio::task::spawn_blocking(move || ingest.prepare(&cfg)).await {
                Ok(Ok(p)) => Some(p),
                Ok(Err(e)) => {
                    errors.push(e.to_string());
                    None
                }
                Err(e) => {
                    errors.push(format!("ingest prepare task: {e}"));
                    None
                }
            }
        };
        let prepared = match prepared {
            Some(p) if errors.is_empty() => p,
            _ => return Err(errors),
        };
        // Everything checked: apply.
        if new.listeners != self.config.listeners
            || new.auth != self.config.auth
            || new.acl != self.config.acl
            || new.limits != self.config.limits
        {
            changes.push("ingest: listeners' TLS, [auth], [[acl]] and [limits] applied (connected devices stay; new connections use the new settings, the ACL applies to every next publish)".to_string());
        } else {
            changes.push("ingest: certificates and password file re-read".to_string());
        }
        self.ingest.apply(prepared);
        if new.routes != self.config.routes {
            changes.push(format!("routes: {} route(s) applied", new.routes.len()));
        }
        // Records received from now on take the new routes; those already queued keep the
        // routes they were received under (see `Routes::then`).
        let from_seq = self.queue.stats().last_seq.map_or(0, |s| s + 1);
        let current = self.routes.borrow().clone();
        self.routes
            .send_replace(Arc::new(current.then(new.routes.clone(), from_seq)));
        let id_changed = new.gateway.id != self.config.gateway.id;
        let old = std::mem::replace(&mut self.config, new);
        *self
            .status
            .gateway_id
            .write()
            .unwrap_or_else(|e| e.into_inner()) = self.config.gateway.id.clone();
        // Uplinks: stop the removed and the changed ones (in parallel), then start the new and
        // changed ones on their cursors.
        let mut stopping = Vec::new();
        let mut starting = Vec::new();
        for (name, r) in std::mem::take(&mut self.forwarders) {
            match self.config.uplinks.iter().find(|u| u.name() == name) {
                Some(u) if *u == r.cfg && !id_changed => {
                    self.forwarders.insert(name, r);
                }
                Some(u) => {
                    changes.push(format!("uplink {name}: changed; restarted on its cursor"));
                    starting.push(u.clone());
                    stopping.push(Self::stop_forwarder(r));
                }
                None => {
                    changes.push(format!("uplink {name}: removed"));
                    stopping.push(Self::stop_forwarder(r));
                }
            }
        }
        for u in &self.config.uplinks {
            if !self.forwarders.contains_key(u.name())
                && !starting.iter().any(|s| s.name() == u.name())
            {
                changes.push(format!("uplink {}: added", u.name()));
                starting.push(u.clone());
            }
        }
        futures_util::future::join_all(stopping).await;
        for u in starting {
            self.start_forwarder(u);
        }
        self.sync_unrouted();
        self.publish_uplinks();
        self.reload_downlinks(&mut changes).await;
        // Cursors of removed uplinks: released only when asked, since that lets the queue
        // delete records nobody else needed.
        for name in old
            .uplinks
            .iter()
            .map(UplinkConfig::name)
            .filter(|n| !self.forwarders.contains_key(*n))
        {
            if release.iter().any(|r| r == name) {
                continue;
            }
            let lag = self
                .queue
                .stats()
                .cursors
                .iter()
                .find(|c| c.name == name)
                .map_or(0, |c| c.lag_records);
            changes.push(format!(
                "cursor {name} kept ({lag} record(s) behind it stay in the queue); release it with `gateway reload --release {name}`"
            ));
        }
        for name in release {
            let q = self.queue.clone();
            let n = name.clone();
            match tokio::task::spawn_blocking(move || q.remove_cursor(&n)).await {
                Ok(Ok(())) => changes.push(format!("cursor {name} released")),
                Ok(Err(e)) => changes.push(format!("cursor {name}: could not release: {e}")),
                Err(e) => changes.push(format!("cursor {name}: release task: {e}")),
            }
        }
        Ok(changes)
    }
}
