"""Alembic migrations of the server's schema.

Run by `Store.migrate()`: `xeno-fl server` migrates on start, and
`xeno-fl admin db upgrade --db URL` migrates without starting a server.
"""
