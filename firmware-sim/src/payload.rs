//! The telemetry payload a simulated device publishes, and its decoding on the verifier side.
//!
//! This is the only module that touches the CBOR library (ciborium, as the gateway; serde_cbor
//! before it, unmaintained, RUSTSEC-2021-0127): swapping it means changing this file alone.
//!
//! Wire format: one CBOR map with text keys (serde's struct-as-map encoding), in this order:
//!
//! ```text
//! { "device_id": text, "seq": uint, "sample_time_ms": uint,
//!   "temp_c": float, "humidity_pct": float, "battery_v": float,
//!   "pad": text }            <- only present when --payload-bytes asks for a larger message
//! ```
//!
//! Floats are written in the shortest exact width (half or single precision). `pad` is a run of
//! `x` characters sized so that the whole message is `--payload-bytes` long (one byte more when
//! the target falls exactly on a CBOR length-header boundary). The verifier also accepts the same
//! fields as a JSON object, because the gateway may transcode CBOR to JSON; unknown fields are
//! ignored in both encodings.

use serde::{Deserialize, Serialize, Serializer};

/// The largest `pad` the encoder can add (the biggest device buffer is smaller than this).
pub const MAX_PAD: usize = 8192;

static PAD_CHARS: [u8; MAX_PAD] = [b'x'; MAX_PAD];

/// One reading, as the device encodes it. Borrowed, so encoding allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading<'a> {
    pub device_id: &'a str,
    pub seq: u64,
    pub sample_time_ms: u64,
    pub temp_c: f32,
    pub humidity_pct: f32,
    pub battery_v: f32,
}

/// A reading as the verifier decodes it, from CBOR or JSON.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Telemetry {
    pub device_id: String,
    pub seq: u64,
    pub sample_time_ms: u64,
    pub temp_c: f64,
    pub humidity_pct: f64,
    pub battery_v: f64,
}

/// Why a payload could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// The encoded reading does not fit the device's fixed-size message buffer.
    #[error("encoded reading does not fit the {capacity}-byte message buffer")]
    BufferTooSmall { capacity: usize },
    /// The bytes are neither a CBOR nor a JSON telemetry object.
    #[error("not a telemetry payload (CBOR: {cbor}; JSON: {json})")]
    Undecodable { cbor: String, json: String },
}

/// The wire struct: field order here is the order on the wire.
#[derive(Serialize)]
struct Wire<'a> {
    device_id: &'a str,
    seq: u64,
    sample_time_ms: u64,
    temp_c: f32,
    humidity_pct: f32,
    battery_v: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pad: Option<Pad>,
}

/// `n` filler characters, serialized as one text string.
struct Pad(usize);

impl Serialize for Pad {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let bytes = PAD_CHARS.get(..self.0).unwrap_or(&PAD_CHARS);
        // `PAD_CHARS` is all ASCII, so this never takes the fallback.
        serializer.serialize_str(core::str::from_utf8(bytes).unwrap_or(""))
    }
}

/// Encodes `reading` as CBOR into `out` (cleared first), padded to at least `pad_to` bytes when
/// the bare encoding is shorter. Never allocates.
pub fn encode<const N: usize>(
    reading: &Reading<'_>,
    pad_to: usize,
    out: &mut heapless::Vec<u8, N>,
) -> Result<(), PayloadError> {
    let bare = encode_with_pad(reading, None, out)?;
    if pad_to > bare {
        encode_with_pad(reading, Some(pad_len(bare, pad_to)), out)?;
    }
    Ok(())
}

fn encode_with_pad<const N: usize>(
    reading: &Reading<'_>,
    pad: Option<usize>,
    out: &mut heapless::Vec<u8, N>,
) -> Result<usize, PayloadError> {
    let too_small = PayloadError::BufferTooSmall { capacity: N };
    if pad.is_some_and(|pad| pad > MAX_PAD) {
        return Err(too_small);
    }
    let wire = Wire {
        device_id: reading.device_id,
        seq: reading.seq,
        sample_time_ms: reading.sample_time_ms,
        temp_c: reading.temp_c,
        humidity_pct: reading.humidity_pct,
        battery_v: reading.battery_v,
        pad: pad.map(Pad),
    };
    out.clear();
    // Invariant: a fresh Vec of capacity N can always be resized to N.
    out.resize_default(N)
        .map_err(|_| PayloadError::BufferTooSmall { capacity: N })?;
    let mut rest = out.as_mut_slice();
    let written = match ciborium::into_writer(&wire, &mut rest) {
        Ok(()) => N - rest.len(),
        Err(_) => {
            out.clear();
            return Err(too_small);
        }
    };
    out.truncate(written);
    Ok(written)
}

/// Length of the `pad` text that brings a `bare`-byte message to at least `target` bytes: the
/// field adds the key (4 bytes: header + "pad"), the text header (1, 2 or 3 bytes) and the text.
/// The map header stays one byte (6 -> 7 entries). The smallest pad field is 5 bytes.
fn pad_len(bare: usize, target: usize) -> usize {
    const KEY: usize = 4;
    let room = target.saturating_sub(bare + KEY);
    for (header, lo, hi) in [(1, 0, 23), (2, 24, 255), (3, 256, 65_535)] {
        if let Some(len) = room.checked_sub(header) {
            if (lo..=hi).contains(&len) {
                return len;
            }
        }
    }
    // room = 0 (the empty pad field is 5 bytes), or the target falls on a header boundary
    // (room = 25 or 258): one byte more than asked.
    match room {
        0 => 0,
        25 => 24,
        _ => 256,
    }
}

/// Decodes a telemetry payload from CBOR, or from JSON when the bytes look like a JSON object.
pub fn decode(bytes: &[u8]) -> Result<Telemetry, PayloadError> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    let cbor = || ciborium::from_reader::<Telemetry, _>(bytes);
    let json = || serde_json::from_slice::<Telemetry>(bytes);
    // A CBOR map never starts with `{` (0x7b is a CBOR text header), so this test is exact.
    if first == Some(&b'{') {
        json().or_else(|j| cbor().map_err(|c| undecodable(&c, &j)))
    } else {
        cbor().or_else(|c| json().map_err(|j| undecodable(&c, &j)))
    }
}

fn undecodable(
    cbor: &ciborium::de::Error<std::io::Error>,
    json: &serde_json::Error,
) -> PayloadError {
    PayloadError::Undecodable {
        cbor: cbor.to_string(),
        json: json.to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn reading(seq: u64) -> Reading<'static> {
        Reading {
            device_id: "dev-00042",
            seq,
            sample_time_ms: 1_700_000_000_123,
            temp_c: 21.37,
            humidity_pct: 48.5,
            battery_v: 3.71,
        }
    }

    fn assert_matches(t: &Telemetry, r: &Reading<'_>) {
        assert_eq!(t.device_id, r.device_id);
        assert_eq!(t.seq, r.seq);
        assert_eq!(t.sample_time_ms, r.sample_time_ms);
        assert_eq!(t.temp_c as f32, r.temp_c);
        assert_eq!(t.humidity_pct as f32, r.humidity_pct);
        assert_eq!(t.battery_v as f32, r.battery_v);
    }

    #[test]
    fn cbor_round_trip() {
        let mut buf = heapless::Vec::<u8, 256>::new();
        for seq in [0, 23, 24, 255, 65_536, u64::MAX] {
            let r = reading(seq);
            encode(&r, 0, &mut buf).unwrap();
            assert_eq!(buf[0], 0xa6, "a map of six entries");
            assert_matches(&decode(&buf).unwrap(), &r);
        }
    }

    #[test]
    fn padding_reaches_the_requested_size() {
        let mut buf = heapless::Vec::<u8, 4096>::new();
        encode(&reading(7), 0, &mut buf).unwrap();
        let bare = buf.len();
        for target in (0..bare + 400).chain([1000, 4096]) {
            encode(&reading(7), target, &mut buf).unwrap();
            let len = buf.len();
            if target <= bare {
                assert_eq!(len, bare);
            } else {
                let boundary = [bare + 4 + 25, bare + 4 + 258].contains(&target);
                let expected = if target <= bare + 5 { bare + 5 } else { target };
                assert!(
                    len == expected || (boundary && len == target + 1),
                    "target {target}: got {len}"
                );
            }
            assert_matches(&decode(&buf).unwrap(), &reading(7));
        }
    }

    #[test]
    fn too_small_buffer_is_an_error_not_a_panic() {
        let mut buf = heapless::Vec::<u8, 32>::new();
        assert!(matches!(
            encode(&reading(1), 0, &mut buf),
            Err(PayloadError::BufferTooSmall { capacity: 32 })
        ));
        let mut buf = heapless::Vec::<u8, 256>::new();
        assert!(encode(&reading(1), 300, &mut buf).is_err());
    }

    #[test]
    fn json_with_the_same_fields_is_accepted() {
        let json = br#" {"device_id":"dev-00042","seq":5,"sample_time_ms":1700000000123,
            "temp_c":21.37,"humidity_pct":48.5,"battery_v":3.71,"pad":"xxx","extra":true}"#;
        let t = decode(json).unwrap();
        assert_eq!(t.device_id, "dev-00042");
        assert_eq!(t.seq, 5);
        assert_eq!(t.temp_c, 21.37);
    }

    #[test]
    fn garbage_is_reported_with_both_reasons() {
        let err = decode(b"\xff\x00garbage").unwrap_err();
        assert!(matches!(err, PayloadError::Undecodable { .. }), "{err}");
        assert!(decode(b"").is_err());
        assert!(decode(b"{\"seq\": 1}").is_err());
    }
}
