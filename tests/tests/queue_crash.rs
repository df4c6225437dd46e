//! Kill -9 at random moments: every record the appender reported durable is in the queue after
//! recovery, exactly once and in order. Trials share one data directory, so each open also
//! recovers from all the crashes before it. The same again with a power cut after each kill: the
//! data directory on the power-cut file system (`powercut-fs`), everything not synced dropped.
//!
//! `QUEUE_CRASH_TRIALS` sets the number of trials (default 20), `QUEUE_CRASH_SEED` the seed of the
//! kill delays.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use gateway::queue::{FsyncPolicy, Queue, QueueOptions, Record};
use powercut_fs::{Cut, TempMount};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The appender's options (what it was started with).
fn options(dir: &Path) -> QueueOptions {
    let mut o = QueueOptions::new(dir);
    o.fsync = FsyncPolicy::Always;
    o.segment_bytes = 1 << 20;
    o.max_bytes = 1 << 30;
    o
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs the appender for `run_for`, kills it with SIGKILL, returns the (seq, id) it reported.
fn run_and_kill(dir: &Path, trial: u32, run_for: Duration) -> Vec<(u64, String)> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_queue-appender"))
        .arg(dir)
        .arg(trial.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut b = Vec::new();
        stdout.read_to_end(&mut b).unwrap();
        b
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).unwrap();
        s
    });
    std::thread::sleep(run_for);
    let early_exit = child.try_wait().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let out = out.join().unwrap();
    let err = err.join().unwrap();
    assert!(
        early_exit.is_none(),
        "trial {trial}: the appender exited by itself ({early_exit:?}): {err}"
    );
    let text = String::from_utf8(out).unwrap();
    // A line is reported once it is whole; anything after the last newline was cut by the kill.
    let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    whole
        .lines()
        .map(|l| {
            let (seq, id) = l.split_once(' ').unwrap();
            (seq.parse().unwrap(), id.to_string())
        })
        .collect()
}

fn read_everything(q: &Queue, cursor: &str) -> Vec<Record> {
    let mut r = q.reader(cursor).unwrap();
    let mut all = Vec::new();
    loop {
        let b = r.read_now(4096, usize::MAX).unwrap();
        if b.is_empty() {
            return all;
        }
        all.extend(b);
    }
}

#[test]
fn every_record_reported_durable_survives_sigkill() {
    let tmp = tempfile::tempdir().unwrap();
    crash_trials("SIGKILL", &tmp.path().join("queue"), |_| {});
}

#[test]
fn every_record_reported_durable_survives_a_power_cut() {
    let m = TempMount::for_test("power cut");
    // The data directory does not exist yet: the queue creates it, and must make it durable.
    crash_trials("power cut", &m.mnt().join("queue"), |trial| {
        // Every third cut also keeps a torn prefix of one file's pending writes.
        let how = if trial % 3 == 2 {
            Cut::Torn {
                seed: u64::from(trial),
            }
        } else {
            Cut::Drop
        };
        let r = m.fs.cut(how).unwrap();
        m.fs.check_backing().unwrap();
        eprintln!("trial {trial}: the cut dropped {r:?}");
    });
    m.unmount().unwrap();
}

/// Runs the appender on `dir`, kills it at a random moment, calls `after_kill` (the appender is
/// reaped), and checks the queue; `QUEUE_CRASH_TRIALS` times.
fn crash_trials(crash: &str, dir: &Path, mut after_kill: impl FnMut(u32)) {
    let trials: u32 = env_or("QUEUE_CRASH_TRIALS", 20);
    let seed: u64 = env_or("QUEUE_CRASH_SEED", 0xc4a5_8e11);
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = dir.to_path_buf();
    // Everything reported in any trial so far: it must stay in the queue (no cursor confirms it).
    let mut reported: BTreeMap<u64, String> = BTreeMap::new();
    let mut truncated_total = 0;

    for trial in 0..trials {
        let run_for = Duration::from_millis(rng.gen_range(50..=400));
        let now = run_and_kill(&dir, trial, run_for);
        after_kill(trial);
        let ctx = format!("{crash} trial {trial} (seed {seed:#x}, killed after {run_for:?})");
        for (seq, id) in &now {
            assert!(
                reported.insert(*seq, id.clone()).is_none(),
                "{ctx}: seq {seq} reported twice"
            );
        }

        let (q, report) = Queue::open(options(&dir))
            .unwrap_or_else(|e| panic!("{ctx}: open after the kill failed: {e}"));
        // A process crash tears at most the tail; it never damages a record in the middle.
        assert_eq!(report.quarantined_ranges, 0, "{ctx}: {report:?}");
        assert_eq!(report.quarantined_records, 0, "{ctx}: {report:?}");
        assert!(report.cursors_reset.is_empty(), "{ctx}: {report:?}");
        truncated_total += report.truncated_bytes;

        let cursor = format!("check-{trial}");
        let records = read_everything(&q, &cursor);
        let mut by_seq: HashMap<u64, String> = HashMap::with_capacity(records.len());
        let mut last_seq = 0;
        // Per device and run, the appender's counter only goes up.
        let mut last_n: HashMap<(String, String), u64> = HashMap::new();
        for r in &records {
            assert!(r.seq > last_seq, "{ctx}: seq {} after {last_seq}", r.seq);
            last_seq = r.seq;
            let id = String::from_utf8(r.payload.clone()).unwrap();
            let mut parts = id.splitn(3, '-');
            let (run, task, n) = (
                parts.next().unwrap().to_string(),
                parts.next().unwrap().to_string(),
                parts.next().unwrap().parse::<u64>().unwrap(),
            );
            assert_eq!(r.device_id, format!("dev-{task}"), "{ctx}");
            if let Some(prev) = last_n.insert((run.clone(), task.clone()), n) {
                assert!(n > prev, "{ctx}: {id} after {run}-{task}-{prev}");
            }
            assert!(
                by_seq.insert(r.seq, id).is_none(),
                "{ctx}: seq {} read twice",
                r.seq
            );
        }
        let ids: std::collections::HashSet<&String> = by_seq.values().collect();
        assert_eq!(
            ids.len(),
            by_seq.len(),
            "{ctx}: a record is in the queue twice"
        );
        for (seq, id) in &reported {
            match by_seq.get(seq) {
                Some(found) => assert_eq!(found, id, "{ctx}: seq {seq}"),
                None => panic!("{ctx}: record {id} (seq {seq}) was reported durable but is gone"),
            }
        }
        eprintln!(
            "{ctx}: {} reported, {} in the queue, {} bytes of torn tail cut",
            now.len(),
            records.len(),
            report.truncated_bytes
        );
        q.remove_cursor(&cursor).unwrap();
        q.close();
        drop(q);
    }
    assert!(
        reported.len() as u32 >= trials,
        "the appender reported only {} records in {trials} trials",
        reported.len()
    );
    eprintln!(
        "{crash}, {trials} trials: {} records reported durable, all present; {truncated_total} bytes of torn tails cut",
        reported.len()
    );
}
