"""arctl.memory: returning freed heap pages to the OS."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from arctl.memory import release_free_memory


def _resident_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's; RSS read from /proc")
def test_release_free_memory_returns_freed_holes_to_the_os():
    # 64 KiB blocks live in the heap (under glibc's mmap threshold); freeing every other one leaves
    # holes that free() cannot give back, because live blocks sit above them
    blocks = [bytearray(b"x" * (1 << 16)) for _ in range(1024)]
    for index in range(0, len(blocks), 2):
        blocks[index] = None
    before = _resident_mb()
    assert release_free_memory()
    after = _resident_mb()
    assert before - after > 16, (before, after)  # 32 MiB of holes were freed
    del blocks
