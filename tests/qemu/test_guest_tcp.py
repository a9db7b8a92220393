"""TCP both ways and UDP echo from a real guest kernel, checked with sha256 on both ends.

Host-side peers run in the test's namespace (loopback only); the guest reaches them through the gateway
address, which passtd maps to the host's loopback. Host → guest goes through a `-t` forwarded port.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.qemu.conftest import DEFAULT_PASSTD_ARGS, GATEWAY4, GuestNet

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
TOOL = str(Path(__file__).resolve().parents[1] / "netns" / "tcptool.py")
KiB = 1024
PEER_WAIT = 60.0


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def needs_socat(guest_net: GuestNet) -> None:
    if not guest_net.image.has_socat:
        pytest.skip("needs socat in the guest image (Debian package socat on the host)")


def wait(proc: subprocess.Popen[bytes], what: str) -> None:
    try:
        proc.wait(PEER_WAIT)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{what} did not finish") from None


def host_result(proc: subprocess.Popen[bytes], log: Path) -> dict[str, object]:
    wait(proc, "the host peer")
    lines = log.read_text().splitlines()
    assert lines and lines[-1].startswith("{"), lines
    return dict(json.loads(lines[-1]))


def test_guest_to_host_tcp_upload_and_download(guest_net: GuestNet) -> None:
    """Guest → gateway:5000 uploads 2 MiB and waits for the host's 64-byte answer (so nothing can be left in
    flight); gateway:5001 → guest downloads 3 MiB. Both directions are compared by sha256."""
    needs_socat(guest_net)
    down = random.Random(31).randbytes(3 * 1024 * KiB)
    (guest_net.logs / "down.bin").write_bytes(down)
    sink = guest_net.spawn(sys.executable, TOOL, "serve", "127.0.0.1", "5000", "--first", "read",
                           "--size", "64", "--seed", "5", "--timeout", "80")  # fmt: skip
    sink_log = guest_net.logs / f"spawn-{len(guest_net.procs) - 1}-{Path(sys.executable).name}.log"
    guest_net.spawn("socat", "-u", f"OPEN:{guest_net.logs / 'down.bin'},rdonly",
                    "TCP-LISTEN:5001,bind=127.0.0.1,reuseaddr")  # fmt: skip
    script = f"""
dd if=/dev/urandom of=/tmp/up.bin bs=1024 count=2048 2>/dev/null
echo "UP_SHA=$(sha256sum /tmp/up.bin | cut -d' ' -f1)"
socat -t 30 - TCP:{GATEWAY4}:5000 < /tmp/up.bin > /tmp/answer.bin
echo "UP_RC=$?"
echo "ANSWER_SHA=$(sha256sum /tmp/answer.bin | cut -d' ' -f1)"
socat -u TCP:{GATEWAY4}:5001 CREATE:/tmp/down.bin
echo "DOWN_RC=$?"
echo "DOWN_SHA=$(sha256sum /tmp/down.bin | cut -d' ' -f1)"
echo "DOWN_LEN=$(wc -c < /tmp/down.bin)"
"""
    result = guest_net.run_guest(script, timeout=90).check()
    assert result.value("UP_RC=") == "0" and result.value("DOWN_RC=") == "0", result.describe()
    got = host_result(sink, sink_log)
    assert got == {"rx_len": 2048 * KiB, "rx_sha": result.value("UP_SHA=")}, result.describe()
    assert result.value("ANSWER_SHA=") == sha(random.Random(5).randbytes(64))
    assert result.value("DOWN_LEN=") == str(len(down))
    assert result.value("DOWN_SHA=") == sha(down), result.describe()


CLIENT = r"""
import json, socket, sys, time, hashlib, random
port, out = int(sys.argv[1]), sys.argv[2]
payload = random.Random(41).randbytes(2 * 1024 * 1024)
deadline = time.monotonic() + 80
result = {"error": "timeout"}
while time.monotonic() < deadline:
    try:  # passtd accepts at once; until the guest listens, its RST resets us, and we try again
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(1 << 20):
            got += chunk
        s.close()
    except OSError as e:
        result = {"error": type(e).__name__}
        time.sleep(0.3)
        continue
    if got:
        result = {"rx_len": len(got), "rx_sha": hashlib.sha256(got).hexdigest(),
                  "tx_sha": hashlib.sha256(payload).hexdigest()}
        break
    time.sleep(0.3)
with open(out, "w") as f:
    json.dump(result, f)
"""


def test_host_to_guest_through_forwarded_port(guest_net: GuestNet) -> None:
    """Host loopback → -t 8080 → guest: 2 MiB in, then 1 MiB back on the same connection."""
    needs_socat(guest_net)
    out = guest_net.logs / "client.json"
    client = guest_net.spawn(sys.executable, "-c", CLIENT, "8080", str(out))
    script = """
dd if=/dev/urandom of=/tmp/out.bin bs=1024 count=1024 2>/dev/null
echo "OUT_SHA=$(sha256sum /tmp/out.bin | cut -d' ' -f1)"
socat -t 30 TCP-LISTEN:8080,reuseaddr SYSTEM:'cat > /tmp/in.bin; cat /tmp/out.bin'
echo "LISTEN_RC=$?"
echo "IN_SHA=$(sha256sum /tmp/in.bin | cut -d' ' -f1)"
"""
    result = guest_net.run_guest(script, [*DEFAULT_PASSTD_ARGS, "-t", "8080"], timeout=90).check()
    wait(client, "the host client")
    got = json.loads(out.read_text())
    assert "error" not in got, f"{got}\n{result.describe()}"
    assert result.value("LISTEN_RC=") == "0", result.describe()
    assert result.value("IN_SHA=") == got["tx_sha"], result.describe()
    assert got["rx_len"] == 1024 * KiB and got["rx_sha"] == result.value("OUT_SHA=")


def test_udp_echo_through_the_gateway(guest_net: GuestNet) -> None:
    """Three datagrams to gateway:7007 come back from the host's loopback echo server, unchanged."""
    needs_socat(guest_net)
    echo = guest_net.spawn(sys.executable, TOOL, "udp-echo", "127.0.0.1", "7007", "--count", "3",
                           "--timeout", "80")  # fmt: skip
    script = f"""
for i in 1 2 3; do
    echo "UDP_REPLY=$(echo "ping-$i-$(cat /proc/sys/kernel/random/uuid)" | socat -T 5 - UDP:{GATEWAY4}:7007)"
done
"""
    result = guest_net.run_guest(script, timeout=60).check()
    replies = result.lines("UDP_REPLY=")
    if (
        any(line == "UDP_REPLY=" for line in replies)
        and importlib.util.find_spec("passtd.dataplane.core.udp") is None
    ):
        pytest.skip("UDP translation is not in the dataplane yet (passtd/dataplane/core/udp.py missing)")
    assert len(replies) == 3, result.describe()
    for i, line in enumerate(replies, 1):
        assert line.startswith(f"UDP_REPLY=ping-{i}-") and len(line) > len("UDP_REPLY=ping-1-") + 30, (
            result.describe()
        )
    wait(echo, "the echo server")
