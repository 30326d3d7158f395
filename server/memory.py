"""The server process's allocator settings: megabyte buffers reuse memory instead of faulting it in.

An upload arrives as 1 MiB messages, and gRPC hands each one to Python as a fresh
bytes object. With glibc's defaults, a freed block of that size is soon given back
to the kernel (the heap top is trimmed past `M_TRIM_THRESHOLD`, per-thread arenas
with madvise), so the next message faults its pages in again and the kernel zeroes
every one: `perf record` on a 100-device, 1M-parameter secure round put about a
quarter of the server's CPU in page faults (`clear_page_erms`). Fixed thresholds
keep such blocks in the heap for reuse; blocks of 32 MiB and more are still mapped
and unmapped on their own, and up to `TRIM_THRESHOLD` of free heap is kept.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger("xeno.server.memory")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling on 64-bit; also turns off its dynamic threshold
TRIM_THRESHOLD = 256 << 20

_tuned = False


def tune_allocator() -> bool:
    """Set the thresholds once per process (glibc only); True when they are in effect."""
    global _tuned
    if _tuned:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1)
        ok = bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1) and ok
    except (OSError, AttributeError) as exc:
        log.info("allocator left at its defaults: %s", exc)
        return False
    _tuned = ok
    return ok
