"""Stage memory: freed heap pages go back to the OS between stages."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from knowledgesg.memory import resident_bytes, release_freed_memory

MIB = 1024 * 1024


@pytest.mark.skipif(not Path("/proc/self/statm").is_file() or platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim; resident size read from Linux /proc")
def test_freed_heap_pages_go_back_to_the_os():
    blocks = [bytearray(64 * 1024) for _ in range(4000)]  # 250 MiB in blocks below glibc's mmap threshold: heap memory
    kept = blocks[::2]  # every other one stays: the freed half sits in holes, which free() never trims
    del blocks
    before = resident_bytes()
    release_freed_memory()
    assert resident_bytes() < before - 80 * MIB
    assert len(kept) == 2000
