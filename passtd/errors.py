"""One error type per boundary, so each boundary catches exactly what it can handle."""

from __future__ import annotations


class PasstError(Exception):
    """Base of every error passtd raises on purpose."""


class MalformedFrame(PasstError):
    """A frame from the guest could not be parsed; the tap boundary drops it and counts `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConfigError(PasstError):
    """Bad options or configuration: reported as one line, exit code 2."""


class BackendError(PasstError):
    """A tap back-end could not be set up (device, socket, namespace)."""
