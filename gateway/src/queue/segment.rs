//! Segment files: names, the 16-byte header, the `.meta` sidecar written when a segment is sealed,
//! and the scan that walks a segment's frames (used by recovery, readers and `queue verify`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use super::record::{check_frame, Frame, FRAME_HEADER};

/// `magic (8) | base_seq u64le (8)`.
pub(crate) const SEGMENT_HEADER: usize = 16;
const SEGMENT_MAGIC: &[u8; 8] = b"EGWQSEG1";
const META_MAGIC: &[u8; 8] = b"EGWQMET1";
pub(crate) const META_LEN: usize = 8 + 6 * 8 + 4;

pub(crate) fn segments_dir(dir: &Path) -> PathBuf {
    dir.join("segments")
}

pub(crate) fn segment_path(dir: &Path, base: u64) -> PathBuf {
    segments_dir(dir).join(format!("{base:020}.seg"))
}

pub(crate) fn meta_path(dir: &Path, base: u64) -> PathBuf {
    segments_dir(dir).join(format!("{base:020}.meta"))
}

/// Base sequence numbers of the segment files in `dir`, ascending. Files that are not segments are
/// left alone.
pub(crate) fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut bases = Vec::new();
    for entry in fs::read_dir(segments_dir(dir))? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        // Only names this module writes: exactly 20 ASCII digits (a stray "5.seg" would
        // otherwise alias segment 00000000000000000005).
        if let Some(stem) = name.strip_suffix(".seg") {
            if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            if let Ok(base) = stem.parse::<u64>() {
                bases.push(base);
            }
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

pub(crate) fn header_bytes(base: u64) -> [u8; SEGMENT_HEADER] {
    let mut h = [0u8; SEGMENT_HEADER];
    h[..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..].copy_from_slice(&base.to_le_bytes());
    h
}

pub(crate) fn header_ok(buf: &[u8], base: u64) -> bool {
    buf.len() >= SEGMENT_HEADER && buf[..SEGMENT_HEADER] == header_bytes(base)
}

/// What is known about one segment. For the active segment it is kept up to date by the writer;
/// for sealed segments it comes from the `.meta` sidecar or a scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentMeta {
    pub base: u64,
    /// Sequence number of the last record, `base - 1` when empty.
    pub last_seq: u64,
    pub records: u64,
    /// Bytes of the file that hold whole, durable records (header included).
    pub bytes: u64,
    pub first_time_us: u64,
    pub last_time_us: u64,
}

impl SegmentMeta {
    pub fn empty(base: u64) -> Self {
        SegmentMeta {
            base,
            last_seq: base.saturating_sub(1),
            records: 0,
            bytes: SEGMENT_HEADER as u64,
            first_time_us: 0,
            last_time_us: 0,
        }
    }

    pub fn push(&mut self, seq: u64, time_us: u64, len: usize) {
        if self.records == 0 {
            self.first_time_us = time_us;
        }
        self.records += 1;
        self.last_seq = seq;
        self.last_time_us = self.last_time_us.max(time_us);
        self.bytes += len as u64;
    }

    fn encode(&self) -> [u8; META_LEN] {
        let mut b = [0u8; META_LEN];
        b[..8].copy_from_slice(META_MAGIC);
        for (i, v) in [
            self.base,
            self.last_seq,
            self.records,
            self.bytes,
            self.first_time_us,
            self.last_time_us,
        ]
        .iter()
        .enumerate()
        {
            b[8 + i * 8..16 + i * 8].copy_from_slice(&v.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b[..META_LEN - 4]);
        b[META_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != META_LEN || &b[..8] != META_MAGIC {
            return None;
        }
        let crc = u32::from_le_bytes(b[META_LEN - 4..].try_into().ok()?);
        if crc32c::crc32c(&b[..META_LEN - 4]) != crc {
            return None;
        }
        let v = |i: usize| -> Option<u64> {
            Some(u64::from_le_bytes(
                b[8 + i * 8..16 + i * 8].try_into().ok()?,
            ))
        };
        Some(SegmentMeta {
            base: v(0)?,
            last_seq: v(1)?,
            records: v(2)?,
            bytes: v(3)?,
            first_time_us: v(4)?,
            last_time_us: v(5)?,
        })
    }
}

/// Writes the sidecar of a sealed segment (after the segment itself was synced).
pub(crate) fn write_meta(dir: &Path, meta: &SegmentMeta) -> io::Result<()> {
    let mut f = File::create(meta_path(dir, meta.base))?;
    f.write_all(&meta.encode())?;
    f.sync_data()
}

/// Reads a sidecar; `None` when missing, torn, or not matching the segment file's size (the
/// segment was appended to after sealing, which happens only if a roll failed half-way).
pub(crate) fn read_meta(dir: &Path, base: u64, file_len: u64) -> Option<SegmentMeta> {
    let mut buf = Vec::with_capacity(META_LEN);
    File::open(meta_path(dir, base))
        .ok()?
        .take(META_LEN as u64 + 1)
        .read_to_end(&mut buf)
        .ok()?;
    let meta = SegmentMeta::decode(&buf)?;
    (meta.base == base && meta.bytes == file_len).then_some(meta)
}

/// Removes a segment and its sidecar. A missing file is not an error (already gone).
pub(crate) fn remove_segment(dir: &Path, base: u64) -> io::Result<()> {
    for p in [segment_path(dir, base), meta_path(dir, base)] {
        match fs::remove_file(&p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Creates a new, empty segment file (header written and synced, directory synced).
pub(crate) fn create_segment(dir: &Path, base: u64) -> io::Result<File> {
    let path = segment_path(dir, base);
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    f.write_all(&header_bytes(base))?;
    f.sync_data()?;
    sync_dir(&segments_dir(dir))?;
    Ok(f)
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// `Scan::tail_reason` of a tail that is all zeros (a preallocated segment's unused space).
pub(crate) const PREALLOCATED: &str = "preallocated";

/// The spare is written in steps of this many bytes, each synced.
const SPARE_STEP: u64 = 4 << 20;
/// The most zeros per second the spare preparer writes.
const SPARE_BYTES_PER_S: f64 = 32.0 * 1024.0 * 1024.0;

/// Name of the spare, pre-zeroed segment file (not a segment: not 20 digits).
pub(crate) const SPARE: &str = ".spare.seg";

/// Writes a file of `size` zeros at `segments/.spare.seg` (via a temporary name), synced, so that
/// appends into it later change no file size or block allocation: `fdatasync` then flushes data
/// only, which on ext4 avoids a journal commit per batch.
pub(crate) fn prepare_spare(dir: &Path, size: u64) -> io::Result<()> {
    let sdir = segments_dir(dir);
    let tmp = sdir.join(".spare.tmp");
    let result = (|| {
        let mut f = File::create(&tmp)?;
        let zeros = vec![0u8; 1 << 20];
        let mut left = size;
        let mut since_sync = 0u64;
        let mut step = std::time::Instant::now();
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            f.write_all(&zeros[..n])?;
            left -= n as u64;
            since_sync += n as u64;
            // In small synced steps, so the writer's fdatasyncs never queue behind one large
            // flush of zeros, and at most SPARE_BYTES_PER_S: when records arrive faster than
            // that, the spare is not ready in time and the next segment simply grows as it is
            // written (the disk's bandwidth goes to records, not zeros).
            if since_sync >= SPARE_STEP {
                f.sync_data()?;
                since_sync = 0;
                let min = std::time::Duration::from_secs_f64(SPARE_STEP as f64 / SPARE_BYTES_PER_S);
                if let Some(rest) = min.checked_sub(step.elapsed()) {
                    std::thread::sleep(rest);
                }
                step = std::time::Instant::now();
            }
        }
        f.sync_all()?;
        fs::rename(&tmp, sdir.join(SPARE))?;
        sync_dir(&sdir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Turns the spare into segment `base`: rename, header, sync. `Ok(None)` when there is no spare.
pub(crate) fn take_spare(dir: &Path, base: u64) -> io::Result<Option<File>> {
    let sdir = segments_dir(dir);
    let path = segment_path(dir, base);
    match fs::rename(sdir.join(SPARE), &path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    }
    let f = OpenOptions::new().read(true).write(true).open(&path)?;
    use std::os::unix::fs::FileExt;
    f.write_all_at(&header_bytes(base), 0)?;
    f.sync_data()?;
    sync_dir(&sdir)?;
    Ok(Some(f))
}

/// Removes spare files left by an earlier run.
pub(crate) fn remove_spares(dir: &Path) {
    let sdir = segments_dir(dir);
    for name in [SPARE, ".spare.tmp"] {
        let _ = fs::remove_file(sdir.join(name));
    }
}

/// A run of bytes in a segment that is not a valid record, followed by valid records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadRange {
    pub offset: usize,
    pub len: usize,
    pub reason: &'static str,
    /// Sequence numbers missing between the records on either side (an estimate of how many
    /// records the range held; exact while sequence numbers are contiguous).
    pub missing_records: u64,
}

/// The result of walking every frame of one segment's bytes.
#[derive(Debug, Clone)]
pub(crate) struct Scan {
    pub meta: SegmentMeta,
    /// Damaged ranges with valid records after them.
    pub bad: Vec<BadRange>,
    /// Bytes after the last valid record that hold no valid record: a torn tail (or a write in
    /// progress, when another process holds the queue).
    pub tail_bytes: usize,
    /// Why the tail is not a record: "incomplete" or the reason of the first invalid frame.
    pub tail_reason: &'static str,
}

/// Walks the frames of `buf` (a whole segment file, header included) belonging to the segment
/// `base`. Never fails: damage is reported in the result.
pub(crate) fn scan(buf: &[u8], base: u64) -> Scan {
    let mut meta = SegmentMeta::empty(base);
    let mut bad = Vec::new();
    let mut at = SEGMENT_HEADER.min(buf.len());
    let mut prev_seq = base.saturating_sub(1);
    loop {
        let rest = &buf[at..];
        if rest.is_empty() {
            return Scan {
                meta,
                bad,
                tail_bytes: 0,
                tail_reason: "",
            };
        }
        match check_frame(rest) {
            Frame::Valid { len, seq, time_us } if seq > prev_seq => {
                meta.push(seq, time_us, len);
                meta.bytes = (at + len) as u64;
                prev_seq = seq;
                at += len;
            }
            other => {
                let reason = match other {
                    Frame::Incomplete => "incomplete",
                    Frame::Invalid(r) => r,
                    Frame::Valid { .. } => "sequence number not increasing",
                };
                match resync(buf, at + 1, prev_seq) {
                    Some((next, next_seq)) => {
                        bad.push(BadRange {
                            offset: at,
                            len: next - at,
                            reason,
                            missing_records: next_seq - prev_seq - 1,
                        });
                        at = next;
                    }
                    None => {
                        // Zeros to the end are a preallocated segment's unused space, not damage.
                        let reason = if buf[at..].iter().all(|&b| b == 0) {
                            PREALLOCATED
                        } else {
                            reason
                        };
                        return Scan {
                            meta,
                            bad,
                            tail_bytes: buf.len() - at,
                            tail_reason: reason,
                        };
                    }
                }
            }
        }
    }
}

/// Finds the first offset at or after `from` where a valid frame with a sequence number above
/// `prev_seq` starts, with its sequence number. Cheap checks (length fits, seq close above
/// `prev_seq`, flags byte sane) come before the CRC, so a long damaged stretch costs little more
/// than one pass over it.
pub(crate) fn resync(buf: &[u8], from: usize, prev_seq: u64) -> Option<(usize, u64)> {
    let end = buf.len().checked_sub(FRAME_HEADER)?;
    let plausible = |off: usize| -> bool {
        let Some(h) = buf.get(off..off + FRAME_HEADER + 17) else {
            return false;
        };
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&h[8..16]);
        let seq = u64::from_le_bytes(seq);
        len <= buf.len() - off - FRAME_HEADER
            && seq > prev_seq
            && seq - prev_seq < 1 << 32
            && h[FRAME_HEADER + 16] & 0x80 == 0
    };
    (from..=end).find_map(|off| {
        if !plausible(off) {
            return None;
        }
        match check_frame(&buf[off..]) {
            Frame::Valid { seq, .. } if seq > prev_seq => Some((off, seq)),
            _ => None,
        }
    })
}

/// Reads a whole segment file into memory (segments are bounded by `segment_bytes`).
pub(crate) fn read_segment(dir: &Path, base: u64) -> io::Result<Vec<u8>> {
    fs::read(segment_path(dir, base))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::queue::record::{encode_frame, frame_len, NewRecord};

    fn segment_with(n: u64, base: u64) -> (Vec<u8>, Vec<usize>) {
        let mut buf = header_bytes(base).to_vec();
        let mut offsets = Vec::new();
        for i in 0..n {
            offsets.push(buf.len());
            let payload = format!("payload {i}");
            let r = NewRecord::new("dev", "t", payload.as_bytes());
            encode_frame(&mut buf, &r, base + i, frame_len(&r));
        }
        (buf, offsets)
    }

    #[test]
    fn meta_round_trips_and_rejects_damage() {
        let m = SegmentMeta {
            base: 5,
            last_seq: 9,
            records: 5,
            bytes: 1234,
            first_time_us: 1,
            last_time_us: 2,
        };
        let b = m.encode();
        assert_eq!(SegmentMeta::decode(&b), Some(m));
        let mut bad = b;
        bad[20] ^= 1;
        assert_eq!(SegmentMeta::decode(&bad), None);
    }

    #[test]
    fn scan_of_clean_segment_counts_every_record() {
        let (buf, _) = segment_with(10, 100);
        let s = scan(&buf, 100);
        assert_eq!(s.meta.records, 10);
        assert_eq!(s.meta.last_seq, 109);
        assert_eq!(s.meta.bytes, buf.len() as u64);
        assert!(s.bad.is_empty());
        assert_eq!(s.tail_bytes, 0);
    }

    #[test]
    fn scan_skips_a_damaged_record_in_the_middle() {
        let (mut buf, offsets) = segment_with(10, 1);
        buf[offsets[4] + 12] ^= 0xff;
        let s = scan(&buf, 1);
        assert_eq!(s.meta.records, 9);
        assert_eq!(s.bad.len(), 1);
        assert_eq!(s.bad[0].offset, offsets[4]);
        assert_eq!(s.bad[0].len, offsets[5] - offsets[4]);
        assert_eq!(s.bad[0].missing_records, 1);
        assert_eq!(s.tail_bytes, 0);
    }

    #[test]
    fn scan_reports_a_torn_tail() {
        let (buf, offsets) = segment_with(5, 1);
        let cut = offsets[4] + 3;
        let s = scan(&buf[..cut], 1);
        assert_eq!(s.meta.records, 4);
        assert_eq!(s.tail_bytes, 3);
        assert_eq!(s.meta.bytes, offsets[4] as u64);
    }
}
