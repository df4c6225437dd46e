//! MQTT 5 refusals: a minimal in-test broker answers the first PUBLISHes with PUBACK reason
//! "quota exceeded" (what the gateway sends when its queue is full). The devices keep those
//! readings, pause, resend them, and with an outbox of 1 keep strict per-device order.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::BytesMut;
use firmware_sim::fleet::{self, FleetConfig, MqttVersion, ProgressMode};
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, ConnectReturnCode, Packet, PingResp, PubAck, PubAckReason,
};
use rumqttc::v5::mqttbytes::Error as CodecError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type Accepted = Arc<Mutex<BTreeMap<String, Vec<u64>>>>;

/// Serves MQTT 5 on 127.0.0.1:0; refuses the first `refuse` QoS 1 PUBLISHes (over all
/// connections), accepts the rest and records their (device, seq) in arrival order.
async fn refusing_broker(
    refuse: usize,
) -> anyhow::Result<(SocketAddr, Accepted, Arc<AtomicUsize>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let accepted: Accepted = Arc::default();
    let refused = Arc::new(AtomicUsize::new(0));
    let (acc, rej) = (accepted.clone(), refused.clone());
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(serve(socket, refuse, acc.clone(), rej.clone()));
        }
    });
    Ok((addr, accepted, refused))
}

async fn serve(
    mut socket: TcpStream,
    refuse: usize,
    accepted: Accepted,
    refused: Arc<AtomicUsize>,
) {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if socket.read_buf(&mut buf).await.unwrap_or(0) == 0 {
            return;
        }
        loop {
            let packet = match Packet::read(&mut buf, None) {
                Ok(p) => p,
                Err(CodecError::InsufficientBytes(_)) => break,
                Err(_) => return,
            };
            let reply = match packet {
                Packet::Connect(..) => Some(Packet::ConnAck(ConnAck {
                    session_present: false,
                    code: ConnectReturnCode::Success,
                    properties: None,
                })),
                Packet::Publish(p) => {
                    let mut ack = PubAck::new(p.pkid, None);
                    if refused.fetch_add(1, Ordering::SeqCst) < refuse {
                        ack.reason = PubAckReason::QuotaExceeded;
                    } else {
                        refused.fetch_sub(1, Ordering::SeqCst);
                        if let Ok(t) = firmware_sim::payload::decode(&p.payload) {
                            if let Ok(mut a) = accepted.lock() {
                                a.entry(t.device_id).or_default().push(t.seq);
                            }
                        }
                    }
                    Some(Packet::PubAck(ack))
                }
                Packet::PingReq(_) => Some(Packet::PingResp(PingResp)),
                Packet::Disconnect(_) => return,
                _ => None,
            };
            if let Some(reply) = reply {
                let mut out = BytesMut::new();
                if reply.write(&mut out, None).is_err() || socket.write_all(&out).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_publishes_are_resent_in_order_after_a_pause() -> anyhow::Result<()> {
    let (addr, accepted, refused) = refusing_broker(5).await?;
    let cfg = FleetConfig {
        broker: addr.to_string(),
        version: MqttVersion::V5,
        devices: 2,
        count_per_device: Some(30),
        rate: 500.0,
        outbox: 1,
        progress: ProgressMode::Off,
        ..FleetConfig::default()
    };
    let ids = cfg.device_ids();
    let report = tokio::time::timeout(
        Duration::from_secs(20),
        fleet::run(cfg, std::future::pending()),
    )
    .await
    .context("fleet run timed out")??;
    assert_eq!(refused.load(Ordering::SeqCst), 5);
    assert_eq!(report.refused, 5, "{report}");
    assert_eq!(report.resent, 5, "each refused reading is sent again");
    assert_eq!(report.acked, 60, "{report}");
    assert!(report.all_delivered());
    let accepted = accepted.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    for id in &ids {
        assert_eq!(
            accepted[id],
            (0..30).collect::<Vec<_>>(),
            "{id}: strict order with outbox 1"
        );
    }
    Ok(())
}
