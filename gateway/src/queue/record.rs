//! Record framing: how one record is laid out in a segment file, encoded and checked.
//!
//! The layout is documented in `queue/mod.rs`. Everything here works on byte slices and never
//! panics on bad input: a frame read back from disk is untrusted until its CRC matched.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Bytes before a frame's body: `len: u32le`, `crc: u32le`.
pub(crate) const FRAME_HEADER: usize = 8;
/// Fixed part of a body: `seq: u64le`, `time_us: u64le`, `flags: u8`.
const BODY_FIXED: usize = 17;
/// Largest body accepted from disk; a length prefix above this is corruption, not a record.
pub(crate) const MAX_BODY: usize = 256 << 20;

const FLAG_QOS_MASK: u8 = 0b0000_0011;
const FLAG_RETAIN: u8 = 1 << 2;
const FLAG_USERNAME: u8 = 1 << 3;
const FLAG_CONTENT_TYPE: u8 = 1 << 4;
const FLAG_PAYLOAD_FORMAT: u8 = 1 << 5;
const FLAG_USER_PROPERTIES: u8 = 1 << 6;
/// An extras block (MQTT 5 message expiry, response topic, correlation data) follows the user
/// properties.
const FLAG_EXTRAS: u8 = 1 << 7;

/// The extras block's version. A reader skips a block of another version whole (it is length
/// prefixed); a new version is only for a change to the meaning of an existing type.
const EXTRAS_VERSION: u8 = 1;
/// Extras types (TLV). A reader skips types it does not know.
const EXTRA_MESSAGE_EXPIRY: u8 = 1;
const EXTRA_RESPONSE_TOPIC: u8 = 2;
const EXTRA_CORRELATION_DATA: u8 = 3;

/// A record as handed to [`crate::queue::Queue::append`]: borrowed, so that encoding is the only copy.
#[derive(Debug, Clone, Copy)]
pub struct NewRecord<'a> {
    /// When the gateway received the message.
    pub received_at: SystemTime,
    pub device_id: &'a str,
    pub username: Option<&'a str>,
    pub topic: &'a str,
    /// 0, 1 or 2; kept as sent so that uplinks can report it.
    pub qos: u8,
    pub retain: bool,
    pub user_properties: &'a [(String, String)],
    pub content_type: Option<&'a str>,
    pub payload_format: Option<u8>,
    /// MQTT 5 Message Expiry Interval as received, in seconds: the message expires that long
    /// after `received_at`.
    pub message_expiry: Option<u32>,
    /// MQTT 5 request/response: where the receiver should answer, and what to answer with.
    pub response_topic: Option<&'a str>,
    pub correlation_data: Option<&'a [u8]>,
    pub payload: &'a [u8],
}

impl<'a> NewRecord<'a> {
    /// A record with only the required fields set, received now.
    pub fn new(device_id: &'a str, topic: &'a str, payload: &'a [u8]) -> Self {
        NewRecord {
            received_at: SystemTime::now(),
            device_id,
            username: None,
            topic,
            qos: 1,
            retain: false,
            user_properties: &[],
            content_type: None,
            payload_format: None,
            message_expiry: None,
            response_topic: None,
            correlation_data: None,
            payload,
        }
    }

    fn has_extras(&self) -> bool {
        self.message_expiry.is_some()
            || self.response_topic.is_some()
            || self.correlation_data.is_some()
    }
}

/// A record read back from the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Gateway-unique, strictly increasing; never reused, not necessarily contiguous.
    pub seq: u64,
    /// Receive time in microseconds since the Unix epoch.
    pub received_at_us: u64,
    pub device_id: String,
    pub username: Option<String>,
    pub topic: String,
    pub qos: u8,
    pub retain: bool,
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub payload_format: Option<u8>,
    /// MQTT 5 Message Expiry Interval as received, in seconds after the receive time.
    pub message_expiry: Option<u32>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

impl Record {
    pub fn received_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_micros(self.received_at_us)
    }

    /// When the message expires (receive time + message expiry interval), if it does.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.message_expiry
            .map(|secs| self.received_at() + Duration::from_secs(u64::from(secs)))
    }

    /// This record, to append again (dead letters, replay), with other user properties.
    pub fn to_new<'a>(&'a self, user_properties: &'a [(String, String)]) -> NewRecord<'a> {
        NewRecord {
            received_at: self.received_at(),
            device_id: &self.device_id,
            username: self.username.as_deref(),
            topic: &self.topic,
            qos: self.qos,
            retain: self.retain,
            user_properties,
            content_type: self.content_type.as_deref(),
            payload_format: self.payload_format,
            message_expiry: self.message_expiry,
            response_topic: self.response_topic.as_deref(),
            correlation_data: self.correlation_data.as_deref(),
            payload: &self.payload,
        }
    }
}

/// Why a record cannot be encoded. Checked before the record takes a sequence number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The framed record is larger than a segment may hold.
    #[error("record of {size} bytes is larger than the queue's segment_bytes ({limit})")]
    TooLarge { size: usize, limit: u64 },
    /// QoS outside 0..=2.
    #[error("qos {0} is not 0, 1 or 2")]
    BadQos(u8),
}

/// `t` in microseconds since the Unix epoch (0 before it), as records store times.
pub fn micros_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn varint_len(mut v: usize) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn put_varint(out: &mut Vec<u8>, mut v: usize) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

/// The bytes of the extras' TLVs (without the version and length in front of them).
fn extras_tlv_len(r: &NewRecord<'_>) -> usize {
    let tlv = |n: usize| 1 + varint_len(n) + n;
    r.message_expiry.map_or(0, |_| tlv(4))
        + r.response_topic.map_or(0, |t| tlv(t.len()))
        + r.correlation_data.map_or(0, |c| tlv(c.len()))
}

/// The size of the whole frame (header included) that [`encode_frame`] writes.
pub(crate) fn frame_len(r: &NewRecord<'_>) -> usize {
    let s = |x: &str| varint_len(x.len()) + x.len();
    let mut n = FRAME_HEADER + BODY_FIXED + s(r.device_id) + s(r.topic);
    if let Some(u) = r.username {
        n += s(u);
    }
    if let Some(c) = r.content_type {
        n += s(c);
    }
    if r.payload_format.is_some() {
        n += 1;
    }
    if !r.user_properties.is_empty() {
        n += varint_len(r.user_properties.len());
        for (k, v) in r.user_properties {
            n += s(k) + s(v);
        }
    }
    if r.has_extras() {
        let tlvs = extras_tlv_len(r);
        n += 1 + varint_len(tlvs) + tlvs;
    }
    n + r.payload.len()
}

/// Checks what can be checked before a sequence number is taken.
pub(crate) fn validate(r: &NewRecord<'_>, segment_bytes: u64) -> Result<usize, EncodeError> {
    if r.qos > 2 {
        return Err(EncodeError::BadQos(r.qos));
    }
    let size = frame_len(r);
    if size as u64 + super::segment::SEGMENT_HEADER as u64 > segment_bytes || size > MAX_BODY {
        return Err(EncodeError::TooLarge {
            size,
            limit: segment_bytes,
        });
    }
    Ok(size)
}

/// Appends one complete frame for `r` with sequence number `seq` to `out`.
/// `len` must be `frame_len(r)` (the caller computed it to check the bounds).
pub(crate) fn encode_frame(out: &mut Vec<u8>, r: &NewRecord<'_>, seq: u64, len: usize) {
    let start = out.len();
    out.reserve(len);
    let body_len = (len - FRAME_HEADER) as u32;
    out.extend_from_slice(&body_len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&micros_since_epoch(r.received_at).to_le_bytes());
    let mut flags = r.qos & FLAG_QOS_MASK;
    if r.retain {
        flags |= FLAG_RETAIN;
    }
    if r.username.is_some() {
        flags |= FLAG_USERNAME;
    }
    if r.content_type.is_some() {
        flags |= FLAG_CONTENT_TYPE;
    }
    if r.payload_format.is_some() {
        flags |= FLAG_PAYLOAD_FORMAT;
    }
    if !r.user_properties.is_empty() {
        flags |= FLAG_USER_PROPERTIES;
    }
    if r.has_extras() {
        flags |= FLAG_EXTRAS;
    }
    out.push(flags);
    put_str(out, r.device_id);
    put_str(out, r.topic);
    if let Some(u) = r.username {
        put_str(out, u);
    }
    if let Some(c) = r.content_type {
        put_str(out, c);
    }
    if let Some(p) = r.payload_format {
        out.push(p);
    }
    if !r.user_properties.is_empty() {
        put_varint(out, r.user_properties.len());
        for (k, v) in r.user_properties {
            put_str(out, k);
            put_str(out, v);
        }
    }
    if r.has_extras() {
        out.push(EXTRAS_VERSION);
        put_varint(out, extras_tlv_len(r));
        let mut tlv = |t: u8, value: &[u8]| {
            out.push(t);
            put_varint(out, value.len());
            out.extend_from_slice(value);
        };
        if let Some(e) = r.message_expiry {
            tlv(EXTRA_MESSAGE_EXPIRY, &e.to_be_bytes());
        }
        if let Some(t) = r.response_topic {
            tlv(EXTRA_RESPONSE_TOPIC, t.as_bytes());
        }
        if let Some(c) = r.correlation_data {
            tlv(EXTRA_CORRELATION_DATA, c);
        }
    }
    out.extend_from_slice(r.payload);
    debug_assert_eq!(out.len() - start, len);
    let crc = frame_crc(&out[start..start + 4], &out[start + FRAME_HEADER..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn frame_crc(len_bytes: &[u8], body: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(len_bytes), body)
}

/// What [`check_frame`] found at the start of a byte slice.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    /// A whole frame whose CRC matched: its total length and its sequence number.
    Valid { len: usize, seq: u64, time_us: u64 },
    /// The slice ends before the frame does (a write in progress or a torn tail).
    Incomplete,
    /// The bytes are not a valid frame.
    Invalid(&'static str),
}

/// Checks the frame at the start of `buf` without decoding its fields.
pub(crate) fn check_frame(buf: &[u8]) -> Frame {
    let Some(header) = buf.get(..FRAME_HEADER) else {
        return Frame::Incomplete;
    };
    let body_len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if !(BODY_FIXED + 2..=MAX_BODY).contains(&body_len) {
        return Frame::Invalid("length prefix out of range");
    }
    let Some(body) = buf.get(FRAME_HEADER..FRAME_HEADER + body_len) else {
        return Frame::Incomplete;
    };
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if frame_crc(&header[..4], body) != crc {
        return Frame::Invalid("CRC32C mismatch");
    }
    let seq = read_u64(body, 0);
    let time_us = read_u64(body, 8);
    Frame::Valid {
        len: FRAME_HEADER + body_len,
        seq,
        time_us,
    }
}

fn read_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        x.copy_from_slice(s);
    }
    u64::from_le_bytes(x)
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|s| s[0])
    }
    fn varint(&mut self) -> Option<usize> {
        let mut v: usize = 0;
        for shift in (0..35).step_by(7) {
            let b = self.byte()?;
            v |= ((b & 0x7f) as usize) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    fn string(&mut self) -> Option<String> {
        let n = self.varint()?;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).ok()
    }
}

/// Decodes a frame that [`check_frame`] found valid. `None` means the body is malformed even though
/// its CRC matched (written by a different format version, or a CRC collision).
pub(crate) fn decode_frame(frame: &[u8]) -> Option<Record> {
    let body = frame.get(FRAME_HEADER..)?;
    let mut c = Cursor { b: body, at: 0 };
    let seq = u64::from_le_bytes(c.take(8)?.try_into().ok()?);
    let received_at_us = u64::from_le_bytes(c.take(8)?.try_into().ok()?);
    let flags = c.byte()?;
    let qos = flags & FLAG_QOS_MASK;
    if qos > 2 {
        return None;
    }
    let device_id = c.string()?;
    let topic = c.string()?;
    let username = if flags & FLAG_USERNAME != 0 {
        Some(c.string()?)
    } else {
        None
    };
    let content_type = if flags & FLAG_CONTENT_TYPE != 0 {
        Some(c.string()?)
    } else {
        None
    };
    let payload_format = if flags & FLAG_PAYLOAD_FORMAT != 0 {
        Some(c.byte()?)
    } else {
        None
    };
    let mut user_properties = Vec::new();
    if flags & FLAG_USER_PROPERTIES != 0 {
        let n = c.varint()?;
        for _ in 0..n {
            let k = c.string()?;
            let v = c.string()?;
            user_properties.push((k, v));
        }
    }
    let extras = if flags & FLAG_EXTRAS != 0 {
        let version = c.byte()?;
        let n = c.varint()?;
        let block = c.take(n)?;
        if version == EXTRAS_VERSION {
            decode_extras(block)?
        } else {
            Extras::default()
        }
    } else {
        Extras::default()
    };
    let payload = body.get(c.at..)?.to_vec();
    Some(Record {
        seq,
        received_at_us,
        device_id,
        username,
        topic,
        qos,
        retain: flags & FLAG_RETAIN != 0,
        user_properties,
        content_type,
        payload_format,
        message_expiry: extras.message_expiry,
        response_topic: extras.response_topic,
        correlation_data: extras.correlation_data,
        payload,
    })
}

#[derive(Default)]
struct Extras {
    message_expiry: Option<u32>,
    response_topic: Option<String>,
    correlation_data: Option<Vec<u8>>,
}

/// The TLVs of a version 1 extras block. `None`: malformed (a TLV past the block's end, a
/// value of the wrong size or not UTF-8 where text is due). Unknown types are skipped.
fn decode_extras(block: &[u8]) -> Option<Extras> {
    let mut c = Cursor { b: block, at: 0 };
    let mut e = Extras::default();
    while c.at < block.len() {
        let t = c.byte()?;
        let n = c.varint()?;
        let value = c.take(n)?;
        match t {
            EXTRA_MESSAGE_EXPIRY => {
                e.message_expiry = Some(u32::from_be_bytes(value.try_into().ok()?));
            }
            EXTRA_RESPONSE_TOPIC => {
                e.response_topic = Some(String::from_utf8(value.to_vec()).ok()?);
            }
            EXTRA_CORRELATION_DATA => e.correlation_data = Some(value.to_vec()),
            _ => {}
        }
    }
    Some(e)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn full_record<'a>(props: &'a [(String, String)]) -> NewRecord<'a> {
        NewRecord {
            received_at: UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456),
            device_id: "sensor-17",
            username: Some("alice"),
            topic: "site/a/sensor-17/temp",
            qos: 2,
            retain: true,
            user_properties: props,
            content_type: Some("application/cbor"),
            payload_format: Some(0),
            message_expiry: Some(3600),
            response_topic: Some("site/a/replies/17"),
            correlation_data: Some(b"\x00req-1"),
            payload: b"\x01\x02\x03 hello",
        }
    }

    #[test]
    fn encode_then_decode_returns_every_field() {
        let props = vec![
            ("unit".to_string(), "C".to_string()),
            ("k".into(), "".into()),
        ];
        let r = full_record(&props);
        let mut out = Vec::new();
        let len = frame_len(&r);
        encode_frame(&mut out, &r, 42, len);
        assert_eq!(out.len(), len);
        assert_eq!(
            check_frame(&out),
            Frame::Valid {
                len,
                seq: 42,
                time_us: 1_700_000_000_123_456
            }
        );
        let d = decode_frame(&out).unwrap();
        assert_eq!(d.seq, 42);
        assert_eq!(d.device_id, "sensor-17");
        assert_eq!(d.username.as_deref(), Some("alice"));
        assert_eq!(d.topic, "site/a/sensor-17/temp");
        assert_eq!(d.qos, 2);
        assert!(d.retain);
        assert_eq!(d.user_properties, props);
        assert_eq!(d.content_type.as_deref(), Some("application/cbor"));
        assert_eq!(d.payload_format, Some(0));
        assert_eq!(d.message_expiry, Some(3600));
        assert_eq!(d.response_topic.as_deref(), Some("site/a/replies/17"));
        assert_eq!(d.correlation_data.as_deref(), Some(&b"\x00req-1"[..]));
        assert_eq!(
            d.expires_at(),
            Some(UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456 + 3_600_000_000))
        );
        assert_eq!(d.payload, b"\x01\x02\x03 hello");
        assert_eq!(d.received_at_us, 1_700_000_000_123_456);
    }

    #[test]
    fn minimal_record_overhead_is_small() {
        let r = NewRecord::new("dev-0001", "t/1", &[0u8; 64]);
        // 8 frame header + 17 fixed + 1+8 device + 1+3 topic + 64 payload
        assert_eq!(frame_len(&r), 8 + 17 + 9 + 4 + 64);
    }

    #[test]
    fn every_truncation_is_incomplete_and_every_bit_flip_is_caught() {
        let props = vec![("a".to_string(), "b".to_string())];
        let r = full_record(&props);
        let mut out = Vec::new();
        let len = frame_len(&r);
        encode_frame(&mut out, &r, 7, len);
        for cut in 0..out.len() {
            assert_eq!(check_frame(&out[..cut]), Frame::Incomplete, "cut at {cut}");
        }
        for byte in 0..out.len() {
            for bit in 0..8 {
                let mut bad = out.clone();
                bad[byte] ^= 1 << bit;
                match check_frame(&bad) {
                    Frame::Valid { .. } => panic!("flip at {byte}:{bit} not detected"),
                    Frame::Incomplete | Frame::Invalid(_) => {}
                }
            }
        }
    }

    #[test]
    fn decode_never_panics_on_garbage() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for n in 0..2000usize {
            let mut buf = Vec::new();
            for _ in 0..(n % 97) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.push(x as u8);
            }
            let _ = check_frame(&buf);
            let _ = decode_frame(&buf);
        }
    }

    /// A frame around `body` (length and CRC as the writer makes them).
    fn frame_of(body: &[u8]) -> Vec<u8> {
        let mut out = (body.len() as u32).to_le_bytes().to_vec();
        let crc = frame_crc(&out, body);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(body);
        out
    }

    /// seq 5, time 9, QoS 1 with the extras flag, device "d", topic "t", then `extras` and the
    /// payload "p".
    fn body_with_extras(extras: &[u8]) -> Vec<u8> {
        let mut b = 5u64.to_le_bytes().to_vec();
        b.extend_from_slice(&9u64.to_le_bytes());
        b.extend_from_slice(&[0x81, 1, b'd', 1, b't']);
        b.extend_from_slice(extras);
        b.push(b'p');
        b
    }

    #[test]
    fn a_record_without_extras_is_laid_out_as_before() {
        let r = NewRecord::new("d", "t", b"p");
        let mut out = Vec::new();
        encode_frame(&mut out, &r, 5, frame_len(&r));
        let mut old = 5u64.to_le_bytes().to_vec();
        old.extend_from_slice(&micros_since_epoch(r.received_at).to_le_bytes());
        old.extend_from_slice(&[0x01, 1, b'd', 1, b't', b'p']);
        assert_eq!(out, frame_of(&old), "flag bit 7 clear, no extras block");
        let d = decode_frame(&out).unwrap();
        assert_eq!(
            (d.message_expiry, d.response_topic, d.correlation_data),
            (None, None, None)
        );
    }

    #[test]
    fn unknown_extras_types_and_versions_are_skipped() {
        // Version 1: an unknown type 9 between known ones.
        let block = [9, 2, b'x', b'y', 1, 4, 0, 0, 1, 0, 3, 1, 0xff];
        let mut extras = vec![1, block.len() as u8];
        extras.extend_from_slice(&block);
        let d = decode_frame(&frame_of(&body_with_extras(&extras))).unwrap();
        assert_eq!(d.message_expiry, Some(256));
        assert_eq!(d.correlation_data.as_deref(), Some(&[0xff][..]));
        assert_eq!(d.payload, b"p");
        // Version 2: the whole block is skipped, the rest of the record reads.
        extras[0] = 2;
        let d = decode_frame(&frame_of(&body_with_extras(&extras))).unwrap();
        assert_eq!((d.message_expiry, d.correlation_data), (None, None));
        assert_eq!((d.topic.as_str(), d.payload.as_slice()), ("t", &b"p"[..]));
    }

    #[test]
    fn malformed_extras_do_not_decode() {
        for (why, extras) in [
            ("a TLV past the block", vec![1, 3, 1, 4, 0]),
            ("an expiry of 3 bytes", vec![1, 5, 1, 3, 0, 0, 1]),
            ("a response topic that is not UTF-8", vec![1, 3, 2, 1, 0xff]),
            ("a block past the body", vec![1, 40, 1, 4, 0, 0, 0, 1]),
            ("no block at all", vec![]),
        ] {
            let frame = frame_of(&body_with_extras(&extras));
            assert!(matches!(check_frame(&frame), Frame::Valid { .. }), "{why}");
            assert_eq!(decode_frame(&frame), None, "{why}");
        }
    }

    proptest::proptest! {
        /// Any record, with or without each optional field, reads back as written, in exactly
        /// `frame_len` bytes.
        #[test]
        fn every_field_round_trips(
            username in proptest::option::of(".{0,8}"),
            content_type in proptest::option::of(".{0,8}"),
            payload_format in proptest::option::of(0u8..2),
            props in proptest::collection::vec((".{0,4}", ".{0,4}"), 0..3),
            message_expiry in proptest::option::of(proptest::num::u32::ANY),
            response_topic in proptest::option::of(".{0,12}"),
            correlation_data in proptest::option::of(proptest::collection::vec(proptest::num::u8::ANY, 0..200)),
            payload in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            qos in 0u8..3,
        ) {
            let r = NewRecord {
                received_at: UNIX_EPOCH + Duration::from_micros(1_234_567),
                device_id: "dev",
                username: username.as_deref(),
                topic: "a/b",
                qos,
                retain: qos == 1,
                user_properties: &props,
                content_type: content_type.as_deref(),
                payload_format,
                message_expiry,
                response_topic: response_topic.as_deref(),
                correlation_data: correlation_data.as_deref(),
                payload: &payload,
            };
            let len = frame_len(&r);
            let mut out = Vec::new();
            encode_frame(&mut out, &r, 3, len);
            proptest::prop_assert_eq!(out.len(), len);
            let d = decode_frame(&out).expect("decodes");
            proptest::prop_assert_eq!(d.username, username);
            proptest::prop_assert_eq!(d.content_type, content_type);
            proptest::prop_assert_eq!(d.payload_format, payload_format);
            proptest::prop_assert_eq!(d.user_properties, props);
            proptest::prop_assert_eq!(d.message_expiry, message_expiry);
            proptest::prop_assert_eq!(d.response_topic, response_topic);
            proptest::prop_assert_eq!(d.correlation_data, correlation_data);
            proptest::prop_assert_eq!(d.payload, payload);
            proptest::prop_assert_eq!((d.qos, d.retain), (qos, qos == 1));
        }
    }

    #[test]
    fn oversized_and_bad_qos_records_are_refused() {
        let big = vec![0u8; 70_000];
        let r = NewRecord::new("d", "t", &big);
        assert!(matches!(
            validate(&r, 65_536),
            Err(EncodeError::TooLarge { .. })
        ));
        let mut r = NewRecord::new("d", "t", b"x");
        r.qos = 3;
        assert_eq!(validate(&r, 65_536), Err(EncodeError::BadQos(3)));
    }
}
