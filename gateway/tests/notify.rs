//! The real `gateway run` under a simulated systemd: `NOTIFY_SOCKET` points at a datagram socket
//! this test bound, with a 2 s watchdog, and the test checks READY, WATCHDOG and STOPPING.
#![allow(clippy::unwrap_used)]

use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A child process that is killed (and reaped) when the test ends, however it ends.
struct Gateway {
    child: Child,
    log: std::path::PathBuf,
}

impl Gateway {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_config(dir: &Path, port: u16) -> std::path::PathBuf {
    let path = dir.join("gateway.toml");
    let config = format!(
        r#"
[queue]
data_dir = {data:?}
segment_bytes = "1 MiB"
max_bytes = "16 MiB"

# Plaintext, said explicitly: this test is about the service manager, not TLS.
[[listeners]]
bind = "127.0.0.1:{port}"
tls = false

[admin]
enabled = false
"#,
        data = dir.join("data").display().to_string(),
    );
    std::fs::write(&path, config).unwrap();
    path
}

/// Receives datagrams until one has the line `line`, or panics after `timeout` (or when the
/// gateway exits first). Returns that datagram and all received before it.
fn wait_for(
    socket: &UnixDatagram,
    gateway: &mut Gateway,
    line: &str,
    timeout: Duration,
) -> (String, Vec<String>) {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let mut exited = None;
    loop {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg.lines().any(|l| l == line) {
                    return (msg, seen);
                }
                seen.push(msg);
                continue;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("recv on the notify socket: {e}"),
        }
        // Nothing queued. A gateway that has exited sends nothing more, but what it sent before
        // exiting is read first (one more round after noticing the exit).
        if let Some(status) = exited {
            panic!(
                "gateway exited ({status}) before sending {line:?}; received {seen:?}; log:\n{}",
                gateway.log()
            );
        }
        exited = gateway.child.try_wait().unwrap();
        if exited.is_none() && Instant::now() >= deadline {
            panic!(
                "no {line:?} within {timeout:?}; received {seen:?}; gateway log:\n{}",
                gateway.log()
            );
        }
    }
}

#[test]
fn gateway_reports_ready_watchdog_and_stopping_to_systemd() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port);
    let log = dir.path().join("gateway.log");

    let child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["run", "--config"])
        .arg(&config)
        .current_dir(dir.path())
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "2000000")
        // systemd sets WATCHDOG_PID to the main pid, which is unknown before the spawn; unset
        // means "the main process" too.
        .env_remove("WATCHDOG_PID")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut gateway = Gateway { child, log };

    // READY=1 only once devices can connect (a debug build opens the queue in well under 30 s).
    let (ready, before) = wait_for(&socket, &mut gateway, "READY=1", Duration::from_secs(30));
    assert!(
        !before.iter().any(|m| m.contains("STOPPING=1")),
        "{before:?}"
    );
    TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| {
        panic!("READY=1 ({ready:?}) was sent but 127.0.0.1:{port} does not accept: {e}")
    });

    // WATCHDOG_USEC=2 s: a ping every second. Two show that they repeat (the first may come
    // right away); 6 s for both leaves room for a loaded machine.
    let start = Instant::now();
    wait_for(&socket, &mut gateway, "WATCHDOG=1", Duration::from_secs(6));
    let left = Duration::from_secs(6).saturating_sub(start.elapsed());
    wait_for(&socket, &mut gateway, "WATCHDOG=1", left);

    let status = Command::new("kill")
        .args(["-TERM", &gateway.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -TERM failed: {status}");
    wait_for(&socket, &mut gateway, "STOPPING=1", Duration::from_secs(10));
    let status = gateway
        .wait_timeout(Duration::from_secs(30))
        .unwrap_or_else(|| {
            panic!(
                "gateway still running 30 s after SIGTERM:\n{}",
                gateway.log()
            )
        });
    assert_eq!(status.code(), Some(0), "log:\n{}", gateway.log());
}
