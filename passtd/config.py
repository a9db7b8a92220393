"""The resolved configuration of one passtd process: what options.py builds and daemon.run() consumes.

Everything here is final: host defaults have been copied in, conflicts rejected, so the daemon never has to
second-guess a field. Invariants that would otherwise let a half-built Config through are checked in
`__post_init__` and reported as `ConfigError`, the same one-line error the command line gives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING, Final, Literal

from passtd.dataplane.core.context import Context
from passtd.dataplane.core.egress import EgressPolicy
from passtd.dataplane.core.fwd import ForwardTables
from passtd.dataplane.core.ratelimit import RateSpec
from passtd.dataplane.core.timeouts import Timeouts
from passtd.errors import ConfigError
from passtd.limits import (  # re-exported: the limits' one home is passtd.limits
    IPV6_MIN_MTU,
    LOG_SIZE_DEFAULT,
    LOG_SIZE_MIN,
    MTU_DEFAULT,
    MTU_MAX,
    MTU_MIN,
)
from passtd.paths import (  # re-exported: where paths are is passtd.paths
    default_control_path,
    default_socket_path,
    derived_control_path,
    runtime_dir,
)

__all__ = [
    "IPV6_MIN_MTU",
    "LOG_SIZE_DEFAULT",
    "LOG_SIZE_MIN",
    "MTU_DEFAULT",
    "MTU_MAX",
    "MTU_MIN",
    "Config",
    "default_control_path",
    "default_socket_path",
    "derived_control_path",
    "runtime_dir",
]

if TYPE_CHECKING:
    from passtd.dataplane.io.hostview import HostView

DEFAULT_NS_IFNAME: Final = "tap0"


@dataclass(frozen=True, slots=True)
class Config:
    """One process's configuration; `ctx` is what the dataplane core sees, the rest is for the shell."""

    mode: Literal["passt", "pasta"]
    ctx: Context
    socket_path: str | None  # passt: UNIX socket qemu connects to
    one_off: bool  # passt: quit after the first guest disconnects
    netns: str | None  # pasta: name under /run/netns, or a path
    netns_pid: int | None  # pasta: join this process's netns
    command: tuple[str, ...] | None  # pasta: () means the user's shell; None when attaching to a netns
    ns_ifname: str  # pasta: name of the tap device in the namespace
    config_net: bool  # pasta: configure addresses and routes in the namespace
    pcap: str | None
    pid_file: str | None
    foreground: bool
    debug: bool
    quiet: bool
    log_format: Literal["console", "json"]
    control_path: str | None = None  # gRPC control socket; None disables the control service
    control_group: str | None = None  # group allowed to use the control socket (mode 0660)
    control_listen: tuple[str, int] | None = None  # --control-listen: TCP with TLS and client certificates
    control_cert: str | None = None
    control_key: str | None = None
    control_client_ca: str | None = None
    control_insecure: bool = False  # plaintext TCP, refused off loopback
    metrics_listen: tuple[str, int] | None = None  # --metrics-listen: Prometheus text over HTTP
    forward: ForwardTables | None = None  # -t/-u/-T/-U; None: nothing forwarded
    max_flows: int = 256 * 1024
    timeouts: Timeouts = field(default_factory=Timeouts)  # the [timeouts] table of the config file
    egress: EgressPolicy | None = None  # [[egress]] + egress_default of the config file; None: not given
    # the [limits] table of the config file: (egress, ingress) token buckets; None when it has none
    rate_limits: tuple[RateSpec | None, RateSpec | None] | None = None
    config_file: str | None = None  # --config FILE, re-read on SIGHUP
    argv: tuple[str, ...] = ()  # the command line this came from, parsed again on SIGHUP
    log_file: str | None = None  # --log-file: log there instead of stderr
    log_size: int = LOG_SIZE_DEFAULT  # --log-size: cap of the log file, oldest lines dropped first
    interface: str | None = None  # --interface: host interface the defaults were copied from
    outbound: tuple[IPv4Address | IPv6Address, ...] = ()  # --outbound: source toward the network
    # Contract for the drop-in options (issue 13): options.py fills them, the shell honours them.
    outbound_if4: str | None = None  # --outbound-if4: SO_BINDTODEVICE for IPv4 sockets toward the network
    outbound_if6: str | None = None  # --outbound-if6
    freebind: bool = False  # --freebind: IP_FREEBIND / IPV6_FREEBIND on forwarded-port listeners
    splice: bool = True  # --no-splice clears it: loopback-to-loopback paths cross the tap instead
    host_lo_to_ns_lo: bool = False  # --host-lo-to-ns-lo: host loopback peers seen as the namespace's
    fd: int | None = None  # --fd: an already connected stream socket (qemu -netdev passt passes 3)
    vhost_user: bool = False  # --vhost-user: the socket speaks the vhost-user protocol (issue 16)
    runas: tuple[int, int] | None = None  # --runas USER[:GROUP], resolved to uid, gid
    userns: str | None = None  # --userns PATH: the user namespace to join with the network namespace
    netns_only: bool = False  # --netns-only: join only the network namespace
    netns_quit: bool = True  # --no-netns-quit clears it: keep running when the namespace goes away
    ns_mac: bytes | None = None  # --ns-mac-addr: MAC of the tap device in the namespace
    pesto_path: str | None = None  # -c/--conf-path: the pesto (runtime forwarding) socket
    # What the host looked like at start; SIGHUP re-parses against it (netlink cannot run inside the loop,
    # and what it decides, addresses, needs a restart anyway).
    host_view: HostView | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not MTU_MIN <= self.ctx.mtu <= MTU_MAX:
            raise ConfigError(f"--mtu: {self.ctx.mtu} is out of range {MTU_MIN}..{MTU_MAX}")
        if self.ctx.ip6 is not None and self.ctx.mtu < IPV6_MIN_MTU:
            raise ConfigError(f"--mtu: {self.ctx.mtu} is below {IPV6_MIN_MTU}, the IPv6 minimum")
        if self.debug and self.quiet:
            raise ConfigError("-q/--quiet: cannot be combined with -d/--debug")
        if self.mode == "passt":
            if (self.socket_path is None) == (self.fd is None):
                raise ConfigError("passt mode needs a socket path or --fd")
            if self.netns is not None or self.netns_pid is not None or self.command is not None:
                raise ConfigError("passt mode takes no namespace or command")
            if self.config_net:
                raise ConfigError("--config-net: only valid in pasta mode")
        else:
            if self.socket_path is not None or self.one_off:
                raise ConfigError("pasta mode takes no socket")
            targets = (self.netns is not None) + (self.netns_pid is not None) + (self.command is not None)
            if targets != 1:
                raise ConfigError("pasta needs exactly one of --netns, a PID or a command")
