//! The consumed offsets of a Kafka downlink, kept by the gateway: rskafka has no consumer
//! groups, so the broker keeps nothing for us.
//!
//! One file per downlink, `data_dir/downlink/kafka-<name>.offsets`, JSON, for people to read:
//!
//! ```text
//! {
//!   "version": 1,
//!   "downlink": "<name>",
//!   "topics": {
//!     "<kafka topic>": { "<partition>": <next offset>, ... },
//!     ...
//!   }
//! }
//! ```
//!
//! - **A number is the next offset to read** in that partition. Invariant: every record
//!   before it is settled: durable in the command store, durable in the dead letters, or a
//!   duplicate of one that is. The downlink writes a number only after that (the mirror of an
//!   AMQP ack after `PendingAppend::durable()`); a crash before the write makes the downlink
//!   read those records again, and drop them as duplicates by message id (`RecentIds`, seeded
//!   from the command store at start).
//! - **Topics are kept apart**, so a downlink switched to another topic and back resumes
//!   where it was. A partition missing from the file starts at the downlink's `start`.
//! - **Written whole and atomically**: `<file>.tmp` is written and fsync'd, renamed over the
//!   file, and the directory fsync'd. A crash leaves the old file or the new one, never a mix.
//! - **A file that cannot be read or parsed is an error** naming the file and the fault, not
//!   a silent restart from `start` (which would replay or skip a topic's commands). Since the
//!   gateway writes it only by rename, such a file was damaged from outside; the operator fixes
//!   or deletes it (deleted: each partition starts at `start`).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The format written and understood.
const VERSION: u32 = 1;

/// Why the offsets file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OffsetsError {
    /// The file exists but cannot be read (permissions, I/O).
    #[error("cannot read the offsets file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not this format (damaged or edited by hand); the text says where.
    #[error("the offsets file {path} is not valid: {why}; fix it, or delete it to start each partition at `start`")]
    Corrupt { path: PathBuf, why: String },
    /// Writing the new file, renaming it or syncing its directory failed.
    #[error("cannot write the offsets file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OffsetsFile {
    version: u32,
    downlink: String,
    topics: BTreeMap<String, BTreeMap<i32, i64>>,
}

/// The offsets of one downlink, in memory and on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offsets {
    path: PathBuf,
    downlink: String,
    topics: BTreeMap<String, BTreeMap<i32, i64>>,
}

impl Offsets {
    /// The file of downlink `name` in the command store's directory (`data_dir/downlink`).
    pub fn path(store_dir: &Path, name: &str) -> PathBuf {
        store_dir.join(format!("kafka-{name}.offsets"))
    }

    /// Reads `path`; no file yet is no offsets.
    pub fn load(path: &Path, downlink: &str) -> Result<Offsets, OffsetsError> {
        let text = match fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Offsets {
                    path: path.to_path_buf(),
                    downlink: downlink.to_string(),
                    topics: BTreeMap::new(),
                })
            }
            Err(source) => {
                return Err(OffsetsError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let corrupt = |why: String| OffsetsError::Corrupt {
            path: path.to_path_buf(),
            why,
        };
        let file: OffsetsFile =
            serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
        if file.version != VERSION {
            return Err(corrupt(format!(
                "version {} (this gateway writes and reads version {VERSION})",
                file.version
            )));
        }
        if file.downlink != downlink {
            return Err(corrupt(format!(
                "it belongs to downlink {:?}, not {downlink:?}",
                file.downlink
            )));
        }
        for (topic, parts) in &file.topics {
            if let Some((p, o)) = parts.iter().find(|(p, o)| **p < 0 || **o < 0) {
                return Err(corrupt(format!(
                    "topic {topic:?} partition {p} has offset {o}; partitions and offsets are not negative"
                )));
            }
        }
        Ok(Offsets {
            path: path.to_path_buf(),
            downlink: downlink.to_string(),
            topics: file.topics,
        })
    }

    /// The next offset to read in `topic`/`partition`, if one was stored.
    pub fn get(&self, topic: &str, partition: i32) -> Option<i64> {
        self.topics.get(topic)?.get(&partition).copied()
    }

    /// Records that everything before `next` in `topic`/`partition` is settled (in memory:
    /// [`Offsets::save`] writes it).
    pub fn set(&mut self, topic: &str, partition: i32, next: i64) {
        self.topics
            .entry(topic.to_string())
            .or_default()
            .insert(partition, next);
    }

    /// Writes the file atomically: temp file, fsync, rename, fsync of the directory.
    pub fn save(&self) -> Result<(), OffsetsError> {
        let err = |source| OffsetsError::Write {
            path: self.path.clone(),
            source,
        };
        let file = OffsetsFile {
            version: VERSION,
            downlink: self.downlink.clone(),
            topics: self.topics.clone(),
        };
        let mut text = serde_json::to_vec_pretty(&file)
            .map_err(|e| err(std::io::Error::other(e.to_string())))?;
        text.push(b'\n');
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(err)?;
        let mut tmp_name = self.path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let mut f = fs::File::create(&tmp).map_err(err)?;
        f.write_all(&text).map_err(err)?;
        f.sync_all().map_err(err)?;
        drop(f);
        fs::rename(&tmp, &self.path).map_err(err)?;
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn offsets_round_trip_through_the_file_per_topic_and_partition() {
        let dir = tempfile::tempdir().unwrap();
        let path = Offsets::path(dir.path(), "cmds");
        let mut o = Offsets::load(&path, "cmds").unwrap();
        assert_eq!(o.get("commands", 0), None, "no file: no offsets");
        o.set("commands", 0, 12);
        o.set("commands", 2, 7);
        o.set("other", 0, 3);
        o.save().unwrap();
        let back = Offsets::load(&path, "cmds").unwrap();
        assert_eq!(back, o);
        assert_eq!(back.get("commands", 0), Some(12));
        assert_eq!(back.get("commands", 1), None);
        assert_eq!(back.get("other", 0), Some(3));
        // Human-readable, as documented.
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"version\": 1"), "{text}");
        assert!(text.contains("\"2\": 7"), "{text}");
        // A later save replaces the file whole and leaves no temp file behind.
        o.set("commands", 0, 13);
        o.save().unwrap();
        assert_eq!(
            Offsets::load(&path, "cmds").unwrap().get("commands", 0),
            Some(13)
        );
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["kafka-cmds.offsets"]);
    }

    #[test]
    fn a_torn_temp_file_leaves_the_saved_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let path = Offsets::path(dir.path(), "cmds");
        let mut o = Offsets::load(&path, "cmds").unwrap();
        o.set("t", 0, 5);
        o.save().unwrap();
        // A crash while writing the next version: only the temp file is half written.
        fs::write(
            dir.path().join("kafka-cmds.offsets.tmp"),
            b"{\"version\": 1, \"downl",
        )
        .unwrap();
        assert_eq!(Offsets::load(&path, "cmds").unwrap().get("t", 0), Some(5));
        // The next save overwrites the stale temp file.
        o.set("t", 0, 6);
        o.save().unwrap();
        assert_eq!(Offsets::load(&path, "cmds").unwrap().get("t", 0), Some(6));
    }

    #[test]
    fn a_damaged_file_is_an_error_naming_the_file_and_the_fault() {
        let dir = tempfile::tempdir().unwrap();
        let path = Offsets::path(dir.path(), "cmds");
        let cases: [(&str, &str); 5] = [
            ("{\"version\": 1, \"downl", "EOF"),
            ("not json", "expected"),
            (
                "{\"version\": 2, \"downlink\": \"cmds\", \"topics\": {}}",
                "version 2",
            ),
            (
                "{\"version\": 1, \"downlink\": \"other\", \"topics\": {}}",
                "belongs to downlink \"other\"",
            ),
            (
                "{\"version\": 1, \"downlink\": \"cmds\", \"topics\": {\"t\": {\"0\": -4}}}",
                "offset -4",
            ),
        ];
        for (text, want) in cases {
            fs::write(&path, text).unwrap();
            let e = Offsets::load(&path, "cmds").unwrap_err().to_string();
            assert!(e.contains(&path.display().to_string()), "{e}");
            assert!(e.contains(want), "{want:?} in {e}");
            assert!(e.contains("delete it"), "says what to do: {e}");
        }
        fs::write(
            &path,
            "{\"version\": 1, \"downlink\": \"cmds\", \"topics\": {\"t\": {\"zero\": 1}}}",
        )
        .unwrap();
        assert!(matches!(
            Offsets::load(&path, "cmds"),
            Err(OffsetsError::Corrupt { .. })
        ));
    }
}
