"""passtd: a user-mode network translator (passt/pasta in Python). Import-light on purpose."""

__version__ = "0.1.0"

from passtd import native

native.guard()
