"""The XENO desktop app (`xeno-fl ui`): five tabs over one user's device and the federation.

Qt for Python (PySide6-Essentials, the `ui` extra). This package is the
application layer's window: it calls `xeno.model_finetuning` (the user's
store: preferences, examples, personal versions, consent, GDPR),
`xeno.model_versioning` and the admin API (`xeno.ui.backend`: versions,
metrics, A/B tests, privacy ledgers) and the accountants in
`common.privacy`; it decides nothing itself. `add_parser` needs no Qt, so
`xeno-fl --help` works without the extra.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_parser", "main"]


def add_parser(sub: Any) -> None:
    """The `ui` subcommand's flags (the admin connection flags are those of `xeno-fl admin`)."""
    p = sub.add_parser(
        "ui",
        help="the XENO desktop app (Personalization, Training, Performance, Versions, Privacy)",
        description="Open the desktop app for one user on this device. Performance and "
        "Versions read a running server (--server, with the admin TLS and token options) or a "
        "database directly (--db; default XENO_DB, else $XENO_HOME/xeno.db). --demo seeds a "
        "demo user and a short federation first.",
    )
    p.add_argument("--user", required=True, help="the user whose assistant data is shown")
    p.add_argument(
        "--home",
        default="",
        help="folder of the assistant's data (default: $XENO_HOME, else ./data; with --demo: "
        "./data/ui-demo, never $XENO_HOME)",
    )
    from xeno.cli import add_admin_connection_flags  # loaded already: it calls us

    add_admin_connection_flags(p, show_token=False)
    p.add_argument(
        "--demo",
        action="store_true",
        help="seed a demo user and a short federation (in --home, default ./data/ui-demo; once) "
        "and open them",
    )
    p.add_argument(
        "--screenshot",
        default="",
        metavar="DIR",
        help="write a PNG of every tab into DIR and exit (no display needed)",
    )


def main(args: argparse.Namespace) -> int:
    try:
        from xeno.ui.app import run
    except ImportError as exc:
        print(
            f"error: the desktop app needs the ui extra ({exc}): pip install 'xeno-fl[ui]'",
            file=sys.stderr,
        )
        return 2
    return run(args)
