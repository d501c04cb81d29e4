//! Bad input never crashes corral: bad configs, taken ports, malformed requests.

mod support;

use std::process::Output;

use support::http::{get, Conn};
use support::{corral_bin, fixture, Corral, Options, TestResult};

fn run_cli(
    args: &[&str],
    config_text: Option<&str>,
) -> Result<(Output, tempfile::TempDir), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    // corral refuses a runtime directory that others may write to.
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let path = dir.path().join("proxy.toml");
    if let Some(text) = config_text {
        std::fs::write(&path, text)?;
    }
    let output = std::process::Command::new(corral_bin())
        .args(args)
        .arg("-c")
        .arg(&path)
        .env("CORRAL_RUNTIME_DIR", dir.path())
        .output()?;
    Ok((output, dir))
}

fn app(extra: &str) -> String {
    format!(
        "[[app]]\nname = \"web\"\ncommand = [\"node\", {:?}]\nlisten = \"127.0.0.1:0\"\n{extra}",
        fixture("app.js").display()
    )
}

fn assert_rejected(config: Option<&str>, expected: &[&str]) -> TestResult {
    for command in ["check", "run"] {
        let (output, _dir) = run_cli(&[command], config)?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "`corral {command}` accepted {config:?}");
        assert!(!stderr.contains("panicked"), "`corral {command}` panicked: {stderr}");
        for needle in expected {
            assert!(
                stderr.contains(needle),
                "`corral {command}` stderr lacks {needle:?}:\n{stderr}"
            );
        }
    }
    Ok(())
}

#[test]
fn an_unknown_key_is_named_with_its_line() -> TestResult {
    assert_rejected(
        Some(&app("listen_timout = \"5s\"\n")),
        &[
            "proxy.toml:5:1",
            "listen_timout: unknown key",
            "did you mean `listen_timeout`",
        ],
    )
}

#[test]
fn a_wrong_type_is_named_with_its_line() -> TestResult {
    assert_rejected(
        Some(&app("instances = true\n")),
        &["proxy.toml:5:", "instances: expected a positive integer"],
    )
}

#[test]
fn a_bad_duration_is_named_with_its_line() -> TestResult {
    assert_rejected(
        Some(&app("kill_timeout = \"5 parsecs\"\n")),
        &["proxy.toml:5:", "kill_timeout: expected a duration"],
    )
}

#[test]
fn a_toml_syntax_error_is_named_with_its_line() -> TestResult {
    assert_rejected(
        Some("[[app]]\nname = \"web\nlisten = 1\n"),
        &["proxy.toml:2:", "TOML syntax error"],
    )
}

#[test]
fn every_problem_is_listed_at_once_with_the_config_exit_code() -> TestResult {
    let (output, _dir) = run_cli(
        &["check"],
        Some(&app("instances = 0\nkill_signal = \"SIGNOPE\"\ncolour = \"red\"\n")),
    )?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("3 problems"), "{stderr}");
    for needle in ["proxy.toml:5:", "proxy.toml:6:", "proxy.toml:7:"] {
        assert!(stderr.contains(needle), "{stderr}");
    }
    Ok(())
}

#[test]
fn a_missing_config_file_is_named() -> TestResult {
    assert_rejected(None, &["cannot read config file", "proxy.toml", "No such file"])
}

#[test]
fn the_example_config_passes_check() -> TestResult {
    let output = std::process::Command::new(corral_bin())
        .args(["check", "-c"])
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.example.toml"))
        .output()?;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("OK"));
    Ok(())
}

#[test]
fn a_listen_address_in_use_is_a_clear_error() -> TestResult {
    support::require_node();
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?;
    let config = format!(
        "[[app]]\nname = \"web\"\ncommand = [\"node\", {:?}]\nlisten = \"{addr}\"\n",
        fixture("app.js").display()
    );
    let (output, _dir) = run_cli(&["run"], Some(&config))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains(&format!("cannot listen on {addr}")), "{stderr}");
    assert!(stderr.contains("already in use"), "{stderr}");
    assert!(
        !stderr.contains("starting workers"),
        "workers were started before the bind: {stderr}"
    );
    Ok(())
}

#[test]
fn a_second_instance_of_the_same_config_is_refused() -> TestResult {
    let corral = Corral::start(Options::default().instances(1))?;
    let second = corral.cli(&["run"])?;
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("cannot listen") || stderr.contains("already running"),
        "{stderr}"
    );
    assert_eq!(
        get(corral.addr, "/whoami")?.status,
        200,
        "the first instance still serves"
    );
    Ok(())
}

/// Sends raw bytes on a fresh connection and returns the status corral answered with.
fn status_for(corral: &Corral, raw: &[u8]) -> Result<u16, Box<dyn std::error::Error>> {
    let mut conn = Conn::open(corral.addr)?;
    conn.send_raw(raw)?;
    let (status, _) = conn.read_head()?;
    Ok(status)
}

#[test]
fn malformed_requests_get_4xx_and_the_next_request_is_served() -> TestResult {
    let corral = Corral::start(Options::default().instances(1))?;

    assert_eq!(
        status_for(&corral, b"\x16\x03\x01\x02\x00garbage\r\n\r\n")?,
        400,
        "garbage bytes"
    );
    assert_eq!(get(corral.addr, "/whoami")?.status, 200);

    let smuggle = b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /whoami HTTP/1.1\r\nHost: t\r\n\r\n";
    let mut conn = Conn::open(corral.addr)?;
    conn.send_raw(smuggle)?;
    let (status, _) = conn.read_head()?;
    assert_eq!(status, 400, "Content-Length with Transfer-Encoding");
    // Nothing after the refused head is served from this connection.
    let rest = String::from_utf8_lossy(&conn.read_to_close()?).into_owned();
    assert!(
        !rest.contains("HTTP/1.1 200"),
        "a smuggled request was answered: {rest}"
    );
    assert_eq!(get(corral.addr, "/whoami")?.status, 200);

    let mut huge = b"GET /whoami HTTP/1.1\r\nHost: t\r\nX-Huge: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 200 * 1024));
    huge.extend(b"\r\n\r\n");
    let mut conn = Conn::open(corral.addr)?;
    // The server may answer and close before reading everything; a reset on write is fine.
    let _partial = conn.send_raw(&huge);
    let (status, _) = conn.read_head()?;
    assert_eq!(status, 431, "200 KB header");
    assert_eq!(get(corral.addr, "/whoami")?.status, 200);

    assert_eq!(
        status_for(
            &corral,
            b"GET /whoami HTTP/1.1\r\nHost: t\r\nContent-Length: nope\r\n\r\n"
        )?,
        400
    );
    let version = status_for(&corral, b"GET /whoami HTTP/9.9\r\nHost: t\r\n\r\n")?;
    assert!((400..=505).contains(&version), "unknown HTTP version got {version}");
    let mut conn = Conn::open(corral.addr)?;
    conn.send_raw(b"GET /whoami HTTP/1.1\r\nHost: t\r\n\r\n")?;
    assert_eq!(conn.read_response()?.status, 200);
    Ok(())
}

#[test]
fn an_unknown_user_or_a_group_alone_is_named() -> TestResult {
    assert_rejected(
        Some(&app("user = \"no-such-user-for-corral\"\n")),
        &["proxy.toml:5:", "user: no such user on this machine"],
    )?;
    assert_rejected(Some(&app("group = \"root\"\n")), &["group: needs `user` too"])
}
