"""Generated protobuf code: see scripts/gen_proto.py."""
