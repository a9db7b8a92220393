"""pasta's `auto` forwarding: forward the ports that are bound on the other side, rescanned every second.

The kernel lists bound sockets in /proc/net/{tcp,tcp6,udp,udp6}, per network namespace: read from a thread
that joined the namespace (/proc/thread-self/net/...) for the namespace side, from our own for the host side.
Ports that passtd itself bound for forwarding are left out, or each side would keep mirroring the other's
listeners back.
"""

from __future__ import annotations

from typing import Final

TCP_LISTEN: Final = "0A"
UDP_UNCONNECTED: Final = "07"


def parse_bound_ports(text: str, state: str) -> set[int]:
    """Local ports of the sockets in `state` in one /proc/net/{tcp,udp}[6] table."""
    ports: set[int] = set()
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != state:
            continue
        _, _, port_hex = fields[1].rpartition(":")
        try:
            ports.add(int(port_hex, 16))
        except ValueError:
            continue
    ports.discard(0)
    return ports


def read_bound_ports(proto: str, proc_net: str = "/proc/thread-self/net") -> set[int]:
    """Ports bound for `proto` ("tcp": listening; "udp": unconnected) in the calling thread's namespace."""
    state = TCP_LISTEN if proto == "tcp" else UDP_UNCONNECTED
    ports: set[int] = set()
    for table in (proto, proto + "6"):
        try:
            with open(f"{proc_net}/{table}") as f:
                ports |= parse_bound_ports(f.read(), state)
        except OSError:
            continue
    return ports
