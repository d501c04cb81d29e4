"""Hostile clients for `compare.py --mode abuse`: slowloris and aborted uploads, on 127.0.0.1 only.

Both run in one asyncio loop on a background thread of the harness, with no dependency outside
the standard library:

- slowloris: a fixed number of connections, each sending a request head that never ends (one
  header line every `line_every` seconds). A connection the server closes (EOF or reset, with or
  without a response) is counted, with its lifetime, and opened again, so about that many stay
  open for the whole run.
- aborted uploads: at a fixed rate, a connection sends the head of a 1,000-byte upload and two
  bytes of its body, then closes at once.

Everything is bounded: the slowloris count is fixed, uploads in flight are capped, every loop
checks a hard deadline as well as the stop flag, every connect has a timeout, and `stop()` joins
the thread with a timeout.
"""
import asyncio
import statistics
import threading
import time
from collections import Counter

HOST = "127.0.0.1"
UPLOAD = b"POST /abort HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\nxx"
CONNECT_TIMEOUT = 2.0
# Uploads whose connect has not finished yet; past this, an upload due is skipped (and counted).
MAX_UPLOADS_IN_FLIGHT = 256


class Attack:
    """Slowloris connections and aborted uploads against 127.0.0.1:`port`, until stop() or `max_seconds`."""

    def __init__(self, port, slowloris=200, uploads_per_s=200, line_every=1.0, max_seconds=120.0):
        self.port = port
        self.slowloris = slowloris
        self.uploads_per_s = uploads_per_s
        self.line_every = line_every
        self.max_seconds = max_seconds
        # Written only by the loop thread; read by the harness (int reads are atomic under the GIL).
        self.open = 0  # slowloris connections open now
        self.opened = 0  # slowloris connections opened in all (first opens and re-opens)
        self.connect_failed = 0  # slowloris connects refused or timed out
        self.closed = 0  # slowloris connections closed by the server
        self.lifetimes = []  # seconds from connect to the server's close, one per closed connection
        self.answers = Counter()  # what the server sent before closing: "408", "400", ..., or "none"
        self.uploads_sent = 0
        self.uploads_failed = 0  # connect refused or timed out
        self.uploads_skipped = 0  # due while MAX_UPLOADS_IN_FLIGHT were connecting
        self._in_flight = 0
        self._stopping = False
        self._deadline = None
        self._thread = None

    def _running(self):
        return not self._stopping and time.monotonic() < self._deadline

    def start(self, ramp_wait=5.0):
        """Starts the attackers; returns once the slowloris connections are open (or after ramp_wait s)."""
        self._deadline = time.monotonic() + self.max_seconds
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="attackers", daemon=True)
        self._thread.start()
        end = time.monotonic() + ramp_wait
        while time.monotonic() < end and self.open < self.slowloris * 0.95:
            time.sleep(0.05)

    def stop(self):
        """Stops the attackers and returns their counts."""
        self._stopping = True
        self._thread.join(self.line_every + CONNECT_TIMEOUT + 5)
        if self._thread.is_alive():
            raise RuntimeError("the attackers did not stop")
        return {
            "sl_opened": self.opened,
            "sl_connect_failed": self.connect_failed,
            "sl_closed": self.closed,
            "sl_close_median_s": statistics.median(self.lifetimes) if self.lifetimes else float("nan"),
            "sl_close_max_s": max(self.lifetimes) if self.lifetimes else float("nan"),
            "sl_answers": dict(self.answers),
            "up_sent": self.uploads_sent,
            "up_failed": self.uploads_failed,
            "up_skipped": self.uploads_skipped,
        }

    async def _run(self):
        tasks = [asyncio.create_task(self._slowloris(i)) for i in range(self.slowloris)]
        tasks.append(asyncio.create_task(self._uploads()))
        # Every task ends by itself within a second or two of the stop flag or the deadline; the
        # timeout here is the backstop, and asyncio.run cancels whatever is left.
        await asyncio.wait(tasks, timeout=max(0.0, self._deadline - time.monotonic()) + 5)

    async def _connect(self):
        return await asyncio.wait_for(asyncio.open_connection(HOST, self.port), CONNECT_TIMEOUT)

    async def _slowloris(self, index):
        # Staggered over one line interval, so that the connections' writes are spread evenly.
        await asyncio.sleep(index * self.line_every / max(1, self.slowloris))
        while self._running():
            try:
                reader, writer = await self._connect()
            except (OSError, asyncio.TimeoutError):
                self.connect_failed += 1
                await asyncio.sleep(0.5)
                continue
            self.opened += 1
            self.open += 1
            opened = time.monotonic()
            try:
                answer = await self._hold(reader, writer)
            finally:
                self.open -= 1
                writer.close()
            if answer is not None:
                self.closed += 1
                self.lifetimes.append(time.monotonic() - opened)
                self.answers[answer] += 1

    async def _hold(self, reader, writer):
        """Sends a head that never ends; returns what the server answered once it closes, or None at stop."""
        writer.write(b"GET /slow HTTP/1.1\r\nHost: h\r\n")
        answer = "none"
        read = asyncio.ensure_future(reader.read(512))
        lines = 0
        try:
            while self._running():
                done, _ = await asyncio.wait({read}, timeout=self.line_every)
                if read in done:
                    try:
                        data = read.result()
                    except OSError:  # reset by the server
                        return answer
                    if not data:
                        return answer
                    if answer == "none":
                        status = data.split(b"\r\n", 1)[0].split(b" ")
                        ok = data.startswith(b"HTTP/") and len(status) > 1
                        answer = status[1].decode(errors="replace") if ok else "other"
                    read = asyncio.ensure_future(reader.read(512))
                    continue
                if writer.is_closing():
                    return answer
                lines += 1
                writer.write(b"X-Slow-%d: x\r\n" % lines)
            return None
        finally:
            read.cancel()

    async def _uploads(self):
        pending = set()
        started = time.monotonic()
        due = 0
        while self._running():
            due += 1
            await asyncio.sleep(max(0.0, started + due / self.uploads_per_s - time.monotonic()))
            if self._in_flight >= MAX_UPLOADS_IN_FLIGHT:
                self.uploads_skipped += 1
                continue
            task = asyncio.create_task(self._upload())
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending, timeout=CONNECT_TIMEOUT + 1)

    async def _upload(self):
        self._in_flight += 1
        try:
            _, writer = await self._connect()
        except (OSError, asyncio.TimeoutError):
            self.uploads_failed += 1
            return
        finally:
            self._in_flight -= 1
        writer.write(UPLOAD)
        writer.close()  # the buffered bytes go out, then the FIN
        self.uploads_sent += 1
