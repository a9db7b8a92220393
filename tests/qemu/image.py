"""The guest for passt-mode tests: a Debian cloud kernel plus a busybox initramfs, built once and cached.

Why this shape (see /work/shared/FACTS.md, "A small qemu guest"):

- The kernel is Debian's `linux-image-<release>-cloud-amd64` (fetched with `apt-get download`, unpacked with
  `dpkg-deb -x`): small, boots under TCG in about two seconds, and has IPv6 and AF_PACKET built in. Its virtio
  drivers are modules and the package has no `modules.dep`, so the load order is computed here from each
  module's own `depends=` entry (deps first), which gives virtio_ring, virtio_pci_modern_dev,
  virtio_pci_legacy_dev, virtio, virtio_pci, failover, net_failover, virtio_net.
- The kernel has no 9p, so a test's script travels in a second, tiny newc cpio appended to the base initramfs
  (the kernel unpacks concatenated archives in order). The base stays cached; only the tail changes per test.
- `DEVTMPFS_MOUNT` is off: /dev/console is a node in the archive (the kernel opens it for /init before any
  mount) and /init mounts devtmpfs itself.
- Userland is busybox-static; udhcpc only applies a lease through an event script, which here also prints it.
  The host's socat and its shared libraries ride along when present, for TCP/UDP tests (busybox nc writes
  1 KiB per syscall).

Cache layout, under $PASSTD_QEMU_CACHE, else $XDG_CACHE_HOME/passtd-qemu, else ~/.cache/passtd-qemu:

    kernel/<release>/vmlinuz, modules/<name>.ko, order     what the .deb gave (the slow, network part)
    image/<release>-<sha256 of the archive>/vmlinuz, initramfs.cpio

The image key is the hash of the base archive's bytes, so any change to /init, the event script, busybox,
socat or a module builds a new image, and nothing stale is ever reused.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

KERNEL_META_PACKAGE: Final = "linux-image-cloud-amd64"
# What the guest needs from the kernel's modules: the PCI transport and the NIC; their deps are found.
ROOT_MODULES: Final = ("virtio_pci", "virtio_net")
BUSYBOX: Final = Path("/bin/busybox")
SOCAT: Final = Path("/usr/bin/socat")
APT_LISTS: Final = Path("/var/lib/apt/lists")
COMMAND_TIMEOUT: Final = 300.0

# Console markers the host parses; each sits alone on its own line.
BOOT_MARKER: Final = "PDQ-BOOT"
LEASE_MARKER: Final = "PDQ-LEASE"
DHCP_MARKER: Final = "PDQ-DHCP="
READY_MARKER: Final = "PDQ-READY"
EXIT_MARKER: Final = "PDQ-EXIT="
SCRIPT_DIR: Final = "test"
SCRIPT_NAME: Final = "run.sh"

_CPIO_MAGIC: Final = b"070701"
_CPIO_TRAILER: Final = "TRAILER!!!"
_DEPENDS_RE: Final = re.compile(rb"(?:^|\0)depends=([^\0]*)\0")
_KERNEL_DEP_RE: Final = re.compile(r"Depends:\s+(linux-image-(\S+-cloud-amd64))\s*$", re.MULTILINE)
_ELF64_PH: Final = struct.Struct("<Q")  # e_phoff
_ELF64_PHNUM: Final = struct.Struct("<HH")  # e_phentsize, e_phnum
_U32: Final = struct.Struct("<I")
_PT_INTERP: Final = 3
_LDD_PATH_RE: Final = re.compile(r"(?:=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)")

INIT_SCRIPT: Final = rf"""#!/bin/sh
# PID 1 of the passtd test guest: configure eth0 by DHCP, run /{SCRIPT_DIR}/{SCRIPT_NAME}, report, power off.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
echo "{BOOT_MARKER} kernel=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)"
for m in $(cat /lib/modules/order); do
    insmod "/lib/modules/$m.ko" || echo "PDQ-INSMOD-FAILED $m"
done
ip link set lo up
n=0
while [ ! -e /sys/class/net/eth0 ] && [ "$n" -lt 100 ]; do usleep 50000; n=$((n + 1)); done
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    if udhcpc -i eth0 -s /etc/udhcpc.script -O mtu -f -q -n -t 5 -T 1; then
        echo "{DHCP_MARKER}ok"
    else
        echo "{DHCP_MARKER}failed"
    fi
else
    echo "{DHCP_MARKER}no-eth0"
fi
echo "{READY_MARKER} uptime=$(cut -d' ' -f1 /proc/uptime)"
if [ -f /{SCRIPT_DIR}/{SCRIPT_NAME} ]; then
    cd /{SCRIPT_DIR} && sh ./{SCRIPT_NAME} </dev/null
    rc=$?
else
    echo "PDQ-NO-SCRIPT"
    rc=127
fi
cd /
echo "{EXIT_MARKER}$rc"
poweroff -f
"""

UDHCPC_SCRIPT: Final = rf"""#!/bin/sh
# udhcpc event script: apply the lease (address, router, MTU, DNS) and print it on one line for the host.
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set dev "$interface" up
    ;;
bound|renew)
    ip -4 addr flush dev "$interface"
    if [ -n "$mtu" ]; then ip link set dev "$interface" mtu "$mtu"; fi
    ip addr add "$ip/${{mask:-32}}" dev "$interface"
    for r in $router; do
        ip route replace default via "$r" dev "$interface"
        break
    done
    : >/etc/resolv.conf
    if [ -n "$domain" ]; then echo "search $domain" >>/etc/resolv.conf; fi
    for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
    echo "{LEASE_MARKER} ip=$ip mask=$mask router=$router dns=$dns mtu=$mtu domain=$domain lease=$lease"
    ;;
esac
exit 0
"""

_STATIC_FILES: Final = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": "root:x:0:\n",
    "etc/hosts": "127.0.0.1 localhost\n::1 localhost\n",
    "etc/resolv.conf": "",
}
_DIRS: Final = (
    "bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "run", "root",
    "lib", "lib/modules", "lib64",
)  # fmt: skip


class ImageError(RuntimeError):
    """The guest image cannot be built here (no apt, no package, a tool failed)."""


@dataclass(frozen=True, slots=True)
class GuestImage:
    """A bootable pair: qemu's `-kernel` and the base `-initrd` (append a payload archive per test)."""

    kernel: Path
    initramfs: Path
    kernel_release: str
    modules: tuple[str, ...]
    has_socat: bool
    build_seconds: float | None  # None when the image came from the cache


# --------------------------------------------------------------------------- newc cpio (the kernel's format)


@dataclass(frozen=True, slots=True)
class CpioEntry:
    """One archive member: a directory, regular file, symlink (data = target) or device node."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def newc_archive(entries: Iterable[CpioEntry]) -> bytes:
    """Serialize `entries` as an SVR4 "newc" cpio (no CRC), the format initramfs unpacking understands.

    Every header is 110 ASCII bytes: magic and 13 eight-digit hex fields; name (NUL-terminated) and data are
    each padded to 4 bytes (Documentation/driver-api/early-userspace/buffer-format.rst). Parents must come
    before children: the kernel does not create missing directories. Times are 0 so builds are reproducible.
    """
    out = bytearray()
    all_entries = [*entries, CpioEntry(_CPIO_TRAILER, 0)]
    for ino, entry in enumerate(all_entries, start=1):
        name = entry.name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        fields = (
            ino if entry.name != _CPIO_TRAILER else 0,
            entry.mode,
            0,  # uid
            0,  # gid
            nlink if entry.name != _CPIO_TRAILER else 1,
            0,  # mtime
            len(entry.data),
            0,  # dev major
            0,  # dev minor
            entry.rdev[0],
            entry.rdev[1],
            len(name),
            0,  # check
        )
        header = _CPIO_MAGIC + b"".join(b"%08X" % f for f in fields)
        out += header + name + _pad4(len(header) + len(name))
        out += entry.data + _pad4(len(entry.data))
    return bytes(out)


def _with_parents(files: Mapping[str, tuple[int, bytes]]) -> Iterator[CpioEntry]:
    """Members plus any missing parent directories, shallowest first, so every parent precedes its child."""
    merged = dict(files)
    for name in files:
        parts = name.split("/")[:-1]
        for i in range(len(parts)):
            merged.setdefault("/".join(parts[: i + 1]), (stat.S_IFDIR | 0o755, b""))
    for name in sorted(merged, key=lambda p: (p.count("/"), p)):
        mode, data = merged[name]
        yield CpioEntry(name, mode, data)


def payload_archive(script: str, files: Mapping[str, bytes | str] | None = None) -> bytes:
    """The per-test tail of the initramfs: /test/run.sh (run by /init) plus any helper files under /test."""
    members: dict[str, tuple[int, bytes]] = {
        f"{SCRIPT_DIR}/{SCRIPT_NAME}": (stat.S_IFREG | 0o755, script.encode()),
    }
    for rel, content in (files or {}).items():
        parts = rel.split("/")
        if rel.startswith("/") or not rel or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"payload file name must be relative and plain: {rel!r}")
        data = content.encode() if isinstance(content, str) else content
        mode = 0o755 if data.startswith(b"#!") else 0o644
        members[f"{SCRIPT_DIR}/{rel}"] = (stat.S_IFREG | mode, data)
    return newc_archive(_with_parents(members))


def write_initrd(
    image: GuestImage, dest: Path, script: str, files: Mapping[str, bytes | str] | None = None
) -> Path:
    """Base archive + this test's payload archive, concatenated into `dest` for qemu's `-initrd`."""
    with open(dest, "wb") as out, open(image.initramfs, "rb") as base:
        shutil.copyfileobj(base, out, 1 << 20)
        out.write(payload_archive(script, files))
    return dest


# --------------------------------------------------------------------------- kernel modules


def module_depends(ko: bytes) -> tuple[str, ...]:
    """The `depends=` list in a module's .modinfo strings (what modinfo prints), in the kernel's spelling."""
    m = _DEPENDS_RE.search(ko)
    if m is None or not m.group(1):
        return ()
    return tuple(d.decode().replace("-", "_") for d in m.group(1).split(b","))


def load_order(roots: Sequence[str], depends: Mapping[str, Sequence[str]]) -> list[str]:
    """Modules to insmod, dependencies first (a depth-first post-order from `roots`, deterministic).

    A name missing from `depends` has no module file: it is built into the kernel and is skipped.
    """
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise ImageError(f"module dependency cycle: {' -> '.join((*path, name))}")
        if name in seen or name not in depends:
            return
        for dep in depends[name]:
            visit(dep, (*path, name))
        seen.add(name)
        order.append(name)

    for root in roots:
        visit(root, ())
    return order


def _read_module(path: Path) -> bytes:
    """Module bytes, decompressed: busybox insmod and the kernel here want a plain ELF object."""
    raw = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(raw)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(raw)
    if path.name.endswith(".ko.zst"):
        if shutil.which("zstd") is None:
            raise ImageError(f"{path.name} is zstd-compressed and zstd is not installed")
        return _run(["zstd", "-dc", str(path)])
    return raw


def _module_name(path: Path) -> str:
    return path.name.split(".ko", 1)[0].replace("-", "_")


# --------------------------------------------------------------------------- apt and the kernel package


def _run(argv: Sequence[str], cwd: Path | None = None) -> bytes:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, timeout=COMMAND_TIMEOUT, check=False)
    except FileNotFoundError as e:
        raise ImageError(f"{argv[0]} is not installed") from e
    except subprocess.TimeoutExpired as e:
        raise ImageError(f"{' '.join(argv)} took more than {COMMAND_TIMEOUT:.0f}s") from e
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        raise ImageError(f"{' '.join(argv)} failed ({proc.returncode}): {err}")
    return proc.stdout


def _ensure_apt_lists() -> None:
    """`apt-get download` and `apt-cache` know nothing until the package lists were fetched once."""
    if not any(APT_LISTS.glob("*_Packages*")):
        _run(["apt-get", "update", "-qq"])


def kernel_package() -> tuple[str, str]:
    """(package, release) to boot: $PASSTD_QEMU_KERNEL_PKG, else what the cloud meta-package depends on."""
    pkg = os.environ.get("PASSTD_QEMU_KERNEL_PKG")
    if pkg:
        m = re.fullmatch(r"linux-image-(\S+)", pkg)
        if m is None:
            raise ImageError(f"PASSTD_QEMU_KERNEL_PKG={pkg!r} is not a linux-image-* package")
        return pkg, m.group(1).removesuffix("-unsigned")
    _ensure_apt_lists()
    out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE]).decode()
    m = _KERNEL_DEP_RE.search(out)
    if m is None:
        raise ImageError(f"{KERNEL_META_PACKAGE} does not depend on a cloud kernel:\n{out}")
    return m.group(1), m.group(2)


def _fetch_kernel(pkg: str, release: str, dest: Path) -> None:
    """Download and unpack the kernel package; keep vmlinuz and the needed modules in `dest` (atomically)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp_name:
        tmp = Path(tmp_name)
        _ensure_apt_lists()
        _run(["apt-get", "download", "-q", pkg], cwd=tmp)
        debs = sorted(tmp.glob("*.deb"))
        if len(debs) != 1:
            raise ImageError(f"apt-get download {pkg} left {len(debs)} .deb files")
        root = tmp / "root"
        _run(["dpkg-deb", "-x", str(debs[0]), str(root)])
        vmlinuz = root / "boot" / f"vmlinuz-{release}"
        if not vmlinuz.is_file():
            raise ImageError(f"{pkg} has no boot/vmlinuz-{release}")
        mod_dirs = [root / p / "modules" / release for p in ("lib", "usr/lib")]
        available = {
            _module_name(p): p for d in mod_dirs if d.is_dir() for p in d.rglob("*.ko*") if ".ko" in p.name
        }
        modules = {name: _read_module(available[name]) for name in _closure(available)}
        order = load_order(ROOT_MODULES, {n: module_depends(ko) for n, ko in modules.items()})
        out = tmp / "kernel"
        (out / "modules").mkdir(parents=True)
        shutil.copyfile(vmlinuz, out / "vmlinuz")
        for name in order:
            (out / "modules" / f"{name}.ko").write_bytes(modules[name])
        (out / "order").write_text("".join(f"{n}\n" for n in order))
        if dest.exists():
            shutil.rmtree(dest)
        out.rename(dest)


def _closure(available: Mapping[str, Path]) -> set[str]:
    """Names reachable from ROOT_MODULES through depends= (reads only those module files)."""
    todo, found = list(ROOT_MODULES), set[str]()
    while todo:
        name = todo.pop()
        if name in found or name not in available:
            continue
        found.add(name)
        todo.extend(module_depends(_read_module(available[name])))
    return found


# --------------------------------------------------------------------------- the base archive


def _ldd_paths(binary: Path) -> list[Path]:
    """Shared objects `binary` loads (ldd's resolved paths and the loader), vdso excluded."""
    out = _run(["ldd", str(binary)]).decode()
    return [Path(m.group(1)) for m in _LDD_PATH_RE.finditer(out)]


def _is_static(path: Path) -> bool:
    """True for an ELF64 executable without a PT_INTERP program header (it needs no loader or libraries)."""
    elf = path.read_bytes()
    if elf[:5] != b"\x7fELF\x02":
        return False
    phoff, phentsize, phnum = _ELF64_PH.unpack_from(elf, 32)[0], *_ELF64_PHNUM.unpack_from(elf, 54)
    return all(_U32.unpack_from(elf, phoff + i * phentsize)[0] != _PT_INTERP for i in range(phnum))


def _busybox_links() -> list[str]:
    """Applet paths (bin/sh, sbin/ip, ...) as this busybox installs them."""
    out = _run([str(BUSYBOX), "--list-full"]).decode()
    return sorted({line.strip().lstrip("/") for line in out.splitlines() if line.strip()})


def base_members(kernel_dir: Path) -> tuple[dict[str, tuple[int, bytes]], tuple[str, ...], bool]:
    """The base archive's members (name → (mode, data)), the module load order, whether socat is in."""
    if not BUSYBOX.is_file():
        raise ImageError(f"{BUSYBOX} is missing: install busybox-static")
    if not _is_static(BUSYBOX):
        raise ImageError(f"{BUSYBOX} is dynamically linked: install busybox-static")
    members: dict[str, tuple[int, bytes]] = dict.fromkeys(_DIRS, (stat.S_IFDIR | 0o755, b""))
    members["dev/console"] = (stat.S_IFCHR | 0o600, b"")
    members["init"] = (stat.S_IFREG | 0o755, INIT_SCRIPT.encode())
    members["etc/udhcpc.script"] = (stat.S_IFREG | 0o755, UDHCPC_SCRIPT.encode())
    for name, text in _STATIC_FILES.items():
        members[name] = (stat.S_IFREG | 0o644, text.encode())
    members["bin/busybox"] = (stat.S_IFREG | 0o755, BUSYBOX.read_bytes())
    for link in _busybox_links():
        if link != "bin/busybox":
            members[link] = (stat.S_IFLNK | 0o777, b"/bin/busybox")
    order = tuple((kernel_dir / "order").read_text().split())
    for name in order:
        members[f"lib/modules/{name}.ko"] = (
            stat.S_IFREG | 0o644,
            (kernel_dir / "modules" / f"{name}.ko").read_bytes(),
        )
    members["lib/modules/order"] = (stat.S_IFREG | 0o644, "".join(f"{n}\n" for n in order).encode())
    has_socat = SOCAT.is_file()
    if has_socat:
        members["usr/bin/socat"] = (stat.S_IFREG | 0o755, SOCAT.read_bytes())
        for lib in _ldd_paths(SOCAT):
            members[str(lib).lstrip("/")] = (stat.S_IFREG | 0o755, lib.read_bytes())
    return members, order, has_socat


def _base_entries(members: Mapping[str, tuple[int, bytes]]) -> Iterator[CpioEntry]:
    for entry in _with_parents(members):
        if entry.name == "dev/console":
            yield CpioEntry(entry.name, entry.mode, rdev=(5, 1))
        else:
            yield entry


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Where images live between runs: $PASSTD_QEMU_CACHE, $XDG_CACHE_HOME/passtd-qemu or ~/.cache/..."""
    explicit = os.environ.get("PASSTD_QEMU_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "passtd-qemu"


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """One builder at a time (parallel pytest sessions share the cache)."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _prune(cache: Path, keep: set[Path]) -> None:
    """Drop kernels and images that the current inputs no longer select (they would only grow the cache)."""
    for sub in ("kernel", "image"):
        for old in (cache / sub).glob("*"):
            if old not in keep and not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)


def ensure_image(cache: Path | None = None) -> GuestImage:
    """The cached guest image for the current kernel package and inputs, building what is missing."""
    cache = cache or cache_dir()
    started = time.monotonic()
    with _locked(cache):
        pkg, release = kernel_package()
        kernel_dir = cache / "kernel" / release
        if not (kernel_dir / "order").is_file():
            _fetch_kernel(pkg, release, kernel_dir)
        members, order, has_socat = base_members(kernel_dir)
        archive = newc_archive(_base_entries(members))
        digest = hashlib.sha256(archive + (kernel_dir / "vmlinuz").read_bytes()).hexdigest()[:16]
        image_dir = cache / "image" / f"{release}-{digest}"
        built: float | None = None
        if not (image_dir / "initramfs.cpio").is_file():
            image_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=image_dir.parent, prefix=".build-"))
            try:
                shutil.copyfile(kernel_dir / "vmlinuz", tmp / "vmlinuz")
                (tmp / "initramfs.cpio").write_bytes(archive)
                tmp.rename(image_dir)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            _prune(cache, keep={kernel_dir, image_dir})
            built = time.monotonic() - started
    return GuestImage(
        kernel=image_dir / "vmlinuz",
        initramfs=image_dir / "initramfs.cpio",
        kernel_release=release,
        modules=order,
        has_socat=has_socat,
        build_seconds=built,
    )
