import subprocess
import sys

import pytest

# Page faults while a process allocates, fills and frees forty 4 MB tensors (like a step's activations) four
# times after two warm-up cycles, run in a fresh interpreter because the allocator setting is process-wide.
# Both modes first set glibc to return every freed block to the kernel (fixed 128 KB thresholds), which it does
# in some runs under its default, adaptive thresholds and not in others (measured: 0 to all of the pages a
# cycle); keep_freed_host_memory must override that.
PAGES_TOUCHED = 4 * 40 * (4 * 2**20) // 4096  # cycles × tensors × bytes / page size
FAULTS_SCRIPT = """
import ctypes, resource, sys, torch
from dvae_cli.core.runtime import keep_freed_host_memory
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
libc = ctypes.CDLL("libc.so.6")
assert libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024) and libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()
def cycle():
    tensors = [torch.ones(2**20) for _ in range(40)]
    del tensors
cycle()
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
    returned, kept = page_faults("return"), page_faults("keep")
    assert returned > 0.95 * PAGES_TOUCHED
    assert kept < PAGES_TOUCHED / 8
