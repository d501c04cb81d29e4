//! The admin listener through the real binary: health, status, commands, auth, events.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;

use support::{poll_until, Corral, Options, PortHold, TestResult, DEADLINE};

/// corral with `[admin]` on a free loopback port (`extra`: more `[admin]` lines).
fn with_admin(options: Options, extra: &str) -> Result<(Corral, SocketAddr), Box<dyn std::error::Error>> {
    let (app, admin) = (PortHold::new()?, PortHold::new()?);
    let (addr, admin_addr) = (app.addr, admin.addr);
    let config = format!(
        "{}\n[admin]\nlisten = \"{admin_addr}\"\n{extra}\n",
        options.config_text(addr)
    );
    app.release();
    admin.release();
    let corral = Corral::spawn_with_config(&config, addr)?;
    corral.wait_online(options.instances)?;
    Ok((corral, admin_addr))
}

fn curl(args: &[&str]) -> std::io::Result<Output> {
    Command::new("curl")
        .args(["-sS", "--max-time", "30"])
        .args(args)
        .output()
}

/// `curl` on the admin listener: (status code, body).
fn admin(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: Option<&str>,
) -> Result<(u16, String), Box<dyn std::error::Error>> {
    let url = format!("http://{addr}{path}");
    let mut args = vec!["-X", method, "-o", "-", "-w", "\n%{http_code}"];
    for header in headers {
        args.extend(["-H", header]);
    }
    if let Some(body) = body {
        args.extend(["--data-binary", body]);
    }
    args.push(&url);
    let out = curl(&args)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').ok_or("no status")?;
    Ok((code.trim().parse()?, body.to_owned()))
}

const JSON: &str = "Content-Type: application/json";

#[test]
fn health_status_and_commands_over_http_with_typed_errors() -> TestResult {
    let (corral, addr) = with_admin(Options::default().instances(2), "")?;
    assert_eq!(admin(addr, "GET", "/healthz", &[], None)?.0, 200);
    let (code, body) = admin(addr, "GET", "/readyz", &[], None)?;
    assert_eq!((code, body.trim()), (200, "ready"));
    let (code, body) = admin(addr, "GET", "/api/status", &[], None)?;
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(status["apps"][0]["workers"].as_array().map(Vec::len), Some(2));
    assert_eq!(status["pid"], corral.pid());

    let (code, body) = admin(addr, "POST", "/api/apps/web/scale?n=3", &[JSON], Some("{}"))?;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("scaling from 2 to 3"), "{body}");
    corral.wait_online(3)?;

    let (code, body) = admin(addr, "POST", "/api/apps/nope/stop", &[JSON], None)?;
    assert_eq!(code, 404, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(error["error"]["code"], "no_such_app");
    let (code, body) = admin(addr, "POST", "/api/apps/web/scale?n=0", &[JSON], None)?;
    assert_eq!(
        (
            code,
            serde_json::from_str::<serde_json::Value>(&body)?["error"]["code"].clone()
        ),
        (400, "bad_request".into())
    );

    let before = corral.online_pids()?;
    let (code, body) = admin(addr, "POST", "/api/apps/web/restart", &[JSON], Some("{}"))?;
    assert_eq!(code, 200, "{body}");
    let after = corral.online_pids()?;
    assert!(before.is_disjoint(&after), "{before:?} {after:?}");

    let (code, _) = admin(addr, "POST", "/api/apps/web/stop", &[JSON], None)?;
    assert_eq!(code, 200);
    poll_until(DEADLINE, "/readyz to say the app has no ready worker", || {
        let (code, body) = admin(addr, "GET", "/readyz", &[], None).ok()?;
        (code == 503 && body.contains("web")).then_some(())
    })?;
    let (code, _) = admin(addr, "POST", "/api/apps/web/start", &[JSON], None)?;
    assert_eq!(code, 200);
    corral.wait_online(3)?;
    let (code, body) = admin(addr, "POST", "/api/reload", &[JSON], Some(r#"{"app": "web"}"#))?;
    assert_eq!(code, 200, "{body}");
    Ok(())
}

#[test]
fn without_a_token_only_loopback_requests_for_its_own_host_and_same_origin_changes_pass() -> TestResult {
    let (corral, addr) = with_admin(Options::default().instances(1), "")?;
    // DNS rebinding: a page on another name that resolves to 127.0.0.1.
    let (code, body) = admin(addr, "GET", "/api/status", &["Host: attacker.example"], None)?;
    assert_eq!(code, 403, "{body}");
    // Changes need JSON, POST, and (from a page) this origin.
    assert_eq!(admin(addr, "POST", "/api/apps/web/stop", &[], None)?.0, 415);
    assert_eq!(admin(addr, "GET", "/api/apps/web/stop", &[], None)?.0, 405);
    let evil = admin(
        addr,
        "POST",
        "/api/apps/web/stop",
        &[JSON, "Origin: http://attacker.example"],
        None,
    )?;
    assert_eq!(evil.0, 403, "{}", evil.1);
    assert_eq!(corral.online_pids()?.len(), 1, "nothing was stopped");
    let own = format!("Origin: http://{addr}");
    assert_eq!(
        admin(addr, "POST", "/api/apps/web/scale?n=1", &[JSON, &own], None)?.0,
        200
    );
    assert_eq!(admin(addr, "GET", "/nowhere", &[], None)?.0, 404);
    Ok(())
}

#[test]
fn with_a_token_everything_but_health_needs_it_or_the_login_cookie() -> TestResult {
    let dir = tempfile::tempdir()?;
    let token = "correct-horse-battery-staple";
    let file = dir.path().join("admin.token");
    std::fs::write(&file, format!("{token}\n"))?;
    let (_corral, addr) = with_admin(Options::default().instances(1), &format!("token_file = {file:?}"))?;
    assert_eq!(admin(addr, "GET", "/healthz", &[], None)?.0, 200);
    assert_eq!(admin(addr, "GET", "/readyz", &[], None)?.0, 200);
    let (code, body) = admin(addr, "GET", "/api/status", &[], None)?;
    assert_eq!(code, 401, "{body}");
    assert_eq!(
        admin(
            addr,
            "GET",
            "/api/status",
            &["Authorization: Bearer wrong-token-wrong-token"],
            None
        )?
        .0,
        401
    );
    let bearer = format!("Authorization: Bearer {token}");
    assert_eq!(admin(addr, "GET", "/api/status", &[&bearer], None)?.0, 200);

    let wrong = admin(addr, "POST", "/login", &[JSON], Some(r#"{"token": "nope"}"#))?;
    assert_eq!(wrong.0, 401);
    let out = curl(&[
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-X",
        "POST",
        "-H",
        JSON,
        "--data-binary",
        &format!(r#"{{"token": "{token}"}}"#),
        &format!("http://{addr}/login"),
    ])?;
    let head = String::from_utf8_lossy(&out.stdout).into_owned();
    let cookie = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("set-cookie: ")
                .or_else(|| l.strip_prefix("Set-Cookie: "))
        })
        .ok_or(format!("no cookie: {head}"))?;
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap_or_default();
    assert_eq!(
        admin(addr, "GET", "/api/status", &[&format!("Cookie: {pair}")], None)?.0,
        200
    );
    Ok(())
}

#[test]
fn check_refuses_an_admin_listener_off_loopback_without_a_token() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("proxy.toml");
    let text = format!(
        "{}\n[admin]\nlisten = \"0.0.0.0:9615\"\n",
        Options::default().config_text("127.0.0.1:4000".parse()?)
    );
    std::fs::write(&path, text)?;
    let out = Command::new(support::corral_bin())
        .args(["check", "-c"])
        .arg(&path)
        .env_remove("CORRAL_ADMIN_TOKEN")
        .output()?;
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("admin.listen: 0.0.0.0:9615 is not a loopback address"),
        "{said}"
    );
    Ok(())
}

/// Reads an SSE stream from `addr` (with `Last-Event-ID: last`) in a thread: (event, data).
fn events(
    addr: SocketAddr,
    last: Option<u64>,
) -> std::io::Result<(std::process::Child, mpsc::Receiver<(String, serde_json::Value)>)> {
    let mut command = Command::new("curl");
    command.args(["-sS", "-N", "--max-time", "120"]);
    if let Some(id) = last {
        command.args(["-H", &format!("Last-Event-ID: {id}")]);
    }
    let mut child = command
        .arg(format!("http://{addr}/api/events"))
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut name = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(event) = line.strip_prefix("event: ") {
                name = event.to_owned();
            } else if let Some(data) = line.strip_prefix("data: ") {
                let Ok(data) = serde_json::from_str(data) else { continue };
                if tx.send((std::mem::take(&mut name), data)).is_err() {
                    return;
                }
            }
        }
    });
    Ok((child, rx))
}

/// Waits for an event named `name` whose data satisfies `matches`.
fn wait_for_event(
    rx: &mpsc::Receiver<(String, serde_json::Value)>,
    name: &str,
    matches: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let (event, data) = rx.recv_timeout(left).map_err(|_| format!("no {name} event"))?;
        if event == name && matches(&data) {
            return Ok(data);
        }
    }
}

#[test]
fn events_stream_a_killed_worker_and_a_restart_and_resume_from_last_event_id() -> TestResult {
    let (corral, addr) = with_admin(Options::default().instances(1), "")?;
    // From id 0: the kept events first, so nothing is missed while curl connects.
    let (mut stream, rx) = events(addr, Some(0))?;
    let pid = corral.online_pids()?.into_iter().next().ok_or("no worker")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let exited = wait_for_event(&rx, "worker_exited", |d| d["pid"] == pid)?;
    assert_eq!(exited["reason"], "crash");
    assert_eq!(exited["app"], "web");
    assert_eq!(exited["slot"], 0);
    assert!(exited["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{exited}");
    wait_for_event(&rx, "worker_restarting", |d| d["reason"] == "crash")?;
    let ready = wait_for_event(&rx, "worker_ready", |d| d["slot"] == 0)?;
    corral.wait_online(1)?;

    let (code, body) = admin(addr, "POST", "/api/apps/web/restart", &[JSON], None)?;
    assert_eq!(code, 200, "{body}");
    wait_for_event(&rx, "reload_started", |_| true)?;
    wait_for_event(&rx, "worker_exited", |d| {
        d["pid"] == ready["pid"] && d["reason"] == "reload"
    })?;
    let done = wait_for_event(&rx, "reload_done", |_| true)?;
    let _ = stream.kill();
    let _ = stream.wait();

    // Reconnecting with the id of the crash gets everything after it first.
    let id = exited["id"].as_u64().ok_or("id")?;
    let (mut again, rx) = events(addr, Some(id))?;
    let (_, first) = rx.recv_timeout(DEADLINE)?;
    assert_eq!(first["id"].as_u64(), Some(id + 1), "{first}");
    wait_for_event(&rx, "reload_done", |d| d["id"] == done["id"])?;
    let _ = again.kill();
    let _ = again.wait();
    assert!(
        corral.logs().contains("event=worker_exited"),
        "events go to the log too"
    );
    Ok(())
}
