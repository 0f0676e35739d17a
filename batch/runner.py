"""The engine and the server's FastAPI app in this process; each row is POSTed to the app through
httpx.ASGITransport (no socket, no HTTP server, no SSE), so validation, media handling, limits and
the engine's continuous batching are exactly the server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import httpx

from batch.jsonl import LineError, Row, error_record, response_record
from server.app import create_app
from server.settings import Settings

if TYPE_CHECKING:
    from model_runtime.engine.worker import Worker

logger = logging.getLogger(__name__)

DEMO_MODEL = "demo"
# A full engine queue (503 queue_full) only delays a row: it is sent again after a pause.
QUEUE_FULL_RETRY_S = 0.5


class EngineDiedError(Exception):
    """The engine died: rows still in flight are not written (a rerun sends them again)."""


def default_concurrency(settings: Settings) -> int:
    """Rows in flight: the engine's batch plus half again waiting, so that a finished sequence's
    place is taken at once (their media already decoded), without queueing past --max-waiting."""
    return max(1, min(settings.max_num_seqs + max(1, settings.max_num_seqs // 2), settings.max_waiting))


# A batch job's engine step-time target unless --step-time-target-ms says otherwise. The server's
# default keeps steps near 3x a decode step so that running streams never freeze; a batch job has no
# stream to protect, and bigger prefill steps finish its rows sooner (96 one-image rows, small
# model: 2.1-2.6 rows/s at the server's default, 2.9-3.3 at 2000 ms, 3.0 at 500 ms).
BATCH_STEP_TIME_TARGET_MS = 2000.0


def batch_settings(settings: Settings) -> Settings:
    """The server's settings as a batch job uses them: no API keys, as nothing listens; and, unless
    set, a step-time target for throughput (BATCH_STEP_TIME_TARGET_MS)."""
    update: dict[str, object] = {"api_keys": []}
    if settings.step_time_target_ms is None:
        update["step_time_target_ms"] = BATCH_STEP_TIME_TARGET_MS
    return settings.model_copy(update=update)


class InProcessApp:
    """Starts the engine (Worker, as server/cli.py does) and the app around it; `post(row)` returns
    the row's output record."""

    def __init__(self, settings: Settings) -> None:
        self.settings = batch_settings(settings)
        self.worker: Worker | None = None
        self._client: httpx.AsyncClient | None = None
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> InProcessApp:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()  # an engine already started is stopped
            raise
        return self

    async def _start(self) -> None:
        from model_runtime.engine.worker import Worker  # noqa: I001  (lazy: the runtime imports torch)

        settings = self.settings
        if not settings.model:
            raise ValueError("no model given")
        model_path = settings.model
        if model_path == DEMO_MODEL:
            from model_runtime.loading.tiny import ensure_demo_checkpoint

            model_path = await asyncio.to_thread(ensure_demo_checkpoint)
        worker = self.worker = await asyncio.to_thread(Worker.start, settings.to_engine_config(model_path))
        self._stack.push_async_callback(worker.shutdown)
        # Rows may name the model as given to --model, or by the name the server would serve it as.
        names = list(settings.served_model_name)
        if not names:
            default = DEMO_MODEL if settings.model == DEMO_MODEL else worker.served_model_default_name
            names = list(dict.fromkeys([default, settings.model]))
        app = create_app(settings.model_copy(update={"served_model_name": names}), worker)
        await self._stack.enter_async_context(app.router.lifespan_context(app))
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        self._client = await self._stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url="http://batch.invalid", timeout=None)
        )
        logger.info("model %s loaded; rows may name it %s", settings.model, " or ".join(map(repr, names)))

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    @property
    def dead(self) -> bool:
        return self.worker is not None and self.worker.health == "dead"

    async def post(self, row: Row) -> dict[str, Any]:
        """The row's output record: the API's status, request id and JSON body, whatever the status."""
        assert self._client is not None, "use `async with InProcessApp(...)`"
        while True:
            response = await self._client.post(
                row.url, content=row.body, headers={"Content-Type": "application/json"}
            )
            if response.status_code == 503 and self.dead:
                raise EngineDiedError("the engine died")
            if response.status_code != 503 or _error_code(response) != "queue_full":
                break
            await asyncio.sleep(QUEUE_FULL_RETRY_S)
        try:
            body = response.json()
        except ValueError:
            status = response.status_code
            logger.error(
                "row %s (line %d): the app answered %d without JSON", row.custom_id, row.line, status
            )
            return error_record(row.custom_id, "internal_error", "the server's answer was not JSON")
        if response.status_code >= 400:
            error = body.get("error", {}) if isinstance(body, dict) else {}
            logger.warning(
                "row %s (line %d): %d %s", row.custom_id, row.line, response.status_code, error.get("message")
            )
        return response_record(
            row.custom_id, response.status_code, response.headers.get("x-request-id", ""), body
        )


def _error_code(response: httpx.Response) -> str | None:
    with contextlib.suppress(ValueError, AttributeError):
        return str(response.json()["error"]["code"])
    return None


async def run_rows(
    app: InProcessApp,
    rows: Iterator[Row | LineError],
    write: Callable[[dict[str, Any]], None],
    *,
    concurrency: int,
) -> None:
    """Send `rows` to `app` with at most `concurrency` in flight; `write` each record as it finishes
    (line-level errors at once). EngineDiedError once the engine is dead (in-flight rows unwritten)."""
    slots = asyncio.Semaphore(concurrency)
    died: list[EngineDiedError] = []
    tasks: set[asyncio.Task[None]] = set()

    async def one(row: Row) -> None:
        try:
            record = await app.post(row)
        except EngineDiedError as exc:
            died.append(exc)
            return
        finally:
            slots.release()
        write(record)

    async for item in _in_thread(rows):
        if isinstance(item, LineError):
            write(item.record())
            continue
        await slots.acquire()
        if died:
            break
        task = asyncio.create_task(one(item))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    if died:
        raise died[0]


async def _in_thread(items: Iterator[Row | LineError]) -> AsyncIterator[Row | LineError]:
    """Read and parse input lines on a thread: a large line must not stall the event loop that
    delivers the engine's outputs."""
    done = object()
    while (item := await asyncio.to_thread(next, items, done)) is not done:
        yield item  # type: ignore[misc]
