"""The pesto server (`-c/--conf-path SOCK`): upstream passt's runtime forwarding protocol, version 2.

The wire format and the mapping onto passtd's tables are in `pesto_wire`. This module is the shell: a UNIX
stream server on the daemon's own loop, applying each client's tables through the same `ForwardTables` and
`Dataplane.set_forwarding()` that the gRPC port policy uses, so both always see one table.

Where upstream is weaker, and what passtd does instead:

* Upstream serves one client at a time, with blocking reads inside its event loop: a client that stops
  half way stalls all forwarding. Here every client is its own task with non-blocking streams, bounded
  reads (fixed-size structs, at most `MAX_RULES` per pif: every port as its own rule, where upstream
  holds 255), one `CLIENT_TIMEOUT` for the whole exchange and at most `MAX_CLIENTS` at once; a client over
  the limit is closed at once. Malformed,
  truncated, oversized or late input is counted in `stats`, logged, and changes nothing.
* Clients whose exchanges overlap do not lose each other's changes: each one's edit (the tables it was sent
  → the tables it sent back) is merged into the tables as they are when it commits (`pesto_wire.merge`).
* A commit is one transaction, the same as gRPC's (`Forwarding.transact_async`). The new tables are checked
  whole (conflicts, families, ranges) before anything is bound; then every new socket is bound before any
  old one is closed. If a port of a rule table cannot be bound (in use, no such address...), the sockets
  this commit opened are closed and nothing else was touched: the tables, the rule ids and the listening
  sockets are exactly as before (no listener is closed and reopened). "all"/"auto" tables stay best
  effort, as upstream's WEAK rules. Commits of several clients (and gRPC changes) take turns on one lock.

What a pesto v2 client sees then: protocol v2 has no answer, so upstream's `pesto` exits 0 either way; the
daemon logs `pesto.rolled_back` with every refused bind, and `pesto SOCK` (show) lists the unchanged tables.
passtd's own `pesto` reads the result passtd appends after the exchange (`pesto_wire.RESULT`, which
upstream's client never reads because it shuts the socket down right after sending) and prints each
refused bind and exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections import Counter
from collections.abc import Callable
from typing import Final, Protocol

from passtd.config import Config
from passtd.control import pesto_wire as wire
from passtd.dataplane.core.fwd import Direction, ForwardTables, Listener
from passtd.dataplane.io.forwarding import Tolerate, Transaction, local_port_range
from passtd.dataplane.io.listeners import BindResult
from passtd.errors import BackendError
from passtd.logging import get_logger
from passtd.unixsock import claim_unix_path

CLIENT_TIMEOUT: Final = 10.0  # seconds for one whole exchange, hello to commit
MAX_CLIENTS: Final = 32
SUN_PATH_MAX: Final = 107
_FAMILY_GONE: Final = frozenset({errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL})


class PestoControl(Protocol):
    """What the server needs from the daemon (`daemon_api.DaemonControl` provides it)."""

    config: Config

    def forward_tables(self) -> ForwardTables: ...

    def set_forward_tables(self, tables: ForwardTables) -> list[BindResult]: ...

    async def transact_forward_tables(
        self, change: Callable[[ForwardTables], ForwardTables], *, tolerate: Tolerate | None = None
    ) -> Transaction: ...


class _Refused(Exception):
    """A commit not applied; `status` is what passtd's own client is told."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


class PestoServer:
    def __init__(self, path: str, control: PestoControl) -> None:
        self.path = path
        self.control = control
        self.stats: Counter[str] = Counter()
        self.log = get_logger(component="pesto")
        self.shown: wire.Presentation | None = None
        self.timeout = CLIENT_TIMEOUT
        self.max_clients = MAX_CLIENTS
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        claim_unix_path(self.path, "pesto socket")
        old = os.umask(0o177)  # 0600: the socket file is the access control, as for the gRPC socket
        try:
            self._server = await asyncio.start_unix_server(
                self._accepted, self.path, limit=wire.RULE.size * 64
            )
        except OSError as exc:
            raise BackendError(f"pesto socket {self.path}: {exc.strerror}") from None
        finally:
            os.umask(old)

    def close(self) -> None:
        """Stop accepting, drop the clients in flight (nothing half-applied: commits are synchronous)."""
        if self._server is not None:
            self._server.close()
            self._server = None
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        for task in list(self._clients):
            task.cancel()

    async def wait_closed(self) -> None:
        if self._clients:
            await asyncio.gather(*self._clients, return_exceptions=True)

    # -- one client ------------------------------------------------------------------------------------------

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._clients) >= self.max_clients:
            self.stats["refused.busy"] += 1
            writer.close()
            return
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._clients.add(task)
        task.add_done_callback(self._clients.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats["clients"] += 1
        try:
            async with asyncio.timeout(self.timeout):
                await self._exchange(reader, writer)
        except TimeoutError:
            self.stats["refused.timeout"] += 1
            self.log.warning("pesto.timeout", seconds=self.timeout)
        except asyncio.IncompleteReadError:
            self.stats["refused.truncated"] += 1
            self.log.warning("pesto.truncated")
        except (ConnectionError, OSError):
            self.stats["disconnected"] += 1
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ephemeral = local_port_range()
        base = self.control.forward_tables()
        ctx = self.control.config.ctx
        implicit: set[wire.Rule] = set()
        pifs = wire.server_tables(
            base, ctx.ip4 is not None, ctx.ip6 is not None, ephemeral, self.shown, implicit
        )
        writer.write(wire.pack_hello() + wire.pack_server_tables(pifs))
        await writer.drain()
        try:
            received = await self._read_tables(reader, {t.pif for t in pifs})
        except wire.PestoError as exc:
            self.stats["refused.malformed"] += 1
            self.log.warning("pesto.refused", reason=str(exc))
            await self._answer(writer, wire.STATUS_REFUSED, f"refused: {exc}")
            return
        if received is None:
            self.stats["shown"] += 1  # a client that only looked: nothing to apply
            return
        try:
            text = await self._commit(base, received, ephemeral, implicit)
        except _Refused as exc:
            await self._answer(writer, exc.status, str(exc))
            return
        await self._answer(writer, wire.STATUS_APPLIED, text)

    async def _read_tables(
        self, reader: asyncio.StreamReader, known: set[int]
    ) -> dict[int, list[wire.Rule]] | None:
        """The client's tables; None if it closed without sending any (it only showed them)."""
        first = await reader.read(1)
        if not first:
            return None
        tables: dict[int, list[wire.Rule]] = {}
        pif = first[0]
        while pif != wire.PIF_NONE:
            if pif not in known:
                raise wire.PestoError(f"received rules for non-existent table {pif}")
            if pif in tables:
                raise wire.PestoError(f"received table {pif} twice")
            (count,) = wire.COUNT.unpack(await reader.readexactly(wire.COUNT.size))
            if count > wire.MAX_RULES:
                raise wire.PestoError(f"received {count} rules (maximum {wire.MAX_RULES})")
            rules = [wire.unpack_rule(await reader.readexactly(wire.RULE.size)) for _ in range(count)]
            tables[pif] = rules
            pif = (await reader.readexactly(1))[0]
        return tables

    async def _commit(
        self,
        base: ForwardTables,
        received: dict[int, list[wire.Rule]],
        ephemeral: tuple[int, int],
        implicit: set[wire.Rule],
    ) -> str:
        """Check, merge, apply as one transaction: if a rule table's port cannot be bound, nothing changes.
        The merge runs under the transaction's lock, against the tables it replaces."""
        control = self.control
        try:
            wanted, shown = wire.tables_from_pifs(base, received, ephemeral, implicit)
        except wire.PestoError as exc:
            self.stats["refused.rules"] += 1
            self.log.warning("pesto.refused", reason=str(exc))
            raise _Refused(wire.STATUS_REFUSED, f"refused: {exc}") from None

        made: list[ForwardTables] = []  # what `change` made: the failed binds are judged against it

        def change(current: ForwardTables) -> ForwardTables:
            if current != base:
                self.stats["merged"] += 1
            made.append(wanted if current == base else wire.merge(base, current, wanted))
            return made[-1]

        tx = await control.transact_forward_tables(change, tolerate=lambda r: not self._strict(made[-1], r))

        new = tx.tables
        if new == tx.previous:
            self.shown = shown if new == wanted else self.shown
            self.stats["unchanged"] += 1
            return "unchanged"
        if not tx.committed:
            lost = [r.message for r in tx.not_restored]
            self.stats["rolled_back"] += 1
            self.log.warning("pesto.rolled_back", failed=[r.message for r in tx.fatal], not_restored=lost)
            lines = [f"not applied, previous rules restored: {r.message} [{r.errno_name}]" for r in tx.fatal]
            lines += [f"could not restore: {m}" for m in lost]
            raise _Refused(wire.STATUS_ROLLED_BACK, "\n".join(lines))
        self.shown = shown if new == wanted else None
        self.stats["applied"] += 1
        self.log.info("pesto.applied", **dict(new.to_specs()))
        return "\n".join(r.message for r in tx.results) or "applied"

    def _strict(self, tables: ForwardTables, result: BindResult) -> bool:
        """Whether a failed bind undoes the commit: rule tables yes, "all"/"auto" no (upstream's WEAK), and
        not the socket of a family the daemon does not serve."""
        lst: Listener = result.listener
        ctx = self.control.config.ctx
        if lst.bind_addr is None or lst.bind_addr.is_loopback:  # -T/-U listen on both loopbacks
            family_off = ctx.ip6 is None if ":" in result.address else ctx.ip4 is None
            if family_off or getattr(errno, result.errno_name or "", None) in _FAMILY_GONE:
                return False
        proto = result.message.partition(" ")[0]  # ListenerSet's messages start with "tcp " or "udp "
        directions: tuple[Direction, ...] = ("tcp_in", "tcp_out") if proto == "tcp" else ("udp_in", "udp_out")
        for direction in directions:
            policy = tables.policy(direction)
            if policy.mode == "spec" and policy.target(lst.port, lst.bind_addr) is not None:
                return True
        return False

    async def _answer(self, writer: asyncio.StreamWriter, status: int, text: str) -> None:
        """passtd's result after the commit; upstream's client has closed by then, so errors are ignored."""
        with contextlib.suppress(ConnectionError, OSError):
            writer.write(wire.pack_result(status, text))
            await writer.drain()


async def start_pesto_server(
    path: str, control: PestoControl, loop: asyncio.AbstractEventLoop
) -> PestoServer:
    """Serve pesto on `path` (the daemon calls this when Config.pesto_path is set); `close()` stops it."""
    assert asyncio.get_running_loop() is loop, "the pesto server runs on the dataplane's loop"
    server = PestoServer(path, control)
    await server.start()
    return server
