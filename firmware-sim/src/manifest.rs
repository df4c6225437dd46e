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

/// What `firmware-sim command --manifest FILE` writes and `verify --commands F` reads: per device,
/// the commands sent, in the order they were sent.
///
/// ```json
/// {
///   "version": 1,
///   "kind": "commands",
///   "run": { "started_ms": 1700000000000, "devices": 2, "count": 3, "target": "amqp exchange commands" },
///   "devices": {
///     "dev-00001": { "confirmed": ["dev-00001:0", "dev-00001:1", "dev-00001:2"], "unconfirmed": [] },
///     "dev-00002": { "confirmed": ["dev-00002:0", "dev-00002:2"], "unconfirmed": ["dev-00002:1"] }
///   }
/// }
/// ```
///
/// - `confirmed`: the upstream broker confirmed the command (AMQP publisher confirm without a
///   return; Kafka produce with acks=all). Each must be answered, in this order.
/// - `unconfirmed`: sent, but nacked, returned (unroutable), or the connection failed before the
///   confirm: it may or may not arrive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandManifest {
    pub version: u32,
    /// Always `"commands"`: tells this file from a telemetry manifest.
    pub kind: String,
    pub run: CommandRunInfo,
    pub devices: BTreeMap<String, CommandRecord>,
}

/// What produced a command manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandRunInfo {
    /// Wall clock at the start of the run, milliseconds since the Unix epoch.
    pub started_ms: u64,
    pub devices: usize,
    /// Commands per device.
    pub count: u64,
    /// Where they went, e.g. `amqp exchange commands` (no credentials).
    pub target: String,
}

/// One device's commands, each list in send order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CommandRecord {
    pub confirmed: Vec<String>,
    #[serde(default)]
    pub unconfirmed: Vec<String>,
}

/// The `kind` of a [`CommandManifest`].
pub const COMMANDS_KIND: &str = "commands";

impl CommandManifest {
    pub fn read(path: &Path) -> Result<CommandManifest, ManifestError> {
        let bytes = std::fs::read(path).map_err(|error| ManifestError::Io {
            path: path.to_owned(),
            error,
        })?;
        let m: CommandManifest =
            serde_json::from_slice(&bytes).map_err(|error| ManifestError::Parse {
                path: path.to_owned(),
                error,
            })?;
        if m.version != VERSION || m.kind != COMMANDS_KIND {
            return Err(ManifestError::Version {
                path: path.to_owned(),
                version: m.version,
            });
        }
        Ok(m)
    }

    /// Writes the manifest, one line per device, through a temporary file renamed into place.
    pub fn write(&self, path: &Path) -> Result<(), ManifestError> {
        use std::fmt::Write;
        let parse = |error| ManifestError::Parse {
            path: path.to_owned(),
            error,
        };
        let mut out = String::new();
        let _ = write!(
            out,
            "{{\n  \"version\": {},\n  \"kind\": {},\n  \"run\": {},\n  \"devices\": {{",
            self.version,
            serde_json::to_string(&self.kind).map_err(parse)?,
            serde_json::to_string(&self.run).map_err(parse)?
        );
        for (i, (id, record)) in self.devices.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            let _ = write!(
                out,
                "{sep}\n    {}: {}",
                serde_json::to_string(id).map_err(parse)?,
                serde_json::to_string(record).map_err(parse)?
            );
        }
        out.push_str("\n  }\n}\n");
        let io = |error| ManifestError::Io {
            path: path.to_owned(),
            error,
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        std::fs::write(&tmp, out).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Confirmed commands over all devices.
    pub fn confirmed(&self) -> u64 {
        self.devices
            .values()
            .map(|d| d.confirmed.len() as u64)
            .sum()
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

    #[test]
    fn a_command_manifest_reads_back_and_is_not_a_telemetry_manifest() {
        let mut devices = BTreeMap::new();
        devices.insert(
            "dev-00001".to_string(),
            CommandRecord {
                confirmed: vec!["dev-00001:0".into(), "dev-00001:2".into()],
                unconfirmed: vec!["dev-00001:1".into()],
            },
        );
        let m = CommandManifest {
            version: VERSION,
            kind: COMMANDS_KIND.into(),
            run: CommandRunInfo {
                started_ms: 1,
                devices: 1,
                count: 3,
                target: "amqp exchange commands".into(),
            },
            devices,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        m.write(&path).unwrap();
        assert_eq!(CommandManifest::read(&path).unwrap(), m);
        assert_eq!(m.confirmed(), 2);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains(r#"    "dev-00001": {"confirmed":["dev-00001:0","dev-00001:2"],"unconfirmed":["dev-00001:1"]}"#),
            "{text}"
        );
        // Each kind of manifest refuses the other, naming the file.
        let err = Manifest::read(&path).unwrap_err().to_string();
        assert!(err.contains("c.json"), "{err}");
        let tpath = dir.path().join("t.json");
        std::fs::write(
            &tpath,
            r#"{"version":1,"run":{"started_ms":0,"devices":0,"qos":1,"seed":0,"topic":""},"devices":{}}"#,
        )
        .unwrap();
        assert!(CommandManifest::read(&tpath).is_err());
    }
}
