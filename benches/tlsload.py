"""TLS load for `compare.py --mode tls`: a throwaway certificate, and the h2load and openssl
s_time runs that measure HTTP/2 throughput and new TLS connections.

Every run here is bounded: h2load by -D or -n, s_time by -time, and each subprocess by a
timeout on top (h2load -D never ends if the server closes a connection it still wanted to use).
Load goes to 127.0.0.1 only.
"""
import re
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path


def make_cert(directory):
    """A self-signed ECDSA P-256 certificate for localhost in `directory`; (cert, key) paths."""
    cert, key = Path(directory) / "site.pem", Path(directory) / "site.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-sha256", "-nodes", "-days", "7", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)
    return cert, key


def answers_tls(port):
    """True when 127.0.0.1:port completes a TLS handshake and answers GET / with 200."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                return s.recv(64).startswith(b"HTTP/1.1 200")
    except (OSError, ssl.SSLError):
        return False


def default_client_suite(port):
    """(version, cipher suite) that an OpenSSL client with default settings (as wrk is) gets."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as s:
            return s.version(), s.cipher()[0]


def _h2load(args, timeout):
    """Runs h2load; its counts, its own elapsed seconds, and what TLS it negotiated."""
    out = subprocess.run(["h2load", *args], capture_output=True, text=True, timeout=timeout).stdout
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored, (\d+) timeout", out)
    if not m:
        raise RuntimeError(f"h2load {' '.join(args)} printed no request counts:\n{out}")
    total, _, done, succeeded, failed, errored, timeouts = (int(x) for x in m.groups())
    t = re.search(r"finished in ([\d.]+)(us|ms|s),", out)
    seconds = float(t.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[t.group(2)] if t else float("nan")
    tls = {key: (re.search(rf"^{label}: (.+)$", out, re.M) or [None, None])[1]
           for key, label in (("protocol", "TLS Protocol"), ("cipher", "Cipher"), ("kx", "Server Temp Key"),
                              ("alpn", "Application protocol"))}
    return {"succeeded": succeeded, "errors": failed + errored + timeouts + (total - done), "seconds": seconds,
            "tls": tls}


def h2_keepalive(port, seconds, clients, streams):
    """HTTP/2 keep-alive throughput: h2load -c clients -m streams for `seconds`."""
    r = _h2load(["-t2", f"-c{clients}", f"-m{streams}", f"-D{seconds}", f"https://127.0.0.1:{port}/"],
                timeout=seconds + 30)
    r["count"] = r["succeeded"]
    r["rate"] = r["succeeded"] / r["seconds"]
    return r


def full_handshakes(port, seconds, clients, loops=2):
    """New connections, each a full handshake and one HTTP/1.1 request, for about `seconds`.

    h2load makes one connection per client, and a client that has done its share of -n does not
    reconnect, so `h2load -c C -n C` is C full handshakes (a fresh TLS client each, nothing to
    resume). `loops` such runs go back to back in parallel, so that one run's start and tail
    overlap another's handshakes; the rate is all handshakes over the wall time of the loops.
    """
    deadline = time.monotonic() + seconds
    totals = {"count": 0, "errors": 0, "runs": 0, "tls": {}}
    lock = threading.Lock()
    failures = []

    def loop():
        try:
            while time.monotonic() < deadline:
                r = _h2load(["--h1", f"-c{clients}", f"-n{clients}", f"https://127.0.0.1:{port}/"], timeout=30)
                with lock:
                    totals["count"] += r["succeeded"]
                    totals["errors"] += r["errors"]
                    totals["runs"] += 1
                    totals["tls"] = r["tls"]
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            failures.append(e)

    started = time.monotonic()
    threads = [threading.Thread(target=loop, daemon=True) for _ in range(loops)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise RuntimeError(f"full handshakes: {failures[0]}")
    totals["seconds"] = time.monotonic() - started
    totals["rate"] = totals["count"] / totals["seconds"]
    return totals


def s_time_handshakes(port, seconds, processes, reuse, ciphersuite=None):
    """New connections, each with one HTTP/1.0 request, for `seconds`: `processes` parallel
    `openssl s_time`, each one connection at a time; with `reuse`, resuming a session.

    h2load cannot be told to resume (h2load 1.52 does resume by accident when a server closes
    the connection, reusing its TLS object, which is why the full handshakes above use fresh
    clients), so resumption is measured with `s_time -reuse`: one full handshake, then every
    connection resumes the session it got (TLS 1.3: the newest ticket; the response is read to
    the end, so the tickets are too). `s_time -new` is the same client without resumption.
    s_time prints `r` for each resumed connection and `*` for each full one; the `r` are counted.
    `ciphersuite`: the TLS 1.3 suite to offer alone (s_time's default order starts with
    TLS_AES_256_GCM_SHA384, h2load's with TLS_AES_128_GCM_SHA256).
    """
    cmd = ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-reuse" if reuse else "-new",
           "-time", str(seconds), "-www", "/"] + (["-ciphersuites", ciphersuite] if ciphersuite else [])
    started = time.monotonic()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(processes)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=seconds + 30))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    elapsed = time.monotonic() - started
    count = resumed = bytes_read = 0
    for out, err in outs:
        m = re.search(r"^(\d+) connections in [\d.]+s; [\d.]+ connections/user sec, bytes read (\d+)", out, re.M)
        marks = re.search(r"^(?:starting|Collecting connection statistics for \d+ seconds)\n([^\n]*)$", out, re.M)
        if not m or not marks:
            raise RuntimeError(f"{' '.join(cmd)} did not finish:\n{out[-500:]}{err[-500:]}")
        count += int(m.group(1))
        bytes_read += int(m.group(2))
        resumed += marks.group(1).count("r")
    return {"count": count, "resumed": resumed, "seconds": elapsed, "rate": count / elapsed,
            "bytes_per_conn": bytes_read / count if count else 0.0, "errors": 0}
