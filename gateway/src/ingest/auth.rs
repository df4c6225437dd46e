//! Who may connect (client certificates, a password file with argon2 hashes, or anonymous when
//! configured) and what they may publish to (ACL rules with `%c` / `%u`).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use rand::rngs::OsRng;

use super::codec::{reason, Connect};
use super::session::{Identity, IdentityKind, PublishAcl};
use crate::config::{AclRule, AuthConfig, CertIdentity};

/// Errors loading or changing the password file.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("could not read password file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("password file {path}, line {line}: {why}")]
    Parse {
        path: PathBuf,
        line: usize,
        why: String,
    },
    #[error("could not write password file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("user name {0:?} is not allowed: no ':' or whitespace, 1-128 characters")]
    BadUser(String),
    #[error("could not hash the password: {0}")]
    Hash(String),
}

/// Decides whether a CONNECT is allowed in, who it is, and whether it owns its client id.
///
/// Who owns which client ids:
/// - a certificate identity owns the id equal to it (with `client_id_must_match`, the CA
///   vouches for it; without, any id that no password user owns);
/// - a password user owns the ids that match `[auth] client_id` with `%u` = the username
///   (default `%u`: exactly the username). When two users' patterns match one id (`%u-*` with
///   users `site` and `site-b`, id `site-b-1`), the longer username owns it;
/// - an anonymous device owns any id that no password user owns. Certificate identities are
///   not listed anywhere, so an anonymous device is kept off them by session ownership only
///   (a live or stored session of a certificate device cannot be taken over; see
///   `Identity::owner`).
pub struct Authenticator {
    passwords: HashMap<String, String>,
    allow_anonymous: bool,
    client_id_must_match: bool,
    cert_identity: CertIdentity,
    /// `[auth] client_id`, split at `%u`: (before, after).
    client_id_pattern: (String, String),
}

fn parse_password_file(path: &Path) -> Result<HashMap<String, String>, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parse_err = |why: &str| AuthError::Parse {
            path: path.to_path_buf(),
            line: i + 1,
            why: why.to_string(),
        };
        let (user, hash) = line
            .split_once(':')
            .ok_or_else(|| parse_err("expected user:hash"))?;
        PasswordHash::new(hash)
            .map_err(|_| parse_err("not an argon2 hash (make one with `gateway passwd`)"))?;
        users.insert(user.to_string(), hash.to_string());
    }
    Ok(users)
}

/// A hash of nothing in particular, made (once) like `gateway passwd` makes them, to check an
/// unknown user's password against.
fn dummy_hash() -> Option<PasswordHash<'static>> {
    static DUMMY: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let text = DUMMY.get_or_init(|| {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(b"no such user", &salt)
            .ok()
            .map(|h| h.to_string())
    });
    text.as_deref().and_then(|t| PasswordHash::new(t).ok())
}

fn user_ok(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= 128
        && !user.contains(':')
        && !user.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Adds or changes `user` in the password file at `path` (created if missing), written atomically.
pub fn set_password(path: &Path, user: &str, password: &str) -> Result<(), AuthError> {
    if !user_ok(user) {
        return Err(AuthError::BadUser(user.to_string()));
    }
    let mut lines: Vec<String> = match std::fs::read_to_string(path) {
        Ok(t) => t.lines().map(str::to_string).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => {
            return Err(AuthError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let salt = SaltString::generate(&mut OsRng);
    let hash = Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| AuthError::Hash(e.to_string()))?
        .to_string();
    let entry = format!("{user}:{hash}");
    match lines
        .iter_mut()
        .find(|l| l.split_once(':').is_some_and(|(u, _)| u == user))
    {
        Some(l) => *l = entry,
        None => lines.push(entry),
    }
    let werr = |source| AuthError::Write {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp).map_err(werr)?;
        for l in &lines {
            writeln!(f, "{l}").map_err(werr)?;
        }
        f.sync_all().map_err(werr)?;
    }
    std::fs::rename(&tmp, path).map_err(werr)
}

impl Authenticator {
    pub fn new(cfg: &AuthConfig) -> Result<Authenticator, AuthError> {
        let passwords = match &cfg.password_file {
            Some(p) => parse_password_file(p)?,
            None => HashMap::new(),
        };
        let (before, after) = cfg
            .client_id
            .split_once("%u")
            .unwrap_or((cfg.client_id.as_str(), ""));
        Ok(Authenticator {
            passwords,
            allow_anonymous: cfg.allow_anonymous,
            client_id_must_match: cfg.client_id_must_match,
            cert_identity: cfg.cert_identity,
            client_id_pattern: (before.to_string(), after.to_string()),
        })
    }

    /// The password user who owns `client_id`, if any (the longest username whose pattern
    /// matches it). Costs one map lookup per character of the id, whatever the file's size.
    pub fn user_owning(&self, client_id: &str) -> Option<&str> {
        let (before, after) = &self.client_id_pattern;
        let rest = client_id.strip_prefix(before.as_str())?;
        (1..=rest.len())
            .rev()
            .filter(|&i| rest.is_char_boundary(i))
            .find_map(|i| {
                let (user, tail) = rest.split_at(i);
                let (known, _) = self.passwords.get_key_value(user)?;
                glob(after, tail).then_some(known.as_str())
            })
    }

    /// The client id to assign to a password login that sent none: the pattern with `*` as
    /// random characters.
    fn assign_for_user(&self, user: &str) -> String {
        let (before, after) = &self.client_id_pattern;
        let after = after.replacen('*', &format!("{:012x}", rand::random::<u64>() >> 16), 1);
        format!("{before}{user}{after}")
    }

    /// Whether `identity` may act under `c`'s client id; fills `identity.client_id` (assigning
    /// one when the CONNECT had none).
    fn claim(&self, c: &Connect, mut identity: Identity) -> Result<Identity, u8> {
        let requested = c.client_id.as_str();
        let owner = |id: &str| self.user_owning(id);
        identity.client_id = match identity.kind {
            IdentityKind::Certificate if self.client_id_must_match => {
                if !requested.is_empty() && requested != identity.name {
                    return Err(reason::CLIENT_ID_NOT_VALID);
                }
                identity.name.clone()
            }
            IdentityKind::Password => {
                let user = identity.name.as_str();
                let id = if requested.is_empty() {
                    // (With a pattern like "%u*", a longer username could own what the random
                    // characters spell: checked like a requested id.)
                    self.assign_for_user(user)
                } else {
                    requested.to_string()
                };
                if owner(&id) != Some(user) {
                    return Err(reason::CLIENT_ID_NOT_VALID);
                }
                id
            }
            IdentityKind::Certificate | IdentityKind::Anonymous => {
                if requested.is_empty() {
                    format!("gw-{:016x}", rand::random::<u64>())
                } else {
                    requested.to_string()
                }
            }
        };
        let checked = identity.kind == IdentityKind::Password
            || (identity.kind == IdentityKind::Certificate && self.client_id_must_match);
        if !checked && owner(&identity.client_id).is_some() {
            return Err(reason::CLIENT_ID_NOT_VALID);
        }
        if identity.kind == IdentityKind::Anonymous {
            identity.name = identity.client_id.clone();
        }
        Ok(identity)
    }

    pub fn cert_identity_mode(&self) -> CertIdentity {
        self.cert_identity
    }

    /// Checks a CONNECT. `cert_identity` is the identity of a verified client certificate.
    /// CPU-heavy when a password is checked (argon2): call it off the async workers.
    /// The identity's `client_id` is one it owns; a CONNECT whose client id another identity
    /// owns is refused with `CLIENT_ID_NOT_VALID`.
    pub fn authenticate(&self, c: &Connect, cert_identity: Option<&str>) -> Result<Identity, u8> {
        let identity = self.identify(c, cert_identity)?;
        self.claim(c, identity)
    }

    fn identify(&self, c: &Connect, cert_identity: Option<&str>) -> Result<Identity, u8> {
        if let Some(id) = cert_identity {
            return Ok(Identity {
                name: id.to_string(),
                username: c.username.clone(),
                kind: IdentityKind::Certificate,
                client_id: String::new(),
            });
        }
        match (&c.username, &c.password) {
            (Some(user), Some(password)) => {
                let Some(hash) = self.passwords.get(user) else {
                    // As long as a wrong password takes: the answer's timing does not tell
                    // which user names exist.
                    if let Some(dummy) = dummy_hash() {
                        let _ = Argon2::default().verify_password(password.as_bytes(), &dummy);
                    }
                    return Err(reason::BAD_USER_OR_PASSWORD);
                };
                let parsed = PasswordHash::new(hash).map_err(|_| reason::BAD_USER_OR_PASSWORD)?;
                Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .map_err(|_| reason::BAD_USER_OR_PASSWORD)?;
                Ok(Identity {
                    name: user.clone(),
                    username: Some(user.clone()),
                    kind: IdentityKind::Password,
                    client_id: String::new(),
                })
            }
            (Some(_), None) if !self.allow_anonymous => Err(reason::BAD_USER_OR_PASSWORD),
            _ if self.allow_anonymous => Ok(Identity {
                name: c.client_id.clone(),
                username: c.username.clone(),
                kind: IdentityKind::Anonymous,
                client_id: String::new(),
            }),
            _ => Err(reason::NOT_AUTHORIZED),
        }
    }
}

/// The identity in a client certificate (DER): its CN, or its first DNS SAN.
pub fn identity_from_cert(der: &[u8], mode: CertIdentity) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    match mode {
        CertIdentity::Cn => cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string),
        CertIdentity::San => cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .and_then(|san| {
                san.value.general_names.iter().find_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
            }),
    }
}

/// ACL rules, checked in order; a publish is allowed when any rule for the identity allows it.
pub struct Acl {
    rules: Vec<AclRule>,
}

impl Acl {
    pub fn new(rules: Vec<AclRule>) -> Acl {
        Acl { rules }
    }
}

fn glob(pattern: &str, s: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == s,
        Some((head, tail)) => {
            let Some(rest) = s.strip_prefix(head) else {
                return false;
            };
            (0..=rest.len())
                .filter(|&i| rest.is_char_boundary(i))
                .any(|i| glob(tail, &rest[i..]))
        }
    }
}

/// Whether the substituted values can be used literally inside one topic level.
fn literal_level_ok(v: &str) -> bool {
    !v.is_empty() && !v.contains(['/', '+', '#'])
}

/// MQTT topic matching with `%c` / `%u` substituted as literal text.
fn filter_matches(filter: &str, topic: &str, client_id: &str, username: Option<&str>) -> bool {
    crate::topic::matches_by(filter, topic, |f, t| level_eq(f, t, client_id, username))
}

/// Whether `level` (of an ACL filter, possibly with `%c` / `%u`) equals the literal `other`.
fn level_eq(level: &str, other: &str, client_id: &str, username: Option<&str>) -> bool {
    if !level.contains('%') {
        return level == other;
    }
    if level.contains("%c") && !literal_level_ok(client_id) {
        return false;
    }
    let mut l = level.replace("%c", client_id);
    if l.contains("%u") {
        match username {
            Some(u) if literal_level_ok(u) => l = l.replace("%u", u),
            _ => return false,
        }
    }
    l == other
}

impl PublishAcl for Acl {
    fn may_publish(&self, identity: &Identity, client_id: &str, topic: &str) -> bool {
        self.rules
            .iter()
            .filter(|r| glob(&r.identity, &identity.name))
            .any(|r| {
                r.publish
                    .iter()
                    .any(|f| filter_matches(f, topic, client_id, identity.username.as_deref()))
            })
    }

    /// Allowed when an allowed filter covers the whole of `filter` (every topic it can match).
    fn may_subscribe(&self, identity: &Identity, client_id: &str, filter: &str) -> bool {
        let user = identity.username.as_deref();
        self.rules
            .iter()
            .filter(|r| glob(&r.identity, &identity.name))
            .any(|r| {
                r.subscribe.iter().any(|allowed| {
                    crate::topic::covers_by(allowed, filter, |a, f| level_eq(a, f, client_id, user))
                })
            })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::ingest::codec::Version;

    fn ident(name: &str, user: Option<&str>) -> Identity {
        Identity {
            name: name.into(),
            username: user.map(str::to_string),
            kind: IdentityKind::Password,
            client_id: name.into(),
        }
    }

    #[test]
    fn default_acl_lets_a_device_publish_only_under_its_own_tree() {
        let acl = Acl::new(crate::config::default_acl());
        let i = ident("dev-1", None);
        assert!(acl.may_publish(&i, "dev-1", "devices/dev-1/telemetry"));
        assert!(acl.may_publish(&i, "dev-1", "devices/dev-1/a/b/c"));
        assert!(!acl.may_publish(&i, "dev-1", "devices/dev-2/telemetry"));
        assert!(!acl.may_publish(&i, "dev-1", "devices"));
        // A client id with wildcard characters never widens the rule.
        assert!(!acl.may_publish(&ident("#", None), "#", "devices/x/y"));
        assert!(!acl.may_publish(&ident("a/b", None), "a/b", "devices/a/b/t"));
    }

    #[test]
    fn rules_apply_by_identity_pattern_with_username_substitution() {
        let acl = Acl::new(vec![
            AclRule {
                identity: "gw-*".into(),
                publish: vec!["sites/%u/+/temp".into()],
                subscribe: vec!["sites/%u/commands/#".into()],
            },
            AclRule {
                identity: "admin".into(),
                publish: vec!["#".into()],
                subscribe: vec!["#".into()],
            },
        ]);
        assert!(acl.may_publish(&ident("gw-7", Some("north")), "c", "sites/north/x/temp"));
        assert!(!acl.may_publish(&ident("gw-7", Some("north")), "c", "sites/south/x/temp"));
        assert!(!acl.may_publish(&ident("gw-7", None), "c", "sites/north/x/temp"));
        assert!(acl.may_publish(&ident("admin", None), "c", "any/thing"));
        assert!(!acl.may_publish(&ident("other", None), "c", "any/thing"));
        let gw = ident("gw-7", Some("north"));
        assert!(acl.may_subscribe(&gw, "c", "sites/north/commands/#"));
        assert!(acl.may_subscribe(&gw, "c", "sites/north/commands/+/x"));
        assert!(!acl.may_subscribe(&gw, "c", "sites/+/commands/#"));
        assert!(!acl.may_subscribe(&gw, "c", "sites/#"));
        assert!(!acl.may_subscribe(&ident("gw-7", None), "c", "sites/north/commands/#"));
        assert!(acl.may_subscribe(&ident("admin", None), "c", "sites/#"));
        assert!(!acl.may_subscribe(&ident("admin", None), "c", "$SYS/#"));
    }

    #[test]
    fn by_default_a_device_may_subscribe_to_its_own_command_tree_only() {
        let acl = Acl::new(crate::config::default_acl());
        let d = ident("d1", None);
        assert!(acl.may_subscribe(&d, "d1", "devices/d1/commands/#"));
        assert!(acl.may_subscribe(&d, "d1", "devices/d1/commands/reboot"));
        assert!(!acl.may_subscribe(&d, "d1", "devices/d2/commands/#"));
        assert!(!acl.may_subscribe(&d, "d1", "devices/+/commands/#"));
        assert!(!acl.may_subscribe(&d, "d1", "devices/d1/#"));
        // A client id that is not one literal level can never match `%c`.
        assert!(!acl.may_subscribe(&ident("+", None), "+", "devices/+/commands/#"));
    }

    fn connect(id: &str, user: Option<&str>, pw: Option<&str>) -> Connect {
        Connect {
            version: Version::V311,
            client_id: id.into(),
            clean_start: true,
            keep_alive: 30,
            username: user.map(str::to_string),
            password: pw.map(str::to_string),
            will: None,
            client_max_packet: None,
            auth_method: None,
            client_receive_maximum: None,
            session_expiry: None,
            request_problem_info: true,
        }
    }

    #[test]
    fn passwords_are_checked_against_argon2_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("passwd");
        set_password(&file, "alice", "s3cret").unwrap();
        set_password(&file, "bob", "hunter2").unwrap();
        set_password(&file, "alice", "changed").unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(!text.contains("changed"));
        let a = Authenticator::new(&AuthConfig {
            password_file: Some(file),
            ..AuthConfig::default()
        })
        .unwrap();
        assert_eq!(
            a.authenticate(&connect("alice", Some("alice"), Some("changed")), None)
                .unwrap()
                .name,
            "alice"
        );
        assert_eq!(
            a.authenticate(&connect("c1", Some("alice"), Some("changed")), None),
            Err(reason::CLIENT_ID_NOT_VALID),
            "a password login owns only its username as client id by default"
        );
        assert_eq!(
            a.authenticate(&connect("c1", Some("alice"), Some("s3cret")), None),
            Err(reason::BAD_USER_OR_PASSWORD)
        );
        assert_eq!(
            a.authenticate(&connect("c1", Some("eve"), Some("x")), None),
            Err(reason::BAD_USER_OR_PASSWORD)
        );
        assert_eq!(
            a.authenticate(&connect("c1", None, None), None),
            Err(reason::NOT_AUTHORIZED)
        );
    }

    fn with_users(pattern: &str, users: &[&str], anonymous: bool) -> Authenticator {
        let passwords = users
            .iter()
            .map(|u| (u.to_string(), String::new()))
            .collect();
        let (before, after) = pattern.split_once("%u").unwrap();
        Authenticator {
            passwords,
            allow_anonymous: anonymous,
            client_id_must_match: true,
            cert_identity: CertIdentity::Cn,
            client_id_pattern: (before.into(), after.into()),
        }
    }

    fn claim(a: &Authenticator, kind: IdentityKind, name: &str, id: &str) -> Result<String, u8> {
        let ident = Identity {
            name: name.into(),
            username: (kind == IdentityKind::Password).then(|| name.to_string()),
            kind,
            client_id: String::new(),
        };
        a.claim(&connect(id, None, None), ident)
            .map(|i| i.client_id)
    }

    #[test]
    fn by_default_a_password_login_owns_only_its_username_as_client_id() {
        let a = with_users("%u", &["alice", "bob"], false);
        let pw = IdentityKind::Password;
        assert_eq!(claim(&a, pw, "alice", "alice"), Ok("alice".into()));
        for spoof in ["bob", "dev-00001", "alice-2", "alic", ""] {
            if spoof.is_empty() {
                // None asked for: the username is assigned.
                assert_eq!(claim(&a, pw, "alice", spoof), Ok("alice".into()));
            } else {
                assert_eq!(
                    claim(&a, pw, "alice", spoof),
                    Err(reason::CLIENT_ID_NOT_VALID),
                    "{spoof}"
                );
            }
        }
    }

    #[test]
    fn a_pattern_gives_each_user_a_namespace_and_the_longer_username_wins() {
        let a = with_users("%u-*", &["site", "site-b"], false);
        let pw = IdentityKind::Password;
        assert_eq!(claim(&a, pw, "site", "site-1"), Ok("site-1".into()));
        assert_eq!(claim(&a, pw, "site", "site-"), Ok("site-".into()));
        assert_eq!(
            claim(&a, pw, "site", "site"),
            Err(reason::CLIENT_ID_NOT_VALID),
            "the pattern needs the '-'"
        );
        assert_eq!(
            claim(&a, pw, "site", "site-b-1"),
            Err(reason::CLIENT_ID_NOT_VALID),
            "site-b's"
        );
        assert_eq!(claim(&a, pw, "site-b", "site-b-1"), Ok("site-b-1".into()));
        let assigned = claim(&a, pw, "site", "").unwrap();
        assert!(
            assigned.starts_with("site-") && assigned.len() > 5,
            "{assigned}"
        );
        assert_eq!(a.user_owning(&assigned), Some("site"));
        // A username with wildcard characters is matched literally.
        let a = with_users("%u-*", &["a*"], false);
        assert_eq!(a.user_owning("a*-1"), Some("a*"));
        assert_eq!(a.user_owning("ab-1"), None);
    }

    #[test]
    fn anonymous_devices_own_nothing_a_password_user_owns() {
        let a = with_users("%u-*", &["alice"], true);
        let anon = IdentityKind::Anonymous;
        assert_eq!(
            claim(&a, anon, "alice-1", "alice-1"),
            Err(reason::CLIENT_ID_NOT_VALID)
        );
        assert_eq!(claim(&a, anon, "dev-9", "dev-9"), Ok("dev-9".into()));
        let assigned = claim(&a, anon, "", "").unwrap();
        assert!(assigned.starts_with("gw-"), "{assigned}");
        let a = with_users("%u", &["alice"], true);
        assert_eq!(
            claim(&a, anon, "alice", "alice"),
            Err(reason::CLIENT_ID_NOT_VALID)
        );
    }

    #[test]
    fn a_certificate_identity_must_match_the_client_id() {
        let a = Authenticator::new(&AuthConfig::default()).unwrap();
        assert!(a
            .authenticate(&connect("dev-1", None, None), Some("dev-1"))
            .is_ok());
        assert_eq!(
            a.authenticate(&connect("dev-2", None, None), Some("dev-1")),
            Err(reason::CLIENT_ID_NOT_VALID)
        );
    }

    #[test]
    fn certificate_cn_is_read() {
        let (ca, _) = crate::certs::DevCa::new().unwrap();
        let (pem, _) = ca.device_cert("dev-00042").unwrap();
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(
            identity_from_cert(&der, CertIdentity::Cn).as_deref(),
            Some("dev-00042")
        );
    }
}
