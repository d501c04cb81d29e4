//! Several apps on one address (nginx's `server_name`): which app a name belongs to.
//!
//! Apps that share a `listen` each name their `hosts`; one may be `default = true`. A name is
//! looked up as nginx does: an exact name first, then the wildcards (`*.example.com`, one
//! label), then the default app. An address with a single app needs no names: that app takes
//! every request. The same table answers for the TLS server name (SNI) at the handshake and
//! for the `Host` of each request; the listener answers 421 when the two pick different apps
//! (RFC 9110 §15.5.20: the client reused a connection for a name this connection does not
//! serve), and `check` refuses two apps that claim the same name on one address.
//!
//! The table is built once per address at start and read without locks.

/// Name → app index, for the apps of one address.
#[derive(Debug, Clone, Default)]
pub struct Names {
    exact: Vec<(String, usize)>,
    /// Suffixes of `*.` patterns, with the dot: `.example.com`.
    wildcard: Vec<(String, usize)>,
    default: Option<usize>,
    sites: usize,
}

impl Names {
    /// The table for apps given as (their `hosts`, whether `default`), in order.
    pub fn new<'a>(sites: impl IntoIterator<Item = (&'a [String], bool)>) -> Names {
        let mut names = Names::default();
        for (index, (hosts, default)) in sites.into_iter().enumerate() {
            names.sites += 1;
            for host in hosts {
                match host.strip_prefix('*') {
                    Some(suffix) => names.wildcard.push((suffix.to_ascii_lowercase(), index)),
                    None => names.exact.push((host.to_ascii_lowercase(), index)),
                }
            }
            if default && names.default.is_none() {
                names.default = Some(index);
            }
        }
        if names.sites == 1 {
            names.default = Some(0);
        }
        names
    }

    /// The app for `name` (a host without port, any case).
    pub fn pick(&self, name: &str) -> Option<usize> {
        let name = name.strip_suffix('.').unwrap_or(name);
        if let Some((_, site)) = self.exact.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
            return Some(*site);
        }
        let wildcard = self.wildcard.iter().find(|(suffix, _)| {
            name.len() > suffix.len()
                && name.is_char_boundary(name.len() - suffix.len())
                && name[name.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                && !name[..name.len() - suffix.len()].contains('.')
        });
        wildcard.map(|(_, site)| *site).or(self.default)
    }

    /// The app for a handshake's server name (none: the default app).
    pub fn pick_sni(&self, sni: Option<&str>) -> Option<usize> {
        match sni {
            Some(name) => self.pick(name),
            None => self.default,
        }
    }

    /// How many apps share the address.
    pub fn len(&self) -> usize {
        self.sites
    }

    /// True if no app is on the address.
    pub fn is_empty(&self) -> bool {
        self.sites == 0
    }
}

/// The host part of a `Host` value or `:authority` (`example.com:8443` → `example.com`,
/// `[::1]:443` → `[::1]`).
pub fn host_name(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority.find(']').map_or(authority, |end| &authority[..=end]);
    }
    authority.rsplit_once(':').map_or(authority, |(host, _)| host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Names {
        let a = ["example.com".to_owned(), "*.example.com".to_owned()];
        let b = ["api.example.com".to_owned()];
        let c = ["other.org".to_owned()];
        Names::new([(&a[..], false), (&b[..], false), (&c[..], true)])
    }

    #[test]
    fn exact_names_win_over_wildcards_and_the_default_takes_the_rest() {
        let n = names();
        assert_eq!(n.pick("example.com"), Some(0));
        assert_eq!(n.pick("EXAMPLE.com."), Some(0));
        assert_eq!(n.pick("www.example.com"), Some(0));
        assert_eq!(n.pick("api.example.com"), Some(1));
        assert_eq!(n.pick("a.b.example.com"), Some(2), "a wildcard covers one label");
        assert_eq!(n.pick("other.org"), Some(2));
        assert_eq!(n.pick("nothing.net"), Some(2));
        assert_eq!(n.pick_sni(None), Some(2));
    }

    #[test]
    fn without_a_default_an_unknown_name_has_no_app_but_a_lone_app_takes_all() {
        let a = ["a.test".to_owned()];
        let b = ["b.test".to_owned()];
        let n = Names::new([(&a[..], false), (&b[..], false)]);
        assert_eq!(n.pick("c.test"), None);
        assert_eq!(n.pick_sni(None), None);
        let alone = Names::new([(&a[..], false)]);
        assert_eq!(alone.pick("c.test"), Some(0));
    }

    #[test]
    fn the_port_is_not_part_of_the_name() {
        assert_eq!(host_name("example.com:8443"), "example.com");
        assert_eq!(host_name("example.com"), "example.com");
        assert_eq!(host_name("[::1]:443"), "[::1]");
        assert_eq!(host_name("[::1]"), "[::1]");
        assert_eq!(host_name("127.0.0.1:80"), "127.0.0.1");
    }
}
