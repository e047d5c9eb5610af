"""Memory helpers for the ingestion tests: an address-space guard and peak-RSS readers.

A test that feeds hostile geometry to ingestion must not be able to take the machine down
if a check regresses (pycocotools would ask for gigabytes): `address_space_limit` makes
such an allocation fail inside this process instead. Linux only; elsewhere a no-op.
"""
from __future__ import annotations

import resource
from contextlib import contextmanager
from pathlib import Path


def status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (``VmHWM``: peak RSS, ``VmSize``: address
    space), or None where /proc is unavailable."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (VmHWM, else ru_maxrss)."""
    kib = status_kib("VmHWM")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@contextmanager
def address_space_limit(extra_bytes: int):
    """Cap this process's address space at its current size + ``extra_bytes`` (soft
    RLIMIT_AS), restoring the previous soft limit on exit."""
    size_kib = status_kib("VmSize")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if size_kib is None:
        yield
        return
    cap = size_kib * 1024 + extra_bytes
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    if soft != resource.RLIM_INFINITY:
        cap = min(cap, soft)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
