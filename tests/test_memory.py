"""glibc keeps freed training buffers for reuse on CPU instead of mapping them afresh every step."""

import subprocess
import sys

import pytest

from tests.conftest import REPO

CHILD = """
import os, resource, sys, torch
sys.path.insert(0, sys.argv[1])
from pipeline.train.memory import freed_memory_kept

def faults(times):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        x = torch.ones(16 * 2**20)  # 64 MB, like a step's logits
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

default = faults(20)
with freed_memory_kept():
    faults(20)  # the heap grows to its working size first
    kept = faults(20)
    held = rss_mb()  # the freed buffers stay resident for the next step
print(default, kept, held - rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_buffers_are_reused_without_page_faults_while_training():
    out = subprocess.run([sys.executable, "-c", CHILD, str(REPO)], capture_output=True, text=True, check=True).stdout
    default, kept, released_mb = map(float, out.split())
    assert default > 20 * 10_000 and kept < 2_000  # each 64 MB buffer is 16,384 pages
    assert released_mb > 50  # afterwards the heap is trimmed: the memory goes back to the system
