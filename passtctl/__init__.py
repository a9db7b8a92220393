"""passtctl: command-line client of passtd's gRPC control socket. Imports nothing of the daemon."""

import os

# grpc's C core logs failed TLS handshakes and GOAWAYs at INFO on stderr, where passtctl promises one line
# per error: only its own errors are shown unless the user asks grpc for more (GRPC_VERBOSITY=INFO).
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
