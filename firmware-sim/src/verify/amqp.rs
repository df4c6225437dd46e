//! The AMQP 0-9-1 consumer of the verifier (lapin).

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};

use super::{now_us, print_progress, Checks, StopRule, VerifyError, VerifyOptions};

/// How often consumed messages are acknowledged when fewer than half a prefetch window came in.
const ACK_EVERY: Duration = Duration::from_millis(100);
/// How often the progress line is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Consumes until complete (+ settle) or the timeout; returns whether it timed out.
pub(super) async fn consume(
    url: &str,
    queue: &str,
    opts: &VerifyOptions,
    checks: &mut Checks<'_>,
    desc: &str,
) -> Result<bool, VerifyError> {
    let err = |operation: &'static str| {
        move |error: lapin::Error| VerifyError::Amqp {
            operation,
            source_desc: desc.to_owned(),
            error,
        }
    };
    let started = Instant::now();
    let deadline = started + opts.timeout;
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(err("connect"))?;
    let channel = conn.create_channel().await.map_err(err("open channel"))?;
    channel
        .basic_qos(opts.prefetch, BasicQosOptions::default())
        .await
        .map_err(err("basic.qos"))?;
    let tag = format!("firmware-sim-verify-{}", std::process::id());
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(err("basic.consume"))?;

    let ack_batch = u32::from(opts.prefetch / 2).max(1);
    let mut last_tag: Option<u64> = None;
    let mut unacked = 0u32;
    let mut ack_tick = tokio::time::interval(ACK_EVERY);
    let mut progress_tick = tokio::time::interval(PROGRESS_EVERY);
    progress_tick.tick().await;
    let mut stop = StopRule::new(deadline, opts.settle);

    let timed_out = loop {
        let Some(stop_at) = stop.next(checks.complete()) else {
            break false;
        };
        tokio::select! {
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let headers = delivery.properties.headers().as_ref();
                    let topic = header(headers, "mqtt_topic").and_then(|b| std::str::from_utf8(b).ok());
                    let correlation = header(headers, "mqtt_correlation_data");
                    checks.record(&delivery.data, topic, correlation, now_us());
                    last_tag = Some(delivery.delivery_tag);
                    unacked += 1;
                    if unacked >= ack_batch {
                        ack_upto(&channel, &mut last_tag, &mut unacked).await.map_err(err("basic.ack"))?;
                    }
                }
                Some(Err(e)) => return Err(err("consume")(e)),
                None => return Err(VerifyError::Cancelled(desc.to_owned())),
            },
            _ = ack_tick.tick() => {
                ack_upto(&channel, &mut last_tag, &mut unacked).await.map_err(err("basic.ack"))?;
            }
            _ = progress_tick.tick(), if opts.progress => print_progress(started, checks),
            _ = tokio::time::sleep_until(stop_at.into()) => break !stop.completed(),
        }
    };

    ack_upto(&channel, &mut last_tag, &mut unacked)
        .await
        .map_err(err("basic.ack"))?;
    // Best effort: unacknowledged deliveries return to the queue when the channel closes anyway.
    let _ = channel
        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
        .await;
    let _ = channel.close(200, "verify done".into()).await;
    let _ = conn.close(200, "verify done".into()).await;
    Ok(timed_out)
}

/// Acknowledges every delivery up to the last one consumed (one `multiple` ack).
async fn ack_upto(
    channel: &lapin::Channel,
    last_tag: &mut Option<u64>,
    unacked: &mut u32,
) -> Result<(), lapin::Error> {
    if let Some(tag) = last_tag.take() {
        channel
            .basic_ack(tag, BasicAckOptions { multiple: true })
            .await?;
        *unacked = 0;
    }
    Ok(())
}

/// A text or byte header's bytes (the gateway sends its headers as long strings).
fn header<'h>(headers: Option<&'h FieldTable>, key: &str) -> Option<&'h [u8]> {
    match headers?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(s.as_bytes()),
        AMQPValue::ShortString(s) => Some(s.as_str().as_bytes()),
        _ => None,
    }
}
