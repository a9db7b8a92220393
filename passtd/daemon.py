"""Composition root: set up the back-end, detach, run the dataplane on uvloop, shut down in order.

Everything that must happen before an event loop or a thread exists (forking the namespace child, creating
the tap, binding the passt socket, detaching) happens synchronously in `run`; the loop only serves.

Signals, once the loop runs:
- SIGTERM/SIGINT: STOPPING=1, stop accepting (the passt socket is closed and removed), stop the control
  server, reset every TCP flow, remove the PID file, exit 0.
- SIGHUP: parse the command line again, which re-reads the `--config` file, and apply what can change live:
  the port policy (`Dataplane.set_forwarding`: listeners are diffed, flows untouched) and the timeouts. A bad
  file is logged and the running configuration kept; without `--config` there is nothing to reload.
With $NOTIFY_SOCKET (systemd Type=notify), READY=1 is sent once the passt socket (or the tap) and the control
socket accept connections, STATUS= lines follow the guest, and WATCHDOG=1 at half of $WATCHDOG_USEC.
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
from passtd.dataplane.core.fwd import ForwardTables
from passtd.dataplane.core.timeouts import Timeouts
from passtd.dataplane.io.dataplane import Dataplane
from passtd.dataplane.io.pcap import PcapWriter
from passtd.dataplane.io.sockets import HostSockets
from passtd.dataplane.io.tap.qemu_stream import QemuStreamBackend, QemuStreamListener
from passtd.errors import BackendError, ConfigError
from passtd.logging import get_logger, setup_logging
from passtd.notify import Notifier

NETNS_POLL: Final = 0.5
CONTROL_GRACE: Final = 1.0
# Fields that a SIGHUP cannot change in a running process: they are set up before the loop starts.
_LIVE_FIELDS: Final = frozenset({"forward", "timeouts", "argv"})


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
    """SIGTERM/SIGINT/SIGHUP before the loop runs: remembered, acted on as soon as it does."""
    _early_signals.append(signal.Signals(signum).name)


def run(config: Config) -> int:
    """Start passtd with a parsed configuration; returns the process exit code."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _note_early_signal)
    try:
        setup_logging(config.debug, config.quiet, config.log_format, None, config.log_file, config.log_size)
    except OSError as exc:
        print(f"passtd: error: --log-file: cannot open {config.log_file}: {exc.strerror}", file=sys.stderr)
        return 1
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
        _detach(config.pid_file)
    elif config.pid_file:
        _write_pid(config.pid_file, os.getpid())
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


def _write_pid(path: str, pid: int) -> None:
    with open(path, "w") as f:
        f.write(f"{pid}\n")


def _detach(pid_file: str | None) -> None:
    """Classic double fork; the starter exits 0 only once the daemon's PID is on disk, so a caller that
    reads the PID file right after (libvirt does) never finds it empty.

    stderr goes to /dev/null too, as passt does: libvirt reads the starter's stderr until EOF, so a daemon
    holding it would hang libvirt. Detached without --log-file, logs are therefore discarded (passt would
    use syslog): run with --foreground under a supervisor, or give --log-file.
    """
    first = os.fork()
    if first > 0:
        _, status = os.waitpid(first, 0)  # the intermediate exits after recording the daemon's PID
        os._exit(os.waitstatus_to_exitcode(status))
    os.setsid()
    daemon = os.fork()
    if daemon > 0:
        code = 0
        if pid_file:
            try:
                _write_pid(pid_file, daemon)
            except OSError as exc:
                print(f"passtd: error: cannot write {pid_file}: {exc.strerror}", file=sys.stderr)
                os.kill(daemon, signal.SIGTERM)
                code = 1
        os._exit(code)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)


def _reload(current: Config, dp: Dataplane, notifier: Notifier) -> Config:
    """SIGHUP: the configuration to keep running with (the new one, or `current` when the new one is bad)."""
    log = get_logger()
    if current.config_file is None:
        log.info("config.reload.skipped", reason="no --config file was given: nothing to reload")
        return current
    from passtd.options import parse_args  # the daemon needs it only here

    notifier.reloading()
    try:
        new = parse_args(current.argv, current.host_view)
    except ConfigError as exc:
        message = " ".join(str(exc).split())
        log.error("config.reload.failed", file=current.config_file, error=message, kept="previous")
        notifier.ready(f"reload failed, previous configuration kept: {message}")
        return current
    except SystemExit:  # argv cannot hold --help here; never let a reload end the process
        return current
    if new.mode != current.mode:
        log.error("config.reload.failed", file=current.config_file, error=f"mode changed to {new.mode}",
                  kept="previous configuration")  # fmt: skip
        notifier.ready("reload failed: the mode cannot change, previous configuration kept")
        return current
    dp.set_forwarding(new.forward or ForwardTables(new.mode))
    dp.set_timeouts(new.timeouts)
    fixed = sorted(
        name
        for name in Config.__dataclass_fields__
        if name not in _LIVE_FIELDS and getattr(new, name) != getattr(current, name)
    )
    if fixed:
        log.warning("config.reload.restart_needed", fields=fixed)
    log.info("config.reloaded", file=new.config_file, **_policy_summary(new))
    notifier.ready(_status(new, "configuration reloaded"))
    return new


def _policy_summary(config: Config) -> dict[str, str]:
    forward = config.forward or ForwardTables(config.mode)
    return {"tcp_ports": forward.tcp_in.to_spec(), "udp_ports": forward.udp_in.to_spec()}


def _status(config: Config, what: str) -> str:
    where = config.socket_path if config.mode == "passt" else f"tap {config.ns_ifname}"
    control = f", control {config.control_path}" if config.control_path else ""
    return f"{what}: {where}{control}; tcp ports {_policy_summary(config)['tcp_ports']}"


async def _watchdog(notifier: Notifier, interval: float) -> None:
    """WATCHDOG=1 from the loop itself: a stalled loop stops the pings and systemd restarts us."""
    while True:
        notifier.ping()
        await asyncio.sleep(interval)


async def _serve(config: Config, pasta: PastaSetup | None, listener: QemuStreamListener | None) -> int:
    loop = asyncio.get_running_loop()
    log = get_logger()
    stop = asyncio.Event()
    exit_code = 0
    notifier = Notifier()
    current = config
    pcap = PcapWriter(config.pcap) if config.pcap else None
    sockets = HostSockets(config.outbound, config.outbound_if4, config.outbound_if6, config.freebind,
                          config.splice, config.host_lo_to_ns_lo)  # fmt: skip
    dp = Dataplane(config.ctx, loop, pcap, max_flows=config.max_flows, dns_forward=config.dns_forward,
                   dns_upstream=config.dns_upstream, vnet=pasta is not None, sockets=sockets)  # fmt: skip
    if pasta is not None:
        dp.netns_fd = pasta.netns_fd
    if config.forward is not None:
        dp.set_forwarding(config.forward)
    if config.timeouts != Timeouts():
        dp.set_timeouts(config.timeouts)
    control = None
    if config.control_path is not None or config.control_listen is not None:
        from passtd.control.server import TcpListen, start_control_server
        from passtd.daemon_api import DaemonControl

        directory = os.path.dirname(config.control_path or "")
        if directory:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        tcp = None
        if config.control_listen is not None:
            host, port = config.control_listen
            tcp = TcpListen(host, port, config.control_cert, config.control_key, config.control_client_ca,
                            config.control_insecure)  # fmt: skip
        try:
            control = await start_control_server(
                DaemonControl(config, dp), config.control_path, group=config.control_group, tcp=tcp
            )
        except (BackendError, ConfigError) as exc:
            dp.close()
            raise ControlStartError(str(exc)) from None
        log.info("control.listening", socket=config.control_path, tcp=config.control_listen)

    def on_stop(signame: str) -> None:
        log.info("passtd.signal", signal=signame)
        stop.set()

    def on_hup() -> None:
        nonlocal current
        log.info("passtd.signal", signal="SIGHUP")
        current = _reload(current, dp, notifier)

    loop.add_signal_handler(signal.SIGTERM, on_stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    if "SIGTERM" in _early_signals:
        on_stop("SIGTERM")
    if pasta is not None and pasta.child_pid is not None:
        loop.add_signal_handler(signal.SIGINT, lambda: None)  # the command in the foreground decides
    else:
        loop.add_signal_handler(signal.SIGINT, on_stop, "SIGINT")
        if "SIGINT" in _early_signals:
            on_stop("SIGINT")
    if "SIGHUP" in _early_signals:
        on_hup()

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
            notifier.status(_status(current, "guest connected"))

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
                    notifier.status(_status(current, "guest disconnected, waiting"))
                    if config.one_off:
                        stop.set()

        watcher_task = asyncio.create_task(watch_guest())

    # Both sockets accept connections from here on: the passt socket since bind(), the control one since
    # start_control_server(); in pasta mode the tap is attached.
    notifier.ready(_status(current, "serving" if pasta is not None else "waiting for a guest"))
    watchdog_task = None
    if notifier.enabled and notifier.watchdog is not None:
        watchdog_task = asyncio.create_task(_watchdog(notifier, notifier.watchdog))

    await stop.wait()
    notifier.stopping("stopping: resetting flows")
    watcher_task.cancel()
    if watchdog_task is not None:
        watchdog_task.cancel()
    if listener is not None:  # stop accepting first: no new guest while flows are reset
        loop.remove_reader(listener.sock.fileno())
        listener.close()
    if control is not None:
        from passtd.control.server import stop_control_server

        await stop_control_server(control, CONTROL_GRACE)
    dp.close()
    log.info("passtd.stopped")
    notifier.close()
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
