"""Code shared by the aggregation server and the device clients.

Nothing here is server-only or client-only: the wire codec for tensors, the
model zoo, datasets and partitioners, typed configuration and the CLI entry
point that dispatches to the server and client packages.
"""
