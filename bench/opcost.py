"""Cost of one operation (guest connection, TCP or UDP round trip) in one tool: instructions, syscalls, CPU.

`bench/run.py` reports rates and CPU, which swing with the machine; deciding whether a change to the per-frame
code helps needs a count that does not. This runs one tool in the bench's namespaces, lets it settle, then
measures a fixed number of operations with one of:

- `--mode callgrind`: the tool runs under `valgrind --tool=callgrind`; user-space instructions (Ir) executed
  during the operations, from a zeroed counter to a dump (`callgrind_control`), divided by their number.
  Deterministic to within a fraction of a percent: use it to decide.
- `--mode strace`: `strace -f -c` attached for the operations; calls per operation, by syscall.
- `--mode cpu`: user and system CPU of the tool per operation (/proc, 10 ms ticks: use enough operations).

Usage (root, from a repository root; `--root` runs passtd from another checkout, for an A/B):

    .venv/bin/python bench/opcost.py --tool passtd --op cps --mode callgrind --count 300
    .venv/bin/python bench/opcost.py --tool pasta --op tcp_rr --mode strace --count 5000

Same network rule as bench/run.py: namespaces made here, traffic to the gateway (the host's loopback) only.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import run as br  # noqa: E402

OPS = {"cps": ("tcp-server", "cps", br.P_RR), "tcp_rr": ("tcp-server", "tcp-rr", br.P_RR),
       "udp_rr": ("udp-server", "udp-rr", br.P_UDP_RR)}  # fmt: skip


def start(t: br.Topo, procs: br.Procs, tool: str, root: Path, wrap: list[str], mtu: int) -> br.Running:
    """The tool as bench/run.py starts it, optionally under a wrapper (valgrind)."""
    fwd = ["-t", "none", "-u", "none", "-T", "none", "-U", "none", "--no-icmp"]
    common = ["-f", "-q", "-I", br.IF, "--netns", t.guest, "--config-net", "-m", str(mtu)]
    if tool == "passtd":
        py = str(root / ".venv" / "bin" / "python")
        argv = [*wrap, py, "-m", "passtd", "pasta", *common, *fwd, "--control", "none"]
        proc = procs.spawn(t.host, *argv, log_name="tool.log", cwd=root)
    else:
        proc = procs.spawn(t.host, *wrap, "pasta", "--runas", "0", *common, *fwd, log_name="tool.log")
    gw = br.wait_guest_ready(t, proc, timeout=120)
    br.sh("ip", "-n", t.guest, "link", "set", br.IF, "mtu", str(mtu))
    return br.Running(proc.pid, gw)


def client(c: br.Ctx, op: str, count: int) -> dict[str, Any]:
    _srv, mode, port = OPS[op]
    args = ["--count", str(count)]
    if op == "cps":
        args += ["--duration", "600"]
    else:
        args += ["--warmup", "0"]
    return br.peer_client(c, mode, port, *args, timeout=600)


@contextlib.contextmanager
def measuring(mode: str, pid: int, tmp: Path, procs: br.Procs) -> Iterator[dict[str, Any]]:
    """Yield a dict that is filled with the totals of what ran inside the block."""
    out: dict[str, Any] = {}
    if mode == "callgrind":
        br.sh("callgrind_control", "-z", str(pid), timeout=60)
        yield out
        br.sh("callgrind_control", "-d", str(pid), timeout=60)
        dumps = sorted(tmp.glob("callgrind.out*"), key=lambda p: p.stat().st_mtime)
        text = dumps[-1].read_text(errors="replace")
        m = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
        out["Ir"] = int(m.group(1)) if m else 0
        out["dump"] = str(dumps[-1])
    elif mode == "strace":
        log = tmp / "strace.txt"
        st = procs.spawn(None, "strace", "-f", "-c", "-o", str(log), "-p", str(pid))
        time.sleep(1.0)
        yield out
        procs.end(st, grace=10)  # SIGTERM: strace detaches and writes its summary
        out["calls"] = parse_strace(log.read_text())
    else:
        before = br.cpu_split(pid)
        yield out
        after = br.cpu_split(pid)
        out["usr_s"], out["sys_s"] = after[0] - before[0], after[1] - before[1]


def say(line: str, flush: bool = False) -> None:
    """The report goes to stdout (run.py's `log` writes progress to stderr)."""
    sys.stdout.write(line + "\n")
    if flush:
        sys.stdout.flush()


def parse_strace(text: str) -> dict[str, int]:
    calls: dict[str, int] = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 5 and f[0][0].isdigit() and f[-1] not in ("total",):
            # % time, seconds, usecs/call, calls, [errors], syscall
            calls[f[-1]] = int(f[3])
    return calls


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tool", choices=("passtd", "pasta"), default="passtd")
    p.add_argument("--op", choices=tuple(OPS), default="cps")
    p.add_argument("--mode", choices=("callgrind", "strace", "cpu"), default="callgrind")
    p.add_argument("--count", type=int, default=300, help="operations measured")
    p.add_argument("--warm", type=int, default=50, help="operations run before measuring")
    p.add_argument("--mtu", type=int, default=65520)
    p.add_argument("--root", type=Path, default=br.ROOT, help="checkout whose passtd (and .venv) runs")
    p.add_argument("--dump", type=Path, help="callgrind: keep the dump here (for callgrind_annotate)")
    a = p.parse_args()
    br.pin_cpu(None)
    with tempfile.TemporaryDirectory(prefix="opcost-") as d:
        tmp = Path(d)
        procs = br.Procs(tmp)
        try:
            with br.topology(tmp) as topo:
                wrap: list[str] = []
                if a.mode == "callgrind":
                    wrap = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/callgrind.out.%p",
                            "--vgdb=yes"]  # fmt: skip
                running = start(topo, procs, a.tool, a.root.resolve(), wrap, a.mtu)
                c = br.Ctx(topo, procs, running, a.mtu, 1, a.count, 600)
                srv_mode, _m, port = OPS[a.op]
                srv = br.peer_server(c, srv_mode, port)
                try:
                    if a.warm:
                        client(c, a.op, a.warm)
                    with measuring(a.mode, running.pid, tmp, procs) as out:
                        r = client(c, a.op, a.count)
                    if a.dump and "dump" in out:
                        shutil.copyfile(out["dump"], a.dump)
                finally:
                    procs.end(srv)
        finally:
            procs.end_all()
    n = r.get("connections", r.get("count", 0))
    say(f"{a.tool} {a.op} {a.mode}: {n} operations", flush=True)
    if n <= 0:
        return 1
    if a.mode == "callgrind":
        say(f"  user instructions per op: {out['Ir'] / n:,.0f}")
    elif a.mode == "strace":
        calls = out["calls"]
        total = sum(calls.values())
        say(f"  syscalls per op: {total / n:.2f}")
        for name, k in sorted(calls.items(), key=lambda kv: -kv[1]):
            if k / n >= 0.05:
                say(f"    {name:20} {k / n:7.2f}")
    else:
        say(f"  CPU per op: user {out['usr_s'] / n * 1e6:.1f} µs, system {out['sys_s'] / n * 1e6:.1f} µs")
        if "per_s" in r:
            say(f"  rate: {r['per_s']:.0f}/s")
        if "mean_us" in r:
            say(f"  mean {r['mean_us']:.1f} µs, p99 {r['p99_us']:.1f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
