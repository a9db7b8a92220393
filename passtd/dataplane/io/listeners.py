"""Listening sockets for one protocol and direction, opened and closed as the port policy changes.

The policy side (`core/fwd.py`) computes which `Listener`s should exist; this class makes the sockets match
and reports, port by port, what the kernel said, because one refused port must not stop the others (passt
only gives up when *no* port could be bound). It never touches established connections: a TCP listening
socket and the sockets `accept()` returned from it are independent, so closing a listener leaves them alone.

A `Listener` with `bind_addr` None is two sockets, 0.0.0.0 and :: with IPV6_V6ONLY, so that each family
can fail on its own (IPv6 disabled, or only one family's port taken) and is reported on its own.

Sockets are grouped by `Listener.key` (address, interface, port). A diff that closes and reopens the same key
with another target port is a *retarget*: the sockets stay open and only the Listener handed to
`on_readable` changes, so there is no moment at which the port refuses connections.

Every ListenerSet of a dataplane draws on one `FdPool` (core/limits.py): `-t all` binds until the pool's
room for listeners is spent and reports each port past it as failed (EMFILE, "listener limit reached"),
rather than binding until the process has no descriptor left for its flows and its control socket. While
one policy change is applied, `cap` holds the set to its fair share of that room (`Forwarding` sets it).
`apply_async` binds in slices of `BIND_SLICE` sockets, yielding to the loop between slices, so a large range
does not stall the data path.
Transactions (`stage` / `commit` / `abort`): the new sockets of a change are bound and listening but not yet
served, and nothing of the old set is touched, until the caller has seen every set's binds. `abort` closes
exactly the sockets the stage opened, so the host's listening sockets are as before; `commit` serves the new
ones, retargets, and only then closes the removed ones. One exception: a port moving to an overlapping
address on the same set (127.0.0.1:80 → 0.0.0.0:80) cannot be bound while the old socket listens; its old
socket is closed during the stage and bound again by `abort` (reported if that fails). A dry run binds each
new socket without listen() and closes it at once.
`freebind` (--freebind) sets IP_FREEBIND/IPV6_FREEBIND, so a listener on an address the host does not have yet
binds. A set made with `enabled=False` (--no-tcp, --no-udp) opens nothing: that protocol is not forwarded.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final, Literal

from passtd.dataplane.core.fwd import Listener
from passtd.dataplane.core.limits import FdPool
from passtd.dataplane.io.sockets import errno_name, set_freebind

BACKLOG: Final = 128
BIND_SLICE: Final = 128  # sockets bound per loop iteration by apply_async
WILDCARDS: Final = (("0.0.0.0", socket.AF_INET), ("::", socket.AF_INET6))

SocketFactory = Callable[[int, int], socket.socket]
OnReadable = Callable[[Listener, socket.socket], None]


@dataclass(frozen=True, slots=True)
class BindResult:
    """What happened to one socket of one listener: `address` is the concrete address bound ("0.0.0.0")."""

    listener: Listener
    address: str
    ok: bool
    errno_name: str | None
    message: str


def _errno_name(exc: OSError) -> str:
    return errno_name(exc.errno)


def _hint(code: int | None) -> str:
    if code == errno.EACCES:
        return " (ports below 1024 need CAP_NET_BIND_SERVICE, or a lower net.ipv4.ip_unprivileged_port_start)"
    if code == errno.EADDRINUSE:
        return " (another socket is bound to it)"
    if code == errno.EADDRNOTAVAIL:
        return " (no such local address)"
    if code == errno.ENODEV:
        return " (no such interface)"
    return ""


@dataclass(slots=True)
class Stage:
    """One set's part of a transaction: `opened` are bound (listening unless a dry run) but not served;
    `displaced` are old keys whose sockets the stage had to close to bind an overlapping address."""

    wanted: dict[tuple[object, ...], Listener]
    dry_run: bool
    results: list[BindResult] = field(default_factory=list)
    opened: dict[tuple[object, ...], dict[str, socket.socket]] = field(default_factory=dict)
    displaced: dict[tuple[object, ...], Listener] = field(default_factory=dict)
    not_restored: list[BindResult] = field(default_factory=list)
    done: bool = False


def _overlaps(a: Listener, b: Listener) -> bool:
    """Whether two listeners on one port would collide in bind() (same or wildcard address, family)."""
    if a.port != b.port or (a.ifname and b.ifname and a.ifname != b.ifname):
        return False
    x, y = a.bind_addr, b.bind_addr
    if x is None or y is None or x == y:
        return True
    return x.version == y.version and (x.is_unspecified or y.is_unspecified)


class ListenerSet:
    """Owns the listening sockets of one protocol+direction and calls `on_readable` when one is ready.

    `socket_factory(family, type)` makes the unbound sockets; the default is `socket.socket`. pasta's
    namespace-side listeners (-T/-U) pass a factory that creates the socket inside the namespace
    (`netns.run_in_netns`); a socket keeps its namespace for life, so binding and polling work from here.
    """

    def __init__(
        self,
        proto: Literal["tcp", "udp"],
        loop: asyncio.AbstractEventLoop,
        on_readable: OnReadable,
        *,
        backlog: int = BACKLOG,
        socket_factory: SocketFactory | None = None,
        pool: FdPool | None = None,
        freebind: bool = False,
        enabled: bool = True,
    ) -> None:
        if proto not in ("tcp", "udp"):
            raise ValueError(f"proto must be 'tcp' or 'udp', not {proto!r}")
        self.proto = proto
        self._loop = loop
        self._on_readable = on_readable
        self._backlog = backlog
        self._freebind = freebind
        self.enabled = enabled
        self._factory: SocketFactory = socket_factory or socket.socket
        self._type = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        self.pool = pool if pool is not None else FdPool(0, 0, 1 << 30, 0)  # alone: no limit
        self._current: dict[tuple[object, ...], Listener] = {}
        self._socks: dict[tuple[object, ...], dict[str, socket.socket]] = {}
        self._held = 0  # open sockets, kept as a count: `cap` is checked once per bind
        self.cap: int | None = None  # sockets it may hold during one policy change (None: the pool's room)

    # -- queries ---------------------------------------------------------------------------------------

    @property
    def listeners(self) -> frozenset[Listener]:
        """Listeners holding at least one open socket."""
        return frozenset(self._current.values())

    def sockets(self, listener: Listener) -> dict[str, socket.socket]:
        """The open sockets of `listener`'s key, by bound address (a copy)."""
        return dict(self._socks.get(listener.key, {}))

    def __len__(self) -> int:
        return self._held

    def sockets_wanted(self, listeners: Iterable[Listener]) -> int:
        """Sockets `listeners` hold once open (a listener without an address is two), 0 when disabled."""
        return sum(len(self._addresses(listener)) for listener in listeners) if self.enabled else 0

    # -- changes ---------------------------------------------------------------------------------------

    def apply(self, listeners: Iterable[Listener]) -> list[BindResult]:
        """Make the open set equal `listeners` (diffing against what is open now)."""
        wanted = set(listeners)
        have = set(self._current.values())
        self._refresh(wanted)
        return self.apply_diff(have - wanted, wanted - have)

    def _refresh(self, wanted: Iterable[Listener]) -> None:
        """Ports kept as they are take their (possibly new) rule id and counters from `wanted`."""
        current = self._current
        for listener in wanted:
            if current.get(listener.key) == listener:
                current[listener.key] = listener

    def apply_diff(self, to_close: Iterable[Listener], to_open: Iterable[Listener]) -> list[BindResult]:
        """Close, then open; a key in both is retargeted in place. Returns one result per socket attempted.

        Closing first lets a port move between scopes (127.0.0.1 → any) in one diff. Retargeted keys report
        `ok` for each socket kept, and retry families that had failed before.
        """
        results: list[BindResult] = []
        for listener in self._close_then_order(to_close, to_open):
            results.extend(self._open(listener))
        return results

    async def apply_async(
        self, listeners: Iterable[Listener], slice_size: int = BIND_SLICE
    ) -> list[BindResult]:
        """As `apply`, yielding to the event loop after every `slice_size` sockets attempted."""
        wanted = set(listeners)
        have = set(self._current.values())
        self._refresh(wanted)
        results: list[BindResult] = []
        since_yield = 0
        for listener in self._close_then_order(have - wanted, wanted - have):
            done = self._open(listener)
            results.extend(done)
            since_yield += len(done)
            if since_yield >= slice_size:
                since_yield = 0
                await asyncio.sleep(0)
        return results

    def _close_then_order(self, to_close: Iterable[Listener], to_open: Iterable[Listener]) -> list[Listener]:
        """Close what goes (except keys retargeted), and the listeners to open, by port (none when the set is
        disabled: --no-tcp, --no-udp)."""
        opening = {listener.key: listener for listener in to_open} if self.enabled else {}
        for listener in to_close:
            key = listener.key
            if key in opening or self._current.get(key) != listener:
                continue  # retargeted below, or not ours (never bound, or already replaced)
            self._close_key(key)
        return sorted(opening.values(), key=lambda lst: lst.port)

    # -- transactions (see the module's docstring) ----------------------------------------------------------

    def stage(self, listeners: Iterable[Listener], dry_run: bool = False) -> Stage:
        """Bind the new sockets of `listeners` without serving them or closing anything (all at once)."""
        stage = Stage({lst.key: lst for lst in listeners} if self.enabled else {}, dry_run)
        for _ in self._stage_steps(stage, 1 << 30):
            pass
        return stage

    async def stage_async(
        self, listeners: Iterable[Listener], dry_run: bool = False, slice_size: int = BIND_SLICE
    ) -> Stage:
        """As `stage`, yielding to the event loop after every `slice_size` sockets attempted."""
        stage = Stage({lst.key: lst for lst in listeners} if self.enabled else {}, dry_run)
        for _ in self._stage_steps(stage, slice_size):
            await asyncio.sleep(0)
        return stage

    def _stage_steps(self, stage: Stage, slice_size: int) -> Iterator[None]:
        closing = [lst for key, lst in self._current.items() if key not in stage.wanted]
        since_yield = 0
        for listener in sorted(stage.wanted.values(), key=lambda lst: lst.port):
            key = listener.key
            if key in self._socks and self._current.get(key) == listener:
                continue  # unchanged: not touched (a family that failed before is not retried, as apply)
            held = self._socks.get(key, {})
            for host, family in self._addresses(listener):
                if host in held:  # retargeted: the socket stays, as in `apply_diff`
                    stage.results.append(
                        BindResult(listener, host, True, None, f"{self._where(listener, host)}: kept")
                    )
                    continue
                full = self._no_room(listener, host)
                if full is not None:
                    stage.results.append(full)
                    continue
                sock, result = self._bind(listener, host, family, listen=not stage.dry_run)
                if sock is None and result.errno_name == "EADDRINUSE":
                    sock, result = self._displace(stage, closing, listener, host, family, result)
                stage.results.append(result)
                if sock is None:
                    continue
                if stage.dry_run:
                    sock.close()
                    continue
                self.pool.listeners += 1
                stage.opened.setdefault(key, {})[host] = sock
                since_yield += 1
                if since_yield >= slice_size:
                    since_yield = 0
                    yield

    def _displace(
        self,
        stage: Stage,
        closing: list[Listener],
        listener: Listener,
        host: str,
        family: int,
        failed: BindResult,
    ) -> tuple[socket.socket | None, BindResult]:
        """An in-use port held by a socket of ours that this change removes: close it and bind again (a dry
        run only says so)."""
        mine = [old for old in closing if _overlaps(old, listener) and old.key in self._socks]
        if not mine:
            return None, failed
        if stage.dry_run:
            shown = ", ".join(self._where(old, a) for old in mine for a in self._socks[old.key])
            return None, BindResult(
                listener, host, True, None, f"{self._where(listener, host)}: free once {shown} closes"
            )
        for old in mine:
            stage.displaced[old.key] = old
            self._close_key(old.key)
        return self._bind(listener, host, family, listen=True)

    def commit(self, stage: Stage) -> None:
        """Serve the staged sockets, retarget kept keys, close the keys no longer wanted."""
        assert not stage.done and not stage.dry_run
        stage.done = True
        for key in [k for k in self._current if k not in stage.wanted]:
            self._close_key(key)
        for key, listener in stage.wanted.items():
            socks = self._socks.get(key, {})
            for host, sock in stage.opened.get(key, {}).items():
                socks[host] = sock
                self._held += 1  # staged sockets were counted in the pool already, not yet in the set
                self._loop.add_reader(sock.fileno(), self._ready, key, sock)
            if socks:
                self._socks[key] = socks
                self._current[key] = listener

    def abort(self, stage: Stage) -> list[BindResult]:
        """Close what the stage opened and bind again what it displaced; returns the displaced binds that
        failed (normally none)."""
        if stage.done:
            return stage.not_restored
        stage.done = True
        for socks in stage.opened.values():
            for sock in socks.values():
                self.pool.listeners -= 1
                sock.close()
        stage.opened.clear()
        for old in stage.displaced.values():
            stage.not_restored += [r for r in self._open(old) if not r.ok]
        return stage.not_restored

    def close(self) -> None:
        """Close every listening socket (idempotent)."""
        for key in list(self._socks):
            self._close_key(key)

    # -- internals -------------------------------------------------------------------------------------

    def _addresses(self, listener: Listener) -> tuple[tuple[str, int], ...]:
        addr = listener.bind_addr
        if addr is None:
            return WILDCARDS
        return ((str(addr), socket.AF_INET if addr.version == 4 else socket.AF_INET6),)

    def _open(self, listener: Listener) -> list[BindResult]:
        key = listener.key
        held = self._socks.get(key, {})
        results: list[BindResult] = []
        for host, family in self._addresses(listener):
            if host in held:
                results.append(BindResult(listener, host, True, None, f"{self._where(listener, host)}: kept"))
                continue
            full = self._no_room(listener, host)
            if full is not None:
                results.append(full)
                continue
            sock, result = self._bind(listener, host, family)
            results.append(result)
            if sock is not None:
                held[host] = sock
                self.pool.listeners += 1
                self._held += 1
                self._loop.add_reader(sock.fileno(), self._ready, key, sock)
        if held:
            self._socks[key] = held
            self._current[key] = listener
        return results

    def _no_room(self, listener: Listener, host: str) -> BindResult | None:
        """The refusal of one more socket when the descriptor pool's listener room (or this set's share of it
        during a policy change, `cap`) is spent; None when there is room."""
        pool, cap = self.pool, self.cap
        if pool.listener_room() > 0 and (cap is None or self._held < cap):
            return None
        share = f", {cap} of them {self.proto}'s share" if cap is not None else ""
        msg = (f"{self._where(listener, host)}: listener limit reached ({pool.listeners} open{share}; "
               f"raise the open-files limit)")  # fmt: skip
        return BindResult(listener, host, False, "EMFILE", msg)

    def _bind(
        self, listener: Listener, host: str, family: int, listen: bool = True
    ) -> tuple[socket.socket | None, BindResult]:
        where = self._where(listener, host)
        try:
            sock = self._factory(family, self._type)
        except OSError as exc:
            msg = f"{where}: cannot create socket: {os.strerror(exc.errno or 0)}"
            return None, BindResult(listener, host, False, _errno_name(exc), msg)
        try:
            sock.setblocking(False)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if self.proto == "tcp":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self._freebind:
                set_freebind(sock, family)
            scope_id = 0
            if listener.ifname is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, listener.ifname.encode())
                if (
                    family == socket.AF_INET6
                    and listener.bind_addr is not None
                    and listener.bind_addr.is_link_local
                ):
                    scope_id = socket.if_nametoindex(listener.ifname)
            if family == socket.AF_INET6:
                sock.bind((host, listener.port, 0, scope_id))
            else:
                sock.bind((host, listener.port))
            if self.proto == "tcp" and listen:
                sock.listen(self._backlog)
        except OSError as exc:
            sock.close()
            msg = f"{where}: {os.strerror(exc.errno) if exc.errno else exc}{_hint(exc.errno)}"
            return None, BindResult(listener, host, False, _errno_name(exc), msg)
        return sock, BindResult(listener, host, True, None, f"{where}: {'listening' if listen else 'free'}")

    def _where(self, listener: Listener, host: str) -> str:
        shown = f"[{host}]" if ":" in host else host
        dev = f"%{listener.ifname}" if listener.ifname else ""
        return f"{self.proto} {shown}{dev}:{listener.port}"

    def _close_key(self, key: tuple[object, ...]) -> None:
        self._current.pop(key, None)
        for sock in self._socks.pop(key, {}).values():
            self.pool.listeners -= 1
            self._held -= 1
            try:
                self._loop.remove_reader(sock.fileno())
            except (ValueError, OSError):
                pass  # already closed elsewhere: nothing is registered under a dead fd
            sock.close()

    def _ready(self, key: tuple[object, ...], sock: socket.socket) -> None:
        listener = self._current.get(key)
        if listener is not None:
            self._on_readable(listener, sock)
