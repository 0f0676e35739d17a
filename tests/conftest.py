"""Shared fixtures: tiny random InternVL checkpoints written once per session, and cached loads;
local HTTP servers that record hits (tests/http_recorder.py) for the media tests.

Fixtures here stay generic; torch and transformers are imported lazily so the pure tests
(scheduler, sampling params, templates) never pay for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.http_recorder import Recorder, serve

if TYPE_CHECKING:
    from model_runtime.loading.checkpoint import LoadedCheckpoint

LLM_KINDS = ("qwen2", "internlm2")
LAYOUTS = ("original", "hf")
TINY_SEED = 0


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip `gpu` tests without CUDA before any of their fixtures (even module-scoped) is built."""
    if item.get_closest_marker("gpu") is None:
        return
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """{(llm, layout): directory} for llm in qwen2/internlm2 and layout in original/hf, same seed."""
    from model_runtime.loading.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny-checkpoints")
    return {
        (llm, layout): write_tiny_checkpoint(root / f"{llm}-{layout}", layout=layout, llm=llm, seed=TINY_SEED)
        for llm in LLM_KINDS
        for layout in LAYOUTS
    }


@pytest.fixture(scope="session")
def load_cached() -> Callable[[str | Path], LoadedCheckpoint]:
    """Load a checkpoint directory on CPU in float32, once per path; callers must not modify it."""
    from model_runtime.config import EngineConfig
    from model_runtime.loading.checkpoint import load_checkpoint

    cache: dict[Path, LoadedCheckpoint] = {}

    def load(path: str | Path) -> LoadedCheckpoint:
        key = Path(path).resolve()
        if key not in cache:
            cache[key] = load_checkpoint(EngineConfig(model=str(key), device="cpu", dtype="float32"))
        return cache[key]

    return load


@pytest.fixture(scope="session")
def loaded(
    tiny_checkpoints: dict[tuple[str, str], Path], load_cached: Callable[[str | Path], LoadedCheckpoint]
) -> Callable[[str, str], LoadedCheckpoint]:
    """`loaded(llm, layout)`: the session's tiny checkpoint of that kind, loaded once."""

    def get(llm: str, layout: str) -> LoadedCheckpoint:
        return load_cached(tiny_checkpoints[(llm, layout)])

    return get


# -- local HTTP servers that record hits ----------------------------------------------------------


@pytest.fixture
def target() -> Iterator[Recorder]:
    """What an attacker wants to reach: a server on 127.0.0.1."""
    with serve("127.0.0.1") as server:
        yield server


@pytest.fixture
def target6() -> Iterator[Recorder]:
    """The same on the IPv6 loopback, [::1]."""
    with serve("[::1]") as server:
        yield server


@pytest.fixture
def public_server() -> Iterator[Recorder]:
    """A server a test takes for public (with an `address_allowed` that lets 127.0.0.2 through)."""
    with serve("127.0.0.2") as server:
        yield server
