//! The admin endpoint's bearer token (issue 15, item 5), on the real gateway binary over
//! loopback HTTP: a non-loopback `admin.listen` without a token is a config error; with a token
//! (from a file or an environment variable) every request but `GET /healthz` gets 401 without it
//! or with a wrong one and 200 with it, by `Authorization: Bearer` or by Basic credentials (what
//! a browser sends for the status page, checked in headless Chromium too); `gateway reload`
//! sends it.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "3f9c2b7e1d4a6058c1e2f3a4b5c6d7e8";
/// Bound on the wait for the gateway to serve.
const WAIT: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A minimal valid config: a plaintext listener, no uplinks, `[admin]` as given.
fn write_config(dir: &Path, admin: &str) -> PathBuf {
    let path = dir.join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[queue]
data_dir = {data:?}
max_bytes = "64 MiB"
segment_bytes = "1 MiB"

[[listeners]]
bind = "127.0.0.1:{mqtt}"
tls = false

[auth]
allow_anonymous = true

[admin]
{admin}
"#,
            data = dir.join("data"),
            mqtt = free_port(),
        ),
    )
    .unwrap();
    path
}

fn gateway(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gateway"));
    c.args(args).env_remove("GATEWAY_TEST_ADMIN_TOKEN");
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn check_config(config: &Path, env: &[(&str, &str)]) -> Output {
    gateway(&["check-config", "--config", config.to_str().unwrap()], env)
        .output()
        .unwrap()
}

/// The gateway process, killed when dropped (also when the test panics).
struct Gateway {
    child: Child,
    log: PathBuf,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    fn start(dir: &Path, config: &Path, env: &[(&str, &str)]) -> Gateway {
        let log = dir.join("gateway.log");
        let child = gateway(&["run", "--config", config.to_str().unwrap()], env)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Gateway { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls the open `/healthz` until it answers 200.
    fn wait_healthy(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the gateway exited ({status}); its log:\n{}", self.log());
            }
            if let Ok(r) = request(addr, "GET", "/healthz", None) {
                assert_eq!(r.status, 200, "/healthz without a token: {}", r.body);
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the admin endpoint did not answer within {WAIT:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

struct Reply {
    status: u16,
    head: String,
    body: String,
}

/// One HTTP/1.0 request (neither chunked nor kept alive), `authorization` as the header's value.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    authorization: Option<&str>,
) -> std::io::Result<Reply> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let auth = authorization.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok(Reply {
        status,
        head: head.to_ascii_lowercase(),
        body: body.to_string(),
    })
}

fn get(addr: SocketAddr, path: &str, authorization: Option<&str>) -> Reply {
    request(addr, "GET", path, authorization).unwrap()
}

/// `user:password` as Basic credentials.
fn basic(user_pass: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::from("Basic ");
    for chunk in user_pass.as_bytes().chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// What every guarded path answers: 401 without the token or with a wrong one (offering Bearer),
/// 200 with it; `/healthz` answers everyone.
fn assert_guarded(addr: SocketAddr) {
    let bearer = format!("Bearer {TOKEN}");
    for path in ["/metrics", "/readyz", "/api/status", "/"] {
        let none = get(addr, path, None);
        assert_eq!(
            none.status, 401,
            "GET {path} without a token: {}",
            none.body
        );
        assert!(
            none.head
                .contains("www-authenticate: bearer realm=\"gateway admin\""),
            "GET {path} without a token must offer Bearer: {}",
            none.head
        );
        for wrong in [
            format!("Bearer {}", TOKEN.replace('3', "4")),
            format!("Bearer {TOKEN}0"),
            format!("Bearer {}", &TOKEN[..TOKEN.len() - 1]),
            "Bearer ".to_string(),
            TOKEN.to_string(),
            basic(&format!("admin:{}", TOKEN.to_uppercase())),
            basic(TOKEN),
        ] {
            let r = get(addr, path, Some(&wrong));
            assert_eq!(r.status, 401, "GET {path} with `{wrong}`: {}", r.body);
            assert!(r.head.contains("www-authenticate: bearer"), "{}", r.head);
            assert!(!r.body.contains(TOKEN), "the answer shows the token");
        }
        assert_eq!(
            get(addr, path, Some(&bearer)).status,
            200,
            "GET {path} with the token"
        );
        let b = get(addr, path, Some(&basic(&format!("ops:{TOKEN}"))));
        assert_eq!(b.status, 200, "GET {path} with Basic ops:TOKEN: {}", b.body);
    }
    let metrics = get(addr, "/metrics", Some(&bearer));
    assert!(metrics.body.contains("gateway_"), "{}", metrics.body);
    for auth in [None, Some("Bearer nope-nope-nope-nope")] {
        let h = get(addr, "/healthz", auth);
        assert_eq!(
            (h.status, h.body.as_str()),
            (200, "ok\n"),
            "/healthz, {auth:?}"
        );
    }
    let reload = request(addr, "POST", "/reload", None).unwrap();
    assert_eq!(reload.status, 401, "POST /reload without a token");
    let reload = request(addr, "POST", "/reload", Some(&bearer)).unwrap();
    assert_eq!(
        reload.status, 200,
        "POST /reload with the token: {}",
        reload.body
    );
}

#[test]
fn non_loopback_admin_listen_without_a_token_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "listen = \"0.0.0.0:9100\"");
    let out = check_config(&config, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "check-config: {stderr}");
    for want in [
        "admin.listen = \"0.0.0.0:9100\"",
        "not a loopback address",
        "admin.token_file or admin.token_env",
    ] {
        assert!(stderr.contains(want), "missing `{want}` in: {stderr}");
    }
    // `run` refuses it the same way, before binding anything.
    let run = gateway(&["run", "--config", config.to_str().unwrap()], &[])
        .output()
        .unwrap();
    let run_err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "run: {run_err}");
    assert!(
        run_err.contains("admin.listen = \"0.0.0.0:9100\""),
        "{run_err}"
    );

    // Loopback without a token stays valid.
    let ok = write_config(dir.path(), "listen = \"127.0.0.1:9100\"");
    let out = check_config(&ok, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn token_mistakes_are_config_errors_that_name_the_key_and_never_show_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    let missing = dir.path().join("missing.token");
    let short = "abc123";
    // (what, [admin] body, file content, env, expected substrings)
    type Case<'a> = (
        &'a str,
        String,
        Option<&'a str>,
        &'a [(&'a str, &'a str)],
        &'a [&'a str],
    );
    let cases: &[Case] = &[
        (
            "missing file",
            format!("listen = \"0.0.0.0:9100\"\ntoken_file = {missing:?}"),
            None,
            &[],
            &["admin.token_file = ", "missing.token", "cannot read it"],
        ),
        (
            "empty file",
            format!("listen = \"0.0.0.0:9100\"\ntoken_file = {token_file:?}"),
            Some(" \n"),
            &[],
            &["admin.token_file = ", "the token is empty"],
        ),
        (
            "short token",
            format!("listen = \"0.0.0.0:9100\"\ntoken_file = {token_file:?}"),
            Some(short),
            &[],
            &["admin.token_file = ", "shorter than 16 characters"],
        ),
        (
            "unset variable",
            "listen = \"0.0.0.0:9100\"\ntoken_env = \"GATEWAY_TEST_ADMIN_TOKEN\"".into(),
            None,
            &[],
            &[
                "admin.token_env = \"GATEWAY_TEST_ADMIN_TOKEN\"",
                "no such variable",
            ],
        ),
        (
            "empty variable",
            "listen = \"0.0.0.0:9100\"\ntoken_env = \"GATEWAY_TEST_ADMIN_TOKEN\"".into(),
            None,
            &[("GATEWAY_TEST_ADMIN_TOKEN", "")],
            &[
                "admin.token_env = \"GATEWAY_TEST_ADMIN_TOKEN\"",
                "the token is empty",
            ],
        ),
        (
            "both set",
            format!(
                "listen = \"0.0.0.0:9100\"\ntoken_file = {token_file:?}\ntoken_env = \"GATEWAY_TEST_ADMIN_TOKEN\""
            ),
            Some(TOKEN),
            &[("GATEWAY_TEST_ADMIN_TOKEN", TOKEN)],
            &[
                "admin.token_env = \"GATEWAY_TEST_ADMIN_TOKEN\"",
                "set only one of them",
            ],
        ),
    ];
    for (what, admin, content, env, expect) in cases {
        if let Some(c) = content {
            std::fs::write(&token_file, c).unwrap();
        }
        let config = write_config(dir.path(), admin);
        let out = check_config(&config, env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
        for want in *expect {
            assert!(
                stderr.contains(want),
                "{what}: missing `{want}` in: {stderr}"
            );
        }
        assert!(
            !stderr.contains(TOKEN) && !stderr.contains(short),
            "{what}: shows the token: {stderr}"
        );
    }
}

#[test]
fn token_from_a_file_guards_every_request_but_healthz() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let port = free_port();
    // 0.0.0.0: the non-loopback case the token exists for, reached here over 127.0.0.1.
    let config = write_config(
        dir.path(),
        &format!("listen = \"0.0.0.0:{port}\"\ntoken_file = {token_file:?}"),
    );
    let out = check_config(&config, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut gw = Gateway::start(dir.path(), &config, &[]);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    gw.wait_healthy(addr);
    assert_guarded(addr);

    // `gateway reload` reads the token from the same config and sends it.
    let out = gateway(&["reload", "--config", config.to_str().unwrap()], &[])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gateway reload: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!gw.log().contains(TOKEN), "the log shows the token");
}

#[test]
fn token_from_an_environment_variable_guards_every_request_but_healthz() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(
        dir.path(),
        &format!("listen = \"0.0.0.0:{port}\"\ntoken_env = \"GATEWAY_TEST_ADMIN_TOKEN\""),
    );
    let env = [("GATEWAY_TEST_ADMIN_TOKEN", TOKEN)];
    let mut gw = Gateway::start(dir.path(), &config, &env);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    gw.wait_healthy(addr);
    assert_guarded(addr);
    assert!(!gw.log().contains(TOKEN), "the log shows the token");
}

/// Debian's `chromium`, found on PATH (`./run-tests` installs it).
fn chromium() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("chromium"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "this test loads the status page in headless Chromium, and `chromium` is not on \
                 PATH: run the suite with `./run-tests`, which installs Debian's `chromium` package"
            )
        })
}

/// Headless Chromium's DOM of `url` after the page's first polls, bounded by [`WAIT`] x 4.
fn dump_dom(dir: &Path, url: &str) -> String {
    let out_path = dir.join("chromium.stdout");
    let err_path = dir.join("chromium.stderr");
    let mut child = Command::new(chromium())
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--virtual-time-budget=6000",
            "--dump-dom",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.join("chromium-profile").display()
        ))
        .arg(url)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT * 4;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within {:?}", WAIT * 4);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "chromium failed ({status}); stderr:\n{}",
        std::fs::read_to_string(&err_path).unwrap_or_default()
    );
    std::fs::read_to_string(&out_path).unwrap()
}

/// The text of the element with `id` in serialized HTML, for elements that hold only text.
fn text_of(dom: &str, id: &str) -> String {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no element with id {id:?} in the page:\n{dom}"));
    let start = at + dom[at..].find('>').unwrap() + 1;
    let end = start + dom[start..].find('<').unwrap();
    dom[start..end].trim().to_string()
}

#[test]
fn status_page_works_in_a_browser_with_the_token_as_basic_password() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let port = free_port();
    let config = write_config(
        dir.path(),
        &format!("listen = \"127.0.0.1:{port}\"\ntoken_file = {token_file:?}"),
    );
    let mut gw = Gateway::start(dir.path(), &config, &[]);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    gw.wait_healthy(addr);
    let status = get(addr, "/api/status", Some(&format!("Bearer {TOKEN}")));
    let v: serde_json::Value = serde_json::from_str(&status.body).unwrap();
    let id = v["gateway_id"].as_str().unwrap().to_string();
    assert!(!id.is_empty(), "{v}");

    // What a browser sends after its user typed the credentials it was asked for: the page, and
    // then its own requests for /api/status, carry them.
    let dom = dump_dom(dir.path(), &format!("http://ops:{TOKEN}@{addr}/"));
    assert_eq!(
        text_of(&dom, "gateway-id"),
        id,
        "the page did not get /api/status"
    );
    assert_ne!(text_of(&dom, "updated"), "never", "the page never updated");
}
