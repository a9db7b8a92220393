"""Network namespaces and the tap device for pasta mode.

A namespace is held as an open `/proc/PID/ns/net`-style descriptor: that keeps it alive and lets us enter it
without a name. Entering uses `setns(2)`, which moves only the calling *thread*, so every piece of work done
inside a namespace runs in a short-lived helper thread (`run_in_netns`): the event loop thread never changes
namespace. Descriptors opened in there (the tap fd, a netlink socket) stay bound to that namespace and work
from any thread afterwards.

`spawn_in_new_netns` forks: call it before any event loop or thread exists (fork copies only the calling
thread, and any lock another thread held stays locked forever in the child).
"""

from __future__ import annotations

import _socket
import asyncio
import ctypes
import errno
import fcntl
import os
import queue
import signal
import socket
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Network
from typing import Final, NoReturn, ParamSpec, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from passtd.dataplane.core.context import Context
from passtd.errors import BackendError
from passtd.limits import ifname_problem

P = ParamSpec("P")
T = TypeVar("T")

# <linux/sched.h>
CLONE_NEWNET: Final = 0x40000000
CLONE_NEWUSER: Final = 0x10000000
# <linux/nsfs.h>: _IO(0xb7, 0x3), answers the CLONE_NEW* type of a namespace file (Linux 4.11)
NS_GET_NSTYPE: Final = 0xB703
# <linux/if_tun.h>
TUNSETIFF: Final = 0x400454CA
IFF_TAP: Final = 0x0002
IFF_NO_PI: Final = 0x1000
IFF_VNET_HDR: Final = 0x4000
# <linux/sockios.h>, <linux/if.h>
SIOCGIFFLAGS: Final = 0x8913
SIOCSIFFLAGS: Final = 0x8914
SIOCSIFMTU: Final = 0x8922
SIOCSIFHWADDR: Final = 0x8924
ARPHRD_ETHER: Final = 1
IFF_UP: Final = 0x1
# <linux/if_addr.h>, <linux/rtnetlink.h>
IFA_F_NODAD: Final = 0x02
RTNH_F_ONLINK: Final = 0x04

NETNS_RUN_DIR: Final = "/run/netns"
TUN_DEVICE: Final = "/dev/net/tun"

# struct ifreq: the name, then a 24-byte union (struct ifmap is the largest member on 64-bit)
_IFREQ_FLAGS = struct.Struct("16sH22x")
_IFREQ_INT = struct.Struct("16si20x")
_IFREQ_HWADDR = struct.Struct("16sH6s16x")  # the union as a struct sockaddr: family, then the address

_libc = ctypes.CDLL(None, use_errno=True)
# The same libc through PyDLL: its calls keep the GIL. socket() through it lets the pool's worker make a whole
# batch without handing the GIL to the loop and back around every socket (_make_stream_sockets).
_libc_gil = ctypes.PyDLL(None, use_errno=True)
_socket_gil = _libc_gil.socket  # int arguments and result, ctypes' defaults (argtypes would cost more)


def _ns_syscall(name: str, *args: int) -> None:
    """Call libc `setns`/`unshare` (Python 3.11 has no os.setns/os.unshare), raising OSError on failure."""
    if getattr(_libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _netns_path(target: str | int) -> tuple[str, str]:
    """Where the namespace file of `target` is, and how to name it in messages.

    An int or a string of digits is a PID; a string containing a slash is a path; anything else is a name
    under /run/netns (the `ip netns` convention, and pasta's order of interpretation).
    """
    if isinstance(target, int) and not isinstance(target, bool):
        if target <= 0:
            raise BackendError(f"invalid PID {target}")
        return f"/proc/{target}/ns/net", f"process {target}"
    if not isinstance(target, str) or not target:
        raise BackendError(f"invalid network namespace {target!r}")
    if "/" in target:
        return target, f"network namespace {target}"
    if target.isascii() and target.isdigit():
        return _netns_path(int(target))
    if target in (".", ".."):
        raise BackendError(f"invalid network namespace name {target!r}")
    return f"{NETNS_RUN_DIR}/{target}", f"network namespace {target!r}"


def open_netns(target: str | int) -> int:
    """An O_RDONLY descriptor of a network namespace given by name, path or PID (see `_netns_path`)."""
    path, what = _netns_path(target)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        if path.startswith("/proc/"):
            raise BackendError(f"no {what} ({path} does not exist)") from None
        raise BackendError(f"{what} not found ({path} does not exist)") from None
    except PermissionError:
        raise BackendError(f"cannot open {what}: permission denied ({path})") from None
    except OSError as exc:
        raise BackendError(f"cannot open {what} ({path}): {exc.strerror}") from None
    try:
        nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        os.close(fd)
        raise BackendError(f"{path} is not a namespace file") from None
    if nstype != CLONE_NEWNET:
        os.close(fd)
        raise BackendError(f"{path} is a namespace but not a network namespace")
    return fd


@contextmanager
def in_netns(netns_fd: int) -> Iterator[None]:
    """Move the *calling thread* into `netns_fd` for the block, then back.

    Use it only in a helper thread (see `run_in_netns`): while inside, every socket this thread opens belongs
    to the other namespace, which would silently break an event loop thread.
    """
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            _ns_syscall("setns", netns_fd, CLONE_NEWNET)
        except OSError as exc:
            raise BackendError(f"cannot enter the network namespace: {exc.strerror}") from None
        try:
            yield
        finally:
            _ns_syscall("setns", original, CLONE_NEWNET)
    finally:
        os.close(original)


def run_in_netns(netns_fd: int, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run `fn` in a fresh thread that joined `netns_fd`; return its result or raise its exception.

    Blocks the caller until `fn` is done: meant for setup steps, not for the data path. The thread ends in
    the other namespace instead of switching back: after pasta joined another user namespace (--userns),
    re-entering our own network namespace is not permitted, and a thread's namespace dies with it.
    """
    outcome: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            try:
                _ns_syscall("setns", netns_fd, CLONE_NEWNET)
            except OSError as exc:
                raise BackendError(f"cannot enter the network namespace: {exc.strerror}") from None
            outcome.append(fn(*args, **kwargs))
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=body, name="passtd-netns", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def _ifname_bytes(ifname: str) -> bytes:
    if ifname_problem(ifname) is not None:  # options refuse it first; this guards direct callers
        raise BackendError(f"invalid interface name {ifname!r}")
    return ifname.encode("ascii")


def _set_link_mtu_up(ifname: str, mtu: int) -> None:
    """Set the MTU and IFF_UP of `ifname` in the calling thread's namespace (ioctl: cheap and fork-safe).

    MTU 0 (-m 0) leaves the device's own MTU, as pasta does.
    """
    name = _ifname_bytes(ifname)
    if not 0 <= mtu <= 0xFFFF:
        raise BackendError(f"cannot set MTU {mtu} on {ifname}: out of range")
    # AF_UNIX always exists; the kernel hands unknown socket ioctls to the netdevice ioctl code
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        if mtu:
            try:
                fcntl.ioctl(sock, SIOCSIFMTU, _IFREQ_INT.pack(name, mtu))
            except OSError as exc:
                raise BackendError(f"cannot set MTU {mtu} on {ifname}: {exc.strerror}") from None
        _, flags = _IFREQ_FLAGS.unpack(fcntl.ioctl(sock, SIOCGIFFLAGS, _IFREQ_FLAGS.pack(name, 0)))
        fcntl.ioctl(sock, SIOCSIFFLAGS, _IFREQ_FLAGS.pack(name, flags | IFF_UP))


def _set_link_mac(ifname: str, mac: bytes) -> None:
    """--ns-mac-addr: the tap's own MAC, set while the device is still down (tun refuses a live change)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            fcntl.ioctl(sock, SIOCSIFHWADDR, _IFREQ_HWADDR.pack(_ifname_bytes(ifname), ARPHRD_ETHER, mac))
        except OSError as exc:
            raise BackendError(f"cannot set MAC address of {ifname}: {exc.strerror}") from None


def _create_tap_here(ifname: str, mtu: int, vnet_hdr: bool, mac: bytes | None = None) -> int:
    name = _ifname_bytes(ifname)
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise BackendError(f"cannot open {TUN_DEVICE}: {exc.strerror}") from None
    try:
        flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
        try:
            fcntl.ioctl(fd, TUNSETIFF, _IFREQ_FLAGS.pack(name, flags))
        except OSError as exc:
            raise BackendError(f"cannot create tap device {ifname}: {exc.strerror}") from None
        if mac is not None:
            _set_link_mac(ifname, mac)
        try:
            _set_link_mtu_up(ifname, mtu)
        except OSError as exc:
            raise BackendError(f"cannot bring {ifname} up: {exc.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


TUNSETOFFLOAD: Final = 0x400454D0  # _IOW('T', 208, unsigned int)
TUN_F_CSUM: Final = 0x01
TUN_F_TSO4: Final = 0x02
TUN_F_TSO6: Final = 0x04


def enable_offload(tap_fd: int) -> None:
    """Tell the kernel we handle partial checksums and TCP super-segments from the guest (the tap then
    advertises checksum offload and TSO to the namespace's stack, which sends 64 KiB frames at any MTU)."""
    fcntl.ioctl(tap_fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)


def create_tap(
    netns_fd: int | None, ifname: str, mtu: int, vnet_hdr: bool = False, mac: bytes | None = None
) -> int:
    """Create tap device `ifname` in `netns_fd` (None: the caller's namespace), up with `mtu`.

    Returns the non-blocking, close-on-exec tap descriptor carrying whole Ethernet frames (IFF_NO_PI; with
    `vnet_hdr`, each frame is preceded by a virtio-net header). The device lives as long as the descriptor.
    """
    if netns_fd is None:
        return _create_tap_here(ifname, mtu, vnet_hdr, mac)
    return run_in_netns(netns_fd, _create_tap_here, ifname, mtu, vnet_hdr, mac)


def _link_index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise BackendError(f"no interface {ifname} in the namespace")
    return int(found[0])


def _configure_here(ifname: str, ctx: Context) -> None:
    """Addresses and default routes of `ctx` on `ifname`, in the calling thread's namespace."""
    ipr = IPRoute()
    try:
        lo = _link_index(ipr, "lo")
        idx = _link_index(ipr, ifname)
        ipr.link("set", index=lo, state="up")
        ipr.link("set", index=idx, mtu=ctx.mtu, state="up")
        if ctx.ip4 is not None:
            ip4 = ctx.ip4
            ipr.addr("replace", index=idx, address=str(ip4.addr), prefixlen=ip4.prefix_len)
            if ip4.gateway != IPv4Address(0):
                # onlink: the gateway need not be inside the guest's prefix (a /32 works too)
                ipr.route(
                    "replace",
                    family=socket.AF_INET,
                    dst="0.0.0.0/0",
                    gateway=str(ip4.gateway),
                    oif=idx,
                    flags=RTNH_F_ONLINK,
                )
        if ctx.ip6 is not None:
            ip6 = ctx.ip6
            # no DAD: nobody else is on this link, and DAD would hold the address tentative for a second
            ipr.addr("replace", index=idx, address=str(ip6.addr), prefixlen=ip6.prefix_len, flags=IFA_F_NODAD)
            gw = ip6.gateway
            if not gw.is_unspecified:
                prefix = IPv6Network(f"{ip6.prefix}/{ip6.prefix_len}")
                onlink = not gw.is_link_local and gw not in prefix
                ipr.route(
                    "replace",
                    family=socket.AF_INET6,
                    dst="::/0",
                    gateway=str(gw),
                    oif=idx,
                    flags=RTNH_F_ONLINK if onlink else 0,
                )
    except NetlinkError as exc:
        raise BackendError(f"cannot configure {ifname}: {exc}") from None
    finally:
        ipr.close()


def configure_netns(netns_fd: int, ifname: str, ctx: Context) -> None:
    """--config-net: lo up, MTU, the guest's addresses and default routes on `ifname` inside `netns_fd`.

    Each family is skipped when `ctx` has none. Needs CAP_NET_ADMIN over the namespace, so a non-root caller
    cannot do this for a namespace owned by another user namespace (spawn_in_new_netns does it in the child).
    """
    run_in_netns(netns_fd, _configure_here, ifname, ctx)


def join_userns(path: str) -> None:
    """Move this whole process into the user namespace at `path` (pasta --userns, or a PID's own), as pasta
    does, so the namespaces it owns can be entered and configured without privileges in ours.

    setns(CLONE_NEWUSER) refuses a multithreaded process: call it before any thread or event loop exists.
    Joining the namespace we are already in is a no-op (the kernel would refuse it).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise BackendError(f"--userns: cannot open {path}: {exc.strerror}") from None
    try:
        try:
            nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError:
            raise BackendError(f"--userns: {path} is not a namespace file") from None
        if nstype != CLONE_NEWUSER:
            raise BackendError(f"--userns: {path} is a namespace but not a user namespace")
        here = os.stat("/proc/self/ns/user")
        there = os.fstat(fd)
        if (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino):
            return
        try:
            _ns_syscall("setns", fd, CLONE_NEWUSER)
        except OSError as exc:
            raise BackendError(f"--userns: cannot join {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Spawned:
    """A command running in a namespace we created; the caller owns both descriptors and must reap `pid`."""

    pid: int
    netns_fd: int
    tap_fd: int
    ifname: str


def _write_proc(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _child_setup(
    ifname: str, mtu: int, ctx: Context | None, userns: bool, uid: int, gid: int, vnet_hdr: bool
) -> int:
    if userns:
        _ns_syscall("unshare", CLONE_NEWUSER | CLONE_NEWNET)
        # like `unshare -r`: we become root of the new user namespace, which gives CAP_NET_ADMIN over the
        # new network namespace; setgroups must be denied before an unprivileged gid_map write
        try:
            _write_proc("/proc/self/setgroups", "deny")
        except FileNotFoundError:
            pass
        _write_proc("/proc/self/uid_map", f"0 {uid} 1\n")
        _write_proc("/proc/self/gid_map", f"0 {gid} 1\n")
    else:
        _ns_syscall("unshare", CLONE_NEWNET)
    tap_fd = _create_tap_here(ifname, mtu, vnet_hdr)
    if ctx is not None:
        _configure_here(ifname, ctx)
    return tap_fd


def _child_main(
    sock: socket.socket,
    argv: Sequence[str],
    ifname: str,
    mtu: int,
    ctx: Context | None,
    userns: bool,
    vnet_hdr: bool,
    ids: tuple[int, int],
) -> NoReturn:
    """The forked child: set up, hand the tap fd over, wait for the go-ahead, exec. Never returns."""
    try:
        try:
            tap_fd = _child_setup(ifname, mtu, ctx, userns, ids[0], ids[1], vnet_hdr)
        except Exception as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            sock.send(b"err:" + (reason or type(exc).__name__).encode(errors="replace")[:4000])
            os._exit(1)
        socket.send_fds(sock, [b"ok"], [tap_fd])
        os.close(tap_fd)
        if sock.recv(16) != b"go":  # EOF: the parent gave up
            os._exit(1)
        sock.close()
        # Python ignores these; a command expects the defaults (as subprocess' restore_signals does)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        try:
            os.execvp(argv[0], list(argv))
        except OSError as exc:
            os.write(2, f"passtd: cannot run {argv[0]}: {exc.strerror}\n".encode(errors="replace"))
            os._exit(126 if exc.errno in (errno.EACCES, errno.ENOEXEC, errno.EISDIR) else 127)
    except BaseException:
        pass
    os._exit(1)


def _kill_and_reap(pid: int) -> None:
    """Only for our own, not yet reaped child: its PID cannot have been reused."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def spawn_in_new_netns(
    argv: Sequence[str],
    ifname: str,
    mtu: int,
    ctx: Context | None,
    *,
    userns: bool | None = None,
    vnet_hdr: bool = False,
    timeout: float = 30.0,
) -> Spawned:
    """Run `argv` in a new network namespace holding tap device `ifname` (pasta's command mode).

    The child unshares the network namespace (and a user namespace mapping our uid/gid to root when
    `userns`, by default when not root), creates the tap, applies `ctx` (--config-net) if given, passes the
    tap fd back over a socketpair, then waits for our go-ahead before exec, so the command never runs
    without its network. A command that cannot be executed exits with 127 (126: not executable).

    Forks: call it before any event loop or thread exists. Setup failures raise BackendError with the
    child's reason; the child is then reaped.
    """
    if not argv:
        raise BackendError("no command to run in the namespace")
    _ifname_bytes(ifname)
    if userns is None:
        userns = os.geteuid() != 0
    ids = (os.geteuid(), os.getegid())
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        parent_sock.close()
        _child_main(child_sock, argv, ifname, mtu, ctx, userns, vnet_hdr, ids)
    child_sock.close()
    tap_fd = -1
    try:
        parent_sock.settimeout(timeout)
        try:
            msg, fds, _flags, _addr = socket.recv_fds(parent_sock, 4096, 1, socket.MSG_CMSG_CLOEXEC)
        except TimeoutError:
            raise BackendError(f"namespace setup did not finish within {timeout:g} s") from None
        if msg != b"ok" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            if msg.startswith(b"err:"):
                reason = msg[4:].decode(errors="replace")
            else:
                reason = "the child exited during setup"
            raise BackendError(f"cannot set up the namespace for {argv[0]}: {reason}")
        tap_fd = fds[0]
        netns_fd = open_netns(pid)
        try:
            parent_sock.send(b"go")
        except OSError as exc:
            os.close(netns_fd)
            raise BackendError(f"the namespace child went away: {exc.strerror}") from None
    except BaseException:
        if tap_fd >= 0:
            os.close(tap_fd)
        _kill_and_reap(pid)
        raise
    finally:
        parent_sock.close()
    return Spawned(pid=pid, netns_fd=netns_fd, tap_fd=tap_fd, ifname=ifname)


def wait_exit_status(status: int) -> int:
    """A waitpid status as a shell reports it: the exit code, or 128 + signal number."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    raise ValueError(f"wait status {status:#x} is not a terminated process")


class NetnsWatcher:
    """Notices that an attached namespace went away (`ip netns del`, the target process exited).

    We keep the namespace alive with our descriptor, so it never really disappears under us; what we watch
    is the name the user gave: gone when that path is missing or names another namespace (a new one with the
    same name, a reused PID, a zombie whose ns link is gone). One stat() per call: cheap enough to poll.
    """

    def __init__(self, target: str | int, netns_fd: int) -> None:
        self.path, self.what = _netns_path(target)
        st = os.fstat(netns_fd)
        self._ident = (st.st_dev, st.st_ino)
        self._gone = False

    def gone(self) -> bool:
        if not self._gone:
            try:
                st = os.stat(self.path)
            except OSError:
                self._gone = True
            else:
                self._gone = (st.st_dev, st.st_ino) != self._ident
        return self._gone


# a pool batch: sockets made per family, families the namespace lacks, the error that stopped it
_Batch = tuple[dict[int, list[_socket.socket]], set[int], str]


def _make_stream_sockets(wants: dict[int, int]) -> tuple[dict[int, list[_socket.socket]], set[int], str]:
    """In the helper thread inside the namespace: up to `wants[family]` non-blocking stream sockets per
    family. A family the namespace lacks is reported as unsupported; any other failure (EMFILE) stops the
    batch and is reported by its reason, with the sockets made so far.

    socket() is called through PyDLL, which keeps the GIL: `_socket.socket()` releases it around the system
    call, and with the loop waiting for it every socket cost three futex calls and two thread switches.
    The descriptors are wrapped in the C socket type (socket.socket's __init__ is interpreted code)."""
    made: dict[int, list[_socket.socket]] = {family: [] for family in wants}
    unsupported: set[int] = set()
    kind = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
    for family, count in wants.items():
        for _ in range(count):
            fd = _socket_gil(family, kind, 0)
            if fd < 0:
                err = ctypes.get_errno()
                if err in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
                    unsupported.add(family)
                    break
                return made, unsupported, os.strerror(err)
            try:
                made[family].append(_socket.socket(family, kind, 0, fd))
            except OSError as exc:  # not expected for a descriptor socket() just returned
                os.close(fd)
                return made, unsupported, exc.strerror or type(exc).__name__
    return made, unsupported, ""


def _enter_netns(netns_fd: int) -> None:
    """A pool worker's initializer: the thread enters the namespace once and stays there for its life."""
    _ns_syscall("setns", netns_fd, CLONE_NEWNET)


class NsSocketPool:
    """TCP sockets created inside a namespace ahead of time, up to `size` per family (pasta's ns socket pool).

    Creating a socket in another namespace costs a helper thread and two setns() (`run_in_netns`); a spliced
    connection takes a ready one from here instead, and the pool is topped up in batches off the
    connection's path: `refill_soon` hands the batch to one worker thread that entered the namespace once
    (no thread and no setns per batch either) and the loop stocks what it made; `refill` does a batch
    synchronously with `run_in_netns`. A socket stays in the namespace it was created in, whichever thread
    uses it later. Idle pooled sockets are descriptors that neither flows nor listeners hold, so they come
    out of the FdPool's reserve: keep `size` a small fraction of `FdPool.reserved`.
    """

    __slots__ = (
        "_requests",
        "_unstocked",
        "_worker",
        "closed",
        "failures",
        "free",
        "last_error",
        "netns_fd",
        "pending",
        "refills",
        "size",
        "unsupported",
    )

    def __init__(self, netns_fd: int, size: int) -> None:
        self.netns_fd = netns_fd
        self.size = size
        # per family, from its first take on: a daemon that never splices that family holds none
        self.free: dict[int, list[_socket.socket]] = {}
        self.unsupported: set[int] = set()  # families the namespace cannot make sockets of
        self.refills = 0  # batches asked for
        self.failures = 0  # batches that failed or stopped early
        self.last_error = ""
        self.pending = False  # a background batch is on its way
        self.closed = False
        self._worker: threading.Thread | None = None
        self._requests: queue.SimpleQueue[dict[int, int] | None] = queue.SimpleQueue()
        self._unstocked: _Batch | None = None  # a batch made, handed to the loop, not stocked yet

    def __len__(self) -> int:
        return sum(len(socks) for socks in self.free.values())

    def take(self, family: int) -> _socket.socket | None:
        """A ready socket of `family` in the namespace, or None when none is left (the caller then makes one
        the slow way). The first take of a family makes the refills keep that family stocked."""
        free = self.free.get(family)
        if free is None:
            free = self.free[family] = []
        return free.pop() if free else None

    def low(self) -> bool:
        """Whether a family is down to half the pool: refilling then, not after every take, makes one batch
        serve size/2 connections."""
        half = self.size // 2
        return any(len(socks) <= half for fam, socks in self.free.items() if fam not in self.unsupported)

    def _wants(self) -> dict[int, int]:
        return {
            family: self.size - len(socks)
            for family, socks in self.free.items()
            if family not in self.unsupported and len(socks) < self.size
        }

    def _stock(self, made: dict[int, list[_socket.socket]], unsupported: set[int], error: str) -> int:
        if self.closed:
            for socks in made.values():
                for sock in socks:
                    sock.close()
            return 0
        self.unsupported |= unsupported
        if error:
            self.failures += 1
            self.last_error = error
        added = 0
        for family, socks in made.items():
            self.free.setdefault(family, []).extend(socks)
            added += len(socks)
        return added

    def refill(self) -> int:
        """Top every family up to `size` now, in one helper thread; returns the sockets added."""
        wants = self._wants()
        if not wants or self.closed:
            return 0
        self.refills += 1
        try:
            made, unsupported, error = run_in_netns(self.netns_fd, _make_stream_sockets, wants)
        except (OSError, BackendError) as exc:
            self.failures += 1
            self.last_error = str(exc)
            return 0
        return self._stock(made, unsupported, error)

    def refill_soon(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Top every family up in the background (the worker makes the batch, `loop` stocks it); False when
        nothing is wanted, a batch is already on its way, or the worker could not enter the namespace.

        One thread of our own, fed through a SimpleQueue and answering with call_soon_threadsafe: a
        ThreadPoolExecutor's submit, Future and done-callbacks were interpreted code costing more per batch
        than the sockets it made."""
        if self.pending or self.closed:
            return False
        wants = self._wants()
        if not wants:
            return False
        worker = self._worker
        if worker is None:
            worker = self._worker = threading.Thread(
                target=self._serve, args=(loop,), name="passtd-nspool", daemon=True
            )
            worker.start()
        elif not worker.is_alive():  # it could not enter the namespace (last_error says why)
            self.failures += 1
            return False
        self.refills += 1
        self.pending = True
        self._requests.put(wants)
        return True

    def _serve(self, loop: asyncio.AbstractEventLoop) -> None:
        """The worker: enters the namespace once, then makes each batch asked for until told to stop."""
        try:
            _enter_netns(self.netns_fd)
        except OSError as exc:
            self.last_error = f"cannot enter the network namespace: {exc.strerror}"
            try:
                loop.call_soon_threadsafe(self._failed)
            except RuntimeError:  # the loop is closed
                pass
            return
        while True:
            wants = self._requests.get()
            if wants is None:
                return
            batch = _make_stream_sockets(wants)
            self._unstocked = batch
            try:
                loop.call_soon_threadsafe(self._stocked, batch)
            except RuntimeError:  # the loop is closed: nobody will take these sockets
                self._unstocked = None
                _close_batch(batch)
                return

    def _failed(self) -> None:
        self.pending = False
        self.failures += 1

    def _stocked(self, batch: _Batch) -> None:
        self.pending = False
        if self._unstocked is batch:
            self._unstocked = None
        self._stock(*batch)

    def close(self) -> None:
        self.closed = True
        for socks in self.free.values():
            for sock in socks:
                sock.close()
            socks.clear()
        worker, self._worker = self._worker, None
        if worker is not None:
            self._requests.put(None)
            worker.join(5)  # a batch takes microseconds
        batch, self._unstocked = self._unstocked, None
        if batch is not None:  # made and handed to the loop, which had not stocked it yet
            _close_batch(batch)


def _close_batch(batch: _Batch) -> None:
    for socks in batch[0].values():
        for sock in socks:
            sock.close()
