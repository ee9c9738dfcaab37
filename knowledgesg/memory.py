"""Peak resident memory of a stage, sampled: ru_maxrss only ever grows over a process, so it cannot
tell a later stage's smaller peak from an earlier stage's larger one."""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import resource
import threading

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024


def resident_bytes() -> int:
    """This process's resident set size now (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * PAGE
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@functools.cache
def _glibc_function(name: str):
    """glibc's `name` (malloc_trim, mallopt), or None where there is no glibc (macOS, musl; a
    libc.so.6 shim without it)."""
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand the pages of freed objects back to the OS. glibc's allocator keeps a process's freed heap
    resident: after a stage's tensors were freed, 1.6 of SmolLM2's 2.2 GiB stayed until
    `malloc_trim`, and the next stage's peak stood on them (the demo's refine measured 3.99 GiB after
    a bfloat16 dp_train; 2.9 GiB after a float32 one). A no-op where there is no glibc."""
    gc.collect()  # tensors in reference cycles are freed only by the collector
    trim = _glibc_function("malloc_trim")
    if trim is not None:
        trim(0)


# mallopt's parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_LARGEST_MMAP_THRESHOLD = 32 * MIB  # glibc's ceiling on 64-bit systems; a larger value is refused
_KEEP_UP_TO = 2**31 - 1  # the largest int mallopt takes: about 2 GiB of freed heap kept resident


def keep_freed_memory(keep: bool = True) -> None:
    """Let glibc reuse freed pages instead of handing them back to the OS after every free. DP-SGD
    allocates and frees its per-unit gradients (156 MB a step at r=16 on every linear layer) each
    step; with glibc's defaults those pages went back to the OS and were faulted in again, about
    100,000 page faults a step, where a non-DP step had none (`benchmarks/results/dp_overhead_all_r16.md`).
    Both settings are needed: a fixed trim threshold alone freezes the mmap threshold at 128 KiB,
    and every larger tensor is then a fresh mmap (two million faults a step). `release_freed_memory`
    still returns everything when a stage ends. `keep=False`, once training is over: freed memory
    above 64 MiB at the heap's top goes back to the OS again (twice the mmap threshold, where
    glibc's own rule settles once it has raised that threshold to its ceiling; mallopt cannot turn
    the rule itself back on). A no-op where there is no glibc."""
    mallopt = _glibc_function("mallopt")
    if mallopt is None:
        return
    mallopt(_M_MMAP_THRESHOLD, _LARGEST_MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, _KEEP_UP_TO if keep else 2 * _LARGEST_MMAP_THRESHOLD)


class PeakMemory:
    """`with PeakMemory() as peak: ...`, then `peak.mib`: the highest resident size seen, sampled
    every `interval` seconds in a background thread (this process only: worker processes, such as
    Flower's simulation runtime, are not counted)."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self.peak = resident_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())

    @property
    def mib(self) -> float:
        return round(self.peak / MIB, 1)
