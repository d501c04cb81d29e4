//! The commented `proxy.toml` text: written by hand, so each key can carry the comment that says
//! where it came from, in a fixed order (golden files compare it byte for byte). Every string
//! from the PM2 file goes through [`string`] (a TOML basic string) or [`comment`] (control
//! characters shown escaped: TOML comments cannot hold them, and a newline would end the comment).

use std::fmt::Write as _;

/// A TOML value the import writes.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
    List(Vec<Value>),
}

/// `key = value`, with comment lines above it.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) comments: Vec<String>,
    pub(super) key: String,
    pub(super) value: Value,
}

/// `[app.NAME]` (`env`, `env_production`, ...): comment lines, then its variables.
#[derive(Debug)]
pub(super) struct EnvTable {
    pub(super) name: String,
    pub(super) comments: Vec<String>,
    pub(super) vars: Vec<(String, Value)>,
}

/// One `[[app]]`.
#[derive(Debug, Default)]
pub(super) struct App {
    /// Comment lines right under `[[app]]`.
    pub(super) notes: Vec<String>,
    pub(super) entries: Vec<Entry>,
    /// PM2 keys left out, with why: listed in a comment after the keys.
    pub(super) unmapped: Vec<(String, String)>,
    pub(super) tables: Vec<EnvTable>,
}

impl App {
    pub(super) fn set(&mut self, key: &str, value: Value, comments: Vec<String>) {
        self.entries.push(Entry {
            comments,
            key: key.to_owned(),
            value,
        });
    }

    pub(super) fn unmapped(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        self.unmapped.push((key.into(), reason.into()));
    }
}

/// The whole file: header comment lines, then the apps.
pub(super) fn render(header: &[String], apps: &[App]) -> String {
    let mut out = String::new();
    for line in header {
        push_comment(&mut out, "", line);
    }
    for app in apps {
        out.push_str("\n[[app]]\n");
        for line in &app.notes {
            push_comment(&mut out, "", line);
        }
        for entry in &app.entries {
            for line in &entry.comments {
                push_comment(&mut out, "", line);
            }
            writeln!(out, "{} = {}", key(&entry.key), value(&entry.value)).expect("UNWRAP: writing to a String");
        }
        if !app.unmapped.is_empty() {
            push_comment(
                &mut out,
                "",
                "Not imported (no corral meaning, or nothing to do in corral):",
            );
            for (key, reason) in &app.unmapped {
                push_comment(&mut out, "  ", &format!("{key}: {reason}"));
            }
        }
        for table in &app.tables {
            out.push('\n');
            for line in &table.comments {
                push_comment(&mut out, "", line);
            }
            writeln!(out, "[app.{}]", key(&table.name)).expect("UNWRAP: writing to a String");
            for (name, v) in &table.vars {
                writeln!(out, "{} = {}", key(name), value(v)).expect("UNWRAP: writing to a String");
            }
        }
    }
    out
}

fn push_comment(out: &mut String, indent: &str, text: &str) {
    if text.is_empty() {
        out.push_str("#\n");
    } else {
        writeln!(out, "# {indent}{}", comment(text)).expect("UNWRAP: writing to a String");
    }
}

/// A key: bare when TOML allows it, else a quoted string.
pub(super) fn key(name: &str) -> String {
    let bare = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        name.to_owned()
    } else {
        string(name)
    }
}

pub(super) fn value(v: &Value) -> String {
    match v {
        Value::Str(s) => string(s),
        Value::Int(i) => i.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::List(items) => {
            let items: Vec<String> = items.iter().map(value).collect();
            format!("[{}]", items.join(", "))
        }
    }
}

/// A TOML basic string: `"` and `\` escaped, control characters as escapes.
pub(super) fn string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => write!(out, "\\u{:04X}", c as u32).expect("UNWRAP: writing to a String"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Comment text: control characters (newlines included) shown as `\u{..}`.
pub(super) fn comment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() && c != '\t' {
            write!(out, "\\u{{{:x}}}", c as u32).expect("UNWRAP: writing to a String");
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_and_keys_survive_a_toml_parser() {
        let nasty = "a\"b\\c\nd\te\r\u{0}\u{7f}\u{1b}[31m é ✓";
        let mut app = App::default();
        app.set("name", Value::Str(nasty.into()), vec![format!("from {nasty}")]);
        app.unmapped("we\nird", nasty);
        app.tables.push(EnvTable {
            name: "env".into(),
            comments: vec![],
            vars: vec![
                (nasty.into(), Value::Str(nasty.into())),
                ("PLAIN_1".into(), Value::Int(-3)),
            ],
        });
        let text = render(&[nasty.to_owned()], &[app]);
        let parsed: toml::Table = toml::from_str(&text).expect("valid TOML");
        let app = &parsed["app"][0];
        assert_eq!(app["name"].as_str(), Some(nasty));
        assert_eq!(app["env"][nasty].as_str(), Some(nasty));
        assert_eq!(app["env"]["PLAIN_1"].as_integer(), Some(-3));
        assert!(text.contains("\nPLAIN_1 = -3\n"), "{text}");
    }

    #[test]
    fn lists_are_inline_arrays() {
        let v = Value::List(vec![Value::Str("a".into()), Value::Int(2), Value::Bool(true)]);
        assert_eq!(value(&v), r#"["a", 2, true]"#);
    }
}
