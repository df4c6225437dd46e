//! The file system's state with no FUSE in it: every inode twice, as the running processes see it
//! (`live`) and as a power cut would leave it (`durable`), and the backing directory kept equal to
//! the durable tree. The FUSE layer (`fuse.rs`) translates kernel requests into calls here; the
//! unit tests at the bottom drive it directly.
//!
//! Invariants:
//! - For a file, applying `pending` in order to `durable` gives `live`.
//! - The backing directory holds exactly the durable tree: the durable entries reachable from the
//!   root, each file with its durable bytes (checked by [`Model::check_backing`]).
//! - Inode numbers are never reused, so a kernel that still remembers a number of a file that a
//!   cut (or an unlink) took away is answered `ENOENT`, never with another file.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use fuser::Errno;

/// The root directory's inode number (FUSE's).
pub(crate) const ROOT: u64 = 1;

/// `fallocate` modes (linux/falloc.h) the model understands.
pub(crate) const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
pub(crate) const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
pub(crate) const FALLOC_FL_ZERO_RANGE: i32 = 0x10;

/// One change to a file's bytes that is not durable yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    /// `pwrite`: bytes at an offset (the file grows with zeros when the offset is past its end).
    Write { at: u64, data: Vec<u8> },
    /// `ftruncate` / `set_len`.
    SetLen(u64),
    /// `fallocate` mode 0: the file grows to at least this length (zeros); nothing is overwritten.
    Extend(u64),
    /// `fallocate` with `ZERO_RANGE` or `PUNCH_HOLE`: zeros over a range; `keep_size` keeps the
    /// length (the range is clipped to it), otherwise the file grows to the range's end.
    Zero { at: u64, len: u64, keep_size: bool },
}

impl Op {
    fn apply(&self, buf: &mut Vec<u8>) {
        match self {
            Op::Write { at, data } => {
                let at = *at as usize;
                let end = at + data.len();
                if buf.len() < end {
                    buf.resize(end, 0);
                }
                buf[at..end].copy_from_slice(data);
            }
            Op::SetLen(len) => buf.resize(*len as usize, 0),
            Op::Extend(len) => {
                if buf.len() < *len as usize {
                    buf.resize(*len as usize, 0);
                }
            }
            Op::Zero { at, len, keep_size } => {
                let end = (at + len) as usize;
                if !keep_size && buf.len() < end {
                    buf.resize(end, 0);
                }
                let end = end.min(buf.len());
                let at = (*at as usize).min(end);
                buf[at..end].fill(0);
            }
        }
    }

    /// The same change, made to a backing file.
    fn apply_to(&self, f: &File) -> io::Result<()> {
        match self {
            Op::Write { at, data } => f.write_all_at(data, *at),
            Op::SetLen(len) => f.set_len(*len),
            Op::Extend(len) => {
                if f.metadata()?.len() < *len {
                    f.set_len(*len)?;
                }
                Ok(())
            }
            Op::Zero { at, len, keep_size } => {
                let size = f.metadata()?.len();
                let end = at + len;
                if !keep_size && size < end {
                    f.set_len(end)?;
                }
                let end = if *keep_size { end.min(size) } else { end };
                let at = (*at).min(end);
                f.write_all_at(&vec![0u8; (end - at) as usize], at)
            }
        }
    }

    fn bytes(&self) -> u64 {
        match self {
            Op::Write { data, .. } => data.len() as u64,
            Op::Zero { len, .. } => *len,
            Op::SetLen(_) | Op::Extend(_) => 0,
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct FileBody {
    pub(crate) live: Vec<u8>,
    pub(crate) durable: Vec<u8>,
    /// What turns `durable` into `live`, oldest first; emptied by fsync/fdatasync of the file.
    pub(crate) pending: Vec<Op>,
    /// When it was last changed (the model's change counter): a torn cut tears the file
    /// written last.
    pub(crate) changed: u64,
}

#[derive(Debug, Default)]
pub(crate) struct DirBody {
    pub(crate) live: BTreeMap<OsString, u64>,
    /// The entries as of the last fsync of this directory (a new directory starts empty).
    pub(crate) durable: BTreeMap<OsString, u64>,
    /// The live parent, for `..`.
    pub(crate) parent: u64,
}

#[derive(Debug)]
pub(crate) enum Body {
    File(FileBody),
    Dir(DirBody),
}

/// One inode. Ownership, mode and times are not modelled across a cut: they are what they are.
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) body: Body,
    pub(crate) perm: u16,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) atime: SystemTime,
    pub(crate) mtime: SystemTime,
    pub(crate) ctime: SystemTime,
    /// Open file handles (a file unlinked while open stays readable until the last close).
    pub(crate) open: u32,
}

impl Node {
    fn new(body: Body, perm: u16, uid: u32, gid: u32) -> Node {
        let now = SystemTime::now();
        Node {
            body,
            perm,
            uid,
            gid,
            atime: now,
            mtime: now,
            ctime: now,
            open: 0,
        }
    }

    fn dir(parent: u64, perm: u16, uid: u32, gid: u32) -> Node {
        let body = Body::Dir(DirBody {
            parent,
            ..DirBody::default()
        });
        Node::new(body, perm, uid, gid)
    }

    pub(crate) fn is_dir(&self) -> bool {
        matches!(self.body, Body::Dir(_))
    }

    pub(crate) fn size(&self) -> u64 {
        match &self.body {
            Body::File(f) => f.live.len() as u64,
            Body::Dir(d) => d.live.len() as u64,
        }
    }

    fn touch(&mut self) {
        let now = SystemTime::now();
        self.mtime = now;
        self.ctime = now;
    }
}

/// How a cut treats the pending layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Everything pending is lost: the state is exactly the durable one.
    Drop,
    /// As `Drop`, except that the file written last (the write in flight when the power went)
    /// keeps a random prefix of its pending changes, the last kept write itself cut at a random
    /// byte: writes that reached the disk in part.
    Torn { seed: u64 },
}

/// What a cut threw away.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Files that had pending changes to their bytes.
    pub files: usize,
    /// Pending changes to file bytes (writes, truncates, fallocates) lost.
    pub ops: usize,
    /// Bytes those writes carried.
    pub bytes: u64,
    /// Directories whose entries differed from their durable ones.
    pub dirs: usize,
    /// In `Torn` mode: the file that kept part of its pending writes.
    pub torn: Option<TornWrite>,
}

/// The file a `Torn` cut tore, and how much of its pending writes it kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornWrite {
    /// Its path (relative to the mount) before the cut.
    pub path: PathBuf,
    /// Pending operations it had, and how many were kept whole.
    pub ops: usize,
    pub kept_ops: usize,
    /// Bytes of the next write that were kept (the torn one); 0 when none.
    pub kept_bytes_of_next: usize,
}

/// A summary of what is pending now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pending {
    pub files: usize,
    pub ops: usize,
    pub bytes: u64,
    pub dirs: usize,
}

/// SplitMix64: reproducible choices from a seed, without a dependency.
pub(crate) struct SplitMix(u64);

impl SplitMix {
    pub(crate) fn new(seed: u64) -> SplitMix {
        SplitMix(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..=n`.
    pub(crate) fn up_to(&mut self, n: usize) -> usize {
        (self.next_u64() % (n as u64 + 1)) as usize
    }
}

pub(crate) type Result<T> = std::result::Result<T, Errno>;

pub(crate) struct Model {
    pub(crate) nodes: HashMap<u64, Node>,
    next_ino: u64,
    /// Counts changes to file bytes, to know which file was written last.
    changes: u64,
    /// `Some(n)`: the power fails after `n` more changes (see [`Model::fail_after`]).
    armed: Option<u64>,
    /// The power has failed: every change and sync fails with EIO until the cut.
    pub(crate) failed: bool,
    backing: PathBuf,
    /// The first failure to update the backing directory: the test's premise is broken, so
    /// every sync fails from then on and the owner can say why.
    pub(crate) backing_error: Option<String>,
}

impl Model {
    /// A model of what `backing` holds now (all of it durable).
    pub(crate) fn load(backing: &Path, uid: u32, gid: u32) -> io::Result<Model> {
        let mut m = Model {
            nodes: HashMap::new(),
            next_ino: ROOT + 1,
            changes: 0,
            armed: None,
            failed: false,
            backing: backing.to_path_buf(),
            backing_error: None,
        };
        m.nodes.insert(ROOT, Node::dir(ROOT, 0o755, uid, gid));
        m.load_dir(ROOT, backing, uid, gid)?;
        Ok(m)
    }

    fn load_dir(&mut self, ino: u64, dir: &Path, uid: u32, gid: u32) -> io::Result<()> {
        let mut entries = BTreeMap::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let ty = entry.file_type()?;
            let child = self.alloc_ino();
            if ty.is_dir() {
                self.nodes.insert(child, Node::dir(ino, 0o755, uid, gid));
                self.load_dir(child, &entry.path(), uid, gid)?;
            } else if ty.is_file() {
                let bytes = fs::read(entry.path())?;
                let body = FileBody {
                    live: bytes.clone(),
                    durable: bytes,
                    pending: Vec::new(),
                    changed: 0,
                };
                self.nodes
                    .insert(child, Node::new(Body::File(body), 0o644, uid, gid));
            } else {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!(
                        "{}: only files and directories can be in the backing directory",
                        entry.path().display()
                    ),
                ));
            }
            entries.insert(entry.file_name(), child);
        }
        if let Some(Body::Dir(d)) = self.nodes.get_mut(&ino).map(|n| &mut n.body) {
            d.durable = entries.clone();
            d.live = entries;
        }
        Ok(())
    }

    fn alloc_ino(&mut self) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        ino
    }

    /// Arms the power failure: it happens right after `changes` more changes (writes,
    /// truncates, fallocates, creates, mkdirs, links, unlinks, rmdirs, renames, syncs) have
    /// succeeded. From then on the disk is dead: every change and sync fails with EIO, so the
    /// process cannot be told that anything after that moment is durable; reads still work.
    /// The cut ([`Model::cut`]) restores the power.
    pub(crate) fn fail_after(&mut self, changes: u64) {
        if changes == 0 {
            self.failed = true;
        } else {
            self.armed = Some(changes);
        }
    }

    /// Refuses every change once the power has failed.
    fn gate(&self) -> Result<()> {
        if self.failed {
            Err(Errno::EIO)
        } else {
            Ok(())
        }
    }

    /// Counts one change that succeeded towards an armed power failure.
    fn tick(&mut self) {
        if let Some(n) = self.armed.as_mut() {
            *n -= 1;
            if *n == 0 {
                self.armed = None;
                self.failed = true;
            }
        }
    }

    pub(crate) fn node(&self, ino: u64) -> Result<&Node> {
        self.nodes.get(&ino).ok_or(Errno::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> Result<&mut Node> {
        self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    fn dir(&self, ino: u64) -> Result<&DirBody> {
        match &self.node(ino)?.body {
            Body::Dir(d) => Ok(d),
            Body::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> Result<&mut DirBody> {
        match &mut self.node_mut(ino)?.body {
            Body::Dir(d) => Ok(d),
            Body::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Result<&mut FileBody> {
        match &mut self.node_mut(ino)?.body {
            Body::File(f) => Ok(f),
            Body::Dir(_) => Err(Errno::EISDIR),
        }
    }

    /// Live hard links to `ino` (for `nlink`): entries naming it, plus `.` and `..` for a
    /// directory.
    pub(crate) fn nlink(&self, ino: u64) -> u32 {
        let Ok(node) = self.node(ino) else { return 0 };
        match &node.body {
            Body::Dir(d) => {
                let subdirs = d
                    .live
                    .values()
                    .filter(|c| self.nodes.get(c).is_some_and(Node::is_dir))
                    .count();
                2 + subdirs as u32
            }
            Body::File(_) => self
                .nodes
                .values()
                .filter_map(|n| match &n.body {
                    Body::Dir(d) => Some(d.live.values().filter(|&&c| c == ino).count()),
                    Body::File(_) => None,
                })
                .sum::<usize>() as u32,
        }
    }

    pub(crate) fn lookup(&self, parent: u64, name: &OsStr) -> Result<u64> {
        self.dir(parent)?
            .live
            .get(name)
            .copied()
            .ok_or(Errno::ENOENT)
    }

    /// `.`, `..` and the live entries, in a stable order.
    pub(crate) fn entries(&self, ino: u64) -> Result<Vec<(u64, bool, OsString)>> {
        let d = self.dir(ino)?;
        let mut out = vec![(ino, true, ".".into()), (d.parent, true, "..".into())];
        for (name, &child) in &d.live {
            let is_dir = self.nodes.get(&child).is_some_and(Node::is_dir);
            out.push((child, is_dir, name.clone()));
        }
        Ok(out)
    }

    fn insert_entry(&mut self, parent: u64, name: &OsStr, node: Node) -> Result<u64> {
        self.gate()?;
        if self.dir(parent)?.live.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.alloc_ino();
        self.nodes.insert(ino, node);
        let p = self.node_mut(parent)?;
        p.touch();
        if let Body::Dir(d) = &mut p.body {
            d.live.insert(name.to_os_string(), ino);
        }
        self.tick();
        Ok(ino)
    }

    pub(crate) fn create(
        &mut self,
        parent: u64,
        name: &OsStr,
        perm: u16,
        uid: u32,
        gid: u32,
    ) -> Result<u64> {
        let node = Node::new(Body::File(FileBody::default()), perm, uid, gid);
        self.insert_entry(parent, name, node)
    }

    pub(crate) fn mkdir(
        &mut self,
        parent: u64,
        name: &OsStr,
        perm: u16,
        uid: u32,
        gid: u32,
    ) -> Result<u64> {
        self.insert_entry(parent, name, Node::dir(parent, perm, uid, gid))
    }

    pub(crate) fn link(&mut self, ino: u64, parent: u64, name: &OsStr) -> Result<()> {
        self.gate()?;
        if self.node(ino)?.is_dir() {
            return Err(Errno::EPERM);
        }
        if self.dir(parent)?.live.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        self.dir_mut(parent)?.live.insert(name.to_os_string(), ino);
        self.node_mut(parent)?.touch();
        self.node_mut(ino)?.ctime = SystemTime::now();
        self.tick();
        Ok(())
    }

    pub(crate) fn unlink(&mut self, parent: u64, name: &OsStr) -> Result<()> {
        self.gate()?;
        let ino = self.lookup(parent, name)?;
        if self.node(ino)?.is_dir() {
            return Err(Errno::EISDIR);
        }
        self.dir_mut(parent)?.live.remove(name);
        self.node_mut(parent)?.touch();
        self.reclaim();
        self.tick();
        Ok(())
    }

    pub(crate) fn rmdir(&mut self, parent: u64, name: &OsStr) -> Result<()> {
        self.gate()?;
        let ino = self.lookup(parent, name)?;
        if !self.dir(ino)?.live.is_empty() {
            return Err(Errno::ENOTEMPTY);
        }
        self.dir_mut(parent)?.live.remove(name);
        self.node_mut(parent)?.touch();
        self.reclaim();
        self.tick();
        Ok(())
    }

    /// `rename`/`renameat2` with flags 0 or `RENAME_NOREPLACE` (`noreplace`).
    pub(crate) fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        noreplace: bool,
    ) -> Result<()> {
        self.gate()?;
        let ino = self.lookup(parent, name)?;
        self.dir(newparent)?;
        let moving_dir = self.node(ino)?.is_dir();
        if let Some(&target) = self.dir(newparent)?.live.get(newname) {
            if noreplace {
                return Err(Errno::EEXIST);
            }
            if target == ino {
                return Ok(());
            }
            match (moving_dir, self.node(target)?.is_dir()) {
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                (true, true) if !self.dir(target)?.live.is_empty() => return Err(Errno::ENOTEMPTY),
                _ => {}
            }
        }
        if moving_dir {
            // Not into itself or below itself.
            let mut at = newparent;
            loop {
                if at == ino {
                    return Err(Errno::EINVAL);
                }
                if at == ROOT {
                    break;
                }
                at = self.dir(at)?.parent;
            }
        }
        self.dir_mut(parent)?.live.remove(name);
        self.dir_mut(newparent)?
            .live
            .insert(newname.to_os_string(), ino);
        if moving_dir {
            self.dir_mut(ino)?.parent = newparent;
        }
        self.node_mut(parent)?.touch();
        self.node_mut(newparent)?.touch();
        self.node_mut(ino)?.ctime = SystemTime::now();
        self.reclaim();
        self.tick();
        Ok(())
    }

    pub(crate) fn open(&mut self, ino: u64) -> Result<()> {
        self.node_mut(ino)?.open += 1;
        Ok(())
    }

    pub(crate) fn release(&mut self, ino: u64) {
        if let Ok(n) = self.node_mut(ino) {
            n.open = n.open.saturating_sub(1);
            if n.open == 0 {
                self.reclaim();
            }
        }
    }

    pub(crate) fn read(&mut self, ino: u64, offset: u64, size: usize) -> Result<Vec<u8>> {
        let f = self.file_mut(ino)?;
        let start = (offset as usize).min(f.live.len());
        let end = start.saturating_add(size).min(f.live.len());
        Ok(f.live[start..end].to_vec())
    }

    /// Applies `op` to the live bytes and keeps it pending.
    fn change(&mut self, ino: u64, op: Op) -> Result<()> {
        self.gate()?;
        self.changes += 1;
        let changed = self.changes;
        let f = self.file_mut(ino)?;
        op.apply(&mut f.live);
        f.pending.push(op);
        f.changed = changed;
        self.node_mut(ino)?.touch();
        self.tick();
        Ok(())
    }

    pub(crate) fn write(&mut self, ino: u64, at: u64, data: &[u8]) -> Result<()> {
        self.change(
            ino,
            Op::Write {
                at,
                data: data.to_vec(),
            },
        )
    }

    pub(crate) fn set_len(&mut self, ino: u64, len: u64) -> Result<()> {
        self.change(ino, Op::SetLen(len))
    }

    pub(crate) fn fallocate(&mut self, ino: u64, at: u64, len: u64, mode: i32) -> Result<()> {
        let keep_size = mode & FALLOC_FL_KEEP_SIZE != 0;
        let op = match mode & !FALLOC_FL_KEEP_SIZE {
            // Reserves blocks; with KEEP_SIZE nothing a reader can see changes.
            0 if keep_size => return self.file_mut(ino).map(|_| ()),
            0 => Op::Extend(at + len),
            FALLOC_FL_PUNCH_HOLE if keep_size => Op::Zero { at, len, keep_size },
            FALLOC_FL_ZERO_RANGE => Op::Zero { at, len, keep_size },
            _ => return Err(Errno::EOPNOTSUPP),
        };
        self.change(ino, op)
    }

    pub(crate) fn set_attrs(
        &mut self,
        ino: u64,
        perm: Option<u16>,
        uid: Option<u32>,
        gid: Option<u32>,
        atime: Option<SystemTime>,
        mtime: Option<SystemTime>,
    ) -> Result<()> {
        let n = self.node_mut(ino)?;
        if let Some(p) = perm {
            n.perm = p;
        }
        if let Some(u) = uid {
            n.uid = u;
        }
        if let Some(g) = gid {
            n.gid = g;
        }
        if let Some(t) = atime {
            n.atime = t;
        }
        if let Some(t) = mtime {
            n.mtime = t;
        }
        n.ctime = SystemTime::now();
        Ok(())
    }

    /// fsync / fdatasync of a file: its pending changes become durable (and reach the backing
    /// file wherever the file has a durable name). Its name does not: that takes an fsync of
    /// the directory.
    pub(crate) fn fsync(&mut self, ino: u64) -> Result<()> {
        if self.node(ino)?.is_dir() {
            return self.fsyncdir(ino);
        }
        self.gate()?;
        self.backing_ok()?;
        let paths = self.durable_paths(ino);
        let f = self.file_mut(ino)?;
        let ops = std::mem::take(&mut f.pending);
        for op in &ops {
            op.apply(&mut f.durable);
        }
        debug_assert_eq!(f.durable, f.live);
        let mirrored = paths.iter().try_for_each(|p| {
            let file = OpenOptions::new().write(true).open(p)?;
            ops.iter().try_for_each(|op| op.apply_to(&file))
        });
        self.note_backing(mirrored)?;
        self.tick();
        Ok(())
    }

    /// fsync of a directory: its live entries become its durable ones (creates, unlinks and
    /// renames in it survive a cut from now on).
    pub(crate) fn fsyncdir(&mut self, ino: u64) -> Result<()> {
        self.gate()?;
        self.backing_ok()?;
        let paths = self.durable_paths(ino);
        let d = self.dir_mut(ino)?;
        let old = std::mem::replace(&mut d.durable, d.live.clone());
        let new = d.durable.clone();
        let mirrored = paths.iter().try_for_each(|p| {
            for (name, child) in &old {
                if new.get(name) != Some(child) {
                    remove_path(&p.join(name))?;
                }
            }
            for (name, &child) in &new {
                if old.get(name) != Some(&child) {
                    self.materialize(child, &p.join(name), &mut HashSet::new())?;
                }
            }
            Ok(())
        });
        let r = self.note_backing(mirrored);
        self.reclaim();
        if r.is_ok() {
            self.tick();
        }
        r
    }

    fn backing_ok(&self) -> Result<()> {
        match self.backing_error {
            Some(_) => Err(Errno::EIO),
            None => Ok(()),
        }
    }

    fn note_backing(&mut self, r: io::Result<()>) -> Result<()> {
        r.map_err(|e| {
            if self.backing_error.is_none() {
                self.backing_error = Some(format!(
                    "could not update the backing directory {}: {e}",
                    self.backing.display()
                ));
            }
            Errno::EIO
        })
    }

    /// Writes the durable state of `ino` (a file's bytes, or a directory's durable tree) at
    /// `path` in the backing directory.
    fn materialize(&self, ino: u64, path: &Path, seen: &mut HashSet<u64>) -> io::Result<()> {
        let Some(node) = self.nodes.get(&ino) else {
            return Ok(());
        };
        match &node.body {
            Body::File(f) => fs::write(path, &f.durable),
            Body::Dir(d) => {
                fs::create_dir(path)?;
                // A directory that reached itself through renames synced in some directories
                // and not in others: materialize it once.
                if seen.insert(ino) {
                    for (name, &child) in &d.durable {
                        self.materialize(child, &path.join(name), seen)?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Where `ino` is in the durable tree, as paths in the backing directory (none when a cut
    /// now would lose it; more than one for a hard link).
    fn durable_paths(&self, ino: u64) -> Vec<PathBuf> {
        self.paths(ino, true, self.backing.clone())
    }

    /// Where `ino` is in the live tree, relative to the mount (the first path found).
    pub(crate) fn live_path(&self, ino: u64) -> Option<PathBuf> {
        self.paths(ino, false, PathBuf::new()).into_iter().next()
    }

    /// Every path from the root to `ino` (below `base`) through the durable or the live entries.
    fn paths(&self, ino: u64, durable: bool, base: PathBuf) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut stack = vec![(ROOT, base)];
        while let Some((at, path)) = stack.pop() {
            if at == ino {
                out.push(path.clone());
            }
            if !seen.insert(at) {
                continue;
            }
            if let Some(Body::Dir(d)) = self.nodes.get(&at).map(|n| &n.body) {
                let entries = if durable { &d.durable } else { &d.live };
                for (name, &child) in entries {
                    stack.push((child, path.join(name)));
                }
            }
        }
        out
    }

    /// Forgets inodes that no name reaches, live or durable, and no process has open: an
    /// unlinked file whose unlink is durable, a file created and removed between two syncs.
    fn reclaim(&mut self) {
        let mut reached = HashSet::new();
        let mut stack: Vec<u64> = std::iter::once(ROOT)
            .chain(
                self.nodes
                    .iter()
                    .filter(|(_, n)| n.open > 0)
                    .map(|(&i, _)| i),
            )
            .collect();
        while let Some(at) = stack.pop() {
            if !reached.insert(at) {
                continue;
            }
            if let Some(Body::Dir(d)) = self.nodes.get(&at).map(|n| &n.body) {
                stack.extend(d.live.values().chain(d.durable.values()));
            }
        }
        self.nodes.retain(|ino, _| reached.contains(ino));
    }

    pub(crate) fn pending(&self) -> Pending {
        let mut p = Pending::default();
        for n in self.nodes.values() {
            match &n.body {
                Body::File(f) if !f.pending.is_empty() => {
                    p.files += 1;
                    p.ops += f.pending.len();
                    p.bytes += f.pending.iter().map(Op::bytes).sum::<u64>();
                }
                Body::Dir(d) if d.live != d.durable => p.dirs += 1,
                _ => {}
            }
        }
        p
    }

    /// The power cut: every inode goes back to its durable state (in `Torn` mode one file keeps
    /// part of its pending writes), and whatever no durable name reaches is gone.
    pub(crate) fn cut(&mut self, how: Cut) -> Result<CutReport> {
        self.backing_ok()?;
        let p = self.pending();
        let mut report = CutReport {
            files: p.files,
            ops: p.ops,
            bytes: p.bytes,
            dirs: p.dirs,
            torn: None,
        };
        if let Cut::Torn { seed } = how {
            report.torn = self.tear_one(seed)?;
        }
        self.armed = None;
        self.failed = false;
        for n in self.nodes.values_mut() {
            match &mut n.body {
                Body::File(f) => {
                    f.pending.clear();
                    f.live = f.durable.clone();
                }
                Body::Dir(d) => d.live = d.durable.clone(),
            }
        }
        // Forget what no durable name reaches (open handles died with their processes), and
        // set every directory's `..` to where it now is.
        let mut reached = HashSet::new();
        let mut parents = Vec::new();
        let mut stack = vec![(ROOT, ROOT)];
        while let Some((at, parent)) = stack.pop() {
            if !reached.insert(at) {
                continue;
            }
            parents.push((at, parent));
            if let Some(Body::Dir(d)) = self.nodes.get(&at).map(|n| &n.body) {
                stack.extend(d.durable.values().map(|&c| (c, at)));
            }
        }
        self.nodes.retain(|ino, _| reached.contains(ino));
        for (ino, parent) in parents {
            if let Some(n) = self.nodes.get_mut(&ino) {
                n.open = 0;
                if let Body::Dir(d) = &mut n.body {
                    d.parent = parent;
                }
            }
        }
        Ok(report)
    }

    /// `Torn` mode: makes a random prefix of the pending changes of the file written last
    /// durable, the last kept write cut at a random byte.
    fn tear_one(&mut self, seed: u64) -> Result<Option<TornWrite>> {
        let mut rng = SplitMix::new(seed);
        let last = self
            .nodes
            .iter()
            .filter_map(|(&i, n)| match &n.body {
                Body::File(f) if !f.pending.is_empty() => Some((f.changed, i)),
                _ => None,
            })
            .max();
        let Some((_, ino)) = last else {
            return Ok(None);
        };
        let path = self.live_path(ino).unwrap_or_default();
        let paths = self.durable_paths(ino);
        let f = self.file_mut(ino)?;
        let kept_ops = rng.up_to(f.pending.len());
        let mut kept: Vec<Op> = f.pending[..kept_ops].to_vec();
        let mut kept_bytes_of_next = 0;
        if let Some(Op::Write { at, data }) = f.pending.get(kept_ops) {
            kept_bytes_of_next = rng.up_to(data.len().saturating_sub(1));
            if kept_bytes_of_next > 0 {
                kept.push(Op::Write {
                    at: *at,
                    data: data[..kept_bytes_of_next].to_vec(),
                });
            }
        }
        let ops = f.pending.len();
        for op in &kept {
            op.apply(&mut f.durable);
        }
        let mirrored = paths.iter().try_for_each(|p| {
            let file = OpenOptions::new().write(true).open(p)?;
            kept.iter().try_for_each(|op| op.apply_to(&file))
        });
        self.note_backing(mirrored)?;
        Ok(Some(TornWrite {
            path,
            ops,
            kept_ops,
            kept_bytes_of_next,
        }))
    }

    /// Compares the backing directory with the durable tree; the first difference.
    pub(crate) fn check_backing(&self) -> std::result::Result<(), String> {
        if let Some(e) = &self.backing_error {
            return Err(e.clone());
        }
        self.check_dir(ROOT, &self.backing, &mut HashSet::new())
    }

    fn check_dir(
        &self,
        ino: u64,
        path: &Path,
        seen: &mut HashSet<u64>,
    ) -> std::result::Result<(), String> {
        let Some(Body::Dir(d)) = self.nodes.get(&ino).map(|n| &n.body) else {
            return Err(format!("{}: not a directory in the model", path.display()));
        };
        if !seen.insert(ino) {
            return Ok(());
        }
        let on_disk: Vec<OsString> = fs::read_dir(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        let mut on_disk = on_disk;
        on_disk.sort();
        let expected: Vec<OsString> = d.durable.keys().cloned().collect();
        if on_disk != expected {
            return Err(format!(
                "{}: holds {on_disk:?}, the durable tree {expected:?}",
                path.display()
            ));
        }
        for (name, &child) in &d.durable {
            let p = path.join(name);
            match self.nodes.get(&child).map(|n| &n.body) {
                Some(Body::File(f)) => {
                    let bytes = fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                    if bytes != f.durable {
                        return Err(format!(
                            "{}: {} bytes in the backing file, {} durable (or different bytes)",
                            p.display(),
                            bytes.len(),
                            f.durable.len()
                        ));
                    }
                }
                Some(Body::Dir(_)) => self.check_dir(child, &p, seen)?,
                None => return Err(format!("{}: names an inode that is gone", p.display())),
            }
        }
        Ok(())
    }
}

fn remove_path(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn model() -> (tempfile::TempDir, Model) {
        let dir = tempfile::tempdir().unwrap();
        let m = Model::load(dir.path(), 0, 0).unwrap();
        (dir, m)
    }

    fn name(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    fn live(m: &Model, ino: u64) -> Vec<u8> {
        match &m.node(ino).unwrap().body {
            Body::File(f) => f.live.clone(),
            Body::Dir(_) => panic!("a directory"),
        }
    }

    /// A file that exists durably (created, dir synced) with `bytes` synced.
    fn durable_file(m: &mut Model, parent: u64, n: &str, bytes: &[u8]) -> u64 {
        let ino = m.create(parent, name(n), 0o644, 0, 0).unwrap();
        m.write(ino, 0, bytes).unwrap();
        m.fsync(ino).unwrap();
        m.fsyncdir(parent).unwrap();
        ino
    }

    #[test]
    fn ops_apply_like_the_system_calls() {
        let mut b = b"abcdef".to_vec();
        Op::Write {
            at: 8,
            data: b"xy".to_vec(),
        }
        .apply(&mut b);
        assert_eq!(b, b"abcdef\0\0xy");
        Op::SetLen(3).apply(&mut b);
        assert_eq!(b, b"abc");
        Op::Extend(5).apply(&mut b);
        assert_eq!(b, b"abc\0\0");
        Op::Extend(2).apply(&mut b);
        assert_eq!(b.len(), 5);
        let mut b = b"abcdef".to_vec();
        Op::Zero {
            at: 4,
            len: 10,
            keep_size: true,
        }
        .apply(&mut b);
        assert_eq!(b, b"abcd\0\0");
        Op::Zero {
            at: 1,
            len: 9,
            keep_size: false,
        }
        .apply(&mut b);
        assert_eq!(b, b"a\0\0\0\0\0\0\0\0\0");
    }

    #[test]
    fn a_cut_keeps_exactly_what_was_synced() {
        let (dir, mut m) = model();
        let f = durable_file(&mut m, ROOT, "f", b"synced");
        m.write(f, 6, b" and not").unwrap();
        m.set_len(f, 3).unwrap();
        assert_eq!(live(&m, f), b"syn");
        let r = m.cut(Cut::Drop).unwrap();
        assert_eq!((r.files, r.ops, r.bytes), (1, 2, 8));
        assert_eq!(live(&m, f), b"synced");
        assert_eq!(fs::read(dir.path().join("f")).unwrap(), b"synced");
        m.check_backing().unwrap();
    }

    #[test]
    fn a_created_file_needs_its_directory_synced() {
        let (dir, mut m) = model();
        let sub = m.mkdir(ROOT, name("sub"), 0o755, 0, 0).unwrap();
        m.fsyncdir(ROOT).unwrap();
        let f = m.create(sub, name("new"), 0o644, 0, 0).unwrap();
        m.write(f, 0, b"data").unwrap();
        m.fsync(f).unwrap();
        // The file's bytes are durable, its name is not.
        assert!(!dir.path().join("sub/new").exists());
        m.cut(Cut::Drop).unwrap();
        assert_eq!(m.lookup(sub, name("new")), Err(Errno::ENOENT));
        assert!(m.node(f).is_err(), "the orphan is forgotten");
        m.check_backing().unwrap();

        // Synced directory first, then the bytes: both survive, and reach the backing file.
        let f = m.create(sub, name("new"), 0o644, 0, 0).unwrap();
        m.fsyncdir(sub).unwrap();
        assert_eq!(fs::read(dir.path().join("sub/new")).unwrap(), b"");
        m.write(f, 0, b"data").unwrap();
        m.fsync(f).unwrap();
        assert_eq!(fs::read(dir.path().join("sub/new")).unwrap(), b"data");
        m.cut(Cut::Drop).unwrap();
        assert_eq!(live(&m, m.lookup(sub, name("new")).unwrap()), b"data");
        m.check_backing().unwrap();
    }

    #[test]
    fn a_new_directory_needs_its_parent_synced() {
        let (dir, mut m) = model();
        let sub = m.mkdir(ROOT, name("sub"), 0o755, 0, 0).unwrap();
        let f = m.create(sub, name("f"), 0o644, 0, 0).unwrap();
        m.write(f, 0, b"x").unwrap();
        m.fsync(f).unwrap();
        m.fsyncdir(sub).unwrap();
        // Everything inside is synced, but `sub` itself is not in the root yet.
        assert!(!dir.path().join("sub").exists());
        m.cut(Cut::Drop).unwrap();
        assert_eq!(m.lookup(ROOT, name("sub")), Err(Errno::ENOENT));
        assert_eq!(m.nodes.len(), 1, "only the root is left");

        let sub = m.mkdir(ROOT, name("sub"), 0o755, 0, 0).unwrap();
        let f = m.create(sub, name("f"), 0o644, 0, 0).unwrap();
        m.write(f, 0, b"x").unwrap();
        m.fsync(f).unwrap();
        m.fsyncdir(sub).unwrap();
        m.fsyncdir(ROOT).unwrap();
        assert_eq!(fs::read(dir.path().join("sub/f")).unwrap(), b"x");
        m.cut(Cut::Drop).unwrap();
        let sub = m.lookup(ROOT, name("sub")).unwrap();
        assert_eq!(live(&m, m.lookup(sub, name("f")).unwrap()), b"x");
        m.check_backing().unwrap();
    }

    #[test]
    fn unsynced_unlinks_and_renames_come_back() {
        let (dir, mut m) = model();
        let a = durable_file(&mut m, ROOT, "a", b"A");
        durable_file(&mut m, ROOT, "b", b"B");
        m.unlink(ROOT, name("b")).unwrap();
        m.rename(ROOT, name("a"), ROOT, name("c"), false).unwrap();
        m.cut(Cut::Drop).unwrap();
        assert_eq!(m.lookup(ROOT, name("a")), Ok(a));
        assert_eq!(live(&m, m.lookup(ROOT, name("b")).unwrap()), b"B");
        assert_eq!(m.lookup(ROOT, name("c")), Err(Errno::ENOENT));
        m.check_backing().unwrap();

        m.rename(ROOT, name("a"), ROOT, name("c"), false).unwrap();
        m.unlink(ROOT, name("b")).unwrap();
        m.fsyncdir(ROOT).unwrap();
        assert!(!dir.path().join("a").exists() && !dir.path().join("b").exists());
        assert_eq!(fs::read(dir.path().join("c")).unwrap(), b"A");
        m.cut(Cut::Drop).unwrap();
        assert_eq!(m.lookup(ROOT, name("c")), Ok(a));
        assert_eq!(m.lookup(ROOT, name("a")), Err(Errno::ENOENT));
        m.check_backing().unwrap();
    }

    #[test]
    fn a_rename_over_a_file_is_atomic_in_the_strict_model() {
        // The write-to-temp, sync, rename, sync-directory pattern: before the directory sync a
        // cut leaves the old file whole; after it, the new one whole. Never a mix.
        let (dir, mut m) = model();
        durable_file(&mut m, ROOT, "cfg", b"old");
        let tmp = m.create(ROOT, name("cfg.tmp"), 0o644, 0, 0).unwrap();
        m.write(tmp, 0, b"new").unwrap();
        m.fsync(tmp).unwrap();
        m.rename(ROOT, name("cfg.tmp"), ROOT, name("cfg"), false)
            .unwrap();
        m.cut(Cut::Drop).unwrap();
        assert_eq!(live(&m, m.lookup(ROOT, name("cfg")).unwrap()), b"old");
        assert_eq!(m.lookup(ROOT, name("cfg.tmp")), Err(Errno::ENOENT));

        let tmp = m.create(ROOT, name("cfg.tmp"), 0o644, 0, 0).unwrap();
        m.write(tmp, 0, b"new").unwrap();
        m.fsync(tmp).unwrap();
        m.rename(ROOT, name("cfg.tmp"), ROOT, name("cfg"), false)
            .unwrap();
        m.fsyncdir(ROOT).unwrap();
        m.cut(Cut::Drop).unwrap();
        assert_eq!(live(&m, m.lookup(ROOT, name("cfg")).unwrap()), b"new");
        assert_eq!(fs::read(dir.path().join("cfg")).unwrap(), b"new");
        m.check_backing().unwrap();
    }

    #[test]
    fn rename_follows_posix() {
        let (_dir, mut m) = model();
        let d = m.mkdir(ROOT, name("d"), 0o755, 0, 0).unwrap();
        let e = m.mkdir(d, name("e"), 0o755, 0, 0).unwrap();
        m.create(ROOT, name("f"), 0o644, 0, 0).unwrap();
        m.create(e, name("g"), 0o644, 0, 0).unwrap();
        assert_eq!(
            m.rename(ROOT, name("d"), e, name("d2"), false),
            Err(Errno::EINVAL),
            "into itself"
        );
        assert_eq!(
            m.rename(ROOT, name("f"), ROOT, name("d"), false),
            Err(Errno::EISDIR)
        );
        assert_eq!(
            m.rename(ROOT, name("d"), ROOT, name("f"), false),
            Err(Errno::ENOTDIR)
        );
        assert_eq!(
            m.rename(ROOT, name("f"), e, name("g"), true),
            Err(Errno::EEXIST)
        );
        assert_eq!(m.rmdir(d, name("e")), Err(Errno::ENOTEMPTY));
        m.rename(d, name("e"), ROOT, name("e"), false).unwrap();
        assert_eq!(m.dir(e).unwrap().parent, ROOT);
        assert_eq!(m.nlink(ROOT), 4, ". .. d e");
        m.rmdir(ROOT, name("d")).unwrap();
        assert_eq!(m.nlink(ROOT), 3);
    }

    #[test]
    fn an_unlinked_open_file_stays_readable_until_closed() {
        let (_dir, mut m) = model();
        let f = durable_file(&mut m, ROOT, "f", b"still here");
        m.open(f).unwrap();
        m.unlink(ROOT, name("f")).unwrap();
        m.fsyncdir(ROOT).unwrap();
        assert_eq!(m.read(f, 0, 100).unwrap(), b"still here");
        assert_eq!(m.nlink(f), 0);
        m.release(f);
        assert!(m.node(f).is_err(), "forgotten after the last close");
    }

    #[test]
    fn fallocate_grows_without_overwriting() {
        let (dir, mut m) = model();
        let f = durable_file(&mut m, ROOT, "f", b"abc");
        m.fallocate(f, 1, 5, 0).unwrap();
        assert_eq!(live(&m, f), b"abc\0\0\0");
        m.fallocate(f, 0, 100, FALLOC_FL_KEEP_SIZE).unwrap();
        assert_eq!(live(&m, f).len(), 6);
        m.fallocate(f, 0, 2, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
            .unwrap();
        assert_eq!(live(&m, f), b"\0\0c\0\0\0");
        assert_eq!(m.fallocate(f, 0, 1, 0x08), Err(Errno::EOPNOTSUPP));
        m.cut(Cut::Drop).unwrap();
        assert_eq!(live(&m, f), b"abc");
        m.fallocate(f, 1, 5, 0).unwrap();
        m.fsync(f).unwrap();
        assert_eq!(fs::read(dir.path().join("f")).unwrap(), b"abc\0\0\0");
        m.check_backing().unwrap();
    }

    #[test]
    fn a_torn_cut_keeps_a_prefix_of_one_files_pending_writes() {
        let whole = b"aaaabbbbcccc";
        let mut lengths = HashSet::new();
        for seed in 0..200 {
            let (_dir, mut m) = model();
            let f = durable_file(&mut m, ROOT, "f", b"");
            for (i, chunk) in whole.chunks(4).enumerate() {
                m.write(f, i as u64 * 4, chunk).unwrap();
            }
            let r = m.cut(Cut::Torn { seed }).unwrap();
            let t = r.torn.unwrap();
            assert_eq!((t.path.as_path(), t.ops), (Path::new("f"), 3));
            let kept = live(&m, f);
            assert_eq!(kept.len(), t.kept_ops * 4 + t.kept_bytes_of_next);
            assert_eq!(&whole[..kept.len()], kept.as_slice(), "seed {seed}");
            m.check_backing().unwrap();
            lengths.insert(kept.len());
        }
        // Every length from nothing to all of it, torn writes included.
        assert_eq!(lengths.len(), whole.len() + 1, "{lengths:?}");
    }

    #[test]
    fn a_torn_cut_tears_only_the_file_written_last() {
        for seed in 0..20 {
            let (_dir, mut m) = model();
            let a = durable_file(&mut m, ROOT, "a", b"");
            let b = durable_file(&mut m, ROOT, "b", b"");
            m.write(b, 0, b"BBBB").unwrap();
            m.write(a, 0, b"AAAA").unwrap();
            m.write(a, 4, b"AAAA").unwrap();
            let r = m.cut(Cut::Torn { seed }).unwrap();
            assert_eq!(r.torn.unwrap().path, Path::new("a"));
            assert!(live(&m, b).is_empty());
            assert!(b"AAAAAAAA".starts_with(&live(&m, a)));
            assert_eq!(m.pending(), Pending::default());
        }
    }

    #[test]
    fn a_failed_power_refuses_every_change_until_the_cut() {
        let (dir, mut m) = model();
        let f = durable_file(&mut m, ROOT, "f", b"");
        m.fail_after(2);
        m.write(f, 0, b"one").unwrap();
        m.write(f, 3, b"two").unwrap();
        // The power is gone: nothing after the second write is taken, least of all a sync.
        assert_eq!(m.fsync(f), Err(Errno::EIO));
        assert_eq!(m.write(f, 6, b"x"), Err(Errno::EIO));
        assert_eq!(
            m.create(ROOT, name("g"), 0o644, 0, 0),
            Err(Errno::EIO),
            "namespace changes too"
        );
        assert_eq!(m.read(f, 0, 10).unwrap(), b"onetwo", "reads still work");
        assert!(m.failed);
        let r = m.cut(Cut::Torn { seed: 3 }).unwrap();
        assert_eq!(r.torn.unwrap().ops, 2);
        assert!(b"onetwo".starts_with(&live(&m, f)));
        // Power is back.
        m.write(f, 0, b"again").unwrap();
        m.fsync(f).unwrap();
        assert_eq!(fs::read(dir.path().join("f")).unwrap(), b"again");

        // A sync can be the last thing the disk did: then it counts.
        m.fail_after(2);
        m.write(f, 0, b"AGAIN").unwrap();
        m.fsync(f).unwrap();
        assert!(m.failed);
        m.cut(Cut::Drop).unwrap();
        assert_eq!(live(&m, f), b"AGAIN");
        m.check_backing().unwrap();
    }

    #[test]
    fn the_backing_directory_is_loaded_as_durable() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("d")).unwrap();
        fs::write(dir.path().join("d/f"), b"kept").unwrap();
        let mut m = Model::load(dir.path(), 0, 0).unwrap();
        let d = m.lookup(ROOT, name("d")).unwrap();
        let f = m.lookup(d, name("f")).unwrap();
        m.unlink(d, name("f")).unwrap();
        m.cut(Cut::Drop).unwrap();
        assert_eq!(m.lookup(d, name("f")), Ok(f));
        assert_eq!(live(&m, f), b"kept");
        m.check_backing().unwrap();
    }
}
