"""-host_memory: keep freed CPU memory for the next tensor instead of handing it back to the system.

glibc's malloc maps every block above its mmap threshold (32 MB at most) afresh and unmaps it when it is
freed, so each large tensor a step allocates is paged in again: the kernel faults and zeroes it page by page.
LiteMedSAM at 256 px allocates many such tensors per step; a 134 MB GELU output took 45 ms into fresh memory
and 13 ms into memory already mapped. `reuse` makes malloc serve every block from its heap and never trim it,
so freed memory is refilled without faults: faster steps, for a higher peak on its own (freed blocks that do
not fit the next request stay resident; the thread cache, below, was most of that). `system` leaves the C
library's defaults. Forked workers inherit the setting.

`reuse` also turns off glibc's per-thread cache of small freed blocks (`glibc.malloc.tcache_count=0`). A block
in that cache still counts as in use, so the large freed tensors on either side of it cannot merge; the heap
then grows at the second step, when a large tensor finds no merged gap to fill. LiteMedSAM LoRA at 256 px,
batch 2: a peak of 2,144-2,251 MB instead of 2,491-2,563 MB. glibc reads this tunable only when a process
starts, so it comes from the environment (`start_up_environment`): train.py starts itself once more with
it, benchmark.py starts each row's process with it, and `set_host_memory` says whether this process has it.
"""
from __future__ import annotations

import ctypes
import os
import platform
from typing import Mapping

POLICIES = ("reuse", "system")
M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1
TUNABLES = "GLIBC_TUNABLES"
NO_THREAD_CACHE = "glibc.malloc.tcache_count=0"


def _on_glibc() -> bool:
    return platform.libc_ver()[0] == "glibc"


def start_up_environment(policy: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment a process should start with under `policy`: `environ`, plus glibc's thread cache
    turned off for `reuse` on glibc (kept as it is where GLIBC_TUNABLES already sets the cache's size)."""
    if policy not in POLICIES:
        raise ValueError(f"host memory policy must be one of {POLICIES}, got {policy!r}")
    tunables = environ.get(TUNABLES, "")
    if policy == "system" or not _on_glibc() or "glibc.malloc.tcache_count=" in tunables:
        return dict(environ)
    return {**environ, TUNABLES: f"{tunables}:{NO_THREAD_CACHE}" if tunables else NO_THREAD_CACHE}


def set_host_memory(policy: str) -> tuple[str, str]:
    """Apply -host_memory (reuse | system) to this process: (what is in force: "reuse", "reuse, thread cache
    on" where the process did not start with the cache off, or "system"; a line saying so)."""
    if policy not in POLICIES:
        raise ValueError(f"host memory policy must be one of {POLICIES}, got {policy!r}")
    if policy == "system":
        return "system", "host memory: the C library's defaults (-host_memory system)"
    if not _on_glibc():
        return "system", (f"host memory: the C library's defaults (-host_memory reuse tunes glibc's malloc; "
                          f"this is {platform.libc_ver()[0] or platform.system()})")
    mallopt = ctypes.CDLL(None).mallopt
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)):
        raise RuntimeError("glibc's mallopt refused the -host_memory reuse settings")
    if NO_THREAD_CACHE not in os.environ.get(TUNABLES, "").split(":"):
        return "reuse, thread cache on", ("host memory: freed blocks kept for reuse (glibc malloc: heap only, "
                                          "never trimmed, per-thread cache on)")
    return "reuse", ("host memory: freed blocks kept for reuse (glibc malloc: heap only, never trimmed, no "
                     "per-thread cache; faster steps; -host_memory system: the defaults)")
