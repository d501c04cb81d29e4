//! PM2's restart policy: backoff, max_restarts, stop_exit_codes, autorestart.

mod support;

use std::time::Instant;

use support::http::get;
use support::{poll_until, Corral, Options, TestResult, DEADLINE};

fn slot_state(corral: &Corral) -> Option<(String, u64)> {
    let workers = corral.workers().ok()?;
    let w = workers.first()?;
    Some((w["state"].as_str()?.to_owned(), w["restarts"].as_u64()?))
}

#[test]
fn a_crash_loop_backs_off_then_is_errored_and_the_front_answers_503() -> TestResult {
    let started = Instant::now();
    let corral = Corral::start(Options {
        wait_online: Some(0),
        ..Options::default()
            .instances(1)
            .key("listen_timeout = \"1s\"")
            .key("max_restarts = 5")
            .env("FIXTURE_BOOT", "crash")
    })?;
    poll_until(DEADLINE, "five restarts", || {
        (slot_state(&corral)?.1 >= 5).then_some(())
    })?;
    // Restart n is counted at the n-th crash; 100 + 200 + 400 + 800 ms of backoff lie between
    // the first crash and the fifth: a crash loop is slowed down, not hammered (a slow machine
    // only makes this longer).
    assert!(
        started.elapsed().as_millis() >= 1500,
        "five restarts in {:?}",
        started.elapsed()
    );
    let (state, restarts) = poll_until(DEADLINE, "the slot to be errored", || {
        let (state, restarts) = slot_state(&corral)?;
        (state == "errored").then_some((state, restarts))
    })
    .map_err(|e| corral.explain(e))?;
    assert_eq!(state, "errored");
    assert!(restarts <= 6, "{restarts} restarts with max_restarts = 5");
    assert!(corral.logs().contains("the slot is errored"), "{}", corral.logs());

    let asked = Instant::now();
    let response = get(corral.addr, "/")?;
    eprintln!("503 answered in {:?}", asked.elapsed());
    assert_eq!(response.status, 503);
    assert_eq!(response.header("retry-after"), Some("1"));
    assert!(response.text().contains("no worker is ready"));
    // Still errored a moment later: nothing restarts it but a reload.
    assert_eq!(slot_state(&corral).map(|s| s.0).as_deref(), Some("errored"));
    Ok(())
}

#[test]
fn an_exit_code_in_stop_exit_codes_is_not_restarted() -> TestResult {
    let corral = Corral::start(Options {
        wait_online: Some(0),
        ..Options::default()
            .instances(1)
            .key("stop_exit_codes = [3]")
            .env("FIXTURE_EXIT_AFTER_MS", "300")
            .env("FIXTURE_EXIT_CODE", "3")
    })?;
    let (state, restarts) = poll_until(DEADLINE, "the slot to be stopped", || {
        let (state, restarts) = slot_state(&corral)?;
        (state == "stopped").then_some((state, restarts))
    })
    .map_err(|e| corral.explain(e))?;
    assert_eq!((state.as_str(), restarts), ("stopped", 0));
    Ok(())
}

#[test]
fn autorestart_false_leaves_an_exited_worker_down_and_a_reload_brings_it_back() -> TestResult {
    let options = Options::default().instances(1).key("autorestart = false");
    let corral = Corral::start(Options {
        wait_online: Some(0),
        ..options.clone().env("FIXTURE_EXIT_AFTER_MS", "300")
    })?;
    poll_until(DEADLINE, "the slot to be stopped", || {
        (slot_state(&corral)?.0 == "stopped").then_some(())
    })
    .map_err(|e| corral.explain(e))?;
    corral.rewrite_config(&options)?;
    let reload = corral.cli(&["reload"])?;
    assert!(reload.status.success(), "{}", String::from_utf8_lossy(&reload.stderr));
    assert_eq!(get(corral.addr, "/whoami")?.status, 200);
    Ok(())
}

#[test]
fn a_worker_over_max_memory_restart_is_replaced_without_failing_a_request() -> TestResult {
    let corral = Corral::start(Options::default().instances(2).key("max_memory_restart = \"200M\""))?;
    let workers = corral.workers()?;
    let leaky = &workers[0];
    let (pid, slot) = (leaky["pid"].as_u64().ok_or("pid")?, leaky["slot"].clone());
    let port = leaky["port"].as_u64().ok_or("port")? as u16;
    let load = support::load::Load::start(corral.addr, 2, 1);
    let response = get(std::net::SocketAddr::from(([127, 0, 0, 1], port)), "/leak?mb=250")?;
    assert_eq!(response.status, 200, "{}", response.text());
    let replacement = poll_until(DEADLINE, "a replacement for the leaking worker", || {
        let workers = corral.workers().ok()?;
        let old_gone = !workers.iter().any(|w| w["pid"] == pid);
        let new = workers
            .iter()
            .find(|w| w["slot"] == slot && w["state"] == "online" && w["pid"] != pid)?;
        old_gone.then(|| new.clone())
    })
    .map_err(|e| corral.explain(e))?;
    let tally = load.finish();
    assert_eq!(tally.failed, 0, "failed requests: {:?}", tally.failures);
    let why = replacement["last_exit"].as_str().unwrap_or_default();
    assert!(
        why.contains("over max_memory_restart 200.0M"),
        "status shows the reason: {replacement}"
    );
    assert!(corral.logs().contains("replacing it without downtime"));
    Ok(())
}

#[test]
fn scaling_2_to_4_to_1_under_load_fails_no_request() -> TestResult {
    let corral = Corral::start(Options::default().instances(2))?;
    let load = support::load::Load::start(corral.addr, 2, 1);
    let up = corral.cli(&["scale", "web", "+2"])?;
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    assert!(String::from_utf8_lossy(&up.stdout).contains("from 2 to 4"));
    corral.wait_online(4)?;
    let four = corral.online_pids()?;
    let down = corral.cli(&["scale", "web", "1"])?;
    assert!(down.status.success(), "{}", String::from_utf8_lossy(&down.stderr));
    poll_until(DEADLINE, "three workers to drain and stop", || {
        let workers = corral.workers().ok()?;
        (workers.len() == 1 && workers[0]["state"] == "online").then_some(())
    })
    .map_err(|e| corral.explain(e))?;
    let tally = load.finish();
    assert_eq!(tally.failed, 0, "failed requests: {:?}", tally.failures);
    let left = corral.online_pids()?;
    assert!(
        left.is_subset(&four),
        "scaling down keeps a running worker: {left:?} of {four:?}"
    );
    for pid in four.difference(&left) {
        poll_until(DEADLINE, "a removed worker to exit", || {
            (!support::alive(*pid)).then_some(())
        })?;
    }
    let bad = corral.cli(&["scale", "nope", "3"])?;
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("no app named"));
    let zero = corral.cli(&["scale", "web", "0"])?;
    assert!(!zero.status.success());
    Ok(())
}

#[test]
fn with_wait_ready_a_worker_enters_rotation_only_after_process_send_ready() -> TestResult {
    let corral = Corral::start(
        Options::default()
            .instances(1)
            .key("wait_ready = true")
            .env("FIXTURE_READY_AFTER_MS", "1500"),
    )?;
    assert_eq!(get(corral.addr, "/whoami")?.status, 200);
    let logs = corral.logs();
    let listening = logs.find("listening on").ok_or("the worker never listened")?;
    let said_ready = logs
        .find("fixture: sending ready")
        .ok_or("the worker never sent ready")?;
    let ready = logs.find("worker ready").ok_or("corral never saw it ready")?;
    assert!(listening < said_ready, "{logs}");
    // corral counted the worker ready only after the message, which came 1.5 s after listening.
    let boot_ms: u64 = logs[ready..]
        .split("boot_ms=")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .ok_or("boot_ms")?;
    assert!(
        boot_ms >= 1500,
        "ready after {boot_ms} ms, before the worker said so\n{logs}"
    );
    Ok(())
}

#[test]
fn with_wait_ready_a_worker_that_never_says_so_is_reported() -> TestResult {
    let corral = Corral::start(Options {
        wait_online: Some(0),
        ..Options::default()
            .instances(1)
            .key("wait_ready = true")
            .key("listen_timeout = \"3s\"")
    })?;
    // It listened (the fixture prints so once it does), but never said ready. A Node process
    // slow to start on a loaded machine may reach neither within one attempt: poll for both.
    poll_until(DEADLINE, "the listen_timeout report of a worker that listened", || {
        let logs = corral.logs();
        (logs.contains("did not call process.send('ready') within listen_timeout")
            && logs.contains("fixture: slot 0 listening on"))
        .then_some(())
    })?;
    Ok(())
}

/// The uid and gid of a running process, from `/proc/PID/status`.
fn ids_of(pid: u64) -> Option<(u32, u32)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u32> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some((field("Uid:")?, field("Gid:")?))
}

#[test]
fn with_user_a_root_corral_runs_its_workers_as_that_user() -> TestResult {
    if !nix::unistd::geteuid().is_root() {
        // Switching users needs root: CI runs as root, and so does this check.
        return Err("this test needs root (CI runs as root)".into());
    }
    let nobody = nix::unistd::User::from_name("nobody")?.ok_or("no user nobody")?;
    // The worker's program must be readable by that user wherever the tests run from.
    let app_dir = tempfile::tempdir()?;
    std::fs::set_permissions(app_dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let script = app_dir.path().join("app.js");
    std::fs::copy(support::fixture("app.js"), &script)?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    let hold = support::PortHold::new()?;
    let config = format!(
        "[[app]]\nname = \"web\"\ncommand = [\"node\", {:?}]\ncwd = {:?}\nlisten = \"{}\"\ninstances = 2\nuser = \"nobody\"\n",
        script.display(),
        app_dir.path().display(),
        hold.addr
    );
    let corral = Corral::spawn_with_config(&config, hold.addr)?;
    let workers = corral.wait_online(2)?;
    hold.release();
    for worker in &workers {
        let pid = worker["pid"].as_u64().ok_or("no pid")?;
        assert_eq!(
            ids_of(pid),
            Some((nobody.uid.as_raw(), nobody.gid.as_raw())),
            "worker {pid}"
        );
        let env = std::fs::read(format!("/proc/{pid}/environ"))?;
        assert!(
            env.split(|&b| b == 0).any(|kv| kv == b"USER=nobody"),
            "USER names the worker's user"
        );
    }
    assert_eq!(get(corral.addr, "/whoami")?.status, 200);
    assert_eq!(
        ids_of(u64::from(corral.pid())).map(|(uid, _)| uid),
        Some(0),
        "corral stays root"
    );
    Ok(())
}
