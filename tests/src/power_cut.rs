//! The power-cut rig (issue 17): the real gateway with its `data_dir` on the power-cut file
//! system (`powercut-fs`), cut at moments the test picks and restarted on what is left.
//!
//! ```text
//! devices --mTLS--> gateway --data_dir--> <mount>/data   powercut-fs: live | durable --> backing/
//!                      |                                  cut = SIGKILL + reap + drop what is pending
//!                      +--uplink--> RabbitMQ
//! ```
//!
//! The rig knows nothing of what the gateway stores: a test brings the load that gets
//! acknowledgements (PUBACKs, confirms) and a check of what each cut left under `data_dir`, run
//! by [`PowerCutRig::trials`] after every cut, before the next start. `tests/power_cut.rs` checks
//! the queue and the uplink's cursor; the session and retained-message storage would add a check
//! of its own folder (and subscribers to its load), nothing here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use powercut_fs::{Cut, CutReport, TempMount};

use crate::faults::{Gateway, GatewaySpec, Rng};

/// What the cuts of a run threw away, added up.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CutTotals {
    pub cuts: u64,
    /// Cuts where the power failed at a chosen change ([`PowerCutRig::cut_after_changes`]).
    pub at_change: u64,
    /// Cuts that kept part of one file's pending writes.
    pub torn: u64,
    /// Pending changes to file bytes lost (writes, truncates, fallocates), and their bytes.
    pub ops: u64,
    pub bytes: u64,
    /// Directories whose unsynced entries (creates, renames, unlinks) were lost.
    pub dirs: u64,
    /// The file each torn cut tore.
    pub torn_files: Vec<PathBuf>,
}

/// How long a trial waits for the gateway to make the changes after which the power fails
/// (under load it makes hundreds a second).
const CHANGE_WAIT: Duration = Duration::from_secs(10);

/// The gateway on a power-cut file system. Dropping it kills the gateway, then unmounts.
pub struct PowerCutRig {
    /// Declared first: dropped (killed) before the file system it uses is unmounted.
    pub gw: Gateway,
    mount: TempMount,
    pub totals: CutTotals,
}

impl PowerCutRig {
    /// Mounts the file system and writes the gateway's config with `data_dir` on it (the
    /// gateway is not started). Panics, saying why, where FUSE cannot be mounted.
    pub fn new(mut spec: GatewaySpec, test: &str) -> PowerCutRig {
        let mount = TempMount::for_test(test);
        // Below the mount's root, so that the gateway creates it (and has to make it durable).
        spec.data_dir = Some(mount.mnt().join("data"));
        let gw = Gateway::new(spec);
        PowerCutRig {
            gw,
            mount,
            totals: CutTotals::default(),
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.gw.data_dir
    }

    /// The power cut: SIGKILL the gateway, reap it, drop the pending layer. Then checks that
    /// the backing directory holds exactly the durable state.
    pub fn cut(&mut self, how: Cut) -> CutReport {
        self.gw.kill();
        let r = self.mount.fs.cut(how).expect("the power cut");
        if let Err(e) = self.mount.fs.check_backing() {
            panic!("after the cut the backing directory is not the durable state: {e}");
        }
        let t = &mut self.totals;
        t.cuts += 1;
        t.torn += u64::from(r.torn.is_some());
        t.torn_files.extend(r.torn.as_ref().map(|w| w.path.clone()));
        t.ops += r.ops as u64;
        t.bytes += r.bytes;
        t.dirs += r.dirs as u64;
        r
    }

    /// The power fails in the middle of what the gateway is doing: right after `changes` more
    /// changes to the file system (writes, syncs, creates, renames, ...; after that every change
    /// and sync fails with EIO). Waits for that (at most `wait`: an idle gateway may make fewer
    /// changes), then cuts as [`PowerCutRig::cut`]. Returns whether the failure came first.
    pub async fn cut_after_changes(
        &mut self,
        changes: u64,
        how: Cut,
        wait: Duration,
    ) -> (CutReport, bool) {
        self.mount.fs.fail_after(changes);
        let failed =
            crate::faults::wait_until(wait, "the power failure", || self.mount.fs.has_failed())
                .await
                .is_ok();
        self.totals.at_change += u64::from(failed);
        (self.cut(how), failed)
    }

    /// `n` power cuts, each followed by `check(data_dir, context)` on what it left (the gateway is
    /// dead then): every trial starts the gateway and cuts it, and the gateway is left stopped.
    ///
    /// - 1 trial in 10: during start-up (the queue's recovery, its new files, the uplink
    ///   opening), right after 1-60 changes to the file system;
    /// - of the others, half at a random moment 50-1000 ms after the gateway listens, half 50-1000
    ///   ms after it listens and then right after 1-200 more changes: in the middle of an
    ///   operation (between a write and its sync, a rename and the directory sync, a cursor slot
    ///   and its sync);
    /// - 1 cut in 3 torn ([`random_cut`]).
    pub async fn trials(
        &mut self,
        n: usize,
        rng: &mut Rng,
        mut check: impl AsyncFnMut(&Path, &str),
    ) {
        for trial in 0..n {
            let how = random_cut(rng);
            if trial % 10 == 9 {
                self.gw.spawn();
                let changes = rng.range(1, 60);
                self.cut_after_changes(changes, how, CHANGE_WAIT).await;
            } else {
                self.gw.start().await;
                tokio::time::sleep(rng.millis(50, 1000)).await;
                if trial % 2 == 0 {
                    let changes = rng.range(1, 200);
                    self.cut_after_changes(changes, how, CHANGE_WAIT).await;
                } else {
                    self.cut(how);
                }
            }
            let data_dir = self.gw.data_dir.clone();
            check(&data_dir, &format!("trial {trial}")).await;
        }
    }

    /// Stops the gateway (SIGTERM) if it runs, and unmounts.
    pub async fn finish(mut self) {
        self.gw.stop(Duration::from_secs(30)).await;
        let PowerCutRig { gw, mount, .. } = self;
        drop(gw);
        mount.unmount().expect("unmount the power-cut file system");
    }
}

/// A cut of either kind: one in three keeps a torn prefix of one file's pending writes.
pub fn random_cut(rng: &mut Rng) -> Cut {
    if rng.range(0, 3) == 0 {
        Cut::Torn {
            seed: rng.next_u64(),
        }
    } else {
        Cut::Drop
    }
}
