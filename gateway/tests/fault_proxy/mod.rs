//! A fault-injecting TCP proxy for tests: it sits between a client (the gateway's uplink) and a
//! server (the shared RabbitMQ), so tests can break the path without touching the broker.
//!
//! It listens on `127.0.0.1:0` and forwards each accepted connection to the target. Its [`Mode`]
//! can be switched at any time:
//!
//! - [`Mode::Pass`]: forward bytes both ways.
//! - [`Mode::Refuse`]: new connections are accepted and reset at once (RST, `SO_LINGER` 0), so
//!   the client fails on its first read or write; existing connections carry on. (A reset rather
//!   than closing the listener keeps the port ours: nobody can take it while we are "down".)
//! - [`Mode::BlackHole`]: "TCP connects, nothing answers". New connections are accepted but never
//!   forwarded: what the client sends is read and discarded, nothing ever comes back, and they
//!   stay that way (no upstream) until cut, even after the mode changes. On existing connections
//!   every chunk read while the mode is on is discarded, in both directions.
//! - [`Mode::Delay`]: every chunk, in either direction, is held for the duration before it is
//!   written on (latency per chunk; one task per connection, so a chunk also waits for the one
//!   before it, whichever direction).
//! - [`Mode::ResetAfter`]: forward, but once `n` bytes from the client have passed on a
//!   connection (counted from when the mode was set, or from the connection's start if it came
//!   later), forward exactly up to the `n`th byte and reset both sides.
//! - [`Mode::HalfDeadAfter`]: like `ResetAfter`, but after the `n`th byte the path towards the
//!   server dies first: the client's further bytes are discarded while the server's answers
//!   (e.g. confirms of what got through) still reach the client, and both sides are reset
//!   `grace` later.
//!
//! A proxy started with [`FaultProxy::start_shaped`] also shapes the link behind it like a long,
//! thin WAN path ([`Link`]): a one-way delay per direction and a bandwidth cap per direction,
//! pipelined (bytes in flight do not wait for each other's delay, only for the bandwidth), so a
//! sender that keeps enough in flight still fills the link, and one that waits for answers idles
//! like it would on the real thing. [`FaultProxy::set_link`] changes the shape at any time. The
//! shaping sits behind the fault modes: a black hole or a reset applies to the shaped path.
//!
//! [`FaultProxy::cut_all`] resets every current connection now. With
//! [`FaultProxy::capture_to_clients`] on, the proxy keeps a copy of what it forwarded to each
//! client, for a test to parse. Dropping the proxy stops it: the listener closes and every
//! connection it carries is reset.
#![allow(dead_code)]

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

/// What the proxy does to the traffic (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Refuse,
    BlackHole,
    Delay(Duration),
    ResetAfter(u64),
    HalfDeadAfter(u64, Duration),
}

/// Counters, for tests to see what the proxy did.
#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    black_holed: AtomicU64,
    /// Connections reset by [`Mode::ResetAfter`].
    resets: AtomicU64,
    /// Connections reset by [`FaultProxy::cut_all`].
    cut: AtomicU64,
    active: AtomicU64,
    from_clients: AtomicU64,
    to_clients: AtomicU64,
    swallowed: AtomicU64,
}

struct Shared {
    target: SocketAddr,
    /// The mode and a generation that changes with every `set_mode`.
    mode: watch::Sender<(u64, Mode)>,
    /// Cancelled (and replaced) by `cut_all`; each connection holds the one current when it came.
    cut: Mutex<CancellationToken>,
    stop: CancellationToken,
    counters: Counters,
    /// Whether new forwarded connections keep a copy of what they send to the client.
    capture: std::sync::atomic::AtomicBool,
    /// Per forwarded connection (while capturing), in the order they were accepted.
    captured: Mutex<Vec<Arc<Mutex<Vec<u8>>>>>,
}

/// The proxy; stops when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// The link shaper behind the proxy ([`FaultProxy::start_shaped`]).
    link: Option<watch::Sender<Link>>,
    _stop: DropGuard,
}

/// The shape of a link: one-way delays and a bandwidth cap (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Link {
    /// Added to every byte from the client to the server.
    pub up_delay: Duration,
    /// Added to every byte from the server to the client.
    pub down_delay: Duration,
    /// Each direction's rate in kbit/s (`None`: as fast as loopback).
    pub kbit_per_s: Option<u64>,
}

impl Link {
    /// A round trip of `rtt`, half each way, no bandwidth cap.
    pub fn rtt(rtt: Duration) -> Link {
        Link {
            up_delay: rtt / 2,
            down_delay: rtt - rtt / 2,
            kbit_per_s: None,
        }
    }

    /// This link with each direction capped at `kbit` kbit/s.
    pub fn capped(self, kbit: u64) -> Link {
        Link {
            kbit_per_s: Some(kbit.max(1)),
            ..self
        }
    }

    /// How long `bytes` take to pass the bandwidth cap.
    fn transmit(&self, bytes: usize) -> Duration {
        self.kbit_per_s.map_or(Duration::ZERO, |k| {
            Duration::from_secs_f64(bytes as f64 * 8.0 / (k as f64 * 1000.0))
        })
    }
}

impl FaultProxy {
    /// Like [`FaultProxy::start`], with the link to `target` shaped as `link`.
    pub async fn start_shaped(target: SocketAddr, link: Link) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let shaper = listener.local_addr()?;
        let (tx, rx) = watch::channel(link);
        let mut proxy = FaultProxy::start(shaper).await?;
        tokio::spawn(shaper_loop(listener, target, rx, proxy.shared.stop.clone()));
        proxy.link = Some(tx);
        Ok(proxy)
    }

    /// Changes the link's shape (a proxy from [`FaultProxy::start_shaped`]); bytes already in
    /// the link keep the shape they entered with.
    pub fn set_link(&self, link: Link) {
        if let Some(l) = &self.link {
            l.send_replace(link);
        }
    }

    /// Listens on `127.0.0.1:0` and forwards to `target`, in [`Mode::Pass`].
    pub async fn start(target: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let (mode, _) = watch::channel((0, Mode::Pass));
        let shared = Arc::new(Shared {
            target,
            mode,
            cut: Mutex::new(CancellationToken::new()),
            stop: stop.clone(),
            counters: Counters::default(),
            capture: std::sync::atomic::AtomicBool::new(false),
            captured: Mutex::new(Vec::new()),
        });
        tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(FaultProxy {
            addr,
            shared,
            link: None,
            _stop: stop.drop_guard(),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn mode(&self) -> Mode {
        self.shared.mode.borrow().1
    }

    /// Switches the mode; takes effect for the next chunk of every connection.
    pub fn set_mode(&self, mode: Mode) {
        self.shared.mode.send_modify(|(gen, m)| {
            *gen += 1;
            *m = mode;
        });
    }

    /// Resets every connection the proxy carries now (new ones are not affected).
    pub fn cut_all(&self) {
        let old = std::mem::replace(
            &mut *self.shared.cut.lock().unwrap_or_else(|e| e.into_inner()),
            CancellationToken::new(),
        );
        old.cancel();
    }

    /// Keeps (or stops keeping, for connections accepted from now on) a copy of the bytes
    /// forwarded to each client.
    pub fn capture_to_clients(&self, on: bool) {
        self.shared.capture.store(on, Ordering::Relaxed);
    }

    /// What was forwarded to each captured connection so far, in accept order.
    pub fn captured_to_clients(&self) -> Vec<Vec<u8>> {
        self.shared
            .captured
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|c| c.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }

    /// Connections accepted (in any mode).
    pub fn accepted(&self) -> u64 {
        self.shared.counters.accepted.load(Ordering::Relaxed)
    }
    /// Connections reset at once in [`Mode::Refuse`].
    pub fn refused(&self) -> u64 {
        self.shared.counters.refused.load(Ordering::Relaxed)
    }
    /// Connections accepted in [`Mode::BlackHole`] (never forwarded).
    pub fn black_holed(&self) -> u64 {
        self.shared.counters.black_holed.load(Ordering::Relaxed)
    }
    /// Connections reset by [`Mode::ResetAfter`] or [`Mode::HalfDeadAfter`].
    pub fn resets(&self) -> u64 {
        self.shared.counters.resets.load(Ordering::Relaxed)
    }
    /// Connections reset by [`FaultProxy::cut_all`].
    pub fn cut(&self) -> u64 {
        self.shared.counters.cut.load(Ordering::Relaxed)
    }
    /// Connections open now (forwarded or black-holed).
    pub fn active(&self) -> u64 {
        self.shared.counters.active.load(Ordering::Relaxed)
    }
    /// Bytes forwarded from clients to the target.
    pub fn bytes_from_clients(&self) -> u64 {
        self.shared.counters.from_clients.load(Ordering::Relaxed)
    }
    /// Bytes forwarded from the target to clients.
    pub fn bytes_to_clients(&self) -> u64 {
        self.shared.counters.to_clients.load(Ordering::Relaxed)
    }
    /// Bytes read and discarded (black hole).
    pub fn bytes_swallowed(&self) -> u64 {
        self.shared.counters.swallowed.load(Ordering::Relaxed)
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let client = tokio::select! {
            r = listener.accept() => match r {
                Ok((c, _)) => c,
                Err(_) => {
                    // EMFILE and the like: do not spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = shared.stop.cancelled() => return,
        };
        shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
        let cut = shared.cut.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mode = shared.mode.borrow().1;
        match mode {
            Mode::Refuse => {
                shared.counters.refused.fetch_add(1, Ordering::Relaxed);
                reset(client);
            }
            Mode::BlackHole => {
                shared.counters.black_holed.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(black_hole(client, shared.clone(), cut));
            }
            Mode::Pass | Mode::Delay(_) | Mode::ResetAfter(_) | Mode::HalfDeadAfter(..) => {
                tokio::spawn(forward(client, shared.clone(), cut));
            }
        }
    }
}

/// Closes with RST instead of FIN.
fn reset(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}

/// Counts a connection as active while it lives.
struct Active<'a>(&'a Counters);

impl<'a> Active<'a> {
    fn new(c: &'a Counters) -> Active<'a> {
        c.active.fetch_add(1, Ordering::Relaxed);
        Active(c)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn black_hole(mut client: TcpStream, shared: Arc<Shared>, cut: CancellationToken) {
    let _active = Active::new(&shared.counters);
    let mut buf = vec![0u8; 16 << 10];
    loop {
        tokio::select! {
            r = client.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    shared.counters.swallowed.fetch_add(n as u64, Ordering::Relaxed);
                }
            },
            _ = cut.cancelled() => {
                shared.counters.cut.fetch_add(1, Ordering::Relaxed);
                break;
            }
            _ = shared.stop.cancelled() => break,
        }
    }
    reset(client);
}

/// How a forwarded connection ended.
enum End {
    /// EOF or an error on one side: close both (FIN).
    Closed,
    /// Reset both sides (RST).
    Reset,
}

async fn forward(mut client: TcpStream, shared: Arc<Shared>, cut: CancellationToken) {
    let _active = Active::new(&shared.counters);
    let mut server = match TcpStream::connect(shared.target).await {
        Ok(s) => s,
        Err(_) => return reset(client),
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let end = pump(&mut client, &mut server, &shared, &cut).await;
    match end {
        End::Reset => {
            reset(client);
            reset(server);
        }
        End::Closed => {
            let _ = client.shutdown().await;
            let _ = server.shutdown().await;
        }
    }
}

async fn pump(
    client: &mut TcpStream,
    server: &mut TcpStream,
    shared: &Shared,
    cut: &CancellationToken,
) -> End {
    let c = &shared.counters;
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    let mut up = vec![0u8; 16 << 10];
    let mut down = vec![0u8; 16 << 10];
    // Client bytes since the mode (generation) this connection last saw.
    let mut gen_seen = shared.mode.borrow().0;
    let mut client_bytes = 0u64;
    let capture = if shared.capture.load(Ordering::Relaxed) {
        let buf = Arc::new(Mutex::new(Vec::new()));
        shared
            .captured
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(buf.clone());
        Some(buf)
    } else {
        None
    };
    // Set once a `HalfDeadAfter` limit is reached: client bytes are dropped until then.
    let mut dead_until: Option<tokio::time::Instant> = None;
    loop {
        let deadline = dead_until;
        tokio::select! {
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => {
                c.resets.fetch_add(1, Ordering::Relaxed);
                return End::Reset;
            }
            r = cr.read(&mut up) => {
                let n = match r {
                    Ok(0) | Err(_) => return End::Closed,
                    Ok(n) => n,
                };
                if dead_until.is_some() {
                    c.swallowed.fetch_add(n as u64, Ordering::Relaxed);
                    continue;
                }
                let (gen, mode) = *shared.mode.borrow();
                if gen != gen_seen {
                    gen_seen = gen;
                    client_bytes = 0;
                }
                match mode {
                    Mode::BlackHole => {
                        c.swallowed.fetch_add(n as u64, Ordering::Relaxed);
                        continue;
                    }
                    Mode::Delay(d) => tokio::time::sleep(d).await,
                    Mode::ResetAfter(limit) => {
                        let room = limit.saturating_sub(client_bytes);
                        if (n as u64) >= room {
                            let room = room as usize;
                            if sw.write_all(&up[..room]).await.is_ok() {
                                let _ = sw.flush().await;
                            }
                            c.from_clients.fetch_add(room as u64, Ordering::Relaxed);
                            c.resets.fetch_add(1, Ordering::Relaxed);
                            return End::Reset;
                        }
                        client_bytes += n as u64;
                    }
                    Mode::HalfDeadAfter(limit, grace) => {
                        let room = limit.saturating_sub(client_bytes);
                        if (n as u64) >= room {
                            let room = room as usize;
                            if sw.write_all(&up[..room]).await.is_err() {
                                return End::Reset;
                            }
                            c.from_clients.fetch_add(room as u64, Ordering::Relaxed);
                            c.swallowed.fetch_add((n - room) as u64, Ordering::Relaxed);
                            dead_until = Some(tokio::time::Instant::now() + grace);
                            continue;
                        }
                        client_bytes += n as u64;
                    }
                    Mode::Pass | Mode::Refuse => {}
                }
                if sw.write_all(&up[..n]).await.is_err() {
                    return End::Closed;
                }
                c.from_clients.fetch_add(n as u64, Ordering::Relaxed);
            }
            r = sr.read(&mut down) => {
                let n = match r {
                    Ok(0) | Err(_) => return End::Closed,
                    Ok(n) => n,
                };
                let mode = shared.mode.borrow().1;
                match mode {
                    Mode::BlackHole => {
                        c.swallowed.fetch_add(n as u64, Ordering::Relaxed);
                        continue;
                    }
                    Mode::Delay(d) => tokio::time::sleep(d).await,
                    Mode::Pass | Mode::Refuse | Mode::ResetAfter(_) | Mode::HalfDeadAfter(..) => {}
                }
                if cw.write_all(&down[..n]).await.is_err() {
                    return End::Closed;
                }
                if let Some(buf) = &capture {
                    buf.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend_from_slice(&down[..n]);
                }
                c.to_clients.fetch_add(n as u64, Ordering::Relaxed);
            }
            _ = cut.cancelled() => {
                c.cut.fetch_add(1, Ordering::Relaxed);
                return End::Reset;
            }
            _ = shared.stop.cancelled() => return End::Reset,
        }
    }
}

/// The link shaper: accepts the proxy's connections and carries each to `target` through two
/// shaped directions.
async fn shaper_loop(
    listener: TcpListener,
    target: SocketAddr,
    link: watch::Receiver<Link>,
    stop: CancellationToken,
) {
    loop {
        let client = tokio::select! {
            r = listener.accept() => match r {
                Ok((c, _)) => c,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let link = link.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(target).await else {
                return reset(client);
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            let up = shape(cr, sw, link.clone(), true, stop.clone());
            let down = shape(sr, cw, link, false, stop);
            tokio::join!(up, down);
        });
    }
}

/// One direction of a shaped link: each chunk is stamped when read, leaves the bandwidth cap
/// after the chunks before it, and is written `delay` after that. Reading never waits for the
/// delay, so what is in flight is pipelined as on a real path.
async fn shape(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: watch::Receiver<Link>,
    up: bool,
    stop: CancellationToken,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let n = tokio::select! {
                r = from.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                },
                _ = stop.cancelled() => return,
            };
            if tx
                .send((tokio::time::Instant::now(), buf[..n].to_vec()))
                .is_err()
            {
                return;
            }
        }
    };
    let writer = async move {
        let mut free_at = tokio::time::Instant::now();
        while let Some((read_at, chunk)) = rx.recv().await {
            let l = *link.borrow();
            let delay = if up { l.up_delay } else { l.down_delay };
            free_at = free_at.max(read_at) + l.transmit(chunk.len());
            tokio::time::sleep_until(free_at + delay).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    //! The proxy against a local echo server (no broker needed).
    use super::*;
    use std::time::Instant;

    /// An echo server; returns its address and the bytes it has received in total.
    async fn echo_server() -> (SocketAddr, Arc<AtomicU64>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let got = Arc::new(AtomicU64::new(0));
        let g = got.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let g = g.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        g.fetch_add(n as u64, Ordering::Relaxed);
                        if s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        (addr, got)
    }

    async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> io::Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await?;
        Ok(back)
    }

    const QUICK: Duration = Duration::from_secs(2);

    async fn wait_for(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + QUICK;
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn passes_bytes_both_ways_and_counts_them() {
        let (target, _) = echo_server().await;
        let p = FaultProxy::start(target).await.unwrap();
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        assert_eq!(round_trip(&mut s, b"hello").await.unwrap(), b"hello");
        assert_eq!(p.bytes_from_clients(), 5);
        assert_eq!(p.bytes_to_clients(), 5);
        assert_eq!(p.active(), 1);
        drop(s);
        wait_for("the connection to end", || p.active() == 0).await;
    }

    #[tokio::test]
    async fn refuse_resets_new_connections_only() {
        let (target, got) = echo_server().await;
        let p = FaultProxy::start(target).await.unwrap();
        let mut old = TcpStream::connect(p.addr()).await.unwrap();
        round_trip(&mut old, b"a").await.unwrap();
        p.set_mode(Mode::Refuse);
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        let r = tokio::time::timeout(QUICK, round_trip(&mut s, b"ping"))
            .await
            .unwrap();
        assert!(r.is_err(), "a refused connection must fail: {r:?}");
        assert_eq!(p.refused(), 1);
        assert_eq!(round_trip(&mut old, b"b").await.unwrap(), b"b");
        assert_eq!(got.load(Ordering::Relaxed), 2, "nothing of the refused one");
        p.set_mode(Mode::Pass);
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        assert_eq!(round_trip(&mut s, b"again").await.unwrap(), b"again");
    }

    #[tokio::test]
    async fn black_hole_swallows_and_new_connections_never_reach_the_target() {
        let (target, got) = echo_server().await;
        let p = FaultProxy::start(target).await.unwrap();
        let mut old = TcpStream::connect(p.addr()).await.unwrap();
        round_trip(&mut old, b"a").await.unwrap();
        p.set_mode(Mode::BlackHole);
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        let r = tokio::time::timeout(Duration::from_millis(200), round_trip(&mut s, b"x")).await;
        assert!(r.is_err(), "no answer in a black hole");
        let r = tokio::time::timeout(Duration::from_millis(200), round_trip(&mut old, b"y")).await;
        assert!(r.is_err(), "existing connections are swallowed too");
        assert_eq!(
            got.load(Ordering::Relaxed),
            1,
            "only the byte before the hole"
        );
        assert_eq!(p.black_holed(), 1);
        assert_eq!(p.bytes_swallowed(), 2);
        // Back to pass: the black-holed connection stays dead, new ones work.
        p.set_mode(Mode::Pass);
        let r = tokio::time::timeout(Duration::from_millis(200), round_trip(&mut s, b"z")).await;
        assert!(
            r.is_err(),
            "a connection accepted in the hole never gets an upstream"
        );
        let mut n = TcpStream::connect(p.addr()).await.unwrap();
        assert_eq!(round_trip(&mut n, b"ok").await.unwrap(), b"ok");
    }

    #[tokio::test]
    async fn delay_adds_latency_per_chunk() {
        let (target, _) = echo_server().await;
        let p = FaultProxy::start(target).await.unwrap();
        p.set_mode(Mode::Delay(Duration::from_millis(100)));
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        let t = Instant::now();
        assert_eq!(round_trip(&mut s, b"slow").await.unwrap(), b"slow");
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(200),
            "{took:?}: one delay each way"
        );
        assert!(took < QUICK, "{took:?}");
    }

    #[tokio::test]
    async fn a_shaped_link_delays_each_direction_pipelines_and_caps_the_rate() {
        let (target, _) = echo_server().await;
        let p = FaultProxy::start_shaped(target, Link::rtt(Duration::from_millis(200)))
            .await
            .unwrap();
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        let t = Instant::now();
        assert_eq!(round_trip(&mut s, b"ping").await.unwrap(), b"ping");
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(200),
            "{took:?}: one round trip"
        );
        assert!(took < Duration::from_millis(600), "{took:?}");
        // Ten messages sent at once arrive one round trip later, not ten.
        let t = Instant::now();
        for i in 0..10u8 {
            s.write_all(&[i; 100]).await.unwrap();
        }
        let mut back = vec![0u8; 1000];
        s.read_exact(&mut back).await.unwrap();
        let took = t.elapsed();
        assert!(took < Duration::from_millis(700), "pipelined: {took:?}");
        // 64 KiB at 1 Mbit/s each way take at least half a second to pass.
        p.set_link(Link::default().capped(1000));
        let t = Instant::now();
        let data = vec![7u8; 64 << 10];
        let (mut r, mut w) = s.into_split();
        // The writer is kept open until everything is back (the proxy closes both sides on EOF).
        let send = tokio::spawn(async move {
            w.write_all(&data).await.unwrap();
            w
        });
        let mut back = vec![0u8; 64 << 10];
        r.read_exact(&mut back).await.unwrap();
        drop(send.await.unwrap());
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(500), "capped: {took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
    }

    #[tokio::test]
    async fn reset_after_n_forwards_exactly_n_client_bytes_then_resets_both_sides() {
        let (target, got) = echo_server().await;
        let p = FaultProxy::start(target).await.unwrap();
        let mut old = TcpStream::connect(p.addr()).await.unwrap();
        round_trip(&mut old, b"0123").await.unwrap();
        // Counted from the switch for an existing connection.
        p.set_mode(Mode::ResetAfter(10));
        old.write_all(b"0123456").await.unwrap();
        let mut back = [0u8; 7];
        old.read_exact(&mut back).await.unwrap();
        old.write_all(b"abcdefgh").await.unwrap();
        let mut rest = Vec::new();
        let r = tokio::time::timeout(QUICK, old.read_to_end(&mut rest))
            .await
            .unwrap();
        assert!(r.is_err(), "reset, not a clean close: {r:?} {rest:?}");
        assert_eq!(p.resets(), 1);
        wait_for("the target to get 4 + 10 bytes", || {
            got.load(Ordering::Relaxed) == 14
        })
        .await;
        // A new connection counts from its start.
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        s.write_all(&[7u8; 25]).await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(QUICK, s.read_to_end(&mut rest))
            .await
            .unwrap();
        assert!(rest.len() <= 10, "{}", rest.len());
        wait_for("10 more bytes at the target", || {
            got.load(Ordering::Relaxed) == 24
        })
        .await;
        assert_eq!(p.resets(), 2);
    }

    #[tokio::test]
    async fn half_dead_after_n_drops_client_bytes_but_delivers_answers_until_the_reset() {
        let (target, got) = echo_server().await;
        let p = FaultProxy::start(target).await.unwrap();
        p.capture_to_clients(true);
        p.set_mode(Mode::HalfDeadAfter(6, Duration::from_millis(300)));
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        let t = Instant::now();
        s.write_all(b"abcdefgh").await.unwrap();
        // The first 6 bytes reach the echo server and their echo comes back.
        let mut back = [0u8; 6];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"abcdef");
        s.write_all(b"more").await.unwrap();
        let mut rest = Vec::new();
        let r = tokio::time::timeout(QUICK, s.read_to_end(&mut rest))
            .await
            .unwrap();
        assert!(r.is_err(), "reset after the grace: {r:?} {rest:?}");
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(got.load(Ordering::Relaxed), 6);
        assert_eq!(p.resets(), 1);
        assert_eq!(p.captured_to_clients(), vec![b"abcdef".to_vec()]);
    }

    #[tokio::test]
    async fn cut_all_resets_current_connections_and_new_ones_work() {
        let (target, _) = echo_server().await;
        let p = FaultProxy::start(target).await.unwrap();
        let mut a = TcpStream::connect(p.addr()).await.unwrap();
        let mut b = TcpStream::connect(p.addr()).await.unwrap();
        round_trip(&mut a, b"a").await.unwrap();
        round_trip(&mut b, b"b").await.unwrap();
        p.cut_all();
        for s in [&mut a, &mut b] {
            let mut rest = Vec::new();
            let r = tokio::time::timeout(QUICK, s.read_to_end(&mut rest))
                .await
                .unwrap();
            assert!(r.is_err(), "{r:?}");
        }
        assert_eq!(p.cut(), 2);
        wait_for("no active connection", || p.active() == 0).await;
        let mut c = TcpStream::connect(p.addr()).await.unwrap();
        assert_eq!(round_trip(&mut c, b"c").await.unwrap(), b"c");
    }

    #[tokio::test]
    async fn dropping_the_proxy_stops_it() {
        let (target, _) = echo_server().await;
        let p = FaultProxy::start(target).await.unwrap();
        let addr = p.addr();
        let mut s = TcpStream::connect(addr).await.unwrap();
        round_trip(&mut s, b"x").await.unwrap();
        drop(p);
        let mut rest = Vec::new();
        let r = tokio::time::timeout(QUICK, s.read_to_end(&mut rest))
            .await
            .unwrap();
        assert!(r.is_err(), "connections are reset: {r:?}");
        let deadline = Instant::now() + QUICK;
        while TcpStream::connect(addr).await.is_ok() {
            assert!(Instant::now() < deadline, "still listening");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
