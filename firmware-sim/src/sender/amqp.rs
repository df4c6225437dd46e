//! The AMQP 0-9-1 side of `firmware-sim command` (lapin): one channel in confirm mode, persistent
//! and mandatory publishes, a window of outstanding confirms (answered in publish order).

use std::time::Instant;

use futures_util::stream::{FuturesOrdered, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties, ExchangeKind};

use super::{Outcome, Pace, Planned, SendConfig, SendError};

/// Sends `plan` in order; returns one outcome per planned command.
pub(super) async fn send(
    url: &str,
    exchange: &str,
    cfg: &SendConfig,
    plan: &[Planned],
    pace: &mut Pace,
    target: &str,
) -> Result<Vec<Outcome>, SendError> {
    let err = |operation: &'static str| {
        move |error: lapin::Error| SendError::Amqp {
            operation,
            target: target.to_owned(),
            error,
        }
    };
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(err("connect"))?;
    let channel = conn.create_channel().await.map_err(err("open channel"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(err("confirm.select"))?;
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(err("exchange.declare"))?;

    let mut outcomes = vec![Outcome::Unsent; plan.len()];
    let mut pending = FuturesOrdered::new();
    // Indices of the commands in `pending`, in publish order (confirms come in this order).
    let mut waiting = std::collections::VecDeque::new();
    let mut stalled = false;
    'plan: for (i, p) in plan.iter().enumerate() {
        while pending.len() >= cfg.window {
            match next_confirm(&mut pending, Instant::now() + cfg.confirm_timeout).await {
                Some((j, o)) => {
                    waiting.pop_front();
                    outcomes[j] = o;
                }
                None => {
                    stalled = true;
                    break 'plan;
                }
            }
        }
        pace.next().await;
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(p.id.as_str().into())
            .with_correlation_id(p.id.as_str().into())
            .with_reply_to(p.reply_topic.as_str().into())
            .with_content_type("application/json".into());
        let publish = channel
            .basic_publish(
                exchange.into(),
                p.routing_key().as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &p.payload,
                props,
            )
            .await;
        match publish {
            Ok(confirm) => {
                pending.push_back(async move { (i, confirm.await) });
                waiting.push_back(i);
            }
            Err(e) => {
                // The channel or connection is gone: nothing after this is sent.
                tracing::warn!(error = %e, id = %p.id, "publish failed; stopping");
                outcomes[i] = Outcome::Failed(format!("basic.publish: {e}"));
                break;
            }
        }
    }
    let deadline = Instant::now() + cfg.confirm_timeout;
    while !stalled && !pending.is_empty() {
        match next_confirm(&mut pending, deadline).await {
            Some((j, o)) => {
                waiting.pop_front();
                outcomes[j] = o;
            }
            None => stalled = true,
        }
    }
    for j in waiting {
        outcomes[j] = Outcome::Failed(format!("no confirm within {:?}", cfg.confirm_timeout));
    }
    let _ = channel.close(200, "commands sent".into()).await;
    let _ = conn.close(200, "commands sent".into()).await;
    Ok(outcomes)
}

/// The next confirm (in publish order), or `None` when none came by `deadline`.
async fn next_confirm<F>(
    pending: &mut FuturesOrdered<F>,
    deadline: Instant,
) -> Option<(usize, Outcome)>
where
    F: std::future::Future<Output = (usize, lapin::Result<Confirmation>)>,
{
    match tokio::time::timeout_at(deadline.into(), pending.next()).await {
        Ok(Some((i, Ok(c)))) => Some((i, outcome(c))),
        Ok(Some((i, Err(e)))) => Some((i, Outcome::Failed(format!("confirm: {e}")))),
        Ok(None) | Err(_) => None,
    }
}

fn outcome(c: Confirmation) -> Outcome {
    match c {
        Confirmation::Ack(None) => Outcome::Confirmed,
        Confirmation::Ack(Some(ret)) | Confirmation::Nack(Some(ret)) => {
            Outcome::Returned(format!("{} {}", ret.reply_code, ret.reply_text))
        }
        Confirmation::Nack(None) => Outcome::Nacked,
        Confirmation::NotRequested => Outcome::Failed("no confirm requested".into()),
    }
}
