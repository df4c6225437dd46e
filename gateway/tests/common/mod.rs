//! Helpers shared by the queue's integration tests: options, record payloads that identify
//! themselves, and looking at the files the queue keeps on disk.
#![allow(dead_code, clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};

use gateway::queue::{FsyncPolicy, FullPolicy, NewRecord, Queue, QueueOptions, Reader, Record};

/// Bytes of a segment file's header.
pub const SEGMENT_HEADER: usize = 16;
/// Bytes of a frame's `len | crc` prefix.
pub const FRAME_HEADER: usize = 8;
/// Device id every helper record carries.
pub const DEVICE: &str = "dev";
/// Topic every helper record carries.
pub const TOPIC: &str = "t";
/// Frame bytes of a helper record beyond its payload: 8 (len, crc) + 17 (seq, time, flags)
/// + 1 + 3 (device) + 1 + 1 (topic).
pub const FRAME_OVERHEAD: usize = 8 + 17 + 1 + DEVICE.len() + 1 + TOPIC.len();

/// Options with `fsync = always`, backpressure and the given sizes.
pub fn opts(dir: &Path, segment_bytes: u64, max_bytes: u64) -> QueueOptions {
    let mut o = QueueOptions::new(dir);
    o.segment_bytes = segment_bytes;
    o.max_bytes = max_bytes;
    o.fsync = FsyncPolicy::Always;
    o.full_policy = FullPolicy::Backpressure;
    o
}

/// A payload of `size` bytes (at least 8) that starts with `id` and is filled after it with a
/// pattern derived from `id`, so that a record read back can be matched to the one written.
pub fn payload(id: u64, size: usize) -> Vec<u8> {
    assert!(size >= 8);
    let mut p = id.to_le_bytes().to_vec();
    p.extend((0..size - 8).map(|i| (id as usize).wrapping_mul(31).wrapping_add(i) as u8));
    p
}

/// The id a [`payload`] starts with.
pub fn id_of(r: &Record) -> u64 {
    u64::from_le_bytes(r.payload[..8].try_into().unwrap())
}

/// A record from device [`DEVICE`] on topic [`TOPIC`].
pub fn rec(payload: &[u8]) -> NewRecord<'_> {
    NewRecord::new(DEVICE, TOPIC, payload)
}

/// Appends records with ids `ids` (payloads of `size` bytes); returns their sequence numbers.
pub async fn append_ids(q: &Queue, ids: impl IntoIterator<Item = u64>, size: usize) -> Vec<u64> {
    let mut seqs = Vec::new();
    for id in ids {
        let p = payload(id, size);
        seqs.push(q.append(&rec(&p)).await.unwrap());
    }
    seqs
}

/// Everything the reader can read right now.
pub fn read_all(reader: &mut Reader) -> Vec<Record> {
    let mut out = Vec::new();
    loop {
        let batch = reader.read_now(64, usize::MAX).unwrap();
        if batch.is_empty() {
            return out;
        }
        out.extend(batch);
    }
}

pub fn ids_of(records: &[Record]) -> Vec<u64> {
    records.iter().map(id_of).collect()
}

pub fn seqs_of(records: &[Record]) -> Vec<u64> {
    records.iter().map(|r| r.seq).collect()
}

pub fn assert_strictly_increasing(seqs: &[u64]) {
    for w in seqs.windows(2) {
        assert!(
            w[0] < w[1],
            "sequence numbers not increasing: {} then {}",
            w[0],
            w[1]
        );
    }
}

pub fn segments_dir(dir: &Path) -> PathBuf {
    dir.join("segments")
}

pub fn segment_path(dir: &Path, base: u64) -> PathBuf {
    segments_dir(dir).join(format!("{base:020}.seg"))
}

pub fn meta_path(dir: &Path, base: u64) -> PathBuf {
    segments_dir(dir).join(format!("{base:020}.meta"))
}

pub fn cursor_path(dir: &Path, name: &str) -> PathBuf {
    dir.join("cursors").join(format!("{name}.cursor"))
}

/// Base sequence numbers of the `.seg` files, ascending.
pub fn segment_bases(dir: &Path) -> Vec<u64> {
    let mut bases: Vec<u64> = fs::read_dir(segments_dir(dir))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".seg")?.parse().ok()
        })
        .collect();
    bases.sort_unstable();
    bases
}

/// The last segment file that holds at least one record.
pub fn last_nonempty_segment(dir: &Path) -> u64 {
    *segment_bases(dir)
        .iter()
        .rev()
        .find(|&&b| fs::metadata(segment_path(dir, b)).unwrap().len() > SEGMENT_HEADER as u64)
        .unwrap()
}

/// Sum of the sizes of every file in `segments/` (segments and sidecars).
pub fn disk_usage(dir: &Path) -> u64 {
    fs::read_dir(segments_dir(dir))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

/// Files in `quarantine/`, sorted.
pub fn quarantine_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir.join("quarantine"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// One frame of a segment file as laid out on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameAt {
    pub offset: usize,
    pub len: usize,
    pub seq: u64,
}

impl FrameAt {
    pub fn end(&self) -> usize {
        self.offset + self.len
    }
}

/// Walks the frames of an undamaged segment file (stops at the first incomplete frame).
pub fn frames_of(bytes: &[u8]) -> Vec<FrameAt> {
    let mut out = Vec::new();
    let mut at = SEGMENT_HEADER;
    while at + FRAME_HEADER + 16 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize + FRAME_HEADER;
        if at + len > bytes.len() {
            break;
        }
        let seq = u64::from_le_bytes(bytes[at + 8..at + 16].try_into().unwrap());
        out.push(FrameAt {
            offset: at,
            len,
            seq,
        });
        at += len;
    }
    out
}

pub fn frames_in(path: &Path) -> Vec<FrameAt> {
    frames_of(&fs::read(path).unwrap())
}

/// Copies a directory tree (regular files and directories only).
pub fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            fs::copy(e.path(), target).unwrap();
        }
    }
}

/// Polls `cond` every 20 ms for up to `secs` seconds; whether it became true.
pub async fn eventually(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Closes the queue and gives up this handle. The directory lock is released once every `Queue`
/// handle and every `Reader` of the queue is gone, so callers drop their readers first.
pub fn shut(q: Queue) {
    q.close();
    drop(q);
}
