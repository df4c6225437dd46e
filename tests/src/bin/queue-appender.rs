//! Appends to a queue as fast as it can from many tasks, forever, and prints `<seq> <id>` for each
//! record once its append resolved (the record is durable). The crash test kills it with SIGKILL
//! at a random moment and checks that every record it printed survived.
//!
//! Usage: `queue-appender <data_dir> <run-id>`. Record payloads are `<run-id>-<task>-<n>`, from
//! device `dev-<task>`.

use std::io::Write;

use anyhow::Context;
use gateway::queue::{FsyncPolicy, FullPolicy, NewRecord, Queue, QueueOptions};

const APPENDERS: usize = 16;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .context("usage: queue-appender <data_dir> <run-id>")?;
    let run = args.next().unwrap_or_else(|| "0".to_string());
    let mut opts = QueueOptions::new(&dir);
    opts.fsync = FsyncPolicy::Always;
    opts.full_policy = FullPolicy::Backpressure;
    opts.segment_bytes = 1 << 20;
    opts.max_bytes = 1 << 30;
    let (queue, report) = Queue::open(opts).with_context(|| format!("open the queue in {dir}"))?;
    eprintln!("queue-appender {run}: opened {dir}: {report:?}");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the runtime")?;
    rt.block_on(async move {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        for task in 0..APPENDERS {
            let queue = queue.clone();
            let tx = tx.clone();
            let run = run.clone();
            tokio::spawn(async move {
                let device = format!("dev-{task}");
                for n in 0u64.. {
                    let id = format!("{run}-{task}-{n}");
                    let record = NewRecord::new(&device, "crash/test", id.as_bytes());
                    match queue.append(&record).await {
                        // Only now is the record durable, and only now may it be reported.
                        Ok(seq) => {
                            if tx.send(format!("{seq} {id}\n")).is_err() {
                                return;
                            }
                        }
                        Err(error) => {
                            eprintln!("queue-appender {run}: append failed: {error}");
                            std::process::exit(2);
                        }
                    }
                }
            });
        }
        drop(tx);
        let mut out = std::io::stdout().lock();
        let mut chunk = String::new();
        while let Some(line) = rx.recv().await {
            chunk.push_str(&line);
            while let Ok(more) = rx.try_recv() {
                chunk.push_str(&more);
            }
            out.write_all(chunk.as_bytes()).context("write stdout")?;
            out.flush().context("flush stdout")?;
            chunk.clear();
        }
        Ok(())
    })
}
