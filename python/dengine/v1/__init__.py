"""Generated gRPC and protobuf modules (scripts/gen_protos.py)."""
