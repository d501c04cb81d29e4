//! `env`, `env_<name>`, `port` and `PORT`: the app's environment tables and its `listen`
//! (PM2 has no listen: the port its apps bound is `PORT` in their env), with `increment_var`
//! and `instance_var`, which are about the same variables.

use serde_json::{Map, Value as Json};

use super::kind;
use super::map::{summary, take, Context, Mode};
use super::write::{App, EnvTable, Value};

/// A PORT value as a port number.
fn port_of(v: &Value) -> Option<u16> {
    match v {
        Value::Int(n) => u16::try_from(*n).ok().filter(|p| *p > 0),
        Value::Str(s) => s.trim().parse::<u16>().ok().filter(|p| *p > 0),
        _ => None,
    }
}

/// An env value corral takes: strings, numbers, booleans.
fn env_value(v: &Json) -> Result<Value, String> {
    match v {
        Json::String(s) if s.contains('\0') => {
            Err("contains a NUL byte, which no environment variable can hold".into())
        }
        Json::String(s) => Ok(Value::Str(s.clone())),
        Json::Number(n) => Ok(n.as_i64().map_or_else(|| Value::Str(n.to_string()), Value::Int)),
        Json::Bool(b) => Ok(Value::Bool(*b)),
        other => Err(format!(
            "{} (corral passes strings, numbers and booleans; give it as a string)",
            kind(other)
        )),
    }
}

/// An env object's variables; the bad ones are listed as not imported under `table`.
fn env_vars(table: &str, v: &Json, app: &mut App) -> Vec<(String, Value)> {
    let Some(object) = v.as_object() else {
        app.unmapped(table, format!("expected an object of variables, found {}", kind(v)));
        return Vec::new();
    };
    let mut vars = Vec::new();
    for (name, value) in object {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            app.unmapped(format!("{table}.{name}"), "not a valid environment variable name");
            continue;
        }
        match env_value(value) {
            Ok(value) => vars.push((name.clone(), value)),
            Err(why) => app.unmapped(format!("{table}.{name}"), why),
        }
    }
    vars
}

fn merge(base: &mut Vec<(String, Value)>, over: Vec<(String, Value)>) {
    for (name, value) in over {
        match base.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => base.push((name, value)),
        }
    }
}

/// `env`, `env_<name>`, `port`, `PORT` → `[app.env]`, `[app.env_<name>]` and `listen`; also
/// `increment_var` and `instance_var`, which are about the same variables.
pub(super) fn env_and_listen(
    keys: &mut Map<String, Json>,
    app: &mut App,
    cx: &Context<'_>,
    (mode, many): (Mode, bool),
) {
    let mut env = match take(keys, app, &["env"]) {
        Some((_, v)) => env_vars("env", &v, app),
        None => Vec::new(),
    };
    let env_keys: Vec<String> = keys.keys().filter(|k| k.starts_with("env_")).cloned().collect();
    let mut tables = Vec::new();
    let mut left_out = Vec::new();
    for key in env_keys {
        let Some(value) = keys.remove(&key) else { continue };
        let set = &key["env_".len()..];
        if Some(set) == cx.env {
            let vars = env_vars(&key, &value, app);
            merge(&mut env, vars);
        } else if cx.env.is_some() {
            left_out.push(key);
        } else if set.is_empty() || !set.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            app.unmapped(key, "corral's environment names are letters, digits, '_' and '-'");
        } else {
            let vars = env_vars(&key, &value, app);
            tables.push((key, vars));
        }
    }
    if !left_out.is_empty() {
        app.unmapped(
            left_out.join(", "),
            format!("left out: --env {} picked one environment", cx.env.unwrap_or_default()),
        );
    }

    // `port` is PM2's shortcut for env.PORT, and wins over it.
    if let Some((_, v)) = take(keys, app, &["port"]) {
        match env_value(&v) {
            Ok(value) => merge(&mut env, vec![("PORT".into(), value)]),
            Err(why) => app.unmapped("port", why),
        }
    }
    let port_value = env.iter().find(|(n, _)| n == "PORT").map(|(_, v)| v.clone());
    let port = port_value.as_ref().and_then(port_of);
    if let (Some(value), None) = (&port_value, port) {
        app.unmapped(
            format!("env.PORT = {}", super::write::value(value)),
            "not a port number (1-65535), so the app is imported without listen",
        );
    }
    let increment = take(keys, app, &["increment_var"]).map(|(_, v)| v);
    let increments_port = port.is_some() && increment.as_ref().and_then(Json::as_str) == Some("PORT");
    match port {
        Some(port) => {
            env.retain(|(n, _)| n != "PORT");
            let mut comments = vec![format!(
                "PORT {port} in PM2's env. corral listens on it and gives each worker a"
            )];
            comments.push("loopback port of its own in PORT (and HOST=127.0.0.1): the app must listen on".into());
            comments.push("process.env.PORT, as PM2 apps do.".into());
            match mode {
                _ if increments_port => {
                    comments.push(format!(
                        "PM2 increment_var PORT: instance i had port {port}+i; corral serves them all"
                    ));
                    comments.push(format!("on {port}."));
                }
                Mode::Cluster => comments.push(format!(
                    "PM2 cluster mode: the workers shared port {port} on every interface (Node's default)."
                )),
                Mode::Fork if many => comments.push(format!(
                    "PM2 fork mode: each instance bound {port} itself; behind corral they need not."
                )),
                Mode::Fork => {
                    comments.push("PM2 fork mode, one process: it bound every interface (Node's default).".into())
                }
            }
            comments.push("Put \"127.0.0.1:PORT\" here to serve this machine only.".into());
            app.set("listen", Value::Str(format!("0.0.0.0:{port}")), comments);
        }
        None => {
            let mut why = "no PORT in env: a plain supervised process (no listen, no proxy, no PORT given).".to_owned();
            if mode == Mode::Cluster {
                why.push_str(" PM2 cluster mode shared the port the app");
                app.notes.push(why);
                app.notes.push(
                    "binds; corral cannot tell it: add listen and have the app listen on process.env.PORT.".into(),
                );
            } else {
                app.notes.push(why);
            }
        }
    }
    match increment {
        Some(_) if increments_port => {}
        Some(v) => app.unmapped(
            format!("increment_var = {}", summary(&v)),
            "corral has no per-worker counter but NODE_APP_INSTANCE (the slot, 0..N-1); derive the value from it",
        ),
        None => {}
    }
    match take(keys, app, &["instance_var"]) {
        Some((_, Json::String(var))) if var == "NODE_APP_INSTANCE" => app
            .notes
            .push("instance_var NODE_APP_INSTANCE: corral sets it to each worker's slot (0, 1, ...).".into()),
        Some((_, v)) => app.unmapped(
            format!("instance_var = {}", summary(&v)),
            "corral always names the slot NODE_APP_INSTANCE and has no key to rename it: read that in the app",
        ),
        None => {}
    }

    if !env.is_empty() {
        let comments = match cx.env {
            Some(name) => vec![format!("PM2 env, with env_{name} merged over it (--env {name})")],
            None => vec!["PM2 env".into()],
        };
        app.tables.push(EnvTable {
            name: "env".into(),
            comments,
            vars: env,
        });
    }
    for (key, mut vars) in tables {
        let mut comments = vec![format!(
            "PM2 {key}: merged over [app.env] by `corral run --env {}` (also start, reload)",
            &key["env_".len()..]
        )];
        if port.is_some() {
            if let Some((_, v)) = vars.iter().find(|(n, _)| n == "PORT") {
                comments.push(format!(
                    "PORT = {} left out: listen is one address for every environment",
                    super::write::value(v)
                ));
                comments.push(format!(
                    "(`corral import --env {}` makes it the listen port)",
                    &key["env_".len()..]
                ));
                vars.retain(|(n, _)| n != "PORT");
            }
        }
        app.tables.push(EnvTable {
            name: key,
            comments,
            vars,
        });
    }
}
