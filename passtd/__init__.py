"""passtd: a user-mode network translator (passt/pasta in Python). Import-light: passtctl imports it."""

__version__ = "0.1.0"
