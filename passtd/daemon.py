"""Composition root: set up the back-end, detach, run the dataplane on uvloop, shut down in order.

Everything that must happen before an event loop or a thread exists (forking the namespace child, creating
the tap, binding the passt socket, detaching) happens synchronously in `run`; the loop only serves.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Final

import uvloop

from passtd.config import Config
from passtd.dataplane.io.dataplane import Dataplane
from passtd.dataplane.io.pcap import PcapWriter
from passtd.dataplane.io.tap.qemu_stream import QemuStreamBackend, QemuStreamListener
from passtd.errors import BackendError
from passtd.logging import get_logger, setup_logging

NETNS_POLL: Final = 0.5


class ControlStartError(Exception):
    """The control socket could not be opened (path in use, bad group): fatal at start-up."""


@dataclass(slots=True)
class PastaSetup:
    tap_fd: int
    child_pid: int | None
    watcher: object | None  # NetnsWatcher when attached to an existing namespace
    netns_fd: int | None = None  # for -T listeners and spliced loopback paths inside the namespace


_early_signals: list[str] = []


def _note_early_signal(signum: int, frame: object) -> None:
    """SIGTERM/SIGINT before the loop runs: remembered, acted on as soon as it does."""
    _early_signals.append(signal.Signals(signum).name)


def run(config: Config) -> int:
    """Start passtd with a parsed configuration; returns the process exit code."""
    signal.signal(signal.SIGTERM, _note_early_signal)
    signal.signal(signal.SIGINT, _note_early_signal)
    setup_logging(config.debug, config.quiet, config.log_format)
    log = get_logger()
    try:
        if config.mode == "pasta":
            pasta = _setup_pasta(config)
            listener = None
        else:
            pasta = None
            listener = _setup_passt(config)
    except BackendError as exc:
        print(f"passtd: error: {exc}", file=sys.stderr)
        return 1
    if not config.foreground and not (pasta is not None and pasta.child_pid is not None):
        _detach()
    if config.pid_file:
        with open(config.pid_file, "w") as f:
            f.write(f"{os.getpid()}\n")
    try:
        code = uvloop.run(_serve(config, pasta, listener))
    except ControlStartError as exc:
        print(f"passtd: error: {exc}", file=sys.stderr)
        code = 1
    try:
        if pasta is not None and pasta.child_pid is not None:
            code = _terminate_child(pasta.child_pid)
        return code
    finally:
        if listener is not None:
            listener.close()
        if config.pid_file:
            try:
                os.unlink(config.pid_file)
            except FileNotFoundError:
                pass
        log.info("passtd.exited")


def _setup_passt(config: Config) -> QemuStreamListener:
    assert config.socket_path is not None
    directory = os.path.dirname(config.socket_path)
    if directory:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    listener = QemuStreamListener(config.socket_path)
    get_logger().info("passt.listening", socket=config.socket_path)
    if not config.quiet:
        print(
            f"passtd: listening on {config.socket_path}; start qemu with: -device virtio-net-pci,netdev=s "
            f"-netdev stream,id=s,server=off,addr.type=unix,addr.path={config.socket_path}",
            file=sys.stderr,
        )
    return listener


def _setup_pasta(config: Config) -> PastaSetup:
    from passtd.dataplane.io import netns

    ctx = config.ctx if config.config_net else None
    if config.command is not None:
        argv = list(config.command) or [os.environ.get("SHELL") or "/bin/sh"]
        spawned = netns.spawn_in_new_netns(argv, config.ns_ifname, config.ctx.mtu, ctx, vnet_hdr=True)
        netns.enable_offload(spawned.tap_fd)
        return PastaSetup(spawned.tap_fd, spawned.pid, None, spawned.netns_fd)
    target: str | int
    if config.netns_pid is not None:
        target = config.netns_pid
    else:
        assert config.netns is not None
        target = config.netns
    netns_fd = netns.open_netns(target)
    tap_fd = netns.create_tap(netns_fd, config.ns_ifname, config.ctx.mtu, vnet_hdr=True)
    netns.enable_offload(tap_fd)
    if ctx is not None:
        netns.configure_netns(netns_fd, config.ns_ifname, ctx)
    return PastaSetup(tap_fd, None, netns.NetnsWatcher(target, netns_fd), netns_fd)


def _detach() -> None:
    """Classic double fork; the parent returns to the shell once the child runs."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)


async def _serve(config: Config, pasta: PastaSetup | None, listener: QemuStreamListener | None) -> int:
    loop = asyncio.get_running_loop()
    log = get_logger()
    stop = asyncio.Event()
    exit_code = 0
    pcap = PcapWriter(config.pcap) if config.pcap else None
    dp = Dataplane(config.ctx, loop, pcap, max_flows=config.max_flows, dns_forward=config.dns_forward,
                   dns_upstream=config.dns_upstream, vnet=pasta is not None)  # fmt: skip
    if pasta is not None:
        dp.netns_fd = pasta.netns_fd
    if config.forward is not None:
        dp.set_forwarding(config.forward)
    control = None
    if config.control_path is not None:
        from passtd.control.server import start_control_server
        from passtd.daemon_api import DaemonControl

        directory = os.path.dirname(config.control_path)
        if directory:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        try:
            control = await start_control_server(
                DaemonControl(config, dp), config.control_path, group=config.control_group
            )
        except BackendError as exc:
            dp.close()
            raise ControlStartError(str(exc)) from None
        log.info("control.listening", socket=config.control_path)

    def on_stop(signame: str) -> None:
        log.info("passtd.signal", signal=signame)
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_stop, "SIGTERM")
    if "SIGTERM" in _early_signals:
        on_stop("SIGTERM")
    if pasta is not None and pasta.child_pid is not None:
        loop.add_signal_handler(signal.SIGINT, lambda: None)  # the command in the foreground decides
    else:
        loop.add_signal_handler(signal.SIGINT, on_stop, "SIGINT")

    if pasta is not None:
        from passtd.dataplane.io.netns import wait_exit_status
        from passtd.dataplane.io.tap.tuntap import TunTapBackend

        dp.attach(TunTapBackend(pasta.tap_fd, vnet=True))

        async def watch_namespace() -> None:
            nonlocal exit_code
            while not stop.is_set():
                if pasta.child_pid is not None:
                    pid, status = os.waitpid(pasta.child_pid, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG
                    if pid:
                        exit_code = wait_exit_status(status)
                        log.info("pasta.command.exited", code=exit_code)
                        pasta.child_pid = None
                        stop.set()
                        return
                elif pasta.watcher is not None and pasta.watcher.gone():  # type: ignore[attr-defined]
                    log.info("pasta.netns.gone")
                    stop.set()
                    return
                try:
                    await asyncio.wait_for(stop.wait(), NETNS_POLL)
                except TimeoutError:
                    pass

        watcher_task = asyncio.create_task(watch_namespace())
    else:
        assert listener is not None

        def on_accept() -> None:
            conn = listener.accept()
            if conn is None:
                return
            if dp.tap is not None:
                log.warning("passt.guest.rejected", reason="a guest is already connected")
                conn.close()
                return
            dp.attach(QemuStreamBackend(conn, loop))
            log.info("passt.guest.connected")

        loop.add_reader(listener.sock.fileno(), on_accept)

        async def watch_guest() -> None:
            while not stop.is_set():
                waiter = asyncio.create_task(dp.disconnected.wait())
                stopper = asyncio.create_task(stop.wait())
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopper.cancel()
                if dp.disconnected.is_set() and dp.tap is None and not stop.is_set():
                    dp.disconnected.clear()
                    log.info("passt.guest.disconnected")
                    if config.one_off:
                        stop.set()

        watcher_task = asyncio.create_task(watch_guest())

    await stop.wait()
    watcher_task.cancel()
    if listener is not None:
        loop.remove_reader(listener.sock.fileno())
    if control is not None:
        from passtd.control.server import stop_control_server

        await stop_control_server(control, 1.0)
    dp.close()
    return exit_code


def _terminate_child(pid: int, grace: float = 5.0) -> int:
    """SIGTERM the spawned command, SIGKILL it after `grace` seconds; its exit code becomes ours."""
    from passtd.dataplane.io.netns import wait_exit_status

    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return 0
        if done:
            return wait_exit_status(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.05)
