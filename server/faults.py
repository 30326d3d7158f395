"""Crash points for the recovery tests.

With XENO_CRASH_AT=<point>, the server kills itself with SIGKILL when it
reaches that point: exactly what an operator's `kill -9` or a power cut does
at that moment, but at a chosen moment. Points: `upload` (first masked
update added to the sum), `unmask` (unmasking phase begins), `version-write`
(new version written but its transaction not committed); `xeno-fl admin rotate-key`:
`rotate-key` (after its first batch of rows) and `rotate-key-pseudonyms` (after its
first batch of A/B result pseudonyms, the last phase). Unset, this is a no-op.
"""

from __future__ import annotations

import os
import signal
import sys


def crash_point(name: str) -> None:
    if os.environ.get("XENO_CRASH_AT") == name:
        print(f"crash point {name}: killing the server", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
