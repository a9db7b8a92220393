"""The data path. Importing it first decides whether its mypyc-compiled modules may be used (native.guard),
so only code that touches the data path pays for that check; passtctl and `passtd --help` never do."""

from passtd import native

native.guard()
