"""-host_memory reuse: memory of a large tensor, once freed, is refilled by the next one without page faults."""
from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from cfg import Config, parse_args
from common.errors import UserError
from engine.compare import config_differences
from engine.host_memory import set_host_memory

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


def refill_faults(policy: str) -> tuple[str, int]:
    result = subprocess.run([sys.executable, "-c", FAULTS_OF_A_REFILL.format(repo=str(REPO), policy=policy)],
                            capture_output=True, text=True, timeout=120, check=True)
    applied, faults = result.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="-host_memory reuse tunes glibc's malloc")
def test_reuse_refills_freed_memory_without_faults():
    assert refill_faults("reuse") == ("reuse", pytest.approx(0, abs=200))
    applied, faults = refill_faults("system")
    # the system default maps the tensor afresh: a fault per page (4 KB; fewer with transparent huge pages)
    assert applied == "system" and faults > 255 * 2**20 / 2**21


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
