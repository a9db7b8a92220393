"""A control server in its own process, for test_emfile.py: lowers its open-files limit, prints `ready`, then
on SIGUSR1 opens sockets until EMFILE (`full N`) and on SIGUSR2 closes them (`freed`)."""

from __future__ import annotations

import asyncio
import resource
import signal
import socket
import sys

from passtd.control.server import start_control_server, stop_control_server
from tests.control.samples import FakeControlAPI


async def main(path: str) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    server = await start_control_server(FakeControlAPI(), path)
    hog: list[socket.socket] = []
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    full = False

    def top_up() -> None:
        """Take every free descriptor, again every 50 ms: grpc closes finished connections on its own."""
        if not full:
            return
        try:
            while True:
                hog.append(socket.socket())
        except OSError:
            pass
        loop.call_later(0.05, top_up)

    def fill() -> None:
        nonlocal full
        full = True
        top_up()
        print(f"full {len(hog)}", flush=True)

    def free() -> None:
        nonlocal full
        full = False
        while hog:
            hog.pop().close()
        print("freed", flush=True)

    loop.add_signal_handler(signal.SIGUSR1, fill)
    loop.add_signal_handler(signal.SIGUSR2, free)
    loop.add_signal_handler(signal.SIGTERM, done.set)
    print("ready", flush=True)
    try:
        await asyncio.wait_for(done.wait(), 60)
    finally:
        await stop_control_server(server, 0)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
