//! The Kafka consumer of the verifier (rskafka): reads every partition of the topic from offset 0,
//! merged into one stream of arrivals.
//!
//! Order is only defined within a partition. The gateway keys each record by its device id, so
//! one device's records share a partition and the per-device order the tally checks is the
//! partition order; how the partitions interleave does not matter. Nothing is committed: the
//! verifier is not a consumer group member, and a second run reads the topic again from 0.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use rskafka::client::consumer::{StartOffset, StreamConsumerBuilder};
use rskafka::client::partition::UnknownTopicHandling;
use rskafka::client::ClientBuilder;
use rskafka::record::Record;
use rskafka::BackoffConfig;

use super::{now_us, print_progress, Checks, StopRule, VerifyError, VerifyOptions};

/// How long one fetch waits on the broker for new records before answering empty. Short, so
/// the settle and timeout checks stay responsive; long enough not to spin on an idle topic.
const FETCH_WAIT_MS: i32 = 200;
/// Upper bound of one fetch per partition (the broker still returns a larger single batch).
const FETCH_MAX_BYTES: i32 = 1 << 20;
/// How often the progress line is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// `"a:9092, b:9092"` -> `["a:9092", "b:9092"]`; each entry must be `host:port`.
pub(crate) fn parse_brokers(s: &str) -> Result<Vec<String>, VerifyError> {
    let bad = || VerifyError::KafkaBrokers(s.to_owned());
    let brokers: Vec<String> = s
        .split(',')
        .map(str::trim)
        .filter(|b| !b.is_empty())
        .map(str::to_owned)
        .collect();
    if brokers.is_empty() {
        return Err(bad());
    }
    for b in &brokers {
        let Some((host, port)) = b.rsplit_once(':') else {
            return Err(bad());
        };
        if host.is_empty() || host.contains("://") || port.parse::<u16>().is_err() {
            return Err(bad());
        }
    }
    Ok(brokers)
}

/// Records one Kafka record: its value is the payload (a record without one is an empty
/// payload: undecodable), its headers `mqtt_topic` and `mqtt_correlation_data`.
fn record_kafka(checks: &mut Checks<'_>, record: &Record, now_us: u64) {
    let topic = record
        .headers
        .get("mqtt_topic")
        .and_then(|b| std::str::from_utf8(b).ok());
    let correlation = record
        .headers
        .get("mqtt_correlation_data")
        .map(Vec::as_slice);
    let value = record.value.as_deref().unwrap_or_default();
    checks.record(value, topic, correlation, now_us);
}

/// Consumes until complete (+ settle) or the timeout; returns whether it timed out.
pub(super) async fn consume(
    brokers: &str,
    topic: &str,
    opts: &VerifyOptions,
    checks: &mut Checks<'_>,
    desc: &str,
) -> Result<bool, VerifyError> {
    let err = |operation: &'static str| {
        move |error: rskafka::client::error::Error| VerifyError::Kafka {
            operation,
            source_desc: desc.to_owned(),
            error: Box::new(error),
        }
    };
    let brokers = parse_brokers(brokers)?;
    let started = Instant::now();
    let deadline = started + opts.timeout;
    // Invariant: every rskafka call gives up by the timeout (without a deadline it retries
    // forever), and the setup below is bounded by it as a whole.
    let backoff = BackoffConfig {
        init_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_secs(1),
        base: 2.0,
        deadline: Some(opts.timeout),
    };
    let setup = async {
        let client = ClientBuilder::new(brokers)
            .client_id(format!("firmware-sim-verify-{}", std::process::id()))
            .backoff_config(backoff)
            .build()
            .await
            .map_err(err("connect"))?;
        let topics = client.list_topics().await.map_err(err("metadata"))?;
        let partitions = topics
            .into_iter()
            .find(|t| t.name == topic)
            .map(|t| t.partitions)
            .filter(|p| !p.is_empty())
            .ok_or_else(|| VerifyError::TopicNotFound(desc.to_owned()))?;
        let mut clients = Vec::with_capacity(partitions.len());
        for p in partitions {
            let c = client
                .partition_client(topic, p, UnknownTopicHandling::Error)
                .await
                .map_err(err("open partition"))?;
            clients.push((p, c));
        }
        Ok::<_, VerifyError>(clients)
    };
    let partitions = tokio::time::timeout_at(deadline.into(), setup)
        .await
        .map_err(|_| VerifyError::KafkaSetupTimeout {
            source_desc: desc.to_owned(),
            after: opts.timeout,
        })??;
    tracing::debug!(topic, partitions = partitions.len(), "reading Kafka topic");

    let mut records = stream::select_all(partitions.into_iter().map(|(p, client)| {
        StreamConsumerBuilder::new(Arc::new(client), StartOffset::At(0))
            .with_max_wait_ms(FETCH_WAIT_MS)
            .with_max_batch_size(FETCH_MAX_BYTES)
            .build()
            .map(move |r| (p, r))
    }));

    let mut progress_tick = tokio::time::interval(PROGRESS_EVERY);
    progress_tick.tick().await;
    let mut stop = StopRule::new(deadline, opts.settle);

    let timed_out = loop {
        let Some(stop_at) = stop.next(checks.complete()) else {
            break false;
        };
        tokio::select! {
            next = records.next() => match next {
                Some((_, Ok((r, _high_watermark)))) => {
                    record_kafka(checks, &r.record, now_us());
                }
                Some((p, Err(e))) => {
                    return Err(VerifyError::KafkaFetch {
                        partition: p,
                        source_desc: desc.to_owned(),
                        error: Box::new(e),
                    })
                }
                // A partition stream ends only after the error it reported.
                None => return Err(VerifyError::Cancelled(desc.to_owned())),
            },
            _ = progress_tick.tick(), if opts.progress => print_progress(started, checks),
            _ = tokio::time::sleep_until(stop_at.into()) => break !stop.completed(),
        }
    };
    // rskafka has no explicit close; dropping the client closes its connections.
    Ok(timed_out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use rskafka::chrono::DateTime;

    use super::*;
    use crate::manifest::{DeviceRecord, Manifest, RunInfo, VERSION};
    use crate::payload::{encode, Reading};

    fn manifest(devices: &[(&str, u64)]) -> Manifest {
        Manifest {
            version: VERSION,
            run: RunInfo {
                started_ms: 0,
                devices: devices.len(),
                qos: 1,
                seed: 1,
                topic: "t".into(),
            },
            devices: devices
                .iter()
                .map(|&(id, n)| {
                    let record = DeviceRecord {
                        next_seq: n,
                        acked: (0..n).collect(),
                        ..Default::default()
                    };
                    (id.to_owned(), record)
                })
                .collect(),
        }
    }

    fn record(value: Option<Vec<u8>>) -> Record {
        Record {
            key: None,
            value,
            headers: BTreeMap::new(),
            timestamp: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
        }
    }

    fn cbor(device_id: &str, seq: u64) -> Record {
        let reading = Reading {
            device_id,
            seq,
            sample_time_ms: 1_700_000_000_000,
            temp_c: 21.5,
            humidity_pct: 40.0,
            battery_v: 3.3,
        };
        let mut out = heapless::Vec::<u8, 256>::new();
        encode(&reading, 0, &mut out).unwrap();
        record(Some(out.to_vec()))
    }

    #[test]
    fn brokers_are_a_comma_separated_host_port_list() {
        assert_eq!(parse_brokers("127.0.0.1:9092").unwrap(), ["127.0.0.1:9092"]);
        assert_eq!(
            parse_brokers(" a:9092, b:9093 ,").unwrap(),
            ["a:9092", "b:9093"]
        );
        assert_eq!(parse_brokers("[::1]:9092").unwrap(), ["[::1]:9092"]);
        for bad in [
            "",
            ",",
            "host",
            "host:",
            ":9092",
            "host:port",
            "tcp://h:9092",
        ] {
            let e = parse_brokers(bad).unwrap_err();
            assert!(matches!(e, VerifyError::KafkaBrokers(_)), "{bad:?}: {e}");
            assert!(e.to_string().contains("host:port"), "{e}");
        }
    }

    #[test]
    fn interleaved_partitions_keep_per_device_order_and_empty_values_are_undecodable() {
        // a lives in one partition, b in another; the merged stream interleaves them.
        let m = manifest(&[("a", 3), ("b", 2)]);
        let mut t = Checks::new(Some(&m), None);
        let arrivals = [
            cbor("b", 0),
            cbor("a", 0),
            cbor("a", 1),
            record(None),
            cbor("b", 1),
            record(Some(b"not telemetry".to_vec())),
            cbor("a", 2),
        ];
        for r in &arrivals {
            assert!(!t.complete());
            record_kafka(&mut t, r, 1_700_000_000_500_000);
        }
        assert!(t.complete());
        let mut opts = VerifyOptions::new(super::super::Source::Kafka {
            brokers: "b:9092".into(),
            topic: "t".into(),
        });
        opts.max_duplicates = Some(0);
        let report = t.report(&opts, false, 0.1);
        assert!(report.passed, "{report}");
        assert_eq!(
            (
                report.total.received,
                report.total.missing,
                report.total.out_of_order,
                report.total.undecodable
            ),
            (5, 0, 0, 2)
        );
    }

    #[test]
    fn a_device_read_out_of_partition_order_is_reported() {
        let m = manifest(&[("a", 2)]);
        let mut t = Checks::new(Some(&m), None);
        for r in [cbor("a", 1), cbor("a", 0)] {
            record_kafka(&mut t, &r, 0);
        }
        let opts = VerifyOptions::new(super::super::Source::Kafka {
            brokers: "b:9092".into(),
            topic: "t".into(),
        });
        let report = t.report(&opts, false, 0.1);
        assert!(!report.passed);
        assert_eq!(report.total.out_of_order, 1);
    }

    #[test]
    fn replies_in_a_kafka_topic_are_checked_with_their_correlation_header() {
        use crate::manifest::{CommandManifest, CommandRecord, CommandRunInfo, COMMANDS_KIND};
        let m = CommandManifest {
            version: VERSION,
            kind: COMMANDS_KIND.into(),
            run: CommandRunInfo {
                started_ms: 0,
                devices: 1,
                count: 2,
                target: "t".into(),
            },
            devices: [(
                "a".to_string(),
                CommandRecord {
                    confirmed: vec!["a:0".into(), "a:1".into()],
                    unconfirmed: vec![],
                },
            )]
            .into_iter()
            .collect(),
        };
        let reply = |n: u64, corr: &str| {
            let mut r = record(Some(
                format!(r#"{{"id":"a:{n}","cmd":"ping","n":{n}}}"#).into_bytes(),
            ));
            r.headers
                .insert("mqtt_topic".into(), b"devices/a/replies".to_vec());
            r.headers
                .insert("mqtt_correlation_data".into(), corr.as_bytes().to_vec());
            r
        };
        let mut t = Checks::new(None, Some(&m));
        for r in [cbor("a", 0), reply(1, "a:1"), reply(0, "a:7")] {
            record_kafka(&mut t, &r, 0);
        }
        assert!(t.complete());
        let opts = VerifyOptions::new(super::super::Source::Kafka {
            brokers: "b:9092".into(),
            topic: "t".into(),
        });
        let report = t.report(&opts, false, 0.1);
        let c = report.commands.as_ref().unwrap();
        assert_eq!(
            (c.answered, c.out_of_order, c.correlation_mismatch),
            (2, 1, 1)
        );
        assert_eq!(report.ignored, 1, "telemetry is not checked here");
        assert!(!report.passed);
    }
}
