//! The store-and-forward queue: a segmented, append-only log on disk with group commit, named
//! cursors, bounds and crash recovery. It knows nothing of MQTT or of uplinks.
//!
//! # On-disk format
//!
//! ```text
//! data_dir/
//!   LOCK                          flock'd by the process that has the queue open; holds its pid
//!   seq.reserved                  highest sequence number that may have been handed out (see below)
//!   segments/
//!     00000000000000000001.seg    records with seq >= 1, until the next segment's base
//!     00000000000000000001.meta   sidecar written when that segment was sealed
//!     00000000000000004097.seg    the active segment (the last one): the only one written to
//!     write-probe.tmp             only for a moment, while the writer probes a full disk for
//!                                 space (removed at once, and at open if a crash left it)
//!   cursors/<name>.cursor         one per uplink: acked seq + dropped count, two slots written
//!                                 in turn, in place (a torn write leaves the other slot)
//!   quarantine/<base>-<offset>.bin  damaged bytes cut out of a segment, named by where they were
//!
//! segment file := header frame*
//! header       := "EGWQSEG1" base_seq:u64le                                       (16 bytes)
//! frame        := len:u32le crc:u32le body[len]     crc = CRC32C(len bytes ++ body)
//! body         := seq:u64le time_us:u64le flags:u8
//!                 device_id:str topic:str
//!                 [username:str]      if flags & 0x08
//!                 [content_type:str]  if flags & 0x10
//!                 [payload_format:u8] if flags & 0x20
//!                 [n:varint (key:str value:str){n}] if flags & 0x40   (MQTT 5 user properties)
//!                 [extras]            if flags & 0x80
//!                 payload             (the rest of the body)
//! flags        := qos (bits 0-1) | retain 0x04 | the optional fields above
//! str          := len:varint(LEB128) utf8-bytes
//! extras       := version:u8 n:varint tlv*           (the tlvs fill exactly n bytes)
//! tlv          := type:u8 len:varint value[len]
//!                 type 1: message expiry interval, u32be seconds as received (expires at
//!                         time_us + it); 2: response topic, utf8; 3: correlation data, bytes
//!                 (MQTT 5 properties kept for subscribers)
//! meta         := "EGWQMET1" base last_seq records bytes first_time_us last_time_us (u64le each)
//!                 crc:u32le
//! cursor       := slot slot
//! slot         := "EGWQCUR2" gen:u64le acked:u64le dropped:u64le crc:u32le pad:u32le  (newer gen wins)
//! ```
//!
//! A record with a 64-byte payload, an 8-byte device id and topic `t` costs 8 + 17 + 9 + 2 + 64
//! bytes on disk: the fixed overhead is 25 bytes plus one length byte per string.
//!
//! Extras (flag 0x80, added after the first release; records without them are laid out exactly
//! as before, so older segments read unchanged): `version` is 1. A reader skips TLV types it
//! does not know (each is length-prefixed) and a block of another version whole; a new version
//! is only for a changed meaning of an existing type. A block that runs past the body, a TLV
//! that runs past the block, an expiry that is not 4 bytes or a response topic that is not
//! UTF-8 make the record undecodable: it is damage, quarantined like a bad CRC.
//!
//! # Invariants
//!
//! - Sequence numbers strictly increase within the log and are never reused, not even across a
//!   power cut: before the writer writes a record whose seq reaches `seq.reserved`, it durably moves
//!   the reservation ahead by [`SEQ_RESERVATION`]; on open the next seq is at least the reservation.
//!   So seq numbers jump at each restart, and consumers that deduplicate by seq never confuse two
//!   records.
//! - Only the writer thread writes segment files, and only the last segment. A segment is sealed
//!   (synced, sidecar written) before the next one is created.
//! - Readers see a record only once it is durable under the configured policy: after fdatasync for
//!   `fsync = always`, after write() for `interval`. So nothing a reader forwarded can vanish in a
//!   process crash.
//! - An append's future resolves `Ok` only after its record is durable; a failed batch (ENOSPC, EIO)
//!   is cut back off the file, and every appender in it gets the error.
//! - A cursor's file is written before the queue acts on it: a segment is deleted only after every
//!   cursor's persisted position has passed its last record (and never while no cursor exists).
//!   Cursor writes need no new disk blocks, so confirmations (and the space they free) keep
//!   working on a full disk.
//! - Memory: records waiting for the writer are capped (`PENDING_CAP_BYTES`); readers read from
//!   the files. Nothing grows with the backlog.
//! - Disk use (segments + records waiting for the writer) stays within `max_bytes`.
//!
//! # Recovery (on open)
//!
//! Sealed segments with a valid sidecar are trusted (their bytes were synced at sealing); readers
//! and `queue verify` still check every CRC when they read them. Segments without one, and always
//! the last segment, are scanned frame by frame: a torn or corrupt tail (bytes after the last valid
//! frame with no valid frame after them) is truncated; a damaged range with valid frames after it
//! is copied to `quarantine/` and skipped. Both are counted and logged, and the queue serves on.
//! The old last segment is then sealed and a new active segment started, so every segment except
//! the last one has a sidecar. Cursors are read first, and segments they all passed are deleted
//! before recovery writes anything, so a queue that filled its disk still opens; if no new segment
//! can be created, the old last segment stays the active one. The next sequence number is above
//! every record, every cursor position and the durable reservation.

pub mod bench;
mod cursor;
pub mod hist;
pub mod inspect;
mod lock;
mod options;
mod reader;
mod record;
mod segment;
mod writer;

pub use options::{FsyncPolicy, FullPolicy, QueueOptions};
pub use reader::{Acker, Reader};

/// The local router's cursor (see `sessions::router`). The queue never frees a record for this
/// cursor alone: with no other cursor, records stay for uplinks configured later.
pub const SESSIONS_CURSOR: &str = "_sessions";

/// Up to which seq records may be freed, given every cursor's (name, confirmed seq): the lowest
/// confirmed seq, or nothing when there is no cursor or only the router's.
pub(crate) fn freeable_through<'a>(
    cursors: impl Iterator<Item = (&'a str, u64)> + Clone,
) -> Option<u64> {
    if !cursors.clone().any(|(name, _)| name != SESSIONS_CURSOR) {
        return None;
    }
    cursors.map(|(_, acked)| acked).min()
}
pub use record::{micros_since_epoch, EncodeError, NewRecord, Record};
pub use segment::SegmentMeta;

use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;

use tokio::sync::{watch, Notify};

use cursor::CursorFile;

/// How far ahead the writer reserves sequence numbers (one extra fsync per this many records).
pub const SEQ_RESERVATION: u64 = 1 << 20;

/// Bytes of records waiting for the writer beyond which appends wait (see `pending_cap`): at
/// 6,400 appends in flight of ~100 bytes a batch is under 1 MiB, so this only bites when the
/// disk stalls.
const PENDING_CAP_BYTES: u64 = 16 << 20;

/// Errors of the queue. Each says what failed and on which file.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueError {
    /// Another process has the data directory open.
    #[error("queue directory {dir} is in use by another process (pid {holder}); stop it or use another data_dir")]
    Locked { dir: PathBuf, holder: String },
    /// An I/O call failed; `op` says what the queue was doing.
    #[error("could not {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    /// The disk is full. Appends fail until space returns; nothing already durable is affected.
    #[error("disk full writing {path}: append refused, the queue keeps what it has and takes new records again once space is freed")]
    DiskFull { path: PathBuf },
    /// The queue holds `max_bytes` and the policy is `backpressure`.
    #[error(
        "queue full ({bytes} of max_bytes {max_bytes}); waiting for uplinks to confirm records"
    )]
    Full { bytes: u64, max_bytes: u64 },
    /// The record cannot be stored (too large for a segment, bad field).
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// A cursor name that cannot be a file name.
    #[error(
        "cursor name {0:?} is not allowed: use 1-64 of A-Z a-z 0-9 - _ . not starting with '.'"
    )]
    BadCursorName(String),
    /// The queue was closed.
    #[error("the queue is closed")]
    Closed,
}

impl QueueError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, e: io::Error) -> QueueError {
        let path = path.into();
        if e.kind() == io::ErrorKind::StorageFull || e.raw_os_error() == Some(28) {
            QueueError::DiskFull { path }
        } else {
            QueueError::Io {
                op,
                path,
                source: Arc::new(e),
            }
        }
    }

    /// Whether retrying the same append later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            QueueError::DiskFull { .. } | QueueError::Full { .. } | QueueError::Io { .. }
        )
    }

    /// A short, bounded label for metrics.
    pub fn as_label(&self) -> &'static str {
        match self {
            QueueError::Locked { .. } => "locked",
            QueueError::Io { .. } => "io",
            QueueError::DiskFull { .. } => "disk_full",
            QueueError::Full { .. } => "full",
            QueueError::Encode(_) => "encode",
            QueueError::BadCursorName(_) => "bad_cursor_name",
            QueueError::Closed => "closed",
        }
    }
}

/// What recovery found and did on open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: usize,
    pub records: u64,
    /// Bytes cut off segment tails (torn writes from a crash).
    pub truncated_bytes: u64,
    /// Damaged ranges moved to quarantine, and the records they are estimated to have held.
    pub quarantined_ranges: u64,
    pub quarantined_records: u64,
    /// Cursor files that could not be read; those cursors restart from the oldest record.
    pub cursors_reset: Vec<String>,
    /// The first sequence number this run hands out.
    pub next_seq: u64,
}

/// A point-in-time view of the queue for tools and metrics.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QueueStats {
    pub records: u64,
    pub bytes: u64,
    pub segments: usize,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Receive time (µs since the epoch) of the oldest record.
    pub oldest_time_us: Option<u64>,
    pub max_bytes: u64,
    /// Appenders waiting for space right now (`backpressure`).
    pub waiting_appenders: u64,
    pub appended_records: u64,
    pub dropped_records: u64,
    pub quarantined_records: u64,
    pub quarantined_ranges: u64,
    pub fsyncs: u64,
    /// Slowest and summed fdatasync time since open, in µs.
    pub fsync_us_max: u64,
    pub fsync_us_total: u64,
    pub batches: u64,
    /// Group commits that failed (their appenders got the error; nothing was acknowledged).
    pub failed_batches: u64,
    /// fdatasync latency (µs).
    pub fsync_hist: hist::Histogram,
    /// Records per group-commit batch.
    pub batch_hist: hist::Histogram,
    pub cursors: Vec<CursorStats>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CursorStats {
    pub name: String,
    /// Every record up to this seq was confirmed.
    pub acked: u64,
    /// Records after the cursor still in the queue.
    pub lag_records: u64,
    /// Receive time (µs) of the oldest record the cursor has not confirmed.
    pub oldest_unacked_time_us: Option<u64>,
    /// Records this cursor lost to `drop-oldest` / `max_age`.
    pub dropped: u64,
}

/// The completion of one group-commit batch, shared by every appender in it.
struct Batch {
    result: OnceLock<Result<(), QueueError>>,
    done: Notify,
}

impl Batch {
    fn new() -> Arc<Batch> {
        Arc::new(Batch {
            result: OnceLock::new(),
            done: Notify::new(),
        })
    }

    fn complete(&self, r: Result<(), QueueError>) {
        let _ = self.result.set(r);
        self.done.notify_waiters();
    }

    async fn wait(&self) -> Result<(), QueueError> {
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = self.result.get() {
                return r.clone();
            }
            notified.await;
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct CursorState {
    /// Confirmed position, as far as the owner told us.
    acked: u64,
    /// The position in the cursor file; retention deletes only below this.
    persisted: u64,
    dropped: u64,
    /// Write generation of the cursor file's slots.
    gen: u64,
}

/// Everything appenders, the writer, readers and ackers share, under one mutex. Critical sections
/// are short: no I/O is done while holding it except unlinking deleted segments.
struct State {
    /// Encoded frames waiting for the writer, in seq order.
    pending: Vec<u8>,
    /// The batch that the frames in `pending` belong to.
    batch: Arc<Batch>,
    /// Next sequence number to hand out.
    next_seq: u64,
    /// Segments on disk, oldest first; the last one is the active segment. `bytes` and `last_seq`
    /// of the active one only cover what readers may see (durable).
    segments: VecDeque<SegmentMeta>,
    /// Sum of `bytes` over `segments` (kept, not recomputed: it is checked on every append).
    segment_bytes: u64,
    /// Bytes the writer has taken but not yet published.
    in_flight_bytes: u64,
    cursors: BTreeMap<String, CursorState>,
    waiting_appenders: u64,
    /// Size of the last record refused with `Full` (0 after a successful append): what "full"
    /// means for `is_full` and `wait_for_space`.
    last_refused_len: u64,
    /// `segment_bytes` from the options (for the roll overhead in `used_bytes`).
    segment_limit: u64,
    /// Disk held by preallocation beyond what records use: the active segment's unused zeros and
    /// the spare (counted as two full segments when preallocating).
    prealloc_reserve: u64,
    closing: bool,
}

impl State {
    /// Bytes handed to appenders' futures but not yet written (bounds the writer's memory).
    fn unwritten_bytes(&self) -> u64 {
        self.pending.len() as u64 + self.in_flight_bytes
    }

    /// Disk bytes in use or promised: segment files, their sidecars, records waiting for the
    /// writer, and the header and sidecar of every segment those records may still roll into.
    fn used_bytes(&self) -> u64 {
        let per_segment = (segment::SEGMENT_HEADER + segment::META_LEN) as u64;
        let unwritten = self.unwritten_bytes();
        self.segment_bytes
            + self.segments.len() as u64 * segment::META_LEN as u64
            + unwritten
            + (1 + unwritten / self.segment_limit) * per_segment
            + self.prealloc_reserve
    }

    /// Whether the last refused record (or any record) would still find the queue full.
    fn is_full(&self, max: u64) -> bool {
        self.used_bytes() + self.last_refused_len.max(1) > max
    }

    /// Removes the oldest segment from the books (never the active one).
    fn pop_front(&mut self) -> Option<SegmentMeta> {
        if self.segments.len() < 2 {
            return None;
        }
        let seg = self.segments.pop_front()?;
        self.segment_bytes -= seg.bytes;
        debug_assert_eq!(
            self.segment_bytes,
            self.segments.iter().map(|s| s.bytes).sum::<u64>()
        );
        Some(seg)
    }

    /// Replaces the active segment's entry by the segments sealed since and the new active one.
    fn publish(&mut self, active_before: u64, sealed: &[SegmentMeta], active: &SegmentMeta) {
        if self
            .segments
            .back()
            .is_some_and(|s| s.base == active_before)
        {
            if let Some(old) = self.segments.pop_back() {
                self.segment_bytes -= old.bytes;
            }
        }
        for s in sealed.iter().chain(std::iter::once(active)) {
            self.segment_bytes += s.bytes;
            self.segments.push_back(s.clone());
        }
    }

    fn last_readable_seq(&self) -> u64 {
        self.segments.back().map(|s| s.last_seq).unwrap_or(0)
    }

    /// Removes the oldest segment from the books, charging its records to every cursor that had
    /// not confirmed them. Returns its base for the caller to unlink. The queue-wide count is
    /// the records that some cursor lost (those every cursor had confirmed were no loss).
    fn drop_front(&mut self, counters: &Counters) -> Option<SegmentMeta> {
        let seg = self.pop_front()?;
        let mut lost_by_any = if self.cursors.is_empty() {
            seg.records
        } else {
            0
        };
        for c in self.cursors.values_mut() {
            let lost = lost_records(&seg, c.acked);
            c.dropped += lost;
            lost_by_any = lost_by_any.max(lost);
        }
        counters.dropped.fetch_add(lost_by_any, Ordering::Relaxed);
        Some(seg)
    }
}

/// Creates `dir` (and its missing parents) so that a power cut cannot take it away: a new
/// directory's name is durable only once the directory holding it is synced, so the parent of
/// every directory created here is synced. The parent of an existing `dir` is synced too (a run
/// killed between creating and syncing it left it named but not durable), where that is allowed.
fn create_dir_durable(dir: &Path) -> io::Result<()> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if dir.is_dir() {
        if let Err(error) = segment::sync_dir(parent) {
            tracing::warn!(dir = %parent.display(), %error, "could not sync the directory holding the queue's directory (if that was created just now, a power cut may lose it)");
        }
        return Ok(());
    }
    if !parent.is_dir() {
        create_dir_durable(parent)?;
    }
    match fs::create_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    segment::sync_dir(parent)
}

/// The writer's probe for space after a batch failed on a full disk: written, synced and
/// removed at once, on the segments' filesystem; not a segment name, so never read as one.
pub(crate) fn probe_path(dir: &Path) -> PathBuf {
    segment::segments_dir(dir).join("write-probe.tmp")
}

pub(crate) fn quarantine_path(dir: &Path, base: u64, offset: usize) -> PathBuf {
    dir.join("quarantine")
        .join(format!("{base:020}-{offset}.bin"))
}

/// Writes a quarantine file unless one for the same place exists. `Ok(true)` when written now.
pub(crate) fn write_quarantine(
    dir: &Path,
    base: u64,
    offset: usize,
    bytes: &[u8],
) -> io::Result<bool> {
    use std::io::Write;
    let path = quarantine_path(dir, base, offset);
    let mut f = match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(e),
    };
    f.write_all(bytes)?;
    f.sync_data()?;
    Ok(true)
}

/// Records of `seg` above `acked`.
fn lost_records(seg: &SegmentMeta, acked: u64) -> u64 {
    if seg.records == 0 || acked >= seg.last_seq {
        0
    } else if acked < seg.base {
        seg.records
    } else {
        (seg.last_seq - acked).min(seg.records)
    }
}

struct Counters {
    appended: AtomicU64,
    dropped: AtomicU64,
    quarantined_records: AtomicU64,
    quarantined_ranges: AtomicU64,
    fsyncs: AtomicU64,
    fsync_us_total: AtomicU64,
    fsync_us_max: AtomicU64,
    batches: AtomicU64,
    failed_batches: AtomicU64,
    /// The last group commit failed (a full disk, an I/O error): the queue is not writable.
    last_batch_failed: std::sync::atomic::AtomicBool,
    fsync_us: hist::Buckets,
    batch_records: hist::Buckets,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            appended: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            quarantined_records: AtomicU64::new(0),
            quarantined_ranges: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
            fsync_us_total: AtomicU64::new(0),
            fsync_us_max: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            failed_batches: AtomicU64::new(0),
            last_batch_failed: std::sync::atomic::AtomicBool::new(false),
            fsync_us: hist::Buckets::new(hist::FSYNC_US_BOUNDS),
            batch_records: hist::Buckets::new(hist::BATCH_RECORDS_BOUNDS),
        }
    }
}

pub(crate) struct Shared {
    dir: PathBuf,
    opts: QueueOptions,
    state: Mutex<State>,
    /// Wakes the writer when `pending` becomes non-empty or the queue closes.
    wake_writer: Condvar,
    /// The last sequence number readers may read.
    readable: watch::Sender<u64>,
    /// Notified whenever bytes are freed (segments deleted, a failed batch cut back).
    space: Notify,
    /// Serialises cursor file writes.
    cursor_io: Mutex<()>,
    counters: Counters,
    /// Held until the queue is closed (then another `open` may take the directory).
    lock: Mutex<Option<lock::DirLock>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug in this module; the state it protects is
        // still consistent at every await-free step, so keep serving rather than poisoning.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Copies a damaged range to the quarantine directory, once per (segment, offset): the file is
    /// created exclusively, so two readers passing the same damage count it once.
    fn quarantine(&self, base: u64, offset: usize, bytes: &[u8], missing: u64, reason: &str) {
        match write_quarantine(&self.dir, base, offset, bytes) {
            Ok(false) => {}
            Ok(true) => {
                self.counters
                    .quarantined_records
                    .fetch_add(missing, Ordering::Relaxed);
                self.counters
                    .quarantined_ranges
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    segment = base,
                    offset,
                    bytes = bytes.len(),
                    records = missing,
                    reason,
                    "damaged queue record copied to quarantine and skipped"
                );
            }
            Err(error) => tracing::error!(
                segment = base,
                offset,
                %error,
                "could not write quarantine file; skipping the damaged range anyway"
            ),
        }
    }

    /// Writes one cursor's current state to its file (serialised with every other cursor
    /// write, so slots and generations stay in order), then records what is persisted.
    fn persist_cursor(&self, name: &str) -> Result<(), QueueError> {
        let _io = self.cursor_io.lock().unwrap_or_else(|e| e.into_inner());
        let file = {
            let mut st = self.lock();
            if st.closing {
                // The directory may belong to another process by now.
                return Err(QueueError::Closed);
            }
            let Some(c) = st.cursors.get_mut(name) else {
                // Removed meanwhile: do not bring its file back.
                return Ok(());
            };
            c.gen += 1;
            CursorFile {
                acked: c.acked,
                dropped: c.dropped,
                gen: c.gen,
            }
        };
        cursor::store(&self.dir, name, &file)
            .map_err(|e| QueueError::io("write cursor", cursor::cursors_dir(&self.dir), e))?;
        if let Some(c) = self.lock().cursors.get_mut(name) {
            c.persisted = c.persisted.max(file.acked);
        }
        Ok(())
    }

    /// Writes every cursor's file (after drop counts changed).
    fn persist_cursors(&self) {
        let names: Vec<String> = self.lock().cursors.keys().cloned().collect();
        for name in names {
            if let Err(error) = self.persist_cursor(&name) {
                tracing::error!(cursor = %name, %error, "could not persist cursor drop count");
            }
        }
    }

    fn fsync_done(&self, took: std::time::Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.counters
            .fsync_us_total
            .fetch_add(us, Ordering::Relaxed);
        self.counters.fsync_us_max.fetch_max(us, Ordering::Relaxed);
        self.counters.fsync_us.observe(us);
    }

    fn unlink_segments(&self, segs: &[SegmentMeta]) {
        for s in segs {
            if let Err(error) = segment::remove_segment(&self.dir, s.base) {
                tracing::error!(segment = s.base, %error, "could not delete queue segment");
            }
        }
        if !segs.is_empty() {
            self.space.notify_waiters();
        }
    }

    /// Deletes sealed segments that every cursor has passed. Called after a cursor moved.
    fn apply_retention(&self) {
        let gone: Vec<SegmentMeta> = {
            let mut st = self.lock();
            let Some(min_acked) =
                freeable_through(st.cursors.iter().map(|(n, c)| (n.as_str(), c.persisted)))
            else {
                return;
            };
            let mut gone = Vec::new();
            while st.segments.front().is_some_and(|s| s.last_seq <= min_acked) {
                match st.pop_front() {
                    Some(s) => gone.push(s),
                    None => break,
                }
            }
            gone
        };
        self.unlink_segments(&gone);
    }
}

/// Counts an appender in `waiting_appenders` for as long as it lives (also when its future is
/// dropped while waiting).
struct WaitingGuard<'a>(&'a Shared);

impl<'a> WaitingGuard<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.lock().waiting_appenders += 1;
        WaitingGuard(shared)
    }
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.lock().waiting_appenders -= 1;
    }
}

/// Most bytes that appends may have waiting for the writer: a few batches' worth, at least one
/// record of the largest size. Beyond it appends see `Full` until the disk catches up.
fn pending_cap(opts: &QueueOptions) -> u64 {
    PENDING_CAP_BYTES.max(opts.segment_bytes)
}

/// A handle to an open queue. Cheap to clone; the queue closes when [`Queue::close`] is called or
/// the last `Queue` handle is dropped (readers do not keep it open).
#[derive(Clone)]
pub struct Queue {
    shared: Arc<Shared>,
    writer: Arc<WriterHandle>,
}

struct WriterHandle {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    spares: Mutex<Option<writer::SparesThread>>,
}

impl WriterHandle {
    fn close(&self) {
        self.shared.lock().closing = true;
        self.shared.wake_writer.notify_all();
        self.shared.space.notify_waiters();
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
        let spares = self.spares.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((s, h)) = spares {
            s.stop();
            let _ = h.join();
        }
        // Nothing writes any more: let the next process (or a reopen here) have the directory.
        self.shared
            .lock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        self.close();
    }
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("dir", &self.shared.dir)
            .finish()
    }
}

/// The batch of an earlier append, for [`Queue::try_append_after`].
#[derive(Clone)]
pub struct AppendMarker(Arc<Batch>);

impl AppendMarker {
    /// Whether that append failed.
    pub fn failed(&self) -> bool {
        matches!(self.0.result.get(), Some(Err(_)))
    }
}

/// An append in progress: the record has its sequence number and waits for the writer.
#[must_use = "the record is durable only once this resolves"]
pub struct PendingAppend {
    seq: u64,
    batch: Arc<Batch>,
}

impl PendingAppend {
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// A handle for [`Queue::try_append_after`]: the next append of the same device refuses
    /// once this one has failed.
    pub fn marker(&self) -> AppendMarker {
        AppendMarker(self.batch.clone())
    }

    /// Whether the record's batch has finished (durable or failed): [`PendingAppend::durable`]
    /// then resolves without waiting. The connection writer uses it to put the acks one group
    /// commit released into one write instead of writing before each wait.
    pub fn is_settled(&self) -> bool {
        self.batch.result.get().is_some()
    }

    /// Resolves once the record is durable (returns its seq), or with the batch's error.
    pub async fn durable(self) -> Result<u64, QueueError> {
        self.batch.wait().await.map(|()| self.seq)
    }
}

impl Queue {
    /// Opens (creating if needed) the queue in `opts.data_dir`, recovering what a crash left.
    /// Blocking: call it from `spawn_blocking` or before the runtime is busy.
    pub fn open(opts: QueueOptions) -> Result<(Queue, RecoveryReport), QueueError> {
        let dir = opts.data_dir.clone();
        for sub in ["", "segments", "cursors", "quarantine"] {
            let p = dir.join(sub);
            create_dir_durable(&p).map_err(|e| QueueError::io("create directory", &p, e))?;
        }
        let lock = lock::DirLock::acquire(&dir)?;
        // A probe file a crash left behind (it only exists while the writer probes).
        let _ = fs::remove_file(probe_path(&dir));
        let recovered = writer::recover(&dir)?;
        let report = recovered.report.clone();
        let (readable, _) = watch::channel(recovered.segments.back().map_or(0, |s| s.last_seq));
        let counters = Counters::default();
        counters
            .quarantined_records
            .store(report.quarantined_records, Ordering::Relaxed);
        counters
            .quarantined_ranges
            .store(report.quarantined_ranges, Ordering::Relaxed);
        let shared = Arc::new(Shared {
            dir,
            state: Mutex::new(State {
                pending: Vec::with_capacity(1 << 20),
                batch: Batch::new(),
                next_seq: recovered.next_seq,
                segment_bytes: recovered.segments.iter().map(|s| s.bytes).sum(),
                segments: recovered.segments,
                in_flight_bytes: 0,
                cursors: recovered
                    .cursors
                    .into_iter()
                    .map(|(n, c)| {
                        (
                            n,
                            CursorState {
                                acked: c.acked,
                                persisted: c.acked,
                                dropped: c.dropped,
                                gen: c.gen,
                            },
                        )
                    })
                    .collect(),
                waiting_appenders: 0,
                last_refused_len: 0,
                segment_limit: opts.segment_bytes.max(1),
                prealloc_reserve: if opts.preallocates() {
                    2 * opts.segment_bytes
                } else {
                    0
                },
                closing: false,
            }),
            opts,
            wake_writer: Condvar::new(),
            readable,
            space: Notify::new(),
            cursor_io: Mutex::new(()),
            counters,
            lock: Mutex::new(Some(lock)),
        });
        shared.apply_retention();
        let (handle, spares) = writer::spawn(shared.clone(), recovered.active, recovered.reserved)?;
        tracing::info!(
            dir = %shared.dir.display(),
            segments = report.segments,
            records = report.records,
            truncated_bytes = report.truncated_bytes,
            quarantined_records = report.quarantined_records,
            next_seq = report.next_seq,
            "queue open"
        );
        Ok((
            Queue {
                writer: Arc::new(WriterHandle {
                    shared: shared.clone(),
                    thread: Mutex::new(Some(handle)),
                    spares: Mutex::new(spares),
                }),
                shared,
            },
            report,
        ))
    }

    pub fn data_dir(&self) -> &Path {
        &self.shared.dir
    }

    pub fn options(&self) -> &QueueOptions {
        &self.shared.opts
    }

    /// Hands the record to the writer without waiting for space. Under `backpressure` a full queue
    /// answers [`QueueError::Full`] at once (the caller decides: wait with [`Queue::wait_for_space`],
    /// answer "quota exceeded", stop reading its socket). Under `drop-oldest` the oldest segment
    /// makes room.
    pub fn try_append(&self, rec: &NewRecord<'_>) -> Result<PendingAppend, QueueError> {
        self.try_append_after(rec, None)
    }

    /// [`Queue::try_append`] for a stream of records that must stay in order (one device's):
    /// refused with the earlier append's error once the append `after` has failed. A failed
    /// batch fails the records appended while it was written as well (in the same critical
    /// section as this check), so a stream never has a record stored after one that failed.
    pub fn try_append_after(
        &self,
        rec: &NewRecord<'_>,
        after: Option<&AppendMarker>,
    ) -> Result<PendingAppend, QueueError> {
        let len = record::validate(rec, self.shared.opts.segment_bytes)?;
        let mut dropped = Vec::new();
        let pending = {
            let mut st = self.shared.lock();
            if st.closing {
                return Err(QueueError::Closed);
            }
            if let Some(Some(Err(e))) = after.map(|m| m.0.result.get()) {
                return Err(e.clone());
            }
            let max = self.shared.opts.max_bytes;
            if st.unwritten_bytes() > 0
                && st.unwritten_bytes() + len as u64 > pending_cap(&self.shared.opts)
            {
                // The disk is behind: hold appenders back instead of buffering without bound.
                st.last_refused_len = len as u64;
                return Err(QueueError::Full {
                    bytes: st.used_bytes(),
                    max_bytes: max,
                });
            }
            if st.used_bytes() + len as u64 > max {
                if self.shared.opts.full_policy == FullPolicy::DropOldest {
                    while st.used_bytes() + len as u64 > max {
                        match st.drop_front(&self.shared.counters) {
                            Some(s) => dropped.push(s),
                            None => break,
                        }
                    }
                }
                if st.used_bytes() + len as u64 > max {
                    let bytes = st.used_bytes();
                    st.last_refused_len = len as u64;
                    drop(st);
                    if !dropped.is_empty() {
                        self.shared.persist_cursors();
                        self.shared.unlink_segments(&dropped);
                    }
                    return Err(QueueError::Full {
                        bytes,
                        max_bytes: max,
                    });
                }
            }
            let seq = st.next_seq;
            st.next_seq += 1;
            st.last_refused_len = 0;
            let was_empty = st.pending.is_empty();
            record::encode_frame(&mut st.pending, rec, seq, len);
            let batch = st.batch.clone();
            drop(st);
            if was_empty {
                self.shared.wake_writer.notify_one();
            }
            PendingAppend { seq, batch }
        };
        if !dropped.is_empty() {
            let records: u64 = dropped.iter().map(|s| s.records).sum();
            tracing::warn!(
                segments = dropped.len(),
                records,
                "queue full: dropped the oldest records (full_policy = drop-oldest)"
            );
            self.shared.persist_cursors();
            self.shared.unlink_segments(&dropped);
        }
        self.shared
            .counters
            .appended
            .fetch_add(1, Ordering::Relaxed);
        Ok(pending)
    }

    /// Waits until the record last refused with [`QueueError::Full`] would fit (or the queue
    /// closes). Use after `Full`; then try again (another appender may have taken the space).
    pub async fn wait_for_space(&self) {
        loop {
            let notified = self.shared.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.shared.lock();
                if st.closing || !st.is_full(self.shared.opts.max_bytes) {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Appends and waits until the record is durable; under `backpressure` it first waits for
    /// space as long as the queue is full. Returns the record's sequence number.
    pub async fn append(&self, rec: &NewRecord<'_>) -> Result<u64, QueueError> {
        let mut waiting: Option<WaitingGuard<'_>> = None;
        let pending = loop {
            let notified = self.shared.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.try_append(rec) {
                Err(QueueError::Full { .. }) => {
                    if waiting.is_none() {
                        waiting = Some(WaitingGuard::new(&self.shared));
                    }
                    notified.await;
                }
                other => break other?,
            }
        };
        drop(waiting);
        pending.durable().await
    }

    /// Whether the queue is full right now: the last record refused with `Full` (or, if none
    /// was, a one-byte record) would not fit.
    pub fn is_full(&self) -> bool {
        self.shared.lock().is_full(self.shared.opts.max_bytes)
    }

    /// Whether the queue is open (not closed or closing).
    pub fn is_open(&self) -> bool {
        !self.shared.lock().closing
    }

    /// Whether the queue takes appends: open, and its last group commit did not fail.
    pub fn is_writable(&self) -> bool {
        !self.shared.lock().closing
            && !self
                .shared
                .counters
                .last_batch_failed
                .load(Ordering::Relaxed)
    }

    /// Opens a reader on the named cursor, creating the cursor at the oldest record if it is new
    /// (blocking: creating a cursor syncs its file).
    pub fn reader(&self, name: &str) -> Result<Reader, QueueError> {
        if self.shared.lock().closing {
            return Err(QueueError::Closed);
        }
        if !cursor::valid_name(name) {
            return Err(QueueError::BadCursorName(name.to_string()));
        }
        let acked = self.shared.lock().cursors.get(name).map(|c| c.acked);
        let acked = match acked {
            Some(a) => a,
            None => {
                let _io = self
                    .shared
                    .cursor_io
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                // Invariant: every record, durable or still pending, has seq >= the oldest
                // segment's base (the active segment's base is at most the next pending seq).
                let start = {
                    let st = self.shared.lock();
                    st.segments
                        .front()
                        .map_or(st.next_seq, |s| s.base)
                        .saturating_sub(1)
                };
                let file = CursorFile {
                    acked: start,
                    dropped: 0,
                    gen: 1,
                };
                cursor::create(&self.shared.dir, name, &file).map_err(|e| {
                    QueueError::io("create cursor", cursor::cursors_dir(&self.shared.dir), e)
                })?;
                self.shared
                    .lock()
                    .cursors
                    .entry(name.to_string())
                    .or_insert(CursorState {
                        acked: start,
                        persisted: start,
                        dropped: 0,
                        gen: 1,
                    })
                    .acked
            }
        };
        Ok(Reader::new(
            self.shared.clone(),
            name.to_string(),
            acked,
            self.shared.readable.subscribe(),
        ))
    }

    /// A reader without a cursor that starts after the newest record written so far: it sees what
    /// is appended from now on, holds nothing back (records are freed without waiting for it; a
    /// follower that falls behind skips what was freed) and keeps no position across restarts.
    /// The local router follows the queue with one.
    pub fn follower(&self, name: &str) -> Reader {
        let last = self.shared.lock().last_readable_seq();
        Reader::new(
            self.shared.clone(),
            name.to_string(),
            last,
            self.shared.readable.subscribe(),
        )
    }

    /// Removes a cursor: the queue no longer keeps records for it (blocking: syncs the directory).
    pub fn remove_cursor(&self, name: &str) -> Result<(), QueueError> {
        if !cursor::valid_name(name) {
            return Err(QueueError::BadCursorName(name.to_string()));
        }
        let _io = self
            .shared
            .cursor_io
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.shared.lock().cursors.remove(name);
        cursor::remove(&self.shared.dir, name).map_err(|e| {
            QueueError::io("remove cursor", cursor::cursors_dir(&self.shared.dir), e)
        })?;
        drop(_io);
        self.shared.apply_retention();
        Ok(())
    }

    pub fn stats(&self) -> QueueStats {
        let st = self.shared.lock();
        let c = &self.shared.counters;
        let records = st.segments.iter().map(|s| s.records).sum();
        let first = st.segments.iter().find(|s| s.records > 0);
        QueueStats {
            records,
            bytes: st.used_bytes(),
            segments: st.segments.len(),
            first_seq: first.map(|s| s.base),
            last_seq: st
                .segments
                .iter()
                .rev()
                .find(|s| s.records > 0)
                .map(|s| s.last_seq),
            oldest_time_us: first.map(|s| s.first_time_us),
            max_bytes: self.shared.opts.max_bytes,
            waiting_appenders: st.waiting_appenders,
            appended_records: c.appended.load(Ordering::Relaxed),
            dropped_records: c.dropped.load(Ordering::Relaxed),
            quarantined_records: c.quarantined_records.load(Ordering::Relaxed),
            quarantined_ranges: c.quarantined_ranges.load(Ordering::Relaxed),
            fsyncs: c.fsyncs.load(Ordering::Relaxed),
            fsync_us_max: c.fsync_us_max.load(Ordering::Relaxed),
            fsync_us_total: c.fsync_us_total.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            failed_batches: c.failed_batches.load(Ordering::Relaxed),
            fsync_hist: c.fsync_us.snapshot(),
            batch_hist: c.batch_records.snapshot(),
            cursors: st
                .cursors
                .iter()
                .map(|(name, cur)| cursor_stats(name, cur.acked, cur.dropped, st.segments.iter()))
                .collect(),
        }
    }

    /// Stops taking appends, writes and syncs what is pending, stops the writer. Idempotent.
    /// Blocking (joins the writer thread).
    pub fn close(&self) {
        self.writer.close();
    }
}

pub(crate) fn cursor_stats<'a>(
    name: &str,
    acked: u64,
    dropped: u64,
    segments: impl Iterator<Item = &'a SegmentMeta>,
) -> CursorStats {
    let mut lag = 0;
    let mut oldest = None;
    for s in segments {
        let n = lost_records(s, acked);
        if n > 0 {
            lag += n;
            if oldest.is_none() {
                // Within the segment holding the cursor, the first unconfirmed record's time is not
                // known without reading it; the segment's first time is a lower bound.
                oldest = Some(s.first_time_us);
            }
        }
    }
    CursorStats {
        name: name.to_string(),
        acked,
        lag_records: lag,
        oldest_unacked_time_us: oldest,
        dropped,
    }
}
