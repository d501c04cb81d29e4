//! Restarts corral makes by itself: `watch` (file changes under an app's `cwd` restart it,
//! rolling, once per burst; ignored paths and corral's own log files, written under the
//! watched tree, never do) and `cron_restart` (at the minute).

mod support;

use std::path::Path;

use support::load::Load;
use support::{poll_until, Corral, Options, TestResult, DEADLINE};

/// Every worker runs `generation` (and there are `n` of them online).
fn all_at(corral: &Corral, n: usize, generation: u64) -> Option<()> {
    let workers = corral.workers().ok()?;
    let online: Vec<_> = workers.iter().filter(|w| w["state"] == "online").collect();
    (online.len() == n && workers.len() == n && online.iter().all(|w| w["generation"] == generation)).then_some(())
}

fn watch_events(corral: &Corral) -> Vec<String> {
    corral
        .logs()
        .lines()
        .filter(|l| l.contains("event=watch_restart"))
        .map(str::to_owned)
        .collect()
}

fn write(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, text)
}

#[test]
fn a_burst_of_changes_is_one_rolling_restart_and_ignored_files_are_none() -> TestResult {
    // The app's tree lives in the harness's temp dir, beside the config: `site/`.
    let options = Options::default()
        .instances(2)
        .key("cwd = \"site\"")
        .key("watch = true")
        .key("watch_delay = \"300ms\"")
        // The workers' own output is written under the watched tree.
        .key("out_file = \"site/logs/web-out.log\"");
    let hold = support::PortHold::new()?;
    let corral = Corral::prepare(&options.config_text(hold.addr), hold.addr)?;
    let site = corral.dir.path().join("site");
    write(&site.join("src/server.js"), "// v1\n")?;
    write(&site.join("node_modules/pkg/index.js"), "// dependency\n")?;
    hold.release();
    corral.launch(&[], &[])?;
    corral.wait_online(2)?;
    poll_until(DEADLINE, "the watcher to start", || {
        corral.logs().contains("watching files for changes").then_some(())
    })?;
    let load = Load::start(corral.addr, 2, 1);

    // A build writing many files quickly: one restart after it.
    for i in 0..30 {
        write(&site.join("src/server.js"), &format!("// v{i}\n"))?;
        write(&site.join(format!("src/chunk-{}.js", i % 5)), "x")?;
    }
    write(&site.join("src/new/module.js"), "// added\n")?;
    poll_until(DEADLINE, "every worker replaced once", || all_at(&corral, 2, 2)).map_err(|e| corral.explain(e))?;

    // Ignored paths change: node_modules, and the log files the workers keep writing.
    write(&site.join("node_modules/pkg/index.js"), "// updated dependency\n")?;
    write(&site.join(".git/HEAD"), "ref: refs/heads/main\n")?;
    // A file in a directory created after the watcher started: watched too.
    write(&site.join("src/new/module.js"), "// changed\n")?;
    poll_until(DEADLINE, "the second restart", || all_at(&corral, 2, 3)).map_err(|e| corral.explain(e))?;

    let tally = load.finish();
    assert_eq!(tally.failed, 0, "{:?}", tally.failures);
    assert!(tally.ok > 0);
    // Two bursts, two restarts, and nothing since: not the workers' log lines, not ignored files.
    let events = watch_events(&corral);
    assert_eq!(events.len(), 2, "{events:#?}");
    assert!(events[1].contains("src/new/module.js"), "{}", events[1]);
    for event in &events {
        assert!(
            !event.contains("node_modules") && !event.contains(".git") && !event.contains("logs/"),
            "{event}"
        );
    }
    assert!(all_at(&corral, 2, 3).is_some(), "{:?}", corral.workers());
    Ok(())
}

#[test]
fn cron_restart_replaces_every_worker_at_the_minute_without_a_failed_request() -> TestResult {
    // "* * * * *" fires at the next minute boundary: within 60 s of the start.
    let corral = Corral::start(Options::default().instances(2).key("cron_restart = \"* * * * *\""))?;
    assert!(corral.logs().contains("cron_restart scheduled"), "{}", corral.logs());
    let load = Load::start(corral.addr, 2, 1);
    poll_until(std::time::Duration::from_secs(120), "the cron restart", || {
        all_at(&corral, 2, 2)
    })
    .map_err(|e| corral.explain(e))?;
    let tally = load.finish();
    assert_eq!(tally.failed, 0, "{:?}", tally.failures);
    assert!(tally.ok > 0);
    poll_until(DEADLINE, "the cron_restart event", || {
        corral.logs().contains("event=cron_restart").then_some(())
    })?;
    Ok(())
}
