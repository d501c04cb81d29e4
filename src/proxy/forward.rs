//! Header rewriting between client and worker.
//!
//! Towards the worker, [`encode_request`] writes the request head in HTTP/1.1 form straight
//! from the client's headers: hop-by-hop headers (RFC 9110 §7.6.1) and every header named in
//! `Connection` are left out, `X-Forwarded-For` gets the client's address appended, and
//! `X-Forwarded-Proto` / `X-Forwarded-Host` say what the client asked for (whatever the client
//! claimed in them is replaced). `Host` is kept as the client sent it, so the app builds correct
//! absolute URLs. Writing the rewritten head instead of editing the header map first saves the
//! map's hashed removals and insertions on every request. Towards the client, the worker's
//! hop-by-hop headers are never put in the response's map ([`super::upstream`] skips them with
//! [`is_hop_by_hop`]); hyper frames the body itself.

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

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

/// The request head for the worker. `upgrade`: the protocol the client asked to switch to
/// (its `Connection: upgrade` and `Upgrade` are restored); `chunked`: the body is sent chunked.
pub fn encode_request(head: &Parts, peer: &Peer, upgrade: Option<&HeaderValue>, chunked: bool) -> Vec<u8> {
    let headers = &head.headers;
    let target = head.uri.path_and_query().map_or("/", |p| p.as_str());
    let fields: usize = headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum();
    let mut out = Vec::with_capacity(target.len() + fields + 160);
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");

    // Names listed in Connection are hop-by-hop too (rare: looked for only when present).
    let listed = if headers.contains_key(header::CONNECTION) {
        connection_tokens(headers)
    } else {
        None
    };
    let mut host = None;
    let mut forwarded_for: Option<Vec<u8>> = None;
    for (name, value) in headers {
        if *name == X_FORWARDED_FOR {
            let list = forwarded_for.get_or_insert_with(Vec::new);
            if !list.is_empty() {
                list.extend_from_slice(b", ");
            }
            list.extend_from_slice(value.as_bytes());
            continue;
        }
        if is_hop_by_hop(name) || *name == X_FORWARDED_PROTO || *name == X_FORWARDED_HOST {
            continue;
        }
        // `Connection: host` must not strip the Host the worker routes on.
        if *name != header::HOST && listed.as_ref().is_some_and(|l| l.contains(name)) {
            continue;
        }
        if *name == header::HOST {
            host = Some(value);
        }
        field(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if let Some(earlier) = forwarded_for.filter(|l| !l.is_empty()) {
        out.extend_from_slice(&earlier);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(peer.ip_header.as_bytes());
    out.extend_from_slice(b"\r\nx-forwarded-proto: http\r\n");
    if let Some(host) = host {
        field(&mut out, b"x-forwarded-host", host.as_bytes());
    }
    if let Some(protocol) = upgrade {
        out.extend_from_slice(b"connection: upgrade\r\n");
        field(&mut out, b"upgrade", protocol.as_bytes());
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// True for the hop-by-hop headers of RFC 9110 §7.6.1 (and the old `Keep-Alive`,
/// `Proxy-Connection`): they describe one connection and are never forwarded.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
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

    fn encoded(pairs: &[(&str, &str)], peer: &str, upgrade: Option<&str>, chunked: bool) -> String {
        let mut request = http::Request::builder()
            .method("GET")
            .uri("http://ignored.example/p?q=1");
        for (k, v) in pairs {
            request = request.header(*k, *v);
        }
        let (mut parts, ()) = request.body(()).expect("valid").into_parts();
        parts.headers = map(pairs);
        let upgrade = upgrade.map(|u| HeaderValue::from_str(u).expect("value"));
        let head = encode_request(
            &parts,
            &Peer::new(peer.parse().expect("addr")),
            upgrade.as_ref(),
            chunked,
        );
        String::from_utf8(head).expect("text")
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_go() {
        let head = encoded(
            &[
                ("host", "example.com"),
                ("connection", "keep-alive, x-secret, Host"),
                ("keep-alive", "timeout=5"),
                ("x-secret", "1"),
                ("te", "trailers"),
                ("upgrade", "websocket"),
                ("proxy-authorization", "basic x"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "evil.example"),
                ("accept", "*/*"),
            ],
            "10.0.0.9:1234",
            None,
            false,
        );
        assert_eq!(
            head,
            "GET /p?q=1 HTTP/1.1\r\nhost: example.com\r\naccept: */*\r\nx-forwarded-for: 10.0.0.9\r\n\
             x-forwarded-proto: http\r\nx-forwarded-host: example.com\r\n\r\n"
        );
    }

    #[test]
    fn forwarded_for_is_appended_to_every_earlier_value() {
        let head = encoded(
            &[("x-forwarded-for", "1.1.1.1"), ("x-forwarded-for", "2.2.2.2, 3.3.3.3")],
            "[::ffff:127.0.0.1]:1234",
            None,
            false,
        );
        assert_eq!(head.matches("x-forwarded-for").count(), 1);
        assert!(
            head.contains("x-forwarded-for: 1.1.1.1, 2.2.2.2, 3.3.3.3, 127.0.0.1\r\n"),
            "{head}"
        );
        assert!(
            !head.contains("x-forwarded-host"),
            "no Host, no X-Forwarded-Host: {head}"
        );
    }

    #[test]
    fn an_upgrade_and_a_chunked_body_are_declared() {
        let head = encoded(
            &[("host", "h"), ("connection", "Upgrade"), ("upgrade", "websocket")],
            "10.0.0.1:1",
            Some("websocket"),
            true,
        );
        assert!(
            head.ends_with("connection: upgrade\r\nupgrade: websocket\r\ntransfer-encoding: chunked\r\n\r\n"),
            "{head}"
        );
        assert_eq!(head.matches("upgrade: websocket").count(), 1, "{head}");
    }
}
