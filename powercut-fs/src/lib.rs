//! A FUSE file system that forgets what was not synced: the test bench for "a PUBACKed message
//! survives a power cut" (issue 17), after the idea of Jepsen's LazyFS.
//!
//! It serves a directory tree to the processes under test and keeps two states of it: the live
//! one they see, and the durable one a power cut would leave. [`PowerCutFs::cut`] throws the
//! difference away. The backing directory always holds exactly the durable state, so after a cut
//! it is what the disk would hold after the power came back, and the processes restarted on the
//! mount see the same.
//!
//! # What becomes durable (the strict POSIX model)
//!
//! ```text
//! a process calls                              what a cut keeps of it
//! write, pwrite, ftruncate, fallocate           nothing, until fsync or fdatasync of that file
//! fsync / fdatasync (file)                      the file's bytes and length, all its pending
//!                                               changes at once; not its name
//! create, mkdir, link, unlink, rmdir, rename    nothing, until fsync of the directory holding
//!                                               the name (both directories for a rename across two)
//! fsync (directory)                             the directory's entries as they are now:
//!                                               each name and which inode it names
//! close, flush                                  nothing
//! ```
//!
//! Consequences a program must get right: a file created, written and fsynced but whose
//! directory was not synced is gone after a cut (its bytes were durable, but nothing names
//! them); a directory created with `mkdir` and never named durably by an fsync of its parent is
//! gone with everything in it; an unsynced unlink or rename is undone; `rename(tmp, name)` after
//! fsync of `tmp` and before fsync of the directory leaves the old `name`, whole. Many real file
//! systems are kinder (ext4 with `data=ordered` commits a rename's data with it, and journals
//! metadata every few seconds); the promise has to hold on the strict one.
//!
//! Cut modes ([`Cut`]): `Drop` keeps exactly the durable state; `Torn` also keeps a random
//! prefix of the pending changes of the file written last (the write in flight when the power
//! went), the last kept write cut at a random byte (a write that reached the disk in part).
//!
//! A cut at a random moment mostly finds the processes between operations. To cut in the
//! middle of one (between a write and its fsync, a rename and the directory sync),
//! [`PowerCutFs::fail_after`] lets the power fail right after the n-th change from now: from
//! then on every change and every sync fails with EIO (a dead disk), so nothing the process
//! does afterwards can be reported to it as durable; the test then kills it and cuts.
//!
//! # Faithfulness
//!
//! Entries and attributes are given to the kernel with a TTL of zero and files are opened with
//! direct I/O, so the kernel caches neither names, sizes nor bytes, and after a cut every process
//! sees the durable state. The writeback cache is not enabled: a `write` returns once this file
//! system has it, so a process that was SIGKILLed and reaped has nothing in flight (the kernel
//! waits for the answer to any request this file system had already read). Not modelled:
//! unsynced changes that a real file system writes early (a journal commit can make a rename or
//! a create durable before the data it names: here a cut keeps nothing pending, or with `Torn`
//! a prefix of one file's, never another subset), symlinks and special files, extended
//! attributes, shared writable `mmap` (refused under direct I/O), ownership, mode and times
//! across a cut, and a full disk.
//!
//! Memory: the whole tree is held twice (live and durable) plus the pending changes. It is made
//! for test-sized data (tens of MiB).
//!
//! # Use
//!
//! Mount, run the processes with their data on the mount, SIGKILL and reap every one of them,
//! [`PowerCutFs::cut`], start them again on the same mount. Mounting needs `/dev/fuse` and root
//! (or CAP_SYS_ADMIN): `fuser` then calls mount(2) itself and needs no `fusermount`.

mod fuse;
mod model;

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

pub use model::{Cut, CutReport, Pending, TornWrite};

/// A mounted power-cut file system. Unmounted when dropped (or with [`PowerCutFs::unmount`]).
pub struct PowerCutFs {
    model: Arc<Mutex<model::Model>>,
    session: Option<fuser::BackgroundSession>,
    mountpoint: PathBuf,
}

impl PowerCutFs {
    /// Mounts a file system at `mountpoint` (an existing, empty directory) whose durable state
    /// is what `backing` holds now (files and directories only).
    pub fn mount(backing: &Path, mountpoint: &Path) -> io::Result<PowerCutFs> {
        let meta = std::fs::metadata(backing)?;
        let model = Arc::new(Mutex::new(model::Model::load(
            backing,
            meta.uid(),
            meta.gid(),
        )?));
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("powercut".into()),
            fuser::MountOption::Subtype("powercut".into()),
            // The kernel checks permissions from the attributes, as on a disk.
            fuser::MountOption::DefaultPermissions,
        ];
        let fs = fuse::Fs {
            model: model.clone(),
        };
        let session = fuser::spawn_mount(fs, mountpoint, &config).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "could not mount the power-cut file system at {}: {e} (needs /dev/fuse and root)",
                    mountpoint.display()
                ),
            )
        })?;
        Ok(PowerCutFs {
            model,
            session: Some(session),
            mountpoint: mountpoint.to_path_buf(),
        })
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    fn model(&self) -> MutexGuard<'_, model::Model> {
        self.model.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What a cut would throw away now.
    pub fn pending(&self) -> Pending {
        self.model().pending()
    }

    /// The power cut: the live state becomes the durable one (see [`Cut`] for torn writes).
    /// Every process that had the mount's files open must have been killed and reaped first:
    /// their descriptors die with the cut. Fails when the backing directory could not be kept
    /// up to date (then the test cannot trust what is left).
    pub fn cut(&self, how: Cut) -> io::Result<CutReport> {
        let mut m = self.model();
        m.cut(how).map_err(|_| {
            io::Error::other(
                m.backing_error
                    .clone()
                    .unwrap_or_else(|| "the backing directory is out of date".into()),
            )
        })
    }

    /// Lets the power fail right after `changes` more changes (writes, truncates, fallocates,
    /// creates, mkdirs, links, unlinks, rmdirs, renames, fsyncs) have succeeded: from then on
    /// every change and sync fails with EIO until [`PowerCutFs::cut`]. 0: at once.
    pub fn fail_after(&self, changes: u64) {
        self.model().fail_after(changes);
    }

    /// Whether the power has failed ([`PowerCutFs::fail_after`]) and the cut is due.
    pub fn has_failed(&self) -> bool {
        self.model().failed
    }

    /// Checks that the backing directory holds exactly the durable state: the first difference.
    pub fn check_backing(&self) -> Result<(), String> {
        self.model().check_backing()
    }

    /// Unmounts (the processes using it must be gone) and stops the file system's thread.
    pub fn unmount(mut self) -> io::Result<()> {
        match self.session.take() {
            Some(s) => s.umount_and_join(),
            None => Ok(()),
        }
    }
}

impl Drop for PowerCutFs {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
    }
}

/// A power-cut file system on a fresh temporary directory: mounted at `<tmp>/mnt`, backed by
/// `<tmp>/backing` (empty). Unmounted, then removed, when dropped.
pub struct TempMount {
    /// Declared first: unmounted before the directory is removed.
    pub fs: PowerCutFs,
    dir: tempfile::TempDir,
}

impl TempMount {
    /// A mount for the test named `test`. Panics, saying why and naming the command that runs
    /// the tests as they need to run, where [`unavailable`] says this machine cannot mount one:
    /// a test that cannot run fails, it never passes without having run.
    pub fn for_test(test: &str) -> TempMount {
        if let Some(why) = unavailable() {
            panic!("{test}: cannot mount the power-cut file system: {why}. {RUN_TESTS_HINT}");
        }
        TempMount::new().expect("mount the power-cut file system")
    }

    pub fn new() -> io::Result<TempMount> {
        let dir = tempfile::tempdir()?;
        let (mnt, backing) = (dir.path().join("mnt"), dir.path().join("backing"));
        std::fs::create_dir(&mnt)?;
        std::fs::create_dir(&backing)?;
        let fs = PowerCutFs::mount(&backing, &mnt)?;
        Ok(TempMount { fs, dir })
    }

    /// Where the processes under test see the file system.
    pub fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    /// What the disk holds: the durable state.
    pub fn backing(&self) -> PathBuf {
        self.dir.path().join("backing")
    }

    /// Unmounts (see [`PowerCutFs::unmount`]) and removes the directory.
    pub fn unmount(self) -> io::Result<()> {
        let TempMount { fs, dir } = self;
        fs.unmount()?;
        drop(dir);
        Ok(())
    }
}

/// What a test that cannot run here says: run the suite the way the README does.
pub const RUN_TESTS_HINT: &str = "The power-cut tests need /dev/fuse and root; run the whole \
    suite with `./run-tests` (the README's test command) as root, as CI does";

/// Why this machine cannot mount the file system (`None`: it can try): no `/dev/fuse`, or not
/// root. Tests fail with this reason and [`RUN_TESTS_HINT`].
pub fn unavailable() -> Option<String> {
    if !Path::new("/dev/fuse").exists() {
        return Some("no /dev/fuse on this machine".into());
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .unwrap_or("?");
    if euid != "0" {
        return Some(format!(
            "mounting a FUSE file system without fusermount needs root (effective uid {euid})"
        ));
    }
    None
}
