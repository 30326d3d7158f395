"""The application layer of Xeno FL: the `xeno-fl` command, simulations, the seed-facing API.

`common` imports nothing of ours and `server`/`client` import only `common`; this package is the one
place that may import all of them, which is why the CLI and the multi-process simulation live here.
"""
