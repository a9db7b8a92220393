"""The port policy made real: listening sockets per protocol and direction, and pasta's `auto` scan.

`Forwarding` holds the policy (`ForwardTables`, from core/fwd.py) and the `ListenerSet`s that carry it out:
host-side listeners for -t/-u (and passt mode), namespace-side ones on its loopback for -T/-U. Readiness of a
listener goes to the callbacks the dataplane composed it with (TCP accept, UDP datagrams, splices). All sets
draw on one `FdPool`, so forwarded ports cannot spend the descriptors the flows and the control socket
need.

Changes from the control plane (gRPC, pesto) are transactions (`transact_async`): every set stages its new
binds, and only when none that counts failed are the tables, the rule ids (core/fwdbook.py) and the sockets
switched; otherwise every set aborts and nothing changed. Transactions and the `auto` scan's binds take
turns on one lock. Start-up and SIGHUP use `apply`: best effort, as passt (a refused port is reported).

pasta `auto`: every tick, the ports bound on each side (read from /proc, see io/autoscan.py) become
listeners on the other; the bind work of a changed scan runs as a task that yields between slices.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import Final, Literal

from passtd.dataplane.core.flowtable import FwdTally
from passtd.dataplane.core.fwd import Direction, ForwardTables, Listener
from passtd.dataplane.core.fwdbook import RuleBook
from passtd.dataplane.core.limits import FdPool, fair_shares
from passtd.dataplane.io.autoscan import read_bound_ports
from passtd.dataplane.io.listeners import BindResult, ListenerSet, OnReadable, Stage
from passtd.dataplane.io.netns import run_in_netns
from passtd.logging import get_logger


def local_port_range() -> tuple[int, int]:
    """The kernel's ephemeral port range: `-t all` leaves it alone, as passt does."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        return (32768, 60999)
    return (low, high)


def on_loopback(listeners: set[Listener]) -> set[Listener]:
    """-T/-U listen on the namespace's loopback: an unscoped rule becomes one per loopback address."""
    out: set[Listener] = set()
    for lst in listeners:
        if lst.bind_addr is None:
            for addr in (IPv4Address("127.0.0.1"), IPv6Address("::1")):
                out.add(Listener(addr, lst.ifname, lst.port, lst.target_port, lst.target_addr, lst.rule,
                                 lst.tally))  # fmt: skip
        else:
            out.add(lst)
    return out


FAMILY_GONE: Final = frozenset({"EAFNOSUPPORT", "EADDRNOTAVAIL"})
assert all(hasattr(errno, name) for name in FAMILY_GONE)
Tolerate = Callable[[BindResult], bool]


def _wildcard_family_gone(result: BindResult) -> bool:
    """One family of an address-less rule missing on this host (IPv6 disabled...): not a failure, as at
    start-up; the other family's socket carries the port."""
    return result.listener.bind_addr is None and (result.errno_name or "") in FAMILY_GONE


@dataclass(slots=True)
class Transaction:
    """The outcome of `transact_async`: `committed` False means nothing changed (a dry run, or `fatal`)."""

    previous: ForwardTables
    previous_book: RuleBook
    tables: ForwardTables
    book: RuleBook
    results: list[BindResult] = field(default_factory=list)
    fatal: list[BindResult] = field(default_factory=list)
    not_restored: list[BindResult] = field(default_factory=list)
    committed: bool = False
    dry_run: bool = False
    added: tuple[int, ...] = ()
    removed: tuple[int, ...] = ()


class Forwarding:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pool: FdPool,
        on_tcp: OnReadable,
        on_udp: OnReadable,
        on_tcp_ns: OnReadable,
        on_udp_ns: OnReadable,
        *,
        freebind: bool = False,
        tcp: bool = True,
        udp: bool = True,
    ) -> None:
        """`freebind`: --freebind on the host's listeners; `tcp`/`udp` False (--no-tcp, --no-udp): that
        protocol is forwarded in no direction (its listener sets open nothing)."""
        self.loop = loop
        self.pool = pool
        self.log = get_logger(component="forward")
        self.tables = ForwardTables("passt")
        self.book = RuleBook()  # the rule ids of `tables`
        self.tallies: dict[int, FwdTally] = {}  # rule id → counters, for the rules in `book`
        self.lock = asyncio.Lock()  # transactions and the auto scan's binds, one at a time
        self._later: list[asyncio.Task[None]] = []  # `apply` calls waiting for a transaction to end
        self._enabled = {"tcp": tcp, "udp": udp}
        self.tcp = ListenerSet("tcp", loop, on_tcp, pool=pool, freebind=freebind, enabled=tcp)
        self.udp = ListenerSet("udp", loop, on_udp, pool=pool, freebind=freebind, enabled=udp)
        self._on_ns = {"tcp": on_tcp_ns, "udp": on_udp_ns}
        self.netns_fd: int | None = None  # pasta: the namespace, for -T/-U and `auto`
        self.tcp_ns: ListenerSet | None = None
        self.udp_ns: ListenerSet | None = None
        self._auto_last: dict[str, frozenset[int]] = {}
        self._auto_task: asyncio.Task[None] | None = None
        self.bind_failures: Counter[str] = Counter()  # direction → binds that failed since start (metrics)

    def __len__(self) -> int:
        """Listening sockets open."""
        return self.pool.listeners

    def direction(self, listeners: ListenerSet) -> str:
        """tcp_in/udp_in for the host-side sets, tcp_out/udp_out for the namespace's loopback ones."""
        inside = listeners is self.tcp_ns or listeners is self.udp_ns
        return f"{listeners.proto}_{'out' if inside else 'in'}"

    def _bound(self, listeners: ListenerSet, results: list[BindResult]) -> list[BindResult]:
        failed = sum(1 for r in results if not r.ok)
        if failed:
            self.bind_failures[self.direction(listeners)] += failed
        return results

    # -- policy ---------------------------------------------------------------------------------------------

    def _wanted(self, tables: ForwardTables, book: RuleBook) -> list[tuple[ListenerSet, set[Listener], bool]]:
        """(set, its listeners, whether its binds are best effort: "all" tables, as upstream's WEAK)."""
        eph = local_port_range()
        tallies = self.tallies

        def of(direction: Direction) -> set[Listener]:
            return book.listeners(tables, direction, eph, tallies)

        plan: list[tuple[ListenerSet, set[Listener], bool]] = [
            (self.tcp, of("tcp_in"), tables.tcp_in.mode == "all"),
            (self.udp, of("udp_in"), tables.udp_in.mode == "all"),
        ]
        if self.netns_fd is not None and (self.tcp_ns is not None or tables.tcp_out.rules):
            plan.append((self.ns_listeners("tcp"), on_loopback(of("tcp_out")), False))
        if self.netns_fd is not None and (self.udp_ns is not None or tables.udp_out.rules):
            plan.append((self.ns_listeners("udp"), on_loopback(of("udp_out")), False))
        return plan

    def _switch(self, tables: ForwardTables, book: RuleBook) -> None:
        """Make `tables` and `book` current (their listeners are in place); drop gone rules' counters."""
        old = self.tables
        self.tables = tables
        self.book = book
        self._auto_last.clear()  # `auto` tables are rebuilt at the next tick
        live = book.ids()
        for rule_id in [i for i in self.tallies if i not in live]:
            del self.tallies[rule_id]
        if old.tcp_in != tables.tcp_in:
            self.log.info("forward.tcp.changed", spec=tables.tcp_in.to_spec())
        if old.udp_in != tables.udp_in:
            self.log.info("forward.udp.changed", spec=tables.udp_in.to_spec())

    def _plan(self, tables: ForwardTables) -> list[tuple[ListenerSet, set[Listener]]]:
        book = self.book.reconcile(tables)
        plan = [(lset, wanted) for lset, wanted, _ in self._wanted(tables, book)]
        self._switch(tables, book)
        return plan

    def _report(self, results: list[BindResult]) -> list[BindResult]:
        failed = [r for r in results if not r.ok]
        for result in failed[:16]:  # one line each for the first few; the caller gets them all
            self.log.warning("forward.bind.failed", port=result.listener.port, address=result.address,
                             error=result.errno_name)  # fmt: skip
        if len(failed) > 16:
            self.log.warning("forward.bind.failed_more", count=len(failed) - 16)
        return results

    def _share_room(self, plan: list[tuple[ListenerSet, set[Listener]]]) -> None:
        """Cap each set of one change at its fair share of the listener room (core/limits.py), counting the
        sockets the sets hold now as room: they are closed or kept by the same change."""
        budget = self.pool.listener_room() + sum(len(listeners) for listeners, _ in plan)
        wants = [listeners.sockets_wanted(wanted) for listeners, wanted in plan]
        for (listeners, _), share in zip(plan, fair_shares(budget, wants), strict=True):
            listeners.cap = share

    def apply(self, tables: ForwardTables) -> list[BindResult]:
        """Replace the port policy at once: diff the listeners, report each bind; flows are never touched.
        While a transaction holds the lock (a SIGHUP during a control call), the change waits for it and
        runs after, so it neither binds beside the transaction's staged sockets nor is overwritten."""
        if self.lock.locked():
            self._later = [t for t in self._later if not t.done()]
            self._later.append(self.loop.create_task(self._apply_after_lock(tables)))
            return []
        results: list[BindResult] = []
        plan = self._plan(tables)
        self._share_room(plan)
        try:
            for listeners, wanted in plan:
                results += self._bound(listeners, listeners.apply(wanted))
        finally:
            for listeners, _ in plan:
                listeners.cap = None
        return self._report(results)

    async def _apply_after_lock(self, tables: ForwardTables) -> None:
        async with self.lock:
            for listeners, wanted in self._plan(tables):
                self._bound(listeners, listeners.apply(wanted))

    async def apply_async(self, tables: ForwardTables) -> list[BindResult]:
        """As `apply` (best effort, not a transaction), binding in slices with the loop running between them
        (large ranges, `-t all`); takes its turn on the lock with transactions."""
        results: list[BindResult] = []
        async with self.lock:
            plan = self._plan(tables)
            self._share_room(plan)
            try:
                for listeners, wanted in plan:
                    results += self._bound(listeners, await listeners.apply_async(wanted))
            finally:
                for listeners, _ in plan:
                    listeners.cap = None
        return self._report(results)

    async def transact_async(
        self,
        change: Callable[[ForwardTables], ForwardTables],
        *,
        dry_run: bool = False,
        tolerate: Tolerate | None = None,
    ) -> Transaction:
        """Apply `change(current tables)` as one transaction (see the module); `change` runs under the lock,
        so it sees the tables this transaction replaces, and may raise (ConfigError) before any bind.

        A failed bind counts unless it is best effort ("all" tables, a wildcard rule's missing family, or
        `tolerate(result)`). Dry run: the same binds, each closed at once, and no listen(); nothing changes.
        """
        async with self.lock:
            previous = self.tables
            tables = change(previous)
            book = self.book.reconcile(tables)
            tx = Transaction(previous, self.book, tables, book, dry_run=dry_run)
            tx.added = tuple(sorted(book.ids() - self.book.ids()))
            tx.removed = tuple(sorted(self.book.ids() - book.ids()))
            staged: list[tuple[ListenerSet, Stage]] = []
            try:
                for lset, wanted, weak in self._wanted(tables, book):
                    stage = await lset.stage_async(wanted, dry_run)
                    staged.append((lset, stage))
                    tx.results += stage.results
                    if not weak:
                        tx.fatal += [
                            r for r in stage.results
                            if not r.ok and not _wildcard_family_gone(r) and not (tolerate and tolerate(r))
                        ]  # fmt: skip
            except BaseException:
                for lset, stage in reversed(staged):
                    lset.abort(stage)
                raise
            if dry_run or tx.fatal:
                for lset, stage in reversed(staged):
                    tx.not_restored += lset.abort(stage)
                if tx.fatal:
                    self._bound_failed(tx.fatal)
                return tx
            for lset, stage in staged:
                lset.commit(stage)
                self._bound(lset, stage.results)
            self._switch(tables, book)
            tx.committed = True
            self._report(tx.results)
            return tx

    def _bound_failed(self, failed: list[BindResult]) -> None:
        for result in failed[:16]:
            self.log.warning("forward.transaction.refused", port=result.listener.port, address=result.address,
                             error=result.errno_name)  # fmt: skip

    def tally(self, rule_id: int) -> FwdTally | None:
        return self.tallies.get(rule_id)

    def ns_listeners(self, proto: Literal["tcp", "udp"]) -> ListenerSet:
        """-T/-U: listening sockets on the namespace's loopback, made on first use."""
        current = self.tcp_ns if proto == "tcp" else self.udp_ns
        if current is not None:
            return current
        netns_fd = self.netns_fd
        assert netns_fd is not None
        created = ListenerSet(
            proto, self.loop, self._on_ns[proto], pool=self.pool, enabled=self._enabled[proto],
            socket_factory=lambda family, kind: run_in_netns(netns_fd, socket.socket, family, kind),
        )  # fmt: skip
        if proto == "tcp":
            self.tcp_ns = created
        else:
            self.udp_ns = created
        return created

    # -- pasta `auto` ---------------------------------------------------------------------------------------

    def auto_scan(self) -> None:
        """Mirror the ports bound on each side into listeners on the other (called every tick)."""
        netns_fd = self.netns_fd
        if netns_fd is None or (self._auto_task is not None and not self._auto_task.done()):
            return  # the previous scan's binds are still under way
        if self.lock.locked():
            return  # a transaction is under way: scan at the next tick, against its tables
        tables = self.tables
        work: list[tuple[ListenerSet, set[Listener]]] = []
        for direction, policy in (
            ("tcp_in", tables.tcp_in),
            ("udp_in", tables.udp_in),
            ("tcp_out", tables.tcp_out),
            ("udp_out", tables.udp_out),
        ):
            if policy.mode != "auto":
                continue
            proto: Literal["tcp", "udp"] = "tcp" if direction.startswith("tcp") else "udp"
            if direction.endswith("_in"):  # ports bound in the namespace, forwarded from the host
                ports = run_in_netns(netns_fd, read_bound_ports, proto)
                theirs = self.tcp_ns if proto == "tcp" else self.udp_ns
                ours_there = theirs.listeners if theirs is not None else frozenset()
            else:  # ports bound on the host, forwarded from the namespace's loopback
                ports = read_bound_ports(proto, "/proc/self/net")
                ours_there = (self.tcp if proto == "tcp" else self.udp).listeners
            ports -= {lst.port for lst in ours_there}
            key = frozenset(ports)
            if self._auto_last.get(direction) == key:
                continue
            self._auto_last[direction] = key
            entry = next((e for e in self.book.of(direction) if e.mode == "auto"), None)  # type: ignore[arg-type]
            rule_id = entry.id if entry is not None else 0
            tally = self.tallies.setdefault(rule_id, FwdTally()) if rule_id else None
            wanted = {Listener(None, None, port, port, None, rule_id, tally) for port in ports}
            if direction.endswith("_in"):
                work.append((self.tcp if proto == "tcp" else self.udp, wanted))
            else:
                work.append((self.ns_listeners(proto), on_loopback(wanted)))
        if work:
            self._auto_task = self.loop.create_task(self._apply_work(work, tables))

    async def _apply_work(self, work: list[tuple[ListenerSet, set[Listener]]], tables: ForwardTables) -> None:
        """Apply one scan's changes; each port `auto` starts or stops forwarding is one info line. A scan
        made against tables a transaction has replaced since is dropped (the next tick scans again)."""
        async with self.lock:
            if self.tables is tables:
                await self._apply_work_locked(work)

    async def _apply_work_locked(self, work: list[tuple[ListenerSet, set[Listener]]]) -> None:
        results: list[BindResult] = []
        for listeners, wanted in work:
            before = {lst.port for lst in listeners.listeners}
            results += self._bound(listeners, await listeners.apply_async(wanted))
            after = {lst.port for lst in listeners.listeners}
            direction = self.direction(listeners)
            for port in sorted(after - before):
                self.log.info("forward.auto.bound", direction=direction, port=port)
            for port in sorted(before - after):
                self.log.info("forward.auto.unbound", direction=direction, port=port)
        self._report(results)

    def close(self) -> None:
        task = self._auto_task
        if task is not None and not task.done():
            task.cancel()
        for later in self._later:
            later.cancel()
        for listeners in (self.tcp, self.udp, self.tcp_ns, self.udp_ns):
            if listeners is not None:
                listeners.close()
