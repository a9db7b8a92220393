"""The dataplane on a vhost-user socket, for the qemu tests, until `passtd passt --vhost-user` is wired in the
daemon (issue 16): `python vhost_user_server.py SOCK [--keep] [passt options]`. It parses the same options as
passtd and serves one guest at a time (TCP and UDP from the guest, DHCP, NDP, ping). It exits when the guest
disconnects, like `--one-off`, unless `--keep` is given: then it waits for the next qemu, as passtd does
for a restarted one. After each guest it prints the back-end's drop counters and why the connection ended.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop

from passtd.config import Config
from passtd.dataplane.io.dataplane import Dataplane
from passtd.dataplane.io.guestsock import GuestListener
from passtd.dataplane.io.vhost_user.backend import VhostUserBackend
from passtd.options import parse_args


async def serve(path: str, config: Config, keep: bool) -> int:
    loop = asyncio.get_running_loop()
    dp = Dataplane(
        config.ctx, loop, max_flows=config.max_flows, dns_forward=config.dns_forward,
        dns_upstream=config.dns_upstream, vnet=True, outbound=config.outbound,
    )  # fmt: skip
    if config.forward is not None:
        dp.set_forwarding(config.forward)  # -t/-u, as the daemon applies them
    listener = GuestListener(path)
    current: list[VhostUserBackend] = []
    attached = asyncio.Event()

    def on_accept() -> None:
        conn = listener.accept()
        if conn is None:
            return
        if dp.tap is not None:
            conn.close()
            return
        current[:] = [VhostUserBackend(conn, loop, mtu=config.ctx.mtu)]
        dp.attach(current[0])
        attached.set()

    loop.add_reader(listener.sock.fileno(), on_accept)
    print(f"vhost-user: listening on {path}", flush=True)
    try:
        while True:
            await attached.wait()
            await dp.disconnected.wait()
            attached.clear()
            dp.disconnected.clear()
            backend = current[0]
            why = backend.error or "closed"
            print(f"vhost-user: ended ({why}), drops {backend.drops}, dropped_tx {backend.dropped_tx}, "
                  f"messages {backend.device.messages}", flush=True)  # fmt: skip
            if not keep:
                return 0
    finally:
        loop.remove_reader(listener.sock.fileno())
        listener.close()
        dp.close()


if __name__ == "__main__":
    path, args = sys.argv[1], sys.argv[2:]
    keep = bool(args) and args[0] == "--keep"
    # options are read before the loop starts: reading the host's view runs pyroute2's own loop
    config = parse_args(["passt", *args[keep:]])
    sys.exit(uvloop.run(serve(path, config, keep)))  # as the daemon runs
