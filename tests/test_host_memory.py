"""-host_memory reuse: memory of a large tensor, once freed, is refilled by the next one without page faults,
and freed large blocks merge (glibc's per-thread cache off, from the process's start)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from cfg import Config, parse_args
from common.errors import UserError
from engine.compare import config_differences
from engine import host_memory
from engine.host_memory import NO_THREAD_CACHE, TUNABLES, set_host_memory, start_up_environment

REPO = Path(__file__).resolve().parents[1]
# a fresh process: allocate and free a 256 MB tensor, then count the page faults of allocating and filling one of
# 255 MB (a little smaller: the aligned allocation asks for a few bytes more than the tensor)
FAULTS_OF_A_REFILL = """
import resource, sys
sys.path.insert(0, {repo!r})
import torch
from cfg import Config, parse_args
from common.errors import UserError
from engine.compare import config_differences
from engine.host_memory import set_host_memory
print(set_host_memory({policy!r})[0])
torch.empty(64 * 2**20).fill_(1)  # 256 MB, freed at once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(255 * 2**18).fill_(2)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


# under -host_memory reuse: sixteen 16 MB tensors, each followed by a small malloc block (600-840 bytes: one per
# size class of glibc's per-thread cache, which holds seven of a size); the small blocks are freed, then the
# tensors; a 240 MB tensor then fits in the freed space only if the 16 MB gaps merged
GROWTH_AFTER_FREEING_AROUND_SMALL_BLOCKS = """
import sys
sys.path.insert(0, {repo!r})
import torch
from engine.host_memory import set_host_memory
print(set_host_memory("reuse")[0])
def rss_mb():
    return next(int(line.split()[1]) // 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))
large, small = [], []
for size in range(600, 856, 16):
    large.append(torch.ones(4 * 2**20))
    small.append(bytearray(size))  # malloc, not Python's small-object pool (512 bytes at most)
small.clear()
large.clear()
before = rss_mb()
torch.ones(60 * 2**20)
print(rss_mb() - before)
"""


def run_child(script: str, policy: str, environment: dict) -> tuple[str, int]:
    """(the policy the child reports in force, the number it prints)."""
    result = subprocess.run([sys.executable, "-c", script.format(repo=str(REPO), policy=policy)], env=environment,
                            capture_output=True, text=True, timeout=120, check=True)
    *applied, number = result.stdout.split()
    return " ".join(applied), int(number)


def refill_faults(policy: str) -> tuple[str, int]:
    return run_child(FAULTS_OF_A_REFILL, policy, start_up_environment(policy, os.environ))


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="-host_memory reuse tunes glibc's malloc")
def test_reuse_refills_freed_memory_without_faults():
    assert refill_faults("reuse") == ("reuse", pytest.approx(0, abs=200))
    applied, faults = refill_faults("system")
    # the system default maps the tensor afresh: a fault per page (4 KB; fewer with transparent huge pages)
    assert applied == "system" and faults > 255 * 2**20 / 2**21


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="-host_memory reuse tunes glibc's malloc")
def test_without_the_thread_cache_freed_large_blocks_merge_and_are_refilled():
    without_tunables = {name: value for name, value in os.environ.items() if name != TUNABLES}
    started_right = start_up_environment("reuse", without_tunables)
    assert run_child(GROWTH_AFTER_FREEING_AROUND_SMALL_BLOCKS, "reuse", started_right) == ("reuse", pytest.approx(0, abs=8))
    # the thread cache keeps small blocks in use, so some 16 MB gaps stay apart and the heap grows instead (by
    # 32-128 MB here: which small blocks land between the tensors varies from run to run)
    applied, growth = run_child(GROWTH_AFTER_FREEING_AROUND_SMALL_BLOCKS, "reuse", without_tunables)
    assert applied == "reuse, thread cache on" and growth >= 16


def test_the_start_up_environment_turns_the_thread_cache_off_for_reuse_on_glibc(monkeypatch):
    monkeypatch.setattr(host_memory, "_on_glibc", lambda: True)
    assert start_up_environment("reuse", {"HOME": "/h"}) == {"HOME": "/h", TUNABLES: NO_THREAD_CACHE}
    assert start_up_environment("reuse", {TUNABLES: "glibc.malloc.arena_max=1"}) == {
        TUNABLES: f"glibc.malloc.arena_max=1:{NO_THREAD_CACHE}"}
    started = start_up_environment("reuse", {})
    assert start_up_environment("reuse", started) == started  # a restarted process is not restarted again
    chosen = {TUNABLES: "glibc.malloc.tcache_count=3"}  # the user's own size stays
    assert start_up_environment("reuse", chosen) == chosen and start_up_environment("system", {}) == {}
    monkeypatch.setattr(host_memory, "_on_glibc", lambda: False)
    assert start_up_environment("reuse", {}) == {}
    with pytest.raises(ValueError, match="host memory policy"):
        start_up_environment("keep", {})


def test_system_changes_nothing_and_bad_policy_is_refused():
    assert set_host_memory("system")[0] == "system"
    with pytest.raises(ValueError, match="host memory policy"):
        set_host_memory("keep")


def test_flags_refuse_unknown_policies_and_compare_ignores_the_policy():
    with pytest.raises(SystemExit):
        parse_args("train", ["-host_memory", "keep"])
    with pytest.raises(UserError, match="-host_memory_options takes reuse or system"):
        parse_args("benchmark", ["-host_memory_options", "reuse,keep"])
    saved = {**Config().to_json(), "host_memory": "system"}
    assert config_differences(saved, Config(host_memory="reuse")) == []  # same results either way
