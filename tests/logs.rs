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
