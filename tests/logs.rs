//! Worker log files: timestamps, one file per slot, rotation without losing a line, `corral logs`.

mod support;

use std::net::SocketAddr;
use std::path::Path;

use support::http::get;
use support::{poll_until, Corral, Options, TestResult, DEADLINE};

/// Every line of `file` and its rotated files, oldest first.
fn all_lines(file: &Path) -> Vec<String> {
    let mut rotated: Vec<(usize, std::path::PathBuf)> = (1..100)
        .map(|n| (n, std::path::PathBuf::from(format!("{}.{n}", file.display()))))
        .filter(|(_, p)| p.exists())
        .collect();
    rotated.sort_by_key(|r| std::cmp::Reverse(r.0));
    let mut lines = Vec::new();
    for (_, path) in rotated.iter().chain(std::iter::once(&(0, file.to_path_buf()))) {
        lines.extend(
            std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .map(str::to_owned),
        );
    }
    lines
}

#[test]
fn log_files_get_timestamped_lines_from_every_slot_and_rotation_keeps_every_line() -> TestResult {
    let options = Options::default()
        .instances(2)
        .key("out_file = \"logs/web-out.log\"")
        .key("error_file = \"logs/web-err.log\"")
        .key("log_max_size = \"2K\"")
        .key("log_retain = 50");
    let corral = Corral::start(options)?;
    let logs = corral.dir.path().join("logs");
    for worker in corral.workers()? {
        let port = worker["port"].as_u64().ok_or("port")? as u16;
        assert_eq!(
            get(SocketAddr::from(([127, 0, 0, 1], port)), "/print?n=300")?.status,
            200
        );
    }
    for slot in 0..2 {
        let out = logs.join(format!("web-out-{slot}.log"));
        let lines = poll_until(DEADLINE, "300 lines in the slot's log", || {
            let lines = all_lines(&out);
            (lines.iter().filter(|l| l.contains(&format!("line {slot} "))).count() == 300).then_some(lines)
        })
        .map_err(|e| corral.explain(e))?;
        assert!(Path::new(&format!("{}.1", out.display())).exists(), "no rotation at 2K");
        let numbered: Vec<u32> = lines
            .iter()
            .filter_map(|l| {
                l.split(&format!("line {slot} "))
                    .nth(1)?
                    .split(' ')
                    .next()?
                    .parse()
                    .ok()
            })
            .collect();
        assert_eq!(
            numbered,
            (0..300).collect::<Vec<u32>>(),
            "lines lost or reordered across rotation"
        );
        for line in &lines {
            // "2026-11-24T12:00:00.123+00:00 ..."
            let stamp = line.split(' ').next().unwrap_or_default();
            assert!(
                stamp.len() == 29 && stamp.as_bytes()[10] == b'T' && stamp.ends_with("+00:00"),
                "{line}"
            );
        }
        // stderr is read by its own task: its line lands when it lands.
        let errors = logs.join(format!("web-err-{slot}.log"));
        poll_until(DEADLINE, "the stderr line in the error file", || {
            std::fs::read_to_string(&errors)
                .ok()?
                .contains("printed 300 lines")
                .then_some(())
        })?;
    }

    let shown = corral.cli(&["logs", "web", "-n", "3"])?;
    assert!(shown.status.success(), "{}", String::from_utf8_lossy(&shown.stderr));
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains("==> web.0 out") && text.contains("==> web.1 err"),
        "{text}"
    );
    assert!(text.contains("line 0 00299") && text.contains("line 1 00299"), "{text}");
    Ok(())
}

/// Starts corral with `options` and extra environment for `corral run` (a `TZ`), and waits
/// until its workers are online.
fn start_with_env(options: &Options, env: &[(&str, &str)]) -> Result<Corral, Box<dyn std::error::Error>> {
    support::require_node();
    let hold = support::PortHold::new()?;
    let corral = Corral::prepare(&options.config_text(hold.addr), hold.addr)?;
    corral.launch(&[], env)?;
    corral.wait_online(options.instances)?;
    hold.release();
    Ok(corral)
}

fn numbered(path: &Path, n: usize) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("{}.{n}", path.display()))
}

/// The text of a `.gz` file.
fn gunzip(path: &Path) -> std::io::Result<String> {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(std::fs::File::open(path)?), &mut text)?;
    Ok(text)
}

/// The numbers of `line SLOT NNNNN` lines, in order.
fn printed_numbers(lines: &[String], slot: usize) -> Vec<u32> {
    lines
        .iter()
        .filter_map(|l| {
            l.split(&format!("line {slot} "))
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[test]
fn compressed_rotation_keeps_every_line_in_whole_gz_files() -> TestResult {
    let options = Options::default()
        .instances(1)
        .key("out_file = \"logs/web-out.log\"")
        .key("log_max_size = \"1K\"")
        .key("log_retain = 200")
        .key("log_compress = true");
    let corral = Corral::start(options)?;
    let out = corral.dir.path().join("logs/web-out-0.log");
    assert_eq!(get(corral.addr, "/print?n=1000")?.status, 200);
    // Each rotation is finished (gzipped, shifted) by the compressor thread: wait until no
    // file is in transit and the union holds every line.
    let (gz_files, lines) = poll_until(DEADLINE, "every line in the current and .gz files", || {
        let staged = std::fs::read_dir(out.parent()?)
            .ok()?
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains(".rotating-"));
        if staged {
            return None;
        }
        let mut lines = Vec::new();
        let mut gz_files = 0;
        for n in (1..=200).rev() {
            let gz = std::path::PathBuf::from(format!("{}.gz", numbered(&out, n).display()));
            let Ok(text) = gunzip(&gz) else { continue };
            // Whole lines only: nothing cut at a rotation.
            assert!(text.ends_with('\n'), "{} ends mid-line", gz.display());
            gz_files += 1;
            lines.extend(text.lines().map(str::to_owned));
        }
        lines.extend(std::fs::read_to_string(&out).ok()?.lines().map(str::to_owned));
        (printed_numbers(&lines, 0).len() == 1000).then_some((gz_files, lines))
    })
    .map_err(|e| corral.explain(e))?;
    assert!(
        gz_files >= 20,
        "1000 lines of ~55 bytes at 1K: dozens of rotations, saw {gz_files}"
    );
    assert!(
        !numbered(&out, 1).exists(),
        "rotated files are compressed, not left plain"
    );
    assert_eq!(
        printed_numbers(&lines, 0),
        (0..1000).collect::<Vec<u32>>(),
        "every line exactly once, in order, across the .gz files"
    );
    for line in lines.iter().filter(|l| l.contains(" line 0 ")) {
        // A timestamp, then the whole line as printed.
        assert!(line.ends_with(&format!(" {}", "x".repeat(20))), "{line}");
        assert_eq!(
            line.len(),
            "2026-12-02T14:09:04.099+00:00 line 0 00000 ".len() + 20,
            "{line}"
        );
    }
    Ok(())
}

#[test]
fn timestamps_are_local_time_with_their_offset_unless_log_utc() -> TestResult {
    // A POSIX TZ string: UTC+05:30, no tz database needed.
    let tz = [("TZ", "IST-5:30")];
    for (utc, format, line_offset, access_time) in [
        (false, "combined", "+05:30", " +0530] \"GET /print?n=3 "),
        (false, "json", "+05:30", "+05:30\",\"app\":\"web\""),
        (true, "combined", "+00:00", " +0000] \"GET /print?n=3 "),
        (true, "json", "+00:00", "Z\",\"app\":\"web\""),
    ] {
        let mut options = Options::default()
            .instances(1)
            .key("out_file = \"logs/web-out.log\"")
            .key("access_log = \"logs/access.log\"")
            .key(&format!("access_log_format = {format:?}"));
        if utc {
            options = options.key("log_utc = true");
        }
        let corral = start_with_env(&options, &tz)?;
        let before = std::time::SystemTime::now() - std::time::Duration::from_secs(1);
        assert_eq!(get(corral.addr, "/print?n=3")?.status, 200);
        let out = corral.dir.path().join("logs/web-out-0.log");
        let lines = poll_until(DEADLINE, "3 lines", || {
            let lines = all_lines(&out);
            (printed_numbers(&lines, 0).len() == 3).then_some(lines)
        })
        .map_err(|e| corral.explain(e))?;
        for line in &lines {
            // 2026-12-02T19:23:45.678+05:30 line 0 00000 ...
            let stamp = line.split(' ').next().unwrap_or_default();
            assert!(stamp.len() == 29 && stamp.ends_with(line_offset), "{line}");
            // The wall clock agrees with its offset: read back, it is the moment of the print.
            let at = chrono::DateTime::parse_from_str(stamp, "%Y-%m-%dT%H:%M:%S%.3f%:z")?;
            let late = std::time::SystemTime::from(at).duration_since(before)?;
            assert!(
                late < std::time::Duration::from_secs(30),
                "{line}: {late:?} after the print"
            );
        }
        let access = corral.dir.path().join("logs/access.log");
        let line = poll_until(DEADLINE, "the access log line", || {
            std::fs::read_to_string(&access).ok()?.lines().next().map(str::to_owned)
        })?;
        assert!(line.contains(access_time), "{line}");
    }
    Ok(())
}

#[test]
fn log_rotate_interval_rotates_on_the_cron_schedule_in_local_time() -> TestResult {
    // Every minute: the next minute boundary is at most 60 s away.
    let options = Options::default()
        .instances(1)
        .key("out_file = \"logs/web-out.log\"")
        .key("log_rotate_interval = \"* * * * *\"");
    let corral = start_with_env(&options, &[("TZ", "Asia/Kolkata")])?;
    let out = corral.dir.path().join("logs/web-out-0.log");
    assert_eq!(get(corral.addr, "/print?n=5")?.status, 200);
    poll_until(DEADLINE, "5 lines", || {
        (printed_numbers(&all_lines(&out), 0).len() == 5).then_some(())
    })
    .map_err(|e| corral.explain(e))?;
    let rotated = poll_until(std::time::Duration::from_secs(90), "the rotation at the minute", || {
        std::fs::read_to_string(numbered(&out, 1)).ok()
    })
    .map_err(|e| corral.explain(e))?;
    let lines: Vec<String> = rotated.lines().map(str::to_owned).collect();
    assert_eq!(printed_numbers(&lines, 0), [0, 1, 2, 3, 4], "{rotated}");
    assert!(
        lines
            .iter()
            .all(|l| l.split(' ').next().is_some_and(|s| s.ends_with("+05:30"))),
        "{rotated}"
    );
    // The new file takes what follows; an empty file is not rotated at the next minute.
    assert_eq!(std::fs::read_to_string(&out)?, "");
    assert_eq!(get(corral.addr, "/print?n=2")?.status, 200);
    poll_until(DEADLINE, "2 more lines", || {
        (printed_numbers(&all_lines(&out), 0) == [0, 1, 2, 3, 4, 0, 1]).then_some(())
    })
    .map_err(|e| corral.explain(e))?;
    Ok(())
}

#[test]
fn flush_empties_the_current_log_files_and_keeps_rotated_ones() -> TestResult {
    let options = Options::default()
        .instances(2)
        .key("out_file = \"logs/web-out.log\"")
        .key("error_file = \"logs/web-err.log\"")
        .key("access_log = \"logs/access.log\"")
        .key("log_max_size = \"1K\"");
    let corral = Corral::start(options)?;
    let logs = corral.dir.path().join("logs");
    let mut ports = Vec::new();
    for worker in corral.workers()? {
        ports.push(worker["port"].as_u64().ok_or("port")? as u16);
    }
    for port in &ports {
        assert_eq!(
            get(SocketAddr::from(([127, 0, 0, 1], *port)), "/print?n=50")?.status,
            200
        );
    }
    // Through the proxy: a line in the access log (the fixture answers 404 here).
    assert_eq!(get(corral.addr, "/hello")?.status, 404);
    for slot in 0..2 {
        let out = logs.join(format!("web-out-{slot}.log"));
        poll_until(DEADLINE, "50 lines", || {
            (printed_numbers(&all_lines(&out), slot).len() == 50).then_some(())
        })
        .map_err(|e| corral.explain(e))?;
        let err = logs.join(format!("web-err-{slot}.log"));
        poll_until(DEADLINE, "the stderr line", || {
            std::fs::read_to_string(&err).ok()?.contains("printed 50").then_some(())
        })?;
    }
    let access = logs.join("access.log");
    poll_until(DEADLINE, "the access line", || {
        std::fs::read_to_string(&access)
            .ok()?
            .contains("GET /hello")
            .then_some(())
    })?;

    let unknown = corral.cli(&["flush", "nope"])?;
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no app named \"nope\""));

    let flushed = corral.cli(&["flush", "web"])?;
    let said = String::from_utf8_lossy(&flushed.stdout);
    assert!(
        flushed.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&flushed.stderr)
    );
    // Two out files, two err files, the access log.
    assert!(said.contains("flushed 5 log files of app \"web\""), "{said}");
    for name in [
        "web-out-0.log",
        "web-out-1.log",
        "web-err-0.log",
        "web-err-1.log",
        "access.log",
    ] {
        assert_eq!(std::fs::metadata(logs.join(name))?.len(), 0, "{name} is empty");
    }
    assert!(
        numbered(&logs.join("web-out-0.log"), 1).exists(),
        "rotated files are kept"
    );

    // Writing goes on at the start of the emptied file, whole lines.
    assert_eq!(
        get(SocketAddr::from(([127, 0, 0, 1], ports[0])), "/print?n=3")?.status,
        200
    );
    let out = logs.join("web-out-0.log");
    let text = poll_until(DEADLINE, "3 new lines", || {
        let text = std::fs::read_to_string(&out).ok()?;
        (text.lines().count() == 3).then_some(text)
    })
    .map_err(|e| corral.explain(e))?;
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    assert_eq!(printed_numbers(&lines, 0), [0, 1, 2], "{text}");
    assert!(
        text.starts_with("20"),
        "the first line starts with its timestamp: {text}"
    );

    let all = corral.cli(&["flush"])?;
    assert!(all.status.success());
    assert!(String::from_utf8_lossy(&all.stdout).contains("of every app"));
    assert_eq!(std::fs::metadata(&out)?.len(), 0);
    Ok(())
}

#[test]
fn the_admin_api_flushes_an_app_with_a_json_post() -> TestResult {
    support::require_node();
    let (app, admin) = (support::PortHold::new()?, support::PortHold::new()?);
    let admin_addr = admin.addr;
    let options = Options::default().instances(1).key("out_file = \"logs/web-out.log\"");
    let config = format!(
        "{}\n[admin]\nlisten = \"{}\"\n",
        options.config_text(app.addr),
        admin.addr
    );
    let corral = Corral::prepare(&config, app.addr)?;
    corral.launch(&[], &[])?;
    corral.wait_online(1)?;
    app.release();
    admin.release();
    let out = corral.dir.path().join("logs/web-out-0.log");
    assert_eq!(get(corral.addr, "/print?n=4")?.status, 200);
    poll_until(DEADLINE, "4 lines", || {
        (printed_numbers(&all_lines(&out), 0).len() == 4).then_some(())
    })
    .map_err(|e| corral.explain(e))?;
    let host = admin_addr.to_string();
    let post = |path: &str, headers: &[(&str, &str)]| {
        let mut all = vec![("Host", host.as_str())];
        all.extend_from_slice(headers);
        support::http::Conn::open(admin_addr)?.request("POST", path, &all, b"{}")
    };
    // The admin rules hold: JSON only, and no foreign Origin.
    assert_eq!(post("/api/apps/web/flush", &[])?.status, 415);
    let foreign = [("Content-Type", "application/json"), ("Origin", "http://evil.example")];
    assert_eq!(post("/api/apps/web/flush", &foreign)?.status, 403);
    assert!(std::fs::metadata(&out)?.len() > 0, "refused requests change nothing");
    let json = [("Content-Type", "application/json")];
    let missing = post("/api/apps/nope/flush", &json)?;
    assert_eq!(missing.status, 404, "{}", String::from_utf8_lossy(&missing.body));
    let done = post("/api/apps/web/flush", &json)?;
    let body = String::from_utf8_lossy(&done.body);
    assert_eq!(done.status, 200, "{body}");
    assert!(body.contains("flushed 1 log file of app \\\"web\\\""), "{body}");
    assert_eq!(std::fs::metadata(&out)?.len(), 0);
    Ok(())
}
