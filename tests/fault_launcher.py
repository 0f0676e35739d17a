"""Test-only launcher: the real `internvl-serve` CLI, with faults injected into the engine.

`python -m tests.fault_launcher <internvl-serve flags>` runs `server.cli.main()` after wrapping
`Worker.start`, so that the started worker's engine gets a `fault_hook` (called with each request
before its prefill): a prompt containing FAULT_MARKER fails that request alone with a plain
exception; one containing FATAL_MARKER raises what the engine treats as an unrecoverable device
error, which marks the worker dead. The product never imports this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

FAULT_MARKER = "FAULT-ME"
FATAL_MARKER = "KILL-ME"


def make_fault_hook(tokenizer: Any) -> Callable[[Any], None]:
    """A fault hook that reads the request's prompt back as text and fails it on a marker."""

    def hook(request: Any) -> None:
        text = tokenizer.decode(request.prompt_ids)
        if FATAL_MARKER in text:
            raise RuntimeError("CUDA error: injected")
        if FAULT_MARKER in text:
            raise RuntimeError("injected")

    return hook


def install() -> None:
    """Wrap `Worker.start` so that every worker it returns carries the fault hook."""
    from model_runtime.engine.worker import Worker

    original = Worker.start.__func__  # type: ignore[attr-defined]

    def start(cls: type[Worker], config: Any) -> Worker:
        worker = original(cls, config)
        worker.engine.fault_hook = make_fault_hook(worker.loaded.tokenizer)
        return worker

    Worker.start = classmethod(start)  # type: ignore[method-assign, assignment]


def main(argv: Sequence[str] | None = None) -> None:
    from server.cli import main as cli_main

    install()
    cli_main(argv)


if __name__ == "__main__":
    main()
