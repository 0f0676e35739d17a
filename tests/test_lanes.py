"""The media lanes: requests served in turn, at most `per_lane` workers each, refusals hold nothing."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest

from model_runtime.errors import detached, release_frames
from model_runtime.inputs.lanes import FairExecutor


@pytest.fixture
def executor():
    pool = FairExecutor(2, per_lane=1, name="test-lanes")
    yield pool
    pool.shutdown()


def test_one_lane_cannot_take_every_worker(executor: FairExecutor) -> None:
    release = threading.Event()
    greedy = [executor.submit("greedy", release.wait, 10) for _ in range(6)]
    # The greedy lane holds one worker at most; another request's job runs on the other at once.
    assert executor.submit("other", lambda: "done").result(timeout=5) == "done"
    assert sum(f.running() for f in greedy) == 1
    release.set()
    assert all(f.result(timeout=5) for f in greedy)


def test_lanes_take_turns(executor: FairExecutor) -> None:
    single = FairExecutor(1, per_lane=1, name="test-turns")
    gate = threading.Event()
    order: list[str] = []
    blocker = single.submit("blocker", gate.wait, 10)
    while not blocker.running():
        threading.Event().wait(0.01)
    futures = [single.submit("a", order.append, f"a{i}") for i in range(3)]
    futures += [single.submit("b", order.append, f"b{i}") for i in range(3)]
    gate.set()
    for future in futures:
        future.result(timeout=5)
    single.shutdown()
    assert order == ["a0", "b0", "a1", "b1", "a2", "b2"]


def test_cancel_drops_queued_jobs(executor: FairExecutor) -> None:
    gate = threading.Event()
    running = executor.submit("r", gate.wait, 10)
    for _ in range(500):
        if running.running():
            break
        threading.Event().wait(0.01)
    queued = [executor.submit("r", lambda: None) for _ in range(3)]
    executor.cancel("r")
    gate.set()
    assert running.result(timeout=5) is True
    assert all(f.cancelled() for f in queued)
    assert executor.queued() == 0


class _Pixels:
    """Stands in for a tensor: something big a failing job held as a local."""


def test_a_failed_job_releases_its_locals() -> None:
    pool = FairExecutor(1, per_lane=1, name="test-release")
    alive: list[weakref.ref] = []

    def job() -> None:
        pixels = _Pixels()
        alive.append(weakref.ref(pixels))
        raise ValueError("refused")

    gc.disable()
    try:
        future = pool.submit("x", job)
        error = future.exception(timeout=5)
        assert isinstance(error, ValueError)
        # The error still reaches the waiter, with its traceback, but not the job's locals.
        assert alive[0]() is None
        assert error.__traceback__ is not None
    finally:
        gc.enable()
        pool.shutdown()


def test_release_frames_follows_the_cause_chain() -> None:
    holder: list[weakref.ref] = []

    def inner() -> None:
        pixels = _Pixels()
        holder.append(weakref.ref(pixels))
        raise KeyError("inner")

    gc.disable()
    try:
        try:
            try:
                inner()
            except KeyError:
                raise ValueError("outer") from None  # from None keeps __context__, and its frames
        except ValueError as exc:
            caught = exc
        release_frames(caught)
        assert holder[0]() is None
        assert detached(caught) is caught
    finally:
        gc.enable()
