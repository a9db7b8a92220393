"""passtctl: command-line client of passtd's gRPC control socket. Imports nothing of the daemon."""
