//! Worker supervision and the front process's stop, through the real binary.

mod support;

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::http::{get, Conn};
use support::{alive, poll_until, Corral, Options, TestResult, DEADLINE};

#[test]
fn a_killed_worker_is_replaced_and_the_front_keeps_answering() -> TestResult {
    let corral = Corral::start(Options::default().instances(2))?;
    let before = corral.online_pids()?;
    let victim = *before.iter().next().ok_or("no worker")?;
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL)?;

    // While the slot restarts, the other worker serves: every request gets an answer, and
    // once the new worker is up the pool is back to two distinct, live workers.
    let after = poll_until(DEADLINE, "a replacement worker online", || {
        let pids = corral.online_pids().ok()?;
        (pids.len() == 2 && !pids.contains(&victim)).then_some(pids)
    })
    .map_err(|e| corral.explain(e))?;
    assert!(!alive(victim));
    let mut answered = std::collections::BTreeSet::new();
    for _ in 0..10 {
        let response = get(corral.addr, "/whoami")?;
        assert_eq!(response.status, 200, "{}", response.text());
        answered.insert(response.json()["pid"].as_u64().unwrap_or(0) as u32);
    }
    assert_eq!(answered, after);
    let workers = corral.workers()?;
    let restarted = workers
        .iter()
        .find(|w| w["restarts"] == 1)
        .ok_or("no slot shows a restart")?;
    assert!(
        restarted["last_exit"].as_str().unwrap_or("").contains("SIGKILL"),
        "{restarted}"
    );
    Ok(())
}

#[test]
fn sigterm_finishes_the_request_in_flight_then_exits_0_leaving_no_worker() -> TestResult {
    let mut corral = Corral::start(Options::default().instances(2))?;
    let workers = corral.online_pids()?;
    let addr = corral.addr;
    let slow = std::thread::spawn(move || get(addr, "/slow?ms=2000"));
    poll_until(DEADLINE, "the slow request to be in flight", || {
        let busy: u64 = corral.total("in_flight")?;
        (busy == 1).then_some(())
    })?;

    corral.signal(Signal::SIGTERM)?;
    let response = slow.join().map_err(|_| "client thread panicked")??;
    assert_eq!(response.status, 200);
    assert_eq!(response.text(), "slow done");

    let status = corral.wait_exit(DEADLINE)?;
    assert_eq!(status.code(), Some(0), "{}", corral.logs());
    for pid in workers {
        assert!(!alive(pid), "worker {pid} outlived corral");
    }
    let logs = corral.logs();
    assert!(logs.contains("SIGTERM: stopping gracefully"), "{logs}");
    // The public port is closed after the stop.
    assert!(std::net::TcpStream::connect(addr).is_err());
    Ok(())
}

#[test]
fn new_connections_are_refused_while_stopping_but_open_ones_finish() -> TestResult {
    let mut corral = Corral::start(Options::default().instances(1))?;
    let addr = corral.addr;
    let slow = std::thread::spawn(move || get(addr, "/slow?ms=1500"));
    poll_until(DEADLINE, "the slow request to be in flight", || {
        let busy: u64 = corral.total("in_flight")?;
        (busy == 1).then_some(())
    })?;
    corral.signal(Signal::SIGINT)?;
    poll_until(DEADLINE, "the public socket to close", || {
        std::net::TcpStream::connect(addr).is_err().then_some(())
    })?;
    assert_eq!(slow.join().map_err(|_| "client thread panicked")??.text(), "slow done");
    assert_eq!(corral.wait_exit(DEADLINE)?.code(), Some(0));
    Ok(())
}

#[test]
fn corral_stop_waits_for_a_clean_exit() -> TestResult {
    let mut corral = Corral::start(Options::default().instances(2))?;
    let workers = corral.online_pids()?;
    // An idle keep-alive connection must not hold the stop up.
    let mut idle = Conn::open(corral.addr)?;
    assert_eq!(idle.get("/whoami")?.status, 200);

    let stop = corral.cli(&["stop"])?;
    assert!(
        stop.status.success(),
        "corral stop failed: {}",
        String::from_utf8_lossy(&stop.stderr)
    );
    assert!(String::from_utf8_lossy(&stop.stdout).contains("stopped"));
    assert_eq!(corral.wait_exit(DEADLINE)?.code(), Some(0));
    for pid in workers {
        assert!(!alive(pid), "worker {pid} outlived corral");
    }
    // With nothing running, the CLI says so plainly.
    let status = corral.cli(&["status"])?;
    assert_eq!(status.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&status.stderr).contains("not running"),
        "{status:?}"
    );
    Ok(())
}

#[test]
fn sigkill_of_the_front_takes_every_worker_with_it() -> TestResult {
    let mut corral = Corral::start(Options::default().instances(2))?;
    let workers = corral.online_pids()?;
    corral.signal(Signal::SIGKILL)?;
    corral.wait_exit(DEADLINE)?;
    poll_until(Duration::from_secs(2), "workers to die with the front process", || {
        workers.iter().all(|&pid| !alive(pid)).then_some(())
    })?;
    Ok(())
}

#[test]
fn a_worker_that_ignores_the_stop_signal_is_killed_after_kill_timeout() -> TestResult {
    let mut corral = Corral::start(
        Options::default()
            .instances(1)
            .key("kill_timeout = \"1s\"")
            .env("FIXTURE_IGNORE_TERM", "1"),
    )?;
    let workers = corral.online_pids()?;
    corral.signal(Signal::SIGTERM)?;
    assert_eq!(corral.wait_exit(DEADLINE)?.code(), Some(0));
    for pid in workers {
        assert!(!alive(pid));
    }
    let logs = corral.logs();
    assert!(logs.contains("did not exit within kill_timeout"), "{logs}");
    assert!(logs.contains("was killed by SIGKILL"), "{logs}");
    Ok(())
}

#[test]
fn a_worker_that_crashes_at_boot_is_reported_and_retried_with_backoff() -> TestResult {
    // The worker must get the time to start and crash by itself: with 1 s, a Node process that
    // had not reached its first line under a loaded machine was stopped as never ready, and
    // the slot's last exit was that SIGTERM instead of the crash.
    let corral = Corral::start(Options {
        wait_online: Some(0),
        ..Options::default()
            .instances(1)
            .key("listen_timeout = \"5s\"")
            .env("FIXTURE_BOOT", "crash")
    })?;
    let worker = poll_until(DEADLINE, "a few restarts", || {
        let workers = corral.workers().ok()?;
        let w = workers.into_iter().next()?;
        (w["restarts"].as_u64()? >= 3).then_some(w)
    })?;
    assert!(
        worker["last_exit"]
            .as_str()
            .unwrap_or("")
            .contains("exited with code 1"),
        "{worker}"
    );
    let logs = corral.logs();
    assert!(logs.contains("before it was ready"), "{logs}");
    assert!(
        logs.contains("fixture: crashing at boot as asked"),
        "the worker's last output is reported: {logs}"
    );
    // Clients get a clear 503 while no worker is ready.
    let response = get(corral.addr, "/")?;
    assert_eq!(response.status, 503);
    assert!(response.text().contains("no worker is ready"), "{}", response.text());
    Ok(())
}

#[test]
fn a_worker_that_never_listens_is_reported_at_listen_timeout() -> TestResult {
    let corral = Corral::start(Options {
        wait_online: Some(0),
        ..Options::default()
            .instances(1)
            .key("listen_timeout = \"3s\"")
            .env("FIXTURE_BOOT", "never-listen")
    })?;
    // The report carries the worker's last output. A Node process slow to start on a loaded
    // machine may not have printed anything by its timeout; the next attempt does.
    poll_until(DEADLINE, "a listen_timeout report with the worker's output", || {
        let logs = corral.logs();
        let reported = logs.split("on its port within listen_timeout").skip(1).any(|rest| {
            rest.lines()
                .nth(1)
                .is_some_and(|line| line.contains("fixture: not listening, as asked"))
        });
        reported.then_some(())
    })?;
    poll_until(DEADLINE, "a restart of the slot", || {
        (corral.workers().ok()?.first()?["restarts"].as_u64()? >= 1).then_some(())
    })?;
    Ok(())
}

#[test]
fn a_proxied_app_and_a_plain_process_run_side_by_side() -> TestResult {
    support::require_node();
    let hold = support::PortHold::new()?;
    let config = format!(
        "[[app]]\nname = \"web\"\ncommand = [\"node\", {:?}]\nlisten = \"{}\"\n\n[[app]]\nname = \"jobs\"\ncommand = [\"node\", {:?}]\ninstances = 2\n",
        support::fixture("app.js").display(),
        hold.addr,
        support::fixture("plain.js").display()
    );
    let mut corral = Corral::spawn_with_config(&config, hold.addr)?;
    let status = poll_until(DEADLINE, "both apps running", || {
        let status = corral.status()?;
        let ready = |i: usize| status["apps"][i]["ready"].as_u64();
        (ready(0)? == 1 && ready(1)? == 2).then_some(status)
    })
    .map_err(|e| corral.explain(e))?;
    hold.release();
    assert_eq!(status["apps"][1]["name"], "jobs");
    assert!(status["apps"][1]["listen"].is_null());
    for worker in status["apps"][1]["workers"].as_array().ok_or("workers")? {
        assert!(worker["port"].is_null(), "a plain process gets no port: {worker}");
    }
    assert_eq!(get(corral.addr, "/whoami")?.status, 200);
    poll_until(DEADLINE, "the plain workers' output", || {
        let logs = corral.logs();
        (logs.contains("jobs.0 | plain worker 0 running, PORT=unset")
            && logs.contains("jobs.1 | plain worker 1 running"))
        .then_some(())
    })?;

    // Per-app commands: status, stop and reload of one app leave the other alone.
    let only_jobs = corral.cli(&["status", "jobs", "--json"])?;
    let only_jobs: serde_json::Value = serde_json::from_slice(&only_jobs.stdout)?;
    assert_eq!(only_jobs["apps"].as_array().map(Vec::len), Some(1));
    let jobs: Vec<u32> = only_jobs["apps"][0]["workers"]
        .as_array()
        .ok_or("workers")?
        .iter()
        .filter_map(|w| w["pid"].as_u64().map(|p| p as u32))
        .collect();
    let stop = corral.cli(&["stop", "jobs"])?;
    assert!(stop.status.success(), "{}", String::from_utf8_lossy(&stop.stderr));
    poll_until(DEADLINE, "the jobs workers to stop", || {
        let status = corral.status()?;
        let workers = status["apps"][1]["workers"].as_array()?.clone();
        workers.iter().all(|w| w["state"] == "stopped").then_some(())
    })
    .map_err(|e| corral.explain(e))?;
    for pid in &jobs {
        assert!(!alive(*pid), "jobs worker {pid} still runs");
    }
    assert_eq!(get(corral.addr, "/whoami")?.status, 200, "the other app still serves");
    let reload = corral.cli(&["reload", "jobs"])?;
    assert!(reload.status.success(), "{}", String::from_utf8_lossy(&reload.stderr));
    poll_until(DEADLINE, "jobs running again", || {
        (corral.status()?["apps"][1]["ready"] == 2).then_some(())
    })?;
    let table = String::from_utf8_lossy(&corral.cli(&["status"])?.stdout).into_owned();
    assert!(table.contains("CPU") && table.contains("MEMORY"), "{table}");

    let pids: std::collections::BTreeSet<u32> = corral
        .online_pids()?
        .into_iter()
        .chain(
            corral.status().ok_or("status")?["apps"][1]["workers"]
                .as_array()
                .ok_or("workers")?
                .iter()
                .filter_map(|w| w["pid"].as_u64().map(|p| p as u32)),
        )
        .collect();
    assert_eq!(pids.len(), 3);
    corral.signal(Signal::SIGTERM)?;
    assert_eq!(corral.wait_exit(DEADLINE)?.code(), Some(0));
    for pid in pids {
        assert!(!alive(pid), "worker {pid} outlived corral");
    }
    Ok(())
}

#[test]
fn after_the_front_is_sigkilled_a_new_run_stops_the_leftovers_and_starts_cleanly() -> TestResult {
    let mut corral = Corral::start(Options::default().instances(1).env("FIXTURE_SPAWN_CHILD", "1"))?;
    let child: u32 = poll_until(DEADLINE, "the worker's child pid", || {
        corral
            .logs()
            .split("fixture: child pid ")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })?;
    let worker = *corral.online_pids()?.iter().next().ok_or("no worker")?;
    corral.signal(Signal::SIGKILL)?;
    corral.wait_exit(DEADLINE)?;
    poll_until(DEADLINE, "the worker to die with the front", || {
        (!alive(worker)).then_some(())
    })?;
    assert!(
        alive(child),
        "the worker's own child outlives it (what leftovers cleanup is for)"
    );

    corral.respawn()?;
    let workers = corral.wait_online(1)?;
    assert_eq!(workers.len(), 1, "no duplicate workers");
    poll_until(DEADLINE, "the leftover to be stopped", || (!alive(child)).then_some(()))?;
    assert!(
        corral.logs().contains("stopping a leftover process of a previous run"),
        "{}",
        corral.logs()
    );
    assert!(!corral.logs().contains("cannot listen"), "no port error on restart");
    assert_eq!(get(corral.addr, "/whoami")?.status, 200);
    Ok(())
}

#[test]
fn systemd_notifications_follow_start_reload_and_stop() -> TestResult {
    support::require_node();
    let hold = support::PortHold::new()?;
    let sockets = tempfile::tempdir()?;
    let notify_path = sockets.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path)?;
    notify.set_read_timeout(Some(DEADLINE))?;
    let config = Options::default().instances(1).config_text(hold.addr);
    let notify_env = notify_path.to_string_lossy().into_owned();
    let mut corral = Corral::spawn_with_env(&config, hold.addr, &[("NOTIFY_SOCKET", &notify_env)])?;
    let next = || -> Result<String, Box<dyn std::error::Error>> {
        let mut buffer = [0u8; 512];
        let n = notify.recv(&mut buffer)?;
        Ok(String::from_utf8_lossy(&buffer[..n]).into_owned())
    };
    let ready = next()?;
    assert!(
        ready.starts_with("READY=1") && ready.contains(&format!("MAINPID={}", corral.pid())),
        "{ready}"
    );
    hold.release();
    assert_eq!(get(corral.addr, "/whoami")?.status, 200, "READY=1 means serving");

    corral.signal(Signal::SIGHUP)?;
    assert!(next()?.starts_with("RELOADING=1"));
    assert!(next()?.starts_with("READY=1"));
    corral.signal(Signal::SIGTERM)?;
    assert!(next()?.starts_with("STOPPING=1"));
    assert_eq!(corral.wait_exit(DEADLINE)?.code(), Some(0));
    Ok(())
}

#[test]
fn startup_prints_a_notify_unit_for_this_config() -> TestResult {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.example.toml");
    let output = std::process::Command::new(support::corral_bin())
        .args(["startup", "-c"])
        .arg(&example)
        .output()?;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let unit = String::from_utf8_lossy(&output.stdout);
    for needle in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillMode=mixed",
        "systemctl enable --now",
        "[Install]",
    ] {
        assert!(unit.contains(needle), "{needle} missing:\n{unit}");
    }
    assert!(unit.contains(&format!("run -c {}", example.display())), "{unit}");
    Ok(())
}

#[test]
fn the_container_config_in_deploy_passes_check() -> TestResult {
    // deploy/proxy.toml runs in the image, where /app exists and the Secret sets the token.
    let dir = tempfile::tempdir()?;
    let text = std::fs::read_to_string(support::fixture("../../deploy/proxy.toml"))?
        .replace("cwd = \"/app\"", &format!("cwd = {:?}", dir.path()));
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, text)?;
    let out = std::process::Command::new(support::corral_bin())
        .args(["check", "-c"])
        .arg(&config)
        .env("CORRAL_ADMIN_TOKEN", "a-token-of-at-least-16-characters")
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}
