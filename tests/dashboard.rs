//! The dashboard (`GET /` of the admin listener) in a real browser: Debian's `chromium`,
//! headless, driven over WebDriver by `chromedriver`, against the real binary and real Node
//! workers. The assertions read what a person would see: the rendered text of elements
//! (WebDriver's element text is empty for what is hidden), and clicks are WebDriver clicks,
//! which fail on a button that is hidden or covered.
//!
//! Set `CORRAL_DASHBOARD_SCREENSHOT=docs/dashboard.png` to save the screenshot the first test
//! takes (the README's picture comes from it).

mod support;

use std::collections::BTreeSet;
use std::error::Error;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use support::http::Conn;
use support::load::Load;
use support::{fixture, poll_until, Corral, PortHold, TestResult};

/// The browser runs on the same two busy cores as cargo and the workers.
const SLOW: Duration = Duration::from_secs(90);
/// WebDriver's key for an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
/// A worker log line made of markup: the page must show it as text.
const HOSTILE: &str = "<b>bold</b> <img src=x onerror=document.title='pwned'>";

type Res<T> = Result<T, Box<dyn Error>>;

/// `program` on PATH, or a loud failure: CI installs `chromium` and `chromium-driver`.
fn require(program: &str, package: &str) -> PathBuf {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file());
    found.unwrap_or_else(|| panic!("the dashboard tests need `{program}` on PATH (Debian package {package})"))
}

/// chromedriver and the headless chromium it drives; both killed on drop, even on failure.
struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: Option<String>,
    profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Res<Browser> {
        let chromium = require("chromium", "chromium");
        let chromedriver = require("chromedriver", "chromium-driver");
        let profile = tempfile::tempdir()?;
        let hold = PortHold::new()?;
        let addr = hold.addr;
        let log = std::fs::File::create(profile.path().join("chromedriver.log"))?;
        hold.release();
        let driver = {
            use std::os::unix::process::CommandExt;
            Command::new(chromedriver)
                .arg(format!("--port={}", addr.port()))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                // Its own process group, so the drop can take chromium down with it.
                .process_group(0)
                .spawn()?
        };
        let mut browser = Browser {
            driver,
            addr,
            session: None,
            profile,
        };
        poll_until(SLOW, "chromedriver to answer /status", || {
            let status = browser.request("GET", "/status", None).ok()?;
            (status["value"]["ready"] == true).then_some(())
        })
        .map_err(|e| browser.explain(e))?;
        let args = [
            "--headless=new".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--no-first-run".to_owned(),
            "--window-size=1280,1200".to_owned(),
            format!("--user-data-dir={}", browser.profile_dir().display()),
        ];
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
        }}});
        let created = browser.request("POST", "/session", Some(&capabilities))?;
        let id = created["value"]["sessionId"]
            .as_str()
            .ok_or_else(|| browser.explain(format!("no session: {created}").into()))?;
        browser.session = Some(id.to_owned());
        Ok(browser)
    }

    fn profile_dir(&self) -> PathBuf {
        self.profile.path().join("profile")
    }

    /// One WebDriver request on a fresh connection: the JSON answer.
    fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Res<Value> {
        let host = self.addr.to_string();
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut headers = vec![("Host", host.as_str()), ("Connection", "close")];
        if method == "POST" {
            headers.push(("Content-Type", "application/json"));
        }
        let response = Conn::open(self.addr)?.request(method, path, &headers, body.as_bytes())?;
        Ok(serde_json::from_slice(&response.body)?)
    }

    /// A command in the session; its `value`, or the WebDriver error as an error.
    fn command(&self, method: &str, path: &str, body: Option<Value>) -> Res<Value> {
        let session = self.session.as_deref().ok_or("no session")?;
        let body = match (method, body) {
            ("POST", None) => Some(json!({})),
            (_, body) => body,
        };
        let answer = self.request(method, &format!("/session/{session}{path}"), body.as_ref())?;
        let value = answer["value"].clone();
        if let Some(error) = value.get("error").and_then(Value::as_str) {
            return Err(format!("WebDriver {method} {path}: {error}: {}", value["message"]).into());
        }
        Ok(value)
    }

    fn open(&self, url: &str) -> Res<()> {
        self.command("POST", "/url", Some(json!({ "url": url })))?;
        Ok(())
    }

    fn find(&self, css: &str) -> Res<String> {
        let found = self.command("POST", "/element", Some(json!({"using": "css selector", "value": css})))?;
        Ok(found[ELEMENT].as_str().ok_or("no element id")?.to_owned())
    }

    /// The text of `css` as rendered: empty when it is hidden.
    fn text(&self, css: &str) -> Res<String> {
        let id = self.find(css)?;
        Ok(self
            .command("GET", &format!("/element/{id}/text"), None)?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    fn displayed(&self, css: &str) -> Res<bool> {
        let id = self.find(css)?;
        Ok(self.command("GET", &format!("/element/{id}/displayed"), None)? == true)
    }

    fn click(&self, css: &str) -> Res<()> {
        let id = self.find(css)?;
        self.command("POST", &format!("/element/{id}/click"), None)?;
        Ok(())
    }

    fn type_into(&self, css: &str, text: &str) -> Res<()> {
        let id = self.find(css)?;
        self.command("POST", &format!("/element/{id}/clear"), None)?;
        self.command("POST", &format!("/element/{id}/value"), Some(json!({ "text": text })))?;
        Ok(())
    }

    fn script(&self, script: &str) -> Res<Value> {
        self.command("POST", "/execute/sync", Some(json!({"script": script, "args": []})))
    }

    /// Polls the rendered text of `css` until `check` accepts it.
    fn wait_text(&self, css: &str, what: &str, check: impl Fn(&str) -> bool) -> Res<String> {
        let mut last = String::new();
        let found = poll_until(SLOW, what, || {
            last = self.text(css).ok()?;
            check(&last).then(|| last.clone())
        });
        found.map_err(|e| self.explain(format!("{e}\nthe page's {css} shows:\n{last}").into()))
    }

    /// Clicks `css`, checks the confirmation asks about `question`, and confirms.
    fn click_and_confirm(&self, css: &str, question: &str) -> Res<()> {
        self.click(css)?;
        self.wait_text("#confirm", "the confirmation dialog", |t| t.contains(question))?;
        self.click("#confirm-yes")?;
        poll_until(SLOW, "the dialog to close", || {
            (!self.displayed("#confirm").ok()?).then_some(())
        })
    }

    fn screenshot(&self) -> Res<Vec<u8>> {
        let encoded = self.command("GET", "/screenshot", None)?;
        decode_base64(encoded.as_str().ok_or("no screenshot")?)
    }

    fn explain(&self, e: Box<dyn Error>) -> Box<dyn Error> {
        let log = std::fs::read_to_string(self.profile.path().join("chromedriver.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!("{e}\n--- chromedriver log (tail) ---\n{}", tail.join("\n")).into()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            // Quits chromium; what is left after that is killed below.
            if let Err(e) = self.request("DELETE", &format!("/session/{session}"), None) {
                eprintln!("closing the WebDriver session: {e}");
            }
        }
        let group = Pid::from_raw(self.driver.id() as i32);
        let _gone_already = killpg(group, Signal::SIGKILL);
        let _gone_already = self.driver.kill();
        let _reaped = self.driver.wait();
        // Chromium's helpers may have left the group: every process that runs with this test's
        // own profile directory is ours.
        let marker = format!("--user-data-dir={}", self.profile_dir().display());
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&marker) {
                let _gone_already = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

fn decode_base64(text: &str) -> Res<Vec<u8>> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut bits, mut count) = (0u32, 0);
    for c in text.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=') {
        bits = bits << 6 | u32::from(value(c).ok_or("not base64")?);
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    Ok(out)
}

/// A config: app `web` (the fixture, behind a shell that first prints [`HOSTILE`] with its
/// slot), `[admin]` on `admin`, `env` in `[app.env]`, `admin_keys` in `[admin]`.
fn config(app: SocketAddr, admin: SocketAddr, instances: usize, env: &[(&str, &str)], admin_keys: &str) -> String {
    let script = format!(
        "echo \"{HOSTILE} slot $NODE_APP_INSTANCE\"; exec node '{}'",
        fixture("app.js").display()
    );
    let mut text = format!(
        "[[app]]\nname = \"web\"\ncommand = [\"sh\", \"-c\", {script:?}]\nlisten = \"{app}\"\n\
         instances = {instances}\nlisten_timeout = \"10s\"\nkill_timeout = \"10s\"\ndrain_timeout = \"10s\"\n"
    );
    if !env.is_empty() {
        text.push_str("[app.env]\n");
        for (key, value) in env {
            text.push_str(&format!("{key} = {value:?}\n"));
        }
    }
    text.push_str(&format!("\n[admin]\nlisten = \"{admin}\"\n{admin_keys}\n"));
    text
}

/// corral with `instances` workers and an admin listener; returns it and the admin address.
fn start(instances: usize, env: &[(&str, &str)], admin_keys: &str) -> Res<(Corral, SocketAddr)> {
    support::require_node();
    let (app, admin) = (PortHold::new()?, PortHold::new()?);
    let (addr, admin_addr) = (app.addr, admin.addr);
    let text = config(addr, admin_addr, instances, env, admin_keys);
    app.release();
    admin.release();
    let corral = Corral::spawn_with_config(&text, addr)?;
    corral.wait_online(instances)?;
    Ok((corral, admin_addr))
}

/// Waits until the page's worker table of `web` shows exactly the pids of `pids`, each on a
/// row of its own.
fn wait_for_pids(browser: &Browser, pids: &BTreeSet<u32>) -> Res<()> {
    let mut last = Vec::new();
    let shown = poll_until(SLOW, "the page to show every worker's pid", || {
        let value = browser
            .script(
                "return [...document.querySelectorAll('section.app[data-app=\"web\"] tbody td.pid')]\
                 .map((td) => td.innerText)",
            )
            .ok()?;
        last = value
            .as_array()?
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
        let rows: BTreeSet<u32> = last.iter().filter_map(|t| t.parse().ok()).collect();
        (rows == *pids && last.len() == pids.len()).then_some(())
    });
    shown.map_err(|e| browser.explain(format!("{e}: want {pids:?}, the page shows {last:?}").into()))
}

/// `GET /` as a plain client: the status, and the headers a browser must get with the page.
fn get_page(admin: SocketAddr, host: &str) -> Res<support::http::Response> {
    let response = Conn::open(admin)?.request("GET", "/", &[("Host", host), ("Connection", "close")], b"")?;
    if response.status == 200 || response.status == 401 {
        let policy = response.header("content-security-policy").unwrap_or_default();
        for part in [
            "default-src 'none'",
            "script-src 'sha256-",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(policy.contains(part), "{part} missing from the policy {policy:?}");
        }
        assert_eq!(response.header("x-frame-options"), Some("DENY"));
        assert_eq!(response.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(response.header("cache-control"), Some("no-store"));
        assert_eq!(response.header("content-type"), Some("text/html; charset=utf-8"));
        assert!(response.text().contains("<title>corral</title>"));
    }
    Ok(response)
}

#[test]
fn the_dashboard_shows_every_worker_and_its_buttons_reload_and_scale() -> TestResult {
    let (corral, admin) = start(2, &[], "")?;
    let load = Load::start(corral.addr, 1, 0);
    assert_eq!(get_page(admin, &admin.to_string())?.status, 200);
    // Without a token, a page on another name (DNS rebinding) does not get it.
    assert_eq!(get_page(admin, "attacker.example")?.status, 403);
    let browser = Browser::start()?;
    browser.open(&format!("http://{admin}/"))?;
    wait_for_pids(&browser, &corral.online_pids()?)?;
    assert_eq!(browser.script("return document.title")?, "corral");
    // The policy let the inline stylesheet apply (the browser's default body margin is 8px).
    assert_eq!(browser.script("return getComputedStyle(document.body).margin")?, "0px");
    // The events kept since start are replayed into the feed.
    browser.wait_text("#feed", "the start's events in the feed", |t| {
        t.contains("worker_ready")
    })?;
    let stats = browser.text("section.app[data-app=\"web\"] .stats")?;
    for label in ["req/s", "p99", "in flight", "memory", "restarts"] {
        assert!(stats.contains(label), "{label} missing from {stats:?}");
    }

    // A worker's log tail shows its own lines, and markup in them as text.
    browser.click("section.app[data-app=\"web\"] button[data-action=logs][data-slot=\"1\"]")?;
    let logs = browser.wait_text("section.app[data-app=\"web\"] .logs pre", "slot 1's log tail", |t| {
        t.contains(&format!("{HOSTILE} slot 1"))
    })?;
    assert!(!logs.contains("slot 0"), "slot 0's lines in slot 1's tail:\n{logs}");
    let injected = browser.script("return document.querySelectorAll('.logs pre b, .logs pre img').length")?;
    assert_eq!(injected, 0, "worker output became markup");
    assert_eq!(browser.script("return document.title")?, "corral");

    // Reload from its button: the events appear in the feed, and the new pids in the table.
    let before = corral.online_pids()?;
    browser.click_and_confirm("button[data-action=reload][data-app=web]", "Reload web?")?;
    browser.wait_text("#feed", "reload_done in the feed", |t| t.contains("reload_done"))?;
    browser.wait_text("#feed", "reload_started in the feed", |t| t.contains("reload_started"))?;
    let after = corral.wait_online(2)?;
    let after: BTreeSet<u32> = after
        .iter()
        .filter_map(|w| w["pid"].as_u64().map(|p| p as u32))
        .collect();
    assert!(
        before.is_disjoint(&after),
        "the reload kept workers: {before:?} {after:?}"
    );
    wait_for_pids(&browser, &after)?;
    let feed = browser.text("#feed")?;
    for pid in &before {
        assert!(
            feed.contains(&format!("pid {pid} · reason reload")),
            "old worker {pid}'s exit missing from the feed:\n{feed}"
        );
    }

    // A picture for the README: two workers, charts with some history, the events.
    browser.wait_text("section.app[data-app=\"web\"] .stats", "req/s under load", |t| {
        !t.contains("req/s —") && !t.contains("req/s 0.0")
    })?;
    let saving = std::env::var_os("CORRAL_DASHBOARD_SCREENSHOT");
    if saving.is_some() {
        // Only for the picture: enough statuses for the charts to show a line.
        poll_until(SLOW, "20 points in the req/s chart", || {
            let points = browser
                .script("return document.querySelector('.chart polyline').getAttribute('points')")
                .ok()?;
            (points.as_str()?.split(' ').count() >= 20).then_some(())
        })?;
        browser.script("document.querySelector('#toast').hidden = true")?;
    }
    let png = browser.screenshot()?;
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "the screenshot is not a PNG");
    if let Some(path) = saving {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
        std::fs::write(&path, &png)?;
        eprintln!("screenshot saved to {}", path.display());
    }
    let tally = load.finish();
    assert_eq!(tally.failed, 0, "{:?}", tally.failures);

    // Cancelling the confirmation changes nothing.
    browser.click("button[data-action=stop][data-app=web]")?;
    browser.wait_text("#confirm", "the stop confirmation", |t| t.contains("Stop web?"))?;
    browser.click("#confirm-no")?;

    // Scale from its input and button.
    browser.type_into("input[data-app=web]", "3")?;
    browser.click_and_confirm("button[data-action=scale][data-app=web]", "Scale web to 3")?;
    let three = corral.wait_online(3)?;
    let three: BTreeSet<u32> = three
        .iter()
        .filter_map(|w| w["pid"].as_u64().map(|p| p as u32))
        .collect();
    assert!(after.is_subset(&three), "{after:?} {three:?}");
    wait_for_pids(&browser, &three)?;
    browser.wait_text("section.app[data-app=\"web\"] .app-head", "3/3 ready", |t| {
        t.contains("3/3 ready")
    })?;

    // On a phone's width: nothing to scroll sideways, every pid still there, buttons reachable.
    browser.command("POST", "/window/rect", Some(json!({"width": 390, "height": 844})))?;
    poll_until(SLOW, "the page to fit a phone's width", || {
        let fits = browser
            .script("return innerWidth <= 420 && document.documentElement.scrollWidth <= innerWidth")
            .ok()?;
        (fits == true).then_some(())
    })?;
    wait_for_pids(&browser, &three)?;
    assert!(browser.displayed("button[data-action=reload][data-app=web]")?);
    Ok(())
}

#[test]
fn with_a_token_the_dashboard_asks_for_it_then_shows_a_rolled_back_reload_and_the_stop() -> TestResult {
    let dir = tempfile::tempdir()?;
    let token = "dashboard-token-0123456789";
    let file = dir.path().join("admin.token");
    std::fs::write(&file, format!("{token}\n"))?;
    let keys = format!("token_file = {file:?}");
    let (mut corral, admin) = start(2, &[("FIXTURE_IGNORE_TERM", "1")], &keys)?;
    let page = get_page(admin, &admin.to_string())?;
    assert_eq!(page.status, 401, "the page without the token");
    let status = Conn::open(admin)?.request("GET", "/api/status", &[("Host", &admin.to_string())], b"")?;
    assert_eq!(status.status, 401);
    let browser = Browser::start()?;
    browser.open(&format!("http://{admin}/"))?;

    // Not logged in: the form, and no data.
    browser.wait_text("#login", "the login form", |t| t.contains("Admin token"))?;
    assert!(!browser.displayed("#main")?, "the dashboard shows before the login");
    let pids = corral.online_pids()?;
    let body = browser.text("body")?;
    for pid in &pids {
        assert!(
            !body.contains(&pid.to_string()),
            "pid {pid} shown before the login:\n{body}"
        );
    }
    browser.type_into("#token", "wrong-token-wrong-token")?;
    browser.click("#login-button")?;
    browser.wait_text("#login-error", "the wrong-token message", |t| t.contains("Wrong token"))?;
    browser.type_into("#token", token)?;
    browser.click("#login-button")?;
    wait_for_pids(&browser, &pids)?;
    assert!(!browser.displayed("#login")?, "the login form stays after the login");

    // A reload to a build that crashes at boot: the page says it failed and was rolled back.
    let broken = config(
        corral.addr,
        admin,
        2,
        &[("FIXTURE_IGNORE_TERM", "1"), ("FIXTURE_BOOT", "crash")],
        &keys,
    );
    std::fs::write(&corral.config, broken)?;
    browser.click_and_confirm("button[data-action=reload][data-app=web]", "Reload web?")?;
    let banner = browser.wait_text("#banner", "the rolled-back reload", |t| t.contains("FAILED"))?;
    assert!(banner.contains("rolled back"), "{banner}");
    browser.wait_text("#feed", "reload_failed in the feed", |t| t.contains("reload_failed"))?;
    assert_eq!(corral.online_pids()?, pids, "the old workers serve on");
    wait_for_pids(&browser, &pids)?;

    // corral stopping: said while it drains (the workers ignore SIGTERM for a while), then
    // that it has stopped.
    corral.signal(Signal::SIGTERM)?;
    browser.wait_text("#banner", "the stopping display", |t| t.contains("corral is stopping"))?;
    let disabled = browser.script("return document.querySelector('button[data-action=reload]').disabled")?;
    assert_eq!(disabled, true, "the buttons stay usable while corral stops");
    browser.wait_text("#banner", "the stopped display", |t| t.contains("corral has stopped"))?;
    corral.wait_exit(SLOW)?;
    Ok(())
}
