//! What the queue needs to know from the operator's config. The config module maps the TOML
//! `[queue]` section onto [`QueueOptions`]; the queue never reads TOML itself.

use std::path::PathBuf;
use std::time::Duration;

/// When an append counts as durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Every batch is written and `fdatasync`ed before any of its appenders is told it is durable.
    /// Survives a process crash and a power cut.
    Always,
    /// A batch is durable once `write()` returned (it is in the OS page cache); the writer
    /// `fdatasync`s every `Duration`. Survives a process crash, not a power cut or kernel crash.
    Interval(Duration),
}

/// What an append does when the queue holds `max_bytes` already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullPolicy {
    /// The append waits for space (uplinks confirming records frees it). `try_append` reports
    /// [`crate::queue::QueueError::Full`] so that ingest can withhold acks or answer "quota exceeded".
    Backpressure,
    /// The oldest sealed segment is deleted to make room; every cursor counts the records it lost.
    DropOldest,
}

/// Options for [`crate::queue::Queue::open`].
#[derive(Debug, Clone)]
pub struct QueueOptions {
    /// Directory holding segments, cursors, quarantine and the lock file. Created if missing.
    pub data_dir: PathBuf,
    /// Upper bound on the bytes of all segment files plus records waiting to be written.
    pub max_bytes: u64,
    /// Records older than this (by receive time) are deleted and counted as dropped.
    pub max_age: Option<Duration>,
    /// A segment is sealed and a new one started when the next record would push it past this.
    pub segment_bytes: u64,
    pub fsync: FsyncPolicy,
    pub full_policy: FullPolicy,
    /// Pre-write each segment with zeros (by a background thread, as a spare) before records go
    /// into it, so that an `fdatasync` flushes data without a journal commit for the file's
    /// growth. It lowers the sync latency a little, and makes the disk write every segment
    /// twice: on flash (SD cards, eMMC) that is twice the wear. See [`QueueOptions::preallocates`].
    pub preallocate: bool,
}

impl QueueOptions {
    /// Whether segments are pre-written with zeros before use (see `queue/mod.rs`): when
    /// `preallocate` asks for it, and then only with segments of at least 1 MiB and room for at
    /// least 16 of them, since the active segment and one spare occupy their full size on disk.
    pub fn preallocates(&self) -> bool {
        self.preallocate
            && self.segment_bytes >= 1 << 20
            && self.max_bytes >= 16 * self.segment_bytes
    }

    /// Options with the documented defaults for `data_dir` (as in `config/gateway.toml`).
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        QueueOptions {
            data_dir: data_dir.into(),
            max_bytes: 1 << 30,
            max_age: None,
            segment_bytes: 16 << 20,
            fsync: FsyncPolicy::Always,
            full_policy: FullPolicy::Backpressure,
            preallocate: crate::config::DEFAULT_PREALLOCATE,
        }
    }
}
