"""`internvl-batch --ray`: the same job on Ray Data. The driver reads the input (skipping what the
output already answers, writing line-level errors itself), hands the rest to `map_batches` over a
pool of stateful replicas, each an engine with the server's app in-process (batch/runner.py), and
writes their output lines as they arrive: the same file format and resume rules as one process.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import threading
from typing import Any

from batch.cli import EXIT_UNFINISHED, EXIT_USAGE, Job, finish
from batch.jsonl import Done, LineError, OutputWriter, Row, encode_line, read_rows
from batch.progress import Progress
from batch.runner import InProcessApp
from server.settings import Settings

logger = logging.getLogger(__name__)

# Each replica works on this many map_batches calls at once, so its engine is not left to drain
# at the end of one call while the next one's rows wait to be sent.
CALLS_PER_REPLICA = 2


class Replica:
    """A Ray Data stateful callable: one engine and app, on an event loop of its own thread."""

    def __init__(self, settings: dict[str, Any], concurrency: int) -> None:
        logging.basicConfig(level=logging.WARNING)
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="internvl-batch-loop", daemon=True).start()
        self._app = InProcessApp(Settings.model_validate(settings))
        self._concurrency = concurrency
        self._slots: asyncio.Semaphore | None = None
        self._call(self._start())

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _start(self) -> None:
        await self._app.__aenter__()
        self._slots = asyncio.Semaphore(self._concurrency)  # shared by the calls running at once

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        rows = [
            Row(int(line), str(custom_id), str(url), str(body).encode())
            for line, custom_id, url, body in zip(
                batch["line"], batch["custom_id"], batch["url"], batch["body"], strict=True
            )
        ]
        return {"record": self._call(self._run(rows))}

    async def _run(self, rows: list[Row]) -> list[str]:
        assert self._slots is not None
        slots = self._slots

        async def one(row: Row) -> str:
            async with slots:
                record = await self._app.post(row)  # EngineDiedError fails the call, and the job
            return json.dumps(record, separators=(",", ":"))

        return list(await asyncio.gather(*(one(row) for row in rows)))


def run_on_ray(job: Job, settings: Settings, done: Done, total: int) -> int:
    try:
        import ray
        import ray.data
    except ImportError:
        logger.error("--ray needs Ray Data: pip install 'internvl-serve[ray]'")
        return EXIT_USAGE
    with OutputWriter(job.output) as writer:
        progress = Progress(total, interval_s=job.progress_interval_s)

        def write(record: dict[str, Any]) -> None:
            writer.write(record)
            progress.update(record)

        pending: list[dict[str, Any]] = []
        for item in read_rows(job.input, done, max_line_bytes=job.max_line_bytes):
            if isinstance(item, LineError):
                write(item.record())
            else:
                row = {
                    "line": item.line,
                    "custom_id": item.custom_id,
                    "url": item.url,
                    "body": item.body.decode(),
                }
                pending.append(row)
        try:
            if pending:
                _run_dataset(ray, job, settings, pending, writer, progress)
        except Exception as exc:  # noqa: BLE001 - a failed replica or cluster: what was written stays
            # Ray's errors carry the remote traceback: its last line says what happened.
            cause = next(
                (line for line in reversed(str(exc).splitlines()) if line.strip()), type(exc).__name__
            )
            logger.debug("the Ray job failed", exc_info=exc)
            logger.error("the Ray job failed: %s; rerun the same command to resume", cause.strip())
            return EXIT_UNFINISHED
        finally:
            progress.close()
    return finish(job, done, progress)


def _run_dataset(
    ray: Any,
    job: Job,
    settings: Settings,
    pending: list[dict[str, Any]],
    writer: OutputWriter,
    progress: Progress,
) -> None:
    local = not (job.ray_address or os.environ.get("RAY_ADDRESS"))
    # A local instance for this job alone: no dashboard to start (seconds on a small machine).
    ray.init(
        address=job.ray_address,
        logging_level=logging.WARNING,
        **({"include_dashboard": False} if local else {}),
    )
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # ours counts rows and tokens
        gpus = ray.cluster_resources().get("GPU", 0)
        resources = {"num_gpus": 1} if gpus >= 1 else {"num_cpus": job.ray_cpus_per_replica}
        batch_size = job.ray_batch_size or _batch_size(len(pending), job)
        each = "1 GPU" if gpus >= 1 else f"{job.ray_cpus_per_replica} CPU"
        logger.info(
            "Ray: %d rows, %d replicas of %s, %d rows per call", len(pending), job.replicas, each, batch_size
        )
        dataset = ray.data.from_items(pending).map_batches(
            Replica,
            fn_constructor_kwargs={
                "settings": settings.model_dump(mode="json"),
                "concurrency": job.concurrency,
            },
            batch_size=batch_size,
            batch_format="numpy",
            **_pool(ray, job.replicas),
            **resources,
        )
        first = True
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            if first:
                progress.restart()  # rates from the first answers on, not from the replicas' start
                first = False
            for text in batch["record"]:
                record = json.loads(str(text))
                writer.write_line(encode_line(record))
                progress.update(record)
    finally:
        ray.shutdown()


def _batch_size(rows: int, job: Job) -> int:
    """Rows per call: enough to fill a replica's engine, few enough that every replica gets work
    (each works on CALLS_PER_REPLICA calls at once)."""
    return max(1, min(job.concurrency, -(-rows // (job.replicas * CALLS_PER_REPLICA))))


def _pool(ray: Any, replicas: int) -> dict[str, Any]:
    """A fixed pool of `replicas` actors, each running CALLS_PER_REPLICA calls at once: through
    ActorPoolStrategy where this Ray has its per-actor options (2.51 and later), else the older
    `concurrency` and `max_concurrency` arguments."""
    strategy = ray.data.ActorPoolStrategy
    options = inspect.signature(strategy.__init__).parameters
    if "max_concurrent_calls_per_actor" in options:
        extra = {"enable_true_multi_threading": True} if "enable_true_multi_threading" in options else {}
        return {"compute": strategy(size=replicas, max_concurrent_calls_per_actor=CALLS_PER_REPLICA, **extra)}
    return {"concurrency": replicas, "max_concurrency": CALLS_PER_REPLICA}
