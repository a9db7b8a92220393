"""Processes started by the benchmark and the soak: each is ended by its own PID, also on failure.

Both scripts start daemons and peers inside namespaces, read their output, and must never leave one running
or end anything they did not start (no pkill); this is the one place that does it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def run_checked(
    *argv: str, timeout: float = 20, check: bool = True, error: type[Exception] = RuntimeError
) -> str:
    """Run a command to its end and return its stdout; `error` (with the exit status and the start of its
    stderr) when it fails and `check` is set."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise error(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()[:300]}")
    return proc.stdout


@dataclass
class Procs:
    """Every process a run starts, ended by `end`/`end_all` (SIGTERM, then SIGKILL after a grace)."""

    tmp: Path
    started: list[subprocess.Popen[str]] = field(default_factory=list)

    def spawn(
        self,
        ns: str | None,
        *argv: str,
        stdin: bool = False,
        log_name: str | None = None,
        log_stdout: bool = False,
        **kw: Any,
    ) -> subprocess.Popen[str]:
        """Start `argv` (inside `ns` when given: `ip netns exec` execs, so the PID is the command's). Its
        stderr goes to `log_name` under `tmp` when given, with its stdout too if `log_stdout`; otherwise the
        output is piped."""
        full = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
        log: Any = open(self.tmp / log_name, "w") if log_name else None  # noqa: SIM115 - closed at reaping
        proc = subprocess.Popen(
            full,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=log if log is not None and log_stdout else subprocess.PIPE,
            stderr=subprocess.STDOUT if log is not None and log_stdout else (log or subprocess.PIPE),
            text=True,
            **kw,
        )
        self.started.append(proc)
        return proc

    def end(self, proc: subprocess.Popen[str], grace: float = 3.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        with contextlib.suppress(ValueError):
            self.started.remove(proc)

    def end_all(self, grace: float = 1.0) -> None:
        for proc in list(self.started):
            self.end(proc, grace)
