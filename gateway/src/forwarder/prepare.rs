//! Prepare: what a record becomes on one uplink. The routes decide whether it goes there at
//! all (by the routes in force when it was received), the uplink's templates give its
//! destination and key, and the route's payload mode its bytes. No I/O.

use std::sync::Arc;

use crate::config::{PayloadMode, RouteConfig, UplinkConfig};
use crate::queue::Record;
use crate::uplink::Prepared;

/// What a record is to one uplink.
#[derive(Debug)]
pub enum Prep {
    /// Send this.
    Send(Prepared),
    /// No route sends it to this uplink: settled as it is.
    Skip,
    /// It cannot be sent (the reason): it goes to the dead letters.
    Unsendable(Record, String),
}

/// Prepares `r` for the uplink `cfg` under the routes it was received with.
pub fn prepare(cfg: &UplinkConfig, routes: &Routes, r: Record) -> Prep {
    let Some(route) = routes.at(r.seq).for_uplink(cfg.name(), &r.topic) else {
        return Prep::Skip;
    };
    match transcode(route.payload, &r) {
        Ok((payload, content_type)) => {
            let (destination, key) = address(cfg, &r);
            Prep::Send(Prepared {
                destination,
                key,
                payload,
                content_type,
                record: r,
            })
        }
        Err(e) => {
            let why = e.to_string();
            Prep::Unsendable(r, why)
        }
    }
}

/// Destination and key of `r` on the uplink `cfg`: AMQP exchange and routing key from their
/// templates; Kafka topic from its template and the device id as key; for both `{topic}` has
/// `/` turned into `.`. MQTT topic from its template (`{topic}` as it is) and the device id.
pub fn address(cfg: &UplinkConfig, r: &Record) -> (String, String) {
    match cfg {
        UplinkConfig::Amqp(a) => (
            expand(&a.exchange, r, true),
            expand(&a.routing_key, r, true),
        ),
        UplinkConfig::Kafka(k) => (expand(&k.topic, r, true), r.device_id.clone()),
        UplinkConfig::Mqtt(m) => (expand(&m.topic, r, false), r.device_id.clone()),
    }
}

/// Expands a template (validated at config load) for a record.
pub fn expand(template: &str, r: &Record, dots_for_slashes: bool) -> String {
    let mut out = String::with_capacity(template.len() + r.topic.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            out.push_str(&rest[open..]);
            return out;
        };
        let name = &after[..close];
        match name {
            "topic" if dots_for_slashes => out.push_str(&r.topic.replace('/', ".")),
            "topic" => out.push_str(&r.topic),
            "client_id" => out.push_str(&r.device_id),
            "username" => out.push_str(r.username.as_deref().unwrap_or("")),
            _ => {
                if let Some(n) = name
                    .strip_prefix("topic[")
                    .and_then(|n| n.strip_suffix(']'))
                    .and_then(|n| n.parse::<usize>().ok())
                {
                    out.push_str(r.topic.split('/').nth(n).unwrap_or(""));
                }
            }
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

/// The routes, as the forwarders ask them.
///
/// After a reload, a record is routed by the routes in force when it was received: each version
/// applies from its first sequence number on (`at`). Otherwise moving a topic from uplink U to V
/// would strand U's backlog of it: U would skip it, and V's cursor is already past it.
#[derive(Debug, Clone)]
pub struct Routes {
    /// `(first seq, routes)`, oldest first; the first version applies to every older record.
    versions: Vec<(u64, Arc<Vec<RouteConfig>>)>,
}

/// Route versions kept for older records; beyond this many reloads the oldest is forgotten (its
/// records then take the oldest version still kept).
const ROUTE_VERSIONS: usize = 16;

/// One version of the routes.
#[derive(Debug, Clone, Copy)]
pub struct RouteSet<'a>(&'a [RouteConfig]);

impl Routes {
    pub fn new(routes: Vec<RouteConfig>) -> Routes {
        Routes {
            versions: vec![(0, Arc::new(routes))],
        }
    }

    /// These routes, with `routes` in force for records from `from_seq` on.
    pub fn then(&self, routes: Vec<RouteConfig>, from_seq: u64) -> Routes {
        let mut versions = self.versions.clone();
        versions.push((from_seq, Arc::new(routes)));
        if versions.len() > ROUTE_VERSIONS {
            versions.remove(0);
        }
        Routes { versions }
    }

    /// The routes for a record with sequence number `seq`.
    pub fn at(&self, seq: u64) -> RouteSet<'_> {
        let i = self
            .versions
            .iter()
            .rposition(|(from, _)| *from <= seq)
            .unwrap_or(0);
        RouteSet(self.versions.get(i).map_or(&[], |(_, r)| r.as_slice()))
    }
}

impl<'a> RouteSet<'a> {
    /// The first route sending `topic` to `uplink`, if any.
    pub fn for_uplink(self, uplink: &str, topic: &str) -> Option<&'a RouteConfig> {
        self.0.iter().find(|r| {
            r.uplinks.iter().any(|u| u == uplink) && crate::topic::matches(&r.filter, topic)
        })
    }

    /// Whether any route takes `topic`.
    pub fn any(self, topic: &str) -> bool {
        self.0
            .iter()
            .any(|r| crate::topic::matches(&r.filter, topic))
    }
}

/// Why a record cannot be prepared (it goes to the dead letters).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrepareError {
    #[error("payload is not valid CBOR: {0}")]
    NotCbor(String),
}

/// Applies the route's payload mode.
pub fn transcode(mode: PayloadMode, r: &Record) -> Result<(Vec<u8>, Option<String>), PrepareError> {
    match mode {
        PayloadMode::Raw => Ok((r.payload.clone(), r.content_type.clone())),
        PayloadMode::CborToJson => {
            let value: ciborium::Value = ciborium::de::from_reader(r.payload.as_slice())
                .map_err(|e| PrepareError::NotCbor(e.to_string()))?;
            let json =
                serde_json::to_vec(&value).map_err(|e| PrepareError::NotCbor(e.to_string()))?;
            Ok((json, Some("application/json".into())))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rec(topic: &str) -> Record {
        Record {
            seq: 7,
            received_at_us: 0,
            device_id: "dev-1".into(),
            username: Some("alice".into()),
            topic: topic.into(),
            qos: 1,
            retain: false,
            user_properties: vec![],
            content_type: None,
            payload_format: None,
            message_expiry: None,
            response_topic: None,
            correlation_data: None,
            payload: b"x".to_vec(),
        }
    }

    fn route(filter: &str, uplink: &str) -> RouteConfig {
        RouteConfig {
            filter: filter.into(),
            uplinks: vec![uplink.into()],
            payload: PayloadMode::Raw,
        }
    }

    #[test]
    fn records_keep_the_routes_they_were_received_under_after_a_reload() {
        let v1 = Routes::new(vec![route("a/#", "u")]);
        // Reload at seq 100: `a/#` moves to uplink v.
        let v2 = v1.then(vec![route("a/#", "v")], 100);
        assert!(v2.at(99).for_uplink("u", "a/x").is_some());
        assert!(v2.at(99).for_uplink("v", "a/x").is_none());
        assert!(v2.at(100).for_uplink("v", "a/x").is_some());
        assert!(v2.at(100).for_uplink("u", "a/x").is_none());
        // Many reloads: the chain stays bounded, the newest versions stay exact.
        let mut r = v2;
        for i in 0..40u64 {
            r = r.then(vec![route("a/#", &format!("w{i}"))], 200 + i);
        }
        assert_eq!(r.versions.len(), ROUTE_VERSIONS);
        assert!(r.at(239).for_uplink("w39", "a/x").is_some());
        assert!(r.at(238).for_uplink("w38", "a/x").is_some());
        assert!(r.at(1_000).for_uplink("w39", "a/x").is_some());
    }

    #[test]
    fn templates_expand_topic_levels_and_ids() {
        let r = rec("devices/dev-1/telemetry");
        assert_eq!(expand("{topic}", &r, true), "devices.dev-1.telemetry");
        assert_eq!(expand("{topic}", &r, false), "devices/dev-1/telemetry");
        assert_eq!(
            expand("t.{topic[2]}.{client_id}.{username}", &r, true),
            "t.telemetry.dev-1.alice"
        );
        assert_eq!(expand("{topic[9]}x", &r, true), "x");
    }
}
