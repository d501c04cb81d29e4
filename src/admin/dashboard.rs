//! The dashboard: `GET /` of the admin listener, one page embedded in the binary.
//!
//! What it owns: the page ([`PAGE`], `dashboard.html`: HTML, its stylesheet and its script in
//! one file, no external resource, no build step, so it works offline and ships inside the
//! binary) and the headers it is served with. What it does not own: data. The page holds none;
//! its script reads the same endpoints as any other client — `GET /api/status` (the JSON of
//! `corral status --json`) every 2 s and after every event, `GET /api/events` (Server-Sent
//! Events, replayed from the start with `?last_event_id=0`), `GET /api/logs` for a worker's log
//! tail — and changes things with the same `POST /api/...` requests as scripts, with
//! `Content-Type: application/json` and the browser's own `Origin`, so [`super::auth`]'s rules
//! apply to the page unchanged. The charts (req/s, p99, memory) are drawn from the statuses the
//! page has seen, over the last 5 minutes: corral keeps no history for them.
//!
//! Design choices:
//!
//! - **Login.** With a token, an unauthenticated `GET /` is answered `401` *with the page*
//!   (the status keeps the rule "everything but the health checks needs the token" true, the
//!   body is what a browser needs to get one). The page carries no data, so serving it costs
//!   nothing; when `/api/status` answers 401 the script shows a token form that POSTs
//!   `{"token": ...}` to `/login`, which sets the `HttpOnly; SameSite=Strict` session cookie,
//!   and then proceeds. The token itself is never stored by the page. Without a token the
//!   usual loopback `Host` check applies to `/` like to every other path (a DNS-rebinding page
//!   gets `403`, not the dashboard).
//! - **Content-Security-Policy.** The script and stylesheet are inline (one file, one request)
//!   and allowed by their SHA-256 hashes, which [`content_security_policy`] computes from the
//!   embedded page once, at first use: the policy cannot drift from the page it protects, and
//!   no nonce is needed because the page never changes while corral runs. Everything else is
//!   `'none'` but `connect-src 'self'` (fetch and EventSource to this listener), and the page
//!   cannot be framed (`frame-ancestors 'none'` and `X-Frame-Options: DENY`), so no other site
//!   can click its buttons for a user.
//! - **Hostile text.** Worker log lines, exit messages and app names are written into the page
//!   with `textContent` only, never parsed as HTML; the CSP would refuse an injected script
//!   anyway, as a second line.

use std::sync::LazyLock;

use http::{header, HeaderValue, Response, StatusCode};
use sha2::{Digest, Sha256};

use super::AdminBody;

/// The page: HTML with one inline `<style>` and one inline `<script>`.
pub const PAGE: &str = include_str!("dashboard.html");

/// The policy for [`PAGE`], computed once.
static POLICY: LazyLock<HeaderValue> = LazyLock::new(|| {
    HeaderValue::try_from(content_security_policy(PAGE))
        .unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'"))
});

/// The dashboard with `status` (200, or 401 for a browser that must log in first).
pub fn page(status: StatusCode) -> Response<AdminBody> {
    let mut response = Response::new(AdminBody::full(PAGE));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CONTENT_SECURITY_POLICY, POLICY.clone());
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    if status == StatusCode::UNAUTHORIZED {
        headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

/// The CSP for `page`: its inline script and stylesheet by hash, fetches to this origin only,
/// nothing else.
pub fn content_security_policy(page: &str) -> String {
    let hash = |tag: &str| {
        let digest = Sha256::digest(inline(page, tag).unwrap_or_default().as_bytes());
        base64(&digest)
    };
    format!(
        "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; connect-src 'self'; \
         img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hash("script"),
        hash("style")
    )
}

/// The text of the first `<tag>` element (without attributes): exactly what a browser hashes.
fn inline<'a>(page: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = page.find(&open)? + open.len();
    let end = start + page[start..].find(&format!("</{tag}>"))?;
    Some(&page[start..end])
}

/// Standard base64 with padding (what CSP hash sources use).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_4648_vectors() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (text, encoded) in vectors {
            assert_eq!(base64(text.as_bytes()), encoded, "{text:?}");
        }
    }

    #[test]
    fn the_policy_hashes_the_one_inline_script_and_stylesheet_of_the_page() {
        // One of each, without attributes: anything else would be refused by the policy.
        for tag in ["script", "style"] {
            assert_eq!(PAGE.matches(&format!("<{tag}")).count(), 1, "<{tag}> elements");
        }
        let policy = content_security_policy(PAGE);
        let script = base64(&Sha256::digest(inline(PAGE, "script").expect("script").as_bytes()));
        assert!(policy.contains(&format!("script-src 'sha256-{script}'")), "{policy}");
        assert!(policy.starts_with("default-src 'none';"), "{policy}");
        assert_eq!(inline("a<b>x</b>", "b"), Some("x"));
        assert_eq!(inline("a<b>x", "b"), None);
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere_and_never_parses_data_as_html() {
        let urls = PAGE.matches("http://").count() - PAGE.matches("http://www.w3.org/2000/svg").count();
        assert_eq!(urls, 0, "the page names another site");
        for needle in [
            "https://",
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "style=\"",
        ] {
            assert!(!PAGE.contains(needle), "the page contains {needle:?}");
        }
    }
}
