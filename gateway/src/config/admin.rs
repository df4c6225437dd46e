//! The operator's side: `[admin]` (metrics, health, status page, reload).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::{quoted, Problem};

/// Default for `admin.listen`: loopback only. Metrics and the status page carry no secrets, but
/// the reload endpoint must not be reachable from the network; expose metrics further with a
/// reverse proxy or by choosing another address (which then takes a token, see
/// [`AdminConfig::token_file`]).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9100";

/// The shortest admin token accepted. The endpoint does not slow down wrong guesses, so the
/// token's length is what keeps guessing out of reach: 16 random characters or more
/// (`openssl rand -hex 32` gives 64).
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// `[admin]`: the HTTP endpoint for `/metrics`, `/healthz`, `/readyz`, the status page at `/`
/// and `POST /reload` (accepted from loopback peers only).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Serve the admin endpoint at all.
    pub enabled: bool,
    /// `host:port` to listen on. Anything but a loopback address needs a token.
    pub listen: String,
    /// A file that holds the bearer token (surrounding whitespace and the final newline are
    /// ignored). With a token every request but `GET /healthz` must carry it.
    pub token_file: Option<PathBuf>,
    /// The name of an environment variable that holds the bearer token (for systemd's
    /// `LoadCredential`/`Environment=` or a container's secrets). Set this or `token_file`,
    /// not both.
    pub token_env: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            listen: DEFAULT_ADMIN_LISTEN.into(),
            token_file: None,
            token_env: None,
        }
    }
}

/// The admin endpoint's bearer token, read at start. Its `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// Wraps a token (for tests and tools that build one in code).
    pub fn new(token: impl Into<String>) -> AdminToken {
        AdminToken(token.into())
    }

    /// The token itself, for a client that must send it (`gateway reload`).
    pub fn secret(&self) -> &str {
        &self.0
    }

    /// Whether `candidate` is the token, in time that depends on `candidate`'s length only,
    /// never on where the first differing byte is.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        let token = self.0.as_bytes();
        let mut diff = u8::from(token.len() != candidate.len());
        for (i, c) in candidate.iter().enumerate() {
            diff |= c ^ token.get(i).copied().unwrap_or(!*c);
        }
        diff == 0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// Whether `addr` takes connections from this host only (127.0.0.0/8, ::1, ::ffff:127.x.y.z).
fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
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

    /// Reads the token that `token_file` or `token_env` names; `None` when neither is set.
    /// The gateway calls this once, at start (a reload does not re-read it). Errors name the key
    /// and never show the token.
    pub fn token(&self) -> Result<Option<AdminToken>, Problem> {
        let (key, value, text) = if let Some(path) = &self.token_file {
            let value = quoted(&path.display().to_string());
            match std::fs::read_to_string(path) {
                Ok(text) => ("admin.token_file", value, text),
                Err(e) => {
                    return Err(Problem {
                        key: "admin.token_file".into(),
                        value,
                        reason: format!("cannot read it ({e}); check the path and that the gateway's user may read it"),
                    })
                }
            }
        } else if let Some(name) = &self.token_env {
            let value = quoted(name);
            match std::env::var(name) {
                Ok(text) => ("admin.token_env", value, text),
                Err(std::env::VarError::NotPresent) => {
                    return Err(Problem {
                        key: "admin.token_env".into(),
                        value,
                        reason: "no such variable in the gateway's environment; set it (e.g. systemd's Environment= or EnvironmentFile=) or use admin.token_file".into(),
                    })
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err(Problem {
                        key: "admin.token_env".into(),
                        value,
                        reason: "the variable is not valid UTF-8; use printable ASCII, e.g. from `openssl rand -hex 32`".into(),
                    })
                }
            }
        } else {
            return Ok(None);
        };
        let token = text.trim();
        let problem = |reason: String| Problem {
            key: key.into(),
            value: value.clone(),
            reason,
        };
        if token.is_empty() {
            return Err(problem(
                "the token is empty; put a random token there, e.g. from `openssl rand -hex 32`"
                    .into(),
            ));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(problem("the token has spaces or characters that an HTTP header cannot carry; use printable ASCII, e.g. from `openssl rand -hex 32`".into()));
        }
        if token.len() < MIN_ADMIN_TOKEN_LEN {
            return Err(problem(format!("the token is shorter than {MIN_ADMIN_TOKEN_LEN} characters, which makes it guessable; use e.g. `openssl rand -hex 32`")));
        }
        Ok(Some(AdminToken(token.to_string())))
    }

    pub(super) fn check(&self, problems: &mut Vec<Problem>) {
        if let Some(name) = &self.token_env {
            if self.token_file.is_some() {
                problems.push(Problem {
                    key: "admin.token_env".into(),
                    value: quoted(name),
                    reason: "admin.token_file is set too; set only one of them".into(),
                });
            } else if name.is_empty() || name.contains('=') || name.contains('\0') {
                problems.push(Problem {
                    key: "admin.token_env".into(),
                    value: quoted(name),
                    reason: "not an environment variable name; write the variable's name, e.g. \"GATEWAY_ADMIN_TOKEN\"".into(),
                });
            }
        }
        if self
            .token_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            problems.push(Problem {
                key: "admin.token_file".into(),
                value: quoted(""),
                reason: "empty path; name the file that holds the token".into(),
            });
        }
        if !self.enabled {
            return;
        }
        match self.listen.parse::<SocketAddr>() {
            Err(_) => problems.push(Problem {
                key: "admin.listen".into(),
                value: quoted(&self.listen),
                reason: "not an IP address and port; write it like \"127.0.0.1:9100\" (or set admin.enabled = false)".into(),
            }),
            Ok(addr) if !is_loopback(&addr) && self.token_file.is_none() && self.token_env.is_none() => {
                problems.push(Problem {
                    key: "admin.listen".into(),
                    value: quoted(&self.listen),
                    reason: "not a loopback address, and no token guards the endpoint (metrics, status, reload); set admin.token_file or admin.token_env, or listen on 127.0.0.1".into(),
                })
            }
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison_needs_every_byte_and_the_length() {
        let t = AdminToken::new("0123456789abcdef");
        assert!(t.matches(b"0123456789abcdef"));
        assert!(!t.matches(b"0123456789abcdeF"));
        assert!(!t.matches(b"0123456789abcde"));
        assert!(!t.matches(b"0123456789abcdef0"));
        assert!(!t.matches(b""));
        assert_eq!(format!("{t:?}"), "AdminToken(<redacted>)");
    }

    #[test]
    fn loopback_needs_no_token_and_other_addresses_do() {
        for (listen, ok) in [
            ("127.0.0.1:9100", true),
            ("127.1.2.3:9100", true),
            ("[::1]:9100", true),
            ("[::ffff:127.0.0.1]:9100", true),
            ("0.0.0.0:9100", false),
            ("[::]:9100", false),
            ("10.0.0.5:9100", false),
        ] {
            let c = AdminConfig {
                listen: listen.into(),
                ..AdminConfig::default()
            };
            let mut problems = Vec::new();
            c.check(&mut problems);
            assert_eq!(problems.is_empty(), ok, "{listen}: {problems:?}");
        }
    }
}
