"""Namespaces, tap creation, --config-net and command spawning against the real kernel (root only).

Every namespace is created with a unique `pd-io-*` name and deleted by a fixture (conftest.py); every
spawned child is reaped by PID. Nothing leaves the test namespaces.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv6Address
from typing import Any, TypeVar

import pytest

from passtd.dataplane.core.context import Context, Ip4Net, Ip6Net
from passtd.dataplane.io.netns import (
    NetnsWatcher,
    Spawned,
    configure_netns,
    create_tap,
    open_netns,
    run_in_netns,
    spawn_in_new_netns,
    wait_exit_status,
)
from passtd.errors import BackendError

NEEDS_ROOT = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces and taps"),
    pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="/dev/net/tun is missing"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 `ip` is not installed"),
]

CTX = Context(
    mtu=9000,
    ip4=Ip4Net(IPv4Address("10.200.1.2"), 24, IPv4Address("10.200.1.1")),
    ip6=Ip6Net(IPv6Address("fd00:200::2"), 64, IPv6Address("fd00:200::1"), IPv6Address("fe80::1")),
)


def ip_json(ns: str, *args: str) -> Any:
    out = subprocess.run(
        ["ip", "-n", ns, "-j", *args], check=True, capture_output=True, text=True, timeout=10
    ).stdout
    return json.loads(out) if out.strip() else []


def ns_ident(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


@pytest.fixture
def netns_fd(netns_name: str) -> Iterator[int]:
    fd = open_netns(netns_name)
    try:
        yield fd
    finally:
        os.close(fd)


class Children:
    """Spawned commands of one test: reaped (by their own PID only) and their fds closed at the end."""

    def __init__(self) -> None:
        self.live: dict[int, Spawned] = {}

    def spawn(self, argv: list[str], ifname: str = "tap9", **kw: Any) -> Spawned:
        spawned = spawn_in_new_netns(argv, ifname, kw.pop("mtu", 65520), kw.pop("ctx", None), **kw)
        self.live[spawned.pid] = spawned
        return spawned

    def wait(self, spawned: Spawned, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(spawned.pid, os.WNOHANG)
            if pid:
                self._release(spawned)
                return wait_exit_status(status)
            time.sleep(0.01)
        raise AssertionError(f"child {spawned.pid} still running after {timeout} s")

    def _release(self, spawned: Spawned) -> None:
        del self.live[spawned.pid]
        os.close(spawned.tap_fd)
        os.close(spawned.netns_fd)

    def cleanup(self) -> None:
        for spawned in list(self.live.values()):
            try:
                os.kill(spawned.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(spawned.pid, 0)
            self._release(spawned)


@pytest.fixture
def children() -> Iterator[Children]:
    kids = Children()
    try:
        yield kids
    finally:
        kids.cleanup()


# --- pure -------------------------------------------------------------------------------------------------


def test_wait_exit_status_codes() -> None:
    assert wait_exit_status(0) == 0
    assert wait_exit_status(3 << 8) == 3
    assert wait_exit_status(255 << 8) == 255
    assert wait_exit_status(signal.SIGTERM) == 128 + signal.SIGTERM
    assert wait_exit_status(signal.SIGKILL | 0x80) == 128 + signal.SIGKILL  # core dumped
    with pytest.raises(ValueError, match="not a terminated"):
        wait_exit_status((signal.SIGSTOP << 8) | 0x7F)


def test_wait_exit_status_real_processes() -> None:
    proc = subprocess.Popen(["sh", "-c", "exit 7"])
    _, status = os.waitpid(proc.pid, 0)
    proc.returncode = 7  # reaped by hand; keep Popen from waiting again
    assert wait_exit_status(status) == 7
    proc = subprocess.Popen(["sh", "-c", "kill -TERM $$"])
    _, status = os.waitpid(proc.pid, 0)
    proc.returncode = -15
    assert wait_exit_status(status) == 143


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("pd-h4-no-such-ns", "network namespace 'pd-h4-no-such-ns' not found"),
        ("/nonexistent/pd-h4", "not found"),
        ("/proc/self/status", "is not a namespace file"),
        ("/proc/self/ns/uts", "not a network namespace"),
        (0, "invalid PID"),
        ("..", "invalid network namespace name"),
        ("", "invalid network namespace"),
        (2**22 + 7, "no process 4194311"),
    ],
)
def test_open_netns_errors(target: str | int, message: str) -> None:
    with pytest.raises(BackendError, match=message):
        open_netns(target)


def test_open_netns_self_by_path_and_pid() -> None:
    """Works without root: our own namespace, by path and by PID (int and digit string)."""
    fds = [open_netns("/proc/self/ns/net"), open_netns(os.getpid()), open_netns(str(os.getpid()))]
    try:
        assert len({ns_ident(fd) for fd in fds}) == 1
    finally:
        for fd in fds:
            os.close(fd)


def test_create_tap_rejects_bad_names() -> None:
    for bad in ("", "a" * 16, "tap%d", "a/b", "a b", "tapé"):
        with pytest.raises(BackendError, match="invalid interface name"):
            create_tap(None, bad, 1500)


# --- root: real namespaces ----------------------------------------------------------------------------------


F = TypeVar("F", bound=Callable[..., object])


def root_only(fn: F) -> F:
    for mark in NEEDS_ROOT:
        fn = mark(fn)
    return fn


@root_only
def test_open_netns_by_name_and_path_agree(netns_name: str, netns_fd: int) -> None:
    by_path = open_netns(f"/run/netns/{netns_name}")
    try:
        assert ns_ident(by_path) == ns_ident(netns_fd)
        with open("/proc/self/ns/net", "rb") as own:
            assert ns_ident(own.fileno()) != ns_ident(netns_fd)
    finally:
        os.close(by_path)


@root_only
def test_run_in_netns_result_exception_and_isolation(netns_name: str, netns_fd: int) -> None:
    before = os.stat("/proc/thread-self/ns/net").st_ino

    def inside() -> int:
        return os.stat("/proc/thread-self/ns/net").st_ino

    assert run_in_netns(netns_fd, inside) == ns_ident(netns_fd)[1]
    assert os.stat("/proc/thread-self/ns/net").st_ino == before

    def boom() -> None:
        raise KeyError("from the namespace")

    with pytest.raises(KeyError, match="from the namespace"):
        run_in_netns(netns_fd, boom)
    assert os.stat("/proc/thread-self/ns/net").st_ino == before


@root_only
def test_create_tap_in_netns(netns_name: str, netns_fd: int) -> None:
    tap = create_tap(netns_fd, "tap0", 65520)
    try:
        (link,) = ip_json(netns_name, "-d", "link", "show", "tap0")
        assert link["mtu"] == 65520
        assert "UP" in link["flags"]
        assert link["linkinfo"]["info_kind"] == "tun"
        assert link["linkinfo"]["info_data"]["type"] == "tap"
        assert link["linkinfo"]["info_data"]["pi"] is False
        assert link["linkinfo"]["info_data"]["vnet_hdr"] is False
        assert os.get_blocking(tap) is False
        assert os.get_inheritable(tap) is False
    finally:
        os.close(tap)
    # the device lives only as long as its descriptor
    assert [x["ifname"] for x in ip_json(netns_name, "link", "show")] == ["lo"]


@root_only
def test_create_tap_vnet_hdr_and_bad_mtu(netns_name: str, netns_fd: int) -> None:
    tap = create_tap(netns_fd, "tapv", 1500, vnet_hdr=True)
    try:
        (link,) = ip_json(netns_name, "-d", "link", "show", "tapv")
        assert link["linkinfo"]["info_data"]["vnet_hdr"] is True
        assert link["mtu"] == 1500
    finally:
        os.close(tap)
    with pytest.raises(BackendError, match="cannot set MTU 10 on tapx"):
        create_tap(netns_fd, "tapx", 10)
    # the failed device was released with its descriptor
    assert all(x["ifname"] != "tapx" for x in ip_json(netns_name, "link", "show"))


@root_only
def test_configure_netns_addresses_and_routes(netns_name: str, netns_fd: int) -> None:
    tap = create_tap(netns_fd, "tap0", 65520)
    try:
        configure_netns(netns_fd, "tap0", CTX)
        links = {x["ifname"]: x for x in ip_json(netns_name, "link", "show")}
        assert "UP" in links["lo"]["flags"]
        assert links["tap0"]["mtu"] == 9000
        addrs = {
            (a["family"], a["local"], a["prefixlen"]): a
            for x in ip_json(netns_name, "addr", "show", "tap0")
            for a in x["addr_info"]
        }
        assert ("inet", "10.200.1.2", 24) in addrs
        v6 = addrs[("inet6", "fd00:200::2", 64)]
        assert v6.get("nodad") is True
        assert v6.get("tentative") is not True
        (r4,) = ip_json(netns_name, "-4", "route", "show", "default")
        assert r4["gateway"] == "10.200.1.1"
        assert r4["dev"] == "tap0"
        assert "onlink" in r4["flags"]
        (r6,) = ip_json(netns_name, "-6", "route", "show", "default")
        assert r6["gateway"] == "fd00:200::1"
        assert r6["dev"] == "tap0"
        assert "onlink" not in r6["flags"]  # inside the prefix: a plain route
        # applying it again is harmless (replace semantics)
        configure_netns(netns_fd, "tap0", CTX)
        assert len(ip_json(netns_name, "-4", "route", "show", "default")) == 1
    finally:
        os.close(tap)


@root_only
def test_configure_netns_v6_gateway_outside_prefix_and_v4_only(netns_name: str, netns_fd: int) -> None:
    tap = create_tap(netns_fd, "tap0", 1500)
    try:
        ctx6 = Context(
            mtu=1500,
            ip6=Ip6Net(IPv6Address("fd00:200::2"), 64, IPv6Address("fd00:999::1"), IPv6Address("fe80::1")),
        )
        configure_netns(netns_fd, "tap0", ctx6)
        (r6,) = ip_json(netns_name, "-6", "route", "show", "default")
        assert r6["gateway"] == "fd00:999::1"
        assert "onlink" in r6["flags"]
        assert ip_json(netns_name, "-4", "route", "show", "default") == []
        assert not [
            a for x in ip_json(netns_name, "-4", "addr", "show", "tap0") for a in x.get("addr_info", [])
        ]
    finally:
        os.close(tap)


@root_only
def test_configure_netns_link_local_v6_gateway(netns_name: str, netns_fd: int) -> None:
    tap = create_tap(netns_fd, "tap0", 1500)
    try:
        ctx = Context(
            mtu=1500,
            ip4=None,
            ip6=Ip6Net(IPv6Address("fd00:200::2"), 64, IPv6Address("fe80::1"), IPv6Address("fe80::1")),
        )
        configure_netns(netns_fd, "tap0", ctx)
        (r6,) = ip_json(netns_name, "-6", "route", "show", "default")
        assert r6["gateway"] == "fe80::1"
    finally:
        os.close(tap)


@root_only
def test_configure_netns_missing_interface(netns_fd: int) -> None:
    with pytest.raises(BackendError, match="no interface nosuch0"):
        configure_netns(netns_fd, "nosuch0", CTX)


@root_only
def test_netns_watcher_notices_ip_netns_del(netns_name: str, netns_fd: int) -> None:
    watcher = NetnsWatcher(netns_name, netns_fd)
    by_path = NetnsWatcher(f"/run/netns/{netns_name}", netns_fd)
    assert not watcher.gone()
    assert not by_path.gone()
    subprocess.run(["ip", "netns", "del", netns_name], check=True, capture_output=True, timeout=10)
    assert watcher.gone()
    assert by_path.gone()
    # a new namespace under the same name is not ours
    subprocess.run(["ip", "netns", "add", netns_name], check=True, capture_output=True, timeout=10)
    assert NetnsWatcher(netns_name, netns_fd).gone()
    assert watcher.gone()  # sticky


# --- root: spawning ---------------------------------------------------------------------------------------


@root_only
def test_spawn_reports_exit_status_and_sees_its_tap(children: Children) -> None:
    spawned = children.spawn(["sh", "-c", "grep -q '^ *tap9:' /proc/net/dev && exit 3; exit 1"])
    assert spawned.ifname == "tap9"
    # the netns fd is the child's namespace, and open_netns by PID agrees
    by_pid = open_netns(spawned.pid)
    try:
        assert ns_ident(by_pid) == ns_ident(spawned.netns_fd)
    finally:
        os.close(by_pid)
    assert children.wait(spawned) == 3


@root_only
@pytest.mark.parametrize("userns", [False, True])
def test_spawn_with_config_net(children: Children, userns: bool) -> None:
    script = (
        "ip -4 -o addr show dev tap9 | grep -q 'inet 10.200.1.2/24' || exit 10;"
        "ip -6 -o addr show dev tap9 | grep -q 'inet6 fd00:200::2/64' || exit 11;"
        "ip -4 route show default | grep -q 'via 10.200.1.1 dev tap9' || exit 12;"
        "ip -o link show dev tap9 | grep -q 'mtu 9000' || exit 13;"
        'read a b c < /proc/self/uid_map; echo "$c" > /dev/null;'
        f'[ "$c" {"=" if userns else "!="} 1 ] || exit 14;'
        "exit 0"
    )
    spawned = children.spawn(["sh", "-c", script], mtu=9000, ctx=CTX, userns=userns)
    assert children.wait(spawned) == 0


@root_only
def test_spawn_command_not_found_exits_127(children: Children) -> None:
    spawned = children.spawn(["/nonexistent/pd-h4-command"])
    assert children.wait(spawned) == 127


@root_only
def test_spawn_killed_by_signal_and_watcher_by_pid(children: Children) -> None:
    spawned = children.spawn(["sleep", "30"])
    watcher = NetnsWatcher(spawned.pid, spawned.netns_fd)
    assert not watcher.gone()
    os.kill(spawned.pid, signal.SIGTERM)
    # noticed already while the child is an unreaped zombie
    deadline = time.monotonic() + 5
    while not watcher.gone():
        assert time.monotonic() < deadline, "watcher did not notice the exit"
        time.sleep(0.01)
    assert children.wait(spawned) == 128 + signal.SIGTERM
    assert watcher.gone()


@root_only
def test_spawn_setup_failure_is_reported(children: Children) -> None:
    with pytest.raises(BackendError, match="cannot set MTU 10 on tap9: Invalid argument"):
        children.spawn(["true"], mtu=10)
    with pytest.raises(BackendError, match="no command"):
        children.spawn([])
    assert children.live == {}


@root_only
def test_spawned_tap_fd_is_the_childs_device(children: Children) -> None:
    """Frames written to the fd appear on tap9 inside the child's namespace (rx counter moves)."""
    spawned = children.spawn(["sleep", "30"], mtu=1500)

    # (sysfs shows the namespace of whoever mounted it, so read the counter over netlink in the namespace)
    def rx_netlink() -> int:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            (link,) = ipr.get_links(ifname="tap9")
            return int(link.get("stats64")["rx_packets"])

    before = run_in_netns(spawned.netns_fd, rx_netlink)
    frame = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + b"\x00" * 46  # local experimental
    os.write(spawned.tap_fd, frame)
    deadline = time.monotonic() + 5
    while run_in_netns(spawned.netns_fd, rx_netlink) == before:
        assert time.monotonic() < deadline, "frame never reached tap9"
        time.sleep(0.01)
