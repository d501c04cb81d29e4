//! The `corral status` table; coloured states on a terminal (unless `NO_COLOR` is set).

use crate::config::units;
use crate::supervisor::status::Status;

/// One app's certificate for `status`: subject and expiry, and what is wrong if anything.
pub(super) fn certificate_line(tls: &crate::tls::CertStatus) -> String {
    let mut line = match (&tls.subject, tls.not_after) {
        (Some(subject), Some(not_after)) => {
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(not_after);
            let day = crate::logs::files::timestamp("YYYY-MM-DD", at);
            let left = at.duration_since(std::time::SystemTime::now()).map_or_else(
                |_| "EXPIRED".to_owned(),
                |d| format!("{} days left", d.as_secs() / 86_400),
            );
            format!("certificate {subject}, expires {day} ({left})")
        }
        _ => "no certificate yet".to_owned(),
    };
    if let Some(problem) = &tls.problem {
        line.push_str(&format!("; {problem}"));
    }
    line
}

/// The last minute's traffic of an app for the status footer: `, 12.5 req/s, p99 3.2 ms`.
fn traffic(req_per_sec: Option<f64>, p99_ms: Option<f64>) -> String {
    let Some(rate) = req_per_sec else {
        return String::new();
    };
    let rate = if rate >= 100.0 {
        format!("{rate:.0}")
    } else {
        format!("{rate:.1}")
    };
    match p99_ms {
        Some(p99) if p99 >= 100.0 => format!(", {rate} req/s, p99 {p99:.0} ms (last minute)"),
        Some(p99) => format!(", {rate} req/s, p99 {p99:.1} ms (last minute)"),
        None => format!(", {rate} req/s (last minute)"),
    }
}

pub(super) fn table(status: &Status) -> String {
    use std::io::IsTerminal;
    let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let header = [
        "APP",
        "SLOT",
        "GEN",
        "PID",
        "PORT",
        "STATE",
        "UPTIME",
        "RESTARTS",
        "CPU",
        "MEMORY",
        "REQUESTS",
        "IN FLIGHT",
    ];
    let mut rows = vec![header.map(String::from).to_vec()];
    for app in &status.apps {
        for w in &app.workers {
            let dash = || "-".to_owned();
            rows.push(vec![
                w.app.clone(),
                w.slot.to_string(),
                w.generation.map_or_else(dash, |g| g.to_string()),
                w.pid.map_or_else(dash, |p| p.to_string()),
                w.port.map_or_else(dash, |p| p.to_string()),
                w.state.clone(),
                if w.pid.is_some() { uptime(w.uptime_ms) } else { dash() },
                w.restarts.to_string(),
                w.cpu_percent.map_or_else(dash, |c| format!("{c:.0}%")),
                w.memory_bytes.map_or_else(dash, units::format_size),
                w.requests.to_string(),
                w.in_flight.to_string(),
            ]);
        }
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (index, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(column, (cell, w))| {
                let padded = format!("{cell:<w$}");
                if colour && column == 5 && index > 0 {
                    paint(cell, padded)
                } else {
                    padded
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    let apps: Vec<String> = status
        .apps
        .iter()
        .map(|a| match &a.listen {
            Some(listen) => format!(
                "{}: {}/{} ready on {listen}{}",
                a.name,
                a.ready,
                a.instances,
                traffic(a.req_per_sec, a.p99_ms)
            ),
            None => format!("{}: {}/{} running", a.name, a.ready, a.instances),
        })
        .collect();
    let env = status.env.as_ref().map(|e| format!(", env {e}")).unwrap_or_default();
    out.push_str(&format!(
        "corral pid {}, up {}{env}; {}\n",
        status.pid,
        uptime(status.uptime_ms),
        apps.join("; ")
    ));
    for app in &status.apps {
        if let Some(tls) = &app.tls {
            out.push_str(&format!("{}: {}\n", app.name, certificate_line(tls)));
        }
    }
    if status.reloading {
        out.push_str("a reload is running\n");
    }
    if let Some(other) = &status.upgrade {
        let line = match other.state.as_str() {
            "starting" => format!(
                "upgrade under way: new corral pid {} starting ({})",
                other.pid, other.detail
            ),
            "serving" => format!(
                "upgraded: new corral pid {} serves; this one (pid {}) drains",
                other.pid, status.pid
            ),
            "draining" => format!("previous corral pid {} is draining its connections", other.pid),
            state => format!("other corral pid {}: {state}", other.pid),
        };
        out.push_str(&line);
        out.push('\n');
    }
    if let Some(last) = status.last_reload.as_ref().filter(|r| !r.ok) {
        let ago = uptime(status.uptime_ms.saturating_sub(last.at_ms));
        out.push_str(&format!("last reload FAILED {ago} ago: {}\n", last.message));
    }
    out
}

/// A padded state cell in its colour: green serving, yellow in transition, red failing.
fn paint(state: &str, padded: String) -> String {
    let code = match state {
        "online" => "32",
        "starting" | "draining" | "stopping" | "waiting" => "33",
        "errored" | "unhealthy" | "unreachable" => "31",
        _ => "2",
    };
    format!("\x1b[{code}m{padded}\x1b[0m")
}

fn uptime(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}
