//! The restart policy, stop and readiness keys, the log keys, cron and watch, and the user:
//! PM2 keys that map one to one onto corral keys of the same name (times become durations,
//! aliases are resolved), with what differs said in the comment.

use std::time::Duration;

use serde_json::{Map, Value as Json};

use super::kind;
use super::map::{summary, take, under_cwd, Context};
use super::write::{App, Value};
use crate::config::units::{format_duration, parse_duration, parse_size};

/// A PM2 time: a number of milliseconds, or a string of digits with `h`, `m`, `s` (or `ms`).
fn duration(v: &Json) -> Result<Duration, String> {
    match v {
        Json::Number(n) => match n.as_f64() {
            Some(ms) if (0.0..1e12).contains(&ms) => Ok(Duration::from_millis(ms.round() as u64)),
            _ => Err("not a number of milliseconds".into()),
        },
        Json::String(s) => parse_duration(s).ok_or_else(|| "not a time such as 1000, \"10s\", \"5m\"".into()),
        other => Err(format!("expected a number of milliseconds, found {}", kind(other))),
    }
}

/// Maps a PM2 time key to a corral duration key of the same name.
fn time_key(keys: &mut Map<String, Json>, app: &mut App, key: &str, note: Option<&str>) {
    if let Some((_, v)) = take(keys, app, &[key]) {
        match duration(&v) {
            Ok(d) => {
                let mut comments = vec![format!("PM2 {key}: {}", summary(&v))];
                comments.extend(note.map(str::to_owned));
                app.set(key, Value::Str(format_duration(d)), comments);
            }
            Err(why) => app.unmapped(format!("{key} = {}", summary(&v)), why),
        }
    }
}

fn bool_key(keys: &mut Map<String, Json>, app: &mut App, key: &str, aliases: &[&str], note: Option<&str>) {
    let mut names = vec![key];
    names.extend_from_slice(aliases);
    if let Some((found, v)) = take(keys, app, &names) {
        match v {
            Json::Bool(b) => {
                let mut comments = vec![format!("PM2 {found}: {b}")];
                comments.extend(note.map(str::to_owned));
                app.set(key, Value::Bool(b), comments);
            }
            other => app.unmapped(format!("{found} = {}", summary(&other)), "expected true or false"),
        }
    }
}

/// The restart policy, stop signal and readiness.
pub(super) fn restart_policy(keys: &mut Map<String, Json>, app: &mut App) {
    bool_key(keys, app, "autorestart", &[], None);
    time_key(keys, app, "min_uptime", None);
    if let Some((_, v)) = take(keys, app, &["max_restarts"]) {
        match v.as_i64() {
            Some(n @ 0..=1_000_000) => app.set("max_restarts", Value::Int(n), vec![format!("PM2 max_restarts: {n}")]),
            _ => app.unmapped(format!("max_restarts = {}", summary(&v)), "expected a count from 0"),
        }
    }
    time_key(keys, app, "restart_delay", None);
    time_key(
        keys,
        app,
        "exp_backoff_restart_delay",
        Some("corral doubles it per restart up to 15s (PM2: x1.5), reset after 30s up"),
    );
    if let Some((_, v)) = take(keys, app, &["stop_exit_codes"]) {
        let codes: Option<Vec<i64>> = match &v {
            Json::Number(n) => n.as_i64().map(|c| vec![c]),
            Json::Array(items) => items.iter().map(Json::as_i64).collect(),
            _ => None,
        };
        match codes {
            Some(codes) if codes.iter().all(|c| (0..=255).contains(c)) => app.set(
                "stop_exit_codes",
                Value::List(codes.into_iter().map(Value::Int).collect()),
                vec![format!("PM2 stop_exit_codes: {}", summary(&v))],
            ),
            _ => app.unmapped(
                format!("stop_exit_codes = {}", summary(&v)),
                "expected exit codes 0-255",
            ),
        }
    }
    if let Some((_, v)) = take(keys, app, &["kill_signal"]) {
        match v.as_str().and_then(signal_name) {
            Some(name) => app.set(
                "kill_signal",
                Value::Str(name),
                vec![format!("PM2 kill_signal: {}", summary(&v))],
            ),
            None => app.unmapped(
                format!("kill_signal = {}", summary(&v)),
                "not a signal name such as \"SIGINT\"",
            ),
        }
    }
    time_key(
        keys,
        app,
        "kill_timeout",
        Some("then SIGKILL, as in PM2 (whose default is 1600ms; corral's is 5s)"),
    );
    time_key(
        keys,
        app,
        "listen_timeout",
        Some("a new worker not ready by then has failed (PM2 went on as if it were ready)"),
    );
    bool_key(
        keys,
        app,
        "wait_ready",
        &[],
        Some("ready on process.send('ready'), within listen_timeout"),
    );
    if let Some((_, v)) = take(keys, app, &["max_memory_restart"]) {
        let bytes = match &v {
            Json::Number(n) => n.as_u64(),
            Json::String(s) => parse_size(s),
            _ => None,
        };
        match bytes {
            Some(b) if b > 0 => app.set(
                "max_memory_restart",
                match &v {
                    Json::String(s) => Value::Str(s.trim().to_owned()),
                    _ => Value::Int(b as i64),
                },
                vec![
                    format!("PM2 max_memory_restart: {}", summary(&v)),
                    "RSS of the worker's process tree, read every 2s; replaced without downtime".into(),
                ],
            ),
            _ => app.unmapped(
                format!("max_memory_restart = {}", summary(&v)),
                "not a size such as \"200M\" or a number of bytes",
            ),
        }
    }
}

fn signal_name(text: &str) -> Option<String> {
    use std::str::FromStr;
    let upper = text.trim().to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    nix::sys::signal::Signal::from_str(&full).ok().map(|_| full)
}

/// `out_file`, `error_file`, `log_file`, `merge_logs`, `log_date_format`, `time`.
pub(super) fn logs(keys: &mut Map<String, Json>, app: &mut App, cx: &Context<'_>, cwd: Option<&str>) {
    let mut files = false;
    for (key, aliases) in [
        ("out_file", &["out", "output", "out_log"][..]),
        ("error_file", &["error", "err", "err_file", "err_log"][..]),
    ] {
        let mut names = vec![key];
        names.extend_from_slice(aliases);
        match take(keys, app, &names) {
            Some((found, Json::String(s))) if s == "/dev/null" || s == "NULL" => app.unmapped(
                format!("{found} = {s:?}"),
                "corral has no setting that discards output; without the key it goes to corral's own stdout/stderr",
            ),
            Some((found, Json::String(s))) if !s.is_empty() => {
                let path = under_cwd(&s, cwd, cx);
                let mut comments = vec![format!("PM2 {found}: {s:?} (PM2 resolved it against cwd)")];
                if key == "out_file" {
                    comments.push("one file per worker (web-out-0.log, ...) unless merge_logs, as in PM2".into());
                }
                app.set(key, Value::Str(path), comments);
                files = true;
            }
            Some((found, v)) => app.unmapped(format!("{found} = {}", summary(&v)), "expected a file path"),
            None => {}
        }
    }
    bool_key(
        keys,
        app,
        "merge_logs",
        &["combine_logs"],
        Some("one file for every worker"),
    );
    let time = match take(keys, app, &["time"]) {
        Some((_, Json::Bool(b))) => b,
        Some((_, v)) => {
            app.unmapped(format!("time = {}", summary(&v)), "expected true or false");
            false
        }
        None => false,
    };
    let format = take(keys, app, &["log_date_format"]);
    let where_ = if files {
        "on every line it writes to out_file / error_file"
    } else {
        "on the lines it writes to out_file / error_file (none is set)"
    };
    if time {
        if let Some((_, v)) = format {
            app.unmapped(
                format!("log_date_format = {}", summary(&v)),
                "time: true replaced it in PM2 with YYYY-MM-DDTHH:mm:ss",
            );
        }
        app.set(
            "log_date_format",
            Value::Str("YYYY-MM-DDTHH:mm:ss".into()),
            vec![
                "PM2 time: true, which stamps each line with YYYY-MM-DDTHH:mm:ss".into(),
                format!("corral puts the stamp {where_}"),
            ],
        );
    } else {
        match format {
            Some((_, Json::String(s))) if !s.is_empty() => app.set(
                "log_date_format",
                Value::Str(s.clone()),
                vec![
                    format!("PM2 log_date_format: {s:?} (day.js tokens; corral reads the moment.js ones)"),
                    format!("corral puts the stamp {where_}"),
                ],
            ),
            Some((_, v)) => app.unmapped(format!("log_date_format = {}", summary(&v)), "expected a format string"),
            None => {}
        }
    }
}

/// `cron_restart`, `watch`, `ignore_watch`, `watch_delay`.
pub(super) fn watch(keys: &mut Map<String, Json>, app: &mut App) {
    match take(keys, app, &["cron_restart", "cron"]) {
        Some((_, Json::String(s))) if s.trim() == "0" => {}
        Some((_, Json::Number(n))) if n.as_i64() == Some(0) => {}
        Some((found, Json::String(s))) => {
            let fields: Vec<&str> = s.split_whitespace().collect();
            match fields.len() {
                5 => app.set(
                    "cron_restart",
                    Value::Str(fields.join(" ")),
                    vec![format!(
                        "PM2 {found}: {s:?}: a rolling restart (no downtime) at these times"
                    )],
                ),
                6 if fields[0] == "0" => app.set(
                    "cron_restart",
                    Value::Str(fields[1..].join(" ")),
                    vec![
                        format!("PM2 {found}: {s:?}; its seconds field (0) is dropped: corral's cron has five fields"),
                        "a rolling restart (no downtime) at these times".into(),
                    ],
                ),
                _ => app.unmapped(
                    format!("{found} = {s:?}"),
                    "corral's cron_restart has five fields (minute hour day month weekday)",
                ),
            }
        }
        Some((found, v)) => app.unmapped(format!("{found} = {}", summary(&v)), "expected a cron expression"),
        None => {}
    }
    let watching = match take(keys, app, &["watch"]) {
        Some((_, Json::Bool(false))) | None => false,
        Some((_, Json::Bool(true))) => {
            app.set(
                "watch",
                Value::Bool(true),
                vec!["PM2 watch: true: a rolling restart when a file under cwd changes".into()],
            );
            true
        }
        Some((_, v)) => match string_list_strict(&v) {
            Some(paths) if !paths.is_empty() => {
                app.set(
                    "watch",
                    Value::List(paths.into_iter().map(Value::Str).collect()),
                    vec![format!(
                        "PM2 watch: {}: a rolling restart when one of these changes",
                        summary(&v)
                    )],
                );
                true
            }
            _ => {
                app.unmapped(format!("watch = {}", summary(&v)), "expected true or a list of paths");
                false
            }
        },
    };
    if let Some((_, v)) = take(keys, app, &["ignore_watch"]) {
        match string_list_strict(&v) {
            Some(paths) if watching => app.set(
                "ignore_watch",
                Value::List(paths.into_iter().map(Value::Str).collect()),
                vec![format!("PM2 ignore_watch: {}", summary(&v))],
            ),
            Some(_) => app.unmapped(format!("ignore_watch = {}", summary(&v)), "watch is off"),
            None => app.unmapped(format!("ignore_watch = {}", summary(&v)), "expected a list of paths"),
        }
    }
    if watching {
        time_key(keys, app, "watch_delay", None);
    } else if let Some((_, v)) = take(keys, app, &["watch_delay"]) {
        app.unmapped(format!("watch_delay = {}", summary(&v)), "watch is off");
    }
}

/// A string (as one item) or a list of strings.
fn string_list_strict(v: &Json) -> Option<Vec<String>> {
    match v {
        Json::String(s) => Some(vec![s.clone()]),
        Json::Array(items) => items.iter().map(|i| i.as_str().map(str::to_owned)).collect(),
        _ => None,
    }
}

/// `uid` (alias `user`) and `gid` → `user` and `group`.
pub(super) fn user(keys: &mut Map<String, Json>, app: &mut App) {
    let account = |v: &Json| match v {
        Json::String(s) if !s.is_empty() => Some(Value::Str(s.clone())),
        Json::Number(n) => n.as_i64().filter(|id| *id >= 0).map(Value::Int),
        _ => None,
    };
    let uid = take(keys, app, &["uid", "user"]);
    let gid = take(keys, app, &["gid"]);
    let mut have_user = false;
    if let Some((found, v)) = uid {
        match account(&v) {
            Some(value) => {
                app.set(
                    "user",
                    value,
                    vec![
                        format!(
                            "PM2 {found}: {}; needs corral to run as root, and the user to exist",
                            summary(&v)
                        ),
                        "on this machine for `corral check`".into(),
                    ],
                );
                have_user = true;
            }
            None => app.unmapped(format!("{found} = {}", summary(&v)), "expected a user name or uid"),
        }
    }
    if let Some((_, v)) = gid {
        match account(&v) {
            Some(value) if have_user => app.set("group", value, vec![format!("PM2 gid: {}", summary(&v))]),
            Some(_) => app.unmapped(
                format!("gid = {}", summary(&v)),
                "corral sets a group only with a user (uid); the workers keep corral's",
            ),
            None => app.unmapped(format!("gid = {}", summary(&v)), "expected a group name or gid"),
        }
    }
}

/// Why a PM2 key left over was not imported.
pub(super) fn reason(key: &str) -> &'static str {
    match key {
        "pmx" | "automation" | "trace" | "disable_trace" | "v8" | "event_loop_inspector" | "deep_monitoring" | "io" => {
            "PM2.io monitoring; corral's metrics are GET /metrics on the [admin] listener"
        }
        "vizion" => "git metadata for PM2's dashboard; corral keeps none",
        "post_update" => "commands PM2.io ran after a pull; corral does not pull or deploy",
        "source_map_support" | "disable_source_map_support" => {
            "PM2 preloaded source-map-support; add --enable-source-maps to the command instead"
        }
        "namespace" => "corral has no namespaces: one config file is one instance",
        "filter_env" => "workers get corral's own environment plus [app.env]; filter it where corral starts",
        "force" => "corral never starts an app twice: names are unique in a config",
        "append_env_to_name" => "corral's app names do not change with the environment",
        "name_prefix" => "corral's app names are taken as written",
        "pid_file" | "pid" => "corral writes no pid files: `corral status --json` lists every worker's pid",
        "treekill" => "corral always signals a worker's whole process group",
        "shutdown_with_message" => "corral stops workers with kill_signal (default SIGTERM), not an IPC message",
        "kill_retry_time" => "corral sends SIGKILL once, when kill_timeout has passed",
        "windowsHide" => "Windows only",
        "username" => "informational in PM2; uid runs the app as another user",
        "execute_command" => "corral runs the command it is given, with no mode to choose",
        "install_url" => "PM2 module installation, not an app setting",
        "log_type" => "corral writes worker output as timestamped text lines, not JSON",
        "disable_logs" => {
            "corral always keeps recent output (`corral logs`); without out_file it goes to corral's stdout"
        }
        "log_file" | "log" => {
            "corral keeps no combined log: out_file and error_file keep the two streams, `corral logs` shows both"
        }
        "watch_options" => "chokidar options; corral's watcher takes watch, ignore_watch and watch_delay",
        "version" => "informational",
        _ => "not a PM2 option this import knows",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pm2_times_are_milliseconds_or_suffixed() {
        assert_eq!(duration(&Json::from(1600)), Ok(Duration::from_millis(1600)));
        assert_eq!(duration(&Json::from("10s")), Ok(Duration::from_secs(10)));
        assert!(duration(&Json::from(-1)).is_err());
        assert!(duration(&Json::from("soon")).is_err());
        assert!(duration(&Json::Null).is_err());
    }
}
