import subprocess
import sys

import pytest

# Page faults while a process allocates, fills and frees forty 4 MB tensors (like a step's activations) four
# times after one warm-up cycle, run in a fresh interpreter because the allocator setting is process-wide.
PAGES_TOUCHED = 4 * 40 * (4 * 2**20) // 4096  # cycles × tensors × bytes / page size
FAULTS_SCRIPT = """
import resource, sys, torch
from dvae_cli.core.runtime import keep_freed_host_memory
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()
def cycle():
    tensors = [torch.ones(2**20) for _ in range(40)]
    del tensors
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(result.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keeping_freed_host_memory_stops_refaulting_each_step() -> None:
    default, kept = page_faults("default"), page_faults("keep")
    # glibc's default trims and refaults a varying share (a quarter to all of the pages, measured)
    assert kept < PAGES_TOUCHED / 8
    assert default > 4 * kept
