"""How long a server that refused a call (RESOURCE_EXHAUSTED, UNAVAILABLE) asks to wait."""

from __future__ import annotations

from typing import Any

import grpc

RETRY_AFTER_KEY = "x-xeno-retry-after-ms"  # trailing metadata of such a refusal
MAX_RETRY_AFTER_S = 600.0  # a hint beyond this is the server's mistake, not a plan


def retry_after_s(err: grpc.RpcError) -> float:
    """The wait, in seconds, that a refusal names in its trailing metadata (0: none)."""
    try:
        trailers: Any = err.trailing_metadata() or ()  # type: ignore[attr-defined]
    except Exception:  # an error raised locally, without a call behind it
        return 0.0
    for key, value in trailers:
        if key == RETRY_AFTER_KEY:
            try:
                seconds = float(value) / 1000.0
            except ValueError:
                return 0.0
            return max(0.0, min(seconds, MAX_RETRY_AFTER_S)) if seconds == seconds else 0.0
    return 0.0
