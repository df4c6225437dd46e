//! Cursor files: one per uplink, `cursors/<name>.cursor`, replaced atomically (write a temporary
//! file, fdatasync it, rename it over the old one, fsync the directory), so a crash leaves either
//! the old or the new position, never a torn one. The content carries a CRC32C as a second guard.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"EGWQCUR1";
const LEN: usize = 8 + 8 + 8 + 4;

/// A cursor's persisted state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct CursorFile {
    /// Every record with a sequence number up to this one was confirmed by the cursor's owner.
    pub acked: u64,
    /// Records this cursor never got because `drop-oldest` or `max_age` deleted them first.
    pub dropped: u64,
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
    fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[..8].copy_from_slice(MAGIC);
        b[8..16].copy_from_slice(&self.acked.to_le_bytes());
        b[16..24].copy_from_slice(&self.dropped.to_le_bytes());
        let crc = crc32c::crc32c(&b[..24]);
        b[24..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != LEN || &b[..8] != MAGIC {
            return None;
        }
        let crc = u32::from_le_bytes(b[24..].try_into().ok()?);
        if crc32c::crc32c(&b[..24]) != crc {
            return None;
        }
        Some(CursorFile {
            acked: u64::from_le_bytes(b[8..16].try_into().ok()?),
            dropped: u64::from_le_bytes(b[16..24].try_into().ok()?),
        })
    }
}

/// Atomically replaces the cursor file.
pub(crate) fn store(dir: &Path, name: &str, c: &CursorFile) -> io::Result<()> {
    let cdir = cursors_dir(dir);
    let tmp = cdir.join(format!(".{name}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(&c.encode())?;
    f.sync_data()?;
    fs::rename(&tmp, path(dir, name))?;
    File::open(&cdir)?.sync_all()
}

pub(crate) fn remove(dir: &Path, name: &str) -> io::Result<()> {
    match fs::remove_file(path(dir, name)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => File::open(cursors_dir(dir))?.sync_all(),
    }
}

/// Every cursor in `dir`. A file that cannot be decoded is reported as `Err` with its name, so
/// that the caller can log it and start that cursor over (re-delivery beats loss).
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
        out.push((name.to_string(), CursorFile::decode(&bytes)));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_damage_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(cursors_dir(dir.path())).unwrap();
        let c = CursorFile {
            acked: 77,
            dropped: 3,
        };
        store(dir.path(), "rabbit", &c).unwrap();
        assert_eq!(
            load_all(dir.path()).unwrap(),
            vec![("rabbit".to_string(), Some(c))]
        );
        let p = path(dir.path(), "rabbit");
        let mut b = fs::read(&p).unwrap();
        b[9] ^= 1;
        fs::write(&p, b).unwrap();
        assert_eq!(
            load_all(dir.path()).unwrap(),
            vec![("rabbit".to_string(), None)]
        );
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
