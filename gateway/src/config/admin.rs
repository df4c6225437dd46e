//! The operator's side: `[admin]` (metrics, health, status page, reload).

use std::net::SocketAddr;

use serde::Deserialize;

use super::{quoted, Problem};

/// Default for `admin.listen`: loopback only. Metrics and the status page carry no secrets, but
/// the reload endpoint must not be reachable from the network; expose metrics further with a
/// reverse proxy or by choosing another address.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9100";

/// `[admin]`: the HTTP endpoint for `/metrics`, `/healthz`, `/readyz`, the status page at `/`
/// and `POST /reload` (accepted from loopback peers only).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Serve the admin endpoint at all.
    pub enabled: bool,
    /// `host:port` to listen on.
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            listen: DEFAULT_ADMIN_LISTEN.into(),
        }
    }
}

impl AdminConfig {
    /// The parsed `listen` address (validation guarantees it parses when `enabled`).
    pub fn addr(&self) -> Option<SocketAddr> {
        if self.enabled {
            self.listen.parse().ok()
        } else {
            None
        }
    }

    pub(super) fn check(&self, problems: &mut Vec<Problem>) {
        if self.enabled && self.listen.parse::<SocketAddr>().is_err() {
            problems.push(Problem {
                key: "admin.listen".into(),
                value: quoted(&self.listen),
                reason: "not an IP address and port; write it like \"127.0.0.1:9100\" (or set admin.enabled = false)".into(),
            });
        }
    }
}
