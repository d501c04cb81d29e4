#!/usr/bin/env python3
"""Instructions per proxied request, counted by callgrind: metrics and the access log on vs off.

Wall-clock runs on this machine differ by more than the few percent at stake, so this counts
instructions instead. corral runs under `valgrind --tool=callgrind` (`--trace-children=no`: its
Node workers run natively and are not counted; `--separate-threads=no`: every thread of corral
is summed, the shards, the supervisor and the access log's writer thread). For each
configuration and round the harness

  1. starts corral (2 Node workers of benches/hello.js by default) under callgrind in a temp dir,
  2. waits, by polling `corral status --json` and then the port, until every worker is ready,
  3. warms up: --warmup requests with h2load,
  4. zeroes the counters (`callgrind_control --zero PID`),
  5. sends exactly --requests keep-alive HTTP/1.1 requests to 127.0.0.1 (`h2load --h1 -n N
     -c --connections`; it sends a User-Agent, so the log formats one), checks that every one
     got a 2xx, waits 0.5 s for the last responses' ends (log lines, in-flight counts),
  6. dumps (`callgrind_control --dump PID`) and divides the dump's instruction total by N,
  7. reads the dump's self costs by source file and function (its own parser: callgrind_annotate
     3.19 miscounts calls made from inlined code) and sums the instructions whose debug line info
     is in src/metrics/ and in src/logs/ (inlined code counts where its source line is: the
     meter's bumps are inlined into the proxy's functions, and are still found this way),
  8. stops corral (SIGTERM, then SIGKILL after 60 s; the workers die with it).

Configurations (--configs): `off` (no access_log), `combined`, `json` (access_log with that
access_log_format); request_id is on (the default) in all of them. The order of the
configurations rotates from round to round.

Metrics have no switch. Two ways to see their cost, both reported:
  - the instructions on src/metrics/ lines per request (step 7), out of the total: a lower
    bound, it leaves out the Arc clone and drop of the in-flight guard and the clock read for
    the time to first byte, which are std code;
  - --bin LABEL=PATH (repeatable) measures other binaries beside the default one, such as a
    build of the measurement-only patch below, which removes the meter calls from the request
    path (never committed; apply, `cargo build --release`, copy the binary, revert):

      src/metrics/mod.rs:   `pub struct Flight;` with no Drop; `in_flight` returns `Flight`
                            without touching a counter; `answered` does nothing
      src/proxy/mod.rs:     `Proxy::serve` drops `meter.answered(status, arrived.elapsed())`
                            and reads the clock (`Instant::now()`) only for the access log

    The difference between the two binaries' totals is what the metrics cost per request, up
    to the spread of the rounds (under 1% here); the report also lists the functions whose
    instructions differ most between the two (some rows only show the builds inlining
    differently, and cancel out).

The report also lists, for each access log format, the functions whose own instructions grew
most against no access log: where the log's instructions go.

Everything stays on 127.0.0.1; every process started is stopped; every wait is bounded, and
no new run starts after --deadline seconds. Installs nothing and builds nothing: it needs
valgrind (with callgrind_control), h2load (nghttp2-client) and node, and a
corral built first with `cargo build --release` (the release profile keeps line tables, which
step 7 needs). The binary is --corral, else $CORRAL_BIN, else $CARGO_TARGET_DIR/release/corral,
else target/release/corral.

  python3 benches/callgrind.py                       # 3 rounds x off, combined, json; 20,000 requests
  python3 benches/callgrind.py --rounds 5 --readme   # also rewrite the bench:callgrind table in README.md
  python3 benches/callgrind.py --bin stub=/tmp/corral-nometrics --configs off,json
"""
import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from compare import first_line, free_port, machine, wait_for

ROOT = Path(__file__).resolve().parent.parent
HELLO = ROOT / "benches" / "hello.js"
CONFIGS = {
    "off": None,
    "combined": "combined",
    "json": "json",
}


def answers(port):
    """compare.answers with a longer timeout: corral answers slowly under valgrind."""
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False



class Run:
    """corral under callgrind, in a temp dir, with `workers` hello workers and an access log format (or none)."""

    def __init__(self, binary, workers, log_format):
        self.binary = binary
        self.workers = workers
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="corral-cg-"))
        self.config = self.dir / "proxy.toml"
        text = (
            f'[[app]]\nname = "hello"\ncommand = ["node", "{HELLO}"]\n'
            f'listen = "127.0.0.1:{self.port}"\ninstances = {workers}\n'
        )
        if log_format:
            text += f'access_log = "access.log"\naccess_log_format = "{log_format}"\n'
        self.config.write_text(text)
        self.env = dict(os.environ, CORRAL_RUNTIME_DIR=str(self.dir / "run"), CORRAL_LOG="warn")
        self.stderr = open(self.dir / "corral.log", "wb")
        self.proc = subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                "--trace-children=no",
                "--separate-threads=no",
                f"--callgrind-out-file={self.dir}/callgrind.out.%p",
                str(binary),
                "run",
                "-c",
                str(self.config),
            ],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
        )

    def wait_ready(self, deadline):
        def all_online():
            if self.proc.poll() is not None:
                raise RuntimeError(f"corral exited ({self.proc.returncode}); see {self.dir}/corral.log")
            out = subprocess.run(
                [str(self.binary), "status", "--json", "-c", str(self.config)],
                env=self.env,
                capture_output=True,
                timeout=30,
            )
            if out.returncode != 0:
                return False
            return json.loads(out.stdout)["apps"][0]["ready"] == self.workers

        wait_for("corral's workers", all_online, deadline)
        wait_for("corral's port", lambda: answers(self.port), deadline)

    def control(self, *args):
        out = subprocess.run(
            ["callgrind_control", *args, str(self.proc.pid)], capture_output=True, text=True, timeout=120
        )
        if out.returncode != 0 or "OK" not in out.stdout:
            raise RuntimeError(f"callgrind_control {' '.join(args)}: {out.stdout}{out.stderr}")

    def dumps(self):
        return sorted(self.dir.glob(f"callgrind.out.{self.proc.pid}.*"), key=lambda p: int(p.suffix[1:]))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                print("corral did not stop within 60 s under valgrind; killed", file=sys.stderr)
                self.proc.kill()
                self.proc.wait(30)
        self.stderr.close()

    def cleanup(self, keep):
        if keep:
            print(f"kept {self.dir}", file=sys.stderr)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def h2load(port, requests, connections, timeout):
    """Sends exactly `requests` keep-alive HTTP/1.1 requests; returns how many got a 2xx."""
    cmd = ["h2load", "--h1", "-n", str(requests), "-c", str(connections), "-t", "1", f"http://127.0.0.1:{port}/"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    m = re.search(r"status codes: (\d+) 2xx", out.stdout)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"h2load failed ({out.returncode}): {out.stdout[-500:]}{out.stderr[-500:]}")
    return int(m.group(1))


def total_ir(dump):
    """The instruction total of a callgrind dump (its `totals:` or `summary:` line)."""
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise RuntimeError(f"{dump}: no totals line")


def self_costs(dump):
    """Self instructions of a callgrind dump by source file and by function, read from the dump itself.

    A cost line counts for the file of its debug line info: `fi=`/`fe=` switch to the file of
    inlined code, so the meter's bumps inlined into the proxy's functions count for
    src/metrics/mod.rs. The cost line after a `calls=` line is the call's inclusive cost and is
    skipped. (callgrind_annotate 3.19 counts those call costs as the caller's own when they sit
    in inlined code, which makes its per-file figures useless here.)
    """
    names = {}

    def name(kind, value):
        m = re.match(r"\((\d+)\)(?:\s+(.*))?$", value.strip())
        if not m:
            return value.strip()
        if m.group(2) is not None:
            names[(kind, m.group(1))] = m.group(2)
        return names.get((kind, m.group(1)), value.strip())

    fl = fi = fn = "?"
    files, functions = {}, {}
    after_call = False
    with open(dump, errors="replace") as f:
        for line in f:
            c = line[:1]
            if c.isdigit() or c in "+-*":
                if after_call:
                    after_call = False
                    continue
                fields = line.split()
                if len(fields) > 1:
                    ir = int(fields[1])
                    files[fi] = files.get(fi, 0) + ir
                    functions[fn] = functions.get(fn, 0) + ir
            elif line.startswith("fl="):
                fl = fi = name("file", line[3:])
            elif line.startswith(("fi=", "fe=")):
                fi = name("file", line[3:])
            elif line.startswith("fn="):
                fn = name("fn", line[3:])
                fi = fl
            elif line.startswith(("cfi=", "cfl=")):
                name("file", line[4:])
            elif line.startswith("cfn="):
                name("fn", line[4:])
            elif line.startswith("calls="):
                after_call = True
    return files, functions


def part(files, folder):
    return sum(ir for path, ir in files.items() if f"src/{folder}/" in path and "/.cargo/" not in path)


def measure(binary, workers, log_format, args):
    run = Run(binary, workers, log_format)
    ok = False
    try:
        run.wait_ready(args.ready_timeout)
        if args.warmup:
            h2load(run.port, args.warmup, args.connections, args.run_timeout)
        time.sleep(0.3)
        run.control("--zero")
        answered = h2load(run.port, args.requests, args.connections, args.run_timeout)
        if answered != args.requests:
            raise RuntimeError(f"{answered} of {args.requests} requests got a 2xx")
        time.sleep(0.5)
        run.control("--dump=measured")
        dumps = run.dumps()
        if not dumps:
            raise RuntimeError("callgrind wrote no dump")
        dump = dumps[-1]
        total = total_ir(dump)
        files, functions = self_costs(dump)
        logged = None
        if log_format:
            # The measured requests' lines reach the file at the latest FLUSH_EVERY later.
            time.sleep(0.3)
            try:
                logged = sum(1 for _ in open(run.dir / "access.log", "rb"))
            except OSError:
                logged = 0
        ok = True
        return {
            "ir": total / args.requests,
            "metrics": part(files, "metrics") / args.requests,
            "logs": part(files, "logs") / args.requests,
            "logged": logged,
            "functions": {f: ir / args.requests for f, ir in functions.items()},
        }
    finally:
        run.stop()
        run.cleanup(keep=args.keep or not ok)


def fmt(x):
    return f"{x:,.0f}"


def spread(values):
    return f"{fmt(min(values))}-{fmt(max(values))}" if len(values) > 1 else "-"


def command():
    """The command line that made this report, with paths under the repository made relative."""
    words = ["python3", "benches/callgrind.py"]
    for arg in sys.argv[1:]:
        words.append(arg.replace(str(ROOT) + "/", ""))
    return " ".join(words)


def mean_functions(rounds):
    """Instructions per request by function, the mean of the rounds."""
    total = {}
    for r in rounds:
        for f, ir in r["functions"].items():
            total[f] = total.get(f, 0) + ir / len(rounds)
    return total


def report(results, args, labels):
    """Markdown lines for the results {(label, config): [round dicts]}."""
    base_label = labels[0]
    off = results.get((base_label, "off"))
    base = statistics.median(r["ir"] for r in off) if off else None
    rev = first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]) or "?"
    vg = first_line(["valgrind", "--version"]) or "valgrind"
    h2 = re.search(r"nghttp2/(\S+)", first_line(["h2load", "--version"]) or "")
    lines = [
        f"{time.strftime('%Y-%m-%d')}; {machine()}; corral {rev}, {vg}, h2load {h2.group(1) if h2 else '?'}, "
        f"Node {(first_line(['node', '--version']) or '?').lstrip('v')}.",
        "",
        f"{args.rounds} rounds; in each, per configuration: corral under callgrind (all its threads, its "
        f"{args.workers} Node hello workers not counted), {args.warmup:,} requests of warm-up, counters zeroed, "
        f"then exactly {args.requests:,} keep-alive HTTP/1.1 requests (`h2load --h1 -c{args.connections}`), "
        f"dumped. Instructions per request: medians (lowest-highest over the rounds). "
        f"Command: `{command()}`.",
        "",
        "| binary | access log | instructions / request | spread | vs no access log | on src/metrics/ lines | on src/logs/ lines |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for label in labels:
        own_off = results.get((label, "off"))
        own_base = statistics.median(r["ir"] for r in own_off) if own_off else None
        for config in args.configs:
            rounds = results.get((label, config))
            if not rounds:
                continue
            irs = [r["ir"] for r in rounds]
            med = statistics.median(irs)
            vs = f"{(med / own_base - 1) * 100:+.2f}%" if own_base and config != "off" else "-"
            metrics = statistics.median(r["metrics"] for r in rounds)
            logs = statistics.median(r["logs"] for r in rounds)
            lines.append(
                f"| {label} | {config} | {fmt(med)} | {spread(irs)} | {vs} | "
                f"{metrics:,.1f} ({metrics / med * 100:.2f}%) | {logs:,.1f} ({logs / med * 100:.2f}%) |"
            )
    notes = []
    for label in labels[1:]:
        other = results.get((label, "off"))
        if other and base:
            o = statistics.median(r["ir"] for r in other)
            notes.append(
                f"- {base_label} / {label}, no access log: {fmt(base)} against {fmt(o)} instructions per request, "
                f"{base - o:+,.0f} ({(base / o - 1) * 100:+.2f}%)"
            )
    for label in labels:
        for config in args.configs:
            for r in results.get((label, config), []):
                if r["logged"] is not None and r["logged"] < args.requests:
                    notes.append(f"- {label} {config}: only {r['logged']:,} lines in the access log after a round")
                    break
    lines += [""] + notes if notes else []
    # Against the other binaries (the measurement-only build without meters): where their
    # instructions differ, no access log. Inlining decisions differ between two builds too, so
    # some of these rows move instructions from one function to another and cancel out.
    base_fns = None
    for label in labels[1:]:
        if not off or not results.get((label, "off")):
            continue
        if base_fns is None:
            base_fns = mean_functions(off)
        other = mean_functions(results[(label, "off")])
        differ = sorted(
            ((base_fns.get(f, 0) - other.get(f, 0), f) for f in set(base_fns) | set(other)),
            key=lambda d: -abs(d[0]),
        )
        lines += [
            "",
            f"{base_label} minus {label}, no access log: the {args.top} functions whose own instructions "
            "(inlined code included) differ most, per request, mean of the rounds:",
            "",
            "| function | instructions / request |",
            "|---|---:|",
        ]
        for d, f in differ[: args.top]:
            lines.append(f"| `{f[:120]}` | {d:+,.1f} |")
    # Where the access log's instructions go: the functions whose own instructions (inlined code
    # included) grew most against no access log, per request, averaged over the rounds.
    if off:
        before = mean_functions(off)
        for config in args.configs:
            rounds = results.get((base_label, config))
            if config == "off" or not rounds:
                continue
            after = mean_functions(rounds)
            grown = sorted(((after.get(f, 0) - before.get(f, 0), f) for f in set(before) | set(after)), reverse=True)
            lines += [
                "",
                f"{base_label}, `{config}` against no access log: the {args.top} functions whose own instructions "
                "(inlined code included) grew most, per request, mean of the rounds:",
                "",
                "| function | more instructions / request |",
                "|---|---:|",
            ]
            for d, f in grown[: args.top]:
                lines.append(f"| `{f[:120]}` | {d:,.1f} |")
    return lines


def write_readme(lines):
    readme = ROOT / "README.md"
    text = readme.read_text()
    begin, end = "<!-- bench:callgrind -->", "<!-- /bench:callgrind -->"
    if begin not in text or end not in text:
        sys.exit(f"README.md has no {begin} ... {end} markers")
    before, rest = text.split(begin, 1)
    readme.write_text(before + begin + "\n" + "\n".join(lines) + "\n" + end + rest.split(end, 1)[1])
    print("README.md: callgrind table updated", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corral", help="the corral binary measured (label `corral`)")
    ap.add_argument("--bin", action="append", default=[], metavar="LABEL=PATH", help="another binary to measure beside it")
    ap.add_argument("--configs", default="off,combined,json", help="comma-separated: off, combined, json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--warmup", type=int, default=2_000)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--ready-timeout", type=float, default=120, help="s to wait for corral's workers under valgrind")
    ap.add_argument("--run-timeout", type=float, default=600, help="s one h2load run may take")
    ap.add_argument("--deadline", type=float, default=3600, help="s after which no new run starts")
    ap.add_argument("--top", type=int, default=12, help="functions listed per access log format")
    ap.add_argument("--keep", action="store_true", help="keep every run's temp dir (dumps, logs)")
    ap.add_argument("--readme", action="store_true", help="rewrite the bench:callgrind table in README.md")
    args = ap.parse_args()
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in args.configs:
        if c not in CONFIGS:
            sys.exit(f"unknown configuration {c!r} (off, combined, json)")
    for tool in ("valgrind", "callgrind_control", "h2load", "node"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found (valgrind: apt-get install valgrind; h2load: apt-get install nghttp2-client)")
    default = Path(
        args.corral
        or os.environ.get("CORRAL_BIN")
        or Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target") / "release" / "corral"
    )
    binaries = [("corral", default)]
    for spec in args.bin:
        label, _, path = spec.partition("=")
        if not path:
            sys.exit(f"--bin {spec!r}: expected LABEL=PATH")
        binaries.append((label, Path(path)))
    for _, path in binaries:
        if not os.access(path, os.X_OK):
            sys.exit(f"{path}: no such binary; build first: cargo build --release")

    # A SIGTERM to the harness still stops the corral it runs (measure's finally).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))
    start = time.monotonic()
    results = {}
    plan = [(label, path, config) for label, path in binaries for config in args.configs]
    for round_ in range(args.rounds):
        shift = round_ % len(plan)
        for label, path, config in plan[shift:] + plan[:shift]:
            if time.monotonic() - start > args.deadline:
                print(f"deadline of {args.deadline} s passed; no new run", file=sys.stderr)
                break
            t0 = time.monotonic()
            r = measure(path, args.workers, CONFIGS[config], args)
            results.setdefault((label, config), []).append(r)
            print(
                f"round {round_ + 1} {label} {config}: {r['ir']:,.1f} instructions/request "
                f"(metrics lines {r['metrics']:,.1f}, logs lines {r['logs']:,.1f}, log lines written {r['logged']}) "
                f"in {time.monotonic() - t0:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    lines = report(results, args, [label for label, _ in binaries])
    print("\n".join(lines))
    if args.readme:
        write_readme(lines)


if __name__ == "__main__":
    main()
