"""Fixtures shared by the io tests that need the real kernel (root)."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator

import pytest


@pytest.fixture
def netns_name() -> Iterator[str]:
    """A network namespace of the test's own (`pd-io-*`), deleted afterwards even when the test fails."""
    name = f"pd-io-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=10)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True, timeout=10)
