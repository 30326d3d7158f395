"""Generated protobuf and gRPC stubs for proto/xeno/fl/v1 (run `make proto`)."""
