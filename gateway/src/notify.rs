//! systemd's service notification protocol (`sd_notify(3)`), without libsystemd.
//!
//! Under a unit with `Type=notify`, systemd passes the path of a datagram socket in
//! `NOTIFY_SOCKET` and waits for `READY=1` before it counts the service as started. With
//! `WatchdogSec=` it also sets `WATCHDOG_USEC` (and `WATCHDOG_PID`) and restarts the service when
//! no `WATCHDOG=1` arrives within that time.
//!
//! The protocol: one datagram per message, `KEY=value` lines separated by `\n`. The address is a
//! filesystem path, or an abstract socket name written with a leading `@` (Linux only).
//!
//! Every function here is a no-op when `NOTIFY_SOCKET` is unset (not started by systemd), and
//! none of them can fail the gateway: a send error is logged (the first as a warning, later ones
//! at debug, so a broken socket does not flood the log every watchdog tick) and dropped.
//! The environment is read on each call; the calls are rare (start, stop, reload, and a
//! watchdog tick every few seconds).

use std::ffi::{OsStr, OsString};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The variable in which systemd passes the notification socket's address.
const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// The watchdog timeout in microseconds, set by systemd with `WatchdogSec=`.
const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
/// The process the watchdog timeout is meant for; unset means "the main process".
const WATCHDOG_PID: &str = "WATCHDOG_PID";

/// Whether a send error has been logged as a warning already.
static WARNED: AtomicBool = AtomicBool::new(false);

/// Why a notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `NOTIFY_SOCKET` is set but empty, or is `@` alone.
    #[error("NOTIFY_SOCKET is empty")]
    EmptyAddress,
    /// The address is of a kind this build cannot reach: an abstract socket (`@name`) outside
    /// Linux.
    #[error("NOTIFY_SOCKET {addr:?}: abstract socket addresses are only supported on Linux")]
    Unsupported { addr: OsString },
    /// Creating the socket or sending failed: no such socket, permission denied, or the
    /// receiver's queue is full.
    #[error("NOTIFY_SOCKET {addr:?}: {source}")]
    Io {
        addr: OsString,
        #[source]
        source: std::io::Error,
    },
    /// The datagram went out shorter than the message (systemd would read a cut-off message).
    #[error("NOTIFY_SOCKET {addr:?}: sent {sent} of {len} bytes")]
    Truncated {
        addr: OsString,
        sent: usize,
        len: usize,
    },
}

/// Tells systemd that start-up is complete (listeners bound, queue open), with a one-line
/// status for `systemctl status`. Also ends a reload begun with [`reloading`].
pub fn ready(status: &str) {
    notify(&ready_message(status));
}

/// Tells systemd that the gateway is shutting down (so a slow drain is not taken for a hang).
pub fn stopping() {
    notify("STOPPING=1");
}

/// Sets the one-line status that `systemctl status` shows.
pub fn status(s: &str) {
    notify(&status_message(s));
}

/// Tells systemd that a configuration reload has begun; send [`ready`] when it is done.
///
/// Without `MONOTONIC_USEC`: std does not expose `CLOCK_MONOTONIC`'s value (and reading it
/// ourselves would take `unsafe` or a crate). systemd accepts `RELOADING=1` alone with the
/// shipped `Type=notify` unit; `Type=notify-reload` (systemd 253+) would want the timestamp.
pub fn reloading() {
    notify(&reloading_message(None))
}

/// Keeps systemd's watchdog from restarting the gateway; call it every [`watchdog_interval`].
pub fn watchdog() {
    notify("WATCHDOG=1");
}

/// How often to call [`watchdog`]: half the unit's `WatchdogSec=` (as `sd_watchdog_enabled(3)`
/// advises), or `None` when there is no watchdog for this process: no `NOTIFY_SOCKET` to send to,
/// no or a malformed `WATCHDOG_USEC`, or a `WATCHDOG_PID` that is another process's.
pub fn watchdog_interval() -> Option<Duration> {
    std::env::var_os(NOTIFY_SOCKET)?;
    let usec = std::env::var(WATCHDOG_USEC).ok();
    let pid = std::env::var(WATCHDOG_PID).ok();
    watchdog_interval_from(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// [`watchdog_interval`] on given values of `WATCHDOG_USEC` and `WATCHDOG_PID`.
fn watchdog_interval_from(usec: Option<&str>, pid: Option<&str>, our_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(our_pid) {
            tracing::debug!(
                watchdog_pid = pid,
                "WATCHDOG_PID is not this process: no systemd watchdog"
            );
            return None;
        }
    }
    let usec = usec?;
    match usec.trim().parse::<u64>() {
        Ok(us) if us > 0 => Some(Duration::from_micros(us / 2)),
        _ => {
            tracing::warn!(
                watchdog_usec = usec,
                "WATCHDOG_USEC is not a positive number of microseconds: no systemd watchdog"
            );
            None
        }
    }
}

fn ready_message(status: &str) -> String {
    format!("READY=1\n{}", status_message(status))
}

/// `STATUS=` with the text on one line: a newline would start another field, so a status text
/// could otherwise send `READY=1` or `STOPPING=1`.
fn status_message(s: &str) -> String {
    let line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    format!("STATUS={line}")
}

fn reloading_message(monotonic_usec: Option<u64>) -> String {
    match monotonic_usec {
        Some(us) => format!("RELOADING=1\nMONOTONIC_USEC={us}"),
        None => "RELOADING=1".to_owned(),
    }
}

/// Sends `msg` to `NOTIFY_SOCKET` if it is set; logs and drops any error.
fn notify(msg: &str) {
    let Some(addr) = std::env::var_os(NOTIFY_SOCKET) else {
        return;
    };
    if let Err(error) = send_to(&addr, msg) {
        let first_line = msg.lines().next().unwrap_or_default();
        if WARNED.swap(true, Ordering::Relaxed) {
            tracing::debug!(%error, message = first_line, "systemd notification not sent");
        } else {
            tracing::warn!(
                %error,
                message = first_line,
                "systemd notification not sent (further failures are logged at debug level)"
            );
        }
    }
}

/// Sends `msg` as one datagram to the notification socket at `addr`: a path, or `@name` for an
/// abstract socket.
fn send_to(addr: &OsStr, msg: &str) -> Result<(), NotifyError> {
    use std::os::unix::ffi::OsStrExt;

    let bytes = addr.as_bytes();
    if bytes.is_empty() || bytes == b"@" {
        return Err(NotifyError::EmptyAddress);
    }
    let io = |source| NotifyError::Io {
        addr: addr.to_owned(),
        source,
    };
    let socket = UnixDatagram::unbound().map_err(io)?;
    let sent = match bytes.strip_prefix(b"@") {
        Some(name) => send_abstract(&socket, name, msg.as_bytes(), addr)?,
        None => socket.send_to(msg.as_bytes(), addr).map_err(io)?,
    };
    if sent != msg.len() {
        return Err(NotifyError::Truncated {
            addr: addr.to_owned(),
            sent,
            len: msg.len(),
        });
    }
    Ok(())
}

#[cfg(target_os = "linux")]
fn send_abstract(
    socket: &UnixDatagram,
    name: &[u8],
    msg: &[u8],
    addr: &OsStr,
) -> Result<usize, NotifyError> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::SocketAddr;

    let io = |source| NotifyError::Io {
        addr: addr.to_owned(),
        source,
    };
    let target = SocketAddr::from_abstract_name(name).map_err(io)?;
    socket.send_to_addr(msg, &target).map_err(io)
}

#[cfg(not(target_os = "linux"))]
fn send_abstract(
    _socket: &UnixDatagram,
    _name: &[u8],
    _msg: &[u8],
    addr: &OsStr,
) -> Result<usize, NotifyError> {
    Err(NotifyError::Unsupported {
        addr: addr.to_owned(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A datagram socket bound in a fresh temporary directory, as systemd would bind one.
    fn receiver() -> (tempfile::TempDir, std::path::PathBuf, UnixDatagram) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        (dir, path, socket)
    }

    fn recv(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn a_message_arrives_as_one_datagram_at_a_socket_path() {
        let (_dir, path, socket) = receiver();
        let msg = ready_message("listening on 127.0.0.1:8883");
        send_to(path.as_os_str(), &msg).unwrap();
        assert_eq!(recv(&socket), "READY=1\nSTATUS=listening on 127.0.0.1:8883");
        send_to(path.as_os_str(), "WATCHDOG=1").unwrap();
        assert_eq!(recv(&socket), "WATCHDOG=1");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn an_at_sign_address_reaches_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::SocketAddr;

        let name = format!("gateway-notify-test-{}", std::process::id());
        let socket =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        send_to(OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        assert_eq!(recv(&socket), "STOPPING=1");
    }

    #[test]
    fn a_missing_socket_is_an_error_naming_the_address() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nobody-listens.sock");
        let err = send_to(path.as_os_str(), "READY=1").unwrap_err();
        assert!(matches!(err, NotifyError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("nobody-listens.sock"), "{err}");
    }

    #[test]
    fn an_empty_address_is_an_error() {
        for addr in ["", "@"] {
            let err = send_to(OsStr::new(addr), "READY=1").unwrap_err();
            assert!(
                matches!(err, NotifyError::EmptyAddress),
                "{addr:?}: {err:?}"
            );
        }
    }

    #[test]
    fn a_status_with_newlines_cannot_add_fields() {
        assert_eq!(
            ready_message("ok\nSTOPPING=1\r\n"),
            "READY=1\nSTATUS=ok STOPPING=1  "
        );
        assert_eq!(status_message("queue 3% full"), "STATUS=queue 3% full");
    }

    #[test]
    fn reloading_carries_the_monotonic_time_when_known() {
        assert_eq!(
            reloading_message(Some(123_456)),
            "RELOADING=1\nMONOTONIC_USEC=123456"
        );
        assert_eq!(reloading_message(None), "RELOADING=1");
    }

    #[test]
    fn watchdog_interval_is_half_the_timeout_for_this_process() {
        let half = Some(Duration::from_secs(15));
        assert_eq!(watchdog_interval_from(Some("30000000"), None, 42), half);
        assert_eq!(
            watchdog_interval_from(Some("30000000"), Some("42"), 42),
            half
        );
        assert_eq!(
            watchdog_interval_from(Some("30000000"), Some("41"), 42),
            None
        );
        assert_eq!(
            watchdog_interval_from(Some("30000000"), Some("x"), 42),
            None
        );
        assert_eq!(watchdog_interval_from(None, None, 42), None);
        assert_eq!(watchdog_interval_from(Some("0"), None, 42), None);
        assert_eq!(watchdog_interval_from(Some("-5"), None, 42), None);
        assert_eq!(watchdog_interval_from(Some("30s"), None, 42), None);
    }
}
