//! Readers: one per cursor. A reader reads durable records from its read position (which runs
//! ahead of the confirmed position while records are in flight upstream), and `ack_through`
//! moves the cursor. Records are read from the segment files (the page cache), never kept in
//! memory by the queue, so memory does not grow with the backlog.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::watch;

use super::record::{check_frame, decode_frame, Frame, Record, FRAME_HEADER, MAX_BODY};
use super::segment::{self, SegmentMeta, SEGMENT_HEADER};
use super::{QueueError, Shared};

/// Bytes read from a segment file per `pread`.
const READ_CHUNK: usize = 256 << 10;

/// A damaged range found while reading: segment base, offset, the bytes, estimated records, why.
pub(crate) struct Damage<'a> {
    pub base: u64,
    pub offset: u64,
    pub bytes: &'a [u8],
    pub missing_records: u64,
    pub reason: &'static str,
}

/// An open segment file and a read-ahead buffer over it.
struct OpenSegment {
    base: u64,
    file: File,
    /// File offset of the next frame to look at.
    offset: u64,
    /// Seq of the last valid frame passed in this file.
    prev_seq: u64,
    buf: Vec<u8>,
    buf_off: u64,
}

impl OpenSegment {
    fn open(dir: &Path, base: u64) -> io::Result<OpenSegment> {
        Ok(OpenSegment {
            base,
            file: File::open(segment::segment_path(dir, base))?,
            offset: SEGMENT_HEADER as u64,
            prev_seq: base.saturating_sub(1),
            buf: Vec::new(),
            buf_off: 0,
        })
    }

    /// Up to `n` bytes at `off` (fewer only where `end` comes first).
    fn bytes_at(&mut self, off: u64, n: usize, end: u64) -> io::Result<&[u8]> {
        let buf_end = self.buf_off + self.buf.len() as u64;
        let want_end = (off + n as u64).min(end);
        if !(off >= self.buf_off && want_end <= buf_end) {
            let len = (n.max(READ_CHUNK) as u64).min(end.saturating_sub(off)) as usize;
            self.buf.resize(len, 0);
            self.file.read_exact_at(&mut self.buf, off)?;
            self.buf_off = off;
        }
        let start = (off - self.buf_off) as usize;
        let stop = (want_end - self.buf_off) as usize;
        Ok(self.buf.get(start..stop).unwrap_or(&[]))
    }
}

/// The part of a reader that does blocking file I/O; shared with the read-only inspector.
pub(crate) struct ReadState {
    /// Next sequence number to hand out.
    pub next_seq: u64,
    open: Option<OpenSegment>,
}

impl ReadState {
    pub(crate) fn new(next_seq: u64) -> ReadState {
        ReadState {
            next_seq,
            open: None,
        }
    }

    /// Reads up to `max_records` / about `max_bytes` of payload from `next_seq` on. `locate`
    /// returns the first segment holding a record at or after the given seq (with its readable
    /// end in `bytes`); `damage` is told about each damaged range passed.
    pub(crate) fn read(
        &mut self,
        dir: &Path,
        max_records: usize,
        max_bytes: usize,
        locate: &dyn Fn(u64) -> Option<SegmentMeta>,
        damage: &mut dyn FnMut(Damage<'_>),
    ) -> Result<Vec<Record>, QueueError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while out.len() < max_records && bytes < max_bytes {
            let Some(seg) = locate(self.next_seq) else {
                break;
            };
            // Records below the segment's base were deleted (drop-oldest, max_age) or never were.
            self.next_seq = self.next_seq.max(seg.base);
            if self.open.as_ref().is_none_or(|o| o.base != seg.base) {
                let path = segment::segment_path(dir, seg.base);
                match OpenSegment::open(dir, seg.base) {
                    Ok(o) => self.open = Some(o),
                    // Deleted between `locate` and here: look again.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        self.next_seq = self.next_seq.max(seg.last_seq + 1);
                        continue;
                    }
                    Err(e) => return Err(QueueError::io("open segment", path, e)),
                }
            }
            let Some(open) = self.open.as_mut() else {
                break;
            };
            let end = seg.bytes;
            let before = out.len();
            while out.len() < max_records && bytes < max_bytes && open.offset < end {
                let off = open.offset;
                let prev_seq = open.prev_seq;
                let frame = {
                    let head = read_or(open, off, FRAME_HEADER, end, dir)?;
                    let body_len = head
                        .get(..4)
                        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                        .unwrap_or(0);
                    let want = FRAME_HEADER + body_len.min(MAX_BODY);
                    let slice = read_or(open, off, want, end, dir)?;
                    match check_frame(slice) {
                        Frame::Valid { len, seq, .. } if seq > prev_seq => {
                            Ok((len, seq, decode_frame(&slice[..len])))
                        }
                        Frame::Valid { .. } => Err("sequence number not increasing"),
                        Frame::Incomplete => Err("frame runs past the durable end"),
                        Frame::Invalid(r) => Err(r),
                    }
                };
                match frame {
                    Ok((len, seq, decoded)) => {
                        open.offset += len as u64;
                        open.prev_seq = seq;
                        if seq < self.next_seq {
                            continue;
                        }
                        self.next_seq = seq + 1;
                        match decoded {
                            Some(r) => {
                                bytes += r.payload.len();
                                out.push(r);
                            }
                            None => {
                                let bytes = read_or(open, off, len, end, dir)?;
                                damage(Damage {
                                    base: seg.base,
                                    offset: off,
                                    bytes,
                                    missing_records: 1,
                                    reason: "record body does not decode",
                                })
                            }
                        }
                    }
                    Err(reason) => {
                        let rest_len = (end - off) as usize;
                        let rest = read_or(open, off, rest_len, end, dir)?.to_vec();
                        let prev = open.prev_seq;
                        match segment::resync(&rest, 1, prev) {
                            Some((skip, next)) => {
                                damage(Damage {
                                    base: seg.base,
                                    offset: off,
                                    bytes: &rest[..skip],
                                    missing_records: next - prev - 1,
                                    reason,
                                });
                                open.offset += skip as u64;
                            }
                            None => {
                                damage(Damage {
                                    base: seg.base,
                                    offset: off,
                                    bytes: &rest,
                                    missing_records: seg.last_seq.saturating_sub(prev),
                                    reason,
                                });
                                open.offset = end;
                                self.next_seq = self.next_seq.max(seg.last_seq + 1);
                            }
                        }
                    }
                }
            }
            if open.offset >= end && out.len() == before {
                // Nothing (more) for us in this segment's readable part: all below next_seq, or
                // damaged. Move on; `locate` finds the next segment, or nothing.
                if self.next_seq <= seg.last_seq {
                    self.next_seq = seg.last_seq + 1;
                }
            }
            if open.offset >= end && self.next_seq <= seg.last_seq {
                self.next_seq = seg.last_seq + 1;
            }
        }
        Ok(out)
    }
}

fn read_or<'a>(
    open: &'a mut OpenSegment,
    off: u64,
    n: usize,
    end: u64,
    dir: &Path,
) -> Result<&'a [u8], QueueError> {
    let base = open.base;
    open.bytes_at(off, n, end)
        .map_err(|e| QueueError::io("read segment", segment::segment_path(dir, base), e))
}

/// Reads one cursor's records and moves it. Obtained from [`super::Queue::reader`].
pub struct Reader {
    shared: Arc<Shared>,
    name: String,
    acked: u64,
    state: Option<ReadState>,
    readable: watch::Receiver<u64>,
    /// The readable seq at which [`Reader::batch_now`] last found nothing: [`Reader::readable`]
    /// waits for a change past it instead of spinning.
    empty_at: Option<u64>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("name", &self.name)
            .field("acked", &self.acked)
            .finish()
    }
}

impl Reader {
    pub(crate) fn new(
        shared: Arc<Shared>,
        name: String,
        acked: u64,
        readable: watch::Receiver<u64>,
    ) -> Reader {
        Reader {
            shared,
            name,
            acked,
            state: Some(ReadState::new(acked + 1)),
            readable,
            empty_at: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every record up to this seq was confirmed.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// The next seq this reader will return (or a later one, where records were deleted).
    pub fn position(&self) -> u64 {
        self.state.as_ref().map_or(self.acked + 1, |s| s.next_seq)
    }

    /// Makes the next read start again after the last confirmed record (after a failed send).
    pub fn rewind(&mut self) {
        self.empty_at = None;
        self.state = Some(ReadState::new(self.acked + 1));
    }

    /// Makes the next read start after `seq`, a record already settled (at or after the
    /// persisted cursor; never before it).
    pub fn rewind_after(&mut self, seq: u64) {
        self.empty_at = None;
        self.state = Some(ReadState::new(seq.max(self.acked) + 1));
    }

    /// Reads what is available now without waiting; blocking file I/O.
    pub fn read_now(
        &mut self,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, QueueError> {
        let mut state = self.take_state();
        let r = read_with(&self.shared, &mut state, max_records, max_bytes);
        self.state = Some(state);
        r
    }

    /// Waits until at least one record is available, then returns up to `max_records` (and about
    /// `max_bytes` of payload). Errors with [`QueueError::Closed`] once the queue is closed and
    /// nothing is left to read.
    pub async fn next_batch(
        &mut self,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, QueueError> {
        loop {
            let readable = *self.readable.borrow_and_update();
            if readable >= self.position() {
                let records = self.read_blocking(max_records, max_bytes).await?;
                if !records.is_empty() {
                    return Ok(records);
                }
            }
            if self.shared.lock().closing {
                return Err(QueueError::Closed);
            }
            if self.readable.changed().await.is_err() {
                return Err(QueueError::Closed);
            }
        }
    }

    /// Waits until a record at or after the read position may be readable; errors with
    /// [`QueueError::Closed`] once the queue is closing. Cancel-safe (it only watches), unlike
    /// [`Self::next_batch`]: a loop can wait for records and for other events at once, then
    /// read with [`Self::batch_now`].
    pub async fn readable(&mut self) -> Result<(), QueueError> {
        self.wait_for(true).await.map(drop)
    }

    /// Waits until a record at or after [`Reader::position`] is readable; returns the newest
    /// readable seq. Errors with [`QueueError::Closed`] once the queue is closing.
    pub async fn wait_readable(&mut self) -> Result<u64, QueueError> {
        self.wait_for(false).await
    }

    /// Waits until a record at or after [`Reader::position`] is readable (with `skip_empty`,
    /// not where [`Reader::batch_now`] last found nothing); returns the newest readable seq.
    async fn wait_for(&mut self, skip_empty: bool) -> Result<u64, QueueError> {
        loop {
            let readable = *self.readable.borrow_and_update();
            if readable >= self.position() && !(skip_empty && self.empty_at == Some(readable)) {
                return Ok(readable);
            }
            if self.shared.lock().closing {
                return Err(QueueError::Closed);
            }
            if self.readable.changed().await.is_err() {
                return Err(QueueError::Closed);
            }
        }
    }

    /// Moves the read position past `seq` without reading (a follower with nobody to read for).
    pub fn skip_through(&mut self, seq: u64) {
        if seq >= self.position() {
            self.state = Some(ReadState::new(seq + 1));
        }
    }

    /// Reads up to `max_records` (about `max_bytes`) of what is readable now, on a blocking
    /// thread, without waiting for more; may return none. Not cancel-safe.
    pub async fn batch_now(
        &mut self,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, QueueError> {
        let readable = *self.readable.borrow();
        let result = self.read_blocking(max_records, max_bytes).await;
        self.empty_at = match &result {
            Ok(r) if r.is_empty() => Some(readable),
            _ => None,
        };
        result
    }

    /// The read state, taken out for a read (a fresh one after the confirmed position if none).
    fn take_state(&mut self) -> ReadState {
        self.state
            .take()
            .unwrap_or_else(|| ReadState::new(self.acked + 1))
    }

    /// One read from the current position on a blocking thread. Not cancel-safe (the read
    /// state is away meanwhile).
    async fn read_blocking(
        &mut self,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, QueueError> {
        let mut state = self.take_state();
        let shared = self.shared.clone();
        let (state, result) = tokio::task::spawn_blocking(move || {
            let r = read_with(&shared, &mut state, max_records, max_bytes);
            (state, r)
        })
        .await
        .map_err(|_| QueueError::Closed)?;
        self.state = Some(state);
        result
    }

    /// Marks every record up to `seq` as confirmed: persists the cursor (in place, synced), then
    /// lets the queue delete segments that every cursor's persisted position has passed. A `seq`
    /// at or below the confirmed position is ignored; one beyond the last durable record is
    /// clamped to it. After `remove_cursor` it does nothing.
    pub async fn ack_through(&mut self, seq: u64) -> Result<(), QueueError> {
        let acked = self.acker().ack_through(seq).await?;
        self.note_acked(acked);
        Ok(())
    }

    /// A handle that persists this cursor without borrowing the reader, so a forwarder can
    /// write its cursor while it keeps reading and sending. Tell the reader what was persisted
    /// with [`Reader::note_acked`].
    pub fn acker(&self) -> Acker {
        Acker {
            shared: self.shared.clone(),
            name: self.name.clone(),
        }
    }

    /// Records that an [`Acker`] persisted the cursor at `seq` (rewinds start after it).
    pub fn note_acked(&mut self, seq: u64) {
        self.acked = self.acked.max(seq);
    }
}

/// Persists one reader's cursor (see [`Reader::acker`]).
#[derive(Clone)]
pub struct Acker {
    shared: Arc<Shared>,
    name: String,
}

impl Acker {
    /// [`Reader::ack_through`]; returns the position now persisted.
    pub async fn ack_through(&self, seq: u64) -> Result<u64, QueueError> {
        let seq = {
            let mut st = self.shared.lock();
            let seq = seq.min(st.last_readable_seq());
            let Some(c) = st.cursors.get_mut(&self.name) else {
                // Removed (`remove_cursor`): nothing is persisted any more.
                return Ok(0);
            };
            if seq <= c.acked {
                return Ok(c.acked);
            }
            c.acked = seq;
            seq
        };
        let shared = self.shared.clone();
        let name = self.name.clone();
        tokio::task::spawn_blocking(move || {
            shared.persist_cursor(&name)?;
            shared.apply_retention();
            Ok::<(), QueueError>(())
        })
        .await
        .map_err(|_| QueueError::Closed)??;
        Ok(seq)
    }
}

fn read_with(
    shared: &Arc<Shared>,
    state: &mut ReadState,
    max_records: usize,
    max_bytes: usize,
) -> Result<Vec<Record>, QueueError> {
    let locate = |from: u64| -> Option<SegmentMeta> {
        let st = shared.lock();
        st.segments
            .iter()
            .find(|s| s.records > 0 && s.last_seq >= from)
            .cloned()
    };
    let mut on_damage = |d: Damage<'_>| {
        shared.quarantine(
            d.base,
            d.offset as usize,
            d.bytes,
            d.missing_records,
            d.reason,
        );
    };
    state.read(&shared.dir, max_records, max_bytes, &locate, &mut on_damage)
}
