"""-host_memory: keep freed CPU memory for the next tensor instead of handing it back to the system.

glibc's malloc maps every block above its mmap threshold (32 MB at most) afresh and unmaps it when it is
freed, so each large tensor a step allocates is paged in again: the kernel faults and zeroes it page by page.
LiteMedSAM at 256 px allocates many such tensors per step; a 134 MB GELU output took 45 ms into fresh memory
and 13 ms into memory already mapped. `reuse` makes malloc serve every block from its heap and never trim it,
so freed memory is refilled without faults: faster steps, for a higher peak (freed blocks that do not fit the
next request stay resident). `system` leaves the C library's defaults. Forked workers inherit the setting.
"""
from __future__ import annotations

import ctypes
import platform

POLICIES = ("reuse", "system")
M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1


def set_host_memory(policy: str) -> tuple[str, str]:
    """Apply -host_memory (reuse | system) to this process: (the policy in force, a line saying so)."""
    if policy not in POLICIES:
        raise ValueError(f"host memory policy must be one of {POLICIES}, got {policy!r}")
    if policy == "system":
        return "system", "host memory: the C library's defaults (-host_memory system)"
    library, _ = platform.libc_ver()
    if library != "glibc":
        return "system", (f"host memory: the C library's defaults (-host_memory reuse tunes glibc's malloc; "
                          f"this is {library or platform.system()})")
    mallopt = ctypes.CDLL(None).mallopt
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)):
        raise RuntimeError("glibc's mallopt refused the -host_memory reuse settings")
    return "reuse", ("host memory: freed blocks kept for reuse (glibc malloc: heap only, never trimmed; faster "
                     "steps, higher peak; -host_memory system: the defaults)")
