//! Login abuse (issue 15, item 4), over real TLS from several loopback addresses (127.0.0.x):
//! password guessing is cut off per source address before argon2 runs, a flood of new
//! connections from one address is closed before the TLS handshake, password checks stay
//! bounded under a flood from many addresses, and good devices still get in. The bucket
//! arithmetic and the bounded table are tested with paused time in `gateway/src/ingest/abuse.rs`.
#![allow(clippy::unwrap_used)]

mod ingest_support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use gateway::config::Config;
use ingest_support::raw::{self, Connect, RecvError, TlsRaw};
use ingest_support::{client_tls, TestGateway};
use rustls::pki_types::ServerName;

/// A TLS client connecting from `local` (a 127.0.0.x address), with `device`'s certificate if
/// given.
async fn dial_from(gw: &TestGateway, local: &str, device: Option<&str>) -> std::io::Result<TlsRaw> {
    let connect = async {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(local.parse().unwrap(), 0))?;
        let tcp = sock.connect(gw.addr).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(client_tls(&gw.certs, device))
            .connect(name, tcp)
            .await
    };
    tokio::time::timeout(raw::WAIT, connect)
        .await
        .map_err(|_| std::io::Error::other("TLS connect timed out"))?
        .map(raw::Raw::new)
}

fn passwords(c: &mut Config, dir: &std::path::Path) {
    let file = dir.join("passwd");
    gateway::ingest::auth::set_password(&file, "alice", "s3cret").unwrap();
    c.auth.password_file = Some(file);
}

fn password_checks(gw: &TestGateway) -> u64 {
    gw.stats.password_checks.load(Ordering::SeqCst)
}

/// 60 wrong-password CONNECTs at once from one address: 5 (the burst) have their password
/// checked, 55 are refused unchecked ("server unavailable" / "connection rate exceeded"). The
/// right password from that address is refused too while it is limited; from another address
/// it gets in, and so does a certificate device from the guessing address.
#[tokio::test]
async fn password_guessing_from_one_address_is_cut_off_before_argon2() {
    let gw = TestGateway::start(|c, dir| {
        passwords(c, dir);
        c.limits.failed_login_burst = 5;
        c.limits.failed_login_interval = Duration::from_secs(3600);
    })
    .await;
    let guesses = (0..60u32).map(|i| {
        let gw = &gw;
        async move {
            let mut c = dial_from(gw, "127.0.0.2", None).await.unwrap();
            let guess = format!("guess-{i}");
            let connect = if i % 2 == 0 {
                Connect::v4("alice").login("alice", &guess)
            } else {
                Connect::v5("alice").login("alice", &guess)
            };
            (i % 2 == 1, c.connect(&connect).await.connack_code())
        }
    });
    let answers = futures_util::future::join_all(guesses).await;
    let checked = answers
        .iter()
        .filter(|(v5, code)| *code == if *v5 { 0x86 } else { 0x04 })
        .count();
    let throttled = answers
        .iter()
        .filter(|(v5, code)| *code == if *v5 { 0x9F } else { 0x03 })
        .count();
    assert_eq!((checked, throttled), (5, 55), "{answers:?}");
    assert_eq!(password_checks(&gw), 5, "argon2 ran for the burst only");
    gw.wait_refused("auth", 5).await;
    gw.wait_refused("login_throttled", 55).await;

    // The right password, from the guessing address: not even checked.
    let mut c = dial_from(&gw, "127.0.0.2", None).await.unwrap();
    let ack = c
        .connect(&Connect::v5("alice").login("alice", "s3cret"))
        .await;
    assert_eq!(ack.connack_code(), 0x9F);
    assert_eq!(password_checks(&gw), 5);

    // From another address: in.
    let mut alice = dial_from(&gw, "127.0.0.3", None).await.unwrap();
    let ack = alice
        .connect(&Connect::v4("alice").login("alice", "s3cret"))
        .await;
    assert_eq!(ack.connack_code(), 0);
    // A certificate device from the guessing address: nothing to guess, in.
    let mut dev = dial_from(&gw, "127.0.0.2", Some("dev-00001"))
        .await
        .unwrap();
    assert_eq!(
        dev.connect(&Connect::v4("dev-00001")).await.connack_code(),
        0
    );
    gw.stop().await;
}

/// A flood of new connections from one address: past the burst they are closed before the TLS
/// handshake; other addresses are not affected.
#[tokio::test]
async fn a_connection_flood_from_one_address_is_closed_before_tls() {
    let gw = TestGateway::start(|c, _| {
        c.limits.connect_rate_per_address = 1;
        c.limits.connect_burst_per_address = 5;
    })
    .await;
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..20 {
        match dial_from(&gw, "127.0.0.4", Some("dev-00001")).await {
            Ok(mut c) => {
                // TLS 1.3: the client may finish before the server closed; the close shows on
                // the first read.
                c.send(&Connect::v4("dev-00001").encode()).await.ok();
                match c.recv_within(raw::WAIT).await {
                    Ok(p) => {
                        assert_eq!(p.connack_code(), 0);
                        open.push(c);
                    }
                    Err(RecvError::Closed(_)) => refused += 1,
                    Err(RecvError::Timeout) => panic!("neither answered nor closed"),
                }
            }
            Err(_) => refused += 1,
        }
    }
    // 5 at once, then one a second (the loop may take a few seconds on a slow machine).
    assert!(
        open.len() >= 5 && refused >= 10,
        "{} open, {refused} refused",
        open.len()
    );
    gw.wait_refused("connect_rate", refused).await;

    let mut other = dial_from(&gw, "127.0.0.5", Some("dev-00002"))
        .await
        .unwrap();
    assert_eq!(
        other
            .connect(&Connect::v4("dev-00002"))
            .await
            .connack_code(),
        0
    );
    gw.stop().await;
}

/// Wrong passwords from 120 addresses at once (one guess each, so the per-address limit does
/// not help): password checks wait in a bounded line (a permit per core, at most 64 waiting,
/// none past `connect_timeout`); the rest is told "server busy" at once. Every CONNECT is
/// answered, a certificate device connects during the flood, and a good password device after.
#[tokio::test]
async fn a_flood_from_many_addresses_keeps_password_checks_bounded() {
    let gw = TestGateway::start(|c, dir| {
        passwords(c, dir);
        c.limits.connect_timeout = Duration::from_secs(2);
    })
    .await;
    let n = 120u32;
    let flood = (0..n).map(|i| {
        let gw = &gw;
        async move {
            let local = format!("127.0.{}.{}", 10 + i / 200, 10 + i % 200);
            let mut c = dial_from(gw, &local, None).await.unwrap();
            c.connect(&Connect::v5("alice").login("alice", "wrong"))
                .await
                .connack_code()
        }
    });
    let during = async {
        let mut dev = dial_from(&gw, "127.0.0.2", Some("dev-00001"))
            .await
            .unwrap();
        dev.connect(&Connect::v5("dev-00001")).await.connack_code()
    };
    let (answers, dev) = tokio::join!(futures_util::future::join_all(flood), during);
    assert_eq!(dev, 0, "a certificate device needs no password check");
    let wrong = answers.iter().filter(|c| **c == 0x86).count();
    let busy = answers.iter().filter(|c| **c == 0x89).count();
    assert_eq!(
        wrong + busy,
        n as usize,
        "every CONNECT answered: {answers:?}"
    );
    assert_eq!(password_checks(&gw), wrong as u64);
    assert!(
        busy >= 1,
        "the line of waiting checks never filled ({wrong} checked): not a flood here"
    );
    gw.wait_refused("busy", busy as u64).await;

    let mut alice = dial_from(&gw, "127.0.0.3", None).await.unwrap();
    let ack = alice
        .connect(&Connect::v5("alice").login("alice", "s3cret"))
        .await;
    assert_eq!(ack.connack_code(), 0);
    gw.stop().await;
}
