"""Hand freed heap memory back to the operating system between large phases of work.

glibc keeps the pages of freed blocks in its heap; after many rounds of large temporary tensors
(one decoder block's tuning) the process's resident size keeps growing although the live data does
not. ``malloc_trim(0)`` returns those pages. On other C libraries this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Return freed heap pages to the OS; ``True`` where the C library could do it."""
    trim = _malloc_trim()
    return bool(trim is not None and trim(0))
