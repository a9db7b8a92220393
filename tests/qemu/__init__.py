"""Real-VM tests of passt mode: a tiny Debian-kernel + busybox guest under qemu (TCG) talks to passtd."""
