"""The pesto server on a real UNIX socket, over a real Dataplane whose listeners bind on loopback.

The `pesto` command runs as a subprocess (what an integrator runs); hostile and concurrent clients are
written here against `pesto_wire`, speaking protocol v2 byte by byte. Ports are free high ports on loopback.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from pathlib import Path
from typing import Literal, TypeVar

import pytest
import uvloop

from passtd.config import Config
from passtd.control import pesto_wire as wire
from passtd.control.pesto import PestoServer, start_pesto_server
from passtd.daemon_api import DaemonControl
from passtd.dataplane.core.context import Context, Ip4Net
from passtd.dataplane.core.fwd import ForwardTables, Listener, parse_spec
from passtd.dataplane.io.dataplane import Dataplane
from passtd.dataplane.io.netns import run_in_netns
from passtd.errors import BackendError
from tests.io.test_listeners import free_ports, tcp_accepts

T = TypeVar("T")
L4 = IPv4Address("127.0.0.1")


def run(main: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(main(), timeout=40)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(bounded())


@dataclass
class Served:
    path: str
    dp: Dataplane
    control: DaemonControl
    server: PestoServer

    def listening(self) -> set[tuple[str, int]]:
        """(address, port) of every open TCP listening socket."""
        out: set[tuple[str, int]] = set()
        for lst in self.dp.forwarding.tcp.listeners:
            out |= {(host, lst.port) for host in self.dp.forwarding.tcp.sockets(lst)}
        return out


@asynccontextmanager
async def served(tmp_path: Path, mode: Literal["passt", "pasta"] = "passt") -> AsyncIterator[Served]:
    loop = asyncio.get_running_loop()
    net = IPv4Network("10.0.2.0/24")
    ctx = Context(ip4=Ip4Net(IPv4Address("10.0.2.15"), net.prefixlen, IPv4Address("10.0.2.2")))
    config = Config(
        mode=mode, ctx=ctx, socket_path=str(tmp_path / "guest.sock") if mode == "passt" else None,
        one_off=False, netns=None if mode == "passt" else "pesto-test", netns_pid=None, command=None,
        ns_ifname="", config_net=False, pcap=None, pid_file=None,
        foreground=True, debug=False, quiet=True, log_format="console",
    )  # fmt: skip
    dp = Dataplane(ctx, loop)
    control = DaemonControl(config, dp)
    path = str(tmp_path / "pesto.sock")
    server = await start_pesto_server(path, control, loop)
    try:
        yield Served(path, dp, control, server)
    finally:
        server.close()
        await server.wait_closed()
        dp.close()
    assert not (tmp_path / "pesto.sock").exists()


async def pesto(*args: str) -> tuple[int, str, str]:
    """The pesto command, as a process (the loop keeps serving meanwhile)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "passtd.pesto_cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=20)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def accepts(port: int) -> bool:
    return await asyncio.to_thread(tcp_accepts, "127.0.0.1", port)


def test_add_show_delete_round_trip(tmp_path: Path) -> None:
    p1, p2, p3 = free_ports(3)

    async def main() -> None:
        async with served(tmp_path) as s:
            rc, out, err = await pesto(s.path)
            assert (rc, err) == (0, "")
            assert out == f"passt/pasta configuration ({s.path})\n  HOST\n"

            rc, _, err = await pesto("-A", "-t", f"127.0.0.1/{p1}", s.path)
            assert (rc, err) == (0, "")
            rc, _, err = await pesto(
                "--add", "-t", f"127.0.0.1/{p2}:10.0.2.99/80", "-u", f"127.0.0.1/{p3}", s.path
            )
            assert (rc, err) == (0, "")
            assert s.dp.forwarding.tcp.listeners == {
                Listener(L4, None, p1, p1),
                Listener(L4, None, p2, 80, IPv4Address("10.0.2.99")),
            }
            assert {lst.port for lst in s.dp.forwarding.udp.listeners} == {p3}
            assert await accepts(p1) and await accepts(p2)
            # The gRPC port policy reads the same table.
            views = {v.direction: v for v in s.control.port_policy()}
            assert views["tcp_in"].spec == parse_spec(f"127.0.0.1/{p1},{p2}:10.0.2.99/80").to_spec()
            assert views["udp_in"].spec == f"127.0.0.1/{p3}"

            rc, out, _ = await pesto("-s", s.path)
            assert rc == 0
            assert f"    TCP [127.0.0.1]:{p1}  =>  {p1} \n" in out
            assert f"    TCP [127.0.0.1]:{p2}  =>  10.0.2.99:80 \n" in out
            assert f"    UDP [127.0.0.1]:{p3}  =>  {p3} \n" in out

            rc, _, err = await pesto("-D", "-t", f"127.0.0.1/{p1}", s.path)
            assert (rc, err) == (0, "")
            assert s.dp.forwarding.tcp.listeners == {Listener(L4, None, p2, 80, IPv4Address("10.0.2.99"))}
            assert not await accepts(p1)

            # Deleting what is not there: upstream's messages, exit 1, nothing changed.
            rc, _, err = await pesto("-D", "-t", f"127.0.0.1/{p1}", s.path)
            assert rc == 1 and f"Couldn't find forwarding rule to delete: TCP [127.0.0.1]:{p1}" in err
            # Adding over an existing rule: a conflict, refused by the client.
            rc, _, err = await pesto("-A", "-t", f"127.0.0.1/{p2}", s.path)
            assert rc == 1 and "Forwarding configuration conflict" in err
            # Without -A/-D the specs replace the table.
            rc, _, _ = await pesto("-t", f"127.0.0.1/{p1}", s.path)
            assert rc == 0 and s.dp.forwarding.tcp.listeners == {Listener(L4, None, p1, p1)}
            assert s.dp.forward.udp_in.mode == "none"  # as upstream: the first -t clears HOST, UDP rules too
            rc, _, _ = await pesto("-C", "HOST", s.path)
            assert rc == 0 and s.dp.forward == ForwardTables("passt") and not s.listening()
            assert s.server.stats["applied"] == 5 and s.server.stats["rolled_back"] == 0

    run(main)


def test_rules_added_one_by_one_are_deleted_one_by_one(tmp_path: Path) -> None:
    """passtd merges adjacent ports into one rule, but lists them back as added (upstream deletes by rule)."""
    (base,) = free_ports(1)

    async def main() -> None:
        async with served(tmp_path) as s:
            for port in (base, base + 1):
                assert (await pesto("-A", "-t", f"127.0.0.1/{port}", s.path))[0] == 0
            assert len(s.dp.forward.tcp_in.rules) == 1
            rc, _, err = await pesto("-D", "-t", f"127.0.0.1/{base}", s.path)
            assert (rc, err) == (0, "")
            assert s.dp.forwarding.tcp.listeners == {Listener(L4, None, base + 1, base + 1)}

    run(main)


def test_failed_bind_is_rolled_back(tmp_path: Path) -> None:
    p1, p2, taken = free_ports(3)

    async def main() -> None:
        async with served(tmp_path) as s:
            assert (await pesto("-t", f"127.0.0.1/{p1},{p2}", s.path))[0] == 0
            before_tables, before_listening = s.dp.forward, s.listening()
            kept = s.dp.forwarding.tcp.sockets(Listener(L4, None, p1, p1))["127.0.0.1"]
            with socket.socket() as squatter:
                squatter.bind(("127.0.0.1", taken))
                squatter.listen()
                # Replace (p1 stays, p2 goes, `taken` cannot be bound): nothing of it may remain.
                rc, _, err = await pesto("-t", f"127.0.0.1/{p1},{taken}", s.path)
                assert rc == 1
                assert (
                    f"not applied, previous rules restored: tcp 127.0.0.1:{taken}: Address already in use"
                    in err
                )
                assert s.dp.forward == before_tables and s.listening() == before_listening
                assert s.dp.forwarding.tcp.sockets(Listener(L4, None, p1, p1))["127.0.0.1"] is kept
                assert await accepts(p1) and await accepts(p2)
                # Upstream's client reads no answer: what it would list is still the old table.
                rc, out, _ = await pesto(s.path)
                assert rc == 0 and f":{p2}  =>  {p2} " in out and str(taken) not in out
            assert s.server.stats["rolled_back"] == 1

    run(main)


async def raw_client(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, list[wire.PifTable]]:
    """A v2 client by hand: connect, read the hello and the tables."""
    reader, writer = await asyncio.open_unix_connection(path)
    wire.check_hello(await reader.readexactly(wire.HELLO.size))
    tables = []
    while (pif := (await reader.readexactly(1))[0]) != wire.PIF_NONE:
        name, caps, count = wire.unpack_pif_info(await reader.readexactly(wire.PIF_INFO.size))
        rules = [wire.unpack_rule(await reader.readexactly(wire.RULE.size)) for _ in range(count)]
        tables.append(wire.PifTable(pif, name, caps, rules))
    return reader, writer, tables


async def result_of(reader: asyncio.StreamReader) -> tuple[int, str]:
    magic, status, length = wire.RESULT.unpack(await reader.readexactly(wire.RESULT.size))
    assert magic == wire.RESULT_MAGIC
    return status, (await reader.readexactly(length)).decode()


def test_two_clients_at_once_keep_both_changes(tmp_path: Path) -> None:
    p1, p2 = free_ports(2)

    async def main() -> None:
        async with served(tmp_path) as s:
            ra, wa, ta = await raw_client(s.path)
            rb, wb, tb = await raw_client(s.path)  # both connected and holding: upstream would block B
            ta[0].rules.append(wire.Rule(L4, None, "", p1, p1, p1, wire.IPPROTO_TCP))
            tb[0].rules.append(wire.Rule(L4, None, "", p2, p2, p2, wire.IPPROTO_TCP))
            wb.write(wire.pack_client_tables(tb))
            assert (await result_of(rb))[0] == wire.STATUS_APPLIED
            wa.write(wire.pack_client_tables(ta))  # A's snapshot predates B's commit
            assert (await result_of(ra))[0] == wire.STATUS_APPLIED
            for w in (wa, wb):
                w.close()
            assert s.dp.forward.tcp_in == parse_spec(f"127.0.0.1/{p1} 127.0.0.1/{p2}")
            assert s.server.stats["merged"] == 1

    run(main)


def test_hostile_input_is_refused_and_the_server_carries_on(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    good = wire.pack_rule(wire.Rule(L4, None, "", port, port, port, wire.IPPROTO_TCP))

    async def main() -> None:
        async with served(tmp_path) as s:
            s.server.timeout = 0.5
            cases = [
                (b"\x07", "non-existent table 7"),  # a pif the server does not have
                (b"\x01" + (0xFFFFFFFF).to_bytes(4, "big"), "rules (maximum"),  # oversized count
                (b"\x01\x00\x00\x00\x01" + good[:48] + b"\x00\x00" + good[50:], "invalid port range"),
                (b"\x01\x00\x00\x00\x01" + good[:-1] + b"\x80", "invalid flags"),
                (b"\x01\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00", "received table 1 twice"),
            ]
            for payload, message in cases:
                reader, writer, _ = await raw_client(s.path)
                writer.write(payload + os.urandom(64))  # garbage after the error changes nothing
                status, text = await result_of(reader)
                assert status == wire.STATUS_REFUSED and message in text, (payload, text)
                writer.close()
            # Truncated: half a rule, then the client goes away. Silent: a client that never sends.
            reader, writer, _ = await raw_client(s.path)
            writer.write(b"\x01\x00\x00\x00\x02" + good[:20])
            writer.write_eof()
            assert await reader.read() == b""
            writer.close()
            reader, writer, _ = await raw_client(s.path)
            assert await asyncio.wait_for(reader.read(), 3) == b""  # closed by the server's timeout
            writer.close()
            # Not pesto at all: bytes before the hello was read.
            _, w = await asyncio.open_unix_connection(s.path)
            w.write(os.urandom(4096))
            await asyncio.sleep(0.05)
            w.close()
            assert s.dp.forward == ForwardTables("passt") and not s.listening()
            stats = s.server.stats
            assert stats["refused.malformed"] >= 5 and stats["refused.truncated"] == 1
            assert stats["refused.timeout"] == 1
            # ...and it still serves.
            assert (await pesto("-t", f"127.0.0.1/{port}", s.path))[0] == 0
            assert s.listening() == {("127.0.0.1", port)}

    run(main)


def test_clients_over_the_limit_are_closed(tmp_path: Path) -> None:
    async def main() -> None:
        async with served(tmp_path) as s:
            s.server.max_clients = 2
            held = [await raw_client(s.path) for _ in range(2)]
            reader, writer = await asyncio.open_unix_connection(s.path)
            assert await asyncio.wait_for(reader.read(), 3) == b""
            writer.close()
            assert s.server.stats["refused.busy"] == 1
            for _, w, _ in held:
                w.close()

    run(main)


def test_version_1_server_is_refused(tmp_path: Path) -> None:
    """pesto v2 against a v1 server (12-byte hello, 40-byte rules): refused, not misread."""
    path = str(tmp_path / "v1.sock")

    async def main() -> None:
        async def v1(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"basil:s\0\x00\x00\x00\x01" + b"\x01" + bytes(200))
            await writer.drain()
            await reader.read()
            writer.close()

        server = await asyncio.start_unix_server(v1, path)
        try:
            rc, out, err = await pesto("-A", "-t", "8080", path)
        finally:
            server.close()
        assert (rc, out) == (1, "")
        assert err == "Unsupported server protocol version 1 (this pesto speaks 2)\n"

    run(main)


def test_command_line_errors_and_version(tmp_path: Path) -> None:
    async def main() -> None:
        rc, out, _ = await pesto("--version")
        assert rc == 0 and out.startswith("pesto ") and "protocol version 2" in out
        rc, out, err = await pesto("--bogus", "x")
        assert (rc, out) == (1, "") and err.startswith("pesto: option --bogus not recognized\nUsage: pesto")
        rc, _, err = await pesto(str(tmp_path / "nothing.sock"))
        assert rc == 1 and err.startswith(f"Failed to connect to {tmp_path}/nothing.sock")

    run(main)


def test_socket_path_in_use_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        async with served(tmp_path) as s:
            with pytest.raises(BackendError, match="already in use by another server"):
                await PestoServer(s.path, s.control).start()

    run(main)


@pytest.fixture
def netns_fd() -> Iterator[int]:
    """A network namespace of the test's own with loopback up, as pasta's; deleted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a network namespace")
    name = f"pd-pesto-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=10)
    fd = -1
    try:
        subprocess.run(
            ["ip", "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True, timeout=10
        )
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        yield fd
    finally:
        if fd >= 0:
            os.close(fd)
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True, timeout=10)


def _bound_in(netns: int, port: int) -> socket.socket:
    def make() -> socket.socket:
        sock = socket.socket()
        sock.bind(("127.0.0.1", port))
        sock.listen()
        return sock

    return run_in_netns(netns, make)


def test_pasta_splice_table_through_pesto(tmp_path: Path, netns_fd: int) -> None:
    """pasta: -T is the SPLICE pif, listening on the namespace's loopback; a refused bind there rolls back."""
    p1, p2 = free_ports(2)

    async def main() -> None:
        async with served(tmp_path, mode="pasta") as s:
            s.dp.netns_fd = netns_fd
            rc, out, _ = await pesto(s.path)
            assert rc == 0 and out.endswith("  HOST\n  SPLICE\n")
            rc, _, err = await pesto("-T", str(p1), s.path)
            assert (rc, err) == (0, "")
            assert s.dp.forwarding.tcp_ns is not None
            assert s.dp.forwarding.tcp_ns.listeners == {
                Listener(L4, None, p1, p1),
                Listener(IPv6Address("::1"), None, p1, p1),
            }
            rc, out, _ = await pesto(s.path)
            assert f"  SPLICE\n    TCP [0.0.0.0]%lo:{p1}  =>  {p1} \n" in out  # IPv4-only: no dual stack
            assert s.control.port_policy()[2].spec == str(p1)  # tcp_out, as gRPC shows it

            squatter = _bound_in(netns_fd, p2)
            try:
                before = s.dp.forwarding.tcp_ns.listeners
                rc, _, err = await pesto("-A", "-T", str(p2), s.path)
                assert rc == 1 and f"tcp 127.0.0.1:{p2}: Address already in use" in err
                assert s.dp.forwarding.tcp_ns.listeners == before
                assert s.dp.forward.tcp_out.to_spec() == str(p1)
            finally:
                squatter.close()
            rc, _, _ = await pesto("-A", "-T", str(p2), s.path)
            assert rc == 0 and len(s.dp.forwarding.tcp_ns.listeners) == 4

    run(main)


def test_more_than_255_rules_through_pesto(tmp_path: Path) -> None:
    """Upstream's tables hold 255 rules; passtd's have no cap, and pesto carries 300 in one exchange."""
    ports = sorted(free_ports(300))

    async def main() -> None:
        async with served(tmp_path) as s:
            spec = "127.0.0.1/" + ",".join(map(str, ports))
            rc, _, err = await pesto("-t", spec, s.path)
            assert (rc, err) == (0, "")
            assert len(s.dp.forwarding.tcp.listeners) == 300
            rc, out, _ = await pesto(s.path)
            shown = out.count("TCP [127.0.0.1]:")
            assert rc == 0 and shown == 300, out[-300:]  # listed as the client sent them
            assert await accepts(ports[-1])
            assert len({e.id for e in s.dp.forwarding.book.of("tcp_in")}) == len(s.dp.forward.tcp_in.rules)

    run(main)
