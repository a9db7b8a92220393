"""exec → the passt socket accepts a connection: how soon qemu can connect after `passt` is started.

Some libvirt versions start qemu about 8 ms after passt and qemu connects once; upstream passt listens within
about 20 ms. Runs `python -m passtd passt -f -q -s PATH --control none` N times (UNIX sockets in a temporary
directory only) and, for calibration, a bare interpreter that binds the same kind of socket.

    .venv/bin/python bench/startup.py [N]
"""

from __future__ import annotations

import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def exec_to_listening(argv: list[str], path: str) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - start < 10:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(path)
                    return (time.perf_counter() - start) * 1000
                except OSError:
                    pass
            time.sleep(0.0002)
        raise RuntimeError(f"{argv[2:]} did not listen within 10 s")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(label: str, make_argv: Callable[[str], list[str]], n: int) -> None:
    samples = []
    for _ in range(n):
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/g.socket"
            samples.append(exec_to_listening(make_argv(path), path))
    median, low, high = statistics.median(samples), min(samples), max(samples)
    sys.stdout.write(f"{label:<28} median {median:6.1f} ms  min {low:6.1f}  max {high:6.1f}  (n={n})\n")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    bare = "import socket, sys, time; s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1)"
    run("bare python bind+listen", lambda p: [sys.executable, "-c", bare + "; time.sleep(30)", p], n)
    passt = [sys.executable, "-m", "passtd", "passt", "-f", "-q", "--control", "none", "-a", "192.0.2.5"]
    run("passtd passt", lambda p: [*passt, "-s", p], n)


if __name__ == "__main__":
    main()
