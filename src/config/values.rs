//! Readers of single config values: each takes one spanned TOML value and returns it typed,
//! or a message saying what was expected (the caller adds the key and its line).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroUsize;
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;
use toml::de::DeValue;

use super::table::type_name;
use super::units::{parse_duration, parse_size, DURATION_HINT, SIZE_HINT};
use super::{AccessLogFormat, Balance, HealthCheck, Instances, Network, RunAs, Sticky};

/// An account named by a name or a number: looked up with `by_name` or `by_id`; `what` is
/// "user" or "group", for the messages.
fn account<T>(
    v: &DeValue<'_>,
    what: &str,
    by_name: impl FnOnce(&str) -> nix::Result<Option<T>>,
    by_id: impl FnOnce(u32) -> nix::Result<Option<T>>,
) -> Result<T, String> {
    let found = match v {
        DeValue::String(name) => by_name(name),
        _ => match integer(v).and_then(|id| u32::try_from(id).ok()) {
            Some(id) => by_id(id),
            None => return Err(format!("expected a {what} name or id, found {}", type_name(v))),
        },
    };
    match found {
        Ok(Some(account)) => Ok(account),
        Ok(None) => Err(format!("no such {what} on this machine")),
        Err(e) => Err(format!("cannot look the {what} up: {e}")),
    }
}

/// `user`: a user name or a numeric uid that exists on this machine.
pub(super) fn read_user(v: &DeValue<'_>) -> Result<RunAs, String> {
    use nix::unistd::{Uid, User};
    let user = account(v, "user", User::from_name, |id| User::from_uid(Uid::from_raw(id)))?;
    Ok(RunAs {
        name: user.name,
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        home: user.dir,
    })
}

/// `group`: a group name or a numeric gid that exists on this machine.
pub(super) fn read_group(v: &DeValue<'_>) -> Result<u32, String> {
    use nix::unistd::{Gid, Group};
    let group = account(v, "group", Group::from_name, |id| Group::from_gid(Gid::from_raw(id)))?;
    Ok(group.gid.as_raw())
}

pub(super) fn integer(v: &DeValue<'_>) -> Option<i64> {
    v.as_integer()
        .and_then(|i| i64::from_str_radix(i.as_str(), i.radix()).ok())
}

pub(super) fn read_string(v: &DeValue<'_>) -> Result<String, String> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("expected a string, found {}", type_name(v)))
}

pub(super) fn read_name(v: &DeValue<'_>) -> Result<String, String> {
    let name = read_string(v)?;
    let valid =
        !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if valid {
        Ok(name)
    } else {
        Err(format!(
            "{name:?} is not a valid name (1-64 of letters, digits, '-', '_', '.')"
        ))
    }
}

pub(super) fn read_path(v: &DeValue<'_>) -> Result<String, String> {
    let path = read_string(v)?;
    let valid = path.starts_with('/') && path.bytes().all(|b| b.is_ascii_graphic());
    if valid {
        Ok(path)
    } else {
        Err(format!("{path:?} is not a request path such as \"/health\""))
    }
}

pub(super) fn read_balance(v: &DeValue<'_>) -> Result<Balance, String> {
    match read_string(v)?.as_str() {
        "round_robin" => Ok(Balance::RoundRobin),
        "least_conn" => Ok(Balance::LeastConn),
        other => Err(format!(
            "{other:?} is not a balancing method: \"round_robin\" or \"least_conn\""
        )),
    }
}

pub(super) fn read_access_log_format(v: &DeValue<'_>) -> Result<AccessLogFormat, String> {
    match read_string(v)?.as_str() {
        "combined" => Ok(AccessLogFormat::Combined),
        "json" => Ok(AccessLogFormat::Json),
        other => Err(format!(
            "{other:?} is not an access log format: \"combined\" or \"json\""
        )),
    }
}

pub(super) fn read_sticky(v: &DeValue<'_>) -> Result<Sticky, String> {
    match read_string(v)?.as_str() {
        "none" => Ok(Sticky::None),
        "cookie" => Ok(Sticky::Cookie),
        "ip" => Ok(Sticky::Ip),
        other => Err(format!(
            "{other:?} is not a sticky mode: \"none\", \"cookie\" or \"ip\""
        )),
    }
}

pub(super) fn read_cookie_name(v: &DeValue<'_>) -> Result<String, String> {
    let name = read_string(v)?;
    let valid =
        !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if valid {
        Ok(name)
    } else {
        Err(format!(
            "{name:?} is not a valid cookie name (letters, digits, '-', '_', '.')"
        ))
    }
}

pub(super) fn read_networks(v: &DeValue<'_>) -> Result<Vec<Network>, String> {
    let DeValue::Array(items) = v else {
        return Err(format!(
            "expected an array of addresses such as [\"127.0.0.1\", \"10.0.0.0/8\"], found {}",
            type_name(v)
        ));
    };
    items
        .iter()
        .map(|item| {
            let text = item.get_ref().as_str().ok_or("expected strings")?;
            text.parse::<Network>()
                .map_err(|_| format!("{text:?} is not an IP address or CIDR block"))
        })
        .collect()
}

pub(super) fn read_health_check(v: &DeValue<'_>) -> Result<HealthCheck, String> {
    let DeValue::Table(table) = v else {
        return Err(format!(
            "expected a table such as {{ path = \"/health\", interval = \"5s\" }}, found {}",
            type_name(v)
        ));
    };
    let mut check = HealthCheck {
        path: String::new(),
        interval: Duration::from_secs(5),
        timeout: Duration::from_secs(2),
        unhealthy_threshold: 3,
    };
    for (key, value) in table.iter() {
        let value = value.get_ref();
        let key = key.get_ref().as_ref();
        let within = |e: String| format!("{key}: {e}");
        match key {
            "path" => check.path = read_path(value).map_err(within)?,
            "interval" => check.interval = read_positive_duration(value).map_err(within)?,
            "timeout" => check.timeout = read_positive_duration(value).map_err(within)?,
            "unhealthy_threshold" => check.unhealthy_threshold = read_count(value, 1, 100).map_err(within)? as u32,
            other => {
                return Err(format!(
                    "{other}: unknown key (path, interval, timeout, unhealthy_threshold)"
                ))
            }
        }
    }
    if check.path.is_empty() {
        return Err("path: missing (it is required)".into());
    }
    Ok(check)
}

pub(super) fn read_bool(v: &DeValue<'_>) -> Result<bool, String> {
    v.as_bool()
        .ok_or_else(|| format!("expected true or false, found {}", type_name(v)))
}

/// `log_rotate_interval`: `"daily"` (local midnight), `"hourly"`, or a cron expression.
pub(super) fn read_rotate_interval(v: &DeValue<'_>) -> Result<crate::cron::Schedule, String> {
    let text = read_string(v)?;
    let expression = match text.trim() {
        "daily" => "0 0 * * *",
        "hourly" => "0 * * * *",
        other => other,
    };
    crate::cron::Schedule::parse(expression)
        .map_err(|e| format!("expected \"daily\", \"hourly\" or a cron expression: {e}"))
}

pub(super) fn read_exit_codes(v: &DeValue<'_>) -> Result<Vec<i32>, String> {
    let codes = match v {
        DeValue::Array(items) => items.iter().map(|i| integer(i.get_ref())).collect::<Option<Vec<i64>>>(),
        other => integer(other).map(|c| vec![c]),
    };
    let codes = codes.ok_or_else(|| {
        format!(
            "expected an exit code or an array of them such as [0], found {}",
            type_name(v)
        )
    })?;
    codes
        .into_iter()
        .map(|c| {
            if (0..=255).contains(&c) {
                Ok(c as i32)
            } else {
                Err(format!("{c} is not an exit code (0..255)"))
            }
        })
        .collect()
}

pub(super) fn read_env_name(v: &DeValue<'_>) -> Result<String, String> {
    let name = read_string(v)?;
    let valid = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(name)
    } else {
        Err(format!("{name:?} is not a valid environment variable name"))
    }
}

pub(super) fn read_argv(v: &DeValue<'_>) -> Result<Vec<String>, String> {
    const HINT: &str = r#"expected an array of strings such as ["node", "server.js"] (no shell)"#;
    let DeValue::Array(items) = v else {
        return Err(format!("{HINT}, found {}", type_name(v)));
    };
    let argv = items
        .iter()
        .map(|item| item.get_ref().as_str().map(str::to_owned))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| format!("{HINT}, found an array with a non-string item"))?;
    match argv.first() {
        None => Err(format!("{HINT}, found an empty array")),
        Some(program) if program.is_empty() => Err("the program name is empty".into()),
        Some(_) => Ok(argv),
    }
}

pub(super) fn read_listen(v: &DeValue<'_>) -> Result<SocketAddr, String> {
    const HINT: &str = r#"expected an address such as "0.0.0.0:4321", "127.0.0.1:8080", "[::]:80" or a port number"#;
    if let Some(port) = integer(v) {
        return u16::try_from(port)
            .map(|port| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port))
            .map_err(|_| format!("{port} is not a port number"));
    }
    let text = v.as_str().ok_or_else(|| format!("{HINT}, found {}", type_name(v)))?;
    if let Some(port) = text.strip_prefix("localhost:") {
        if let Ok(port) = port.parse::<u16>() {
            return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
        }
    }
    text.parse().map_err(|_| format!("{HINT}, found {text:?}"))
}

pub(super) fn read_instances(v: &DeValue<'_>) -> Result<Instances, String> {
    const HINT: &str = r#"expected a positive integer, "max", or a negative integer (max - n)"#;
    let number = match v {
        DeValue::String(s) if s.as_ref() == "max" => return Ok(Instances::MaxMinus(0)),
        DeValue::String(s) => s.parse::<i64>().map_err(|_| format!("{HINT}, found {s:?}"))?,
        _ => integer(v).ok_or_else(|| format!("{HINT}, found {}", type_name(v)))?,
    };
    match number {
        0 => Err(format!("{HINT}, found 0")),
        n if n > 1024 => Err(format!("{n} workers is more than the limit of 1024")),
        n if n > 0 => Ok(Instances::Count(NonZeroUsize::new(n as usize).expect("UNWRAP: n > 0"))),
        n => Ok(Instances::MaxMinus(n.unsigned_abs().min(1024) as usize)),
    }
}

pub(super) fn read_duration(v: &DeValue<'_>) -> Result<Duration, String> {
    if let Some(ms) = integer(v) {
        return u64::try_from(ms)
            .map(Duration::from_millis)
            .map_err(|_| format!("expected {DURATION_HINT}, found {ms}"));
    }
    let text = v
        .as_str()
        .ok_or_else(|| format!("expected {DURATION_HINT}, found {}", type_name(v)))?;
    parse_duration(text).ok_or_else(|| format!("expected {DURATION_HINT}, found {text:?}"))
}

pub(super) fn read_positive_duration(v: &DeValue<'_>) -> Result<Duration, String> {
    match read_duration(v)? {
        d if d.is_zero() => Err("must be greater than zero".into()),
        d => Ok(d),
    }
}

pub(super) fn read_size(v: &DeValue<'_>) -> Result<u64, String> {
    if let Some(bytes) = integer(v) {
        return u64::try_from(bytes).map_err(|_| format!("expected {SIZE_HINT}, found {bytes}"));
    }
    let text = v
        .as_str()
        .ok_or_else(|| format!("expected {SIZE_HINT}, found {}", type_name(v)))?;
    parse_size(text).ok_or_else(|| format!("expected {SIZE_HINT}, found {text:?}"))
}

pub(super) fn read_header_size(v: &DeValue<'_>) -> Result<usize, String> {
    // hyper's read buffer cannot be smaller than 8 KiB; 1 MiB is already generous.
    match read_size(v)? {
        n if (8 << 10..=1 << 20).contains(&n) => Ok(n as usize),
        n => Err(format!("{n} bytes is outside the allowed range 8K..1M")),
    }
}

pub(super) fn read_count(v: &DeValue<'_>, min: i64, max: i64) -> Result<usize, String> {
    match integer(v) {
        Some(n) if (min..=max).contains(&n) => Ok(n as usize),
        Some(n) => Err(format!("{n} is outside the allowed range {min}..{max}")),
        None => Err(format!("expected an integer, found {}", type_name(v))),
    }
}

pub(super) fn read_signal(v: &DeValue<'_>) -> Result<Signal, String> {
    let text = read_string(v)?;
    let upper = text.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&full).map_err(|_| format!("{text:?} is not a signal name such as \"SIGTERM\" or \"SIGINT\""))
}

pub(super) fn read_env(v: &DeValue<'_>) -> Result<Vec<(String, String)>, String> {
    let DeValue::Table(table) = v else {
        return Err(format!("expected a table ([app.env]), found {}", type_name(v)));
    };
    let mut env = Vec::new();
    for (key, value) in table.iter() {
        let key = key.get_ref().as_ref();
        let text = match value.get_ref() {
            DeValue::String(s) => s.to_string(),
            integer @ DeValue::Integer(_) => integer_text(integer),
            DeValue::Float(f) => f.as_str().to_owned(),
            DeValue::Boolean(b) => b.to_string(),
            other => {
                return Err(format!(
                    "{key}: expected a string, number or boolean, found {}",
                    type_name(other)
                ))
            }
        };
        if key.is_empty() || key.contains('=') || key.contains('\0') || text.contains('\0') {
            return Err(format!("{key:?} is not a valid environment variable"));
        }
        env.push((key.to_owned(), text));
    }
    Ok(env)
}

pub(super) fn integer_text(v: &DeValue<'_>) -> String {
    integer(v).map_or_else(|| "0".into(), |i| i.to_string())
}
