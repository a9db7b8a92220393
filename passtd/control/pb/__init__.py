"""Generated from proto/passt.proto by scripts/gen_proto.py; do not edit."""
