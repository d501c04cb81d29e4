#!/usr/bin/env python3
"""Benchmarks: corral vs nginx vs PM2 cluster mode (vs one worker direct).

Every target fronts the same Node hello-world worker (benches/hello.js). Targets are measured
interleaved, round after round, on 127.0.0.1 only, and the report gives medians over the rounds.
Every load run is bounded (wrk -d), every process started is stopped.

  python3 benches/compare.py                      # throughput: 3 rounds x 10 s, 64 conns, 2 workers
  python3 benches/compare.py --rounds 5 --targets direct,corral,nginx
  python3 benches/compare.py --mode reload        # failed requests while reloading every 3 s
  python3 benches/compare.py --mode reload-time --workers 4   # how long a rolling reload takes
  python3 benches/compare.py --connections 1000 --targets corral,nginx,haproxy,pm2   # memory
  python3 benches/compare.py --mode abuse         # legitimate load beside slowloris and aborted uploads
  python3 benches/compare.py --mode tls --rounds 5   # HTTPS and HTTP/2: corral vs nginx, handshakes
  python3 benches/compare.py --mode upgrade     # failed requests over 50 self-upgrades under load
  python3 benches/compare.py --readme             # also rewrite the matching table in README.md

Reload mode: wrk runs 30 s at fixed concurrency while the target's workers are replaced every
3 s: `corral reload`; `pm2 reload`; for nginx, what a deploy script does (start new workers,
rewrite the upstream block, `nginx -s reload`, wait 1 s, stop the old workers). It reports the
failed requests (socket errors and non-2xx) and p99 latency with and without reloads.

Reload-time mode: corral alone with --workers hello workers, idle; times `corral reload` (from the
command to its final answer) against the worker's own boot time (from exec to its first answer).

Abuse mode: corral, nginx and HAProxy (by default), each for --duration (15 s) under wrk at
--connections (64), while in the harness's own process (benches/attackers.py) --slowloris (200)
connections send a request head that never ends, one header line a second, and are re-opened when
the server closes them, and --uploads-per-s (200) uploads a second send the head of a 1,000-byte
body and 2 bytes of it, then close. The workers are benches/hello-body.js (--worker): hello.js,
but answering once the request body has been read, as an upload handler does (hello.js answers
on the head alone, so an abandoned upload would never keep a worker waiting). Every target gets
the same request-head timeout, --header-timeout (10 s, corral's `header_read_timeout` default;
nginx's `client_header_timeout`, 60 s by default, and HAProxy's `timeout http-request` are set to
it), and starts with the soft fd limit --nofile (1024, systemd's default; the hard limit is kept,
so a proxy may raise its own). It reports the legitimate requests' socket errors and non-2xx
answers (totals over the rounds), req/s, p50 and p99, what the attackers saw, and the proxy's
open fds (/proc/PID/fd, peak during the run).

TLS mode: corral and nginx, both terminating TLS with the same throwaway ECDSA P-256 certificate
(openssl, in a temp dir) in front of --workers hello workers each; nginx gets as many worker
processes as corral has shards. Each round starts both, then runs every measure on one target and
at once on the other (alternating which goes first), --duration s each: HTTPS keep-alive over
HTTP/1.1 (wrk -c--connections), HTTP/2 (h2load -c--h2-clients -m--h2-streams), full handshakes
with h2load (`-c N -n N` runs, a fresh TLS client per connection and one request each, back to
back in two loops), and full and resumed handshakes with `openssl s_time -new` / `-reuse`
(--s-time-processes in parallel, one HTTP/1.0 request per connection, offering --s-time-suite;
the share of connections that really resumed is reported). For each it gives req/s or
handshakes/s, and per request or handshake the CPU (/proc) of the proxy (user + kernel), of its
Node workers and of the load generator; and how much CPU went to processes outside the benchmark
meanwhile (others' builds). Needs h2load (nghttp2-client) and openssl.

Upgrade mode: corral, nginx, HAProxy and PM2 (by default), one after another (--rounds, default 1
here), each upgrading itself in place --upgrades times (50; PM2 --pm2-upgrades if given, as each
`pm2 update` takes seconds; no new upgrade after --upgrade-budget s, 180) under the load of
benches/httpload.py: --connections (64) keep-alive connections and --fresh (8) loops of a new
connection per request, 127.0.0.1 only, every request counted, `Connection: close` honoured as a
real client does. Each upgrade starts once the previous one is over and --upgrade-pause (0.2 s)
has passed: corral `corral upgrade -c CONFIG`, then until `corral status --json` shows
`upgrade: null` (the previous corral drained and exited); nginx (daemonized, started from its
absolute path) SIGUSR2 to the master, SIGWINCH to the old master once the new master's workers
run, SIGQUIT once the old workers are gone, until the old master exits; HAProxy (daemonized,
`stats socket ... expose-fd listeners`) `haproxy -f CFG -D -p PIDFILE -x SOCKET -sf OLD`, until
the old process exits; PM2 `pm2 update` (the daemon is killed and resurrected), until it answers
again. It reports per target the upgrades done, requests ok and failed, failed per upgrade, the
median time until the new generation serves and until the old one has exited, the successful
requests a second over the run, and the longest time without any successful answer (per upgrade,
median, and in the whole run); on stderr, every kind of failure with its phase (which step
of the upgrade was under way, and when relative to the switch). --upgrade-log FILE appends each
run's raw upgrades and failures as JSON.

With --readme, the report replaces the table between the markers of its mode in README.md
(`<!-- bench:throughput-c64 -->` ... `<!-- /bench:throughput-c64 -->`, `bench:reload`,
`bench:reload-time`, `bench:abuse`, `bench:tls`, `bench:upgrade`), headed by the date, the machine and the versions measured.

Needs wrk; nginx and PM2 are measured when available (`--install` fetches PM2 from npm into
benches/.tools). Build corral first: cargo build --release. The corral binary is --corral, else
$CORRAL_BIN, else $CARGO_TARGET_DIR/release/corral, else target/release/corral.
"""
import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import attackers
import httpload
import tlsload

ROOT = Path(__file__).resolve().parent.parent
# The worker script every target fronts; main() may pick another (--worker).
HELLO = ROOT / "benches" / "hello.js"
# The corral binary measured; main() may point it elsewhere (--corral, $CORRAL_BIN).
CORRAL = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target") / "release" / "corral"
TOOLS = ROOT / "benches" / ".tools"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, check, deadline=30.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def answers(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def cpu_seconds(pid):
    """(user, system) CPU seconds of a process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK
    except (OSError, IndexError):
        return 0.0, 0.0


def cpu_of(pids):
    times = [cpu_seconds(p) for p in pids]
    return sum(t[0] for t in times), sum(t[1] for t in times)


def rss_bytes(pid):
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError):
        return 0


def children(pid):
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]
    except OSError:
        return []


def alive(pid):
    """True while a process exists and has not exited (a zombie nobody reaped counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def read_pids(path):
    """The pids in a pid file (one or more, whitespace-separated); [] if there is none yet."""
    try:
        return [int(x) for x in Path(path).read_text().split()]
    except (OSError, ValueError):
        return []


def fd_count(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def fd_limit(soft):
    """A preexec_fn that gives the child `soft` as its soft RLIMIT_NOFILE (hard limit kept); None for no change."""
    if not soft:
        return None

    def apply():
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
    return apply


def start_worker(port, nofile=None):
    env = dict(os.environ, PORT=str(port), HOST="127.0.0.1")
    return subprocess.Popen(["node", str(HELLO)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=fd_limit(nofile))


def start_workers(count):
    """`count` hello workers on free ports, answering; as [(port, process)]."""
    ports = [free_port() for _ in range(count)]
    procs = [start_worker(p) for p in ports]
    for p in ports:
        wait_for("a worker", lambda p=p: answers(p))
    return list(zip(ports, procs))


def stop_workers(workers):
    for _, w in workers:
        w.terminate()
    for _, w in workers:
        stop_process(w, "a worker", 10)


def stop_process(proc, name, grace):
    """Waits up to `grace` s for a process told to stop; then kills it, and says so."""
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        print(f"{name} did not stop within {grace} s; killed", file=sys.stderr, flush=True)
        proc.kill()
        proc.wait(10)


class Target:
    """A proxy (or none) in front of hello workers, listening on self.port.

    header_timeout (s): the request-head timeout to configure, None for the proxy's default.
    nofile: the soft fd limit the proxy starts with, None to inherit the harness's.
    """

    name = "?"

    def proxy_pids(self):
        return []

    def worker_pids(self):
        return []

    def stop(self):
        pass


class Direct(Target):
    name = "direct (1 worker)"

    def __init__(self, workers, header_timeout=None, nofile=None):
        self.port = free_port()
        self.proc = start_worker(self.port, nofile)
        wait_for("the worker", lambda: answers(self.port))

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


class Corral(Target):
    name = "corral"

    def __init__(self, workers, header_timeout=None, nofile=None, tls=None):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="corral-bench-")
        config = Path(self.dir) / "proxy.toml"
        config.write_text(
            f'[[app]]\nname = "hello"\ncommand = ["node", "{HELLO}"]\nlisten = "127.0.0.1:{self.port}"\n'
            f"instances = {workers}\n"
            + (f'header_read_timeout = "{header_timeout}s"\n' if header_timeout else "")
            + (f'[app.tls]\ncert = "{tls[0]}"\nkey = "{tls[1]}"\n' if tls else "")
        )
        env = dict(os.environ, CORRAL_RUNTIME_DIR=self.dir, CORRAL_LOG="warn")
        # Its log goes to a file (under abuse it writes a line per failed accept); stop() sums it up.
        self.log = Path(self.dir) / "corral.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([str(CORRAL), "run", "-c", str(config)], env=env, stdout=subprocess.DEVNULL,
                                         stderr=log, preexec_fn=fd_limit(nofile))
        self.env, self.config = env, config

        def all_online():
            out = subprocess.run([str(CORRAL), "status", "--json", "-c", str(config)], env=env, capture_output=True)
            if out.returncode != 0:
                return False
            app = json.loads(out.stdout)["apps"][0]
            return app["ready"] == workers

        wait_for("corral's workers", all_online)
        wait_for("corral", lambda: (tlsload.answers_tls if tls else answers)(self.port))
        self.front = self.proc.pid  # the front process answering; another one after an upgrade

    def proxy_pids(self):
        return [self.proc.pid]

    def worker_pids(self):
        return children(self.proc.pid)

    def shards(self):
        """How many shard threads (`corral-proxy-N`) the proxy runs."""
        try:
            tasks = os.listdir(f"/proc/{self.proc.pid}/task")
        except OSError:
            return 0
        names = []
        for t in tasks:
            try:
                names.append(Path(f"/proc/{self.proc.pid}/task/{t}/comm").read_text().strip())
            except OSError:
                pass
        return sum(1 for n in names if n.startswith("corral-proxy-"))

    def reload(self):
        out = subprocess.run([str(CORRAL), "reload", "-c", str(self.config)], env=self.env, capture_output=True, text=True)
        return out.returncode == 0

    def status(self):
        """`corral status --json` of the front process answering now, None if none answers."""
        try:
            out = subprocess.run([str(CORRAL), "status", "--json", "-c", str(self.config)], env=self.env,
                                 capture_output=True, timeout=10)
            return json.loads(out.stdout) if out.returncode == 0 else None
        except (subprocess.TimeoutExpired, ValueError):
            return None

    def upgrade(self):
        """`corral upgrade` (until it exits), then until the previous corral has drained and exited,
        as `status` shows it (`upgrade` null): a new upgrade is refused as busy before that."""
        old = self.front
        started = time.monotonic()
        out = subprocess.run([str(CORRAL), "upgrade", "-c", str(self.config)], env=self.env, capture_output=True,
                             text=True, timeout=180)
        switched = time.monotonic()
        ok = out.returncode == 0

        def settled():
            status = self.status()
            if status is None or status.get("upgrade") is not None:
                return False
            self.front = status["pid"]
            return not ok or not alive(old)

        wait_for("the previous corral to drain and exit", settled, deadline=120)
        ended = time.monotonic()
        if ok and self.front == old:
            ok = False
        return {"ok": ok, "error": "" if ok else (out.stdout + out.stderr).strip() or f"exit {out.returncode}",
                "marks": [(started, "`corral upgrade` running"), (switched, "the old corral draining")],
                "end": ended}

    def stop(self):
        # After an upgrade the front process is no longer our child: the first one exited.
        front = getattr(self, "front", self.proc.pid)
        if front != self.proc.pid:
            os.kill(front, signal.SIGTERM)
            try:
                wait_for("the upgraded corral to stop", lambda: not alive(front), deadline=30)
            except RuntimeError:
                print(f"corral pid {front} did not stop within 30 s; killed", file=sys.stderr, flush=True)
                os.kill(front, signal.SIGKILL)
        else:
            self.proc.send_signal(signal.SIGTERM)
        stop_process(self.proc, "corral", 30)
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        if lines:
            print(f"corral logged {len(lines)} lines; the last ones:", *lines[-3:], sep="\n  ", file=sys.stderr)
        shutil.rmtree(self.dir, ignore_errors=True)


class Nginx(Target):
    name = "nginx"
    # Daemonized (`daemon on`), for --mode upgrade: nginx ignores SIGUSR2 while its parent is the
    # one it started with and SIGWINCH unless daemonized, so the binary upgrade needs this.
    daemon = False

    def __init__(self, workers, header_timeout=None, nofile=None, tls=None, processes=None, keepalive=64):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="nginx-bench-")
        self.count = workers
        self.header_timeout = header_timeout
        self.tls, self.processes, self.keepalive = tls, processes, keepalive
        self.workers = start_workers(workers)
        self.conf = Path(self.dir) / "nginx.conf"
        self.write_conf()
        # An absolute path: a binary upgrade (SIGUSR2) execs the master's argv[0].
        self.binary = shutil.which("nginx") or "nginx"
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf), "-p", self.dir], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=fd_limit(nofile))
        if self.daemon:
            self.proc.wait(30)  # the foreground process exits once the master runs
            wait_for("nginx's pid file", self.master)
        wait_for("nginx", lambda: (tlsload.answers_tls if tls else answers)(self.port))

    def master(self):
        """The master's pid from the pid file, None before it is written."""
        pids = read_pids(Path(self.dir) / "nginx.pid")
        return pids[0] if pids else None

    def listen(self):
        """The server block's listen directive(s), with TLS and HTTP/2 when self.tls is set."""
        if not self.tls:
            return f"    listen 127.0.0.1:{self.port} reuseport;\n"
        cert, key = self.tls
        # `http2 on;` exists from nginx 1.25.1; before it, HTTP/2 is a parameter of `listen`.
        new_syntax = nginx_version() >= (1, 25, 1)
        return (f"    listen 127.0.0.1:{self.port} ssl{'' if new_syntax else ' http2'} reuseport;\n"
                + ("    http2 on;\n" if new_syntax else "")
                + f"    ssl_certificate {cert};\n    ssl_certificate_key {key};\n"
                  "    ssl_protocols TLSv1.2 TLSv1.3;\n"
                  "    ssl_session_cache shared:SSL:10m;\n"
                  "    ssl_session_tickets on;\n"
                  # nginx closes a connection after 1,000 requests by default (HTTP/1.1 and
                  # HTTP/2); h2load -D does not reconnect, so its connections would just stop.
                  "    keepalive_requests 1000000;\n")

    def write_conf(self):
        servers = "".join(f"    server 127.0.0.1:{p};\n" for p, _ in self.workers)
        head_timeout = f"  client_header_timeout {self.header_timeout}s;\n" if self.header_timeout else ""
        self.conf.write_text(f"""daemon {"on" if self.daemon else "off"};
worker_processes {self.processes or "auto"};
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
{head_timeout}  upstream hello {{
{servers}    keepalive {self.keepalive};
  }}
  server {{
{self.listen()}    location / {{
      proxy_pass http://hello;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
""")

    def proxy_pids(self):
        master = self.master() if self.daemon else self.proc.pid
        return [master] + children(master) if master else []

    def worker_pids(self):
        return [w.pid for _, w in self.workers]

    def upgrade(self):
        """The documented binary upgrade: SIGUSR2 to the master (a new master starts from the same
        binary with the listening sockets inherited, the old pid file becomes nginx.pid.oldbin),
        SIGWINCH to the old master once the new one's workers run (its workers finish their
        connections and exit), SIGQUIT to the old master once they are gone."""
        old = self.master()
        oldbin = Path(self.dir) / "nginx.pid.oldbin"
        count = len(children(old))
        started = time.monotonic()
        os.kill(old, signal.SIGUSR2)

        def new_master_up():
            new = self.master()
            return new not in (None, old) and read_pids(oldbin) == [old] and len(children(new)) >= count

        wait_for("the new nginx master and its workers", new_master_up, deadline=60)
        new = self.master()
        switched = time.monotonic()
        os.kill(old, signal.SIGWINCH)
        wait_for("the old nginx workers to exit", lambda: not set(children(old)) - {new}, deadline=120)
        quit_at = time.monotonic()
        os.kill(old, signal.SIGQUIT)
        wait_for("the old nginx master to exit", lambda: not alive(old), deadline=60)
        return {"ok": True, "error": "", "end": time.monotonic(),
                "marks": [(started, "USR2, until the new master's workers run"),
                          (switched, "WINCH, until the old workers exit"),
                          (quit_at, "QUIT, until the old master exits")]}

    def reload(self):
        old = self.workers
        self.workers = start_workers(self.count)
        self.write_conf()
        ok = subprocess.run(["nginx", "-c", str(self.conf), "-p", self.dir, "-s", "reload"], capture_output=True).returncode == 0
        time.sleep(1)
        stop_workers(old)
        return ok

    def stop(self):
        if self.daemon:
            master = self.master()
            if master:
                os.kill(master, signal.SIGQUIT)
                try:
                    wait_for("nginx to stop", lambda: not alive(master), deadline=30)
                except RuntimeError:
                    print(f"nginx master {master} did not stop within 30 s; killed", file=sys.stderr, flush=True)
                    for pid in [master] + children(master):
                        os.kill(pid, signal.SIGKILL)
        else:
            self.proc.send_signal(signal.SIGQUIT)
            stop_process(self.proc, "nginx", 30)
        stop_workers(self.workers)
        shutil.rmtree(self.dir, ignore_errors=True)


class Haproxy(Target):
    name = "haproxy"
    # Daemonized with a pid file and a stats socket that passes the listeners on (`expose-fd
    # listeners`), for --mode upgrade: the seamless reload `haproxy -sf OLD -x SOCKET`.
    daemon = False
    # `option idle-close-on-response` (HAProxy 2.6+, off by default): a stopping process answers
    # the next request on an idle keep-alive connection (with `Connection: close`) instead of
    # closing the connection under it. --haproxy-idle-close sets it.
    idle_close = False

    def __init__(self, workers, header_timeout=None, nofile=None):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="haproxy-bench-")
        self.workers = start_workers(workers)
        servers = "".join(f"    server w{i} 127.0.0.1:{p}\n" for i, (p, _) in enumerate(self.workers))
        head_timeout = f"    timeout http-request {header_timeout}s\n" if header_timeout else ""
        conf = Path(self.dir) / "haproxy.cfg"
        self.conf, self.pidfile, self.sock = conf, Path(self.dir) / "haproxy.pid", Path(self.dir) / "stats.sock"
        stats = f"    stats socket {self.sock} mode 600 level admin expose-fd listeners\n" if self.daemon else ""
        conf.write_text(f"""global
    nbthread {os.cpu_count()}
    maxconn 4096
{stats}defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
{head_timeout}    option http-keep-alive
{"    option idle-close-on-response" + chr(10) if self.idle_close else ""}    http-reuse always
frontend web
    bind 127.0.0.1:{self.port}
    default_backend app
backend app
    balance roundrobin
{servers}""")
        command = ["haproxy", "-D", "-p", str(self.pidfile)] if self.daemon else ["haproxy", "-W", "-db"]
        self.proc = subprocess.Popen(command + ["-f", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=fd_limit(nofile))
        if self.daemon:
            self.proc.wait(30)  # the foreground process exits once the daemon runs
            wait_for("haproxy's pid file", lambda: read_pids(self.pidfile))
        wait_for("haproxy", lambda: answers(self.port))

    def proxy_pids(self):
        if self.daemon:
            return read_pids(self.pidfile)
        return [self.proc.pid] + children(self.proc.pid)

    def upgrade(self):
        """The seamless reload: a new haproxy takes the listening sockets from the running one over
        its stats socket (-x), then tells it to finish its connections and exit (-sf)."""
        old = read_pids(self.pidfile)
        started = time.monotonic()
        out = subprocess.run(["haproxy", "-f", str(self.conf), "-D", "-p", str(self.pidfile), "-x", str(self.sock),
                              "-sf", *map(str, old)], capture_output=True, text=True, timeout=60)
        switched = time.monotonic()
        ok = out.returncode == 0 and read_pids(self.pidfile) not in ([], old)
        if ok:
            wait_for("the old haproxy to exit", lambda: not any(alive(p) for p in old), deadline=120)
        return {"ok": ok, "error": "" if ok else (out.stdout + out.stderr).strip() or f"exit {out.returncode}",
                "end": time.monotonic(),
                "marks": [(started, "`haproxy -sf -x` running"), (switched, "the old process finishing")]}

    def stop(self):
        if self.daemon:
            pids = read_pids(self.pidfile)
            for pid in pids:
                os.kill(pid, signal.SIGUSR1)
            try:
                wait_for("haproxy to stop", lambda: not any(alive(p) for p in pids), deadline=10)
            except RuntimeError:
                print("haproxy did not stop within 10 s; killed", file=sys.stderr, flush=True)
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
        else:
            self.proc.send_signal(signal.SIGUSR1)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        stop_workers(self.workers)
        shutil.rmtree(self.dir, ignore_errors=True)


class Pm2(Target):
    name = "pm2 cluster"

    def __init__(self, workers, header_timeout=None, nofile=None):
        self.port = free_port()
        self.home = tempfile.mkdtemp(prefix="pm2-bench-")
        self.env = dict(os.environ, PM2_HOME=self.home, PORT=str(self.port), HOST="127.0.0.1")
        self.pm2 = str(pm2_binary())
        subprocess.run([self.pm2, "start", str(HELLO), "-i", str(workers), "--name", "hello"], env=self.env, check=True,
                       capture_output=True, preexec_fn=fd_limit(nofile))
        wait_for("pm2", lambda: answers(self.port))

    def proxy_pids(self):
        try:
            return [int((Path(self.home) / "pm2.pid").read_text().strip())]
        except (OSError, ValueError):
            return []

    def reload(self):
        return subprocess.run([self.pm2, "reload", "hello"], env=self.env, capture_output=True).returncode == 0

    def upgrade(self):
        """`pm2 update`: saves the process list, kills the daemon (and with it the workers and the
        listening socket the daemon holds in cluster mode), starts a new daemon and resurrects."""
        started = time.monotonic()
        out = subprocess.run([self.pm2, "update"], env=self.env, capture_output=True, text=True, timeout=120)
        switched = time.monotonic()
        ok = out.returncode == 0
        wait_for("pm2 to answer again", lambda: answers(self.port), deadline=60)
        return {"ok": ok, "error": "" if ok else (out.stdout + out.stderr).strip() or f"exit {out.returncode}",
                "end": time.monotonic(),
                "marks": [(started, "`pm2 update` running"), (switched, "until it answers again")]}

    def stop(self):
        subprocess.run([self.pm2, "kill"], env=self.env, capture_output=True)
        shutil.rmtree(self.home, ignore_errors=True)


def pm2_binary():
    return TOOLS / "node_modules" / ".bin" / "pm2"


def nginx_version():
    """The installed nginx's version as a tuple, (0,) if unknown."""
    m = re.search(r"nginx/(\d+(?:\.\d+)*)", first_line(["nginx", "-v"]) or "")
    return tuple(int(x) for x in m.group(1).split(".")) if m else (0,)


TARGETS = {"direct": Direct, "corral": Corral, "nginx": Nginx, "haproxy": Haproxy, "pm2": Pm2}


class NginxDaemon(Nginx):
    daemon = True


class HaproxyDaemon(Haproxy):
    daemon = True


# --mode upgrade: the targets as they are started to be upgraded in place.
UPGRADE_TARGETS = {"corral": Corral, "nginx": NginxDaemon, "haproxy": HaproxyDaemon, "pm2": Pm2}


def run_wrk(port, duration, connections, sample_pids, on_sample=None, scheme="http"):
    """wrk against 127.0.0.1:port; samples the RSS of sample_pids() (and calls on_sample()) every 0.25 s."""
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.wait(0.25):
            peak[0] = max(peak[0], sum(rss_bytes(p) for p in sample_pids()))
            if on_sample:
                on_sample()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", f"{scheme}://127.0.0.1:{port}/"],
        capture_output=True, text=True, timeout=duration + 60,
    ).stdout
    done.set()
    sampler.join()

    def latency(pct):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        value, unit = float(m.group(1)), m.group(2)
        return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    sockets = {kind: int(n) for kind, n in re.findall(r"(connect|read|write|timeout) (\d+)", out)}
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    non2xx = int(m.group(1)) if m else 0
    result = {"rps": rps, "p50": latency(50), "p99": latency(99), "errors": sum(sockets.values()) + non2xx,
              "non2xx": non2xx, "requests": total, "peak_rss": peak[0]}
    result.update({kind: sockets.get(kind, 0) for kind in ("connect", "read", "write", "timeout")})
    return result


def measure(cls, args):
    target = cls(args.workers)
    try:
        time.sleep(0.5)
        idle = sum(rss_bytes(p) for p in target.proxy_pids())
        run_wrk(target.port, 2, args.connections, lambda: [])  # warm-up: JIT, pools
        user_before, sys_before = cpu_of(target.proxy_pids())
        result = run_wrk(target.port, args.duration, args.connections, target.proxy_pids)
        user_after, sys_after = cpu_of(target.proxy_pids())
        result["idle_rss"] = idle
        per_req = (1e6 / result["requests"]) if target.proxy_pids() and result["requests"] else float("nan")
        result["user_us_per_req"] = (user_after - user_before) * per_req
        result["sys_us_per_req"] = (sys_after - sys_before) * per_req
        result["cpu_us_per_req"] = result["user_us_per_req"] + result["sys_us_per_req"]
        return result
    finally:
        target.stop()


def measure_reloads(cls, args):
    """wrk for args.duration without reloads, then for args.reload_duration while reloading."""
    target = cls(args.workers)
    try:
        run_wrk(target.port, 2, args.connections, lambda: [])
        base = run_wrk(target.port, args.duration, args.connections, lambda: [])
        stop = threading.Event()
        outcomes = []

        def reloader():
            while not stop.wait(args.reload_every):
                outcomes.append(target.reload())

        thread = threading.Thread(target=reloader, daemon=True)
        thread.start()
        loaded = run_wrk(target.port, args.reload_duration, args.connections, lambda: [])
        stop.set()
        thread.join()
        return {
            "reloads": len(outcomes),
            "reload_failures": outcomes.count(False),
            "errors": loaded["errors"],
            "requests": loaded["requests"],
            "p99_base": base["p99"],
            "p99_reload": loaded["p99"],
            "rps_reload": loaded["rps"],
        }
    finally:
        target.stop()


def upgrade_limit(name, args):
    """How many upgrades a target gets: --upgrades, or --pm2-upgrades for PM2 when given (each
    `pm2 update` takes seconds)."""
    return args.pm2_upgrades if name == "pm2" and args.pm2_upgrades is not None else args.upgrades


def upgrade_gap(result, u):
    """The longest stretch with no successful answer that began during upgrade u or within
    0.5 s after it ended, s (0 if none reached httpload.GAP)."""
    begin, end = u["marks"][0][0], u["end"] + 0.5
    return max((length for t, length in result["gaps"] if begin <= t <= end), default=0.0)


def measure_upgrades(name, args):
    """The load of httpload.Load while the target upgrades itself again and again: up to
    upgrade_limit() upgrades, each started once the previous one is over, with --upgrade-pause s
    between them, and no new one after --upgrade-budget s."""
    target = UPGRADE_TARGETS[name](args.workers)
    load = None
    try:
        warm = httpload.Load(target.port, keepalive=args.connections, fresh=args.fresh, max_seconds=10)
        warm.start()
        time.sleep(2)  # warm-up: JIT, pools
        warm.stop()
        load = httpload.Load(target.port, keepalive=args.connections, fresh=args.fresh,
                             max_seconds=args.upgrade_budget + 300)
        load.start()
        time.sleep(1)
        limit, upgrades = upgrade_limit(name, args), []
        began = time.monotonic()
        while len(upgrades) < limit and time.monotonic() - began < args.upgrade_budget:
            upgrades.append(target.upgrade())
            u = upgrades[-1]
            if not u["ok"]:
                print(f"  {name} upgrade {len(upgrades)} failed: {u['error']}", file=sys.stderr, flush=True)
            time.sleep(args.upgrade_pause)
        time.sleep(1)
        result = load.stop()
        load = None
        result["upgrades"] = upgrades
        result["limit"] = limit
        result["seconds"] = time.monotonic() - began
        return result
    finally:
        if load is not None:
            load.stop()
        target.stop()


def phase_of(t, upgrades):
    """(the phase a failure at monotonic time t fell in, s since that upgrade's start, s since
    its second mark (the switch) or None). Upgrades run one after another: t belongs to the last
    one started by then."""
    started = [u for u in upgrades if u["marks"][0][0] <= t]
    if not started:
        return "before the first upgrade", None, None
    u = started[-1]
    marks = u["marks"]
    switch = marks[1][0] if len(marks) > 1 else None
    since = (t - marks[0][0], (t - switch) if switch is not None else None)
    if t <= u["end"]:
        return [m[1] for m in marks if m[0] <= t][-1], *since
    if t <= u["end"] + 0.5:
        return "within 0.5 s after the upgrade ended", *since
    return "between upgrades", None, None


def describe_failures(result):
    """Failures grouped by (how, connection kind, phase), largest first, each with when it happened."""
    groups = {}
    for t, how, kind in result["failures"]:
        phase, since_start, since_switch = phase_of(t, result["upgrades"])
        groups.setdefault((how, kind, phase), []).append((since_start, since_switch))
    out = []
    for (how, kind, phase), items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        when = ""
        switch = sorted(x[1] for x in items if x[1] is not None)
        start = sorted(x[0] for x in items if x[0] is not None)
        if switch:
            when = f", {switch[0]:+.3f} to {switch[-1]:+.3f} s from the switch (median {statistics.median(switch):+.3f})"
        elif start:
            when = f", {start[0]:.3f} to {start[-1]:.3f} s into the upgrade"
        out.append(f"{len(items)} x {kind}: {how} [{phase}{when}]")
    stored = len(result["failures"])
    if stored < result["failed"]:
        out.append(f"(phases of the first {stored} failures only; {result['failed']} in all)")
    return out


def upgrade_report(names, args):
    upgradable = [n for n in names if n in UPGRADE_TARGETS]
    for n in sorted(set(names) - set(upgradable)):
        print(f"skipping {n} in upgrade mode: nothing to upgrade", file=sys.stderr)
    runs = {n: [] for n in upgradable}
    for r in range(args.rounds):
        order = upgradable[r % len(upgradable):] + upgradable[: r % len(upgradable)]
        for name in order:
            result = measure_upgrades(name, args)
            runs[name].append(result)
            done = sum(u["ok"] for u in result["upgrades"])
            print(f"round {r + 1} {name:>7}: {done} of {len(result['upgrades'])} upgrades ok in "
                  f"{result['seconds']:.0f} s, {result['ok']} requests ok, {result['failed']} failed, "
                  f"longest gap {result['max_gap'] * 1000:.0f} ms, {result['closes_honoured']} Connection: close "
                  f"honoured", file=sys.stderr, flush=True)
            if result["max_gap_at"] is not None:
                phase, since_start, since_switch = phase_of(result["max_gap_at"] - result["max_gap"], result["upgrades"])
                where = f", {since_switch:+.3f} s from the switch" if since_switch is not None else ""
                print(f"    the longest gap began in: {phase}{where}", file=sys.stderr, flush=True)
            for line in describe_failures(result)[:12]:
                print(f"    {line}", file=sys.stderr, flush=True)
            if args.upgrade_log:
                with open(args.upgrade_log, "a") as log:
                    log.write(json.dumps({"target": name, "round": r + 1, **result}) + "\n")

    def total(name, key):
        return sum(r[key] for r in runs[name])

    def upgrades(name):
        return [u for r in runs[name] for u in r["upgrades"]]

    rows, notes = [], []
    for n in upgradable:
        ups = upgrades(n)
        done = [u for u in ups if u["ok"]]
        serving = [u["marks"][1][0] - u["marks"][0][0] for u in done]
        whole = [u["end"] - u["marks"][0][0] for u in done]
        gaps = [upgrade_gap(r, u) for r in runs[n] for u in r["upgrades"]]
        failed = total(n, "failed")
        rows.append([TARGETS[n].name, f"{len(done)}" + (f" of {len(ups)}" if len(done) != len(ups) else ""),
                     total(n, "ok"), failed, f"{failed / len(done):.1f}" if done else "-",
                     f"{total(n, 'ok') / total(n, 'seconds'):.0f}",
                     f"{statistics.median(serving) * 1000:.0f}" if serving else "-",
                     f"{statistics.median(whole) * 1000:.0f}" if whole else "-",
                     f"{statistics.median(gaps) * 1000:.0f} / {max(r['max_gap'] for r in runs[n]) * 1000:.0f}"
                     if gaps else "-"])
        wanted = args.rounds * upgrade_limit(n, args)
        if len(ups) < wanted:
            notes.append(f"- {TARGETS[n].name}: {len(ups)} upgrades instead of {wanted}: the {args.upgrade_budget} s "
                         f"budget per run was spent")
        elif n == "pm2" and upgrade_limit(n, args) != args.upgrades:
            notes.append(f"- {TARGETS[n].name}: {upgrade_limit(n, args)} upgrades per run instead of {args.upgrades} "
                         f"(--pm2-upgrades: each `pm2 update` takes seconds)")
        refused = [u["error"] for u in ups if not u["ok"]]
        if refused:
            notes.append(f"- {TARGETS[n].name}: {len(refused)} upgrades failed; the first said: "
                         + refused[0].replace("\n", " / ")[:300])
        kinds = {}
        for r in runs[n]:
            for k, v in r["kinds"].items():
                kinds[k] = kinds.get(k, 0) + v
        if kinds:
            notes.append(f"- {TARGETS[n].name}, how requests failed: "
                         + "; ".join(f"{v} {k}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
    what = {"corral": "`corral upgrade`", "nginx": "USR2 / WINCH / QUIT",
            "haproxy": "`haproxy -sf PID -x SOCKET`" + (" with `option idle-close-on-response`"
                                                         if HaproxyDaemon.idle_close else ""),
            "pm2": "`pm2 update`"}
    lines = header(upgradable, (
        f"{args.rounds} round(s); each target with {args.workers} Node hello workers upgrades itself up to "
        f"{args.upgrades} times in a row ("
        + ", ".join(f"{TARGETS[n].name} {what[n]}" for n in upgradable)
        + f"), each once the previous one is over (the old generation exited) plus {args.upgrade_pause} s, under "
          f"`benches/httpload.py` load: {args.connections} keep-alive connections and {args.fresh} loops of a new "
          f"connection per request, honouring `Connection: close`, each failed request counted (a failed loop "
          f"waits 10 ms before its next try). From each upgrade's start: until the new generation serves "
          f"(corral: the command exits; nginx: the new master's workers run; HAProxy: the command exits; PM2: `pm2 "
          f"update` exits), and until the old generation has exited; the longest time with no successful answer "
          f"on any connection, per upgrade (median) and in the whole run. Counts are totals; times are medians:"))
    lines += table(["target", "upgrades done", "requests ok", "requests failed", "failed per upgrade",
                    "ok req/s over the run", "new one serves after, ms", "old one gone after, ms",
                    "longest time without an answer, ms: per upgrade (median) / in the run"], rows)
    if notes:
        lines += [""] + notes
    return "upgrade", lines


def measure_abuse(cls, args):
    """wrk at args.connections for args.duration while slowloris connections and aborted uploads run."""
    target = cls(args.workers, header_timeout=args.header_timeout, nofile=args.nofile)
    try:
        run_wrk(target.port, 2, args.connections, lambda: [])  # warm-up: JIT, pools
        fds_idle = sum(fd_count(p) for p in target.proxy_pids())
        attack = attackers.Attack(target.port, slowloris=args.slowloris, uploads_per_s=args.uploads_per_s,
                                  line_every=1.0, max_seconds=args.duration + 90)
        peak = {"fds": fds_idle}
        sl_open = []  # slowloris connections open, every 0.25 s during the wrk run

        def sample():
            peak["fds"] = max(peak["fds"], sum(fd_count(p) for p in target.proxy_pids()))
            sl_open.append(attack.open)

        attack.start()
        try:
            sl_open_start = attack.open
            result = run_wrk(target.port, args.duration, args.connections, target.proxy_pids, sample)
        finally:
            result_attack = attack.stop()
        result.update(result_attack)
        result["fds_idle"], result["fds_peak"] = fds_idle, peak["fds"]
        result["sl_open_start"] = sl_open_start
        result["sl_open_min"] = min(sl_open, default=sl_open_start)
        result["sl_open_mean"] = statistics.mean(sl_open) if sl_open else float(sl_open_start)
        return result
    finally:
        target.stop()


def run_rounds(names, args, measure_one, describe):
    """Measures every target once per round, rotating the order; returns a median getter.

    The median leaves out the rounds where a value is NaN (not measured); all NaN gives NaN.
    """
    results = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            result = measure_one(TARGETS[name], args)
            results[name].append(result)
            print(f"round {r + 1} {name:>7}: {describe(result)}", file=sys.stderr, flush=True)

    def med(name, key):
        values = [r[key] for r in results[name] if r[key] == r[key]]
        return statistics.median(values) if values else float("nan")
    return med


def first_line(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else None


def versions(names):
    """What was measured, as short version strings."""
    found = []
    rev = first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    found.append(f"corral {rev}" if rev else "corral")
    if "nginx" in names:
        m = re.search(r"nginx/(\S+)", first_line(["nginx", "-v"]) or "")
        found.append(f"nginx {m.group(1)}" if m else "nginx")
    if "haproxy" in names:
        m = re.search(r"version (\S+)", first_line(["haproxy", "-v"]) or "")
        found.append(f"HAProxy {m.group(1)}" if m else "HAProxy")
    if "pm2" in names:
        try:
            found.append("PM2 " + json.loads((TOOLS / "node_modules" / "pm2" / "package.json").read_text())["version"])
        except (OSError, ValueError, KeyError):
            found.append("PM2")
    found.append("Node " + (first_line(["node", "--version"]) or "?").lstrip("v"))
    m = re.search(r"wrk (\S+)", first_line(["wrk", "-v"]) or "")
    found.append(f"wrk {m.group(1)}" if m else "wrk")
    return ", ".join(found)


def machine():
    model = "unknown CPU"
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        model = m.group(1).strip() if m else model
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({model}), Linux {os.uname().release}"


def header(names, what):
    return [f"{time.strftime('%Y-%m-%d')}; {machine()}; {versions(names)}.", "", what, ""]


def table(columns, rows):
    """A Markdown table; the first column is left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def reload_report(names, args):
    med = run_rounds(names, args, measure_reloads, lambda r: (
        f"{r['reloads']} reloads ({r['reload_failures']} failed), {r['errors']} failed requests of {r['requests']}, "
        f"p99 {r['p99_base']:.2f} ms -> {r['p99_reload']:.2f} ms"))

    lines = header(names, f"{args.rounds} rounds; wrk -c{args.connections} for {args.reload_duration} s with a reload every "
                          f"{args.reload_every} s ({args.workers} Node hello workers); medians:")
    lines += table(
        ["target", "reloads", "failed requests", "of requests", "p99 ms without reloads", "p99 ms during reloads"],
        [[TARGETS[n].name, f"{med(n, 'reloads'):.0f}", f"{med(n, 'errors'):.0f}", f"{med(n, 'requests'):.0f}",
          f"{med(n, 'p99_base'):.2f}", f"{med(n, 'p99_reload'):.2f}"] for n in names])
    return "reload", lines


def boot_seconds():
    """How long one hello worker takes from exec to its first answer."""
    port = free_port()
    started = time.monotonic()
    proc = start_worker(port)
    try:
        wait_for("a worker", lambda: answers(port), deadline=30.0)
        return time.monotonic() - started
    finally:
        proc.terminate()
        proc.wait(10)


def reload_time_report(args):
    """corral alone: wall time of `corral reload` of args.workers idle workers vs one worker's boot."""
    reloads, boots = [], []
    for r in range(args.rounds):
        boots.append(boot_seconds())
        target = Corral(args.workers)
        try:
            for _ in range(5):
                started = time.monotonic()
                if not target.reload():
                    raise RuntimeError("corral reload failed")
                reloads.append(time.monotonic() - started)
        finally:
            target.stop()
        print(f"round {r + 1}: boot {boots[-1] * 1000:.0f} ms, reloads "
              + ", ".join(f"{x * 1000:.0f}" for x in reloads[-5:]) + " ms", file=sys.stderr, flush=True)
    boot, reload = statistics.median(boots), statistics.median(reloads)
    lines = header(["corral"], f"{args.rounds} rounds x 5 reloads of {args.workers} idle Node hello workers; medians:")
    lines += table(
        ["workers", "one worker's boot (exec to first answer)", "`corral reload` (command to answer)", "slowest reload",
         "reload minus boot"],
        [[args.workers, f"{boot * 1000:.0f} ms", f"{reload * 1000:.0f} ms", f"{max(reloads) * 1000:.0f} ms",
          f"{(reload - boot) * 1000:.0f} ms"]])
    return "reload-time", lines


def throughput_report(names, args):
    med = run_rounds(names, args, measure, lambda r: (
        f"{r['rps']:9.0f} req/s  p50 {r['p50']:.2f} ms  p99 {r['p99']:.2f} ms  errors {r['errors']}  "
        f"cpu {r['user_us_per_req']:.1f}+{r['sys_us_per_req']:.1f} us/req  rss idle {r['idle_rss'] / 2**20:.1f} MB  "
        f"peak {r['peak_rss'] / 2**20:.1f} MB"))

    def cell(name, key, scale=1.0, fmt="{:.1f}"):
        value = med(name, key)
        return "-" if value != value or (name == "direct" and "rss" in key) else fmt.format(value * scale)

    lines = header(names, f"{args.rounds} rounds x {args.duration} s, wrk -t2 -c{args.connections}, {args.workers} Node "
                          f"hello workers; medians:")
    lines += table(
        ["target", "req/s", "p50 ms", "p99 ms", "errors", "proxy CPU µs/req", "of which kernel", "proxy RSS idle MB",
         "proxy RSS peak MB"],
        [[TARGETS[n].name, f"{med(n, 'rps'):.0f}", f"{med(n, 'p50'):.2f}", f"{med(n, 'p99'):.2f}", int(med(n, 'errors')),
          cell(n, 'cpu_us_per_req'), cell(n, 'sys_us_per_req'), cell(n, 'idle_rss', 2**-20), cell(n, 'peak_rss', 2**-20)]
         for n in names])
    if "corral" in names:
        lines.append("")
        for other in ("nginx", "haproxy"):
            if other in names:
                lines.append(f"- corral / {TARGETS[other].name}: throughput {med('corral', 'rps') / med(other, 'rps'):.2f}x, "
                             f"proxy CPU per request {med('corral', 'cpu_us_per_req') / med(other, 'cpu_us_per_req'):.2f}x")
        if "pm2" in names:
            # PM2's daemon hands whole connections to workers: it does no per-request work.
            lines.append(f"- corral / {TARGETS['pm2'].name}: throughput {med('corral', 'rps') / med('pm2', 'rps'):.2f}x, "
                         f"front process RSS at peak {med('corral', 'peak_rss') / med('pm2', 'peak_rss'):.2f}x")
        if "direct" in names:
            lines.append(f"- p99 added by corral vs one worker direct: {med('corral', 'p99') - med('direct', 'p99'):+.2f} ms")
    return f"throughput-c{args.connections}", lines


def abuse_report(names, args):
    runs = {}  # display name -> every round's result, for the error totals

    def measure_one(cls, args):
        result = measure_abuse(cls, args)
        runs.setdefault(cls.name, []).append(result)
        return result

    med = run_rounds(names, args, measure_one, lambda r: (
        f"{r['rps']:7.0f} req/s  p50 {r['p50']:.2f} ms  p99 {r['p99']:.2f} ms  errors {r['errors']} "
        f"(connect {r['connect']} read {r['read']} write {r['write']} timeout {r['timeout']} non-2xx {r['non2xx']}) | "
        f"slowloris open {r['sl_open_start']} at start, {r['sl_open_mean']:.0f} mean, {r['sl_open_min']} fewest, "
        f"{r['sl_opened']} opened, "
        f"{r['sl_closed']} closed by server after {r['sl_close_median_s']:.1f} s median ({r['sl_close_max_s']:.1f} max), "
        f"answers {r['sl_answers']}, {r['sl_connect_failed']} connects failed | uploads {r['up_sent']} sent, "
        f"{r['up_failed']} connects failed, {r['up_skipped']} skipped | proxy fds {r['fds_idle']} -> {r['fds_peak']}"))

    def total(name, key):
        return sum(r[key] for r in runs[TARGETS[name].name])

    def seconds(value):
        return "-" if value != value else f"{value:.1f}"

    limit = f"soft fd limit {args.nofile} (hard kept)" if args.nofile else "the harness's fd limit"
    worker = "`benches/hello-body.js` (answers once the body is read)" if args.worker == "hello-body" \
        else f"`benches/{args.worker}.js`"
    lines = header(names, f"{args.rounds} rounds x {args.duration} s, wrk -t2 -c{args.connections}, {args.workers} Node "
                          f"workers {worker}; beside it, from one Python process, {args.slowloris} slowloris "
                          f"connections (a header line a second, never finished, re-opened when closed) and "
                          f"{args.uploads_per_s} aborted uploads "
                          f"a second (`Content-Length: 1000`, 2 bytes sent, then closed). The request-head timeout is "
                          f"{args.header_timeout} s on every proxy (corral `header_read_timeout`; nginx "
                          f"`client_header_timeout`, whose default is 60 s; HAProxy `timeout http-request`), and each "
                          f"starts with {limit}. "
                          f"Errors are totals over the rounds; the rest are medians:")
    lines += table(
        ["target", "errors", "connect / read / write / timeout", "non-2xx", "req/s", "p50 ms", "p99 ms",
         "slowloris open (mean)", "slowloris closed by server", "closed after s", "aborted uploads sent",
         "proxy fds idle / peak"],
        [[TARGETS[n].name, total(n, "errors"), " / ".join(str(total(n, k)) for k in ("connect", "read", "write", "timeout")),
          total(n, "non2xx"), f"{med(n, 'rps'):.0f}", f"{med(n, 'p50'):.2f}", f"{med(n, 'p99'):.2f}",
          f"{med(n, 'sl_open_mean'):.0f}", f"{med(n, 'sl_closed'):.0f}", seconds(med(n, "sl_close_median_s")),
          f"{med(n, 'up_sent'):.0f}", f"{med(n, 'fds_idle'):.0f} / {med(n, 'fds_peak'):.0f}"] for n in names])
    if "corral" in names:
        lines.append("")
        for other in ("nginx", "haproxy"):
            if other in names:
                lines.append(f"- corral / {TARGETS[other].name}: req/s {med('corral', 'rps') / med(other, 'rps'):.2f}x, "
                             f"p99 {med('corral', 'p99') / med(other, 'p99'):.2f}x")
    return "abuse", lines


# The measures of --mode tls, in the order each round runs them: keep-alive HTTP/1.1 and
# HTTP/2, full handshakes (h2load, then s_time -new), resumed handshakes (s_time -reuse).
TLS_MEASURES = ("h1", "h2", "full", "new", "resumed")


def machine_cpu():
    """(busy, steal) CPU seconds of the whole machine so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


def with_cpu(target, run):
    """run() -> a result with "count" (requests or handshakes); adds the CPU µs per one of the
    proxy (user, system), of its Node workers, and of the load generator (the children reaped
    meanwhile: only the load tools end during a run); and, in CPUs over the run, what the whole
    machine used, what went to processes outside the benchmark (others' builds), and steal.
    """
    # Worker pids are read once: a worker that ends mid-run would otherwise count as negative.
    workers = target.worker_pids()
    started, machine_before = time.monotonic(), machine_cpu()
    (user_before, sys_before), workers_before = cpu_of(target.proxy_pids()), sum(cpu_of(workers))
    tools_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    harness_before = resource.getrusage(resource.RUSAGE_SELF)
    result = run()
    harness_after = resource.getrusage(resource.RUSAGE_SELF)
    tools_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    (user_after, sys_after), workers_after = cpu_of(target.proxy_pids()), sum(cpu_of(workers))
    machine_after, wall = machine_cpu(), time.monotonic() - started
    tools = tools_after.ru_utime - tools_before.ru_utime + tools_after.ru_stime - tools_before.ru_stime
    harness = harness_after.ru_utime - harness_before.ru_utime + harness_after.ru_stime - harness_before.ru_stime
    proxy = user_after - user_before + sys_after - sys_before
    per = 1e6 / result["count"] if result["count"] else float("nan")
    result["user_us"] = (user_after - user_before) * per
    result["sys_us"] = (sys_after - sys_before) * per
    result["cpu_us"] = result["user_us"] + result["sys_us"]
    result["workers_us"] = (workers_after - workers_before) * per
    result["client_us"] = tools * per
    busy = machine_after[0] - machine_before[0]
    result["busy_cpus"] = busy / wall
    result["other_cpus"] = (busy - proxy - (workers_after - workers_before) - tools - harness) / wall
    result["steal_cpus"] = (machine_after[1] - machine_before[1]) / wall
    return result


def measure_tls(target, kind, args):
    """One measure of --mode tls on a running target."""
    port = target.port
    if kind == "h1":
        def run():
            r = run_wrk(port, args.duration, args.connections, lambda: [], scheme="https")
            r.update(count=r["requests"], rate=r["rps"])
            return r
    elif kind == "h2":
        def run():
            return tlsload.h2_keepalive(port, args.duration, args.h2_clients, args.h2_streams)
    elif kind == "full":
        def run():
            return tlsload.full_handshakes(port, args.duration, args.handshake_clients)
    else:
        def run():
            return tlsload.s_time_handshakes(port, args.duration, args.s_time_processes, reuse=kind == "resumed",
                                             ciphersuite=args.s_time_suite or None)
    return with_cpu(target, run)


def describe_tls(kind, r):
    unit = "req" if kind in ("h1", "h2") else "handshake"
    text = (f"{r['rate']:8.0f} {unit}s/s  cpu {r['user_us']:.1f}+{r['sys_us']:.1f} us/{unit} "
            f"(workers {r['workers_us']:.1f}, load tool {r['client_us']:.1f})  machine {r['busy_cpus']:.2f} CPUs busy, "
            f"{r['other_cpus']:.2f} outside, steal {r['steal_cpus']:.2f}  errors {r['errors']}")
    if kind == "full":
        text += f"  ({r['count']} in {r['runs']} h2load runs)"
    if kind in ("new", "resumed"):
        text += f"  (resumed {r['resumed']} of {r['count']}, {r['bytes_per_conn']:.0f} bytes read each)"
    if r.get("tls"):
        text += "  " + ", ".join(v for v in r["tls"].values() if v)
    return text


def tls_keepalive(args):
    """nginx's idle upstream connections per worker process in --mode tls: enough for every
    request in flight (HTTP/2 has clients x streams of them), so that nginx, like corral, does
    not open worker connections during the run."""
    return max(64, args.connections, args.h2_clients * args.h2_streams)


def tls_rounds(names, args, cert):
    """Per round: starts every target, then runs each measure on each target in turn.

    All targets stay up for the whole round (idle when not measured), so one measure of one
    target is followed by the same measure of the other within seconds; the order alternates
    from measure to measure and from round to round. Returns {name: {kind: [results]}} and
    nginx's worker process count, and what a default OpenSSL client (wrk) negotiated with each.
    """
    results = {n: {k: [] for k in TLS_MEASURES} for n in names}
    processes = None
    keepalive = tls_keepalive(args)
    defaults = {}
    for r in range(args.rounds):
        targets = {}
        try:
            # corral first: nginx gets as many worker processes as corral runs shards.
            if "corral" in names:
                targets["corral"] = Corral(args.workers, tls=cert)
            processes = targets["corral"].shards() if "corral" in targets else len(os.sched_getaffinity(0))
            if "nginx" in names:
                targets["nginx"] = Nginx(args.workers, tls=cert, processes=processes, keepalive=keepalive)
            for name, t in targets.items():
                run_wrk(t.port, 2, args.connections, lambda: [], scheme="https")  # warm-up: JIT, pools
                defaults[name] = " ".join(tlsload.default_client_suite(t.port))
            for i, kind in enumerate(TLS_MEASURES):
                k = (r + i) % len(names)
                for name in names[k:] + names[:k]:
                    result = measure_tls(targets[name], kind, args)
                    results[name][kind].append(result)
                    print(f"round {r + 1} {kind:>7} {name:>6}: {describe_tls(kind, result)}", file=sys.stderr,
                          flush=True)
        finally:
            for t in targets.values():
                t.stop()
    return results, processes, defaults


def tls_versions():
    """rustls and aws-lc-rs as corral's Cargo.lock pins them; OpenSSL; h2load."""
    found = []
    try:
        lock = (ROOT / "Cargo.lock").read_text()
        for crate in ("rustls", "aws-lc-rs"):
            m = re.search(rf'^name = "{re.escape(crate)}"\nversion = "([^"]+)"', lock, re.M)
            found.append(f"{crate} {m.group(1)}" if m else crate)
    except OSError:
        found += ["rustls", "aws-lc-rs"]
    # nginx -V: "built with OpenSSL X (running with OpenSSL Y)"; the clients use the system's.
    built = subprocess.run(["nginx", "-V"], capture_output=True, text=True).stderr if shutil.which("nginx") else ""
    m = re.search(r"running with OpenSSL (\S+)", built) or re.search(r"built with OpenSSL (\S+)", built)
    if m:
        found.append(f"nginx with OpenSSL {m.group(1)}")
    found.append(first_line(["openssl", "version"]) or "OpenSSL")
    m = re.search(r"nghttp2/(\S+)", first_line(["h2load", "--version"]) or "")
    found.append(f"h2load {m.group(1)}" if m else "h2load")
    return ", ".join(found)


def tls_report(names, args):
    tmp = tempfile.mkdtemp(prefix="tls-bench-")
    try:
        cert = tlsload.make_cert(tmp)
        results, processes, defaults = tls_rounds(names, args, cert)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def med(name, kind, key):
        values = [r[key] for r in results[name][kind] if r[key] == r[key]]
        return statistics.median(values) if values else float("nan")

    def total(name, kind, key):
        return sum(r[key] for r in results[name][kind])

    command = " ".join(["python3", "benches/compare.py", *sys.argv[1:]])
    lines = header(names, (
        f"{tls_versions()}. The same ECDSA P-256 certificate (made by the harness with openssl) and {args.workers} "
        f"Node hello workers per target; nginx with `worker_processes {processes}` (corral's shards), "
        f"`ssl_protocols TLSv1.2 TLSv1.3`, HTTP/2, `ssl_session_cache shared:SSL:10m`, `ssl_session_tickets on`, "
        f"`keepalive_requests 1000000`, upstream `keepalive {tls_keepalive(args)}`, `access_log off`. "
        f"{args.rounds} rounds; in each, both targets run and every measure goes to one, then at once to the other (the order alternates), "
        f"{args.duration} s each: HTTP/1.1 `wrk -t2 -c{args.connections}`; HTTP/2 `h2load -t2 -c{args.h2_clients} "
        f"-m{args.h2_streams}`; full handshakes with h2load: `h2load --h1 -c{args.handshake_clients} "
        f"-n{args.handshake_clients}` (a fresh client per connection, one request each) back to back in 2 parallel "
        f"loops; full and resumed handshakes with s_time: {args.s_time_processes} parallel `openssl s_time -new` or "
        f"`-reuse -www /`{' -ciphersuites ' + args.s_time_suite if args.s_time_suite else ''} (one HTTP/1.0 "
        f"request per connection). CPU is the proxy's user + kernel time from /proc "
        f"over each run, per request or per handshake. Command: `{command}`. Medians:"))
    lines += table(
        ["target", "HTTP/1.1 req/s", "CPU µs/req", "HTTP/2 req/s", "CPU µs/req", "full handshakes/s (h2load)",
         "CPU µs/handshake", "full handshakes/s (s_time)", "CPU µs/handshake", "resumed handshakes/s (s_time)",
         "CPU µs/handshake"],
        [[TARGETS[n].name, f"{med(n, 'h1', 'rate'):.0f}", f"{med(n, 'h1', 'cpu_us'):.1f}",
          f"{med(n, 'h2', 'rate'):.0f}", f"{med(n, 'h2', 'cpu_us'):.1f}"]
         + [f"{med(n, k, v):.0f}" for k in ("full", "new", "resumed") for v in ("rate", "cpu_us")]
         for n in names])
    lines += ["", "CPU per request or handshake, µs: the proxy's split into user + kernel, its Node workers', and "
                  "the load generator's (wrk, h2load, s_time); medians:", ""]
    lines += table(
        ["target", "HTTP/1.1", "HTTP/2", "full (h2load)", "full (s_time)", "resumed (s_time)"],
        [[TARGETS[n].name] + [f"{med(n, k, 'user_us'):.1f} + {med(n, k, 'sys_us'):.1f}" for k in TLS_MEASURES]
         for n in names]
        + [[f"Node workers, behind {TARGETS[n].name}"] + [f"{med(n, k, 'workers_us'):.1f}" for k in TLS_MEASURES]
           for n in names]
        + [[f"load generator, against {TARGETS[n].name}"] + [f"{med(n, k, 'client_us'):.1f}" for k in TLS_MEASURES]
           for n in names])
    lines.append("")
    if "corral" in names and "nginx" in names:
        def ratio(kind, key):
            """corral / nginx: the median of the rounds' ratios (each round's two runs were back to
            back, so they shared that moment's noise), and the range."""
            pairs = sorted(a[key] / b[key] for a, b in zip(results["corral"][kind], results["nginx"][kind]))
            return f"{statistics.median(pairs):.2f}x ({pairs[0]:.2f}-{pairs[-1]:.2f})"
        lines.append(f"- corral / nginx, median of the {args.rounds} rounds' ratios (lowest-highest): HTTP/1.1 req/s "
                     f"{ratio('h1', 'rate')}, CPU per request {ratio('h1', 'cpu_us')}; HTTP/2 req/s "
                     f"{ratio('h2', 'rate')}, CPU {ratio('h2', 'cpu_us')}; full handshakes/s with h2load "
                     f"{ratio('full', 'rate')}, CPU per handshake {ratio('full', 'cpu_us')}; full handshakes/s with "
                     f"s_time {ratio('new', 'rate')}, CPU {ratio('new', 'cpu_us')}; resumed handshakes/s "
                     f"{ratio('resumed', 'rate')}, CPU {ratio('resumed', 'cpu_us')}")
    for n in names:
        tls = next((r["tls"] for r in results[n]["h2"] if r.get("tls")), {})
        negotiated = ", ".join(v for v in tls.values() if v) or "unknown"
        resumed = total(n, "resumed", "resumed") / max(total(n, "resumed", "count"), 1)
        lines.append(f"- {TARGETS[n].name}: errors over all rounds: HTTP/1.1 {total(n, 'h1', 'errors')}, HTTP/2 "
                     f"{total(n, 'h2', 'errors')}, full handshakes (h2load) {total(n, 'full', 'errors')}; "
                     f"{resumed * 100:.1f}% of `s_time -reuse` connections resumed; h2load negotiated {negotiated}; "
                     f"an OpenSSL client with default settings (wrk) {defaults.get(n, 'unknown')}")
    every = [r for n in names for k in TLS_MEASURES for r in results[n][k]]
    other = sorted(r["other_cpus"] for r in every)
    lines.append(f"- noise: during the {len(every)} measured runs the machine was busy "
                 f"{statistics.median(r['busy_cpus'] for r in every):.2f} of {os.cpu_count()} CPUs (median); "
                 f"processes outside the benchmark used {statistics.median(other):.2f} CPUs (median, largest "
                 f"{other[-1]:.2f}); steal {statistics.median(r['steal_cpus'] for r in every):.2f} CPUs (median)")
    return "tls", lines


def write_readme(section, lines):
    """Replaces the text between this section's markers in README.md."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    begin, end = f"<!-- bench:{section} -->", f"<!-- /bench:{section} -->"
    if begin not in text or end not in text:
        sys.exit(f"README.md has no {begin} ... {end} markers; add them where the table belongs")
    before, rest = text.split(begin, 1)
    after = rest.split(end, 1)[1]
    readme.write_text(before + begin + "\n" + "\n".join(lines) + "\n" + end + after)
    print(f"README.md: {section} table updated", file=sys.stderr)


def main():
    global CORRAL, HELLO
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, help="default 3 (1 in upgrade mode)")
    ap.add_argument("--duration", type=int, help="seconds of each measured wrk run (default 10; 15 in abuse mode)")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--targets", help="default direct,corral,nginx,haproxy,pm2 (corral,nginx,haproxy in abuse mode)")
    ap.add_argument("--install", action="store_true", help="install PM2 from npm into benches/.tools")
    ap.add_argument("--mode", choices=["throughput", "reload", "reload-time", "abuse", "tls", "upgrade"],
                    default="throughput")
    ap.add_argument("--reload-every", type=float, default=3.0)
    ap.add_argument("--reload-duration", type=int, default=30)
    ap.add_argument("--upgrades", type=int, default=50, help="upgrade mode: upgrades per target and round")
    ap.add_argument("--pm2-upgrades", type=int,
                    help="upgrade mode: upgrades of PM2 per round, if fewer than --upgrades (each `pm2 update` "
                         "takes seconds)")
    ap.add_argument("--upgrade-budget", type=float, default=180,
                    help="upgrade mode: no new upgrade of a target after this many seconds of its run")
    ap.add_argument("--upgrade-pause", type=float, default=0.2,
                    help="upgrade mode: seconds between one upgrade's end and the next one's start")
    ap.add_argument("--upgrade-log", type=Path,
                    help="upgrade mode: append each run's upgrades and failures (monotonic times) as a JSON line")
    ap.add_argument("--haproxy-idle-close", action="store_true",
                    help="upgrade mode: give HAProxy `option idle-close-on-response` (not its default)")
    ap.add_argument("--fresh", type=int, default=8,
                    help="upgrade mode: load loops opening a new connection per request (beside --connections "
                         "keep-alive ones)")
    ap.add_argument("--slowloris", type=int, default=200, help="abuse mode: slowloris connections kept open")
    ap.add_argument("--uploads-per-s", type=int, default=200, help="abuse mode: aborted uploads a second")
    ap.add_argument("--header-timeout", type=int, default=10, help="abuse mode: every proxy's request-head timeout, s")
    ap.add_argument("--nofile", type=int, default=1024,
                    help="abuse mode: the proxies' soft fd limit (hard limit kept); 0 inherits the harness's")
    ap.add_argument("--h2-clients", type=int, default=16, help="tls mode: h2load connections for HTTP/2 (-c)")
    ap.add_argument("--h2-streams", type=int, default=10, help="tls mode: h2load streams per connection (-m)")
    ap.add_argument("--handshake-clients", type=int, default=32,
                    help="tls mode: connections of each `h2load -c N -n N` run for full handshakes")
    ap.add_argument("--s-time-processes", type=int, default=8,
                    help="tls mode: parallel `openssl s_time -new` / `-reuse` processes")
    ap.add_argument("--s-time-suite", default="TLS_AES_128_GCM_SHA256",
                    help="tls mode: the TLS 1.3 suite s_time offers (h2load's choice; '' for s_time's default order)")
    ap.add_argument("--worker", choices=["hello", "hello-body"],
                    help="the worker script in benches/ (default hello; hello-body in abuse mode)")
    ap.add_argument("--corral", type=Path, help="the corral binary (default $CORRAL_BIN, else "
                                                "$CARGO_TARGET_DIR/release/corral, else target/release/corral)")
    ap.add_argument("--readme", action="store_true", help="write the report into README.md between its markers")
    args = ap.parse_args()
    HaproxyDaemon.idle_close = args.haproxy_idle_close
    if args.rounds is None:
        args.rounds = 1 if args.mode == "upgrade" else 3
    if args.mode == "upgrade" and not (0 < args.upgrades <= 1000 and 0 < args.connections <= 1000
                                       and 0 <= args.fresh <= 200 and 0 < (args.pm2_upgrades or 1) <= 1000):
        sys.exit("--upgrades, --pm2-upgrades: 1 to 1000; --connections: 1 to 1000; --fresh: 0 to 200")
    if args.duration is None:
        args.duration = 15 if args.mode == "abuse" else 10
    if args.targets is None:
        args.targets = {"abuse": "corral,nginx,haproxy", "tls": "corral,nginx",
                        "upgrade": "corral,nginx,haproxy,pm2"}.get(args.mode,
                                                                                   "direct,corral,nginx,haproxy,pm2")
    if args.mode == "tls":
        if set(args.targets.split(",")) - {"corral", "nginx"}:
            sys.exit("--mode tls measures corral and nginx only")
        for tool in ("h2load", "openssl"):
            if not shutil.which(tool):
                sys.exit(f"{tool} is needed for --mode tls (apt-get install nghttp2-client openssl)")
    if not 0 < args.slowloris <= 2000 or not 0 < args.uploads_per_s <= 2000:
        sys.exit("--slowloris and --uploads-per-s must be between 1 and 2000")
    if args.worker is None:
        args.worker = "hello-body" if args.mode == "abuse" else "hello"
    HELLO = ROOT / "benches" / f"{args.worker}.js"
    CORRAL = (args.corral or Path(os.environ.get("CORRAL_BIN") or CORRAL)).resolve()

    if not shutil.which("wrk"):
        sys.exit("wrk is needed (apt-get install wrk)")
    if not CORRAL.exists():
        sys.exit(f"build corral first: cargo build --release (no {CORRAL})")
    if args.install and not pm2_binary().exists():
        subprocess.run(["npm", "install", "--silent", "--prefix", str(TOOLS), "pm2@latest"], check=True)
    names = []
    for name in args.targets.split(","):
        if name in ("nginx", "haproxy") and not shutil.which(name):
            print(f"skipping {name}: not installed (apt-get install {name})", file=sys.stderr)
        elif name == "pm2" and not pm2_binary().exists():
            print("skipping pm2: not installed (use --install)", file=sys.stderr)
        else:
            names.append(name)

    if args.mode == "reload":
        # Only targets that know how to replace their workers take part (HAProxy's harness
        # target has no deploy procedure; "direct" has nothing to reload).
        reloadable = [n for n in names if hasattr(TARGETS[n], "reload")]
        for n in sorted(set(names) - set(reloadable)):
            print(f"skipping {n} in reload mode: no reload procedure", file=sys.stderr)
        section, lines = reload_report(reloadable, args)
    elif args.mode == "reload-time":
        section, lines = reload_time_report(args)
    elif args.mode == "abuse":
        section, lines = abuse_report(names, args)
    elif args.mode == "tls":
        section, lines = tls_report(names, args)
    elif args.mode == "upgrade":
        section, lines = upgrade_report(names, args)
    else:
        section, lines = throughput_report(names, args)
    print("\n" + "\n".join(lines))
    if args.readme:
        write_readme(section, lines)


if __name__ == "__main__":
    main()
