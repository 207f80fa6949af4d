"""The training process keeps freed memory for reuse (glibc malloc): a freed activation-sized block is not
page-faulted in afresh on its next allocation. Run in a child process so the test process's allocator stays as
it was."""

import platform
import subprocess
import sys

import pytest

CHILD = """
import resource, sys, torch
from alignloop.core.heap import keep_freed_memory

def faults_per_block():
    for _ in range(20):  # the heap grows to hold the block (a few rounds)
        torch.empty(64 * 2**20 // 4).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.empty(64 * 2**20 // 4).fill_(1.0)  # 64 MiB written, then freed
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10

default = faults_per_block()
assert keep_freed_memory() and keep_freed_memory()  # idempotent
kept = faults_per_block()
print(default, kept)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_blocks_are_reused_without_new_page_faults():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout
    default, kept = map(float, out.split())
    assert default > 10_000  # 64 MiB = 16,384 pages, mapped afresh each time by default
    assert kept < default / 20
