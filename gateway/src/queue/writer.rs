//! The writer thread (group commit) and the recovery that runs before it starts.
//!
//! Appenders encode their frames into `State::pending` under the lock and wait on the batch's
//! completion. The writer takes the whole pending buffer at once, writes it with one `pwrite` per
//! segment it touches, `fdatasync`s it (`fsync = always`), publishes the new durable end to
//! readers, then completes the batch. While it syncs, the next batch fills up: the more appenders,
//! the larger the batches, and one fsync serves them all.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use super::cursor::{self, CursorFile};
use super::record::micros_since_epoch;
use super::segment::{self, SegmentMeta, SEGMENT_HEADER};
use super::{FsyncPolicy, QueueError, RecoveryReport, Shared, SEQ_RESERVATION};

const RESERVATION_FILE: &str = "seq.reserved";
const RESERVATION_MAGIC: &[u8; 8] = b"EGWQRES1";
/// How often the writer looks for records past `max_age` when idle.
const AGE_CHECK_EVERY: Duration = Duration::from_secs(1);
/// How often a writer whose last group commit failed probes the data dir for space.
const PROBE_EVERY: Duration = Duration::from_secs(5);
/// The probe's size: a few pages, so that a disk with only a sliver left stays "not writable".
const PROBE_BYTES: usize = 64 << 10;
/// A pending buffer that grew past this during a burst is not kept for reuse.
const SPARE_BUFFER_MAX: usize = 8 << 20;

/// The active segment as the writer holds it.
pub(crate) struct Active {
    file: File,
    meta: SegmentMeta,
}

/// What recovery hands to [`super::Queue::open`].
pub(crate) struct Recovered {
    pub segments: VecDeque<SegmentMeta>,
    pub active: Active,
    pub reserved: u64,
    pub next_seq: u64,
    pub cursors: Vec<(String, CursorFile)>,
    pub report: RecoveryReport,
}

fn read_reservation(dir: &Path) -> u64 {
    let Ok(b) = fs::read(dir.join(RESERVATION_FILE)) else {
        return 0;
    };
    if b.len() != 20 || &b[..8] != RESERVATION_MAGIC {
        return 0;
    }
    let crc = u32::from_le_bytes([b[16], b[17], b[18], b[19]]);
    if crc32c::crc32c(&b[..16]) != crc {
        return 0;
    }
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[8..16]);
    u64::from_le_bytes(v)
}

fn write_reservation(dir: &Path, upto: u64) -> io::Result<()> {
    let mut b = [0u8; 20];
    b[..8].copy_from_slice(RESERVATION_MAGIC);
    b[8..16].copy_from_slice(&upto.to_le_bytes());
    let crc = crc32c::crc32c(&b[..16]);
    b[16..].copy_from_slice(&crc.to_le_bytes());
    let tmp = dir.join(".seq.reserved.tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(&b)?;
    f.sync_data()?;
    fs::rename(&tmp, dir.join(RESERVATION_FILE))?;
    segment::sync_dir(dir)
}

/// Copies a damaged range to quarantine during recovery (before `Shared` exists).
fn quarantine_file(dir: &Path, base: u64, offset: usize, bytes: &[u8]) -> bool {
    match super::write_quarantine(dir, base, offset, bytes) {
        Ok(written) => written,
        Err(error) => {
            tracing::error!(segment = base, offset, %error, "could not write quarantine file");
            false
        }
    }
}

/// Moves a whole file into quarantine by renaming it (needs no free space).
fn quarantine_whole(dir: &Path, path: &Path, base: u64, what: &str) -> bool {
    let to = dir
        .join("quarantine")
        .join(format!("{base:020}-{what}.seg"));
    match fs::rename(path, &to) {
        Ok(()) => true,
        Err(error) => {
            tracing::error!(segment = %path.display(), %error, "could not move segment to quarantine; leaving it in place, unused");
            false
        }
    }
}

/// Scans one segment that has no trustworthy sidecar, quarantines damage, truncates a torn tail,
/// and syncs what stays (a previous run with `fsync = interval` may have left it unsynced).
fn recover_segment(
    dir: &Path,
    base: u64,
    report: &mut RecoveryReport,
) -> Result<SegmentMeta, QueueError> {
    let path = segment::segment_path(dir, base);
    let buf =
        segment::read_segment(dir, base).map_err(|e| QueueError::io("read segment", &path, e))?;
    if buf.len() <= SEGMENT_HEADER && !segment::header_ok(&buf, base) {
        // A segment whose creation was cut off: it holds nothing. The caller removes it.
        report.truncated_bytes += buf.len() as u64;
        return Ok(SegmentMeta::empty(base));
    }
    let scan = segment::scan(&buf, base);
    let file = OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|e| QueueError::io("open segment", &path, e))?;
    if !segment::header_ok(&buf, base) {
        if scan.meta.records == 0 {
            tracing::warn!(segment = %path.display(), bytes = buf.len(), "segment header damaged and no valid record inside; file moved to quarantine");
            if quarantine_whole(dir, &path, base, "bad-header") {
                report.quarantined_ranges += 1;
            }
            return Ok(SegmentMeta::empty(base));
        }
        // The records behind a damaged header are intact (each has its CRC): repair in place.
        quarantine_file(dir, base, 0, &buf[..SEGMENT_HEADER]);
        file.write_all_at(&segment::header_bytes(base), 0)
            .map_err(|e| QueueError::io("repair segment header of", &path, e))?;
        report.quarantined_ranges += 1;
        tracing::warn!(segment = %path.display(), records = scan.meta.records, "segment header damaged; repaired, records kept");
    }
    for bad in &scan.bad {
        let bytes = &buf[bad.offset..bad.offset + bad.len];
        // Counted even if the copy fails (disk full): the records are skipped either way.
        quarantine_file(dir, base, bad.offset, bytes);
        report.quarantined_ranges += 1;
        report.quarantined_records += bad.missing_records;
        tracing::warn!(
            segment = %path.display(),
            offset = bad.offset,
            bytes = bad.len,
            records = bad.missing_records,
            reason = bad.reason,
            "damaged records in the middle of a segment moved to quarantine"
        );
    }
    if scan.tail_bytes > 0 && scan.tail_reason == segment::PREALLOCATED {
        // Unused preallocated space: give it back, nothing was lost.
        file.set_len(scan.meta.bytes)
            .map_err(|e| QueueError::io("trim preallocated space of", &path, e))?;
    } else if scan.tail_bytes > 0 {
        file.set_len(scan.meta.bytes)
            .map_err(|e| QueueError::io("truncate torn tail of", &path, e))?;
        report.truncated_bytes += scan.tail_bytes as u64;
        tracing::warn!(
            segment = %path.display(),
            offset = scan.meta.bytes,
            bytes = scan.tail_bytes,
            reason = scan.tail_reason,
            "torn tail truncated (a write cut off by a crash; it was never acknowledged)"
        );
    }
    file.sync_data()
        .map_err(|e| QueueError::io("sync segment", &path, e))?;
    Ok(scan.meta)
}

/// Brings the directory to a consistent state and starts a fresh active segment. On a full disk
/// it still opens: it first deletes what every cursor has confirmed, and if it cannot create a
/// new segment it appends to the last one.
pub(crate) fn recover(dir: &Path) -> Result<Recovered, QueueError> {
    let seg_dir = segment::segments_dir(dir);
    segment::remove_spares(dir);
    let cdir = cursor::cursors_dir(dir);
    let mut report = RecoveryReport::default();

    // Cursors first: they decide what recovery may delete to make room.
    let loaded = cursor::load_all(dir).map_err(|e| QueueError::io("read cursors in", &cdir, e))?;
    let mut cursors = Vec::new();
    for (name, c) in loaded {
        match c {
            Some(c) => cursors.push((name, c)),
            None => {
                tracing::error!(cursor = %name, "cursor file damaged; the cursor restarts at the oldest record (duplicates, not loss)");
                let c = CursorFile {
                    gen: 1,
                    ..CursorFile::default()
                };
                cursor::create(dir, &name, &c)
                    .map_err(|e| QueueError::io("rewrite cursor in", &cdir, e))?;
                report.cursors_reset.push(name.clone());
                cursors.push((name, c));
            }
        }
    }
    let min_acked = super::freeable_through(cursors.iter().map(|(n, c)| (n.as_str(), c.acked)));
    let max_acked = cursors.iter().map(|(_, c)| c.acked).max().unwrap_or(0);

    let bases = segment::list_segments(dir).map_err(|e| QueueError::io("list", &seg_dir, e))?;
    let mut segments: VecDeque<SegmentMeta> = VecDeque::new();
    let mut last_seq = 0u64;
    for (i, &base) in bases.iter().enumerate() {
        let path = segment::segment_path(dir, base);
        let len = fs::metadata(&path)
            .map_err(|e| QueueError::io("stat", &path, e))?
            .len();
        let is_last = i + 1 == bases.len();
        let sidecar = if is_last {
            None
        } else {
            segment::read_meta(dir, base, len)
        };
        let meta = match sidecar {
            Some(m) => m,
            None => {
                let m = recover_segment(dir, base, &mut report)?;
                if m.records > 0 && !is_last {
                    if let Err(error) = segment::write_meta(dir, &m) {
                        tracing::warn!(segment = %path.display(), %error, "could not write sidecar; the segment is scanned again at the next open");
                    }
                }
                m
            }
        };
        if meta.records == 0 {
            segment::remove_segment(dir, base)
                .map_err(|e| QueueError::io("remove empty segment", &path, e))?;
            continue;
        }
        if meta.last_seq <= last_seq {
            tracing::warn!(segment = %path.display(), "segment overlaps the one before it; moved to quarantine");
            if quarantine_whole(dir, &path, base, "overlap") {
                let _ = fs::remove_file(segment::meta_path(dir, base));
                report.quarantined_ranges += 1;
                report.quarantined_records += meta.records;
            }
            continue;
        }
        // Free what every cursor confirmed before writing anything (the disk may be full).
        if !is_last && min_acked.is_some_and(|m| meta.last_seq <= m) {
            segment::remove_segment(dir, base)
                .map_err(|e| QueueError::io("delete confirmed segment", &path, e))?;
            last_seq = meta.last_seq;
            continue;
        }
        last_seq = meta.last_seq;
        report.records += meta.records;
        segments.push_back(meta);
    }

    // Never hand out a seq that anyone may have seen: not a record's, not a cursor's position,
    // not one covered by the durable reservation.
    let old_reserved = read_reservation(dir);
    let highest_base = bases.last().copied().unwrap_or(0);
    let next_seq = (last_seq + 1)
        .max(old_reserved)
        .max(max_acked + 1)
        .max(highest_base)
        .max(1);
    let reserved = match write_reservation(dir, next_seq + SEQ_RESERVATION) {
        Ok(()) => next_seq + SEQ_RESERVATION,
        Err(error) => {
            // The writer reserves again before its first write; until then nothing is written.
            tracing::warn!(%error, "could not write the sequence reservation now; will retry before the first append");
            old_reserved.min(next_seq)
        }
    };

    let tail = segments.back().cloned();
    if let Some(t) = &tail {
        if let Err(error) = segment::write_meta(dir, t) {
            tracing::warn!(%error, segment = t.base, "could not write sidecar of the old last segment");
        }
    }
    let active = match segment::create_segment(dir, next_seq) {
        Ok(file) => {
            let active = Active {
                file,
                meta: SegmentMeta::empty(next_seq),
            };
            segments.push_back(active.meta.clone());
            active
        }
        Err(e) => {
            let err = QueueError::io("create segment", segment::segment_path(dir, next_seq), e);
            let _ = segment::remove_segment(dir, next_seq);
            let Some(t) = tail else {
                return Err(err);
            };
            // No room for a new file: keep appending to the old last segment.
            tracing::warn!(error = %err, segment = t.base, "appending to the previous last segment");
            let _ = fs::remove_file(segment::meta_path(dir, t.base));
            let path = segment::segment_path(dir, t.base);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| QueueError::io("open segment", &path, e))?;
            Active { file, meta: t }
        }
    };
    report.segments = segments.len();
    report.next_seq = next_seq;
    Ok(Recovered {
        segments,
        active,
        reserved,
        next_seq,
        cursors,
        report,
    })
}

/// Keeps one pre-zeroed spare segment ready (see `segment::prepare_spare`), in its own thread so
/// that writing the zeros never delays a batch.
pub(crate) struct Spares {
    ready: std::sync::Mutex<SpareState>,
    changed: std::sync::Condvar,
}

#[derive(Default)]
struct SpareState {
    ready: bool,
    stop: bool,
}

impl Spares {
    fn new() -> Arc<Spares> {
        Arc::new(Spares {
            ready: std::sync::Mutex::new(SpareState::default()),
            changed: std::sync::Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SpareState> {
        self.ready.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims the spare if one is ready (the preparer then makes the next).
    fn claim(&self) -> bool {
        let mut st = self.lock();
        let had = st.ready;
        st.ready = false;
        drop(st);
        self.changed.notify_all();
        had
    }

    pub(crate) fn stop(&self) {
        self.lock().stop = true;
        self.changed.notify_all();
    }

    fn run(self: Arc<Self>, dir: std::path::PathBuf, size: u64) {
        loop {
            {
                let mut st = self.lock();
                while st.ready && !st.stop {
                    st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                if st.stop {
                    return;
                }
            }
            match segment::prepare_spare(&dir, size) {
                Ok(()) => self.lock().ready = true,
                Err(error) => {
                    tracing::warn!(%error, "could not prepare a spare segment; retrying in 5 s (segments grow as written meanwhile)");
                    let st = self.lock();
                    let _ = self
                        .changed
                        .wait_timeout_while(st, Duration::from_secs(5), |s| !s.stop);
                }
            }
        }
    }
}

/// The spare-segment preparer and its thread.
pub(crate) type SparesThread = (Arc<Spares>, JoinHandle<()>);

pub(crate) fn spawn(
    shared: Arc<Shared>,
    active: Active,
    reserved: u64,
) -> Result<(JoinHandle<()>, Option<SparesThread>), QueueError> {
    let dir = shared.dir.clone();
    let spares = if shared.opts.preallocates() {
        let spares = Spares::new();
        let (s, d, size) = (spares.clone(), dir.clone(), shared.opts.segment_bytes);
        let h = std::thread::Builder::new()
            .name("queue-spare".into())
            .spawn(move || s.run(d, size))
            .map_err(|e| QueueError::io("start spare-segment thread for", dir.clone(), e))?;
        Some((spares, h))
    } else {
        None
    };
    let writer = Writer {
        spares: spares.as_ref().map(|(s, _)| s.clone()),
        shared,
        active,
        reserved,
        last_sync: Instant::now(),
        unsynced: false,
        spare: Vec::new(),
        last_age_check: Instant::now(),
        failed_batch_log: crate::throttle::LogThrottle::default(),
        last_probe: Instant::now(),
        probe_bytes: None,
    };
    let h = std::thread::Builder::new()
        .name("queue-writer".into())
        .spawn(move || writer.run())
        .map_err(|e| QueueError::io("start writer thread for", dir, e))?;
    Ok((h, spares))
}

struct Writer {
    shared: Arc<Shared>,
    /// The spare-segment preparer, when segments are preallocated.
    spares: Option<Arc<Spares>>,
    active: Active,
    reserved: u64,
    last_sync: Instant,
    /// Bytes were written since the last fdatasync (`interval` policy).
    unsynced: bool,
    spare: Vec<u8>,
    last_age_check: Instant,
    /// A full disk fails every batch until space is freed: one error line per 10 s.
    failed_batch_log: crate::throttle::LogThrottle,
    last_probe: Instant,
    /// Set after a batch failed on a full disk: the size of the probe write to try.
    probe_bytes: Option<usize>,
}

/// Reads the frame header at `pos` of a buffer the appenders encoded (trusted, in bounds).
fn frame_at(buf: &[u8], pos: usize) -> (usize, u64, u64) {
    let word = |a: usize, n: usize| -> u64 {
        let mut x = [0u8; 8];
        x[..n].copy_from_slice(&buf[a..a + n]);
        u64::from_le_bytes(x)
    };
    let len = word(pos, 4) as usize + 8;
    (len, word(pos + 8, 8), word(pos + 16, 8))
}

impl Writer {
    fn run(mut self) {
        loop {
            let taken = {
                let mut st = self.shared.lock();
                loop {
                    if !st.pending.is_empty() {
                        break;
                    }
                    if st.closing {
                        break;
                    }
                    let timeout = self.idle_timeout();
                    let (guard, res) = self
                        .shared
                        .wake_writer
                        .wait_timeout(st, timeout)
                        .unwrap_or_else(|e| e.into_inner());
                    st = guard;
                    if res.timed_out() && st.pending.is_empty() {
                        drop(st);
                        self.housekeeping();
                        st = self.shared.lock();
                    }
                }
                if st.pending.is_empty() {
                    None
                } else {
                    let buf = std::mem::replace(&mut st.pending, std::mem::take(&mut self.spare));
                    st.in_flight_bytes = buf.len() as u64;
                    let batch = std::mem::replace(&mut st.batch, super::Batch::new());
                    Some((buf, batch))
                }
            };
            let Some((mut buf, batch)) = taken else {
                // Closing and nothing left to write: sync, give back unused preallocated space,
                // and wake readers so they see the close.
                self.sync_now();
                let len = self.active.file.metadata().map(|m| m.len()).unwrap_or(0);
                if len > self.active.meta.bytes {
                    let _ = self
                        .active
                        .file
                        .set_len(self.active.meta.bytes)
                        .and_then(|()| self.active.file.sync_data());
                }
                self.shared.readable.send_modify(|_| {});
                return;
            };
            let before = self.active.meta.base;
            let mut sealed = Vec::new();
            let result = self.write_batch(&buf, &mut sealed);
            self.publish(before, &sealed);
            let failed = result.is_err();
            match &result {
                Err(error) => {
                    let logged = self.failed_batch_log.admit().map(|left_out| {
                        tracing::error!(%error, records = count_frames(&buf), similar_left_out = left_out, "queue append batch failed");
                    });
                    self.shared.space.notify_waiters();
                    // Probe for space only after a full disk (an I/O error is not cured by
                    // space), the first time PROBE_EVERY after this failure, and with as many
                    // bytes as the failed batch needed.
                    self.last_probe = Instant::now();
                    self.probe_bytes = matches!(error, QueueError::DiskFull { .. }).then(|| {
                        buf.len()
                            .clamp(PROBE_BYTES, self.shared.opts.segment_bytes.max(1) as usize)
                    });
                    // Records appended while this batch was being written come after it on their
                    // connections: they fail with it, in the same critical section, so that no
                    // device has a later record stored while an earlier one failed (appenders
                    // use `Queue::try_append_after` to see the failure from then on).
                    let mut st = self.shared.lock();
                    let next = std::mem::take(&mut st.pending);
                    let next_batch = std::mem::replace(&mut st.batch, super::Batch::new());
                    batch.complete(Err(error.clone()));
                    if !next.is_empty() {
                        next_batch.complete(Err(error.clone()));
                    }
                    drop(st);
                    if !next.is_empty() {
                        // Its bytes are free now: wake appenders waiting for space.
                        self.shared.space.notify_waiters();
                        let records = count_frames(&next);
                        let why = "records appended while the batch before them failed fail with it (per-device order)";
                        if logged.is_some() {
                            tracing::warn!(records, "{why}");
                        } else {
                            tracing::debug!(records, "{why}");
                        }
                    }
                }
                Ok(()) => {
                    batch.complete(Ok(()));
                    self.probe_bytes = None;
                    self.writable_again("an append");
                }
            }
            self.shared.counters.batches.fetch_add(1, Ordering::Relaxed);
            if failed {
                self.shared
                    .counters
                    .failed_batches
                    .fetch_add(1, Ordering::Relaxed);
            }
            self.shared
                .counters
                .last_batch_failed
                .store(failed, Ordering::Relaxed);
            self.shared
                .counters
                .batch_records
                .observe(count_frames(&buf) as u64);
            // Interval syncs and max_age are due under steady traffic too, not only when idle.
            self.housekeeping();
            buf.clear();
            if buf.capacity() <= SPARE_BUFFER_MAX {
                self.spare = buf;
            }
        }
    }

    fn idle_timeout(&self) -> Duration {
        let mut t = AGE_CHECK_EVERY;
        if let (true, FsyncPolicy::Interval(iv)) = (self.unsynced, self.shared.opts.fsync) {
            t = t.min(
                iv.saturating_sub(self.last_sync.elapsed())
                    .max(Duration::from_millis(1)),
            );
        }
        t
    }

    fn housekeeping(&mut self) {
        self.probe_if_failed();
        if self.unsynced {
            if let FsyncPolicy::Interval(iv) = self.shared.opts.fsync {
                if self.last_sync.elapsed() >= iv {
                    self.sync_now();
                }
            }
        }
        if self.last_age_check.elapsed() >= AGE_CHECK_EVERY {
            self.last_age_check = Instant::now();
            if let Some(max_age) = self.shared.opts.max_age {
                self.expire(max_age);
            }
        }
    }

    /// After a group commit failed on a full disk the queue reports itself not writable
    /// (`/healthz`, `/readyz`) until a write succeeds. On a quiet site no append may come for a
    /// long time after space returns, so [`PROBE_EVERY`] after the last failure, and every as
    /// long again, the writer writes and syncs a file as large as the failed batch (at least
    /// [`PROBE_BYTES`], at most a segment) beside the segments, then removes it; when that works, the
    /// queue is writable again (the next real append still decides for itself). An I/O error
    /// other than a full disk is not probed: only an append that succeeds clears it.
    fn probe_if_failed(&mut self) {
        let Some(bytes) = self.probe_bytes else {
            return;
        };
        if self.last_probe.elapsed() < PROBE_EVERY {
            return;
        }
        self.last_probe = Instant::now();
        let path = super::probe_path(&self.shared.dir);
        let probe = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&path)?;
            std::io::Write::write_all(&mut f, &vec![0u8; bytes])?;
            f.sync_data()
        };
        let result = probe();
        let _ = std::fs::remove_file(&path);
        match result {
            Ok(()) => {
                self.probe_bytes = None;
                // Appends are written on this thread: none failed since the probe began.
                self.shared
                    .counters
                    .last_batch_failed
                    .store(false, Ordering::Relaxed);
                self.writable_again("a probe write of the same size as the failed batch");
            }
            Err(error) => tracing::debug!(%error, bytes, "probe write in the data dir failed"),
        }
    }

    /// Ends a spell of failed batches in the log: says what showed that the queue is writable
    /// again and how many failure lines were left out, so that the next failure, however soon,
    /// is logged at once.
    fn writable_again(&mut self, by: &str) {
        // Reached on every successful batch: `reset` says nothing unless a spell just ended.
        if let Some(left_out) = self.failed_batch_log.reset() {
            tracing::info!(
                failed_batches_left_out = left_out,
                "the queue is writable again ({by} succeeded)"
            );
        }
    }

    /// Drops segments whose newest record is older than `max_age`; seals the active segment first
    /// when all of it has expired (it only happens when no appends came for `max_age`).
    fn expire(&mut self, max_age: Duration) {
        let cutoff = micros_since_epoch(SystemTime::now())
            .saturating_sub(u64::try_from(max_age.as_micros()).unwrap_or(u64::MAX));
        let m = &self.active.meta;
        if m.records > 0 && m.last_time_us < cutoff {
            let before = m.base;
            let next = m.last_seq + 1;
            match self.roll(next) {
                Ok(sealed) => self.publish(before, &[sealed]),
                Err(error) => tracing::error!(%error, "could not seal expired active segment"),
            }
        }
        let gone: Vec<SegmentMeta> = {
            let mut st = self.shared.lock();
            let mut gone = Vec::new();
            while st.segments.len() > 1
                && st
                    .segments
                    .front()
                    .is_some_and(|s| s.records == 0 || s.last_time_us < cutoff)
            {
                match st.drop_front(&self.shared.counters) {
                    Some(s) => gone.push(s),
                    None => break,
                }
            }
            gone
        };
        if !gone.is_empty() {
            let records: u64 = gone.iter().map(|s| s.records).sum();
            tracing::warn!(segments = gone.len(), records, max_age = ?max_age, "dropped records older than max_age");
            self.shared.persist_cursors();
            self.shared.unlink_segments(&gone);
        }
    }

    fn sync_now(&mut self) {
        if !self.unsynced {
            return;
        }
        let t = Instant::now();
        match self.active.file.sync_data() {
            Ok(()) => {
                self.unsynced = false;
                self.shared.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
                self.shared.fsync_done(t.elapsed());
            }
            Err(error) => tracing::error!(%error, "fdatasync of the active segment failed"),
        }
        self.last_sync = Instant::now();
    }

    /// Seals the active segment (sync, sidecar) and starts a new one at `next_base`.
    fn roll(&mut self, next_base: u64) -> Result<SegmentMeta, QueueError> {
        let dir = self.shared.dir.clone();
        let path = segment::segment_path(&dir, self.active.meta.base);
        let t = Instant::now();
        self.active
            .file
            .sync_data()
            .map_err(|e| QueueError::io("sync segment", &path, e))?;
        self.shared.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.shared.fsync_done(t.elapsed());
        // A preallocated segment gives back its unused zeros when sealed.
        let len = self
            .active
            .file
            .metadata()
            .map_err(|e| QueueError::io("stat segment", &path, e))?
            .len();
        if len > self.active.meta.bytes {
            self.active
                .file
                .set_len(self.active.meta.bytes)
                .and_then(|()| self.active.file.sync_data())
                .map_err(|e| QueueError::io("trim segment", &path, e))?;
        }
        segment::write_meta(&dir, &self.active.meta)
            .map_err(|e| QueueError::io("write sidecar of", &path, e))?;
        let new_path = segment::segment_path(&dir, next_base);
        let spare = match &self.spares {
            Some(s) if s.claim() => segment::take_spare(&dir, next_base)
                .map_err(|e| QueueError::io("take spare segment as", &new_path, e))?,
            _ => None,
        };
        let file = match spare {
            Some(f) => f,
            None => segment::create_segment(&dir, next_base)
                .map_err(|e| QueueError::io("create segment", &new_path, e))?,
        };
        let sealed = std::mem::replace(
            &mut self.active,
            Active {
                file,
                meta: SegmentMeta::empty(next_base),
            },
        );
        self.unsynced = false;
        Ok(sealed.meta)
    }

    /// Writes one batch, pushing the segments it sealed onto `sealed` (also when it fails later:
    /// they are on disk). On error, what it wrote to the active segment since the last good point
    /// is cut back off.
    fn write_batch(&mut self, buf: &[u8], sealed: &mut Vec<SegmentMeta>) -> Result<(), QueueError> {
        let dir = self.shared.dir.clone();
        // Sequence numbers must be reserved durably before any of them reaches the disk.
        let mut last = 0;
        let mut pos = 0;
        while pos < buf.len() {
            let (len, seq, _) = frame_at(buf, pos);
            last = seq;
            pos += len;
        }
        if last >= self.reserved {
            let upto = last + SEQ_RESERVATION;
            write_reservation(&dir, upto)
                .map_err(|e| QueueError::io("write", dir.join(RESERVATION_FILE), e))?;
            self.reserved = upto;
        }

        let seg_limit = self.shared.opts.segment_bytes;
        let mut start_of_segment = self.active.meta.clone();
        let mut meta = self.active.meta.clone();
        let mut chunk = 0;
        let mut pos = 0;
        while pos < buf.len() {
            let (len, seq, time) = frame_at(buf, pos);
            if meta.records > 0 && meta.bytes + len as u64 > seg_limit {
                self.write_chunk(&buf[chunk..pos], &meta)?;
                match self.roll(seq) {
                    Ok(m) => sealed.push(m),
                    Err(e) => {
                        // Nothing of this batch in this segment may stay visible or on disk: its
                        // appenders get the error. A sidecar written before the failure no longer
                        // matches the file's length, so the next open rescans the segment.
                        let _ = self.active.file.set_len(start_of_segment.bytes);
                        self.active.meta = start_of_segment;
                        let _ = segment::remove_segment(&dir, seq);
                        return Err(e);
                    }
                }
                start_of_segment = self.active.meta.clone();
                meta = self.active.meta.clone();
                chunk = pos;
            }
            meta.push(seq, time, len);
            pos += len;
        }
        let path = segment::segment_path(&dir, meta.base);
        self.write_chunk(&buf[chunk..], &meta)?;
        match self.shared.opts.fsync {
            FsyncPolicy::Always => {
                let t = Instant::now();
                if let Err(e) = self.active.file.sync_data() {
                    // After a failed fdatasync the page cache may claim data that is not on disk:
                    // cut everything since the last good sync and fail the batch.
                    let _ = self.active.file.set_len(start_of_segment.bytes);
                    self.active.meta = start_of_segment;
                    return Err(QueueError::io("sync segment", &path, e));
                }
                self.shared.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
                self.shared.fsync_done(t.elapsed());
            }
            FsyncPolicy::Interval(_) => self.unsynced = true,
        }
        Ok(())
    }

    /// Writes `bytes` at the active segment's end; `after` is its meta once they are written.
    fn write_chunk(&mut self, bytes: &[u8], after: &SegmentMeta) -> Result<(), QueueError> {
        if bytes.is_empty() {
            return Ok(());
        }
        let at = self.active.meta.bytes;
        if let Err(e) = self.active.file.write_all_at(bytes, at) {
            let _ = self.active.file.set_len(at);
            let path = segment::segment_path(&self.shared.dir, self.active.meta.base);
            return Err(QueueError::io("write segment", path, e));
        }
        self.active.meta = after.clone();
        Ok(())
    }

    /// Shows readers what is now durable: the segments sealed by this batch and the active one.
    fn publish(&self, active_before: u64, sealed: &[SegmentMeta]) {
        let last = {
            let mut st = self.shared.lock();
            st.in_flight_bytes = 0;
            st.publish(active_before, sealed, &self.active.meta);
            st.last_readable_seq()
        };
        self.shared.readable.send_replace(last);
        // Appends held back by the pending cap can go on now; after a roll, drop-oldest has a
        // sealed segment it can delete.
        self.shared.space.notify_waiters();
    }
}

fn count_frames(buf: &[u8]) -> usize {
    let mut n = 0;
    let mut pos = 0;
    while pos < buf.len() {
        pos += frame_at(buf, pos).0;
        n += 1;
    }
    n
}
