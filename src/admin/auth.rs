//! Who may use the admin listener, and which requests may change something.
//!
//! - With a token (`token_file` or `CORRAL_ADMIN_TOKEN`): every path but `/healthz` and
//!   `/readyz` needs `Authorization: Bearer <token>` or the dashboard's session cookie, which
//!   `POST /login` with the token sets (`HttpOnly; SameSite=Strict`). The cookie's value is an
//!   HMAC of the token, so it is worthless without the token and changes when the token does;
//!   both comparisons take constant time.
//! - Without a token the listener is on loopback (`check` refuses anything else), and the
//!   `Host` header must name that loopback address: a web page that resolves its own name to
//!   127.0.0.1 (DNS rebinding) sends its own name, and is refused.
//! - Changes (`POST /api/...`, `/login`) must be POST with a JSON body (`Content-Type:
//!   application/json`, which a cross-site form cannot send without a CORS preflight corral
//!   never answers), and an `Origin`, when the client sends one (browsers do), must be this
//!   listener's own.

use std::net::SocketAddr;

use hmac::{Hmac, Mac};
use http::{header, HeaderMap};
use sha2::Sha256;

/// The session cookie's name.
pub const COOKIE: &str = "corral_admin";

/// The admin listener's access rules.
#[derive(Debug, Clone)]
pub struct Access {
    token: Option<String>,
    session: Option<String>,
    listen: SocketAddr,
}

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No valid token or session (401).
    Unauthenticated,
    /// The `Host` is not the loopback listener's (403).
    ForeignHost,
    /// The `Origin` is another site's (403).
    ForeignOrigin,
    /// A change without a JSON body (415).
    NotJson,
}

impl Access {
    /// The rules for a listener on `listen` with `token` (none: loopback without auth).
    pub fn new(listen: SocketAddr, token: Option<String>) -> Access {
        let session = token.as_deref().map(session_value);
        Access { token, session, listen }
    }

    /// True when a token is required.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Checks who is asking.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        let Some(token) = &self.token else {
            return if self.host_is_ours(headers) {
                Ok(())
            } else {
                Err(Refusal::ForeignHost)
            };
        };
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if bearer.is_some_and(|given| constant_time_eq(given.trim().as_bytes(), token.as_bytes())) {
            return Ok(());
        }
        let session = self.session.as_deref().unwrap_or_default();
        if cookie(headers, COOKIE).is_some_and(|given| constant_time_eq(given.as_bytes(), session.as_bytes())) {
            return Ok(());
        }
        Err(Refusal::Unauthenticated)
    }

    /// Checks that a change comes as JSON and from this listener's own pages (if from a page).
    pub fn may_change(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
            });
        if !json {
            return Err(Refusal::NotJson);
        }
        match headers.get(header::ORIGIN) {
            None => Ok(()),
            Some(origin) => {
                let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
                let expected = host.map(|h| format!("http://{h}"));
                if expected.is_some_and(|e| origin.as_bytes() == e.as_bytes()) {
                    Ok(())
                } else {
                    Err(Refusal::ForeignOrigin)
                }
            }
        }
    }

    /// `POST /login`: the cookie for a correct `token`.
    pub fn login(&self, given: &str) -> Option<String> {
        let token = self.token.as_deref()?;
        constant_time_eq(given.as_bytes(), token.as_bytes()).then(|| {
            format!(
                "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
                self.session.as_deref().unwrap_or_default()
            )
        })
    }

    /// The `Host` names this loopback listener (by its address or as `localhost`).
    fn host_is_ours(&self, headers: &HeaderMap) -> bool {
        let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
            return false;
        };
        let port = self.listen.port();
        host == self.listen.to_string() || host == format!("localhost:{port}")
    }
}

/// The session cookie's value for `token`.
fn session_value(token: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(token.as_bytes()).expect("UNWRAP: HMAC takes keys of any length");
    mac.update(b"corral admin session v1");
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// The value of cookie `name`, if the request has it.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(name)?.strip_prefix('='))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).expect("value"));
        }
        map
    }

    #[test]
    fn a_token_is_needed_by_bearer_or_by_the_cookie_login_sets() {
        let access = Access::new(
            "0.0.0.0:9615".parse().expect("addr"),
            Some("s3cret-token-0123456789".into()),
        );
        assert_eq!(access.authenticate(&headers(&[])), Err(Refusal::Unauthenticated));
        assert_eq!(
            access.authenticate(&headers(&[("authorization", "Bearer wrong")])),
            Err(Refusal::Unauthenticated)
        );
        assert!(access
            .authenticate(&headers(&[("authorization", "Bearer s3cret-token-0123456789")]))
            .is_ok());
        assert!(access.login("nope").is_none());
        let set = access.login("s3cret-token-0123456789").expect("cookie");
        assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"), "{set}");
        let value = set.split(';').next().expect("pair");
        assert!(access
            .authenticate(&headers(&[("cookie", &format!("a=b; {value}"))]))
            .is_ok());
        assert_eq!(
            access.authenticate(&headers(&[("cookie", "corral_admin=00")])),
            Err(Refusal::Unauthenticated)
        );
    }

    #[test]
    fn without_a_token_only_the_loopback_host_is_served_and_changes_need_json_from_here() {
        let access = Access::new("127.0.0.1:9615".parse().expect("addr"), None);
        assert!(access.authenticate(&headers(&[("host", "127.0.0.1:9615")])).is_ok());
        assert!(access.authenticate(&headers(&[("host", "localhost:9615")])).is_ok());
        assert_eq!(
            access.authenticate(&headers(&[("host", "evil.example:9615")])),
            Err(Refusal::ForeignHost)
        );
        assert_eq!(access.authenticate(&headers(&[])), Err(Refusal::ForeignHost));

        let json = ("content-type", "application/json");
        assert_eq!(access.may_change(&headers(&[])), Err(Refusal::NotJson));
        assert!(access.may_change(&headers(&[json])).is_ok());
        assert!(access
            .may_change(&headers(&[
                json,
                ("host", "127.0.0.1:9615"),
                ("origin", "http://127.0.0.1:9615")
            ]))
            .is_ok());
        assert_eq!(
            access.may_change(&headers(&[
                json,
                ("host", "127.0.0.1:9615"),
                ("origin", "http://evil.example")
            ])),
            Err(Refusal::ForeignOrigin)
        );
    }
}
