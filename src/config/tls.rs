//! The edge keys of an app: `[app.tls]` (files or `[app.tls.acme]`), `hosts`, `default`,
//! `http_redirect`, `hsts`.
//!
//! Certificate files are read and checked here, when the config is read, so `corral check`
//! and a refused `corral reload` name the key and the file: a missing or unreadable file, a
//! chain or key that does not parse, a key that is not the certificate's. What works but is
//! probably a mistake is a warning: an expired certificate (with its date), an `extra` whose
//! names `cert` already covers (it would never be picked), a `hosts` name no certificate of
//! the app covers.

use std::ops::Range;
use std::path::Path;
use std::time::{Duration, SystemTime};

use toml::de::DeValue;
use toml::Spanned;

use super::table::{type_name, Report, Table};
use super::values::read_string;
use super::{AcmeConfig, CertFiles, Tls};
use crate::tls::certs;

const TLS_KEYS: &[&str] = &["cert", "key", "extra", "acme"];
const ACME_KEYS: &[&str] = &["domains", "email", "directory", "cache_dir", "ca_root"];

/// Let's Encrypt's production directory, the default of `directory`.
pub(super) const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// Reads `[app.tls]`; `context` is the app's message prefix.
pub(super) fn read_tls(value: Spanned<DeValue<'_>>, base: &Path, context: &str, r: &mut Report<'_>) -> Option<Tls> {
    let span = value.span();
    let DeValue::Table(table) = value.into_inner() else {
        r.at(
            span,
            format!("{context}tls: expected a table ([app.tls] with cert and key)"),
        );
        return None;
    };
    let mut t = Table::new(table, span.clone(), format!("{context}tls."));
    t.known = TLS_KEYS;
    let acme = t.take("acme");
    let cert = t.optional("cert", r, read_string);
    let key = t.optional("key", r, read_string);
    let extra = t.take("extra").and_then(|(_, v)| read_extra(v, base, context, r));
    t.finish(r, &[]);
    match (acme, cert, key) {
        (Some((_, acme)), None, None) => {
            if extra.is_some() {
                r.at(
                    span,
                    format!(
                        "{context}tls.extra: not with [app.tls.acme] (ACME issues one certificate for every domain)"
                    ),
                );
            }
            read_acme(acme, base, context, r).map(Tls::Acme)
        }
        (Some(_), _, _) => {
            r.at(
                span,
                format!("{context}tls: either cert and key, or [app.tls.acme], not both"),
            );
            None
        }
        (None, Some(cert), Some(key)) => Some(Tls::Files {
            main: CertFiles {
                cert: base.join(cert),
                key: base.join(key),
            },
            extra: extra.unwrap_or_default(),
        }),
        (None, None, None) => {
            r.at(
                span,
                format!("{context}tls: needs cert and key, or an [app.tls.acme] table"),
            );
            None
        }
        (None, cert, _) => {
            let missing = if cert.is_none() { "cert" } else { "key" };
            r.at(
                span,
                format!("{context}tls.{missing}: missing (cert and key go together)"),
            );
            None
        }
    }
}

fn read_extra(value: Spanned<DeValue<'_>>, base: &Path, context: &str, r: &mut Report<'_>) -> Option<Vec<CertFiles>> {
    const HINT: &str = r#"expected an array such as [{ cert = "other.pem", key = "other.key" }]"#;
    let span = value.span();
    let DeValue::Array(items) = value.into_inner() else {
        r.at(span, format!("{context}tls.extra: {HINT}"));
        return None;
    };
    let mut out = Vec::new();
    for item in items {
        let span = item.span();
        let DeValue::Table(table) = item.into_inner() else {
            r.at(span, format!("{context}tls.extra: {HINT}"));
            continue;
        };
        let mut t = Table::new(table, span, format!("{context}tls.extra: "));
        t.known = &["cert", "key"];
        let cert = t.required("cert", r, read_string);
        let key = t.required("key", r, read_string);
        t.finish(r, &[]);
        if let (Some(cert), Some(key)) = (cert, key) {
            out.push(CertFiles {
                cert: base.join(cert),
                key: base.join(key),
            });
        }
    }
    Some(out)
}

fn read_acme(value: Spanned<DeValue<'_>>, base: &Path, context: &str, r: &mut Report<'_>) -> Option<AcmeConfig> {
    let span = value.span();
    let DeValue::Table(table) = value.into_inner() else {
        r.at(
            span,
            format!("{context}tls.acme: expected a table ([app.tls.acme] with domains)"),
        );
        return None;
    };
    let mut t = Table::new(table, span, format!("{context}tls.acme."));
    t.known = ACME_KEYS;
    let domains = t.required("domains", r, |v| {
        let names = read_hosts(v)?;
        if names.is_empty() {
            return Err("needs at least one domain".into());
        }
        if names.iter().any(|n| n.starts_with("*.")) {
            return Err("wildcards need the DNS-01 challenge, which corral does not do; list each name".into());
        }
        Ok(names)
    });
    let email = t.optional("email", r, |v| {
        let email = read_string(v)?;
        let valid = email
            .split_once('@')
            .is_some_and(|(user, host)| !user.is_empty() && host.contains('.'))
            && email.bytes().all(|b| b.is_ascii_graphic());
        if valid {
            Ok(email)
        } else {
            Err(format!("{email:?} is not an email address"))
        }
    });
    let directory = t
        .optional("directory", r, |v| {
            let url = read_string(v)?;
            if url.starts_with("https://") {
                Ok(url)
            } else {
                Err("must be an https:// URL (RFC 8555 requires HTTPS)".into())
            }
        })
        .unwrap_or_else(|| LETS_ENCRYPT.into());
    let cache_dir = t
        .optional("cache_dir", r, read_string)
        .map_or_else(|| base.join("acme"), |d| base.join(d));
    let ca_root = t.optional("ca_root", r, read_string).map(|p| base.join(p));
    t.finish(r, &[]);
    Some(AcmeConfig {
        domains: domains?,
        email,
        directory,
        cache_dir,
        ca_root,
    })
}

/// `hosts = ["example.com", "*.example.com"]`: DNS names, lower-cased, a leading `*.` allowed.
pub(super) fn read_hosts(v: &DeValue<'_>) -> Result<Vec<String>, String> {
    let DeValue::Array(items) = v else {
        return Err(format!(
            "expected an array of names such as [\"example.com\", \"*.example.com\"], found {}",
            type_name(v)
        ));
    };
    let mut names: Vec<String> = Vec::new();
    for item in items {
        let name = read_string(item.get_ref())?.to_ascii_lowercase();
        if !valid_name(&name) {
            return Err(format!(
                "{name:?} is not a host name (letters, digits and '-' in dot-separated labels, optionally starting with \"*.\"; no port)"
            ));
        }
        if names.contains(&name) {
            return Err(format!("{name:?} is listed twice"));
        }
        names.push(name);
    }
    Ok(names)
}

fn valid_name(name: &str) -> bool {
    let bare = name.strip_prefix("*.").unwrap_or(name);
    !bare.is_empty()
        && name.len() <= 253
        && bare.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// `hsts = "1y"`: the `max-age` of Strict-Transport-Security (`s`, `m`, `h`, `d`, `w`, `y`).
pub(super) fn read_hsts(v: &DeValue<'_>) -> Result<Duration, String> {
    const HINT: &str = r#"expected a max-age such as "1y", "180d" or "1h""#;
    let text = read_string(v).map_err(|_| HINT.to_owned())?;
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| HINT.to_owned())?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        "y" => 365 * 86_400,
        _ => return Err(HINT.into()),
    };
    match number.checked_mul(unit) {
        Some(secs) if secs <= 2 * 365 * 86_400 => Ok(Duration::from_secs(secs)),
        _ => Err("at most 2 years (browsers cap it there)".into()),
    }
}

/// Loads an app's certificate files to check them: errors name the key and the file; the
/// warnings are described in the module doc.
pub(super) fn check_files(tls: &Tls, hosts: &[String], span: Range<usize>, context: &str, r: &mut Report<'_>) {
    let Tls::Files { main, extra } = tls else { return };
    let mut loaded = Vec::new();
    for (i, files) in std::iter::once(main).chain(extra).enumerate() {
        let prefix = if i == 0 {
            "tls.".to_owned()
        } else {
            format!("tls.extra[{}].", i - 1)
        };
        match certs::load_files(&files.cert, &files.key) {
            Ok(cert) => loaded.push((prefix, cert.leaf)),
            Err(e) => r.at(span.clone(), format!("{context}{prefix}{e}")),
        }
    }
    let now = SystemTime::now();
    for (prefix, leaf) in &loaded {
        if leaf.not_after < now {
            let day = crate::logs::files::timestamp("YYYY-MM-DD", leaf.not_after);
            r.warn_at(
                span.clone(),
                format!(
                    "{context}{prefix}cert: expired on {day} ({}): clients will refuse it",
                    leaf.subject
                ),
            );
        } else if leaf.not_before > now {
            let day = crate::logs::files::timestamp("YYYY-MM-DD", leaf.not_before);
            r.warn_at(
                span.clone(),
                format!("{context}{prefix}cert: not valid before {day} ({})", leaf.subject),
            );
        }
    }
    if let Some(((_, first), rest)) = loaded.split_first().filter(|(p, _)| p.0 == "tls.") {
        for (prefix, leaf) in rest {
            let shadowed = leaf
                .names
                .iter()
                .all(|n| first.names.iter().any(|m| m == n || certs::name_matches(m, n)));
            if shadowed {
                r.warn_at(span.clone(), format!("{context}{prefix}cert: every name of it ({}) is covered by tls.cert, which is picked first: it is never used", leaf.names.join(", ")));
            }
        }
    }
    if loaded.len() == 1 + extra.len() {
        for host in hosts {
            let covered = loaded
                .iter()
                .any(|(_, leaf)| leaf.names.iter().any(|n| n == host || certs::name_matches(n, host)));
            if !covered {
                r.warn_at(
                    span.clone(),
                    format!("{context}hosts: {host:?} is not covered by any certificate of this app"),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_dns_names_with_an_optional_wildcard() {
        for good in ["example.com", "*.example.com", "a-b.c", "localhost", "x1.y2"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in [
            "",
            "*.",
            "example.com:443",
            "-a.com",
            "a..b",
            "a b",
            "*x.com",
            "a.*.com",
            "ex_ample.com",
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn hsts_takes_days_weeks_and_years() {
        let v = |s: &str| read_hsts(&DeValue::String(s.into()));
        assert_eq!(v("1y"), Ok(Duration::from_secs(31_536_000)));
        assert_eq!(v("180d"), Ok(Duration::from_secs(180 * 86_400)));
        assert!(v("3y").is_err());
        assert!(v("1 year").is_err());
        assert!(v("").is_err());
    }
}
