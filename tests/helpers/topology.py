"""The namespaces every real-network test and the benchmark run in: one home for the topology.

    guest ns  ──tap──  passtd (in host ns: 10.77.0.1/24, fd77::1/64)  ──veth──  remote ns (10.77.0.2, fd77::2;
                                                                                  10.88.0.1, fd88::1 on lo)

Nothing here touches the machine's own network: the host namespace's default route points at the remote
namespace, so whatever passtd sends "to the network" stays inside namespaces made here. The addresses are in
ranges that no test machine routes. Plain functions and iproute2, no pytest: bench/run.py uses it too.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HOST4, REMOTE4, FAR4 = "10.77.0.1", "10.77.0.2", "10.88.0.1"
HOST6, REMOTE6, FAR6 = "fd77::1", "fd77::2", "fd88::1"
HOST_DNS, HOST_SEARCH = "10.77.0.53", "passtd.test"


@dataclass(frozen=True)
class Names:
    """The three namespaces and the host's end of the veth pair (the remote's end is `eth0`)."""

    host: str
    remote: str
    guest: str
    veth: str


def _ip(*argv: str) -> None:
    proc = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()[:300]}")


@contextlib.contextmanager
def namespaces(prefix: str = "pd") -> Iterator[Names]:
    """Create host, remote and guest namespaces wired as above; delete them on exit, also after a failure.

    The host namespace's resolv.conf (what `ip netns exec` shows its processes) names HOST_DNS and
    HOST_SEARCH, so passtd there has nameservers to hand out; the others get an empty one, so that a DHCP
    client in the guest cannot read the machine's own.
    """
    sfx = secrets.token_hex(3)
    t = Names(f"{prefix}h-{sfx}", f"{prefix}r-{sfx}", f"{prefix}g-{sfx}", f"{prefix[:2]}v{sfx}")
    created: list[str] = []
    try:
        for ns in (t.host, t.remote, t.guest):
            _ip("netns", "add", ns)
            created.append(ns)
            Path(f"/etc/netns/{ns}").mkdir(parents=True, exist_ok=True)
            Path(f"/etc/netns/{ns}/resolv.conf").write_text("")
            _ip("-n", ns, "link", "set", "lo", "up")
        Path(f"/etc/netns/{t.host}/resolv.conf").write_text(f"nameserver {HOST_DNS}\nsearch {HOST_SEARCH}\n")
        _ip("link", "add", t.veth, "netns", t.host, "type", "veth", "peer", "name", "eth0", "netns", t.remote)
        for ns, dev, a4, a6 in ((t.host, t.veth, HOST4, HOST6), (t.remote, "eth0", REMOTE4, REMOTE6)):
            _ip("-n", ns, "addr", "add", f"{a4}/24", "dev", dev)
            _ip("-n", ns, "addr", "add", f"{a6}/64", "dev", dev, "nodad")
            _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", t.remote, "addr", "add", f"{FAR4}/32", "dev", "lo")
        _ip("-n", t.remote, "addr", "add", f"{FAR6}/128", "dev", "lo")
        _ip("-n", t.host, "route", "add", "default", "via", REMOTE4)
        _ip("-n", t.host, "-6", "route", "add", "default", "via", REMOTE6)
        yield t
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10, check=False)
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
