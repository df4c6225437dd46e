//! A read-only view of a queue directory for the operator tools (`gateway queue stats | inspect |
//! verify`). It never takes the lock, never writes, and tolerates a running gateway appending at
//! the same time: an incomplete frame at the very end of the last segment is a write in progress.

use std::fs;
use std::path::{Path, PathBuf};

use super::cursor::{self, CursorFile};
use super::reader::{Damage, ReadState};
use super::record::Record;
use super::segment::{self, SegmentMeta};
use super::{cursor_stats, CursorStats, QueueError};

/// One segment as the inspector sees it.
#[derive(Debug, Clone)]
pub struct SegmentInfo {
    /// What the segment holds (`bytes`: up to the end of its last whole record).
    pub meta: SegmentMeta,
    /// The file's size (more than `meta.bytes` while a preallocated segment is active).
    pub file_bytes: u64,
    /// Whether the figures come from the sealed segment's sidecar (else from a scan).
    pub from_sidecar: bool,
}

/// A read-only snapshot of a queue directory.
#[derive(Debug)]
pub struct Inspector {
    dir: PathBuf,
    segments: Vec<SegmentInfo>,
    cursors: Vec<(String, Option<(u64, u64)>)>,
    /// The pid in the lock file when a process holds the queue open.
    pub held_by: Option<String>,
}

/// `gateway queue stats` output.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DirStats {
    pub data_dir: PathBuf,
    pub in_use_by_pid: Option<String>,
    pub records: u64,
    pub bytes: u64,
    pub segments: usize,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub oldest_time_us: Option<u64>,
    pub quarantine_files: u64,
    pub quarantine_bytes: u64,
    pub cursors: Vec<CursorStats>,
    /// Cursor files that cannot be read (the queue resets them on open).
    pub damaged_cursors: Vec<String>,
}

/// One problem found by `verify`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Problem {
    pub file: PathBuf,
    pub offset: u64,
    pub bytes: u64,
    pub reason: String,
    /// Already copied to quarantine by the queue (it skips it when reading).
    pub quarantined: bool,
}

/// `gateway queue verify` output.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub segments: usize,
    pub records: u64,
    pub bytes: u64,
    /// Damage not yet handled by the queue: a reason for exit code 1.
    pub problems: Vec<Problem>,
    /// Damage the queue already quarantined, and torn tails it will truncate on open.
    pub notes: Vec<Problem>,
}

impl Inspector {
    pub fn open(dir: &Path) -> Result<Inspector, QueueError> {
        let seg_dir = segment::segments_dir(dir);
        if !seg_dir.is_dir() {
            return Err(QueueError::io(
                "open queue directory (no segments/ inside; is this a data_dir?)",
                dir,
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
        let bases = segment::list_segments(dir).map_err(|e| QueueError::io("list", &seg_dir, e))?;
        let mut segments = Vec::new();
        for (i, &base) in bases.iter().enumerate() {
            let path = segment::segment_path(dir, base);
            let file_bytes = match fs::metadata(&path) {
                Ok(m) => m.len(),
                // Deleted by the running gateway while we looked.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(QueueError::io("stat", &path, e)),
            };
            let sidecar = if i + 1 < bases.len() {
                segment::read_meta(dir, base, file_bytes)
            } else {
                None
            };
            let (meta, from_sidecar) = match sidecar {
                Some(m) => (m, true),
                None => match segment::read_segment(dir, base) {
                    Ok(buf) if segment::header_ok(&buf, base) => {
                        (segment::scan(&buf, base).meta, false)
                    }
                    Ok(_) => (SegmentMeta::empty(base), false),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(QueueError::io("read segment", &path, e)),
                },
            };
            segments.push(SegmentInfo {
                meta,
                file_bytes,
                from_sidecar,
            });
        }
        let cdir = cursor::cursors_dir(dir);
        let cursors = match cursor::load_all(dir) {
            Ok(v) => v
                .into_iter()
                .map(|(n, c)| (n, c.map(|c: CursorFile| (c.acked, c.dropped))))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(QueueError::io("read cursors in", &cdir, e)),
        };
        Ok(Inspector {
            dir: dir.to_path_buf(),
            segments,
            cursors,
            held_by: super::lock::is_held(dir),
        })
    }

    pub fn segments(&self) -> &[SegmentInfo] {
        &self.segments
    }

    fn metas(&self) -> Vec<SegmentMeta> {
        self.segments.iter().map(|s| s.meta.clone()).collect()
    }

    pub fn stats(&self) -> DirStats {
        let metas = self.metas();
        let live: Vec<&SegmentInfo> = self
            .segments
            .iter()
            .filter(|s| s.meta.records > 0)
            .collect();
        let (mut qfiles, mut qbytes) = (0, 0);
        if let Ok(rd) = fs::read_dir(self.dir.join("quarantine")) {
            for e in rd.flatten() {
                qfiles += 1;
                qbytes += e.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
        DirStats {
            data_dir: self.dir.clone(),
            in_use_by_pid: self.held_by.clone(),
            records: live.iter().map(|s| s.meta.records).sum(),
            bytes: self.segments.iter().map(|s| s.file_bytes).sum(),
            segments: self.segments.len(),
            first_seq: live.first().map(|s| s.meta.base),
            last_seq: live.last().map(|s| s.meta.last_seq),
            oldest_time_us: live.first().map(|s| s.meta.first_time_us),
            quarantine_files: qfiles,
            quarantine_bytes: qbytes,
            cursors: self
                .cursors
                .iter()
                .filter_map(|(n, c)| {
                    c.map(|(acked, dropped)| cursor_stats(n, acked, dropped, metas.iter()))
                })
                .collect(),
            damaged_cursors: self
                .cursors
                .iter()
                .filter(|(_, c)| c.is_none())
                .map(|(n, _)| n.clone())
                .collect(),
        }
    }

    /// Up to `limit` records from seq `from` on (damaged ranges are skipped, not quarantined).
    pub fn records(&self, from: u64, limit: usize) -> Result<Vec<Record>, QueueError> {
        let metas = self.metas();
        let locate = |seq: u64| -> Option<SegmentMeta> {
            metas
                .iter()
                .find(|s| s.records > 0 && s.last_seq >= seq)
                .cloned()
        };
        let mut state = ReadState::new(from.max(1));
        let mut out = Vec::new();
        let mut ignore = |_: Damage<'_>| {};
        while out.len() < limit {
            let batch = state.read(
                &self.dir,
                limit - out.len(),
                usize::MAX,
                &locate,
                &mut ignore,
            )?;
            if batch.is_empty() {
                break;
            }
            out.extend(batch);
        }
        Ok(out)
    }

    /// Checks every frame's CRC in every segment, and each sidecar against its segment.
    pub fn verify(&self) -> Result<VerifyReport, QueueError> {
        let mut report = VerifyReport {
            segments: self.segments.len(),
            records: 0,
            bytes: 0,
            problems: Vec::new(),
            notes: Vec::new(),
        };
        let last = self.segments.last().map(|s| s.meta.base);
        for s in &self.segments {
            let path = segment::segment_path(&self.dir, s.meta.base);
            let buf = match segment::read_segment(&self.dir, s.meta.base) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(QueueError::io("read segment", &path, e)),
            };
            report.bytes += buf.len() as u64;
            if !segment::header_ok(&buf, s.meta.base) {
                if !(Some(s.meta.base) == last && buf.len() < segment::SEGMENT_HEADER) {
                    report.problems.push(Problem {
                        file: path.clone(),
                        offset: 0,
                        bytes: buf.len() as u64,
                        reason: "segment header damaged".into(),
                        quarantined: false,
                    });
                }
                continue;
            }
            let scan = segment::scan(&buf, s.meta.base);
            report.records += scan.meta.records;
            for bad in &scan.bad {
                let quarantined =
                    super::quarantine_path(&self.dir, s.meta.base, bad.offset).exists();
                let p = Problem {
                    file: path.clone(),
                    offset: bad.offset as u64,
                    bytes: bad.len as u64,
                    reason: format!("{} (about {} records)", bad.reason, bad.missing_records),
                    quarantined,
                };
                if quarantined {
                    report.notes.push(p);
                } else {
                    report.problems.push(p);
                }
            }
            if scan.tail_bytes > 0 {
                let is_last = Some(s.meta.base) == last;
                let p = Problem {
                    file: path.clone(),
                    offset: scan.meta.bytes,
                    bytes: scan.tail_bytes as u64,
                    reason: if is_last && self.held_by.is_some() {
                        "write in progress at the end of the active segment".into()
                    } else {
                        format!(
                            "torn tail ({}); the queue truncates it on open",
                            scan.tail_reason
                        )
                    },
                    quarantined: false,
                };
                // A torn tail of the last segment is what a crash leaves; recovery handles it.
                // Anywhere else, or a complete frame with a bad CRC, is damage.
                if scan.tail_reason == segment::PREALLOCATED {
                    // Unused space of a preallocated segment: neither damage nor worth a note.
                } else if is_last && scan.tail_reason == "incomplete" {
                    report.notes.push(p);
                } else {
                    report.problems.push(p);
                }
            }
            if s.from_sidecar
                && (s.meta.records != scan.meta.records || s.meta.last_seq != scan.meta.last_seq)
                && scan.bad.is_empty()
            {
                report.problems.push(Problem {
                    file: segment::meta_path(&self.dir, s.meta.base),
                    offset: 0,
                    bytes: 0,
                    reason: format!(
                        "sidecar says {} records up to seq {}, the segment holds {} up to {}",
                        s.meta.records, s.meta.last_seq, scan.meta.records, scan.meta.last_seq
                    ),
                    quarantined: false,
                });
            }
        }
        Ok(report)
    }
}
