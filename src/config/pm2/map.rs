//! One PM2 app object to one `[[app]]`: which PM2 key becomes which corral key, and why the
//! others do not. Keys are taken out of a copy of the object as they are mapped (with PM2's
//! aliases: `exec` for `script`, `out`/`output`/`out_log` for `out_file`, ...), so whatever is
//! left at the end is exactly what was not imported, and each gets its reason.
//!
//! A value of the wrong type or out of range is never an error of the import: it is listed as
//! not imported, saying what was wrong, so the TOML still passes `corral check`. Only an app
//! that is not an object or has no `script` stops the import.

use serde_json::{Map, Value as Json};
use std::path::Path;

use super::env::env_and_listen;
use super::kind;
use super::policy::{logs, reason, restart_policy, user, watch};
use super::write::{App, Value};

/// What every app's mapping needs to know.
pub(super) struct Context<'a> {
    /// `--env NAME`.
    pub(super) env: Option<&'a str>,
    /// The ecosystem file's folder, when the TOML goes elsewhere (relative paths are then made
    /// absolute against it).
    pub(super) base: Option<&'a Path>,
    /// `$HOME`, for PM2's `~/` paths.
    pub(super) home: Option<String>,
    /// The ecosystem file's folder (absolute), for looking at the script.
    pub(super) dir: &'a Path,
}

/// A mapped app and its name.
pub(super) struct Mapped {
    pub(super) name: String,
    pub(super) app: App,
}

impl Mapped {
    /// Gives the app another name (the first entry is always `name`).
    pub(super) fn rename(&mut self, name: &str, why: &str) {
        if let Some(entry) = self.app.entries.iter_mut().find(|e| e.key == "name") {
            entry.comments.push(format!("renamed from {:?}: {why}", self.name));
            entry.value = Value::Str(name.to_owned());
        }
        self.name = name.to_owned();
    }
}

/// PM2's default interpreters by script extension (PM2's `interpreter.json`); `None`: run the
/// script itself.
fn interpreter_for(script: &str) -> Option<&'static str> {
    let ext = Path::new(script).extension()?.to_str()?;
    Some(match ext {
        "js" | "cjs" | "mjs" => "node",
        "sh" => "bash",
        "py" => "python3",
        "rb" => "ruby",
        "php" => "php",
        "pl" => "perl",
        "coffee" => "coffee",
        "ls" => "lsc",
        "ts" | "tsx" => "bun",
        _ => return None,
    })
}

pub(super) fn map_app(index: usize, raw: &Json, cx: &Context<'_>) -> Result<Mapped, String> {
    let Some(object) = raw.as_object() else {
        return Err(format!("app #{} is {}, not an object", index + 1, kind(raw)));
    };
    let mut keys = object.clone();
    let mut app = App::default();
    let label = match object.get("name").and_then(Json::as_str) {
        Some(name) => format!("app #{} ({name:?})", index + 1),
        None => format!("app #{}", index + 1),
    };
    let script = match take(&mut keys, &mut app, &["script", "exec"]) {
        Some((_, Json::String(s))) if !s.trim().is_empty() => s,
        Some((key, other)) => return Err(format!("{label}: {key} must be a string, found {}", kind(&other))),
        None => return Err(format!("{label}: no `script` (PM2 needs it too)")),
    };

    // name
    let stem = Path::new(&script)
        .file_stem()
        .map_or_else(|| "app".to_owned(), |s| s.to_string_lossy().into_owned());
    let (pm2_name, from) = match take(&mut keys, &mut app, &["name"]) {
        Some((_, Json::String(s))) => (s, "name"),
        Some((_, other)) => {
            app.unmapped(
                "name",
                format!("{} is not a name; the script's name is used", kind(&other)),
            );
            (stem, "the script's file name (PM2's default)")
        }
        None => (stem, "the script's file name (PM2's default)"),
    };
    let name = clean_name(&pm2_name);
    let mut comments: Vec<String> = (from != "name").then(|| format!("from {from}")).into_iter().collect();
    if name != pm2_name {
        comments.push(format!(
            "PM2 name {pm2_name:?}: corral names are 1-64 letters, digits, '-', '_', '.'"
        ));
    }
    app.set("name", Value::Str(name.clone()), comments);

    let cwd = cwd(&mut keys, &mut app, cx);
    let dir = cx.dir.join(cwd.as_deref().unwrap_or("."));
    command(&mut keys, &mut app, &script, &dir);
    if let Some(dir) = &cwd {
        app.set(
            "cwd",
            Value::Str(dir.clone()),
            vec!["PM2 cwd (or the ecosystem file's folder), relative to this file".into()],
        );
    }
    let instances = instances(&mut keys, &mut app);
    env_and_listen(&mut keys, &mut app, cx, instances);
    restart_policy(&mut keys, &mut app);
    logs(&mut keys, &mut app, cx, cwd.as_deref());
    watch(&mut keys, &mut app);
    user(&mut keys, &mut app);

    for (key, value) in keys {
        let reason = reason(&key);
        app.unmapped(format!("{key} = {}", summary(&value)), reason);
    }
    Ok(Mapped { name, app })
}

/// Removes every spelling in `names` and returns the first one set. Other spellings set too
/// are listed as not imported.
pub(super) fn take(keys: &mut Map<String, Json>, app: &mut App, names: &[&str]) -> Option<(String, Json)> {
    let mut found: Option<(String, Json)> = None;
    for name in names {
        if let Some(value) = keys.remove(*name) {
            match &found {
                None => found = Some(((*name).to_owned(), value)),
                Some((first, _)) => app.unmapped(
                    format!("{name} = {}", summary(&value)),
                    format!("another spelling of {first}, which is set too and wins"),
                ),
            }
        }
    }
    found
}

/// A short JSON rendering of a value, for comments.
pub(super) fn summary(v: &Json) -> String {
    let text = serde_json::to_string(v).unwrap_or_default();
    if text.chars().count() > 60 {
        let short: String = text.chars().take(57).collect();
        format!("{short}...")
    } else {
        text
    }
}

fn clean_name(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if cleaned.is_empty() {
        "app".to_owned()
    } else {
        cleaned
    }
}

fn expand_home(path: &str, cx: &Context<'_>) -> String {
    match (path.strip_prefix('~'), &cx.home) {
        (Some(rest), Some(home)) if rest.is_empty() || rest.starts_with('/') => format!("{home}{rest}"),
        _ => path.to_owned(),
    }
}

/// The corral `cwd` (relative to the TOML's folder), or none when that is the same folder.
fn cwd(keys: &mut Map<String, Json>, app: &mut App, cx: &Context<'_>) -> Option<String> {
    let pm2 = match take(keys, app, &["cwd"]) {
        Some((_, Json::String(s))) => Some(expand_home(&s, cx)),
        Some((_, other)) => {
            app.unmapped("cwd", format!("expected a string, found {}", kind(&other)));
            None
        }
        None => None,
    };
    let pm2 = pm2.map(|p| p.strip_prefix("./").map(str::to_owned).unwrap_or(p));
    match (pm2, cx.base) {
        (Some(dir), _) if dir.starts_with('/') => Some(dir),
        (Some(dir), None) if dir.is_empty() || dir == "." => None,
        (Some(dir), None) => Some(dir),
        (Some(dir), Some(base)) => Some(base.join(dir).to_string_lossy().into_owned()),
        (None, Some(base)) => Some(base.to_string_lossy().into_owned()),
        (None, None) => None,
    }
}

/// A path PM2 resolved against the app's cwd, as corral (relative to the TOML's folder) needs it.
pub(super) fn under_cwd(path: &str, cwd: Option<&str>, cx: &Context<'_>) -> String {
    let path = expand_home(path, cx);
    match cwd {
        Some(dir) if !path.starts_with('/') => Path::new(dir).join(path).to_string_lossy().into_owned(),
        _ => path,
    }
}

pub(super) fn string_list(v: &Json) -> Option<Vec<String>> {
    match v {
        Json::String(s) => Some(split_args(s)),
        Json::Array(items) => items
            .iter()
            .map(|i| match i {
                Json::String(s) => Some(s.clone()),
                Json::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

/// Splits an argument string the way a shell would for plain words and quotes (PM2 takes
/// `args: "--port 3000"` as two arguments).
fn split_args(text: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') => current.extend(chars.next()),
            (Some(_), c) => current.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, '\\') => {
                current.extend(chars.next());
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    args.push(std::mem::take(&mut current));
                    in_word = false;
                }
            }
            (None, c) => {
                current.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        args.push(current);
    }
    args
}

/// True when the file starts with bytes a text file does not have (PM2 runs such a script
/// itself, with interpreter "none").
fn is_binary(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 512];
    let Ok(mut file) = std::fs::File::open(path) else {
        return false;
    };
    let n = file.read(&mut head).unwrap_or(0);
    head[..n].contains(&0)
}

/// `script` + `args` + `interpreter` + `node_args` → `command`.
fn command(keys: &mut Map<String, Json>, app: &mut App, script: &str, dir: &Path) {
    let args = match take(keys, app, &["args"]) {
        Some((_, v)) => match string_list(&v) {
            Some(list) => list,
            None => {
                app.unmapped(
                    "args",
                    format!("expected a string or a list of strings, found {}", kind(&v)),
                );
                Vec::new()
            }
        },
        None => Vec::new(),
    };
    let interpreter = match take(keys, app, &["interpreter", "exec_interpreter"]) {
        Some((_, Json::String(s))) if !s.is_empty() => Some(s),
        Some((key, v)) => {
            app.unmapped(key, format!("expected a program name, found {}", kind(&v)));
            None
        }
        None => None,
    };
    let node_args = match take(keys, app, &["node_args", "interpreter_args", "interpreterArgs"]) {
        Some((key, v)) => match string_list(&v) {
            Some(list) => list,
            None => {
                app.unmapped(
                    key,
                    format!("expected a string or a list of strings, found {}", kind(&v)),
                );
                Vec::new()
            }
        },
        None => Vec::new(),
    };
    let script_path = dir.join(script);
    let mut comments = Vec::new();
    let program = match interpreter.as_deref() {
        Some("none") => {
            comments.push("PM2 interpreter \"none\": the script is the program".to_owned());
            None
        }
        Some(name) => {
            let (program, version) = name.split_once('@').unwrap_or((name, ""));
            comments.push(format!("PM2 interpreter {name:?}"));
            if !version.is_empty() {
                comments.push(format!(
                    "PM2 picked Node {version} through nvm; corral runs {program:?} from PATH"
                ));
            }
            Some(program.to_owned())
        }
        None if script.contains(char::is_whitespace) && !script_path.exists() => {
            comments.push("PM2 runs a script with spaces through bash -c, and so does this command".to_owned());
            let mut argv = vec![
                Value::Str("bash".into()),
                Value::Str("-c".into()),
                Value::Str(script.to_owned()),
            ];
            argv.extend(args.into_iter().map(Value::Str));
            app.set("command", Value::List(argv), comments);
            return;
        }
        None => match interpreter_for(script) {
            Some(program) => {
                comments.push(format!("no PM2 interpreter: {program}, PM2's default for this script"));
                Some(program.to_owned())
            }
            None if is_binary(&script_path) => {
                comments.push("no PM2 interpreter: the script is a binary, run as it is (PM2's \"none\")".to_owned());
                None
            }
            None => {
                comments.push("no PM2 interpreter: node, PM2's default for a script that is not a binary".to_owned());
                Some("node".to_owned())
            }
        },
    };
    let mut argv = Vec::new();
    match program {
        Some(program) => {
            argv.push(program);
            if !node_args.is_empty() {
                comments.push("node_args / interpreter_args go before the script".to_owned());
            }
            argv.extend(node_args);
        }
        None if !node_args.is_empty() => {
            app.unmapped("node_args", "interpreter \"none\" has no interpreter to give them to");
        }
        None => {}
    }
    argv.push(script.to_owned());
    if !args.is_empty() {
        comments.push("then the script's args".to_owned());
    }
    argv.extend(args);
    app.set(
        "command",
        Value::List(argv.into_iter().map(Value::Str).collect()),
        comments,
    );
}

/// How PM2 ran the workers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Mode {
    /// PM2's cluster module: the instances shared one port.
    Cluster,
    /// Separate processes.
    Fork,
}

/// `instances` and `exec_mode`; returns the mode and whether more than one worker may run.
fn instances(keys: &mut Map<String, Json>, app: &mut App) -> (Mode, bool) {
    let mode = match take(keys, app, &["exec_mode"]) {
        Some((_, Json::String(s))) if s.starts_with("cluster") => Some(Mode::Cluster),
        Some((_, Json::String(s))) if s.starts_with("fork") => Some(Mode::Fork),
        Some((_, v)) => {
            app.unmapped(
                "exec_mode",
                format!("{} is neither \"fork\" nor \"cluster\"", summary(&v)),
            );
            None
        }
        None => None,
    };
    let value = take(keys, app, &["instances"]).map(|(_, v)| v);
    let number = match &value {
        Some(Json::String(s)) if s == "max" => Some(0),
        Some(Json::String(s)) => s.trim().parse::<i64>().ok(),
        Some(Json::Number(n)) => n.as_i64(),
        _ => None,
    };
    let many = match (number, &value) {
        (Some(n @ 1..=1024), _) => {
            app.set("instances", Value::Int(n), vec![format!("PM2 instances: {n}")]);
            n > 1
        }
        (Some(0), _) => {
            app.set(
                "instances",
                Value::Str("max".into()),
                vec!["PM2 instances: 0 / \"max\", one per CPU (corral counts the CPUs it may use)".into()],
            );
            true
        }
        (Some(n @ -1024..=-1), _) => {
            app.set(
                "instances",
                Value::Int(n),
                vec![format!("PM2 instances: {n}, the CPUs less {} (at least 1)", -n)],
            );
            true
        }
        (_, Some(v)) => {
            app.unmapped(
                format!("instances = {}", summary(v)),
                "not a count, \"max\" or a negative number from -1 to -1024; corral's default is 1",
            );
            false
        }
        (_, None) => false,
    };
    // PM2 without exec_mode: cluster when instances is set (node and bun apps), else fork.
    let mode = mode.unwrap_or(if value.is_some() { Mode::Cluster } else { Mode::Fork });
    (mode, many)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_split_like_a_shell_for_words_and_quotes() {
        assert_eq!(split_args("--port 3000  -v"), ["--port", "3000", "-v"]);
        assert_eq!(
            split_args(r#"--name "a b" 'c d' e\ f"#),
            ["--name", "a b", "c d", "e f"]
        );
        assert_eq!(split_args(r#""" x"#), ["", "x"]);
        assert!(split_args("   ").is_empty());
    }

    #[test]
    fn names_are_made_valid() {
        assert_eq!(clean_name("my api (v2)"), "my-api--v2-");
        assert_eq!(clean_name(""), "app");
        assert_eq!(clean_name(&"x".repeat(100)).len(), 64);
    }
}
