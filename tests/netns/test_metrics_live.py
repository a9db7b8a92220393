"""--metrics-listen on a live pasta: scraped over HTTP by a real client and read with prometheus_client's
own parsers (classic text and OpenMetrics), after real TCP traffic and real control calls."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from tests.netns.conftest import REMOTE4, Topology, sh, wait_for
from tests.netns.test_control_live import TOOL, line, passtctl, spawn, start

pytestmark = pytest.mark.netns
PORT = 9464

SCRAPE = """
import sys, urllib.request
req = urllib.request.Request(sys.argv[1], headers={"Accept": sys.argv[2]})
with urllib.request.urlopen(req, timeout=10) as r:
    sys.stdout.write(r.headers["Content-Type"] + "\\n" + r.read().decode())
"""


def scrape(topo: Topology, accept: str = "text/plain") -> tuple[str, str]:
    out = sh(sys.executable, "-c", SCRAPE, f"http://127.0.0.1:{PORT}/metrics", accept, ns=topo.host)
    ctype, _, body = out.stdout.partition("\n")
    return ctype, body


def samples(body: str, openmetrics: bool = False) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    parse: Any = parse_openmetrics if openmetrics else text_string_to_metric_families
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value for family in parse(body) for s in family.samples
    }


def test_scrape_after_a_tcp_flow(topo: Topology) -> None:
    ctl = start(topo, "--metrics-listen", str(PORT))
    daemon = topo.daemons[-1]
    assert f"127.0.0.1:{PORT}" in daemon.output()
    server = spawn(topo, topo.host, sys.executable, TOOL, "serve", "127.0.0.1", "5131", "--first", "read",
                   "--size", "1000", "--timeout", "20")  # fmt: skip
    assert line(server) == "ready"
    sh(sys.executable, TOOL, "connect", REMOTE4, "5131", "--size", "5000", "--timeout", "20", ns=topo.guest)
    assert passtctl("-c", ctl, "status").returncode == 0
    assert passtctl("-c", ctl, "conns", "reset", "999999").returncode == 1  # NOT_FOUND, counted as such

    def closed() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        got = samples(scrape(topo)[1])
        fin = got.get(("passtd_flows_closed_total", (("protocol", "tcp"), ("reason", "fin"))), 0)
        return got if fin >= 1 else {}

    got = wait_for(closed, 10, "the flow counted as closed")
    assert got[("passtd_flows_opened_total", (("protocol", "tcp"),))] >= 1
    assert got[("passtd_bytes_total", (("direction", "from_guest"),))] > 5000
    assert got[("passtd_bytes_total", (("direction", "to_guest"),))] > 1000
    assert got[("passtd_frames_total", (("direction", "from_guest"),))] > 0
    assert got[("passtd_info", (("mode", "pasta"), ("version", got_version(got))))] == 1
    assert got[("passtd_guest_connected", ())] == 1
    calls = {k[1]: v for k, v in got.items() if k[0] == "passtd_control_calls_total"}
    assert calls.get((("code", "OK"), ("method", "GetStatus"))) == 1, calls
    assert calls.get((("code", "NOT_FOUND"), ("method", "ResetConnection"))) == 1, calls
    assert got[("passtd_flows_limit", (("protocol", "tcp"),))] > 0
    assert got[("passtd_descriptors_in_use", ())] > 0
    assert got[("passtd_process_open_fds", ())] > 0
    assert got[("passtd_process_resident_memory_bytes", ())] > 1e6
    assert ("passtd_tap_backlog_bytes", ()) in got
    # OpenMetrics when the scraper asks for it, as Prometheus does; its parser is the strict one (# EOF).
    ctype, body = scrape(topo, "application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")
    om = samples(body, openmetrics=True)
    assert om[("passtd_flows_opened_total", (("protocol", "tcp"),))] >= 1
    assert daemon.stop() == 0


def got_version(got: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> str:
    (version,) = [dict(labels)["version"] for name, labels in got if name == "passtd_info"]
    return version


RAW_FRAME = """
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
for _ in range(3):  # ethertype 0x88b5 (IEEE local experimental): nothing passtd speaks
    s.send(b"\\xff" * 6 + s.getsockname()[4] + b"\\x88\\xb5" + b"\\0" * 46)
"""


HOLD = """
import socket, sys, time
s = socket.socket(socket.AF_INET6); s.bind(("::", int(sys.argv[1]))); s.listen()
print("ready", flush=True); time.sleep(30)
"""


def test_drops_by_reason_listening_sockets_and_bind_failures(topo: Topology) -> None:
    holder = spawn(topo, topo.host, sys.executable, "-c", HOLD, "5142")  # port 5142 taken: -t 5142 fails
    assert line(holder) == "ready"
    start(topo, "--metrics-listen", f"127.0.0.1:{PORT}", "-t", "5141,5142")
    sh(sys.executable, "-c", RAW_FRAME, "eth0", ns=topo.guest)

    def dropped() -> float:
        got = samples(scrape(topo)[1])
        return got.get(("passtd_dropped_total", (("reason", "eth.unknown_ethertype"),)), 0)

    assert wait_for(dropped, 10, "the drops counted") == 3
    got = samples(scrape(topo)[1])
    assert got[("passtd_forward_listening_sockets", (("direction", "tcp_in"),))] == 2  # 5141: 0.0.0.0, ::
    assert got[("passtd_forward_bind_failures_total", (("direction", "tcp_in"),))] == 2  # both of 5142
