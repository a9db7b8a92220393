"""Composition root: set up the back-end, detach, run the dataplane on uvloop, shut down in order.

Everything that must happen before an event loop or a thread exists (forking the namespace child, joining
a user namespace, creating the tap, adopting --fd, detaching) happens synchronously in `run`; the loop only
serves, its own tasks in one TaskGroup. Detached, the starter process waits on a pipe until the daemon says
it is ready (guest socket or --fd, control socket, PID file) or why it is not (`Starter`). The option layer
is not imported here: the entry point passes a re-parse callable for SIGHUP.

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
import gc
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

import uvloop

from passtd.caps import PASTA_KEEPS, change_user
from passtd.config import Config, runtime_dir
from passtd.dataplane.core.fwd import ForwardTables
from passtd.dataplane.core.timeouts import Timeouts
from passtd.dataplane.io.dataplane import Dataplane
from passtd.dataplane.io.guestsock import GuestListener, adopt_stream_socket
from passtd.dataplane.io.hostview import HostView
from passtd.dataplane.io.pcap import PcapWriter
from passtd.dataplane.io.sockets import HostSockets
from passtd.dataplane.io.tap.base import TapBackend
from passtd.dataplane.io.tap.qemu_stream import QemuStreamBackend
from passtd.errors import BackendError, ConfigError
from passtd.logging import debug_enabled, get_logger, setup_logging
from passtd.notify import Notifier

Reparse: TypeAlias = Callable[[Sequence[str], HostView | None], Config]

NETNS_POLL: Final = 0.5
CONTROL_GRACE: Final = 1.0
# Fields that a SIGHUP cannot change in a running process: they are set up before the loop starts.
_LIVE_FIELDS: Final = frozenset({"forward", "timeouts", "argv", "egress", "rate_limits"})


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


class StartError(Exception):
    """Start-up failed for a reason the user can act on: reported as one line, exit 1."""


class Starter:
    """Tells whoever started us how start-up went: the parent process through a pipe once detached (it
    waits, then exits 0 or prints our one-line reason and exits 1), else our own stderr.

    passt's contract with libvirt and QEMU: the starter returns only when the guest socket (or --fd), the
    control socket and the PID file are all ready, so a caller that connects or reads the PID file right
    after finds them; and a daemon that dies before that is reported by the starter, not lost.
    """

    def __init__(self) -> None:
        self._pipe: int | None = None
        self.detached = False
        self.reported = False

    def detach(self) -> None:
        """Double fork; the original process waits on the pipe and exits with the daemon's verdict.

        The daemon's stdio goes to /dev/null, as passt's does: libvirt reads the starter's stderr until EOF,
        so a daemon holding it would hang libvirt. Detached without --log-file, logs are discarded (passt
        would use syslog): run with --foreground under a supervisor, or give --log-file.
        """
        read_end, write_end = os.pipe()
        first = os.fork()
        if first > 0:
            os.close(write_end)
            os.waitpid(first, 0)
            os._exit(_starter_verdict(read_end))
        os.close(read_end)
        os.setsid()
        if os.fork() > 0:
            os._exit(0)
        self._pipe = write_end
        self.detached = True
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)

    def ready(self) -> None:
        self._send(b"ok\n")

    def fail(self, message: str) -> None:
        """One line to the user: on our stderr in the foreground, else through the pipe while the starter
        still waits (after that, stderr is /dev/null and only the log hears of it)."""
        line = " ".join(message.split())
        if not self.detached:
            print(f"passtd: error: {line}", file=sys.stderr)
            self.reported = True
            return
        self._send(b"err:" + line.encode(errors="replace")[:4000] + b"\n")

    def _send(self, data: bytes) -> None:
        if self.reported:
            return
        self.reported = True
        if self._pipe is None:
            return
        try:
            os.write(self._pipe, data)
        except OSError:
            pass  # the starter is gone: nobody left to tell
        os.close(self._pipe)
        self._pipe = None


def _starter_verdict(read_end: int) -> int:
    """In the starter: 0 once the daemon says it is ready, else print its reason (or that it died) → 1."""
    chunks = []
    while True:
        try:
            chunk = os.read(read_end, 4096)
        except InterruptedError:
            continue
        if not chunk:
            break
        chunks.append(chunk)
    message = b"".join(chunks).decode(errors="replace").strip()
    if message == "ok":
        return 0
    reason = message.removeprefix("err:") or "the daemon exited before it was ready"
    os.write(2, f"passtd: error: {reason}\n".encode(errors="replace"))
    return 1


def run(
    config: Config,
    reparse: Reparse | None = None,
    listener: GuestListener | None = None,
) -> int:
    """Start passtd with a parsed configuration; returns the process exit code.

    `reparse` builds a new Config from the same command line on SIGHUP (the entry point passes the option
    layer's; None disables reloading); `listener` is the guest socket when the entry point bound it early.
    """
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _note_early_signal)
    starter = Starter()
    try:
        return _run(config, reparse, listener, starter)
    except (StartError, BackendError, ConfigError) as exc:
        starter.fail(str(exc))
        return 1
    except Exception as exc:  # never a traceback on the user's terminal
        while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:  # a task of the TaskGroup
            exc = exc.exceptions[0]
        starter.fail(f"internal error: {type(exc).__name__}: {exc}")
        get_logger().error("passtd.crashed", error=f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        if listener is not None:
            listener.close()


def _run(config: Config, reparse: Reparse | None, listener: GuestListener | None, starter: Starter) -> int:
    try:
        setup_logging(config.debug, config.quiet, config.log_format, None, config.log_file, config.log_size,
                      errors_only=_interactive_pasta(config))  # fmt: skip
    except OSError as exc:
        raise StartError(f"--log-file: cannot open {config.log_file}: {exc.strerror}") from None
    log = get_logger()
    guest: socket.socket | None = None
    pasta = None
    if config.mode == "pasta":
        pasta = _setup_pasta(config)
    elif config.fd is not None:
        guest = adopt_stream_socket(config.fd)  # with --vhost-user, the vhost-user protocol runs over it
    else:
        if listener is None:
            listener = _setup_passt(config)
        log.info("passt.listening", socket=config.socket_path)
        if not config.quiet:
            netdev = (
                f"-chardev socket,id=c,path={config.socket_path} -netdev vhost-user,id=s,chardev=c "
                "(guest memory shared: -object memory-backend-memfd,id=m,size=...,share=on "
                "-machine memory-backend=m)"
                if config.vhost_user
                else f"-netdev stream,id=s,server=off,addr.type=unix,addr.path={config.socket_path}"
            )
            print(
                f"passtd: listening on {config.socket_path}; start qemu with: -device virtio-net-pci,"
                f"netdev=s {netdev}",
                file=sys.stderr,
            )
    if not config.foreground and not (pasta is not None and pasta.child_pid is not None):
        starter.detach()
    code = 1
    try:
        if config.pid_file:
            _write_pid(config.pid_file, os.getpid())
        code = uvloop.run(_serve(config, pasta, listener, guest, reparse, starter))
    finally:
        if listener is not None:
            listener.close()
        if pasta is not None and pasta.child_pid is not None:
            code = _terminate_child(pasta.child_pid)  # the command's status is ours (an exception stays 1)
        if config.pid_file:
            try:
                os.unlink(config.pid_file)
            except OSError:
                pass
        log.info("passtd.exited")
    return code


def _interactive_pasta(config: Config) -> bool:
    """pasta running a command in the foreground on the user's terminal: our lines would land in their
    shell. Only errors go there then; -d, --log-file or the journal ($JOURNAL_STREAM) bring the rest."""
    return (
        config.mode == "pasta"
        and config.command is not None
        and config.log_file is None
        and not os.environ.get("JOURNAL_STREAM")
        and os.isatty(2)
    )


def _setup_passt(config: Config) -> GuestListener:
    """The guest socket, when the entry point did not bind it early (the default path, or a test)."""
    assert config.socket_path is not None
    directory = os.path.dirname(config.socket_path)
    if directory and directory == runtime_dir(os.environ):
        _make_runtime_dir(directory)
    return GuestListener(config.socket_path)


def _make_runtime_dir(directory: str) -> None:
    """Our own runtime directory is the one directory we create (passt refuses a missing one elsewhere)."""
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise StartError(f"cannot create {directory}: {exc.strerror}") from None


def _setup_pasta(config: Config) -> PastaSetup:
    from passtd.dataplane.io import netns

    ctx = config.ctx if config.config_net else None
    tap_mtu = config.ctx.mtu if config.ctx.assign_mtu else 0  # -m 0: the tap keeps the kernel's default
    if config.command is not None:
        argv = list(config.command) or [os.environ.get("SHELL") or "/bin/sh"]
        spawned = netns.spawn_in_new_netns(argv, config.ns_ifname, tap_mtu, ctx, vnet_hdr=True)
        netns.enable_offload(spawned.tap_fd)
        return PastaSetup(spawned.tap_fd, spawned.pid, None, spawned.netns_fd)
    target: str | int
    if config.netns_pid is not None:
        target = config.netns_pid
    else:
        assert config.netns is not None
        target = config.netns
    if config.userns is not None:
        netns.join_userns(config.userns)  # before any thread exists: setns(CLONE_NEWUSER) needs that
    netns_fd = netns.open_netns(target)
    tap_fd = netns.create_tap(netns_fd, config.ns_ifname, tap_mtu, vnet_hdr=True, mac=config.ns_mac)
    netns.enable_offload(tap_fd)
    if ctx is not None:
        netns.configure_netns(netns_fd, config.ns_ifname, ctx)
    watcher = netns.NetnsWatcher(target, netns_fd) if config.netns_quit else None
    return PastaSetup(tap_fd, None, watcher, netns_fd)


def _write_pid(path: str, pid: int) -> None:
    try:
        with open(path, "w") as f:
            f.write(f"{pid}\n")
    except OSError as exc:
        raise StartError(f"--pid: cannot write {path}: {exc.strerror}") from None


def _drop_privileges(runas: tuple[int, int], pasta: bool) -> None:
    """--runas: give up root once every socket and file is open (passt's isolate_user, without its user
    namespace). passt mode keeps no capability; pasta keeps the two it still uses (caps.py)."""
    uid, gid = runas
    if (os.getuid(), os.getgid()) == (uid, gid):
        return
    try:
        change_user(uid, gid, PASTA_KEEPS if pasta else frozenset())
    except OSError as exc:
        raise StartError(f"--runas: cannot change to {uid}:{gid}: {exc.strerror}") from None


def _apply_file_policy(dp: Dataplane, new: Config, old: Config | None) -> None:
    """The config file's egress rules and rate limits, at start (`old` None) and on SIGHUP. A file without
    egress keys leaves rules set at run time alone; a [limits] table that changed wins over the control API's,
    an unchanged one leaves them."""
    if new.egress is not None:
        dp.set_egress(new.egress)
    if new.rate_limits != (old.rate_limits if old is not None else None):
        dp.set_rate_limits(*(new.rate_limits or (None, None)))


def _reload(current: Config, dp: Dataplane, notifier: Notifier, reparse: Reparse | None) -> Config:
    """SIGHUP: the configuration to keep running with (the new one, or `current` when the new one is bad)."""
    log = get_logger()
    if current.config_file is None or reparse is None:
        log.info("config.reload.skipped", reason="no --config file was given: nothing to reload")
        return current
    notifier.reloading()
    try:
        new = reparse(current.argv, current.host_view)
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
    _apply_file_policy(dp, new, current)
    fixed = sorted(
        name
        for name in Config.__dataclass_fields__
        if name not in _LIVE_FIELDS and getattr(new, name) != getattr(current, name)
    )
    if fixed:
        log.warning("config.reload.restart_needed", options=changed_options(current, new, fixed))
    log.info("config.reloaded", file=new.config_file, **_policy_summary(new))
    notifier.ready(_status(new, "configuration reloaded"))
    return new


# Config and Context fields → the options that set them, for reload messages (the rest: --field-name).
_OPTION_OF_FIELD: Final = {
    "socket_path": "--socket", "pid_file": "--pid", "pcap": "--pcap", "control_path": "--control",
    "netns_pid": "PID", "command": "the command", "ns_ifname": "--ns-ifname", "debug": "--debug",
    "log_format": "--log-format", "pesto_path": "--conf-path", "ns_mac": "--ns-mac-addr",
    "netns_quit": "--no-netns-quit", "splice": "--no-splice", "dns_upstream": "the host's nameservers",
    "one_off": "--one-off", "runas": "--runas", "fd": "--fd",
    # ctx
    "our_mac": "--mac-addr", "mtu": "--mtu", "ip4": "IPv4 (-a/-n/-g/--dns)", "ip6": "IPv6 (-a/-g/--dns)",
    "search": "--search", "dhcp": "--no-dhcp", "ndp": "--no-ndp", "dhcpv6": "--no-dhcpv6", "ra": "--no-ra",
    "icmp": "--no-icmp", "map_gw": "--no-map-gw", "tcp": "--no-tcp", "udp": "--no-udp",
    "hostname": "--hostname", "fqdn": "--fqdn", "dhcp_dns": "--dhcp-dns", "dhcp_search": "--dhcp-search",
    "map_host_loopback4": "--map-host-loopback", "map_host_loopback6": "--map-host-loopback",
    "map_guest_addr4": "--map-guest-addr", "map_guest_addr6": "--map-guest-addr",
}  # fmt: skip


def changed_options(old: Config, new: Config, fields: Sequence[str]) -> list[str]:
    """The options behind changed Config fields, as a user wrote them (`--mtu`, not `ctx`): the guest's
    settings live in one `ctx` field, which is looked into."""
    names: list[str] = []
    for name in fields:
        if name == "ctx":
            inner = [
                f for f in type(old.ctx).__dataclass_fields__ if getattr(old.ctx, f) != getattr(new.ctx, f)
            ]
            names += [_OPTION_OF_FIELD.get(f, "--" + f.replace("_", "-")) for f in inner]
        else:
            names.append(_OPTION_OF_FIELD.get(name, "--" + name.replace("_", "-")))
    return sorted(dict.fromkeys(names))


def startup_summary(config: Config) -> dict[str, object]:
    """What the guest is given and how to reach us, for one info line at start (as passt prints it)."""
    ctx = config.ctx
    forward = config.forward or ForwardTables(config.mode)
    if config.mode == "pasta":
        backend = f"tap {config.ns_ifname}"
    else:
        where = f"fd {config.fd}" if config.fd is not None else config.socket_path
        backend = f"{'vhost-user' if config.vhost_user else 'qemu stream'} {where}"
    out: dict[str, object] = {"mode": config.mode, "backend": backend, "mtu": ctx.mtu}
    if ctx.ip4 is not None:
        out.update(address4=f"{ctx.ip4.addr}/{ctx.ip4.prefix_len}", gateway4=str(ctx.ip4.gateway),
                   dns4=[str(a) for a in ctx.ip4.dns])  # fmt: skip
    else:
        out["ipv4"] = "disabled"
    if ctx.ip6 is not None:
        out.update(address6=f"{ctx.ip6.addr}/{ctx.ip6.prefix_len}", gateway6=str(ctx.ip6.gateway),
                   dns6=[str(a) for a in ctx.ip6.dns])  # fmt: skip
    else:
        out["ipv6"] = "disabled"
    out["search"] = list(ctx.search)
    v4, v6 = ctx.ip4 is not None, ctx.ip6 is not None
    services = (("dhcp", ctx.dhcp and v4), ("ndp", ctx.ndp and v6), ("dhcpv6", ctx.dhcpv6 and v6),
                ("ra", ctx.ra and v6))  # fmt: skip
    out["services"] = ",".join(name for name, on in services if on) or "none"
    out["tcp_in"], out["udp_in"] = forward.tcp_in.to_spec(), forward.udp_in.to_spec()
    if config.mode == "pasta":
        out["tcp_out"], out["udp_out"] = forward.tcp_out.to_spec(), forward.udp_out.to_spec()
    out["control"] = config.control_path or "none"
    if config.control_listen is not None:
        out["control_tcp"] = _hostport(config.control_listen)
    if config.metrics_listen is not None:
        out["metrics"] = _hostport(config.metrics_listen)
    return out


def _policy_summary(config: Config) -> dict[str, str]:
    forward = config.forward or ForwardTables(config.mode)
    return {"tcp_ports": forward.tcp_in.to_spec(), "udp_ports": forward.udp_in.to_spec()}


def _hostport(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _status(config: Config, what: str) -> str:
    where = config.socket_path if config.mode == "passt" else f"tap {config.ns_ifname}"
    control = f", control {config.control_path}" if config.control_path else ""
    return f"{what}: {where}{control}; tcp ports {_policy_summary(config)['tcp_ports']}"


async def _watchdog(notifier: Notifier, interval: float) -> None:
    """WATCHDOG=1 from the loop itself: a stalled loop stops the pings and systemd restarts us."""
    while True:
        notifier.ping()
        await asyncio.sleep(interval)


async def _serve(
    config: Config,
    pasta: PastaSetup | None,
    listener: GuestListener | None,
    guest: socket.socket | None,
    reparse: Reparse | None,
    starter: Starter,
) -> int:
    loop = asyncio.get_running_loop()
    log = get_logger()
    stop = asyncio.Event()
    exit_code = 0
    notifier = Notifier()
    current = config
    pcap = PcapWriter(config.pcap) if config.pcap else None
    sockets = HostSockets(config.outbound, config.outbound_if4, config.outbound_if6, config.freebind,
                          config.splice, config.host_lo_to_ns_lo)  # fmt: skip
    dp = Dataplane(config.ctx, loop, pcap, max_flows=config.max_flows,
                   vnet=pasta is not None or config.vhost_user, sockets=sockets)  # fmt: skip
    if pasta is not None:
        dp.netns_fd = pasta.netns_fd
    if config.forward is not None:
        dp.set_forwarding(config.forward)
    if config.timeouts != Timeouts():
        dp.set_timeouts(config.timeouts)
    _apply_file_policy(dp, config, None)
    if debug_enabled():  # -d: every flow's open and close (a watcher only then: none costs nothing)
        from passtd.daemon_api import FlowLog

        dp.watchers.append(FlowLog(get_logger(component="flow")))
    metrics = rpcs = None
    if config.metrics_listen is not None:
        from passtd.control.metrics import FlowCounters, MetricsServer, RpcCounters
        from passtd.daemon_api import DaemonControl

        flows, rpcs = FlowCounters(), RpcCounters()
        dp.watchers.append(flows)  # only with metrics on: each watcher costs the data path an event object
        metrics = MetricsServer(DaemonControl(config, dp), flows, rpcs)
        try:
            bound = await metrics.start(*config.metrics_listen)
        except OSError as exc:
            dp.close()
            raise StartError(f"--metrics-listen: cannot listen on {_hostport(config.metrics_listen)}: "
                             f"{exc.strerror or exc}") from None  # fmt: skip
        log.info("metrics.listening", address=_hostport(bound))
    control = None
    if config.control_path is not None or config.control_listen is not None:
        from passtd.control.server import TcpListen, start_control_server
        from passtd.daemon_api import DaemonControl

        directory = os.path.dirname(config.control_path or "")
        if directory and directory == runtime_dir(os.environ):
            _make_runtime_dir(directory)
        tcp = None
        if config.control_listen is not None:
            host, port = config.control_listen
            tcp = TcpListen(host, port, config.control_cert, config.control_key, config.control_client_ca,
                            config.control_insecure)  # fmt: skip
        try:
            control = await start_control_server(
                DaemonControl(config, dp), config.control_path, group=config.control_group, tcp=tcp, rpcs=rpcs
            )
        except (BackendError, ConfigError) as exc:
            if metrics is not None:
                await metrics.close()
            dp.close()
            raise StartError(str(exc)) from None
        log.info("control.listening", socket=config.control_path, tcp=config.control_listen)
    pesto = None
    if config.pesto_path is not None:
        from passtd.control.pesto import start_pesto_server
        from passtd.daemon_api import DaemonControl

        try:
            pesto = await start_pesto_server(config.pesto_path, DaemonControl(config, dp), loop)
        except BackendError as exc:
            if control is not None:
                from passtd.control.server import stop_control_server

                await stop_control_server(control, 0)
            if metrics is not None:
                await metrics.close()
            dp.close()
            raise StartError(f"-c/--conf-path: {exc}") from None
        log.info("pesto.listening", socket=config.pesto_path)

    def on_stop(signame: str) -> None:
        log.info("passtd.signal", signal=signame)
        stop.set()

    def on_hup() -> None:
        nonlocal current
        log.info("passtd.signal", signal="SIGHUP")
        current = _reload(current, dp, notifier, reparse)

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

        watch = watch_namespace
    else:
        attached: list[TapBackend] = []  # the guest's back-end, for what it says when the guest goes

        def backend(conn: socket.socket) -> TapBackend:
            """The guest's back-end on a connected socket: qemu's stream framing, or vhost-user."""
            if config.vhost_user:
                from passtd.dataplane.io.vhost_user.backend import VhostUserBackend

                attached[:] = [VhostUserBackend(conn, loop, mtu=config.ctx.mtu)]
            else:
                attached[:] = [QemuStreamBackend(conn, loop)]
            return attached[0]

        def log_departure() -> None:
            """vhost-user: why the device stopped and what its rings refused (a real driver's: nothing)."""
            drops: dict[str, int] = getattr(attached[0], "drops", {}) if attached else {}
            error = getattr(attached[0], "error", None) if attached else None
            log.info("passt.guest.disconnected", error=error or "", ring_drops=sum(drops.values()),
                     drops_by_reason=drops)  # fmt: skip

        if guest is not None:  # --fd: qemu connected it before we started
            dp.attach(backend(guest))
            log.info("passt.guest.connected", fd=config.fd)

        def on_accept() -> None:
            assert listener is not None
            conn = listener.accept()
            if conn is None:
                return
            if dp.tap is not None:
                log.warning("passt.guest.rejected", reason="a guest is already connected")
                conn.close()
                return
            dp.attach(backend(conn))
            log.info("passt.guest.connected")
            notifier.status(_status(current, "guest connected"))

        if listener is not None:
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
                    log_departure()
                    notifier.status(_status(current, "guest disconnected, waiting"))
                    if config.one_off:
                        stop.set()

        watch = watch_guest

    # Both sockets accept connections from here on: the passt socket since bind(), the control one since
    # start_control_server(); in pasta mode the tap is attached. The PID file is written. Nothing left needs
    # root: drop to --runas now, then tell the starter.
    if config.runas is not None:
        _drop_privileges(config.runas, pasta is not None)
    log.info("passtd.started", **startup_summary(config))
    starter.ready()
    notifier.ready(_status(current, "serving" if pasta is not None else "waiting for a guest"))
    _freeze_startup_heap()
    try:
        # The daemon's own tasks: a failing one cancels the others and ends the daemon (no silent death).
        async with asyncio.TaskGroup() as tasks:
            background = [tasks.create_task(watch(), name="watch")]
            if notifier.enabled and notifier.watchdog is not None:
                background.append(tasks.create_task(_watchdog(notifier, notifier.watchdog), name="watchdog"))
            await stop.wait()
            notifier.stopping("stopping: resetting flows")
            for task in background:
                task.cancel()
    finally:
        if listener is not None:  # stop accepting first: no new guest while flows are reset
            loop.remove_reader(listener.sock.fileno())
            listener.close()
        if pesto is not None:
            pesto.close()
            await pesto.wait_closed()
        if control is not None:
            from passtd.control.server import stop_control_server

            await stop_control_server(control, CONTROL_GRACE)
        if metrics is not None:
            await metrics.close()
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


def _freeze_startup_heap() -> None:
    """Move what start-up built (modules, gRPC, the config, the tables) out of the cyclic collector's reach.
    The per-frame and per-connection objects trigger collections, and each older-generation one would walk
    that whole heap again: measured, about 2 % of a guest connection's instructions."""
    gc.collect()
    gc.freeze()
