//! `corral start` (detached, like `pm2 start`), `corral describe`, and `--env NAME` with
//! `[app.env_NAME]` tables on start and reload.

mod support;

use std::net::SocketAddr;
use std::process::Output;

use support::{alive, poll_until, Corral, Options, PortHold, TestResult, DEADLINE};

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A config for `options` written beside an empty runtime directory; nothing started.
fn prepared(options: &Options) -> Result<(Corral, PortHold), Box<dyn std::error::Error>> {
    let hold = PortHold::new()?;
    let corral = Corral::prepare(&options.config_text(hold.addr), hold.addr)?;
    Ok((corral, hold))
}

/// The worker's value of environment variable `name`, through corral.
fn worker_env(addr: SocketAddr, name: &str) -> Result<String, Box<dyn std::error::Error>> {
    Ok(support::http::get(addr, &format!("/env?name={name}"))?.text())
}

/// The session id of process `pid` (field 6 of /proc/PID/stat).
fn session_of(pid: u64) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 2..];
    after_name.split_whitespace().nth(3)?.parse().ok()
}

#[test]
fn start_returns_once_ready_and_the_instance_outlives_it_until_stop() -> TestResult {
    let options = Options::default()
        .instances(2)
        .env("GREETING", "plain")
        .key("[app.env_production]\nGREETING = \"production\"\nEXTRA = \"only in production\"");
    let (corral, hold) = prepared(&options)?;
    hold.release();
    let started = corral.cli(&["start", "--env", "production"])?;
    assert!(started.status.success(), "{}", text(&started));
    let shown = text(&started);
    assert!(
        shown.contains("online") && shown.contains("running in the background"),
        "{shown}"
    );

    // `start` has returned; the instance it left serves, in a session of its own.
    let status = corral.status().ok_or("no status after start")?;
    let front = status["pid"].as_u64().ok_or("pid")?;
    assert_eq!(session_of(front), Some(front), "not a session leader");
    assert_eq!(status["env"], "production");
    assert_eq!(worker_env(corral.addr, "GREETING")?, "production");
    assert_eq!(worker_env(corral.addr, "EXTRA")?, "only in production");

    // A second start refuses.
    let again = corral.cli(&["start"])?;
    assert!(!again.status.success(), "{}", text(&again));
    assert!(text(&again).contains("already running"), "{}", text(&again));

    // A reload without --env keeps production; one naming an env no app has is refused.
    let reload = corral.cli(&["reload"])?;
    assert!(reload.status.success(), "{}", text(&reload));
    assert_eq!(worker_env(corral.addr, "GREETING")?, "production");
    let refused = corral.cli(&["reload", "--env", "staging"])?;
    assert!(
        !refused.status.success() && text(&refused).contains("env_staging"),
        "{}",
        text(&refused)
    );
    assert_eq!(worker_env(corral.addr, "GREETING")?, "production");

    // describe: the app's settings, workers and log paths.
    let described = corral.cli(&["describe", "web"])?;
    let shown = text(&described);
    assert!(described.status.success(), "{shown}");
    for worker in corral.workers()? {
        let pid = worker["pid"].as_u64().ok_or("pid")?;
        assert!(shown.contains(&pid.to_string()), "pid {pid} missing: {shown}");
    }
    for expected in [
        "command",
        "app.js",
        "env vars",
        "GREETING",
        "production",
        "restart",
        "out_file",
    ] {
        assert!(shown.contains(expected), "{expected:?} missing: {shown}");
    }
    assert!(
        !shown.contains("only in production"),
        "an environment value was printed: {shown}"
    );

    let stop = corral.cli(&["stop"])?;
    assert!(stop.status.success(), "{}", text(&stop));
    poll_until(DEADLINE, "the started corral to exit", || {
        (!alive(front as u32)).then_some(())
    })?;
    let log = corral
        .runtime_dir()
        .read_dir()?
        .filter_map(Result::ok)
        .find(|e| e.path().extension().is_some_and(|x| x == "log"));
    let log = std::fs::read_to_string(log.ok_or("no corral log in the runtime dir")?.path())?;
    assert!(log.contains("accepting connections"), "{log}");
    Ok(())
}

#[test]
fn a_start_whose_worker_crashes_reports_it_and_leaves_nothing_running() -> TestResult {
    let options = Options::default().instances(1).env("FIXTURE_BOOT", "crash");
    let (corral, hold) = prepared(&options)?;
    hold.release();
    let started = corral.cli(&["start"])?;
    let shown = text(&started);
    assert!(!started.status.success(), "{shown}");
    assert!(shown.contains("failed to start"), "{shown}");
    assert!(
        shown.contains("crashing at boot"),
        "the worker's output is missing: {shown}"
    );
    assert!(shown.contains("stopped"), "{shown}");
    // Nothing runs for the config any more.
    let status = corral.cli(&["status"])?;
    assert_eq!(status.status.code(), Some(3), "{}", text(&status));
    Ok(())
}

#[test]
fn run_with_env_merges_the_named_table_and_an_unknown_name_is_a_config_error() -> TestResult {
    let options = Options::default()
        .instances(1)
        .env("GREETING", "plain")
        .env("KEPT", "from env")
        .key("[app.env_staging]\nGREETING = \"staging\"");
    let (corral, hold) = prepared(&options)?;
    let wrong = corral.cli(&["run", "--env", "prod"])?;
    assert_eq!(wrong.status.code(), Some(78), "{}", text(&wrong));
    assert!(
        text(&wrong).contains("env_staging"),
        "the known names are listed: {}",
        text(&wrong)
    );
    hold.release();
    corral.launch(&[], &[])?;
    corral.wait_online(1)?;
    assert_eq!(worker_env(corral.addr, "GREETING")?, "plain");
    // The same instance, reloaded into staging: staging's value, env's others kept.
    let reload = corral.cli(&["reload", "--env", "staging"])?;
    assert!(reload.status.success(), "{}", text(&reload));
    assert_eq!(worker_env(corral.addr, "GREETING")?, "staging");
    assert_eq!(worker_env(corral.addr, "KEPT")?, "from env");
    assert_eq!(corral.status().ok_or("status")?["env"], "staging");
    Ok(())
}
