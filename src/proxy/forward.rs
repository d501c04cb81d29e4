//! What corral checks in a request head and what it writes to the worker.
//!
//! [`check`] refuses, before anything reaches a worker, a request that could be read two
//! ways or that corral cannot forward faithfully: two `Host` fields, HTTP/1.1 without one, a
//! `Host` that is not a host, `CONNECT`, or a transfer coding other than a single `chunked`
//! (a `gzip, chunked` body would reach the app still gzipped under a plain `chunked`). It
//! also decides which `Host` the worker gets: an absolute-form target's authority wins over
//! the field (RFC 9112 §3.2.2), and an HTTP/1.0 request without one gets the address the
//! client connected to (nginx's `$host` falls back the same way), so the worker always sees a
//! valid HTTP/1.1 head.
//!
//! Towards the worker, [`encode_request`] writes the request head in HTTP/1.1 form straight
//! from the client's headers. The framing is corral's own: the client's `Content-Length` and
//! `Transfer-Encoding` are never copied; corral writes the [`Framing`] it computed from the
//! body it read (hyper's decoded length), after every other rewrite, so no header a client
//! names in `Connection` can change it, or remove `Host`. Left out as well: hop-by-hop headers
//! (RFC 9110 §7.6.1) and every header named in `Connection`; `Proxy` and every `Proxy-*`
//! header (they are for a proxy, and `Proxy:` is the httpoxy vector); `Expect: 100-continue`,
//! which hyper answers on the client's side. `X-Forwarded-For` gets the client's address
//! appended; `X-Forwarded-Proto` and `X-Forwarded-Host` are kept as sent when the peer is in
//! `trusted_proxies` (a TLS terminator in front knows the real scheme) and set by corral
//! otherwise. Writing the rewritten head instead of editing the header map first saves the
//! map's hashed removals and insertions on every request. Towards the client, the worker's
//! hop-by-hop headers are never put in the response's map ([`super::upstream`] skips them
//! with [`is_hop_by_hop`]); hyper frames the body itself.

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, StatusCode, Version};

use super::error::ProxyError;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The client end of a connection, with its addresses already formatted (once per connection
/// rather than once per request).
#[derive(Debug, Clone)]
pub struct Peer {
    /// The TCP peer.
    pub addr: SocketAddr,
    /// Its address, IPv4-mapped IPv6 shown as IPv4.
    pub ip: IpAddr,
    /// `ip` as a header value.
    pub ip_header: HeaderValue,
    /// The address the client connected to (the `Host` of an HTTP/1.0 request without one).
    pub local: SocketAddr,
    /// The connection is TLS: `X-Forwarded-Proto: https`, a `Secure` affinity cookie, HSTS.
    pub tls: bool,
}

impl Peer {
    /// The peer at `addr`, connected to `local`, over TLS or not.
    pub fn new(addr: SocketAddr, local: SocketAddr, tls: bool) -> Peer {
        let ip = addr.ip().to_canonical();
        let ip_header = HeaderValue::try_from(ip.to_string()).expect("UNWRAP: an IP address is a valid header value");
        let local = SocketAddr::new(local.ip().to_canonical(), local.port());
        Peer {
            addr,
            ip,
            ip_header,
            local,
            tls,
        }
    }
}

/// How the request body is framed towards the worker, decided by corral from what it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body and no declared length (most GETs): no framing header.
    None,
    /// Exactly this many bytes (0 included, when the client declared an empty body).
    Length(u64),
    /// A body whose length is not known in advance: sent chunked.
    Chunked,
}

/// Checks a request head before anything of it is forwarded; the `Host` value the worker
/// gets, or why the request is refused.
pub fn check(head: &Parts, peer: &Peer, max_headers: usize) -> Result<HeaderValue, ProxyError> {
    let refuse = |status, why| Err(ProxyError::Refused { status, why });
    if head.method == Method::CONNECT {
        return refuse(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported");
    }
    // Origin form starts with "/"; "*" is for OPTIONS only (RFC 9112 §3.2.4). HTTP/2's
    // `:path` comes as sent ("?x" would otherwise reach a worker as a request target).
    if let Some(target) = head.uri.path_and_query().map(http::uri::PathAndQuery::as_str) {
        let valid = if target == "*" {
            head.method == Method::OPTIONS
        } else {
            target.starts_with('/')
        };
        if !valid {
            return refuse(StatusCode::BAD_REQUEST, "invalid request target");
        }
    }
    // hyper counts HTTP/1.1 fields itself; an HTTP/2 header list is only bounded in bytes.
    if head.version == Version::HTTP_2 && head.headers.len() > max_headers {
        return refuse(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "too many header fields");
    }
    if head.headers.contains_key(header::TRANSFER_ENCODING) {
        // hyper made sure the last coding is chunked; it must be the only one.
        let (mut chunked, mut others) = (0, 0);
        for value in head.headers.get_all(header::TRANSFER_ENCODING) {
            for coding in value.as_bytes().split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                match coding {
                    b"" => {}
                    c if c.eq_ignore_ascii_case(b"chunked") => chunked += 1,
                    _ => others += 1,
                }
            }
        }
        if others > 0 {
            return refuse(
                StatusCode::NOT_IMPLEMENTED,
                "transfer codings other than chunked are not supported",
            );
        }
        if chunked > 1 {
            return refuse(StatusCode::BAD_REQUEST, "chunked applied more than once");
        }
    }
    let mut hosts = head.headers.get_all(header::HOST).iter();
    let field = hosts.next();
    if hosts.next().is_some() {
        return refuse(StatusCode::BAD_REQUEST, "more than one Host header");
    }
    if let Some(authority) = head.uri.authority() {
        // Absolute form: its authority is the host (RFC 9112 §3.2.2), whatever Host says.
        if !matches!(head.uri.scheme_str(), Some("http" | "https"))
            || authority.as_str().contains('@')
            || !valid_host(authority.as_str().as_bytes())
        {
            return refuse(StatusCode::BAD_REQUEST, "invalid request target");
        }
        // HTTP/2 (RFC 9113 §8.3.1): a Host that names another entity than :authority.
        if head.version == Version::HTTP_2
            && field.is_some_and(|host| !host.as_bytes().eq_ignore_ascii_case(authority.as_str().as_bytes()))
        {
            return refuse(StatusCode::BAD_REQUEST, "Host differs from :authority");
        }
        return HeaderValue::from_str(authority.as_str()).or(refuse(StatusCode::BAD_REQUEST, "invalid request target"));
    }
    match field {
        Some(host) if valid_host(host.as_bytes()) => Ok(host.clone()),
        Some(_) => refuse(StatusCode::BAD_REQUEST, "invalid Host header"),
        None if head.version == Version::HTTP_10 => {
            Ok(HeaderValue::try_from(peer.local.to_string()).expect("UNWRAP: an address is a valid header value"))
        }
        None => refuse(StatusCode::BAD_REQUEST, "missing Host header"),
    }
}

/// `uri-host [ ":" port ]` (RFC 3986 §3.2.2): an IP literal in brackets or a registered name
/// (an IPv4 address is one too), and a port of digits.
pub fn valid_host(value: &[u8]) -> bool {
    let (host, port) = match value.iter().rposition(|&b| b == b':') {
        Some(colon) if !value.starts_with(b"[") || value[..colon].ends_with(b"]") => {
            (&value[..colon], Some(&value[colon + 1..]))
        }
        _ => (value, None),
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.iter().all(u8::is_ascii_digit));
    let host_ok = match host {
        [b'[', literal @ .., b']'] => {
            !literal.is_empty() && literal.iter().all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        }
        name => {
            !name.is_empty()
                && name
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(&b))
        }
    };
    port_ok && host_ok
}

/// The request head for the worker. `host`: from [`check`]; `trusted`: the peer is one of the
/// app's `trusted_proxies`; `upgrade`: the protocol the client asked to switch to (its
/// `Connection: upgrade` and `Upgrade` are restored); `framing`: how the body follows;
/// `request_id`: the request's `X-Request-Id` (with `request_id = true`), which replaces any
/// the client sent.
#[allow(clippy::too_many_arguments)]
pub fn encode_request(
    head: &Parts,
    peer: &Peer,
    host: &HeaderValue,
    trusted: bool,
    upgrade: Option<&HeaderValue>,
    framing: Framing,
    request_id: Option<&HeaderValue>,
) -> Vec<u8> {
    let headers = &head.headers;
    let target = head.uri.path_and_query().map_or("/", |p| p.as_str());
    let fields: usize = headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum();
    let mut out = Vec::with_capacity(target.len() + fields + 160);
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");

    // Names listed in Connection are hop-by-hop too (rare: looked for only when present).
    let listed = if headers.contains_key(header::CONNECTION) {
        connection_tokens(headers)
    } else {
        None
    };
    let mut forwarded_for: Option<Vec<u8>> = None;
    // HTTP/2 clients may split Cookie into several fields; HTTP/1.1 wants one (RFC 9113 §8.2.3).
    let mut cookies: Option<Vec<u8>> = None;
    let (mut kept_proto, mut kept_host) = (false, false);
    for (name, value) in headers {
        if *name == header::COOKIE && head.version == Version::HTTP_2 {
            let joined = cookies.get_or_insert_with(Vec::new);
            if !joined.is_empty() {
                joined.extend_from_slice(b"; ");
            }
            joined.extend_from_slice(value.as_bytes());
            continue;
        }
        if is_hop_by_hop(name)
            || *name == header::HOST
            || *name == header::CONTENT_LENGTH
            || is_for_a_proxy(name)
            || (*name == header::EXPECT && value.as_bytes().eq_ignore_ascii_case(b"100-continue"))
            || listed.as_ref().is_some_and(|l| l.contains(name))
            || (request_id.is_some() && *name == super::request_id::X_REQUEST_ID)
        {
            continue;
        }
        if *name == X_FORWARDED_FOR {
            let list = forwarded_for.get_or_insert_with(Vec::new);
            if !list.is_empty() {
                list.extend_from_slice(b", ");
            }
            list.extend_from_slice(value.as_bytes());
            continue;
        }
        if *name == X_FORWARDED_PROTO || *name == X_FORWARDED_HOST {
            if !trusted {
                continue;
            }
            kept_proto |= *name == X_FORWARDED_PROTO;
            kept_host |= *name == X_FORWARDED_HOST;
        }
        field(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    if let Some(cookies) = cookies {
        field(&mut out, b"cookie", &cookies);
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if let Some(earlier) = forwarded_for.filter(|l| !l.is_empty()) {
        out.extend_from_slice(&earlier);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(peer.ip_header.as_bytes());
    out.extend_from_slice(b"\r\n");
    if !kept_proto {
        out.extend_from_slice(if peer.tls {
            b"x-forwarded-proto: https\r\n"
        } else {
            b"x-forwarded-proto: http\r\n"
        });
    }
    if !kept_host {
        field(&mut out, b"x-forwarded-host", host.as_bytes());
    }
    if let Some(id) = request_id {
        field(&mut out, b"x-request-id", id.as_bytes());
    }
    if let Some(protocol) = upgrade {
        out.extend_from_slice(b"connection: upgrade\r\n");
        field(&mut out, b"upgrade", protocol.as_bytes());
    }
    match framing {
        Framing::None => {}
        Framing::Length(n) => {
            use std::io::Write as _;
            // Writing to a Vec cannot fail.
            let _ = write!(out, "content-length: {n}\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// `Proxy` and `Proxy-*`: meant for a proxy (credentials, httpoxy's `Proxy:`), never for the app.
fn is_for_a_proxy(name: &HeaderName) -> bool {
    let name = name.as_str();
    name == "proxy" || name.starts_with("proxy-")
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

    fn parts(method: &str, uri: &str, version: Version, pairs: &[(&str, &str)]) -> Parts {
        let (mut parts, ()) = http::Request::builder()
            .method(method)
            .uri(uri)
            .version(version)
            .body(())
            .expect("valid")
            .into_parts();
        for (k, v) in pairs {
            parts.headers.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        parts
    }

    fn peer(addr: &str) -> Peer {
        Peer::new(
            addr.parse().expect("addr"),
            "127.0.0.1:8080".parse().expect("addr"),
            false,
        )
    }

    fn encoded(pairs: &[(&str, &str)], from: &str, trusted: bool, upgrade: Option<&str>, framing: Framing) -> String {
        let parts = parts("GET", "/p?q=1", Version::HTTP_11, pairs);
        let peer = peer(from);
        let host = check(&parts, &peer, 100).expect("accepted");
        let upgrade = upgrade.map(|u| HeaderValue::from_str(u).expect("value"));
        let head = encode_request(&parts, &peer, &host, trusted, upgrade.as_ref(), framing, None);
        String::from_utf8(head).expect("text")
    }

    #[test]
    fn hop_by_hop_connection_listed_and_proxy_headers_go() {
        let head = encoded(
            &[
                ("host", "example.com"),
                (
                    "connection",
                    "keep-alive, x-secret, Host, content-length, transfer-encoding",
                ),
                ("keep-alive", "timeout=5"),
                ("x-secret", "1"),
                ("te", "trailers"),
                ("upgrade", "websocket"),
                ("proxy-authorization", "basic x"),
                ("proxy", "http://evil.example"),
                ("proxy-foo", "1"),
                ("expect", "100-continue"),
                ("content-length", "99"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "evil.example"),
                ("accept", "*/*"),
            ],
            "10.0.0.9:1234",
            false,
            None,
            Framing::Length(5),
        );
        assert_eq!(
            head,
            "GET /p?q=1 HTTP/1.1\r\nhost: example.com\r\naccept: */*\r\nx-forwarded-for: 10.0.0.9\r\n\
             x-forwarded-proto: http\r\nx-forwarded-host: example.com\r\ncontent-length: 5\r\n\r\n"
        );
    }

    #[test]
    fn the_request_id_replaces_whatever_the_client_sent() {
        let parts = parts(
            "GET",
            "/",
            Version::HTTP_11,
            &[("host", "h"), ("x-request-id", "from client"), ("x-request-id", "two")],
        );
        let peer = peer("10.0.0.1:1");
        let id = HeaderValue::from_static("abc-0-1");
        let head = encode_request(
            &parts,
            &peer,
            &HeaderValue::from_static("h"),
            false,
            None,
            Framing::None,
            Some(&id),
        );
        let head = String::from_utf8(head).expect("text");
        assert_eq!(head.matches("x-request-id").count(), 1, "{head}");
        assert!(head.contains("x-request-id: abc-0-1\r\n"), "{head}");
        // Without request_id the client's fields pass as they are.
        let head = encode_request(
            &parts,
            &peer,
            &HeaderValue::from_static("h"),
            false,
            None,
            Framing::None,
            None,
        );
        let head = String::from_utf8(head).expect("text");
        assert!(
            head.contains("x-request-id: from client\r\nx-request-id: two\r\n"),
            "{head}"
        );
    }

    #[test]
    fn a_trusted_peer_keeps_its_forwarded_proto_and_host() {
        let pairs = [
            ("host", "internal:8080"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "example.com"),
        ];
        let head = encoded(&pairs, "10.0.0.9:1234", true, None, Framing::None);
        assert!(head.contains("x-forwarded-proto: https\r\n"), "{head}");
        assert!(head.contains("x-forwarded-host: example.com\r\n"), "{head}");
        assert_eq!(head.matches("x-forwarded-proto").count(), 1, "{head}");
        assert_eq!(head.matches("x-forwarded-host").count(), 1, "{head}");
        let untrusted = encoded(&pairs, "10.0.0.9:1234", false, None, Framing::None);
        assert!(untrusted.contains("x-forwarded-proto: http\r\n"), "{untrusted}");
        assert!(untrusted.contains("x-forwarded-host: internal:8080\r\n"), "{untrusted}");
    }

    #[test]
    fn forwarded_for_is_appended_to_every_earlier_value() {
        let head = encoded(
            &[
                ("host", "h"),
                ("x-forwarded-for", "1.1.1.1"),
                ("x-forwarded-for", "2.2.2.2, 3.3.3.3"),
            ],
            "[::ffff:127.0.0.1]:1234",
            false,
            None,
            Framing::None,
        );
        assert_eq!(head.matches("x-forwarded-for").count(), 1);
        assert!(
            head.contains("x-forwarded-for: 1.1.1.1, 2.2.2.2, 3.3.3.3, 127.0.0.1\r\n"),
            "{head}"
        );
    }

    #[test]
    fn an_upgrade_and_a_chunked_body_are_declared() {
        let head = encoded(
            &[("host", "h"), ("connection", "Upgrade"), ("upgrade", "websocket")],
            "10.0.0.1:1",
            false,
            Some("websocket"),
            Framing::Chunked,
        );
        assert!(
            head.ends_with("connection: upgrade\r\nupgrade: websocket\r\ntransfer-encoding: chunked\r\n\r\n"),
            "{head}"
        );
        assert_eq!(head.matches("upgrade: websocket").count(), 1, "{head}");
    }

    #[test]
    fn ambiguous_or_unsupported_heads_are_refused() {
        let p = peer("10.0.0.1:1");
        let refused = |method: &str, uri: &str, version, pairs: &[(&str, &str)]| match check(
            &parts(method, uri, version, pairs),
            &p,
            100,
        ) {
            Err(ProxyError::Refused { status, .. }) => status.as_u16(),
            other => panic!("{method} {uri} {pairs:?} accepted: {other:?}"),
        };
        let v11 = Version::HTTP_11;
        assert_eq!(refused("GET", "/", v11, &[("host", "a"), ("host", "b")]), 400);
        assert_eq!(refused("GET", "/", v11, &[]), 400);
        assert_eq!(refused("GET", "/", v11, &[("host", "")]), 400);
        assert_eq!(refused("GET", "/", v11, &[("host", "a b")]), 400);
        assert_eq!(refused("GET", "/", v11, &[("host", "user@a")]), 400);
        for bad in ["a.example/evil", "a.example:port", "a:", "[::1", "a:123456", "[zz]:80"] {
            assert_eq!(refused("GET", "/", v11, &[("host", bad)]), 400, "{bad}");
        }
        assert_eq!(refused("GET", "ftp://a/x", v11, &[("host", "a")]), 400);
        assert_eq!(refused("CONNECT", "a:443", v11, &[("host", "a:443")]), 405);
        // An absolute target's authority is held to the rules of Host (HTTP/2's :authority).
        for bad in ["http://a b/x", "https://a.example:port/", "http://[zz]/"] {
            if bad.parse::<http::Uri>().is_ok() {
                assert_eq!(refused("GET", bad, Version::HTTP_2, &[]), 400, "{bad}");
            }
        }
        // The request target: "/" first, or "*" for OPTIONS only.
        assert_eq!(refused("GET", "*", v11, &[("host", "a")]), 400);
        // The h2 crate builds the target from `:scheme`, `:authority` and `:path` as sent.
        let mut target = http::uri::Parts::default();
        target.scheme = Some(http::uri::Scheme::HTTPS);
        target.authority = Some(http::uri::Authority::from_static("a"));
        target.path_and_query = Some(http::uri::PathAndQuery::from_static("?x"));
        let mut h2 = parts("GET", "/", Version::HTTP_2, &[]);
        h2.uri = http::Uri::from_parts(target).expect("uri");
        assert!(matches!(check(&h2, &p, 100), Err(ProxyError::Refused { status, .. }) if status == 400));
        assert!(check(&parts("OPTIONS", "*", v11, &[("host", "a")]), &p, 100).is_ok());
        // HTTP/2 header lists are counted like HTTP/1.1 heads.
        let many: Vec<(String, String)> = (0..101).map(|i| (format!("x-{i}"), "v".to_owned())).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(refused("GET", "https://a/", Version::HTTP_2, &many), 431);
        assert!(check(&parts("GET", "https://a/", Version::HTTP_2, &many[..99]), &p, 100).is_ok());
        for (te, status) in [
            (&[("transfer-encoding", "gzip, chunked")][..], 501),
            (
                &[("transfer-encoding", "chunked"), ("transfer-encoding", "chunked")],
                400,
            ),
        ] {
            let mut pairs = vec![("host", "a")];
            pairs.extend_from_slice(te);
            assert_eq!(refused("POST", "/", v11, &pairs), status, "{te:?}");
        }
    }

    #[test]
    fn the_host_comes_from_the_target_the_field_or_the_local_address() {
        let p = peer("10.0.0.1:1");
        let host = |uri: &str, version, pairs: &[(&str, &str)]| {
            check(&parts("GET", uri, version, pairs), &p, 100).expect("accepted")
        };
        assert_eq!(
            host("http://a.example/x", Version::HTTP_11, &[("host", "b.example")]),
            "a.example"
        );
        for good in [
            "b.example:81",
            "127.0.0.1",
            "[::1]:8080",
            "[::1]",
            "xn--bcher-kva.example",
        ] {
            assert_eq!(host("/", Version::HTTP_11, &[("host", good)]), good);
        }
        assert_eq!(host("/", Version::HTTP_10, &[]), "127.0.0.1:8080");
        let absolute = parts(
            "GET",
            "http://a.example/x?y=1",
            Version::HTTP_11,
            &[("host", "b.example")],
        );
        let head = encode_request(
            &absolute,
            &p,
            &HeaderValue::from_static("a.example"),
            false,
            None,
            Framing::None,
            None,
        );
        let head = String::from_utf8(head).expect("text");
        assert!(head.starts_with("GET /x?y=1 HTTP/1.1\r\nhost: a.example\r\n"), "{head}");
        assert_eq!(head.matches("\nhost:").count(), 1, "{head}");
    }
}
