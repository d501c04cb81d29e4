//! Self-upgrade: `corral upgrade`, SIGUSR2, and reloads that change the listeners, all handing
//! the sockets to a new corral process without a failed request; and every way a new process
//! can fail, leaving the old one serving.

mod support;

use std::collections::BTreeSet;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::http::{cookie, get, ws_open, ws_read, Conn};
use support::load::Load;
use support::{alive, poll_until, Corral, Options, PortHold, TestResult, DEADLINE};

/// `corral upgrade ARGS`: (success, stdout + stderr).
fn upgrade(corral: &Corral, args: &[&str]) -> Result<(bool, String), Box<dyn std::error::Error>> {
    let mut all = vec!["upgrade"];
    all.extend_from_slice(args);
    let output = corral.cli(&all)?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok((output.status.success(), text))
}

/// The pid of the corral answering the control socket.
fn front(corral: &Corral) -> Option<u32> {
    corral.status()?["pid"].as_u64().map(|p| p as u32)
}

/// Waits until `n` workers of the first app are online (the harness's own wait stops at the
/// exit of the corral it started, which an upgrade ends on purpose).
fn online(corral: &Corral, n: usize) -> Result<BTreeSet<u32>, Box<dyn std::error::Error>> {
    poll_until(DEADLINE, &format!("{n} workers online"), || {
        let pids = corral.online_pids().ok()?;
        (pids.len() == n).then_some(pids)
    })
    .map_err(|e| corral.explain(e))
}

/// Waits until the previous generation has exited (status shows no other corral).
fn wait_alone(corral: &Corral, old_front: u32) -> TestResult {
    poll_until(DEADLINE, "the previous corral to exit", || {
        let status = corral.status()?;
        (status["upgrade"].is_null() && !alive(old_front)).then_some(())
    })
    .map_err(|e| corral.explain(e))
}

#[test]
fn two_upgrades_under_load_fail_no_request_and_replace_the_front_and_every_worker() -> TestResult {
    let mut corral = Corral::start(Options::default().instances(2))?;
    let first_front = corral.pid();
    let first_workers = corral.online_pids()?;
    let load = Load::start(corral.addr, 3, 1);
    corral.wait_for_requests(30)?;

    let (ok, text) = upgrade(&corral, &[])?;
    assert!(ok, "the upgrade failed:\n{text}\n{}", corral.logs());
    assert!(text.contains("upgraded: corral pid"), "{text}");
    let second_front = front(&corral).ok_or("no status after the upgrade")?;
    assert_ne!(second_front, first_front, "another process answers now");
    // The old one drains, stops its workers and exits 0.
    let exit = corral.wait_exit(DEADLINE)?;
    assert!(exit.success(), "the old corral exited with {exit:?}");
    for pid in &first_workers {
        poll_until(DEADLINE, "an old worker to exit", || (!alive(*pid)).then_some(()))?;
    }
    wait_alone(&corral, first_front)?;
    let second = online(&corral, 2)?;
    corral.wait_for_requests(30)?;

    // SIGUSR2 to the new front does the same, with the binary at the same path.
    kill(Pid::from_raw(second_front as i32), Signal::SIGUSR2)?;
    let third_front = poll_until(DEADLINE, "the SIGUSR2 upgrade", || {
        front(&corral).filter(|&pid| pid != second_front)
    })
    .map_err(|e| corral.explain(e))?;
    wait_alone(&corral, second_front)?;
    online(&corral, 2)?;
    corral.wait_for_requests(30)?;
    let tally = load.finish();
    assert_eq!(tally.failed, 0, "failed requests across two upgrades: {tally:?}");
    assert!(tally.ok > 100, "the load barely ran: {tally:?}");

    let third_workers = corral.online_pids()?;
    assert!(first_workers.is_disjoint(&second) && second.is_disjoint(&third_workers));
    // The workers of the running generation got the requests.
    assert!(corral.total("requests").ok_or("status")? > 30);
    let whoami = get(corral.addr, "/whoami")?.json();
    let pid = whoami["pid"].as_u64().ok_or("pid")? as u32;
    assert!(third_workers.contains(&pid), "{pid} is not one of {third_workers:?}");
    assert!(alive(third_front));
    Ok(())
}

#[test]
fn sse_and_websocket_of_the_old_process_end_cleanly_at_drain_and_the_sticky_cookie_keeps_its_slot() -> TestResult {
    let options = Options::default()
        .instances(2)
        .key("sticky = \"cookie\"")
        .key("drain_timeout = \"2s\"");
    let mut corral = Corral::start(options)?;
    let mut conn = Conn::open(corral.addr)?;
    let first = conn.request("GET", "/session", &[], &[])?;
    let sticky = cookie(&first, "corral_sticky").ok_or("no affinity cookie")?;
    let slot = first.json()["slot"].clone();
    let old_pid = first.json()["pid"].clone();

    let mut sse = Conn::open(corral.addr)?;
    sse.send("GET", "/sse", &[("Accept", "text/event-stream")], &[])?;
    assert_eq!(sse.read_head()?.0, 200);
    assert!(String::from_utf8_lossy(&sse.read_chunk()?.ok_or("no first event")?).contains("\"n\":0"));
    let mut ws = ws_open(corral.addr)?;
    // The worker's greeting.
    ws_read(&mut ws)?;

    let (ok, text) = upgrade(&corral, &[])?;
    assert!(ok, "{text}\n{}", corral.logs());
    // The stream ends with its terminating chunk (EventSource reconnects), the tunnel is
    // closed at drain_timeout, not fed, and the old process exits 0 afterwards.
    while sse.read_chunk()?.is_some() {}
    assert!(ws.read_to_close()?.is_empty(), "the tunnel is closed, not fed");
    let exit = corral.wait_exit(DEADLINE)?;
    assert!(exit.success(), "{exit:?}");

    // The cookie made by the old process is valid for the new one: same slot, new worker,
    // and no new affinity cookie.
    let mut again = Conn::open(corral.addr)?;
    let next = again.request("GET", "/session", &[("Cookie", &sticky)], &[])?;
    assert_eq!(next.json()["slot"], slot, "{}", next.text());
    assert_ne!(next.json()["pid"], old_pid);
    assert!(
        cookie(&next, "corral_sticky").is_none(),
        "the old cookie was not accepted: {:?}",
        next.headers
    );
    assert!(corral.status().is_some());
    Ok(())
}

/// The pid a failure report names as the new corral's.
fn new_pid_in(text: &str) -> Option<u32> {
    text.split("new corral (pid ").nth(1)?.split(')').next()?.parse().ok()
}

#[test]
fn a_new_binary_or_config_that_fails_leaves_the_old_corral_serving_untouched() -> TestResult {
    let options = Options::default().instances(2);
    let corral = Corral::start(options.clone())?;
    let (old_front, old_workers) = (corral.pid(), corral.online_pids()?);
    let load = Load::start(corral.addr, 2, 0);

    // A binary that prints a line and exits.
    let script = corral.dir.path().join("broken-corral");
    std::fs::write(
        &script,
        "#!/bin/sh\necho 'broken build: missing libfoo.so' >&2\nexit 3\n",
    )?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let (ok, text) = upgrade(&corral, &["--binary", &script.display().to_string()])?;
    assert!(!ok, "a broken binary was accepted:\n{text}");
    for needle in [
        "exited (exit status: 3) before taking over",
        "broken build: missing libfoo.so",
        "serves on",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    // A path that does not exist.
    let (ok, text) = upgrade(&corral, &["--binary", "/nonexistent/corral"])?;
    assert!(!ok && text.contains("cannot start /nonexistent/corral"), "{text}");

    // The real binary, and a config that no longer passes check.
    let good = std::fs::read_to_string(&corral.config)?;
    std::fs::write(&corral.config, format!("{good}bogus_key = 1\n"))?;
    let (ok, text) = upgrade(&corral, &[])?;
    assert!(!ok, "{text}");
    assert!(text.contains("bogus_key") && text.contains("serves on"), "{text}");

    // A config whose workers crash at boot: the new process reports the worker's output.
    corral.rewrite_config(&options.clone().env("FIXTURE_BOOT", "crash"))?;
    let (ok, text) = upgrade(&corral, &[])?;
    assert!(!ok, "{text}");
    assert!(text.contains("failed to start") && text.contains("serves on"), "{text}");
    let crashed = new_pid_in(&text).ok_or("no pid in the report")?;
    poll_until(DEADLINE, "the failed new corral to be gone", || {
        (!alive(crashed)).then_some(())
    })?;

    std::fs::write(&corral.config, good)?;
    assert_eq!(front(&corral), Some(old_front));
    assert_eq!(corral.online_pids()?, old_workers, "the old workers serve on");
    let status = corral.status().ok_or("status")?;
    assert!(status["upgrade"].is_null(), "{status}");
    corral.wait_for_requests(20)?;
    let tally = load.finish();
    assert_eq!(tally.failed, 0, "{tally:?}");
    // And it can still upgrade.
    let (ok, text) = upgrade(&corral, &[])?;
    assert!(ok, "{text}\n{}", corral.logs());
    assert_ne!(front(&corral), Some(old_front));
    Ok(())
}

#[test]
fn a_second_upgrade_while_one_runs_is_refused() -> TestResult {
    let options = Options::default().instances(1);
    let corral = Corral::start(options.clone())?;
    let old_front = corral.pid();
    // The new generation's worker takes a while to listen.
    corral.rewrite_config(&options.env("FIXTURE_BOOT_DELAY_MS", "3000"))?;
    let mut first = corral
        .command(&["upgrade"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    poll_until(DEADLINE, "the upgrade to be under way", || {
        let status = corral.status()?;
        (status["upgrade"]["state"] == "starting").then_some(())
    })?;
    let (ok, text) = upgrade(&corral, &[])?;
    assert!(!ok && text.contains("already under way"), "{text}");
    let done = poll_until(DEADLINE, "the first upgrade to finish", || {
        first.try_wait().ok().flatten()
    })?;
    let mut out = String::new();
    if let Some(mut stdout) = first.stdout.take() {
        std::io::Read::read_to_string(&mut stdout, &mut out)?;
    }
    assert!(done.success(), "{out}\n{}", corral.logs());
    assert_ne!(front(&corral), Some(old_front));
    // While the previous one drains, another upgrade waits for it.
    wait_alone(&corral, old_front)?;
    Ok(())
}

/// Reads datagrams from `socket` until one satisfies `done`, returning all read so far.
fn notifications_until(socket: &UnixDatagram, seen: &mut Vec<String>, done: impl Fn(&str) -> bool) -> TestResult {
    let mut buffer = [0u8; 4096];
    poll_until(DEADLINE, "a notification", || {
        let n = socket.recv(&mut buffer).ok()?;
        let text = String::from_utf8_lossy(&buffer[..n]).into_owned();
        seen.push(text.clone());
        done(&text).then_some(())
    })
}

#[test]
fn systemd_hears_the_new_main_pid_and_no_stop_from_the_old_one() -> TestResult {
    let hold = PortHold::new()?;
    let mut corral = Corral::prepare(&Options::default().instances(1).config_text(hold.addr), hold.addr)?;
    let path = corral.dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path)?;
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    hold.release();
    corral.launch(&[], &[("NOTIFY_SOCKET", &path.display().to_string())])?;
    corral.wait_online(1)?;
    let old = corral.pid();
    let mut seen = Vec::new();
    notifications_until(&socket, &mut seen, |m| {
        m.contains("READY=1") && m.contains(&format!("MAINPID={old}"))
    })?;

    let (ok, text) = upgrade(&corral, &[])?;
    assert!(ok, "{text}\n{}", corral.logs());
    let new = front(&corral).ok_or("status")?;
    notifications_until(&socket, &mut seen, |m| {
        m.contains("READY=1") && m.contains(&format!("MAINPID={new}"))
    })?;
    corral.wait_exit(DEADLINE)?;
    // Whatever the old one sent until it exited.
    let mut buffer = [0u8; 4096];
    while let Ok(n) = socket.recv(&mut buffer) {
        seen.push(String::from_utf8_lossy(&buffer[..n]).into_owned());
    }
    assert!(
        !seen.iter().any(|m| m.contains("STOPPING=1")),
        "a STOPPING=1 would stop the unit: {seen:?}"
    );
    Ok(())
}

/// A config of `web` (on `web`) and, if given, `api` (on `api`).
fn two_apps(web: std::net::SocketAddr, api: Option<std::net::SocketAddr>) -> String {
    let mut text = Options::default().instances(2).config_text(web);
    if let Some(api) = api {
        let app = support::fixture("app.js");
        text.push_str(&format!(
            "\n[[app]]\nname = \"api\"\ncommand = [\"node\", {:?}]\nlisten = \"{api}\"\ninstances = 1\nkill_timeout = \"3s\"\n",
            app.display()
        ));
    }
    text
}

#[test]
fn a_reload_that_adds_then_removes_an_app_hands_over_without_failing_a_request() -> TestResult {
    let corral = Corral::start(Options::default().instances(2))?;
    let load = Load::start(corral.addr, 2, 1);
    corral.wait_for_requests(20)?;

    let hold = PortHold::new()?;
    let api = hold.addr;
    std::fs::write(&corral.config, two_apps(corral.addr, Some(api)))?;
    hold.release();
    let output = corral.cli(&["reload"])?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{text}\n{}", corral.logs());
    assert!(text.contains("a new corral process takes over"), "{text}");
    let status = corral.status().ok_or("status")?;
    let names: Vec<&str> = status["apps"]
        .as_array()
        .ok_or("apps")?
        .iter()
        .filter_map(|a| a["name"].as_str())
        .collect();
    assert_eq!(names, ["web", "api"]);
    assert_eq!(get(api, "/whoami")?.status, 200);
    let first_front = status["pid"].as_u64().ok_or("pid")? as u32;
    poll_until(DEADLINE, "the previous corral to exit", || corral.exited())?;
    corral.wait_for_requests(20)?;

    // And away again: its port closes once nothing serves it.
    std::fs::write(&corral.config, two_apps(corral.addr, None))?;
    let output = corral.cli(&["reload"])?;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    wait_alone(&corral, first_front)?;
    poll_until(DEADLINE, "the removed app's port to close", || {
        std::net::TcpStream::connect(api).is_err().then_some(())
    })?;
    corral.wait_for_requests(20)?;
    let tally = load.finish();
    assert_eq!(tally.failed, 0, "{tally:?}");
    Ok(())
}

#[test]
fn a_reload_to_a_listen_address_that_is_taken_fails_cleanly() -> TestResult {
    let corral = Corral::start(Options::default().instances(2))?;
    let (front_pid, workers) = (corral.pid(), corral.online_pids()?);
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?;
    std::fs::write(&corral.config, Options::default().instances(2).config_text(addr))?;
    let output = corral.cli(&["reload"])?;
    let text = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success());
    assert!(
        text.contains(&format!("cannot listen on {addr}"))
            && text.contains("already in use")
            && text.contains("serves on"),
        "{text}"
    );
    assert_eq!(front(&corral), Some(front_pid));
    assert_eq!(corral.online_pids()?, workers);
    assert_eq!(get(corral.addr, "/whoami")?.status, 200);
    Ok(())
}

#[test]
fn a_stop_during_an_upgrade_stops_the_new_corral_too() -> TestResult {
    let options = Options::default().instances(1);
    let mut corral = Corral::start(options.clone())?;
    corral.rewrite_config(&options.env("FIXTURE_BOOT_DELAY_MS", "3000"))?;
    let upgrading = corral
        .command(&["upgrade"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let new = poll_until(DEADLINE, "the new corral to start", || {
        let status = corral.status()?;
        let pid = status["upgrade"]["pid"].as_u64().filter(|&p| p > 1)?;
        (status["upgrade"]["state"] == "starting").then_some(pid as u32)
    })?;
    corral.signal(Signal::SIGTERM)?;
    let output = upgrading.wait_with_output()?;
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && text.contains("stopping"), "{text}");
    let exit = corral.wait_exit(DEADLINE)?;
    assert!(exit.success(), "{exit:?}");
    poll_until(DEADLINE, "the new corral to be stopped", || (!alive(new)).then_some(()))?;
    Ok(())
}
