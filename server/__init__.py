"""Aggregation server: gRPC services over a domain layer of rounds, strategies and storage."""
