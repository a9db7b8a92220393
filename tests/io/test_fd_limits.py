"""Descriptor exhaustion, for real: a dataplane in a child process whose RLIMIT_NOFILE hard limit is 256.

Phase 1 floods UDP ports: the UDP cap (a share of the 256) stops the flows, each refused datagram gets ICMP
port unreachable, and the process keeps descriptors free. Phase 2 takes every remaining descriptor behind the
dataplane's back: new UDP flows then meet EMFILE itself, and a connection to a forwarded TCP port meets it in
accept(). Both are counted and refused; no `Too many open files` traceback, no spinning loop.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent

CHILD = r"""
import json, os, resource, socket
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
from passtd.dataplane.core.fwd import ForwardTables
from tests.io.test_guest_abuse import GuestRig, drain, receiver, udp_frame

r = GuestRig()
out = {"limits": {"open_files": r.dp.limits.open_files, "udp_max": r.dp.limits.udp.max}}
rx = receiver()
port = rx.getsockname()[1]
for i in range(0, 600, 100):
    r.send([udp_frame(30000 + j, port, b"x") for j in range(i, i + 100)])
    r.run(0.02)
out["phase1"] = {
    "delivered": len(drain(rx)),
    "udp_used": r.dp.limits.udp.used,
    "refused": r.dp.stats.dropped["limit.udp_flows"],
    "unreachable": sum(1 for f in r.frames() if f[23] == 1),
    "free_fds": 256 - len(os.listdir("/proc/self/fd")),
}
r.dp.udp.close_all("test")
probe = socket.socket()
probe.bind(("127.0.0.1", 0))
lport = probe.getsockname()[1]
probe.close()
assert all(b.ok for b in r.dp.set_forwarding(ForwardTables("passt").replace("tcp_in", f"127.0.0.1/{lport}")))
hog = []
while True:
    try:
        hog.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        break
r.send([udp_frame(31000 + j, port, b"y") for j in range(10)])
r.run(0.02)
os.close(hog.pop())
client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
client.setblocking(False)
client.connect_ex(("127.0.0.1", lport))
r.run(0.2)
try:
    client.setblocking(True)
    client.settimeout(1)
    shed = "eof" if client.recv(1) == b"" else "data"
except ConnectionResetError:
    shed = "reset"
except OSError as exc:
    shed = type(exc).__name__
for fd in hog:
    os.close(fd)
out["phase2"] = {
    "fd_exhausted": r.dp.stats.dropped["fd.exhausted"],
    "unreachable": sum(1 for f in r.frames() if f[23] == 1),
    "client": shed,
}
out["errors"] = [str(e.get("exception") or e.get("message")) for e in r.errors]
client.close()
rx.close()
r.close()
print("RESULT " + json.dumps(out))
"""


def test_descriptor_exhaustion_is_counted_and_refused_never_a_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OSError" not in proc.stdout + proc.stderr  # debug lines may name EMFILE; no traceback may
    assert "Traceback" not in proc.stdout + proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT ") :])
    assert out["limits"]["open_files"] == 256
    cap = out["limits"]["udp_max"]
    assert 0 < cap < 128
    p1 = out["phase1"]
    assert p1["delivered"] == p1["udp_used"] == cap
    assert p1["refused"] == p1["unreachable"] == 600 - cap
    assert p1["free_fds"] >= 64  # the reserve (control socket, tap, ...) untouched by the flood
    p2 = out["phase2"]
    assert p2["fd_exhausted"] >= 11  # ten UDP flows and the accept()
    assert p2["fd_exhausted"] < 40  # shed, not spinning on a readable listener
    assert p2["unreachable"] == 10
    assert p2["client"] == "reset"
    assert out["errors"] == []
