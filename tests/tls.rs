//! HTTPS and HTTP/2 at the edge, with real clients: curl (HTTP/2 and HTTP/1.1), openssl
//! s_client (the presented certificate, resumption), and a rustls client for what those two do
//! not send (WebSocket over TLS, idle handshakes, hand-made HTTP/2 frames).

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;

use support::tls::{read_to_end, tls_key, Ca, Issued};
use support::{poll_until, Corral, Options, PortHold, TestResult, DEADLINE};

fn curl(args: &[&str]) -> std::io::Result<Output> {
    Command::new("curl")
        .args(["-sS", "--max-time", "30"])
        .args(args)
        .output()
}

/// `curl` for `https://<name>:<port><path>`, trusting `ca`, `name` resolved to 127.0.0.1.
fn curl_https(ca: &Ca, name: &str, addr: SocketAddr, path: &str, args: &[&str]) -> std::io::Result<Output> {
    let resolve = format!("{name}:{}:127.0.0.1", addr.port());
    let url = format!("https://{name}:{}{path}", addr.port());
    let ca = ca.pem.to_string_lossy().into_owned();
    let mut all = vec!["--cacert", &ca, "--resolve", &resolve];
    all.extend_from_slice(args);
    all.push(&url);
    curl(&all)
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// corral with `[app.tls]` for `localhost` (and any extra keys), its CA and its files.
fn https(keys: &[&str]) -> Result<(Corral, tempfile::TempDir, Ca, Issued), Box<dyn std::error::Error>> {
    let mut options = Options::default();
    for key in keys {
        options = options.key(key);
    }
    support::tls::https(options)
}

/// `openssl s_client` against `addr` with `args`, stdin `input`; its stdout.
fn s_client(addr: SocketAddr, args: &[&str], input: &[u8]) -> std::io::Result<String> {
    let mut child = Command::new("openssl")
        .arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().expect("piped").write_all(input)?;
    let output = child.wait_with_output()?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}

/// The subject CN s_client printed for the server's certificate.
fn presented_cn(output: &str) -> Option<String> {
    let line = output.lines().find(|l| l.starts_with("subject="))?;
    let cn = line.split("CN").nth(1)?;
    Some(cn.trim_start_matches([' ', '=']).trim().to_owned())
}

#[test]
fn https_speaks_http2_and_http11_by_alpn_and_the_worker_is_told_https() -> TestResult {
    let (corral, _dir, ca, _) = https(&["hsts = \"1y\""])?;
    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let out = curl_https(
            &ca,
            "localhost",
            corral.addr,
            "/headers",
            &[flag, "-D", "-", "-w", "\nversion=%{http_version}"],
        )?;
        let body = text(&out);
        assert!(
            body.contains(&format!("version={version}")),
            "{flag}: {body}\n{}",
            corral.logs()
        );
        assert!(
            body.to_ascii_lowercase()
                .contains("strict-transport-security: max-age=31536000"),
            "{body}"
        );
        let json = body.lines().find(|l| l.starts_with('{')).ok_or("no JSON body")?;
        let seen: serde_json::Value = serde_json::from_str(json)?;
        assert_eq!(seen["x-forwarded-proto"], "https", "{flag}: the worker got {seen}");
        assert_eq!(
            seen["host"],
            format!("localhost:{}", corral.addr.port()),
            "{flag}: Host from :authority"
        );
        assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    }
    // TLS 1.2 as well as 1.3.
    let out = curl_https(
        &ca,
        "localhost",
        corral.addr,
        "/whoami",
        &["--tlsv1.2", "--tls-max", "1.2", "-o", "/dev/null", "-w", "%{http_code}"],
    )?;
    assert_eq!(text(&out), "200");
    // Plain HTTP on the TLS port is not served.
    let out = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://{}/", corral.addr),
    ])?;
    assert_ne!(text(&out), "200");
    Ok(())
}

#[test]
fn the_affinity_cookie_is_secure_and_status_shows_the_certificate() -> TestResult {
    let (corral, _dir, ca, _) = https(&["sticky = \"cookie\""])?;
    let out = curl_https(
        &ca,
        "localhost",
        corral.addr,
        "/whoami",
        &["--http2", "-D", "-", "-o", "/dev/null"],
    )?;
    let head = text(&out);
    let cookie = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie: corral_sticky="))
        .ok_or(format!("no affinity cookie in {head}"))?;
    assert!(cookie.contains("; Secure"), "{cookie}");
    let status = corral.cli(&["status"])?;
    let status = text(&status);
    assert!(status.contains("web: certificate CN=localhost, expires"), "{status}");
    Ok(())
}

#[test]
fn an_event_stream_over_http2_arrives_event_by_event() -> TestResult {
    let (corral, _dir, ca, _) = https(&[])?;
    let resolve = format!("localhost:{}:127.0.0.1", corral.addr.port());
    let mut child = Command::new("curl")
        .args(["-sS", "-N", "--http2", "--max-time", "60", "--cacert"])
        .arg(&ca.pem)
        .args(["--resolve", &resolve])
        .arg(format!("https://localhost:{}/sse", corral.addr.port()))
        .stdout(Stdio::piped())
        .spawn()?;
    let (lines, events) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(data) = line.strip_prefix("data: ") {
                if lines.send(data.to_owned()).is_err() {
                    return;
                }
            }
        }
    });
    let first: serde_json::Value = serde_json::from_str(&events.recv_timeout(DEADLINE)?)?;
    assert_eq!(first["n"], 0);
    let worker = corral
        .workers()?
        .into_iter()
        .find(|w| w["pid"] == first["pid"])
        .ok_or("the stream's worker is not in status")?;
    let port = worker["port"].as_u64().ok_or("port")? as u16;
    for n in 1..=3 {
        // Each event is released on its own; it must arrive before the next is asked for.
        support::http::get(SocketAddr::from(([127, 0, 0, 1], port)), "/sse-next")?;
        let event: serde_json::Value = serde_json::from_str(&events.recv_timeout(DEADLINE)?)?;
        assert_eq!(event["n"], n);
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(())
}

#[test]
fn sni_picks_the_certificate_whose_names_match_and_others_get_cert() -> TestResult {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new(dir.path())?;
    let main = ca.issue(dir.path(), "main", &["localhost", "a.test"])?;
    let other = ca.issue(dir.path(), "other", &["b.test", "*.b.test"])?;
    let tls = format!(
        "tls = {{ cert = {:?}, key = {:?}, extra = [{{ cert = {:?}, key = {:?} }}] }}",
        main.cert, main.key, other.cert, other.key
    );
    let corral = Corral::start(Options::default().key(&tls))?;
    let ca_file = ca.pem.to_string_lossy().into_owned();
    for (name, cn) in [
        ("a.test", "localhost"),
        ("b.test", "b.test"),
        ("x.b.test", "b.test"),
        ("unknown.test", "localhost"),
    ] {
        let out = s_client(corral.addr, &["-servername", name, "-CAfile", &ca_file], b"")?;
        assert_eq!(presented_cn(&out).as_deref(), Some(cn), "SNI {name}:\n{out}");
    }
    // A client sending an IP address as the server name (wrk does) cannot flood the log.
    for _ in 0..5 {
        let out = s_client(corral.addr, &["-servername", "127.0.0.1", "-CAfile", &ca_file], b"")?;
        assert_eq!(presented_cn(&out).as_deref(), Some("localhost"));
    }
    assert!(!corral.logs().contains("SNI"), "{}", corral.logs());
    let out = curl_https(
        &ca,
        "x.b.test",
        corral.addr,
        "/whoami",
        &["-o", "/dev/null", "-w", "%{http_code}"],
    )?;
    assert_eq!(text(&out), "200", "the extra certificate verifies for its names");
    Ok(())
}

#[test]
fn sessions_resume_by_ticket_on_tls13_and_tls12() -> TestResult {
    let (corral, dir, ca, _) = https(&[])?;
    let ca_file = ca.pem.to_string_lossy().into_owned();
    let request = b"GET /whoami HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    for version in ["-tls1_3", "-tls1_2"] {
        let session = dir.path().join(format!("session{version}.pem"));
        let session = session.to_string_lossy().into_owned();
        let base = ["-servername", "localhost", "-CAfile", &ca_file, "-ign_eof", version];
        let first = s_client(corral.addr, &[&base[..], &["-sess_out", &session]].concat(), request)?;
        assert!(first.contains("New, TLSv1."), "{version} first:\n{first}");
        let again = s_client(corral.addr, &[&base[..], &["-sess_in", &session]].concat(), request)?;
        assert!(again.contains("Reused, TLSv1."), "{version} resumed:\n{again}");
        assert!(again.contains("HTTP/1.1 200"), "{again}");
    }
    Ok(())
}

/// Reads one HTTP/1.1 response with a Content-Length body from `stream`: (head, body).
fn read_response(stream: &mut impl Read) -> std::io::Result<(String, Vec<u8>)> {
    let mut data = Vec::new();
    let mut byte = [0u8; 1];
    while !data.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        data.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&data).into_owned();
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(|v| v.trim().to_owned())
        })
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body)?;
    Ok((head, body))
}

/// A GET of `/whoami` over HTTP/2 for `localhost` answers 200.
fn assert_serves(ca: &Ca, corral: &Corral) -> TestResult {
    let out = curl_https(
        ca,
        "localhost",
        corral.addr,
        "/whoami",
        &["--http2", "-o", "/dev/null", "-w", "%{http_code}"],
    )?;
    assert_eq!(text(&out), "200", "{}", corral.logs());
    Ok(())
}

fn leaf_der(path: &Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(path).expect("cert file");
    rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .next()
        .expect("a certificate")
        .expect("PEM")
        .to_vec()
}

#[test]
fn reload_serves_a_new_certificate_to_new_handshakes_and_keeps_open_connections() -> TestResult {
    let (corral, dir, ca, issued) = https(&[])?;
    let old = leaf_der(&issued.cert);
    let mut open = ca.connect(corral.addr, "localhost", &[b"http/1.1"])?;
    let request = b"GET /whoami HTTP/1.1\r\nHost: localhost\r\n\r\n";
    open.write_all(request)?;
    assert!(read_response(&mut open)?.0.starts_with("HTTP/1.1 200"));

    // A broken new certificate is refused with its reason; the old one keeps serving.
    std::fs::write(
        &issued.cert,
        b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n",
    )?;
    let refused = corral.cli(&["reload"])?;
    assert!(!refused.status.success());
    let why = format!("{}{}", text(&refused), String::from_utf8_lossy(&refused.stderr));
    assert!(why.contains("tls.cert") && why.contains("site.pem"), "{why}");
    let fresh = ca.connect(corral.addr, "localhost", &[b"http/1.1"])?;
    assert_eq!(
        fresh.conn.peer_certificates().ok_or("no certificate")?[0].as_ref(),
        &old[..]
    );
    // So is an expired one (it would lose every client): a reload keeps the served one.
    ca.issue_with(dir.path(), "site", &["localhost"], |params| {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    })?;
    let refused = corral.cli(&["reload"])?;
    let why = format!("{}{}", text(&refused), String::from_utf8_lossy(&refused.stderr));
    assert!(!refused.status.success() && why.contains("not now"), "{why}");
    let fresh = ca.connect(corral.addr, "localhost", &[b"http/1.1"])?;
    assert_eq!(fresh.conn.peer_certificates().ok_or("certs")?[0].as_ref(), &old[..]);

    // A good one: new handshakes get it, the open connection goes on with the old one.
    let renewed = ca.issue(dir.path(), "site", &["localhost"])?;
    let new = leaf_der(&renewed.cert);
    assert_ne!(new, old);
    let reload = corral.cli(&["reload"])?;
    assert!(
        reload.status.success(),
        "{}{}",
        text(&reload),
        String::from_utf8_lossy(&reload.stderr)
    );
    poll_until(DEADLINE, "the new certificate on a new handshake", || {
        let conn = ca.connect(corral.addr, "localhost", &[b"http/1.1"]).ok()?;
        (conn.conn.peer_certificates()?[0].as_ref() == &new[..]).then_some(())
    })?;
    assert!(
        corral.logs().contains("event=certificate_reloaded"),
        "{}",
        corral.logs()
    );
    open.write_all(request)?;
    let (head, _) = read_response(&mut open)?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(open.conn.peer_certificates().ok_or("certs")?[0].as_ref(), &old[..]);

    // SIGHUP re-reads them too.
    let third = leaf_der(&ca.issue(dir.path(), "site", &["localhost"])?.cert);
    poll_until(DEADLINE, "the SIGHUP reload to be accepted", || {
        // A reload still running refuses a second one: wait for the first to end.
        let status = corral.status()?;
        (status["reloading"] == false).then_some(())
    })?;
    corral.signal(nix::sys::signal::Signal::SIGHUP)?;
    poll_until(DEADLINE, "the third certificate after SIGHUP", || {
        let conn = ca.connect(corral.addr, "localhost", &[b"http/1.1"]).ok()?;
        (conn.conn.peer_certificates()?[0].as_ref() == &third[..]).then_some(())
    })?;
    Ok(())
}

#[test]
fn a_websocket_upgrade_works_over_tls_on_http11() -> TestResult {
    let (corral, _dir, ca, _) = https(&[])?;
    let mut tls = ca.connect(corral.addr, "localhost", &[b"h2", b"http/1.1"])?;
    assert_eq!(
        tls.conn.alpn_protocol(),
        Some(&b"h2"[..]),
        "h2 is preferred when offered"
    );
    drop(tls);
    tls = ca.connect(corral.addr, "localhost", &[b"http/1.1"])?;
    tls.write_all(
        b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )?;
    let (head, _) = read_response(&mut tls)?;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut frame = [0u8; 2];
    tls.read_exact(&mut frame)?;
    assert_eq!(frame[0], 0x81, "a text frame");
    let mut text = vec![0u8; usize::from(frame[1] & 0x7f)];
    tls.read_exact(&mut text)?;
    assert!(String::from_utf8_lossy(&text).starts_with("hello "), "{text:?}");
    Ok(())
}

#[test]
fn one_deadline_covers_the_handshake_and_the_first_request_head() -> TestResult {
    let (corral, _dir, ca, _) = https(&["header_read_timeout = \"1s\""])?;
    // A TCP connection that never starts its handshake is closed.
    let mut silent = TcpStream::connect(corral.addr)?;
    silent.set_read_timeout(Some(DEADLINE))?;
    let mut buf = [0u8; 64];
    let read = silent.read(&mut buf);
    assert!(
        matches!(read, Ok(0)) || matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{read:?}"
    );
    // An HTTP/2 connection that finishes its handshake and never sends a request is too
    // (hyper's HTTP/2 server has no header timer of its own).
    let mut idle = ca.connect(corral.addr, "localhost", &[b"h2"])?;
    idle.sock.set_read_timeout(Some(DEADLINE))?;
    let rest = read_to_end(&mut idle);
    assert!(rest.len() < 1024, "only the server's settings, then the close");
    Ok(())
}

#[test]
fn http_redirect_answers_308_to_the_https_url() -> TestResult {
    let hold = PortHold::new()?;
    let redirect = hold.addr;
    hold.release();
    let (corral, _dir, _ca, _) = https(&[&format!("http_redirect = \"{redirect}\""), "hsts = \"1y\""])?;
    let out = poll_until(DEADLINE, "the redirect listener", || {
        curl(&[
            "-D",
            "-",
            "-o",
            "/dev/null",
            "-H",
            "Host: localhost",
            &format!("http://{redirect}/a/b?c=d"),
        ])
        .ok()
        .filter(|o| o.status.success())
    })?;
    let head = text(&out);
    assert!(head.starts_with("HTTP/1.1 308"), "{head}");
    let location = format!("location: https://localhost:{}/a/b?c=d", corral.addr.port());
    assert!(head.to_ascii_lowercase().contains(&location), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("strict-transport-security"),
        "no HSTS over plain HTTP"
    );
    let out = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Host: bad host",
        &format!("http://{redirect}/"),
    ])?;
    assert_eq!(text(&out), "400");
    Ok(())
}

/// Two apps on one address, each with its `hosts` and `keys`; `tls`: their certificates; `a`
/// the `default` if asked.
fn two_sites(dir: &Path, ca: Option<&Ca>, default_a: bool, keys: &str) -> Result<Corral, Box<dyn std::error::Error>> {
    let hold = PortHold::new()?;
    let addr = hold.addr;
    let fixture = support::fixture("app.js");
    let mut config = String::new();
    for (name, host) in [("a", "a.test"), ("b", "b.test")] {
        config.push_str(&format!(
            "[[app]]\nname = \"{name}\"\ncommand = [\"node\", {fixture:?}]\nlisten = \"{addr}\"\ninstances = 1\nhosts = [\"{host}\"]\nkill_timeout = \"3s\"\n"
        ));
        if default_a && name == "a" {
            config.push_str("default = true\n");
        }
        config.push_str(keys);
        config.push('\n');
        if let Some(ca) = ca {
            let issued = ca.issue(dir, name, &[host])?;
            config.push_str(&tls_key(&issued));
            config.push('\n');
        }
    }
    hold.release();
    let corral = Corral::spawn_with_config(&config, addr)?;
    poll_until(DEADLINE, "both apps online", || {
        let status = corral.status()?;
        let apps = status["apps"].as_array()?;
        apps.iter().all(|a| a["ready"] == 1).then_some(())
    })
    .map_err(|e| corral.explain(e))?;
    Ok(corral)
}

/// The pid of app `index`'s worker.
fn pid_of(corral: &Corral, index: usize) -> Option<u64> {
    corral.status()?["apps"][index]["workers"][0]["pid"].as_u64()
}

#[test]
fn sites_on_one_tls_address_are_picked_by_sni_and_host_and_a_mismatch_is_421() -> TestResult {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new(dir.path())?;
    let corral = two_sites(dir.path(), Some(&ca), false, "")?;
    for (index, name) in [(0, "a.test"), (1, "b.test")] {
        for flag in ["--http2", "--http1.1"] {
            let out = curl_https(&ca, name, corral.addr, "/whoami", &[flag])?;
            let seen: serde_json::Value =
                serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", text(&out)))?;
            assert_eq!(seen["pid"].as_u64(), pid_of(&corral, index), "{name} {flag}");
        }
    }
    let host = format!("Host: b.test:{}", corral.addr.port());
    for flag in ["--http2", "--http1.1"] {
        let out = curl_https(
            &ca,
            "a.test",
            corral.addr,
            "/whoami",
            &[flag, "-H", &host, "-o", "/dev/null", "-w", "%{http_code}"],
        )?;
        assert_eq!(text(&out), "421", "{flag}: SNI a.test, Host b.test");
    }
    // No app claims the name and none is the default: the handshake is refused.
    let out = curl_https(&ca, "c.test", corral.addr, "/whoami", &["-k"])?;
    assert!(!out.status.success(), "{}", text(&out));
    Ok(())
}

#[test]
fn http_redirect_sends_each_site_to_its_port_and_names_no_site_claims_nowhere() -> TestResult {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new(dir.path())?;
    let redirect = PortHold::new()?;
    let addr = redirect.addr;
    redirect.release();
    let corral = two_sites(dir.path(), Some(&ca), false, &format!("http_redirect = \"{addr}\""))?;
    let url = format!("http://{addr}/x?y=1");
    for (host, code) in [("a.test", "308"), ("b.test", "308"), ("evil.test", "421")] {
        let out = curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
            "-H",
            &format!("Host: {host}"),
            &url,
        ])?;
        let seen = text(&out);
        assert!(seen.starts_with(code), "{host}: {seen}");
        if code == "308" {
            assert_eq!(seen, format!("308 https://{host}:{}/x?y=1", corral.addr.port()));
        }
    }
    Ok(())
}

#[test]
fn a_handshake_without_a_server_name_is_the_default_sites_and_other_hosts_get_421() -> TestResult {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new(dir.path())?;
    let corral = two_sites(dir.path(), Some(&ca), true, "")?;
    let ask = |host: &str| {
        let request = format!("GET /whoami HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        s_client(
            corral.addr,
            &["-noservername", "-ign_eof", "-quiet"],
            request.as_bytes(),
        )
    };
    // The handshake presented a.test's certificate: a request for b.test must go elsewhere.
    let out = ask("b.test")?;
    assert!(out.contains("HTTP/1.1 421"), "{out}");
    let out = ask("a.test")?;
    assert!(out.contains("HTTP/1.1 200"), "{out}");
    let pid = pid_of(&corral, 0).ok_or("pid")?;
    assert!(out.contains(&format!("\"pid\":{pid}")), "{out}");
    Ok(())
}

#[test]
fn sites_on_one_plain_address_are_picked_by_host() -> TestResult {
    let dir = tempfile::tempdir()?;
    let corral = two_sites(dir.path(), None, false, "")?;
    for (index, host) in [(0, "a.test"), (1, "B.TEST")] {
        let out = curl(&[
            "-H",
            &format!("Host: {host}"),
            &format!("http://{}/whoami", corral.addr),
        ])?;
        let seen: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        assert_eq!(seen["pid"].as_u64(), pid_of(&corral, index), "{host}");
    }
    let out = curl(&[
        "-H",
        "Host: c.test",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://{}/", corral.addr),
    ])?;
    assert_eq!(text(&out), "421");
    Ok(())
}

/// `corral check` on a config with `tls` and `extra` lines: (success, stdout + stderr).
fn check(dir: &Path, keys: &str) -> Result<(bool, String), Box<dyn std::error::Error>> {
    let path = dir.join("check.toml");
    let fixture = support::fixture("app.js");
    std::fs::write(
        &path,
        format!("[[app]]\nname = \"web\"\ncommand = [\"node\", {fixture:?}]\nlisten = \"127.0.0.1:4443\"\n{keys}\n"),
    )?;
    let out = Command::new(support::corral_bin())
        .args(["check", "-c"])
        .arg(&path)
        .output()?;
    Ok((
        out.status.success(),
        format!("{}{}", text(&out), String::from_utf8_lossy(&out.stderr)),
    ))
}

#[test]
fn check_names_the_key_and_file_of_a_bad_certificate_and_warns_about_likely_mistakes() -> TestResult {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new(dir.path())?;
    let good = ca.issue(dir.path(), "good", &["example.test", "www.example.test"])?;
    let other = ca.issue(dir.path(), "other", &["other.test"])?;

    let mismatch = format!("tls = {{ cert = {:?}, key = {:?} }}", good.cert, other.key);
    let (ok, out) = check(dir.path(), &mismatch)?;
    assert!(
        !ok && out.contains("tls.key: ") && out.contains("other.key") && out.contains("does not match"),
        "{out}"
    );

    let missing = format!("tls = {{ cert = {:?}, key = \"nowhere.key\" }}", good.cert);
    let (ok, out) = check(dir.path(), &missing)?;
    assert!(
        !ok && out.contains("tls.key: ") && out.contains("nowhere.key: cannot read"),
        "{out}"
    );

    let expired = ca.issue_with(dir.path(), "expired", &["example.test"], |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 3, 4);
    })?;
    let shadowed = ca.issue(dir.path(), "shadowed", &["www.example.test"])?;
    let keys = format!(
        "hosts = [\"example.test\", \"api.example.test\"]\ntls = {{ cert = {:?}, key = {:?}, extra = [{{ cert = {:?}, key = {:?} }}] }}",
        expired.cert, expired.key, shadowed.cert, shadowed.key
    );
    let (ok, out) = check(dir.path(), &keys)?;
    assert!(ok, "warnings do not fail the check: {out}");
    assert!(
        out.contains("warning:") && out.contains("expired on 2021-03-04"),
        "{out}"
    );
    assert!(
        out.contains("\"api.example.test\" is not covered by any certificate"),
        "{out}"
    );

    let keys = format!(
        "tls = {{ cert = {:?}, key = {:?}, extra = [{{ cert = {:?}, key = {:?} }}] }}",
        good.cert, good.key, shadowed.cert, shadowed.key
    );
    let (ok, out) = check(dir.path(), &keys)?;
    assert!(
        ok && out.contains("tls.extra[0].cert: every name of it (www.example.test) is covered by tls.cert"),
        "{out}"
    );

    // PKCS#1 (RSA) and SEC1 (EC) keys, as openssl's -traditional writes them, are accepted.
    let sec1 = dir.path().join("sec1.key");
    let status = Command::new("openssl")
        .args(["pkey", "-traditional", "-in"])
        .arg(&good.key)
        .arg("-out")
        .arg(&sec1)
        .status()?;
    assert!(status.success());
    assert!(std::fs::read_to_string(&sec1)?.contains("BEGIN EC PRIVATE KEY"));
    let (ok, out) = check(
        dir.path(),
        &format!("tls = {{ cert = {:?}, key = {:?} }}", good.cert, sec1),
    )?;
    assert!(ok, "{out}");
    Ok(())
}

#[test]
fn an_rsa_pkcs1_key_serves() -> TestResult {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new(dir.path())?;
    let pkcs8 = dir.path().join("rsa8.key");
    let status = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&pkcs8)
        .stderr(Stdio::null())
        .status()?;
    assert!(status.success());
    let issued = ca.issue_rsa(dir.path(), "rsa", &["localhost"], &std::fs::read_to_string(&pkcs8)?)?;
    let pkcs1 = dir.path().join("rsa1.key");
    let status = Command::new("openssl")
        .args(["rsa", "-traditional", "-in"])
        .arg(&issued.key)
        .arg("-out")
        .arg(&pkcs1)
        .stderr(Stdio::null())
        .status()?;
    assert!(status.success());
    assert!(std::fs::read_to_string(&pkcs1)?.contains("BEGIN RSA PRIVATE KEY"));
    let corral =
        Corral::start(Options::default().key(&format!("tls = {{ cert = {:?}, key = {:?} }}", issued.cert, pkcs1)))?;
    assert_serves(&ca, &corral)
}

#[test]
fn pythons_ssl_module_gets_a_page_on_tls12_and_tls13() -> TestResult {
    let (corral, _dir, ca, _) = https(&[])?;
    let script = r#"
import socket, ssl, sys
port, cafile, version = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=cafile)
ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, version)
ctx.set_alpn_protocols(["http/1.1"])
with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"GET /whoami HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
        print(tls.version(), tls.selected_alpn_protocol(), data.split(b"\r\n")[0].decode())
"#;
    for (version, name) in [("TLSv1_2", "TLSv1.2"), ("TLSv1_3", "TLSv1.3")] {
        let out = Command::new("python3")
            .args(["-c", script, &corral.addr.port().to_string()])
            .arg(&ca.pem)
            .arg(version)
            .output()?;
        let said = text(&out);
        assert_eq!(
            said.trim(),
            format!("{name} http/1.1 HTTP/1.1 200 OK"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
