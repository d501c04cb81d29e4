//! The spanned walk's tools: positions ([`Lines`]), the problem list ([`Report`]), and one
//! TOML table read key by key ([`Table`]), with "did you mean" hints for unknown keys.

use std::ops::Range;

use toml::de::{DeString, DeTable, DeValue};
use toml::Spanned;

use super::parse::APP_KEYS;
use super::Problem;

/// Maps byte offsets to 1-based line and column.
pub(super) struct Lines {
    starts: Vec<usize>,
}

impl Lines {
    pub(super) fn new(text: &str) -> Lines {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Lines { starts }
    }

    pub(super) fn position(&self, offset: usize) -> (usize, usize) {
        let line = self.starts.partition_point(|&s| s <= offset).max(1);
        (line, offset - self.starts[line - 1] + 1)
    }
}

pub(super) struct Report<'a> {
    pub(super) lines: &'a Lines,
    pub(super) problems: &'a mut Vec<Problem>,
    /// Things that work but are probably not what was meant (`check` shows them).
    pub(super) warnings: &'a mut Vec<Problem>,
}

impl Report<'_> {
    pub(super) fn at(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, column) = self.lines.position(span.start);
        self.problems.push(Problem {
            line,
            column,
            message: message.into(),
        });
    }

    pub(super) fn warn_at(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, column) = self.lines.position(span.start);
        self.warnings.push(Problem {
            line,
            column,
            message: message.into(),
        });
    }
}

pub(super) type Entry<'i> = (Spanned<DeString<'i>>, Spanned<DeValue<'i>>);

/// A table being read: keys are taken one by one; leftovers are unknown keys.
pub(super) struct Table<'i> {
    entries: Vec<Entry<'i>>,
    pub(super) span: Range<usize>,
    /// Prefix for messages, e.g. `app "web": `.
    pub(super) context: String,
    /// The keys this table may have, for "did you mean" hints.
    pub(super) known: &'static [&'static str],
}

impl<'i> Table<'i> {
    pub(super) fn new(table: DeTable<'i>, span: Range<usize>, context: String) -> Table<'i> {
        Table {
            entries: table.into_iter().collect(),
            span,
            context,
            known: APP_KEYS,
        }
    }

    pub(super) fn take(&mut self, key: &str) -> Option<(Range<usize>, Spanned<DeValue<'i>>)> {
        let index = self.entries.iter().position(|(k, _)| k.get_ref().as_ref() == key)?;
        let (k, v) = self.entries.swap_remove(index);
        Some((k.span(), v))
    }

    /// Takes every key that starts with `prefix`, in file order: (key, its span, value).
    pub(super) fn take_prefixed(&mut self, prefix: &str) -> Vec<(String, Range<usize>, Spanned<DeValue<'i>>)> {
        let mut taken = Vec::new();
        let mut kept = Vec::new();
        for (k, v) in std::mem::take(&mut self.entries) {
            if k.get_ref().as_ref().starts_with(prefix) {
                taken.push((k.get_ref().as_ref().to_owned(), k.span(), v));
            } else {
                kept.push((k, v));
            }
        }
        self.entries = kept;
        taken.sort_by_key(|(_, span, _)| span.start);
        taken
    }

    pub(super) fn optional<T>(
        &mut self,
        key: &str,
        r: &mut Report<'_>,
        read: impl FnOnce(&DeValue<'_>) -> Result<T, String>,
    ) -> Option<T> {
        let (_, value) = self.take(key)?;
        match read(value.get_ref()) {
            Ok(v) => Some(v),
            Err(message) => {
                r.at(value.span(), format!("{}{key}: {message}", self.context));
                None
            }
        }
    }

    pub(super) fn required<T>(
        &mut self,
        key: &str,
        r: &mut Report<'_>,
        read: impl FnOnce(&DeValue<'_>) -> Result<T, String>,
    ) -> Option<T> {
        if !self.entries.iter().any(|(k, _)| k.get_ref().as_ref() == key) {
            r.at(
                self.span.clone(),
                format!("{}{key}: missing (it is required)", self.context),
            );
            return None;
        }
        self.optional(key, r, read)
    }

    /// Reports every key nobody took.
    pub(super) fn finish(self, r: &mut Report<'_>, not_yet: &[&str]) {
        for (key, _) in self.entries {
            let name = key.get_ref().as_ref();
            let message = if not_yet.contains(&name) {
                format!("{}{name}: not supported by this version of corral yet", self.context)
            } else {
                let hint = closest(name, self.known)
                    .map(|k| format!(" (did you mean `{k}`?)"))
                    .unwrap_or_default();
                format!("{}{name}: unknown key{hint}", self.context)
            };
            r.at(key.span(), message);
        }
    }
}

/// A known key within two edits of a misspelt one.
pub(super) fn closest(key: &str, known: &'static [&'static str]) -> Option<&'static str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, k)| k)
}

pub(super) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(previous + 1);
        }
    }
    row[b.len()]
}

pub(super) fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a datetime",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}
