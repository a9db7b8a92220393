"""Gross-regression guard for passtd's data path: a short bench/run.py run against the last record.

It fails only below 25 % of the newest figure committed under bench/results/ (never on a tight threshold: the
machine is noisy, and bench/run.py is where performance is judged). Two lines: TCP host→namespace through the
tap at MTU 65520 (`tcp_in`, a real tap data path that passtd sustains steadily), and the connection rate of a
host process through a forwarded port on the host's loopback (`fwd_lo_cps`, the per-connection cost of the
spliced path). And passt mode over vhost-user (`passtd-vhost`): TCP host→guest through bench/vhost_front.py,
the rings' data path with 64 KiB TSO segments.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MTU = 65520
FLOOR = 0.25
# (tool, bench line) -> the figure it yields
GUARDED = {("passtd", "tcp_in"): "tcp_in_gbps", ("passtd", "fwd_lo_cps"): "fwd_lo_cps",
           ("passtd-vhost", "tcp_in"): "tcp_in_gbps"}  # fmt: skip


def figure(result: dict[str, Any], tool: str, metric: str) -> float | None:
    for s in result.get("summary", []):
        if (s.get("metric"), s.get("mtu"), s.get("tool")) == (metric, MTU, tool):
            return float(s["median"])
    return None


def last_recorded(tool: str, metric: str) -> tuple[Path, float] | None:
    """Newest result file (names start with the UTC date and time) that has the guarded figure."""
    for path in sorted(RESULTS.glob("*.json"), reverse=True):
        try:
            value = figure(json.loads(path.read_text()), tool, metric)
        except (OSError, ValueError):
            continue
        if value:
            return path, value
    return None


@pytest.mark.parametrize(("tool", "line"), sorted(GUARDED))
def test_passtd_not_grossly_regressed(tool: str, line: str, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    if not os.path.exists("/dev/net/tun") or shutil.which("iperf3") is None or shutil.which("ip") is None:
        pytest.skip("needs /dev/net/tun, iperf3 and iproute2")
    metric = GUARDED[tool, line]
    record = last_recorded(tool, metric)
    if record is None:
        pytest.skip(f"no recorded {tool} {metric} at MTU {MTU} under bench/results/")
    path, recorded = record
    out = tmp_path / "guard.json"
    argv = [sys.executable, str(ROOT / "bench" / "run.py"), "--tools", tool, "--lines", line,
            "--mtu", str(MTU), "--passt-mtu", str(MTU), "--reps", "1", "--duration", "2",
            "--cps-seconds", "1", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    now = figure(result, tool, metric)
    assert now is not None, f"no measurement: {result.get('notes')}"
    what = f"{tool} {metric} at MTU {MTU}: {now:.3g}"
    assert now >= FLOOR * recorded, f"{what} < {FLOOR:.0%} of {recorded:.3g} recorded in {path.name}"
