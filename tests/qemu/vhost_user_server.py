"""The dataplane on a vhost-user socket, for the qemu tests, until `passtd passt --vhost-user` is wired in the
daemon (issue 16): `python vhost_user_server.py SOCK [passt options]`. It parses the same options as passtd,
serves one guest (TCP and UDP from the guest, DHCP, NDP, ping), and exits when that guest disconnects, like
`--one-off`. On exit it prints the back-end's drop counters and the reason the connection ended.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop

from passtd.config import Config
from passtd.dataplane.io.dataplane import Dataplane
from passtd.dataplane.io.vhost_user.backend import VhostUserBackend, VhostUserListener
from passtd.options import parse_args


async def serve(path: str, config: Config) -> int:
    loop = asyncio.get_running_loop()
    dp = Dataplane(
        config.ctx, loop, max_flows=config.max_flows, dns_forward=config.dns_forward,
        dns_upstream=config.dns_upstream, vnet=True, outbound=config.outbound,
    )  # fmt: skip
    listener = VhostUserListener(path)
    backends: list[VhostUserBackend] = []
    attached = asyncio.Event()

    def on_accept() -> None:
        conn = listener.accept()
        if conn is None:
            return
        if dp.tap is not None:
            conn.close()
            return
        backend = VhostUserBackend(conn, loop, mtu=config.ctx.mtu)
        backends.append(backend)
        dp.attach(backend)
        attached.set()

    loop.add_reader(listener.sock.fileno(), on_accept)
    print(f"vhost-user: listening on {path}", flush=True)
    try:
        await attached.wait()
        await dp.disconnected.wait()
    finally:
        loop.remove_reader(listener.sock.fileno())
        listener.close()
        dp.close()
    for backend in backends:
        print(f"vhost-user: ended ({backend.error or 'closed'}), drops {backend.drops}, "
              f"dropped_tx {backend.dropped_tx}, messages {backend.device.messages}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    # options are read before the loop starts: reading the host's view runs pyroute2's own loop
    sys.exit(uvloop.run(serve(sys.argv[1], parse_args(["passt", *sys.argv[2:]]))))  # as the daemon runs
