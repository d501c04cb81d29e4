"""HTTP/1.1 load that counts every request, for `compare.py --mode upgrade`; 127.0.0.1 only.

wrk counts socket errors per event and says neither which request failed nor when, so the
upgrade mode uses this client instead: one asyncio loop on a background thread of the harness,
standard library only, in two kinds of loop:

- keep-alive: `keepalive` connections, each sending `GET /` one after another on the same
  connection, as a browser or an HTTP client pool does. A response that says
  `Connection: close` (or an HTTP/1.0 one without keep-alive) is honoured like a real client
  does (RFC 9112 9.6): the connection is closed after that response and the next request goes
  on a new one.
- new connection per request: `fresh` loops, each opening a connection, sending one request
  with `Connection: close`, reading the answer and closing.

A request counts as ok when a whole 2xx response arrived (the body read to its
Content-Length, chunked end or close). Everything else counts as failed, one per request, with
the time and what happened: the connect failed (refused, timed out), the connection was reset
or closed before any byte of the response (on a reused keep-alive connection, the race of a
server closing an idle connection while the request is on its way; a client that retries
idempotent requests, RFC 9112 9.3.1, would hide it, this one does not), closed in the middle
of a response, no response within `timeout`, or a non-2xx status. After a failure the loop
waits `pause` s before its next attempt, so that a target refusing connections for a while is
not counted once per CPU cycle: the failed count during an outage depends on that pause, the
longest stretch with no successful answer (`max_gap`) does not.

Bounded: every loop checks the stop flag, a hard deadline (`max_seconds`) and a cap on the
requests sent (`max_requests`); every connect and every exchange has `timeout`; `stop()` joins
the thread with a timeout.
"""
import asyncio
import os
import threading
import time
from collections import Counter

HOST = "127.0.0.1"
KEEP = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
CLOSE = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
MAX_HEAD = 64 * 1024
# A stretch of at least this long with no successful answer (on any connection) is recorded.
GAP = 0.02


class Failed(Exception):
    """A request that failed; str() says how."""


class Load:
    """Keep-alive and new-connection HTTP/1.1 load against 127.0.0.1:`port`, until stop(),
    `max_seconds` or `max_requests`."""

    def __init__(self, port, keepalive=64, fresh=8, max_seconds=900.0, max_requests=20_000_000, timeout=5.0,
                 pause=0.01, keep_failures=200_000):
        self.port = port
        self.keepalive, self.fresh = keepalive, fresh
        self.max_seconds, self.max_requests = max_seconds, max_requests
        self.timeout, self.pause = timeout, pause
        self.keep_failures = keep_failures
        # Written only by the loop thread; read by the harness (int reads are atomic under the GIL).
        self.ok = 0
        self.failed = 0
        self.kinds = Counter()  # how requests failed -> count
        self.failures = []  # (monotonic time, how, connection kind), the first keep_failures of them
        self.connections = 0  # connections opened
        self.closes_honoured = 0  # responses with Connection: close, after which the client reconnected
        self.max_gap = 0.0  # longest time between two successful answers (any connection), s
        self.max_gap_at = None  # monotonic time that gap ended
        self.gaps = []  # (monotonic time a gap of at least GAP s began, its length), the first keep_failures
        self.seconds = 0.0  # from start() to stop()
        self._started = None
        self._last_ok = None
        self._stopping = False
        self._deadline = None
        self._thread = None

    def _running(self):
        return (not self._stopping and time.monotonic() < self._deadline
                and self.ok + self.failed < self.max_requests)

    def start(self):
        self._deadline = time.monotonic() + self.max_seconds
        self._last_ok = self._started = time.monotonic()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="httpload", daemon=True)
        self._thread.start()

    def stop(self):
        """Stops the loops (each finishes the request it is in) and returns the counts."""
        self._stopping = True
        self._thread.join(self.timeout * 2 + 5)
        if self._thread.is_alive():
            raise RuntimeError("the load client did not stop")
        self.seconds = time.monotonic() - self._started
        return {"seconds": self.seconds, "gaps": list(self.gaps), "ok": self.ok, "failed": self.failed, "kinds": dict(self.kinds), "failures": list(self.failures),
                "connections": self.connections, "closes_honoured": self.closes_honoured,
                "max_gap": self.max_gap, "max_gap_at": self.max_gap_at}

    async def _run(self):
        tasks = [asyncio.create_task(self._keepalive_loop()) for _ in range(self.keepalive)]
        tasks += [asyncio.create_task(self._fresh_loop()) for _ in range(self.fresh)]
        await asyncio.wait(tasks, timeout=max(0.0, self._deadline - time.monotonic()) + self.timeout * 2)

    def _succeeded(self):
        now = time.monotonic()
        gap = now - self._last_ok
        if gap > self.max_gap:
            self.max_gap, self.max_gap_at = gap, now
        if gap >= GAP and len(self.gaps) < self.keep_failures:
            self.gaps.append((self._last_ok, gap))
        self._last_ok = now
        self.ok += 1

    def _fail(self, how, kind):
        self.failed += 1
        self.kinds[f"{kind}: {how}"] += 1
        if len(self.failures) < self.keep_failures:
            self.failures.append((time.monotonic(), how, kind))

    async def _connect(self):
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(HOST, self.port)
        except TimeoutError:
            raise Failed(f"connect: no connection within {self.timeout:g} s") from None
        except OSError as e:
            raise Failed(f"connect: {type(e).__name__}" + (f" ({os.strerror(e.errno)})" if e.errno else "")) from None
        self.connections += 1
        return reader, writer

    async def _exchange(self, reader, writer, request):
        """Sends one request and reads its response; returns (status, close after it)."""
        got = 0  # response bytes so far
        try:
            async with asyncio.timeout(self.timeout):
                writer.write(request)
                await writer.drain()
                buf = b""
                while b"\r\n\r\n" not in buf:
                    chunk = await reader.read(65536)
                    if not chunk:
                        raise Failed("closed before any response byte" if not buf else "closed in the response head")
                    got += len(chunk)
                    buf += chunk
                    if len(buf) > MAX_HEAD:
                        raise Failed("response head too large")
                head, rest = buf.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                parts = lines[0].split(" ", 2)
                if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                    raise Failed(f"not an HTTP/1 response: {lines[0][:60]!r}")
                version, status = parts[0], int(parts[1])
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers.setdefault(name.strip().lower(), []).append(value.strip())
                tokens = {t.strip().lower() for v in headers.get("connection", []) for t in v.split(",")}
                close = "close" in tokens or (version == "HTTP/1.0" and "keep-alive" not in tokens)
                if status in (204, 304) or 100 <= status < 200:
                    pass
                elif "chunked" in ",".join(headers.get("transfer-encoding", [])).lower():
                    await self._chunked(reader, rest)
                elif "content-length" in headers:
                    need = int(headers["content-length"][0]) - len(rest)
                    while need > 0:
                        chunk = await reader.read(min(need, 65536))
                        if not chunk:
                            raise Failed("closed in the response body")
                        need -= len(chunk)
                else:  # the body runs to the close
                    while await reader.read(65536):
                        pass
                    close = True
                return status, close
        except TimeoutError:
            raise Failed(f"no {'response' if not got else 'whole response'} within {self.timeout:g} s") from None
        except OSError as e:
            where = "before any response byte" if not got else "in the response"
            why = f" ({os.strerror(e.errno)})" if e.errno else (f" ({e})" if str(e) else "")
            raise Failed(f"{type(e).__name__}{why} {where}") from None

    async def _chunked(self, reader, rest):
        buf = rest
        while True:
            while b"\r\n" not in buf:
                chunk = await reader.read(65536)
                if not chunk:
                    raise Failed("closed in the response body")
                buf += chunk
            size_line, buf = buf.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            need = size + 2  # the data and its CRLF (for the last chunk: the empty trailer's CRLF)
            while len(buf) < need:
                chunk = await reader.read(65536)
                if not chunk:
                    raise Failed("closed in the response body")
                buf += chunk
            buf = buf[need:]
            if size == 0:
                return

    async def _keepalive_loop(self):
        conn, served = None, 0
        while self._running():
            try:
                if conn is None:
                    conn, served = await self._connect(), 0
                status, close = await self._exchange(*conn, KEEP)
            except Failed as f:
                self._fail(str(f), "keep-alive, reused connection" if served else "keep-alive, new connection")
                if conn is not None:
                    conn[1].close()
                conn, served = None, 0
                await asyncio.sleep(self.pause)
                continue
            served += 1
            if 200 <= status < 300:
                self._succeeded()
            else:
                self._fail(f"HTTP {status}", "keep-alive")
            if close:
                self.closes_honoured += 1
                conn[1].close()
                conn, served = None, 0
            elif not 200 <= status < 300:
                await asyncio.sleep(self.pause)
        if conn is not None:
            conn[1].close()

    async def _fresh_loop(self):
        while self._running():
            conn = None
            try:
                conn = await self._connect()
                status, _ = await self._exchange(*conn, CLOSE)
            except Failed as f:
                self._fail(str(f), "new connection per request")
                await asyncio.sleep(self.pause)
                continue
            finally:
                if conn is not None:
                    conn[1].close()
            if 200 <= status < 300:
                self._succeeded()
            else:
                self._fail(f"HTTP {status}", "new connection per request")
                await asyncio.sleep(self.pause)
