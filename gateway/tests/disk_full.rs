//! Disk full: the queue's directory sits on a small tmpfs that the test mounts (it needs root, as
//! on the development and CI machines; elsewhere it fails, naming `./run-tests`). Appends fail cleanly with
//! `DiskFull`, nothing durable is damaged, and appends work again once space is freed.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use gateway::queue::inspect::Inspector;
use gateway::queue::{FsyncPolicy, NewRecord, Queue, QueueError, QueueOptions};

/// Tests here mount and unmount filesystems; one at a time, so that no child process of one
/// (`mount`) holds a file of the other's mount while it unmounts.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A tmpfs mounted for the test's lifetime.
struct SmallFs {
    _serial: std::sync::MutexGuard<'static, ()>,
    mount: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> Result<SmallFs, String> {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mount = dir.path().join("fs");
        std::fs::create_dir(&mount).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mount)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(SmallFs {
            _serial: serial,
            mount,
            _dir: dir,
        })
    }

    fn path(&self) -> &Path {
        &self.mount
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.mount)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Detach it anyway so that no test run leaves mounts behind.
            let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        }
    }
}

#[tokio::test]
async fn appends_fail_cleanly_when_the_disk_is_full_and_resume_when_space_returns() {
    let fs = match SmallFs::mount("2m") {
        Ok(fs) => fs,
        Err(why) => panic!(
            "cannot mount a small tmpfs here ({why}): the disk-full tests need root; run the \
             suite with `./run-tests` (the README's test command) as root, as CI does"
        ),
    };
    // Ballast that the test deletes later to give space back.
    let ballast = fs.path().join("ballast");
    std::fs::write(&ballast, vec![0u8; 512 << 10]).unwrap();

    let data = fs.path().join("queue");
    let mut o = QueueOptions::new(&data);
    o.segment_bytes = 128 << 10;
    o.max_bytes = 64 << 20; // larger than the filesystem: the disk fills first
    o.fsync = FsyncPolicy::Always;
    let (q, _) = Queue::open(o.clone()).unwrap();

    let payload = vec![7u8; 4000];
    let mut durable = Vec::new();
    let mut first_error = None;
    for i in 0..2000u32 {
        let mut p = payload.clone();
        p[..4].copy_from_slice(&i.to_le_bytes());
        let pending = q.try_append(&NewRecord::new("dev", "t", &p)).unwrap();
        let marker = pending.marker();
        match pending.durable().await {
            Ok(seq) => durable.push((seq, i)),
            Err(e) => {
                first_error = Some((e, marker));
                break;
            }
        }
    }
    let (err, failed) = first_error.expect("a 2 MiB filesystem must fill up");
    assert!(
        matches!(err, QueueError::DiskFull { .. }),
        "expected DiskFull, got {err:?}"
    );
    assert!(err.is_retryable());
    assert!(err.to_string().contains("disk full"), "{err}");
    assert!(!durable.is_empty());

    // Still full: appends keep failing, and nothing panics or wedges.
    for _ in 0..3 {
        let r = q.append(&NewRecord::new("dev", "t", &payload)).await;
        assert!(matches!(r, Err(QueueError::DiskFull { .. })), "{r:?}");
    }

    // Not writable (healthz, readyz), and the writer's probe (every 5 s) does not say otherwise
    // while the disk is still full.
    assert!(!q.is_writable());
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    assert!(!q.is_writable(), "a probe on a full disk must fail");

    // Space returns: with no append at all, the probe finds the queue writable again.
    std::fs::remove_file(&ballast).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !q.is_writable() {
        assert!(
            std::time::Instant::now() < deadline,
            "still not writable 15 s after space returned, with no append"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        !data.join(".write-probe").exists(),
        "the probe file is removed"
    );

    // Appends work again, except for the stream whose record failed: its next record is
    // refused, so that it is never stored after the earlier one it depends on.
    let refused = q.try_append_after(&NewRecord::new("dev", "t", &payload), Some(&failed));
    assert!(
        matches!(refused, Err(QueueError::DiskFull { .. })),
        "a stream's append after its failed one must be refused: {:?}",
        refused.map(|p| p.seq())
    );
    let mut after = Vec::new();
    for i in 10_000..10_020u32 {
        let mut p = payload.clone();
        p[..4].copy_from_slice(&i.to_le_bytes());
        after.push((q.append(&NewRecord::new("dev", "t", &p)).await.unwrap(), i));
    }
    q.close();
    drop(q);

    // Nothing damaged: verify is clean and a reopen finds every durable record, once, in order.
    let report = Inspector::open(&data).unwrap().verify().unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let (q, rec) = Queue::open(o).unwrap();
    assert_eq!(rec.quarantined_records, 0);
    let mut reader = q.reader("check").unwrap();
    let mut got = Vec::new();
    loop {
        let b = reader.read_now(1000, usize::MAX).unwrap();
        if b.is_empty() {
            break;
        }
        got.extend(b.into_iter().map(|r| {
            (
                r.seq,
                u32::from_le_bytes(r.payload[..4].try_into().unwrap()),
            )
        }));
    }
    let expected: Vec<(u64, u32)> = durable.into_iter().chain(after).collect();
    assert_eq!(got, expected);
    q.close();
}

/// Fills the rest of the filesystem with a ballast file, byte-exact to ENOSPC.
fn fill_up(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 4096];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let one = [0u8; 1];
    while f.write(&one).is_ok_and(|n| n == 1) {}
    let _ = f.sync_all();
}

#[tokio::test]
async fn a_queue_on_a_full_disk_still_opens_delivers_and_frees_space_as_cursors_move() {
    let fs = match SmallFs::mount("2m") {
        Ok(fs) => fs,
        Err(why) => panic!(
            "cannot mount a small tmpfs here ({why}): the disk-full tests need root; run the \
             suite with `./run-tests` (the README's test command) as root, as CI does"
        ),
    };
    let data = fs.path().join("queue");
    let mut o = QueueOptions::new(&data);
    o.segment_bytes = 64 << 10;
    o.max_bytes = 64 << 20;
    let payload = vec![1u8; 2000];
    let mut durable = Vec::new();
    {
        let (q, _) = Queue::open(o.clone()).unwrap();
        // The uplink's cursor exists from the start (as it would in the gateway).
        drop(q.reader("uplink").unwrap());
        for i in 0..500u32 {
            let mut p = payload.clone();
            p[..4].copy_from_slice(&i.to_le_bytes());
            match q.append(&NewRecord::new("dev", "t", &p)).await {
                Ok(seq) => durable.push((seq, i)),
                Err(e) => {
                    assert!(matches!(e, QueueError::DiskFull { .. }), "{e:?}");
                    break;
                }
            }
        }
        q.close();
    }
    assert!(durable.len() > 100);
    // Whatever room is left, something else takes it.
    fill_up(&fs.path().join("other-program"));

    // Open on a 100% full disk: no crash loop, every durable record is still there.
    let (q, _) = Queue::open(o.clone()).expect("the queue must open on a full disk");
    let mut reader = q.reader("uplink").unwrap();
    let mut got = Vec::new();
    loop {
        let b = reader.read_now(100, usize::MAX).unwrap();
        if b.is_empty() {
            break;
        }
        got.extend(b.into_iter().map(|r| {
            (
                r.seq,
                u32::from_le_bytes(r.payload[..4].try_into().unwrap()),
            )
        }));
    }
    assert_eq!(got, durable);
    // Confirming works on a full disk (cursor writes need no new blocks) and frees segments...
    reader.ack_through(got.last().unwrap().0).await.unwrap();
    // ...so appends succeed again.
    q.append(&NewRecord::new("dev", "t", &payload))
        .await
        .expect("space freed by the confirmed segments");
    q.close();
}
