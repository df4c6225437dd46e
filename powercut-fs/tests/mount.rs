//! The power-cut file system through a real FUSE mount, with the system calls a program makes
//! (std::fs): what a cut keeps and what it throws away, as the processes and the backing
//! directory see it. Needs /dev/fuse and root; elsewhere each test fails, saying why and naming
//! `./run-tests`.
#![allow(clippy::unwrap_used)]

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use powercut_fs::{Cut, PowerCutFs, TempMount};

struct Mounted {
    m: TempMount,
    mnt: PathBuf,
    backing: PathBuf,
}

impl Mounted {
    fn cut(&self, how: Cut) -> powercut_fs::CutReport {
        let r = self.m.fs.cut(how).unwrap();
        self.m.fs.check_backing().unwrap();
        r
    }
}

fn mount(test: &str) -> Mounted {
    let m = TempMount::for_test(test);
    Mounted {
        mnt: m.mnt(),
        backing: m.backing(),
        m,
    }
}

fn sync_dir(dir: &Path) {
    File::open(dir).unwrap().sync_all().unwrap();
}

/// A file with a durable name and durable `bytes`.
fn durable_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    let mut f = File::create(&p).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_data().unwrap();
    sync_dir(dir);
    p
}

#[test]
fn an_unsynced_write_is_gone_after_a_cut_and_a_synced_one_is_kept() {
    let m = mount("unsynced write");
    let p = durable_file(&m.mnt, "f", b"synced");
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(b" and this too", 6).unwrap();
    f.sync_data().unwrap();
    f.write_all_at(b" but not this", 19).unwrap();
    f.set_len(40).unwrap();
    drop(f);
    assert_eq!(fs::metadata(&p).unwrap().len(), 40, "the live view");
    let r = m.cut(Cut::Drop);
    assert_eq!((r.files, r.bytes), (1, 13), "{r:?}");
    // Neither the size nor the bytes are served from a kernel cache.
    assert_eq!(fs::metadata(&p).unwrap().len(), 19);
    assert_eq!(fs::read(&p).unwrap(), b"synced and this too");
    assert_eq!(
        fs::read(m.backing.join("f")).unwrap(),
        b"synced and this too"
    );
}

#[test]
fn a_file_created_without_a_directory_sync_is_gone_after_a_cut() {
    let m = mount("create without directory sync");
    let p = m.mnt.join("new");
    let mut f = File::create(&p).unwrap();
    f.write_all(b"durable bytes, no durable name").unwrap();
    f.sync_all().unwrap();
    drop(f);
    let sub = m.mnt.join("sub");
    fs::create_dir(&sub).unwrap();
    durable_file(&sub, "inner", b"synced inside an unsynced directory");
    let r = m.cut(Cut::Drop);
    assert_eq!(r.dirs, 1, "the root's new entries: {r:?}");
    assert!(!p.exists());
    assert!(!sub.exists(), "mkdir needs an fsync of the parent");
    assert_eq!(fs::read_dir(&m.mnt).unwrap().count(), 0);

    // With the directory synced, the name survives.
    let p = durable_file(&m.mnt, "new", b"now named");
    m.cut(Cut::Drop);
    assert_eq!(fs::read(p).unwrap(), b"now named");
}

#[test]
fn renames_and_unlinks_need_a_directory_sync() {
    let m = mount("rename");
    durable_file(&m.mnt, "a", b"A");
    durable_file(&m.mnt, "b", b"B");
    // The temp-file pattern: a new "b" takes the old one's place.
    let tmp = m.mnt.join("b.tmp");
    let mut f = File::create(&tmp).unwrap();
    f.write_all(b"new B").unwrap();
    f.sync_data().unwrap();
    fs::rename(&tmp, m.mnt.join("b")).unwrap();
    fs::remove_file(m.mnt.join("a")).unwrap();
    m.cut(Cut::Drop);
    assert_eq!(fs::read(m.mnt.join("a")).unwrap(), b"A", "unlink undone");
    assert_eq!(fs::read(m.mnt.join("b")).unwrap(), b"B", "rename undone");
    assert!(!tmp.exists());

    let mut f = File::create(&tmp).unwrap();
    f.write_all(b"new B").unwrap();
    f.sync_data().unwrap();
    fs::rename(&tmp, m.mnt.join("b")).unwrap();
    fs::remove_file(m.mnt.join("a")).unwrap();
    sync_dir(&m.mnt);
    m.cut(Cut::Drop);
    assert!(!m.mnt.join("a").exists());
    assert_eq!(fs::read(m.mnt.join("b")).unwrap(), b"new B");
    let mut names: Vec<_> = fs::read_dir(&m.backing)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["b"]);
}

#[test]
fn a_rename_across_directories_needs_both_synced() {
    let m = mount("rename across directories");
    for d in ["from", "to"] {
        fs::create_dir(m.mnt.join(d)).unwrap();
    }
    sync_dir(&m.mnt);
    durable_file(&m.mnt.join("from"), "f", b"moved");
    fs::rename(m.mnt.join("from/f"), m.mnt.join("to/f")).unwrap();
    sync_dir(&m.mnt.join("to"));
    // Only the new name is durable: after a cut the file has both (the old directory was not
    // synced), which the strict model allows and a recovery must cope with.
    m.cut(Cut::Drop);
    assert_eq!(fs::read(m.mnt.join("to/f")).unwrap(), b"moved");
    assert_eq!(fs::read(m.mnt.join("from/f")).unwrap(), b"moved");
}

#[test]
fn a_torn_cut_keeps_a_prefix_of_the_pending_writes() {
    let m = mount("torn cut");
    let whole: Vec<u8> = (0..64u8).collect();
    let mut lengths = std::collections::BTreeSet::new();
    for seed in 0..40 {
        let p = durable_file(&m.mnt, "log", b"");
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        // Eight separate writes: eight pending operations.
        for (i, chunk) in whole.chunks(8).enumerate() {
            f.write_all_at(chunk, i as u64 * 8).unwrap();
        }
        drop(f);
        let r = m.cut(Cut::Torn { seed });
        let t = r.torn.unwrap();
        assert_eq!((t.path.as_path(), t.ops), (Path::new("log"), 8));
        let kept = fs::read(&p).unwrap();
        assert_eq!(kept.len(), t.kept_ops * 8 + t.kept_bytes_of_next, "{t:?}");
        assert_eq!(kept, whole[..kept.len()], "seed {seed}");
        lengths.insert(kept.len());
        fs::remove_file(&p).unwrap();
        sync_dir(&m.mnt);
    }
    assert!(lengths.len() > 10, "the prefixes vary: {lengths:?}");
}

#[test]
fn after_a_power_failure_at_an_operation_nothing_more_is_durable() {
    let m = mount("power failure at an operation");
    let p = durable_file(&m.mnt, "f", b"");
    m.m.fs.fail_after(1);
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(b"the last write the disk saw", 0).unwrap();
    assert!(m.m.fs.has_failed());
    let err = f.sync_data().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(5), "EIO: {err}");
    assert!(f.write_all_at(b"more", 0).is_err());
    assert!(File::create(m.mnt.join("g")).is_err());
    drop(f);
    let r = m.cut(Cut::Torn { seed: 1 });
    let kept = fs::read(&p).unwrap();
    assert!(b"the last write the disk saw".starts_with(&kept), "{r:?}");
    // The power is back.
    durable_file(&m.mnt, "g", b"new");
    assert!(!m.m.fs.has_failed());
}

#[test]
fn flock_works_on_the_mount() {
    // The queue's LOCK file: a second holder is refused while the first lives.
    let m = mount("flock");
    let p = m.mnt.join("LOCK");
    let a = File::create(&p).unwrap();
    let b = File::open(&p).unwrap();
    a.try_lock().unwrap();
    assert!(b.try_lock_shared().is_err());
    drop(a);
    b.try_lock_shared().unwrap();
}

#[test]
fn the_backing_directory_is_the_starting_state_and_is_unmounted_cleanly() {
    if let Some(why) = powercut_fs::unavailable() {
        panic!("remount: {why}. {}", powercut_fs::RUN_TESTS_HINT);
    }
    let dir = tempfile::tempdir().unwrap();
    let (mnt, backing) = (dir.path().join("mnt"), dir.path().join("backing"));
    fs::create_dir_all(backing.join("d")).unwrap();
    fs::create_dir(&mnt).unwrap();
    fs::write(backing.join("d/f"), b"from before").unwrap();
    let fs1 = PowerCutFs::mount(&backing, &mnt).unwrap();
    assert_eq!(fs::read(mnt.join("d/f")).unwrap(), b"from before");
    durable_file(&mnt.join("d"), "g", b"written through the mount");
    fs::write(mnt.join("d/h"), b"never synced").unwrap();
    fs1.unmount().unwrap();
    assert_eq!(fs::read_dir(&mnt).unwrap().count(), 0, "unmounted");
    // An unmount is not a clean shutdown of a disk: only the durable state is in the backing.
    assert_eq!(
        fs::read(backing.join("d/g")).unwrap(),
        b"written through the mount"
    );
    assert!(!backing.join("d/h").exists());
}
