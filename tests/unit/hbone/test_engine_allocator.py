"""The engine's process keeps the data path's large read buffers in the malloc heap (glibc).

uvloop reads each TLS record into a fresh 256 KiB object that is shrunk to what was read.  Served by
`mmap`, every such read faults in fresh zeroed pages; from the heap, the same pages are reused.  Each
case runs in a child process of its own: the setting is process-wide and would outlive the test.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from mesh.hbone import engine

READS = 2000

CHILD = f"""
import os, resource, sys, threading
from mesh.hbone.engine import keep_reads_off_mmap
if sys.argv[1] == "tuned":
    assert keep_reads_off_mmap() and keep_reads_off_mmap()   # set once; asking again changes nothing
r, w = os.pipe()
faults = []
def reads():   # on a thread of its own, as the engine's loop: its own malloc arena
    os.write(w, b"x" * 1024); os.read(r, 256 * 1024)
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range({READS}):
        os.write(w, b"x" * 1024)
        kept = os.read(r, 256 * 1024)   # 256 KiB allocated, 1 KiB read, shrunk: SSLObject.read's shape
    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
thread = threading.Thread(target=reads); thread.start(); thread.join()
print(faults[0])
"""


def page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_large_reads_reuse_heap_pages_once_the_engine_has_tuned_the_allocator():
    assert page_faults("default") >= READS  # the premise: each read maps fresh pages of its own
    assert page_faults("tuned") < READS // 4  # measured: 4,000 against 127 (the arena growing once)


def test_the_thresholds_sit_above_uvloops_read_buffer():
    assert engine.MMAP_THRESHOLD > 256 * 1024
    assert engine.TRIM_THRESHOLD >= 2 * engine.MMAP_THRESHOLD
