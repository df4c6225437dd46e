//! What the downlink tests (downlink_amqp, downlink_kafka) share: devices over mutual TLS that
//! subscribe to their commands and receive them, polling, and the downlink's stats. The test
//! file declares `mod ingest_support;` before this module.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use gateway::downlink::{DownlinkState, DownlinkStats};
use gateway::status::Status;

use crate::ingest_support::{
    self,
    raw::{self, Connect, Received},
};

/// MQTT 5 property ids.
pub const RESPONSE_TOPIC: u8 = 0x08;
pub const CORRELATION_DATA: u8 = 0x09;

pub fn unique(prefix: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{n}", std::process::id())
}

pub fn dev(n: u32) -> String {
    format!("dev-{n:05}")
}

/// Device `id` connected over mutual TLS with its certificate from `certs`; CONNACK checked.
pub async fn device(certs: &Path, status: &Status, id: &str, connect: &Connect) -> raw::TlsRaw {
    let addr = status.listeners[0].0;
    let tls = ingest_support::client_tls(certs, Some(id));
    let mut c = raw::tls_connect(addr, tls).await.unwrap();
    let ack = c.connect(connect).await;
    assert_eq!(ack.connack_code(), 0, "CONNACK for {id}: {ack:?}");
    c
}

/// Subscribes `device` to its commands at QoS 1.
pub async fn subscribe(c: &mut raw::TlsRaw, v5: bool, device: &str) {
    let filter = format!("devices/{device}/commands/#");
    c.send(&raw::subscribe_with(v5, 1, &[(filter.as_str(), 1)]))
        .await
        .unwrap();
    let ack = c.recv().await;
    assert_eq!(ack.suback_codes(v5), vec![1], "SUBACK for {device}");
}

/// Receives `n` PUBLISHes, acking each.
pub async fn receive(c: &mut raw::TlsRaw, v5: bool, n: usize) -> Vec<Received> {
    let mut got = Vec::new();
    while got.len() < n {
        let p = c
            .recv_within(Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{e:?} waiting for PUBLISH {} of {n}; got {:?}",
                    got.len() + 1,
                    payloads(&got)
                )
            });
        let r = p.publish(v5);
        if r.qos == 1 {
            c.send(&raw::puback(r.pkid)).await.unwrap();
        }
        got.push(r);
    }
    got
}

/// Polls `cond` until it holds; panics naming `what` after 30 s.
pub async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The first downlink's stats.
pub fn downlink(status: &Status) -> Arc<DownlinkStats> {
    status.downlinks()[0].stats.clone()
}

/// Waits until the first downlink consumes.
pub async fn consuming(status: &Status) {
    let s = downlink(status);
    wait_for("the downlink to consume", || {
        s.state() == DownlinkState::Consuming
    })
    .await;
}

pub fn payloads(got: &[Received]) -> Vec<String> {
    got.iter()
        .map(|r| String::from_utf8_lossy(&r.payload).to_string())
        .collect()
}

/// An MQTT string: two bytes of length, then the bytes.
pub fn text(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}
