"""OpenMP thread pools on the CPU: the engine thread should be the only thread that keeps one.

PyTorch's CPU kernels run their parallel loops on OpenMP (GNU libgomp in PyTorch's Linux wheels),
which gives every thread that runs a parallel region a pool of worker threads and keeps it for
that thread's next region. Once the process holds more such threads than it has CPUs, libgomp
stops letting idle workers spin between regions (its "throttled" spin count), and each region
waits for the kernel to wake its workers. The engine steps on a thread of its own, while the
main thread (loading the model, warming up) and the media threads (tiling and normalising
pixels) had pools of their own too: measured on 2 cores, an add of 100k floats took 30 µs on the
engine thread instead of 6, a decode step of the `small` model 17-19 ms instead of 10.6.

So the engine thread is the only thread that runs torch with several OpenMP threads: helper
threads (media, prompts, resize strips, which are many already) run theirs on one
(`use_one_openmp_thread`, which makes no pool), and a thread that did parallel work before the
engine started (the main thread: loading, warm-up) releases its pool with OpenMP 5's
`omp_pause_resource_all` (its workers exit). Where the OpenMP runtime is not libgomp, or lacks
these calls, both do nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any

import torch

_OMP_PAUSE_HARD = 2  # omp_pause_resource_t: frees the threads (omp_pause_soft may keep them)


def release_openmp_pool() -> None:
    """Let the calling thread's OpenMP worker threads exit (they are recreated if it needs them)."""
    pause = _libgomp_function("omp_pause_resource_all")
    if pause is not None:
        pause(_OMP_PAUSE_HARD)


def use_one_openmp_thread() -> None:
    """Run the calling thread's torch operations on itself alone (an initializer for helper threads).

    OpenMP's thread count is per thread; PyTorch sets a thread's at its first parallel loop, so
    that is run first (a one-element one: no parallel region, no pool), then set to one.
    """
    set_threads = _libgomp_function("omp_set_num_threads")
    if set_threads is not None:
        torch.zeros(1).add_(1)
        set_threads(1)


@functools.cache
def _libgomp_function(name: str) -> Any:
    """A function of the libgomp PyTorch runs on, or None.

    Other packages bring copies of their own (sentencepiece's wheel does), each with its own
    pools; calling theirs does nothing to PyTorch's. PyTorch's wheels ship theirs in torch/lib;
    a PyTorch built against the system's uses the one named libgomp.so.1.
    """
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line}
    except OSError:
        return None
    torch_dir = os.path.dirname(torch.__file__)
    ours = sorted(p for p in paths if p.startswith(torch_dir)) or sorted(
        p for p in paths if os.path.basename(p) == "libgomp.so.1"
    )
    for path in ours:
        try:
            function = getattr(ctypes.CDLL(path), name)
        except (OSError, AttributeError):
            continue
        function.argtypes = [ctypes.c_int]
        function.restype = ctypes.c_int if name == "omp_pause_resource_all" else None
        return function
    return None
