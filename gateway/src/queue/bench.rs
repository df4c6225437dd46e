//! `gateway queue bench`: how fast this box's disk takes durable appends.
//!
//! `appenders` concurrent tasks stand for device connections; each keeps `inflight` appends
//! outstanding (as a device with that many unacknowledged publishes does) by running that many
//! append loops. Every append is timed from the call to the moment it is durable.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{FsyncPolicy, FullPolicy, NewRecord, Queue, QueueError, QueueOptions};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The bench writes into a fresh subdirectory of this and removes it afterwards.
    pub data_dir: PathBuf,
    pub payload_bytes: usize,
    pub appenders: usize,
    pub inflight: usize,
    pub fsync: FsyncPolicy,
    pub duration: Duration,
    pub segment_bytes: u64,
    /// Pre-write segments with zeros (`[queue] preallocate`).
    pub preallocate: bool,
    /// Leave the written queue in place (to try `queue stats`, `verify`, or a reopen on it).
    pub keep: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub records: u64,
    pub seconds: f64,
    pub records_per_s: f64,
    pub mib_per_s: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub disk_bytes_per_record: f64,
    /// Bytes this process made the disk write per record, while appending and closing: records,
    /// preallocated zeros, sidecars, cursor and `seq.reserved` writes, and whole pages written
    /// again when a later batch adds to a page already synced (`write_bytes` of
    /// `/proc/self/io`). `None` where the kernel does not count it.
    pub device_bytes_per_record: Option<f64>,
    /// The total behind `device_bytes_per_record`.
    pub device_bytes: Option<u64>,
    pub preallocate: bool,
    pub payload_bytes: usize,
    pub topic_bytes: usize,
    pub fsyncs: u64,
    pub records_per_fsync: f64,
    pub mean_fsync_us: u64,
    pub max_fsync_us: u64,
    /// Time to reopen (recover) the backlog the bench wrote, and its size.
    pub reopen_ms: f64,
    pub backlog_records: u64,
    pub backlog_bytes: u64,
    /// Resident memory of the process right after that reopen.
    pub rss_kib_after_reopen: u64,
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// `write_bytes` of `/proc/self/io`: bytes this process (all its threads) caused to be sent to
/// the storage layer, counted when a page becomes dirty. `None` without task I/O accounting.
fn device_write_bytes() -> Option<u64> {
    std::fs::read_to_string("/proc/self/io").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("write_bytes:"))
            .and_then(|v| v.trim().parse().ok())
    })
}

pub async fn run(o: BenchOptions) -> Result<BenchReport, QueueError> {
    let dir = o
        .data_dir
        .join(format!("queue-bench-{}", std::process::id()));
    let mut qo = QueueOptions::new(&dir);
    qo.max_bytes = u64::MAX / 4;
    qo.segment_bytes = o.segment_bytes;
    qo.fsync = o.fsync;
    qo.full_policy = FullPolicy::Backpressure;
    qo.preallocate = o.preallocate;
    let open_dir = qo.clone();
    let written_before = device_write_bytes();
    let (q, _) = tokio::task::spawn_blocking(move || Queue::open(open_dir))
        .await
        .map_err(|_| QueueError::Closed)??;
    let payload: Arc<Vec<u8>> = Arc::new((0..o.payload_bytes).map(|i| i as u8).collect());
    let topic_len = "bench/0000/t".len();
    let start = Instant::now();
    let deadline = start + o.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for a in 0..o.appenders {
        let device = Arc::new(format!("bench-{a:04}"));
        let topic = Arc::new(format!("bench/{:04}/t", a % 10_000));
        for _ in 0..o.inflight.max(1) {
            let (q, device, topic, payload) =
                (q.clone(), device.clone(), topic.clone(), payload.clone());
            tasks.spawn(async move {
                let mut lat = Vec::with_capacity(4096);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let r = NewRecord::new(&device, &topic, &payload);
                    q.append(&r).await?;
                    lat.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                }
                Ok::<Vec<u32>, QueueError>(lat)
            });
        }
    }
    let mut lat: Vec<u32> = Vec::new();
    let mut first_err = None;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(l)) => lat.extend(l),
            Ok(Err(e)) => first_err = first_err.or(Some(e)),
            Err(_) => first_err = first_err.or(Some(QueueError::Closed)),
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let stats = q.stats();
    tokio::task::spawn_blocking(move || q.close())
        .await
        .map_err(|_| QueueError::Closed)?;
    // Everything is synced by now (close syncs), so nothing is still waiting to be counted.
    let device_bytes = match (written_before, device_write_bytes()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    // How long recovery takes on the backlog just written (an operator's restart time).
    let reopen_opts = qo.clone();
    let (reopen_ms, backlog_records, rss_kib) = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        let (q, report) = Queue::open(reopen_opts)?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        let rss = rss_kib();
        q.close();
        Ok::<_, QueueError>((ms, report.records, rss))
    })
    .await
    .map_err(|_| QueueError::Closed)??;
    let disk: u64 = std::fs::read_dir(dir.join("segments"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.ends_with(".seg") && !n.starts_with('.')
                })
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    if o.keep {
        tracing::info!(dir = %dir.display(), "bench queue kept");
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    lat.sort_unstable();
    let pct = |p: f64| -> u64 {
        if lat.is_empty() {
            return 0;
        }
        let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
        u64::from(lat[i.min(lat.len() - 1)])
    };
    let records = lat.len() as u64;
    Ok(BenchReport {
        records,
        seconds,
        records_per_s: records as f64 / seconds,
        mib_per_s: (records as f64 * o.payload_bytes as f64) / seconds / (1024.0 * 1024.0),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        max_us: lat.last().copied().map_or(0, u64::from),
        disk_bytes_per_record: if records == 0 {
            0.0
        } else {
            disk as f64 / records as f64
        },
        device_bytes_per_record: device_bytes
            .filter(|_| records > 0)
            .map(|b| b as f64 / records as f64),
        device_bytes,
        preallocate: o.preallocate,
        payload_bytes: o.payload_bytes,
        topic_bytes: topic_len,
        fsyncs: stats.fsyncs,
        records_per_fsync: if stats.fsyncs == 0 {
            0.0
        } else {
            records as f64 / stats.fsyncs as f64
        },
        mean_fsync_us: stats.fsync_us_total.checked_div(stats.fsyncs).unwrap_or(0),
        max_fsync_us: stats.fsync_us_max,
        reopen_ms,
        backlog_records,
        backlog_bytes: disk,
        rss_kib_after_reopen: rss_kib,
    })
}
