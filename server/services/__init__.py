"""Thin gRPC servicers: parse, call the domain layer, map errors to status codes."""
