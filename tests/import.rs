//! `corral import`: PM2 ecosystem files (tests/fixtures/pm2/) to proxy.toml, through the real
//! binary and the real `node`.
//!
//! - Golden files: the output of `corral import FILE` run in the fixture folder must equal
//!   `tests/fixtures/pm2/<golden>.toml` byte for byte. `CORRAL_BLESS=1` rewrites the goldens
//!   from the current output (then review the diff).
//! - Import, check, run: each fixture is copied with the Node apps it names into a temp dir,
//!   imported there with `-o`, checked with `corral check`, and run with `corral run`. The only
//!   edit is the port of each `listen` (PM2's fixed ports become ports the OS picked); every
//!   worker of every app must come online and each listening app must answer a request.
//! - Hostile files: a file that never finishes, throws, prints too much, or holds functions
//!   and wrong types gets a clear message, never a panic.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use support::http::get;
use support::{corral_bin, fixture, poll_until, require_node, Corral, PortHold, TestResult, DEADLINE};

fn pm2_dir() -> PathBuf {
    fixture("pm2")
}

/// `corral import ARGS` in `dir`.
fn import(dir: &Path, args: &[&str]) -> std::io::Result<Output> {
    Command::new(corral_bin())
        .arg("import")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Compares `corral import FILE ARGS` in the fixture folder with the golden file.
fn golden(file: &str, args: &[&str], golden: &str) -> TestResult {
    require_node();
    let mut all = vec![file];
    all.extend_from_slice(args);
    let output = import(&pm2_dir(), &all)?;
    assert!(
        output.status.success(),
        "import {file} failed: {}",
        text(&output.stderr)
    );
    let got = text(&output.stdout);
    let path = pm2_dir().join(golden);
    if std::env::var_os("CORRAL_BLESS").is_some() {
        std::fs::write(&path, &got)?;
        return Ok(());
    }
    let want =
        std::fs::read_to_string(&path).map_err(|e| format!("{}: {e} (CORRAL_BLESS=1 writes it)", path.display()))?;
    if got != want {
        let first = got
            .lines()
            .zip(want.lines())
            .position(|(g, w)| g != w)
            .unwrap_or(got.lines().count().min(want.lines().count()));
        panic!(
            "import {file} differs from {golden} from line {}:\n--- got ---\n{got}\n(CORRAL_BLESS=1 rewrites the golden)",
            first + 1
        );
    }
    Ok(())
}

#[test]
fn golden_fork_mode_with_restart_policy_logs_and_env_production() -> TestResult {
    golden("fork.config.js", &[], "fork.toml")
}

#[test]
fn golden_cluster_mode_on_every_cpu_with_watch_and_cron() -> TestResult {
    golden("cluster.config.js", &[], "cluster.toml")
}

#[test]
fn golden_two_apps_a_web_app_and_a_queue_worker() -> TestResult {
    golden("two-apps.config.cjs", &[], "two-apps.toml")
}

#[test]
fn golden_bun_app_from_an_es_module() -> TestResult {
    golden("bun.config.mjs", &[], "bun.toml")
}

#[test]
fn golden_env_production_folded_into_env() -> TestResult {
    golden("bun.config.mjs", &["--env", "production"], "bun.production.toml")
}

#[test]
fn golden_json_process_file_with_interpreter_none() -> TestResult {
    golden("process.json", &[], "process.toml")
}

#[test]
fn golden_yaml_process_file() -> TestResult {
    golden("process.yml", &[], "process-yml.toml")
}

/// Replaces the port of every `listen = "ADDR:PORT"` line with one the OS picked; returns the
/// new text and the addresses (with the holds, kept until corral has bound them).
type Repointed = (String, Vec<(std::net::SocketAddr, PortHold)>);

fn repoint_listens(toml: &str) -> Result<Repointed, Box<dyn std::error::Error>> {
    let mut out = String::new();
    let mut holds = Vec::new();
    for line in toml.lines() {
        if let Some(rest) = line.strip_prefix("listen = \"") {
            let host = rest.rsplit_once(':').ok_or("listen without a port")?.0;
            assert_eq!(host, "0.0.0.0", "import writes every interface: {line}");
            let hold = PortHold::new()?;
            out.push_str(&format!("listen = \"{host}:{}\"\n", hold.addr.port()));
            holds.push((hold.addr, hold));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok((out, holds))
}

/// A `bun` on PATH for the Bun fixture: this machine (and CI) have no Bun, so a two-line
/// stand-in execs node with the same arguments minus Bun's own `--smol` flag.
fn fake_bun(dir: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    let bun = bin.join("bun");
    std::fs::write(
        &bun,
        "#!/bin/sh\n# stands in for Bun in tests/import.rs\n[ \"$1\" = --smol ] && shift\nexec node \"$@\"\n",
    )?;
    std::fs::set_permissions(&bun, std::fs::Permissions::from_mode(0o755))?;
    Ok(bin)
}

/// Import → check → run for one fixture.
fn import_check_run(file: &str, args: &[&str]) -> TestResult {
    require_node();
    let corral = Corral::prepare("", "127.0.0.1:9".parse()?)?;
    let dir = corral.dir.path();
    // The fixture layout: the ecosystem file in pm2/, the apps it names one folder up.
    std::fs::create_dir_all(dir.join("pm2"))?;
    for app in ["app.js", "plain.js"] {
        std::fs::copy(fixture(app), dir.join(app))?;
    }
    std::fs::copy(pm2_dir().join(file), dir.join("pm2").join(file))?;
    let mut all = vec![file, "-o", "../proxy.toml"];
    all.extend_from_slice(args);
    let output = import(&dir.join("pm2"), &all)?;
    assert!(output.status.success(), "import failed: {}", text(&output.stderr));
    let imported = std::fs::read_to_string(&corral.config)?;
    let (toml, holds) = repoint_listens(&imported)?;
    std::fs::write(&corral.config, &toml)?;

    let path = format!(
        "{}:{}",
        fake_bun(dir)?.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let check = corral.command(&["check"]).env("PATH", &path).output()?;
    assert!(
        check.status.success(),
        "corral check rejected the import of {file}:\n{}{}\n--- toml ---\n{toml}",
        text(&check.stdout),
        text(&check.stderr)
    );

    corral.launch(&[], &[("PATH", &path)])?;
    // Every worker of every app online (the plain process too).
    poll_until(DEADLINE, "every worker of every app online", || {
        if let Some(exit) = corral.exited() {
            panic!("corral exited early ({exit})\n{}", corral.logs());
        }
        let status = corral.status()?;
        let apps = status["apps"].as_array()?;
        let all_online = apps.iter().all(|app| {
            let workers = app["workers"].as_array().cloned().unwrap_or_default();
            !workers.is_empty() && workers.iter().all(|w| w["state"] == "online")
        });
        (all_online && !apps.is_empty()).then_some(())
    })
    .map_err(|e| corral.explain(e))?;
    for (addr, hold) in holds {
        hold.release();
        let response = get(addr, "/whoami").map_err(|e| corral.explain(format!("GET {addr}: {e}").into()))?;
        assert_eq!(response.status, 200, "{}", response.text());
        let port = response.json()["port"].as_u64().unwrap_or(0);
        assert!(
            port > 0 && port != u64::from(addr.port()),
            "a worker port of its own: {}",
            response.text()
        );
    }
    Ok(())
}

#[test]
fn run_fork() -> TestResult {
    import_check_run("fork.config.js", &[])
}

#[test]
fn run_cluster() -> TestResult {
    import_check_run("cluster.config.js", &[])
}

#[test]
fn run_two_apps() -> TestResult {
    import_check_run("two-apps.config.cjs", &[])
}

#[test]
fn run_bun() -> TestResult {
    import_check_run("bun.config.mjs", &[])
}

#[test]
fn run_bun_env_production() -> TestResult {
    import_check_run("bun.config.mjs", &["--env", "production"])
}

#[test]
fn run_json() -> TestResult {
    import_check_run("process.json", &[])
}

#[test]
fn run_yaml() -> TestResult {
    import_check_run("process.yml", &[])
}

/// Writes `name` with `content` in a temp dir and imports it.
fn import_text(
    name: &str,
    content: &str,
    args: &[&str],
) -> Result<(tempfile::TempDir, Output), Box<dyn std::error::Error>> {
    require_node();
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join(name), content)?;
    let mut all = vec![name];
    all.extend_from_slice(args);
    let output = import(dir.path(), &all)?;
    Ok((dir, output))
}

fn assert_fails(output: &Output, needle: &str) {
    let stderr = text(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "stdout: {}\nstderr: {stderr}",
        text(&output.stdout)
    );
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_file_that_never_finishes_is_stopped_at_the_deadline() -> TestResult {
    let started = std::time::Instant::now();
    let (_dir, output) = import_text(
        "ecosystem.config.js",
        "require('node:http').createServer().listen(0); setInterval(() => {}, 1000);\n\
         module.exports = new Promise(() => {});\n",
        &[],
    )?;
    assert_fails(&output, "still running after");
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    Ok(())
}

#[test]
fn a_file_that_throws_is_reported_with_nodes_message() -> TestResult {
    let (_dir, output) = import_text(
        "ecosystem.config.js",
        "throw new Error('no such secret: DB_URL');\n",
        &[],
    )?;
    assert_fails(&output, "no such secret: DB_URL");
    Ok(())
}

#[test]
fn a_file_that_prints_too_much_is_refused() -> TestResult {
    let (_dir, output) = import_text(
        "ecosystem.config.js",
        "process.stdout.write('x'.repeat(20 << 20)); module.exports = { apps: [] };\n",
        &[],
    )?;
    assert_fails(&output, "node printed more than");
    Ok(())
}

#[test]
fn bad_shapes_get_clear_messages() -> TestResult {
    for (name, content, needle) in [
        (
            "a.config.js",
            "module.exports = 42;",
            "expected an object with `apps`, found a number",
        ),
        (
            "b.config.js",
            "module.exports = { apps: [ 'web' ] };",
            "app #1 is a string, not an object",
        ),
        (
            "c.config.js",
            "module.exports = { apps: [{ name: 'x' }] };",
            "app #1 (\"x\"): no `script`",
        ),
        ("d.config.js", "module.exports = { apps: [] };", "no apps"),
        ("e.json", "{ \"apps\": [ { \"script\": ", "not valid JSON"),
        ("f.yml", "apps: [ {script: a.js", "not valid YAML"),
        ("g.toml", "x = 1", "not a PM2 process file"),
        (
            "h.config.js",
            "const a = {}; a.self = a; module.exports = { apps: [a] };",
            "circular",
        ),
    ] {
        let (_dir, output) = import_text(name, content, &[])?;
        assert_fails(&output, needle);
    }
    let (_dir, output) = import_text(
        "ecosystem.config.js",
        "module.exports = { apps: [{ script: 'a.js', env_production: {} }] };",
        &["--env", "staging"],
    )?;
    assert_fails(&output, "--env staging: no app has env_staging");
    Ok(())
}

#[test]
fn functions_wrong_types_and_odd_strings_are_listed_and_the_toml_still_parses() -> TestResult {
    let (dir, output) = import_text(
        "ecosystem.config.js",
        r#"console.log('the config may print; it goes to stderr');
module.exports = {
  apps: [{
    name: 'odd "one"\n',
    script: 'server.js',
    instances: { many: true },
    max_memory_restart: 'lots',
    kill_timeout: -5,
    watch: 7,
    env: { GOOD: 'a"b\\c\u0001', NESTED: { a: 1 }, HOOK: () => 1, 'WITH SPACE': 'ok', PORT: 'http' },
    mystery_key: 'x\ny',
  }],
};
"#,
        &[],
    )?;
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("module.exports.apps[0].env.HOOK is a function"),
        "{stderr}"
    );
    assert!(stderr.contains("the config may print"), "{stderr}");
    let toml_text = text(&output.stdout);
    let parsed: toml::Table = toml::from_str(&toml_text).map_err(|e| format!("{e}\n{toml_text}"))?;
    let app = &parsed["app"].as_array().ok_or("no [[app]]")?[0];
    assert_eq!(app["name"].as_str(), Some("odd--one--"));
    assert_eq!(app["env"]["GOOD"].as_str(), Some("a\"b\\c\u{1}"));
    assert_eq!(app["env"]["WITH SPACE"].as_str(), Some("ok"));
    assert!(
        app.get("listen").is_none() && app.get("instances").is_none(),
        "{toml_text}"
    );
    for listed in [
        "instances = {\"many\":true}",
        "max_memory_restart = \"lots\"",
        "kill_timeout = -5",
        "watch = 7",
        "env.NESTED: an object",
        "env.HOOK: null",
        "env.PORT = \"http\": not a port number",
        "mystery_key = \"x\\ny\": not a PM2 option this import knows",
    ] {
        assert!(toml_text.contains(listed), "{listed:?} not listed in:\n{toml_text}");
    }
    // And corral check reads it (the script is there).
    std::fs::write(dir.path().join("server.js"), "")?;
    std::fs::write(dir.path().join("proxy.toml"), &toml_text)?;
    let check = Command::new(corral_bin())
        .args(["check", "-c"])
        .arg(dir.path().join("proxy.toml"))
        .output()?;
    assert!(check.status.success(), "{}{}", text(&check.stdout), text(&check.stderr));
    Ok(())
}

#[test]
fn a_json_file_with_comments_is_read_the_way_pm2_reads_it() -> TestResult {
    let (_dir, output) = import_text(
        "process.json",
        "{\n  // PM2 evaluates .json process files as JavaScript\n  apps: [{ name: 'commented', script: 'a.js', },],\n}\n",
        &[],
    )?;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("name = \"commented\""));
    Ok(())
}
