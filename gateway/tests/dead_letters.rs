//! The dead-letter store and `gateway queue dead-letters [--replay]`.
#![allow(clippy::unwrap_used)]

use gateway::forwarder::DeadLetters;
use gateway::queue::{NewRecord, Queue, QueueOptions};

fn gateway_cmd(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test]
async fn dead_letters_are_listed_with_their_reason_and_replay_puts_them_back_in_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let o = QueueOptions::new(&data);
    {
        let (q, _) = Queue::open(o.clone()).unwrap();
        let dead = DeadLetters::open(&o).unwrap();
        let props = vec![("unit".to_string(), "C".to_string())];
        for (i, reason) in [
            "returned by the broker: 312 NO_ROUTE",
            "payload is not valid CBOR",
        ]
        .iter()
        .enumerate()
        {
            let payload = format!("p{i}");
            let mut r = NewRecord::new("dev-1", "devices/dev-1/t", payload.as_bytes());
            r.user_properties = &props;
            let seq = q.append(&r).await.unwrap();
            let mut reader = q.reader("x").unwrap();
            let rec = reader
                .read_now(100, usize::MAX)
                .unwrap()
                .into_iter()
                .find(|r| r.seq == seq)
                .unwrap();
            dead.put(&rec, "rmq", reason).await.unwrap();
        }
        assert_eq!(dead.count(), 2);
        q.remove_cursor("x").unwrap();
        dead.close();
        q.close();
    }
    let d = data.to_str().unwrap();
    let (ok, out) = gateway_cmd(&["queue", "dead-letters", "--data-dir", d]);
    assert!(ok, "{out}");
    assert!(out.contains("312 NO_ROUTE"), "{out}");
    assert!(out.contains("payload is not valid CBOR"), "{out}");
    assert!(out.contains("rmq"), "{out}");

    let (ok, out) = gateway_cmd(&["queue", "dead-letters", "--data-dir", d, "--replay"]);
    assert!(ok, "{out}");
    assert!(out.contains("replayed 2"), "{out}");
    let (ok, out) = gateway_cmd(&["queue", "dead-letters", "--data-dir", d]);
    assert!(ok && out.contains("no dead letters"), "{out}");

    // Back in the queue, without the dead-letter annotations, user properties kept.
    let (q, _) = Queue::open(o).unwrap();
    let mut r = q.reader("check").unwrap();
    let all = r.read_now(100, usize::MAX).unwrap();
    let replayed: Vec<_> = all.iter().rev().take(2).collect();
    for rec in replayed {
        assert!(rec.payload.starts_with(b"p"));
        assert_eq!(
            rec.user_properties,
            vec![("unit".to_string(), "C".to_string())]
        );
    }
    q.close();
}
