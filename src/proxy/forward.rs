//! Header rewriting between client and worker.
//!
//! Towards the worker: hop-by-hop headers (RFC 9110 §7.6.1) and every header named in
//! `Connection` are removed, `X-Forwarded-For` gets the client's address appended, and
//! `X-Forwarded-Proto` / `X-Forwarded-Host` say what the client asked for. `Host` is kept as the
//! client sent it, so the app builds correct absolute URLs. Towards the client: the worker's
//! hop-by-hop headers are removed; hyper frames the body itself.

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The client end of a connection, with its address already formatted for `X-Forwarded-For`
/// (once per connection rather than once per request).
#[derive(Debug, Clone)]
pub struct Peer {
    /// The TCP peer.
    pub addr: SocketAddr,
    /// Its address, IPv4-mapped IPv6 shown as IPv4.
    pub ip: IpAddr,
    /// `ip` as a header value.
    pub ip_header: HeaderValue,
}

impl Peer {
    /// The peer at `addr`.
    pub fn new(addr: SocketAddr) -> Peer {
        let ip = addr.ip().to_canonical();
        let ip_header = HeaderValue::try_from(ip.to_string()).expect("UNWRAP: an IP address is a valid header value");
        Peer { addr, ip, ip_header }
    }
}

/// Rewrites a client's request headers for the worker.
pub fn request_headers(headers: &mut HeaderMap, peer: &Peer) {
    remove_hop_by_hop(headers);

    let forwarded_for = match joined(headers, &X_FORWARDED_FOR) {
        Some(earlier) => HeaderValue::try_from(format!("{earlier}, {}", peer.ip)).ok(),
        None => Some(peer.ip_header.clone()),
    };
    if let Some(value) = forwarded_for {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    if let Some(host) = headers.get(header::HOST).cloned() {
        headers.insert(X_FORWARDED_HOST.clone(), host);
    }
}

/// Rewrites a worker's response headers for the client.
pub fn response_headers(headers: &mut HeaderMap) {
    remove_hop_by_hop(headers);
}

/// All values of a header joined by ", " (the list form), if any is valid text.
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut values = headers.get_all(name).iter().filter_map(|v| v.to_str().ok());
    let first = values.next()?;
    Some(values.fold(first.to_owned(), |mut all, v| {
        all.push_str(", ");
        all.push_str(v);
        all
    }))
}

const HOP_BY_HOP: [&HeaderName; 9] = [
    &header::CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &header::TE,
    &header::TRAILER,
    &header::TRANSFER_ENCODING,
    &header::UPGRADE,
    &header::PROXY_AUTHENTICATE,
    &header::PROXY_AUTHORIZATION,
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    // A match on the lower-case name compiles to a length switch and one comparison.
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authenticate"
            | "proxy-authorization"
    )
}

fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none or one of them: one pass over the names is cheaper than nine
    // hashed removals.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    if let Some(listed) = connection_tokens(headers) {
        for name in listed {
            // `Connection: host` must not strip the Host the worker routes on.
            if name != header::HOST {
                headers.remove(&name);
            }
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Header names listed in `Connection`, other than the common `keep-alive`/`close` options.
fn connection_tokens(headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names = None;
    for value in headers.get_all(header::CONNECTION) {
        let Ok(text) = value.to_str() else { continue };
        for token in text.split(',').map(str::trim) {
            if token.is_empty() || token.eq_ignore_ascii_case("close") || token.eq_ignore_ascii_case("keep-alive") {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                names.get_or_insert_with(Vec::new).push(name);
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        m
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_go() {
        let mut h = map(&[
            ("host", "example.com"),
            ("connection", "keep-alive, x-secret, Host"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "basic x"),
            ("accept", "*/*"),
        ]);
        request_headers(&mut h, &Peer::new("10.0.0.9:1234".parse().expect("addr")));
        for gone in [
            "connection",
            "keep-alive",
            "x-secret",
            "te",
            "upgrade",
            "proxy-authorization",
        ] {
            assert!(!h.contains_key(gone), "{gone} should be removed");
        }
        assert_eq!(h["host"], "example.com");
        assert_eq!(h["accept"], "*/*");
        assert_eq!(h["x-forwarded-for"], "10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "example.com");
    }

    #[test]
    fn forwarded_for_is_appended_to_every_earlier_value() {
        let mut h = map(&[("x-forwarded-for", "1.1.1.1"), ("x-forwarded-for", "2.2.2.2, 3.3.3.3")]);
        request_headers(&mut h, &Peer::new("[::ffff:127.0.0.1]:1234".parse().expect("addr")));
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 3.3.3.3, 127.0.0.1");
    }
}
