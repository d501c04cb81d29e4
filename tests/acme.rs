//! Automatic certificates end to end: the real corral binary with `[app.tls.acme]` against a
//! private ACME CA (Debian's pebble, `support/pebble.rs`), whose validation server connects to
//! corral's own listeners; a real client (curl) then fetches a page over HTTPS, trusting only
//! pebble's issuing root.

#[path = "support/pebble.rs"]
mod pebble;
mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use pebble::{Pebble, PebbleOptions};
use serde_json::Value;
use support::{poll_until, Corral, Options, PortHold, TestResult};

/// Generous: two busy cores run cargo, pebble, corral and its workers at once.
const DEADLINE: Duration = Duration::from_secs(90);

const DOMAIN: &str = "app.corral.test";

fn require_pebble() {
    assert!(
        pebble::installed(),
        "these tests need Debian's pebble package (pebble, pebble-challtestsrv)"
    );
}

/// The `[[app]]` config with an `[app.tls.acme]` table for `directory`.
fn config(
    tls: &PortHold,
    http_redirect: Option<&PortHold>,
    directory: &str,
    ca_root: Option<&Path>,
    cache: &Path,
) -> String {
    let mut options = Options::default().instances(1);
    if let Some(redirect) = http_redirect {
        options = options.key(&format!("http_redirect = \"{}\"", redirect.addr));
    }
    let mut text = options.config_text(tls.addr);
    text.push_str(&format!(
        "[app.tls.acme]\ndomains = [\"{DOMAIN}\"]\nemail = \"ops@corral.test\"\ndirectory = \"{directory}\"\ncache_dir = {:?}\n",
        cache.display().to_string()
    ));
    if let Some(root) = ca_root {
        text.push_str(&format!("ca_root = {:?}\n", root.display().to_string()));
    }
    text
}

/// The app's `tls` object in `corral status --json`.
fn tls_status(corral: &Corral) -> Option<Value> {
    let status = corral.status()?;
    Some(status["apps"][0]["tls"].clone())
}

/// Waits until corral serves a certificate; returns its expiry (seconds since the epoch).
fn wait_certificate(corral: &Corral) -> Result<u64, Box<dyn std::error::Error>> {
    poll_until(DEADLINE, "an ACME certificate in corral status", || {
        if let Some(exit) = corral.exited() {
            panic!("corral exited early ({exit})\n{}", corral.logs());
        }
        tls_status(corral)?["not_after"].as_u64()
    })
    .map_err(|e| corral.explain(e))
}

/// curl over HTTPS to `DOMAIN` at `port` on 127.0.0.1, trusting only `root`.
fn curl(port: u16, root: &Path, extra: &[&str]) -> std::io::Result<Output> {
    Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "10"])
        .args(extra)
        .arg("--cacert")
        .arg(root)
        .arg("--resolve")
        .arg(format!("{DOMAIN}:{port}:127.0.0.1"))
        .arg(format!("https://{DOMAIN}:{port}/whoami"))
        .output()
}

/// Fetches `/whoami` over HTTPS and checks that a worker answered.
fn fetch_page(port: u16, root: &Path, corral: &Corral) -> TestResult {
    for protocol in ["--http1.1", "--http2"] {
        let output = curl(port, root, &[protocol])?;
        let body = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && body.contains("\"pid\""),
            "curl {protocol}: {}\n{body}\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            corral.logs()
        );
    }
    Ok(())
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0)
}

#[test]
fn tls_alpn_01_certificate_serves_https_and_a_restart_reuses_it_without_the_ca() -> TestResult {
    require_pebble();
    let tls = PortHold::new()?;
    let port = tls.addr.port();
    let mut pebble = Pebble::start(PebbleOptions {
        http_port: pebble::free_tcp_port()?,
        tls_port: port,
        validity_secs: None,
    })?;
    let cache_parent = tempfile::tempdir()?;
    let cache = cache_parent.path().join("acme");
    let text = config(&tls, None, &pebble.directory, Some(&pebble.ca_root), &cache);
    let corral = Corral::spawn_with_config(&text, tls.addr)?;
    corral.wait_online(1)?;
    tls.release();

    let not_after = wait_certificate(&corral)?;
    let tls_now = tls_status(&corral).ok_or("status")?;
    assert_eq!(tls_now["problem"], Value::Null, "{tls_now}");
    assert!(tls_now["subject"].as_str().is_some(), "{tls_now}");
    let root = corral.dir.path().join("pebble-root.pem");
    std::fs::write(&root, pebble.issuing_root()?)?;
    fetch_page(port, &root, &corral)?;
    // The event stream (and corral's log) said so.
    poll_until(DEADLINE, "the certificate_renewed event in the log", || {
        corral.logs().contains("event=certificate_renewed").then_some(())
    })?;

    // The account and the certificate are cached, private.
    assert_eq!(mode(&cache), 0o700);
    let files: Vec<_> = std::fs::read_dir(&cache)?.collect::<Result<_, _>>()?;
    assert_eq!(files.len(), 2, "{files:?}");
    for file in &files {
        assert_eq!(mode(&file.path()), 0o600, "{}", file.path().display());
    }

    // Stopped, and started again with the CA gone: the cached certificate serves at once.
    let mut corral = corral;
    let stop = corral.cli(&["stop"])?;
    assert!(stop.status.success(), "corral stop: {stop:?}");
    corral.wait_exit(support::DEADLINE)?;
    pebble.stop();
    corral.respawn()?;
    corral.wait_online(1)?;
    assert_eq!(wait_certificate(&corral)?, not_after);
    let tls_again = tls_status(&corral).ok_or("status")?;
    assert_eq!(tls_again["problem"], Value::Null, "{tls_again}");
    fetch_page(port, &root, &corral)?;
    Ok(())
}

#[test]
fn http_01_is_answered_by_the_http_redirect_listener() -> TestResult {
    require_pebble();
    let tls = PortHold::new()?;
    let redirect = PortHold::new()?;
    let port = tls.addr.port();
    // pebble validates TLS-ALPN-01 on a port nobody listens on: only HTTP-01, on corral's
    // http_redirect listener, can succeed.
    let pebble = Pebble::start(PebbleOptions {
        http_port: redirect.addr.port(),
        tls_port: pebble::free_tcp_port()?,
        validity_secs: None,
    })?;
    let cache = tempfile::tempdir()?;
    let text = config(
        &tls,
        Some(&redirect),
        &pebble.directory,
        Some(&pebble.ca_root),
        cache.path(),
    );
    let corral = Corral::spawn_with_config(&text, tls.addr)?;
    corral.wait_online(1)?;
    tls.release();
    redirect.release();

    wait_certificate(&corral)?;
    let root = corral.dir.path().join("pebble-root.pem");
    std::fs::write(&root, pebble.issuing_root()?)?;
    fetch_page(port, &root, &corral)
}

#[test]
fn an_unreachable_directory_fails_handshakes_with_an_alert_and_status_says_why() -> TestResult {
    let tls = PortHold::new()?;
    let port = tls.addr.port();
    let nobody = pebble::free_tcp_port()?;
    let cache = tempfile::tempdir()?;
    let directory = format!("https://127.0.0.1:{nobody}/dir");
    let text = config(&tls, None, &directory, None, cache.path());
    let corral = Corral::spawn_with_config(&text, tls.addr)?;
    corral.wait_online(1)?;
    tls.release();

    // `corral status` (for people) names the reason.
    let line = poll_until(DEADLINE, "the reason in corral status", || {
        let output = corral.cli(&["status"]).ok()?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.contains("could not connect").then_some(text)
    })
    .map_err(|e| corral.explain(e))?;
    assert!(line.contains(&format!("127.0.0.1:{nobody}")), "{line}");
    assert!(line.contains("next attempt in"), "{line}");
    let tls_now = tls_status(&corral).ok_or("status")?;
    assert_eq!(tls_now["not_after"], Value::Null, "{tls_now}");
    assert!(corral.logs().contains("could not connect"), "{}", corral.logs());

    // No certificate: the handshake is refused with an alert (curl: SSL connect error, 35),
    // even for a client that would accept any certificate; nothing wrong is presented.
    let output = Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--max-time",
            "10",
            "--insecure",
            "--resolve",
        ])
        .arg(format!("{DOMAIN}:{port}:127.0.0.1"))
        .arg(format!("https://{DOMAIN}:{port}/whoami"))
        .output()?;
    assert_eq!(
        output.status.code(),
        Some(35),
        "curl: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        corral.logs()
    );
    assert!(corral.exited().is_none(), "corral gave up:\n{}", corral.logs());
    Ok(())
}
