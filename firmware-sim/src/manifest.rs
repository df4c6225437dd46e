//! The manifest `run --manifest FILE` writes and `verify --expect FILE` reads: per device, what
//! happened to every sequence number it used.
//!
//! ```json
//! {
//!   "version": 1,
//!   "run": { "started_ms": 1700000000000, "devices": 2, "qos": 1, "seed": 1,
//!            "topic": "devices/{id}/telemetry" },
//!   "devices": {
//!     "dev-00001": { "next_seq": 100, "acked": [[0, 99]], "unacked": [], "dropped": [],
//!                    "unsent": [], "blocked": 0 },
//!     "dev-00002": { "next_seq": 100, "acked": [[0, 41], [43, 99]], "unacked": [[42, 42]],
//!                    "dropped": [], "unsent": [], "blocked": 0 }
//!   }
//! }
//! ```
//!
//! Every number in `0..next_seq` is in exactly one of `acked`, `unacked`, `dropped`, `unsent`:
//! - `acked`: the broker acknowledged it (PUBACK for QoS 1, PUBCOMP for QoS 2). The verifier
//!   requires each of these to arrive upstream.
//! - `unacked`: sent at least once, never acknowledged (with QoS 0, everything sent): it may or
//!   may not arrive.
//! - `dropped`: evicted from the device's full outbox (policy `drop-oldest`) without an ack.
//! - `unsent`: still in the outbox, never sent, when the run ended.
//!
//! `blocked` counts readings a full outbox (policy `block`) prevented; they used no number.
//! Ranges are inclusive `[first, last]` pairs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ranges::RangeSet;

pub const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub run: RunInfo,
    pub devices: BTreeMap<String, DeviceRecord>,
}

/// What produced the manifest, for a reader comparing runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// Wall clock at the start of the run, milliseconds since the Unix epoch.
    pub started_ms: u64,
    pub devices: usize,
    pub qos: u8,
    pub seed: u64,
    pub topic: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Readings taken: sequence numbers `0..next_seq` were used.
    pub next_seq: u64,
    pub acked: RangeSet,
    #[serde(default)]
    pub unacked: RangeSet,
    #[serde(default)]
    pub dropped: RangeSet,
    #[serde(default)]
    pub unsent: RangeSet,
    #[serde(default)]
    pub blocked: u64,
}

/// Why a manifest could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read or written.
    #[error("manifest {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The file is not a manifest (bad JSON or a missing field).
    #[error("manifest {path}: {error}")]
    Parse {
        path: PathBuf,
        error: serde_json::Error,
    },
    /// A manifest version this build does not understand.
    #[error("manifest {path}: version {version} is not supported (this build reads {VERSION})")]
    Version { path: PathBuf, version: u32 },
}

impl Manifest {
    pub fn read(path: &Path) -> Result<Manifest, ManifestError> {
        let bytes = std::fs::read(path).map_err(|error| ManifestError::Io {
            path: path.to_owned(),
            error,
        })?;
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|error| ManifestError::Parse {
            path: path.to_owned(),
            error,
        })?;
        if m.version != VERSION {
            return Err(ManifestError::Version {
                path: path.to_owned(),
                version: m.version,
            });
        }
        Ok(m)
    }

    /// Writes the manifest (to a temporary file renamed into place, so a reader never sees half).
    pub fn write(&self, path: &Path) -> Result<(), ManifestError> {
        let io = |error| ManifestError::Io {
            path: path.to_owned(),
            error,
        };
        let json = self.to_json().map_err(|error| ManifestError::Parse {
            path: path.to_owned(),
            error,
        })?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        std::fs::write(&tmp, json).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// The manifest as JSON with one line per device (a 10,000-device manifest stays readable
    /// and diffable).
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = write!(
            out,
            "{{\n  \"version\": {},\n  \"run\": {},\n  \"devices\": {{",
            self.version,
            serde_json::to_string(&self.run)?
        );
        for (i, (id, record)) in self.devices.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            let _ = write!(
                out,
                "{sep}\n    {}: {}",
                serde_json::to_string(id)?,
                serde_json::to_string(record)?
            );
        }
        out.push_str("\n  }\n}\n");
        Ok(out)
    }

    /// Total acknowledged readings over all devices.
    pub fn acked(&self) -> u64 {
        self.devices.values().map(|d| d.acked.count()).sum()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn written_manifest_reads_back_one_line_per_device() {
        let mut devices = BTreeMap::new();
        for (id, acked) in [("dev-00001", 0..50), ("dev-00002", 3..9)] {
            devices.insert(
                id.to_string(),
                DeviceRecord {
                    next_seq: 50,
                    acked: acked.collect(),
                    dropped: [1, 2].into_iter().collect(),
                    ..Default::default()
                },
            );
        }
        let m = Manifest {
            version: VERSION,
            run: RunInfo {
                started_ms: 1,
                devices: 2,
                qos: 1,
                seed: 3,
                topic: "devices/{id}/telemetry".into(),
            },
            devices,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        m.write(&path).unwrap();
        assert_eq!(Manifest::read(&path).unwrap(), m);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains(r#"    "dev-00002": {"next_seq":50,"acked":[[3,8]],"#),
            "{text}"
        );
        assert_eq!(m.acked(), 56);
    }

    #[test]
    fn an_unknown_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        std::fs::write(&path, r#"{"version": 2, "run": {}, "devices": {}}"#).unwrap();
        assert!(matches!(
            Manifest::read(&path),
            Err(ManifestError::Parse { .. } | ManifestError::Version { .. })
        ));
        std::fs::write(
            &path,
            r#"{"version": 2, "run": {"started_ms":0,"devices":0,"qos":1,"seed":0,"topic":""},
                "devices": {}}"#,
        )
        .unwrap();
        assert!(matches!(
            Manifest::read(&path),
            Err(ManifestError::Version { version: 2, .. })
        ));
    }
}
