//! The top-level tables beside `[[app]]`: `[admin]` and `[corral]`.

use std::ops::Range;
use std::path::Path;

use toml::de::DeValue;
use toml::Spanned;

use super::table::{Report, Table};
use super::values::{read_listen, read_string};
use super::{AdminConfig, AppConfig, CorralConfig};

/// The `[corral]` table: settings of corral itself.
pub(super) fn read_corral(value: Spanned<DeValue<'_>>, base: &Path, r: &mut Report<'_>) -> CorralConfig {
    let span = value.span();
    let DeValue::Table(table) = value.into_inner() else {
        r.at(span, "`corral` must be a table: write [corral]");
        return CorralConfig::default();
    };
    let mut t = Table::new(table, span, "corral: ".into());
    t.known = &["log_file"];
    let log_file = t.optional("log_file", r, read_string).map(|p| base.join(p));
    t.finish(r, &[]);
    CorralConfig { log_file }
}

/// `[admin]`: `listen` (required) and `token_file`. Without a token (no file and no
/// `CORRAL_ADMIN_TOKEN` now) the address must be loopback; it must never be an app's.
pub(super) fn read_admin(
    value: toml::Spanned<DeValue<'_>>,
    base: &Path,
    apps: &[(AppConfig, Range<usize>)],
    r: &mut Report<'_>,
) -> Option<AdminConfig> {
    let span = value.span();
    let DeValue::Table(table) = value.into_inner() else {
        r.at(span, "admin: expected a table ([admin] with listen)");
        return None;
    };
    let mut t = Table::new(table, span.clone(), "admin.".to_owned());
    t.known = &["listen", "token_file"];
    let listen = t.required("listen", r, read_listen);
    let token_file = t.optional("token_file", r, read_string).map(|p| base.join(p));
    t.finish(r, &[]);
    let listen = listen?;
    let env_token = std::env::var(crate::config::ADMIN_TOKEN_ENV).is_ok_and(|t| !t.trim().is_empty());
    if token_file.is_none() && !env_token && !listen.ip().is_loopback() {
        r.at(
            span.clone(),
            format!("admin.listen: {listen} is not a loopback address: off loopback the admin API needs a token (token_file or {})", crate::config::ADMIN_TOKEN_ENV),
        );
    }
    if let Some(file) = &token_file {
        match std::fs::read_to_string(file) {
            Ok(token) if token.trim().len() < 16 => r.at(
                span.clone(),
                format!(
                    "admin.token_file: {}: the token must be at least 16 characters",
                    file.display()
                ),
            ),
            Ok(_) => {}
            Err(e) => r.at(
                span.clone(),
                format!("admin.token_file: {}: cannot read: {e}", file.display()),
            ),
        }
    }
    let taken = apps.iter().find(|(a, _)| {
        [a.listen, a.http_redirect]
            .into_iter()
            .flatten()
            .any(|b| super::parse::overlaps(listen, b))
    });
    if let Some((app, _)) = taken {
        r.at(
            span,
            format!("admin.listen: {listen} overlaps the address of app \"{}\"", app.name),
        );
    }
    Some(AdminConfig { listen, token_file })
}
