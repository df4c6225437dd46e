//! AMQP 0-9-1 uplink (lapin, rustls with `ring` for amqps): one connection and one channel with
//! publisher confirms per uplink, so records keep their queue order. Messages are persistent
//! (delivery mode 2) and `mandatory`: an unroutable one comes back and goes to the dead letters.
//! An `amqps://` uplink trusts the system's CA store plus `ca_file` (PEM), if set.

use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connect, Connection, ConnectionProperties, ExchangeKind,
};

use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};

use super::{Outcome, Prepared, UplinkError};
use crate::config::AmqpConfig;

/// A connected AMQP uplink.
pub struct AmqpUplink {
    name: String,
    gateway_id: String,
    confirm_timeout: Duration,
    connection: Connection,
    channel: Channel,
    /// Confirms of the messages published and not yet answered, in publish order.
    confirms: FuturesOrdered<BoxFuture<'static, (u64, lapin::Result<Confirmation>)>>,
    /// Set when a publish failed: nothing more is published, `next` reports it.
    error: Option<UplinkError>,
}

/// Node `url` with the password from `password_env` (if configured) put in.
fn url_with_password(password_env: Option<&str>, url: &str) -> Result<String, String> {
    let Some(var) = password_env else {
        return Ok(url.to_string());
    };
    let password = std::env::var(var)
        .map_err(|_| format!("environment variable {var} (password_env) is not set"))?;
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| "url has no scheme".to_string())?;
    let (auth, host) = match rest.split_once('@') {
        Some((auth, host)) => (auth, host),
        None => ("guest", rest),
    };
    let user = auth.split(':').next().unwrap_or("guest");
    let encoded: String = password
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    Ok(format!("{scheme}://{user}:{encoded}@{host}"))
}

/// The URL as it may be logged: no password.
pub fn masked_url(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(_)) => {
            let (auth, host) = rest.rsplit_once('@').unwrap_or(("", rest));
            let user = auth.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_string(),
    }
}

/// Opens a connection to node `url`, with the password from `password_env` and, for amqps,
/// the CAs of `ca_file` trusted besides the system's (read at each connect, so a renewed file is
/// picked up without a restart). Errors do not name the url (the caller does, masked).
pub(crate) async fn open_connection(
    url: &str,
    password_env: Option<&str>,
    ca_file: Option<&std::path::Path>,
) -> Result<Connection, String> {
    let url = url_with_password(password_env, url)?;
    let tls = OwnedTLSConfig {
        identity: None,
        cert_chain: match ca_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| format!("ca_file {}: {e}", path.display()))?,
            ),
            None => None,
        },
    };
    let runtime = lapin::runtime::default_runtime().map_err(|e| e.to_string())?;
    url.as_str()
        .connect_with_config(ConnectionProperties::default(), tls, runtime)
        .await
        .map_err(|e| e.to_string())
}

impl AmqpUplink {
    /// Connects, opens the confirm channel and declares what is configured, all within
    /// `confirm_timeout`: a peer that accepts TCP and then says nothing (a black hole) is an error
    /// like any other, and the forwarder backs off and tries again.
    pub async fn connect(
        cfg: &AmqpConfig,
        node: usize,
        gateway_id: &str,
    ) -> Result<AmqpUplink, UplinkError> {
        let urls = cfg.urls();
        let url = urls.get(node).or(urls.first()).copied().unwrap_or_default();
        match tokio::time::timeout(
            cfg.confirm_timeout,
            Self::connect_inner(cfg, url, gateway_id),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(UplinkError::Connect {
                uplink: cfg.name.clone(),
                why: format!(
                    "no AMQP handshake within {} s (confirm_timeout)",
                    cfg.confirm_timeout.as_secs_f64()
                ),
            }),
        }
    }

    async fn connect_inner(
        cfg: &AmqpConfig,
        url: &str,
        gateway_id: &str,
    ) -> Result<AmqpUplink, UplinkError> {
        let err = |why: String| UplinkError::Connect {
            uplink: cfg.name.clone(),
            why: format!("{}: {why}", masked_url(url)),
        };
        let connection = open_connection(url, cfg.password_env.as_deref(), cfg.ca_file.as_deref())
            .await
            .map_err(err)?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| err(format!("open channel: {e}")))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| err(format!("confirm.select: {e}")))?;
        if cfg.declare {
            let exchange = cfg.exchange.clone();
            channel
                .exchange_declare(
                    exchange.as_str().into(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| err(format!("declare exchange {exchange}: {e}")))?;
            if let Some(q) = &cfg.declare_queue {
                channel
                    .queue_declare(
                        q.as_str().into(),
                        QueueDeclareOptions {
                            durable: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| err(format!("declare queue {q}: {e}")))?;
                channel
                    .queue_bind(
                        q.as_str().into(),
                        exchange.as_str().into(),
                        "#".into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| err(format!("bind queue {q}: {e}")))?;
            }
        }
        Ok(AmqpUplink {
            name: cfg.name.clone(),
            gateway_id: gateway_id.to_string(),
            confirm_timeout: cfg.confirm_timeout,
            connection,
            channel,
            confirms: FuturesOrdered::new(),
            error: None,
        })
    }

    fn properties(&self, m: &Prepared) -> BasicProperties {
        let r = &m.record;
        let mut headers = FieldTable::default();
        // MQTT 5 user properties first, so the gateway's own headers win on a name clash.
        for (k, v) in &r.user_properties {
            headers.insert(
                ShortString::from(k.as_str()),
                AMQPValue::LongString(LongString::from(v.as_bytes())),
            );
        }
        let s = |v: &str| AMQPValue::LongString(LongString::from(v.as_bytes()));
        headers.insert("device_id".into(), s(&r.device_id));
        headers.insert("mqtt_topic".into(), s(&r.topic));
        headers.insert("mqtt_qos".into(), AMQPValue::ShortShortUInt(r.qos));
        headers.insert(
            "gateway_seq".into(),
            AMQPValue::LongLongInt(i64::try_from(r.seq).unwrap_or(i64::MAX)),
        );
        if let Some(cd) = &r.correlation_data {
            headers.insert(
                "mqtt_correlation_data".into(),
                AMQPValue::LongString(LongString::from(cd.as_slice())),
            );
        }
        if let Some(rt) = &r.response_topic {
            headers.insert("mqtt_response_topic".into(), s(rt));
        }
        let mut p = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(format!("{}-{}", self.gateway_id, r.seq).as_str().into())
            .with_timestamp(r.received_at_us / 1_000_000)
            .with_app_id(self.gateway_id.as_str().into())
            .with_headers(headers);
        if let Some(ct) = &m.content_type {
            p = p.with_content_type(ct.as_str().into());
        }
        // MQTT 5 request/response: a device's reply carries the command's correlation data
        // (as `correlation_id` too when it is short text) and any response topic.
        if let Some(cd) = &r.correlation_data {
            if let Some(text) = std::str::from_utf8(cd).ok().filter(|t| t.len() <= 255) {
                p = p.with_correlation_id(text.into());
            }
        }
        p
    }

    /// Publishes `m` (persistent, mandatory) and queues its confirm; does not wait for it. A
    /// publish that cannot even be handed to the connection within the confirm timeout (a
    /// black-holed link whose socket buffers are full) marks the uplink stalled.
    pub async fn send(&mut self, m: &Prepared) {
        if self.error.is_some() {
            return;
        }
        let publish = self.channel.basic_publish(
            m.destination.as_str().into(),
            m.key.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &m.payload,
            self.properties(m),
        );
        match tokio::time::timeout(self.confirm_timeout, publish).await {
            Ok(Ok(confirm)) => {
                let seq = m.record.seq;
                self.confirms
                    .push_back(Box::pin(confirm.map(move |r| (seq, r))));
            }
            Ok(Err(e)) => {
                self.error = Some(UplinkError::Lost {
                    uplink: self.name.clone(),
                    why: e.to_string(),
                })
            }
            Err(_) => {
                self.error = Some(UplinkError::Stalled {
                    uplink: self.name.clone(),
                    secs: self.confirm_timeout.as_secs(),
                })
            }
        }
    }

    /// Whether a publish failed (see [`super::Uplink::failed`]).
    pub fn failed(&self) -> bool {
        self.error.is_some()
    }

    /// The next confirm, in publish order; the failure after the confirms that came before it.
    /// Cancel-safe: `FuturesOrdered::next` keeps every confirm it has not returned.
    pub async fn next(&mut self) -> Result<(u64, Outcome), UplinkError> {
        match self.confirms.next().await {
            Some((seq, Ok(confirmation))) => Ok((
                seq,
                match confirmation {
                    Confirmation::Ack(None) | Confirmation::NotRequested => Outcome::Confirmed,
                    Confirmation::Ack(Some(ret)) | Confirmation::Nack(Some(ret)) => {
                        Outcome::Returned {
                            code: ret.reply_code,
                            text: ret.reply_text.to_string(),
                        }
                    }
                    Confirmation::Nack(None) => Outcome::Nacked,
                },
            )),
            Some((_, Err(e))) => {
                // Confirms are in publish order: none after this one will come.
                self.confirms = FuturesOrdered::new();
                let error = self.error.take().unwrap_or(UplinkError::Lost {
                    uplink: self.name.clone(),
                    why: e.to_string(),
                });
                self.error = Some(error.clone());
                Err(error)
            }
            None => match &self.error {
                Some(e) => Err(e.clone()),
                None => std::future::pending().await,
            },
        }
    }

    pub async fn close(self) {
        let _ = self
            .channel
            .close(200, "gateway shutting down".into())
            .await;
        let _ = self
            .connection
            .close(200, "gateway shutting down".into())
            .await;
    }
}
