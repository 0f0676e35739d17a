"""OpenMP pools (model_runtime/cpu_threads.py): helper threads make none, the main thread's goes.

Checked in a fresh interpreter, where the threads of the process are known, by counting them:
an OpenMP pool is a set of OS threads.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from model_runtime.cpu_threads import _libgomp_function

SCRIPT = textwrap.dedent(
    """
    import os, threading, time
    import sentencepiece  # its wheel brings a libgomp of its own, which must not be the one used
    import torch
    from model_runtime.cpu_threads import release_openmp_pool, use_one_openmp_thread

    big = torch.empty(1 << 22)  # no parallel region yet

    def count():
        return len(os.listdir("/proc/self/task"))

    def helper(out):
        use_one_openmp_thread()
        before = count()
        big.add_(1)
        out.append((torch.get_num_threads(), count() - before))

    start = count()
    big.add_(1)  # the main thread's pool: its workers are new threads
    pooled = count()
    release_openmp_pool()
    time.sleep(0.2)
    released = count()
    out = []
    thread = threading.Thread(target=helper, args=(out,))
    thread.start()
    thread.join()
    print(start, pooled, released, *out[0])
    """
)


@pytest.mark.skipif(
    _libgomp_function("omp_pause_resource_all") is None or torch.get_num_threads() < 2,
    reason="needs PyTorch on libgomp with two threads or more",
)
def test_helper_threads_make_no_pool_and_the_main_thread_releases_its_own() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    start, pooled, released, helper_threads, helper_new = map(int, proc.stdout.split())
    assert pooled > start  # a parallel region made worker threads
    assert released == start  # ... and they exited
    assert helper_threads == 1 and helper_new == 0  # the helper ran on itself alone
