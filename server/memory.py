"""The server process's allocator settings: megabyte buffers reuse memory instead of faulting it in.

An upload arrives as 1 MiB messages, and gRPC hands each one to Python as a fresh
bytes object. With glibc's defaults, a freed block of that size is soon given back
to the kernel (the heap top is trimmed past `M_TRIM_THRESHOLD`, per-thread arenas
with madvise), so the next message faults its pages in again and the kernel zeroes
every one: `perf record` on a 100-device, 1M-parameter secure round put about a
quarter of the server's CPU in page faults (`clear_page_erms`). Fixed thresholds
keep such blocks in the heap for reuse; blocks of 32 MiB and more are still mapped
and unmapped on their own, and up to `TRIM_THRESHOLD` of free heap is kept.

The cyclic garbage collector is the other cost that grows with the heap rather than
the work: a served process holds ~250,000 tracked objects (modules, SQLAlchemy,
gRPC, numpy), and every full collection walks all of them. A secure round's state
(share maps, commitments) triggers several full collections: ~0.16 s of the
server's CPU in `benchmarks/secagg.py`. `freeze_startup_heap` moves what start-up
built into the permanent generation once, so later collections walk only what
the server allocated since, and raises the young generation's threshold from 700
to `YOUNG_THRESHOLD` allocations: each call allocates a few hundred short-lived
objects (asyncio futures, handles, gRPC wrappers), nearly all freed by reference
counting, so collecting every 700 mostly walked the calls in flight, ~0.02 s of a
100-device secure round in gen-0 and gen-1 collections.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import platform

log = logging.getLogger("xeno.server.memory")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling on 64-bit; also turns off its dynamic threshold
TRIM_THRESHOLD = 256 << 20
YOUNG_THRESHOLD = 10_000  # allocations between young-generation collections (default 700)

_tuned = False
_frozen = False


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


def freeze_startup_heap() -> None:
    """Collect once, then exempt every surviving object from later collections (once).

    Once per process, at the first server start: what start-up built (imports, the
    store, the servicers) lives as long as the process, so walking it on every full
    collection is wasted. Objects that become garbage later are still freed by
    reference counting; only cycles among objects alive right now would stay. The young
    generation's threshold is raised to YOUNG_THRESHOLD (see the module docstring).
    """
    global _frozen
    if _frozen:
        return
    _frozen = True
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    if 0 < young < YOUNG_THRESHOLD:  # 0: the collector is off; a higher one is kept
        gc.set_threshold(YOUNG_THRESHOLD, middle, old)
