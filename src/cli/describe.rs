//! `corral describe APP` (PM2's `pm2 describe`): one app, everything about it.
//!
//! The workers, their last exits, restarts and reloads come from the running instance (its
//! status); the settings come from the config file as it is now, with the environment the
//! instance runs (`--env`) merged in. The file may have changed since the last reload: the
//! output says when its worker count no longer matches. Environment values are not printed,
//! only their names: they often hold secrets, and `describe` output ends up in tickets.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use super::{config_error, control, table};
use crate::config::{units, AppConfig, Config};
use crate::control::{Reply, Request};
use crate::logs::files::slot_path;
use crate::supervisor::status::{AppStatus, Status};

/// Runs `corral describe APP`.
pub(super) fn describe(path: &Path, app: &str) -> anyhow::Result<ExitCode> {
    let mut config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => return Ok(config_error(&e)),
    };
    let mut status = None;
    let code = control(path, Request::Status, |reply| match reply {
        Reply::Status(s) => status = Some(s),
        other => super::print_reply(other),
    })?;
    let Some(status) = status else {
        return Ok(code);
    };
    if let Some(name) = &status.env {
        // The instance runs with it: show the settings it uses.
        let _ = config.choose_env(name);
    }
    let (Some(running), Some(settings)) = (status.apps.iter().find(|a| a.name == app), config.app(app)) else {
        let names: Vec<&str> = status.apps.iter().map(|a| a.name.as_str()).collect();
        eprintln!("corral: no app named {app:?}; the running instance has {names:?}");
        return Ok(ExitCode::FAILURE);
    };
    print!("{}", text(&status, running, settings));
    Ok(ExitCode::SUCCESS)
}

/// The description.
fn text(status: &Status, app: &AppStatus, config: &AppConfig) -> String {
    let mut out = String::new();
    let row = |out: &mut String, key: &str, value: String| {
        let _ = writeln!(out, "  {key:<16} {value}");
    };
    let _ = writeln!(out, "app {}", app.name);
    row(&mut out, "config", status.config.clone());
    if let Some(env) = &status.env {
        row(
            &mut out,
            "env",
            format!("{env} ([app.env_{env}] merged over [app.env])"),
        );
    }
    row(&mut out, "command", shell_words(&config.command));
    row(&mut out, "cwd", config.cwd.display().to_string());
    let resolved = config.instances.resolve(crate::config::usable_cpus());
    let mut instances = format!("{} ({} ready)", app.instances, app.ready);
    if resolved != app.instances {
        let _ = write!(instances, "; the file now says {resolved}: `corral reload` applies it");
    }
    row(&mut out, "instances", instances);
    match &app.listen {
        Some(listen) => row(
            &mut out,
            "listen",
            format!("{listen} (workers get {} on loopback)", config.port_env),
        ),
        None => row(&mut out, "listen", "none (plain processes, no port)".into()),
    }
    if let Some(tls) = &app.tls {
        row(&mut out, "tls", super::table::certificate_line(tls));
    }
    let names: Vec<&str> = config.env.iter().map(|(k, _)| k.as_str()).collect();
    row(
        &mut out,
        "env vars",
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ") + " (values not shown)"
        },
    );
    row(
        &mut out,
        "restart",
        if config.autorestart {
            format!(
                "on exit (max_restarts {} within min_uptime {}, restart_delay {}, backoff {})",
                config.max_restarts,
                units::format_duration(config.min_uptime),
                units::format_duration(config.restart_delay),
                units::format_duration(config.exp_backoff_restart_delay),
            )
        } else {
            "never (autorestart = false)".into()
        },
    );
    if let Some(limit) = config.max_memory_restart {
        row(&mut out, "memory cap", units::format_size(limit));
    }
    row(
        &mut out,
        "timeouts",
        format!(
            "listen {}, drain {}, kill {} ({})",
            units::format_duration(config.listen_timeout),
            units::format_duration(config.drain_timeout),
            units::format_duration(config.kill_timeout),
            config.kill_signal
        ),
    );
    row(
        &mut out,
        "reload",
        format!(
            "{} worker(s) at a time; {}",
            config.reload_batch,
            if config.reload_keep_old {
                "old workers kept until every slot is replaced, for the rollback"
            } else {
                "each old worker stopped once its replacement is ready, no rollback (reload_keep_old = false)"
            }
        ),
    );
    for (key, file) in [
        ("out_file", &config.logs.out_file),
        ("error_file", &config.logs.error_file),
    ] {
        let value = match file {
            Some(path) if config.logs.merge_logs => slot_path(path, 0, true).display().to_string(),
            Some(path) => (0..app.instances.max(1))
                .map(|slot| slot_path(path, slot, false).display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            None => "corral's own output (and `corral logs`, from memory)".into(),
        };
        row(&mut out, key, value);
    }
    if let Some(access) = &config.access_log {
        row(&mut out, "access_log", access.path.display().to_string());
    }
    if !app.restarts_by_reason.is_empty() {
        let reasons: Vec<String> = app.restarts_by_reason.iter().map(|(r, n)| format!("{r} {n}")).collect();
        row(&mut out, "restarts", reasons.join(", "));
    }
    if let Some(reload) = &status.last_reload {
        let ago = Duration::from_millis(status.uptime_ms.saturating_sub(reload.at_ms));
        row(
            &mut out,
            "last reload",
            format!(
                "{} {} ago: {}",
                if reload.ok { "done" } else { "FAILED" },
                units::format_duration(ago),
                reload.message.lines().next().unwrap_or_default()
            ),
        );
    }
    let mut only = status.clone();
    only.apps.retain(|a| a.name == app.name);
    out.push('\n');
    out.push_str(&table(&only));
    let exits: Vec<String> = app
        .workers
        .iter()
        .filter_map(|w| w.last_exit.as_ref().map(|e| format!("  slot {}: {e}", w.slot)))
        .collect();
    if !exits.is_empty() {
        out.push_str("last exits:\n");
        for line in exits {
            let _ = writeln!(out, "{line}");
        }
    }
    out
}

/// `argv` as a shell would need it typed.
fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|word| {
            if !word.is_empty()
                && word
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@%+,".contains(&b))
            {
                word.clone()
            } else {
                format!("'{}'", word.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
