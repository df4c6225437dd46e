//! Cursor files: one per uplink, `cursors/<name>.cursor`, holding two checksummed slots that are
//! written in turn, in place (`pwrite` + `fdatasync`). A crash in the middle of a write tears at
//! most the slot being written; the other slot still holds the previous position. Writing in place
//! needs no new disk blocks, so cursors keep moving (and the queue keeps freeing space) on a full
//! disk, and needs no rename or directory sync.
//!
//! ```text
//! file := slot slot                       (2 x 40 bytes)
//! slot := "EGWQCUR2" gen:u64le acked:u64le dropped:u64le crc:u32le pad:u32  crc = CRC32C(first 32 bytes)
//! ```
//! The valid slot with the higher `gen` wins. Slot `gen % 2` is written next.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"EGWQCUR2";
const SLOT: usize = 40;

/// A cursor's persisted state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct CursorFile {
    /// Every record with a sequence number up to this one was confirmed by the cursor's owner.
    pub acked: u64,
    /// Records this cursor never got because `drop-oldest` or `max_age` deleted them first.
    pub dropped: u64,
    /// Write generation: picks the newer slot.
    pub gen: u64,
}

pub(crate) fn cursors_dir(dir: &Path) -> PathBuf {
    dir.join("cursors")
}

fn path(dir: &Path, name: &str) -> PathBuf {
    cursors_dir(dir).join(format!("{name}.cursor"))
}

/// Cursor names become file names: keep them to a safe, bounded alphabet.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl CursorFile {
    fn encode(&self) -> [u8; SLOT] {
        let mut b = [0u8; SLOT];
        b[..8].copy_from_slice(MAGIC);
        b[8..16].copy_from_slice(&self.gen.to_le_bytes());
        b[16..24].copy_from_slice(&self.acked.to_le_bytes());
        b[24..32].copy_from_slice(&self.dropped.to_le_bytes());
        let crc = crc32c::crc32c(&b[..32]);
        b[32..36].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != SLOT || &b[..8] != MAGIC {
            return None;
        }
        let crc = u32::from_le_bytes(b[32..36].try_into().ok()?);
        if crc32c::crc32c(&b[..32]) != crc {
            return None;
        }
        Some(CursorFile {
            gen: u64::from_le_bytes(b[8..16].try_into().ok()?),
            acked: u64::from_le_bytes(b[16..24].try_into().ok()?),
            dropped: u64::from_le_bytes(b[24..32].try_into().ok()?),
        })
    }

    fn newest(b: &[u8]) -> Option<Self> {
        let a = b.get(..SLOT).and_then(CursorFile::decode);
        let z = b.get(SLOT..2 * SLOT).and_then(CursorFile::decode);
        match (a, z) {
            (Some(a), Some(z)) => Some(if z.gen > a.gen { z } else { a }),
            (a, z) => a.or(z),
        }
    }
}

/// Writes a whole cursor file (both slots), creating it if needed: for a new cursor, or to reset
/// a damaged one. Syncs the file and, when it was created, the directory.
pub(crate) fn create(dir: &Path, name: &str, c: &CursorFile) -> io::Result<()> {
    let p = path(dir, name);
    let existed = p.exists();
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)?;
    let mut b = [0u8; 2 * SLOT];
    let older = CursorFile {
        gen: c.gen.saturating_sub(1),
        ..*c
    };
    let (first, second) = if c.gen.is_multiple_of(2) {
        (c, &older)
    } else {
        (&older, c)
    };
    b[..SLOT].copy_from_slice(&first.encode());
    b[SLOT..].copy_from_slice(&second.encode());
    f.write_all_at(&b, 0)?;
    f.sync_data()?;
    if !existed {
        File::open(cursors_dir(dir))?.sync_all()?;
    }
    Ok(())
}

/// Writes `c` into slot `c.gen % 2` of an existing cursor file, in place.
pub(crate) fn store(dir: &Path, name: &str, c: &CursorFile) -> io::Result<()> {
    let f = OpenOptions::new().write(true).open(path(dir, name))?;
    f.write_all_at(&c.encode(), (c.gen % 2) * SLOT as u64)?;
    f.sync_data()
}

pub(crate) fn remove(dir: &Path, name: &str) -> io::Result<()> {
    match fs::remove_file(path(dir, name)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => File::open(cursors_dir(dir))?.sync_all(),
    }
}

/// Every cursor in `dir`. `None` for a file with no valid slot, so that the caller can log it and
/// start that cursor over (re-delivery beats loss).
pub(crate) fn load_all(dir: &Path) -> io::Result<Vec<(String, Option<CursorFile>)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(cursors_dir(dir))? {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(".cursor")) else {
            continue;
        };
        if !valid_name(name) {
            continue;
        }
        let bytes = fs::read(entry.path())?;
        out.push((name.to_string(), CursorFile::newest(&bytes)));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn setup() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(cursors_dir(dir.path())).unwrap();
        dir
    }

    #[test]
    fn the_newest_slot_wins_and_a_torn_slot_falls_back_to_the_other() {
        let dir = setup();
        let d = dir.path();
        create(
            d,
            "rabbit",
            &CursorFile {
                acked: 5,
                dropped: 0,
                gen: 1,
            },
        )
        .unwrap();
        let mut c = CursorFile {
            acked: 5,
            dropped: 0,
            gen: 1,
        };
        for acked in 6..10 {
            c.gen += 1;
            c.acked = acked;
            store(d, "rabbit", &c).unwrap();
            assert_eq!(load_all(d).unwrap(), vec![("rabbit".to_string(), Some(c))]);
        }
        // Tear the slot written last (gen 5 -> slot 1): the previous position (8) is found.
        let p = path(d, "rabbit");
        let mut b = fs::read(&p).unwrap();
        b[SLOT + 20] ^= 0xff;
        fs::write(&p, &b).unwrap();
        let got = load_all(d).unwrap()[0].1.unwrap();
        assert_eq!((got.acked, got.gen), (8, 4));
        // Both slots damaged: reported as unreadable.
        b[20] ^= 0xff;
        fs::write(&p, &b).unwrap();
        assert_eq!(load_all(d).unwrap(), vec![("rabbit".to_string(), None)]);
    }

    #[test]
    fn create_overwrites_a_damaged_file_in_place() {
        let dir = setup();
        let d = dir.path();
        fs::write(path(d, "k"), b"garbage").unwrap();
        let c = CursorFile {
            acked: 0,
            dropped: 0,
            gen: 1,
        };
        create(d, "k", &c).unwrap();
        assert_eq!(load_all(d).unwrap(), vec![("k".to_string(), Some(c))]);
    }

    #[test]
    fn names_are_restricted_to_file_safe_characters() {
        assert!(valid_name("amqp-main_1.eu"));
        assert!(!valid_name(""));
        assert!(!valid_name("../x"));
        assert!(!valid_name(".hidden"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(&"x".repeat(65)));
    }
}
